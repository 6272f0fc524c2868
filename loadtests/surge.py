"""The drill's locustfile: replays a Double 11 opening (or another shape) against any deployment.

    FLASHSALE_ADMIN_TOKEN=… locust -f loadtests/surge.py --headless --host http://127.0.0.1:8080
    locust -f loadtests/surge.py --master …   +   locust -f loadtests/surge.py --worker --master-host …

Run ``locust -f loadtests/surge.py --help`` for the drill's options (under "Custom
arguments"): ``--shape``, ``--peak-rps``, ``--time-scale``, ``--personas``, ``--slo`` …

What happens: at test start the master (or the only process) mints no tokens itself but
creates the drill's sale opening at T0 (``loadtests.drill``), picks a wall-clock start a
few seconds ahead and sends every Locust process its share of the arrival plan. Each
process runs one *driver* (a Locust user that does not loop): it mints its buyers' tokens,
then its ``ArrivalDispatcher`` starts visits at their intended instants (open model),
recording latency in HdrHistograms and every order in its request log, and ships what it
recorded to the master once a second. The master polls ``GET /api/admin/stats`` once a
second, releases the hot SKU's reserve pool mid-surge, writes ``progress.json``, and when
every process is done runs the oracle and writes the report folder. The process exit code
is the drill's verdict (``loadtests.exit_codes``).

Locust's own statistics still work (every request fires Locust's request event); an
expected "sold out" or "limit reached" is marked a success there too.
"""

from __future__ import annotations

import json
import logging
import math
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

import gevent
import gevent.event
import psutil  # type: ignore[import-untyped]
from locust import LoadTestShape, User, constant, events, task
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING, MasterRunner, WorkerRunner

from loadtests import exit_codes
from loadtests.admin import AdminClient, AdminError, admin_token_from_env
from loadtests.arrivals import Arrival, ArrivalDispatcher, ArrivalPlan
from loadtests.drill import DrillSale, default_sale, expected_orders, sale_from_settings
from loadtests.latency import PERCENTILES
from loadtests.oracle import Verdict, format_verdict, run_oracle
from loadtests.personas import Behaviour, Catalogue, CatalogueItem, PersonaWeights, Reply, Shopper, classify
from loadtests.recording import ProcessRecorder, RunCollector, parse_stats
from loadtests.report import DrillEvent, write_report
from loadtests.shapes import SHAPES, Shape, build_shape
from loadtests.slo import DEFAULT_THRESHOLDS, RunValidity, parse_slo

log = logging.getLogger("flashsale.drill")

PLAN_MESSAGE = "flashsale:plan"
REPORT_MESSAGE = "flashsale:report"
#: How often each process ships its numbers (also the live progress resolution).
EXPORT_INTERVAL_S = 1.0


