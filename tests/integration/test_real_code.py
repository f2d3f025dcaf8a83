"""Real standard-library code under the shipped default: each probe real code makes works, or
fails with the ordinary Python error it would get on a read-only, terminal-less, single-task
machine; none kills the worker. Every test runs a real worker."""
import errno
import os

import pytest

import sandbox
from sandbox.policy import Policy

pytestmark = pytest.mark.unpriv

PLUGIN = """
    import os

    def run(code):
        ns = {}
        exec(code, ns)
        return ns.get("result")
"""


@pytest.fixture(scope="module")
def folder():
    """World-readable (workers run under uids of their own), removed afterwards."""
    import pathlib
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="sandbox-test-")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _plugin(folder, policy_text=""):
    import textwrap
    name = f"p{abs(hash(policy_text))}"
    pdir = folder / name
    if not pdir.exists():
        pdir.mkdir(mode=0o755)
        (pdir / "worker.py").write_text(textwrap.dedent(PLUGIN))
        os.chmod(pdir / "worker.py", 0o644)
        (folder / f"{name}.toml").write_text(f'extends = "default"\n{textwrap.dedent(policy_text)}')
    return str(pdir / "worker.py"), str(folder / f"{name}.toml")


@pytest.fixture(scope="module")
def default_worker(folder):
    path, _ = _plugin(folder)
    with sandbox.Worker(path, policy=Policy.default()) as w:
        yield w


def run(worker, code):
    return worker.invoke("run", (code,), timeout=30)


@pytest.mark.parametrize("code,expected", [
    ("import sysconfig; result = sysconfig.get_paths()['stdlib'] != ''", True),
    ("import zoneinfo, datetime; z = zoneinfo.ZoneInfo('Europe/Paris'); "
     "result = datetime.datetime(2024, 7, 1, tzinfo=z).utcoffset().total_seconds()", 7200.0),
    ("import getpass; result = getpass.getuser()", "sandbox"),
    ("import os; result = os.path.expanduser('~')", "/nonexistent"),
    ("import shutil; result = list(shutil.get_terminal_size())", [80, 24]),
    ("import asyncio\nasync def f():\n    await asyncio.sleep(0.01)\n    return 7\nresult = asyncio.run(f())", 7),
    ("import os\nr, w = os.pipe()\nos.write(w, b'x')\nresult = os.read(r, 1).decode()", "x"),
    ("import socket\na, b = socket.socketpair()\na.send(b'hi')\nresult = b.recv(2).decode()", "hi"),
])
def test_standard_library_works_as_outside(default_worker, code, expected):
    assert run(default_worker, code) == expected


def test_alarm_and_setitimer_signal_the_worker_itself(default_worker):
    code = """
import signal, time
hits = []
signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
signal.setitimer(signal.ITIMER_REAL, 0.01)
deadline = time.monotonic() + 5
while not hits and time.monotonic() < deadline:
    time.sleep(0.005)
signal.alarm(0)
result = len(hits)
"""
    assert run(default_worker, code) == 1


def test_limits_can_be_read_and_lowered_never_raised(default_worker):
    code = """
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft - 1, hard - 1))
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    raised = True
except (ValueError, OSError):
    raised = False
result = [soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], raised]
"""
    soft, lowered, raised = run(default_worker, code)
    assert lowered == soft - 1 and raised is False


@pytest.mark.parametrize("code,expected", [
    # OpenBLAS's NUMA placement: EPERM, as Docker answers it
    ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
     "result = [libc.syscall(237, 0, 4096, 0, 0, 0, 0), ctypes.get_errno()]", [-1, errno.EPERM]),
    # the terminal size: no terminal here
    ("import fcntl, termios\ntry:\n    fcntl.ioctl(0, termios.TIOCGWINSZ, b'\\0' * 8)\n    result = 'tty'\n"
     "except OSError as e:\n    result = e.errno", errno.ENOTTY),
    # a write open where nothing is writable: a read-only file system
    ("try:\n    open('/tmp/sandbox-should-not-exist', 'w')\n"
     "except OSError as e:\n    result = e.errno", errno.EROFS),
    ("import os\ntry:\n    os.makedirs('/tmp/sandbox-nope/x')\n"
     "except OSError as e:\n    result = e.errno", errno.EROFS),
    # the user database: glibc's nscd socket refused, the files unreadable -> KeyError, not a kill
    ("import pwd, os\ntry:\n    pwd.getpwuid(os.getuid())\n    result = 'found'\n"
     "except KeyError:\n    result = 'KeyError'",
     "KeyError"),
    # no temporary directory without scratch: tempfile says so
    ("import tempfile\ntry:\n    tempfile.gettempdir()\nexcept FileNotFoundError:\n    result = 'none'", "none"),
])
def test_probes_get_an_errno_not_a_kill(default_worker, code, expected):
    assert run(default_worker, code) == expected
    assert run(default_worker, "result = 1") == 1  # and the worker lives on
    assert not os.path.exists("/tmp/sandbox-should-not-exist") and not os.path.exists("/tmp/sandbox-nope")


