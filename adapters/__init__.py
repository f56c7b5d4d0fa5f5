"""Payment-provider adapters behind one port (``adapters.base.Adapter``), and their registry.

Adding a provider means one module here, one entry in ``REGISTRY`` and its tests: nothing else in
PaySentry knows a provider's routes, body format, amount units, error shape, idempotency header,
credential placement, connection settings or the operations it produces. The composition root passes
``REGISTRY`` to what needs providers; the policy loader and test runner get ``REGISTRY.operations`` and
``REGISTRY.examples``.
"""

from __future__ import annotations

from adapters.base import Adapters
from adapters.mercadopago import MercadoPagoAdapter
from adapters.mock import MockAdapter
from adapters.stripe import StripeAdapter
from adapters.x402 import X402Adapter

REGISTRY = Adapters(StripeAdapter(), MercadoPagoAdapter(), MockAdapter(), X402Adapter())

# Whose error shape answers a call made before its connection is known (no or a bad token).
DEFAULT_PROVIDER = "stripe"
