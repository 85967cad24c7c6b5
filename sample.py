"""Sample the aligned model: ``python sample.py configs/sample.yaml [key=value ...] [--training-data]``, the same
command as ``ramjax-sample`` (``ramjax.cli.sample_main``; ``python sample.py --help`` prints the full usage)."""
import sys

from ramjax.cli import sample_main as main

if __name__ == "__main__":
    sys.exit(main())
