"""`make demo`: a short scripted host.

Loads each example plugin with its policy and calls it; then lets each hostile plugin try its
attack and says, in plain words, how it was stopped; then shows that a worker started before
the attacks still answers. If the HTTP host exists, it starts it and talks to it too.
Exit code 0 when everything behaved as expected.
"""
import errno
import io
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import sandbox  # noqa: E402
import sandbox.events  # noqa: E402

PLUGINS = os.path.join(HERE, "plugins")
POLICIES = os.path.join(ROOT, "policies")
ok = True


def worker(name):
    return sandbox.Worker(os.path.join(PLUGINS, name, "worker.py"), policy=os.path.join(POLICIES, f"{name}.toml"))


def show(title, value):
    text = repr(value) if not isinstance(value, str) else value
    text = text if len(text) < 300 else text[:300] + " ..."
    print(f"  {title:<28} {text}")


def sample_png():
    from PIL import Image
    buf = io.BytesIO()
    img = Image.new("RGB", (800, 600), (30, 90, 200))
    for x in range(0, 800, 40):
        for y in range(600):
            img.putpixel((x, y), (255, 255, 255))
    img.save(buf, "PNG")
    return buf.getvalue()


def useful_plugins():
    global ok
    print("\n== Useful plugins, each under its own policy ==")
    with worker("textstats") as w:
        messages = []
        w.on("message", messages.append)
        show("textstats.stats", w.call("stats", "To be, or not to be, that is the question.\nTo be!"))
        w.post({"top": 2})
        deadline = time.monotonic() + 2
        while len(messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        show("  messages it posted", messages)
    with worker("markdown_render") as w:
        show("markdown_render.render", w.call("render", "# Release notes\n\n* **fast** start\n* safe `plugins`"))
    with worker("template") as w:
        show("template.render", w.call("render", "Hello {{ user.name|title }}, you have {{ n }} new messages.",
                                       {"user": {"name": "ada lovelace"}, "n": 3}))
        show("template.evaluate", w.call("evaluate", "price * qty * (1 - discount)",
                                         {"price": 9.5, "qty": 4, "discount": 0.25}))
        try:
            w.call("render", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
            show("template escape attempt", "rendered (!)")
            ok = False
        except sandbox.PluginError as e:
            show("template escape attempt", f"refused by Jinja's sandbox: {e.type}")
    with worker("thumbnail") as w:
        png = sample_png()
        r = w.call("thumbnail", png, 160, 160)
        width, height = r["size"]
        show("thumbnail.thumbnail", f"{len(png)} bytes, 800x600 -> {width}x{height} PNG of {len(r['png'])} bytes")


HOSTILE = [
    ("hostile_phone_home", "open a TCP connection to 127.0.0.1:8080"),
    ("hostile_fork_bomb", "fork itself without end"),
    ("hostile_spinner", "spin forever, ignoring SIGTERM"),
    ("hostile_memory_hog", "allocate memory without end"),
    ("hostile_secrets", "read /etc/shadow, the host's environment and root's keys"),
    ("hostile_liar", "forge a frame header announcing 4 GiB on the protocol pipe"),
]


def explain(err, denials=()):
    if isinstance(err, sandbox.PolicyViolation):
        return (f"stopped: it made the forbidden system call {err.syscall}() "
                f"(policy {os.path.relpath(err.policy or '?', ROOT)}, kill mode); the worker was killed")
    if isinstance(err, sandbox.PluginError) and denials:
        d = denials[0].fields
        return (f"stopped: its system call was denied ({errno.errorcode.get(d['errno'], d['errno'])}) and "
                f"reported to the host: {d['detail'][:90]} (policy {os.path.relpath(d['policy'] or '?', ROOT)}, "
                f"deny mode; to grant it: {d['grant']}); the plugin got {err.type} and its worker carried on")
    if isinstance(err, sandbox.PluginTimeout):
        return f"stopped: no answer within {err.timeout:g} s, so the host killed it (SIGKILL, on its own clock)"
    if isinstance(err, sandbox.PluginMemoryError):
        return "stopped: it hit its memory limit and got a MemoryError instead of the machine's memory"
    if isinstance(err, sandbox.ProtocolViolation):
        return f"stopped: it broke the message protocol ({err}); killed before the host allocated anything"
    return f"stopped: {type(err).__name__}: {err}"


def hostile_plugins():
    global ok
    print("\n== Hostile plugins: each attack fails, the host carries on ==")
    sibling = worker("textstats")  # started before the attacks, must survive them
    for name, attempt in HOSTILE:
        print(f"  {name} tries to {attempt}")
        denials = []  # what the host was told of syscalls it answered with an errno (deny mode)
        unsubscribe = sandbox.events.subscribe(
            lambda ev, name=name, got=denials: ev.name == "denied" and ev.get("plugin") == name and got.append(ev))
        try:
            with worker(name) as w:
                result = w.call("run")
        except sandbox.PluginError as e:
            print(f"    -> {explain(e, denials)}")
            ok = ok and bool(denials)  # an ordinary Python error with no denial behind it: not stopped by us
            continue
        except sandbox.SandboxError as e:
            print(f"    -> {explain(e)}")
            continue
        finally:
            unsubscribe()
        if name == "hostile_secrets":
            refused = all(str(v).startswith("refused") for k, v in result.items() if k != "environment")
            # nothing of the host's: only the worker's own baseline (HOME, USER, thread caps)
            env_empty = result.get("environment") == w.policy.environment({})
            print(f"    -> got nothing: {'; '.join(f'{k}: {v}' for k, v in result.items() if k != 'environment')}; "
                  f"environment {'only its own baseline' if env_empty else result.get('environment')}")
            ok = ok and refused and env_empty
        else:
            print(f"    -> NOT STOPPED: returned {result!r}")
            ok = False
    answer = sibling.call("stats", "still here")
    print(f"  a worker started before the attacks still answers: {answer['words']} words counted")
    sibling.close()


def http_host():
    app = os.path.join(HERE, "host_app.py")
    if not os.path.exists(app):
        return
    import json
    import signal
    import socket
    import subprocess
    import httpx
    print("\n== The HTTP host: plugins behind a real web server ==")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, app, "--host", "127.0.0.1", "--port", str(port), "--pool-size", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        for path, body in [("/plugins/textstats/stats", ["hello http world"]),
                           ("/plugins/template/evaluate", ["2 ** 10"]),
                           ("/plugins/hostile_phone_home/run", []),
                           ("/plugins/hostile_spinner/run", [])]:
            r = httpx.post(base + path, json=body, timeout=30)
            print(f"  POST {path} -> {r.status_code} {json.dumps(r.json())[:160]}")
        r = httpx.get(base + "/health", timeout=5)
        print(f"  GET /health -> {r.status_code} {r.text[:120]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    print(f"  server stopped (exit code {proc.returncode})")


def main():
    t = time.monotonic()
    print(f"sandbox demo: host pid {os.getpid()}, running as {'root' if os.geteuid() == 0 else 'an unprivileged user'}")
    useful_plugins()
    hostile_plugins()
    http_host()
    print(f"\n{'All plugins behaved as expected' if ok else 'SOMETHING WENT WRONG'} "
          f"({time.monotonic() - t:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
