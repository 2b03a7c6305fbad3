"""Benchmarks of memfs against the floor of its FUSE binding, tmpfs and the real sysfs.

``./scripts/bench`` (or ``python -m memfs.bench``) runs every measurement in one
process tree and prints a table of times *and ratios*; see :mod:`memfs.bench.run`.
The daemons it measures are started by :mod:`memfs.bench.servers`.
"""
