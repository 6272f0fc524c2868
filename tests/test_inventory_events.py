"""The event-stream entry contract (``inventory/_events.py``): every ``XADD`` in the Lua
scripts writes exactly the fields the contract lists for its type (read statically from
the scripts, so a new field or type cannot slip in unlisted), the scripts point to the
contract, the parser refuses what breaks it, and every entry the real engine appends
through a sale's whole life parses to its type — a reservation call's one entry to the
holds it made."""

from __future__ import annotations

import ast
import asyncio
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
from inventory_support import open_sale

import inventory
from inventory import (
    EVENT_FIELDS,
    EventError,
    Hold,
    HoldState,
    Inventory,
    Line,
    OrderEvent,
    StockEvent,
    StreamId,
    parse_event,
    parse_events,
)
from inventory._scripts import SCRIPT_NAMES, script_source

LUA = Path(inventory.__file__).parent / "lua"
EVENTS_PY = Path(inventory.__file__).parent / "_events.py"

# ------------------------------------------------------------ reading the scripts


def _code(text: str) -> str:
    """The script without comments (blank, so line numbers stay), so only code is read."""
    text = re.sub(r"--\[\[.*?\]\]", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    return re.sub(r"--[^\n]*", "", text)


def _call_args(code: str, open_paren: int) -> list[str]:
    """The top-level arguments of the call whose '(' is at ``open_paren``."""
    args: list[str] = []
    depth, start, i, quote = 0, open_paren + 1, open_paren, ""
    while True:
        c = code[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                args.append(code[start:i].strip())
                return args
        elif c == "," and depth == 1:
            args.append(code[start:i].strip())
            start = i + 1
        i += 1


_LITERAL = re.compile(r"""'([^'\\]*)'|"([^"\\]*)\"""")


def _literal(expr: str) -> str | None:
    m = _LITERAL.fullmatch(expr)
    return None if m is None else (m[1] if m[1] is not None else m[2])


_TABLE_LOOKUP = re.compile(r"\(\{([^}]*)\}\)\[\s*\w+\s*\]")


def _possible_values(code: str, var: str, where: str) -> set[str]:
    """Every value ``var`` can hold, read from its assignments in the script: each must be a
    string literal or a lookup in a table of string literals (``({a = 'x', b = 'y'})[k]``).
    Anything else fails: the test must be able to tell which types a script writes."""
    assignments = re.findall(rf"(?<![\w.])(?:local\s+)?{re.escape(var)}\s*=(?!=)[ \t]*([^\n]*)", code)
    assert assignments, f"{where}: the entry type is {var!r}, which is never assigned in the script"
    values: set[str] = set()
    for rhs in assignments:
        # The right-hand side is one literal or one table lookup; after it the line may
        # only close a block ('if … then x = 'a' end').
        head = _LITERAL.match(rhs) or _TABLE_LOOKUP.match(rhs)
        rest = rhs[head.end() :].strip() if head else rhs
        assert head and re.fullmatch(r"((end|else)\b.*)?", rest), (
            f"{where}: cannot tell which types {var!r} = {rhs.strip()!r} writes; keep types literal"
        )
        if head.re is _LITERAL:
            values.add(head[1] if head[1] is not None else head[2])
            continue
        for item in head[1].split(","):
            value = _literal(item.partition("=")[2].strip())
            assert value is not None, f"{where}: {var!r} takes a type that is not a literal: {item!r}"
            values.add(value)
    return values


#: How the contract names a type's one field per hold (kind ``hold``), and how the reader
#: names what a trailing ``unpack(…)`` of an XADD writes: field/value pairs made at run time.
HOLDS = "<hold id>"


@dataclass(frozen=True)
class Append:
    """One XADD found in a script."""

    path: str  # below lua/
    line: int
    types: frozenset[str]
    fields: tuple[str, ...]  # as written, ``type`` included

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def appends_in(path: Path, root: Path = LUA) -> list[Append]:
    code = _code(path.read_text(encoding="utf-8"))
    rel = path.relative_to(root).as_posix()
    found: list[Append] = []
    for m in re.finditer(r"redis\.p?call\s*\(", code):
        args = _call_args(code, m.end() - 1)
        if (_literal(args[0]) or "").upper() != "XADD":
            continue
        line = code.count("\n", 0, m.start()) + 1
        where = f"{rel}:{line}"
        # The id is '*' and nothing comes between key and fields: no MAXLEN (it can trim
        # entries not yet written to PostgreSQL), no explicit ids.
        assert _literal(args[2]) == "*", f"{where}: XADD must be XADD <key> * <fields>, got {args[2]!r}"
        pairs = args[3:]
        unpacked = bool(pairs) and re.fullmatch(r"unpack\(.*\)", pairs[-1], re.S) is not None
        if unpacked:
            pairs = pairs[:-1]
        assert pairs and len(pairs) % 2 == 0, f"{where}: fields and values do not pair up"
        names = []
        for name_expr in pairs[0::2]:
            name = _literal(name_expr)
            assert name is not None, f"{where}: field name {name_expr!r} is not a literal"
            names.append(name)
        assert len(set(names)) == len(names), f"{where}: a field is written twice: {names}"
        assert "type" in names, f"{where}: the entry has no 'type'"
        type_expr = pairs[1::2][names.index("type")]
        literal = _literal(type_expr)
        if literal is not None:
            types = {literal}
        else:
            assert re.fullmatch(r"\w+", type_expr), (
                f"{where}: type {type_expr!r} is neither literal nor a name"
            )
            types = _possible_values(code, type_expr, where)
        found.append(Append(rel, line, frozenset(types), (*names, HOLDS) if unpacked else tuple(names)))
    mentions = len(re.findall(r"xadd", code, re.I))
    assert mentions == len(found), (
        f"{rel}: {mentions} XADDs in the code, {len(found)} read as redis.call('XADD', …)"
    )
    return found


def every_append() -> list[Append]:
    return [a for path in sorted(LUA.rglob("*.lua")) for a in appends_in(path)]


# ------------------------------------------------------- scripts vs the contract


def test_the_reader_finds_the_appends() -> None:
    """Not vacuous: the reader finds (at least) the five appends the scripts had when the
    contract was written."""
    assert {a.path for a in every_append()} >= {
        "adjust.lua",
        "includes/hold_close.lua",
        "release_reserve.lua",
        "reserve.lua",
        "stock.lua",
    }


@pytest.mark.parametrize("append", every_append(), ids=lambda a: a.where)
def test_every_xadd_writes_a_field_set_the_contract_lists(append: Append) -> None:
    written = set(append.fields) - {"type"}
    for kind in sorted(append.types):
        assert kind in EVENT_FIELDS, f"{append.where} writes type {kind!r}, which the contract does not list"
        listed = set(EVENT_FIELDS[kind])
        required = {name for name, f in EVENT_FIELDS[kind].items() if f.required}
        assert written <= listed, f"{append.where} writes {sorted(written - listed)} on {kind!r}, not listed"
        assert required <= written, f"{append.where} leaves out {sorted(required - written)} on {kind!r}"


def test_every_type_of_the_contract_is_written_by_a_script() -> None:
    """Every type but ``reserved``, which reserve.lua wrote before ``reserved_batch`` and
    readers still read (a stream written before an upgrade is drained after it)."""
    written = set().union(*(a.types for a in every_append()))
    assert written == set(EVENT_FIELDS) - {"reserved"}
    assert OrderEvent.TYPES | StockEvent.TYPES | {"reserved_batch"} == set(EVENT_FIELDS)
    assert not OrderEvent.TYPES & StockEvent.TYPES


def test_the_reserve_script_appends_one_entry_of_packed_holds() -> None:
    """reserve.lua's one XADD writes ``type``, ``at`` and the holds' field/value pairs it
    gathered (the reader's HOLDS), which the contract lists as the one field of kind hold."""
    (append,) = [a for a in every_append() if a.path == "reserve.lua"]
    assert append.types == {"reserved_batch"} and append.fields == ("type", "at", HOLDS)
    holds = [f for spec in EVENT_FIELDS.values() for f in spec.values() if f.kind == "hold"]
    assert [f.name for f in holds] == [HOLDS] and EVENT_FIELDS["reserved_batch"][HOLDS] is holds[0]


def test_the_reader_sees_a_computed_type_and_refuses_an_opaque_one(tmp_path: Path) -> None:
    """How strict the reader is: a type chosen from literals counts every literal; a type
    it cannot read fails instead of being skipped."""
    by_path = {a.path: a for a in every_append()}
    assert by_path["adjust.lua"].types == {"restocked", "written_off"}
    assert by_path["includes/hold_close.lua"].types == {"confirmed", "released", "expired"}
    script = tmp_path / "x.lua"
    for opaque in ("ARGV[1]", "'re' .. 'stocked'", "pick('stocked')"):
        script.write_text(f"local t = {opaque}\nredis.call('XADD', KEYS[1], '*', 'type', t, 'at', 1)\n")
        with pytest.raises(AssertionError, match="cannot tell which types"):
            appends_in(script, tmp_path)
    script.write_text("redis.call('XADD', KEYS[1], '*', 'type', kind, 'at', 1)\n")
    with pytest.raises(AssertionError, match="never assigned"):
        appends_in(script, tmp_path)
    script.write_text("redis.call('XADD', KEYS[1], 'MAXLEN', 10, '*', 'type', 'stocked')\n")
    with pytest.raises(AssertionError, match=r"XADD must be XADD <key> \*"):
        appends_in(script, tmp_path)


_POINTER = re.compile(r"Event entry[^:\n]*: see inventory/_events\.py \(([^)]*)\)")


def _pointed_types(text: str) -> set[str] | None:
    m = _POINTER.search(text)
    return None if m is None else set(re.findall(r"EVENT_FIELDS\['(\w+)'\]", m[1]))


def test_every_script_that_appends_points_to_the_contract() -> None:
    """A script that appends (itself or through an include) names the entry types it can
    write, in its header, as keys of EVENT_FIELDS."""
    for append in every_append():
        pointed = _pointed_types((LUA / append.path).read_text(encoding="utf-8"))
        assert pointed == append.types, (
            f"{append.path}'s header points to {pointed}, it writes {append.types}"
        )
    for name in SCRIPT_NAMES:
        written = set().union(*(a.types for a in every_append() if _appends_into(name, a)))
        pointed = _pointed_types((LUA / f"{name}.lua").read_text(encoding="utf-8"))
        if not written:
            assert pointed is None, f"{name}.lua points to the contract but appends nothing"
            continue
        assert pointed, f"{name}.lua appends {written} but its header does not point to _events.py"
        assert pointed <= written, f"{name}.lua's header names {pointed - written}, never written there"


def _appends_into(script: str, append: Append) -> bool:
    if append.path == f"{script}.lua":
        return True
    include = append.path.removeprefix("includes/").removesuffix(".lua")
    text = (LUA / f"{script}.lua").read_text(encoding="utf-8")
    return append.path.startswith("includes/") and f"-- @include {include}\n" in text


def test_the_key_layout_points_to_the_entry_contract() -> None:
    from inventory import _keys

    assert _keys.__doc__ is not None and "_events.py" in _keys.__doc__
    assert "XADD" in script_source("confirm")  # includes inlined: confirm appends through hold_close


# ------------------------------------------------------- the contract's own text


def test_the_docstring_table_is_the_contract() -> None:
    """The module docstring's table of types and fields says what EVENT_FIELDS says."""
    from inventory import _events

    doc = _events.__doc__ or ""
    rules = [i for i, line in enumerate(doc.splitlines()) if line.startswith("=====")]
    assert len(rules) == 3, "one table: a rule above the head, one below it, one at the end"
    body = "\n".join(doc.splitlines()[rules[1] + 1 : rules[2]])
    rows = re.findall(r"^``(\w+)``\s+(\S.*?)\s{2,}\S.*$", body, re.M)
    table = {kind: [name.strip() for name in names.split(",")] for kind, names in rows}
    assert table == {kind: list(spec) for kind, spec in EVENT_FIELDS.items()}
    for spec in EVENT_FIELDS.values():
        for name, field in spec.items():
            assert field.name == name and field.meaning and field.kind in ("text", "int", "lines", "hold")


def test_the_contract_imports_only_the_standard_library() -> None:
    """Any consumer can read the contract: _events.py and the inventory modules it uses
    import nothing outside the standard library."""
    seen: set[str] = set()
    todo = ["_events"]
    while todo:
        module = todo.pop()
        seen.add(module)
        tree = ast.parse((EVENTS_PY.parent / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module is not None
                if node.module not in seen:
                    todo.append(node.module)
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] in sys.stdlib_module_names | {"__future__"}
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in sys.stdlib_module_names for a in node.names)
    assert seen == {"_events", "_types"}


def test_a_malformed_entry_is_not_an_engine_error() -> None:
    assert issubclass(EventError, ValueError)
    assert not issubclass(EventError, inventory.InventoryError)


# ----------------------------------------------------------------- the parser


_HOLD_SAMPLE = {
    "order": "d11.abc",
    "user": "alice",
    "lines": "phone:1,case:2",
    "request": "r-1",
    "deadline": "1900000000000",
    "at": "1800000000000",
}
#: A valid entry of every type.
SAMPLES: dict[str, dict[str, str]] = {
    **{kind: {"type": kind, **_HOLD_SAMPLE} for kind in ("reserved", "confirmed", "released", "expired")},
    "stocked": {
        "type": "stocked",
        "sku": "phone",
        "total": "10",
        "reserve": "2",
        "limit": "0",
        "low": "1",
        "at": "5",
    },
    "restocked": {"type": "restocked", "sku": "a", "delta": "3", "at": "1", "transfer": "x1"},
    "written_off": {"type": "written_off", "sku": "a", "delta": "-3", "at": "1", "transfer": "x1"},
    "reserve_released": {"type": "reserve_released", "sku": "a", "units": "4", "at": "1"},
    "reserved_batch": {
        "type": "reserved_batch",
        "at": "1800000000000",
        "d11.abc": "alice phone:1,case:2 r-1 1900000000000",
        "d11.def": "bob case:3 r-1 1900000000500",
    },
}
#: The single-change types (every one but reserved_batch).
SINGLE = [kind for kind in SAMPLES if kind != "reserved_batch"]


def entry(kind: str, **override: str) -> dict[str, str]:
    """The sample of ``kind`` with ``override`` (``<absent>`` leaves a field out)."""
    fields = {**SAMPLES[kind], **override}
    return {k: v for k, v in fields.items() if v != "<absent>"}


def test_an_order_entry_parses_to_its_typed_form() -> None:
    for kind, state in [
        ("reserved", HoldState.HELD),
        ("confirmed", HoldState.PAID),
        ("released", HoldState.CANCELLED),
        ("expired", HoldState.EXPIRED),
    ]:
        event = parse_event(entry(kind))
        assert event == OrderEvent(
            kind,  # type: ignore[arg-type]
            "d11.abc",
            "alice",
            (Line("phone", 1), Line("case", 2)),
            "r-1",
            1900000000000,
            1800000000000,
        )
        assert event.state is state


def test_a_stock_entry_parses_to_its_typed_form() -> None:
    assert parse_event(entry("stocked")) == StockEvent("stocked", "phone", 5, 10, 2, 0, 1)
    assert parse_event(entry("restocked", transfer="<absent>")) == StockEvent("restocked", "a", 1, delta=3)
    assert parse_event(entry("written_off")) == StockEvent("written_off", "a", 1, delta=-3, transfer="x1")
    assert parse_event(entry("written_off", transfer="")) == StockEvent("written_off", "a", 1, delta=-3)
    assert parse_event(entry("reserve_released")) == StockEvent("reserve_released", "a", 1, units=4)


def test_a_batch_entry_parses_to_one_reserved_event_per_hold_in_order() -> None:
    """Each hold of a reserved_batch reads as the reserved entry it stands for would."""
    alice = entry("reserved")
    bob = {**alice, "order": "d11.def", "user": "bob", "lines": "case:3", "deadline": "1900000000500"}
    assert parse_events(SAMPLES["reserved_batch"]) == (parse_event(alice), parse_event(bob))
    as_bytes = {k.encode(): v.encode() for k, v in SAMPLES["reserved_batch"].items()}
    assert parse_events(as_bytes) == parse_events(SAMPLES["reserved_batch"])
    backwards = {"type": "reserved_batch", "d11.def": SAMPLES["reserved_batch"]["d11.def"], "at": "7"}
    backwards["d11.abc"] = SAMPLES["reserved_batch"]["d11.abc"]
    assert [(e.hold_id, e.at_ms) for e in parse_events(backwards)] == [("d11.def", 7), ("d11.abc", 7)]


def test_parse_events_reads_a_single_change_as_parse_event_does() -> None:
    for kind in SINGLE:
        assert parse_events(SAMPLES[kind]) == (parse_event(SAMPLES[kind]),)


def test_parse_event_refuses_a_batch_entry() -> None:
    with pytest.raises(EventError, match="parse_events"):
        parse_event(SAMPLES["reserved_batch"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"type": "reserved_batch", "at": "1"}, "has no hold"),
        ({"type": "reserved_batch", "d11.a": "alice phone:1 r-1 2"}, "'at' is missing"),
        ({"type": "reserved_batch", "at": "", "d11.a": "alice phone:1 r-1 2"}, "'at' is missing"),
        ({"type": "reserved_batch", "at": "-1", "d11.a": "alice phone:1 r-1 2"}, "out of range"),
        ({"type": "reserved_batch", "at": "1", "d11.a": "alice phone:1 r-1"}, "is not '<user>"),
        ({"type": "reserved_batch", "at": "1", "d11.a": "alice phone:1 r-1 2 x"}, "is not '<user>"),
        ({"type": "reserved_batch", "at": "1", "d11.a": "alice  phone:1 r-1"}, "is not '<user>"),
        ({"type": "reserved_batch", "at": "1", "d11.a": ""}, "is not '<user>"),
        ({"type": "reserved_batch", "at": "1", "": "alice phone:1 r-1 2"}, "is not '<user>"),
        ({"type": "reserved_batch", "at": "1", "d11.a": "alice phone:1 r-1 soon"}, "not a whole number"),
        ({"type": "reserved_batch", "at": "1", "d11.a": "alice phone:1 r-1 -2"}, "out of range"),
        ({"type": "reserved_batch", "at": "1", "d11.a": "alice phone r-1 2"}, "not '<sku>:<qty>'"),
        ({"type": "reserved_batch", "at": "1", "d11.a": "alice phone:1,phone:2 r-1 2"}, "two lines"),
        # One bad hold spoils the entry, wherever it stands.
        (
            {"type": "reserved_batch", "at": "1", "d11.a": "alice phone:1 r-1 2", "d11.b": "bob phone:0 r 2"},
            "not '<sku>:<qty>'",
        ),
    ],
)
def test_a_malformed_batch_entry_is_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(EventError, match=re.escape(message)):
        parse_events(fields)


