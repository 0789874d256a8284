"""make run's online fine-tuning, offline: the trainer's rounds with and without imprinting.

The demo's trainer sees the last 20% of ML-100k and runs a round every so often; a round's
candidate is published only if its holdout NDCG@10 is not worse than the serving version's
(and the anchor's) by more than the margin. This runs the same rounds without Kafka, with the
trainer's defaults, for both settings of --imprint-new-items, and prints per round: the
candidate's holdout NDCG@10 against the serving one's, whether it is published, and the served
model's HR@10 on the held-out clicks whose item is a new title (unknown to the warm start).

    .venv/bin/python bench/imprint_rounds.py --checkpoint /tmp/demo1/warm-ml-100k-...pt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.finetune import next_item_metrics  # noqa: E402
from streams.replay.log_replay import log_events  # noqa: E402
from streams.shared.config import TrainerConfig  # noqa: E402
from streams.trainer.replay_buffer import ReplayBuffer  # noqa: E402
from streams.trainer.trainer import OnlineTrainer, buffer_config  # noqa: E402


def new_title_hr(trainer: OnlineTrainer, known: set[str]) -> tuple[float, int]:
    """The serving model's HR@10 on the held-out clicks whose item the warm start did not know."""
    examples = [(h, t) for h, t in trainer.buffer.holdout_examples() if t not in known]
    if not examples:
        return float("nan"), 0
    index = trainer._index_of
    histories = [np.array([index(i) for i in h], dtype=np.int64) for h, _ in examples]
    served = trainer._grown(trainer.serving)      # rows for items newer than the version
    metrics = next_item_metrics(served, histories, [index(t) for _, t in examples],
                                len(trainer.item_ids), served.config.max_len)
    return metrics["hr@10"], len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the demo's warm start checkpoint")
    parser.add_argument("--dataset", default="ml-100k", help="the log (default ml-100k)")
    parser.add_argument("--cutoff", type=float, default=0.8,
                        help="replay the log after this fraction of its events (default 0.8)")
    parser.add_argument("--round-every", type=int, default=2000,
                        help="a round after this many clicks (default 2000)")
    parser.add_argument("--imprint-norms", type=float, nargs="*", default=[1.0],
                        help="imprinted rows' lengths to run after the run without imprinting "
                             "(in the known rows' mean lengths; default 1.0)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="stop each setting after this many rounds (default 0: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    events = log_events(args.dataset)
    cutoff = float(events.timestamps[int(args.cutoff * (len(events.rows) - 1))])
    replayed = log_events(args.dataset, start=str(cutoff))
    print(f"{len(replayed.rows)} clicks after the cut-off, a round every {args.round_every}")
    print("| imprint | round | candidate / serving holdout NDCG@10 | published | new titles "
          "held out | served HR@10 on them |")
    print("|---|---|---|---|---|---|")
    for norm in [None, *args.imprint_norms]:
        imprint = norm is not None
        label = f"on, norm {norm:g}" if imprint else "off"
        model, payload = load_checkpoint(args.checkpoint)
        known = set(payload["item_ids"][1:])
        cfg = dataclasses.replace(TrainerConfig(), imprint_new_items=imprint,
                                  imprint_norm=norm or 1.0)
        published = []

        def publish(model, item_ids, metrics, parent, trained_through):
            published.append({"version": f"v{len(published) + 2}"})
            return published[-1]

        with tempfile.TemporaryDirectory() as tmp:
            trainer = OnlineTrainer(model, payload["item_ids"], "v1",
                                    ReplayBuffer(Path(tmp) / "buffer", buffer_config(cfg)),
                                    cfg, publish)
            for n, (user, item, ts) in enumerate(zip(replayed.users, replayed.items,
                                                     replayed.timestamps), 1):
                trainer.add(str(user), str(item), int(ts * 1000))
                if n % args.round_every == 0:
                    if args.rounds and n // args.round_every > args.rounds:
                        break
                    result = trainer.run_round()
                    hr, count = new_title_hr(trainer, known)
                    print(f"| {label} | {n // args.round_every} | "
                          f"{result.candidate.get('ndcg@10', float('nan')):.4f} / "
                          f"{result.serving.get('ndcg@10', float('nan')):.4f} | "
                          f"{'yes' if result.published else 'no'} | {count} | {hr:.4f} |",
                          flush=True)


if __name__ == "__main__":
    main()
