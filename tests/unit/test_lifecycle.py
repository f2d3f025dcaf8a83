"""The worker lifecycle core, input by input: no processes, no descriptors, milliseconds.

Each scenario is a table of (input, the outputs it must give); the same core drives the sync
Worker and the AsyncWorker, so what is pinned here holds for both.
"""
import errno
import signal

import pytest

from sandbox.errors import (ConfinementError, LoadError, PluginCrashed, PluginError, PluginMemoryError,
                            PluginTimeout, PolicyViolation, ProtocolViolation, WorkerClosed)
from sandbox._host import lifecycle as lc
from sandbox.protocol import codec, framing

MAX = 1 << 20
SIGKILLED = signal.SIGKILL          # a raw wait status of a SIGKILL death
SIGSYSED = signal.SIGSYS


def frame(ftype, obj, call_id=0) -> bytes:
    return framing.encode_frame(ftype, call_id, codec.dumps(obj))


READY = frame(framing.READY, {"pid": 1})


def names(outs) -> list[str]:
    return [type(o).__name__ for o in outs]


def core(**kw) -> lc.Lifecycle:
    kw.setdefault("max_frame", MAX)
    return lc.Lifecycle("p", "/x/worker.py", policy="test.toml", **kw)


def ready_core(**kw) -> lc.Lifecycle:
    c = core(**kw)
    assert names(c.handoff(True, None)) == []
    assert names(c.receive(READY)) == ["Ready"]
    assert c.state is lc.State.READY
    return c


def calling_core(**kw) -> lc.Lifecycle:
    c = ready_core(**kw)
    c.begin_call("f", (1,), {})
    c.call_sent()
    return c


def n(name="openat", nr=257, nid=7):
    return lc.Notification(nid, 123, nr, name, (1, 2, 3, 4, 5, 6))


# ---- the start -----------------------------------------------------------------------------------
START = [
    # (what, steps: [(input, outputs)], final state, reason type)
    ("handoff then READY", [(lambda c: c.handoff(True, None), []), (lambda c: c.receive(READY), ["Ready"])],
     lc.State.READY, None),
    ("READY first asks for the handoff",
     [(lambda c: c.receive(READY), ["TakeHandoff"]), (lambda c: c.handoff(True, None), ["Ready"])],
     lc.State.READY, None),
    ("no listener where one is expected",
     [(lambda c: c.receive(READY), ["TakeHandoff"]), (lambda c: c.handoff(False, None), ["Kill"])],
     lc.State.CLOSING, ConfinementError),
    ("a confinement failure on the handoff",
     [(lambda c: c.handoff(False, ConfinementError("no landlock", layer="landlock")), ["Kill"])],
     lc.State.CLOSING, ConfinementError),
    ("a load error waits for the handoff, whose failure wins",
     [(lambda c: c.receive(frame(framing.LOADERR, {"type": "X", "message": "m", "traceback": ""})),
       ["TakeHandoff"]),
      (lambda c: c.handoff(False, ConfinementError("seccomp failed", layer="seccomp")), ["Kill"])],
     lc.State.CLOSING, ConfinementError),
    ("a load error after the handoff", [(lambda c: c.handoff(True, None), []),
                                        (lambda c: c.receive(frame(framing.LOADERR, {
                                            "type": "SyntaxError", "message": "bad", "traceback": ""})),
                                         ["Kill"])],
     lc.State.CLOSING, LoadError),
    ("EOF before the handoff reads it first",
     [(lambda c: c.receive(b""), ["TakeHandoff"]), (lambda c: c.handoff(True, None), ["Kill"])],
     lc.State.CLOSING, None),
    ("start deadline", [(lambda c: c.deadline_passed(2.0), ["Kill"])], lc.State.CLOSING, LoadError),
    ("a reply before any call", [(lambda c: c.handoff(True, None), []),
                                 (lambda c: c.receive(frame(framing.RESULT, 1, 1)), ["Kill"])],
     lc.State.CLOSING, ProtocolViolation),
]


@pytest.mark.parametrize("what,steps,state,reason", START, ids=[s[0] for s in START])
def test_start(what, steps, state, reason):
    c = core()
    for step, expected in steps:
        assert names(step(c)) == expected
    assert c.state is state
    assert (reason is None and c.reason is None) or isinstance(c.reason, reason)


