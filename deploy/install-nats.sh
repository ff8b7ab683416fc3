#!/usr/bin/env bash
# Make a nats-server (2.10, with JetStream and its MQTT gateway) available to the project,
# for the clustered broker (`make run-cluster`, the cluster tests, `make bench-cluster`).
#
# Debian bookworm's nats-server is 2.9, which has no auth callout and elects MQTT stream
# replicas from the servers it knows at first use; trixie's 2.10 is linked only against libc
# (>= 2.34) and runs here. Nothing is installed system-wide and no service is started: the
# .deb is downloaded with a private, throw-away apt state (own sources.list, lists and cache;
# the trixie Release file is verified against debian-archive-keyring; the machine's /etc/apt
# is not touched), unpacked, and its binary kept in a cache directory. Later runs only check
# the cache.
#
# Prints the path of the nats-server binary on its last line.
#
# Environment:
#   GALVANI_NATS_SERVER    use this nats-server instead (must be 2.10 or newer)
#   GALVANI_CACHE_DIR      cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/galvani)
#   GALVANI_DEBIAN_MIRROR  Debian mirror (default: http://deb.debian.org/debian)
#   GALVANI_NATS_SUITE     Debian suite to take the package from (default: trixie)
set -euo pipefail

log() { printf 'install-nats: %s\n' "$*" >&2; }
die() { printf 'install-nats: error: %s\n' "$*" >&2; exit 1; }

# 2.10 or newer: auth callout (how the cluster asks Galvani's database about each device).
recent_enough() {
    local version
    version=$("$1" --version 2>/dev/null | sed -nE 's/^nats-server: v([0-9]+\.[0-9]+).*/\1/p')
    [[ -n $version ]] && printf '%s\n2.10\n' "$version" | sort -V -C -r
}

if [[ -n ${GALVANI_NATS_SERVER:-} ]]; then
    recent_enough "$GALVANI_NATS_SERVER" || die "$GALVANI_NATS_SERVER is not nats-server 2.10 or newer"
    printf '%s\n' "$GALVANI_NATS_SERVER"
    exit 0
fi

CACHE_ROOT=${GALVANI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/galvani}/nats
mkdir -p "$CACHE_ROOT"

cached() {
    local binary
    binary=$(for d in "$CACHE_ROOT"/*/; do
                 [[ -f $d/stage.done && -x $d/nats-server ]] && printf '%s\n' "${d%/}/nats-server"
             done | sort -V | tail -n 1)
    [[ -n $binary ]] && recent_enough "$binary" && printf '%s\n' "$binary"
}

if binary=$(cached); then
    printf '%s\n' "$binary"
    exit 0
fi

exec 9>"$CACHE_ROOT/.lock"
flock 9
if binary=$(cached); then  # another run finished it while we waited
    printf '%s\n' "$binary"
    exit 0
fi

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $KEYRING ]] || die "$KEYRING is missing; install debian-archive-keyring"
command -v dpkg-deb >/dev/null || die "dpkg-deb is missing"

MIRROR=${GALVANI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${GALVANI_NATS_SUITE:-trixie}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-nats.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG=$CACHE_ROOT/install.log

run() {
    local what=$1; shift
    printf '\n=== %s: %s\n' "$what" "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || die "$what failed; full log: $LOG"
}

APTDIR=$WORK/apt
mkdir -p "$APTDIR/etc" "$APTDIR/state/lists/partial" "$APTDIR/cache/archives/partial" "$WORK/dl"
touch "$APTDIR/state/status"
printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$MIRROR" "$SUITE" >"$APTDIR/etc/sources.list"
apt_private=(apt-get -q
    -o Dir::Etc::sourcelist="$APTDIR/etc/sources.list"
    -o Dir::Etc::sourceparts=-
    -o Dir::State="$APTDIR/state"
    -o Dir::State::status="$APTDIR/state/status"
    -o Dir::Cache="$APTDIR/cache")
if [[ $EUID -eq 0 ]]; then
    # As root apt downloads as the unprivileged _apt user; let it write there.
    chown -R _apt "$APTDIR/state/lists" "$APTDIR/cache" "$WORK/dl" 2>/dev/null || true
fi

log "downloading nats-server from Debian $SUITE"
run "apt-get update (private, $SUITE)" "${apt_private[@]}" update
(cd "$WORK/dl" && run "apt-get download nats-server" "${apt_private[@]}" download nats-server)
deb=$(ls "$WORK"/dl/nats-server_*.deb 2>/dev/null | head -n 1)
[[ -n $deb ]] || die "apt-get download produced no nats-server .deb; full log: $LOG"
run "unpacking $(basename "$deb")" dpkg-deb -x "$deb" "$WORK/x"
unpacked=$WORK/x/usr/sbin/nats-server
version=$("$unpacked" --version | sed -nE 's/^nats-server: v(.*)$/\1/p')
[[ -n $version ]] || die "the unpacked nats-server does not run here: $("$unpacked" --version 2>&1 | head -n 1)"
recent_enough "$unpacked" || die "Debian $SUITE has nats-server $version; 2.10 or newer is needed"

dest=$CACHE_ROOT/$version
mkdir -p "$dest"
install -m 0755 "$unpacked" "$dest/nats-server"
cp "$WORK"/x/usr/share/doc/nats-server/copyright "$dest/" 2>/dev/null || true
touch "$dest/stage.done"
log "nats-server $version in $dest"
printf '%s\n' "$dest/nats-server"
