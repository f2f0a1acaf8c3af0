"""How well the classes of a training set are mixed across its shards.

A shard set written class by class (an image folder walked in order, a tool that groups by label)
holds one or two classes per shard. Streamed through a bounded shuffle buffer it trains a model on
one class at a time, and the last shards of an epoch decide what it predicts. The readers in
``streams`` read local shards in one permutation of all a rank's samples, so training still mixes
every class; remote shards are only interleaved and buffered. This module finds such sets so that
``ood-ray data verify`` and ``ood-ray train`` can say so, naming the shards.

A shard counts as *class-sorted* when its class histogram is far from the set's: total variation
distance above :data:`SORTED_TV` (a shard holding 2 of 10 balanced classes is at 0.8, half the classes at 0.5; a randomly
filled shard of n samples is at about ``sqrt(K / n)``). Shards with fewer than
:data:`MIN_JUDGED` samples per class are too small to judge and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .manifest import DataError, Manifest, is_remote
from .tar import local_tar_index

SORTED_TV = 0.35
MIN_JUDGED = 10  # samples per class a shard needs before its histogram is judged


@dataclass(frozen=True)
class SortedShard:
    url: str
    count: int
    present: int  # classes with at least one sample in the shard
    tv: float  # total variation distance to the set's class distribution


def shard_histograms(manifest: Manifest) -> list[list[int]] | None:
    """Samples per class of every shard: the manifest's record, else read from local shards
    (labels only); None when a shard without a record is remote."""
    if all(s.classes is not None for s in manifest.shards):
        return [list(s.classes) for s in manifest.shards]
    out = []
    k = manifest.num_classes
    for info, url in zip(manifest.shards, manifest.urls(), strict=True):
        if info.classes is not None:
            out.append(list(info.classes))
            continue
        if is_remote(url):
            return None
        hist = np.zeros(k, dtype=np.int64)
        try:
            buf, entries, error = local_tar_index(url)  # headers only: the images are not copied
        except OSError as e:
            raise DataError(f"shard {url}: cannot read its labels ({e})") from None
        try:
            if error is not None:
                raise DataError(f"shard {url}: cannot read its labels ({error})")
            for _, spans in entries[: info.count]:
                a, size = spans.get("cls", (0, 0))
                label = bytes(buf[a : a + size]).strip()
                y = int(label) if label.lstrip(b"-").isdigit() else -1
                if 0 <= y < k:
                    hist[y] += 1
        finally:
            if not isinstance(buf, bytes):
                buf.close()
        out.append(hist.tolist())
    return out


def class_sorted_shards(manifest: Manifest, hists: list[list[int]] | None = None) -> list[SortedShard]:
    """The shards of an ID set whose class mix is far from the set's (see the module docstring)."""
    if manifest.is_ood or manifest.num_classes < 2 or len(manifest.shards) < 2:
        return []
    hists = shard_histograms(manifest) if hists is None else hists
    if hists is None:
        return []
    h = np.asarray(hists, dtype=np.float64)
    total = h.sum(axis=0)
    if total.sum() == 0:
        return []
    p = total / total.sum()
    out = []
    for url, row in zip(manifest.urls(), h, strict=True):
        n = row.sum()
        if n < MIN_JUDGED * manifest.num_classes:
            continue
        tv = 0.5 * float(np.abs(row / n - p).sum())
        if tv > SORTED_TV:
            out.append(SortedShard(url, int(n), int((row > 0).sum()), tv))
    return out


def sorted_warning(manifest: Manifest, found: list[SortedShard], shown: int = 3) -> str:
    """One paragraph naming the class-sorted shards and what to do about them."""
    names = ", ".join(f"{s.url} ({s.present} of {manifest.num_classes} classes)" for s in found[:shown])
    more = f" and {len(found) - shown} more" if len(found) > shown else ""
    return (
        f"{manifest.path or manifest.name}: {len(found)} of {len(manifest.shards)} train shards are class-sorted: "
        f"{names}{more}. Local shards are read in one permutation of all their samples, so batches "
        "still mix the classes; remote (pipe:, http) shards are only interleaved and buffered, which "
        "cannot mix classes that follow one another inside a shard: rewrite them with 'ood-ray data "
        "shard' or 'ood-ray data build' (both shuffle by default)."
    )
