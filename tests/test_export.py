"""Export of pretrained encoders (volpre.export): key maps, strict loading, checkpoint checks, bundle files.

Checkpoints here are built directly in the layout of ``volpre.engine.checkpoint`` from
``build_pretrainer`` (no training); ``tests/test_bundles.py`` exports a checkpoint written by
``volpre.engine.trainer.pretrain`` and runs the bundles with MONAI's bundle runner.
"""

from __future__ import annotations

import hashlib
import dataclasses
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from monai.bundle import ConfigParser
import torch
from ignite.engine import Engine
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from local_paths import local_paths_in
from volpre.config import load_config, shipped_configs
from volpre.engine.checkpoint import CheckpointError, with_checksum
from volpre.export import export_bundle, read_pretrained_encoder
from volpre.export import builder, datalist, finetune, keymap, networks
from volpre.export.schema import SCHEMA_FILE, SCHEMA_SHA256, copy_meta_schema
from volpre.export.templates import templates_root
from volpre.export.transforms import deterministic_transforms
from volpre.models import ResNet3DEncoder, build_encoder
from volpre.models.weights import WeightsError, check_state_dict, load_strictly, read_state_dict
from volpre.objectives import build_pretrainer

REPO = Path(__file__).resolve().parents[1]
from volpre.versions import installed_versions

SWIN_TINY = ("swin-dae-tiny", ())  # feature_size 12, window 4, 32^3 crops
RESNET_TINY = ("resnet-dae-tiny", ())  # resnet10


def make_checkpoint(path: Path, config: str, overrides=(), monai_version: str | None = "installed",
                    ema: bool = False, seed: int = 0) -> Path:
    """A pretraining checkpoint in volpre's layout, with the pretrainer's random initial weights."""
    cfg = load_config(config, list(overrides))
    torch.manual_seed(seed)
    pretrainer = build_pretrainer(cfg)
    versions = installed_versions()
    if monai_version is None:
        versions.pop("monai")
    elif monai_version != "installed":
        versions["monai"] = monai_version
    state = {
        "model": pretrainer.state_dict(),
        "config": cfg.to_dict(),
        "versions": versions,
        "step": 7,
        "manifest": {"path": "/data/pretrain/manifest.json", "sha256": "ab" * 32},
        "encoder": cfg.model.encoder,
        "ema": None,
    }
    if ema:
        averaged = AveragedModel(pretrainer, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
        with torch.no_grad():
            for p in averaged.module.parameters():
                p.add_(1.0)  # distinguishable from the trained weights
        state["ema"] = averaged.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(with_checksum(state), path)
    return path


@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "swin.pt", *SWIN_TINY)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet.pt", *RESNET_TINY)


