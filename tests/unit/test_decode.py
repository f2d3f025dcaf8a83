"""The decoders that turn a raw notification into words an operator can act on (pure)."""
import struct

from sandbox._host import decode as D


def test_ioctl_names_and_hidden_high_bits():
    assert D.ioctl_name(0x5413) == "TIOCGWINSZ"
    assert D.ioctl_name(21523) == "TIOCGWINSZ"  # the raw `ioctl(1, 21523, ...)`
    assert D.ioctl_name(0x5401) == "TCGETS"
    assert D.ioctl_name(0x5421) == "FIONBIO"
    assert D.ioctl_name(0x5412) == "TIOCSTI"
    # the kernel ignores bits above 32; the name says so instead of hiding them
    assert D.ioctl_name(0x1_0000_5412) == "TIOCSTI (as 0x100005412)"
    assert D.ioctl_name(0xDEAD) == "0xdead"


def test_ioctl_report_grants_an_exact_rule_and_never_tiocsti():
    r = D.describe("ioctl", (1, 0x5413, 0x7FFD0000, 0, 0, 0))
    assert r.args_text == "1, TIOCGWINSZ, 0x7ffd0000"
    assert r.grant == '[[seccomp.rule]] syscall = "ioctl", when = ["arg1 == 0x5413"]'
    assert "terminal size" in r.benign_note
    sti = D.describe("ioctl", (0, 0x5412, 0, 0, 0, 0))
    assert sti.grant.startswith("nothing: TIOCSTI")
    assert D.describe("ioctl", (0, 0x1_0000_5401, 0, 0, 0, 0)).grant.startswith("nothing")


def test_clone_flags_thread_versus_process():
    thread = 0x3D0F00  # what glibc's pthread_create passes
    assert D.clone_flags(thread) == ("CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|"
                                     "CLONE_SETTLS|CLONE_PARENT_SETTID|CLONE_CHILD_CLEARTID")
    assert D.describe("clone", (thread, 0, 0, 0, 0, 0)).grant == "limits.threads"
    # the issue's `clone(16657, ...)`: posix_spawn, a new process
    assert D.clone_flags(16657) == "CLONE_VM|CLONE_VFORK|SIGCHLD"
    assert D.describe("clone", (16657, 0, 0, 0, 0, 0)).grant == "limits.processes"
    assert D.describe("fork", ()).grant == "limits.processes"
    assert D.describe("clone", (0x10000000 | 17, 0, 0, 0, 0, 0)).grant.startswith("nothing: new namespaces")
    assert D.clone_flags(0) == "0"


def test_open_flags():
    assert D.open_flags(0x80241) == "O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC"  # the 0x80241
    assert D.open_flags(0x80000) == "O_RDONLY|O_CLOEXEC"
    assert D.open_flags(0x2 | 0x40 | 0x80) == "O_RDWR|O_CREAT|O_EXCL"
    assert D.open_flags(0x410000 | 1) == "O_WRONLY|O_DIRECTORY|__O_TMPFILE"
    assert D.is_write_open(0x80241) and not D.is_write_open(0x90800)


def test_open_report_reads_the_path_and_names_the_write_grant():
    seen = []

    def read_path(addr):
        seen.append(addr)
        return "/data/out.csv"

    r = D.describe("openat", (D.AT_FDCWD & D.U64, 0x1000, 0x80241, 0o644, 0, 0), read_path=read_path)
    assert seen == [0x1000]
    assert r.args_text == "AT_FDCWD, '/data/out.csv', O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0o644"
    assert r.path == "/data/out.csv"
    assert r.grant == "filesystem.writable or filesystem.scratch"
    read = D.describe("openat", (D.AT_FDCWD & D.U64, 0x1000, 0x80000, 0, 0, 0), read_path=lambda a: "/etc/x")
    assert read.grant == "filesystem.read_only"
    # without a reader (or an unreadable task) the pointer is shown, never a guess
    blind = D.describe("openat", (D.AT_FDCWD & D.U64, 0x1000, 0x80241, 0o644, 0, 0))
    assert blind.path is None and "0x1000" in blind.args_text


def test_socket_family_type_and_network_grant():
    assert D.socket_family(2) == "AF_INET" and D.socket_family(16) == "AF_NETLINK"
    assert D.socket_type(0x80001) == "SOCK_STREAM|SOCK_CLOEXEC"
    assert D.socket_type(0x80802) == "SOCK_DGRAM|SOCK_NONBLOCK|SOCK_CLOEXEC"
    r = D.describe("socket", (2, 1, 0, 0, 0, 0))
    assert r.args_text == "AF_INET, SOCK_STREAM, 0"
    assert r.grant == 'network.allow + network.families = ["inet"]'
    assert r.benign_note is None
    assert D.describe("socket", (16, 3, 0, 0, 0, 0)).grant.startswith("nothing: policies grant only")


