"""Hostile: writes a forged frame header straight onto the protocol pipe (fd 4), announcing 4 GiB."""
import os
import struct


def run():
    os.write(4, struct.pack("<2sBBIQ", b"SB", 1, 3, 0xFFFFFFFF, 1))
    return "lied"
