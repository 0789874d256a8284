"""Hot users' records and step states, kept in memory and written back to the table in flushes.

The `user-state` table (streams/worker/tables.py) is the durable copy; this cache is what the
model thread reads and writes per click, as Kafka Streams' record cache sits in front of its
state stores. A user's states live as one row of a preallocated pool (one tensor per state
key, in the storage dtype), so a batch gathers its users' rows with one `index_select` per key
and scatters them back with one `index_copy_`: no per-click unpack and pack of bytes.

A flush (`StateCache.flush`) serialises every user changed since the last one, once however
many clicks it covers: the record (a few hundred bytes: offsets, the last items), and the
state snapshot only every `snapshot_every` clicks of that user. Between snapshots the record's
history holds the items applied since, so the state is the snapshot stepped over them
(`Scorer.load`). The agent writes a flush to the table before it lets Faust commit the offsets
of the events it covers, so a crash replays from stored states.

Bounds: `capacity` users (rows). Only clean users (in the table, or in a flush on its way
there, which `unwritten` keeps readable) are evicted, least recently used first; the agent
flushes when more than half of the rows are dirty, so a batch always finds room, and once
`flush_max_users` are (a flush's cost is per user, and it delays the batch it ends).

Used from the model thread only, except `flush_written` (the event loop).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from model.state import rows_to_bytes
from streams.worker.scoring import (HISTORY_LEN, NO_SNAPSHOT, UserRecord, snapshot_key,
                                    snapshot_to_bytes)


MAX_HISTORY_KEPT = 1024


@dataclass
class Entry:
    record: UserRecord              # header only: `state` is always b"" here
    slot: int                       # row of the pool; -1 for models without a step state
    partition: int                  # the table partition the user's record lives in
    dirty: bool = False
    # events_applied of the newest snapshot known to be in the table (or 0: the initial state,
    # nothing stored); None = none is (a state rebuilt or read from an embedded record).
    durable_at: int | None = None
    written_snapshot: tuple[int, int] | None = None     # (snapshot_at, flush number) in flight


@dataclass
class Flush:
    number: int
    # (partition, key, value); value None: a delete (the cold tier's, streams/worker/cold_tier.py)
    writes: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    users: int = 0
    snapshots: int = 0

    @property
    def bytes(self) -> int:
        return sum(len(key) + len(value or b"") for _, key, value in self.writes)


class StateCache:
    def __init__(self, template: dict[str, torch.Tensor] | None, dtype, capacity: int,
                 snapshot_every: int = 16, history_len: int = HISTORY_LEN,
                 flush_max_users: int = 512):
        if capacity < 2:
            raise ValueError(f"state cache of {capacity} users: too small")
        if flush_max_users < 1:
            raise ValueError(f"flush_max_users must be at least 1, not {flush_max_users}")
        self.flush_max_users = flush_max_users
        if not 1 <= snapshot_every <= history_len // 2:
            # A crash between a flush's record and snapshot writes leaves the previous
            # snapshot: the history must still reach back to it.
            raise ValueError(f"snapshot_every must be in 1..{history_len // 2}, "
                             f"not {snapshot_every}")
        self.capacity, self.dtype = capacity, dtype
        self.snapshot_every, self.history_len = snapshot_every, history_len
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.dirty: set[str] = set()
        self.flushes = 0                       # flushes made
        self._written = 0                      # flushes the event loop has written
        self._written_lock = threading.Lock()
        self.unwritten: dict[bytes, tuple[bytes, int]] = {}   # key -> (value, flush number)
        self._forgotten_through = 0            # `unwritten` holds no flush up to this one
        self.reset(template)

    # -- the pool ------------------------------------------------------------------------
    def reset(self, template, capacity: int | None = None) -> None:
        """Empty, for states shaped like `template` (None: the model keeps no step state),
        `capacity` users (default: as before). Dirty users must have been flushed first."""
        self.template = template
        self.capacity = capacity or self.capacity
        # One (users, state floats) block, keys side by side in sorted order (model/state.py's
        # layout): a batch's rows are one index_select, a user's snapshot one row's bytes.
        self.layout = [] if template is None else [
            (key, value.shape[1:], value[0].numel()) for key, value in sorted(template.items())]
        size = sum(n for _, _, n in self.layout)
        self.pool = None if template is None else torch.zeros((self.capacity, size),
                                                              dtype=self.dtype)
        self.entries.clear()
        self.dirty.clear()
        self.free = list(range(self.capacity - 1, -1, -1))

    def fits(self, template) -> bool:
        if (template is None) != (self.template is None):
            return False
        return template is None or (template.keys() == self.template.keys() and all(
            template[k].shape[1:] == self.template[k].shape[1:] for k in template))

    def gather(self, entries: list[Entry]) -> "Rows | None":
        """The batched fp32 state of these users, row i = entries[i]: views into one block."""
        if self.pool is None:
            return None
        index = torch.tensor([e.slot for e in entries], dtype=torch.long)
        flat = self.pool.index_select(0, index).float()
        return Rows(flat, self.layout)

    def part(self, entry: Entry, key: str) -> torch.Tensor | None:
        """One state key of one user's row, fp32, shaped (1, ...) (a request needs only the
        user's representation: no gather of its whole state)."""
        if self.pool is None:
            return None
        offset = 0
        for name, shape, n in self.layout:
            if name == key:
                return self.pool[entry.slot, offset:offset + n].float().view(1, *shape)
            offset += n
        raise KeyError(key)

    def scatter(self, entries: list[Entry], states) -> None:
        if self.pool is None or not entries:
            return
        index = torch.tensor([e.slot for e in entries], dtype=torch.long)
        if isinstance(states, Rows):
            flat = states.block()
        else:
            flat = torch.cat([states[key].reshape(len(entries), -1)
                              for key, _, _ in self.layout], dim=1)
        self.pool.index_copy_(0, index, flat.to(self.dtype))

    # -- users ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def get(self, user: str) -> Entry | None:
        entry = self.entries.get(user)
        if entry is not None:
            self.entries.move_to_end(user)
        return entry

    def add(self, user: str, record: UserRecord, partition: int, durable_at: int | None
            ) -> Entry:
        """A user read from the table (or new): a row for it, evicting a clean user if full."""
        slot = -1
        if len(self.entries) >= self.capacity:
            self._evict_one()
        if self.pool is not None:
            slot = self.free.pop()
        record.state = b""
        entry = Entry(record, slot, partition, durable_at=durable_at)
        self.entries[user] = entry
        return entry

    def _evict_one(self) -> None:
        for user, entry in self.entries.items():       # least recently used first
            if not entry.dirty:
                del self.entries[user]
                if entry.slot >= 0:
                    self.free.append(entry.slot)
                return
        raise RuntimeError("state cache: every user is dirty; flush before adding more")

    def drop(self, user: str) -> None:
        """Forget a clean user (the cold tier makes it cold in the table)."""
        entry = self.entries[user]
        if entry.dirty:
            raise RuntimeError(f"state cache: {user!r} is dirty; flush it before dropping it")
        del self.entries[user]
        if entry.slot >= 0:
            self.free.append(entry.slot)

    def mark_dirty(self, user: str) -> None:
        self.entries[user].dirty = True
        self.dirty.add(user)

    def needs_flush(self) -> bool:
        """More than half the rows dirty (flush, so the next batch has room), or as many
        users as one flush should cover."""
        return len(self.dirty) > self.capacity // 2 or len(self.dirty) >= self.flush_max_users

    def drop_all(self) -> int:
        """Forget every user (a rebalance: the table is the truth again). Returns how many
        dirty users were dropped, which the agent's flush-before-revoke makes zero."""
        lost = len(self.dirty)
        self.reset(self.template)
        return lost

    # -- flushes -------------------------------------------------------------------------
    def flush(self) -> Flush:
        """Every dirty user's record, and the snapshots that are due, as table writes."""
        self.forget_written()
        self.flushes += 1
        out = Flush(self.flushes)
        users = [u for u in self.entries if u in self.dirty]      # LRU order: deterministic
        due = [u for u in users if self._snapshot_due(self.entries[u])]
        blobs = {}
        if due and self.pool is not None:
            index = torch.tensor([self.entries[u].slot for u in due], dtype=torch.long)
            blobs = dict(zip(due, rows_to_bytes(self.pool.index_select(0, index), self.dtype)))
        written = self.written()
        for user in users:
            entry = self.entries[user]
            record = entry.record
            if entry.written_snapshot is not None and entry.written_snapshot[1] <= written:
                entry.durable_at, entry.written_snapshot = entry.written_snapshot[0], None
            if user in blobs:
                record.snapshot_at = record.events_applied
                entry.written_snapshot = (record.snapshot_at, out.number)
            key = user.encode()
            # The record first, then its snapshot: a crash between the two leaves the older
            # snapshot, which the history still reaches back to (_history_to_keep).
            record.history = record.history[-self._history_to_keep(entry):]
            value = record.to_bytes()
            out.writes.append((entry.partition, key, value))
            if user in blobs:
                value = snapshot_to_bytes(record.snapshot_at, record.model_version, blobs[user])
                out.writes.append((entry.partition, snapshot_key(key), value))
                out.snapshots += 1
            entry.dirty = False
        out.users = len(users)
        self.dirty.clear()
        for _, key, value in out.writes:
            self.unwritten[key] = (value, out.number)
        return out

    def append(self, flush: Flush, writes: list[tuple[int, bytes, bytes | None]]) -> None:
        """More writes for `flush`, after its own (the cold tier's): readable from `unwritten`
        until written, as the flush's are. Deletes are not kept there: a key deleted by a
        flush in flight reads as the table's value until then, which only a record pointing
        to it would read, and the record written before the delete points to none."""
        flush.writes += writes
        for _, key, value in writes:
            if value is not None:
                self.unwritten[key] = (value, flush.number)

    def _snapshot_due(self, entry: Entry) -> bool:
        record = entry.record
        if self.pool is None:
            return False
        if record.snapshot_at == NO_SNAPSHOT:          # rebuilt, or from an embedded record
            return True
        return record.events_applied - record.snapshot_at >= self.snapshot_every

    def _history_to_keep(self, entry: Entry) -> int:
        """The last history_len items, or all since the newest snapshot known to be in the
        table if that is more (a user that clicked more than that since)."""
        if entry.durable_at is None or self.pool is None:
            return self.history_len
        since = entry.record.events_applied - entry.durable_at
        # Bounded: a user clicking thousands of times per flush (a bot) keeps a record of at
        # most ~10 KB; should a crash then fall between its record and its snapshot, its state
        # is rebuilt from the items kept instead of replayed exactly.
        return max(self.history_len, min(since, MAX_HISTORY_KEPT))

    def flush_written(self, number: int) -> None:
        """The event loop has written flush `number` (and all before it) to the table."""
        with self._written_lock:
            self._written = max(self._written, number)

    def written(self) -> int:
        with self._written_lock:
            return self._written

    def forget_written(self) -> None:
        """Drop what the table now holds from `unwritten` (once per batch)."""
        written = self.written()
        if written == self._forgotten_through:
            return
        self._forgotten_through = written
        self.unwritten = {k: v for k, v in self.unwritten.items() if v[1] > written}

    def read_unwritten(self, key: bytes) -> bytes | None:
        """A value of a flush not yet in the table (its user may have been evicted since)."""
        found = self.unwritten.get(key)
        return None if found is None else found[0]


class Rows(dict):
    """A batch's states as views into one (users, state floats) block (`StateCache.gather`).
    Steps write into the views in place; a key the step replaced by a new tensor is copied
    back by `block()`."""

    def __init__(self, flat: torch.Tensor, layout):
        self.flat, self.layout, self.views = flat, layout, {}
        offset = 0
        for key, shape, n in layout:
            self.views[key] = flat[:, offset:offset + n].view(flat.shape[0], *shape)
            offset += n
        super().__init__(self.views)

    def block(self) -> torch.Tensor:
        for key, view in self.views.items():
            if self[key] is not view:
                view.copy_(self[key])
                self[key] = view            # the block is the one copy from now on
        return self.flat

    # A round of a batch steps only the users with an event in it: two copies of one block
    # instead of two per state key (a user with many clicks in a batch makes many rounds).
    def select(self, index: torch.Tensor) -> "Rows":
        return Rows(self.block().index_select(0, index), self.layout)

    def put(self, index: torch.Tensor, rows: "Rows") -> None:
        self.block().index_copy_(0, index, rows.block())
