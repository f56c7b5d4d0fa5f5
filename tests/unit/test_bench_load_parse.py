"""bench.load reads whatever wrk prints, and a row it cannot measure says why without stopping the table.
The outputs are wrk 4.1's (Debian) from runs against loopback servers (ERRORS has the error lines of two)."""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import load

NORMAL = """\
Running 2s test @ http://127.0.0.1:18777/v1/payment_intents
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.89ms  139.32us   4.20ms   89.25%
    Req/Sec     4.52k   196.77     4.84k    77.50%
  Latency Distribution
     50%    0.88ms
     75%    0.91ms
     90%    0.95ms
     99%    1.30ms
  17989 requests in 2.00s, 2.64MB read
Requests/sec:   8980.45
Transfer/sec:      1.32MB
"""

# wrk pads a value with a one-letter unit to the column: "1.31s " ends in a space (the KeyError: '99')
UNITS = (
    "Running 3s test @ http://127.0.0.1:18777/v1/payment_intents\n"
    "  2 threads and 8 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency   451.32ms  500.49ms   1.31s    82.98%\n"
    "    Req/Sec    31.60     33.55    80.00     70.00%\n"
    "  Latency Distribution\n"
    "     50%  812.00us\n"
    "     75%  872.05ms\n"
    "     90%    1.30s \n"
    "     99%    1.31s \n"
    "  62 requests in 3.01s, 9.32KB read\n"
    "Requests/sec:     20.62\n"
    "Transfer/sec:      3.10KB\n"
)

ERRORS = """\
Running 2s test @ http://127.0.0.1:18777/v1/payment_intents
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    10.01ms   10.09ms  23.33ms   59.09%
    Req/Sec    42.50     46.28   100.00     75.00%
  Latency Distribution
     50%    3.05ms
     75%   21.35ms
     90%   22.86ms
     99%   23.33ms
  30 requests in 2.00s, 4.51KB read
  Socket errors: connect 0, read 0, write 0, timeout 8
  Non-2xx or 3xx responses: 12
Requests/sec:     14.96
Transfer/sec:      2.25KB
"""

NOTHING = """\
Running 1s test @ http://127.0.0.1:18777/v1/payment_intents
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
"""

NO_P99 = NORMAL.replace("     99%    1.30ms\n", "")


def test_a_normal_run() -> None:
    assert load.parse_wrk(NORMAL) == {
        "rps": 8980.45,
        "requests": 17989,
        "p50": 0.88,
        "p99": 1.30,
        "errors": 0,
    }


def test_latencies_in_us_ms_and_s_are_read_in_ms() -> None:
    figures = load.parse_wrk(UNITS)
    assert figures["p50"] == pytest.approx(0.812)
    assert figures["p99"] == pytest.approx(1310.0)


@pytest.mark.parametrize(
    ("printed", "ms"), [("812.00us", 0.812), ("3.05ms", 3.05), ("2.00s ", 2000.0), ("1.50m ", 90000.0)]
)
def test_each_unit(printed: str, ms: float) -> None:
    out = NORMAL.replace("     99%    1.30ms", f"     99%{printed:>10}")
    assert load.parse_wrk(out)["p99"] == pytest.approx(ms)


def test_non_2xx_answers_are_counted() -> None:
    out = NORMAL.replace("Requests/sec", "  Non-2xx or 3xx responses: 5671\nRequests/sec")
    assert load.parse_wrk(out)["errors"] == 5671


@pytest.mark.parametrize(
    ("out", "reason"),
    [
        (NO_P99, "wrk printed no p99"),
        (ERRORS, "wrk socket errors: connect 0, read 0, write 0, timeout 8"),
        (NOTHING, "no request completed"),
        ("", "wrk printed no p50, p99, requests/s, request count"),
        (
            "\x00\x7f\u2603 99% 50%\n  50%  -nanus\nRequests/sec: lots\n",
            "wrk printed no p50, p99, requests/s, request count",
        ),
        (NORMAL.split("     75%")[0], "wrk printed no p99, requests/s, request count"),
    ],
    ids=["no 99% line", "socket errors and non-2xx", "no request", "empty", "garbage", "cut short"],
)
def test_what_cannot_be_measured_says_why(out: str, reason: str) -> None:
    with pytest.raises(load.Unmeasured) as raised:
        load.parse_wrk(out)
    assert str(raised.value) == reason


def test_wrk_failing_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "wrk"
    fake.write_text("#!/bin/sh\necho 'unable to connect to 127.0.0.1:9 Connection refused' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(load.Unmeasured, match="wrk exited with 1: unable to connect to 127.0.0.1:9"):
        load.wrk("http://127.0.0.1:9/v1/payment_intents", 1, 1, "x", "run")


ARGS = argparse.Namespace(duration=1.0)


def _server(name: str) -> SimpleNamespace:
    return SimpleNamespace(url=f"http://{name}", token="x", process=SimpleNamespace(pid=1))


@pytest.fixture
def wrk_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    """wrk without wrk: the server ``good`` gives NORMAL's figures, ``slow`` UNITS', ``broken`` NO_P99's."""
    outputs = {"http://good": NORMAL, "http://slow": UNITS, "http://broken": NO_P99}
    monkeypatch.setattr(
        load, "wrk", lambda url, *_: load.parse_wrk(outputs[url.removesuffix("/v1/payment_intents")])
    )
    monkeypatch.setattr(load, "_cpu_seconds", lambda pid: 0.0)


def test_a_row_that_cannot_be_measured_says_why_and_the_table_goes_on(
    wrk_prints: None, capsys: pytest.CaptureFixture[str]
) -> None:
    good, broken = _server("good"), _server("broken")
    load.row("upstream alone", 16, ARGS, good)
    load.row("sidecar (postgres)", 16, ARGS, broken, good)
    load.row("sidecar (postgres+redis)", 16, ARGS, _server("slow"), good)
    load.row("sidecar (sqlite)", 64, ARGS, good, broken)
    assert capsys.readouterr().out.splitlines() == [
        "upstream alone            16      8980     0.88     1.30         0       0",
        "sidecar (postgres)        16  not measured: wrk printed no p99",
        "sidecar (postgres+redis)  16        21     0.81  1310.00         0       0    0.00     -0.07",
        "sidecar (sqlite)          64  not measured: the bare forwarder before it: wrk printed no p99",
    ]


def test_a_server_that_does_not_start_says_why_on_each_of_its_rows(
    wrk_prints: None, capsys: pytest.CaptureFixture[str]
) -> None:
    stopped: list[str] = []

    def sidecar() -> SimpleNamespace:
        raise RuntimeError("-m proxy serve did not start listening on 127.0.0.1:5")

    good = _server("good")
    good.stop = lambda: stopped.append("good")
    with ExitStack() as stack:
        failed = load.start(stack, sidecar)
        started = load.start(stack, lambda: good)
        for c in (1, 16):
            load.row("sidecar (sqlite)", c, ARGS, failed, started)
        load.row("upstream alone", 1, ARGS, started)
    assert stopped == ["good"]
    assert capsys.readouterr().out.splitlines() == [
        "sidecar (sqlite)           1  not measured: RuntimeError: -m proxy serve did not start listening on 127.0.0.1:5",
        "sidecar (sqlite)          16  not measured: RuntimeError: -m proxy serve did not start listening on 127.0.0.1:5",
        "upstream alone             1      8980     0.88     1.30         0       0",
    ]
