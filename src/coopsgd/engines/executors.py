"""Executors: how the simulator computes the m workers' stochastic gradients in one process.

Both executors read the simulator's stacked state (rows are nodes, see :mod:`coopsgd.engines.simulator`)
and never modify it: they return the gradients, the mini-batch losses and the new buffers (BatchNorm
running statistics), and the simulator commits them after its non-finite checks.

* :class:`LoopExecutor` -- one replica module per worker whose parameters *are views* into the rows of the
  stacked parameter tensor (built with ``copy.deepcopy(template, memo)`` where the memo maps each template
  parameter to its row view, so no parameter is ever copied; in-place updates of the stacked state update
  every replica at once) and whose
  ``.grad`` tensors are views into one preallocated (m, d) gradient tensor, so autograd accumulates the
  gradients straight into their rows and nothing has to be gathered. Forward/backward per worker in a
  Python loop. Fastest on CPU for convolutional nets.
* :class:`VmapExecutor` -- ``torch.func.vmap(grad_and_value(f))`` over the stacked per-worker parameters,
  where ``f`` calls the shared template module with ``torch.func.functional_call``. The flat parameter row
  is cut with ``split`` (whose backward is one ``cat``, so the gradient comes out as one (m, d) tensor).
  Fastest for small dense models and on GPU.

BatchNorm under vmap (torch 2.13): ``BatchNorm`` in train mode updates ``running_mean``/``running_var`` in
place and ``num_batches_tracked += 1``. vmap refuses an in-place update of an *unbatched* tensor with a
batched value (the error torch.func's "Patching Batch Norm" notes describe; their fixes are to drop the
running statistics or to use eval mode). We keep the statistics and avoid the problem by making the
buffers *batched* too: each worker's buffer row is passed through ``functional_call`` as a vmapped input.
Inside the vmapped function the buffer row is first cloned (so the caller's state is never written), the
buffer dict handed to ``functional_call`` holds views into that clone, BatchNorm's in-place updates land in
it, and the clone is returned as auxiliary output -- the new buffers, one row per worker. Only in-place
buffer updates are captured this way (every torch.nn layer works like that); a module that *rebinds* a
buffer attribute inside ``forward`` would lose the update under vmap (use the loop executor for it).
Random layers (dropout) run with ``randomness="different"``; their draws differ from the loop's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "build_model",
    "to_batch",
    "FlatLayout",
    "ComputeResult",
    "Executor",
    "LoopExecutor",
    "VmapExecutor",
    "EXECUTORS",
]


def build_model(model: nn.Module | Callable[[], nn.Module], *, seed: int, device: torch.device) -> nn.Module:
    """A private copy of ``model``, or ``model()`` built under ``torch.manual_seed(seed)`` (global RNG untouched)."""
    from coopsgd.errors import ConfigError

    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if not callable(model):
        raise ConfigError.invalid("model", model, "must be an nn.Module or a function returning one")
    devices: list[int] | None = [] if device.type == "cpu" else None
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        built = model()
    if not isinstance(built, nn.Module):
        raise ConfigError.invalid("model", built, "the factory must return an nn.Module")
    return built


def to_batch(batch: Any, what: str, *, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Check ``batch`` is a pair of tensors (error naming ``what`` otherwise); move it to device/dtype."""
    from coopsgd.errors import ConfigError

    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ConfigError.invalid(what, type(batch).__name__, "must be a pair (inputs, targets) of tensors")
    x, y = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ConfigError.invalid(what, type(batch).__name__, "must be a pair (inputs, targets) of tensors")
    x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
    y = y.to(device, dtype) if y.is_floating_point() else y.to(device)
    return x, y


#: Executors the simulator can be told to use (``"auto"`` calibrates and picks one of them).
EXECUTORS = ("loop", "vmap")

Batch = tuple[Tensor, Tensor]


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


