"""The scorer worker: one Faust app with the scoring agent and the state table.

`run_worker(cfg)` creates the topics, loads the checkpoint, builds the app and runs it until
it is stopped (SIGTERM / SIGINT). Scale out by starting more workers with the same app_id and
their own data_dir: Kafka assigns them partitions, and each user's state follows its partition.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading

import faust
import mode
import torch

from model.checkpoint import load_checkpoint
from model.training import pick_device
from faust.types import TP

from streams.worker.agents import ScoringAgent, restoring
from streams.worker.consumer import Transport
from streams.worker.producer import AsyncProducer, producer_config
from streams.worker.queries import RecommendationsEndpoint, partition_of
from streams.shared.config import StreamConfig, use_configured_schemas
from streams.shared.kafka_config import faust_credentials
from streams.shared.metrics import MetricsServer, WorkerMetrics
from streams.shared.model_store import ModelStore
from streams.shared.model_updates import (ModelWatcher, ensure_model_updates_topic, newest_loadable,
                                   read_announcements)
from streams.worker.scoring import Scorer
from streams.worker.tables import StateTable, user_state_table
from streams.shared.topics import ensure_topics, raw_topic, topic_id, topic_partitions

STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def starting_model(cfg: StreamConfig, device):
    """(model, payload) to serve from the first batch: the newest announced version that loads
    when the worker follows `model-updates` (a restarted worker goes on where the fleet is,
    instead of serving --checkpoint until its watcher catches up and rebuilding every state
    twice), else --checkpoint."""
    if cfg.follow_model_updates:
        announcements = read_announcements(cfg.broker, cfg.model_updates_topic)
        newest = newest_loadable(ModelStore(cfg.model_store), announcements, device)
        if newest is not None:
            return newest
        if announcements:
            logging.getLogger(__name__).error(
                "none of the %d announced model versions loads from %s; serving %s",
                len(announcements), cfg.model_store, cfg.checkpoint)
    return load_checkpoint(cfg.checkpoint, device=device)


def build_scorer(cfg: StreamConfig) -> Scorer:
    if cfg.state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {sorted(STATE_DTYPES)}, not {cfg.state_dtype!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    model, payload = starting_model(cfg, device)
    return Scorer(model, payload["item_ids"], payload["version"], device=device,
                  top_k=cfg.top_k, exclude_seen=cfg.exclude_seen,
                  state_dtype=STATE_DTYPES[cfg.state_dtype], rebuild_states=cfg.rebuild_states,
                  keep_states_for_versions=cfg.keep_states_for_versions,
                  offsets_of=topic_id(cfg.broker, cfg.interactions_topic),
                  trace_step=cfg.trace_step, exact_rank_items=cfg.exact_rank_items,
                  ann=cfg.ann, ann_items=cfg.ann_items, ann_probe=cfg.ann_probe,
                  step_rows=cfg.step_rows)


def create_app(cfg: StreamConfig, scorer: Scorer, metrics: WorkerMetrics | None = None):
    if cfg.gil_switch_ms <= 0:
        raise ValueError(f"--gil-switch-ms must be > 0, not {cfg.gil_switch_ms}")
    sys.setswitchinterval(cfg.gil_switch_ms / 1000)
    app = faust.App(
        cfg.app_id,
        broker=f"kafka://{cfg.broker}",
        broker_credentials=faust_credentials(),     # MLSA4REC_KAFKA_* (streams/shared/kafka_config.py)
        store="rocksdb://",                 # faust uses rocksdict when it is installed
        datadir=cfg.data_dir,
        topic_partitions=cfg.partitions,
        topic_replication_factor=cfg.replication,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        # A state record is 33-66 KB: aiokafka's default 16 KB batch would make each one its
        # own produce request.
        producer_max_batch_size=cfg.producer_batch_bytes,
        producer_linger=cfg.producer_linger_ms / 1000,
        web_enabled=False,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=cfg.session_timeout_s / 4,
        # Faust hands each member's URL to the others with the assignment: where a request
        # for a user of another worker's partition is forwarded (streams/worker/queries.py).
        canonical_url=worker_url(cfg),
    )
    # Before anything asks for the consumer: the one that seeks a partition never committed
    # back to its beginning after a recovery (streams/worker/consumer.py).
    app.transport = Transport(app.conf.broker_consumer, app)
    hold_events_until_streams_resume(app)
    interactions = raw_topic(app, cfg.interactions_topic, cfg.partitions)
    agent = ScoringAgent(
        cfg, scorer,
        recommendations=raw_topic(app, cfg.recommendations_topic, cfg.partitions),
        dead_letters=raw_topic(app, cfg.dead_letter_topic, cfg.partitions),
        table=StateTable(user_state_table(app, cfg.partitions, cfg.table_cache_mb,
                                          cfg.table_write_buffer_mb)),
        recovery=app.tables.recovery, metrics=metrics,
        highwater=lambda tp: app.consumer.highwater(tp),
        on_failure=lambda exc: asyncio.ensure_future(app.crash(exc)),
        producer_factory=lambda loop: AsyncProducer(
            producer_config(cfg.broker, linger_ms=cfg.producer_linger_ms), loop),
        input_state=lambda: input_state(app, cfg.interactions_topic))
    tell_agent_of_rebalances(app, agent)

    # An exception in the agent stops the worker (CrashingSupervisor). Faust's default would
    # restart the agent in this process, over the pipeline of the failed run: its batches'
    # events still held (their offsets never committed again) and their unwritten records laid
    # over later reads. A restarted process starts clean and replays from the committed offsets.
    @app.agent(interactions, name="score", supervisor_strategy=mode.CrashingSupervisor)
    async def score(stream):
        # Faust's Monitor keeps per-event statistics for its web UI, which the worker does not
        # serve (our /metrics has its own): ~5% of the event loop's time under load.
        if app.monitor in set(app.sensors):
            app.sensors.remove(app.monitor)
        await agent.run(stream)

    return app, agent


def input_state(app, topic: str) -> tuple[bool, dict]:
    """(lagging, details): whether an assigned partition of `topic` has clicks past the last
    one read, and what Faust's consumer and flow control say of each partition."""
    consumer = app.consumer
    tps = sorted((tp for tp in consumer.assignment() if tp.topic == topic),
                 key=lambda tp: tp.partition)
    partitions, lagging = {}, False
    for tp in tps:
        end, read = consumer.highwater(tp), consumer._read_offset.get(tp)
        behind = end is not None and end > (read + 1 if read is not None else 0)
        lagging = lagging or behind
        partitions[tp.partition] = {
            "end": end, "read": read, "committed": consumer._committed_offset.get(tp),
            "active": tp in (consumer._active_partitions or ()),
            "paused": tp in consumer._paused_partitions,
            "buffer_full": tp in consumer._buffered_partitions}
    fetcher = app._fetcher
    return lagging, {"partitions": partitions,
                     # A fetcher whose drain loop has ended (it is "shutdown" or "crashed")
                     # fetches nothing more, and Faust's maybe_start does not restart it.
                     "fetcher": {"state": fetcher.state, "drainer": repr(fetcher._drainer)},
                     "flow_control_active": app.flow_control.is_active(),
                     "consumer_flow_suspended": consumer.suspend_flow.is_set(),
                     "in_recovery": app.tables.recovery.in_recovery}


