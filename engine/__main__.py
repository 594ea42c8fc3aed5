"""`python -m engine <command>`; the guard matters: checkpoint saving spawns helper processes."""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
