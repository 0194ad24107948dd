"""Exported bundles under MONAI's own bundle machinery: verify, initialise, run, torchrun, TorchScript.

Three bundles are exported once per session: a FlexibleUNet (ResNet-10 encoder from a checkpoint
written by ``volpre.engine.trainer.pretrain``), a SwinUNETR and a survival network (Swin encoder,
feature_size 12). Data: 6 demo subjects at 8 mm (small volumes). Every ``python -m monai.bundle``
runs in a subprocess whose working directory is *not* the bundle, as users launch it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from child_processes import run_command
from local_paths import local_paths_in
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.scripts import create_workflow
from monai.handlers import LrScheduleHandler

from volpre.config import load_config
from volpre.engine.checkpoint import with_checksum
from volpre.export import export_bundle
from volpre.export.schema import copy_meta_schema
from volpre.models.weights import WeightsError
from volpre.objectives import build_pretrainer
from volpre.versions import installed_versions

REPO = Path(__file__).resolve().parents[1]
# The full profiles' pretraining window (the tiny DAE profiles pretrain at the soft one), so that the
# fine-tuning window FINETUNE_WINDOW differs from the pretraining window, as the window tests need.
TINY = ["preprocess.spacing=[8.0,8.0,8.0]", "preprocess.ct_window=[-1000.0,1000.0]", "data.num_workers=0"]
BUNDLES = ("flexibleunet", "swinunetr", "survivalnet")
ONE_EPOCH = {
    "flexibleunet": ["--train#dataset#data", "$@train_records[:2]"],
    "swinunetr": ["--train#dataset#data", "$@train_records[:1]", "--batch_size", "1", "--num_samples", "1"],
    "survivalnet": ["--val_split", "train"],  # the demo's val split has one subject: no comparable pair
}
"""Per-bundle overrides that keep a one-epoch CPU run to a few iterations."""
WORKFLOW_OVERRIDES = {"flexibleunet": {"num_workers": 0}, "swinunetr": {"num_workers": 0},
                      "survivalnet": {"num_workers": 0, "val_split": "train"}}
"""The same, for in-process ``ConfigWorkflow``s (whose property check builds the datasets)."""
FINETUNE_WINDOW = (-175.0, 250.0)
"""The flexibleunet bundle's fine-tuning CT window (MONAI's BTCV recipe); the others keep the pretraining window."""


def subprocess_env() -> dict[str, str]:
    """The environment of a bundle subprocess: this checkout of volpre importable, gloo on loopback."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""), "GLOO_SOCKET_IFNAME": "lo"}


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_command(args, timeout, cwd=cwd, env=subprocess_env())


def monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd)


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def configs(bundle: Path, *names: str) -> str:
    files = [str(bundle / "configs" / name) for name in names]
    return files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"


@pytest.fixture(scope="session")
def manifest(tmp_path_factory) -> Path:
    from volpre.demo.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo6") / "data", subjects=6, seed=0)


@pytest.fixture(scope="session")
def elsewhere(tmp_path_factory) -> Path:
    """A working directory unrelated to the bundles and the data."""
    return tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, manifest) -> dict[str, Path]:
    from volpre.engine.trainer import pretrain

    root = tmp_path_factory.mktemp("pretrain")
    result = pretrain(load_config("resnet-dae-tiny", TINY + ["train.checkpoint_every=2"]), manifest, root / "resnet",
                      max_steps=2, device="cpu")
    cfg = load_config("swin-dae-tiny", TINY)
    torch.manual_seed(1)  # not the bundles' seed 0, so scratch initialisation differs from these weights
    swin = root / "swin.pt"
    torch.save(with_checksum({"model": build_pretrainer(cfg).state_dict(), "config": cfg.to_dict(),
                              "versions": installed_versions(), "step": 0, "manifest": None, "ema": None}), swin)
    return {"resnet": result.checkpoint, "swin": swin}


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, checkpoints) -> dict[str, Path]:
    """Exported without --manifest, as a bundle meant for sharing: every run names its manifest."""
    root = tmp_path_factory.mktemp("bundles")
    return {
        "flexibleunet": export_bundle(checkpoints["resnet"], "segmentation", root / "flexibleunet", out_channels=3,
                                      ct_window=FINETUNE_WINDOW),
        "swinunetr": export_bundle(checkpoints["swin"], "segmentation", root / "swinunetr", out_channels=3,
                                   roi_size=(64, 64, 64)),
        "survivalnet": export_bundle(checkpoints["swin"], "survival", root / "survivalnet"),
    }


