"""RFC 6455 framing without I/O: headers, parse_head, unmask, close payloads."""
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from chatserver import frames
from chatserver.frames import FrameError


def naive_unmask(payload, mask):
    """The RFC 6455 section 5.3 definition, one byte at a time."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# -- frame() / text_frame() ---------------------------------------------------------------

@pytest.mark.parametrize("n, head_len, len7", [
    (0, 2, 0), (1, 2, 1), (125, 2, 125),
    (126, 4, 126), (65535, 4, 126),
    (65536, 10, 127), (70000, 10, 127),
])
def test_frame_header_length_at_boundaries(n, head_len, len7):
    """frame() uses the 7-bit, 16-bit and 64-bit length forms exactly at 125/126/65535/65536."""
    payload = os.urandom(n)
    out = frames.frame(frames.OP_BINARY, payload)
    assert len(out) == head_len + n
    assert out[0] == 0x80 | frames.OP_BINARY
    assert out[1] == len7, "server frames are unmasked and carry the right length form"
    if head_len == 4:
        assert struct.unpack("!H", out[2:4])[0] == n
    elif head_len == 10:
        assert struct.unpack("!Q", out[2:10])[0] == n
    assert out[head_len:] == payload


def test_frame_without_fin_clears_the_fin_bit():
    """frame(fin=False) leaves the FIN bit off and keeps the opcode."""
    out = frames.frame(frames.OP_TEXT, b"abc", fin=False)
    assert out[0] == frames.OP_TEXT
    assert out[1] == 3


def test_text_frame_is_a_final_utf8_text_frame():
    """text_frame() gives a FIN text frame whose payload is the UTF-8 of the text."""
    text = "héllo €😀"
    data = text.encode("utf-8")
    out = frames.text_frame(text)
    assert out[0] == 0x81
    assert out[1] == len(data)
    assert out[2:] == data


def test_text_frame_long_text_uses_extended_length():
    """text_frame() of a 200-byte text uses the 16-bit length form."""
    out = frames.text_frame("x" * 200)
    assert out[:4] == bytes((0x81, 126)) + struct.pack("!H", 200)
    assert out[4:] == b"x" * 200


# -- parse_head() -------------------------------------------------------------------------

def test_parse_head_splits_valid_header():
    """parse_head() returns (fin, rsv, opcode, masked, length7) for a good masked text frame."""
    assert frames.parse_head(bytes((0x81, 0x85))) == (True, 0, frames.OP_TEXT, True, 5)


def test_parse_head_accepts_unfinished_data_frame_and_long_lengths():
    """Data frames may be fragmented and use the 126/127 length markers."""
    assert frames.parse_head(bytes((0x01, 126))) == (False, 0, frames.OP_TEXT, False, 126)
    assert frames.parse_head(bytes((0x80, 0xFF))) == (True, 0, frames.OP_CONT, True, 127)
    assert frames.parse_head(bytes((0x82, 127))) == (True, 0, frames.OP_BINARY, False, 127)


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_parse_head_rejects_reserved_bits(rsv):
    """Any RSV bit without an extension is a protocol error (1002)."""
    with pytest.raises(FrameError) as info:
        frames.parse_head(bytes((0x80 | rsv | frames.OP_TEXT, 0x80)))
    assert info.value.code == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_parse_head_rejects_unknown_opcodes(opcode):
    """Reserved opcodes are a protocol error (1002)."""
    with pytest.raises(FrameError) as info:
        frames.parse_head(bytes((0x80 | opcode, 0x80)))
    assert info.value.code == 1002


@pytest.mark.parametrize("opcode", [frames.OP_CLOSE, frames.OP_PING, frames.OP_PONG])
def test_parse_head_rejects_fragmented_control_frames(opcode):
    """A control frame without FIN is a protocol error (1002)."""
    with pytest.raises(FrameError) as info:
        frames.parse_head(bytes((opcode, 0x80)))
    assert info.value.code == 1002


@pytest.mark.parametrize("opcode", [frames.OP_CLOSE, frames.OP_PING, frames.OP_PONG])
@pytest.mark.parametrize("len7", [126, 127])
def test_parse_head_rejects_long_control_frames(opcode, len7):
    """A control frame announcing more than 125 bytes is a protocol error (1002)."""
    with pytest.raises(FrameError) as info:
        frames.parse_head(bytes((0x80 | opcode, 0x80 | len7)))
    assert info.value.code == 1002


@pytest.mark.parametrize("opcode", [frames.OP_CLOSE, frames.OP_PING, frames.OP_PONG])
def test_parse_head_accepts_control_frame_of_125_bytes(opcode):
    """A final control frame of exactly 125 bytes is fine."""
    assert frames.parse_head(bytes((0x80 | opcode, 0x80 | 125))) == (True, 0, opcode, True, 125)


def _head_is_valid(b0, b1):
    """Oracle for RFC 6455 section 5.2/5.5 on the first two bytes."""
    fin, rsv, opcode, length7 = b0 & 0x80, b0 & 0x70, b0 & 0x0F, b1 & 0x7F
    if rsv or opcode not in (0, 1, 2, 8, 9, 10):
        return False
    if opcode >= 8 and (not fin or length7 > 125):
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=2))
def test_parse_head_only_ever_raises_frame_error(head):
    """On any two bytes parse_head() returns the decoded fields or raises FrameError(1002), per the RFC."""
    b0, b1 = head
    try:
        result = frames.parse_head(head)
    except FrameError as exc:
        assert exc.code == 1002
        assert not _head_is_valid(b0, b1)
    else:
        assert _head_is_valid(b0, b1)
        assert result == (bool(b0 & 0x80), 0, b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F)


# -- unmask() -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 126, 1001])
def test_unmask_matches_naive_xor(n):
    """unmask() equals the per-byte XOR for lengths including 0 and non-multiples of 4."""
    payload = os.urandom(n)
    mask = b"\x12\xab\x00\xff"
    out = frames.unmask(payload, mask)
    assert isinstance(out, bytes)
    assert len(out) == n
    assert out == naive_unmask(payload, mask)
    assert frames.unmask(out, mask) == payload


def test_unmask_empty_is_empty_bytes():
    """unmask() of an empty payload is b''."""
    assert frames.unmask(b"", b"abcd") == b""


def test_unmask_keeps_leading_and_trailing_zero_bytes():
    """Zero bytes at either end survive (an int-based XOR must not drop them)."""
    payload = b"\x00\x00hello\x00\x00\x00"
    mask = b"\x00\x00\x00\x00"
    assert frames.unmask(payload, mask) == payload
    mask = b"\x01\x02\x03\x04"
    masked = naive_unmask(payload, mask)
    assert frames.unmask(masked, mask) == payload


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_property_round_trip_and_naive(payload, mask):
    """unmask(unmask(x, m), m) == x and unmask equals the naive XOR for any payload and mask."""
    once = frames.unmask(payload, mask)
    assert once == naive_unmask(payload, mask)
    assert frames.unmask(once, mask) == payload


# -- close payloads -----------------------------------------------------------------------

def test_close_payload_packs_code_and_reason():
    """close_payload() is the big-endian code followed by the UTF-8 reason."""
    assert frames.close_payload(1000, "bye") == b"\x03\xe8bye"
    assert frames.close_payload(1001) == b"\x03\xe9"


def test_close_payload_keeps_a_123_byte_reason_whole():
    """A reason of exactly 123 bytes fits: the payload is 125 bytes."""
    out = frames.close_payload(1008, "r" * 123)
    assert len(out) == 125
    assert out[2:] == b"r" * 123


@pytest.mark.parametrize("reason", [
    "x" * 500,
    "é" * 100,                 # 2-byte characters, cut falls between them
    "a" + "é" * 100,           # 2-byte characters, cut falls inside one
    "a" + "€" * 60,            # 3-byte characters, cut inside one
    "ab" + "😀" * 40,           # 4-byte characters, cut inside one
    "abc" + "😀" * 40,
])
def test_close_payload_truncates_to_valid_utf8(reason):
    """Long reasons are cut to at most 125 bytes total without leaving a broken character."""
    out = frames.close_payload(1011, reason)
    assert len(out) <= 125
    assert struct.unpack("!H", out[:2])[0] == 1011
    text = out[2:].decode("utf-8")  # must not raise
    assert reason.startswith(text)
    # Nothing more was dropped than needed: adding the next character would overflow.
    assert len(text.encode("utf-8")) + len(reason[len(text)].encode("utf-8")) > 123


def test_parse_close_empty_payload():
    """An empty close payload means no status code: (None, '')."""
    assert frames.parse_close(b"") == (None, "")


def test_parse_close_one_byte_is_protocol_error():
    """A 1-byte close payload is a protocol error (1002)."""
    with pytest.raises(FrameError) as info:
        frames.parse_close(b"\x03")
    assert info.value.code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_parse_close_rejects_invalid_codes(code):
    """Codes a peer may not send (reserved, unassigned, out of range) are a protocol error (1002)."""
    with pytest.raises(FrameError) as info:
        frames.parse_close(struct.pack("!H", code) + b"why")
    assert info.value.code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                                  1014, 3000, 4000, 4999])
def test_parse_close_accepts_valid_codes(code):
    """Valid codes come back with their UTF-8 reason."""
    assert frames.parse_close(struct.pack("!H", code) + "ok é".encode("utf-8")) == (code, "ok é")


def test_parse_close_code_without_reason():
    """A bare 2-byte close payload gives the code and an empty reason."""
    assert frames.parse_close(b"\x03\xe8") == (1000, "")


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"abc\xed\xa0\x80", b"\xe2\x82"])
def test_parse_close_rejects_invalid_utf8_reason(bad):
    """A close reason that is not valid UTF-8 is answered with 1007."""
    with pytest.raises(FrameError) as info:
        frames.parse_close(b"\x03\xe8" + bad)
    assert info.value.code == 1007


def test_close_payload_round_trips_through_parse_close():
    """parse_close(close_payload(c, r)) gives back (c, r) for a short reason."""
    assert frames.parse_close(frames.close_payload(4001, "à bientôt")) == (4001, "à bientôt")
