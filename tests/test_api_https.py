"""The API over HTTPS: the real server (``python -m services.api.main``) with
GALVANI_API_TLS=1 answers a client that verifies its certificate and host name, and refuses
plain HTTP; in production it will not start with TLS off unless a proxy terminates TLS."""

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.stack.pki import DevelopmentPKI
from deploy.stack.ports import free_port
from services.api.settings import ApiSettings
from services.common.settings import REPO_ROOT
from services.common.tls import client_context

START_TIMEOUT_S = 30.0


def _environment(database_url: str, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    kept = {k: v for k, v in os.environ.items() if not k.startswith("GALVANI_")}
    return {
        **kept,
        "GALVANI_API_DATABASE_URL": database_url,
        "GALVANI_API_MQTT_PASSWORD": "not-a-default-secret",
        "GALVANI_API_MQTT_TLS": "0",
        "GALVANI_API_PORT": str(port),
        "GALVANI_API_WORKERS": "1",
        "GALVANI_API_DATA_DIR": str(data_dir),
        **extra,
    }


@pytest.fixture
def https_api(api_database_url: str, tmp_path: Path) -> Iterator[tuple[int, DevelopmentPKI]]:
    """The API serving HTTPS with the development PKI's server certificate: (port, PKI)."""
    development_pki = DevelopmentPKI.ensure(tmp_path / "pki")
    port = free_port()
    env = _environment(
        api_database_url,
        tmp_path,
        port,
        GALVANI_API_TLS="1",
        GALVANI_API_TLS_CERT_FILE=str(development_pki.server_cert),
        GALVANI_API_TLS_KEY_FILE=str(development_pki.server_key),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.api.main"],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        context = client_context(development_pki.ca_file)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            try:
                urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/healthz", context=context, timeout=2
                ).close()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the API did not start serving HTTPS"
                time.sleep(0.2)
        yield port, development_pki
    finally:
        process.terminate()
        process.wait(15)
        if process.stderr:
            process.stderr.close()


def test_the_api_serves_https_that_a_verifying_client_accepts(
    https_api: tuple[int, DevelopmentPKI],
) -> None:
    port, development_pki = https_api
    context = client_context(development_pki.ca_file)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    for host in ("127.0.0.1", "localhost"):
        with urllib.request.urlopen(
            f"https://{host}:{port}/healthz", context=context, timeout=5
        ) as response:
            assert response.status == 200
            assert json.loads(response.read()) == {"status": "ok"}
    # A client trusting only the system's store refuses the server: the check is real.
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(
            f"https://127.0.0.1:{port}/healthz", context=client_context(None), timeout=5
        )
    # Plain HTTP on the port gets no answer.
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_in_production_the_api_refuses_to_start_without_tls(
    api_database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = _environment(api_database_url, tmp_path, port, GALVANI_ENVIRONMENT="production")
    del env["GALVANI_API_MQTT_TLS"]  # production refuses it off, and would say that first
    run = subprocess.run(
        [sys.executable, "-m", "services.api.main"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode != 0
    assert "GALVANI_API_TLS is off" in run.stderr
    assert "GALVANI_API_TLS_OFFLOADED=1" in run.stderr


def test_tls_settings_are_checked_when_the_settings_are_read(tmp_path: Path) -> None:
    base = {"database_url": "postgresql://api:s3cret-x@127.0.0.1/galvani", "mqtt_password": "y"}
    with pytest.raises(ValidationError, match="GALVANI_API_TLS is off"):
        ApiSettings(**base, environment="production")
    with pytest.raises(ValidationError, match="GALVANI_API_TLS_CERT_FILE"):
        ApiSettings(**base, tls=True)
    offloaded = ApiSettings(**base, environment="production", tls_offloaded=True)
    assert not offloaded.tls
    served = ApiSettings(
        **base,
        environment="production",
        tls=True,
        tls_cert_file=tmp_path / "server.pem",
        tls_key_file=tmp_path / "server.key",
    )
    assert served.tls_cert_file == tmp_path / "server.pem"
