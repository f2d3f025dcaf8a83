"""The numpy row of the real-plugin start table (used only when numpy is installed)."""
import numpy


def mean(values):
    return float(numpy.asarray(values, dtype=float).mean())
