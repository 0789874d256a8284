"""Mamba4Rec (arXiv 2403.03900): one Mamba layer + position-wise feed-forward, RecBole init."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.layers.mamba import Mamba
from model.models.base import SequentialRecommender, gather_last, init_normal


@dataclass
class Mamba4RecConfig:
    hidden: int = 64
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    n_layers: int = 1
    dropout: float = 0.2
    max_len: int = 50


class Mamba4RecLayer(nn.Module):
    def __init__(self, c: Mamba4RecConfig):
        super().__init__()
        self.residual = c.n_layers > 1       # Mamba4Rec drops the residual for a single layer
        self.mamba = Mamba(c.hidden, c.d_state, c.d_conv, c.expand)
        self.dropout = nn.Dropout(c.dropout)
        self.norm = nn.LayerNorm(c.hidden, eps=1e-12)
        self.ff1 = nn.Linear(c.hidden, 4 * c.hidden)
        self.ff2 = nn.Linear(4 * c.hidden, c.hidden)
        self.ff_norm = nn.LayerNorm(c.hidden, eps=1e-12)

    def _after_mamba(self, mixed, x):
        h = self.norm(self.dropout(mixed) + (x if self.residual else 0))
        ff = self.dropout(self.ff2(self.dropout(F.gelu(self.ff1(h)))))
        return self.ff_norm(ff + h)

    def forward(self, x):
        return self._after_mamba(self.mamba(x), x)

    def step(self, x, conv_state, ssm_state):
        mixed, _, _ = self.mamba.step(x.unsqueeze(1), conv_state, ssm_state)
        return self._after_mamba(mixed.squeeze(1), x)

    def prefill(self, x, lengths):
        mixed, conv_state, ssm_state = self.mamba.prefill(x, lengths)
        return self._after_mamba(mixed, x), conv_state, ssm_state


class Mamba4Rec(SequentialRecommender):
    causal = True
    steppable = True
    name = "mamba4rec"

    def __init__(self, n_items: int, config: Mamba4RecConfig | None = None):
        config = config or Mamba4RecConfig()
        super().__init__(n_items, config)
        c = config
        self.item_embedding = nn.Embedding(n_items, c.hidden, padding_idx=0)
        self.emb_norm = nn.LayerNorm(c.hidden, eps=1e-12)
        self.emb_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(Mamba4RecLayer(c) for _ in range(c.n_layers))
        self.apply(init_normal(0.02))

    def _embed(self, item_seq):
        return self.emb_norm(self.emb_dropout(self.embed_items(item_seq)))

    def sequence_output(self, item_seq):
        x = self._embed(item_seq)
        for layer in self.layers:
            x = layer(x)
        return x

    def init_state(self, batch_size: int, device=None):
        state = {}
        for i, layer in enumerate(self.layers):
            conv, ssm = layer.mamba.allocate_inference_cache(batch_size, device=device)
            state[f"layer{i}.conv"], state[f"layer{i}.ssm"] = conv, ssm
        return state

    @torch.no_grad()
    def step(self, state, item_ids):
        return self.step_vectors(state, self.embed_items(item_ids))

    @torch.no_grad()
    def step_vectors(self, state, vectors):
        """`step` after the item lookup, which alone depends on the data (unknown items):
        the rest is one fixed graph of tensor ops, so it can be traced (model/traced.py)."""
        x = self.emb_norm(self.emb_dropout(vectors))
        for i, layer in enumerate(self.layers):
            x = layer.step(x, state[f"layer{i}.conv"], state[f"layer{i}.ssm"])
        return state, x

    @torch.no_grad()
    def prefill(self, item_seq, lengths):
        """(state, user_repr) after each right-padded row's first `lengths` items, in parallel."""
        x, state = self._embed(item_seq), {}
        for i, layer in enumerate(self.layers):
            x, state[f"layer{i}.conv"], state[f"layer{i}.ssm"] = layer.prefill(x, lengths)
        return state, gather_last(x, lengths)
