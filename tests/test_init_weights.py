"""``volpre pretrain --init``: public and volpre weights as a starting point, key maps per layout, strict loads.

No network: each layout is built from the model definition its publisher loads it into -- MedicalNet
files from MONAI's ``ResNetFeatures`` (MONAI's MedicalNet loader drops ``module.`` and loads strictly),
``model_swinvit.pt`` from MONAI's ``SwinTransformer`` as research-contributions' ``SwinUNETR/Pretrain``
builds it (``use_v2=False``, ``module.`` prefix, under ``state_dict``).
"""

from __future__ import annotations

import json

import monai
import pytest
import torch
from monai.networks.nets import ResNetFeatures
from monai.networks.nets.swin_unetr import SwinTransformer

from test_export import make_checkpoint
from volpre.cli import main
from volpre.config import load_config
from volpre.engine.trainer import _initialise_encoder
from volpre.export import export_bundle
from volpre.models import build_encoder
from volpre.models.init_weights import InitWeightsError, detect_format, read_init_state
from volpre.models.weights import WeightsError


def medicalnet_file(path, depth: int) -> dict:
    torch.manual_seed(depth)
    state = ResNetFeatures(f"resnet{depth}", pretrained=False, spatial_dims=3, in_channels=1).state_dict()
    data = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(data, path)
    return data


def test_medicalnet_layout_loads_as_monais_own_loader_loads_it(tmp_path):
    data = medicalnet_file(tmp_path / "resnet_10_23dataset.pth", 10)
    reference = ResNetFeatures("resnet10", pretrained=False, spatial_dims=3, in_channels=1)
    reference.load_state_dict({k.replace("module.", ""): v for k, v in data["state_dict"].items()})  # MONAI's way
    cfg = load_config("resnet-dae-tiny")
    encoder = build_encoder(cfg.model)
    record = _initialise_encoder(encoder, cfg, tmp_path / "resnet_10_23dataset.pth", "auto")
    assert record["format"] == "medicalnet" and len(record["sha256"]) == 64
    ours, theirs = encoder.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_mismatched_medicalnet_file_fails_naming_every_bad_key(tmp_path, demo_manifest, capsys):
    medicalnet_file(tmp_path / "resnet_18.pth", 18)
    cfg = load_config("resnet-dae-tiny")  # resnet10
    with pytest.raises(WeightsError) as info:
        _initialise_encoder(build_encoder(cfg.model), cfg, tmp_path / "resnet_18.pth", "medicalnet")
    message = str(info.value)
    expected = set(ResNetFeatures("resnet18", pretrained=False).state_dict()) - set(build_encoder(cfg.model).state_dict())
    assert "does not fit the run's resnet encoder" in message and "unexpected in the file (" in message
    assert all(key in message for key in expected)
    code = main(["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(demo_manifest), "--output",
                 str(tmp_path / "run"), "--init", str(tmp_path / "resnet_18.pth"), "--max-steps", "1"])
    assert code == 2 and "unexpected in the file" in capsys.readouterr().err


def test_swin_ssl_weights_are_recognised_and_refused_with_the_reason(tmp_path, demo_manifest, capsys):
    swin = SwinTransformer(in_chans=1, embed_dim=48, window_size=(7, 7, 7), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
                           num_heads=(3, 6, 12, 24), use_v2=False)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in swin.state_dict().items()}}, path)
    assert detect_format(torch.load(path, weights_only=True)) == "monai-swin-ssl"
    for fmt in ("auto", "monai-swin-ssl"):
        with pytest.raises(InitWeightsError, match=rf"trained with MONAI < 1\.5, whose 3D PatchMerging .*MONAI issue "
                                                   rf"#8284.*MONAI {monai.__version__}'s PatchMerging normalises and "
                                                   r"projects all eight.*MONAI 1\.4"):
            read_init_state(path, fmt)
    assert main(["pretrain", "--config", "swin-dae-tiny", "--manifest", str(demo_manifest), "--output",
                 str(tmp_path / "run"), "--init", str(path)]) == 2
    assert "model_swinvit.pt layout" in capsys.readouterr().err


