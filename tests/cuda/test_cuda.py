"""``--device cuda``: the simulator on a GPU equals it on the CPU (float64), compressors on a GPU equal them on
the CPU (decoded values and bytes), a run on a GPU resumes bit-exactly, and the distributed engine runs on GPUs.

Every test here is skipped without a CUDA device (``torch.cuda.is_available()``); ``benchmarks/gpu_check.sh``
runs them on a machine with one. ``COOPSGD_TEST_ACCELERATOR=cpu`` runs the same code with the CPU in the
GPU's place: the comparisons are then trivially equal, but every code path of this file is exercised on a
machine without a GPU (how the file itself was checked before a GPU was available).

Tolerances: float64 everywhere; the GPU and the CPU sum in different orders (cuBLAS / cuDNN against the CPU's
BLAS), so their trajectories agree to rounding (1e-10 after a few steps), not bit for bit; compressors whose
decoding is elementwise arithmetic agree bit for bit. One device against itself (resume, a run repeated)
is bit-exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.compression import parse_compressor
from coopsgd.engines.simulator import Simulator
from coopsgd.models import make_model
from coopsgd.train import RunConfig, load_checkpoint
from coopsgd.train.problem import lm_loss
from coopsgd.train.trainer import train

ACCEL = os.environ.get("COOPSGD_TEST_ACCELERATOR", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ACCEL.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = 1e-10
STEPS = 6
M = 4
VOCAB, SEQ = 40, 6


# ---------------------------------------------------------------------------------------------- workloads


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )


def gpt() -> nn.Module:
    return make_model("gpt", num_classes=VOCAB, input_shape=(SEQ,), layers=2, heads=2, width=8, context=SEQ)


def lstm() -> nn.Module:
    return make_model("lstm_lm", num_classes=VOCAB, input_shape=(SEQ,), emb_size=8, hidden_size=8, batch_first=True)


#: name -> (factory, batch maker (step, worker) -> (x, y), loss)
Batcher = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _gen(step: int, worker: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * step + worker)


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], Batcher, Callable[..., torch.Tensor]]] = {
    "mlp": (mlp, lambda k, i: (torch.randn(8, 6, generator=_gen(k, i)),
                               torch.randint(0, 3, (8,), generator=_gen(k, i + 500))), F.cross_entropy),
    "cnn_bn": (cnn_bn, lambda k, i: (torch.randn(8, 1, 8, 8, generator=_gen(k, i)),
                                     torch.randint(0, 3, (8,), generator=_gen(k, i + 500))), F.cross_entropy),
    "gpt": (gpt, lambda k, i: (torch.randint(0, VOCAB, (4, SEQ), generator=_gen(k, i)),
                               torch.randint(0, VOCAB, (4, SEQ), generator=_gen(k, i + 500))), lm_loss),
    "lstm": (lstm, lambda k, i: (torch.randint(0, VOCAB, (4, SEQ), generator=_gen(k, i)),
                                 torch.randint(0, VOCAB, (4, SEQ), generator=_gen(k, i + 500))), lm_loss),
}

#: name -> (spec factory, optimizer keywords)
SPECS: dict[str, tuple[Callable[[], object], dict]] = {
    "local_sgd_nesterov": (lambda: presets.local_sgd(M, 2), {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "easgd": (lambda: presets.easgd(M, 2), {}),
    "dpsgd_ring": (lambda: presets.dpsgd(M, topology="ring"), {"momentum": 0.5}),
    "lsgd": (lambda: presets.lsgd(M, 2, lam=0.2), {}),
    "fedavg_half": (lambda: presets.fedavg(M, 2, fraction=0.5, seed=1), {}),
    "diloco_adamw": (lambda: presets.diloco(M, 3), {"optimizer": "adamw", "weight_decay": 0.01}),
    "local_sgd_int8": (lambda: presets.local_sgd(M, 2, compression="int8"), {}),
    "choco_topk": (lambda: presets.choco(M, compression="topk:0.25"), {}),
    "sync_powersgd": (lambda: presets.sync(M, compression="powersgd:2"), {}),
}


def simulate(model: str, spec: str, executor: str, device: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(params, buffers, bytes_sent)`` after :data:`STEPS` steps, on the CPU."""
    factory, batch, loss = WORKLOADS[model]
    make_spec, opt = SPECS[spec]

    def build() -> nn.Module:
        torch.manual_seed(3)
        return factory()

    sim = Simulator(make_spec(), build, loss_fn=loss, executor=executor, dtype=torch.float64,  # type: ignore[arg-type]
                    device=device, **opt)
    assert sim.params.device.type == torch.device(device).type
    lr = 0.01 if spec == "diloco_adamw" else 0.1
    for k in range(STEPS):
        batches: list = [batch(k, i) for i in range(M)]
        active = sim.spec.schedule.active(k)
        if active is not None:
            batches = [b if active[i] else None for i, b in enumerate(batches)]
        sim.step(batches, lr)
    return sim.params.detach().cpu().clone(), sim.buffers.detach().cpu().clone(), float(sim.bytes_sent)


