"""The FastAPI application: store, workers and webhook dispatcher started with its lifespan."""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .config import ServerConfig
from .metrics import Metrics
from .routes import ServerContext, build_routers
from .security import Problem
from .store import open_store

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def _problem(request: Request, problem: Problem) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path), status_code=problem.status, media_type=PROBLEM,
                        headers=problem.headers)


def _validation_sentence(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "The request is invalid."
    err = errors[0]
    where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "path", "body"))
    return f"The request's {where or 'input'} is invalid: {err.get('msg', 'bad value')}."


def create_app(config: ServerConfig) -> FastAPI:
    from .webhooks import Dispatcher
    from .worker import Worker, recover_local

    config.data.mkdir(parents=True, exist_ok=True)
    config.jobs_dir.mkdir(exist_ok=True)
    config.staging_dir.mkdir(exist_ok=True)
    store = open_store(config.db_url())
    metrics = Metrics(store, config.devices)
    ctx = ServerContext(config, store, metrics, threading.Condition())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for job_id in recover_local(store):
            log.warning("job %s continues from its last finished window", job_id)
        ctx.workers = [Worker(store, config, device, metrics, ctx.wake) for device in config.devices]
        ctx.dispatcher = Dispatcher(store, config.secret(), config.webhook_attempts, config.webhook_backoff, metrics,
                                    name=f"dispatcher-{ctx.workers[0].id if ctx.workers else id(ctx)}")
        for w in ctx.workers:
            w.start()
        ctx.dispatcher.start()
        try:
            yield
        finally:
            for w in ctx.workers:
                w.stop()
            ctx.dispatcher.stop()
            store.close()

    app = FastAPI(title="InfiniteTalk", version=__version__, lifespan=lifespan,
                  description="Talking videos of any length as asynchronous jobs: submit, follow, download.")
    app.state.ctx = ctx
    for router in build_routers(ctx):
        app.include_router(router)

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem):
        return _problem(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return _problem(request, Problem(422, _validation_sentence(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        detail = {404: "There is nothing at this address; see /docs for the API.",
                  405: "This method is not allowed here; see /docs for the API."}.get(exc.status_code)
        return _problem(request, Problem(exc.status_code, detail or str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return _problem(request, Problem(500, "The server hit an internal error; its log has the details."))

    return app
