"""The agent's TLS set-up: verification always on, the device certificate only with TLS, one
context shared by a fleet's devices, and command lines that cannot work refused up front."""

import asyncio
import json
import ssl
from pathlib import Path

import pytest
from device_agent.cli import main as agent_main
from device_agent.fleet import Fleet, parse_args
from device_agent.link import BrokerAddress
from device_agent.tls import client_context

from services.common import pki


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    pki.write_file(path, pki.pem(pki.Authority.create("Test CA").certificate), mode=0o644)
    return path


@pytest.fixture
def device_files(tmp_path: Path) -> tuple[Path, Path]:
    key = pki.new_device_key()
    certificate = pki.Authority.create("Device CA").issue_client("dev-0001", key.public_key())
    cert_path, key_path = tmp_path / "dev.pem", tmp_path / "dev.key"
    pki.write_file(cert_path, pki.pem(certificate), mode=0o644)
    pki.write_file(key_path, pki.private_pem(key), mode=0o600)
    return cert_path, key_path


def test_the_context_verifies_the_broker_and_its_name_on_tls_1_2_or_newer(ca_file: Path) -> None:
    context = client_context(str(ca_file))
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "Test CA"),),)]


def test_a_device_key_without_its_certificate_is_refused(ca_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without its certificate"):
        client_context(str(ca_file), key_file=str(tmp_path / "dev.key"))


def test_a_key_that_is_not_the_certificates_is_refused(
    ca_file: Path, device_files: tuple[Path, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    pki.write_file(other, pki.private_pem(pki.new_device_key()), mode=0o600)
    with pytest.raises(ssl.SSLError):
        client_context(str(ca_file), cert_file=str(device_files[0]), key_file=str(other))


def test_a_device_certificate_without_tls_is_refused(device_files: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="needs ca_file"):
        BrokerAddress("127.0.0.1", 8884, "", cert_file=str(device_files[0]))


def test_an_address_builds_its_context_unless_given_one_to_share(
    ca_file: Path, device_files: tuple[Path, Path]
) -> None:
    assert BrokerAddress("127.0.0.1", 1883, "pw").context() is None
    cert, key = device_files
    own = BrokerAddress("127.0.0.1", 8884, "", str(ca_file), str(cert), str(key)).context()
    assert own is not None
    assert own.get_ca_certs()  # the CA file was loaded
    shared = client_context(str(ca_file))
    address = BrokerAddress("127.0.0.1", 8883, "pw", str(ca_file), tls_context=shared)
    assert address.context() is shared


def _agent(tmp_path: Path, *extra: str) -> list[str]:
    key = tmp_path / "config-key"
    key.write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    return [
        "run",
        "--simulate",
        "--device-id=dev-0001",
        f"--public-key={key}",
        f"--store={tmp_path / 's.sqlite3'}",
        *extra,
    ]


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (["--cert-file=dev.pem"], "--cert-file and --key-file go together"),
        (["--key-file=dev.key"], "--cert-file and --key-file go together"),
        (["--cert-file=dev.pem", "--key-file=dev.key"], "--cert-file needs --ca-file"),
    ],
)
def test_the_agent_refuses_a_certificate_it_could_not_use(
    tmp_path: Path, options: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        agent_main(_agent(tmp_path, *options))
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_the_agent_says_when_its_ca_file_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GALVANI_AGENT_PASSWORD", "pw")
    complaint = r"galvani-agent: cannot set up TLS from .*missing\.pem: \[Errno 2\]"
    with pytest.raises(SystemExit, match=complaint):
        agent_main(_agent(tmp_path, f"--ca-file={tmp_path / 'missing.pem'}"))


def test_the_agent_needs_no_password_with_a_certificate(
    tmp_path: Path,
    ca_file: Path,
    device_files: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GALVANI_AGENT_PASSWORD", raising=False)
    cert, key = device_files
    # Nothing listens on port 1: the agent starts, fails to connect, and stops when asked.
    code = agent_main(
        _agent(
            tmp_path,
            "--port=1",
            f"--ca-file={ca_file}",
            f"--cert-file={cert}",
            f"--key-file={key}",
            "--duration=0.2",
        )
    )
    assert code == 0


def test_the_fleet_shares_one_tls_context_among_its_devices(tmp_path: Path, ca_file: Path) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({f"dev-{i:04d}": f"pw-{i}" for i in range(3)}))
    key = tmp_path / "config-key"
    key.write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    options = parse_args(
        [
            "--devices=3",
            f"--credentials={credentials}",
            "--port=1",  # nothing listens: the devices keep trying until the fleet stops
            f"--ca-file={ca_file}",
            f"--public-key={key}",
            f"--store={tmp_path / 'fleet.sqlite3'}",
            "--duration=0.2",
        ]
    )
    fleet = Fleet(options)
    asyncio.run(fleet.run(asyncio.Event()))
    contexts = {id(device.link._connection._tls) for device in fleet.devices}
    assert len(contexts) == 1
    assert fleet.devices[0].link._connection._tls is not None
    assert fleet.status()["tls"] is True


def test_the_fleet_says_when_its_ca_file_cannot_be_read(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"dev-0001": "pw"}))
    key = tmp_path / "config-key"
    key.write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    options = parse_args(
        [
            "--devices=1",
            f"--credentials={credentials}",
            f"--ca-file={tmp_path / 'missing.pem'}",
            f"--public-key={key}",
            f"--store={tmp_path / 'fleet.sqlite3'}",
        ]
    )
    with pytest.raises(SystemExit, match="galvani-fleet: cannot use the CA file"):
        asyncio.run(Fleet(options).run(asyncio.Event()))
