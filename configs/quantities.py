"""Kubernetes-style quantities: cpu in millicores, memory in bytes, durations in seconds.

Arithmetic is exact (``Decimal``): ``0.2`` cpu is 200 millicores, never 199.99999.
Every ``parse_*`` raises ``ValueError`` with a message fit to show a user, and
``parse_x(format_x(v)) == v`` for every value ``parse_x`` returns.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext
from typing import Any

_NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
_CPU = re.compile(rf"({_NUMBER}(?:[eE][+-]?[0-9]{{1,3}})?)(m?)")
_MEM = re.compile(rf"({_NUMBER})(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E|[eE][+-]?[0-9]{{1,3}})?")
_DURATION = re.compile(rf"({_NUMBER}(?:[eE][+-]?[0-9]{{1,3}})?)(ms|s|m|h)?")

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
# Kubernetes spells kilo "k"; "K" is accepted too because Cortex's docs wrote "K".
_DECIMAL = {"k": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SECONDS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}

CPU_EXAMPLES = "examples: 1, 0.5, 200m"
MEM_EXAMPLES = "examples: 512Mi, 1G, 129e6"
DURATION_EXAMPLES = "examples: 30, 500ms, 30s, 2m"
_LARGEST = 30
_PRECISION = 200  # digits: products of the longest accepted inputs stay exact


def describe(value: Any) -> str:
    """A config value as a user wrote it in YAML: strings quoted, ``true``, ``null``."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _number(value: Any, pattern: re.Pattern, what: str, examples: str) -> tuple[Decimal, str]:
    """The exact number and the unit suffix of a quantity (numbers have no suffix)."""
    wrong = ValueError(f"{describe(value)} is not {what} ({examples})")
    if isinstance(value, bool):
        raise wrong
    if isinstance(value, (int, float)):
        try:
            number = Decimal(repr(value))  # repr: 0.2 is Decimal("0.2"), not its binary cousin
        except InvalidOperation:
            raise wrong from None
        if not number.is_finite():
            raise wrong
        if number < 0:
            raise ValueError(f"{describe(value)} is negative ({examples})")
        _check_size(value, number, examples)
        return number, ""
    if not isinstance(value, str):
        raise wrong
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"{describe(value)} is negative ({examples})")
    match = pattern.fullmatch(text.lstrip("+")) if len(text) <= 64 else None
    if not match:
        raise wrong
    number, suffix = Decimal(match.group(1)), match.group(2) or ""
    if suffix[:1] in ("e", "E") and suffix[1:] not in ("", "i"):  # memory's 129e6
        number, suffix = number.scaleb(int(suffix[1:])), ""
    _check_size(value, number, examples)
    return number, suffix


def _check_size(value: Any, number: Decimal, examples: str) -> None:
    # 10**30 and 10**-30 are typos, and refusing them keeps "1e999999" from eating memory.
    if number and not -_LARGEST <= number.adjusted() <= _LARGEST:
        raise ValueError(f"{describe(value)} is out of range ({examples})")


def parse_cpu(value: Any) -> int:
    """Millicores from ``1``, ``0.5``, ``"200m"``, ``"0.5"``, ``"1"``."""
    number, suffix = _number(value, _CPU, "a CPU quantity", CPU_EXAMPLES)
    with localcontext(prec=_PRECISION):
        millicores = number if suffix == "m" else number * 1000
    if millicores != millicores.to_integral_value():
        raise ValueError(
            f"{describe(value)} is finer than 1m (one millicore), the smallest CPU unit"
        )
    return int(millicores)


def format_cpu(millicores: int) -> str:
    """``"1"`` for whole cores, else ``"200m"``, ``"2500m"``."""
    if millicores % 1000 == 0:
        return str(millicores // 1000)
    return f"{millicores}m"


def parse_mem(value: Any) -> int:
    """Bytes from ``129e6``, ``"129M"``, ``"123Mi"``, ``"1G"``, ``1073741824``."""
    number, suffix = _number(value, _MEM, "a memory quantity", MEM_EXAMPLES)
    with localcontext(prec=_PRECISION):
        if suffix in _BINARY:
            number *= Decimal(1024) ** _BINARY[suffix]
        elif suffix in _DECIMAL:
            number *= Decimal(1000) ** _DECIMAL[suffix]
    if number != number.to_integral_value():
        raise ValueError(f"{describe(value)} is not a whole number of bytes ({MEM_EXAMPLES})")
    return int(number)


def format_mem(size: int) -> str:
    """The shortest exact form, binary first: ``"123Mi"``, ``"129M"``, ``"1T"``, ``"1000"``."""
    forms = [str(size)]
    for suffix, power in (*_BINARY.items(), ("k", 1), ("M", 2), ("G", 3), ("T", 4), ("P", 5),
                          ("E", 6)):
        base = (1024 if suffix.endswith("i") else 1000) ** power
        if size and size % base == 0:
            forms.append(f"{size // base}{suffix}")
    return min(forms, key=lambda form: (len(form), not form.endswith("i")))


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``0.5``, ``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"``, ``"30"``."""
    number, suffix = _number(value, _DURATION, "a duration", DURATION_EXAMPLES)
    with localcontext(prec=_PRECISION):
        return float(number * _SECONDS[suffix or "s"])


def format_duration(seconds: float) -> str:
    """``"30s"``, ``"500ms"``, ``"0.0005s"``: seconds unless milliseconds are exact."""
    exact = Decimal(repr(float(seconds)))
    if exact == exact.to_integral_value():
        return f"{int(exact)}s"
    millis = exact * 1000
    if millis == millis.to_integral_value():
        return f"{int(millis)}ms"
    return f"{exact:f}s"
