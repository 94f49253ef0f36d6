"""RunConfig: one validated, typed description of a training run, in sections (flags or a TOML/YAML/JSON file).

A config is made of the frozen sections of :mod:`coopsgd.train.config.sections` plus the inner optimizer
(:class:`coopsgd.algorithms.inner.OptimizerSettings`). Every setting has one *flat key*, unique over the
sections (``lr`` is ``schedule.lr``; ``optimizer`` is ``optimizer.name``): ``RunConfig(lr=0.05, workers=4)``,
flat config files and run directories' ``config.json`` use them; sectioned files use tables
(``[schedule] lr = 0.05``). Unknown keys are errors naming the key (with a did-you-mean); bad values are
errors naming the key, the value and what is allowed. Files are read with safe parsers only (``tomllib``,
``yaml.safe_load``, ``json``).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coopsgd.algorithms.communication import round_kinds
from coopsgd.algorithms.inner import INNER_OPTIMIZERS, OptimizerSettings
from coopsgd.algorithms.registry import declaration, declarations, preset_kwargs, spec_from_settings
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.errors import ConfigError
from coopsgd.fileio import not_a_file, read_text
from coopsgd.settings import SettingField, settings_of, unknown_key, unused_settings
from coopsgd.theory.cost import worker_speeds
from coopsgd.train.config import sections as sec
from coopsgd.train.config.communication import COMPRESSED_ENGINES, CommunicationSettings

__all__ = ["RunConfig", "load_config", "SECTIONS", "FLAT_KEYS", "OPTIMIZERS", "FLOAT32_MAX", "flat_settings",
           "config_settings"]

#: The workers' inner optimizers by name (coopsgd.engines.optim.OPTIMIZERS; any torch.optim class through the
#: Python API).
OPTIMIZERS = INNER_OPTIMIZERS
#: Largest magnitude a float32 holds; a larger setting overflows when torch puts it into a float32 tensor.
FLOAT32_MAX = 3.4028234663852886e38

#: The sections of a run configuration by name, in the order they are checked, shown in ``--help`` and written
#: (``to_dict``: the first difference between two run directories' configs is the engine's, then the algorithm's).
SECTIONS: dict[str, type] = {
    "execution": sec.ExecutionSettings,
    "algorithm": sec.AlgorithmSettings,
    "communication": CommunicationSettings,
    "problem": sec.ProblemSettings,
    "optimizer": OptimizerSettings,
    "schedule": sec.ScheduleSettings,
    "evaluation": sec.EvaluationSettings,
    "clock": sec.ClockSettings,
    "output": sec.OutputSettings,
}


def config_settings() -> Iterator[tuple[str, SettingField]]:
    """Every setting of a run configuration: ``(section name, declaration)``, section by section."""
    for name, cls in SECTIONS.items():
        for s in settings_of(cls):
            yield name, s


def _flat_keys() -> dict[str, tuple[str, SettingField]]:
    out: dict[str, tuple[str, SettingField]] = {}
    for section, s in config_settings():
        if s.key in out:
            raise TypeError(f"setting key {s.key!r} is declared twice ({out[s.key][0]} and {section})")
        if s.key in SECTIONS and s.key != section:
            raise TypeError(f"setting key {s.key!r} of {section} is the name of a section")
        out[s.key] = (section, s)
    return out


#: Flat key -> (its section, its declaration). Every key belongs to exactly one section (checked here).
FLAT_KEYS: dict[str, tuple[str, SettingField]] = _flat_keys()


@dataclass(frozen=True, init=False)
class RunConfig:
    """Everything a run needs, in sections (frozen: :meth:`replace` makes a changed copy).

    ``RunConfig(preset="easgd", lr=0.05)`` takes flat keys (each routed to its section), whole sections
    (``RunConfig(optimizer=OptimizerSettings("adamw"))``; a mapping is a section's fields) or both (the flat
    keys apply on top of the given section)."""

    execution: sec.ExecutionSettings
    algorithm: sec.AlgorithmSettings
    communication: CommunicationSettings
    problem: sec.ProblemSettings
    optimizer: OptimizerSettings
    schedule: sec.ScheduleSettings
    evaluation: sec.EvaluationSettings
    clock: sec.ClockSettings
    output: sec.OutputSettings

    def __init__(self, **settings: Any) -> None:
        self._assemble(settings)
        self._check_used()

    @classmethod
    def shared(cls, **settings: Any) -> RunConfig:
        """The settings several runs share (``coopsgd compare``: one set of flags for several presets), checked
        like a run's except that a setting this configuration does not use is kept, not refused: each run's own
        configuration is made from it with :meth:`replace` (``shared.replace(preset=p)``), which resets the
        settings that run does not use, and :meth:`unused` lists them."""
        cfg = cls.__new__(cls)
        cfg._assemble(settings)
        return cfg

    def _assemble(self, settings: dict[str, Any]) -> None:
        given: dict[str, Any] = {}
        flat: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in settings.items():
            if key in SECTIONS and (isinstance(value, SECTIONS[key]) or isinstance(value, Mapping)):
                given[key] = value
            elif key in FLAT_KEYS:
                section, s = FLAT_KEYS[key]
                flat[section][s.name] = value
            else:
                raise unknown_key("RunConfig", key, [*FLAT_KEYS, *SECTIONS], value)
        for name, cls in SECTIONS.items():
            base = given.get(name)
            if isinstance(base, Mapping):
                base = cls(**_section_fields(name, base, "RunConfig"))
            if base is None:
                section = cls(**flat[name])
            else:
                section = replace(base, **flat[name]) if flat[name] else base
            object.__setattr__(self, name, section)
        self._check_across()

    # -- settings this run does not use ------------------------------------------------------------
    def unused(self) -> list[tuple[str, Any, str]]:
        """The settings given a value other than their default that this run does not use: ``(key, value, why
        not)``, from each setting's ``used_when`` (:class:`coopsgd.settings.Setting`). Preset settings are the
        preset declarations' (:mod:`coopsgd.algorithms.registry` refuses one the preset does not take)."""
        out = []
        for name, cls in SECTIONS.items():
            out += [(s.key, value, reason) for s, value, reason in unused_settings(cls, getattr(self, name), self)]
        return out

    def _check_used(self) -> None:
        """A setting given a value other than its default that this run does not use is refused (one line naming
        it, its value and why): it would do nothing, and ``config.json`` would record it as if it had."""
        for key, value, reason in self.unused():
            raise ConfigError.invalid(key, value, f"{reason}; leave it out")

    def without_unused(self) -> RunConfig:
        """This configuration with every setting it does not use (:meth:`unused`) back at its default."""
        kwargs = self.sections()
        for key, _, _ in self.unused():
            section, s = FLAT_KEYS[key]
            kwargs[section] = replace(kwargs[section], **{s.name: copy.deepcopy(s.default)})
        return RunConfig(**kwargs)

    def preset_facts(self) -> dict[str, Any]:
        """What the preset's rounds need, from its spec with its defaults (and this run's ``base_algorithm``):
        ``inner_optimizer`` (the one it prescribes, or ``None``), ``needs_losses`` (LSGD's election),
        ``sequential`` (DOWNPOUR's ordered pushes), ``gossips`` (it takes a topology), ``only_gossip`` (every
        round is gossip among the workers: compressed, CHOCO-SGD, which keeps no error feedback)."""
        return _preset_facts(self.algorithm.preset, self.algorithm.base_algorithm)

    def inner_optimizer(self) -> str | None:
        """The workers' inner optimizer by name: the run's, else the preset's own, else ``"sgd"`` (``None``: a
        torch.optim class given through the Python API)."""
        if self.optimizer.torch_class is not None:
            return None
        return self.optimizer.name or self.preset_facts()["inner_optimizer"] or "sgd"

    # -- checks across sections ------------------------------------------------------------------
    def _check_dynamic_local_updates(self) -> None:
        """Dynamic local updates scale H by the workers' speed classes on the simulated timeline: without two
        classes, or on the distributed engine (every rank pushes after its own H real steps), they change nothing."""
        if not self.algorithm.dynamic_local_updates:
            return
        if self.execution.engine == "distributed":
            raise ConfigError.invalid("dynamic_local_updates", True, "false with engine 'distributed' (each rank "
                                      "pushes after its own tau real local steps; H_i follows simulated speed classes)")
        speeds = self.clock.worker_speeds
        if not speeds or len(set(worker_speeds(speeds, self.algorithm.workers).tolist())) < 2:
            raise ConfigError.invalid("dynamic_local_updates", True, "false unless --worker-speeds gives two speed "
                                      f"classes or more (got {speeds or 'none'}: every worker would keep H = tau)")

    def _check_across(self) -> None:
        if self.algorithm.downpour_order == "async" and self.execution.engine != "distributed":
            raise ConfigError.invalid("downpour_order", "async", "a real asynchronous parameter server needs "
                                      "engine 'distributed' (the simulator orders pushes by 'clock' or 'schedule')")
        a = self.algorithm
        if self.execution.engine == "distributed" and self.preset_facts()["asynchronous"] and (
                (a.concurrency is not None and a.concurrency != a.workers)
                or (a.fraction is not None and max(1, round(a.fraction * a.workers)) != a.workers)):
            raise ConfigError.invalid("concurrency" if a.concurrency is not None else "fraction",
                                      a.concurrency if a.concurrency is not None else a.fraction,
                                      "the distributed engine runs one rank per client, every one training: "
                                      "concurrency = workers (fraction 1)")
        self._check_compression()
        self._check_control_variates()
        if self.clock.worker_speeds:
            worker_speeds(self.clock.worker_speeds, self.algorithm.workers)  # at most one class per worker
        self._check_dynamic_local_updates()
        if self.execution.dtype != "float32" or self.execution.engine == "reference":  # the reference: float64
            return
        for key, value in self.to_dict().items():
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:
                raise ConfigError.invalid(key, value, f"does not fit dtype float32 (|x| <= {FLOAT32_MAX:.4g}); use "
                                          "a smaller value or dtype float64")
        s = self.schedule
        milestones = len(s.lr_decay_epochs) + len(s.lr_decay_times_s)
        lr = s.lr if s.lr is not None else max(sec.DEFAULT_LR.values())
        if s.lr_decay_factor > 1 and milestones and (
                math.log(lr) + milestones * math.log(s.lr_decay_factor) > math.log(FLOAT32_MAX)):
            raise ConfigError.invalid("lr_decay_factor", s.lr_decay_factor, f"lr={lr:g} x {s.lr_decay_factor:g}^"
                                      f"{milestones} milestones does not fit dtype float32 (<= {FLOAT32_MAX:.4g})")

    def _check_control_variates(self) -> None:
        """SCAFFOLD's option II, (z - y_i) / sum_k lr_k, is the round's mean gradient, and FedNova's a_i = K_i its
        normalizer, only for plain SGD steps: anything else is refused here, before a run directory exists."""
        facts = self.preset_facts()
        if not (facts["control"] or facts["normalized"]):
            return
        who = "SCAFFOLD's control variates (option II)" if facts["control"] else "FedNova's normalized averaging"
        opt = self.optimizer
        if self.inner_optimizer() != "sgd" or opt.momentum != 0.0 or opt.nesterov:
            field, value = (("momentum", opt.momentum) if self.inner_optimizer() == "sgd"
                            else ("optimizer", self.inner_optimizer()))
            raise ConfigError.invalid(field, value, f"{who} need plain SGD steps: optimizer sgd, momentum 0, "
                                      "no Nesterov")

    def _check_compression(self) -> None:
        """Compressed rounds need an engine that runs them and a preset whose rounds take the compressor: both
        checked here, before a run directory exists (the preset's spec is built without the data's facts)."""
        comp = self.communication.compression()
        if comp is None or not comp.active:
            return
        if self.execution.engine not in COMPRESSED_ENGINES:
            raise ConfigError.invalid("compress", comp.compress, f"compressed rounds run on the engines "
                                      f"{', '.join(COMPRESSED_ENGINES)}; not on the {self.execution.engine} engine")
        if comp.compresses:
            decl = declaration(self.algorithm.preset)
            settings = {k: None if (a := decl.arg(k)) is not None and a.kind == "derived" else v
                        for k, v in self.preset_settings().items()}
            spec = spec_from_settings(self.algorithm.preset, self.algorithm.workers, settings,
                                      seed=self.execution.seed, policies=self.spec_policies(), lenient=True,
                                      compression=comp)
            if self.execution.engine == "distributed":  # LSGD, asynchronous pushes: refused before any rank starts
                from coopsgd.engines.distributed.compressed import check_distributed_compression

                check_distributed_compression(spec, asynchronous=self.algorithm.downpour_order in ("clock", "async"))
                from coopsgd.engines.fragments import check_distributed_fragments

                check_distributed_fragments(spec)

    # -- conversion ------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some settings changed: flat keys (``out="runs/x"``) and / or whole sections.

        A changed setting the new configuration does not use is refused, as in a new one; a setting that was
        not changed and that the change leaves unused (``executor`` when ``engine`` becomes ``"distributed"``)
        goes back to its default, so the copy never records a setting it does not use."""
        kwargs: dict[str, Any] = self.sections()
        for key, value in changes.items():
            if key in SECTIONS and not isinstance(value, (SECTIONS[key], Mapping)):  # the flat key `optimizer`
                section, s = FLAT_KEYS[key]
                kwargs[section] = replace(kwargs[section], **{s.name: value})
            else:
                kwargs[key] = value
        candidate = RunConfig.shared(**kwargs)
        changed = {k for k in changes if k in FLAT_KEYS and not isinstance(changes[k], (SECTIONS.get(k, ()), Mapping))}
        changed |= {s.key for k in changes if k in SECTIONS and k not in changed for s in settings_of(SECTIONS[k])}
        left = [key for key, _, _ in candidate.unused() if key not in changed]
        if left:
            kwargs = candidate.sections()
            for key in left:
                section, s = FLAT_KEYS[key]
                kwargs[section] = replace(kwargs[section], **{s.name: copy.deepcopy(s.default)})
        return RunConfig(**kwargs)

    def sections(self) -> dict[str, Any]:
        """The sections by name."""
        return {name: getattr(self, name) for name in SECTIONS}

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its flat key (what ``config.json`` and checkpoints hold; :meth:`from_dict` reads it)."""
        return {s.key: copy.deepcopy(getattr(getattr(self, section), s.name)) for section, s in config_settings()}

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """Every setting in its section (the shape of a sectioned config file; :meth:`from_dict` reads it)."""
        out: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for section, s in config_settings():
            out[section][s.name] = copy.deepcopy(getattr(getattr(self, section), s.name))
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config") -> RunConfig:
        """A config from a mapping of flat keys, of section tables (``{"schedule": {"lr": 0.1}}``) or both."""
        return cls(**flat_settings(data, source=source))

    # -- the algorithm ---------------------------------------------------------------------------
    def preset_settings(self) -> dict[str, Any]:
        """The preset settings of this config (``None`` / ``False`` = not given)."""
        return self.algorithm.preset_settings()

    def spec_policies(self) -> Policies:
        """The buffer / optimizer-state :class:`coopsgd.algorithms.Policies` of this config."""
        return Policies(buffers=self.algorithm.buffers, optimizer_state=self.algorithm.optimizer_state)  # type: ignore[arg-type]

    def spec_kwargs(self, *, lenient: bool = False) -> dict[str, Any]:
        """Arguments for :func:`coopsgd.algorithms.make_preset`, from the preset's declaration.

        A setting the preset does not take is an error naming it, or silently dropped when ``lenient``
        (``coopsgd compare`` shares one set of flags across presets). Settings that need the data
        (FedAvg's ``local_epochs``) are not included: :meth:`build_spec` applies them.
        """
        return preset_kwargs(self.algorithm.preset, self.preset_settings(), seed=self.execution.seed,
                             policies=self.spec_policies(), lenient=lenient,
                             compression=self.communication.compression())

    def build_spec(
        self, *, shard_sizes: Any = None, steps_per_epoch: int | None = None, lenient: bool = False
    ) -> AlgorithmSpec:
        """The :class:`AlgorithmSpec` of this config (see :func:`coopsgd.algorithms.registry.spec_from_settings`)."""
        speeds = self.clock.worker_speeds
        return spec_from_settings(self.algorithm.preset, self.algorithm.workers, self.preset_settings(),
                                  shard_sizes=shard_sizes, steps_per_epoch=steps_per_epoch, seed=self.execution.seed,
                                  policies=self.spec_policies(), lenient=lenient,
                                  compression=self.communication.compression(),
                                  worker_speeds=worker_speeds(speeds, self.algorithm.workers).tolist() if speeds else None)


