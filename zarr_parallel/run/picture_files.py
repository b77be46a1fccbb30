"""Plan pictures as files: SVG (our own text, :mod:`zarr_parallel.planning.picture_svg`) or PNG
(drawn with Pillow, the ``[picture]`` extra), chosen by the file's suffix."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.picture import Picture
from zarr_parallel.planning.picture_svg import (
    CUT_COLOUR,
    PARTIAL_COLOUR,
    layout,
    mark_box,
    mark_colour,
    panel_origin,
    picture_svg,
    picture_title,
)

SUFFIXES = (".svg", ".png")


def write_picture(picture: Picture, path: Path) -> Path:
    """Write ``picture`` to ``path``, as SVG or PNG by its suffix; returns the path.

    Raises
    ------
    RequestError
        Another suffix, or PNG without Pillow installed (the ``[picture]`` extra).
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise RequestError(
            "picture",
            str(path),
            "must end in .svg or .png",
            "Name the file plan.svg (no extra needed) or plan.png",
        )
    try:
        if suffix == ".svg":
            path.write_text(picture_svg(picture), encoding="utf-8")
        else:
            path.write_bytes(picture_png(picture))
    except OSError as e:
        raise RequestError(
            "picture", str(path), f"could not be written ({e})", "Give a writable path"
        ) from e
    return path


def _pillow() -> Any:
    try:
        # Deferred: Pillow is the optional [picture] extra, needed for PNG only.
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as e:
        raise RequestError(
            "picture",
            "*.png",
            "needs Pillow, which is not installed",
            "Install the [picture] extra (pip install 'zarr-parallel[picture]'), or write "
            "an .svg picture",
        ) from e
    return Image, ImageDraw, ImageFont


def picture_png(picture: Picture) -> bytes:
    """The picture as PNG bytes, the same layout as the SVG (same size, colours, legend)."""
    image_mod, draw_mod, font_mod = _pillow()
    width, height, legend_top = layout(picture)
    base = image_mod.new("RGBA", (width, height), (255, 255, 255, 255))
    overlay = image_mod.new("RGBA", (width, height), (0, 0, 0, 0))
    shade = draw_mod.Draw(overlay)
    font = font_mod.load_default(size=12)
    cut, part = (_rgb(CUT_COLOUR), _rgb(PARTIAL_COLOUR))
    for i, panel in enumerate(picture.panels):
        box = panel_origin(picture, i)
        for mark in picture.marks:
            x, y, w, h = mark_box(picture, panel, mark, box)
            colour = mark_colour(mark.index)
            shade.rectangle((x, y, x + w, y + h), fill=(*colour, 90), outline=(*colour, 255))
        _png_cuts(shade, picture, panel, box, cut, part)
    image = image_mod.alpha_composite(base, overlay)
    draw = draw_mod.Draw(image)
    for i, panel in enumerate(picture.panels):
        x0, y0, w, h = box = panel_origin(picture, i)
        _png_grids(draw, picture, panel, box)
        draw.rectangle((x0, y0, x0 + w, y0 + h), outline=(51, 51, 51))
        cols, rows = picture.axis(panel.cols), picture.axis(panel.rows)
        if cols is not None:
            draw.text((x0, y0 - 18), f"{cols.dim} -> ({cols.size})", fill="black", font=font)
        if rows is not None:
            draw.text((x0, y0 + h + 4), f"rows: {rows.dim} ({rows.size})", fill="black", font=font)
    title = picture_title(picture)
    draw.text((56, 10), title, fill="black", font=font_mod.load_default(size=15))
    y = legend_top + 4
    for _key, text in picture.legend():
        y += 17
        draw.text((56, y - 12), text, fill="black", font=font)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def _rgb(colour: str) -> tuple[int, ...]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def _png_cuts(
    draw: Any, picture: Picture, panel: Any, box: Any, cut: tuple[int, ...], part: tuple[int, ...]
) -> None:
    x0, y0, w, h = box
    for axis, across in ((picture.axis(panel.cols), True), (picture.axis(panel.rows), False)):
        if axis is None or not axis.size:
            continue
        for spans, colour in ((axis.cut, cut), (axis.partial, part)):
            for a, z in spans:
                p0 = (x0 if across else y0) + (w if across else h) * a / axis.size
                size = max((w if across else h) * (z - a) / axis.size, 1.0)
                rect = (p0, y0, p0 + size, y0 + h) if across else (x0, p0, x0 + w, p0 + size)
                draw.rectangle(rect, fill=(*colour, 70), outline=(*colour, 200))


def _png_grids(draw: Any, picture: Picture, panel: Any, box: Any) -> None:
    x0, y0, w, h = box
    for axis, across in ((picture.axis(panel.cols), True), (picture.axis(panel.rows), False)):
        if axis is None or not axis.size:
            continue
        for lines, colour, width in (
            (axis.source_lines, (153, 153, 153), 1),
            (axis.target_lines, (0, 0, 0), 2),
        ):
            for b in lines or ():
                p = (x0 if across else y0) + (w if across else h) * b / axis.size
                ends = (p, y0, p, y0 + h) if across else (x0, p, x0 + w, p)
                draw.line(ends, fill=colour, width=width)