EXPORTED = ("LICENSE", "configs", "docs", "models/pretrained_encoder.pt")
"""What export writes (runs add models/model.pt and eval/)."""


@pytest.fixture(scope="session")
def trained(bundles, manifest, elsewhere):
    """``trained(name)``: the output of one epoch of ``configs/train.json`` of that bundle (run once)."""
    outputs: dict[str, str] = {}

    def train(name: str) -> str:
        if name not in outputs:
            bundle = bundles[name]
            outputs[name] = check(monai_bundle(
                "run", "--config_file", configs(bundle, "train.json"), "--meta_file", configs(bundle, "metadata.json"),
                "--bundle_root", str(bundle), "--manifest", str(manifest), "--train#trainer#max_epochs", "1",
                "--num_workers", "0", *ONE_EPOCH[name], cwd=elsewhere))
        return outputs[name]

    return train


def train_workflow(bundle: Path, manifest: Path, **overrides) -> ConfigWorkflow:
    """The bundle's ``train.json`` as an initialised ``ConfigWorkflow`` (nothing built yet)."""
    workflow = ConfigWorkflow(config_file=str(bundle / "configs/train.json"),
                              meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                              workflow_type="train", bundle_root=str(bundle), manifest=str(manifest), **overrides)
    workflow.initialize()
    return workflow


def parsed_network(bundle: Path, config: str, **overrides) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.update(overrides)
    return parser.get_parsed_content("network_def")


# ----------------------------------------------------------------------------- checks by MONAI's CLI


@pytest.mark.parametrize("name", BUNDLES)
def test_bundles_hold_no_local_path(name, bundles, checkpoints, manifest, tmp_path):
    exported = tmp_path / "exported"
    for part in EXPORTED:
        source = bundles[name] / part
        target = exported / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
    places = [bundles[name], checkpoints["resnet"].parent, checkpoints["swin"].parent, manifest.parent, REPO,
              Path.home(), Path.cwd()]
    assert local_paths_in(exported, places) == {}


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_metadata_offline_with_the_shipped_schema(name, bundles, elsewhere):
    schema = copy_meta_schema(elsewhere / f"{name}_schema.json")
    out = check(monai_bundle("verify_metadata", "--meta_file", configs(bundles[name], "metadata.json"),
                             "--filepath", str(schema), cwd=elsewhere))
    assert "skipped downloading" in out and "metadata is verified with no error" in out


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_net_in_out(name, bundles, elsewhere):
    bundle = bundles[name]
    # bundle_root is "." (MONAI's convention): from inside the bundle nothing else is needed; elsewhere, pass it
    where = ["--bundle_root", str(bundle)] if name != "flexibleunet" else []
    out = check(monai_bundle("verify_net_in_out", "network_def", "--meta_file", configs(bundle, "metadata.json"),
                             "--config_file", configs(bundle, "train.json"), "--device", "cpu", *where,
                             cwd=elsewhere if where else bundle))
    assert "data shape of network is verified with no error" in out


