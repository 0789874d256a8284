"""The main job (`mlsa4rec demo`, `make run`): the whole system on one machine.

1. Train the model offline on the log before a cut-off (warm start) to a fixed recipe (an
   epoch cap and early stopping, no wall-clock budget: the same model on any machine), unless
   a checkpoint of the same data, model, recipe and code is cached already.
2. Start the local Kafka broker, a scorer worker and the online trainer.
3. Replay the log from the cut-off into `interactions`; print the live prequential metrics
   while the worker answers.
4. Write the report (runs/demo/report/index.html) with the offline numbers of the same
   starting model beside the stream's, then stop everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streams.shared.local_broker import REPO, free_ports


@dataclass
class DemoConfig:
    dataset: str = "ml-100k"  # ml-100k or ml-1m (fetched and sha256-checked on first use)
    model: str = "mlsa4rec-s"  # mlsa4rec-s, mlsa4rec, mamba4rec or sasrec
    cutoff: float = 0.8               # replay the last 20% of the log's events
    replay_seconds: float = 120.0     # ... time-scaled to last about this long (0 = flat out)
    # ... and at most this many clicks/s: time-scaled, the log has bursts of 1,800 clicks in a
    # second, which would measure the queue in front of the worker instead of its latency
    replay_max_rate: float = 400.0
    warm_epochs: int = 40             # offline warm start: most epochs (first run; cached)
    warm_patience: int = 2            # ... stop after this many epochs without a better valid NDCG@10
    warm_lr: float = 2e-3             # ... Adam learning rate
    # ... with this share of the titles clicked before and after the cut-off left out of it, so
    # that the replay has titles only fine-tuning can bring in (an item cold start, judged as
    # "new titles": what online fine-tuning is for; RESULTS 11, 4d); 0 = none
    new_titles: float = 0.15
    fine_tune: bool = True            # run the online trainer
    # the online trainer's round interval when the replay is not paced (--clicks-per-round 0)
    round_every_s: float = 20.0
    # With the trainer on, the replay sends each further this many clicks only once the trainer
    # has finished a round per as many clicks before them (it stays at most one round behind):
    # time-scaled 36,000x, the log would pass in 2-3 rounds, too few for fine-tuning to bring
    # new titles in (RESULTS 11e); a real trainer runs a round per minutes, not per days of
    # log. Paced, the trainer's rounds come per this many clicks only, not also on a timer
    # (rounds on few clicks: +0.0021 HR@10 against -0.0014 to +0.0015 with them, RESULTS 11e).
    # 0 = never wait (the log's time scale only)
    clicks_per_round: int = 2000
    out: str = "runs/demo"  # where the demo writes its models, states and report
    threads: int = 1                  # torch threads per process (worker, trainer)
    batch_max: int = 256  # the worker's largest batch
    trainer_nice: int = 19            # the trainer's niceness: the worker first (RESULTS 4d)


# model/ files that only serve or fine-tune a trained model: they do not change a warm start.
NOT_TRAINING_CODE = {"finetune.py", "item_index.py", "prequential.py", "ranking.py", "state.py",
                     "traced.py"}


def warm_start_key(recipe) -> str:
    """The warm start's cache key: its recipe (data, model, cut-off, epochs, seed...) and the
    code that trains the model (model/ but NOT_TRAINING_CODE), so a change of either trains
    anew."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(recipe), sort_keys=True).encode())
    for source in sorted((REPO / "model").rglob("*.py")):
        if source.parent.name == "model" and source.name in NOT_TRAINING_CODE:
            continue
        digest.update(source.relative_to(REPO).as_posix().encode() + source.read_bytes())
    return digest.hexdigest()[:12]


def warm_start_line(checkpoint: Path) -> str:
    """The warm start's figures, from the run description saved beside its checkpoint."""
    run = json.loads(checkpoint.with_suffix(".json").read_text())
    return (f"warm start: best epoch {run['best_epoch']} of {run['epochs_run']}, valid HR@10 "
            f"{run['valid']['hr@10']:.4f} NDCG@10 {run['valid']['ndcg@10']:.4f}, test HR@10 "
            f"{run['test']['hr@10']:.4f} NDCG@10 {run['test']['ndcg@10']:.4f} "
            f"({run['seconds']:.0f} s to train; the figures do not depend on the machine)")


