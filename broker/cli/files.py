"""``keybroker encrypt-file`` / ``decrypt-file`` / ``rewrap-file``: kbe1 messages over files,
directories and standard input/output, streamed (constant memory whatever the size).

A file output is written to a temporary file beside it (mode 0600) and renamed only when the
whole message was processed; on any failure the partial output is removed and the exit
status is 1. Standard output cannot be taken back: there, the exit status is the verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from broker.cli.common import Session, add_command, context_pairs, key_name_arg
from broker.envelope import Envelope, Header
from broker.envelope.format import DEFAULT_FRAME_SIZE, MAX_FRAME_SIZE
from broker.errors import BrokerError, ConfigError
from broker.sdk.errors import KeybrokerError

SUFFIX = ".kbe"

EXAMPLES = """\
examples:
  keybroker encrypt-file --key payments --context tenant=acme report.pdf       # report.pdf.kbe
  keybroker encrypt-file --key payments --key escrow-hsm --context tenant=acme data/ --out sealed/
  tar c logs | keybroker encrypt-file --key payments > logs.tar.kbe            # stdin to stdout
  keybroker decrypt-file --context tenant=acme report.pdf.kbe                   # report.pdf
  keybroker rewrap-file --context tenant=acme sealed/                # every .kbe to its keys' latest versions
  keybroker rewrap-file --to-key archive --context tenant=acme report.pdf.kbe   # add a key (any backend)
  keybroker rewrap-file --to-key archive --drop-key payments --context tenant=acme report.pdf.kbe  # move
"""


@dataclass(frozen=True)
class Job:
    source: Path | None  # None: standard input
    target: Path | None  # None: standard output


Action = Callable[
    [Envelope, BinaryIO, BinaryIO, argparse.Namespace, int | None, Callable[[int], None]], Header
]


def _encrypt(
    env: Envelope,
    src: BinaryIO,
    dst: BinaryIO,
    args: argparse.Namespace,
    size: int | None,
    tick: Callable[[int], None],
) -> Header:
    return env.encrypt(args.key, src, dst, context_pairs(args.context), progress=tick)


def _decrypt(
    env: Envelope,
    src: BinaryIO,
    dst: BinaryIO,
    args: argparse.Namespace,
    size: int | None,
    tick: Callable[[int], None],
) -> Header:
    return env.decrypt(src, dst, context_pairs(args.context), progress=tick)


def _rewrap(
    env: Envelope,
    src: BinaryIO,
    dst: BinaryIO,
    args: argparse.Namespace,
    size: int | None,
    tick: Callable[[int], None],
) -> Header:
    return env.rewrap(
        src,
        dst,
        context_pairs(args.context),
        to_keys=args.to_key or None,
        drop_keys=args.drop_key or (),
        progress=tick,
    )


# -- which files ----------------------------------------------------------------------------


def _target_name(mode: str, name: str) -> str:
    if mode == "encrypt":
        return name + SUFFIX
    if mode == "decrypt":
        return name[: -len(SUFFIX)]
    return name


def _wanted(mode: str, path: Path) -> bool:
    """In a directory: encrypt what is not sealed yet; decrypt and rewrap the .kbe files."""
    sealed = path.name.endswith(SUFFIX) and len(path.name) > len(SUFFIX)
    return not sealed if mode == "encrypt" else sealed


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` in a stable order; symbolic links are not followed."""
    for top, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(top) / name
            if path.is_file() and not path.is_symlink() and not name.startswith("."):
                yield path


def plan(mode: str, inputs: list[str], out: str | None) -> list[Job]:
    """The (source, target) pairs a command line asks for, checked before anything is read."""
    if not inputs or inputs == ["-"]:
        return [Job(None, Path(out) if out else None)]
    if "-" in inputs:
        raise ConfigError("'-' (standard input) cannot be mixed with files")
    out_dir = Path(out) if out and (len(inputs) > 1 or Path(out).is_dir()) else None
    jobs: list[Job] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            for found in _walk(path):
                if _wanted(mode, found):
                    base = (out_dir or Path(out)) / found.relative_to(path) if out else found
                    jobs.append(Job(found, base.with_name(_target_name(mode, base.name))))
            continue
        if not path.is_file():
            raise ConfigError(f"{given}: no such file or directory")
        if mode == "decrypt" and not out and not _wanted(mode, path):
            raise ConfigError(f"{given}: does not end in {SUFFIX}; name the output with --out")
        if out_dir is not None:
            jobs.append(Job(path, out_dir / _target_name(mode, path.name)))
        elif out:
            jobs.append(Job(path, Path(out)))
        else:
            jobs.append(Job(path, path.with_name(_target_name(mode, path.name))))
    if not jobs:
        raise ConfigError("no files to process in " + ", ".join(inputs))
    _no_collisions(jobs)
    for job in jobs:
        if job.source is not None and job.target == job.source:
            _in_place_allowed(job.source)
    return jobs


