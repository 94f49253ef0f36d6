"""CooperativeSGD with a compressed spec (SPEC §11): the distributed engine's compressed rounds, in threads.

m simulated ranks run as m threads over an in-process wire (a rendezvous per collective, as in
``tests/unit/test_wrapper.py``) that also moves the packed payloads (all-gather, broadcast, point-to-point).
The wrappers' models equal the one-process simulator's (float64, 1e-10) for averaging rounds (local SGD,
FedAvg with sampled clients, PowerSGD on sync), CHOCO gossip on a ring, elastic rounds (EASGD, generalized
elastic, hierarchical), DOWNPOUR's pushes and LSGD's leader refresh; what the wrapper cannot do is refused with one line
naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import CallableSchedule, MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.compression import parse_compressor
from coopsgd.engines.distributed.communicator import CommStats
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError
from coopsgd.wrapper import CooperativeSGD

TOL = 1e-10
LR = 0.1
BATCH = 4


class Wire:
    """A rendezvous between m threads: every rank deposits a value, every rank reads all of them."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.barrier = threading.Barrier(m, timeout=30)
        self.slots: list[Any] = [None] * m

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got


class ThreadComm:
    """One rank's communicator: the wrapper's collectives and the byte transport of compressed payloads."""

    pending = False

    def __init__(self, wire: Wire, rank: int) -> None:
        self.wire, self.rank, self.m = wire, rank, wire.m
        self.stats = CommStats()
        self.charged: list[tuple[str, float, float]] = []  # (kind, bytes on the wire, bytes of the cost model)

    def finalize(self) -> None:
        return None

    def communicate(self, rows: Tensor, rnd: Any, *, overlap: bool = False) -> None:
        S = np.asarray(rnd.matrix)
        X = torch.cat([torch.stack(self.wire.exchange(self.rank, rows[0].clone())), rows[1:]])
        St = torch.as_tensor(np.array(S.T), dtype=rows.dtype)
        new_x, new_Z = St[self.rank] @ X, St[self.m :] @ X
        rows[0].copy_(new_x)
        rows[1:].copy_(new_Z)

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        return np.stack(self.wire.exchange(self.rank, np.atleast_1d(np.asarray(values, dtype=np.float64))))

    def broadcast(self, t: Tensor, src: int) -> None:
        t.copy_(self.wire.exchange(self.rank, t.clone())[src])

    def all_reduce(self, t: Tensor) -> None:
        t.copy_(torch.stack(self.wire.exchange(self.rank, t.clone())).sum(dim=0))

    def holds(self, aux: int) -> bool:
        return True

    def host(self, aux: int) -> int:
        return aux % self.m

    def collect_aux(self, Z: Tensor) -> Tensor:
        return Z.clone()

    # -- the byte transport ---------------------------------------------------------------------------
    def gather_bytes(self, buf: Tensor) -> Tensor:
        return torch.stack(self.wire.exchange(self.rank, buf.clone()))

    def broadcast_bytes(self, buf: Tensor, src: int) -> None:
        buf.copy_(self.wire.exchange(self.rank, buf.clone())[src])

    def exchange_bytes(self, buf: Tensor | None, send_to: Sequence[int], recv_from: Sequence[int],
                       nbytes: int, device: torch.device | None = None) -> dict[int, Tensor]:
        every = self.wire.exchange(self.rank, (None if buf is None else buf.clone(), tuple(send_to)))
        got = {}
        for j in recv_from:
            sent, to = every[j]
            assert self.rank in to and sent is not None and sent.numel() == nbytes, (j, self.rank)
            got[j] = sent
        return got

    def charge(self, kind: str, t0: float, costs: Sequence[Any], sent: float) -> None:
        self.stats.count(kind, sent, None)
        self.charged.append((kind, sent, float(sum(c.bytes_sent for c in costs))))


def run_ranks(m: int, fn: Callable[[int, ThreadComm], Any]) -> list[Any]:
    wire = Wire(m)
    out: list[Any] = [None] * m
    errors: list[BaseException | None] = [None] * m

    def body(r: int) -> None:
        try:
            out[r] = fn(r, ThreadComm(wire, r))
        except BaseException as exc:  # noqa: BLE001 -- re-raised below
            errors[r] = exc
            wire.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(m)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    if first is None:
        first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(m: int, steps: int) -> list[list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(BATCH, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g))
             for _ in range(m)] for _ in range(steps)]


def _simulate(spec: AlgorithmSpec, batches: list) -> tuple[Tensor, float]:
    sim = Simulator(copy.deepcopy(spec), _mlp(), dtype=torch.float64, executor="loop")
    for k, step in enumerate(batches):
        active = spec.schedule.active(k)
        sim.step(step if active is None else [b if active[i] else None for i, b in enumerate(step)], LR)
    return sim.params.detach().clone(), float(sim.bytes_sent)


