"""examples/host_app.py as a real server process, driven by a real HTTP client (httpx)."""
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from helpers import DEFAULT_POLICY, ROOT  # noqa: E402
import procfs  # noqa: E402
from procfs import children_of  # noqa: E402

APP = os.path.join(ROOT, "examples", "host_app.py")
PLUGINS = os.path.join(ROOT, "tests", "plugins", "http")
POLICIES = {
    "burner": "[limits]\ntimeout = 10\n",
    # a small message cap: arguments that would pass it must be refused before a worker sees them
    # kill mode pinned: a forbidden syscall is a violation (502), the status this suite checks
    "flaky": "[limits]\ntimeout = 1.0\nmax_message_bytes = 65536\n[seccomp]\ndefault_action = \"kill\"\n",
    "badpolicy": "[limits]\ntimeout = \"soon\"\n",
    "loadfail": "[limits]\ntimeout = 10\n",
    # nopolicy: deliberately none
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(root, "server.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, APP, "--host", "127.0.0.1", "--port", str(self.port), "--plugins",
             os.path.join(root, "plugins"), "--policies", os.path.join(root, "policies"), "--pool-size", "2"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start:\n" + self.output())

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# The module's server is started once, on one xdist worker.
pytestmark = pytest.mark.xdist_group("http")


@pytest.fixture(scope="module")
def root():
    """Plugins and policies in a world-readable temp folder (workers run under uids of their own)."""
    d = tempfile.mkdtemp(prefix="sandbox-http-")
    os.chmod(d, 0o755)
    shutil.copytree(PLUGINS, os.path.join(d, "plugins"))
    os.makedirs(os.path.join(d, "policies"))
    for name, body in POLICIES.items():
        with open(os.path.join(d, "policies", f"{name}.toml"), "w") as f:
            f.write(f'extends = "{DEFAULT_POLICY}"\n{body}')
    for dirpath, dirs, files in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(dirpath, x), 0o755)
        for x in files:
            os.chmod(os.path.join(dirpath, x), 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(root):
    s = Server(root)
    yield s
    s.stop()


def post(server, path, body=None, **kw):
    return httpx.post(server.url + path, json=body if body is not None else [], timeout=30, **kw)


def test_bad_plugins_are_logged_and_skipped_and_clients_see_only_the_kind(server):
    r = httpx.get(server.url + "/health")
    h = r.json()
    assert h["status"] == "ok" and h["plugins"] == ["burner", "flaky"]
    assert h["skipped"] == {"nopolicy": {"error": "policy-error"}, "badpolicy": {"error": "policy-error"},
                            "loadfail": {"error": "load-error"}}
    r404 = post(server, "/plugins/loadfail/anything")
    assert r404.status_code == 404 and "load-error" in r404.text
    for text in (r.text, r404.text):
        assert "hunter2" not in text and "no policy file" not in text and "soon" not in text
    out = server.output()
    assert "skipped plugin nopolicy: policy-error: no policy file" in out
    assert "skipped plugin badpolicy: policy-error" in out
    assert "skipped plugin loadfail: load-error" in out and "hunter2-load-secret" in out


def test_only_exported_names_are_served(server):
    for function in ("on_message", "post", "_messages", "__all__", "os"):
        r = post(server, f"/plugins/flaky/{function}", [{"x": 1}])
        assert r.status_code == 404 and r.json()["error"] == "not-found", function
    assert post(server, "/plugins/flaky/seen").json() == {"result": 0}  # on_message never ran


def _raw(server, head: bytes, body_chunks=()):
    """An HTTP/1.1 request over a plain socket (a client that lies or streams): (response text,
    body bytes the server let us send)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
                sent += len(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server stopped reading: what it answered may still be there
        out = b""
        try:
            while data := s.recv(65536):
                out += data
        except OSError:
            pass
        return out.decode("latin-1"), sent


def _peak_rss_mib(pid) -> float:
    return procfs.peak_rss_kib(pid) / 1024


def test_body_cap_is_enforced_while_reading(server):
    head = b"POST /plugins/flaky/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # Content-Length past the cap: refused before a byte of the body is read
    out, _ = _raw(server, head + b"Content-Length: %d\r\n\r\n" % (256 << 20))
    assert " 413 " in out.split("\r\n")[0] and '"error":"too-large"' in out, out[:300]
    # no Content-Length (chunked): counted as it streams in, refused once past the cap
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"[" + b"0," * ((1 << 19) - 1) + b"0")
    chunks = (chunk for _ in range(256))
    out, sent = _raw(server, head + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert out == "" or (" 413 " in out.split("\r\n")[0] and "too-large" in out), out[:300]
    assert sent < (64 << 20)  # it stopped reading soon after the 16 MiB cap
    assert _peak_rss_mib(server.proc.pid) < 200  # a 256 MiB body was never held
    assert post(server, "/plugins/flaky/echo", ["fine"]).json() == {"result": "fine"}


def test_deep_json_is_a_400_without_a_traceback(server):
    before = server.output()
    r = httpx.post(server.url + "/plugins/flaky/echo", content=b"[" * 100_000 + b"]" * 100_000, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "bad-request"
    assert "Traceback" not in server.output()[len(before):]


def test_client_input_never_counts_against_the_plugin(server):
    restarts = _metric(server, 'sandbox_pool_restarts_total{plugin="flaky"}')
    deep = [0]
    for _ in range(70):  # past the protocol's 64 levels: an echo of it would break the protocol
        deep = [deep]
    floats = "[" + ",".join(["1.5"] * 12_000) + "]"  # 47 KB of JSON, 108 KB of msgpack: past the cap
    for _ in range(12):  # more than the restart limit (10 within 60 s) if each cost a worker
        r = post(server, "/plugins/flaky/echo", [deep])
        assert r.status_code == 400 and "nested deeper" in r.json()["detail"]
        r = httpx.post(server.url + "/plugins/flaky/echo", content=f"[{floats}]".encode(), timeout=30)
        assert r.status_code == 413 and r.json()["error"] == "too-large", r.text
    for body, what in (([2 ** 70], "64-bit"), (["\ud800"], "UTF-8")):
        r = httpx.post(server.url + "/plugins/flaky/echo", content=json.dumps(body).encode(), timeout=30)
        assert r.status_code == 400 and what in r.json()["detail"], r.text
    assert post(server, "/plugins/flaky/echo", ["still here"]).json() == {"result": "still here"}
    assert _metric(server, 'sandbox_pool_restarts_total{plugin="flaky"}') == restarts


def test_calls_and_error_statuses(server):
    r = post(server, "/plugins/flaky/echo", [{"a": [1, 2.5, None, "x"]}])
    assert r.status_code == 200 and r.json() == {"result": {"a": [1, 2.5, None, "x"]}}
    r = post(server, "/plugins/flaky/greet", {"args": ["you"], "kwargs": {"punctuation": "?"}})
    assert r.json() == {"result": "hello you?"}
    assert post(server, "/plugins/flaky/blob", [3]).json() == {"result": {"$bytes": "AAEC"}}
    assert post(server, "/plugins/flaky/length", [{"$bytes": "AAECAw=="}]).json() == {"result": 4}

    r = post(server, "/plugins/flaky/boom")
    assert r.status_code == 422 and r.json()["error"] == "plugin-error" and "the plugin says no" in r.json()["detail"]
    for path in ("/plugins/flaky/nothere", "/plugins/flaky/_private", "/plugins/ghost/echo"):
        r = post(server, path)
        assert r.status_code == 404 and r.json()["error"] == "not-found", path
    for body in (b"{not json", b'"a string"', b'{"args": 1}', b'{"argz": []}'):
        r = httpx.post(server.url + "/plugins/flaky/echo", content=body)
        assert r.status_code == 400 and r.json()["error"] == "bad-request", body

    # each failure gets its status, and the next request to the same plugin succeeds
    for function, status, kind in (("crash", 502, "crashed"), ("spin", 504, "timeout"),
                                   ("sock", 502, "violation"), ("crash", 502, "crashed")):
        r = post(server, f"/plugins/flaky/{function}")
        assert (r.status_code, r.json()["error"]) == (status, kind), r.text
        if kind == "violation":
            assert r.json()["syscall"] == "socket"
        r = post(server, "/plugins/flaky/echo", ["still here"])
        assert r.status_code == 200 and r.json() == {"result": "still here"}

    metrics = httpx.get(server.url + "/metrics").text
    assert 'sandbox_http_errors_total{kind="timeout",plugin="flaky"} 1.0' in metrics
    assert 'sandbox_pool_live_workers{plugin="flaky"}' in metrics
    assert 'sandbox_pool_restarts_total{plugin="flaky"}' in metrics
    assert "sandbox_http_call_seconds_bucket" in metrics


def test_health_stays_fast_while_plugins_burn_cpu(server):
    results = []

    def burn():
        results.append(post(server, "/plugins/burner/burn", [2.0]).json())

    burners = [threading.Thread(target=burn) for _ in range(2)]
    for t in burners:
        t.start()
    time.sleep(0.2)  # both calls are running
    latencies = []
    with httpx.Client(base_url=server.url) as client:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            t0 = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
    for t in burners:
        t.join()
    assert results == [{"result": True}, {"result": True}]
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert len(latencies) > 50
    assert p99 < 0.050, f"p99 {p99 * 1000:.1f} ms"


def test_1000_requests_from_50_clients(server):
    async def main():
        answers = {}

        async def client(k):
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                for j in range(20):
                    i = k * 100 + j
                    r = await c.post("/plugins/flaky/echo", json=[{"id": i}])
                    assert r.status_code == 200, r.text
                    assert i not in answers
                    answers[i] = r.json()["result"]["id"]

        await asyncio.gather(*(client(k) for k in range(50)))
        return answers

    before = _ok_calls(server)
    answers = asyncio.run(main())
    assert len(answers) == 1000 and all(i == v for i, v in answers.items())
    assert _ok_calls(server) - before == 1000  # the server ran each exactly once


def test_sigterm_leaves_no_worker_behind(root):
    s = Server(root)
    try:
        assert post(s, "/plugins/flaky/echo", [1]).json() == {"result": 1}
        # a call in flight at SIGTERM: it is finished or killed, never left running
        threading.Thread(target=lambda: _ignore(post, s, "/plugins/burner/burn", [30.0]), daemon=True).start()
        time.sleep(0.3)
        family = {p: procfs.start_time(p) for p in children_of(s.proc.pid)}
        assert len(family) >= 4  # zygote(s) + 2 pools of 2 workers
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        end = time.monotonic() + 5
        while time.monotonic() < end:
            left = [p for p, st in family.items() if st is not None and procfs.start_time(p) == st]
            if not left:
                break
            time.sleep(0.05)
        assert left == [], f"left behind: {left}\n{s.output()}"
        assert "all plugin pools closed" in s.output()
    finally:
        s.stop()


def _ok_calls(server) -> float:
    return _metric(server, 'sandbox_http_calls_total{outcome="ok",plugin="flaky"}')


def _metric(server, name) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _ignore(fn, *args):
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass
