"""MLSA4Rec (paper, arXiv 2407.13135) and MLSA4Rec-S, our causal streaming variant.

    x0 = LN(Dropout(E[items]))                              no position embedding
    h  = LN(Dropout(Mamba(x0)) + x0)                        Mamba-LSA interaction layer
    a  = LSA(h)
    g  = LN(GELU(W1 a + b1) * h)
    z  = LN(Dropout(GELU(W2 [a; g] + b2)) + GELU(W3 x0 + b3))
    y  = LN(Dropout(Mamba(y)) + y), n_mamba_layers times    "Mamba normalization" layers
    score(item) = y_last . E[item]

The two differ only in the LSA (model/layers/lsa.py). MLSA4Rec-S is causal end to end, so
`step` advances a user by one item with a constant-size state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers.lsa import CausalLowRankAttention, LowRankAttention
from model.layers.mamba import Mamba
from model.models.base import SequentialRecommender, gather_last, init_recbole_kaiming


@dataclass
class MLSA4RecConfig:
    hidden: int = 64
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    n_heads: int = 8
    n_interests: int = 20
    n_mamba_layers: int = 2
    dropout: float = 0.1
    attn_dropout: float = 0.1
    max_len: int = 50


class MambaNormLayer(nn.Module):
    """y = LN(Dropout(Mamba(y)) + y)."""

    def __init__(self, c: MLSA4RecConfig):
        super().__init__()
        self.mamba = Mamba(c.hidden, c.d_state, c.d_conv, c.expand)
        self.dropout = nn.Dropout(c.dropout)
        self.norm = nn.LayerNorm(c.hidden, eps=1e-12)

    def forward(self, x):
        return self.norm(self.dropout(self.mamba(x)) + x)

    def step(self, x, conv_state, ssm_state):
        out, _, _ = self.mamba.step(x.unsqueeze(1), conv_state, ssm_state)
        return self.norm(self.dropout(out.squeeze(1)) + x)

    def prefill(self, x, lengths):
        out, conv_state, ssm_state = self.mamba.prefill(x, lengths)
        return self.norm(self.dropout(out) + x), conv_state, ssm_state


class MambaLSALayer(nn.Module):
    """The Mamba-LSA interaction layer: h, a, g, z above."""

    def __init__(self, c: MLSA4RecConfig, causal: bool):
        super().__init__()
        self.mamba = MambaNormLayer(c)
        attention = CausalLowRankAttention if causal else LowRankAttention
        self.lsa = attention(c.hidden, c.n_heads, c.n_interests, c.dropout, c.attn_dropout)
        self.gate = nn.Linear(c.hidden, c.hidden)           # W1
        self.fuse = nn.Linear(2 * c.hidden, c.hidden)       # W2
        self.skip = nn.Linear(c.hidden, c.hidden)           # W3
        self.gate_norm = nn.LayerNorm(c.hidden, eps=1e-12)
        self.out_norm = nn.LayerNorm(c.hidden, eps=1e-12)
        self.dropout = nn.Dropout(c.dropout)

    def _combine(self, x0, h, a):
        g = self.gate_norm(F.gelu(self.gate(a)) * h)
        fused = F.gelu(self.fuse(torch.cat([a, g], dim=-1)))
        return self.out_norm(self.dropout(fused) + F.gelu(self.skip(x0)))

    def forward(self, x0):
        h = self.mamba(x0)
        return self._combine(x0, h, self.lsa(h))

    def step(self, x0, state: dict, prefix: str):
        h = self.mamba.step(x0, state[f"{prefix}.conv"], state[f"{prefix}.ssm"])
        lsa_state = {k.removeprefix(f"{prefix}.lsa."): v for k, v in state.items()
                     if k.startswith(f"{prefix}.lsa.")}
        return self._combine(x0, h, self.lsa.step(h, lsa_state))

    def prefill(self, x0, lengths, prefix: str):
        """(output, state entries) after each row's valid positions, in parallel."""
        h, conv_state, ssm_state = self.mamba.prefill(x0, lengths)
        a, lsa_state = self.lsa.prefill(h, lengths)
        state = {f"{prefix}.conv": conv_state, f"{prefix}.ssm": ssm_state,
                 **{f"{prefix}.lsa.{k}": v for k, v in lsa_state.items()}}
        return self._combine(x0, h, a), state


