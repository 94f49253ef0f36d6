"""Compressed rounds (SPEC §11, issue 23 phase 1) on the reference engine and the simulator.

* CHOCO with ``none`` and γ = 1 is D-PSGD bit for bit; the CHOCO path itself with an exact compressor
  (``topk:1``: every coordinate) equals D-PSGD to rounding;
* the simulator equals the reference engine (float64, 1e-10) on least squares for every compressor on
  averaging rounds (sync, local SGD, FedAvg with sampling, DiLoCo's and SlowMo's outer round) and gossip rounds
  (D-PSGD, decentralized periodic, MATCHA, CHOCO, SlowMo's gossip base); PowerSGD on a matrix-shaped model;
* error feedback's invariant over rounds; the averaging round conserves the "virtual" average;
* a checkpoint taken mid-run (non-zero e, x̂, PowerSGD factors) resumes bit-exactly; the NaN-skip rollback
  restores the compressed state;
* bytes: a compressed round is charged its payloads; with ``none`` nothing changes;
* bad specs and unsupported combinations are refused naming ``compress``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.communication import Compression, compressed_round_cost
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.analysis import spec_round_cost
from coopsgd.compression import parse_compressor
from coopsgd.engines.compressed import CompressedRounds
from coopsgd.engines.kernel import InProcess
from coopsgd.engines.mixing import plan_round
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError
from coopsgd.theory.cost import round_cost
from coopsgd.train import RunConfig

D, N, B, LR, TOL = 5, 40, 6, 0.05, 1e-10


class LeastSquares:
    """``F(W) = mean over samples and outputs of (W a_n - y_n)^2`` with W of shape (out, D) (nn.Linear's weight,
    row-major: the simulator's flat row); worker i's k-th gradient uses its k-th deterministic batch, the
    batch the simulator is fed in the step where worker i computes its k-th gradient."""

    def __init__(self, workers: int, out: int = 1, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.out, self.dim = out, out * D
        self.A = rng.standard_normal((N, D))
        self.Y = self.A @ rng.standard_normal((D, out)) + 0.3 * rng.standard_normal((N, out))
        self.calls = [0] * workers
        self.seed = seed

    def _idx(self, worker: int, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, worker, k]).choice(N, size=B, replace=False)

    def torch_batch(self, worker: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._idx(worker, k)
        return torch.from_numpy(self.A[idx]), torch.from_numpy(self.Y[idx])

    def value(self, x: np.ndarray) -> np.ndarray | float:
        X = np.atleast_2d(x).reshape(-1, self.out, D)
        r = np.einsum("wod,nd->wno", X, self.A) - self.Y
        v = np.mean(r * r, axis=(1, 2))
        return float(v[0]) if np.ndim(x) == 1 else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        idx = self._idx(worker, self.calls[worker])
        self.calls[worker] += 1
        A, W = self.A[idx], x.reshape(self.out, D)
        return (2.0 / (B * self.out) * (A @ W.T - self.Y[idx]).T @ A).reshape(-1)

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(self.dim)


def _simulator(spec: AlgorithmSpec, out: int = 1, dtype: torch.dtype = torch.float64, **kw) -> Simulator:
    return Simulator(spec, lambda: nn.Linear(D, out, bias=False), loss_fn=F.mse_loss, dtype=dtype,
                     executor="loop", seed=4, optimizer="sgd", **kw)


def _feed(sim: Simulator, obj: LeastSquares, counters: list[int], lr: float = LR, nan_worker: int | None = None):
    mask = sim.spec.schedule.active(sim.step_count)
    batches = []
    for i in range(sim.m):
        if mask is None or mask[i]:
            x, y = obj.torch_batch(i, counters[i])
            counters[i] += 1
            batches.append((torch.full_like(x, float("nan")) if i == nan_worker else x, y))
        else:
            batches.append(None)
    return sim.step(batches, lr)


def _pair(make: Callable[[], AlgorithmSpec], steps: int, out: int = 1) -> tuple[Simulator, ReferenceEngine]:
    spec_ref, spec_sim = make(), make()
    m = spec_ref.workers
    obj_ref, obj_sim = LeastSquares(m, out), LeastSquares(m, out)
    sim = _simulator(spec_sim, out)
    eng = ReferenceEngine(spec_ref, obj_ref, sim.params[0].numpy().copy(), seed=4,
                          layout=[(out, D)] if out > 1 else None)
    counters = [0] * m
    for _ in range(steps):
        ref_stats, stats = eng.step(None, LR), _feed(sim, obj_sim, counters)
        assert stats.communicated == ref_stats.communicated
    return sim, eng


def _run(spec: AlgorithmSpec, steps: int, dtype: torch.dtype = torch.float64) -> Simulator:
    sim = _simulator(spec, dtype=dtype)
    obj, counters = LeastSquares(spec.workers), [0] * spec.workers
    for _ in range(steps):
        _feed(sim, obj, counters)
    return sim


# -- CHOCO with none and gamma = 1 is D-PSGD --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_choco_with_none_and_gamma_one_is_dpsgd_bit_for_bit(dtype: torch.dtype) -> None:
    want = _run(presets.dpsgd(6), 15, dtype).params
    for spec in (presets.choco(6), presets.choco(6, gamma=1.0), presets.choco(6, compression="none"),
                 presets.dpsgd(6, compression=Compression("none", consensus_step=1.0))):
        assert spec.compressed is None  # the engines take D-PSGD's own round
        assert torch.equal(_run(spec, 15, dtype).params, want)
    ref = [ReferenceEngine(s, LeastSquares(6), seed=4) for s in (presets.dpsgd(6), presets.choco(6, gamma=1.0))]
    for _ in range(15):
        for e in ref:
            e.step(None, LR)
    assert np.array_equal(ref[0].state, ref[1].state)


def test_the_choco_path_with_an_exact_compressor_is_dpsgd_to_rounding() -> None:
    """topk:1 keeps every coordinate (Q = identity) but runs CHOCO's public copies: x̂ + (x − x̂) rounds, so the
    iterates agree with D-PSGD to rounding (1e-13 after 20 rounds in float64), not bit for bit."""
    want = _run(presets.dpsgd(6), 20).params
    spec = presets.choco(6, compression="topk:1")
    assert spec.compressed is not None
    sim = _run(spec, 20)
    assert sim._compressed is not None and sim._compressed.gamma == 1.0 and sim._compressed.public is not None
    torch.testing.assert_close(sim.params, want, rtol=0, atol=1e-13)


def test_choco_with_none_and_a_smaller_step_damps_the_gossip() -> None:
    """none with γ < 1: x ← x + γ (X W − x) on both engines (no public copies are kept)."""
    sim, eng = _pair(lambda: presets.choco(6, gamma=0.5), 10)
    assert sim._compressed is not None and sim._compressed.public is None
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    assert not np.allclose(eng.state, _pair(lambda: presets.dpsgd(6), 10)[1].state)


# -- simulator == reference engine --------------------------------------------------------------------------------

COMPRESSORS = ["fp16", "bf16", "int8:3", "qsgd:4", "sign", "topk:0.4", "randk:0.4", "randk:0.6:unbiased"]
AVERAGING = {
    "sync": lambda c: presets.sync(4, compression=c),
    "local_sgd": lambda c: presets.local_sgd(4, 3, compression=c),
    "fedavg_sampled": lambda c: presets.fedavg(6, 3, fraction=0.5, sample_counts=[10, 20, 30, 40, 50, 60], seed=5,
                                               compression=c),
    "fedavg_one_client": lambda c: presets.fedavg(6, 2, fraction=1 / 6, seed=2, compression=c),  # S = e_j 1^T
    "diloco": lambda c: presets.diloco(4, 3, compression=c),
    "slowmo_sync": lambda c: presets.slowmo(4, 3, base_algorithm="sync", compression=c),
}
GOSSIP = {
    "dpsgd": lambda c: presets.dpsgd(6, compression=c),
    "decentralized_periodic": lambda c: presets.decentralized_periodic(6, 2, topology="torus", compression=c),
    "matcha": lambda c: presets.matcha(6, compression=c),
    "choco": lambda c: presets.choco(6, compression=c, gamma=0.7),
    "slowmo_dpsgd": lambda c: presets.slowmo(4, 3, base_algorithm="dpsgd", compression=c),
}


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("name", [*AVERAGING, *GOSSIP])
def test_simulator_equals_reference_with_compression(name: str, compressor: str) -> None:
    make = {**AVERAGING, **GOSSIP}[name]
    sim, eng = _pair(lambda: make(compressor), 12)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    # the compressed path ran: it is not the uncompressed run
    plain = _pair(lambda: make(None), 12)[1].state
    assert not np.allclose(eng.state, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["local_sgd", "fedavg_sampled", "diloco", "slowmo_sync"])
def test_powersgd_on_a_matrix_model_simulator_equals_reference(name: str) -> None:
    sim, eng = _pair(lambda: AVERAGING[name]("powersgd:1"), 12, out=4)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    assert sim._compressed is not None and sim._compressed.factors is not None
    q = parse_compressor("powersgd:1", layout=[(4, D)])
    assert q.payload_bytes(4 * D, torch.float64) == (4 + D) * 8 < 4 * D * 8  # the weight is compressed


# -- error feedback -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compressor", ["topk:0.3", "randk:0.3", "int8:4", "fp16"])
def test_error_feedback_invariant_over_rounds(compressor: str) -> None:
    """Each round: decoded + e' = (x_i − x_ref) + e exactly (these compressors decode to 0 or within a factor 2
    of each coordinate), and x_ref' + Σ w_i e'_i = x_ref + Σ w_i (x_i − x_ref + e_i): nothing is lost, only
    delayed."""
    n, w = 4, 10
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(w, dtype=torch.float64, generator=gen)
    stage = CompressedRounds(Compression(compressor), nodes=n, workers=n, width=w, dtype=torch.float64,
                             device=torch.device("cpu"), seed=3, layout=None, start=start)
    assert stage.feedback
    rnd = plan_round(np.full((n, n), 1.0 / n))
    ref, e = start.clone(), torch.zeros(n, w, dtype=torch.float64)
    for _ in range(6):
        X = ref + 0.1 * torch.randn(n, w, dtype=torch.float64, generator=gen)
        sent = (X - ref) + e  # what each node compresses
        rows = X.clone()
        stage.communicate(rows, rnd, InProcess())
        assert stage.residual is not None
        e_new = stage.residual
        decoded = stage.compressor.roundtrip(sent, round=stage.calls - 1, nodes=range(n), seed=3).decoded
        assert torch.equal(decoded + e_new, sent)  # sent + residual = input + previous residual, exactly
        torch.testing.assert_close(rows[0], ref + decoded.mean(0), rtol=0, atol=1e-15)
        torch.testing.assert_close(rows[0] + e_new.mean(0), ref + sent.mean(0), rtol=0, atol=1e-14)
        assert torch.equal(rows, rows[:1].expand_as(rows))  # every participant holds the new x_ref
        ref, e = rows[0].clone(), e_new.clone()


def test_error_feedback_auto_is_on_for_biased_and_off_for_unbiased() -> None:
    def stage(spec: str, ef: str = "auto") -> CompressedRounds:
        return CompressedRounds(Compression(spec, ef), nodes=2, workers=2, width=8, dtype=torch.float64,
                                device=torch.device("cpu"), seed=0, layout=None, start=torch.zeros(8))

    assert stage("topk:0.5").feedback and stage("sign").feedback and stage("int8").feedback
    assert not stage("qsgd:4").feedback and not stage("randk:0.5:unbiased").feedback
    assert not stage("topk:0.5", "off").feedback and stage("qsgd:4", "on").feedback


# -- checkpoints and rollbacks ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "what"), [
    (lambda: presets.local_sgd(4, 2, compression="topk:0.4"), "residual"),
    (lambda: presets.choco(6, compression="sign", gamma=0.5), "public"),
    (lambda: presets.fedavg(6, 2, fraction=0.5, compression="int8:2"), "residual"),
])
def test_resume_mid_run_is_bit_exact(make: Callable[[], AlgorithmSpec], what: str) -> None:
    spec = make()
    m = spec.workers
    full = _simulator(make())
    obj, counters = LeastSquares(m), [0] * m
    for _ in range(7):
        _feed(full, obj, counters)
    saved, at = full.state_dict(), list(counters)
    comp = saved["payload"]["compression"]
    assert comp[what] is not None and bool(comp[what].abs().max() > 0)  # non-zero e / x_hat in the checkpoint
    for _ in range(8):
        _feed(full, obj, counters)
    resumed = _simulator(make())
    resumed.load_state_dict(saved)
    obj2, counters2 = LeastSquares(m), at  # the batches after the checkpoint
    for _ in range(8):
        _feed(resumed, obj2, counters2)
    assert torch.equal(resumed.params, full.params)
    assert resumed.bytes_sent == full.bytes_sent


def test_reference_engine_resumes_bit_exactly() -> None:
    def eng() -> ReferenceEngine:
        return ReferenceEngine(presets.choco(6, compression="topk:0.4", gamma=0.5), LeastSquares(6), seed=1)

    a = eng()
    for _ in range(5):
        a.step(None, LR)
    saved = a.state_dict()
    b = eng()
    b.load_state_dict(saved)
    b.objective.calls = list(a.objective.calls)
    for _ in range(5):
        a.step(None, LR)
        b.step(None, LR)
    assert np.array_equal(a.state, b.state)


def test_checkpoints_name_a_compression_mismatch() -> None:
    plain, comp = _simulator(presets.local_sgd(4, 2)), _simulator(presets.local_sgd(4, 2, compression="int8"))
    assert "compression" not in plain.state_dict()["payload"]  # an uncompressed run keeps nothing extra
    with pytest.raises(ConfigError, match="compression"):
        comp.load_state_dict(plain.state_dict())
    with pytest.raises(ConfigError, match="compression"):
        plain.load_state_dict(comp.state_dict())
    other = _simulator(presets.local_sgd(4, 2, compression="topk:0.5"))
    with pytest.raises(ConfigError, match="compress"):
        other.load_state_dict(comp.state_dict())


def test_nan_skip_rollback_restores_the_compressed_state() -> None:
    spec = presets.local_sgd(4, 1, compression="topk:0.4")
    sim = _simulator(spec, nan_policy="skip")
    obj, counters = LeastSquares(4), [0] * 4
    for _ in range(3):
        _feed(sim, obj, counters)
        assert sim.check_health() is None
    assert sim._compressed is not None
    good, params = sim._compressed.snapshot(), sim.params.clone()
    stats = _feed(sim, obj, counters, nan_worker=2)  # worker 2 goes non-finite: the step is skipped
    assert stats.skipped
    dropped = sim.check_health()
    assert dropped is not None and dropped.workers == [2]
    after = sim._compressed.snapshot()
    assert after["calls"] == good["calls"] and torch.equal(after["residual"], good["residual"])
    assert all(torch.equal(after["refs"][k], good["refs"][k]) for k in good["refs"])
    assert torch.equal(sim.params, params)


# -- accounting ---------------------------------------------------------------------------------------------------

def test_bytes_of_compressed_rounds_are_the_payloads() -> None:
    d = D  # nn.Linear(D, 1): d = 5 parameters, float64
    sim = _run(presets.local_sgd(4, 1, compression="topk:0.4"), 1)
    p = parse_compressor("topk:0.4").payload_bytes(d, torch.float64)
    assert sim.bytes_sent == 3 * p  # an all-gather of the payloads: (m - 1) through each node
    sim = _run(presets.local_sgd(4, 1, compression="fp16"), 1)
    assert sim.bytes_sent == 3 * 2 * d  # gathered like every payload (a 16-bit all-reduce would round the sum)
    for c in ("fp16", "bf16"):  # the reference runs' and theory's cost model charges the same all-gather
        assert spec_round_cost(presets.local_sgd(4, 1, compression=c), d, 8).bytes_sent == 3 * 2 * d
    sim = _run(presets.dpsgd(6, compression="sign"), 1)
    p = parse_compressor("sign").payload_bytes(d, torch.float64)
    assert sim.bytes_sent == 2 * 2 * p  # a ring: two neighbours
    plain = _run(presets.local_sgd(4, 1), 1)
    assert plain.bytes_sent == round_cost("allreduce", workers=4, params=d, bytes_per_param=8).bytes_sent
    none = _run(presets.choco(6, gamma=0.5), 1)  # no compressor: full rows
    assert none.bytes_sent == _run(presets.dpsgd(6), 1).bytes_sent


def test_compressed_round_cost_per_pattern() -> None:
    m, d = 8, 1000
    ar = round_cost("allreduce", workers=m, params=d, bytes_per_param=4)
    assert compressed_round_cost(ar, workers=m, params=d, bytes_per_param=4, payload_bytes=60,
                                 reducible=False).bytes_sent == 7 * 60
    assert compressed_round_cost(ar, workers=m, params=d, bytes_per_param=4, payload_bytes=2000,
                                 reducible=True).bytes_sent == 2 * 2000
    ps = round_cost("parameter_server", workers=m, params=d, bytes_per_param=4)
    assert compressed_round_cost(ps, workers=m, params=d, bytes_per_param=4, payload_bytes=60,
                                 reducible=False).bytes_sent == m * 60 + m * d * 4
    nb = round_cost("neighbor", workers=m, params=d, max_degree=2, bytes_per_param=4)
    assert compressed_round_cost(nb, workers=m, params=d, bytes_per_param=4, payload_bytes=60,
                                 reducible=False).bytes_sent == 2 * 2 * 60


def test_no_compression_changes_nothing() -> None:
    sim = _simulator(presets.local_sgd(4, 2, compression=None))
    assert sim.spec.compressed is None and sim._compressed is None and sim._kernel.compressed is None
    assert sim._comm.lazy_rows == 4
    a, b = _run(presets.fedavg(6, 2, fraction=0.5), 8), _run(presets.fedavg(6, 2, fraction=0.5, compression="none"), 8)
    assert torch.equal(a.params, b.params) and a.bytes_sent == b.bytes_sent


# -- refusals -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("build", "words"), [
    (lambda: presets.sync(4, compression="zip"), "unknown compressor"),
    (lambda: presets.sync(4, compression="topk:0"), "(0, 1]"),
    (lambda: presets.sync(4, compression="qsgd:0"), "qsgd"),
    (lambda: presets.dpsgd(4, compression="powersgd:2"), "powersgd compresses averaging rounds only"),
    (lambda: presets.matcha(4, compression="powersgd:2"), "powersgd"),
    (lambda: presets.choco(4, compression=Compression("topk:0.1", consensus_step=0.5), gamma=0.2), "gamma"),
    (lambda: Compression("int8", error_feedback="sometimes"), "error_feedback"),
    (lambda: Compression("int8", consensus_step=1.5), "consensus_step"),
])
def test_bad_specs_are_refused(build: Callable[[], object], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert words in str(info.value)
    field = info.value.field if hasattr(info.value, "field") else None
    assert field in (None, "compress", "error_feedback", "consensus_step", "gamma")


def test_config_and_cli_refuse_with_one_line(capsys, tmp_path, monkeypatch) -> None:
    """Before anything is written: no run directory appears."""
    from coopsgd.cli import main

    monkeypatch.chdir(tmp_path)
    assert RunConfig(engine="distributed", compress="int8").communication.compress == "int8"
    assert RunConfig(engine="distributed", preset="easgd", compress="int8").communication.compress == "int8"
    RunConfig(engine="distributed", preset="hierarchical", compress="int8")  # placed centres: elastic rounds
    # refused before any rank: DOWNPOUR's default order there (the real asynchronous server)
    with pytest.raises(ConfigError, match="downpour_order='schedule'"):
        RunConfig(engine="distributed", preset="downpour", compress="int8")
    RunConfig(engine="distributed", preset="downpour", downpour_order="schedule", compress="int8")
    assert RunConfig(preset="lsgd").build_spec().compressed is None
    assert RunConfig(preset="lsgd", compress="int8").build_spec().compressed is not None
    assert RunConfig(preset="lsgd", groups=2, compress="int8").build_spec().compressed is not None
    for argv in (["run", "--compress", "topk:2"], ["run", "--preset", "dpsgd", "--compress", "powersgd:1"],
                 ["run", "--engine", "distributed", "--preset", "downpour", "--compress", "int8"]):
        assert main([*argv, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "compress" in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_config_builds_compressed_specs_for_any_compressible_preset() -> None:
    spec = RunConfig(preset="dpsgd", compress="TopK:0.01", consensus_step=0.3).build_spec()
    assert spec.compressed == Compression("topk:0.01", "auto", 0.3)
    assert RunConfig(preset="choco", workers=4).build_spec().name == "choco"
    cfg = RunConfig(preset="local_sgd", compress="int8", error_feedback="off")
    assert cfg.build_spec().compressed == Compression("int8", "off")
    assert cfg.spec_kwargs()["compression"] == Compression("int8", "off")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_default_consensus_steps() -> None:
    d = 1000
    gamma = {c: Compression(c).gamma(parse_compressor(c), d) for c in
             ("none", "fp16", "bf16", "int8", "sign", "topk:0.01", "randk:0.1", "qsgd:4", "randk:0.1:unbiased")}
    assert gamma["none"] == gamma["fp16"] == gamma["bf16"] == 1.0
    assert gamma["int8"] == parse_compressor("int8").delta(d) and gamma["topk:0.01"] == 0.01
    assert gamma["randk:0.1"] == 0.1 and gamma["sign"] == pytest.approx(2 / np.pi)
    assert gamma["qsgd:4"] == pytest.approx(1 / (1 + parse_compressor("qsgd:4").omega(d)))
    assert gamma["randk:0.1:unbiased"] == pytest.approx(0.1)  # 1 / (1 + (d/k - 1))
    assert Compression("topk:0.01", consensus_step=0.3).gamma(parse_compressor("topk:0.01"), d) == 0.3
