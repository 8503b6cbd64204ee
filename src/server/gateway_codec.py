"""The JSON codec of etcd 3.4's gateway (grpc-gateway v1), sans-io: no I/O, no clock.

:func:`encode_message` writes a protobuf message as grpc-gateway's ``JSONPb{OrigName: true}`` does
(proto field names, 64-bit integers as strings, defaults left out, enum names, padded standard
base64); :func:`decode_message` and :class:`JsonStream` read requests the way golang/protobuf's jsonpb
behind a Go ``json.Decoder`` reads them, with Go's exact error texts (clients and tests see them in
the 400 bodies). :func:`go_base64_decode` is Go's ``StdEncoding``. The HTTP side is gateway.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Final, cast

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

# ==================================================================================================
# Go-compatible JSON: scanning (for errors and stream framing), strings, base64


class JsonError(Exception):
    """A request body grpc-gateway would refuse; ``message`` is Go's error text."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _quote_char(c: str) -> str:
    """Go's encoding/json quoteChar for a byte (here: a latin-1 character)."""
    if c == "'":
        return "'\\''"
    if c == '"':
        return "'\"'"
    o = ord(c)
    short = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r", 92: "\\\\"}
    if o in short:
        return f"'{short[o]}'"
    if o < 0x20 or o == 0x7F:
        return f"'\\x{o:02x}'"
    if 0x80 <= o < 0xA0 or o == 0xAD:
        return f"'\\u{o:04x}'"
    return f"'{c}'"


def _syntax(c: str, context: str) -> JsonError:
    return JsonError(f"invalid character {_quote_char(c)} {context}")


_MAX_DEPTH: Final = 10000  # Go's encoding/json maxNestingDepth
_WS: Final = " \t\r\n"
_DIGITS: Final = "0123456789"
_HEX: Final = "0123456789abcdefABCDEF"
_LITERALS: Final = {"t": "true", "f": "false", "n": "null"}

# scanner states
_S_VALUE, _S_VALUE_OR_CLOSE, _S_KEY_OR_CLOSE, _S_KEY, _S_STR, _S_ESC, _S_U = range(7)
_S_NEG, _S_ZERO, _S_ONE, _S_DOT, _S_DOT0, _S_E, _S_ESIGN, _S_E0, _S_LIT, _S_END = range(7, 17)
_NUMBER_DONE: Final = frozenset({_S_ZERO, _S_ONE, _S_DOT0, _S_E0})
# number states where a digit must come next: state -> (Go's error context, state after a digit other than a leading 0)
_DIGIT_NEEDED: Final = {
    _S_NEG: ("in numeric literal", _S_ONE),
    _S_DOT: ("after decimal point in numeric literal", _S_DOT0),
    _S_ESIGN: ("in exponent of numeric literal", _S_E0),
}
# container kinds on the scanner's stack: 0 object key, 1 object value, 2 array element
_OPENERS: Final = {"{": (0, _S_KEY_OR_CLOSE), "[": (2, _S_VALUE_OR_CLOSE)}  # char -> (kind, next state)
_CLOSERS: Final = {1: "}", 2: "]"}  # kind -> the char that closes its container


