"""An emulated container, for the sandbox's tests: what Docker's and Kubernetes' default seccomp profiles do
to minitir, on this process and everything it starts. unshare, setns, mount (old and new API), pivot_root and
clone with a namespace flag fail with EPERM, clone3 with ENOSYS (so glibc uses clone); with
landlock=False the Landlock system calls fail with ENOSYS too (a kernel without it).

As root, the harness first does what a container image does: Python's directories become readable by every
user (here they lie under root's 0700 home), by a tmpfs over the closed directory with Python bound back
into it, in a mount namespace of this process's own. That needs mounts, so it comes before the filter.

    python -c "import tests.container as c; c.emulate(); ..."      (or `run_emulated(code)` from a test)
"""
import ctypes
import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from minitir.sandbox import isolation, seccomp

ROOT = Path(__file__).resolve().parents[1]
ENV = "MINITIR_EMULATED_CONTAINER"   # set in an emulated run: "landlock" or "nothing"
REFUSED = ("unshare", "setns", "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount",
           "fspick", "fsconfig", "mount_setattr")
LANDLOCK = ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self")


def _python_readable_by_all(hold: str):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(isolation.CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(mount namespace)")
    isolation._mount(None, "/", None, isolation.MS_REC | isolation.MS_PRIVATE)
    for d in isolation.python_dirs():
        parts, closed = d.split(os.sep), None
        for i in range(2, len(parts)):
            if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
                closed = os.sep.join(parts[:i])
                break
        if closed is None:
            continue
        os.makedirs(hold + d)
        isolation._mount(d, hold + d, None, isolation.MS_BIND | isolation.MS_REC)
        isolation._mount("tmpfs", closed, "tmpfs", 0, "mode=755")
        os.makedirs(d)
        isolation._mount(hold + d, d, None, isolation.MS_BIND | isolation.MS_REC)


def emulate(landlock: bool = True, hold: str | None = None):
    """hold: an empty directory to bind Python's directories from (default: a new one under /tmp, left
    behind; run_emulated passes one and removes it after the process ends)."""
    if os.geteuid() == 0:
        _python_readable_by_all(hold or tempfile.mkdtemp(prefix="minitir-container-"))
    rules = [(name, seccomp.ERRNO(errno.EPERM), []) for name in REFUSED]
    rules += [("clone", seccomp.ERRNO(errno.EPERM), [(0, seccomp.CMP_MASKED_EQ, flag, flag)])
              for flag in seccomp.CLONE_NAMESPACES]
    rules += [("clone3", seccomp.ERRNO(errno.ENOSYS), [])]
    rules += [] if landlock else [(name, seccomp.ERRNO(errno.ENOSYS), []) for name in LANDLOCK]
    ctypes.CDLL(None, use_errno=True).prctl(isolation.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    seccomp.load(seccomp.compile_filter(rules)[0])
    os.environ[ENV] = "landlock" if landlock else "nothing"


def run_emulated(code: str, landlock: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`code` in a new Python process inside the emulated container, from the project's directory."""
    # the holding directory's mounts end with the process: then it is removed
    with tempfile.TemporaryDirectory(prefix="minitir-container-", ignore_cleanup_errors=True) as hold:
        prelude = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport tests.container\n" \
                  f"tests.container.emulate(landlock={landlock}, hold={hold!r})\n"
        return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
