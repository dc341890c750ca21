"""`loyalty replay --apply` refuses while the history is incomplete, and says why."""

from __future__ import annotations

import pytest

from streams.replay import ReplayRefused, check_apply_allowed

COMPLETE = {"gaps": [], "lag": 0, "lag_max": 0, "archived": 10, "input_messages": 10, "ledger_backlog": 0}


def test_a_complete_history_is_allowed():
    check_apply_allowed(**COMPLETE)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"gaps": [("loyalty.purchases", 0, 3, 5)]}, "the raw archive has gaps (loyalty.purchases/0: 3 of 5)"),
        ({"lag": 2}, "the worker lags by 2 messages (bound 0)"),
        ({"archived": 9}, "the projector has archived 9 of 10 input messages and has 0 ledger entries"),
        ({"ledger_backlog": 4}, "the projector has archived 10 of 10 input messages and has 4 ledger entries"),
    ],
)
def test_an_incomplete_history_is_refused_with_the_reason(change, reason):
    with pytest.raises(ReplayRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_apply_allowed(**{**COMPLETE, **change})
