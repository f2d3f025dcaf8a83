"""Machine-wide uid claims: files never pile up, and a full or read-only claims directory
degrades to reuse, then to a HostResourceError naming it, never to a raw OSError forever.

Each scenario runs in a subprocess with a mount namespace of its own (and, unprivileged, a user
namespace), where a tiny tmpfs plays the claims directory: full means out of inodes, read-only
means a read-only remount. Nothing is mounted in the test's own namespace."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.unpriv

SCENARIO = r"""
import json, os, sys, tempfile
sys.path.insert(0, {root!r})
from sandbox.child import syscalls as _sys
from sandbox import HostResourceError
from sandbox._host import uids
uid, gid = os.getuid(), os.getgid()
if uid != 0:
    _sys.unshare(_sys.CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{{uid}} {{uid}} 1"), ("gid_map", f"{{gid}} {{gid}} 1")):
        with open(f"/proc/self/{{name}}", "w") as f:
            f.write(text)
_sys.unshare(_sys.CLONE_NEWNS)
_sys.mount(b"none", b"/", None, _sys.MS_REC | _sys.MS_PRIVATE)
d = tempfile.mkdtemp()
_sys.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"nr_inodes=4,mode=0700,uid=%d" % os.geteuid())
uids.CLAIMS = d
uids.SUBORDINATE_FILES = ()
lo, hi = 299_950, 299_959
out = {{}}

def attempt():
    try:
        return uids.allocate(lo, hi)
    except HostResourceError as e:
        return "HostResourceError: " + str(e)
    except OSError as e:
        return "OSError: " + str(e)

if {mode!r} == "full":
    # three stale claim files (a crashed host's) fill the 4 inodes with the root
    for u in (299_951, 299_952, 299_953):
        open(f"{{d}}/{{u}}", "w").close()
else:
    for u in (299_951, 299_952):
        open(f"{{d}}/{{u}}", "w").close()
    _sys.mount(b"none", d.encode(), None, 32 | 4096 | 1)  # MS_REMOUNT | MS_BIND | MS_RDONLY
got = [attempt() for _ in range(4)]
out["got"] = got
freed = next(g for g in got if isinstance(g, int))
uids.release(freed)
out["after_release"] = attempt()
out["files"] = sorted(os.listdir(d))
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["full", "read-only"])
def test_an_unusable_claims_directory_reuses_then_fails_clearly(tmp_path, mode):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO.format(root=ROOT, mode=mode))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    got = res["got"]
    existing = 3 if mode == "full" else 2
    reused = [g for g in got if isinstance(g, int)]
    assert sorted(reused) == list(range(299_951, 299_951 + existing))  # the stale files, reused
    refused = [g for g in got if not isinstance(g, int)]
    assert refused and all(r.startswith("HostResourceError") for r in refused), refused
    assert all("accepts no new claim file" in r and "/tmp" in r for r in refused)
    # freed: the next start works again (full: its file is gone, so one can be made; read-only: reused)
    assert isinstance(res["after_release"], int)


def test_claim_files_do_not_pile_up(tmp_path, monkeypatch):
    from sandbox._host import uids
    d = tmp_path / "claims"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(uids, "CLAIMS", str(d))
    monkeypatch.setattr(uids, "SUBORDINATE_FILES", ())
    for _ in range(200):
        uid = uids.allocate(299_900, 299_949)
        assert os.listdir(d) == [str(uid)]
        uids.release(uid)
    assert os.listdir(d) == []


def test_a_claim_file_released_under_a_waiter_is_not_taken_for_a_claim(tmp_path, monkeypatch):
    """The waiter opened the file before the holder removed it: once it gets the lock, it sees
    the name now points elsewhere (or nowhere) and does not count that lock as a claim."""
    from sandbox._host import uids
    d = tmp_path / "claims"
    d.mkdir(mode=0o700)
    path = str(d / "299990")
    stale = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    os.unlink(path)  # what a release does while the waiter holds its descriptor
    try:
        assert uids._lock_and_verify(stale, path) == uids.STALE
    finally:
        os.close(stale)
    fd = uids._claim(str(d), 299_990)  # a fresh file: a real claim
    other = os.open(path, os.O_RDONLY)
    try:
        assert fd is not None and uids._lock_and_verify(other, path) == uids.HELD
    finally:
        os.close(other)
        os.close(fd)


STALLED = r"""
import json, os, signal, sys, tempfile, time
sys.path.insert(0, {root!r})
import sandbox
from sandbox._host import uids, zygote_client
d = tempfile.mkdtemp(); os.chmod(d, 0o755)
p = os.path.join(d, "worker.py")
with open(p, "w") as f:
    f.write("def ping():\n    return 1\n")
os.chmod(p, 0o644)
w = sandbox.Worker(p)
before = set(uids._in_use)
zygote = zygote_client.get(False)._proc
zygote.send_signal(signal.SIGSTOP)
try:
    sandbox.Worker(p, start_timeout=1.0)
    outcome = "started"
except sandbox.ZygoteDied:
    outcome = "zygote-died"
held = set(uids._in_use) - before  # the stalled request's uid: the zygote may still fork it
zygote.kill()  # ours; the request's descriptors, still in flight, close with it
zygote.send_signal(signal.SIGCONT) if zygote.poll() is None else None
end = time.monotonic() + 10
while held & set(uids._in_use) and time.monotonic() < end:
    time.sleep(0.01)
print(json.dumps({{"outcome": outcome, "held": len(held), "still_held": len(held & set(uids._in_use))}}))
"""


@pytest.mark.unpriv
def test_a_stalled_starts_uid_is_freed_once_its_worker_cannot_exist(plugin_dir):
    """A start that timed out on a stopped zygote keeps its uid (the zygote may still fork it),
    but not forever: once the status pipe says the zygote is gone, the uid is free again."""
    script = os.path.join(plugin_dir, "stalled.py")
    with open(script, "w") as f:
        f.write(STALLED.format(root=ROOT))
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["outcome"] == "zygote-died"
    if got["held"] == 0:
        pytest.skip("no uid claims in this mode (an unprivileged host runs workers as its own uid)")
    assert got["still_held"] == 0, got
