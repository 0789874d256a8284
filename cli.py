"""The `mlsa4rec` command.

    mlsa4rec demo      [--dataset ml-100k]                              the whole system, end to end
    mlsa4rec train     [--dataset ml-100k] [--model mlsa4rec-s] [...]   train, evaluate, save
    mlsa4rec evaluate  CHECKPOINT [--dataset ...]                       test metrics of a checkpoint
    mlsa4rec worker    [--broker 127.0.0.1:9092] [--checkpoint ...]     run a scorer worker
    mlsa4rec trainer   [--broker ...] [--round-every-events 2000]      fine-tune online, publish versions
    mlsa4rec replay    SOURCE [--speed 60] [--start TIME] [--k-core 5]  replay a log into interactions
    mlsa4rec evaluate-stream [--out runs/report]                        judge the live recommendations
    mlsa4rec produce   FILE|-  [--broker ...]                           send clicks (JSON lines / CSV)
    mlsa4rec tail      [--broker ...] [--from-beginning]                print recommendations

Every TrainConfig field is an option (--batch-size ...) and an environment variable
(MLSA4REC_BATCH_SIZE=...); model hyper-parameters go as --set name=value.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from model import config as typed_config
from model.training import TrainConfig


def _model_overrides(model_name: str, pairs: list[str]) -> dict:
    """--set name=value pairs -> hyper-parameters of the model's config, typed."""
    from model.models import model_classes

    texts = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if not name or not value:
            raise SystemExit(f"--set expects name=value, got {pair!r}")
        if name == "max_len":
            raise SystemExit("--set max_len: use --max-len, which the training windows follow too")
        texts[name] = value
    try:
        return typed_config.parse_fields(model_classes(model_name)[1], texts)
    except typed_config.ConfigError as exc:
        raise SystemExit(f"--set {exc}")
    except ValueError as exc:                     # an unknown model
        raise SystemExit(str(exc))


def _apply_recipe(args) -> None:
    """--recipe NAME: its values for the settings neither the command line nor the
    environment gives (model/training.py RECIPES)."""
    from model.training import RECIPES

    for name, value in RECIPES.get(args.recipe or "", {}).items():
        if getattr(args, name) is None and f"MLSA4REC_{name.upper()}" not in os.environ:
            setattr(args, name, value)


def cmd_train(args) -> int:
    from model.metrics import format_table
    from model.training import train_to_checkpoint

    _apply_recipe(args)
    cfg = typed_config.build(TrainConfig, args)
    overrides = _model_overrides(cfg.model, args.set or [])
    try:
        result, path, sha = train_to_checkpoint(cfg, overrides, resume=args.resume)
    except ValueError as exc:
        raise SystemExit(str(exc))
    print(f"\n{cfg.model} on {cfg.dataset}: best epoch {result.best_epoch} of "
          f"{result.epochs_run}, {result.seconds:.0f}s, "
          f"{result.sequences_per_second:.0f} training sequences/s")
    print(format_table({"valid": result.valid, "test": result.test}))
    print(f"checkpoint {path} sha256 {sha}")
    return 0


def cmd_demo(args) -> int:
    from streams.demo import DemoConfig, run_demo

    run_demo(typed_config.build(DemoConfig, args))
    return 0


def cmd_evaluate(args) -> int:
    from model.checkpoint import checkpoint_data, load_checkpoint
    from model.data.protocol import split_leave_one_out
    from model.metrics import format_table
    from model.training import evaluate, pick_device

    device = pick_device(args.device)
    try:
        model, payload = load_checkpoint(args.checkpoint, device=device)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot load {args.checkpoint}: {exc}")
    if args.whole_history:
        try:
            model.require_whole_histories("--whole-history")
        except ValueError as exc:
            raise SystemExit(str(exc))
    try:
        data = checkpoint_data(payload, args.dataset)
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"{args.checkpoint}: {exc}")
    max_len = 0 if args.whole_history else payload["config"].get("max_len", 50)
    dataset = args.dataset or payload["metrics"]["train_config"]["dataset"]
    _, valid, test = split_leave_one_out(data)
    rows = {"valid": evaluate(model, valid, max_len, device, exclude_seen=args.exclude_seen),
            "test": evaluate(model, test, max_len, device, exclude_seen=args.exclude_seen)}
    seen = ", items the user saw excluded" if args.exclude_seen else ""
    print(f"{payload['model']} version {payload['version']} on {dataset}{seen}")
    print(format_table(rows))
    return 0