NEW_TITLES, NEW_USERS, THE_REST = "new titles", "new users", "the rest"


def groups(known_items: set[str], known_users: set[str]):
    """(user, next item) -> the group its judgment counts in: items the starting model never
    saw (new titles: only fine-tuning can recommend them), users with no click before the
    cut-off, the rest. Fine-tuning's claim is the first group."""
    def group_of(user: str, item: str) -> str:
        if item not in known_items:
            return NEW_TITLES
        return NEW_USERS if user not in known_users else THE_REST
    return group_of


def offline_prequential(model, payload: dict, events, group_of):
    """What the stream gives without fine-tuning: the starting model (and its checkpoint's
    payload) over the same events, overall and by group, and each user's ranks (ranks[user][t]:
    of its click t + 1 after its first t + 1; 0 = not in the top 10) to pair the stream's
    judgments with. (None, None) for a window model."""
    from model.prequential import metrics_at, next_item_ranks

    if not model.steppable:
        return None, None        # a window model's offline ranks are not computed here
    index = {raw: i for i, raw in enumerate(payload["item_ids"])}
    sequences: dict[str, list[str]] = {}
    for user, item in zip(events.users, events.items):
        sequences.setdefault(str(user), []).append(str(item))
    ranks = next_item_ranks(model, [np.array([index.get(i, -1) for i in s])
                                    for s in sequences.values()])
    for user_ranks in ranks:
        user_ranks[user_ranks > 10] = 0         # the stream answers with a top 10
    judged_groups = np.array([group_of(user, item) for user, items in sequences.items()
                              for item in items[1:]])
    flat = np.concatenate(ranks)
    return {**metrics_at(flat, (5, 10)), "by_group": {
        g: {"judged": int((judged_groups == g).sum()), **metrics_at(flat[judged_groups == g],
                                                                     (5, 10))}
        for g in (NEW_TITLES, NEW_USERS, THE_REST) if (judged_groups == g).any()}}, \
        dict(zip(sequences, ranks))


def stream_minus_offline(judged, offline_ranks: dict) -> dict:
    """{"all" and each group: {"hr@10" and "ndcg@10": [mean, standard error]}} of the stream's
    figure minus the starting model's, paired on the same clicks (the stream's judgment of a
    user's click n + 1 against the offline rank of it), errors clustered by user."""
    from model.prequential import clustered_mean_se, gains_at

    stream = gains_at([j.rank for j in judged], 10)
    offline = gains_at([offline_ranks[j.user][j.n - 1] for j in judged], 10)
    users, groups_ = np.array([j.user for j in judged]), np.array([j.group for j in judged])
    out = {}
    for group in ["all", *dict.fromkeys(g for g in groups_ if g)]:
        mask = np.ones(len(judged), bool) if group == "all" else groups_ == group
        out[group] = {m: list(clustered_mean_se(stream[m][mask] - offline[m][mask],
                                                users[mask]))
                      for m in ("hr@10", "ndcg@10")}
    return out


