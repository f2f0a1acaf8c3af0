"""Benchmark specs: which images under a root folder play which role (``ood-ray data build``).

A spec is a YAML (or JSON) file::

    name: cifar10-real
    image_size: 32            # or [H, W]
    mode: RGB                 # L or RGB
    resize: fit               # fit: shorter side to size + centre crop | stretch | none (sizes must match)
    encoding: auto            # auto: JPEG files that need no change stay JPEG, else PNG | png | jpg | raw
    maxcount: 10000           # samples per shard
    shuffle_seed: 0           # samples are written in this seeded order (null: source order)
    sets:
      train: {archive: cifar10-jpg.tar.gz, folder: cifar10-jpg/train}
      test:  {archive: cifar10-jpg.tar.gz, folder: cifar10-jpg/test}
      val:   {split: test, per_class: 100}          # held out of test (seeded), test keeps the rest
      outlier: {archive: tin-outlier.tar.gz, folder: tin-outlier}
      ood_val:
        tin: {archive: tin-ood-val.tar.gz, folder: tin-ood-val, group: near}
      ood_test:
        mnist: {archive: mnist-test.tar.gz, folder: mnist-test/test, group: far}

A source is one of ``folder: DIR`` (ID sets: one sub-folder per class, sorted names give the class
indices; outlier/OOD sets: every image below it), ``glob: PATTERN`` (outlier/OOD sets only) or
``list: FILE`` (lines ``<image path> <label>``, paths relative to ``base:``, default the list's
folder). Paths are relative to ``--root`` and stay inside it. With ``archive: FILE.tar[.gz|.bz2|.xz]``
the paths are inside that archive, which is extracted (safely: regular files and folders only)
to a temporary folder for the build. ``train`` and ``test`` are required; ``val`` is a source or a
``split`` of ``train`` or ``test``.

Parsing checks everything a build needs before it writes anything; each error is one line naming
the field (``sets.ood_test.mnist.folder``) and the file.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import ENCODINGS, IMAGE_EXTENSIONS
from .manifest import MODES, DataError

ROLE_KEYS = ("train", "val", "test", "outlier", "ood_val", "ood_test")
TOP_KEYS = ("name", "image_size", "mode", "resize", "encoding", "maxcount", "shuffle_seed", "sets", "description")
SOURCE_KEYS = ("archive", "folder", "glob", "list", "base", "group", "classes")
RESIZE_RULES = ("fit", "stretch", "none")
MAX_CLASSES = 100_000
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


@dataclass
class Item:
    path: Path  # the image file (inside an extracted archive when the source is one)
    label: int  # class index; -1 for outlier/OOD sets
    origin: str  # how the spec names it (archive member or path under --root), for overlap checks


@dataclass
class SetPlan:
    field: str  # sets.train, sets.ood_test.mnist, ...
    role: str  # manifest role
    key: str  # name in benchmark.json (ood sets) or the role
    subdir: str
    group: str | None
    origin: str  # for people
    items: list[Item]


@dataclass
class Spec:
    path: Path
    name: str
    image_size: tuple[int, int]
    mode: str
    resize: str
    encoding: str
    maxcount: int
    shuffle_seed: int | None
    sets: dict
    description: str = ""  # prepended to every manifest's description


def _fail(spec_path, where: str, why: str):
    raise DataError(f"{spec_path}: {where}: {why}")


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file (types and values; sources are resolved by ``plan_sets``)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"--spec {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--spec {path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise DataError(f"--spec {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise DataError(f"--spec {path}: expected a mapping with 'sets', got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(TOP_KEYS))
    if unknown:
        _fail(path, unknown[0], f"unknown key (known: {', '.join(TOP_KEYS)})")
    size = raw.get("image_size", 32)
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096 for v in size)):
        _fail(path, "image_size", f"{raw.get('image_size')!r} must be an int or [H, W] with values in [8, 4096]")
    mode = raw.get("mode", "RGB")
    if mode not in MODES:
        _fail(path, "mode", f"{mode!r} is not one of {', '.join(MODES)}")
    resize = raw.get("resize", "fit")
    if resize not in RESIZE_RULES:
        _fail(path, "resize", f"{resize!r} is not one of {', '.join(RESIZE_RULES)}")
    encoding = raw.get("encoding", "auto")
    if encoding not in ("auto", *ENCODINGS):
        _fail(path, "encoding", f"{encoding!r} is not one of auto, {', '.join(ENCODINGS)}")
    maxcount = raw.get("maxcount", 10000)
    if not isinstance(maxcount, int) or isinstance(maxcount, bool) or maxcount < 1:
        _fail(path, "maxcount", f"{maxcount!r} must be an int >= 1")
    seed = raw.get("shuffle_seed", 0)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        _fail(path, "shuffle_seed", f"{seed!r} must be an int in [0, 2^32) or null")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        _fail(path, "name", f"{name!r} must be a non-empty string")
    sets = raw.get("sets")
    if not isinstance(sets, dict):
        _fail(path, "sets", "missing, or not a mapping of roles (train, val, test, outlier, ood_val, ood_test)")
    unknown = sorted(set(map(str, sets)) - set(ROLE_KEYS))
    if unknown:
        _fail(path, f"sets.{unknown[0]}", f"unknown role (roles: {', '.join(ROLE_KEYS)})")
    for role in ("train", "test"):
        if role not in sets:
            _fail(path, f"sets.{role}", "missing (train and test are required)")
    for role in ("ood_val", "ood_test"):
        if role in sets and (not isinstance(sets[role], dict) or not sets[role]):
            _fail(path, f"sets.{role}", "must map set names to sources, e.g. {tin: {folder: tin-val, group: near}}")
    return Spec(path, name, (size[0], size[1]), mode, resize, encoding, maxcount, seed, sets, str(raw.get("description", "")))


class Archives:
    """Archives named by a spec, each extracted once into ``workdir`` (regular files and folders
    only, through tarfile's ``data`` filter: no links, devices, absolute or escaping paths)."""

    def __init__(self, root: Path, workdir: Path):
        self.root, self.workdir, self.done = root, workdir, {}

    def folder(self, name: str, where: str) -> Path:
        path = inside(self.root, name, where)
        if not path.is_file():
            raise DataError(f"{where}: archive {path} does not exist")
        if not str(path).lower().endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"{where}: {path} is not a .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz archive")
        if path not in self.done:
            dest = self.workdir / f"archive-{len(self.done)}"
            dest.mkdir(parents=True)
            try:
                with tarfile.open(path) as tf:
                    members = [m for m in tf.getmembers() if m.isfile() or m.isdir()]
                    tf.extractall(dest, members=members, filter="data")
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{where}: cannot extract {path} ({type(e).__name__}: {e})") from None
            self.done[path] = dest
        return self.done[path]