def worker_url(cfg: StreamConfig) -> str:
    """This worker's HTTP address as the other workers reach it."""
    return f"http://{cfg.advertised_host or socket.gethostname()}:{cfg.metrics_port}"


def recommendations_endpoint(cfg: StreamConfig, app, agent) -> RecommendationsEndpoint:
    """GET /users/{id}/recommendations, answered here for the partitions this worker owns and
    forwarded to the owner of any other (Faust's assignment knows each partition's)."""
    changelog = agent.table.table.changelog_topic.get_topic_name()
    me = worker_url(cfg)

    def owner(user_id: str) -> str | None:
        if agent.rebalancing:
            return None
        partition = partition_of(user_id, cfg.partitions)
        if TP(cfg.interactions_topic, partition) in app.assignor.assigned_actives():
            return "self"
        for url, topics in app.assignor.changelog_distribution.items():
            if partition in topics.get(changelog, ()):
                return "self" if url == me else url
        return None
    return RecommendationsEndpoint(agent.answer, owner, me, token=cfg.api_token,
                                   timeout_s=cfg.query_timeout_s, default_k=cfg.top_k)


def tell_agent_of_rebalances(app, agent) -> None:
    """The agent holds events until its next flush; Faust's revoke waits for every held event
    (`stream_wait_empty`), so the agent must flush as soon as a rebalance starts, not when
    its timer says. Faust has no signal that early (on_partitions_revoked is sent after that
    wait), so its hook is wrapped. Once the new assignment is known the agent empties its
    cache: the partitions it gets back are read from the table again."""
    rebalance_start = app.on_rebalance_start

    def on_rebalance_start() -> None:
        rebalance_start()
        agent.on_rebalance_start()
    app.on_rebalance_start = on_rebalance_start

    @app.on_partitions_assigned.connect
    async def emptied_cache_on_assignment(sender, *args, **kwargs) -> None:
        agent.on_partitions_assigned()