def _in_place_allowed(path: Path) -> None:
    """An in-place rewrap replaces the directory entry: through a symbolic link or beside other
    hard links the old header (wrappings under a dropped key included) would live on in the file
    the other names still reach. Refused before anything is read."""
    if path.is_symlink():
        raise ConfigError(
            f"{path} is a symbolic link: rewrap the file it points to ({os.path.realpath(path)}), "
            "or write a copy with --out"
        )
    links = path.stat().st_nlink
    if links > 1:
        raise ConfigError(
            f"{path} has {links} hard links: an in-place rewrap would leave the old header in the "
            "others; write a copy with --out"
        )


def _no_collisions(jobs: list[Job]) -> None:
    """Refuse a plan in which one file's output would replace another's output, or another
    job's input before it is read (``encrypt-file x x.kbe --force``: x.kbe lost)."""
    sources = {os.path.realpath(job.source) for job in jobs if job.source is not None}
    targets: set[str] = set()
    for job in jobs:
        if job.target is None or job.source is None:
            continue
        target = os.path.realpath(job.target)
        if target in targets:
            raise ConfigError(f"two inputs would both be written to {job.target}")
        if target in sources and target != os.path.realpath(job.source):
            raise ConfigError(f"{job.target} is both an input and the output of another input")
        targets.add(target)


# -- writing safely -------------------------------------------------------------------------


def _exists_error(target: Path) -> ConfigError:
    return ConfigError(f"{target} already exists; refusing to overwrite it (--force to replace)")


@contextlib.contextmanager
def _replacing(target: Path, overwrite: bool, *, keep_mode: bool = False) -> Iterator[BinaryIO]:
    """A new 0600 temporary file beside ``target``, put in its place only if the block succeeds.
    ``keep_mode``: the file replaces itself (an in-place rewrap) and keeps its permission bits."""
    if target.exists() and not overwrite:
        raise _exists_error(target)
    mode = stat.S_IMODE(target.stat().st_mode) if keep_mode else None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield cast(BinaryIO, fh)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        _publish(temp, target, overwrite)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _publish(temp: str, target: Path, overwrite: bool) -> None:
    """Put ``temp`` at ``target``. Without ``overwrite`` a file that appeared there while we
    worked (the check above was minutes ago for a large file) is never replaced: a hard link
    fails if the name exists, where a rename would silently replace it."""
    if overwrite:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target)
    except FileExistsError:
        # Only a dangling symbolic link may be replaced (as the check above allowed): it is
        # no file, and replacing it never writes through it.
        if target.exists() or not target.is_symlink():
            raise _exists_error(target) from None
        os.replace(temp, target)
        return
    except OSError:  # a filesystem without hard links: the check above has to do
        if target.exists():
            raise _exists_error(target) from None
        os.replace(temp, target)
        return
    os.unlink(temp)


def _progress(args: argparse.Namespace, label: str, total: int | None) -> Any:
    """A byte progress bar on a terminal's stderr; a no-op when piped or with --quiet."""
    from tqdm import tqdm

    quiet = bool(args.quiet) or not sys.stderr.isatty()
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=quiet, leave=False
    )


def _run_one(env: Envelope, action: Action, job: Job, args: argparse.Namespace) -> dict[str, Any]:
    size = job.source.stat().st_size if job.source is not None else None
    label = job.source.name if job.source is not None else "stdin"
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress(args, label, size))
        if job.source is None:
            if sys.stdin.isatty():
                raise ConfigError("give files, or the data on standard input")
            src: BinaryIO = sys.stdin.buffer
        else:
            src = stack.enter_context(job.source.open("rb"))
        in_place = job.target is not None and job.source is not None and job.target == job.source
        if job.target is None:
            dst: BinaryIO = sys.stdout.buffer
        else:
            dst = stack.enter_context(
                _replacing(job.target, bool(args.force) or in_place, keep_mode=in_place)
            )
        header = action(env, src, dst, args, size, bar.update)
        dst.flush()
    return {
        "input": str(job.source) if job.source else "-",
        "output": str(job.target) if job.target else "-",
        "keys": list(header.keys),
    }


