"""uevents in kernel order (lib/kobject_uevent.c): ACTION, DEVPATH, SUBSYSTEM, extras, SEQNUM.

The model records; layers above deliver (netlink, udevd, uevent helper, `memfs monitor`).
Listeners are called synchronously under the hotplug lock, in SEQNUM order, so they must
only queue the event.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")


@dataclass(frozen=True)
class Uevent:
    action: str
    devpath: str
    subsystem: str
    seqnum: int
    extra: tuple[tuple[str, str], ...] = ()

    def env(self) -> list[tuple[str, str]]:
        """The properties in the order the kernel puts them in the buffer."""
        return [("ACTION", self.action), ("DEVPATH", self.devpath), ("SUBSYSTEM", self.subsystem),
                *self.extra, ("SEQNUM", str(self.seqnum))]

    def netlink_bytes(self) -> bytes:
        """The kernel's NETLINK_KOBJECT_UEVENT datagram: "action@devpath\\0KEY=VALUE\\0..."."""
        head = f"{self.action}@{self.devpath}"
        return b"\0".join([head.encode(), *(f"{k}={v}".encode() for k, v in self.env())]) + b"\0"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.env()}


@dataclass
class EventLog:
    seqnum: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=100_000))
    _listeners: list[Callable[[Uevent], None]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def emit(self, action: str, devpath: str, subsystem: str = "memory",
             extra: tuple[tuple[str, str], ...] = ()) -> Uevent:
        with self._cond:
            self.seqnum += 1
            ev = Uevent(action, devpath, subsystem, self.seqnum, extra)
            self.history.append(ev)
            self._cond.notify_all()
        for fn in list(self._listeners):
            fn(ev)
        return ev

    def subscribe(self, fn: Callable[[Uevent], None]) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn)

    def since(self, seqnum: int) -> list[Uevent]:
        """Events with SEQNUM > seqnum still held in the history."""
        with self._cond:
            out = []
            for e in reversed(self.history):  # O(events returned), not O(history)
                if e.seqnum <= seqnum:
                    break
                out.append(e)
            out.reverse()
            return out

    def wait_after(self, seqnum: int, timeout: float) -> list[Uevent]:
        with self._cond:
            self._cond.wait_for(lambda: self.seqnum > seqnum, timeout)
        return self.since(seqnum)
