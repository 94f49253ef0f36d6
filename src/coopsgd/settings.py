"""Settings declared once: a dataclass field carries its help text, choices and range as metadata.

A configuration section is a frozen dataclass whose fields are declared with :func:`setting`::

    @dataclass(frozen=True)
    class ScheduleSettings:
        lr: float = setting(0.1, help="learning rate", low=0.0, low_open=True)

Everything else is generated from these declarations: the CLI flags (``--lr``; ``bool`` a switch,
``bool | None`` a ``--x`` / ``--no-x`` pair, a list a comma-separated value), ``--help`` (the help text, the
choices and the default), the config-file loader (keys, did-you-mean for an unknown key) and the validation
(:func:`check_section`: the type, the choices, the range; a bad value is a :class:`ConfigError` naming the
key, the value and what is allowed). Adding a setting is one field in one section.

This module is a leaf: it imports only :mod:`coopsgd.errors` (the CLI builds its parser from it without
importing torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["Setting", "SettingField", "setting", "settings_of", "check_section", "check_value", "closest",
           "unknown_key", "as_number_list", "default_text", "is_default", "unused_settings"]

#: The metadata key of a field declared with :func:`setting`.
METADATA_KEY = "coopsgd.setting"


@dataclass(frozen=True)
class Setting:
    """What a field says about itself (the metadata :func:`setting` attaches).

    Attributes:
        help: one line saying what it does (shown by ``--help``).
        choices: the allowed names, or a function returning them (read when needed: the registries).
        open_choices: the choices are shown in the help but not enforced here (checked elsewhere, e.g. the
            model when it is built).
        low, high, low_open, high_open: the allowed range of a number (of each entry of a list).
        default_text: how ``--help`` shows a computed or "not given" default, e.g. ``"from --epochs"``.
        key: the config key and flag name when it is not the field's name (``optimizer`` for
            ``OptimizerSettings.name``).
        flag: whether the setting has a CLI flag (a mapping such as ``model_args`` is config-file only).
        check: a check of its own, ``check(key, value) -> value``, in place of the type's.
        preset: a preset setting: its help, range and defaults are the preset declarations'
            (:mod:`coopsgd.algorithms.registry`), which also check it (and say which presets take it).
        used_when: when a run uses the setting: ``used_when(config) -> None`` when the whole configuration
            ``config`` uses it, else the reason it does not (``"the optimizer is sgd"``). A setting given a
            value other than its default in a configuration that does not use it is refused
            (:func:`unused_settings`); ``None``: every run uses it.
    """

    help: str
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    open_choices: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    default_text: str | None = None
    key: str | None = None
    flag: bool = True
    check: Callable[[str, Any], Any] | None = None
    preset: bool = False
    used_when: Callable[[Any], str | None] | None = None

    def allowed(self) -> tuple[str, ...] | None:
        """The choices (a function's read now)."""
        if self.choices is None or isinstance(self.choices, tuple):
            return self.choices
        return tuple(self.choices())


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, help: str,
            **meta: Any) -> Any:
    """A dataclass field with its :class:`Setting` (``help``, ``choices``, ``low``, ...) as metadata.

    ``factory`` makes a mutable default (a list, a mapping) per instance."""
    info = Setting(help=help, **meta)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={METADATA_KEY: info})
    return dataclasses.field(default=default, metadata={METADATA_KEY: info})


@dataclass(frozen=True)
class SettingField:
    """One declared setting of a section: its key, its field, its value type and its :class:`Setting`.

    ``kind`` is the value's type: ``bool``, ``int``, ``float``, ``str``, ``list`` (of numbers) or ``dict``;
    ``optional``: ``None`` is allowed (not given, or "the default computed elsewhere")."""

    key: str
    name: str
    kind: type
    optional: bool
    default: Any
    info: Setting

    def is_default(self, value: Any) -> bool:
        """Whether ``value`` is this setting's default (a setting left at its default is never refused as unused)."""
        return is_default(self.default, value)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def default_text(self) -> str:
        """The default as ``--help`` shows it."""
        if self.info.default_text is not None:
            return self.info.default_text
        return default_text(self.default)


def _value_type(tp: Any) -> tuple[type, bool]:
    """``(kind, optional)`` of an annotation: ``float | None`` is ``(float, True)``, ``list[float]`` is ``list``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"a setting takes one type (or None), not {tp}")
        return _value_type(args[0])[0], True
    base = origin if origin is not None else tp
    if base not in (bool, int, float, str, list, dict):
        raise TypeError(f"a setting is a bool, int, float, str, list or dict, not {tp}")
    return base, False


@functools.cache
def settings_of(cls: type) -> tuple[SettingField, ...]:
    """The declared settings of a section class, in declaration order (fields without :func:`setting`
    metadata, such as ``OptimizerSettings.torch_class``, are not settings: no key, no flag)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get(METADATA_KEY)
        if info is None:
            continue
        kind, optional = _value_type(hints[f.name])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        out.append(SettingField(info.key or f.name, f.name, kind, optional, default, info))
    return tuple(out)


