"""Durable machine state for ``memfs mount --state FILE``.

:class:`StateFile` is the Machine's journal callback: each operation is appended and
``fdatasync``-ed under the hotplug lock before its caller is answered, or the daemon
stops (exit 74). The file is a hashed header (the machine description and a verified
checkpoint of the whole object graph, :func:`encode`) followed by CRC'd journal lines;
:meth:`StateFile.open` verifies everything and replays the journal, refusing anything
that does not verify. The format, the guarantees and the design choices are in
docs/reliability.md.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import importlib
import json
import logging
import os
import threading
import time
import zlib
from typing import Any, Callable, Iterable

from .machine.config import MachineConfig
from .machine.events import EventLog
from .machine.hotplug import Machine
from .status import snapshot

log = logging.getLogger("memfs.persist")

MAGIC = "memfs-state"
FORMAT = 1
#: journal length that triggers a compaction (at mount and while running);
#: $MEMFS_STATE_COMPACT_EVERY overrides it, 0 disables compaction except at shutdown
COMPACT_EVERY = 10_000
#: exit status of a daemon that could not make a change durable (EX_IOERR)
EXIT_NOT_DURABLE = 74

_ALLOWED_MODULES = ("memfs.machine.",)


class StateError(Exception):
    """The state file cannot be used (corrupt, foreign, in use, or does not replay)."""


class DescriptionMismatch(StateError):
    """The state file was made for another machine description."""


# ---------------------------------------------------------------------- description

def describe(cfg: MachineConfig) -> dict[str, Any]:
    """The machine description as loaded: every field of the MachineConfig (defaults
    explicit, ``block_size`` resolved), as JSON data. Two descriptions are equal exactly
    when they describe the same machine; a field added to MachineConfig later is
    included without a change here."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def description_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> list[str]:
    """Human-readable differences ``key: file has X, now Y``."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k}: the file has {json.dumps(a.get(k, '<absent>'))}, "
                       f"this mount {json.dumps(b.get(k, '<absent>'))}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more"]
    return out


# ---------------------------------------------------------------------- the object graph

class CodecError(Exception):
    """The machine holds something the checkpoint codec does not know how to keep."""


def _transients() -> dict[type, dict[str, Callable[[], Any]]]:
    """Fields that are not state (locks, callbacks) and what a decoded object gets instead."""
    return {
        Machine: {"lock": threading.RLock, "journal": lambda: None, "_depth": lambda: 0,
                  "listeners": list},
        EventLog: {"_cond": threading.Condition, "_listeners": list},
    }


_CONTAINERS = (list, dict, set, frozenset, tuple, collections.deque)


def _externals(cfg: MachineConfig) -> tuple[dict[int, int], list[Any]]:
    """id() of every object and container reachable from the description -> its number
    (depth-first order, the same for any equal description), and those objects."""
    ext: dict[int, int] = {}
    keep: list[Any] = []

    def walk(x: Any) -> None:
        if x is None or isinstance(x, (bool, int, float, str, bytes)) or id(x) in ext:
            return
        ext[id(x)] = len(ext)
        keep.append(x)
        if isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple, set, frozenset, collections.deque)):
            for v in (sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x):
                walk(v)
        elif hasattr(x, "__dict__"):
            for v in vars(x).values():
                walk(v)

    for root in (cfg, cfg.profile, cfg.arch_profile):
        walk(root)
    return ext, keep


def _class_ok(cls: type) -> bool:
    return cls.__module__.startswith(_ALLOWED_MODULES) and hasattr(cls, "__dict__")


_SCALARS = frozenset({type(None), bool, int, str})


def _sorted_members(x: set | frozenset) -> list:
    """A set's members in a stable order, so equal machines encode to equal bytes."""
    try:
        return sorted(x)
    except TypeError:
        return sorted(x, key=repr)


