"""CooperativeSGD with an injected in-process communicator: no process group, no processes.

m simulated ranks run as m threads; :class:`FakeNetwork` makes every collective a rendezvous
(``threading.Barrier``): each rank deposits its contribution, every rank reads all of them, and a second
barrier keeps a fast rank from overwriting a slot before the others have read it. A round therefore
computes exactly ``X S`` (each rank writes its own worker column and the replicated auxiliary columns),
so the wrappers' models can be compared with the one-process simulator (float64, "loop" executor).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.engines.distributed.communicator import CommStats, Mixer
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError
from coopsgd.wrapper import CooperativeSGD, WrapperCommunicator

TOL = 1e-10
LR = 0.1
BATCH = 4


# -- the fake network ----------------------------------------------------------------------------------


class FakeNetwork:
    """The wire between ``m`` ranks living in threads of this process."""

    def __init__(self, m: int, timeout_s: float = 20.0) -> None:
        self.m = m
        self.barrier = threading.Barrier(m, timeout=timeout_s)
        self.slots: list[Any] = [None] * m

    def exchange(self, rank: int, value: Any) -> list[Any]:
        """Every rank's ``value`` (a collective: every rank calls it)."""
        self.slots[rank] = value
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got


class FakeComm:
    """One rank's :class:`~coopsgd.wrapper.WrapperCommunicator` over a :class:`FakeNetwork`.

    ``calls`` records what the wrapper asked for, in order. With ``overlap=True`` and auxiliaries, the
    auxiliaries' new values are written only by :meth:`finalize` (as the Mixer's non-blocking rounds).
    """

    def __init__(self, net: FakeNetwork, rank: int) -> None:
        self.net = net
        self.rank = rank
        self.m = net.m
        self.stats = CommStats()
        self.calls: list[tuple[str, Any]] = []
        self.rows: Tensor | None = None  # the rows of the last mix (the wrapper's flat buffer)
        self.fail_finalize = False
        self._pending: Callable[[], None] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def finalize(self) -> None:
        if self._pending is None:
            return
        self.calls.append(("finalize", None))
        if self.fail_finalize:
            raise RuntimeError("finalize failed")
        complete, self._pending = self._pending, None
        complete()

    def mix(self, rows: Tensor, S: np.ndarray, *, overlap: bool = False) -> None:
        self.finalize()
        self._record("mix", np.array(S, copy=True), rows[0])
        self.rows = rows
        m, r = self.m, self.rank
        X = torch.cat([torch.stack(self.net.exchange(r, rows[0].clone())), rows[1:]])  # (m + v, W)
        St = torch.as_tensor(np.array(np.asarray(S).T, order="C"), dtype=rows.dtype)  # a writable copy
        new_x = St[r] @ X
        new_Z = St[m:] @ X
        Z = rows[1:]
        rows[0].copy_(new_x)
        if overlap and Z.shape[0]:
            self._pending = lambda: Z.copy_(new_Z)
        else:
            Z.copy_(new_Z)

    def communicate(self, rows: Tensor, rnd: Any, *, overlap: bool = False) -> None:
        self.mix(rows, rnd.matrix, overlap=overlap)

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        mine = np.atleast_1d(np.asarray(values, dtype=np.float64))
        self._record("gather_floats", values, mine)
        return np.stack(self.net.exchange(self.rank, mine))

    def broadcast(self, t: Tensor, src: int) -> None:
        self._record("broadcast", src, t)
        t.copy_(self.net.exchange(self.rank, t.clone())[src])

    def all_reduce(self, t: Tensor) -> None:
        self._record("all_reduce", None, t)
        t.copy_(torch.stack(self.net.exchange(self.rank, t.clone())).sum(dim=0))

    def holds(self, aux: int) -> bool:
        return True

    def host(self, aux: int) -> int:
        return aux % self.m

    def collect_aux(self, Z: Tensor) -> Tensor:
        self.finalize()
        return Z.clone()

    def _record(self, kind: str, info: Any, t: Tensor | np.ndarray) -> None:
        self.calls.append((kind, info))
        self.stats.count(kind, float(t.nbytes), None)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def run_ranks(m: int, fn: Callable[[int, FakeComm], Any]) -> tuple[list[Any], list[FakeComm]]:
    """Run ``fn(rank, comm)`` on m threads sharing one fake network; re-raise the first failure."""
    net = FakeNetwork(m)
    comms = [FakeComm(net, r) for r in range(m)]
    out: list[Any] = [None] * m
    errors: list[BaseException | None] = [None] * m

    def body(r: int) -> None:
        try:
            out[r] = fn(r, comms[r])
        except BaseException as exc:  # noqa: BLE001 -- reported below; release the others' barriers
            errors[r] = exc
            net.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(m)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    # the rank that failed first, not the ranks whose barrier it broke
    failed = [e for e in errors if e is not None]
    first = next((e for e in failed if not isinstance(e, threading.BrokenBarrierError)), None)
    if first is None and failed:
        first = failed[0]
    if first is not None:
        raise first
    return out, comms


