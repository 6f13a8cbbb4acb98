"""``python -m pipeline.ablate``: the ablation runner's command. The runner is the experiments room,
:mod:`pipeline.experiments` (its docstring: the spec, the grid, caching, resuming, exit codes); a plugin registers a
diagnostic with ``from pipeline.ablate import register_diagnostic`` (or from :mod:`pipeline.experiments.diagnostics`).
"""

from __future__ import annotations

import sys

from pipeline.experiments.cli import main
from pipeline.experiments.diagnostics import register_diagnostic

__all__ = ["main", "register_diagnostic"]

if __name__ == "__main__":
    sys.exit(main())
