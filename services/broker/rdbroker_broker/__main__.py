"""`rdbroker broker|migrate|apply ...` (and `python -m rdbroker_broker`): flags over `RDBROKER_*` env."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import psycopg
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from rdbroker_broker import callers
from rdbroker_broker.app import StartupError, serve
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.errors import BrokerError
from rdbroker_common import lifecycle, logs, telemetry
from rdbroker_common.flags import add_settings_flags, settings_errors, settings_from
from rdbroker_common.redact import redact

log = logging.getLogger("rdbroker_broker")


# Tokens are read from the environment only: a command line shows in `ps` to every user of the host.
ENV_ONLY = (
    "api_read_token",
    "api_admin_token",
    "grpc_proxy_token",
    "grpc_health_token",
    "grpc_admin_token",
    "agent_token",
    "power_hook_secret",
)


def _common_flags(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(parser, BrokerSettings, only=("database_url", "log_level", "log_format"))


def _settings(args: argparse.Namespace) -> BrokerSettings:
    return settings_from(BrokerSettings, args)


def _fail(prog: str, message: str, code: int = 2) -> int:
    # Every error line goes through redact: driver messages may quote the database URL.
    sys.stderr.write(f"{prog}: {redact(message)}\n")
    return code


def broker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdbroker broker", description="Run the broker (gRPC + REST).")
    add_settings_flags(parser, BrokerSettings, env_only=ENV_ONLY)
    return parser


def broker_settings(argv: list[str]) -> BrokerSettings:
    """Flags over `RDBROKER_*` environment variables over defaults. Raises ValidationError."""
    return _settings(broker_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    parser = broker_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        return _fail(parser.prog, f"bad settings:\n{settings_errors(exc)}")
    logs.configure(settings.log_level, settings.log_format)
    try:
        handle = telemetry.setup(
            "rdbroker-broker", otlp_endpoint=settings.otlp_endpoint, metrics_listen=settings.metrics_listen
        )
    except (OSError, ValueError) as exc:
        return _fail(parser.prog, f"cannot serve metrics on {settings.metrics_listen}: {exc}", 1)

    async def run() -> None:
        stop = lifecycle.stop_event_on_signals()
        await serve(settings, stop=stop)

    try:
        lifecycle.run(run)
    except (StartupError, BrokerError) as exc:
        log.error("%s", exc)
        return _fail(parser.prog, str(exc), 1)
    except (SQLAlchemyError, psycopg.Error, OSError) as exc:  # unreachable, auth, no such database, ...
        url = settings.database_url_text
        message = f"cannot start: the database {redact(url)}: {_one_line(exc, url)}"
        log.error("%s", message)
        return _fail(parser.prog, message, 1)
    except Exception:
        # Through the log formatter, which redacts, rather than Python's own traceback printer.
        log.exception("the broker stopped on an unexpected error")
        return 1
    finally:
        handle.shutdown()
    return 0


def migrate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rdbroker migrate", description="Upgrade the database schema to head."
    )
    _common_flags(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        return _fail(parser.prog, f"bad settings:\n{settings_errors(exc)}")
    logs.configure(settings.log_level, "text")

    async def run() -> str | None:
        engine = make_engine(settings.database_url_text)
        try:
            await migrate.upgrade(engine)
            return await migrate.current_revision(engine)
        finally:
            await engine.dispose()

    try:
        revision = asyncio.run(run())
    except (BrokerError, OSError) as exc:
        return _fail(parser.prog, str(exc), 1)
    except Exception as exc:  # the driver's own errors: unreachable, auth, ...
        url = settings.database_url_text
        return _fail(parser.prog, f"cannot migrate {redact(url)}: {_one_line(exc, url)}", 1)
    sys.stdout.write(f"database at revision {revision}\n")
    return 0


def apply_main(argv: list[str] | None = None) -> int:
    from rdbroker_broker.farm import FarmError, apply_caller, apply_farm, load_farm

    parser = argparse.ArgumentParser(prog="rdbroker apply", description="Apply a farm file (pools, servers).")
    _common_flags(parser)
    parser.add_argument("-f", "--file", required=True, type=Path, help="farm YAML file")
    parser.add_argument("--dry-run", action="store_true", help="show the changes, change nothing")
    parser.add_argument("--prune", action="store_true", help="delete servers and pools not in the file")
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --prune: also delete servers holding live sessions (ends them)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        return _fail(parser.prog, f"bad settings:\n{settings_errors(exc)}")
    logs.configure(settings.log_level, "text")
    try:
        farm = load_farm(
            args.file.read_text(encoding="utf-8"),
            str(args.file),
            default_probe_interval_ms=settings.probe_interval_ms,
        )
    except OSError as exc:
        return _fail(parser.prog, f"cannot read {args.file}: {exc}")
    except FarmError as exc:
        return _fail(parser.prog, str(exc))

    async def run() -> int:
        engine = make_engine(settings.database_url_text)
        try:
            plan = await apply_farm(engine, farm, dry_run=args.dry_run, prune=args.prune, force=args.force)
        finally:
            await engine.dispose()
        for line in plan.changes or ["no changes"]:
            sys.stdout.write(f"{'would ' if args.dry_run else ''}{line}\n")
        for line in plan.refusals:
            sys.stderr.write(f"refused: {line}\n")
        return 1 if plan.refusals else 0

    try:
        with callers.use_caller(apply_caller()):  # the audit trail's actor (docs/security.md)
            return asyncio.run(run())
    except (BrokerError, FarmError) as exc:
        return _fail(parser.prog, str(exc), 1)
    except (SQLAlchemyError, psycopg.Error, OSError) as exc:  # unreachable, auth, bad database, ...
        url = settings.database_url_text
        return _fail(parser.prog, f"cannot apply to {redact(url)}: {_one_line(exc, url)}", 1)


def _one_line(exc: BaseException, url: str) -> str:
    """The driver's own message (not SQLAlchemy's wrapper with its SQL and links), first line only,
    with the URL's password hidden should the message quote it."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    return redact(lines[0].replace(url, redact(url)))


if __name__ == "__main__":
    raise SystemExit(main())
