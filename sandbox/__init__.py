"""Sandboxed plugin runner."""
