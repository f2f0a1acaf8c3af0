"""Train one model on Ray Train and log it to MLflow: `python jobs/train.py --method softmax`.

Same flags as `ood-ray train --help`. Under `ray job submit` it joins the cluster.
"""

import sys

from ood_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