def test_the_fine_tuning_ct_window_reaches_the_transforms_and_the_metadata(bundles, manifest):
    from monai.transforms import Compose, SpatialPad

    from volpre.data.transforms import preprocess_transforms
    from volpre.export.datalist import segmentation_records

    bundle = bundles["flexibleunet"]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["volpre_finetuning"]["ct_window"] == [-175.0, 250.0]
    assert meta["volpre_finetuning"]["pretraining_ct_window"] == [-1000.0, 1000.0]
    assert meta["volpre_pretraining"]["preprocess"]["ct_window"] == [-1000.0, 1000.0]
    assert "[-175.0, 250.0]" in (bundle / "docs" / "README.md").read_text()
    other = json.loads((bundles["survivalnet"] / "configs" / "metadata.json").read_text())
    assert other["volpre_finetuning"]["ct_window"] == [-1000.0, 1000.0]  # default: the pretraining window

    parsers = {}
    for config in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / config))
        parser.update({"manifest": str(manifest)})
        assert parser.get_parsed_content("ct_window") == [-175.0, 250.0]
        parsers[config] = parser
    record = segmentation_records(manifest, "train", "CT")[0]
    windowed = Compose(parsers["train.json"].get_parsed_content("deterministic_transforms"))(dict(record))["image"]
    predicted = Compose(parsers["inference.json"].get_parsed_content("preprocessing").transforms)(
        {k: v for k, v in record.items() if k != "label"})["image"]
    # the reference: the same volume in HU (volpre's preprocessing before any window), windowed by hand
    hu = preprocess_transforms(parsers["train.json"].get_parsed_content("preprocess"), "CT")(
        {k: v for k, v in record.items() if k != "label"})["image"]
    expected = SpatialPad(parsers["train.json"].get_parsed_content("roi_size"), value=0.0)(
        torch.clamp((torch.as_tensor(hu) + 175.0) / 425.0, 0.0, 1.0))
    assert windowed.shape == expected.shape == predicted.shape
    assert torch.allclose(torch.as_tensor(windowed), torch.as_tensor(expected), atol=1e-6)
    assert torch.allclose(torch.as_tensor(predicted), torch.as_tensor(expected), atol=1e-6)  # inference: the same


# ----------------------------------------------------------------------------- ConfigWorkflow


@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
@pytest.mark.parametrize("name", BUNDLES)
def test_initialized_train_workflow_holds_the_exported_encoder(name, bundles, manifest, monkeypatch, elsewhere):
    bundle = bundles[name]
    monkeypatch.chdir(elsewhere)
    workflow = train_workflow(bundle, manifest, **WORKFLOW_OVERRIDES[name])
    network = workflow.parser.get_parsed_content("network_def")
    exported = torch.load(bundle / "models/pretrained_encoder.pt", weights_only=True)
    state = network.state_dict()
    assert exported and all(torch.equal(state[k], v) for k, v in exported.items())
    assert workflow.check_properties() in (None, [])  # every required train property is defined

    # the scratch arm, through the path `monai.bundle run` takes (create_workflow), as the README says
    scratch = create_workflow(config_file=str(bundle / "configs/train.json"),
                              meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                              workflow_type="train", bundle_root=str(bundle), manifest=str(manifest), pretrained=False,
                              **WORKFLOW_OVERRIDES[name])
    scratch_state = scratch.parser.get_parsed_content("network_def").state_dict()
    weights = [k for k, v in exported.items() if v.is_floating_point() and v.ndim >= 2]  # kernels, not norms
    assert weights and not any(torch.equal(scratch_state[k], exported[k]) for k in weights)
    groups = scratch.parser.get_parsed_content("optimizer").param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-4]  # scratch arm: one learning rate
    assert [g["lr"] for g in workflow.parser.get_parsed_content("optimizer").param_groups] == [1e-5, 1e-4]


@pytest.mark.parametrize("name", ["flexibleunet", "swinunetr"])
def test_segmentation_learning_rates_decay_by_a_cosine_to_zero_on_the_last_step(name, bundles, manifest, monkeypatch,
                                                                                  elsewhere):
    bundle = bundles[name]
    monkeypatch.chdir(elsewhere)
    # the override the README gives for the number of epochs
    workflow = train_workflow(bundle, manifest, **{**WORKFLOW_OVERRIDES[name], "train#trainer#max_epochs": 3})
    parse = workflow.parser.get_parsed_content
    steps = 3 * len(parse("train#dataloader"))
    scheduler, optimizer = parse("lr_scheduler"), parse("optimizer")
    assert scheduler.optimizer is optimizer and scheduler.T_max == steps
    attached = [h for h in parse("train#handlers") if isinstance(h, LrScheduleHandler)]
    assert len(attached) == 1 and attached[0].lr_scheduler is scheduler and not attached[0].epoch_level
    base = [g["lr"] for g in optimizer.param_groups]
    assert base == [1e-5, 1e-4]  # encoder (pretrained: a tenth), decoder
    for step in range(1, steps + 1):
        optimizer.step()
        scheduler.step()
        expected = [rate * 0.5 * (1 + math.cos(math.pi * step / steps)) for rate in base]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected, abs=1e-12)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 0.0], abs=1e-12)


