"""GET /users/{id}/recommendations on the real broker with two workers: either worker answers
for any user (the owner of the user's partition from its state, the other by forwarding), the
answer is the offline model's top k, a rebalance hands the answering over, and a user never
seen gets the flagged fallback."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid

import torch
from confluent_kafka import Consumer

from streams.shared.clients import produce_clicks
from streams.worker.queries import SERVED_BY, partition_of
from tests.test_scale_out import wait_healthy
from tests.test_stream_e2e import (ITEM_IDS, PARTITIONS, Worker, checkpoint,  # noqa: F401
                                   clicks_for, collect)


def ask(worker: Worker, user: str, query: str = ""):
    """(status, headers, JSON body) of the endpoint on this worker."""
    url = f"http://127.0.0.1:{worker.metrics_port}/users/{user}/recommendations{query}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def offline_top(model, items: list[str], k: int = 10):
    index = torch.tensor([[ITEM_IDS.index(i) for i in items]])
    _, user_repr = model.prefill(index, torch.tensor([len(items)]))
    scores, top = torch.topk(model.scores(user_repr)[0], k)
    return [ITEM_IDS[i] for i in top.tolist()], scores


def assert_offline(body: dict, model, items: list[str]) -> None:
    want_items, want_scores = offline_top(model, items)
    assert [i["item_id"] for i in body["items"]] == want_items, body
    assert torch.allclose(torch.tensor([i["score"] for i in body["items"]]), want_scores,
                          atol=1e-4), body
    assert [i["rank"] for i in body["items"]] == list(range(1, 11))


def partitions_of_clicks(bootstrap: str, topic: str, count: int) -> dict[str, int]:
    """user id -> the partition its clicks landed in, read back from the topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    found, deadline = {}, time.monotonic() + 60
    seen = 0
    while seen < count and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None or message.error():
            continue
        seen += 1
        found[message.key().decode()] = message.partition()
    consumer.close()
    return found


def until_served_by(worker: Worker, user: str, url: str, timeout: float = 120.0):
    """Ask until the answer comes from `url`; in between only 503s with Retry-After."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = ask(worker, user)
        if status == 200 and headers.get(SERVED_BY) == url:
            return body
        assert status in (200, 503), (status, body)
        if status == 503:
            assert headers.get("Retry-After") == "1", headers
        assert time.monotonic() < deadline, f"{user} not served by {url}: {status} {body}"
        time.sleep(0.3)


def test_either_worker_answers_the_owners_offline_top_k_across_a_rebalance(
        kafka_bootstrap_server, checkpoint, tmp_path):
    path, model = checkpoint
    name = uuid.uuid4().hex[:8]
    for label in ("first", "second"):
        (tmp_path / label).mkdir()
    first, second = (Worker(kafka_bootstrap_server, path, tmp_path / label, name)
                     for label in ("first", "second"))
    urls = {w: f"http://127.0.0.1:{w.metrics_port}" for w in (first, second)}
    clicks = clicks_for(n_users=10, per_user=5, seed=7)
    items_of: dict[str, list[str]] = {}
    for click in clicks:
        items_of.setdefault(click["user_id"], []).append(click["item_id"])
    first.start()
    second.start()
    try:
        wait_healthy(first, 120)
        wait_healthy(second, 120)
        produce_clicks(kafka_bootstrap_server, f"interactions-{name}", clicks)
        got = collect(kafka_bootstrap_server, f"recommendations-{name}",
                      {c["event_id"] for c in clicks})
        # The endpoint's partition of a user is where the producer put its clicks.
        placed = partitions_of_clicks(kafka_bootstrap_server, f"interactions-{name}",
                                      len(clicks))
        assert placed == {u: partition_of(u, PARTITIONS) for u in items_of}

        owners = {}
        for user, items in items_of.items():
            answers = [ask(worker, user) for worker in (first, second)]
            for status, headers, body in answers:
                assert status == 200, body
                assert body["known_user"] and body["source"] == "state"
                assert body["model_version"] == "test-v1"
                assert body["last_event"]["event_id"] == f"s7-{user.replace('user-', 'u')}-4"
                assert body["events_applied"] == 5
                assert_offline(body, model, items)
                # Nothing changed since its last click: the last recommendation sent.
                last = got[body["last_event"]["event_id"]][-1]
                assert [i["item_id"] for i in body["items"]] == \
                    [i["item_id"] for i in last["items"]]
            served_by = {headers[SERVED_BY] for _, headers, _ in answers}
            assert len(served_by) == 1, served_by       # one owner, whoever was asked
            owners[user] = served_by.pop()
        assert set(owners.values()) == set(urls.values()), owners   # both own some users

        status, _, body = ask(first, "user-3", "?k=20&exclude_seen=true")
        assert status == 200 and body["known_user"] and len(body["items"]) == 20
        assert not set(items_of["user-3"]) & {i["item_id"] for i in body["items"]}

        status, _, body = ask(second, "someone-new", "?k=3")
        assert status == 200 and body["known_user"] is False and body["source"] == "popular"
        assert body["last_event"] is None and len(body["items"]) <= 3
        assert {i["item_id"] for i in body["items"]} <= {c["item_id"] for c in clicks}

        for query, reason in (("?k=0", "k must be"), ("?foo=1", "unknown query option")):
            status, _, body = ask(second, "user-1", query)
            assert status == 400 and reason in body["error"], body
        assert ask(first, "", "")[0] == 400

        # The second worker leaves: the first restores its partitions and answers for them.
        moved = [u for u, url in owners.items() if url == urls[second]]
        second.stop()
        for user in moved:
            body = until_served_by(first, user, urls[first])
            assert_offline(body, model, items_of[user])
    finally:
        second.stop()
        first.stop()