# ---------------------------------------------------------------------------------------------- simulator


CASES = [(mdl, spec, ex) for mdl in ("mlp",) for spec in SPECS for ex in ("loop", "vmap")]
CASES += [(mdl, spec, ex) for mdl in ("cnn_bn", "gpt", "lstm")
          for spec in ("local_sgd_nesterov", "easgd", "diloco_adamw") for ex in ("loop", "vmap")]


@pytest.mark.parametrize(("model", "spec", "executor"), CASES, ids=["-".join(c) for c in CASES])
def test_simulator_float64_on_the_gpu_equals_the_cpu(model: str, spec: str, executor: str) -> None:
    p_cpu, b_cpu, bytes_cpu = simulate(model, spec, executor, "cpu")
    p_gpu, b_gpu, bytes_gpu = simulate(model, spec, executor, ACCEL)
    diff = float((p_gpu - p_cpu).abs().max())
    assert diff <= TOL, f"max |{ACCEL} - cpu| = {diff:.3e}"
    if b_cpu.numel():  # BatchNorm running statistics
        assert float((b_gpu - b_cpu).abs().max()) <= TOL
    assert bytes_gpu == bytes_cpu  # the same rounds, the same payloads


@pytest.mark.parametrize("model", ["cnn_bn", "gpt"])
@pytest.mark.parametrize("executor", ["loop", "vmap"])
def test_the_gpu_repeats_itself_bit_for_bit(model: str, executor: str) -> None:
    """Same command, same seed, same numbers: two runs on the GPU give the same bits."""
    a = simulate(model, "local_sgd_nesterov", executor, ACCEL)
    b = simulate(model, "local_sgd_nesterov", executor, ACCEL)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------- compressors

LAYOUT = ((12, 5), (7,), (3, 2, 4), (2, 2))  # d = 95
D_LAYOUT = 95
# decoding is elementwise arithmetic on values the GPU computes exactly as the CPU does
EXACT = {"none", "fp16", "bf16", "int8", "int8:16", "topk:0.1", "topk:1", "randk:0.1", "randk:0.25:unbiased"}
COMPRESSORS = sorted(EXACT) + ["qsgd:4", "qsgd:300", "sign", "powersgd:2"]


@pytest.mark.parametrize("spec", COMPRESSORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compressor_roundtrip_on_the_gpu_equals_the_cpu(spec: str, dtype: torch.dtype) -> None:
    c = parse_compressor(spec, layout=LAYOUT if spec.startswith("powersgd") else None)
    rows = torch.from_numpy(np.random.default_rng(4).standard_normal((8, D_LAYOUT))).to(dtype)
    nodes = [4, 1, 0, 6, 2, 5, 3, 7]
    cpu = c.roundtrip(rows, round=5, nodes=nodes, seed=9)
    gpu = c.roundtrip(rows.to(ACCEL), round=5, nodes=nodes, seed=9)
    assert gpu.decoded.device.type == torch.device(ACCEL).type and gpu.decoded.dtype == dtype
    assert gpu.row_bytes == cpu.row_bytes == c.payload_bytes(D_LAYOUT, dtype)
    payload = c.compress(rows.to(ACCEL), round=5, nodes=nodes, seed=9)
    assert payload.row_bytes() == c.payload_bytes(D_LAYOUT, dtype)
    assert torch.equal(c.decompress(payload), gpu.decoded)  # the fused path is the same bits on the GPU too
    if spec in EXACT:
        assert torch.equal(gpu.decoded.cpu(), cpu.decoded)
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(gpu.decoded.cpu(), cpu.decoded, rtol=tol, atol=tol * float(cpu.decoded.abs().max()))


def test_long_rows_on_the_gpu() -> None:
    """Rows of 1e6 coordinates (the kernels' GPU launch sizes): int8 and top-k equal the CPU bit for bit."""
    rows = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 1_000_003)))
    for spec in ("int8", "topk:0.001", "randk:0.001"):
        c = parse_compressor(spec)
        cpu = c.roundtrip(rows, round=1, nodes=range(3), seed=0)
        gpu = c.roundtrip(rows.to(ACCEL), round=1, nodes=range(3), seed=0)
        assert torch.equal(gpu.decoded.cpu(), cpu.decoded), spec
        assert gpu.row_bytes == cpu.row_bytes


# ---------------------------------------------------------------------------------------------- whole runs


def _final_state(out) -> torch.Tensor:
    return load_checkpoint(out / "checkpoint.pt")["engine_state"]["payload"]["state"]


