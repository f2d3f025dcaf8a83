"""A granted path never leads through a link a worker made (sandbox/child/grant_paths.py).

Policy `writer` may write a folder; policy `reader` grants a path inside it. A writer's worker
swaps that path for a symlink to a secret folder that no policy grants. Had the host (its
Landlock ruleset) or the privileged child (its bind mounts, its own ruleset) followed the link,
the next reader worker would get the secret folder. Instead it does not start, and the error
names the link. Every variant: a read grant and a write grant, the host's shared ruleset, the
child's own (scratch) and the minimal view (unix family).
"""
import os
import secrets
import shutil
import tempfile

import pytest

import sandbox
from sandbox import SandboxError
from helpers import IS_ROOT

pytestmark = pytest.mark.unpriv

WRITER = """
import os

def plant(link, target):
    os.mkdir(link + ".tmp")
    os.rmdir(link + ".tmp")  # (a worker may make and remove folders here: it may write it)
    if os.path.islink(link) or os.path.exists(link):
        os.rename(link, link + ".old")
    os.symlink(target, link)
    return os.readlink(link)
"""

READER = """
import os

def look(path):
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return e.errno
"""

VARIANTS = {
    "read grant, host ruleset": ("read_only", ""),
    "write grant, host ruleset": ("writable", ""),
    "read grant, the child's own ruleset (scratch)": ("read_only", "scratch = true\n"),
    "write grant, the child's bind mount (scratch)": ("writable", "scratch = true\n"),
    "read grant, the minimal view (unix family)": ("read_only", None),
}


@pytest.fixture
def secret_dir():
    d = tempfile.mkdtemp(prefix="sandbox-secret-")
    os.chmod(d, 0o755)
    token = f"s3cret-{secrets.token_hex(8)}"
    with open(os.path.join(d, token), "w") as f:
        f.write(token)
    yield d, token
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shared(plugin_dir):
    out = os.path.join(plugin_dir, "shared-out")
    os.makedirs(os.path.join(out, "ref"))
    with open(os.path.join(out, "ref", "fine.txt"), "w") as f:
        f.write("ok")
    # the writer's workers must be able to write it: world-writable on a root host (each worker
    # has a uid of its own), the host's own folder on an unprivileged one
    for path in (out, os.path.join(out, "ref")):
        os.chmod(path, 0o777 if IS_ROOT else 0o755)
    return out


def _policies(make_plugin, out, kind, extra):
    writer = make_plugin(WRITER, f'[filesystem]\nwritable = ["{out}"]\n', name="writer")
    if extra is None:  # the unix family: the worker's root is the minimal view of its grants
        section = f'[filesystem]\n{kind} = ["{out}/ref"]\n[network]\nallow = true\nfamilies = ["unix"]\n'
    else:
        section = f'[filesystem]\n{kind} = ["{out}/ref"]\n{extra}'
    reader = make_plugin(READER, section, name="reader")
    return writer, reader


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_grant_through_a_link_a_worker_planted_is_refused(variant, make_plugin, shared, secret_dir):
    kind, extra = VARIANTS[variant]
    secret, token = secret_dir
    (w_path, w_policy), (r_path, r_policy) = _policies(make_plugin, shared, kind, extra)
    # (no reader before the link: the host would cache the ruleset it built then, whose rule
    # names the folder's inode, not the path: the link would be harmless, and untested)
    with sandbox.Worker(w_path, policy=w_policy) as writer:
        assert writer.call("plant", f"{shared}/ref", secret) == secret
    assert os.path.islink(f"{shared}/ref")
    with pytest.raises(SandboxError) as e:
        with sandbox.Worker(r_path, policy=r_policy) as reader:
            seen = reader.call("look", f"{shared}/ref")
            pytest.fail(f"the reader started and saw {seen!r} (the secret is {token})")
    message = str(e.value)
    assert "not following the symlink" in message and f"{shared}/ref" in message, message
    assert token not in message


def test_the_same_link_in_a_folder_no_worker_writes_is_followed(make_plugin, plugin_dir, secret_dir):
    """The control: an operator's own link (a folder only its owner writes, no write grant
    around it) is followed as before."""
    secret, token = secret_dir
    mine = os.path.join(plugin_dir, "operators")
    os.makedirs(mine)
    os.chmod(mine, 0o755)
    os.symlink(secret, os.path.join(mine, "ref"))
    path, policy = make_plugin(READER, f'[filesystem]\nread_only = ["{mine}/ref"]\n', name="reader2")
    with sandbox.Worker(path, policy=policy) as w:
        assert w.call("look", f"{mine}/ref") == [token]
