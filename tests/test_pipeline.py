"""Overlapped batches: a batch scored before the previous one's records reach the table."""

from streams.pipeline import UnwrittenRecords
from streams.scoring import Scorer, UserRecord
from tests.test_scoring import ITEM_IDS, make_events, run_in_batches, small_model


def test_scoring_ahead_of_the_table_writes_equals_scoring_in_turn():
    events = make_events(n_users=3, per_user=8)
    scorer = Scorer(small_model(), ITEM_IDS, "v1")
    expected_table, expected = run_in_batches(scorer, events, 4)

    # Every batch reads the table before the previous batch has written to it, as in the
    # agent with pipeline_depth >= 1; the overlay supplies what the table is missing.
    unwritten, table, out, pending = UnwrittenRecords(), {}, [], None
    for start in range(0, len(events), 4):
        batch = events[start:start + 4]
        stale = {e.user_id: (UserRecord.from_bytes(table[e.user_id]) if e.user_id in table
                             else None) for e in batch}
        updated, recs, _ = scorer.process(batch, unwritten.overlay(stale))
        unwritten.add(updated)
        out += recs
        if pending is not None:                 # the previous batch finishes only now
            table.update({u: r.to_bytes() for u, r in pending.items()})
            unwritten.written(pending)
        pending = updated
    table.update({u: r.to_bytes() for u, r in pending.items()})
    unwritten.written(pending)

    assert [r["items"] for r in out] == [r["items"] for r in expected]
    assert table == expected_table
    assert len(unwritten) == 0


def test_a_written_record_leaves_the_overlay_but_a_newer_one_stays():
    unwritten = UnwrittenRecords()
    older, newer = UserRecord(last_offset=1), UserRecord(last_offset=2)
    unwritten.add({"u": older})
    unwritten.add({"u": newer})
    unwritten.written({"u": older})             # the table now holds `older`; `newer` is ahead
    (record,) = unwritten.overlay({"u": UserRecord(last_offset=1)}).values()
    assert record.last_offset == 2 and record is not newer   # a copy, never the shared object
    unwritten.written({"u": newer})
    assert len(unwritten) == 0
    table_record = UserRecord(last_offset=2)
    assert unwritten.overlay({"u": table_record})["u"] is table_record
