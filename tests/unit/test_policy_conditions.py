"""Argument conditions: parsing, and the complement that lets an errno cover exactly what the
allow rules leave out (checked by evaluating both on many argument values)."""
import pytest
from hypothesis import given, settings, strategies as st

from sandbox.policy import conditions as C
from sandbox.policy.groups import CLONE_NEW_MASK, CLONE_THREAD, PROCESS_RULE, THREAD_RULE


def holds(conj, args):
    return all(a.holds(args[a.arg]) for a in conj)


def check_partition(rules, samples):
    comp = C.complement(rules)
    for args in samples:
        allowed = any(holds(r, args) for r in rules)
        answered = any(holds(r, args) for r in comp)
        assert allowed != answered, (args, rules, comp)
        for r in comp:  # one comparison per argument: what libseccomp accepts
            assert len({a.arg for a in r}) == len(r)


def test_parse_both_forms_and_refuse_the_rest():
    assert C.parse("arg1 == 0x5401") == C.Atom(1, "==", 0x5401)
    assert C.parse("arg0 & 0x10 == 0x10") == C.Atom(0, "&", 0x10, 0x10)
    for bad in ("arg6 == 1", "arg1 = 1", "arg1 == -1", f"arg1 == {1 << 64}", "arg1 == 1\x00", "x" * 300, "arg1 ~ 2"):
        with pytest.raises(ValueError):
            C.parse(bad)


CLONE_SAMPLES = [[f | s, 0, 0, 0, 0, 0] for f in (0, CLONE_THREAD, CLONE_THREAD | 0x10000000, 0x20000, 0x3d0f00,
                                                   0x1200011, 0x3d0f00 | 0x40000000, (1 << 40) | CLONE_THREAD)
                 for s in (0, 17)]


def test_threads_allowed_everything_else_answered():
    check_partition([[C.parse(THREAD_RULE)]], CLONE_SAMPLES)
    check_partition([[C.parse(THREAD_RULE)], [C.parse(PROCESS_RULE)]], CLONE_SAMPLES)
    # namespace flags are never in either grant
    comp = C.complement([[C.parse(THREAD_RULE)], [C.parse(PROCESS_RULE)]])
    assert any(holds(r, [CLONE_THREAD | 0x10000000] + [0] * 5) for r in comp)
    assert CLONE_NEW_MASK & CLONE_THREAD == 0


def test_complement_of_nothing_is_everything_and_of_everything_is_nothing():
    assert C.complement([]) == [[]]
    assert C.complement([[]]) == []


def test_several_equalities_on_one_argument_are_refused_not_miscompiled():
    with pytest.raises(C.Unexpressible):
        C.complement([[C.parse("arg1 == 1")], [C.parse("arg1 == 2")]])


atoms = st.builds(
    lambda arg, op, v, m: C.Atom(arg, op, v & m, m) if op == "&" else C.Atom(arg, op, v),
    st.integers(0, 2), st.sampled_from(["==", "!=", "<", ">=", "&", "&"]),
    st.integers(0, 64), st.sampled_from([1, 3, 0x10, 0x30, 0xff]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(atoms, min_size=1, max_size=3), min_size=1, max_size=3),
       st.lists(st.lists(st.integers(0, 80), min_size=3, max_size=3), min_size=20, max_size=20))
def test_complement_partitions_the_argument_space(rules, samples):
    rules = [r for r in rules if len({a.arg for a in r}) == len(r)]
    samples = [s + [0, 0, 0] for s in samples]
    try:
        check_partition(rules, samples)
    except C.Unexpressible:
        pass  # refused (a PolicyError for the policy): never a wrong filter


def test_overlap():
    assert C.overlap([C.parse("arg0 == 1")], [C.parse("arg0 == 1"), C.parse("arg1 == 2")])
    assert not C.overlap([C.parse("arg0 == 2")], [C.parse("arg0 == 1")])
    assert not C.overlap([C.parse("arg0 & 0x1 == 0x1")], [C.parse("arg0 & 0x3 == 0")])
