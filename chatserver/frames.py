"""RFC 6455 framing without I/O: frame headers, unmasking, close payloads.

Kept apart from the socket code so that the hub can build a broadcast frame once and every
recipient's socket takes the same bytes (RFC 6455 section 5.2).
"""
import struct

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
DATA_OPCODES = (OP_CONT, OP_TEXT, OP_BINARY)
CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

# Close codes this server sends (RFC 6455 section 7.4.1).
NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA = 1000, 1001, 1002, 1003
INVALID_DATA, POLICY, TOO_BIG, SERVER_ERROR = 1007, 1008, 1009, 1011
SERVICE_RESTART, TRY_AGAIN_LATER = 1012, 1013


class FrameError(Exception):
    """A peer broke the framing rules; ``code`` is the close code to answer with."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def frame(opcode, payload, fin=True):
    """An unmasked frame (server to client) carrying ``payload`` bytes."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, 126, n)
    else:
        head = struct.pack("!BBQ", b0, 127, n)
    return head + payload


def text_frame(text):
    """A complete text frame for ``text`` (str)."""
    return frame(OP_TEXT, text.encode("utf-8"))


def parse_head(first_two):
    """Split the first two header bytes into (fin, rsv, opcode, masked, length7).

    Raises FrameError for what RFC 6455 section 5 forbids regardless of length: reserved
    bits without an extension, unknown opcodes, fragmented or long control frames.
    """
    b0, b1 = first_two[0], first_two[1]
    fin, rsv, opcode = bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F
    masked, length7 = bool(b1 & 0x80), b1 & 0x7F
    if rsv:
        raise FrameError(PROTOCOL_ERROR, "reserved bits set without an extension")
    if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
        raise FrameError(PROTOCOL_ERROR, "unknown opcode %#x" % opcode)
    if opcode in CONTROL_OPCODES:
        if not fin:
            raise FrameError(PROTOCOL_ERROR, "fragmented control frame")
        if length7 > 125:
            raise FrameError(PROTOCOL_ERROR, "control frame longer than 125 bytes")
    return fin, rsv, opcode, masked, length7


def unmask(payload, mask):
    """XOR ``payload`` with the 4-byte ``mask`` as one big integer: C speed, not a Python loop."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def close_payload(code, reason=""):
    """The payload of a close frame: a status code and a UTF-8 reason cut to fit 125 bytes."""
    data = reason.encode("utf-8")[:123]
    # Cutting may split a character; drop the partial tail so the reason stays valid UTF-8.
    data = data.decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + data


def valid_close_code(code):
    """Whether a peer may send ``code`` in a close frame: RFC 6455 section 7.4, and 1012-1014
    from IANA's registry of close codes (a browser echoes the 1012 or 1013 we send)."""
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999


def parse_close(payload):
    """(code, reason) from a received close payload; (None, "") for an empty one."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = struct.unpack("!H", payload[:2])[0]
    if not valid_close_code(code):
        raise FrameError(PROTOCOL_ERROR, "invalid close code %d" % code)
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason
