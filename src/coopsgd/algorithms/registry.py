"""Preset declarations: each named algorithm says once what it takes and what the theory says about it.

A :class:`PresetDecl` holds a preset's name, its constructor (a function of
:mod:`coopsgd.algorithms.presets`), its *settings* (:class:`PresetArg`: name, type, default, help,
choices / range), the inputs it takes from the data at run time (:class:`DataInput`) and its theory
hooks (:class:`TheoryHook`). Everything else derives from the declarations:

* the config keys of :class:`coopsgd.train.RunConfig` (a setting's key is its name) and
  :meth:`RunConfig.spec_kwargs <coopsgd.train.config.RunConfig.spec_kwargs>`;
* the CLI flags (``--lam-global`` for ``lam_global``), their help text, and the mapping from flags to
  constructor arguments;
* how a trainer turns settings plus data facts into a spec: :func:`spec_from_settings`;
* the preset-specific entries of ``coopsgd theory`` (:func:`coopsgd.analysis.analyze`).

Kinds of settings:

``"argument"``
    passed to the constructor under its own name (``tau``, ``alpha``, ``topology``, ...).
``"shared"``
    a run-wide setting the preset also takes (``seed``): it has no flag or config key of its own; the
    run's value is passed when the preset declares it.
``"derived"``
    a setting that is not a constructor argument but is turned into one at run time from the data by a
    :class:`DataInput` (FedAvg's ``local_epochs`` becomes ``tau``).

Boolean settings are switches: ``False`` means "not given".

See ``docs/presets.md`` for how to add a preset.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coopsgd.errors import ConfigError, check_float, check_int

if TYPE_CHECKING:
    from coopsgd.algorithms.communication import Compression
    from coopsgd.algorithms.spec import AlgorithmSpec, Policies
    from coopsgd.theory.bounds import ProblemConstants

__all__ = [
    "PresetArg",
    "DataInput",
    "TheoryHook",
    "PresetDecl",
    "SETTING_KINDS",
    "DATA_FACTS",
    "register",
    "declarations",
    "declaration",
    "settings_table",
    "takers",
    "preset_kwargs",
    "spec_from_settings",
]

SETTING_KINDS = ("argument", "shared", "derived")
#: Facts about the data a :class:`DataInput` may need (keyword arguments of :func:`spec_from_settings`).
DATA_FACTS = ("shard_sizes", "steps_per_epoch", "worker_speeds")
_TYPES = (int, float, str, bool)


@dataclass(frozen=True)
class PresetArg:
    """One setting of a preset.

    Attributes:
        name: the constructor argument, the config key and (``--`` + name with ``-`` for ``_``) the flag.
        type: ``int``, ``float``, ``str`` or ``bool`` (a switch).
        default: the preset's default (shown in help; ``None`` = computed, see ``default_text``).
        help: one line saying what it does.
        choices: allowed names (shown in help; the constructor validates them).
        low, high, low_open, high_open: the allowed range of a number (checked by :meth:`check`).
        kind: ``"argument"``, ``"shared"`` or ``"derived"`` (see the module docstring).
        default_text: how to show a computed default, e.g. ``"2/(m+2)"``.
        excludes: settings that cannot be given together with this one.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    kind: str = "argument"
    default_text: str | None = None
    excludes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise TypeError(f"setting {self.name!r}: type must be one of int, float, str, bool")
        if self.kind not in SETTING_KINDS:
            raise TypeError(f"setting {self.name!r}: kind must be one of {', '.join(SETTING_KINDS)}")

    @property
    def key(self) -> str:
        """The config key (``RunConfig`` field)."""
        return self.name

    @property
    def flag(self) -> str:
        """The CLI flag."""
        return "--" + self.name.replace("_", "-")

    def replace(self, **changes: Any) -> PresetArg:
        """A copy with some attributes changed (e.g. another preset's default)."""
        return dataclasses.replace(self, **changes)

    def default_str(self) -> str:
        if self.default_text is not None:
            return self.default_text
        return "off" if self.type is bool and not self.default else str(self.default)

    def range_str(self) -> str | None:
        """The allowed range as text, e.g. ``"in (0, 1]"`` or ``">= 1"``; ``None`` when unrestricted."""
        # (a one-sided range reads ">= 1", "> 0", "<= 5")
        if self.low is None and self.high is None:
            return None
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        lb = "-inf" if self.low is None else f"{self.low:g}"
        hb = "inf" if self.high is None else f"{self.high:g}"
        lo = "(" if self.low_open or self.low is None else "["
        hi = ")" if self.high_open or self.high is None else "]"
        return f"in {lo}{lb}, {hb}{hi}"

    def check(self, value: Any) -> Any:
        """``value`` converted to the declared type and checked against the declared range.

        Raises a :class:`ConfigError` naming the setting. Choices are left to the constructor (topology
        and weight names are normalised there).
        """
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError.invalid(self.name, value, "must be true or false")
            return value
        if self.type is int:
            v = check_int(self.name, value, minimum=None if self.low is None else int(self.low))
            if self.high is not None:
                v = check_int(self.name, v, maximum=int(self.high))
            return v
        if self.type is float:
            if isinstance(value, str):  # e.g. generalized_elastic's alpha="best": the constructor decides
                return value
            return check_float(self.name, value, low=self.low, high=self.high, low_open=self.low_open,
                               high_open=self.high_open)
        if not isinstance(value, str):
            raise ConfigError.invalid(self.name, value, "must be a string")
        return value