RUNS = {
    "mlp_local_sgd": {"preset": "local_sgd", "tau": 3, "model": "mlp", "momentum": 0.9, "nesterov": True,
                      "executor": "loop"},
    "lenet_easgd": {"preset": "easgd", "tau": 2, "model": "lenet", "executor": "vmap"},
    "gpt_diloco_topk": {"preset": "diloco", "tau": 3, "model": "gpt", "dataset": "wikitext2",
                        "model_args": {"layers": 1, "heads": 2, "width": 8, "context": 35}, "optimizer": "adamw",
                        "lr": 0.003, "compress": "topk:0.1", "executor": "vmap"},
}


def _config(name: str, device: str, steps: int, out) -> RunConfig:
    kw = {"workers": 4, "batch_size": 8, "lr": 0.05, "seed": 3, "eval_every": 4, "eval_samples": 64,
          "dtype": "float64", **RUNS[name]}
    return RunConfig(**kw, device=device, max_steps=steps, out=str(out))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_run_on_the_gpu_equals_the_run_on_the_cpu(tmp_path, name: str) -> None:
    gpu = train(_config(name, ACCEL, 8, tmp_path / "gpu"))
    cpu = train(_config(name, "cpu", 8, tmp_path / "cpu"))
    assert gpu["communication_rounds"] == cpu["communication_rounds"] and gpu["bytes_sent"] == cpu["bytes_sent"]
    for key, value in cpu["final"].items():
        assert gpu["final"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    diff = float((_final_state(tmp_path / "gpu").cpu() - _final_state(tmp_path / "cpu")).abs().max())
    assert diff <= TOL, f"max |{ACCEL} - cpu| = {diff:.3e}"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_resume_on_the_gpu_is_bit_identical(tmp_path, name: str) -> None:
    full = train(_config(name, ACCEL, 10, tmp_path / "full"))
    train(_config(name, ACCEL, 4, tmp_path / "part"))  # stop after 4 steps (checkpoint at the end)
    resumed = train(_config(name, ACCEL, 10, tmp_path / "part"), resume=tmp_path / "part")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert torch.equal(a["engine_state"]["payload"]["state"], b["engine_state"]["payload"]["state"])  # tolerance 0
    assert a["engine_state"]["payload"]["rounds"] == b["engine_state"]["payload"]["rounds"]
    assert resumed["communication_rounds"] == full["communication_rounds"]
    assert resumed["bytes_sent"] == full["bytes_sent"]
    assert resumed["final"] == full["final"]


def test_distributed_engine_on_gpus_equals_the_simulator_on_the_cpu(tmp_path) -> None:
    """``--engine distributed --device cuda``: one GPU per rank, NCCL; as many ranks as GPUs (at most 2)."""
    if not ACCEL.startswith("cuda"):
        pytest.skip("the distributed engine's device is cpu or cuda; the CPU dry run has nothing to add here")
    from coopsgd.train.distributed import run_distributed

    workers = min(2, torch.cuda.device_count())
    kw = {"preset": "local_sgd", "tau": 2, "workers": workers, "model": "mlp", "batch_size": 16, "lr": 0.05,
          "seed": 0, "max_steps": 6, "eval_samples": 200, "dtype": "float64"}
    dist = run_distributed(RunConfig(**kw, engine="distributed", device="cuda"), out=tmp_path / "d",  # type: ignore[arg-type]
                           timeout_s=120)
    sim = train(RunConfig(**kw, device="cpu", executor="loop"), out=tmp_path / "s")  # type: ignore[arg-type]
    assert dist["status"] == "ok" and dist["communication_rounds"] == sim["communication_rounds"]
    for key, value in sim["final"].items():
        assert dist["final"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_cli_run_on_the_gpu(capsys, tmp_path) -> None:
    """``coopsgd run --device cuda`` end to end: exit 0, the device recorded in the run directory."""
    import json

    from coopsgd.cli import main

    code = main(["run", "--device", ACCEL, "--preset", "local_sgd", "--workers", "2", "--tau", "2", "--max-steps", "4",
                 "--eval-samples", "100", "--out", str(tmp_path / "r"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["communication_rounds"] == 2
    assert json.loads((tmp_path / "r" / "config.json").read_text())["device"] == ACCEL


def test_a_gpu_checkpoint_loads_on_a_cpu_only_reader(tmp_path) -> None:
    """The checkpoint of a GPU run is read back onto the CPU (``map_location``): usable where no GPU is."""
    train(_config("mlp_local_sgd", ACCEL, 2, tmp_path / "g"))
    state = load_checkpoint(tmp_path / "g" / "checkpoint.pt")["engine_state"]["payload"]["state"]
    assert state.device.type == "cpu" and state.dtype == torch.float64
    assert torch.isfinite(state).all()
