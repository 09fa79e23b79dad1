"""The Triton model repository radloop manages: `<root>/<model>/<version>/` folders holding
TorchScript weights, the spec they were trained for and the python-backend `model.py`.

The repository is a folder or a prefix of an S3 bucket (`radloop.objectstore`; Triton reads
both). In a folder a version appears atomically (written beside, then renamed), so a Triton
load never sees half a version, and a version that never served (a withdrawn candidate) leaves
the same way; its files, `config.pbtxt` and the serving pointer `serving.json` are written
durably (`radloop.durable`), so a power cut cannot leave a pointer to a version whose weights
were never on disk. On S3 each object appears whole and `model.py` is uploaded last: a
version without it is one Triton cannot load, never half a network. The layout is Triton's
own, so NVIDIA's Triton container serves the same repository on a GPU (see
deploy/triton/README.md).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radloop.modelspec import ModelSpec
from radloop.objectstore import LocalFolder, ObjectStore

if TYPE_CHECKING:
    import torch

    from radloop.settings import Settings

# The modules Triton imports from each version folder (`model.py` and its siblings).
MODEL_CODE = sorted(
    path
    for path in (Path(__file__).resolve().parent / "triton_model").glob("*.py")
    if path.name != "__init__.py"
)

_CONFIG = """\
# Written by radloop for model spec {name!r}; regenerated on every export.
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "IMAGE", data_type: TYPE_FP32, dims: [ -1, -1, -1 ] }},
  {{ name: "SPACING", data_type: TYPE_FP32, dims: [ 3 ] }},
  # Interactive (DeepEdit) models only; the others ignore them.
  {{ name: "CLICKS", data_type: TYPE_INT32, dims: [ -1, 4 ], optional: true }},
  {{ name: "PREVIOUS", data_type: TYPE_UINT8, dims: [ -1, -1, -1 ], optional: true }}
]
output [
  {{ name: "LABELS", data_type: TYPE_UINT8, dims: [ -1, -1, -1 ] }},
  {{ name: "UNCERTAINTY", data_type: TYPE_FP32, dims: [ 1 ] }},
  # Uncertainty by method (entropy, mc_dropout, flip_tta; NaN: not computed) and the study's
  # embedding, for the active-learning strategies (agents.selection).
  {{ name: "SCORES", data_type: TYPE_FP32, dims: [ 3 ] }},
  {{ name: "EMBEDDING", data_type: TYPE_FP32, dims: [ -1 ] }},
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
    """What `model.py` needs of the spec, as JSON (it does not import radloop); an interactive
    model's (`ModelSpec.as_interactive`) also holds its `interactive` section."""
    fields = {"name", "preprocessing", "inference", "uncertainty", "labels"}
    if spec.is_interactive:
        fields.add("interactive")
    return spec.model_dump(mode="json", include=fields)


SERVING_FILE = "serving.json"
README = "README.txt"


class TritonRepository:
    def __init__(self, store: ObjectStore | Path) -> None:
        self.store: ObjectStore = LocalFolder(store) if isinstance(store, Path) else store

    def create(self) -> None:
        """Make the repository exist (Triton will not start on a missing one): a folder, or on
        S3 a README object under the prefix (S3 has no empty folders)."""
        if isinstance(self.store, LocalFolder):
            self.store.root.mkdir(parents=True, exist_ok=True)
        elif not self.store.exists(README):
            self.store.write_bytes(
                README,
                b"radloop's Triton model repository: a folder per model, a folder per version\n",
            )

    def _read_text(self, key: str) -> str | None:
        try:
            return self.store.read_bytes(key).decode()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _pointer(self, name: str) -> dict[str, Any]:
        try:
            record = json.loads(self._read_text(f"{name}/{SERVING_FILE}") or "{}")
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _write_pointer(self, name: str, record: dict[str, Any]) -> None:
        self.store.write_bytes(f"{name}/{SERVING_FILE}", json.dumps(record).encode())

    def champion(self, name: str) -> int | None:
        """The version drafts come from: `serving.json`, else the newest version."""
        try:
            return int(self._pointer(name)["version"])
        except (ValueError, KeyError, TypeError):
            versions = self.versions(name)
            return versions[-1] if versions else None

    def previous_champion(self, name: str) -> int | None:
        previous = self._pointer(name).get("previous")
        return int(previous) if previous is not None else None

    def candidate(self, name: str) -> int | None:
        """The version staged beside the champion and not yet judged (`mark_candidate`)."""
        candidate = self._pointer(name).get("candidate")
        return int(candidate) if candidate is not None else None

    def set_champion(self, name: str, version: int, training_run: int | None = None) -> None:
        """Point drafting at `version` (atomic; the old pointer is kept as `previous`, a
        candidate mark is cleared: it was judged). `training_run`: the run whose challenger
        `version` is, recorded in the same write, so a run killed right after it can be
        finished by the next (`serving_run`)."""
        if version not in self.versions(name):
            raise FileNotFoundError(f"{name} has no version {version}")
        current = self.champion(name)
        record: dict[str, Any] = {
            "version": version,
            "previous": current if current != version else None,
        }
        if training_run is not None:
            record["training_run"] = training_run
        self._write_pointer(name, record)

    def serving_run(self, name: str) -> int | None:
        """The training run whose challenger the champion is, as its deploy recorded it (None
        for a starter, an imported version or a rollback)."""
        run = self._pointer(name).get("training_run")
        return int(run) if isinstance(run, int) else None

    def mark_candidate(self, name: str, version: int) -> None:
        """Record, before it is written, that `version` will be a candidate the gate has not
        judged, and pin the champion by number (without `serving.json` the newest version would
        count as champion). A process killed before the decision leaves the mark, and the
        next staging removes that version (`remove_version`)."""
        champion = self.champion(name)
        if champion is None or champion == version:
            raise ValueError(f"{name}: a candidate needs another version as champion")
        record = {**self._pointer(name), "version": champion}  # its `training_run` stays
        self._write_pointer(name, {**record, "candidate": version})

    def remove_version(self, name: str, version: int) -> None:
        """Take `version` out of the repository, and its candidate mark; the champion cannot
        be removed. Unload it in Triton afterwards."""
        if version == self.champion(name):
            raise ValueError(f"{name} v{version} is the champion")
        self.store.remove(f"{name}/{version}")
        record = self._pointer(name)
        if record.get("candidate") == version:
            self._write_pointer(name, {k: v for k, v in record.items() if k != "candidate"})

    def config_text(self, name: str) -> str | None:
        """`config.pbtxt` as it is now (to put back with `restore_config`)."""
        return self._read_text(f"{name}/config.pbtxt")

    def restore_config(self, name: str, text: str) -> bool:
        """Put back a `config_text`; returns whether the file changed."""
        if self.config_text(name) == text:
            return False
        self.store.write_bytes(f"{name}/config.pbtxt", text.encode())
        return True

    def write_config(self, spec_name: str, versions: list[int] | None = None) -> bool:
        """Which versions Triton loads on the next explicit load: the two newest (None), or
        exactly `versions` (a rollback to an older one). Returns whether the file changed —
        Triton reloads every version of a model whose configuration changed."""
        if versions is None:
            policy = "{ latest: { num_versions: 2 } }"
        else:
            listed = ", ".join(str(v) for v in sorted(set(versions)))
            policy = f"{{ specific: {{ versions: [ {listed} ] }} }}"
        return self.restore_config(spec_name, _CONFIG.format(name=spec_name, policy=policy))

    def versions(self, name: str) -> list[int]:
        return sorted(int(n) for n in self.store.folders(name) if n.isdigit())

    @contextmanager
    def version_folder(self, name: str, version: int) -> Iterator[Path]:
        """A local folder with the version's files (`model.pt`, `spec.json`, `model.py`)."""
        with self.store.fetch(f"{name}/{version}") as folder:
            yield folder

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
        config = json.dumps(inference_config(spec), indent=2)
        name = spec.name
        existing = self.versions(name)
        version = version if version is not None else (existing[-1] + 1 if existing else 1)
        if version in existing:
            raise FileExistsError(f"{name} version {version} already exists")

        def write(folder: Path) -> None:
            # torch is imported here, not at module level: every annotation flow run imports
            # this module only to list versions, and torch cost it 1.3 s of start-up.
            import torch

            torch.jit.save(model, str(folder / "model.pt"))
            (folder / "spec.json").write_text(config)
            for code in MODEL_CODE:
                shutil.copyfile(code, folder / code.name)

        self.store.publish(f"{name}/{version}", write, last="model.py")
        if serve or self.config_text(name) is None:
            self.write_config(name)
            self.set_champion(name, version)
        return version


def model_repository(settings: Settings) -> TritonRepository:
    """The repository these settings name: on the object store, or a folder."""
    return TritonRepository(settings.shared_store("model-repository"))
