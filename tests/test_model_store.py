"""The model store: a directory or any fsspec URL; versions load only whole, checked, inside."""

import hashlib
import json
import threading

import pytest
import torch

from model.models import build_model
from streams.shared.model_store import ModelStore
from streams.shared.model_updates import ModelWatcher

IDS = ["[PAD]"] + [f"i{n}" for n in range(1, 20)]


@pytest.fixture(params=["directory", "memory-url"])
def store(request, tmp_path):
    if request.param == "directory":
        return ModelStore(tmp_path / "models")
    return ModelStore(f"memory://models-{id(request)}")


def test_a_published_version_loads_and_a_bad_one_is_refused(store):
    torch.manual_seed(0)
    model = build_model("mlsa4rec-s", len(IDS), {"hidden": 16, "n_heads": 2, "n_interests": 4})
    announcement = store.publish(model, IDS, {"ndcg@10": 0.1}, parent="v0")
    loaded, payload = store.load(announcement)
    assert payload["item_ids"] == IDS and payload["extra"]["parent"] == "v0"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert not [p for p in store.fs.ls(store.base, detail=False) if p.endswith(".tmp")]

    path = store.resolve(announcement["path"])
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[:-50] + b"\0" * 50)                      # altered
    with pytest.raises(ValueError, match="sha256"):
        store.load(announcement)
    with pytest.raises(ValueError, match="outside the model store"):
        store.load({**announcement, "path": "../elsewhere/x.pt"})
    with pytest.raises(OSError):
        store.load({**announcement, "path": "missing.pt"})
    with pytest.raises(ValueError, match="without sha256"):
        store.load({**announcement, "sha256": ""})
    garbage = b"not a checkpoint"
    store.fs.pipe_file(store.resolve("garbage.pt"), garbage)
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        store.load({**announcement, "path": "garbage.pt",
                    "sha256": hashlib.sha256(garbage).hexdigest()})



# ------------------------------------------------------------------ the scorer's watcher

def test_no_record_stops_the_watcher_each_bad_version_is_refused_and_good_ones_load(tmp_path):
    store = ModelStore(tmp_path / "models")
    torch.manual_seed(0)
    model = build_model("mlsa4rec-s", len(IDS), {"hidden": 16, "n_heads": 2, "n_interests": 4})
    first = store.publish(model, IDS, {}, parent="v0")
    second = store.publish(model, IDS, {}, parent=first["version"])
    served, refused = [], []
    fail_next_swap = {"on": False}

    def on_model(model, payload, announcement):
        if fail_next_swap["on"]:
            fail_next_swap["on"] = False
            raise RuntimeError("swap failed")
        served.append(payload["version"])

    watcher = ModelWatcher("127.0.0.1:1", "model-updates", store, on_model, current_version="v0",
                           on_refused=lambda version, reason: refused.append((version, reason)))
    not_announcements = [None, b"\xff not json", b'"a string"', b"[1, 2]", b"{}",
                         b'{"version": 5}']                 # None: a tombstone
    for value in not_announcements:
        watcher.handle(value)                  # logged and ignored: not even a version to refuse
    for bad in ({"version": "v-path-not-text", "path": 5, "sha256": "ab"},
                {"version": "v-no-file", "path": "missing.pt", "sha256": "ab"},
                {**first, "sha256": "0" * 64}):
        watcher.handle(json.dumps(bad).encode())
    assert [version for version, _ in refused] == ["v-path-not-text", "v-no-file",
                                                   first["version"]]
    assert "TypeError" in refused[0][1] and "sha256" in refused[2][1]
    assert served == [] and watcher.current == "v0"

    fail_next_swap["on"] = True                # loads, but handing it to the agent fails
    watcher.handle(json.dumps(first).encode())
    assert refused[-1] == (first["version"], "RuntimeError: swap failed")
    assert watcher.current == "v0"
    watcher.handle(json.dumps(second).encode())
    watcher.handle(json.dumps(second).encode())    # the serving version again: nothing to do
    assert served == [second["version"]] and watcher.current == second["version"]


class FailingConsumer:
    def assign(self, partitions):
        pass

    def get_watermark_offsets(self, partition, timeout=None):
        return 0, 0

    def poll(self, timeout):
        raise RuntimeError("broker gone")

    def close(self):
        pass


def test_worker_health_fails_while_recovering_and_once_the_watcher_stops(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from streams.shared import model_updates
    from streams.worker.app import worker_health

    agent = SimpleNamespace(started=True, scorer=SimpleNamespace(version="v0"),
                            counts={"applied": 3}, failure=None, stalled=None)
    recovery = SimpleNamespace(completed=threading.Event(), in_recovery=False)
    assert worker_health(agent, recovery) == (False, {"model_version": "v0", "applied": 3,
                                                      "status": "recovering"})  # the first one
    recovery.completed.set()
    watcher = ModelWatcher("127.0.0.1:1", "model-updates", ModelStore(tmp_path / "models"),
                           on_model=None, current_version="v0")
    assert worker_health(agent, recovery) == (True, {"model_version": "v0", "applied": 3})
    recovery.in_recovery = True                 # a later rebalance restores partitions
    assert worker_health(agent, recovery) == (False, {"model_version": "v0", "applied": 3,
                                                      "status": "recovering"})
    recovery.in_recovery = False
    agent.failure = RuntimeError("scoring failed")     # a batch failed: the worker is stopping
    assert worker_health(agent, recovery) == (False, {
        "model_version": "v0", "applied": 3, "status": "failed: RuntimeError('scoring failed')"})
    agent.failure = None
    agent.stalled = "no click for 12 s while the input has clicks not read"   # check_stall
    assert worker_health(agent, recovery) == (False, {
        "model_version": "v0", "applied": 3, "status": f"stalled: {agent.stalled}"})
    agent.stalled = None

    monkeypatch.setattr(model_updates, "_consumer", lambda bootstrap: FailingConsumer())
    watcher.start()
    watcher.join(10)
    assert not watcher.is_alive() and not watcher.following
    ok, details = worker_health(agent, recovery, watcher)
    assert not ok
    assert details["model_updates"] == "stopped: RuntimeError: broker gone"


def test_start_up_reads_past_records_that_are_not_announcements(tmp_path, monkeypatch):
    """A tombstone or a JSON value that is not an object, newer than the newest good version,
    must not stop a worker or the trainer from starting on that version."""
    from streams.shared import model_updates
    from streams.shared.model_updates import newest_loadable, read_announcements

    store = ModelStore(tmp_path / "models")
    model = build_model("mlsa4rec-s", len(IDS), {"hidden": 16, "n_heads": 2, "n_interests": 4})
    good = store.publish(model, IDS, {}, parent=None)
    values = [json.dumps(good).encode(), None, b"[1, 2]", b'"x"', b"5", b"not json"]
    monkeypatch.setattr(model_updates, "_consumer", lambda bootstrap: FailingConsumer())
    monkeypatch.setattr(model_updates, "_read_to_end", lambda consumer, topic, timeout: values)
    announcements = read_announcements("127.0.0.1:1", "model-updates")
    assert announcements == [good]
    assert newest_loadable(store, announcements)[1]["version"] == good["version"]