def test_bytes_and_text_read_alike_and_unknown_fields_are_ignored() -> None:
    as_bytes = {k.encode(): v.encode() for k, v in SAMPLES["reserved"].items()}
    assert (
        parse_event(as_bytes) == parse_event(SAMPLES["reserved"]) == parse_event(entry("reserved", note="x"))
    )


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"order": "d11.a"}, "'type' is missing"),
        (entry("reserved", type=""), "'type' is missing"),
        (entry("reserved", type="teleported"), "unknown event type"),
        (entry("reserved", user="<absent>"), "'user' is missing"),
        (entry("reserved", request=""), "'request' is missing"),
        (entry("reserved", lines="phone"), "not '<sku>:<qty>'"),
        (entry("reserved", lines="phone:0"), "not '<sku>:<qty>'"),
        (entry("reserved", lines=":1"), "not '<sku>:<qty>'"),
        (entry("reserved", lines="phone:1,phone:2"), "two lines"),
        (entry("reserved", lines="phone:١"), "not '<sku>:<qty>'"),  # a digit, but not ASCII
        (entry("reserved", deadline="soon"), "not a whole number"),
        (entry("reserved", deadline="1e12"), "not a whole number"),
        (entry("reserved", at="-1"), "out of range"),
        (entry("stocked", total="<absent>"), "'total' is missing"),
        (entry("stocked", reserve="11"), "exceeds total"),
        (entry("stocked", limit="+1"), "not a whole number"),
        (entry("stocked", low=" 1"), "not a whole number"),
        (entry("restocked", delta="-1"), "out of range"),
        (entry("written_off", delta="0"), "out of range"),
        (entry("reserve_released", units="0"), "out of range"),
        ({b"type": b"stocked", b"sku": b"\xff"}, "not UTF-8"),
    ],
)
def test_a_malformed_entry_is_refused(entry: dict[str, str], message: str) -> None:
    with pytest.raises(EventError, match=re.escape(message)):
        parse_event(entry)
    with pytest.raises(EventError, match=re.escape(message)):
        parse_events(entry)


