"""The error root (volpre.errors): every error volpre raises on purpose derives from VolpreError; the
user-input ones from UserInputError (one line, exit 2), each keeping the built-in base it had."""

from __future__ import annotations

import pytest

from volpre.bench.errors import BenchError
from volpre.bench.step import BenchInputError
from volpre.cli import main
from volpre.commands.options import UserError
from volpre.config import ConfigError
from volpre.data.errors import CacheError, VolumeError
from volpre.data.index import IndexOptionError
from volpre.data.manifest import ManifestError
from volpre.demo.run import DemoError
from volpre.demo.synthetic import DemoInputError
from volpre.engine.checkpoint import CheckpointError
from volpre.engine.trainer import DivergenceError
from volpre.errors import UserInputError, VolpreError
from volpre.evaluate import EvaluationError
from volpre.export.errors import ExportError
from volpre.files import OutputExistsError
from volpre.models.init_weights import InitWeightsError
from volpre.models.weights import WeightsError
from volpre.processes import CommandTimeout


@pytest.mark.parametrize("error, builtin", [
    (ConfigError, ValueError), (ManifestError, ValueError), (VolumeError, ValueError), (CacheError, OSError),
    (BenchError, ValueError), (BenchInputError, ValueError), (CheckpointError, RuntimeError), (DivergenceError, RuntimeError),
    (WeightsError, RuntimeError), (InitWeightsError, ValueError), (EvaluationError, ValueError),
    (DemoInputError, ValueError), (UserError, Exception), (ExportError, ValueError), (IndexOptionError, ValueError),
    (OutputExistsError, FileExistsError),
])
def test_user_input_errors_share_the_root_and_keep_their_builtin_base(error, builtin):
    assert issubclass(error, UserInputError) and issubclass(error, VolpreError) and issubclass(error, builtin)


def test_errors_that_are_not_the_users_input_are_volpre_errors_only():
    for error in (DemoError, CommandTimeout):
        assert issubclass(error, VolpreError) and not issubclass(error, UserInputError)


def test_a_user_input_error_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("volpre check: error: ") and "missing.json" in err and "Traceback" not in err


def test_a_bug_inside_a_command_keeps_its_traceback(tmp_path, monkeypatch):
    """Commands catch errors by class: a plain ValueError from volpre's own code is a bug, not one line."""
    from volpre.data import index as index_module

    def buggy(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(index_module, "index_paths", buggy)
    with pytest.raises(ValueError, match="a bug"):
        main(["index", str(tmp_path), "--out", str(tmp_path / "m.json")])


def test_export_and_index_argument_errors_are_one_line(tmp_path, capsys):
    assert main(["index", str(tmp_path), "--out", str(tmp_path / "m.json"), "--modality", "=CT"]) == 2
    assert "--modality '=CT': expected a DICOM modality code" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["bench", "ct-volumes", str(tmp_path / "taken"), "--volumes", "1"]) == 2
    err = capsys.readouterr().err
    assert "benchmark volumes output" in err and "non-empty directory" in err and "Traceback" not in err
    assert main(["bench", "ct-volumes", str(tmp_path / "new"), "--volumes", "0"]) == 2
    assert "benchmark data needs volumes >= 1" in capsys.readouterr().err
