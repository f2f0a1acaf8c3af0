"""Shard manifests and benchmark specs.

A *manifest* (``manifest.json``) describes one set of WebDataset shards: its name, its role
(``train``, ``val``, ``test``, ``outlier``, ``ood-val``, ``ood-test``), class names, image size and
mode, and for every shard its URL, sample count and sha256.

A *benchmark* (``benchmark.json``) names the manifests a training run reads: the ID train/val/test
splits, the auxiliary outliers, and the validation and test OOD sets (each tagged near or far).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
ID_ROLES = ("train", "val", "test")
OOD_ROLES = ("outlier", "ood-val", "ood-test")
ROLES = ID_ROLES + OOD_ROLES
MODES = {"L": 1, "RGB": 3}
GROUPS = ("near", "far")
OOD_LABEL = -1
MAX_SHARD_SAMPLES = 10**9
#: Image field names a manifest may declare: "raw" (uint8 bytes) or a format PIL decodes.
ENCODINGS = ("png", "raw", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


class DataError(ValueError):
    """A problem with data files: manifest, shard or sample. The message names the culprit."""


#: ``pipe:`` URLs run a shell command. A manifest is data that people download and share, so the
#: command of a ``pipe:`` URL runs only when it is an instance of an allowed template: the
#: template with ``{url}`` replaced by one shell-quoted argument (``shlex.quote``), exactly as
#: ``ood-ray data shard --upload`` writes it. Allowed: the default read command below, and the
#: templates in ``$OOD_RAY_ALLOW_PIPE`` (separated by ``;``), or any command when it is ``*``.
ALLOW_PIPE_ENV = "OOD_RAY_ALLOW_PIPE"
DEFAULT_READ_CMD = "aws s3 cp --only-show-errors {url} -"
_SHELL_SPECIAL = set("$`\\'\"\n\r;&|<>(){}*?[]!#~")


def check_read_template(template: str) -> None:
    """A read command template must be plain words with ``{url}`` as one of them: no shell syntax."""
    words = template.split()
    if not words or "{url}" not in words or any(set(w.replace("{url}", "")) & _SHELL_SPECIAL for w in words):
        raise DataError(
            f"read command {template!r}: use plain words with {{url}} as one of them "
            "(no quotes, pipes, redirections, ';', '$' or globs), e.g. 'aws s3 cp {url} -'"
        )


def allowed_read_templates() -> list[str] | None:
    """The allowed ``pipe:`` command templates; None when any command is allowed (``*``).

    A template in ``$OOD_RAY_ALLOW_PIPE`` that is not plain words is an error naming it, not
    silently ignored."""
    extra = [t.strip() for t in os.environ.get(ALLOW_PIPE_ENV, "").split(";") if t.strip()]
    if "*" in extra:
        return None
    for template in extra:
        try:
            check_read_template(template)
        except DataError as e:
            raise DataError(f"{ALLOW_PIPE_ENV}: {e}") from None
    return [DEFAULT_READ_CMD, *extra]


def pipe_allowed(command: str, templates: list[str] | None) -> bool:
    """Whether ``command`` (a ``pipe:`` URL without the prefix) is an instance of one of the
    (checked) ``templates``; any command when ``templates`` is None (see ``ALLOW_PIPE_ENV``)."""
    import shlex

    if templates is None:
        return True
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    for template in templates:
        parts = template.split()
        if len(parts) != len(words):
            continue
        url = words[parts.index("{url}")]
        if url and not url.startswith("-") and command == template.format(url=shlex.quote(url)):
            return True
    return False


def check_pipes(manifest_shards, where: str) -> None:
    """Refuse a manifest whose ``pipe:`` URLs would run commands that are not allowed."""
    pipes = [(i, s.url[len("pipe:") :]) for i, s in enumerate(manifest_shards) if s.url.startswith("pipe:")]
    templates = allowed_read_templates() if pipes else None
    for i, command in pipes:
        if not pipe_allowed(command, templates):
            raise DataError(
                f"{where}: shards[{i}].url would run the shell command {command!r}; a manifest is data, "
                f"so its pipe: commands run only when they match an allowed template: set {ALLOW_PIPE_ENV} to the "
                f"read command that wrote them (e.g. 'gsutil cat {{url}}'; several separated by ';'), or to '*' for "
                "manifests you trust"
            )


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "pipe:", "s3://", "gs://"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, default_name: str, what: str) -> tuple[Path, object]:
    """Read ``path`` (or ``path/default_name`` for a folder) as JSON, with errors naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (a JSON {what} was expected)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


@dataclass
class ShardInfo:
    url: str
    count: int
    sha256: str | None = None
    classes: list[int] | None = None  # ID sets: samples per class in this shard (the class histogram)


