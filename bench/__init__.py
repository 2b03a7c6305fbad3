"""Benchmarks of memfs against the floor of its FUSE binding, tmpfs and the real sysfs.

Not part of the product (the ``memfs`` package): ``./scripts/bench`` runs
``python -m bench`` from the repository root; every measurement in one process tree,
printed as times *and ratios* (see :mod:`bench.run`).  The daemons it measures are
started by :mod:`bench.servers`.
"""
