"""The scoring agent: a batch of raw events in, one Recommendation per event out.

Per batch (stream.take_events: at most batch_max events, or what came within batch_wait):
  1. decode; an event that does not decode goes to the dead-letter topic, reason in a header;
  2. read the users' records from the state table;
  3. score in the model thread (never on the event loop);
  4. send the recommendations and wait for the broker's acks;
  5. only then write the new records to the table.
A crash before 5 replays the batch from the old states: the same recommendations again (at
least once). A crash after 5 replays events that the records mark as applied: skipped.
Offsets are committed by Faust after the batch returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from schemas.codec import DecodeError, decode_interaction, encode_recommendation
from streams.scoring import Event, UserRecord
from streams.tables import as_current

log = logging.getLogger(__name__)


def to_event(message_event) -> Event:
    """Decode one Kafka message into an Event, or raise DecodeError with the reason."""
    record = decode_interaction(message_event.value)
    for name in ("user_id", "item_id", "event_id"):
        if not record.get(name):
            raise DecodeError(f"empty {name}")
    message = message_event.message
    return Event(record["user_id"], record["item_id"], record["event_id"],
                 int(record["timestamp"]), message.partition, message.offset)


class ScoringAgent:
    def __init__(self, cfg, scorer, recommendations, dead_letters, table,
                 recovery=None):
        self.cfg, self.scorer, self.table, self.recovery = cfg, scorer, table, recovery
        self.recommendations, self.dead_letters = recommendations, dead_letters
        # One model thread: batches queue behind it, the event loop stays free.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.counts = {"events": 0, "applied": 0, "dead_letters": 0, "duplicates": 0,
                       "unknown_items": 0}
        self.last_report = time.monotonic()

    async def run(self, stream) -> None:
        async for batch in stream.take_events(self.cfg.batch_max,
                                              within=self.cfg.batch_wait_ms / 1000):
            await self.handle(batch)

    async def handle(self, batch) -> None:
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
        if not events:
            return
        records = {}
        for user, message_event in last_event_of.items():
            with as_current(message_event):
                raw = self.table.get(user.encode())
            records[user] = UserRecord.from_bytes(raw) if raw is not None else None
        loop = asyncio.get_running_loop()
        updated, recs, stats = await loop.run_in_executor(
            self.executor, self.scorer.process, events, records)
        deliveries = [await self.recommendations.send(key=rec["user_id"].encode(),
                                                      value=encode_recommendation(rec))
                      for rec in recs]
        await asyncio.gather(*deliveries)
        for user, record in updated.items():
            with as_current(last_event_of[user]):
                self.table[user.encode()] = record.to_bytes()
        for name in ("events", "applied", "duplicates", "unknown_items"):
            self.counts[name] += getattr(stats, name)
        self.report()

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
