"""Low-rank decomposed self-attention (LightSANs' item-to-interest attention).

Keys and values are pooled into P latent interests with a softmax over the sequence
(theta_K, theta_V in R^{d x P}); every query attends to the P pooled keys. Two variants:

- `LowRankAttention`: the MLSA4Rec paper's version, as in the authors' code: pooling over the
  whole (padded) window and an attention softmax over the query axis. Not causal.
- `CausalLowRankAttention`: MLSA4Rec-S. Position t pools only items 1..t (running
  online-softmax sums per interest) and its softmax is over the P interests, so a new item never
  changes earlier outputs and the layer can be advanced with a constant-size state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class _LowRankBase(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_interests: int, dropout: float,
                 attn_dropout: float):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of n_heads {n_heads}")
        self.hidden, self.n_heads, self.n_interests = hidden, n_heads, n_interests
        self.head_dim = hidden // n_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.theta_k = nn.Parameter(torch.randn(hidden, n_interests))
        self.theta_v = nn.Parameter(torch.randn(hidden, n_interests))
        self.attn_dropout = nn.Dropout(attn_dropout)
        self.out_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., n_heads, head_dim)"""
        return x.view(*x.shape[:-1], self.n_heads, self.head_dim)

    def _finish(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.out_dropout(context) + residual)


