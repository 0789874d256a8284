"""Records that the model thread has produced but the state table may not show yet.

The agent overlaps batches: while batch N's recommendations and records go out on the event
loop, batch N+1 is already being scored in the model thread, and batch N+2 may be reading the
table. A batch therefore notes, when it reads the table, how many batches had finished writing
(`read_after`); batch k's records are in that read if k < read_after. The model thread keeps
each user's newest record with the number of the batch that made it, and before scoring a batch:
  - drops the entries of batches below its read_after: the table it read holds them, and every
    later batch read the table later still;
  - lays the remaining entries (made by batches whose writes that read may not show) over what
    the table gave.
Entries live only as long as the batches in flight, so memory stays bounded.

Records handed out are copies: the finisher of an earlier batch still serialises its own.
"""

from __future__ import annotations

import dataclasses
import threading

from streams.worker.scoring import UserRecord


class UnwrittenRecords:
    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[str, tuple[UserRecord, int]] = {}

    def overlay(self, records: dict[str, UserRecord | None], read_after: int
                ) -> dict[str, UserRecord | None]:
        """The records a batch should score from; it read `records` from the table when
        read_after batches had finished writing."""
        with self._lock:
            self._records = {u: (r, k) for u, (r, k) in self._records.items() if k >= read_after}
            return {user: (dataclasses.replace(self._records[user][0]) if user in self._records
                           else record)
                    for user, record in records.items()}

    def add(self, records: dict[str, UserRecord], batch: int) -> None:
        with self._lock:
            self._records.update({user: (record, batch) for user, record in records.items()})

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
