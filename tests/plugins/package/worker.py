"""A plugin of two files: worker.py imports its helper relatively, and a json.py beside it
must not shadow the standard library's."""
import json

from . import helper


def shout(text):
    return helper.loud(text)


def json_module():
    return json.__file__


def absolute_helper():
    import helper as h  # noqa: F401 - must fail: the folder is never on sys.path
    return "imported"


def package():
    return [__name__, __package__]
