"""The Triton model repository radloop manages: `<root>/<model>/<version>/` folders holding
TorchScript weights, the spec they were trained for and the python-backend `model.py`.

A version folder appears atomically (written beside, then renamed), so a Triton load never
sees half a version; its files, `config.pbtxt` and the serving pointer `serving.json` are
written durably (`radloop.durable`), so a power cut cannot leave a pointer to a version whose
weights were never on disk. The layout is Triton's own, so NVIDIA's Triton container serves the same
folder on a GPU (see deploy/triton/README.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radloop.durable import (
    durable_path,
    make_folder_durably,
    replace_durably,
    write_bytes_durably,
)
from radloop.modelspec import ModelSpec

if TYPE_CHECKING:
    import torch

MODEL_CODE = Path(__file__).resolve().with_name("triton_model.py")

_CONFIG = """\
# Written by radloop for model spec {name!r}; regenerated on every export.
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "IMAGE", data_type: TYPE_FP32, dims: [ -1, -1, -1 ] }},
  {{ name: "SPACING", data_type: TYPE_FP32, dims: [ 3 ] }}
]
output [
  {{ name: "LABELS", data_type: TYPE_UINT8, dims: [ -1, -1, -1 ] }},
  {{ name: "UNCERTAINTY", data_type: TYPE_FP32, dims: [ 1 ] }},
  {{ name: "MODEL_VERSION", data_type: TYPE_STRING, dims: [ 1 ] }}
]
# Which versions Triton keeps loaded (model_registry.deploy): normally the two newest, so a
# new version loads beside the champion without reloading it; drafting asks for the champion
# by number (serving.json).
version_policy: {policy}
# model.py moves the network to a GPU itself when torch sees one.
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""


def inference_config(spec: ModelSpec) -> dict[str, Any]:
    """What `model.py` needs of the spec, as JSON (it does not import radloop)."""
    return spec.model_dump(
        mode="json", include={"name", "preprocessing", "inference", "uncertainty", "labels"}
    )


SERVING_FILE = "serving.json"


class TritonRepository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def champion(self, name: str) -> int | None:
        """The version drafts come from: `serving.json`, else the newest version."""
        try:
            return int(json.loads((self.root / name / SERVING_FILE).read_text())["version"])
        except (OSError, ValueError, KeyError):
            versions = self.versions(name)
            return versions[-1] if versions else None

    def previous_champion(self, name: str) -> int | None:
        try:
            previous = json.loads((self.root / name / SERVING_FILE).read_text()).get("previous")
        except (OSError, ValueError):
            return None
        return int(previous) if previous is not None else None

    def set_champion(self, name: str, version: int) -> None:
        """Point drafting at `version` (atomic; the old pointer is kept as `previous`)."""
        if version not in self.versions(name):
            raise FileNotFoundError(f"{name} has no version {version}")
        current = self.champion(name)
        record = {"version": version, "previous": current if current != version else None}
        write_bytes_durably(self.root / name / SERVING_FILE, json.dumps(record).encode())

    def write_config(self, spec_name: str, versions: list[int] | None = None) -> bool:
        """Which versions Triton loads on the next explicit load: the two newest (None), or
        exactly `versions` (a rollback to an older one). Returns whether the file changed —
        Triton reloads every version of a model whose configuration changed."""
        if versions is None:
            policy = "{ latest: { num_versions: 2 } }"
        else:
            listed = ", ".join(str(v) for v in sorted(set(versions)))
            policy = f"{{ specific: {{ versions: [ {listed} ] }} }}"
        path = self.root / spec_name / "config.pbtxt"
        text = _CONFIG.format(name=spec_name, policy=policy)
        if path.is_file() and path.read_text() == text:
            return False
        write_bytes_durably(path, text.encode())
        return True

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())

    def export(
        self,
        spec: ModelSpec,
        model: torch.jit.ScriptModule,
        version: int | None = None,
        *,
        serve: bool = True,
    ) -> int:
        """Write `model` as a new version of `spec.name` (next free number unless given).

        With `serve`, the new version is also the one Triton loads and drafting uses (starter
        and imported models); the retraining flow passes False and hot-reloads it itself."""
        existing = self.versions(spec.name)
        version = version if version is not None else (existing[-1] + 1 if existing else 1)
        if version in existing:
            raise FileExistsError(f"{spec.name} version {version} already exists")
        model_dir = self.root / spec.name
        make_folder_durably(model_dir)
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".staging-"))
        try:
            # torch is imported here, not at module level: every annotation flow run imports
            # this module only to list versions, and torch cost it 1.3 s of start-up.
            import torch

            with durable_path(staging / "model.pt") as weights:
                torch.jit.save(model, str(weights))
            config = json.dumps(inference_config(spec), indent=2)
            write_bytes_durably(staging / "spec.json", config.encode())
            write_bytes_durably(staging / "model.py", MODEL_CODE.read_bytes())
            replace_durably(staging, model_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if serve or not (model_dir / "config.pbtxt").exists():
            self.write_config(spec.name)
            self.set_champion(spec.name, version)
        return version
