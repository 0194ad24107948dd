"""The nnunet encoder: nnU-Net's planner, network, preprocessing, trainer and loader, unmodified.

The session fixture lays the demo CT volumes out as an nnU-Net raw dataset, runs nnU-Net's own
``nnUNetv2_plan_and_preprocess`` on it (in a child process, with nnU-Net's environment variables),
and adds to the plans a small configuration ``3d_tiny`` that inherits from the planner's
``3d_fullres`` (nnU-Net's ``inherits_from``; the same data, a CPU-sized network), as nnU-Net users
add custom configurations. Unit tests of the sparse execution use networks built from the planner's
own plans too.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="the nnunet extra is part of the test extra: pip install -e '.[test]'")

from child_processes import run_command  # noqa: E402
from volpre.cli import main  # noqa: E402
from volpre.config import ConfigError, NNUNetConfig, load_config  # noqa: E402
from volpre.data.manifest import load_manifest  # noqa: E402
from volpre.data.nnunet_plan import NNUNetPlan, plans_sha256, resolve_run_config  # noqa: E402
from volpre.data.readers import read_volume  # noqa: E402
from volpre.engine.checkpoint import with_checksum  # noqa: E402
from volpre.export.nnunet import export_nnunet  # noqa: E402
from volpre.models.nnunet import build_nnunet_network, pretraining_network, transferable_keys  # noqa: E402
from volpre.models.weights import WeightsError  # noqa: E402
from volpre.objectives import build_pretrainer, draw_and_forward  # noqa: E402
from volpre.objectives.sparse_nnunet import masked_instance_norm, sparse_encoder_features  # noqa: E402

DATASET = "Dataset501_VolpreDemo"
TINY = "3d_tiny"
SCRIPTS = Path(__file__).parent / "scripts"
BIN = Path(sys.executable).parent


def nnunet_env(root: Path, augmentation_processes: int = 0) -> dict[str, str]:
    """nnU-Net's environment: its folders under ``root``; data augmentation in the main process by default
    (``nnUNet_n_proc_DA=0``: no worker processes; the planner needs a positive value, it sets torch's threads)."""
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": str(augmentation_processes),
            "nnUNet_compile": "false", "OMP_NUM_THREADS": "2"}


def write_raw_dataset(manifest: Path, folder: Path) -> list[str]:
    """The manifest's labelled CT entries as an nnU-Net raw dataset (``imagesTr/ID_0000.nii.gz``, ``labelsTr``).

    Volumes are read with volpre's reader (RAS), every second voxel kept (twice the spacing: about 39^3
    voxels, so nnU-Net's planner and preprocessor run fast) and written with SimpleITK in its (z, y, x)
    index order.
    """
    import SimpleITK as sitk

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    ids = []
    for entry in load_manifest(manifest).entries:
        if entry.modality != "CT" or entry.label is None:
            continue
        image, label = read_volume(entry.image[0], series_uid=entry.series_uid), read_volume(entry.label)
        spacing = tuple(2.0 * float(s) for s in np.asarray(image.pixdim)[:3])
        for array, path, dtype in ((image[0].numpy()[::2, ::2, ::2], folder / "imagesTr" / f"{entry.id}_0000.nii.gz", np.int16),
                                   (label[0].numpy()[::2, ::2, ::2], folder / "labelsTr" / f"{entry.id}.nii.gz", np.uint8)):
            written = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)).astype(dtype))
            written.SetSpacing(spacing)
            sitk.WriteImage(written, str(path))
        ids.append(entry.id)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "lesion": 2},
        "numTraining": len(ids), "file_ending": ".nii.gz"}))
    return ids


def add_tiny_configuration(plans_file: Path) -> None:
    """Add ``3d_tiny`` to the plans: inherits ``3d_fullres`` (data, preprocessing), a 4-stage, 8-channel U-Net."""
    plans = json.loads(plans_file.read_text())
    architecture = copy.deepcopy(plans["configurations"]["3d_fullres"]["architecture"])
    architecture["arch_kwargs"].update(
        n_stages=4, features_per_stage=[8, 16, 32, 64], kernel_sizes=[[3, 3, 3]] * 4,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1, 1],
        n_conv_per_stage_decoder=[1, 1, 1])
    plans["configurations"][TINY] = {"inherits_from": "3d_fullres", "patch_size": [32, 32, 32], "batch_size": 2,
                                     "architecture": architecture}
    plans_file.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="session")
