"""Pathname unix sockets: a worker granted the `unix` family reaches only the sockets inside its
granted paths and the ones named in `network.connect`; every other socket file of the host is
absent from its mount view (the minimal view), whatever the file's permissions say.

Real parts only: listeners made by this (host) process in folders of their own, world-writable
(so that permissions alone would let any uid in), and workers that try to reach them.
"""
import os
import shutil
import socket
import stat
import tempfile
import threading

import pytest

import sandbox
from helpers import GreetingServer
from sandbox import PolicyError
from sandbox.child import landlock

pytestmark = pytest.mark.unpriv

CLIENT = """
    import errno, os, socket

    def _name(e):
        return errno.errorcode.get(e.errno, str(e.errno))

    def connect(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(path)
            return s.recv(64).decode()
        except OSError as e:
            return _name(e)
        finally:
            s.close()

    def send(path, text):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.sendto(text.encode(), path)
            return "sent"
        except OSError as e:
            return _name(e)
        finally:
            s.close()

    def exists(path):
        return os.path.lexists(path)

    def uses_the_runtime():
        import decimal, json, sqlite3, time  # stdlib, C extensions and their shared libraries
        db = sqlite3.connect(":memory:")
        value = db.execute("select 6 * 7").fetchone()[0]
        return [json.dumps(value), str(decimal.Decimal("1.5") * 2), time.localtime().tm_year > 2000]

    def write(folder, text):
        with open(os.path.join(folder, "out.txt"), "w") as f:
            f.write(text)
        try:
            os.chmod(os.path.dirname(__file__), 0o777)
            return "chmod allowed"
        except OSError as e:
            return _name(e)

    def mount_points():
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f]

    def tcp(name, port):
        addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        s = socket.create_connection(addr, timeout=5)
        try:
            return s.recv(16).decode()
        finally:
            s.close()
"""


def Listener(path: str, greeting: bytes) -> GreetingServer:
    return GreetingServer.unix(path, greeting)


def _folder() -> str:
    """A folder of its own, outside every grant, that any uid may traverse."""
    d = tempfile.mkdtemp(prefix="sandbox-sock-")
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def folders():
    made = {"outside": _folder(), "granted": _folder(), "named": _folder()}
    yield made
    for d in made.values():
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def listeners(folders):
    made = {k: Listener(os.path.join(d, "app.sock"), f"hello from {k}".encode()) for k, d in folders.items()}
    yield made
    for s in made.values():
        s.close()


def _policy(read_only: str = "", connect: str = "") -> str:
    text = '[network]\nallow = true\nfamilies = ["unix"]\n'
    if connect:
        text += f'connect = ["unix:{connect}"]\n'
    if read_only:
        text += f'[filesystem]\nread_only = ["{read_only}"]\n'
    return text


def _needs_scope() -> None:
    if landlock.abi_version() < landlock.SCOPE_ABI:
        pytest.skip("the unix family needs the Landlock abstract-socket scope (ABI 6)")


def _host_reaches(listeners) -> dict:
    """The host reaches every listener (they are there, and open to all); their counts after."""
    for s in listeners.values():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(s.path)
        assert probe.recv(64) == s.greeting
        probe.close()
    return {k: s.accepted for k, s in listeners.items()}


@pytest.mark.parametrize("scratch", [False, True], ids=["host-ruleset", "own-ruleset"])
def test_a_socket_outside_the_grants_is_absent_one_inside_is_reachable(make_plugin, folders, listeners,
                                                                      scratch):
    _needs_scope()
    outside, granted = listeners["outside"], listeners["granted"]
    before = _host_reaches(listeners)
    text = _policy(read_only=folders["granted"])
    if scratch:
        text = text.replace("[filesystem]\n", "[filesystem]\nscratch = true\n")
    path, policy = make_plugin(CLIENT, text)
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("connect", outside.path) == "ENOENT"  # not in the worker's view at all
        assert w.call("exists", folders["outside"]) is False
        assert w.call("connect", granted.path) == "hello from granted"  # inside a granted folder
    assert outside.accepted == before["outside"]
    assert granted.accepted == before["granted"] + 1


def test_a_socket_granted_by_name_is_reachable_alone(make_plugin, folders, listeners):
    _needs_scope()
    named = listeners["named"]
    before = _host_reaches(listeners)
    path, policy = make_plugin(CLIENT, _policy(connect=named.path))
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("connect", named.path) == "hello from named"
        assert w.call("exists", os.path.join(folders["named"], "other")) is False  # its folder is not there
        assert w.call("connect", listeners["outside"].path) == "ENOENT"
    assert named.accepted == before["named"] + 1
    assert listeners["outside"].accepted == before["outside"]


