"""Run config: shipped configs load, unknown keys and bad values are named, overrides apply."""

import pytest

from volpre.config import ConfigError, RunConfig, config_from_dict, config_hash, load_config, shipped_configs


def test_defaults_validate():
    RunConfig().validate()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train": {"lrr": 1.0}}, r"unknown config key train\.lrr; allowed keys under train: lr, "),
        ({"bogus": {}}, r"unknown config key bogus; allowed keys under the top level: preprocess, data"),
        ({"train": {"amp": "fp32"}}, r"train\.amp: got 'fp32', expected one of 'none', 'bf16', 'fp16'"),
        ({"data": {"roi": [64, 64]}}, r"data\.roi: got \[64, 64\], expected a list of 3"),
        ({"data": {"roi": [64, 64, 40]}}, r"data\.roi must be multiples of 32"),
        ({"model": {"resnet": {"depth": 20}}}, r"model\.resnet\.depth: got 20, expected one of 10, 18, 34, 50"),
        ({"train": {"grad_accum": 0}}, r"train\.grad_accum must be >= 1, got 0"),
        ({"train": {"compile": "yes"}}, r"train\.compile: got 'yes', expected bool"),
        ({"preprocess": {"ct_window": [100, -100]}}, r"preprocess\.ct_window must be \[low, high\]"),
        ({"data": "x"}, r"data: expected a mapping of keys"),
        ({"train": {"channels_last": True}}, r"train\.channels_last does not help model\.encoder swin: SwinViT"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_ints_are_accepted_for_floats_but_not_the_reverse():
    cfg = config_from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: got 1\.5, expected int"):
        config_from_dict({"train": {"warmup_steps": 1.5}})


def test_shipped_configs_load_and_tiny_profiles_inherit():
    names = shipped_configs()
    for name in ("swin-dae", "swin-mvm", "resnet-dae", "resnet-mvm", "swin-simclr", "resnet-simclr", "swin-micle",
                 "resnet-micle"):
        assert name in names and f"{name}-tiny" in names
    for name in names:
        load_config(name)
    full, tiny = load_config("swin-dae"), load_config("swin-dae-tiny")
    assert full.data.roi == (96, 96, 96) and full.model.swin.feature_size == 48
    assert tiny.data.roi < full.data.roi and tiny.objective.name == full.objective.name == "dae"


def test_overrides(tmp_path):
    cfg = load_config("resnet-dae-tiny", ["train.lr=0.001", "data.roi=[64, 64, 32]", "objective.dae.loss=l2"])
    assert cfg.train.lr == 0.001 and cfg.data.roi == (64, 64, 32) and cfg.objective.dae.loss == "l2"
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config("resnet-dae-tiny", ["train.lr"])
    with pytest.raises(ConfigError, match=r"unknown config key train\.learning_rate"):
        load_config("resnet-dae-tiny", ["train.learning_rate=1"])


def test_config_files_and_bases(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr: 0.01\n  seed: 3\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  seed: 4\n")
    cfg = load_config(str(child))
    assert (cfg.train.lr, cfg.train.seed) == (0.01, 4)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="names itself as a base"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match=r"config 'nope' not found: give a YAML file path or one of .*swin-dae"):
        load_config("nope")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(broken))


def test_config_hash_tracks_values():
    a, b = RunConfig(), RunConfig()
    assert config_hash(a.preprocess) == config_hash(b.preprocess)
    b.preprocess.spacing = (2.0, 2.0, 2.0)
    assert config_hash(a.preprocess) != config_hash(b.preprocess)


def test_numbers_written_as_text_are_read_for_numeric_fields(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 as a string: it wants a dot in a float
    cfg = load_config("resnet-dae-tiny", ["train.lr=1e-4", "train.min_lr=1E-6", "preprocess.spacing=[4e0, 4, 3.5]",
                                          "train.total_steps=1000"])
    assert cfg.train.lr == 1e-4 and cfg.train.min_lr == 1e-6 and cfg.preprocess.spacing == (4.0, 4.0, 3.5)
    path = tmp_path / "run.yaml"
    path.write_text("base: resnet-dae-tiny\ntrain:\n  lr: 3e-4\n  weight_decay: '5e-2'\n  seed: '7'\n")
    cfg = load_config(str(path))
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.seed) == (3e-4, 0.05, 7)
    for override, message in [
        ("train.seed=1e3", r"train\.seed: got '1e3', expected int"),  # ints take integer literals only
        ("train.lr=fast", r"train\.lr: got 'fast', expected float"),
        ("train.compile=1", r"train\.compile: got 1, expected bool"),
        ("model.resnet.depth='18'", r"model\.resnet\.depth: got '18', expected one of 10, 18, 34, 50"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("resnet-dae-tiny", [override])


@pytest.mark.parametrize("override, message", [
    ("train.lr=.inf", r"train\.lr: got inf, expected a finite float"),
    ("train.lr=inf", r"train\.lr: got inf, expected a finite float"),
    ("train.lr=1e999", r"train\.lr: got inf, expected a finite float"),
    ("train.weight_decay=.nan", r"train\.weight_decay: got nan, expected a finite float"),
    ("train.clip_grad_norm=.inf", r"train\.clip_grad_norm: got inf, expected a finite float"),
    ("objective.dae.cmcl_temperature=-.inf", r"objective\.dae\.cmcl_temperature: got -inf, expected a finite float"),
    ("preprocess.spacing=[4, .nan, 4]", r"preprocess\.spacing\[1\]: got nan, expected a finite float"),
    ("preprocess.ct_window=[-.inf, 1000]", r"preprocess\.ct_window\[0\]: got -inf, expected a finite float"),
])
def test_floats_must_be_finite(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("resnet-dae-tiny", [override])


def test_non_finite_override_is_refused_by_the_cli(tmp_path, capsys):
    from volpre.cli import main

    assert main(["pretrain", "--config", "resnet-dae-tiny", "--manifest", str(tmp_path / "m.json"), "--output",
                 str(tmp_path / "run"), "train.lr=.inf"]) == 2
    assert capsys.readouterr().err == "volpre pretrain: error: train.lr: got inf, expected a finite float\n"
    assert not (tmp_path / "run").exists()
