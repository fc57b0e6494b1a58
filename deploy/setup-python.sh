#!/usr/bin/env bash
# Create the project-local virtual environment (.venv) from requirements.lock.
# uv keeps one wheel cache per user (~/.cache/uv) and hard-links from it, so a
# fresh clone on a machine that has seen the project installs torch in seconds
# without fetching it again.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
CACHE="${MLPE_CACHE_DIR:-$HOME/.cache/mlpe}"
UV_HOME="$CACHE/uv-$UV_VERSION"
PYTHON="${MLPE_PYTHON:-python3}"
STAMP=.venv/.mlpe-installed

# The deploy/ files the wheel carries (pyproject.toml's force-include) are copied even
# by the editable install, so they are part of what the stamp stands for.
PACKAGED=(deploy/kafka/pom.xml deploy/kafka/log4j2.xml deploy/influxdb/build-influxd.sh
          deploy/rules/default.yaml)
WANT="$(cat requirements.lock pyproject.toml deploy/setup-python.sh "${PACKAGED[@]}" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x .venv/bin/mlpe ]]; then
  exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "setup: '$PYTHON' not found (need Python 3.11 or 3.12)" >&2; exit 1; }

if [[ ! -x "$UV_HOME/bin/uv" ]]; then
  echo "setup: installing uv $UV_VERSION into $UV_HOME"
  "$PYTHON" -m venv "$UV_HOME"
  "$UV_HOME/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
UV="$UV_HOME/bin/uv"

[[ -x .venv/bin/python ]] || "$UV" venv --quiet --python "$PYTHON" .venv
export UV_LINK_MODE="${UV_LINK_MODE:-hardlink}"
echo "setup: syncing .venv with requirements.lock (first time: several GB, torch included)"
# --compile-bytecode: pip's default, not uv's. Where PYTHONDONTWRITEBYTECODE is set (it
# is on this project's machines) nothing would ever be cached, and every process would
# compile torch's sources again on import: 6.3 s instead of 2.9 s per `import torch`.
"$UV" pip sync --python .venv/bin/python --compile-bytecode requirements.lock
"$UV" pip install --quiet --python .venv/bin/python --no-deps -e .
.venv/bin/python -m compileall -q -j 0 services agents kernels proto tests >/dev/null || true
echo "$WANT" > "$STAMP"
echo "setup: .venv ready"
