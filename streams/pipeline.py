"""Records that the model thread has produced but the state table does not hold yet.

The agent overlaps batches: while batch N's recommendations and records go out on the event
loop, batch N+1 is already being scored in the model thread. Batch N+1 read its records from
the table before batch N wrote them, so the model thread lays the unwritten records over what
the table gave (`overlay`) before scoring. An entry leaves once the table holds that very
record (`written`); a newer record of the same user, made meanwhile, stays.

Records handed out are copies: the finisher of batch N still serialises its own objects.
"""

from __future__ import annotations

import dataclasses
import threading

from streams.scoring import UserRecord


class UnwrittenRecords:
    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[str, UserRecord] = {}

    def overlay(self, records: dict[str, UserRecord | None]) -> dict[str, UserRecord | None]:
        with self._lock:
            return {user: (dataclasses.replace(self._records[user]) if user in self._records
                           else record)
                    for user, record in records.items()}

    def add(self, records: dict[str, UserRecord]) -> None:
        with self._lock:
            self._records.update(records)

    def written(self, records: dict[str, UserRecord]) -> None:
        with self._lock:
            for user, record in records.items():
                if self._records.get(user) is record:
                    del self._records[user]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
