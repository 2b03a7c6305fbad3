"""The control channel of a memfs daemon: a unix socket found from the mount point alone.

Where: ``<run dir>/<sha1 of realpath(MNT)>.sock``; the run dir is ``$MEMFS_RUN_DIR`` if
set, else ``/run/memfs`` when it can be created and written, else ``/tmp/memfs-<uid>``.
Next to the socket: ``.lock`` (held with flock by the live daemon: a lock that can be
taken means no daemon serves MNT) and ``.log`` (the daemon's stderr).

Protocol: one JSON object per line each way. A request is ``{"op": NAME, ...fields}``;
the reply is ``{"ok": true, ...}`` or ``{"ok": false, "errno": N, "code": "EBUSY",
"error": "message"}``. Ops and fields:

    ping                                        -> pid, mountpoint, version
    status   [format]                           -> status (memfs.status.snapshot); with format
                                                   "text": text (what `memfs status` prints);
                                                   with format "json": the status object as
                                                   raw bytes (see below)
    plug     size, [node, addr, id, driver, memmap_on_memory, requested] -> device, blocks
                                                  (virtio-mem: size is the region, requested
                                                   what the driver plugs, default size)
    unplug   id                                 -> id, blocks
    resize   id, size                           -> device, blocks (virtio-mem: the new requested
                                                   size; EBUSY if blocks to unplug are busy)
    alloc    kind, size, [node, block]          -> allocation
    free     id                                 -> id
    events   [since, wait]                      -> seqnum, events
    state    [digest]                           -> state (the --state file: path, operations
                                                   saved, journal length...; null without one),
                                                   digest (with digest: true; SHA-256 of the
                                                   whole model state, memfs.persist.digest)
    shutdown                                    -> pid (the daemon then unmounts and exits)

Sizes are byte counts or strings like "128M" / "0x8000000". Every op goes through the
Machine's public methods, which take ``machine.lock``. A malformed request gets an error
reply (EINVAL, or EOPNOTSUPP for an unknown op); the connection stays usable.

A reply is one line, of any length (65,536 blocks make a status of ~22 MB), except
``status`` with format "json": the line ``{"ok": true, "raw": "status", "bytes": N}``
is followed by the N bytes of the status object (compact JSON) and a newline, which a
client can copy to its output without decoding it (`memfs status --json`).

Limits, so that no client can wedge or exhaust the daemon: a request line is at most
64 KiB (a longer one gets E2BIG and the connection is closed); at most 64 connections
are served at once (the next gets EAGAIN and is closed); a client that does not read
its reply within 30 s is dropped. No op names a host path: the daemon opens no file
on a client's behalf.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from . import __version__
from .status import device_dict, render_text, snapshot

if TYPE_CHECKING:  # types only: the client side does not load the model
    from .machine.hotplug import Machine
    from .persist import StateFile

# memfs.machine.config and memfs.persist are imported where the daemon's handler needs
# them: the `memfs` command imports this module for its client, and the model would add
# 30-50 ms to every command (see memfs/cli.py).

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
DEFAULT_MODE = 0o600
#: connections served at once; more get an EAGAIN reply and are closed
MAX_CONNECTIONS = 64
#: a client that does not take its reply within this many seconds is dropped
SEND_TIMEOUT = 30
#: longest device id (printable characters only)
MAX_ID = 64
OPS = ("ping", "status", "plug", "unplug", "resize", "alloc", "free", "events", "state", "shutdown")


# ---------------------------------------------------------------------- paths

def run_dirs() -> list[str]:
    """Where control sockets may live, in the order a client looks."""
    env = os.environ.get("MEMFS_RUN_DIR")
    if env:
        return [env]
    return ["/run/memfs", f"/tmp/memfs-{os.geteuid()}"]


def mount_key(mnt: str | os.PathLike[str]) -> str:
    return hashlib.sha1(os.path.realpath(mnt).encode()).hexdigest()


def _usable_dir(d: str, private: bool) -> bool:
    try:
        os.makedirs(d, mode=0o700 if private else 0o755, exist_ok=True)
        st = os.lstat(d)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    if private and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
        return False  # someone else's /tmp/memfs-<uid>: never use it
    return os.access(d, os.W_OK | os.X_OK)


def choose_run_dir() -> str:
    """The first usable run dir (created if missing); OSError if none."""
    for d in run_dirs():
        if _usable_dir(d, private=d.startswith("/tmp/")):
            return d
    raise OSError(errno.EACCES, f"no usable run directory among {', '.join(run_dirs())}; "
                                f"set MEMFS_RUN_DIR to a writable directory")


def paths_in(run_dir: str, mnt: str | os.PathLike[str]) -> dict[str, str]:
    key = mount_key(mnt)
    p = {ext: os.path.join(run_dir, f"{key}.{ext}") for ext in ("sock", "lock", "log")}
    if len(p["sock"].encode()) >= 108:
        raise OSError(errno.ENAMETOOLONG, f"control socket path {p['sock']} is too long for a unix "
                                          f"socket; set MEMFS_RUN_DIR to a shorter directory")
    return p


def socket_candidates(mnt: str | os.PathLike[str]) -> list[str]:
    key = mount_key(mnt)
    return [os.path.join(d, f"{key}.sock") for d in run_dirs()]


# ---------------------------------------------------------------------- requests

class BadRequest(Exception):
    def __init__(self, message: str, code: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = code


def _field(req: dict, key: str, types: tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    if key not in req or req[key] is None:
        if required:
            raise BadRequest(f"{req.get('op')}: field {key!r} is required")
        return default
    v = req[key]
    if isinstance(v, bool) and bool not in types:
        raise BadRequest(f"{req.get('op')}: field {key!r} must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
    if not isinstance(v, types):
        raise BadRequest(f"{req.get('op')}: field {key!r} must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
    return v


def _size(req: dict, key: str, required: bool = False) -> int | None:
    from .machine.config import ConfigError, parse_size
    v = _field(req, key, (int, str), required=required)
    if v is None:
        return None
    try:
        return parse_size(v, key)
    except ConfigError as e:
        raise BadRequest(f"{req.get('op')}: {e}") from None


_FIELDS = {
    "ping": set(), "status": {"format"}, "shutdown": set(),
    "plug": {"size", "node", "addr", "id", "driver", "memmap_on_memory", "requested"},
    "unplug": {"id"},
    "resize": {"id", "size"},
    "alloc": {"kind", "size", "node", "block"},
    "free": {"id"},
    "events": {"since", "wait"},
    "state": {"digest"},
}


_LOGGED = {"plug", "unplug", "resize", "alloc", "free", "shutdown"}


def _event_dict(ev: Any) -> dict[str, Any]:
    return {"seqnum": ev.seqnum, "action": ev.action, "devpath": ev.devpath,
            "subsystem": ev.subsystem, "env": dict(ev.env())}


class Handler:
    """Turns request lines into reply objects for one Machine (no sockets: unit-testable)."""

    def __init__(self, machine: "Machine", info: dict[str, Any] | None = None,
                 on_shutdown: Callable[[], None] | None = None, state: "StateFile | None" = None) -> None:
        self.m = machine
        self.info = dict(info or {})
        self.state = state  # memfs.persist.StateFile, or None
        self.on_shutdown = on_shutdown
        self.shutdown_requested = False
        # Wraps every op: the daemon sets the FUSE invalidator's collect(), so that the
        # kernel's cached copies of what the op changed are dropped before the reply.
        self.around_op: Callable[[], ContextManager[None]] = contextlib.nullcontext

    def handle_line(self, line: bytes | str) -> dict[str, Any]:
        req: Any = None
        try:
            try:
                req = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"request is not valid JSON: {e}") from None
            except RecursionError:
                raise BadRequest("request is nested too deeply") from None
            if not isinstance(req, dict):
                raise BadRequest("request must be a JSON object like {\"op\": \"status\"}")
            op = req.get("op")
            if not isinstance(op, str):
                raise BadRequest("request needs a string field \"op\"")
            if op not in _FIELDS:
                raise BadRequest(f"unknown op {op!r}; ops: {', '.join(OPS)}", errno.EOPNOTSUPP)
            unknown = set(req) - _FIELDS[op] - {"op"}
            if unknown:
                raise BadRequest(f"{op}: unknown field(s) {', '.join(sorted(unknown))}; "
                                 f"allowed: {', '.join(sorted(_FIELDS[op])) or 'none'}")
            with self.around_op():
                result = getattr(self, "op_" + op)(req)
            reply = {"ok": True, **result}
            if op in _LOGGED:
                log.info("%s: ok", json.dumps(req, sort_keys=True))
            return reply
        except BadRequest as e:
            return error_reply(e.errno, str(e))
        except OSError as e:
            code = e.errno if isinstance(e.errno, int) else errno.EIO
            log.info("%s: %s", json.dumps(req, sort_keys=True), e.strerror or e)
            return error_reply(code, e.strerror or str(e))
        except Exception as e:  # a bug: report it, keep serving
            log.exception("control request failed")
            return error_reply(errno.EIO, f"internal error: {type(e).__name__}: {e}")

    # -- ops ---------------------------------------------------------------

    def op_ping(self, req: dict) -> dict:
        return {"pid": os.getpid(), "mountpoint": self.info.get("mountpoint"), "version": __version__}

    def op_status(self, req: dict) -> dict:
        fmt = _field(req, "format", (str,))
        if fmt not in (None, "text", "json"):
            raise BadRequest('status: format is "text" or "json"')
        s = snapshot(self.m, **self.info)
        if fmt == "text":
            return {"text": render_text(s)}
        if fmt == "json":
            return {"status": Raw(json.dumps(s, separators=(",", ":")).encode())}
        return {"status": s}

    def op_plug(self, req: dict) -> dict:
        size = _size(req, "size", required=True)
        node = _field(req, "node", (int,), 0)
        addr = _size(req, "addr")
        dev_id = _field(req, "id", (str,))
        driver = _field(req, "driver", (str,), "acpi")
        mom = _field(req, "memmap_on_memory", (bool,), False)
        requested = _size(req, "requested")
        if requested is not None and driver != "virtio_mem":
            raise BadRequest("plug: requested is a virtio-mem size (the device's region is size); other "
                             "devices are plugged whole")
        if mom and driver != "dax_kmem":
            raise BadRequest("plug: memmap_on_memory can be requested for driver dax_kmem only; an ACPI "
                             "DIMM gets it from the boot parameter (boot.memmap_on_memory) and the kernel "
                             "profile, virtio-mem and probe never use it")
        if dev_id is not None and not (0 < len(dev_id) <= MAX_ID and dev_id.isprintable()):
            raise BadRequest(f"plug: id must be 1 to {MAX_ID} printable characters, e.g. dimm4")
        dev = self.m.plug(size, node=node, addr=addr, dev_id=dev_id, driver=driver, memmap_on_memory=mom,
                          requested=requested)
        with self.m.lock:
            blocks = [{"id": b, "state": self.m.blocks[b].state} for b in dev.block_ids if b in self.m.blocks]
            return {"device": device_dict(self.m, dev), "blocks": blocks}

    def op_unplug(self, req: dict) -> dict:
        dev_id = _field(req, "id", (str,), required=True)
        with self.m.lock:
            blocks = list(self.m.device(dev_id).block_ids)
            self.m.unplug(dev_id)
        return {"id": dev_id, "blocks": blocks}

    def op_resize(self, req: dict) -> dict:
        dev_id = _field(req, "id", (str,), required=True)
        size = _size(req, "size", required=True)
        dev = self.m.resize(dev_id, size)
        with self.m.lock:
            blocks = [{"id": b, "state": self.m.blocks[b].state} for b in dev.block_ids]
            return {"device": device_dict(self.m, dev), "blocks": blocks}

    def op_alloc(self, req: dict) -> dict:
        kind = _field(req, "kind", (str,), required=True)
        if kind not in ("movable", "unmovable"):
            raise BadRequest(f"alloc: kind must be \"movable\" or \"unmovable\", got {kind!r}")
        size = _size(req, "size", required=True)
        node = _field(req, "node", (int,))
        block = _field(req, "block", (int,))
        if node is not None and node not in self.m.nodes:
            raise BadRequest(f"alloc: node {node} does not exist")
        a = self.m.alloc(kind, size, node, block)
        return {"allocation": a.to_dict()}

    def op_free(self, req: dict) -> dict:
        aid = _field(req, "id", (int,), required=True)
        with self.m.lock:
            a = self.m.allocator.allocs.get(aid)
            if a is not None and a.label != "user":
                raise OSError(errno.EPERM, f"allocation {aid} belongs to the kernel ({a.label}); "
                                           f"only allocations made with alloc can be freed")
            self.m.free(aid)
        return {"id": aid}

    def op_events(self, req: dict) -> dict:
        since = _field(req, "since", (int,), 0)
        wait = _field(req, "wait", (int, float), 0)
        if not 0 <= wait <= 60:
            raise BadRequest("events: wait must be between 0 and 60 seconds")
        evs = self.m.events.wait_after(since, wait) if wait else self.m.events.since(since)
        return {"seqnum": self.m.events.seqnum, "events": [_event_dict(e) for e in evs]}

    def op_state(self, req: dict) -> dict:
        want = _field(req, "digest", (bool,), False)
        with self.m.lock:
            out: dict[str, Any] = {"state": self.state.info() if self.state is not None else None}
            if want:
                from .persist import CodecError, digest
                try:
                    out["digest"] = digest(self.m)
                except CodecError as e:
                    raise OSError(errno.EOPNOTSUPP, f"no digest: {e}") from None
        return out

    def op_shutdown(self, req: dict) -> dict:
        self.shutdown_requested = True
        return {"pid": os.getpid()}


def error_reply(code: int, message: str) -> dict[str, Any]:
    return {"ok": False, "errno": code, "code": errno.errorcode.get(code, str(code)), "error": message}


# ---------------------------------------------------------------------- server

class ControlServer:
    """Accepts connections on a unix socket; one thread per connection."""

    def __init__(self, handler: Handler, path: str, mode: int = DEFAULT_MODE) -> None:
        self.handler = handler
        self.path = path
        self.mode = mode
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def bind(self) -> None:
        """Create the socket (replacing a stale one) with its mode set before anyone can connect."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
            else:
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket; remove it")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777)  # no window in which the socket is open to others
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        s.listen(128)
        self.sock = s

    def start(self) -> None:
        if self.sock is None:
            self.bind()
        self._thread = threading.Thread(target=self._accept_loop, name="memfs-control", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self.sock is not None
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closing:
                    return
                continue
            if not self._slots.acquire(blocking=False):
                with conn:
                    conn.settimeout(1)
                    _send(conn, error_reply(errno.EAGAIN, f"too many control connections "
                                                          f"({MAX_CONNECTIONS}); try again"))
                continue
            try:
                threading.Thread(target=self._serve_conn, args=(conn,), name="memfs-control-conn",
                                 daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, keep serving
                self._slots.release()
                conn.close()

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            # blocking socket, but a reply nobody takes does not pin this thread forever
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
            self._serve(conn)
        finally:
            self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rf:
            while True:
                try:
                    line = rf.readline(MAX_LINE + 1)
                except OSError:
                    return
                if not line:
                    return
                if len(line) > MAX_LINE and not line.endswith(b"\n"):
                    _send(conn, error_reply(errno.E2BIG, f"request longer than {MAX_LINE} bytes"))
                    return
                if not line.strip():
                    continue
                reply = self.handler.handle_line(line)
                if not _send(conn, reply):
                    return
                if self.handler.shutdown_requested and self.handler.on_shutdown is not None:
                    self.handler.on_shutdown()
                    return

    def close(self) -> None:
        self._closing = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class Raw(bytes):
    """A reply field sent as raw bytes after the reply line (status with format "json")."""


def _send(conn: socket.socket, obj: dict) -> bool:
    raw = [(k, v) for k, v in obj.items() if isinstance(v, Raw)]
    try:
        if raw:
            key, data = raw[0]
            head = {k: v for k, v in obj.items() if k != key}
            head.update(raw=key, bytes=len(data))
            conn.sendall(json.dumps(head, separators=(",", ":")).encode() + b"\n")
            conn.sendall(data)
            conn.sendall(b"\n")
        else:
            conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- client

class NotRunning(Exception):
    """No memfs daemon answers for this mount point."""

    def __init__(self, mnt: str, sockets: list[str]) -> None:
        super().__init__(f"no memfs is mounted at {mnt}")
        self.mnt = mnt
        self.sockets = sockets


class ControlError(Exception):
    """An error reply ({"ok": false, ...}) or a broken connection."""

    def __init__(self, code: int, message: str, reply: dict | None = None) -> None:
        super().__init__(message)
        self.errno = code
        self.message = message
        self.reply = reply or {}


def _connect(s: socket.socket, path: str, timeout: float) -> None:
    """connect(2), waiting (up to ``timeout``) while the daemon's listen backlog is full:
    a unix socket with a timeout fails EAGAIN at once instead of waiting for room."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() + delay > deadline:
                raise OSError(errno.ETIMEDOUT, f"the memfs daemon accepts no connection on {path}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


class ControlClient:
    """``with ControlClient(mnt) as c: c.call("plug", size="128M")``.

    Connecting raises NotRunning if no daemon listens for ``mnt`` and PermissionError
    (errno EACCES) if the socket's mode keeps the caller out.
    """

    def __init__(self, mnt: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.mnt = os.fspath(mnt)
        self.timeout = timeout
        self.path: str | None = None
        self.sock: socket.socket | None = None
        self._rf: Any = None
        cands = socket_candidates(self.mnt)
        denied: OSError | None = None
        for path in cands:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                _connect(s, path, timeout)
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
                s.close()
                continue
            except PermissionError:
                s.close()
                denied = denied or PermissionError(errno.EACCES, "Permission denied", path)
                continue
            except OSError:
                s.close()
                raise
            self.sock, self.path = s, path
            self._rf = s.makefile("rb")
            return
        if denied is not None:
            raise denied
        raise NotRunning(self.mnt, cands)

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._rf is not None:
            self._rf.close()
            self._rf = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one request object, return the reply object (ok or not)."""
        if self.sock is None:
            raise ControlError(errno.ENOTCONN, "control connection is closed")
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
            line = self._rf.readline()  # no limit: the daemon is trusted, its replies grow with the machine
            raw: bytes | None = None
            if line.startswith(b'{"ok":true,"raw":'):
                head = json.loads(line)
                raw = self._rf.read(int(head["bytes"]) + 1)[:-1]
        except socket.timeout:
            raise ControlError(errno.ETIMEDOUT, f"no reply from the memfs daemon within "
                                                f"{timeout or self.timeout:g} s") from None
        except OSError as e:
            raise ControlError(e.errno or errno.EIO, f"control connection failed: {e}") from None
        if not line or (raw is not None and len(raw) != head["bytes"]):
            raise ControlError(errno.ECONNRESET, "the memfs daemon closed the control connection")
        if raw is not None:
            reply = {k: v for k, v in head.items() if k not in ("raw", "bytes")}
            reply[head["raw"]] = raw
            return reply
        try:
            return json.loads(line)
        except ValueError as e:
            raise ControlError(errno.EPROTO, f"the memfs daemon sent a malformed reply ({e})") from None

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """One op; returns the reply, raises ControlError on {"ok": false}."""
        req = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
        reply = self.request(req, timeout)
        if not reply.get("ok"):
            raise ControlError(int(reply.get("errno", errno.EIO)), str(reply.get("error", "unknown error")), reply)
        return reply
