"""The steps of a run: prepare, one job and its process, pre-flight, verify, re-cache decisions,
recommendations, the operator policy."""
