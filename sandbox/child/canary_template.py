"""A preload that records which process imported it, for the warm-template tests.

A worker is pid 1 of a PID namespace of its own, so a worker that imported this module itself
finds `IMPORTED_BY == 1`; a worker forked from a warm template finds the template's pid (from
the zygote's namespace), which no worker can have. Imported only by a worker or a template
whose policy preloads it; never by a host.
"""
import os

IMPORTED_BY = os.getpid()
