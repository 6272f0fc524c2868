"""The report folder from a synthetic run: schema, timeline, logs, plots (each only when its
data exists), verdict ("no oracle" said plainly; "not drained" an invalid run) and exit code."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

from loadtests import exit_codes
from loadtests.admin import parse_stats
from loadtests.arrivals import ArrivalPlan
from loadtests.history import Operation, read_history, summarize_history
from loadtests.latency import read_log
from loadtests.oracle import VIOLATION_KINDS, verdict_from_audit
from loadtests.recording import ProcessRecorder, RunCollector
from loadtests.report import SCHEMA_VERSION, DrillEvent, format_console, order_columns, write_report
from loadtests.shapes import midnight_surge
from loadtests.verdict import Recorded, Truth, judge

START = 1_800_000_000.0


def _synthetic_run(
    tmp_path: Path, *, stall_at: float | None = None, sampled: bool = True
) -> tuple[RunCollector, object]:
    """Two processes replay a small midnight surge against an imaginary service that sells
    40 phones, answering in ~3 ms (or stalling 800 ms around ``stall_at``); ``sampled``: the
    service's stats were polled (stock and queue)."""
    shape = midnight_surge(60.0, 0.2)
    collector = RunCollector(START, tmp_path / "report")
    collector.expect(["p0", "p1"])
    rng = random.Random(5)
    stock = 40
    recorders = [ProcessRecorder(f"p{k}", START, request_log=tmp_path / f"p{k}.jsonl") for k in range(2)]
    for k, rec in enumerate(recorders):
        for a in ArrivalPlan(shape, START, k, 2):
            rec.arrival(a.intended, True, 0.001 * (k + 1), rendezvous=a.kind == "rendezvous")
            sent = a.intended + 0.0005
            slow = stall_at is not None and abs(a.offset - stall_at) < 0.5
            done = sent + (0.8 if slow else rng.uniform(0.001, 0.005))
            if a.kind == "countdown":
                rec.request(
                    "browse",
                    intended=a.intended,
                    sent=sent,
                    done=done,
                    expected=True,
                    label="200",
                    bucket="ok",
                )
                continue
            if a.offset >= shape.t0_s and stock > 0:
                stock -= 1
                label, oid, bucket = "201", f"o{a.seq}", "created"
            else:
                label, oid, bucket = "409:sold_out", None, "sold_out"
            rec.request(
                "order", intended=a.intended, sent=sent, done=done, expected=True, label=label, bucket=bucket
            )
            rec.log(
                Operation(
                    op=a.seq,
                    proc=f"p{k}",
                    visit=f"v{a.seq}",
                    persona="buyer",
                    f="order",
                    intended=a.intended,
                    invoke=sent,
                    complete=done,
                    type="ok" if oid else "fail",
                    status=int(label[:3]),
                    code="" if oid else "sold_out",
                    key=f"r{a.seq}",
                    order=oid,
                    item="phone" if oid else None,
                ).to_json()
            )
        rec.sample_cpu(START + 3, 35.0)
        rec.done = True
        collector.absorb(json.loads(json.dumps(rec.export())))
        rec.close()
    # The service's stats, polled once a second: the phone sells out within a few seconds of T0.
    left = 40
    for s in range(int(shape.duration_s) + 1 if sampled else 0):
        if s >= shape.t0_s:
            left = max(left - 15, 0)
        body = {
            "sales": {
                "d11-t": {
                    "skus": {
                        "phone": {
                            "total": 40,
                            "available": left,
                            "held": 0,
                            "sold": 40 - left,
                            "reserve": 0,
                            "state": "in_stock",
                        }
                    },
                    "backlog": 3 if left else 0,
                },
                "other": {"skus": {"tv": {"total": 9, "available": 9}}, "backlog": 100},
            },
            "writer": {"orders_total": float(40 - left), "rows_total": float(80 - 2 * left)},
        }
        collector.add_service_sample(parse_stats(body, START + s + 0.5, sale="d11-t"))
    collector.close()
    return collector, shape


def _history(collector: RunCollector) -> list[Operation]:
    return list(read_history([collector.requests_path]))  # type: ignore[list-item]


