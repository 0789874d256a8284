"""A growing item vocabulary: new items get embedding rows without retraining the rest.

The embedding keeps spare rows beyond the known items and grows in chunks when they run out,
so that most new items cost no reallocation. A new row starts at the mean of the trained rows:
the same neutral vector an unknown (OOV) item is fed as, so growing changes no score of a
known item. Rows past the id map are not items: scoring masks them (`mask_spare_rows`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def rows_for(n_items: int, chunk: int) -> int:
    """Embedding rows for n_items (pad included), rounded up to a multiple of chunk."""
    return max(n_items, math.ceil(n_items / chunk) * chunk)


@torch.no_grad()
def grow_item_embedding(model, n_items: int, chunk: int = 256) -> bool:
    """Make room for n_items ids (pad included); True if the embedding was reallocated.

    The model's n_items (its embedding rows, saved in checkpoints) follows."""
    old = model.item_embedding
    if n_items <= old.num_embeddings:
        return False
    rows = rows_for(n_items, chunk)
    new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx,
                       device=old.weight.device, dtype=old.weight.dtype)
    new.weight[:old.num_embeddings] = old.weight
    new.weight[old.num_embeddings:] = old.weight[1:].mean(dim=0)
    model.item_embedding = new
    model.n_items = rows
    return True


def mask_spare_rows(scores: torch.Tensor, n_known: int) -> torch.Tensor:
    """scores (..., rows) with rows >= n_known (not items yet) at -inf, in place."""
    scores[..., n_known:] = -torch.inf
    return scores
