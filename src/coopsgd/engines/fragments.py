"""Streaming DiLoCo's fragments in the engines: what a schedule declares (:func:`fragment_count`,
:func:`fragment_split`), the state columns of each fragment, the clock's cost of a fragment round, and the
compressed rounds of the fragments: one compression stage per fragment.

A fragment round (:mod:`coopsgd.algorithms.streaming`) sends the fragment's columns only, so each fragment has
a :class:`~coopsgd.engines.compressed.CompressedRounds` (simulator, distributed rows) or
:class:`~coopsgd.engines.compressed.ReferenceCompressedRounds` (reference engine) of its own over those columns:
its x_ref is z's fragment after the fragment's last outer step (the value every node agrees on), its residuals
and warm-start factors are the fragment's. A node sends ``x_i - x_ref + e_i`` on the fragment: the fragment's
pseudo-gradient (negated) plus its error feedback. Fragment p's stage keys its draws with the run's seed + p,
so that fragments do not share random draws; fragment 0's is the run's own, and with one fragment the stage
is exactly the stage DiLoCo's rounds use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.algorithms.streaming import fragment_bounds
from coopsgd.engines.compressed import CompressedRounds, ReferenceCompressedRounds, load_compression_state
from coopsgd.engines.mixing import Round
from coopsgd.errors import ConfigError
from coopsgd.theory.cost import RoundCost

__all__ = ["fragment_count", "fragment_split", "check_distributed_fragments", "fragment_columns", "fragment_costs",
           "FragmentStages", "ReferenceFragmentStages", "simulator_stages", "reference_fragment_stages"]


def fragment_count(spec: AlgorithmSpec) -> int | None:
    """The number of fragments the spec's schedule declares (``None``: its rounds are not fragments)."""
    P = getattr(spec.schedule, "fragments", None)
    return None if P is None else int(P)


def fragment_split(spec: AlgorithmSpec) -> str:
    """How the spec's schedule cuts the parameters into fragments (:data:`~coopsgd.algorithms.streaming.FRAGMENT_SPLITS`)."""
    return str(getattr(spec.schedule, "split", "tensors"))


def check_distributed_fragments(spec: AlgorithmSpec) -> None:
    """Refuse (``ConfigError`` naming ``compress``) compressed fragment rounds on the distributed engine: its
    fragment rounds are sent uncompressed only (the simulator and the reference engine compress them)."""
    comp = spec.compressed
    if fragment_count(spec) is not None and comp is not None and comp.compresses:
        raise ConfigError.invalid("compress", comp.compress, "fragment rounds (streaming_diloco) are compressed on "
                                  "the simulate and reference engines; the distributed engine sends them uncompressed")


def fragment_columns(param_sizes: Sequence[int], fragments: int, cols: tuple[int, int], b: int,
                     split: str = "tensors") -> list[tuple[int, int]]:
    """Per fragment, the state columns its round sends: its parameter columns (after ``b`` buffer columns), and
    for fragment 0 the float buffers too when the mixed columns ``cols`` start at 0."""
    out = []
    for p, (lo, hi) in enumerate(fragment_bounds(param_sizes, fragments, split)):
        out.append((cols[0] if p == 0 else b + lo, b + hi))
    return out


class FragmentStages:
    """One :class:`CompressedRounds` per fragment (see the module docstring), checkpointed together.

    Args:
        make: builds the stage of a fragment from its index and state columns ``(lo, hi)``.
        columns: the fragments' state columns (:func:`fragment_columns`).
    """

    def __init__(self, make: Callable[[int, tuple[int, int]], CompressedRounds],
                 columns: Sequence[tuple[int, int]]) -> None:
        self.columns = [tuple(c) for c in columns]
        self.stages = [make(p, c) for p, c in enumerate(self.columns)]  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {"fragments": [s.state_dict() for s in self.stages]}

    def load_state_dict(self, saved: dict[str, Any] | None, *, field: str) -> None:
        parts = None if saved is None else saved.get("fragments")
        if not isinstance(parts, list) or len(parts) != len(self.stages):
            raise ConfigError.invalid(field, None if parts is None else len(parts),
                                      f"expected the compressed state of {len(self.stages)} fragments")
        for stage, part in zip(self.stages, parts, strict=True):
            load_compression_state(stage, part, field=field)

    def snapshot(self) -> list[dict[str, Any]]:
        return [s.snapshot() for s in self.stages]

    def restore(self, snap: list[dict[str, Any]]) -> None:
        for s, sn in zip(self.stages, snap, strict=True):
            s.restore(sn)


