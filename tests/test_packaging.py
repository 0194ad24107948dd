"""setup.cfg lists volpre's packages by hand (bundles/ ships as volpre.bundle_templates): keep it true."""

import configparser
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "volpre").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert listed == on_disk | {"volpre.bundle_templates"}
    assert cfg["options"]["package_dir"].split() == ["volpre.bundle_templates", "=", "bundles"]
    assert (REPO / "bundles" / "segmentation" / "configs" / "train.json").is_file()