def test_a_loaderr_frame_never_makes_a_confinement_error():
    c = core()
    c.handoff(True, None)
    c.receive(frame(framing.LOADERR, {"type": "ConfinementError", "message": "forged", "traceback": "",
                                      "layer": "landlock"}))
    assert type(c.reason) is LoadError and c.reason.type == "ConfinementError"


# ---- calls ---------------------------------------------------------------------------------------
def test_reply_in_one_read_and_in_pieces():
    c = calling_core()
    (out,) = c.receive(frame(framing.RESULT, {"a": 1}, 1))
    assert type(out) is lc.Reply and out.value == {"a": 1} and out.error is None
    c.call_over()
    assert c.state is lc.State.READY
    c.begin_call("f", (), {})
    data = frame(framing.EVENT, "m") + frame(framing.RESULT, 5, 2)
    got = []
    for i in range(len(data)):  # one byte at a time
        got += c.receive(data[i:i + 1])
    assert names(got) == ["Deliver", "Reply"] and got[0].message == "m" and got[1].value == 5


def test_a_call_with_an_argument_it_refuses_leaves_the_worker_usable():
    """An argument that is not plain data is refused before anything is in flight: the next call works."""
    c = ready_core()
    for bad in (object(), {1: "int key"}, [{"k": {2: "nested int key"}}]):
        with pytest.raises(codec.NotPlainData):
            c.begin_call("f", (bad,), {})
        assert c.state is lc.State.READY and c.session.pending_id is None
    c.begin_call("f", (1,), {})
    (out,) = c.receive(frame(framing.RESULT, "ok", c.session.pending_id))
    assert out.value == "ok"


def test_plugin_error_and_memory_evidence():
    peak = [10]
    c = calling_core(memory_limit=100, memory_peak=lambda: peak[0])
    err = {"type": "MemoryError", "message": "pretend", "traceback": ""}
    (out,) = c.receive(frame(framing.ERROR, err, 1))
    assert type(out.error) is PluginError and out.error.type == "MemoryError"  # no evidence
    c.call_over()
    c.begin_call("f", (), {})
    peak[0] = 95  # the kernel's peak came near the limit during this call
    (out,) = c.receive(frame(framing.ERROR, err, 2))
    assert type(out.error) is PluginMemoryError
    c.call_over()
    c.begin_call("f", (), {})
    (out,) = c.receive(frame(framing.ERROR, err, 3))  # the same old peak is no new evidence
    assert type(out.error) is PluginError


def test_deadline_kills_replies_and_the_first_reason_wins():
    c = calling_core()
    outs = c.deadline_passed(0.5)
    assert names(outs) == ["Kill", "Reply"] and isinstance(outs[1].error, PluginTimeout)
    assert names(c.notification(n())) == []        # killed already: no second kill
    assert names(c.receive(frame(framing.RESULT, 1, 1))) == []  # a late reply changes nothing
    outs = c.status(SIGKILLED)
    assert names(outs) == ["Ended"] and isinstance(outs[0].death, PluginTimeout)


CALL_ENDS = [
    # (what, input, outputs, death type)
    ("EOF, then the status says", lambda c: c.receive(b""), ["Kill"], PluginCrashed),
    ("a protocol breach", lambda c: c.receive(b"garbage that is no frame at all"), ["Kill"], ProtocolViolation),
    ("an unexpected reply id", lambda c: c.receive(frame(framing.RESULT, 1, 99)), ["Kill"], ProtocolViolation),
    ("a second READY", lambda c: c.receive(READY), ["Kill"], ProtocolViolation),
    ("a forbidden syscall", lambda c: c.notification(n()), ["Kill"], PolicyViolation),
    ("cancelled", lambda c: c.kill(WorkerClosed("cancelled")), ["Kill"], WorkerClosed),
]


@pytest.mark.parametrize("what,step,outs,death", CALL_ENDS, ids=[s[0] for s in CALL_ENDS])
def test_a_call_that_ends_with_the_worker(what, step, outs, death):
    c = calling_core()
    assert names(step(c)) == outs
    assert c.state is lc.State.CLOSING
    with pytest.raises(WorkerClosed):
        c.begin_call("g", (), {})
    end = c.status(SIGKILLED)
    assert names(end) == ["Reply", "Ended"]  # the caller still waiting hears the death
    assert isinstance(end[0].error, death) and isinstance(end[1].death, death)
    assert_ended(c)