def _drill_options(parser: Any) -> None:
    g = parser  # Locust's own add_argument (is_secret, web UI) is not on argument groups
    g.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="midnight_surge",
        env_var="FLASHSALE_SHAPE",
        help="arrival shape (default midnight_surge)",
    )
    g.add_argument(
        "--peak-rps",
        type=float,
        default=200.0,
        env_var="FLASHSALE_PEAK_RPS",
        help="peak arrivals per second, all processes together (default 200)",
    )
    g.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        env_var="FLASHSALE_TIME_SCALE",
        help="stretch every phase of the shape by this factor (default 1: midnight_surge ~75 s of arrivals)",
    )
    g.add_argument(
        "--steps", type=int, default=5, help="capacity_step: number of stairs up to --peak-rps (default 5)"
    )
    g.add_argument(
        "--arrival-process",
        choices=["uniform", "poisson"],
        default="uniform",
        help="evenly spaced arrivals along the shape (default), or Poisson",
    )
    g.add_argument(
        "--personas",
        default="",
        env_var="FLASHSALE_PERSONAS",
        help="persona weights, e.g. 'browser=45,buyer=25,abandoner=15,bot=10,retry_storm=5' (the default)",
    )
    g.add_argument(
        "--max-in-flight",
        type=int,
        default=2000,
        help="visits running at once per process; arrivals beyond wait --max-queue-wait, then drop",
    )
    g.add_argument(
        "--max-queue-wait", type=float, default=1.0, help="seconds an arrival may wait for a free slot"
    )
    g.add_argument("--connections", type=int, default=200, help="HTTP connections per process")
    g.add_argument(
        "--request-timeout", type=float, default=10.0, help="seconds before a request counts as unanswered"
    )
    g.add_argument(
        "--impatient-timeout",
        type=float,
        default=0.25,
        help="retry-storm clients' timeout in seconds (they retry what they did not hear back about)",
    )
    g.add_argument(
        "--admin-token",
        default=admin_token_from_env(),
        is_secret=True,
        help="the service's admin token (default: $FLASHSALE_ADMIN_TOKEN)",
    )
    g.add_argument(
        "--sale",
        default="",
        env_var="FLASHSALE_DRILL_SALE",
        help="drive this existing sale instead of creating the drill's own",
    )
    g.add_argument(
        "--hold-ttl",
        type=float,
        default=-1.0,
        help="hold TTL of the drill's sale in seconds (default 10 × time scale)",
    )
    g.add_argument("--buyer-users", type=int, default=2000, help="distinct buyer accounts")
    g.add_argument("--bot-users", type=int, default=20, help="distinct bot accounts")
    g.add_argument("--lead", type=float, default=3.0, help="seconds between test start and the first arrival")
    g.add_argument(
        "--drain", type=float, default=30.0, help="seconds to let visits finish after the last arrival"
    )
    g.add_argument("--no-oracle", action="store_true", default=False, help="skip the end-of-run audit")
    g.add_argument(
        "--audit-wait", type=float, default=60.0, help="seconds the audit may wait for the queue to drain"
    )
    g.add_argument(
        "--slo",
        default=";".join(DEFAULT_THRESHOLDS),
        env_var="FLASHSALE_SLO",
        help="';'-separated thresholds, k6-style, e.g. 'latency:p(99)<500;error_ratio:rate<0.01'",
    )
    g.add_argument(
        "--max-dropped-ratio",
        type=float,
        default=RunValidity.max_dropped_ratio,
        help="above this share of dropped arrivals the run is invalid",
    )
    g.add_argument(
        "--report-dir",
        default="",
        env_var="FLASHSALE_REPORT_DIR",
        help="where to write the report folder (default reports/drill-<run id>)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the personas' random choices")
    g.add_argument(
        "--no-plots", action="store_true", default=False, help="skip report.html and the PNG plots"
    )


def _thresholds(text: str) -> list[str]:
    # Fail at start, not at the end of a long run.
    return [t.text for t in parse_slo(text, percentiles=PERCENTILES)]


# -- one process's part: the driver ------------------------------------------------------------
class LocustTransport:
    """Sends through Locust's FastHttpSession (so Locust's stats see every request) and records
    latency from the intended send time into the process's recorder."""

    def __init__(
        self, session: FastHttpSession, impatient: FastHttpSession, recorder: ProcessRecorder
    ) -> None:
        self.session, self.impatient, self.recorder = session, impatient, recorder

    def send(
        self,
        method: str,
        path: str,
        *,
        name: str,
        persona: str,
        intended: float,
        token: str | None = None,
        json: Any = None,
        impatient: bool = False,
    ) -> Reply:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        session = self.impatient if impatient else self.session
        sent = time.time()
        with session.request(
            method, path, name=name, json=json, headers=headers, catch_response=True
        ) as resp:
            done = time.time()
            status = int(resp.status_code or 0)
            body: Any = {}
            if status:
                try:
                    body = resp.json()
                except Exception:  # a non-JSON body: keep the status, say so in the label
                    body = {}
            reply = Reply(
                status,
                body if isinstance(body, dict) else {},
                "" if status else str(getattr(resp, "error", "")),
            )
            expected = classify(name, persona, reply)
            if expected:
                resp.success()
            else:
                resp.failure(f"{status} {reply.code or reply.error or ''}".strip())
        if 200 <= status < 300:
            label = f"{status}:replayed" if reply.body.get("replayed") else str(status)
        elif not status and impatient:
            # The client gave up by its own choice (it retries): slow, and the latency says so,
            # but not a wrong answer from the service, so not in the error ratio.
            label, expected = "0:impatient_timeout", True
        else:
            label = f"{status}:{reply.code or ('no_answer' if not status else '-')}"
        self.recorder.request(name, intended=intended, sent=sent, done=done, expected=expected, label=label)
        return reply


