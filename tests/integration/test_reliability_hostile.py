"""Hostile input through a real daemon: any bytes at any offset to every writable file,
odd names, and malformed control requests get the kernel's (the model's) errno or
success and nothing else: no crash, no change on failure, no traceback in the log, and
in the end the daemon's whole state equals the reference model's that saw the same input.
Hypothesis drives the fuzzing, with bounded examples ($MEMFS_FUZZ_EXAMPLES)."""
from __future__ import annotations

import errno
import json
import os
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs import control
from memfs.status import snapshot
from tests.support.reliability import (Reference, count, daemon, env_int, invariants, log_problems,
                                       writable_files, pwrite)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, allow_other, /run/memfs)"),
              pytest.mark.usefixtures("reliability_figures")]

EHWPOISON = 133
#: errnos a sysfs store of this emulated kernel may give (EIO: autosuspend_delay_ms, which
#: has no runtime PM, and soft_offline_page of a page that is not online, as Linux does)
KERNEL_ERRNOS = {errno.EINVAL, errno.ERANGE, errno.EBUSY, errno.ENODEV, errno.ENXIO, errno.EEXIST, errno.E2BIG,
                 errno.ENOSPC, errno.ENOENT, errno.EPERM, errno.ENOMEM, errno.EOPNOTSUPP, EHWPOISON}
EIO_FILES = ("autosuspend_delay_ms", "soft_offline_page")

INTERESTING = [
    b"", b"\0", b"\n", b"online", b"online\n", b"offline", b"online_movable", b"online_kernel", b"1", b"0", b"y",
    b"N", b"on", b"off", b"-1", b"+1", b"0x", b"0x100000000", b"0x10012300", b"18446744073709551615",
    b"18446744073709551616", b"99999999999999999999999999999999999999", b"4294967296", b"4294967295",
    b"-9223372036854775809", b"1e9", b"0o17", b"0b1", b" online", b"online ", b"online\n\n", b"ONLINE",
    b"online\0garbage", b"\0online", b"\xff\xfe\xfd", "\u00e9t\u00e9".encode(), b"\xc3(", b"\xed\xa0\x80",
    b"add", b"change", b"remove", b"change 01234567-89ab-cdef-0123-456789abcdef",
    b"change 01234567-89ab-cdef-0123-456789abcdef A=b C=d", b"change 01234567-89ab-cdef-0123-456789abcdef A=",
    b"online 00000000-0000-0000-0000-000000000000 \xff=1", b"auto", b"contig-zones", b"auto-movable",
    b"%s%s%n", b"../../../../etc/passwd", b"/etc/shadow",
]


