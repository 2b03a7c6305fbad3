"""Repo-root conftest: puts the repository on sys.path so tests can import `tests.*`."""
