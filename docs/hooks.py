"""MkDocs hook: fill ``<!-- request-fields -->`` with the request model's fields.

The reference is generated from :class:`zarr_parallel.request.model.CacheRequest`, so it cannot
drift from what the code validates.
"""

from __future__ import annotations

from typing import Any

from zarr_parallel.request.model import CacheRequest, SlurmOptions

MARKER = "<!-- request-fields -->"
SLURM_MARKER = "<!-- slurm-fields -->"


def _type_text(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def _table(model: type[Any]) -> str:
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if info.is_required():
            default = "required"
        elif info.default_factory is not None:
            default = f"`{info.default_factory()!r}`".replace("|", "\\|")
        else:
            default = f"`{info.default!r}`"
        desc = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{_type_text(info.annotation)}` | {default} | {desc} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace the markers with the generated tables."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _table(CacheRequest))
    if SLURM_MARKER in markdown:
        markdown = markdown.replace(SLURM_MARKER, _table(SlurmOptions))
    return markdown
