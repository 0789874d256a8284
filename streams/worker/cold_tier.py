"""The cold tier: users idle for longer than --cold-after-s keep their record and no state.

A user's step state is 33-66 KB (MLSA4Rec-S: 16,464 floats), its record a few hundred bytes
(offsets, the last 50 items). A cold user keeps only the record, its last `history_len` items,
marked so that its next click rebuilds the state from them (`snapshot_at = NO_SNAPSHOT` and no
embedded state: `Scorer.load`'s prefill, as for a user of another model lineage); its snapshot
key is deleted, in RocksDB and with a tombstone in the changelog, so that a restore from the
changelog does not bring it back. The cost is accuracy: the state forgets what came before the
last 50 items (bench/cold_tier.py measures it on ML-1M).

Idle is measured in event time: a partition's clock is the newest click timestamp seen in it,
a user is idle when that clock is more than cold_after past its last click. With the wall clock
a replay of an old log (ML-1M is from 2000-2003) would find every user idle at once, and a fast
replay of months would find none; by event time the tier does what it would have done live,
and what the offline measurement computes. A partition without clicks does not advance, so
nobody goes cold there: waiting only delays the saving.

Off the hot path, in two halves. A scan (a thread of its own, started by the flush timer
every flush_every_s / 2, one at a time) walks `keys_per_flush` keys of one partition (round
robin; a cursor per partition goes on where the last one stopped) and picks candidates: it
reads every value it passes, snapshots included, which is the work the model thread must not
do. At each flush the model thread checks the candidates against the newest values (a flush
not yet written, the cache) and appends the writes to that flush: they go to the changelog and
RocksDB on the flush's own path (changelog first), ordered after every earlier write of the
same keys, and a user's next click reads the cold record from the cache's `unwritten` until
the table has it. Dirty users of the state cache are never swept; a clean one is dropped from
the cache first (as an eviction would). Crash safety: the record is written cold before its
snapshot is deleted. A crash after the record and before the tombstone leaves a snapshot no
record points to (ignored by `Scorer.load`); the sweep deletes such snapshots when it passes
their key. A crash before the record leaves the user as it was; marking it cold again is the
same write, so nothing applies twice, and nothing the user clicked is lost (its offsets and
items are in the record the sweep rewrites)."""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from collections import deque

from streams.worker.scoring import NO_SNAPSHOT, SNAPSHOT_SUFFIX, UserRecord, snapshot_key

log = logging.getLogger(__name__)

# Keys a scan visits (records and snapshots: ~256 users, ~17 MB read where all are hot), and
# candidates one flush checks. A full pass over a million users then takes about an hour at a
# scan a second: plenty for an idle time of days.
KEYS_PER_FLUSH = 512


def is_cold(record: UserRecord) -> bool:
    """A record whose state is to be rebuilt from its history: what the sweep leaves."""
    return record.snapshot_at == NO_SNAPSHOT and not record.state and record.events_applied > 0


def cold_record(record: UserRecord, history_len: int) -> UserRecord:
    return dataclasses.replace(record, state=b"", snapshot_at=NO_SNAPSHOT,
                               history=list(record.history[-history_len:]))


def _parsed(value: bytes) -> UserRecord | None:
    """The record, or None (logged) if it does not parse: the sweep leaves it alone; a click
    of its user meets the same error where it is a click's to report."""
    try:
        return UserRecord.from_bytes(value)
    except (ValueError, struct.error) as exc:         # json's errors are ValueErrors
        log.warning("cold tier: a record of %d bytes does not parse (%s); left alone",
                    len(value), exc)
        return None


