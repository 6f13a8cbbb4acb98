"""``python -m pipeline.eval``: see :mod:`pipeline.eval.cli` (``--help`` lists the subcommands)."""

import sys

from pipeline.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
