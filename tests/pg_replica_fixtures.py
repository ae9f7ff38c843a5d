"""A streaming read replica of the test database (tests/pg_replica.py) as the database alias
"replica", and a server of its own holding a database of the test database's NAME as the
alias "shard", for a test module.

Tests name it in their marker, which is how Django's test cases admit queries on an alias:

    @pytest.mark.django_db(transaction=True, databases=["default", "replica"])
    def test_x(pg_replica): ...

The alias is marked TEST MIRROR of "default" (PgReplica.settings()): Django's test cases
flush, reset sequences and load fixtures only on aliases that are no mirror, so the
read-only replica is left alone at teardown, while "default" is flushed as usual (and the
replica follows it, after the apply delay). Without "replica" in `databases`, Django's test
case turns every query on it into an error, as for any alias a test does not name.

"shard" is a database of its own (no TEST MIRROR): Django's test cases flush it after each
test that names it, as they do "default". It holds the tables of SHARD_MODELS only, among
them those the flush's post_migrate handlers fill (content types, permissions).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.pg_replica import PgReplica, PgServer

ALIAS = "replica"
APPLY_DELAY = "2s"
SHARD_ALIAS = "shard"
# Tables created on the shard: what tests read and write there, and what the post_migrate
# handlers of contenttypes and auth query after each test's flush.
SHARD_MODELS = ("contenttypes.ContentType", "auth.Permission", "testapp.Tenant")

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
        _databases_changed()
        yield replica
    finally:
        _remove_alias(ALIAS)
        replica.stop()


@pytest.fixture(scope="module")
def pg_shard(
    django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgServer]:
    """A PgServer (a cluster of its own, not in recovery) with a database of the test
    database's NAME, as the database alias "shard" for the module: the settings of
    "default" on another port, as a project names the same database on each shard's
    server. Its tables: SHARD_MODELS."""
    from django.apps import apps
    from django.db import connections

    primary = connections["default"].settings_dict  # NAME is the test database's by now
    server = PgServer(
        tmp_path_factory.mktemp("pg-shard"),
        primary_host=primary["HOST"] or "127.0.0.1",
        primary_port=int(primary["PORT"] or 5432),
        primary_user=primary["USER"] or "postgres",
    )
    server.start()
    try:
        server.create_database(primary["NAME"])
        if SHARD_ALIAS in connections.settings:
            raise RuntimeError(f"The database alias {SHARD_ALIAS!r} is defined already")
        connections.settings[SHARD_ALIAS] = server.settings(primary, mirror=None)
        _databases_changed()
        with django_db_blocker.unblock(), connections[SHARD_ALIAS].schema_editor() as editor:
            for label in SHARD_MODELS:
                editor.create_model(apps.get_model(label))
        yield server
    finally:
        _remove_alias(SHARD_ALIAS)
        server.stop()


def _databases_changed() -> None:
    """DATABASES was changed in place (no setting_changed signal): tiered_cache looks the
    databases up again (which aliases share one, which servers are replicas; a port of a
    stopped server may be given to the next one)."""
    from tiered_cache import groups

    groups.forget()


def _remove_alias(alias: str) -> None:
    """Close this thread's connection to the alias and forget it."""
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        if conn.alias == alias:
            conn.close()
            del connections[alias]
    connections.settings.pop(alias, None)
    _databases_changed()
