"""Pure planning: jobs aligned to source and target chunk grids, tiles, worker sizing (no I/O)."""
