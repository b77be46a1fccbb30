"""The one validated request model shared by the Python API, the CLI and the Prefect flow."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.plan import canonical_json, fingerprint
from zarr_parallel.planning.tiles import request_tiles
from zarr_parallel.request.normalise import normalise_fields
from zarr_parallel.request.open_options import check_open_options, detect_engine
from zarr_parallel.request.protocols import protocol_of, require_protocol
from zarr_parallel.request.secrets import MASK, check_no_secrets, is_secret_key, redact, redact_url
from zarr_parallel.transforms.registry import validate_spec
from zarr_parallel.units import parse_duration, parse_memory

DEPLOY_MODES = ("series", "dask_distributed", "slurm")
ENGINES = ("h5netcdf", "netcdf4", "kerchunk", "zarr")
DEFAULT_DEPLOY_MODE = "dask_distributed"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]*$")
#: A URL scheme (``s3://``, ``gs://``, ``file://``...): not a path a cache may be written to.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_TYPE_TAG = re.compile(r"^(bool|int|float|str|none|[a-z]+\[.*\])$")


class SlurmOptions(BaseModel):
    """Settings of the SLURM deploy mode (dask-jobqueue ``SLURMCluster``)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(
        None, description="SLURM partition (queue); default: the cluster's"
    )
    account: str | None = Field(None, description="SLURM account to charge")
    qos: str | None = Field(None, description="SLURM quality of service")
    directives: list[str] = Field(
        default_factory=list, description="Extra #SBATCH directives, e.g. '--constraint=intel'"
    )
    prologue: list[str] = Field(
        default_factory=list, description="Shell lines run before the worker, e.g. 'module load x'"
    )
    interface: str | None = Field(None, description="Network interface of the workers, e.g. ib0")
    cores: int = Field(1, ge=1, description="Cores per SLURM job (one worker process each)")

    @field_validator("cores", mode="before")
    @classmethod
    def _cores(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"is {v} (true/false), not a whole number")
        return v

    # -- [parallel] SLURM fields --
    walltime: str | int | None = Field(
        None,
        description="Most walltime per SLURM job (e.g. the partition's limit, '12:00:00'); "
        "default: the jobs one worker runs, each within worker_timeout, plus 5 minutes",
    )
    log_directory: str | None = Field(
        None, description="Folder for the SLURM job logs; default: the version's manifest"
    )

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: Any) -> Any:
        if v is not None:
            parse_duration(v, "slurm.walltime")
        return v


#: Whole-number fields, where pydantic would otherwise read true/false as 1/0.
_INT_FIELDS = (
    "remote_concurrency",
    "remote_retries",
    "num_jobs",
    "simultaneous_worker_limit",
    "retries",
    "keep_versions",
    "log_level",
)


