"""Tune any registered method with Ray Tune + Optuna, tracked in MLflow:
`python jobs/tune.py --method logitnorm`.

Same flags as `ood-ray tune --help`. Plain `python` starts a local Ray; under `ray job submit` it
joins the cluster.
"""

import sys

from ood_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
