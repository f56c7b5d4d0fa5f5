"""Real-time card authorizations: how long the sidecar takes to answer Stripe's signed
``issuing_authorization.request`` (Stripe waits 2 s), measured end to end over loopback HTTP.

    python -m bench.cards [--requests 300]

A sidecar on SQLite with the built-in mock provider creates a card for its agent; then signed authorization
requests for that card are sent one after another, each a new authorization that is decided by the
10-rule policy and has its spend reserved and committed. Printed: p50, p99 and max answer time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.load import Sidecar
from tests.servers import free_port, wait_for_port

SECRET = "whsec_bench"


def post(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    request = urllib.request.Request(url, body, headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="paysentry-cards-"))
    root.chmod(0o755)
    mock = free_port()
    sidecar = Sidecar(
        root / "s",
        f"sqlite:///{root / 's.db'}",
        f"http://127.0.0.1:{mock}",
        extra=f"mock_provider_listen: 127.0.0.1:{mock}\n",
        credentials={"secret_key": "sk_test_paysentry_mock", "webhook_secret": SECRET},
    )
    try:
        wait_for_port(mock, "mock provider")
        card = json.loads(
            post(
                f"http://127.0.0.1:{sidecar.port}/v1/issuing/cards",
                b"cardholder=ich_1&currency=usd&spending_controls[spending_limits][0][amount]=100000"
                b"&spending_controls[spending_limits][0][interval]=all_time",
                {
                    "Authorization": f"Bearer {sidecar.token}",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
        )["id"]
        webhook = f"http://127.0.0.1:{sidecar.admin}/v1/webhooks/{sidecar.connection}"
        times, approved = [], 0
        for i in range(args.requests):
            obj = {
                "id": f"iauth_{i}",
                "pending_request": {"amount": 100, "currency": "usd"},
                "merchant_data": {"name": "Shop", "category": "book_stores", "country": "US"},
                "card": {"id": card, "cardholder": {"id": "ich_1"}},
            }
            body = json.dumps(
                {"id": f"evt_{i}", "type": "issuing_authorization.request", "data": {"object": obj}}
            )
            t = int(time.time())
            mac = hmac.new(SECRET.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
            started = time.perf_counter()
            answer = json.loads(
                post(
                    webhook,
                    body.encode(),
                    {"Content-Type": "application/json", "Stripe-Signature": f"t={t},v1={mac}"},
                )
            )
            times.append((time.perf_counter() - started) * 1000)
            approved += answer["approved"] is True
        times.sort()
        print(
            f"real-time card authorization, {args.requests} signed requests one after another (SQLite, 10 rules)"
        )
        print(f"{'approved':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
        p99 = times[int(len(times) * 0.99) - 1]
        print(f"{approved:>10}{statistics.median(times):>9.2f}{p99:>9.2f}{times[-1]:>9.2f}")
    finally:
        sidecar.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