def test_every_listed_field_reaches_the_typed_form() -> None:
    """The parser reads every field the table lists (none is listed and then dropped), and
    refuses an entry missing any required one; an optional one may be left out."""
    assert set(SAMPLES) == set(EVENT_FIELDS)
    for kind in SINGLE:
        sample = SAMPLES[kind]
        event = parse_event(sample)
        unset = [f.name for f in fields(event) if getattr(event, f.name) is None]
        set_count = len(fields(event)) - len(unset)
        assert set_count == len(EVENT_FIELDS[kind]) + 1, f"{kind}: {unset} left unset"  # + type
        for name, spec in EVENT_FIELDS[kind].items():
            if not spec.required:
                assert parse_event(entry(kind, **{name: "<absent>"})).type == kind
                continue
            with pytest.raises(EventError, match=f"'{name}' is missing"):
                parse_event(entry(kind, **{name: "<absent>"}))


# ----------------------------------------------------------------- stream ids


def test_stream_ids_parse_order_and_format() -> None:
    assert (
        StreamId.parse(b"1700000000000-5") == StreamId.parse("1700000000000-5") == StreamId(1700000000000, 5)
    )
    assert StreamId.parse("7") == StreamId(7, 0)
    assert str(StreamId(12, 3)) == "12-3"
    ids = ["10-2", "9-100", "10-10", "10-0", "0-0"]
    assert [str(i) for i in sorted(map(StreamId.parse, ids))] == ["0-0", "9-100", "10-0", "10-2", "10-10"]
    assert StreamId(5, 1).next() == StreamId(5, 2)
    assert StreamId(5, 2**64 - 1).next() == StreamId(6, 0)


