"""The registry of adapters: what the providers declare, taken together, and handed to what needs them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import pytest

from adapters import REGISTRY
from adapters.base import Adapter, Adapters, Setting, check_setting_names
from proxy.connections import ConnectionCache
from proxy.errors import BadRequest
from proxy.model import OperationExample
from proxy.owners import OwnerService
from proxy.secrets import Sealer, sealed_context
from proxy.store import ConnectionRecord


class FakeAdapter(Adapter):
    """A provider with one required setting, configured into a copy that remembers it."""

    default_upstream = "https://api.fake.test"
    settings: Mapping[str, Setting] = {"region": Setting("where the account lives", required=True)}

    def __init__(self, name: str, operations: Mapping[str, str], region: str = "") -> None:
        self.name, self.operations, self.region = name, operations, region

    def configured(self, settings: Mapping[str, str]) -> FakeAdapter:
        check_setting_names(self.name, self.settings, settings)
        return FakeAdapter(self.name, self.operations, settings["region"])


FAKES = Adapters(
    FakeAdapter("first", {"pay": "/pay", "refund": "/first/refunds"}),
    FakeAdapter("second", {"refund": "/second/refunds", "payout": "/payouts"}),
)


def test_the_registry_unites_the_declared_operations_in_declaration_order() -> None:
    assert FAKES.operations == ("pay", "refund", "payout")
    assert FAKES.examples == (
        OperationExample("pay", "first", "/pay"),
        OperationExample("refund", "first", "/first/refunds"),
        OperationExample("refund", "second", "/second/refunds"),
        OperationExample("payout", "second", "/payouts"),
    )
    assert list(FAKES) == ["first", "second"] and FAKES["second"].name == "second"


def test_an_unknown_provider_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown provider 'stripe'; known: first, second"):
        FAKES.adapter("stripe")


def test_the_real_registry_declares_each_provider_and_its_operations() -> None:
    assert list(REGISTRY) == ["stripe", "mercadopago", "mock", "x402"]
    assert "x402" in REGISTRY.operations
    assert REGISTRY.operations[0] == "payment_intent" and "payment" in REGISTRY.operations
    assert len(REGISTRY.operations) == len(set(REGISTRY.operations))


def test_setting_names_are_checked_against_what_the_adapter_describes() -> None:
    described = {"region": Setting("where", required=True), "tier": Setting("which plan")}
    check_setting_names("fake", described, {"region": "eu"})
    with pytest.raises(ValueError, match=r"unknown setting colour .* its settings: region \(where\), tier"):
        check_setting_names("fake", described, {"region": "eu", "colour": "red"})
    with pytest.raises(ValueError, match="a fake connection needs the setting region"):
        check_setting_names("fake", described, {"tier": "gold"})


class FakeStore:
    def __init__(self) -> None:
        self.connections: dict[str, ConnectionRecord] = {}

    async def add_connection(self, record: ConnectionRecord) -> None:
        self.connections[record.id] = record

    async def get_connection(self, connection_id: str) -> ConnectionRecord | None:
        return self.connections.get(connection_id)


async def test_connections_are_added_and_opened_through_the_registry_given() -> None:
    store, sealer = FakeStore(), Sealer([("k", os.urandom(32))])
    service = OwnerService(store, sealer, 4, adapters=FAKES)  # type: ignore[arg-type]
    record = await service.add_connection(
        "own_1", "second", "main", None, {"secret_key": "s"}, (), {"region": "eu"}
    )
    assert record.upstream == "https://api.fake.test" and record.settings == {"region": "eu"}
    connection = await ConnectionCache(store, sealer, adapters=FAKES).get(record.id)  # type: ignore[arg-type]
    adapter: Any = connection.adapter
    assert (adapter.name, adapter.region) == ("second", "eu")
    assert json.loads(sealer.open(record.credentials, sealed_context("connection", record.id))) == {
        "secret_key": "s"
    }


@pytest.mark.parametrize(
    ("provider", "settings", "says"),
    [
        ("stripe", {}, "unknown provider 'stripe'; known: first, second"),
        ("first", {}, "needs the setting region"),
        ("first", {"region": "eu", "currency": "ars"}, "unknown setting currency"),
    ],
)
async def test_a_connection_the_adapter_refuses_is_a_bad_request(
    provider: str, settings: dict[str, str], says: str
) -> None:
    service = OwnerService(FakeStore(), Sealer([("k", os.urandom(32))]), 4, adapters=FAKES)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match=says):
        await service.add_connection("own_1", provider, "main", None, {"secret_key": "s"}, (), settings)
