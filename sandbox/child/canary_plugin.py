"""The doctor's canary plugin: each function tries one thing a confined worker must not do."""
import os


def status():
    """What the kernel says about us: uids, NoNewPrivs, Seccomp, capabilities."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "NoNewPrivs", "Seccomp", "CapEff", "CapPrm", "CapBnd", "CapAmb"):
                fields[key] = value.strip()
    return fields


def try_setuid_root():
    try:
        os.setuid(0)
    except OSError as e:  # EPERM, or EINVAL where uid 0 is not mapped (user namespace)
        return f"refused: {e.strerror}"
    return "SUCCEEDED"


def read_file(path):
    with open(path, "rb") as f:
        return f.read(64)


def make_socket():
    import socket
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return "socket created"


def sleep(seconds):
    import time
    time.sleep(seconds)
    return "woke up"


def environment():
    return dict(os.environ)
