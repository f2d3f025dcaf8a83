"""What `network.connect` grants, as the kernel enforces it (host side; no process needed).

Landlock's TCP rules (ABI 4) name a port, never an address: a worker granted "X:8080" may
connect to port 8080 on every address it can route to. So the grant is read as its ports, and
an address is accepted only where it claims no more than that:
- "any" (0.0.0.0, [::]): exactly what is enforced;
- loopback (127.0.0.0/8, [::1]): the common "my local service" case; enforced as the port on
  any address, and `policy explain`/`lint` say so;
- a host name: resolved by the worker (DNS is set up: the resolver's files readable, TCP port
  53 added), enforced as the port on any address, and said so;
- any other IP address is refused: the policy would claim a restriction the worker lacks.
Bind is always denied once `connect` is set. UDP has no Landlock rules at all: with
`network.allow` the worker may send datagrams anywhere its socket families allow.

Unix sockets: abstract ones are always scoped (ABI 6). Pathname ones are not limited by any
Landlock ABI up to 7 (connect() on a socket file is checked by the file's permissions only), so
a worker granted the `unix` family gets the minimal mount view (child/minimal_view.py): a root
that holds only its granted paths, plus each socket named in `network.connect` as
"unix:/path", bound alone. Every other socket file of the host does not exist for it.
"""
import ipaddress
import os
import stat

from ..errors import PolicyError
from . import schema

# What glibc's resolver reads: the name service order, the resolvers, the static names, the
# address sorting rules. Granted read-only when a destination is a host name.
DNS_FILES = ("/etc/nsswitch.conf", "/etc/resolv.conf", "/etc/hosts", "/etc/gai.conf")
DNS_PORT = 53  # TCP, for answers too large for UDP (UDP itself is not limited by Landlock)


PATHNAME_UNIX = ("only inside the granted paths, and the sockets named in network.connect (the rest of the "
                 "host's filesystem is absent from the worker's mount view)")


def split_connect(entries) -> tuple[list[str], tuple[str, ...]]:
    """network.connect as written -> (the "host:port" entries, the unix socket paths)."""
    inet = [e for e in entries if not e.startswith(schema.UNIX_PREFIX)]
    unix = tuple(dict.fromkeys(schema.parse_unix_socket(e) for e in entries if e.startswith(schema.UNIX_PREFIX)))
    return inet, unix


def check_unix_sockets(paths, net: dict, path: str | None) -> None:
    """A socket granted by name needs the unix family, and must be a socket (or not exist yet:
    a service may start after the policy is loaded; the worker then finds nothing there). A
    link is refused too: the worker's view binds the socket itself, never what a link names."""
    if not paths:
        return
    if not (net["allow"] and "unix" in net["families"]):
        raise PolicyError('"unix:" entries need network.allow = true and families with "unix"', path,
                          "network.connect")
    for sock in paths:
        try:
            mode = os.lstat(sock).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise PolicyError(f"unix:{sock}: cannot be checked ({e.strerror})", path, "network.connect") from None
        if not stat.S_ISSOCK(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a socket"
            raise PolicyError(f"unix:{sock}: {kind}; name the socket file itself", path, "network.connect")


def _is_name(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def needs_dns(network) -> bool:
    """A destination is a host name: the worker must resolve it."""
    return bool(network.allow) and any(_is_name(d.host) for d in network.connect)


def enforced_ports(network, path: str | None = None) -> tuple[int, ...]:
    """The TCP ports the worker may connect to (empty: `connect` not set), or PolicyError for a
    destination whose address Landlock cannot enforce (see the module docstring)."""
    ports = set()
    for dest in network.connect:
        if not _is_name(dest.host):
            ip = ipaddress.ip_address(dest.host)
            if not (ip.is_loopback or ip.is_unspecified):
                any_addr = "[::]" if ip.version == 6 else "0.0.0.0"
                raise PolicyError(
                    f"{dest}: Landlock limits TCP by port, not by address, so this grant would let the worker "
                    f"reach port {dest.port} on every host; write {any_addr}:{dest.port} to grant the port on "
                    "any address (what is enforced)", path, "network.connect")
        ports.add(dest.port)
    if needs_dns(network):
        ports.add(DNS_PORT)
    return tuple(sorted(ports))


def enforced(network) -> dict:
    """For `policy explain`: what the kernel holds the worker to, in plain words."""
    if not network.allow:
        return {"tcp": "none (an empty network namespace)", "abstract_unix": "none",
                "pathname_unix": "none", "udp": "none", "dns": False}
    ports = enforced_ports(network)
    if ports:
        tcp = (f"connect to port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))} only, on any "
               "address (Landlock matches ports, not addresses); bind denied")
    else:
        tcp = "any address and port, bind included (no network.connect)"
    return {
        "tcp": tcp,
        "udp": "not limited by Landlock (it has no UDP rules): any address and port the families allow",
        "abstract_unix": "never (scoped to the worker's own Landlock domain; no grant by name exists)",
        "pathname_unix": (PATHNAME_UNIX + _named(network) if "unix" in network.families
                          else "none (no unix family)"),
        "dns": needs_dns(network),
    }


def _named(network) -> str:
    socks = getattr(network, "unix_sockets", ())
    return f"; named: {', '.join(socks)}" if socks else ""


def lint(network) -> list[tuple[str, str, str]]:
    """(level, key, message) for `policy lint`: grants that give more than they read as."""
    if not network.allow:
        return []
    out = []
    fams = set(network.families)
    if {"inet", "inet6"} & fams and not network.connect:
        out.append(("warning", "network.connect",
                    "not set: the worker may connect to (and bind) any TCP port on any address, the host's "
                    "127.0.0.1 included; list the ports it needs"))
    if "unix" in fams:
        out.append(("warning", "network.families", f"unix: pathname sockets are reachable {PATHNAME_UNIX}; "
                    "every socket inside a granted folder (read_only, writable, the plugin's) is reachable, "
                    "so grant folders that hold no socket you would not hand out; abstract sockets stay "
                    "unreachable"))
    for sock in getattr(network, "unix_sockets", ()):
        if not os.path.exists(sock):
            out.append(("warning", "network.connect", f"unix:{sock}: nothing there now; a worker started "
                        "before the socket exists finds nothing (its view is made at start)"))
    try:
        enforced_ports(network)
    except PolicyError as e:
        out.append(("error", "network.connect", e.detail))
        return out
    for dest in network.connect:
        if _is_name(dest.host) or not ipaddress.ip_address(dest.host).is_unspecified:
            out.append(("warning", "network.connect",
                        f"{dest}: enforced as port {dest.port} on any address (Landlock matches ports, "
                        "not addresses)"))
    if needs_dns(network):
        out.append(("warning", "network.connect",
                    f"a host name: the resolver's files are readable and TCP port {DNS_PORT} is open on any "
                    "address; UDP (DNS queries included) is not limited by Landlock"))
    return out
