"""The history format (``loadtests.history/1``): what a persona's calls write reads back as the
same operations, per-process files merge, and lines that are not the format are refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loadtests import HISTORY_FORMAT, Operation, read_history
from loadtests.history import history_line, merge_histories, to_micros
from loadtests.recording import ProcessRecorder


def test_operations_round_trip_through_a_process_recorder(tmp_path: Path) -> None:
    ops = [
        Operation(
            0,
            "w1",
            "r-1",
            "buyer",
            "checkout",
            10.0,
            10.001,
            10.25,
            "ok",
            201,
            key="k1",
            order="o1",
            item="mug",
            units=2,
            replayed=True,
            value={"user": "u7", "attempt": 1},
        ),
        Operation(
            1, "w1", "r-2", "buyer", "checkout", 10.5, 10.5, 10.6, "fail", 409, code="out_of_stock", key="k2"
        ),
        Operation(
            2,
            "w1",
            "r-3",
            "buyer",
            "checkout",
            11.0,
            11.2,
            21.2,
            "info",
            0,
            code="no_answer",
            error="timed out",
            key="k3",
        ),
        Operation(3, "w1", "r-4", "buyer", "checkout", 12.0, 12.0, 12.3, "info", 0, code="stopped", key="k4"),
    ]
    recorder = ProcessRecorder("w1", 10.0, request_log=tmp_path / "w1.requests.jsonl")
    for op in ops:
        recorder.log(op.to_json())
    recorder.close()
    lines = [json.loads(x) for x in (tmp_path / "w1.requests.jsonl").read_text().splitlines()]
    assert all({"op", "proc", "f", "invoke", "complete", "type", "status"} <= set(x) for x in lines)
    assert list(read_history([tmp_path / "w1.requests.jsonl"])) == ops
    assert HISTORY_FORMAT == "loadtests.history/1"


def test_a_line_built_from_fields_is_the_operations_own_line(tmp_path: Path) -> None:
    # A load process writes its lines from the fields without building an Operation (one per
    # request); they must be the very lines Operation.to_json writes, defaults included.
    cases = [
        {
            "op": 0,
            "proc": "w1",
            "visit": "r-1",
            "persona": "bot",
            "f": "order",
            "intended": 1.5,
            "invoke": 1.5,
            "complete": 2.0,
            "type": "ok",
            "status": 201,
            "key": "k",
            "order": "o1",
            "item": "hot",
            "units": 0,
            "replayed": False,
            "value": {"user": "bot-1", "skus": ["a"]},
        },
        {
            "op": 1,
            "proc": "w1",
            "visit": "r-2",
            "persona": "buyer",
            "f": "pay",
            "intended": 3.0,
            "invoke": 3.0,
            "complete": 3.1,
            "type": "info",
            "status": 0,
            "code": "stopped",
            "key": None,
        },
        {
            "op": 2,
            "proc": "w1",
            "visit": "",
            "persona": "",
            "f": "order",
            "intended": 0.0,
            "invoke": 0.0,
            "complete": 0.0,
            "type": "fail",
            "status": 409,
            "code": "sold_out",
            "error": "",
            "value": {},
        },
    ]
    recorder = ProcessRecorder("w1", 0.0, request_log=tmp_path / "w1.requests.jsonl")
    for fields in cases:
        assert history_line(fields) == Operation(**fields).to_json()
        assert list(history_line(fields)) == list(Operation(**fields).to_json())  # same order of keys
        recorder.log(history_line(fields))
    recorder.close()
    assert list(read_history([tmp_path / "w1.requests.jsonl"])) == [Operation(**f) for f in cases]


def test_per_process_histories_merge(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(Operation(0, "a", "v", "p", "f", 1, 1, 2, "ok", 200).to_json()) + "\n\n")
    b.write_text(json.dumps(Operation(0, "b", "v", "p", "f", 1, 1, 2, "fail", 409).to_json()) + "\n")
    assert merge_histories([a, b], tmp_path / "all.jsonl") == 2
    assert [(o.proc, o.type) for o in read_history([tmp_path / "all.jsonl"])] == [("a", "ok"), ("b", "fail")]


def test_a_line_of_another_format_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"kind": "order", "rid": "r1", "outcome": "ok", "order_id": "o1"}) + "\n")
    with pytest.raises(ValueError, match="loadtests.history/1"):
        list(read_history([old]))


def test_instants_are_written_to_the_microsecond_keeping_their_order() -> None:
    # A load process rounds three instants per request: ``to_micros`` must be round(t, 6) but
    # for ties, and never swap two instants (a line's intended <= invoke <= complete).
    rng = random.Random(7)
    instants = sorted(1.7e9 + rng.random() * 1e5 for _ in range(20_000))
    instants += [1.7e9 + k / 1e6 for k in range(1000)]  # exact microseconds stay as they are
    instants.sort()
    micros = [to_micros(t) for t in instants]
    # Within a microsecond of round(t, 6), at the resolution of a float near 1.7e9 (2.4e-7).
    assert all(abs(m - round(t, 6)) <= 1.5e-6 for m, t in zip(micros, instants, strict=True))
    assert all(abs(m - t) <= 0.75e-6 for m, t in zip(micros, instants, strict=True))
    assert micros == sorted(micros)
    assert to_micros(1_700_000_000.123456) == 1_700_000_000.123456
    assert len(json.dumps(to_micros(1_700_000_000.1234567891))) <= len("1700000000.123457")


def test_a_line_is_written_with_its_process_whatever_it_says(tmp_path: Path) -> None:
    recorder = ProcessRecorder("w2", 0.0, request_log=tmp_path / "w2.requests.jsonl")
    recorder.log(Operation(0, "w2", "v", "p", "f", 1, 1, 2, "ok", 200).to_json())
    recorder.log(Operation(1, "elsewhere", "v", "p", "f", 1, 1, 2, "ok", 200).to_json())
    line = {
        k: v
        for k, v in Operation(2, "w2", "v", "p", "f", 1, 1, 2, "ok", 200).to_json().items()
        if k != "proc"
    }
    recorder.log(line)
    recorder.close()
    assert [o.proc for o in read_history([tmp_path / "w2.requests.jsonl"])] == ["w2", "w2", "w2"]
