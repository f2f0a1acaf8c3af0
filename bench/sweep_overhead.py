"""Per-trial overhead of a finished sweep, from its Tune folder: prints one JSON object.

    python bench/sweep_overhead.py <storage>/<sweep name>

For each trial: ``runtime_s`` (Tune's ``time_total_s``: from the trial function's start to its last
report), ``compute_s`` (the sum of the epochs' ``train_time_s`` and ``eval_time_s``, measured in the
workers) and ``overhead_s = runtime_s - compute_s`` (worker-group start-up, imports, data-stream
set-up, checkpoint upload, report round trips). ``first_report_s`` is the time to the first report
minus that epoch's compute: the start-up part alone. The sweep's wall time comes from the
experiment state files, when present.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def trial_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(sweep_dir.glob("*/result.json")):
        results = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if not results:
            continue
        compute = sum(r.get("train_time_s", 0.0) + r.get("eval_time_s", 0.0) for r in results)
        first = results[0]
        rows.append(
            {
                "trial": f.parent.name,
                "epochs": len(results),
                "runtime_s": round(results[-1]["time_total_s"], 2),
                "compute_s": round(compute, 2),
                "overhead_s": round(results[-1]["time_total_s"] - compute, 2),
                "first_report_s": round(first["time_total_s"] - first.get("train_time_s", 0.0) - first.get("eval_time_s", 0.0), 2),
                "start": results[0]["timestamp"] - results[0]["time_total_s"],
                "end": results[-1]["timestamp"],
            }
        )
    return rows


def main(path: str) -> dict:
    rows = trial_rows(Path(path))
    if not rows:
        raise SystemExit(f"{path}: no trial result.json files")
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    runtime = sum(r["runtime_s"] for r in rows)
    return {
        "sweep": Path(path).name,
        "trials": len(rows),
        "trial_span_s": round(span, 1),
        "sum_runtime_s": round(runtime, 1),
        "sum_compute_s": round(sum(r["compute_s"] for r in rows), 1),
        "overhead_per_trial_s": round(statistics.mean(r["overhead_s"] for r in rows), 2),
        "startup_per_trial_s": round(statistics.mean(r["first_report_s"] for r in rows), 2),
        "gap_per_trial_s": round((span - runtime) / len(rows), 2),
        "per_trial": [{k: v for k, v in r.items() if k not in ("start", "end")} for r in rows],
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), indent=1))
