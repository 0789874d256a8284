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
With `run_dir` every epoch ends by writing the whole training state there (model/run_state.py)
and a row of the learning curve (model/curve.py); a run resumed from that state goes on as if
it had never stopped: the same batches, dropout masks and final weights.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    # with --before: this share of the titles clicked both before and after it is left out of
    # training (their events dropped), so that they come after it as titles the model has never
    # seen (an item cold start: streams/demo.py, bench/new_titles.py); 0 = none
    hold_out_titles: float = 0.0
    k_core: int = 5               # users and items with fewer events are dropped, iteratively
    min_rating: float = 0.0       # events rated below this are dropped first (0 = keep all)
    # Causal models: train on each user's whole sequence and evaluate on the whole history,
    # as the stream sees it, instead of windows of max_len; batches hold ~tokens_per_batch items.
    whole_sequences: bool = False
    tokens_per_batch: int = 3200  # with whole_sequences: items per batch
    # Causal models: windows of max_len ending this far apart (0 = side by side); see
    # causal_windows.
    window_stride: int = 0
    # Batches of about this many training targets (positions with a loss) instead of
    # batch_size sequences: windows are packed whole until the next would pass it; 0 = off.
    targets_per_batch: int = 0
    # Folder for the training state (written after every epoch, so `--resume` goes on from
    # there), the learning curve (curve.csv, curve.png) and the final model.pt; "" = none.
    run_dir: str = ""
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "max_len", "tokens_per_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("patience", "window_stride", "lr", "targets_per_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} cannot be negative, got {getattr(self, name)}")
        if self.targets_per_batch and self.whole_sequences:
            raise ConfigError("targets_per_batch packs windows; with whole_sequences the "
                              "batches follow tokens_per_batch instead")


# Named sets of TrainConfig values (`mlsa4rec train --recipe NAME`), below the command line and
# the environment. "paper": Mamba4Rec's ML-1M recipe (arXiv 2403.03900, RecBole): max length
# 200, batches of 2048 samples of one target each, Adam 1e-3, up to 300 epochs, stopping step
# 10 on valid NDCG@10. In our terms a causal model's window carries a loss at every position,
# so "2048 targets" is targets_per_batch, not 2048 windows (that would be ~110x more targets a
# step); windows ending 50 apart give every target past a user's first 150 items at least 150
# items before it (RecBole's prefixes give min(200, position)); the model keeps its own
# hyper-parameters (Mamba4Rec's defaults are the paper's: 1 layer, dropout 0.2).
RECIPES = {
    "paper": {"max_len": 200, "targets_per_batch": 2048, "window_stride": 50, "lr": 1e-3,
              "epochs": 300, "patience": 10},
}


def target_batches(order: np.ndarray, counts: np.ndarray, limit: int) -> list[np.ndarray]:
    """Sample indices in `order`, cut into batches of at most `limit` targets (counts[i]
    targets in sample i); a sample with more than `limit` is a batch of its own."""
    batches, current, total = [], [], 0
    for i, count in zip(order.tolist(), counts[order].tolist()):
        if current and total + count > limit:
            batches.append(np.array(current))
            current, total = [], 0
        current.append(i)
        total += count
    if current:
        batches.append(np.array(current))
    return batches


def data_fingerprint(data: SequenceData) -> dict:
    """What a resumed run checks it trains on the same data as before."""
    digest = hashlib.sha256()
    for seq in data.sequences:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        digest.update(b"|")
    return {"users": data.n_users, "items": data.n_items - 1,
            "interactions": data.n_interactions, "sha256": digest.hexdigest()}


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


