"""`python -m infinitetalk.ui [--host ...] [--port ...] ...`: the same as `infinitetalk ui`."""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import InfiniteTalkError
from .options import UI_EXAMPLES, add_ui_arguments, cmd_ui


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinitetalk.ui", description="Serve the InfiniteTalk web page.",
                                     epilog=UI_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_ui_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_ui(args)
    except InfiniteTalkError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
