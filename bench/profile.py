"""Where an allowed payment's time goes: the sidecar on SQLite (10 rules, two limits) under wrk, sampled by
py-spy while it holds the GIL (so only the Python that actually runs is counted, on any thread).

    python -m bench.profile [--concurrency 16] [--duration 8] [--top 25]

Printed: CPU per request of the event loop and of the other threads (the SQLite writer and reader), read
from /proc; the share of samples by where the running code lives (aiohttp, asyncio, the SQLite store, the
policy engine, ...); and the functions with the largest inclusive share. py-spy needs to attach to the
process (root, or CAP_SYS_PTRACE in a container).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import Sidecar, _start, wrk
from tests.servers import free_port


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread of ``pid``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def area(frame: str) -> str:
    """Where a sampled frame's code lives: PaySentry's module, else the library (py-spy names files
    relative to the interpreter's path: ``aiohttp/client.py``, ``asyncio/tasks.py``)."""
    path = frame[frame.rfind("(") + 1 :].rsplit(":", 1)[0] if "(" in frame else frame
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    if path.startswith(("proxy/", "adapters/", "bench/")):
        return path
    return path.split("/", 1)[0].removesuffix(".py")


def summarize(samples: str, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    by_area: collections.Counter[str] = collections.Counter()
    total = 0
    for line in samples.splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        by_area[area(frames[-1])] += n
        for name in {f.split(" (")[0] for f in frames}:
            inclusive[name] += n
    if not total:
        print("py-spy took no samples (could it attach? it needs root or CAP_SYS_PTRACE)")
        return
    print(f"\nwhere the running code lives (share of {total} samples taken while holding the GIL)")
    for name, n in by_area.most_common(top):
        print(f"{100 * n / total:6.1f}%  {name}")
    print("\nfunctions by inclusive share (what they and their callees cost)")
    skip = ("<module>", "_run_module_as_main", "_run_code", "main", "run", "Runner.run", "_serve")
    shown = [(name, n) for name, n in inclusive.most_common() if name not in skip]
    for name, n in [(name, n) for name, n in shown if not name.startswith("Thread.")][:top]:
        print(f"{100 * n / total:6.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: `make profile` installs it (pip install py-spy)")
    root = Path(tempfile.mkdtemp(prefix="paysentry-profile-"))
    root.chmod(0o755)
    port = free_port()
    upstream = _start(["-m", "bench.load", "--role", "upstream", "--port", str(port)], port)
    sidecar = Sidecar(root / "sidecar", f"sqlite:///{root / 'sidecar.db'}", f"http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{sidecar.port}/v1/payment_intents"
    try:
        wrk(url, args.concurrency, 2, sidecar.token, f"warm{time.time_ns()}")
        raw = root / "samples.txt"
        before = thread_cpu(sidecar.process.pid)
        sampler = subprocess.Popen(
            [spy, "record", "--gil", "-r", "250", "-d", f"{args.duration:g}", "-f", "raw", "-o", str(raw)]
            + ["-p", str(sidecar.process.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        result = wrk(url, args.concurrency, args.duration, sidecar.token, f"run{time.time_ns()}")
        after = thread_cpu(sidecar.process.pid)
        _, errors = sampler.communicate(timeout=60)
        samples = raw.read_text() if raw.exists() else ""
    finally:
        sidecar.stop()
        upstream.terminate()
        shutil.rmtree(root, ignore_errors=True)
    requests = max(result["requests"], 1)
    pid = sidecar.process.pid
    loop = after.get(pid, 0) - before.get(pid, 0)
    others = sum(cpu - before.get(tid, 0) for tid, cpu in after.items() if tid != pid)
    print(
        f"sidecar (sqlite), c={args.concurrency}: {result['rps']:.0f} req/s, p50 {result['p50']:.2f} ms; "
        f"CPU per request: event loop {loop / requests * 1e6:.0f} us, "
        f"other threads (SQLite writer and reader) {others / requests * 1e6:.0f} us"
    )
    if sampler.returncode != 0 or not samples:
        sys.exit(f"py-spy failed: {errors.strip()}")
    summarize(samples, args.top)


if __name__ == "__main__":
    main()
