"""API keys, job ids, and errors as RFC 9457 problem details (one sentence, no traceback)."""
from __future__ import annotations

import hmac
import re
import secrets
from typing import Optional

JOB_ID = re.compile(r"^job_[A-Za-z0-9_-]{22}$")


def new_job_id() -> str:
    """An unguessable id (128 random bits)."""
    return "job_" + secrets.token_urlsafe(16)


def valid_job_id(value: str) -> bool:
    return bool(JOB_ID.fullmatch(value or ""))


def key_matches(given: Optional[str], keys: tuple[str, ...]) -> bool:
    """Constant-time check of a bearer key against every configured key (no early exit)."""
    if given is None:
        return False
    supplied = given.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(supplied, key.encode())
    return found


def bearer(header: Optional[str]) -> Optional[str]:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Problem(Exception):
    """An HTTP error answered as application/problem+json."""

    TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
              413: "Content Too Large", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
              422: "Unprocessable Content", 500: "Internal Server Error", 503: "Service Unavailable"}

    def __init__(self, status: int, detail: str, kind: str = "about:blank", headers: Optional[dict] = None):
        super().__init__(detail)
        self.status, self.detail, self.kind, self.headers = status, detail, kind, headers or {}

    def body(self, instance: Optional[str] = None) -> dict:
        out = {"type": self.kind, "title": self.TITLES.get(self.status, "Error"), "status": self.status,
               "detail": self.detail}
        if instance:
            out["instance"] = instance
        return out
