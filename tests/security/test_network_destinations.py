"""Network grants give exactly what they say: TCP by port (Landlock connect rules), no bind,
abstract unix sockets out of reach, DNS that works for a granted host name, and refusal where
the kernel cannot enforce the rules.

Real parts only: TCP servers and an abstract unix socket listened on by this (host) process,
workers that try to reach them. Landlock names ports, not addresses, so "the other port" is
the boundary these tests can draw; the address part of a grant is never enforced and the
policy layer refuses addresses that would claim otherwise.
"""
import os
import socket
import uuid

import pytest

import sandbox
from helpers import GreetingServer
from sandbox import ConfinementError, PolicyError
from sandbox._host import rulesets
from sandbox.child import landlock

pytestmark = pytest.mark.unpriv

CLIENT = """
    import errno, socket

    def ping():
        return "pong"

    def connect(host, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect((host, port))
            return s.recv(16).decode()
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()

    def bind():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", 0))
            return "bound"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()

    def resolve_and_connect(name, port):
        addr = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        return connect(addr[0], addr[1])

    def abstract(name):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect("\\0" + name)
            return s.recv(16).decode()
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()
"""
# bind is allowed by seccomp here so that Landlock, not the filter, is what a bind meets
INET = '[network]\nallow = true\nfamilies = ["inet"]\n{connect}[seccomp]\nallow = ["bind"]\n'


Server = GreetingServer


@pytest.fixture
def servers():
    made = [Server.tcp(b"granted"), Server.tcp(b"other")]
    yield made
    for s in made:
        s.close()


@pytest.fixture
def fresh_rulesets(monkeypatch):
    """No ruleset the host built before (at another simulated ABI), and none of ours left after."""
    monkeypatch.setattr(rulesets, "_cache", {})
    yield
    for fd in rulesets._cache.values():
        os.close(fd)


def _needs(abi: int) -> None:
    if landlock.abi_version() < abi:
        pytest.skip(f"this kernel's Landlock is below ABI {abi}")


@pytest.mark.parametrize("scratch", [False, True], ids=["host-ruleset", "own-ruleset"])
def test_connect_only_to_the_granted_port_and_never_bind(make_plugin, servers, scratch):
    _needs(4)
    granted, other = servers
    extra = "[filesystem]\nscratch = true\n" if scratch else ""
    path, policy = make_plugin(CLIENT, INET.format(connect=f'connect = ["127.0.0.1:{granted.port}"]\n') + extra)
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("connect", "127.0.0.1", granted.port) == "granted"
        assert w.call("connect", "127.0.0.1", other.port) == "EACCES"
        assert w.call("bind") == "EACCES"
        assert w.call("connect", "127.0.0.1", granted.port) == "granted"  # the worker lives on


def test_without_connect_rules_tcp_is_not_limited(make_plugin, servers):
    """Today's `network.allow` without `connect`: any port (lint and explain warn about it)."""
    granted, other = servers
    path, policy = make_plugin(CLIENT, INET.format(connect=""))
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("connect", "127.0.0.1", other.port) == "other"


def test_a_specific_remote_address_is_refused(make_plugin):
    """Landlock cannot hold a worker to 10.1.2.3: the grant would open the port everywhere."""
    path, policy = make_plugin(CLIENT, INET.format(connect='connect = ["10.1.2.3:5432"]\n'))
    with pytest.raises(PolicyError) as info:
        sandbox.Worker(path, policy=policy)
    assert info.value.key == "network.connect" and "0.0.0.0:5432" in str(info.value)


def test_a_granted_host_name_resolves(make_plugin, servers):
    """DNS made to work by the library: the resolver's files readable (and TCP 53 granted).
    "localhost" comes from /etc/hosts, which is read the same way as the resolver's files."""
    _needs(4)
    granted, other = servers
    path, policy = make_plugin(CLIENT, INET.format(connect=f'connect = ["localhost:{granted.port}"]\n'))
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("resolve_and_connect", "localhost", granted.port) == "granted"
        assert w.call("connect", "127.0.0.1", other.port) == "EACCES"


@pytest.fixture
def abstract_server():
    name = f"sandbox-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("\0" + name)
    server = Server(s, b"host secret")
    yield name
    server.close()


