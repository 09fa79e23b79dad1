"""Real Triton (the wheel's tritonserver): the exported model serves what in-process computes,
and loading a newer version switches the responses to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agents.volume import LoadedSeries, load_series
from model_registry.inference import InProcessBackend, TritonBackend
from model_registry.repository import TritonRepository
from radloop.app.phantoms import write_study
from radloop.app.supervisor import Child
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings
from tests.conftest_marks import ONCE
from tests.models import scripted_network

pytestmark = [ONCE, pytest.mark.slow]


@pytest.fixture
def spec() -> ModelSpec:
    return load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")


@pytest.fixture
def phantom_series(tmp_path: Path) -> LoadedSeries:
    study = write_study(tmp_path / "phantoms", 0, seed=11)
    return load_series(sorted(study.dicom_dir.glob("*.dcm")))


def test_triton_serves_the_model_as_in_process_and_swaps_to_a_newer_version(
    settings: Settings, triton: Child, spec: ModelSpec, phantom_series: LoadedSeries
) -> None:
    repository = TritonRepository(settings.model_repository)
    assert repository.export(spec, scripted_network(spec, seed=1)) == 1
    served = TritonBackend(triton.spec.url)
    served.load(spec.name)
    assert served.served_versions(spec.name) == ["1"]

    remote = served.infer(spec.name, phantom_series.array, phantom_series.spacing)
    local = InProcessBackend(settings.model_repository).infer(
        spec.name, phantom_series.array, phantom_series.spacing
    )
    assert remote.model_version == "1"
    assert remote.labels.shape == phantom_series.array.shape and remote.labels.dtype == np.uint8
    assert 0.0 <= remote.uncertainty <= 1.0
    assert np.mean(remote.labels == local.labels) > 0.999
    assert remote.uncertainty == pytest.approx(local.uncertainty, abs=1e-4)
    # What the active-learning strategies rank on comes through Triton as computed here.
    assert set(remote.scores) == {"entropy"}
    assert remote.scores["entropy"] == pytest.approx(local.scores["entropy"], abs=1e-4)
    assert remote.embedding.shape == local.embedding.shape == (256,)
    assert np.allclose(remote.embedding, local.embedding, atol=1e-4)

    assert repository.export(spec, scripted_network(spec, seed=2)) == 2
    served.load(spec.name)
    assert served.served_versions(spec.name) == ["1", "2"]  # the two newest stay loaded
    newer = served.infer(spec.name, phantom_series.array, phantom_series.spacing)
    assert newer.model_version == "2"
