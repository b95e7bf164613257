"""The supervisor's bookkeeping of stub processes, without a server: which stubs a round knows, so that a stub
that dies at any moment of a round is seen gone (the real server's tests are in test_reliability.py)."""

from __future__ import annotations

from types import SimpleNamespace

from serving import supervisor as supervisor_module
from serving.faults import Stub, instance_model
from serving.supervisor import Supervisor, _Probe


class _Fake:
    """Stands in for tritonserver: the stub processes the test says are alive, probes that pass, reloads that
    run ``during_reload`` (a fault while a reload takes its seconds)."""

    def __init__(self, monkeypatch, stubs: list[Stub]) -> None:
        self.alive = list(stubs)
        self.reloads: list[str] = []
        self.during_reload = lambda model: None
        self.server = SimpleNamespace(poll=lambda: None, models=["amc"], pid=1)
        monkeypatch.setattr(supervisor_module, "_stubs", lambda server: list(self.alive))

    def supervisor(self) -> Supervisor:
        s = Supervisor(self.server, ensembles=["amc"])
        s._probe = lambda ensemble: _Probe(True)

        def reload(model: str, cause: str):
            self.reloads.append(model)
            self.during_reload(model)
            return SimpleNamespace(ok=True)
        s._reload = reload
        return s

    def kill(self, name: str) -> None:
        self.alive = [s for s in self.alive if s.name != name]


def _stub(pid: int, name: str) -> Stub:
    return Stub(pid, name, instance_model(name))


def test_a_stub_that_dies_while_another_is_reloaded_is_not_forgotten(monkeypatch) -> None:
    fake = _Fake(monkeypatch, [_stub(10, "amc_tokenizer_0_0"), _stub(11, "amc_van_0_0"), _stub(12, "amc_van_0_1")])
    supervisor = fake.supervisor()
    assert supervisor.check() and supervisor.ready  # healthy: all three known
    fake.kill("amc_tokenizer_0_0")
    # While the tokenizer is reloaded (its stub comes back), one of VAN's two instances dies; the probes still
    # pass through the other instance.

    def during(model: str) -> None:
        fake.alive.append(_stub(20, "amc_tokenizer_0_0"))
        fake.kill("amc_van_0_1")
    fake.during_reload = during
    assert not supervisor.check()
    assert fake.reloads == ["amc_tokenizer"]
    assert not supervisor.ready and "amc_van_0_1 (pid 12) is gone" in supervisor.reason
    fake.during_reload = lambda model: fake.alive.append(_stub(21, "amc_van_0_1"))
    assert supervisor.check() and supervisor.ready  # the next round reloads VAN
    assert fake.reloads == ["amc_tokenizer", "amc_van"]


def test_reloaded_models_are_known_by_their_new_stubs(monkeypatch) -> None:
    """A model whose instances are fewer after its reload (an operator's new config) is not repaired forever."""
    fake = _Fake(monkeypatch, [_stub(10, "amc_van_0_0"), _stub(11, "amc_van_0_1")])
    supervisor = fake.supervisor()
    assert supervisor.check()
    fake.kill("amc_van_0_1")
    assert supervisor.check() and supervisor.ready  # reloaded; it comes back with one instance
    assert fake.reloads == ["amc_van"]
    assert supervisor.check() and supervisor.ready and fake.reloads == ["amc_van"]


def test_a_stub_started_by_a_reload_that_dies_during_the_next_reload_is_not_forgotten(monkeypatch) -> None:
    fake = _Fake(monkeypatch, [_stub(10, "amc_tokenizer_0_0"), _stub(11, "amc_van_0_0"), _stub(12, "amc_van_0_1")])
    supervisor = fake.supervisor()
    assert supervisor.check()
    fake.kill("amc_tokenizer_0_0")
    fake.kill("amc_van_0_1")

    def during(model: str) -> None:  # the tokenizer's reload starts a stub, which dies while VAN is reloaded
        if model == "amc_tokenizer":
            fake.alive.append(_stub(20, "amc_tokenizer_0_0"))
        else:
            fake.kill("amc_tokenizer_0_0")
            fake.alive.append(_stub(21, "amc_van_0_1"))
    fake.during_reload = during
    assert not supervisor.check()
    assert fake.reloads == ["amc_tokenizer", "amc_van"]
    assert not supervisor.ready and "amc_tokenizer_0_0 (pid 20) is gone" in supervisor.reason
