"""Run a student's notebook kernel in a sandbox, and the limits that bound it.

Threat model (see "How grading is isolated" in autograder/README.md): the student's
code runs in the notebook's kernel. The grader (nbgrader, the gradebook with the
hidden tests, the other students' notebooks) runs as root in the worker process.
When the grader runs as root on Linux, each kernel is started through
``python -m autograder.sandbox SPEC -- KERNEL_CMD...``, which, before it ``exec``s
the kernel:

* reads the kernel's connection file and the lecture's data files (as root);
* enters a private mount namespace and mounts fresh, size-capped tmpfs over every
  world-writable place (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``), and
  empty read-only mounts over the repository's top-level entries except the
  Python environment and the library (so ``solutions/``, ``autograder/``,
  ``.git`` ... are empty) and over the grading workspace; ``/home``, ``/work``,
  ``/srv``, ``/mnt`` and ``/media`` (other checkouts, other graders' workspaces)
  are covered by an empty tmpfs with only the kept paths bound back;
* makes ``/tmp/work`` (the kernel's cwd and its only writable folder) and
  ``/tmp/home`` owned by the sandbox uid;
* sets resource limits: address space (``memory_bytes``), file size and process
  count; core dumps off; the kernel's raw stdout/stderr go to a file in its own
  tmpfs (bounded by its size);
* drops to an unprivileged uid/gid (``SANDBOX_UID_BASE`` + the worker's pid; no
  passwd entry needed), with no supplementary groups and ``no_new_privs``.

When the mount namespace's last process ends, its tmpfs and every file the
student wrote are gone. After each notebook, :func:`kill_uid` kills every
process still running under the sandbox uid (a background process that outlived
the kernel included).

Not root (or no namespaces): the kernel runs as the grader's user, with the
resource limits only; :func:`available` says why, and the result notes say so.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

#: The sandbox uid of a worker process is ``SANDBOX_UID_BASE + its pid`` (gid the same; no
#: passwd entry needed): unique among the workers alive on the machine, so two grading
#: runs at once (two instructors, parallel tests) never kill each other's kernels.
SANDBOX_UID_BASE = 200_000

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one submission may use while it is graded (instructor-changeable).

    ``cell_timeout``: seconds one cell may run (then it is interrupted, its test
    counts 0, and the notebook goes on). ``notebook_timeout``: seconds for the
    whole notebook; cells after it are not run (0 points). ``memory_bytes``: the
    kernel's address space (RLIMIT_AS). ``output_bytes``: output kept per cell in
    the graded notebook (the rest is dropped as it arrives). ``scratch_bytes``: the
    kernel's private tmpfs and largest file it may write. ``max_processes``: how
    many processes the sandbox uid may have.
    """

    cell_timeout: int = 60
    notebook_timeout: int = 600
    memory_bytes: int = 4 * GiB
    output_bytes: int = 1 * MiB
    scratch_bytes: int = 256 * MiB
    max_processes: int = 256

    #: environment variables that override the defaults (for ``from_env``)
    ENV = {
        "cell_timeout": "AUTOGRADER_CELL_TIMEOUT",
        "notebook_timeout": "AUTOGRADER_NOTEBOOK_TIMEOUT",
        "memory_bytes": "AUTOGRADER_MEMORY_BYTES",
        "output_bytes": "AUTOGRADER_OUTPUT_BYTES",
        "scratch_bytes": "AUTOGRADER_SCRATCH_BYTES",
        "max_processes": "AUTOGRADER_MAX_PROCESSES",
    }

    @classmethod
    def from_env(cls, **overrides) -> "Limits":
        """Defaults, then ``AUTOGRADER_*`` environment variables, then ``overrides``."""
        values = {}
        for f in fields(cls):
            raw = os.environ.get(cls.ENV[f.name])
            if raw:
                values[f.name] = int(float(raw))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- can we?