@dataclass
class Manifest:
    name: str
    role: str
    image_size: tuple[int, int]
    mode: str
    shards: list[ShardInfo]
    class_names: list[str] = field(default_factory=list)
    group: str | None = None
    encoding: str = "png"
    description: str = ""
    format_version: int = FORMAT_VERSION
    shuffle_seed: int | None = None  # the samples were written in the order of this seeded shuffle (None: source order)
    path: str | None = None  # where the manifest was read from; not serialized

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return MODES[self.mode]

    @property
    def is_ood(self) -> bool:
        return self.role in OOD_ROLES

    def urls(self) -> list[str]:
        """Shard URLs, relative local paths resolved against the manifest's directory."""
        base = Path(self.path).parent if self.path else Path.cwd()
        out = []
        for s in self.shards:
            if is_remote(s.url) or os.path.isabs(s.url):
                out.append(s.url)
            else:
                out.append(str((base / s.url).resolve()))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("path")
        if d["shuffle_seed"] is None:  # optional keys are left out when unknown
            d.pop("shuffle_seed")
        for shard in d["shards"]:
            if shard["classes"] is None:
                shard.pop("classes")
        d["image_size"] = list(self.image_size)
        d["num_samples"] = self.num_samples
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.path = str(path.resolve())
        return path

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> Manifest:
        where = path or "<manifest>"
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
        required = ("name", "role", "image_size", "mode", "shards")
        missing = [k for k in required if k not in d]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__ if f != "path"} | {"num_samples"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}")
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where}: format_version {version!r} is not supported (this ood_ray reads {FORMAT_VERSION})"
            )
        if d["role"] not in ROLES:
            raise DataError(f"{where}: role {d['role']!r} is not one of {', '.join(ROLES)}")
        if d["mode"] not in MODES:
            raise DataError(f"{where}: mode {d['mode']!r} is not one of {', '.join(MODES)}")
        size = d["image_size"]
        if (
            not isinstance(size, list | tuple)
            or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65536 for v in size)
        ):
            raise DataError(f"{where}: image_size must be [height, width], ints in [1, 65536], got {size!r}")
        group = d.get("group")
        if group is not None and group not in GROUPS:
            raise DataError(f"{where}: group {group!r} is not one of {', '.join(GROUPS)}")
        shards = []
        if not isinstance(d["shards"], list) or not d["shards"]:
            raise DataError(f"{where}: 'shards' must be a non-empty list")
        for i, s in enumerate(d["shards"]):
            if not isinstance(s, dict) or "url" not in s or "count" not in s:
                raise DataError(f"{where}: shards[{i}] needs 'url' and 'count'")
            if not isinstance(s["url"], str) or not s["url"].strip() or "\x00" in s["url"]:
                raise DataError(f"{where}: shards[{i}].url must be a non-empty string, got {s['url']!r}")
            if not isinstance(s["count"], int) or isinstance(s["count"], bool) or not 0 <= s["count"] <= MAX_SHARD_SAMPLES:
                raise DataError(f"{where}: shards[{i}].count must be an int in [0, {MAX_SHARD_SAMPLES}], got {s['count']!r}")
            hist = s.get("classes")
            if hist is not None and (
                not isinstance(hist, list)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in hist)
                or sum(hist) != s["count"]
            ):
                raise DataError(f"{where}: shards[{i}].classes must be a list of counts per class summing to its count {s['count']}")
            shards.append(ShardInfo(url=s["url"], count=s["count"], sha256=s.get("sha256"), classes=hist))
        class_names = d.get("class_names", [])
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            raise DataError(f"{where}: class_names must be a list of strings, got {class_names!r}"[:300])
        encoding = d.get("encoding", "png")
        if encoding not in ENCODINGS:
            raise DataError(f"{where}: encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
        if d["role"] in ID_ROLES and not class_names:
            raise DataError(f"{where}: role {d['role']!r} needs class_names")
        for i, sh in enumerate(shards):
            if sh.classes is not None and len(sh.classes) != len(class_names):
                raise DataError(f"{where}: shards[{i}].classes has {len(sh.classes)} counts for {len(class_names)} classes")
        seed = d.get("shuffle_seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise DataError(f"{where}: shuffle_seed must be a non-negative int or null, got {seed!r}")
        m = cls(
            name=d["name"],
            role=d["role"],
            image_size=(size[0], size[1]),
            mode=d["mode"],
            shards=shards,
            class_names=class_names,
            group=group,
            encoding=encoding,
            description=d.get("description", ""),
            format_version=version,
            shuffle_seed=seed,
            path=path,
        )
        if "num_samples" in d and d["num_samples"] != m.num_samples:
            raise DataError(
                f"{where}: num_samples {d['num_samples']} != sum of shard counts {m.num_samples}"
            )
        return m

    @classmethod
    def load(cls, path: str | Path, verify: bool = False) -> Manifest:
        path, d = read_json(path, "manifest.json", "manifest")
        m = cls.from_dict(d, path=str(path.resolve()))
        check_pipes(m.shards, m.path)
        if verify:
            m.verify()
        return m

    def commands(self) -> list[str]:
        """The shell commands this manifest's ``pipe:`` URLs run (``ood-ray data verify`` lists them)."""
        return [u[len("pipe:") :] for u in self.urls() if u.startswith("pipe:")]

    def verify(self) -> None:
        """Check that local shards exist and match their recorded sha256.

        Remote shards (http, pipe:) are not fetched here; the stream checks their contents.
        """
        where = self.path or self.name
        for info, url in zip(self.shards, self.urls(), strict=True):
            if is_remote(url):
                continue
            if not os.path.exists(url):
                raise DataError(f"{where}: shard {url} does not exist")
            if info.sha256 is not None:
                got = sha256_file(url)
                if got != info.sha256:
                    raise DataError(
                        f"{where}: shard {url} has sha256 {got}, manifest says {info.sha256} "
                        "(the file changed or is truncated; rebuild the shards)"
                    )


@dataclass
class Benchmark:
    """The data of one training run: ID splits, auxiliary outliers, val/test OOD sets."""

    name: str
    train: Manifest
    val: Manifest
    test: Manifest
    outlier: Manifest | None = None
    ood_val: dict[str, Manifest] = field(default_factory=dict)
    ood_test: dict[str, Manifest] = field(default_factory=dict)
    path: str | None = None

    def all_manifests(self) -> list[Manifest]:
        ms = [self.train, self.val, self.test]
        if self.outlier is not None:
            ms.append(self.outlier)
        return ms + list(self.ood_val.values()) + list(self.ood_test.values())

    def digest(self) -> str:
        """sha256 of every manifest's content (not its location): equal for a copied or moved
        benchmark, different when any shard, count, class or set changes."""
        spec = [m.to_dict() for m in self.all_manifests()]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def to_spec(self) -> dict:
        """Everything needed to read this benchmark, as plain data: workers on other nodes get it in
        their config and never read benchmark.json or the manifests themselves (only the shards)."""
        def one(m: Manifest) -> dict:
            return {**m.to_dict(), "path": m.path}

        return {
            "name": self.name,
            "path": self.path,
            "train": one(self.train),
            "val": one(self.val),
            "test": one(self.test),
            "outlier": one(self.outlier) if self.outlier is not None else None,
            "ood_val": {k: one(m) for k, m in self.ood_val.items()},
            "ood_test": {k: one(m) for k, m in self.ood_test.items()},
        }

    @classmethod
    def from_spec(cls, spec: dict) -> Benchmark:
        def one(d: dict) -> Manifest:
            d = dict(d)
            path = d.pop("path", None)
            return Manifest.from_dict(d, path=path)

        return cls(
            name=spec["name"],
            train=one(spec["train"]),
            val=one(spec["val"]),
            test=one(spec["test"]),
            outlier=one(spec["outlier"]) if spec.get("outlier") else None,
            ood_val={k: one(d) for k, d in spec.get("ood_val", {}).items()},
            ood_test={k: one(d) for k, d in spec.get("ood_test", {}).items()},
            path=spec.get("path"),
        )

    @classmethod
    def load(cls, path: str | Path, verify: bool = False) -> Benchmark:
        path, d = read_json(path, "benchmark.json", "benchmark spec")
        base = path.parent

        def load_manifest(key: str, rel: str, role: str) -> Manifest:
            p = Path(rel) if os.path.isabs(rel) else base / rel
            m = Manifest.load(p, verify=verify)
            if m.role != role:
                raise DataError(f"{path}: {key} points to {p} whose role is {m.role!r}, expected {role!r}")
            return m

        for key in ("train", "val", "test"):
            if key not in d:
                raise DataError(f"{path}: missing key {key!r}")
        b = cls(
            name=d.get("name", base.name),
            train=load_manifest("train", d["train"], "train"),
            val=load_manifest("val", d["val"], "val"),
            test=load_manifest("test", d["test"], "test"),
            outlier=load_manifest("outlier", d["outlier"], "outlier") if d.get("outlier") else None,
            ood_val={k: load_manifest(f"ood_val.{k}", v, "ood-val") for k, v in d.get("ood_val", {}).items()},
            ood_test={k: load_manifest(f"ood_test.{k}", v, "ood-test") for k, v in d.get("ood_test", {}).items()},
            path=str(path.resolve()),
        )
        ref = b.train
        for m in b.all_manifests():
            if (m.image_size, m.mode) != (ref.image_size, ref.mode):
                raise DataError(
                    f"{m.path}: images are {m.mode} {list(m.image_size)}, but the training set "
                    f"{ref.path} is {ref.mode} {list(ref.image_size)}"
                )
            if m.role in ID_ROLES and m.class_names != ref.class_names:
                raise DataError(f"{m.path}: class_names differ from the training set {ref.path}")
        return b
