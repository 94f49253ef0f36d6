"""A small GPT: a causal transformer language model in the nanoGPT shape.

token embedding (V -> W) + learned position embedding (C -> W) -> dropout -> L pre-norm blocks -> final
LayerNorm -> output head (W -> V, no bias) whose weight *is* the token embedding's (weight tying: one shared
parameter). A block is ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``: causal multi-head self-attention with
H heads of width W / H (one fused query/key/value projection, an output projection) and an MLP
W -> 4W -> W with GELU. Initialisation: every linear and embedding weight ~ N(0, 0.02), the two projections
that write into the residual stream ~ N(0, 0.02 / sqrt(2L)), biases zero, LayerNorm scale one.

``forward(tokens (B, T)) -> logits (B, T, V)`` for ``T <= context``; one call is a pure function of the
parameters and the batch (no state, no buffers), as the simulator's stacked executors and the distributed
engine need. The attention is written with plain tensor operations (scores, a lower-triangular mask built in
the forward pass, softmax, weighted sum): ``F.scaled_dot_product_attention`` has no vmap batching rule on CPU
in torch 2.13 (it falls back to a per-replica loop with a warning) and its fused kernels do not take float64,
while these operations run under ``torch.func.functional_call`` + ``vmap`` in float32 and float64 alike.
Dropout (default 0.0) under ``vmap`` needs ``randomness="different"`` (or ``"same"``), as for the LSTM.

Defaults (:data:`GPT_DEFAULTS`): 2 layers, 4 heads, width 64, context 64 (at least the 35-token windows the
runs cut WikiText-2 into), dropout 0.0: about 1.3 M parameters at WikiText-2's vocabulary, most of them the
tied embedding, small enough for a few hundred steps of 4 workers in minutes on a 2-core CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["GPT", "GPTBlock", "CausalSelfAttention", "GPT_DEFAULTS", "gpt_parameter_count"]

#: Default model arguments of ``make_model("gpt", ...)``.
GPT_DEFAULTS: dict[str, int | float] = {"layers": 2, "heads": 4, "width": 64, "context": 64, "dropout": 0.0}


def gpt_parameter_count(vocab_size: int, *, layers: int, width: int, context: int) -> int:
    """Parameters of :class:`GPT` in closed form (the tied head counted once).

    ``V*W`` (token embedding = head) + ``C*W`` (positions) + ``L*(12*W*W + 13*W)`` (per block: two LayerNorms
    4W, query/key/value 3W*W + 3W, output projection W*W + W, MLP 4W*W + 4W and 4W*W + W) + ``2*W`` (final
    LayerNorm). The heads do not change the count.
    """
    w = width
    return vocab_size * w + context * w + layers * (12 * w * w + 13 * w) + 2 * w


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only; ``(B, T, W) -> (B, T, W)``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_width = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        h, hw = self.heads, self.head_width
        q, k, v = self.qkv(x).split(w, dim=-1)
        # (B, T, W) -> (B, H, T, W/H)
        q = q.reshape(b, t, h, hw).transpose(1, 2)
        k = k.reshape(b, t, h, hw).transpose(1, 2)
        v = v.reshape(b, t, h, hw).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hw))
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True above the diagonal
        weights = self.attn_drop(scores.masked_fill(future, float("-inf")).softmax(dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(b, t, w)
        return self.resid_drop(self.proj(y))


class GPTBlock(nn.Module):
    """One pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    """Causal transformer language model; ``forward(tokens (B, T)) -> logits (B, T, V)``, ``T <= context``.

    Args:
        vocab_size: V (number of classes).
        layers: L, transformer blocks (default 2).
        heads: H, attention heads per block; must divide ``width`` (default 4).
        width: W, the residual stream's width (default 64).
        context: C, the longest sequence (position embeddings; default 64).
        dropout: on the embeddings, the attention weights and each residual branch (default 0.0).
    """

    def __init__(
        self,
        vocab_size: int,
        layers: int = 2,
        heads: int = 4,
        width: int = 64,
        context: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        vocab_size = check_int("num_classes", vocab_size, minimum=2)
        layers = check_int("layers", layers, minimum=1)
        heads = check_int("heads", heads, minimum=1)
        width = check_int("width", width, minimum=1)
        context = check_int("context", context, minimum=1)
        self.dropout_p = check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        if width % heads:
            raise ConfigError.invalid(
                "heads", heads, f"must divide width={width} (each head is width / heads wide)"
            )
        self.vocab_size, self.layers, self.heads, self.width, self.context = vocab_size, layers, heads, width, context
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(context, width)
        self.drop = nn.Dropout(self.dropout_p)
        self.blocks = nn.ModuleList([GPTBlock(width, heads, self.dropout_p) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one parameter, registered first as tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.layers)
        for name, mod in self.named_modules():
            if mod is self.head:  # its weight is the token embedding's, initialised below
                continue
            if isinstance(mod, nn.Linear):
                std = residual_std if name.endswith("proj") else 0.02
                nn.init.normal_(mod.weight, mean=0.0, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, mean=0.0, std=0.02)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, V)``; logit t depends on ``tokens[:, :t+1]`` only."""
        if tokens.dim() != 2:
            raise ConfigError.invalid("tokens.shape", tuple(tokens.shape), "must be (B, T) token ids")
        t = tokens.shape[1]
        if t > self.context:
            raise ConfigError.invalid(
                "tokens.shape", tuple(tokens.shape), f"sequences of {t} tokens exceed context={self.context}"
            )
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