def test_environment_without_and_with_scratch(folder, default_worker):
    env = run(default_worker, "import os; result = dict(os.environ)")
    assert env["HOME"] == "/nonexistent" and env["USER"] == env["LOGNAME"] == "sandbox"
    assert env["OPENBLAS_NUM_THREADS"] == env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert "TMPDIR" not in env
    path, policy = _plugin(folder, "[filesystem]\nscratch = true\n[limits]\nfile_size_mb = 1\nthreads = 2\n")
    with sandbox.Worker(path, policy=policy) as w:
        env = run(w, "import os; result = dict(os.environ)")
        assert env["TMPDIR"] == env["HOME"] and os.path.basename(env["HOME"]).startswith("sandbox-")
        assert "OPENBLAS_NUM_THREADS" not in env  # threads granted: the libraries pick their own
        got = run(w, "import tempfile, os\nwith tempfile.NamedTemporaryFile(dir=None) as f:\n"
                     "    f.write(b'x'); f.flush()\n    result = [tempfile.gettempdir(), os.path.dirname(f.name)]")
        assert got == [env["TMPDIR"], env["TMPDIR"]]


def test_threads_granted_and_fork_answered_eperm(folder):
    """'threads yes, fork gets EPERM': the errno covers what the thread rule leaves out."""
    path, policy = _plugin(folder, '[limits]\nthreads = 2\n[seccomp]\nerrno = { clone = "EPERM", vfork = "EPERM" }\n')
    code = """
import os, threading
box = []
t = threading.Thread(target=lambda: box.append(threading.get_ident()))
t.start(); t.join()
try:
    os.fork()
    forked = 'forked'
except PermissionError:
    forked = 'EPERM'
result = [len(box), forked]
"""
    with sandbox.Worker(path, policy=policy) as w:
        assert run(w, code) == [1, "EPERM"]
        assert run(w, "result = 2") == 2


KILL_MODE = '[seccomp]\ndefault_action = "kill"\n'


@pytest.mark.parametrize("mode", ["kill", "deny"])
def test_processes_grant_fork_but_never_a_namespace(folder, mode):
    path, policy = _plugin(folder, "[limits]\nprocesses = 2\n" + (KILL_MODE if mode == "kill" else ""))
    fork = ("import os\npid = os.fork()\nif pid == 0:\n    os._exit(7)\n"
            "result = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])")
    newuser = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "result = [libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0), ctypes.get_errno()]")  # CLONE_NEWUSER
    with sandbox.Worker(path, policy=policy) as w:
        assert run(w, fork) == 7
    with sandbox.Worker(path, policy=policy) as w:
        if mode == "kill":
            with pytest.raises(sandbox.PolicyViolation) as ei:
                run(w, newuser)
            assert ei.value.syscall == "clone"
        else:  # the default's deny mode: no namespace, EPERM, and the host was told
            assert run(w, newuser) == [-1, errno.EPERM]
            assert [n.name for n in w.last_denials] == ["clone"]
    assert Policy.load(policy).may_fork and not Policy.load(policy).may_thread


@pytest.mark.parametrize("mode", ["kill", "deny"])
def test_file_attributes_need_their_own_group(folder, mode):
    chmod = ("import os, tempfile\nfd, p = tempfile.mkstemp()\nos.close(fd)\nos.chmod(p, 0o600)\n"
             "result = oct(os.stat(p).st_mode & 0o777)")
    path, policy = _plugin(folder, "[filesystem]\nscratch = true\n[limits]\nfile_size_mb = 1\n"
                           + (KILL_MODE if mode == "kill" else ""))
    with sandbox.Worker(path, policy=policy) as w:
        if mode == "kill":
            with pytest.raises(sandbox.PolicyViolation) as ei:
                run(w, chmod)
            assert ei.value.syscall in ("chmod", "fchmodat")
        else:
            with pytest.raises(sandbox.PluginError) as ei:
                run(w, chmod)
            assert ei.value.type == "PermissionError"
            assert [n.name for n in w.last_denials] in (["chmod"], ["fchmodat"])
    path, policy = _plugin(folder, '[filesystem]\nscratch = true\n[limits]\nfile_size_mb = 1\n'
                                   '[seccomp]\ngroups = ["@file-attributes"]\n')
    with sandbox.Worker(path, policy=policy) as w:
        assert run(w, chmod) == "0o600"


