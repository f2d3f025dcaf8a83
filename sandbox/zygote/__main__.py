import os
import sys

# Started as a plain file path with -I: make the package importable without trusting sys.path
# entries from the host's environment (there is none: the environment is empty).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sandbox.zygote.server import main  # noqa: E402

main(sys.argv)
