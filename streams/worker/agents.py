"""The scoring agent: clicks in, one Recommendation per click out, states written back in flushes.

Three parts, so that the model and the event loop work at the same time:
  reader (event loop)  takes the events Faust's conductor has put in the agent's channel
                       straight from its queue, all that are there at once, decodes them
                       (while the model thread steps the batch before, which holds no GIL)
                       into `pending`; it pauses when that holds two batches, so the
                       channel fills and Faust stops fetching (back-pressure);
  dispatcher           when the model thread is free, hands it everything pending up to
                       `batch_max` (a full batch may also wait in line behind the one being
                       scored): under load batches fill while the model works, and
                       `batch_wait_ms` only bounds how long a quiet stream waits;
  model thread         swaps in a new model version if one is ready, reads the users it does
                       not hold from the table, steps and ranks (streams/worker/scoring.py) on
                       the state cache (streams/worker/state_cache.py), and every
                       `flush_every_s` makes a flush: the records of the users changed since
                       the last one; what did not decode goes to the dead letters;
  queries              `answer` (an HTTP thread: streams/worker/queries.py) runs in the
                       model thread too, between batches: a user's top k from its state;
  finisher (loop)      encodes a batch's recommendations as soon as it is scored and sends
                       them (confluent-kafka, streams/worker/producer.py); in batch order,
                       sends its dead letters and waits for those acks; a batch that
                       carries a flush hands it to
  writer (loop)        which writes flushes to the table one after another, each before it
                       acks the events held since the previous one; the finisher goes on
                       meanwhile (later recommendations do not wait for a write).

Each event's message holds an extra reference until the flush that covers it is in the table,
so Faust commits its offset only then. A crash before that replays the events from the stored
states: the same recommendations again (at least once). A crash after it replays events that
the records mark as applied: skipped. A rebalance first flushes (Faust waits for every held
event before it gives partitions away), then the cache is emptied: the table is the truth
again for whatever partitions come back.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from model.state import state_size
from schemas.codec import DecodeError, RecommendationWriter
from streams.shared.clicks import checked_click
from streams.worker.queries import NotReady, PopularItems, Query, partition_of
from streams.worker.cold_tier import ColdSweep
from streams.worker.scoring import (NO_SNAPSHOT, USER_REPR, BatchStats, Event, Ranked,
                                    UserRecord, snapshot_key)
from streams.worker.state_cache import Flush, StateCache

log = logging.getLogger(__name__)


def to_event(message_event) -> Event:
    """Decode one Kafka message into an Event, or raise DecodeError with the reason."""
    message = message_event.message
    record = checked_click(message_event.value, message.key)
    return Event(record["user_id"], record["item_id"], record["event_id"],
                 int(record["timestamp"]), message.partition, message.offset)


def click_of(message_event) -> Event | DecodeError:
    """to_event, with what does not decode returned (it goes to the dead letters)."""
    try:
        return to_event(message_event)
    except DecodeError as exc:
        return exc


@dataclass
class Scored:
    ranked: Ranked | None                           # the top k per applied event, in order
    writer: RecommendationWriter | None             # of the version that ranked them
    dead_letters: list[tuple[object, str]]          # (message event, reason)
    stats: BatchStats
    flush: Flush | None = None

    @functools.cached_property
    def recommendations(self) -> list[tuple[bytes, bytes]]:
        """(key, Avro value) in event order. Encoded when first asked for, by the event loop
        as it sends them: meanwhile the model thread scores the next batch."""
        ranked = self.ranked
        if ranked is None or not ranked.events:
            return []
        events = ranked.events
        values = self.writer.encode_batch(
            [e.user_id for e in events], [e.event_id for e in events],
            [e.timestamp_ms for e in events], ranked.items.numpy(), ranked.scores.numpy(),
            ranked.version, ranked.produced_at)
        return [(e.user_id.encode(), value) for e, value in zip(events, values)]


@dataclass
class Job:
    message_events: list                    # every event of the batch, acked after a flush
    scored: asyncio.Future                  # -> Scored
    number: int = 0                         # batches started before this one
    done: asyncio.Future | None = None      # set when finished (flush_now)
    sent: asyncio.Future | None = None      # its recommendations acknowledged


# No click for this long while the input partitions have lag: the log says what the consumer
# and the flow control look like (docs/RELIABILITY.md: a restarted worker that got nothing).
STALL_S = 10.0

FAULT_POINTS = ("after_consume", "after_score", "after_produce", "after_state_write", "after_ack")
RAISE_IN_SCORING = "raise_in_scoring"       # an exception, not an exit: what a bug would do
# These happen at flushes only: they fire at the first flush of a batch at or after the number.
AT_FLUSH = ("after_state_write", "after_ack")


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


def restoring(recovery) -> bool:
    """Whether Faust's recovery is restoring the tables: the first restore (`completed` not
    set yet) or a later rebalance's (`completed` stays set after the first; `in_recovery`)."""
    return not recovery.completed.is_set() or recovery.in_recovery