def test_a_datagram_socket_outside_the_grants_gets_nothing(make_plugin, folders):
    _needs_scope()
    where = os.path.join(folders["outside"], "log.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(where)
    os.chmod(where, 0o777)
    try:
        path, policy = make_plugin(CLIENT, _policy())
        with sandbox.Worker(path, policy=policy) as w:
            assert w.call("send", where, "forged log line") == "ENOENT"
        with pytest.raises(BlockingIOError):  # a unix datagram is queued by the time sendto returns
            sink.recv(64, socket.MSG_DONTWAIT)
        # the same datagram from a worker that names the socket does arrive: the sink works
        path, policy = make_plugin(CLIENT, _policy(connect=where))
        with sandbox.Worker(path, policy=policy) as w:
            assert w.call("send", where, "granted line") == "sent"
        assert sink.recv(64, socket.MSG_DONTWAIT) == b"granted line"
    finally:
        sink.close()


@pytest.mark.parametrize("threads", [0, 2], ids=["no-threads", "threads"])
def test_the_host_filesystem_outside_the_grants_is_absent(make_plugin, threads):
    """stat() is no Landlock right: only the view can make the rest of the host disappear. With
    threads, an unprivileged host's worker makes a user namespace of its own after the view
    (its maps are written in the view's /proc)."""
    _needs_scope()
    path, policy = make_plugin(CLIENT, _policy() + f"[limits]\nthreads = {threads}\n")
    with sandbox.Worker(path, policy=policy) as w:
        for gone in ("/etc/passwd", "/home", "/run", "/var"):
            assert w.call("exists", gone) is False, gone
        assert w.call("exists", path) is True  # its own folder is there
        assert w.call("uses_the_runtime") == ["42", "3.0", True]


def test_the_old_root_is_gone(make_plugin):
    """Not hidden beneath the new root but detached: every mount the worker has is the new
    root, its /proc, or a grant (no /sys, /dev, or the host's own binds such as /etc/hosts)."""
    _needs_scope()
    from sandbox.policy import Policy
    from sandbox._host import plan as plans

    path, policy = make_plugin(CLIENT, _policy(read_only="/proc/self"))
    granted = plans.build(Policy.load(policy), path, "p", None, None).landlock.read
    with sandbox.Worker(path, policy=policy) as w:
        points = w.call("mount_points")
    assert points[0] == "/" and "/proc" in points
    strays = [p for p in points[1:] if p != "/proc" and not any(p == g or p.startswith(g + "/") for g in granted)]
    assert strays == []


def test_writable_paths_stay_writable_and_the_rest_read_only(make_plugin, folders):
    _needs_scope()
    out = folders["granted"]
    path, policy = make_plugin(CLIENT, _policy() + f'[filesystem]\nwritable = ["{out}"]\n[limits]\nfile_size_mb = 1\n'
                               '[seccomp]\ngroups = ["@file-attributes"]\n')
    os.chmod(out, 0o777)
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("write", out, "from the worker") == "EROFS"  # its own folder: read-only
    with open(os.path.join(out, "out.txt")) as f:
        assert f.read() == "from the worker"


def test_a_granted_host_name_still_resolves(make_plugin):
    """DNS needs the resolver's files: they are granted, so they are in the view."""
    _needs_scope()
    if landlock.abi_version() < 4:
        pytest.skip("network.connect needs Landlock ABI 4")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def serve():
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"resolved")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        text = ('[network]\nallow = true\nfamilies = ["unix", "inet"]\n'
                f'connect = ["localhost:{port}"]\n')
        path, policy = make_plugin(CLIENT, text)
        with sandbox.Worker(path, policy=policy) as w:
            assert w.call("tcp", "localhost", port) == "resolved"
    finally:
        server.close()
        thread.join(5)


def test_a_plain_worker_keeps_the_whole_read_only_view(make_plugin):
    """Without the unix family nothing changes: the host's tree stays visible (read-only)."""
    path, policy = make_plugin(CLIENT)
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("exists", "/etc/passwd") is True


def _load(tmp_path, text: str):
    from sandbox.policy import Policy
    p = tmp_path / "u.toml"
    p.write_text(text)
    return Policy.load(str(p))


def test_a_named_socket_must_be_a_socket_path(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    link = tmp_path / "link.sock"
    link.symlink_to(regular)
    for bad, words in ((str(regular), "not a socket"), (str(link), "a symlink"),
                       ("run/app.sock", "absolute"), ("/run/../etc/app.sock", "normalized"),
                       ("/" + "a" * 120, "longer than 107 bytes")):
        with pytest.raises(PolicyError, match=words) as info:
            _load(tmp_path, _policy(connect=bad))
        assert info.value.key == "network.connect", bad
    with pytest.raises(PolicyError, match='families with "unix"'):
        _load(tmp_path, '[network]\nallow = true\nfamilies = ["inet"]\nconnect = ["unix:/run/app.sock"]\n')
    missing = _load(tmp_path, _policy(connect="/run/not-yet-there.sock"))  # may start after the load
    assert missing.network.unix_sockets == ("/run/not-yet-there.sock",)


def test_explain_and_lint_say_where_pathname_sockets_are_reachable(tmp_path):
    from sandbox.policy.explain import explain_text
    from sandbox.policy.lint import lint

    sock_path = str(tmp_path / "app.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    try:
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        policy = _load(tmp_path, _policy(connect=sock_path))
        text = explain_text(policy)
        assert "pathname unix sockets: only inside the granted paths" in text
        assert "the sockets named in network.connect" in text and sock_path in text
        assert policy.explain()["network"]["connect"] == ["unix:" + sock_path]
        findings = [f.message for f in lint(str(tmp_path / "u.toml")) if f.key == "network.families"]
        assert any("only inside the granted paths" in m for m in findings)
    finally:
        s.close()


def test_the_plan_carries_the_named_sockets_only_with_the_unix_family(tmp_path):
    from sandbox._host import plan as plans
    from sandbox.protocol import plan as wire

    policy = _load(tmp_path, _policy(connect="/run/app.sock"))
    plan = plans.build(policy, "/srv/p/worker.py", "p", None, None)
    assert plan.landlock.unix and plan.unix_sockets == ("/run/app.sock",)
    assert wire.decode(wire.encode(plan)) == plan
    older = plan.to_wire()
    del older["unix_sockets"]  # a plan without the field grants no socket
    assert wire.Plan.from_wire(older).unix_sockets == ()
    with pytest.raises(wire.PlanError):
        wire.Plan.from_wire({**plan.to_wire(), "unix_sockets": "/run/app.sock"})
    plain = plans.build(_load(tmp_path, '[network]\nallow = true\nfamilies = ["inet"]\n'), "/srv/p/worker.py", "p",
                        None, None)
    assert not plain.landlock.unix and plain.unix_sockets == ()
