"""``python -m modalmoe.launch.train [flags]``: the same as ``modalmoe train [flags]``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
