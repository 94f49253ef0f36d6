"""Peer benchmark: one federated workload on coopsgd's simulator, Flower's simulation engine and a hand-written
PyTorch loop, side by side (issue 15: FedAvg; issue 26: FedProx, FedAvgM, FedAdam, FedYogi, SCAFFOLD; prints
tables, never asserts).

The workload, identical in all three:

* data: the bundled MNIST t10k split 8,000 / 2,000 (``load_dataset("mnist_bundled")``), flattened to 784
  features, split over N clients with coopsgd's Dirichlet label-skew partition (beta 0.5, seeded), so the
  clients hold different numbers of samples (at N = 1000: 1 to 26);
* model: an MLP 784-H-10 (H = 128 by default), the same initial parameters (seeded), float64 by default;
* FedAvg: R rounds; in round r the clients ``FedAvgSchedule.clients(r)`` (seeded, fraction c) each take E
  plain SGD steps (lr, batch B, cross-entropy) from the server model, and the server takes the average of
  their models weighted by their sample counts;
* batches: client i in round r draws its E x B sample indices from a permutation of its shard seeded by
  (seed, i, r), cycled when the shard has fewer than E x B samples (``round_indices``).

The three implementations:

* **coopsgd**: ``Simulator(presets.fedavg(N, E, fraction=c, sample_counts=...))`` driven step by step with one
  batch per active client (``None`` for the others); the model to evaluate is ``center_model()``.
* **Flower** (``flwr[simulation]``, the ``peers`` extra; best in its own environment): a ``ServerApp`` running
  ``flwr.serverapp.strategy.FedAvg`` whose ``configure_train`` sends the round to the nodes of exactly the
  clients above, and a ``ClientApp`` that trains on its node's partition (``node_config["partition-id"]``)
  with ``torch.optim.SGD`` and replies with its state dict and ``num-examples``; run by
  ``flwr.simulation.run_simulation`` on the Ray backend (Flower's only simulation backend in 1.2x-1.4x).
* **hand loop**: one ``nn.Module``; per sampled client ``load_state_dict(server)``, ``torch.optim.SGD`` for E
  steps, accumulate the weighted state dict; the server state is the sum.

Timed: training only. coopsgd: the step loop (the Simulator's construction is reported as "setup"). Flower:
``FedAvg.start`` inside the ServerApp (the rounds); reported separately: Ray and actor start-up plus a first
query to one node (which also loads the data in the actor), mapping the nodes to their partitions (by
registration order, which the simulation follows; the client checks it on every message; nodes registered in
the same microsecond would be queried), and the shutdown after the last round. The final models are compared: test loss and max |parameter difference|
against coopsgd's.

**Federated strategies** (issue 26 item 8; ``--strategies``, default ``fedavg``): FedProx, FedAvgM, FedAdam,
FedYogi and FedAdagrad run the same way on coopsgd's preset, the hand loop and Flower's strategy of that name
(``flwr.serverapp.strategy``; the strategy's own ``configure_train`` runs, so its bookkeeping is Flower's, and only
the messages go to the round's clients), with the settings of :data:`STRATEGIES` given to all three; SCAFFOLD runs
on coopsgd and the hand loop (Flower has no SCAFFOLD). The hand loop's update rules are :func:`run_hand`'s
docstring. How Flower 1.42's strategies define their updates, against coopsgd's presets:

* FedProx: the strategy only adds ``proximal-mu`` to the round's config; the client must add the term. The client
  here adds mu (x - x_server) to every local gradient (the gradient of (mu/2) ||x - x_server||^2, FedProx's eq. (2),
  coopsgd's definition). Flower's docstring example instead adds (mu/2) sum_tensors ||w - w_t|| -- the norm, not
  its square: its gradient (mu/2)(w - w_t)/||w - w_t|| per tensor is not FedProx's; a client written from it would
  not match (nor the paper).
* FedAvgM: pseudo-gradient x - avg; ``v = beta v + pg`` with v = pg in the first round (= v from 0);
  ``x - eta v``: coopsgd's rule. Flower's default momentum is 0 (plain FedAvg); here 0.9 on both.
* FedYogi, FedAdagrad: Delta = avg - x; m, v from 0; no bias correction; ``x + eta m / (sqrt(v) + tau)``:
  coopsgd's rule (Reddi et al., Algorithm 2). Flower's FedAdagrad fixes beta_1 = 0.
* FedAdam: as FedYogi with Adam's v, **but** Flower multiplies eta by sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)),
  t its 1-based round (:func:`flower_adam_eta`; Kingma & Ba's bias-corrected step size, evaluated one round
  late); coopsgd's preset and Reddi et al. have no such factor. The two cannot be made equal with beta1, beta2 > 0
  (beta1 = beta2 = 0 makes the factor 1 and Adam a sign-like step), so the final models differ by design: the
  script reports coopsgd against the hand loop with the paper's rule and Flower against the hand loop with
  Flower's step size (``Flower vs hand(Flower eta_t)``), i.e. that this factor is the only difference.
* Flower's FedAdam and FedAdagrad default to tau 1e-3 (the legacy ``flwr.server.strategy`` ones to 1e-9); the
  value is passed explicitly.

With ``--beta 0.1`` and N = 1000 coopsgd's Dirichlet partition refuses (8,000 samples: some clients get none);
the script then takes its first draw and gives each empty client one sample of the largest shard
(:func:`dirichlet_with_floor`; it says how many). Issue 26's run: ``flwr-venv/bin/python benchmarks/bench_peers.py
--strategies fedprox,fedavgm,fedadam,fedyogi,scaffold --configs 100:0.1,1000:0.1 --beta 0.1 --tol 1e-6``.

Usage: ``python benchmarks/bench_peers.py [--quick] [--configs 10:1.0,100:0.1,1000:0.01] [--rounds 20]
[--local-steps 5] [--batch 32] [--lr 0.05] [--reps 3] [--threads 1] [--strategies fedavg] [--no-flower]``. Flower is imported only
when it is used; without it the script says so and runs the other two. A separate environment, e.g.
``python -m venv flwr-venv && flwr-venv/bin/pip install torch==2.13.0 -e ".[peers]"`` (the ``peers`` extra is
``flwr[simulation]``; pin torch to the build you compare against), then ``flwr-venv/bin/python
benchmarks/bench_peers.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms import presets
from coopsgd.data.datasets import load_dataset
from coopsgd.data.partition import partition
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class Workload:
    clients: int
    fraction: float
    rounds: int
    local_steps: int
    batch: int
    lr: float
    hidden: int
    beta: float
    seed: int
    dtype: str
    threads: int


@dataclass
class Outcome:
    """One implementation's run: training time, extra phases, the final model's flat parameters."""

    train_s: float = float("nan")
    phases: dict[str, float] = field(default_factory=dict)
    params: Tensor | None = None
    test_loss: float = float("nan")
    error: str | None = None


class PeerUnavailable(Exception):
    """Flower cannot be imported or cannot run here (the message says what failed)."""


@dataclass(frozen=True)
class Strategy:
    """A federated strategy run the same way by coopsgd's preset, the hand loop and Flower's strategy.

    ``settings`` are the preset's keyword arguments (and the hand loop's and Flower's constants); ``flower`` the
    name of Flower's strategy class in ``flwr.serverapp.strategy`` (``None``: Flower has none)."""

    name: str
    settings: dict[str, float]
    flower: str | None
    note: str = ""