def run_demo(cfg: DemoConfig) -> dict:
    import torch

    from model.checkpoint import load_checkpoint
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
    recipe = TrainConfig(dataset=cfg.dataset, model=cfg.model, before=str(cutoff),
                         epochs=cfg.warm_epochs, patience=cfg.warm_patience, lr=cfg.warm_lr,
                         hold_out_titles=cfg.new_titles, progress=False)
    checkpoint = out / f"warm-{cfg.dataset}-{cfg.model}-{warm_start_key(recipe)}.pt"
    if not checkpoint.exists():
        print(f"== 1. offline warm start: {cfg.model} on {cfg.dataset} before the cut-off, "
              f"up to {cfg.warm_epochs} epochs, stopping after {cfg.warm_patience} without "
              "a better valid NDCG@10 (cached for the next run)", flush=True)
        # Every core: nothing else runs yet. The thread count is not part of the recipe.
        train_to_checkpoint(dataclasses.replace(recipe, checkpoint=str(checkpoint)))
    else:
        print(f"== 1. offline warm start: reusing {checkpoint}", flush=True)
    print(f"   {warm_start_line(checkpoint)}", flush=True)
    replayed = log_events(cfg.dataset, start=str(cutoff))
    print(f"== offline reference: the starting model over the {len(replayed.rows)} events "
          "after the cut-off, no fine-tuning", flush=True)
    before = events.timestamps < cutoff
    start_model, payload = load_checkpoint(checkpoint)
    group_of = groups(set(payload["item_ids"][1:]),          # [0] is the padding item
                      {str(u) for u in events.users[before]})
    offline, offline_ranks = offline_prequential(start_model, payload, replayed, group_of)

    run_id = uuid.uuid4().hex[:8]
    env = dict(os.environ, PYTHONPATH=str(REPO), MLSA4REC_THREADS=str(cfg.threads))
    processes = []
    with local_kafka(log=lambda line: print(line, flush=True)) as broker:
        # Up front, so that the evaluator's subscription finds both topics at once.
        ensure_topics(broker, {"interactions": 4, "recommendations": 4, "interactions-dlq": 4})
        print(f"== 2. broker {broker}; starting the scorer"
              + (" and the trainer" if cfg.fine_tune else ""), flush=True)
        common = ["--broker", broker, "--model-store", str(out / f"models-{run_id}")]
        port, trainer_port = free_ports(2)
        worker = _start(["worker", *common, "--checkpoint", str(checkpoint),
                         "--data-dir", str(out / f"worker-{run_id}"), "--metrics-port", str(port),
                         "--batch-max", str(cfg.batch_max), "--log-level", "warning"],
                        out / "worker.log", env)
        processes.append(worker)
        if cfg.fine_tune:
            # The trainer's rounds are minutes of full-core work on a small machine; niced, they
            # take what the worker leaves, and recommendations keep their latency.
            rounds = (["--round-every-events", str(cfg.clicks_per_round), "--round-every-s",
                       "inf"] if cfg.clicks_per_round else ["--round-every-s",
                                                            str(cfg.round_every_s)])
            processes.append(_start(["trainer", *common, "--checkpoint", str(checkpoint),
                                     "--buffer-dir", str(out / f"buffer-{run_id}"), *rounds,
                                     "--metrics-port", str(trainer_port)],
                                    out / "trainer.log", env, nice=cfg.trainer_nice))
        pace = RoundPacing(processes[-1], trainer_port, cfg.clicks_per_round) \
            if cfg.fine_tune and cfg.clicks_per_round else None
        try:
            # The clicks' latency is the worker's, not its start-up's: replay once it is ready.
            print(f"   the scorer is ready after {_wait_ready(worker, port):.1f} s "
                  f"(http://127.0.0.1:{port}/health)", flush=True)
            print(f"== 3. replaying {len(replayed.rows)} events of {cfg.dataset} from the cut-off",
                  flush=True)
            span = float(replayed.timestamps[-1] - replayed.timestamps[0])
            speed = span / cfg.replay_seconds if cfg.replay_seconds else 0.0
            sender = threading.Thread(target=replay, args=(cfg.dataset, ReplayConfig(
                broker=broker, start=str(cutoff), progress=False, speed=speed,
                max_rate=cfg.replay_max_rate,
                progress_file=str(out / f"replay-{run_id}.json")), pace))
            sender.start()
            result = run_evaluate_stream(
                broker, "interactions", "recommendations", out / "report",
                idle_timeout_s=120 + (pace.timeout_s if pace else 0),
                expect_recommendations=len(replayed.rows), group_of=group_of,
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
    if offline:
        offline["stream_minus_offline"] = stream_minus_offline(result["judged"], offline_ranks)
    page = write_report(result, out / "report", offline=offline,
                        offline_label="offline: starting model, no fine-tuning",
                        title=f"{cfg.model} on {cfg.dataset}: replay of the last "
                              f"{1 - cfg.cutoff:.0%} of the log"
                              + (", fine-tuning on" if cfg.fine_tune else ""))
    summary = result["summary"]
    print("== 4. final numbers")
    print(f"   stream : HR@10 {summary['metrics']['hr@10']:.4f}  NDCG@10 "
          f"{summary['metrics']['ndcg@10']:.4f}  ({summary['judged']} judged)")
    paired = (offline or {}).get("stream_minus_offline", {})

    def gain(group: str) -> str:
        if group not in paired:
            return ""
        (hr, hr_se), (ndcg, ndcg_se) = paired[group]["hr@10"], paired[group]["ndcg@10"]
        return f"; stream - offline HR@10 {hr:+.4f} (SE {hr_se:.4f}), NDCG@10 {ndcg:+.4f} " \
               f"(SE {ndcg_se:.4f})"

    if offline:
        print(f"   offline: HR@10 {offline['hr@10']:.4f}  NDCG@10 {offline['ndcg@10']:.4f}  "
              "(starting model, no fine-tuning)" + gain("all"))
    else:
        print(f"   offline: not computed for {cfg.model}, a window model")
    for group, stats in summary["by_group"].items():
        frozen = (offline or {}).get("by_group", {}).get(group)
        print(f"   {group:>10}: {stats['judged']:6d} judged, stream HR@10 {stats['hr@10']:.4f}"
              + (f", offline {frozen['hr@10']:.4f}" if frozen else "") + gain(group))
    if paired:
        print("   (differences paired on the same clicks; standard errors clustered by user)")
    print(f"   latency ms: {json.dumps({k: round(v) for k, v in summary['latency_ms'].items()})}, "
          f"{summary['throughput_per_s']:.0f} recommendations/s, "
          f"{len(summary['by_version'])} model versions served")
    if pace:
        print(f"   the replay waited {pace.waited_s:.0f} s in all for the trainer's rounds "
              f"(one per {cfg.clicks_per_round} clicks)")
    print("   depends on the machine: latency, throughput" + (
        "; from run to run: the stream's HR/NDCG once a fine-tuned version serves (which "
        "rounds the gate refuses; over all clicks -0.0014 to +0.0021 in six runs, RESULTS 11e)"
        if pace else ", and the stream's HR/NDCG once a fine-tuned version serves (which "
        "versions serve when)") + "; not: the warm start's and the offline figures, and the "
        "stream's while the starting model serves (equal to the offline ones)")
    print(f"   report: {page}")
    return {"summary": summary, "offline": offline, "report": str(page)}


class RoundPacing:
    """The replay's before_send: before each further `every` clicks, wait until the trainer
    (its /metrics on `port`) has finished one round per `every` clicks sent before the last
    `every`, so it runs at most a round behind the stream. A trainer that has exited, or one
    round that takes longer than timeout_s, no longer holds the replay up."""

    def __init__(self, process: subprocess.Popen, port: int, every: int,
                 timeout_s: float = 240.0):
        self.process, self.port, self.every, self.timeout_s = process, port, every, timeout_s
        self.waited_s = 0.0

    def __call__(self, sent: int) -> float:
        needed, started = sent // self.every - 1, time.monotonic()
        if needed <= 0 or sent % self.every:
            return 0.0
        while self.process.poll() is None and time.monotonic() - started < self.timeout_s:
            if self.rounds_done() >= needed:
                break
            time.sleep(0.2)
        waited = time.monotonic() - started
        self.waited_s += waited
        return waited

    def rounds_done(self) -> int:
        """Rounds the trainer has finished, published or refused (0 while it starts)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return 0
        return int(sum(sample.value for family in text_string_to_metric_families(text)
                       for sample in family.samples
                       if sample.name == "mlsa4rec_trainer_rounds_total"))


def _wait_ready(process: subprocess.Popen, port: int, timeout_s: float = 300.0) -> float:
    """Seconds until the worker's /health says ok (its table restored, its agent running)."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if json.loads(reply.read())["status"] == "ok":
                    return time.monotonic() - started
        except OSError:
            pass                        # not listening yet, or 503 while it starts
        if process.poll() is not None:
            raise RuntimeError(f"the scorer exited with {process.returncode} before it was ready")
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"the scorer was not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


def _start(args: list[str], log: Path, env: dict, nice: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)
