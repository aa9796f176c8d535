"""The hot-path statements fit psycopg's parsed-query cache (4 KiB, 50 parameters: psycopg/_queries.py
MAX_CACHED_STATEMENT_LENGTH / _PARAMS); a longer statement has its placeholders parsed again on every
call, which showed up as several percent of the broker's CPU under load."""

from __future__ import annotations

import re

import pytest

from rdbroker_broker.db import report_sql, routing_sql

PSYCOPG_CACHE_BYTES = 4096
PSYCOPG_CACHE_PARAMS = 50
STATEMENTS = {
    name: value
    for module in (routing_sql, report_sql)
    for name, value in vars(module).items()
    if name.isupper() and isinstance(value, str) and value.lstrip().upper().startswith(("WITH", "SELECT"))
}


def test_the_hot_path_statements_are_all_checked() -> None:
    assert {
        "CONTEXT_PLACE_GUARDED_NAMED",
        "CONTEXT_DEFAULT",
        "OPENED",
        "CLOSED",
        "OPENED_CLOSED",
        "ANSWER",
    } <= set(STATEMENTS)


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_a_statement_fits_the_parsed_query_cache(name: str) -> None:
    sql = STATEMENTS[name]
    assert len(sql.encode()) <= PSYCOPG_CACHE_BYTES
    assert len(set(re.findall(r"%\((\w+)\)s", sql))) <= PSYCOPG_CACHE_PARAMS
