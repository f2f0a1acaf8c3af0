"""Backbones from torchvision and timm, pretrained weights from files, the model's own
preprocessing, fine-tuning controls and ``evaluate --model``. Offline: every weights file is
written here from a randomly initialised torchvision / timm model. In-process training (no Ray)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

from ood_ray.checkpoint import load_model_dir, load_state
from ood_ray.cli import main
from ood_ray.config import ConfigError, TrainConfig
from ood_ray.models import Preprocess, build_backbone, model_preprocess
from ood_ray.models.preprocess import random_resized_box
from ood_ray.pretrained import load_backbone, resolve


def penultimate_torchvision(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What feeds the last linear layer of ``net``, read with a forward hook on the model itself."""
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    seen = {}
    handle = last.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    net(x)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_state_dict_loads_and_features_are_the_penultimate_output(name, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    backbone = build_backbone(f"torchvision:{name}", 3, 64)
    wf = resolve(f"torchvision:{name}", str(path))
    load_backbone(backbone, wf)
    backbone.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone(x), penultimate_torchvision(net, x), atol=1e-5)
    assert backbone.num_features == [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1].in_features
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in backbone.modules())  # the classifier is gone
    import hashlib

    assert wf.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and wf.source == "file"


def test_timm_state_dict_loads_and_features_are_timm_s_pooled_features(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "timm-resnet18.pth"
    torch.save(net.state_dict(), path)
    backbone = build_backbone("timm:resnet18", 3, 64)
    load_backbone(backbone, resolve("timm:resnet18", str(path)))
    backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = net.forward_head(net.forward_features(x), pre_logits=True)
        assert torch.allclose(backbone(x), want, atol=1e-5)
    prep = model_preprocess("timm:resnet18", 3, (32, 32))
    cfg = timm.data.resolve_data_config({}, model=net)
    assert prep.size == tuple(cfg["input_size"][1:]) and prep.mean == tuple(cfg["mean"]) and prep.std == tuple(cfg["std"])
    assert prep.interpolation == cfg["interpolation"] and prep.resize == int(cfg["input_size"][-1] / cfg["crop_pct"])


def test_the_recorded_preprocessing_is_the_weights_transforms_and_computes_the_same():
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    prep = model_preprocess("torchvision:resnet18", 3, (256, 256))
    t = weights.transforms()
    assert (prep.size, prep.resize) == ((t.crop_size[0],) * 2, t.resize_size[0])
    assert prep.mean == tuple(t.mean) and prep.std == tuple(t.std) and prep.interpolation == t.interpolation.value
    assert prep.source == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, size=(4, 3, 300, 280), dtype=np.uint8))
    ours = prep.eval_batch(x)
    theirs = torch.stack([t(img) for img in x])
    assert ours.shape == (4, 3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert Preprocess.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep


def test_input_size_scales_the_resize_and_grayscale_is_repeated_to_rgb():
    prep = model_preprocess("torchvision:resnet18", 1, (8, 8), input_size=64)
    assert prep.size == (64, 64) and prep.resize == 73  # 64 x 256 / 224
    out = prep.eval_batch(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8))
    assert out.shape == (2, 3, 64, 64)
    assert torch.allclose(out[:, :, 0, 0], ((1 - torch.tensor(prep.mean)) / torch.tensor(prep.std)).expand(2, 3), atol=1e-5)


def test_scaled_preprocessing_is_exactly_the_old_normalization():
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(Preprocess.scaled(3).eval_batch(x), x.float().div(127.5).sub(1.0))


def test_random_resized_crop_boxes_stay_inside_and_follow_the_bounds():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = random_resized_box(40, 64, g)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 64 and h > 0 and w > 0
    prep = model_preprocess("torchvision:resnet18", 3, (32, 32), input_size=16)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = prep.train_batch(x, flip=True, generator=torch.Generator().manual_seed(1))
    b = prep.train_batch(x, flip=True, generator=torch.Generator().manual_seed(1))
    c = prep.train_batch(x, flip=True, generator=torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"channels": 3, "mean": [0.5, 0.5]}, "mean=.*3 finite numbers"),
        ({"channels": 1, "size": [224, 224], "resize": 100}, "smaller than the crop"),
        ({"channels": 1, "interpolation": "lanczos7"}, "interpolation="),
        ({"channels": 1, "std": [0.0], "mean": [0.5]}, "std=.*> 0"),
        ({"channels": 1, "colour": "red"}, "unknown key"),
    ],
)
def test_a_bad_recorded_preprocessing_is_refused_naming_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        Preprocess.from_dict(bad, "model.json: preprocess")