@dataclass
class ProcessPart:
    """What one Locust process runs: its share of the arrivals."""

    environment: Environment
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
            log.exception("this process's share of the drill failed")
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
        shape = build_shape(
            plan["shape"], plan["peak_rps"], plan["time_scale"], **plan.get("shape_params", {})
        )
        start_epoch = float(plan["start_epoch"])
        report_dir = Path(plan["report_dir"]) if plan.get("report_dir") else None
        request_log = (
            report_dir / "processes" / f"{self.proc_id}.requests.jsonl"
            if report_dir and plan.get("local_files")
            else None
        )
        self.recorder = recorder = ProcessRecorder(self.proc_id, start_epoch, request_log=request_log)
        self.pump = gevent.spawn(self._pump)
        host = self.environment.host or ""
        behaviour = Behaviour(buyer_users=opt["buyer_users"], bot_users=opt["bot_users"])
        admin = AdminClient(host, opt["admin_token"])
        tokens: dict[str, str] = {}
        try:
            for kind, count in (("buyer", behaviour.buyer_users), ("bot", behaviour.bot_users)):
                # Users are named after the run, so per-user limits start afresh every drill.
                prefix = f"{plan['run_id']}-{kind}-"
                minted = admin.mint_tokens(prefix, count, ttl_s=int(shape.duration_s + 3600))
                tokens.update({f"{kind}-{i}": minted[f"{prefix}{i}"] for i in range(count)})
        except AdminError as exc:
            recorder.failure = f"cannot mint buyer tokens: {exc}"
            log.error("%s", recorder.failure)
            self._finish(None)
            return

        def session(timeout: float) -> FastHttpSession:
            return FastHttpSession(
                host,
                request_event=self.environment.events.request,
                user=None,
                concurrency=opt["connections"],
                network_timeout=timeout,
                connection_timeout=timeout,
            )

        transport = LocustTransport(
            session(opt["request_timeout"]), session(opt["impatient_timeout"]), recorder
        )
        catalogue = Catalogue(
            tuple(CatalogueItem(**i) for i in plan["catalogue"]["items"]), plan["catalogue"]["hot"]
        )
        shopper = Shopper(
            transport,
            catalogue,
            tokens,
            recorder.log,
            plan["run_id"],
            weights=PersonaWeights.parse(opt["personas"]),
            behaviour=behaviour,
            rng=random.Random(f"{opt['seed']}:{plan['index']}"),
            sleep=gevent.sleep,
        )

        def visit(arrival: Arrival, started_at: float) -> None:
            try:
                shopper.visit(arrival, started_at)
            except gevent.GreenletExit:
                raise
            except Exception:  # one broken visit must not stop the drill; it shows in the log
                log.exception("visit %s failed", arrival.seq)

        arrival_plan = ArrivalPlan(
            shape, start_epoch, plan["index"], plan["count"], opt["arrival_process"], opt["seed"]
        )
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
        payload = self.recorder.export()
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            runner.send_message(REPORT_MESSAGE, payload)
        else:
            conductor: Conductor | None = getattr(self.environment, "flashsale_conductor", None)
            if conductor is not None and conductor.collector is not None:
                conductor.collector.absorb(payload)


