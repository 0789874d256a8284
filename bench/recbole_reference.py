"""RecBole's own training and evaluation on the same data, as a reference for ours.

Runs one RecBole model (SASRec by default) under the protocol of docs/RESULTS.md: 5-core,
time order, leave-one-out, full ranking, CE over all items, no negative sampling. Compare
its per-epoch valid NDCG@10 and its test figures with `mlsa4rec train ... --window-stride 1`
(RecBole's samples) at the same batch size, lr and max length.

RecBole is not a dependency of this project; install it beside the venv, without its
dependency pins (it needs only these to train and evaluate):

    pip download --no-deps -d /tmp/rb/wheels recbole==1.2.1 colorlog colorama tabulate \
        texttable pyyaml scipy pandas python-dateutil pytz tzdata six tensorboard protobuf \
        absl-py grpcio markdown werkzeug scikit-learn joblib threadpoolctl cloudpickle narwhals
    pip install --no-deps --target /tmp/rb/site /tmp/rb/wheels/*.whl
    PYTHONPATH=/tmp/rb/site .venv/bin/python bench/recbole_reference.py --max-len 20 \
        --batch-size 256

The data is the ML-100k copy inside the recbole wheel (the same file our loader reads).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# RecBole 1.2.1 predates NumPy 2 and torch 2.6's weights_only default.
for _name, _type in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, _name):
        setattr(np, _name, _type)
_torch_load = torch.load
torch.load = lambda *a, **k: _torch_load(*a, **{**k, "weights_only": False})


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(tempfile.mkdtemp(prefix="recbole-reference-"))  # RecBole logs into the cwd

    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    settings = {
        "data_path": str(Path(recbole.__file__).parent / "dataset_example"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": "[5,inf)", "item_inter_num_interval": "[5,inf)",
        "MAX_ITEM_LIST_LENGTH": args.max_len, "train_neg_sample_args": None, "loss_type": "CE",
        "epochs": args.epochs, "train_batch_size": args.batch_size,
        "learning_rate": args.lr, "stopping_step": 10,
        "eval_args": {"split": {"LS": "valid_and_test"}, "mode": "full", "order": "TO"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [5, 10, 20], "valid_metric": "NDCG@10",
        "eval_batch_size": 4096, "use_gpu": False, "seed": args.seed, "show_progress": False,
        "checkpoint_dir": "/tmp/recbole-reference",
    }
    config = Config(model=args.model, dataset=args.dataset, config_dict=settings)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    started = time.time()
    _, valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    print(f"RecBole {recbole.__version__} {args.model} on {args.dataset}: "
          f"{time.time() - started:.0f}s (per-epoch figures in RecBole's log above)")
    for name, result in (("valid", valid), ("test", test)):
        print(f"{name:6} " + " ".join(f"{k} {float(v):.4f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
