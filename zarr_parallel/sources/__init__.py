"""Sources: opening, on-disk chunk layouts, remote access, combining files, the target view and
the HDF5 fast read."""
