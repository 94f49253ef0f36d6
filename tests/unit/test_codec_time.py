"""The clock prices codec time (coopsgd.theory.codec): compressed rounds cost their transfer plus the encodes and
decodes on their critical path; uncompressed rounds keep their times bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.communication import compressed_round_cost, push_round_cost
from coopsgd.analysis import spec_round_cost
from coopsgd.cli import main
from coopsgd.compression import parse_compressor
from coopsgd.engines.distributed.communicator import NetEmulation
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.clock import SimClock
from coopsgd.engines.simulator.codec import calibrate, calibrate_all
from coopsgd.errors import ConfigError
from coopsgd.theory.codec import FALLBACK, STATED, CodecSpeed, CodecTime, codec_speed, codec_time
from coopsgd.theory.cost import ComputeModel, NetworkModel, RoundCost, round_cost

D = 300


def test_codec_time_from_the_stated_throughputs() -> None:
    t = codec_time("topk", 4e6)
    # topk's stated figures: 0.74 GB/s encode, 15 GB/s decode -> 4 MB take 1/185 s and 1/3750 s
    assert STATED["topk"] == CodecSpeed(0.74e9, 15e9, "stated")
    assert t.encode_s == pytest.approx(1 / 185, rel=1e-12) and t.decode_s == pytest.approx(1 / 3750, rel=1e-12)
    assert t.seconds(2, 3) == 2 * t.encode_s + 3 * t.decode_s
    assert codec_time("none", 4e6) == CodecTime() and codec_speed("none") is None
    assert codec_speed("int4") == CodecSpeed(0.49e9, 2.1e9, "stated")
    assert codec_speed("a_new_codec") is FALLBACK  # a compressor without a stated figure (a user's own)
    mine = {"topk": CodecSpeed(1e9, 2e9, "measured")}
    assert codec_time("topk", 1e9, mine) == CodecTime(1.0, 0.5)
    assert codec_time("int8", 1e9, mine) == codec_time("int8", 1e9)  # not listed: the stated figure
    with pytest.raises(ConfigError, match="encode_Bps"):
        CodecSpeed(0.0, 1.0)
    with pytest.raises(ConfigError, match="codec"):
        codec_time("topk", 1.0, {"topk": 3.0})  # type: ignore[dict-item]


def test_round_time_adds_codec_and_the_emulated_link_does_not() -> None:
    net = NetworkModel(latency_s=1e-3, bandwidth_Bps=1e7)
    plain = round_cost("allreduce", workers=4, params=1000)
    assert net.round_time(plain) == net.transfer_time(plain) == pytest.approx(4 * 1e-3 + 8000 / 1e7, rel=1e-15)
    coded = RoundCost(plain.pattern, plain.handshakes, plain.floats_sent, plain.bytes_sent, 0.25)
    assert net.round_time(coded) == net.transfer_time(plain) + 0.25
    emu = NetEmulation(latency_ms=1.0, bandwidth_mbps=80.0)  # the codec time is spent for real, never slept
    assert emu.delay(coded) == emu.delay(plain) == emu.model.transfer_time(plain)


def test_encodes_and_decodes_per_round_kind() -> None:
    c = CodecTime(1.0, 0.01)  # an encode costs 1 s, a decode 0.01 s: the counts are read off the sum
    ar = round_cost("allreduce", workers=8, params=D)
    gathered = compressed_round_cost(ar, workers=8, params=D, bytes_per_param=4, payload_bytes=10, reducible=False,
                                     codec=c)
    assert gathered.pattern == "allgather" and gathered.codec_s == pytest.approx(1 + 8 * 0.01)  # its own too
    nb = round_cost("neighbor", workers=8, params=D, max_degree=2)
    assert compressed_round_cost(nb, workers=8, params=D, bytes_per_param=4, payload_bytes=10, reducible=False,
                                 codec=c).codec_s == pytest.approx(1 + 2 * 0.01)
    ps = round_cost("parameter_server", workers=5, params=D)
    assert compressed_round_cost(ps, workers=5, params=D, bytes_per_param=4, payload_bytes=10, reducible=False,
                                 codec=c).codec_s == pytest.approx(1 + 5 * 0.01)
    assert push_round_cost(3, bytes_per_param=4, payload_bytes=10, codec=c).codec_s == pytest.approx(6 + 6 * 0.01)
    # without a codec: the costs of before, field by field
    assert compressed_round_cost(ar, workers=8, params=D, bytes_per_param=4, payload_bytes=10,
                                 reducible=False).codec_s == 0.0


def _run(spec, clock: SimClock, steps: int = 4) -> Simulator:
    sim = Simulator(spec, lambda: nn.Linear(D, 1, bias=False), loss_fn=F.mse_loss, dtype=torch.float64,
                    executor="loop", seed=3, optimizer="sgd", clock=clock)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        sim.step([(torch.randn(4, D, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g,
                                                                                   dtype=torch.float64))
                  for _ in range(spec.workers)], 0.01)
    return sim


def _clock(codec=None) -> SimClock:
    return SimClock(NetworkModel(1e-3, 1e7), ComputeModel(mean_s=0.01), codec=codec)


def test_the_simulator_charges_codec_time_and_none_is_unchanged() -> None:
    # uncompressed: a codec setting changes nothing, bit for bit
    a = _run(presets.local_sgd(4, 2), _clock()).clock.totals()
    b = _run(presets.local_sgd(4, 2), _clock({"int8": CodecSpeed(1.0, 1.0)})).clock.totals()
    assert a == b
    # int8, all-gathered: 2 rounds of 1 encode + 4 decodes (every payload, its own too) of the 8D-byte row on
    # top of the transfer
    p = parse_compressor("int8").payload_bytes(D, torch.float64)
    transfer = 3 * 1e-3 + 3 * p / 1e7
    sim = _run(presets.local_sgd(4, 2, compression="int8"), _clock())
    row = 8 * D
    codec = row / STATED["int8"].encode_Bps + 4 * row / STATED["int8"].decode_Bps
    assert sim.clock.communication_s == pytest.approx(2 * (transfer + codec), rel=1e-12)
    slow = _run(presets.local_sgd(4, 2, compression="int8"), _clock({"int8": CodecSpeed(row / 0.5, row / 0.1)}))
    assert slow.clock.communication_s == pytest.approx(2 * (transfer + 0.5 + 4 * 0.1), rel=1e-12)
    np.testing.assert_array_equal(slow.params.numpy(), sim.params.numpy())  # time only: the same numbers


def test_reference_cost_and_theory_charge_it(capsys) -> None:
    spec = presets.choco(8, topology="ring", compression="topk:0.01")
    rc = spec_round_cost(spec, 10**6, bytes_per_param=8)
    t = codec_time("topk", 8e6)
    assert rc.codec_s == pytest.approx(t.encode_s + 2 * t.decode_s)  # a ring: 2 neighbours' payloads
    assert spec_round_cost(presets.dpsgd(8, topology="ring"), 10**6).codec_s == 0.0
    code = main(["theory", "--preset", "choco", "--compress", "topk:0.01", "--topology", "ring", "--params", "1000000",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    c = json.loads(out)["compression"]
    t4 = codec_time("topk", 4e6)
    assert c["codec_s_per_round"] == pytest.approx(t4.encode_s + 2 * t4.decode_s)
    assert c["codec_GBps"]["encode"] == pytest.approx(STATED["topk"].encode_Bps / 1e9)


def test_calibrate_measures_each_compressor() -> None:
    s = calibrate("topk:0.1", 4096, reps=2)
    assert s.encode_Bps > 0 and s.decode_Bps > 0 and s.source.startswith("calibrated: d = 4096")
    both = calibrate_all(["none", "int8", "powersgd:2"], 4096, reps=1, layout=[(64, 64)])
    assert sorted(both) == ["int8", "powersgd"]
