"""Draw docs/figures/tiling.svg, how a grid becomes tiles: `python docs/figures/tiling_figure.py`.

Plain SVG text, no plotting library: a 10 x 16 grid cut into 4 x 4 tiles (edge: pad), the source
chunks (8 x 8) over it, the tiles numbered in C order and coloured by the job that writes them,
and the tiled array they become.
"""

from __future__ import annotations

from pathlib import Path

ROWS, COLS = 10, 16  # latitude x longitude after the preprocessors
TILE = 4  # tiles.size along both
CHUNK = 8  # source chunk length along both
CELL = 18  # pixels per grid element
JOB_COLOURS = ["#8ecae6", "#ffb703"]
OUT = Path(__file__).with_name("tiling.svg")


def _rect(x: float, y: float, w: float, h: float, **style: str) -> str:
    attrs = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in style.items())
    return f'<rect x="{x}" y="{y}" width="{w}" height="{h}" {attrs}/>'


def _text(
    x: float, y: float, text: str, size: int = 13, anchor: str = "middle", **style: str
) -> str:
    attrs = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in style.items())
    return (
        f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" '
        f'font-family="sans-serif" {attrs}>{text}</text>'
    )


def _line(x1: float, y1: float, x2: float, y2: float, **style: str) -> str:
    attrs = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in style.items())
    return f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" {attrs}/>'