def _train(spec: AlgorithmSpec, batches: list) -> list[dict[str, Any]]:
    m = spec.workers
    models = [_mlp() for _ in range(m)]

    def rank_fn(r: int, comm: ThreadComm) -> dict[str, Any]:
        model = models[r]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with CooperativeSGD(model, opt, spec=copy.deepcopy(spec), communicator=comm) as coop:
            for step in batches:
                if coop.is_active():  # FedAvg: unsampled clients skip the local step
                    x, y = step[r]
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                coop.step()
            aux = coop.gather_aux()
            state = None if coop.compression is None else coop.compression.state_dict()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return {"params": flat, "aux": aux, "charged": comm.charged, "state": state}

    return run_ranks(m, rank_fn)


def _alternating_gossip(m: int) -> AlgorithmSpec:
    """CHOCO over a ring and a shifted pairing, alternating, from a user callable: graphs not known in
    advance, so every rank keeps every public copy and the payloads are all-gathered."""
    ring = presets.choco(m, topology="ring").schedule.matrices(8)[0]
    pairs = np.eye(m) * 0.5
    for i in range(m):
        pairs[i, i ^ 1] = 0.5

    def fn(step: int, ctx: MixContext) -> np.ndarray:
        return ring if step % 2 == 0 else pairs

    spec = presets.choco(m, compression="topk:0.25", gamma=0.5)
    return dataclasses.replace(spec, schedule=CallableSchedule(m, fn))


