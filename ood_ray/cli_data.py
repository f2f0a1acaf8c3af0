"""``ood-ray data``: build benchmarks, write shards, verify them."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .data.manifest import DEFAULT_READ_CMD, GROUPS, ROLES, DataError


def cmd_build_default(ns: argparse.Namespace) -> int:
    from .data.default import build_default_locked

    path = build_default_locked(ns.out, seed=ns.seed, progress=True)
    print(f"wrote {path}")
    return 0

def cmd_build_openood(ns: argparse.Namespace) -> int:
    import functools

    from .data.openood import build_openood

    if ns.maxcount < 1:
        raise DataError(f"--maxcount {ns.maxcount}: give at least 1 sample per shard")
    log = functools.partial(print, file=sys.stderr, flush=True)  # which set is being written, and from what
    built = build_openood(ns.id, ns.root, ns.out, image_size=ns.image_size, maxcount=ns.maxcount, outlier=ns.outlier, progress=True, log=log)
    print(f"wrote OpenOOD v1.5 {ns.id} ({len(built.sets)} sets):")
    for b in built.sets:
        m = b.manifest
        print(f"  {m.role:<9} {m.name:<24} {b.spec.group or '-':<5} {m.num_samples:>8}  {b.origin}")
    print(f"benchmark: {built.path}")
    return 0

def cmd_build(ns: argparse.Namespace) -> int:
    import functools

    from .data.build import build_benchmark
    from .data.manifest import Benchmark

    log = functools.partial(print, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    built = build_benchmark(ns.spec, ns.root, ns.out, progress=True, log=log)
    print(f"wrote {len(built.sets)} sets in {time.perf_counter() - t0:.0f}s:")
    for p, m, enc in built.sets:
        print(f"  {m.role:<9} {m.name:<24} {p.group or '-':<5} {m.num_samples:>8}  {enc:<4} {p.origin}")
    print(f"benchmark: {built.path}  (digest {Benchmark.load(built.path).digest()[:16]})")
    return 0

def cmd_verify(ns: argparse.Namespace) -> int:
    from .data.manifest import Benchmark, Manifest

    path = Path(ns.path)
    is_bench = path.name == "benchmark.json" or (path.is_dir() and (path / "benchmark.json").exists())
    manifests = Benchmark.load(path, verify=True).all_manifests() if is_bench else [Manifest.load(path, verify=True)]
    from .data.mixing import class_sorted_shards, sorted_warning

    for m in manifests:
        print(f"ok  {m.role:<9}{m.name:<22}{m.num_samples:>7} samples in {len(m.shards)} shards")
        for command in m.commands():  # what reading it will run (allowed: see OOD_RAY_ALLOW_PIPE)
            print(f"    runs: {command}")
        if m.role == "train" and (found := class_sorted_shards(m)):
            print(f"warning: {sorted_warning(m, found)}", file=sys.stderr)
    return 0

def cmd_shard(ns: argparse.Namespace) -> int:
    from .data import writer

    kw = dict(name=ns.name, role=ns.role, group=ns.group, encoding=ns.encoding, maxcount=ns.maxcount, description=ns.description or "", shuffle_seed=None if ns.no_shuffle else ns.shuffle_seed)
    if ns.upload:
        kw["upload"] = writer.Upload(ns.upload, **{k: v for k, v in (("put", ns.upload_cmd), ("get", ns.read_cmd)) if v})
    elif ns.upload_cmd or ns.read_cmd:
        raise DataError("--upload-cmd/--read-cmd need --upload DEST")
    if ns.image_size:
        if not all(0 < v <= 65536 for v in ns.image_size):
            raise DataError(f"--image-size {' '.join(map(str, ns.image_size))}: height and width must lie in [1, 65536]")
        kw["image_size"] = tuple(ns.image_size)
    if ns.mode:
        kw["mode"] = ns.mode
    sources = [s for s in (ns.folder, ns.torchvision, ns.npz) if s]
    if len(sources) != 1:
        raise DataError("give exactly one source: --folder DIR, --torchvision NAME --root DIR, or --npz FILE")
    if not ns.folder and ns.encoding == "auto":
        kw["encoding"] = "png"  # only image files can be kept as they are
    if ns.folder:
        kw.setdefault("mode", "RGB")
        m = writer.write_folder_shards(ns.folder, ns.out, resize=bool(ns.image_size), **kw)
    elif ns.torchvision:
        if not ns.root:
            raise DataError("--torchvision needs --root, the folder that already holds the dataset")
        m = writer.write_torchvision_shards(ns.torchvision, ns.root, ns.out, split=ns.split, **kw)
    else:
        import numpy as np

        try:
            arrays = np.load(ns.npz, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{ns.npz}: cannot read ({e})") from None
        for key in ("images", "labels"):
            if key not in arrays:
                raise DataError(f"{ns.npz}: no array named {key!r} (found: {', '.join(arrays.files)})")
        try:
            images, labels = arrays["images"], arrays["labels"]
        except ValueError as e:  # e.g. object arrays, which would need unpickling
            raise DataError(f"{ns.npz}: cannot read its arrays ({e})") from None
        if len(images) == 0 or len(images) != len(labels):
            raise DataError(f"{ns.npz}: 'images' ({len(images)}) and 'labels' ({len(labels)}) must be non-empty and of one length")
        names = ns.class_names or [str(i) for i in range(int(labels.max()) + 1)]
        if ns.role in ("outlier", "ood-val", "ood-test"):
            names = []
        m = writer.write_array_shards(images, labels, ns.out, class_names=names, **kw)
    where = f" (shards uploaded to {ns.upload})" if ns.upload else ""
    print(f"wrote {len(m.shards)} shards, {m.num_samples} samples: {m.path}{where}")
    if ns.upload and kw["upload"].get != DEFAULT_READ_CMD:
        print(f"reading them runs {kw['upload'].get!r}: allow it where they are read with OOD_RAY_ALLOW_PIPE={kw['upload'].get!r}")
    return 0


def add_data_commands(sub) -> None:
    """The ``ood-ray data`` subcommands."""
    d = sub.add_parser("data", help="write and check WebDataset shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build-default", help="build the embedded digits-ood benchmark")
    b.add_argument("--out", required=True, help="output folder (benchmark.json and one sub-folder per set)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=cmd_build_default)
    oo = dsub.add_parser("build-openood", help="build an OpenOOD v1.5 benchmark (cifar10, cifar100, imagenet200, imagenet1k) from files already on disk; never downloads")
    oo.add_argument("--id", required=True, choices=("cifar10", "cifar100", "imagenet200", "imagenet1k"), help="the ID dataset of the benchmark (imagenet1k: OpenOOD's ImageNet-1K track, lists in benchmark_imglist/imagenet/)")
    oo.add_argument("--root", required=True, help="folder holding the datasets as their publishers ship them and/or OpenOOD's benchmark_imglist/ + images_classic/ + images_largescale/ (docs/openood.md)")
    oo.add_argument("--out", required=True, help="output folder (benchmark.json and one sub-folder per set)")
    oo.add_argument("--image-size", type=int, help="images are fit to SIZE x SIZE RGB (default 32 for CIFAR, 64 for imagenet200 and imagenet1k; 224 or 256 for real ImageNet work, docs/openood.md)")
    oo.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    oo.add_argument("--outlier", help="auxiliary outliers for Outlier Exposure: an image list (e.g. benchmark_imglist/cifar10/train_tin597.txt) or an image folder (default: none, as OpenOOD v1.5)")
    oo.set_defaults(fn=cmd_build_openood)
    bd = dsub.add_parser("build", help="build a benchmark from image folders, globs, image lists and archives described by a spec file (docs/data.md)")
    bd.add_argument("--spec", required=True, help="YAML/JSON spec mapping sources under --root to the roles train/val/test/outlier/ood_val/ood_test (e.g. benchmarks/cifar10-real.yaml)")
    bd.add_argument("--root", required=True, help="folder the spec's paths are relative to")
    bd.add_argument("--out", required=True, help="output folder (benchmark.json and one sub-folder per set)")
    bd.set_defaults(fn=cmd_build)
    v = dsub.add_parser("verify", help="check a manifest or benchmark: files exist, sha256 matches, train shards mix their classes")
    v.add_argument("path", help="manifest.json, benchmark.json, or a folder holding one")
    v.set_defaults(fn=cmd_verify)
    s = dsub.add_parser("shard", help="convert an image folder, a torchvision dataset or numpy arrays to shards")
    s.add_argument("--folder", help="image folder with one sub-folder per class")
    s.add_argument("--torchvision", help="torchvision dataset class already on disk, e.g. CIFAR10, SVHN")
    s.add_argument("--root", help="root folder of the torchvision dataset (never downloads)")
    s.add_argument("--split", help="torchvision split: train/test (CIFAR) or train/test/extra (SVHN)")
    s.add_argument("--npz", help=".npz file with arrays 'images' (uint8 N×H×W[×C]) and 'labels'")
    s.add_argument("--out", required=True, help="output folder for the .tar shards and manifest.json")
    s.add_argument("--name", required=True, help="set name, also the shard file prefix")
    s.add_argument("--role", required=True, choices=ROLES)
    s.add_argument("--group", choices=GROUPS, help="near or far, for OOD sets")
    s.add_argument("--class-names", nargs="+", help="class names for --npz (default: 0..max label)")
    s.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), help="resize images to H W")
    s.add_argument("--mode", choices=("L", "RGB"))
    s.add_argument("--encoding", choices=("auto", "png", "jpg", "raw"), default="auto", help="auto (default): JPEG files are kept as they are (jpg) unless --image-size is given, anything else is PNG")
    s.add_argument("--shuffle-seed", type=int, default=0, help="samples are written in this seeded shuffled order, so shards mix the classes (recorded in the manifest)")
    s.add_argument("--no-shuffle", action="store_true", help="write samples in source order (an image folder: class by class)")
    s.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    s.add_argument("--description")
    s.add_argument("--upload", metavar="DEST", help="send each shard to DEST (e.g. s3://bucket/prefix) as it is written and delete the local copy; --out keeps the manifest")
    s.add_argument("--upload-cmd", help="upload command with {src} and {dst} (default: aws s3 cp {src} {dst})")
    s.add_argument("--read-cmd", help="command that writes a shard {url} to stdout, used as a pipe: URL in the manifest (default: aws s3 cp {url} -)")
    s.set_defaults(fn=cmd_shard)
