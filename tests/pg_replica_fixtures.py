"""A streaming read replica of the test database (tests/pg_replica.py) as the database alias
"replica", for a test module.

Tests name it in their marker, which is how Django's test cases admit queries on an alias:

    @pytest.mark.django_db(transaction=True, databases=["default", "replica"])
    def test_x(pg_replica): ...

The alias is marked TEST MIRROR of "default" (PgReplica.settings()): Django's test cases
flush, reset sequences and load fixtures only on aliases that are no mirror, so the
read-only replica is left alone at teardown, while "default" is flushed as usual (and the
replica follows it, after the apply delay). Without "replica" in `databases`, Django's test
case turns every query on it into an error, as for any alias a test does not name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.pg_replica import PgReplica

ALIAS = "replica"
APPLY_DELAY = "2s"

# Loaded as a plugin before Django is set up: what needs it is imported when used.


@pytest.fixture(scope="module")
def pg_replica(
    django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgReplica]:
    """A PgReplica of the local server, started once the test databases exist, and Django's
    database alias "replica" pointed at it for the module."""
    import psycopg
    from django.db import connections

    primary = connections["default"].settings_dict  # NAME is the test database's by now
    replica = PgReplica(
        tmp_path_factory.mktemp("pg-replica"),
        apply_delay=APPLY_DELAY,
        primary_host=primary["HOST"] or "127.0.0.1",
        primary_port=int(primary["PORT"] or 5432),
        primary_user=primary["USER"] or "postgres",
    )
    replica.start()
    try:
        with psycopg.connect(
            host="127.0.0.1", port=replica.port, user=replica.primary["user"], dbname="postgres"
        ) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [primary["NAME"]]
            ).fetchone()
        if found is None:
            raise RuntimeError(f"The replica has no database {primary['NAME']!r}")
        if ALIAS in connections.settings:
            raise RuntimeError(f"The database alias {ALIAS!r} is defined already")
        # connections.settings is settings.DATABASES itself (the very dict, unless a test
        # overrides DATABASES): the alias appears in both, and connections[ALIAS] builds
        # its connection from it on first use in each thread.
        connections.settings[ALIAS] = replica.settings(primary, mirror="default")
        yield replica
    finally:
        _remove_alias()
        replica.stop()


def _remove_alias() -> None:
    """Close this thread's connection to the replica and forget the alias."""
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        if conn.alias == ALIAS:
            conn.close()
            del connections[ALIAS]
    connections.settings.pop(ALIAS, None)
