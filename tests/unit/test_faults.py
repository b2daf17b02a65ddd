"""dtl.faults: the testing hooks read from the environment once, into a value the step and writer check."""

import pytest

from dtl import faults
from dtl.errors import UserError


def test_nothing_asked_for_is_no_fault():
    plan = faults.from_env({})
    assert plan == faults.NO_FAULTS and plan.slow_writes_s == 0.0
    assert not any(plan.due(step, 0) for step in range(5))


def test_a_fault_on_one_rank_at_one_step():
    plan = faults.from_env({"DTL_FAULT_STEP": "3", "DTL_FAULT_KIND": "raise", "DTL_FAULT_RANK": "1",
                            "DTL_TEST_SLOW_WRITES": "0.25"})
    assert (plan.kind, plan.slow_writes_s) == ("raise", 0.25)
    assert plan.due(3, 1) and not plan.due(3, 0) and not plan.due(2, 1)
    assert faults.from_env({"DTL_FAULT_STEP": "3"}).due(3, 7)  # every rank by default


@pytest.mark.parametrize("name, value, message", [
    ("DTL_FAULT_KIND", "boom", "DTL_FAULT_KIND must be one of nan, raise, kill"),
    ("DTL_FAULT_STEP", "two", "DTL_FAULT_STEP must be an integer"),
    ("DTL_TEST_SLOW_WRITES", "slow", "DTL_TEST_SLOW_WRITES must be a number of seconds"),
])
def test_bad_values_are_user_errors(name, value, message):
    with pytest.raises(UserError, match=message):
        faults.from_env({name: value})
