"""Next-item ranks of a steppable model over whole histories (test-then-train, offline).

What a streaming scorer does, computed offline with the parallel forward: after each event t
of a user the model ranks all items, and the user's event t+1 is judged against that ranking.
A causal model's forward at position t equals `step` after t+1 items (tests/test_models.py),
so these ranks are what the stream must reproduce (tests/test_stream_evaluation.py).
"""

from __future__ import annotations

import numpy as np
import torch

from model.models.base import OOV


@torch.no_grad()
def next_item_ranks(model, sequences: list[np.ndarray], batch_size: int = 32,
                    device="cpu") -> list[np.ndarray]:
    """ranks[u][t] = 1-based rank of sequences[u][t+1] after sequences[u][:t+1]; 0 when that
    item is unknown to the model (OOV, -1), which no ranking can contain. An unknown item in
    a history is left out of what the model reads, as the streaming scorer does; a history of
    unknown items only is read as one OOV item."""
    model.require_whole_histories("ranking over whole histories")
    model.eval()
    weight = model.item_embedding.weight
    neutral = model.sequence_output(torch.tensor([[OOV]], device=device))[0, 0]
    out: list[np.ndarray | None] = [None] * len(sequences)
    read = [np.asarray(s)[np.asarray(s) != OOV] for s in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(read[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = max(len(read[i]) for i in rows)
        inputs = torch.zeros(len(rows), max(longest, 1), dtype=torch.long)
        for r, i in enumerate(rows):
            inputs[r, :len(read[i])] = torch.as_tensor(read[i])
        hidden = model.sequence_output(inputs.to(device))
        for r, i in enumerate(rows):
            seq = torch.as_tensor(sequences[i], device=device)
            if len(seq) < 2:
                out[i] = np.zeros(0, dtype=np.int64)
                continue
            # after event t the model has read the known items among the first t + 1
            known_so_far = torch.cumsum(seq[:-1] != OOV, 0)
            after = torch.cat([neutral[None], hidden[r]])[known_so_far]
            scores = after @ weight.t()
            scores[:, 0] = -torch.inf
            targets = seq[1:]
            known = targets != OOV
            target_scores = scores.gather(1, targets.clamp(min=0).view(-1, 1))
            ranks = (scores > target_scores).sum(1) + 1
            out[i] = torch.where(known, ranks, torch.zeros_like(ranks)).cpu().numpy()
    return out


def gains_at(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Each judgment's HR / NDCG / MRR at k from 1-based ranks (0 = miss): arrays to average,
    or to pair with another model's on the same clicks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = (ranks >= 1) & (ranks <= k)
    safe = np.where(hit, ranks, 1.0)
    return {f"hr@{k}": hit.astype(np.float64), f"ndcg@{k}": hit / np.log2(safe + 1),
            f"mrr@{k}": hit / safe}


def metrics_at(ranks: np.ndarray, cutoffs=(5, 10, 20)) -> dict[str, float]:
    """HR / NDCG / MRR from 1-based ranks (0 = miss)."""
    out = {}
    for k in cutoffs:
        for name, values in gains_at(ranks, k).items():
            out[name] = float(values.mean()) if len(values) else 0.0
    return out


def clustered_mean_se(values: np.ndarray, clusters: np.ndarray) -> tuple[float, float]:
    """Mean of values and its standard error with the observations clustered (by user): one
    user's judgments are not independent of each other, so they count as one sample."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = values.mean()
    _, codes = np.unique(clusters, return_inverse=True)
    sums = np.bincount(codes, weights=values - mean)
    g = len(sums)
    se = np.sqrt((sums ** 2).sum() * g / max(g - 1, 1)) / n
    return float(mean), float(se)