def cmd_worker(args) -> int:
    from streams.worker.app import run_worker
    from streams.shared.config import StreamConfig

    run_worker(typed_config.build(StreamConfig, args))
    return 0


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (how services are stopped) as an exception, so `finally` blocks run: the
    replay records what it delivered, the trainer closes its buffer and leaves its group.
    SIGINT alone is not enough: a shell ignores it in the jobs it starts in the background."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def cmd_trainer(args) -> int:
    from streams.shared.config import TrainerConfig
    from streams.trainer.trainer import run_trainer

    cfg = typed_config.build(TrainerConfig, args)
    _stop_cleanly_on_sigterm()
    run_trainer(cfg)
    return 0


def cmd_replay(args) -> int:
    from streams.replay.log_replay import ReplayConfig, replay

    cfg = typed_config.build(ReplayConfig, args)
    _stop_cleanly_on_sigterm()
    sent = replay(args.source, cfg)
    print(f"replayed {sent} events of {args.source} to {cfg.interactions_topic}", file=sys.stderr)
    return 0


def cmd_evaluate_stream(args) -> int:
    from streams.shared.config import StreamConfig, use_configured_schemas
    from streams.replay.evaluation import run_evaluate_stream
    from streams.replay.report import write_report

    cfg = typed_config.build(StreamConfig, args)
    use_configured_schemas(cfg)
    result = run_evaluate_stream(cfg.broker, cfg.interactions_topic, cfg.recommendations_topic,
                                 args.out, idle_timeout_s=args.idle_timeout,
                                 expect_recommendations=args.expect)
    offline = json.loads(Path(args.offline).read_text()) if args.offline else None
    page = write_report(result, args.out, title=args.title, offline=offline)
    print(json.dumps(result["summary"], indent=2))
    print(f"report: {page}")
    return 0


def cmd_produce(args) -> int:
    """A regular file is checked whole before anything is sent, so a bad record sends nothing;
    clicks from stdin or a pipe (which cannot be read twice) are sent as they come, and a bad
    one stops there, saying how many went."""
    from streams.shared.clients import BadClick, check_clicks, produce_clicks, read_clicks
    from streams.shared.config import StreamConfig, use_configured_schemas

    cfg = typed_config.build(StreamConfig, args)
    use_configured_schemas(cfg)         # clicks are checked and sent with the registry's ids
    whole_file = args.source != "-" and os.path.isfile(args.source)
    try:
        if whole_file:
            check_clicks(args.source)
        count = produce_clicks(cfg.broker, cfg.interactions_topic, read_clicks(args.source))
    except BadClick as exc:
        raise SystemExit(f"nothing sent: {exc}" if whole_file else str(exc))
    except OSError as exc:
        raise SystemExit(f"cannot read {args.source}: {exc}")
    print(f"produced {count} clicks to {cfg.interactions_topic}", file=sys.stderr)
    return 0


