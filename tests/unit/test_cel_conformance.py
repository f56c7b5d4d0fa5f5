"""CEL semantics on both engines: one table, run against cel-expr-python and cel-python.

Every expression is type-checked by Google's checker on both engines, so compile-time behaviour is the
same. The runtime differences this table found are listed in DIFFERENCES (and in the README); policies
that must run on both engines avoid those constructs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from proxy.decide import activation_variables
from proxy.model import Agent, Payment, SpendTotal
from proxy.policy.engine import CompileError, EvaluationError, make_engine

ERROR, COMPILE_ERROR = "evaluation error", "compile error"
ENGINES = ("cel-expr-python", "cel-python")
PAYMENT = Payment(
    provider="stripe",
    operation="payment_intent",
    amount=6000,
    currency="usd",
    method="POST",
    path="/v1/payment_intents",
    description="",
    metadata={"purpose": "ads"},
    params={"method": "instant", "nested": {"a": "1"}},
)
AGENT = Agent("agt_1", "own_1", "bot", "conn_1", {"team": "ads"})
NOW = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)  # a Monday; 10:00 in New York, 00:00 Tuesday in Tokyo

# (expression, expected on both engines)
SAME: list[tuple[str, Any]] = [
    # int vs double: mixing is a type error at compile time; convert explicitly
    ("payment.amount > 5000.0", COMPILE_ERROR),
    ("double(payment.amount) / 100.0 > 59.5", True),
    ("payment.amount / 7 == 857", True),
    ("7 / 2 == 3", True),
    ('payment.amount > "10"', COMPILE_ERROR),
    # missing keys
    ('payment.metadata["nope"] == "x"', ERROR),
    ('payment.metadata.nope == "x"', ERROR),
    ('"nope" in payment.metadata', False),
    ('!("nope" in payment.metadata)', True),
    # has()
    ("has(payment.metadata.purpose)", True),
    ("has(payment.metadata.nope)", False),
    # error absorption by || and &&, in either order
    ('payment.metadata["nope"] == "x" || true', True),
    ('true || payment.metadata["nope"] == "x"', True),
    ('payment.metadata["nope"] == "x" && false', False),
    ('payment.metadata["nope"] == "x" || false', ERROR),
    # overflow is an error, never a wrapped number
    ("9223372036854775807 + payment.amount > 0", ERROR),
    ("-9223372036854775807 - payment.amount < 0", ERROR),
    # timestamps and time zones
    ("now.getHours() == 15", True),
    ('now.getHours("America/New_York") == 10', True),
    ('now.getDayOfWeek("Asia/Tokyo") == 2', True),
    ('now.getDate("America/New_York") == 23', True),
    ('now > timestamp("2026-01-01T00:00:00Z")', True),
    ('now - duration("1h") < now', True),
    # strings (the standard library)
    ('payment.currency.startsWith("u") && payment.currency.endsWith("d")', True),
    ('payment.currency.contains("s")', True),
    ("size(payment.currency) == 3", True),
    ('payment.currency.matches("^[a-z]{3}$")', True),
    ('string(payment.amount) == "6000"', True),
    ('int("12") == 12', True),
    ('int("twelve") == 12', ERROR),
    # comprehensions and dynamic parameters
    ('payment.params.exists(k, k == "method")', True),
    ("[1, 2, 3].all(x, x > 0)", True),
    ("[1, 2, 3].map(x, x * 2) == [2, 4, 6]", True),
    ("size([1, 2, 3].filter(x, x > 1)) == 2", True),
    ('payment.params.method == "instant"', True),
    ('payment.params.nested.a == "1"', True),
    ("payment.params.method > 5", ERROR),
    ("spend.daily.amount + payment.amount > 10000", True),
    ('agent.labels["team"] == "ads"', True),
    ("paymnet.amount > 1", COMPILE_ERROR),
]

# Where the engines part ways: (expression, cel-expr-python, cel-python)
DIFFERENCES: list[tuple[str, Any, Any]] = [
    # celpy cannot apply ! to the result of has(): write !("key" in map) instead.
    ("!has(payment.metadata.nope)", True, ERROR),
    # The strings extension (lowerAscii, upperAscii, split, ...) exists only in cel-expr-python.
    ('payment.currency.upperAscii() == "USD"', True, ERROR),
]


def evaluate(engine_name: str, source: str) -> Any:
    engine = make_engine(engine_name)
    try:
        program = engine.compile(source, "bool")
    except CompileError:
        return COMPILE_ERROR
    variables = activation_variables(PAYMENT, AGENT, {"daily": SpendTotal(9500, 3)}, NOW, ["daily"])
    try:
        return program.evaluate(engine.activation(variables))
    except EvaluationError:
        return ERROR


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("source", "expected"), SAME)
def test_same_semantics(engine: str, source: str, expected: Any) -> None:
    assert evaluate(engine, source) == expected


@pytest.mark.parametrize(("source", "expr_python", "celpy"), DIFFERENCES)
def test_documented_differences(source: str, expr_python: Any, celpy: Any) -> None:
    assert (evaluate("cel-expr-python", source), evaluate("cel-python", source)) == (expr_python, celpy)
