"""A growing item vocabulary: new items get embedding rows without retraining the rest.

The embedding keeps spare rows beyond the known items and grows in chunks when they run out,
so that most new items cost no reallocation. An item's new row starts at the mean of the known
items' rows at the time it is given out: the same neutral vector an unknown (OOV) item is fed
as, so growing changes no score of a known item. Rows past the id map are not items: the loss
leaves them out (`model.n_known`) and scoring masks them (`mask_spare_rows`).
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
    """Give ids up to n_items (pad included) rows; True if the embedding was reallocated.

    The rows of the ids new since the last call start at the known items' mean. The model's
    n_known follows, and so does its n_items (its embedding rows, saved in checkpoints)."""
    if n_items <= model.n_known:
        return False
    mean = model.known_item_mean()
    old = model.item_embedding
    grew = n_items > old.num_embeddings
    if grew:
        rows = rows_for(n_items, chunk)
        new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx,
                           device=old.weight.device, dtype=old.weight.dtype)
        new.weight[:old.num_embeddings] = old.weight
        model.item_embedding, model.n_items = new, rows
    model.item_embedding.weight[model.n_known:n_items] = mean
    model.n_known = n_items
    return grew


def mask_spare_rows(scores: torch.Tensor, n_known: int) -> torch.Tensor:
    """scores (..., rows) with rows >= n_known (not items yet) at -inf, in place."""
    scores[..., n_known:] = -torch.inf
    return scores
