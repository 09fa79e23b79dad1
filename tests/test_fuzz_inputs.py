"""Hostile files, generated (hypothesis): every DICOM instance a sender or the watch folder
hands over, every series the annotator loads, every label a reader uploads (SEG, NIfTI,
NRRD) ends in an answer radloop gives on purpose — a header or `InvalidInstance`, a volume or
`SeriesRejected`, a label map on the draft's grid or `InvalidLabel` — never another exception,
which the listener would answer as "cannot decode" without a reason, the annotator would
retry without end, and the review service would answer with a 500.

Seeds: tests/fuzz/corpus.py; mutations: tests/fuzz/mutations.py; what each input goes
through: tests/fuzz/targets.py. The budget here is CI's (fixed, derandomised); `make fuzz`
runs more, and the coverage-guided harness.
"""

from __future__ import annotations

import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from pydicom import dcmread

from agents.review.corrections import is_dicom, read_dicom, seg_label_map, volume_label_map
from dicom_listener.instance import InstanceHeader
from tests.fuzz import budget
from tests.fuzz.corpus import Corpus, build_corpus
from tests.fuzz.mutations import dicom_inputs, mutated_bytes
from tests.fuzz.targets import load_files, receive_instance, upload_label


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("fuzz"))


def test_the_seeds_are_good_inputs(corpus: Corpus) -> None:
    """Unmutated, every seed passes: the properties below start from accepted files."""
    for data in corpus.instances:
        ds = dcmread(BytesIO(data))
        InstanceHeader.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
    for data in corpus.labels:
        label = (
            seg_label_map(read_dicom(data), corpus.series, corpus.spec)
            if is_dicom(data)
            else volume_label_map(data, corpus.series, corpus.spec)
        )
        assert label.shape == corpus.series.array.shape and set(np.unique(label)) == {0, 1, 2}


@given(data=st.data())
@budget(300)
def test_a_received_instance_is_indexed_or_refused_with_a_reason(
    corpus: Corpus, data: st.DataObject
) -> None:
    event(receive_instance(data.draw(dicom_inputs(corpus.instances))))


@given(data=st.data())
@budget(60)
def test_a_series_is_a_volume_or_rejected_with_a_reason(
    corpus: Corpus, data: st.DataObject, tmp_path: Path
) -> None:
    files = list(corpus.slices)
    bad = data.draw(st.integers(0, len(files) - 1))
    files[bad] = data.draw(dicom_inputs([files[bad]]))
    event(load_files(files, tmp_path))


@given(data=st.data())
@budget(200)
def test_an_uploaded_label_is_taken_on_the_drafts_grid_or_refused_with_a_reason(
    corpus: Corpus, data: st.DataObject
) -> None:
    event(upload_label(data.draw(mutated_bytes(corpus.labels)), corpus))


def test_the_coverage_guided_harness_runs_its_budget_clean(tmp_path: Path) -> None:
    """atheris (libFuzzer) on the same three paths, from the same seeds: CI's short run;
    `make fuzz` runs each for minutes. A finding exits non-zero and leaves a `crash-*` file."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.harness", "all", "-runs=3000", "-seed=1"],
        env={"RADLOOP_FUZZ_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 3000 runs" in done.stderr
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith("crash-")]
