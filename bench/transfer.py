"""Transfer from a pretrained backbone, measured: a ResNet-18 pretrained on five CIFAR-10 classes,
fine-tuned on the other five from a few hundred images, against the same network from random init.

Data (from a built cifar10-real benchmark, read with the package's readers and written with its
writer, shuffled, into a work folder): task A, the pretraining task, is CIFAR-10 classes 0-4
(airplane, automobile, bird, cat, deer) with all their train images and the benchmark's val/test
restricted to them; task B, the downstream task, is classes 5-9 (dog, frog, horse, ship, truck)
with ``--b-train-per-class`` train images per class (a seeded choice, the same for every arm and
seed) and val/test restricted to classes 5-9. Both tasks use the benchmark's OOD sets as they are
(their manifests referenced by path): Tiny ImageNet for val, every ``ood_test`` set for test.

Pretraining: ``torchvision:resnet18`` at ``input_size`` 32 with its ImageNet-style preprocessing
(resize / centre crop / ImageNet mean-std; random-resized crop + flip when training), softmax on
task A for ``--a-epochs``. Its weights are saved in torchvision's layout (``backbone.net.X`` ->
``X``, the head as ``fc``), checked by a strict ``torchvision.models.resnet18(num_classes=5)``
load and by the logits of that torchvision model equalling the trained classifier's.

Fine-tuning on task B, three arms with the same recipe, epochs, batch and seed, interleaved per
seed: ``random`` (random init), ``pretrained`` (``pretrained=<file>``, every layer trained) and
``probe`` (``pretrained=<file>, freeze_backbone=True``: a linear probe). Each arm runs the
package's loop in this process (``engine.train_loop``, one worker, no Ray). Reported per arm and
seed: test accuracy, test AUROC and FPR95 of MSP (mean over the test OOD sets, and near / far),
val figures and wall time; mean and sd over seeds; the paired gains over random init.

`python bench/transfer.py [--data DIR] [--seeds 0 1 2] [--a-epochs 4] [--b-epochs 20] [--threads 1]`
(`--quick` for a check in about three minutes): one JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import capture_stdout, emit, load_in_memory, log, machine_info  # noqa: E402

from ood_ray import metric_names as names  # noqa: E402
from ood_ray.config import TrainConfig  # noqa: E402
from ood_ray.data.manifest import Benchmark, Manifest  # noqa: E402
from ood_ray.data.writer import write_array_shards  # noqa: E402
from ood_ray.engine import LocalWorker  # noqa: E402
from ood_ray.engine.loop import train_loop  # noqa: E402

DEFAULT_DATA = Path("/work/data/c10")
BUILD_HINT = "ood-ray data build --spec benchmarks/cifar10-real.yaml --root ../shared/data/real-images --out /work/data/c10"
BACKBONE = "torchvision:resnet18"
CLASSES_A, CLASSES_B = range(0, 5), range(5, 10)
ARMS = ("random", "pretrained", "probe")
#: reported per run, from the last epoch's metrics (names from ood_ray.metric_names)
KEYS = {
    "test_acc": names.id_key("test", "acc"),
    "test_auroc": names.mean_key("test", "auroc"),
    "test_fpr95": names.mean_key("test", "fpr95"),
    "test_near_auroc": names.mean_key("test", "auroc", "near"),
    "test_far_auroc": names.mean_key("test", "auroc", "far"),
    "val_acc": names.id_key("val", "acc"),
    "val_auroc": names.mean_key("val", "auroc"),
}


class LatestCheckpoint(LocalWorker):
    """``engine.LocalWorker`` that keeps only the newest checkpoint folder (a ResNet-18 with Adam's
    state is about 135 MB per epoch)."""

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        old = self.checkpoint
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir and old and old != self.checkpoint:
            shutil.rmtree(old, ignore_errors=True)


def resolve_data(arg: str | None) -> Path:
    path = Path(arg) if arg else DEFAULT_DATA
    if path.is_dir():
        path = path / "benchmark.json"
    if not path.is_file():
        sys.exit(f"transfer.py: no benchmark at {path}; build the cifar10-real benchmark first (27 s):\n  {BUILD_HINT}\nor pass --data <its folder>")
    return path


def subset(x: torch.Tensor, y: torch.Tensor, classes: range, per_class: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``classes`` (``per_class`` of each, a seeded choice; None = all), as
    N×H×W×C uint8 and labels renumbered from 0."""
    yn = y.numpy()
    idx = []
    for c in classes:
        mine = np.flatnonzero(yn == c)
        idx.append(mine if per_class is None else np.sort(rng.choice(mine, min(per_class, len(mine)), replace=False)))
    idx = np.concatenate(idx)
    return x[idx].permute(0, 2, 3, 1).numpy(), yn[idx] - classes.start


