"""No database password in anything a broker prints: real `rdbroker broker`, `migrate` and `apply`
processes given a password in each URL form (the local server trusts any password), started well and
failing (a database that does not exist, a port nobody listens on, a URL libpq refuses), their logs at
DEBUG in both formats and their stderr searched for the secret. The process starts take a while: the
first two tests are `slow`; tests/unit/common/test_redact.py covers each form quickly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.support.postgres import free_port

SECRET = "S3cretPw"
ODD = "S3cr@t:Pw/x"  # percent-encoded in the URL; libpq decodes it
ODD_FORMS = (ODD, quote(ODD, safe=""))
BOUND_S = 60.0  # a bound for a loaded machine, not a measure


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RDBROKER_", "OTEL_"))}
    return env | extra


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rdbroker_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or _env(),
    )


def _forms(url: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The database URL with a password in each form -> (URL, the secret's printable forms)."""
    rest = url.removeprefix("postgresql://postgres@")
    return {
        "userinfo": (f"postgresql+psycopg://postgres:{SECRET}@{rest}", (SECRET,)),
        "query": (f"postgresql://postgres@{rest}?password={SECRET}", (SECRET,)),
        "query-after-another": (
            f"postgresql://postgres@{rest}?connect_timeout=5&password={SECRET}",
            (SECRET,),
        ),
        "percent-encoded": (f"postgresql://postgres:{quote(ODD, safe='')}@{rest}", ODD_FORMS),
    }


def _assert_hidden(text: str, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        assert secret not in text, text[-3000:]


@pytest.mark.slow  # ~10 s: five processes
def test_brokers_started_with_a_password_never_print_it(pg_database_url: str, tmp_path: Path) -> None:
    migrated = _run(
        "migrate", "--database-url", _forms(pg_database_url)["userinfo"][0], "--log-level", "DEBUG"
    )
    assert migrated.returncode == 0, migrated.stderr
    _assert_hidden(migrated.stdout + migrated.stderr, (SECRET,))
    started = []
    for index, (name, (url, secrets)) in enumerate(_forms(pg_database_url).items()):
        http_port, log = free_port(), tmp_path / f"{name}.log"
        args = [
            *("--database-url", url, "--log-level", "DEBUG", "--log-format", ("json", "text")[index % 2]),
            *("--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{http_port}"),
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "rdbroker_broker", *args], env=_env(), stdout=out, stderr=out
            )
        started.append((process, http_port, log, secrets))
    try:
        for process, http_port, log, _ in started:
            deadline = time.monotonic() + BOUND_S
            while True:
                assert process.poll() is None, log.read_text()[-3000:]
                try:
                    status = httpx.get(f"http://127.0.0.1:{http_port}/v1/status", timeout=5)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.1)
            assert status.json()["database"]["state"] == "up"
            assert httpx.get(f"http://127.0.0.1:{http_port}/v1/servers", timeout=5).status_code == 200
    finally:
        for process, *_ in started:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(30) for process, *_ in started]
    assert codes == [0] * len(started)
    for index, (_, _, log, secrets) in enumerate(started):
        text = log.read_text()
        assert "broker listening" in text
        if index % 2 == 0:  # JSON lines carry the URL (the text format prints no fields)
            assert '"database": "postgresql' in text
            assert ":***@" in text or "password=***" in text
        _assert_hidden(text, secrets)


@pytest.mark.slow  # ~8 s each: five processes
@pytest.mark.parametrize("command", ["broker", "migrate"])
def test_failing_starts_quote_the_url_without_its_password(command: str) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    missing = f"rdbroker_missing_{uuid.uuid4().hex[:8]}"
    cases = {
        "no such database": (f"postgresql://postgres:{SECRET}@127.0.0.1:5432/{missing}", "does not exist"),
        "no such database, query form": (
            f"postgresql://postgres@127.0.0.1:5432/{missing}?password={SECRET}",
            "does not exist",
        ),
        "nobody listens": (
            f"postgresql+psycopg://postgres:{SECRET}@{nowhere}/db?connect_timeout=2",
            "Connection refused",
        ),
        "refused by libpq": (
            f"postgresql://postgres@127.0.0.1:5432/db?password={SECRET}&bogus=1",
            'invalid URI query parameter: "bogus"',
        ),
        "key=value string": (f"host=127.0.0.1 password={SECRET} dbname=x", "unsupported database URL"),
    }
    listen = ("--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0") if command == "broker" else ()

    def run(url: str) -> subprocess.CompletedProcess[str]:
        return _run(command, "--database-url", url, "--log-level", "DEBUG", *listen)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(run, [url for url, _ in cases.values()]), strict=True))
    for case, result in results.items():
        output = result.stdout + result.stderr
        assert result.returncode == 1, (case, output)
        assert cases[case][1] in output, (case, output)
        assert "***" in output, (case, output)
        assert "Traceback" not in output, (case, output)
        _assert_hidden(output, (SECRET,))


def test_apply_and_bad_settings_do_not_print_the_password(tmp_path: Path) -> None:
    farm = tmp_path / "farm.yaml"
    farm.write_text("pools:\n  - name: default\n    default: true\nservers:\n  - address: 10.0.0.11:3389\n")
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/db?connect_timeout=2"
    applied = _run("apply", "-f", str(farm), "--database-url", url)
    assert applied.returncode == 1
    assert "cannot apply to postgresql://postgres:***@" in applied.stderr
    bad = _run("broker", "--http-listen", "0.0.0.0:8080", env=_env(RDBROKER_DATABASE_URL=url))
    assert bad.returncode == 2
    assert "http_listen 0.0.0.0:8080 is not a loopback address" in bad.stderr
    for result in (applied, bad):
        _assert_hidden(result.stdout + result.stderr, (SECRET,))


def test_a_health_replica_with_bad_settings_does_not_print_its_tokens() -> None:
    # A settings-wide check fails: pydantic's own text would quote every setting's value.
    env = _env(RDBROKER_AGENT_TOKEN=SECRET, RDBROKER_AGENT_TLS_CERT="/nonexistent/cert.pem")
    bad = subprocess.run(
        [sys.executable, "-m", "rdbroker_health"], capture_output=True, text=True, timeout=120, env=env
    )
    assert bad.returncode == 2
    assert "agent_tls_cert and agent_tls_key go together" in bad.stderr
    _assert_hidden(bad.stdout + bad.stderr, (SECRET,))
