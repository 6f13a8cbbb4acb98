"""``python -m pipeline.train`` (see :mod:`pipeline.train.cli`)."""

from pipeline.train.cli import exit_now, main

if __name__ == "__main__":
    exit_now(main())
