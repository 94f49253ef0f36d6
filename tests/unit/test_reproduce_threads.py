"""``coopsgd reproduce`` trains with the threads of each run (coopsgd.experiments.harness.run_threads_of), so that
a result does not depend on the machine's core count or OMP_NUM_THREADS."""

from __future__ import annotations

import torch

from coopsgd.experiments.harness import run_threads_of
from coopsgd.train.config import RunConfig


def test_small_models_run_with_one_thread_and_the_count_is_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with run_threads_of(RunConfig(model="mlp")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with run_threads_of(RunConfig(model="mlp", threads=2)):  # a given count wins
            assert torch.get_num_threads() == 2
        with run_threads_of(RunConfig(model="vgg16")):  # a large model keeps torch's own
            assert torch.get_num_threads() == 2
        try:
            with run_threads_of(RunConfig(model="lenet")):
                raise RuntimeError("a run that fails")
        except RuntimeError:
            pass
        assert torch.get_num_threads() == 2  # restored on an error too
    finally:
        torch.set_num_threads(before)
