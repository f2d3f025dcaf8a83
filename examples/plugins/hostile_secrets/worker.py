"""Hostile: looks for the host's secrets in files and in the host process."""
import os


def run():
    found = {}
    for path in ("/etc/shadow", f"/proc/{os.getppid()}/environ", "/root/.ssh/id_rsa"):
        try:
            with open(path, "rb") as f:
                found[path] = f.read(100).decode("latin-1")
        except OSError as e:
            found[path] = f"refused: {e.strerror}"
    found["environment"] = dict(os.environ)
    return found
