#!/usr/bin/env bash
# Make the TimescaleDB extension available to the local PostgreSQL.
#
# Debian bookworm ships no timescaledb package, so we build the one from
# Debian trixie's *source* package (Apache-2.0 only: Debian strips the TSL
# sources) against the local server with cmake.
#
#   - Does nothing if timescaledb is already installed for this server.
#   - The source is fetched with `apt-get source` using a private, throw-away
#     apt state (own sources.list, lists, cache, status); the machine's
#     /etc/apt configuration and package lists are not modified.  The trixie
#     Release file is verified against debian-archive-keyring.
#   - The build is staged (make install DESTDIR=...) into a cache directory,
#     so later runs (e.g. after the system dirs were wiped, or on a fresh
#     container with the same cache) only copy files: no network, no compiler.
#   - Installing into the PostgreSQL system dirs needs root.
#
# Environment:
#   PG_CONFIG                    pg_config to build against (default: the one on PATH)
#   GALVANI_CACHE_DIR            cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/galvani)
#   GALVANI_DEBIAN_MIRROR        Debian mirror (default: http://deb.debian.org/debian)
#   GALVANI_TIMESCALEDB_SUITE    Debian suite to take the source from (default: trixie)
#   GALVANI_TIMESCALEDB_REBUILD  set to 1 to ignore a cached build and rebuild
set -euo pipefail

log() { printf 'install-timescaledb: %s\n' "$*"; }
die() { printf 'install-timescaledb: error: %s\n' "$*" >&2; exit 1; }

# --- What are we installing into? -------------------------------------------

PG_CONFIG=${PG_CONFIG:-$(command -v pg_config || true)}
[[ -n $PG_CONFIG && -x $PG_CONFIG ]] \
    || die "pg_config not found; install PostgreSQL (postgresql-client-NN) or set PG_CONFIG"

PG_MAJOR=$("$PG_CONFIG" --version | sed -nE 's/^PostgreSQL ([0-9]+).*/\1/p')
[[ -n $PG_MAJOR ]] || die "cannot parse PostgreSQL version from '$PG_CONFIG --version'"
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
EXTDIR=$("$PG_CONFIG" --sharedir)/extension

# Prints the installed timescaledb version and succeeds only if the control
# file, the loader (timescaledb.so) and the versioned library it points to
# are all present.
installed_version() {
    local control=$EXTDIR/timescaledb.control version
    [[ -f $control ]] || return 1
    version=$(sed -nE "s/^[[:space:]]*default_version[[:space:]]*=[[:space:]]*'([^']+)'.*/\1/p" "$control")
    [[ -n $version && -f $PKGLIBDIR/timescaledb.so && -f $PKGLIBDIR/timescaledb-$version.so ]] || return 1
    printf '%s\n' "$version"
}

if version=$(installed_version); then
    log "timescaledb $version is already installed for PostgreSQL $PG_MAJOR; nothing to do"
    exit 0
fi

# Fail before doing any work if we could not install the result anyway.
# (Don't suggest "build as user, install with sudo": sudo usually changes
# $HOME, so the cache would not be found.)
if [[ $EUID -ne 0 ]] && ! { [[ -w $PKGLIBDIR ]] && [[ -w $EXTDIR ]]; }; then
    die "installing into $PKGLIBDIR and $EXTDIR needs root; re-run as root: sudo $0"
fi

CACHE_ROOT=${GALVANI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/galvani}/timescaledb
mkdir -p "$CACHE_ROOT"
LOG=$CACHE_ROOT/build-pg$PG_MAJOR.log

# Serialise concurrent runs sharing a cache (the lock is released on exit).
exec 9>"$CACHE_ROOT/.lock"
flock 9
# Another run may have finished the job while we waited.
if version=$(installed_version); then
    log "timescaledb $version is already installed for PostgreSQL $PG_MAJOR; nothing to do"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-timescaledb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Run a command with its output going to the log; on failure, one line.
run() {
    local what=$1; shift
    printf '\n=== %s: %s\n' "$what" "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || die "$what failed; full log: $LOG"
}

# --- Copy a staged build into the system dirs --------------------------------

install_staged() {
    local build=$1 version=$2 stage=$1/stage f
    [[ -f $stage$PKGLIBDIR/timescaledb-$version.so && -f $stage$EXTDIR/timescaledb.control ]] \
        || die "cached build in $build is incomplete; delete that directory and re-run"
    mkdir -p "$PKGLIBDIR" "$EXTDIR"
    # Libraries first and the control file last, so PostgreSQL (and our own
    # "already installed" check) never sees a control file without its .so.
    # `install` unlinks the target before writing, so replacing a library
    # that a running server has mapped is safe (cp would overwrite in place).
    for f in "$stage$PKGLIBDIR"/timescaledb*.so; do
        install -m 0644 "$f" "$PKGLIBDIR/"
    done
    for f in "$stage$EXTDIR"/timescaledb*; do
        [[ $f == */timescaledb.control ]] || install -m 0644 "$f" "$EXTDIR/"
    done
    install -m 0644 "$stage$EXTDIR/timescaledb.control" "$EXTDIR/"
}