# -- models, data, the simulator -----------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(m: int, steps: int) -> list[list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[Tensor, Tensor]:
        x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
        return x, torch.randint(0, 3, (BATCH,), generator=g)

    return [[batch() for _ in range(m)] for _ in range(steps)]


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


Batches = list[list[tuple[Tensor, Tensor]]]


def _simulate(spec: AlgorithmSpec, batches: Batches, momentum: float = 0.0) -> Tensor:
    """The same run on the one-process simulator: (m + v, d) rows of every node."""
    sim = Simulator(copy.deepcopy(spec), _mlp(), dtype=torch.float64, executor="loop", momentum=momentum)
    for step in batches:
        sim.step(step, LR)
    return sim.params.detach().clone()


def _train(spec: AlgorithmSpec, batches: list, *, before_step: bool, momentum: float = 0.0,
           use_with: bool = True) -> tuple[list[dict[str, Any]], list[FakeComm]]:
    """Every rank's wrapper on the same batches as the simulator; returns per-rank results."""
    m = spec.workers
    models = [_mlp() for _ in range(m)]  # built here: torch.manual_seed is process-global

    def rank_fn(r: int, comm: FakeComm) -> dict[str, Any]:
        model = models[r]
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
        coop = CooperativeSGD(model, opt, spec=copy.deepcopy(spec), communicator=comm)
        mixed_at = []

        def loop() -> None:
            for k, step in enumerate(batches):
                x, y = step[r]
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                n = comm.names().count("mix")
                if before_step:  # exact pre-mix rule: X S - lr G
                    coop.step(loss=loss.item())
                    opt.step()
                else:  # post-mix rule: (X - lr G) S
                    opt.step()
                    coop.step(loss=loss.item())
                if comm.names().count("mix") > n:
                    mixed_at.append(k)

        if use_with:
            with coop:
                loop()
                aux = coop.gather_aux()
                center = coop.center_vector()
        else:
            loop()
            coop.finalize()
            aux = coop.gather_aux()
            center = coop.center_vector()
        return {"params": _flat(model), "aux": aux, "mixed_at": mixed_at, "coop": coop, "center": center}

    return run_ranks(m, rank_fn)


def _stack(results: list[dict[str, Any]]) -> Tensor:
    return torch.cat([torch.stack([res["params"] for res in results]), results[0]["aux"]])


# -- (a) local SGD: when it mixes, and what ----------------------------------------------------------


