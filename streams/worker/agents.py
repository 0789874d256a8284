"""The scoring agent: a batch of raw events in, one Recommendation per event out.

Two stages, so that the model and the event loop work at the same time:
  start (event loop)   decode (an event that does not decode goes to the dead-letter topic,
                       reason in a header), read the users' records from the state table, and
                       hand the batch to the model thread;
  model thread         swap in a new model version if one is ready (streams/shared/model_updates.py),
                       lay the records of earlier batches that its table reads may not show
                       over the table's (streams/worker/pipeline.py), score, serialise records and
                       recommendations;
  finish (event loop)  send the recommendations and wait for the broker's acks, only then
                       write the records to the table, then ack the batch's events.
Batches finish in the order they started; at most `pipeline_depth` wait to finish.

Each event's message holds an extra reference until its batch has finished, so Faust commits
its offset only after its record is in the table (take_events alone would ack it as soon as
the next batch is taken). A crash before the table write replays the batch from the old
states: the same recommendations again (at least once). A crash after it replays events
that the records mark as applied: skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from schemas.codec import DecodeError, encode_recommendation
from streams.shared.clicks import checked_click
from streams.worker.pipeline import UnwrittenRecords
from streams.worker.scoring import BatchStats, Event, UserRecord
from streams.worker.tables import as_current

log = logging.getLogger(__name__)


def to_event(message_event) -> Event:
    """Decode one Kafka message into an Event, or raise DecodeError with the reason."""
    message = message_event.message
    record = checked_click(message_event.value, message.key)
    return Event(record["user_id"], record["item_id"], record["event_id"],
                 int(record["timestamp"]), message.partition, message.offset)


@dataclass
class Scored:
    records: dict[str, UserRecord]          # the records to write, by user
    blobs: dict[str, bytes]                 # ... serialised
    recommendations: list[tuple[bytes, bytes]]  # (key, Avro value) in event order
    stats: BatchStats


@dataclass
class Job:
    message_events: list                    # every event of the batch, acked when it finishes
    last_event_of: dict                     # user -> its last message event (table partition)
    scored: asyncio.Future                  # -> Scored
    number: int = 0                         # batches started before this one


FAULT_POINTS = ("after_consume", "after_score", "after_produce", "after_state_write", "after_ack")
RAISE_IN_SCORING = "raise_in_scoring"       # an exception, not an exit: what a bug would do


def parse_fault(text: str) -> tuple[str, int] | None:
    """MLSA4REC_FAULT="<point>:<batch number>": the crash tests' injected fault (os._exit at
    that point of that batch, like a SIGKILL, or an exception raised in the model thread);
    unset in production."""
    if not text:
        return None
    point, _, number = text.partition(":")
    points = FAULT_POINTS + (RAISE_IN_SCORING,)
    if point not in points or not number.isdigit():
        raise ValueError(f"MLSA4REC_FAULT={text!r}: want <{'|'.join(points)}>:<batch>")
    return point, int(number)


class ScoringAgent:
    def __init__(self, cfg, scorer, recommendations, dead_letters, table,
                 recovery=None, metrics=None, highwater=None, on_failure=None):
        """metrics: streams.shared.metrics.WorkerMetrics or None; highwater(tp) -> the partition's
        end offset (for the lag gauge); on_failure(exc): called once if finishing batches
        fails (the worker crashes itself: create_app)."""
        self.cfg, self.scorer, self.table, self.recovery = cfg, scorer, table, recovery
        self.on_failure = on_failure or (lambda exc: None)
        self.failure: BaseException | None = None
        self.metrics, self.highwater = metrics, highwater
        self.started = False
        self.batches_started = 0
        self.batches_written = 0            # batches whose records are in the table
        self.fault = parse_fault(os.environ.get("MLSA4REC_FAULT", ""))
        self.recommendations, self.dead_letters = recommendations, dead_letters
        # One model thread: batches are scored in the order they came, off the event loop.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.unwritten = UnwrittenRecords()
        self._next_model = None                 # (model, item ids, version, parent) to serve next
        self._next_model_lock = threading.Lock()
        self.counts = {"events": 0, "applied": 0, "dead_letters": 0, "duplicates": 0,
                       "unknown_items": 0}
        self.last_report = time.monotonic()

    async def run(self, stream) -> None:
        jobs: asyncio.Queue[Job] = asyncio.Queue(max(1, self.cfg.pipeline_depth))
        finisher = asyncio.ensure_future(self.finish_jobs(stream, jobs))
        # A batch that fails (scoring, sending, writing) stops the worker now, not when the
        # next batch comes: on a quiet stream that could be never.
        finisher.add_done_callback(self._finisher_done)
        self.started = True
        try:
            async for batch in stream.take_events(self.cfg.batch_max,
                                                  within=self.cfg.batch_wait_ms / 1000):
                for message_event in batch:
                    message_event.message.incref()      # released in finish()
                job = await self.start(batch)
                put = asyncio.ensure_future(jobs.put(job))
                await asyncio.wait({put, finisher}, return_when=asyncio.FIRST_COMPLETED)
                if finisher.done():
                    put.cancel()
                    finisher.result()                   # re-raises what stopped it
        finally:
            finisher.cancel()

    def _finisher_done(self, finisher: asyncio.Future) -> None:
        if finisher.cancelled() or finisher.exception() is None:
            return
        self.failure = finisher.exception()
        log.error("finishing a batch failed: %r; the worker stops", self.failure)
        self.on_failure(self.failure)

    async def start(self, batch) -> Job:
        if self.recovery is not None:
            # Faust can hand over events fetched before a rebalance's table recovery and seek
            # have finished; score only on restored states.
            await self.recovery.completed.wait()
        events, last_event_of = [], {}
        for message_event in batch:
            try:
                event = to_event(message_event)
            except DecodeError as exc:
                await self.dead_letter(message_event, exc.reason)
                continue
            events.append(event)
            last_event_of[event.user_id] = message_event
        read_after, records = self.batches_written, {}     # no await from here to the reads
        for user, message_event in last_event_of.items():
            with as_current(message_event):
                raw = self.table.get(user.encode())
            records[user] = UserRecord.from_bytes(raw) if raw is not None else None
        number = self.batches_started
        self.batches_started += 1
        self.crash_if("after_consume", number)
        scored = asyncio.get_running_loop().run_in_executor(
            self.executor, self.score, events, records, read_after, number)
        return Job(list(batch), last_event_of, scored, number)

    def crash_if(self, point: str, number: int) -> None:
        if self.fault == (point, number):
            log.error("injected fault: exiting at %s of batch %d", point, number)
            os._exit(70)

    def serve_next(self, model, item_ids: list[str], version: str,
                   parent: str | None = None) -> None:
        """Swap to this model before the next batch (any thread); a newer call wins."""
        with self._next_model_lock:
            skipped = self._next_model
            if skipped is not None and parent == skipped[2]:
                parent = skipped[3]       # its parent never served: the lineage goes through
            self._next_model = (model, item_ids, version, parent)

    def score(self, events: list[Event], records, read_after: int, number: int) -> Scored:
        """The model thread's part of batch `number`, whose table reads show the writes of the
        batches before `read_after`."""
        with self._next_model_lock:
            next_model, self._next_model = self._next_model, None
        if next_model is not None:
            previous = self.scorer.version
            self.scorer.swap(*next_model)
            log.info("serving model version %s (was %s)", self.scorer.version, previous)
            if self.metrics:
                self.metrics.model_swaps.inc()
                self.metrics.serving(self.scorer.version, previous)
        if not events:
            return Scored({}, {}, [], BatchStats())
        if self.fault == (RAISE_IN_SCORING, number):
            time.sleep(1.0)     # as if after scoring: the event loop has gone on meanwhile
            raise RuntimeError(f"injected fault: an exception in scoring batch {number}")
        updated, recs, stats = self.scorer.process(events,
                                                   self.unwritten.overlay(records, read_after))
        self.unwritten.add(updated, number)
        return Scored(updated, {user: record.to_bytes() for user, record in updated.items()},
                      [(rec["user_id"].encode(), encode_recommendation(rec)) for rec in recs],
                      stats)

    async def finish_jobs(self, stream, jobs: asyncio.Queue) -> None:
        while True:
            job = await jobs.get()
            await self.finish(stream, job)

    async def finish(self, stream, job: Job) -> None:
        scored = await job.scored
        self.crash_if("after_score", job.number)
        deliveries = [await self.recommendations.send(key=key, value=value)
                      for key, value in scored.recommendations]
        await asyncio.gather(*deliveries)
        self.crash_if("after_produce", job.number)
        for user, blob in scored.blobs.items():
            with as_current(job.last_event_of[user]):
                self.table[user.encode()] = blob
        self.batches_written += 1
        self.crash_if("after_state_write", job.number)
        for message_event in job.message_events:
            await stream.ack(message_event)
        self.crash_if("after_ack", job.number)
        for name in ("events", "applied", "duplicates", "unknown_items"):
            self.counts[name] += getattr(scored.stats, name)
        if self.metrics:
            self.observe(job, scored.stats)
        self.report()

    def observe(self, job: Job, stats: BatchStats) -> None:
        m, now = self.metrics, time.time()
        m.events.labels("applied").inc(stats.applied)
        m.events.labels("duplicate").inc(stats.duplicates)
        m.unknown_items.inc(stats.unknown_items)
        m.batch_size.observe(len(job.message_events))
        m.step_seconds.observe(stats.seconds)
        last_offset = {}
        for message_event in job.message_events:
            message = message_event.message
            m.end_to_end_seconds.observe(max(0.0, now - message.timestamp))
            last_offset[message.tp] = max(last_offset.get(message.tp, -1), message.offset)
        if self.highwater is not None:
            for tp, offset in last_offset.items():
                end = self.highwater(tp)
                if end is not None:
                    m.consumer_lag.labels(str(tp.partition)).set(max(0, end - offset - 1))

    def report(self) -> None:
        if time.monotonic() - self.last_report >= self.cfg.report_every_s:
            self.last_report = time.monotonic()
            log.info("scored so far: %s", " ".join(f"{k}={v}" for k, v in self.counts.items()))

    async def dead_letter(self, message_event, reason: str) -> None:
        message = message_event.message
        log.warning("dead letter %s[%s]@%s: %s", message.topic, message.partition,
                    message.offset, reason)
        headers = {"error": reason.encode(),
                   "source": f"{message.topic}/{message.partition}/{message.offset}".encode()}
        future = await self.dead_letters.send(key=message_event.key, value=message_event.value,
                                              headers=headers)
        await future
        self.counts["dead_letters"] += 1
        if self.metrics:
            self.metrics.events.labels("dead_letter").inc()