def encoder_state(config: str, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = load_config(config)
    torch.manual_seed(seed)
    return build_encoder(cfg.model).state_dict()


# ----------------------------------------------------------------------------- schema


def test_shipped_schema_is_monai_meta_schema_20240725_unchanged():
    text = SCHEMA_FILE.read_bytes()
    assert hashlib.sha256(text).hexdigest() == SCHEMA_SHA256
    schema = json.loads(text)
    assert schema["$schema"] == "https://json-schema.org/draft/2019-09/schema"
    assert "network_data_format" in schema["required"] and "required_packages_version" in schema["required"]


def test_copy_meta_schema_writes_the_file_and_refuses_a_directory(tmp_path):
    target = copy_meta_schema(tmp_path / "sub" / "schema.json")
    assert target.read_bytes() == SCHEMA_FILE.read_bytes()
    with pytest.raises(IsADirectoryError, match=r"is a directory; expected a file path"):
        copy_meta_schema(tmp_path)


# ----------------------------------------------------------------------------- key maps (round trips)


@pytest.mark.parametrize(
    ("config", "network"),
    [("swin-dae-tiny", "swinunetr"), ("resnet-dae-tiny", "flexibleunet"),
     ("swin-dae-tiny", "survivalnet"), ("resnet-dae-tiny", "survivalnet")],
)
def test_key_map_round_trip_is_strict_and_exact(config, network):
    cfg = load_config(config)
    state = encoder_state(config, seed=3)
    mapped = keymap.to_network_keys(state, cfg.model.encoder, network)
    net = builder._build_network(builder._network_def(network, cfg), cfg.model.in_channels, 3)
    attr = networks.NETWORKS[network].encoder_attr
    assert keymap.key_prefix(cfg.model.encoder, network) == attr + "."
    encoder_keys = {k for k in net.state_dict() if k.startswith(attr + ".")}
    assert set(mapped) == encoder_keys  # zero missing, zero unexpected
    load_strictly(getattr(net, attr), keymap.to_encoder_keys(mapped, cfg.model.encoder, network), "test", "test")
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in mapped.items())
    back = keymap.to_encoder_keys(after, cfg.model.encoder, network)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_network_choices_of_the_cli_and_the_defaults_come_from_one_table():
    from volpre.commands.options import BUNDLE_NETWORKS

    assert BUNDLE_NETWORKS == tuple(networks.NETWORKS)
    assert networks.default_network("segmentation", "swin") == "swinunetr"
    assert networks.default_network("segmentation", "resnet") == "flexibleunet"
    assert networks.default_network("survival", "swin") == networks.default_network("survival", "resnet") == "survivalnet"
    assert networks.default_network("segmentation", "nnunet") is None  # nnU-Net encoders export with --task nnunet


def test_key_map_refuses_an_unsupported_pair():
    with pytest.raises(ValueError, match=r"no key map from a 'resnet' encoder to network 'swinunetr'; supported pairs"):
        keymap.key_prefix("resnet", "swinunetr")


# ----------------------------------------------------------------------------- strict loading


def test_check_state_dict_lists_every_problem_grouped():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    given = {"a": torch.zeros(2), "b": torch.zeros(4), "d": torch.zeros(1), "e": torch.zeros(1)}
    with pytest.raises(WeightsError) as info:
        check_state_dict(expected, given, "file X", "network Y")
    message = str(info.value)
    assert message.splitlines() == [
        "file X does not fit network Y:",
        "  missing from the file (1): c",
        "  unexpected in the file (2): d, e",
        "  shape mismatches (1): b: file (4,), network (3,)",
    ]


def test_resnet18_weights_into_a_resnet34_network_list_every_missing_key(tmp_path):
    torch.manual_seed(0)
    state18 = keymap.to_network_keys(ResNet3DEncoder(18, 1).state_dict(), "resnet", "flexibleunet")
    path = tmp_path / "pretrained_encoder.pt"
    torch.save(state18, path)
    expected_missing = sorted(
        k for k in networks.flexible_unet(1, 2, "resnet34").state_dict() if k.startswith("encoder.")
        and k not in state18
    )
    assert expected_missing  # resnet34 has more blocks per stage
    with pytest.raises(WeightsError, match=r"pretrained encoder weights .*pretrained_encoder.pt does not fit the "
                                           r"encoder of FlexibleUNet\(backbone=resnet34") as info:
        networks.flexible_unet(1, 2, "resnet34", pretrained_encoder=path)
    message = str(info.value)
    assert f"missing from the file ({len(expected_missing)}): " + ", ".join(expected_missing) in message
    assert "unexpected in the file (0)" in message and "shape mismatches (0)" in message


def test_swin_feature_size_mismatch_lists_shape_mismatches(tmp_path):
    state12 = keymap.to_network_keys(encoder_state("swin-dae-tiny"), "swin", "swinunetr")
    path = tmp_path / "pretrained_encoder.pt"
    torch.save(state12, path)
    with pytest.raises(WeightsError, match=r"does not fit the swinViT of SwinUNETR\(.*feature_size=24") as info:
        networks.swin_unetr(1, 2, feature_size=24, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=4,
                            use_v2=True, pretrained_encoder=path)
    message = str(info.value)
    assert "swinViT.patch_embed.proj.weight: file (12, 1, 2, 2, 2), network (24, 1, 2, 2, 2)" in message
    assert "missing from the file (0)" in message


