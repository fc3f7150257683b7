"""Settings, read once from the environment and mirrored by command-line flags.

Each setting is an environment variable (twelve-factor) and a flag of the same name in
lower case (``MAX_MESSAGE_SIZE`` -> ``--max-message-size``); a flag wins over the variable.
A bad value stops start-up with a message that names the setting.
"""
import argparse
import dataclasses
import os
import re
import urllib.parse

# What int() and float() take, without 1_000 or other scripts' digits.
_WHOLE = re.compile(r"\s*[+-]?[0-9]+\s*\Z")
_DECIMAL = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*\Z")


class ConfigError(ValueError):
    """A setting has a value the server cannot run with."""


def _int(lo, hi=None):
    def cast(raw):
        if not _WHOLE.match(raw):
            raise ConfigError("expected a whole number, got %r" % raw)
        value = int(raw)
        if value < lo or (hi is not None and value > hi):
            bound = "at least %d" % lo if hi is None else "between %d and %d" % (lo, hi)
            raise ConfigError("expected a number %s, got %d" % (bound, value))
        return value
    return cast


def _float(lo):
    def cast(raw):
        if not _DECIMAL.match(raw):
            raise ConfigError("expected a number, got %r" % raw)
        value = float(raw)
        if not value >= lo or value == float("inf"):
            raise ConfigError("expected a finite number of at least %g, got %r" % (lo, raw))
        return value
    return cast


