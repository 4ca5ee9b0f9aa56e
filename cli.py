"""Command-line plumbing shared by every script: one-line errors, the torch-version gate, validated flags,
devices, safe outputs, figures.

A user's mistake (a bad path, a broken or hostile file, an out-of-range flag) ends with one
line, `<script>: error: <what is wrong, where, what to do>`, and a non-zero exit status, never
a traceback; `describe` names a value from a file in a few words, however large. Outputs are
checked before any work is done (a typo in --out should not surface after an hour of
training), and results are written atomically so a crash never leaves half a file. Reading
untrusted inputs is untrusted.py's job.
"""
import argparse
import contextlib
import errno
import fractions
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

SEED_MAX = 2**32 - 1  # numpy and scikit-learn take seeds in [0, 2**32 - 1]
# torch.load(weights_only=True) is the boundary every zip checkpoint crosses. It had published
# bypasses up to 2.9: CVE-2025-32434 (code execution, fixed in 2.6.0) and CVE-2026-24747
# (memory corruption from crafted SETITEM opcodes or storage sizes, fixed in 2.10.0).
MIN_SAFE_TORCH = (2, 10)


class UserError(Exception):
    """An expected mistake by the user (bad path, bad file, bad flag): shown as one line."""

    exit_code = 1


class MissingFile(UserError, FileNotFoundError):
    """A file that does not exist: one line in a script, and a FileNotFoundError (an OSError) to code
    that calls the course's functions and catches what the course's own dataset.py raises."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.errno, self.filename = errno.ENOENT, None if path is None else str(path)

    def __str__(self):
        return self.args[0]  # the one line, not OSError's "[Errno 2] ..." form


class Interrupted(UserError):
    """Ctrl-C: shown as one line that says what was kept, exit status 130 as for any SIGINT."""

    exit_code = 130


def clip(text, limit=40):
    """text for an error message: at most `limit` characters of it, and its length when cut. A flag or
    file can hold megabytes; the one error line should not."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def one_line(error, limit=120):
    """An exception's own message as one short line, for the detail at the end of an error line."""
    return " ".join(str(error).split())[:limit] or type(error).__name__


def describe(value):
    """value in a few words for an error message, whatever a file put there: a number of 5,000
    digits, a string of megabytes or a list nested 200,000 deep is described, never printed
    in full and never walked."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:  # str() of a huge int is slow, and refused past 4,300 digits
            return f"a number of about {round(value.bit_length() * math.log10(2)):,} digits"
        return str(value)
    if isinstance(value, (str, bytes)):
        return repr(clip(value) if isinstance(value, str) else value[:40])
    torch = sys.modules.get("torch")  # imported by whoever holds a tensor; cli.py itself does not need it
    if torch is not None and isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value):,} item{'' if len(value) == 1 else 's'}"
    name = {"PickledArray": "numpy array", "PickledDataset": "MyDataset",
            "_StorageType": "torch storage type"}.get(type(value).__name__,
                                                                           type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def whole(value):
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def torch_version_tuple(version):
    """(major, minor) of a version string such as '2.14.1+cu128'."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(match[1]), int(match[2])) if match else (0, 0)


def require_safe_torch():
    """Refuse to run on a torch whose safe loader has known bypasses: every script at start, and
    untrusted.py before each torch.load (the course API has no start)."""
    import torch

    if torch_version_tuple(torch.__version__) < MIN_SAFE_TORCH:
        need = ".".join(map(str, MIN_SAFE_TORCH))
        raise UserError(
            f"torch {torch.__version__} is too old to load files safely (its weights_only loader has known "
            f"bypasses: CVE-2025-32434, CVE-2026-24747); upgrade to torch >= {need}: "
            "pip install -r requirements.txt"
        )


