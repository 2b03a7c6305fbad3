"""memfs.persist without FUSE: the checkpoint codec, the state file's life cycle, and
every way a state file can be refused (corrupt, foreign, other description, does not
replay, in use), a torn final line, and fail-stop when a change cannot be saved."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memfs import persist
from memfs.machine.config import load_config
from memfs.machine.hotplug import Machine
from memfs.persist import DescriptionMismatch, StateError, StateFile
from memfs.status import snapshot

CONFIGS = [
    dict(),
    dict(kernel="6.8", overrides={"boot.memhp_default_state": "online_movable"}),
    dict(kernel="5.15", overrides={"boot.online_policy": "auto-movable"}),
    dict(kernel="6.12", overrides={"arch": "arm64-4k", "acpi_memory_hotplug": True, "boot.memmap_on_memory": "force", "node": [
        {"id": 0, "ram": ["0x40000000-0x80000000"], "reserved": "64M", "used": "32M"},
        {"id": 1, "ram": ["0x80000000-0xc0000000"], "used": "16M"}]}),
]


def cfg_of(i: int = 0):
    return load_config(None, **CONFIGS[i])


def random_ops(m: Machine, n: int, seed: int) -> int:
    """Up to n random user-visible operations (every journaled kind); returns how many
    were called (an unplug without devices, a free without allocations are skipped)."""
    rng = random.Random(seed)
    calls = 0
    for _ in range(n):
        bids = sorted(m.blocks)
        r = rng.random()
        calls += 1
        try:
            if r < 0.25:
                m.state_store(rng.choice(bids), rng.randrange(4))
            elif r < 0.45:
                m.online_store(rng.choice(bids), rng.random() < 0.5)
            elif r < 0.55:
                m.plug(rng.choice([1, 2, 8]) * m.block_size, node=0,
                       driver=rng.choice(["acpi", "virtio_mem", "dax_kmem", "probe"]))
            elif r < 0.62:
                if not m.devices:
                    calls -= 1
                    continue
                m.unplug(rng.choice(sorted(m.devices)))
            elif r < 0.72:
                m.alloc(rng.choice(["movable", "unmovable"]), rng.randrange(1, 64 << 20),
                        rng.choice([None, 0]))
            elif r < 0.78:
                ids = [a for a, x in m.allocator.allocs.items() if x.label == "user"]
                if not ids:
                    calls -= 1
                    continue
                m.free(rng.choice(ids))
            elif r < 0.82:
                m.memory_failure(rng.choice(bids) * m.block_size + rng.randrange(m.block_size), rng.random() < 0.5)
            elif r < 0.86:
                m.synth_uevent(rng.choice(bids), rng.choice(["change", "add", "online"]),
                               (("SYNTH_UUID", "0"),))
            elif r < 0.90:
                m.set_auto_online_blocks(rng.choice(["offline", "online", "online_kernel", "online_movable"]))
            elif r < 0.95 and m.profile.online_policy:
                name = rng.choice(["online_policy", "auto_movable_ratio", "auto_movable_numa_aware"])
                value = {"online_policy": rng.choice(["contig-zones", "auto-movable"]),
                         "auto_movable_ratio": rng.randrange(0, 1000),
                         "auto_movable_numa_aware": rng.random() < 0.5}[name]
                m.set_param(name, value)
            else:
                m.state_store(rng.randrange(0, 400), 1)  # mostly ENODEV
        except OSError:
            pass
    return calls


# ---------------------------------------------------------------------- the codec

@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_checkpoint_round_trip_is_exact_and_stays_exact(ci):
    cfg = cfg_of(ci)
    m = Machine(cfg)
    random_ops(m, 600, seed=ci)
    data = persist.checkpoint_of(m)
    back = persist.decode(json.loads(json.dumps(data)), cfg)
    assert persist.digest(back) == persist.digest(m)
    assert snapshot(back) == snapshot(m)
    assert back.events.seqnum == m.events.seqnum and list(back.events.history) == list(m.events.history)
    assert back.cfg is cfg and back.profile is cfg.profile
    # shared objects stay shared (one Zone object, seen by blocks and nodes)
    for mem in back.blocks.values():
        if mem.zone is not None:
            assert any(mem.zone is z for z in back.nodes[mem.nid].zones)
    assert back.allocator.m is back
    # both go on identically
    random_ops(m, 300, seed=100 + ci)
    random_ops(back, 300, seed=100 + ci)
    assert persist.digest(back) == persist.digest(m)


def test_digest_sees_hidden_state():
    """online_type (set by a failing `state` write, the stale-online_type quirk) is not in
    `memfs status`, but it is state: the digest differs."""
    a, b = Machine(cfg_of()), Machine(cfg_of())
    a.state_store(32, 1)
    b.state_store(32, 1)
    assert persist.digest(a) == persist.digest(b)
    with pytest.raises(OSError):
        a.state_store(32, 3)  # EINVAL: already online, but online_type is now online_movable
    assert snapshot(a)["blocks"] == snapshot(b)["blocks"]
    assert persist.digest(a) != persist.digest(b)


def test_codec_refuses_what_it_cannot_keep():
    m = Machine(cfg_of())
    m.extra_callback = lambda: None
    with pytest.raises(persist.CodecError, match="function"):
        persist.encode(m)
    del m.extra_callback
    m.blocks[32].allocs = m.blocks[33].allocs  # two objects sharing one dict
    with pytest.raises(persist.CodecError, match="shared"):
        persist.encode(m)


def test_decode_refuses_foreign_classes():
    m = Machine(cfg_of())
    data = persist.encode(m)
    data["classes"][0][:2] = ["os", "system"]
    with pytest.raises(persist.CodecError, match="not a memfs model class"):
        persist.decode(data, m.cfg)
    data = persist.encode(m)
    data["classes"][0][:2] = ["memfs.machine.hotplug", "threading"]
    with pytest.raises(persist.CodecError):
        persist.decode(data, m.cfg)


def test_describe_is_complete_and_exact():
    a = persist.describe(cfg_of())
    assert a == persist.describe(cfg_of())
    assert a["block_size"] == 128 << 20  # "auto" resolved
    b = persist.describe(load_config(None, overrides={"hotplug.slots": 4}))
    assert any(d.startswith("slots:") for d in persist.description_diff(a, b))


# ---------------------------------------------------------------------- the file

@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "machine.state")


def reopen(path: str, cfg=None, **kw) -> StateFile:
    return StateFile.open(path, cfg or cfg_of(), on_fatal=kw.pop("on_fatal", pytest.fail), **kw)


def test_new_file_then_restore_exactly(path):
    sf = reopen(path)
    assert sf.restored["created"] and os.stat(path).st_mode & 0o777 == 0o600
    m = sf.machine
    calls = random_ops(m, 300, seed=1)
    want = persist.digest(m)
    ops = sf.ops
    assert ops == calls  # every operation is journaled, failed ones too
    sf.close(compact=False)
    header, entries = persist.read_journal(path)
    assert header["checkpoint"] is None and len(entries) == ops
    sf = reopen(path)
    assert persist.digest(sf.machine) == want and sf.ops == ops
    assert sf.restored["journal"] == ops
    # and the fresh-model replay of the journal gives the same machine
    fresh, mismatches = persist.replay_fresh(entries, cfg_of())
    assert mismatches == 0 and persist.digest(fresh) == want
    sf.close()  # compacts: checkpoint, empty journal
    header, entries = persist.read_journal(path)
    assert header["ops"] == ops and header["checkpoint"] is not None and entries == []
    sf = reopen(path)
    assert persist.digest(sf.machine) == want and sf.restored["journal"] == 0
    sf.close()
    assert [n for n in os.listdir(os.path.dirname(path)) if n != "machine.state"] == []


def test_every_change_is_on_disk_before_the_call_returns(path):
    sf = reopen(path)
    m = sf.machine
    for i, (call, args) in enumerate([(m.state_store, (32, 1)), (m.plug, (1 << 30,)), (m.alloc, ("movable", 4096)),
                                      (m.set_auto_online_blocks, ("online",))]):
        call(*args)
        # another process reading the file now (the daemon could be SIGKILLed now) sees it
        assert persist.load_machine(path, cfg_of()) is not None
        assert len(persist.read_journal(path)[1]) == i + 1
        assert persist.digest(persist.load_machine(path, cfg_of())) == persist.digest(m)
    sf.close(compact=False)


def test_failed_operations_are_journaled_with_their_errno(path):
    sf = reopen(path)
    with pytest.raises(OSError):
        sf.machine.state_store(32, 0)  # EINVAL: already offline
    with pytest.raises(OSError):
        sf.machine.unplug("nope")
    sf.close(compact=False)
    _, entries = persist.read_journal(path)
    assert entries == [["state_store", [32, 0], {}, errno.EINVAL], ["unplug", ["nope"], {}, errno.ENOENT]]


def test_a_model_bug_is_journaled_and_replayed_as_such(path, monkeypatch):
    sf = reopen(path)
    m = sf.machine
    m.state_store(32, 1)
    real = Machine.device_offline

    def buggy(self, mem):
        mem.online_type = 3  # a partial change, then a crash of the model
        raise KeyError("bug")
    monkeypatch.setattr(Machine, "device_offline", buggy)
    with pytest.raises(KeyError):
        m.online_store(33, False)
    want = persist.digest(m)
    sf.close(compact=False)
    assert persist.read_journal(path)[1][-1] == ["online_store", [33, False], {}, {"exception": "KeyError"}]
    assert persist.digest(persist.load_machine(path, cfg_of())) == want  # the bug replays too
    monkeypatch.setattr(Machine, "device_offline", real)
    with pytest.raises(StateError, match="different outcome for operation 2"):
        persist.load_machine(path, cfg_of())  # fixed model: the recorded crash does not happen


@pytest.mark.parametrize("tail", [b"7 0000", b"\0\0\0\0\0\0\0\0\0", b"3 deadbeef [\"state_store\", [3"])
def test_torn_final_line_is_dropped_and_cut(path, tail):
    sf = reopen(path)
    sf.machine.state_store(32, 1)
    want = persist.digest(sf.machine)
    sf.close(compact=False)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(tail)
    sf = reopen(path)
    assert persist.digest(sf.machine) == want and sf.restored["torn_bytes"] == len(tail)
    assert os.path.getsize(path) == size  # cut before anything is appended
    sf.machine.state_store(33, 1)
    sf.close(compact=False)
    assert len(persist.read_journal(path)[1]) == 2


def test_cut_anywhere_in_the_last_line_loses_only_that_line(path):
    sf = reopen(path)
    sf.machine.state_store(32, 1)
    before = persist.digest(sf.machine)
    sf.machine.plug(1 << 30)
    sf.close(compact=False)
    data = Path(path).read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(start, len(data)):
        Path(path).write_bytes(data[:cut])
        assert persist.digest(persist.load_machine(path, cfg_of())) == before, cut


def corrupt(path: str, where: str) -> None:
    data = bytearray(Path(path).read_bytes())
    lines = data.split(b"\n")
    if where == "header":
        i = len(lines[0]) + 1 + 20
    elif where == "hash":
        i = len(b"memfs-state 1 ")
    else:  # a journal line in the middle
        i = len(lines[0]) + len(lines[1]) + 2 + len(lines[2]) // 2
    data[i] ^= 0x01
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["header", "hash", "journal"])
def test_corrupt_file_is_refused_and_left_alone(path, where):
    sf = reopen(path)
    random_ops(sf.machine, 5, seed=3)
    sf.close(compact=False)
    corrupt(path, where)
    before = Path(path).read_bytes()
    with pytest.raises(StateError, match="is corrupt") as ei:
        reopen(path)
    assert path in str(ei.value)
    assert Path(path).read_bytes() == before  # never "repaired", never half-loaded


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "not a memfs state file"),
    (bytes(range(256)) * 4, "not a memfs state file"),
    (b"memfs-state 2 " + b"0" * 64 + b"\n{}\n", "state format 2; this memfs reads format 1"),
    (b"memfs-state 1 abc\n", "header is incomplete"),
    (b"memfs-state x\n{}\n", "is corrupt"),
])
def test_foreign_files_are_refused(path, content, words):
    Path(path).write_bytes(content)
    with pytest.raises(StateError, match=words):
        reopen(path)
    assert Path(path).read_bytes() == content


def test_line_from_another_file_does_not_verify(path, tmp_path):
    other = str(tmp_path / "other.state")
    for p in (path, other):
        sf = reopen(p, cfg_of() if p == path else cfg_of(2))
        sf.machine.state_store(40, 1)
        sf.close(compact=False)
    a, b = Path(path).read_bytes().split(b"\n"), Path(other).read_bytes().split(b"\n")
    Path(path).write_bytes(b"\n".join(a[:2] + b[2:]))  # same seq, same record, other header
    with pytest.raises(StateError, match="journal line 1 .*does not verify"):
        reopen(path)


def forge(path: str, records: list, ops: int = 0, checkpoint=None, description=None) -> None:
    """A well-formed state file with any content (what an edit, or another memfs, could leave)."""
    content, h = persist._header_lines(description or persist.describe(cfg_of()), ops, checkpoint)
    salt = persist._salt(h)
    Path(path).write_bytes(content + b"".join(persist._entry_line(ops + 1 + i, salt, r)
                                              for i, r in enumerate(records)))


@pytest.mark.parametrize("records, words", [
    ([["state_store", [32, 1], {}, errno.EBUSY]], "different outcome for operation 1"),
    ([["state_store", [32, 1], {}, None], ["state_store", [32, 1], {}, None]], "operation 2"),
    ([["reboot", [], {}, None]], "unknown operation 'reboot'"),
    ([["__init__", [], {}, None]], "unknown operation"),
    ([["state_store", ["x", "y", "z"], {}, None]], "does not replay: TypeError"),
])
def test_a_journal_that_does_not_replay_is_refused(path, records, words):
    forge(path, records)
    with pytest.raises(StateError, match=words):
        reopen(path)


def test_malformed_records_are_corrupt(path):
    forge(path, [["state_store", [32, 1], {}, True]])
    with pytest.raises(StateError, match="corrupt"):
        reopen(path)
    forge(path, [{"op": "x"}])
    with pytest.raises(StateError, match="corrupt"):
        reopen(path)


def test_foreign_checkpoint_is_refused(path):
    m = Machine(cfg_of())
    cp = persist.encode(m)
    cp["classes"][1][:2] = ["subprocess", "Popen"]
    forge(path, [], ops=1, checkpoint=cp)
    with pytest.raises(StateError, match="checkpoint cannot be loaded"):
        reopen(path)


def test_another_description_is_refused_with_the_differences(path):
    sf = reopen(path)
    sf.machine.state_store(32, 1)
    sf.close(compact=False)
    other = load_config(None, overrides={"hotplug.slots": 4, "boot.memhp_default_state": "online"}, kernel="6.8")
    with pytest.raises(DescriptionMismatch) as ei:
        StateFile.open(path, other, on_fatal=pytest.fail)
    msg = str(ei.value)
    assert "made for another machine description" in msg
    assert 'kernel: the file has "6.1", this mount "6.8"' in msg
    assert "slots: the file has 8, this mount 4" in msg and "memhp_default_state" in msg
    assert reopen(path).machine.blocks[32].state == "online"  # the file is unharmed


def test_one_daemon_per_file(path):
    sf = reopen(path)
    with pytest.raises(StateError, match="in use by another memfs daemon"):
        reopen(path)
    sf.close()
    reopen(path).close()


def test_directory_and_missing_parent(tmp_path):
    with pytest.raises(StateError, match="is a directory"):
        reopen(str(tmp_path))
    with pytest.raises(StateError, match="cannot create the state file .*No such file"):
        reopen(str(tmp_path / "no" / "such" / "dir.state"))


def test_leftover_compaction_temp_files_are_removed(path):
    reopen(path).close()
    d = os.path.dirname(path)
    Path(d, ".machine.state.tmp-1-abcd").write_bytes(b"half a checkpoint")
    Path(d, "unrelated").write_bytes(b"x")
    reopen(path).close()
    assert sorted(os.listdir(d)) == ["machine.state", "unrelated"]


def test_write_failure_stops_the_daemon_before_the_ack(path, monkeypatch):
    fatal: list[str] = []
    sf = reopen(path, on_fatal=fatal.append)
    sf.machine.state_store(32, 1)

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fdatasync", fail)
    with pytest.raises(OSError) as ei:
        sf.machine.state_store(33, 1)
    assert ei.value.errno == errno.EIO  # never reported as success
    assert fatal and "No space left on device" in fatal[0]
    monkeypatch.undo()
    # what is on disk is what was acknowledged, or more (the line was written, not synced)
    restored = persist.load_machine(path, cfg_of())
    assert restored.blocks[32].state == "online"


def test_after_close_changes_fail_and_are_not_saved(path):
    sf = reopen(path)
    m = sf.machine
    sf.close()
    with pytest.raises(OSError) as ei:
        m.state_store(32, 1)
    assert ei.value.errno == errno.ESHUTDOWN
    assert reopen(path).machine.blocks[32].state == "offline"


def test_background_compaction_under_concurrent_load(path, monkeypatch):
    monkeypatch.setenv("MEMFS_STATE_COMPACT_EVERY", "40")
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)  # speed; durability is tested above
    sf = reopen(path)
    m = sf.machine
    errors: list[BaseException] = []
    calls: list[int] = []

    def worker(seed: int) -> None:
        try:
            calls.append(random_ops(m, 150, seed))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    deadline = time.monotonic() + 30
    while sf._bg is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sf.compactions >= 1 and sf.ops == sum(calls)
    want = persist.digest(m)
    sf.close(compact=False)
    header, entries = persist.read_journal(path)
    assert header["ops"] + len(entries) == sum(calls) and header["checkpoint"] is not None
    assert persist.digest(persist.load_machine(path, cfg_of())) == want


def test_checkpoint_failure_keeps_the_journal(path, monkeypatch):
    monkeypatch.setenv("MEMFS_STATE_COMPACT_EVERY", "5")
    sf = reopen(path)
    sf.machine.extra = threading.Lock()  # something the codec cannot keep
    calls = random_ops(sf.machine, 12, seed=9)
    assert not sf.checkpoints_ok and sf.journal_len == calls >= 5
    del sf.machine.extra
    want = persist.digest(sf.machine)
    sf.close()
    assert persist.digest(persist.load_machine(path, cfg_of())) == want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 80), ci=st.integers(0, len(CONFIGS) - 1),
       compact_at=st.integers(0, 80))
def test_save_restore_property(tmp_path, seed, n, ci, compact_at):
    """Any operation sequence, with a compaction anywhere, restores to the same machine."""
    path = str(tmp_path / f"p-{seed}-{n}-{ci}-{compact_at}.state")
    cfg = cfg_of(ci)
    sf = StateFile.open(path, cfg, on_fatal=pytest.fail)
    random_ops(sf.machine, min(n, compact_at), seed)
    sf.compact()
    random_ops(sf.machine, n - min(n, compact_at), seed + 1)
    want = persist.digest(sf.machine)
    sf.close(compact=False)
    again = StateFile.open(path, cfg_of(ci), on_fatal=pytest.fail)
    assert persist.digest(again.machine) == want
    again.close(compact=False)
    os.unlink(path)


def test_file_format_is_documented_text(path):
    sf = reopen(path)
    sf.machine.state_store(32, 1)
    sf.close(compact=False)
    lines = Path(path).read_bytes().split(b"\n")
    magic, version, h = lines[0].split(b" ")
    assert (magic, version) == (b"memfs-state", b"1") and hashlib.sha256(lines[1]).hexdigest().encode() == h
    header = json.loads(lines[1])
    assert header["description"]["kernel"] == "6.1" and header["ops"] == 0
    seq, crc, rec = lines[2].split(b" ", 2)
    assert seq == b"1" and json.loads(rec) == ["state_store", [32, 1], {}, None]
    assert int(crc, 16) == zlib.crc32(seq + b" " + rec, int(h[:8], 16))
    assert lines[3] == b""
