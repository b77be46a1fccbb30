"""The installed package's version: ``zarr-parallel --version`` and the provenance attributes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zarr-parallel")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
