"""The main job (`mlsa4rec demo`, `make run`): the whole system on one machine.

1. Train the model offline on the log before a cut-off (warm start), unless that checkpoint
   exists already.
2. Start the local Kafka broker, a scorer worker and the online trainer.
3. Replay the log from the cut-off into `interactions`; print the live prequential metrics
   while the worker answers.
4. Write the report (runs/demo/report/index.html) with the offline numbers of the same
   starting model beside the stream's, then stop everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streams.shared.local_broker import REPO


@dataclass
class DemoConfig:
    dataset: str = "ml-100k"  # ml-100k or ml-1m (fetched and sha256-checked on first use)
    model: str = "mlsa4rec-s"  # mlsa4rec-s, mlsa4rec, mamba4rec or sasrec
    cutoff: float = 0.8               # replay the last 20% of the log's events
    replay_seconds: float = 120.0     # ... time-scaled to last about this long (0 = flat out)
    train_minutes: float = 3.0        # offline warm start budget (first run only)
    fine_tune: bool = True            # run the online trainer
    round_every_s: float = 20.0  # the online trainer's round interval
    out: str = "runs/demo"  # where the demo writes its models, states and report
    threads: int = 1                  # torch threads per process (worker, trainer)
    batch_max: int = 64  # the worker's largest batch
    trainer_nice: int = 10            # the trainer's niceness: the worker comes first


def offline_prequential(checkpoint: Path, events) -> dict | None:
    """What the stream gives without fine-tuning: the starting model over the same events
    (steppable models; None for a window model)."""
    from model.checkpoint import load_checkpoint
    from model.prequential import metrics_at, next_item_ranks

    model, payload = load_checkpoint(checkpoint)
    if not model.steppable:
        return None              # a window model's offline ranks are not computed here
    index = {raw: i for i, raw in enumerate(payload["item_ids"])}
    sequences: dict[str, list[int]] = {}
    for user, item in zip(events.users, events.items):
        sequences.setdefault(str(user), []).append(index.get(str(item), -1))
    ranks = np.concatenate(next_item_ranks(model, [np.array(s) for s in sequences.values()]))
    ranks[ranks > 10] = 0                       # the stream answers with a top 10
    return metrics_at(ranks, (5, 10))


def run_demo(cfg: DemoConfig) -> dict:
    import torch

    from model.training import TrainConfig, train_to_checkpoint
    from streams.replay.evaluation import run_evaluate_stream
    from streams.shared.local_broker import local_kafka
    from streams.replay.log_replay import ReplayConfig, log_events, replay
    from streams.replay.report import write_report
    from streams.shared.topics import ensure_topics

    torch.set_num_threads(max(1, cfg.threads))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    events = log_events(cfg.dataset)
    cutoff = float(events.timestamps[int(cfg.cutoff * (len(events.rows) - 1))])
    checkpoint = out / f"{cfg.dataset}-{cfg.model}-before-{int(cutoff)}.pt"
    if not checkpoint.exists():
        print(f"== 1. offline warm start: {cfg.model} on {cfg.dataset} before the cut-off "
              f"({cfg.train_minutes:g} min budget)", flush=True)
        train_to_checkpoint(TrainConfig(dataset=cfg.dataset, model=cfg.model, before=str(cutoff),
                                        time_budget_min=cfg.train_minutes, threads=cfg.threads,
                                        checkpoint=str(checkpoint), progress=False))
    else:
        print(f"== 1. offline warm start: reusing {checkpoint}", flush=True)
    replayed = log_events(cfg.dataset, start=str(cutoff))
    print(f"== offline reference: the starting model over the {len(replayed.rows)} events "
          "after the cut-off, no fine-tuning", flush=True)
    offline = offline_prequential(checkpoint, replayed)

    run_id = uuid.uuid4().hex[:8]
    env = dict(os.environ, PYTHONPATH=str(REPO), MLSA4REC_THREADS=str(cfg.threads))
    processes = []
    with local_kafka(log=lambda line: print(line, flush=True)) as broker:
        # Up front, so that the evaluator's subscription finds both topics at once.
        ensure_topics(broker, {"interactions": 4, "recommendations": 4, "interactions-dlq": 4})
        print(f"== 2. broker {broker}; starting the scorer"
              + (" and the trainer" if cfg.fine_tune else ""), flush=True)
        common = ["--broker", broker, "--model-store", str(out / f"models-{run_id}")]
        processes.append(_start(["worker", *common, "--checkpoint", str(checkpoint),
                                 "--data-dir", str(out / f"worker-{run_id}"),
                                 "--batch-max", str(cfg.batch_max), "--log-level", "warning"],
                                out / "worker.log", env))
        if cfg.fine_tune:
            # The trainer's rounds are minutes of full-core work on a small machine; niced, they
            # take what the worker leaves, and recommendations keep their latency.
            processes.append(_start(["trainer", *common, "--checkpoint", str(checkpoint),
                                     "--buffer-dir", str(out / f"buffer-{run_id}"),
                                     "--round-every-s", str(cfg.round_every_s)],
                                    out / "trainer.log", env, nice=cfg.trainer_nice))
        try:
            print(f"== 3. replaying {len(replayed.rows)} events of {cfg.dataset} from the cut-off",
                  flush=True)
            span = float(replayed.timestamps[-1] - replayed.timestamps[0])
            speed = span / cfg.replay_seconds if cfg.replay_seconds else 0.0
            sender = threading.Thread(target=replay, args=(cfg.dataset, ReplayConfig(
                broker=broker, start=str(cutoff), progress=False, speed=speed,
                progress_file=str(out / f"replay-{run_id}.json"))))
            sender.start()
            result = run_evaluate_stream(
                broker, "interactions", "recommendations", out / "report",
                idle_timeout_s=120, expect_recommendations=len(replayed.rows),
                log=lambda line: print("   live:", line, flush=True))
            sender.join()
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    page = write_report(result, out / "report", offline=offline,
                        offline_label="offline: starting model, no fine-tuning",
                        title=f"{cfg.model} on {cfg.dataset}: replay of the last "
                              f"{1 - cfg.cutoff:.0%} of the log"
                              + (", fine-tuning on" if cfg.fine_tune else ""))
    summary = result["summary"]
    print("== 4. final numbers")
    print(f"   stream : HR@10 {summary['metrics']['hr@10']:.4f}  NDCG@10 "
          f"{summary['metrics']['ndcg@10']:.4f}  ({summary['judged']} judged)")
    if offline:
        print(f"   offline: HR@10 {offline['hr@10']:.4f}  NDCG@10 {offline['ndcg@10']:.4f}  "
              "(starting model, no fine-tuning)")
    else:
        print(f"   offline: not computed for {cfg.model}, a window model")
    print(f"   latency ms: {json.dumps({k: round(v) for k, v in summary['latency_ms'].items()})}, "
          f"{summary['throughput_per_s']:.0f} recommendations/s, "
          f"{len(summary['by_version'])} model versions served")
    print(f"   report: {page}")
    return {"summary": summary, "offline": offline, "report": str(page)}


def _start(args: list[str], log: Path, env: dict, nice: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)
