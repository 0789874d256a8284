"""RecommendationWriter (schemas/codec.py) against the dict + fastavro path it replaces."""

import math
import random

import numpy as np
import pytest
import torch

from schemas.codec import (
    RecommendationWriter,
    _pinned_codec,
    decode_recommendation,
    encode_recommendation,
)

# Ids of 1, 2, 3 and 4 UTF-8 bytes per character, and one long enough (> 63 bytes) for a
# two-byte length varint.
ITEM_IDS = ["i0", "film-\u00e9t\u00e9", "\u6620\u753b", "\U0001f3ac-clip", "x" * 200, ""] + \
    [f"item{i}" for i in range(200)]
TIMESTAMPS = [0, 1, -1, 63, 64, -64, -65, 1_700_000_000_000, -1_700_000_000_000,
              2**63 - 1, -(2**63)]


def as_dict(user, event, ts, items, scores, version, produced_at):
    """The equivalent record: -inf items left out, ranks counted among the items kept."""
    kept = [(i, s) for i, s in zip(items, scores) if s != -math.inf]
    return {"user_id": user, "event_id": event, "event_timestamp": ts,
            "items": [{"item_id": ITEM_IDS[i], "score": float(s), "rank": rank + 1}
                      for rank, (i, s) in enumerate(kept)],
            "model_version": version, "produced_at": produced_at}


def scoring_py_dict(user, event, ts, items, scores, version, produced_at):
    """Exactly what streams/worker/scoring.py builds: its rank is the topk position, which is
    the same as the rank among kept items because topk puts the -inf scores last."""
    return {"user_id": user, "event_id": event, "event_timestamp": ts,
            "items": [{"item_id": ITEM_IDS[i], "score": float(s), "rank": rank + 1}
                      for rank, (i, s) in enumerate(zip(items, scores)) if s != -math.inf],
            "model_version": version, "produced_at": produced_at}


# decode_recommendation turns timestamp-millis into datetimes on the way, so it cannot read
# longs outside datetime's years 1..9999 (neither from encode_recommendation's bytes).
DATETIME_MS = range(-62_135_596_800_000, 253_402_300_800_000)


def random_batch(rng: random.Random, rows: int, k: int):
    users = [rng.choice(["u1", "\u00fcser", "\u7528\u6237-" + str(rng.random()), "u" * 70])
             for _ in range(rows)]
    events = [f"e{rng.getrandbits(64):x}" for _ in range(rows)]
    stamps = [rng.choice(TIMESTAMPS + [rng.randrange(-2**63, 2**63)]) for _ in range(rows)]
    items = np.array([[rng.randrange(len(ITEM_IDS)) for _ in range(k)] for _ in range(rows)],
                     dtype=np.int64).reshape(rows, k)
    scores = np.array([[rng.choice([-math.inf, math.inf, 0.0, -0.0, 1e-40, 3.4e38,
                                    rng.uniform(-50, 50)]) for _ in range(k)]
                       for _ in range(rows)], dtype=np.float32).reshape(rows, k)
    return users, events, stamps, items, scores


@pytest.mark.parametrize("k", [0, 1, 10, 70])
def test_bytes_equal_encode_recommendation(k):
    rng = random.Random(k)
    writer = RecommendationWriter(ITEM_IDS)
    for _ in range(5):
        rows = rng.randrange(1, 40)
        users, events, stamps, items, scores = random_batch(rng, rows, k)
        version, produced_at = rng.choice(["v1", "m\u00f6del-7", ""]), rng.choice(TIMESTAMPS)
        got = writer.encode_batch(users, events, stamps, items, scores, version, produced_at)
        assert len(got) == rows
        for row in range(rows):
            record = as_dict(users[row], events[row], stamps[row], items[row].tolist(),
                             scores[row].tolist(), version, produced_at)
            assert got[row] == encode_recommendation(record), (row, record)
            if stamps[row] not in DATETIME_MS or produced_at not in DATETIME_MS:
                continue
            back = decode_recommendation(got[row])
            assert [x["item_id"] for x in back["items"]] == [x["item_id"] for x in record["items"]]
            assert [x["rank"] for x in back["items"]] == list(range(1, len(record["items"]) + 1))
            assert back["event_timestamp"] == stamps[row] and back["produced_at"] == produced_at


