"""``make_model(name, ...)``: build a named model, validating every argument ([SPEC] §6 "Models")."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from coopsgd.errors import ConfigError, check_int
from coopsgd.models._common import as_shape
from coopsgd.models.cnn7 import CNN7
from coopsgd.models.gpt import GPT
from coopsgd.models.lenet import LeNet
from coopsgd.models.lstm import LSTMLanguageModel
from coopsgd.models.mlp import MLP
from coopsgd.models.resnet import resnet20
from coopsgd.models.vgg import VGG

__all__ = ["MODELS", "make_model", "count_parameters"]


def _lstm_lm(input_shape: Sequence[int], num_classes: int, **kw: Any) -> LSTMLanguageModel:
    # input_shape is the window length (seq_len,) or () for a token stream; the model accepts any length.
    if len(as_shape(input_shape)) > 1:
        raise ConfigError.invalid(
            "input_shape", tuple(input_shape), "model='lstm_lm' takes token ids: () or (seq_len,)"
        )
    return LSTMLanguageModel(num_classes, **kw)


def _gpt(input_shape: Sequence[int], num_classes: int, **kw: Any) -> GPT:
    # input_shape is the window length (seq_len,) or () for "any length up to the context"
    shape = as_shape(input_shape) if input_shape != () else ()
    if len(shape) > 1:
        raise ConfigError.invalid("input_shape", tuple(input_shape), "model='gpt' takes token ids: () or (seq_len,)")
    model = GPT(num_classes, **kw)
    if shape and shape[0] > model.context:
        raise ConfigError.invalid(
            "context", model.context, f"must be >= the sequence length {shape[0]} of the data (model='gpt')"
        )
    return model


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "cnn7": CNN7,
    "resnet20": resnet20,
    "vgg16": VGG,
    "lstm_lm": _lstm_lm,
    "gpt": _gpt,
}
#: Names accepted by :func:`make_model`.
MODELS: tuple[str, ...] = tuple(_BUILDERS)

_EXTRA_KW: dict[str, tuple[str, ...]] = {
    "lstm_lm": tuple(p for p in inspect.signature(LSTMLanguageModel).parameters if p != "vocab_size"),
    "gpt": tuple(p for p in inspect.signature(GPT).parameters if p != "vocab_size"),
}
#: Models whose input is a token sequence (``input_shape`` may be ``()``).
_TOKEN_MODELS = ("lstm_lm", "gpt")


def make_model(name: str, *, num_classes: int, input_shape: Sequence[int] = (), **kw: Any) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (one sample, no batch dim) and ``num_classes`` outputs.

    Names and their extra keyword arguments:

    * ``"mlp"`` -- ``hidden=(200, 200)``
    * ``"lenet"`` -- none (LeNet-5 style, sized to ``input_shape``)
    * ``"cnn7"`` -- ``width=64``
    * ``"resnet20"`` -- ``shortcut="A"`` | ``"B"``, ``width=16``
    * ``"vgg16"`` -- ``config`` (channel plan; default VGG-16)
    * ``"lstm_lm"`` -- ``num_classes`` is the vocabulary size; ``emb_size=200``, ``hidden_size=200``,
      ``num_layers=2``, ``dropout=0.0``, ``tie_weights=False``, ``batch_first=False``
    * ``"gpt"`` -- ``num_classes`` is the vocabulary size; tokens ``(B, T)``; ``layers=2``, ``heads=4``,
      ``width=64``, ``context=64``, ``dropout=0.0`` (:class:`~coopsgd.models.gpt.GPT`)

    Raises:
        ConfigError: unknown name (``model``), unknown keyword, or an input shape the model cannot take
            (``input_shape``).
    """
    if not isinstance(name, str) or name.strip().lower().replace("-", "_") not in _BUILDERS:
        raise ConfigError.invalid(
            "model", name, f"must be one of {', '.join(MODELS)} (or pass your own nn.Module)"
        )
    key = name.strip().lower().replace("-", "_")
    num_classes = check_int("num_classes", num_classes, minimum=1)
    shape = as_shape(input_shape) if input_shape != () else ()
    builder = _BUILDERS[key]
    allowed = _EXTRA_KW.get(key) or tuple(
        p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")
    )
    for k in kw:
        if k not in allowed:
            raise ConfigError.invalid(
                k, kw[k], f"is not an option of model={key!r}; options: {', '.join(allowed) or 'none'}"
            )
    if key not in _TOKEN_MODELS and not shape:
        raise ConfigError.invalid(
            "input_shape", input_shape, f"model={key!r} needs the shape of one input sample"
        )
    return builder(input_shape=shape, num_classes=num_classes, **kw)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of parameter scalars (shared/tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
