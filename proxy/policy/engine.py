"""The CEL engine port and its default implementation on Google's C++ CEL runtime (cel-expr-python).

Policies see these variables, each declared with its type so that a misspelt name or a comparison of an
int with a string fails when the policy is checked, not at the first payment:

    payment.provider, payment.operation, payment.currency, payment.destination,
    payment.customer, payment.description                  string
    payment.amount                                         int (minor units)
    payment.metadata                                       map(string, string)
    payment.params                                         map(string, dyn)  (the raw provider parameters)
    payment.categories                                     list(string): a card's allowed categories,
                                                           a MercadoPago payment's item category ids, a
                                                           card authorization's merchant category
    merchant.name, merchant.category, merchant.category_code,
    merchant.country, merchant.city                        string: the merchant of a card authorization
                                                           ("" for other calls)
    x402.payee, x402.asset, x402.network, x402.scheme,
    x402.resource, x402.origin                             string: an x402 payment (payTo, the asset's
                                                           contract, CAIP-2 network, scheme, the URL
                                                           paid for and its origin; "" for other calls)
    request.method, request.path                           string
    agent.id, agent.name                                   string
    agent.labels                                           map(string, string)
    spend                                                  map(string, map(string, int)):
                                                           spend.<limit>.amount / .count, so far in the
                                                           limit's current window
    now                                                    timestamp
    payment.payee, payment.payee_kind                      string: who receives the money, and what
                                                           kind of party (account, customer, merchant, ...)
    local.year, .month, .day, .hour, .minute, .day_of_week int: now in the policy's time zone
                                                           (day_of_week: 0 is Sunday)
    local.weekend                                          bool: Saturday or Sunday there
    local.date, local.time, local.timezone                 string: "2026-11-22", "14:05", the zone
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

STRING, INT, BOOL, TIMESTAMP = "string", "int", "bool", "timestamp"
STR_MAP, DYN_MAP, SPEND_MAP = "map<string,string>", "map<string,dyn>", "map<string,map<string,int>>"
STR_LIST = "list<string>"
MERCHANT_FIELDS = ("name", "category", "category_code", "country", "city")
X402_FIELDS = ("payee", "asset", "network", "scheme", "resource", "origin")

VARIABLES: dict[str, str] = {
    "payment.provider": STRING,
    "payment.operation": STRING,
    "payment.amount": INT,
    "payment.currency": STRING,
    "payment.destination": STRING,
    "payment.customer": STRING,
    "payment.description": STRING,
    "payment.metadata": STR_MAP,
    "payment.params": DYN_MAP,
    "payment.categories": STR_LIST,
    **{f"merchant.{name}": STRING for name in MERCHANT_FIELDS},
    **{f"x402.{name}": STRING for name in X402_FIELDS},
    "request.method": STRING,
    "request.path": STRING,
    "agent.id": STRING,
    "agent.name": STRING,
    "agent.labels": STR_MAP,
    "spend": SPEND_MAP,
    "now": TIMESTAMP,
    "payment.payee": STRING,
    "payment.payee_kind": STRING,
    **{f"local.{name}": INT for name in ("year", "month", "day", "hour", "minute", "day_of_week")},
    "local.weekend": BOOL,
    "local.date": STRING,
    "local.time": STRING,
    "local.timezone": STRING,
}


class CompileError(Exception):
    """An expression that does not parse or does not type-check; the message says where and why."""


class EvaluationError(Exception):
    """An expression failed while evaluating (a missing map key, a bad conversion, ...)."""


class Program(Protocol):
    """One compiled expression."""

    def evaluate(self, activation: Any) -> Any: ...


class Engine(Protocol):
    name: str

    def compile(self, source: str, result: str) -> Program:
        """Compile and type-check ``source``; ``result`` is "bool", "string" or "int"."""
        ...

    def activation(self, variables: Mapping[str, Any]) -> Any:
        """Bind the variables once per call, to evaluate many programs against them."""
        ...


class CelExprEngine:
    """Google's CEL (C++) through cel-expr-python: type-checked at compile, ~microseconds to evaluate."""

    name = "cel-expr-python"

    def __init__(self) -> None:
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_strings

        self._cel = cel
        t = cel.Type
        types = {
            STRING: t.STRING,
            INT: t.INT,
            BOOL: t.BOOL,
            TIMESTAMP: t.TIMESTAMP,
            STR_MAP: t.Map(t.STRING, t.STRING),
            DYN_MAP: t.Map(t.STRING, t.DYN),
            SPEND_MAP: t.Map(t.STRING, t.Map(t.STRING, t.INT)),
            STR_LIST: t.List(t.STRING),
        }
        self._results = {"bool": t.BOOL, "string": t.STRING, "int": t.INT}
        self._env = cel.NewEnv(
            variables={name: types[kind] for name, kind in VARIABLES.items()},
            extensions=[ext_strings.ExtStrings()],
        )

    def compile(self, source: str, result: str) -> Program:
        try:
            expression = self._env.compile(source)
        except RuntimeError as exc:
            raise CompileError(_clean_cel_message(str(exc))) from None
        returns = expression.return_type()
        wanted = self._results[result]
        if returns != wanted and returns != self._cel.Type.DYN:
            raise CompileError(f"the expression must give a {result}, it gives {returns.name()}")
        return _CelExprProgram(expression, self._cel.Type.ERROR)

    def activation(self, variables: Mapping[str, Any]) -> Any:
        return self._env.Activation(dict(variables))