def write_task(out: Path, name: str, splits: dict, class_names: list[str], src: Benchmark, seed: int) -> Path:
    """Write a task's train/val/test with the package's writer and its benchmark.json, the OOD sets
    referenced by the path of the source benchmark's manifests; returns the checked benchmark.json."""
    spec: dict = {"name": name, "image_size": list(src.train.image_size), "outlier": None,
                  "ood_val": {k: m.path for k, m in src.ood_val.items()}, "ood_test": {k: m.path for k, m in src.ood_test.items()}}  # fmt: skip
    for role, (images, labels) in splits.items():
        write_array_shards(
            images, labels, out / role, name=role, role=role, class_names=class_names, key_prefix=f"{role}-",
            encoding="png", maxcount=5000, progress=False, shuffle_seed=seed,
            description=f"{name}, {role}: {src.name} classes {', '.join(class_names)} ({len(labels)} images)",
        )  # fmt: skip
        spec[role] = f"{role}/manifest.json"
    path = out / "benchmark.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    bench = Benchmark.load(path, verify=True)
    log(f"{name}: " + ", ".join(f"{r} {getattr(bench, r).num_samples}" for r in splits) + f"; OOD val {list(bench.ood_val)}, test {list(bench.ood_test)}")
    return path


def run(cfg: TrainConfig, root: Path, tag: str) -> tuple[list[dict], float]:
    """``cfg`` trained in this process; every epoch's metrics and the wall time."""
    worker = LatestCheckpoint(root)
    t0 = time.perf_counter()
    train_loop(cfg.validate(), worker)
    wall = time.perf_counter() - t0
    last = worker.reports[-1]
    if "diverged" in last:
        sys.exit(f"transfer.py: {tag} diverged: {last['diverged']}")
    log(f"{tag}: test acc {last[KEYS['test_acc']]:.4f}, AUROC {last[KEYS['test_auroc']]:.4f} in {wall:.0f}s")
    return worker.reports, wall