class ScoringAgent:
    def __init__(self, cfg, scorer, recommendations, dead_letters, table,
                 recovery=None, metrics=None, highwater=None, on_failure=None,
                 producer_factory=None, input_state=None):
        """recommendations: the output topic (Faust), used without `producer_factory`;
        producer_factory(loop) -> streams.worker.producer.AsyncProducer, which sends the
        recommendations instead (librdkafka batches in C; one Python call per batch); metrics:
        streams.shared.metrics.WorkerMetrics or None; highwater(tp) -> the partition's end
        offset (for the lag gauge); on_failure(exc): called once if a batch fails (the worker
        crashes itself: create_app); input_state() -> (lagging, details): whether the input
        partitions have clicks not yet read, and the consumer's state (for the stall warning)."""
        self.input_state = input_state
        self.last_event_at = time.monotonic()
        self.stall_reported = False
        self.stalled: str | None = None         # why /health says "stalled", until a click comes
        self.cfg, self.scorer, self.table, self.recovery = cfg, scorer, table, recovery
        self.on_failure = on_failure or (lambda exc: None)
        self.failure: BaseException | None = None
        self.metrics, self.highwater = metrics, highwater
        self.started = False
        self.batches_started = 0
        self.fault = parse_fault(os.environ.get("MLSA4REC_FAULT", ""))
        self.recommendations, self.dead_letters = recommendations, dead_letters
        self.producer_factory, self.producer = producer_factory, None
        # One model thread: batches are scored in the order they came, off the event loop.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.cache = StateCache(scorer.template, scorer.state_dtype,
                                capacity=cache_rows(cfg.state_cache_mb, scorer),
                                snapshot_every=cfg.snapshot_every,
                                history_len=scorer.history_len,
                                flush_max_users=cfg.flush_max_users)
        if self.cache.capacity < 2 * cfg.batch_max:
            raise ValueError(f"--state-cache-mb {cfg.state_cache_mb} holds {self.cache.capacity} "
                             f"users: it must hold at least 2 x --batch-max ({cfg.batch_max})")
        self.writer = RecommendationWriter(scorer.item_ids)
        self.cold = ColdSweep(cfg.cold_after_s, scorer.history_len) if cfg.cold_after_s \
            else None
        self.cold_scan: asyncio.Future | None = None
        self.popular = PopularItems(cfg.popular_window_s)
        # Requests waiting for the model thread; one job there answers all that are waiting.
        self.requests: deque[tuple[Query, Future]] = deque()
        self.requests_job = False               # a job for them is in the model thread's queue
        self.requests_lock = threading.Lock()
        self._next_model = None                 # (model, item ids, version, parent) to serve next
        self._next_model_lock = threading.Lock()
        self.counts = {"events": 0, "applied": 0, "dead_letters": 0, "duplicates": 0,
                       "unknown_items": 0}
        self.last_report = time.monotonic()
        # Event loop side.
        # (message event, click_of it) pairs taken, not yet in a batch
        self.pending: deque = deque()
        self.first_pending_at = 0.0
        self.held: list = []                    # message events waiting for a flush
        self.unscored = 0                       # batches handed to the model thread, not done
        self.wakeup = asyncio.Event()
        self.room = asyncio.Event()
        self.flush_requested = False
        self.rebalancing = False
        self.stopping = False                   # after flush_now: every batch flushes
        self.drop_cache = False                 # model thread: empty the cache first
        self.flush_made_at = time.monotonic()   # the last flush made (model thread)
        self.submit_lock = asyncio.Lock()
        self.jobs: asyncio.Queue | None = None

    # -- the event loop ------------------------------------------------------------------
    async def run(self, stream) -> None:
        if self.producer_factory is not None and self.producer is None:
            self.producer = self.producer_factory(asyncio.get_running_loop())
            self.table.producer = self.producer
        self.jobs = asyncio.Queue(max(1, self.cfg.pipeline_depth))
        # One flush in line behind the one being written: a slow write holds up the finisher
        # (and so the model) only when flushes come faster than the table takes them.
        self.flushes = asyncio.Queue(1)
        finisher = asyncio.ensure_future(self.finish_jobs(self.jobs))
        writer = asyncio.ensure_future(self.write_flushes(stream, self.flushes))
        reader = asyncio.ensure_future(self.read(stream))
        timer = asyncio.ensure_future(self.flush_timer())
        # A batch that fails (scoring, sending, writing) stops the worker now, not when the
        # next batch comes: on a quiet stream that could be never.
        for task in (finisher, writer, reader, timer):
            task.add_done_callback(self._task_done)
        self.started = True
        # What exists now (Faust, torch, the model) lives as long as the worker: out of the
        # garbage collector's sight. Its full collections walked all of it, 120-180 ms each
        # with every thread stopped: the worst latencies (docs/RESULTS.md 4k).
        gc.freeze()
        try:
            while True:
                batch, flush = await self.next_batch()
                async with self.submit_lock:
                    await self.submit(batch, flush)
                for task in (finisher, writer):
                    if task.done():
                        task.result()                   # re-raises what stopped it
        finally:
            for task in (finisher, writer, reader, timer):
                task.cancel()

    def _task_done(self, task: asyncio.Future) -> None:
        if task.cancelled() or task.exception() is None or self.failure is not None:
            return
        self.failure = task.exception()
        log.error("the scoring agent failed: %r; the worker stops", self.failure)
        self.on_failure(self.failure)

    async def read(self, stream) -> None:
        """Events from the agent's channel, in the order the conductor delivered them.

        Not through the stream's iterator (`take_events`): it runs a processor, a buffer
        and an ack per event, a quarter of the event loop's time under load (docs/RESULTS.md,
        4e), for nothing this agent uses. Each event keeps the one reference the conductor
        gave it until the flush that covers it acks it (`finish`), so its offset is
        committed only then, and a rebalance's wait for unacked messages holds until then."""
        queue = stream.channel.queue
        limit = self.cfg.batch_max
        while True:
            try:
                batch = [await queue.get()]
            except StopAsyncIteration:      # Faust stops the agent: thrown into its channel
                return
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            self.last_event_at = time.monotonic()
            self.stall_reported, self.stalled = False, None
            if not self.pending:
                self.first_pending_at = time.monotonic()
            # Decoded here, on the event loop, while the model thread steps the batch before
            # (its traced step holds no GIL): not on the model thread's path (RESULTS 4l).
            self.pending.extend((message_event, click_of(message_event))
                                for message_event in batch)
            self.wakeup.set()
            while len(self.pending) >= 2 * self.cfg.batch_max:
                self.room.clear()
                await self.room.wait()

    async def next_batch(self) -> tuple[list, bool]:
        """What the model thread gets next, once it is free: up to batch_max pending events,
        as soon as there are that many, or batch_wait_ms after the first of them came; or a
        flush (with whatever is pending) when one is asked for."""
        wait = self.cfg.batch_wait_ms / 1000
        while True:
            timeout = None
            if self.unscored == 1 and len(self.pending) >= self.cfg.batch_max:
                break           # a full batch waits in line: the model goes on without a gap
            if self.unscored == 0 and (self.pending or self.flush_requested):
                age = time.monotonic() - self.first_pending_at
                if (len(self.pending) >= self.cfg.batch_max or self.flush_requested
                        or age >= wait):
                    break
                timeout = wait - age
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        n = min(len(self.pending), self.cfg.batch_max)
        batch = [self.pending.popleft() for _ in range(n)]
        if self.pending:
            self.first_pending_at = time.monotonic()
        self.room.set()
        flush = self.flush_requested or self.rebalancing or self.stopping
        self.flush_requested = False
        return batch, flush

    async def submit(self, batch: list, flush: bool) -> Job:
        """Hand a batch ((message event, click) pairs) to the model thread and queue it for
        the finisher (in order)."""
        if batch and self.recovery is not None:
            # Faust can hand over events fetched before a rebalance's table recovery and seek
            # have finished; score only on restored states.
            await self.recovery.completed.wait()
        number = self.batches_started       # batches of events: a flush alone is not one
        if batch:
            self.batches_started += 1
            self.crash_if("after_consume", number)
        self.unscored += 1
        message_events = [message_event for message_event, _ in batch]
        clicks = [click for _, click in batch]
        scored = asyncio.get_running_loop().run_in_executor(
            self.executor, self.score, message_events, number, flush, clicks)
        job = Job(message_events, scored, number, asyncio.get_running_loop().create_future())
        scored.add_done_callback(lambda _: self._scored(job))
        await self.jobs.put(job)
        return job

    def _scored(self, job: Job) -> None:
        """The model thread is done with `job`: its recommendations go out now, not when the
        batches before it have finished (a flush ahead of them waits for the broker); only
        their acks are awaited in order (finish)."""
        self.unscored -= 1
        self.wakeup.set()
        if not job.scored.cancelled() and job.scored.exception() is None:
            self._send_once(job)

    def _send_once(self, job: Job) -> asyncio.Future:
        """Its recommendations on their way, once: from _scored, or from finish when the
        future was already done when _scored was attached (then _scored runs later)."""
        if job.sent is None:
            if job.message_events:
                self.crash_if("after_score", job.number)
            job.sent = asyncio.ensure_future(self.send(job.scored.result().recommendations))
        return job.sent

    def request_flush(self) -> None:
        """Flush with the next batch, or alone if none comes (any loop callback)."""
        self.flush_requested = True
        self.wakeup.set()

    async def flush_timer(self) -> None:
        """On a quiet stream, write back and commit anyway every flush_every_s."""
        while True:
            await asyncio.sleep(self.cfg.flush_every_s / 2)
            if self.held and time.monotonic() - self.flush_made_at >= self.cfg.flush_every_s:
                self.request_flush()
            elif self._next_model is not None and self.unscored == 0:
                # A new version goes in before a batch; on a quiet stream this is the batch,
                # so that requests (`answer`) get it without waiting for a click.
                self.request_flush()
            if self.cold is not None and not self.rebalancing:
                if self.cold.candidates and self.unscored == 0:
                    self.request_flush()        # the last scan's users, without a click
                # The cold tier's key walk, in a thread: it reads the snapshots it passes. One
                # at a time: a slow walk must not pile up behind the timer's ticks.
                if self.cold_scan is None or self.cold_scan.done():
                    self.cold_scan = asyncio.get_running_loop().run_in_executor(
                        None, self.cold.scan, self.table)
            self.check_stall()

    def check_stall(self) -> None:
        """Warn once if no click has come for STALL_S while the input partitions have clicks
        not yet read, with the consumer's state, and mark the worker stalled for /health. A
        table restore is not a stall (a million users' takes minutes: docs/RESULTS.md 4j):
        the clock starts when it ends."""
        if self.recovery is not None and restoring(self.recovery):
            self.last_event_at = time.monotonic()
            return
        idle = time.monotonic() - self.last_event_at
        if self.input_state is None or self.stall_reported or idle < STALL_S:
            return
        try:
            lagging, details = self.input_state()
        except Exception as exc:        # noqa: BLE001 - a diagnostic must not stop the worker
            self.stall_reported = True
            log.warning("no click for %.0f s; the consumer's state could not be read: %r",
                        idle, exc)
            return
        if lagging:
            self.stall_reported = True
            # /health turns to 503 until a click comes: an orchestrator's liveness probe
            # restarts such a worker, which loses nothing (its offsets were not committed).
            self.stalled = f"no click for {idle:.0f} s while the input has clicks not read"
            log.warning("%s: %s", self.stalled, details)

    async def flush_now(self) -> None:
        """Flush everything scored so far and wait until it is written and acked (a clean
        stop: the next start replays nothing)."""
        if self.jobs is None:
            return
        self.stopping = True        # clicks still pending get flushed with their batches too
        async with self.submit_lock:
            job = await self.submit([], flush=True)
        await job.done

    def on_rebalance_start(self) -> None:
        """Faust is about to take the partitions away (and waits for every held event): flush
        now; until the new assignment every batch flushes."""
        self.rebalancing = True
        self.request_flush()

    def on_partitions_assigned(self) -> None:
        """The table is the truth again: the model thread empties the cache before its next
        batch (partitions may have moved; the revoke flushed every dirty user)."""
        self.rebalancing = False
        self.drop_cache = True

    def crash_if(self, point: str, number: int) -> None:
        if self.fault == (point, number) or (
                point in AT_FLUSH and self.fault and self.fault[0] == point
                and number >= self.fault[1]):
            log.error("injected fault: exiting at %s of batch %d", point, number)
            os._exit(70)

    async def finish_jobs(self, jobs: asyncio.Queue) -> None:
        while True:
            job = await jobs.get()
            await self.finish(job)

    async def finish(self, job: Job) -> None:
        """In batch order: dead letters out, recommendations acknowledged; a batch that
        carries a flush hands it, with every event held since the last one, to the writer."""
        scored = await job.scored
        for message_event, reason in scored.dead_letters:
            await self.dead_letter(message_event, reason)
        await self._send_once(job)
        if job.message_events:
            self.crash_if("after_produce", job.number)
        self.held += job.message_events
        for name in ("events", "applied", "duplicates", "unknown_items"):
            self.counts[name] += getattr(scored.stats, name)
        if self.metrics:
            self.observe(job, scored)
        self.report()
        if scored.flush is None:
            job.done.set_result(None)
            return
        # The next batches' recommendations go out while this flush is written: they do not
        # depend on it (a crash before it is in the table replays them from older states).
        held, self.held = self.held, []
        await self.flushes.put((job, scored.flush, held))

    async def write_flushes(self, stream, flushes: asyncio.Queue) -> None:
        """Flushes into the table in order, each before the events it covers are acked (so
        Faust commits their offsets only then)."""
        while True:
            job, flush, held = await flushes.get()
            await self.write(flush)
            self.crash_if("after_state_write", job.number)
            for i, message_event in enumerate(held):
                await stream.ack(message_event)
                if i % 256 == 255:
                    # A flush acks thousands of clicks (~10 us each, Faust's bookkeeping): let
                    # the batches scored meanwhile send their recommendations in between.
                    await asyncio.sleep(0)
            self.crash_if("after_ack", job.number)
            job.done.set_result(None)

    async def send(self, recommendations: list[tuple[bytes, bytes]]) -> None:
        """Out, and acknowledged by the broker, before any state that made them is stored."""
        if not recommendations:
            return
        if self.producer is not None:
            await self.producer.send_batch(self.cfg.recommendations_topic, recommendations)
            return
        deliveries = [await self.recommendations.send(key=key, value=value)
                      for key, value in recommendations]
        await asyncio.gather(*deliveries)

    async def write(self, flush: Flush) -> None:
        """A flush into the table (RocksDB and its changelog, acknowledged)."""
        await self.table.write(flush.writes)
        self.cache.flush_written(flush.number)
        if self.metrics:
            self.metrics.flushes.inc()
            self.metrics.flushed_bytes.inc(flush.bytes)
            self.metrics.flushed_users.inc(flush.users)
            self.metrics.snapshots.inc(flush.snapshots)

    # -- the model thread ----------------------------------------------------------------
    def serve_next(self, model, item_ids: list[str], version: str,
                   parent: str | None = None) -> None:
        """Swap to this model before the next batch (any thread); a newer call wins. Its step
        is traced here, in the caller's thread (the model watcher's): tracing takes a second or
        more on a busy machine, which the model thread would spend not scoring."""
        traced = self.scorer.trace_for(model, len(item_ids))
        ann_index = self.scorer.index_for(model, len(item_ids))    # as slow: also here
        with self._next_model_lock:
            skipped = self._next_model
            if skipped is not None and parent == skipped[2]:
                parent = skipped[3]       # its parent never served: the lineage goes through
            self._next_model = (model, item_ids, version, parent, traced, ann_index)

    def score(self, batch: list, number: int, flush: bool = False,
              clicks: list | None = None) -> Scored:
        """The model thread's part of batch `number` (message events; `clicks`: click_of
        each, if the event loop has decoded them already)."""
        started = time.perf_counter()
        self.cache.forget_written()
        swap_flush = self._swap_if_asked()
        if self.drop_cache:
            self.drop_cache = False
            lost = self.cache.drop_all()
            if self.cold is not None:
                self.cold.reset()
            if lost:
                log.error("a rebalance dropped %d unflushed users' records", lost)
        events, dead = [], []
        last_of_user: dict[str, Event] = {}
        if clicks is None:
            clicks = [click_of(message_event) for message_event in batch]
        for message_event, event in zip(batch, clicks):
            if isinstance(event, DecodeError):
                dead.append((message_event, event.reason))
                continue
            events.append(event)
            last_of_user[event.user_id] = event
        self.popular.add([event.item_id for event in events])
        if self.cold is not None:
            self.cold.saw(events)
        if self.fault == (RAISE_IN_SCORING, number) and events:
            time.sleep(1.0)     # as if after scoring: the event loop has gone on meanwhile
            raise RuntimeError(f"injected fault: an exception in scoring batch {number}")
        stats = BatchStats(events=len(events))
        ranked = self._score_events(events, last_of_user, stats) if events else None
        out = None
        if swap_flush is not None or flush or self.cache.needs_flush() or (
                time.monotonic() - self.flush_made_at >= self.cfg.flush_every_s):
            out = self.cache.flush()
            if swap_flush is not None:      # the old states first, then this batch's users
                out.writes = swap_flush.writes + out.writes
                out.users += swap_flush.users
                out.snapshots += swap_flush.snapshots
        if out is not None:
            self.flush_made_at = time.monotonic()
            if self.cold is not None and self.cache.pool is not None and not self.rebalancing:
                self.cache.append(out, self.cold.sweep(self.table, self.cache))
        stats.seconds = time.perf_counter() - started
        return Scored(ranked, self.writer, dead, stats, out)

    def _swap_if_asked(self) -> Flush | None:
        """A model version waiting to be served goes in now. If its states have another
        shape (another architecture), the cache is flushed and emptied first: returns that
        flush."""
        with self._next_model_lock:
            next_model, self._next_model = self._next_model, None
        if next_model is None:
            return None
        previous = self.scorer.version
        self.scorer.swap(*next_model)
        self.writer = RecommendationWriter(self.scorer.item_ids)
        # The old version is garbage now; frozen (run), the collector would never see it.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        log.info("serving model version %s (was %s)", self.scorer.version, previous)
        if self.metrics:
            self.metrics.model_swaps.inc()
            self.metrics.serving(self.scorer.version, previous)
        if self.cache.fits(self.scorer.template):
            return None
        flushed = self.cache.flush()
        self.cache.reset(self.scorer.template, cache_rows(self.cfg.state_cache_mb, self.scorer))
        return flushed

    @torch.no_grad()
    def _score_events(self, events: list[Event], last_of_user: dict[str, Event],
                      stats: BatchStats) -> Ranked:
        scorer, cache = self.scorer, self.cache
        records, entries, missing, stale = {}, {}, [], []
        for user in last_of_user:
            entry = cache.get(user)
            if entry is None:
                missing.append(user)
            else:
                entries[user] = entry
                records[user] = entry.record
                if scorer.template is not None and not scorer.in_lineage(entry.record):
                    stale.append(user)              # started by a version no longer kept
        snapshots = self._read(missing, {u: last_of_user[u].partition for u in missing},
                               records)
        rounds, touched = scorer.plan(events, records, stats)
        touched_set = set(touched)
        for user in touched:
            if user in entries:
                cache.mark_dirty(user)      # dirty users are never evicted for the new ones
        to_load = [u for u in missing if u in touched_set] + [u for u in stale
                                                              if u in touched_set]
        if to_load:
            for user in stale:
                # Rebuilt from the history, as a record read from the table would be; its old
                # snapshot is no base for anything any more.
                records[user].snapshot_at = NO_SNAPSHOT
                entries[user].durable_at = entries[user].written_snapshot = None
            loaded = scorer.load(to_load, records, snapshots, stats, writable=False)
            new_entries = []
            for user in to_load:
                if user in entries:
                    new_entries.append(entries[user])
                    continue
                durable = records[user].snapshot_at if records[user].snapshot_at >= 0 else None
                entries[user] = cache.add(user, records[user], last_of_user[user].partition,
                                          durable)
                cache.mark_dirty(user)
                new_entries.append(entries[user])
            cache.scatter(new_entries, loaded)
        if self.metrics:
            self.metrics.cache_misses.inc(len(missing))
            self.metrics.cache_users.set(len(cache))
        touched_entries = [entries[u] for u in touched]
        states = cache.gather(touched_entries)
        ranked = scorer.advance(events, rounds, touched, records, states, stats)
        cache.scatter(touched_entries, states)
        return ranked

    def _read(self, users: list[str], partitions: dict[str, int], records
              ) -> dict[str, bytes]:
        """Records (into `records`) and state snapshots of users not in the cache: from a
        flush not yet written, else from the table, one multi-get per partition."""
        snapshots: dict[str, bytes] = {}
        if not users:
            return snapshots
        by_partition: dict[int, list[str]] = {}
        for user in users:
            by_partition.setdefault(partitions[user], []).append(user)
        for partition, part_users in by_partition.items():
            heads = self._read_keys(partition, [u.encode() for u in part_users])
            for user, head in zip(part_users, heads):
                records[user] = UserRecord.from_bytes(head) if head is not None else UserRecord()
            wanted = [u for u in part_users if records[u].snapshot_at > 0]
            blobs = self._read_keys(partition, [snapshot_key(u.encode()) for u in wanted])
            snapshots.update((u, blob) for u, blob in zip(wanted, blobs) if blob is not None)
        return snapshots

    def _read_keys(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        """The table's values, or a flush's that is not in the table yet."""
        if not keys:
            return []
        return [self.cache.read_unwritten(key) or value
                for key, value in zip(keys, self.table.read_many(partition, keys))]

    # -- recommendations on request ------------------------------------------------------
    def answer(self, query: Query) -> dict:
        """A user's top k now (any thread; streams/worker/queries.py): computed in the model
        thread between batches, so from the state the last batch left. NotReady while this
        worker cannot answer from current state."""
        if not self.started or self.failure is not None or self.stopping:
            raise NotReady("the worker is starting or stopping")
        if self.rebalancing or (self.recovery is not None and (
                not self.recovery.completed.is_set() or self.recovery.in_recovery)):
            raise NotReady("the worker is restoring its partitions (a rebalance)")
        future: Future = Future()
        with self.requests_lock:
            self.requests.append((query, future))
            if not self.requests_job:
                self.requests_job = True
                self.executor.submit(self._answer_waiting)
        try:
            return future.result(timeout=self.cfg.query_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise NotReady(f"no answer within {self.cfg.query_timeout_s} s") from None

    def _answer_waiting(self) -> None:
        """The model thread: every request waiting, in one job (under load many arrive while
        a batch is scored; one hand-over each would put each behind the next batch)."""
        with self.requests_lock:
            waiting, self.requests_job = list(self.requests), False
            self.requests.clear()
        for query, future in waiting:
            if not future.set_running_or_notify_cancel():
                continue                        # its caller gave up waiting
            try:
                future.set_result(self._answer(query))
            except Exception as exc:            # noqa: BLE001 - the caller gets it, not us
                future.set_exception(exc)

    @torch.no_grad()
    def _answer(self, query: Query) -> dict:
        user, scorer = query.user_id, self.scorer
        exclude = self.cfg.exclude_seen if query.exclude_seen is None else query.exclude_seen
        partition = partition_of(user, self.cfg.partitions)
        entry = self.cache.entries.get(user)       # not get(): a request is not a click
        if entry is not None:
            record, user_repr = entry.record, self.cache.part(entry, USER_REPR)
        else:
            records: dict[str, UserRecord] = {}
            snapshots = self._read([user], {user: partition}, records)
            record, user_repr = records[user], None
            if record.events_applied and scorer.template is not None:
                user_repr = scorer.load([user], records, snapshots, BatchStats(),
                                        writable=False)[USER_REPR]
        out = {"user_id": user, "model_version": scorer.version, "partition": partition}
        if not record.events_applied:
            out.update(known_user=False, source="popular", last_event=None, items=[
                {"item_id": item, "score": float(count), "rank": rank + 1}
                for rank, (item, count) in enumerate(self.popular.top(query.k))])
            return out
        ranked, how = scorer.rank_user(record, user_repr, query.k, exclude)
        out.update(known_user=True, source=how, events_applied=record.events_applied,
                   last_event={"event_id": record.last_event_id, "offset": record.last_offset,
                               "timestamp": record.last_event_time},
                   items=[{"item_id": item, "score": score, "rank": rank + 1}
                          for rank, (item, score) in enumerate(ranked)])
        return out

    # -- reporting -----------------------------------------------------------------------
    def observe(self, job: Job, scored: Scored) -> None:
        m, stats, now = self.metrics, scored.stats, time.time()
        m.events.labels("applied").inc(stats.applied)
        m.events.labels("duplicate").inc(stats.duplicates)
        m.unknown_items.inc(stats.unknown_items)
        if not job.message_events:
            return
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


def cache_rows(cache_mb: float, scorer) -> int:
    """Users the state cache holds in cache_mb (their state rows; records are extra)."""
    if scorer.template is None:
        return max(2, int(cache_mb * 2 ** 20 // 1024))      # window models: records only
    row = state_size(scorer.template) * scorer.state_dtype.itemsize
    return max(2, int(cache_mb * 2 ** 20 // row))
