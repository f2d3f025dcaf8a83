"""Reading a stopped task's path argument, with a real filter, listener and process:
the string comes from /proc/<pid>/mem and counts only while the notification is still valid."""
import errno
import os
import select
import socket
import subprocess
import sys
import textwrap

import pytest

from sandbox._host import decode, notify

CHILD = textwrap.dedent("""
    import os, socket, sys, tempfile
    try:
        import seccomp as sc
    except ImportError:
        import pyseccomp as sc
    from sandbox.child import seccomp as S
    f = sc.SyscallFilter(sc.ALLOW)
    for name in ("mkdir", "mkdirat"):
        f.add_rule(sc.NOTIFY, name)
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        bpf = tmp.read()
    hand = socket.socket(fileno=int(sys.argv[1]))
    S.set_no_new_privs()
    listener = S.install_filter(bpf, listener=True)
    socket.send_fds(hand, [b"L"], [listener])
    os.close(listener)
    try:
        os.mkdir(sys.argv[2])
        print("made", flush=True)
    except OSError as e:
        print(e.errno, flush=True)
    sys.stdin.read()  # stay alive (memory still readable) until the test is done
""")


@pytest.mark.unpriv
def test_read_string_reads_the_path_and_id_valid_guards_it(tmp_path):
    path = str(tmp_path / ("deep-" + "x" * 200))
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(child.fileno()), path],
                            pass_fds=[child.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child.close()
    try:
        parent.settimeout(30)
        _, fds, _, _ = socket.recv_fds(parent, 16, 1)
        listener = fds[0]
        assert select.select([listener], [], [], 30)[0], "no notification arrived"
        n = notify.receive(listener)
        assert n is not None and n.name in ("mkdir", "mkdirat") and n.pid == proc.pid
        addr = n.args[0] if n.name == "mkdir" else n.args[1]
        assert decode.read_string(n.pid, addr, listener, n.id) == path
        report = decode.describe(n.name, n.args, read_path=lambda a: decode.read_string(n.pid, a, listener, n.id))
        assert report.path == path
        assert report.grant == "filesystem.writable or filesystem.scratch"
        assert decode.notification_valid(listener, n.id)
        assert notify.answer(listener, n.id, -errno.EROFS)
        assert proc.stdout.readline().strip() == str(errno.EROFS)  # the answer reached the task
        # the task is alive and its memory readable, but it has moved on: the same id is no
        # longer valid, so whatever is at that address now does not count
        assert proc.poll() is None
        assert not decode.notification_valid(listener, n.id)
        assert decode.read_string(n.pid, addr, listener, n.id) is None
        proc.communicate("", timeout=30)
        os.close(listener)
    finally:
        parent.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