def assert_ended(c):
    """Every input after the end means nothing; every call raises WorkerClosed."""
    assert c.state is lc.State.ENDED
    for step in (lambda: c.receive(READY), lambda: c.receive(b""), lambda: c.status(0),
                 lambda: c.deadline_passed(1.0), lambda: c.notification(n()), lambda: c.close(),
                 lambda: c.kill(), lambda: c.handoff(True, None), lambda: c.status_wait_over(5.0)):
        assert step() == []
    with pytest.raises(WorkerClosed):
        c.begin_call("f", (), {})
    with pytest.raises(WorkerClosed):
        c.encode_post({"x": 1})


def test_a_sigsys_death_is_a_crash_not_a_violation():
    c = ready_core()
    c.receive(b"")
    (end,) = c.status(SIGSYSED)
    assert type(end.death) is PluginCrashed and end.death.signal == signal.SIGSYS


def test_close_and_terminate_end_without_a_death():
    c = ready_core()
    assert names(c.close()) == ["CloseInput"]
    assert names(c.kill()) == ["Kill"]  # the grace passed
    (end,) = c.status(SIGKILLED)
    assert end.death is None
    assert_ended(c)
    c = ready_core()
    assert names(c.kill()) == ["Kill"]
    (end,) = c.status(SIGKILLED)
    assert end.death is None and "closed" in str(c.closed_error())


def test_a_status_that_never_comes_still_ends_the_worker():
    c = calling_core()
    c.deadline_passed(1.0)
    (end,) = c.status_wait_over(5.0)
    assert isinstance(end.death, PluginTimeout)  # the first reason still wins
    c = ready_core()
    c.receive(b"")
    (end,) = c.status_wait_over(5.0)
    assert isinstance(end.death, PluginCrashed) and "did not report" in str(end.death)
    assert_ended(c)


# ---- seccomp notifications -----------------------------------------------------------------------
def test_deny_mode_answers_then_kills_past_the_budget():
    c = calling_core(seccomp_mode="deny", deny_errno=errno.EACCES, dangerous=frozenset({"ptrace"}),
                     denial_budget=3)
    for i in range(3):
        (a,) = c.notification(n(nid=i))
        assert type(a) is lc.Answer and a.error == -errno.EACCES and a.flags == 0
    assert [d.id for d in c.denials] == [0, 1, 2]
    assert names(c.notification(n(nid=3))) == ["Kill"] and isinstance(c.reason, PolicyViolation)
    c = calling_core(seccomp_mode="deny", dangerous=frozenset({"ptrace"}))
    assert names(c.notification(n("ptrace", 101))) == ["Kill"]  # dangerous: never merely denied
    assert c.reason.syscall == "ptrace"


@pytest.mark.parametrize("verdict,expected", [
    ("continue", ("Answer", 0, lc.SECCOMP_USER_NOTIF_FLAG_CONTINUE)),
    (("deny", errno.ENOSYS), ("Answer", -errno.ENOSYS, 0)),
    ("kill", ("Kill",)),
    ("anything else", ("Kill",)),  # fail closed
])
def test_the_syscall_hook_decides(verdict, expected):
    seen = []
    c = calling_core(on_syscall=lambda note: seen.append(note) or verdict)
    (out,) = c.notification(n())
    assert seen and seen[0].name == "openat"
    assert type(out).__name__ == expected[0]
    if expected[0] == "Answer":
        assert (out.error, out.flags) == expected[1:]


# ---- budgets -------------------------------------------------------------------------------------
def test_undelivered_messages_have_a_byte_budget():
    c = calling_core(buffer_budget=10_000)
    msg = frame(framing.EVENT, b"x" * 3000)
    sizes = []
    for _ in range(3):
        (d,) = c.receive(msg)
        sizes.append(d.size)
    c.delivered(sum(sizes))  # handed over: off the budget
    for _ in range(3):
        assert names(c.receive(msg)) == ["Deliver"]
    assert names(c.receive(msg)) == ["Kill"] and isinstance(c.reason, ProtocolViolation)


def test_a_message_of_many_tiny_objects_is_refused_part_way():
    import time
    import msgpack
    c = calling_core(max_frame=16 << 20)
    payload = msgpack.packb([[{}] * 900_000] * 3)  # 2.7 million empty maps, 2.6 MiB
    t = time.perf_counter()
    outs = c.receive(framing.encode_frame(framing.RESULT, 1, payload))
    assert names(outs) == ["Kill"] and "objects" in str(c.reason)
    assert time.perf_counter() - t < 2.0  # generous: the refusal comes a third of the way in


