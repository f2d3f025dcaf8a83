"""One hostile plugin, many attacks: each function tries one way out. Raw syscalls go
through ctypes (preloaded by the test policy, so the kernel layers are what stop them)."""
import ctypes
import os
import struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _confined():
    """The guard: run a harmful attack only when this very worker is provably confined."""
    with open("/proc/self/status") as f:
        st = dict(line.split(":", 1) for line in f if ":" in line)
    if st["Seccomp"].strip() != "2":
        raise RuntimeError("GUARD: seccomp is not active; refusing to launch the attack")
    if os.geteuid() == 0 and st["Uid"].split()[0] == "0":
        raise RuntimeError("GUARD: still root; refusing to launch the attack")


def sys(nr, *args):
    ret = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return [ret, ctypes.get_errno()]


def kill(pid, sig):
    _confined()
    return sys(62, pid, sig)


def tgkill(pid, sig):
    _confined()
    return sys(234, pid, pid, sig)


def stop_myself():
    return sys(234, os.getpid(), os.getpid(), 19)  # SIGSTOP: dodge CPU accounting


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read(100)
    except OSError as e:
        return f"refused: {e.strerror}"


def stat_errno(path):
    try:
        os.stat(path)
        return 0
    except OSError as e:
        return e.errno


def proc_pids():
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def fds():
    found = []
    for fd in range(1025):
        try:
            os.fstat(fd)
            found.append(fd)
        except OSError:
            pass
    return found


def write_protocol(data: bytes):
    os.write(4, data)
    return "written"


def forged_reply(call_id, ftype=3):
    payload = b"\xa4evil"
    os.write(4, struct.pack("<2sBBIQ", b"SB", 1, ftype, len(payload), call_id) + payload)
    return "and the real answer"


def deep_payload(levels):
    payload = b"\x91" * levels + b"\xc0"
    os.write(4, struct.pack("<2sBBIQ", b"SB", 1, 6, len(payload), 0) + payload)
    return "sent"


def flood_events(n):
    from sandbox.plugin import post
    for i in range(n):
        post(i)
    return n


def huge_error(mb):
    raise ValueError("x" * (mb * 1024 * 1024))


def never_read(*ignored):
    import time
    time.sleep(60)


def block_on_pipe():
    return os.read(3, 1)  # the host's pipe: nothing comes


def spin():
    while True:
        pass


def thread_bomb():
    import threading
    for _ in range(1000):
        threading.Thread(target=spin).start()


def make_symlink(target):
    os.symlink(target, "link-to-host")
    return os.getcwd()


def mmap_huge():
    import mmap
    m = mmap.mmap(-1, 64 * 1024 ** 3)
    return len(m)


def write_file(path):
    with open(path, "w") as f:
        f.write("pwned")
    return "written"


def int80_getpid():
    """An i386 syscall from a 64-bit process: mov eax, 20 (getpid); int 0x80; ret."""
    import mmap
    code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
