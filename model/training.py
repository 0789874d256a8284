"""Offline training and evaluation under RecBole's sequential protocol.

Samples:
- causal models (loss at every position): each user's training sequence is cut, from its
  end, into windows of max_len inputs; every position predicts the next item, so each training
  target is used once per epoch (one pass per user, not one per prefix);
- the paper MLSA4Rec (not causal): RecBole's prefix windows, one sample per training target,
  the input being the last max_len items before it, the loss at its last position.
Evaluation: the last max_len items of the history, full ranking over all items.
With `whole_sequences` a steppable model (no position table, so no length limit) instead
trains on each user's whole sequence (one pass per user) and is evaluated on the whole
history: what it sees in the stream.
Early stopping follows RecBole's: a tie counts as an improvement, and the run stops once
`patience` + 1 epochs in a row have not improved valid NDCG@10 (RecBole's stopping_step).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from model.config import ConfigError
from model.data.protocol import EvalSplit, SequenceData, split_leave_one_out
from model.metrics import mask_seen, metrics_from_ranks, target_ranks


@dataclass
class TrainConfig:
    dataset: str = "ml-100k"  # ml-100k, ml-1m or a CSV/Parquet log
    model: str = "mlsa4rec-s"  # mlsa4rec-s, mlsa4rec, mamba4rec or sasrec
    epochs: int = 100  # most epochs to train
    batch_size: int = 64  # sequences per optimiser step
    eval_batch_size: int = 512  # users per evaluation batch
    lr: float = 1e-3  # Adam learning rate
    patience: int = 10  # stop after this many epochs without a better valid NDCG@10
    seed: int = 2024  # random seed
    max_len: int = 50  # window of items the model sees
    device: str = "auto"  # torch device: auto (cuda if available), cpu or cuda[:n]
    threads: int = 0              # torch CPU threads; 0 = torch's default
    time_budget_min: float = 0.0  # stop after the epoch that passes this many minutes; 0 = none
    checkpoint: str = ""          # where to save; "" = runs/<dataset>-<model>.pt
    init_from: str = ""           # start from this checkpoint's weights (continue a run)
    before: str = ""              # train on the log before this time only (seconds or ISO 8601)
    k_core: int = 5               # users and items with fewer events are dropped, iteratively
    min_rating: float = 0.0       # events rated below this are dropped first (0 = keep all)
    # Causal models: train on each user's whole sequence and evaluate on the whole history,
    # as the stream sees it, instead of windows of max_len; batches hold ~tokens_per_batch items.
    whole_sequences: bool = False
    tokens_per_batch: int = 3200  # with whole_sequences: items per batch
    # Causal models: windows of max_len ending this far apart (0 = side by side); see
    # causal_windows.
    window_stride: int = 0
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "max_len", "tokens_per_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("patience", "window_stride", "lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} cannot be negative, got {getattr(self, name)}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pad_right(sequences: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, :len(seq)] = seq
    return out


def causal_windows(train: list[np.ndarray], max_len: int, stride: int = 0):
    """(inputs, targets), both (n_windows, max_len), right-padded; target 0 = no loss.

    stride 0 (or max_len): windows side by side, so a target near a window's start sees few
    items before it. 0 < stride < max_len: windows end `stride` apart and each keeps only its
    last `stride` targets (the first window of a sequence keeps all of its own), so every
    target is still counted once but, past a user's first items, with at least
    max_len - stride items before it; costs max_len / stride times the windows."""
    stride = stride if 0 < stride < max_len else max_len
    inputs, targets = [], []
    for seq in train:
        end = len(seq) - 1                    # the last item is only a target
        while end > 0:
            start = max(0, end - max_len)
            target = seq[start + 1:end + 1].copy()
            if start > 0:                     # the earlier targets belong to earlier windows
                target[:len(target) - stride] = 0
            inputs.append(seq[start:end])
            targets.append(target)
            end = end - stride if start > 0 else 0
    return pad_right(inputs, max_len), pad_right(targets, max_len)


def prefix_windows(train: list[np.ndarray], max_len: int):
    """(inputs (n, max_len) right-padded, lengths (n,), targets (n,)): RecBole's augmentation."""
    inputs, targets = [], []
    for seq in train:
        for t in range(1, len(seq)):
            inputs.append(seq[max(0, t - max_len):t])
            targets.append(seq[t])
    lengths = np.array([len(s) for s in inputs], dtype=np.int64)
    return pad_right(inputs, max_len), lengths, np.array(targets, dtype=np.int64)


