"""The cheap tables the CLI shows (coopsgd.catalog, the help's choices) match the real registries."""

from __future__ import annotations

import re

import pytest

from coopsgd.catalog import (
    DATASETS,
    MATRIX_COMPLETION,
    MODELS,
    REPRODUCTION_ALIASES,
    REPRODUCTIONS,
    reproduction_names,
)
from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig


def test_reproductions_match_the_experiments_registry() -> None:
    from coopsgd.experiments.registry import EXPERIMENTS

    listed = {n: r for n, r in REPRODUCTIONS.items() if n != "matrix-completion"}
    assert set(listed) == set(EXPERIMENTS), "add / remove the experiment's line in coopsgd/catalog.py"
    for name, entry in EXPERIMENTS.items():
        assert listed[name].description == entry.description, name
        assert listed[name].engines == entry.engines, name
    assert set(REPRODUCTION_ALIASES.values()) <= set(REPRODUCTIONS)
    assert reproduction_names() == sorted({*EXPERIMENTS, "matrix-completion", "lsgd-matrix-completion"})


def test_matrix_completion_settings_match() -> None:
    from coopsgd.experiments.matrix_completion import MC_QUICK, MC_SETTINGS

    for key, value in MATRIX_COMPLETION["full"].items():
        assert MC_SETTINGS[key] == value, key
    for key, value in MATRIX_COMPLETION["quick"].items():
        assert MC_QUICK[key] == value, key


def test_models_and_datasets_match() -> None:
    from coopsgd.data import DATASETS as REAL_DATASETS
    from coopsgd.models import MODELS as REAL_MODELS

    assert tuple(REAL_MODELS) == MODELS
    assert tuple(REAL_DATASETS) == DATASETS


def _allowed(field: str, **extra: object) -> tuple[str, ...]:
    """The names RunConfig accepts for ``field``, read from its error for a bogus value."""
    with pytest.raises(ConfigError) as info:
        RunConfig(**{field: "no-such-name"}, **extra)  # type: ignore[arg-type]
    match = re.search(r"choose one of ([^(]*?)(?: \(|$)", str(info.value))
    assert match, str(info.value)
    return tuple(v.strip() for v in match.group(1).split(","))


def test_help_choices_are_what_runconfig_accepts() -> None:
    from coopsgd.train.config import config_settings

    checked = set()
    choices = {s.key: s.info.allowed() for _, s in config_settings() if s.info.allowed() and not s.info.preset}
    for field, names in choices.items():
        if field in ("model", "dataset", "device", "compress"):  # checked at build time / above / below
            continue
        assert _allowed(field) == tuple(names), field
        checked.add(field)
    assert {"engine", "partition", "objective", "loss_estimate", "dtype", "executor", "compute", "nan_policy",
            "buffers", "optimizer_state", "downpour_order", "preset", "optimizer"} <= checked
    assert choices["model"] == MODELS and choices["dataset"] == DATASETS
    assert choices["device"] == ("cpu", "cuda", "cuda:N", "mps")
    # compress is a grammar (coopsgd.compression.COMPRESSOR_SPECS): every name it shows is a compressor
    from coopsgd.compression.spec import _BUILDERS

    assert sorted(c.split(":")[0].split("[")[0] for c in choices["compress"]) == sorted(_BUILDERS)
