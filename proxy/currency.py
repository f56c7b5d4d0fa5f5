"""Currency minor units: how many decimals each ISO currency has, and formatting of minor-unit amounts."""

from __future__ import annotations

# Stripe's zero-decimal and three-decimal currencies; every other currency has two decimals.
ZERO_DECIMAL = frozenset(
    [
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    ]
)
THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])
# Stablecoins PaySentry pays in over x402 (their decimals, as in adapters.x402's registry).
TOKEN_DECIMALS = {"usdc": 6}


def exponent(currency: str) -> int:
    code = currency.lower()
    if code in TOKEN_DECIMALS:
        return TOKEN_DECIMALS[code]
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    return 2


def format_minor(amount: int, currency: str) -> str:
    """``format_minor(1050, "usd") == "10.50 USD"``."""
    exp = exponent(currency)
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 10**exp)
    text = f"{whole}.{frac:0{exp}d}" if exp else str(whole)
    return f"{sign}{text} {currency.upper()}"
