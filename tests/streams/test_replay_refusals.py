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
    monkeypatch.setattr(replay, "activated_versions", lambda client: [])
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


@pytest.mark.parametrize("passes", [True, False])
def test_an_apply_posts_its_plan_and_compensations_only_once_the_worker_passed_every_marker(monkeypatch, passes):
    """What lets the worker hold a referee's events after the markers and the reversals they derive: nothing the apply
    posts after its markers (plan, compensations, end markers: `replay.apply_report`) comes before the worker has
    committed past every cut-over marker, the one in the referrer's loyalty.referrals partition too. The worker records
    and acks a marker as it reads it, so a refund released by the plan or an end marker cannot derive a reversal into a
    partition whose marker it has not read (`test_apply_hold.py`). Here the worker lags on loyalty.referrals/1: the
    apply waits for it, and without it refuses with nothing posted."""
    import asyncio
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from schemas.topics import INPUT_TOPICS, REFERRALS
    from streams import cutover, replay, runtime
    from streams.rules.ruleset import load_ruleset
    from streams.runtime import _replay_handler

    root = Path(__file__).resolve().parents[2]
    rules = (root / "streams/rules/rulesets/seasonal-promotion.yaml").read_text()
    markers = {(topic, partition): 10 for topic in INPUT_TOPICS for partition in range(2)}
    seen = {"markers": False, "polls": 0, "committed": {}}  # polls of the committed offsets after the markers
    posted = []

    class Monitor:
        async def counts(self) -> dict:
            return {"consumer_lag": {}}

        def committed(self) -> dict:
            if not seen["markers"]:
                return {}
            seen["polls"] += 1
            committed = {tp: offset + 1 for tp, offset in markers.items()}
            if not (passes and seen["polls"] > 2):
                committed[(REFERRALS, 1)] = markers[(REFERRALS, 1)]  # the marker itself not acked yet
            seen["committed"] = committed
            return committed

        def ends_fetched_after(self, topic, moment) -> dict:
            return {}

    def publish_cutover(*args, **kwargs):
        seen["markers"] = True
        return dict(markers)

    def apply_report(report, *, bootstrap, markers):
        posted.append(seen["committed"])
        return {"compensations_published": 0, "moments": {}}

    monkeypatch.setattr(runtime, "cutover_wait_s", 2.0)
    monkeypatch.setattr(runtime, "replay_archive_gaps", lambda client: [])
    monkeypatch.setattr(runtime, "replay_archive_estimate", lambda client: 0)
    monkeypatch.setattr(replay, "known_rulesets", lambda client: {})
    monkeypatch.setattr(replay, "activated_versions", lambda client: [])
    monkeypatch.setattr(replay, "prepare", lambda *args, **kwargs: object())
    monkeypatch.setattr(replay, "dry_run", lambda *args, **kwargs: {"ruleset_version_new": "seasonal"})
    monkeypatch.setattr(replay, "apply_report", apply_report)
    monkeypatch.setattr(cutover, "publish_cutover", publish_cutover)
    client = SimpleNamespace(insert=lambda *args, **kwargs: None)
    context = SimpleNamespace(ruleset=load_ruleset(root / "streams/rules/rulesets/default.yaml"))
    archived = {tp: offset + 1 for tp, offset in markers.items()}
    projector = SimpleNamespace(partitions=2, archived_to=archived, projected_to={})

    class Request:
        async def json(self) -> dict:
            return {"rules": rules, "apply": True}

    async def ask():
        handle = _replay_handler(client, asyncio.Lock(), context, Monitor(), projector, "127.0.0.1:9", 1)
        return await handle(Request())

    response = asyncio.run(ask())
    if passes:
        assert response.status == 200 and len(posted) == 1 and seen["polls"] > 2
        assert all(posted[0][tp] > offset for tp, offset in markers.items())
    else:
        assert response.status == 409 and not posted
        assert "the worker did not pass the cut-over markers" in json.loads(response.text)["error"]


def test_an_apply_of_a_rule_set_replaced_since_is_refused_before_its_markers(monkeypatch):
    """A -> B -> A -> B: the compensations of the second apply of B have the ids of the first one's, which the worker
    refuses as conflicting repeats; the apply refuses instead, with nothing changed."""
    import asyncio
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from streams import cutover, replay
    from streams.rules.ruleset import load_ruleset, parse_ruleset
    from streams.runtime import _replay_handler

    root = Path(__file__).resolve().parents[2]
    rules = (root / "streams/rules/rulesets/seasonal-promotion.yaml").read_text()
    default = load_ruleset(root / "streams/rules/rulesets/default.yaml")
    new = parse_ruleset(rules)
    marked = []

    def publish_cutover(*args, **kwargs):
        marked.append(True)
        raise RuntimeError("markers written")

    monkeypatch.setattr(replay, "known_rulesets", lambda client: {new.version: rules})
    monkeypatch.setattr(replay, "activated_versions", lambda client: [new.version, default.version])
    monkeypatch.setattr(cutover, "publish_cutover", publish_cutover)
    context = SimpleNamespace(ruleset=default)  # B applied, then A again: A in force

    class Request:
        async def json(self) -> dict:
            return {"rules": rules, "apply": True}

    async def ask():
        handle = _replay_handler(SimpleNamespace(), asyncio.Lock(), context, None, None, "127.0.0.1:9", 1)
        return await handle(Request())

    try:
        response = asyncio.run(ask())
    except (RuntimeError, AttributeError) as error:  # past the check: markers, or the lag check without a monitor
        pytest.fail(f"not refused: {error!r}")
    assert not marked
    assert response.status == 409
    assert f"version {new.version} was applied before and replaced since" in json.loads(response.text)["error"]
