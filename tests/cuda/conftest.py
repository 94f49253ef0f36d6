"""Tests that need a CUDA device (skipped without one): the ``cuda`` marker, registered here for this folder."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); run by benchmarks/gpu_check.sh")
