"""Test tooling that memfs ships: mounts (``mount``) and sandboxed machines (``machine``)
for the ``memfs`` pytest plugin (memfs.pytest_plugin) and memfs's own tests."""
