"""The JSON v1 (chat.v1) request decoder and reply encoder, against PROTOCOL.md."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from chatserver import protocol
from chatserver.protocol import ProtocolError, Request


def dec(obj):
    """decode() of ``obj`` serialised as JSON."""
    return protocol.decode(json.dumps(obj))


def refused(obj_or_text):
    """The ProtocolError that decode() raises for ``obj_or_text``."""
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    with pytest.raises(ProtocolError) as info:
        protocol.decode(text)
    return info.value


# -- each request type --------------------------------------------------------------------

def test_message_defaults_to_lobby():
    """A message without room goes to 'lobby'."""
    req = dec({"type": "message", "text": "hi"})
    assert isinstance(req, Request)
    assert req.type == "message"
    assert req.fields == {"room": "lobby", "text": "hi"}
    assert req.ref is None


def test_message_with_room_and_ref():
    """A message keeps its room, text (untrimmed) and ref."""
    req = dec({"type": "message", "room": "dev-1_a.b", "text": "  hi  ", "ref": "abc"})
    assert req["room"] == "dev-1_a.b"
    assert req["text"] == "  hi  "
    assert req.ref == "abc"


def test_unknown_fields_are_ignored():
    """Unknown fields do not make a request invalid and are not passed on."""
    req = dec({"type": "message", "text": "hi", "colour": "red", "room": "lobby"})
    assert req.fields == {"room": "lobby", "text": "hi"}


def test_join_with_since_and_epoch():
    """join carries room, since and epoch."""
    req = dec({"type": "join", "room": "dev", "since": 42, "epoch": "abcd1234"})
    assert req.type == "join"
    assert req.fields == {"room": "dev", "since": 42, "epoch": "abcd1234"}


def test_join_without_since_or_epoch():
    """since and epoch are optional on join and come back as None."""
    req = dec({"type": "join", "room": "dev"})
    assert req.fields == {"room": "dev", "since": None, "epoch": None}


def test_join_since_zero_is_allowed():
    """since = 0 (nothing seen yet) is a valid message id."""
    assert dec({"type": "join", "room": "dev", "since": 0})["since"] == 0


def test_leave():
    """leave carries its room."""
    req = dec({"type": "leave", "room": "dev"})
    assert (req.type, req.fields) == ("leave", {"room": "dev"})


def test_nick_is_trimmed():
    """nick is trimmed before it is stored."""
    req = dec({"type": "nick", "nick": "  Ada Lovelace \t"})
    assert (req.type, req.fields) == ("nick", {"nick": "Ada Lovelace"})


def test_nick_of_32_characters_after_trimming():
    """32 characters (after trimming) is the longest nick, non-ASCII allowed."""
    nick = "é" * 32
    assert dec({"type": "nick", "nick": "  " + nick + "  "})["nick"] == nick


def test_direct():
    """direct carries to and text."""
    req = dec({"type": "direct", "to": 7, "text": "psst"})
    assert (req.type, req.fields) == ("direct", {"to": 7, "text": "psst"})


def test_typing():
    """typing carries its room."""
    req = dec({"type": "typing", "room": "dev"})
    assert (req.type, req.fields) == ("typing", {"room": "dev"})


@pytest.mark.parametrize("ref", ["p-1", 17, -3, "", "x" * 64, "join:" + "r" * 64, "x" * 128,
                                 2 ** 53 - 1])
def test_ping_with_ref(ref):
    """ping accepts a string (up to 64 chars) or integer ref and keeps it."""
    req = dec({"type": "ping", "ref": ref})
    assert req.type == "ping"
    assert req.ref == ref
    assert req.fields == {}


def test_ping_without_ref():
    """ping needs no fields."""
    req = dec({"type": "ping"})
    assert (req.type, req.ref) == ("ping", None)


def test_request_get_and_repr():
    """Request.get() falls back to its default and repr names the type."""
    req = dec({"type": "leave", "room": "dev"})
    assert req.get("room") == "dev"
    assert req.get("nothing", 5) == 5
    assert "leave" in repr(req)


# -- bad_json -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "", "not json", "{", '{"type": "ping"', "{'type': 'ping'}", "[]", '[{"type":"ping"}]',
    "null", "42", '"ping"', "true",
])
def test_bad_json(text):
    """Frames that are not a JSON object are refused with bad_json."""
    err = refused(text)
    assert err.code == "bad_json"
    assert err.ref is None


def test_deeply_nested_json_is_bad_json():
    """100000 levels of nesting are refused with bad_json, not a RecursionError."""
    assert refused("[" * 100000).code == "bad_json"
    assert refused('{"a":' * 100000).code == "bad_json"


# -- bad_request --------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [
    {},
    {"text": "hi"},
    {"type": None, "text": "hi"},
    {"type": 1},
    {"type": ["message"]},
])
def test_missing_or_wrong_type_is_bad_request(obj):
    """A request without a string type is bad_request."""
    assert refused(obj).code == "bad_request"


@pytest.mark.parametrize("room", ["", "x" * 65, "two words", "a/b", " lobby", "lobby\n", "é", 5,
                                  True, ["lobby"], {"name": "lobby"}])
@pytest.mark.parametrize("kind", ["message", "join", "leave", "typing"])
def test_bad_room_names(kind, room):
    """Room names must be 1-64 of letters, digits, '-', '_', '.' and strings, in every request with a room."""
    obj = {"type": kind, "room": room, "text": "hi"}
    assert refused(obj).code == "bad_request"


@pytest.mark.parametrize("kind", ["join", "leave", "typing"])
def test_room_required(kind):
    """join, leave and typing need a room (only message defaults to lobby)."""
    assert refused({"type": kind}).code == "bad_request"
    assert refused({"type": kind, "room": None}).code == "bad_request"


def test_room_of_64_characters_is_fine():
    """A 64-character room name is the longest allowed."""
    assert dec({"type": "join", "room": "a" * 64})["room"] == "a" * 64


@pytest.mark.parametrize("nick", [
    None, "", "   ", "x" * 33, "a\x00b", "a\nb", "tab\there", "bell\x07", "\u202eevil",
    "zero\u200bwidth", "line\u2028sep", "del\x7f", 5, ["n"], True,
    "private\ue000use", "unassigned\u0378", "tag\U000e0041s",
    "\u3164", "\u115f\u1160", "\u2800", "\u034f", "\u0301\u0301", "\u3000\u3164",
])
def test_bad_nicks(nick):
    """nick must be 1-32 characters after trimming with no control, formatting, private-use
    or unassigned characters, and show something: not only blank letters (Hangul fillers),
    the blank Braille pattern or combining marks."""
    obj = {"type": "nick"} if nick is None else {"type": "nick", "nick": nick}
    assert refused(obj).code == "bad_request"


@pytest.mark.parametrize("nick", [
    "Zoë", "李小龍", "عائشة", "Ada \U0001F469\u200D\U0001F4BB", "\U0001F3F3\uFE0F\u200D\U0001F308",
    "shaking \U0001FAE8",  # an emoji of Unicode 15, newer than Python 3.11's tables
    "\U0001FAE8", "\u00b7", "e\u0301", "\u3164a",
    "Wales \U0001F3F4\U000E0067\U000E0062\U000E0077\U000E006C\U000E0073\U000E007F",
])
def test_good_nicks(nick):
    """Letters of any script, and emoji (joined ones, and ones newer than this Python)."""
    assert dec({"type": "nick", "nick": nick})["nick"] == nick


@pytest.mark.parametrize("kind", ["message", "direct"])
@pytest.mark.parametrize("text", [None, "", " ", "\n\t ", 5, True, ["hi"], {"t": "hi"}])
def test_bad_text(kind, text):
    """text must be a non-blank string on message and direct."""
    obj = {"type": kind, "to": 1}
    if text is not None:
        obj["text"] = text
    assert refused(obj).code == "bad_request"


@pytest.mark.parametrize("to", [None, True, False, 0, -1, "1", 1.0, 1.5, [1]])
def test_bad_direct_target(to):
    """direct's to must be a positive integer connection id."""
    obj = {"type": "direct", "text": "hi"}
    if to is not None:
        obj["to"] = to
    assert refused(obj).code == "bad_request"


