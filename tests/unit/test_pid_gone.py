"""memfs.cli.pid_gone(): a zombie leader whose other threads still run is not gone yet.

When a multi-threaded daemon dies, its leader thread can turn zombie before the others
have exited; until the last one has, the descriptor table (the mount's flock, /dev/fuse)
is still open, and a new mount at the same place would find the lock taken. The child
below makes that state on purpose: its main thread calls pthread_exit() while a second
thread waits on a pipe.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from memfs.cli import pid_gone

CHILD = r"""
import ctypes, os, sys, threading
r = int(sys.argv[1])
threading.Thread(target=lambda: os.read(r, 1)).start()
os.write(1, b"ready\n")
ctypes.CDLL(None).pthread_exit(None)
"""


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def leader_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_zombie_leader_with_a_live_thread_is_not_gone():
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(r)], pass_fds=(r,), stdout=subprocess.PIPE)
    os.close(r)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        assert wait_for(lambda: leader_state(p.pid) == "Z")  # the leader has exited...
        assert not pid_gone(p.pid)  # ...but its thread still holds the process's files
        os.close(w)
        w = -1
        assert wait_for(lambda: pid_gone(p.pid))
        assert p.wait(10) == 0
    finally:
        if w >= 0:
            os.close(w)
        if p.poll() is None:
            p.kill()
            p.wait(10)
