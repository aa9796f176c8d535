#!/usr/bin/env bash
# The whole test suite on a fresh machine with Python 3.11+: a virtualenv, the project with its dev
# tools, PostgreSQL, then pytest (which also runs ruff, mypy, the import contracts and the proto check).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
bash scripts/ensure_postgres.sh
# The dashboard's browser test drives Debian's chromium (Playwright cannot download its own browser
# here): install it when it is missing and we may (root with apt-get).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
