"""The flags of a run configuration, generated from its sections' declarations (``coopsgd run`` and
``coopsgd compare``): one flag per setting (``--batch-size`` for ``batch_size``), grouped by section, with
the setting's help, choices and default; and the config built from the flags and ``--config FILE``."""

from __future__ import annotations

import argparse
from typing import Any

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


def _flag_kind(s: SettingField) -> dict[str, Any]:
    """The argparse arguments of a setting's flag, from its type."""
    if s.kind is bool:
        return {"action": argparse.BooleanOptionalAction if s.optional else "store_true"}
    return {"type": {int: int, float: float}.get(s.kind, str)}  # a list is a comma-separated text


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
            groups[section].add_argument("--steps", dest="max_steps", type=int, default=argparse.SUPPRESS,
                                         help="alias of --max-steps (same default)")
    for name, conv in OBJECTIVE_FLAGS:
        groups["problem"].add_argument(f"--{name}", dest=f"obj_{name}", type=conv, default=argparse.SUPPRESS,
                                       help=f"reference engine: objective argument {name} (default: the objective's own)")
    p.add_argument("--config", default=None, help="TOML / YAML / JSON config file, flat keys or [section] tables; "
                                                  "flags override it (default: none, flags and defaults only)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def file_keys(path: str | None) -> set[str]:
    """The flat keys a config file gives (none without a file); an unknown key is an error naming the file."""
    if not path:
        return set()
    return set(flat_settings(load_config(path), source=f"config {path!r}"))


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The config settings given as flags, by flat key."""
    return {k: v for k, v in vars(args).items() if k in FLAT_KEYS}


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    """The run's config: ``--config FILE``'s settings, the flags over them, then ``overrides``. A bad value from
    the file is an error naming the file too."""
    if args.config is not None and not str(args.config).strip():  # e.g. an unset shell variable
        raise ConfigError.invalid("--config", args.config, "must be a config file, not an empty string (leave "
                                                           "--config out to use the flags and defaults only)")
    source = f"config {args.config!r}" if args.config else "config"
    data = flat_settings(load_config(args.config), source=source) if args.config else {}
    from_file = set(data)
    data.update(given_flags(args))
    for k, v in vars(args).items():
        if k.startswith("obj_"):
            data.setdefault("objective_args", {})[k[4:]] = v
    data.update(overrides)
    if data.get("objective") == "sinc" and isinstance(data.get("objective_args"), dict):
        data["objective_args"] = {k: v for k, v in data["objective_args"].items() if k == "sigma"}
    try:
        return RunConfig(**data)
    except ConfigError as exc:  # a bad value from the config file: name the file too
        if not args.config or str(args.config) in str(exc) or exc.field is None:
            raise
        if exc.field.replace("-", "_") not in from_file or exc.field in vars(args):
            raise
        raise ConfigError(f"config {args.config!r}: {exc}", field=exc.field, value=exc.value) from None
