"""The recommendations endpoint without a broker: what each request gets (streams/worker/
queries.py), and the top k a scorer ranks for a user without a click (Scorer.rank_user)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry

from model.models import build_model
from model.state import states_to_bytes
from streams.shared.clicks import MAX_ID_BYTES
from streams.shared.metrics import MetricsServer
from streams.worker.queries import (FORWARDED, SERVED_BY, NotReady, PopularItems, Query,
                                    RecommendationsEndpoint, RequestError, parse)
from streams.worker.scoring import USER_REPR, BatchStats, Event, Scorer, UserRecord

N_ITEMS = 30
ITEM_IDS = ["[PAD]"] + [f"movie-{i}" for i in range(1, N_ITEMS)]


# -- the request --------------------------------------------------------------------------
def test_a_good_request_parses_with_its_options_and_defaults():
    assert parse("/users/user-1/recommendations") == Query("user-1", 10, None)
    assert parse("/users/user-1/recommendations?k=25&exclude_seen=true", default_k=5) == \
        Query("user-1", 25, True)
    assert parse("/users/a%2Fb%20c%C3%A9/recommendations?exclude_seen=False") == \
        Query("a/b cé", 10, False)
    assert parse("/users/u/recommendations?k=1000").k == 1000
    assert parse("/metrics") is None and parse("/users/u/other") is None
    assert parse("/users/u/recommendations/more") is None


@pytest.mark.parametrize("target, reason", [
    ("/users//recommendations", "empty user id"),
    ("/users/" + "x" * (MAX_ID_BYTES + 1) + "/recommendations", "longer than"),
    ("/users/%ff%fe/recommendations", "not UTF-8"),
    ("/users/u/recommendations?k=0", "k must be an integer in 1..1000"),
    ("/users/u/recommendations?k=1001", "k must be an integer in 1..1000"),
    ("/users/u/recommendations?k=-3", "k must be an integer"),
    ("/users/u/recommendations?k=ten", "k must be an integer"),
    ("/users/u/recommendations?k=", "k must be an integer"),
    ("/users/u/recommendations?k=5&k=6", "more than once: k"),
    ("/users/u/recommendations?limit=5", "unknown query option(s) limit"),
    ("/users/u/recommendations?exclude_seen=maybe", "exclude_seen must be true or false"),
    ("/users/u/recommendations?k=%ff", "does not decode"),
])
def test_each_bad_request_gets_400_with_its_reason(target, reason):
    with pytest.raises(RequestError) as caught:
        parse(target)
    assert caught.value.status == 400 and reason in caught.value.reason
    endpoint = RecommendationsEndpoint(lambda q: {}, lambda u: "self", "http://me")
    status, _, body = endpoint.handle(target, {})
    assert status == 400 and reason in json.loads(body)["error"]


# -- token, routing, forwarding -----------------------------------------------------------
def local(query):
    return {"user_id": query.user_id, "k": query.k, "served": "here"}


def test_a_token_when_configured_gets_401_without_it_or_wrong_and_200_with_it():
    endpoint = RecommendationsEndpoint(local, lambda u: "self", "http://me", token="s3cret")
    status, headers, body = endpoint.handle("/users/u/recommendations", {})
    assert status == 401 and "WWW-Authenticate" in headers
    assert "required" in json.loads(body)["error"]
    status, _, body = endpoint.handle("/users/u/recommendations",
                                      {"Authorization": "Bearer nope"})
    assert status == 401 and "wrong" in json.loads(body)["error"]
    status, headers, body = endpoint.handle("/users/u/recommendations",
                                            {"Authorization": "Bearer s3cret"})
    assert status == 200 and json.loads(body)["served"] == "here"
    assert headers[SERVED_BY] == "http://me"


def test_no_owner_or_a_worker_not_ready_gets_503_with_retry_after():
    status, headers, body = RecommendationsEndpoint(local, lambda u: None, "http://me").handle(
        "/users/u/recommendations", {})
    assert status == 503 and headers["Retry-After"] == "1"
    assert "rebalance" in json.loads(body)["error"]

    def restoring(query):
        raise NotReady("restoring")
    status, headers, _ = RecommendationsEndpoint(restoring, lambda u: "self", "http://me").handle(
        "/users/u/recommendations", {})
    assert status == 503 and headers["Retry-After"] == "1"


def serve(endpoint) -> MetricsServer:
    return MetricsServer(0, CollectorRegistry(), lambda: (True, {}),
                         handle=endpoint.handle).start()


def get(port: int, target: str, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{target}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_a_worker_that_does_not_own_the_user_forwards_once_and_relays_the_owners_answer():
    owner_server = serve(RecommendationsEndpoint(local, lambda u: "self", "http://owner",
                                                 token="t"))
    owner_url = f"http://127.0.0.1:{owner_server.port}"
    front = serve(RecommendationsEndpoint(local, lambda u: owner_url, "http://front",
                                          token="t"))
    try:
        auth = {"Authorization": "Bearer t"}
        status, headers, body = get(front.port, "/users/u%2F1/recommendations?k=3", auth)
        assert status == 200 and body == {"user_id": "u/1", "k": 3, "served": "here"}
        assert headers[SERVED_BY] == "http://owner"
        # The owner's own errors come back as they are (its token check here).
        status, headers, body = get(front.port, "/users/u/recommendations", {})
        assert status == 401 and "required" in body["error"]
        status, _, body = get(front.port, "/users/u/recommendations",
                              {"Authorization": "Bearer x"})
        assert status == 401 and "wrong" in body["error"]
        # A forwarded request reaching a worker that is not the owner either: no second hop.
        status, headers, body = get(front.port, "/users/u/recommendations",
                                    {**auth, FORWARDED: "http://elsewhere"})
        assert status == 503 and headers["Retry-After"] == "1"
        # /metrics and /health are still there, and other paths are 404.
        assert get(front.port, "/health")[0] == 200
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{front.port}/nothing", timeout=10)
        assert caught.value.code == 404
    finally:
        owner_server.stop()
        front.stop()
    # The owner gone: 503, not a hang or a 500.
    gone = RecommendationsEndpoint(local, lambda u: owner_url, "http://front", timeout_s=2)
    status, headers, body = gone.handle("/users/u/recommendations", {})
    assert status == 503 and "does not answer" in json.loads(body)["error"]


def test_popular_items_count_the_recent_window_only(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("streams.worker.queries.time.monotonic", lambda: now[0])
    popular = PopularItems(window_s=100)
    popular.add(["a", "a", "b"])
    now[0] += 60                                   # a new half-window; the last one still counts
    popular.add(["b", "b", "c"])
    assert popular.top(2) == [("b", 3), ("a", 2)]
    now[0] += 60                                   # "a" was two half-windows ago: gone
    popular.add(["c"])
    assert dict(popular.top(5)) == {"b": 2, "c": 2}
    now[0] += 500                                  # idle for long: nothing old left
    popular.add(["d"])
    assert popular.top(5) == [("d", 1)]


# -- ranking a user without a click -------------------------------------------------------
@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("mlsa4rec-s", N_ITEMS, {"hidden": 32}).eval()


def events_for(user: str, items: list[int], start: int = 0) -> list[Event]:
    return [Event(user, ITEM_IDS[i], f"{user}-{start + n}", 1_700_000_000_000 + n, 0, start + n)
            for n, i in enumerate(items)]


def offline_top(model, items: list[int], k: int, exclude: set[int] = frozenset()):
    _, user_repr = model.prefill(torch.tensor([items]), torch.tensor([len(items)]))
    scores = model.scores(user_repr)[0]
    scores[list(exclude)] = -torch.inf
    top_scores, top = torch.topk(scores, k)
    finite = torch.isfinite(top_scores)
    return [ITEM_IDS[i] for i in top[finite].tolist()], top_scores[finite]


@pytest.mark.parametrize("trace_step", [False, True])
def test_rank_user_equals_the_last_recommendation_and_the_offline_model(model, trace_step):
    scorer = Scorer(model, ITEM_IDS, "v1", trace_step=trace_step)
    items = [3, 7, 7, 12, 5, 9]
    records, recommendations, _ = scorer.process(events_for("u", items), {"u": None})
    record = records["u"]
    state = scorer.load(["u"], {"u": UserRecord.from_bytes(record.to_bytes())}, {}, BatchStats())
    ranked, how = scorer.rank_user(record, state[USER_REPR], 10, exclude_seen=False)
    assert how == "state" and record.last_version == "v1"
    assert record.last_event_time == 1_700_000_000_000 + len(items) - 1
    last = recommendations[-1]["items"]
    assert [item for item, _ in ranked] == [i["item_id"] for i in last]
    assert torch.allclose(torch.tensor([s for _, s in ranked]),
                          torch.tensor([i["score"] for i in last]), atol=1e-5)
    want_items, want_scores = offline_top(model, items, 25)
    ranked, _ = scorer.rank_user(record, state[USER_REPR], 25, exclude_seen=False)
    assert [item for item, _ in ranked] == want_items
    assert torch.allclose(torch.tensor([s for _, s in ranked]), want_scores, atol=1e-4)
    ranked, _ = scorer.rank_user(record, state[USER_REPR], 25, exclude_seen=True)
    want_items, _ = offline_top(model, items, 25, exclude=set(items))
    assert [item for item, _ in ranked] == want_items
    assert not {ITEM_IDS[i] for i in items} & {item for item, _ in ranked}
    # k beyond the catalogue: every known item once, the pad item never.
    ranked, _ = scorer.rank_user(record, state[USER_REPR], 1000, exclude_seen=False)
    assert sorted(item for item, _ in ranked) == sorted(ITEM_IDS[1:])


def test_after_a_swap_a_user_is_ranked_by_the_new_version_over_its_history(model):
    scorer = Scorer(model, ITEM_IDS, "v1")
    items = [4, 8, 15, 16]
    records, _, _ = scorer.process(events_for("u", items), {"u": None})
    torch.manual_seed(1)
    newer = build_model("mlsa4rec-s", N_ITEMS, {"hidden": 32}).eval()
    scorer.swap(newer, ITEM_IDS, "v2", parent="v1")        # a child: the stream keeps states
    record = UserRecord.from_bytes(records["u"].to_bytes())
    state = scorer.load(["u"], {"u": record}, {}, BatchStats())
    ranked, how = scorer.rank_user(record, state[USER_REPR], 10, exclude_seen=False)
    assert how == "history"
    want_items, want_scores = offline_top(newer, items, 10)
    assert [item for item, _ in ranked] == want_items
    assert torch.allclose(torch.tensor([s for _, s in ranked]), want_scores, atol=1e-4)


def test_a_state_stored_before_the_user_representation_reads_and_goes_on_exactly(model):
    scorer = Scorer(model, ITEM_IDS, "v1")
    items = [2, 9, 11]
    state = model.init_state(1)
    for i in items:
        state, _ = model.step(state, torch.tensor([i]))
    old = UserRecord(model_version="v1", state=states_to_bytes(state)[0], last_offset=2,
                     history=[ITEM_IDS[i] for i in items], events_applied=3)
    assert USER_REPR not in state
    loaded = scorer.load(["u"], {"u": UserRecord.from_bytes(old.to_bytes())}, {}, BatchStats())
    assert torch.isnan(loaded[USER_REPR]).all()
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    ranked, how = scorer.rank_user(old, loaded[USER_REPR], 10, exclude_seen=False)
    assert how == "history"                        # no representation stored: recomputed
    assert [item for item, _ in ranked] == offline_top(model, items, 10)[0]
    # The next click goes on from the stored state exactly, and stores its representation.
    records, recommendations, _ = scorer.process(events_for("u", [6], start=3),
                                                 {"u": UserRecord.from_bytes(old.to_bytes())})
    want_items, want_scores = offline_top(model, items + [6], 10)
    assert [i["item_id"] for i in recommendations[0]["items"]] == want_items
    reloaded = scorer.load(["u"], {"u": records["u"]}, {}, BatchStats())
    assert torch.isfinite(reloaded[USER_REPR]).all()
    assert scorer.rank_user(records["u"], reloaded[USER_REPR], 10, False)[1] == "state"


def test_a_stall_is_reported_once_with_the_consumers_state_and_never_stops_the_worker(caplog):
    import types

    from streams.worker import agents

    calls = []

    def state():
        calls.append(1)
        return True, {"partitions": {0: {"end": 9, "read": 3, "paused": True}}}
    agent = types.SimpleNamespace(input_state=state, stall_reported=False, recovery=None,
                                  last_event_at=agents.time.monotonic())
    agents.ScoringAgent.check_stall(agent)
    assert not calls                                  # a click came recently: nothing asked
    agent.last_event_at -= agents.STALL_S + 1
    with caplog.at_level("WARNING"):
        agents.ScoringAgent.check_stall(agent)
        agents.ScoringAgent.check_stall(agent)
    warnings = [r.getMessage() for r in caplog.records if "no click for" in r.getMessage()]
    assert len(warnings) == 1 and "'paused': True" in warnings[0] and len(calls) == 1
    assert agent.stalled.startswith("no click for")      # /health says so (worker_health)

    def broken():
        raise KeyError("not assigned")
    agent = types.SimpleNamespace(input_state=broken, stall_reported=False, recovery=None,
                                  last_event_at=agents.time.monotonic() - 100)
    with caplog.at_level("WARNING"):
        agents.ScoringAgent.check_stall(agent)         # no exception: the worker goes on
    assert "could not be read: KeyError('not assigned')" in caplog.text


def test_a_table_restore_is_not_a_stall_and_the_idle_clock_starts_when_it_ends():
    import threading
    import types

    from streams.worker import agents

    recovery = types.SimpleNamespace(completed=threading.Event(), in_recovery=False)
    agent = types.SimpleNamespace(input_state=lambda: (True, {}), stall_reported=False,
                                  stalled=None, recovery=recovery,
                                  last_event_at=agents.time.monotonic() - 100)
    agents.ScoringAgent.check_stall(agent)            # the first restore, minutes long
    assert agent.stalled is None
    recovery.completed.set()
    recovery.in_recovery = True                       # a later rebalance's restore
    agent.last_event_at -= 100
    agents.ScoringAgent.check_stall(agent)
    assert agent.stalled is None
    recovery.in_recovery = False                      # restored: idle since just now
    agents.ScoringAgent.check_stall(agent)
    assert agent.stalled is None
    agent.last_event_at -= agents.STALL_S + 1         # and then nothing for STALL_S
    agents.ScoringAgent.check_stall(agent)
    assert agent.stalled.startswith("no click for")
