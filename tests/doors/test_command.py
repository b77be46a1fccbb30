"""The ``zarr-parallel`` command: its help, version, subcommands and exit codes, a library import
that leaves the environment alone, and a user's own ``flows/`` package beside the run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from core_support import changed_env
from zarr_parallel import __version__
from zarr_parallel.cli import EXIT_CODES, main, request_fields
from zarr_parallel.errors import PlanError, RecommendationsPending, RequestError, RunFailed
from zarr_parallel.orchestration import COMMAND_ENVIRONMENT
from zarr_parallel.orchestration.command import exit_code
from zarr_parallel.request.model import CacheRequest

#: The installed command (the console script of this environment).
COMMAND = str(Path(sys.executable).with_name("zarr-parallel"))
#: What --help and --version must not import: Prefect and the clusters (seconds), and the data
#: stack (xarray, dask, zarr, h5py), which only a run needs.
HEAVY = ("prefect", "distributed", "dask_jobqueue", "xarray", "dask", "zarr", "h5py")


def _request(folder: Path, files: list[Path], **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "data_uri": [str(f) for f in files],
        "cache_dir": "out",
        "deploy_mode": "series",
        "variables": {"t2m": {}},
        **fields,
    }
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _imported(args: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m zarr_parallel.cli ARGS``; the top-level modules imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "zarr_parallel.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    names = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    return proc, names


# ---------------------------------------------------------------------------------------------
# Help and version


def test_help_lists_fields_and_exit_codes_without_prefect() -> None:
    proc, modules = _imported(["--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    for command in ("run", "plan", "verify", "recache", "deploy"):
        assert f"    {command} " in proc.stdout
    for name, _ in request_fields():
        assert f"\n  {name} " in proc.stdout, name
    for code, _ in EXIT_CODES:
        assert f"\n  {code}   " in proc.stdout
    # Every field of the model, the nested SLURM block as dotted names.
    names = {name for name, _ in request_fields()}
    assert set(CacheRequest.model_fields) - {"slurm"} <= names
    assert {"slurm.partition", "slurm.walltime"} <= names


def test_version_and_subcommand_help_without_prefect() -> None:
    proc, modules = _imported(["--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"zarr-parallel {__version__}"
    assert not modules & set(HEAVY)
    proc, modules = _imported(["verify", "--help"])
    assert proc.returncode == 0 and "--verify-mode" in proc.stdout and "exit codes" in proc.stdout
    assert not modules & set(HEAVY)


def test_plan_of_a_local_request_imports_no_prefect(era5_files: list[Path], tmp_path: Path) -> None:
    """Planning needs the data stack, not Prefect, the clusters or dask-jobqueue (seconds)."""
    proc, modules = _imported(["plan", str(_request(tmp_path, era5_files))])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "strategy:" in proc.stdout
    assert not modules & {"prefect", "distributed", "dask_jobqueue"}, sorted(modules)


def test_console_script_is_installed() -> None:
    proc = subprocess.run([COMMAND, "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"zarr-parallel {__version__}"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "give a command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["cache", "r.yaml"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["run"])  # no request file
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# The subcommands: the flows.cache / flows.recache behaviour


def test_plan_run_verify_recache(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = _request(tmp_path, era5_files)
    assert main(["plan", str(req)]) == 0
    assert "read amplification:" in capsys.readouterr().out
    assert not (tmp_path / "out").exists(), "plan writes nothing"
    assert main(["run", str(req), "--set", "chunks={time: 24}"]) == 0
    assert "zarr-parallel: done" in capsys.readouterr().out
    assert main(["run", str(req), "--set", "chunks={time: 24}"]) == 0
    assert "zarr-parallel: up to date" in capsys.readouterr().out
    assert main(["verify", str(req), "--set", "chunks={time: 24}", "--verify-mode", "full"]) == 0
    capsys.readouterr()
    assert main(["recache", str(req), "--set", "chunks={time: 24}", "--check"]) == 0
    assert "re-cache            up_to_date" in capsys.readouterr().out


def test_invalid_request_exits_2(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = _request(tmp_path, era5_files)
    assert main(["run", str(req), "--set", "colour=blue"]) == 2
    assert "invalid request:" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert main(["recache", str(tmp_path / "missing.yaml")]) == 2
    assert not (tmp_path / "out").exists()


def test_halted_exits_3_from_the_console_script(era5_files: list[Path], tmp_path: Path) -> None:
    req = _request(tmp_path, era5_files, preprocessors=[{"type": "isel", "time": [3, 40]}])
    proc = subprocess.run(
        [COMMAND, "plan", str(req)], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Recommendations, best first:" in proc.stderr


def test_deploy_help_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "--help"]) == 0
    assert "zarr-parallel deploy" in capsys.readouterr().out
    assert main(["deploy", "--policy"]) == 2


# ---------------------------------------------------------------------------------------------
# Exit codes (#16): only a request's errors are 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RequestError("chunks", 0, "must be positive", "Use 24"), 2),
        (PlanError("memory_limit", "1MB", "is too small", "Use 2GB"), 2),
        (RunFailed("2 jobs failed"), 1),
        (RecommendationsPending(None, [], "The plan reads 1.17x the source bytes"), 3),
        # A plain ValueError is a bug, not a bad request.
        (ValueError("cannot reshape array of size 3"), 1),
    ],
)
def test_exit_codes_of_errors(
    error: Exception, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    def run() -> int:
        raise error

    assert exit_code(run) == code
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("invalid request:")
    else:
        assert "invalid request" not in err
    if type(error) is ValueError:
        assert "Traceback" in err and "cannot reshape" in err


# ---------------------------------------------------------------------------------------------
# Importing the library leaves the environment alone


def test_import_changes_no_environment_variable() -> None:
    code = textwrap.dedent(
        """
        import os, sys
        before = dict(os.environ)
        import zarr_parallel, zarr_parallel.api, zarr_parallel.orchestration.cache
        import zarr_parallel.orchestration.recache, zarr_parallel.orchestration.deploy
        changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
        assert not changed, sorted(changed)
        assert "flows" not in sys.modules, "the library imported a top-level flows package"
        """
    )
    env = changed_env(**dict.fromkeys(COMMAND_ENVIRONMENT))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# A user's own flows/ package


def _user_project(folder: Path) -> Path:
    """A folder with a Prefect project's own ``flows/`` package (which must never be imported)."""
    flows = folder / "flows"
    flows.mkdir(parents=True)
    (flows / "__init__.py").write_text('"""The user\'s own flows."""\n')
    (flows / "cache.py").write_text('raise RuntimeError("the user\'s flows.cache was imported")\n')
    return folder


def test_command_from_a_folder_with_its_own_flows(era5_files: list[Path], tmp_path: Path) -> None:
    project = _user_project(tmp_path / "project")
    req = _request(project, era5_files, chunks={"time": 24})
    proc = subprocess.run(
        [COMMAND, "run", str(req)], capture_output=True, text=True, timeout=600, cwd=project
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zarr-parallel: done" in proc.stdout
    assert [p.name for p in (project / "out").glob("*.zarr")] == ["era5_like.zarr"]


def test_python_api_from_a_folder_with_its_own_flows(
    era5_files: list[Path], tmp_path: Path
) -> None:
    project = _user_project(tmp_path / "project")
    code = textwrap.dedent(
        f"""
        import sys
        from zarr_parallel import ZarrParallelAssembler
        result = ZarrParallelAssembler(
            data_uri={[str(f) for f in era5_files]!r},
            variables={{"t2m": {{}}}},
            chunks={{"time": 24}},
        ).cache("out/t2m.zarr", deploy_mode="series")
        assert sys.path[0] == "" and "flows" not in sys.modules
        print(result.status)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=project
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "done"