@functools.cache
def _preset_facts(preset: str, base_algorithm: str | None) -> dict[str, Any]:
    """:meth:`RunConfig.preset_facts` of a preset (with a SlowMo ``base_algorithm``), from a spec of 4 workers."""
    facts: dict[str, Any] = {"inner_optimizer": None, "needs_losses": False, "sequential": False,
                             "gossips": False, "only_gossip": False, "control": False,
                             "normalized": False, "asynchronous": False}
    if preset not in declarations():
        return facts
    facts["gossips"] = declaration(preset).takes("topology")
    settings = {"base_algorithm": base_algorithm} if base_algorithm is not None else {}
    try:
        spec = spec_from_settings(preset, 4, settings, shard_sizes=[1.0] * 4, steps_per_epoch=1, lenient=True)
    except ConfigError:  # a setting the preset refuses: RunConfig's own checks name it
        return facts
    facts.update(inner_optimizer=spec.inner_optimizer, needs_losses=spec.needs_losses, control=spec.control,
                 normalized=bool(getattr(spec.schedule, "normalized", False)),
                 asynchronous=spec.asynchronous is not None,
                 sequential=bool(getattr(spec.schedule, "sequential", False)),
                 only_gossip=not spec.needs_losses  # (LSGD elects from losses: it has no gossip-only rounds)
                 and round_kinds(copy.deepcopy(spec.schedule), 4) <= {"gossip", "identity"})
    return facts


