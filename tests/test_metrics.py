"""The metrics endpoint, the health endpoint, and the Grafana dashboard's queries."""

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from streams.shared.metrics import MetricsServer, TrainerMetrics, WorkerMetrics

REPO = Path(__file__).resolve().parents[1]


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_says_starting_then_ok_and_metrics_are_served(tmp_path):
    (tmp_path / "table.sst").write_bytes(b"x" * 1234)
    metrics = WorkerMetrics(tmp_path)
    metrics.serving("v1")
    metrics.events.labels("applied").inc(3)
    ready = {"ok": False}
    server = MetricsServer(0, metrics.registry,
                           health=lambda: (ready["ok"], {"model_version": "v1"})).start()
    try:
        status, body = get(server.port, "/health")
        assert status == 503 and json.loads(body)["status"] == "starting"
        ready["ok"] = True
        status, body = get(server.port, "/health")
        assert status == 200 and json.loads(body) == {"status": "ok", "model_version": "v1"}
        status, body = get(server.port, "/metrics")
        assert status == 200
        assert 'mlsa4rec_events_total{outcome="applied"} 3.0' in body
        assert "mlsa4rec_state_store_bytes 1234.0" in body
        metrics.serving("v2", previous="v1")
        _, body = get(server.port, "/metrics")
        assert 'version="v2"' in body and 'version="v1"' not in body
        assert get(server.port, "/nothing")[0] == 404
    finally:
        server.stop()


def exported_names() -> set[str]:
    """Every sample name the worker and trainer can export (labelled ones included)."""
    names = set()
    for registry in (WorkerMetrics("/nonexistent").registry, TrainerMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_every_dashboard_query_uses_exported_metrics():
    dashboard = json.loads((REPO / "infra" / "grafana" / "mlsa4rec.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for q in queries for name in re.findall(r"mlsa4rec_[a-z0-9_]+", q)}
    assert used and used <= exported_names(), sorted(used - exported_names())


def test_kafka_security_settings_reach_every_client_kind():
    from streams.shared.kafka_config import client_config, faust_credentials

    env = {"MLSA4REC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "MLSA4REC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "MLSA4REC_KAFKA_SASL_USERNAME": "scorer", "MLSA4REC_KAFKA_SASL_PASSWORD": "s3cret",
           "MLSA4REC_OTHER": "not kafka"}
    config = client_config("broker:9093", env, group_id="g")
    assert config == {"bootstrap.servers": "broker:9093", "security.protocol": "SASL_SSL",
                      "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "scorer",
                      "sasl.password": "s3cret", "group.id": "g"}
    credentials = faust_credentials(env)
    assert type(credentials).__name__ == "SASLCredentials"
    assert credentials.username == "scorer" and credentials.ssl_context is not None
    assert str(credentials.mechanism).endswith("SCRAM_SHA_512") or "SCRAM-SHA-512" in str(
        credentials.mechanism)
    assert type(faust_credentials({"MLSA4REC_KAFKA_SECURITY_PROTOCOL": "SSL"})).__name__ == \
        "SSLCredentials"
    assert faust_credentials({}) is None
    assert client_config("b:1", {}) == {"bootstrap.servers": "b:1"}
