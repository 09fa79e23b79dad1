"""Engine construction (SQLite in WAL mode, or PostgreSQL) and migrations at start-up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

READ_ONLY = "radloop_read_only"
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine whose transactions are safe for concurrent writers on either backend."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy own transactions; BEGIN IMMEDIATE below takes the write lock up
            # front so concurrent writers queue on busy_timeout instead of failing to upgrade.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed index row survives power loss, as the ack promises.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


class SchemaOutdated(RuntimeError):
    """The database holds an older schema than this radloop's; a service start upgrades it."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@cache
def schema_head() -> str | None:
    """The newest migration this radloop ships (read once per process)."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def schema_revision(engine: Engine) -> str | None:
    """The migration the database is at; None for a database radloop never used."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# Any fixed number: services that start together on one PostgreSQL (Compose, Kubernetes, a
# cluster's hosts) take turns to migrate.
_MIGRATION_LOCK = 0x7261646C  # "radl"
# Tries at opening a store whose SQLite file another process holds locked (`Store.open`).
_START_ATTEMPTS = 4


def upgrade(engine: Engine) -> None:
    """Apply every Alembic migration up to head (idempotent), one process at a time: the next
    one finds the schema current. SQLite's BEGIN IMMEDIATE serialises it already; PostgreSQL
    takes a transaction-scoped advisory lock, since two `CREATE TABLE`s of the same name at
    once fail rather than wait."""
    config = _config()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Store:
    """The database handle passed down from entry points: an engine and its session factory."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = sessionmaker(
            engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )
        # SQLite has one writer at a time. Threads of this process queue on a lock that wakes
        # the next one at once, instead of sleeping in SQLite's busy handler (up to 100 ms a
        # step); other processes still wait on the busy timeout.
        self._write_lock: AbstractContextManager[Any] = (
            threading.RLock() if engine.dialect.name == "sqlite" else nullcontext()
        )

    @classmethod
    def open(cls, url: str, migrate: bool = False) -> Store:
        """Connect. Services pass `migrate` once at start-up and upgrade the schema; everyone
        else (commands, flow tasks) only checks it is current — a new database gets the
        schema, an older one is refused with what to do, rather than migrated under services
        that still run the old code."""
        engine = make_engine(url)
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                current = schema_revision(engine)
                if current != schema_head() and (migrate or current is None):
                    upgrade(engine)
                    current = schema_head()
                break
            except OperationalError as error:
                # Services opening a new SQLite file in the same instant: one of them once
                # got "database is locked" past the busy timeout (CI, 2 loaded cores; not
                # reproduced since). The migration is one transaction and idempotent: retry.
                if "database is locked" not in str(error) or attempt == _START_ATTEMPTS:
                    engine.dispose()
                    raise
                time.sleep(0.5 * attempt)
        if current != schema_head():
            engine.dispose()
            raise SchemaOutdated(
                f"the database schema is at {current}, this radloop needs {schema_head()}: "
                "start `radloop up` (or `radloop listen`) once to upgrade it"
            )
        return cls(engine)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits on success and rolls back on any exception."""
        with self._write_lock, self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """`transaction` without the ORM: a Core connection in a write transaction, for a hot
        path whose statements are Core already."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading only: on SQLite it takes no write lock, so it never waits
        behind (or holds up) writers."""
        with self._readers() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def insert_ignoring_conflict(session: Session, table: Any, values: dict[str, Any]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING on SQLite and PostgreSQL; True if a row was added."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result = session.execute(insert(table).values(**values).on_conflict_do_nothing())
    return bool(result.rowcount)  # type: ignore[attr-defined]
