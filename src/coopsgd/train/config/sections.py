"""The sections of a run configuration: typed, frozen, each setting declared once with its help, choices
and range (:func:`coopsgd.settings.setting`).

The inner optimizer's section is :class:`coopsgd.algorithms.inner.OptimizerSettings` (it travels whole to
the engines and the checkpoint). Checks that span two sections (``downpour_order`` and the engine; float
settings and the dtype) are :class:`coopsgd.train.config.RunConfig`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coopsgd.algorithms.presets import PRESETS
from coopsgd.algorithms.registry import declaration, takers
from coopsgd.catalog import DATASETS, MODELS
from coopsgd.errors import ConfigError
from coopsgd.objectives import OBJECTIVES
from coopsgd.settings import check_section, setting, settings_of

__all__ = [
    "ProblemSettings", "AlgorithmSettings", "ScheduleSettings", "EvaluationSettings", "ClockSettings",
    "ExecutionSettings", "OutputSettings", "ENGINES", "DTYPES", "EXECUTORS", "PARTITIONS", "LOSS_ESTIMATES",
    "COMPUTE_MODELS", "MAX_TIMEOUT_S", "DEFAULT_LR", "check_device",
]

ENGINES = ("reference", "simulate", "distributed")
DTYPES = ("float32", "float64")
EXECUTORS = ("auto", "loop", "vmap")
PARTITIONS = ("iid", "dirichlet", "shards")
LOSS_ESTIMATES = ("running_mean", "batch", "probe")
COMPUTE_MODELS = ("flops", "measured", "constant", "exponential", "lognormal", "pareto")
#: The longest communication timeout accepted (a week): torch's timers overflow far above it.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: Largest ``epochs``: with up to ~10^9 samples per epoch the step count stays far inside int64.
MAX_EPOCHS = 1e9
#: Largest simulated per-step time (``compute_ms``, ``net_latency_ms``): a year, in milliseconds.
MAX_SIMULATED_MS = 365.25 * 24 * 3600 * 1e3
#: Smallest simulated rate (``compute_gflops`` in GFLOP/s, ``net_bandwidth_mbps`` in Mbit/s): beyond it a
#: step's simulated time leaves any meaningful range (and the sums overflow to inf).
MIN_SIMULATED_RATE = 1e-6
#: Largest ``compute_spread``: a lognormal's exp(s Z - s^2/2) under- or overflows double precision beyond it.
MAX_COMPUTE_SPREAD = 10.0


# -- when a run uses a setting (Setting.used_when): None = used, else why not ------------------------------
# Each takes the whole RunConfig; RunConfig refuses a setting given a value other than its default in a run
# that does not use it (coopsgd.train.config.run.RunConfig.unused).
Used = Callable[[Any], "str | None"]


def engines(*names: str) -> Used:
    """Used by the engines ``names`` only."""
    def used(c: Any) -> str | None:
        engine = c.execution.engine
        if engine in names:
            return None
        return f"the {engine} engine does not use it ({' and '.join(names)} only)"
    return used


def not_reference(c: Any) -> str | None:
    """Used by the engines that train a model on data (the reference engine trains an analytic objective)."""
    if c.execution.engine != "reference":
        return None
    return f"the reference engine trains the analytic objective {c.problem.objective!r}, not a model on data"


def both(*conditions: Used) -> Used:
    """Used when every condition says so (the first reason otherwise)."""
    def used(c: Any) -> str | None:
        for cond in conditions:
            reason = cond(c)
            if reason is not None:
                return reason
        return None
    return used


def _logistic_or_data(c: Any) -> str | None:
    """The data's batch size and partition: a model's, or the reference engine's ``logistic`` objective's."""
    if c.execution.engine != "reference" or c.problem.objective == "logistic":
        return None
    return f"the reference engine's objective {c.problem.objective!r} draws no batches from a data set"


def _partition(name: str) -> Used:
    def used(c: Any) -> str | None:
        if c.problem.partition != name:
            return f"partition is {c.problem.partition!r} (only partition {name!r} uses it)"
        return not_reference(c)
    return used


def _nan_skip(c: Any) -> str | None:
    if c.execution.nan_policy == "skip":
        return None
    return f"nan_policy is {c.execution.nan_policy!r} (it counts the rounds nan_policy 'skip' drops)"


def _preset_fact(fact: str, what: str) -> Used:
    """Used by the presets whose spec (built with the preset's defaults) has ``fact`` true."""
    def used(c: Any) -> str | None:
        if c.preset_facts()[fact]:
            return None
        return f"preset {c.algorithm.preset!r} does not use it ({what})"
    return used


def _speeds(c: Any) -> str | None:
    """The speed classes: the simulator's clock, on every engine the clients' local steps of a FedAvg-family
    preset with ``local_work`` budget (each client runs as many steps as fit in the fastest one's tau), and on the
    reference engine an asynchronous server's arrival order (FedBuff, asynchronous local SGD)."""
    if c.execution.engine == "simulate" or c.algorithm.local_work == "budget":
        return None
    if c.execution.engine == "reference" and c.preset_facts()["asynchronous"]:
        return None
    return (f"the {c.execution.engine} engine does not use it (simulate only, local_work budget on any engine, or an "
            "asynchronous preset on the reference engine)")


def _compute(*kinds: str) -> Used:
    """A clock setting used by the compute models ``kinds`` (the reference engine's ``flops`` and ``measured``
    are a constant ``compute_ms``)."""
    def used(c: Any) -> str | None:
        kind = c.clock.compute
        if c.execution.engine == "reference" and kind in ("flops", "measured"):
            kind = "constant"
        if kind in kinds:
            return None
        return (f"compute is {c.clock.compute!r} on the {c.execution.engine} engine (it is for compute "
                f"{' / '.join(kinds)})")
    return used


def _model_dtype(c: Any) -> str | None:
    if c.execution.engine != "reference":
        return None
    return "the reference engine computes in float64 (numpy) whatever dtype says"


def _own_threads(c: Any) -> str | None:
    if c.execution.engine != "distributed":
        return None
    return "the distributed engine runs each rank with max(1, cores // workers) threads"


def _network(c: Any) -> str | None:
    if c.execution.engine != "distributed" or c.clock.emulate_network:
        return None
    return "the distributed engine measures its real network (give emulate_network to delay every message by it)"


def _path(key: str, value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError.invalid(key, value, "must be a non-empty path (a string) or unset")
    return value


def _device_syntax(key: str, value: Any) -> Any:
    return value  # checked with the engine and the dtype by ExecutionSettings (check_device)


def _epochs_used(c: Any) -> str | None:
    """``used_when`` of ``epochs``: the simulator's and the distributed engine's run length, unless ``max_steps``
    gives it."""
    why = not_reference(c)
    if why is None and c.schedule.max_steps is not None:
        why = f"max_steps={c.schedule.max_steps} gives the run's length"
    return why


def _preset(default: Any = None) -> Any:
    """A preset setting: its help, range and defaults are the preset declarations' (coopsgd.algorithms.registry)."""
    return setting(default, preset=True, help="a preset setting (declared by the presets that take it)")


@dataclass(frozen=True)
class AlgorithmSettings:
    """The algorithm: a preset, its workers and its settings (``None`` / ``False`` = the preset's default).

    The preset settings are the fields declared with ``preset=True``: one per setting declared by a preset
    (:mod:`coopsgd.algorithms.registry`, which checks them); a unit test keeps the two in step."""

    preset: str = setting("local_sgd", choices=lambda: tuple(PRESETS),
                          help="algorithm, one of the presets (described below)")
    workers: int = setting(8, help="number of workers m", low=1)
    tau: int | None = _preset()
    alpha: float | None = _preset()
    beta: float | None = _preset()
    topology: str | None = _preset()
    weights: str | None = _preset()
    groups: int | None = _preset()
    q: int | None = _preset()
    aux_topology: str | None = _preset()
    aux_weights: str | None = _preset()
    lam: float | None = _preset()
    lam_global: float | None = _preset()
    fraction: float | None = _preset()
    warmup_steps: int | None = _preset()
    step_counting: str | None = _preset()
    nonblocking: bool = _preset(False)
    strict: bool = _preset(False)
    local_epochs: float | None = _preset()
    budget: float | None = _preset()
    outer_lr: float | None = _preset()
    outer_momentum: float | None = _preset()
    outer_optimizer: str | None = _preset()
    outer_beta1: float | None = _preset()
    outer_beta2: float | None = _preset()
    outer_eps: float | None = _preset()
    mu: float | None = _preset()
    local_work: str | None = _preset()
    min_local_steps: int | None = _preset()
    aggregation: str | None = _preset()
    trim: float | None = _preset()
    byzantine_fraction: float | None = _preset()
    attack: str | None = _preset()
    attack_std: float | None = _preset()
    attack_scale: float | None = _preset()
    krum_f: int | None = _preset()
    multi_krum_keep: int | None = _preset()
    base_algorithm: str | None = _preset()
    fragments: int | None = _preset()
    fragment_delay: int | None = _preset()
    merge_alpha: float | None = _preset()
    fragment_split: str | None = _preset()
    buffer_size: int | None = _preset()
    concurrency: int | None = _preset()
    staleness: str | None = _preset()
    staleness_exponent: float | None = _preset()
    delayed_nesterov: int | None = _preset()
    dynamic_local_updates: bool = _preset(False)
    downpour_order: str = setting(
        "clock", choices=("clock", "schedule", "async"),
        help="DOWNPOUR push order: clock (order of arrival: on the simulated clock, or at a real asynchronous "
             "server with --engine distributed) | schedule (seeded, deterministic) | async (distributed only)",
        used_when=_preset_fact("sequential", "only DOWNPOUR pushes to a server in an order"))
    buffers: str = setting("mix", choices=("mix", "local"), used_when=not_reference,
                           help="buffer policy (BatchNorm statistics): mixed like parameters, or kept per worker")
    optimizer_state: str = setting(
        "local", choices=("local", "reset", "mix"),
        help="what a round does to every worker's optimizer state (momentum, Adam's moments): keep it, reset it "
             "(with the step counts) or mix it like the parameters (step counts stay local)", used_when=not_reference)
    loss_estimate: str = setting("running_mean", choices=LOSS_ESTIMATES, help="LSGD's leader election: loss estimate",
                                 used_when=_preset_fact("needs_losses", "only LSGD elects its leaders by loss"))

    def __post_init__(self) -> None:
        check_section(self)
        self._check_preset_settings()

    def preset_settings(self) -> dict[str, Any]:
        """The preset settings (``None`` / ``False`` = not given), for
        :func:`coopsgd.algorithms.registry.spec_from_settings`."""
        return {s.key: getattr(self, s.name) for s in settings_of(AlgorithmSettings) if s.info.preset}

    def _check_preset_settings(self) -> None:
        """Check every given preset setting against its declaration (this preset's, else the first preset
        declaring it); a derived setting (``local_epochs``) the preset does not take, or one given together
        with a setting it excludes, is an error naming it."""
        decl = declaration(self.preset)
        given = self.preset_settings()
        for key, value in given.items():
            if value is None or value is False:
                continue
            own = decl.arg(key)
            anyone = takers(key)
            arg = own if own is not None else (anyone[0][1] if anyone else None)
            if arg is None:
                continue
            if arg.type in (int, float) and isinstance(value, str):  # as every other number setting: not text
                raise ConfigError.invalid(key, value, f"must be {'an integer' if arg.type is int else 'a number'}, "
                                          "not a string")
            object.__setattr__(self, key, arg.check(value))
            if arg.kind == "derived" and own is None:
                names = ", ".join(n for n, _ in anyone)
                raise ConfigError.invalid(key, value, f"only the {names} preset takes this setting")
            for other in arg.excludes:
                if given.get(other) is not None and given.get(other) is not False:
                    raise ConfigError.invalid(key, value, f"give {other} or {key}, not both")


@dataclass(frozen=True)
class ProblemSettings:
    """What is trained: a model on a data set split over the workers (simulate / distributed), or an analytic
    objective (the reference engine)."""

    model: str = setting("mlp", choices=MODELS, open_choices=True, help="simulate / distributed: model",
                         used_when=not_reference)
    model_args: dict[str, Any] = setting(factory=dict, flag=False, help="the model's keyword arguments",
                                         used_when=not_reference)
    augment: bool = setting(False, help="random crop + horizontal flip on training batches", used_when=not_reference)
    dataset: str = setting("mnist_bundled", choices=DATASETS, open_choices=True,
                           help="simulate / distributed: data set (mnist_bundled ships with the package; mnist, "
                                "cifar10 need torchvision and --download)", used_when=not_reference)
    data_root: str | None = setting(None, check=_path, help="directory of downloaded data", used_when=not_reference,
                                    default_text="$COOPSGD_DATA, else ~/.cache/coopsgd")
    download: bool = setting(False, help="allow torchvision downloads", used_when=not_reference)
    partition: str = setting("iid", choices=PARTITIONS, help="how the training set is split over the workers",
                             used_when=_logistic_or_data)
    dirichlet_beta: float = setting(0.5, help="Dirichlet concentration (label skew)", low=0.0, low_open=True,
                                    used_when=_partition("dirichlet"))
    shards_per_worker: int = setting(2, help="class shards per worker", low=1, used_when=_partition("shards"))
    objective: str = setting("logistic", choices=tuple(OBJECTIVES), help="reference engine: analytic objective",
                             used_when=engines("reference"))
    objective_args: dict[str, Any] = setting(factory=dict, flag=False, help="the objective's keyword arguments",
                                             used_when=engines("reference"))
    batch_size: int = setting(32, help="batch size per worker", low=1, used_when=_logistic_or_data)

    def __post_init__(self) -> None:
        check_section(self)


#: The learning rate of a run that gives none, by the workers' inner optimizer (an adaptive optimizer's steps
#: are already scaled: 0.1 would throw AdamW off at once); a torch.optim class through the Python API: SGD's.
DEFAULT_LR: dict[str, float] = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3}


@dataclass(frozen=True)
class ScheduleSettings:
    """How long and how fast: the learning rate (decayed by ``lr_decay_factor`` at each epoch in
    ``lr_decay_epochs`` and at the simulated times ``lr_decay_times_s``, after a linear warm-up), and
    ``epochs`` or ``max_steps``. ``lr=None``: not given, :data:`DEFAULT_LR` of the inner optimizer
    (:func:`coopsgd.train.problem.base_lr`). An epoch is one pass over the training set: total samples /
    (workers x batch size) steps."""

    lr: float | None = setting(None, help="learning rate", low=0.0, low_open=True,
                               default_text="0.1 for sgd, 0.001 for adam and adamw")
    epochs: float = setting(5.0, help="simulate / distributed: epochs (one epoch: training samples / (workers x "
                                      "batch size) steps)", low=0.0, low_open=True, used_when=_epochs_used)
    max_steps: int | None = setting(None, help="number of steps (overrides --epochs)", low=1,
                                    default_text="from --epochs; the reference engine: 300")
    lr_decay_epochs: list[float] = setting(factory=list, low=0.0,
                                           help="decay the lr at these epochs, e.g. 100,150")
    lr_decay_times_s: list[float] = setting(factory=list, low=0.0, help="decay the lr at these simulated times (s)")
    lr_decay_factor: float = setting(0.1, help="lr decay factor", low=0.0, low_open=True)
    lr_warmup_steps: int = setting(0, help="linear lr warm-up steps", low=0)

    def __post_init__(self) -> None:
        check_section(self)
        if self.epochs > MAX_EPOCHS:
            raise ConfigError.invalid("epochs", self.epochs, f"must be <= {MAX_EPOCHS:g} (use max_steps for a step "
                                      "count)")


@dataclass(frozen=True)
class EvaluationSettings:
    """When and on what the centre model is evaluated; ``holdout_fraction`` of the training set is held out
    (seeded, never trained on) and every evaluation records ``holdout_loss`` on it, for tuning."""

    eval_every: int | None = setting(None, help="steps between evaluations", low=1,
                                     default_text="the smaller of one epoch and a tenth of the run; the reference "
                                                  "engine: every steps/200")
    eval_samples: int = setting(2000, help="training / test samples used per evaluation", low=1,
                                used_when=not_reference)
    holdout_fraction: float = setting(
        0.0, low=0.0, high=1.0, high_open=True,
        help="share of the training set held out before the workers' partition (seeded, never trained on); "
             "every evaluation records the centre model's holdout_loss on it, for tuning", used_when=not_reference)

    def __post_init__(self) -> None:
        check_section(self)


@dataclass(frozen=True)
class ClockSettings:
    """Simulated time: each step's compute time and the network's latency and bandwidth.

    ``compute`` is ``flops`` (each step costs its counted FLOPs at ``compute_gflops`` per worker: the same
    simulated times on any machine; a model that cannot be counted falls back to a constant ``compute_ms``),
    ``measured`` (follows the machine's load) or a distribution with ``compute_ms`` / ``compute_spread``. The
    reference engine has no model to count: ``flops`` and ``measured`` are a constant ``compute_ms`` there."""

    compute: str = setting(
        "flops", choices=COMPUTE_MODELS,
        help="simulated compute time per step: flops (counted FLOPs / --compute-gflops; deterministic, the "
             "default), measured (follows the machine's load), or drawn from a distribution",
        used_when=engines("simulate", "reference"))
    compute_ms: float = setting(10.0, low=0.0, used_when=both(engines("simulate", "reference"), _compute(
                                    "flops", "constant", "exponential", "lognormal", "pareto")),
                                help="mean compute time per step for a modelled compute time (ms); also the "
                                     "constant fallback of flops for a model that cannot be FLOP-counted")
    compute_spread: float = setting(0.0, low=0.0, help="spread of the compute-time distribution (stragglers)",
                                    used_when=both(engines("simulate", "reference"),
                                                   _compute("exponential", "lognormal", "pareto")))
    compute_gflops: float = setting(20.0, low=0.0, low_open=True,  # coopsgd.engines.simulator.clock.DEFAULT_GFLOPS
                                    used_when=both(engines("simulate"), _compute("flops")),
                                    help="throughput of one worker for --compute flops (GFLOP/s; the default is one "
                                         "CPU core)")
    worker_speeds: list[float] = setting(
        factory=list, low=0.0, low_open=True, used_when=_speeds,
        help="speed classes: the workers split into as many equal consecutive blocks as speeds given, a worker of "
             "speed s taking 1/s times each step's compute time, e.g. 1,0.5 (empty: all 1)")
    net_latency_ms: float = setting(1.0, low=0.0, help="network latency per handshake (ms)", used_when=_network)
    net_bandwidth_mbps: float = setting(1000.0, low=0.0, low_open=True, help="network bandwidth (Mbit/s)",
                                        used_when=_network)
    emulate_network: bool = setting(False, help="distributed: delay every message by --net-latency-ms and "
                                                "--net-bandwidth-mbps", used_when=engines("distributed"))

    def __post_init__(self) -> None:
        check_section(self)
        for name in ("compute_ms", "net_latency_ms"):
            if getattr(self, name) > MAX_SIMULATED_MS:
                raise ConfigError.invalid(name, getattr(self, name), f"must be <= {MAX_SIMULATED_MS:g} (a year in ms)")
        for name in ("compute_gflops", "net_bandwidth_mbps"):
            if getattr(self, name) < MIN_SIMULATED_RATE:
                raise ConfigError.invalid(name, getattr(self, name), f"must be >= {MIN_SIMULATED_RATE:g}")
        if self.compute_spread > MAX_COMPUTE_SPREAD:
            raise ConfigError.invalid("compute_spread", self.compute_spread, f"must be <= {MAX_COMPUTE_SPREAD:g} (the "
                                      "sampled compute times under- or overflow beyond it)")


@dataclass(frozen=True)
class ExecutionSettings:
    """How the run executes: the engine, the numbers' type, the simulator's executor, the device, the seed,
    what a NaN does and the distributed engine's timeout."""

    engine: str = setting("simulate", choices=ENGINES,
                          help="reference (analytic objectives, exact, numpy) | simulate (m workers of a torch model "
                               "in one process) | distributed (one process per worker, torch.distributed)")
    dtype: str = setting("float32", choices=DTYPES, help="floating-point type of the models",
                         used_when=_model_dtype)
    executor: str = setting("auto", choices=EXECUTORS,
                            help="simulator: local steps in a loop over the workers or vectorised (vmap); auto times "
                                 "both once per workload and machine and caches the choice ($COOPSGD_CACHE_DIR)",
                            used_when=engines("simulate"))
    device: str = setting("cpu", choices=("cpu", "cuda", "cuda:N", "mps"), open_choices=True, check=_device_syntax,
                          help="where the models live and train: cpu | cuda (distributed: each local rank on its own "
                               "GPU, cuda:LOCAL_RANK) | cuda:N | mps; the reference engine is numpy (cpu only)")
    seed: int = setting(0, help="random seed", low=0)
    nan_policy: str = setting("stop", choices=("stop", "skip"),
                              help="on NaN/Inf: stop | skip (drop the round, keep the last good state)")
    max_skips: int = setting(10, help="consecutive skipped rounds before stopping", low=1, used_when=_nan_skip)
    timeout_s: float = setting(60.0, low=0.0, low_open=True, high=MAX_TIMEOUT_S,
                               help="distributed: communication timeout; a dead or hung rank stops the run within it",
                               used_when=engines("distributed"))
    threads: int | None = setting(
        None, low=1, used_when=_own_threads, help="simulate / reference: torch's threads for this run's arithmetic (the distributed engine runs "
                          "each rank with max(1, cores // workers))",
        default_text="1 for mlp, lenet and resnet20 (measured faster on a shared 2-core machine: "
                     "benchmarks/README.md), torch's own for larger models")

    def __post_init__(self) -> None:
        check_section(self)
        object.__setattr__(self, "device", check_device(self.device, engine=self.engine, dtype=self.dtype))


@dataclass(frozen=True)
class OutputSettings:
    """Where the run is written: its directory, TensorBoard scalars and checkpoints."""

    out: str | None = setting(None, check=_path, help="run directory",
                              default_text="a new runs/PRESET-YYYYmmdd-HHMMSS")
    tensorboard: bool | None = setting(
        None, help="write TensorBoard scalars of the metrics to OUT/tensorboard/ (needs coopsgd[tensorboard])",
        default_text="on when the tensorboard package is installed")
    checkpoint_every: int | None = setting(None, help="steps between checkpoints", low=1,
                                           default_text="once, at the end of a run with a run directory")

    def __post_init__(self) -> None:
        check_section(self)


def check_device(device: Any, *, engine: str = "simulate", dtype: str = "float32") -> str:
    """``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``mps``) checked for the engine and for this machine.

    The reference engine computes with numpy (``cpu`` only); the distributed engine puts each local rank on
    its own GPU (``cuda`` = ``cuda:LOCAL_RANK``), so it takes ``cpu`` or ``cuda``. A device this machine does
    not have is an error naming the field (torch is imported only for a device other than ``cpu``).
    """
    text = device.strip().lower() if isinstance(device, str) else None
    if text is None or not (text in ("cpu", "cuda", "mps") or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ConfigError.invalid("device", device, "choose cpu, cuda, cuda:N (N = 0, 1, ...) or mps")
    if text == "cpu":
        return text
    if engine == "reference":
        raise ConfigError.invalid("device", device, "the reference engine computes with numpy on the CPU: use 'cpu'")
    if engine == "distributed" and text != "cuda":
        raise ConfigError.invalid("device", device, "the distributed engine runs on 'cpu' or 'cuda' (each local rank "
                                  "on its own GPU, cuda:LOCAL_RANK; pick the GPUs with CUDA_VISIBLE_DEVICES)")
    if text == "mps" and dtype == "float64":
        raise ConfigError.invalid("device", device, "MPS has no float64: use dtype 'float32' or device 'cpu'")
    import torch  # only for a device other than cpu: building a config stays cheap

    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError.invalid("device", device, "no CUDA device is visible on this machine "
                                      "(torch.cuda.is_available() is False); use 'cpu'")
        count = torch.cuda.device_count()
        index = int(text[5:]) if ":" in text else 0
        if index >= count:
            raise ConfigError.invalid("device", device, f"this machine has {count} visible CUDA device(s): "
                                      f"cuda:0 to cuda:{count - 1}")
    else:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError.invalid("device", device, "no MPS device (Apple GPU) is available on this machine; "
                                      "use 'cpu'")
    return text
