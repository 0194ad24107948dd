"""The error root (volpre.errors): every error volpre raises on purpose derives from VolpreError; the
user-input ones from UserInputError (one line, exit 2), each keeping the built-in base it had."""

from __future__ import annotations

import pytest

from volpre.bench.data import BenchError
from volpre.bench.step import BenchInputError
from volpre.cli import main
from volpre.commands.options import UserError
from volpre.config import ConfigError
from volpre.data.errors import CacheError, VolumeError
from volpre.data.manifest import ManifestError
from volpre.demo.run import DemoError
from volpre.demo.synthetic import DemoInputError
from volpre.engine.checkpoint import CheckpointError
from volpre.engine.trainer import DivergenceError
from volpre.errors import UserInputError, VolpreError
from volpre.evaluate import EvaluationError
from volpre.export.weights import WeightsError
from volpre.models.init_weights import InitWeightsError
from volpre.processes import CommandTimeout


@pytest.mark.parametrize("error, builtin", [
    (ConfigError, ValueError), (ManifestError, ValueError), (VolumeError, ValueError), (CacheError, OSError),
    (BenchError, ValueError), (BenchInputError, ValueError), (CheckpointError, RuntimeError), (DivergenceError, RuntimeError),
    (WeightsError, RuntimeError), (InitWeightsError, ValueError), (EvaluationError, ValueError),
    (DemoInputError, ValueError), (UserError, Exception),
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
