"""Reads made on a plugin's behalf before its worker is confined never follow the plugin's
symlinks, read only regular files, and read with no more rights than the worker will have.

A link in the plugin's folder could point anywhere: at /etc/shadow for a root host, at the
host user's credentials for an unprivileged one (files Landlock would refuse the worker). Had
the still-privileged child followed it, a syntax error would quote the file's first line back
to the host, its CLI and its logs."""
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import sandbox
from sandbox import LoadError
from helpers import DEFAULT_POLICY, IS_ROOT, ROOT

pytestmark = pytest.mark.unpriv


@pytest.fixture
def secret_file():
    """A file outside any plugin folder whose first line, if read, a syntax error would quote.
    Readable by anyone: only the refusal to follow the link keeps it out (Landlock would refuse
    the worker itself, since the file is outside its read paths)."""
    d = tempfile.mkdtemp(prefix="sandbox-secret-")
    os.chmod(d, 0o755)
    token = f"s3cret-{secrets.token_hex(12)}"
    path = os.path.join(d, "credentials")
    with open(path, "w") as f:
        f.write(f"aws_secret = = \"{token}\"\n")  # a SyntaxError quotes this line
    os.chmod(path, 0o644)
    yield path, token
    shutil.rmtree(d, ignore_errors=True)


def _assert_silent(err: LoadError, token: str) -> None:
    for text in (str(err), err.message, err.traceback, json.dumps(err.to_dict())):
        assert token not in text


def _cli(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandbox", "call", path, "f", "--policy", DEFAULT_POLICY],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_worker_py_symlinked_to_a_secret_is_refused(plugin_dir, secret_file):
    target, token = secret_file
    folder = os.path.join(plugin_dir, "linked")
    os.makedirs(folder, mode=0o755)
    path = os.path.join(folder, "worker.py")
    os.symlink(target, path)
    with pytest.raises(LoadError) as ei:
        sandbox.Worker(path)
    assert "symbolic link" in str(ei.value)
    _assert_silent(ei.value, token)
    out = _cli(path)
    assert out.returncode != 0
    assert token not in out.stdout and token not in out.stderr
    assert json.loads(out.stderr.strip().splitlines()[-1])["error"] == "load-error"


def test_a_symlinked_plugin_folder_is_refused(plugin_dir, secret_file):
    target, token = secret_file
    shutil.copy(target, os.path.join(os.path.dirname(target), "worker.py"))
    os.chmod(os.path.join(os.path.dirname(target), "worker.py"), 0o644)
    folder = os.path.join(plugin_dir, "linked_dir")
    os.symlink(os.path.dirname(target), folder)
    path = os.path.join(folder, "worker.py")
    with pytest.raises(LoadError) as ei:
        sandbox.Worker(path)
    assert "symbolic link" in str(ei.value)
    _assert_silent(ei.value, token)
    out = _cli(path)
    assert token not in out.stdout and token not in out.stderr


def test_the_operators_path_to_the_folder_may_hold_links(plugin_dir):
    """Only the plugin's own folder and file must be real: a link above them is the operator's."""
    real = os.path.join(plugin_dir, "real")
    os.makedirs(os.path.join(real, "plug"), mode=0o755)
    os.chmod(real, 0o755)
    with open(os.path.join(real, "plug", "worker.py"), "w") as f:
        f.write("def f():\n    return 7\n")
    os.chmod(os.path.join(real, "plug", "worker.py"), 0o644)
    os.symlink(real, os.path.join(plugin_dir, "via_link"))
    with sandbox.Worker(os.path.join(plugin_dir, "via_link", "plug", "worker.py")) as w:
        assert w.call("f") == 7


def test_worker_py_that_is_a_fifo_is_refused_without_hanging(plugin_dir):
    """A FIFO would block a plain open() for ever (the host refuses it first; the child's
    open is non-blocking and checks the type on the descriptor it read from)."""
    folder = os.path.join(plugin_dir, "fifo")
    os.makedirs(folder, mode=0o755)
    path = os.path.join(folder, "worker.py")
    os.mkfifo(path, 0o644)
    start = time.monotonic()
    with pytest.raises(LoadError, match="not a regular file|not found"):
        sandbox.Worker(path, start_timeout=20)
    assert time.monotonic() - start < 15


@pytest.mark.skipif(not IS_ROOT, reason="root mode: the worker has a uid of its own")
def test_root_reads_with_the_workers_rights(plugin_dir):
    """A root-only worker.py (0600) is refused: the worker's uid could not read it, so neither
    may the still-privileged child on its behalf; its content stays unread."""
    token = f"rootonly-{secrets.token_hex(12)}"
    folder = os.path.join(plugin_dir, "private")
    os.makedirs(folder, mode=0o755)
    path = os.path.join(folder, "worker.py")
    with open(path, "w") as f:
        f.write(f"{token} = = not python\n")
    os.chmod(path, 0o600)
    with pytest.raises(LoadError) as ei:
        sandbox.Worker(path)
    assert "may not read" in str(ei.value)
    _assert_silent(ei.value, token)
