"""The redaction layer: secret shapes, configured values and live tokens never reach a log."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from gateway.accesslog import MASK, Redactor, StructuredFormatter, install_redaction, setup_logging
from gateway.identities import new_api_key

KEY = new_api_key()


@pytest.mark.parametrize("text, secret", [
    (f"Authorization: Bearer {KEY}", KEY),
    ("headers={'Authorization': 'Basic Z2F0ZXdheTpzM2NyZXQ='}", "Z2F0ZXdheTpzM2NyZXQ="),
    ("Proxy-Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
    ("cookie: gateway_session=Sx1y2z3SECRETSESSION; theme=dark", "Sx1y2z3SECRETSESSION"),
    ("Set-Cookie: gateway_session=Sx1y2z3SECRETSESSION; Path=/", "Sx1y2z3SECRETSESSION"),
    ("grant_type=authorization_code&code=SplxlOBeZQQYbYS6WxSbIA&redirect_uri=x",
     "SplxlOBeZQQYbYS6WxSbIA"),
    ("GET /_gateway/callback?state=af0ifjsldkj&code=Qcb0Orv1zh30vL1MPRsbm HTTP/1.1",
     "Qcb0Orv1zh30vL1MPRsbm"),
    ("GET /_gateway/callback?state=af0ifjsldkjXYZ HTTP/1.1", "af0ifjsldkjXYZ"),
    ('{"access_token": "at_2YotnFZFEjr1zCsicMWpAA", "token_type": "Bearer"}',
     "at_2YotnFZFEjr1zCsicMWpAA"),
    ("{'refresh_token': 'rt_tGzv3JOkF0XG5Qx2TlKWIA'}", "rt_tGzv3JOkF0XG5Qx2TlKWIA"),
    ("client_secret=hunter2hunter2&client_id=app", "hunter2hunter2"),
    ("code_verifier=dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
     "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
    ("id_token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlMTIz",
     "eyJzdWIiOiJhbGljZSJ9"),
    (f"key {KEY} was used", KEY[12:]),
    ("postgresql://gw:pa55word@db/gw", "pa55word"),
    ("password=correct-horse", "correct-horse"),
])
def test_shapes_are_scrubbed(text: str, secret: str) -> None:
    out = Redactor()(text)
    assert secret not in out, out
    assert MASK in out


@pytest.mark.parametrize("text", [
    "token refresh for provider fake failed: invalid_grant",
    "the token endpoint of provider fake is unavailable",
    "status_code=200 error_code=x",
    "revoked key gwk_AbCdEfGh of alice",  # a display prefix is not a secret
    "upstream of fake failed: ClientConnectorError",
])
def test_ordinary_messages_survive(text: str) -> None:
    assert Redactor()(text) == text


def test_configured_values_are_replaced_as_substrings_and_reloads_replace_them() -> None:
    r = Redactor()
    r.set_static("config", ["s3cret:+ %/&=", "", None, "short"])
    assert r("auth failed with 'xs3cret:+ %/&=y'") == f"auth failed with 'x{MASK}y'"
    assert r("short") == "short"  # too short to be told apart from ordinary words
    r.set_static("config", ["another-secret-value"])
    assert r("s3cret:+ %/&=") == "s3cret:+ %/&="
    assert r("x another-secret-value") == f"x {MASK}"


def test_live_values_are_matched_as_whole_words_and_bounded() -> None:
    r = Redactor(max_values=2)
    r.register("at_opaqueTOKENvalue000")
    assert r("using at_opaqueTOKENvalue000.") == f"using {MASK}"
    assert r("x=at_opaqueTOKENvalue000&y=1") == f"x={MASK}&y=1"
    r.register("x")  # too short to register
    r.register("second-token-value-1")
    r.register("third-token-value-22")
    assert r("at_opaqueTOKENvalue000") == "at_opaqueTOKENvalue000"  # evicted, oldest first
    assert r("third-token-value-22") == MASK


def test_every_record_is_scrubbed_for_every_handler(caplog: pytest.LogCaptureFixture) -> None:
    undo = install_redaction()
    try:
        caplog.set_level(logging.DEBUG)
        log = logging.getLogger("gateway.test")
        log.info("sending %s", {"Authorization": f"Bearer {KEY}"})
        try:
            raise ValueError(f"refresh_token=rt_SECRETSECRETSECRET key={KEY}")
        except ValueError:
            log.exception("boom")
        log.warning("bad format %s %s", "only one")  # a broken call still logs, scrubbed
    finally:
        undo()
    assert caplog.records
    text = caplog.text
    assert KEY not in text and "rt_SECRETSECRETSECRET" not in text
    assert "Traceback" in text and "ValueError" in text
    assert any("unformattable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("style", ["json", "logfmt"])
def test_formatter_scrubs_structured_fields(style: str) -> None:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "request", None,
                               None)
    record.fields = {"path": f"/fake/{KEY}", "identity": "alice", "status": 200,  # type: ignore[attr-defined]
                     "note": 'has "quotes" and spaces', "absent": None}
    line = StructuredFormatter(style).format(record)
    assert KEY not in line
    if style == "json":
        data: dict[str, Any] = json.loads(line)
        assert data["identity"] == "alice" and data["status"] == 200
        assert data["level"] == "info" and data["logger"] == "gateway.access"
        assert data["ts"].endswith("Z")
    else:
        assert "identity=alice" in line and "status=200" in line
        assert 'note="has \\"quotes\\" and spaces"' in line
        assert "absent=" not in line
        assert "\n" not in line


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError):
        StructuredFormatter("xml")


def test_setup_logging_is_idempotent() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    factory = logging.getLogRecordFactory()
    level = root.level
    try:
        setup_logging("logfmt")
        setup_logging("json")
        ours = [h for h in root.handlers if getattr(h, "_gateway", False)]
        assert len(ours) == 1
        assert isinstance(ours[0].formatter, StructuredFormatter)
        assert ours[0].formatter.style == "json"
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        logging.setLogRecordFactory(factory)
        root.setLevel(level)
        logging.getLogger("aiohttp.access").disabled = False