class CacheRequest(BaseModel):
    """Everything a cache run needs. Field names follow zarr-parallel 0.5's keywords."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    data_uri: str | list[str] = Field(
        ..., description="Source: a netCDF path, glob or list, a kerchunk .json, or a .zarr store"
    )
    engine: str | None = Field(
        None, description="h5netcdf, netcdf4, kerchunk or zarr; default: detected from data_uri"
    )
    open_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Reading options for xarray.open_dataset (decode_times, mask_and_scale, "
        "group...); options that write, or that the run sets itself, are refused",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for remote sources"
    )
    # -- [sources] fields go here --
    keep_packing: bool = Field(
        False,
        description="Write packed variables (ints with scale_factor/add_offset) packed, as the "
        "source stores them; default: decoded as xarray decodes them",
    )
    remote_concurrency: int = Field(
        8, ge=1, le=256, description="Most remote requests in flight per worker (URLs, S3)"
    )
    remote_retries: int = Field(
        6,
        ge=0,
        le=30,
        description="Retries of a transient remote error (5xx, 429, reset, timeout), with backoff",
    )
    check_free_space: bool = Field(
        True, description="Refuse to start when the cache's filesystem lacks space or inodes"
    )
    free_space_reserve: str | int = Field(
        "0", description="Space to leave free on the cache's filesystem, e.g. '50GB'"
    )
    preprocessors: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Transforms applied in order: [{'type': 'sel', 'time': [start, end]}, ...]",
    )
    variables: dict[str, list[dict[str, Any]]] | None = Field(
        None, description="Variables to cache, each with its own transforms; default: all"
    )
    chunks: dict[str, int] | Literal["auto"] = Field(
        "auto", description="Target chunks {dim: size} (-1: whole); 'auto' keeps source chunks"
    )
    shards: dict[str, int] | None = Field(
        None, description="Zarr v3 shard shape {dim: size}, multiples of chunks (optional)"
    )
    # -- [tiling] fields go here --
    tiles: dict[str, Any] | None = Field(
        None,
        description="Tiled cache: {size: {latitude: 64, longitude: 64}, overlap: 0, edge: "
        "error|drop|pad, fill_value, dim: tile, within, order}, or just {latitude: 64, ...}",
    )
    cache_store: str | None = Field(None, description="Final path of the cache")
    cache_dir: str | None = Field(None, description="Directory for <cache_name><cache_label>.zarr")
    cache_name: str | None = Field(
        None, description="Cache name under cache_dir; default: source stem"
    )
    cache_label: str = Field("", description="Suffix of the cache name, e.g. '_v1'")
    add_attrs: dict[str, Any] = Field(default_factory=dict, description="Extra global attributes")
    zarr_format: Literal[2, 3] = Field(3, description="Zarr format of the cache")
    memory_limit: str | int = Field("2GB", description="Most one worker may use, e.g. '2GB'")
    memory_reserve: str | int = Field(
        "256MB", description="Share of memory_limit kept for the interpreter and libraries"
    )
    worker_timeout: str | int | float = Field(
        "30:00", description="Per-job deadline: '30:00', '1:30:00', '30min' or seconds"
    )
    num_jobs: int | None = Field(None, ge=1, description="Minimum number of jobs; default: derived")
    simultaneous_worker_limit: int | None = Field(
        None, ge=1, description="Most workers at once; default: the machine's cores"
    )
    deploy_mode: str = Field(
        DEFAULT_DEPLOY_MODE,
        description="series, dask_distributed or SLURM",
        # A choice list in the Prefect UI form, checked by the API (Python is case-insensitive).
        json_schema_extra={"enum": ["series", "dask_distributed", "SLURM", "slurm"]},
    )
    scheduler_address: str | None = Field(
        None, description="Address of an existing dask scheduler (dask_distributed)"
    )
    slurm: SlurmOptions = Field(default_factory=SlurmOptions, description="SLURM settings")
    # -- [parallel] fields go here --
    retries: int = Field(2, ge=0, le=20, description="Retries of a failed write job")
    overwrite: bool = Field(True, description="Replace a cache whose request or source changed")
    resume: bool | Literal["auto"] = Field(
        "auto", description="Continue a matching staging version"
    )
    recommend_changes: Literal["halt", "apply", "proceed"] = Field(
        "halt", description="When the plan re-reads source chunks: halt, apply the best, or proceed"
    )
    # -- [reliability] fields go here --
    break_lock: bool = Field(
        False,
        description="Take over a lock left by a run on another host that stopped refreshing it",
    )
    verify_before_publish: Literal["off", "sample", "full"] = Field(
        "off",
        description="Compare the new version with the source (a sample or all) before publishing",
    )
    keep_versions: int = Field(2, ge=1, description="Complete versions kept beside the cache")
    min_version_age: str | int | float = Field(
        "1:00:00",
        description=(
            "A replaced version is kept at least this long after a publish, for readers that "
            "opened it ('1:00:00', '30min', seconds; 0: prune at once)"
        ),
    )
    generate_stats: bool = Field(False, description="Gather count/min/max/mean/NaN per variable")
    log_level: int = Field(0, ge=0, le=2, description="0 quiet, 1 info, 2 debug")
    # -- [deployments] fields go here --
    pause_timeout: str | int | float = Field(
        "1:00:00",
        description=(
            "Deployment runs that halt on recommendations pause this long for a decision in "
            "the UI ('1:00:00', '30min' or seconds), then fail"
        ),
    )

    @field_validator("deploy_mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> str:
        mode = str(v).lower()
        if mode not in DEPLOY_MODES:
            raise ValueError(f"must be one of series, dask_distributed, SLURM; got {v!r}")
        return mode

    @field_validator("engine", mode="before")
    @classmethod
    def _engine(cls, v: Any) -> str | None:
        if v is None:
            return None
        if str(v).lower() not in ENGINES:
            raise ValueError(f"must be one of {', '.join(ENGINES)} (or None to detect)")
        return str(v).lower()

    @field_validator("recommend_changes", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> str:
        # 0.5 took a boolean: True halts with recommendations, False proceeds.
        if v is True:
            return "halt"
        if v is False:
            return "proceed"
        return str(v).lower()

    @field_validator("variables", mode="before")
    @classmethod
    def _variables(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, list | tuple):
            return {str(name): [] for name in v}
        if not isinstance(v, dict):
            raise ValueError("must map each variable name to {} or a list of transforms")
        out: dict[str, list[Any]] = {}
        for name, specs in v.items():
            if specs is None or specs == {}:
                out[name] = []
            elif isinstance(specs, dict):
                out[name] = (
                    [specs]
                    if "type" in specs
                    else [
                        {"type": k, **(a if isinstance(a, dict) else {})} for k, a in specs.items()
                    ]
                )
            elif isinstance(specs, list | tuple):
                out[name] = list(specs)
            else:
                raise ValueError(
                    f"variables[{name!r}]={specs!r} must be {{}} or a list of transforms"
                )
        return out

    @field_validator("chunks", mode="before")
    @classmethod
    def _chunks(cls, v: Any) -> Any:
        if v is None:
            return "auto"
        if isinstance(v, str) and v != "auto":
            raise ValueError("must be 'auto' (keep the source's chunks), None or {dim: size}")
        return v

    @field_validator("chunks", "shards", mode="before")
    @classmethod
    def _sizes_not_bool(cls, v: Any) -> Any:
        # pydantic reads true as 1: a chunk of one element where the user meant something else.
        if isinstance(v, dict):
            for dim, size in v.items():
                if isinstance(size, bool):
                    raise ValueError(f"the size of {dim!r} is {size}, not a number of elements")
        return v

    @field_validator(*_INT_FIELDS, mode="before")
    @classmethod
    def _int_not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"is {v} (true/false), not a whole number")
        return v

    @field_validator("preprocessors", mode="before")
    @classmethod
    def _preprocessors(cls, v: Any) -> Any:
        return [] if v is None else v

    @field_validator("add_attrs", "open_options", "storage_options", mode="before")
    @classmethod
    def _maps(cls, v: Any) -> Any:
        return {} if v is None else v

    # Derived values: one place each.
    @property
    def memory_bytes(self) -> int:
        """``memory_limit`` in bytes."""
        return parse_memory(self.memory_limit, "memory_limit")

    @property
    def reserve_bytes(self) -> int:
        """``memory_reserve`` in bytes."""
        return parse_memory(self.memory_reserve, "memory_reserve")

    @property
    def timeout_seconds(self) -> float:
        """``worker_timeout`` in seconds."""
        return parse_duration(self.worker_timeout, "worker_timeout")

    @property
    def min_version_age_seconds(self) -> float:
        """``min_version_age`` in seconds (0 allowed: prune replaced versions at once)."""
        if self.min_version_age in (0, "0") and not isinstance(self.min_version_age, bool):
            return 0.0
        return parse_duration(self.min_version_age, "min_version_age")

    def digest(self) -> str:
        """Fingerprint of what determines the cache's content (not how it is run)."""
        content = self.model_dump(
            include={
                "data_uri",
                "engine",
                "open_options",
                "preprocessors",
                "variables",
                "chunks",
                "shards",
                "tiles",
                "add_attrs",
                "zarr_format",
                "keep_packing",
            }
        )
        if isinstance(content["data_uri"], list):
            # A list of files is a set: the source orders them along its joining dimension.
            content["data_uri"] = sorted(content["data_uri"])
        return fingerprint(canonical_json(content))