def test_local_sgd_mixes_every_tau_steps_to_the_hand_computed_average() -> None:
    m, tau, steps = 2, 2, 6
    batches = _batches(m, steps)
    results, comms = _train(presets.local_sgd(m, tau), batches, before_step=False)
    J = np.full((m, m), 1.0 / m)
    for res, comm in zip(results, comms, strict=True):
        assert res["mixed_at"] == [1, 3, 5]  # after steps 2, 4, 6 (1-based), and only then
        mixes = [S for name, S in comm.calls if name == "mix"]
        assert len(mixes) == steps // tau and all(np.array_equal(S, J) for S in mixes)
        assert "gather_floats" not in comm.names()  # local SGD never asks for losses
        coop = res["coop"]
        assert coop.rounds == steps // tau and coop.stats["rounds"] == steps // tau
        # the wrapper's stats count the rounds, not the initial broadcast nor the centre read
        assert comm.stats.ops == {"broadcast": 1, "mix": 3, "all_reduce": 1}
        assert coop.stats["ops"] == {"mix": 3} and coop.stats["bytes_sent"] == 3 * res["params"].nbytes
    # by hand: plain SGD on m independent copies, parameters averaged after every tau-th step
    hand = [_mlp() for _ in range(m)]
    for k, step in enumerate(batches):
        for r, model in enumerate(hand):
            model.zero_grad()
            F.cross_entropy(model(step[r][0]), step[r][1]).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
        if (k + 1) % tau == 0:
            with torch.no_grad():
                for ps in zip(*(model.parameters() for model in hand), strict=True):
                    mean = torch.stack(ps).mean(dim=0)
                    for p in ps:
                        p.copy_(mean)
    for r in range(m):
        assert float((results[r]["params"] - _flat(hand[r])).abs().max()) <= 1e-12
    assert torch.equal(results[0]["params"], results[1]["params"])  # the last step was a round
    assert float((results[0]["center"] - results[0]["params"]).abs().max()) <= 1e-15


# -- equivalence with the simulator (m = 2..4 ranks) ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec", "before_step", "momentum", "use_with"),
    [
        ("local_sgd", presets.local_sgd(3, 3), False, 0.9, True),
        ("dpsgd_ring", presets.dpsgd(4, topology="ring"), False, 0.0, False),
        ("easgd_nonblocking", presets.easgd(2, 2, nonblocking=True), True, 0.0, True),
        ("lsgd", presets.lsgd(3, 2, lam=0.5), True, 0.0, True),
    ],
)
def test_matches_simulator(name: str, spec: AlgorithmSpec, before_step: bool, momentum: float,
                           use_with: bool) -> None:
    batches = _batches(spec.workers, 8)
    results, _ = _train(spec, batches, before_step=before_step, momentum=momentum, use_with=use_with)
    expected = _simulate(spec, batches, momentum=momentum)
    got = _stack(results)
    assert got.shape == expected.shape
    diff = float((got - expected).abs().max())
    assert diff <= TOL, f"{name}: max |wrapper - simulator| = {diff:.3e}"
    assert not any(res["coop"].mixer.pending for res in results)


# -- (b) the context manager --------------------------------------------------------------------------


