"""The flags of a run configuration, generated from its sections' declarations (``coopsgd run`` and
``coopsgd compare``): one flag per setting (``--batch-size`` for ``batch_size``), grouped by section, with
the setting's help, choices and default; and the config built from the flags and ``--config FILE``."""

from __future__ import annotations

import argparse
from typing import Any

from coopsgd.algorithms.registry import declarations
from coopsgd.cli.common import setting_help
from coopsgd.errors import ConfigError
from coopsgd.settings import SettingField
from coopsgd.settings import default_text as shown_default
from coopsgd.train.config import FLAT_KEYS, SECTIONS, RunConfig, config_settings, flat_settings, load_config

__all__ = ["add_config_flags", "config_from_args", "file_keys", "flag_help"]

#: The reference engine's objective arguments that have flags of their own (``--sigma`` ...).
OBJECTIVE_FLAGS = (("sigma", float), ("heterogeneity", float), ("dim", int), ("rank", int))


def flag_help(s: SettingField, *, defaults: dict[str, Any] | None = None, other: str = "",
              default_text: dict[str, str] | None = None) -> str:
    """A setting's ``--help`` line: what it does, its choices and its default: the setting's, or the command's
    own (``defaults``; ``other`` names the command whose default is the setting's, shown next to it), or
    ``default_text``. A preset setting's help (choices, range, each preset's default) is the declarations'."""
    if s.info.preset:
        return setting_help(s.key)
    text = s.info.help
    allowed = s.info.allowed()
    if allowed:
        text += "; choices: " + ", ".join(allowed)
    own, words = defaults or {}, default_text or {}
    if s.key in own:
        text += f" (default: {shown_default(own[s.key])}; {other}: {s.default_text()})"
    else:
        text += f" (default: {words.get(s.key) or s.default_text()})"
    return text.replace("%", "%%")


class NotANumber(str):
    """A number flag's text that is not a number (``--lr abc``): kept as given and refused by
    :func:`given_flags` with a one-line message of the shape a config file's or the Python API's bad value
    gets (``--lr='abc' is invalid: must be a number``), not argparse's two-line usage error."""

    kind: type = float


def _number(kind: type) -> Any:
    """argparse's ``type`` for an int or float flag: the number, or the text as a :class:`NotANumber`."""
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            bad = NotANumber(text)
            bad.kind = kind
            return bad
    parse.__name__ = kind.__name__
    return parse


def _flag_kind(s: SettingField) -> dict[str, Any]:
    """The argparse arguments of a setting's flag, from its type."""
    if s.kind is bool:
        return {"action": argparse.BooleanOptionalAction if s.optional else "store_true"}
    if s.kind in (int, float):
        return {"type": _number(s.kind)}
    return {"type": str}  # a list is a comma-separated text


