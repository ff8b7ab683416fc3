"""Running Debian's promtool on the alert rules in deploy/prometheus."""

import shutil
import subprocess

import pytest

from services.common.settings import REPO_ROOT

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"


def _promtool(*args: str) -> str:
    """promtool's output for ``args``, run in RULES_DIR; the test fails if it does."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `make test` installs it (Debian's prometheus package, through "
            "deploy/install-system-deps.sh)"
        )
    result = subprocess.run(
        [found, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def check_rules(name: str) -> str:
    """``promtool check rules`` on a rule file of RULES_DIR: its output."""
    return _promtool("check", "rules", name)


def check_config(name: str) -> str:
    """``promtool check config`` on a Prometheus configuration of RULES_DIR (it checks the rule
    files the configuration names as well): its output."""
    return _promtool("check", "config", name)


def run_rule_tests(name: str) -> str:
    """``promtool test rules`` on a unit-test file of RULES_DIR: its output."""
    return _promtool("test", "rules", name)