@dataclass(frozen=True)
class DataInput:
    """A constructor argument a preset takes from the data at run time.

    Attributes:
        argument: the constructor argument it fills (``"sample_counts"``, ``"tau"``).
        needs: the data facts it uses (names from :data:`DATA_FACTS`).
        compute: ``(settings, facts) -> value``; ``settings`` are the preset's given settings (derived
            ones included), ``facts`` the available data facts.
        when: a setting that switches it on (FedAvg's ``local_epochs``): without it the input is not used;
            with it, missing facts are an error naming that setting. ``None``: used whenever the facts
            are available, silently skipped otherwise.
        help: what it does, for docs and help text.
    """

    argument: str
    needs: tuple[str, ...]
    compute: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
    when: str | None = None
    help: str = ""

    def __post_init__(self) -> None:
        unknown = [f for f in self.needs if f not in DATA_FACTS]
        if unknown:
            raise TypeError(f"data input {self.argument!r}: unknown facts {unknown}; known: {', '.join(DATA_FACTS)}")


@dataclass(frozen=True)
class TheoryHook:
    """Preset-specific entries of ``coopsgd theory`` (:func:`coopsgd.analysis.analyze`).

    Attributes:
        name: a short label (for docs and debugging).
        facts: ``(spec, out, notes) -> None`` adds keys to the summary ``out`` (which already holds
            ``zeta``, ``spectral_gap``, ``eigenvalues``, ``theory_applies``) and may append notes.
        bounds: ``(spec, constants, zeta, res) -> None`` adds bound reports to ``res``; ``zeta`` is
            ``None`` when the theorems do not apply to the spec's matrix (then ``res`` holds only a note).
    """

    name: str
    facts: Callable[[AlgorithmSpec, dict[str, Any], list[str]], None] | None = None
    bounds: Callable[[AlgorithmSpec, ProblemConstants, float | None, dict[str, Any]], None] | None = None


