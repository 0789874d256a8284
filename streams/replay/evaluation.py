"""Prequential evaluation of the live stream: each recommendation is judged by the user's
next event (test-then-train), as `mlsa4rec evaluate-stream` reads them off Kafka.

`StreamEvaluator` is the bookkeeping without Kafka: interactions and recommendations may come
in any interleaving (two topics, many partitions); a recommendation is judged once both it and
the user's next event are known. Duplicates (at-least-once output, a resent click) count once.
Latency = the recommendation's produced_at - the click's Kafka timestamp (when it was sent).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.prequential import metrics_at

CUTOFFS = (5, 10)


@dataclass
class Judged:
    produced_at: int          # ms
    rank: int                 # 1-based rank of the next item in the recommendation, 0 = miss
    version: str
    group: str = ""           # group_of(user, next item), when the evaluator has one
    user: str = ""
    n: int = 0                # the recommendation followed the user's n-th click (from 1)


@dataclass
class StreamEvaluator:
    judged: list[Judged] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    produced_at: list[int] = field(default_factory=list)
    interactions: int = 0
    recommendations: int = 0
    duplicates: int = 0
    _last_event_of: dict = field(default_factory=dict)     # user -> its latest event id
    _next_item: dict = field(default_factory=dict)         # event id -> the user's next item
    _recommended: dict = field(default_factory=dict)       # event id -> (items, version, at)
    _sent_at: dict = field(default_factory=dict)           # event id -> click sent (ms)
    _seen_events: set = field(default_factory=set)
    _seen_recs: set = field(default_factory=set)
    _versions_first_seen: dict = field(default_factory=dict)
    _user_of: dict = field(default_factory=dict)            # event id -> (user, its n-th click)
    _clicks_of: dict = field(default_factory=dict)          # user -> clicks so far
    last_judged_of: dict = field(default_factory=dict)      # user -> (n, Judged) of its latest
    # (user, next item) -> the group its judgment counts in too, e.g. "new titles"; None = none
    group_of: Callable[[str, str], str] | None = None

    def on_interaction(self, user: str, item: str, event_id: str, sent_ms: int) -> None:
        if event_id in self._seen_events:
            self.duplicates += 1
            return
        self._seen_events.add(event_id)
        self.interactions += 1
        previous = self._last_event_of.get(user)
        self._last_event_of[user] = event_id
        self._sent_at[event_id] = sent_ms
        self._clicks_of[user] = self._clicks_of.get(user, 0) + 1
        self._user_of[event_id] = (user, self._clicks_of[user])
        if previous is not None:
            self._next_item[previous] = item
            self._judge(previous)

    def on_recommendation(self, rec: dict) -> None:
        event_id = rec["event_id"]
        if event_id in self._seen_recs:
            self.duplicates += 1
            return
        self._seen_recs.add(event_id)
        self.recommendations += 1
        self._versions_first_seen.setdefault(rec["model_version"], rec["produced_at"])
        self.produced_at.append(rec["produced_at"])
        self._recommended[event_id] = ([i["item_id"] for i in rec["items"]],
                                       rec["model_version"], rec["produced_at"])
        self._judge(event_id)

    def _judge(self, event_id: str) -> None:
        if event_id not in self._recommended or event_id not in self._next_item:
            return
        items, version, produced_at = self._recommended.pop(event_id)
        target = self._next_item.pop(event_id)
        rank = items.index(target) + 1 if target in items else 0
        user, n = self._user_of.pop(event_id)
        judged = Judged(produced_at, rank, version,
                        self.group_of(user, target) if self.group_of else "", user, n)
        self.judged.append(judged)
        if n > self.last_judged_of.get(user, (0, None))[0]:     # judgments may finish out of order
            self.last_judged_of[user] = (n, judged)
        sent = self._sent_at.pop(event_id, None)
        if sent is not None:
            self.latencies_ms.append(produced_at - sent)

    def flush_latencies(self) -> None:
        """Latency of recommendations that no next event judged (a user's last click)."""
        for event_id, (_, _, produced_at) in self._recommended.items():
            sent = self._sent_at.pop(event_id, None)
            if sent is not None:
                self.latencies_ms.append(produced_at - sent)

    # -- figures -----------------------------------------------------------------------------
    def metrics(self, judged: list[Judged] | None = None) -> dict[str, float]:
        judged = self.judged if judged is None else judged
        return metrics_at(np.array([j.rank for j in judged]), CUTOFFS)

    def summary(self) -> dict:
        latencies = np.array(self.latencies_ms, dtype=np.float64)
        at = np.sort(np.array(self.produced_at, dtype=np.float64)) / 1000
        by_version: dict[str, list[Judged]] = {}
        by_group: dict[str, list[Judged]] = {}
        for j in self.judged:
            by_version.setdefault(j.version, []).append(j)
            if j.group:
                by_group.setdefault(j.group, []).append(j)
        return {
            "interactions": self.interactions, "recommendations": self.recommendations,
            "judged": len(self.judged), "duplicates_ignored": self.duplicates,
            "metrics": self.metrics(),
            # Each user's last judged recommendation: made after the second-to-last click and
            # judged by the last one, i.e. leave-one-out's test case when the whole log is replayed.
            "last_per_user": {"users": len(self.last_judged_of),
                              **self.metrics([j for _, j in self.last_judged_of.values()])},
            "by_version": {v: {"judged": len(js), **self.metrics(js)} for v, js in by_version.items()},
            "by_group": {g: {"judged": len(js), **self.metrics(js)} for g, js in by_group.items()},
            "latency_ms": {f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)}
            | {"max": float(latencies.max())} if len(latencies) else {},
            "throughput_per_s": float((len(at) - 1) / (at[-1] - at[0])) if len(at) > 1 and at[-1] > at[0] else 0.0,
        }

    def series(self, window: int = 500, points: int = 300) -> dict:
        """Time series for the report: rolling HR@10 / NDCG@10 over the last `window` judged
        recommendations, recommendations per second, and when each version first served."""
        judged = sorted(self.judged, key=lambda j: j.produced_at)
        rolling = {"t": [], "hr@10": [], "ndcg@10": []}
        if judged:
            ranks = np.array([j.rank for j in judged], dtype=np.float64)
            hit = (ranks >= 1) & (ranks <= 10)
            gain = np.where(hit, 1 / np.log2(np.where(hit, ranks, 1) + 1), 0.0)
            c_hit, c_gain = np.cumsum(np.r_[0, hit]), np.cumsum(np.r_[0, gain])
            for end in np.unique(np.linspace(1, len(judged), min(points, len(judged))).astype(int)):
                begin = max(0, end - window)
                rolling["t"].append(judged[end - 1].produced_at / 1000)
                rolling["hr@10"].append(float((c_hit[end] - c_hit[begin]) / (end - begin)))
                rolling["ndcg@10"].append(float((c_gain[end] - c_gain[begin]) / (end - begin)))
        at = np.array(self.produced_at, dtype=np.float64) / 1000
        per_second = {"t": [], "per_s": []}
        if len(at):
            seconds = np.floor(at - at.min()).astype(int)
            counts = np.bincount(seconds)
            per_second = {"t": (at.min() + np.arange(len(counts))).tolist(), "per_s": counts.tolist()}
        return {"rolling": rolling, "throughput": per_second,
                "latencies_ms": [float(x) for x in self.latencies_ms],
                "versions": {v: t / 1000 for v, t in self._versions_first_seen.items()}}