def encode(machine: Machine) -> dict[str, Any]:
    """The Machine's whole object graph as JSON-able data (call under ``machine.lock``).

    Generic: every attribute of every object is kept, except the transient ones above,
    so a field added to the model later is kept without a change here; anything the
    codec cannot represent faithfully (a function, a lock, a container shared by two
    objects, a class outside memfs.machine) raises :class:`CodecError`.

    One depth-first pass. An object is written in full where it is first met; when it
    is met again, its first record gets an ``"i"`` (patched in place) and the later
    place a ``{"r": i}``: decoding in the same order meets the full record first.
    """
    ext, ext_keep = _externals(machine.cfg)
    transients = _transients()
    scalars = _SCALARS
    classes: list[list[Any]] = []
    class_index: dict[tuple[type, tuple[str, ...]], int] = {}
    class_ok: dict[type, bool] = {}
    records: dict[int, dict[str, Any]] = {}  # id(obj) -> its record
    ids: dict[int, int] = {}
    containers: set[int] = set()
    keep: list[Any] = []  # every object met stays alive, so id()s stay unique

    def enc(x: Any) -> Any:
        t = type(x)
        if t in scalars:
            return x
        if t is float:
            if x != x or x in (float("inf"), float("-inf")):
                raise CodecError("a non-finite float")
            return x
        k = ext.get(id(x))
        if k is not None:
            return {"x": k}
        if t is list or t is dict or t is set or t is collections.deque:
            if id(x) in containers:
                raise CodecError(f"a {t.__name__} is shared by two objects")
            containers.add(id(x))
            keep.append(x)
            if t is list:
                return [v if type(v) in scalars else enc(v) for v in x]
            if t is dict:
                return {"d": [[k if type(k) in scalars else enc(k), v if type(v) in scalars else enc(v)]
                              for k, v in x.items()]}
            if t is set:
                return {"s": [enc(v) for v in _sorted_members(x)]}
            return {"q": [enc(v) for v in x], "m": x.maxlen}
        if t is tuple:
            return {"t": [v if type(v) in scalars else enc(v) for v in x]}
        if t is frozenset:
            return {"fs": [enc(v) for v in _sorted_members(x)]}
        rec = records.get(id(x))
        if rec is not None:
            i = ids.get(id(x))
            if i is None:
                i = ids[id(x)] = len(ids)
                rec["i"] = i
            return {"r": i}
        ok = class_ok.get(t)
        if ok is None:
            ok = class_ok[t] = _class_ok(t) and not isinstance(x, (list, dict, set, tuple))
        if not ok:
            raise CodecError(f"cannot keep a {t.__module__}.{t.__qualname__}")
        keep.append(x)
        d = vars(x)
        skip = transients.get(t)
        names = tuple(d) if skip is None else tuple(k for k in d if k not in skip)
        ci = class_index.get((t, names))
        if ci is None:
            ci = class_index[(t, names)] = len(classes)
            classes.append([t.__module__, t.__qualname__, list(names)])
        rec = {"o": ci}
        records[id(x)] = rec
        rec["f"] = [v if type(v) in scalars else enc(d[k]) for k in names for v in (d[k],)]
        return rec

    root = enc(machine)
    del keep, ext_keep
    return {"classes": classes, "root": root}


def decode(data: dict[str, Any], cfg: MachineConfig) -> Machine:
    """A Machine from :func:`encode` output, bound to the description ``cfg``."""
    ext_ids, ext_list = _externals(cfg)
    ext_objs = {ext_ids[id(obj)]: obj for obj in ext_list}
    transients = _transients()
    try:
        table = []
        for mod, qual, names in data["classes"]:
            if not isinstance(mod, str) or not mod.startswith(_ALLOWED_MODULES):
                raise CodecError(f"class {mod}.{qual} is not a memfs model class")
            cls = getattr(importlib.import_module(mod), qual, None)
            if not isinstance(cls, type) or cls.__module__ != mod or not _class_ok(cls):
                raise CodecError(f"no model class {mod}.{qual}")
            if not all(isinstance(n, str) for n in names):
                raise CodecError("bad field names")
            table.append((cls, list(names)))
        objs: dict[int, Any] = {}

        def dec(x: Any) -> Any:
            if x is None or isinstance(x, (bool, int, float, str)):
                return x
            if isinstance(x, list):
                return [dec(v) for v in x]
            if not isinstance(x, dict):
                raise CodecError(f"unexpected {type(x).__name__}")
            if "t" in x:
                return tuple(dec(v) for v in x["t"])
            if "d" in x:
                return {dec(k): dec(v) for k, v in x["d"]}
            if "s" in x:
                return {dec(v) for v in x["s"]}
            if "fs" in x:
                return frozenset(dec(v) for v in x["fs"])
            if "q" in x:
                return collections.deque((dec(v) for v in x["q"]), maxlen=x["m"])
            if "x" in x:
                return ext_objs[x["x"]]
            if "r" in x:
                return objs[x["r"]]
            cls, names = table[x["o"]]
            obj = cls.__new__(cls)
            if "i" in x:
                objs[x["i"]] = obj
            values = x["f"]
            if len(values) != len(names):
                raise CodecError(f"{cls.__qualname__}: {len(values)} values for {len(names)} fields")
            for name, v in zip(names, values):
                object.__setattr__(obj, name, dec(v))
            for name, make in transients.get(cls, {}).items():
                object.__setattr__(obj, name, make())
            return obj

        m = dec(data["root"])
    except CodecError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ImportError, RecursionError) as e:
        raise CodecError(f"malformed checkpoint: {type(e).__name__}: {e}") from None
    if type(m) is not Machine or m.cfg is not cfg:
        raise CodecError("the checkpoint is not a Machine of this description")
    return m


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def digest(machine: Machine) -> str:
    """SHA-256 of the machine's whole state (two machines in the same state, however
    they got there, have the same digest)."""
    with machine.lock:
        return hashlib.sha256(_canonical(encode(machine))).hexdigest()


