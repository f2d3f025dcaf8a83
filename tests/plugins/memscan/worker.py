"""Scans every readable mapping of its own address space for strings it is given in two halves.

The halves are never joined here: a hit means the whole string, head then tail, sits somewhere
in this worker's memory, which it can only have got from whatever it was forked from."""
import ctypes

SKIP = ("[vvar]", "[vvar_vclock]", "[vsyscall]")  # kernel pages that fault when read byte by byte


def scan(pairs):
    hits = {}
    scanned = 0
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    for line in maps:
        fields = line.split()
        if fields[1][0] != "r" or (len(fields) > 5 and fields[5] in SKIP):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        data = ctypes.string_at(lo, hi - lo)
        scanned += len(data)
        for label, (head, tail) in pairs.items():
            at = data.find(head)
            while at >= 0:
                if data[at + len(head):at + len(head) + len(tail)] == tail:
                    hits.setdefault(label, []).append(" ".join(fields[5:]) or "anonymous")
                    break
                at = data.find(head, at + 1)
        del data
    return {"hits": hits, "scanned": scanned, "mappings": len(maps)}
