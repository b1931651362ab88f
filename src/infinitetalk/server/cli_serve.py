"""`infinitetalk serve`: argument parsing and start-up (FastAPI is imported only when it runs)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import InputError

SERVE_EXAMPLES = """\
examples:
  # try it: tiny random models, SQLite job store in ./infinitetalk-data, docs at http://127.0.0.1:8000/docs
  infinitetalk serve --model tiny

  # one worker per GPU, API keys, reachable from other machines
  infinitetalk serve --host 0.0.0.0 --gpus all --api-key-file keys.txt --data /srv/infinitetalk

  # many machines: one Postgres queue, one shared data folder (same path on every machine)
  infinitetalk serve --db postgresql://it@db/infinitetalk --data /mnt/shared/it --api-key-file keys.txt \\
      --host 0.0.0.0
"""


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API: async jobs, progress, webhooks (pip install 'infinitetalk[server]')",
                       description="Serve the job API (OpenAPI at /openapi.json, docs at /docs).",
                       epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (other than loopback needs API keys)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data", metavar="DIR", default="infinitetalk-data",
                   help="uploads, videos and the SQLite store; shared by every worker of a Postgres queue")
    p.add_argument("--db", metavar="URL", default=None,
                   help="postgresql://USER@HOST/DB for many workers on many machines (default: SQLite in --data)")
    p.add_argument("--gpus", default="all", help="all (default; the CPU when there is no GPU), 0,1, cpu, or none "
                                                 "(API only)")
    p.add_argument("--model", choices=("infinitetalk-14b", "tiny"), default="infinitetalk-14b",
                   help="the model every job runs (tiny: small RANDOM models for trying and tests)")
    p.add_argument("--weights", metavar="DIR", default=None, help="weights folder (as for generate)")
    p.add_argument("--api-key-file", metavar="FILE", default=None, help="bearer API keys, one per line")
    p.add_argument("--allow-dir", metavar="DIR", default=None,
                   help="jobs may name input files inside this folder instead of uploading them")
    p.add_argument("--max-upload-mb", type=float, default=200.0, help="largest file of an upload (default 200)")
    p.add_argument("--max-audio-seconds", type=float, default=600.0, help="longest audio (default 600)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest image (default 4096x4096)")
    p.add_argument("--max-video-frames", type=int, default=15000, help="longest input video (default 15000)")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0,
                   help="seconds without a heartbeat before a running job is re-queued (default 30)")
    p.add_argument("--webhook-secret-file", metavar="FILE", default=None,
                   help="whsec_... signing secret (default: DATA/webhook_secret, made on first start)")
    p.set_defaults(func=cmd_serve)


def build_config(args: argparse.Namespace):
    from .config import Limits, ServerConfig, check_bind, parse_devices, read_api_keys

    keys = read_api_keys(args.api_key_file)
    check_bind(args.host, keys)
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: use a port between 1 and 65535.")
    for flag, value in (("--max-upload-mb", args.max_upload_mb), ("--max-audio-seconds", args.max_audio_seconds),
                        ("--max-image-pixels", args.max_image_pixels), ("--max-video-frames", args.max_video_frames),
                        ("--heartbeat-timeout", args.heartbeat_timeout)):
        if not value > 0:
            raise InputError(f"{flag} must be a positive number, got {value}.")
    allow = None
    if args.allow_dir:
        allow = Path(args.allow_dir).expanduser().resolve()
        if not allow.is_dir():
            raise InputError(f"--allow-dir {args.allow_dir}: the folder does not exist.")
    secret = None
    if args.webhook_secret_file:
        try:
            secret = Path(args.webhook_secret_file).expanduser().read_text().strip()
        except OSError as err:
            raise InputError(f"The webhook secret file cannot be read ({type(err).__name__}).") from None
        if not secret.startswith("whsec_"):
            raise InputError("The webhook secret must look like whsec_BASE64 (Standard Webhooks).")
    limits = Limits(max_file_bytes=int(args.max_upload_mb * 2**20), max_audio_seconds=args.max_audio_seconds,
                    max_image_pixels=args.max_image_pixels, max_video_frames=args.max_video_frames)
    return ServerConfig(data=Path(args.data).expanduser().resolve(), db=args.db, devices=parse_devices(args.gpus),
                        model=args.model, weights=args.weights, api_keys=keys, allow_dir=allow, limits=limits,
                        heartbeat_timeout=args.heartbeat_timeout, webhook_secret=secret)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError("infinitetalk serve needs the server extra: pip install 'infinitetalk[server]'.") from None
    config = build_config(args)
    from .app import create_app

    logging.getLogger("infinitetalk").setLevel(logging.INFO if not args.verbose else logging.DEBUG)
    app = create_app(config)
    workers = ", ".join(config.devices) or "none (API only)"
    print(f"serving http://{args.host}:{args.port} (docs /docs); data {config.data}; store "
          f"{'postgres' if config.db else 'sqlite'}; workers: {workers}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    return 0
