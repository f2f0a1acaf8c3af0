"""Shard writer, manifest validation, and clear errors for every kind of bad data."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import hand_manifest, png, write_toy
from PIL import Image

from ood_ray.data.manifest import Benchmark, DataError, Manifest
from ood_ray.data.streams import ShardTask, eval_batches, read_shard
from ood_ray.data.writer import write_array_shards, write_folder_shards, write_shards


def read_all(m: Manifest):
    return [k for _, _, ks in eval_batches(m, 0, 1, 16) for k in ks]


def test_writer_roundtrip_and_manifest(tmp_path):
    images = np.arange(25 * 64, dtype=np.int64).reshape(25, 8, 8) % 256
    write_array_shards(images.astype(np.uint8), [i % 3 for i in range(25)], tmp_path, name="x", role="train", class_names=["a", "b", "c"], maxcount=10, progress=False)
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert d["num_samples"] == 25 and [s["count"] for s in d["shards"]] == [10, 10, 5]
    assert d["role"] == "train" and d["class_names"] == ["a", "b", "c"] and d["image_size"] == [8, 8]
    assert d["format_version"] == 1 and all(len(s["sha256"]) == 64 for s in d["shards"])
    m2 = Manifest.load(tmp_path, verify=True)
    got = {k: (x, y) for x, y, k in ((x, y, k) for X, Y, K in eval_batches(m2, 0, 1, 7) for x, y, k in zip(X, Y, K, strict=False))}
    for i in range(25):
        x, y = got[f"{i:07d}"]
        assert np.array_equal(x[0].numpy(), images[i].astype(np.uint8)) and int(y) == i % 3


def test_raw_encoding_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8)
    m = write_array_shards(images, np.zeros(12, int), tmp_path, name="r", role="val", class_names=["a"], encoding="raw", image_size=(6, 5), progress=False, shuffle_seed=None)
    x = torch_cat([X for X, _, _ in eval_batches(m, 0, 1, 5)])
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), images)


def torch_cat(xs):
    import torch

    return torch.cat(xs)


def test_writer_is_deterministic(tmp_path):
    a = write_toy(tmp_path / "a", n=30)
    b = write_toy(tmp_path / "b", n=30)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_image_folder(tmp_path):
    for c, color in (("cat", 10), ("dog", 200)):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (color, i, 0)).save(tmp_path / "src" / c / f"{i}.png")
    m = write_folder_shards(tmp_path / "src", tmp_path / "out", role="train", name="pets", progress=False)
    assert m.class_names == ["cat", "dog"] and m.image_size == (10, 12) and m.num_samples == 6
    labels = [int(y) for _, Y, _ in eval_batches(m, 0, 1, 10) for y in Y]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    (tmp_path / "src" / "dog" / "odd.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="odd.png"):
        write_folder_shards(tmp_path / "src", tmp_path / "out2", role="train", name="pets", progress=False)


def test_writer_rejects_bad_labels_and_sizes(tmp_path):
    with pytest.raises(DataError, match="label 3 outside"):
        write_array_shards(np.zeros((2, 8, 8), np.uint8), [0, 3], tmp_path, name="x", role="train", class_names=["a", "b", "c"], progress=False)
    with pytest.raises(DataError, match="-1"):
        write_array_shards(np.zeros((2, 8, 8), np.uint8), [0, 1], tmp_path, name="x", role="outlier", progress=False)
    from ood_ray.data.writer import write_shards

    with pytest.raises(DataError, match="expected 8x8"):
        write_shards([("a", np.zeros((9, 8), np.uint8), 0)], tmp_path, name="x", role="train", class_names=["a"], image_size=(8, 8), mode="L", progress=False)


# --- bad shards and manifests -------------------------------------------------------------------


def test_missing_shard_file(tmp_path):
    m = write_toy(tmp_path)
    (tmp_path / "toy-000001.tar").unlink()
    with pytest.raises(DataError, match="toy-000001.tar does not exist"):
        m.verify()
    with pytest.raises(DataError, match="toy-000001.tar"):
        read_all(m)


def test_truncated_shard(tmp_path):
    m = write_toy(tmp_path)
    p = tmp_path / "toy-000002.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match="sha256"):
        Manifest.load(tmp_path, verify=True)
    with pytest.raises(DataError, match="toy-000002.tar"):
        read_all(m)


def test_corrupt_shard(tmp_path):
    m = write_toy(tmp_path)
    p = tmp_path / "toy-000000.tar"
    p.write_bytes(b"\x00garbage" * 300)
    with pytest.raises(DataError, match="toy-000000.tar"):
        read_all(m)


def test_empty_shard(tmp_path):
    m = write_toy(tmp_path)
    (tmp_path / "toy-000003.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"toy-000003.tar.*(holds 0 samples|cannot read)"):
        read_all(m)


@pytest.mark.parametrize(
    "members,match",
    [
        ({"k1.cls": b"0"}, r"sample 'k1': no 'png' image"),
        ({"k1.png": png()}, r"sample 'k1': no 'cls' label"),
        ({"k1.png": png(), "k1.cls": b"7"}, r"sample 'k1': label 7 outside the manifest's 2 classes"),
        ({"k1.png": png(), "k1.cls": b"x"}, r"sample 'k1': 'cls' is not an integer"),
        ({"k1.png": b"\x89PNG broken", "k1.cls": b"0"}, r"sample 'k1': cannot decode image"),
        ({"k1.png": png((9, 8)), "k1.cls": b"0"}, r"sample 'k1': image is 8x9, manifest says 8x8"),
        ({"k1.png": png(mode="RGB"), "k1.cls": b"0"}, r"sample 'k1': image mode RGB, manifest says L"),
    ],
)
def test_bad_samples_name_shard_and_key(tmp_path, members, match):
    m = hand_manifest(tmp_path, members)
    with pytest.raises(DataError, match=match) as e:
        read_all(m)
    assert "s-000000.tar" in str(e.value)


def test_ood_sample_with_class_label(tmp_path):
    m = hand_manifest(tmp_path, {"k1.png": png(), "k1.cls": b"3"}, role="ood-test")
    with pytest.raises(DataError, match="label 3 in an outlier/OOD set"):
        read_all(m)


def test_count_mismatch(tmp_path):
    m = hand_manifest(tmp_path, {"k1.png": png(), "k1.cls": b"0"}, count=2)
    with pytest.raises(DataError, match="holds 1 samples, the manifest says 2"):
        list(read_shard(ShardTask(m.urls()[0], 2)))


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"role": "training"}, "role 'training' is not one of"),
        ({"mode": "CMYK"}, "mode 'CMYK'"),
        ({"image_size": [8]}, "image_size"),
        ({"shards": []}, "non-empty"),
        ({"format_version": 9}, "format_version 9"),
        ({"colour": 1}, "unknown key"),
        ({"class_names": []}, "needs class_names"),
    ],
)
def test_manifest_validation(tmp_path, patch, match):
    write_toy(tmp_path)
    d = json.loads((tmp_path / "manifest.json").read_text())
    d.update(patch)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=match) as e:
        Manifest.load(tmp_path)
    assert "manifest.json" in str(e.value)


def test_manifest_not_json_and_missing(tmp_path):
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        Manifest.load(tmp_path)
    with pytest.raises(DataError, match="manifest not found"):
        Manifest.load(tmp_path / "nope.json")


def test_benchmark_checks_roles_and_sizes(tmp_path):
    write_toy(tmp_path / "tr", name="tr")
    write_toy(tmp_path / "va", name="va", role="val")
    write_toy(tmp_path / "te", name="te", role="test", size=(9, 9))
    spec = {"train": "tr/manifest.json", "val": "va/manifest.json", "test": "te/manifest.json"}
    (tmp_path / "benchmark.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"te/manifest.json: images are L \[9, 9\]"):
        Benchmark.load(tmp_path)
    spec["test"] = "va/manifest.json"
    (tmp_path / "benchmark.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="role is 'val', expected 'test'"):
        Benchmark.load(tmp_path)


def test_a_manifest_cannot_run_shell_commands(tmp_path, capsys, monkeypatch):
    """pipe: URLs run only commands of an allowed template; a hostile manifest runs nothing."""
    import shlex

    from ood_ray.cli import main

    monkeypatch.delenv("OOD_RAY_ALLOW_PIPE", raising=False)
    m = write_toy(tmp_path / "set", n=10, maxcount=10)
    marker = tmp_path / "pwned"
    real = m.urls()[0]
    d = json.loads((tmp_path / "set" / "manifest.json").read_text())
    hostile = [
        f"pipe:touch {marker}; cat {real}",
        f"pipe:aws s3 cp --only-show-errors s3://b/x.tar - ; touch {marker}",
        f"pipe:aws s3 cp --only-show-errors $(touch {marker}) -",
        f"pipe:aws s3 cp --only-show-errors s3://b/x.tar {marker}",  # a download to a local path
    ]
    for url in hostile:
        d["shards"][0]["url"] = url
        (tmp_path / "set" / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(DataError, match=r"shards\[0\]\.url would run the shell command"):
            Manifest.load(tmp_path / "set")
        assert main(["data", "verify", str(tmp_path / "set")]) == 2
        assert "OOD_RAY_ALLOW_PIPE" in capsys.readouterr().err
    assert not marker.exists()
    # what the writer writes for the default read command is allowed and listed by verify
    d["shards"][0]["url"] = "pipe:" + "aws s3 cp --only-show-errors {url} -".format(url=shlex.quote("s3://b/a b.tar"))
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(d))
    assert main(["data", "verify", str(tmp_path / "set")]) == 0
    assert "runs: aws s3 cp --only-show-errors 's3://b/a b.tar' -" in capsys.readouterr().out
    # an opt-in for manifests one trusts
    d["shards"][0]["url"] = f"pipe:cat {real}"
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DataError):
        Manifest.load(tmp_path / "set")
    monkeypatch.setenv("OOD_RAY_ALLOW_PIPE", "cat {url}")
    assert Manifest.load(tmp_path / "set").commands() == [f"cat {real}"]
    # a template that is not plain words is an error naming the variable, not silently ignored
    monkeypatch.setenv("OOD_RAY_ALLOW_PIPE", "cat {url} | head")
    with pytest.raises(DataError, match=r"OOD_RAY_ALLOW_PIPE: read command 'cat \{url\} \| head'"):
        Manifest.load(tmp_path / "set")


def test_shard_never_destroys_data(tmp_path, capsys):
    """A failed or interrupted rewrite keeps the previous set; only files the previous manifest
    listed are removed; other sets' shards and a hostile --name are left alone or refused."""
    from ood_ray.cli import main

    out = tmp_path / "out"
    good = write_toy(out, n=30, maxcount=10, name="train")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "train-val-000000.tar").write_bytes(b"another set")  # shares the prefix
    (out / "train-backup.tar").write_bytes(b"a backup")

    def failing():  # the rerun fails after 15 samples (bad label)
        for i in range(15):
            yield f"k{i}", np.zeros((8, 8), np.uint8), 0
        yield "bad", np.zeros((8, 8), np.uint8), 7

    with pytest.raises(DataError, match="label 7"):
        write_shards(failing(), out, name="train", role="train", class_names=["c0", "c1", "c2"], image_size=(8, 8), mode="L", maxcount=10, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before  # the old set, intact
    assert Manifest.load(out, verify=True).num_samples == good.num_samples
    assert (out / "train-val-000000.tar").exists() and (out / "train-backup.tar").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left

    def interrupted():
        yield "k0", np.zeros((8, 8), np.uint8), 0
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(interrupted(), out, name="train", role="train", class_names=["c0"], image_size=(8, 8), mode="L", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before

    # a successful rewrite with fewer shards removes exactly the old set's leftover shard
    new = write_array_shards(np.zeros((12, 8, 8), np.uint8), [0] * 12, out, name="train", role="train", class_names=["c0"], maxcount=10, progress=False)
    assert len(new.shards) == 2 and not (out / "train-000002.tar").exists()
    assert (out / "train-val-000000.tar").exists() and (out / "train-backup.tar").exists()
    Manifest.load(out, verify=True)

    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, int))
    for bad in ("*", "../parent", "a/b", ""):
        assert main(["data", "shard", "--npz", str(tmp_path / "a.npz"), "--out", str(out), "--name", bad, "--role", "train"]) == 2
        assert "name=" in capsys.readouterr().err
    assert not (tmp_path / "parent-000000.tar").exists() and (out / "train-backup.tar").exists()
    (tmp_path / "file").write_text("x")
    assert main(["data", "shard", "--npz", str(tmp_path / "a.npz"), "--out", str(tmp_path / "file"), "--name", "x", "--role", "train"]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change,named",
    [
        ({"class_names": "abc"}, "class_names must be a list of strings"),
        ({"image_size": [True, 8]}, "image_size must be [height, width]"),
        ({"image_size": [10**9, 8]}, "image_size must be [height, width]"),
        ({"encoding": "exe"}, "encoding 'exe' is not one of"),
        ({"shards": [{"url": "s-000000.tar", "count": 10**12}]}, "shards[0].count must be an int in [0, 1000000000]"),
    ],
)
def test_manifest_values_are_checked_when_loaded(tmp_path, change, named):
    d = {"name": "s", "role": "train", "image_size": [8, 8], "mode": "L", "class_names": ["a", "b"], "shards": [{"url": "s-000000.tar", "count": 1}]}
    (tmp_path / "manifest.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(DataError, match=re.escape(named)):
        Manifest.load(tmp_path)


def test_planning_does_not_walk_every_sample():
    """A rank's share is counted in O(shards): a manifest of 2 x 10^9 samples plans at once."""
    from ood_ray.data.streams import batches_per_epoch, samples_per_rank

    m = Manifest.from_dict({"name": "big", "role": "train", "image_size": [8, 8], "mode": "L", "class_names": ["a"], "shards": [{"url": f"/x/big-{i}.tar", "count": 10**9} for i in range(3)]})
    per_rank = samples_per_rank(m, world=2)
    assert sum(per_rank) == 3 * 10**9 and max(per_rank) - min(per_rank) <= 1
    assert batches_per_epoch(m, world=2, batch_size=1000) == min(per_rank) // 1000


def test_a_failed_upload_sends_no_partial_shard_and_stale_staging_is_removed(tmp_path):
    from ood_ray.data.writer import Upload

    remote = tmp_path / "bucket"
    remote.mkdir()
    upload = Upload(str(remote), put="cp {src} {dst}", get="cat {url}")

    def samples(fail_at):
        for i in range(25):
            if i == fail_at:
                raise RuntimeError("source failed")
            yield f"k{i}", np.zeros((8, 8), np.uint8), 0

    out = tmp_path / "out"
    write_shards(samples(None), out, name="up", role="train", class_names=["a"], image_size=(8, 8), mode="L", maxcount=10, progress=False, upload=upload)
    good = {p.name: p.read_bytes() for p in remote.iterdir()}
    assert sorted(good) == ["manifest.json", "up-000000.tar", "up-000001.tar", "up-000002.tar"]
    with pytest.raises(RuntimeError, match="source failed"):
        write_shards(samples(15), out, name="up", role="train", class_names=["a"], image_size=(8, 8), mode="L", maxcount=10, progress=False, upload=upload)
    # shard 0 was re-sent whole; the partial shard 1 was not sent over the good remote copy
    assert {p.name: p.read_bytes() for p in remote.iterdir()}["up-000001.tar"] == good["up-000001.tar"]
    # a staging folder of a killed run (its process is gone) is removed by the next run
    stale = out / ".up.writing-999999999-abc"
    stale.mkdir()
    write_shards(samples(None), out, name="up", role="train", class_names=["a"], image_size=(8, 8), mode="L", maxcount=10, progress=False)
    assert not stale.exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