CASES = {
    "local_sgd topk": lambda: presets.local_sgd(4, 2, compression="topk:0.25"),
    "fedavg sampled int8": lambda: presets.fedavg(4, 2, fraction=0.5, seed=1, compression="int8"),
    "sync powersgd": lambda: presets.sync(4, compression="powersgd:1"),
    "choco ring randk": lambda: presets.choco(4, topology="ring", compression="randk:0.3:unbiased"),
    "choco callable schedule": lambda: _alternating_gossip(4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_wrapper_with_compression_equals_the_simulator(name: str) -> None:
    spec = CASES[name]()
    steps = 6
    batches = _batches(spec.workers, steps)
    results = _train(spec, batches)
    got = torch.cat([torch.stack([r["params"] for r in results]), results[0]["aux"]])
    expected, model_bytes = _simulate(spec, batches)
    diff = float((got - expected).abs().max())
    assert diff <= TOL, f"{name}: max |wrapper - simulator| = {diff:.3e}"
    kinds = {c[0] for r in results for c in r["charged"]}
    assert kinds == ({"compressed_all_gather"} if name.startswith(("local_sgd", "sync", "choco callable"))
                     else {"compressed_broadcast"} if name.startswith("fedavg") else {"compressed_neighbor"}), kinds
    for r in results:
        assert r["state"]["calls"] > 0
        # every round is charged the simulator's cost items: their bytes add up to the simulator's bytes_sent
        assert sum(c[2] for c in r["charged"]) == pytest.approx(model_bytes, rel=1e-12)


def _train_pre_mix(spec: AlgorithmSpec, batches: list) -> list[dict[str, Any]]:
    """The exact iterates of a pre-mix preset (EASGD, generalized elastic, hierarchical): ``coop.step`` between
    the backward pass and ``opt.step`` (the module docstring of coopsgd.wrapper)."""
    m = spec.workers
    models = [_mlp() for _ in range(m)]

    def rank_fn(r: int, comm: ThreadComm) -> dict[str, Any]:
        model = models[r]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with CooperativeSGD(model, opt, spec=copy.deepcopy(spec), communicator=comm) as coop:
            for step in batches:
                x, y = step[r]
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                coop.step(loss=loss.item())
                opt.step()
            aux = coop.gather_aux()
            state = None if coop.compression is None else coop.compression.state_dict()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return {"params": flat, "aux": aux, "charged": comm.charged, "state": state}

    return run_ranks(m, rank_fn)


ELASTIC = {
    "easgd topk": lambda: presets.easgd(4, 2, compression="topk:0.25"),
    "easgd powersgd": lambda: presets.easgd(4, 2, compression="powersgd:1"),
    "generalized_elastic int8": lambda: presets.generalized_elastic(4, 2, compression="int8"),
    "hierarchical topk": lambda: presets.hierarchical(4, 1, compression="topk:0.25"),  # (every rank holds all)
    "downpour qsgd": lambda: presets.downpour(4, 1, compression="qsgd:4"),
    "downpour randk": lambda: presets.downpour(3, 1, compression="randk:0.3"),
}


@pytest.mark.parametrize("name", list(ELASTIC))
def test_elastic_rounds_and_pushes_equal_the_simulator(name: str) -> None:
    """Compressed elastic rounds (replies computed by every rank, the uploads all-gathered) and DOWNPOUR's
    pushes (the schedule's order: the pushes all-gathered, replayed in order on every rank)."""
    spec = ELASTIC[name]()
    batches = _batches(spec.workers, 6)
    results = (_train if spec.schedule.sequential else _train_pre_mix)(spec, batches)
    got = torch.cat([torch.stack([r["params"] for r in results]), results[0]["aux"]])
    expected, model_bytes = _simulate(spec, batches)
    diff = float((got - expected).abs().max())
    assert diff <= TOL, f"{name}: max |wrapper - simulator| = {diff:.3e}"
    kinds = {c[0] for r in results for c in r["charged"]}
    assert kinds == ({"compressed_pushes"} if spec.schedule.sequential else {"compressed_all_gather"}), kinds
    q = parse_compressor(spec.compressed.compress)
    for r in results:
        assert sum(c[2] for c in r["charged"]) == pytest.approx(model_bytes, rel=1e-12)  # the simulator's cost items
        if q.name != "powersgd":  # (its payload depends on the layout) on the wire: one all-gather a round
            assert all(c[1] == (spec.workers - 1) * q.payload_bytes(75, torch.float64) for c in r["charged"])
        if spec.schedule.sequential:
            assert r["state"]["centres"] is None  # the copies b_i are rows of the state
        else:
            assert r["state"]["centres"].abs().max() > 0


@pytest.mark.parametrize("compressor", ["topk:0.25", "qsgd:4"])
def test_lsgd_leader_refresh_equals_the_simulator(compressor: str) -> None:
    """The leader broadcasts Q(x_L − s); every rank adds it to its slot s and pulls toward it."""
    spec = presets.lsgd(4, 2, compression=compressor)
    batches = _batches(4, 6)
    results = _train_pre_mix(spec, batches)
    got = torch.cat([torch.stack([r["params"] for r in results]), results[0]["aux"]])
    expected, model_bytes = _simulate(spec, batches)
    assert float((got - expected).abs().max()) <= TOL
    p = parse_compressor(compressor).payload_bytes(75, torch.float64)
    for r in results:  # one broadcast per refresh; the clock's cost items but the losses' all-gather (4 floats)
        assert [c[0] for c in r["charged"]] == ["compressed_broadcast"] * 3
        assert all(c[1] == p * 3 / 4 for c in r["charged"])
        assert sum(c[2] for c in r["charged"]) + 3 * 4 * 8 == pytest.approx(model_bytes, rel=1e-12)


class Bare(ThreadComm):
    """A communicator without the byte transport (the wrapper's uncompressed collectives only)."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("gather_bytes", "broadcast_bytes", "exchange_bytes", "charge"):
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_what_the_wrapper_cannot_compress_is_refused_with_one_line() -> None:
    wire = Wire(1)
    with pytest.raises(ConfigError) as err:  # an injected communicator that cannot move packed payloads
        CooperativeSGD(_mlp(), None, spec=presets.local_sgd(1, 2, compression="int8"), communicator=Bare(wire, 0))
    text = str(err.value)
    assert "communicator" in text and "gather_bytes" in text and "\n" not in text
    CooperativeSGD(_mlp(), None, spec=presets.local_sgd(1, 2), communicator=Bare(wire, 0))  # uncompressed: fine


def test_the_wrapper_refuses_fedprox_and_scaffold_instead_of_running_fedavg() -> None:
    """Its optimizer steps on the plain gradients: FedProx's term or SCAFFOLD's control variates would be left
    out silently, so such a spec is refused with one line (plain FedAvg, mu = 0, is accepted)."""
    wire = Wire(1)
    for spec, field in ((presets.fedprox(2, 2, mu=0.1), "spec.prox"), (presets.scaffold(2, 2), "spec.control")):
        with pytest.raises(ConfigError) as err:
            CooperativeSGD(_mlp(), None, spec=spec, communicator=ThreadComm(wire, 0))
        assert field in str(err.value) and "\n" not in str(err.value)


def test_theory_charges_scaffold_twice_fedavg_per_round() -> None:
    from coopsgd.analysis import spec_round_cost

    fedavg = spec_round_cost(presets.fedavg(8, 4), 1000)
    scaffold = spec_round_cost(presets.scaffold(8, 4), 1000)
    assert scaffold.bytes_sent == 2 * fedavg.bytes_sent > 0 and scaffold.handshakes == fedavg.handshakes
