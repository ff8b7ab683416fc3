"""Device ids and the backend's MQTT client ids live in disjoint namespaces (``galvani...``).

Mosquitto keys sessions by client id across listeners: a device provisioned under a backend
worker's client id would take over the worker's persistent session. Provisioning, the database
and the broker's device password file each refuse the reserved prefix; the broker-level
behaviour is in tests/test_broker_security.py.
"""

import logging
import threading
from pathlib import Path
from typing import cast

import psycopg
import pytest
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import errors
from sqlalchemy import Engine

from services.api import publisher as api_publisher
from services.api.settings import ApiSettings
from services.common.broker_auth import (
    DEVICE_PASSWD_FILE,
    RESERVED_CLIENT_ID_PREFIX,
    BrokerFiles,
    ServiceAccount,
    hash_password,
)
from services.common.migrate import alembic_config, upgrade
from services.common.provisioning import ReservedDeviceIdError, provision_device
from services.ingest import main as ingest_main
from services.ingest.settings import IngestSettings
from services.rules import main as rules_main
from services.rules.settings import RulesSettings

RESERVED_IDS = ("galvani-ingest-1", "galvani-rules-1", "galvani-rules-1-publisher", "galvani-x")
UNUSED_DB = "postgresql://nobody@127.0.0.1:1/unused"  # never connected to


class RecordedClient:
    """Stands in for a broker client: these tests need only the id it was created with."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def is_connected(self) -> bool:
        return True

    def disconnect(self) -> None:
        pass

    def loop_stop(self) -> None:
        pass


def test_every_backend_client_id_and_account_carries_the_reserved_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    created: list[str] = []

    def connect_publisher(settings: object, client_id: str) -> RecordedClient:
        created.append(client_id)
        return RecordedClient(client_id)

    monkeypatch.setattr(rules_main, "connect_publisher", connect_publisher)
    monkeypatch.setattr(api_publisher, "connect_publisher", connect_publisher)
    stop = threading.Event()
    for worker_id in ("1", "7-b"):
        ingest = ingest_main.Worker(
            IngestSettings(database_url=UNUSED_DB, mqtt_password="x", worker_id=worker_id), stop
        )
        created.append(ingest.subscriber.config.client_id)
        rules = rules_main.Worker(
            RulesSettings(database_url=UNUSED_DB, mqtt_password="x", worker_id=worker_id),
            stop,
            Ed25519PrivateKey.generate(),
        )
        created.append(rules.subscriber.config.client_id)
    api = api_publisher.ConfigPublisher(
        ApiSettings(database_url=UNUSED_DB, mqtt_password="x", data_dir=tmp_path),
        cast(Engine, None),  # used only to record a publication; nothing is published here
    )
    try:
        api._connected()
    finally:
        api.close()
    assert len(created) == 7  # ingest and rules (subscriber and publisher) twice, the API once
    assert {"galvani-ingest-1", "galvani-rules-1", "galvani-rules-1-publisher"} <= set(created)
    for client_id in created:
        assert client_id.startswith(RESERVED_CLIENT_ID_PREFIX), client_id
    for account in ServiceAccount:
        assert account.startswith(RESERVED_CLIENT_ID_PREFIX), account


@pytest.mark.parametrize("device_id", [*RESERVED_IDS, "galvani-"])
def test_provisioning_refuses_a_reserved_device_id(db: psycopg.Connection, device_id: str) -> None:
    db.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme')")
    with pytest.raises(ReservedDeviceIdError, match="reserved for the backend"):
        provision_device(db, device_id=device_id, brand_id="acme", model="m1")
    assert db.execute("SELECT count(*) FROM devices").fetchone() == (0,)
    # An id that merely contains the word is an ordinary device id.
    provision_device(db, device_id="acme-galvani-1", brand_id="acme", model="m1")
    # Nor does one that only starts with the letters: "galvanic" is a word device makers use.
    provision_device(db, device_id="galvanic-01", brand_id="acme", model="m1")


@pytest.mark.parametrize("device_id", RESERVED_IDS)
def test_the_database_refuses_a_reserved_device_id(db: psycopg.Connection, device_id: str) -> None:
    db.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme')")
    with pytest.raises(errors.CheckViolation) as refused:
        db.execute(
            "INSERT INTO devices (id, brand_id, model, credential_hash) VALUES (%s, 'acme', 'm1',"
            " %s)",
            [device_id, hash_password("pw")],
        )
    assert refused.value.diag.constraint_name == "devices_id_not_reserved"


def test_the_migration_stops_at_reserved_device_ids_and_deletes_nothing(
    empty_database_url: str,
) -> None:
    config = alembic_config(empty_database_url)
    command.upgrade(config, "0006")
    with psycopg.connect(empty_database_url) as conn:
        conn.execute("INSERT INTO brands (id, name) VALUES ('acme', 'Acme')")
        conn.execute(
            "INSERT INTO devices (id, brand_id, model)"
            " VALUES ('galvani-ingest-1', 'acme', 'm1'), ('glow-1', 'acme', 'm1')"
        )
    with pytest.raises(RuntimeError, match=r"1 device\(s\) .*\(galvani-ingest-1\).* reserved"):
        upgrade(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0006",)]
        assert conn.execute("SELECT id FROM devices ORDER BY id").fetchall() == [
            ("galvani-ingest-1",),
            ("glow-1",),
        ]
        conn.execute("DELETE FROM devices WHERE id = 'galvani-ingest-1'")
    upgrade(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute(
            "SELECT 1 FROM pg_constraint WHERE conname = 'devices_id_not_reserved'"
        ).fetchone() == (1,)


def test_the_device_password_file_never_holds_a_reserved_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = BrokerFiles(tmp_path)
    encoded = hash_password("pw")
    credentials = [("dev-a1", encoded), *((device_id, encoded) for device_id in RESERVED_IDS)]
    with caplog.at_level(logging.ERROR, logger="services.common.broker_auth"):
        assert files.write_device_files(credentials) == 1
    assert files.path(DEVICE_PASSWD_FILE).read_text() == f"dev-a1:{encoded}\n"
    [record] = caplog.records
    assert record.getMessage().startswith(f"{len(RESERVED_IDS)} device id(s)")
    assert "galvani-ingest-1" in record.getMessage()
