"""Shard encodings on real CIFAR-10: write img/s, bytes per image, decode µs per image.

    python bench/real_encodings.py --root ../shared/data/real-images       # the 50,000 train JPEGs
    python bench/real_encodings.py --root ../shared/data/real-images --n 5000

The CIFAR-10 train folder is extracted from ``cifar10-jpg.tar.gz`` to a temporary folder, then
written three times with ``ood_ray.data.writer.write_folder_shards`` (the code behind ``ood-ray
data shard --folder``): ``jpg`` (the source bytes kept), ``png`` (decoded and re-encoded, the
default before JPEG was kept) and ``raw`` (uint8 pixels). Per encoding: wall time and img/s of
writing, bytes per image on disk (whole shards / samples) and of the image field alone, and the
median over ``--repeats`` rounds of the µs per image of ``ood_ray.data.streams.decode_sample``
(header checks + decode to C×H×W) on the first ``--decode`` samples, read into memory first so that
only decoding is timed. Source JPEG bytes per image are given for reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ENCODINGS = ("jpg", "png", "raw")


def extract_train(root: Path, dest: Path, n: int | None) -> Path:
    with tarfile.open(root / "cifar10-jpg.tar.gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.startswith("cifar10-jpg/train/")]
        if n is not None:  # an equal share of every class
            by_class: dict[str, list] = {}
            for m in members:
                by_class.setdefault(m.name.split("/")[2], []).append(m)
            members = [m for ms in by_class.values() for m in sorted(ms, key=lambda m: m.name)[: n // len(by_class)]]
        tf.extractall(dest, members=members, filter="data")
    return dest / "cifar10-jpg" / "train"


def decode_us(manifest, count: int, repeats: int) -> float:
    from ood_ray.data.streams import decode_sample, plan_epoch, read_shard

    samples = []
    for t in plan_epoch(manifest, 0, 1, shuffle=False):
        for s in read_shard(t):
            samples.append(s)
            if len(samples) >= count:
                break
        if len(samples) >= count:
            break
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in samples:
            decode_sample(s, manifest)
        rounds.append((time.perf_counter() - t0) / len(samples) * 1e6)
    return statistics.median(rounds)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="the real-images folder holding cifar10-jpg.tar.gz")
    p.add_argument("--n", type=int, help="train images to use (default: all 50,000)")
    p.add_argument("--decode", type=int, default=5000, help="samples whose decoding is timed")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from ood_ray.data.writer import write_folder_shards

    work = Path(tempfile.mkdtemp(prefix="ood_ray_enc_"))
    try:
        t0 = time.perf_counter()
        folder = extract_train(Path(args.root), work / "src", args.n)
        files = sorted(folder.rglob("*.jpg"))
        C.log(f"extracted {len(files)} JPEGs in {time.perf_counter() - t0:.1f}s")
        out = {"bench": "real_encodings", "machine": C.machine_info(), "images": len(files),
               "source_jpeg_bytes_per_image": round(sum(f.stat().st_size for f in files) / len(files), 1), "encodings": {}}  # fmt: skip
        for enc in ENCODINGS:
            t = time.perf_counter()
            m = write_folder_shards(folder, work / enc, name="train", role="train", encoding=enc, progress=False)
            wall = time.perf_counter() - t
            from ood_ray.data.tar import local_tar_samples

            field = [len(s[enc]) for s in local_tar_samples(m.urls()[0])]
            out["encodings"][enc] = {
                "write_s": round(wall, 1),
                "write_img_s": round(m.num_samples / wall, 1),
                "shard_bytes_per_image": round(sum(os.path.getsize(u) for u in m.urls()) / m.num_samples, 1),
                "image_bytes_per_image": round(sum(field) / len(field), 1),
                "decode_us_per_image": round(decode_us(m, args.decode, args.repeats), 1),
            }
            C.log(f"{enc}: {out['encodings'][enc]}")
        base = out["encodings"]["png"]
        for r in out["encodings"].values():
            r["bytes_vs_png"] = round(r["shard_bytes_per_image"] / base["shard_bytes_per_image"], 3)
            r["decode_vs_png"] = round(r["decode_us_per_image"] / base["decode_us_per_image"], 3)
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    C.emit(main())
