"""deploy/systemd checked by systemd's own tools, offline.

``systemd-analyze verify --root=R`` loads the units from a throw-away root R that holds a copy
of the distribution's units (sysinit.target and friends) and an empty executable at every path
the units run: it fails on a bad setting, a missing executable or an unknown unit they require,
but only warns (exit status 0) on an unknown key, so any output at all fails the test.
``systemd-analyze security --offline`` scores the sandbox of each service as systemd would apply
it, the shared drop-in (galvani-.service.d/) included. systemd is not PID 1 here (nor need it
be): both read unit files only.
"""

import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.settings import REPO_ROOT

UNITS_DIR = REPO_ROOT / "deploy" / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
PYTHON = "/opt/galvani/venv/bin/python"
# systemd-analyze security's exposure, 0 (locked down) to 10 (nothing), times ten: every unit
# scores 1.4 with the drop-in, and 9.2 without it.
EXPOSURE_THRESHOLD = 20

Directive = tuple[str, str, str]  # (section, key, value)


def systemd_analyze() -> str:
    """The systemd-analyze binary; the test fails when it is missing."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail(
            "systemd-analyze is missing: `make test` installs it (Debian's systemd package, "
            "through deploy/install-system-deps.sh)"
        )
    return found


def parse_unit(path: Path) -> list[Directive]:
    """A unit file's directives in order; keys repeat (After=, Environment=), so no dict."""
    directives: list[Directive] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        directives.append((section, key.strip(), value.strip()))
    return directives


def values(directives: list[Directive], key: str) -> list[str]:
    """Every value of ``key``, in order."""
    return [value for _, k, value in directives if k == key]


def unit_files() -> list[Path]:
    """The units of deploy/systemd (not the drop-in)."""
    return sorted(p for p in UNITS_DIR.iterdir() if p.suffix in (".service", ".target"))


def instance_name(path: Path) -> str:
    """The name to load ``path`` by: a template by its DefaultInstance (or ``1``)."""
    if "@." not in path.name:
        return path.name
    default = values(parse_unit(path), "DefaultInstance")
    return path.name.replace("@.", f"@{default[0] if default else '1'}.")


def executables(directives: list[Directive]) -> set[str]:
    """The absolute program paths of the Exec*= lines (their prefixes -, @, +, ! stripped)."""
    programs = set()
    for _, key, value in directives:
        if key.startswith("Exec") and value:
            programs.add(value.split()[0].lstrip("-@+!:"))
    return programs


def make_root(root: Path, units: Path) -> None:
    """A root holding the distribution's units, ``units``' files (drop-ins too) and an empty
    executable at every path the units run."""
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    shutil.copytree(units, root / "etc" / "systemd" / "system", dirs_exist_ok=True)
    for path in units.iterdir():
        if path.suffix in (".service", ".target"):
            for program in executables(parse_unit(path)):
                assert program.startswith("/"), f"{path.name}: {program} is not an absolute path"
                stub = root / program.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\n")
                stub.chmod(0o755)
    for directory in ("opt/galvani", "etc/galvani"):
        (root / directory).mkdir(parents=True, exist_ok=True)