def _key(key: Any) -> str:
    return str(key).replace("-", "_")


def _section_fields(section: str, table: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A section table's entries by field name; an unknown one is an error naming it (and its section, when it
    is another section's key)."""
    own = {s.name: s for s in settings_of(SECTIONS[section])}
    out: dict[str, Any] = {}
    for key, value in table.items():
        k = _key(key)
        if k not in own:
            elsewhere = FLAT_KEYS.get(k)
            hint = f" ({k!r} belongs to [{elsewhere[0]}])" if elsewhere and elsewhere[0] != section else ""
            raise unknown_key(f"{source} [{section}]", str(key), own, value, hint=hint)
        out[k] = _finite(own[k].key, value)
    return out


def _finite(key: str, value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError.invalid(key, value, "must be a finite number")
    return value


def flat_settings(data: Any, *, source: str = "config") -> dict[str, Any]:
    """The settings of a config mapping by flat key: flat keys as they are, section tables
    (``{"optimizer": {"name": "adam"}}``) unfolded. An unknown key, or a setting given twice, is an error."""
    if not isinstance(data, Mapping):
        raise ConfigError.invalid(source, type(data).__name__, "must be a mapping of keys to values")
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in flat:
            raise ConfigError.invalid(key, value, f"{source}: given twice (as a key and in its section's table)")
        flat[key] = value

    for key, value in data.items():
        k = _key(key)
        if k in SECTIONS and isinstance(value, Mapping):
            cls_fields = {s.name: s for s in settings_of(SECTIONS[k])}
            for name, v in _section_fields(k, value, source).items():
                put(cls_fields[name].key, v)
        elif k in FLAT_KEYS:
            put(k, _finite(k, value))
        else:
            raise unknown_key(source, str(key), [*FLAT_KEYS, *SECTIONS], value)
    return flat


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file into a dict (safe parsers; no code is executed). A missing, empty, non-UTF-8
    or unparsable file, or one that does not hold a mapping, is a :class:`ConfigError` naming the file.

    A file with one ``[run]`` table (``run:`` in YAML) holds its settings in that table."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError.invalid("config", str(path), "no such file" if not p.exists() else not_a_file(p))
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError.invalid("config", str(path), "must end in .toml, .yaml, .yml or .json")
    text = read_text(p, "config")  # not empty, UTF-8: else one line naming the file
    try:
        data = _parse(text, suffix)
    except Exception as exc:  # parser errors: name the file and the parser's own position message
        raise ConfigError(f"config {str(path)!r} could not be parsed: {exc}", field="config", value=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError.invalid("config", str(path), "must contain a mapping of keys to values")
    if "run" in data and isinstance(data["run"], dict) and len(data) == 1:
        data = data["run"]  # allow a [run] table
    return data


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # Python 3.10: the same parser from PyPI
            import tomli as tomllib
        return tomllib.loads(text)
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_unique_keys)
    import yaml  # only for a YAML file: building the CLI parser stays cheap

    class UniqueKeyLoader(yaml.SafeLoader):
        """yaml's safe loader, refusing a key given twice in one mapping (as TOML does)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    if isinstance(key, (str, int, float, bool)) and key in seen:
                        raise ValueError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
                    if isinstance(key, (str, int, float, bool)):
                        seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 -- a SafeLoader


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice is refused (as TOML does), not silently the last."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out
