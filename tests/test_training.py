"""Metrics, training samples, end-to-end learning, typed config and the command line."""

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch

import cli
from model import config as typed_config
from model.checkpoint import load_checkpoint
from model.data.protocol import EvalSplit, SequenceData, split_leave_one_out
from model.metrics import format_table, mask_seen, metrics_from_ranks, target_ranks
from model.models import build_model
from model.training import TrainConfig, causal_windows, evaluate, prefix_windows, train



@pytest.fixture
def clean_env(monkeypatch):
    import os
    for key in list(os.environ):
        if key.startswith("MLSA4REC_"):
            monkeypatch.delenv(key)
    return monkeypatch


# ------------------------------------------------------------------------ metrics

def scores_with_ranks(ranks, n_items=40):
    """One row per rank r: the target (item 1) has exactly r items scored above it."""
    rows, targets = [], []
    for r in ranks:
        scores = torch.arange(n_items, 0, -1, dtype=torch.float32)   # item i has rank i
        scores[0] = -torch.inf                                         # pad
        target = r + 1                                                 # r real items above it
        rows.append(scores)
        targets.append(target)
    return torch.stack(rows), torch.tensor(targets)


def test_target_ranks_and_metrics_by_hand():
    scores, targets = scores_with_ranks([0, 3, 12, 30])
    ranks = target_ranks(scores, targets)
    assert ranks.tolist() == [0, 3, 12, 30]
    m = metrics_from_ranks(ranks)
    expected = {
        "hr@5": 2 / 4, "hr@10": 2 / 4, "hr@20": 3 / 4,
        "ndcg@5": (1 + 1 / math.log2(5)) / 4,
        "ndcg@10": (1 + 1 / math.log2(5)) / 4,
        "ndcg@20": (1 + 1 / math.log2(5) + 1 / math.log2(14)) / 4,
        "mrr@5": (1 + 1 / 4) / 4,
        "mrr@10": (1 + 1 / 4) / 4,
        "mrr@20": (1 + 1 / 4 + 1 / 13) / 4,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key


def test_items_that_tie_with_the_target_rank_ahead_of_it():
    # Untrained rows of new items all score alike: none of them may count as a hit for that.
    scores = torch.tensor([[-torch.inf, 1.0, 1.0, 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [3]      # behind 4 and 1, 3
    assert target_ranks(scores, torch.tensor([4])).tolist() == [0]
    flat = torch.zeros(1, 200)                                          # all tie: last
    assert target_ranks(flat, torch.tensor([7])).tolist() == [199]
    m = metrics_from_ranks(torch.tensor([4, 5]), cutoffs=(5,))        # rank 5 is outside top 5
    assert m["hr@5"] == 0.5 and m["mrr@5"] == pytest.approx(1 / 5 / 2)


def test_a_target_scored_nan_or_inf_ranks_last_not_first():
    # A diverged model: NaN > x is False, so without the guard NaN would rank first (a hit).
    scores = torch.cat([torch.tensor([[-torch.inf, 1.0, torch.nan, 3.0],
                                      [-torch.inf, torch.nan, torch.nan, torch.nan],
                                      [-torch.inf, 1.0, torch.inf, 0.0]]),
                        torch.zeros(3, 8)], dim=1)                      # 12 items
    ranks = target_ranks(scores, torch.tensor([2, 1, 2]))
    assert ranks.tolist() == [12, 12, 12]
    assert metrics_from_ranks(ranks, cutoffs=(10,))["hr@10"] == 0.0


def test_excluding_seen_items_lifts_the_target_past_them_and_a_seen_target_ranks_last():
    scores = torch.tensor([[-torch.inf, 5.0, 4.0, 3.0, 2.0, 1.0],
                           [-torch.inf, 5.0, 4.0, 3.0, 2.0, 1.0]])
    targets = torch.tensor([4, 2])
    assert target_ranks(scores, targets).tolist() == [3, 1]
    masked = mask_seen(scores.clone(), [np.array([1, 3]), np.array([2, 5])])
    assert masked[0].tolist() == [-math.inf, -math.inf, 4.0, -math.inf, 2.0, 1.0]
    # user 0 saw items 1 and 3, both above its target: rank 3 -> 1. User 1 had already seen
    # its target (item 2): it cannot be recommended, so it ranks last, not first.
    assert target_ranks(masked, targets).tolist() == [1, 6]


class FixedScores(torch.nn.Module):
    """Scores item i as i, whatever the input: the ranking is known in advance."""

    def __init__(self, n_items):
        super().__init__()
        self.n_items = n_items

    def full_sort_scores(self, inputs, lengths):
        scores = torch.arange(self.n_items, dtype=torch.float32).repeat(len(inputs), 1)
        scores[:, 0] = -torch.inf
        return scores


def test_evaluate_excludes_the_whole_history_even_beyond_the_window_it_reads():
    # 10 items (1..9 real), item 9 scores highest. The user's target is item 5; items 9, 8
    # and 7 are above it, and all three are in the history, but only 8 within the last 2.
    split = EvalSplit(inputs=[np.array([9, 7, 1, 8], dtype=np.int64)],
                      targets=np.array([5], dtype=np.int64))
    model, cpu = FixedScores(10), torch.device("cpu")
    assert evaluate(model, split, 2, cpu)["mrr@20"] == pytest.approx(1 / 5)   # rank 4 (0-based)
    assert evaluate(model, split, 2, cpu, exclude_seen=True)["mrr@20"] == pytest.approx(1 / 2)
    assert evaluate(model, split, 0, cpu, exclude_seen=True)["mrr@20"] == pytest.approx(1 / 2)


def test_format_table_lists_every_metric():
    table = format_table({"test": metrics_from_ranks(torch.tensor([0, 7]))})
    header, row = table.splitlines()
    for name in ("hr@5", "ndcg@10", "mrr@20", "hr@10"):
        assert name in header
    assert row.split()[0] == "test" and len(row.split()) == 10


# ------------------------------------------------------------------------ training samples

def unique_sequences(lengths):
    """User u's items are u*1000 + 1..len: every item id says which user and position."""
    return [np.arange(1, n + 1, dtype=np.int64) + 1000 * u for u, n in enumerate(lengths)]


LENGTHS = [1, 2, 5, 7, 8, 9, 15, 17, 23]


@pytest.mark.parametrize("max_len, stride", [(4, 1), (8, 3), (8, 4)])
def test_overlapping_causal_windows_count_each_target_once_with_context(max_len, stride):
    seqs = unique_sequences(LENGTHS)
    inputs, targets = causal_windows(seqs, max_len, stride)
    expected_targets = sorted(int(x) for s in seqs for x in s[1:])
    got = sorted(int(x) for x in targets[targets > 0])
    assert got == expected_targets                       # each exactly once
    valid = targets > 0
    assert np.array_equal(targets[valid], inputs[valid] + 1)   # target = next of that input
    assert not (valid & (inputs == 0)).any()
    # a target sees max_len - stride items or more before it, unless fewer exist in its user
    starts = {int(s[0]) for s in seqs}
    for row_inputs, row_targets in zip(inputs, targets):
        first = int(row_inputs[0])
        for position in np.flatnonzero(row_targets):
            assert position + 1 >= max_len - stride + 1 or first in starts


@pytest.mark.parametrize("max_len", [1, 4, 8])
def test_causal_windows_cover_every_target_once(max_len):
    seqs = unique_sequences(LENGTHS)
    inputs, targets = causal_windows(seqs, max_len)
    assert inputs.shape == targets.shape and inputs.shape[1] == max_len
    expected_targets = sorted(int(x) for s in seqs for x in s[1:])
    got = sorted(int(x) for x in targets[targets > 0])
    assert got == expected_targets                       # each exactly once
    # aligned: same valid positions, target = next item of the input at the same position
    assert np.array_equal(inputs > 0, targets > 0)
    assert ((inputs > 0).sum(1) >= 1).all()
    valid = inputs > 0
    assert np.array_equal(targets[valid], inputs[valid] + 1)   # consecutive ids within a user
    # right-padded: no gap before a valid item
    for row in valid:
        n = row.sum()
        assert row[:n].all() and not row[n:].any()
    # a user's windows are contiguous and do not overlap in targets
    n_windows = sum(math.ceil((n - 1) / max_len) for n in LENGTHS if n > 1)
    assert len(inputs) == n_windows


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_prefix_windows_one_sample_per_target(max_len):
    seqs = unique_sequences(LENGTHS)
    inputs, lengths, targets = prefix_windows(seqs, max_len)
    assert len(inputs) == len(lengths) == len(targets) == sum(n - 1 for n in LENGTHS)
    assert sorted(targets.tolist()) == sorted(int(x) for s in seqs for x in s[1:])
    by_item = {int(x): (u, t) for u, s in enumerate(seqs) for t, x in enumerate(s)}
    for row, n, target in zip(inputs, lengths, targets):
        u, t = by_item[int(target)]
        expected = seqs[u][max(0, t - max_len):t]
        assert n == len(expected)
        assert np.array_equal(row[:n], expected) and not row[n:].any()


# ------------------------------------------------------------------------ learning end to end

def cycle_data(n_users=40, n_items=40, length=16, seed=0):
    rng = np.random.default_rng(seed)
    starts = rng.integers(n_items, size=n_users)
    sequences = [(np.arange(s, s + length) % n_items + 1).astype(np.int64) for s in starts]
    return SequenceData(item_ids=["[PAD]"] + [f"item{k}" for k in range(n_items)],
                        user_ids=[f"user{u}" for u in range(n_users)],
                        sequences=sequences,
                        timestamps=[np.arange(length, dtype=np.float64) for _ in sequences])


@pytest.mark.parametrize("name,config", [
    ("mlsa4rec-s", {"hidden": 32, "d_state": 8, "n_interests": 8}),
    ("mamba4rec", {"hidden": 32, "d_state": 8}),
])
def test_training_learns_a_predictable_cycle(name, config):
    data = cycle_data()
    _, _, test_split = split_leave_one_out(data)
    torch.manual_seed(0)
    model = build_model(name, data.n_items, {**config, "max_len": 20})
    before = evaluate(model, test_split, 20, torch.device("cpu"))["hr@5"]
    assert before < 0.5                                  # chance is 5/40
    cfg = TrainConfig(model=name, epochs=4, batch_size=16, max_len=20, lr=5e-3,
                      progress=False, device="cpu", patience=10)
    logs = []
    result = train(model, data, cfg, log=logs.append)
    assert result.test["hr@5"] >= 0.9, result.history
    assert result.valid["hr@5"] >= 0.9
    assert result.epochs_run == 4 and len(result.history) == 4
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert any("epoch 0" in line for line in logs)


def test_early_stopping_counts_patience_as_recbole(monkeypatch):
    """RecBole stops once more than stopping_step epochs in a row have not improved (and a
    tie counts as an improvement): with patience 2 and the best at epoch 2 (a tie), the run
    ends after the third miss, at epoch 5."""
    valid_ndcg = iter([0.10, 0.20, 0.20, 0.15, 0.19, 0.18, 0.30, 0.40])
    calls = {"n": 0}

    def fake_evaluate(model, split, max_len, device, batch_size=512):
        calls["n"] += 1
        return {"ndcg@10": next(valid_ndcg), "hr@10": 0.0}

    import model.training as training
    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    data = cycle_data(n_users=8, length=6)
    torch.manual_seed(0)
    model = build_model("mamba4rec", data.n_items, {"hidden": 16, "d_state": 4, "max_len": 8})
    logs = []
    result = train(model, data, TrainConfig(model="mamba4rec", epochs=8, batch_size=8,
                                            max_len=8, patience=2, progress=False,
                                            device="cpu"), log=logs.append)
    assert result.epochs_run == 6                    # epochs 0..5: best at 2, then 3 misses
    assert result.best_epoch == 2                    # the tie at epoch 2 is the best
    assert any("early stop" in line for line in logs)


def test_epoch_loss_is_the_cross_entropy_per_training_target():
    """lr 0 and no dropout: the logged loss must equal the mean CE over every training target,
    whatever the windows' sizes (a mean of batch means would weigh short windows more)."""
    data = cycle_data(n_users=12, length=13)
    torch.manual_seed(0)
    config = {"hidden": 16, "d_state": 4, "n_interests": 4, "dropout": 0.0,
              "attn_dropout": 0.0, "max_len": 5}
    model = build_model("mlsa4rec-s", data.n_items, config)
    result = train(model, data, TrainConfig(epochs=1, batch_size=3, max_len=5, lr=0.0,
                                            progress=False, device="cpu"), log=lambda _: None)
    train_seqs, _, _ = split_leave_one_out(data)
    inputs, targets = map(torch.from_numpy, causal_windows(train_seqs, 5))
    with torch.no_grad():
        output = model.sequence_output(inputs)
        mask = targets > 0
        expected = torch.nn.functional.cross_entropy(
            output[mask] @ model.item_embedding.weight.t(), targets[mask]).item()
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_whole_sequences_are_refused_for_a_model_with_a_length_limit():
    data = cycle_data(n_users=8, length=6)
    model = build_model("sasrec", data.n_items, {"hidden": 16, "max_len": 8})
    with pytest.raises(ValueError, match="length limit"):
        train(model, data, TrainConfig(model="sasrec", epochs=1, max_len=8, progress=False,
                                       whole_sequences=True, device="cpu"))


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("max_len", -1),
                                         ("patience", -1), ("lr", -0.1)])
def test_train_config_refuses_values_that_cannot_run(field, value):
    with pytest.raises(typed_config.ConfigError, match=field):
        TrainConfig(**{field: value})


# ------------------------------------------------------------------------ typed config

def parse_train_args(argv):
    parser = argparse.ArgumentParser()
    typed_config.add_arguments(parser, TrainConfig)
    return parser.parse_args(argv)


def test_config_precedence_cli_over_env_over_default(clean_env):
    default = TrainConfig().batch_size
    assert default not in (32, 8, 4)
    assert typed_config.build(TrainConfig, parse_train_args([])).batch_size == default
    clean_env.setenv("MLSA4REC_BATCH_SIZE", "32")
    clean_env.setenv("MLSA4REC_PROGRESS", "off")
    cfg = typed_config.build(TrainConfig, parse_train_args([]))
    assert cfg.batch_size == 32 and cfg.progress is False
    cfg = typed_config.build(TrainConfig, parse_train_args(["--batch-size", "8", "--progress",
                                                           "yes", "--lr", "0.5"]))
    assert cfg.batch_size == 8 and cfg.progress is True and cfg.lr == 0.5
    assert cfg.epochs == TrainConfig().epochs                # untouched field keeps its default
    assert typed_config.build(TrainConfig, parse_train_args(["--batch-size", "8"]),
                              batch_size=4).batch_size == 4   # explicit override wins


def test_config_bad_boolean_raises(clean_env):
    with pytest.raises(SystemExit):                          # argparse rejects it
        parse_train_args(["--progress", "maybe"])
    clean_env.setenv("MLSA4REC_PROGRESS", "maybe")
    with pytest.raises(typed_config.ConfigError, match="MLSA4REC_PROGRESS='maybe'"):
        typed_config.build(TrainConfig, parse_train_args([]))


def test_cli_names_a_bad_environment_variable(clean_env):
    clean_env.setenv("MLSA4REC_EPOCHS", "abc")
    with pytest.raises(SystemExit, match="MLSA4REC_EPOCHS='abc' is not a valid int"):
        cli.main(["train"])


# ------------------------------------------------------------------------ command line

def write_log(path, n_users=30, n_items=20, per_user=12):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for u in range(n_users):
            start = (7 * u) % n_items
            for t in range(per_user):
                writer.writerow([f"u{u}", f"i{(start + t) % n_items}", 1_000_000 + 60 * t + u])


def test_cli_train_then_evaluate(tmp_path, clean_env, capsys):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    ckpt = tmp_path / "m.pt"
    rc = cli.main(["train", "--dataset", str(dataset), "--epochs", "2", "--progress", "false",
                   "--threads", "1", "--checkpoint", str(ckpt), "--set", "hidden=32"])
    assert rc == 0
    assert ckpt.exists()
    run = json.loads(ckpt.with_suffix(".json").read_text())
    assert run["train_config"]["epochs"] == 2 and run["epochs_run"] == 2
    assert 0.0 <= run["test"]["hr@10"] <= 1.0
    model, payload = load_checkpoint(ckpt)
    assert payload["model"] == "mlsa4rec-s" and model.config.hidden == 32
    assert len(payload["item_ids"]) == 21
    train_out = capsys.readouterr().out
    assert "hr@10" in train_out and "sha256" in train_out

    rc = cli.main(["evaluate", str(ckpt), "--dataset", str(dataset), "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "hr@10" in out
    lines = out.splitlines()
    test_row = next(line for line in lines if line.startswith("test"))
    header = next(line for line in lines if "hr@10" in line)
    hr10 = float(test_row.split()[1 + header.split().index("hr@10")])
    assert hr10 == pytest.approx(run["test"]["hr@10"], abs=1e-4)

    rc = cli.main(["evaluate", str(ckpt), "--dataset", str(dataset), "--device", "cpu",
                   "--exclude-seen"])
    assert rc == 0
    assert "items the user saw excluded" in capsys.readouterr().out


def test_cli_evaluate_uses_the_filters_the_checkpoint_was_trained_with(tmp_path, clean_env,
                                                                       capsys):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    with open(dataset, "a", newline="") as f:            # an item with 3 events only
        csv.writer(f).writerows([[f"u{u}", "rare", 2_000_000 + u] for u in range(3)])
    ckpt = tmp_path / "m.pt"
    common = ["--progress", "false", "--threads", "1", "--device", "cpu"]
    assert cli.main(["train", "--dataset", str(dataset), "--epochs", "1", "--k-core", "3",
                     "--checkpoint", str(ckpt), *common]) == 0
    assert "rare" in load_checkpoint(ckpt)[1]["item_ids"]
    # with the default 5-core "rare" would be dropped and the item sets would differ
    assert cli.main(["evaluate", str(ckpt), "--device", "cpu"]) == 0
    assert "test" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs ratings"):  # a CSV log has no ratings
        cli.main(["train", "--dataset", str(dataset), "--epochs", "1", "--min-rating", "3",
                  "--checkpoint", str(tmp_path / "n.pt"), *common])


@pytest.mark.parametrize("pair,message", [
    ("hidden", "expects name=value"),
    ("no_such=1", "'no_such' is not a setting of MLSA4RecConfig"),
    ("hidden=big", "hidden='big' is not a valid int"),
    ("max_len=200", "use --max-len"),
])
def test_cli_set_refuses_what_it_cannot_apply(tmp_path, clean_env, pair, message):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--dataset", str(dataset), "--epochs", "1", "--progress", "false",
                  "--checkpoint", str(tmp_path / "x.pt"), "--set", pair])
    assert not (tmp_path / "x.pt").exists()


def test_cli_set_values_take_the_hyper_parameter_type(tmp_path, clean_env):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    ckpt = tmp_path / "m.pt"
    assert cli.main(["train", "--dataset", str(dataset), "--epochs", "1", "--progress", "false",
                     "--threads", "1", "--checkpoint", str(ckpt), "--set", "hidden=32",
                     "--set", "dropout=.25"]) == 0
    model, _ = load_checkpoint(ckpt)
    assert model.config.dropout == 0.25 and isinstance(model.config.dropout, float)


def test_cli_train_seed_fixes_the_initial_weights(tmp_path, clean_env):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    common = ["--dataset", str(dataset), "--progress", "false", "--threads", "1",
              "--set", "hidden=16", "--epochs", "1", "--lr", "0"]   # lr 0: weights = initial
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        torch.manual_seed(int(name.encode()[0]))      # whatever the process's RNG was before
        assert cli.main(["train", *common, "--seed", seed,
                         "--checkpoint", str(tmp_path / f"{name}.pt")]) == 0
    a, b, c = (load_checkpoint(tmp_path / f"{n}.pt")[0].state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["item_embedding.weight"], c["item_embedding.weight"])


def test_cli_evaluate_refuses_what_it_cannot_evaluate(tmp_path, clean_env):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="unreadable checkpoint"):
        cli.main(["evaluate", str(tmp_path / "junk.pt"), "--dataset", str(dataset)])
    with pytest.raises(SystemExit, match="No such file"):
        cli.main(["evaluate", str(tmp_path / "missing.pt"), "--dataset", str(dataset)])
    # a version published by the online trainer records no offline run
    from model.checkpoint import save_checkpoint
    model = build_model("mlsa4rec-s", 21, {"hidden": 16})
    save_checkpoint(tmp_path / "online.pt", model, ["[PAD]"] + [f"i{n}" for n in range(20)],
                    {"holdout": {}})
    with pytest.raises(SystemExit, match="no offline training run"):
        cli.main(["evaluate", str(tmp_path / "online.pt"), "--dataset", str(dataset)])
    # SASRec has a position table of max_len: it cannot read a whole history
    ckpt = tmp_path / "sasrec.pt"
    assert cli.main(["train", "--dataset", str(dataset), "--model", "sasrec", "--epochs", "1",
                     "--progress", "false", "--threads", "1", "--checkpoint", str(ckpt),
                     "--set", "hidden=16"]) == 0
    with pytest.raises(SystemExit, match="without a length limit"):
        cli.main(["evaluate", str(ckpt), "--whole-history"])


def test_cli_train_init_from_continues_a_checkpoint_and_refuses_another_model(tmp_path, clean_env):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    common = ["--dataset", str(dataset), "--progress", "false", "--threads", "1",
              "--set", "hidden=32"]
    assert cli.main(["train", *common, "--epochs", "1", "--checkpoint", str(first)]) == 0
    # lr 0: the continued run must keep exactly the weights it started from.
    assert cli.main(["train", *common, "--epochs", "1", "--lr", "0", "--init-from", str(first),
                     "--checkpoint", str(second)]) == 0
    a, _ = load_checkpoint(first)
    b, _ = load_checkpoint(second)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    with pytest.raises(SystemExit, match="mlsa4rec-s"):
        cli.main(["train", *common[:-2], "--model", "mamba4rec", "--epochs", "1",
                  "--init-from", str(first), "--checkpoint", str(tmp_path / "c.pt")])
    # the continued run keeps the checkpoint's own hyper-parameters (hidden 32) without
    # repeating them, and may change the ones that do not shape the weights
    third = tmp_path / "d.pt"
    assert cli.main(["train", *common[:-2], "--epochs", "1", "--init-from", str(first),
                     "--set", "dropout=0.3", "--checkpoint", str(third)]) == 0
    continued, _ = load_checkpoint(third)
    assert continued.config.hidden == 32 and continued.config.dropout == 0.3
    with pytest.raises(SystemExit, match="change the shape"):
        cli.main(["train", *common[:-2], "--epochs", "1", "--init-from", str(first),
                  "--set", "hidden=64", "--checkpoint", str(tmp_path / "e.pt")])