def verify(root: Path, names: list[str]) -> str:
    """``systemd-analyze verify`` of ``names`` in ``root``: its output, empty when clean."""
    result = subprocess.run(
        [systemd_analyze(), "verify", f"--root={root}", *names],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not output:
        output = f"exit status {result.returncode}"
    return output


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A root with deploy/systemd installed, shared by the tests of this module."""
    path = tmp_path_factory.mktemp("systemd-root")
    make_root(path, UNITS_DIR)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_every_unit_passes_systemd_analyze_verify_without_a_word(root: Path) -> None:
    names = [instance_name(path) for path in unit_files()]
    assert "galvani.target" in names
    output = verify(root, names)
    assert output == "", output


def test_verify_reports_an_unknown_key_that_systemd_only_warns_about(tmp_path: Path) -> None:
    # systemd-analyze exits 0 on an unknown key: the check above fails on it only because it
    # fails on any output.
    units = tmp_path / "units"
    shutil.copytree(UNITS_DIR, units)
    api = units / "galvani-api.service"
    api.write_text(api.read_text().replace("[Service]\n", "[Service]\nRestartSecs=2s\n"))
    make_root(tmp_path / "root", units)
    output = verify(tmp_path / "root", ["galvani-api.service"])
    assert "Unknown key" in output, output


def test_every_service_is_sandboxed_by_the_shared_drop_in(root: Path) -> None:
    services = [instance_name(path) for path in unit_files() if path.suffix == ".service"]
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--root={root}",
            f"--threshold={EXPOSURE_THRESHOLD}",
            "--no-pager",
            *services,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    levels = re.findall(r"Overall exposure level for (\S+): (\d+\.\d)", result.stdout)
    assert sorted(name for name, _ in levels) == sorted(services), result.stdout + result.stderr
    assert result.returncode == 0, "\n".join(f"{name}: {level}" for name, level in levels)
    assert all(float(level) * 10 <= EXPOSURE_THRESHOLD for _, level in levels), levels


def test_a_unit_without_the_drop_in_is_over_the_threshold(tmp_path: Path) -> None:
    units = tmp_path / "units"
    shutil.copytree(UNITS_DIR, units)
    shutil.rmtree(units / "galvani-.service.d")
    make_root(tmp_path / "root", units)
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=yes",
            f"--root={tmp_path / 'root'}",
            f"--threshold={EXPOSURE_THRESHOLD}",
            "--no-pager",
            "galvani-api.service",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result.stdout


def python_units() -> list[Path]:
    """The units that run a Python module of the repository."""
    return [
        path
        for path in unit_files()
        if any(v.startswith(f"{PYTHON} -m ") for v in values(parse_unit(path), "ExecStart"))
    ]


def module_of(path: Path) -> str:
    """The module a Python unit runs (``python -m <module>``)."""
    (exec_start,) = values(parse_unit(path), "ExecStart")
    match = re.fullmatch(rf"{re.escape(PYTHON)} -m ([\w.]+)", exec_start)
    assert match, f"{path.name}: ExecStart={exec_start}"
    return match.group(1)


def test_each_python_unit_runs_a_module_of_this_repository() -> None:
    units = python_units()
    assert len(units) >= 6
    for path in units:
        module = module_of(path)
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{path.name}: no module {module}"
        assert spec.origin is not None, f"{path.name}: {module} is not a file"
        assert Path(spec.origin).is_relative_to(REPO_ROOT / "services"), spec.origin


def test_every_service_with_a_main_module_has_a_unit() -> None:
    run_by_units = {module_of(path) for path in python_units()}
    mains = {
        f"services.{main.parent.name}.main" for main in (REPO_ROOT / "services").glob("*/main.py")
    }
    assert mains, "no services/*/main.py"
    assert mains <= run_by_units, f"no unit runs {sorted(mains - run_by_units)}"


def test_python_units_run_as_galvani_from_their_environment_file_and_restart() -> None:
    for path in python_units():
        directives = parse_unit(path)
        service = path.name.removeprefix("galvani-").split("@")[0].split(".")[0]
        assert values(directives, "User") == ["galvani"], path.name
        assert values(directives, "Restart") == ["on-failure"], path.name
        assert f"/etc/galvani/{service}.env" in values(directives, "EnvironmentFile"), path.name
        assert "galvani.target" in values(directives, "WantedBy"), path.name
        assert "galvani.target" in values(directives, "PartOf"), path.name


def test_templated_workers_take_their_worker_id_from_the_instance() -> None:
    for service in ("ingest", "rules"):
        directives = parse_unit(UNITS_DIR / f"galvani-{service}@.service")
        environment = " ".join(values(directives, "Environment")).split()
        assert f"GALVANI_{service.upper()}_WORKER_ID=%i" in environment, service


def test_every_environment_file_is_documented() -> None:
    readme = (UNITS_DIR / "README.md").read_text()
    for path in unit_files():
        for env_file in values(parse_unit(path), "EnvironmentFile"):
            documented = env_file.lstrip("-").replace("%i", "<i>")
            assert documented in readme, f"{path.name}: {env_file} not in README"
