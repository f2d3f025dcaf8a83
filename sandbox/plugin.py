"""What a plugin imports: `from sandbox.plugin import post, export`.

`post(obj)` sends plain data (None, bool, int, float, str, bytes, list, dict) to the host's
`on("message")` callbacks.

`@export` marks a function the host may call. What a plugin exports, decided once when it
loads: the names in its `__all__` if it defines one; else the functions marked `@export`, if
it marks any; else every public function (no leading underscore; `on_message` is a hook, not
an export). The worker refuses a call to anything else, and tells the host the list when it
is ready.
"""
from .child.serve import export, post

__all__ = ["export", "post"]
