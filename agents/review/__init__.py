"""The review service: readers correct radloop's drafts and reviewers validate them into the
training set.

* `app` — `create_app`: builds the service and includes the routers of `routes/`
  (REST API, pages, DICOMweb proxy, OHIF viewer); `deps` — their dependencies.
* `worklist` — `Worklist`, the queue and the actions on it; `leases` — claims and their
  leases; `intake` — corrections taken in; `training_set` — validated labels and their files;
  `cases` — a case, how it is loaded, and the refusals (`ReviewError`).
* `corrections` — reading and checking SEG and NIfTI label maps, Dice.
* `auth` — users, roles, tokens, sessions; `proxy` — the DICOMweb proxy and OHIF host;
  `plots` — the dashboard's plots.
"""