_AVAILABLE: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """(True, "") when kernels can be isolated here; else (False, why not, in words)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        if sys.platform != "linux":
            _AVAILABLE = (False, f"kernel not isolated: sandboxing needs Linux (this is {sys.platform})")
        elif os.geteuid() != 0:
            _AVAILABLE = (False, "kernel not isolated: the grader does not run as root "
                          "(it ran as the grader's own user, with resource limits only)")
        else:
            import subprocess

            # try the real thing once: namespace, mounts, uid drop, exec
            repo = str(Path(__file__).resolve().parent.parent)
            spec = {"isolate": True, "uid": sandbox_uid(), "limits": Limits().to_dict(),
                    "repo": repo, "keep": [sys.prefix, sys.base_prefix], "hide": []}
            env = dict(os.environ, PYTHONPATH=repo)
            try:
                ok = subprocess.run(
                    [sys.executable, "-m", "autograder.sandbox", json.dumps(spec), "--",
                     sys.executable, "-c", "pass"],
                    capture_output=True, env=env, timeout=60,
                ).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            _AVAILABLE = (True, "") if ok else (
                False, "kernel not isolated: could not set up the sandbox here "
                "(mount namespaces or uid change refused)")
    return _AVAILABLE


def sandbox_uid(worker_pid: int | None = None) -> int:
    """The uid the kernels of worker ``worker_pid`` (default: this process) run under."""
    return SANDBOX_UID_BASE + (os.getpid() if worker_pid is None else int(worker_pid))


# --------------------------------------------------------------------------- processes


def uid_processes(uid: int) -> list[int]:
    """Pids of the processes whose real or effective uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                for line in fh:
                    if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                        break  # a zombie: already dead, only not reaped yet
                    if line.startswith("Uid:"):
                        ids = [int(x) for x in line.split()[1:3]]
                        if uid in ids:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return pids


