"""One memory, process and disk budget for a whole run, over all the processes it starts.

A limit per process does not hold for a run: six processes of 300 MB each fit a 512 MB address-space limit
each. So a run's processes share one budget, enforced by the best means the machine offers:

  cgroup    where the fork server can create control groups (root with a writable cgroup filesystem, or a
            delegated v2 subtree whose memory and pids controllers it can enable: not one holding processes,
            which v2 forbids, so a container's own root group falls back to the watcher): two groups per worker, used by
            runs in turn (the next run's process is forked while the current one runs, and must not share
            its budget), each with a memory limit (swap included: none), a process limit, and the kernel's
            count of OOM kills, which turns a run the kernel stopped into status "memory". cgroup v2
            (memory.max, memory.swap.max, pids.max, memory.events) or v1's memory and pids hierarchies.
  watcher   elsewhere: while a run lasts, the fork server sums, every TICK_S (longer where the sum takes
            more than half of that), what its processes hold (private memory and swap from
            /proc/PID/smaps_rollup, shared memory by proportion, open files already deleted) and kills the
            run over budget. It can overshoot by what a run allocates in one tick; each process's address
            space stays limited as well (RLIMIT_AS), and so does their number.
  disk      a private view gives every run a tmpfs of a fixed size (isolation.WORK_SIZE); without one the
            watcher also sums the working directory's blocks each tick: status "disk" over DISK_BYTES.
"""
from __future__ import annotations

import os
import stat
from contextlib import suppress

TICK_S = 0.01
DISK_BYTES = 256 * 2 ** 20     # the working directory's budget where no tmpfs bounds it (= isolation.WORK_SIZE)
SMAPS_FIELDS = ("Private_Clean:", "Private_Dirty:", "Swap:", "Pss_Shmem:")
STATUS_FIELDS = ("RssAnon:", "RssFile:", "RssShmem:", "VmSwap:")


# --- control groups --------------------------------------------------------------------------
def _own_dirs() -> dict[str, str]:
    """-> {"v2" | "memory" | "pids": the directory of this process's own group in that hierarchy}."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            fields, (fstype, _, options) = left.split(), right.split()[:3]
            if fstype == "cgroup2":
                mounts.setdefault("v2", (fields[4], fields[3]))
            elif fstype == "cgroup":
                for c in ("memory", "pids"):
                    if c in options.split(","):
                        mounts.setdefault(c, (fields[4], fields[3]))
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in (controllers.split(",") if controllers else ["v2"]):
                if name in mounts:
                    where, root = mounts[name]
                    rel = path[len(root):] if path.startswith(root) and root != "/" else path
                    out[name] = where + rel.rstrip("/")
    return out


class Groups:
    """Two control groups (slots 0 and 1) for one fork server's runs. `create` returns None where none can
    be made, with the reason."""

    def __init__(self, dirs: list[str], v2: bool):
        self.dirs, self.v2 = dirs, v2   # dirs: the slot's parent directories ([memory, pids] on v1)
        self.limit = [0, 0]

    @classmethod
    def create(cls, name: str) -> tuple["Groups | None", str]:
        try:
            own = _own_dirs()
        except OSError as e:
            return None, f"no cgroup filesystem ({e})"
        v2_dir = own.get("v2")
        if "memory" in own and "pids" in own:
            dirs, v2 = [own["memory"], own["pids"]], False
        elif v2_dir and os.path.exists(os.path.join(v2_dir, "cgroup.controllers")):
            dirs, v2 = [v2_dir], True
        else:
            return None, "no cgroup hierarchy with a memory controller"
        groups = cls([os.path.join(d, f"{name}-slot") for d in dirs], v2)
        try:
            if v2 and not {"memory", "pids"} <= set(_read(os.path.join(v2_dir, "cgroup.subtree_control")).split()):
                _write(os.path.join(v2_dir, "cgroup.subtree_control"), "+memory +pids")
            for slot in (0, 1):
                for d in groups.slot_dirs(slot):
                    os.mkdir(d)
                groups.set_limit(slot, 64 * 2 ** 20, 64)
        except OSError as e:
            groups.remove()
            return None, f"cannot create control groups under {dirs[0]} ({e.strerror})"
        return groups, ""

    def slot_dirs(self, slot: int) -> list[str]:
        return [d + str(slot) for d in self.dirs]

    def enter(self, slot: int):
        """In a run's process: move itself into the slot's groups (everything it starts stays there)."""
        for d in self.slot_dirs(slot):
            _write(os.path.join(d, "cgroup.procs"), str(os.getpid()))

    def set_limit(self, slot: int, memory: int, processes: int):
        """Memory (bytes, swap included) and processes of the slot's group; written only when they change."""
        if self.limit[slot] == (memory, processes):
            return
        mem = self.slot_dirs(slot)[0]
        if self.v2:
            files = [("memory.max", memory), ("memory.swap.max", 0)]
        else:   # memsw (memory + swap) may never be below memory: raise it first, lower it last
            files = [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory)]
            if not os.path.exists(os.path.join(mem, files[1][0])):
                files = files[:1]
            elif memory > int(_read(os.path.join(mem, files[0][0]))):
                files.reverse()
        for name, value in files:
            _write(os.path.join(mem, name), str(value))
        _write(os.path.join(self.slot_dirs(slot)[-1], "pids.max"), str(processes))
        self.limit[slot] = (memory, processes)

    def oom_kills(self, slot: int) -> int:
        """How many processes the kernel killed in the slot's group for want of memory, ever."""
        text = _read(os.path.join(self.slot_dirs(slot)[0], "memory.events" if self.v2 else "memory.oom_control"))
        counts = dict(line.split() for line in text.splitlines() if line.count(" ") == 1)
        return int(counts.get("oom_kill", 0))

    def remove(self):
        for slot in (0, 1):
            for d in self.slot_dirs(slot):
                with suppress(OSError):
                    os.rmdir(d)

    def describe(self) -> str:
        swap = self.v2 or os.path.exists(os.path.join(self.slot_dirs(0)[0], "memory.memsw.limit_in_bytes"))
        return f"cgroup {'v2' if self.v2 else 'v1'}" + ("" if swap else " (swap not bounded: no memsw accounting)")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str):
    with open(path, "w") as f:
        f.write(text)


