"""`memfs events MNT | head`: a reader that goes away ends the command quietly (exit 141,
as a command killed by SIGPIPE), never with a traceback."""
from __future__ import annotations

import signal
import subprocess
import sys

# The daemon's reply is faked (no mount needed): 100,000 events, far more than a pipe holds.
SCRIPT = """
import sys
from memfs import cli
events = [{"seqnum": i, "action": "add", "devpath": f"/devices/system/memory/memory{i}",
           "subsystem": "memory", "env": {}} for i in range(100_000)]
cli._call = lambda a, op, timeout=None, **f: {"seqnum": len(events), "events": events}
sys.exit(cli.main(sys.argv[1:]))
"""


def run_into_head(*args: str) -> tuple[int, str, bytes]:
    writer = subprocess.Popen([sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert writer.stdout is not None and writer.stderr is not None
    head = writer.stdout.readline()  # like `head -1`: one line, then the pipe is closed
    writer.stdout.close()
    err = writer.stderr.read().decode()
    return writer.wait(timeout=60), err, head


def test_events_into_a_closed_pipe_exits_quietly() -> None:
    code, err, head = run_into_head("events", "/nonexistent-mnt")
    assert head.split()[:2] == [b"0", b"add"]
    assert code == 128 + signal.SIGPIPE, err
    assert err == ""


def test_events_json_into_a_closed_pipe_exits_quietly() -> None:
    code, err, head = run_into_head("events", "--json", "/nonexistent-mnt")
    assert head == b"{\n"
    assert code == 128 + signal.SIGPIPE, err
    assert err == ""
