"""flashsale's personas: weights and the mix per window (through the kit's Rehearsal), what
counts as an expected answer, what an order answer tells the oracle, and the retry-storm
clients' backoff."""

from __future__ import annotations

import ast
import random
from collections import Counter
from pathlib import Path

import pytest

from loadtests.arrivals import Arrival
from loadtests.personas import (
    DEFAULT_WEIGHTS,
    KINDS,
    PERSONAS,
    VISITS,
    backoff_delays,
    classify,
    order_outcome,
)
from loadtests.rehearsal import ALL_KINDS, Rehearsal, parse_weights


def _drill() -> Rehearsal:
    """The drill's personas registered as loadtests/surge.py does (without plugging into Locust)."""
    rehearsal = Rehearsal("flashsale")
    for name, visit in VISITS.items():
        rehearsal.persona(visit, name=name, weight=DEFAULT_WEIGHTS[name], kinds=KINDS[name])
    return rehearsal


def test_weights_parse_and_pick_in_proportion() -> None:
    rehearsal = _drill()
    w = rehearsal.weights("browser=1, bot=3")
    assert w == {"browser": 1.0, "buyer": 0.0, "abandoner": 0.0, "bot": 3.0, "retry_storm": 0.0}
    assert rehearsal.weights("") == {p: float(DEFAULT_WEIGHTS[p]) for p in PERSONAS}
    rng = random.Random(4)
    opening = Arrival(3, 0.0, 0.0, "opening", "open")
    picks = Counter(rehearsal.pick(opening, w, rng).name for _ in range(20_000))
    assert set(picks) == {"browser", "bot"}
    assert picks["bot"] / picks["browser"] == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        rehearsal.weights("shoppers=3")
    with pytest.raises(ValueError, match="not a number"):
        parse_weights("browser=lots", {"browser": 1.0})
    with pytest.raises(ValueError, match="not all zero"):
        rehearsal.weights("browser=0")


def test_the_mix_follows_the_window() -> None:
    rehearsal, rng = _drill(), random.Random(1)
    weights = rehearsal.weights("")
    countdown = Arrival(1, 0.0, 0.0, "countdown", "countdown")
    rendezvous = Arrival(2, 0.0, 0.0, "rendezvous", "rendezvous")
    opening = Arrival(3, 0.0, 0.0, "opening", "open")
    assert {rehearsal.pick(countdown, weights, rng).name for _ in range(200)} == {"browser"}
    assert "browser" not in {rehearsal.pick(rendezvous, weights, rng).name for _ in range(500)}
    assert {rehearsal.pick(opening, weights, rng).name for _ in range(2000)} == set(PERSONAS)


@pytest.mark.parametrize(
    "name,persona,status,code,expected",
    [
        ("order", "buyer", 201, "", True),
        ("order", "buyer", 409, "sold_out", True),
        ("order", "bot", 429, "limit_exceeded", True),
        ("order", "buyer", 409, "sale_not_open", True),
        ("order", "buyer", 429, "rate_limited", False),
        ("order", "bot", 429, "rate_limited", True),
        ("order", "buyer", 429, "overloaded", False),
        ("order", "buyer", 504, "outcome_unknown", False),
        ("order", "buyer", 0, "", False),
        ("order", "buyer", 422, "invalid_request", False),
        ("pay", "buyer", 200, "", True),
        ("pay", "buyer", 409, "hold_expired", True),
        ("pay", "buyer", 404, "order_not_found", False),
        ("browse", "browser", 200, "", True),
        ("browse", "browser", 500, "internal", False),
    ],
)
def test_expected_answers(name: str, persona: str, status: int, code: str, expected: bool) -> None:
    assert classify(name, persona, status, code) is expected


@pytest.mark.parametrize(
    "status,outcome",
    [
        (201, "ok"),
        (409, "failed"),
        (429, "failed"),
        (422, "failed"),
        (503, "failed"),
        (504, "unknown"),
        (500, "unknown"),
        (0, "unknown"),
    ],
)
def test_order_outcome_for_the_oracle(status: int, outcome: str) -> None:
    assert order_outcome(status) == outcome


def test_backoff_is_exponential_with_full_jitter() -> None:
    rng = random.Random(9)
    runs = [backoff_delays(rng, 6, 0.05, 1.0) for _ in range(2000)]
    for k in range(6):
        ceiling = min(1.0, 0.05 * 2**k)
        column = [r[k] for r in runs]
        assert 0 <= min(column) and max(column) <= ceiling
        assert sum(column) / len(column) == pytest.approx(
            ceiling / 2, rel=0.1
        )  # uniform: jittered, not fixed


def test_loadtests_never_import_the_service() -> None:
    # loadtests/ speaks HTTP only, so it can drill any deployment.
    for path in Path(__file__).resolve().parents[1].joinpath("loadtests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert not name.startswith(("flashsale", "inventory")), f"{path.name} imports {name}"


def test_a_picker_draws_what_rng_choices_drew_for_a_seed() -> None:
    # The load process picks with a picker made once; a seeded run must pick the personas it
    # picked when each pick called rng.choices over that window's personas.
    rehearsal = _drill()
    for text in ("", "browser=1, bot=3", "buyer=2"):
        weights = rehearsal.weights(text)
        arrivals = [Arrival(i, 0.0, 0.0, "w", kind) for i, kind in enumerate(ALL_KINDS * 2000)]
        before, after = random.Random(9), random.Random(9)
        expected = []
        for arrival in arrivals:
            eligible = [
                p for p in rehearsal.personas.values() if arrival.kind in p.kinds and weights[p.name] > 0
            ] or [p for p in rehearsal.personas.values() if weights[p.name] > 0]
            expected.append(before.choices(eligible, weights=[weights[p.name] for p in eligible])[0].name)
        pick = rehearsal.picker(weights)
        assert [pick(a, after).name for a in arrivals] == expected
