"""Settings from the environment and command-line flags, and how chat.py reports bad ones."""
import dataclasses
import os
import re
import socket
import subprocess
import sys

import pytest

from chatserver import config
from chatserver.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every field of Settings is a setting (env NAME, flag --name); taken from the dataclass, not
# from config.SETTINGS, so a field without a flag or variable is caught.
ALL_SETTINGS = tuple(f.name.upper() for f in dataclasses.fields(config.Settings))


def flag(name):
    return "--" + name.lower().replace("_", "-")


def clean_env(**extra):
    """The process environment without any chat setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ALL_SETTINGS}
    env.update(extra)
    return env


DEFAULTS = {
    "port": 8080, "host": "0.0.0.0", "allowed_origins": (), "max_message_size": 65536,
    "history_size": 100, "history_bytes": 64 * 1024 * 1024, "rate_limit": 10.0,
    "rate_burst": 20, "max_connections": 10000, "max_rooms": 50, "ping_interval": 25.0,
    "ping_timeout": 60.0, "outbox_size": 1024,
    "presence_limit": 1000, "redis_url": "", "presence_ttl": 30.0, "log_level": "INFO",
}


def known(settings_obj):
    """The settings this file knows about (new ones are covered by the generic tests)."""
    values = dataclasses.asdict(settings_obj)
    return {k: values[k] for k in DEFAULTS}


def test_defaults():
    """With no environment and no flags every setting has its documented default."""
    s = config.load([], environ={})
    assert known(s) == DEFAULTS
    assert isinstance(s.port, int) and isinstance(s.rate_limit, float)


def test_every_setting_loads_from_empty_environment():
    """Every setting has a usable default: load() with nothing set gives a value for each field."""
    values = dataclasses.asdict(config.load([], environ={}))
    assert set(values) == {name.lower() for name in ALL_SETTINGS}
    assert all(v is not None for v in values.values())


NUMERIC = [name for name in ALL_SETTINGS
           if isinstance(getattr(config.load([], environ={}), name.lower()), (int, float))
           and not isinstance(getattr(config.load([], environ={}), name.lower()), bool)]


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("0", False), ("", False),
                                        ("off", False)])
def test_echo_endpoint_is_a_switch(raw, value):
    """ECHO_ENDPOINT takes 1/0 (true/false, on/off) and is off by default."""
    assert config.load([], environ={"ECHO_ENDPOINT": raw}).echo_endpoint is value
    assert config.load([], environ={}).echo_endpoint is False


def test_echo_endpoint_rejects_other_words():
    """ECHO_ENDPOINT=maybe stops start-up naming the setting."""
    with pytest.raises(ConfigError, match="^ECHO_ENDPOINT:"):
        config.load([], environ={"ECHO_ENDPOINT": "maybe"})


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("garbage", ["", "abc", "1x", "nan", "-inf", "1e999999", "-99999999"])
def test_every_numeric_setting_rejects_garbage(name, garbage):
    """Every numeric setting refuses non-numbers and absurd values with a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        config.load([], environ={name: garbage})
    assert str(info.value).startswith(name + ":")


@pytest.mark.parametrize("raw", ["", "   "])
def test_an_empty_host_is_refused(raw):
    """HOST= would listen on every address, logged as "http://:8080/": it is a mistake, and
    said so."""
    with pytest.raises(ConfigError, match="^HOST: expected an address to listen on"):
        config.load([], environ={"HOST": raw})


def test_load_ignores_process_environment_when_environ_given(monkeypatch):
    """load(environ={...}) reads only the mapping it is given."""
    monkeypatch.setenv("PORT", "1234")
    assert config.load([], environ={}).port == 8080
    assert config.load([]).port == 1234


def test_environment_values():
    """Each setting is read from its environment variable and converted."""
    env = {
        "PORT": "9000", "HOST": " 127.0.0.1 ", "ALLOWED_ORIGINS": "https://a.example",
        "MAX_MESSAGE_SIZE": "1000", "HISTORY_SIZE": "5", "HISTORY_BYTES": "100000",
        "RATE_LIMIT": "2.5",
        "RATE_BURST": "3", "MAX_CONNECTIONS": "7", "MAX_ROOMS": "4", "PING_INTERVAL": "0.5",
        "PING_TIMEOUT": "1.5", "OUTBOX_SIZE": "16", "PRESENCE_LIMIT": "0", "LOG_LEVEL": "debug",
        "REDIS_URL": " redis://cache:6379/0 ",
    }
    s = config.load([], environ=env)
    assert known(s) == dict(DEFAULTS, **dict(
        port=9000, host="127.0.0.1", allowed_origins=("https://a.example",),
        max_message_size=1000, history_size=5, history_bytes=100000, rate_limit=2.5,
        rate_burst=3,
        max_connections=7, max_rooms=4, ping_interval=0.5, ping_timeout=1.5, outbox_size=16,
        presence_limit=0, redis_url="redis://cache:6379/0", log_level="DEBUG"))