def run_main(main):
    """Run a script's main(): user mistakes become one 'error:' line and a non-zero exit status."""
    prog = Path(sys.argv[0]).name
    try:
        require_safe_torch()  # before any file is opened
        main()
    except UserError as e:
        message = one_line(e, limit=None)  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (MemoryError, RuntimeError) as e:
        # torch's allocators raise RuntimeError: "DefaultCPUAllocator: can't allocate memory", and
        # torch.OutOfMemoryError ("CUDA out of memory") on a GPU.
        if isinstance(e, RuntimeError) and not re.search(r"can't allocate memory|out of memory", str(e), re.I):
            raise
        print(f"{prog}: error: out of memory; try a smaller --batch-size or smaller data", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # `python tester.py | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        sys.exit(0)


# ---------------------------------------------------------------------------
# Flags


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line ('prog: error: ...'), not usage text plus an error."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        # argparse quotes a bad value in full (an invalid choice, an unknown argument): cut long ones.
        message = re.sub(r"'([^'\s]{41,})'", lambda m: f"'{clip(m[1])}'", message)  # a quoted value, cut inside
        message = re.sub(r"\S{61,}", lambda m: clip(m[0]), message)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_in(low, high=None):
    """argparse type: a whole number in [low, high] (high None: no upper bound)."""
    span = f"from {low} to {high}" if high is not None else f"of at least {low}"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {clip(text)!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {clip(text)}")
        return value

    parse.__name__ = "whole number"
    return parse


def float_in(low, high=math.inf, low_open=False, high_open=False):
    """argparse type: a finite number in the interval low..high (open ends as given).

    Fractions are accepted too ("8/255"), the way attack strengths are usually written.
    """
    left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
    span = f"{left}{low:g}, {'inf' if high == math.inf else f'{high:g}'}{right}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            try:
                value = float(fractions.Fraction(text))
            except (ValueError, ZeroDivisionError):
                raise argparse.ArgumentTypeError(f"expected a number in {span}, got {clip(text)!r}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"expected a finite number in {span}, got {clip(text)}")
        return value

    parse.__name__ = "number"
    return parse


seed_type = int_in(0, SEED_MAX)
positive_int = int_in(1)


def pick_device(name=None):
    """The requested torch device (cpu, cuda, cuda:N, mps), or for auto the first there is of CUDA,
    MPS (Apple silicon) and the CPU."""
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", str(name))
    if not match or (match[1] != "cuda" and match[2] is not None):
        raise UserError(f"--device {clip(name)!r}: expected cpu, cuda, cuda:N, mps or auto")
    if match[1] == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: torch sees no MPS device (Apple silicon with macOS 12.3 or newer); "
                        "use --device cpu")
    if match[1] == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: torch sees no CUDA GPU; use --device cpu")
        index = int(match[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UserError(f"--device {name}: torch sees {count} CUDA GPU{'' if count == 1 else 's'} ({names}); "
                            f"use {'it' if count == 1 else 'one of them'} or --device cpu")
    return torch.device(name)


_NOTED = set()


def note_once(message):
    """Print 'note: message' to stderr the first time it comes up in this run (a device's fallback, say)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Outputs


def check_output_dir(path, flag, create=True):
    """Make sure the folder can be written before any work starts: created if needed, or with create=False
    only checked to be creatable (a run refused later, say for a bad input file, leaves no folder behind;
    the writers create it: atomic_write)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a folder")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, so no folder can be made under it")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path if create else ancestor, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    return path


def check_output_file(path, flag):
    """Make sure a file can be written at path before any work starts, without making its folder yet."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {path}: not a regular file; refusing to replace it")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():  # named in the line as given, not as its folder
        raise UserError(f"{flag} {path}: {ancestor} is a file, so no file can be written under it")
    check_output_dir(path.parent, flag, create=False)  # made when written (atomic_write, file_lock)
    return path


def atomic_write(path, write):
    """Call write(file) on a temporary file next to path, then rename it over path.

    A crash, kill -9 or full disk mid-write leaves the old file intact instead of a
    truncated one; a write that fails is one UserError line.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(e)
        if cause is None:
            raise
        kept = "; the previous file is unchanged" if path.is_file() else ""
        raise UserError(f"{path}: cannot write ({cause.strerror or cause}){kept}") from None


@contextlib.contextmanager
def ctrl_c_after():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has ended, then raise it.

    For a write and the bookkeeping that says it happened: a Ctrl-C between the two would report
    the file as not written when it is. Only the main thread receives signals; elsewhere (and with
    SIGINT ignored) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, received[0])
        else:  # SIG_DFL: what the default would have done to this process
            raise KeyboardInterrupt


def _os_error_in(error):
    """The OSError behind an exception, if any: torch.save wraps a full disk in a RuntimeError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _lock(f, wait):
    """Lock the open file f exclusively: True once held; False when wait is False and another process
    holds it; OSError when the file system cannot lock at all."""
    if os.name == "nt":
        import msvcrt

        while True:  # msvcrt's own blocking mode gives up after 10 s
            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EDEADLOCK):
                    raise
                if not wait:
                    return False
                time.sleep(0.1)
    import fcntl

    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            return True
        except InterruptedError:
            continue
        except BlockingIOError:
            return False


@contextlib.contextmanager
def file_lock(lock_path, wait=True, busy=None):
    """Hold an exclusive lock on the file lock_path for the duration, and remove the file after.

    wait: block until the holder lets go; else raise busy() (a UserError saying so) at once if
    it is held. The OS drops the lock when its process dies, so a killed run never leaves a held
    lock, only (after kill -9) an empty file that the next run takes and removes. The holder
    unlinks the file before it lets go; a process that opened it meanwhile then holds a lock on
    a file no longer there, sees that, and locks the path again, so two processes never both
    hold the lock. A file system that cannot lock at all (some network file systems) is one
    note, and the block runs without the lock: refusing to run would be worse.
    """
    lock_path = Path(lock_path)
    while True:
        f = open(lock_path, "a+b")
        try:
            held = _lock(f, wait)
        except OSError as e:
            f.close()
            note_once(f"cannot lock {lock_path} ({e.strerror or e}); going on without the lock")
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    lock_path.unlink()
            return
        if not held:
            f.close()
            raise busy()
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield
    finally:
        if os.name == "nt":  # Windows deletes no open file: let go first
            f.close()
        with contextlib.suppress(OSError):
            lock_path.unlink()
        f.close()


@contextlib.contextmanager
def exclusive_lock(path, flag):
    """Hold an exclusive lock on path + '.lock' while writing path: a second run writing the same
    output stops with one line instead of racing the first. Nothing is left behind."""
    lock_path = Path(f"{path}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path.touch()  # an unwritable folder is one line here, not an OSError inside the lock
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the lock file {lock_path} ({e.strerror})") from None
    busy = lambda: UserError(f"{flag} {path}: another run is writing it (lock {lock_path} is held); wait for it "  # noqa: E731
                             "to finish or choose another output")
    with file_lock(lock_path, wait=False, busy=busy):
        yield


# ---------------------------------------------------------------------------
# Figures: every script's PNGs go through here


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures render headless, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi=120):
    """Write fig as a PNG atomically (creating the folder) and free it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)


def save_image(array, path, **imshow_kwargs):
    """Write an H x W (x 3) array as a PNG of exactly that size, atomically (matplotlib's imsave)."""
    plt = pyplot()
    atomic_write(path, lambda f: plt.imsave(f, array, format="png", **imshow_kwargs))