@pytest.mark.parametrize("since", [-1, 1.5, 2.0, "3", True, [1]])
def test_bad_since(since):
    """since must be an integer >= 0."""
    assert refused({"type": "join", "room": "dev", "since": since}).code == "bad_request"


@pytest.mark.parametrize("epoch", [5, True, ["e"], {"e": 1}, "e" * 65])
def test_bad_epoch(epoch):
    """epoch must be a (short) string."""
    assert refused({"type": "join", "room": "dev", "epoch": epoch}).code == "bad_request"


@pytest.mark.parametrize("ref", ["x" * 129, {"id": 1}, [1], True, 1.5, 2 ** 53])
def test_bad_ref(ref):
    """ref must be a string of at most 128 characters or a (safe) integer; the error says
    which integers are safe."""
    err = refused({"type": "ping", "ref": ref})
    assert err.code == "bad_request"
    assert "integer between -(2^53 - 1) and 2^53 - 1" in err.message
    assert err.ref == ref  # returned as sent: the client can tell which request failed


def test_a_long_refused_ref_is_not_sent_back():
    """A refused ref is sent back only while short: an error is no echo of the client's data
    (numbers can grow as JSON, 1E9 -> 1000000000.0)."""
    assert refused({"type": "ping", "ref": ["r"] * 200}).ref == ["r"] * 200  # 1,000 characters
    assert refused({"type": "ping", "ref": ["r"] * 210}).ref is None
    assert refused('{"type": "ping", "ref": [%s]}' % ",".join(["1E9"] * 100)).ref is None


