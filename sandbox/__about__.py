"""Who this package is: the distribution behind the generic import name `sandbox`.

Plain constants only (no imports): setuptools reads the version from here without importing
the package, and `import sandbox` in the zygote stays as light as it is.
"""

__title__ = "sandbox-plugins"  # the distribution name: `pip install sandbox-plugins`, `import sandbox`
__version__ = "0.2.0"
__summary__ = ("Run untrusted Python plugins in forked, confined worker processes: privilege drop, "
               "seccomp, Landlock, two message pipes.")
__license__ = "MIT"
__author__ = "The sandbox-plugins authors"
__copyright__ = "Copyright (c) 2026 The sandbox-plugins authors"
