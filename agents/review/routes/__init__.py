"""The review service's routes, one `APIRouter` per module; `agents.review.app.create_app`
includes them in this order (the viewer's catch-all last):

* `api` — `/api/health`, `/api/me`, the queue (`/api/worklist`, `/api/counts`)
* `annotations` — `/api/annotations/{id}`: read, claim, release, accept, label, validate, urgent
* `users` — `/api/users` (admins)
* `login` — `/login`, `/logout`
* `worklist` — the worklist page and its forms (`/`, `/worklist`, `/worklist/{id}/<action>`)
* `dashboard` — `/dashboard` and its plots
* `dicomweb` — the authenticated DICOMweb proxy (`/dicom-web/...`)
* `viewer` — OHIF's `app-config.js` and files, and its client-side routes

Routes reach what they need through `agents.review.deps`. (No `from __future__ import
annotations` in these modules: FastAPI reads the dependencies in their annotations when a
route is defined.)
"""
