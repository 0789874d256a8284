"""Model-level checks: the common contract, causality, stepping, state bytes, checkpoints."""

import hashlib

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.models import MODELS, build_model
from model.models.base import OOV
from model.state import state_size, state_to_bytes, states_from_bytes

N_ITEMS = 60
SMALL = {
    "mlsa4rec-s": {"hidden": 32, "d_state": 8, "n_interests": 4},
    "mlsa4rec": {"hidden": 32, "d_state": 8, "n_interests": 4},
    "sasrec": {"hidden": 32, "n_layers": 1, "inner": 64, "max_len": 20},
    "mamba4rec": {"hidden": 32, "d_state": 8},
}
CAUSAL = ["mlsa4rec-s", "mamba4rec", "sasrec"]



def small_model(name, seed=0, **extra):
    torch.manual_seed(seed)
    return build_model(name, n_items=N_ITEMS, config={**SMALL[name], **extra})


def padded_batch():
    """Three right-padded sequences of lengths 7, 4, 1 in a (3, 7) batch."""
    g = torch.Generator().manual_seed(11)
    seq = torch.randint(1, N_ITEMS, (3, 7), generator=g)
    lengths = torch.tensor([7, 4, 1])
    seq[torch.arange(7)[None, :] >= lengths[:, None]] = 0
    return seq, lengths