def test_minus_inf_items_are_dropped_and_ranks_close_up():
    writer = RecommendationWriter(ITEM_IDS)
    scores = np.array([[2.0, -np.inf, 1.0, -np.inf], [-np.inf] * 4], dtype=np.float32)
    # A dropped item is never looked up, so its index may lie past the item list (a spare row).
    items = np.array([[1, 999, 2, -5], [0, 1, 2, 3]])
    first, second = writer.encode_batch(["a", "b"], ["e1", "e2"], [5, 6], items, scores, "v", 9)
    assert decode_recommendation(first)["items"] == [
        {"item_id": ITEM_IDS[1], "score": 2.0, "rank": 1},
        {"item_id": ITEM_IDS[2], "score": 1.0, "rank": 2}]
    assert decode_recommendation(second)["items"] == []
    assert second == encode_recommendation(as_dict("b", "e2", 6, [], [], "v", 9))


def test_torch_tensors_as_topk_gives_them():
    writer = RecommendationWriter(ITEM_IDS)
    logits = torch.randn(8, len(ITEM_IDS), generator=torch.Generator().manual_seed(3))
    logits[:, 5:9] = -torch.inf
    top_scores, top_items = torch.topk(logits, len(ITEM_IDS) - 3, dim=1)  # reaches the -inf ones
    got = writer.encode_batch([f"u{r}" for r in range(8)], [f"e{r}" for r in range(8)],
                              list(range(8)), top_items, top_scores, "v2", 123)
    for row in range(8):
        record = scoring_py_dict(f"u{row}", f"e{row}", row, top_items[row].tolist(),
                                 top_scores[row].tolist(), "v2", 123)
        assert len(record["items"]) == len(ITEM_IDS) - 4
        assert got[row] == encode_recommendation(record)


def test_empty_batch_and_schema_id():
    writer = RecommendationWriter(ITEM_IDS)
    assert writer.encode_batch([], [], [], np.empty((0, 10), np.int64),
                               np.empty((0, 10), np.float32), "v", 1) == []
    assert writer.schema_id == _pinned_codec("recommendation").schema_id
    other = RecommendationWriter(ITEM_IDS, schema_id=77)
    (data,) = other.encode_batch(["u"], ["e"], [1], [[0]], [[1.0]], "v", 1)
    assert data[:5] == b"\x00\x00\x00\x00\x4d"


@pytest.mark.parametrize("bad, name", [
    ({"event_ids": ["e1"]}, "event_ids"),
    ({"event_timestamps": [1, 2, 3]}, "event_timestamps"),
    ({"top_items": [[0, 1]]}, "top_items"),
    ({"scores": [[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]}, "scores"),
    ({"scores": [[1.0], [2.0]]}, "scores"),
    ({"top_items": [[0, 1], [2]]}, "top_items"),
])
def test_rows_that_disagree_name_the_argument(bad, name):
    args = {"user_ids": ["u1", "u2"], "event_ids": ["e1", "e2"], "event_timestamps": [1, 2],
            "top_items": [[0, 1], [2, 3]], "scores": [[1.0, 0.5], [1.0, 0.5]],
            "model_version": "v", "produced_at": 1}
    with pytest.raises(ValueError, match=name):
        RecommendationWriter(ITEM_IDS).encode_batch(**{**args, **bad})


@pytest.mark.parametrize("index", [len(ITEM_IDS), -1])
def test_item_index_out_of_range_names_it(index):
    writer = RecommendationWriter(ITEM_IDS)
    with pytest.raises(IndexError, match=rf"top_items\[1\]\[0\] = {index}\b"):
        writer.encode_batch(["a", "b"], ["e", "f"], [1, 2], [[0, 1], [index, 2]],
                            [[1.0, 0.5], [1.0, 0.5]], "v", 1)


def test_other_bad_values():
    writer = RecommendationWriter(ITEM_IDS)
    with pytest.raises(TypeError, match="top_items must hold integers"):
        writer.encode_batch(["a"], ["e"], [1], [[1.5]], [[1.0]], "v", 1)
    with pytest.raises(ValueError, match="does not fit an Avro long"):
        writer.encode_batch(["a"], ["e"], [2**63], [[1]], [[1.0]], "v", 1)
    with pytest.raises(TypeError, match="user_id must be a str"):
        writer.encode_batch([7], ["e"], [1], [[1]], [[1.0]], "v", 1)
    with pytest.raises(TypeError, match="item id at index 1"):
        RecommendationWriter(["a", 2])
