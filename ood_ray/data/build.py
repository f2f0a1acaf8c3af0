"""``ood-ray data build``: a benchmark from image folders, globs, image lists and archives.

``build_benchmark(spec, root, out)`` reads a spec (``data.spec``), checks every source, then
writes one shard set per role into ``out/<set>/`` and ``out/benchmark.json``. Samples are written
in the spec's seeded shuffled order; images are converted to the spec's mode (16-bit scans are
scaled to 8 bits, not clipped) and brought to its size by its resize rule; JPEG files that need no
change are stored as they are (``encoding: auto``).

Staged like the other builders: nothing in ``out`` changes until every source has been checked;
then ``benchmark.json`` is removed, each set is written (each set itself atomically, by
``write_shards``), and ``benchmark.json`` is written last, so a half-built folder is never taken
for a complete one. Archives are extracted into a temporary folder inside ``out`` that is removed
at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .images import JPEG_EXTENSIONS, resize_to, stored_as_is, to_mode
from .manifest import ID_ROLES, OOD_LABEL, DataError, Manifest
from .spec import Archives, SetPlan, Spec, load_spec, plan_sets
from .writer import shuffled_order, write_shards

SPEC_FILE = "benchmark.json"


@dataclass
class BuiltBenchmark:
    path: Path  # benchmark.json
    sets: list[tuple[SetPlan, Manifest, str]] = field(default_factory=list)  # plan, manifest, encoding


def prepared(path: Path, spec: Spec, keep_jpeg: bool):
    """The path itself when the file can be stored as it is (a JPEG of the right size and mode,
    with ``keep_jpeg``), else the decoded image converted and resized."""
    try:
        with Image.open(path) as im:
            if keep_jpeg and stored_as_is(im, spec.mode, spec.image_size):
                return path
            im.load()
            im = to_mode(im, spec.mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    return resize_to(im, spec.image_size, spec.resize, str(path))


def set_encoding(spec: Spec, plan: SetPlan) -> str:
    """``auto``: jpg when every file is a JPEG and the first already has the spec's size and mode
    (no second lossy step), else png."""
    if spec.encoding != "auto":
        return spec.encoding
    if not all(it.path.suffix.lower() in JPEG_EXTENSIONS for it in plan.items):
        return "png"
    try:
        with Image.open(plan.items[0].path) as im:
            same = stored_as_is(im, spec.mode, spec.image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{plan.items[0].path}: cannot read image ({e})") from None
    return "jpg" if same else "png"


def _samples(spec: Spec, plan: SetPlan, encoding: str) -> Iterator[tuple[str, object, int]]:
    keep = encoding == "jpg"
    for i in shuffled_order(len(plan.items), spec.shuffle_seed):
        it = plan.items[int(i)]
        yield f"{plan.subdir}-{int(i):07d}", prepared(it.path, spec, keep), (it.label if plan.role in ID_ROLES else OOD_LABEL)


def build_benchmark(spec_path: str | Path, root: str | Path, out: str | Path, *, progress: bool = False, log: Callable[[str], None] | None = None) -> BuiltBenchmark:
    """Build the benchmark that ``spec_path`` describes from the files under ``root`` into ``out``."""
    spec = load_spec(spec_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=out))
    try:
        if log:
            log(f"checking the sources of {spec.path} under {root}")
        plans, classes = plan_sets(spec, Path(root), Archives(Path(root), work))
        return _write(spec, plans, classes, out, progress, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(spec: Spec, plans: list[SetPlan], classes: list[str], out: Path, progress: bool, log) -> BuiltBenchmark:
    spec_path = out / SPEC_FILE
    spec_path.unlink(missing_ok=True)
    h, w = spec.image_size
    bench: dict = {"name": spec.name, "image_size": [h, w], "train": None, "val": None, "test": None,
                   "outlier": None, "ood_val": {}, "ood_test": {}, "sources": {}, "built_from": str(spec.path.name)}  # fmt: skip
    built = BuiltBenchmark(spec_path)
    for i, p in enumerate(plans, 1):
        encoding = set_encoding(spec, p)
        if log:
            log(f"[{i}/{len(plans)}] {p.subdir}: {len(p.items)} images from {p.origin} ({encoding})")
        is_id = p.role in ID_ROLES
        group = f", {p.group} OOD" if p.group else ""
        m = write_shards(
            _samples(spec, p, encoding), out / p.subdir, name=p.subdir, role=p.role, image_size=(h, w), mode=spec.mode,
            class_names=classes if is_id else (), group=p.group, encoding=encoding, maxcount=spec.maxcount,
            total=len(p.items), progress=progress, shuffle_seed=spec.shuffle_seed,
            description=f"{spec.description + ' ' if spec.description else ''}{spec.name}, {p.role}{group}: {p.origin}; {spec.mode} {h}x{w} (resize: {spec.resize}).",
        )  # fmt: skip
        rel = f"{p.subdir}/manifest.json"
        if p.role == "ood-val":
            bench["ood_val"][p.key] = rel
        elif p.role == "ood-test":
            bench["ood_test"][p.key] = rel
        else:
            bench[p.role] = rel
        bench["sources"][p.subdir] = p.origin
        built.sets.append((p, m, encoding))
    tmp = out / f".{SPEC_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(bench, indent=2) + "\n")
    os.replace(tmp, spec_path)
    return built
