"""A training driver killed with SIGKILL: its MLflow run is marked FAILED when the next run opens,
runs of live drivers and of other machines are left alone, and the local Ray it started leaves no
process behind. Real processes: an ``ood-ray train`` with its own local Ray, a sqlite store.

(A killed sweep driver and ``--resume`` are in test_tune.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from ood_ray import ray_compat, tracking
from ood_ray.tracking import liveness


def running(procs: list) -> list[int]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return out


@pytest.mark.ray  # the driver under test starts a local Ray of its own
def test_killed_train_driver_is_failed_by_the_next_run_and_its_ray_leaves_nothing(digits_ood, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "ood_ray.cli", "train", "--method", "softmax", "--data", str(digits_ood), "--epochs", "100", "--num-workers", "1",
           "--cpus-per-worker", "0.5", "--storage-path", str(tmp_path / "ray"), "--mlflow-uri", uri, "--experiment", "e"]  # fmt: skip
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:  # until its Ray node has its agents
            with contextlib.suppress(psutil.Error):
                tree = psutil.Process(proc.pid).children(recursive=True)
                titles = {(p.cmdline() or [""])[0] for p in tree if p.is_running()}
                if all(any(t.startswith(a) for t in titles) for a in ray_compat.AGENTS):
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the driver's Ray agents did not start: " + (tmp_path / "driver.log").read_text()[-2000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("e").experiment_id
        (dead,) = client.search_runs([exp])
        assert dead.info.status == "RUNNING" and dead.data.tags[liveness.PID_TAG] == str(proc.pid)
        me = liveness.driver_tags()
        live = tracking.open_run(client, exp, "live")  # this process: alive
        elsewhere = client.create_run(exp, run_name="elsewhere", tags={**me, liveness.MACHINE_TAG: "other-host|boot=x|pid:[1]", liveness.PID_TAG: str(proc.pid)})
        reused = client.create_run(exp, run_name="reused-pid", tags={**me, liveness.START_TAG: "1000.00"})  # this pid, another start
        untagged = client.create_run(exp, run_name="untagged")  # an older version's, or another tool's
        after = tracking.open_run(client, exp, "next")
        status = {r.info.run_name: (r.info.status, r.data.tags.get("ood_ray.error", "")) for r in client.search_runs([exp])}
        assert status[dead.info.run_name][0] == "FAILED"
        assert status[dead.info.run_name][1].startswith(f"driver lost: its driver (pid {proc.pid} on ")
        assert status["reused-pid"][0] == "FAILED"
        assert {n: s for n, (s, _) in status.items() if n in ("live", "elsewhere", "untagged", "next")} == dict.fromkeys(("live", "elsewhere", "untagged", "next"), "RUNNING")
        for run in (live, elsewhere, reused, untagged, after):
            client.set_terminated(run.info.run_id)

        # its GCS and raylet died with it; the agents, left waiting on the dead GCS, are stopped
        deadline = time.monotonic() + 15
        while running(tree) and time.monotonic() < deadline:
            ray_compat.stop_orphaned_agents()
            time.sleep(0.5)
        assert not running(tree), [(p.pid, p.cmdline()[:1], p.ppid()) for p in tree if p.pid in running(tree)]
    finally:
        log.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
