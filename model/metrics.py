"""Full-ranking metrics: HR, NDCG and MRR at several cut-offs.

The rank of the target is the number of items scored strictly above it (the pad item is at
-inf, items the user saw are not masked, as RecBole's full-sort evaluation). A target scored
NaN or +-inf (a diverged model) ranks last: NaN compares false, so it would otherwise rank first.
`mask_seen` is the other convention, common outside RecBole (and the stream's `exclude_seen`):
items already in the user's history cannot be recommended, so they leave the ranking.
"""

from __future__ import annotations

import torch

CUTOFFS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (batch, n_items), targets (batch,) -> 0-based rank of each target; items that
    tie with it rank ahead of it. In the target's favour, a version whose new items' rows are
    all alike (untrained: one score) would be credited with a hit for each of them, in the
    fine-tuning gate's holdout too. Trained rows almost never tie: published figures stay."""
    target_scores = scores.gather(1, targets.view(-1, 1))
    ranks = (scores >= target_scores).sum(dim=1) - 1
    ranks[~torch.isfinite(target_scores.squeeze(1))] = scores.shape[1]
    return ranks


def mask_seen(scores: torch.Tensor, histories: list) -> torch.Tensor:
    """Set each row's scores of the items in that row's history to -inf (in place).

    A target the user had already seen then ranks last: it could not have been recommended.
    """
    rows = torch.cat([torch.full((len(h),), r, dtype=torch.long) for r, h in enumerate(histories)])
    cols = torch.cat([torch.as_tensor(h, dtype=torch.long) for h in histories])
    scores[rows.to(scores.device), cols.to(scores.device)] = -torch.inf
    return scores


def metrics_from_ranks(ranks: torch.Tensor, cutoffs=CUTOFFS) -> dict[str, float]:
    ranks = ranks.double()
    out = {}
    for k in cutoffs:
        hit = (ranks < k).double()
        out[f"hr@{k}"] = hit.mean().item()
        out[f"ndcg@{k}"] = (hit / torch.log2(ranks + 2)).mean().item()
        out[f"mrr@{k}"] = (hit / (ranks + 1)).mean().item()
    return out


def format_table(rows: dict[str, dict[str, float]], cutoffs=CUTOFFS) -> str:
    """rows: name -> metrics. A plain-text table, one row per name."""
    columns = [f"{m}@{k}" for k in cutoffs for m in ("hr", "ndcg", "mrr")]
    width = max([len(name) for name in rows] + [6])
    lines = [" ".join([f"{'':<{width}}"] + [f"{c:>8}" for c in columns])]
    for name, values in rows.items():
        lines.append(" ".join([f"{name:<{width}}"] + [f"{values[c]:>8.4f}" for c in columns]))
    return "\n".join(lines)
