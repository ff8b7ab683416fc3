"""Which database errors blame a message (split it out) and which are retried."""

import psycopg
import pytest
from psycopg import errors

from services.common.db import is_bad_message
from services.common.errors import DatabaseUnavailable


@pytest.mark.parametrize(
    ("sqlstate", "bad"),
    [
        ("22003", True),  # numeric value out of range
        ("22P02", True),  # invalid text representation
        ("23505", True),  # unique violation
        ("54000", True),  # program limit exceeded: an index entry too large
        ("08006", False),  # connection failure
        ("40P01", False),  # deadlock detected
        ("53200", False),  # out of memory
        ("57P01", False),  # admin shutdown
        ("25006", False),  # read-only transaction (a failover)
        ("42P01", False),  # undefined table (a migration in progress)
        ("42501", False),  # insufficient privilege (a grant change)
        ("XX000", False),  # internal error
    ],
)
def test_only_data_constraint_and_limit_errors_blame_the_message(sqlstate: str, bad: bool) -> None:
    exc = errors.lookup(sqlstate)("boom")
    assert is_bad_message(exc) is bad


def test_client_side_errors_blame_the_message_only_when_adapting_data() -> None:
    assert is_bad_message(psycopg.DataError("cannot adapt")) is True
    assert is_bad_message(psycopg.OperationalError("connection lost")) is False
    assert is_bad_message(DatabaseUnavailable("down")) is False
    assert is_bad_message(ValueError("not a database error")) is False
