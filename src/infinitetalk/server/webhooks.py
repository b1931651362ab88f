"""Webhooks in the Standard Webhooks style: signed, retried with backoff, every attempt recorded.

Headers: `webhook-id` (the message id, the same on every retry, for de-duplication),
`webhook-timestamp` (Unix seconds of the attempt) and `webhook-signature`:
"v1," + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")), where the secret is the
base64 part of the server's `whsec_...` secret. A 2xx answer is a delivery; anything else
(or no answer within 10 s) is retried after backoff, backoff x 4, ... until the attempts run out.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
from typing import Optional

from .store import Delivery, JobStore

log = logging.getLogger(__name__)


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_delay(attempt: int, base: float) -> float:
    """Seconds before attempt `attempt + 1` (attempt counts from 1)."""
    return base * (4 ** (attempt - 1))


class Dispatcher:
    """Sends due deliveries from the store; any server process may run one (claims are leased)."""

    def __init__(self, store: JobStore, secret: str, attempts: int, backoff: float, metrics, name: str):
        import httpx

        self.store, self.secret, self.attempts, self.backoff, self.metrics = store, secret, attempts, backoff, metrics
        self.name = name
        self._client = httpx.Client(timeout=10.0, follow_redirects=False)
        self._stop = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="infinitetalk-webhooks", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self.thread.join(15.0)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                due = self.store.claim_deliveries(self.name)
            except Exception:  # noqa: BLE001 - keep going through store outages
                log.exception("claiming webhook deliveries failed")
                due = []
            for delivery in due:
                self.send(delivery)
            if not due:
                self.wake.wait(0.5)
                self.wake.clear()

    def send(self, delivery: Delivery) -> None:
        import httpx

        ts = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": delivery.id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(self.secret, delivery.id, ts, delivery.body),
                   "user-agent": "infinitetalk-webhooks"}
        status: Optional[int] = None
        error: Optional[str] = None
        try:
            answer = self._client.post(delivery.url, content=delivery.body.encode(), headers=headers)
            status = answer.status_code
            ok = 200 <= status < 300
            if not ok:
                error = f"the receiver answered HTTP {status}"
        except httpx.HTTPError as err:
            ok, error = False, f"{type(err).__name__}: {err}"[:300]
        attempt = delivery.attempts + 1
        retry = None if ok or attempt >= self.attempts else retry_delay(attempt, self.backoff)
        self.store.record_delivery(delivery.id, ok, status, error, retry)
        result = "delivered" if ok else ("retry" if retry is not None else "failed")
        self.metrics.webhooks.labels(result=result).inc()
        if not ok:
            log.warning("webhook %s of job %s to %s: %s (%s)", delivery.event, delivery.job_id, delivery.url, error,
                        f"retry in {retry:.0f} s" if retry is not None else "giving up")
