"""The replay report: one self-contained HTML page (PNG figures inlined) plus the PNG files.

Input: the `evaluation.json` that `evaluate-stream` writes, and optionally the offline
numbers of the same model (from `mlsa4rec evaluate`) to print next to the stream's.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")                       # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

FIGURE = {"figsize": (9, 3.2), "dpi": 110}


def _clock(seconds: list[float], origin: float) -> list[float]:
    return [s - origin for s in seconds]


def _mark_versions(ax, versions: dict[str, float], origin: float) -> None:
    for n, (version, at) in enumerate(sorted(versions.items(), key=lambda kv: kv[1])):
        ax.axvline(at - origin, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"v{n + 1}", (at - origin, 1), xycoords=("data", "axes fraction"),
                    fontsize=7, color="grey", ha="left", va="top")


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def figures(series: dict, out: Path) -> dict[str, Path]:
    """Writes metrics.png, latency.png, throughput.png; returns name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    starts = series["throughput"]["t"][:1] + series["rolling"]["t"][:1]
    origin = min(starts) if starts else 0.0
    paths = {}

    fig, ax = plt.subplots(**FIGURE)
    rolling = series["rolling"]
    ax.plot(_clock(rolling["t"], origin), rolling["hr@10"], label="HR@10")
    ax.plot(_clock(rolling["t"], origin), rolling["ndcg@10"], label="NDCG@10")
    _mark_versions(ax, series["versions"], origin)
    ax.set(xlabel="seconds since the first recommendation", ylabel="rolling value",
           title="Prequential accuracy (rolling window of judged recommendations)")
    ax.legend(loc="lower right")
    paths["metrics"] = _save(fig, ax, out / "metrics.png")

    fig, ax = plt.subplots(**FIGURE)
    latencies = series["latencies_ms"]
    if latencies:
        ax.hist(latencies, bins=60, color="tab:purple")
        for q, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(latencies, q))
            ax.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.0f} ms")
        ax.legend()
    ax.set(xlabel="click sent -> recommendation produced (ms)", ylabel="recommendations",
           title="End-to-end latency")
    paths["latency"] = _save(fig, ax, out / "latency.png")

    fig, ax = plt.subplots(**FIGURE)
    ax.plot(_clock(series["throughput"]["t"], origin), series["throughput"]["per_s"],
            color="tab:green")
    _mark_versions(ax, series["versions"], origin)
    ax.set(xlabel="seconds since the first recommendation", ylabel="recommendations / s",
           title="Throughput")
    paths["throughput"] = _save(fig, ax, out / "throughput.png")
    return paths


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(evaluation: dict, out_dir: str | Path, title: str = "Replay report",
                 offline: dict | None = None, offline_label: str = "offline, same model") -> Path:
    """index.html + the PNGs in out_dir; returns the HTML path."""
    out = Path(out_dir)
    summary, series = evaluation["summary"], evaluation["series"]
    paths = figures(series, out)
    metric_names = ["hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr@10"]
    rows = [["stream (prequential)"] + [f"{summary['metrics'][m]:.4f}" for m in metric_names]]
    if offline:
        rows.append([offline_label] + [f"{offline[m]:.4f}" if m in offline else "-"
                                               for m in metric_names])
    versions = sorted(series["versions"].items(), key=lambda kv: kv[1])
    version_rows = [[f"v{n + 1}", v,
                     datetime.fromtimestamp(at, timezone.utc).strftime("%H:%M:%S"),
                     summary["by_version"].get(v, {}).get("judged", 0),
                     f"{summary['by_version'].get(v, {}).get('hr@10', 0):.4f}"]
                    for n, (v, at) in enumerate(versions)]
    # stream minus offline on the same clicks, (mean, SE) per group, when the caller paired them
    paired = (offline or {}).get("stream_minus_offline", {})

    def difference(group: str, metric: str) -> str:
        if group not in paired:
            return "-"
        mean, se = paired[group][metric]
        return f"{mean:+.4f} ({se:.4f})"

    group_rows = [[g, stats["judged"], f"{stats['hr@10']:.4f}", f"{stats['ndcg@10']:.4f}"]
                  + ([f"{offline['by_group'][g]['hr@10']:.4f}",
                      f"{offline['by_group'][g]['ndcg@10']:.4f}"]
                     if offline and g in offline.get("by_group", {}) else ["-", "-"])
                  + ([difference(g, "hr@10"), difference(g, "ndcg@10")] if paired else [])
                  for g, stats in summary.get("by_group", {}).items()]
    if paired and group_rows:
        group_rows.append(["all", summary["judged"], f"{summary['metrics']['hr@10']:.4f}",
                           f"{summary['metrics']['ndcg@10']:.4f}", f"{offline['hr@10']:.4f}",
                           f"{offline['ndcg@10']:.4f}", difference("all", "hr@10"),
                           difference("all", "ndcg@10")])
    group_header = ["judged by", "judged", "stream HR@10", "stream NDCG@10",
                    f"{offline_label}: HR@10", "NDCG@10"] + (
        ["stream - offline HR@10 (SE)", "NDCG@10 (SE)"] if paired else [])
    groups = f"<h2>By group</h2>\n{_table(group_rows, group_header)}" if group_rows else ""
    if paired and group_rows:
        groups += ("<p>Differences are paired: the stream's judgment of each click against the "
                   "offline model's of the same click; standard errors clustered by user.</p>")
    latency = summary.get("latency_ms", {})
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"></figure>'
        for name, path in paths.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p id="counts">{summary['interactions']} clicks, {summary['recommendations']} recommendations,
{summary['judged']} judged by the user's next click; {summary['duplicates_ignored']} duplicates
ignored; throughput {summary['throughput_per_s']:.0f} recommendations/s.</p>
<h2>Final numbers</h2>
{_table(rows, ["", *[m.upper() for m in metric_names]])}
{groups}
<h2>Latency (ms)</h2>
<p>From the click's Kafka timestamp to the recommendation's <code>produced_at</code>. Latency and
throughput depend on the machine; the offline figures do not, nor do the stream's while the
starting model serves (they equal the offline ones).</p>
{_table([[k, f"{v:.0f}"] for k, v in latency.items()], ["percentile", "ms"])}
<h2>Model versions</h2>
{_table(version_rows, ["mark", "version", "first served (UTC)", "judged", "HR@10"])}
<h2>Over time</h2>
{images}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "offline": offline}, indent=2))
    return path
