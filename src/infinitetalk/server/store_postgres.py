"""The Postgres job store: many workers on many machines claim jobs with FOR UPDATE SKIP LOCKED."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..errors import InputError
from .store import JobStore


class PostgresStore(JobStore):
    now = "extract(epoch from clock_timestamp())::double precision"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    serial = "BIGSERIAL PRIMARY KEY"
    real = "DOUBLE PRECISION"

    def __init__(self, url: str, max_size: int = 16):
        try:
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise InputError("--db postgresql://... needs the Postgres driver: pip install 'infinitetalk[server]'.") \
                from None
        import psycopg

        self._pool = ConnectionPool(url, min_size=1, max_size=max_size, kwargs={"row_factory": dict_row},
                                    open=False)
        try:
            self._pool.open(wait=True, timeout=15.0)
        except (psycopg.Error, Exception) as err:  # noqa: BLE001 - PoolTimeout and connection errors alike
            self._pool.close()
            raise InputError(f"Cannot connect to the Postgres job store ({type(err).__name__}); check --db and "
                             "that the server is running.") from None

    SCHEMA_LOCK = 0x1A7E  # advisory lock key shared by every infinitetalk process

    def init_schema(self) -> None:
        """CREATE TABLE IF NOT EXISTS under an advisory lock: many processes may start at once."""
        with self._pool.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (self.SCHEMA_LOCK,))
            try:
                conn.commit()
                super().init_schema()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.SCHEMA_LOCK,))
                conn.commit()

    def q(self, sql: str) -> str:
        return super().q(sql).replace("%", "%%").replace("?", "%s")

    @contextmanager
    def transaction(self) -> Iterator[object]:
        with self._pool.connection() as conn:  # commits on success, rolls back on an exception
            yield conn

    def close(self) -> None:
        self._pool.close()
