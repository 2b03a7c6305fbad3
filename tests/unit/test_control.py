"""The control protocol without FUSE: Handler on request lines, server and client on a socket."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import threading

import pytest

from memfs import control
from memfs.machine.hotplug import Machine


@pytest.fixture
def m() -> Machine:
    return Machine.from_config()


def call(h: control.Handler, obj) -> dict:
    line = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
    return h.handle_line(line)


@pytest.mark.parametrize("line, code, words", [
    (b"{not json", errno.EINVAL, "not valid JSON"),
    (b"\xff\xfe", errno.EINVAL, "not valid JSON"),
    (b"[1, 2]", errno.EINVAL, "JSON object"),
    (b"{}", errno.EINVAL, "\"op\""),
    (b'{"op": 3}', errno.EINVAL, "\"op\""),
    (b'{"op": "reboot"}', errno.EOPNOTSUPP, "unknown op"),
    (b'{"op": "status", "verbose": true}', errno.EINVAL, "unknown field"),
    (b'{"op": "plug"}', errno.EINVAL, "'size' is required"),
    (b'{"op": "plug", "size": [1]}', errno.EINVAL, "must be int or str"),
    (b'{"op": "plug", "size": true}', errno.EINVAL, "must be int or str"),
    (b'{"op": "plug", "size": "12 apples"}', errno.EINVAL, "expected a size"),
    (b'{"op": "plug", "size": "128M", "node": "0"}', errno.EINVAL, "'node' must be int"),
    (b'{"op": "plug", "size": "128M", "memmap_on_memory": 1}', errno.EINVAL, "must be bool"),
    (b'{"op": "plug", "size": "128M", "memmap_on_memory": true}', errno.EINVAL, "dax_kmem only"),
    (b'{"op": "unplug"}', errno.EINVAL, "'id' is required"),
    (b'{"op": "plug", "size": "1G", "requested": "128M"}', errno.EINVAL, "virtio-mem size"),
    (b'{"op": "resize", "id": "vm0"}', errno.EINVAL, "'size' is required"),
    (b'{"op": "resize", "size": "128M"}', errno.EINVAL, "'id' is required"),
    (b'{"op": "alloc", "kind": "huge", "size": 4096}', errno.EINVAL, "kind must be"),
    (b'{"op": "alloc", "kind": "movable", "size": 4096, "node": 7}', errno.EINVAL, "node 7"),
    (b'{"op": "free", "id": "1"}', errno.EINVAL, "'id' must be int"),
    (b'{"op": "events", "since": 1.5}', errno.EINVAL, "'since' must be int"),
    (b'{"op": "events", "wait": 600}', errno.EINVAL, "between 0 and 60"),
])
def test_malformed_requests_get_error_replies(m, line, code, words):
    before = m.generation
    r = call(control.Handler(m), line)
    assert r["ok"] is False and r["errno"] == code, r
    assert r["code"] == errno.errorcode[code]
    assert words in r["error"]
    assert m.generation == before


def test_model_errors_carry_the_kernel_errno(m):
    h = control.Handler(m)
    r = call(h, {"op": "unplug", "id": "dimm9"})
    assert (r["ok"], r["errno"]) == (False, errno.ENOENT)
    r = call(h, {"op": "plug", "size": "100M"})
    assert (r["ok"], r["errno"]) == (False, errno.EINVAL) and "multiple of the block size" in r["error"]
    r = call(h, {"op": "free", "id": 12345})
    assert (r["ok"], r["errno"]) == (False, errno.ENOENT)


def test_plug_unplug_alloc_free_events(m):
    h = control.Handler(m)
    seq = m.events.seqnum
    r = call(h, {"op": "plug", "size": "256M", "id": "extra"})
    assert r["ok"], r
    assert r["device"]["id"] == "extra" and r["device"]["size"] == 256 << 20
    ids = [b["id"] for b in r["blocks"]]
    assert len(ids) == 2 and all(b["state"] == "offline" for b in r["blocks"])
    ev = call(h, {"op": "events", "since": seq})
    assert [(e["action"], e["devpath"]) for e in ev["events"]] == \
        [("add", f"/devices/system/memory/memory{i}") for i in ids]
    assert ev["seqnum"] == m.events.seqnum and ev["events"][0]["env"]["SEQNUM"] == str(seq + 1)

    m.state_store(ids[0], 2)  # online_kernel: ZONE_NORMAL takes unmovable pages
    a = call(h, {"op": "alloc", "kind": "unmovable", "size": "4M", "block": ids[0]})
    assert a["ok"] and a["allocation"]["blocks"] == {str(ids[0]): 1024}
    gen = m.generation
    r = call(h, {"op": "unplug", "id": "extra"})
    assert (r["ok"], r["errno"]) == (False, errno.EBUSY)
    assert m.blocks[ids[0]].state == "online" and "extra" in m.devices
    assert call(h, {"op": "free", "id": a["allocation"]["id"]})["ok"]
    assert m.generation > gen
    r = call(h, {"op": "unplug", "id": "extra"})
    assert r["ok"] and r["blocks"] == ids
    assert "extra" not in m.devices and not any(i in m.blocks for i in ids)


def test_plug_with_requested_then_resize(m):
    h = control.Handler(m)
    r = call(h, {"op": "plug", "size": "1G", "driver": "virtio_mem", "id": "vm0", "requested": "256M"})
    assert r["ok"], r
    d = r["device"]
    assert (d["size"], d["requested"], d["plugged"]) == (1 << 30, 256 << 20, 256 << 20)
    assert r["blocks"] == [{"id": 42, "state": "offline"}, {"id": 43, "state": "offline"}]
    r = call(h, {"op": "resize", "id": "vm0", "size": "128M"})
    assert r["ok"] and r["blocks"] == [{"id": 42, "state": "offline"}] and r["device"]["requested"] == 128 << 20
    r = call(h, {"op": "resize", "id": "dimm1", "size": 0})
    assert (r["ok"], r["errno"]) == (False, errno.EOPNOTSUPP) and "not a virtio-mem device" in r["error"]
    r = call(h, {"op": "resize", "id": "vm0", "size": "2G"})
    assert (r["ok"], r["code"]) == (False, "EINVAL") and "outside vm0's region" in r["error"]


def test_kernel_allocations_cannot_be_freed(m):
    kernel = next(a for a in m.allocator.allocs.values() if a.label != "user")
    r = call(control.Handler(m), {"op": "free", "id": kernel.id})
    assert (r["ok"], r["errno"]) == (False, errno.EPERM)
    assert kernel.id in m.allocator.allocs


def test_status_reply_is_json_and_consistent(m):
    r = call(control.Handler(m, {"mountpoint": "/x", "pid": 1}), {"op": "status"})
    s = json.loads(json.dumps(r))["status"]
    assert s["mountpoint"] == "/x" and s["kernel"] == "6.1" and s["block_size"] == 128 << 20
    assert [b["id"] for b in s["blocks"]] == m.block_ids()
    assert s["meminfo"]["MemTotal"] == m.meminfo()["MemTotal"]
    assert {d["id"] for d in s["devices"]} == {"dimm1", "dimm2", "dimm3"}


def test_shutdown_sets_the_flag(m):
    h = control.Handler(m)
    r = call(h, {"op": "shutdown"})
    assert r == {"ok": True, "pid": os.getpid()} and h.shutdown_requested


# ---------------------------------------------------------------------- over a socket

@pytest.fixture
def rundir(monkeypatch):
    d = tempfile.mkdtemp(prefix="memfs-ctl-", dir="/tmp")
    monkeypatch.setenv("MEMFS_RUN_DIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_server_and_client(m, rundir, tmp_path):
    mnt = tmp_path / "mnt"
    paths = control.paths_in(control.choose_run_dir(), mnt)
    assert paths["sock"].startswith(rundir + "/") and paths["sock"].endswith(control.mount_key(mnt) + ".sock")
    stopped = threading.Event()
    h = control.Handler(m, {"mountpoint": str(mnt)}, on_shutdown=stopped.set)
    srv = control.ControlServer(h, paths["sock"])
    srv.start()
    try:
        st = os.stat(paths["sock"])
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        with control.ControlClient(mnt, timeout=10) as c:
            assert c.call("ping")["pid"] == os.getpid()
            with pytest.raises(control.ControlError) as ei:
                c.call("unplug", id="nope")
            assert ei.value.errno == errno.ENOENT
            # a bad line does not break the connection
            assert c.request({"op": "bogus"})["errno"] == errno.EOPNOTSUPP
            c.sock.sendall(b"garbage\n\n")
            assert json.loads(c._rf.readline())["errno"] == errno.EINVAL
            assert c.call("plug", size=128 << 20)["device"]["id"] == "dimm4"
            assert c.call("status")["status"]["devices"][-1]["id"] == "dimm4"
        # an over-long line is refused and the connection closed
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(paths["sock"])
            s.sendall(b"x" * (control.MAX_LINE + 10))
            reply = json.loads(s.makefile("rb").readline())
            assert reply["errno"] == errno.E2BIG
        with control.ControlClient(mnt, timeout=10) as c:
            assert c.call("shutdown")["pid"] == os.getpid()
        assert stopped.wait(5)
    finally:
        srv.close()
    assert not os.path.exists(paths["sock"])
    with pytest.raises(control.NotRunning):
        control.ControlClient(mnt)


def test_stale_socket_is_not_running_and_is_replaced(m, rundir, tmp_path):
    mnt = tmp_path / "mnt"
    paths = control.paths_in(control.choose_run_dir(), mnt)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(paths["sock"])
    stale.close()  # the file stays, nobody listens
    with pytest.raises(control.NotRunning):
        control.ControlClient(mnt)
    srv = control.ControlServer(control.Handler(m), paths["sock"], mode=0o660)
    srv.start()
    try:
        assert stat.S_IMODE(os.stat(paths["sock"]).st_mode) == 0o660
        with control.ControlClient(mnt) as c:
            assert c.call("ping")["ok"]
    finally:
        srv.close()


def test_server_refuses_to_replace_a_regular_file(m, rundir, tmp_path):
    paths = control.paths_in(control.choose_run_dir(), tmp_path / "mnt")
    open(paths["sock"], "w").close()
    with pytest.raises(OSError) as ei:
        control.ControlServer(control.Handler(m), paths["sock"]).bind()
    assert ei.value.errno == errno.EEXIST


def test_run_dir_fallback_and_socket_path_length(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMFS_RUN_DIR", raising=False)
    assert control.run_dirs() == ["/run/memfs", f"/tmp/memfs-{os.geteuid()}"]
    monkeypatch.setenv("MEMFS_RUN_DIR", "/tmp/" + "d" * 80)
    with pytest.raises(OSError) as ei:
        control.paths_in(control.run_dirs()[0], tmp_path)
    assert ei.value.errno == errno.ENAMETOOLONG


def test_status_formats_and_replies_beyond_16_mib(m, rundir, tmp_path, monkeypatch):
    """status as text (rendered by the daemon), as raw JSON bytes after a header line, and
    as an object; a reply line longer than the old 16 MiB client limit is read whole."""
    from memfs.status import render_text, snapshot

    mnt = tmp_path / "mnt"
    paths = control.paths_in(control.choose_run_dir(), mnt)
    h = control.Handler(m, {"mountpoint": str(mnt)})
    big = "x" * (17 << 20)  # what a status of a huge machine would weigh
    monkeypatch.setattr(control.Handler, "op_ping", lambda self, req: {"pad": big})
    srv = control.ControlServer(h, paths["sock"])
    srv.start()
    try:
        with control.ControlClient(mnt, timeout=30) as c:
            assert c.call("ping")["pad"] == big
            text = c.call("status", format="text")["text"]
            assert text == render_text(snapshot(m, mountpoint=str(mnt)))
            raw = c.call("status", format="json")["status"]
            assert isinstance(raw, bytes) and b"\n" not in raw
            assert json.loads(raw) == c.call("status")["status"]
            assert c.call("ping")["pad"] == big  # the connection is still in step
            with pytest.raises(control.ControlError) as ei:
                c.call("status", format="yaml")
            assert ei.value.errno == errno.EINVAL and '"text" or "json"' in ei.value.message
    finally:
        srv.close()