def test_report_folder(tmp_path: Path) -> None:
    collector, shape = _synthetic_run(tmp_path)
    log = _history(collector)
    audit = {
        "ok": True,
        "violations": {k: [] for k in VIOLATION_KINDS},
        "drained": True,
        "skus": {"phone": {"total": 40, "available": 0, "held": 0, "sold": 40, "reserve": 0}},
        "orders": {"redis": 40, "postgres": 40},
    }
    verdict = verdict_from_audit(audit, log)
    report = write_report(
        tmp_path / "report",
        collector,
        shape,
        {"id": "t1", "name": "flashsale", "host": "http://test"},  # type: ignore[arg-type]
        elapsed_s=shape.duration_s,
        thresholds=["latency:p(99)<500", "arrival_ratio:value>0.95"],
        verdict=verdict,
        events=[DrillEvent(START + shape.t0_s + 2, "reserve released")],
    )
    folder = tmp_path / "report"
    for name in (
        "summary.json",
        "timeline.csv",
        "latency-raw.hlog",
        "latency-corrected.hlog",
        "report.html",
        "requests.jsonl",
        "plots/arrivals.png",
        "plots/orders.png",
        "plots/latency.png",
        "plots/stock.png",
        "plots/queue.png",
        "plots/requests.png",
        "plots/latency_by_kind.png",
        "plots/generator.png",
    ):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["schema_version"] == SCHEMA_VERSION and summary["schema"] == "flashsale.drill.summary"
    assert summary["request_log"]["format"] == "loadtests.history/1"
    assert summary["exit_code"] == report.exit_code == exit_codes.OK
    assert summary["arrivals"]["started"] == round(shape.total) and summary["arrivals"]["dropped"] == 0
    assert abs(summary["ratios"]["arrival_ratio"] - 1) < 0.01
    assert summary["requests"]["order"]["outcomes"]["201"] == 40
    assert summary["oracle"]["invariants_held"] is True
    assert summary["service"]["sold_out_at_s_from_t0"]["phone"] == [2.0]
    assert summary["generator"]["cpu_max"] == {"p0": 35.0, "p1": 35.0}
    assert summary["generator"]["t0_sent_ms"] == {"p0": 1.0, "p1": 2.0}
    assert summary["generator"]["t0_skew_ms"] == 1.0

    rows = list(csv.DictReader((folder / "timeline.csv").read_text().splitlines()))
    assert len(rows) >= int(shape.duration_s)
    assert abs(sum(float(r["target_arrivals"]) for r in rows) - shape.total) < 0.01  # rounded to 3 places
    assert sum(int(r["orders_created"]) for r in rows) == 40
    assert (
        sum(int(r["orders_sold_out"]) for r in rows)
        == summary["requests"]["order"]["outcomes"]["409:sold_out"]
    )
    assert {"p99_ms", "p99_corrected_ms", "backlog", "writer_rows_per_s", "available_phone"} <= set(rows[0])
    assert "available_tv" not in rows[0]  # another sale's SKU
    assert max(int(r["backlog"]) for r in rows if r["backlog"] != "") == 3
    assert sum(int(r["writer_rows_per_s"]) for r in rows if r["writer_rows_per_s"] != "") == 40
    assert read_log(folder / "latency-raw.hlog").get_total_count() == sum(int(r["requests"]) for r in rows)

    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 8
    assert "exit 0" in page and "all good" in page and "flashsale drill" in page
    assert summary["events"] == [{"t_from_t0_s": 2.0, "what": "reserve released"}]


def test_planted_violation_and_an_invalid_run_set_the_exit_code(tmp_path: Path) -> None:
    collector, shape = _synthetic_run(tmp_path, stall_at=6.0)
    log = _history(collector)
    audit = {
        "ok": False,
        "violations": {**{k: [] for k in VIOLATION_KINDS}, "oversold": [{"sku": "phone", "by": 1}]},
        "drained": True,
        "skus": {"phone": {"total": 40, "available": 0, "held": 0, "sold": 41, "reserve": 0}},
    }
    kwargs = dict(elapsed_s=shape.duration_s, thresholds=["latency:p(99)<500"], plots=False)
    report = write_report(
        tmp_path / "r1",
        collector,
        shape,
        {"id": "t2"},
        verdict=verdict_from_audit(audit, log),  # type: ignore[arg-type]
        **kwargs,
    )  # type: ignore[arg-type]
    assert report.exit_code == exit_codes.INVARIANT_VIOLATED
    # Without the oracle able to judge, the run is invalid rather than "all good".
    report = write_report(
        tmp_path / "r2",
        collector,
        shape,
        {"id": "t3"},
        oracle_error="service unreachable",  # type: ignore[arg-type]
        **kwargs,
    )  # type: ignore[arg-type]
    assert report.exit_code == exit_codes.RUN_INVALID
    # The stall shows in the SLO: with a clean audit the run only misses its SLO.
    clean = {
        **audit,
        "ok": True,
        "violations": {k: [] for k in VIOLATION_KINDS},
        "skus": {"phone": {"total": 40, "available": 0, "held": 0, "sold": 40, "reserve": 0}},
    }
    report = write_report(
        tmp_path / "r3",
        collector,
        shape,
        {"id": "t4"},
        verdict=verdict_from_audit(clean, log),  # type: ignore[arg-type]
        **kwargs,
    )  # type: ignore[arg-type]
    assert report.exit_code == exit_codes.SLO_MISSED
    assert not (tmp_path / "r3" / "report.html").exists()


