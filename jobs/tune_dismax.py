"""Tune dismax with Ray Tune + Optuna, tracked in MLflow: `python jobs/tune_dismax.py`.

Same flags as `ood-ray tune --method dismax --help`. Plain `python` starts a local Ray; under
`ray job submit` it joins the cluster.
"""

import sys

from ood_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", "--method", "dismax", *sys.argv[1:]]))
