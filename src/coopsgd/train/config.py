"""RunConfig: one validated, typed description of a training run (flags or a TOML/YAML/JSON file).

Unknown keys are errors naming the key; bad values are errors naming the key, the value and what is
allowed. Files are read with safe parsers only (``tomllib``, ``yaml.safe_load``, ``json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from coopsgd.errors import ConfigError, check_float, check_int

__all__ = [
    "RunConfig", "load_config", "ENGINES", "DTYPES", "EXECUTORS", "PARTITIONS", "LOSS_ESTIMATES", "PRESET_SETTING",
]

ENGINES = ("reference", "simulate", "distributed")
DTYPES = ("float32", "float64")
EXECUTORS = ("auto", "loop", "vmap")
PARTITIONS = ("iid", "dirichlet", "shards")
LOSS_ESTIMATES = ("running_mean", "batch", "probe")
#: The workers' inner optimizers by name (coopsgd.engines.optim.OPTIMIZERS; any torch.optim class through the
#: Python API).
OPTIMIZERS = ("sgd", "adam", "adamw")
COMPUTE_MODELS = ("flops", "measured", "constant", "exponential", "lognormal", "pareto")
#: Field metadata marking a RunConfig field as a preset setting (declared by a preset; see
#: :mod:`coopsgd.algorithms.registry`).
PRESET_SETTING: dict[str, Any] = {"preset": True}


#: The longest communication timeout accepted (a week): torch's timers overflow far above it.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class RunConfig:
    """Everything a run needs. Field names match the CLI flags (``--batch-size`` -> ``batch_size``).

    Algorithm: ``preset`` and its settings (``tau``, ``alpha``, ...; ``None`` = the preset's default). The
    settings are the fields marked with :data:`PRESET_SETTING`: one per setting declared by a preset
    (:mod:`coopsgd.algorithms.registry`); a unit test keeps the two in step.
    Problem: ``model`` / ``dataset`` / ``partition`` for the simulator, ``objective`` for the reference engine.
    Optimisation: the workers' inner ``optimizer`` (``sgd``, ``adam``, ``adamw``; ``None``: the preset's own --
    DiLoCo's AdamW -- else ``sgd``) with SGD's ``momentum`` / ``nesterov``, Adam's ``beta1`` / ``beta2`` / ``eps`` /
    ``amsgrad`` and the optimizer's ``weight_decay`` (``None``: torch's default, 0 and 0.01 for AdamW);
    ``lr``, ``batch_size`` (per worker),
    ``epochs`` or ``max_steps``; the learning rate is multiplied by ``lr_decay_factor`` at each epoch in
    ``lr_decay_epochs`` and at the simulated wall-clock times ``lr_decay_times_s`` ([LSGD]), after a linear
    warm-up of ``lr_warmup_steps`` steps.
    Tuning: ``holdout_fraction`` (in [0, 1)) of the training set is held out before the workers' partition --
    a seeded split, never trained on -- and every evaluation records ``holdout_loss`` (``holdout_accuracy``)
    of the centre model on it (:func:`coopsgd.train.trainer.holdout_split`); 0 (default): no split.
    Time: simulated compute and network (``net_latency_ms``, ``net_bandwidth_mbps``). ``compute`` is
    ``"flops"`` (default: each step costs its FLOPs, counted once with ``FlopCounterMode``, at
    ``compute_gflops`` GFLOP/s per worker -- the same simulated times on any machine under any load; a model
    that cannot be counted falls back, with a warning, to a constant ``compute_ms``), ``"measured"`` (the
    measured compute time: follows the machine's load) or a distribution with ``compute_ms`` /
    ``compute_spread`` (``constant``, ``exponential``, ``lognormal``, ``pareto``). The reference engine has
    no model to count: ``"flops"`` and ``"measured"`` are a constant ``compute_ms`` there.
    """

    # engine and algorithm
    engine: str = "simulate"
    preset: str = "local_sgd"
    workers: int = 8
    # the presets' settings (declared in coopsgd.algorithms.presets; None / False = the preset's default)
    tau: int | None = field(default=None, metadata=PRESET_SETTING)
    alpha: float | None = field(default=None, metadata=PRESET_SETTING)
    beta: float | None = field(default=None, metadata=PRESET_SETTING)
    topology: str | None = field(default=None, metadata=PRESET_SETTING)
    weights: str | None = field(default=None, metadata=PRESET_SETTING)
    groups: int | None = field(default=None, metadata=PRESET_SETTING)
    q: int | None = field(default=None, metadata=PRESET_SETTING)
    aux_topology: str | None = field(default=None, metadata=PRESET_SETTING)
    aux_weights: str | None = field(default=None, metadata=PRESET_SETTING)
    lam: float | None = field(default=None, metadata=PRESET_SETTING)
    lam_global: float | None = field(default=None, metadata=PRESET_SETTING)
    fraction: float | None = field(default=None, metadata=PRESET_SETTING)
    warmup_steps: int | None = field(default=None, metadata=PRESET_SETTING)
    step_counting: str | None = field(default=None, metadata=PRESET_SETTING)
    nonblocking: bool = field(default=False, metadata=PRESET_SETTING)
    strict: bool = field(default=False, metadata=PRESET_SETTING)
    local_epochs: float | None = field(default=None, metadata=PRESET_SETTING)
    budget: float | None = field(default=None, metadata=PRESET_SETTING)
    outer_lr: float | None = field(default=None, metadata=PRESET_SETTING)
    outer_momentum: float | None = field(default=None, metadata=PRESET_SETTING)
    outer_optimizer: str | None = field(default=None, metadata=PRESET_SETTING)
    base_algorithm: str | None = field(default=None, metadata=PRESET_SETTING)
    # run settings
    downpour_order: str = "clock"
    buffers: str = "mix"
    optimizer_state: str = "local"
    # problem
    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    augment: bool = False
    dataset: str = "mnist_bundled"
    data_root: str | None = None
    download: bool = False
    partition: str = "iid"
    dirichlet_beta: float = 0.5
    shards_per_worker: int = 2
    objective: str = "logistic"
    objective_args: dict[str, Any] = field(default_factory=dict)
    # optimisation
    lr: float = 0.1
    optimizer: str | None = None
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    batch_size: int = 32
    epochs: float = 5.0
    max_steps: int | None = None
    lr_decay_epochs: list[float] = field(default_factory=list)
    lr_decay_times_s: list[float] = field(default_factory=list)
    lr_decay_factor: float = 0.1
    lr_warmup_steps: int = 0
    loss_estimate: str = "running_mean"
    # execution
    dtype: str = "float32"
    executor: str = "auto"
    device: str = "cpu"
    seed: int = 0
    eval_every: int | None = None
    eval_samples: int = 2000
    holdout_fraction: float = 0.0  # share of the training set held out (never trained on) for tuning
    checkpoint_every: int | None = None
    nan_policy: str = "stop"
    max_skips: int = 10
    # simulated time
    compute: str = "flops"
    compute_ms: float = 10.0
    compute_spread: float = 0.0
    compute_gflops: float = 20.0  # coopsgd.engines.clock.DEFAULT_GFLOPS (where the number comes from)
    net_latency_ms: float = 1.0
    net_bandwidth_mbps: float = 1000.0
    # distributed engine
    timeout_s: float = 60.0
    emulate_network: bool = False
    # output
    out: str | None = None
    tensorboard: bool | None = None  # TensorBoard scalars in <out>/tensorboard/; None: when the package is installed

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        _choice("engine", self.engine, ENGINES)
        from coopsgd.algorithms.presets import PRESETS

        _choice("preset", self.preset, tuple(PRESETS))
        self.workers = check_int("workers", self.workers, minimum=1)
        self._validate_preset_settings()
        _choice("downpour_order", self.downpour_order, ("clock", "schedule", "async"))
        if self.downpour_order == "async" and self.engine != "distributed":
            raise ConfigError.invalid("downpour_order", "async", "a real asynchronous parameter server needs "
                                      "engine 'distributed' (the simulator orders pushes by 'clock' or 'schedule')")
        _choice("buffers", self.buffers, ("mix", "local"))
        _choice("optimizer_state", self.optimizer_state, ("local", "reset", "mix"))
        _choice("partition", self.partition, PARTITIONS)
        self.dirichlet_beta = check_float("dirichlet_beta", self.dirichlet_beta, low=0.0, low_open=True)
        self.shards_per_worker = check_int("shards_per_worker", self.shards_per_worker, minimum=1)
        self.lr = check_float("lr", self.lr, low=0.0, low_open=True)
        self.momentum = check_float("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        if self.weight_decay is not None:
            self.weight_decay = check_float("weight_decay", self.weight_decay, low=0.0)
        if self.optimizer is not None:
            _choice("optimizer", self.optimizer, OPTIMIZERS)
        self.beta1 = check_float("beta1", self.beta1, low=0.0, high=1.0, high_open=True)
        self.beta2 = check_float("beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        self.eps = check_float("eps", self.eps, low=0.0, low_open=True)
        self.batch_size = check_int("batch_size", self.batch_size, minimum=1)
        self.epochs = check_float("epochs", self.epochs, low=0.0, low_open=True)
        if self.max_steps is not None:
            self.max_steps = check_int("max_steps", self.max_steps, minimum=1)
        self.lr_decay_epochs = [check_float("lr_decay_epochs", e, low=0.0) for e in _as_list("lr_decay_epochs", self.lr_decay_epochs)]
        self.lr_decay_times_s = [check_float("lr_decay_times_s", t, low=0.0) for t in _as_list("lr_decay_times_s", self.lr_decay_times_s)]
        self.lr_decay_factor = check_float("lr_decay_factor", self.lr_decay_factor, low=0.0, low_open=True)
        self.lr_warmup_steps = check_int("lr_warmup_steps", self.lr_warmup_steps, minimum=0)
        _choice("loss_estimate", self.loss_estimate, LOSS_ESTIMATES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("executor", self.executor, EXECUTORS)
        self.device = check_device(self.device, engine=self.engine, dtype=self.dtype)
        self.seed = check_int("seed", self.seed, minimum=0)
        if self.eval_every is not None:
            self.eval_every = check_int("eval_every", self.eval_every, minimum=1)
        self.eval_samples = check_int("eval_samples", self.eval_samples, minimum=1)
        self.holdout_fraction = check_float("holdout_fraction", self.holdout_fraction, low=0.0, high=1.0,
                                            high_open=True)
        _choice("nan_policy", self.nan_policy, ("stop", "skip"))
        self.max_skips = check_int("max_skips", self.max_skips, minimum=1)
        if self.checkpoint_every is not None:
            self.checkpoint_every = check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        _choice("compute", self.compute, COMPUTE_MODELS)
        self.compute_ms = check_float("compute_ms", self.compute_ms, low=0.0)
        self.compute_spread = check_float("compute_spread", self.compute_spread, low=0.0)
        self.compute_gflops = check_float("compute_gflops", self.compute_gflops, low=0.0, low_open=True)
        self.net_latency_ms = check_float("net_latency_ms", self.net_latency_ms, low=0.0)
        self.net_bandwidth_mbps = check_float("net_bandwidth_mbps", self.net_bandwidth_mbps, low=0.0, low_open=True)
        from coopsgd.objectives import OBJECTIVES

        _choice("objective", self.objective, tuple(OBJECTIVES))
        if not isinstance(self.model_args, dict):
            raise ConfigError.invalid("model_args", self.model_args, "must be a mapping of argument names to values")
        if not isinstance(self.objective_args, dict):
            raise ConfigError.invalid("objective_args", self.objective_args, "must be a mapping of argument names to values")
        self.timeout_s = check_float("timeout_s", self.timeout_s, low=0.0, low_open=True, high=MAX_TIMEOUT_S)
        for name in ("nesterov", "download", "emulate_network", "augment", "amsgrad"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError.invalid(name, getattr(self, name), "must be true or false")
        if self.tensorboard is not None and not isinstance(self.tensorboard, bool):
            raise ConfigError.invalid("tensorboard", self.tensorboard, "must be true, false or unset (auto)")
        if self.nesterov and self.momentum == 0:
            raise ConfigError.invalid("nesterov", True, "needs momentum > 0")
        if self.optimizer in ("adam", "adamw") and (self.momentum or self.nesterov):
            raise ConfigError.invalid("momentum", self.momentum, f"an SGD setting; {self.optimizer} uses beta1 as its "
                                      "momentum")
        if self.optimizer == "sgd" and self.amsgrad:
            raise ConfigError.invalid("amsgrad", True, "an Adam setting; the optimizer is sgd")
        _check_magnitudes(self)
        return self

    # -- conversion ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError.invalid(source, type(data).__name__, "must be a mapping of keys to values")
        known = {f.name for f in fields(cls)}
        flat: dict[str, Any] = {}
        for key, value in data.items():
            k = str(key).replace("-", "_")
            if k not in known:
                close = _closest(k, known)
                hint = f" (did you mean {close!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(known))}",
                                  field=str(key), value=value)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError.invalid(k, value, "must be a finite number")
            flat[k] = value
        return cls(**flat)

    def _validate_preset_settings(self) -> None:
        """Check every given preset setting against its declaration (this preset's, else the first preset
        declaring it); a derived setting (``local_epochs``) the preset does not take, or one given together
        with a setting it excludes, is an error naming it."""
        from coopsgd.algorithms.registry import declaration, takers

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
            setattr(self, key, arg.check(value))
            if arg.kind == "derived" and own is None:
                names = ", ".join(n for n, _ in anyone)
                raise ConfigError.invalid(key, value, f"only the {names} preset takes this setting")
            for other in arg.excludes:
                if given.get(other) is not None and given.get(other) is not False:
                    raise ConfigError.invalid(key, value, f"give {other} or {key}, not both")

    def preset_settings(self) -> dict[str, Any]:
        """The preset settings of this config (every :data:`PRESET_SETTING` field; ``None`` / ``False`` = not
        given), for :func:`coopsgd.algorithms.registry.spec_from_settings`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("preset")}

    def spec_policies(self) -> Any:
        """The buffer / optimizer-state :class:`coopsgd.algorithms.Policies` of this config."""
        from coopsgd.algorithms.spec import Policies

        return Policies(buffers=self.buffers, optimizer_state=self.optimizer_state)  # type: ignore[arg-type]

    def spec_kwargs(self, *, lenient: bool = False) -> dict[str, Any]:
        """Arguments for :func:`coopsgd.algorithms.make_preset`, from the preset's declaration.

        A setting the preset does not take is an error naming it, or silently dropped when ``lenient``
        (``coopsgd compare`` shares one set of flags across presets). Settings that need the data
        (FedAvg's ``local_epochs``) are not included: :meth:`build_spec` applies them.
        """
        from coopsgd.algorithms.registry import preset_kwargs

        return preset_kwargs(self.preset, self.preset_settings(), seed=self.seed, policies=self.spec_policies(),
                             lenient=lenient)

    def build_spec(
        self, *, shard_sizes: Any = None, steps_per_epoch: int | None = None, lenient: bool = False
    ) -> Any:
        """The :class:`AlgorithmSpec` of this config (see :func:`coopsgd.algorithms.registry.spec_from_settings`)."""
        from coopsgd.algorithms.registry import spec_from_settings

        return spec_from_settings(self.preset, self.workers, self.preset_settings(), shard_sizes=shard_sizes,
                                  steps_per_epoch=steps_per_epoch, seed=self.seed, policies=self.spec_policies(),
                                  lenient=lenient)


