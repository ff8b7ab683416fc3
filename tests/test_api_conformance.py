"""Schemathesis with every check (``--checks all``) against the API's own ``/openapi.json``,
as the operator and as a brand admin (issue 19, item 10): a request the document says is
valid is accepted, one it says is invalid is refused, a method it does not list answers 405
with an exact ``Allow``, and no answer is a 5xx or undocumented.

Each role gets a database of its own, seeded with a realistic brand, and the API on a real
server; schemathesis runs as its command line does (every phase: examples, coverage, fuzzing
and stateful), with a fixed seed, deterministic generation and a bounded number of examples
per operation, so a run is the same each time and both take well under a minute.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest
from fastapi.testclient import TestClient

from deploy.stack.mosquitto import MosquittoBroker
from deploy.stack.postgres import PostgresServer
from services.api.main import create_app
from services.api.settings import ApiSettings
from tests.api import copied_database, issue_keys, seed_brand, serving

SEED: Final = 1
MAX_EXAMPLES: Final = 4
RUN_TIMEOUT_S: Final = 120
# The Server-Sent Events stream never ends, so no example of it could finish within a request
# timeout; its one parameter (Last-Event-ID) is checked in tests/test_api_query_params.py.
EXCLUDED_PATH: Final = "/v1/alerts/stream"
# The only refusals of schema-valid requests left, each for a reason JSON schema cannot state
# and the operation's description (and docs/api.md) gives: a table's cross-field safety rules
# (i_target_ua <= i_max_ua, z_ok_ohm low <= high, session default <= cap), and telemetry's
# bound of 10,000 points per answer (it depends on the range, the bucket and the data); and
# certificate enrolment, whose `csr` or `certificate` must be a parseable PEM that verifies (a
# string schema cannot say so) and must agree with `auth`; and a notification channel (made or
# changed), whose `url` must resolve, and only to public addresses (an outbound policy on DNS
# answers, which no schema can state; here no generated host resolves at all), whose quiet
# hours' `time_zone` must be an IANA zone name, and whose recipients must be addresses that
# email-validator accepts (stricter than `format: email`). Every other check still runs on
# these operations.
CONFIG: Final = """
[checks]
enabled = true

[[operations]]
include-name = "POST /v1/mode-tables"
checks.positive_data_acceptance.enabled = false

[[operations]]
include-name-regex = '^GET /v1/devices/[^/]+/telemetry(/suspect)?$'
checks.positive_data_acceptance.enabled = false

[[operations]]
include-name-regex = '^POST /v1/(devices(/[^/]+/certificate)?|device-authorities)$'
checks.positive_data_acceptance.enabled = false

[[operations]]
include-name-regex = '^(POST /v1/notification-channels|PATCH /v1/notification-channels/[^/]+)$'
checks.positive_data_acceptance.enabled = false
"""


@pytest.mark.parametrize("role", ["operator", "admin"])
def test_the_api_accepts_what_its_schema_allows_and_refuses_the_rest(
    role: str,
    postgres: PostgresServer,
    template_url: str,
    broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    with copied_database(postgres, template_url, f"conformance_{os.getpid()}_{role}") as url:
        settings = ApiSettings(
            database_url=url,
            mqtt_port=broker.config.service_port,
            mqtt_password="x",
            mqtt_ca_file=broker.config.pki.ca_file,
            data_dir=tmp_path,
            # Schemathesis sends far more than a client would: the limits are not under test.
            rate_limit_burst=1_000_000,
            rate_limit_per_s=1_000_000.0,
            auth_failures_per_window=1_000_000,
        )
        keys = issue_keys(url)
        with TestClient(create_app(settings)) as client:
            seed_brand(url, "acme", settings.key_dir(), client, keys["admin"])
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG)
        with serving(create_app(settings)) as (host, port):
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "schemathesis.cli",
                    "--config-file",
                    str(config),
                    "run",
                    f"http://{host}:{port}/openapi.json",
                    "--header",
                    f"Authorization: Bearer {keys[role]}",
                    "--seed",
                    str(SEED),
                    "--generation-deterministic",
                    "--max-examples",
                    str(MAX_EXAMPLES),
                    "--workers",
                    "1",
                    "--exclude-path",
                    EXCLUDED_PATH,
                    "--request-timeout",
                    "10",
                    "--no-color",
                ],
                capture_output=True,
                text=True,
                cwd=tmp_path,
                timeout=RUN_TIMEOUT_S,
                check=False,
            )
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