def length_batches(lengths: list[int], tokens: int) -> list[np.ndarray]:
    """Indices grouped by similar length so that a padded batch holds at most ~tokens items
    (a sequence longer than that is a batch of its own)."""
    order = np.argsort(lengths, kind="stable")
    batches, current = [], []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > tokens:
            batches.append(np.array(current))
            current = []
        current.append(i)
    if current:
        batches.append(np.array(current))
    return batches


def whole_sequence_batches(train: list[np.ndarray], tokens: int):
    """(inputs, lengths, targets) tensors per batch: each user's sequence in one piece."""
    pairs = [(seq[:-1], seq[1:]) for seq in train if len(seq) >= 2]
    out = []
    for idx in length_batches([len(p[0]) for p in pairs], tokens):
        longest = max(len(pairs[i][0]) for i in idx)
        inputs = pad_right([pairs[i][0] for i in idx], longest)
        targets = pad_right([pairs[i][1] for i in idx], longest)
        out.append((torch.from_numpy(inputs), torch.from_numpy((inputs > 0).sum(1)),
                    torch.from_numpy(targets)))
    return out


@torch.no_grad()
def evaluate(model, split: EvalSplit, max_len: int, device, batch_size: int = 512,
             tokens_per_batch: int = 25600, exclude_seen: bool = False) -> dict:
    """max_len = 0: the whole history (a causal model's view in the stream).

    exclude_seen: every item of the user's whole history leaves the ranking, whatever part of
    it the model reads (not the issue's protocol; see model/metrics.py).
    """
    model.eval()
    histories = [seq[-max_len:] if max_len else seq for seq in split.inputs]
    if max_len:
        batches = [np.arange(s, min(s + batch_size, len(histories)))
                   for s in range(0, len(histories), batch_size)]
    else:
        batches = length_batches([len(h) for h in histories], tokens_per_batch)
    targets = torch.from_numpy(split.targets)
    ranks = torch.zeros(len(histories), dtype=torch.long)
    for idx in batches:
        chunk = [histories[i] for i in idx]
        inputs = torch.from_numpy(pad_right(chunk, max_len or max(len(h) for h in chunk)))
        lengths = torch.tensor([len(h) for h in chunk])
        scores = model.full_sort_scores(inputs.to(device), lengths.to(device))
        if exclude_seen:
            mask_seen(scores, [split.inputs[i] for i in idx])
        ranks[torch.from_numpy(idx)] = target_ranks(scores, targets[idx].to(device)).cpu()
    return metrics_from_ranks(ranks)


@dataclass
class TrainResult:
    model: torch.nn.Module
    valid: dict
    test: dict
    best_epoch: int
    epochs_run: int
    seconds: float
    sequences_per_second: float
    history: list = field(default_factory=list)


