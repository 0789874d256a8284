"""The streaming processes' typed configuration (CLI > env MLSA4REC_<FIELD> > default)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StreamConfig:
    broker: str = "127.0.0.1:9092"
    app_id: str = "mlsa4rec-scorer"
    interactions_topic: str = "interactions"
    recommendations_topic: str = "recommendations"
    dead_letter_topic: str = "interactions-dlq"
    partitions: int = 4                 # of interactions, its dead letters and the state table
    replication: int = 1
    batch_max: int = 64                 # events per model batch (stream.take_events max)
    batch_wait_ms: int = 20             # ... or whatever came within this wait
    pipeline_depth: int = 2             # batches scored ahead of the one being written
    top_k: int = 10
    exclude_seen: bool = False
    producer_batch_bytes: int = 1_048_576   # per partition batch of the worker's producer
    producer_linger_ms: float = 2.0
    state_dtype: str = "float32"        # storage of the step state: float32 or float16
    checkpoint: str = "runs/ml-100k-mlsa4rec-s.pt"
    device: str = "auto"
    threads: int = 0                    # torch CPU threads for the model; 0 = torch default
    data_dir: str = "runs/worker"       # RocksDB tables live here; one folder per worker
    web_port: int = 6066
    # How soon the group notices a dead worker and hands its partitions on (broker minimum: 6 s).
    session_timeout_s: float = 10.0
    log_level: str = "info"
    report_every_s: float = 10.0        # a progress line in the log at most this often
