"""A plan picture as SVG text (pure: no I/O; the caller writes or embeds the text).

Draws a :class:`~zarr_parallel.planning.picture.Picture`: per panel the jobs (one coloured,
translucent rectangle each, class ``job``), the cut source chunks (hatched, class ``cut``), the
source grid (thin grey lines, class ``source-grid``) and the target grid (dashed black lines,
class ``target-grid``); below, a legend whose lines carry ``class="legend"`` and a ``data-key``.
The class names let tests and stylesheets find each kind of element.
"""

from __future__ import annotations

import colorsys
from html import escape

from zarr_parallel.planning.picture import Axis, Mark, Panel, Picture

#: Panel size in pixels (a one-dimensional variable's panel is a strip of STRIP pixels).
PANEL = 220
STRIP = 36
#: Space for the row label on the left, the column label above, and between panels.
LEFT, TOP, GAP = 56, 44, 36
PER_ROW = 3
LINE = 17
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
CUT_COLOUR = "#d62728"
PARTIAL_COLOUR = "#ff7f0e"


def mark_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour of mark ``index`` (golden-angle hues: neighbours differ).

    >>> mark_colour(0)
    (217, 38, 38)
    """
    r, g, b = colorsys.hls_to_rgb((index * 0.618034) % 1.0, 0.5, 0.7)
    return round(r * 255), round(g * 255), round(b * 255)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def layout(picture: Picture) -> tuple[int, int, int]:
    """Width, height and the top of the legend, in pixels."""
    n = len(picture.panels)
    height = PANEL if picture.panels[0].rows is not None else STRIP
    cols = min(n, PER_ROW)
    rows = -(-n // PER_ROW)
    width = LEFT + cols * (PANEL + GAP) + 20
    legend_top = TOP + 16 + rows * (height + TOP + 8)
    lines = len(picture.legend()) + 2
    return max(width, 640), legend_top + lines * LINE + 10, legend_top


def panel_origin(picture: Picture, i: int) -> tuple[float, float, float, float]:
    """Left, top, width and height of panel ``i``'s drawing area."""
    height = PANEL if picture.panels[0].rows is not None else STRIP
    row, col = divmod(i, PER_ROW)
    return LEFT + col * (PANEL + GAP), TOP + 24 + row * (height + TOP + 8), PANEL, height


