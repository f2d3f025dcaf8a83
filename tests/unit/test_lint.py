"""`sandbox policy lint`: each finding from a policy file written for it."""
import json
import os
import textwrap

import pytest

from sandbox.policy.lint import Finding, lint, main

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "sandbox", "policy", "default.toml")


@pytest.fixture
def write(tmp_path):
    def write(text: str, name: str = "p.toml", extends: str | None = SHIPPED) -> str:
        path = tmp_path / name
        head = f'extends = "{extends}"\n' if extends else ""
        path.write_text(head + textwrap.dedent(text))
        return str(path)
    return write


def keys(findings, level=None):
    return [f.key for f in findings if level is None or f.level == level]


def test_the_shipped_default_is_clean():
    assert lint(SHIPPED) == []
    assert main([SHIPPED]) == 0


def test_dangerous_grant_is_a_warning(write):
    path = write('[seccomp]\nallow = ["ptrace"]\nallow_dangerous = ["ptrace"]\n')
    found = lint(path)
    assert Finding("warning", "seccomp.allow_dangerous",
                   "'ptrace' widens the kernel's attack surface (allowed because it is listed here)") in found
    assert main([path]) == 1


def test_network_and_process_groups_are_warnings(write):
    found = lint(write('[network]\nallow = true\nfamilies = ["inet"]\n[seccomp]\ngroups = ["@process"]\n'))
    assert "network.allow" in keys(found, "warning")
    assert any(f.key == "seccomp.groups" and "@process" in f.message for f in found)


def test_allow_clone_grants_fork(write):
    found = lint(write('[limits]\nprocesses = 4\n[seccomp]\nallow = ["clone"]\n'))
    err = [f for f in found if f.level == "error" and f.key == "seccomp.allow"]
    assert err and "grants fork" in err[0].message


def test_errno_over_an_allow_never_applies(write):
    found = lint(write('[seccomp]\nerrno = { getpid = "EPERM" }\n'))
    assert [f for f in found if f.key == "seccomp.errno.getpid" and f.level == "error"]


def test_errno_over_a_conditional_allow_is_flagged(write):
    found = lint(write('[limits]\nprocesses = 2\n[seccomp]\nerrno = { clone = "EPERM" }\n'))
    assert [f for f in found if f.key == "seccomp.errno.clone" and f.level == "warning"]


def test_errno_on_openat_breaks_imports(write):
    found = lint(write('[seccomp]\nerrno = { openat = "EACCES" }\n'))
    assert any(f.key == "seccomp.errno.openat" and "every import" in f.message for f in found)
    assert main([write('[seccomp]\nerrno = { openat = "EACCES" }\n', name="q.toml")]) == 2


def test_families_without_allow(write):
    found = lint(write('[network]\nfamilies = ["inet"]\n'))
    assert keys(found, "error") == ["network.families"]


def test_default_action_errno_is_deprecated(write):
    found = lint(write('[seccomp]\ndefault_action = "errno"\n'))
    assert any(f.key == "seccomp.default_action" and "deprecated" in f.message for f in found)


def test_missing_paths(write, tmp_path):
    (tmp_path / "data").mkdir()
    found = lint(write('[filesystem]\nread_only = ["data", "nowhere"]\nwritable = ["/no/such/dir"]\n'))
    msgs = [(f.key, f.message) for f in found if f.level == "warning"]
    assert ("filesystem.read_only", f"{tmp_path / 'nowhere'} does not exist") in msgs
    assert ("filesystem.writable", "/no/such/dir does not exist") in msgs
    assert not any("data does not exist" in m for _, m in msgs)


def test_unknown_extends_suggests_a_neighbour(write, tmp_path):
    write("", name="thumbnail.toml")
    found = lint(write("", name="p.toml", extends="thumbnial"))
    assert len(found) == 1 and found[0].level == "error" and found[0].key == "extends"
    assert "did you mean 'thumbnail'?" in found[0].message
    assert "did you mean 'default'?" in lint(write("", name="r.toml", extends="defualt"))[0].message


def test_a_file_that_does_not_load_is_one_error(write, tmp_path):
    found = lint(write('[seccomp]\nallow = ["ptrace"]\n'))  # dangerous without allow_dangerous
    assert [f.level for f in found] == ["error"] and found[0].key == "seccomp.allow"
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits\n")
    assert lint(str(bad))[0].message.startswith("not valid TOML")
    assert lint(str(tmp_path / "absent.toml"))[0].message.startswith("policy file not found")


def test_preload_not_installed(write):
    found = lint(write('[python]\npreload = ["json", "no_such_module_xyz"]\n'))
    assert [f.message for f in found if f.key == "python.preload"] == [
        "'no_such_module_xyz' is not installed for this interpreter"]


def test_json_output(write, capsys):
    path = write('[network]\nfamilies = ["inet"]\n')
    assert main([path, "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["file"] == path
    assert out["findings"][0] == {"level": "error", "key": "network.families",
                                  "message": "families ['inet'] have no effect without network.allow = true"}


def test_a_thread_starting_preload_without_threads(write):
    found = lint(write('[python]\npreload = ["numpy"]\n'))
    assert any(f.key == "python.preload" and "starts a thread pool" in f.message for f in found)
    capped = lint(write('[python]\npreload = ["numpy"]\n[environment]\nset = { OPENBLAS_NUM_THREADS = "1" }\n',
                        name="q.toml"))
    assert not any("thread pool" in f.message for f in capped)
