"""``python -m sgflow.cli`` (and ``torchrun ... -m sgflow.cli``): the ``sgflow`` console script."""
import sys

from sgflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
