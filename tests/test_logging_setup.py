"""The one logging set-up of every entry point (pushlib.logutil): HTTP/2 libraries held at WARNING,
one line per record whatever the message holds, and the helpers for SIP-derived values and URLs."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pushlib import dispatcher, logutil
from pushlib.logutil import QUIET_LOGGERS, log_safe, redact_url, setup_logging
from pushlib.settings import Settings

# kemi/ is not a package: Kamailio loads router.py as a script that puts kemi/ on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kemi"))
import ksrlog

FAKE_BEARER = "bearer eyJhbGciOiJFUzI1NiJ9.FAKE-JWT-PAYLOAD.FAKE-SIGNATURE"
FAKE_OAUTH = "ya29.FAKE-OAUTH-ACCESS-TOKEN"
FAKE_DEVICE = "f" * 64


def _emit_library_debug_lines() -> None:
    """What the HTTP/2 stack logs at DEBUG while a dispatcher pushes (URLs, HPACK header blocks)."""
    logging.getLogger("httpx").debug("HTTP Request: POST https://api.push.apple.com/3/device/%s", FAKE_DEVICE)
    logging.getLogger("httpcore.http2").debug("send_request_headers.started authorization=%s", FAKE_BEARER)
    logging.getLogger("h2.connection").debug("headers: %s", [("authorization", "Bearer " + FAKE_OAUTH)])
    hpack = logging.getLogger("hpack.hpack")
    hpack.setLevel(logging.DEBUG)  # even a child logger with a level of its own is filtered
    hpack.debug("Encoding %s", (b"authorization", FAKE_BEARER.encode()))
    logging.getLogger("hpack").info("Decoded %s", FAKE_BEARER)


def test_debug_level_keeps_the_http2_stack_quiet_and_tokens_out() -> None:
    out = io.StringIO()
    setup_logging("debug", logging.StreamHandler(out))
    _emit_library_debug_lines()
    logging.getLogger("pushlib.dispatcher").debug("dispatcher debug line")
    logging.getLogger("hpack.hpack").warning("hpack warning stays")
    text = out.getvalue()
    assert FAKE_BEARER not in text and FAKE_OAUTH not in text and FAKE_DEVICE not in text
    assert "dispatcher debug line" in text and "hpack warning stays" in text
    assert logging.getLogger().level == logging.DEBUG
    for name in QUIET_LOGGERS:
        assert logging.getLogger(name).level == logging.WARNING


def test_standalone_dispatcher_main_at_debug_logs_no_token(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen: list[Settings] = []

    async def fake_serve(settings: Settings, consumer: str | None) -> None:
        seen.append(settings)
        _emit_library_debug_lines()
        logging.getLogger("pushlib.dispatcher").debug("user=%s", "alice\r\n2030-01-01 ERROR forged line")

    monkeypatch.setattr(dispatcher, "_serve", fake_serve)
    monkeypatch.delenv("PUSHLIB_REDIS_URL_FILE", raising=False)
    dispatcher.main(["--log-level", "DEBUG", "--redis-url", "redis://127.0.0.1:1/0"])
    err = capsys.readouterr().err
    assert seen and seen[0].redis_url == "redis://127.0.0.1:1/0"
    assert FAKE_BEARER not in err and FAKE_OAUTH not in err and FAKE_DEVICE not in err
    [line] = [line for line in err.splitlines() if "pushlib.dispatcher" in line]
    assert line.endswith("DEBUG pushlib.dispatcher: user=alice\\r\\n2030-01-01 ERROR forged line")
    assert "forged" not in err.replace(line, "")


def test_a_crlf_in_a_message_gives_exactly_one_line() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, logging.StreamHandler(out))
    log = logging.getLogger("pushlib.test")
    log.info("REGISTER from %s", "bob\r\nFAKE line")
    log.warning("ua=%s", "x\x1b[2J\u2028y\x85z\u202eevil")
    text = out.getvalue()
    assert text.count("\n") == 2  # the handler's own terminators
    first, second = text.splitlines()
    assert first.endswith("REGISTER from bob\\r\\nFAKE line")
    assert second.endswith("ua=x\\x1b[2J\\u2028y\\x85z\\u202eevil")


def test_a_traceback_is_folded_onto_the_record_line() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, logging.StreamHandler(out))
    try:
        raise ValueError("bad Call-ID 'c1\nFAKE'")
    except ValueError:
        logging.getLogger("pushlib.test").exception("failed for %s", "x\ny")
    [line] = out.getvalue().splitlines()
    assert "failed for x\\ny | Traceback (most recent call last):" in line
    assert "ValueError: bad Call-ID 'c1\\nFAKE'" in line


def test_setup_is_idempotent_and_keeps_foreign_handlers() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    first = setup_logging("INFO", logging.StreamHandler(io.StringIO()))
    second = setup_logging("WARNING", logging.StreamHandler(io.StringIO()))
    assert first not in root.handlers and second in root.handlers and foreign in root.handlers
    assert root.level == logging.WARNING
    root.removeHandler(foreign)


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD", logging.StreamHandler(io.StringIO()))


class _FakeKsr:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Callable[[str], None]:
        return lambda text: self.lines.append((level, text))


def test_kamailio_uses_the_shared_setup_with_its_ksr_handler() -> None:
    fake = _FakeKsr()
    ksrlog.install(fake, "3")  # Kamailio debug=3: DEBUG
    ksrlog.install(fake, "3")  # child_init after fork: still one handler
    root = logging.getLogger()
    assert sum(isinstance(h, ksrlog.KsrHandler) for h in root.handlers) == 1
    assert root.level == logging.DEBUG
    _emit_library_debug_lines()
    logging.getLogger("pushlib.router").info("INVITE from %s", "eve\r\nFAKE pusher: line")
    texts = [text for _, text in fake.lines]
    assert all(FAKE_BEARER not in t and FAKE_OAUTH not in t and FAKE_DEVICE not in t for t in texts)
    assert fake.lines == [("info", "pushlib.router: INVITE from eve\\r\\nFAKE pusher: line\n")]


def test_log_safe_escapes_and_cuts() -> None:
    assert log_safe("alice") == "alice"
    assert log_safe("a\r\nb\tc\x00\x7f") == "a\\r\\nb\\tc\\x00\\x7f"
    assert log_safe(None) == "-"
    cut = log_safe("x" * 500)
    assert len(cut) == 200 and cut.endswith("…")
    # an escape sequence is never split by the cut
    cut = log_safe("\n" * 50, limit=10)
    assert cut == "\\n" * 4 + "…"
    assert "\n" not in log_safe("\n" * 1000) and len(log_safe("\n" * 1000)) <= 200
    assert "log_safe" in logutil.__all__ and "redact_url" in logutil.__all__


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@redis.example:6379/0", "redis://:***@redis.example:6379/0"),
    ("rediss://pn-sip:s3cret@redis.example:6380/2", "rediss://pn-sip:***@redis.example:6380/2"),
    ("redis://u:p%40ss@[::1]:6379/0?password=s3cret", "redis://u:***@[::1]:6379/0?password=***"),
    ("unix://:s3cret@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://u:s3cret@h:notaport/0", "<unparsable url>"),
    ("redis://u:pa/s3cret@h:6379/0", "<unparsable url>"),
    ("redis://u:s3cret@[::1/0", "<unparsable url>"),
    # a Redis Cluster URL lists several hosts: all shown, the password still hidden
    ("redis+cluster://pn:s3cret@10.0.0.5:6379,10.0.0.6:6379/0", "redis+cluster://pn:***@10.0.0.5:6379,10.0.0.6:6379/0"),
])
def test_redact_url_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_settings_repr_hides_the_redis_password() -> None:
    text = repr(Settings(redis_url="redis://pn-dispatch:s3cret@h:6379/0"))
    assert "s3cret" not in text and "pn-dispatch:***@h" in text


def test_log_safe_escapes_bytes_that_were_not_utf8() -> None:
    raw = b"bob\xff\xfe".decode("utf-8", "surrogateescape")
    safe = log_safe(raw)
    assert safe == "bob\\udcff\\udcfe"
    safe.encode("utf-8")  # encodable: KSR's log functions and any sink accept it