def hold_events_until_streams_resume(app) -> None:
    """Keep events fetched at the end of a table recovery instead of losing them.

    faust-streaming 0.15.3 ends a recovery (Recovery.on_recovery_completed) with: resume the
    input partitions, seek them to the committed offsets, then `app.flow_control.resume()`,
    which empties every stream queue. The consumer's flow is still on from reading the
    changelog, so events fetched while the seek waits for the broker land in the agent's queue
    and are then emptied away, with the consumer's position already past them (a seek to
    "committed" does nothing where nothing was committed yet). The agent sees a batch or two,
    then only what arrives later; the lost events are never acked, so the commits stop there
    and only the next restart replays them (upstream issue faust-streaming/faust#596).

    `on_rebalance_complete` is sent at the start of that step, before the input partitions
    are resumed. Suspending flow control there makes such events wait at the queue's door
    (Conductor.on_message waits for flow control) until the resume has emptied the queues;
    then they go in. Some of them may come again after the seek: the records skip a replayed
    offset. Every recovery that sends this signal resumes flow control afterwards (or a new
    rebalance starts one that does).
    """
    @app.on_rebalance_complete.connect
    def suspend_flow_until_resume(sender, **kwargs) -> None:
        sender.flow_control.suspend()


class ScorerWorker(faust.Worker):
    """Faust's worker with a deadline on shutdown, after a signal or a crash. A stop can wait
    forever on a broker that has gone away (flushing, committing); after `shutdown_timeout_s`
    the process exits anyway. Nothing is lost by that: what was not committed is delivered
    again and the records recognise what was applied (the crash tests show it)."""

    shutdown_timeout_s = 30.0
    agent: ScoringAgent | None = None       # flushed before a stop on a signal

    def _on_sigterm(self) -> None:
        self._arm_deadline()
        self._flush_then(super()._on_sigterm)

    def _on_sigint(self) -> None:
        self._arm_deadline()
        self._flush_then(super()._on_sigint)

    def _flush_then(self, stop) -> None:
        """Write the agent's cached users back before stopping, so that a clean stop leaves
        nothing to replay (a stop without it loses nothing either: it replays)."""
        if self.agent is None or getattr(self, "_flushing", False):
            return stop()
        self._flushing = True

        async def flush_then_stop() -> None:
            try:
                await asyncio.wait_for(self.agent.flush_now(), self.shutdown_timeout_s / 2)
            except Exception as exc:    # noqa: BLE001 - the stop goes on; replay covers it
                logging.getLogger(__name__).warning("no flush before the stop: %r", exc)
            stop()
        asyncio.ensure_future(flush_then_stop())

    def _crash(self, reason: BaseException) -> None:
        # An agent's exception crashes every service (CrashingSupervisor, create_app); the stop
        # that follows can wait as long as a graceful one. Same deadline.
        self._arm_deadline()
        super()._crash(reason)

    def _arm_deadline(self) -> None:
        if getattr(self, "_deadline_armed", False):
            return
        self._deadline_armed = True

        def give_up():
            logging.getLogger(__name__).error(
                "not stopped after %.0f s: exiting now", self.shutdown_timeout_s)
            os._exit(1)
        timer = threading.Timer(self.shutdown_timeout_s, give_up)
        timer.daemon = True
        timer.start()


