"""Hostile: eats memory until something gives."""


def run():
    hoard = []
    while True:
        hoard.append(bytearray(64 * 1024 * 1024))
