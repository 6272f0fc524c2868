"""The example of a backend that is not flashsale (``examples/shop``), rehearsed with the kit by
the commands ``docs/your-backend.md`` gives — real processes, real Locust, a few seconds each,
loopback only: the correct shop passes (exit 0), the naive one is caught, OVERSOLD, exit 2.

Also from the docs: ``python -m loadtests help`` lists a locustfile's options, ``-t`` is refused
with what to use instead, the web UI disables what means nothing under open-model arrivals and
explains the rest, the history reads back, and the docs' Python snippets run.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from shop_support import LOOSE_SLO, ROOT, SHOP, LocustRun, run_locust, running_shop, shop_command

from loadtests import exit_codes
from loadtests.history import read_history, summarize_history

DOC = (ROOT / "docs" / "your-backend.md").read_text(encoding="utf-8")


def _commands(text: str) -> list[str]:
    """Every command line of the ```sh blocks of a markdown text."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines += [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return lines


def _doc_command(prefix: str, containing: str = "") -> list[str]:
    found = [c for c in _commands(DOC) if c.startswith(prefix) and containing in c]
    assert len(found) == 1, f"docs/your-backend.md should show one `{prefix} … {containing}` command: {found}"
    return shlex.split(found[0])


def _as_run(argv: list[str], *, port: str | None = None) -> list[str]:
    """A documented command as the test runs it: this interpreter, the checkout's examples,
    the shop on a free port (0) or the port it took."""
    out = []
    for token in argv:
        token = token.replace("examples/", f"{ROOT}/examples/")
        if port is not None:
            token = token.replace("127.0.0.1:8090", f"127.0.0.1:{port}")
        out.append(token)
    if out[0] == "python":
        out[0] = sys.executable
    if "--port" in out:
        out[out.index("--port") + 1] = "0"
    return out


def _rehearse(variant: str, tmp_path: Path) -> LocustRun:
    server = _doc_command("python examples/shop/server.py", f"--variant {variant}")
    locust = _doc_command("locust -f examples/shop/locustfile.py")
    with running_shop(_as_run(server), tmp_path) as shop:
        port = shop.url.rsplit(":", 1)[1]
        # The documented command as it is, with loose latency thresholds (a shared CI machine).
        return run_locust(
            [*_as_run(locust, port=port), "--slo", LOOSE_SLO, "--no-plots"],
            tmp_path,
            tmp_path / f"report-{variant}",
        )


@pytest.fixture(scope="module")
def naive(tmp_path_factory: pytest.TempPathFactory) -> LocustRun:
    return _rehearse("naive", tmp_path_factory.mktemp("naive"))


@pytest.fixture(scope="module")
def correct(tmp_path_factory: pytest.TempPathFactory) -> LocustRun:
    return _rehearse("correct", tmp_path_factory.mktemp("correct"))


@pytest.mark.timeout(240)
def test_the_naive_shop_is_caught_overselling(naive: LocustRun) -> None:
    assert naive.code == exit_codes.INVARIANT_VIOLATED, naive.explain()
    checks = {c["name"]: c for c in naive.summary["oracle"]["checks"]}
    assert checks["oversold"]["passed"] is False and checks["oversold"]["observed"] > 0, checks
    assert re.search(r"mug: \d+ sold of 3 stocked", checks["oversold"]["detail"])
    assert checks["lost"]["passed"] and checks["duplicate"]["passed"]  # what it did record, it recorded once
    assert naive.summary["exit_meaning"] == "invariant violated: oversold"
    # The console's end-of-run table, k6-style.
    assert "✗ oversold" in naive.out and "VERDICT  exit 2: INVARIANT VIOLATED: OVERSOLD" in naive.out
    assert "thresholds" in naive.out and "✓ error_ratio:rate<0.01" in naive.out


@pytest.mark.timeout(240)
def test_the_correct_shop_passes(correct: LocustRun) -> None:
    assert correct.code == exit_codes.OK, correct.explain()
    s = correct.summary
    assert s["oracle"]["invariants_held"] and not s["oracle"]["not_judged"], s["oracle"]
    assert [c["name"] for c in s["oracle"]["checks"]] == ["oversold", "lost", "duplicate"]
    log = s["oracle"]["log"]
    assert log["acknowledged"] >= 3, log  # every mug (3) and some tees
    assert s["requests"]["checkout"]["outcomes"].get("409:out_of_stock", 0) > 0  # the crowd met "sold out"
    assert s["arrivals"]["dropped"] == 0 and s["run"]["name"] == "example shop"
    # The report says how the run was set up and where it ran: the kit's and the locustfile's options.
    assert s["run"]["settings"]["shop_db"] == "shop.db" and s["run"]["settings"]["no_plots"] is True
    assert s["generator"]["machines"]["local"]["cpus"] >= 1 and s["versions"]["locust"]
    assert "✓ oversold" in correct.out and "VERDICT  exit 0" in correct.out


@pytest.mark.timeout(240)
def test_the_history_reads_back(correct: LocustRun) -> None:
    ops = list(read_history([correct.report / "requests.jsonl"]))
    assert ops and all(o.invoke <= o.complete and o.intended <= o.complete for o in ops)
    assert {o.type for o in ops} <= {"ok", "fail", "info"} and {o.f for o in ops} == {"checkout", "item page"}
    assert len({(o.proc, o.op) for o in ops}) == len(ops)  # (proc, op) names one operation
    refused = [o for o in ops if o.type == "fail"]
    assert refused and all(o.code == "out_of_stock" and o.status == 409 for o in refused)
    told = summarize_history(ops, ["checkout"])
    assert len(told.acknowledged) == correct.summary["oracle"]["log"]["acknowledged"]
    # The history and the shop's own ledger tell the same story.
    import sqlite3

    with sqlite3.connect(correct.report.parent / "shop.db") as db:
        recorded = {o for (o,) in db.execute("SELECT id FROM orders")}
        mugs = db.execute("SELECT SUM(quantity) FROM orders WHERE item = 'mug'").fetchone()[0]
    assert recorded == set(told.acknowledged) and mugs == 3
    assert all(o.item and o.units == 1 and o.key for o in ops if o.type == "ok" and o.f == "checkout")


def test_the_docs_and_the_readme_show_the_same_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Rehearse your own backend") :]
    shown = [c.removesuffix("&").strip() for c in _commands(section[: section.index("\n## ", 5)])]
    assert shown and set(shown) <= set(_commands(DOC)), shown
    assert "docs/your-backend.md" in section


def test_help_lists_the_kits_and_the_locustfiles_options() -> None:
    argv = _as_run(_doc_command("python -m loadtests help"))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for option in ("--shape", "--peak-rps", "--duration", "--personas", "--slo", "--no-oracle", "--shop-db"):
        assert option in done.stdout, option
    unwrapped = "".join(done.stdout.split())
    assert (
        "midnight_surge" in unwrapped and "browser=2,buyer=3" in unwrapped
    )  # the shapes, this file's personas


def test_run_time_is_refused_with_what_to_use_instead(tmp_path: Path) -> None:
    run = run_locust(
        [
            "locust",
            "-f",
            str(SHOP / "locustfile.py"),
            "--headless",
            "--host",
            "http://127.0.0.1:9",
            "-t",
            "20s",
        ],
        tmp_path,
        tmp_path / "report",
        timeout_s=120,
    )
    assert run.code == exit_codes.USAGE, run.explain()
    assert "-t/--run-time does not apply" in run.out + run.err and "--duration" in run.out
    assert not (tmp_path / "report" / "summary.json").exists()  # nothing ran


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_the_web_ui_disables_user_counts_and_explains_the_open_model(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(SHOP / "locustfile.py"),
            "--web-host",
            "127.0.0.1",
            "--web-port",
            str(port),
            "--host",
            "http://127.0.0.1:9",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        page = ""
        for _ in range(300):  # until the web UI answers (bounded: ~60 s)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    page = resp.read().decode()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"locust exited with {proc.returncode}")
                time.sleep(0.2)
        assert page, "the web UI never answered"
        found = re.search(r"window\.templateArgs = (.*)$", page, re.M)
        assert found, page[:2000]
        args = json.loads(found.group(1))
        assert args["hide_common_options"] is True  # no user count, spawn rate or run time to fill in
        assert {"title": "Open model", "key": "open-model"} in args["extended_tabs"]
        assert {"--peak-rps", "--shape"} <= {f"--{k.replace('_', '-')}" for k in args["extra_options"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/requests", timeout=10) as resp:
            stats = json.loads(resp.read())
        tab = next(t for t in stats["extended_stats"] if t["key"] == "open-model")
        what = {row["what"]: row["value"] for row in tab["data"]}
        assert "not the load" in what["Users (header)"] and "disabled" in what["Start form"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_docs_python_runs(tmp_path: Path) -> None:
    """The locustfile sketch and the shape snippet execute (in a process of their own: they
    plug into Locust), and the snippet's shape is what it says."""
    blocks = re.findall(r"```python\n(.*?)```", DOC, re.S)
    assert len(blocks) == 2
    script = tmp_path / "snippets.py"
    script.write_text(
        "\n".join(blocks)
        + "\nshape = rehearsal.build_shape('launch', 100.0, 1.0)\n"
        + "print(shape.duration_s, shape.t0_s, round(shape.total), sorted(rehearsal.personas))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # 0→100/s over 10 s, then 100→25/s over 30 s, plus a 100-arrival rendezvous at T0 (t=10 s).
    assert done.stdout.split() == ["40.0", "10.0", str(round(500 + 1875 + 100)), "['buyer']"]


@pytest.mark.timeout(240)
def test_distributed_a_master_and_two_workers_make_one_run(tmp_path: Path) -> None:
    """Each worker sends its share of one schedule (both fire the T0 rendezvous); the master
    merges their numbers and histories, judges once and exits with the verdict."""
    locustfile = str(SHOP / "locustfile.py")
    port = _free_port()
    with running_shop(shop_command("naive", tmp_path / "shop.db"), tmp_path) as shop:
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", locustfile, "--worker", "--master-port", str(port)],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for _ in range(2)
        ]
        try:
            run = run_locust(
                ["locust", "-f", locustfile, "--headless", "--master", "--master-bind-host", "127.0.0.1"]
                + [
                    "--master-bind-port",
                    str(port),
                    "--expect-workers",
                    "2",
                    "--expect-workers-max-wait",
                    "90",
                ]
                + ["--host", shop.url, "--shop-db", str(shop.db), "--peak-rps", "40", "--time-scale", "0.1"]
                + ["--slo", LOOSE_SLO, "--no-plots"],
                tmp_path,
                tmp_path / "report",
            )
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)
    assert run.code == exit_codes.INVARIANT_VIOLATED, run.explain()
    s = run.summary
    assert len(s["run"]["processes"]) == 2 and len(s["generator"]["t0_sent_ms"]) == 2
    ops = list(read_history([run.report / "requests.jsonl"]))
    assert {o.proc for o in ops} == set(s["run"]["processes"])
    assert sorted(p.name for p in (run.report / "processes").iterdir()) == sorted(
        f"{p}.requests.jsonl" for p in s["run"]["processes"]
    )
    assert s["arrivals"]["started"] == round(s["arrivals"]["target"]) and s["arrivals"]["dropped"] == 0
