"""The files every host shares on S3-compatible object storage (moto's server, a real S3
endpoint): model versions laid out as Triton reads them, published with `model.py` last,
removed whole, read back by the processes that need the files. Triton serving from the bucket,
datasets, MLflow's artifacts and Prefect's task storage there are checked where the product
uses them: test_retrain (the gate) and test_up (the whole `radloop up`)."""

from __future__ import annotations

import json

import pytest
import torch

from model_registry.repository import MODEL_CODE, model_repository
from radloop.modelspec import PACKAGED_MODELS, load_spec
from radloop.settings import Settings
from tests.conftest import bucket
from tests.models import scripted_network
from tests.servers import S3Server


@pytest.mark.object_store
def test_versions_on_s3_are_laid_out_for_triton_and_come_and_go_whole(
    settings: Settings, s3_server: S3Server, request: pytest.FixtureRequest
) -> None:
    spec = load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")
    repository = model_repository(settings)
    assert repository.export(spec, scripted_network(spec, seed=1)) == 1
    assert repository.export(spec, scripted_network(spec, seed=2), serve=False) == 2
    repository.mark_candidate(spec.name, 2)

    name = bucket(request.node)
    prefix = f"radloop/model-repository/{spec.name}/"
    files = sorted(["model.pt", "spec.json", *(code.name for code in MODEL_CODE)])
    assert s3_server.keys(name, prefix) == [
        prefix + key
        for key in ["1/" + f for f in files]
        + ["2/" + f for f in files]
        + ["config.pbtxt", "serving.json"]
    ]
    assert not (settings.data_dir / "model-repository").exists()
    # Another host's view: a repository of its own on the same settings.
    elsewhere = model_repository(settings)
    assert elsewhere.versions(spec.name) == [1, 2]
    assert (elsewhere.champion(spec.name), elsewhere.candidate(spec.name)) == (1, 2)
    assert "latest: { num_versions: 2 }" in (elsewhere.config_text(spec.name) or "")

    with elsewhere.version_folder(spec.name, 2) as folder:
        network = torch.jit.load(str(folder / "model.pt"))  # type: ignore[no-untyped-call]
        assert json.loads((folder / "spec.json").read_text())["name"] == spec.name
    assert sum(p.numel() for p in network.parameters()) > 0

    # A withdrawn candidate leaves with its mark; the champion cannot be removed.
    repository.remove_version(spec.name, 2)
    assert elsewhere.versions(spec.name) == [1] and elsewhere.candidate(spec.name) is None
    assert not [key for key in s3_server.keys(name, prefix) if "/2/" in key]
    with pytest.raises(ValueError, match="champion"):
        repository.remove_version(spec.name, 1)
    with pytest.raises(FileExistsError):
        repository.export(spec, scripted_network(spec, seed=3), version=1)