def test_a_missing_or_mismatched_weights_file_is_a_one_line_error(tmp_path, capsys, digits_ood):
    code = main(["train", "--data", str(digits_ood), "--backbone", "torchvision:resnet18", "--pretrained", str(tmp_path / "nope.pth"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope.pth" in err
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(ValueError, match=r"resnet34.pth: weights do not fit the model described in backbone torchvision:resnet18: unexpected layer1\.2"):
        load_backbone(build_backbone("torchvision:resnet18", 3, 32), resolve("torchvision:resnet18", str(other)))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="junk.pth: weights do not fit .* missing conv1.weight"):
        load_backbone(build_backbone("torchvision:resnet18", 3, 32), resolve("torchvision:resnet18", str(tmp_path / "junk.pth")))


def test_imagenet_weights_in_the_cache_must_carry_their_published_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)  # random weights under the published name
    with pytest.raises(ConfigError, match=r"resnet18-f37072fd.pth: its sha256 .* does not start with f37072fd"):
        resolve("torchvision:resnet18", "imagenet")
    with pytest.raises(ConfigError, match="has no published ImageNet weights"):
        TrainConfig(backbone="small_cnn", pretrained="imagenet").validate()


def test_timm_backbones_need_timm_and_name_close_matches():
    with pytest.raises(ValueError, match="torchvision has no classification model 'resnet181'.*close: resnet18"):
        build_backbone("torchvision:resnet181", 3, 32)
    with pytest.raises(ValueError, match="timm has no classification model"):
        build_backbone("timm:not_a_model_xyz", 3, 32)


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory):
    """A torchvision resnet18 state_dict (random weights) to start from."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _train(digits_ood, root, **kw):
    from ood_ray.engine import train_local

    cfg = TrainConfig(data=str(digits_ood), epochs=1, num_workers=1, batch_size=32, evaluate_test=False, backbone="torchvision:resnet18", input_size=32, **kw)
    return train_local(cfg, root)[-1]["checkpoint_path"]


@pytest.mark.parametrize("kw", [{"freeze_backbone": True}, {"backbone_lr_scale": 0.0}], ids=["freeze", "lr-scale-0"])
def test_a_frozen_backbone_keeps_its_weights_and_only_the_head_trains(kw, digits_ood, saved_backbone, tmp_path):
    ckpt = _train(digits_ood, tmp_path, pretrained=str(saved_backbone), optimizer="adam", lr=1e-3, **kw)
    trained = load_state(ckpt)["model"]
    start = torch.load(saved_backbone, weights_only=True)
    params = {n for n, _ in torchvision.models.resnet18().named_parameters() if not n.startswith("fc.")}
    for name in params:
        assert torch.equal(trained[f"backbone.net.{name}"], start[name]), name
    if kw.get("freeze_backbone"):  # a linear probe also keeps the BatchNorm statistics
        assert torch.equal(trained["backbone.net.bn1.running_mean"], start["bn1.running_mean"])
    else:  # lr 0: the statistics still adapt to the new data
        assert not torch.equal(trained["backbone.net.bn1.running_mean"], start["bn1.running_mean"])
    head = torch.nn.Linear(512, 10)
    assert trained["head.weight"].shape == head.weight.shape  # a new head for the benchmark's 10 classes


@pytest.fixture(scope="module")
def finetuned(digits_ood, saved_backbone, tmp_path_factory):
    """A checkpoint fine-tuned from ``saved_backbone`` with every fine-tuning control on."""
    root = tmp_path_factory.mktemp("finetuned")
    return _train(digits_ood, root, pretrained=str(saved_backbone), optimizer="adamw", lr=1e-3, backbone_lr_scale=0.1, warmup_epochs=0.5, head_pooling="avgmax", head_dropout=0.5, hflip=True)


def test_fine_tuning_moves_the_backbone_and_records_weights_and_preprocessing(digits_ood, saved_backbone, finetuned, tmp_path):
    ckpt = finetuned
    trained = load_state(ckpt)["model"]
    start = torch.load(saved_backbone, weights_only=True)
    assert not torch.equal(trained["backbone.net.conv1.weight"], start["conv1.weight"])
    meta = json.loads((Path(ckpt) / "model.json").read_text())
    import hashlib

    assert meta["pretrained"]["sha256"] == hashlib.sha256(saved_backbone.read_bytes()).hexdigest()
    assert meta["preprocess"]["size"] == [32, 32] and meta["preprocess"]["train_crop"] == "random-resized" and meta["head_pooling"] == "avgmax"
    model, meta2, _ = load_model_dir(ckpt)
    assert model.num_features == 1024 and model.preprocess == Preprocess.from_dict(meta["preprocess"])  # avg ++ max of 512 channels
    # the predictor prepares images with the recorded preprocessing: its scores equal evaluation's
    from ood_ray.data.manifest import Benchmark
    from ood_ray.engine.evaluate import collect
    from ood_ray.serving import OODPredictor

    bench = Benchmark.load(digits_ood)
    predictor = OODPredictor(model, meta2)
    ref = collect(model, predictor.method, bench.val, 0, 1, "cpu", 64)
    from ood_ray.data.streams import eval_batches

    x, _, keys = next(iter(eval_batches(bench.val, 0, 1, 16)))
    out = predictor.outputs(x.numpy())
    idx = [list(ref["keys"]).index(k) for k in keys]
    assert np.allclose(out["logits"], ref["logits"][idx], atol=1e-4)
    # and the MLflow pyfunc model, loaded back, prepares them the same way
    import mlflow

    from ood_ray.serving.pyfunc import log_ood_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run():
        info = log_ood_model(ckpt)
    frame = mlflow.pyfunc.load_model(info.model_uri).predict(x.numpy())
    assert np.allclose(frame["score"].to_numpy(), predictor.predict(x.numpy())["score"].to_numpy(), atol=1e-5)


def test_evaluate_model_scores_a_user_factory(tmp_path, digits_ood, monkeypatch, capsys, mlflow_uri):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def classifier():
            torch.manual_seed(0)
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

        def split():
            torch.manual_seed(0)
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU()), nn.Linear(48, 10), {"mean": [0.2], "std": [0.3]}

        def wrong_classes():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "table.md"
    code = main(["evaluate", "--model", "my_models:classifier", "--data", str(digits_ood), "--detectors", "knn,energy", "--out", str(out), "--tracking-uri", mlflow_uri])
    printed = capsys.readouterr().out
    assert code == 0 and "| knn |" in out.read_text() and "| energy |" in out.read_text() and "my_models:classifier" in out.read_text()
    assert "MLflow run" in printed
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("ood-ray").experiment_id])[0]
    assert run.data.tags["ood_ray.kind"] == "detector-evaluation" and "knn" in run.data.params["detectors"]
    # the same scores as the model built by hand: MSP of its logits on the test split
    from ood_ray.data.manifest import Benchmark
    from ood_ray.imported import build_imported

    model, meta = build_imported("my_models:split", None, Benchmark.load(digits_ood))
    assert model.preprocess.mean == (0.2,) and model.num_features == 48
    code = main(["evaluate", "--model", "my_models:wrong_classes", "--data", str(digits_ood), "--no-mlflow", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "has 7 classes" in err and "has 10" in err
    code = main(["evaluate", "--model", "my_models:absent", "--data", str(digits_ood), "--no-mlflow"])
    assert code == 2 and "has no function 'absent'" in capsys.readouterr().err


def test_evaluate_model_with_torchvision_weights_from_a_file(tmp_path, digits_ood, capsys):
    torch.manual_seed(0)
    path = tmp_path / "r18-10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    out = tmp_path / "t.md"
    code = main(["evaluate", "--model", "torchvision:resnet18", "--pretrained", str(path), "--input-size", "32", "--data", str(digits_ood), "--detectors", "msp", "--no-mlflow", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "| msp |" in out.read_text() or "method_msp" in out.read_text()
    with pytest.raises(SystemExit):  # one model at a time
        main(["evaluate", "--model", "torchvision:resnet18", "--pretrained", str(path), "--data", str(digits_ood), "--checkpoint", "x"])
    code = main(["evaluate", "--model", "torchvision:resnet18", "--data", str(digits_ood), "--no-mlflow"])
    assert code == 2 and "pass --pretrained imagenet or --pretrained FILE" in capsys.readouterr().err


def test_a_named_weights_entry_brings_its_own_transforms(tmp_path, monkeypatch):
    v1 = model_preprocess("torchvision:resnet50", 3, (256, 256), weights_tag="IMAGENET1K_V1")
    v2 = model_preprocess("torchvision:resnet50", 3, (256, 256))
    assert (v1.resize, v2.resize) == (256, 232) and v1.source.endswith("IMAGENET1K_V1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="ResNet50_Weights has DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        resolve("torchvision:resnet50", "imagenet:V9")


def test_an_ood_ray_checkpoint_is_a_pretrained_file_for_the_same_backbone(finetuned):
    first = finetuned
    backbone = build_backbone("torchvision:resnet18", 3, 32, pooling="avgmax")
    load_backbone(backbone, resolve("torchvision:resnet18", first))  # the folder: its state.pt's backbone
    saved = load_state(first)["model"]
    assert torch.equal(backbone.net.conv1.weight, saved["backbone.net.conv1.weight"])


def test_a_timm_name_may_carry_its_pretrained_tag():
    prep = model_preprocess("timm:resnet18.tv_in1k", 3, (32, 32))
    assert prep.resize == int(224 / 0.875) and prep.source == "timm:resnet18.tv_in1k"  # the tag's own data config
    assert build_backbone("timm:resnet18.tv_in1k", 3, 32).num_features == 512


def test_batched_crops_equal_torchvision_s_resized_crop():
    from torchvision.transforms import functional as TF

    from ood_ray.models.preprocess import crop_resize

    x = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8)
    boxes, flips = [(2, 3, 10, 12), (0, 0, 20, 30), (5, 10, 15, 20)], [False, True, False]
    out = crop_resize(x, boxes, flips, (24, 24))
    for i, ((top, left, h, w), f) in enumerate(zip(boxes, flips, strict=True)):
        want = TF.resized_crop(x[i].float(), top, left, h, w, [24, 24], antialias=False)
        want = want.flip(-1) if f else want
        # inside the box the same values; on its outermost pixels the crop blends in the pixels just outside it
        assert torch.allclose(out[i, :, 1:-1, 1:-1], want[:, 1:-1, 1:-1], atol=1e-3), i


def test_a_factory_that_returns_something_else_is_refused(tmp_path, digits_ood, monkeypatch):
    (tmp_path / "odd_models.py").write_text("def numbers():\n    return 3, 4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from ood_ray.data.manifest import Benchmark
    from ood_ray.imported import build_imported

    with pytest.raises(ConfigError, match="returned tuple; expected an nn.Module, or .backbone, head. modules"):
        build_imported("odd_models:numbers", None, Benchmark.load(digits_ood))


def test_avgmax_features_are_the_max_and_the_mean_of_the_last_map():
    torch.manual_seed(0)
    b = build_backbone("torchvision:mobilenet_v2", 3, 64, pooling="avgmax").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = b.net.features(x)
        want = torch.cat([fmap.amax(dim=(2, 3)), fmap.mean(dim=(2, 3))], dim=1)
        assert torch.allclose(b(x), want) and b.num_features == 2560
    native = build_backbone("small_cnn", 3, 16, pooling="avgmax").eval()
    with torch.no_grad():
        fmap = native.features(torch.ones(1, 3, 16, 16))
        assert torch.allclose(native(torch.ones(1, 3, 16, 16)), torch.cat([fmap.amax(dim=(2, 3)), fmap.mean(dim=(2, 3))], dim=1))