@dataclass(frozen=True)
class PresetDecl:
    """One preset: name, constructor, settings, data inputs and theory hooks (see the module docstring)."""

    name: str
    build: Callable[..., AlgorithmSpec]
    summary: str
    args: tuple[PresetArg, ...] = ()
    inputs: tuple[DataInput, ...] = ()
    theory: tuple[TheoryHook, ...] = ()

    def __post_init__(self) -> None:
        params = set(inspect.signature(self.build).parameters)
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise TypeError(f"preset {self.name!r}: a setting is declared twice")
        for a in self.args:
            if a.kind in ("argument", "shared") and a.name not in params:
                raise TypeError(f"preset {self.name!r}: setting {a.name!r} is not an argument of {self.build.__name__}")
            if a.kind == "derived" and a.name in params:
                raise TypeError(f"preset {self.name!r}: derived setting {a.name!r} must not be a constructor argument")
            for other in a.excludes:
                if other not in names:
                    raise TypeError(f"preset {self.name!r}: {a.name!r} excludes unknown setting {other!r}")
        for inp in self.inputs:
            if inp.argument not in params:
                raise TypeError(f"preset {self.name!r}: data input {inp.argument!r} is not a constructor argument")
            if inp.when is not None and inp.when not in names:
                raise TypeError(f"preset {self.name!r}: data input switch {inp.when!r} is not a declared setting")

    def arg(self, name: str) -> PresetArg | None:
        """The declared setting ``name`` (``None`` when the preset does not take it)."""
        return next((a for a in self.args if a.name == name), None)

    @property
    def settings(self) -> tuple[PresetArg, ...]:
        """The settings with a flag and config key of their own (not ``"shared"``)."""
        return tuple(a for a in self.args if a.kind != "shared")

    def takes(self, name: str) -> bool:
        return self.arg(name) is not None


_REGISTRY: dict[str, PresetDecl] = {}


def register(decl: PresetDecl) -> PresetDecl:
    """Add a declaration (each name once). Settings with one name must agree in type and kind across
    presets, since they share one flag and one config key."""
    if decl.name in _REGISTRY:
        raise ValueError(f"preset {decl.name!r} is already declared")
    for a in decl.args:
        for other in _REGISTRY.values():
            b = other.arg(a.name)
            if b is not None and (b.type is not a.type or b.kind != a.kind):
                raise TypeError(f"setting {a.name!r} of {decl.name!r} disagrees with {other.name!r} in type or kind")
    _REGISTRY[decl.name] = decl
    return decl


def declarations() -> dict[str, PresetDecl]:
    """Every declared preset by name, in declaration order."""
    import coopsgd.algorithms.presets  # noqa: F401  (the built-in declarations register on import)

    return dict(_REGISTRY)


def declaration(name: str) -> PresetDecl:
    """The declaration of preset ``name``; an unknown name is a ConfigError listing the presets."""
    decls = declarations()
    if name not in decls:
        raise ConfigError.invalid("preset", name, f"choose one of {', '.join(decls)}")
    return decls[name]


def settings_table() -> dict[str, PresetArg]:
    """Every setting with a flag / config key, by name (the first preset declaring it gives its help)."""
    out: dict[str, PresetArg] = {}
    for decl in declarations().values():
        for a in decl.settings:
            out.setdefault(a.name, a)
    return out


def takers(name: str) -> list[tuple[str, PresetArg]]:
    """``(preset, declaration)`` for every preset that takes setting ``name``."""
    return [(d.name, a) for d in declarations().values() if (a := d.arg(name)) is not None]


def _given(value: Any) -> bool:
    return value is not None and value is not False