def format_live(evaluator: StreamEvaluator) -> str:
    m = evaluator.metrics()
    return (f"{evaluator.interactions} clicks, {evaluator.recommendations} recommendations, "
            f"{len(evaluator.judged)} judged: HR@10 {m['hr@10']:.4f} NDCG@10 {m['ndcg@10']:.4f}")


def run_evaluate_stream(broker: str, interactions_topic: str, recommendations_topic: str,
                        out_dir: str | Path, idle_timeout_s: float = 15.0,
                        expect_recommendations: int = 0, print_every_s: float = 5.0,
                        stop=None, log=print, group_of=None) -> dict:
    """Read both topics from the beginning until `expect_recommendations` arrived (if set) or
    nothing came for idle_timeout_s; writes evaluation.json into out_dir; returns it.
    group_of(user, next item) -> a group name: the summary's `by_group` too."""
    import uuid

    from confluent_kafka import Consumer

    from schemas.codec import DecodeError, decode_interaction, decode_recommendation
    from streams.shared.kafka_config import client_config

    consumer = Consumer({**client_config(broker), "group.id": f"evaluate-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([interactions_topic, recommendations_topic])
    evaluator = StreamEvaluator(group_of=group_of)
    last_message = last_print = time.monotonic()
    undecodable = 0
    try:
        while stop is None or not stop.is_set():
            batch = consumer.consume(1000, 0.5)
            now = time.monotonic()
            for msg in batch:
                if msg.error():
                    continue
                last_message = now
                try:
                    if msg.topic() == recommendations_topic:
                        evaluator.on_recommendation(decode_recommendation(msg.value()))
                    else:
                        event = decode_interaction(msg.value())
                        evaluator.on_interaction(event["user_id"], event["item_id"],
                                                 event["event_id"], msg.timestamp()[1])
                except (DecodeError, KeyError) as exc:
                    undecodable += 1       # the scorer dead-letters these; nothing to judge
                    if undecodable == 1:   # say why once: all of them failing is a wrong setup
                        log(f"undecodable, not judged: {msg.topic()} partition {msg.partition()} "
                            f"offset {msg.offset()}: {type(exc).__name__}: {exc} (the first; "
                            "all of them: is --schema-registry-url the worker's?)")
            if now - last_print >= print_every_s:
                log(format_live(evaluator))
                last_print = now
            if expect_recommendations and evaluator.recommendations >= expect_recommendations:
                break
            if now - last_message > idle_timeout_s:
                break
    finally:
        consumer.close()
    evaluator.flush_latencies()
    result = {"summary": {**evaluator.summary(), "undecodable": undecodable},
              "series": evaluator.series()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result))
    log(format_live(evaluator))
    # Each judgment, for pairing with an offline computation (not in evaluation.json: big).
    return {**result, "judged": evaluator.judged}