def test_exit_finalizes_the_pending_round_and_leaves_a_usable_model() -> None:
    spec = presets.easgd(2, 2, nonblocking=True)
    batches = _batches(2, 2)
    models = [_mlp() for _ in range(2)]

    def rank_fn(r: int, comm: FakeComm) -> dict[str, Any]:
        model = models[r]
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with CooperativeSGD(model, opt, spec=copy.deepcopy(spec), communicator=comm) as coop:
            for step in batches:
                x, y = step[r]
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                coop.step()
                opt.step()
            pending = comm.pending  # the round of step 2 left z's update in flight
            rows = comm.rows
            assert rows is not None
            z_before = rows[1].clone()
            ptrs = [p.data_ptr() for p in model.parameters()]
            inside = _flat(model)
        return {"coop": coop, "pending": pending, "z_before": z_before, "z": rows[1].clone(), "rows": rows,
                "ptrs": ptrs, "inside": inside}

    results, comms = run_ranks(2, rank_fn)
    expected = _simulate(spec, batches)
    for r, (res, comm) in enumerate(zip(results, comms, strict=True)):
        coop = res["coop"]
        assert res["pending"] and not comm.pending and comm.names()[-1] == "finalize"
        assert float((res["z"] - expected[2]).abs().max()) <= TOL  # z got its new value on exit
        assert not torch.equal(res["z"], res["z_before"])
        assert coop.closed
        model = models[r]
        # the model owns its storage again, with the values it had inside the block
        assert torch.equal(_flat(model), res["inside"])
        assert float((_flat(model) - expected[r]).abs().max()) <= TOL
        lo = res["rows"].data_ptr()
        hi = lo + res["rows"].numel() * res["rows"].element_size()
        assert all(not lo <= p.data_ptr() < hi for p in model.parameters())
        assert all(p.data_ptr() != q for p, q in zip(model.parameters(), res["ptrs"], strict=True))
        # ... and trains as an ordinary module
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        before = _flat(model)
        x, y = batches[0][r]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert not torch.equal(_flat(model), before)
        # the wrapper is closed: stepping or reading rows is an error naming it; closing again is a no-op
        with pytest.raises(ConfigError) as info:
            coop.step()
        assert info.value.field == "CooperativeSGD"
        for fn in (coop.center_vector, coop.gather_aux, coop.aux_vector, coop.__enter__):
            with pytest.raises(ConfigError):
                fn()
        coop.close()
        assert coop.stats["rounds"] == 1 and coop.step_count == 2


def test_exit_on_error_releases_the_model_and_keeps_the_error() -> None:
    spec = presets.easgd(1, 1, nonblocking=True)
    model = _mlp()
    comm = FakeComm(FakeNetwork(1), 0)
    with pytest.raises(KeyError, match="user error"):
        with CooperativeSGD(model, spec=spec, communicator=comm) as coop:
            coop.step()
            assert comm.pending
            comm.fail_finalize = True  # the pending round's error must not hide the user's
            raise KeyError("user error")
    assert coop.closed and comm.names()[-1] == "finalize"
    assert comm.rows is not None
    lo = comm.rows.data_ptr()
    hi = lo + comm.rows.numel() * comm.rows.element_size()
    assert all(not lo <= p.data_ptr() < hi for p in model.parameters())


def test_without_with_the_model_stays_bound() -> None:
    model = _mlp()
    comm = FakeComm(FakeNetwork(1), 0)
    coop = CooperativeSGD(model, spec=presets.local_sgd(1, 1), communicator=comm)
    assert coop.step() is True and comm.rows is not None and not coop.closed
    assert model[0].weight.data_ptr() == comm.rows.data_ptr()  # the first parameter starts the flat row
    assert torch.equal(coop.center_vector(), _flat(model))


# -- (c) LSGD's losses ------------------------------------------------------------------------------


