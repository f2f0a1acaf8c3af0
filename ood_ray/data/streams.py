"""Per-rank streams of batches read from WebDataset shards.

How an epoch is split across ``world`` ranks (the rule the README documents):

1. The shard list is shuffled with a seed derived from ``(seed, epoch)``; every rank computes the
   same order from the manifest alone, without talking to the others.
2. Whole rounds of ``world`` shards are dealt out one shard per rank. The remaining
   ``n_shards % world`` shards are read by every rank, each keeping every ``world``-th sample
   (sample ``j`` of the remainder goes to rank ``j % world``).
3. Each sample of the epoch is therefore seen at most once, by exactly one rank. Every rank yields
   exactly ``n_batches = min_r(samples of rank r) // batch_size`` full batches, so DDP never waits on
   a rank that ran out; the few samples beyond that (the difference between ranks plus a partial
   batch) are skipped this epoch and, because step 1 reshuffles, are different ones next epoch.

Within a rank, training reads local shards in place, in one seeded permutation of every sample
the reader keeps (memory-mapped, through an index of each shard's members), so the order does not
depend on how the shards were written, even shards written class by class. Remote shards are
streamed: up to ``sampling.INTERLEAVE`` at once, interleaved (the next sample comes from shard
``i`` with probability proportional to the samples it has left), then through a seeded shuffle
buffer. Samples are then decoded and checked against the manifest
(image present, size and mode, label in range), augmented, and grouped into uint8 batches. With
``loader_workers > 0`` decoding runs in DataLoader worker processes, which split the rank's shards.

Bad data fails fast by default: a ``DataError`` names the shard URL and the sample key. With
``set_skip_bad_samples(True)`` (the ``skip_bad_samples`` config key) an undecodable or mislabelled
sample is skipped, and an unreadable shard (corrupt, truncated, shorter than its manifest) is read up
to the damage and its missing samples are skipped; every skip is logged with its reason and counted
per set (``take_skipped``). A rank then may run out of batches before the planned count; the training
loop stops the epoch on every rank when the first one does (see ``ood_ray.engine.distributed``).

Outlier streams repeat the rank's share forever (pass 0, 1, ...), reshuffled on every pass, so
ranks never share an outlier image. Evaluation streams use
the same split without shuffling and without dropping anything (ranks may differ by one batch).
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .manifest import OOD_LABEL, DataError, Manifest, is_remote
from .sampling import augment_chunk, chunked, interleave, shuffled
from .tar import local_tar_index, local_tar_samples

CHUNK = 32  # samples per message from a DataLoader worker to the training process
LOG_SKIPS = 20  # skipped samples logged one by one per stream; later ones are only counted
DECODED_CACHE_MB = 64  # per process: sets whose decoded images fit are decoded once, then served from memory

log = logging.getLogger("ood_ray.data")
_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}  # what PIL must find in a field of that name
_policy = {"skip_bad_samples": False}
_skipped: dict[str, int] = {}
_decoded: dict[tuple, list[tuple[np.ndarray, int, str]]] = {}  # (url, size, mtime, encoding, shape, mode) -> samples


def set_skip_bad_samples(enabled: bool) -> None:
    """Process-wide: skip and count bad samples (True) or fail on the first one (False, default)."""
    _policy["skip_bad_samples"] = bool(enabled)


def take_skipped() -> dict[str, int]:
    """Samples skipped per set name since the last call (this process and its loader workers)."""
    out = dict(_skipped)
    _skipped.clear()
    return out


@dataclass(frozen=True)
class ShardTask:
    """One shard a rank reads: keep all samples, or those whose remainder index j has j % world == rank."""

    url: str
    count: int
    offset: int | None = None  # index of the shard's first sample within the remainder shards
    world: int = 1
    rank: int = 0

    def keeps(self, j: int) -> bool:
        return self.offset is None or (self.offset + j) % self.world == self.rank

    def kept(self) -> int:
        return self.kept_between(0, self.count)

    def kept_between(self, start: int, stop: int) -> int:
        """How many of the shard's samples ``start <= j < stop`` this rank keeps (O(1))."""
        if self.offset is None:
            return max(stop - start, 0)

        def upto(n: int) -> int:  # k in [0, n) with k % world == rank
            return max((n - self.rank + self.world - 1) // self.world, 0)

        return max(upto(self.offset + stop) - upto(self.offset + start), 0)


class ShardLengthError(DataError):
    """A shard holds another number of samples than its manifest says."""

    def __init__(self, message: str, found: int, expected: int):
        super().__init__(message)
        self.found, self.expected = found, expected


def plan_epoch(manifest: Manifest, rank: int, world: int, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> list[ShardTask]:
    """The shards rank ``rank`` reads in ``epoch`` (see the module docstring)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
    urls = manifest.urls()
    order = epoch_order(len(urls), epoch, seed, shuffle)
    n_full = (len(order) // world) * world
    tasks = [ShardTask(urls[i], manifest.shards[i].count) for i in order[rank:n_full:world]]
    offset = 0
    for i in order[n_full:]:
        count = manifest.shards[i].count
        tasks.append(ShardTask(urls[i], count, offset=offset, world=world, rank=rank))
        offset += count
    return tasks


def epoch_order(n_shards: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The shard order of ``epoch`` (the same on every rank)."""
    return np.random.default_rng([seed, epoch, 7]).permutation(n_shards) if shuffle else np.arange(n_shards)


def samples_per_rank(manifest: Manifest, world: int, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> list[int]:
    """Samples each rank reads in ``epoch``: what ``plan_epoch`` gives, counted in O(shards)."""
    counts = np.fromiter((s.count for s in manifest.shards), dtype=np.int64, count=len(manifest.shards))[epoch_order(len(manifest.shards), epoch, seed, shuffle)]
    n_full = (len(counts) // world) * world
    rest = int(counts[n_full:].sum())  # remainder shards: sample j goes to rank j % world
    return [int(counts[r:n_full:world].sum()) + max((rest - r + world - 1) // world, 0) for r in range(world)]


def batches_per_epoch(manifest: Manifest, world: int, batch_size: int, epoch: int = 0, seed: int = 0) -> int:
    """Full batches every rank yields in ``epoch`` (identical on all ranks)."""
    n = min(samples_per_rank(manifest, world, epoch, seed)) // batch_size
    if n == 0:
        raise DataError(
            f"{manifest.path or manifest.name}: {manifest.num_samples} samples are too few for "
            f"{world} workers x batch {batch_size} per worker"
        )
    return n


def read_shard(task: ShardTask) -> Iterator[dict]:
    """Samples of one shard (grouped by key), checking the count against the manifest."""
    n = 0
    if is_remote(task.url):
        samples = wds.tariterators.tarfile_samples([{"url": task.url}], handler=wds.reraise_exception)
    else:
        samples = local_tar_samples(task.url)
    try:
        for sample in samples:
            if n < task.count and task.keeps(n):  # samples beyond the manifest's count are not used
                yield sample
            n += 1
    except DataError:
        raise
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        raise DataError(f"shard {task.url}: cannot read ({type(e).__name__}: {e})") from e
    if n != task.count:
        raise ShardLengthError(
            f"shard {task.url}: holds {n} samples, the manifest says {task.count} "
            "(truncated or replaced shard?)",
            n,
            task.count,
        )


def decode_sample(sample: dict, manifest: Manifest) -> tuple[np.ndarray, int, str]:
    """(uint8 C×H×W image, label, key) with every field checked against the manifest."""
    key = sample.get("__key__", "?")
    where = f"shard {sample.get('__url__', '?')}, sample {key!r}"
    enc = manifest.encoding
    if enc not in sample:
        fields = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"{where}: no '{enc}' image (fields: {', '.join(fields) or 'none'})")
    if "cls" not in sample:
        raise DataError(f"{where}: no 'cls' label")
    try:
        label = int(sample["cls"])
    except ValueError:
        raise DataError(f"{where}: 'cls' is not an integer: {sample['cls'][:20]!r}") from None
    if manifest.is_ood:
        if label != OOD_LABEL:
            raise DataError(f"{where}: label {label} in an outlier/OOD set (expected {OOD_LABEL})")
    elif not 0 <= label < manifest.num_classes:
        raise DataError(f"{where}: label {label} outside the manifest's {manifest.num_classes} classes")
    h, w = manifest.image_size
    c = manifest.channels
    data = sample[enc]
    if enc == "raw":
        arr = np.frombuffer(data, dtype=np.uint8)
        if arr.size != h * w * c:
            raise DataError(f"{where}: raw image has {arr.size} bytes, expected {h}x{w}x{c}")
        arr = arr.reshape(h, w, c)
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format != _FORMATS.get(enc, im.format):
                    raise DataError(f"{where}: '{enc}' field holds {im.format or 'unknown'} data")
                if im.mode != manifest.mode:  # checked from the header, before decoding the pixels
                    raise DataError(f"{where}: image mode {im.mode}, manifest says {manifest.mode}")
                if im.size != (w, h):
                    raise DataError(f"{where}: image is {im.size[1]}x{im.size[0]}, manifest says {h}x{w}")
                im.load()
                arr = np.asarray(im, dtype=np.uint8)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), label, key


class RankShards(IterableDataset):
    """Chunks ``(images uint8 N×C×H×W, labels int64 N, keys)`` of one rank's share of one pass."""

    def __init__(
        self,
        manifest: Manifest,
        rank: int,
        world: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        augment_pad: int = 0,
        hflip: bool = False,
        repeat: bool = False,
        chunk: int = CHUNK,
        cache_mb: float = DECODED_CACHE_MB,
    ):
        self.manifest = manifest
        self.rank, self.world = rank, world
        self.seed, self.epoch = seed, epoch
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.augment_pad, self.hflip = augment_pad, hflip
        self.repeat, self.chunk = repeat, chunk
        self.skip_bad = _policy["skip_bad_samples"]  # travels with the dataset into loader workers
        self.skipped = self.logged_skips = 0
        c, (h, w) = manifest.channels, manifest.image_size
        self.cache = not self.skip_bad and manifest.num_samples * c * h * w <= cache_mb * 2**20

    def plan(self) -> list[ShardTask]:
        return plan_epoch(self.manifest, self.rank, self.world, self.epoch, self.seed, self.shuffle)

    def _skip(self, n: int, why: str) -> None:
        self.skipped += n
        self.logged_skips += 1
        if self.logged_skips <= LOG_SKIPS:
            log.warning("skip_bad_samples: %s (%d sample(s) of %s skipped)", why, n, self.manifest.name)
        elif self.logged_skips == LOG_SKIPS + 1:
            log.warning("skip_bad_samples: more skips in %s are counted but not logged", self.manifest.name)

    def _read(self, tasks: list[ShardTask]) -> Iterator[dict]:
        for t in tasks:
            yield from self._read_one(t)

    def _read_one(self, t: ShardTask) -> Iterator[dict]:
        if not self.skip_bad:
            yield from read_shard(t)
            return
        kept = 0
        try:
            for sample in read_shard(t):
                kept += 1
                yield sample
        except DataError as e:  # the rest of this shard is lost; count what the manifest promised
            extra = t.kept_between(e.expected, e.found) if isinstance(e, ShardLengthError) else 0  # samples beyond its count
            self._skip(max(t.kept() - kept, 0) + extra, str(e))

    def _read_permuted(self, tasks: list[ShardTask], rng: np.random.Generator) -> Iterator[dict]:
        """Every sample this reader keeps of local ``tasks``, in one seeded permutation, read in
        place from the memory-mapped shards (an index of about 200 bytes per sample is all it
        holds): the order does not depend on how the shards were written."""
        bufs, index, refs = [], [], []
        try:
            for ti, t in enumerate(tasks):
                try:
                    buf, entries, error = local_tar_index(t.url)
                except OSError as e:
                    buf, entries, error = b"", [], e
                bufs.append(buf)
                n = len(entries)
                if error is not None or n != t.count:
                    why = (f"shard {t.url}: cannot read ({type(error).__name__}: {error})" if error is not None
                           else f"shard {t.url}: holds {n} samples, the manifest says {t.count} (truncated or replaced shard?)")  # fmt: skip
                    if not self.skip_bad:
                        raise DataError(why) if error is not None else ShardLengthError(why, n, t.count)
                    lost = t.kept() - t.kept_between(0, min(n, t.count)) + (t.kept_between(t.count, n) if n > t.count else 0)
                    self._skip(lost, why)
                js = np.arange(min(n, t.count))
                if t.offset is not None:
                    js = js[(t.offset + js) % t.world == t.rank]
                index.append(entries)
                refs.append(np.stack([np.full(len(js), ti), js], axis=1))
            order = np.concatenate(refs) if refs else np.empty((0, 2), dtype=np.int64)
            for ti, j in order[rng.permutation(len(order))]:
                key, spans = index[ti][j]
                buf = bufs[ti]
                yield {"__key__": key, "__url__": tasks[ti].url, **{k: bytes(buf[a : a + size]) for k, (a, size) in spans.items()}}
        finally:
            for buf in bufs:
                if not isinstance(buf, bytes):
                    buf.close()

    def _read_decoded(self, tasks: list[ShardTask]) -> Iterator[tuple[np.ndarray, int, str]]:
        """Decoded samples of ``tasks`` from this process's cache; a shard's first read fills it.

        A shard is read in full (also the samples another rank keeps) and kept only when read to
        its end, keyed by URL, size and mtime, so a replaced shard is read again.
        """
        m = self.manifest
        for t in tasks:
            try:
                st = os.stat(t.url) if not is_remote(t.url) else None
            except OSError:
                st = None
            key = (t.url, st and st.st_size, st and st.st_mtime_ns, m.encoding, tuple(m.image_size), m.mode)
            entries = _decoded.get(key)
            if entries is not None:
                yield from (e for j, e in enumerate(entries) if t.keeps(j))
                continue
            entries = []
            for j, s in enumerate(read_shard(ShardTask(t.url, t.count))):
                entries.append(decode_sample(s, m))
                if t.keeps(j):
                    yield entries[-1]
            _decoded[key] = entries

    def _samples(self, pass_: int, wid: int, nworkers: int) -> Iterator[tuple[np.ndarray, int, str]]:
        """Decoded samples in shuffled order; with skipping on, bad ones are counted in ``skipped`` instead."""
        tasks = self.plan()[wid::nworkers]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid, pass_, 11])
        if pass_ > 0:  # an endless stream keeps its shards and reorders them on every pass
            tasks = [tasks[i] for i in rng.permutation(len(tasks))]
        if self.cache:
            samples = self._read_decoded(tasks)
            if not self.shuffle:
                yield from samples
                return
            held = list(samples)  # all in memory already: one full permutation
            yield from (held[i] for i in rng.permutation(len(held)))
            return
        if self.shuffle and tasks and not any(is_remote(t.url) for t in tasks):
            raw = self._read_permuted(tasks, rng)
        elif self.shuffle:
            raw = shuffled(interleave([(self._read_one(t), t.kept()) for t in tasks], rng), self.shuffle_buffer, rng)
        else:
            raw = self._read(tasks)
        for s in raw:
            try:
                yield decode_sample(s, self.manifest)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self._skip(1, str(e))

    def __iter__(self):
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        pass_ = 0
        shape = (self.manifest.channels, *self.manifest.image_size)
        while True:
            produced = 0
            # augmentation draws from its own generator, one call per chunk
            aug_rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid, pass_, 13])
            for imgs, labels, keys in chunked(self._samples(pass_, wid, nworkers), self.chunk):
                if self.augment_pad or self.hflip:
                    imgs = torch.from_numpy(augment_chunk(imgs.numpy(), aug_rng, self.augment_pad, self.hflip))
                produced += len(labels)
                yield imgs, labels, keys, self._take()
            if self.skipped:  # skips after the last full chunk still reach the counter
                yield torch.empty((0, *shape), dtype=torch.uint8), torch.empty(0, dtype=torch.int64), [], self._take()
            if not self.repeat:
                return
            if not produced:
                raise DataError(f"{self.manifest.path or self.manifest.name}: rank {self.rank} reader {wid} has no samples to repeat")
            pass_ += 1

    def _take(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


def rebatch(chunks, batch_size: int, n_batches: int | None, drop_last: bool, name: str = "?", skipping: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Regroup chunks into batches of exactly ``batch_size``, stopping after ``n_batches``.

    Chunks carry the number of samples their reader skipped; it is added to ``take_skipped()``'s
    count of set ``name``. With ``skipping`` a short stream ends quietly instead of raising.
    """
    xs, ys, ks, have, done = [], [], [], 0, 0
    for x, y, k, skipped in chunks:
        if skipped:
            _skipped[name] = _skipped.get(name, 0) + int(skipped)
        xs.append(x)
        ys.append(y)
        ks.extend(k)
        have += len(y)
        while have >= batch_size:
            X, Y = torch.cat(xs), torch.cat(ys)
            yield X[:batch_size], Y[:batch_size], ks[:batch_size]
            done += 1
            if n_batches is not None and done >= n_batches:
                return
            xs, ys, ks, have = [X[batch_size:]], [Y[batch_size:]], ks[batch_size:], have - batch_size
    if have and not drop_last:
        yield torch.cat(xs), torch.cat(ys), ks
    elif n_batches is not None and done < n_batches and not skipping:
        raise DataError(f"{name}: stream ended after {done} of {n_batches} batches (a shard is shorter than its manifest says)")


def _loader(ds: RankShards, loader_workers: int):
    workers = min(loader_workers, len(ds.plan()))  # no reader without a shard
    if ds.cache:  # served from memory after its first read: a worker would only add its fork and IPC
        workers = 0
    if workers <= 0:
        return iter(ds)
    return _plain_errors(iter(DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False, prefetch_factor=4)))


_WRAPPED = "\nood_ray.data.manifest.DataError: "


def _plain_errors(batches):
    """A DataError raised in a loader worker, with its own message instead of the worker's traceback."""
    try:
        yield from batches
    except DataError as e:
        text = str(e)
        i = text.rfind(_WRAPPED)
        if i < 0:
            raise
        raise DataError(text[i + len(_WRAPPED) :].rstrip("\n")) from None


def train_batches(
    manifest: Manifest,
    rank: int,
    world: int,
    batch_size: int,
    epoch: int,
    *,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    augment_pad: int = 0,
    hflip: bool = False,
    loader_workers: int = 0,
    cache_mb: float = DECODED_CACHE_MB,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Exactly ``batches_per_epoch(...)`` batches of this rank's share of ``epoch``."""
    n = batches_per_epoch(manifest, world, batch_size, epoch, seed)
    ds = RankShards(manifest, rank, world, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, augment_pad=augment_pad, hflip=hflip, cache_mb=cache_mb)
    return rebatch(_loader(ds, loader_workers), batch_size, n, drop_last=True, name=manifest.name, skipping=ds.skip_bad)


def outlier_batches(
    manifest: Manifest,
    rank: int,
    world: int,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle_buffer: int = 1000,
    augment_pad: int = 0,
    hflip: bool = False,
    loader_workers: int = 0,
    cache_mb: float = DECODED_CACHE_MB,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """An endless stream of outlier batches; each rank reads a different part of the set."""
    seed += 1  # outliers are ordered independently of the ID stream
    if min(samples_per_rank(manifest, world, epoch, seed)) == 0:
        raise DataError(f"{manifest.path or manifest.name}: too few outlier samples for {world} workers")
    ds = RankShards(manifest, rank, world, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, augment_pad=augment_pad, hflip=hflip, repeat=True, cache_mb=cache_mb)
    return rebatch(_loader(ds, loader_workers), batch_size, None, drop_last=True, name=manifest.name, skipping=ds.skip_bad)


def eval_batches(manifest: Manifest, rank: int, world: int, batch_size: int, loader_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """This rank's share of a whole split, every sample exactly once over all ranks, in order."""
    ds = RankShards(manifest, rank, world, shuffle=False)
    return rebatch(_loader(ds, loader_workers), batch_size, None, drop_last=False, name=manifest.name, skipping=ds.skip_bad)

