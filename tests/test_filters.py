"""CLI filters are globs matched in Postgres exactly as policies match in Python."""

from __future__ import annotations

from fnmatch import fnmatchcase

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlqd.filters import glob_regex

ALPHABET = "ab.-![]*?^\\$ é\n"


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pattern=st.text(alphabet=ALPHABET, max_size=8),
    values=st.lists(st.text(alphabet=ALPHABET, max_size=6), min_size=1, max_size=6),
)
def test_glob_regex_matches_what_fnmatchcase_matches(
    db_url: str, pattern: str, values: list[str]
) -> None:
    with psycopg.connect(db_url) as conn:
        cur = conn.execute(
            "SELECT v ~ %s FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, n) ORDER BY n",
            [glob_regex(pattern), values],
        )
        in_postgres = [row[0] for row in cur.fetchall()]
    assert in_postgres == [fnmatchcase(v, pattern) for v in values], glob_regex(pattern)