@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
def test_monai_command_line_drops_none_overrides_so_scratch_is_a_boolean(bundles, manifest):
    """Why the bundles have ``pretrained: true``: ``--pretrained_encoder None`` would be ignored."""
    bundle = bundles["flexibleunet"]
    workflow = create_workflow(config_file=str(bundle / "configs/train.json"),
                               meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                               workflow_type="train", bundle_root=str(bundle), manifest=str(manifest),
                               pretrained_encoder=None)
    loaded = Path(workflow.parser.get_parsed_content("pretrained_encoder"))
    assert loaded == (bundle / "models/pretrained_encoder.pt").resolve()


def test_wrong_architecture_override_fails_with_the_key_list(bundles, manifest):
    bundle = bundles["flexibleunet"]
    workflow = train_workflow(bundle, manifest, **{"network_def#backbone": "resnet18"})
    with pytest.raises(RuntimeError) as info:
        workflow.parser.get_parsed_content("network_def")
    cause = info.value  # MONAI wraps the factory's error: find it in the chain
    while cause is not None and not isinstance(cause, WeightsError):
        cause = cause.__cause__
    assert cause is not None, f"no WeightsError behind {info.value!r}"
    assert re.search(r"pretrained encoder weights .*pretrained_encoder.pt does not fit the encoder of "
                     r"FlexibleUNet\(backbone=resnet18.*\n  missing from the file \(\d+\): encoder.layer1.1.bn1.bias",
                     str(cause)), str(cause)


# ----------------------------------------------------------------------------- monai.bundle run


@pytest.mark.parametrize("name", BUNDLES)
def test_one_epoch_of_train_json_from_another_directory(name, bundles, trained):
    out = trained(name)
    metric = "val_cindex" if name == "survivalnet" else "val_mean_dice"
    assert f"Key metric: {metric} best value" in out and "Epoch: 1/1, Iter: 1/" in out
    fine_tuned = bundles[name] / "models" / "model.pt"
    network = parsed_network(bundles[name], "inference.json", bundle_root=str(bundles[name]))  # loads model.pt strictly
    saved = torch.load(fine_tuned, weights_only=True)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in saved.items())
    # the encoder started from the exported weights and took optimiser steps (its own learning rate)
    exported = torch.load(bundles[name] / "models" / "pretrained_encoder.pt", weights_only=True)
    kernels = [k for k, v in exported.items() if v.is_floating_point() and v.ndim >= 2]
    assert all(not torch.equal(saved[k], exported[k]) for k in kernels[:3])


def test_multi_gpu_train_under_torchrun_with_gloo_and_a_frozen_encoder(bundles, manifest, tmp_path, elsewhere):
    bundle = shutil.copytree(bundles["survivalnet"], tmp_path / "survivalnet")
    (bundle / "models" / "model.pt").unlink(missing_ok=True)
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "monai.bundle", "run", "--config_file", configs(bundle, "train.json", "multi_gpu_train.json"),
                  "--meta_file", configs(bundle, "metadata.json"), "--bundle_root", str(bundle),
                  "--manifest", str(manifest), "--train#trainer#max_epochs", "1", "--num_workers", "0",
                  "--freeze_encoder_epochs", "1", *ONE_EPOCH["survivalnet"]], cwd=elsewhere)
    out = check(result)
    assert "Key metric: val_cindex best value" in out
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in saved)  # CheckpointSaver unwrapped DDP
    # the encoder stayed frozen (DDP with find_unused_parameters) and still holds the exported weights
    exported = torch.load(bundle / "models" / "pretrained_encoder.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in exported.items())


def test_ckpt_export_gives_torchscript_matching_the_network(bundles, trained, elsewhere):
    trained("flexibleunet")
    bundle = bundles["flexibleunet"]
    target = elsewhere / "flexibleunet.ts"
    check(monai_bundle("ckpt_export", "network_def", "--filepath", str(target), "--ckpt_file",
                       str(bundle / "models/model.pt"), "--meta_file", configs(bundle, "metadata.json"),
                       "--config_file", configs(bundle, "inference.json"), "--bundle_root", str(bundle),
                       "--use_trace", "True", "--input_shape", "[1, 1, 32, 32, 32]", cwd=elsewhere))
    scripted = torch.jit.load(str(target))
    network = parsed_network(bundle, "inference.json", bundle_root=str(bundle)).eval()
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x)
        assert torch.allclose(scripted(x), expected, atol=1e-5)
        assert torch.allclose(scripted(x + 0.5), network(x + 0.5), atol=1e-5)  # not a constant


