"""Compare every method on equal terms; print and save one table, logged to MLflow.

`python jobs/compare_methods.py --tune-trials 8 --seeds 3` tunes each method with an 8-trial sweep,
trains its choice with 3 seeds and reports mean ± 95 % CI with paired tests against MSP. Same
flags as `ood-ray compare --help`.
"""

import sys

from ood_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
