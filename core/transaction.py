"""A command's outputs as one transaction: staged beside their targets, moved in together, or not at all.

Why: a command writes files that only make sense together (a model and its ``.data``, the QANN
twin, config and tokenizer, ``prefix.npz``, a report's files). Written in place, a failure, a full
disk, Ctrl-C or SIGTERM halfway leaves a mix: a model without its data, a 0-byte config.json that
later commands silently trust. So every writer (``modelio.atomic_outputs``, ``save_model``,
``copy_sidecars``, a report's folder) writes into a hidden stage folder ``.ttfsc-stage.*`` inside
the target's folder (same file system, so moving in is a rename) and registers the target with the
current ``Transaction``. The outermost ``transaction()`` block commits when it ends normally: in
the order staged (a model's data file before the model), each replaced file kept as a hard link
until every rename succeeded. On any exception, or a signal during the renames, whatever was
already moved in is put back, and stage folders, scratch folders and the folders created for the
run are removed.

Signals: ``interrupts_raise()`` (the CLI) turns SIGINT and SIGTERM into ``Interrupted``, a
KeyboardInterrupt, so the program unwinds through the same cleanup as Ctrl-C. Commit and cleanup
run ``Shielded`` (signals blocked, acted on afterwards), so a second signal cannot cut a cleanup
in half.

Guards (``guard``) run before a command's long computation: an output that is one of its inputs,
or a folder that cannot be written, is refused with one clear error.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import filecmp
import itertools
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ttfsc.errors import TtfscError

STAGE_PREFIX = ".ttfsc-stage."
BACKUP_FOLDER = ".ttfsc-backup"  # inside a stage folder: what the commit replaced, until it is final
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
PathLike = str | os.PathLike

# errno -> (what happened, what to do): faults of the disk, not of ttfsc, named as such
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere, and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere, and run again"),
    errno.EFBIG: ("file too large for its file system", "write to another file system"),
    errno.EROFS: ("read-only file system", "write to a writable folder"),
}


# ---------------------------------------------------------------- signals

class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program is, so it unwinds (and cleans up) like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(exc: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def _main_thread() -> bool:
    """Python runs signal handlers in the main thread only, and only there can they be changed."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise ``Interrupted``; later ones are ignored while it unwinds.

    SIGTERM's default would kill the process on the spot, leaving staged and scratch files behind;
    raised as an exception it runs every ``finally`` and transaction rollback. One signal is enough
    to stop: a second one (an impatient Ctrl-C) must not cut the cleanup short.
    """
    if not _main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in INTERRUPTS}

    def handler(signum: int, frame: FrameType | None) -> None:
        for s in INTERRUPTS:  # a Python no-op, not SIG_IGN: a signal already due would print a warning
            signal.signal(s, _ignore)
        if _importing(frame) and hasattr(signal, "setitimer"):
            _raise_after_import(signum)
            return
        raise Interrupted(signum)

    for s in INTERRUPTS:
        signal.signal(s, handler)
    alarm = signal.getsignal(signal.SIGALRM) if hasattr(signal, "SIGALRM") else None
    try:
        yield
    finally:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, alarm if alarm is not None else signal.SIG_DFL)
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


#: how often an interruption that arrived during an import looks again whether the import is over
IMPORT_RECHECK_S = 0.05


def _importing(frame: FrameType | None) -> bool:
    """Whether the interrupted code runs inside an import (a module body runs under importlib's frames)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise_after_import(signum: int) -> None:
    """Raise ``Interrupted`` as soon as no import is under way, checked on a short timer.

    An exception raised while an extension module initialises can abort the whole process: seen
    in CI as SIGABRT when Ctrl-C landed while transformers imported torch, with no cleanup at
    all. An import takes seconds at most, so the interruption waits for its end.
    """
    def again(_signum: int, frame: FrameType | None) -> None:
        if _importing(frame):
            signal.setitimer(signal.ITIMER_REAL, IMPORT_RECHECK_S)
            return
        raise Interrupted(signum)

    signal.signal(signal.SIGALRM, again)
    signal.setitimer(signal.ITIMER_REAL, IMPORT_RECHECK_S)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The handler once an interruption is unwinding: further signals change nothing."""


class Shielded:
    """SIGINT/SIGTERM held off during a critical section (a commit, a cleanup), acted on after it.

    The signals are blocked, and a Python handler already due runs a recorder instead, so nothing
    interrupts the section halfway. On exit a held signal goes to the original handler, unless
    ``deliver`` is false (the section is the cleanup of an interruption already under way).
    ``pending()`` tells the section whether a signal came meanwhile.
    """

    def __init__(self, deliver: bool = True) -> None:
        self.deliver = deliver
        self.held: list[int] = []
        self._active = False
        self._handlers: dict[int, Any] = {}
        self._mask: set[int] = set()

    def __enter__(self) -> "Shielded":
        if not _main_thread() or not hasattr(signal, "pthread_sigmask"):
            return self
        self._handlers = {s: signal.getsignal(s) for s in INTERRUPTS}
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
        for s in INTERRUPTS:
            signal.signal(s, self._record)
        self._active = True
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.held.append(signum)

    def pending(self) -> bool:
        """Whether a signal arrived since the section began."""
        return self._active and bool(self.held or set(signal.sigpending()) & set(INTERRUPTS))

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if not self._active:
            return False
        self._active = False
        for s in set(signal.sigpending()) & set(INTERRUPTS):
            self.held.append(s)
            signal.signal(s, signal.SIG_IGN)  # POSIX: ignoring a pending signal discards it
        for s, h in self._handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        if self.held and self.deliver and not isinstance(exc, KeyboardInterrupt):
            self._deliver(self.held[0])
        return False

    def _deliver(self, signum: int) -> None:
        handler = self._handlers[signum]
        if callable(handler):
            handler(signum, None)
        elif handler in (signal.SIG_DFL, None):
            signal.raise_signal(signum)


# ---------------------------------------------------------------- the transaction

@dataclass
class _Move:
    """One target of the transaction: its staged file or folder (None: remove the target), and the
    backup of what it replaced once moved in."""

    target: Path
    staged: Path | None
    serial: int
    backup: Path | None = None
    done: bool = False


def _target(path: PathLike) -> Path:
    """A target's key: its folder resolved (symlinks, ``..``), its own name kept (a symlink is replaced, not followed)."""
    p = Path(os.path.abspath(path))
    return p.parent.resolve() / p.name


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree; gone already is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _within(path: PathLike, folder: Path) -> bool:
    p = Path(os.path.abspath(path))
    return p == folder or folder in p.parents or Path(os.path.realpath(p)).is_relative_to(folder)


class Transaction:
    """The outputs of one command: staged, then moved in together by ``commit`` or dropped by ``rollback``."""

    def __init__(self) -> None:
        self._moves: dict[Path, _Move] = {}
        self._stages: dict[Path, Path] = {}   # target folder -> its stage folder
        self._created: list[Path] = []        # folders this run made, outermost first
        self._scratch: list[Path] = []
        self._inputs: list[Path] = []
        self._serial = itertools.count()

    # -------------------------------------------------------- staging

    def stage(self, target: PathLike, directory: bool = False) -> Path:
        """Where to write ``target`` (a file, or a folder with ``directory``): same name, in the stage folder."""
        t = _target(target)
        if t.is_dir() != directory and os.path.lexists(t) and not t.is_symlink():
            kind = "folder" if t.is_dir() else "file"
            raise TtfscError(f"{target}: is a {kind}, and the output is a {'folder' if directory else 'file'}; "
                             f"give a path that is not a {kind}.")
        staged = self.stage_folder(t.parent) / t.name
        _remove(staged)  # a second write of one target replaces the first
        if directory:
            staged.mkdir()
        move = self._moves.setdefault(t, _Move(t, staged, next(self._serial)))
        move.staged, move.serial = staged, next(self._serial)
        return staged

    def remove(self, target: PathLike) -> None:
        """Delete ``target`` at commit: a file the new output must not keep (a stale ``.data``)."""
        t = _target(target)
        self.discard(t)
        self._moves[t] = _Move(t, None, next(self._serial))

    def discard(self, target: PathLike) -> None:
        """Forget ``target``: its staged copy is deleted and nothing happens to it at commit."""
        move = self._moves.pop(_target(target), None)
        if move is not None and move.staged is not None:
            _remove(move.staged)

    def mark(self) -> int:
        """A point to ``discard_since``: everything staged later belongs to one failed block."""
        return next(self._serial)

    def discard_since(self, mark: int) -> None:
        for t in [t for t, m in self._moves.items() if m.serial > mark]:
            self.discard(t)

    def staged(self, target: PathLike) -> Path:
        """Where ``target`` can be read before the commit: its staged copy, else the path itself."""
        move = self._moves.get(_target(target))
        return move.staged if move is not None and move.staged is not None else Path(target)

    def is_staged(self, target: PathLike) -> bool:
        move = self._moves.get(_target(target))
        return move is not None and move.staged is not None

    # -------------------------------------------------------- folders

    def ensure_dir(self, folder: PathLike) -> Path:
        """Create ``folder`` and any missing parents, remembered so a rollback removes them again."""
        folder = Path(os.path.abspath(folder))
        missing = []
        p = folder
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with Shielded():  # made and remembered at once: a signal in between would leave it behind
                try:
                    d.mkdir()
                except FileExistsError:
                    continue
                except NotADirectoryError:
                    raise TtfscError(f"{folder}: cannot create this folder: {d.parent} is a file; "
                                     "choose an output path inside a folder.") from None
                self._created.append(d)
        return folder

    def stage_folder(self, folder: PathLike) -> Path:
        """The hidden stage folder inside ``folder`` (created on first use, with ``folder`` if need be)."""
        key = Path(os.path.abspath(folder)).resolve()
        if key not in self._stages:
            self.ensure_dir(folder)
            with Shielded():
                self._stages[key] = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder)).resolve()
        return self._stages[key]

    def scratch(self, folder: PathLike | None = None, tag: str = "work") -> Path:
        """A temporary folder for intermediate files (in ``folder``, else the system's), removed at the end.

        Files saved inside it are not outputs: writers put them there directly.
        """
        parent = None if folder is None else self.ensure_dir(folder)
        with Shielded():
            if parent is None:
                path = Path(tempfile.mkdtemp(prefix=f"ttfsc-{tag}-"))
            else:
                path = Path(tempfile.mkdtemp(prefix=f".ttfsc-{tag}.", dir=parent))
            self._scratch.append(path.resolve())
        return path

    def release(self, scratch: PathLike) -> None:
        """Remove a scratch folder now (shielded: an interrupted rmtree would leave half of it)."""
        path = Path(scratch).resolve()
        with Shielded():
            _remove(path)
        if path in self._scratch:
            self._scratch.remove(path)

    def is_scratch(self, path: PathLike) -> bool:
        """Whether ``path`` lies in a scratch or stage folder of this transaction (written directly)."""
        return any(_within(path, f) for f in [*self._scratch, *self._stages.values()])

    # -------------------------------------------------------- inputs

    def protect(self, paths: Iterable[PathLike]) -> None:
        """Input files: the commit never replaces one with different bytes (identical bytes: skipped)."""
        self._inputs += [Path(p) for p in paths if os.path.lexists(p)]

    def _skip_unchanged_inputs(self) -> None:
        for t, move in list(self._moves.items()):
            hit = next((i for i in self._inputs if os.path.lexists(t) and same_file(t, i)), None)
            if hit is None:
                continue
            if move.staged is not None and move.staged.is_file() and filecmp.cmp(move.staged, t, shallow=False):
                self.discard(t)  # copying an input onto itself is a no-op
                continue
            raise TtfscError(f"{t}: is an input of this command ({hit}); writing the output would change it. "
                             "Give the output another file name or folder.")

    # -------------------------------------------------------- the end

    def commit(self) -> None:
        """Move every staged output in; on any failure or signal meanwhile, put everything back."""
        with Shielded() as shield:
            try:
                self._skip_unchanged_inputs()
                for move in sorted(self._moves.values(), key=lambda m: m.serial):
                    self._install(move)
                if shield.pending():  # the signal is delivered when the shield ends
                    self._undo()
                    self._clean(created=True)
                    return
            except BaseException:
                self._undo()
                self._clean(created=True)
                raise
            self._clean(created=False)

    def rollback(self, exc: BaseException | None = None) -> None:
        """Drop everything: staged files, moves already made, scratch, the folders made for the run."""
        with Shielded(deliver=not isinstance(exc, KeyboardInterrupt)):
            self._undo()
            self._clean(created=True)

    def _install(self, move: _Move) -> None:
        t = move.target
        try:
            if os.path.lexists(t):
                move.backup = self._backup(t)
            if move.staged is not None:
                os.replace(move.staged, t)
        except OSError as exc:
            raise TtfscError(f"{t}: cannot move the finished output into place ({exc.strerror}); "
                             "nothing was changed. Check the folder's permissions and free space.") from None
        move.done = True

    def _backup(self, t: Path) -> Path:
        """Keep what ``t`` holds now: a hard link (``t`` stays in place until the rename), else moved aside."""
        folder = self.stage_folder(t.parent) / BACKUP_FOLDER
        folder.mkdir(exist_ok=True)
        backup = folder / t.name
        if not (t.is_dir() and not t.is_symlink()):
            try:
                os.link(t, backup, follow_symlinks=False)
                if self._moves[t].staged is None:
                    t.unlink()
                return backup
            except OSError:
                pass
        os.rename(t, backup)
        return backup

    def _undo(self) -> None:
        for move in sorted(self._moves.values(), key=lambda m: m.serial, reverse=True):
            if not move.done and move.backup is None:
                continue
            with contextlib.suppress(OSError):
                if move.done and move.staged is not None:
                    _remove(move.target)
                if move.backup is not None:
                    os.replace(move.backup, move.target)
            move.done, move.backup = False, None

    def _clean(self, created: bool) -> None:
        for path in [*self._stages.values(), *self._scratch]:
            _remove(path)
        self._stages.clear()
        self._scratch.clear()
        if created:
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty: never anything the run did not make
            self._created.clear()