# -- the master's part: plan, sale, stats, oracle, report -----------------------------------------
@dataclass
class Conductor:
    environment: Environment
    run_id: str = ""
    shape: Shape | None = None
    collector: RunCollector | None = None
    sale: DrillSale | None = None
    report_dir: Path | None = None
    started_at: float = 0.0
    events: list[DrillEvent] = field(default_factory=list)
    greenlets: list[Any] = field(default_factory=list)
    finished: bool = False
    failed: str = ""
    stats_errors: int = 0

    @property
    def options(self) -> Any:
        return self.environment.parsed_options

    def begin(self) -> None:
        opt = self.options
        self.finished, self.failed = False, ""
        if not opt.admin_token:
            return self._fail(
                "no admin token: set FLASHSALE_ADMIN_TOKEN or pass --admin-token (the drill mints "
                "buyer tokens, creates its sale and asks for the audit with it)"
            )
        if not self.environment.host:
            return self._fail("no --host: point the drill at the service, e.g. --host http://127.0.0.1:8080")
        try:
            thresholds = _thresholds(opt.slo)
            weights = PersonaWeights.parse(opt.personas)
        except ValueError as exc:
            return self._fail(str(exc))
        self.thresholds = thresholds
        self.run_id = time.strftime("%m%d%H%M%S") + uuid.uuid4().hex[:4]
        shape_params = {"steps": opt.steps} if opt.shape == "capacity_step" else {}
        self.shape = shape = build_shape(opt.shape, opt.peak_rps, opt.time_scale, **shape_params)
        self.report_dir = Path(opt.report_dir or f"reports/drill-{self.run_id}").resolve()
        self.started_at = time.time()
        start_epoch = self.started_at + opt.lead
        admin = AdminClient(self.environment.host, opt.admin_token)
        behaviour = Behaviour(buyer_users=opt.buyer_users, bot_users=opt.bot_users)
        try:
            if opt.sale:
                self.sale = sale_from_settings(admin.sale(opt.sale))
            else:
                self.sale = default_sale(
                    shape,
                    self.run_id,
                    weights=weights,
                    behaviour=behaviour,
                    start_epoch=start_epoch,
                    hold_ttl_s=opt.hold_ttl if opt.hold_ttl > 0 else None,
                )
                admin.create_sale(self.sale.spec)
        except (AdminError, ValueError) as exc:
            return self._fail(f"cannot set up the drill's sale: {exc}")
        self._register_target(admin, shape, weights, behaviour, start_epoch)
        self.collector = RunCollector(start_epoch, self.report_dir)
        runner = self.environment.runner
        if isinstance(runner, MasterRunner):
            procs = sorted(
                c.id for c in runner.clients.ready + runner.clients.spawning + runner.clients.running
            )
        else:
            procs = ["local"]
        if not procs:
            return self._fail("no Locust workers connected: start workers first (or use --expect-workers)")
        self.collector.expect(procs)
        base = {
            "run_id": self.run_id,
            "shape": opt.shape,
            "peak_rps": opt.peak_rps,
            "time_scale": opt.time_scale,
            "shape_params": shape_params,
            "start_epoch": start_epoch,
            "count": len(procs),
            "report_dir": str(self.report_dir),
            "local_files": True,
            "catalogue": {
                "items": [asdict(i) for i in self.sale.catalogue.items],
                "hot": self.sale.catalogue.hot,
            },
            "options": {
                k: getattr(opt, k)
                for k in (
                    "arrival_process",
                    "personas",
                    "max_in_flight",
                    "max_queue_wait",
                    "connections",
                    "request_timeout",
                    "impatient_timeout",
                    "admin_token",
                    "buyer_users",
                    "bot_users",
                    "drain",
                    "seed",
                )
            },
        }
        for index, proc in enumerate(procs):
            plan = {**base, "index": index}
            if isinstance(runner, MasterRunner):
                runner.send_message(PLAN_MESSAGE, plan, proc)
            else:
                _receive_plan(self.environment, plan)
        log.info(
            "drill %s: %s at %g arrivals/s peak, %d process(es), sale %s, T0 at %s, report in %s",
            self.run_id,
            shape.name,
            shape.peak_rps,
            len(procs),
            self.sale.name,
            time.strftime("%H:%M:%S", time.localtime(start_epoch + shape.t0_s)),
            self.report_dir,
        )
        self.greenlets = [gevent.spawn(self._poll_stats, admin), gevent.spawn(self._progress)]
        if self.sale.release_reserve_at_s is not None:
            self.greenlets.append(
                gevent.spawn(self._release_reserve, admin, start_epoch + self.sale.release_reserve_at_s)
            )

    def _register_target(
        self,
        admin: AdminClient,
        shape: Shape,
        weights: PersonaWeights,
        behaviour: Behaviour,
        start_epoch: float,
    ) -> None:
        """The war room draws orders against this: the shape's cumulative arrivals scaled
        to the order requests they should bring, once a second. Optional: a service
        without a war room still runs the drill."""
        assert self.sale is not None
        per_arrival = expected_orders(shape, weights, behaviour) / max(shape.total, 1.0)
        seconds = int(math.ceil(shape.duration_s))
        points = [[t * 1000, round(shape.cumulative(float(t)) * per_arrival, 1)] for t in range(seconds + 1)]
        opt = self.environment.parsed_options
        assert opt is not None
        try:
            admin.register_target(
                f"{opt.shape} {opt.peak_rps:g} arrivals/s", self.sale.name, int(start_epoch * 1000), points
            )
        except AdminError:
            pass

    def _fail(self, message: str) -> None:
        self.failed = message
        log.error("drill cannot start: %s", message)
        self.environment.process_exit_code = exit_codes.RUN_INVALID
        runner = self.environment.runner
        if runner is not None:
            gevent.spawn_later(0.1, runner.quit)

    @property
    def done(self) -> bool:
        """Every process has sent its last arrival and its visits have finished."""
        return bool(self.failed) or (self.collector is not None and self.collector.all_done)

    def _poll_stats(self, admin: AdminClient) -> None:
        assert self.collector is not None
        while True:
            t = time.time()
            try:
                self.collector.add_service_sample(
                    parse_stats(admin.stats(), t, sale=self.sale.name if self.sale else None)
                )
            except AdminError as exc:
                self.stats_errors += 1
                if self.stats_errors == 1:
                    log.warning(
                        "GET /api/admin/stats failed (%s); the timeline will miss the service's numbers", exc
                    )
            gevent.sleep(max(1.0 - (time.time() - t), 0.05))

    def _release_reserve(self, admin: AdminClient, at: float) -> None:
        assert self.sale is not None
        gevent.sleep(max(at - time.time(), 0))
        try:
            admin.release_reserve(self.sale.name, self.sale.catalogue.hot)
            hot = self.sale.catalogue.hot.removesuffix(f"-{self.run_id}")
            self.events.append(DrillEvent(time.time(), f"reserve of {hot} released"))
        except AdminError as exc:
            log.warning("could not release the reserve pool: %s", exc)

    def progress(self) -> dict[str, Any]:
        """The live numbers: phase, arrivals target vs sent, orders/s, p99, hot stock, backlog."""
        assert self.collector is not None and self.shape is not None and self.sale is not None
        c, shape = self.collector, self.shape
        now_s = time.time() - c.start_epoch
        last = int(now_s) - 2  # a whole second every process has shipped (they ship once a second)
        sec: Mapping[str, int] = c.seconds.get(last, {})
        window = shape.window_at(now_s)
        raw, corrected = c.book.interval(last)
        hot = self.sale.catalogue.hot
        sample = c.service[-1] if c.service else None
        return {
            "run_id": self.run_id,
            "t_s": round(now_s, 1),
            "t_from_t0_s": round(now_s - shape.t0_s, 1),
            "phase": (window.name if window else ("lead" if now_s < 0 else "drain")),
            "target_per_s": round(shape.expected(max(last, 0), last + 1), 1) if last >= 0 else 0.0,
            "sent_per_s": sec.get("arrivals.started", 0),
            "dropped_per_s": sec.get("arrivals.dropped", 0),
            "orders_per_s": sum(n for k, n in sec.items() if k.startswith("out.order.2")),
            "requests_per_s": sum(n for k, n in sec.items() if k.startswith("req.")),
            "p99_ms": raw.get_value_at_percentile(99) / 1000 if raw.get_total_count() else None,
            "p99_corrected_ms": corrected.get_value_at_percentile(99) / 1000
            if corrected.get_total_count()
            else None,
            "hot_sku": hot,
            "hot_available": sample.skus.get(hot, {}).get("available") if sample else None,
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
                log.info(
                    "%s t=%+.0fs target %.0f/s sent %d/s dropped %d/s orders %d/s p99 %s ms %s left %s backlog %s",
                    p["phase"],
                    p["t_from_t0_s"],
                    p["target_per_s"],
                    p["sent_per_s"],
                    p["dropped_per_s"],
                    p["orders_per_s"],
                    p["p99_ms"],
                    p["hot_sku"],
                    p["hot_available"],
                    p["backlog"],
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
        verdict: Verdict | None = None
        oracle_error = ""
        if not opt.no_oracle and collector.requests_path is not None:
            try:
                verdict = run_oracle(
                    AdminClient(self.environment.host or "", opt.admin_token),
                    [collector.requests_path],
                    wait_s=opt.audit_wait,
                    sleep=gevent.sleep,
                    progress=lambda m: log.info("oracle: %s", m),
                    sale=self.sale.name if self.sale else None,
                )
            except AdminError as exc:
                oracle_error = str(exc)
        run = {
            "id": self.run_id,
            "host": self.environment.host,
            "sale": self.sale.name if self.sale else None,
            # The command a person typed: `flashsale rehearse …` passes its own down.
            "command": os.environ.get("FLASHSALE_DRILL_COMMAND")
            or " ".join(shlex.quote(a) for a in sys.argv),
            "stats_errors": self.stats_errors,
        }
        assert self.report_dir is not None
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
            events=self.events,
            plots=not opt.no_plots,
        )
        self.environment.process_exit_code = report.exit_code
        if verdict is not None:
            log.info("oracle verdict:\n%s", format_verdict(verdict))
        log.info(
            "drill %s: exit %d (%s); report in %s",
            self.run_id,
            report.exit_code,
            exit_codes.MEANING[report.exit_code],
            self.report_dir,
        )


def _part(environment: Environment) -> ProcessPart:
    part: ProcessPart | None = getattr(environment, "flashsale_part", None)
    if part is None:
        runner = environment.runner
        proc_id = runner.client_id if isinstance(runner, WorkerRunner) else "local"
        part = ProcessPart(environment, proc_id)
        environment.flashsale_part = part  # type: ignore[attr-defined]
    return part


def _receive_plan(environment: Environment, plan: dict[str, Any]) -> None:
    """A plan starts a run: a process part already used by an earlier run is replaced."""
    part = _part(environment)
    if part.plan is not None:
        environment.flashsale_part = None  # type: ignore[attr-defined]
        part = _part(environment)
    part.receive_plan(plan)


def _on_init(environment: Environment, **_kw: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(
            PLAN_MESSAGE, lambda environment, msg, **_: _receive_plan(environment, msg.data)
        )
    else:
        environment.flashsale_conductor = Conductor(environment)  # type: ignore[attr-defined]
        if isinstance(runner, MasterRunner):
            runner.register_message(
                REPORT_MESSAGE,
                lambda environment, msg, **_: (
                    environment.flashsale_conductor.collector.absorb(msg.data)
                    if environment.flashsale_conductor.collector is not None
                    else None
                ),
            )


def _on_test_start(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # workers start on the master's plan message (sent before this event)
    environment.flashsale_conductor.begin()  # type: ignore[attr-defined]


def _on_test_stop(environment: Environment, **_kw: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        part: ProcessPart | None = getattr(environment, "flashsale_part", None)
        if part is not None:
            part.stop()
    if not isinstance(environment.runner, WorkerRunner):
        environment.flashsale_conductor.finish()  # type: ignore[attr-defined]


def _on_quitting(environment: Environment, **_kw: Any) -> None:
    """Ctrl-C / SIGTERM: Locust decides its exit code before it stops the runner, so stop the
    drill here first — the visits end, the oracle judges what happened, the report is written
    and the exit code is the drill's."""
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        return
    if runner.state not in (STATE_STOPPED, STATE_STOPPING, STATE_CLEANUP):
        runner.stop()
    environment.flashsale_conductor.finish()  # type: ignore[attr-defined]


events.init_command_line_parser.add_listener(_drill_options)  # type: ignore[no-untyped-call]
events.init.add_listener(_on_init)  # type: ignore[no-untyped-call]
events.test_start.add_listener(_on_test_start)  # type: ignore[no-untyped-call]
events.test_stop.add_listener(_on_test_stop)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_on_quitting)  # type: ignore[no-untyped-call]


class DrillDriver(User):
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
        gevent.sleep(3600)  # done: idle until the drill stops


class DrillShape(LoadTestShape):
    """Keeps exactly one driver per Locust process until every process has finished."""

    def tick(self) -> tuple[int, float] | None:
        env = self.runner.environment if self.runner else None
        conductor: Conductor | None = getattr(env, "flashsale_conductor", None)
        if conductor is not None and conductor.done:
            return None
        if conductor is not None and conductor.shape is not None and env is not None:
            opt: Any = env.parsed_options
            limit = opt.lead + conductor.shape.duration_s + opt.drain + 30
            if self.get_run_time() > limit:  # type: ignore[no-untyped-call]
                log.warning(
                    "the drill ran %.0f s (shape, lead, drain and 30 s) without every process finishing; stopping",
                    limit,
                )
                return None
        n = self.runner.worker_count if isinstance(self.runner, MasterRunner) else 1
        return (max(n, 1), float(max(n, 1)))
