"""The scorer's batch cycle, without Kafka: what comes out equals the offline model."""

import json
import struct

import pytest
import torch

from model.models import build_model
from model.models.base import OOV
from streams.worker import user_record
from streams.worker.scoring import Event, Scorer, UserRecord

N_ITEMS = 40
ITEM_IDS = ["[PAD]"] + [f"item{i}" for i in range(1, N_ITEMS)]



def small_model(name="mlsa4rec-s"):
    torch.manual_seed(0)
    return build_model(name, N_ITEMS, {"hidden": 32, "max_len": 20}).eval()


def make_events(n_users=4, per_user=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    events, offset = [], 0
    for step in range(per_user):
        for u in range(n_users):
            item = int(torch.randint(1, N_ITEMS, (1,), generator=g))
            events.append(Event(f"u{u}", f"item{item}", f"e{offset}", 1000 * offset, 0, offset))
            offset += 1
    return events


def offline_top_k(model, items: list[int], k=10):
    """Step one user alone over its items; the top k after the last one."""
    state = model.init_state(1)
    for item in items or [OOV]:             # nothing known read yet: as after one unknown
        state, repr_ = model.step(state, torch.tensor([item]))
    scores, top = torch.topk(model.scores(repr_), k)
    return top[0].tolist(), scores[0]


def run_in_batches(scorer, events, batch_size):
    table, out = {}, []
    for start in range(0, len(events), batch_size):
        batch = events[start:start + batch_size]
        records = {e.user_id: (UserRecord.from_bytes(table[e.user_id]) if e.user_id in table
                               else None) for e in batch}
        updated, recs, _ = scorer.process(batch, records)
        table.update({u: r.to_bytes() for u, r in updated.items()})
        out += recs
    return table, out


@pytest.mark.parametrize("batch_size", [1, 5, 100])
@pytest.mark.parametrize("step_rows, trace_step", [(0, False), (3, False), (3, True)])
def test_batched_scoring_equals_the_offline_model_stepped_per_user(batch_size, step_rows,
                                                                  trace_step):
    """step_rows 3: the 4 users of a round are stepped 3, then 1 (eager and traced)."""
    model = small_model()
    scorer = Scorer(model, ITEM_IDS, "v1", step_rows=step_rows, trace_step=trace_step)
    events = make_events()
    _, recs = run_in_batches(scorer, events, batch_size)
    assert [r["event_id"] for r in recs] == [e.event_id for e in events]
    for rec in recs:
        user_items = [int(e.item_id[4:]) for e in events
                      if e.user_id == rec["user_id"] and e.offset <= int(rec["event_id"][1:])]
        top, scores = offline_top_k(model, user_items)
        assert [ITEM_IDS.index(i["item_id"]) for i in rec["items"]] == top
        assert torch.allclose(torch.tensor([i["score"] for i in rec["items"]]), scores, atol=1e-4)
        assert [i["rank"] for i in rec["items"]] == list(range(1, 11))
        assert rec["model_version"] == "v1"


def test_step_rows_below_zero_is_refused():
    with pytest.raises(ValueError, match="step_rows must be 0"):
        Scorer(small_model(), ITEM_IDS, "v1", step_rows=-1)


def test_a_replayed_event_is_not_applied_twice():
    scorer = Scorer(small_model(), ITEM_IDS, "v1")
    events = make_events(n_users=2, per_user=3)
    table, _ = run_in_batches(scorer, events, 100)
    again = {u: UserRecord.from_bytes(b) for u, b in table.items()}
    updated, recs, stats = scorer.process(events[-2:], dict(again))
    assert stats.duplicates == 2 and stats.applied == 0 and recs == []
    assert {u: r.to_bytes() for u, r in updated.items()} == {}


def test_a_message_read_twice_within_one_batch_is_applied_once():
    """After a recovery's seek back, messages fetched before it come again right behind
    their first copies, in the same batch; the record knows neither yet. Before the fix each
    copy was stepped over the first: the user's recommendation after it was wrong (the crash
    test in tests/test_stream_e2e.py failed in 2 of 5 runs here)."""
    model = small_model()
    scorer = Scorer(model, ITEM_IDS, "v1")
    events = make_events(n_users=2, per_user=4)
    # Read again from offset 5: 5, 6, 7 come twice; and a copy under the same event id at
    # another offset (a producer that sent the click twice).
    again = events[5:] + [Event(events[-1].user_id, events[-1].item_id, events[-1].event_id,
                                events[-1].timestamp_ms, 0, 99)]
    batch = events + again
    updated, recs, stats = scorer.process(batch, {})
    assert stats.duplicates == len(again) and stats.applied == len(events)
    assert [r["event_id"] for r in recs] == [e.event_id for e in events]
    for user, record in updated.items():
        assert record.events_applied == sum(e.user_id == user for e in events)
    for rec in recs:
        user_items = [int(e.item_id[4:]) for e in events
                      if e.user_id == rec["user_id"] and e.offset <= int(rec["event_id"][1:])]
        top, scores = offline_top_k(model, user_items)
        assert [ITEM_IDS.index(i["item_id"]) for i in rec["items"]] == top
    # A later event of the same user in the same batch is not a copy: applied.
    later = Event("u0", "item3", "later", 10**6, 0, 100)
    _, recs, stats = scorer.process(events[:2] + [later], {})
    assert stats.duplicates == 0 and [r["event_id"] for r in recs][-1] == "later"


def test_offsets_of_a_topic_created_again_under_the_same_name_are_not_taken_as_replays():
    """`interactions` deleted and created again: its offsets start over at 0, and a record's
    last offset (from the old topic) must not make every new click look like a replay."""
    model = small_model()
    old_topic = Scorer(model, ITEM_IDS, "v1", offsets_of="topic-id-A")
    events = make_events(n_users=2, per_user=3)
    table, _ = run_in_batches(old_topic, events, 100)
    records = {u: UserRecord.from_bytes(b) for u, b in table.items()}
    assert {r.offsets_of for r in records.values()} == {"topic-id-A"}
    assert {r.last_offset for r in records.values()} == {4, 5}
    # The same clicks again in the old topic: replays, skipped.
    _, _, stats = old_topic.process(events[:2], dict(records))
    assert stats.duplicates == 2 and stats.applied == 0
    # New clicks in the new topic, at offsets 0 and 1 (with new event ids): applied.
    new_topic = Scorer(model, ITEM_IDS, "v1", offsets_of="topic-id-B")
    fresh = [Event("u0", "item3", "new-0", 0, 0, 0), Event("u1", "item4", "new-1", 0, 0, 1)]
    updated, recs, stats = new_topic.process(fresh, dict(records))
    assert stats.applied == 2 and len(recs) == 2
    assert {u: (r.offsets_of, r.last_offset) for u, r in updated.items()} == {
        "u0": ("topic-id-B", 0), "u1": ("topic-id-B", 1)}
    # ... and from then on, the new topic's replays are recognised again.
    _, _, stats = new_topic.process(fresh, dict(updated))
    assert stats.duplicates == 2
    # A record written before topic ids were kept trusts its offsets, as before.
    legacy = {u: UserRecord.from_bytes(b) for u, b in table.items()}
    for record in legacy.values():
        record.offsets_of = ""
    _, _, stats = new_topic.process(events[:2], legacy)
    assert stats.duplicates == 2


def test_a_record_of_another_version_reads_whatever_fields_it_has():
    record = UserRecord(model_version="v1", state=b"\x01\x02", last_offset=7,
                        history=["a", "b"], offsets_of="T", snapshot_at=3, events_applied=9)
    assert UserRecord.from_bytes(record.to_bytes()) == record
    # Records of earlier versions: a 4-byte length, a JSON header, the state. Fields the
    # header lacks take their defaults; fields this version does not know are dropped.
    header = {"model_version": "v1", "last_offset": 7, "history": ["a", "b"],
              "offsets_of": "T", "field_of_another_version": 1}
    for variant in (header, {k: v for k, v in header.items() if k != "offsets_of"}):
        head = json.dumps(variant).encode()
        back = UserRecord.from_bytes(struct.pack(">I", len(head)) + head + b"\x01\x02")
        assert (back.state, back.last_offset, back.history) == (b"\x01\x02", 7, ["a", "b"])
        assert back.offsets_of == variant.get("offsets_of", "")
    # A later version's fields ride in the extension (a JSON object before the state): read
    # past and dropped.
    data = bytearray(record.to_bytes())
    extension = json.dumps({"field_of_a_later_version": [1, 2]}).encode()
    struct.pack_into(">I", data, user_record._HEAD.size - 4, len(extension))   # its length
    state_at = len(data) - len(record.state)
    later = bytes(data[:state_at]) + extension + bytes(data[state_at:])
    assert UserRecord.from_bytes(later) == record


def test_histories_of_any_items_round_trip():
    for history in ([], [""], ["", ""], ["a\0b", "c"], ["\0"], ["é", "日本", "x" * 1024]):
        record = UserRecord(history=history)
        assert UserRecord.from_bytes(record.to_bytes()).history == history


def test_bytes_that_are_no_record_are_refused_with_the_reason():
    good = UserRecord(model_version="v1", history=["a"], last_event_id="e").to_bytes()
    with pytest.raises(ValueError, match="too short"):
        UserRecord.from_bytes(b"\x01")
    with pytest.raises(ValueError, match="unknown format"):
        UserRecord.from_bytes(b"\x07" + good[1:])
    with pytest.raises(ValueError, match="unknown flags"):
        UserRecord.from_bytes(good[:1] + b"\x09" + good[2:])
    with pytest.raises(ValueError, match="truncated"):
        UserRecord.from_bytes(good[:-2])


def test_unknown_items_are_kept_counted_and_scored():
    model = small_model()
    scorer = Scorer(model, ITEM_IDS, "v1")
    events = [Event("u", "item3", "a", 0, 0, 0), Event("u", "brand-new", "b", 1, 0, 1)]
    updated, recs, stats = scorer.process(events, {"u": None})
    assert stats.unknown_items == 1 and len(recs) == 2
    assert updated["u"].history == ["item3", "brand-new"] and updated["u"].unknown_items == 1
    assert all(torch.isfinite(torch.tensor([i["score"] for i in r["items"]])).all() for r in recs)


@pytest.mark.parametrize("name", ["mlsa4rec-s", "mamba4rec", "mlsa4rec"])
def test_an_unknown_title_is_left_out_of_what_the_model_reads(name):
    """A click on a title the version does not know leaves the user's state as it was and is
    ranked from it; a user's first click on one is ranked as after one unknown item. The same
    holds when another model version rebuilds the state from the history."""
    model = small_model(name)
    scorer = Scorer(model, ITEM_IDS, "v1")
    events = [Event("u", "brand-new", "a", 0, 0, 0), Event("u", "item3", "b", 1, 0, 1),
              Event("u", "newer", "c", 2, 0, 2), Event("u", "item5", "d", 3, 0, 3)]
    updated, recs, _ = scorer.process(events, {"u": None})
    read_before = [[], [3], [3], [3, 5]]          # the known items read before each ranking

    def expected(model, items):             # right-padded to the window, as the worker reads
        items = items or [OOV]
        return model.full_sort_scores(torch.tensor([items + [0] * (20 - len(items))]),
                                      torch.tensor([len(items)]))[0]

    for rec, items in zip(recs, read_before):
        scores = expected(model, items)
        assert [ITEM_IDS.index(i["item_id"]) for i in rec["items"]] == \
            torch.topk(scores, 10).indices.tolist(), (rec["event_id"], items)
    # Another lineage rebuilds u's state from its history: the unknown titles left out again.
    torch.manual_seed(1)
    other = build_model(name, N_ITEMS, {"hidden": 32, "max_len": 20}).eval()
    scorer.swap(other, ITEM_IDS, "w1")
    _, (rec,), stats = scorer.process([Event("u", "newest", "e", 4, 0, 4)], updated)
    assert stats.rebuilt_states == (1 if other.steppable else 0)
    assert [ITEM_IDS.index(i["item_id"]) for i in rec["items"]] == \
        torch.topk(expected(other, [3, 5]), 10).indices.tolist()


def test_paper_model_is_served_by_recomputing_the_window():
    model = small_model("mlsa4rec")
    scorer = Scorer(model, ITEM_IDS, "v1")
    events = make_events(n_users=2, per_user=25)         # longer than max_len 20
    _, recs = run_in_batches(scorer, events, 7)
    last = recs[-1]
    items = [int(e.item_id[4:]) for e in events if e.user_id == last["user_id"]][-20:]
    scores = model.full_sort_scores(torch.tensor([items]), torch.tensor([len(items)]))
    top = torch.topk(scores, 10).indices[0].tolist()
    assert [ITEM_IDS.index(i["item_id"]) for i in last["items"]] == top


def test_a_state_from_another_model_version_is_rebuilt_from_the_history():
    model = small_model()
    events = make_events(n_users=1, per_user=8)
    table, _ = run_in_batches(Scorer(model, ITEM_IDS, "v1"), events[:7], 100)
    record = UserRecord.from_bytes(table["u0"])
    record.state = b"\x01" + b"\x00" * 8          # garbage that must not be used
    _, recs, stats = Scorer(model, ITEM_IDS, "v2").process(events[7:], {"u0": record})
    assert stats.rebuilt_states == 1 and recs[0]["model_version"] == "v2"
    top, _ = offline_top_k(model, [int(e.item_id[4:]) for e in events])
    assert [ITEM_IDS.index(i["item_id"]) for i in recs[0]["items"]] == top


def test_new_users_and_rebuilt_users_in_one_batch_equal_the_offline_model():
    """One batch after a swap to an unrelated version: two users rebuilt from histories of
    different lengths, and a new user; every top 10 equals stepping the user alone."""
    model = small_model()
    events = make_events(n_users=3, per_user=6)
    seen = [e for e in events[:12] if e.user_id != "u2"]          # u2 is new after the swap
    seen = [e for e in seen if not (e.user_id == "u1" and e.offset > 4)]
    table, _ = run_in_batches(Scorer(model, ITEM_IDS, "v1"), seen, 100)
    batch = [Event("u0", "item3", "x0", 0, 0, 100), Event("u1", "item7", "x1", 0, 0, 101),
             Event("u2", "item9", "x2", 0, 0, 102)]
    records = {e.user_id: (UserRecord.from_bytes(table[e.user_id]) if e.user_id in table
                           else None) for e in batch}
    _, recs, stats = Scorer(model, ITEM_IDS, "v2").process(batch, records)
    assert stats.rebuilt_states == 2
    for rec, event in zip(recs, batch):
        items = [int(e.item_id[4:]) for e in seen if e.user_id == event.user_id]
        top, _ = offline_top_k(model, items + [int(event.item_id[4:])])
        assert [ITEM_IDS.index(i["item_id"]) for i in rec["items"]] == top, event.user_id


def test_states_of_recent_ancestors_are_kept_and_others_rebuilt():
    """keep_states_for_versions=2: after a swap to a fine-tuned child (parent = the serving
    version) the states go on; two generations later still; at the third they are rebuilt once
    (and belong to the new version from then on); a version from another lineage rebuilds."""
    model = small_model()
    events = make_events(n_users=3, per_user=5)
    scorer = Scorer(model, ITEM_IDS, "v1", keep_states_for_versions=2)
    table, _ = run_in_batches(scorer, events[:3], 100)

    def next_batch(start):
        records = {e.user_id: UserRecord.from_bytes(table[e.user_id])
                   for e in events[start:start + 3]}
        updated, recs, stats = scorer.process(events[start:start + 3], records)
        table.update({u: r.to_bytes() for u, r in updated.items()})
        return stats, {r.model_version for r in updated.values()}, recs

    scorer.swap(model, ITEM_IDS, "v2", parent="v1")
    stats, started_by, recs = next_batch(3)
    assert stats.rebuilt_states == 0 and started_by == {"v1"}
    assert {r["model_version"] for r in recs} == {"v2"}       # made by the serving weights
    scorer.swap(model, ITEM_IDS, "v3", parent="v2")
    assert next_batch(6)[0].rebuilt_states == 0                # v1 is 2 generations back
    scorer.swap(model, ITEM_IDS, "v4", parent="v3")
    stats, started_by, _ = next_batch(9)
    assert stats.rebuilt_states == 3 and started_by == {"v4"}  # v1 is 3 back: rebuilt
    scorer.swap(model, ITEM_IDS, "other", parent="someone-else")
    assert next_batch(12)[0].rebuilt_states == 3


def test_keep_states_for_versions_zero_rebuilds_after_every_swap():
    model = small_model()
    events = make_events(n_users=2, per_user=2)
    scorer = Scorer(model, ITEM_IDS, "v1")
    table, _ = run_in_batches(scorer, events[:2], 100)
    scorer.swap(model, ITEM_IDS, "v2", parent="v1")
    records = {e.user_id: UserRecord.from_bytes(table[e.user_id]) for e in events[2:]}
    assert scorer.process(events[2:], records)[2].rebuilt_states == 2


def test_half_precision_state_storage_keeps_the_ranking():
    model = small_model()
    events = make_events(n_users=3, per_user=30)
    table32, recs32 = run_in_batches(Scorer(model, ITEM_IDS, "v1"), events, 9)
    table16, recs16 = run_in_batches(Scorer(model, ITEM_IDS, "v1", state_dtype=torch.float16),
                                     events, 9)
    worst = max(abs(a["score"] - b["score"]) for r32, r16 in zip(recs32, recs16)
                for a, b in zip(r32["items"], r16["items"]))
    assert worst < 5e-2
    assert len(table16["u0"]) < 0.6 * len(table32["u0"])


def test_exclude_seen_never_recommends_a_history_item():
    scorer = Scorer(small_model(), ITEM_IDS, "v1", exclude_seen=True)
    events = make_events(n_users=2, per_user=10)
    _, recs = run_in_batches(scorer, events, 6)
    for rec in recs:
        seen = {e.item_id for e in events
                if e.user_id == rec["user_id"] and e.offset <= int(rec["event_id"][1:])}
        assert not seen & {i["item_id"] for i in rec["items"]}


def test_user_record_round_trip():
    record = UserRecord(model_version="v3", state=b"\x01abc", last_offset=17,
                        last_event_id="e17", offsets_of="topic", history=["a", "b"],
                        events_applied=5, unknown_items=1, snapshot_at=4, last_version="v2",
                        last_event_time=1_700_000_000_123)
    assert UserRecord.from_bytes(record.to_bytes()) == record