# --- the watcher -----------------------------------------------------------------------------
def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`: from /proc/PID/task/*/children where the kernel has them and the
    fork server may read them, else by a scan of every process's parent (no permission needed)."""
    try:
        kids = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(k) for k in f.read().split()]
        return kids
    except OSError:
        pass
    kids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def descendants(pid: int, skip: set[int]) -> list[int]:
    """Every process below `pid`, but the subtrees rooted at `skip`."""
    out, todo = [], [pid]
    while todo:
        kids = [k for k in children_of(todo.pop()) if k not in skip]
        out += kids
        todo += kids
    return out


def _read_proc(pid: int, name: str) -> str | None:
    """/proc/PID/name, or None for a process that has ended (or is a zombie: no memory, files or children
    left to read). PermissionError for a live process the fork server may not read."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        if _ended(pid):
            return None
        raise


def _ended(pid: int) -> bool:
    """A zombie, or exiting: its memory already gone (no VmSize), though its state may not say so yet."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return True
    return "\nVmSize:" not in text or text.split("\nState:", 1)[1].split()[0] in "ZXx"


def over_memory(pids: list[int], budget: int) -> bool:
    """Whether the processes hold more than `budget` bytes beyond what they share with the fork server:
    private memory, swap, their share of shared memory, and regular files they hold open that no name reaches
    any more (memfd, deleted files). A cheap upper bound first (resident anonymous and shared memory from
    /proc/PID/status, which counts pages still shared with the fork server in full); the exact sum from
    smaps_rollup (~2 ms a process) only when that bound passes the budget. PermissionError: the fork server
    cannot read a run's memory map (it must not hide a run's use)."""
    files = _deleted_files(pids)
    return (files + _sum(pids, "status", STATUS_FIELDS) > budget and
            files + _sum(pids, "smaps_rollup", SMAPS_FIELDS) > budget)


def _sum(pids: list[int], name: str, fields: tuple[str, ...]) -> int:
    """The fields (in kB) of /proc/PID/name summed over pids; a process that has ended counts nothing."""
    total = 0
    for pid in pids:
        text = _read_proc(pid, name) or ""
        total += sum(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(fields))
    return total


def _deleted_files(pids: list[int]) -> int:
    total, seen = 0, set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError):
            continue
        except PermissionError:
            if _ended(pid):
                continue
            raise
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def disk_of(path: str) -> int:
    """Blocks held by the files under `path` (each file once)."""
    total, seen, todo = 0, set(), [path]
    while todo:
        try:
            entries = list(os.scandir(todo.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.is_dir(follow_symlinks=False):
                todo.append(e.path)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total
