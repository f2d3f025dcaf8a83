def pct(values, q):
    v = sorted(values)
    if not v:
        return None
    i = min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))
    return v[i]


def p50(values):
    return pct(values, 50)
