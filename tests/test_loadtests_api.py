"""The surge kit's public API: the exported names are the intended ones, each documented,
importable without Locust (which patches the standard library for gevent), and
``python -m loadtests`` finds the installed locustfile and lists a locustfile's options."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import loadtests
from loadtests import exit_codes

EXPORTED = {
    # declaring a rehearsal
    "Rehearsal",
    "SetupContext",
    "ProcessContext",
    "RunContext",
    "OracleContext",
    "SetupError",
    # visits and their outcomes
    "Visit",
    "Call",
    # the oracle
    "Truth",
    "Recorded",
    "Check",
    "Verdict",
    "ServiceSample",
    # the history
    "HISTORY_FORMAT",
    "Operation",
    "HistorySummary",
    "read_history",
    # shapes
    "SHAPES",
    "Shape",
    "Segment",
    "Impulse",
    "Window",
    "midnight_surge",
    "double11_day",
    "capacity_step",
    "soak",
    "rate_table",
    "rate_function",
}


def test_exported_names_are_the_intended_ones() -> None:
    assert set(loadtests.__all__) == EXPORTED
    assert loadtests.__all__ == sorted(loadtests.__all__, key=lambda n: (not n.isupper(), n[0].islower(), n))
    for name in loadtests.__all__:
        assert getattr(loadtests, name) is not None, name
    assert set(dir(loadtests)) >= EXPORTED


def test_every_exported_class_and_function_is_documented() -> None:
    for name in loadtests.__all__:
        obj = getattr(loadtests, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
            if inspect.isclass(obj):
                fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
                for attr, member in vars(obj).items():
                    if attr in fields:
                        continue  # a field's default (e.g. a callable), documented with the class
                    if (
                        inspect.isfunction(member)
                        and not attr.startswith("_")
                        and attr not in ("get", "post", "put", "delete")
                    ):
                        assert inspect.getdoc(member) or attr in (
                            "as_dict",
                            "to_json",
                            "from_json",
                            "clock",
                        ), f"{name}.{attr} has no docstring"


def test_importing_the_api_does_not_import_locust() -> None:
    # `flashsale rehearse` imports loadtests.exit_codes; a locustfile imports the API before
    # Locust runs it. Neither may patch the standard library behind the caller's back.
    code = (
        "import sys, loadtests\n"
        "from loadtests import exit_codes\n"
        "assert 'gevent' not in sys.modules, 'exit_codes pulled in gevent'\n"
        "[getattr(loadtests, n) for n in loadtests.__all__]\n"
        "assert 'locust' not in sys.modules, sorted(m for m in sys.modules if m.startswith('locust'))\n"
        "import gevent.monkey\n"
        "assert not gevent.monkey.is_module_patched('socket')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_python_m_loadtests_path_is_the_installed_locustfile() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtests", "path"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.is_file() and path.name == "surge.py" and path.parent.name == "loadtests"


def test_python_m_loadtests_help_lists_the_drills_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtests", "help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for option in ("--peak-rps", "--shape", "--slo", "--admin-token", "--audit-wait", "--buyer-users"):
        assert option in done.stdout, option
    unwrapped = "".join(done.stdout.split())
    assert "browser=45,buyer=25,abandoner=15,bot=10,retry_storm=5" in unwrapped


def test_usage_errors_exit_64_not_2() -> None:
    for argv in (["frobnicate"], ["help", "/nowhere/locustfile.py"]):
        done = subprocess.run(
            [sys.executable, "-m", "loadtests", *argv], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == exit_codes.USAGE == 64, (argv, done.stderr)
