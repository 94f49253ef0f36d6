"""Test-session settings shared by every test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the executor-calibration cache of the tests out of the user's ~/.cache (one per test session;
    tests that need their own set COOPSGD_CACHE_DIR themselves)."""
    if "COOPSGD_CACHE_DIR" not in os.environ:
        os.environ["COOPSGD_CACHE_DIR"] = str(tmp_path_factory.mktemp("coopsgd-cache"))


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without --out writes to runs/<preset>-<time>/ under the current directory: every test runs in
    its own temporary directory, so nothing lands in the checkout."""
    monkeypatch.chdir(tmp_path)