def simulator_stages(spec: AlgorithmSpec, layout: Any, cols: tuple[int, int], b: int, one: CompressedRounds | None,
                     *, nodes: int, workers: int, seed: int) -> FragmentStages | None:
    """The fragments' stages of a compressed Streaming DiLoCo spec on stacked rows (``None`` otherwise): over the
    model ``layout`` (its ``param_shapes`` and ``buffer_shapes``), from the start of the run's one stage ``one``
    over the mixed columns ``cols`` (the common start)."""
    P = fragment_count(spec)
    comp = spec.compressed
    if P is None or comp is None or one is None:
        return None
    start, dtype, device = one.start.reshape(-1), one.dtype, one.device
    buffer_shapes = layout.buffer_shapes
    shapes = [tuple(int(n) for n in s) for s in layout.param_shapes]
    sizes = [int(np.prod(s)) for s in shapes]
    bounds = fragment_bounds(sizes, P, fragment_split(spec))
    columns = fragment_columns(sizes, P, cols, b, fragment_split(spec))

    def make(p: int, c: tuple[int, int]) -> CompressedRounds:
        lo, hi = bounds[p]
        ends = np.cumsum([0, *sizes])
        lay = [s for s, a, e in zip(shapes, ends[:-1], ends[1:], strict=True) if a >= lo and e <= hi]
        if sum(int(np.prod(s)) for s in lay) != hi - lo:  # a fragment inside a tensor: one vector
            lay = [(hi - lo,)]
        if c[0] < b:
            lay = [tuple(int(n) for n in s) for s in buffer_shapes] + lay
        return CompressedRounds(comp, nodes=nodes, workers=workers, width=c[1] - c[0], dtype=dtype, device=device,
                                seed=seed + p, layout=lay, start=start[c[0] - cols[0] : c[1] - cols[0]])

    return FragmentStages(make, columns)


class ReferenceFragmentStages:
    """The reference engine's stage per fragment, checkpointed together (its ``state()`` / ``load()``)."""

    def __init__(self, stages: Sequence[ReferenceCompressedRounds]) -> None:
        self.stages = list(stages)

    def state(self) -> dict[str, Any]:
        return {"compress": self.stages[0].compression.compress, "fragments": [s.state() for s in self.stages]}

    def load(self, state: dict[str, Any], prefix: str = "state_dict.compression") -> None:
        parts = state.get("fragments")
        if not isinstance(parts, list) or len(parts) != len(self.stages):
            raise ConfigError.invalid(prefix, None if parts is None else len(parts),
                                      f"expected the compressed state of {len(self.stages)} fragments")
        for stage, part in zip(self.stages, parts, strict=True):
            stage.load(part, prefix)


def fragment_costs(clock: Any, rnd: Round, columns: tuple[int, int], b: int,
                   stages: FragmentStages | None) -> list[RoundCost]:
    """The simulated clock's cost items of a fragment round sending the state ``columns`` (its parameters: the cost
    model's d; with compression its stage's payload)."""
    assert rnd.mix is not None
    mix = rnd.mix
    params = columns[1] - max(columns[0], b)
    matrix = None if mix.structure is not None else mix.matrix
    stage = None if stages is None else stages.stages[int(mix.info["fragment"])]
    if stage is not None and stage.sends_payload(rnd):
        return clock.round_costs(mix.pattern, matrix, payload_bytes=stage.row_bytes, reducible=stage.reducible,
                                 compressor=stage.compressor.name, params=params)
    return list(clock.round_costs(mix.pattern, matrix, params=params))


def reference_fragment_stages(spec: AlgorithmSpec, sizes: Sequence[int], layout: Sequence[Sequence[int]] | None,
                              *, nodes: int, workers: int, seed: int,
                              start: np.ndarray) -> ReferenceFragmentStages | None:
    """The reference engine's fragment stages (numpy), as :func:`simulator_stages` builds them."""
    P = fragment_count(spec)
    comp = spec.compressed
    if P is None or comp is None:
        return None
    bounds = fragment_bounds(sizes, P, fragment_split(spec))
    out = []
    for p, (lo, hi) in enumerate(bounds):
        lay: list[tuple[int, ...]] | None = [(hi - lo,)] if (lo, hi) != (0, sum(sizes)) else None
        if layout is not None:
            ends = np.cumsum([0, *sizes])
            inner = [tuple(int(n) for n in s) for s, a, e in zip(layout, ends[:-1], ends[1:], strict=True)
                     if a >= lo and e <= hi]
            if sum(int(np.prod(s)) for s in inner) == hi - lo:
                lay = inner
        out.append(ReferenceCompressedRounds(comp, nodes=nodes, workers=workers, width=hi - lo, seed=seed + p,
                                             layout=lay, start=start[lo:hi]))
    return ReferenceFragmentStages(out)