@dataclass(frozen=True)
class FlatLayout:
    """Where each parameter / buffer of a module lives in a flat row.

    Parameters are concatenated in ``named_parameters()`` order into a row of length ``d``; floating-point
    buffers in ``named_buffers()`` order into a row of length ``b``. Other buffers (integer counters such as
    BatchNorm's ``num_batches_tracked``) are kept per name, never mixed.
    """

    param_names: tuple[str, ...]
    param_shapes: tuple[torch.Size, ...]
    param_sizes: tuple[int, ...]
    trainable: tuple[bool, ...]
    buffer_names: tuple[str, ...]
    buffer_shapes: tuple[torch.Size, ...]
    buffer_sizes: tuple[int, ...]
    other_names: tuple[str, ...]
    other_shapes: tuple[torch.Size, ...]
    other_dtypes: tuple[torch.dtype, ...]

    @property
    def d(self) -> int:
        return int(sum(self.param_sizes))

    @property
    def b(self) -> int:
        return int(sum(self.buffer_sizes))

    @classmethod
    def from_module(cls, module: nn.Module) -> FlatLayout:
        params = list(module.named_parameters())
        bufs = [(n, t) for n, t in module.named_buffers() if _is_float(t)]
        others = [(n, t) for n, t in module.named_buffers() if not _is_float(t)]
        return cls(
            param_names=tuple(n for n, _ in params),
            param_shapes=tuple(p.shape for _, p in params),
            param_sizes=tuple(p.numel() for _, p in params),
            trainable=tuple(bool(p.requires_grad) for _, p in params),
            buffer_names=tuple(n for n, _ in bufs),
            buffer_shapes=tuple(t.shape for _, t in bufs),
            buffer_sizes=tuple(t.numel() for _, t in bufs),
            other_names=tuple(n for n, _ in others),
            other_shapes=tuple(t.shape for _, t in others),
            other_dtypes=tuple(t.dtype for _, t in others),
        )

    # -- module <-> flat rows ------------------------------------------------------------------------
    def flat_params(self, module: nn.Module) -> Tensor:
        ps = dict(module.named_parameters())
        return torch.cat([ps[n].detach().reshape(-1) for n in self.param_names]) if self.param_names else torch.zeros(0)

    def flat_buffers(self, module: nn.Module) -> Tensor:
        bs = dict(module.named_buffers())
        if not self.buffer_names:
            return torch.zeros(0)
        return torch.cat([bs[n].detach().reshape(-1) for n in self.buffer_names])

    def other_buffers(self, module: nn.Module) -> dict[str, Tensor]:
        bs = dict(module.named_buffers())
        return {n: bs[n].detach().clone() for n in self.other_names}

    def split_params(self, row: Tensor) -> list[Tensor]:
        """Views of the parameters in a flat row (works under vmap: split's backward is one cat)."""
        if not self.param_names:
            return []
        return [p.view(s) for p, s in zip(row.split(self.param_sizes), self.param_shapes, strict=True)]

    def split_buffers(self, row: Tensor) -> list[Tensor]:
        if not self.buffer_names:
            return []
        return [t.view(s) for t, s in zip(row.split(self.buffer_sizes), self.buffer_shapes, strict=True)]

    def load_into(self, module: nn.Module, params: Tensor, buffers: Tensor, others: dict[str, Tensor]) -> nn.Module:
        """Copy flat rows into ``module``'s own parameters and buffers (returns the module)."""
        with torch.no_grad():
            ps = dict(module.named_parameters())
            for n, v in zip(self.param_names, self.split_params(params), strict=True):
                ps[n].copy_(v)
            bs = dict(module.named_buffers())
            for n, v in zip(self.buffer_names, self.split_buffers(buffers), strict=True):
                bs[n].copy_(v)
            for n in self.other_names:
                bs[n].copy_(others[n])
        return module