def planned(tmp_path_factory, demo_manifest) -> dict:
    """nnU-Net's planner and preprocessor run on the demo CT cases; ``3d_tiny`` added to its plans."""
    root = tmp_path_factory.mktemp("nnunet")
    ids = write_raw_dataset(demo_manifest, root / "raw" / DATASET)
    result = run_command([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "501", "-c", "3d_fullres", "-np", "1",
                          "-npfp", "1"], timeout=900, env=nnunet_env(root, augmentation_processes=1))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plans_file = root / "preprocessed" / DATASET / "nnUNetPlans.json"
    add_tiny_configuration(plans_file)
    return {"root": root, "plans": plans_file, "ids": ids, "manifest": demo_manifest}


def tiny(config: str, planned: dict, *overrides: str):
    return load_config(config, [f"model.nnunet.plans={planned['plans']}", f"model.nnunet.configuration={TINY}",
                                "data.num_workers=0", "train.log_every=1", "train.checkpoint_every=2", *overrides])


@pytest.fixture(scope="session")
def pretrained(planned, tmp_path_factory) -> dict[str, Path]:
    """Two-step nnunet-dae-tiny and nnunet-mvm-tiny runs on the raw dataset's images, from the plans."""
    from volpre.data.manifest import Manifest, save_manifest
    from volpre.engine.trainer import pretrain

    root = tmp_path_factory.mktemp("nnunet-pretrain")
    ct = root / "ct.json"
    save_manifest(Manifest(entries=raw_entries(planned)), ct)
    return {name: pretrain(tiny(f"nnunet-{name}-tiny", planned), ct, root / name, max_steps=2, device="cpu").checkpoint
            for name in ("dae", "mvm")}


# ----------------------------------------------------------------------------- plans, preprocessing, network


def raw_entries(planned: dict) -> list:
    from volpre.data.manifest import ManifestEntry

    images = planned["root"] / "raw" / DATASET / "imagesTr"
    return [ManifestEntry(image=(images / f"{case}_0000.nii.gz",), id=case, modality="CT") for case in planned["ids"]]


def test_preprocessing_equals_nnunets_own_preprocessed_cases(planned):
    """volpre's reader (RAS, axes reversed) + the plan's preprocessor == nnU-Net's SimpleITKIO + preprocessor."""
    plan = NNUNetPlan.load(NNUNetConfig(plans=str(planned["plans"]), configuration="3d_fullres"))
    import blosc2

    folder = planned["root"] / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    for entry in raw_entries(planned)[:3]:
        theirs = blosc2.open(str(folder / f"{entry.id}.b2nd"))[:]
        ours = plan.preprocess_entry(entry)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_resolve_run_config_takes_the_plans_patch_size_and_checks_the_crop(planned):
    plan = NNUNetPlan.load(NNUNetConfig(plans=str(planned["plans"]), configuration="3d_fullres"))
    full = resolve_run_config(load_config("nnunet-mvm", [f"model.nnunet.plans={planned['plans']}"]))
    assert full.data.roi == plan.patch_size and full.model.nnunet.configuration == "3d_fullres"
    assert resolve_run_config(tiny("nnunet-dae-tiny", planned)).data.roi == (32, 32, 32)
    with pytest.raises(ConfigError, match=r"data\.roi \[20, 32, 32\] does not fit the nnU-Net plan .* total stride "
                                          r"\[8, 8, 8\] and at least twice it"):
        resolve_run_config(tiny("nnunet-dae-tiny", planned, "data.roi=[20,32,32]"))
    with pytest.raises(ConfigError, match=r"model\.in_channels is 2, but .* normalises 1 channel\(s\) \(CTNormalization\)"):
        resolve_run_config(tiny("nnunet-dae-tiny", planned, "model.in_channels=2"))
    with pytest.raises(ConfigError, match=r"objective\.mvm\.mask_patch 4: mask cells of \[4, 4, 4\] voxels must be "
                                          r"multiples of the total stride \[8, 8, 8\]"):
        resolve_run_config(tiny("nnunet-mvm-tiny", planned, "objective.mvm.mask_patch=4"))
    with pytest.raises(ConfigError, match=r"model\.nnunet\.configuration: got '3d_huge'; the plans .* have 2d, "
                                          r"3d_fullres, 3d_tiny"):
        resolve_run_config(tiny("nnunet-dae-tiny", planned, "model.nnunet.configuration=3d_huge"))
    with pytest.raises(ConfigError, match=r"model\.nnunet\.plans is not set: give the plans file"):
        resolve_run_config(load_config("nnunet-dae"))
    with pytest.raises(ConfigError, match=r"data\.roi: null \(the plan's patch size\) is only for model\.encoder nnunet"):
        load_config("swin-dae-tiny", ["data.roi=null"])


