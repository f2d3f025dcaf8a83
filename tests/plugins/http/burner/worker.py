"""Burns CPU: the HTTP server must stay responsive while it runs."""
import time


def burn(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n > 0


def echo(x):
    return x
