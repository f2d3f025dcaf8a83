"""Attacks 22-28 of the README's security table: attack the host through the protocol.
Each test names the layer meant to stop the attack."""
import struct
import time

import pytest

from sandbox import PluginError, PluginTimeout, ProtocolViolation
from security.attack_lab import intact, rss_kib

pytestmark = pytest.mark.unpriv


@pytest.mark.parametrize("data", [
    struct.pack("<2sBBIQ", b"SB", 1, 3, 0xFFFFFFFF, 1),        # 22 a 4 GiB header
    b"\x00\xffgarbage" * 3,                                      # 22 random bytes
    struct.pack("<2sBBIQ", b"SB", 1, 6, 4, 0) + b"\xc1\xc1\xc1\xc1",  # 22 valid header, garbage after
    struct.pack("<2sBBIQ", b"SB", 1, 6, 5, 0) + b"\xdd\x3b\x9a\xca\x00",  # 23 array of a billion
    struct.pack("<2sBBIQ", b"SB", 1, 2, 1, 0) + b"\xc0",         # a host-only frame type
])
def test_malformed_frames_kill_the_worker(lab, data):
    """22, 23, 26: the frame decoder's caps; the host's memory does not follow the lie."""
    with intact(lab) as w:
        rss = rss_kib()
        with pytest.raises(ProtocolViolation):
            w.call("write_protocol", data)
        assert rss_kib() - rss < 50 * 1024


def test_deep_nesting_is_refused(lab):
    """23: msgpack's depth limit and our depth walk."""
    with intact(lab) as w:
        with pytest.raises(ProtocolViolation):
            w.call("deep_payload", 100_000)


@pytest.mark.parametrize("call_id_offset", [1, 1000])
def test_reply_with_another_calls_id(lab, call_id_offset):
    """24: one call in flight, ids matched strictly: a reply for another call is a violation."""
    with intact(lab) as w:
        w.call("sys", 39)  # call id 1; call id 2 is the next one
        with pytest.raises(ProtocolViolation):
            w.call("forged_reply", 2 + call_id_offset)


def test_second_reply_is_unsolicited(lab):
    """24: a plugin may lie about its own result, but a second reply to one call is a violation
    (here noticed by the next call; nothing it says can answer that next call)."""
    with intact(lab) as w:
        w.call("sys", 39)
        # Both replies usually arrive in one read: the second is caught as unsolicited within the
        # same call. If the host reads them apart, the next call is in flight when the stale reply
        # lands, and it is refused as a reply for the wrong call. Either way it answers nothing.
        with pytest.raises(ProtocolViolation, match=r"unsolicited reply|reply for call 2 while call 3"):
            w.call("forged_reply", 2)
            w.call("sys", 39)


def test_event_flood_does_not_grow_the_host(lab):
    """24: events are dispatched as read; the pipe gives back-pressure, memory stays flat."""
    with intact(lab) as w:
        got = []
        w.on("message", got.append)
        rss = rss_kib()
        assert w.call("flood_events", 200_000) == 200_000
        assert len(got) == 200_000 and rss_kib() - rss < 50 * 1024


def test_huge_exception_is_capped(lab):
    """28: messages and tracebacks are cut to 64 KiB in the worker."""
    with intact(lab, "[limits]\nmemory_mb = 1024\n") as w:
        with pytest.raises(PluginError) as ei:
            w.call("huge_error", 100)
        assert len(ei.value.message) < 70_000 and "characters cut" in ei.value.message


def test_host_writes_never_block_on_a_worker_that_stopped_reading(lab):
    """27: non-blocking writes under the call's deadline."""
    with intact(lab) as w:
        t = time.monotonic()
        with pytest.raises(PluginTimeout):
            w.invoke("never_read", (b"x" * (12 * 1024 * 1024),), timeout=1)
        assert time.monotonic() - t < 6