#: Largest ``epochs``: with up to ~10^9 samples per epoch the step count stays far inside int64.
MAX_EPOCHS = 1e9
#: Largest simulated per-step time (``compute_ms``, ``net_latency_ms``): a year, in milliseconds.
MAX_SIMULATED_MS = 365.25 * 24 * 3600 * 1e3
#: Smallest simulated rate (``compute_gflops`` in GFLOP/s, ``net_bandwidth_mbps`` in Mbit/s): beyond it a
#: step's simulated time leaves any meaningful range (and the sums overflow to inf).
MIN_SIMULATED_RATE = 1e-6
#: Largest ``compute_spread``: a lognormal's exp(s Z - s^2/2) under- or overflows double precision beyond it.
MAX_COMPUTE_SPREAD = 10.0
#: Largest magnitude a float32 holds; a larger setting overflows when torch puts it into a float32 tensor.
FLOAT32_MAX = 3.4028234663852886e38


def _check_magnitudes(c: RunConfig) -> None:
    """Ranges that keep every number representable where it ends up: paths are non-empty strings; epochs,
    simulated times and rates stay finite in sums; float settings fit the models' dtype (also the learning
    rate at its peak, after ``lr_decay_factor`` > 1 milestones). One line naming the field, as everywhere."""
    for name in ("out", "data_root"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError.invalid(name, value, "must be a non-empty path (a string) or unset")
    for name in ("model", "dataset"):
        if not isinstance(getattr(c, name), str):
            raise ConfigError.invalid(name, getattr(c, name), "must be a name (a string)")
    if c.epochs > MAX_EPOCHS:
        raise ConfigError.invalid("epochs", c.epochs, f"must be <= {MAX_EPOCHS:g} (use max_steps for a step count)")
    for name in ("compute_ms", "net_latency_ms"):
        if getattr(c, name) > MAX_SIMULATED_MS:
            raise ConfigError.invalid(name, getattr(c, name), f"must be <= {MAX_SIMULATED_MS:g} (a year in ms)")
    for name in ("compute_gflops", "net_bandwidth_mbps"):
        if getattr(c, name) < MIN_SIMULATED_RATE:
            raise ConfigError.invalid(name, getattr(c, name), f"must be >= {MIN_SIMULATED_RATE:g}")
    if c.compute_spread > MAX_COMPUTE_SPREAD:
        raise ConfigError.invalid("compute_spread", c.compute_spread, f"must be <= {MAX_COMPUTE_SPREAD:g} (the "
                                  "sampled compute times under- or overflow beyond it)")
    if c.dtype == "float32":
        for f in fields(c):
            value = getattr(c, f.name)
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:
                raise ConfigError.invalid(f.name, value, f"does not fit dtype float32 (|x| <= {FLOAT32_MAX:.4g}); use "
                                          "a smaller value or dtype float64")
        milestones = len(c.lr_decay_epochs) + len(c.lr_decay_times_s)
        if c.lr_decay_factor > 1 and milestones and (
                math.log(c.lr) + milestones * math.log(c.lr_decay_factor) > math.log(FLOAT32_MAX)):
            raise ConfigError.invalid("lr_decay_factor", c.lr_decay_factor, f"lr={c.lr:g} x {c.lr_decay_factor:g}^"
                                      f"{milestones} milestones does not fit dtype float32 (<= {FLOAT32_MAX:.4g})")


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
    import torch

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


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError.invalid(name, value, f"choose one of {', '.join(allowed)}")


def _as_list(name: str, value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        try:
            return [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError.invalid(name, value, "a list of numbers, e.g. 100,150") from None
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError.invalid(name, value, "a list of numbers, e.g. [100, 150]")


def _closest(key: str, known: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
    return match[0] if match else None


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict (safe parsers; no code is executed). A missing, empty, non-UTF-8
    or unparsable file, or one that does not hold a mapping, is a :class:`ConfigError` naming the file."""
    from coopsgd.fileio import read_text

    p = Path(path)
    if not p.is_file():
        raise ConfigError.invalid("config", str(path), "no such file" if not p.exists() else "is not a regular file")
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError.invalid("config", str(path), "must end in .toml, .yaml, .yml or .json")
    text = read_text(p, "config")  # not empty, UTF-8: else one line naming the file
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the same parser from PyPI
                import tomli as tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError.invalid("config", str(path), "must end in .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors: name the file and the parser's own position message
        raise ConfigError(f"config {str(path)!r} could not be parsed: {exc}", field="config", value=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError.invalid("config", str(path), "must contain a mapping of keys to values")
    if "run" in data and isinstance(data["run"], dict) and len(data) == 1:
        data = data["run"]  # allow a [run] table
    return data
