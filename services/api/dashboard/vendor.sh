#!/usr/bin/env bash
# Refresh the vendored chart library from the npm registry (run by hand when upgrading; the
# files are committed so the dashboard works on a closed network with nothing fetched at run
# time). Usage: services/api/dashboard/vendor.sh [version]
set -euo pipefail
version="${1:-1.6.32}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "uplot@$version" --silent >/dev/null && tar xzf "uplot-$version.tgz")
dest="$here/static/vendor/uplot"
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" \
   "$work/package/LICENSE" "$dest/"
echo "$version" > "$dest/VERSION"
echo "uPlot $version vendored into $dest"
