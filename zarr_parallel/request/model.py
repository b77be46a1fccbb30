"""The one validated request model shared by the Python API, the CLI and the Prefect flow."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.compression import DEFAULT_COMPRESSION, FORMS, parse_compression
from zarr_parallel.planning.fingerprint import canonical_json, fingerprint
from zarr_parallel.planning.tile_spec import request_tiles
from zarr_parallel.request import checks
from zarr_parallel.request.normalise import normalise_fields
from zarr_parallel.request.secrets import MASK, is_secret_key, redact
from zarr_parallel.transforms.registry import validate_spec
from zarr_parallel.units import parse_duration, parse_memory

logger = logging.getLogger(__name__)

DEPLOY_MODES = ("auto", "series", "dask_distributed", "slurm")
ENGINES = ("h5netcdf", "netcdf4", "kerchunk", "zarr")
#: ``auto`` chooses series or a local cluster by the plan and the machine, and says why
#: (:mod:`zarr_parallel.planning.deploy_choice`; docs/design.md §2b).
DEFAULT_DEPLOY_MODE = "auto"
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


#: The request fields that say what the source is and how to open it.
SOURCE_FIELDS = ("data_uri", "engine", "open_options", "storage_options", "remote_concurrency",
                 "remote_retries")  # fmt: skip


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
    temp_store: str | None = Field(
        None,
        description="Folder every worker can see for a staged plan's intermediate store; "
        "default: beside the cache's versions",
    )
    add_attrs: dict[str, Any] = Field(default_factory=dict, description="Extra global attributes")
    zarr_format: Literal[2, 3] = Field(3, description="Zarr format of the cache")
    compression: str = Field(
        DEFAULT_COMPRESSION,
        description="Codec of the cache's chunks: 'zstd', 'zstd:5', 'blosc:lz4:5', 'zlib:1', "
        "'gzip:5' or 'none'; a variable's 'encoding' transform may set its own",
    )
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
        description="auto (default: series or a local dask cluster, chosen by the plan and the "
        "machine; never SLURM), series, dask_distributed or SLURM",
        # A choice list in the Prefect UI form, checked by the API (Python is case-insensitive).
        json_schema_extra={"enum": ["auto", "series", "dask_distributed", "SLURM", "slurm"]},
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
    log_level: int = Field(
        0, ge=0, description="0 quiet, 1 info, 2 debug (higher values mean 2, as in 0.5)"
    )
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
            raise ValueError(f"must be one of auto, series, dask_distributed, SLURM; got {v!r}")
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

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: int) -> int:
        # 0.5 read any level above 2 as 2 (debug): requests written for it keep working.
        if v > 2:
            logger.warning("log_level=%d is above the highest level, 2 (debug): using 2", v)
            return 2
        return v

    @field_validator("compression", mode="before")
    @classmethod
    def _compression(cls, v: Any) -> str:
        # The canonical form: one spelling per codec, so one content fingerprint.
        try:
            return parse_compression(v, "compression").text
        except RequestError as e:  # build_request words it, with the forms from _FIXES
            raise ValueError(e.problem) from None

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

    def source_json(self) -> str:
        """The fields that say what the source is and how to open it (:data:`SOURCE_FIELDS`),
        as JSON: the key of per-process source caches."""
        return self.model_dump_json(include=set(SOURCE_FIELDS))

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
        if self.compression != DEFAULT_COMPRESSION:
            # The codec is content (docs/design.md §2b), hashed only when it is not the default:
            # caches written before the field existed (all zstd) stay up to date.
            content["compression"] = self.compression
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
    "deploy_mode": "Use 'auto', 'series', 'dask_distributed' or 'SLURM'",
    "recommend_changes": "Use 'halt', 'apply' or 'proceed'",
    "engine": (
        "Leave it unset to detect from data_uri, or name one of h5netcdf, netcdf4, kerchunk, zarr"
    ),
    "num_jobs": "Use a positive whole number",
    "log_level": "Use 0, 1 or 2",
    "variables": "Map each variable to {} or to a list such as [{'type': 'rename', ...}]",
    "zarr_format": "Use 3 (the default) or 2",
    "compression": f"Use {FORMS}",
}


def _check(req: CacheRequest, base: Path | None) -> CacheRequest:
    """The checks of :mod:`zarr_parallel.request.checks`, in order; the request resolved."""
    updates: dict[str, Any] = {
        "data_uri": checks.resolve_sources(
            req.data_uri, req.engine, req.storage_options, req.open_options, base
        )
    }
    checks.check_memory(req.memory_limit, req.memory_reserve, req.free_space_reserve)
    # Times parse now so a bad value fails before planning.
    req.timeout_seconds  # noqa: B018
    parse_duration(req.pause_timeout, "pause_timeout")
    req.min_version_age_seconds  # noqa: B018
    checks.check_chunks(req.chunks)
    checks.check_shards(req.shards, req.zarr_format)
    # Tiles (also 0.5's trailing 'tiled' preprocessor), then transforms: every name known now.
    updates["tiles"], preprocessors = request_tiles(
        req.tiles, req.preprocessors, req.chunks, req.shards
    )
    updates["preprocessors"] = [
        validate_spec(s, f"preprocessors[{i}]") for i, s in enumerate(preprocessors)
    ]
    if req.variables is not None:
        updates["variables"] = checks.check_variables(req.variables)
    checks.check_cache_location(req.cache_store, req.cache_dir)
    for field in ("cache_label", "cache_name", "cache_store", "cache_dir"):
        value = checks.check_path_field(field, getattr(req, field), base)
        if value != getattr(req, field):
            updates[field] = value
    return req.model_copy(update=updates)