def test_lsgd_gathers_losses_only_when_the_schedule_wants_them() -> None:
    m, tau, steps = 2, 3, 7
    spec = presets.lsgd(m, tau, lam=0.5)
    models = [_mlp() for _ in range(m)]
    losses = {0: [3.0, 1.0, 1.0, 9.0, 9.0, 9.0, 9.0], 1: [2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0]}

    def rank_fn(r: int, comm: FakeComm) -> dict[str, Any]:
        coop = CooperativeSGD(models[r], spec=copy.deepcopy(spec), communicator=comm, window=2)
        asked, leaders = [], []
        for k in range(steps):
            n = comm.names().count("gather_floats")
            coop.step(loss=torch.tensor(losses[r][k]), lr=LR)
            if comm.names().count("gather_floats") > n:
                asked.append(k)
            leaders.append(coop.leader)
        gathered = [v for name, v in comm.calls if name == "gather_floats"]
        center = coop.center_vector()  # the leader's model, broadcast from its rank
        return {"asked": asked, "leaders": leaders, "gathered": gathered, "mixes": comm.names().count("mix"),
                "center": center, "params": _flat(models[r]), "last": comm.calls[-1],
                "ops": coop.stats["ops"]}

    results, _ = run_ranks(m, rank_fn)
    for res in results:
        assert res["asked"] == [k for k in range(steps) if k % tau == 0] == [0, 3, 6]
        assert res["mixes"] == steps  # the pull is applied at every step
        # running means over window=2: step 0 -> (3, 2): leader 1; step 3 -> (5, 1.5): leader 1;
        # step 6 -> (9, 1): leader 1
        assert res["leaders"] == [1] * steps
    assert results[0]["gathered"] == [3.0, 5.0, 9.0] and results[1]["gathered"] == [2.0, 1.5, 1.0]
    for res in results:
        assert torch.equal(res["center"], results[1]["params"]) and res["last"] == ("broadcast", 1)
        assert res["ops"] == {"gather_floats": 3, "mix": steps}

    # a rank without any loss at an election: every rank gets an error naming the loss
    def no_loss(r: int, comm: FakeComm) -> None:
        coop = CooperativeSGD(copy.deepcopy(models[r]), spec=copy.deepcopy(spec), communicator=comm)
        coop.step(loss=None if r == 1 else 1.0, lr=LR)

    with pytest.raises(ConfigError) as info:
        run_ranks(m, no_loss)
    assert info.value.field == "loss" and "rank 1" in str(info.value)


# -- (d) bad arguments ----------------------------------------------------------------------------------


def _comm(m: int = 1, rank: int = 0) -> FakeComm:
    comm = FakeComm(FakeNetwork(m), 0)
    comm.rank = rank
    return comm


class _Incomplete:
    rank, m = 0, 1

    def communicate(self, rows: Tensor, rnd: Any, *, overlap: bool = False) -> None: ...


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("spec", {"spec": "local_sgd"}),
        ("model", {"model": object()}),
        ("model", {"model": nn.ReLU()}),
        ("optimizer", {"optimizer": 0.1}),
        ("window", {"window": 0}),
        ("optimizer_state", {"spec": presets.local_sgd(1, 2, policies=Policies(optimizer_state="mix"))}),
        ("spec.workers", {"spec": presets.local_sgd(2, 2)}),
        ("communicator", {"communicator": _Incomplete()}),
        ("communicator", {"communicator": "gloo"}),
        ("communicator.rank", {"communicator": _comm(2, rank=2), "spec": presets.local_sgd(2, 2)}),
        ("group", {"group": "world"}),
        ("net_latency_ms", {"net_latency_ms": 5.0}),
        ("net_bandwidth_mbps", {"net_bandwidth_mbps": 100.0}),
        ("process group", {"communicator": None}),
    ],
)
def test_bad_arguments_name_the_field(field: str, kwargs: dict[str, Any]) -> None:
    if field == "process group" and dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    args: dict[str, Any] = {"model": _mlp(), "spec": presets.local_sgd(1, 2), "communicator": _comm()}
    args.update(kwargs)
    model = args.pop("model")
    with pytest.raises(ConfigError) as info:
        CooperativeSGD(model, **args)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(field)
    if isinstance(kwargs.get("communicator"), _Incomplete):
        assert "missing: stats, pending, finalize, gather_floats, broadcast" in str(info.value)


def test_bad_auxiliary_index() -> None:
    coop = CooperativeSGD(_mlp(), spec=presets.easgd(1, 1), communicator=_comm())
    with pytest.raises(ConfigError) as info:
        coop.aux_vector(1)
    assert info.value.field == "j"
    assert torch.equal(coop.aux_vector(0), _flat(coop.model))


# -- the protocol ---------------------------------------------------------------------------------------


def test_mixer_and_fake_satisfy_the_protocol() -> None:
    assert isinstance(Mixer(0, 1, 0), WrapperCommunicator)
    assert isinstance(_comm(), WrapperCommunicator)
    assert not isinstance(_Incomplete(), WrapperCommunicator)