def _command(mode: str, action: Action) -> Callable[[argparse.Namespace, Session], int]:
    def run(args: argparse.Namespace, session: Session) -> int:
        jobs = plan(mode, list(args.inputs), args.out)
        _terminate_cleanly()
        # The SDK client is the key source as it is (one client code path with every other command).
        env = Envelope(session.client(), frame_size=getattr(args, "frame_size", DEFAULT_FRAME_SIZE))
        if len(jobs) == 1:
            done = [_run_one(env, action, jobs[0], args)]  # errors go to main: one line, or JSON
            failed = 0
        else:
            done, failed = [], 0
            for job in jobs:
                try:
                    done.append(_run_one(env, action, job, args))
                except (BrokerError, KeybrokerError, OSError) as exc:
                    # Many files: report each failure (an unreadable file, a full disk, a refusal)
                    # and go on with the others; the exit status says some failed.
                    failed += 1
                    print(f"keybroker: error: {job.source}: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"done": done, "failed": failed}))
        elif not args.quiet:
            for item in done:
                if item["output"] != "-":
                    print(f"{item['input']} -> {item['output']}", file=sys.stderr)
        return 1 if failed else 0

    return run


def _terminate_cleanly() -> None:
    """SIGTERM (a service manager, ``kill``) and SIGHUP (a closed terminal; left alone under
    nohup) unwind like Ctrl-C: the temporary file being written is removed and the original
    left as it was, instead of the process vanishing with a ``.partial`` file beside it."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal went away
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, stop)


def _frame_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {value!r}") from None
    if not 1 <= size <= MAX_FRAME_SIZE:
        raise argparse.ArgumentTypeError(f"the frame size must be 1 to {MAX_FRAME_SIZE} bytes")
    return size


def add_parsers(sub: Any) -> None:
    def command(name: str, help_: str, mode: str, action: Action) -> argparse.ArgumentParser:
        p = add_command(
            sub,
            name,
            help_,
            _command(mode, action),
            epilog=EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("inputs", nargs="*", metavar="INPUT", help="files or directories ('-' or none: stdin)")
        p.add_argument(
            "--out", "-o", help="output file, or directory for several inputs (default: beside each)"
        )
        p.add_argument(
            "--context", action="append", metavar="KEY=VALUE", help="encryption context (repeatable)"
        )
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
        p.add_argument("--force", action="store_true", help="replace existing output files")
        return p

    p = command("encrypt-file", "seal files or a stream in the kbe1 envelope format", "encrypt", _encrypt)
    p.add_argument(
        "--key",
        action="append",
        required=True,
        type=key_name_arg,
        help="key to wrap the data key under (repeat for several: any one of them opens the message)",
    )
    p.add_argument(
        "--frame-size", type=_frame_size, default=DEFAULT_FRAME_SIZE, help="plaintext bytes per frame"
    )
    command(
        "decrypt-file", "verify and open kbe1 messages (files, directories or a stream)", "decrypt", _decrypt
    )
    p = command(
        "rewrap-file",
        "re-wrap kbe1 messages' data keys (latest version, or --to-key) without touching the body",
        "rewrap",
        _rewrap,
    )
    p.add_argument(
        "--to-key",
        action="append",
        type=key_name_arg,
        help="wrap the data key under this key too, on any backend (repeatable). The message's "
        "wrappings under other keys are KEPT (an escrow key you may not use is never lost); remove "
        "one with --drop-key. Default: move every wrapping to its key's latest version; if one of "
        "them is not yours to re-wrap, the file is refused and left unchanged",
    )
    p.add_argument(
        "--drop-key",
        action="append",
        type=key_name_arg,
        help="remove the message's wrappings under this key (repeatable). Nothing is replaced "
        "unless a new wrapping was unwrapped and proven to open the message; otherwise the file "
        "is left untouched and the exit status is 1",
    )
