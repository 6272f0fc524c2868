"""Personas: weights, what counts as an expected answer, what an order reply tells the oracle,
and the retry-storm clients' backoff."""

from __future__ import annotations

import ast
import random
from collections import Counter
from pathlib import Path

import pytest

from loadtests.arrivals import Arrival
from loadtests.personas import (
    PERSONAS,
    PersonaWeights,
    Reply,
    Shopper,
    backoff_delays,
    classify,
    order_outcome,
)


def test_weights_parse_and_pick_in_proportion() -> None:
    w = PersonaWeights.parse("browser=1, bot=3")
    assert w.as_dict() == {"browser": 1.0, "buyer": 0.0, "abandoner": 0.0, "bot": 3.0, "retry_storm": 0.0}
    rng = random.Random(4)
    picks = Counter(w.pick(rng) for _ in range(20_000))
    assert set(picks) == {"browser", "bot"}
    assert picks["bot"] / picks["browser"] == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        PersonaWeights.parse("shoppers=3")
    with pytest.raises(ValueError, match="not all zero"):
        PersonaWeights.parse("browser=0")


def test_the_mix_follows_the_window() -> None:
    shopper = Shopper(
        transport=None,
        catalogue=None,
        tokens={},
        log=lambda _l: None,
        run_id="r",  # type: ignore[arg-type]
        rng=random.Random(1),
    )
    countdown = Arrival(1, 0.0, 0.0, "countdown", "countdown")
    rendezvous = Arrival(2, 0.0, 0.0, "rendezvous", "rendezvous")
    opening = Arrival(3, 0.0, 0.0, "opening", "open")
    assert {shopper.persona_for(countdown) for _ in range(200)} == {"browser"}
    assert "browser" not in {shopper.persona_for(rendezvous) for _ in range(500)}
    assert {shopper.persona_for(opening) for _ in range(2000)} == set(PERSONAS)


@pytest.mark.parametrize(
    "name,persona,status,code,expected",
    [
        ("order", "buyer", 201, "", True),
        ("order", "buyer", 409, "sold_out", True),
        ("order", "bot", 429, "limit_exceeded", True),
        ("order", "buyer", 409, "sale_not_open", True),
        ("order", "buyer", 429, "rate_limited", False),
        ("order", "bot", 429, "rate_limited", True),
        ("order", "buyer", 503, "overloaded", False),
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
    body = {"error": code} if code else {}
    assert classify(name, persona, Reply(status, body)) is expected


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
    assert order_outcome(Reply(status)) == outcome


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
