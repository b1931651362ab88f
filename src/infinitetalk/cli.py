"""The `infinitetalk` command. Maps every InfiniteTalkError to its sentence and exit code 2."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import InfiniteTalkError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinitetalk",
        description="Talking videos of any length from a portrait (or a video) and speech.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, device, and where weights are found")
    info.set_defaults(func=cmd_info)
    return parser


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import __version__

    print(f"infinitetalk {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"cuda available: {torch.cuda.is_available()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InfiniteTalkError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
