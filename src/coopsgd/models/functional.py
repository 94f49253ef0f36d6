"""Models as pure functions of (parameters, buffers): per-replica gradients with ``torch.func``.

The simulator keeps m replicas as stacked tensors. :func:`grad_fn` turns a model into
``f(params, buffers, x, y) -> (grads, loss, new_buffers)`` that can be vmapped over the stacked
replicas (:func:`vmap_grad`) and equals ``torch.autograd.grad`` on each replica.

BatchNorm under ``vmap`` (checked with torch 2.13, see ``tests/unit/test_models.py``): in train mode
BatchNorm updates ``running_mean``/``running_var``/``num_batches_tracked`` in place. That works under
``vmap(grad(...))`` when the buffers are *batched* like the parameters (stacked, ``in_dims=0``): each
replica then normalises with its own batch statistics and updates its own running statistics, exactly
as a per-replica loop does. It fails ("vmap: inplace arithmetic ... is not possible") when one unbatched
buffer is shared by all replicas. :func:`grad_fn` therefore clones the (batched) buffers inside the
transformed function and returns the updated copies, so nothing outside is mutated and the caller
decides what to keep (e.g. mix buffers like parameters). ``torch.func.replace_all_batch_norm_modules_``
is not needed, and is not used because it stops tracking running statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap

__all__ = ["LossFn", "classification_loss", "stack_replicas", "grad_fn", "vmap_grad"]

#: ``loss(output, target) -> scalar``.
LossFn = Callable[[Tensor, Tensor], Tensor]
StateDict = dict[str, Tensor]


def classification_loss(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy; outputs with extra dims (LM logits ``(T, B, V)``) are flattened first."""
    if output.dim() > 2:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return F.cross_entropy(output, target)


def stack_replicas(models: Sequence[nn.Module]) -> tuple[StateDict, StateDict]:
    """Stack the parameters and buffers of same-architecture models along a new leading dim (detached)."""
    params, buffers = stack_module_state(list(models))
    return {k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in buffers.items()}


def grad_fn(
    model: nn.Module, loss_fn: LossFn = classification_loss
) -> Callable[[StateDict, StateDict, Tensor, Tensor], tuple[StateDict, Tensor, StateDict]]:
    """``f(params, buffers, x, y) -> (grads, loss, new_buffers)`` for one replica of ``model``.

    ``model`` only supplies the architecture (and its train/eval mode); the values come from the
    arguments. Buffers are cloned before the forward pass, so in-place BatchNorm updates land in the
    returned ``new_buffers`` and never in the arguments.
    """

    def loss_and_buffers(
        params: StateDict, buffers: StateDict, x: Tensor, y: Tensor
    ) -> tuple[Tensor, tuple[Tensor, StateDict]]:
        bufs = {k: v.clone() for k, v in buffers.items()}
        out = functional_call(model, (params, bufs), (x,))
        loss = loss_fn(out, y)
        return loss, (loss.detach(), bufs)

    g = grad(loss_and_buffers, has_aux=True)

    def f(params: StateDict, buffers: StateDict, x: Tensor, y: Tensor) -> tuple[StateDict, Tensor, StateDict]:
        grads, (loss, bufs) = g(params, buffers, x, y)
        return grads, loss, bufs

    return f


def vmap_grad(
    model: nn.Module,
    params: StateDict,
    buffers: StateDict,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn = classification_loss,
    randomness: str = "error",
) -> tuple[StateDict, Tensor, StateDict]:
    """Per-replica gradients, losses and updated buffers for stacked ``params``/``buffers`` and batches.

    ``x`` and ``y`` carry the replica dim first (``(m, B, ...)``). ``randomness`` is passed to
    ``torch.func.vmap`` (use ``"different"`` for models with dropout in train mode).
    """
    return vmap(grad_fn(model, loss_fn), randomness=randomness)(params, buffers, x, y)