@dataclass
class ComputeResult:
    """What an executor returns for the active workers (rows in the order of ``rows``).

    Attributes:
        rows: the worker indices computed (``None``: all m workers, in order).
        grads: (k, d) stochastic gradients.
        losses: (k,) mini-batch losses (detached).
        buffers: (k, b) float buffers after the forward pass (``None`` when the model has none).
        others: per-name (k, ...) integer buffers after the forward pass.
        times: (k,) seconds of compute per worker (measured; the vmap executor splits its time equally).
        grad_absmax: (k,) an upper bound of max |gradient| per row when the executor measured it while the
            row was still in cache (loop executor: the row's 2-norm), else ``None``; NaN/inf iff the row
            holds a NaN/inf.
    """

    rows: list[int] | None
    grads: Tensor
    losses: Tensor
    buffers: Tensor | None
    others: dict[str, Tensor]
    times: np.ndarray
    grad_absmax: np.ndarray | None = None


class Executor:
    """Common interface: ``compute`` (train-mode gradients) and ``evaluate`` (eval-mode losses, no grad)."""

    name = "base"

    def __init__(
        self,
        template: nn.Module,
        layout: FlatLayout,
        params: Tensor,
        buffers: Tensor,
        others: dict[str, Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        workers: int,
    ) -> None:
        self.template = template
        self.layout = layout
        self.params = params  # (n, d) view into the simulator's state: read only here
        self.buffers = buffers  # (n, b) view
        self.others = others  # name -> (n, ...)
        self.loss_fn = loss_fn
        self.m = workers

    def compute(self, batches: Sequence[Batch | None], rows: list[int] | None) -> ComputeResult:
        raise NotImplementedError

    def evaluate(self, batch: Batch, rows: list[int] | None = None) -> Tensor:
        raise NotImplementedError


class LoopExecutor(Executor):
    """Replica modules holding views into the stacked rows; forward/backward per worker."""

    name = "loop"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lay, m = self.layout, self.m
        dtype, device = self.params.dtype, self.params.device
        self.grads = torch.zeros((m, lay.d), dtype=dtype, device=device)
        # scratch buffers the replicas update in train mode; copied from the state before every compute so
        # that the state itself is only written by the simulator's commit
        self.work_buffers = torch.zeros((m, lay.b), dtype=self.buffers.dtype, device=device)
        self.work_others = {n: torch.zeros_like(self.others[n][:m]) for n in lay.other_names}
        self.replicas = [self._replica(i).train() for i in range(m)]
        self._grad_rows = self.grads.unbind(0)

    def _replica(self, i: int) -> nn.Module:
        """A copy of the template whose parameters/buffers are views into row i (no parameter copies).

        ``copy.deepcopy`` is given a memo that maps each template parameter/buffer to its row-i view, so
        the copy never allocates its own parameters (not even transiently).
        """
        lay = self.layout
        t_params = dict(self.template.named_parameters())
        t_bufs = dict(self.template.named_buffers())
        memo: dict[int, Any] = {}
        new_params: list[tuple[nn.Parameter, Tensor | None]] = []
        prow = lay.split_params(self.params[i])
        grow = lay.split_params(self.grads[i])
        for n, view, gview, trainable in zip(lay.param_names, prow, grow, lay.trainable, strict=True):
            p = nn.Parameter(view, requires_grad=trainable)  # shares row i's storage
            memo[id(t_params[n])] = p
            new_params.append((p, gview if trainable else None))
        for n, view in zip(lay.buffer_names, lay.split_buffers(self.work_buffers[i]), strict=True):
            memo[id(t_bufs[n])] = view
        for n in lay.other_names:
            memo[id(t_bufs[n])] = self.work_others[n][i]
        rep = copy.deepcopy(self.template, memo)
        for param, g_row in new_params:
            if g_row is not None:
                param.grad = g_row  # autograd accumulates in place into row i of self.grads
        return rep

    def _sync_buffers(self, rows: list[int] | None = None) -> None:
        """Copy the buffers of ``rows`` (all workers: ``None``) from the state into the replicas' scratch."""
        lay = self.layout
        if not (lay.b or lay.other_names):
            return
        if rows is None:
            if lay.b:
                self.work_buffers.copy_(self.buffers[: self.m])
            for n in lay.other_names:
                self.work_others[n].copy_(self.others[n][: self.m])
            return
        t = torch.as_tensor(rows, device=self.params.device)
        if lay.b:
            self.work_buffers.index_copy_(0, t, self.buffers.index_select(0, t))
        for n in lay.other_names:
            self.work_others[n].index_copy_(0, t, self.others[n].index_select(0, t))

    def compute(self, batches: Sequence[Batch | None], rows: list[int] | None) -> ComputeResult:
        idx = list(range(self.m)) if rows is None else rows
        # only the active rows: inactive workers cost no work (FedAvg's sampled clients)
        self._sync_buffers(rows)
        losses: list[Tensor] = []
        times = np.zeros(len(idx))
        # squared norm of each gradient row, taken right after its backward while the row is in cache: it
        # detects NaN/inf and bounds max|g| for the simulator's overflow guard without another pass over the
        # (m, d) gradients (a dot product is ~2x cheaper than aminmax)
        sq: list[Tensor] = []
        per_worker = self.params.device.type == "cpu"  # on accelerators time the whole loop (async kernels)
        start = time.perf_counter()
        for j, i in enumerate(idx):
            batch = batches[i]
            assert batch is not None
            x, y = batch
            t0 = time.perf_counter()
            g = self._grad_rows[i]
            g.zero_()  # row by row, just before its backward: in cache, and only the active rows
            loss = self.loss_fn(self.replicas[i](x), y)
            loss.backward()
            sq.append(torch.dot(g, g) if g.numel() else g.new_zeros(()))
            if per_worker:
                times[j] = time.perf_counter() - t0
            losses.append(loss.detach())
        if not per_worker:
            synchronize(self.params.device)
            times[:] = (time.perf_counter() - start) / max(1, len(idx))
        loss_t = torch.stack(losses).to(self.params.dtype)
        norms = np.sqrt(torch.stack(sq).to("cpu", torch.float64).numpy())  # max|g| <= ||g||_2
        for jj in np.flatnonzero(~np.isfinite(norms)):  # NaN/inf, or a finite row whose square overflowed
            j = int(jj)
            lo, hi = torch.aminmax(self.grads[idx[j]])
            a, b = abs(float(lo)), abs(float(hi))
            norms[j] = a if (math.isnan(a) or a > b) else b
        if rows is None:
            grads, bufs = self.grads, self.work_buffers
            others = self.work_others
        else:
            t = torch.as_tensor(idx, device=self.params.device)
            grads, bufs = self.grads.index_select(0, t), self.work_buffers.index_select(0, t)
            others = {n: v.index_select(0, t) for n, v in self.work_others.items()}
        return ComputeResult(rows, grads, loss_t, bufs if self.layout.b else None, others, times, norms)

    def evaluate(self, batch: Batch, rows: list[int] | None = None) -> Tensor:
        idx = list(range(self.m)) if rows is None else rows
        self._sync_buffers(rows)
        x, y = batch
        out = torch.empty(len(idx), dtype=self.params.dtype, device=self.params.device)
        with torch.no_grad():
            for j, i in enumerate(idx):
                rep = self.replicas[i]
                rep.eval()
                try:
                    out[j] = self.loss_fn(rep(x), y)
                finally:
                    rep.train()
        return out


class VmapExecutor(Executor):
    """``vmap(grad_and_value(functional_call(...)))`` over the stacked parameters and buffers."""

    name = "vmap"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from torch.func import functional_call, grad_and_value, vmap

        lay = self.layout
        template = self.template
        template.train()
        loss_fn = self.loss_fn

        def tensors(p_row: Tensor, b_row: Tensor, o_row: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
            pieces = lay.split_params(p_row)
            params = {
                n: (v if tr else v.detach()) for n, v, tr in zip(lay.param_names, pieces, lay.trainable, strict=True)
            }
            # one fresh tensor per buffer: BatchNorm writes its running statistics into these clones
            # (views into one cloned row do NOT work: under vmap the in-place update is silently lost)
            bufs: dict[str, Tensor] = {
                n: t.clone() for n, t in zip(lay.buffer_names, lay.split_buffers(b_row), strict=True)
            }
            for n in lay.other_names:
                bufs[n] = o_row[n].clone()
            return params, bufs

        def flat_buffers(bufs: dict[str, Tensor], b_row: Tensor) -> Tensor:
            if not lay.buffer_names:
                return b_row
            return torch.cat([bufs[n].reshape(-1) for n in lay.buffer_names])

        def train_loss(p_row: Tensor, b_row: Tensor, o_row: dict[str, Tensor], x: Tensor, y: Tensor):
            params, bufs = tensors(p_row, b_row, o_row)
            loss = loss_fn(functional_call(template, (params, bufs), (x,)), y)
            others = {n: bufs[n] for n in lay.other_names}
            return loss, (flat_buffers(bufs, b_row), others)

        def eval_loss(p_row: Tensor, b_row: Tensor, o_row: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            params, bufs = tensors(p_row, b_row, o_row)
            return loss_fn(functional_call(template, (params, bufs), (x,)), y)

        self._train = vmap(grad_and_value(train_loss, has_aux=True), in_dims=(0, 0, 0, 0, 0), randomness="different")
        self._eval = vmap(eval_loss, in_dims=(0, 0, 0, None, None), randomness="different")
        self._fallback: LoopExecutor | None = None

    def _rows(self, rows: list[int] | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        m = self.m
        if rows is None:
            return self.params[:m], self.buffers[:m], {n: v[:m] for n, v in self.others.items()}
        t = torch.as_tensor(rows, device=self.params.device)
        return (
            self.params.index_select(0, t),
            self.buffers.index_select(0, t),
            {n: v.index_select(0, t) for n, v in self.others.items()},
        )

    def compute(self, batches: Sequence[Batch | None], rows: list[int] | None) -> ComputeResult:
        idx = list(range(self.m)) if rows is None else rows
        xs = [batches[i][0] for i in idx]  # type: ignore[index]
        ys = [batches[i][1] for i in idx]  # type: ignore[index]
        if any(x.shape != xs[0].shape for x in xs) or any(y.shape != ys[0].shape for y in ys):
            # vmap needs equal batch shapes; ragged batches (a short last batch) go through the loop
            if self._fallback is None:
                self._fallback = LoopExecutor(
                    self.template, self.layout, self.params, self.buffers, self.others, self.loss_fn, self.m
                )
            return self._fallback.compute(batches, rows)
        t0 = time.perf_counter()
        P, B, O = self._rows(rows)
        X, Y = torch.stack(xs), torch.stack(ys)
        grads, (losses, (bufs, others)) = self._train(P, B, O, X, Y)
        synchronize(self.params.device)
        elapsed = time.perf_counter() - t0
        times = np.full(len(idx), elapsed / max(1, len(idx)))
        return ComputeResult(rows, grads, losses.detach(), bufs if self.layout.b else None, dict(others), times)

    def evaluate(self, batch: Batch, rows: list[int] | None = None) -> Tensor:
        P, B, O = self._rows(rows)
        x, y = batch
        self.template.eval()
        try:
            with torch.no_grad():
                return self._eval(P, B, O, x, y)
        finally:
            self.template.train()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (for wall-clock timing on accelerators); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_executor(name: str, *args: Any, **kwargs: Any) -> Executor:
    """Build the executor called ``name`` (``"loop"`` or ``"vmap"``)."""
    cls = {"loop": LoopExecutor, "vmap": VmapExecutor}[name]
    return cls(*args, **kwargs)