def scan_value(text: str, pos: int, *, final: bool) -> int | None:
    """Where the JSON value starting at ``text[pos]`` ends (Go's scanner, one byte per character).

    ``text`` is the raw body decoded as latin-1, so positions and error characters are Go's bytes.
    Leading whitespace must already be skipped. Returns the end index, or None when more input is
    needed and ``final`` is false. Raises :class:`JsonError` with Go's text on a syntax error, and
    ``unexpected EOF`` when ``final`` and the value is incomplete (a ``json.Decoder`` at end of body).
    """
    state = _S_VALUE
    stack: list[int] = []  # 0: object key, 1: object value, 2: array element
    lit = ""
    lit_at = 0
    hexleft = 0
    i = pos
    n = len(text)
    while i < n:
        c = text[i]
        if state == _S_VALUE or state == _S_VALUE_OR_CLOSE:
            if c in _WS:
                i += 1
                continue
            if state == _S_VALUE_OR_CLOSE and c == "]":
                state = _S_END  # an empty array: the "]" is looked at again below, as after an element
                continue
            opened = _OPENERS.get(c)
            if opened is not None:
                if len(stack) >= _MAX_DEPTH:
                    raise JsonError("exceeded max depth")
                stack.append(opened[0])
                state = opened[1]
            elif c == '"':
                state = _S_STR
            elif c == "-":
                state = _S_NEG
            elif c == "0":
                state = _S_ZERO
            elif "1" <= c <= "9":
                state = _S_ONE
            elif c in _LITERALS:
                lit, lit_at, state = _LITERALS[c], 1, _S_LIT
            else:
                raise _syntax(c, "looking for beginning of value")
            i += 1
            continue
        if state == _S_KEY_OR_CLOSE or state == _S_KEY:
            if c in _WS:
                i += 1
                continue
            if state == _S_KEY_OR_CLOSE and c == "}":
                stack[-1] = 1  # an empty object: the "}" is looked at again below, as after a key:value pair
                state = _S_END
                continue
            if c == '"':
                state = _S_STR
                i += 1
                continue
            raise _syntax(c, "looking for beginning of object key string")
        if state == _S_STR:
            if c == '"':
                state = _S_END
            elif c == "\\":
                state = _S_ESC
            elif c < " ":
                raise _syntax(c, "in string literal")
            i += 1
            if state == _S_END and not stack:
                return i
            continue
        if state == _S_ESC:
            if c in 'bfnrt\\/"':
                state = _S_STR
            elif c == "u":
                state, hexleft = _S_U, 4
            else:
                raise _syntax(c, "in string escape code")
            i += 1
            continue
        if state == _S_U:
            if c not in _HEX:
                raise _syntax(c, "in \\u hexadecimal character escape")
            hexleft -= 1
            if hexleft == 0:
                state = _S_STR
            i += 1
            continue
        if state == _S_LIT:
            if c != lit[lit_at]:
                raise _syntax(c, f"in literal {lit} (expecting {_quote_char(lit[lit_at])})")
            lit_at += 1
            i += 1
            if lit_at == len(lit):
                state = _S_END
                if not stack:
                    return i
            continue
        if state == _S_E:
            if c in "+-":
                state = _S_ESIGN
                i += 1
                continue
            state = _S_ESIGN  # c must be the exponent's first digit
        digit_needed = _DIGIT_NEEDED.get(state)
        if digit_needed is not None:
            if c not in _DIGITS:
                raise _syntax(c, digit_needed[0])
            state = _S_ZERO if state == _S_NEG and c == "0" else digit_needed[1]
            i += 1
            continue
        if state in _NUMBER_DONE:  # a number that may end here or go on
            if c in _DIGITS and state != _S_ZERO:
                i += 1
                continue
            if c == "." and (state == _S_ONE or state == _S_ZERO):
                state = _S_DOT
                i += 1
                continue
            if c in "eE" and state != _S_E0:
                state = _S_E
                i += 1
                continue
            state = _S_END  # the number ended before c: c is looked at again below
            if not stack:
                return i
        # _S_END: a value inside a container just ended
        if c in _WS:
            i += 1
            continue
        top = stack[-1]
        if top == 0:
            if c != ":":
                raise _syntax(c, "after object key")
            stack[-1] = 1
            state = _S_VALUE
        elif c == ",":
            if top == 1:
                stack[-1] = 0
                state = _S_KEY
            else:
                state = _S_VALUE
        elif c == _CLOSERS[top]:
            stack.pop()  # the container is a value that just ended: the state stays _S_END
            i += 1
            if not stack:
                return i
            continue
        else:
            raise _syntax(c, "after object key:value pair" if top == 1 else "after array element")
        i += 1
    if not final:
        return None
    if not stack and state in _NUMBER_DONE:
        return n  # a top-level number ends at end of input
    raise JsonError("unexpected EOF")


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in _WS:
        pos += 1
    return pos


def _go_unmarshal_syntax(text: str) -> None:
    """Raise Go's ``json.Unmarshal`` syntax error for ``text`` (a whole document), if it has one."""
    pos = _skip_ws(text, 0)
    if pos == len(text):
        raise JsonError("unexpected end of JSON input")
    try:
        end = scan_value(text, pos, final=True)
    except JsonError as exc:
        if exc.message == "unexpected EOF":
            raise JsonError("unexpected end of JSON input") from None
        raise
    assert end is not None
    end = _skip_ws(text, end)
    if end < len(text):
        raise _syntax(text[end], "after top-level value")


class _Num(str):
    """A JSON number, kept as its literal text (Go reports the literal in its errors)."""

    __slots__ = ()


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN / Infinity are not JSON


_DECODER: Final = json.JSONDecoder(parse_int=_Num, parse_float=_Num, parse_constant=_no_constant)


