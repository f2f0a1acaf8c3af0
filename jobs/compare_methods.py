"""Train every method with the same backbone, budget and seed; print and save one table.

`python jobs/compare_methods.py [--epochs 15 --backbone small_cnn ...]` (same flags as
`ood-ray compare --help`).
"""

import sys

from ood_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