def add_config_flags(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                     other: str = "", default_text: dict[str, str] | None = None) -> None:
    """One flag per setting of :class:`RunConfig`, in one group per section; only given flags are kept
    (``argparse.SUPPRESS``), so that a config file's value stands unless a flag overrides it. See
    :func:`flag_help` for ``defaults``, ``other`` and ``default_text``."""
    groups = {name: p.add_argument_group(f"{name} settings") for name in SECTIONS}
    for section, s in config_settings():
        if s.key in skip or not s.info.flag:
            continue
        groups[section].add_argument(s.flag, dest=s.key, default=argparse.SUPPRESS, **_flag_kind(s),
                                     help=flag_help(s, defaults=defaults, other=other, default_text=default_text))
        if s.key == "max_steps":
            groups[section].add_argument("--steps", dest="max_steps", type=_number(int), default=argparse.SUPPRESS,
                                         help="alias of --max-steps (same default)")
    for name, conv in OBJECTIVE_FLAGS:
        groups["problem"].add_argument(f"--{name}", dest=f"obj_{name}", type=_number(conv), default=argparse.SUPPRESS,
                                       help=f"reference engine: objective argument {name} (default: the objective's own)")
    p.add_argument("--config", default=None, help="TOML / YAML / JSON config file, flat keys or [section] tables; "
                                                  "flags override it (default: none, flags and defaults only)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def file_keys(path: str | None) -> set[str]:
    """The flat keys a config file gives (none without a file); an unknown key is an error naming the file."""
    if not path:
        return set()
    return set(flat_settings(load_config(path), source=f"config {path!r}"))


def _checked_number(key: str, value: Any) -> Any:
    """A number flag's value; its text when it is not a number is an error naming the flag (``--tau='abc' is
    invalid: must be an integer``: the shape of a config file's bad value, ``tau='abc' is invalid: ...``)."""
    if isinstance(value, NotANumber):
        raise ConfigError.invalid("--" + key.replace("_", "-"), str(value),
                                  "must be an integer" if value.kind is int else "must be a number")
    return value


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config settings given as flags, by flat key (a number flag whose text is not a number is an error
    naming the setting)."""
    return {k: _checked_number(k, v) for k, v in vars(args).items() if k in FLAT_KEYS}


def _used_by_some_preset(data: dict[str, Any], key: str) -> bool:
    """Whether some preset's run of these settings uses ``key`` (for a command that runs several presets)."""
    for preset in declarations():
        try:
            cfg = RunConfig.shared(**{**data, "preset": preset})
        except ConfigError:
            continue
        if key not in {k for k, _, _ in cfg.unused()}:
            return True
    return False


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """The run's config: ``--config FILE``'s settings, the flags over them, then ``overrides`` (the command's
    own settings). A bad value from the file is an error naming the file too; a setting the run does not use
    is refused when the user gave it and left out when the command did (:func:`_config`)."""
    if args.config is not None and not str(args.config).strip():  # e.g. an unset shell variable
        raise ConfigError.invalid("--config", args.config, "must be a config file, not an empty string (leave "
                                                           "--config out to use the flags and defaults only)")
    source = f"config {args.config!r}" if args.config else "config"
    data = flat_settings(load_config(args.config), source=source) if args.config else {}
    from_file = set(data)
    flags = given_flags(args)
    if "max_steps" in flags:  # a length given on the command line replaces the file's, whichever way it was given
        data.pop("epochs", None)
    elif "epochs" in flags:
        data.pop("max_steps", None)
    data.update(flags)
    for k, v in vars(args).items():
        if k.startswith("obj_"):
            data.setdefault("objective_args", {})[k[4:]] = _checked_number(k[4:], v)
    user = set(data)
    data.update(overrides)
    if data.get("objective") == "sinc" and isinstance(data.get("objective_args"), dict):
        data["objective_args"] = {k: v for k, v in data["objective_args"].items() if k == "sigma"}
    try:
        return _config(data, user, shared="preset" in overrides and "preset" not in user)
    except ConfigError as exc:  # a bad value from the config file: name the file too
        if not args.config or str(args.config) in str(exc) or exc.field is None:
            raise
        if exc.field.replace("-", "_") not in from_file or exc.field in vars(args):
            raise
        raise ConfigError(f"config {args.config!r}: {exc}", field=exc.field, value=exc.value) from None


def _config(data: dict[str, Any], user: set[str], *, shared: bool) -> RunConfig:
    """The config of ``data``: a setting the user gave (a flag, a config-file key) that the run does not use is
    refused (:meth:`RunConfig.unused`); one the command filled in (its own defaults, e.g. ``coopsgd compare``'s
    model) is left out where the run does not use it. ``shared``: the command runs several presets from these
    settings (the preset is the command's): a setting is refused only when no preset would use it, and the
    result is :meth:`RunConfig.shared` (each run's config is made with ``replace(preset=...)``)."""
    cfg = RunConfig.shared(**data)
    unused = [key for key, _, _ in cfg.unused()]
    dropped = [key for key in unused if key not in user]
    if dropped:
        data = {k: v for k, v in data.items() if k not in dropped}
        cfg = RunConfig.shared(**data)
    if not shared:
        return RunConfig(**data)
    for key, value, reason in cfg.unused():
        if not _used_by_some_preset(data, key):
            raise ConfigError.invalid(key, value, f"{reason}, nor does any other preset; leave it out")
    return cfg
