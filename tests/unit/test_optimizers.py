"""Inner optimizers on stacked rows (issue 16, item 1): Adam / AdamW / any torch.optim class.

float64 throughout. The ground truth is m separate modules, each with its own ``torch.optim`` instance,
averaged by hand every tau steps (local SGD); the optimizer-state policies are applied to the torch
instances by hand too (``reset``: a fresh state; ``mix``: moments averaged, step counts kept).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.spec import Policies
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError

D_IN, D_OUT, N, B = 4, 2, 48, 6
TOL = 1e-12


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    Y = A @ torch.randn(D_IN, D_OUT, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        N, D_OUT, generator=g, dtype=torch.float64)
    return A, Y


def _batch(data: tuple[torch.Tensor, torch.Tensor], worker: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.from_numpy(np.random.default_rng([7, worker, k]).choice(N, size=B, replace=False))
    return data[0][idx], data[1][idx]


def _model() -> nn.Module:
    return nn.Linear(D_IN, D_OUT)  # weight and bias: the flat row spans two parameters


def _sim(spec: Any, **kw: Any) -> Simulator:
    return Simulator(spec, _model, loss_fn=F.mse_loss, dtype=torch.float64, executor="loop", seed=3, **kw)


def _flat(mod: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in mod.parameters()])


def _by_hand(x0: torch.Tensor, m: int, tau: int, steps: int, cls: type, policy: str, data: Any,
             **opt: Any) -> list[torch.Tensor]:
    """Local SGD with one torch optimizer per worker; the workers' rows after every step."""
    models = []
    for _ in range(m):
        mod = _model().double()
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(x0.clone(), mod.parameters())
        models.append(mod)
    opts = [cls(mod.parameters(), **opt) for mod in models]
    out = []
    for k in range(steps):
        for i in range(m):
            x, y = _batch(data, i, k)
            opts[i].zero_grad()
            F.mse_loss(models[i](x), y).backward()
            opts[i].step()
        if (k + 1) % tau == 0:
            with torch.no_grad():
                for ps in zip(*(list(mod.parameters()) for mod in models), strict=True):
                    mean = torch.stack(list(ps)).mean(0)
                    for p in ps:
                        p.copy_(mean)
                    states = [o.state[p] for o, p in zip(opts, ps, strict=True)]
                    if policy == "reset":
                        for o, p in zip(opts, ps, strict=True):
                            o.state.pop(p, None)
                    elif policy == "mix":
                        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                            if key in states[0]:
                                avg = torch.stack([s[key] for s in states]).mean(0)
                                for s in states:
                                    s[key].copy_(avg)
        out.append(torch.stack([_flat(mod) for mod in models]))
    return out


def _run(sim: Simulator, data: Any, steps: int, lr: float) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        k = sim.step_count
        mask = sim.spec.schedule.active(k)
        sim.step([_batch(data, i, k) if mask is None or mask[i] else None for i in range(sim.m)], lr)
        out.append(sim.params[: sim.m].clone())
    return out


@pytest.mark.parametrize("policy", ["local", "reset", "mix"])
def test_adamw_equals_independent_torch_adamw_between_rounds(policy: str) -> None:
    m, tau, K, lr = 3, 3, 10, 0.01
    data = _data()
    spec = presets.local_sgd(m, tau, policies=Policies(optimizer_state=policy))  # type: ignore[arg-type]
    sim = _sim(spec, optimizer="adamw")
    assert sim.opts.weight_decay == 0.01  # torch's AdamW default when none is given
    x0 = sim.params[0].clone()
    got = _run(sim, data, K, lr)
    want = _by_hand(x0, m, tau, K, torch.optim.AdamW, policy, data, lr=lr)
    for k in range(K):  # every step: the iterates just before a round, and right after its averaging
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=0, atol=TOL, err_msg=f"step {k}")
    assert not torch.allclose(got[tau - 2][0], got[tau - 2][1])  # the workers did drift apart between rounds
    steps = sim.optimizer_steps.tolist()
    assert steps == ([K] * m if policy != "reset" else [K % tau] * m)
    st = sim.optimizer_state
    assert set(st) == {"exp_avg", "exp_avg_sq"} and bool(torch.all(st["exp_avg_sq"][:m] >= 0))


