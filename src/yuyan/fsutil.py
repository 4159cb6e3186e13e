"""What every command that writes files shares: the safe-output-folder rule, one lock per run folder, and
one mapper from OS errors to a `UserError` line.

Output folders. A command writes only into a folder that is empty, missing, or ours; "ours" is decided by
a marker we write (`.yuyan-output`, or the `manifest.json` with `"format": "yuyan"` that every atomically
written model folder carries), never by guessing from file names. A non-empty folder that is not ours is
refused with the names in the way unless the caller passes `force`; a destination that is a source of the
command, lies inside one or holds one (`convert to-hf X X`) is refused always. Replacing an output folder
keeps what we did not write (`foreign_entries`): nothing a user put there is ever deleted.

Locks. `hold_lock(folder)` takes a non-blocking `fcntl.flock` on `folder/.yuyan-lock` and writes its pid
there: a second process gets one line naming the folder and the holder's pid at once, and the kernel drops
the lock when the holder exits or is killed, so there is no stale lock to clean up. Within one process the
same folder may be locked again (the CLI locks before the recipe does); each hold is released once.

OS errors. `os_error_line(e, path)` turns ENOSPC, EACCES, EROFS, ENOENT ... (also torch's `enforce fail at
inline_container.cc` and safetensors' IoError text, which carry no errno attribute) into one line naming
the path and the fix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from pathlib import Path

from yuyan.errors import UserError

MARKER = ".yuyan-output"
LOCK = ".yuyan-lock"
MANIFEST = "manifest.json"
MAX_MARKER_BYTES = 1 << 20  # a marker or manifest larger than this is not one of ours


def read_small_json(path: Path) -> object | None:
    """The JSON in a regular file of at most MAX_MARKER_BYTES; None when it is missing, not a regular file
    (a FIFO or a device would block or never end), too big or not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MARKER_BYTES:
            return None
        data = os.read(fd, MAX_MARKER_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError:
        return None


def written_by_us(folder: Path) -> set[str] | None:
    """The top-level names in `folder` that we wrote (None: the folder is not ours).

    A `.yuyan-output` marker makes the whole folder ours; a yuyan manifest.json makes the files it lists
    (and itself) ours."""
    marker = read_small_json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("format") == "yuyan":
        return {p.name for p in _entries(folder)}
    manifest = read_small_json(folder / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == "yuyan":
        files = manifest.get("files")
        names = {n for n in files if isinstance(n, str)} if isinstance(files, dict) else set()
        return names | {MANIFEST, MARKER}
    return None


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _our_folder(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and written_by_us(p) is not None


def foreign_entries(folder: Path) -> list[Path]:
    """The entries of `folder` we did not write (every entry when the folder is not ours)."""
    ours = written_by_us(folder) or set()
    return [p for p in _entries(folder) if p.name not in ours and p.name != LOCK]


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(
    dest: str | os.PathLike, *, force: bool = False, sources: tuple = (), flag: str = "--force"
) -> Path:
    """Refuse a destination we must not write: a file, a source of the command (or inside or around one),
    or a non-empty folder that is not ours (unless `force`). Returns the destination as a Path."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"output {dest} exists and is not a folder; choose a folder")
    real = dest.resolve()
    for src in sources:
        if src is None or not Path(src).exists():
            continue  # hf:NAME, stdlib, a glob: nothing on disk to overwrite
        s = Path(src).resolve()
        if _inside(real, s) or _inside(s, real):
            how = "is" if real == s else "is inside" if _inside(real, s) else "holds"
            raise UserError(
                f"output folder {dest} {how} the input {src}: writing it would destroy the input; "
                "choose another output folder"
            )
    if dest.is_dir() and not force and written_by_us(dest) is None:
        # a folder that holds only folders of ours (runs/ holding runs/a and runs/b) is not in the way
        names = [p.name for p in _entries(dest) if p.name != LOCK and not _our_folder(p)]
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise UserError(
                f"output folder {dest} is not empty and was not written by yuyan ({shown} in the way); "
                f"choose an empty folder, or pass {flag} to write into it (nothing of yours is deleted)"
            )
    return dest


def claim_output_dir(
    dest: str | os.PathLike, *, force: bool = False, sources: tuple = (), command: str = ""
) -> Path:
    """check_output_dir, then create the folder and mark it ours (so a re-run into it is allowed)."""
    return mark_ours(check_output_dir(dest, force=force, sources=sources), command)


def mark_ours(folder: str | os.PathLike, command: str = "") -> Path:
    """Create `folder` if needed and write our marker into it (once)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / MARKER).exists():
            (folder / MARKER).write_text(
                json.dumps({"format": "yuyan", "command": command}) + "\n", encoding="utf-8"
            )
    except OSError as e:
        raise UserError(os_error_line(e, folder)) from None
    return folder


# ---------------------------------------------------------------------------------------------- locks

_HELD: dict[Path, list] = {}  # folder -> [fd, holds] for the locks this process holds


class FolderLock:
    """One hold of the advisory lock on a folder; `release()` drops it (the last hold closes the file)."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def release(self) -> None:
        if self.folder is None or self.folder not in _HELD:
            return
        entry = _HELD[self.folder]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.folder]
            os.close(entry[0])  # closing the descriptor drops the flock
        self.folder = None

    def __del__(self) -> None:  # a run that raised: its hold ends with its frame
        self.release()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_lock(folder: str | os.PathLike, what: str = "run folder") -> FolderLock:
    """Take the non-blocking advisory lock on `folder` (created if missing) or fail at once with the pid
    of the process that holds it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = folder.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return FolderLock(key)
        fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise UserError(os_error_line(e, folder)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            raise UserError(
                f"{what} {folder} is in use by another yuyan process (pid {holder}); wait for it to "
                "finish or stop it, or choose another folder"
            ) from None
        raise UserError(os_error_line(e, folder / LOCK)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return FolderLock(key)


# ------------------------------------------------------------------------------------------ OS errors

FIXES = {
    errno.ENOSPC: "no space left on the device: free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or write to another disk",
    errno.EACCES: "permission denied: choose a folder you may write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you may write, or fix its permissions",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.ENOENT: "no such file or folder: check the path (its parent folders must exist)",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder where a file was expected: check the path",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and retry",
    errno.EIO: "input/output error: the disk may be failing; write to another disk",
    errno.EFBIG: "the file is too large for this file system: write to another disk",
}
_OS_CODE = re.compile(r"(?:code: |errno |Errno )(\d+)")


def os_error_line(e: BaseException, path: str | os.PathLike | None = None) -> str:
    """One line for an OS-level failure: the path, what went wrong and the fix.

    torch.save reports a full disk as a RuntimeError (`enforce fail at inline_container.cc ... file write
    failed`) and safetensors as `IoError(Os { code: 28, ... })`: neither carries errno, so the number is read
    from the text when it is there."""
    code = getattr(e, "errno", None)
    if code is None:
        m = _OS_CODE.search(str(e))
        code = int(m.group(1)) if m else None
    where = getattr(e, "filename", None) or path or "a file"
    if code in FIXES:
        return f"{where}: {FIXES[code]}"
    text = str(e).strip()
    detail = getattr(e, "strerror", None) or (text.splitlines()[0][:160] if text else type(e).__name__)
    return (
        f"{where}: {detail}; the disk may be full, read-only or failing: free some space or write to "
        "another folder"
    )


def is_os_failure(e: BaseException) -> bool:
    """An OSError, or the text of one wrapped by torch.save or safetensors (RuntimeError, SafetensorError)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return "inline_container" in text or "IoError" in text or "file write failed" in text


__all__ = [
    "MARKER",
    "LOCK",
    "FolderLock",
    "read_small_json",
    "written_by_us",
    "foreign_entries",
    "check_output_dir",
    "claim_output_dir",
    "mark_ours",
    "hold_lock",
    "os_error_line",
    "is_os_failure",
]