@pytest.mark.parametrize("text", ['{"type": "ping", "ref": NaN}', '{"type": "ping", "ref": "\\ud800"}',
                                  '{"type": "ping", "ref": ["\\udfff"]}'])
def test_bad_ref_that_cannot_go_back(text):
    """A refused ref that no JSON text in a UTF-8 frame can carry is left out of the error."""
    err = refused(text)
    assert err.code == "bad_request" and err.ref is None
    protocol.encode(err.to_dict()).encode("utf-8")


def test_unknown_type():
    """A string type the server does not know is unknown_type."""
    err = refused({"type": "dance"})
    assert err.code == "unknown_type"
    assert "dance" in err.message


def test_unknown_type_message_is_bounded():
    """A huge unknown type is not echoed in full."""
    err = refused({"type": "z" * 10000})
    assert err.code == "unknown_type"
    assert len(err.message) < 500


# -- errors carry the ref -----------------------------------------------------------------

@pytest.mark.parametrize("obj, code", [
    ({"type": "dance", "ref": "r-1"}, "unknown_type"),
    ({"type": "message", "ref": "r-1"}, "bad_request"),
    ({"type": "join", "room": "a b", "ref": "r-1"}, "bad_request"),
    ({"type": "nick", "nick": "", "ref": "r-1"}, "bad_request"),
    ({"type": "direct", "to": "x", "text": "hi", "ref": "r-1"}, "bad_request"),
    ({"type": "join", "room": "a", "since": -1, "ref": "r-1"}, "bad_request"),
    ({"ref": "r-1"}, "bad_request"),
])
def test_errors_carry_the_ref(obj, code):
    """An error for a request with a valid ref carries that ref, also in to_dict()."""
    err = refused(obj)
    assert err.code == code
    assert err.ref == "r-1"
    assert err.to_dict() == {"type": "error", "code": code, "message": err.message, "ref": "r-1"}


def test_error_without_ref_has_no_ref_field():
    """An error for a request without ref has no ref field."""
    err = refused({"type": "dance"})
    assert err.ref is None
    assert set(err.to_dict()) == {"type", "code", "message"}


def test_error_helper_with_integer_ref():
    """error() keeps an integer ref, including 0."""
    assert protocol.error("rate_limited", "slow", 0) == {
        "type": "error", "code": "rate_limited", "message": "slow", "ref": 0}


# -- encode -------------------------------------------------------------------------------

