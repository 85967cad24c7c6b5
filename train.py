"""Train a model: ``python train.py [CONFIG.yaml] [key=value ...] [--dry-run]``, the same command as
``ramjax-train`` (``ramjax.cli.train_main``; ``python train.py --help`` prints the full usage)."""
import sys

from ramjax.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
