"""A seccomp filter for runs: the system calls model-written code has no business making fail with EPERM
(the code sees a PermissionError; nothing is killed but a call of another architecture, x32 or i386, which
libseccomp's default kills), every other call goes through.

Denied: debugging and reading other processes (ptrace, process_vm_readv/writev), mounts and new or other
namespaces (mount and the new mount API, pivot_root, chroot, unshare, setns, clone with a namespace flag),
kernel keyrings, bpf, perf_event_open, io_uring (its operations bypass this filter), file handles
(open_by_handle_at: the classic container escape), userfaultfd, kexec, reboot, modules, swap, accounting,
quotas, clocks, host names, the kernel log; `socket` of every family (runs have no network; a named unix
socket such as docker.sock is reachable by path, which Landlock's ABI 7 does not cover; socketpair stays);
another process's priority, scheduling, affinity and limits (Landlock has no hook for them). Where runs share
the host's IPC namespace (no namespaces: a container), or where no control group bounds their memory, every
System V shared memory, message queue and semaphore call and opening POSIX message queues (POSIX shared memory
lives in /dev/shm, which Landlock closes); without a control group also memfd_create. Where runs share the
user's uid and files (a container, as a normal user), also what Landlock does not cover of files the user
owns: their mode, owner, times, extended attributes, and truncation by path.
clone3 gets ENOSYS, so glibc falls back to clone, whose flags the filter can read.

The program is compiled once per fork server with libseccomp (libseccomp.so.2, through ctypes: it knows
each architecture's system call numbers) and loaded in each run by one prctl.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
          "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare",
          "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "io_uring_setup",
          "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at", "userfaultfd",
          "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module", "swapon",
          "swapoff", "acct", "quotactl", "quotactl_fd", "settimeofday", "clock_settime", "clock_adjtime",
          "adjtimex", "sethostname", "setdomainname", "syslog", "vhangup", "iopl", "ioperm", "lookup_dcookie",
          "socket", "setpriority", "ioprio_set", "sched_setscheduler", "sched_setparam", "sched_setattr")
ARCH_SPECIFIC = ("iopl", "ioperm", "futimesat", "utime", "utimes", "chmod", "chown", "lchown", "ipc")   # x86 only
SELF_ONLY = ("prlimit64", "sched_setaffinity")   # allowed on the run itself (pid 0) only
IPC = ("shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop",
       "semctl", "mq_open", "ipc")   # objects other runs could reach (found by index: *_STAT), or hidden memory
USER_FILES = ("chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "setxattr",
              "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "utime", "utimes",
              "utimensat", "futimesat", "truncate")
CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
ACT_ALLOW = 0x7FFF0000
CMP_NE, CMP_MASKED_EQ = 1, 7   # (argument != datum_a), (argument & datum_a == datum_b)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


def ERRNO(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _lib():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def compile_filter(rules: list[tuple[str, int, list[tuple[int, int, int, int]]]]) -> tuple[bytes | None, list[str]]:
    """The BPF program of a filter that allows everything but `rules`: (system call, action, [(argument, op,
    datum_a, datum_b): all must hold]) -> (program, the calls libseccomp does not know: unfiltered). (None, [])
    without libseccomp."""
    lib = _lib()
    if lib is None:
        return None, []
    ctx, unknown = lib.seccomp_init(ACT_ALLOW), []
    try:
        for name, action, args in rules:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:   # too new for this libseccomp, or not a call of this architecture
                unknown.append(name)
                continue
            cmp = (_ArgCmp * max(len(args), 1))(*[_ArgCmp(*a) for a in args])
            if lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmp) < 0:
                raise OSError(f"seccomp: cannot add a rule for {name}")
        r, w = os.pipe()
        try:
            if lib.seccomp_export_bpf(ctx, w) < 0:
                raise OSError("seccomp: cannot export the filter")
            os.close(w)
            w = -1
            with os.fdopen(r, "rb") as f:
                r = -1
                return f.read(), unknown
        finally:
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def run_filter(user_files: bool, ipc: bool, memfd: bool = False) -> tuple[bytes | None, list[str]]:
    """The runs' filter (see the module docstring); user_files: runs share the user's uid and files; ipc:
    no System V or POSIX IPC (they share the host's IPC namespace, or a watcher that cannot see detached
    segments bounds their memory); memfd: no memfd_create (the watcher counts only a memfd's mapped pages
    once its descriptor is closed). -> (program or None without libseccomp, the denied calls libseccomp
    does not know: not filtered)."""
    denied = DENIED + (USER_FILES if user_files else ()) + (IPC if ipc else ()) + (("memfd_create",) if memfd else ())
    rules = [(name, ERRNO(errno.EPERM), []) for name in denied]
    rules += [(name, ERRNO(errno.EPERM), [(0, CMP_NE, 0, 0)]) for name in SELF_ONLY]
    rules += [("clone", ERRNO(errno.EPERM), [(0, CMP_MASKED_EQ, flag, flag)]) for flag in CLONE_NAMESPACES]
    rules += [("clone3", ERRNO(errno.ENOSYS), [])]
    program, unknown = compile_filter(rules)
    return program, [n for n in unknown if n not in ARCH_SPECIFIC]


def load(program: bytes):
    """Install a compiled filter on this process (and all it starts); needs no_new_privs (or CAP_SYS_ADMIN)."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")