def test_nscd_lookup_is_called_harmless():
    r = D.describe("socket", (1, 0x80801, 0, 0, 0, 0))  # glibc's nscd client, exactly
    assert r.args_text == "AF_UNIX, SOCK_STREAM|SOCK_NONBLOCK|SOCK_CLOEXEC, 0"
    assert r.benign_note == D.NSCD_NOTE
    addr = struct.pack("<H", 1) + b"/var/run/nscd/socket\0"
    c = D.describe("connect", (3, 0x2000, 110, 0, 0, 0), read_memory=lambda a, n: addr)
    assert c.args_text == "3, AF_UNIX:/var/run/nscd/socket, 110"
    assert c.benign_note == D.NSCD_NOTE and c.path == "AF_UNIX:/var/run/nscd/socket"
    # a plugin's own unix socket is not called harmless
    assert D.describe("socket", (1, 1, 0, 0, 0, 0)).benign_note is None


def test_sockaddr_inet():
    raw = struct.pack("<H", 2) + struct.pack(">H", 8080) + bytes([127, 0, 0, 1]) + b"\0" * 8
    assert D.sockaddr_text(raw) == "AF_INET:127.0.0.1:8080"
    raw6 = struct.pack("<H", 10) + struct.pack(">H", 443) + b"\0" * 4 + b"\0" * 15 + b"\1" + b"\0" * 4
    assert D.sockaddr_text(raw6) == "AF_INET6:[::1]:443"
    assert D.sockaddr_text(b"") is None


def test_signals():
    assert D.signal_name(9) == "SIGKILL" and D.signal_name(15) == "SIGTERM"
    assert D.signal_name(35).startswith("SIGRTMIN+")
    r = D.describe("kill", (1234, 9, 0, 0, 0, 0))
    assert r.args_text == "1234, SIGKILL"
    assert D.describe("tgkill", (10, 11, 6, 0, 0, 0)).args_text == "10, 11, SIGABRT"
    assert D.describe("tkill", (10, 0, 0, 0, 0, 0)).args_text == "10, 0"


def test_mmap_and_mprotect_prot_bits():
    assert D.prot_bits(0) == "PROT_NONE"
    assert D.prot_bits(7) == "PROT_READ|PROT_WRITE|PROT_EXEC"
    r = D.describe("mprotect", (0x7F0000000000, 4096, 5, 0, 0, 0))
    assert r.args_text == "0x7f0000000000, 4096, PROT_READ|PROT_EXEC"
    m = D.describe("mmap", (0, 8192, 3, 0x22, D.U64, 0))
    assert m.args_text == "0, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0"


def test_dangerous_and_groups_name_their_grant():
    assert D.describe("ptrace", (16, 1, 0, 0, 0, 0)).grant == "dangerous: needs allow_dangerous"
    assert D.describe("unshare", (0x10000000,)).grant == "dangerous: needs allow_dangerous"
    assert D.describe("unshare", (0x10000000,)).args_text == "CLONE_NEWUSER"
    # a syscall in a group names the group (epoll is in the default's @io-event since it grants asyncio)
    assert D.describe("getrandom", (0, 16, 0)).grant == 'seccomp.groups = ["@python-runtime"]'
    assert D.describe("epoll_create1", (0x80000,)).grant == 'seccomp.groups = ["@io-event"]'
    assert D.describe("mkdirat", (0, 0, 0)).grant == "filesystem.writable or filesystem.scratch"
    assert D.describe("set_robust_list", (0, 24)).grant == "limits.threads"
    assert D.describe("epoll_create1", (0x80000,)).args_text == "O_RDONLY|O_CLOEXEC"
    # a syscall no group holds is named for seccomp.allow
    assert D.describe("mbind", (0, 4096, 1, 0, 0, 0)).grant == 'seccomp.allow = ["mbind"]'


def test_unknown_syscall_shows_hex_for_large_values():
    r = D.describe("whatever", (1, 0x10000, 0x5401, 0, 0, 0))
    assert r.args_text == "1, 0x10000, 21505, 0, 0, 0"
    assert str(r).startswith("whatever(")


def test_dirfd_and_at_flags():
    r = D.describe("newfstatat", (5, 0x10, 0x20, 0x1000, 0, 0), read_path=lambda a: "")
    assert r.args_text == "5, '', 0x20, AT_EMPTY_PATH"
    assert D.dirfd_text(D.AT_FDCWD & D.U64) == "AT_FDCWD"


def test_prlimit_lowering_is_explained():
    r = D.describe("prlimit64", (0, 7, 0x1000, 0, 0, 0))
    assert r.args_text == "0, RLIMIT_NOFILE, 0x1000, 0"
    assert "lower" in r.benign_note


def test_a_cpu_death_needs_the_cpu_signal_and_the_cpu_time():
    import signal

    from sandbox._host.decode import limit_death
    kw = dict(plugin="p", cpu_limit=10, memory_limit=None)
    assert "limits.cpu_seconds" in str(limit_death(signal.SIGKILL, 9.0, 0, **kw))
    assert "limits.cpu_seconds" in str(limit_death(signal.SIGXCPU, 10.2, 0, **kw))
    assert limit_death(signal.SIGKILL, 1.0, 0, **kw) is None          # killed early: not the limit
    assert limit_death(signal.SIGSEGV, 10.0, 0, **kw) is None         # not the limit's signal
    assert limit_death(signal.SIGKILL, 10.0, 0, plugin="p", cpu_limit=None, memory_limit=None) is None
    assert limit_death(0, 10.0, 1 << 40, plugin="p", cpu_limit=10, memory_limit=1 << 20) is None  # a clean exit