# Third-party libraries: import and a small real task under the plain default. Pillow, Jinja2 and
# Markdown come with the examples' extras; the others run where they are installed.
LIBRARIES = {
    "PIL": ("from PIL import Image; import io; im = Image.new('RGB', (64, 64), 'red'); im.thumbnail((8, 8)); "
            "b = io.BytesIO(); im.save(b, 'PNG'); result = list(im.size)", [8, 8]),
    "jinja2": ("import jinja2; result = jinja2.Environment().from_string('{{ x * 2 }}').render(x=21)", "42"),
    "markdown": ("import markdown; result = markdown.markdown('# hi *there*')", "<h1>hi <em>there</em></h1>"),
    "numpy": ("import numpy as np; a = np.arange(12.0).reshape(3, 4); result = float((a @ a.T).trace())", 506.0),
    "pandas": ("import pandas as pd; df = pd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'x']}); "
               "result = df.groupby('b').a.sum().to_dict()", {"x": 4, "y": 2}),
    "scipy": ("import scipy.optimize as o; result = round(float(o.minimize_scalar(lambda x: (x - 2) ** 2).x), 4)", 2.0),
    "pydantic": ("from pydantic import BaseModel\nclass M(BaseModel):\n    x: int\nresult = M(x='3').model_dump()",
                 {"x": 3}),
    "lxml": ("from lxml import etree; result = [b.text for b in etree.fromstring('<a><b>1</b><b>2</b></a>')]",
             ["1", "2"]),
    "sympy": ("import sympy as s; x = s.symbols('x'); result = str(s.integrate(x ** 2, x))", "x**3/3"),
    "regex": ("import regex; result = regex.findall(r'\\p{L}+', 'h\u00e9llo w\u00f6rld')",
              ["h\u00e9llo", "w\u00f6rld"]),
    "orjson": ("import orjson; result = orjson.loads(orjson.dumps({'a': [1, 2.5]}))", {"a": [1, 2.5]}),
    "cryptography": ("from cryptography.fernet import Fernet; f = Fernet(Fernet.generate_key()); "
                     "result = f.decrypt(f.encrypt(b'hi')).decode()", "hi"),
}


@pytest.mark.parametrize("module", list(LIBRARIES))
def test_third_party_library_under_the_default(folder, module):
    pytest.importorskip(module)
    code, expected = LIBRARIES[module]
    path, _ = _plugin(folder)
    with sandbox.Worker(path, policy=Policy.default()) as w:  # a fresh worker: each import from scratch
        assert run(w, code) == expected


def test_cpython_suite_quick_subset_completes_and_matches_outside():
    """A few modules of the interpreter's own Lib/test, inside the default (deny mode) and in kill
    mode, and outside: the same tests run and none differs."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests import cpython_suite as cs
    if not cs.stdlib_tests_present():
        pytest.skip("this interpreter ships no Lib/test")
    rows = cs.run(cs.QUICK, modes=("default", "kill"))
    for row in rows:
        for mode in ("default", "kill"):
            inside, outside = row[mode], row["outside"]
            assert "killed" not in inside and "error" not in inside, row
            assert inside["run"] == outside["run"] > 0 and inside["differs"] == [], row


def test_deny_mode_fails_calls_and_still_kills_the_dangerous(folder):
    path, policy = _plugin(folder, '[seccomp]\ndefault_action = "deny"\n')
    sock = "import socket\ntry:\n    socket.socket()\nexcept OSError as e:\n    result = e.errno"
    thread = ("import threading\ntry:\n    threading.Thread(target=print).start()\nexcept RuntimeError as e:\n"
              "    result = str(e)")
    ptrace = "import ctypes\nresult = ctypes.CDLL(None).syscall(101, 16, 1, 0, 0)"  # PTRACE_ATTACH init
    with sandbox.Worker(path, policy=policy) as w:
        assert run(w, sock) == errno.EPERM
        assert run(w, thread) == "can't start new thread"
        with pytest.raises(sandbox.SandboxError) as ei:
            run(w, ptrace)
        assert not isinstance(ei.value, sandbox.PluginError)  # the worker is gone, not answered