_CURRENT: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("ttfsc_transaction", default=None)


def current() -> Transaction | None:
    """The transaction of the command now running, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def transaction() -> Iterator[Transaction]:
    """A command's outputs, committed when the outermost block ends normally, rolled back on any exception.

    Nested blocks (compile quantizing a float model first) join the outer one, so the QANN twin,
    the spiking model and their sidecars appear together.
    """
    outer = _CURRENT.get()
    if outer is not None:
        yield outer
        return
    txn = Transaction()
    token = _CURRENT.set(txn)
    try:
        try:
            yield txn
        except BaseException as exc:
            txn.rollback(exc)
            if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:  # a write no ``writing`` block named
                reason, fix = DISK_ERRORS[exc.errno]
                raise TtfscError(f"{exc.filename or 'an output file'}: cannot write it: {reason}; {fix} "
                                 "(nothing of this run was left behind).") from None
            raise
        txn.commit()
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def output_block(first_target: PathLike) -> Iterator[Transaction]:
    """The transaction a few files are written in: the command's, or (no command running, or the files
    are scratch) one of their own, committed when the block ends. A failing block takes back what it
    staged, so the command's transaction never commits a half-written file."""
    outer = _CURRENT.get()
    if outer is None or outer.is_scratch(first_target):
        own = Transaction()
        try:
            yield own
        except BaseException as exc:
            own.rollback(exc)
            raise
        own.commit()
        return
    mark = outer.mark()
    try:
        yield outer
    except BaseException:
        outer.discard_since(mark)
        raise