class ColdSweep:
    """Two halves: `scan` walks the table's keys and picks candidates (a thread of its own:
    it reads every snapshot it passes, 33-66 KB each); `sweep` (the model thread, at a flush)
    checks each candidate against the newest values and the cache and makes the writes."""

    def __init__(self, cold_after_s: float, history_len: int,
                 keys_per_flush: int = KEYS_PER_FLUSH):
        if cold_after_s <= 0:
            raise ValueError(f"cold_after_s must be positive, not {cold_after_s}")
        if keys_per_flush < 1:
            raise ValueError(f"keys_per_flush must be at least 1, not {keys_per_flush}")
        self.cold_after_ms = int(cold_after_s * 1000)
        self.history_len, self.keys_per_flush = history_len, keys_per_flush
        self.clock: dict[int, int] = {}         # partition -> newest click timestamp (ms)
        self.cursor: dict[int, bytes] = {}      # partition -> the next key to visit
        self.turn = 0                           # round robin over the partitions
        self.candidates: deque[tuple[int, bytes]] = deque()    # (partition, key) from scans
        self.generation = 0                     # reset() makes scans under way void
        self.scanning = threading.Lock()
        self.made_cold = 0                      # users made cold (this process)
        self.snapshots_deleted = 0

    def saw(self, events) -> None:
        """The model thread's events of a batch advance their partitions' clocks."""
        clock = self.clock
        for event in events:
            if event.timestamp_ms > clock.get(event.partition, 0):
                clock[event.partition] = event.timestamp_ms

    def reset(self) -> None:
        """A rebalance: partitions may have moved; clocks start again from the next clicks."""
        self.generation += 1
        self.clock.clear()
        self.cursor.clear()
        self.candidates.clear()

    def idle(self, partition: int, record: UserRecord) -> bool:
        # last_event_time 0: written before records carried it; its idle time is unknown.
        return not is_cold(record) and record.last_event_time > 0 and \
            self.clock.get(partition, 0) - record.last_event_time > self.cold_after_ms

    def scan(self, table) -> int:
        """The next keys_per_flush keys of one partition (round robin): idle users' records
        and snapshots that cold records left behind become candidates. Any thread, one scan
        at a time; returns how many keys it visited (0: nothing to do, or one under way)."""
        if len(self.candidates) >= self.keys_per_flush or not self.scanning.acquire(False):
            return 0
        try:
            generation, partitions = self.generation, sorted(self.clock)
            if not partitions:
                return 0
            partition = partitions[self.turn % len(partitions)]
            self.turn += 1
            keys, next_key = table.scan(partition, self.cursor.get(partition, b""),
                                        self.keys_per_flush)
            records = [k for k in keys if not k.endswith(SNAPSHOT_SUFFIX)]
            owners = [k[:-len(SNAPSHOT_SUFFIX)] for k in keys if k.endswith(SNAPSHOT_SUFFIX)]
            if not keys or not table.is_open(partition):    # revoked meanwhile
                return len(keys)
            stored = dict(zip(records + owners, table.read_many(partition, records + owners)))
            found = []
            for key in records:
                record = _parsed(stored[key]) if stored[key] is not None else None
                if record is not None and self.idle(partition, record):
                    found.append((partition, key))
            for owner in owners:
                record = _parsed(stored[owner]) if stored[owner] is not None else None
                if record is not None and is_cold(record):
                    found.append((partition, snapshot_key(owner)))
            if generation == self.generation:           # no rebalance meanwhile
                if next_key is None:
                    self.cursor.pop(partition, None)    # the end: the next pass starts again
                else:
                    self.cursor[partition] = next_key
                self.candidates.extend(found)
            return len(keys)
        except Exception as exc:        # noqa: BLE001 - a background scan must not stop the worker
            log.warning("cold tier: a scan failed (%r); the next one goes on", exc)
            return 0
        finally:
            self.scanning.release()

    def sweep(self, table, cache) -> list[tuple[int, bytes, bytes | None]]:
        """The writes (partition, key, value; None = delete) for the candidates the scans
        found, checked against the newest values now. table: StateTable; cache: StateCache.
        The model thread, at a flush (its writes go with it)."""
        by_partition: dict[int, list[bytes]] = {}
        for _ in range(min(len(self.candidates), self.keys_per_flush)):
            partition, key = self.candidates.popleft()
            by_partition.setdefault(partition, []).append(key)
        writes: list[tuple[int, bytes, bytes | None]] = []
        for partition, keys in by_partition.items():
            if table.is_open(partition):
                writes += self._sweep(table, cache, partition, keys)
        self.snapshots_deleted += sum(v is None for _, _, v in writes)
        if writes:
            log.debug("cold tier: %d writes", len(writes))
        return writes

    def _sweep(self, table, cache, partition: int, keys: list[bytes]):
        writes: list[tuple[int, bytes, bytes | None]] = []
        records = [k for k in keys if not k.endswith(SNAPSHOT_SUFFIX)]
        snapshots = [k for k in keys if k.endswith(SNAPSHOT_SUFFIX)]
        owners = [k[:-len(SNAPSHOT_SUFFIX)] for k in snapshots]
        current = self._current(table, cache, partition, records + owners)
        for key in records:
            user, value = key.decode(), current[key]
            entry = cache.entries.get(user)
            if value is None or (entry is not None and entry.dirty):
                continue
            record = _parsed(value)
            if record is None or not self.idle(partition, record):
                continue
            if entry is not None:
                cache.drop(user)
            # The record first: a crash before the delete leaves a snapshot nothing reads.
            writes.append((partition, key, cold_record(record, self.history_len).to_bytes()))
            writes.append((partition, snapshot_key(key), None))
            self.made_cold += 1
        swept = {k for _, k, _ in writes}
        for key, owner in zip(snapshots, owners):
            value = current[owner]
            if key in swept or owner.decode() in cache.entries:
                continue
            record = None if value is None else _parsed(value)
            if record is not None and is_cold(record):
                writes.append((partition, key, None))   # left by a crash mid-sweep
        return writes

    @staticmethod
    def _current(table, cache, partition: int, keys: list[bytes]) -> dict[bytes, bytes | None]:
        """The newest value of each key: a flush not yet in the table, else the table."""
        keys = list(dict.fromkeys(keys))
        stored = table.read_many(partition, keys) if keys else []
        return {k: cache.read_unwritten(k) or v for k, v in zip(keys, stored)}
