"""``python -m deployments [--policy PATH] [options]`` in a clone: ``zarr-parallel deploy`` of
this folder's ``prefect.yaml`` (entrypoints ``flows/*.py``), with the clone as the project folder.

See :mod:`zarr_parallel.orchestration.deploy`.
"""

import sys
from pathlib import Path

from zarr_parallel.orchestration.deploy import main

PROJECT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(main(prefect_file=PROJECT / "deployments" / "prefect.yaml", project=PROJECT))
