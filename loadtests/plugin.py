"""The Locust plugin: what runs a ``Rehearsal`` inside Locust, in one process or distributed.

``install(rehearsal)`` (called by ``Rehearsal.locust_classes()``) adds the kit's options to
Locust's parser and listens to Locust's events:

- **test start**, on the master (or the only process): check the options, build the shape,
  run your setup hook, pick a wall-clock start ``--lead`` seconds ahead and send every
  Locust process its plan (its share of the arrivals, your setup's ``shared`` data);
- in **each process**, one ``ArrivalDriver`` (a Locust user that does not loop) runs your
  process setup, then an ``ArrivalDispatcher`` starts visits at their intended instants
  (open model): a persona drawn per arrival gets a ``Visit``; what the process recorded
  (histograms, counts, history lines) is shipped to the master once a second;
- meanwhile the master samples your backend once a second (your sampler), runs the actions
  your setup scheduled, writes ``progress.json``;
- **test stop** (the shape is done, or Ctrl-C): the master waits for every process's last
  numbers, runs your oracle, judges, writes the report folder, prints the end-of-run table
  and sets Locust's exit code to the verdict's (``loadtests.exit_codes``).

``ArrivalShape`` keeps exactly one driver per process: the number of Locust "users" is not
the load here (the arrival rate is), so the web UI's user count and ramp-up fields are
disabled (Locust does that for shape classes) and an "Open model" tab explains them and
shows the arrivals (``loadtests.webui``). ``-t/--run-time`` is refused: the shape sets the run's
length; ``--duration`` or ``--time-scale`` change it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import shlex
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.event
import psutil  # type: ignore[import-untyped]
from locust import LoadTestShape, User, constant, events, task
from locust.env import Environment
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING, MasterRunner, WorkerRunner

from loadtests import exit_codes
from loadtests.arrivals import Arrival, ArrivalDispatcher, ArrivalPlan
from loadtests.history import read_history, summarize_history
from loadtests.latency import PERCENTILES
from loadtests.recording import ProcessRecorder, RunCollector
from loadtests.rehearsal import (
    OracleContext,
    ProcessContext,
    Rehearsal,
    RunContext,
    SetupContext,
    SetupError,
)
from loadtests.report import DrillEvent, format_console, write_report
from loadtests.shapes import Shape
from loadtests.slo import RunValidity, parse_slo
from loadtests.verdict import Verdict, format_verdict, judge
from loadtests.visits import Visit, _ProcessVisits, _Sessions

log = logging.getLogger("loadtests")

PLAN_MESSAGE = "loadtests:plan"
REPORT_MESSAGE = "loadtests:report"
#: How often each process ships its numbers (also the live progress resolution).
EXPORT_INTERVAL_S = 1.0
#: The kit's options that every process needs, sent in the plan.
PROCESS_OPTIONS = (
    "arrival_process",
    "max_in_flight",
    "max_queue_wait",
    "connections",
    "request_timeout",
    "drain",
    "seed",
)


class UsageError(ValueError):
    """A bad option: the run does not start (exit ``exit_codes.USAGE``)."""


#: The heading of the kit's options in ``--help`` (``python -m loadtests help``).
OPTIONS_TITLE = "Rehearsal options (loadtests)"


def _add_options(parser: Any, rehearsal: Rehearsal) -> None:
    group = parser.add_argument_group(
        OPTIONS_TITLE, "open-model arrivals, the oracle, thresholds, the report"
    )

    def add(*names: str, **kwargs: Any) -> None:
        # What Locust's own add_argument does, for a group: the options also show in the web UI's form.
        action = group.add_argument(*names, **kwargs)
        action.include_in_web_ui, action.is_secret, action.is_required = True, False, False

    add(
        "--shape",
        default=rehearsal.default_shape,
        env_var="LOADTESTS_SHAPE",
        help=f"arrival shape: {', '.join(sorted(rehearsal.shapes))} (default {rehearsal.default_shape})",
    )
    add(
        "--peak-rps",
        type=float,
        default=200.0,
        env_var="LOADTESTS_PEAK_RPS",
        help="peak arrivals per second, all processes together (default 200)",
    )
    add(
        "--time-scale",
        type=float,
        default=1.0,
        env_var="LOADTESTS_TIME_SCALE",
        help="stretch every phase of the shape by this factor (default 1: midnight_surge ~75 s of arrivals)",
    )
    add(
        "--duration",
        type=float,
        default=0.0,
        env_var="LOADTESTS_DURATION",
        help="seconds of arrivals: scales the shape to this length (instead of --time-scale; "
        "-t/--run-time does not apply to an open-model run)",
    )
    add("--steps", type=int, default=5, help="capacity_step: number of stairs up to --peak-rps (default 5)")
    add(
        "--arrival-process",
        choices=["uniform", "poisson"],
        default="uniform",
        help="evenly spaced arrivals along the shape (default), or Poisson",
    )
    add(
        "--personas",
        default="",
        env_var="LOADTESTS_PERSONAS",
        help="persona weights, e.g. '"
        + ",".join(f"{p.name}={p.weight:g}" for p in rehearsal.personas.values())
        + "' (the default); personas left out weigh 0",
    )
    add(
        "--max-in-flight",
        type=int,
        default=2000,
        help="visits running at once per process; arrivals beyond wait --max-queue-wait, then drop",
    )
    add("--max-queue-wait", type=float, default=1.0, help="seconds an arrival may wait for a free slot")
    add("--connections", type=int, default=200, help="HTTP connections per process")
    add("--request-timeout", type=float, default=10.0, help="seconds before a request counts as unanswered")
    add("--lead", type=float, default=3.0, help="seconds between test start and the shape's start")
    add("--drain", type=float, default=30.0, help="seconds to let visits finish after the last arrival")
    add("--no-oracle", action="store_true", default=False, help="do not run the oracle (the report says so)")
    add(
        "--slo",
        default=";".join(rehearsal.thresholds),
        env_var="LOADTESTS_SLO",
        help="';'-separated thresholds, k6-style, e.g. 'latency:p(99)<500;error_ratio:rate<0.01'",
    )
    add(
        "--max-dropped-ratio",
        type=float,
        default=RunValidity.max_dropped_ratio,
        help="above this share of dropped arrivals the run is invalid",
    )
    add(
        "--report-dir",
        default="",
        env_var="LOADTESTS_REPORT_DIR",
        help="where to write the report folder (default reports/drill-<run id>)",
    )
    add("--seed", type=int, default=0, help="seed of the personas' random choices")
    add("--no-plots", action="store_true", default=False, help="skip report.html and the PNG plots")


#: Locust's own options that shape the load, reported among the run's settings beside every
#: option Locust does not define (the kit's and the locustfile's own).
LOCUST_SETTINGS = ("host", "locustfile", "headless", "master", "expect_workers", "processes")


def run_settings(options: Any, parser: Any | None) -> dict[str, Any]:
    """The run's settings for the report, with the value of every secret option (``is_secret``,
    e.g. an admin token) masked and any password in the host's URL left out."""
    from locust.argument_parser import default_args_dict

    locust_own = set(default_args_dict())
    secret = {a.dest for a in getattr(parser, "_actions", ()) if getattr(a, "is_secret", False)}
    out: dict[str, Any] = {}
    for name, value in sorted(vars(options).items()):
        if name in locust_own and name not in LOCUST_SETTINGS:
            continue
        if name in secret:
            value = "(secret)" if value else value
        elif name == "host" and isinstance(value, str):
            value = _without_password(value)
        out[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out


def run_command(argv: list[str], parser: Any | None) -> str:
    """The command line for the report, with secret options' values and URL passwords masked."""
    flags = {
        f for a in getattr(parser, "_actions", ()) if getattr(a, "is_secret", False) for f in a.option_strings
    }
    out, masking = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if masking:
            arg, masking = "(secret)", False
        elif flag in flags:
            arg, masking = (f"{flag}=(secret)", False) if eq else (arg, True)
        elif "://" in arg:  # a URL, or --flag=URL
            head, eq, url = arg.rpartition("=") if arg.startswith("-") else ("", "", arg)
            arg = head + eq + _without_password(url)
        out.append(arg)
    return " ".join(shlex.quote(a) for a in out)


def _without_password(url: str) -> str:
    password = urlsplit(url).password
    return url if password is None else url.replace(f":{password}@", ":***@", 1)


def _thresholds(text: str) -> list[str]:
    # Fail at start, not at the end of a long run.
    return [t.text for t in parse_slo(text, percentiles=PERCENTILES)]


def _shape(rehearsal: Rehearsal, spec: Mapping[str, Any]) -> Shape:
    return rehearsal.build_shape(spec["name"], spec["peak_rps"], spec["time_scale"], **spec.get("params", {}))


# -- one process's part: the driver ------------------------------------------------------------
@dataclass
class ProcessPart:
    """What one Locust process runs: its share of the arrivals."""

    environment: Environment
    rehearsal: Rehearsal
    proc_id: str
    plan: dict[str, Any] | None = None
    recorder: ProcessRecorder | None = None
    dispatcher: ArrivalDispatcher | None = None
    pump: Any = None
    planned: Any = field(default_factory=lambda: gevent.event.Event())
    finished: bool = False
    claimed: bool = False

    def receive_plan(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.planned.set()

    def drive(self) -> None:
        """The driver user's task: run this process's share to the end (blocks)."""
        try:
            self._drive()
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            log.exception("this process's share of the run failed")
            if self.recorder is not None:
                self.recorder.failure = f"{type(exc).__name__}: {exc}"
            self._finish(self.dispatcher.totals if self.dispatcher else None)

    def _drive(self) -> None:
        if not self.planned.wait(timeout=60):
            log.error("no arrival plan from the master within 60 s; this process sends nothing")
            return
        plan = self.plan
        assert plan is not None
        opt = plan["options"]
        shape = _shape(self.rehearsal, plan["shape"])
        start_epoch = float(plan["start_epoch"])
        report_dir = Path(plan["report_dir"]) if plan.get("report_dir") else None
        history = report_dir / "processes" / f"{self.proc_id}.requests.jsonl" if report_dir else None
        self.recorder = recorder = ProcessRecorder(self.proc_id, start_epoch, request_log=history)
        self.pump = gevent.spawn(self._pump)
        host = self.environment.host or ""
        options = self.environment.parsed_options
        state: Any = None
        if self.rehearsal.process_setup_hook is not None:
            ctx = ProcessContext(
                host=host,
                options=options,
                run_id=plan["run_id"],
                shape=shape,
                start_epoch=start_epoch,
                shared=plan["shared"],
                index=plan["index"],
                count=plan["count"],
                proc_id=self.proc_id,
            )
            try:
                state = self.rehearsal.process_setup_hook(ctx)
            except Exception as exc:
                recorder.failure = f"process setup failed: {exc}"
                log.error("%s", recorder.failure, exc_info=not isinstance(exc, SetupError))
                self._finish(None)
                return
        shared = _ProcessVisits(
            sessions=_Sessions(
                host,
                self.environment.events.request,
                connections=opt["connections"],
                timeout_s=opt["request_timeout"],
            ),
            recorder=recorder,
            proc_id=self.proc_id,
            run_id=plan["run_id"],
            rng=random.Random(f"{opt['seed']}:{plan['index']}"),
            state=state,
            options=options,
            order_operations=frozenset(self.rehearsal.order_operations),
        )
        pick = self.rehearsal.picker(plan["weights"])

        def visit(arrival: Arrival, started_at: float) -> None:
            persona = pick(arrival, shared.rng)
            v = Visit(arrival, persona.name, shared)
            try:
                persona.visit(v)
            except gevent.GreenletExit:
                raise
            except Exception:  # one broken visit must not stop the run; it shows in the log
                log.exception("visit %s (%s) failed", arrival.seq, persona.name)
            finally:
                v._finish()

        arrival_plan = ArrivalPlan(
            shape, start_epoch, plan["index"], plan["count"], opt["arrival_process"], opt["seed"]
        )
        # What exists now (Locust, the kit, the process setup's state) lives as long as the run:
        # out of the collector's sight, a full collection mid-surge does not walk all of it again.
        gc.freeze()
        self.dispatcher = ArrivalDispatcher(
            arrival_plan,
            visit,
            max_in_flight=opt["max_in_flight"],
            max_queue_wait_s=opt["max_queue_wait"],
            on_arrival=lambda a, started, lag: recorder.arrival(
                a.intended, started, lag, rendezvous=a.kind == "rendezvous"
            ),
        )
        totals = self.dispatcher.run(drain_timeout_s=opt["drain"])
        self._finish(totals)

    def _finish(self, totals: Any) -> None:
        if self.finished or self.recorder is None:
            return
        self.finished = True
        if totals is not None:
            self.recorder.dispatch = asdict(totals)
        self.recorder.done = True
        if self.pump is not None:
            self.pump.kill(block=False)
        self._ship()

    def stop(self) -> None:
        """Test stopping: end visits in flight and ship the last numbers."""
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self._finish(self.dispatcher.totals)
        elif self.recorder is not None:
            self._finish(None)
        if self.recorder is not None:
            self.recorder.close()

    def _pump(self) -> None:
        process = psutil.Process()
        process.cpu_percent(None)
        while True:
            gevent.sleep(EXPORT_INTERVAL_S)
            if self.recorder is not None:
                self.recorder.sample_cpu(time.time(), process.cpu_percent(None))
            self._ship()

    def _ship(self) -> None:
        if self.recorder is None:
            return
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            runner.send_message(REPORT_MESSAGE, self.recorder.export())
        else:
            payload = self.recorder.export(encoded=False)  # the collector is in this process
            conductor: Conductor | None = getattr(self.environment, "loadtests_conductor", None)
            if conductor is not None and conductor.collector is not None:
                conductor.collector.absorb(payload)


# -- the master's part: plan, setup, samples, oracle, report --------------------------------------
@dataclass
class Conductor:
    environment: Environment
    rehearsal: Rehearsal
    run_id: str = ""
    shape: Shape | None = None
    collector: RunCollector | None = None
    report_dir: Path | None = None
    context: SetupContext | None = None
    thresholds: list[str] = field(default_factory=list)
    events: list[DrillEvent] = field(default_factory=list)
    greenlets: list[Any] = field(default_factory=list)
    finished: bool = False
    failed: str = ""
    sampler_errors: int = 0
    watch: str | None = None

    @property
    def options(self) -> Any:
        return self.environment.parsed_options

    def begin(self) -> None:
        self.finished, self.failed = False, ""
        try:
            shape, weights = self._check_options()
        except (UsageError, ValueError) as exc:
            return self._fail(str(exc), exit_codes.USAGE)
        opt = self.options
        self.shape = shape
        self.run_id = time.strftime("%m%d%H%M%S") + uuid.uuid4().hex[:4]
        self.report_dir = Path(opt.report_dir or f"reports/drill-{self.run_id}").resolve()
        start_epoch = time.time() + opt.lead
        host = self.environment.host or ""
        ctx = SetupContext(
            host=host,
            options=opt,
            run_id=self.run_id,
            shape=shape,
            start_epoch=start_epoch,
            report_dir=self.report_dir,
            weights=weights,
        )
        shared: Mapping[str, Any] = {}
        if self.rehearsal.setup_hook is not None:
            try:
                shared = dict(self.rehearsal.setup_hook(ctx) or {})
                json.dumps(shared)  # it travels to every process as a message
            except SetupError as exc:
                return self._fail(str(exc), exit_codes.RUN_INVALID)
            except Exception as exc:
                log.exception("the setup hook failed")
                return self._fail(
                    f"the setup hook failed: {type(exc).__name__}: {exc}", exit_codes.RUN_INVALID
                )
        self.context = ctx = SetupContext(**{**ctx.__dict__, "shared": shared})
        self.watch = ctx._watch[0] if ctx._watch else None
        self.collector = RunCollector(start_epoch, self.report_dir)
        runner = self.environment.runner
        if isinstance(runner, MasterRunner):
            procs = sorted(
                c.id for c in runner.clients.ready + runner.clients.spawning + runner.clients.running
            )
        else:
            procs = ["local"]
        if not procs:
            return self._fail(
                "no Locust workers connected: start workers first (or use --expect-workers)",
                exit_codes.RUN_INVALID,
            )
        self.collector.expect(procs)
        base = {
            "run_id": self.run_id,
            "shape": self._shape_spec(),
            "start_epoch": start_epoch,
            "count": len(procs),
            "report_dir": str(self.report_dir),
            "shared": shared,
            "weights": weights,
            "options": {k: getattr(opt, k) for k in PROCESS_OPTIONS},
        }
        for index, proc in enumerate(procs):
            plan = {**base, "index": index}
            if isinstance(runner, MasterRunner):
                runner.send_message(PLAN_MESSAGE, plan, proc)
            else:
                _receive_plan(self.environment, plan)
        log.info(
            "%s drill %s: %s at %g arrivals/s peak, %d process(es), T0 at %s, report in %s",
            self.rehearsal.name,
            self.run_id,
            shape.name,
            shape.peak_rps,
            len(procs),
            time.strftime("%H:%M:%S", time.localtime(ctx.t0_epoch)),
            self.report_dir,
        )
        self.greenlets = [gevent.spawn(self._progress)]
        if self.rehearsal.sampler_hook is not None:
            self.greenlets.append(gevent.spawn(self._sample))
        for offset, action in ctx._actions:
            self.greenlets.append(gevent.spawn(self._act, start_epoch + offset, action))

    def _check_options(self) -> tuple[Shape, dict[str, float]]:
        opt = self.options
        if getattr(opt, "run_time", None):
            raise UsageError(
                "-t/--run-time does not apply to an open-model run: the shape sets how long arrivals "
                "last. Use --duration SECONDS (scales the shape to that many seconds of arrivals) or "
                "--time-scale FACTOR"
            )
        if not self.environment.host:
            raise UsageError("no --host: point the run at your backend, e.g. --host http://127.0.0.1:8080")
        self.thresholds = _thresholds(opt.slo)
        weights = self.rehearsal.weights(opt.personas)
        spec = self._shape_spec()
        return _shape(self.rehearsal, spec), weights

    def _shape_spec(self) -> dict[str, Any]:
        opt = self.options
        params = {"steps": opt.steps} if opt.shape == "capacity_step" else {}
        scale = float(opt.time_scale)
        if opt.duration and opt.duration > 0:
            natural = self.rehearsal.build_shape(opt.shape, opt.peak_rps, 1.0, **params).duration_s
            scale = opt.duration / natural
        return {"name": opt.shape, "peak_rps": opt.peak_rps, "time_scale": scale, "params": params}

    def _fail(self, message: str, code: int) -> None:
        self.failed = message
        log.error("the run cannot start: %s", message)
        print(f"\n  {self.rehearsal.name} drill: cannot start: {message}\n", flush=True)
        self.environment.process_exit_code = code
        runner = self.environment.runner
        if runner is not None and getattr(self.options, "headless", True):
            gevent.spawn_later(0.1, runner.quit)  # in the web UI the run just stops (the shape ends it)

    @property
    def done(self) -> bool:
        """Every process has sent its last arrival and its visits have finished."""
        return bool(self.failed) or (self.collector is not None and self.collector.all_done)

    def _run_context(self) -> RunContext:
        assert self.context is not None
        c = self.context
        return RunContext(c.host, c.options, c.run_id, c.shape, c.start_epoch, c.shared)

    def _sample(self) -> None:
        assert self.collector is not None and self.rehearsal.sampler_hook is not None
        ctx = self._run_context()
        while True:
            t = time.time()
            try:
                sample = self.rehearsal.sampler_hook(ctx)
                if sample is not None:
                    self.collector.add_service_sample(sample)
            except Exception as exc:
                self.sampler_errors += 1
                if self.sampler_errors == 1:
                    log.warning("the sampler failed (%s); the timeline will miss the backend's numbers", exc)
            gevent.sleep(max(1.0 - (time.time() - t), 0.05))

    def _act(self, at: float, action: Any) -> None:
        gevent.sleep(max(at - time.time(), 0))
        try:
            what = action()
        except Exception as exc:
            log.warning("a scheduled action failed: %s", exc)
            return
        if what:
            self.events.append(DrillEvent(time.time(), str(what)))

    def progress(self) -> dict[str, Any]:
        """The live numbers: phase, arrivals target vs sent, orders/s, p99, watched stock, backlog."""
        assert self.collector is not None and self.shape is not None
        c, shape = self.collector, self.shape
        now_s = time.time() - c.start_epoch
        last = int(now_s) - 2  # a whole second every process has shipped (they ship once a second)
        sec: Mapping[str, int] = c.seconds.get(last, {})
        window = shape.window_at(now_s)
        p99 = c.book.p99(last)
        sample = c.service[-1] if c.service else None
        orders = sum(
            n
            for k, n in sec.items()
            for op in self.rehearsal.order_operations
            if k in (f"res.{op}.created", f"res.{op}.replayed")
        )
        return {
            "run_id": self.run_id,
            "t_s": round(now_s, 1),
            "t_from_t0_s": round(now_s - shape.t0_s, 1),
            "phase": (window.name if window else ("lead" if now_s < 0 else "drain")),
            "target_per_s": round(shape.expected(max(last, 0), last + 1), 1) if last >= 0 else 0.0,
            "sent_per_s": sec.get("arrivals.started", 0),
            "dropped_per_s": sec.get("arrivals.dropped", 0),
            "orders_per_s": orders,
            "requests_per_s": sum(n for k, n in sec.items() if k.startswith("req.")),
            "p99_ms": p99[0] if p99 else None,
            "p99_corrected_ms": p99[1] if p99 else None,
            # The last ten whole seconds, so the reader can show the worst since its last line.
            "p99_by_second": [
                {"t_from_t0_s": round(s - shape.t0_s, 1), "p99_ms": p99, "p99_corrected_ms": corr}
                for s, p99, corr in c.book.p99_by_second(last - 9, last)
            ],
            "hot_sku": self.watch,
            "hot_available": sample.skus.get(self.watch, {}).get("available")
            if sample and self.watch
            else None,
            "backlog": sample.backlog if sample else None,
            "shape_duration_s": shape.duration_s,
            "done": self.done,
        }

    def _progress(self) -> None:
        assert self.report_dir is not None
        path, tmp = self.report_dir / "progress.json", self.report_dir / "progress.json.tmp"
        n = 0
        while True:
            gevent.sleep(1.0)
            p = self.progress()
            tmp.write_text(json.dumps(p))
            os.replace(tmp, path)
            n += 1
            if n % 5 == 0:
                extra = f" {p['hot_sku']} left {p['hot_available']}" if p["hot_sku"] else ""
                extra += f" backlog {p['backlog']}" if p["backlog"] is not None else ""
                log.info(
                    "%s t=%+.0fs target %.0f/s sent %d/s dropped %d/s orders %d/s p99 %s ms%s",
                    p["phase"],
                    p["t_from_t0_s"],
                    p["target_per_s"],
                    p["sent_per_s"],
                    p["dropped_per_s"],
                    p["orders_per_s"],
                    "-" if p["p99_ms"] is None else f"{p['p99_ms']:.0f}",
                    extra,
                )

    def finish(self) -> None:
        """Test stopped: wait for the last numbers, judge, write the report, set the exit code."""
        if self.finished or self.failed or self.collector is None or self.shape is None:
            return
        self.finished = True
        collector, opt = self.collector, self.options
        deadline = time.time() + 10
        while not collector.all_done and time.time() < deadline:
            gevent.sleep(0.2)
        if not collector.all_done:
            log.warning(
                "processes %s sent no final report; their last seconds are missing",
                [p for p, d in collector.done.items() if not d],
            )
        elapsed = time.time() - collector.start_epoch
        for g in self.greenlets:
            g.kill(block=False)
        collector.close()
        verdict, oracle_error, skipped = self._judge()
        assert self.context is not None and self.report_dir is not None
        run = {
            "id": self.run_id,
            "name": self.rehearsal.name,
            "host": _without_password(self.environment.host or ""),
            "command": run_command(sys.argv, _PARSER[0]),
            **self.context._notes,
            "order_operations": list(self.rehearsal.order_operations),
            "sampler_errors": self.sampler_errors,
            "settings": run_settings(opt, _PARSER[0]),
        }
        report = write_report(
            self.report_dir,
            collector,
            self.shape,
            run,
            elapsed_s=min(elapsed, self.shape.duration_s),
            thresholds=self.thresholds,
            bounds=RunValidity(max_dropped_ratio=opt.max_dropped_ratio),
            verdict=verdict,
            oracle_error=oracle_error,
            oracle_skipped=skipped,
            events=self.events,
            plots=not opt.no_plots,
        )
        self.environment.process_exit_code = report.exit_code
        if verdict is not None:
            log.info("oracle verdict:\n%s", format_verdict(verdict))
        print(format_console(report.summary, self.report_dir), flush=True)
        log.info(
            "%s drill %s: exit %d (%s); report in %s",
            self.rehearsal.name,
            self.run_id,
            report.exit_code,
            report.summary["exit_meaning"],
            self.report_dir,
        )

    def _judge(self) -> tuple[Verdict | None, str, str]:
        """Run the oracle: (verdict, error, why it was skipped)."""
        hook, opt, collector = self.rehearsal.oracle_hook, self.options, self.collector
        assert collector is not None and self.context is not None and self.report_dir is not None
        if opt.no_oracle:
            return (
                None,
                "",
                "no oracle: --no-oracle was given; nothing checked for oversold, lost or duplicate orders",
            )
        if hook is None or collector.requests_path is None:
            return None, "", ""
        paths = (collector.requests_path,)
        told = summarize_history(read_history(paths), self.rehearsal.order_operations)
        c = self.context
        ctx = OracleContext(
            host=c.host,
            options=c.options,
            run_id=c.run_id,
            shape=c.shape,
            start_epoch=c.start_epoch,
            shared=c.shared,
            history=told,
            history_paths=paths,
            report_dir=self.report_dir,
            sleep=gevent.sleep,
            progress=lambda m: log.info("oracle: %s", m),
        )
        try:
            truth = hook(ctx)
        except Exception as exc:
            log.warning("the oracle failed", exc_info=True)
            return None, f"{type(exc).__name__}: {exc}", ""
        return judge(truth, told), "", ""


def _part(environment: Environment) -> ProcessPart:
    part: ProcessPart | None = getattr(environment, "loadtests_part", None)
    if part is None:
        runner = environment.runner
        proc_id = runner.client_id if isinstance(runner, WorkerRunner) else "local"
        part = ProcessPart(environment, _installed(), proc_id)
        environment.loadtests_part = part  # type: ignore[attr-defined]
    return part


def _receive_plan(environment: Environment, plan: dict[str, Any]) -> None:
    """A plan starts a run: a process part already used by an earlier run is replaced."""
    part = _part(environment)
    if part.plan is not None:
        environment.loadtests_part = None  # type: ignore[attr-defined]
        part = _part(environment)
    part.receive_plan(plan)


def _on_init(environment: Environment, **_kw: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(
            PLAN_MESSAGE, lambda environment, msg, **_: _receive_plan(environment, msg.data)
        )
        return
    conductor = Conductor(environment, _installed())
    environment.loadtests_conductor = conductor  # type: ignore[attr-defined]
    if isinstance(runner, MasterRunner):
        runner.register_message(
            REPORT_MESSAGE,
            lambda environment, msg, **_: (
                conductor.collector.absorb(msg.data) if conductor.collector is not None else None
            ),
        )
    web_ui = getattr(environment, "web_ui", None)
    if web_ui is not None:
        from loadtests.webui import extend

        extend(web_ui, conductor)


def _on_test_start(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # workers start on the master's plan message (sent before this event)
    environment.loadtests_conductor.begin()  # type: ignore[attr-defined]


def _on_test_stop(environment: Environment, **_kw: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        part: ProcessPart | None = getattr(environment, "loadtests_part", None)
        if part is not None:
            part.stop()
    if not isinstance(environment.runner, WorkerRunner):
        environment.loadtests_conductor.finish()  # type: ignore[attr-defined]


def _on_quitting(environment: Environment, **_kw: Any) -> None:
    """Ctrl-C / SIGTERM: Locust decides its exit code before it stops the runner, so stop the
    run here first — the visits end, the oracle judges what happened, the report is written
    and the exit code is the verdict's."""
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        return
    if runner.state not in (STATE_STOPPED, STATE_STOPPING, STATE_CLEANUP):
        runner.stop()
    environment.loadtests_conductor.finish()  # type: ignore[attr-defined]


class ArrivalDriver(User):
    """One per Locust process: runs that process's share of the open-model arrivals."""

    wait_time = constant(3600)

    @task
    def drive(self) -> None:
        part = _part(self.environment)
        if part.claimed:
            gevent.sleep(3600)  # a second driver in this process: the arrivals are already running
            return
        part.claimed = True
        part.drive()
        gevent.sleep(3600)  # done: idle until the run stops


class ArrivalShape(LoadTestShape):
    """Keeps exactly one driver per Locust process until every process has finished."""

    def tick(self) -> tuple[int, float] | None:
        env = self.runner.environment if self.runner else None
        conductor: Conductor | None = getattr(env, "loadtests_conductor", None)
        if conductor is not None and conductor.done:
            return None
        if conductor is not None and conductor.shape is not None and env is not None:
            opt: Any = env.parsed_options
            limit = opt.lead + conductor.shape.duration_s + opt.drain + 30
            if self.get_run_time() > limit:  # type: ignore[no-untyped-call]
                log.warning(
                    "the run lasted %.0f s (shape, lead, drain and 30 s) without every process finishing; stopping",
                    limit,
                )
                return None
        n = self.runner.worker_count if isinstance(self.runner, MasterRunner) else 1
        return (max(n, 1), float(max(n, 1)))


_INSTALLED: list[Rehearsal] = []
#: Locust's parser (the last one built), to tell which options are secret.
_PARSER: list[Any] = [None]


def _installed() -> Rehearsal:
    if not _INSTALLED:
        raise RuntimeError("no rehearsal installed: call rehearsal.locust_classes() in the locustfile")
    return _INSTALLED[0]


def _keep_parser(parser: Any, **_kw: Any) -> None:
    _PARSER[0] = parser


def install(rehearsal: Rehearsal) -> tuple[type[User], type[LoadTestShape]]:
    """Plug ``rehearsal`` into Locust (once per process) and return the driver and shape classes."""
    if _INSTALLED:
        if _INSTALLED[0] is not rehearsal:
            raise RuntimeError(
                f"a rehearsal ({_INSTALLED[0].name!r}) is already installed in this process: one per locustfile"
            )
        return ArrivalDriver, ArrivalShape
    _INSTALLED.append(rehearsal)
    events.init_command_line_parser.add_listener(lambda parser, **_: _add_options(parser, rehearsal))  # type: ignore[no-untyped-call]
    events.init_command_line_parser.add_listener(_keep_parser)  # type: ignore[no-untyped-call]
    events.init.add_listener(_on_init)  # type: ignore[no-untyped-call]
    events.test_start.add_listener(_on_test_start)  # type: ignore[no-untyped-call]
    events.test_stop.add_listener(_on_test_stop)  # type: ignore[no-untyped-call]
    events.quitting.add_listener(_on_quitting)  # type: ignore[no-untyped-call]
    return ArrivalDriver, ArrivalShape