def test_flags_override_environment():
    """A flag wins over the environment variable of the same name."""
    env = {"PORT": "9000", "HISTORY_SIZE": "5", "LOG_LEVEL": "ERROR", "RATE_LIMIT": "1"}
    s = config.load(["--port", "9001", "--history-size=6", "--log-level", "warning"], environ=env)
    assert s.port == 9001
    assert s.history_size == 6
    assert s.log_level == "WARNING"
    assert s.rate_limit == 1.0, "settings without a flag still come from the environment"


def test_every_setting_has_a_flag():
    """Every setting can be given as a flag."""
    argv = ["--port", "1", "--host", "h", "--allowed-origins", "*", "--max-message-size", "125",
            "--history-size", "0", "--history-bytes", "65536", "--rate-limit", "0",
            "--rate-burst", "1",
            "--max-connections", "1", "--max-rooms", "1", "--ping-interval", "0.05",
            "--ping-timeout", "0.1", "--outbox-size", "1", "--presence-limit", "0",
            "--log-level", "ERROR", "--redis-url", "unix:///run/redis.sock",
            "--presence-ttl", "0.5"]
    s = config.load(argv, environ={})
    assert known(s) == dict(DEFAULTS, **dict(
        port=1, host="h", allowed_origins=("*",), max_message_size=125, history_size=0,
        history_bytes=65536, rate_limit=0.0, rate_burst=1, max_connections=1, max_rooms=1,
        ping_interval=0.05, ping_timeout=0.1, outbox_size=1, presence_limit=0, redis_url="unix:///run/redis.sock",
        presence_ttl=0.5, log_level="ERROR"))


@pytest.mark.parametrize("name, value", [
    ("PORT", "0"), ("PORT", "65535"),
    ("MAX_MESSAGE_SIZE", "125"), ("MAX_MESSAGE_SIZE", str(64 * 1024 * 1024)),
    ("HISTORY_SIZE", "0"), ("HISTORY_SIZE", "100000"), ("HISTORY_BYTES", "65536"),
    ("RATE_LIMIT", "0"), ("RATE_BURST", "1"), ("MAX_CONNECTIONS", "1"), ("MAX_ROOMS", "1"),
    ("PING_INTERVAL", "0.05"), ("PING_TIMEOUT", "0.1"), ("OUTBOX_SIZE", "1"),
    ("PRESENCE_LIMIT", "0"), ("PRESENCE_TTL", "0.5"),
])
def test_numeric_bounds_are_inclusive(name, value):
    """The documented extreme values are accepted."""
    # PING_TIMEOUT must also exceed PING_INTERVAL; keep the pair consistent at the extremes.
    pair = {"PING_TIMEOUT": {"PING_INTERVAL": "0.05"}, "PING_INTERVAL": {"PING_TIMEOUT": "0.1"}}
    s = config.load([], environ={name: value, **pair.get(name, {})})
    assert getattr(s, name.lower()) == float(value)


BAD_NUMBERS = [
    ("PORT", "abc"), ("PORT", ""), ("PORT", "80.5"), ("PORT", "-1"), ("PORT", "65536"),
    ("PORT", "99999"),
    ("MAX_MESSAGE_SIZE", "big"), ("MAX_MESSAGE_SIZE", "124"),
    ("MAX_MESSAGE_SIZE", str(64 * 1024 * 1024 + 1)),
    ("HISTORY_SIZE", "x"), ("HISTORY_SIZE", "-1"), ("HISTORY_SIZE", "100001"),
    ("HISTORY_SIZE", "1e3"),
    ("HISTORY_BYTES", "65535"), ("HISTORY_BYTES", "64MiB"), ("HISTORY_BYTES", "-1"),
    ("MAX_MESSAGE_SIZE", "1_000"), ("HISTORY_SIZE", "\u0661\u0662"),  # int() takes both
    ("RATE_LIMIT", "1_0"), ("PING_INTERVAL", "\u0661.5"),  # and float() too
    ("RATE_LIMIT", "fast"), ("RATE_LIMIT", "-0.1"), ("RATE_LIMIT", "nan"), ("RATE_LIMIT", "inf"),
    ("RATE_LIMIT", ""),
    ("RATE_BURST", "0"), ("RATE_BURST", "many"), ("RATE_BURST", "2.5"),
    ("MAX_CONNECTIONS", "0"), ("MAX_CONNECTIONS", "lots"),
    ("MAX_ROOMS", "0"), ("MAX_ROOMS", "-3"), ("MAX_ROOMS", "ten"),
    ("PING_INTERVAL", "0.04"), ("PING_INTERVAL", "0"), ("PING_INTERVAL", "soon"),
    ("PING_INTERVAL", "NaN"), ("PING_INTERVAL", "Infinity"),
    ("PING_TIMEOUT", "0.09"), ("PING_TIMEOUT", "-5"), ("PING_TIMEOUT", "never"),
    ("PING_TIMEOUT", "inf"),
    ("OUTBOX_SIZE", "0"), ("OUTBOX_SIZE", "q"),
    ("PRESENCE_LIMIT", "-1"), ("PRESENCE_LIMIT", "none"),
    ("PRESENCE_TTL", "0.4"), ("PRESENCE_TTL", "0"), ("PRESENCE_TTL", "forever"),
]


