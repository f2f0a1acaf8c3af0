"""Tune outlier_exposure with Ray Tune + Optuna, tracked in MLflow: `python jobs/tune_oe.py`.

Same flags as `ood-ray tune --method outlier_exposure --help`. Plain `python` starts a local Ray; under
`ray job submit` it joins the cluster.
"""

import sys

from ood_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", "--method", "outlier_exposure", *sys.argv[1:]]))
