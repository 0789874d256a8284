"""Online fine-tuning where it should matter: an item cold start with many new titles.

make run's replay (ML-100k's last 20%) has few titles the warm start never saw (23 held out
over all rounds), too few to show whether fine-tuning helps. Here a random fraction of the
items clicked after the cut-off is taken out of the warm start entirely (their clicks before
the cut-off are dropped from its training data), so the replayed stream holds thousands of
clicks on titles the warm start never saw. The warm start is trained for this split with the
demo's recipe (cached in --out); then the stream after the cut-off is fed to the trainer
(OnlineTrainer, no Kafka) with a round every --round-every clicks, once per variant:

  off                       the warm start served throughout (no rounds)
  default                   the trainer's defaults
  k=v,k=v                   the trainer's defaults with these TrainerConfig fields changed,
                            e.g. imprint_new_items=true,imprint_norm=0.5

Every click after the user's first in the stream is judged prequentially, as the stream does:
ranked by the version served when it arrives, given the user's stream history (whole, as the
worker's state holds it, for a steppable model), over the version's own items (the worker
serves the version, not the trainer's newer vocabulary: a title newer than the version is a
miss; in a history it is left out as the worker does, or read as OOV with --unknown oov).
Ties count against the target (new titles' rows still at the known items' mean tie with each
other: the worker could show at most ten of them).

Judgments are grouped: new titles (the item unknown to the warm start), new users (no click
before the cut-off), the rest. Differences against "off" are paired (the same clicks) with
standard errors clustered by user.

--states worker judges instead what the worker shows: the clicks go through the worker's own
`Scorer` in batches, which keeps each user's state across the versions of one lineage (stepped
by the weights that served each click; streams/worker/scoring.py `swap`), and each click is
judged against the top 10 sent after the user's previous click, as the stream's evaluator
does (so ranks past 10 are not known there).

    /tmp/heavy .venv/bin/python bench/new_titles.py --variants off default \\
        imprint_new_items=true,imprint_norm=0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.models.base import OOV  # noqa: E402
from model.config import parse_fields  # noqa: E402
from model.metrics import target_ranks  # noqa: E402
from model.prequential import clustered_mean_se  # noqa: E402
from model.data.protocol import held_out_titles  # noqa: E402
from model.training import TrainConfig, pad_right, train_to_checkpoint  # noqa: E402
from model.vocab import mask_spare_rows  # noqa: E402
from streams.demo import DemoConfig, warm_start_key  # noqa: E402
from streams.replay.log_replay import log_events  # noqa: E402
from streams.shared.config import StreamConfig, TrainerConfig  # noqa: E402
from streams.trainer.replay_buffer import ReplayBuffer  # noqa: E402
from streams.trainer.trainer import OnlineTrainer, buffer_config  # noqa: E402
from streams.worker.scoring import Event, Scorer  # noqa: E402

NEW_TITLES, NEW_USERS, THE_REST = "new titles", "new users", "the rest"
GROUPS = (NEW_TITLES, NEW_USERS, THE_REST, "all")
UNKNOWN_RANK = 10 ** 9              # a target the served version does not have
PAST_TOP = 10 ** 6                  # --states worker: not in the top 10 shown


def warm_start(args, cutoff: float) -> Path:
    """The demo's warm-start recipe on the log before the cut-off with --new-fraction of the
    titles held out (`hold_out_titles`); cached under args.out, keyed by the recipe and the
    training code."""
    demo = DemoConfig()
    recipe = TrainConfig(dataset=args.dataset, model=args.model, before=str(cutoff),
                         epochs=args.warm_epochs, patience=demo.warm_patience, lr=demo.warm_lr,
                         threads=args.threads, progress=False, hold_out_titles=args.new_fraction)
    path = Path(args.out) / (f"warm-{args.dataset}-{args.model}-new{args.new_fraction:g}-"
                             f"{warm_start_key(recipe)}.pt")
    if path.exists():
        print(f"warm start: reusing {path}")
        return path
    train_to_checkpoint(dataclasses.replace(recipe, checkpoint=str(path)),
                        log=lambda line: print("  " + line, flush=True))
    return path


@torch.no_grad()
def judged_ranks(model, history: dict[str, list[int]], pending: list[tuple[str, int, int]],
                 skip_unknown: bool = False, tokens: int = 16384) -> np.ndarray:
    """Rank of each pending (user, position, target): target = history[user][position], ranked
    after the items before it, by the served version as the worker has it: over the version's
    own items (model.n_known), an item newer than the version fed as OOV in a history (or left
    out of it: skip_unknown) and a miss as a target. A steppable model reads the user's whole
    stream history, as the worker's state does (one pass per user for all its judged clicks);
    a window model the last max_len items. An empty history reads one OOV item."""
    model.eval()
    max_len, n_known = model.config.max_len, model.n_known
    sequences, positions = {}, []              # user -> items read; pending -> items before it
    for user, position, _ in pending:
        if user not in sequences:
            items = np.array(history[user], dtype=np.int64)
            if skip_unknown:
                kept = items < n_known
                sequences[user] = (items[kept], np.concatenate([[0], np.cumsum(kept)]))
            else:
                items[items >= n_known] = OOV
                sequences[user] = (items, np.arange(len(items) + 1))
        positions.append(int(sequences[user][1][position]))
    sequences = {user: items for user, (items, _) in sequences.items()}
    reprs = torch.zeros(len(pending), model.item_embedding.embedding_dim)
    empty = [k for k, position in enumerate(positions) if position == 0]
    if empty:
        reprs[empty] = model.forward(torch.tensor([[OOV]]), torch.tensor([1]))
    if model.steppable:
        by_user: dict[str, list[int]] = {}
        for k, (user, _, _) in enumerate(pending):
            if positions[k]:
                by_user.setdefault(user, []).append(k)
        end_of = {user: max(positions[k] for k in ks) for user, ks in by_user.items()}
        users = sorted(by_user, key=end_of.get)
        start = 0
        while start < len(users):         # users sorted by length: batches of ~tokens items
            stop = start + 1
            while stop < len(users) and (stop - start + 1) * end_of[users[stop]] <= tokens:
                stop += 1
            batch = users[start:stop]
            inputs = torch.from_numpy(pad_right([sequences[u][:end_of[u]] for u in batch],
                                                end_of[batch[-1]]))
            out = model.sequence_output(inputs)
            for row, user in enumerate(batch):
                for k in by_user[user]:
                    reprs[k] = out[row, positions[k] - 1]
            start = stop
    else:
        judged = [k for k, position in enumerate(positions) if position]
        for start in range(0, len(judged), 512):
            rows = judged[start:start + 512]
            windows = [sequences[pending[k][0]][max(0, positions[k] - max_len):positions[k]]
                       for k in rows]
            inputs = torch.from_numpy(pad_right(windows, max_len))
            reprs[rows] = model.forward(inputs, torch.tensor([len(w) for w in windows]))
    scores = mask_spare_rows(model.scores(reprs), n_known)
    targets = torch.tensor([t for _, _, t in pending], dtype=torch.long)
    new = targets >= n_known
    ranks = target_ranks(scores, targets.clamp(max=n_known - 1)).numpy()   # ties count against
    ranks[new.numpy()] = UNKNOWN_RANK               # not in the version: never recommended
    return ranks


@torch.no_grad()
def rows_at_the_mean(model, first_new: int) -> tuple[int, int]:
    """(rows of items newer than the warm start still pointing where the warm start's mean
    row points (cosine > 0.99: not imprinted, hardly moved by training), such rows)."""
    rows = model.item_embedding.weight[first_new:model.n_known]
    mean = model.item_embedding.weight[1:first_new].mean(0, keepdim=True)
    return int((torch.nn.functional.cosine_similarity(rows, mean) > 0.99).sum()), len(rows)


class WorkerJudge:
    """The stream as the worker serves it (--states worker): clicks through the worker's
    `Scorer` (its defaults: states kept across a lineage's versions), each judged against
    the top 10 sent after the same user's previous click."""

    def __init__(self, model, item_ids: list[str], batch: int, keep_states_for_versions: int):
        defaults = StreamConfig()
        self.scorer = Scorer(model, item_ids, "v1", top_k=defaults.top_k,
                             exclude_seen=defaults.exclude_seen,
                             rebuild_states=defaults.rebuild_states,
                             keep_states_for_versions=keep_states_for_versions)
        self.batch, self.events, self.records, self.sent = batch, [], {}, 0
        self.shown: dict[str, tuple[list[str], dict]] = {}  # user -> (top 10, version's items)
        self.ranks: list[int] = []

    def add(self, user: str, item: str, timestamp_ms: int) -> None:
        self.sent += 1                  # a unique event id: the Scorer skips a repeated one
        self.events.append(Event(user, item, str(self.sent), timestamp_ms))
        if len(self.events) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.events:
            return
        users = {e.user_id for e in self.events}
        written, recommendations, _ = self.scorer.process(
            self.events, {u: self.records.get(u) for u in users})
        self.records.update(written)
        known = self.scorer.index             # this version's items (a swap makes a new one)
        for event, shown in zip(self.events, recommendations):
            if event.user_id in self.shown:           # judged as its previous click's answer
                top, items = self.shown[event.user_id]
                self.ranks.append(top.index(event.item_id) if event.item_id in top
                                  else PAST_TOP if event.item_id in items else UNKNOWN_RANK)
            self.shown[event.user_id] = ([i["item_id"] for i in shown["items"]], known)
        self.events = []

    def swap(self, model, item_ids: list[str], version: str, parent: str) -> None:
        self.flush()                                   # earlier clicks: the older version
        self.scorer.swap(model, item_ids, version, parent)


def parse_variant(text: str) -> dict | None:
    """'off' -> None (no rounds); 'default' -> {}; 'k=v,k=v' -> TrainerConfig fields."""
    if text == "off":
        return None
    if text == "default":
        return {}
    pairs = [part.split("=", 1) for part in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"variant {text!r}: write off, default or field=value,field=value")
    try:
        return parse_fields(TrainerConfig, dict(pairs))
    except ValueError as exc:
        raise SystemExit(f"variant {text!r}: {exc}") from None


def run_variant(args, checkpoint: Path, replayed, known_users: set[str], overrides):
    """Feed the stream to a trainer; returns (ranks, groups, users, round lines)."""
    model, payload = load_checkpoint(checkpoint)
    known_items, warm_known = set(payload["item_ids"][1:]), model.n_known
    cfg = dataclasses.replace(TrainerConfig(), seed=args.seed, **(overrides or {}))
    versions = []

    worker = WorkerJudge(model, payload["item_ids"], args.worker_batch,
                         args.keep_states_for_versions) \
        if args.states == "worker" else None

    # Published versions waiting to serve (--serve-after): (the click they serve from, model,
    # its items, version, parent); the trainer's item list grows, so a copy is kept.
    queued: list[tuple[int, object, list[str], str, str]] = []
    served = model                      # the version judging clicks (--states recomputed)

    def publish(model, item_ids, metrics, parent, trained_through):
        versions.append({"version": f"v{len(versions) + 2}"})
        queued.append((n + args.serve_after, model, list(item_ids), versions[-1]["version"],
                       parent))
        return versions[-1]

    def serve_next():
        nonlocal served
        judge()                         # the clicks before it: the older version
        _, model, item_ids, version, parent = queued.pop(0)
        served = model
        if worker:
            worker.swap(model, item_ids, version, parent)

    ranks, groups, users, rounds = [], [], [], []
    pending: list[tuple[str, int, int]] = []        # (user, position in history, target)
    history: dict[str, list[int]] = {}

    def judge():
        if worker:
            worker.flush()
        elif pending:
            ranks.append(judged_ranks(served, history, pending, args.unknown == "skip"))
        pending.clear()

    with tempfile.TemporaryDirectory() as tmp:
        trainer = OnlineTrainer(model, payload["item_ids"], "v1",
                                ReplayBuffer(Path(tmp) / "buffer", buffer_config(cfg), cfg.seed),
                                cfg, publish)
        for n, (user, item, ts) in enumerate(zip(replayed.users, replayed.items,
                                                 replayed.timestamps), 1):
            user, item = str(user), str(item)
            while queued and n > queued[0][0]:
                serve_next()
            trainer.add(user, item, int(ts * 1000))
            if worker:
                worker.add(user, item, int(ts * 1000))
            target = trainer._index_of(item)
            seen = history.setdefault(user, [])
            if seen:
                pending.append((user, len(seen), target))
                groups.append(NEW_TITLES if item not in known_items
                              else THE_REST if user in known_users else NEW_USERS)
                users.append(user)
            seen.append(target)
            if n % args.round_every == 0:
                judge()
                if overrides is not None and (not args.rounds or len(rounds) < args.rounds):
                    result = trainer.run_round()
                    rounds.append((result.candidate.get("ndcg@10", float("nan")),
                                   result.serving.get("ndcg@10", float("nan")),
                                   result.published is not None,
                                   rows_at_the_mean(trainer.serving, warm_known)))
        judge()
        trainer.buffer.close()
    ranks = np.array(worker.ranks) if worker else np.concatenate(ranks)
    return ranks, np.array(groups), np.array(users), rounds


def groups_of(results: dict) -> np.ndarray:
    return next(iter(results.values()))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="the log (default ml-100k)")
    parser.add_argument("--model", default="mlsa4rec-s", help="the warm start's model")
    parser.add_argument("--cutoff", type=float, default=0.8,
                        help="replay the log after this fraction of its events (default 0.8)")
    parser.add_argument("--new-fraction", type=float, default=0.15,
                        help="fraction of the items clicked after the cut-off held out of the "
                             "warm start (default 0.15)")
    parser.add_argument("--checkpoint", default="",
                        help="use this warm start instead of training one (e.g. the demo's, "
                             "with --new-fraction 0)")
    parser.add_argument("--warm-epochs", type=int, default=DemoConfig().warm_epochs,
                        help="the warm start's epoch cap (default: the demo's)")
    parser.add_argument("--round-every", type=int, default=2000,
                        help="a round after this many clicks (default 2000)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="at most this many rounds per variant (default 0: all)")
    parser.add_argument("--variants", nargs="+", default=["off", "default"],
                        help="off, default or field=value,... of TrainerConfig (default: off "
                             "default)")
    parser.add_argument("--clicks", type=int, default=0,
                        help="replay only the first this many clicks (default 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the trainer's seed (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default="/tmp/ft", help="warm starts' cache (default /tmp/ft)")
    parser.add_argument("--save", default="",
                        help="save every variant's ranks, groups and users here (.npz)")
    parser.add_argument("--unknown", choices=["skip", "oov"], default="skip",
                        help="an item the served version does not know, in a history: left "
                             "out of what it reads (skip, as the worker does) or read as OOV, "
                             "the items' mean (oov, as the worker did before RESULTS 11b) "
                             "(default skip)")
    parser.add_argument("--states", choices=["recomputed", "worker"], default="recomputed",
                        help="judge each click by the served version over the user's whole "
                             "history (recomputed), or by what the worker's Scorer sent after "
                             "the user's previous click, its states kept across versions "
                             "(worker) (default recomputed)")
    parser.add_argument("--serve-after", type=int, default=0,
                        help="a published version serves from this many clicks after its "
                             "round (the live system's delay: the demo's replay runs up to a "
                             "round ahead of the trainer) (default 0: at once)")
    parser.add_argument("--keep-states-for-versions", type=int,
                        default=StreamConfig().keep_states_for_versions,
                        help="--states worker: the worker's option of that name (default: "
                             "the worker's, %(default)s): a state made by an older version is "
                             "rebuilt from the user's last 50 items")
    parser.add_argument("--worker-batch", type=int, default=64,
                        help="--states worker: clicks per Scorer batch (default 64)")
    parser.add_argument("--base", default="",
                        help="the variant the others are compared with (default: the first)")
    parser.add_argument("--report", nargs="*", default=[],
                        help="print the tables of --save files of one stream (with --base) "
                             "and stop")
    args = parser.parse_args()
    if args.report:
        return report_saved(args.report, args.base)
    if not 0 <= args.new_fraction < 1:
        raise SystemExit(f"--new-fraction {args.new_fraction}: must be in [0, 1)")
    variants = [(text, parse_variant(text)) for text in args.variants]
    torch.set_num_threads(args.threads)
    events = log_events(args.dataset)
    cutoff = float(events.timestamps[int(args.cutoff * (len(events.rows) - 1))])
    held_out = held_out_titles(events, cutoff, args.new_fraction)
    checkpoint = Path(args.checkpoint) if args.checkpoint else warm_start(args, cutoff)
    run = json.loads(checkpoint.with_suffix(".json").read_text())
    print(f"warm start: {len(held_out)} items held out; best epoch {run['best_epoch']} of "
          f"{run['epochs_run']}, valid NDCG@10 {run['valid']['ndcg@10']:.4f}, "
          f"{run['seconds']:.0f} s")
    replayed = log_events(args.dataset, start=str(cutoff))
    if args.clicks:
        replayed = dataclasses.replace(replayed, users=replayed.users[:args.clicks],
                                       items=replayed.items[:args.clicks],
                                       timestamps=replayed.timestamps[:args.clicks])
    known_users = set(map(str, events.users[events.timestamps < cutoff]))
    print(f"{len(replayed.users)} clicks after the cut-off, a round every {args.round_every}",
          flush=True)

    results = {}
    for text, overrides in variants:
        started = time.perf_counter()
        ranks, groups, users, rounds = run_variant(args, checkpoint, replayed, known_users,
                                                   overrides)
        results[text] = (ranks, groups, users)
        line = f"{text}: {time.perf_counter() - started:.0f} s"
        if rounds:
            line += (f", {sum(r[2] for r in rounds)} of {len(rounds)} rounds published; "
                     "candidate/serving holdout NDCG@10: " +
                     ", ".join(f"{c:.4f}/{s:.4f}{'*' if p else ''}" for c, s, p, _ in rounds)
                     + "; new titles' rows in the served version still at the mean: " +
                     ", ".join(f"{m}/{n}" for _, _, _, (m, n) in rounds))
        print(line, flush=True)

    groups, users = groups_of(results), next(iter(results.values()))[2]
    ranks = {text: r for text, (r, _, _) in results.items()}
    if args.save:
        np.savez(args.save, groups=groups, users=users,
                 **{f"ranks:{text}": r for text, r in ranks.items()})
    report(ranks, groups, users, args.base or args.variants[0])


def report(ranks: dict[str, np.ndarray], groups: np.ndarray, users: np.ndarray,
           base: str) -> None:
    """The table by group, each variant against `base` on the same clicks."""
    if base not in ranks:
        raise SystemExit(f"--base {base!r}: not a variant of this run ({', '.join(ranks)})")
    print(f"\n| variant | group | judged | HR@10 | NDCG@10 | dHR@10 vs {base} (SE) | "
          f"dNDCG@10 vs {base} (SE) |")
    print("|---|---|---|---|---|---|---|")
    for text, variant_ranks in ranks.items():
        for group in GROUPS:
            mask = np.ones(len(groups), bool) if group == "all" else groups == group
            if not mask.any():
                continue
            hit = (variant_ranks[mask] < 10).astype(float)
            gain = hit / np.log2(variant_ranks[mask] + 2)
            base_hit = (ranks[base][mask] < 10).astype(float)
            base_gain = base_hit / np.log2(ranks[base][mask] + 2)
            cells = [text, group, f"{mask.sum():,}", f"{hit.mean():.4f}", f"{gain.mean():.4f}"]
            if text == base:
                cells += ["", ""]
            else:
                for diff in (hit - base_hit, gain - base_gain):
                    mean, se = clustered_mean_se(diff, users[mask])
                    cells.append(f"{mean:+.4f} ({se:.4f})")
            print("| " + " | ".join(cells) + " |")
    print("\nNew titles: judgments whose item the served version had (could be recommended), "
          "their HR@10 and median rank")
    for text, variant_ranks in ranks.items():
        new = variant_ranks[groups == NEW_TITLES]
        inside = new[new < UNKNOWN_RANK]
        median = np.median(inside) if len(inside) else 0
        print(f"{text}: {len(inside)} of {len(new)} in the version"
              + (f", HR@10 {np.mean(inside < 10):.4f}, median rank "
                 + (f"{median:.0f}" if median < PAST_TOP else "past the top 10 shown")
                 if len(inside) else ""))


def report_saved(paths: list[str], base: str) -> None:
    """The tables of one or more --save files of the same stream (the same clicks judged);
    a variant name met again in a later file gets that file's name after an @."""
    ranks, groups, users = {}, None, None
    for path in paths:
        saved = np.load(path)
        if groups is not None and not (np.array_equal(saved["groups"], groups)
                                       and np.array_equal(saved["users"], users)):
            raise SystemExit(f"{path}: not the same judged clicks as {paths[0]}")
        groups, users = saved["groups"], saved["users"]
        for name in saved.files:
            if name.startswith("ranks:"):
                text = name.split(":", 1)[1]
                ranks[text if text not in ranks else f"{text}@{Path(path).stem}"] = saved[name]
    report(ranks, groups, users, base or next(iter(ranks)))


if __name__ == "__main__":
    main()
