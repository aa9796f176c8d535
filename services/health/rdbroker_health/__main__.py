"""`rdbroker health` / `python -m rdbroker_health`: run one health-probe replica.

Every setting is a flag `--foo-bar` and a variable `RDBROKER_FOO_BAR`; flags win. The agents' token is
a variable only (`RDBROKER_AGENT_TOKEN`), or a file (`--agent-token-file`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from rdbroker_common import lifecycle, logs, telemetry
from rdbroker_common.flags import add_settings_flags, settings_errors, settings_from
from rdbroker_health import app
from rdbroker_health.config import ENV_ONLY, HealthSettings
from rdbroker_health.errors import ConfigError

log = logging.getLogger("rdbroker_health")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdbroker health",
        description="Probe the terminal servers this replica claims from the broker and report to it.",
        # `--agent-token SECRET` must not pass as an abbreviation of --agent-token-file.
        allow_abbrev=False,
    )
    add_settings_flags(parser, HealthSettings, env_only=ENV_ONLY)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = settings_from(HealthSettings, args)
    except ValidationError as exc:
        sys.stderr.write(f"rdbroker health: invalid settings:\n{settings_errors(exc)}\n")
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        handle = telemetry.setup(
            "rdbroker-health", otlp_endpoint=settings.otlp_endpoint, metrics_listen=settings.metrics_listen
        )
    except OSError as exc:
        sys.stderr.write(f"rdbroker health: cannot serve metrics on {settings.metrics_listen}: {exc}\n")
        return 2
    try:
        lifecycle.run(lambda: _serve(settings))
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    finally:
        handle.shutdown()
    return 0


async def _serve(settings: HealthSettings) -> None:
    await app.run(settings, lifecycle.stop_event_on_signals())


if __name__ == "__main__":
    raise SystemExit(main())
