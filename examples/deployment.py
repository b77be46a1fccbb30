"""The deployment door: start a run of the ``cache`` deployment and wait for it.

What a pipeline or a notebook does to cache through a team's Prefect server (the UI's "Run"
button does the same with a form). Once per server, from a clone or an install::

    export PREFECT_API_URL=http://127.0.0.1:4200/api     # the team's (private) Prefect server
    zarr-parallel deploy                                 # the work pool and the deployments
    prefect worker start --pool zarr-parallel            # in another terminal, or as a service

then::

    python examples/deployment.py --data-uri '/data/era5/*.nc' --cache-dir /scratch/caches

The parameters are the request (the same fields as a request file); the server checks them
against the request's schema before it creates the run, and the worker's operator policy decides
which folders and hosts a run may use (docs/reliability.md). Exit codes follow the command line:
0 done or up to date, 1 failed, 3 waiting for a decision (recommendations; answer it in the UI).
"""

from __future__ import annotations

import argparse
import sys

from prefect.deployments import run_deployment

#: ``flow name/deployment name`` of deployments/prefect.yaml's ad hoc deployment.
DEPLOYMENT = "zarr-parallel-cache/cache"


def main() -> int:
    """Create the flow run, wait for it and print its final state."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-uri", required=True, help="source files, a glob or a .zarr")
    parser.add_argument("--cache-dir", required=True, help="folder the cache goes in")
    parser.add_argument("--label", default="_deployment", help="cache_label of the cache")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait")
    args = parser.parse_args()

    request = {
        "data_uri": args.data_uri,
        "cache_dir": args.cache_dir,
        "cache_label": args.label,
        "chunks": {"time": 24},
        "memory_limit": "1GB",
    }
    run = run_deployment(DEPLOYMENT, parameters={"request": request}, timeout=args.timeout)
    state = run.state
    print(f"flow run {run.name} ({run.id}): {state.name if state else 'unknown'}")
    if state is not None and state.message:
        print(state.message)
    if state is not None and state.is_completed():
        return 0
    if state is not None and (state.is_paused() or state.name == "AwaitingDecision"):
        return 3
    return 1


if __name__ == "__main__":
    sys.exit(main())