def test_inference_writes_label_maps_and_evaluate_scores_the_test_split(bundles, trained, manifest, elsewhere):
    from volpre.data.manifest import load_manifest
    from volpre.data.readers import read_volume

    trained("flexibleunet")
    bundle = bundles["flexibleunet"]
    check(monai_bundle("run", "--config_file", configs(bundle, "inference.json"), "--meta_file",
                       configs(bundle, "metadata.json"), "--bundle_root", str(bundle), "--manifest", str(manifest),
                       "--num_workers", "0", cwd=elsewhere))
    tests = [e for e in load_manifest(manifest).entries if e.split == "test" and e.modality == "CT"]
    for entry in tests:
        relative = entry.image[0].relative_to(manifest.parent)
        stem = relative.name.split(".")[0]
        prediction = read_volume(bundle / "eval" / relative.parent / f"{stem}_seg.nii.gz")
        assert prediction.shape == read_volume(entry.image[0], series_uid=entry.series_uid).shape
        assert set(torch.unique(prediction).tolist()) <= {0.0, 1.0, 2.0}

    trained("survivalnet")
    survival = bundles["survivalnet"]
    # the demo's test split is one subject (two scans, one outcome): no comparable pair, so score the train split
    check(monai_bundle("run", "--config_file", configs(survival, "train.json", "evaluate.json"), "--meta_file",
                       configs(survival, "metadata.json"), "--bundle_root", str(survival), "--manifest", str(manifest),
                       "--num_workers", "0", "--val_split", "train", cwd=elsewhere))
    train = [e for e in load_manifest(manifest).entries if e.split == "train" and e.modality == "CT"]
    with open(survival / "eval" / "risks.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert sorted(row[0] for row in rows) == sorted(str(e.image[0]) for e in train)
    assert all(len(row) == 2 and float(row[1]) == float(row[1]) for row in rows)
    assert (survival / "eval" / "metrics.csv").read_text().startswith("val_cindex")


# ----------------------------------------------------------------------------- the MONAI model zoo's CI


ZOO_TORCHSCRIPT_EXEMPT = {"swinunetr"}
"""Bundles the zoo's TorchScript check would skip: its own SwinUNETR bundle (swin_unetr_btcv_segmentation) is on
ci/bundle_custom_data.py's exclude_verify_torchscript_list; ours cannot be scripted either (traced instead)."""


@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
@pytest.mark.parametrize("name", ["flexibleunet", "swinunetr"])
def test_model_zoo_ci_checks_pass_for_a_fine_tuned_bundle(name, bundles, trained, manifest, elsewhere, tmp_path,
                                                          monkeypatch):
    """What the model zoo's ``ci/verify_bundle.py`` checks in full mode, in its order, on a copy of a fine-tuned
    bundle: the necessary and preferred files, version and changelog, the metadata against MONAI's schema (as
    ``eval/schema.json``), the inference workflow's properties (meta and inference; the zoo checks them only for
    bundles whose metadata names supported_apps, which ours does not, and without data: here with a manifest,
    which every volpre bundle needs), ``verify_net_in_out`` on the inference config, and TorchScript by
    ``ckpt_export`` (scripting, the zoo's default) unless exempt."""
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
    from monai.bundle.properties import InferProperties, MetaProperties

    trained(name)
    bundle = tmp_path / name
    shutil.copytree(bundles[name], bundle)
    monkeypatch.chdir(elsewhere)
    for necessary in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert (bundle / necessary).is_file(), necessary
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    (bundle / "eval").mkdir(exist_ok=True)
    verify_metadata(meta_file=str(bundle / "configs/metadata.json"),
                    filepath=str(copy_meta_schema(bundle / "eval" / "schema.json")))
    assert "supported_apps" not in meta
    workflow = create_workflow(workflow_type="inference", bundle_root=str(bundle),
                               config_file=str(bundle / "configs/inference.json"),
                               meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                               manifest=str(manifest), num_workers=0)
    workflow.properties = {**MetaProperties, **InferProperties}
    assert workflow.check_properties() in (None, [])
    common = {"meta_file": str(bundle / "configs/metadata.json"), "config_file": str(bundle / "configs/inference.json"),
              "bundle_root": str(bundle)}
    verify_net_in_out(net_id="network_def", device="cpu", **common)
    if name in ZOO_TORCHSCRIPT_EXEMPT:
        assert "SwinUNETR cannot be scripted: the zoo exempts" in (bundle / "docs" / "README.md").read_text()
        return
    ckpt_export(net_id="network_def", filepath=str(bundle / "models/verify_model.ts"),
                ckpt_file=str(bundle / "models/model.pt"), **common)
    scripted = torch.jit.load(str(bundle / "models/verify_model.ts"))
    network = parsed_network(bundle, "inference.json", bundle_root=str(bundle)).eval()
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(scripted(x), network(x), atol=1e-5)


# ----------------------------------------------------------------------------- the Hugging Face Hub, offline


@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
def test_hugging_face_hub_layout_push_and_load_offline(bundles, trained, manifest, tmp_path, monkeypatch):
    """The documented commands, without a network: ``push_to_hf_hub`` uploads the bundle folder itself as the
    repository's root (recorded through a stand-in for ``HfApi``), and ``monai.bundle.load`` with
    ``source="huggingface_hub"`` from a folder in that layout (what ``download`` writes: BUNDLE_DIR/NAME holding
    the repository's files) builds the inference network with the fine-tuned weights and downloads nothing."""
    import huggingface_hub
    from monai.bundle import load, push_to_hf_hub

    trained("flexibleunet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return f"https://huggingface.co/{kwargs['repo_id']}"

        def create_tag(self, **kwargs):
            calls.append(("create_tag", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    bundle = bundles["flexibleunet"]
    push_to_hf_hub(repo="radiology-lab/liver-flexibleunet", name=bundle.name, bundle_dir=str(bundle.parent),
                   version="0.1.0", private=True)
    uploads = [kwargs for call, kwargs in calls if call == "upload_folder"]
    assert [u["folder_path"] for u in uploads] == [str(bundle)]
    assert ("create_tag", {"repo_id": "radiology-lab/liver-flexibleunet", "tag": "0.1.0", "exist_ok": True}) in calls

    def no_network(*args, **kwargs):
        raise AssertionError("load tried to download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    hub = tmp_path / "hub"
    shutil.copytree(bundle, hub / "liver-flexibleunet", ignore=shutil.ignore_patterns("eval", "*.ts"))
    # network_def reads the fine-tuned weights itself (strictly) from bundle_root, "." in the configs: name them
    network = load(name="liver-flexibleunet", bundle_dir=str(hub), source="huggingface_hub",
                   repo="radiology-lab/liver-flexibleunet", workflow_type="inference", device="cpu",
                   net_override={"checkpoint": str(hub / "liver-flexibleunet" / "models" / "model.pt")})
    fine_tuned = torch.load(bundle / "models" / "model.pt", weights_only=True)
    state = network.state_dict()
    assert set(state) == set(fine_tuned) and all(torch.equal(state[k], v) for k, v in fine_tuned.items())


ZOO_README_SECTIONS = ("Authors", "Tags", "Model Description", "Data", "Preprocessing", "Performance",
                       "Additional Usage Steps", "System Configuration", "Limitations", "Citation Info", "References")
"""The bold headings of the model zoo's docs/readme_template.md, in its order (its optional ones included)."""


@pytest.mark.parametrize("name", BUNDLES)
def test_docs_follow_the_model_zoo_readme_template(name, bundles):
    text = (bundles[name] / "docs" / "README.md").read_text()
    headings = re.findall(r"^#{2,4} \*\*(.+?)\*\*\s*$", text, flags=re.M)
    assert [h for h in headings if h in ZOO_README_SECTIONS] == list(ZOO_README_SECTIONS)
    assert "$" + "{" not in text  # every template field was filled
    references = text.split("## **References**", 1)[1]
    assert "Disruptive Autoencoders" in references  # both checkpoints are DAE runs
    assert ("Cox D. R." if name == "survivalnet" else "Swin UNETR") in references  # the metadata's references
    assert "self-supervised pretraining (dae)" in text.split("### **Tags**", 1)[1].split("##", 1)[0]