@pytest.mark.parametrize("families", [["unix"], ["unix", "inet"]])
def test_a_host_abstract_socket_is_out_of_reach(make_plugin, abstract_server, families):
    _needs(6)
    policy_text = f'[network]\nallow = true\nfamilies = {families!r}\n'.replace("'", '"')
    path, policy = make_plugin(CLIENT, policy_text)
    # the host itself reaches it: the socket is there
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect("\0" + abstract_server)
    assert probe.recv(16) == b"host secret"
    probe.close()
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("abstract", abstract_server) == "EPERM"


@pytest.mark.parametrize("scratch", [False, True], ids=["host-ruleset", "own-ruleset"])
def test_connect_rules_below_abi_4_refuse_to_start(make_plugin, servers, monkeypatch, fresh_rulesets, scratch):
    """A kernel without Landlock TCP rules (simulated: ABI 3) cannot enforce `connect`: the worker
    refuses to start rather than run with every port open."""
    granted, _ = servers
    monkeypatch.setattr(rulesets, "ABI_MAX", 3)
    extra = "[filesystem]\nscratch = true\n" if scratch else ""
    path, policy = make_plugin(CLIENT, INET.format(connect=f'connect = ["127.0.0.1:{granted.port}"]\n') + extra)
    with pytest.raises(ConfinementError) as info:
        with sandbox.Worker(path, policy=policy) as w:
            w.call("connect", "127.0.0.1", granted.port)
    assert info.value.layer == "landlock-net"


def test_unix_family_below_abi_6_refuses_to_start(make_plugin, monkeypatch, fresh_rulesets):
    """Without the abstract-socket scope (simulated: ABI 5) a unix-family worker in the host's
    network namespace would reach every abstract socket of the host."""
    monkeypatch.setattr(rulesets, "ABI_MAX", 5)
    path, policy = make_plugin(CLIENT, '[network]\nallow = true\nfamilies = ["unix"]\n')
    with pytest.raises(ConfinementError) as info:
        with sandbox.Worker(path, policy=policy) as w:
            w.call("abstract", "x")
    assert info.value.layer == "landlock-scope"


def test_a_lower_abi_without_connect_rules_still_starts(make_plugin, monkeypatch, fresh_rulesets):
    """The refusal is for what the plan needs, not for every old kernel."""
    monkeypatch.setattr(rulesets, "ABI_MAX", 3)
    path, policy = make_plugin(CLIENT)
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("ping") == "pong"


def _policy_file(tmp_path, connect: str) -> str:
    p = tmp_path / "net.toml"
    p.write_text(f'[network]\nallow = true\nfamilies = ["inet"]\n{connect}')
    return str(p)


def test_explain_and_lint_say_ports_not_addresses(tmp_path):
    from sandbox.policy import Policy
    from sandbox.policy.explain import explain_text
    from sandbox.policy.lint import lint

    path = _policy_file(tmp_path, 'connect = ["127.0.0.1:8080", "localhost:443"]\n')
    text = explain_text(Policy.load(path))
    assert "ports 53, 443, 8080 only, on any address (Landlock matches ports, not addresses); bind denied" in text
    assert "UDP: not limited by Landlock" in text and "abstract unix sockets: never" in text
    assert "/etc/resolv.conf" in text
    messages = [f.message for f in lint(path) if f.key == "network.connect"]
    assert any("127.0.0.1:8080: enforced as port 8080 on any address" in m for m in messages)
    assert any("TCP port 53" in m for m in messages)

    unlimited = _policy_file(tmp_path, "")
    assert any(f.level == "warning" and "any TCP port" in f.message
               for f in lint(unlimited) if f.key == "network.connect")
    assert "TCP: any address and port, bind included" in explain_text(Policy.load(unlimited))

    unix = tmp_path / "unix.toml"
    unix.write_text('[network]\nallow = true\nfamilies = ["unix"]\n')
    assert any("pathname sockets are reachable only inside the granted paths" in f.message
               for f in lint(str(unix)) if f.key == "network.families")
    assert "pathname unix sockets: only inside the granted paths" in explain_text(Policy.load(str(unix)))

    remote = _policy_file(tmp_path, 'connect = ["[2001:db8::1]:443"]\n')
    assert [f.level for f in lint(remote) if f.key == "network.connect"] == ["error"]
    with pytest.raises(PolicyError, match=r"\[::\]:443"):
        Policy.load(remote)