def kill_uid(uid: int, rounds: int = 50) -> int:
    """SIGKILL every process of ``uid`` until none is left; returns how many were killed."""
    if uid == 0 or uid == os.getuid():
        return 0  # never: that would be the grader itself
    killed: set[int] = set()
    for _ in range(rounds):
        pids = uid_processes(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return len(killed)


# --------------------------------------------------------------------------- the launcher

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# Where people keep their files: covered by an empty read-only-to-the-kernel tmpfs, with
# only the kept paths (the environment, the library) bound back.
PRIVATE_ROOTS = ("/home", "/work", "/srv", "/mnt", "/media")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _c().mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None,
        ctypes.c_ulong(flags), data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _hide(path: str) -> None:
    """An empty, read-only view of ``path`` in this mount namespace."""
    if os.path.islink(path) or not os.path.exists(path):
        return
    if os.path.isdir(path):
        _mount("tlhidden", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0755")
    else:
        _mount("/dev/null", path, None, MS_BIND)


def _closed_ancestor(path: str) -> str | None:
    """The topmost ancestor of ``path`` that other users cannot enter (e.g. /root), or None."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        folder = os.path.join(*parts[:i])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def _expose(keep: list[str]) -> None:
    """Make each kept path reachable by the sandbox uid where an ancestor is closed
    (the base Python under /root): cover that ancestor with an empty tmpfs and bind
    the kept path back into it, so the rest of the ancestor stays out of sight."""
    groups: dict[str, list[str]] = {}
    for path in keep:
        top = _closed_ancestor(path)
        if top is not None and os.path.exists(path):
            groups.setdefault(top, []).append(path)
    for n, (top, paths) in enumerate(groups.items()):
        staged = []
        for m, path in enumerate(paths):
            stage = f"/tmp/.stage-{n}-{m}"
            os.makedirs(stage)
            _mount(path, stage, None, MS_BIND | MS_REC)
            staged.append((stage, path))
        _mount("tlcover", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for stage, path in staged:
            os.makedirs(path, exist_ok=True)
            _mount(stage, path, None, MS_BIND | MS_REC)
            _c().umount2(stage.encode(), 2)  # MNT_DETACH
            os.rmdir(stage)


def _cover_keeping(folder: str, keep: list[str], options: str) -> None:
    """Mount a fresh tmpfs over ``folder``, but keep the kept paths inside it visible.

    A checkout (and its .venv) may itself live under /tmp, e.g. in CI: hold each kept
    path open, cover the folder, then bind the held directory back at the same path.
    """
    inside = [k for k in keep if (k == folder or k.startswith(folder + os.sep)) and os.path.isdir(k)]
    held = [(k, os.open(k, os.O_PATH | os.O_DIRECTORY)) for k in inside]
    _mount("tlscratch", folder, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, fd in held:
        os.makedirs(path, exist_ok=True)  # root-owned 0755 folders inside the new tmpfs
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)


def read_data_files(folder: str, budget: int = 64 * MiB) -> dict[str, bytes]:
    """The lecture's data files next to the notebook (not notebooks), as bytes."""
    found: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith(".ipynb"):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            size = os.path.getsize(path)
            if size > budget:
                continue
            budget -= size
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = fh.read()
    return found


def _setrlimit(which: int, value: int) -> None:
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass


#: Environment variables a sandboxed process never inherits: the course secret seeds the hidden
#: tests' inputs and stays with the trusted grader; PYTHONPATH would let the grader's paths in.
DROPPED_ENV = ("PYTHONPATH", "JPY_PARENT_PID", "TRANSFORMER_LAB_SECRET")


def scrubbed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) without :data:`DROPPED_ENV`."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in DROPPED_ENV}


def enter(spec: dict, data: dict[str, bytes], files: dict[str, bytes] | None = None) -> dict[str, str]:
    """Turn this (root) process into a sandboxed one, up to but not including the uid drop.

    With ``spec["isolate"]``: a private mount namespace (see the module docstring) in which
    ``/tmp/work`` (the working folder, holding ``data``: relative path -> bytes) and
    ``/tmp/home`` belong to the sandbox uid, and every ``files`` entry (absolute path under
    ``/tmp`` -> bytes) is written read-only, owned by root. The caller reads whatever it needs
    from the real file system *before* calling this: afterwards the repository, the workspace
    and other checkouts are out of sight. Returns the environment the sandboxed process should
    run with (scrubbed, with its own HOME and caches). Call :func:`drop` next.
    """
    env = scrubbed_env()
    if not spec.get("isolate", False):
        return env
    uid = int(spec.get("uid") or sandbox_uid())
    if _c().unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    size = int(spec["limits"]["scratch_bytes"])
    keep = [os.path.realpath(p) for p in spec.get("keep", [])]
    for folder in WORLD_WRITABLE:
        if os.path.isdir(folder) and not os.path.islink(folder):
            _cover_keeping(folder, keep, f"size={size},mode=1777")
    for folder in PRIVATE_ROOTS:  # other checkouts, other courses' workspaces, homes
        if (os.path.isdir(folder) and not os.path.islink(folder)
                and not any(folder == k or folder.startswith(k + os.sep) for k in keep)):
            _cover_keeping(folder, keep, "size=64k,mode=0755")
    _expose(keep)
    for path in spec.get("hide", []):
        _hide(path)
    repo = spec.get("repo")
    if repo and os.path.isdir(repo):
        for name in os.listdir(repo):
            entry = os.path.realpath(os.path.join(repo, name))
            if any(k == entry or k.startswith(entry + os.sep) for k in keep):
                continue
            _hide(os.path.join(repo, name))
    work, home = "/tmp/work", "/tmp/home"
    for folder in (work, home):
        os.makedirs(folder, mode=0o700)
        os.chown(folder, uid, uid)
    for rel, blob in data.items():
        target = os.path.join(work, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(blob)
        os.chown(target, uid, uid)
    for path, blob in (files or {}).items():
        if not path.startswith("/tmp/"):
            raise ValueError(f"sandbox files go under /tmp; got {path}")
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(blob)
        os.chmod(path, 0o644)
    env.update(HOME=home, TMPDIR="/tmp", USER="tlgrader", LOGNAME="tlgrader",
               IPYTHONDIR=home + "/.ipython", MPLCONFIGDIR=home + "/.matplotlib",
               JUPYTER_RUNTIME_DIR=home + "/.runtime", XDG_CACHE_HOME=home + "/.cache")
    os.chdir(work)
    return env


def drop(spec: dict) -> None:
    """Resource limits, then (isolated) the unprivileged uid/gid and ``no_new_privs``."""
    limits = spec["limits"]
    _setrlimit(resource.RLIMIT_AS, int(limits["memory_bytes"]))
    _setrlimit(resource.RLIMIT_FSIZE, int(limits["scratch_bytes"]))
    _setrlimit(resource.RLIMIT_CORE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, no kill
    if spec.get("isolate", False):
        uid = int(spec.get("uid") or sandbox_uid())
        _setrlimit(resource.RLIMIT_NPROC, int(limits["max_processes"]))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        _c().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


# --------------------------------------------------------------------------- no new programs

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EPERM = 1
#: (audit arch, execve, execveat, x32 bit or 0) per machine: a filter that refuses both.
_EXEC_SYSCALLS = {
    "x86_64": (0xC000003E, 59, 322, 0x40000000),
    "aarch64": (0xC00000B7, 221, 281, 0),
}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def forbid_exec() -> str | None:
    """Refuse ``execve``/``execveat`` to this process and everything it forks (seccomp filter):
    it may fork copies of itself but never start a fresh program (a Python that imports an
    unblocked library). Returns None when installed, else why not, in words."""
    import platform

    machine = platform.machine()
    if sys.platform != "linux" or machine not in _EXEC_SYSCALLS:
        return f"exec not forbidden: no seccomp filter for {sys.platform}/{machine}"
    arch, execve, execveat, x32 = _EXEC_SYSCALLS[machine]
    deny = SECCOMP_RET_ERRNO | EPERM
    ld_w_abs, jeq_k, jge_k, ret_k = 0x20, 0x15, 0x35, 0x06
    prog = [
        (ld_w_abs, 0, 0, 4),                 # A = seccomp_data.arch
        (jeq_k, 1, 0, arch),                 # native arch: go on; else refuse everything
        (ret_k, 0, 0, deny),
        (ld_w_abs, 0, 0, 0),                 # A = seccomp_data.nr
    ]
    if x32:
        prog += [(jge_k, 3, 0, x32)]         # x32 ABI calls: refuse
    prog += [
        (jeq_k, 2, 0, execve),
        (jeq_k, 1, 0, execveat),
        (ret_k, 0, 0, SECCOMP_RET_ALLOW),
        (ret_k, 0, 0, deny),
    ]
    filters = (_SockFilter * len(prog))(*[_SockFilter(*f) for f in prog])
    fprog = _SockFprog(len(prog), filters)
    if _c().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return "exec not forbidden: prctl(PR_SET_NO_NEW_PRIVS) failed"
    if _c().prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return f"exec not forbidden: seccomp refused ({os.strerror(ctypes.get_errno())})"
    return None


def launch(spec: dict, cmd: list[str]) -> None:
    """Set up the sandbox and ``exec`` the kernel command (never returns)."""
    parent = os.getppid()  # the grader
    cmd = list(cmd)
    conn_at = cmd.index("-f") + 1 if "-f" in cmd else None
    if spec.get("isolate", False):
        uid = int(spec.get("uid") or sandbox_uid())
        conn = Path(cmd[conn_at]).read_bytes() if conn_at else b""
        env = enter(spec, read_data_files(os.getcwd()))
        if conn_at:
            cmd[conn_at] = os.path.join("/tmp/home", "kernel.json")
            with open(cmd[conn_at], "wb") as fh:
                fh.write(conn)
            os.chown(cmd[conn_at], uid, uid)
            os.chmod(cmd[conn_at], 0o600)
        log = os.open("/tmp/kernel-output.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchown(log, uid, uid)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    else:
        env = scrubbed_env()
        # not isolated: the kernel's raw output must not grow the grader's log without bound
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    drop(spec)
    _die_with(parent)
    os.execvpe(cmd[0], cmd, env)


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """SIGKILL this process (the kernel, once exec'd) when the grader that started it dies: a
    grader killed with its Dask worker would otherwise leave the student's kernel running under
    a uid nothing looks for any more. Set after :func:`drop`, which clears it (a uid change
    does), and kept across ``exec``."""
    if sys.platform != "linux":
        return
    _c().prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the grader died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m autograder.sandbox SPEC_JSON -- KERNEL_CMD...", file=sys.stderr)
        return 2
    launch(json.loads(argv[0]), argv[2:])
    return 1


if __name__ == "__main__":
    sys.exit(main())
