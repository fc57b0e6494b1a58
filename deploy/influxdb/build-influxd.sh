#!/usr/bin/env bash
# Build InfluxDB OSS `influxd` from its Go module, once per user and version.
# Why not `go install`: influxdb's go.mod has a replace directive, so we build
# inside a writable copy of the module. Flux's Rust core is compiled by
# InfluxData's pkg-config wrapper through cargo.
set -euo pipefail

VERSION="${MLPE_INFLUXD_VERSION:-v2.7.12}"
CACHE="${MLPE_CACHE_DIR:-$HOME/.cache/mlpe}"
OUT_DIR="$CACHE/influxd/$VERSION"
OUT="$OUT_DIR/influxd"
WORK="$CACHE/build/influxdb-$VERSION"

if [[ -x "$OUT" ]]; then
  echo "influxd $VERSION already built: $OUT"
  exit 0
fi
for tool in go cargo gcc pkg-config; do
  command -v "$tool" >/dev/null || { echo "influxd build: '$tool' not found on PATH" >&2; exit 1; }
done

mkdir -p "$OUT_DIR" "$WORK/bin"
echo "influxd: fetching module github.com/influxdata/influxdb/v2@$VERSION"
MOD_DIR="$(go mod download -json "github.com/influxdata/influxdb/v2@$VERSION" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
if [[ ! -f "$WORK/src/go.mod" ]]; then
  rm -rf "$WORK/src"
  cp -r "$MOD_DIR" "$WORK/src"
  chmod -R u+w "$WORK/src"
fi
cd "$WORK/src"

echo "influxd: building InfluxData's pkg-config wrapper"
go build -o "$WORK/bin/pkg-config" github.com/influxdata/pkg-config

# flux's crates deny all warnings, and current Rust adds warnings; cap lints at
# "warn" for every crate (including build dependencies, which RUSTFLAGS misses).
cat >"$WORK/bin/rustc-cap-lints" <<'WRAP'
#!/usr/bin/env bash
rustc="$1"; shift
for arg in "$@"; do [[ "$arg" == --cap-lints* ]] && exec "$rustc" "$@"; done
exec "$rustc" "$@" --cap-lints warn
WRAP
chmod +x "$WORK/bin/rustc-cap-lints"

export PKG_CONFIG="$WORK/bin/pkg-config"
export RUSTUP_TOOLCHAIN=stable        # flux pins a toolchain we cannot download
export RUSTC_WRAPPER="$WORK/bin/rustc-cap-lints"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"

echo "influxd: compiling (libflux is built with LTO; expect 10-30 minutes the first time)"
go build -tags sqlite_foreign_keys,sqlite_json \
  -ldflags "-X main.version=${VERSION#v} -X main.commit=go-module" -o "$OUT.tmp" ./cmd/influxd
mv "$OUT.tmp" "$OUT"
"$OUT" version
echo "influxd $VERSION built: $OUT"
