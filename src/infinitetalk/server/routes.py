"""The /v1 endpoints (see the README's API section); every error is an RFC 9457 problem."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import dataclass, field
from typing import Optional

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from .config import ServerConfig
from .metrics import Metrics
from .security import Problem, bearer, key_matches, new_job_id, valid_job_id
from .store import STATES, TERMINAL, JobRecord, JobStore
from .submit import build_spec, check_job, check_webhook_url, parse_settings
from .uploads import read_multipart

log = logging.getLogger(__name__)

CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "format": "binary", "description": "portrait (PNG, JPEG, WebP)"},
                "video": {"type": "string", "format": "binary", "description": "video to dub (MP4, MOV, MKV)"},
                "audio": {"type": "string", "format": "binary", "description": "speech of speaker 1"},
                "audio2": {"type": "string", "format": "binary", "description": "speech of speaker 2"},
                "settings": {"type": "string", "description": "JSON object of job fields (the CLI's names)"},
                "webhook_url": {"type": "string", "description": "called when the job ends"},
            }, "required": ["audio"]}},
            "application/json": {"schema": {"type": "object", "properties": {
                "settings": {"type": "object", "description": "job fields; image/video/audio as --allow-dir paths"},
                "webhook_url": {"type": "string"},
            }}},
        },
    }
}


@dataclass
class ServerContext:
    """What the routes and workers share (held by the app, never global)."""

    config: ServerConfig
    store: JobStore
    metrics: Metrics
    wake: object  # threading.Condition the workers wait on
    workers: list = field(default_factory=list)
    dispatcher: Optional[object] = None


def _job_or_404(ctx: ServerContext, job_id: str) -> JobRecord:
    job = ctx.store.get(job_id) if valid_job_id(job_id) else None
    if job is None:
        raise Problem(404, "There is no job with this id.")
    return job


def build_routers(ctx: ServerContext) -> list[APIRouter]:
    def authorize(request: Request) -> None:
        if ctx.config.api_keys and not key_matches(bearer(request.headers.get("authorization")),
                                                   ctx.config.api_keys):
            raise Problem(401, "This server needs an API key: send the header Authorization: Bearer KEY.",
                          headers={"WWW-Authenticate": "Bearer"})

    public = APIRouter(tags=["health"])
    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], tags=["jobs"])
    ops = APIRouter(dependencies=[Depends(authorize)], tags=["health"])

    @public.get("/v1/health", summary="The process is up")
    def health() -> dict:
        return {"status": "ok"}

    @public.get("/v1/ready", summary="The store answers and the workers run")
    def ready() -> JSONResponse:
        try:
            ctx.store.ping()
        except Exception:  # noqa: BLE001 - any store failure means not ready
            raise Problem(503, "The job store does not answer.") from None
        dead = [w.device for w in ctx.workers if not w.alive]
        if dead:
            raise Problem(503, f"The worker on {dead[0]} has stopped.")
        return JSONResponse({"status": "ready", "workers": [
            {"device": w.device, "busy": w.current is not None, "loaded": w.loaded_key is not None} for w in ctx.workers]})

    @ops.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        body, ctype = ctx.metrics.render()
        return Response(body, media_type=ctype)

    @api.post("/jobs", status_code=201, summary="Create a job", openapi_extra=CREATE_BODY)
    async def create_job(request: Request) -> JSONResponse:
        cfg = ctx.config
        job_id = new_job_id()
        staging = cfg.staging_dir / job_id
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype == "application/json":
                raw = b""
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > cfg.limits.max_field_bytes:
                        raise Problem(413, f"The JSON body is larger than {cfg.limits.max_field_bytes} bytes.")
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    raise Problem(422, "The body is not valid JSON.") from None
                if not isinstance(body, dict) or set(body) - {"settings", "webhook_url"}:
                    raise Problem(422, "The JSON body must be an object with settings and optionally webhook_url.")
                settings = body.get("settings") or {}
                if not isinstance(settings, dict):
                    raise Problem(422, "The settings must be a JSON object of job fields.")
                files, webhook = {}, body.get("webhook_url")
                if webhook is not None and not isinstance(webhook, str):
                    raise Problem(422, "The webhook_url must be an http:// or https:// URL.")
            else:
                form = await read_multipart(request, staging / "inputs", cfg.limits)
                settings, files = parse_settings(form.texts.get("settings")), form.files
                webhook = form.texts.get("webhook_url")
            webhook = check_webhook_url(webhook)
            spec = build_spec(settings, files, staging, cfg)
            model_key = await anyio.to_thread.run_sync(check_job, spec, staging, cfg)
            staging.mkdir(parents=True, exist_ok=True)
            cfg.jobs_dir.mkdir(parents=True, exist_ok=True)
            staging.rename(cfg.jobs_dir / job_id)
            try:
                job = await anyio.to_thread.run_sync(ctx.store.insert, job_id, spec, model_key, webhook)
            except BaseException:
                shutil.rmtree(cfg.jobs_dir / job_id, ignore_errors=True)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with ctx.wake:
            ctx.wake.notify_all()
        return JSONResponse(job.public(), status_code=201, headers={"Location": f"/v1/jobs/{job_id}"})

    @api.get("/jobs", summary="List jobs, newest first")
    def list_jobs(state: Optional[str] = Query(None, description="queued, running, succeeded, failed or cancelled"),
                  limit: int = Query(20, ge=1, le=100), cursor: Optional[int] = Query(None, ge=0)) -> dict:
        if state is not None and state not in STATES:
            raise Problem(422, f"Unknown state {state!r}; use one of {', '.join(STATES)}.")
        jobs = ctx.store.list(state, limit, cursor)
        nxt = str(jobs[-1].seq) if len(jobs) == limit else None
        return {"jobs": [j.public() for j in jobs], "next_cursor": nxt}

    @api.get("/jobs/{job_id}", summary="A job: state, progress, error, result")
    def get_job(job_id: str) -> dict:
        return _job_or_404(ctx, job_id).public()

    @api.get("/jobs/{job_id}/events", summary="Progress as Server-Sent Events (event: job ..., then end)")
    async def job_events(job_id: str, request: Request):
        from sse_starlette.sse import EventSourceResponse

        await anyio.to_thread.run_sync(_job_or_404, ctx, job_id)

        async def stream():
            version = -1
            while not await request.is_disconnected():
                job = await anyio.to_thread.run_sync(ctx.store.get, job_id)
                if job is None:
                    yield {"event": "deleted", "data": json.dumps({"id": job_id})}
                    return
                if job.version != version:
                    version = job.version
                    yield {"event": "job", "id": str(version), "data": json.dumps(job.public())}
                if job.state in TERMINAL:
                    yield {"event": "end", "data": json.dumps({"id": job_id, "state": job.state})}
                    return
                await asyncio.sleep(0.25)

        return EventSourceResponse(stream(), ping=15)

    @api.get("/jobs/{job_id}/video", summary="The MP4 (HTTP range requests supported)",
             response_class=FileResponse)
    def download(job_id: str) -> FileResponse:
        job = _job_or_404(ctx, job_id)
        if job.state != "succeeded":
            raise Problem(409, f"The job is {job.state}; its video is ready once it has succeeded.")
        path = ctx.config.jobs_dir / job.id / "output.mp4"
        if not path.is_file():
            raise Problem(404, "The job's video file is missing from the shared data folder.")
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")

    @api.post("/jobs/{job_id}/cancel", summary="Cancel a queued or running job", status_code=202)
    def cancel(job_id: str) -> JSONResponse:
        job = _job_or_404(ctx, job_id)
        if job.state in TERMINAL:
            raise Problem(409, f"The job has already {'ended as ' + job.state}; there is nothing to cancel.")
        job = ctx.store.request_cancel(job_id) or job
        return JSONResponse(job.public(), status_code=202)

    @api.delete("/jobs/{job_id}", status_code=204, summary="Delete an ended job and its files")
    def delete(job_id: str) -> Response:
        job = _job_or_404(ctx, job_id)
        if job.state not in TERMINAL:
            raise Problem(409, f"The job is {job.state}; cancel it first, then delete it once it has ended.")
        if not ctx.store.delete(job.id):
            raise Problem(409, "The job changed state meanwhile; try again.")
        shutil.rmtree(ctx.config.jobs_dir / job.id, ignore_errors=True)
        return Response(status_code=204)

    @api.get("/jobs/{job_id}/webhooks", summary="The job's webhook deliveries and their attempts")
    def deliveries(job_id: str) -> dict:
        job = _job_or_404(ctx, job_id)
        return {"deliveries": ctx.store.deliveries(job.id)}

    return [public, ops, api]