@pytest.mark.parametrize(
    "bad", ["", "-", "1-", "-1", "a-1", "1-2-3", "1.5-0", " 1-2", "1-18446744073709551616"]
)
def test_a_malformed_stream_id_is_refused(bad: str) -> None:
    with pytest.raises(EventError):
        StreamId.parse(bad)


# ------------------------------------------------------------- the real engine


async def _past_deadline(inv: Inventory, hold: Hold) -> None:
    """Wait until the Redis clock (the one the scripts judge by) passes the hold's deadline."""
    while True:
        seconds, micros = await inv.redis.time()
        if int(seconds) * 1000 + int(micros) // 1000 > hold.deadline_ms:
            return
        await asyncio.sleep(0.001)


async def test_every_entry_the_engine_appends_parses(redis_url: str) -> None:
    """A sale's whole life through the real scripts: each entry on the stream parses, in
    order, to the type and values of the change that wrote it."""
    async with open_sale(redis_url, "events", coalesce=False) as inv:
        await inv.stock("phone", 10, reserve=3, limit_per_user=5, low_stock_line=1)
        await inv.stock("case", 20)
        await inv.restock("phone", 2)
        await inv.adjust("phone", -1)
        await inv.release_reserve("phone", 1)
        await inv.release_reserve("phone")  # the rest of the pool: 2
        paid = await inv.reserve("alice", [("phone", 1), ("case", 2)], request_id="r-1")
        await inv.confirm(paid.hold_id)
        cancelled = await inv.reserve("bob", "phone", request_id="r-2")
        await inv.release(cancelled.hold_id)
        swept = await inv.reserve("carol", "case", request_id="r-3", hold_ttl=0.001)
        await _past_deadline(inv, swept)
        assert (await inv.expire_due()).expired == (swept.hold_id,)
        late = await inv.reserve("dave", "case", request_id="r-4", hold_ttl=0.001)
        await _past_deadline(inv, late)
        with pytest.raises(inventory.HoldExpired):
            await inv.confirm(late.hold_id)  # the deadline wins: an "expired" entry
        lapsed = await inv.reserve("erin", "case", request_id="r-5", hold_ttl=0.001)
        await _past_deadline(inv, lapsed)
        assert (await inv.release(lapsed.hold_id)).state is HoldState.EXPIRED

        entries = await inv.redis.xrange(inv.keys.events)
    ids = [StreamId.parse(i) for i, _ in entries]
    assert ids == sorted(set(ids))
    # Not coalesced: each reservation is a call of its own, so an entry of one hold.
    assert [len(f) for _, f in entries if f[b"type"] == b"reserved_batch"] == [3] * 5
    events = [e for _, f in entries for e in parse_events(f)]
    assert [e.type for e in events] == [
        "stocked",
        "stocked",
        "restocked",
        "written_off",
        "reserve_released",
        "reserve_released",
        "reserved",
        "confirmed",
        "reserved",
        "released",
        "reserved",
        "expired",
        "reserved",
        "expired",
        "reserved",
        "expired",
    ]
    stock = [e for e in events if isinstance(e, StockEvent)]
    assert stock[0] == StockEvent("stocked", "phone", stock[0].at_ms, 10, 3, 5, 1)
    assert [(e.sku, e.delta, e.units) for e in stock[2:]] == [
        ("phone", 2, None),
        ("phone", -1, None),
        ("phone", None, 1),
        ("phone", None, 2),
    ]
    holds = {h.hold_id: h for h in (paid, cancelled, swept, late, lapsed)}
    for event in (e for e in events if isinstance(e, OrderEvent)):
        hold = holds[event.hold_id]
        assert (event.user, event.lines, event.request_id, event.deadline_ms) == (
            hold.user,
            hold.lines,
            hold.request_id,
            hold.deadline_ms,
        )
    closing = [(e.hold_id, e.state) for e in events if isinstance(e, OrderEvent) and e.type != "reserved"]
    assert closing == [
        (paid.hold_id, HoldState.PAID),
        (cancelled.hold_id, HoldState.CANCELLED),
        (swept.hold_id, HoldState.EXPIRED),
        (late.hold_id, HoldState.EXPIRED),
        (lapsed.hold_id, HoldState.EXPIRED),
    ]