class MLSA4Rec(SequentialRecommender):
    """The paper model. Its LSA is not causal: score a stream by recomputing the window."""

    causal = False
    name = "mlsa4rec"

    def __init__(self, n_items: int, config: MLSA4RecConfig | None = None):
        config = config or MLSA4RecConfig()
        super().__init__(n_items, config)
        c = config
        self.item_embedding = nn.Embedding(n_items, c.hidden, padding_idx=0)
        self.emb_dropout = nn.Dropout(c.dropout)
        self.emb_norm = nn.LayerNorm(c.hidden, eps=1e-12)
        self.interaction = MambaLSALayer(c, causal=self.causal)
        self.mamba_layers = nn.ModuleList(MambaNormLayer(c) for _ in range(c.n_mamba_layers))
        # As the authors' code: this also re-initialises the Linear layers inside Mamba.
        self.apply(init_recbole_kaiming)

    def _embed(self, item_seq):
        return self.emb_norm(self.emb_dropout(self.embed_items(item_seq)))

    def sequence_output(self, item_seq):
        y = self.interaction(self._embed(item_seq))
        for layer in self.mamba_layers:
            y = layer(y)
        return y


class MLSA4RecS(MLSA4Rec):
    """MLSA4Rec-S: causal LSA, loss at every position, steppable."""

    causal = True
    steppable = True
    name = "mlsa4rec-s"

    def _mamba_blocks(self):
        yield "interaction", self.interaction.mamba.mamba
        for i, layer in enumerate(self.mamba_layers):
            yield f"mamba{i}", layer.mamba

    def init_state(self, batch_size: int, device=None) -> dict[str, torch.Tensor]:
        state = {}
        for prefix, mamba in self._mamba_blocks():
            conv, ssm = mamba.allocate_inference_cache(batch_size, device=device)
            state[f"{prefix}.conv"], state[f"{prefix}.ssm"] = conv, ssm
        lsa = self.interaction.lsa.allocate_inference_cache(batch_size, device=device)
        state.update({f"interaction.lsa.{k}": v for k, v in lsa.items()})
        return state

    @torch.no_grad()
    def step(self, state: dict, item_ids: torch.Tensor):
        """Advance each row of `state` by one item; returns (state, user_repr (batch, hidden))."""
        return self.step_vectors(state, self.embed_items(item_ids))

    @torch.no_grad()
    def step_vectors(self, state: dict, vectors: torch.Tensor):
        """`step` after the item lookup, which alone depends on the data (unknown items):
        the rest is one fixed graph of tensor ops, so it can be traced (model/traced.py)."""
        x0 = self.emb_norm(self.emb_dropout(vectors))
        y = self.interaction.step(x0, state, "interaction")
        for i, layer in enumerate(self.mamba_layers):
            y = layer.step(y, state[f"mamba{i}.conv"], state[f"mamba{i}.ssm"])
        return state, y

    @torch.no_grad()
    def prefill(self, item_seq: torch.Tensor, lengths: torch.Tensor):
        """The state `step` would reach over each right-padded row's first `lengths` items,
        computed with the parallel forward; returns (state, user_repr at the last item)."""
        y, state = self.interaction.prefill(self._embed(item_seq), lengths, "interaction")
        for i, layer in enumerate(self.mamba_layers):
            y, state[f"mamba{i}.conv"], state[f"mamba{i}.ssm"] = layer.prefill(y, lengths)
        return state, gather_last(y, lengths)
