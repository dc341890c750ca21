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
        ({"gaps": [("loyalty.purchases", 0, 3, 5)]}, "the raw archive has gaps (loyalty.purchases/0: 3 of 5)"),
        ({"lag": 2}, "the worker lags by 2 messages (bound 0)"),
    ],
)
def test_an_incomplete_history_is_refused_with_the_reason(change, reason):
    with pytest.raises(ReplayRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_apply_allowed(**{**COMPLETE, **change})
