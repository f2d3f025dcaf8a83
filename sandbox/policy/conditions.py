"""Argument conditions of seccomp rules: parse them, negate them, and turn them into libseccomp args.

A condition is an atom (arg, op, value, mask): op is one of == != < <= > >= or "&" (masked
equality: arg & mask == value). A rule is a conjunction of atoms; a syscall's rules are a
disjunction. libseccomp takes at most one comparison per argument in a rule, and when rules of
different actions overlap, an unconditional one wins: so "everything this syscall's allow rules
leave out gets an errno" has to be written out as rules that never overlap the allows. That is
`complement()`: the negation of the allow rules, in disjunctive form, one comparison per argument.
"""
import re
from typing import NamedTuple

U64 = (1 << 64) - 1
_CMP = re.compile(r"^\s*arg([0-5])\s*(==|!=|<=|>=|<|>)\s*(\S+)\s*$")
_MASKED = re.compile(r"^\s*arg([0-5])\s*&\s*(\S+)\s*==\s*(\S+)\s*$")
NEGATE = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}
MAX_RULES = 256  # a complement larger than this is a policy no one meant to write


class Atom(NamedTuple):
    arg: int
    op: str
    value: int
    mask: int = U64

    def text(self) -> str:
        if self.op == "&":
            return f"arg{self.arg} & {self.mask:#x} == {self.value:#x}"
        return f"arg{self.arg} {self.op} {self.value:#x}"

    def holds(self, x: int) -> bool:
        if self.op == "&":
            return x & self.mask == self.value
        return {"==": x == self.value, "!=": x != self.value, "<": x < self.value,
                "<=": x <= self.value, ">": x > self.value, ">=": x >= self.value}[self.op]


class Unexpressible(ValueError):
    pass


def _int(text: str) -> int:
    v = int(text, 0)
    if not 0 <= v <= U64:
        raise ValueError("out of range")
    return v


def parse(text: str) -> Atom:
    """'arg1 == 0x5401' or 'arg2 & 0x3 == 0'. ValueError(reason) if it is neither."""
    if not isinstance(text, str) or "\x00" in text or len(text) > 200:
        raise ValueError("not a condition")
    m = _MASKED.match(text)
    if m:
        return Atom(int(m[1]), "&", _int(m[3]), _int(m[2]))
    m = _CMP.match(text)
    if m:
        return Atom(int(m[1]), m[2], _int(m[3]))
    raise ValueError("not a condition")


def _negate(a: Atom) -> list[Atom] | None:
    """The atoms whose disjunction is `not a`; None means `not a` always holds."""
    if a.op != "&":
        return [Atom(a.arg, NEGATE[a.op], a.value)]
    if a.value & ~a.mask:
        return None  # `a` never holds
    bits = [1 << i for i in range(64) if a.mask >> i & 1]
    return [Atom(a.arg, "&", (~a.value) & b, b) for b in bits]


def _meet(conj: dict, a: Atom) -> dict | None:
    """conj (arg -> atom) and a, in one comparison per argument; None if they contradict."""
    b = conj.get(a.arg)
    if b is None:
        return {**conj, a.arg: a}
    if a == b:
        return conj
    if a.op == "&" and b.op == "&":
        common = a.mask & b.mask
        if a.value & common != b.value & common:
            return None
        return {**conj, a.arg: Atom(a.arg, "&", a.value | b.value, a.mask | b.mask)}
    for eq, other in ((a, b), (b, a)):
        if eq.op == "==":
            return {**conj, a.arg: eq} if other.holds(eq.value) else None
    raise Unexpressible(f"{a.text()} and {b.text()} on one argument")


def overlap(a: list[Atom], b: list[Atom]) -> bool:
    """Can both conjunctions hold at once? (True when unsure.)"""
    conj: dict = {}
    try:
        for atom in list(a) + list(b):
            met = _meet(conj, atom)
            if met is None:
                return False
            conj = met
    except Unexpressible:
        return True
    return True


def complement(rules: list[list[Atom]]) -> list[list[Atom]]:
    """Rules (each a conjunction) that hold exactly where none of `rules` holds."""
    dnf: list[dict] = [{}]
    for rule in rules:
        negs = []
        always = False
        for a in rule:
            n = _negate(a)
            if n is None:
                always = True
                break
            negs.extend(n)
        if always:
            continue
        nxt, seen = [], set()
        for conj in dnf:
            for a in negs:
                m = _meet(conj, a)
                if m is None:
                    continue
                key = tuple(sorted(m.items()))
                if key not in seen:
                    seen.add(key)
                    nxt.append(m)
        if len(nxt) > MAX_RULES:
            raise Unexpressible(f"more than {MAX_RULES} rules")
        dnf = nxt
    return [sorted(c.values()) for c in dnf]


def to_seccomp(atoms, seccomp) -> list:
    ops = {"==": seccomp.EQ, "!=": seccomp.NE, "<": seccomp.LT, "<=": seccomp.LE, ">": seccomp.GT,
           ">=": seccomp.GE}
    return [seccomp.Arg(a.arg, seccomp.MASKED_EQ, a.mask, a.value) if a.op == "&"
            else seccomp.Arg(a.arg, ops[a.op], a.value) for a in atoms]