def train(model, data: SequenceData, cfg: TrainConfig, log=print) -> TrainResult:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    model.to(device)
    train_seqs, valid, test = split_leave_one_out(data)
    whole = cfg.whole_sequences
    if whole:
        model.require_whole_histories("training on whole sequences")
    eval_len = 0 if whole else cfg.max_len
    if whole:
        fixed = whole_sequence_batches(train_seqs, cfg.tokens_per_batch)
        n_samples = sum(len(b[0]) for b in fixed)
    else:
        if model.causal:
            inputs, targets = causal_windows(train_seqs, cfg.max_len, cfg.window_stride)
            lengths = (inputs > 0).sum(1)
        else:
            inputs, lengths, targets = prefix_windows(train_seqs, cfg.max_len)
        inputs, lengths, targets = map(torch.from_numpy, (inputs, lengths, targets))
        n_samples = len(inputs)

    def epoch_batches():
        if whole:
            return [fixed[i] for i in rng.permutation(len(fixed))]
        order = torch.from_numpy(rng.permutation(len(inputs)))
        return [(inputs[idx], lengths[idx], targets[idx])
                for idx in (order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size))]

    log(f"{model.name} on {cfg.dataset}: {data.n_users} users, {data.n_items - 1} items, "
        f"{n_samples} training sequences{' (whole)' if whole else ''}, device {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best_score, best_epoch, best_state, waited = -1.0, -1, None, 0
    history, started, train_seconds, seen = [], time.time(), 0.0, 0
    for epoch in range(cfg.epochs):
        model.train()
        total, n_targets, epoch_start = 0.0, 0, time.time()
        for batch in tqdm(epoch_batches(), desc=f"epoch {epoch}", disable=not cfg.progress,
                          leave=False):
            loss = model.loss(*(t.to(device) for t in batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_targets = int((batch[2] > 0).sum())   # the loss is a mean over these
            total, n_targets = total + loss.item() * batch_targets, n_targets + batch_targets
        train_seconds += time.time() - epoch_start
        seen += n_samples
        scores = evaluate(model, valid, eval_len, device, cfg.eval_batch_size)
        epoch_loss = total / max(n_targets, 1)            # cross-entropy per training target
        history.append({"epoch": epoch, "loss": epoch_loss, **scores})
        log(f"epoch {epoch}: loss {epoch_loss:.4f} valid ndcg@10 {scores['ndcg@10']:.4f} "
            f"hr@10 {scores['hr@10']:.4f} ({time.time() - epoch_start:.0f}s)")
        if scores["ndcg@10"] >= best_score:       # RecBole counts a tie as an improvement
            best_score, best_epoch, waited = scores["ndcg@10"], epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited > cfg.patience:              # RecBole: cur_step > stopping_step
                log(f"early stop: no better valid ndcg@10 for {waited} epochs")
                break
        if cfg.time_budget_min and time.time() - started > 60 * cfg.time_budget_min:
            log(f"time budget of {cfg.time_budget_min} min spent: stopping after epoch {epoch}")
            break
    model.load_state_dict(best_state)
    valid_metrics = evaluate(model, valid, eval_len, device, cfg.eval_batch_size)
    test_metrics = evaluate(model, test, eval_len, device, cfg.eval_batch_size)
    return TrainResult(model, valid_metrics, test_metrics, best_epoch, len(history),
                       time.time() - started, seen / max(train_seconds, 1e-9), history)


def continued_model(cfg: TrainConfig, data: SequenceData, overrides: dict):
    """The checkpoint cfg.init_from, rebuilt with its own hyper-parameters updated by
    `overrides` (dropout, say); refused if it is another model, on other items, or if an
    override changes the shape of its weights."""
    from model.checkpoint import load_checkpoint
    from model.models import build_model

    start, payload = load_checkpoint(cfg.init_from)
    if payload["model"] != cfg.model:
        raise ValueError(f"{cfg.init_from} is a {payload['model']}, not a {cfg.model}: "
                         f"pass --model {payload['model']}")
    if payload["item_ids"] != data.item_ids:
        raise ValueError(f"{cfg.init_from} was trained on another item set than "
                         f"{cfg.dataset} under these filters")
    config = {k: v for k, v in payload["config"].items() if k not in ("model", "n_items")}
    model = build_model(cfg.model, start.n_items, {**config, **overrides})
    model.n_known = start.n_known
    try:
        model.load_state_dict(start.state_dict())
    except RuntimeError as exc:
        changed = {k: v for k, v in overrides.items() if config.get(k) != v}
        raise ValueError(f"{cfg.init_from}: {changed} change the shape of its weights "
                         f"({str(exc).splitlines()[-1].strip()})") from None
    return model


def describe_run(cfg: TrainConfig, result: TrainResult) -> dict:
    return {"train_config": asdict(cfg), "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run, "seconds": round(result.seconds, 1),
            "train_sequences_per_second": round(result.sequences_per_second, 1),
            "valid": result.valid, "test": result.test}


def train_to_checkpoint(cfg: TrainConfig, model_overrides: dict | None = None, log=print):
    """The whole `mlsa4rec train`: load and prepare the data, build (or continue) the model,
    train, save the checkpoint and its run description; returns (result, path, sha256)."""
    import json
    from pathlib import Path

    from model.checkpoint import save_checkpoint
    from model.data.protocol import prepare_for_run
    from model.models import build_model

    data = prepare_for_run(asdict(cfg))
    overrides = {**(model_overrides or {}), "max_len": cfg.max_len}
    torch.manual_seed(cfg.seed)                   # the initial weights are part of the run
    if cfg.init_from:
        model = continued_model(cfg, data, overrides)
    else:
        model = build_model(cfg.model, data.n_items, overrides)
    result = train(model, data, cfg, log=log)
    run = describe_run(cfg, result)
    path = Path(cfg.checkpoint or f"runs/{Path(cfg.dataset).stem}-{cfg.model}.pt")
    sha = save_checkpoint(path, result.model, data.item_ids, run)
    path.with_suffix(".json").write_text(json.dumps(run, indent=2))
    return result, path, sha
