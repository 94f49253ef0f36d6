"""The small GPT (coopsgd.models.gpt): shapes, causality, weight tying, parameter count, bad arguments, and the
simulator's stacked executors (loop and vmap) on it against m separate models, in float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from coopsgd.algorithms import presets
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError
from coopsgd.models import (
    GPT,
    GPT_DEFAULTS,
    MODELS,
    count_parameters,
    gpt_parameter_count,
    make_model,
    stack_replicas,
    vmap_grad,
)

V, T = 30, 5
TINY = {"layers": 2, "heads": 2, "width": 8, "context": 6}


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = make_model("gpt", num_classes=V, input_shape=(T,), **{**TINY, **kw})
    assert isinstance(model, GPT)
    return model


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ the model


def test_registered_with_its_defaults() -> None:
    assert "gpt" in MODELS
    model = make_model("gpt", num_classes=V)
    assert (model.layers, model.heads, model.width, model.context, model.dropout_p) == (
        GPT_DEFAULTS["layers"], GPT_DEFAULTS["heads"], GPT_DEFAULTS["width"], GPT_DEFAULTS["context"],
        GPT_DEFAULTS["dropout"],
    )
    assert len(model.blocks) == GPT_DEFAULTS["layers"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_any_length_up_to_the_context(dtype: torch.dtype) -> None:
    model = tiny().to(dtype).eval()
    for t in (1, 3, TINY["context"]):
        out = model(tokens(4, t))
        assert out.shape == (4, t, V) and out.dtype == dtype and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="context=6"):
        model(tokens(4, TINY["context"] + 1))
    with pytest.raises(ConfigError, match="tokens.shape"):
        model(tokens(4))


def test_causal_a_future_token_changes_no_earlier_logit() -> None:
    model = tiny().double().eval()
    x = tokens(3, T)
    base = model(x)
    for j in range(T):
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % V
        out = model(y)
        assert torch.equal(out[:, :j], base[:, :j]), j  # bit for bit: masked scores contribute exact zeros
        assert not torch.allclose(out[:, j:], base[:, j:]), j


def test_weight_tying_is_one_shared_parameter() -> None:
    model = tiny()
    assert model.head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "head.weight" not in names
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    # the tied gradient is the sum of the embedding's and the head's: untie them (two leaves, same values)
    x, y = tokens(2, T), tokens(2, T, seed=1)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    head = params["tok_emb.weight"].detach().clone().requires_grad_(True)
    untied = functional_call(model, {**params, "head.weight": head}, (x,), tie_weights=False)
    loss = lm_loss(untied, y)
    g_emb, g_head = torch.autograd.grad(loss, [params["tok_emb.weight"], head])
    (g_tied,) = torch.autograd.grad(lm_loss(model(x), y), [model.tok_emb.weight])
    torch.testing.assert_close(g_tied, g_emb + g_head)
    assert g_head.abs().sum() > 0 and g_emb.abs().sum() > 0
    # an optimizer step keeps them one tensor
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lm_loss(model(x), y).backward()
    opt.step()
    assert model.head.weight is model.tok_emb.weight


@pytest.mark.parametrize(
    ("vocab", "kw"),
    [(30, TINY), (18328, {}), (100, {"layers": 1, "heads": 1, "width": 4, "context": 1}),
     (50, {"layers": 3, "heads": 4, "width": 12, "context": 35})],
)
def test_parameter_count_closed_form(vocab: int, kw: dict) -> None:
    full = {**GPT_DEFAULTS, **kw}
    model = make_model("gpt", num_classes=vocab, **kw)
    expected = gpt_parameter_count(vocab, layers=int(full["layers"]), width=int(full["width"]),
                                   context=int(full["context"]))
    assert count_parameters(model) == expected
    w, L = int(full["width"]), int(full["layers"])
    assert expected == vocab * w + int(full["context"]) * w + L * (12 * w * w + 13 * w) + 2 * w


def test_default_size() -> None:
    """The default at WikiText-2's bundled vocabulary: about 1.28 M parameters (what docs/models.md states)."""
    assert count_parameters(make_model("gpt", num_classes=18328)) == 1_277_184


@pytest.mark.parametrize(
    ("field", "kw", "shape"),
    [
        ("heads", {"width": 10, "heads": 4}, ()),
        ("context", {"context": 0}, ()),
        ("context", {"context": 32}, (35,)),
        ("layers", {"layers": 0}, ()),
        ("width", {"width": -8}, ()),
        ("heads", {"heads": 2.5}, ()),
        ("dropout", {"dropout": 1.0}, ()),
        ("n_embd", {"n_embd": 64}, ()),
        ("input_shape", {}, (3, 32, 32)),
    ],
)
def test_bad_arguments_are_refused_naming_the_field(field: str, kw: dict, shape: tuple) -> None:
    with pytest.raises(ConfigError) as info:
        make_model("gpt", num_classes=V, input_shape=shape, **kw)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{field}=") and "\n" not in str(info.value)


