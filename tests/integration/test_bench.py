"""scripts/bench --quick runs end to end: the table and the JSON keys (never a time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.fuse import fuse_unavailable

ROOT = Path(__file__).resolve().parents[2]
_WHY = fuse_unavailable()
pytestmark = [
    pytest.mark.skipif(_WHY is not None, reason=_WHY or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (allow_other)"),
    pytest.mark.skipif(not (ROOT / ".venv/bin/python").exists(), reason="scripts/bench uses ./.venv"),
]


def test_bench_quick_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    work = Path(tempfile.mkdtemp(prefix="bench-test-", dir="/tmp"))
    r = subprocess.run([str(ROOT / "scripts/bench"), "--quick", "--json", str(out),
                        "--workdir", str(work)],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout
    for heading in ("1. attribute access", "2. writes", "3. lsmem", "4. model alone",
                    "5. mount time", "6. concurrent readers", "targets:"):
        assert heading in table, table
    assert f"results written to {out}" in table
    assert "memfs/min" in table and "memfs/tmpfs" in table and "memfs/sysfs" in table

    res = json.loads(out.read_text())
    assert res["quick"] is True
    assert {"nproc", "cpu", "kernel"} <= set(res["machine"])
    for attr in ("state", "valid_zones"):
        row = res["attr"][attr]
        assert {"memfs_us", "minimal_us", "tmpfs_us", "sysfs_us", "memfs_over_minimal",
                "memfs_over_tmpfs", "memfs_over_sysfs"} <= set(row)
        assert row["memfs_us"] > 0 and row["minimal_us"] > 0 and row["tmpfs_us"] > 0
    w = res["writes"]
    assert {"online_us", "offline_us", "pair_us"} <= set(w) and w["final_state"] == "offline"
    assert [s["blocks"] for s in w["sizes"]] == res["plan"]["write_blocks"]
    assert all(s["final_state"] == "offline" and s["over_smallest"] > 0 for s in w["sizes"])
    if "skipped" not in res["lsmem"]:
        for size in res["lsmem"]["sizes"]:
            for key in ("lsmem", "lsmem_a"):
                assert size[key]["same_output"] is True  # memfs and its static copy agree
                assert {"memfs_s", "memfs_cold_s", "tmpfs_s", "memfs_over_tmpfs"} <= set(size[key])
    assert [s["blocks"] for s in res["model"]["sizes"]] == res["plan"]["model_blocks"]
    assert all({"pair_us", "over_smallest"} <= set(s) for s in res["model"]["sizes"])
    assert all({"ready_s", "rss_mib", "rss_after_all_mib"} <= set(s) for s in res["mount"]["sizes"])
    assert {"one_ops_s", "many_ops_s", "many_over_one"} <= set(res["concurrency"])
    assert set(res["targets"]) >= {"attr_within_2x_of_sysfs", "lsmem_a_within_3x_of_tmpfs",
                                   "writes_flat_within_1.3x", "model_flat_within_1.3x",
                                   "mount_under_3s", "rss_under_200MiB"}
    # nothing left mounted or copied
    with open("/proc/self/mounts") as f:
        assert str(work) not in f.read()
    assert os.listdir(work) == []
    os.rmdir(work)


def test_bench_refuses_unknown_section(tmp_path: Path) -> None:
    r = subprocess.run([str(ROOT / "scripts/bench"), "--quick", "--only", "nope"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0 and "unknown section" in r.stderr
    assert shutil.which("bash")
