"""Scoring one batch of events: per-user records in, new records and recommendations out.

No Kafka and no Faust here, so the whole batch cycle is testable without a broker; the agent
(streams/worker/agents.py) only moves bytes between topics, the table and this class.

A user's stored record (`UserRecord`) holds the model version that started the state (built
it from scratch or from the history), the step state bytes (model/state.py), the partition
offset and id of the last applied event (so a replayed or duplicated event is not applied
twice), and the last `history_len` raw item ids (to serve the window models, to exclude seen
items, and to rebuild a state after a model change).
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from model.models.base import OOV
from model.state import states_from_bytes, states_to_bytes
from model.vocab import mask_spare_rows

HISTORY_LEN = 50


@dataclass
class Event:
    user_id: str
    item_id: str
    event_id: str
    timestamp_ms: int
    partition: int = 0
    offset: int = -1


@dataclass
class UserRecord:
    model_version: str = ""
    state: bytes = b""
    last_offset: int = -1
    last_event_id: str = ""
    offsets_of: str = ""            # the topic (its Kafka topic id) last_offset counts in
    history: list[str] = field(default_factory=list)
    events_applied: int = 0
    unknown_items: int = 0

    def to_bytes(self) -> bytes:
        """4-byte header length, a JSON header, then the raw state bytes."""
        header = asdict(self)
        del header["state"]
        head = json.dumps(header, separators=(",", ":")).encode()
        return struct.pack(">I", len(head)) + head + self.state

    @classmethod
    def from_bytes(cls, data: bytes) -> "UserRecord":
        """Fields a later version added are dropped, missing ones take their defaults: a
        record written by the previous or the next version reads."""
        (n,) = struct.unpack_from(">I", data)
        header = json.loads(data[4:4 + n])
        known = {f.name for f in fields(cls)} - {"state"}
        return cls(state=bytes(data[4 + n:]), **{k: v for k, v in header.items() if k in known})


@dataclass
class BatchStats:
    events: int = 0
    applied: int = 0
    duplicates: int = 0
    unknown_items: int = 0
    rebuilt_states: int = 0
    seconds: float = 0.0


class Scorer:
    """Advances users with one batched `step` per round, scores all items, picks the top k."""

    def __init__(self, model, item_ids: list[str], version: str, device="cpu", top_k: int = 10,
                 exclude_seen: bool = False, state_dtype=torch.float32,
                 history_len: int = HISTORY_LEN, rebuild_states: bool = True,
                 keep_states_for_versions: int = 0, offsets_of: str = ""):
        """offsets_of: identity of the topic the events' offsets count in (the worker passes
        the Kafka topic id of `interactions`): a record whose offsets count in another topic,
        one deleted and created again under the same name, does not judge these events by
        offset ("" = unknown: offsets are trusted)."""
        self.offsets_of = offsets_of
        self.model = model.to(device).eval()
        self.item_ids = list(item_ids)
        self.index = {raw: i for i, raw in enumerate(self.item_ids) if i > 0}
        self.version, self.device = version, torch.device(device)
        self.top_k, self.exclude_seen = top_k, exclude_seen
        self.state_dtype, self.history_len = state_dtype, history_len
        self.rebuild_states = rebuild_states
        self.keep_states_for_versions = keep_states_for_versions
        self.template = model.init_state(1, device=self.device) if model.steppable else None
        # Versions whose states this one keeps: itself (0) and its recent ancestors (1, 2, ...).
        self.lineage = {version: 0}

    def swap(self, model, item_ids: list[str], version: str, parent: str | None = None) -> None:
        """Serve another model version from the next batch on.

        A state started by the new version's parent, or by one of its ancestors up to
        `keep_states_for_versions` generations back, is kept: a fine-tuned child moves the
        weights a little, and rebuilding every active user after every round would cost each
        of them up to 50 steps. Older states, and states from another lineage (a new offline
        model), are rebuilt from their history when their user comes back; none are if
        rebuild_states is off."""
        if parent is not None and parent == self.version:
            self.lineage = {version: 0, **{v: age + 1 for v, age in self.lineage.items()
                                           if age + 1 <= self.keep_states_for_versions}}
        else:
            self.lineage = {version: 0}
        self.model = model.to(self.device).eval()
        self.item_ids = list(item_ids)
        self.index = {raw: i for i, raw in enumerate(self.item_ids) if i > 0}
        self.version = version
        self.template = model.init_state(1, device=self.device) if model.steppable else None

    def item_index(self, raw: str) -> int:
        return self.index.get(raw, OOV)

    # -- the batch cycle ----------------------------------------------------------------
    @torch.no_grad()
    def process(self, events: list[Event], records: dict[str, UserRecord | None]):
        """Returns (records to write, recommendations in event order, stats).

        Events of one user are applied in their order; different users advance together.
        """
        started = time.perf_counter()
        stats = BatchStats(events=len(events))
        records = {u: (r if r is not None else UserRecord()) for u, r in records.items()}
        rounds: list[list[Event]] = []          # round r = each user's r-th new event
        depth: dict[str, int] = {}
        for event in events:
            record = records.setdefault(event.user_id, UserRecord())
            if self._already_applied(record, event):
                stats.duplicates += 1
                continue
            r = depth.get(event.user_id, 0)
            depth[event.user_id] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(event)
        touched = list(depth)
        states = self._load_states(touched, records, stats)
        row_of = {user: row for row, user in enumerate(touched)}
        recommendations = []
        for round_events in rounds:
            recommendations += self._advance(round_events, records, states, row_of, stats)
        self._store_states(touched, records, states)
        position = {id(e): i for i, e in enumerate(events)}
        recommendations.sort(key=lambda rec: position[rec.pop("_event")])
        stats.seconds = time.perf_counter() - started
        return {u: records[u] for u in touched}, recommendations, stats

    def _already_applied(self, record: UserRecord, event: Event) -> bool:
        if event.event_id and event.event_id == record.last_event_id:
            return True
        return self._same_offsets(record) and 0 <= event.offset <= record.last_offset

    def _same_offsets(self, record: UserRecord) -> bool:
        return not (record.offsets_of and self.offsets_of) or record.offsets_of == self.offsets_of

    def _load_states(self, users: list[str], records, stats):
        """One batched state, row i = users[i]: stored states unpacked in one call, the others
        rebuilt from their history (new user or new model version)."""
        if self.template is None:
            for user in users:
                records[user].model_version = self.version
            return None
        stored = [u for u in users if records[u].state and (
            records[u].model_version in self.lineage or not self.rebuild_states)]
        if len(stored) == len(users):
            return states_from_bytes([records[u].state for u in users], self.template, self.device)
        unpacked = states_from_bytes([records[u].state for u in stored], self.template, self.device)
        kept = set(stored)
        others = [u for u in users if u not in kept]
        for user in others:
            records[user].model_version = self.version
        rebuilt = self._rebuild([records[u].history for u in others])
        stats.rebuilt_states += sum(bool(records[u].history) for u in others)
        # Row order = users: stored rows first, then the rebuilt ones, then permute.
        position = {u: i for i, u in enumerate(stored + others)}
        order = torch.tensor([position[u] for u in users], device=self.device)
        return {k: torch.cat([unpacked[k], rebuilt[k]]).index_select(0, order)
                for k in self.template}

    def _rebuild(self, histories: list[list[str]]):
        """States advanced over the stored histories (a new user, or a state made by another
        model version): fresh states, and those with a history in one parallel prefill pass
        rather than one step per item."""
        state = self.model.init_state(len(histories), device=self.device)
        rows = [row for row, history in enumerate(histories) if history]
        if not rows:                                    # new users only: nothing to replay
            return state
        items, lengths = self._padded([histories[row] for row in rows])
        prefilled, _ = self.model.prefill(items, lengths)
        index = torch.tensor(rows, device=self.device)
        for key, value in prefilled.items():
            state[key].index_copy_(0, index, value.to(state[key].dtype))
        return state

    def _advance(self, events: list[Event], records, states, row_of, stats):
        users = [e.user_id for e in events]
        items = torch.tensor([self.item_index(e.item_id) for e in events], device=self.device)
        for event, index in zip(events, items.tolist()):
            record = records[event.user_id]
            record.history = (record.history + [event.item_id])[-self.history_len:]
            if not self._same_offsets(record):         # the first event of a new topic
                record.last_offset = -1
            record.last_offset = max(record.last_offset, event.offset)
            record.offsets_of = self.offsets_of or record.offsets_of
            record.last_event_id = event.event_id
            record.events_applied += 1
            if index == OOV:
                record.unknown_items += 1
                stats.unknown_items += 1
        stats.applied += len(events)
        if self.template is not None:
            rows = [row_of[u] for u in users]
            if rows == list(range(len(row_of))):     # every user in order: the usual batch
                new_states, user_repr = self.model.step(states, items)
                states.update(new_states)
            else:
                index = torch.tensor(rows, device=self.device)
                new_states, user_repr = self.model.step(
                    {k: v.index_select(0, index) for k, v in states.items()}, items)
                for k, v in new_states.items():
                    states[k].index_copy_(0, index, v)
        else:
            user_repr = self._window_repr([records[u].history for u in users])
        scores = mask_spare_rows(self.model.scores(user_repr), len(self.item_ids))
        if self.exclude_seen:
            for row, user in enumerate(users):
                seen = [self.index[raw] for raw in records[user].history if raw in self.index]
                scores[row, seen] = -torch.inf
        k = min(self.top_k, len(self.item_ids) - 1)
        top_scores, top_items = torch.topk(scores, k, dim=1)
        produced_at = int(time.time() * 1000)
        return [self._recommendation(e, top_items[row].tolist(), top_scores[row].tolist(),
                                     produced_at) for row, e in enumerate(events)]

    def _window_repr(self, histories: list[list[str]]):
        """Window models (paper MLSA4Rec, SASRec): recompute over the last max_len items."""
        max_len = self.model.config.max_len
        return self.model(*self._padded([h[-max_len:] for h in histories], width=max_len))

    def _padded(self, histories: list[list[str]], width: int = 0):
        """Raw item ids -> (right-padded item indices (rows, width or the longest), lengths)."""
        width = width or max((len(h) for h in histories), default=1)
        items = torch.zeros(len(histories), width, dtype=torch.long)
        for row, history in enumerate(histories):
            items[row, :len(history)] = torch.tensor([self.item_index(raw) for raw in history],
                                                     dtype=torch.long)
        lengths = torch.tensor([len(h) for h in histories], device=self.device)
        return items.to(self.device), lengths

    def _recommendation(self, event: Event, items, scores, produced_at: int) -> dict:
        return {
            "_event": id(event),
            "user_id": event.user_id,
            "event_id": event.event_id,
            "event_timestamp": event.timestamp_ms,
            "items": [{"item_id": self.item_ids[i], "score": float(s), "rank": rank + 1}
                      for rank, (i, s) in enumerate(zip(items, scores)) if s != -math.inf],
            "model_version": self.version,
            "produced_at": produced_at,
        }

    def _store_states(self, users: list[str], records, states):
        if states is None or not users:
            return
        for user, blob in zip(users, states_to_bytes(states, self.state_dtype)):
            records[user].state = blob
