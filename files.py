"""
Writing without losing anything: the rules every script follows in a folder a user touches.

- A script deletes or replaces only what it wrote itself and can prove it wrote: its temporary
  folders carry a marker file (MARKER) naming the process; a folder without one (a user's
  `mysite.old20241130` backup) is never touched, whatever its name.
- A replacement is swapped in only when complete (atomic renames; see building and
  write_atomic below); an output file is written as an unnamed file (O_TMPFILE where the file
  system has it) that gets its name only when complete, so a killed process leaves nothing behind.
- An out folder has one writer at a time: `hold(folder)` takes an exclusive lock (flock) on
  folder/.nanobehavior.lock (removed again on release). The kernel releases it when the process ends, however
  it ends, so a killed run never leaves it held; a second writer is refused with one line.
"""

import errno
import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager

import numpy as np

from configurator import ConfigError, DataError, one_line

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


# -----------------------------------------------------------------------------
# a dataset folder (data.py): built whole beside it, swapped in by renames

def write_atomic(path, obj):
    """Write an array (.npy or raw .bin), a list of lines, a tokenizer or a dict (JSON), whole or not at all."""
    from tokenizer import PageTokenizer
    if isinstance(obj, PageTokenizer):
        obj.save(path)   # (through atomic_output too)
        return
    with atomic_output(path, "wb") as f:   # complete or absent, even after a kill (files.py)
        if path.endswith(".bin"):
            obj.tofile(f)
        elif path.endswith(".npy"):
            np.save(f, obj)
        elif isinstance(obj, dict):
            f.write(json.dumps(obj, indent=1).encode())
        else:
            f.write(("\n".join(obj) + "\n").encode("utf-8"))


@contextmanager
def building(data_dir, derived=()):
    """Yield a fresh folder beside data_dir (NAME.tmpPID, marked as ours: files.MARKER) to build a
    dataset in. On success it replaces data_dir by two renames, after hard-linking in the old
    folder's files that are not DERIVED (an input log, notes); on any failure it is removed and
    data_dir is left as it was. data_dir must be new, empty or a prepared dataset (meta.json): a
    folder of other files (a raw-data folder) is refused, never written into. One prepare per
    folder at a time (a lock beside it). A kill leaves the old folder too (NAME.oldPID, marked); the
    next prepare puts it back or removes it; folders not marked by us are never touched."""
    target = os.path.normpath(data_dir)
    if os.path.exists(target) and not os.path.isdir(target):
        raise DataError(f"{data_dir}: exists and is not a folder; choose another --out_dir")
    here = os.path.realpath(os.getcwd())
    if here == os.path.realpath(target) or here.startswith(os.path.realpath(target).rstrip(os.sep) + os.sep):
        raise DataError(f"{data_dir}: the current folder (or one above it); prepare into a folder of its own")
    if os.path.isdir(target) and not os.path.isfile(os.path.join(target, "meta.json")):
        theirs = sorted(e.name for e in os.scandir(target) if e.name != MARKER)
        if theirs:   # a raw-data folder, a home folder: its files would be overwritten or mixed in
            raise DataError(f"{data_dir}: holds {len(theirs)} file(s) ({', '.join(theirs[:3])}"
                            f"{', ...' if len(theirs) > 3 else ''}) and is not a prepared dataset; "
                            "prepare into a new or empty folder")
    parent, base = os.path.split(target)
    os.makedirs(parent or ".", exist_ok=True)   # data/ does not exist on a fresh clone
    with writing(data_dir, f"data.py preparing {data_dir}"):
        with swapping(data_dir, target, derived) as tmp:
            yield tmp


@contextmanager
def writing(data_dir, what):
    """Hold a dataset folder's one-writer lock (the file .NAME.nanobehavior.lock beside it: the folder is
    swapped by a prepare) while a block writes there: data.py, cluster.py."""
    from configurator import ConfigError
    target = os.path.normpath(data_dir)
    parent, base = os.path.split(target)
    try:
        hold(target, what, lock=os.path.join(parent or ".", f".{base}.nanobehavior.lock"))
    except ConfigError as e:
        raise DataError(str(e)) from None
    except OSError as e:   # the folder above cannot be written
        raise DataError(f"{data_dir}: cannot write beside it ({e.strerror or one_line(e)}: {e.filename})") from None
    try:
        yield
    finally:
        release(target)


@contextmanager
def swapping(data_dir, target, derived):
    """building's folder swap (the lock held)."""
    clean_leftovers(target)
    tmp, old = f"{target}.tmp{os.getpid()}", f"{target}.old{os.getpid()}"
    try:
        if marked_as_ours(tmp):
            shutil.rmtree(tmp, ignore_errors=True)   # this process's own, from an earlier failure
        os.makedirs(tmp)
        mark(tmp, f"a dataset being prepared for {target}")
        yield tmp
        if os.path.isdir(target):
            for name in os.listdir(target):
                if name not in derived and not re.search(r"\.tmp\d+(\.[0-9a-f]{8})?$", name) and name != MARKER \
                        and not os.path.lexists(os.path.join(tmp, name)):   # (a write of a killed process)
                    carry(os.path.join(target, name), os.path.join(tmp, name))
            mark(target, f"the previous dataset of {target}, replaced")   # it becomes NAME.oldPID: ours
            os.rename(target, old)
        os.rename(tmp, target)
        os.remove(os.path.join(target, MARKER))   # a dataset now, no longer ours to remove
    except BaseException as e:
        if os.path.isdir(old) and not os.path.exists(target):
            os.rename(old, target)  # failed between the two renames: put the old folder back
        if os.path.lexists(os.path.join(target, MARKER)):
            os.remove(os.path.join(target, MARKER))
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only folder, a file size limit
            where = f" {e.filename}" if e.filename else ""
            raise DataError(f"{data_dir}: cannot write the dataset ({e.strerror or one_line(e)}{where}); "
                            "the previous dataset is unchanged") from None
        raise
    if marked_as_ours(old):
        shutil.rmtree(old, ignore_errors=True)


def marked_as_ours(folder):
    """Was `folder` made (or set aside) by a prepare of this project? Only such folders are removed."""
    return os.path.isdir(folder) and marked_by(folder) is not None


def carry(src, dst):
    """Keep a file (or folder) of the old dataset folder in the new one: hard links, else a copy."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


def clean_leftovers(target):
    """What a killed prepare left beside target: NAME.tmpPID / NAME.oldPID folders that carry our
    marker and whose process is gone. An old folder whose swap was cut between its two renames is
    put back first; the rest are removed. A folder without the marker (a user's
    NAME.old20241130 backup) is never touched, whatever its name."""
    for path, kind, pid in leftovers(target):
        if marked_by(path) != pid or alive(pid):
            continue
        if kind == ".old" and not os.path.exists(target):
            os.rename(path, target)                       # first back, then no longer ours to remove
            os.remove(os.path.join(target, MARKER))
            print(f"{target}: put back from {path}, where a killed prepare had left it")
        else:
            shutil.rmtree(path, ignore_errors=True)


def leftovers(target):
    """[(path, '.tmp' or '.old', pid)] of the folders beside target named like a prepare's."""
    parent, base = os.path.split(os.path.normpath(target))
    out = []
    for name in os.listdir(parent or ".") if os.path.isdir(parent or ".") else []:
        kind, pid = name[len(base):len(base) + 4], name[len(base) + 4:]
        if name.startswith(base) and kind in (".tmp", ".old") and pid.isdigit():
            out.append((os.path.join(parent, name), kind, int(pid)))
    return out
