"""The main job's pieces that run without the whole demo (`make run` itself is measured in
docs/RESULTS.md 4d; it takes minutes)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from streams.demo import RoundPacing, stream_minus_offline
from streams.replay.evaluation import Judged
from streams.shared.local_broker import free_ports
from streams.shared.metrics import MetricsServer, TrainerMetrics


def test_the_replay_waits_for_the_trainers_rounds_until_it_is_at_most_one_behind():
    metrics, port = TrainerMetrics(), free_ports(1)[0]
    server = MetricsServer(port, metrics.registry, health=lambda: (True, {})).start()
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pace = RoundPacing(trainer, port, every=10)
        # The first 20 clicks need no finished round: the first round is due at click 10.
        assert [pace(sent) for sent in (0, 5, 10, 15)] == [0.0] * 4
        assert pace.rounds_done() == 0
        waiting = threading.Thread(target=pace, args=(20,))   # needs 1 round finished
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive()                 # still waiting: no round yet
        metrics.rounds.labels("refused").inc()    # a refused round counts: it was run
        waiting.join(30)
        assert not waiting.is_alive() and pace.waited_s >= 1.0
        assert pace.rounds_done() == 1 and pace(25) == 0.0
        trainer.kill()
        trainer.wait()
        # A trainer that has exited holds nothing up, however many rounds are missing.
        assert pace(50) < 5.0
    finally:
        trainer.kill()
        server.stop()


def test_the_stream_is_compared_with_the_offline_model_click_by_click_errors_by_user():
    # Offline ranks per user: ranks[user][t] = rank of its click t + 1 (0 = not in the top 10).
    offline = {"a": np.array([1, 0, 3]), "b": np.array([0])}
    judged = [Judged(0, rank, "v2", group, user, n) for rank, group, user, n in (
        (1, "new titles", "a", 1), (2, "new titles", "a", 2), (0, "the rest", "a", 3),
        (5, "the rest", "b", 1))]
    paired = stream_minus_offline(judged, offline)
    # HR@10 differences: 1-1, 1-0, 0-1, 1-0; the SE counts user a's three as one sample.
    assert paired["all"]["hr@10"] == pytest.approx([0.25, 0.375])
    assert paired["new titles"]["hr@10"][0] == pytest.approx(0.5)
    assert paired["the rest"]["hr@10"][0] == pytest.approx(0.0)
    ndcg = (1 - 1) + (1 / np.log2(3) - 0) + (0 - 1 / np.log2(4)) + (1 / np.log2(6) - 0)
    assert paired["all"]["ndcg@10"][0] == pytest.approx(ndcg / 4)
    # Paired on the same click: a judgment of a click the offline side has not is an error.
    with pytest.raises(IndexError):
        stream_minus_offline([Judged(0, 1, "v1", "", "b", 2)], offline)


def test_the_report_shows_each_groups_paired_difference_and_one_for_all_clicks(tmp_path):
    from streams.demo import NEW_TITLES, THE_REST, groups
    from streams.replay.evaluation import StreamEvaluator
    from streams.replay.report import write_report

    ev = StreamEvaluator(group_of=groups(known_items={"x", "y"}, known_users={"a"}))
    for user, item, event_id in [("a", "x", "a1"), ("a", "new", "a2"), ("a", "y", "a3")]:
        ev.on_interaction(user, item, event_id, 1000)
        ev.on_recommendation({"event_id": event_id, "items": [{"item_id": "y"}],
                              "model_version": "v1", "produced_at": 1000})
    # The offline model ranked a's clicks 2 and 3 at 4 and not in its top 10.
    offline_ranks = {"a": np.array([4, 0])}
    paired = stream_minus_offline(ev.judged, offline_ranks)
    assert paired[NEW_TITLES]["hr@10"][0] == -1.0 and paired[THE_REST]["hr@10"][0] == 1.0
    offline = {"hr@10": 0.5, "ndcg@10": 0.2, "stream_minus_offline": paired,
               "by_group": {g: {"hr@10": 0.5, "ndcg@10": 0.2} for g in (NEW_TITLES, THE_REST)}}
    page = write_report({"summary": ev.summary(), "series": ev.series()}, tmp_path,
                        offline=offline).read_text()
    assert "stream - offline HR@10 (SE)" in page
    assert "<td>-1.0000 (0.0000)</td>" in page and "<td>+1.0000 (0.0000)</td>" in page
    assert "<td>all</td>" in page and "<td>+0.0000 (0.0000)</td>" in page  # one each way
    # Without the pairing (e.g. evaluate-stream's --offline JSON) the table has no such column.
    del offline["stream_minus_offline"]
    assert "stream - offline" not in write_report(
        {"summary": ev.summary(), "series": ev.series()}, tmp_path, offline=offline).read_text()
