"""Exact top k over a large catalogue without the (users x items) score matrix.

`model.scores` builds every user's score of every item: (batch x items) floats, 1 GB for a
batch of 256 users over a million items. `top_k` gets the same top k block by block: the
scores of `block_items` items at a time, the best k of each block kept, merged with the best
so far. Memory is (batch x block_items) whatever the catalogue; the result is exact (ties
aside, the same items as a full sort).
"""

from __future__ import annotations

import torch


def top_k(user_repr: torch.Tensor, item_weight: torch.Tensor, k: int, n_known: int,
          block_items: int = 65_536, exclude: list[list[int]] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, item indices), each (batch, k'), best first, over items 1..n_known-1 (0 is
    the pad; rows from n_known on are spare embedding rows, never ranked); k' = min(k, items).

    user_repr: (batch, hidden); item_weight: (rows, hidden), the item embedding;
    exclude[row]: item indices that row must not get (e.g. items seen)."""
    if block_items < 1:
        raise ValueError(f"block_items must be at least 1, not {block_items}")
    batch = user_repr.shape[0]
    k = min(k, n_known - 1)
    best_scores = torch.full((batch, 0), -torch.inf, device=user_repr.device)
    best_items = torch.zeros((batch, 0), dtype=torch.long, device=user_repr.device)
    masks = _exclusions(exclude, batch, user_repr.device)
    for start in range(1, n_known, block_items):
        end = min(start + block_items, n_known)
        scores = user_repr @ item_weight[start:end].t()
        if masks is not None:
            rows, items = masks
            inside = (items >= start) & (items < end)
            scores[rows[inside], items[inside] - start] = -torch.inf
        block_scores, block_items_ = torch.topk(scores, min(k, end - start), dim=1)
        best_scores = torch.cat([best_scores, block_scores], dim=1)
        best_items = torch.cat([best_items, block_items_ + start], dim=1)
        # The best k of the best so far and this block's, sorted (a merge of two sorted runs).
        best_scores, keep = torch.topk(best_scores, min(k, best_scores.shape[1]), dim=1)
        best_items = torch.gather(best_items, 1, keep)
    return best_scores, best_items


def _exclusions(exclude, batch: int, device):
    """(row index, item index) pairs to mask, as two tensors; None if there are none."""
    if not exclude or not any(exclude):
        return None
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} rows, the batch {batch}")
    rows = [row for row, items in enumerate(exclude) for _ in items]
    items = [item for row_items in exclude for item in row_items]
    return (torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(items, dtype=torch.long, device=device))
