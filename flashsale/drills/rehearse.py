"""The one-command drill: start the servers, the service and the worker, replay the opening
with Locust, judge it, and stop everything — also on Ctrl-C.

``Rehearsal.run()`` does, in order:

1. Redis and PostgreSQL: the configured ones (``FLASHSALE_REDIS_URL`` /
   ``FLASHSALE_DATABASE_URL``) or embedded ones started for this run; migrate;
2. ``flashsale serve`` (several processes on one port) and ``flashsale worker`` as child
   processes, with fresh token and admin secrets, and waits for ``/readyz``;
3. Locust on ``loadtests/surge.py`` — one local process, or a master and N workers
   (``locust_workers``) whose histograms and request logs the master merges. The drill
   itself (the sale, the arrivals, the oracle, the report) lives in ``loadtests``; this
   module only starts things and watches ``progress.json``;
4. a live progress line (phase, arrivals target vs sent, orders/s, the worst second's p99
   since the last line, hot-SKU stock left, backlog), then the verdict table from
   ``summary.json`` (with the waiting room's figures when the sale was behind it:
   ``waiting_room``);
5. stops Locust, the service, the worker and the servers it started, in that order.

The exit code is the drill's (``loadtests.exit_codes``): 0 all good, 1 SLO missed,
2 invariant violated, 3 run invalid; 130 when interrupted before a verdict.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loadtests import exit_codes

__all__ = [
    "INTERRUPTED",
    "ProgressLine",
    "Rehearsal",
    "RehearsalSettings",
    "format_progress",
    "format_room",
    "format_verdict_table",
]

INTERRUPTED = 130


def surge_locustfile() -> Path:
    """Where ``loadtests/surge.py`` is installed (found without importing it: it is a locustfile)."""
    spec = importlib.util.find_spec("loadtests.surge")
    if spec is None or spec.origin is None:
        raise RuntimeError("loadtests/surge.py is not installed: pip install 'flashsale[loadtest]'")
    return Path(spec.origin)


@dataclass(frozen=True)
class RehearsalSettings:
    """What one rehearsal runs (CLI flags; the servers come from ``FLASHSALE_*_URL`` or are embedded)."""

    shape: str = "midnight_surge"
    peak_rps: float = 150.0
    time_scale: float = 1.0
    service_workers: int = 2
    locust_workers: int = 0
    report_dir: Path | None = None
    slo: str | None = None
    hold_ttl_s: float | None = None
    audit_wait_s: float = 60.0
    #: Put the drill's sale behind the waiting room (docs/waiting-room.md): admissions per
    #: second, buyers per unit, and how soon a waiting buyer must hear of a sell-out.
    waiting_room: bool = False
    room_rate: float = 50.0
    room_oversubscribe: float = 1.0
    room_told_within_s: float = 1.0
    #: Extra ``locust`` arguments, passed through as they are (e.g. ``["--personas", "bot=1"]``).
    locust_args: tuple[str, ...] = ()
    #: A command every Locust process of the drill runs under, its own command line appended
    #: (e.g. ``("py-spy", "record", "-o", "locust.svg", "--")``): the load generator
    #: profiled in the run it drives. ``benchmarks/generator_instructions.py`` counts its
    #: instructions under valgrind this way.
    locust_wrapper: tuple[str, ...] = ()
    ready_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _terminate(proc: subprocess.Popen[Any] | None, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
    """Stop a child we started (its whole session: it may have children of its own)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


