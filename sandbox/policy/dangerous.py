"""Syscalls that widen the kernel's attack surface: refused unless a policy lists them in
`allow_dangerous`, so that granting one is a visible, reviewable decision."""

DANGEROUS = frozenset({
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "pidfd_open", "bpf", "perf_event_open",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "keyctl", "add_key",
    "request_key", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "open_by_handle_at",
    "name_to_handle_at", "swapon", "swapoff", "syslog", "personality", "modify_ldt", "seccomp", "iopl",
    "ioperm", "reboot", "acct", "quotactl", "lookup_dcookie", "vm86", "vm86old", "fanotify_init",
    "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick", "clone3", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "capset", "prctl", "settimeofday",
    "clock_settime", "adjtimex", "clock_adjtime", "mknod", "mknodat", "uselib", "nfsservctl",
    "get_kernel_syms", "query_module", "create_module", "memfd_secret", "landlock_create_ruleset",
    "landlock_add_rule", "landlock_restrict_self",
})
