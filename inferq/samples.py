"""What a sample may be: JSON, nested at most :data:`MAX_NESTING` levels, at most
:data:`MAX_SAMPLE_BYTES` long.

Every step a sample takes (the gateway's parser, kombu's encoder and decoder, the replica's
conversion of the prediction) is recursive in Python, one stack frame or more per level, under
Python's recursion limit of 1000. A sample nested deeper than a few hundred levels would crash
one of them; a limit of 100 levels leaves room for all of them and is far beyond real inputs
(an image batch nests 4 levels). Depth is read from the JSON text without parsing it, so a body
of 100,000 ``[`` costs a scan, never a recursion.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from kombu.utils.json import dumps as kombu_dumps

from inferq.errors import InvalidSample

#: The deepest a sample may nest: ``[[1, 2]]`` nests 2 levels.
MAX_NESTING = 100

#: The longest sample, as JSON. Redis refuses a message over 512 MB (``proto-max-bulk-len``)
#: and kombu sends the body in base64 (4/3 of it); a larger input belongs on S3.
MAX_SAMPLE_BYTES = 256 * 1024 * 1024

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_CHUNK = 1 << 20  # brackets counted at once: bounds the scan's memory for a 10 MiB body


def nesting_depth(text: bytes) -> int:
    """How deep the JSON ``text`` (UTF-8) nests, read without parsing it."""
    import numpy  # only here: importing inferq must stay quick

    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKET)
    steps = numpy.frombuffer(brackets, dtype=numpy.uint8)
    level = deepest = 0
    for start in range(0, len(steps), _CHUNK):
        chunk = steps[start:start + _CHUNK]
        # "[" and "{" open (+1), "]" and "}" close (-1); the running sum is the depth.
        levels = numpy.cumsum(numpy.where((chunk == 0x5B) | (chunk == 0x7B), 1, -1),
                              dtype=numpy.int64) + level
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest


def too_deep_message(what: str) -> str:
    return f"{what} nests deeper than {MAX_NESTING} levels (inferq's limit for JSON samples)"


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def load_body(body: bytes) -> Any:
    """The sample in an HTTP request body; ValueError saying why it cannot be one."""
    encoding = json.detect_encoding(body)
    utf8 = body if encoding.startswith("utf-8") else body.decode(encoding, "replace").encode()
    # Counting brackets is a quick scan; only a body with that many can nest that deep.
    if utf8.count(b"[") + utf8.count(b"{") > MAX_NESTING and nesting_depth(utf8) > MAX_NESTING:
        raise ValueError(too_deep_message("the request body"))
    try:
        return json.loads(body, parse_constant=_not_json)
    except RecursionError:  # unreachable while the scan is right; never a 500
        raise ValueError(too_deep_message("the request body")) from None
    except ValueError as exc:
        raise ValueError(f"the request body is not JSON: {exc}") from None


def _infinite_not_json(text: str) -> float:
    number = float(text)
    if number in (math.inf, -math.inf):
        raise ValueError(f"{text} is too large for a number JSON carries")
    return number


# One decoder for every text (json.loads with an option would build one per call); a number
# that may overflow to infinity (a 3-digit exponent, or 300 digits) is looked at closely.
_check_plain = json.JSONDecoder(parse_constant=_not_json).decode
_check_numbers = json.JSONDecoder(parse_constant=_not_json, parse_float=_infinite_not_json).decode
_MAYBE_HUGE = re.compile(r"[eE][+-]?\d{3}|\d{300}")


def check_text(text: str) -> None:
    """ValueError unless ``text`` is one JSON sample that may travel as it is, spliced into a
    message without being decoded and encoded again (a line of a batch job's input, a
    stream's entry): no NaN, Infinity or number that overflows to one, nested at most
    :data:`MAX_NESTING` levels, at most :data:`MAX_SAMPLE_BYTES` long."""
    if len(text) > MAX_SAMPLE_BYTES:
        raise ValueError(f"{len(text):,} characters, over the {MAX_SAMPLE_BYTES // 2**20} MiB "
                         "limit of a message")
    if text.count("[") + text.count("{") > MAX_NESTING and (
            nesting_depth(text.encode("utf-8", "surrogatepass")) > MAX_NESTING):
        raise ValueError(too_deep_message("it"))
    try:
        (_check_numbers if _MAYBE_HUGE.search(text) else _check_plain)(text)
    except RecursionError:  # unreachable while the scan is right
        raise ValueError(too_deep_message("it")) from None


def check_sample(sample: Any, *, api: str, index: int | None = None) -> None:
    """Raise :class:`InvalidSample` unless ``sample`` can travel to a replica as JSON.

    It is encoded as kombu will encode it (so dates and decimals pass, as they would), and its
    size and depth are checked, before anything is queued.
    """
    try:
        text = kombu_dumps(sample)
    except RecursionError:
        raise InvalidSample(too_deep_message("the sample"), api=api, index=index) from None
    except (TypeError, ValueError) as exc:
        raise InvalidSample(
            f"the sample is not JSON-serialisable: {exc} (send dicts, lists, strings, "
            "numbers, booleans or None; a numpy array as array.tolist())",
            api=api, index=index,
        ) from None
    if len(text) > MAX_SAMPLE_BYTES:  # kombu's JSON is ASCII: characters are bytes
        raise InvalidSample(
            f"the sample is {len(text):,} bytes of JSON, over the {MAX_SAMPLE_BYTES // 2**20} "
            "MiB limit of a message; put large inputs on S3 and send their address",
            api=api, index=index,
        )
    # Counting brackets is a quick scan; only a sample with that many can nest that deep.
    if text.count("[") + text.count("{") > MAX_NESTING and (
            nesting_depth(text.encode("utf-8", "surrogatepass")) > MAX_NESTING):
        raise InvalidSample(too_deep_message("the sample"), api=api, index=index)


def batch_fits(samples: list[Any]) -> bool:
    """Whether no sample of ``samples`` is one :func:`check_sample` refuses, tested on the
    whole list at once (False: check each, to name the culprit)."""
    try:
        text = kombu_dumps(samples)
    except (TypeError, ValueError, RecursionError):
        return False
    if len(text) > MAX_SAMPLE_BYTES:
        return False
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return True
    # The list adds one level to each sample's nesting.
    return nesting_depth(text.encode("utf-8", "surrogatepass")) <= MAX_NESTING + 1
