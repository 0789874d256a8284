"""A training run's learning curve: DIR/curve.csv (one row per epoch) and DIR/curve.png.

The CSV is appended after each epoch; a resumed run first rewrites it from the epochs its
state holds, so a stop between the state and the CSV row leaves neither a gap nor a repeat.
The plot uses matplotlib (already a dependency, for the replay report) with its file-only
backend.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

COLUMNS = ("epoch", "train_loss", "valid_hr@10", "valid_ndcg@10", "lr", "seconds",
           "positions_per_s")


def curve_row(entry: dict) -> list:
    """One epoch of TrainResult.history as a CSV row (seconds: training and validation of
    that epoch; positions_per_s: training targets, positions with a loss, per training
    second)."""
    return [entry["epoch"], f"{entry['loss']:.6f}", f"{entry['hr@10']:.6f}",
            f"{entry['ndcg@10']:.6f}", f"{entry['lr']:.3g}", f"{entry['seconds']:.1f}",
            f"{entry['positions_per_s']:.1f}"]


def rewrite_csv(path: str | os.PathLike, history: list[dict]) -> None:
    path = Path(path)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(curve_row(entry) for entry in history)
    os.replace(tmp, path)


def append_csv(path: str | os.PathLike, entry: dict) -> None:
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        writer.writerow(curve_row(entry))


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curve(path: str | os.PathLike, history: list[dict], title: str = "") -> None:
    """Training loss (left axis) and valid HR@10 / NDCG@10 (right panel), best epoch marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["loss"] for h in history], color="tab:gray", marker=".")
    left.set_xlabel("epoch")
    left.set_ylabel("train loss (CE per target)")
    right.plot(epochs, [h["hr@10"] for h in history], marker=".", label="valid HR@10")
    right.plot(epochs, [h["ndcg@10"] for h in history], marker=".", label="valid NDCG@10")
    if history:
        best = max(history, key=lambda h: (h["ndcg@10"], h["epoch"]))   # ties: the later
        right.axvline(best["epoch"], color="tab:green", linestyle=":",
                      label=f"best NDCG@10 {best['ndcg@10']:.4f} (epoch {best['epoch']})")
    right.set_xlabel("epoch")
    right.legend(loc="lower right", fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, path)
