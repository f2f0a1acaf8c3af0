"""The order and augmentation of samples within one reader: interleaving shards, the shuffle
buffer, crop/flip augmentation, and grouping into chunks. Plain NumPy/torch, no I/O."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

INTERLEAVE = 32  # shards a reader has open at once while training (one mmap, or one pipe, each)
_END = object()


def augment(img: np.ndarray, rng: np.random.Generator, pad: int, hflip: bool) -> np.ndarray:
    """Random crop after zero padding by ``pad`` pixels, and an optional horizontal flip."""
    if pad > 0:
        c, h, w = img.shape
        padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=img.dtype)
        padded[:, pad : pad + h, pad : pad + w] = img
        y, x = rng.integers(0, 2 * pad + 1, size=2)
        img = padded[:, y : y + h, x : x + w]
    if hflip and rng.random() < 0.5:
        img = img[:, :, ::-1]
    return img



def augment_chunk(imgs: np.ndarray, rng: np.random.Generator, pad: int, hflip: bool) -> np.ndarray:
    """``augment`` for a whole chunk N×C×H×W at once (same distribution, one call per chunk)."""
    n, c, h, w = imgs.shape
    if pad > 0:
        padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=imgs.dtype)
        padded[:, :, pad : pad + h, pad : pad + w] = imgs
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))  # n, c, 2p+1, 2p+1, h, w
        off = rng.integers(0, 2 * pad + 1, size=(n, 2))
        imgs = windows[np.arange(n), :, off[:, 0], off[:, 1]]  # a copy, n×c×h×w
    if hflip:
        flip = rng.random(n) < 0.5
        imgs = np.where(flip[:, None, None, None], imgs[:, :, :, ::-1], imgs)
    return np.ascontiguousarray(imgs)



def shuffled(it: Iterator, buffer: int, rng: np.random.Generator) -> Iterator:
    if buffer <= 1:
        yield from it
        return
    buf = []
    for item in it:
        if len(buf) < buffer:
            buf.append(item)
            continue
        i = rng.integers(len(buf))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf



def interleave(streams: list[tuple[Iterator, int]], rng: np.random.Generator, group: int = INTERLEAVE) -> Iterator:
    """Merge ``(iterator, expected length)`` streams in a uniformly random order that keeps each
    stream's own order, ``group`` streams at a time (a stream is opened at its first sample).

    Every stream is read to its end, so a reader's own end-of-stream checks still run; a stream
    shorter than expected just ends early."""
    for g in range(0, len(streams), group):
        part = streams[g : g + group]
        its = [it for it, _ in part]
        for i in rng.permutation(np.repeat(np.arange(len(part)), [max(int(n), 0) for _, n in part])):
            item = next(its[i], _END)
            if item is not _END:
                yield item
        for it in its:
            yield from it


_END = object()



def chunked(samples: Iterator, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    imgs, labels, keys = [], [], []
    for img, label, key in samples:
        imgs.append(img)
        labels.append(label)
        keys.append(key)
        if len(imgs) == size:
            yield torch.from_numpy(np.stack(imgs)), torch.tensor(labels, dtype=torch.int64), keys
            imgs, labels, keys = [], [], []
    if imgs:
        yield torch.from_numpy(np.stack(imgs)), torch.tensor(labels, dtype=torch.int64), keys