def data_strategy() -> st.SearchStrategy[bytes]:
    big = st.tuples(st.binary(min_size=1, max_size=32), st.integers(0, 64 * 1024)).map(
        lambda t: (t[0] * (t[1] // len(t[0]) + 1))[:t[1]])
    numbers = st.tuples(st.sampled_from([b"", b"-", b"+", b"0x", b"0", b" "]), st.integers(0, 10**40),
                        st.sampled_from([b"", b"\n", b"\0", b"k", b" "])).map(
        lambda t: t[0] + str(t[1]).encode() + t[2])
    return st.one_of(st.sampled_from(INTERESTING), st.binary(max_size=64), numbers, big,
                     st.tuples(st.sampled_from(INTERESTING), st.binary(max_size=8)).map(lambda t: t[0] + t[1]))


def offsets() -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(0, 8192), st.integers(0, 2**62))

def ref_write(ref: Reference, rel: str, data: bytes) -> int | None:
    try:
        return ref.write(rel, data)
    except OSError as e:  # the path itself is gone (an ejected DIMM's block)
        return e.errno


def public(m) -> dict:
    s = snapshot(m)
    s.pop("generation", None)  # bumped by some refused changes too (it is not shown anywhere)
    return s


def test_any_bytes_to_any_writable_file():
    examples = env_int("MEMFS_FUZZ_EXAMPLES", 400)
    ref = Reference(overrides={"probe": True})
    files = writable_files(ref.tree, limit_blocks=[0, 1, 32, 33, 34, 35, 41])
    assert len(files) > 40 and any(f.endswith("/probe") for f in files)
    tried: dict[str, set] = {}
    with daemon(mount=False) as d:
        d.args = ["--no-sandbox", "--set", "probe=true", "--state", str(d.base / "machine.state")]
        d.mount()

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(rel=st.sampled_from(files), data=data_strategy(), offset=offsets())
        def one(rel: str, data: bytes, offset: int) -> None:
            before = public(ref.m)
            want = ref_write(ref, rel, data)
            got = pwrite(d.path / rel, data, offset)
            assert got == want, (rel, data[:80], offset, got, want)
            if got is not None:
                name = rel.rsplit("/", 1)[-1]
                assert got in KERNEL_ERRNOS or (got == errno.EIO and name in EIO_FILES), (rel, data[:80], got)
                assert public(ref.m) == before, (rel, data[:80], "a refused write changed the machine")
            tried.setdefault(rel.rsplit("/", 1)[-1], set()).add(errno.errorcode.get(got, got) if got else "ok")
            count("hostile writes tried")
        one()
        assert d.digest() == ref.digest()  # the daemon did exactly what the model did
        s = d.status()
        assert not invariants(s), invariants(s)
        assert not log_problems(d.log()), log_problems(d.log())[:5]
        assert len(tried) >= min(12, examples // 20), tried  # most kinds of file were hit
        # and what was saved restores to the same machine
        want = d.digest()
        d.kill()
        d.mount()
        assert d.digest() == want
        count("crashes survived")


ODD_NAMES = [b"\xff", b"memory\xff", b"\xc3(", "memory٣٢".encode(), "memory²".encode(), b"memory032",
             b"memory-1", b"...", b"memory32\n", b" ", b"*", "é".encode(), b"a" * 255]


def test_odd_lookups_get_enoent_or_enametoolong():
    with daemon("--no-sandbox") as d:
        dirs = [d.path, d.path / "sys", d.memory, d.memory / "memory32", d.path / "sys/devices/system/node/node0",
                d.path / "sys/bus/acpi/devices/PNP0C80:00", d.path / "proc"]
        n = 0
        for base in dirs:
            for name in ODD_NAMES:
                with pytest.raises(OSError) as ei:
                    os.stat(os.fsencode(base) + b"/" + name)
                assert ei.value.errno == errno.ENOENT, (base, name)
                n += 1
            for length in (256, 1024, 1025, 4000):  # >255 reaches the daemon, >1024 stops in the kernel
                with pytest.raises(OSError) as ei:
                    os.stat(os.fsencode(base) + b"/" + b"m" * length)
                assert ei.value.errno == errno.ENAMETOOLONG, (base, length)
                n += 1
        # ".." is the kernel's: it stays in the tree, and leaves it only at MNT itself
        assert os.stat(d.path / "sys/devices/system/..").st_ino == os.stat(d.path / "sys/devices").st_ino
        assert os.path.realpath(d.memory / "memory32/../../../../..") == str(d.path)
        # nothing can be created, removed or renamed
        for fn, args, codes in [
            (os.open, (d.memory / "new", os.O_CREAT | os.O_WRONLY, 0o644), (errno.EACCES,)),
            (os.mkdir, (d.memory / "new",), (errno.EPERM, errno.EACCES)),
            (os.rmdir, (d.memory / "memory32",), (errno.EPERM, errno.EACCES)),
            (os.unlink, (d.memory / "memory32/state",), (errno.EPERM, errno.EACCES)),
            (os.rename, (d.memory / "memory32", d.memory / "memory99"), (errno.EPERM, errno.EACCES)),
            (os.symlink, ("/etc/shadow", d.memory / "evil"), (errno.EPERM, errno.EACCES)),
            (os.link, (d.memory / "memory32/state", d.memory / "hard"), (errno.EPERM, errno.EACCES)),
            (os.chmod, (d.memory / "memory32/state", 0o666), (errno.EPERM,)),
            (os.chown, (d.memory / "memory32/state", 65534, 65534), (errno.EPERM,)),
            (os.truncate, (d.memory / "memory32", 0), (errno.EISDIR,)),
            (os.setxattr, (d.memory / "memory32/state", "user.x", b"1"), (errno.EOPNOTSUPP,)),
        ]:
            with pytest.raises(OSError) as ei:
                fn(*args)
            assert ei.value.errno in codes, (fn.__name__, ei.value)
            n += 1
        assert d.call("ping")["pid"] == d.pid
        assert not log_problems(d.log()), log_problems(d.log())[:5]
        count("odd lookups and refused namespace changes tried", n)


# ---------------------------------------------------------------------- control channel

class Raw:
    """A raw connection to the daemon's control socket."""

    def __init__(self, path: str, timeout: float = 20) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        control._connect(self.s, path, timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def reply(self) -> dict | None:
        """The next reply line, or None if the daemon closed the connection."""
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        self.s.close()


@pytest.mark.parametrize("line, code", [
    (b"{not json", errno.EINVAL), (b"\xff\xfe\x00garbage", errno.EINVAL), (bytes(range(1, 256)).replace(b"\n", b""), errno.EINVAL),
    (b"[" * 100_00, errno.EINVAL), (b'{"op": ' + b"[" * 9000 + b"]" * 9000 + b"}", errno.EINVAL),
    (b"null", errno.EINVAL), (b"42", errno.EINVAL), (b'"status"', errno.EINVAL), (b"{}", errno.EINVAL),
    (b'{"op": null}', errno.EINVAL), (b'{"op": ["status"]}', errno.EINVAL), (b'{"op": "__init__"}', errno.EOPNOTSUPP),
    (b'{"op": "op_status"}', errno.EOPNOTSUPP), (b'{"op": "handle_line"}', errno.EOPNOTSUPP),
    (b'{"op": "status", "path": "/etc/shadow"}', errno.EINVAL), (b'{"op": "plug", "size": "128M", "config": "/etc/passwd"}', errno.EINVAL),
    (b'{"op": "plug", "size": 1e999}', errno.EINVAL), (b'{"op": "plug", "size": NaN}', errno.EINVAL),
    (b'{"op": "plug", "size": -134217728}', errno.EINVAL), (b'{"op": "plug", "size": "128M", "node": 99999999999999999999}', errno.EINVAL),
    (b'{"op": "plug", "size": 1' + b"0" * 5000 + b"}", errno.EINVAL), (b'{"op": "plug", "size": "128M", "id": "a\\nb"}', errno.EINVAL),
    (b'{"op": "plug", "size": "128M", "id": "' + b"x" * 65 + b'"}', errno.EINVAL),
    (b'{"op": "plug", "size": "128M", "addr": "0xfffffff000000000"}', errno.E2BIG),
    (b'{"op": "alloc", "kind": "movable", "size": 99999999999999999999999}', errno.ENOMEM),
    (b'{"op": "free", "id": -1}', errno.ENOENT), (b'{"op": "free", "id": 1}', errno.EPERM),
    (b'{"op": "events", "wait": -1}', errno.EINVAL), (b'{"op": "events", "wait": 1e308}', errno.EINVAL),
    (b'{"op": "state", "digest": "yes"}', errno.EINVAL), (b'{"op": "ping"}\r' * 3, errno.EINVAL),
])
def test_malformed_control_requests_get_error_replies(line, code, _control_daemon):
    d = _control_daemon
    c = Raw(d.sock)
    try:
        c.send(line + b"\n")
        r = c.reply()
        assert r is not None and r["ok"] is False and r["errno"] == code, (line[:60], r)
        c.send(b'{"op": "ping"}\n')  # the connection stays usable
        assert c.reply()["ok"] is True
    finally:
        c.close()
    count("malformed control requests tried")


@pytest.fixture(scope="module")
def _control_daemon():
    with daemon("--no-sandbox") as d:
        d.sock = d.status()["control_socket"]
        yield d
        assert d.call("ping")["pid"] == d.pid  # alive after everything the module sent
        assert not log_problems(d.log()), log_problems(d.log())[:5]


def test_abusive_control_clients_cannot_wedge_the_daemon(_control_daemon):
    d = _control_daemon

    def quick_ping() -> float:
        t0 = time.monotonic()
        with control.ControlClient(d.path, timeout=10) as c:
            assert c.call("ping")["pid"] == d.pid
        return time.monotonic() - t0

    # a line longer than 64 KiB: E2BIG, then the daemon hangs up
    c = Raw(d.sock)
    c.send(b'{"op": "status", "x": "' + b"a" * (70 * 1024))
    r = c.reply()
    assert r["errno"] == errno.E2BIG and c.reply() is None
    c.close()
    # half a line, then disconnect; half a line, then silence (while others are served)
    for _ in range(20):
        c = Raw(d.sock)
        c.send(b'{"op": "plug", "si')
        c.close()
    silent = Raw(d.sock)
    silent.send(b'{"op": "sta')
    assert quick_ping() < 5
    # a client that never reads its replies (its socket buffer fills up)
    greedy = Raw(d.sock)
    greedy.s.setblocking(False)
    sent = 0
    try:
        for _ in range(2000):
            greedy.s.send(b'{"op": "status"}\n')
            sent += 1
    except BlockingIOError:
        pass
    assert quick_ping() < 5
    # more connections than the daemon serves at once: the extra ones get EAGAIN
    hogs = []
    try:
        for _ in range(control.MAX_CONNECTIONS + 6):
            hogs.append(Raw(d.sock, timeout=5))
        refused = 0
        for h in hogs:
            h.s.settimeout(0.5)
            try:
                r = h.reply()
                if r is not None and r.get("errno") == errno.EAGAIN:
                    refused += 1
            except (socket.timeout, OSError):
                pass
        assert refused >= 6, refused
    finally:
        for h in hogs:
            h.close()
        silent.close()
        greedy.close()
    deadline = time.monotonic() + 10
    while True:  # slots come back as the daemon notices the closed connections
        try:
            assert quick_ping() < 5
            break
        except control.ControlError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    count("abusive control connections opened", 20 + 2 + control.MAX_CONNECTIONS + 6)


def json_values() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=12), st.sampled_from(["128M", "1G", "0x8000000", "movable", "unmovable",
                                                               "acpi", "virtio_mem", "dax_kmem", "probe", "dimm1",
                                                               "dimm3", "4096", "0", "-1", "1P"]))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=6)


FIELDS = sorted({f for fs in control._FIELDS.values() for f in fs} | {"path", "file", "x"})


def test_random_control_requests_match_the_model():
    """Random (mostly wrong) requests: same ok/errno as the reference Handler, same final state."""
    examples = env_int("MEMFS_FUZZ_EXAMPLES", 400)
    ref = Reference()
    ops = [o for o in control.OPS if o != "shutdown"] + ["reboot", "", "PLUG"]
    with daemon("--no-sandbox") as d:
        c = Raw(d.status()["control_socket"])

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(op=st.sampled_from(ops), fields=st.dictionaries(st.sampled_from(FIELDS), json_values(), max_size=4))
        def one(op: str, fields: dict) -> None:
            req = {"op": op, **fields}
            if isinstance(req.get("wait"), (int, float)) and not isinstance(req["wait"], bool):
                req["wait"] = min(abs(req["wait"]), 0.01) if req["wait"] == req["wait"] else 0  # bounded
            line = json.dumps(req).encode()
            c.send(line + b"\n")
            got = c.reply()
            want = ref.request(line)
            assert got is not None and got["ok"] == want["ok"] and got.get("errno") == want.get("errno"), (req, got, want)
            count("random control requests tried")
        try:
            one()
        finally:
            c.close()
        assert d.digest() == ref.digest()
        assert not invariants(d.status())
        assert not log_problems(d.log()), log_problems(d.log())[:5]
