import os
import sys

# Started as `python -I -S <this file> ...` with an empty environment: no sys.path entry comes from
# the host's environment, and no site-packages .pth file runs (an editable install's finder alone
# pulls in pathlib, re and urllib: memory every worker would carry). The host names the package
# root and the site-packages folders to search instead.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path += [a[5:] for a in sys.argv[2:] if a.startswith("path:")]

from sandbox.zygote.server import main  # noqa: E402

main(sys.argv)
