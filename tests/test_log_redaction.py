"""Log lines carry ids, sizes and reasons, never payload bytes: a device's payload can hold what
a person typed (a ``user_report`` note), and logs go where brands' data must not."""

import json
import logging
import threading
from datetime import UTC, datetime

import psycopg
import pytest

from services.common.db import describe_error
from services.common.subscriber import Inbound
from services.ingest.main import Worker
from services.ingest.settings import IngestSettings

NOTE = "NOTE-4f1c my neighbour Ann has a burn on her cheek"


def inbound(topic: str, body: dict[str, object]) -> Inbound:
    return Inbound(
        topic, json.dumps(body).encode(), mid=1, qos=1, received_at=datetime.now(UTC), generation=1
    )


def report(seq: int, **fields: object) -> dict[str, object]:
    """A user report with the note first, where a log of the payload's start would show it."""
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return {"note": NOTE, "v": 1, "seq": seq, "ts": now_ms, "type": "user_report", **fields}


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every record as a handler would write it, traceback included."""
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def test_a_payload_holding_a_note_never_reaches_the_ingest_log(
    ingest_database_url: str, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A constraint the valid report breaks: the database refuses it and quotes the row
    # ("Failing row contains (...)") in its error, as it does for any refused value.
    with psycopg.connect(database_url) as conn:
        conn.execute("ALTER TABLE events ADD CONSTRAINT test_no_notes CHECK (NOT body ? 'note')")
    worker = Worker(
        IngestSettings(database_url=ingest_database_url, mqtt_password="x"), threading.Event()
    )
    topic = "galvani/v1/d/dev-0001/events"
    caplog.set_level(logging.DEBUG)
    try:
        worker.flush(
            [
                inbound(topic, report(1, kind="burn")),  # valid, refused by the database
                inbound(topic, report(2, kind="no-such-kind")),  # invalid: a dead letter
            ]
        )
    finally:
        worker.loop.db.close()
    with psycopg.connect(database_url) as conn:
        reasons = conn.execute("SELECT reason FROM dead_letters ORDER BY id").fetchall()
    assert reasons == [("unstorable",), ("invalid",)]
    text = logged(caplog)
    # What was refused and why, by name and size.
    assert f"message on {topic} (" in text
    assert "cannot be stored: CheckViolation, SQLSTATE 23514" in text
    assert f"dead letter on {topic}: invalid (payload " in text
    assert "NOTE-4f1c" not in text
    assert "Ann" not in text


def test_a_database_error_is_described_by_class_state_and_constraint_not_by_the_value(
    database_url: str,
) -> None:
    with psycopg.connect(database_url) as conn, pytest.raises(psycopg.Error) as refused:
        conn.execute("SELECT %s::integer", [NOTE])
    assert NOTE in str(refused.value)
    described = describe_error(refused.value)
    assert described == "InvalidTextRepresentation, SQLSTATE 22P02"
    assert describe_error(ValueError(NOTE)) == "ValueError"