def figures(reports: list[dict], wall: float, batch: int) -> dict:
    last = reports[-1]
    out = {k: round(float(last[key]), 4) for k, key in KEYS.items() if key in last}
    val_acc = [r[KEYS["val_acc"]] for r in reports]
    out.update(val_acc_epoch1=round(float(val_acc[0]), 4), val_acc_best=round(float(max(val_acc)), 4))
    images, train_s = sum(r["train_images"] for r in reports), sum(r["train_time_s"] for r in reports)
    out.update(wall_s=round(wall, 1), train_s=round(train_s, 1), eval_s=round(sum(r["eval_time_s"] for r in reports), 1),
               steps=images // batch, img_per_s=round(images / train_s, 1))  # fmt: skip
    return out


def export_torchvision(ckpt: str, out: Path, test: Manifest) -> dict:
    """The pretrained classifier as a torchvision ``resnet18(num_classes=5)`` state_dict: saved,
    loaded strictly and checked against the trained model's logits on task A test images."""
    import torchvision

    from ood_ray.checkpoint import load_model_dir

    state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=True)["model"]
    prefix = "backbone.net."
    sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    sd["fc.weight"], sd["fc.bias"] = state["head.weight"], state["head.bias"]
    left = sorted(k for k in state if not k.startswith(prefix) and k not in ("head.weight", "head.bias"))
    if left:
        sys.exit(f"transfer.py: checkpoint tensors with no torchvision name: {left}")
    torch.save(sd, out)
    net = torchvision.models.resnet18(num_classes=len(CLASSES_A))
    net.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    model, _, _ = load_model_dir(ckpt)
    x, _ = next(iter(load_batches(test, 256)))
    with torch.no_grad():
        inp = model.prepare(x)
        diff = float((net(inp) - model(inp)).abs().max())
    if diff > 1e-3:
        sys.exit(f"transfer.py: the torchvision model's logits differ from the trained classifier's by {diff}")
    log(f"saved {out} ({len(sd)} tensors): strict torchvision load ok, max logit difference {diff:.2e}")
    return {"file": str(out), "tensors": len(sd), "strict_load": True, "max_logit_diff": diff}


def load_batches(manifest: Manifest, batch: int):
    from ood_ray.data.streams import eval_batches

    return ((x, y) for x, y, _ in eval_batches(manifest, 0, 1, batch))


def summarize(per_seed: dict[int, dict]) -> dict:
    keys = [k for k in next(iter(per_seed.values())) if isinstance(next(iter(per_seed.values()))[k], float | int)]
    mean = {k: round(float(np.mean([d[k] for d in per_seed.values()])), 4) for k in keys}
    sd = {k: round(float(np.std([d[k] for d in per_seed.values()], ddof=1)), 4) for k in keys} if len(per_seed) > 1 else {}
    return {"mean": mean, "sd": sd, "per_seed": {str(s): d for s, d in per_seed.items()}}