def draw() -> str:
    """The SVG document."""
    tile_rows = -(-ROWS // TILE)
    tile_cols = -(-COLS // TILE)
    # Tiles sharing a source chunk row go to one job: rows 0-1 share chunk row 0, row 2 is alone.
    job_of_row = [(r * TILE) // CHUNK for r in range(tile_rows)]
    ox, oy = 70, 60
    parts: list[str] = [
        '<defs><pattern id="pad" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="white"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#999" stroke-width="2"/></pattern></defs>',
        _text(ox + COLS * CELL / 2, 24, "the grid after the preprocessors (latitude × longitude)"),
        _text(
            ox + COLS * CELL / 2,
            42,
            "tiles 4 × 4, edge: pad · source chunks 8 × 8",
            12,
            fill="#555",
        ),
    ]
    for r in range(tile_rows):
        valid = min(TILE, ROWS - r * TILE)
        for c in range(tile_cols):
            x, y = ox + c * TILE * CELL, oy + r * TILE * CELL
            parts.append(_rect(x, y, TILE * CELL, valid * CELL, fill=JOB_COLOURS[job_of_row[r]]))
            if valid < TILE:  # padding beyond the data
                parts.append(
                    _rect(x, y + valid * CELL, TILE * CELL, (TILE - valid) * CELL, fill="url(#pad)")
                )
            parts.append(
                _rect(
                    x, y, TILE * CELL, TILE * CELL, fill="none", stroke="#333", stroke_width="1.5"
                )
            )
            parts.append(
                _text(
                    x + TILE * CELL / 2,
                    y + valid * CELL / 2 + 5,
                    str(r * tile_cols + c),
                    15,
                    font_weight="bold",
                )
            )
    pad_y = oy + ROWS * CELL
    parts.append(_text(ox + COLS * CELL + 8, pad_y + 20, "padded with", 11, "start"))
    parts.append(_text(ox + COLS * CELL + 8, pad_y + 34, "fill_value (NaN)", 11, "start"))
    for i in range(ROWS + 1):  # element grid
        parts.append(
            _line(
                ox,
                oy + i * CELL,
                ox + COLS * CELL,
                oy + i * CELL,
                stroke="#333",
                stroke_opacity="0.15",
            )
        )
    for j in range(COLS + 1):
        parts.append(
            _line(
                ox + j * CELL,
                oy,
                ox + j * CELL,
                oy + ROWS * CELL,
                stroke="#333",
                stroke_opacity="0.15",
            )
        )
    for i in range(0, ROWS + 1, CHUNK):  # source chunk boundaries
        parts.append(
            _line(
                ox - 6,
                oy + i * CELL,
                ox + COLS * CELL + 6,
                oy + i * CELL,
                stroke="#c1121f",
                stroke_width="3",
                stroke_dasharray="8 4",
            )
        )
    for j in range(0, COLS + 1, CHUNK):
        parts.append(
            _line(
                ox + j * CELL,
                oy - 6,
                ox + j * CELL,
                oy + ROWS * CELL + 6,
                stroke="#c1121f",
                stroke_width="3",
                stroke_dasharray="8 4",
            )
        )
    parts.append(
        _line(
            ox - 6,
            oy + ROWS * CELL,
            ox + COLS * CELL + 6,
            oy + ROWS * CELL,
            stroke="#c1121f",
            stroke_width="3",
            stroke_dasharray="8 4",
        )
    )
    legend_y = oy + tile_rows * TILE * CELL + 30
    parts.append(
        _line(
            ox,
            legend_y,
            ox + 30,
            legend_y,
            stroke="#c1121f",
            stroke_width="3",
            stroke_dasharray="8 4",
        )
    )
    parts.append(_text(ox + 38, legend_y + 4, "source chunk boundary", 12, "start"))
    for k, colour in enumerate(JOB_COLOURS):
        y = legend_y + 20 + 20 * k
        parts.append(_rect(ox, y - 10, 30, 14, fill=colour, stroke="#333"))
        label = "job 0: tiles 0–7 (share chunk row 0)" if k == 0 else "job 1: tiles 8–11"
        parts.append(_text(ox + 38, y + 2, label, 12, "start"))
    # Arrow and the tiled array.
    ax0 = ox + COLS * CELL + 110
    parts.append(
        _line(
            ax0 - 70,
            oy + 90,
            ax0 - 20,
            oy + 90,
            stroke="#333",
            stroke_width="2",
            marker_end="url(#arrow)",
        )
    )
    parts.insert(
        0,
        '<defs><marker id="arrow" markerWidth="10" markerHeight="10" refX="8" '
        'refY="3" orient="auto"><path d="M0,0 L8,3 L0,6 z" fill="#333"/></marker>'
        "</defs>",
    )
    small = 9
    side = TILE * small
    gap = 4
    parts.append(
        _text(ax0 + (side + gap) * 6, 24, "t2m(tile, time, latitude_in_tile, longitude_in_tile)")
    )
    parts.append(
        _text(
            ax0 + (side + gap) * 6, 42, "one Zarr chunk per tile (per time chunk)", 12, fill="#555"
        )
    )
    for t in range(tile_rows * tile_cols):
        r, c = divmod(t, tile_cols)
        x = ax0 + (t % 6) * (side + gap) * 2
        y = oy + 40 + (t // 6) * (side + 46)
        parts.append(
            _rect(
                x, y, side, side, fill=JOB_COLOURS[job_of_row[r]], stroke="#333", stroke_width="1.5"
            )
        )
        valid = min(TILE, ROWS - r * TILE)
        if valid < TILE:
            parts.append(
                _rect(
                    x,
                    y + valid * small,
                    side,
                    (TILE - valid) * small,
                    fill="url(#pad)",
                    stroke="#333",
                )
            )
        parts.append(_text(x + side / 2, y + side + 15, f"tile {t}", 11))
    parts.append(
        _text(
            ax0 + (side + gap) * 6,
            oy + 40 + 2 * (side + 46) + 10,
            "latitude(tile, latitude_in_tile), longitude(tile, longitude_in_tile),",
            12,
            fill="#555",
        )
    )
    parts.append(
        _text(
            ax0 + (side + gap) * 6,
            oy + 40 + 2 * (side + 46) + 26,
            "tile_latitude(tile), tile_longitude(tile) map each tile back",
            12,
            fill="#555",
        )
    )
    width = ax0 + (side + gap) * 12 + 20
    height = legend_y + 70
    body = "\n".join(parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">\n<rect width="100%" height="100%" fill="white"/>\n'
        f"{body}\n</svg>\n"
    )


if __name__ == "__main__":
    OUT.write_text(draw())
    print(OUT)