#: The strategies (issue 26 item 8) and their settings, given explicitly to coopsgd's preset, to the hand loop and
#: to Flower's strategy alike (so a change of a preset's default does not change the benchmark): FedProx mu 0.01
#: (the preset's); FedAvgM Hsu et al.'s eta 1, beta 0.9 (Flower's default momentum is 0); FedAdam and FedAdagrad
#: Flower's legacy strategies' eta 0.1, tau 1e-9 (``flwr.server.strategy``; its message-API strategies default to
#: tau 1e-3): the smallest tau, where rounding in the pseudo-gradient is amplified most; FedYogi Flower's eta 0.01,
#: betas (0.9, 0.99), tau 1e-3; SCAFFOLD eta_g 1.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("fedavg", {}, "FedAvg"),
    Strategy("fedprox", {"mu": 0.01}, "FedProx",
             "Flower's clients add the proximal term themselves: here mu (x - x_server) on every local gradient"),
    Strategy("fedavgm", {"outer_lr": 1.0, "outer_momentum": 0.9}, "FedAvgM"),
    Strategy("fedadam", {"outer_lr": 0.1, "outer_beta1": 0.9, "outer_beta2": 0.99, "outer_eps": 1e-9}, "FedAdam",
             "Flower's FedAdam scales eta by sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) (t = its 1-based round); "
             "coopsgd and Reddi et al. have no such factor"),
    Strategy("fedyogi", {"outer_lr": 0.01, "outer_beta1": 0.9, "outer_beta2": 0.99, "outer_eps": 1e-3}, "FedYogi"),
    Strategy("fedadagrad", {"outer_lr": 0.1, "outer_beta1": 0.0, "outer_eps": 1e-9}, "FedAdagrad"),
    Strategy("scaffold", {"outer_lr": 1.0}, None, "Flower has no SCAFFOLD strategy: coopsgd against the hand loop only"),
)}
SERVER_RULES = {"fedavgm": "momentum", "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}


# --------------------------------------------------------------------------------------------- the workload


def load_data(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bundled MNIST t10k, 8,000 train / 2,000 test, flattened to (n, 784) in ``dtype``."""
    train = load_dataset("mnist_bundled", split="train")
    test = load_dataset("mnist_bundled", split="test")
    return (train.x.reshape(len(train), -1).to(dtype), train.y,
            test.x.reshape(len(test), -1).to(dtype), test.y)


def client_shards(labels: Tensor, w: Workload) -> list[np.ndarray]:
    """coopsgd's Dirichlet label-skew partition; where it refuses (some clients left without a sample: at N = 1000,
    beta = 0.1 on 8,000 samples about 7% are), :func:`dirichlet_with_floor`."""
    try:
        return partition(labels, w.clients, "dirichlet", beta=w.beta, seed=w.seed)
    except ConfigError as exc:
        if exc.field != "beta" or w.clients > len(labels):
            raise
        return dirichlet_with_floor(labels, w)


def first_dirichlet_draw(labels: Tensor, w: Workload) -> list[np.ndarray]:
    """The first draw of coopsgd's Dirichlet partition, empty shards kept: for each class, proportions
    ~ Dir(beta 1_N) cut its permuted samples (the same generator calls as ``partition``)."""
    y = labels.numpy()
    rng = np.random.default_rng(w.seed)
    buckets: list[list[np.ndarray]] = [[] for _ in range(w.clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(w.clients, w.beta))
        cuts = np.round(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
        for i, piece in enumerate(np.split(idx, cuts)):
            buckets[i].append(piece)
    return [np.concatenate(b).astype(np.int64) for b in buckets]


def dirichlet_with_floor(labels: Tensor, w: Workload) -> list[np.ndarray]:
    """:func:`first_dirichlet_draw`, then every client left without a sample takes the last sample of the
    largest shard (clients in order)."""
    parts = first_dirichlet_draw(labels, w)
    for i in range(w.clients):
        if parts[i].size == 0:
            big = int(np.argmax([q.size for q in parts]))
            parts[i], parts[big] = parts[big][-1:], parts[big][:-1]
    return [np.sort(q) for q in parts]


def floored_clients(labels: Tensor, w: Workload) -> int:
    """How many clients :func:`client_shards` gave one sample from the largest shard (0: coopsgd's partition)."""
    try:
        partition(labels, w.clients, "dirichlet", beta=w.beta, seed=w.seed)
        return 0
    except ConfigError:
        return sum(q.size == 0 for q in first_dirichlet_draw(labels, w))


def round_indices(shard: np.ndarray, w: Workload, client: int, rnd: int) -> np.ndarray:
    """(E, B) sample indices of ``client`` in round ``rnd``: a seeded permutation of its shard, cycled."""
    perm = np.random.default_rng([w.seed, client, rnd]).permutation(len(shard))
    pos = np.arange(w.local_steps * w.batch) % len(shard)
    return shard[perm[pos]].reshape(w.local_steps, w.batch)


def make_mlp(hidden: int, dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)


def initial_model(w: Workload) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(w.seed)
        return make_mlp(w.hidden, DTYPES[w.dtype])


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def strategy_spec(w: Workload, shards: list[np.ndarray], strategy: Strategy | None = None) -> Any:
    """coopsgd's preset of ``strategy`` (FedAvg when ``None``) on the workload: its clients, sample counts, seed."""
    st = strategy or STRATEGIES["fedavg"]
    build = getattr(presets, st.name, None)
    if build is None:
        raise PeerUnavailable(f"coopsgd has no preset {st.name!r} in this version")
    sizes = [float(len(s)) for s in shards]
    return build(w.clients, w.local_steps, fraction=w.fraction, sample_counts=sizes, seed=w.seed, **st.settings)


def fedavg_spec(w: Workload, shards: list[np.ndarray]) -> Any:
    return strategy_spec(w, shards)


# --------------------------------------------------------------------------------------------- coopsgd


def run_coopsgd(w: Workload, data: tuple[Tensor, Tensor, Tensor, Tensor], shards: list[np.ndarray],
                init: nn.Module, executor: str, strategy: Strategy | None = None) -> Outcome:
    X, Y = data[0], data[1]
    spec = strategy_spec(w, shards, strategy)
    sched = spec.schedule
    t0 = time.perf_counter()
    sim = Simulator(spec, copy.deepcopy(init), executor=executor, dtype=DTYPES[w.dtype], seed=w.seed)
    setup = time.perf_counter() - t0
    n, E = w.clients, w.local_steps
    t0 = time.perf_counter()
    for r in range(w.rounds):
        mask = sched.active(r * E)
        chosen = range(n) if mask is None else np.flatnonzero(mask).tolist()
        idx = {i: torch.from_numpy(round_indices(shards[i], w, i, r)) for i in chosen}
        for e in range(E):
            batches: list[tuple[Tensor, Tensor] | None] = [None] * n
            for i in chosen:
                j = idx[i][e]
                batches[i] = (X[j], Y[j])
            sim.step(batches, w.lr)
    train_s = time.perf_counter() - t0
    return Outcome(train_s, {"setup": setup}, flat(sim.center_model()))


# --------------------------------------------------------------------------------------------- hand loop


def flower_adam_eta(eta: float, beta1: float, beta2: float, server_round: int) -> float:
    """Flower's FedAdam server step size in its round ``server_round`` (1-based): eta sqrt(1 - beta2^(t+1)) /
    (1 - beta1^(t+1)) with t = server_round (``flwr.serverapp.strategy.FedAdam.aggregate_train``)."""
    t = server_round + 1.0
    return float(eta * np.sqrt(1 - np.power(beta2, t)) / (1 - np.power(beta1, t)))


def run_hand(w: Workload, data: tuple[Tensor, Tensor, Tensor, Tensor], shards: list[np.ndarray],
             init: nn.Module, clients_of_round: Callable[[int], np.ndarray], strategy: Strategy | None = None,
             *, flower_adam: bool = False) -> Outcome:
    """The strategy written out: per sampled client ``load_state_dict(server)``, E ``torch.optim.SGD`` steps
    (FedProx: ``grad += mu (x - x_server)``; SCAFFOLD: ``grad += c - c_i``), the sample-count-weighted average
    ``avg`` of the client models, then the server's rule on it:

    * fedavg, fedprox: ``x <- avg``;
    * fedavgm: ``v <- beta v + (x - avg)``, ``x <- x - eta v`` (v from 0);
    * fedadam / fedyogi / fedadagrad: ``D = avg - x``, ``m <- b1 m + (1 - b1) D``, ``v <- b2 v + (1 - b2) D^2`` /
      ``v - (1 - b2) D^2 sign(v - D^2)`` / ``v + D^2``, ``x <- x + eta m / (sqrt(v) + tau)`` (m, v from 0);
      ``flower_adam``: FedAdam's eta replaced by Flower's :func:`flower_adam_eta` of the round;
    * scaffold (option II): ``c_i+ = c_i - c + (x - y_i) / (E lr)``, ``x <- x + eta_g (avg - x)``,
      ``c <- c + (1/N) sum_S (c_i+ - c_i)`` (c, c_i from 0).
    """
    st = strategy or STRATEGIES["fedavg"]
    cfg = st.settings
    X, Y = data[0], data[1]
    sizes = np.array([len(s) for s in shards], dtype=np.float64)
    mu = float(cfg.get("mu", 0.0))
    rule = SERVER_RULES.get(st.name)
    scaffold = st.name == "scaffold"
    eta = float(cfg.get("outer_lr", 1.0))
    t0 = time.perf_counter()
    model = copy.deepcopy(init)
    server = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    zeros = lambda: {k: torch.zeros_like(v) for k, v in server.items()}  # noqa: E731
    m1, m2 = zeros(), zeros()  # the server optimizer's moments (FedAvgM: m1 is its momentum buffer)
    c_server = zeros()
    c_client: dict[int, dict[str, Tensor]] = {}
    for r in range(w.rounds):
        chosen = clients_of_round(r)
        weights = sizes[chosen] / sizes[chosen].sum()
        acc = zeros()
        dc = zeros() if scaffold else {}
        for i, wt in zip(chosen.tolist(), weights.tolist(), strict=True):
            model.load_state_dict(server)
            opt = torch.optim.SGD(model.parameters(), lr=w.lr)
            ci = (c_client.get(i) or zeros()) if scaffold else {}
            for j in torch.from_numpy(round_indices(shards[i], w, i, r)):
                loss = F.cross_entropy(model(X[j]), Y[j])
                opt.zero_grad()
                loss.backward()
                if mu > 0.0 or scaffold:
                    with torch.no_grad():
                        for k, p in params.items():
                            g = cast(Tensor, p.grad)
                            if mu > 0.0:
                                g.add_(p - server[k], alpha=mu)
                            if scaffold:
                                g.sub_(ci[k]).add_(c_server[k])
                opt.step()
            y = model.state_dict()
            for k, v in y.items():
                acc[k].add_(v, alpha=wt)
            if scaffold:
                new_ci = {k: ci[k] - c_server[k] + (server[k] - y[k]) / (w.local_steps * w.lr) for k in server}
                for k in server:
                    dc[k].add_(new_ci[k] - ci[k])
                c_client[i] = new_ci
        if rule == "momentum":
            beta = float(cfg["outer_momentum"])
            for k in server:
                m1[k].mul_(beta).add_(server[k] - acc[k])
                acc[k] = server[k] - eta * m1[k]
        elif rule is not None:
            b1, eps = float(cfg["outer_beta1"]), float(cfg["outer_eps"])
            b2 = float(cfg.get("outer_beta2", 0.0))
            step = flower_adam_eta(eta, b1, b2, r + 1) if (flower_adam and rule == "adam") else eta
            for k in server:
                d = acc[k] - server[k]
                m1[k] = b1 * m1[k] + (1 - b1) * d
                if rule == "adam":
                    m2[k] = b2 * m2[k] + (1 - b2) * d**2
                elif rule == "yogi":
                    m2[k] = m2[k] - (1 - b2) * d**2 * torch.sign(m2[k] - d**2)
                else:
                    m2[k] = m2[k] + d**2
                acc[k] = server[k] + step * m1[k] / (torch.sqrt(m2[k]) + eps)
        elif scaffold:
            for k in server:
                if eta != 1.0:
                    acc[k] = server[k] + eta * (acc[k] - server[k])
                c_server[k].add_(dc[k], alpha=1.0 / w.clients)
        server = acc
    train_s = time.perf_counter() - t0
    model.load_state_dict(server)
    return Outcome(train_s, {}, flat(model))


# --------------------------------------------------------------------------------------------- Flower


def flower_version() -> str | None:
    try:
        import flwr
    except ImportError:
        return None
    return str(getattr(flwr, "__version__", "?"))


_CLIENT_CACHE: dict[str, Any] = {}  # filled only inside Flower's actors (never in the driver)


def flower_strategy_kwargs(w: Workload, strategy: Strategy) -> dict[str, Any]:
    """The keyword arguments of Flower's strategy class for ``strategy``: the same settings as the preset's."""
    cfg = strategy.settings
    kw: dict[str, Any] = {"fraction_train": w.fraction, "fraction_evaluate": 0.0, "min_train_nodes": 1,
                          "min_available_nodes": w.clients}
    if strategy.name == "fedprox":
        kw["proximal_mu"] = cfg["mu"]
    elif strategy.name == "fedavgm":
        kw.update(server_learning_rate=cfg["outer_lr"], server_momentum=cfg["outer_momentum"])
    elif strategy.name in ("fedadam", "fedyogi"):
        kw.update(eta=cfg["outer_lr"], eta_l=w.lr, beta_1=cfg["outer_beta1"], beta_2=cfg["outer_beta2"],
                  tau=cfg["outer_eps"])
    elif strategy.name == "fedadagrad":  # Flower's FedAdagrad fixes beta_1 = 0 (and has no beta_2)
        if cfg["outer_beta1"] != 0.0:
            raise PeerUnavailable("Flower's FedAdagrad has beta_1 = 0 fixed; the preset's outer_beta1 must be 0")
        kw.update(eta=cfg["outer_lr"], eta_l=w.lr, tau=cfg["outer_eps"])
    return kw


def run_flower(w: Workload, init: nn.Module, clients_of_round: Callable[[int], np.ndarray],
               actors: int, verbose: bool, strategy: Strategy | None = None) -> Outcome:
    """The workload on Flower's simulation engine. Raises PeerUnavailable with the reason if it cannot run."""
    st = strategy or STRATEGIES["fedavg"]
    if st.flower is None:
        raise PeerUnavailable(st.note or f"Flower has no {st.name} strategy")
    try:
        from flwr.app import (
            ArrayRecord,
            ConfigRecord,
            Context,
            Message,
            MessageType,
            MetricRecord,
            RecordDict,
        )
        from flwr.clientapp import ClientApp
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp import strategy as flower_strategies
        from flwr.simulation import run_simulation
    except ImportError as exc:
        ver = flower_version()
        if ver is None:
            raise PeerUnavailable(f"flwr is not installed in this environment ({exc}); install the 'peers' extra "
                                  "(pip install 'flwr[simulation]'), ideally in a separate venv") from None
        raise PeerUnavailable(f"flwr {ver} lacks the message API this benchmark uses (flwr.app, "
                              f"flwr.serverapp.strategy; flwr >= 1.21): {exc}") from None
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="flwr")

    N = w.clients
    wl = w  # captured by the client functions (a frozen dataclass of plain values: pickled to the actors)

    # -- client side: runs in Ray actors; it loads its own data once per actor ---------------------------
    def client_data() -> tuple[Tensor, Tensor, list[np.ndarray]]:
        key = f"{wl.clients}/{wl.beta}/{wl.seed}/{wl.dtype}"
        if _CLIENT_CACHE.get("key") != key:
            x, y, _, _ = load_data(DTYPES[wl.dtype])
            _CLIENT_CACHE.update(key=key, x=x, y=y, shards=client_shards(y, wl))
        torch.set_num_threads(wl.threads)
        return _CLIENT_CACHE["x"], _CLIENT_CACHE["y"], _CLIENT_CACHE["shards"]

    client_app = ClientApp()

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        client_data()
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        x, y, shards = client_data()
        pid = int(context.node_config["partition-id"])
        cfg = msg.content.config_records["config"]
        cid = int(cast(int, cfg["client-id"]))
        if cid != pid:
            raise RuntimeError(f"the node of partition {pid} was sent client {cid}: the node mapping is wrong")
        rnd = int(cast(int, cfg["server-round"])) - 1
        mu = float(cast(float, cfg["proximal-mu"])) if "proximal-mu" in cfg else 0.0  # sent by Flower's FedProx
        model = make_mlp(wl.hidden, DTYPES[wl.dtype])
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        anchor = [p.detach().clone() for p in model.parameters()] if mu > 0.0 else []
        opt = torch.optim.SGD(model.parameters(), lr=wl.lr)
        for j in torch.from_numpy(round_indices(shards[pid], wl, pid, rnd)):
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            if mu > 0.0:  # FedProx's proximal term, (mu/2) ||x - x_server||^2: its gradient mu (x - x_server)
                with torch.no_grad():
                    for p, a in zip(model.parameters(), anchor, strict=True):
                        cast(Tensor, p.grad).add_(p - a, alpha=mu)
            opt.step()
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                            "metrics": MetricRecord({"num-examples": len(shards[pid])})})
        return Message(reply, reply_to=msg)

    # -- server side: a thread of this process -------------------------------------------------------------
    base = getattr(flower_strategies, st.flower, None)
    if base is None:
        raise PeerUnavailable(f"this flwr has no flwr.serverapp.strategy.{st.flower}")

    class Sampled(base):  # type: ignore[misc,valid-type]
        """Flower's strategy with the round's clients given (the same seeded sample as coopsgd's schedule).

        The strategy's own ``configure_train`` runs (its bookkeeping: FedOpt's and FedAvgM's copy of the server
        arrays, FedProx's ``proximal-mu``); only the messages go to the nodes of the round's clients."""

        def __init__(self, node_of: dict[int, int]) -> None:
            super().__init__(**flower_strategy_kwargs(w, st))
            self.node_of = node_of
            self.expected = 0

        def _construct_messages(self, record: Any, node_ids: list[int], message_type: str) -> list[Any]:
            if message_type != MessageType.TRAIN:
                return cast(list[Any], super()._construct_messages(record, node_ids, message_type))
            config = record[self.configrecord_key]
            chosen = clients_of_round(int(config["server-round"]) - 1)
            self.expected = len(chosen)
            return [Message(content=RecordDict({self.arrayrecord_key: record[self.arrayrecord_key],
                                                self.configrecord_key: ConfigRecord({**config, "client-id": int(i)})}),
                            message_type=MessageType.TRAIN, dst_node_id=self.node_of[int(i)])
                    for i in chosen]

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            bad = [m for m in replies if m.has_error()]
            if bad or len(replies) != self.expected:
                reason = bad[0].error.reason if bad else "missing replies"
                raise RuntimeError(f"Flower round {server_round}: {len(replies) - len(bad)} of {self.expected} "
                                   f"clients replied, {len(bad)} errors; first: {reason}")
            return super().aggregate_train(server_round, replies)

    out: dict[str, Any] = {}
    abort = threading.Event()  # set when run_simulation fails: the ServerApp thread's own waits stop
    init_state = {k: v.detach().clone() for k, v in init.state_dict().items()}
    server_app = ServerApp()

    def ask(grid: Grid, nodes: list[int]) -> list[Any]:
        msgs = [Message(content=RecordDict({"config": ConfigRecord({"ask": "partition-id"})}),
                        message_type=MessageType.QUERY, dst_node_id=nid) for nid in nodes]
        # push and poll here (not send_and_receive) so that a crashed runtime (abort) ends this thread at once
        waiting = set(grid.push_messages(msgs))
        replies: list[Any] = []
        deadline = time.monotonic() + 900
        while waiting and not abort.is_set() and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(waiting)))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(0.01)
        bad = [m for m in replies if m.has_error()]
        if bad or len(replies) != len(nodes):
            reason = bad[0].error.reason if bad else "missing replies"
            raise RuntimeError(f"Flower query: {len(replies) - len(bad)} of {len(nodes)} nodes replied; "
                               f"first error: {reason}")
        return replies

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 600
        while len(infos := list(grid.get_nodes())) < N:
            if time.monotonic() > deadline or abort.is_set():
                raise RuntimeError(f"Flower: only {len(infos)} of {N} nodes registered after 600 s")
            time.sleep(0.01)
        # The simulation creates node i for partition i, in order: map by registration time (the client checks
        # the mapping on every message); nodes registered in the same microsecond are asked for their partition.
        groups: dict[datetime.datetime, list[int]] = {}
        for info in infos:
            groups.setdefault(datetime.datetime.fromisoformat(info.registered_at), []).append(int(info.node_id))
        ordered = [ids for _, ids in sorted(groups.items())]
        first = ask(grid, [ordered[0][0]])  # waits for Ray, the actors and the actor's data
        out["t_first"] = time.perf_counter()
        node_of: dict[int, int] = {}
        tied: list[int] = []
        pos = 0
        for ids in ordered:
            if len(ids) == 1:
                node_of[pos] = ids[0]
            else:
                tied += ids
            pos += len(ids)
        for m in first + (ask(grid, tied) if tied else []):
            node_of[int(m.content["metrics"]["partition-id"])] = m.metadata.src_node_id
        if sorted(node_of) != list(range(N)) or len(set(node_of.values())) != N:
            raise RuntimeError(f"Flower: could not map the {N} nodes to partitions 0..{N - 1}")
        out["tied"] = len(tied)
        out["t_mapped"] = time.perf_counter()
        flower = Sampled(node_of)
        arrays = ArrayRecord(init_state)
        t0 = time.perf_counter()
        result = flower.start(grid, arrays, num_rounds=w.rounds, timeout=900,
                                train_config=ConfigRecord({"lr": w.lr}))
        out["train_s"] = time.perf_counter() - t0
        out["t_trained"] = time.perf_counter()
        out["state"] = result.arrays.to_torch_state_dict()

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no accelerators here; silences Ray's notice
    cpus = os.cpu_count() or 1
    backend_config: Any = {"client_resources": {"num_cpus": max(1, cpus // actors), "num_gpus": 0.0},
                           "init_args": {"num_cpus": cpus, "logging_level": "ERROR" if not verbose else "INFO"}}
    t_call = time.perf_counter()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=N,
                       backend_name="ray", backend_config=backend_config, verbose_logging=verbose)
    except (Exception, SystemExit) as exc:  # flwr exits through sys.exit on some failures
        abort.set()
        chain: list[BaseException] = []
        cause: BaseException | None = exc
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        detail = " <- ".join("".join(traceback.format_exception_only(type(c), c)).strip() for c in chain)
        raise PeerUnavailable(f"Flower's run_simulation failed: {detail}") from None
    t_end = time.perf_counter()
    if "state" not in out:
        raise PeerUnavailable("Flower's run_simulation returned without finishing the rounds (see its log above; "
                              "--flower-verbose shows more)")
    model = make_mlp(w.hidden, DTYPES[w.dtype])
    model.load_state_dict(out["state"])
    phases = {
        "startup": out["t_first"] - t_call,  # Ray + actor start-up, data in the actor, one query
        "mapping": out["t_mapped"] - out["t_first"],  # node -> partition map (queries only tied nodes)
        "shutdown": t_end - out["t_trained"],
        "total": t_end - t_call,
        "tied_nodes": float(out["tied"]),
    }
    return Outcome(out["train_s"], phases, flat(model))


# --------------------------------------------------------------------------------------------- main


def fmt(x: float, spec: str = ".3f") -> str:
    return "n/a" if x != x else format(x, spec)


def parse_strategies(text: str) -> list[Strategy]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in STRATEGIES]
    if bad or not names:
        raise ValueError(f"--strategies: {','.join(bad) or repr(text)} is not one of {', '.join(STRATEGIES)}")
    return [STRATEGIES[t] for t in dict.fromkeys(names)]


