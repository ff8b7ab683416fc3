"""``galvani-agent`` and ``galvani-fleet`` refuse bad command lines with a clear message."""

import json
import random
from pathlib import Path

import pytest
from device_agent.cli import main as agent_main
from device_agent.fleet import Credential, load_credentials, parse_args, spread


def _run(tmp_path: Path, *extra: str) -> list[str]:
    key = tmp_path / "key"
    key.write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")  # 32 zero bytes
    return [
        "run",
        "--device-id=dev-0001",
        f"--public-key={key}",
        f"--store={tmp_path / 's.sqlite3'}",
        *extra,
    ]


def test_without_a_password_the_agent_says_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GALVANI_AGENT_PASSWORD", raising=False)
    with pytest.raises(SystemExit, match="--password-file or set GALVANI_AGENT_PASSWORD"):
        agent_main(_run(tmp_path, "--simulate"))


def test_without_simulate_the_agent_explains_there_is_no_driver(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no hardware driver"):
        agent_main(_run(tmp_path))


@pytest.mark.parametrize("argument", ["--session=LIFT", "--session=LIFT:high", "--scenario=turbo"])
def test_malformed_options_are_usage_errors(
    tmp_path: Path, argument: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        agent_main(_run(tmp_path, "--simulate", argument))
    assert exit_info.value.code == 2
    assert "galvani-agent run: error:" in capsys.readouterr().err


def test_a_public_key_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "short"
    key.write_text("AAAA")
    with pytest.raises(SystemExit, match="raw 32-byte Ed25519 public key"):
        parse_args(
            ["--devices=1", "--credentials=c.json", f"--public-key={key}", "--store=s.sqlite3"]
        )


def test_fleet_credentials_take_a_password_or_a_password_and_user(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a-01": "pw1", "b-02": {"password": "pw2", "user": "u-9"}}))
    assert load_credentials(path) == {
        "a-01": Credential("pw1", None),
        "b-02": Credential("pw2", "u-9"),
    }
    path.write_text(json.dumps({"a-01": 5}))
    with pytest.raises(SystemExit, match="must map device ids"):
        load_credentials(path)


def _fleet_args(tmp_path: Path, *extra: str) -> list[str]:
    key = tmp_path / "key"
    key.write_text("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    return [
        "--devices=1",
        "--credentials=c.json",
        f"--public-key={key}",
        "--store=s.sqlite3",
        *extra,
    ]


def test_the_fleet_takes_a_clusters_nodes_repeated_or_comma_separated_and_the_mqtt_version(
    tmp_path: Path,
) -> None:
    options = parse_args(
        _fleet_args(
            tmp_path, "--broker=10.0.0.1:1884,10.0.0.2", "--broker=h3:1886", "--mqtt-version=3.1.1"
        )
    )
    assert options.nodes == (("10.0.0.1", 1884), ("10.0.0.2", 1883), ("h3", 1886))
    assert options.protocol == 4
    assert parse_args(_fleet_args(tmp_path, "--keepalive=15")).keepalive_s == 15

    default = parse_args(_fleet_args(tmp_path, "--port=1999"))
    assert default.nodes == (("127.0.0.1", 1999),)
    assert default.protocol == 5


@pytest.mark.parametrize(
    "arguments",
    [
        ["--broker=a:1", "--port=2"],
        ["--broker=a:x"],
        ["--broker=:1"],
        ["--mqtt-version=3"],
        ["--keepalive=0"],
    ],
)
def test_broker_options_that_cannot_both_hold_are_usage_errors(
    tmp_path: Path, arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(_fleet_args(tmp_path, *arguments))
    assert exit_info.value.code == 2
    assert "galvani-fleet: error:" in capsys.readouterr().err


def test_the_fleet_spreads_devices_over_the_nodes_and_each_fails_over_to_all_the_others() -> None:
    nodes = [("n", 1), ("n", 2), ("n", 3)]
    orders = [spread(nodes, index, random.Random(index)) for index in range(12)]

    assert [order[0] for order in orders] == nodes * 4
    assert all(sorted(order) == nodes for order in orders)
    # The devices of a node that dies do not all land on the same one of the others.
    assert {order[1] for order in orders[::3]} == {("n", 2), ("n", 3)}
