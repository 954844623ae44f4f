"""
Writing without losing anything: the rules every script follows in a folder a user touches.

- A script deletes or replaces only what it wrote itself and can prove it wrote: its temporary
  folders carry a marker file (MARKER) naming the process; a folder without one (a user's
  `mysite.old20241130` backup) is never touched, whatever its name.
- A replacement is swapped in only when complete (atomic renames; see data.building and
  data.write_atomic); an output file is written as an unnamed file (O_TMPFILE where the file
  system has it) that gets its name only when complete, so a killed process leaves nothing behind.
- An out folder has one writer at a time: `hold(folder)` takes an exclusive lock (flock) on
  folder/.nanobehavior.lock (removed again on release). The kernel releases it when the process ends, however
  it ends, so a killed run never leaves it held; a second writer is refused with one line.
"""

import errno
import os
import secrets
from contextlib import contextmanager

from configurator import ConfigError

MARKER = ".nanobehavior-temporary"   # inside a folder this project made and may remove
LOCK = ".nanobehavior.lock"          # the one-writer lock file in an out folder
_held = {}                           # folder -> [open lock file, its path, holds], of this process


def mark(folder, what):
    """Mark a folder we just created as ours to remove (pid and what it is, for a person reading it)."""
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as f:
        f.write(f"pid {os.getpid()}: {what}; made by nanoBehavior, removed by it when done\n")


def marked_by(folder):
    """The pid that marked `folder` as its temporary folder, or None (not ours: never touch it)."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            head = f.read(64).split()
        return int(head[1].rstrip(":")) if len(head) > 1 and head[0] == "pid" else None
    except (OSError, ValueError):
        return None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        pass
    return True


def hold(folder, what="a run", lock=None):
    """Take the one-writer lock of `folder` (the file folder/.nanobehavior.lock, or `lock`) for this
    process; holding it again only counts (release gives it back at the last). Raises ConfigError
    if another process holds it. The lock file is removed by release, and the kernel drops the lock
    when the process ends, however it ends. Where the file system has no locks (some NFS/FUSE
    mounts) a note says so and the run goes on without one."""
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][2] += 1
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{folder}: exists and is not a folder; choose another folder")
    try:
        import fcntl
    except ImportError:   # no flock (Windows): no lock
        return
    if lock is None:
        os.makedirs(folder, exist_ok=True)
        lock = os.path.join(folder, LOCK)
    for _ in range(10):
        f = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            who = f.read().strip()
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{folder}: another process is writing there ({who or 'a running job'}); "
                                  f"wait for it to end, or choose another folder") from None
            print(f"note: {lock}: this file system has no locks ({e.strerror}); nothing stops a second writer")
            return
        try:   # the file we locked may have been removed by its last holder meanwhile: lock the new one
            same = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"{what}, pid {os.getpid()}\n")
    f.flush()
    _held[key] = [f, lock, 1]


def release(folder):
    """Give the lock back (at the last of nested holds) and remove its file, still holding it, so
    no one locks a file that is being removed."""
    key = os.path.realpath(folder)
    if key not in _held:
        return
    _held[key][2] -= 1
    if _held[key][2] > 0:
        return
    f, lock, _ = _held.pop(key)
    try:
        os.remove(lock)
    except OSError:
        pass
    f.close()


def unnamed_file(folder):
    """An open fd of a new file in folder without a name (Linux O_TMPFILE), or None where the
    system cannot make one, or cannot give it a name later (no /proc/self/fd)."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except OSError:
        return None


@contextmanager
def atomic_output(path, mode="w", encoding="utf-8", newline=None):
    """Open `path` for writing (text, or mode="wb" bytes) so that it appears complete or not at
    all: the data goes into an unnamed file in the same folder (Linux O_TMPFILE), linked in under
    a fresh temporary name and renamed over `path` only after the block ends without error; a kill
    or an error leaves no file. Elsewhere a named PATH.tmpPID.RANDOM file, removed on error."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}.{secrets.token_hex(4)}"   # new: never another file of that name
    fd = unnamed_file(folder)
    named = fd is None
    if named:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    f = os.fdopen(fd, "wb") if mode == "wb" else os.fdopen(fd, "w", encoding=encoding, newline=newline)
    ours = named
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        if not named:   # the unnamed file gets its temporary name (a window of two system calls)
            d = os.open(folder, os.O_RDONLY)
            try:   # linkat(AT_SYMLINK_FOLLOW): CPython passes the flag only when a dir_fd is given
                os.link(f"/proc/self/fd/{f.fileno()}", tmp, src_dir_fd=d, follow_symlinks=True)
            finally:
                os.close(d)
            ours = True
        f.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            f.close()
        except OSError:   # a full disk fails the flush again: the file goes all the same
            pass
        if ours and os.path.lexists(tmp):
            os.remove(tmp)
        raise
