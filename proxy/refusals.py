"""The wording of a limit refusal: why a payment was refused when one of its charges would pass its limit.

The decision core uses it when it simulates a reservation (``proxy.decide``); the store, which finds the
refusal inside the transaction that reserves, records the words the core hands it with the decision
(``NewAuthorization.explain``, defaulting to this), so the store itself never composes a message.
"""

from __future__ import annotations

from proxy.currency import format_minor
from proxy.model import Charge, SpendTotal


def limit_exceeded_message(charge: Charge, total: SpendTotal) -> str:
    """The limit's own message (if it has one), then what was already counted against it."""
    window = charge.period.split(":", 1)[0]
    if charge.max_count is not None and total.count + 1 > charge.max_count:
        why = f"at most {charge.max_count} payments per {window}; {total.count} already made or reserved"
    else:
        why = (
            f"budget of {format_minor(charge.max_amount or 0, charge.currency)} per {window}; "
            f"{format_minor(total.amount, charge.currency)} already spent or reserved, this payment is "
            f"{format_minor(charge.amount, charge.currency)}"
        )
    return f"{charge.message} ({why})" if charge.message else why