def test_network_is_the_one_nnunets_trainer_builds(planned):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plan = NNUNetPlan.load(NNUNetConfig(plans=str(planned["plans"]), configuration="3d_fullres"))
    manager = PlansManager(str(planned["plans"]))
    torch.manual_seed(0)
    theirs = nnUNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 3, True)
    torch.manual_seed(0)
    ours = build_nnunet_network(plan, num_classes=3, deep_supervision=True)
    assert type(ours) is type(theirs)
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state)  # nnU-Net's own initialisation
    pretraining = pretraining_network(plan).state_dict()
    assert set(transferable_keys(pretraining)) == set(transferable_keys(theirs_state))


# ----------------------------------------------------------------------------- sparse execution (SparK)


def test_masked_instance_norm_equals_instance_norm_of_each_samples_visible_voxels():
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 4, 6, 8) * 3 + 1
    visible = torch.rand(2, 1, 4, 6, 8) > 0.4
    out = masked_instance_norm(x, visible, norm)
    for b in range(2):
        values = x[b][:, visible[b, 0]]  # (C, N) visible voxels of sample b
        reference = torch.nn.functional.instance_norm(values[None], weight=norm.weight, bias=norm.bias,
                                                      eps=norm.eps)[0]
        torch.testing.assert_close(out[b][:, visible[b, 0]], reference, rtol=1e-5, atol=1e-5)
        assert torch.all(out[b][:, ~visible[b, 0]] == 0)


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_sparse_encoder_is_dense_when_all_visible_and_ignores_masked_voxels(planned, architecture):
    plans = json.loads(planned["plans"].read_text())
    if architecture == "ResidualEncoderUNet":
        kwargs = plans["configurations"][TINY]["architecture"]["arch_kwargs"]
        kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
        plans["configurations"][TINY]["architecture"]["network_class_name"] = (
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet")
    plan = NNUNetPlan.from_plans(plans, TINY, "test plans")
    torch.manual_seed(0)
    encoder = pretraining_network(plan).encoder.train()
    assert type(encoder).__name__ == {"PlainConvUNet": "PlainConvEncoder", "ResidualEncoderUNet": "ResidualEncoder"}[
        architecture]
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        dense = encoder(x)
        sparse = sparse_encoder_features(encoder, x, torch.ones(2, 1, 4, 4, 4, dtype=torch.bool))
        for d, s in zip(dense, sparse, strict=True):
            torch.testing.assert_close(s, d, rtol=1e-4, atol=1e-4)
        visible = torch.rand(2, 1, 4, 4, 4) > 0.5
        visible[:, :, 0, 0, 0] = True
        changed = x + 100.0 * (~visible).repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
        for a, b in zip(sparse_encoder_features(encoder, x, visible), sparse_encoder_features(encoder, changed, visible)):
            torch.testing.assert_close(a, b)  # masked voxels reach no feature


def test_spark_and_dae_pretrainers_reconstruct_through_nnunets_decoder(planned):
    for name in ("nnunet-mvm-tiny", "nnunet-dae-tiny"):
        cfg = resolve_run_config(tiny(name, planned))
        torch.manual_seed(0)
        pretrainer = build_pretrainer(cfg)
        batch = {"image": torch.randn(2, 1, *cfg.data.roi), "modality": torch.tensor([0, 1])}  # CT, MR: DAE's CMCL
        out = draw_and_forward(pretrainer, batch, torch.Generator().manual_seed(1))
        assert torch.isfinite(out.loss) and out.images["reconstruction"].shape == batch["image"].shape
        out.loss.backward()
        unused = [n for n, p in pretrainer.named_parameters() if p.requires_grad and p.grad is None]
        assert unused == []  # DDP-safe: every trainable parameter gets a gradient
        decoder_grads = [p.grad for n, p in pretrainer.named_parameters() if n.startswith("decoder.stages")]
        assert decoder_grads and all(g is not None and g.abs().sum() > 0 for g in decoder_grads)


# ----------------------------------------------------------------------------- export and nnU-Net's trainer


def test_export_loads_with_nnunets_loader_and_trains_in_nnunets_trainer(planned, pretrained, tmp_path):
    weights = tmp_path / "dae" / "pretrained.pth"
    export = export_nnunet(pretrained["dae"], weights)
    assert export.readme == weights.with_suffix(".md")
    command = f"nnUNetv2_train {DATASET} {TINY} 0 -p nnUNetPlans -pretrained_weights {weights.resolve()}"
    assert export.command == command and command in export.readme.read_text()
    report_file = tmp_path / "report.json"
    result = run_command([sys.executable, str(SCRIPTS / "nnunet_finetune.py"), DATASET, TINY, "nnUNetPlans",
                          str(weights), "2", str(report_file)], timeout=600, env=nnunet_env(planned["root"]))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    non_head = sorted(k for k in report["network_keys"] if ".seg_layers." not in k)
    assert report["file_keys"] == non_head  # every non-head key comes from the file ...
    assert report["keys_equal_to_file"] == non_head  # ... and equals it after nnU-Net's load
    assert report["head_keys"] and report["heads_kept_initialisation"]
    assert len(report["losses"]) == 2 and all(np.isfinite(report["losses"]))
    assert report["trained_keys_moved"]  # nnU-Net's optimiser trained from the loaded weights
    # torchvision from the registry does not load with the CPU torch (``operator torchvision::nms does not
    # exist``), so ``import timm`` fails: nnU-Net's trainer and loader and volpre's nnunet modules run without it
    assert report["timm_imported"] is False


def test_mvm_export_loads_with_nnunets_loader_in_process(planned, pretrained, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    weights = tmp_path / "mvm.pth"
    export_nnunet(pretrained["mvm"], weights)
    plan = NNUNetPlan.load(NNUNetConfig(plans=str(planned["plans"]), configuration=TINY))
    network = build_nnunet_network(plan, num_classes=3, deep_supervision=True)
    load_pretrained_weights(network, str(weights))
    ours = torch.load(weights, weights_only=True)
    assert ours["volpre_export"]["plans_sha256"] == plans_sha256(json.loads(planned["plans"].read_text()))
    state = network.state_dict()
    assert set(ours["network_weights"]) == set(transferable_keys(state))
    assert all(torch.equal(state[k], v) for k, v in ours["network_weights"].items())
    saved = torch.load(pretrained["mvm"], weights_only=True)["model"]
    assert torch.equal(ours["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"],
                       saved["encoder.stages.0.0.convs.0.conv.weight"])


def test_export_errors_name_the_problem(planned, pretrained, tmp_path, capsys):
    from test_export import make_checkpoint

    swin = make_checkpoint(tmp_path / "swin.pt", "swin-dae-tiny")
    assert main(["export", str(swin), "--task", "nnunet", "--out", str(tmp_path / "a.pth")]) == 2
    assert "--task nnunet needs a checkpoint of model.encoder nnunet; " in capsys.readouterr().err
    assert main(["export", str(pretrained["dae"]), "--task", "nnunet", "--out", str(tmp_path / "b.pth"),
                 "--out-channels", "3"]) == 2
    assert "--out-channels: bundle options; --task nnunet writes nnU-Net weights" in capsys.readouterr().err
    first = tmp_path / "c.pth"
    assert main(["export", str(pretrained["dae"]), "--task", "nnunet", "--out", str(first)]) == 0
    assert main(["export", str(pretrained["dae"]), "--task", "nnunet", "--out", str(first)]) == 2
    assert f"{first} exists; choose another --out" in capsys.readouterr().err
    saved = torch.load(pretrained["dae"], weights_only=True)
    saved["model"].pop("decoder.stages.0.convs.0.conv.weight")
    saved["model"]["encoder.extra"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    torch.save(with_checksum(saved), broken)  # intact as a file: the keys are what is wrong
    with pytest.raises(WeightsError, match=r"(?s)missing from the file \(1\): decoder.stages.0.convs.0.conv.weight\n"
                                           r"  unexpected in the file \(1\): encoder.extra"):
        export_nnunet(broken, tmp_path / "d.pth")


@pytest.mark.slow
def test_nnunetv2_train_command_from_the_readme_runs_one_epoch(planned, pretrained, tmp_path):
    """The exact command of FILE.md, with nnU-Net's one-epoch trainer and -device cpu."""
    weights = tmp_path / "cli.pth"
    export = export_nnunet(pretrained["mvm"], weights)
    argv = export.command.replace("nnUNetv2_train", str(BIN / "nnUNetv2_train"), 1).split()
    argv += ["-tr", "nnUNetTrainer_1epoch", "-device", "cpu"]
    result = run_command(argv, timeout=1800, env=nnunet_env(planned["root"]))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Loading pretrained weights from file" in output
    final = planned["root"] / "results" / DATASET / f"nnUNetTrainer_1epoch__nnUNetPlans__{TINY}" / "fold_0"
    assert (final / "checkpoint_final.pth").is_file()


def test_installed_torch_is_the_one_the_makefile_chose():
    """``make`` installs TORCH_SPEC first and every extra with a constraint on it: nnU-Net's dependencies
    (timm -> torchvision) must not have replaced it."""
    import re
    from importlib.metadata import version

    spec = os.environ.get("TORCH_SPEC") or re.search(
        r"^TORCH_SPEC \?= (\S+)$", (Path(__file__).parents[1] / "Makefile").read_text(), re.M).group(1)
    wanted = spec.split("==", 1)[1] if "==" in spec else None
    if wanted is None:
        pytest.skip(f"TORCH_SPEC {spec!r} pins no version")
    assert version("torch").split("+")[0] == wanted.split("+")[0]