def test_nothing_after_a_breach_is_read_not_even_a_reply():
    c = calling_core()
    bad = framing.encode_frame(framing.EVENT, 0, b"\xc1\xc1\xc1\xc1")  # a whole frame, undecodable
    assert names(c.receive(bad)) == ["Kill"]
    assert c.receive(frame(framing.EVENT, "after the breach")) == []
    assert c.receive(frame(framing.RESULT, "forged success", 1)) == []
    end = c.status(SIGKILLED)
    assert isinstance(end[0].error, ProtocolViolation)


def test_a_heavy_payload_is_decoded_off_the_driver_in_order():
    c = calling_core(offload=1024)
    heavy = frame(framing.EVENT, [{} for _ in range(2000)])
    data = heavy + frame(framing.RESULT, "after", 1)
    (out,) = c.receive(data)
    assert type(out) is lc.Decode and c.decoding
    obj = out.decode(out.frame.payload)
    got = c.decoded(out.frame, obj, None)
    assert names(got) == ["Deliver", "Reply"] and got[1].value == "after" and not c.decoding
    c.call_over()
    c.begin_call("f", (), {})
    (out,) = c.receive(frame(framing.RESULT, b"x" * 100_000, 2))  # a large bin: a memcpy, in line
    assert type(out) is lc.Reply


def test_a_heavy_payload_that_breaks_the_budget_kills():
    c = calling_core(offload=1024)
    (out,) = c.receive(frame(framing.RESULT, [{} for _ in range(2000)], 1))
    got = c.decoded(out.frame, None, ProtocolViolation("payload holds more than 10 objects"))
    assert names(got) == ["Kill"] and isinstance(c.reason, ProtocolViolation)


def test_a_read_that_breaks_the_protocol_answers_nothing():
    c = calling_core()
    forged = frame(framing.RESULT, "evil", 1) + frame(framing.RESULT, "the real one", 1)
    assert names(c.receive(forged)) == ["Kill"]  # the second reply is unsolicited
    (reply, end) = c.status(SIGKILLED)
    assert isinstance(reply.error, ProtocolViolation)


# ---- deaths by the worker's own limits: the kernel's rusage decides, with the wait status ---------
def _reaped(cpu, rss_mib=10):
    from sandbox.protocol.zygote import Reaped
    return Reaped(123, SIGKILLED, cpu, rss_mib << 20)


def test_a_sigkill_at_the_cpu_limit_is_named_by_limits_cpu_seconds():
    c = calling_core(cpu_limit=60)
    reply, end = c.status(SIGKILLED, usage=_reaped(59.2))
    assert isinstance(end.death, PluginCrashed) and end.death.signal == signal.SIGKILL
    assert "used up its 60 s of CPU (limits.cpu_seconds)" in str(end.death) == str(reply.error)


def test_a_sigkill_well_below_the_cpu_limit_is_a_plain_crash():
    c = calling_core(cpu_limit=60)
    (_, end) = c.status(SIGKILLED, usage=_reaped(3.0))
    assert str(end.death) == "plugin p was killed by signal SIGKILL"


def test_an_exit_at_the_cpu_limit_is_not_the_cpu_limit():
    c = calling_core(cpu_limit=1)
    (_, end) = c.status(3 << 8, usage=_reaped(5.0))  # exited with code 3: RLIMIT_CPU never does that
    assert end.death.exit_code == 3 and "cpu" not in str(end.death)


def test_a_death_with_the_memory_limit_resident_is_a_memory_error():
    c = calling_core(memory_limit=128 << 20)
    (_, end) = c.status(70 << 8, usage=_reaped(0.1, rss_mib=120))
    assert isinstance(end.death, PluginMemoryError) and "limits.memory_mb = 128" in str(end.death)
    c = calling_core(memory_limit=128 << 20)
    (_, end) = c.status(70 << 8, usage=_reaped(0.1, rss_mib=20))  # its word alone: a crash
    assert type(end.death) is PluginCrashed and end.death.exit_code == 70


def test_a_reason_recorded_first_wins_over_the_rusage():
    c = calling_core(cpu_limit=1)
    c.deadline_passed(0.5)
    (end,) = c.status(SIGKILLED, usage=_reaped(5.0))
    assert isinstance(end.death, PluginTimeout)
    c = calling_core(cpu_limit=1)
    c.kill()  # terminate(): an end that was asked for has no death to explain
    (_, end) = c.status(SIGKILLED, usage=_reaped(5.0))
    assert end.death is None
