"""`loyalty replay --apply` refuses while the archive has gaps or the worker lags beyond the bound, and says why."""

from __future__ import annotations

import pytest

from streams.replay import ReplayRefused, check_apply_allowed

COMPLETE = {"gaps": [], "lag": 0, "lag_max": 0}


def test_a_complete_history_is_allowed():
    check_apply_allowed(**COMPLETE)
    check_apply_allowed(**{**COMPLETE, "lag": 40, "lag_max": 40})


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"gaps": [("loyalty.purchases", 0, 3, 5)]},
            "the raw archive misses messages below its end (loyalty.purchases/0: 3 of 5)",
        ),
        ({"lag": 2}, "the worker lags by 2 messages (bound 0)"),
    ],
)
def test_an_incomplete_history_is_refused_with_the_reason(change, reason):
    with pytest.raises(ReplayRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_apply_allowed(**{**COMPLETE, **change})


def test_an_apply_is_refused_while_the_system_stops():
    """`loyalty up` keeps its API while the projector drains at stop; its worker is stopped by then, so an apply
    would switch the rules and wait for markers no worker reaches."""
    import asyncio
    import json
    from pathlib import Path

    from streams.runtime import _replay_handler

    rules = (Path(__file__).resolve().parents[2] / "streams/rules/rulesets/seasonal-promotion.yaml").read_text()

    class Request:
        async def json(self) -> dict:
            return {"rules": rules, "apply": True}

    async def ask():
        stopping = asyncio.Event()
        stopping.set()
        handle = _replay_handler(None, None, None, None, None, "127.0.0.1:9", 1, stopping)
        return await handle(Request())

    response = asyncio.run(ask())
    assert response.status == 409
    assert "the system is stopping" in json.loads(response.text)["error"]


def test_an_apply_checks_the_lag_again_after_replaying_the_history_before_writing_its_markers(monkeypatch):
    """The history is replayed before the markers (`replay.prepare`, minutes on a large archive, with the CPUs and
    the ClickHouse client): the worker may fall behind meanwhile. The lag bound is what lets the worker reach the
    markers within the cut-over wait, so it must hold when they are written; past it the apply refuses with nothing
    changed, instead of writing markers it may fail to wait for (new rules in force, no compensation)."""
    import asyncio
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from streams import cutover, replay, runtime
    from streams.rules.ruleset import load_ruleset
    from streams.runtime import _replay_handler

    root = Path(__file__).resolve().parents[2]
    rules = (root / "streams/rules/rulesets/seasonal-promotion.yaml").read_text()
    lag = {"value": 0}
    marked = []

    class Monitor:
        async def counts(self) -> dict:
            return {"consumer_lag": {"loyalty.purchases/0": lag["value"]}}

        def committed(self) -> dict:
            return {}

        def ends_fetched_after(self, topic, moment) -> dict:
            return {}

    def prepare(*args, **kwargs):
        lag["value"] = 50_000  # the worker fell behind while the history was replayed
        return object()

    def publish_cutover(*args, **kwargs):
        marked.append(True)
        raise RuntimeError("markers written")

    monkeypatch.setattr(runtime, "replay_archive_gaps", lambda client: [])
    monkeypatch.setattr(runtime, "replay_archive_estimate", lambda client: 0)
    monkeypatch.setattr(replay, "known_rulesets", lambda client: {})
    monkeypatch.setattr(replay, "prepare", prepare)
    monkeypatch.setattr(cutover, "publish_cutover", publish_cutover)
    client = SimpleNamespace(insert=lambda *args, **kwargs: None)
    context = SimpleNamespace(ruleset=load_ruleset(root / "streams/rules/rulesets/default.yaml"))
    projector = SimpleNamespace(partitions=1, archived_to={}, projected_to={})

    class Request:
        async def json(self) -> dict:
            return {"rules": rules, "apply": True, "lag_max": 10_000}

    async def ask():
        handle = _replay_handler(client, asyncio.Lock(), context, Monitor(), projector, "127.0.0.1:9", 1)
        return await handle(Request())

    try:
        response = asyncio.run(ask())
    except RuntimeError as error:
        assert str(error) == "markers written"
        response = None
    assert not marked, "markers written although the worker lags by 50,000 messages"
    assert response.status == 409
    assert "lags by 50000 messages" in json.loads(response.text)["error"]
