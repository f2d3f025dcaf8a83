"""The typed plan and the spawn messages, as pure data: what the child accepts and refuses."""
import os

import pytest

from sandbox.policy import Policy
from sandbox.protocol import plan as wire
from sandbox.protocol import zygote as spawn
from sandbox._host import plan as plans
from sandbox.errors import PolicyError


def _plan(**change):
    base = plans.build(Policy.default(), "/srv/plugins/p/worker.py", "p", 201234, None)
    fields = {f: getattr(base, f) for f in wire.Plan.FIELDS}
    fields.update(change)
    return wire.Plan(**fields)


def test_a_plan_survives_the_wire_field_by_field():
    plan = _plan()
    back = wire.decode(wire.encode(plan))
    assert back == plan
    assert back.landlock.read == plan.landlock.read and isinstance(back.landlock.read, tuple)
    assert back.title == "sandbox: p (policy default)"


def test_a_plan_is_frozen_and_its_repr_shows_no_values():
    plan = _plan(env={"API_TOKEN": "hunter2"})
    with pytest.raises(AttributeError):
        plan.uid = 0
    assert "hunter2" not in repr(plan)


@pytest.mark.parametrize("change", [
    {"uid": "201234"}, {"notify": 1}, {"env": {"K": 1}}, {"env": {"A=B": "x"}},
    {"plugin": "/a\0b"}, {"preload": ["json"]}, {"max_frame": 1.5}, {"bpf": "text"},
])
def test_a_field_of_the_wrong_type_is_refused(change):
    with pytest.raises(wire.PlanError):
        _plan(**change)


def test_missing_or_unknown_fields_are_refused_by_the_child():
    d = _plan().to_wire()
    with pytest.raises(wire.PlanError, match="missing"):
        wire.Plan.from_wire({k: v for k, v in d.items() if k != "bpf"})
    with pytest.raises(wire.PlanError, match="unknown"):
        wire.Plan.from_wire({**d, "extra": 1})
    with pytest.raises(wire.PlanError):
        wire.decode(b"\xc1")


def test_the_host_names_the_policy_key_of_a_nul_byte(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[filesystem]\nread_only = ["/tmp/a\\u0000b"]\n')
    with pytest.raises(PolicyError) as ei:
        plans.build(Policy.load(str(path)), "/srv/p/worker.py", "p", None, None)
    assert ei.value.key == "filesystem.read_only"


@pytest.mark.parametrize("data", [b"\x92\x00\xc3", b"\x92\xc0\x01", b"\x91\xc0", b"\x80", b"\xc1",
                                  b"\x92\xce\xff\xff\xff\xff\xc3"])
def test_a_malformed_spawn_request_is_a_value_error(data):
    with pytest.raises(ValueError):
        spawn.decode_request(data)


def test_a_spawn_request_round_trips():
    for req in (spawn.SpawnRequest(None, False), spawn.SpawnRequest(201234, True)):
        assert spawn.decode_request(spawn.encode_request(req)) == req


def test_replies():
    assert spawn.decode_reply(spawn.encode_reply(pid=42)) == (42, None)
    assert spawn.decode_reply(spawn.encode_reply(error="no")) == (None, "no")
    pid, error = spawn.decode_reply(b"\xc1")
    assert pid is None and error


def test_the_plan_frame_is_read_exactly_and_no_further():
    r, w = os.pipe()
    try:
        os.write(w, spawn.plan_frame(b"PLAN") + b"NEXT")
        assert spawn.read_plan_frame(r) == b"PLAN"
        assert os.read(r, 4) == b"NEXT"  # the host's first call stays for the serve loop
        os.write(w, b"XXXX" + b"\0" * 4)
        with pytest.raises(ValueError):
            spawn.read_plan_frame(r)
        os.write(w, spawn.PLAN_HEADER.pack(spawn.PLAN_MAGIC, spawn.MAX_PLAN + 1))
        with pytest.raises(ValueError):
            spawn.read_plan_frame(r)
    finally:
        os.close(w)
    with pytest.raises(EOFError):
        spawn.read_plan_frame(r)
    os.close(r)


def test_one_descriptor_set_for_host_zygote_and_child():
    from sandbox.child import steps
    assert spawn.SpawnFds._fields == ("from_host", "to_host", "handoff", "log", "status")
    assert (steps.FROM_HOST, steps.TO_HOST, steps.HANDOFF) == (spawn.FROM_HOST, spawn.TO_HOST, spawn.HANDOFF)


def test_the_status_record_carries_the_kernels_rusage():
    import resource

    from sandbox.protocol.zygote import STATUS, decode_status, encode_status
    usage = resource.getrusage(resource.RUSAGE_SELF)
    data = encode_status(42, 9, usage)
    assert len(data) == STATUS.size
    got = decode_status(data)
    assert (got.pid, got.raw) == (42, 9)
    assert abs(got.cpu_seconds - (usage.ru_utime + usage.ru_stime)) < 1e-5
    assert got.max_rss == usage.ru_maxrss * 1024
    assert decode_status(data[:-1]) is None and decode_status(b"") is None  # a torn record: none
