"""Word-level LSTM language model (Zaremba et al. 2014 "small" setting; the PyTorch word-LM example).

embedding (V -> E) -> dropout -> L LSTM layers (hidden H, dropout between layers) -> dropout -> linear
(H -> V). Defaults: E = H = 200, L = 2, dropout 0.0, untied. ``tie_weights=True`` shares the embedding
and decoder matrices (Press & Wolf 2017; needs E == H).

Hidden state: ``forward(tokens)`` always starts from a zero state, so one call is a pure function of
the parameters and the batch -- what the simulator's per-replica ``vmap(grad)`` and the distributed
engine need (no state carried between steps or shared between workers). Evaluation with truncated
back-propagation style state carrying uses :meth:`LSTMLanguageModel.forward_with_state`.

The LSTM recurrence is written with plain matrix products (not ``nn.LSTM``/cuDNN), so it works under
``torch.func.functional_call`` and ``vmap`` with weights tied or not. Dropout under ``vmap`` needs
``randomness="different"`` (or ``"same"``); with the default dropout 0.0 no randomness is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["LSTMLayer", "LSTMLanguageModel", "LSTMState"]

#: Per-layer ``(h, c)`` pairs, each ``(B, H)``.
LSTMState = list[tuple[Tensor, Tensor]]


class LSTMLayer(nn.Module):
    """One LSTM layer over a sequence ``(T, B, I)``; gates ordered (input, forget, cell, output) like PyTorch."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in (self.weight_ih, self.weight_hh, self.bias):
            nn.init.uniform_(p, -bound, bound)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Outputs ``(T, B, H)`` and the final ``(h, c)``; ``state=None`` means zeros."""
        batch = x.shape[1]
        if state is None:
            h = torch.zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device)
            c = torch.zeros(batch, self.hidden_size, dtype=x.dtype, device=x.device)
        else:
            h, c = state
        gates_x = F.linear(x, self.weight_ih, self.bias)  # all time steps at once: (T, B, 4H)
        outputs: list[Tensor] = []
        for t in range(x.shape[0]):
            gates = gates_x[t] + F.linear(h, self.weight_hh)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class LSTMLanguageModel(nn.Module):
    """Multi-layer LSTM language model; ``forward(tokens (T, B)) -> logits (T, B, V)``.

    Args:
        vocab_size: V (number of classes).
        emb_size: embedding width E (default 200).
        hidden_size: LSTM width H (default 200).
        num_layers: L (default 2).
        dropout: dropout on the embedding, between layers and before the decoder (default 0.0).
        tie_weights: share the embedding and decoder weights (needs ``emb_size == hidden_size``).
        batch_first: take ``(B, T)`` tokens and return ``(B, T, V)`` (for batches from
            :func:`coopsgd.data.lm_windows` + ``WorkerLoader``).
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 200,
        hidden_size: int = 200,
        num_layers: int = 2,
        dropout: float = 0.0,
        tie_weights: bool = False,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        vocab_size = check_int("num_classes", vocab_size, minimum=2)
        emb_size = check_int("emb_size", emb_size, minimum=1)
        hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        num_layers = check_int("num_layers", num_layers, minimum=1)
        self.dropout_p = check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        if not isinstance(tie_weights, bool):
            raise ConfigError.invalid("tie_weights", tie_weights, "must be true or false")
        if not isinstance(batch_first, bool):
            raise ConfigError.invalid("batch_first", batch_first, "must be true or false")
        if tie_weights and emb_size != hidden_size:
            raise ConfigError.invalid(
                "tie_weights",
                tie_weights,
                f"needs emb_size == hidden_size (got {emb_size} and {hidden_size})",
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.batch_first = batch_first
        self.tie_weights = tie_weights
        self.encoder = nn.Embedding(vocab_size, emb_size)
        self.layers = nn.ModuleList(
            [LSTMLayer(emb_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)]
        )
        self.drop = nn.Dropout(self.dropout_p)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward_with_state(self, tokens: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """Logits and the final per-layer ``(h, c)``; pass ``state`` (detached) to continue a stream."""
        if tokens.dim() != 2:
            raise ConfigError.invalid(
                "tokens.shape", tuple(tokens.shape), "must be (T, B) token ids ((B, T) with batch_first=True)"
            )
        if self.batch_first:
            tokens = tokens.transpose(0, 1)
        out = self.drop(self.encoder(tokens))
        new_state: LSTMState = []
        for i, layer in enumerate(self.layers):
            out, hc = layer(out, None if state is None else state[i])
            new_state.append(hc)
            out = self.drop(out)
        logits = self.decoder(out)
        if self.batch_first:
            logits = logits.transpose(0, 1)
        return logits, new_state

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(T, B, V)`` from a zero initial state (stateless; see the module docstring)."""
        return self.forward_with_state(tokens, None)[0]
