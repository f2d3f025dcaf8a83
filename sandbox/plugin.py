"""What a plugin imports: `from sandbox.plugin import post`.

`post(obj)` sends plain data (None, bool, int, float, str, bytes, list, dict) to the host's
`on("message")` callbacks. Nothing else here: a plugin needs no other API.
"""
from .child.serve import post

__all__ = ["post"]
