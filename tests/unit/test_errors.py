"""Every SandboxError survives pickle (ProcessPoolExecutor, multiprocessing, Ray) and JSON
(to_dict / from_dict, e.g. through a Celery result backend) as the same class, with its message
and every attribute."""
import json
import pickle

import pytest

from sandbox import errors

SAMPLES = {
    "PluginError": errors.PluginError("ValueError", "bad", "Traceback ..."),
    "LoadError": errors.LoadError("SyntaxError", "could not load", "tb"),
    "PluginTimeout": errors.PluginTimeout("too slow", timeout=2.5),
    "PolicyViolation": errors.PolicyViolation("forbidden", syscall="socket", args=(2, 1, 0), plugin="p",
                                              policy="/x.toml", grant="network.allow"),
    "PluginCrashed": errors.PluginCrashed("died", exit_code=None, signal=9),
    "PolicyError": errors.PolicyError("must be a number", "/x.toml", "limits.timeout"),
    "ConfinementError": errors.ConfinementError("no Landlock", layer="landlock"),
    "HostResourceError": errors.HostResourceError("out of fds", resource="file descriptors"),
}


def _every_class():
    return sorted(errors._CLASSES.values(), key=lambda c: c.__name__)


def _sample(cls):
    return SAMPLES.get(cls.__name__) or cls(f"a {cls.__name__}")


def _same(a, b):
    assert type(a) is type(b)
    assert str(a) == str(b)
    for name in type(a)._fields:
        assert getattr(a, name) == getattr(b, name), name
    assert a.kind == b.kind


@pytest.mark.parametrize("cls", _every_class(), ids=lambda c: c.__name__)
def test_pickle_round_trip(cls):
    err = _sample(cls)
    _same(err, pickle.loads(pickle.dumps(err)))


@pytest.mark.parametrize("cls", _every_class(), ids=lambda c: c.__name__)
def test_json_round_trip(cls):
    err = _sample(cls)
    _same(err, errors.SandboxError.from_dict(json.loads(json.dumps(err.to_dict()))))


def test_every_class_is_covered_with_its_fields():
    """A new class with fields needs a sample here, or its fields go untested."""
    missing = [c.__name__ for c in _every_class() if c._fields and c.__name__ not in SAMPLES
               and c.__name__ not in ("PluginMemoryError",)]
    assert missing == []


def test_an_unknown_class_comes_back_as_its_kind_or_the_base():
    back = errors.SandboxError.from_dict({"class": "Nope", "kind": "timeout", "message": "m", "timeout": 1})
    assert type(back) is errors.PluginTimeout and back.timeout == 1
    assert type(errors.SandboxError.from_dict({"message": "m"})) is errors.SandboxError
