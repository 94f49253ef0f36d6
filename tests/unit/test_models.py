"""Models (coopsgd.models): shapes, parameter counts, validation, torch.func vmap(grad) equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from coopsgd.errors import ConfigError
from coopsgd.models import (
    MODELS,
    LSTMLanguageModel,
    classification_loss,
    count_parameters,
    grad_fn,
    make_model,
    stack_replicas,
    vmap_grad,
)


@pytest.mark.parametrize(
    ("name", "shape", "kw"),
    [
        ("mlp", (1, 28, 28), {}),
        ("mlp", (1, 8, 8), {"hidden": (16,)}),
        ("lenet", (1, 28, 28), {}),
        ("lenet", (3, 32, 32), {}),
        ("lenet", (1, 8, 8), {}),
        ("cnn7", (3, 28, 28), {}),
        ("cnn7", (3, 32, 32), {"width": 8}),
        ("resnet20", (3, 32, 32), {}),
        ("resnet20", (1, 28, 28), {"shortcut": "B"}),
        ("vgg16", (3, 32, 32), {}),
    ],
)
def test_image_model_output_shapes(name: str, shape: tuple[int, ...], kw: dict) -> None:
    torch.manual_seed(0)
    model = make_model(name, num_classes=7, input_shape=shape, **kw).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_lstm_lm_shapes_statelessness_and_tying() -> None:
    torch.manual_seed(0)
    model = make_model("lstm_lm", num_classes=50, emb_size=16, hidden_size=16, tie_weights=True)
    assert isinstance(model, LSTMLanguageModel) and model.decoder.weight is model.encoder.weight
    tokens = torch.randint(0, 50, (6, 3))
    logits = model(tokens)
    assert logits.shape == (6, 3, 50)
    assert torch.equal(model(tokens), logits)  # no state carried between calls
    # forward == forward_with_state from zero; carrying the state changes the next chunk's output.
    again, state = model.forward_with_state(tokens)
    assert torch.equal(again, logits) and len(state) == 2 and state[0][0].shape == (3, 16)
    carried, _ = model.forward_with_state(tokens, [(h.detach(), c.detach()) for h, c in state])
    assert not torch.allclose(carried, logits)
    # Agrees with torch's nn.LSTM given the same weights (PyTorch gate order i, f, g, o).
    ref = nn.LSTM(16, 16, num_layers=2)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            getattr(ref, f"weight_ih_l{i}").copy_(layer.weight_ih)
            getattr(ref, f"weight_hh_l{i}").copy_(layer.weight_hh)
            getattr(ref, f"bias_ih_l{i}").copy_(layer.bias)
            getattr(ref, f"bias_hh_l{i}").zero_()
        want = model.decoder(ref(model.encoder(tokens))[0])
    torch.testing.assert_close(logits.detach(), want, atol=1e-5, rtol=1e-5)
    bf = make_model("lstm_lm", num_classes=50, input_shape=(6,), emb_size=8, hidden_size=8, batch_first=True)
    assert bf(tokens.t()).shape == (3, 6, 50)
    default = make_model("lstm_lm", num_classes=1000)
    assert default.encoder.weight.shape == (1000, 200) and len(default.layers) == 2


def test_parameter_counts() -> None:
    resnet = make_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    assert 260_000 <= count_parameters(resnet) <= 280_000
    assert count_parameters(resnet) == 269_722  # He et al. 2016, option A
    vgg = make_model("vgg16", num_classes=10, input_shape=(3, 32, 32))
    assert 14_700_000 <= count_parameters(vgg) <= 15_300_000
    assert count_parameters(make_model("lenet", num_classes=10, input_shape=(1, 28, 28))) == 61_706
    assert count_parameters(make_model("mlp", num_classes=10, input_shape=(1, 28, 28))) == 199_210
    tied = make_model("lstm_lm", num_classes=100, emb_size=8, hidden_size=8, tie_weights=True)
    untied = make_model("lstm_lm", num_classes=100, emb_size=8, hidden_size=8)
    assert count_parameters(untied) - count_parameters(tied) == 100 * 8


def test_model_config_errors_name_the_field() -> None:
    cases = [
        ("model", lambda: make_model("resnet50", num_classes=10, input_shape=(3, 32, 32))),
        ("num_classes", lambda: make_model("mlp", num_classes=0, input_shape=(4,))),
        ("input_shape", lambda: make_model("lenet", num_classes=10, input_shape=(28, 28))),
        ("input_shape", lambda: make_model("lenet", num_classes=10, input_shape=(1, 3, 3))),
        ("input_shape", lambda: make_model("vgg16", num_classes=10, input_shape=(3, 28, 28))),
        ("input_shape", lambda: make_model("cnn7", num_classes=10, input_shape=(3, 4, 4))),
        ("input_shape", lambda: make_model("mlp", num_classes=10, input_shape=(1, -2))),
        ("input_shape", lambda: make_model("resnet20", num_classes=10)),
        ("input_shape", lambda: make_model("lstm_lm", num_classes=10, input_shape=(3, 32, 32))),
        ("depth", lambda: make_model("resnet20", num_classes=10, input_shape=(3, 32, 32), depth=56)),
        ("shortcut", lambda: make_model("resnet20", num_classes=10, input_shape=(3, 32, 32), shortcut="C")),
        ("hidden", lambda: make_model("mlp", num_classes=10, input_shape=(4,), hidden="wide")),
        (
            "tie_weights",
            lambda: make_model("lstm_lm", num_classes=10, emb_size=4, hidden_size=8, tie_weights=True),
        ),
        ("dropout", lambda: make_model("lstm_lm", num_classes=10, dropout=1.5)),
    ]
    for field, call in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.field == field, (field, str(info.value))
        assert str(info.value).startswith(f"{field}=")
    with pytest.raises(ConfigError) as info:
        make_model("resnet50", num_classes=10, input_shape=(3, 32, 32))
    assert all(name in str(info.value) for name in MODELS)


# ---------------------------------------------------------------------------------------------- torch.func


def _replicas(name: str, shape: tuple[int, ...], num_classes: int, **kw) -> list[nn.Module]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(make_model(name, num_classes=num_classes, input_shape=shape, **kw))
    return models


VMAP_CASES = [
    ("mlp", (1, 8, 8), 10, {"hidden": (32, 16)}),
    ("lenet", (1, 12, 12), 10, {}),
    ("resnet20", (3, 8, 8), 10, {"width": 4}),
    ("resnet20", (3, 8, 8), 10, {"width": 4, "shortcut": "B"}),
    ("cnn7", (3, 8, 8), 10, {"width": 4}),
    ("lstm_lm", (5,), 20, {"emb_size": 8, "hidden_size": 8, "tie_weights": True, "batch_first": True}),
]


@pytest.mark.parametrize(
    ("name", "shape", "num_classes", "kw"), VMAP_CASES, ids=[c[0] + str(i) for i, c in enumerate(VMAP_CASES)]
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_vmap_grad_equals_per_replica_autograd(
    name: str, shape: tuple[int, ...], num_classes: int, kw: dict, mode: str
) -> None:
    models = _replicas(name, shape, num_classes, **kw)
    for m in models:
        m.train(mode == "train")
    gen = torch.Generator().manual_seed(3)
    if name == "lstm_lm":
        x = torch.randint(0, num_classes, (2, 3, *shape), generator=gen)
        y = torch.randint(0, num_classes, (2, 3, *shape), generator=gen)
    else:
        x = torch.randn(2, 4, *shape, generator=gen)
        y = torch.randint(0, num_classes, (2, 4), generator=gen)
    params, buffers = stack_replicas(models)
    template = copy.deepcopy(models[0])
    grads, losses, new_buffers = vmap_grad(template, params, buffers, x, y)

    for i, m in enumerate(models):  # reference: a plain loop with autograd, buffers updated in place
        loss = classification_loss(m(x[i]), y[i])
        names, tensors = zip(*m.named_parameters(), strict=True)
        ref = torch.autograd.grad(loss, tensors)
        assert set(grads) == set(names)
        torch.testing.assert_close(losses[i], loss.detach(), atol=1e-5, rtol=1e-5)
        for n, g in zip(names, ref, strict=True):
            torch.testing.assert_close(grads[n][i], g, atol=1e-5, rtol=1e-5, msg=lambda s, n=n: f"{n}: {s}")
        for n, b in m.named_buffers():
            torch.testing.assert_close(new_buffers[n][i], b, atol=1e-6, rtol=1e-6)
    # The inputs were not mutated: running statistics only changed in the returned copies.
    for n, b in stack_replicas(_replicas(name, shape, num_classes, **kw))[1].items():
        assert torch.equal(buffers[n], b)
    if mode == "train" and any("running_mean" in n for n in buffers):
        assert any(not torch.equal(new_buffers[n], buffers[n]) for n in buffers if "running_mean" in n)


def test_grad_fn_single_replica_matches_autograd() -> None:
    model = make_model("resnet20", num_classes=10, input_shape=(3, 8, 8), width=4)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    grads, loss, new_buffers = grad_fn(model)(params, buffers, x, y)
    ref_loss = classification_loss(model(x), y)
    ref = torch.autograd.grad(ref_loss, list(model.parameters()))
    for (n, _), g in zip(model.named_parameters(), ref, strict=True):
        torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-5)
    assert int(new_buffers["bn1.num_batches_tracked"]) == 1


def test_batchnorm_buffers_shared_unbatched_fail_under_vmap() -> None:
    """Documents the BatchNorm finding: one unbatched buffer set cannot absorb m replicas' updates."""
    models = _replicas("resnet20", (3, 8, 8), 10, width=4)
    params, buffers = stack_replicas(models)
    shared = {k: v[0] for k, v in buffers.items()}
    x, y = torch.randn(2, 4, 3, 8, 8), torch.randint(0, 10, (2, 4))

    def loss(p: dict, b: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return classification_loss(functional_call(models[0], (p, b), (xb,)), yb)

    with pytest.raises(RuntimeError):
        vmap(grad(loss), in_dims=(0, None, 0, 0))(params, shared, x, y)
    models[0].eval()  # eval mode reads the running statistics only: sharing them is fine
    out = vmap(grad(loss), in_dims=(0, None, 0, 0))(params, shared, x, y)
    assert out["fc.weight"].shape == (2, 10, 16)


def test_lstm_dropout_under_vmap_needs_randomness() -> None:
    models = _replicas("lstm_lm", (4,), 12, emb_size=4, hidden_size=4, dropout=0.3, batch_first=True)
    params, buffers = stack_replicas(models)
    x = torch.randint(0, 12, (2, 3, 4))
    with pytest.raises(RuntimeError):
        vmap_grad(models[0], params, buffers, x, x)
    grads, losses, _ = vmap_grad(models[0], params, buffers, x, x, randomness="different")
    assert losses.shape == (2,) and torch.isfinite(losses).all()
