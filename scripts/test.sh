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
bash scripts/install_system_deps.sh
exec .venv/bin/python -m pytest "$@"