def inside(root: Path, rel, where: str) -> Path:
    """``root/rel``, refusing paths that leave ``root``."""
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{where}: must be a path relative to the root, got {rel!r}")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{where}: {rel!r} must be relative to the root and stay inside it")
    return root / p


def _images_below(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )  # fmt: skip


def resolve_source(src, where: str, root: Path, archives: Archives, is_id: bool, classes: list[str] | None) -> tuple[list[Item], list[str] | None, str]:
    """The images of one source: ``(items, class names (ID), origin)``."""
    if not isinstance(src, dict):
        raise DataError(f"{where}: expected a mapping such as {{folder: DIR}}, got {src!r}"[:300])
    unknown = sorted(set(map(str, src)) - set(SOURCE_KEYS))
    if unknown:
        raise DataError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(SOURCE_KEYS)})")
    kinds = [k for k in ("folder", "glob", "list") if k in src]
    if len(kinds) != 1:
        raise DataError(f"{where}: give exactly one of folder, glob, list")
    kind = kinds[0]
    base, label = root, str(root)
    if "archive" in src:
        base, label = archives.folder(src["archive"], f"{where}.archive"), str(src["archive"])
    tag = f"{label}:" if "archive" in src else ""
    if kind == "folder":
        folder = inside(base, src["folder"], f"{where}.folder")
        if not folder.is_dir():
            raise DataError(f"{where}.folder: {src['folder']!r} is not a folder" + (f" in {label}" if "archive" in src else f" under {root}"))
        if not is_id:
            files = _images_below(folder)
            if not files:
                raise DataError(f"{where}.folder: no images in {src['folder']!r} (extensions {', '.join(IMAGE_EXTENSIONS)})")
            return [Item(f, -1, tag + str(f.relative_to(base))) for f in files], None, f"{tag}{src['folder']}"
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DataError(f"{where}.folder: {src['folder']!r} has no class sub-folders (expected <folder>/<class>/<image>)")
        if classes is not None and names != classes:
            raise DataError(f"{where}.folder: classes {names[:5]}... differ from sets.train's {classes[:5]}..." if len(names) > 5 else f"{where}.folder: classes {names} differ from sets.train's {classes}")
        items = []
        for ci, c in enumerate(names):
            files = _images_below(folder / c)
            if not files:
                raise DataError(f"{where}.folder: class {c!r} ({folder / c}) holds no images")
            items += [Item(f, ci, tag + str(f.relative_to(base))) for f in files]
        return items, names, f"{tag}{src['folder']}"
    if kind == "glob":
        if is_id:
            raise DataError(f"{where}.glob: ID sets need classes: use folder (one sub-folder per class) or list")
        pattern = src["glob"]
        inside(base, pattern, f"{where}.glob")
        files = sorted(p for p in base.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{where}.glob: {pattern!r} matches no images" + (f" in {label}" if "archive" in src else f" under {root}"))
        return [Item(f, -1, tag + str(f.relative_to(base))) for f in files], None, f"{tag}{pattern}"
    lst = inside(base, src["list"], f"{where}.list")
    if not lst.is_file():
        raise DataError(f"{where}.list: {src['list']!r} is not a file")
    img_base = inside(base, src["base"], f"{where}.base") if "base" in src else lst.parent
    items = []
    try:
        lines = lst.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{lst}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{lst}:{n}: expected '<image path> <label>', got {line[:200]!r}")
        p = inside(img_base, parts[0], f"{lst}:{n}")
        if not p.is_file():
            raise DataError(f"{lst}:{n}: image {p} does not exist")
        try:
            y = int(parts[1])
        except ValueError:
            raise DataError(f"{lst}:{n}: label {parts[1][:50]!r} is not an integer") from None
        if is_id and not 0 <= y < MAX_CLASSES:
            raise DataError(f"{lst}:{n}: label {y} outside [0, {MAX_CLASSES})")
        items.append(Item(p, y if is_id else -1, tag + str(p.relative_to(base))))
    if not items:
        raise DataError(f"{where}.list: {src['list']!r} lists no images")
    names = None
    if is_id:
        given = src.get("classes")
        top = max(it.label for it in items) + 1
        if given is not None:
            if not isinstance(given, list) or not all(isinstance(c, str) for c in given) or len(given) < top:
                raise DataError(f"{where}.classes: must be a list of at least {top} class names (labels go up to {top - 1})")
            names = given
        else:
            names = classes or [str(i) for i in range(top)]
        if classes is not None and names != classes:
            raise DataError(f"{where}: classes differ from sets.train's")
        seen = {it.label for it in items}
        empty = [names[i] for i in range(len(names)) if i not in seen]
        if empty and classes is None:
            raise DataError(f"{where}.list: class {empty[0]!r} has no images")
    return items, names, f"{tag}{src['list']}"


def plan_sets(spec: Spec, root: Path, archives: Archives) -> tuple[list[SetPlan], list[str]]:
    """Every set's images, checked (missing folders, empty classes, overlaps); nothing is written."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--root {root} is not a folder")
    sets = spec.sets
    items, classes, origin = resolve_source(sets["train"], "sets.train", root, archives, True, None)
    plans = [SetPlan("sets.train", "train", "train", "train", None, origin, items)]
    test_items, _, test_origin = resolve_source(sets["test"], "sets.test", root, archives, True, classes)
    val = sets.get("val")
    if val is None:
        raise DataError(f"{spec.path}: sets.val: missing; give a source or a split such as {{split: test, per_class: 100}}")
    if isinstance(val, dict) and "split" in val:
        unknown = sorted(set(map(str, val)) - {"split", "per_class"})
        if unknown:
            raise DataError(f"{spec.path}: sets.val.{unknown[0]}: unknown key (a split takes split and per_class)")
        if val["split"] not in ("train", "test"):
            raise DataError(f"{spec.path}: sets.val.split: {val['split']!r} must be train or test")
        k = val.get("per_class")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise DataError(f"{spec.path}: sets.val.per_class: {k!r} must be an int >= 1")
        source = plans[0].items if val["split"] == "train" else test_items
        held, rest = hold_out(source, k, len(classes), spec.shuffle_seed, f"sets.{val['split']}")
        if val["split"] == "train":
            plans[0].items = rest
            plans[0].origin += f" (less {k} per class for val)"
        else:
            test_items, test_origin = rest, test_origin + f" (less {k} per class for val)"
        plans.append(SetPlan("sets.val", "val", "val", "val", None, f"{k} per class of sets.{val['split']} (seeded)", held))
    else:
        v_items, _, v_origin = resolve_source(val, "sets.val", root, archives, True, classes)
        plans.append(SetPlan("sets.val", "val", "val", "val", None, v_origin, v_items))
    plans.append(SetPlan("sets.test", "test", "test", "test", None, test_origin, test_items))
    if sets.get("outlier") is not None:
        o_items, _, o_origin = resolve_source(sets["outlier"], "sets.outlier", root, archives, False, None)
        plans.append(SetPlan("sets.outlier", "outlier", "outlier", "outlier", None, o_origin, o_items))
    for role_key, role in (("ood_val", "ood-val"), ("ood_test", "ood-test")):
        for name, src in (sets.get(role_key) or {}).items():
            where = f"sets.{role_key}.{name}"
            if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
                raise DataError(f"{spec.path}: {where}: set names are letters, digits, '_' and '-'")
            group = src.get("group") if isinstance(src, dict) else None
            if group not in ("near", "far"):
                raise DataError(f"{spec.path}: {where}.group: {group!r} must be near or far")
            o_items, _, o_origin = resolve_source(src, where, root, archives, False, None)
            plans.append(SetPlan(where, role, name, f"{role}-{name}", group, o_origin, o_items))
    check_disjoint(spec, plans)
    return plans, classes


def hold_out(items: list[Item], k: int, n_classes: int, seed: int | None, where: str) -> tuple[list[Item], list[Item]]:
    """``k`` items per class (a seeded choice, or the first ``k`` in file order when the seed is
    null) and the rest, both in their original order."""
    labels = np.array([it.label for it in items])
    rng = np.random.default_rng([0 if seed is None else seed, 31])
    held = np.zeros(len(items), bool)
    for y in range(n_classes):
        idx = np.flatnonzero(labels == y)
        if len(idx) <= k:
            raise DataError(f"{where}: class {y} has {len(idx)} images, too few to hold out {k} for val and keep some")
        held[idx[:k] if seed is None else rng.choice(idx, size=k, replace=False)] = True
    return [it for it, h in zip(items, held, strict=True) if h], [it for it, h in zip(items, held, strict=True) if not h]


def check_disjoint(spec: Spec, plans: list[SetPlan]) -> None:
    """No image in two sets (by its name in the spec's sources)."""
    owner: dict[str, str] = {}
    for p in plans:
        for it in p.items:
            other = owner.setdefault(it.origin, p.field)
            if other != p.field:
                n = len({i.origin for i in p.items} & {k for k, v in owner.items() if v == other})
                raise DataError(f"{spec.path}: {p.field} and {other} share {n} image(s), e.g. {it.origin}: outlier, val and test sets must not overlap")
