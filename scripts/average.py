"""Entry point: see `python scripts/average.py --help`."""

import sys

from transformer.cli import average_main

if __name__ == "__main__":
    sys.exit(average_main())
