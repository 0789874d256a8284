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
from model.data.protocol import SequenceData, split_leave_one_out
from model.metrics import format_table, metrics_from_ranks, target_ranks
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


def test_target_rank_counts_only_strictly_higher_scores():
    scores = torch.tensor([[-torch.inf, 1.0, 1.0, 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]      # ties do not count
    assert target_ranks(scores, torch.tensor([4])).tolist() == [0]
    m = metrics_from_ranks(torch.tensor([4, 5]), cutoffs=(5,))        # rank 5 is outside top 5
    assert m["hr@5"] == 0.5 and m["mrr@5"] == pytest.approx(1 / 5 / 2)


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
    with pytest.raises(ValueError):
        typed_config.build(TrainConfig, parse_train_args([]))


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


def test_cli_set_rejects_missing_value(tmp_path, clean_env):
    dataset = tmp_path / "log.csv"
    write_log(dataset)
    with pytest.raises(SystemExit):
        cli.main(["train", "--dataset", str(dataset), "--epochs", "1", "--progress", "false",
                  "--checkpoint", str(tmp_path / "x.pt"), "--set", "hidden"])


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
