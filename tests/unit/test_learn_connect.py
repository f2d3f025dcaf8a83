"""`sandbox policy learn` proposes network.connect from the destinations it saw: what the policy
can enforce (loopback as seen, other addresses as their port, socket files by name), and every
proposal loads as a policy."""
import os

from sandbox.policy import Policy
from sandbox.policy.learn_propose import _connect_entries
from sandbox.policy.learn_record import Seen
from helpers import DEFAULT_POLICY


def test_destinations_become_connect_entries_the_policy_accepts(tmp_path):
    seen = Seen("connect", "fetch()")
    entries, notes = _connect_entries({
        "AF_INET:127.0.0.1:8080": seen, "AF_INET:93.184.216.34:443": seen, "AF_INET6:[::1]:5432": seen,
        "AF_UNIX:/run/app.sock": seen, "AF_UNIX:@hidden": seen})
    want = ["127.0.0.1:8080", "0.0.0.0:443", "[::1]:5432", "unix:/run/app.sock"]
    assert sorted(e for e, _ in entries) == sorted(want)
    assert any("abstract socket" in n for n in notes)
    path = os.path.join(tmp_path, "p.toml")
    with open(path, "w") as f:
        f.write(f'extends = "{DEFAULT_POLICY}"\n[network]\nallow = true\nfamilies = ["inet", "inet6", "unix"]\n'
                f'connect = [{", ".join(repr(e).replace(chr(39), chr(34)) for e, _ in entries)}]\n')
    assert sorted(Policy.load(path).explain()["network"]["connect"]) == sorted(e for e, _ in entries)