def gains(arms: dict, arm: str, base: str = "random") -> dict:
    out = {}
    for k in ("test_acc", "test_auroc", "test_fpr95", "test_near_auroc", "test_far_auroc"):
        diffs = [arms[arm][s][k] - arms[base][s][k] for s in arms[base]]
        out[k] = {"mean": round(float(np.mean(diffs)), 4), "per_seed": [round(d, 4) for d in diffs], "positive_seeds": int(sum(d > 0 for d in diffs))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help=f"a built cifar10-real benchmark (folder or benchmark.json; default {DEFAULT_DATA})")
    ap.add_argument("--work", default=None, help="folder for the two task benchmarks, weights and checkpoints (default: a temporary one, removed at the end)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds (task B)")
    ap.add_argument("--a-epochs", type=int, default=4, help="pretraining epochs on task A")
    ap.add_argument("--a-batch", type=int, default=128)
    ap.add_argument("--a-train-per-class", type=int, default=None, help="task A train images per class (default: all 5000)")
    ap.add_argument("--b-epochs", type=int, default=20, help="fine-tuning epochs on task B (every arm)")
    ap.add_argument("--b-batch", type=int, default=32)
    ap.add_argument("--b-train-per-class", type=int, default=100, help="task B train images per class")
    ap.add_argument("--optimizer", default="adam", choices=["sgd", "adam", "adamw"], help="one recipe for pretraining and every arm")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--subset-seed", type=int, default=0, help="seed of task B's train images and of the shard order")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two threads collapse when another job shares the 2 cores)")
    ap.add_argument("--quick", action="store_true", help="a check: 1000 task A images for 1 epoch, 20 per class on B for 2 epochs, seed 0")
    args = ap.parse_args()
    if args.quick:
        args.a_epochs, args.a_train_per_class, args.b_epochs, args.b_train_per_class, args.seeds = 1, 200, 2, 20, [0]
    data = resolve_data(args.data)
    capture_stdout()
    t_start = time.perf_counter()
    machine = machine_info(args.threads)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ood-ray-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = Benchmark.load(data)
        if src.num_classes != 10:
            sys.exit(f"transfer.py: {data} has {src.num_classes} classes; expected CIFAR-10's 10")
        rng = np.random.default_rng(args.subset_seed)
        t0 = time.perf_counter()
        tasks = {}
        mem = {role: load_in_memory(getattr(src, role)) for role in ("train", "val", "test")}
        log(f"read {', '.join(f'{r} {len(v[1])}' for r, v in mem.items())} from {data} in {time.perf_counter() - t0:.1f}s")
        for name, classes, per_class in (("task-a", CLASSES_A, args.a_train_per_class), ("task-b", CLASSES_B, args.b_train_per_class)):
            splits = {"train": subset(*mem["train"], classes, per_class, rng), **{r: subset(*mem[r], classes, None, rng) for r in ("val", "test")}}
            tasks[name] = write_task(work / name, name, splits, src.class_names[classes.start : classes.stop], src, args.subset_seed)
        del mem
        data_s = time.perf_counter() - t0

        common = dict(backbone=BACKBONE, input_size=args.input_size, method="softmax", num_workers=1, cpus_per_worker=float(args.threads),
                      optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, hflip=True, evaluate_test=True)  # fmt: skip
        cfg_a = TrainConfig(data=str(tasks["task-a"]), epochs=args.a_epochs, batch_size=args.a_batch, seed=0, **common)
        log(f"pretraining {BACKBONE} at {args.input_size} px on task A for {args.a_epochs} epochs")
        reports, wall = run(cfg_a, work / "pretrain", "pretrain (task A)")
        pre = figures(reports, wall, args.a_batch)
        weights = work / "resnet18-task-a.pth"
        pre.update(export_torchvision(reports[-1]["checkpoint_path"], weights, Benchmark.load(tasks["task-a"]).test))
        shutil.rmtree(work / "pretrain", ignore_errors=True)

        arm_cfg = {"random": {}, "pretrained": {"pretrained": str(weights)}, "probe": {"pretrained": str(weights), "freeze_backbone": True}}
        per: dict[str, dict[int, dict]] = {a: {} for a in ARMS}
        for seed in args.seeds:
            for arm in ARMS:
                cfg = TrainConfig(data=str(tasks["task-b"]), epochs=args.b_epochs, batch_size=args.b_batch, seed=seed, **common, **arm_cfg[arm])
                root = work / f"b-{arm}-s{seed}"
                log(f"task B, {arm}, seed {seed}: {args.b_epochs} epochs")
                reports, wall = run(cfg, root, f"task B {arm} seed {seed}")
                per[arm][seed] = figures(reports, wall, args.b_batch)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        emit({
        "bench": "transfer",
        "data": str(data),
        "setup": {
            "backbone": BACKBONE, "input_size": args.input_size, "method": "softmax (MSP score)", "preprocessing": "ImageNet mean/std, resize + centre crop; random-resized crop + flip when training",
            "recipe": {"optimizer": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay, "schedule": "cosine"},
            "task_a": {"classes": src.class_names[0:5], "train_per_class": args.a_train_per_class or "all", "epochs": args.a_epochs, "batch": args.a_batch, "steps": pre["steps"]},
            "task_b": {"classes": src.class_names[5:10], "train_per_class": args.b_train_per_class, "epochs": args.b_epochs, "batch": args.b_batch, "steps": per["random"][args.seeds[0]]["steps"], "seeds": args.seeds},
            "ood_val": list(src.ood_val), "ood_test": list(src.ood_test), "data_prep_s": round(data_s, 1),
        },
        "pretrain": pre,
        "arms": {a: summarize(per[a]) for a in ARMS},
        "gain_over_random": {a: gains(per, a) for a in ("pretrained", "probe")},
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "machine": machine,
    })  # fmt: skip


if __name__ == "__main__":
    main()
