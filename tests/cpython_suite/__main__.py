import argparse
import json
import sys

from . import MODULES, QUICK, run, stdlib_tests_present, table


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cpython_suite")
    p.add_argument("modules", nargs="*", help=f"default: {len(MODULES)} modules")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--modes", default="default,kill,default+scratch",
                   help="comma-separated: default (as shipped: deny), kill, deny, each optionally +scratch")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    if not stdlib_tests_present():
        print("this interpreter ships no Lib/test", file=sys.stderr)
        return 2
    modes = tuple(m for m in a.modes.split(",") if m)
    rows = run(a.modules or (QUICK if a.quick else MODULES), modes, a.jobs)
    print(table(rows, modes))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
