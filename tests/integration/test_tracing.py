"""One span per call with the decision's attributes, and no secret in any span."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import aiohttp
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters.mock import DEFAULT_SECRET_KEY
from proxy.app import Sidecar
from proxy.config import load_settings
from tests.e2e.conftest import POLICY, free_port


async def test_decisions_are_traced_without_secrets(tmp_path: Path, monkeypatch) -> None:
    import textwrap

    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(textwrap.dedent(POLICY))
    ports = [free_port() for _ in range(3)]
    monkeypatch.setenv("PAYSENTRY_ENCRYPTION_KEYS", "k1:" + base64.b64encode(os.urandom(32)).decode())
    settings = load_settings(
        None,
        {
            "PAYSENTRY_LISTEN": f"127.0.0.1:{ports[0]}",
            "PAYSENTRY_ADMIN_LISTEN": f"127.0.0.1:{ports[1]}",
            "PAYSENTRY_MOCK_PROVIDER_LISTEN": f"127.0.0.1:{ports[2]}",
            "PAYSENTRY_BCRYPT_ROUNDS": "4",
            "PAYSENTRY_STORE": f"sqlite:///{tmp_path / 'ps.db'}",
            "PAYSENTRY_POLICIES": str(tmp_path / "policies"),
        },
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sidecar = Sidecar(settings, provider)
    await sidecar.start()
    try:
        owner, _ = await sidecar.gateway.owner_service.create_owner("acme")
        await sidecar.gateway.owner_service.add_connection(
            owner.id, "mock", "default", f"http://127.0.0.1:{ports[2]}", {"secret_key": DEFAULT_SECRET_KEY}
        )
        _, token = await sidecar.gateway.owner_service.create_agent(owner.id, "bot", {}, "default")
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            for body in (
                b"amount=1000&currency=usd",
                b"amount=1000&currency=eur",
                b"amount=6000&currency=usd",
            ):
                async with http.post(
                    f"http://127.0.0.1:{ports[0]}/v1/payment_intents",
                    data=body,
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                ) as resp:
                    await resp.read()
    finally:
        await sidecar.stop()
    calls = [s for s in exporter.get_finished_spans() if s.name == "paysentry.call"]
    assert [(s.attributes["paysentry.decision"], s.attributes["paysentry.rule"]) for s in calls] == [
        ("allow", "default"),
        ("deny", "usd_only"),
        ("hold", "large_payment"),
    ]
    first = calls[0].attributes
    assert (
        first["paysentry.agent"],
        first["paysentry.provider"],
        first["paysentry.operation"],
        first["paysentry.amount"],
        first["paysentry.currency"],
    ) == ("bot", "mock", "payment_intent", 1000, "usd")
    children = {
        s.name
        for s in exporter.get_finished_spans()
        if s.parent and s.parent.span_id == calls[0].context.span_id
    }
    assert {"paysentry.policy", "paysentry.reserve", "paysentry.upstream", "paysentry.settle"} <= children
    dumped = json.dumps([dict(s.attributes or {}) for s in exporter.get_finished_spans()])
    assert token not in dumped and DEFAULT_SECRET_KEY not in dumped
