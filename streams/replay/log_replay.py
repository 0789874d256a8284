"""Replay a historical log into `interactions` (`mlsa4rec replay SOURCE`).

Events go out in timestamp order, ties in file order, keyed by user id (so each user's
events stay in order in one partition), as fast as the broker takes them or time-scaled
(`speed` = seconds of log per second). Each event's id is `<source>-<row in the file>` and its
timestamp the log's, so a replay is the same events every time. Progress (how many events of
this ordering were delivered) goes to a small JSON file after every delivered chunk, and when
the run is interrupted (Ctrl-C, SIGTERM) once what it produced is delivered: a second run
continues where the first stopped and sends nothing twice. Only a hard kill (SIGKILL, power)
can leave part of a chunk unrecorded; that part is sent again, as new messages with the same
event ids.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.data.protocol import first_use_codes, k_core_mask, load_interactions
from model.data.userlog import parse_timestamp

CHUNK = 5000                        # events per delivery check and progress write


@dataclass
class ReplayConfig:
    broker: str = "127.0.0.1:9092"  # Kafka bootstrap servers (host:port, comma-separated)
    interactions_topic: str = "interactions"  # the topic the log is sent to
    schema_registry_url: str = ""  # a Confluent-compatible Schema Registry; "" = the pinned ids
    partitions: int = 4  # partitions of the topic if it is created
    k_core: int = 0                 # 5 = the offline protocol's filter; 0 = every event
    speed: float = 0.0              # log seconds per wall second; 0 = as fast as possible
    # at most this many events per second, evenly spaced: a burst of the log (many events of
    # one second) is spread out instead of sent at once; 0 = no limit
    max_rate: float = 0.0
    start: str = ""                 # log time to start at (epoch seconds or ISO 8601)
    progress_file: str = ""         # default: runs/replay/<source>-<topic>.json
    progress: bool = True  # show a progress bar


@dataclass
class LogEvents:
    name: str
    rows: np.ndarray                # row in the file, in replay order
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray          # seconds


def log_events(source: str, k_core: int = 0, start: str = "") -> LogEvents:
    inter = load_interactions(source)
    rows = np.arange(len(inter))
    if k_core:
        keep = k_core_mask(first_use_codes(inter.users)[0], first_use_codes(inter.items)[0], k_core, k_core)
        rows = rows[keep]
    timestamps = np.asarray(inter.timestamps, dtype=np.float64)
    rows = rows[np.argsort(timestamps[rows], kind="stable")]
    if start:
        rows = rows[timestamps[rows] >= parse_timestamp(start)]
    return LogEvents(Path(source).stem, rows, inter.users[rows], inter.items[rows],
                     timestamps[rows])


def replay(source: str, cfg: ReplayConfig, before_send=None) -> int:
    """Send the log (what is left of it); returns how many events this run sent.

    before_send(n), if given, is called before this run's n-th event (from 0) and returns the
    seconds it waited (the demo waits there for the trainer): the log's schedule moves on by
    that much, so a pause is not followed by a burst of the events it held up."""
    from confluent_kafka import Producer

    from schemas.codec import encode_interaction
    from streams.shared.clients import PRODUCER_DEFAULTS
    from streams.shared.config import use_configured_schemas
    from streams.shared.kafka_config import client_config
    from streams.shared.topics import ensure_topics

    use_configured_schemas(cfg)
    events = log_events(source, cfg.k_core, cfg.start)
    progress_path = Path(cfg.progress_file or
                         f"runs/replay/{events.name}-{cfg.interactions_topic}.json")
    identity = {"source": source, "topic": cfg.interactions_topic, "k_core": cfg.k_core,
                "start": cfg.start, "events": len(events.rows)}
    done = 0
    if progress_path.exists():
        saved = json.loads(progress_path.read_text())
        if {k: saved.get(k) for k in identity} == identity:
            done = saved["delivered"]
    ensure_topics(cfg.broker, {cfg.interactions_topic: cfg.partitions})
    producer = Producer({**client_config(cfg.broker), **PRODUCER_DEFAULTS})
    failures: list[str] = []
    delivered = [0]                 # this run's messages the broker acknowledged

    def on_delivery(err, _msg):
        if err is not None:
            failures.append(str(err))
        else:
            delivered[0] += 1

    wall_start, log_start = time.monotonic(), events.timestamps[done] if done < len(events.rows) else 0
    bar = tqdm(total=len(events.rows), initial=done, unit="ev", disable=not cfg.progress,
               desc=f"replay {events.name}")
    def save_progress(delivered: int) -> None:
        progress_path.parent.mkdir(parents=True, exist_ok=True)
        progress_path.write_text(json.dumps({**identity, "delivered": delivered}))
        bar.update(delivered - bar.n)

    sent, next_at = 0, 0.0          # next_at: the earliest time the next event may go (max_rate)
    try:
        for index in range(done, len(events.rows)):
            if before_send is not None:
                waited = before_send(sent)
                wall_start, next_at = wall_start + waited, next_at + waited
            due = wall_start + (events.timestamps[index] - log_start) / cfg.speed \
                if cfg.speed else 0.0
            wait = max(due, next_at) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if cfg.max_rate:
                next_at = max(next_at, time.monotonic()) + 1 / cfg.max_rate
            user = str(events.users[index])
            producer.produce(cfg.interactions_topic, key=user.encode(), on_delivery=on_delivery,
                             value=encode_interaction({
                                 "event_id": f"{events.name}-{events.rows[index]}",
                                 "user_id": user, "item_id": str(events.items[index]),
                                 "event_type": "CLICK",
                                 "timestamp": int(events.timestamps[index] * 1000),
                                 "properties": None}))
            producer.poll(0)
            sent += 1
            if sent % CHUNK == 0 or index == len(events.rows) - 1:
                if producer.flush(60) or failures:
                    raise RuntimeError(f"replay stopped at event {index}: "
                                       f"{failures[:1] or 'delivery timed out'}; "
                                       "run it again to go on")
                save_progress(index + 1)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) between chunks: once what was produced is delivered,
        # record it, so that the next run does not send part of a chunk twice.
        # Count acknowledgements, not produce calls: an interrupt can land between a
        # produce() and the count that follows it.
        if not failures:
            undelivered = producer.flush(30)        # delivery reports come in here
            if not undelivered and not failures:
                save_progress(done + delivered[0])
        raise
    finally:
        bar.close()
    return sent
