"""Text statistics with the standard library; posts progress and takes settings by message."""
import collections
import hashlib
import re

from sandbox.plugin import post

_settings = {"top": 5}


def stats(text: str) -> dict:
    words = re.findall(r"[\w']+", text.lower())
    post({"progress": "counted words", "words": len(words)})
    common = collections.Counter(words).most_common(_settings["top"])
    return {
        "characters": len(text),
        "words": len(words),
        "lines": text.count("\n") + 1 if text else 0,
        "most_common": [[w, n] for w, n in common],
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def on_message(msg):
    if isinstance(msg, dict) and isinstance(msg.get("top"), int):
        _settings["top"] = msg["top"]
        post({"settings": dict(_settings)})
