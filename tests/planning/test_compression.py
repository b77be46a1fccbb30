"""The ``compression`` forms (planning/compression.py): canonical text, defaults, refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zarr_parallel.errors import RequestError
from zarr_parallel.planning.compression import (
    BLOSC_CNAMES,
    DEFAULT_COMPRESSION,
    Compression,
    parse_compression,
)

CANONICAL = [
    ("zstd", "zstd", True),
    ("ZSTD", "zstd", True),
    ("zstd:0", "zstd", True),
    (" zstd:5 ", "zstd:5", True),
    ("blosc", "blosc:lz4:5", True),
    ("blosc:zstd", "blosc:zstd:5", True),
    ("Blosc:LZ4:9", "blosc:lz4:9", True),
    ("zlib", "zlib:1", True),
    ("gzip", "gzip:5", True),
    ("gzip:9", "gzip:9", True),
    ("none", "none", False),
    ("NONE", "none", False),
]


@pytest.mark.parametrize(("value", "text", "compresses"), CANONICAL)
def test_canonical_forms(value: str, text: str, compresses: bool) -> None:
    parsed = parse_compression(value, "compression")
    assert parsed.text == text
    assert parsed.compresses is compresses


def test_the_default_is_zarrs_zstd() -> None:
    assert parse_compression(DEFAULT_COMPRESSION, "compression") == Compression("zstd", 0)


BAD = [
    ("", "must be a codec name"),
    (5, "must be a codec name"),
    (None, "must be a codec name"),
    ("brotli", "names no codec this tool writes ('brotli')"),
    ("lz4", "is written 'blosc:lz4:LEVEL' here"),
    ("none:1", "'none' takes no settings"),
    ("zstd:fast", "not a whole number ('fast')"),
    ("zstd:23", "zstd level outside 0-22 (23)"),
    ("zlib:-1", "zlib level outside 0-9 (-1)"),
    ("gzip:10", "gzip level outside 0-9 (10)"),
    ("blosc:snappy:5", "names no blosc compressor ('snappy')"),
    ("blosc:lz4:5:bitshuffle", "too many ':' parts for blosc"),
    ("zlib:1:2", "too many ':' parts for zlib"),
]


@pytest.mark.parametrize(("value", "problem"), BAD)
def test_bad_values_name_parameter_value_and_forms(value: object, problem: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_compression(value, "variables['t2m'][0].compression")
    err = info.value
    assert err.parameter == "variables['t2m'][0].compression"
    assert err.value == value
    assert problem in err.problem
    assert "'blosc:CNAME:LEVEL'" in err.fix and "'none'" in err.fix


@given(
    st.sampled_from(["zstd", "blosc", "zlib", "gzip", "none"]),
    st.sampled_from(BLOSC_CNAMES),
    st.integers(0, 9),
)
def test_the_canonical_text_parses_to_itself(codec: str, cname: str, level: int) -> None:
    """One codec, one spelling: whatever is written, its canonical text is a fixed point."""
    value = {"blosc": f"blosc:{cname}:{level}", "none": "none"}.get(codec, f"{codec}:{level}")
    once = parse_compression(value.upper(), "compression")
    assert parse_compression(once.text, "compression") == once
