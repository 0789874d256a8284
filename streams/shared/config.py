"""The streaming processes' typed configuration (CLI > env MLSA4REC_<FIELD> > default)."""

from __future__ import annotations

import os
from dataclasses import dataclass

REGISTRY_PREFIX = "MLSA4REC_SCHEMA_REGISTRY_"


@dataclass
class StreamConfig:
    broker: str = "127.0.0.1:9092"  # Kafka bootstrap servers (host:port, comma-separated)
    # Faust app id: the consumer group and the table's changelog topic prefix.
    app_id: str = "mlsa4rec-scorer"
    interactions_topic: str = "interactions"  # the topic clicks are read from
    recommendations_topic: str = "recommendations"  # the topic recommendations are sent to
    # Clicks that do not decode go here, the reason in a header.
    dead_letter_topic: str = "interactions-dlq"
    # A Confluent-compatible Schema Registry (e.g. http://host:8081, Apicurio's .../apis/ccompat/v7):
    # schema ids registered there under '<topic>-value' instead of schemas/ids.json's; "" = pinned.
    schema_registry_url: str = ""
    partitions: int = 4                 # partitions of interactions, its dead letters, the table
    replication: int = 1  # replication factor of the topics the worker creates
    # A batch goes to the model when the model is free: what arrived meanwhile, up to
    # batch_max (under load batches fill while the model works) ...
    batch_max: int = 256
    batch_wait_ms: int = 5              # ... and a quiet stream waits at most this for more
    pipeline_depth: int = 2             # batches scored ahead of the one being finished
    top_k: int = 10  # items per recommendation
    # Catalogues of more items are ranked exactly, block by block of this many items: memory
    # (batch x this) floats instead of (batch x items) (model/ranking.py).
    exact_rank_items: int = 65_536
    # Catalogues of more items are ranked by an approximate index of the item embeddings
    # (model/item_index.py, faiss IVF; docs/RESULTS.md, section 4i); up to this many, exactly.
    ann_items: int = 100_000
    # auto: the index above --ann-items if faiss is installed, else exact block by block (a
    # warning logged); faiss: the same, but an error at start without faiss; exact: never.
    ann: str = "auto"
    ann_probe: int = 32     # index lists searched per user: more, higher recall and slower
    exclude_seen: bool = False  # leave out items among the user's last 50
    producer_batch_bytes: int = 1_048_576   # per partition batch of the worker's producer
    producer_linger_ms: float = 2.0  # how long the producer waits to fill a batch
    state_dtype: str = "float32"        # storage of the step state: float32 or float16
    checkpoint: str = "runs/ml-100k-mlsa4rec-s.pt"   # served until model-updates says otherwise
    # The compacted topic new model versions are announced on.
    model_updates_topic: str = "model-updates"
    model_store: str = "runs/models"    # versions announced on model-updates live here
    follow_model_updates: bool = True  # swap to versions announced on model-updates
    rebuild_states: bool = True         # rebuild a user's state made by an older version...
    keep_states_for_versions: int = 5   # ...unless by one of its last N ancestors (fine-tunes)
    device: str = "auto"  # torch device: auto (cuda if available), cpu or cuda[:n]
    # On CPU, run the model's step as one traced graph: the model thread takes the GIL once per
    # batch instead of once per tensor op (docs/RESULTS.md, section 4c); false = eager.
    trace_step: bool = True
    # On CPU, step a batch this many users at a time; 0 = the whole batch in one call (always on
    # CUDA). Smaller blocks of states can stay in the core's cache between the step's ops: at
    # batch 256 here, 64 ran Mamba4Rec's model thread 1.21x faster, MLSA4Rec-S's 0.84-0.98x
    # (bench/step_rows.py, docs/RESULTS.md 4n).
    step_rows: int = 0
    # torch CPU threads for the model; 0 = torch default (all cores). One: the event loop, the
    # producer and (here) the broker need cores too, and scale-out is more workers; measured
    # faster than the default on 2 cores (docs/RESULTS.md, section 4).
    threads: int = 1
    # How long a Python thread may hold the GIL while another waits for it (sys.setswitchinterval;
    # Python's default 5 ms). The model thread needs the GIL between its torch calls and waits
    # this long each time the event loop holds it (docs/RESULTS.md, section 4e).
    gil_switch_ms: float = 0.5
    data_dir: str = "runs/worker"       # RocksDB tables live here; one folder per worker
    table_cache_mb: int = 64            # RocksDB block cache per table partition
    table_write_buffer_mb: int = 16     # RocksDB write buffer (x2) per table partition
    # Hot users' states in memory (streams/worker/state_cache.py): bounds the worker's memory
    # for states whatever the number of users; a user not in it is read from the table.
    state_cache_mb: int = 512
    flush_every_s: float = 2.0          # write changed users to the table (then commit) this often
    # ... or as soon as this many users have changed: a flush costs ~10 us per user in the model
    # thread, so a large one delays the batch it ends (latency p99, docs/RESULTS.md 4k)
    flush_max_users: int = 512
    snapshot_every: int = 16            # a user's full state every N of its clicks, items between
    # Users idle longer than this (event time) keep their last 50 items, no state (33-66 KB): rebuilt
    # from those items at their next click (streams/worker/cold_tier.py); 0 = off
    cold_after_s: float = 0.0
    # Prometheus /metrics, /health and GET /users/{id}/recommendations; 0 = off
    metrics_port: int = 9108
    # The host other workers reach this one's port at (forwarded requests); "" = this
    # machine's host name.
    advertised_host: str = ""
    api_token: str = ""                 # bearer token the recommendations endpoint asks for; "" = none
    query_timeout_s: float = 5.0        # a request waits this long for the model thread, then 503
    popular_window_s: float = 600.0     # users never seen get the most clicked items of this window
    # How soon the group notices a dead worker and hands its partitions on (broker minimum: 6 s).
    session_timeout_s: float = 10.0
    shutdown_timeout_s: float = 30.0    # after SIGTERM/SIGINT, exit by then even if Kafka is gone
    log_level: str = "info"  # debug, info, warning or error
    report_every_s: float = 10.0        # a progress line in the log at most this often


