"""The trainer's replay buffer: recent item sequences per user, on disk (RocksDB, rocksdict).

- Each user's last `max_seq_len` raw item ids live in RocksDB, so the disk holds the data and
  memory holds only the sampling index.
- Sampling mixes recent activity with an older reservoir so fine-tuning does not forget:
  half the users come from the last `recent_users` events' users, half from a uniform
  reservoir sample (Vitter's algorithm R) of `reservoir_users` over all events so far.
- The last `holdout_events` events are held out: they are the trainer's evaluation slice and
  are cut from the training sequences (for each user they are a suffix of its sequence).
Every index is bounded, whatever the stream does; it is saved with the sequences (`flush`) so
that a restarted trainer samples as before.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rocksdict import Rdict

_INDEX_KEY = b"\x00index"          # users are stored under b"u" + id, never this key


@dataclass
class BufferConfig:
    max_seq_len: int = 200
    recent_users: int = 2000
    reservoir_users: int = 2000
    holdout_events: int = 500


class ReplayBuffer:
    def __init__(self, path: str | Path, cfg: BufferConfig | None = None, seed: int = 0):
        self.cfg = cfg or BufferConfig()
        Path(path).mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path))
        self.rng = np.random.default_rng(seed)
        self.recent: deque[str] = deque(maxlen=self.cfg.recent_users)
        self.reservoir: list[str] = []
        self.holdout: deque[str] = deque()     # users of the last holdout_events events
        self.held_out = Counter()              # user -> its events in the holdout
        self.events_seen = 0
        self.indexed: dict[str, int] = {}      # "topic id/partition" -> newest offset counted
        raw = self.db.get(_INDEX_KEY)
        if raw is not None:
            self._restore(json.loads(raw))

    # -- writing ----------------------------------------------------------------------------
    def add(self, user: str, item: str, position: tuple | None = None) -> bool:
        """Append a click to the user's sequence. position = (topic id, partition, offset) of
        the click in `interactions`: one at or before the user's last stored offset in the
        same topic and partition was added already (the trainer crashed after adding it,
        before committing its offset, and reads it again), so it is skipped: False. (A topic
        created again under its name has a new id: its offsets start over.) The position is
        stored with the sequence, in one write."""
        sequence, last = self._stored(user)
        source = "/".join(map(str, position[:-1])) if position is not None else None
        if position is not None and last is not None \
                and list(position[:-1]) == last[:-1] and position[-1] <= last[-1]:
            # In the sequence already. If it came after the last flush, the restored sampling
            # index has not counted it: count it now, so that the held-out slice stays the
            # suffix of the sequences.
            if position[-1] > self.indexed.get(source, -1):
                self._count(user, source, position[-1])
            return False
        sequence.append(item)
        self.db[b"u" + user.encode()] = json.dumps({
            "items": sequence[-self.cfg.max_seq_len:],
            "position": list(position) if position is not None else last}).encode()
        self._count(user, source, position[-1] if position is not None else None)
        return True

    def _count(self, user: str, source: str | None, offset: int | None) -> None:
        """Add one event of this user to the sampling index."""
        if source is not None:
            self.indexed[source] = max(self.indexed.get(source, -1), offset)
        self.events_seen += 1
        self.recent.append(user)
        if len(self.reservoir) < self.cfg.reservoir_users:
            self.reservoir.append(user)
        else:
            slot = int(self.rng.integers(0, self.events_seen))
            if slot < self.cfg.reservoir_users:
                self.reservoir[slot] = user
        self.holdout.append(user)
        self.held_out[user] += 1
        if len(self.holdout) > self.cfg.holdout_events:
            oldest = self.holdout.popleft()
            self.held_out[oldest] -= 1
            if not self.held_out[oldest]:
                del self.held_out[oldest]

    def flush(self) -> None:
        """Save the sampling index next to the sequences."""
        self.db[_INDEX_KEY] = json.dumps({
            "recent": list(self.recent), "reservoir": self.reservoir,
            "holdout": list(self.holdout), "events_seen": self.events_seen,
            "indexed": self.indexed}).encode()
        self.db.flush()

    def close(self) -> None:
        self.flush()
        self.db.close()

    def _restore(self, index: dict) -> None:
        self.recent.extend(index["recent"])
        self.reservoir = index["reservoir"][:self.cfg.reservoir_users]
        for user in index["holdout"][-self.cfg.holdout_events:]:
            self.holdout.append(user)
            self.held_out[user] += 1
        self.events_seen = index["events_seen"]
        self.indexed = index.get("indexed", {})

    # -- reading ----------------------------------------------------------------------------
    def sequence(self, user: str) -> list[str]:
        return self._stored(user)[0]

    def _stored(self, user: str) -> tuple[list[str], list | None]:
        """(items, last position) of a user; a buffer written before positions were kept
        stored the bare list of items."""
        raw = self.db.get(b"u" + user.encode())
        if raw is None:
            return [], None
        value = json.loads(raw)
        if isinstance(value, list):
            return value, None
        return value["items"], value.get("position")

    def training_sequence(self, user: str) -> list[str]:
        """The user's sequence without its held-out suffix."""
        sequence = self.sequence(user)
        return sequence[:len(sequence) - self.held_out.get(user, 0)]

    def sample_users(self, n: int) -> list[str]:
        """n users (with repeats), half recent, half from the reservoir."""
        pools = [p for p in (list(self.recent), self.reservoir) if p]
        if not pools:
            return []
        out = []
        for i in range(n):
            pool = pools[i % len(pools)]
            out.append(pool[int(self.rng.integers(0, len(pool)))])
        return out

    def holdout_examples(self) -> list[tuple[list[str], str]]:
        """(history, next item) of each held-out event that has a history."""
        examples = []
        for user, count in self.held_out.items():
            sequence = self.sequence(user)
            for i in range(max(1, len(sequence) - count), len(sequence)):
                examples.append((sequence[:i], sequence[i]))
        return examples
