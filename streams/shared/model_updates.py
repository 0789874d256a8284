"""The `model-updates` topic: the trainer announces versions, every scorer follows them.

One partition, compacted, key b"model": Kafka keeps at least the latest announcement, so a
scorer that starts later still finds the current version. Each scorer reads the topic from
its beginning without a consumer group (every scorer sees every announcement), in a thread
that also loads and checks the file: the model thread only swaps a ready model in between
batches. A version that cannot be loaded is refused with one error line; the old one serves on.
Whatever one record holds, it cannot stop the thread; if the thread ends anyway (the consumer
fails), `failure` says why, and the worker's /health turns from ok to failing.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from streams.shared.kafka_config import client_config
from streams.shared.model_store import ModelStore
from streams.shared.topics import ensure_topics

log = logging.getLogger(__name__)
KEY = b"model"


def ensure_model_updates_topic(bootstrap: str, topic: str, replication: int = 1) -> None:
    ensure_topics(bootstrap, {topic: 1}, replication,
                  configs={topic: {"cleanup.policy": "compact"}})


class AnnouncementError(RuntimeError):
    """An announcement the broker did not confirm in time."""


def announce(bootstrap: str, topic: str, announcement: dict, extra_config=None,
             timeout_s: float = 30.0) -> None:
    producer = Producer({**client_config(bootstrap), "enable.idempotence": True,
                         **(extra_config or {})})
    producer.produce(topic, key=KEY, value=json.dumps(announcement).encode())
    if producer.flush(timeout_s):
        raise AnnouncementError(f"announcement of {announcement['version']} not confirmed "
                                f"by the broker within {timeout_s:g} s")


def read_announcements(bootstrap: str, topic: str, timeout: float = 5.0) -> list[dict]:
    """Every announcement still on the topic, oldest first (used at start-up)."""
    consumer = _consumer(bootstrap)
    try:
        values = _read_to_end(consumer, topic, timeout)
    finally:
        consumer.close()
    out = []
    for value in values:
        try:
            announcement = json.loads(value)
        except (ValueError, TypeError):         # not JSON, or a tombstone (no value)
            announcement = None
        if isinstance(announcement, dict):
            out.append(announcement)
        else:
            log.error("model-updates record not an announcement, ignored: %r", (value or b"")[:200])
    return out


def newest_loadable(store: ModelStore, announcements: list[dict], device="cpu"):
    """(model, payload) of the newest announced version that loads from the store, or None;
    each newer one that does not is logged with its reason."""
    for announcement in reversed(announcements):
        try:
            return store.load(announcement, device)
        except Exception as exc:        # any fault of one version is that version's refusal
            log.error("announced version %s unusable: %s: %s", announcement.get("version"),
                      type(exc).__name__, exc)
    return None


def _read_to_end(consumer: Consumer, topic: str, timeout: float) -> list[bytes]:
    """Assign the topic's partition from its start; the values up to its current end
    ([] if there is no such topic yet)."""
    partition = TopicPartition(topic, 0, OFFSET_BEGINNING)
    consumer.assign([partition])
    try:
        _, high = consumer.get_watermark_offsets(partition, timeout=timeout)
    except KafkaException:
        return []
    values, deadline = [], time.monotonic() + timeout
    while high > 0 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        values.append(msg.value())
        if msg.offset() >= high - 1:
            break
    return values


def _consumer(bootstrap: str) -> Consumer:
    return Consumer({**client_config(bootstrap), "group.id": "unused-no-commits",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest"})


class ModelWatcher(threading.Thread):
    """Follows the topic; calls on_model(model, payload, announcement) for each new version
    that loads and checks, in this thread."""

    def __init__(self, bootstrap: str, topic: str, store: ModelStore, on_model,
                 current_version: str, device="cpu", on_refused=None):
        super().__init__(name="model-watcher", daemon=True)
        self.bootstrap, self.topic, self.store = bootstrap, topic, store
        self.on_model, self.current, self.device = on_model, current_version, device
        self.stopping = threading.Event()
        self.refused: list[str] = []
        self.on_refused = on_refused or (lambda version, reason: None)
        self.failure: str | None = None

    @property
    def following(self) -> bool:
        """Still following the topic (False once the thread has ended, for whatever reason)."""
        return self.is_alive() and self.failure is None

    def run(self) -> None:
        try:
            consumer = _consumer(self.bootstrap)
            try:
                # What is already on the topic: only the newest announcement matters.
                existing = _read_to_end(consumer, self.topic, timeout=10)
                if existing:
                    self.handle(existing[-1])
                while not self.stopping.is_set():
                    msg = consumer.poll(0.5)
                    if msg is None or msg.error():
                        continue
                    self.handle(msg.value())
            finally:
                consumer.close()
        except Exception as exc:        # the consumer itself failed: say so, on /health too
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("model watcher stopped; version %s keeps serving, no updates follow",
                          self.current)

    def handle(self, value: bytes) -> None:
        try:
            announcement = json.loads(value)
            version = announcement["version"]
            if not isinstance(version, str):
                raise TypeError("version is not a string")
        except (ValueError, TypeError, KeyError):
            log.error("refused a model-updates record that is not an announcement: %r",
                      (value or b"")[:200])
            return
        if version == self.current:
            return
        try:
            model, payload = self.store.load(announcement, self.device)
            self.on_model(model, payload, announcement)
        except Exception as exc:        # any fault of one version is that version's refusal
            self.refused.append(version)
            self.on_refused(version, f"{type(exc).__name__}: {exc}")
            log.error("refused model version %s: %s: %s; version %s keeps serving",
                      version, type(exc).__name__, exc, self.current)
            return
        self.current = version
        log.info("model version %s loaded (parent %s)", version, announcement.get("parent"))

    def stop(self) -> None:
        self.stopping.set()