def worker_health(agent, recovery, watcher=None) -> tuple[bool, dict]:
    """/health: ok once the agent runs and the first table recovery is done, except while a
    later rebalance's recovery runs ("recovering": Faust's `completed` stays set after the
    first one, `in_recovery` tells), and as long as the model watcher (when there is one)
    still follows `model-updates`. A readiness signal: a long restore is not a dead worker."""
    ok = True
    details = {"model_version": agent.scorer.version, **agent.counts}
    if agent.failure is not None:                        # the worker is stopping
        ok, details["status"] = False, f"failed: {agent.failure!r}"
    elif not agent.started:
        ok, details["status"] = False, "starting"
    elif restoring(recovery):
        ok, details["status"] = False, "recovering"
    elif agent.stalled:
        ok, details["status"] = False, f"stalled: {agent.stalled}"
    if watcher is not None:
        details["model_updates"] = ("following" if watcher.following else
                                    f"stopped: {watcher.failure or 'the thread ended'}")
        ok = ok and watcher.following
    return ok, details


def run_worker(cfg: StreamConfig) -> None:
    logging.basicConfig(level=cfg.log_level.upper())
    ensure_topics(cfg.broker, topic_partitions(cfg), cfg.replication)
    use_configured_schemas(cfg)         # clicks' and recommendations' schema ids: registry or pinned
    if cfg.follow_model_updates:
        ensure_model_updates_topic(cfg.broker, cfg.model_updates_topic, cfg.replication)
    scorer = build_scorer(cfg)
    metrics = WorkerMetrics(cfg.data_dir)
    metrics.serving(scorer.version)
    app, agent = create_app(cfg, scorer, metrics)
    watcher = None
    if cfg.follow_model_updates:
        watcher = ModelWatcher(
            cfg.broker, cfg.model_updates_topic, ModelStore(cfg.model_store),
            on_model=lambda model, payload, announcement: agent.serve_next(
                model, payload["item_ids"], payload["version"], announcement.get("parent")),
            current_version=scorer.version, device=scorer.device,
            on_refused=lambda version, reason: metrics.model_refused.inc())
        watcher.start()
    if cfg.metrics_port:
        try:
            MetricsServer(cfg.metrics_port, metrics.registry, health=lambda: worker_health(
                agent, app.tables.recovery, watcher),
                handle=recommendations_endpoint(cfg, app, agent).handle).start()
        except OSError as exc:          # e.g. a second worker on this host, same port
            logging.getLogger(__name__).error(
                "no metrics/health endpoint: port %d: %s (set --metrics-port); scoring goes on",
                cfg.metrics_port, exc)
    worker = ScorerWorker(app, loglevel=cfg.log_level.upper(), quiet=True)
    worker.shutdown_timeout_s = cfg.shutdown_timeout_s
    worker.agent = agent
    # Faust's progress spinner sets the root logger to DEBUG whatever the log level, and
    # aiokafka's per-message debug records then cost ~5% of a busy worker's time.
    worker.spinner = None
    worker.execute_from_commandline()
