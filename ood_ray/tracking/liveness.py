"""Runs whose driver is gone: every MLflow run ood_ray opens names the process that owns it, and a
run left ``RUNNING`` by a driver that died without closing it (SIGKILL, the OOM killer, a lost
node) is marked ``FAILED`` when the next run opens.

The rule. A run carries ``ood_ray.driver.machine`` (host name, boot id and PID namespace),
``ood_ray.driver.pid`` and ``ood_ray.driver.start`` (the process's start time). A ``RUNNING`` run
is closed only when its machine is this machine and its driver process is provably gone: no
process has that pid, or the one that has it is a zombie or started at another time (the pid was
reused). A run of another machine, another container (PID namespace), or one without these tags
(an older version, another tool) is never touched, nor one whose process exists but cannot be
inspected. A run that a later driver takes over (``--resume``) is ``claim``-ed: its tags name the
new driver and the note of an earlier close is removed.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import warnings
from pathlib import Path

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from ..progress import say

MACHINE_TAG = "ood_ray.driver.machine"
PID_TAG = "ood_ray.driver.pid"
START_TAG = "ood_ray.driver.start"
HOST_TAG = "ood_ray.driver.host"
#: Where a closed run says why (``ood_ray.error``, and ``ood_ray.outcome`` as trial runs do).
NOTE_TAGS = ("ood_ray.error", "ood_ray.outcome")
LOST = "driver lost:"
#: Start times are compared to this many seconds (the kernel's clock ticks, the boot time rounded).
START_TOLERANCE_S = 2.0


def _read(path: str, link: bool = False) -> str | None:
    try:
        return os.readlink(path) if link else Path(path).read_text().strip()
    except OSError:
        return None


@functools.cache
def machine() -> str | None:
    """This machine and PID namespace (a pid means one process only within them); None where they
    cannot be told apart (no /proc): runs are then tagged but never judged."""
    boot, namespace = _read("/proc/sys/kernel/random/boot_id"), _read("/proc/self/ns/pid", link=True)
    if not boot or not namespace:
        return None
    return f"{socket.gethostname()}|boot={boot}|{namespace}"


@functools.cache
def _own_start() -> float:
    import psutil

    return psutil.Process().create_time()


def driver_tags() -> dict[str, str]:
    """The tags naming this process as the driver of a run."""
    return {MACHINE_TAG: machine() or "unknown", PID_TAG: str(os.getpid()), START_TAG: f"{_own_start():.2f}", HOST_TAG: socket.gethostname()}


def driver_alive(pid: int, start: float) -> bool:
    """False only when process ``pid`` started at ``start`` is provably gone (on this machine)."""
    import psutil

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(p.create_time() - start) < START_TOLERANCE_S
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True  # exists, cannot be inspected: assume it is the driver


def lost_driver(run) -> str | None:
    """Why ``run`` (RUNNING) has lost its driver, or None when it has not or this cannot be judged."""
    tags = run.data.tags
    if machine() is None or tags.get(MACHINE_TAG) != machine():
        return None
    try:
        pid, start = int(tags[PID_TAG]), float(tags[START_TAG])
    except (KeyError, ValueError):
        return None
    if driver_alive(pid, start):
        return None
    return f"{LOST} its driver (pid {pid} on {tags.get(HOST_TAG, '?')}) ended without closing the run (killed?); marked FAILED by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _running_here(client: MlflowClient) -> list:
    experiments, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        experiments += [e.experiment_id for e in page]
        token = page.token
        if not token:
            break
    runs = []
    for i in range(0, len(experiments), 100):
        token = None
        while True:
            page = client.search_runs(experiments[i : i + 100], f"attributes.status = 'RUNNING' and tags.`{MACHINE_TAG}` = '{machine()}'", max_results=1000, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    return runs


def close_dead_runs(client: MlflowClient) -> list[str]:
    """Mark ``FAILED`` every run of the store left ``RUNNING`` by a driver of this machine that is
    gone (the rule in the module's docstring); the ids closed. An MLflow failure only warns."""
    closed = []
    if machine() is None:
        return closed
    try:
        for run in _running_here(client):
            note = lost_driver(run)
            if note is None:
                continue
            client.log_batch(run.info.run_id, tags=[RunTag(k, note) for k in NOTE_TAGS])
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    except Exception as e:  # noqa: BLE001 - housekeeping must not stop the new run
        warnings.warn(f"could not check MLflow for runs left RUNNING by a killed driver ({type(e).__name__}: {str(e)[:300]})", stacklevel=2)
    if closed:
        say(f"marked {len(closed)} MLflow run(s) FAILED whose driver process is gone: {', '.join(closed)}")
    return closed


def claim(client: MlflowClient, run) -> None:
    """Take over ``run`` (a resumed sweep's): its tags name this process; an earlier close's note goes."""
    client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in driver_tags().items()])
    for key in NOTE_TAGS:
        if run.data.tags.get(key, "").startswith(LOST):
            client.delete_tag(run.info.run_id, key)


def was_lost(run) -> bool:
    """Whether ``run`` was closed by ``close_dead_runs``."""
    return run.info.status == "FAILED" and run.data.tags.get("ood_ray.error", "").startswith(LOST)


def open_run(client: MlflowClient, experiment_id: str, run_name: str | None = None, tags: dict | None = None):
    """``client.create_run`` for a driver: runs of dead drivers are closed first, and the new run
    names this process (``driver_tags``)."""
    close_dead_runs(client)
    return client.create_run(experiment_id, run_name=run_name, tags={**(tags or {}), **driver_tags()})
