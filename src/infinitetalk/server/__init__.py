"""`infinitetalk serve`: an HTTP API over the job service (extra `server`).

    infinitetalk serve --model tiny                     # SQLite job store in ./infinitetalk-data
    infinitetalk serve --db postgresql://... --data /shared/it --gpus all --api-key-file keys.txt

Modules: `config` (settings and limits), `store` (the job store interface; SQLite and Postgres
behind it), `worker` (one per GPU, each with its own JobService), `webhooks` (signed deliveries
with retries), `security` (API keys, job ids, problem details), `uploads` (streamed multipart
with limits and content sniffing), `metrics` (Prometheus), `routes` and `app` (FastAPI).
"""
from .config import Limits, ServerConfig

__all__ = ["Limits", "ServerConfig", "create_app"]


def create_app(config: ServerConfig):
    """The FastAPI application for `config` (workers start with the app's lifespan)."""
    from .app import create_app as _create

    return _create(config)