async def test_a_coalesced_batch_appends_one_entry_of_its_holds(redis_url: str) -> None:
    """Reservations coalesced into one script call append one entry, whose holds are, in
    the order the call made them, what the engine reads back of each hold; a refused or
    replayed request adds none."""
    async with open_sale(redis_url, "batch") as inv:
        await inv.stock("phone", 100)
        await inv.stock("case", 100)
        await inv.load_scripts()
        before = await inv.redis.xlen(inv.keys.events)
        carts = [[("phone", 1)] + ([("case", 1 + i % 4)] if i % 3 == 0 else []) for i in range(40)]
        answers = await asyncio.gather(
            *(inv.reserve(f"u{i}", cart, request_id=f"r-{i}") for i, cart in enumerate(carts)),
            inv.reserve("u7", carts[7], request_id="r-7"),  # the same request again: a replay
            inv.reserve("zed", [("phone", 101)], request_id="r-x"),  # sold out
            return_exceptions=True,
        )
        replay, holds = answers[-2], answers[:40]
        assert isinstance(answers[-1], inventory.SoldOut)
        assert isinstance(replay, Hold) and replay.replayed and replay.hold_id == holds[7].hold_id  # type: ignore[union-attr]
        entries = await inv.redis.xrange(inv.keys.events)
        read_back = [await inv.hold(h.hold_id) for h in holds]  # type: ignore[union-attr]
    assert len(entries) == before + 1
    (_, fields) = entries[-1]
    events = parse_events(fields)
    assert len(fields) == 2 + 40 and len(events) == 40
    assert all(isinstance(e, OrderEvent) and e.type == "reserved" for e in events)
    assert [
        (e.hold_id, e.user, e.lines, e.request_id, e.deadline_ms, e.at_ms)  # type: ignore[union-attr]
        for e in events
    ] == [
        (h.hold_id, h.user, h.lines, h.request_id, h.deadline_ms, h.created_ms)
        for h in read_back
        if h is not None
    ]


