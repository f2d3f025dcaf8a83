"""The spawn request's preload set (the warm template's key) and the reply's template state."""
import pytest

from sandbox.protocol import zygote as spawn


def test_a_request_with_a_preload_set_round_trips():
    req = spawn.SpawnRequest(201234, False, ("json", "PIL.Image", "sandbox.child.canary_template"))
    assert spawn.decode_request(spawn.encode_request(req)) == req
    assert spawn.decode_request(spawn.encode_request(spawn.SpawnRequest(None, True))).preload == ()


@pytest.mark.parametrize("preload", [["a..b"], [".rel"], ["x y"], ["é"], ["a" * 129], ["1abc"], [""]])
def test_what_is_not_a_module_name_gets_no_template(preload):
    assert spawn.template_key(preload) == ()


def test_a_preload_set_over_the_limits_gets_no_template_and_fits_a_request():
    assert spawn.template_key([f"m{i}" for i in range(spawn.MAX_PRELOAD + 1)]) == ()
    biggest = tuple(f"m{i:03d}" + "x" * (spawn.MAX_MODULE_NAME - 4) for i in range(spawn.MAX_PRELOAD))
    assert spawn.template_key(biggest) == biggest
    data = spawn.encode_request(spawn.SpawnRequest(2**32 - 2, True, biggest))
    assert len(data) <= spawn.MAX_REQUEST
    assert spawn.decode_request(data).preload == biggest


@pytest.mark.parametrize("obj", [
    [None, False, []],                  # an empty set is sent as no set
    [None, False, "json"],              # not a list
    [None, False, ["json", 1]],         # not a name
    [None, False, ["os.path", "../x"]],
    [None, False, ["m"] * (spawn.MAX_PRELOAD + 1)],
    [None, False, ["x" * (spawn.MAX_MODULE_NAME + 1)]],
])
def test_a_malformed_preload_set_is_a_value_error(obj):
    import msgpack
    with pytest.raises(ValueError):
        spawn.decode_request(msgpack.packb(obj))


def test_the_reply_says_how_the_worker_was_forked():
    assert spawn.decode_spawn_reply(spawn.encode_reply(7, template=spawn.WARM)) == (7, None, "warm")
    assert spawn.decode_spawn_reply(spawn.encode_reply(7)) == (7, None, "cold")
    assert spawn.decode_spawn_reply(spawn.encode_reply(7, template="refused: a thread")).template == "refused: a thread"
    assert spawn.decode_spawn_reply(spawn.encode_reply(error="no")) == (None, "no", "cold")
    assert spawn.decode_reply(spawn.encode_reply(7, template=spawn.WARM)) == (7, None)
