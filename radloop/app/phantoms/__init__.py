"""Generated test and demo data without patient data.

* `ct` — synthetic CT series written as DICOM files (`ct_series`, `write_ct_slice`,
  `CtSeriesHeader`).
* `anatomy` — an abdominal phantom's organs and tissues, drawn from a seed (`sample_parameters`,
  `PhantomParameters`, `PhantomLabel`), and the rendered `Phantom`.
* `render` — parameters to HU and label volumes (`render`, `generate`).
* `files` — a phantom study on disk: DICOM, NIfTI truth and `truth.json` (`write_study`).
"""

from radloop.app.phantoms.anatomy import (
    Ellipsoid,
    Phantom,
    PhantomLabel,
    PhantomParameters,
    sample_parameters,
)
from radloop.app.phantoms.ct import CtSeriesHeader, ct_series, write_ct_slice
from radloop.app.phantoms.files import WrittenStudy, write_study
from radloop.app.phantoms.render import generate, render

__all__ = [
    "CtSeriesHeader",
    "Ellipsoid",
    "Phantom",
    "PhantomLabel",
    "PhantomParameters",
    "WrittenStudy",
    "ct_series",
    "generate",
    "render",
    "sample_parameters",
    "write_ct_slice",
    "write_study",
]