class LowRankAttention(_LowRankBase):
    """The paper's LSA: x (batch, length, hidden) -> same shape, every position sees all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        pooled_k = torch.einsum("blp,bld->bpd", torch.softmax(k @ self.theta_k, dim=1), k)
        pooled_v = torch.einsum("blp,bld->bpd", torch.softmax(v @ self.theta_v, dim=1), v)
        q, pooled_k, pooled_v = (self._heads(t).transpose(1, 2) for t in (q, pooled_k, pooled_v))
        scores = q @ pooled_k.transpose(-1, -2) / math.sqrt(self.head_dim)   # (b, h, l, p)
        probs = self.attn_dropout(torch.softmax(scores, dim=-2))            # over queries
        context = (probs @ pooled_v).transpose(1, 2).reshape_as(x)
        return self._finish(context, x)


def online_softmax_update(running_max, norm, total, logits, x):
    """Add one item to running softmax-weighted sums, one per interest.

    running_max, norm: (batch, P); total: (batch, P, d); logits: (batch, P); x: (batch, d).
    Returns the new (running_max, norm, total); total / norm is the pooled vector. Rescaling by
    exp(old max - new max) keeps every exponent <= 0, so nothing overflows or underflows to 0/0.
    """
    new_max = torch.maximum(running_max, logits)
    rescale = torch.exp(running_max - new_max)            # 0 on the first item (max = -inf)
    weight = torch.exp(logits - new_max)
    norm = norm * rescale + weight
    total = total * rescale.unsqueeze(-1) + weight.unsqueeze(-1) * x.unsqueeze(1)
    return new_max, norm, total


POOL_BLOCK = 64   # positions pooled in parallel by prefix_softmax_pool


def prefix_softmax_pool(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """pooled[b, t, p] = sum_{s<=t} softmax_s(logits[b, :t+1, p]) * values[b, s].

    logits: (batch, length, P); values: (batch, length, d) -> (batch, length, P, d).
    The sequence goes in blocks of POOL_BLOCK positions. Inside a block, an explicit causal
    softmax over (t, s) pairs: parallel and exact in fp32 (a training window of 50 is one
    block). Across blocks, what the earlier blocks pooled is carried as its log-normaliser and
    its pooled vector, and merged in by their share of the normaliser (an online softmax), so
    a window of 200 or a whole history of 2,000 items costs length / POOL_BLOCK iterations,
    not one per position, and memory linear in the length.
    """
    batch, length, n_interests = logits.shape
    pooled, carry_lse, carry_pooled = [], None, None
    for start in range(0, length, POOL_BLOCK):
        block_logits = logits[:, start:start + POOL_BLOCK].transpose(1, 2)   # (b, P, c)
        block_values = values[:, start:start + POOL_BLOCK]                   # (b, c, d)
        size = block_values.shape[1]
        future = torch.ones(size, size, dtype=torch.bool, device=logits.device).triu(1)
        pairs = block_logits.unsqueeze(2).expand(-1, -1, size, -1).masked_fill(future, -torch.inf)
        weights = torch.softmax(pairs, dim=-1).reshape(batch, n_interests * size, size)
        block_pooled = (weights @ block_values).view(batch, n_interests, size, -1)
        if carry_lse is not None:         # merge the earlier blocks in, by normaliser share
            block_lse = torch.logsumexp(pairs, dim=-1, keepdim=True)         # (b, P, c, 1)
            total_lse = torch.logaddexp(block_lse, carry_lse)
            block_pooled = (torch.exp(carry_lse - total_lse) * carry_pooled
                            + torch.exp(block_lse - total_lse) * block_pooled)
        if start + size < length:         # the block's last row has seen all of it
            last_lse = torch.logsumexp(block_logits, dim=-1)[..., None, None]
            carry_lse = last_lse if carry_lse is None else torch.logaddexp(carry_lse, last_lse)
            carry_pooled = block_pooled[:, :, -1:]
        pooled.append(block_pooled)
    return torch.cat(pooled, dim=2).transpose(1, 2)


class CausalLowRankAttention(_LowRankBase):
    """MLSA4Rec-S's LSA: causal, normalised over interests, steppable."""

    def _attend(self, q: torch.Tensor, pooled_k: torch.Tensor, pooled_v: torch.Tensor):
        """q (..., hidden), pooled (..., P, hidden) -> context (..., hidden)."""
        q, pooled_k, pooled_v = self._heads(q), self._heads(pooled_k), self._heads(pooled_v)
        scores = torch.einsum("...he,...phe->...hp", q, pooled_k) / math.sqrt(self.head_dim)
        probs = self.attn_dropout(torch.softmax(scores, dim=-1))             # over interests
        context = torch.einsum("...hp,...phe->...he", probs, pooled_v)
        return context.reshape(*context.shape[:-2], self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.query(x), self.key(x), self.value(x))

    def _forward(self, x, q, k, v):
        pooled_k = prefix_softmax_pool(k @ self.theta_k, k)
        pooled_v = prefix_softmax_pool(v @ self.theta_v, v)
        return self._finish(self._attend(q, pooled_k, pooled_v), x)

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, lengths: torch.Tensor):
        """`forward` over right-padded rows, plus the `step` state after each row's last valid
        position: the running sums computed at once, over the valid positions only."""
        state, k, v = {}, self.key(x), self.value(x)
        valid = (torch.arange(x.shape[1], device=x.device) < lengths.view(-1, 1)).unsqueeze(-1)
        for name, values, theta in (("k", k, self.theta_k), ("v", v, self.theta_v)):
            logits = (values @ theta).masked_fill(~valid, -torch.inf)     # (b, l, P)
            running_max = logits.max(dim=1).values                         # -inf: empty row
            # where(), not a product: an empty row has exp(-inf - -inf) = nan, never picked.
            weights = torch.where(valid, torch.exp(logits - running_max.unsqueeze(1)), 0.0)
            state[f"max_{name}"] = running_max
            state[f"norm_{name}"] = weights.sum(dim=1)
            state[f"sum_{name}"] = weights.transpose(1, 2) @ values        # (b, P, d)
        return self._forward(x, self.query(x), k, v), state

    def allocate_inference_cache(self, batch_size: int, device=None, dtype=torch.float32):
        """Running max, normaliser and weighted sum per interest, for keys and for values."""
        device = device or self.theta_k.device
        state = {}
        for name in ("k", "v"):
            state[f"max_{name}"] = torch.full((batch_size, self.n_interests), -torch.inf,
                                              device=device, dtype=dtype)
            state[f"norm_{name}"] = torch.zeros(batch_size, self.n_interests, device=device,
                                                dtype=dtype)
            state[f"sum_{name}"] = torch.zeros(batch_size, self.n_interests, self.hidden,
                                               device=device, dtype=dtype)
        return state

    @staticmethod
    def _accumulate(state: dict, name: str, logits: torch.Tensor, x: torch.Tensor):
        keys = (f"max_{name}", f"norm_{name}", f"sum_{name}")
        updated = online_softmax_update(*(state[k] for k in keys), logits, x)
        for key, value in zip(keys, updated):
            state[key].copy_(value)
        return state[keys[2]] / state[keys[1]].unsqueeze(-1)

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """x (batch, hidden): one new item per row; updates `state` in place."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        pooled_k = self._accumulate(state, "k", k @ self.theta_k, k)
        pooled_v = self._accumulate(state, "v", v @ self.theta_v, v)
        return self._finish(self._attend(q, pooled_k, pooled_v), x)
