"""cluster.yaml passes Ray's own cluster-config validation (no cloud calls) and keeps its promises."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_validates_with_rays_schema(cluster):
    full = prepare_config(copy.deepcopy(cluster))  # what `ray up` does before validating
    validate_config(full)
    assert full["provider"]["type"] == "aws" and full["head_node_type"] == "head"
    gpu_types = {n: t["node_config"]["InstanceType"] for n, t in full["available_node_types"].items() if n != "head"}
    assert gpu_types == {"gpu_1x": "g5.xlarge", "gpu_4x": "g5.12xlarge", "gpu_8x": "g5.48xlarge"}
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["head"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(bad))


def test_cluster_yaml_matches_the_pins_and_keeps_auth_on(cluster):
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    mlflow = next(c for c in cluster["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host 127.0.0.1" in mlflow and "sqlite:////" in mlflow and "s3://" in mlflow
    assert "--dashboard-host=127.0.0.1" in cluster["head_start_ray_commands"][-1]
    text = CLUSTER.read_text()
    for placeholder in ("YOUR-BUCKET", "SET: region", "SET: key pair name"):
        assert placeholder in text