def max_diff(a: Tensor | None, b: Tensor | None) -> float:
    return float("nan") if a is None or b is None else float((a - b).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--configs", default="10:1.0,100:0.1,1000:0.01",
                    help="comma-separated N:fraction pairs (clients, FedAvg fraction)")
    ap.add_argument("--strategies", default="fedavg",
                    help=f"comma-separated strategies among {', '.join(STRATEGIES)} (issue 26: "
                         "fedprox,fedavgm,fedadam,fedyogi,scaffold)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=5, help="E, local SGD steps per round")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--hidden", type=int, default=128, help="MLP 784-hidden-10")
    ap.add_argument("--beta", type=float, default=0.5, help="Dirichlet label-skew concentration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the coopsgd and hand-loop runs (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in this process and in Flower's actors")
    ap.add_argument("--executor", choices=("loop", "vmap", "auto"), default="loop", help="coopsgd's executor")
    ap.add_argument("--flower-actors", type=int, default=1,
                    help="Ray actors running Flower's clients (client_resources.num_cpus = cpus // actors)")
    ap.add_argument("--no-flower", action="store_true", help="skip Flower")
    ap.add_argument("--flower-verbose", action="store_true", help="keep Flower's and Ray's logs")
    ap.add_argument("--tol", type=float, default=1e-9, help="tolerance reported for the final models' agreement")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 repetition")
    args = ap.parse_args()
    configs: list[tuple[int, float]] = []
    for item in args.configs.split(","):
        try:
            n_s, c_s = item.split(":")
            n, c = int(n_s), float(c_s)
        except ValueError:
            ap.error(f"--configs: {item!r} is not N:fraction (e.g. 100:0.1)")
        if n < 1 or not 0.0 < c <= 1.0:
            ap.error(f"--configs: {item!r} needs N >= 1 and 0 < fraction <= 1")
        configs.append((n, c))
    try:
        strategies = parse_strategies(args.strategies)
    except ValueError as exc:
        ap.error(str(exc))
    for name in ("rounds", "local_steps", "batch", "reps", "threads", "hidden", "flower_actors"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if args.quick:
        args.rounds, args.reps = 3, 1
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    fl_ver = flower_version()
    fl_note = "not installed" if fl_ver is None else fl_ver
    if args.no_flower:
        fl_note += " (skipped: --no-flower)"
    print(f"# bench_peers: {','.join(s.name for s in strategies)}, MLP 784-{args.hidden}-10, {args.dtype}, "
          f"R = {args.rounds} rounds, E = {args.local_steps}, B = {args.batch}, lr = {args.lr}, Dirichlet beta = "
          f"{args.beta}; torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cpus, "
          f"{platform.machine()}, flwr {fl_note}, coopsgd executor {args.executor}", flush=True)
    for st in strategies:
        if st.settings or st.note:
            print(f"# {st.name}: {st.settings}" + (f"; {st.note}" if st.note else ""), flush=True)
    if fl_ver is None and not args.no_flower:
        print("# Flower: flwr is not importable here: the Flower columns stay empty. Install the 'peers' extra "
              "(pip install 'flwr[simulation]'), ideally in a separate venv, and run this script with its python.",
              flush=True)

    data = load_data(dtype)
    xt, yt = data[2], data[3]
    # Warm-up (untimed in the tables): one-round runs of the first configuration, so that one-time costs of a
    # fresh process (lazy imports, first autograd calls; coopsgd's first FLOP count imports torch._dynamo) do
    # not land in the first measured configuration. Reported here.
    n0, c0 = configs[0]
    w0 = Workload(n0, c0, 1, args.local_steps, args.batch, args.lr, args.hidden, args.beta, args.seed, args.dtype,
                  args.threads)
    shards0, init0 = client_shards(data[1], w0), initial_model(w0)
    sched0 = fedavg_spec(w0, shards0).schedule
    t0 = time.perf_counter()
    run_coopsgd(w0, data, shards0, init0, args.executor, strategies[0])
    warm_coop = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_hand(w0, data, shards0, init0, lambda r: np.asarray(sched0.clients(r), dtype=np.int64), strategies[0])
    warm_hand = time.perf_counter() - t0
    print(f"# warm-up (first run in this process, 1 round of N = {n0}, untimed below): coopsgd {warm_coop:.2f} s "
          f"(construction included), hand loop {warm_hand:.2f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for st in strategies:
        for n, c in configs:
            w = Workload(n, c, args.rounds, args.local_steps, args.batch, args.lr, args.hidden, args.beta,
                         args.seed, args.dtype, args.threads)
            shards = client_shards(data[1], w)
            floored = floored_clients(data[1], w)
            if floored and st is strategies[0]:
                print(f"# N = {n}, beta = {w.beta}: coopsgd's Dirichlet partition leaves clients without samples; "
                      f"its first draw is used, and its {floored} empty clients took one sample each from the "
                      "largest shard", flush=True)
            init = initial_model(w)
            sched = strategy_spec(w, shards, st).schedule

            def clients_of_round(r: int, sched: Any = sched) -> np.ndarray:
                return np.asarray(sched.clients(r), dtype=np.int64)

            coop_runs, hand_runs = [], []
            for _ in range(args.reps):  # interleaved, so that load changes hit both
                coop_runs.append(run_coopsgd(w, data, shards, init, args.executor, st))
                hand_runs.append(run_hand(w, data, shards, init, clients_of_round, st))
            coop = coop_runs[-1]
            coop.train_s = statistics.median(o.train_s for o in coop_runs)
            coop.phases["setup"] = statistics.median(o.phases["setup"] for o in coop_runs)
            hand = hand_runs[-1]
            hand.train_s = statistics.median(o.train_s for o in hand_runs)
            # Flower's FedAdam has its own step size (flower_adam_eta): the hand loop with it is Flower's reference
            hand_fl = (run_hand(w, data, shards, init, clients_of_round, st, flower_adam=True)
                       if st.name == "fedadam" else None)
            flower = Outcome()
            if st.flower is None:
                flower.error = st.note or f"Flower has no {st.name} strategy"
            elif args.no_flower:
                flower.error = "skipped (--no-flower)"
            elif fl_ver is None:
                flower.error = "flwr not installed"
            else:
                try:
                    flower = run_flower(w, init, clients_of_round, args.flower_actors, args.flower_verbose, st)
                except PeerUnavailable as exc:
                    flower.error = str(exc)
                    print(f"# Flower {st.name} N = {n}: FAILED: {exc}", flush=True)
            for o in (coop, hand, flower) + ((hand_fl,) if hand_fl is not None else ()):
                if o.params is not None:
                    model = make_mlp(w.hidden, dtype)
                    torch.nn.utils.vector_to_parameters(o.params, model.parameters())
                    o.test_loss = test_loss(model, xt, yt)
            row = {"strategy": st.name, "n": n, "c": c, "k": len(clients_of_round(0)), "coop": coop, "hand": hand,
                   "flower": flower, "hand_fl": hand_fl,
                   "sizes": (min(len(s) for s in shards), max(len(s) for s in shards))}
            rows.append(row)
            print(f"# {st.name} N = {n}: coopsgd {coop.train_s:.3f} s, hand loop {hand.train_s:.3f} s, Flower "
                  f"{fmt(flower.train_s)} s" + (f" ({flower.error})" if flower.error else "")
                  + (f", {flower.phases['tied_nodes']:.0f} nodes queried for their partition"
                     if flower.phases else "")
                  + f"; max|dθ| to coopsgd: hand {max_diff(hand.params, coop.params):.2e}, Flower "
                  f"{fmt(max_diff(flower.params, coop.params), '.2e')}"
                  + (f", Flower to hand(Flower eta_t) {max_diff(flower.params, hand_fl.params):.2e}"
                     if hand_fl is not None and flower.params is not None else ""), flush=True)

    print()
    print("Training time (s; coopsgd and hand loop: median of "
          f"{args.reps}; Flower: one run) and ratios to coopsgd")
    print(f"{'strategy':>10} {'N':>5} {'c':>5} {'k':>3} {'samples':>8} {'coopsgd':>8} {'hand loop':>9} {'Flower':>8} "
          f"{'Flower/coopsgd':>14} {'hand/coopsgd':>12} | {'coopsgd setup':>13} {'Flower startup':>14} "
          f"{'mapping':>8} {'shutdown':>8} {'Flower total':>12}")
    for r in rows:
        co, ha, fl = r["coop"], r["hand"], r["flower"]
        ph = fl.phases
        print(f"{r['strategy']:>10} {r['n']:>5} {r['c']:>5.2f} {r['k']:>3} {r['sizes'][0]:>3}-{r['sizes'][1]:<4} "
              f"{co.train_s:>8.3f} {ha.train_s:>9.3f} {fmt(fl.train_s):>8} "
              f"{fmt(fl.train_s / co.train_s, '.1f') + 'x':>14} "
              f"{ha.train_s / co.train_s:>11.2f}x | {co.phases['setup']:>13.3f} "
              f"{fmt(ph.get('startup', float('nan')), '.2f'):>14} {fmt(ph.get('mapping', float('nan')), '.2f'):>8} "
              f"{fmt(ph.get('shutdown', float('nan')), '.2f'):>8} {fmt(ph.get('total', float('nan')), '.2f'):>12}")
    print()
    print(f"Final model (server) agreement with coopsgd ({args.dtype}; tolerance {args.tol:g}; fedadam: Flower is "
          "also compared with the hand loop using Flower's step size, 'Flower vs hand(Flower eta_t)')")
    print(f"{'strategy':>10} {'N':>5} {'coopsgd test loss':>18} {'hand loop':>18} {'Flower':>18} "
          f"{'max|dθ| hand':>12} {'max|dθ| Flower':>14} {'Flower vs hand(Flower eta_t)':>28}")
    worst = 0.0
    for r in rows:
        co, ha, fl, hf = r["coop"], r["hand"], r["flower"], r["hand_fl"]
        dp_hand, dp_fl = max_diff(ha.params, co.params), max_diff(fl.params, co.params)
        dp_hf = max_diff(fl.params, hf.params) if hf is not None else float("nan")
        checked = [dp_hand, abs(ha.test_loss - co.test_loss)]
        checked += [dp_hf] if hf is not None else [dp_fl, abs(fl.test_loss - co.test_loss)]
        worst = max([worst, *[v for v in checked if v == v]])
        print(f"{r['strategy']:>10} {r['n']:>5} {co.test_loss:>18.15f} {ha.test_loss:>18.15f} "
              f"{fmt(fl.test_loss, '18.15f'):>18} {dp_hand:>12.2e} {fmt(dp_fl, '.2e'):>14} {fmt(dp_hf, '.2e'):>28}")
    verdict = "within" if worst <= args.tol else "EXCEEDS"
    print(f"# largest difference where the definitions agree {worst:.2e}: {verdict} the tolerance {args.tol:g}")
    for st in strategies:
        ratios = [r["flower"].train_s / r["coop"].train_s for r in rows if r["strategy"] == st.name]
        ratios = [x for x in ratios if x == x]
        if ratios:
            met = "met" if min(ratios) >= 10.0 else "NOT met"
            print(f"# {st.name}: Flower / coopsgd training time {', '.join(f'{x:.1f}x' for x in ratios)} "
                  f"(N = {', '.join(str(r['n']) for r in rows if r['strategy'] == st.name)}): >= 10x {met}")
    failed = [(r["strategy"], r["n"], r["flower"].error) for r in rows
              if r["flower"].error and STRATEGIES[r["strategy"]].flower is not None and not args.no_flower
              and fl_ver is not None]
    for name, n, err in failed:
        print(f"# Flower {name} N = {n}: {err}")
    for st in strategies:
        if st.flower is None:
            print(f"# {st.name}: {st.note}")
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if failed and stuck:  # a failed simulation can leave its ServerApp thread waiting on a Flower timeout
        print(f"# exiting without waiting for {len(stuck)} thread(s) the failed Flower run left behind", flush=True)
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