def _origins(raw):
    """A comma list of origins (scheme://host[:port]) or ``*``."""
    origins = tuple(o.strip().rstrip("/").lower() for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise ConfigError("expected origins like https://chat.example.com, got %r" % origin)
    return origins


def _level(raw):
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("expected DEBUG, INFO, WARNING or ERROR, got %r" % raw)
    return level


def _redis_url(raw):
    """redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or unix:///path."""
    url = raw.strip()
    if not url:
        return url
    # Shown without what may be a password: anything before the last "@", and the query.
    scheme, sep, rest = url.partition("://")
    shown = scheme + sep + ("***@" + rest.rpartition("@")[2] if "@" in rest else rest)
    shown = shown.split("?")[0] + ("?..." if "?" in shown else "")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise ConfigError("not a valid URL, got %r" % shown) from None
    problem = None
    if parts.scheme not in ("redis", "rediss", "unix"):
        problem = "expected a redis://, rediss:// or unix:// URL"
    elif parts.scheme == "unix":
        if not parts.path:
            problem = "expected unix:///path/to/redis.sock"
    elif not parts.hostname:
        problem = "expected a host, as in redis://localhost:6379/0 (a password with / # ? or @ " \
            "in it must be percent-encoded)"
    else:
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            problem = "expected a port number between 0 and 65535"
        if problem is None and parts.path not in ("", "/") and \
                not parts.path[1:].isdigit():
            problem = "expected a database number after the host, as in redis://localhost:6379/0"
    if problem:
        raise ConfigError("%s, got %r" % (problem, shown))
    return url


def _bool(raw):
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError("expected 1 or 0 (or true/false, yes/no, on/off), got %r" % raw)


def _realm(raw):
    realm = raw.strip()
    if not realm or any(not part or any(c.isspace() or c == "#" for c in part)
                        for part in realm.split(".")):
        raise ConfigError("expected a WAMP URI like realm1 or com.example.chat, got %r" % raw)
    return realm


def _str(raw):
    return raw.strip()


def _host(raw):
    host = raw.strip()
    if not host:
        raise ConfigError("expected an address to listen on, such as 0.0.0.0 (every IPv4 "
                          "address), 127.0.0.1 or ::, got ''")
    return host


# name, default (as the environment would spell it), cast, help
SETTINGS = (
    ("PORT", "8080", _int(0, 65535), "TCP port to listen on (0 picks a free one)"),
    ("HOST", "0.0.0.0", _host, "address to listen on"),
    ("ALLOWED_ORIGINS", "", _origins,
     "extra origins allowed to open /ws, comma-separated; '*' allows any. "
     "The page's own origin (matching Host, or X-Forwarded-Host or Forwarded behind a "
     "reverse proxy) is always allowed"),
    ("MAX_MESSAGE_SIZE", "65536", _int(125, 64 * 1024 * 1024),
     "largest WebSocket message in bytes, 125 to 67108864 (64 MiB); bigger ones are closed "
     "with 1009"),
    ("HISTORY_SIZE", "100", _int(0, 100000),
     "messages kept per room for history and recovery, at most 100000"),
    ("HISTORY_BYTES", "67108864", _int(65536),
     "without Redis: memory all rooms' history may take together, in bytes (64 MiB; at "
     "least 65536); the rooms that hold the most lose their oldest messages first"),
    ("RATE_LIMIT", "10", _float(0), "messages per second per connection (0 turns the limit off)"),
    ("RATE_BURST", "20", _int(1), "messages a connection may send at once before the rate applies"),
    ("MAX_CONNECTIONS", "10000", _int(1), "open WebSocket connections per process"),
    ("MAX_ROOMS", "50", _int(1), "rooms one connection may be in at once"),
    ("PING_INTERVAL", "25", _float(0.05), "seconds between the server's keepalive pings"),
    ("PING_TIMEOUT", "60", _float(0.1),
     "seconds a peer may neither send (not even a pong) nor read before it is dropped; "
     "longer than PING_INTERVAL"),
    ("OUTBOX_SIZE", "1024", _int(1), "frames queued for a slow client before it is closed with 1008"),
    ("PRESENCE_LIMIT", "1000", _int(0),
     "rooms bigger than this send no join/leave/nick notices and cap member lists"),
    ("REDIS_URL", "", _redis_url,
     "Redis shared by several processes (pub/sub, history, presence); empty: one process"),
    ("PRESENCE_TTL", "30", _float(0.5),
     "with Redis: seconds before the members of a process that died stop being listed"),
    ("WAMP_REALM", "realm1", _realm,
     "the WAMP realm whose topics chat.room.<room> are the chat rooms"),
    ("ECHO_ENDPOINT", "0", _bool,
     "1 adds /echo, which echoes every message back: a testing aid for conformance suites"),
    ("LOG_LEVEL", "INFO", _level, "DEBUG, INFO, WARNING or ERROR"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated settings; build with ``load()``."""
    port: int
    host: str
    allowed_origins: tuple
    max_message_size: int
    history_size: int
    history_bytes: int
    rate_limit: float
    rate_burst: int
    max_connections: int
    max_rooms: int
    ping_interval: float
    ping_timeout: float
    outbox_size: int
    presence_limit: int
    redis_url: str
    presence_ttl: float
    wamp_realm: str
    echo_endpoint: bool
    log_level: str


def parser():
    """The command-line flags, one per setting; their defaults come from the environment."""
    ap = argparse.ArgumentParser(
        prog="chat.py", description="Real-time chat server: WebSocket relay on /ws, page on /.",
        epilog="Every flag has an environment variable of the same name in upper case.")
    for name, default, _cast, help_text in SETTINGS:
        ap.add_argument("--" + name.lower().replace("_", "-"), dest=name, metavar="VALUE",
                        help="%s [env %s, default %s]" % (help_text, name, default or "''"))
    return ap


def load(argv=None, environ=None):
    """Settings from flags (``argv``) over environment (``environ``) over defaults.

    Raises ConfigError naming the first bad setting.
    """
    environ = os.environ if environ is None else environ
    flags = vars(parser().parse_args(argv if argv is not None else []))
    values, given = {}, set()
    for name, default, cast, _help in SETTINGS:
        raw = flags.get(name)
        if raw is None:
            raw = environ.get(name)
        if raw is None:
            raw = default
        else:
            given.add(name)
        try:
            values[name.lower()] = cast(raw)
        except ConfigError as exc:
            raise ConfigError("%s: %s" % (name, exc)) from None
    if values["ping_timeout"] <= values["ping_interval"]:
        # Otherwise every peer would be dropped before its first ping could be answered. The
        # message names the setting that was given: a default is not the user's mistake.
        if "PING_TIMEOUT" in given:
            raise ConfigError("PING_TIMEOUT: must be longer than PING_INTERVAL (%g s), got %g s"
                              % (values["ping_interval"], values["ping_timeout"]))
        raise ConfigError("PING_INTERVAL: must be shorter than PING_TIMEOUT (%g s, its default: "
                          "set PING_TIMEOUT too), got %g s"
                          % (values["ping_timeout"], values["ping_interval"]))
    return Settings(**values)
