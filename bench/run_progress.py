"""Where a long `mlsa4rec train --run-dir DIR` run stands, from DIR/curve.csv.

    .venv/bin/python bench/run_progress.py /work/runs/mamba4rec-paper [--epochs 300 --patience 10]

Prints the epochs done, the best valid NDCG@10 (and its HR@10, epoch), the epochs since it,
the training speed, and the hours left at the median epoch's wall time: to the epoch cap at
most, and to an early stop if no epoch improves from now on (the soonest the run can end).
The wall times include the pauses /tmp/heavy makes while others measure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.curve import read_csv  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=300, help="the run's epoch cap")
    parser.add_argument("--patience", type=int, default=10, help="the run's patience")
    args = parser.parse_args()
    path = Path(args.run_dir) / "curve.csv"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: no epoch of that run has finished yet")
    rows = read_csv(path)
    if not rows:
        raise SystemExit(f"{path} has no epoch yet")
    ndcg = [float(r["valid_ndcg@10"]) for r in rows]
    best = max(range(len(rows)), key=lambda i: (ndcg[i], i))     # a tie counts as better
    seconds = statistics.median(float(r["seconds"]) for r in rows)
    speed = statistics.median(float(r["positions_per_s"]) for r in rows)
    done, since = len(rows), len(rows) - 1 - best
    to_cap = (args.epochs - done) * seconds / 3600
    to_stop = max(0, args.patience + 1 - since) * seconds / 3600
    print(f"{path}: {done} epochs done; best valid NDCG@10 {ndcg[best]:.4f} / HR@10 "
          f"{float(rows[best]['valid_hr@10']):.4f} at epoch {rows[best]['epoch']} "
          f"({since} epochs since); last train loss {float(rows[-1]['train_loss']):.4f}")
    print(f"median epoch {seconds:.0f} s, {speed:.0f} training positions/s; hours left: "
          f"{to_cap:.1f} to epoch {args.epochs}, {to_stop:.1f} to the soonest early stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
