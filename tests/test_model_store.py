"""The model store: a directory or any fsspec URL; versions load only whole, checked, inside."""

import hashlib

import pytest
import torch

from model.models import build_model
from streams.model_store import ModelStore

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

