"""Runs one module of CPython's own test suite (Lib/test) and returns the counts.

Loaded as a plugin by the suite runner: the same code runs inside a worker and, for the
comparison, in a plain subprocess outside any sandbox."""
import io
import sys
import time
import unittest


def _ids(pairs, limit=200):
    return [test.id() if hasattr(test, "id") else str(test) for test, _ in pairs][:limit]


def _reason(pairs, limit=200):
    out = []
    for test, text in pairs[:limit]:
        last = text.strip().splitlines()[-1] if text.strip() else ""
        out.append(f"{test.id() if hasattr(test, 'id') else test}: {last[:200]}")
    return out


def run_module(name: str) -> dict:
    start = time.monotonic()
    stream = io.StringIO()
    suite = unittest.defaultTestLoader.loadTestsFromName(f"test.{name}")
    result = unittest.TextTestRunner(stream=stream, verbosity=0).run(suite)
    return {
        "module": name,
        "run": result.testsRun,
        "failures": len(result.failures),
        "errors": len(result.errors),
        "skipped": len(result.skipped),
        "passed": result.testsRun - len(result.failures) - len(result.errors) - len(result.skipped),
        "failed_ids": _ids(result.failures + result.errors),
        "reasons": _reason(result.failures + result.errors),
        "seconds": round(time.monotonic() - start, 2),
        "python": sys.version.split()[0],
    }
