"""`python -m infinitetalk ...` (and `torchrun -m infinitetalk generate ...`): the command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