def check_value(s: SettingField, value: Any) -> Any:
    """``value`` checked against its declaration and normalised (an int for a float setting becomes a float,
    a comma-separated text a list); a bad one is a :class:`ConfigError` naming the key."""
    info, key = s.info, s.key
    if info.preset or (value is None and s.optional):
        return value
    if info.check is not None:
        return info.check(key, value)
    if s.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError.invalid(key, value, "must be true, false or unset (auto)" if s.optional
                                      else "must be true or false")
        return value
    if s.kind is int:
        return check_int(key, value, minimum=None if info.low is None else int(info.low))
    if s.kind is float:
        return check_float(key, not_text(key, value), low=info.low, high=info.high, low_open=info.low_open,
                           high_open=info.high_open)
    if s.kind is list:
        entries = as_number_list(key, value)
        return [check_float(key, not_text(key, v), low=info.low, high=info.high, low_open=info.low_open,
                            high_open=info.high_open) for v in entries]
    if s.kind is dict:
        if not isinstance(value, Mapping):
            raise ConfigError.invalid(key, value, "must be a mapping of argument names to values")
        return dict(value)
    allowed = info.allowed()
    if allowed is not None and not info.open_choices:
        if value not in allowed:
            raise ConfigError.invalid(key, value, f"choose one of {', '.join(allowed)}")
    elif not isinstance(value, str):
        raise ConfigError.invalid(key, value, "must be a name (a string)")
    return value


def not_text(key: str, value: Any) -> Any:
    """``value`` unless it is a string: a number given as text (``lr = "0.1"`` in a config file, ``lr="0.1"``
    through the Python API) is refused as an integer setting's is, with the same one-line message, whatever
    the text says (the CLI parses its flags' text itself: :mod:`coopsgd.cli.config_flags`)."""
    if isinstance(value, str):
        raise ConfigError.invalid(key, value, "must be a number, not a string")
    return value


def is_default(default: Any, value: Any) -> bool:
    """``value == default``, with a type: ``1`` and ``True`` are not the same setting, ``1`` and ``1.0`` are."""
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 -- an object without a usable ==: not the default
        return False


def unused_settings(cls: type, section: object, config: Any) -> list[tuple[SettingField, Any, str]]:
    """The settings of ``section`` (an instance of the section class ``cls``) that hold a value other than their
    default although ``config`` does not use them: ``(declaration, value, why not)`` in declaration order,
    from each setting's ``used_when``."""
    out = []
    for s in settings_of(cls):
        if s.info.used_when is None:
            continue
        value = getattr(section, s.name)
        if s.is_default(value):
            continue
        reason = s.info.used_when(config)
        if reason is not None:
            out.append((s, value, reason))
    return out


def check_section(obj: object) -> None:
    """Check and normalise every declared setting of a frozen section instance, in declaration order
    (call it from ``__post_init__``)."""
    cls: type = type(obj)
    for s in settings_of(cls):
        value = getattr(obj, s.name)
        checked = check_value(s, value)
        if checked is not value:
            object.__setattr__(obj, s.name, checked)


#: List settings whose entries may repeat (speed classes: ``1,0.5,1``); in the others (milestones) an entry given
#: twice is a typo.
REPEATABLE_LISTS = frozenset({"worker_speeds"})


def as_number_list(key: str, value: Any) -> list[Any]:
    """A list setting from a list, one number, ``None`` (empty) or a comma-separated text (a flag). An entry
    given twice is refused (``100,100`` is a typo, not a setting), except in :data:`REPEATABLE_LISTS`."""
    if value is None:
        return []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        try:
            out = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ConfigError.invalid(key, value, "a list of numbers, e.g. 100,150") from None
    elif isinstance(value, (list, tuple)):
        out = list(value)
    else:
        raise ConfigError.invalid(key, value, "a list of numbers, e.g. [100, 150]")
    repeated = [v for i, v in enumerate(out) if isinstance(v, (int, float)) and v in out[:i]]
    if repeated and key not in REPEATABLE_LISTS:
        raise ConfigError.invalid(key, value, f"{repeated[0]!r} is given twice; list each entry once")
    return out


def default_text(value: Any) -> str:
    """A default as ``--help`` shows it: ``on`` / ``off``, ``5`` for ``5.0``, ``none`` for nothing."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def closest(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a misspelt one, if any is close."""
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
    return match[0] if match else None


def unknown_key(source: str, key: str, known: Iterable[str], value: Any = None, *, hint: str = "") -> ConfigError:
    """The error for an unknown key: it names the key, the closest known one and every allowed key."""
    names = sorted(known)
    close = closest(key, names)
    did_you_mean = f" (did you mean {close!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{did_you_mean}{hint}; allowed keys: {', '.join(names)}",
                       field=key, value=value)