def test_registry_covers_all_models():
    assert set(MODELS) == set(SMALL)
    with pytest.raises(ValueError):
        build_model("no-such-model", n_items=N_ITEMS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_contract_scores_and_loss(name):
    model = small_model(name)
    assert model.name == name
    seq, lengths = padded_batch()
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_scores(seq, lengths)
    assert scores.shape == (3, N_ITEMS)
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()

    model.train()
    if model.causal:
        targets = torch.zeros_like(seq)
        targets[:, :-1] = seq[:, 1:]                         # next item, 0 past the end
        targets[0, -1] = 5                                    # the full row has a last target
        assert (targets == 0).any()
    else:
        targets = torch.tensor([3, 17, 59])
    loss = model.loss(seq, lengths, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() > 0
    loss.backward()
    grad = model.item_embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_causal_loss_ignores_zero_targets():
    model = small_model("mamba4rec").eval()             # eval: no dropout noise
    seq, lengths = padded_batch()
    targets = torch.zeros_like(seq)
    targets[0, :3] = torch.tensor([4, 8, 15])
    with torch.no_grad():
        loss = model.loss(seq, lengths, targets)
        # the same loss by hand over the three scored positions
        out = model.sequence_output(seq)[0, :3]
        logits = out @ model.item_embedding.weight.t()
        expected = torch.nn.functional.cross_entropy(logits, targets[0, :3])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", CAUSAL)
def test_right_padding_does_not_change_valid_outputs(name):
    model = small_model(name).eval()
    g = torch.Generator().manual_seed(3)
    short = torch.randint(1, N_ITEMS, (1, 5), generator=g)
    long = torch.randint(1, N_ITEMS, (1, 9), generator=g)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :5], batch[1] = short[0], long[0]
    with torch.no_grad():
        alone = model.sequence_output(short)
        together = model.sequence_output(batch)
        torch.testing.assert_close(together[0, :5], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(batch, torch.tensor([5, 9]))[0],
                                   model(short, torch.tensor([5]))[0], rtol=1e-5, atol=1e-5)


def test_paper_model_is_not_causal_and_streaming_variant_is():
    seq = torch.randint(1, N_ITEMS, (1, 8), generator=torch.Generator().manual_seed(5))
    longer = torch.cat([seq, torch.tensor([[42]])], dim=1)
    paper = small_model("mlsa4rec").eval()
    streaming = small_model("mlsa4rec-s").eval()
    assert not paper.causal and streaming.causal and streaming.steppable
    with torch.no_grad():
        assert (paper.sequence_output(longer)[:, :8] - paper.sequence_output(seq)).abs().max() > 1e-4
        torch.testing.assert_close(streaming.sequence_output(longer)[:, :8],
                                   streaming.sequence_output(seq), rtol=1e-5, atol=1e-5)


def _step_all(model, items):
    state = model.init_state(items.shape[0])
    outs = []
    for t in range(items.shape[1]):
        state, y = model.step(state, items[:, t])
        outs.append(y)
    return state, torch.stack(outs, dim=1)


def test_mlsa4rec_s_default_config_step_reproduces_forward():
    torch.manual_seed(0)
    model = build_model("mlsa4rec-s", n_items=N_ITEMS).eval()      # default config: hidden 64
    assert model.config.hidden == 64
    assert state_size(model.init_state(1)) == 16_464
    items = torch.randint(1, N_ITEMS, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.sequence_output(items)
    _, stepped = _step_all(model, items)
    assert stepped.shape == full.shape == (2, 200, 64)
    assert (stepped - full).abs().max().item() <= 1e-4


def test_mamba4rec_step_reproduces_forward():
    torch.manual_seed(0)
    model = build_model("mamba4rec", n_items=N_ITEMS).eval()
    items = torch.randint(1, N_ITEMS, (3, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.sequence_output(items)
    _, stepped = _step_all(model, items)
    assert (stepped - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["mlsa4rec-s", "mamba4rec"])
def test_prefill_reaches_the_state_that_stepping_reaches(name):
    """Rows of different lengths (0, 1, 3 and 50, one with an unknown item): the parallel
    prefill gives each row the state and output of stepping its valid items, and stepping on
    from either state gives the same next output."""
    torch.manual_seed(0)
    model = build_model(name, n_items=N_ITEMS).eval()
    lengths = torch.tensor([0, 1, 3, 50])
    items = torch.randint(1, N_ITEMS, (4, 50), generator=torch.Generator().manual_seed(5))
    items[2, 1] = OOV
    items[torch.arange(50) >= lengths.view(-1, 1)] = 0                     # right padding
    state, user_repr = model.prefill(items, lengths)
    stepped, stepped_repr = model.init_state(4), torch.zeros(4, model.config.hidden)
    for row, length in enumerate(lengths.tolist()):
        one = model.init_state(1)
        for t in range(length):
            one, out = model.step(one, items[row, t:t + 1])
            stepped_repr[row] = out[0]
        for key in stepped:
            stepped[key][row] = one[key][0]
    assert set(state) == set(stepped)
    for key in stepped:
        assert state[key].shape == stepped[key].shape, key
        assert torch.allclose(state[key], stepped[key], atol=1e-4, rtol=1e-4), key
    assert (user_repr[1:] - stepped_repr[1:]).abs().max() <= 1e-4
    after = torch.randint(1, N_ITEMS, (4,), generator=torch.Generator().manual_seed(6))
    _, next_from_prefill = model.step(state, after)
    _, next_from_steps = model.step(stepped, after)
    assert (next_from_prefill - next_from_steps).abs().max() <= 1e-4


# ------------------------------------------------------------------------ state bytes

def _stepped_state():
    model = small_model("mlsa4rec-s").eval()
    items = torch.randint(1, N_ITEMS, (2, 6), generator=torch.Generator().manual_seed(4))
    state, _ = _step_all(model, items)
    return model, state


def test_state_bytes_round_trip_fp32_exact():
    model, state = _stepped_state()
    blobs = [state_to_bytes(state, row) for row in range(2)]
    size = state_size(state)
    assert all(len(b) == 1 + 4 * size for b in blobs)
    restored = states_from_bytes(blobs, model.init_state(1))
    assert set(restored) == set(state)
    for key in state:
        assert restored[key].shape == state[key].shape
        assert torch.equal(restored[key], state[key]), key
    # one row alone
    one = states_from_bytes([blobs[1]], model.init_state(1))
    for key in state:
        assert torch.equal(one[key][0], state[key][1])


def test_state_bytes_fp16_about_half_and_close():
    model, state = _stepped_state()
    b32 = state_to_bytes(state, 0)
    b16 = state_to_bytes(state, 0, dtype=torch.float16)
    assert len(b16) - 1 == (len(b32) - 1) // 2
    assert b16[0] != b32[0]
    restored = states_from_bytes([b16], model.init_state(1))
    for key in state:
        assert restored[key].dtype == torch.float32
        torch.testing.assert_close(restored[key][0], state[key][0], rtol=2e-3, atol=2e-3)


def test_state_bytes_rejects_bad_blobs():
    model, state = _stepped_state()
    template = model.init_state(1)
    blob = state_to_bytes(state, 0)
    with pytest.raises(ValueError):
        states_from_bytes([blob[:-4]], template)              # one value short
    with pytest.raises(ValueError):
        states_from_bytes([blob + b"\0\0\0\0"], template)     # one value too many
    with pytest.raises(ValueError):
        states_from_bytes([bytes([99]) + blob[1:]], template)  # unknown tag
    with pytest.raises(ValueError):
        states_from_bytes([b""], template)
    with pytest.raises(ValueError):
        state_to_bytes(state, 0, dtype=torch.float64)


def test_stepping_from_restored_state_matches_original():
    model, state = _stepped_state()
    restored = states_from_bytes([state_to_bytes(state, r) for r in range(2)], model.init_state(1))
    nxt = torch.tensor([7, 33])
    _, y_orig = model.step(state, nxt)
    _, y_rest = model.step(restored, nxt)
    assert torch.equal(y_rest, y_orig)


# ------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_unknown_item_is_read_as_the_mean_known_item(name):
    """OOV (-1) in a history is an item with the known items' mean vector, seen like any other
    item (SASRec's key mask must not take it for padding)."""
    model = small_model(name, seed=5).eval()
    with torch.no_grad():
        others = torch.cat([model.item_embedding.weight[1:7], model.item_embedding.weight[8:]])
        model.item_embedding.weight[7] = others.mean(dim=0)   # now the mean of all known rows
        unknown = model(torch.tensor([[3, OOV, 5, 0]]), torch.tensor([3]))
        as_mean = model(torch.tensor([[3, 7, 5, 0]]), torch.tensor([3]))
    assert torch.allclose(unknown, as_mean, atol=1e-5)

@pytest.mark.parametrize("name", ["mlsa4rec-s", "sasrec"])
def test_checkpoint_round_trip(tmp_path, name):
    model = small_model(name, seed=3).eval()
    item_ids = ["[PAD]"] + [f"i{k}" for k in range(1, N_ITEMS)]
    path = tmp_path / "sub" / "model.pt"
    sha = save_checkpoint(path, model, item_ids, {"hr@10": 0.5}, version="v1")
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not path.with_suffix(".pt.tmp").exists()

    raw = torch.load(path, weights_only=True)
    assert raw["model"] == name and raw["item_ids"] == item_ids and raw["version"] == "v1"

    loaded, payload = load_checkpoint(path, expected_sha256=sha)
    assert not loaded.training and type(loaded) is type(model)
    assert payload["metrics"] == {"hr@10": 0.5}
    assert loaded.config == model.config
    seq, lengths = padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded.full_sort_scores(seq, lengths), model.full_sort_scores(seq, lengths))

    with pytest.raises(ValueError):
        load_checkpoint(path, expected_sha256="0" * 64)
