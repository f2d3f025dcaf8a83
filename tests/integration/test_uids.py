"""Worker uids are unique on the machine, not only within one host process (root mode)."""
import os
import subprocess
import sys

import pytest

from sandbox import HostResourceError
from sandbox._host import uids
from helpers import IS_ROOT, ROOT

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="root mode only: unprivileged hosts do not change uid")

OTHER_HOST = r"""
import sys
sys.path.insert(0, {root!r})
from sandbox._host import uids
got = [uids.allocate({lo}, {hi}) for _ in range(2)]
print(" ".join(map(str, got)), flush=True)
sys.stdin.readline()  # hold the claims until told
"""


def test_two_hosts_never_share_a_uid():
    lo, hi = 299_990, 299_993  # four uids, none an account's
    other = subprocess.Popen([sys.executable, "-c", OTHER_HOST.format(root=ROOT, lo=lo, hi=hi)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = set(map(int, other.stdout.readline().split()))
        assert len(theirs) == 2
        ours = {uids.allocate(lo, hi) for _ in range(2)}
        assert ours.isdisjoint(theirs) and ours | theirs == set(range(lo, hi + 1))
        with pytest.raises(HostResourceError, match="no free uid"):
            uids.allocate(lo, hi)
    finally:
        other.stdin.close()
        other.wait(10)
    # the other host has exited: its claims went with it
    freed = {uids.allocate(lo, hi) for _ in range(2)}
    assert freed == theirs
    for uid in ours | freed:
        uids.release(uid)


def test_claims_live_in_a_root_only_directory():
    uid = uids.allocate(299_980, 299_989)
    try:
        st = os.lstat(uids.CLAIMS)
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700
        assert os.path.exists(os.path.join(uids.CLAIMS, str(uid)))
    finally:
        uids.release(uid)
    assert not os.path.exists(os.path.join(uids.CLAIMS, str(uid)))  # a release leaves no file behind