@pytest.mark.parametrize("name, value", BAD_NUMBERS)
def test_bad_numeric_setting_from_env_names_the_setting(name, value):
    """Garbage or out-of-range numbers raise ConfigError whose message starts with the setting name."""
    with pytest.raises(ConfigError) as info:
        config.load([], environ={name: value})
    assert str(info.value).startswith(name + ":")


@pytest.mark.parametrize("name, value", BAD_NUMBERS[::3])
def test_bad_numeric_setting_from_flag_names_the_setting(name, value):
    """A bad value given as a flag is reported under the setting's name too."""
    with pytest.raises(ConfigError) as info:
        config.load([flag(name) + "=" + value], environ={})
    assert str(info.value).startswith(name + ":")


def test_config_error_is_a_value_error():
    """ConfigError is a ValueError, so generic handlers catch it."""
    assert issubclass(ConfigError, ValueError)


def test_first_bad_setting_is_reported():
    """With several bad settings, the error names one of them and load() does not return."""
    with pytest.raises(ConfigError) as info:
        config.load([], environ={"PORT": "x", "LOG_LEVEL": "loud"})
    assert str(info.value).split(":")[0] in ("PORT", "LOG_LEVEL")


@pytest.mark.parametrize("raw, want", [
    ("", ()),
    ("*", ("*",)),
    ("https://chat.example.com", ("https://chat.example.com",)),
    ("https://a.example, http://b.example:8080", ("https://a.example", "http://b.example:8080")),
    ("HTTPS://A.Example/", ("https://a.example",)),
    (" https://a.example ,, ", ("https://a.example",)),
    ("https://a.example,*", ("https://a.example", "*")),
])
def test_allowed_origins_parsing(raw, want):
    """ALLOWED_ORIGINS is a comma list of scheme://host[:port] (lower-cased, no trailing slash) or '*'."""
    assert config.load([], environ={"ALLOWED_ORIGINS": raw}).allowed_origins == want


@pytest.mark.parametrize("raw", [
    "example.com", "chat.example.com:443", "ftp://example.com", "https://",
    "https://example.com/path", "https://ok.example,example.com",
])
def test_allowed_origins_rejects_non_origins(raw):
    """Entries without an http(s) scheme and host, or with a path, are refused naming ALLOWED_ORIGINS."""
    with pytest.raises(ConfigError) as info:
        config.load([], environ={"ALLOWED_ORIGINS": raw})
    assert str(info.value).startswith("ALLOWED_ORIGINS:")


def test_allowed_origins_flag_overrides_env():
    """--allowed-origins wins over ALLOWED_ORIGINS."""
    s = config.load(["--allowed-origins", "https://flag.example"],
                    environ={"ALLOWED_ORIGINS": "https://env.example"})
    assert s.allowed_origins == ("https://flag.example",)


@pytest.mark.parametrize("raw, want", [
    ("DEBUG", "DEBUG"), ("info", "INFO"), (" Warning ", "WARNING"), ("error", "ERROR"),
])
def test_log_level_accepted(raw, want):
    """LOG_LEVEL takes DEBUG/INFO/WARNING/ERROR in any case, trimmed."""
    assert config.load([], environ={"LOG_LEVEL": raw}).log_level == want


@pytest.mark.parametrize("raw", ["", "verbose", "CRITICAL", "10", "WARN"])
def test_log_level_rejected(raw):
    """Other LOG_LEVEL values raise a ConfigError naming LOG_LEVEL."""
    with pytest.raises(ConfigError) as info:
        config.load([], environ={"LOG_LEVEL": raw})
    assert str(info.value).startswith("LOG_LEVEL:")


@pytest.mark.parametrize("raw", ["", "redis://localhost:6379/0", "rediss://u:p@host:6380",
                                 "unix:///tmp/redis.sock"])
def test_redis_url_accepted(raw):
    """REDIS_URL is empty (one process) or a redis://, rediss:// or unix:// URL."""
    assert config.load([], environ={"REDIS_URL": raw}).redis_url == raw