def test_encode_is_compact_and_keeps_non_ascii():
    """encode() has no spaces after separators and writes non-ASCII characters as themselves."""
    out = protocol.encode({"type": "message", "text": "héllo 😀 世界", "id": 1})
    assert out == '{"type":"message","text":"héllo 😀 世界","id":1}'
    assert json.loads(out)["text"] == "héllo 😀 世界"


def test_subprotocol_name():
    """The JSON dialect's subprotocol is chat.v1."""
    assert protocol.SUBPROTOCOL == "chat.v1"


# -- decoded requests must be sendable back as UTF-8 --------------------------------------

@pytest.mark.parametrize("obj", [
    {"type": "message", "text": "hi \ud800 there"},
    {"type": "direct", "to": 1, "text": "\udfff"},
    {"type": "message", "text": "hi", "ref": "abcdefg\ud800h"},
])
def test_lone_surrogates_are_refused(obj):
    """Text or ref with a lone surrogate (\\ud800 escape) is refused: it could never be sent as UTF-8."""
    # Accepted, such a message was stored and then broke every welcome that replayed it.
    text = json.dumps(obj)  # ensure_ascii: the surrogate travels as a \ud800 escape
    try:
        req = protocol.decode(text)
    except ProtocolError as exc:
        assert exc.code == "bad_request"
    else:
        reply = {"fields": req.fields, "ref": req.ref}
        try:
            protocol.encode(reply).encode("utf-8")
        except UnicodeEncodeError as exc:
            pytest.fail("decode() accepted %r, which cannot be encoded as UTF-8: %s" % (req, exc))


# -- properties ---------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_decode_arbitrary_text(text):
    """decode() on any text returns a Request or raises ProtocolError, nothing else."""
    try:
        req = protocol.decode(text)
    except ProtocolError as exc:
        assert exc.code in ("bad_json", "bad_request", "unknown_type")
    else:
        assert isinstance(req, Request)
        assert req.type in protocol.REQUEST_TYPES


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["type", "room", "text", "nick", "to", "since", "epoch", "ref"])
request_types = st.sampled_from(list(protocol.REQUEST_TYPES) + ["dance", ""])


@settings(max_examples=400, deadline=None)
@given(request_types, st.dictionaries(field_names | st.text(max_size=5), json_values, max_size=6))
def test_decode_arbitrary_json_objects(kind, obj):
    """decode() on any JSON object returns a valid Request or raises ProtocolError with a contract code."""
    obj.setdefault("type", kind)
    try:
        req = protocol.decode(json.dumps(obj))
    except ProtocolError as exc:
        assert exc.code in ("bad_json", "bad_request", "unknown_type")
        assert exc.ref is None or exc.ref == obj.get("ref")
    else:
        assert isinstance(req, Request)
        assert req.type == obj["type"]
        if "room" in req.fields:
            assert protocol.valid_room(req["room"])
        if "text" in req.fields:
            assert isinstance(req["text"], str) and req["text"].strip()


@pytest.mark.parametrize("nick", ["👩\u200d💻", "🏳️\u200d🌈", "می\u200cخواهم"])
def test_nicks_may_use_joiners(nick):
    """Emoji sequences and scripts that need zero-width joiners make valid nicks."""
    assert protocol.decode(json.dumps({"type": "nick", "nick": nick}))["nick"] == nick


@pytest.mark.parametrize("text, room", [
    ('{"type": "join", "room": "dev", "since": 3, "epoch": "e"}', "dev"),
    ('{"type":"join","room":"dev"}', "dev"),
    ('{"type": "message", "text": "x", "room": "join"}', None),
    ('{"type": "join"}', None),
    ('{"type": "join", "room": 5}', None),
    ('["join"]', None),
    ('{"type": "join", "room": "dev" ', None),
    ('{"type": "join", "room": "dev", "pad": "%s"}' % ("x" * 2000), None),
    (b'{"type": "join", "room": "dev"}', None),
])
def test_join_target_names_the_room_of_a_small_join_only(text, room):
    """join_target: the room of a small, well-formed join frame; None for anything else."""
    assert protocol.join_target(text) == room