def staged(target: PathLike) -> Path:
    """Where an output of the running command can be read before it is moved in (a QANN twin)."""
    txn = _CURRENT.get()
    return txn.staged(target) if txn is not None else Path(target)


def work_folder(folder: PathLike) -> Path:
    """A folder for a temporary file that belongs beside the outputs of ``folder`` (a weight spill file):
    the command's stage folder there, so a rollback removes it too; else ``folder`` (created)."""
    txn = _CURRENT.get()
    if txn is not None and not txn.is_scratch(folder):
        return txn.stage_folder(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


@contextlib.contextmanager
def writing(target: PathLike, what: str = "") -> Iterator[None]:
    """A full disk (or a read-only one) while writing ``target`` becomes one clear error naming it."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        reason, fix = DISK_ERRORS[exc.errno]
        raise TtfscError(f"{target}: cannot write {what or 'it'}: {reason}; {fix} "
                         "(nothing of this run was left behind).") from None


# ---------------------------------------------------------------- guards, before the work

def same_file(a: PathLike, b: PathLike) -> bool:
    """One file under two names: the same inode (hard links, symlinks) or, for a path not there yet, one real path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting(outputs: Mapping[PathLike, str], inputs: Mapping[PathLike, str], flag: str = "-o") -> None:
    """Refuse an output that is one of the command's input files (``{path: what it is}`` both)."""
    for out, out_role in outputs.items():
        for inp, in_role in inputs.items():
            if same_file(out, inp):
                raise TtfscError(f"{out}: {out_role} would overwrite {in_role} ({inp}); give {flag} another "
                                 "file name or folder.")


def refuse_replacing_folder(folder: PathLike, inputs: Mapping[PathLike, str], flag: str) -> None:
    """Refuse an output folder (replaced whole) that holds one of the inputs."""
    root = os.path.realpath(folder)
    for inp, role in inputs.items():
        real = os.path.realpath(inp)
        if real == root or os.path.commonpath([root, real]) == root:
            raise TtfscError(f"{flag} {folder}: replacing this folder would delete {role} {inp}; "
                             f"give {flag} a folder of its own.")


def refuse_changing(copies: Mapping[PathLike, PathLike], inputs: Mapping[PathLike, str], flag: str = "-o") -> None:
    """Refuse, before the long work, ``{target: new file}`` copies that would change an input's bytes
    (a file copied onto itself, as a tokenizer exported into its own folder, is fine)."""
    for target, new in copies.items():
        for inp, role in inputs.items():
            if os.path.lexists(target) and same_file(target, inp) and not filecmp.cmp(new, target, shallow=False):
                raise TtfscError(f"{target}: the output's {Path(target).name} would replace {role} ({inp}) with "
                                 f"a different file; give {flag} a path in another folder.")


def check_writable(folder: PathLike, flag: str = "-o") -> None:
    """The output folder (or the nearest existing folder above it, where it will be created) must be writable."""
    p = Path(os.path.abspath(folder))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise TtfscError(f"{flag} {folder}: {p} is a file, not a folder; give {flag} a path inside a folder.")
    if not os.access(p, os.W_OK | os.X_OK):
        raise TtfscError(f"{flag} {folder}: the folder {p} is not writable; give {flag} a folder you can write to.")


def guard(outputs: Mapping[PathLike, str], inputs: Mapping[PathLike, str], flag: str = "-o") -> None:
    """All checks on a command's outputs before its work starts; the inputs are protected at commit too."""
    for out in outputs:
        if os.path.isdir(out) and not os.path.islink(out):
            raise TtfscError(f"{flag} {out}: is a folder; give {flag} the path of a file in it.")
    for folder in dict.fromkeys(Path(os.path.abspath(o)).parent for o in outputs):
        check_writable(folder, flag)
    refuse_overwriting(outputs, inputs, flag)
    txn = _CURRENT.get()
    if txn is not None:
        txn.protect(inputs)