def test_volpre_checkpoints_and_bundles_as_init(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", "resnet-dae-tiny", seed=5)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    bundle = export_bundle(checkpoint, "segmentation", tmp_path / "bundle", out_channels=3)
    cfg = load_config("resnet-dae-tiny")
    for source, fmt in ((checkpoint, "volpre"), (bundle, "bundle"), (bundle / "models/pretrained_encoder.pt", "auto")):
        encoder = build_encoder(cfg.model)
        record = _initialise_encoder(encoder, cfg, source, fmt)
        assert record["format"] in ("volpre", "bundle")
        assert all(torch.equal(v, saved[f"encoder.{k}"]) for k, v in encoder.state_dict().items())
    with pytest.raises(InitWeightsError, match=r"--init-format medicalnet, but the file's layout is volpre"):
        read_init_state(checkpoint, "medicalnet")
    other = load_config("resnet-dae-tiny", ["model.resnet.depth=18"])
    with pytest.raises(WeightsError, match=r"(?s)does not fit the run's resnet encoder.*missing from the file \(\d+\): "):
        _initialise_encoder(build_encoder(other.model), other, checkpoint, "volpre")
    not_weights = tmp_path / "x.pt"
    torch.save({"a": 1}, not_weights)
    with pytest.raises(InitWeightsError, match=r"not a layout volpre knows"):
        read_init_state(not_weights)
    assert main(["pretrain", "--config", "resnet-dae-tiny", "--manifest", "m.json", "--output", str(tmp_path / "r"),
                 "--init-format", "volpre"]) == 2
    assert "--init-format names the layout of an --init file; give --init PATH" in capsys.readouterr().err


def test_pretrain_records_its_init(tmp_path, demo_manifest):
    from volpre.engine.trainer import pretrain

    medicalnet_file(tmp_path / "resnet_10.pth", 10)
    cfg = load_config("resnet-dae-tiny", ["data.num_workers=0", "train.log_every=1"])
    result = pretrain(cfg, demo_manifest, tmp_path / "run", max_steps=1, device="cpu",
                      init=(tmp_path / "resnet_10.pth", "auto"))
    saved = torch.load(result.checkpoint, weights_only=True)
    assert saved["init"]["format"] == "medicalnet" and saved["init"]["path"] == str((tmp_path / "resnet_10.pth").resolve())
    json.dumps(saved["init"])  # plain values only


# ----------------------------------------------------------------------------- volpre export --encoder-weights


def test_encoder_weights_export_a_medicalnet_file_into_a_bundle_as_they_are(tmp_path, capsys):
    """``volpre export --encoder-weights resnet_10_23dataset.pth --config resnet-dae-tiny``: the bundle's
    encoder file holds MedicalNet's tensors under FlexibleUNet's keys, and says where they come from."""
    data = medicalnet_file(tmp_path / "resnet_10_23dataset.pth", 10)
    out = tmp_path / "seg"
    assert main(["export", "--encoder-weights", str(tmp_path / "resnet_10_23dataset.pth"), "--config",
                 "resnet-dae-tiny", "--task", "segmentation", "--out-channels", "3", "--out", str(out)]) == 0
    exported = torch.load(out / "models" / "pretrained_encoder.pt", weights_only=True)
    theirs = {k[len("module."):]: v for k, v in data["state_dict"].items()}
    assert len(exported) == len(theirs)
    for key, value in theirs.items():  # FlexibleUNet keeps ResNetFeatures' names under encoder.
        assert torch.equal(exported[f"encoder.{key}"], value), key
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    assert metadata["volpre_pretraining"]["origin"] == "medicalnet"
    assert metadata["volpre_pretraining"]["objective"] is None and metadata["volpre_pretraining"]["step"] == 0
    assert "not pretrained by volpre" in metadata["description"]
    readme = (out / "docs" / "README.md").read_text()
    assert "encoder weights of `resnet_10_23dataset.pth`" in readme and "medicalnet layout" in readme
    assert str(tmp_path) not in readme  # file names and digests, no local path


def test_encoder_weights_that_do_not_fit_the_config_fail_naming_every_bad_key(tmp_path, capsys):
    medicalnet_file(tmp_path / "resnet_18.pth", 18)
    args = ["export", "--encoder-weights", str(tmp_path / "resnet_18.pth"), "--task", "survival",
            "--out", str(tmp_path / "b")]
    assert main(args + ["--config", "resnet-dae-tiny"]) == 2  # resnet10
    err = capsys.readouterr().err
    expected = set(ResNetFeatures("resnet18", pretrained=False).state_dict()) - set(
        build_encoder(load_config("resnet-dae-tiny").model).state_dict())
    assert "--encoder-weights" in err and "unexpected in the file (" in err and all(k in err for k in expected)
    assert not (tmp_path / "b").exists()
    assert main(args + ["--config", "resnet-dae-tiny", "--set", "model.resnet.depth=18"]) == 0  # the right depth


def test_encoder_weights_argument_errors(tmp_path, capsys):
    medicalnet_file(tmp_path / "resnet_10.pth", 10)
    weights = str(tmp_path / "resnet_10.pth")
    checkpoint = str(make_checkpoint(tmp_path / "c.pt", "resnet-dae-tiny"))
    base = ["export", "--task", "survival", "--out", str(tmp_path / "b")]
    cases = [
        ([], "give a pretraining checkpoint (volpre export CKPT ...) or --encoder-weights PATH --config NAME, not both"),
        ([checkpoint, "--encoder-weights", weights, "--config", "resnet-dae-tiny"], "not both"),
        (["--encoder-weights", weights], "--encoder-weights needs --config NAME_OR_YAML"),
        ([checkpoint, "--config", "resnet-dae-tiny"], "--config, --set and --init-format describe --encoder-weights"),
        (["--encoder-weights", weights, "--config", "resnet-dae-tiny", "--weights", "ema"], "no --weights ema"),
        (["--encoder-weights", str(tmp_path / "nope.pth"), "--config", "resnet-dae-tiny"],
         f"--encoder-weights {tmp_path / 'nope.pth'}: no such file"),
        (["--encoder-weights", checkpoint, "--config", "resnet-dae-tiny"], "a volpre pretraining checkpoint; export it"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
