"""Fine-tuning a trained model on fresh sequences, and judging it on held-out next items.

The online trainer (streams/trainer/trainer.py) calls these with sequences drawn from its replay
buffer: the loss is the offline one (model.loss over all items), with a small learning rate
and a bounded number of steps per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.metrics import metrics_from_ranks, target_ranks
from model.training import causal_windows, pad_right, prefix_windows
from model.vocab import mask_spare_rows


@dataclass
class FineTuneConfig:
    steps: int = 50               # optimiser steps per round
    batch_size: int = 64
    lr: float = 1e-4
    max_len: int = 50
    imprint_norm: float = 1.0     # imprinted rows' length, in the known rows' mean lengths
    young_item_lr_scale: float = 1.0  # the rows of items newer than the offline model: steps x this


def training_batches(model, sequences: list[np.ndarray], max_len: int):
    """The offline samples of these sequences: (inputs, lengths, targets) tensors."""
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        return None
    if model.causal:
        inputs, targets = causal_windows(sequences, max_len)
        lengths = (inputs > 0).sum(1)
    else:
        inputs, lengths, targets = prefix_windows(sequences, max_len)
    return tuple(map(torch.from_numpy, (inputs, np.asarray(lengths), targets)))


@torch.no_grad()
def imprint_new_items(model, samples, first_new: int, norm_scale: float = 1.0,
                      chunk: int = 256) -> int:
    """Rows of the items with ids >= first_new that are targets in `samples`: set to the mean
    of the model's representations just before them (their direction), at norm_scale times the
    known items' mean norm; returns how many were set. A shorter row scores lower for every
    context, so a new title enters only the top 10s of the contexts closest to its own.

    A new item's row starts at the known items' mean (model/vocab.py), and a round's few
    optimiser steps at a small learning rate hardly move it: it is never in anyone's top 10,
    however often it is clicked. Scores are dot products, so the row that scores highest for
    the contexts that led to the item points where they point ("imprinting"): a new title
    clicked in this round's samples becomes recommendable in the version that follows."""
    inputs, lengths, targets = samples
    rows = model.item_embedding.weight
    if not (targets >= first_new).any():
        return 0
    model.eval()
    sums = torch.zeros(rows.shape[0] - first_new, rows.shape[1], device=rows.device)
    counts = torch.zeros(rows.shape[0] - first_new, device=rows.device)
    for start in range(0, len(inputs), chunk):
        batch = (t[start:start + chunk].to(rows.device) for t in (inputs, lengths, targets))
        x, n, y = batch
        out = model.sequence_output(x) if model.causal else model.forward(x, n)
        mask = y >= first_new
        sums.index_add_(0, y[mask] - first_new, out[mask].float())
        counts.index_add_(0, y[mask] - first_new, torch.ones_like(y[mask], dtype=torch.float))
    seen = counts > 0
    direction = torch.nn.functional.normalize(sums[seen], dim=1)
    norm = norm_scale * rows[1:first_new].norm(dim=1).mean()
    rows[first_new + torch.nonzero(seen).squeeze(1)] = (direction * norm).to(rows.dtype)
    return int(seen.sum())


def fine_tune(model, optimizer, sequences: list[np.ndarray], cfg: FineTuneConfig,
              rng: np.random.Generator, device="cpu", first_new: int | None = None,
              first_young: int | None = None) -> float:
    """cfg.steps steps on batches sampled from the sequences' samples; mean loss (nan if none).
    first_new: the items from this id on are new since the model was trained; those the
    samples have are imprinted first (imprint_new_items). first_young: the items from this id
    on are newer than the offline model; their rows take steps cfg.young_item_lr_scale times
    as long as the optimiser's (Adam's steps do not grow with the gradient, so a new title's
    row would otherwise move as little per round as a row trained for many epochs)."""
    samples = training_batches(model, sequences, cfg.max_len)
    if samples is None:
        return float("nan")
    if first_new is not None:
        imprint_new_items(model, samples, first_new, cfg.imprint_norm)
    inputs, lengths, targets = samples
    rows = model.item_embedding.weight
    scale_young = first_young is not None and cfg.young_item_lr_scale != 1.0
    model.train()
    losses = []
    for _ in range(cfg.steps):
        idx = torch.from_numpy(rng.integers(0, len(inputs), min(cfg.batch_size, len(inputs))))
        loss = model.loss(inputs[idx].to(device), lengths[idx].to(device), targets[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if scale_young:
            before = rows.detach()[first_young:].clone()
        optimizer.step()
        if scale_young:
            with torch.no_grad():
                rows[first_young:] = before + cfg.young_item_lr_scale * (
                    rows[first_young:] - before)
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses))


@torch.no_grad()
def next_item_metrics(model, histories: list[np.ndarray], targets: list[int], n_known: int,
                      max_len: int, device="cpu") -> dict[str, float]:
    """HR/NDCG/MRR of each target item given its history (last max_len items), full ranking
    over the n_known items (pad and spare rows excluded)."""
    model.eval()
    windows = [h[-max_len:] for h in histories]
    inputs = torch.from_numpy(pad_right(windows, max_len)).to(device)
    lengths = torch.tensor([max(len(w), 1) for w in windows], device=device)
    scores = mask_spare_rows(model.full_sort_scores(inputs, lengths), n_known)
    targets = torch.tensor(targets, device=device)
    return metrics_from_ranks(target_ranks(scores, targets).cpu())
