"""The JSON v1 wire format (``chat.v1``): decode and validate client requests, encode replies.

No I/O here. ``decode`` turns one text frame into a ``Request`` or raises ``ProtocolError``
with the contract's error code; the session turns that into an ``error`` frame.
"""
import json
import re
import unicodedata

SUBPROTOCOL = "chat.v1"
LOBBY = "lobby"
NICK_MAX = 32
REF_MAX = 128  # room for a room name (64) and a prefix, as in "join:<room>"
RETURNED_REF_MAX = 1024  # a refused ref longer than this as JSON is not sent back
EPOCH_MAX = 64
IDEMPOTENT_REF = range(8, 65)  # string refs of these lengths are idempotency keys

_ROOM = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
# JSON may spell lone UTF-16 surrogates ("\ud800"), which no UTF-8 frame can carry.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Control and format characters (and line separators) would let a nick fake other lines or
# reorder text around it; they are refused.
_BANNED_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}
_JOINERS = {"\u200c", "\u200d"}  # format characters that emoji and some scripts need
# Where new emoji are assigned: code points there that this Python's Unicode tables do not
# know yet are taken as emoji from a later Unicode version, not refused as unassigned.
_NEWER_EMOJI = range(0x1F000, 0x1FB00)
# A subdivision flag (England, Scotland, Wales): a black flag, tag characters, a cancel tag.
_TAG_FLAG = re.compile("\U0001F3F4[\U000E0020-\U000E007E]+\U000E007F")
# The Hangul fillers: letters that show as blank space.
_BLANK_LETTERS = "\u115f\u1160\u3164\uffa0"
# For telling what a nick looks like (nick_skeleton): letters that pass for the Latin ones of
# "Client" mapped to them (Cyrillic, Greek, Cherokee, Armenian, small capitals, dotless i),
# and the blank letters dropped.
_LOOKALIKES = str.maketrans("СсЕеІіӀӏΙιΕεΤτΝΚкОоАаРрХхıᏟոᴄʟɪᴇɴᴛ|", "CcEeIillIiEeTtNKkOoAaPpXxiCncliENTl",
                            _BLANK_LETTERS)
SMALL_REQUEST = 1024  # characters: more than a join or a subscription ever needs


