"""Topic names, up-front creation, and the raw-bytes topic objects of the Faust app.

Faust does not create an agent's input topic (the broker default partition count would
apply): `ensure_topics` creates ours with their final partition counts before any worker starts.
Values stay raw bytes in Faust: we decode them ourselves so that a bad payload can go to the
dead-letter topic instead of crashing the agent.
"""

from __future__ import annotations

import time

from confluent_kafka import TopicCollection
from confluent_kafka.admin import AdminClient, NewTopic

from streams.shared.config import StreamConfig
from streams.shared.kafka_config import client_config


def topic_partitions(cfg: StreamConfig) -> dict[str, int]:
    return {cfg.interactions_topic: cfg.partitions,
            cfg.recommendations_topic: cfg.partitions,
            cfg.dead_letter_topic: cfg.partitions}


def ensure_topics(bootstrap: str, wanted: dict[str, int], replication: int = 1,
                  timeout: float = 30.0, configs: dict[str, dict[str, str]] | None = None) -> None:
    """Create missing topics (with their `configs`, e.g. compaction); an existing one must
    have the wanted partition count."""
    admin = AdminClient(client_config(bootstrap))
    existing = admin.list_topics(timeout=timeout).topics
    for name, partitions in wanted.items():
        if name in existing and len(existing[name].partitions) != partitions:
            raise RuntimeError(f"topic {name!r} has {len(existing[name].partitions)} partitions, "
                               f"the configuration says {partitions}")
    missing = [NewTopic(name, partitions, replication, config=(configs or {}).get(name, {}))
               for name, partitions in wanted.items() if name not in existing]
    for name, future in (admin.create_topics(missing) if missing else {}).items():
        try:
            future.result(timeout)
        except Exception as exc:  # noqa: BLE001 - a concurrent creator is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    # Creation is asynchronous on the broker: wait until every partition has a leader.
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        if all(name in topics and len(topics[name].partitions) == n
               and all(p.leader >= 0 for p in topics[name].partitions.values())
               for name, n in wanted.items()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics {sorted(wanted)} have no leaders after {timeout} s")
        time.sleep(0.2)


def topic_id(bootstrap: str, name: str, timeout: float = 30.0) -> str:
    """The topic's Kafka topic id: it changes when a topic is deleted and created again under
    the same name, whose offsets then start over."""
    admin = AdminClient(client_config(bootstrap))
    futures = admin.describe_topics(TopicCollection([name]), request_timeout=timeout)
    return str(futures[name].result(timeout).topic_id)


def raw_topic(app, name: str, partitions: int):
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", partitions=partitions)