def test_bad_model_args_exit_2_on_the_cli(capsys, tmp_path) -> None:
    from coopsgd.cli import main

    cfg = tmp_path / "gpt.json"
    cfg.write_text(json.dumps({"preset": "sync", "model": "gpt", "dataset": "wikitext2",
                               "model_args": {"width": 10, "heads": 4}}))
    out = tmp_path / "run"
    code = main(["run", "--config", str(cfg), "--workers", "2", "--max-steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "Traceback" not in "\n".join(err)
    assert err[-1] == "coopsgd: error: heads=4 is invalid: must divide width=10 (each head is width / heads wide)"
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ torch.func


def test_vmap_grad_equals_per_replica_autograd_float64() -> None:
    models = [tiny(seed).double() for seed in (0, 1, 2)]
    x, y = tokens(3, 4, T), tokens(3, 4, T, seed=1)
    params, buffers = stack_replicas(models)
    assert not buffers  # no buffers: nothing per replica besides the parameters
    grads, losses, _ = vmap_grad(copy.deepcopy(models[0]), params, buffers, x, y, loss_fn=lm_loss)
    for i, model in enumerate(models):
        loss = lm_loss(model(x[i]), y[i])
        names, tensors = zip(*model.named_parameters(), strict=True)
        ref = torch.autograd.grad(loss, tensors)
        assert set(grads) == set(names)
        torch.testing.assert_close(losses[i], loss.detach(), rtol=0, atol=1e-12)
        for n, g in zip(names, ref, strict=True):
            torch.testing.assert_close(grads[n][i], g, rtol=0, atol=1e-12, msg=lambda s, n=n: f"{n}: {s}")


def test_dropout_under_vmap_needs_randomness() -> None:
    models = [tiny(seed, dropout=0.2) for seed in (0, 1)]
    params, buffers = stack_replicas(models)
    x = tokens(2, 3, T)
    with pytest.raises(RuntimeError):
        vmap_grad(models[0], params, buffers, x, x, loss_fn=lm_loss)
    _, losses, _ = vmap_grad(models[0], params, buffers, x, x, loss_fn=lm_loss, randomness="different")
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("executor", ["loop", "vmap"])
def test_simulator_executors_equal_m_separate_models(executor: str) -> None:
    """Local SGD (tau = 2, momentum) on the simulator = m separate GPTs with torch.optim.SGD, averaged every 2
    steps by hand, to 1e-10 in float64."""
    m, steps, lr, tau = 3, 6, 0.5, 2
    sim = Simulator(presets.local_sgd(m, tau), lambda: tiny(7), executor=executor, dtype=torch.float64,
                    loss_fn=lm_loss, momentum=0.9)
    assert sim.executor_name == executor
    start = tiny(7).double()
    separate = [copy.deepcopy(start) for _ in range(m)]
    opts = [torch.optim.SGD(md.parameters(), lr=lr, momentum=0.9) for md in separate]
    torch.testing.assert_close(sim.params[0], _flat(start), rtol=0, atol=0)
    for k in range(steps):
        batches = [(tokens(4, T, seed=100 * k + i), tokens(4, T, seed=100 * k + i + 50)) for i in range(m)]
        sim.step(batches, lr)
        for i, (md, opt) in enumerate(zip(separate, opts, strict=True)):
            opt.zero_grad()
            lm_loss(md(batches[i][0]), batches[i][1]).backward()
            opt.step()
        if (k + 1) % tau == 0:
            with torch.no_grad():
                for ps in zip(*(md.parameters() for md in separate), strict=True):
                    mean = torch.stack(ps).mean(0)
                    for p in ps:
                        p.copy_(mean)
        for i, md in enumerate(separate):
            diff = float((sim.params[i] - _flat(md)).abs().max())
            assert diff <= 1e-10, f"step {k} worker {i}: {diff:.3e}"
    assert float((sim.params[0] - _flat(start)).abs().max()) > 1e-3  # it trained


def test_loop_and_vmap_agree_with_a_round_every_step() -> None:
    """EASGD (a mixing round with an auxiliary node every step) gives the same trajectory on both executors."""
    states = {}
    for executor in ("loop", "vmap"):
        sim = Simulator(presets.easgd(3, 1), lambda: tiny(3), executor=executor, dtype=torch.float64,
                        loss_fn=lm_loss, weight_decay=1e-3)
        for k in range(4):
            sim.step([(tokens(2, T, seed=10 * k + i), tokens(2, T, seed=10 * k + i + 5)) for i in range(3)], 0.3)
        states[executor] = sim.params.detach().clone()
    torch.testing.assert_close(states["loop"], states["vmap"], rtol=0, atol=1e-10)


def test_the_simulated_clock_counts_its_flops_in_closed_form() -> None:
    """FLOP counting (the simulated clock's compute model) sees every matrix product, the attention's too:
    forward 2*(24 W^2 L + W V) per token plus 4 T^2 W L per sequence, backward twice that."""
    sim = Simulator(presets.local_sgd(2, 1), lambda: tiny(0), executor="loop", loss_fn=lm_loss)
    b = 3
    sim.step([(tokens(b, T), tokens(b, T, seed=1))] * 2, 0.1)
    info = sim.compute_model_info()
    assert info["kind"] == "flops" and sim.flops_error is None, (info, sim.flops_error)
    w, L = TINY["width"], TINY["layers"]
    forward = b * T * (2 * 12 * w * w * L + 2 * w * V) + b * 4 * T * T * w * L
    assert info["flops_per_worker_step"] == 3 * forward
