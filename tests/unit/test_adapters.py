"""The registry of adapters: what the providers declare, taken together."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from adapters import REGISTRY
from adapters.base import Adapter, Adapters, Setting, check_setting_names
from proxy.model import OperationExample


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
    assert list(REGISTRY) == ["stripe", "mercadopago", "mock"]
    assert REGISTRY.operations[0] == "payment_intent" and "payment" in REGISTRY.operations
    assert len(REGISTRY.operations) == len(set(REGISTRY.operations))


def test_setting_names_are_checked_against_what_the_adapter_describes() -> None:
    described = {"region": Setting("where", required=True), "tier": Setting("which plan")}
    check_setting_names("fake", described, {"region": "eu"})
    with pytest.raises(ValueError, match=r"unknown setting colour .* its settings: region \(where\), tier"):
        check_setting_names("fake", described, {"region": "eu", "colour": "red"})
    with pytest.raises(ValueError, match="a fake connection needs the setting region"):
        check_setting_names("fake", described, {"tier": "gold"})