def test_order_columns_follow_the_outcomes_seen(tmp_path: Path) -> None:
    collector = RunCollector(START)
    rec = ProcessRecorder("p0", START)
    answers = [
        ("checkout", "201", "created"),
        ("checkout", "409:out_of_stock", "out_of_stock"),
        ("checkout", "0:no_answer", "unknown"),
        ("checkout", "409", "out_of_stock"),
        ("checkout", "201:replayed", "replayed"),
        ("browse", "200", "ok"),
    ]
    for name, label, bucket in answers:
        rec.request(
            name, intended=START, sent=START, done=START + 0.1, expected=True, label=label, bucket=bucket
        )
    collector.expect(["p0"])
    collector.absorb(rec.export())
    assert order_columns(collector, ["checkout"]) == ["created", "replayed", "out_of_stock", "unknown"]
    assert order_columns(collector, ["order"]) == []


def test_a_run_without_oracle_or_samples_says_so_and_draws_only_what_it_has(tmp_path: Path) -> None:
    collector, shape = _synthetic_run(tmp_path, sampled=False)
    report = write_report(
        tmp_path / "report",
        collector,
        shape,
        {"id": "t5", "name": "shop"},
        elapsed_s=shape.duration_s,  # type: ignore[arg-type]
        thresholds=["arrival_ratio:value>0.95"],
    )
    folder = tmp_path / "report"
    summary = json.loads((folder / "summary.json").read_text())
    assert report.exit_code == exit_codes.OK
    # Never "invariants held" when nothing judged them.
    assert "invariants held" not in summary["exit_meaning"] and "no oracle" in summary["exit_meaning"]
    assert "no oracle" in summary["oracle"]["skipped"] and "checks" not in summary["oracle"]
    page = (folder / "report.html").read_text()
    assert "no oracle" in page and "invariants held" not in page
    console = format_console(summary, folder)
    assert "no oracle" in console and "invariants held" not in console
    # No stats were sampled: the stock and queue plots are left out, not drawn empty, on the
    # page as in plots/.
    drawn = ["arrivals", "generator", "latency", "latency_by_kind", "orders", "requests"]
    assert sorted(p.stem for p in (folder / "plots").iterdir()) == drawn
    assert page.count("data:image/png;base64,") == len(drawn)
    assert sorted(re.findall(r'<figure class="chart" id="chart-(\w+)">', page)) == drawn


def test_a_backend_that_had_not_drained_is_an_invalid_run_not_lost_orders(tmp_path: Path) -> None:
    collector, shape = _synthetic_run(tmp_path)
    told = summarize_history(_history(collector), ["order"])
    # The backend recorded only half the acknowledged orders so far: its writer is behind.
    half = [Recorded(o, f"r{o[1:]}") for o in told.acknowledged[:20]]
    truth = Truth(
        stocked={"phone": 40}, sold={"phone": 40}, recorded=half, drained=False, drain_detail="20 queued"
    )
    report = write_report(
        tmp_path / "r",
        collector,
        shape,
        {"id": "t6", "name": "shop"},
        elapsed_s=shape.duration_s,  # type: ignore[arg-type]
        thresholds=["arrival_ratio:value>0.95"],
        verdict=judge(truth, told),
        plots=False,
    )
    summary = report.summary
    assert report.exit_code == exit_codes.RUN_INVALID
    assert summary["exit_meaning"].startswith("run invalid: not drained")
    assert (
        "invariant violated" not in summary["exit_meaning"]
        and "20" not in summary["exit_meaning"].split("(")[0]
    )
    assert [c["name"] for c in summary["oracle"]["not_judged"]] == ["lost"]
    assert "VERDICT  exit 3: run invalid: not drained" in format_console(summary)
    # Drained, the same half is what it is: lost orders.
    drained = judge(Truth(stocked={"phone": 40}, sold={"phone": 40}, recorded=half), told)
    assert [(c.name, c.observed) for c in drained.failed] == [("lost", 20)]
