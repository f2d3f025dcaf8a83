"""Fails while loading, with text that only the operator may see."""
raise RuntimeError("operator-only detail: token=hunter2-load-secret")
