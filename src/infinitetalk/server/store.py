"""The job store: one interface, SQL shared by SQLite (default) and Postgres (many workers).

States: queued -> running -> succeeded | failed | cancelled; running -> queued when its worker
stops heartbeating (crash, kill, lost machine) or shuts down; queued -> cancelled. Workers
`claim` a queued job atomically (SQLite: one writer at a time; Postgres: FOR UPDATE SKIP LOCKED),
preferring jobs whose model settings match the pipeline they have loaded. A finished job with a
webhook URL gets a delivery row in the same transaction (sent by `webhooks.Dispatcher`).
Timestamps are the database's clock (seconds since the epoch), so machines compare one clock.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")

PROGRESS_COLUMNS = ("stage", "window_index", "window_count", "windows_done", "step", "steps", "eta_s", "elapsed_s",
                    "first_window", "first_window_at", "frames", "duration_s")


@dataclass
class JobRecord:
    seq: int
    id: str
    state: str
    spec: str
    model_key: str
    webhook_url: Optional[str]
    created_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    updated_at: float
    heartbeat_at: Optional[float]
    worker: Optional[str]
    attempts: int
    cancel_requested: int
    stage: Optional[str]
    window_index: Optional[int]
    window_count: Optional[int]
    windows_done: int
    step: Optional[int]
    steps: Optional[int]
    eta_s: Optional[float]
    elapsed_s: Optional[float]
    first_window: Optional[int]
    first_window_at: Optional[float]
    frames: Optional[int]
    duration_s: Optional[float]
    error: Optional[str]
    error_type: Optional[str]
    version: int

    @classmethod
    def from_row(cls, row: dict) -> "JobRecord":
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def spec_dict(self) -> dict:
        return json.loads(self.spec)

    def public(self) -> dict:
        """The job as the API shows it."""
        running = self.state == "running"
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "attempts": self.attempts,
            "worker": self.worker if running else None,  # host:pid:device:tag of the worker holding it (None when not running)
            "cancel_requested": bool(self.cancel_requested),
            "progress": {
                "stage": self.stage,
                "window": (self.window_index + 1) if running and self.window_index is not None else None,
                "windows": self.window_count,
                "windows_done": self.windows_done,
                "step": self.step if running else None,
                "steps": self.steps,
                "eta_s": self.eta_s if running else (0.0 if self.state == "succeeded" else None),
                "elapsed_s": self.elapsed_s,
                "resumed_from_window": self.first_window,
            },
            "first_window_s": (self.first_window_at - self.created_at) if self.first_window_at else None,
            "error": {"type": self.error_type, "detail": self.error} if self.error else None,
            "result": None,
            "webhook_url": self.webhook_url,
            "settings": public_settings(self.spec_dict),
        }
        if self.state == "succeeded":
            out["result"] = {"url": f"/v1/jobs/{self.id}/video", "frames": self.frames, "duration_s": self.duration_s}
        return out


def public_settings(spec: dict) -> dict:
    """The job's settings without the server's own paths (uploaded files show as their field name)."""
    out = {k: v for k, v in spec.items() if v not in (None, False, (), []) and k not in ("output", "resume")}
    runtime = {k: v for k, v in (out.pop("runtime", None) or {}).items() if k in ("model", "variant", "dtype", "fast",
                                                                                 "fp8", "fp8_attention") and v}
    if runtime:
        out["runtime"] = runtime
    for name in ("image", "video", "audio", "audio2"):
        value = out.get(name)
        if isinstance(value, str) and not os.path.isabs(value):
            out[name] = f"(uploaded {name})"
    return out


def iso(ts: Optional[float]) -> Optional[str]:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Delivery:
    id: str
    job_id: str
    event: str
    url: str
    body: str
    attempts: int


class JobStore:
    """SQL shared by both databases; subclasses give the connection, clock and locking clause."""

    now = ""  # SQL expression of the database clock in epoch seconds
    skip_locked = ""  # the row-locking suffix of a claim
    serial = ""  # column type of an auto-incrementing key
    real = "DOUBLE PRECISION"

    # ---- connections (subclasses) ----------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Any]:  # pragma: no cover - abstract
        raise RuntimeError("JobStore subclasses define transaction()")
        yield

    def close(self) -> None:
        """Release connections."""

    def q(self, sql: str) -> str:
        """SQL with {now} filled in, in the driver's parameter style."""
        return sql.replace("{now}", self.now)

    def _exec(self, tx, sql: str, params: tuple = ()):
        return tx.execute(self.q(sql), params)

    def _one(self, tx, sql: str, params: tuple = ()) -> Optional[dict]:
        rows = self._exec(tx, sql, params).fetchall()  # drained, so SQLite can commit after RETURNING
        return dict(rows[0]) if rows else None

    def _all(self, tx, sql: str, params: tuple = ()) -> list[dict]:
        return [dict(r) for r in self._exec(tx, sql, params).fetchall()]

    # ---- schema ----------------------------------------------------------------------------
    def init_schema(self) -> None:
        r = self.real
        with self.transaction() as tx:
            self._exec(tx, f"""CREATE TABLE IF NOT EXISTS jobs (
                seq {self.serial}, id TEXT UNIQUE NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,
                model_key TEXT NOT NULL, webhook_url TEXT, created_at {r} NOT NULL, started_at {r},
                finished_at {r}, updated_at {r} NOT NULL, heartbeat_at {r}, worker TEXT,
                attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, stage TEXT,
                window_index INTEGER, window_count INTEGER, windows_done INTEGER NOT NULL DEFAULT 0, step INTEGER,
                steps INTEGER, eta_s {r}, elapsed_s {r}, first_window INTEGER, first_window_at {r}, frames INTEGER,
                duration_s {r}, error TEXT, error_type TEXT, version INTEGER NOT NULL DEFAULT 0)""")
            self._exec(tx, "CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq)")
            self._exec(tx, f"""CREATE TABLE IF NOT EXISTS deliveries (
                id TEXT PRIMARY KEY, job_id TEXT NOT NULL, event TEXT NOT NULL, url TEXT NOT NULL, body TEXT NOT NULL,
                state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at {r} NOT NULL,
                claimed_by TEXT, claimed_at {r}, last_status INTEGER, last_error TEXT, created_at {r} NOT NULL,
                delivered_at {r})""")
            self._exec(tx, "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at)")

    def ping(self) -> bool:
        with self.transaction() as tx:
            return self._one(tx, "SELECT 1 AS ok") is not None

    # ---- jobs: API side ------------------------------------------------------------------
    def insert(self, job_id: str, spec: dict, model_key: str, webhook_url: Optional[str]) -> JobRecord:
        with self.transaction() as tx:
            self._exec(tx, "INSERT INTO jobs (id, state, spec, model_key, webhook_url, created_at, updated_at) "
                           "VALUES (?, 'queued', ?, ?, ?, {now}, {now})",
                       (job_id, json.dumps(spec, sort_keys=True), model_key, webhook_url))
            return JobRecord.from_row(self._one(tx, "SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def get(self, job_id: str) -> Optional[JobRecord]:
        with self.transaction() as tx:
            row = self._one(tx, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_row(row) if row else None

    def list(self, state: Optional[str] = None, limit: int = 20, before: Optional[int] = None) -> list[JobRecord]:
        where, params = [], []
        if state:
            where.append("state = ?")
            params.append(state)
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
        with self.transaction() as tx:
            rows = self._all(tx, sql, (*params, int(limit)))
        return [JobRecord.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self.transaction() as tx:
            rows = self._all(tx, "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        out = {s: 0 for s in STATES}
        out.update({r["state"]: int(r["n"]) for r in rows})
        return out

    def request_cancel(self, job_id: str) -> Optional[JobRecord]:
        """Queued: cancelled now. Running: flagged (the worker stops at the next step)."""
        with self.transaction() as tx:
            row = self._one(tx, "SELECT * FROM jobs WHERE id = ?" + self.skip_locked.replace(" SKIP LOCKED", ""),
                            (job_id,))
            if row is None:
                return None
            if row["state"] == "queued":
                self._exec(tx, "UPDATE jobs SET state = 'cancelled', finished_at = {now}, updated_at = {now}, "
                               "error = ?, error_type = 'JobCancelledError', version = version + 1 WHERE id = ?",
                           ("The job was cancelled before it started.", job_id))
                self._enqueue(tx, job_id, "cancelled")
            elif row["state"] == "running":
                self._exec(tx, "UPDATE jobs SET cancel_requested = 1, updated_at = {now}, version = version + 1 "
                               "WHERE id = ?", (job_id,))
            return JobRecord.from_row(self._one(tx, "SELECT * FROM jobs WHERE id = ?", (job_id,)))

    def delete(self, job_id: str) -> bool:
        with self.transaction() as tx:
            n = self._exec(tx, "DELETE FROM jobs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled')",
                           (job_id,)).rowcount
            if n:
                self._exec(tx, "DELETE FROM deliveries WHERE job_id = ?", (job_id,))
        return bool(n)

    # ---- jobs: worker side ---------------------------------------------------------------
    def claim(self, worker: str, loaded_key: Optional[str], model_wait: float) -> Optional[JobRecord]:
        """Take the next queued job: first any job waiting longer than `model_wait` seconds,
        then jobs for the loaded model settings, then the oldest."""
        with self.transaction() as tx:
            row = self._one(tx, "SELECT id FROM jobs WHERE state = 'queued' ORDER BY CASE "
                                "WHEN created_at < {now} - ? THEN 0 WHEN model_key = ? THEN 1 ELSE 2 END, seq "
                                "LIMIT 1" + self.skip_locked, (float(model_wait), loaded_key or ""))
            if row is None:
                return None
            self._exec(tx, "UPDATE jobs SET state = 'running', worker = ?, attempts = attempts + 1, "
                           "started_at = COALESCE(started_at, {now}), heartbeat_at = {now}, updated_at = {now}, "
                           "stage = 'claimed', step = NULL, eta_s = NULL, version = version + 1 WHERE id = ?",
                       (worker, row["id"]))
            return JobRecord.from_row(self._one(tx, "SELECT * FROM jobs WHERE id = ?", (row["id"],)))

    def heartbeat(self, job_id: str, worker: str) -> Optional[bool]:
        """Renew the lease; returns whether a cancel was asked, or None when the job is no longer ours."""
        with self.transaction() as tx:
            row = self._one(tx, "UPDATE jobs SET heartbeat_at = {now} WHERE id = ? AND worker = ? AND "
                                "state = 'running' RETURNING cancel_requested", (job_id, worker))
        return None if row is None else bool(row["cancel_requested"])

    def progress(self, job_id: str, worker: str, **values: Any) -> bool:
        cols = [c for c in values if c in PROGRESS_COLUMNS]
        sets = ", ".join(f"{c} = ?" for c in cols)
        sql = (f"UPDATE jobs SET {sets + ', ' if sets else ''}updated_at = {{now}}, version = version + 1 "
               "WHERE id = ? AND worker = ? AND state = 'running'")
        with self.transaction() as tx:
            return self._exec(tx, sql, (*[values[c] for c in cols], job_id, worker)).rowcount > 0

    def mark_first_window(self, job_id: str, worker: str) -> None:
        with self.transaction() as tx:
            self._exec(tx, "UPDATE jobs SET first_window_at = COALESCE(first_window_at, {now}) WHERE id = ? AND "
                           "worker = ?", (job_id, worker))

    def finish(self, job_id: str, worker: str, state: str, error: Optional[str] = None,
               error_type: Optional[str] = None, frames: Optional[int] = None,
               duration_s: Optional[float] = None) -> bool:
        """End a running job this worker holds (and queue its webhook)."""
        assert state in TERMINAL
        with self.transaction() as tx:
            n = self._exec(tx, "UPDATE jobs SET state = ?, finished_at = {now}, updated_at = {now}, error = ?, "
                               "error_type = ?, frames = COALESCE(?, frames), duration_s = COALESCE(?, duration_s), "
                               "step = NULL, eta_s = NULL, version = version + 1 "
                               "WHERE id = ? AND worker = ? AND state = 'running'",
                           (state, error, error_type, frames, duration_s, job_id, worker)).rowcount
            if n:
                self._enqueue(tx, job_id, state)
        return bool(n)

    def requeue(self, job_id: str, worker: str, reason: str) -> bool:
        """Give a running job back to the queue (worker shutting down); finished windows stay."""
        with self.transaction() as tx:
            return self._exec(tx, "UPDATE jobs SET state = 'queued', worker = NULL, stage = ?, step = NULL, "
                                  "eta_s = NULL, updated_at = {now}, version = version + 1 "
                                  "WHERE id = ? AND worker = ? AND state = 'running'",
                              (reason, job_id, worker)).rowcount > 0

    def reap(self, timeout: float, max_attempts: int) -> tuple[list[str], list[str]]:
        """Re-queue running jobs whose worker is silent for `timeout` s; fail those claimed
        `max_attempts` times already. Returns (re-queued ids, failed ids)."""
        with self.transaction() as tx:
            stale = self._all(tx, "SELECT id, attempts FROM jobs WHERE state = 'running' AND heartbeat_at < {now} - ?"
                              + self.skip_locked, (float(timeout),))
            requeued, failed = [], []
            for row in stale:
                if row["attempts"] >= max_attempts:
                    self._exec(tx, "UPDATE jobs SET state = 'failed', finished_at = {now}, updated_at = {now}, "
                                   "error = ?, error_type = 'WorkerLostError', version = version + 1 WHERE id = ?",
                               (f"The job's worker stopped {row['attempts']} times while running it; it is not "
                                "tried again (see the server logs).", row["id"]))
                    self._enqueue(tx, row["id"], "failed")
                    failed.append(row["id"])
                else:
                    self._exec(tx, "UPDATE jobs SET state = 'queued', worker = NULL, stage = 'requeued', "
                                   "step = NULL, eta_s = NULL, updated_at = {now}, version = version + 1 WHERE id = ?",
                               (row["id"],))
                    requeued.append(row["id"])
        return requeued, failed

    def running_on(self, host: str) -> list[JobRecord]:
        with self.transaction() as tx:
            rows = self._all(tx, "SELECT * FROM jobs WHERE state = 'running' AND worker LIKE ?", (host + ":%",))
        return [JobRecord.from_row(r) for r in rows]

    # ---- webhook deliveries ----------------------------------------------------------------
    def _enqueue(self, tx, job_id: str, state: str) -> None:
        row = self._one(tx, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not row or not row["webhook_url"]:
            return
        job = JobRecord.from_row(row).public()
        msg_id = "msg_" + secrets.token_urlsafe(16)
        body = json.dumps({"type": f"job.{state}", "timestamp": job["finished_at"], "data": job},
                          separators=(",", ":"), sort_keys=True)
        self._exec(tx, "INSERT INTO deliveries (id, job_id, event, url, body, state, next_at, created_at) "
                       "VALUES (?, ?, ?, ?, ?, 'pending', {now}, {now})",
                   (msg_id, job_id, f"job.{state}", row["webhook_url"], body))

    def claim_deliveries(self, claimer: str, limit: int = 8, lease: float = 60.0) -> list[Delivery]:
        with self.transaction() as tx:
            rows = self._all(tx, "SELECT id FROM deliveries WHERE state = 'pending' AND next_at <= {now} AND "
                                 "(claimed_at IS NULL OR claimed_at < {now} - ?) ORDER BY next_at LIMIT ?"
                             + self.skip_locked, (float(lease), int(limit)))
            out = []
            for r in rows:
                self._exec(tx, "UPDATE deliveries SET claimed_by = ?, claimed_at = {now} WHERE id = ?",
                           (claimer, r["id"]))
                d = self._one(tx, "SELECT * FROM deliveries WHERE id = ?", (r["id"],))
                out.append(Delivery(d["id"], d["job_id"], d["event"], d["url"], d["body"], d["attempts"]))
        return out

    def record_delivery(self, delivery_id: str, ok: bool, status: Optional[int], error: Optional[str],
                        retry_in: Optional[float]) -> None:
        """One attempt's outcome: delivered, retry in `retry_in` seconds, or (None) given up."""
        state = "delivered" if ok else ("pending" if retry_in is not None else "failed")
        with self.transaction() as tx:
            self._exec(tx, "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?, "
                           "last_error = ?, claimed_by = NULL, claimed_at = NULL, next_at = {now} + ?, "
                           "delivered_at = CASE WHEN ? = 'delivered' THEN {now} ELSE NULL END WHERE id = ?",
                       (state, status, error, float(retry_in or 0.0), state, delivery_id))

    def deliveries(self, job_id: str) -> list[dict]:
        with self.transaction() as tx:
            rows = self._all(tx, "SELECT id, event, url, state, attempts, last_status, last_error, created_at, "
                                 "delivered_at FROM deliveries WHERE job_id = ? ORDER BY created_at", (job_id,))
        for r in rows:
            r["created_at"], r["delivered_at"] = iso(r["created_at"]), iso(r["delivered_at"])
        return rows


def open_store(url: str) -> JobStore:
    """sqlite:///path/jobs.db or postgresql://user@host/db."""
    from ..errors import InputError

    if url.startswith("sqlite:///"):
        from .store_sqlite import SqliteStore

        store: JobStore = SqliteStore(url[len("sqlite:///"):])
    elif url.startswith(("postgresql://", "postgres://")):
        from .store_postgres import PostgresStore

        store = PostgresStore(url)
    else:
        raise InputError(f"--db {url.split(':')[0]}...: use postgresql://USER@HOST/DB (or leave it out for SQLite).")
    store.init_schema()
    return store
