#!/usr/bin/env bash
# A single-node Apache Kafka broker (KRaft, broker+controller in one JVM) run
# straight from Maven jars, so tests and demos need no Docker engine.
#
#   infra/kafka/broker.sh fetch|start|stop|status
#
# Env: KAFKA_VERSION (default 4.1.1), KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT
# (KAFKA_PORT+1), KAFKA_DATA_DIR (per version+port under the cache),
# MLSA4REC_CACHE (~/.cache/mlsa4rec), KAFKA_HEAP (-Xmx512m), KAFKA_JAVA_OPTS,
# KAFKA_START_TIMEOUT (60 s), KAFKA_STOP_TIMEOUT (20 s), PYTHON (metadata probe).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
CACHE="${MLSA4REC_CACHE:-$HOME/.cache/mlsa4rec}"
HOME_DIR="$CACHE/kafka-$KAFKA_VERSION"
LIBS="$HOME_DIR/libs"
DATA="${KAFKA_DATA_DIR:-$HOME_DIR/data-$KAFKA_PORT}"
PROPS="$DATA/server.properties"
PIDFILE="$DATA/broker.pid"
LOG="$DATA/broker.log"
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

die() { echo "broker.sh: $*" >&2; exit 1; }

fetch() {
    if [ -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found (needed once to download Kafka jars)"
    mkdir -p "$HOME_DIR"
    # Copy into a temp dir and rename, so a concurrent or interrupted fetch
    # never leaves a half-filled libs dir that later looks complete.
    local tmp
    tmp="$(mktemp -d "$HOME_DIR/libs.tmp.XXXXXX")"
    mvn -q -B -f "$HERE/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime >&2 \
        || { rm -rf "$tmp"; die "maven could not fetch kafka $KAFKA_VERSION"; }
    mv -T "$tmp" "$LIBS" 2>/dev/null || rm -rf "$tmp"   # lost a race: keep the winner's copy
    # stderr: start's stdout must be just the bootstrap address.
    echo "kafka $KAFKA_VERSION jars in $LIBS" >&2
}

running_pid() {
    # Only trust the pid file if that pid is still our broker (pids get reused).
    [ -f "$PIDFILE" ] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$PROPS" || return 1
    echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_config() {
    mkdir -p "$DATA/logs"
    cat >"$PROPS" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
# Static single-voter quorum: works on 3.9 and 4.x and needs no --standalone.
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
log.dirs=$DATA/logs
# One node: every internal topic must accept a single replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
default.replication.factor=1
# Faust creates its changelog/repartition topics itself and relies on auto-create
# for some; keep it on.
auto.create.topics.enable=true
num.partitions=1
# Tests join groups constantly; do not wait 3 s for more members.
group.initial.rebalance.delay.ms=0
EOF
    cat >"$DATA/log4j2.properties" <<EOF
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
# Per-partition log/state chatter drowns the useful lines.
logger.log.name = org.apache.kafka.storage
logger.log.level = WARN
logger.klog.name = kafka.log
logger.klog.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
EOF
}

probe_metadata() {
    # Port open is not enough: the broker must have joined the quorum and answer
    # metadata. Use confluent-kafka from the project venv when there is one.
    local py="${PYTHON:-}"
    [ -n "$py" ] || { [ -x "$REPO/.venv/bin/python" ] && py="$REPO/.venv/bin/python"; }
    [ -n "$py" ] || py="$(command -v python3 || true)"
    [ -n "$py" ] && "$py" -c 'import confluent_kafka' 2>/dev/null || return 0  # no probe available: rely on the log line
    "$py" - "$BOOTSTRAP" <<'EOF' 2>/dev/null
import sys
from confluent_kafka.admin import AdminClient
md = AdminClient({"bootstrap.servers": sys.argv[1]}).list_topics(timeout=5)
sys.exit(0 if md.brokers else 1)
EOF
}

start() {
    fetch
    local pid
    if pid="$(running_pid)"; then
        echo "$BOOTSTRAP"
        return 0
    fi
    local p
    for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
        port_open "$p" && die "port $p is already in use by another process"
    done
    write_config
    local java_cp="$LIBS/*"
    local opts="${KAFKA_HEAP:--Xmx512m -Xms128m} -Dlog4j2.configurationFile=$DATA/log4j2.properties"
    # C1 only + serial GC: much less CPU at start-up on small shared machines.
    opts="$opts ${KAFKA_JAVA_OPTS:--XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true}"
    if [ ! -f "$DATA/logs/meta.properties" ]; then
        # Random 16 bytes, url-safe base64 without padding: Kafka's cluster id format.
        local cid
        cid="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
        # "--cluster-id=" form: an id may start with "-", which argparse would take for an option.
        # shellcheck disable=SC2086
        java $opts -cp "$java_cp" kafka.tools.StorageTool format --cluster-id="$cid" -c "$PROPS" \
            >"$DATA/format.log" 2>&1 || { cat "$DATA/format.log" >&2; die "storage format failed"; }
    fi
    local t0=$SECONDS
    : >"$LOG"   # exists before the first grep below
    # shellcheck disable=SC2086
    nohup java $opts -cp "$java_cp" kafka.Kafka "$PROPS" </dev/null >"$LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local timeout="${KAFKA_START_TIMEOUT:-60}"
    while (( SECONDS - t0 < timeout )); do
        # kill -0, not running_pid: until the fork has exec'd java its cmdline
        # does not name server.properties yet.
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOG" >&2
            die "broker exited during start-up (log: $LOG)"
        fi
        if grep -q "Kafka Server started" "$LOG" && port_open "$KAFKA_PORT" && probe_metadata; then
            echo "kafka $KAFKA_VERSION up in $((SECONDS - t0)) s, log $LOG" >&2
            echo "$BOOTSTRAP"
            return 0
        fi
        sleep 0.5
    done
    tail -n 30 "$LOG" >&2
    stop >/dev/null 2>&1 || true
    die "broker not ready after ${timeout}s (log: $LOG)"
}

stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        echo "not running"
        return 0
    fi
    kill "$pid"
    local i
    for ((i = 0; i < ${KAFKA_STOP_TIMEOUT:-20} * 4; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; echo "stopped"; return 0; }
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
    # SIGKILL is async; wait so the ports are free when we return.
    for ((i = 0; i < 20; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    rm -f "$PIDFILE"
    echo "killed (no clean exit in ${KAFKA_STOP_TIMEOUT:-20}s)"
}

status() {
    local pid
    if pid="$(running_pid)"; then
        echo "running pid $pid on $BOOTSTRAP (data $DATA)"
    else
        echo "not running ($DATA)"
        return 3
    fi
}

case "${1:-}" in
    fetch) fetch ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
