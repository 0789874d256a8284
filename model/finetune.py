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


def fine_tune(model, optimizer, sequences: list[np.ndarray], cfg: FineTuneConfig,
              rng: np.random.Generator, device="cpu") -> float:
    """cfg.steps steps on batches sampled from the sequences' samples; mean loss (nan if none)."""
    samples = training_batches(model, sequences, cfg.max_len)
    if samples is None:
        return float("nan")
    inputs, lengths, targets = samples
    model.train()
    losses = []
    for _ in range(cfg.steps):
        idx = torch.from_numpy(rng.integers(0, len(inputs), min(cfg.batch_size, len(inputs))))
        loss = model.loss(inputs[idx].to(device), lengths[idx].to(device), targets[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
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
