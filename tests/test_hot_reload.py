"""Zero downtime: inference requests keep flowing, the way drafting sends them (pinned to the
champion pointer), while a new version is hot-reloaded into a real Triton and while it is
rolled back; not one request fails and the answers switch version. A version staged while the
gate judges it serves nothing until promoted, and a withdrawn one never serves."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from model_registry.deploy import DeployFailed, StagedVersion, hot_reload, warmup_volume
from model_registry.inference import InferenceUnavailable, InProcessBackend, TritonBackend
from model_registry.repository import TritonRepository, inference_config
from model_registry.triton_model.drafting import segment
from radloop.app.supervisor import Child
from radloop.modelspec import PACKAGED_MODELS, ModelSpec, load_spec
from radloop.settings import Settings
from radloop.wait import wait_until
from tests.conftest_marks import ONCE
from tests.models import scripted_network

pytestmark = [ONCE, pytest.mark.slow]


@pytest.fixture
def spec() -> ModelSpec:
    return load_spec(PACKAGED_MODELS / "phantom-abdomen.yaml")


@dataclass
class Traffic:
    """Clients sending inference requests back to back until stopped, each request to the
    version the serving pointer names when it is sent, as the annotator does."""

    repository: TritonRepository
    url: str
    spec: ModelSpec
    # (moment the request was sent, version that answered it)
    answers: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        backend = TritonBackend(self.url)
        image, spacing = warmup_volume(self.spec)
        while not self.stop.is_set():
            sent = time.monotonic()
            version = self.repository.champion(self.spec.name)
            try:
                answer = backend.infer(self.spec.name, image, spacing, version)
                self.answers.append((sent, answer.model_version))
            except InferenceUnavailable as error:
                self.failures.append(str(error))

    def sent_between(self, start: float, end: float = float("inf")) -> list[str]:
        """Versions that answered the requests sent between `start` and `end`."""
        return [version for at, version in self.answers if start < at < end]

    def wait_for(self, count: int, start: float) -> None:
        """Until `count` requests sent after `start` have been answered."""
        wait_until(lambda: len(self.sent_between(start)) >= count, timeout=180)


def test_hot_reload_and_rollback_under_load_drop_no_request(
    settings: Settings, triton: Child, spec: ModelSpec
) -> None:
    repository = TritonRepository(settings.model_repository)
    backend = TritonBackend(triton.spec.url)
    assert repository.export(spec, scripted_network(spec, seed=1)) == 1
    backend.load(spec.name)
    traffic = Traffic(repository, triton.spec.url, spec)
    clients = [threading.Thread(target=traffic.run) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        traffic.wait_for(4, 0.0)
        assert repository.export(spec, scripted_network(spec, seed=2), serve=False) == 2
        assert repository.champion(spec.name) == 1  # exported, not yet serving
        switch_started = time.monotonic()
        deployed = hot_reload(repository, backend, spec, 2)
        switched = time.monotonic()
        traffic.wait_for(6, switched)
        assert deployed.previous == 1 and deployed.version == 2
        assert "2" in backend.served_versions(spec.name)

        rollback_started = time.monotonic()
        rolled = hot_reload(repository, backend, spec, 1)
        rolled_back = time.monotonic()
        traffic.wait_for(6, rolled_back)
    finally:
        traffic.stop.set()
        for client in clients:
            client.join(timeout=120)
    assert traffic.failures == []
    assert set(traffic.sent_between(0.0, switch_started)) == {"1"}
    # A request sent to the old version while the pointer moved is still answered by it (it
    # stays loaded); every request sent after the switch gets the new version, and after the
    # rollback the old one again.
    assert set(traffic.sent_between(switched, rollback_started)) == {"2"}
    assert set(traffic.sent_between(rolled_back)) == {"1"}
    assert rolled.previous == 2 and repository.champion(spec.name) == 1


def test_a_version_that_cannot_load_leaves_the_champion_serving(
    settings: Settings, triton: Child, spec: ModelSpec
) -> None:
    repository = TritonRepository(settings.model_repository)
    backend = TritonBackend(triton.spec.url)
    repository.export(spec, scripted_network(spec, seed=1))
    backend.load(spec.name)
    broken = repository.export(spec, scripted_network(spec, seed=2), serve=False)
    (settings.model_repository / spec.name / str(broken) / "model.pt").write_bytes(b"not torch")
    with pytest.raises(DeployFailed):
        hot_reload(repository, backend, spec, broken, ready_timeout=60)
    assert repository.champion(spec.name) == 1
    assert backend.served_versions(spec.name) == ["1"]
    image, spacing = warmup_volume(spec)
    assert backend.infer(spec.name, image, spacing, 1).model_version == "1"


def test_a_staged_version_serves_nothing_until_promoted_and_a_withdrawn_one_never_serves(
    settings: Settings, triton: Child, spec: ModelSpec
) -> None:
    """As the retraining gate uses it: staged (loading in Triton while judged), then withdrawn
    (rejected); a candidate a killed run left behind; then staged again and promoted."""
    repository = TritonRepository(settings.model_repository)
    backend = TritonBackend(triton.spec.url)
    repository.export(spec, scripted_network(spec, seed=1))
    backend.load(spec.name)
    traffic = Traffic(repository, triton.spec.url, spec)
    clients = [threading.Thread(target=traffic.run) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        traffic.wait_for(2, 0.0)
        rejected = StagedVersion(repository, backend, spec, scripted_network(spec, 2))
        assert rejected.version == 2 and repository.candidate(spec.name) == 2
        assert repository.champion(spec.name) == 1  # pinned before the version existed
        wait_until(lambda: "2" in backend.served_versions(spec.name), timeout=180)
        traffic.wait_for(2, time.monotonic())  # requests while it is loaded beside v1
        rejected.withdraw()
        assert repository.versions(spec.name) == [1] and repository.candidate(spec.name) is None
        assert backend.served_versions(spec.name) == ["1"]

        # A run killed between staging and the gate leaves its candidate, loaded.
        repository.mark_candidate(spec.name, 2)
        repository.export(spec, scripted_network(spec, 3), 2, serve=False)
        backend.load(spec.name)
        assert repository.champion(spec.name) == 1 and "2" in backend.served_versions(spec.name)
        promoted = StagedVersion(repository, backend, spec, scripted_network(spec, 4))
        assert promoted.version == 2  # the leftover was removed first
        traffic.wait_for(2, time.monotonic())
        promoting = time.monotonic()
        deployed = promoted.promote()
        switched = time.monotonic()
        traffic.wait_for(4, switched)
    finally:
        traffic.stop.set()
        for client in clients:
            client.join(timeout=120)
    assert traffic.failures == []
    # Not one request before the promotion was answered by a staged version.
    assert set(traffic.sent_between(0.0, promoting)) == {"1"}
    assert set(traffic.sent_between(switched)) == {"2"}
    assert (deployed.previous, deployed.version) == (1, 2)
    assert repository.champion(spec.name) == 2 and repository.candidate(spec.name) is None
    # Triton serves the promoted weights, not those of the leftover that had the same number.
    image, spacing = warmup_volume(spec)
    served = backend.infer(spec.name, image, spacing, 2).labels
    promoted_labels = InProcessBackend(settings.model_repository).infer(spec.name, image, spacing)
    leftover_labels, _ = segment(scripted_network(spec, 3), image, spacing, inference_config(spec))
    assert np.mean(served == promoted_labels.labels) > 0.999
    assert np.mean(served == leftover_labels) < 0.99