def checkpoint_of(machine: Machine) -> dict[str, Any]:
    """:func:`encode`, verified: decoding it gives a machine that encodes the same and
    shows the same ``memfs status``. Raises CodecError otherwise."""
    with machine.lock:
        data = encode(machine)
        snap = snapshot(machine)
    text = _canonical(data)
    back = decode(json.loads(text), machine.cfg)
    if _canonical(encode(back)) != text:
        raise CodecError("the checkpoint does not decode to the same machine")
    if snapshot(back) != snap:
        raise CodecError("the checkpoint's machine shows a different status")
    return data


# ---------------------------------------------------------------------- journal records

def _outcome_text(outcome: Any) -> str:
    if outcome is None:
        return "success"
    if isinstance(outcome, int):
        return errno.errorcode.get(outcome, str(outcome))
    return f"{outcome.get('exception')} (a model bug)"


def _replay_one(machine: Machine, entry: list) -> bool:
    """Run one journal entry again; True if it gives the recorded outcome.

    Plain entries go through ``Machine.replay`` (which must report 0 mismatches);
    an entry that recorded a model bug (``{"exception": TYPE}``) must raise it again.
    """
    name, args, kw, recorded = entry
    if not isinstance(recorded, dict):
        return machine.replay([(name, args, kw, recorded)]) == 0
    fn = getattr(machine, name, None)
    if fn is None or getattr(fn, "__wrapped__", None) is None:
        raise ValueError(f"journal names an unknown operation {name!r}")
    try:
        fn(*args, **kw)
    except OSError:
        return False
    except Exception as e:  # noqa: BLE001 - the same bug again is the expected outcome
        return type(e).__name__ == recorded.get("exception")
    return False


# ---------------------------------------------------------------------- the file

def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails EEXIST instead of replacing ``dst``: renameat2(RENAME_NOREPLACE),
    or link(2) + unlink(2) where that is not supported (the open descriptor then shows the
    temporary name as deleted in /proc, which is only cosmetic)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    os.link(src, dst)
    os.unlink(src)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _compact_every() -> int:
    v = os.environ.get("MEMFS_STATE_COMPACT_EVERY")
    if v is None or v == "":
        return COMPACT_EVERY
    try:
        return max(0, int(v))
    except ValueError:
        log.warning("MEMFS_STATE_COMPACT_EVERY=%r is not a number; using %d", v, COMPACT_EVERY)
        return COMPACT_EVERY


def _fatal(message: str) -> None:  # pragma: no cover - exercised in integration tests
    log.critical("%s; stopping now so that nothing is acknowledged that could be lost "
                 "(memfs mount MNT --state FILE resumes from the last durable change)", message)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(EXIT_NOT_DURABLE)


@dataclasses.dataclass
class Parsed:
    header: dict[str, Any]
    hash: str
    entries: list[list]
    valid_len: int  # bytes up to the end of the last complete, verified line
    torn: int  # bytes after it (a torn final line)


