"""``skip_bad_samples``: bad samples and damaged shards are skipped and counted, never silently."""

from __future__ import annotations

import pytest
from conftest import hand_manifest, png, write_toy

from ood_ray.data import streams
from ood_ray.data.manifest import DataError
from ood_ray.data.streams import eval_batches, take_skipped, train_batches


@pytest.fixture()
def skipping():
    take_skipped()
    streams.set_skip_bad_samples(True)
    yield
    streams.set_skip_bad_samples(False)
    take_skipped()


def keys_of(batches) -> list[str]:
    return [k for _, _, ks in batches for k in ks]


GOOD = {f"g{i}.{ext}": png() if ext == "png" else b"1" for i in range(3) for ext in ("png", "cls")}


@pytest.mark.parametrize(
    "bad",
    [
        {"b.cls": b"0"},  # no image
        {"b.png": png()},  # no label
        {"b.png": png(), "b.cls": b"7"},  # label out of range
        {"b.png": png(), "b.cls": b"x"},  # label not an integer
        {"b.png": b"\x89PNG broken", "b.cls": b"0"},  # undecodable
        {"b.png": png((9, 8)), "b.cls": b"0"},  # size mismatch
        {"b.png": png(mode="RGB"), "b.cls": b"0"},  # mode mismatch
    ],
)
def test_bad_sample_is_skipped_and_counted(tmp_path, skipping, bad):
    m = hand_manifest(tmp_path, {**GOOD, **bad}, count=4)
    assert sorted(keys_of(eval_batches(m, 0, 1, 2))) == ["g0", "g1", "g2"]
    assert take_skipped() == {"s": 1}
    assert take_skipped() == {}  # counted once


def test_without_skipping_the_same_sample_fails_naming_it(tmp_path):
    m = hand_manifest(tmp_path, {**GOOD, "b.png": png(), "b.cls": b"7"}, count=4)
    with pytest.raises(DataError, match=r"s-000000.tar, sample 'b': label 7"):
        keys_of(eval_batches(m, 0, 1, 2))


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2 + 100],  # truncated
        lambda data: b"\x00garbage" * 300,  # not a tar
        lambda data: b"",  # empty
    ],
    ids=["truncated", "corrupt", "empty"],
)
@pytest.mark.parametrize("loader_workers", [0, 1])
def test_damaged_shard_loses_only_its_samples(tmp_path, skipping, damage, loader_workers):
    m = write_toy(tmp_path, n=40, maxcount=10)
    p = tmp_path / "toy-000002.tar"
    p.write_bytes(damage(p.read_bytes()))
    got = keys_of(eval_batches(m, 0, 1, 7, loader_workers=loader_workers))
    skipped = take_skipped()["toy"]
    assert len(got) == len(set(got)) and len(got) + skipped == 40
    assert 1 <= skipped <= 10  # at most the damaged shard's samples
    assert {f"{i:07d}" for i in (*range(20), *range(30, 40))} <= set(got)  # the other shards are intact


def test_short_rank_stream_ends_quietly_when_skipping(tmp_path, skipping):
    # the planned batch count assumes 40 good samples; a lost shard makes the stream shorter
    m = write_toy(tmp_path, n=40, maxcount=10)
    (tmp_path / "toy-000001.tar").write_bytes(b"")
    batches = list(train_batches(m, 0, 1, 8, epoch=0))
    assert len(batches) == 3 and take_skipped() == {"toy": 10}
    streams.set_skip_bad_samples(False)
    with pytest.raises(DataError, match="toy-000001.tar"):
        list(train_batches(m, 0, 1, 8, epoch=0))


@pytest.mark.parametrize("world", [1, 2])
def test_extra_samples_in_an_overlong_shard_are_bad_samples(tmp_path, skipping, world):
    """A shard holding more samples than its manifest says: the extra ones are skipped and counted
    (the plan, and so every rank's batch count, rests on the manifest's counts)."""
    import shutil

    m = write_toy(tmp_path / "a", n=30, maxcount=10)
    big = write_toy(tmp_path / "b", n=25, maxcount=25, name="toy", seed=1)
    shutil.copy(big.urls()[0], m.urls()[1])  # shard 1 now holds 25 samples, the manifest says 10
    got, skipped = [], 0
    for rank in range(world):
        got += keys_of(eval_batches(m, rank, world, 7))
        skipped += take_skipped().get("toy", 0)
    assert skipped == 15 and len(got) == 30  # the 10 samples the manifest promised for shard 1 are read
    streams.set_skip_bad_samples(False)
    with pytest.raises(DataError, match="holds 25 samples, the manifest says 10"):
        list(eval_batches(m, 0, 1, 7))