def _parse_document(raw: bytes, pos: int, end: int | None) -> Any:
    """The first JSON value of ``raw[pos:]`` (``end``: its end, if already scanned), as Python values.

    Raises JsonError with Go's text; the fast path is the C decoder, Go's scanner explains failures.
    """
    text = raw[pos:end].decode("utf-8", "replace") if end is not None else raw[pos:].decode("utf-8", "replace")
    try:
        value, _ = _DECODER.raw_decode(text)
        return value
    except (ValueError, RecursionError):
        pass
    latin = raw.decode("latin-1")
    scan_value(latin, pos, final=True)  # raises Go's error
    raise JsonError("invalid JSON")  # accepted by Go's scanner but not by Python's decoder (e.g. too deep)


# ---- Go strings and base64 ----------------------------------------------------------------------

_GO_ESCAPE_RE: Final = re.compile('[\x00-\x1f"\\\\<>&\u2028\u2029]')
_GO_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _go_escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _GO_ESCAPES.get(c) or f"\\u{ord(c):04x}"


def go_json_string(s: str) -> str:
    """``s`` as Go's encoding/json writes it (HTML-safe escapes; ``\\b``/``\\f`` as ``\\u00XX``)."""
    if _GO_ESCAPE_RE.search(s) is None:
        return f'"{s}"'
    return '"' + _GO_ESCAPE_RE.sub(_go_escape_char, s) + '"'


_CANONICAL_B64: Final = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_B64_VALUE: Final = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def go_base64_decode(data: bytes) -> bytes:
    """Go's ``base64.StdEncoding.DecodeString``: padding required, CR/LF ignored, Go's error offsets.

    Raises JsonError ``illegal base64 data at input byte N``.
    """
    if _CANONICAL_B64.fullmatch(data) is not None:
        return binascii.a2b_base64(data)
    out = bytearray()
    si = 0
    n = len(data)
    while True:
        quantum: list[int] = []
        dlen = 4
        j = 0
        while j < 4:
            if si == n:
                if j == 0:
                    return bytes(out)
                raise JsonError(f"illegal base64 data at input byte {si - j}")
            c = data[si]
            si += 1
            v = _B64_VALUE.get(c)
            if v is not None:
                quantum.append(v)
                j += 1
                continue
            if c in (0x0A, 0x0D):
                continue
            if c != 0x3D:  # "="
                raise JsonError(f"illegal base64 data at input byte {si - 1}")
            # padding
            if j in (0, 1):
                raise JsonError(f"illegal base64 data at input byte {si - 1}")
            if j == 2:
                while si < n and data[si] in (0x0A, 0x0D):
                    si += 1
                if si == n:
                    raise JsonError(f"illegal base64 data at input byte {n}")
                if data[si] != 0x3D:
                    raise JsonError(f"illegal base64 data at input byte {si - 1}")
                si += 1
            while si < n and data[si] in (0x0A, 0x0D):
                si += 1
            if si < n:
                raise JsonError(f"illegal base64 data at input byte {si}")
            dlen = j
            break
        quantum += [0] * (4 - len(quantum))
        val = quantum[0] << 18 | quantum[1] << 12 | quantum[2] << 6 | quantum[3]
        out += bytes(((val >> 16) & 0xFF, (val >> 8) & 0xFF, val & 0xFF))[: dlen - 1]
        if dlen < 4:
            return bytes(out)


# ==================================================================================================
# protobuf ⇄ jsonpb


_F = FieldDescriptor
_INT64_TYPES: Final = frozenset({_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64})
_UINT64_TYPES: Final = frozenset({_F.TYPE_UINT64, _F.TYPE_FIXED64})
_INT32_TYPES: Final = frozenset({_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32})
_UINT32_TYPES: Final = frozenset({_F.TYPE_UINT32, _F.TYPE_FIXED32})
_RANGES: Final = {
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint64": (0, (1 << 64) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
}
_INT_LITERAL: Final = re.compile(r"-?[0-9]+")


def _go_enum_name(enum: EnumDescriptor) -> str:
    """The Go type name golang/protobuf reports, e.g. ``etcdserverpb.RangeRequest_SortOrder``."""
    package = enum.file.package
    local = enum.full_name[len(package) + 1 :] if package else enum.full_name
    return f"{package}.{local.replace('.', '_')}" if package else local.replace(".", "_")


# ---- encoding ----