def _salt(header_hash: str) -> int:
    return int(header_hash[:8], 16)


def _entry_line(seq: int, salt: int, record: list) -> bytes:
    body = f"{seq} ".encode() + _canonical(record)
    crc = zlib.crc32(body, salt)
    sp = body.index(b" ")
    return body[:sp] + f" {crc:08x}".encode() + body[sp:] + b"\n"


def _header_lines(description: dict, ops: int, checkpoint: dict | None) -> tuple[bytes, str]:
    header = _canonical({"description": description, "ops": ops, "checkpoint": checkpoint,
                         "written": int(time.time())})
    h = hashlib.sha256(header).hexdigest()
    return f"{MAGIC} {FORMAT} {h}\n".encode() + header + b"\n", h


def parse(data: bytes, path: str = "state file") -> Parsed:
    """Verify and split a state file; raises StateError on anything but a torn tail."""
    if not data.startswith(MAGIC.encode() + b" "):
        what = "empty" if not data else "not a memfs state file"
        raise StateError(f"{path} is {what} (it does not start with {MAGIC!r}); memfs never "
                         f"overwrites a file it did not write: give another --state path, or "
                         f"remove this one if it is yours")
    nl1 = data.find(b"\n")
    first = data[:nl1 if nl1 >= 0 else len(data)].decode("ascii", "replace").split(" ")
    if len(first) != 3 or not first[1].isdigit():
        raise StateError(f"{path} is corrupt: its first line is not \"{MAGIC} VERSION HASH\"")
    version = int(first[1])
    if version != FORMAT:
        raise StateError(f"{path} has state format {version}; this memfs reads format {FORMAT} "
                         f"(it was written by {'a newer' if version > FORMAT else 'an older'} memfs)")
    nl2 = data.find(b"\n", nl1 + 1) if nl1 >= 0 else -1
    if nl2 < 0:
        raise StateError(f"{path} is corrupt: its header is incomplete")
    header_bytes = data[nl1 + 1:nl2]
    h = first[2]
    if hashlib.sha256(header_bytes).hexdigest() != h:
        raise StateError(f"{path} is corrupt: its header does not match its checksum")
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict) or not isinstance(header.get("description"), dict) \
                or not isinstance(header.get("ops"), int) or header["ops"] < 0:
            raise ValueError("missing fields")
    except ValueError as e:
        raise StateError(f"{path} is corrupt: bad header ({e})") from None
    salt = _salt(h)
    entries: list[list] = []
    pos = nl2 + 1
    seq = header["ops"]
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # torn final line: never acknowledged
        line = data[pos:nl]
        seq += 1
        try:
            s, crc, rec = line.split(b" ", 2)
            ok = int(s) == seq and int(crc, 16) == zlib.crc32(s + b" " + rec, salt)
        except ValueError:
            ok = False
        if not ok:
            raise StateError(f"{path} is corrupt: journal line {seq - header['ops']} (operation "
                             f"{seq}, byte {pos}) does not verify")
        try:
            record = json.loads(rec)
            if not (isinstance(record, list) and len(record) == 4 and isinstance(record[0], str)
                    and isinstance(record[1], list) and isinstance(record[2], dict)
                    and (record[3] is None or (isinstance(record[3], int) and not isinstance(record[3], bool))
                         or (isinstance(record[3], dict) and isinstance(record[3].get("exception"), str)))):
                raise ValueError("not [name, args, kwargs, outcome]")
        except (ValueError, RecursionError) as e:
            raise StateError(f"{path} is corrupt: journal line {seq - header['ops']}: {e}") from None
        entries.append(record)
        pos = nl + 1
    return Parsed(header, h, entries, pos, len(data) - pos)


