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
