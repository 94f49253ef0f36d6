"""The ``communication`` section of a run configuration: what a round sends (SPEC §11).

``compress`` names the compressor (``none``, ``fp16``, ``bf16``, ``int8[:C]``, ``int4[:C]``, ``qsgd:S``, ``sign``, ``topk:F``,
``randk:F[:unbiased]``, ``powersgd:R``), ``error_feedback`` whether averaging rounds carry what was not sent
into the next round, ``consensus_step`` CHOCO-SGD's γ in gossip rounds. They apply to every preset through
:class:`coopsgd.algorithms.communication.Compression` (``RunConfig.build_spec``); a preset whose rounds cannot
be compressed, or an engine that cannot send compressed payloads, is a ``ConfigError`` naming ``compress``.
See docs/compression.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coopsgd.algorithms.communication import ERROR_FEEDBACK, Compression
from coopsgd.errors import ConfigError
from coopsgd.settings import check_section, setting

__all__ = ["CommunicationSettings", "COMPRESSED_ENGINES"]

#: The engines that run compressed rounds (all three: the distributed engine sends the payloads themselves; it
#: refuses elastic rounds, which only the reference engine and the simulator compress).
COMPRESSED_ENGINES = ("reference", "simulate", "distributed")


def _compressed(c: Any) -> str | None:
    """``used_when`` of error feedback: only compressed rounds have something left to feed back, and CHOCO's
    gossip rounds keep none (their public copies carry what a round left out)."""
    if c.communication.compress == "none":
        return "compress is 'none' (nothing is left out of a round)"
    if c.preset_facts()["only_gossip"]:
        return (f"preset {c.algorithm.preset!r} only gossips: its compressed rounds run CHOCO-SGD, whose public "
                "copies carry what a round left out (no error feedback)")
    return None


def _gossips(c: Any) -> str | None:
    """``used_when`` of CHOCO's consensus step: gossip rounds take it (with any compressor, ``none`` included);
    a preset gossips when it takes a topology."""
    if c.preset_facts()["gossips"]:
        return None
    return f"preset {c.algorithm.preset!r} does not gossip over a topology (the step applies to gossip rounds)"


def _compressor_spec(key: str, value: Any) -> Any:
    """A compressor spec string, canonical (``TopK:0.01`` -> ``topk:0.01``); a bad one names ``compress``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError.invalid(key, value, "must be a compressor spec string such as none, int8 or topk:0.01")
    return Compression(value).compress


@dataclass(frozen=True)
class CommunicationSettings:
    """What each round sends: the compressor, error feedback and CHOCO's consensus step (SPEC §11)."""

    compress: str = setting(
        "none", check=_compressor_spec,
        choices=("none", "fp16", "bf16", "int8[:C]", "int4[:C]", "qsgd:S", "sign", "topk:F", "randk:F[:unbiased]", "powersgd:R"),
        open_choices=True,
        help="compressor of what each round sends: averaging rounds send Q(x_i - x_ref + e_i), gossip rounds run "
             "CHOCO-SGD, elastic rounds send compressed differences to and from the centre (every engine; elastic "
             "rounds on reference and simulate; not lsgd)")
    error_feedback: str = setting(
        "auto", choices=ERROR_FEEDBACK,
        help="averaging and elastic rounds keep what the compressor dropped and send it next round: auto = on for "
             "biased compressors (fp16, bf16, int8, sign, topk, randk, powersgd)", used_when=_compressed)
    consensus_step: float | None = setting(
        None, low=0.0, high=1.0, low_open=True,
        help="CHOCO-SGD's consensus step gamma of gossip rounds", used_when=_gossips,
        default_text="1 for none, fp16, bf16; delta(d) of topk, randk, int8; 2/pi for sign; 1/(1+omega) of an "
                     "unbiased compressor")

    def __post_init__(self) -> None:
        check_section(self)

    def compression(self) -> Compression | None:
        """The :class:`Compression` every preset gets (``None`` when every setting is its default)."""
        c = Compression(self.compress, self.error_feedback, self.consensus_step)
        return c if c != Compression() else None