def _encode_value(fd: FieldDescriptor, value: Any) -> str:
    t = fd.type
    if t == _F.TYPE_MESSAGE:
        return encode_message(value)
    if t in _INT64_TYPES or t in _UINT64_TYPES:
        return f'"{value}"'
    if t == _F.TYPE_STRING:
        return go_json_string(value)
    if t == _F.TYPE_BYTES:
        return '"' + base64.b64encode(value).decode("ascii") + '"'
    if t == _F.TYPE_BOOL:
        return "true" if value else "false"
    if t == _F.TYPE_ENUM:
        ev = cast(EnumDescriptor, fd.enum_type).values_by_number.get(value)
        return f'"{ev.name}"' if ev is not None else str(int(value))
    if t in _INT32_TYPES or t in _UINT32_TYPES:
        return str(int(value))
    # float/double: not in etcd's API; Go writes the shortest repr, as Python does
    return json.dumps(float(value))


def encode_message(msg: Message) -> str:
    """``msg`` as grpc-gateway's ``JSONPb{OrigName: true}`` writes it (compact, field-number order).

    Present fields only, as on the gRPC wire: non-zero scalars, present messages, non-empty
    repeated fields, and the chosen member of a oneof (even when zero).
    """
    parts = []
    for fd, value in msg.ListFields():
        if fd.is_repeated:
            text = "[" + ",".join(_encode_value(fd, v) for v in value) + "]"
        else:
            text = _encode_value(fd, value)
        parts.append(f'"{fd.name}":{text}')
    return "{" + ",".join(parts) + "}"


# ---- decoding ----


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to read one message type: its fields by both accepted names, in jsonpb's order."""

    fields: tuple[FieldDescriptor, ...]  # regular fields in declaration order, then oneof members
    camel: dict[str, FieldDescriptor]
    orig: dict[str, FieldDescriptor]


_PLANS: dict[Descriptor, _Plan] = {}


def _plan(desc: Descriptor) -> _Plan:
    plan = _PLANS.get(desc)
    if plan is None:
        regular = [fd for fd in desc.fields if fd.containing_oneof is None]
        oneof = [fd for fd in desc.fields if fd.containing_oneof is not None]
        plan = _Plan(tuple(regular + oneof), {fd.json_name: fd for fd in desc.fields},
                     {fd.name: fd for fd in desc.fields})
        _PLANS[desc] = plan
    return plan


def _kind(value: Any) -> str:
    if isinstance(value, _Num):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_error(value: Any, go_type: str, literal: bool = False) -> JsonError:
    what = f"number {value}" if literal and isinstance(value, _Num) else _kind(value)
    return JsonError(f"json: cannot unmarshal {what} into Go value of type {go_type}")


def _parse_int(value: Any, go_type: str, quoted: bool) -> int:
    """Go's ``json.Unmarshal`` of a number (or, for jsonpb, a quoted number) into an integer type."""
    if isinstance(value, str) and not isinstance(value, _Num):
        if not quoted:
            raise _type_error(value, go_type)
        # jsonpb drops the quotes and parses what is inside as JSON.
        _go_unmarshal_syntax(value)
        inner = _DECODER.decode(value)
        if inner is None:
            return 0
        return _parse_int(inner, go_type, quoted=False)
    if not isinstance(value, _Num):
        raise _type_error(value, go_type)
    lo, hi = _RANGES[go_type]
    if _INT_LITERAL.fullmatch(value) is not None:
        number = int(value)
        if lo <= number <= hi and not (go_type.startswith("uint") and value.startswith("-")):
            return number
    raise _type_error(value, go_type, literal=True)


def _decode_scalar(fd: FieldDescriptor, value: Any) -> Any:
    t = fd.type
    if t == _F.TYPE_BYTES:
        if isinstance(value, str) and not isinstance(value, _Num):
            return go_base64_decode(value.encode("utf-8", "surrogateescape"))
        if isinstance(value, list):
            out = bytearray()
            for item in value:
                out.append(0 if item is None else _byte(item))  # Go: null leaves the element zero
            return bytes(out)
        raise _type_error(value, "[]uint8")
    if t in _INT64_TYPES:
        return _parse_int(value, "int64", quoted=True)
    if t in _UINT64_TYPES:
        return _parse_int(value, "uint64", quoted=True)
    if t == _F.TYPE_ENUM:
        enum = cast(EnumDescriptor, fd.enum_type)
        go_type = _go_enum_name(enum)
        if isinstance(value, str) and not isinstance(value, _Num):
            ev = enum.values_by_name.get(value)
            if ev is None:
                raise JsonError(f"unknown value {json.dumps(value)} for enum {go_type}")
            return ev.number
        if not isinstance(value, _Num):
            raise _type_error(value, go_type)
        if _INT_LITERAL.fullmatch(value) is None or not -(1 << 31) <= int(value) < (1 << 31):
            raise _type_error(value, go_type, literal=True)
        return int(value)
    if t in _INT32_TYPES:
        return _parse_int(value, "int32", quoted=True)
    if t in _UINT32_TYPES:
        return _parse_int(value, "uint32", quoted=True)
    if t == _F.TYPE_BOOL:
        if isinstance(value, bool):
            return value
        raise _type_error(value, "bool")
    if t == _F.TYPE_STRING:
        if isinstance(value, str) and not isinstance(value, _Num):
            # Lone surrogates (from \\ud800 escapes) become U+FFFD, as Go's unquote does.
            return value.encode("utf-8", "replace").decode("utf-8") if not value.isascii() else value
        raise _type_error(value, "string")
    raise JsonError(f"unsupported field type {t} for {fd.full_name}")


