"""Hostile (or just buggy): never returns, and ignores the polite signals."""
import signal


def run():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        pass