def build_request(base_dir: str | Path | None = None, **fields: Any) -> CacheRequest:
    """Validate request fields into a :class:`CacheRequest`; errors are :class:`RequestError`.

    Relative local paths are resolved against ``base_dir`` (the request file's folder), and the
    caller's lists and dicts are copied, never mutated. The fields are first brought to their plain
    JSON form (:func:`zarr_parallel.request.normalise.normalise_fields`: dates become ISO strings,
    numpy scalars Python numbers...), so the request planned here is the one the workers get.
    """
    fields = normalise_fields(fields)
    try:
        req = CacheRequest(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _parameter_name(err["loc"])
        # Never echo a credential back (error text is logged and shown in Prefect).
        secret = bool(err["loc"]) and is_secret_key(str(err["loc"][-1]))
        value = MASK if secret else redact(err.get("input"))
        if err["type"] == "extra_forbidden":
            raise RequestError(
                loc,
                value,
                "is not a request field",
                f"Remove it; known fields are {sorted(CacheRequest.model_fields)}",
            ) from None
        if err["type"] == "missing":
            raise RequestError(loc, None, "is required", f"Set {loc}") from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise RequestError(
            loc, value, msg, _FIXES.get(re.split(r"[.\[]", loc)[0], "See the request reference")
        ) from None
    return _check_round_trip(_check(req, Path(base_dir) if base_dir else None))


def _check_round_trip(req: CacheRequest) -> CacheRequest:
    """Refuse a request that its JSON form (what workers and resumed runs get) would change.

    The fields were normalised before validation, so this holds unless a validator made a value
    JSON cannot carry; it is the last guard that the planner and the workers agree.
    """
    again = CacheRequest.model_validate_json(req.model_dump_json())
    if again == req:
        return req
    field = next(f for f in CacheRequest.model_fields if getattr(again, f) != getattr(req, f))
    raise RequestError(
        field,
        redact(getattr(req, field)),
        f"changes on its way to the workers (they would see {redact(getattr(again, field))!r})",
        "Use plain strings, numbers, true/false, lists and mappings",
    )


def _parameter_name(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the user writes it: ``chunks['time']``, ``slurm.qos``.

    Pydantic adds the union member it tried (``dict[str,int]``, ``literal['auto']``...) to the
    location; those are not names the user wrote and are dropped.
    """
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif "[" in part or _TYPE_TAG.match(part):
            continue
        elif not name:
            name = part
        elif name in _NESTED_MODELS:
            name += f".{part}"
        else:
            name += f"['{part}']"
    return name or "request"


_NESTED_MODELS = {"slurm"}


_FIXES = {
    "chunks": (
        "Give positive sizes per dimension, e.g. {'time': 48}, -1 for a whole dimension, or 'auto'"
    ),
    "deploy_mode": "Use 'series', 'dask_distributed' or 'SLURM'",
    "recommend_changes": "Use 'halt', 'apply' or 'proceed'",
    "engine": (
        "Leave it unset to detect from data_uri, or name one of h5netcdf, netcdf4, kerchunk, zarr"
    ),
    "num_jobs": "Use a positive whole number",
    "log_level": "Use 0, 1 or 2",
    "variables": "Map each variable to {} or to a list such as [{'type': 'rename', ...}]",
    "zarr_format": "Use 3 (the default) or 2",
}


def is_remote(uri: str) -> bool:
    """True for URLs fsspec opens remotely (``https://``, ``s3://``...)."""
    return "://" in uri and not uri.startswith("file://")


def _check(req: CacheRequest, base: Path | None) -> CacheRequest:
    updates: dict[str, Any] = {"data_uri": _resolve_sources(req, base)}
    _check_sizes(req)
    # Tiles (also 0.5's trailing 'tiled' preprocessor), then transforms: every name known now.
    updates["tiles"], preprocessors = request_tiles(
        req.tiles, req.preprocessors, req.chunks, req.shards
    )
    updates["preprocessors"] = [
        validate_spec(s, f"preprocessors[{i}]") for i, s in enumerate(preprocessors)
    ]
    if req.variables is not None:
        if not req.variables:
            raise RequestError(
                "variables", {}, "names no variable", "Name at least one, or omit it"
            )
        updates["variables"] = {
            name: [validate_spec(s, f"variables['{name}'][{i}]") for i, s in enumerate(specs)]
            for name, specs in req.variables.items()
        }
    updates.update(_check_location(req, base))
    return req.model_copy(update=updates)


def _resolve_sources(req: CacheRequest, base: Path | None) -> str | list[str]:
    """``data_uri`` with globs expanded and local paths resolved against ``base``."""
    check_no_secrets(req.data_uri, req.storage_options, req.open_options)
    uris = [req.data_uri] if isinstance(req.data_uri, str) else list(req.data_uri)
    if not uris:
        raise RequestError("data_uri", req.data_uri, "names no source", "Give a path, glob or list")
    resolved: list[str] = []
    for uri in uris:
        if is_remote(uri):
            # An S3 URL needs s3fs, an optional extra: say so now, not when a worker reads.
            require_protocol(protocol_of(uri), redact_url(uri))
            resolved.append(uri)
            continue
        path = uri.removeprefix("file://")
        if base is not None and not os.path.isabs(path):
            path = str(base / path)
        path = os.path.expanduser(path)
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise RequestError(
                    "data_uri", uri, "matches no files", "Check the pattern and the folder"
                )
            resolved.extend(matches)
        elif not os.path.exists(path):
            raise RequestError(
                "data_uri",
                uri,
                "does not exist",
                "Check the path (relative paths are "
                "relative to the request file, or to the working directory in Python)",
            )
        else:
            resolved.append(path)
    # Reading options only: a source is opened read-only whatever the request says.
    check_open_options(detect_engine(resolved, req.engine), req.open_options)
    return resolved[0] if len(resolved) == 1 else resolved


def _check_sizes(req: CacheRequest) -> None:
    """Memory and time strings parse now, not mid-run; chunk and shard sizes are positive."""
    limit = req.memory_bytes
    reserve = req.reserve_bytes
    if req.free_space_reserve not in (0, "0"):
        parse_memory(req.free_space_reserve, "free_space_reserve")
    if reserve >= limit:
        raise RequestError(
            "memory_limit",
            req.memory_limit,
            f"leaves nothing for jobs after the {req.memory_reserve} interpreter reserve",
            "Raise memory_limit or lower memory_reserve",
        )
    req.timeout_seconds  # noqa: B018 - parse now so a bad value fails before planning
    parse_duration(req.pause_timeout, "pause_timeout")
    req.min_version_age_seconds  # noqa: B018 - parse now so a bad value fails before planning
    if isinstance(req.chunks, dict):
        for dim, size in req.chunks.items():
            if size == -1:
                continue
            if size <= 0:
                raise RequestError(
                    f"chunks['{dim}']",
                    size,
                    "must be a positive integer or -1 (whole dimension)",
                    "Use a size such as 24 (one day of hourly steps)",
                )
    if req.shards is not None:
        if req.zarr_format != 3:
            raise RequestError("shards", req.shards, "need zarr_format=3", "Set zarr_format: 3")
        for dim, size in req.shards.items():
            if size <= 0 and size != -1:
                raise RequestError(
                    f"shards['{dim}']", size, "must be positive", "Use a multiple of the chunk"
                )


def _check_location(req: CacheRequest, base: Path | None) -> dict[str, str]:
    """Check where the cache goes; the updates that resolve relative paths against ``base``."""
    updates: dict[str, str] = {}
    if (req.cache_store is None) == (req.cache_dir is None):
        raise RequestError(
            "cache_store",
            req.cache_store,
            "exactly one of cache_store and cache_dir must be given"
            + (f" (cache_dir={req.cache_dir!r} was also given)" if req.cache_dir else ""),
            "Give cache_store='/path/name.zarr' (the final path) or cache_dir='/path' "
            "(then the cache is <cache_dir>/<cache_name><cache_label>.zarr)",
        )
    for field in ("cache_label", "cache_name"):
        value = getattr(req, field)
        if value is not None and (not _NAME_RE.match(value) or value in (".", "..")):
            raise RequestError(
                field,
                value,
                "may hold only letters, digits, '_', '-' and '.' (it becomes a path)",
                "Use e.g. '_v1'",
            )
    for field in ("cache_store", "cache_dir"):
        value = getattr(req, field)
        if value is not None and _URL_RE.match(value):
            raise RequestError(
                field,
                value,
                "is a URL; caches are written to local or shared file systems only (object "
                "store targets do not exist yet)",
                "Give a file system path such as '/data/caches/era5.zarr'"
                + (" (without 'file://')" if value.lower().startswith("file:") else ""),
            )
        if value is not None and base is not None and not os.path.isabs(value):
            updates[field] = str(base / value)
    return updates


class _Refused(Exception):
    """A request file construct refused by :class:`_RequestLoader` (problem, fix)."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(problem)


class _RequestLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases, merge keys or repeated keys.

    A request is a flat mapping of plain values and needs none of YAML's sharing: aliases let a
    few lines expand into billions of nodes (the loader would run for minutes), and a repeated
    key silently keeps the last value, so both are refused with the line they are on.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise _Refused(
                f"uses the YAML alias *{event.anchor} on line {event.start_mark.line + 1}",
                "Write the value out in full: request files do not use anchors (&) and aliases (*)",
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(
                    f"uses a YAML merge key (<<) on line {line}", "Write the fields out in full"
                )
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.get(key)
            except TypeError:  # a list or mapping as a key: PyYAML refuses it below
                continue
            if seen is not None:
                raise _Refused(
                    f"repeats the key {key!r} on line {line} (first on line {seen})",
                    "Keep one of them: YAML would silently use the last",
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """Parse request YAML with :class:`_RequestLoader`; ``_Refused`` or ``yaml.YAMLError``."""
    loader = _RequestLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise _Refused("nests too deeply", "Write a plain request") from None
    finally:
        loader.dispose()


def load_request_file(path: str | Path, overrides: list[str] | None = None) -> CacheRequest:
    """Read a YAML/JSON request file, apply ``--set key=value`` overrides, and validate it.

    The file is read with a loader that refuses YAML aliases, merge keys and repeated keys.
    """
    path = Path(path)
    if not path.is_file():
        raise RequestError("request", str(path), "is not a file", "Give the path of a YAML request")
    try:
        data = _load_yaml(path.read_text())
    except _Refused as e:
        raise RequestError("request", str(path), e.problem, e.fix) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RequestError(
            "request",
            str(path),
            f"is not valid YAML ({e})".replace("\n", " "),
            "Fix the syntax (a flat mapping of request fields)",
        ) from e
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RequestError(
            "request",
            str(path),
            "must be a mapping of request fields",
            "Write e.g. 'data_uri: data/*.nc' on its own line",
        )
    for item in overrides or []:
        _apply_override(data, item)
    return build_request(base_dir=path.parent.resolve(), **data)


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``--set key=value`` (a YAML value; dotted keys reach nested mappings)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise RequestError("--set", item, "must be key=value", "Write e.g. --set num_jobs=4")
    try:
        value = _load_yaml(raw)
    except _Refused as e:
        raise RequestError(f"--set {key}", raw, e.problem, e.fix) from None
    except yaml.YAMLError as e:
        raise RequestError(f"--set {key}", raw, "is not a YAML value", "Quote it") from e
    target = data
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        inner = target.setdefault(p, {})
        if not isinstance(inner, dict):
            reached = ".".join(parts[: i + 1])
            raise RequestError(
                f"--set {key}",
                raw,
                f"reaches into {reached}, which is a {type(inner).__name__} "
                f"({redact(inner)!r}), not a mapping",
                f"Set {reached} itself, e.g. --set {reached}=VALUE",
            )
        target = inner
    target[parts[-1]] = value