def cmd_tail(args) -> int:
    from streams.shared.clients import tail_recommendations
    from streams.shared.config import StreamConfig, use_configured_schemas

    from schemas.codec import DecodeError

    cfg = typed_config.build(StreamConfig, args)
    use_configured_schemas(cfg)
    try:
        for rec in tail_recommendations(cfg.broker, cfg.recommendations_topic, args.from_beginning,
                                        args.max, args.idle_timeout):
            print(json.dumps(rec), flush=True)
    except DecodeError as exc:
        # Ids of a registry and ids.json's overlap: a reader without the writer's source of
        # ids reads another schema's bytes. Stop at it (what came before is printed).
        raise SystemExit(f"mlsa4rec tail: {exc}\n(the worker and tail must both use the same "
                         "--schema-registry-url, or both none)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlsa4rec", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from streams.demo import DemoConfig
    p_demo = sub.add_parser("demo", help="broker + scorer + trainer, replay, live metrics, report")
    typed_config.add_arguments(p_demo, DemoConfig)
    p_demo.set_defaults(func=cmd_demo)
    p_train = sub.add_parser("train", help="train and evaluate a model offline")
    typed_config.add_arguments(p_train, TrainConfig)
    p_train.add_argument("--set", action="append", metavar="NAME=VALUE",
                         help="model hyper-parameter, e.g. --set n_mamba_layers=2")
    from model.training import RECIPES
    p_train.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                         help="a named set of training settings, below the options given: "
                              + "; ".join(f"{k}: " + ", ".join(f"{n}={v}" for n, v in r.items())
                                          for k, r in RECIPES.items()))
    p_train.add_argument("--resume", action="store_true",
                         help="go on with the run in --run-dir from its last finished epoch "
                              "(the same settings as the command that started it)")
    p_train.set_defaults(func=cmd_train)
    p_eval = sub.add_parser("evaluate", help="evaluate a checkpoint under the offline protocol")
    p_eval.add_argument("checkpoint")
    p_eval.add_argument("--dataset", default=None)
    p_eval.add_argument("--device", default="auto")
    p_eval.add_argument("--whole-history", action="store_true",
                        help="rank with each user's whole history, as the stream does "
                             "(causal models), instead of the last max_len items")
    p_eval.add_argument("--exclude-seen", action="store_true",
                        help="drop the items each user already saw from the ranking (the "
                             "stream's --exclude-seen; RecBole's protocol keeps them)")
    p_eval.set_defaults(func=cmd_evaluate)
    from streams.shared.config import StreamConfig
    p_worker = sub.add_parser("worker", help="run a scorer worker (Faust)")
    typed_config.add_arguments(p_worker, StreamConfig)
    p_worker.set_defaults(func=cmd_worker)
    from streams.shared.config import TrainerConfig
    p_trainer = sub.add_parser("trainer", help="fine-tune online from the stream, publish versions")
    typed_config.add_arguments(p_trainer, TrainerConfig)
    p_trainer.set_defaults(func=cmd_trainer)
    from streams.replay.log_replay import ReplayConfig
    p_replay = sub.add_parser("replay", help="replay a historical log into interactions")
    p_replay.add_argument("source", help="ml-1m, ml-100k, or a .csv / .parquet log")
    typed_config.add_arguments(p_replay, ReplayConfig)
    p_replay.set_defaults(func=cmd_replay)
    p_evs = sub.add_parser("evaluate-stream",
                           help="judge recommendations by each user's next click; write a report")
    typed_config.add_arguments(p_evs, StreamConfig)
    p_evs.add_argument("--out", default="runs/report", help="folder for the report")
    p_evs.add_argument("--idle-timeout", type=float, default=15.0,
                       help="stop after this many seconds without a message")
    p_evs.add_argument("--expect", type=int, default=0,
                       help="stop once this many recommendations arrived (0 = wait for idle)")
    p_evs.add_argument("--offline", default="", help="JSON of offline metrics to show beside")
    p_evs.add_argument("--title", default="mlsa4rec replay report")
    p_evs.set_defaults(func=cmd_evaluate_stream)
    p_produce = sub.add_parser("produce", help="send clicks to the interactions topic")
    p_produce.add_argument("source", help="JSON-lines file, CSV file, or - for stdin")
    typed_config.add_arguments(p_produce, StreamConfig)
    p_produce.set_defaults(func=cmd_produce)
    p_tail = sub.add_parser("tail", help="print recommendations as JSON lines")
    typed_config.add_arguments(p_tail, StreamConfig)
    p_tail.add_argument("--from-beginning", action="store_true")
    p_tail.add_argument("--max", type=int, default=0, help="stop after this many (0 = never)")
    p_tail.add_argument("--idle-timeout", type=float, default=0.0,
                        help="stop after this many seconds without a message (0 = never)")
    p_tail.set_defaults(func=cmd_tail)
    args = parser.parse_args(argv)
    from schemas.codec import RegistryError
    try:
        return args.func(args)
    except typed_config.ConfigError as exc:       # a bad MLSA4REC_* environment variable
        raise SystemExit(f"mlsa4rec {args.command}: {exc}")
    except RegistryError as exc:    # --schema-registry-url unreachable, or it refused a schema
        raise SystemExit(f"mlsa4rec {args.command}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