class Rehearsal:
    """One rehearsal; ``run()`` returns its exit code. ``print`` is where lines go."""

    def __init__(self, settings: RehearsalSettings, *, out: IO[str] | None = None) -> None:
        self.settings = settings
        self.out = out or sys.stdout
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        self.report_dir = (settings.report_dir or Path("reports") / f"rehearsal-{self.run_id}").resolve()
        self.host = ""
        self.admin_token = ""
        self.children: list[subprocess.Popen[Any]] = []
        self._interrupted = False

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            with ExitStack() as stack:
                env = stack.enter_context(self._servers())
                stack.callback(self._stop_children)
                self._start_service(env)
                return self._drill(env)
        except KeyboardInterrupt:
            self.say("interrupted: everything stopped")
            return INTERRUPTED
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    @contextmanager
    def _servers(self) -> Iterator[dict[str, str]]:
        from flashsale.runtime.embedded import EmbeddedStack

        self.report_dir.mkdir(parents=True, exist_ok=True)
        base = {**os.environ, **self.settings.env}
        embedded = not (base.get("FLASHSALE_REDIS_URL") and base.get("FLASHSALE_DATABASE_URL"))
        self.say(
            f"rehearsal {self.run_id}: {'starting embedded Redis and PostgreSQL' if embedded else 'using the configured Redis and PostgreSQL'}"
        )
        with EmbeddedStack(environ=base) as servers:
            env = {
                **base,
                **servers.environ(),
                "PYTHONUNBUFFERED": "1",
                "FLASHSALE_DRILL_COMMAND": " ".join(shlex.quote(a) for a in sys.argv),
            }
            # Fresh secrets unless given (a caller may want to ask the service again afterwards).
            for var in ("FLASHSALE_TOKEN_SECRET", "FLASHSALE_ADMIN_TOKEN"):
                if not env.get(var):
                    env[var] = secrets.token_hex(16)
            if not embedded:
                # Keys of this rehearsal apart from anything already in a shared Redis.
                env.setdefault("FLASHSALE_KEY_PREFIX", f"rh{self.run_id.replace('-', '')}")
            self.admin_token = env["FLASHSALE_ADMIN_TOKEN"]
            self._migrate(env["FLASHSALE_DATABASE_URL"])
            yield env

    def _migrate(self, database_url: str) -> None:
        import asyncio

        from flashsale.pipeline.migrate import migrate_url

        asyncio.run(migrate_url(database_url))

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[Any]:
        log = open(self.report_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it; closed below
        try:
            # A session of its own: Ctrl-C reaches us only, and we stop children in order.
            proc = subprocess.Popen(
                list(argv),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self.children.append(proc)
        return proc

    def _start_service(self, env: dict[str, str]) -> None:
        port = _free_port()
        self.host = f"http://127.0.0.1:{port}"
        py = sys.executable
        self._spawn(
            "service",
            [
                py,
                "-m",
                "flashsale",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(self.settings.service_workers),
            ],
            env,
        )
        self._spawn("worker", [py, "-m", "flashsale", "worker"], env)
        self.say(
            f"service: {self.settings.service_workers} process(es) on {self.host}; worker draining into PostgreSQL"
        )
        deadline = time.time() + self.settings.ready_timeout_s
        while time.time() < deadline:
            for proc, name in zip(self.children, ("service", "worker")):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the {name} exited with {proc.returncode}: see {self.report_dir / (name + '.log')}"
                    )
            try:
                with urllib.request.urlopen(f"{self.host}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        from flashsale.service.warroom.routes import warroom_url

                        self.say(
                            f"war room: {warroom_url(self.host, self.admin_token)}  (open it in a browser while the drill runs)"
                        )
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(
            f"the service was not ready within {self.settings.ready_timeout_s:.0f} s: "
            f"see {self.report_dir / 'service.log'}"
        )

    def _locust_argv(self) -> list[str]:
        s = self.settings
        argv = [
            *s.locust_wrapper,
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(surge_locustfile()),
            "--headless",
            "--host",
            self.host,
            "--shape",
            s.shape,
            "--peak-rps",
            f"{s.peak_rps:g}",
            "--time-scale",
            f"{s.time_scale:g}",
            "--report-dir",
            str(self.report_dir),
            "--audit-wait",
            f"{s.audit_wait_s:g}",
            "--only-summary",
        ]
        if s.slo:
            argv += ["--slo", s.slo]
        if s.hold_ttl_s:
            argv += ["--hold-ttl", f"{s.hold_ttl_s:g}"]
        if s.waiting_room:
            argv += [
                "--waiting-room",
                "--room-rate",
                f"{s.room_rate:g}",
                "--room-oversubscribe",
                f"{s.room_oversubscribe:g}",
                "--room-told-within",
                f"{s.room_told_within_s:g}",
            ]
        return argv + list(s.locust_args)

    def _locust_worker_argv(self, master_port: int) -> list[str]:
        return [
            *self.settings.locust_wrapper,
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(surge_locustfile()),
            "--worker",
            "--master-host",
            "127.0.0.1",
            "--master-port",
            str(master_port),
        ]

    def _drill(self, env: dict[str, str]) -> int:
        s = self.settings
        argv = self._locust_argv()
        workers: list[subprocess.Popen[Any]] = []
        if s.locust_workers > 0:
            port = _free_port()
            master = self._spawn(
                "locust-master",
                argv
                + ["--master", "--master-bind-port", str(port), "--expect-workers", str(s.locust_workers)],
                env,
            )
            for k in range(s.locust_workers):
                workers.append(self._spawn(f"locust-worker-{k}", self._locust_worker_argv(port), env))
        else:
            master = self._spawn("locust", argv, env)
        procs = 1 + len(workers)
        self.say(
            f"locust: {procs} process(es) ({'master + ' + str(len(workers)) + ' workers' if workers else 'local'}); "
            f"{s.shape} at {s.peak_rps:g} arrivals/s peak; report in {self.report_dir}"
        )
        try:
            self._watch(master)
        except KeyboardInterrupt:
            self._interrupted = True
            # Let Locust stop cleanly: it ends the visits, judges what happened and writes the report.
            self.say("\nstopping the drill (Ctrl-C again to abandon the report)…")
            try:
                master.send_signal(signal.SIGINT)
                master.wait(s.audit_wait_s + 90)
            except KeyboardInterrupt:
                _terminate(master, 5, signal.SIGKILL)
                raise
        code = master.wait()
        for w in workers:
            _terminate(w, 10)
        summary_path = self.report_dir / "summary.json"
        if not summary_path.exists():
            self.say(
                f"no verdict: Locust exited with {code} before writing the report; see {self.report_dir}/locust*.log"
            )
            return INTERRUPTED if self._interrupted else exit_codes.RUN_INVALID
        summary = json.loads(summary_path.read_text())
        self.say(format_verdict_table(summary, self.report_dir))
        return int(summary["exit_code"])

    def _watch(self, master: subprocess.Popen[Any]) -> None:
        tty = self.out.isatty()
        progress = self.report_dir / "progress.json"
        # A terminal redraws the line every second: keep a spike on it for a few seconds.
        line = ProgressLine(hold_s=5 if tty else 0)
        last_line = 0.0
        while master.poll() is None:
            time.sleep(1.0)
            try:
                p = json.loads(progress.read_text())
            except (OSError, ValueError):
                continue
            line.observe(p)
            if tty:
                print("\r" + line.render(p).ljust(LINE_WIDTH)[:LINE_WIDTH], end="", file=self.out, flush=True)
            elif time.time() - last_line >= 5:
                self.say(line.render(p))
                last_line = time.time()
        if tty:
            print(file=self.out)

    def _stop_children(self) -> None:
        for proc in reversed(self.children):  # Locust first, then the worker, then the service
            _terminate(proc)


#: What a terminal shows of the live line (it is redrawn in place).
LINE_WIDTH = 132


@dataclass(frozen=True)
class WorstSecond:
    """The second with the highest p99 among those a line covers (and the highest corrected p99)."""

    t_from_t0_s: float
    p99_ms: float
    p99_corrected_ms: float


class ProgressLine:
    """The live progress line. ``progress.json`` is rewritten every second and holds the
    p99 of each of the last ten whole seconds (``p99_by_second``); a line is printed less
    often (every 5 s to a file or pipe). So the latency a line shows is the worst second
    since the previous line, and when it was — the T0 second's spike (432 ms while the
    seconds around it read 16 and 19 ms) can no longer fall between two lines.

    ``hold_s``: a line also covers at least the last ``hold_s`` seconds (a terminal
    redraws every second, and a spike should stay readable for a moment)."""

    def __init__(self, hold_s: float = 0.0) -> None:
        self.hold_s = hold_s
        self._seen: dict[float, tuple[float, float]] = {}  # second -> (p99, corrected p99)
        self._shown: dict[float, float] = {}  # second -> the p99 a line already showed

    def observe(self, p: dict[str, Any]) -> None:
        """Take the seconds of one read of progress.json (a later read of a second wins:
        a process's late report makes its p99 more complete)."""
        for sec in p.get("p99_by_second") or []:
            self._seen[float(sec["t_from_t0_s"])] = (float(sec["p99_ms"]), float(sec["p99_corrected_ms"]))

    def worst(self) -> WorstSecond | None:
        """The worst second not shown yet (or shown with a lower p99), or within ``hold_s``
        of the newest; marks them shown."""
        if not self._seen:
            return None
        newest = max(self._seen)
        due = {
            t: v
            for t, v in self._seen.items()
            if t > newest - self.hold_s or t not in self._shown or v[0] > self._shown[t]
        }
        if not due:
            return None
        t = max(due, key=lambda k: (due[k][0], k))
        result = WorstSecond(t, due[t][0], max(v[1] for v in due.values()))
        self._shown.update((k, v[0]) for k, v in due.items())
        for old in [k for k in self._seen if k < newest - 60]:  # nothing older comes back
            del self._seen[old]
            self._shown.pop(old, None)
        return result

    def render(self, p: dict[str, Any]) -> str:
        return format_progress(p, self.worst())


def format_progress(p: dict[str, Any], worst: WorstSecond | None = None) -> str:
    """One line of live numbers; latency is ``worst`` (see ProgressLine) when given, else the
    p99 of the one second ``p`` names."""

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.0f}ms"

    if worst is not None:
        latency = f"p99 {ms(worst.p99_ms)}@T0{worst.t_from_t0_s:+.0f}s (corr {ms(worst.p99_corrected_ms)})"
    else:
        latency = f"p99 {ms(p.get('p99_ms'))} (corr {ms(p.get('p99_corrected_ms'))})"
    hot = p.get("hot_available")
    return (
        f"{p.get('phase', '?'):<9} T0{p.get('t_from_t0_s', 0):+6.0f}s  arrivals {p.get('sent_per_s', 0):>5}/"
        f"{p.get('target_per_s', 0):<5.0f}/s dropped {p.get('dropped_per_s', 0):>3}  orders {p.get('orders_per_s', 0):>5}/s"
        f"  {latency}"
        f"  hot left {'-' if hot is None else hot}  backlog {p.get('backlog') if p.get('backlog') is not None else '-'}"
    )


def format_room(room: dict[str, Any]) -> list[str]:
    """The waiting room's figures (``loadtests.room``) in three lines."""

    def ms(p: dict[str, Any]) -> str:
        if not p.get("count"):
            return "none"
        return f"p50 {p['p50']:.0f} / p99 {p['p99']:.0f} / max {p['max']:.0f} ms ({p['count']})"

    rate = room.get("admitted_per_s") or {}
    return [
        f"waiting room: {room.get('joined')} joined ({room.get('pre_queue')} before T0, one shuffle of seed "
        f"{room.get('seed')}), {room.get('admitted')} admitted (peak {rate.get('peak')}/s), queue at most "
        f"{room.get('queue_max')}",
        f"  wait to admission {ms(room.get('wait_ms') or {})}",
        f"  told sold out: {room.get('told_sold_out')}; after the sell-out "
        f"{ms(room.get('told_after_sell_out_ms') or {})} (limit {room.get('within_ms')} ms)",
    ]


def format_verdict_table(summary: dict[str, Any], folder: Path) -> str:
    """The terminal verdict: invariants, SLO thresholds, validity, arrivals, latency."""
    rows: list[str] = ["", "=" * 78]
    code = summary["exit_code"]
    rows.append(f"VERDICT  exit {code}: {summary['exit_meaning']}")
    rows.append("=" * 78)
    oracle = summary.get("oracle", {})
    if "checks" in oracle:
        rows.append("invariants (oracle, over HTTP: POST /api/admin/audit)")
        for c in oracle["checks"]:
            rows.append(
                f"  {'ok  ' if c['passed'] else 'FAIL'}  {c['name']:<15} {c['observed']}"
                + (f"  {c['detail'][:120]}" if c["detail"] else "")
            )
        log = oracle.get("log", {})
        rows.append(
            f"  orders acknowledged {log.get('acknowledged')}, paid {log.get('paid')}, "
            f"refused {log.get('failed')}, unknown {log.get('unknown')}, replayed retries {log.get('replays')}"
        )
        if room := log.get("waiting_room"):
            rows += format_room(room)
    else:
        rows.append(f"invariants: NOT JUDGED ({oracle.get('skipped')})")
    rows.append("SLO thresholds")
    for t in summary["slo"]["thresholds"]:
        observed = "-" if t["observed"] is None else f"{t['observed']:.4g}"
        rows.append(f"  {'ok  ' if t['passed'] else 'FAIL'}  {t['threshold']:<34} observed {observed}")
    validity = summary["validity"]
    rows.append("run validity: " + ("valid" if validity["valid"] else "INVALID"))
    rows += [f"  {r}" for r in validity["reasons"]]
    arr, ratios = summary["arrivals"], summary["ratios"]
    ratio = ratios.get("arrival_ratio")
    rows.append(
        f"arrivals: target {arr['target']:.0f}, sent {arr['started']}, dropped {arr['dropped']}"
        + (f" (achieved/target {ratio:.3f})" if ratio is not None else "")
    )
    sent = summary.get("generator", {}).get("t0_sent_ms") or {}
    if sent:
        rows.append(
            f"  T0 rendezvous fired {min(sent.values()):.1f}-{max(sent.values()):.1f} ms after T0 by "
            f"{len(sent)} Locust process(es) (skew {summary['generator']['t0_skew_ms']:.1f} ms)"
        )
    from loadtests.report import latency_lines  # the kit's table: p50/p90/p95/p99/p99.9, max, mean

    rows += latency_lines(summary)
    sold_out = summary.get("service", {}).get("sold_out_at_s_from_t0") or {}
    for sku, times in sold_out.items():
        rows.append(
            f"  {sku} sold out at T0{times[0]:+.0f}s"
            + (f" (and {len(times) - 1} more times, as lapsed holds came back)" if len(times) > 1 else "")
        )
    rows.append(f"report: {folder / 'report.html'}  (summary.json, timeline.csv, *.hlog, requests.jsonl)")
    return "\n".join(rows)
