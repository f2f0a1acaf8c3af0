"""Reading local WebDataset tar shards: the members of a tar file, grouped into samples by key.

A direct walk over the 512-byte headers of a memory-mapped file (ustar, GNU long names, pax
headers); remote shards go through webdataset's own reader (``streams.read_shard``).
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator

_TAR_META = re.compile(r"__[^/]*__($|/)")
_TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _tar_int(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        v = int.from_bytes(field[1:], "big")
        return v - (1 << (8 * (len(field) - 1))) if field[0] & 0x40 else v
    s = field.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        k, _, v = data[sp + 1 : pos + length - 1].partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


def tar_members(buf) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an uncompressed ustar/pax/GNU tar held in ``buf``."""
    for name, start, size in tar_spans(buf):
        yield name, bytes(buf[start : start + size])


def tar_spans(buf) -> Iterator[tuple[str, int, int]]:
    """(name, start, size) of the regular files of an uncompressed ustar/pax/GNU tar held in ``buf``.

    Walks the 512-byte headers directly (about 10x faster than ``tarfile``'s stream mode for small
    members); honours pax ``path``/``size`` records and GNU long names; checks every header's
    checksum; raises ``ValueError`` on a corrupt or truncated archive.
    """
    pos, end = 0, len(buf)
    pax: dict[str, str] = {}
    gpax: dict[str, str] = {}
    longname = None
    while True:
        if pos + 512 > end:
            if pos == end:
                return
            raise ValueError(f"truncated tar header at byte {pos}")
        hdr = buf[pos : pos + 512]
        if hdr.count(0) == 512:
            return
        try:
            chk, size = _tar_int(hdr[148:156]), _tar_int(hdr[124:136])
        except ValueError:
            raise ValueError(f"invalid tar header at byte {pos}") from None
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ValueError(f"bad tar header checksum at byte {pos}")
        typ = hdr[156:157]
        info = {**gpax, **pax}
        if "size" in info:
            size = int(info["size"])
        start = pos + 512
        if start + size > end:
            raise ValueError(f"truncated tar member at byte {pos}")
        pos = start + (size + 511) // 512 * 512
        if typ == b"x":
            pax = _pax(bytes(buf[start : start + size]))
            continue
        if typ == b"g":
            gpax.update(_pax(bytes(buf[start : start + size])))
            continue
        if typ == b"L":
            longname = bytes(buf[start : start + size]).split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        name = info.get("path") or longname
        if name is None:
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if hdr[257:262] == b"ustar" else ""
            name = f"{prefix}/{name}" if prefix else name
        pax, longname = {}, None
        if typ in (b"0", b"\0", b"7"):
            yield name, start, size


def local_tar_samples(path: str) -> Iterator[dict]:
    """Samples of a local tar file, grouped by key as webdataset's ``group_by_keys`` does."""
    buf = _open_mmap(path)
    try:
        current: dict | None = None
        for fname, data in tar_members(buf):
            m = _TAR_KEY.match(fname)
            if not m or _TAR_META.match(fname):
                continue
            key, suffix = m.group(1), m.group(2).lower()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": path}
            if suffix in current:
                raise ValueError(f"{fname}: duplicate file name in the tar file")
            current[suffix] = data
        if current is not None:
            yield current
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()


def _open_mmap(path: str):
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""


def local_tar_index(path: str) -> tuple[object, list[tuple[str, dict[str, tuple[int, int]]]], ValueError | None]:
    """``(buffer, samples, error)`` of a local tar file, for reading its samples in any order.

    ``samples`` holds ``(key, {suffix: (start, size)})`` in file order, grouped by key as
    ``local_tar_samples`` groups them; ``buffer`` is the memory-mapped file (the caller closes it).
    A corrupt or truncated file gives the samples before the damage and the error."""
    buf = _open_mmap(path)
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        for fname, start, size in tar_spans(buf):
            m = _TAR_KEY.match(fname)
            if not m or _TAR_META.match(fname):
                continue
            key, suffix = m.group(1), m.group(2).lower()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            if suffix in samples[-1][1]:
                raise ValueError(f"{fname}: duplicate file name in the tar file")
            samples[-1][1][suffix] = (start, size)
    except ValueError as e:
        return buf, samples[:-1] if samples else samples, e  # the last sample may be incomplete
    return buf, samples, None