async def test_a_bucket_transfer_writes_one_id_on_both_sides(redis_url: str) -> None:
    """The donor's write-off and the receiver's add carry the same transfer id (what lets
    PostgreSQL tell units in transit from units lost); an operator's restock carries none."""
    async with open_sale(redis_url, "xfer", coalesce=False) as plain:
        split = inventory.BucketedInventory(plain.redis, plain.sale[:20] + "x", 2, coalesce=False)
        try:
            await split.stock("hot", 10)
            donor, home = split.buckets
            assert await split.transfer("hot", 4, source=donor, target=home)
            await split.restock("hot", 2)
            out = [parse_event(f) for _, f in await plain.redis.xrange(donor.keys.events)]
            into = [parse_event(f) for _, f in await plain.redis.xrange(home.keys.events)]
        finally:
            for bucket in split.buckets:
                await plain.redis.delete(*bucket.keys.all())
    moved_out = [e for e in out if isinstance(e, StockEvent) and e.type == "written_off"]
    moved_in = [e for e in into if isinstance(e, StockEvent) and e.type == "restocked" and e.transfer]
    assert [(e.delta, e.sku) for e in moved_out] == [(-4, "hot")]
    assert [(e.delta, e.sku) for e in moved_in] == [(4, "hot")]
    assert moved_out[0].transfer == moved_in[0].transfer and moved_out[0].transfer
    restocks = [
        e for e in out + into if isinstance(e, StockEvent) and e.type == "restocked" and not e.transfer
    ]
    assert sorted(e.delta or 0 for e in restocks) == [1, 1]