@pytest.mark.parametrize("opt", [
    {"optimizer": "adam", "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
    {"optimizer": "adamw", "amsgrad": True, "weight_decay": 0.1},
    {"optimizer": "adam"},
])
def test_adam_variants_equal_torch(opt: dict[str, Any]) -> None:
    m, tau, K, lr = 2, 2, 7, 0.02
    data = _data(1)
    sim = _sim(presets.local_sgd(m, tau), **opt)
    x0 = sim.params[0].clone()
    got = _run(sim, data, K, lr)
    cls = torch.optim.AdamW if opt["optimizer"] == "adamw" else torch.optim.Adam
    torch_opt = {k: v for k, v in opt.items() if k != "optimizer"}
    want = _by_hand(x0, m, tau, K, cls, "local", data, lr=lr, **torch_opt)
    np.testing.assert_allclose(got[-1].numpy(), want[-1].numpy(), rtol=0, atol=TOL)


def test_pre_mix_rule_applies_the_adam_increment_after_the_round() -> None:
    """EASGD (pre_mix) with AdamW: equal to computing each worker's increment first, then mixing, then adding."""
    m, lr = 3, 0.05
    data = _data(2)
    sim = _sim(presets.easgd(m, 1, alpha=0.2), optimizer="adamw")
    ref = _sim(presets.local_sgd(m, 1000), optimizer="adamw")  # same start, no round: the plain AdamW step
    X0 = sim.params.clone()
    _run(ref, data, 1, lr)
    _run(sim, data, 1, lr)
    inc = ref.params[:m] - X0[:m]
    S = torch.tensor(presets.easgd(m, 1, alpha=0.2).schedule.mix(0).matrix)  # a copy: S is read-only
    expected = S.T @ X0
    expected[:m] += inc
    np.testing.assert_allclose(sim.params.numpy(), expected.numpy(), rtol=0, atol=TOL)


def test_torch_optimizer_class_equals_built_in_adamw_with_inactive_workers() -> None:
    """FedAvg with half the clients per round: per-worker step counts differ (the vectorised bias correction)."""
    m, tau, K, lr = 4, 2, 8, 0.01
    data = _data(3)
    a = _sim(presets.fedavg(m, tau, fraction=0.5, seed=1), optimizer="adamw")
    b = _sim(presets.fedavg(m, tau, fraction=0.5, seed=1), optimizer=torch.optim.AdamW,
             optimizer_kwargs={"weight_decay": 0.01})
    ga, gb = _run(a, data, K, lr), _run(b, data, K, lr)
    np.testing.assert_allclose(ga[-1].numpy(), gb[-1].numpy(), rtol=0, atol=TOL)
    assert len(set(a.optimizer_steps.tolist())) > 1  # some clients sat out some rounds
    assert a.optimizer_steps.tolist() == b.optimizer_steps.tolist()
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(a.optimizer_state[name].numpy(), b.optimizer_state[name].numpy(), rtol=0, atol=TOL)


def test_torch_optimizer_class_equals_torch_rmsprop() -> None:
    m, tau, K, lr = 2, 3, 7, 0.01
    data = _data(4)
    sim = _sim(presets.local_sgd(m, tau), optimizer=torch.optim.RMSprop, optimizer_kwargs={"alpha": 0.9})
    assert sim.opts.fields == ("square_avg",)
    x0 = sim.params[0].clone()
    got = _run(sim, data, K, lr)
    want = _by_hand(x0, m, tau, K, torch.optim.RMSprop, "local", data, lr=lr, alpha=0.9)
    np.testing.assert_allclose(got[-1].numpy(), want[-1].numpy(), rtol=0, atol=TOL)


@pytest.mark.parametrize("opt", [{"optimizer": "adamw"}, {"optimizer": "adam", "amsgrad": True},
                                 {"optimizer": torch.optim.RMSprop}])
def test_resume_is_exact(opt: dict[str, Any]) -> None:
    m, tau, K, cut, lr = 3, 2, 9, 5, 0.01
    data = _data(5)

    def make() -> Simulator:
        return _sim(presets.local_sgd(m, tau, policies=Policies(optimizer_state="mix")), **opt)

    full = make()
    _run(full, data, K, lr)
    first = make()
    _run(first, data, cut, lr)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make()
    second.load_state_dict(torch.load(buf, weights_only=True))
    _run(second, data, K - cut, lr)
    assert torch.equal(full._state, second._state)
    assert torch.equal(full.optimizer_steps, second.optimizer_steps)


def test_checkpoint_of_another_optimizer_is_refused() -> None:
    sgd = _sim(presets.local_sgd(2, 2), momentum=0.9)
    adam = _sim(presets.local_sgd(2, 2), optimizer="adam")
    with pytest.raises(ConfigError, match="state_dict"):
        adam.load_state_dict(sgd.state_dict())


def test_sgd_checkpoint_layout_is_unchanged() -> None:
    sim = _sim(presets.local_sgd(2, 2), momentum=0.5)
    payload = sim.state_dict()["payload"]
    assert not {"optimizer_steps", "optimizer_extras", "outer_state"} & set(payload)
    assert sim.momentum is not None and list(sim.optimizer_state) == ["momentum_buffer"]


@pytest.mark.parametrize("kw,field", [
    ({"optimizer": "lion"}, "optimizer"),
    ({"optimizer": "adam", "momentum": 0.9}, "momentum"),
    ({"optimizer": "adam", "betas": (0.9, 1.0)}, "beta2"),
    ({"optimizer": "adamw", "eps": 0.0}, "eps"),
    ({"optimizer": "sgd", "amsgrad": True}, "amsgrad"),
    ({"optimizer": torch.optim.LBFGS}, "optimizer"),
    ({"optimizer": torch.optim.Adam, "optimizer_kwargs": {"lr": 0.1}}, "optimizer_kwargs.lr"),
    ({"optimizer": "adam", "optimizer_kwargs": {"foo": 1}}, "optimizer_kwargs"),
])
def test_bad_optimizer_settings_name_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        _sim(presets.local_sgd(2, 2), **kw)
    assert info.value.field == field


def test_config_takes_the_optimizer() -> None:
    from coopsgd.engines.optim import OPTIMIZERS
    from coopsgd.train import RunConfig
    from coopsgd.train import config as config_module

    assert config_module.OPTIMIZERS == OPTIMIZERS
    o = RunConfig(optimizer="adamw", beta1=0.8, eps=1e-6).optimizer  # passed whole to the engines
    assert o.name == "adamw" and o.betas == (0.8, 0.999) and o.eps == 1e-6 and o.weight_decay is None
    for bad, field in (({"optimizer": "lion"}, "optimizer"), ({"optimizer": "adam", "momentum": 0.9}, "momentum"),
                       ({"beta2": 1.0}, "beta2"), ({"optimizer": "sgd", "amsgrad": True}, "amsgrad")):
        with pytest.raises(ConfigError) as info:
            RunConfig(**bad)
        assert info.value.field == field


def test_dropped_round_restores_adam_moments_and_step_counts() -> None:
    """nan_policy="skip": a round in which a worker went non-finite is dropped with its optimizer state."""
    m, lr = 2, 0.01
    data = _data(6)
    sim = _sim(presets.local_sgd(m, 2), optimizer="adamw", nan_policy="skip")
    _run(sim, data, 2, lr)
    assert sim.check_health() is None  # a good round: the state after it is kept
    good = (sim._state.clone(), sim.optimizer_steps.clone())
    x, y = _batch(data, 0, 2)
    sim.step([(torch.full_like(x, float("nan")), y), _batch(data, 1, 2)], lr)
    sim.step([_batch(data, 0, 3), _batch(data, 1, 3)], lr)
    dropped = sim.check_health()
    assert dropped is not None and dropped.workers == [0]
    assert torch.equal(sim._state, good[0]) and torch.equal(sim.optimizer_steps, good[1])
    assert sim.optimizer_steps.tolist() == [2, 2]