class _CelExprProgram:
    __slots__ = ("_expression", "_error_type")

    def __init__(self, expression: Any, error_type: Any) -> None:
        self._expression = expression
        self._error_type = error_type

    def evaluate(self, activation: Any) -> Any:
        value = self._expression.eval(activation)
        # cel-expr-python does not raise on an evaluation error: it returns a value of type ERROR.
        if value.type() == self._error_type:
            raise EvaluationError(str(value.value()))
        return value.value()


def _clean_cel_message(text: str) -> str:
    """Drop the library's status prefix and suffix, keep "line:col: what" and the caret picture."""
    text = text.removeprefix("INVALID_ARGUMENT: ").strip()
    text = text.replace(" [INVALID_ARGUMENT]", "")
    text = text.replace("ERROR: <input>:", "at ")
    return text


class CelPyEngine:
    """The pure-Python ``cel-python`` (celpy) runtime, CompiledRunner.

    celpy only parses; it does not type-check. So every expression is first checked by Google's checker
    (cel-expr-python) against the same declared variables: a policy that loads on one engine loads on the
    other, and type errors are caught at load time on both. The engines' runtime differences are listed by
    the conformance suite (tests/unit/test_cel_conformance.py).
    """

    name = "cel-python"

    def __init__(self) -> None:
        import celpy
        from celpy import celtypes

        self._celpy, self._celtypes = celpy, celtypes
        logging.getLogger("celpy").setLevel(logging.CRITICAL)  # its evaluation errors reach us as values
        self._checker = CelExprEngine()
        self._env = celpy.Environment(runner_class=celpy.CompiledRunner)

    def compile(self, source: str, result: str) -> Program:
        self._checker.compile(source, result)
        try:
            program = self._env.program(self._env.compile(source))
        except Exception as exc:  # celpy raises its own parse and compile errors
            raise CompileError(f"cel-python cannot compile it: {exc}") from None
        return _CelPyProgram(program, self._celpy.evaluation.CELEvalError)

    def activation(self, variables: Mapping[str, Any]) -> Any:
        nested: dict[str, Any] = {}
        for name, value in variables.items():
            head, _, field = name.partition(".")
            if field:
                nested.setdefault(head, {})[field] = value
            else:
                nested[head] = value
        now = nested.pop("now")
        activation = {k: self._celpy.adapter.json_to_cel(v) for k, v in nested.items()}
        activation["now"] = self._celtypes.TimestampType(now)
        return activation


class _CelPyProgram:
    __slots__ = ("_program", "_error")

    def __init__(self, program: Any, error: type[Exception]) -> None:
        self._program, self._error = program, error

    def evaluate(self, activation: Any) -> Any:
        try:
            value = self._program.evaluate(activation)
        except self._error as exc:
            raise EvaluationError(str(exc.args[0] if exc.args else exc)) from None
        except (ArithmeticError, ValueError, TypeError, KeyError) as exc:
            raise EvaluationError(str(exc)) from None
        if isinstance(value, self._error):
            raise EvaluationError(str(value.args[0] if value.args else value))
        if isinstance(value, bool) or type(value).__name__ == "BoolType":
            return bool(value)
        if isinstance(value, str):
            return str(value)
        return value


ENGINES: dict[str, type[Engine]] = {"cel-expr-python": CelExprEngine, "cel-python": CelPyEngine}


def make_engine(name: str) -> Engine:
    try:
        return ENGINES[name]()
    except KeyError:
        raise ValueError(f"unknown CEL engine {name!r}; choose one of {', '.join(ENGINES)}") from None