def train(model, data: SequenceData, cfg: TrainConfig, log=print, model_overrides=None,
          resume_state: dict | None = None) -> TrainResult:
    """resume_state: model/run_state.load_state(cfg.run_dir), to go on from its last epoch
    (refused if it was started with other settings, model_overrides included)."""
    from model import curve, run_state

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
            counts = (targets > 0).sum(1)
        else:
            inputs, lengths, targets = prefix_windows(train_seqs, cfg.max_len)
            counts = np.ones(len(targets), dtype=np.int64)
        inputs, lengths, targets = map(torch.from_numpy, (inputs, lengths, targets))
        n_samples = len(inputs)

    def epoch_batches():
        if whole:
            return [fixed[i] for i in rng.permutation(len(fixed))]
        order = rng.permutation(len(inputs))
        if cfg.targets_per_batch:
            groups = target_batches(order, counts, cfg.targets_per_batch)
        else:
            groups = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        groups = [torch.from_numpy(idx) for idx in groups]
        return [(inputs[idx], lengths[idx], targets[idx]) for idx in groups]

    log(f"{model.name} on {cfg.dataset}: {data.n_users} users, {data.n_items - 1} items, "
        f"{n_samples} training sequences{' (whole)' if whole else ''}, device {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    started_with = {"train_config": asdict(cfg), "model_overrides": dict(model_overrides or {}),
                    "data": data_fingerprint(data)}
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    # Everything the next epoch depends on, besides the weights, optimiser and RNGs.
    progress = {"epoch": 0, "best_score": -1.0, "best_epoch": -1, "best_state": None,
                "waited": 0, "history": [], "seen": 0, "train_seconds": 0.0, "seconds": 0.0}
    if resume_state is not None:
        run_state.check_same_run(run_state.state_path(cfg.run_dir),
                                 resume_state["started_with"], started_with)
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        progress = resume_state["progress"]
        rng.bit_generator.state = resume_state["rng"]["numpy"]
        torch.set_rng_state(resume_state["rng"]["torch"])
        if device.type == "cuda" and resume_state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(resume_state["rng"]["cuda"])
        curve.rewrite_csv(run_dir / "curve.csv", progress["history"])
        log(f"resumed {cfg.run_dir} after epoch {progress['epoch'] - 1}: best valid ndcg@10 "
            f"{progress['best_score']:.4f} at epoch {progress['best_epoch']}, "
            f"{progress['waited']} epochs since")
    elif run_dir is not None:
        (run_dir / "curve.csv").unlink(missing_ok=True)       # a new run: a new curve
    started, ran = time.time(), False
    # RecBole: stop once more than `patience` epochs in a row missed (cur_step > stopping_step).
    while progress["epoch"] < cfg.epochs and progress["waited"] <= cfg.patience:
        epoch, ran = progress["epoch"], True
        model.train()
        total, n_targets, epoch_start = 0.0, 0, time.time()
        batches = epoch_batches()
        if epoch == 0 and cfg.targets_per_batch:
            log(f"batches of up to {cfg.targets_per_batch} targets: {len(batches)} steps an "
                f"epoch, {int(counts.sum()) / len(batches):.0f} targets a step on average")
        for batch in tqdm(batches, desc=f"epoch {epoch}", disable=not cfg.progress,
                          leave=False):
            loss = model.loss(*(t.to(device) for t in batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_targets = int((batch[2] > 0).sum())   # the loss is a mean over these
            total, n_targets = total + loss.item() * batch_targets, n_targets + batch_targets
        train_seconds = time.time() - epoch_start
        progress["train_seconds"] += train_seconds
        progress["seen"] += n_samples
        scores = evaluate(model, valid, eval_len, device, cfg.eval_batch_size)
        epoch_loss = total / max(n_targets, 1)            # cross-entropy per training target
        seconds = time.time() - epoch_start
        progress["history"].append({
            "epoch": epoch, "loss": epoch_loss, **scores, "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds, "positions_per_s": n_targets / max(train_seconds, 1e-9)})
        log(f"epoch {epoch}: loss {epoch_loss:.4f} valid ndcg@10 {scores['ndcg@10']:.4f} "
            f"hr@10 {scores['hr@10']:.4f} ({seconds:.0f}s)")
        if scores["ndcg@10"] >= progress["best_score"]:   # RecBole counts a tie as better
            progress.update(best_score=scores["ndcg@10"], best_epoch=epoch, waited=0,
                            best_state=copy.deepcopy(model.state_dict()))
        else:
            progress["waited"] += 1
            if progress["waited"] > cfg.patience:
                log(f"early stop: no better valid ndcg@10 for {progress['waited']} epochs")
        progress["epoch"] = epoch + 1
        progress["seconds"] += seconds
        if run_dir is not None:
            save_run_state(run_dir, model, optimizer, progress, started_with, rng, device)
            curve.append_csv(run_dir / "curve.csv", progress["history"][-1])
            curve.plot_curve(run_dir / "curve.png", progress["history"],
                             f"{model.name} on {Path(cfg.dataset).name}")
        if cfg.time_budget_min and time.time() - started > 60 * cfg.time_budget_min:
            log(f"time budget of {cfg.time_budget_min} min spent: stopping after epoch {epoch}")
            break
    if resume_state is not None and not ran:
        log(f"{cfg.run_dir} had already finished its {progress['epoch']} epochs (early stop or "
            f"epoch cap): writing the best epoch's checkpoint only")
    model.load_state_dict(progress["best_state"])
    valid_metrics = evaluate(model, valid, eval_len, device, cfg.eval_batch_size)
    test_metrics = evaluate(model, test, eval_len, device, cfg.eval_batch_size)
    return TrainResult(model, valid_metrics, test_metrics, progress["best_epoch"],
                       len(progress["history"]), progress["seconds"],
                       progress["seen"] / max(progress["train_seconds"], 1e-9),
                       progress["history"])


def save_run_state(run_dir: Path, model, optimizer, progress: dict, started_with: dict, rng,
                   device) -> None:
    from model import run_state

    rngs = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rngs["cuda"] = torch.cuda.get_rng_state_all()
    run_state.save_state(run_dir, {
        "started_with": started_with,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": None,               # the trainer has no LR schedule (yet)
        "progress": {**progress, "best_state": {k: v.detach().cpu() for k, v in
                                                progress["best_state"].items()}},
        "rng": rngs,
    })


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


def train_to_checkpoint(cfg: TrainConfig, model_overrides: dict | None = None, log=print,
                        resume: bool = False):
    """The whole `mlsa4rec train`: load and prepare the data, build (or continue) the model,
    train, save the checkpoint and its run description; returns (result, path, sha256).
    resume: go on from the state in cfg.run_dir (see model/run_state.py)."""
    import json

    from model import run_state
    from model.checkpoint import save_checkpoint
    from model.data.protocol import prepare_for_run
    from model.models import build_model

    resume_state = None
    if resume:                                    # fail before the data is loaded
        if not cfg.run_dir:
            raise run_state.ResumeError("--resume needs --run-dir, the folder of the run")
        resume_state = run_state.load_state(cfg.run_dir)
    elif cfg.run_dir and run_state.state_path(cfg.run_dir).exists():
        raise run_state.ResumeError(
            f"{cfg.run_dir} already holds a run ({run_state.state_path(cfg.run_dir)}): pass "
            f"--resume to go on with it, or choose another --run-dir")
    data = prepare_for_run(asdict(cfg))
    overrides = {**(model_overrides or {}), "max_len": cfg.max_len}
    torch.manual_seed(cfg.seed)                   # the initial weights are part of the run
    if cfg.init_from:
        model = continued_model(cfg, data, overrides)
    else:
        model = build_model(cfg.model, data.n_items, overrides)
    result = train(model, data, cfg, log=log, model_overrides=model_overrides,
                   resume_state=resume_state)
    run = describe_run(cfg, result)
    default = (Path(cfg.run_dir) / "model.pt" if cfg.run_dir
               else Path(f"runs/{Path(cfg.dataset).stem}-{cfg.model}.pt"))
    path = Path(cfg.checkpoint) if cfg.checkpoint else default
    sha = save_checkpoint(path, result.model, data.item_ids, run)
    path.with_suffix(".json").write_text(json.dumps(run, indent=2))
    return result, path, sha