def test_truncated_weight_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "pretrained_encoder.pt"
    torch.save(keymap.to_network_keys(encoder_state("resnet-dae-tiny"), "resnet", "flexibleunet"), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError,
                       match=r"pretrained encoder weights .*pretrained_encoder.pt: cannot be read .*truncated"):
        networks.flexible_unet(1, 2, "resnet10", pretrained_encoder=path)
    with pytest.raises(WeightsError, match=r"fine-tuned network weights .*missing.pt: no such file"):
        read_state_dict(tmp_path / "missing.pt", "fine-tuned network weights")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "nested.pt")
    with pytest.raises(WeightsError, match=r"nested.pt: expected a mapping of parameter names to tensors; 1 entries"):
        read_state_dict(tmp_path / "nested.pt", "fine-tuned network weights")


def test_whole_network_checkpoint_loads_strictly_and_not_together_with_the_encoder(tmp_path):
    torch.manual_seed(1)
    source = networks.flexible_unet(1, 3, "resnet10", decoder_channels=(32, 16, 16, 8, 8))
    torch.save(source.state_dict(), tmp_path / "model.pt")
    loaded = networks.flexible_unet(1, 3, "resnet10", decoder_channels=(32, 16, 16, 8, 8),
                                    checkpoint=tmp_path / "model.pt")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(WeightsError, match=r"model.pt does not fit FlexibleUNet\(backbone=resnet10, in_channels=1, "
                                           r"out_channels=2"):
        networks.flexible_unet(1, 2, "resnet10", decoder_channels=(32, 16, 16, 8, 8), checkpoint=tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"give pretrained_encoder .* or checkpoint .*, not both"):
        networks.flexible_unet(1, 3, "resnet10", pretrained_encoder=tmp_path / "a.pt", checkpoint=tmp_path / "model.pt")


