"""Scoring one batch of events: per-user records in, new records and recommendations out.

No Kafka and no Faust here, so the whole batch cycle is testable without a broker; the agent
(streams/worker/agents.py) only moves bytes between topics, the table and this class.

A user's stored record (`UserRecord`) holds the model version that started the state (built
it from scratch or from the history), the partition offset and id of the last applied event
(so a replayed or duplicated event is not applied twice), and the last `history_len` raw item
ids (to serve the window models, to exclude seen items, and to rebuild a state after a model
change). The step state itself (model/state.py) is either embedded in the record (`state`:
what `process` and versions before the state cache write) or kept as a snapshot under its own
key (`snapshot_key`), taken after `snapshot_at` events: the state is then the snapshot stepped
over the items applied since, which the record's history holds (`Scorer.load`). Step is
deterministic, so that replay gives the state back (to float rounding).

The state also carries the user's representation after its last step (`USER_REPR`, the
vector the items are scored against), so that a user's recommendations can be ranked again
without a click (the worker's `/users/{id}/recommendations`, `Scorer.rank_user`). States
stored before it was added read with that part unknown (NaN): then it is computed from the
history.

An item the serving version does not know (a title newer than it) is kept in the history but
left out of what the model reads, in every path that turns a history into a state (`read`):
the click is ranked from the state as it was, and a user who has read no known item yet is
ranked as after one unknown item. Its mean vector as an input misled the model: leaving it
out gave +0.033 HR@10 on a stream with 16% such clicks (docs/RESULTS.md, section 11). A version
that knows the item reads it wherever it rebuilds a state from the history.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from dataclasses import dataclass

import numpy as np
import torch

from model.item_index import IndexUnavailable, ItemIndex, faiss_available
from model.models.base import OOV
from model.ranking import top_k
from model.state import blob_fits, states_from_bytes, states_to_bytes
from model.traced import traced_step
from model.vocab import mask_spare_rows
from streams.worker.user_record import NO_SNAPSHOT, UserRecord  # noqa: F401 - re-exported

HISTORY_LEN = 50
# Appended to a user's key for the key of its state snapshot. 0xFF never occurs in UTF-8, so
# no user id's key can end in it: the snapshot key cannot be another user's record key.
SNAPSHOT_SUFFIX = b"\xff"
# The state key of the user's representation after its last step. Sorted last among the state
# keys (model/state.py lays rows out in key order), so a row stored without it is a prefix.
USER_REPR = "~user_repr"
_SNAPSHOT_HEAD = struct.Struct(">QH")
# How a large catalogue is ranked: "auto" = the approximate index (model/item_index.py) above
# ann_items when faiss is installed, else exact; "faiss" = the index, an error without faiss;
# "exact" = never the index.
ANN_MODES = ("auto", "faiss", "exact")
log = logging.getLogger(__name__)


def snapshot_key(user_key: bytes) -> bytes:
    return user_key + SNAPSHOT_SUFFIX


def snapshot_to_bytes(applied: int, version: str, state_blob: bytes) -> bytes:
    """A snapshot: the number of events it covers, the model version that started the state,
    then the state bytes (model/state.py)."""
    head = version.encode()
    return _SNAPSHOT_HEAD.pack(applied, len(head)) + head + state_blob


def snapshot_from_bytes(data: bytes) -> tuple[int, str, bytes]:
    """(events covered, model version, state bytes); ValueError if it does not parse."""
    if len(data) < _SNAPSHOT_HEAD.size:
        raise ValueError(f"state snapshot of {len(data)} bytes: too short")
    applied, n = _SNAPSHOT_HEAD.unpack_from(data)
    start = _SNAPSHOT_HEAD.size
    if len(data) < start + n:
        raise ValueError(f"state snapshot of {len(data)} bytes: truncated version")
    return applied, bytes(data[start:start + n]).decode(), bytes(data[start + n:])


@dataclass
class Event:
    user_id: str
    item_id: str
    event_id: str
    timestamp_ms: int
    partition: int = 0
    offset: int = -1


def _is_copy(event: Event, last_event_id: str, last_offset: int) -> bool:
    """`event` repeats what a user's last applied (or planned) event covers: the same event id,
    or an offset not past that event's. A user's clicks all come from one partition (keyed by
    user), so a lower offset there is a copy read again; -1: no offset to compare with."""
    if event.event_id and event.event_id == last_event_id:
        return True
    return 0 <= event.offset <= last_offset


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
                 keep_states_for_versions: int = 0, offsets_of: str = "",
                 trace_step: bool = False, exact_rank_items: int = 65_536,
                 ann: str = "exact", ann_items: int = 100_000, ann_probe: int = 32,
                 step_rows: int = 0):
        """offsets_of: identity of the topic the events' offsets count in (the worker passes
        the Kafka topic id of `interactions`): a record whose offsets count in another topic,
        one deleted and created again under the same name, does not judge these events by
        offset ("" = unknown: offsets are trusted).

        exact_rank_items: a catalogue of more items is ranked block by block, this many items
        at a time (model/ranking.py: the same top k, without a (batch x items) matrix).
        ann, ann_items, ann_probe: a catalogue of more than ann_items items is ranked by an
        approximate index (ANN_MODES says when), ann_probe of its lists searched per user.
        step_rows: on CPU, a batch is stepped this many users at a time (0: all at once)."""
        if exact_rank_items < 1:
            raise ValueError(f"exact_rank_items must be at least 1, not {exact_rank_items}")
        if ann not in ANN_MODES:
            raise ValueError(f"ann must be one of {ANN_MODES}, not {ann!r}")
        if ann == "faiss" and not faiss_available():
            raise IndexUnavailable("--ann faiss: faiss is not installed "
                                   "(pip install -e '.[ann]'); --ann auto ranks exactly without it")
        self.exact_rank_items = exact_rank_items
        self.ann, self.ann_items, self.ann_probe = ann, ann_items, ann_probe
        self.offsets_of = offsets_of
        # On CPU the step runs as one traced graph (model/traced.py): the GIL once per batch,
        # not once per tensor op, which the worker's event loop thread would otherwise hold up.
        self.trace_step = trace_step and torch.device(device).type == "cpu"
        # Also CPU only: a block of users whose states can stay in the core's cache from one of
        # the step's ops to the next (docs/RESULTS.md 4n: it pays for Mamba4Rec, not for
        # MLSA4Rec-S, whose step is more calls). A GPU wants the batch whole.
        if step_rows < 0:
            raise ValueError(f"step_rows must be 0 (the whole batch) or more, not {step_rows}")
        self.step_rows = step_rows if torch.device(device).type == "cpu" else 0
        self.model = model.to(device).eval()
        self.item_ids = list(item_ids)
        self.index = {raw: i for i, raw in enumerate(self.item_ids) if i > 0}
        self.version, self.device = version, torch.device(device)
        self.top_k, self.exclude_seen = top_k, exclude_seen
        self.state_dtype, self.history_len = state_dtype, history_len
        self.rebuild_states = rebuild_states
        self.keep_states_for_versions = keep_states_for_versions
        self.template = self._template(self.model)
        self.traced = self.trace_for(self.model, len(self.item_ids))
        self.ann_index = self.index_for(self.model, len(self.item_ids))
        # Versions whose states this one keeps: itself (0) and its recent ancestors (1, 2, ...).
        self.lineage = {version: 0}

    def blocked(self, n_items: int | None = None) -> bool:
        """Rank block by block: the catalogue is larger than exact_rank_items."""
        return (len(self.item_ids) if n_items is None else n_items) > self.exact_rank_items

    def trace_for(self, model, n_items: int | None = None):
        """The traced step this scorer would use for `model` serving `n_items` items (None:
        eager); without the scores when the catalogue is ranked block by block."""
        if not self.trace_step:
            return None
        n_items = model.item_embedding.num_embeddings if n_items is None else n_items
        return traced_step(model.to(self.device).eval(), self.device,
                           scores=not (self.blocked(n_items) or self.indexed(n_items)))

    def indexed(self, n_items: int) -> bool:
        """A catalogue of n_items items is ranked by the approximate index."""
        return self.ann != "exact" and n_items > self.ann_items and faiss_available()

    def index_for(self, model, n_items: int):
        """The approximate index of `model`'s item embeddings this scorer would rank n_items
        items with; None: ranked exactly. Seconds for a million items: the worker builds it
        beside the traced step, in the model watcher's thread."""
        if self.ann == "exact" or n_items <= self.ann_items:
            return None
        if not faiss_available():
            log.warning("%d items: above --ann-items %d, but faiss is not installed "
                        "(pip install -e '.[ann]'): ranked exactly, block by block",
                        n_items, self.ann_items)
            return None
        return ItemIndex.build(model.item_embedding.weight, n_items, probe=self.ann_probe,
                               threads=torch.get_num_threads())

    def swap(self, model, item_ids: list[str], version: str, parent: str | None = None,
             traced=False, ann_index=False) -> None:
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
        self.template = self._template(self.model)
        # traced: from trace_for(model) (False: trace here)
        self.traced = self.trace_for(self.model, len(self.item_ids)) if traced is False \
            else traced
        # ann_index: from index_for(model) (False: build here); a new version's embeddings
        # (new weights, new items) always get a new index.
        self.ann_index = self.index_for(self.model, len(self.item_ids)) \
            if ann_index is False else ann_index

    def _template(self, model):
        """One user's initial state, USER_REPR included; None for window models. A user who
        has read no item the version knows is ranked as after one unknown (OOV) item."""
        if not model.steppable:
            return None
        state = model.init_state(1, device=self.device)
        if USER_REPR in state or sorted(state)[-1] > USER_REPR:
            raise ValueError(f"state keys {sorted(state)}: {USER_REPR!r} must sort last")
        _, state[USER_REPR] = model.step(model.init_state(1, device=self.device),
                                         torch.tensor([OOV], device=self.device))
        return state

    def _init_states(self, n: int):
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in self.template.items()}

    def read(self, history: list[str]) -> list[int]:
        """The item indices the model reads of a history: an item this version does not know
        is left out (its mean vector as an input misleads the model: RESULTS 11)."""
        return [self.index[raw] for raw in history if raw in self.index]

    def _with_repr(self, blob: bytes) -> bytes | None:
        """A stored state row as this version reads it: as it is, or, stored before USER_REPR
        was part of the state, with that part NaN (unknown); None if it fits neither."""
        if blob_fits(blob, self.template):
            return blob
        model_only = {k: v for k, v in self.template.items() if k != USER_REPR}
        if not blob_fits(blob, model_only):
            return None
        dtype = np.float16 if blob[0] == 2 else np.float32
        return blob + np.full(self.template[USER_REPR].shape[1], np.nan, dtype).tobytes()

    def item_index(self, raw: str) -> int:
        return self.index.get(raw, OOV)

    # -- the batch cycle ----------------------------------------------------------------
    @torch.no_grad()
    def process(self, events: list[Event], records: dict[str, UserRecord | None]):
        """The batch cycle without a cache: records with their states embedded in, the same
        out. Returns (records to write, recommendations (dicts) in event order, stats).

        Events of one user are applied in their order; different users advance together.
        """
        started = time.perf_counter()
        stats = BatchStats(events=len(events))
        records = {u: (r if r is not None else UserRecord()) for u, r in records.items()}
        for event in events:
            records.setdefault(event.user_id, UserRecord())
        rounds, touched = self.plan(events, records, stats)
        states = self.load(touched, records, {}, stats)
        ranked = self.advance(events, rounds, touched, records, states, stats)
        for user in touched:
            records[user].history = records[user].history[-self.history_len:]
        if states is not None and touched:
            for user, blob in zip(touched, states_to_bytes(states, self.state_dtype)):
                records[user].state, records[user].snapshot_at = blob, NO_SNAPSHOT
        stats.seconds = time.perf_counter() - started
        return {u: records[u] for u in touched}, ranked.as_dicts(self.item_ids), stats

    def plan(self, events: list[Event], records, stats) -> tuple[list[list[Event]], list[str]]:
        """Rounds (round r = each user's r-th new event) and the users they touch; events
        already applied (replays, duplicates) are counted and left out. "Applied" includes
        the events planned before in this batch: a message fetched twice (before and after a
        recovery's seek) can sit twice in one batch, and its second copy must not be stepped
        over the first (the record says nothing of either until the batch is applied)."""
        rounds: list[list[Event]] = []
        depth: dict[str, int] = {}
        planned: dict[str, Event] = {}          # the user's last event planned in this batch
        for event in events:
            before = planned.get(event.user_id)
            if self._already_applied(records[event.user_id], event) or (
                    before is not None and _is_copy(event, before.event_id, before.offset)):
                stats.duplicates += 1
                continue
            planned[event.user_id] = event
            r = depth.get(event.user_id, 0)
            depth[event.user_id] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(event)
        return rounds, list(depth)

    def _already_applied(self, record: UserRecord, event: Event) -> bool:
        return _is_copy(event, record.last_event_id,
                        record.last_offset if self._same_offsets(record) else -1)

    def _same_offsets(self, record: UserRecord) -> bool:
        return not (record.offsets_of and self.offsets_of) or record.offsets_of == self.offsets_of

    def in_lineage(self, record: UserRecord) -> bool:
        """The record's state was started by this version or one it keeps states of."""
        return record.model_version in self.lineage or not self.rebuild_states

    def load(self, users: list[str], records, snapshots: dict[str, bytes], stats,
             writable: bool = True):
        """One batched state, row i = users[i], from what their records say:
          - a state embedded in the record (`process`, and records of earlier versions);
          - a snapshot (snapshots[user], or the initial state when snapshot_at is 0)
            stepped over the items applied since, which the record's history holds;
          - else (a new user, a state of another model version, a snapshot missing)
            rebuilt from the history in one parallel prefill pass.
        Records of rebuilt states get this version and NO_SNAPSHOT (a snapshot is due).
        writable=False: the caller only copies the rows out (the state cache), so new users'
        rows may be views of the initial state instead of copies."""
        if self.template is None:
            for user in users:
                records[user].model_version = self.version
            return None
        if not users:
            return {k: v[:0].clone() for k, v in self.template.items()}
        blobs, fresh, rebuild, replay = {}, [], [], {}
        for user in users:
            record = records[user]
            embedded = self._with_repr(record.state) if record.state else None
            if embedded and self.in_lineage(record):
                blobs[user] = embedded
            elif record.snapshot_at >= 0 and self.in_lineage(record):
                applied, blob = record.snapshot_at, None
                if applied > 0:
                    if user not in snapshots:
                        rebuild.append(user)
                        continue
                    applied, started_by, blob = snapshot_from_bytes(snapshots[user])
                    # A crash between a record and its snapshot can leave a snapshot of an
                    # older lineage, or of another architecture, under the key.
                    blob = self._with_repr(blob)
                    if (started_by not in self.lineage and self.rebuild_states) or blob is None:
                        rebuild.append(user)
                        continue
                pending = record.events_applied - applied
                if not 0 <= pending <= len(record.history):
                    rebuild.append(user)
                    continue
                record.snapshot_at = applied
                if blob is None:
                    fresh.append(user)
                else:
                    blobs[user] = blob
                if pending:
                    replay[user] = record.history[len(record.history) - pending:]
            elif not record.history and record.events_applied == 0:
                fresh.append(user)                  # a new user: nothing to rebuild
                record.model_version, record.snapshot_at = self.version, 0
            else:
                rebuild.append(user)
        for user in rebuild:
            records[user].model_version, records[user].snapshot_at = self.version, NO_SNAPSHOT
        stats.rebuilt_states += sum(bool(records[u].history) for u in rebuild)
        parts, order = [], []
        if blobs:
            parts.append(states_from_bytes(list(blobs.values()), self.template, self.device))
            order += list(blobs)
        if fresh:       # copies of the initial state: cheaper than building n of them
            parts.append({k: v.expand(len(fresh), *v.shape[1:])
                          for k, v in self.template.items()})
            order += fresh
        if rebuild:
            parts.append(self._rebuild([records[u].history[-self.history_len:]
                                        for u in rebuild]))
            order += rebuild
        if order == users and len(parts) == 1:
            # Never the template itself where the caller steps on it (step works in place).
            states = {k: v.clone() if writable or replay else v for k, v in parts[0].items()}
        else:
            position = {u: i for i, u in enumerate(order)}
            index = torch.tensor([position[u] for u in users], device=self.device)
            states = {k: torch.cat([p[k] for p in parts]).index_select(0, index)
                      for k in self.template}
        if replay:
            row = {u: i for i, u in enumerate(users)}
            self._replay(states, [row[u] for u in replay], list(replay.values()))
        return states

    def _replay(self, states, rows: list[int], items: list[list[str]]) -> None:
        """Step rows of `states` over their items (the clicks applied since a snapshot)."""
        read = [self.read(seq) for seq in items]
        for r in range(max(len(i) for i in read)):
            active = [(row, seq[r]) for row, seq in zip(rows, read) if r < len(seq)]
            index = torch.tensor([row for row, _ in active], device=self.device)
            step_items = torch.tensor([item for _, item in active], device=self.device)
            new_states, user_repr = self.model.step(
                {k: v.index_select(0, index) for k, v in states.items() if k != USER_REPR},
                step_items)
            new_states[USER_REPR] = user_repr
            for k, v in new_states.items():
                states[k].index_copy_(0, index, v)

    def _rebuild(self, histories: list[list[str]]):
        """States advanced over the stored histories (a new user, or a state made by another
        model version): fresh states, and those with a history in one parallel prefill pass
        rather than one step per item."""
        state = self._init_states(len(histories))
        read = [self.read(history) for history in histories]
        rows = [row for row, items in enumerate(read) if items]
        if not rows:                            # nothing known to replay: initial states
            return state
        items, lengths = self._padded([read[row] for row in rows])
        prefilled, user_repr = self.model.prefill(items, lengths)
        prefilled[USER_REPR] = user_repr
        index = torch.tensor(rows, device=self.device)
        for key, value in prefilled.items():
            state[key].index_copy_(0, index, value.to(state[key].dtype))
        return state

    def advance(self, events: list[Event], rounds: list[list[Event]], users: list[str], records,
                states, stats) -> "Ranked":
        """Apply each round in turn (states: row i = users[i], updated in place) and rank
        the items after every event. Records' histories grow by the new items; callers trim
        them (the cache keeps more until a snapshot is in the table)."""
        row_of = {user: row for row, user in enumerate(users)}
        parts = [self._advance(round_events, records, states, row_of, stats)
                 for round_events in rounds]
        return Ranked.join(parts, self.version, events)

    def _advance(self, events: list[Event], records, states, row_of, stats):
        users = [e.user_id for e in events]
        indices = [self.item_index(e.item_id) for e in events]
        items = torch.tensor(indices, device=self.device)
        unknown = 0
        for event, index in zip(events, indices):
            record = records[event.user_id]
            record.history.append(event.item_id)
            if not self._same_offsets(record):         # the first event of a new topic
                record.last_offset = -1
            if event.offset > record.last_offset:
                record.last_offset = event.offset
            record.offsets_of = self.offsets_of or record.offsets_of
            record.last_event_id = event.event_id
            record.last_event_time = event.timestamp_ms
            record.last_version = self.version
            record.events_applied += 1
            if index == OOV:
                record.unknown_items += 1
                unknown += 1
        stats.unknown_items += unknown
        stats.applied += len(events)
        if self.template is not None:
            rows = [row_of[u] for u in users]
            if not unknown:
                user_repr, scores = self._step_rows(states, rows, items, len(row_of))
            else:
                # An unknown item is left out of what the model reads (`read`): its user's
                # state stays as it was, and the click is ranked from that state.
                known = [k for k, index in enumerate(indices) if index != OOV]
                if known:
                    self._step_rows(states, [rows[k] for k in known], items[known],
                                    len(row_of))
                user_repr = states[USER_REPR].index_select(
                    0, torch.tensor(rows, device=self.device)).float()
                lost = (~torch.isfinite(user_repr).all(1)).nonzero().flatten().tolist()
                if lost:                        # stored before the state kept it
                    user_repr[lost] = self._rebuild(
                        [records[users[k]].history[-self.history_len:] for k in lost]
                    )[USER_REPR].float()
                scores = None
        else:
            user_repr = self._window_repr([records[u].history[-self.history_len:]
                                           for u in users])
            scores = None
        seen = None
        if self.exclude_seen:
            seen = [[self.index[raw] for raw in records[user].history[-self.history_len:]
                     if raw in self.index] for user in users]
        top_scores, top_items = self._top(user_repr, scores, self.top_k, seen)
        return events, top_items, top_scores

    def _top(self, user_repr, scores, k: int, seen: list[list[int]] | None):
        """(scores, item indices) of the best k: from `scores` (every item's: the traced
        step's, or computed here), or, for a catalogue ranked block by block, from
        `user_repr` a block at a time, or from the approximate index."""
        if self.ann_index is not None:
            return self.ann_index.search(user_repr.float(), k, seen)
        if scores is None and not self.blocked():
            scores = self.model.scores(user_repr)
        if scores is None:
            return top_k(user_repr.float(), self.model.item_embedding.weight, k,
                         len(self.item_ids), self.exact_rank_items, seen)
        scores = mask_spare_rows(scores, len(self.item_ids))
        for row, items in enumerate(seen or []):
            scores[row, items] = -torch.inf
        return torch.topk(scores, min(k, len(self.item_ids) - 1), dim=1)

    def _step_rows(self, states, rows: list[int], items, n_rows: int):
        """Step the given rows of `states` (of n_rows) in place, one item each; (their
        USER_REPR, scores as `_step`)."""
        if rows == list(range(n_rows)):         # every user in order: the usual batch
            new_states, scores = self._step(states, items)
            states.update(new_states)
        elif hasattr(states, "select"):         # the state cache's block (Rows)
            index = torch.tensor(rows, device=self.device)
            sub = states.select(index)
            new_states, scores = self._step(sub, items)
            sub.update(new_states)
            states.put(index, sub)
        else:
            index = torch.tensor(rows, device=self.device)
            new_states, scores = self._step(
                {k: v.index_select(0, index) for k, v in states.items()}, items)
            for k, v in new_states.items():
                states[k].index_copy_(0, index, v)
        return new_states[USER_REPR], scores

    def _step(self, states, items):
        """(advanced states, USER_REPR included, scores of every item row or None where the
        catalogue is ranked block by block); `step_rows` users at a time, each block's states
        advanced in place."""
        rows = self.step_rows
        if not rows or len(items) <= rows:
            return self._step_block(states, items)
        advanced = {k: v for k, v in states.items() if k != USER_REPR}
        reprs, scores = [], []
        for start in range(0, len(items), rows):
            block = {k: v[start:start + rows] for k, v in advanced.items()}
            # Steps advance their states in place (the layers' contract, as mamba_ssm's):
            # the block's views into `advanced` are its users' new states.
            new, block_scores = self._step_block(block, items[start:start + rows])
            reprs.append(new[USER_REPR])
            scores.append(block_scores)
        advanced[USER_REPR] = torch.cat(reprs)
        return advanced, None if scores[0] is None else torch.cat(scores)

    def _step_block(self, states, items):
        model_states = {k: v for k, v in states.items() if k != USER_REPR}
        if self.traced is not None:
            new_states, user_repr, *scores = self.traced(model_states, items)
            scores = scores[0] if scores else None
        else:
            new_states, user_repr = self.model.step(model_states, items)
            scores = None                       # _top scores every item, or block by block
        new_states = dict(new_states)
        new_states[USER_REPR] = user_repr
        return new_states, scores

    # -- recommendations on request ----------------------------------------------------
    @torch.no_grad()
    def rank_user(self, record: UserRecord, user_repr, k: int, exclude_seen: bool
                  ) -> tuple[list[tuple[str, float]], str]:
        """The top k for a user now, without a click: (item id, score) best first, and how
        it was computed: "state" (the representation its last step left, what its last
        recommendation was ranked from) or "history" (recomputed over its last history_len
        items: the representation was made by another model version, or is not stored).

        user_repr: its state's USER_REPR (1, hidden), or None."""
        history = record.history[-self.history_len:]
        how = "state"
        if self.template is None:
            user_repr, how = self._window_repr([history]), "history"
        elif (user_repr is None or record.last_version != self.version
              or not torch.isfinite(user_repr).all()):
            user_repr, how = self._rebuild([history])[USER_REPR], "history"
        user_repr = user_repr.to(self.device).float()
        seen = [[self.index[raw] for raw in history if raw in self.index]] if exclude_seen \
            else None
        top_scores, top_items = self._top(user_repr, None, k, seen)
        return [(self.item_ids[i], s) for i, s in zip(top_items[0].tolist(),
                                                      top_scores[0].tolist())
                if s != -math.inf], how

    def _window_repr(self, histories: list[list[str]]):
        """Window models (paper MLSA4Rec, SASRec): recompute over the last max_len known
        items (one OOV item where none is known, as a state model's initial state ranks)."""
        max_len = self.model.config.max_len
        read = [self.read(h)[-max_len:] or [OOV] for h in histories]
        return self.model(*self._padded(read, width=max_len))

    def _padded(self, rows: list[list[int]], width: int = 0):
        """Item indices -> (right-padded (rows, width or the longest), lengths)."""
        width = width or max((len(r) for r in rows), default=1)
        items = torch.zeros(len(rows), width, dtype=torch.long)
        for row, indices in enumerate(rows):
            items[row, :len(indices)] = torch.tensor(indices, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        return items.to(self.device), lengths


@dataclass
class Ranked:
    """The top k after each applied event of a batch, in the batch's event order."""
    events: list[Event]
    items: torch.Tensor                 # (events, k) item indices
    scores: torch.Tensor                # (events, k); -inf = fewer than k items to show
    version: str
    produced_at: int

    @classmethod
    def join(cls, parts, version: str, events_in_order: list[Event]) -> "Ranked":
        """Rounds (each: events, top items, top scores) -> one, back in the batch's event
        order (a user's r-th event is in round r, but recommendations go out as events came)."""
        produced_at = int(time.time() * 1000)
        if not parts:
            empty = torch.zeros(0, 0)
            return cls([], empty.long(), empty, version, produced_at)
        events = [e for round_events, _, _ in parts for e in round_events]
        items = torch.cat([p[1] for p in parts]).cpu()
        scores = torch.cat([p[2] for p in parts]).float().cpu()
        if len(parts) > 1:
            position = {id(e): i for i, e in enumerate(events_in_order)}
            order = sorted(range(len(events)), key=lambda i: position[id(events[i])])
            index = torch.tensor(order)
            events = [events[i] for i in order]
            items, scores = items.index_select(0, index), scores.index_select(0, index)
        return cls(events, items, scores, version, produced_at)

    def as_dicts(self, item_ids: list[str]) -> list[dict]:
        out = []
        for event, items, scores in zip(self.events, self.items.tolist(), self.scores.tolist()):
            out.append({
                "user_id": event.user_id,
                "event_id": event.event_id,
                "event_timestamp": event.timestamp_ms,
                "items": [{"item_id": item_ids[i], "score": float(s), "rank": rank + 1}
                          for rank, (i, s) in enumerate(zip(items, scores)) if s != -math.inf],
                "model_version": self.version,
                "produced_at": self.produced_at,
            })
        return out
