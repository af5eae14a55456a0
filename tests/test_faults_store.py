"""A full or read-only store must not turn an acknowledgement into a lie (issue 10,
item 1): nothing is PUBACKed that is not committed. While the store cannot write,
the PUBACKs of QoS 1 publishes kept for an offline persistent session and of
retained publishes are held (and retried); after a SIGKILL, every message that
was acknowledged is still there; when space comes back, the held PUBACKs arrive
by themselves. Logins and routing between live clients keep working meanwhile,
and the log names the outage once instead of a traceback per batch.

Real broker subprocesses whose store lives on a file system the test controls:

- out of space: a 4 MiB tmpfs, filled with a filler file after the broker has
  created its store, freed by deleting the filler. The payloads of the kept
  messages are 64 KiB so that each commit needs new pages: small commits may
  still fit into WAL space SQLite reuses, and those are (honestly) acknowledged.
- read-only: `mount -o remount,ro` of a tmpfs is refused (EBUSY) while the
  broker holds its store open for writing, and chmod does not stop root. What
  makes a file system read-only under a running program is the kernel on an I/O
  error: an ext4 image on a loop device mounted errors=remount-ro, whose
  `trigger_fs_error` (sysfs) turns it read-only at once (SQLite then gets
  EROFS, SQLITE_IOERR_WRITE). Such a file system cannot be made writable again
  while mounted, so "writable again" is: SIGKILL, e2fsck, mount, restart.

Both need root (mount); without it, or where mounting is not allowed, the tests
are skipped with the reason."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients import MqttClient
from tests.harness import RoostProcess

BIG = 64 * 1024          # payload of a kept message: its commit needs new pages
HELD = 1.0               # seconds a held PUBACK must not arrive in (negative check)
RECOVER = 10.0           # seconds for held PUBACKs to arrive once space is back


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=30)


def _wait(cond: Any, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def _unmount(path: Path) -> None:
    for _ in range(50):
        if _run("umount", str(path)).returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)
    _run("umount", "-l", str(path))       # last resort: detach; freed once unused


class _Fs:
    """A file system for one test's store, and the brokers that use it: the
    brokers are SIGKILLed before it is unmounted, also after a failure."""

    def __init__(self, mnt: Path, tmp: Path) -> None:
        self.mnt = mnt
        self.tmp = tmp
        self.brokers: list[RoostProcess] = []

    @property
    def db(self) -> Path:
        return self.mnt / "store" / "roost.db"

    def broker(self) -> RoostProcess:
        proc = RoostProcess(self.tmp / f"broker{len(self.brokers)}", {"storage": {"path": str(self.db)}})
        self.brokers.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.brokers:
            proc.kill()


class SmallTmpfs(_Fs):
    def __init__(self, mnt: Path, tmp: Path) -> None:
        super().__init__(mnt, tmp)
        self.filler = mnt / "filler"

    def fill(self) -> None:
        """Take every free byte: write zeros until ENOSPC, in smaller and smaller pieces."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 16, 4096, 512, 1):
                chunk = bytes(size)
                while True:
                    try:
                        os.write(fd, chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        assert shutil.disk_usage(self.mnt).free == 0

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


class Ext4Loop(_Fs):
    """ext4 on a loop device, mounted errors=remount-ro."""

    def __init__(self, mnt: Path, tmp: Path, device: str) -> None:
        super().__init__(mnt, tmp)
        self.device = device

    def mount(self) -> None:
        res = _run("mount", "-t", "ext4", "-o", "errors=remount-ro", self.device, str(self.mnt))
        assert res.returncode == 0, res.stderr

    def make_readonly(self) -> None:
        """What a failing disk does: the kernel remounts it read-only under its writers."""
        trigger = Path("/sys/fs/ext4") / Path(self.device).name / "trigger_fs_error"
        trigger.write_text("roost fault test")
        probe = self.mnt / "probe"
        try:
            probe.write_text("x")
        except OSError as exc:
            assert exc.errno == errno.EROFS, exc
        else:
            raise AssertionError("the file system still takes writes")

    def repair(self) -> None:
        """Writable again, as an operator would do it: (broker down) unmount, fsck, mount."""
        assert not any(p.running for p in self.brokers)
        _unmount(self.mnt)
        res = _run("e2fsck", "-fy", self.device)
        assert res.returncode < 4, f"e2fsck: {res.returncode} {res.stdout} {res.stderr}"
        self.mount()


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the store's file system is a tmpfs / loop device this test mounts")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[SmallTmpfs]:
    _need_root()
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = _run("mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root, but: {res.stderr.strip()})")
    fs = SmallTmpfs(mnt, tmp_path)
    try:
        yield fs
    finally:
        fs.kill_all()
        _unmount(mnt)


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Ext4Loop]:
    _need_root()
    for tool in ("losetup", "mkfs.ext4", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    res = _run("mkfs.ext4", "-q", "-F", str(image))
    if res.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {res.stderr.strip()}")
    res = _run("losetup", "-f", "--show", str(image))
    if res.returncode != 0:
        pytest.skip(f"no loop device here: {res.stderr.strip()}")
    device = res.stdout.strip()
    mnt = tmp_path / "fs"
    mnt.mkdir()
    fs = Ext4Loop(mnt, tmp_path, device)
    try:
        res = _run("mount", "-t", "ext4", "-o", "errors=remount-ro", device, str(mnt))
        if res.returncode != 0:
            pytest.skip(f"cannot mount ext4 on {device}: {res.stderr.strip()}")
        if not (Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error").exists():
            pytest.skip("this kernel has no ext4 trigger_fs_error")
        yield fs
    finally:
        fs.kill_all()
        if os.path.ismount(mnt):
            _unmount(mnt)
        _run("losetup", "-d", device)


# ---- clients -------------------------------------------------------------------

class Publisher:
    """A paho publisher that does not wait for PUBACKs: `acked` is the set of
    message numbers whose PUBACK arrived (mids are not reused: < 65536 messages)."""

    def __init__(self, broker: RoostProcess, password: str, client_id: str = "alice.pub") -> None:
        self.client = MqttClient(client_id)
        self.client.paho.max_inflight_messages_set(0)     # no client-side window: all go out at once
        self._lock = threading.Lock()
        self._mids: dict[int, int] = {}
        self._acked: set[int] = set()
        self.client.paho.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, username="alice", password=password)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any = None,
                    properties: Any = None) -> None:
        # paho calls this holding its own lock, which publish() takes too: only
        # record the mid here (it may come before publish() returned it)
        with self._lock:
            self._acked.add(mid)

    def send(self, n: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.paho.publish(topic, payload, qos=1, retain=retain)
        with self._lock:
            self._mids[info.mid] = n

    @property
    def acked(self) -> set[int]:
        with self._lock:
            return {n for mid, n in self._mids.items() if mid in self._acked}

    def wait_acked(self, numbers: set[int], timeout: float) -> bool:
        return _wait(lambda: numbers <= self.acked, timeout)

    def after_crash(self) -> set[int]:
        """The broker was SIGKILLed: read what it sent before dying, then stop for good
        (no reconnect that could resend behind the test's back)."""
        assert self.client.wait_disconnected(5.0), "the publisher did not notice the broker's death"
        acked = self.acked
        self.client.paho.disconnect()
        self.client.paho.loop_stop()
        return acked

    def close(self) -> None:
        self.client.disconnect()


def kept_payload(n: int) -> bytes:
    head = f"m{n}:".encode()
    return head + bytes(BIG - len(head))


def persistent_subscriber(broker: RoostProcess, password: str) -> None:
    """alice.sub subscribes kept/# at QoS 1 with clean_session=0, then goes away."""
    sub = MqttClient("alice.sub", clean_session=False).connect(broker.host, broker.port,
                                                              username="alice", password=password)
    assert sub.subscribe("kept/#", 1) == [1]
    sub.disconnect()


def receive_kept(broker: RoostProcess, password: str, expect: set[int], timeout: float = 10.0) -> set[int]:
    """Reconnect alice.sub and return the numbers of the kept messages it gets
    (waiting until `expect` is among them, or the timeout, then a short quiet time)."""
    sub = MqttClient("alice.sub", clean_session=False).connect(broker.host, broker.port,
                                                              username="alice", password=password)
    try:
        assert sub.session_present is True
        got: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            quiet = not expect <= got
            left = deadline - time.monotonic() if quiet else 0.5
            if left <= 0:
                return got
            try:
                m = sub.wait_message("kept/#", timeout=left)
            except TimeoutError:
                return got
            assert m.payload[:1] == b"m" and len(m.payload) == BIG, m.payload[:20]
            got.add(int(m.payload.split(b":", 1)[0][1:]))
    finally:
        sub.disconnect()


def retained_value(broker: RoostProcess, password: str, topic: str) -> bytes | None:
    sub = MqttClient("alice.check").connect(broker.host, broker.port, username="alice", password=password)
    try:
        sub.subscribe(topic, 1)
        try:
            return sub.wait_message(topic, timeout=2.0).payload
        except TimeoutError:
            return None
    finally:
        sub.disconnect()


def log_text(broker: RoostProcess) -> str:
    return broker.log_path.read_text(errors="replace")


def assert_quiet_log(broker: RoostProcess, *, outages: int = 1) -> None:
    """Each outage is named by a few lines (the store, and each writer that holds
    acks: journal, retained; an outage may also end briefly when a small commit
    still fits, and start again), not a line per failed batch; never a traceback."""
    lines = log_text(broker).splitlines()
    noisy = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            j = i
            while j > 0 and not lines[j][:1].isdigit():    # back to the log record it belongs to
                j -= 1
            if lines[j] not in noisy:
                noisy.append(lines[j])
    assert not noisy, "tracebacks logged for a store that cannot write:\n" + "\n".join(noisy)
    outage = [line for line in lines if "cannot " in line and " ERROR " in line]
    assert 1 <= len(outage) <= 6 * outages, "\n".join(outage) or broker.log_tail(80)


# ---- out of space --------------------------------------------------------------

N = 8


def _start_full(tmpfs: SmallTmpfs) -> tuple[RoostProcess, str, Publisher]:
    """A broker on the small tmpfs (users alice and bob) with alice's offline
    persistent subscriber, a publisher whose first kept message (0) was
    acknowledged and stored; then the disk is filled and messages 1..N are
    published (not waiting for PUBACKs)."""
    broker = tmpfs.broker()
    pw = broker.add_user("alice")
    broker.add_user("bob", "bob-pw")
    broker.start()
    persistent_subscriber(broker, pw)
    pub = Publisher(broker, pw)
    pub.send(0, "kept/0", kept_payload(0))
    assert pub.wait_acked({0}, 5.0)
    tmpfs.fill()
    for n in range(1, N + 1):
        pub.send(n, f"kept/{n}", kept_payload(n))
    return broker, pw, pub


def test_disk_full_holds_pubacks_and_a_crash_loses_nothing_acknowledged(tmpfs):
    broker, pw, pub = _start_full(tmpfs)
    assert not pub.wait_acked(set(range(1, N + 1)), HELD), "every PUBACK came although the disk is full"
    assert "cannot write" in log_text(broker)
    broker.kill()
    acked = pub.after_crash()
    assert len(acked - {0}) < N
    tmpfs.free()
    broker.start()
    got = receive_kept(broker, pw, acked)
    assert acked <= got, f"acknowledged but lost: {sorted(acked - got)} (received {sorted(got)})"


def test_held_pubacks_arrive_once_space_returns_and_everything_survives_a_crash(tmpfs):
    broker, pw, pub = _start_full(tmpfs)
    everything = set(range(N + 1))
    assert not pub.wait_acked(everything, HELD), "every PUBACK came although the disk is full"
    tmpfs.free()
    assert pub.wait_acked(everything, RECOVER), f"still not acknowledged: {sorted(everything - pub.acked)}"
    assert "writes again" in log_text(broker)
    broker.kill()
    pub.after_crash()
    broker.start()
    got = receive_kept(broker, pw, everything)
    assert got == everything
    assert_quiet_log(broker)


def test_retained_publish_on_a_full_disk_is_acknowledged_only_once_stored(tmpfs):
    broker = tmpfs.broker()
    pw = broker.add_user("alice")
    broker.start()
    pub = Publisher(broker, pw)
    pub.send(1, "state/lamp", b"v1", retain=True)
    pub.send(2, "state/fan", b"f1", retain=True)
    assert pub.wait_acked({1, 2}, 5.0)
    tmpfs.fill()
    v2 = b"v2" + bytes(BIG)
    pub.send(3, "state/lamp", v2, retain=True)
    assert not pub.wait_acked({3}, HELD), "a retained publish was acknowledged on a full disk"
    broker.kill()
    acked = pub.after_crash()
    tmpfs.free()
    broker.start()
    # the last acknowledged value, or the newer one if (unacknowledged) it got in
    expected = {v2} if 3 in acked else {b"v1", v2}
    assert retained_value(broker, pw, "state/lamp") in expected
    assert retained_value(broker, pw, "state/fan") == b"f1"

    # and when space returns while the broker runs, the held PUBACK arrives by itself
    pub = Publisher(broker, pw, "alice.pub2")
    tmpfs.fill()
    v3 = b"v3" + bytes(BIG)
    pub.send(4, "state/lamp", v3, retain=True)
    assert not pub.wait_acked({4}, HELD), "a retained publish was acknowledged on a full disk"
    tmpfs.free()
    assert pub.wait_acked({4}, RECOVER)
    broker.kill()
    pub.after_crash()
    broker.start()
    assert retained_value(broker, pw, "state/lamp") == v3
    assert_quiet_log(broker, outages=2)


def test_a_full_disk_keeps_logins_and_live_routing_and_says_so_once(tmpfs):
    broker, pw, pub = _start_full(tmpfs)
    assert not pub.wait_acked({1}, HELD)
    # existing users log in (CONNECT accepted) and talk over plain topics, QoS 0 and 1
    for round_ in range(3):
        a = MqttClient(f"alice.live{round_}").connect(broker.host, broker.port, username="alice", password=pw)
        b = MqttClient(f"bob.live{round_}").connect(broker.host, broker.port, username="bob", password="bob-pw")
        assert b.subscribe("live/#", 1) == [1]
        a.publish("live/q0", b"zero", qos=0)
        info = a.paho.publish("live/q1", b"one", qos=1)
        info.wait_for_publish(3.0)
        assert info.is_published(), "no PUBACK for a live QoS 1 publish (nothing to keep) on a full disk"
        assert {b.wait_message("live/#", 3.0).payload for _ in range(2)} == {b"zero", b"one"}
        a.disconnect()
        b.disconnect()
    assert len(pub.acked - {0}) < N      # meanwhile, the kept ones are still held
    tmpfs.free()
    assert pub.wait_acked(set(range(N + 1)), RECOVER)
    pub.close()
    assert_quiet_log(broker)


# ---- read-only -----------------------------------------------------------------

def test_a_store_that_turns_read_only_holds_pubacks_and_loses_nothing(ext4):
    broker = ext4.broker()
    pw = broker.add_user("alice")
    broker.start()
    persistent_subscriber(broker, pw)
    pub = Publisher(broker, pw)
    pub.send(0, "kept/0", kept_payload(0))
    pub.send(100, "state/lamp", b"v1", retain=True)
    assert pub.wait_acked({0, 100}, 5.0)
    ext4.make_readonly()
    for n in range(1, N + 1):
        pub.send(n, f"kept/{n}", kept_payload(n))
    pub.send(101, "state/lamp", b"v2", retain=True)
    assert not pub.wait_acked({1}, HELD), "a kept message was acknowledged on a read-only store"
    # logins and live routing go on
    a = MqttClient("alice.live").connect(broker.host, broker.port, username="alice", password=pw)
    assert a.subscribe("live/#", 1) == [1]
    info = a.paho.publish("live/x", b"hello", qos=1)
    info.wait_for_publish(3.0)
    assert info.is_published(), "no PUBACK for a live QoS 1 publish (nothing to keep) on a read-only store"
    assert a.wait_message("live/#", 3.0).payload == b"hello"
    a.disconnect()
    assert "cannot write" in log_text(broker)
    broker.kill()
    acked = pub.after_crash()
    assert not acked & set(range(1, N + 1)) and 101 not in acked, sorted(acked)
    ext4.repair()
    broker.start()
    got = receive_kept(broker, pw, {0})
    assert 0 in got, sorted(got)       # what was acknowledged (the rest may come too: at least once)
    assert retained_value(broker, pw, "state/lamp") in (b"v1", b"v2")
    # writable again: the client resends what got no PUBACK, and now it is taken
    persistent_subscriber(broker, pw)
    pub = Publisher(broker, pw, "alice.pub2")
    for n in range(1, N + 1):
        pub.send(n, f"kept/{n}", kept_payload(n))
    pub.send(101, "state/lamp", b"v2", retain=True)
    assert pub.wait_acked(set(range(1, N + 1)) | {101}, 5.0)
    pub.close()
    assert set(range(1, N + 1)) <= receive_kept(broker, pw, set(range(1, N + 1)))
    assert retained_value(broker, pw, "state/lamp") == b"v2"
    assert_quiet_log(broker)