@dataclass
class TrainerConfig:
    """The online trainer (`mlsa4rec trainer`); env MLSA4REC_<FIELD> as for the worker."""
    broker: str = "127.0.0.1:9092"  # Kafka bootstrap servers (host:port, comma-separated)
    interactions_topic: str = "interactions"  # the topic clicks are read from
    # The Schema Registry the clicks' schema ids come from (as the worker's); "" = pinned ids.
    schema_registry_url: str = ""
    partitions: int = 4  # partitions of the topics the trainer creates
    replication: int = 1  # replication factor of the topics the trainer creates
    model_updates_topic: str = "model-updates"  # where new versions are announced
    group_id: str = "mlsa4rec-trainer"  # the trainer's consumer group
    # How soon the group hands a dead trainer's partitions to its restart (broker minimum: 6 s).
    session_timeout_s: float = 10.0
    checkpoint: str = "runs/ml-100k-mlsa4rec-s.pt"   # the first version, if none is announced
    model_store: str = "runs/models"  # where versions are published (a directory or an fsspec URL)
    buffer_dir: str = "runs/trainer-buffer"  # the replay buffer on disk
    round_every_events: int = 2000      # a fine-tuning round after this many new events ...
    round_every_s: float = 10.0         # ... or this many seconds with at least one
    steps: int = 20                     # optimiser steps per round (~10 s on one CPU core)
    batch_size: int = 64  # sequences per optimiser step
    lr: float = 1e-4  # learning rate of the fine-tuning rounds
    users_per_round: int = 512          # sequences drawn from the buffer per round
    margin: float = 0.02                # publish unless holdout NDCG@10 drops by more (relative)
    min_holdout: int = 20               # fewer held-out events: publish without judging
    holdout_events: int = 500  # newest events a round's copy is judged on before it is published
    max_seq_len: int = 200  # longest sequence a round trains on (the most recent items)
    recent_users: int = 2000  # users kept in the buffer because they clicked last
    reservoir_users: int = 2000  # users kept in the buffer by reservoir sampling (older traffic)
    item_chunk: int = 256               # spare embedding rows added at a time for new items
    # new items clicked in a round's samples start from the contexts that led to them, not the
    # items' mean, so they can be recommended in the next version (model/finetune.py
    # imprint_new_items); off: with 15% of the titles new its gain at half length, +0.0024
    # HR@10 (SE 0.0016), is within noise, and a round costs ~5 s more (RESULTS 11)
    imprint_new_items: bool = False
    # imprinted rows' length, in the known rows' mean lengths (> 0); at 1 the new titles crowd
    # known items out of the top 10s (-0.026 HR@10 against no imprinting, RESULTS 11)
    imprint_norm: float = 0.5
    # the rows of items newer than the starting model take steps this many times the learning
    # rate's (> 0). Adam's steps do not grow with the gradient, so at 1 a new title's row moves
    # per round as little as a row trained for many epochs and is never recommended; at 30 new
    # titles enter top 10s with nothing lost elsewhere (RESULTS 11d; at 50 new users lose)
    young_item_lr_scale: float = 30.0
    max_items: int = 1_000_000          # vocabulary cap: clicks on further new items are skipped
    device: str = "auto"  # torch device: auto (cuda if available), cpu or cuda[:n]
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 0  # random seed of the rounds' sampling
    log_level: str = "info"  # debug, info, warning or error
    metrics_port: int = 9109            # Prometheus /metrics and /health; 0 = off


def use_configured_schemas(cfg, environ=None) -> None:
    """Point this process's Avro codecs at cfg.schema_registry_url, if set, with subjects named
    after cfg's topics. Registry client settings other than the URL (credentials, TLS) come from
    the environment, off command lines: MLSA4REC_SCHEMA_REGISTRY_<property, dots written as
    underscores>, e.g. MLSA4REC_SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=user:secret or
    MLSA4REC_SCHEMA_REGISTRY_MAX_RETRIES=0."""
    from schemas.codec import use_schema_registry

    environ = os.environ if environ is None else environ
    # SchemaRegistryClient wants numbers (max.retries, timeout) as numbers.
    conf = {name[len(REGISTRY_PREFIX):].lower().replace("_", "."): int(value) if value.isdigit() else value
            for name, value in environ.items() if name.startswith(REGISTRY_PREFIX) and value}
    topics = {"Interaction": getattr(cfg, "interactions_topic", "interactions"),
              "Recommendation": getattr(cfg, "recommendations_topic", "recommendations")}
    use_schema_registry(cfg.schema_registry_url, topics, **conf)