def mark_box(
    picture: Picture, panel: Panel, mark: Mark, box: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """Left, top, width and height of ``mark`` in a panel's drawing area ``box``."""
    x0, y0, w, h = box
    cols, rows = picture.axis(panel.cols), picture.axis(panel.rows)
    left, right = _scale(cols, mark.region.get(panel.cols or ""), x0, w)
    top, bottom = _scale(rows, mark.region.get(panel.rows or ""), y0, h)
    return left, top, max(right - left, 0.5), max(bottom - top, 0.5)


def _scale(
    axis: Axis | None, span: tuple[int, int] | None, start: float, length: float
) -> tuple[float, float]:
    if axis is None or span is None or axis.size == 0:
        return start, start + length
    return start + length * span[0] / axis.size, start + length * span[1] / axis.size


def picture_title(picture: Picture) -> str:
    """``Plan of t2m: 12 jobs``."""
    return f"Plan of {picture.variable}: {picture.jobs} job{'' if picture.jobs == 1 else 's'}"


def picture_svg(picture: Picture) -> str:
    """The picture as a standalone SVG document."""
    width, height, legend_top = layout(picture)
    title = picture_title(picture)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" '
        f'font-family="{FONT}" font-size="12">',
        f"<title>{escape(title)}</title>",
        '<defs><pattern id="zp-cut" patternUnits="userSpaceOnUse" width="6" height="6" '
        'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" '
        f'stroke="{CUT_COLOUR}" stroke-width="2"/></pattern>'
        '<pattern id="zp-part" patternUnits="userSpaceOnUse" width="6" height="6" '
        'patternTransform="rotate(-45)"><line x1="0" y1="0" x2="0" y2="6" '
        f'stroke="{PARTIAL_COLOUR}" stroke-width="2"/></pattern></defs>',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    for i, panel in enumerate(picture.panels):
        out += _panel(picture, panel, panel_origin(picture, i))
    out += _legend(picture, legend_top)
    out.append("</svg>")
    return "\n".join(out)


def _panel(picture: Picture, panel: Panel, box: tuple[float, float, float, float]) -> list[str]:
    x0, y0, w, h = box
    out = [
        f'<g class="panel" data-rows="{escape(panel.rows or "")}" '
        f'data-cols="{escape(panel.cols or "")}">'
    ]
    for mark in picture.marks:
        left, top, mw, mh = mark_box(picture, panel, mark, box)
        colour = _hex(mark_colour(mark.index))
        what = ", ".join(f"{d} {a}:{b}" for d, (a, b) in mark.region.items())
        ids = " ".join(str(j) for j in mark.job_ids[:50])
        out.append(
            f'<rect class="job" data-job="{ids}" data-jobs="{len(mark.job_ids)}" '
            f'x="{left:.2f}" y="{top:.2f}" width="{mw:.2f}" height="{mh:.2f}" fill="{colour}" '
            f'fill-opacity="0.35" stroke="{colour}" stroke-width="1.2">'
            f"<title>{escape(mark.label)}: {escape(what)}</title></rect>"
        )
    out += _cuts(picture, panel, box)
    for axis, across in ((picture.axis(panel.cols), True), (picture.axis(panel.rows), False)):
        if axis is None:
            continue
        for kind, lines in (("source-grid", axis.source_lines), ("target-grid", axis.target_lines)):
            style = (
                'stroke="#999999" stroke-width="0.6"'
                if kind == "source-grid"
                else 'stroke="#000000" stroke-width="1.1" stroke-dasharray="4 3"'
            )
            for b in lines or ():
                p = (x0 if across else y0) + (w if across else h) * b / axis.size
                ends = (p, y0, p, y0 + h) if across else (x0, p, x0 + w, p)
                out.append(
                    f'<line class="{kind}" x1="{ends[0]:.2f}" y1="{ends[1]:.2f}" '
                    f'x2="{ends[2]:.2f}" y2="{ends[3]:.2f}" {style}/>'
                )
    out.append(
        f'<rect class="frame" x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" '
        'stroke="#333333" stroke-width="1"/>'
    )
    out += _labels(picture, panel, box)
    out.append("</g>")
    return out


def _cuts(picture: Picture, panel: Panel, box: tuple[float, float, float, float]) -> list[str]:
    """Hatched bands over the source chunks a job boundary cuts, along each panel dimension."""
    x0, y0, w, h = box
    out = []
    for axis, across in ((picture.axis(panel.cols), True), (picture.axis(panel.rows), False)):
        if axis is None or not axis.size:
            continue
        kinds = (("cut", axis.cut, "zp-cut"), ("partial", axis.partial, "zp-part"))
        for kind, spans, fill in kinds:
            what = "cut source chunks" if kind == "cut" else "source chunks partly read"
            for a, z in spans:
                p0 = (x0 if across else y0) + (w if across else h) * a / axis.size
                size = max((w if across else h) * (z - a) / axis.size, 1.0)
                rect = (p0, y0, size, h) if across else (x0, p0, w, size)
                out.append(
                    f'<rect class="{kind}" data-dim="{escape(axis.dim)}" data-span="{a} {z}" '
                    f'x="{rect[0]:.2f}" y="{rect[1]:.2f}" width="{rect[2]:.2f}" '
                    f'height="{rect[3]:.2f}" fill="url(#{fill})" fill-opacity="0.7">'
                    f"<title>{what}: {escape(axis.dim)} {a}:{z}</title></rect>"
                )
    return out


def _labels(picture: Picture, panel: Panel, box: tuple[float, float, float, float]) -> list[str]:
    x0, y0, w, h = box
    out = []
    cols, rows = picture.axis(panel.cols), picture.axis(panel.rows)
    if cols is not None:
        out.append(
            f'<text class="axis-label" x="{x0 + w / 2:.1f}" y="{y0 - 8:.1f}" '
            f'text-anchor="middle">{escape(cols.dim)} → ({cols.size})</text>'
        )
    if rows is not None:
        out.append(
            f'<text class="axis-label" x="{x0 - 8:.1f}" y="{y0 + h / 2:.1f}" '
            f'text-anchor="middle" transform="rotate(-90 {x0 - 8:.1f} {y0 + h / 2:.1f})">'
            f"{escape(rows.dim)} → ({rows.size})</text>"
        )
    return out


def _legend(picture: Picture, top: int) -> list[str]:
    y = top
    key = [
        f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + 24}" y2="{y}" stroke="#999999" '
        'stroke-width="0.6"/>',
        f'<text x="{LEFT + 30}" y="{y + 4}">source chunk grid</text>',
        f'<line x1="{LEFT + 160}" y1="{y}" x2="{LEFT + 184}" y2="{y}" stroke="#000000" '
        'stroke-width="1.1" stroke-dasharray="4 3"/>',
        f'<text x="{LEFT + 190}" y="{y + 4}">target chunk grid</text>',
        f'<rect x="{LEFT + 320}" y="{y - 6}" width="24" height="12" fill="url(#zp-cut)"/>',
        f'<text x="{LEFT + 350}" y="{y + 4}">cut source chunks</text>',
        f'<rect x="{LEFT + 470}" y="{y - 6}" width="24" height="12" fill="url(#zp-part)"/>',
        f'<text x="{LEFT + 500}" y="{y + 4}">partly read</text>',
    ]
    out = ['<g class="key">', *key, "</g>"]
    y += LINE + 4
    out.append(
        f'<text class="legend-head" x="{LEFT}" y="{y}">colours: one per '
        f"{'group of jobs' if picture.grouped else 'job'}</text>"
    )
    for name, text in picture.legend():
        y += LINE
        out.append(
            f'<text class="legend" data-key="{name}" x="{LEFT}" y="{y}">{escape(text)}</text>'
        )
    return out
