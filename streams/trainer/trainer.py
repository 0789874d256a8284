"""The online trainer: consume clicks into the replay buffer, fine-tune, publish versions.

`OnlineTrainer` is the logic without Kafka (tests drive it directly); `run_trainer` wires it to
the `interactions` topic (its own consumer group) and to `model-updates`.

A round (every `round_every_events` events or `round_every_s` seconds):
  1. grow the item vocabulary for the new items seen (spare rows, model/vocab.py);
  2. fine-tune a copy of the serving model on sequences sampled from the buffer, held-out
     events cut off (model/finetune.py);
  3. judge the copy, the serving model and the anchor (the version this trainer started from)
     on the held-out events (NDCG@10);
  4. publish the copy as a new version unless it is worse than the serving model or the anchor
     by more than `margin` (relative). Judging against the serving model alone would let
     small losses add up over many rounds: each version within the margin of the one before.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from model.finetune import FineTuneConfig, fine_tune, next_item_metrics
from model.vocab import grow_item_embedding
from streams.shared.config import TrainerConfig
from streams.shared.model_updates import AnnouncementError
from streams.trainer.replay_buffer import BufferConfig, ReplayBuffer

log = logging.getLogger(__name__)

# Commit errors that mean "this member lost its partitions" (its session timed out, say while
# the broker restarted): the group gives them out again and the clicks since the last commit
# come back, which the buffer skips as already added. Not a reason to stop training.
_MEMBERSHIP_LOST = ("_ASSIGNMENT_LOST", "REBALANCE_IN_PROGRESS", "ILLEGAL_GENERATION",
                    "UNKNOWN_MEMBER_ID")
# Commit errors that mean "not now": the group's coordinator is not reachable yet (a broker
# that has just restarted). The offsets stay uncommitted and the next commit takes them.
_NOT_NOW = ("_WAIT_COORD", "COORDINATOR_NOT_AVAILABLE", "NOT_COORDINATOR",
            "COORDINATOR_LOAD_IN_PROGRESS", "_TRANSPORT", "_TIMED_OUT", "REQUEST_TIMED_OUT")


def commit(consumer) -> bool:
    """Commit the consumed offsets; False (logged) if the group took the partitions away
    meanwhile or cannot take the commit now (tried again at the next commit, as the error's
    own retriable flag asks); True if there is nothing to commit. Any other error is raised."""
    from confluent_kafka import KafkaException
    try:
        consumer.commit(asynchronous=False)
        return True
    except KafkaException as exc:
        error = exc.args[0]
        if error.name() == "_NO_OFFSET":
            # The partitions were given out again since the last commit (a broker restart),
            # and nothing was consumed from them since: nothing to commit. This once ended
            # the trainer after a broker restart (the CI run that failed).
            return True
        if error.name() in _NOT_NOW or error.retriable():
            log.warning("trainer: commit not taken now (%s); tried again at the next commit",
                        error.str())
            return False
        if error.name() not in _MEMBERSHIP_LOST:
            raise
        log.warning("trainer: commit refused (%s): the partitions were taken away; their "
                    "clicks since the last commit will be read again", error.str())
        return False


@dataclass
class RoundResult:
    published: dict | None        # the announcement, or None if the candidate was refused
    candidate: dict               # holdout metrics ({} if not judged)
    serving: dict
    anchor: dict
    loss: float
    seconds: float
    new_items: int


class OnlineTrainer:
    def __init__(self, model, item_ids: list[str], version: str, buffer: ReplayBuffer,
                 cfg: TrainerConfig, publish, device="cpu"):
        """publish(model, item_ids, metrics, parent, trained_through) -> announcement dict."""
        self.serving, self.version = model.to(device).eval(), version
        self.anchor = copy.deepcopy(self.serving)
        self.item_ids = list(item_ids)
        self.index = {raw: i for i, raw in enumerate(self.item_ids) if i > 0}
        self.buffer, self.cfg, self.publish, self.device = buffer, cfg, publish, device
        self.rng = np.random.default_rng(cfg.seed)
        self.events_since_round = 0
        self.last_round = time.monotonic()
        # Timestamps of the newest holdout_events + 1 events: the oldest of them is the newest
        # event a round trains on (the others are held out).
        self.recent_timestamps: deque[int] = deque(maxlen=cfg.holdout_events + 1)
        self.new_items_since_round = 0

    def add(self, user: str, item: str, timestamp_ms: int = 0,
            position: tuple[int, int] | None = None) -> str | None:
        """Keep one click (None), or say why it is skipped: "vocabulary_full" for a new item
        once the vocabulary holds max_items (each item costs an embedding row in every version
        published after it), "duplicate" for a click at or before the user's last position
        (topic id, partition, offset) in the buffer."""
        if item not in self.index and len(self.item_ids) - 1 >= self.cfg.max_items:   # - pad
            return "vocabulary_full"
        if not self.buffer.add(user, item, position):
            return "duplicate"
        self._index_of(item)
        self.recent_timestamps.append(timestamp_ms)
        self.events_since_round += 1
        return None

    def _index_of(self, item: str) -> int:
        if item not in self.index:
            self.index[item] = len(self.item_ids)
            self.item_ids.append(item)
            self.new_items_since_round += 1
        return self.index[item]

    def due(self) -> bool:
        return self.events_since_round >= self.cfg.round_every_events or (
            self.events_since_round > 0
            and time.monotonic() - self.last_round >= self.cfg.round_every_s)

    def run_round(self) -> RoundResult:
        started = time.perf_counter()
        cfg = self.cfg
        candidate = self._grown(self.serving)
        users = self.buffer.sample_users(cfg.users_per_round)
        sequences = [np.array([self._index_of(i) for i in self.buffer.training_sequence(u)],
                              dtype=np.int64) for u in users]
        optimizer = torch.optim.Adam(candidate.parameters(), lr=cfg.lr)
        max_len = candidate.config.max_len
        loss = fine_tune(candidate, optimizer, sequences,
                         FineTuneConfig(cfg.steps, cfg.batch_size, cfg.lr, max_len,
                                        cfg.imprint_norm, cfg.young_item_lr_scale),
                         self.rng, self.device,
                         first_new=self.serving.n_known if cfg.imprint_new_items else None,
                         first_young=self.anchor.n_known)
        examples = self.buffer.holdout_examples()
        cand_metrics, serving_metrics, anchor_metrics, accept = {}, {}, {}, True
        if len(examples) >= cfg.min_holdout:
            histories = [np.array([self._index_of(i) for i in h], dtype=np.int64)
                         for h, _ in examples]
            targets = [self._index_of(t) for _, t in examples]
            n_known = len(self.item_ids)
            cand_metrics = next_item_metrics(candidate, histories, targets, n_known, max_len,
                                             self.device)
            serving_metrics, anchor_metrics = (
                next_item_metrics(self._grown(model), histories, targets, n_known, max_len,
                                  self.device) for model in (self.serving, self.anchor))
            accept = all(cand_metrics["ndcg@10"] >= reference["ndcg@10"] * (1 - cfg.margin)
                         for reference in (serving_metrics, anchor_metrics))
        # Nothing to train on (nan loss), or diverged: nothing worth publishing.
        if not np.isfinite(loss) or not all(torch.isfinite(p).all() for p in candidate.parameters()):
            accept = False
        trained_through = (self.recent_timestamps[0]
                           if len(self.recent_timestamps) > cfg.holdout_events else None)
        published, unconfirmed = None, False
        if accept:
            metrics = {"holdout": cand_metrics, "serving_holdout": serving_metrics,
                       "anchor_holdout": anchor_metrics, "holdout_events": len(examples),
                       "loss": loss}
            try:
                published = self.publish(candidate, self.item_ids, metrics, self.version,
                                         trained_through)
                self.serving, self.version = candidate.eval(), published["version"]
            except AnnouncementError as exc:
                # The broker may be away for a while; losing the trainer over it is worse.
                log.error("%s: serving version %s kept, the round is tried again in %g s",
                          exc, self.version, cfg.round_every_s)
                unconfirmed = True
        result = RoundResult(published, cand_metrics, serving_metrics, anchor_metrics, loss,
                             time.perf_counter() - started, self.new_items_since_round)
        log.info("round: loss %.4f, holdout ndcg@10 %s vs serving %s, anchor %s (%d events), "
                 "%d new items, %.1fs -> %s", loss, _fmt(cand_metrics), _fmt(serving_metrics),
                 _fmt(anchor_metrics), len(examples),
                 self.new_items_since_round, result.seconds,
                 published["version"] if published else
                 "not confirmed, tried again" if unconfirmed else "refused, serving version kept")
        if not unconfirmed:             # else these clicks bring the next round
            self.events_since_round, self.new_items_since_round = 0, 0
        self.last_round = time.monotonic()
        self.buffer.flush()
        return result

    def _grown(self, model):
        grown = copy.deepcopy(model)
        grow_item_embedding(grown, len(self.item_ids), self.cfg.item_chunk)
        return grown


def _fmt(metrics: dict) -> str:
    return f"{metrics['ndcg@10']:.4f}" if metrics else "-"


def buffer_config(cfg: TrainerConfig) -> BufferConfig:
    return BufferConfig(cfg.max_seq_len, cfg.recent_users, cfg.reservoir_users,
                        cfg.holdout_events)


def run_trainer(cfg: TrainerConfig, stop=None) -> None:
    """Consume until `stop` (a threading.Event) is set or the process is stopped."""
    if not 6 <= cfg.session_timeout_s <= 1800:
        # Kafka's group.min/max.session.timeout.ms defaults; outside them the join fails later.
        raise ValueError(f"--session-timeout-s {cfg.session_timeout_s}: Kafka takes 6 to 1800 s")
    if not cfg.imprint_norm > 0:
        raise ValueError(f"--imprint-norm {cfg.imprint_norm}: must be > 0")
    if not cfg.young_item_lr_scale > 0:
        raise ValueError(f"--young-item-lr-scale {cfg.young_item_lr_scale}: must be > 0")
    from confluent_kafka import Consumer

    from model.checkpoint import load_checkpoint
    from model.training import pick_device
    from schemas.codec import DecodeError
    from streams.shared.clicks import checked_click
    from streams.shared.config import use_configured_schemas
    from streams.shared.kafka_config import client_config
    from streams.shared.metrics import MetricsServer, TrainerMetrics
    from streams.shared.model_store import ModelStore
    from streams.shared.model_updates import (announce, ensure_model_updates_topic,
                                              newest_loadable, read_announcements)
    from streams.shared.topics import ensure_topics, topic_id

    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    use_configured_schemas(cfg)
    ensure_topics(cfg.broker, {cfg.interactions_topic: cfg.partitions}, cfg.replication)
    ensure_model_updates_topic(cfg.broker, cfg.model_updates_topic, cfg.replication)
    store = ModelStore(cfg.model_store)
    announcements = read_announcements(cfg.broker, cfg.model_updates_topic)
    model, payload = newest_loadable(store, announcements, device) or (None, None)
    if model is None and announcements:
        # Announcing the start checkpoint now would roll every scorer back to it.
        raise RuntimeError(f"none of the {len(announcements)} announced model versions loads "
                           f"from {cfg.model_store}; refusing to announce {cfg.checkpoint} "
                           "over them")
    if model is None:                   # first start: the checkpoint becomes the first version
        model, payload = load_checkpoint(cfg.checkpoint, device=device)
        # Same version id: scorers started from this checkpoint have nothing to swap.
        first = store.publish(model, payload["item_ids"], payload["metrics"], parent=None,
                              version=payload["version"])
        announce(cfg.broker, cfg.model_updates_topic, first)
        log.info("announced the checkpoint %s as version %s", cfg.checkpoint, first["version"])

    def publish(candidate, item_ids, metrics, parent, trained_through):
        announcement = store.publish(candidate, item_ids, metrics, parent, trained_through)
        announce(cfg.broker, cfg.model_updates_topic, announcement)
        return announcement

    buffer = ReplayBuffer(cfg.buffer_dir, buffer_config(cfg), cfg.seed)
    trainer = OnlineTrainer(model, payload["item_ids"], payload["version"], buffer, cfg, publish,
                            device)
    metrics = TrainerMetrics()
    metrics.model_version.labels(trainer.version).set(1)
    server = None
    if cfg.metrics_port:
        try:
            server = MetricsServer(cfg.metrics_port, metrics.registry, health=lambda: (
                True, {"model_version": trainer.version,
                       "events_since_round": trainer.events_since_round})).start()
        except OSError as exc:          # e.g. a second trainer on this host, same port
            log.error("no metrics/health endpoint: port %d: %s (set --metrics-port); "
                      "training goes on", cfg.metrics_port, exc)
    consumer = Consumer({**client_config(cfg.broker), "group.id": cfg.group_id,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         # librdkafka's default is 45 s: a restarted trainer got nothing
                         # for that long after a crash (its dead self held the partitions)
                         "session.timeout.ms": int(cfg.session_timeout_s * 1000),
                         "heartbeat.interval.ms": int(cfg.session_timeout_s * 1000 / 4),
                         # a round blocks polling; it must not cost the group membership
                         "max.poll.interval.ms": 600_000})
    consumer.subscribe([cfg.interactions_topic])
    source = topic_id(cfg.broker, cfg.interactions_topic)    # new if the topic is made again
    last_commit, uncommitted = time.monotonic(), 0
    try:
        while stop is None or not stop.is_set():
            for msg in consumer.consume(500, 0.5):
                if msg.error():
                    continue
                uncommitted += 1
                try:
                    event = checked_click(msg.value(), msg.key())
                except DecodeError:
                    metrics.skipped.labels("refused").inc()   # the scorer dead-letters it
                    continue
                skipped = trainer.add(event["user_id"], event["item_id"],
                                      int(event["timestamp"]),
                                      (source, msg.partition(), msg.offset()))
                if skipped:
                    metrics.skipped.labels(skipped).inc()
                else:
                    metrics.events.inc()
            if trainer.due():
                previous = trainer.version
                result = trainer.run_round()
                metrics.rounds.labels("published" if result.published else "refused").inc()
                metrics.round_seconds.observe(result.seconds)
                for name, values in (("candidate", result.candidate), ("serving", result.serving),
                                     ("anchor", result.anchor)):
                    if values:
                        metrics.holdout_ndcg.labels(name).set(values["ndcg@10"])
                if result.published:
                    metrics.model_version.remove(previous)
                    metrics.model_version.labels(trainer.version).set(1)
            if uncommitted and time.monotonic() - last_commit > 5:
                buffer.flush()          # the buffer holds what the committed offsets claim
                if commit(consumer):
                    uncommitted = 0
                last_commit = time.monotonic()
    finally:
        buffer.close()
        consumer.close()
        if server is not None:
            server.stop()
