#!/usr/bin/env bash
# Debian's Chromium for the tests' headless-browser checks, unpacked into the per-user
# cache ($MLPE_CACHE_DIR or ~/.cache/mlpe)/chromium/<version>/ - nothing system-wide.
#
# The same way mlpe gets Redis: `apt-get download` the package and the part of its
# dependency closure that this system lacks (what `apt-get install --simulate` would
# install), `dpkg-deb -x` each into the cache, and run the browser through a small
# wrapper that points LD_LIBRARY_PATH at the unpacked libraries.
#
# Idempotent: a `chromium` on PATH or a cached one that starts is used as it is.
# The last line printed is the path of the browser to run; errors are one line on
# stderr and a non-zero exit.
set -euo pipefail

say() { echo "install-chromium: $*" >&2; }
fail() { echo "install-chromium: error: $*" >&2; exit 1; }

works() {  # a browser that starts and prints its version
    "$1" --version >/dev/null 2>&1
}

cache="${MLPE_CACHE_DIR:-$HOME/.cache/mlpe}/chromium"

if system=$(command -v chromium) && works "$system"; then
    echo "$system"
    exit 0
fi
use_cached() {  # print the newest cached browser that starts and exit, if there is one
    [ -d "$cache" ] || return 0
    while read -r dir; do
        if [ -n "$dir" ] && works "$dir/bin/chromium"; then
            echo "$dir/bin/chromium"
            exit 0
        fi
    done < <(find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | sort -rV)
}
use_cached

# One install at a time (pytest's workers may all ask at once); the others then find it.
mkdir -p "$cache"
if command -v flock >/dev/null; then
    exec 9>"$cache/.lock"
    flock 9
    use_cached
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || fail "$tool not found: this needs a Debian-like system"
done

simulate() {  # what `apt-get install chromium` would do here, installing nothing
    apt-get install --simulate --no-install-recommends chromium 2>&1 || true
}
# "name version" of each package it would add (or upgrade: "Inst name [old] (new ...)").
added() {
    awk '/^Inst / { v = ($3 ~ /^\[/) ? $4 : $3; gsub(/[()]/, "", v); print $2, v }'
}

simulated=$(simulate)
if ! grep -q '^Inst chromium ' <<<"$simulated" && [ "$(id -u)" = 0 ]; then
    # An image without package lists: refresh them once and retry.
    say "no chromium in the package lists; running apt-get update once"
    apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed"
    simulated=$(simulate)
fi
grep -q '^Inst chromium ' <<<"$simulated" ||
    fail "apt cannot install chromium here: $(grep '^E:' <<<"$simulated" | tail -n 1)"
plan=$(added <<<"$simulated")

version=$(awk '$1 == "chromium" { print $2 }' <<<"$plan" | tr ':' '-')
packages=$(awk '{ print $1 }' <<<"$plan")
count=$(wc -l <<<"$packages")
say "chromium $version: fetching $count Debian packages this system lacks"

target="$cache/$version"
tmp=$(mktemp -d)
staging="$cache/.staging.$$"  # beside the target, so the final move is one rename
trap 'rm -rf "$tmp" "$staging"' EXIT
started=$SECONDS
# shellcheck disable=SC2086 # one word per package name
if ! (cd "$tmp" && apt-get download $packages >"$tmp/download.log" 2>&1); then
    fail "apt-get download failed: $(grep -v '^W:' "$tmp/download.log" | tail -n 1)"
fi

for deb in "$tmp"/*.deb; do
    dpkg-deb -x "$deb" "$staging"
done
say "unpacked $(find "$tmp" -maxdepth 1 -name '*.deb' | wc -l) packages"

# Every folder of the unpacked tree that holds shared libraries.
libs=$(find "$staging" \( -name '*.so' -o -name '*.so.*' \) -printf '%h\n' | sort -u |
       sed "s|^$staging|\$root|" | sort -r | paste -sd: -)
mkdir -p "$staging/bin"
cat >"$staging/bin/chromium" <<EOF
#!/bin/sh
# Debian's chromium unpacked here by tests/tools/install-chromium.sh.
root=\$(cd "\$(dirname "\$0")/.." && pwd)
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$root/usr/lib/chromium/chromium" "\$@"
EOF
chmod +x "$staging/bin/chromium"

works "$staging/bin/chromium" ||
    fail "the unpacked chromium does not start: $("$staging/bin/chromium" --version 2>&1 |
          tail -n 1)"
rm -rf "$target"
mv "$staging" "$target"
say "$("$target/bin/chromium" --version | xargs) in $target" \
    "($(du -sh "$target" | cut -f1), $((SECONDS - started)) s)"
echo "$target/bin/chromium"
