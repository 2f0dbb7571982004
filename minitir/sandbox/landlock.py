"""Landlock (Linux >= 5.13): unprivileged access control a process puts on itself, and can never lift.

A ruleset names the rights it handles; every handled right is denied except beneath the paths a rule grants
it for. The run gets: read and execute beneath what Python needs, read and write beneath its working
directory (its TMPDIR) and the private view's /tmp where there is a view, /dev/null and friends, nothing else
of the filesystem. Where the kernel's ABI has them: truncation (ABI 3), TCP bind and connect denied (ABI 4),
signals to processes outside the run's domain and abstract unix sockets outside it refused (ABI 6). Landlock
does not cover a file's mode, owner, times or extended attributes: the seccomp filter does, where it must.
Rights newer than the kernel's ABI are left out, so the best the kernel offers is used and reported (`abi`).

The ruleset is built in the pre-forked child while it waits for its code (opening the paths costs that
time, not the run's), and `restrict` enters it after the child has dropped its privileges.
"""
from __future__ import annotations

import ctypes
import os
import stat

# syscall numbers are the same on every architecture that has Landlock
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15          # ABI 2, 3, 5
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1                    # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1         # ABI 6
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV   # the rights a rule on a file may grant
READ_EXEC = EXECUTE | READ_FILE | READ_DIR

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing, disabled or refused."""
    v = _libc.syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(int(v), 0)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return ret


def ruleset(version: int, read_exec: list[str], read_write: list[str]) -> int:
    """A ruleset fd for ABI `version`: READ_EXEC beneath each existing path of read_exec, every right
    beneath each of read_write (files: the file rights), TCP denied, signals and abstract sockets scoped."""
    fs = FS_BY_ABI[min(version, 5)]
    attr = _RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if version >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if version >= 6 else 0)
    size = 24 if version >= 6 else 16 if version >= 4 else 8   # the struct as that ABI knows it
    fd = _check(_libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                "create_ruleset")
    for paths, rights in ((read_exec, READ_EXEC), (read_write, fs)):
        for p in paths:
            try:
                target = os.open(p, os.O_PATH | os.O_CLOEXEC)
            except OSError:   # not on this system (lib32, a missing /etc file): nothing to grant
                continue
            try:
                allowed = rights & fs if stat.S_ISDIR(os.fstat(target).st_mode) else rights & fs & FILE_RIGHTS
                rule = _PathBeneath(allowed, target)
                _check(_libc.syscall(SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(RULE_PATH_BENEATH),
                                     ctypes.byref(rule), ctypes.c_uint32(0)), f"add_rule {p}")
            finally:
                os.close(target)
    return fd


def restrict(fd: int):
    """Enter the ruleset (needs no_new_privs); closes it."""
    try:
        _check(_libc.syscall(SYS_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)), "restrict_self")
    finally:
        os.close(fd)