class StateFile:
    """An open state file attached to a Machine: ``StateFile.open(path, cfg)``."""

    def __init__(self, path: str, fd: int, header_hash: str, ops: int, journal_len: int,
                 machine: Machine, on_fatal: Callable[[str], None] = _fatal) -> None:
        self.path = path
        self.fd = fd
        self.hash = header_hash
        self.salt = _salt(header_hash)
        self.ops = ops  # operations in the file: checkpoint + journal
        self.journal_len = journal_len  # journal lines after the checkpoint
        self.machine = machine
        self.description = describe(machine.cfg)
        self.on_fatal = on_fatal
        self.compact_every = _compact_every()
        self.checkpoints_ok = True
        self.closed = False
        self.compactions = 0
        self._tail: list[list] | None = None  # records journaled while a compaction runs
        self._bg: object | None = None  # token of the compaction running in the background
        self.restored = {"ops": ops, "journal": journal_len, "torn_bytes": 0, "created": False,
                         "seconds": 0.0}

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, path: str, cfg: MachineConfig, on_fatal: Callable[[str], None] = _fatal) -> "StateFile":
        """Restore the machine saved in ``path`` (or create the file), attach the journal."""
        path = os.path.abspath(path)
        t0 = time.monotonic()
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            except FileNotFoundError:
                created = cls._create(path, cfg)
                if created is None:
                    continue  # someone else created it meanwhile: open theirs
                fd, h = created
                machine = Machine(cfg)
                sf = cls(path, fd, h, 0, 0, machine, on_fatal)
                sf.restored.update(created=True, seconds=time.monotonic() - t0)
                machine.journal = sf.append
                log.info("state file %s created", path)
                return sf
            except IsADirectoryError:
                raise StateError(f"{path} is a directory; --state names a file") from None
            except OSError as e:
                raise StateError(f"cannot open the state file {path}: {e.strerror}") from None
            break
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"the state file {path} is in use by another memfs daemon; "
                                 f"one state file serves one mount") from None
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000 == 0o100000):
                raise StateError(f"{path} is not a regular file")
            data = b""
            while True:
                chunk = os.pread(fd, 1 << 20, len(data))
                if not chunk:
                    break
                data += chunk
            p = parse(data, path)
            mine = describe(cfg)
            if p.header["description"] != mine:
                diff = description_diff(p.header["description"], mine)
                raise DescriptionMismatch(
                    f"the state file {path} was made for another machine description ("
                    + "; ".join(diff) + "); mount with the description it was made with, or "
                    "give another --state file to start this machine afresh")
            machine = cls._restore(p, cfg, path)
            if p.torn:
                log.warning("state file %s: dropping a torn final line (%d bytes, never acknowledged)",
                            path, p.torn)
                os.ftruncate(fd, p.valid_len)
                os.fsync(fd)
            sf = cls(path, fd, p.hash, p.header["ops"] + len(p.entries), len(p.entries), machine, on_fatal)
            sf.restored.update(torn_bytes=p.torn, seconds=time.monotonic() - t0)
            sf._cleanup_temps()
            machine.journal = sf.append
            if sf.compact_every and sf.journal_len >= sf.compact_every:
                sf.compact()
            log.info("state file %s: restored %d operations (%d replayed from the journal) in %.2f s",
                     path, sf.ops, len(p.entries), sf.restored["seconds"])
            return sf
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _restore(p: Parsed, cfg: MachineConfig, path: str) -> Machine:
        if p.header.get("checkpoint") is not None:
            try:
                machine = decode(p.header["checkpoint"], cfg)
            except CodecError as e:
                raise StateError(f"{path}: its checkpoint cannot be loaded ({e}); it was written by "
                                 f"a memfs with a different model") from None
        else:
            machine = Machine(cfg)
        base = p.header["ops"]
        for i, entry in enumerate(p.entries):
            try:
                same = _replay_one(machine, entry)
            except Exception as e:  # noqa: BLE001 - any failure means the file does not replay
                raise StateError(f"{path}: operation {base + i + 1} of the journal ({entry[0]}) does "
                                 f"not replay: {type(e).__name__}: {e}; refusing the file") from None
            if not same:
                raise StateError(
                    f"{path}: replaying the journal gives a different outcome for operation "
                    f"{base + i + 1} ({entry[0]} {json.dumps(entry[1])[:200]}: recorded "
                    f"{_outcome_text(entry[3])}, the replay something else); the file was written by a memfs whose "
                    f"model behaves differently, or was edited; refusing it")
        return machine

    @staticmethod
    def _temp_name(path: str) -> str:
        d, base = os.path.split(path)
        return os.path.join(d, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")

    @classmethod
    def _write_new(cls, path: str, content: bytes) -> tuple[int, str]:
        """Write ``content`` to a fresh, fsynced, locked temporary file next to ``path``."""
        tmp = cls._temp_name(path)
        fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, content)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp

    @classmethod
    def _create(cls, path: str, cfg: MachineConfig) -> tuple[int, str] | None:
        content, h = _header_lines(describe(cfg), 0, None)
        try:
            fd, tmp = cls._write_new(path, content)
        except OSError as e:
            raise StateError(f"cannot create the state file {path}: {e.strerror}") from None
        try:
            try:
                _rename_noreplace(tmp, path)  # never replaces a file that appeared meanwhile
            except FileExistsError:
                os.close(fd)
                return None
            _fsync_dir(path)
        except OSError as e:
            os.close(fd)
            raise StateError(f"cannot create the state file {path}: {e.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return fd, h

    def _cleanup_temps(self) -> None:
        d, base = os.path.split(self.path)
        prefix = f".{base}.tmp-"
        try:
            names = os.listdir(d)
        except OSError:
            return
        for n in names:
            if n.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(d, n))
                    log.info("removed %s (left by a compaction that did not finish)", n)

    # -- the journal callback -------------------------------------------------

    def append(self, name: str, args: tuple, kw: dict, outcome: int | BaseException | None) -> None:
        """``Machine.journal``: make one operation durable before its caller is answered."""
        if self.closed:
            raise OSError(errno.ESHUTDOWN, "memfs is shutting down; the change was not saved")
        recorded = {"exception": type(outcome).__name__} if isinstance(outcome, BaseException) else outcome
        record = [name, list(args), dict(kw), recorded]
        try:
            line = _entry_line(self.ops + 1, self.salt, record)
        except (TypeError, ValueError) as e:
            self.on_fatal(f"cannot record {name}{args!r} in the state file: {e}")
            raise OSError(errno.EIO, "the change could not be saved") from None
        try:
            _write_all(self.fd, line)
            os.fdatasync(self.fd)
        except OSError as e:
            self.on_fatal(f"cannot save {name} to the state file {self.path}: {e.strerror or e}")
            raise OSError(errno.EIO, "the change could not be saved") from None
        self.ops += 1
        self.journal_len += 1
        if self._tail is not None:
            self._tail.append(record)
        elif self.compact_every and self.journal_len >= self.compact_every and self.checkpoints_ok:
            self._compact_in_background()

    # -- compaction ----------------------------------------------------------

    def compact(self) -> bool:
        """Replace the file by a checkpoint and an empty journal, now (the caller waits).
        False if not possible: the journal then simply keeps growing."""
        m = self.machine
        with m.lock:
            if self.closed or not self.checkpoints_ok:
                return False
            t0 = time.monotonic()
            self._bg = self._tail = None  # a compaction still running in the background is void
            taken = self._take_checkpoint()
            if taken is None:
                return False
            staged = self._stage(*taken)
            return staged is not None and self._install(staged, t0)

    def _compact_in_background(self) -> None:
        """Take the checkpoint now (under the lock, the caller holds it); verify and write
        it in a thread; then, under the lock again, add the operations journaled
        meanwhile and rename it into place. Only encoding the graph stalls the machine."""
        if self._bg is not None or not self.checkpoints_ok:
            return
        t0 = time.monotonic()
        taken = self._take_checkpoint()
        if taken is None:
            return
        token = self._bg = object()
        self._tail = []

        def finish() -> None:
            staged = self._stage(*taken)
            with self.machine.lock:
                if staged is None or self.closed or self._bg is not token:
                    if self._bg is token:
                        self._bg = self._tail = None
                    if staged is not None:
                        self._discard(staged)
                    return
                self._install(staged, t0)

        threading.Thread(target=finish, name="memfs-state-compact", daemon=True).start()

    def _take_checkpoint(self) -> tuple[dict, dict, int] | None:
        """(encoded graph, status snapshot, operations it contains); under the lock."""
        try:
            return encode(self.machine), snapshot(self.machine), self.ops
        except (CodecError, RecursionError) as e:
            self.checkpoints_ok = False
            log.error("state file %s: no checkpoint possible (%s); the journal keeps every "
                      "operation instead", self.path, e)
            return None

    def _stage(self, data: dict, snap: dict, ops: int) -> tuple[int, str, str, int, int] | None:
        """Verify a checkpoint and write it to a fsynced, locked temporary file:
        (fd, temp path, header hash, operations, bytes), or None."""
        try:
            text = _canonical(data)
            back = decode(json.loads(text), self.machine.cfg)
            if _canonical(encode(back)) != text:
                raise CodecError("the checkpoint does not decode to the same machine")
            if snapshot(back) != snap:
                raise CodecError("the checkpoint's machine shows a different status")
        except (CodecError, RecursionError, ValueError) as e:
            self.checkpoints_ok = False
            log.error("state file %s: no checkpoint possible (%s); the journal keeps every "
                      "operation instead", self.path, e)
            return None
        content, h = _header_lines(self.description, ops, data)
        try:
            fd, tmp = self._write_new(self.path, content)
        except OSError as e:
            log.error("state file %s: compaction failed (%s); the journal keeps growing",
                      self.path, e.strerror or e)
            return None
        return fd, tmp, h, ops, len(content)

    def _discard(self, staged: tuple[int, str, str, int, int]) -> None:
        os.close(staged[0])
        with contextlib.suppress(OSError):
            os.unlink(staged[1])

    def _install(self, staged: tuple[int, str, str, int, int], t0: float) -> bool:
        """Under the lock: append the operations journaled since the checkpoint was taken,
        fsync, rename over the file, fsync the directory, switch to the new file."""
        fd, tmp, h, ops, size = staged
        tail, self._tail, self._bg = self._tail or [], None, None
        if ops + len(tail) != self.ops:  # cannot happen: every append goes to the tail
            self._discard(staged)
            log.error("state file %s: compaction abandoned (%d + %d operations, %d journaled)",
                      self.path, ops, len(tail), self.ops)
            return False
        salt = _salt(h)
        try:
            if tail:
                _write_all(fd, b"".join(_entry_line(ops + 1 + i, salt, rec) for i, rec in enumerate(tail)))
                os.fsync(fd)
            os.rename(tmp, self.path)
        except OSError as e:
            self._discard(staged)
            log.error("state file %s: compaction failed (%s); the journal keeps growing",
                      self.path, e.strerror or e)
            return False
        try:
            _fsync_dir(self.path)
        except OSError as e:  # the renamed file might not survive a power loss: stop
            self.on_fatal(f"cannot fsync the directory of {self.path}: {e.strerror or e}")
            raise
        old, self.fd = self.fd, fd
        os.close(old)
        self.hash, self.salt = h, salt
        n, self.journal_len = self.journal_len, len(tail)
        self.compactions += 1
        log.info("state file %s: checkpoint of %d operations written (%d bytes, %.2f s); the journal "
                 "went from %d to %d entries", self.path, ops, size, time.monotonic() - t0, n, len(tail))
        return True

    def info(self) -> dict[str, Any]:
        return {"file": self.path, "format": FORMAT, "ops": self.ops, "journal": self.journal_len,
                "compact_every": self.compact_every, "checkpoints": self.checkpoints_ok,
                "compactions": self.compactions, "restored": dict(self.restored)}

    def close(self, compact: bool = True) -> None:
        """Stop journaling (later changes fail ESHUTDOWN, unsaved); compact first if asked."""
        m = self.machine
        with m.lock:
            if self.closed:
                return
            if compact and self.journal_len:
                self.compact()
            self.closed = True
            os.close(self.fd)


def read_journal(path: str) -> tuple[dict[str, Any], list[list]]:
    """(header, journal entries) of a state file, verified (for tests and tools)."""
    with open(path, "rb") as f:
        p = parse(f.read(), path)
    return p.header, p.entries


def load_machine(path: str, cfg: MachineConfig) -> Machine:
    """The machine a state file holds, restored without taking it over (read-only)."""
    with open(path, "rb") as f:
        p = parse(f.read(), path)
    if p.header["description"] != describe(cfg):
        raise DescriptionMismatch(f"{path} was made for another machine description: "
                                  + "; ".join(description_diff(p.header["description"], describe(cfg))))
    return StateFile._restore(p, cfg, path)


def replay_fresh(entries: Iterable[list], cfg: MachineConfig) -> tuple[Machine, int]:
    """A fresh Machine of ``cfg`` with ``entries`` replayed; (machine, mismatches)."""
    m = Machine(cfg)
    return m, m.replay([tuple(e) for e in entries])
