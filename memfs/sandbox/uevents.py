"""uevent delivery into the sandbox: the forwarder (as kernel uevents) and the uevent helper.

Both are :class:`EventWorker`: one thread per consumer takes a Machine's events, in
SEQNUM order, from a queue filled under the hotplug lock (where nothing may block).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..machine.events import EventLog, Uevent
from .core import Sandbox

log = logging.getLogger("memfs.sandbox")

# include/uapi/linux/netlink.h
NLMSG_MIN_TYPE = 0x10
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2

#: ``python -c HELPER_ENTRY PROG TIMEOUT`` runs in the sandbox for the uevent helper
HELPER_ENTRY = "import sys; from memfs.sandbox.uevents import helper_runner; sys.exit(helper_runner())"


def uevent_payload(ev: Uevent) -> bytes:
    """What the forwarder hands the kernel: ``netlink_bytes()`` with memfs's SEQNUM renamed
    MEMFS_SEQNUM (the kernel appends its own SEQNUM)."""
    head = f"{ev.action}@{ev.devpath}"
    parts = [head] + [f"{k}={v}" for k, v in ev.env() if k != "SEQNUM"] + [f"MEMFS_SEQNUM={ev.seqnum}"]
    return b"\0".join(p.encode() for p in parts) + b"\0"


class EventWorker:
    """Handle each event of ``events`` once, in order, from one thread of its own.
    Subclasses implement :meth:`handle`, and call ``super().__init__`` last (events
    arrive from then on)."""

    def __init__(self, events: EventLog, name: str) -> None:
        self.events = events
        self.q: queue.Queue[tuple[Uevent, float] | None] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._unsubscribe = events.subscribe(self._enqueue)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _enqueue(self, ev: Uevent) -> None:   # called under the hotplug lock: only queue
        with self._idle:
            self._pending += 1
        self.q.put((ev, time.monotonic()))

    def handle(self, ev: Uevent, emitted: float) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            try:
                self.handle(*item)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event emitted so far has been handled."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop_worker(self, timeout: float) -> None:
        """No more events; the thread ends after the queued ones."""
        self._unsubscribe()
        self.q.put(None)
        self._thread.join(timeout)


@dataclass
class ForwarderStats:
    sent: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)   # emit -> kernel ack, seconds
    last_error: str | None = None


class UeventForwarder(EventWorker):
    """Deliver a Machine's uevents, in SEQNUM order, as kernel uevents of the sandbox."""

    def __init__(self, sandbox: Sandbox, events: EventLog, *, ack_timeout: float = 2.0) -> None:
        self.sandbox = sandbox
        self.ack_timeout = ack_timeout
        self.stats = ForwarderStats()
        self.sock = sandbox.uevent_socket()
        self.sock.bind((0, 0))
        self.sock.settimeout(ack_timeout)
        self._seq = 0
        super().__init__(events, "memfs-uevent-forwarder")

    def send(self, ev: Uevent) -> None:
        payload = uevent_payload(ev)
        self._seq += 1
        hdr = struct.pack("=IHHII", 16 + len(payload), NLMSG_MIN_TYPE, NLM_F_REQUEST | NLM_F_ACK, self._seq, 0)
        self.sock.sendto(hdr + payload, (0, 0))
        while True:
            data = self.sock.recv(4096)
            if len(data) >= 20:
                _, typ, _, seq, _, err = struct.unpack("=IHHIIi", data[:20])
                if typ == NLMSG_ERROR and seq == self._seq:
                    if err:
                        raise OSError(-err, f"kernel refused the uevent: {os.strerror(-err)}")
                    return

    def handle(self, ev: Uevent, emitted: float) -> None:
        try:
            self.send(ev)
            self.stats.sent += 1
            self.stats.latencies.append(time.monotonic() - emitted)
            if len(self.stats.latencies) > 10000:
                del self.stats.latencies[:5000]
        except (OSError, socket.timeout) as e:
            self.stats.failed += 1
            self.stats.last_error = f"{ev.action}@{ev.devpath}: {e}"
            log.warning("uevent %s@%s not delivered: %s", ev.action, ev.devpath, e)

    def close(self) -> None:
        self.stop_worker(5)
        self.sock.close()


class UeventHelper(EventWorker):
    """Like the kernel's uevent_helper: run ``prog SUBSYSTEM`` once per event, in order,
    inside the sandbox, with HOME, PATH and the event's properties as its environment.
    Unlike the kernel (which does not wait), each run finishes before the next starts."""

    def __init__(self, sandbox: Sandbox, events: EventLog, prog: str, *, timeout: float = 30.0) -> None:
        self.prog = prog
        self.timeout = timeout
        self.failures: list[str] = []
        self.proc = sandbox.popen([sys.executable, "-c", HELPER_ENTRY, prog, str(timeout)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        super().__init__(events, "memfs-uevent-helper")

    def handle(self, ev: Uevent, emitted: float) -> None:
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(ev.env()) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise OSError(errno.EPIPE, "the uevent helper runner exited")
            if reply.strip() != "0":
                self.failures.append(f"{ev.action}@{ev.devpath}: {reply.strip()}")
        except OSError as e:
            self.failures.append(f"{ev.action}@{ev.devpath}: {e}")
            log.warning("uevent helper: %s", e)

    def flush(self, timeout: float = 30.0) -> bool:
        return super().flush(timeout)

    def close(self) -> None:
        self.stop_worker(self.timeout + 5)
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def helper_runner() -> int:
    """Inside the sandbox: read one event (a JSON list of [key, value]) per line and run
    the helper for it; answer its exit status (or an error) on one line."""
    prog, timeout = sys.argv[1], float(sys.argv[2])
    for line in sys.stdin:
        env = {"HOME": "/", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}
        pairs = json.loads(line)
        env.update({k: v for k, v in pairs})
        try:
            r = subprocess.run([prog, env.get("SUBSYSTEM", "")], env=env, stdin=subprocess.DEVNULL,
                               timeout=timeout, cwd="/")
            answer = str(r.returncode)
        except subprocess.TimeoutExpired:
            answer = f"timed out after {timeout}s"
        except OSError as e:
            answer = f"cannot run {prog}: {e.strerror}"
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    return 0