def _byte(item: Any) -> int:
    if not isinstance(item, _Num):
        raise _type_error(item, "uint8")
    if _INT_LITERAL.fullmatch(item) is None or not 0 <= int(item) <= 255:
        raise _type_error(item, "uint8", literal=True)
    return int(item)


def _fill(msg: Message, obj: Any) -> None:
    """Set ``msg``'s fields from a parsed JSON value, as jsonpb's Unmarshaler does."""
    if obj is None:
        return
    if not isinstance(obj, dict):
        raise _type_error(obj, "map[string]json.RawMessage")
    plan = _plan(cast(Descriptor, msg.DESCRIPTOR))
    for fd in plan.fields:
        # Both spellings are accepted; if both are present the lowerCamel one wins (jsonpb).
        if fd.json_name in obj:
            value = obj[fd.json_name]
        elif fd.name in obj:
            value = obj[fd.name]
        else:
            continue
        if value is None:
            if fd.containing_oneof is not None and fd.type != _F.TYPE_MESSAGE:
                setattr(msg, fd.name, fd.default_value)  # a null oneof scalar still selects the member
            continue
        if fd.is_repeated:
            if not isinstance(value, list):
                raise _type_error(value, "[]json.RawMessage")
            target = getattr(msg, fd.name)
            if fd.type == _F.TYPE_MESSAGE:
                for item in value:
                    _fill(target.add(), item)
            else:
                target.extend(_decode_scalar(fd, item) if item is not None else fd.default_value for item in value)
        elif fd.type == _F.TYPE_MESSAGE:
            sub = getattr(msg, fd.name)
            sub.SetInParent()
            _fill(sub, value)
        else:
            setattr(msg, fd.name, _decode_scalar(fd, value))


def decode_message(body: bytes, message_type: type[Message]) -> Message:
    """A unary request body as grpc-gateway reads it: the first JSON value (anything after it is
    ignored), an empty body meaning ``{}``. Raises :class:`JsonError` with Go's text."""
    msg = message_type()
    pos = 0
    n = len(body)
    while pos < n and body[pos] in b" \t\r\n":
        pos += 1
    if pos == n:
        return msg
    _fill(msg, _parse_document(body, pos, None))
    return msg


class JsonStream:
    """Sans-io reader of a stream of JSON requests (a bidi body): feed bytes, take messages.

    Values may follow each other directly or with whitespace between them, as Go's json.Decoder
    reads them. ``max_message`` bounds one value's size (raises JsonError past it, so a client cannot
    make the server buffer an endless value).
    """

    def __init__(self, message_type: type[Message], max_message: int) -> None:
        self._type = message_type
        self._max = max_message
        self._buf = b""
        self._latin = ""
        self._closed = False

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._latin += data.decode("latin-1")

    def close(self) -> None:
        """The body ended: a partial value is now an error (``unexpected EOF``)."""
        self._closed = True

    def next(self) -> Message | None:
        """The next complete message, or None (need more data, or the stream ended: see ``ended``)."""
        pos = _skip_ws(self._latin, 0)
        if pos == len(self._latin):
            self._drop(pos)
            return None
        end = scan_value(self._latin, pos, final=self._closed)
        if end is None:
            if len(self._buf) - pos > self._max:
                raise JsonError(f"request larger than {self._max} bytes")
            return None
        value = _parse_document(self._buf, pos, end)
        self._drop(end)
        msg = self._type()
        _fill(msg, value)
        return msg

    @property
    def ended(self) -> bool:
        """No more messages will come (the body ended and everything in it was taken)."""
        return self._closed and not self._buf.strip(b" \t\r\n")

    def _drop(self, upto: int) -> None:
        self._buf = self._buf[upto:]
        self._latin = self._latin[upto:]