def test_network_name_refuses_other_networks():
    with pytest.raises(TypeError, match=r"Linear is not a network volpre bundles fine-tune"):
        networks.encoder_of(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- checkpoint checks


def test_read_pretrained_encoder_returns_the_encoder_tensors(swin_checkpoint):
    pretrained = read_pretrained_encoder(swin_checkpoint)
    saved = torch.load(swin_checkpoint, weights_only=True)["model"]
    assert pretrained.encoder == "swin" and pretrained.step == 7 and pretrained.weights == "model"
    assert set(pretrained.state) == {k[len("encoder."):] for k in saved if k.startswith("encoder.")}
    assert all(torch.equal(v, saved["encoder." + k]) for k, v in pretrained.state.items())


def test_ema_weights_are_exported_when_asked_and_refused_when_absent(tmp_path, resnet_checkpoint):
    path = make_checkpoint(tmp_path / "ema.pt", *RESNET_TINY, ema=True)
    saved = torch.load(path, weights_only=True)
    pretrained = read_pretrained_encoder(path, weights="ema")
    assert all(torch.equal(v, saved["ema"]["module.encoder." + k]) for k, v in pretrained.state.items())
    assert not torch.equal(pretrained.state["conv1.weight"], saved["model"]["encoder.conv1.weight"])
    with pytest.raises(CheckpointError,
                       match=r"resnet.pt: weights='ema' asked for, but the run kept no moving average"):
        read_pretrained_encoder(resnet_checkpoint, weights="ema")


@pytest.mark.parametrize("version", ["1.4.0", "1.3.2", "1.4.1rc1"])
def test_swin_weights_from_monai_before_1_5_are_refused(tmp_path, version):
    path = make_checkpoint(tmp_path / "old.pt", *SWIN_TINY, monai_version=version)
    with pytest.raises(CheckpointError, match=rf"old.pt: Swin weights were trained with MONAI {version}, expected "
                                              r"MONAI >= 1.5: MONAI 1.5 changed PatchMerging"):
        export_bundle(path, "segmentation", tmp_path / "bundle", out_channels=2, roi_size=(64, 64, 64))
    assert not (tmp_path / "bundle").exists()


def test_swin_weights_without_a_monai_version_are_refused_and_resnet_ones_accepted(tmp_path):
    path = make_checkpoint(tmp_path / "unknown.pt", *SWIN_TINY, monai_version=None)
    with pytest.raises(CheckpointError, match=r"unknown.pt: Swin weights without a recorded MONAI version"):
        read_pretrained_encoder(path)
    old_resnet = make_checkpoint(tmp_path / "old_resnet.pt", *RESNET_TINY, monai_version="1.3.0")
    assert read_pretrained_encoder(old_resnet).encoder == "resnet"  # PatchMerging is Swin only


def test_truncated_checkpoint_is_refused_with_its_name(tmp_path, resnet_checkpoint):
    path = tmp_path / "truncated.pt"
    path.write_bytes(resnet_checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"truncated.pt: cannot be read .*truncated"):
        export_bundle(path, "segmentation", tmp_path / "bundle", out_channels=2)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: not a volpre pretraining checkpoint \(missing model, config"):
        read_pretrained_encoder(tmp_path / "other.pt")


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    path = make_checkpoint(tmp_path / "mixed.pt", *RESNET_TINY)
    state = torch.load(path, weights_only=True)
    state["config"]["model"]["resnet"]["depth"] = 18  # the weights are resnet10's
    torch.save(with_checksum(state), path)
    with pytest.raises(WeightsError, match=r"checkpoint .*mixed.pt \(model weights, keys encoder.\*\) does not fit the "
                                           r"resnet encoder its config describes \(resnet18, in_channels=1\):\n"
                                           r"  missing from the file \(48\): layer1.1.bn1.bias, .*\n"
                                           r"  unexpected in the file \(18\): layer2.0.downsample.0.weight, .*\n"
                                           r"  shape mismatches \(0\)$"):
        read_pretrained_encoder(path)
    state["config"]["model"]["resnet"]["depth"] = 11
    torch.save(with_checksum(state), path)
    with pytest.raises(CheckpointError, match=r"mixed.pt: its run config is not valid: model.resnet.depth: got 11"):
        read_pretrained_encoder(path)


# ----------------------------------------------------------------------------- export_bundle


def test_export_writes_a_complete_bundle(tmp_path, resnet_checkpoint, demo_manifest):
    out = export_bundle(resnet_checkpoint, "segmentation", tmp_path / "bundle", manifest=demo_manifest, out_channels=3)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "LICENSE", "configs/evaluate.json", "configs/inference.json", "configs/logging.conf", "configs/metadata.json",
        "configs/multi_gpu_train.json", "configs/train.json", "docs/README.md", "models/pretrained_encoder.pt",
    ]
    # the encoder file: network key names, the checkpoint's tensors
    exported = torch.load(out / "models/pretrained_encoder.pt", weights_only=True)
    pretrained = read_pretrained_encoder(resnet_checkpoint)
    assert set(exported) == {"encoder." + k for k in pretrained.state}
    assert all(torch.equal(exported["encoder." + k], v) for k, v in pretrained.state.items())
    # configs carry the pretraining architecture and preprocessing
    train = json.loads((out / "configs/train.json").read_text())
    assert train["network_def"]["_target_"] == "volpre.export.networks.flexible_unet"
    assert train["network_def"]["backbone"] == "resnet10"
    assert train["network_def"]["pretrained_encoder"] == "@pretrained_encoder"
    assert train["manifest"] == str(demo_manifest.resolve()) and train["out_channels"] == 3
    cfg = pretrained.config
    assert train["roi_size"] == list(cfg.data.roi) and train["preprocess"]["spacing"] == list(cfg.preprocess.spacing)
    # the whole preprocessing section, field for field: it builds back into the pretraining's PreprocessConfig
    parsed = ConfigParser({"p": train["preprocess"]}).get_parsed_content("p")
    assert json.dumps(dataclasses.asdict(parsed)) == json.dumps(dataclasses.asdict(cfg.preprocess))
    inference = json.loads((out / "configs/inference.json").read_text())
    assert inference["network_def"]["checkpoint"] == "$@ckpt_dir + '/model.pt'"
    assert inference["network_def"]["backbone"] == "resnet10" and inference["network_def"]["pretrained_encoder"] is None
    # metadata: valid against MONAI's schema, exact versions
    metadata = json.loads((out / "configs/metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA_FILE.read_text()))
    import monai
    assert metadata["monai_version"] == monai.__version__ and metadata["pytorch_version"] == torch.__version__
    assert metadata["numpy_version"] == np.__version__
    assert {"monai", "torch", "numpy", "volpre", "pytorch-ignite"} <= set(metadata["required_packages_version"])
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == list(cfg.data.roi)
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    assert metadata["changelog"]["0.1.0"].startswith("exported by volpre")
    # README: what the weights are and the exact commands
    readme = (out / "docs/README.md").read_text()
    assert "pretrained with the `dae` objective for 7 optimiser steps" in readme
    assert '"resnet": {"depth": 10}' in readme and '"swin"' not in readme
    checkpoint_sha256 = hashlib.sha256(resnet_checkpoint.read_bytes()).hexdigest()
    assert "manifest `manifest.json`, SHA-256 `" + "ab" * 32 in readme  # the recorded manifest: name and digest
    assert f"checkpoint `resnet.pt` (SHA-256 `{checkpoint_sha256}`" in readme
    assert f"`{demo_manifest.name}`, key `manifest` of" in readme  # the manifest given at export, by name
    assert "--bundle_root BUNDLE" in readme and "--manifest MANIFEST" in readme  # placeholders, no paths
    assert str(tmp_path) not in readme and "/data/pretrain" not in readme
    assert "$" not in readme.replace("$torch.device", "")  # every template field was filled
    # provenance as names and digests; the manifest path only in the two configs that read it
    assert metadata["volpre_pretraining"]["checkpoint"] == {"file": "resnet.pt", "sha256": checkpoint_sha256}
    assert metadata["volpre_pretraining"]["manifest"] == {"file": "manifest.json", "sha256": "ab" * 32}
    assert train["bundle_root"] == inference["bundle_root"] == "."
    assert inference["manifest"] == str(demo_manifest.resolve())
    holding = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and str(demo_manifest.parent).encode()
               in p.read_bytes()}
    assert holding == {"configs/train.json", "configs/inference.json"}


def test_export_arguments_are_checked(tmp_path, swin_checkpoint, resnet_checkpoint):
    with pytest.raises(ValueError, match=r"task: got 'classification', expected one of segmentation, survival"):
        export_bundle(resnet_checkpoint, "classification", tmp_path / "b")
    with pytest.raises(ValueError, match=r"out_channels: got None; a segmentation bundle needs the number of classes"):
        export_bundle(resnet_checkpoint, "segmentation", tmp_path / "b")
    with pytest.raises(ValueError, match=r"out_channels: got 3; a survival bundle predicts one risk"):
        export_bundle(resnet_checkpoint, "survival", tmp_path / "b", out_channels=3)
    with pytest.raises(ValueError, match=r"network: got 'flexibleunet'; a segmentation bundle of the swin encoder "
                                         r".* can hold swinunetr"):
        export_bundle(swin_checkpoint, "segmentation", tmp_path / "b", network="flexibleunet", out_channels=2)
    with pytest.raises(ValueError, match=r"roi_size: got \[32, 32, 32\]; SwinUNETR needs at least 64 voxels per axis"):
        export_bundle(swin_checkpoint, "segmentation", tmp_path / "b", out_channels=2, roi_size=(32, 32, 32))
    with pytest.raises(ValueError, match=r"roi_size: got \[48, 64, 64\], expected three positive multiples of 32"):
        export_bundle(resnet_checkpoint, "survival", tmp_path / "b", roi_size=(48, 64, 64))
    with pytest.raises(ValueError, match=r"modality: got 'PET', expected 'CT' or 'MR'"):
        export_bundle(resnet_checkpoint, "survival", tmp_path / "b", modality="PET")
    with pytest.raises(ValueError, match=r"ct_window must be \[low, high\] in HU with low < high, "
                                         r"got \[250\.0, -175\.0\]"):
        export_bundle(resnet_checkpoint, "survival", tmp_path / "b", ct_window=(250, -175))
    with pytest.raises(ValueError, match=r"ct_window must be \[low, high\] in HU, got \(-175,\)"):
        export_bundle(resnet_checkpoint, "survival", tmp_path / "b", ct_window=(-175,))
    with pytest.raises(ValueError, match=r"ct_window: got \[-175, 250\] for a MR bundle; only CT is windowed"):
        export_bundle(resnet_checkpoint, "survival", tmp_path / "b", modality="MR", ct_window=[-175, 250])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match=r"bundle output .*full is a non-empty directory"):
        export_bundle(resnet_checkpoint, "survival", tmp_path / "full")
    assert not (tmp_path / "b").exists()


def test_survival_export_of_a_swin_encoder(tmp_path, swin_checkpoint):
    out = export_bundle(swin_checkpoint, "survival", tmp_path / "bundle", modality="MR")
    train = json.loads((out / "configs/train.json").read_text())
    assert train["network_def"]["encoder"]["_target_"] == "volpre.models.SwinEncoder"
    assert train["network_def"]["encoder"]["feature_size"] == 12 and train["modality"] == "MR"
    assert train["manifest"] is None and "out_channels" not in train
    exported = torch.load(out / "models/pretrained_encoder.pt", weights_only=True)
    assert all(k.startswith("encoder.") for k in exported)
    metadata = json.loads((out / "configs/metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA_FILE.read_text()))
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 1
    readme = (out / "docs/README.md").read_text()
    assert "This bundle was exported without one, so `--manifest` is required." in readme
    assert "--manifest MANIFEST" in readme and "--bundle_root BUNDLE" in readme


def test_a_bundle_exported_without_manifest_holds_no_local_path(tmp_path, swin_checkpoint, monkeypatch):
    """Hospital folders carry patient names (``cohort_Doe_MRN123/``): nothing local may ship."""
    private = tmp_path / "cohort_Doe_MRN123"
    private.mkdir()
    checkpoint = private / "last.pt"
    state = torch.load(swin_checkpoint, weights_only=True)
    state["manifest"] = {"path": str(private / "archive.json"), "sha256": "cd" * 32}
    torch.save(with_checksum(state), checkpoint)
    monkeypatch.chdir(private)
    out = export_bundle(checkpoint, "survival", private / "bundle")
    assert local_paths_in(out, [private, tmp_path, Path.home(), REPO]) == {}
    metadata = json.loads((out / "configs/metadata.json").read_text())
    assert metadata["volpre_pretraining"]["manifest"] == {"file": "archive.json", "sha256": "cd" * 32}
    assert "archive.json (sha256 " + "cd" * 32 in metadata["data_source"]
    for name in ("train.json", "inference.json"):
        config = json.loads((out / "configs" / name).read_text())
        assert config["bundle_root"] == "." and config["manifest"] is None


def test_the_path_finder_finds_local_paths(tmp_path):
    (tmp_path / "a.json").write_text('{"bundle_root": "/home/doe/bundle", "ckpt": "$@bundle_root + \'/models/x.pt\'"}')
    (tmp_path / "b.pt").write_bytes(b"\x00\x01" + str(tmp_path / "x").encode() + b"\xff")
    (tmp_path / "c.md").write_text("see https://github.com/Project-MONAI/MONAI/tree/dev and `models/model.pt`")
    assert local_paths_in(tmp_path, [tmp_path]) == {"a.json": ["/home/doe/bundle"], "b.pt": [str(tmp_path)]}


def test_templates_are_found_in_the_source_tree():
    root = templates_root()
    assert (root / "common" / "LICENSE").is_file()
    for task in ("segmentation", "survival"):
        for name in ("train.json", "inference.json", "evaluate.json", "metadata.json"):
            json.loads((root / task / "configs" / name).read_text())  # valid JSON


# ----------------------------------------------------------------------------- datalists and transforms


def test_segmentation_and_survival_records_come_from_the_manifest(demo_manifest):
    from volpre.data.manifest import load_manifest

    entries = load_manifest(demo_manifest).entries
    records = datalist.segmentation_records(str(demo_manifest), "train", "CT")
    expected = [e for e in entries if e.split == "train" and e.modality == "CT"]
    assert [r["id"] for r in records] == [e.id for e in expected]
    assert all(set(r) <= {"image", "label", "id", "series_uid"} and Path(r["label"]).is_absolute() for r in records)
    survival = datalist.survival_records(demo_manifest, "train", "CT")
    assert [tuple(r["outcome"]) for r in survival] == [(e.time, float(e.event)) for e in expected]
    assert survival[0]["outcome"].dtype == np.float32 and "label" not in survival[0]
    assert datalist.manifest_dir(demo_manifest) == str(demo_manifest.resolve().parent)


def test_datalist_errors_name_the_problem(demo_manifest, tmp_path):
    with pytest.raises(ValueError, match=r"the bundle's `manifest` is not set: pass --manifest PATH"):
        datalist.segmentation_records(None, "train", "CT")
    with pytest.raises(ValueError, match=r"split 'holdout' holds 0 CT entries with label \(0 CT entries in that split "
                                         r"in all\); expected at least 1"):
        datalist.segmentation_records(demo_manifest, "holdout", "CT")
    with pytest.raises(ValueError, match=r"split 'train' holds 0 MR entries with time and event .*expected at least 2"):
        datalist.survival_records(demo_manifest, "train", "MR")


def test_export_command_refuses_a_bad_ct_window_in_one_line(tmp_path, resnet_checkpoint, capsys):
    from volpre.cli import main

    status = main(["export", str(resnet_checkpoint), "--task", "survival", "--out", str(tmp_path / "b"),
                   "--ct-window", "250", "-175"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "volpre export: error: ct_window must be [low, high] in HU with low < high, got [250.0, -175.0]"]
    assert not (tmp_path / "b").exists()


def test_deterministic_transforms_window_pad_and_drop_series_uid(demo_manifest):
    cfg = load_config("resnet-dae-tiny", ["preprocess.spacing=[8.0,8.0,8.0]"])
    records = datalist.segmentation_records(demo_manifest, "train", "CT")
    dicom = next(r for r in records if "series_uid" in r)
    transforms = deterministic_transforms(cfg.preprocess, "CT", (64, 64, 64), with_label=True)
    assert not any(type(t).__name__ == "Compose" for t in transforms)  # flat, so CacheDataset caches all of it
    out = dicom
    for t in transforms:
        out = t(out)
    assert "series_uid" not in out
    image, label = out["image"], out["label"]
    assert image.dtype == torch.float32 and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert tuple(image.shape[1:]) == tuple(label.shape[1:]) and min(image.shape[1:]) >= 64
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0, 2.0}


# ----------------------------------------------------------------------------- fine-tuning helpers


def test_encoder_param_groups_split_every_parameter_once():
    net = networks.flexible_unet(1, 2, "resnet10", decoder_channels=(32, 16, 16, 8, 8))
    groups = finetune.encoder_param_groups(net, 1e-5, 1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()) and len(set(ids)) == len(ids)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.encoder.parameters()}
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]
    with pytest.raises(ValueError, match=r"learning rates must be > 0, got encoder_learning_rate=0"):
        finetune.encoder_param_groups(net, 0, 1e-4)


def test_freeze_encoder_freezes_the_first_epochs_then_trains_it():
    torch.manual_seed(0)
    state = encoder_state("swin-dae-tiny")
    from volpre.models import SwinEncoder

    net = networks.survival_net(SwinEncoder(1, 12, (2, 2, 2, 2), (3, 6, 12, 24), 4, True, False, 0.0),
                                hidden_channels=(8,))
    net.encoder.load_state_dict(state)
    optimizer = torch.optim.AdamW(finetune.encoder_param_groups(net, 1e-3, 1e-3), weight_decay=0.1)
    images = torch.rand(4, 1, 32, 32, 32)
    trainable, changed = [], []

    def step(engine, _):
        before = net.encoder.patch_embed.proj.weight.detach().clone()
        optimizer.zero_grad()
        net(images).square().mean().backward()
        optimizer.step()
        trainable.append(net.encoder.patch_embed.proj.weight.requires_grad)
        changed.append(not torch.equal(before, net.encoder.patch_embed.proj.weight))

    engine = Engine(step)
    finetune.FreezeEncoder(net, epochs=2).attach(engine)
    engine.run([0], max_epochs=3)
    assert trainable == [False, False, True] and changed == [False, False, True]
    with pytest.raises(ValueError, match=r"freeze_encoder_epochs must be an integer >= 0, got -1"):
        finetune.FreezeEncoder(net, epochs=-1)


# ----------------------------------------------------------------------------- defaults that work


@pytest.mark.parametrize("config", [c for c in shipped_configs() if not c.startswith("nnunet")])
def test_export_with_default_options_succeeds_for_every_shipped_config(config, tmp_path):
    """``volpre export CKPT --task segmentation --out-channels 3 --out B`` (nnunet configs: tests/test_nnunet.py)."""
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", config)
    bundle = export_bundle(checkpoint, "segmentation", tmp_path / "seg", out_channels=3)
    train = json.loads((bundle / "configs/train.json").read_text())
    pretraining = list(load_config(config).data.roi)
    readme = (bundle / "docs/README.md").read_text()
    if load_config(config).model.encoder == "swin" and min(pretraining) < builder.SWINUNETR_MIN_TRAIN_ROI:
        assert train["roi_size"] == [max(r, 64) for r in pretraining]
        assert f"the pretraining crop {pretraining} raised to {train['roi_size']}, the smallest crop SwinUNETR" in readme
    else:
        assert train["roi_size"] == pretraining
    if config.endswith("-tiny"):
        export_bundle(checkpoint, "survival", tmp_path / "surv")
KILLED_HALF_WAY = """
import os, signal, sys
from volpre.export import builder
def killed(*args, **kwargs):  # the encoder and configs are written; metadata and docs are not
    os.kill(os.getpid(), signal.SIGKILL)
builder.fill_metadata = killed
builder.export_bundle(sys.argv[1], "segmentation", sys.argv[2], out_channels=2)
"""


def test_export_killed_or_failing_half_way_leaves_no_bundle(tmp_path, resnet_checkpoint, monkeypatch):
    import os
    import sys
    import textwrap

    from child_processes import run_command

    repo = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "bundle"
    proc = run_command([sys.executable, "-c", textwrap.dedent(KILLED_HALF_WAY), str(resnet_checkpoint), str(out)],
                       timeout=600, env=env)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not out.exists()
    (left,) = tmp_path.glob(".bundle.tmp*")  # the dead exporter's half bundle, beside OUT
    assert (left / "models/pretrained_encoder.pt").is_file() and not (left / "configs/metadata.json").exists()

    def failing(*args, **kwargs):
        raise RuntimeError("disk went away")

    with monkeypatch.context() as patch:  # the next export removes it, and its own half bundle when it fails
        patch.setattr(builder, "fill_metadata", failing)
        with pytest.raises(RuntimeError, match="disk went away"):
            export_bundle(resnet_checkpoint, "segmentation", out, out_channels=2)
    assert not out.exists() and not list(tmp_path.glob(".bundle.tmp*"))

    assert export_bundle(resnet_checkpoint, "segmentation", out, out_channels=2) == out  # the rerun works
    assert (out / "configs/metadata.json").is_file() and not list(tmp_path.glob(".bundle.tmp*"))
    train = json.loads((out / "configs/train.json").read_text())
    assert train["bundle_root"] == "."  # MONAI's convention: no local path, neither OUT nor the build folder
    assert not any(".bundle.tmp" in f.read_text() for f in out.rglob("*") if f.suffix in (".json", ".md"))
