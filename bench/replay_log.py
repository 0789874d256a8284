"""Replay a whole log through the live system and judge it (issue: replay evaluation).

Starts the local broker, one scorer worker on --checkpoint and, with --fine-tune, the online
trainer; replays the log flat out (with --k-core 5: exactly the offline protocol's events);
`evaluate-stream` judges every recommendation by the user's next click. Prints the wall time
of the replay, the prequential figures, and each user's last judged recommendation (made at
the second-to-last click, judged by the last: leave-one-out's test case) next to the offline
test metrics of the same checkpoint ranked with the whole history (what the stream sees).

    .venv/bin/python bench/replay_log.py --dataset ml-1m --checkpoint runs/ml-1m-mlsa4rec-s.pt \
        [--fine-tune] [--k-core 5] [--out runs/replay-ml-1m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streams.replay.evaluation import run_evaluate_stream  # noqa: E402
from streams.shared.local_broker import local_kafka  # noqa: E402
from streams.replay.log_replay import ReplayConfig, log_events, replay  # noqa: E402
from streams.replay.report import write_report  # noqa: E402
from streams.shared.topics import ensure_topics  # noqa: E402


def offline_test_metrics(checkpoint: str, dataset: str) -> dict:
    from model.checkpoint import checkpoint_data, load_checkpoint
    from model.data.protocol import split_leave_one_out
    from model.training import evaluate

    model, payload = load_checkpoint(checkpoint)
    data = checkpoint_data(payload, dataset)
    _, _, test = split_leave_one_out(data)
    return evaluate(model, test, 0, "cpu")          # whole history


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--checkpoint", default="runs/ml-1m-mlsa4rec-s.pt")
    parser.add_argument("--k-core", type=int, default=5)
    parser.add_argument("--fine-tune", action="store_true")
    parser.add_argument("--batch-max", type=int, default=256)
    parser.add_argument("--out", default="")
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args()
    label = "on" if args.fine_tune else "off"
    out = Path(args.out or f"runs/replay-{args.dataset}-finetune-{label}")
    out.mkdir(parents=True, exist_ok=True)
    events = log_events(args.dataset, args.k_core)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    processes = []
    with local_kafka() as broker:
        ensure_topics(broker, {"interactions": 4, "recommendations": 4, "interactions-dlq": 4})
        common = ["--broker", broker, "--model-store", str(out / "models")]
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "cli", "worker", *common, "--checkpoint", args.checkpoint,
             "--data-dir", str(out / f"worker-{int(time.time())}"), "--batch-max",
             str(args.batch_max), "--log-level", "warning", "--metrics-port", "0"],
            cwd=REPO, env=env, stdout=open(out / "worker.log", "wb"), stderr=subprocess.STDOUT))
        if args.fine_tune:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "cli", "trainer", *common, "--checkpoint", args.checkpoint,
                 "--buffer-dir", str(out / f"buffer-{int(time.time())}"), "--threads", "1",
                 "--metrics-port", "0"],
                cwd=REPO, env=env, stdout=open(out / "trainer.log", "wb"),
                stderr=subprocess.STDOUT))
        started = time.time()
        sender = threading.Thread(target=replay, args=(args.dataset, ReplayConfig(
            broker=broker, k_core=args.k_core, progress=False,
            progress_file=str(out / f"replay-{int(started)}.json"))))
        sender.start()
        try:
            result = run_evaluate_stream(broker, "interactions", "recommendations", out,
                                         idle_timeout_s=300, expect_recommendations=len(events.rows),
                                         print_every_s=60,
                                         log=lambda line: print(f"[{time.time() - started:5.0f}s] {line}",
                                                                flush=True))
            seconds = time.time() - started
            sender.join()
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(60)
    summary = result["summary"]
    if summary["recommendations"] != len(events.rows):
        sys.exit(f"only {summary['recommendations']} of {len(events.rows)} clicks were answered: "
                 f"see {out / 'worker.log'}")
    offline = None if args.skip_offline else offline_test_metrics(args.checkpoint, args.dataset)
    write_report(result, out, title=f"{args.dataset} replay, fine-tuning {label}",
                 offline=offline, offline_label="offline leave-one-out test (whole history)")
    print(json.dumps({"events": len(events.rows), "replay_and_scoring_seconds": round(seconds),
                      "summary": summary, "offline_test_whole_history": offline}, indent=1))
    last = summary["last_per_user"]
    print(f"\n| fine-tuning {label} | events | wall s | prequential HR@10 | NDCG@10 | "
          f"last click per user HR@10 | NDCG@10 | offline test HR@10 | NDCG@10 |")
    print(f"| | {len(events.rows)} | {seconds:.0f} | {summary['metrics']['hr@10']:.4f} | "
          f"{summary['metrics']['ndcg@10']:.4f} | {last['hr@10']:.4f} | {last['ndcg@10']:.4f} | "
          + (f"{offline['hr@10']:.4f} | {offline['ndcg@10']:.4f} |" if offline else "- | - |"))


if __name__ == "__main__":
    main()