# Newest cached build for this PostgreSQL major, if any ("<version>-pg<major>"
# directories with a completed stage).
cached_build() {
    local d
    [[ ${GALVANI_TIMESCALEDB_REBUILD:-0} == 1 ]] && return 1
    d=$(for d in "$CACHE_ROOT"/*-pg"$PG_MAJOR"; do
            if [[ -f $d/stage.done ]]; then printf '%s\n' "$d"; fi
        done | sort -V | tail -n 1)
    [[ -n $d ]] && printf '%s\n' "$d"
}

if build=$(cached_build); then
    version=$(basename "$build"); version=${version%-pg"$PG_MAJOR"}
    log "using cached build $build"
    install_staged "$build" "$version"
    log "installed timescaledb $version for PostgreSQL $PG_MAJOR (from cache)"
    exit 0
fi

: >"$LOG"
log "no cached build; building from Debian ${GALVANI_TIMESCALEDB_SUITE:-trixie} source (log: $LOG)"

# --- Build dependencies -------------------------------------------------------

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v make >/dev/null || missing+=(make)
command -v cc >/dev/null || command -v gcc >/dev/null || missing+=(gcc)
command -v xz >/dev/null || missing+=(xz-utils)
[[ -f $("$PG_CONFIG" --includedir-server)/postgres.h ]] || missing+=("postgresql-server-dev-$PG_MAJOR")
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f $KEYRING ]] || missing+=(debian-archive-keyring)

if ((${#missing[@]})); then
    [[ $EUID -eq 0 ]] \
        || die "missing build dependencies; run: sudo apt-get install --no-install-recommends ${missing[*]}"
    log "installing build dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Uses the machine's normal (bookworm) apt. Refresh the package lists
    # only if the first attempt fails (no lists yet, or stale ones -> 404).
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1; then
        run "apt-get update" apt-get update -q
        run "installing ${missing[*]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

# --- Fetch the source with a private apt state ---------------------------------

MIRROR=${GALVANI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${GALVANI_TIMESCALEDB_SUITE:-trixie}
APTDIR=$WORK/apt
mkdir -p "$APTDIR"/etc "$APTDIR"/state/lists/partial "$APTDIR"/cache/archives/partial "$WORK/dl"
: >"$APTDIR/state/status"
# signed-by: trust exactly Debian's archive keys for this source, nothing
# else from the machine's keyrings.
printf 'deb-src [signed-by=%s] %s %s main\n' "$KEYRING" "$MIRROR" "$SUITE" >"$APTDIR/etc/sources.list"
apt_private=(apt-get -q
    -o Dir::Etc::sourcelist="$APTDIR/etc/sources.list"
    -o Dir::Etc::sourceparts=-
    -o Dir::State="$APTDIR/state"
    -o Dir::State::status="$APTDIR/state/status"
    -o Dir::Cache="$APTDIR/cache")
if [[ $EUID -eq 0 ]]; then
    # As root apt downloads as the unprivileged _apt user; let it reach
    # our private dirs instead of falling back to downloading as root.
    chmod 0755 "$WORK"
    chown _apt "$WORK/dl" 2>/dev/null || true
fi

log "fetching timescaledb source from $MIRROR $SUITE"
run "apt-get update (private, $SUITE sources)" "${apt_private[@]}" update
# --download-only: we only need the upstream tarball; the Debian packaging
# (debian/*) only patches tests and a git hook, and targets PostgreSQL 17.
(cd "$WORK/dl" && run "apt-get source timescaledb" "${apt_private[@]}" source --download-only timescaledb)

shopt -s nullglob
origs=("$WORK"/dl/timescaledb_*.orig.tar.*)
shopt -u nullglob
orig=${origs[0]:-}
[[ -n $orig ]] || die "apt-get source did not produce an .orig tarball; full log: $LOG"
mkdir "$WORK/src"
run "extracting $(basename "$orig")" tar -xf "$orig" -C "$WORK/src" --strip-components=1
version=$(sed -nE 's/^version[[:space:]]*=[[:space:]]*([^[:space:]]+).*/\1/p' "$WORK/src/version.config")
[[ -n $version ]] || die "cannot read the version from the source's version.config"

# --- Build and stage into the cache ---------------------------------------------

build=$CACHE_ROOT/$version-pg$PG_MAJOR
rm -rf "$build"
mkdir -p "$build/debian-source"
cp "$WORK"/dl/timescaledb_* "$build/debian-source/"   # keep what we built from
mv "$WORK/src" "$build/src"

log "building timescaledb $version for PostgreSQL $PG_MAJOR"
# APACHE_ONLY: the TSL sources are not in Debian's tarball anyway.
# USE_TELEMETRY/SEND_TELEMETRY_DEFAULT off: no phoning home (as Debian does);
# that also makes OpenSSL unnecessary (only the telemetry HTTP client uses
# it), hence USE_OPENSSL=OFF and no libssl-dev needed.
run "cmake configure" cmake -S "$build/src" -B "$build/build" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPG_CONFIG="$PG_CONFIG" \
    -DAPACHE_ONLY=ON \
    -DUSE_TELEMETRY=OFF \
    -DSEND_TELEMETRY_DEFAULT=OFF \
    -DUSE_OPENSSL=OFF \
    -DREGRESS_CHECKS=OFF \
    -DTAP_CHECKS=OFF \
    -DWARNINGS_AS_ERRORS=OFF
run "build" make -C "$build/build" -j"$(nproc 2>/dev/null || echo 2)"
run "staging install" make -C "$build/build" install DESTDIR="$build/stage"
touch "$build/stage.done"
cp "$LOG" "$build/build.log"
rm -rf "$build/build"   # ~40 MB of objects; the stage is all we reuse

install_staged "$build" "$version"
log "installed timescaledb $version for PostgreSQL $PG_MAJOR (add shared_preload_libraries = 'timescaledb' to postgresql.conf)"
