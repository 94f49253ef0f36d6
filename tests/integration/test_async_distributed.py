"""The asynchronous presets on the distributed engine: a real parameter server on rank 0 applies each push in the
order it arrives, with FedBuff's buffer and staleness weights (one small run of 3 ranks, with a resume)."""

from __future__ import annotations

import json
import math

import pytest

from coopsgd.errors import ConfigError
from coopsgd.train import RunConfig
from coopsgd.train.trainer import run

pytestmark = pytest.mark.slow  # starts processes


def test_fedbuff_on_a_real_parameter_server_counts_every_push_and_resumes(tmp_path) -> None:
    base = dict(preset="fedbuff", engine="distributed", workers=3, tau=2, buffer_size=2, staleness="sqrt",
                batch_size=16, eval_every=4, eval_samples=64, lr=0.05, out=str(tmp_path / "r"))
    first = run(RunConfig(**base, max_steps=4, checkpoint_every=4))
    assert first["arrivals"] == 6 and first["server_updates"] == 3  # 3 ranks x 2 pushes, K = 2
    done = run(RunConfig(**base, max_steps=8), resume=str(tmp_path / "r"))
    # the server's buffer, versions and statistics came back from the checkpoint and went on
    assert done["arrivals"] == 12 and done["server_updates"] == 6
    # the staleness is the real one: between its pull and its push a rank may see the other two ranks' pushes
    assert 0 <= done["staleness_mean"] <= done["staleness_max"] <= 4
    assert math.isfinite(done["final"]["test_loss"])
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["arrivals"] for r in records if r["step"] > 0] == [6, 12]
    with pytest.raises(ConfigError, match="concurrency"):
        RunConfig(**{**base, "concurrency": 2})