@pytest.mark.parametrize("raw, why", [
    ("localhost:6379", "redis://"), ("http://localhost:6379", "redis://"),
    ("memcached://x", "redis://"), ("foo", "got 'foo'"), ("redis://", "expected a host"),
    ("redis://localhost:abc", "port number"), ("redis://localhost:99999", "port number"),
    ("redis://localhost:6379/x", "database number"), ("unix://", "unix:///path")])
def test_redis_url_rejected(raw, why):
    """Other REDIS_URL values raise a ConfigError naming REDIS_URL and what is wrong, before
    anything tries to connect."""
    with pytest.raises(ConfigError) as info:
        config.load([], environ={"REDIS_URL": raw})
    assert str(info.value).startswith("REDIS_URL:")
    assert why in str(info.value)


def test_redis_url_error_hides_the_password():
    """A refused REDIS_URL is reported without the password it carried."""
    with pytest.raises(ConfigError) as info:
        config.load([], environ={"REDIS_URL": "http://user:s3cret@host:6379"})
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        config.load([], environ={"REDIS_URL": "redis://:s3cret@host:port"})
    assert "s3cret" not in str(info.value) and "host" in str(info.value)
    for url in ("redis://:s3/cret@host:6379/0", "redis://:s3#cret@host", "redis://h:x/0?password=s3cret",
                "redis://:s3cret@[::1"):
        with pytest.raises(ConfigError) as info:
            config.load([], environ={"REDIS_URL": url})
        assert "s3" not in str(info.value) and "cret" not in str(info.value), str(info.value)


def test_settings_are_frozen():
    """Settings cannot be changed after loading."""
    s = config.load([], environ={})
    with pytest.raises(Exception):
        s.port = 1


# -- chat.py as a process -----------------------------------------------------------------

def run_chat(args, env):
    return subprocess.run([sys.executable, "chat.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=15)


def test_chat_py_bad_port_flag_exits_2():
    """`python chat.py --port abc` exits with code 2 and names PORT on stderr."""
    proc = run_chat(["--port", "abc"], clean_env())
    assert proc.returncode == 2
    assert "PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Listening" not in proc.stdout


def test_chat_py_bad_port_env_exits_2():
    """`PORT=99999 python chat.py` exits with code 2 and names PORT on stderr."""
    proc = run_chat([], clean_env(PORT="99999"))
    assert proc.returncode == 2
    assert "PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Listening" not in proc.stdout


def test_listening_line_is_a_url_for_an_ipv6_host(start_server):
    """On an IPv6 address the startup line is a URL a browser takes: http://[::1]:port/."""
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6: the test needs its loopback")
    server = start_server(env={"HOST": "::1"})
    assert re.search(r"Listening on http://\[::1\]:%d/$" % server.port, server.log(), re.M)


def test_chat_py_help_lists_every_flag():
    """`python chat.py --help` lists a flag for every setting and exits 0."""
    proc = run_chat(["--help"], clean_env())
    assert proc.returncode == 0
    for name in ALL_SETTINGS:
        assert flag(name) in proc.stdout, flag(name)
        assert name in proc.stdout, "the help names the environment variable %s" % name


@pytest.mark.parametrize("name", ALL_SETTINGS)
def test_flag_for_each_setting(name):
    """Each setting's flag is --name-in-lower-case and feeds that setting."""
    args = vars(config.parser().parse_args([flag(name), "some value"]))
    assert args[name] == "some value"


@pytest.mark.parametrize("interval, timeout", [("25", "25"), ("5", "2")])
def test_ping_timeout_must_exceed_the_interval(interval, timeout):
    """A PING_TIMEOUT not longer than PING_INTERVAL would drop every peer: start-up refuses it."""
    with pytest.raises(ConfigError, match="^PING_TIMEOUT: must be longer than PING_INTERVAL"):
        config.load([], environ={"PING_INTERVAL": interval, "PING_TIMEOUT": timeout})


def test_a_ping_interval_past_the_default_timeout_names_itself():
    """Set alone, a PING_INTERVAL not shorter than the default PING_TIMEOUT is the setting
    named: the user never gave a PING_TIMEOUT."""
    for source in ({"environ": {"PING_INTERVAL": "60"}}, {"argv": ["--ping-interval", "90"]}):
        with pytest.raises(ConfigError) as info:
            config.load(source.get("argv", []), environ=source.get("environ", {}))
        assert str(info.value).startswith("PING_INTERVAL: must be shorter than PING_TIMEOUT (60 s")
    assert config.load([], environ={"PING_INTERVAL": "60", "PING_TIMEOUT": "90"}).ping_timeout == 90
