"""Coverage-guided fuzzing (atheris: libFuzzer for Python) of the same paths as the hypothesis
properties: a received instance, a series with one hostile file, an uploaded label (or all
three, the first byte choosing).

    .venv/bin/python -m tests.fuzz.harness instance|series|label|all [libFuzzer options]

e.g. `-max_total_time=600` or `-runs=2000`. The seeds (tests/fuzz/corpus.py) are written to
a corpus folder under `RADLOOP_FUZZ_DIR` (default: a temporary folder) that libFuzzer grows;
a crash is written there as `crash-<sha1>` — a new regression test for tests/test_fuzz_inputs.py.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import atheris

# Coverage feedback from what parses the bytes (instrumenting all of pydicom, nibabel and
# radloop's imports made start-up 35 s).
_INSTRUMENTED = [
    "dicom_listener.instance",
    "agents.volume",
    "agents.nifti",
    "agents.segmentation",
    "agents.review.corrections",
    "pydicom.filereader",
    "pydicom.values",
    "pydicom.dataelem",
    "pydicom.valuerep",
    "nrrd.reader",
    "nibabel.nifti1",
]

with atheris.instrument_imports(include=_INSTRUMENTED):
    from tests.fuzz.corpus import build_corpus
    from tests.fuzz.targets import load_files, receive_instance, upload_label


def main() -> None:
    warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    target = sys.argv[1] if len(sys.argv) > 1 else ""
    folder = Path(os.environ.get("RADLOOP_FUZZ_DIR") or tempfile.mkdtemp(prefix="radloop-fuzz-"))
    corpus = build_corpus(folder / "seeds")
    work = folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, list[bytes]] = {
        "instance": corpus.instances,
        "series": corpus.slices[:1],
        "label": corpus.labels,
    }
    one: dict[str, Callable[[bytes], object]] = {
        "instance": receive_instance,
        # The series' other slices stay good; the fuzzed bytes are its first file.
        "series": lambda data: load_files([data, *corpus.slices[1:]], work),
        "label": lambda data: upload_label(data, corpus),
    }
    # All three in one process (CI's run: one start-up), the first byte choosing the path.
    paths = list(one.values())
    seeds["all"] = [bytes([i]) + seed for i, name in enumerate(one) for seed in seeds[name]]
    one["all"] = lambda data: paths[data[0] % len(paths)](data[1:]) if data else None
    if target not in one:
        sys.exit(f"usage: python -m tests.fuzz.harness {'|'.join(one)} [libFuzzer options]")
    found = folder / target
    found.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds[target]):
        (found / f"seed-{index}").write_bytes(seed)
    run = one[target]
    atheris.Setup(
        [sys.argv[0], *sys.argv[2:], f"-artifact_prefix={folder}/", str(found)],
        lambda data: run(bytes(data)),
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