class ProtocolError(Exception):
    """A request the server refuses; ``code`` is the contract's error code."""

    def __init__(self, code, message, ref=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref

    def to_dict(self):
        return error(self.code, self.message, self.ref)


class Request:
    """A validated client request: ``type``, its fields, and ``ref`` (None when absent)."""

    __slots__ = ("type", "fields", "ref")

    def __init__(self, type_, fields, ref=None):
        self.type = type_
        self.fields = fields
        self.ref = ref

    def __getitem__(self, key):
        return self.fields[key]

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def __repr__(self):
        return "Request(%r, %r, ref=%r)" % (self.type, self.fields, self.ref)


def encode(obj):
    """One JSON text for a frame: compact, UTF-8 kept as is."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error(code, message, ref=None):
    out = {"type": "error", "code": code, "message": message}
    if ref is not None:
        out["ref"] = ref
    return out


def valid_room(name):
    return isinstance(name, str) and _ROOM.match(name) is not None


def is_idempotency_key(ref):
    return isinstance(ref, str) and len(ref) in IDEMPOTENT_REF


def clean_nick(raw):
    """The nick to store, trimmed; raises ValueError with the reason when it is not allowed."""
    if not isinstance(raw, str):
        raise ValueError("nick must be a string")
    nick = raw.strip()
    if not 1 <= len(nick) <= NICK_MAX:
        raise ValueError("nick must be 1 to %d characters after trimming" % NICK_MAX)
    if not all(map(_nick_char, _TAG_FLAG.sub("", nick))):
        raise ValueError("nick must not contain control, formatting, private-use or unassigned "
                         "characters")
    if not any(map(_shows, nick)):
        raise ValueError("nick must show at least one letter, digit, punctuation mark or symbol")
    return nick


def nick_skeleton(nick):
    """What ``nick`` looks like, roughly: its letters and digits only (marks, spaces,
    symbols and invisible characters dropped), lower-case Latin where a letter can pass for
    it, any script's digits as ASCII ones. Two nicks with the same skeleton are hard to tell
    apart on screen. (Best effort: Unicode's confusables list is far longer.)"""
    kept = []
    for ch in unicodedata.normalize("NFKD", nick).translate(_LOOKALIKES):
        category = unicodedata.category(ch)
        if category == "Nd":
            kept.append(str(unicodedata.decimal(ch)))
        elif category[0] in "LN":
            kept.append(ch)
    return "".join(kept).casefold()


def _shows(ch):
    """A character that shows on its own: not a space, a mark, nor a blank letter or the
    blank Braille pattern."""
    return (unicodedata.category(ch)[0] in "LNPS" and ch not in _BLANK_LETTERS
            and ch != "\u2800") or ord(ch) in _NEWER_EMOJI


def _nick_char(ch):
    category = unicodedata.category(ch)
    return category not in _BANNED_CATEGORIES or ch in _JOINERS or \
        (category == "Cn" and ord(ch) in _NEWER_EMOJI)


def has_surrogate(text):
    return _SURROGATE.search(text) is not None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _ref(obj):
    ref = obj.get("ref")
    if ref is None:
        return None
    if isinstance(ref, str) and len(ref) <= REF_MAX and not _SURROGATE.search(ref) \
            or _is_int(ref) and abs(ref) < 2 ** 53:
        return ref
    raise ProtocolError("bad_request", "ref must be a string of at most %d characters or an "
                        "integer between -(2^53 - 1) and 2^53 - 1" % REF_MAX, _returnable(ref))


def _returnable(ref):
    """A refused ``ref``, for the error that refuses it, so the client can still tell which
    request failed; None when it is long (RETURNED_REF_MAX characters of JSON: an error is
    no place to send a client's data back at length) or JSON in a UTF-8 frame cannot carry
    it (NaN, which Python's parser takes; a lone surrogate)."""
    try:
        text = json.dumps(ref, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return None
    return ref if len(text) <= RETURNED_REF_MAX else None


def _room(obj, ref, default=None):
    room = obj.get("room")
    if room is None:  # absent or null, as for every optional field
        room = default
    if room is None:
        raise ProtocolError("bad_request", "room is required", ref)
    if not valid_room(room):
        raise ProtocolError("bad_request", "room must be 1-64 letters, digits, '-', '_' or '.'", ref)
    return room


def _text(obj, ref):
    text = obj.get("text")
    if not isinstance(text, str):
        raise ProtocolError("bad_request", "text must be a string", ref)
    if not text.strip():
        raise ProtocolError("bad_request", "text is empty", ref)
    if _SURROGATE.search(text):
        raise ProtocolError("bad_request", "text holds a lone UTF-16 surrogate", ref)
    return text


def _message(obj, ref):
    return {"room": _room(obj, ref, LOBBY), "text": _text(obj, ref)}


def _join(obj, ref):
    fields = {"room": _room(obj, ref), "since": obj.get("since"), "epoch": obj.get("epoch")}
    if fields["since"] is not None and not (_is_int(fields["since"]) and fields["since"] >= 0):
        raise ProtocolError("bad_request", "since must be a message id (an integer >= 0)", ref)
    epoch = fields["epoch"]
    if epoch is not None and not (isinstance(epoch, str) and len(epoch) <= EPOCH_MAX):
        raise ProtocolError("bad_request", "epoch must be a string", ref)
    return fields


def _leave(obj, ref):
    return {"room": _room(obj, ref)}


def _nick(obj, ref):
    try:
        return {"nick": clean_nick(obj.get("nick"))}
    except ValueError as exc:
        raise ProtocolError("bad_request", str(exc), ref) from None


def _direct(obj, ref):
    to = obj.get("to")
    if not (_is_int(to) and to > 0):
        raise ProtocolError("bad_request", "to must be a connection id (a positive integer)", ref)
    return {"to": to, "text": _text(obj, ref)}


def _typing(obj, ref):
    return {"room": _room(obj, ref)}


def _ping(obj, ref):
    return {}


_VALIDATORS = {
    "message": _message, "join": _join, "leave": _leave, "nick": _nick,
    "direct": _direct, "typing": _typing, "ping": _ping,
}
REQUEST_TYPES = tuple(_VALIDATORS)


def peek_ref(text):
    """The ``ref`` of a frame that will not be handled (over the rate limit), or None."""
    try:
        obj = json.loads(text)
        return _ref(obj) if isinstance(obj, dict) else None
    except (ValueError, RecursionError, ProtocolError):
        return None


def join_target(text):
    """The room a ``join`` frame asks for, before it is validated; None for any other frame,
    and for a join bigger than SMALL_REQUEST. Cheap for the frames it rules out: only a
    small one that contains "join" is parsed."""
    if text.__class__ is not str or len(text) > SMALL_REQUEST or '"join"' not in text:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and obj.get("type") == "join" and isinstance(obj.get("room"), str):
        return obj["room"]
    return None


def decode(text):
    """Validate one client frame; returns a Request or raises ProtocolError."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", "frame must be a JSON object")
    ref = _ref(obj)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_request", "type is required", ref)
    validator = _VALIDATORS.get(kind)
    if validator is None:
        raise ProtocolError("unknown_type", "unknown type %r; expected one of %s"
                            % (kind[:40], ", ".join(REQUEST_TYPES)), ref)
    return Request(kind, validator(obj, ref), ref)
