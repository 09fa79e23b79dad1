"""The Triton python-backend model: its modules are copied into every model version folder.

Triton's python backend imports a version folder's `model.py` as `<version>.model`, the folder
being a package, so the modules here import each other relatively and are copied side by side
(`TritonRepository.export`; this `__init__` is not copied). Self-contained on purpose — they
import only numpy and torch, so the same repository runs in the `tritonserver` radloop starts
and in NVIDIA's Triton container on a GPU. Not MONAI: Triton starts a new stub process for
every version it loads, and importing MONAI there made a hot reload seconds slower. The same
code is the in-process backend of the unit tests and of the holdout gate (`segment`).

- `window`: preprocessing and MONAI's Gaussian sliding window, step for step.
- `drafting`: a volume's label map, uncertainty scores and embedding (`analyse`).
- `clicks`: DeepEdit refinement from clicks (`refine`).
- `model`: `TritonPythonModel` and `load`.

One request: IMAGE (float32, slices × rows × columns, HU), SPACING (float32 [3], mm);
response: LABELS (uint8, same shape), UNCERTAINTY (float32 [1], the spec's method), SCORES
(float32 [3]: entropy, mc_dropout, flip_tta, NaN where not computed), EMBEDDING (float32 [d],
the study's embedding for diversity-aware selection), MODEL_VERSION (bytes [1]).
An interactive (DeepEdit) version also takes CLICKS (int32, n × 4: channel, slice, row,
column; channel 0 is background, n is the label value) and PREVIOUS (uint8, IMAGE's shape: the
label being refined); both are optional inputs, absent meaning no clicks and an empty label.
"""
