"""A plugin's folder is loaded as a package of its own, under a private name: `from . import
helper` works, and the folder never goes on sys.path, so nothing in it shadows a module."""
import os

import pytest

import sandbox
from sandbox import PluginError
from helpers import ROOT

pytestmark = pytest.mark.unpriv

PACKAGE = os.path.join(ROOT, "tests", "plugins", "package", "worker.py")


def test_a_two_file_plugin_imports_its_helper():
    with sandbox.Worker(PACKAGE) as w:
        assert w.call("shout", "hi") == "HI!"
        name, package = w.call("package")
        assert name == package and name != "package"  # a name of its own, not the folder's


def test_a_json_py_beside_worker_py_shadows_nothing():
    with sandbox.Worker(PACKAGE) as w:
        path = w.call("json_module")
        assert not path.startswith(os.path.dirname(PACKAGE))
        assert path.endswith(os.path.join("json", "__init__.py"))


def test_the_plugin_folder_is_not_on_sys_path():
    with sandbox.Worker(PACKAGE) as w:
        with pytest.raises(PluginError) as ei:
            w.call("absolute_helper")
        assert ei.value.type == "ModuleNotFoundError"
