"""Copy a recording of the harness into the repository's conformance data.

    python -m tests.conformance.importer SRC NAME [SCENARIO...]

SRC is a folder the harness wrote (one subfolder per scenario, each with trace.json and
run-meta.json, plus kernel-info.txt); NAME is the kernel folder under
tests/conformance/data (``6.1``, ``6.12``, ``7.2``, ``arm64-6.1``). Only what the tests
read is kept: trace.json (xz-compressed, about 24 kB for a full a/b scenario) and
run-meta.json (the exact QEMU command line); kernel-info.txt (package, version,
config flags) goes to the kernel folder.
"""
from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def import_scenario(src: Path, dest: Path) -> int:
    """src/trace.json + run-meta.json -> dest/trace.json.xz + run-meta.json; returns bytes written."""
    raw = (src / "trace.json").read_bytes()
    json.loads(raw)  # refuse a truncated recording before it replaces a good one
    dest.mkdir(parents=True, exist_ok=True)
    packed = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    (dest / "trace.json.xz").write_bytes(packed)
    shutil.copyfile(src / "run-meta.json", dest / "run-meta.json")
    stale = dest / "trace.json"
    if stale.exists():
        stale.unlink()
    return len(packed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.conformance.importer", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a folder the harness wrote (traces-X/)")
    ap.add_argument("name", help="kernel folder under tests/conformance/data, e.g. 7.2")
    ap.add_argument("scenarios", nargs="*", help="default: every subfolder with a trace.json")
    a = ap.parse_args(argv)
    names = a.scenarios or sorted(p.name for p in a.src.iterdir() if (p / "trace.json").is_file())
    if not names:
        print(f"importer: no <scenario>/trace.json under {a.src}; record one first", file=sys.stderr)
        return 1
    kdir = DATA / a.name
    for n in names:
        size = import_scenario(a.src / n, kdir / n)
        print(f"{kdir / n}: trace.json.xz {size} bytes")
    info = a.src / "kernel-info.txt"
    if info.is_file():
        shutil.copyfile(info, kdir / "kernel-info.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