def preset_kwargs(
    name: str,
    settings: Mapping[str, Any],
    *,
    seed: int | None = None,
    policies: Policies | None = None,
    lenient: bool = False,
    compression: Compression | None = None,
) -> dict[str, Any]:
    """Constructor keyword arguments of preset ``name`` from ``settings`` (derived settings excluded).

    ``None`` and ``False`` values mean "not given". A given setting the preset does not take is a
    ConfigError naming the setting and the preset, or dropped when ``lenient``. Given values are checked
    against their declaration (:meth:`PresetArg.check`). ``seed`` is passed when the preset takes it,
    ``policies`` and ``compression`` (every preset takes it: SPEC §11) when given.
    """
    decl = declaration(name)
    out: dict[str, Any] = {}
    given = {k: v for k, v in settings.items() if _given(v)}
    for key, value in given.items():
        a = decl.arg(key)
        if a is None or a.kind == "shared":
            if lenient:
                continue
            raise ConfigError.invalid(key, value, f"preset {name!r} does not take this setting")
        value = a.check(value)
        for other in a.excludes:
            if other in given:
                raise ConfigError.invalid(key, value, f"give {other} or {key}, not both")
        if a.kind == "argument":
            out[key] = value
    if seed is not None and decl.takes("seed"):
        out["seed"] = seed
    if policies is not None:
        out["policies"] = policies
    if compression is not None:
        out["compression"] = compression
    return out


def spec_from_settings(
    name: str,
    workers: int,
    settings: Mapping[str, Any],
    *,
    shard_sizes: Sequence[float] | None = None,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    policies: Policies | None = None,
    lenient: bool = False,
    compression: Compression | None = None,
    worker_speeds: Sequence[float] | None = None,
) -> AlgorithmSpec:
    """Build preset ``name`` for ``workers`` workers from settings and facts about the data.

    This is the one place where a trainer turns a run's settings into an :class:`AlgorithmSpec`; it
    never needs to know which preset it builds.

    Args:
        name: a declared preset (unknown: ConfigError on ``preset``).
        workers: the number of workers m.
        settings: setting name -> value, e.g. ``{"tau": 4, "alpha": None, "nonblocking": False}`` (a
            config's preset fields; :meth:`coopsgd.train.RunConfig.preset_settings` gives them). ``None``
            and ``False`` mean "not given" (the preset's default applies).
        shard_sizes: the number of training samples of each worker (FedAvg weights clients by them).
        steps_per_epoch: steps per pass over a worker's shard (FedAvg turns ``local_epochs`` into
            ``tau = max(1, round(local_epochs * steps_per_epoch))``).
        worker_speeds: each worker's simulated speed (the clock's speed classes; FedAvg's ``local_work="budget"``
            gives faster clients more local steps).
        seed: the run's seed, passed to presets that take one.
        policies: buffer / optimizer-state policies (default :class:`Policies()`).
        lenient: drop settings the preset does not take (``coopsgd compare`` shares one set of settings
            across presets). Not lenient: such a setting is a ConfigError naming the setting and the
            preset.
        compression: what the rounds send (:class:`~coopsgd.algorithms.communication.Compression`), for any
            preset; ``None``: uncompressed.

    Data inputs (:class:`DataInput`) are applied after the settings and override them (``tau`` from
    ``local_epochs``); an input switched on by a setting but missing its facts is a ConfigError naming
    the setting. Values are checked by the declarations, then by the constructor itself.
    """
    from coopsgd.algorithms.presets import make_preset

    decl = declaration(name)
    kwargs = preset_kwargs(name, settings, seed=seed, policies=policies, lenient=lenient, compression=compression)
    taken: dict[str, Any] = {}  # the given settings this preset takes, checked (derived ones included)
    for key, value in settings.items():
        a = decl.arg(key)
        if _given(value) and a is not None and a.kind != "shared":
            taken[key] = a.check(value)
    facts = {k: v for k, v in (("shard_sizes", shard_sizes), ("steps_per_epoch", steps_per_epoch),
                               ("worker_speeds", worker_speeds)) if v is not None}
    for inp in decl.inputs:
        if inp.when is not None and inp.when not in taken:
            continue
        missing = [f for f in inp.needs if f not in facts]
        if missing:
            if inp.when is None:
                continue
            raise ConfigError.invalid(inp.when, taken[inp.when],
                                      f"needs the data's {', '.join(missing)} (a run with a data set)")
        kwargs[inp.argument] = inp.compute(taken, facts)
    return make_preset(name, workers, **kwargs)
