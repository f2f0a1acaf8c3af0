"""What a run's numbers depend on: the code version, the package versions and the benchmark.

``record(client, run_id, bench)`` tags the run with the git commit of the ood_ray checkout (when
it is one), the versions of the packages that change results, and logs the benchmark as an MLflow
dataset input whose digest covers every manifest (names, roles, classes, shard checksums and
counts; not where the files are), so the UI's Datasets panel shows it and a number that moved can
be traced to the code, a package or the data.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, RunTag
from mlflow.tracking import MlflowClient

from ..data.manifest import Benchmark

#: Packages whose version can change a number (or whether a run works at all).
PACKAGES = ("ood-ray", "torch", "torchvision", "numpy", "scipy", "ray", "mlflow", "optuna", "webdataset", "pillow", "scikit-learn")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false"}`` of the git checkout holding ood_ray, or ``{}``
    when ood_ray is installed from a wheel (no checkout) or git is not installed."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or not (Path(top.stdout.strip()) / "ood_ray").is_dir():
            return {}
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if sha.returncode != 0:
        return {}
    return {"commit": sha.stdout.strip(), "dirty": str(bool(status.stdout.strip())).lower()}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    """Installed versions of ``PACKAGES`` (absent ones are left out), plus Python's."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def benchmark_digest(bench: Benchmark) -> str:
    """sha256 of every manifest's content (not its location): equal for a copied or moved
    benchmark, different when any shard, count, class or set changes."""
    return bench.digest()


def dataset_input(bench: Benchmark, context: str) -> DatasetInput:
    """The benchmark as an MLflow dataset input (name, digest, where it is, what it holds)."""
    profile = {
        "classes": bench.num_classes,
        "train": bench.train.num_samples,
        "val": bench.val.num_samples,
        "test": bench.test.num_samples,
        "outlier": bench.outlier.num_samples if bench.outlier is not None else 0,
        "ood_val": {k: m.num_samples for k, m in bench.ood_val.items()},
        "ood_test": {k: m.num_samples for k, m in bench.ood_test.items()},
    }
    ds = Dataset(
        name=bench.name,
        digest=benchmark_digest(bench)[:16],
        source_type="local" if "://" not in str(bench.path or "") else str(bench.path).split("://")[0],
        source=json.dumps({"uri": str(bench.path or "")}),
        profile=json.dumps(profile),
    )
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])


def tags() -> dict[str, str]:
    """Run tags: the code version (when known) and one ``ood_ray.version.<package>`` per package."""
    out = {f"ood_ray.version.{k}": v for k, v in package_versions().items()}
    code = code_version()
    if code:
        out.update({"mlflow.source.git.commit": code["commit"], "ood_ray.git_commit": code["commit"], "ood_ray.git_dirty": code["dirty"]})
    return out


def record(client: MlflowClient, run_id: str, bench: Benchmark | None, context: str = "training") -> None:
    """Tag ``run_id`` with ``tags()`` and log ``bench`` as its dataset input."""
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags().items()])
    if bench is not None:
        client.log_inputs(run_id, datasets=[dataset_input(bench, context)])
