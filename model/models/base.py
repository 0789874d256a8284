"""The one contract every recommender here follows.

- `forward(item_seq, item_seq_len)`: right-padded batch (item 0 = pad) -> user representation
  at the last valid position, (batch, hidden).
- `loss(item_seq, item_seq_len, targets)`: cross-entropy over all items with the tied item
  embedding. Causal models take targets (batch, length) and score every position (0 = no
  target); window models take targets (batch,).
- `full_sort_scores(item_seq, item_seq_len)`: scores over all items, the pad item at -inf.
- Causal models (`causal = True`) also have `init_state(batch)` and
  `step(state, item_ids) -> (state, user_repr)`; a state is a dict of tensors with the batch
  on dim 0 (see model/state.py for bytes). `prefill(item_seq, lengths) -> (state, user_repr)`
  reaches the same state over a right-padded batch with the parallel forward (a state rebuilt
  from a history: one pass instead of one step per item).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


OOV = -1   # item index of an item unknown to the model (streaming only)


class SequentialRecommender(nn.Module):
    causal: bool = False      # trains with a loss at every position
    steppable: bool = False   # has init_state / step
    name: str = ""

    def __init__(self, n_items: int, config):
        super().__init__()
        self.n_items = n_items           # embedding rows, including the pad row 0
        # Rows that are items (pad included); rows past it are spare rows kept for items the
        # stream has not seen yet (model/vocab.py): no loss, no score, no share in the mean.
        self.n_known = n_items
        self.config = config

    # Subclasses implement: sequence_output (causal) or forward (window), and embedding.
    item_embedding: nn.Embedding

    def sequence_output(self, item_seq: torch.Tensor) -> torch.Tensor:
        """(batch, length) -> (batch, length, hidden), output at every position."""
        raise NotImplementedError

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        output = self.sequence_output(item_seq)
        return gather_last(output, item_seq_len)

    def embed_items(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Item vectors; OOV (-1) marks an item the model does not know yet, which gets the
        mean of the known items' embeddings (a neutral guess instead of a crash)."""
        vectors = self.item_embedding(item_ids.clamp(min=0))
        unknown = item_ids == OOV
        if unknown.any():
            vectors = vectors.clone()
            vectors[unknown] = self.known_item_mean()
        return vectors

    def known_item_mean(self) -> torch.Tensor:
        return self.item_embedding.weight[1:self.n_known].mean(dim=0)

    def scores(self, user_repr: torch.Tensor) -> torch.Tensor:
        logits = user_repr @ self.item_embedding.weight.t()
        logits[..., 0] = -torch.inf
        return logits

    def full_sort_scores(self, item_seq, item_seq_len) -> torch.Tensor:
        return self.scores(self.forward(item_seq, item_seq_len))

    def loss(self, item_seq, item_seq_len, targets) -> torch.Tensor:
        items = self.item_embedding.weight[:self.n_known]   # spare rows stay out of the softmax
        if self.causal:
            output = self.sequence_output(item_seq)
            mask = targets > 0
            return F.cross_entropy(output[mask] @ items.t(), targets[mask])
        return F.cross_entropy(self.forward(item_seq, item_seq_len) @ items.t(), targets)

    def require_whole_histories(self, purpose: str) -> None:
        """ValueError unless the model reads histories of any length: a steppable model has no
        position table and no window (SASRec's positions stop at max_len; the paper model's
        output depends on its window)."""
        if not self.steppable:
            raise ValueError(f"{purpose} needs a model without a length limit (mlsa4rec-s, "
                             f"mamba4rec); {self.name} reads at most max_len items")

    def describe(self) -> dict:
        return {"model": self.name, "n_items": self.n_items, **dataclasses.asdict(self.config)}


def gather_last(output: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, output.shape[-1])
    return output.gather(1, index).squeeze(1)


def init_recbole_kaiming(module: nn.Module) -> None:
    """The MLSA4Rec authors' init: kaiming-uniform(a=sqrt 5) weights, zero Linear biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def init_normal(std: float):
    """RecBole's SASRec / Mamba4Rec init: N(0, std) weights, zero Linear biases."""
    def apply(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return apply
