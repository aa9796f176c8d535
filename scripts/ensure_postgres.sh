#!/usr/bin/env bash
# Start the machine's PostgreSQL cluster if it is installed and down. Without one, the tests start
# a throwaway cluster of their own from the server binaries, so this never fails the run.
set -u
if command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; then
  exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
  done
fi
exit 0
