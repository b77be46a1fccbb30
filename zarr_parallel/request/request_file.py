"""Request files: YAML (or JSON) read safely, with ``--set key=value`` overrides, then validated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.request.secrets import redact


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
