"""Which post-hoc detector suits which training method: ``ood-ray evaluate`` on a checkpoint of
every method, over several seeds, on the embedded digits-ood benchmark.

Each method is trained in this process (``engine.train_local``, one worker, no Ray) with its
default parameters, then ``detector_eval.evaluate_checkpoint`` fits every detector its head
supports on train features, chooses the parameters on val and scores the test split. Reported per
method and detector: test AUROC (all / near / far) and FPR95 (all) as mean ± sd over seeds, and the
detector a val-only choice would pick (the best mean val AUROC) with its test AUROC: the honest
"which detector wins", since the test split plays no part in that choice.

`python bench/detectors.py [--methods ...] [--seeds 0 1 2] [--epochs 15] [--out DIR]`: one JSON
object on stdout; each checkpoint's Markdown table in --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import capture_stdout, emit, log, machine_info  # noqa: E402

from ood_ray import metric_names as names  # noqa: E402
from ood_ray.config import TrainConfig  # noqa: E402
from ood_ray.detector_eval import evaluate_checkpoint  # noqa: E402
from ood_ray.engine import train_local  # noqa: E402
from ood_ray.methods import METHODS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default=None, help="folder for the per-checkpoint Markdown tables")
    args = ap.parse_args()
    capture_stdout()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="detectors-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in args.methods:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(method=method, epochs=args.epochs, num_workers=1, seed=seed, evaluate_test=False)
                log(f"{method} seed {seed}: training {args.epochs} epochs")
                ckpt = train_local(cfg, Path(tmp) / "run")[-1]["checkpoint_path"]
                table = evaluate_checkpoint(ckpt, ["all"], out=out_dir / f"{method}-seed{seed}.md", log_mlflow=False)
            for row in table.rows:
                d = per.setdefault(method, {}).setdefault(row, {})
                d.setdefault("val_auroc", []).append(table.val_auroc[row])
                for key, group in (("auroc", names.ALL), ("auroc", "near"), ("auroc", "far"), ("fpr95", names.ALL)):
                    d.setdefault(f"test_{group}_{key}", []).append(table.metrics.get(names.mean_key("test", key, group, row), float("nan")))
            log(f"{method} seed {seed}: best test AUROC {table.best()} ({table.wall_time_s:.0f}s evaluate)")
    summary = {}
    for method, rows in per.items():
        stats = {row: {k: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4)} for k, v in d.items()} for row, d in rows.items()}
        val_pick = max(rows, key=lambda r: np.mean(rows[r]["val_auroc"]))
        test_best = max(rows, key=lambda r: np.mean(rows[r]["test_all_auroc"]))
        own = next(r for r in rows if r.startswith("method_"))
        summary[method] = {
            "rows": stats,
            "val_choice": val_pick,
            "val_choice_test_auroc": stats[val_pick]["test_all_auroc"],
            "best_on_test": test_best,
            "own_score": own,
            "own_test_auroc": stats[own]["test_all_auroc"],
        }
    emit({"bench": "detectors", "seeds": args.seeds, "epochs": args.epochs, "tables": str(out_dir), "wall_time_s": round(time.perf_counter() - t0, 1), "machine": machine_info(), "methods": summary})


if __name__ == "__main__":
    main()
