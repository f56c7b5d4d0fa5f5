"""Payment-provider adapters behind one port (``adapters.base.Adapter``), and their registry.

Adding a provider means one module here and one entry in ``REGISTRY``: nothing else in PaySentry knows
a provider's routes, body format, amount units, error shape, idempotency header or credential placement.
"""

from __future__ import annotations

from adapters.base import Adapter
from adapters.mercadopago import MercadoPagoAdapter
from adapters.mock import MockAdapter
from adapters.stripe import StripeAdapter

REGISTRY: dict[str, Adapter] = {
    adapter.name: adapter for adapter in (StripeAdapter(), MercadoPagoAdapter(), MockAdapter())
}

# Whose error shape answers a call made before its connection is known (no or a bad token).
DEFAULT_PROVIDER = "stripe"


def get_adapter(name: str) -> Adapter:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
