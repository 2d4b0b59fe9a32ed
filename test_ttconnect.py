"""Tests for ttconnect. No test touches the internet: HTTP goes through ``responses`` or a
server bound to 127.0.0.1, and time is injected."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import http.server
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
import responses

import ttconnect as tt

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
KITE_CSV = (FIXTURES / "zerodha" / "instruments.csv").read_bytes()
ANGEL_JSON = (FIXTURES / "angelone" / "instruments.json").read_bytes()
MASTERS = {"zerodha": KITE_CSV, "angelone": ANGEL_JSON}
URLS = {name: spec["urls"]["instruments_url"] for name, spec in tt._BROKERS.items()}


class FakeClock:
    """Epoch seconds that only move when told to; ``sleep`` records and advances."""

    def __init__(self, when: dt.datetime) -> None:
        self.t = when.timestamp()
        self.slept: List[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds

    def set(self, when: dt.datetime) -> None:
        self.t = when.timestamp()


def ist(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=tt.IST)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(ist(2026, 11, 21, 10, 0))


@pytest.fixture
def clients() -> Iterator[List[tt.TTConnect]]:
    """Collects clients so every test closes what it opened (construction checks use them)."""
    opened: List[tt.TTConnect] = []
    yield opened
    for client in opened:
        client.close()
    assert tt._validation_store() is None


def open_client(
    opened: List[tt.TTConnect],
    broker: str,
    cache_dir: Path,
    clock: FakeClock,
    body: Optional[bytes] = None,
    **config: Any,
) -> tt.TTConnect:
    """Open a client; when ``body`` is given the master download is mocked with it (and must happen)."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rs:
        if body is not None:
            rs.get(config.get("instruments_url", URLS[broker]), body=body)
        client = tt.TTConnect(broker, {"cache_dir": str(cache_dir), **config}, clock=clock, sleep=clock.sleep)
    opened.append(client)
    return client


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ============================================================================
# 1. Constants & enums
# ============================================================================


def test_public_names_resolve_and_are_public() -> None:
    for name in tt.__all__:
        assert not name.startswith("_")
        assert getattr(tt, name) is not None
    assert len(set(tt.__all__)) == len(tt.__all__)


def test_enums_are_str_valued_and_complete() -> None:
    assert [e.value for e in tt.Exchange] == ["NSE", "BSE", "NFO", "BFO", "CDS", "BCD", "MCX"]
    assert [e.value for e in tt.OrderStatus] == [
        "PENDING", "OPEN", "TRIGGER_PENDING", "PARTIALLY_FILLED", "COMPLETE", "CANCELLED", "REJECTED",
    ]
    assert tt.Side.BUY == "BUY" and tt.AuthMode.AUTO.value == "auto"
    assert {e.value for e in tt.OrderType} == {"MARKET", "LIMIT", "SL", "SL_M"}
    assert {e.value for e in tt.ProductType} == {"CNC", "MIS", "NRML"}


# ============================================================================
# 2. Exceptions
# ============================================================================


def test_error_tree_and_flags() -> None:
    for cls in (tt.AuthenticationError, tt.RateLimitError, tt.InsufficientFundsError, tt.InstrumentNotFoundError,
                tt.UnsupportedFeatureError, tt.OrderError, tt.InvalidOrderError, tt.OrderNotFoundError,
                tt.ConfigurationError, tt.BrokerError, tt.NetworkError):
        assert issubclass(cls, tt.TTConnectError)
    assert tt.RateLimitError("slow down").retryable is True
    assert tt.BrokerError("x").retryable is False
    err = tt.BrokerError("bad", broker_code="AB1004", http_status=500)
    assert (err.broker_code, err.http_status, str(err)) == ("AB1004", 500, "bad")
    assert issubclass(tt.InvalidOrderError, tt.OrderError)


# ============================================================================
# 3. Models
# ============================================================================


def test_models_are_frozen_and_hide_secrets() -> None:
    session = tt.SessionData(broker="angelone", mode=tt.AuthMode.AUTO, access_token="jwt-SECRET",
                             refresh_token="refresh-SECRET", feed_token="feed-SECRET")
    assert "SECRET" not in repr(session)
    with pytest.raises(dataclasses_frozen_error()):
        session.access_token = "x"  # type: ignore[misc]
    fund = tt.Fund(available=10.0, used=2.0, total=12.0, raw={"x": 1})
    assert "raw" not in repr(fund) and fund == tt.Fund(available=10.0, used=2.0, total=12.0)
    if sys.version_info >= (3, 10):
        assert not hasattr(fund, "__dict__")  # slotted


def dataclasses_frozen_error() -> type:
    import dataclasses

    return dataclasses.FrozenInstanceError


# ============================================================================
# 4. Instruments (validation, identity)
# ============================================================================


@pytest.mark.parametrize(
    "build, error, words",
    [
        (lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry="30-01-2025"), ValueError, "YYYY-MM-DD"),
        (lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry="2025-02-30"), ValueError, "2025-02-30"),
        (lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2025-01-30", strike=-5, option_type="CE"), ValueError, "positive"),
        (lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2025-01-30", strike="abc", option_type="CE"), ValueError, "not a number"),
        (lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2025-01-30", strike=True, option_type="CE"), TypeError, "strike"),
        (lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2025-01-30", strike=100, option_type="XX"), ValueError, "CE, PE"),
        (lambda: tt.Equity(exchange="NSEX", symbol="SBIN"), ValueError, "NSE, BSE, NFO"),
        (lambda: tt.Equity(exchange="NFO", symbol="SBIN"), ValueError, "equities trade on BSE, NSE"),
        (lambda: tt.Future(exchange="NSE", symbol="NIFTY", expiry="2025-01-30"), ValueError, "futures"),
        (lambda: tt.Equity(exchange="NSE", symbol="sbin"), ValueError, "'SBIN'"),
        (lambda: tt.Equity(exchange="NSE", symbol=""), TypeError, "non-empty"),
        (lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry=30), TypeError, "expiry must be a date"),
    ],
)
def test_bad_shapes_fail_at_construction(build: Any, error: type, words: str) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False):  # any request would raise
        with pytest.raises(error) as info:
            build()
    assert words in str(info.value)


def test_instruments_normalise_to_plain_values() -> None:
    a = tt.Option(exchange=tt.Exchange.NFO, symbol="NIFTY", expiry="2025-01-30", strike=18000, option_type=tt.OptionType.CE)
    b = tt.Option(exchange="NFO", symbol="NIFTY", expiry=dt.date(2025, 1, 30), strike=Decimal("18000.00"), option_type="ce")
    c = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2025-01-30", strike="18000", option_type="CE")
    assert a == b == c and hash(a) == hash(b) and a._iid == c._iid
    assert a.expiry == dt.date(2025, 1, 30) and a.strike == 18000.0 and a.exchange is tt.Exchange.NFO
    assert str(a) == "NFO:NIFTY 2025-01-30 18000 CE"
    assert {a: 1}[c] == 1


@pytest.mark.parametrize("alias", ["NIFTY", "NIFTY 50", "Nifty 50", "nifty 50"])
def test_index_aliases_become_the_canonical_symbol(alias: str) -> None:
    assert tt.Index(exchange="NSE", symbol=alias).symbol == "NIFTY"


def test_index_alias_table_follows_the_spec() -> None:
    expected = {"NIFTY BANK": "BANKNIFTY", "Nifty Bank": "BANKNIFTY", "NIFTY FIN SERVICE": "FINNIFTY",
                "NIFTY MID SELECT": "MIDCPNIFTY", "NIFTY NEXT 50": "NIFTYNXT50", "SENSEX 50": "SENSEX50",
                "NIFTY IT": "NIFTY IT", "INDIA VIX": "INDIA VIX"}
    for spelling, canonical in expected.items():
        assert tt.Index(exchange="NSE", symbol=spelling).symbol == canonical


# ============================================================================
# 5. Instrument store (sqlite3)
# ============================================================================


def test_same_option_resolves_per_broker_from_one_shared_db(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    angel = open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON)
    option = tt.Option(exchange=tt.Exchange.NFO, symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type=tt.OptionType.CE)
    assert kite.resolve(option) == "13364994"
    assert angel.resolve(option) == "52207"
    # Paise strikes (AngelOne) and rupee strikes (Kite) land on one canonical row.
    idea = tt.Option(exchange="NFO", symbol="IDEA", expiry="2026-11-24", strike="8.5", option_type="CE")
    assert (kite.resolve(idea), angel.resolve(idea)) == ("13734402", "53650")
    assert (kite.resolve(tt.Index(exchange="NSE", symbol="NIFTY 50")), angel.resolve(tt.Index(exchange="NSE", symbol="NIFTY"))) == ("256265", "99926000")
    assert (kite.resolve(tt.Index(exchange="BSE", symbol="SENSEX")), angel.resolve(tt.Index(exchange="BSE", symbol="SENSEX"))) == ("265", "99919000")
    assert (kite.resolve(tt.Equity(exchange="NSE", symbol="SBIN")), angel.resolve(tt.Equity(exchange="NSE", symbol="SBIN"))) == ("779521", "3045")
    assert (kite.resolve(tt.Equity(exchange="BSE", symbol="SBIN")), angel.resolve(tt.Equity(exchange="BSE", symbol="SBIN"))) == ("128028676", "500112")
    assert (kite.resolve(tt.Equity(exchange="NSE", symbol="SUZLON-BE")), angel.resolve(tt.Equity(exchange="NSE", symbol="SUZLON-BE"))) == ("3076609", "12018")
    fut = tt.Future(exchange="BFO", symbol="SENSEX", expiry="2026-11-26")
    assert kite.resolve(fut) == "294482181"
    weekly = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-12-01", strike=23500, option_type="PE")
    assert kite._instruments.lookup(weekly)[1] == "NIFTY26D0123500PE"

    db = sqlite3.connect(tmp_path / "instruments.db")
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]
    assert db.execute("SELECT COUNT(*) FROM instruments i JOIN options o ON o.instrument_id = i.id").fetchone()[0] == 14
    per_broker = dict(db.execute("SELECT broker_id, COUNT(*) FROM broker_tokens GROUP BY broker_id").fetchall())
    assert per_broker == {"zerodha": 30, "angelone": 30}
    # One canonical row per instrument: 30 listed by both brokers, no placeholders left over.
    assert db.execute("SELECT COUNT(*) FROM instruments").fetchone()[0] == 30
    assert db.execute("SELECT COUNT(*) FROM equities").fetchone()[0] == 6
    assert db.execute("SELECT COUNT(*) FROM indices").fetchone()[0] == 5
    assert db.execute("SELECT lot_size, tick_size FROM instruments i JOIN futures f ON f.instrument_id = i.id"
                      " WHERE f.expiry = '2026-12-29'").fetchone() == (65, 0.1)
    # Derivatives point at their underlyings.
    und = db.execute("SELECT u.exchange, u.symbol FROM options o JOIN instruments u ON u.id = o.underlying_id"
                     " WHERE o.strike = 85000 LIMIT 1").fetchone()
    assert und == ("BSE", "SENSEX")
    assert db.execute("SELECT broker_id FROM _meta ORDER BY broker_id").fetchall() == [("angelone",), ("zerodha",)]
    db.close()


def test_master_rows_are_counted_skipped_and_malformed(tmp_path: Path, clock: FakeClock, clients: list, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="ttconnect")
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        stats = kite.refresh_instruments()
    assert stats == {"rows": 30, "skipped": {"BCD": 1, "CDS": 1, "MCX": 1}, "malformed": 1, "duplicates": 0}
    angel = open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON)
    with responses.RequestsMock() as rs:
        rs.get(URLS["angelone"], body=ANGEL_JSON)
        stats = angel.refresh_instruments()
    assert stats == {"rows": 30, "skipped": {"MCX": 1, "CDS": 1, "NCDEX": 1}, "malformed": 1, "duplicates": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert any("NIFTY26NOV23700CE" in m and "abc" in m for m in messages)
    assert any("day is out of range" in m for m in messages)
    # Kite still works after the Angel rebuild (its data was carried over).
    assert kite.resolve(tt.Equity(exchange="NSE", symbol="INFY")) == "408065"


def test_duplicate_canonical_rows_are_counted(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    lines = KITE_CSV.decode().splitlines()
    dup = next(line for line in lines if ",NIFTY26NOVFUT," in line).replace("13355010", "99999999")
    body = ("\n".join(lines + [dup]) + "\n").encode()
    kite = open_client(clients, "zerodha", tmp_path, clock, body)
    assert kite.resolve(tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-11-24")) == "13355010"  # first wins
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=body)
        assert kite.refresh_instruments()["duplicates"] == 1


def test_construction_checks_existence_when_a_client_is_open(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    with responses.RequestsMock(assert_all_requests_are_fired=False):  # nothing may reach the network
        with pytest.raises(tt.InstrumentNotFoundError) as info:
            tt.Equity(exchange="NSE", symbol="RELIANC")
        assert "RELIANC" in str(info.value) and "RELIANCE" in str(info.value)
        with pytest.raises(tt.InstrumentNotFoundError) as info:
            tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-25", strike=23500, option_type="CE")
        assert "2026-11-25" in str(info.value) and "2026-11-24, 2026-12-01, 2026-12-29" in str(info.value)
        with pytest.raises(tt.InstrumentNotFoundError) as info:
            tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23550, option_type="CE")
        assert "23550" in str(info.value) and "23500" in str(info.value) and "23600" in str(info.value)
        with pytest.raises(tt.InstrumentNotFoundError) as info:
            tt.Future(exchange="NFO", symbol="NIFTYX", expiry="2026-11-24")
        assert "NIFTYX" in str(info.value)
        with pytest.raises(tt.InstrumentNotFoundError):
            tt.Index(exchange="NSE", symbol="RELIANCE")  # an equity, not an index
        with pytest.raises(tt.UnsupportedFeatureError) as info:
            tt.Future(exchange="MCX", symbol="GOLD", expiry="2026-12-04")
        assert "MCX segment is not loaded yet" in str(info.value)
        assert tt.Equity(exchange="NSE", symbol="RELIANCE").symbol == "RELIANCE"


def test_without_a_client_resolve_checks_existence(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    assert tt._validation_store() is None
    missing = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23550, option_type="CE")
    gold = tt.Future(exchange="MCX", symbol="GOLD", expiry="2026-12-04")
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        with pytest.raises(tt.InstrumentNotFoundError, match="strike 23550 not listed"):
            kite.resolve(missing)
        with pytest.raises(tt.UnsupportedFeatureError, match="MCX"):
            kite.resolve(gold)


def test_resolve_is_cached_per_client(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    eq = tt.Equity(exchange="NSE", symbol="RELIANCE")
    assert kite.resolve(eq) == "738561"
    kite._instruments.store.close()  # a cached answer needs no database
    assert kite.resolve(eq) == "738561"


def test_discovery_helpers(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    assert kite.expiries("NIFTY") == [dt.date(2026, 11, 24), dt.date(2026, 12, 1), dt.date(2026, 12, 29)]
    assert kite.expiries("NIFTY 50") == kite.expiries("NIFTY")
    assert kite.expiries("SENSEX", "BFO") == [dt.date(2026, 11, 26)]
    chain = kite.option_chain("NIFTY", "2026-11-24")
    assert [(o.strike, o.option_type.value) for o in chain] == [
        (23400.0, "CE"), (23400.0, "PE"), (23500.0, "CE"), (23500.0, "PE"), (23600.0, "CE"), (23600.0, "PE")]
    assert kite.resolve(chain[2]) == "13364994"
    with pytest.raises(tt.InstrumentNotFoundError, match="2026-11-24"):
        kite.option_chain("NIFTY", "2026-11-30")
    found = kite.search("SB")
    assert [str(i) for i in found] == ["BSE:SBIN", "NSE:SBIN"]
    assert [str(i) for i in kite.search("NIFTY", exchange="NSE")] == ["NSE:NIFTY", "NSE:NIFTY IT"]
    assert [str(i) for i in kite.search("RELI")] == ["NSE:RELIANCE", "NFO:RELIANCE FUT 2026-11-24"]
    opt = chain[0]
    assert (kite.lot_size(opt), kite.tick_size(opt)) == (65, 0.05)
    assert (kite.lot_size(tt.Equity(exchange="NSE", symbol="INFY")), kite.tick_size(tt.Equity(exchange="NSE", symbol="INFY"))) == (1, 0.1)
    assert kite.lot_size(tt.Future(exchange="BFO", symbol="SENSEX", expiry="2026-11-26")) == 20


def test_angelone_paise_units_are_converted(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    angel = open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON)
    assert angel.tick_size(tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-11-24")) == 0.1
    assert angel.tick_size(tt.Equity(exchange="NSE", symbol="IDEA")) == 0.01
    assert [o.strike for o in angel.option_chain("IDEA", "2026-11-24")] == [8.5]
    assert angel.lot_size(tt.Option(exchange="NFO", symbol="RELIANCE", expiry="2026-11-24", strike=1400, option_type="CE")) == 500


# -- lifecycle: staleness, failures, corruption, concurrency --------------------------------


def test_warm_start_makes_no_request_until_the_next_dump(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    clock.set(ist(2026, 11, 22, 8, 29))  # next day, before Kite's 08:30 dump
    open_client(clients, "zerodha", tmp_path, clock)  # no download registered: any request fails
    clock.set(ist(2026, 11, 22, 8, 31))
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)  # must re-download
    db = sqlite3.connect(tmp_path / "instruments.db")
    assert db.execute("SELECT refreshed_at FROM _meta").fetchone()[0] == "2026-11-22T08:31:00+05:30"
    db.close()


def test_latest_publication_is_ist() -> None:
    at = ist(2026, 11, 21, 7, 0).timestamp()
    assert tt._latest_publication(at, (8, 0)) == ist(2026, 11, 20, 8, 0)
    assert tt._latest_publication(ist(2026, 11, 21, 8, 0).timestamp(), (8, 0)) == ist(2026, 11, 21, 8, 0)


def _truncated_kite() -> bytes:
    return KITE_CSV[: len(KITE_CSV) // 3]


BAD_DOWNLOADS = {
    "http_500": dict(status=500, body=b"<html><body>Internal Server Error</body></html>", content_type="text/html"),
    "html_page": dict(status=200, body=b"<html><head><title>Login</title></head></html>", content_type="text/html"),
    "missing_column": dict(status=200, body=KITE_CSV.replace(b"instrument_token,", b"token,", 1)),
    "too_few_rows": dict(status=200, body=b"\n".join(KITE_CSV.splitlines()[:6]) + b"\n"),
    "empty": dict(status=200, body=b""),
    "connection_error": dict(body=requests.ConnectionError("connection refused")),
}


@pytest.mark.parametrize("case", sorted(BAD_DOWNLOADS))
def test_bad_download_keeps_the_previous_db(case: str, tmp_path: Path, clock: FakeClock, clients: list, caplog: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    db_path = tmp_path / "instruments.db"
    before = file_digest(db_path)
    clock.set(ist(2026, 11, 22, 10, 0))  # a new dump is due
    for on_stale in ("fail", "warn"):
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            rs.get(URLS["zerodha"], **BAD_DOWNLOADS[case])
            if on_stale == "fail":
                with pytest.raises(tt.TTConnectError) as info:
                    tt.TTConnect("zerodha", cache_dir=str(tmp_path), on_stale="fail", clock=clock, sleep=clock.sleep)
                assert "zerodha instrument master" in str(info.value) and "kept untouched" in str(info.value)
            else:
                caplog.set_level(logging.WARNING, logger="ttconnect")
                client = tt.TTConnect("zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock, sleep=clock.sleep)
                clients.append(client)
                assert client.resolve(tt.Equity(exchange="NSE", symbol="RELIANCE")) == "738561"
                assert any("serving the cached DB" in r.getMessage() for r in caplog.records)
        assert file_digest(db_path) == before
        assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]


def test_truncated_download_is_detected_by_content_length(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    before = file_digest(tmp_path / "instruments.db")
    clock.set(ist(2026, 11, 22, 10, 0))
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=_truncated_kite(), headers={"Content-Length": str(len(KITE_CSV))},
               auto_calculate_content_length=False)
        with pytest.raises(tt.TTConnectError, match="truncated"):
            tt.TTConnect("zerodha", cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep)
    assert file_digest(tmp_path / "instruments.db") == before


@pytest.mark.parametrize("body, words", [
    (ANGEL_JSON[: len(ANGEL_JSON) // 2], "truncated"),
    (b'{"status": false, "message": "Access denied"}', "not a JSON array"),
    (json.dumps([{"token": "1", "symbol": "X"}]).encode(), r"key\(s\) name, expiry"),
])
def test_bad_angelone_master_keeps_the_previous_db(body: bytes, words: str, tmp_path: Path, clock: FakeClock, clients: list) -> None:
    open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON)
    before = file_digest(tmp_path / "instruments.db")
    clock.set(ist(2026, 11, 22, 10, 0))
    with responses.RequestsMock() as rs:
        rs.get(URLS["angelone"], body=body)
        with pytest.raises(tt.BrokerError, match=words):
            tt.TTConnect("angelone", cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep)
    assert file_digest(tmp_path / "instruments.db") == before


def test_no_network_and_no_db_says_what_to_do(tmp_path: Path, clock: FakeClock) -> None:
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=requests.ConnectionError("Name or service not known"))
        with pytest.raises(tt.NetworkError) as info:
            tt.TTConnect("zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock, sleep=clock.sleep)
    message = str(info.value)
    assert "No instrument DB for zerodha is cached" in message and "check the network" in message
    assert info.value.retryable is True
    assert clock.slept == [0.5, 1.0]  # retried with backoff before giving up
    assert not (tmp_path / "instruments.db").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_db_is_detected_and_rebuilt(damage: str, tmp_path: Path, clock: FakeClock, clients: list, caplog: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    clients.clear()
    db_path = tmp_path / "instruments.db"
    data = db_path.read_bytes()
    db_path.write_bytes(b"this is not a database" * 100 if damage == "garbage" else data[: len(data) // 2])
    caplog.set_level(logging.WARNING, logger="ttconnect")
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    assert kite.resolve(tt.Equity(exchange="NSE", symbol="SBIN")) == "779521"
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "instruments.db.corrupt").exists()


def test_a_crash_mid_refresh_leaves_readers_on_the_old_data(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    reader = sqlite3.connect(tmp_path / "instruments.db")
    count = "SELECT COUNT(*) FROM broker_tokens"
    assert reader.execute(count).fetchone()[0] == 30
    # A real process dies (os._exit) half-way through its rebuild.
    server, url = serve_bytes({"/instruments": KITE_CSV})
    try:
        script = textwrap.dedent(f"""
            import os, ttconnect as tt
            def dying(conn):  # rows are filed, the indexes not yet built
                os._exit(3)
            tt._create_indexes = dying
            c = tt.TTConnect("zerodha", cache_dir={str(tmp_path)!r}, instruments_url={url + '/instruments'!r})
            c.refresh_instruments()
        """)
        proc = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, timeout=60)
        assert proc.returncode == 3, proc.stderr.decode()
    finally:
        server.shutdown()
    assert any(name.startswith("instruments.db.build-") for name in os.listdir(tmp_path))  # it died mid-build
    assert reader.execute(count).fetchone()[0] == 30
    fresh = sqlite3.connect(tmp_path / "instruments.db")
    assert fresh.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert fresh.execute(count).fetchone()[0] == 30
    assert kite.resolve(tt.Equity(exchange="NSE", symbol="INFY")) == "408065"
    reader.close()
    fresh.close()
    (tmp_path / "report.download").write_text("a user's file")  # the cache dir may be shared
    (tmp_path / "zerodha_master.999.1.download").write_text("left by a crashed refresh")
    with responses.RequestsMock() as rs:  # the next refresh sweeps what the crash left, and only that
        rs.get(URLS["zerodha"], body=KITE_CSV)
        kite.refresh_instruments()
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock", "report.download"]


def test_a_failed_parse_midway_changes_nothing(tmp_path: Path, clock: FakeClock, clients: list, monkeypatch: Any) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    before = file_digest(tmp_path / "instruments.db")

    def exploding(f: Any, stats: Any) -> Iterator[Any]:
        for i, row in enumerate(tt._zerodha_parse_master(f, stats)):
            if i == 10:
                raise OSError("disk full")
            yield row

    monkeypatch.setattr(kite._instruments, "master", kite._instruments.master._replace(parse=exploding))
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        with pytest.raises(OSError, match="disk full"):
            kite.refresh_instruments()
    assert file_digest(tmp_path / "instruments.db") == before
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]


class _BytesHandler(http.server.BaseHTTPRequestHandler):
    routes: Dict[str, bytes] = {}
    hits: List[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = self.routes.get(self.path)
        self.hits.append(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def serve_bytes(routes: Dict[str, bytes]) -> Any:
    handler = type("Handler", (_BytesHandler,), {"routes": routes, "hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_two_processes_initialising_at_once_end_consistent(tmp_path: Path) -> None:
    server, url = serve_bytes({"/kite": KITE_CSV, "/angel": ANGEL_JSON})
    script = textwrap.dedent("""
        import sys, ttconnect as tt
        broker, url, cache = sys.argv[1:4]
        c = tt.TTConnect(broker, cache_dir=cache, instruments_url=url)
        opt = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type="CE")
        print(c.resolve(opt))
    """)
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", script, broker, url + path, str(tmp_path)], cwd=HERE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for broker, path in (("zerodha", "/kite"), ("angelone", "/angel"), ("zerodha", "/kite"), ("angelone", "/angel"))
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        server.shutdown()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1].decode()[-500:] for o in outputs]
    assert [o[0].decode().strip() for o in outputs] == ["13364994", "52207", "13364994", "52207"]
    db = sqlite3.connect(tmp_path / "instruments.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert dict(db.execute("SELECT broker_id, COUNT(*) FROM broker_tokens GROUP BY broker_id")) == {"zerodha": 30, "angelone": 30}
    assert db.execute("SELECT COUNT(*) FROM instruments").fetchone()[0] == 30
    db.close()
    # The lock made the late starters reuse the fresh DB instead of downloading again.
    hits = server.RequestHandlerClass.hits
    assert sorted(hits) == ["/angel", "/kite"]


def test_json_array_stream_survives_any_chunk_boundary() -> None:
    import io

    items = [{"token": str(i), "symbol": "A}B]" if i % 3 else "ÄÖ€\"x", "n": [1, {"z": "}"}]} for i in range(40)]
    raw = json.dumps(items, ensure_ascii=False, indent=1 if True else None).encode()
    for size in (1, 2, 3, 7, 64, 10_000):
        assert list(tt._iter_json_array(io.BytesIO(raw), chunk_size=size)) == items
    with pytest.raises(tt._MasterFormatError, match="truncated"):
        list(tt._iter_json_array(io.BytesIO(raw[:-5]), chunk_size=64))


# ============================================================================
# 6. Broker specs (REST: shared fixtures and one mocked API per broker)
# ============================================================================

TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
CREDS = {
    "zerodha": {"api_key": "kitekey01", "access_token": "kite-access-SECRET-1"},
    "angelone": {"api_key": "angelkey01", "client_id": "A123456", "pin": "4321", "totp_secret": TOTP_SECRET},
}
SCENARIO_DAY = ist(2026, 11, 23, 10, 0)


def fixture_text(broker: str, name: str) -> str:
    return (FIXTURES / broker / name).read_text()


def route_regex(broker: str, route: str) -> Any:
    import re

    spec_route = tt._BROKERS[broker]["routes"][route]
    method, path = spec_route.verb, spec_route.path
    pattern = re.escape(tt._BROKERS[broker]["urls"][spec_route.host] + path)
    pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/?]+", pattern)
    return method, re.compile(pattern + r"(\?.*)?$")


class MockApi:
    """A broker's REST API on ``responses``: each route answers its fixture unless told otherwise."""

    def __init__(self, rs: responses.RequestsMock, broker: str) -> None:
        self.rs, self.broker = rs, broker
        self.spec = tt._BROKERS[broker]

    def on(self, route: str, body: Any = None, status: int = 200, fixture: Optional[str] = None,
           callback: Any = None, **kwargs: Any) -> None:
        method, url = route_regex(self.broker, route)
        if callback is not None:
            self.rs.add_callback(method, url, callback=callback)
            return
        if body is None:
            body = fixture_text(self.broker, fixture or f"{route}.json")
        elif not isinstance(body, (str, bytes, Exception)):
            body = json.dumps(body)
        self.rs.add(method, url, body=body, status=status, **kwargs)

    def all(self, *skip: str) -> "MockApi":
        for route in self.spec["routes"]:
            if route not in skip and (FIXTURES / self.broker / f"{route}.json").exists():
                self.on(route)
        return self

    def calls(self, route: str) -> List[Any]:
        method, url = route_regex(self.broker, route)
        return [c for c in self.rs.calls if c.request.method == method and url.match(c.request.url)]


@pytest.fixture
def day_clock() -> FakeClock:
    return FakeClock(SCENARIO_DAY)


def rest_client(clients: list, broker: str, tmp_path: Path, clock: FakeClock, **config: Any) -> tt.TTConnect:
    body = KITE_CSV if broker == "zerodha" else ANGEL_JSON
    cfg = {**CREDS[broker], **config}
    return open_client(clients, broker, tmp_path, clock, body, **cfg)


def run_strategy(client: tt.TTConnect) -> Dict[str, Any]:
    """One broker-agnostic strategy: the same code for every broker."""
    ce = tt.Option(exchange=tt.Exchange.NFO, symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type=tt.OptionType.CE)
    ce_hi = tt.Option(exchange=tt.Exchange.NFO, symbol="NIFTY", expiry="2026-11-24", strike=23600, option_type=tt.OptionType.CE)
    out: Dict[str, Any] = {}
    order_id = client.place_order(ce, 65, tt.Side.BUY, tt.ProductType.NRML, tt.OrderType.LIMIT, price=120.50, tag="tt-strategy-1")
    out["placed"] = order_id
    out["modified"] = client.modify_order(order_id, price=121.0)
    out["order"] = client.get_order(order_id)
    out["cancelled"] = client.cancel_order(order_id)
    out["holdings"] = client.get_holdings()
    out["positions"] = client.get_positions()
    out["funds"] = client.get_funds()
    out["orders"] = client.get_orders()
    out["trades"] = client.get_trades()
    out["margin"] = client.calculate_margin([
        tt.OrderLeg(ce, 65, tt.Side.BUY, tt.ProductType.NRML, tt.OrderType.LIMIT, price=120.50),
        {"instrument": ce_hi, "qty": 65, "side": "SELL", "product": "NRML", "order_type": "LIMIT", "price": 80.0},
    ])
    out["profile"] = client.get_profile()
    return out


def canonical(value: Any) -> Any:
    """Drop what is broker-specific by nature (ids, raw payloads) so results compare across brokers."""
    import dataclasses

    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, tuple) and all(isinstance(v, enum.Enum) for v in value):
        return sorted(v.value for v in value)  # a set in all but type
    if dataclasses.is_dataclass(value) and not isinstance(value, tt._Instrument):
        skip = {"raw", "id", "order_id", "trade_id", "user_id", "broker", "exchanges"}
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in skip}
    return value


def test_same_strategy_runs_unchanged_on_both_brokers(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    results = {}
    for broker in ("zerodha", "angelone"):
        client = rest_client(clients, broker, tmp_path / broker, day_clock)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            api = MockApi(rs, broker).all()
            results[broker] = run_strategy(client)
    kite, angel = results["zerodha"], results["angelone"]
    assert kite["placed"] == kite["modified"] == kite["cancelled"] == "1993504512367362048"
    assert angel["placed"] == angel["modified"] == angel["cancelled"] == "261123000104562"
    # Real values from the real-shaped payloads, the same on both brokers.
    for res in (kite, angel):
        assert res["funds"] == tt.Fund(available=100000.0, used=25000.0, total=125000.0, collateral=5000.0,
                                       m2m_unrealized=1200.5, m2m_realized=-300.25, utilised_debits=25000.0)
        assert [(str(h.instrument), h.qty, h.avg_price, h.ltp, h.pnl) for h in res["holdings"]] == [
            ("NSE:RELIANCE", 10, 2400.0, 2450.0, 500.0), ("NSE:SBIN", 5, 800.0, 790.0, -50.0)]
        assert res["holdings"][0].pnl_percent == pytest.approx(2.0833333)
        assert [(str(p.instrument), p.qty, p.avg_price, p.product) for p in res["positions"]] == [
            ("NFO:NIFTY 2026-11-24 23500 CE", 65, 120.5, tt.ProductType.NRML),
            ("NFO:BANKNIFTY FUT 2026-11-24", -30, 52100.0, tt.ProductType.NRML)]
        assert [o.status for o in res["orders"]] == [
            tt.OrderStatus.OPEN, tt.OrderStatus.COMPLETE, tt.OrderStatus.TRIGGER_PENDING, tt.OrderStatus.REJECTED,
            tt.OrderStatus.PARTIALLY_FILLED, tt.OrderStatus.CANCELLED]
        sl = res["orders"][2]
        assert (sl.order_type, sl.price, sl.trigger_price, sl.product) == (tt.OrderType.SL, 2500.0, 2495.0, tt.ProductType.MIS)
        partial = res["orders"][4]
        assert (partial.qty, partial.filled_qty, partial.pending_qty) == (130, 65, 65)
        assert res["orders"][0].placed_at == ist(2026, 11, 23, 9, 20, 5)
        assert [(t.qty, t.avg_price, t.trade_value, t.timestamp) for t in res["trades"]] == [
            (5, 790.0, 3950.0, ist(2026, 11, 23, 9, 25, 10)), (65, 90.0, 5850.0, ist(2026, 11, 23, 9, 41, 2))]
        m = res["margin"]
        assert (m.total, m.final_total, m.benefit, m.span, m.option_premium) == (96504.98, 34786.73, 61718.25, 66832.5, 521.25)
        assert res["order"].tag == "tt-strategy-1" and res["order"].status is tt.OrderStatus.OPEN
        assert res["profile"].name == "Test User" and tt.Exchange.NFO in res["profile"].exchanges
    assert kite["margin"].exposure == 29151.23 and angel["margin"].exposure is None  # AngelOne gives no exposure
    for key in kite:
        if key not in ("placed", "modified", "cancelled", "margin"):
            assert canonical(kite[key]) == canonical(angel[key]), key


def test_reverse_lookup_index_is_built_on_first_use(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    db = sqlite3.connect(tmp_path / "instruments.db")
    indexes = "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'ix_broker_tokens_symbol'"
    assert db.execute(indexes).fetchall() == []  # a refresh does not pay for it
    with responses.RequestsMock() as rs:
        MockApi(rs, "zerodha").on("get_positions")
        positions = kite.get_positions()
    assert db.execute(indexes).fetchall() == [("ix_broker_tokens_symbol",)]
    assert str(positions[0].instrument) == "NFO:NIFTY 2026-11-24 23500 CE"
    plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT instrument_id FROM broker_tokens WHERE broker_symbol = 'X'"))
    assert "ix_broker_tokens_symbol" in plan
    db.close()


def test_request_shapes_follow_each_broker(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    from urllib.parse import parse_qs

    kite = rest_client(clients, "zerodha", tmp_path / "k", day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha").all()
        sbin = tt.Equity(exchange="NSE", symbol="SBIN")
        kite.place_order(sbin, 5, "SELL", "CNC", "MARKET", tag="exit1")
        kite.place_order(sbin, 5, "BUY", "MIS", "SL", price=801.05, trigger_price=800.5)
        market, stop = [parse_qs(c.request.body) for c in api.calls("place_order")]
        assert market == {"tradingsymbol": ["SBIN"], "exchange": ["NSE"], "transaction_type": ["SELL"],
                          "order_type": ["MARKET"], "quantity": ["5"], "product": ["CNC"], "validity": ["DAY"],
                          "tag": ["exit1"], "market_protection": ["-1"]}
        assert stop["order_type"] == ["SL"] and stop["price"] == ["801.05"] and stop["trigger_price"] == ["800.5"]
        assert "market_protection" not in stop and len(stop["tag"][0]) <= 20
        req = api.calls("place_order")[0].request
        assert req.url.endswith("/orders/regular")
        assert req.headers["Authorization"] == "token kitekey01:kite-access-SECRET-1"
        assert req.headers["X-Kite-Version"] == "3"
        kite.calculate_margin([tt.OrderLeg(sbin, 5, tt.Side.BUY, tt.ProductType.CNC, tt.OrderType.LIMIT, price=800.0)])
        margin_req = api.calls("calculate_margin")[0].request
        assert "consider_positions=true" in margin_req.url
        assert json.loads(margin_req.body) == [{"exchange": "NSE", "tradingsymbol": "SBIN", "transaction_type": "BUY",
                                                "variety": "regular", "product": "CNC", "order_type": "LIMIT",
                                                "quantity": 5, "price": 800.0, "trigger_price": 0.0}]
    angel = rest_client(clients, "angelone", tmp_path / "a", day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "angelone").all()
        opt = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type="CE")
        angel.place_order(opt, 130, "SELL", "NRML", "SL_M", trigger_price=99.95, tag="stop-1")
        body = json.loads(api.calls("place_order")[0].request.body)
        assert body == {"variety": "STOPLOSS", "tradingsymbol": "NIFTY24NOV2623500CE", "symboltoken": "52207",
                        "transactiontype": "SELL", "exchange": "NFO", "ordertype": "STOPLOSS_MARKET",
                        "producttype": "CARRYFORWARD", "duration": "DAY", "price": "0", "triggerprice": "99.95",
                        "quantity": "130", "squareoff": "0", "stoploss": "0", "ordertag": "stop-1"}
        login = api.calls("login")[0].request
        import pyotp

        assert json.loads(login.body) == {"clientcode": "A123456", "password": "4321",
                                          "totp": pyotp.TOTP(TOTP_SECRET).at(day_clock())}
        headers = api.calls("place_order")[0].request.headers
        assert headers["X-PrivateKey"] == "angelkey01" and headers["X-UserType"] == "USER"
        assert headers["Authorization"].startswith("Bearer eyJ") and not headers["Authorization"].startswith("Bearer Bearer")
        assert "Authorization" not in login.headers


KITE_STATUSES = {  # Kite notes section 5
    "OPEN": "OPEN", "TRIGGER PENDING": "TRIGGER_PENDING", "COMPLETE": "COMPLETE", "CANCELLED": "CANCELLED",
    "REJECTED": "REJECTED", "PUT ORDER REQ RECEIVED": "PENDING", "VALIDATION PENDING": "PENDING",
    "OPEN PENDING": "PENDING", "MODIFY VALIDATION PENDING": "OPEN", "MODIFY PENDING": "OPEN", "MODIFIED": "OPEN",
    "CANCEL PENDING": "OPEN", "AMO REQ RECEIVED": "PENDING", "UPDATE": "OPEN",
}
ANGEL_STATUSES = {  # AngelOne notes section 5.2 (lower case on the wire)
    "open": "OPEN", "complete": "COMPLETE", "cancelled": "CANCELLED", "rejected": "REJECTED",
    "trigger pending": "TRIGGER_PENDING", "open pending": "PENDING", "validation pending": "PENDING",
    "put order req received": "PENDING", "modify validation pending": "OPEN", "modify pending": "OPEN",
    "modified": "OPEN", "not modified": "OPEN", "cancel pending": "OPEN", "not cancelled": "OPEN",
    "after market order req received": "PENDING", "modify after market order req received": "PENDING",
    "cancelled after market order": "CANCELLED",
}


@pytest.mark.parametrize("table, statuses", [(tt._KITE_STATUSES, KITE_STATUSES), (tt._ANGEL_STATUSES, ANGEL_STATUSES)])
def test_every_documented_status_maps(table: Any, statuses: Dict[str, str], caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="ttconnect")
    for raw, expected in statuses.items():
        assert tt._order_status(raw, table, 0, 10).value == expected, raw
    assert not caplog.records  # none fell through to "unknown"
    assert tt._order_status("OPEN" if table is tt._KITE_STATUSES else "open", table, 4, 10) is tt.OrderStatus.PARTIALLY_FILLED
    assert tt._order_status("SOMETHING NEW", table, 0, 10) is tt.OrderStatus.PENDING  # unknown: not terminal
    assert any("unknown order status" in r.getMessage() for r in caplog.records)


INVALID_ORDERS = [
    (dict(instrument=tt.Index(exchange="NSE", symbol="NIFTY")), tt.InvalidOrderError, "indices cannot be traded"),
    (dict(product="CNC"), tt.InvalidOrderError, "CNC is for cash"),
    (dict(qty=100), tt.InvalidOrderError, "multiple of the lot size 65"),
    (dict(qty=0), tt.InvalidOrderError, "positive whole number"),
    (dict(qty=65.0), tt.InvalidOrderError, "positive whole number"),
    (dict(price=120.52), tt.InvalidOrderError, "not a multiple of the tick size 0.05"),
    (dict(price=None), tt.InvalidOrderError, "LIMIT orders need a price"),
    (dict(price=-1), tt.InvalidOrderError, "must be positive"),
    (dict(order_type="MARKET"), tt.InvalidOrderError, "MARKET orders take no price"),
    (dict(trigger_price=119.0), tt.InvalidOrderError, "LIMIT orders take no trigger_price"),
    (dict(order_type="SL"), tt.InvalidOrderError, "SL orders need a trigger_price"),
    (dict(order_type="SL", trigger_price=125.0), tt.InvalidOrderError, "trigger 125.0 > price"),
    (dict(tag="x" * 21), tt.InvalidOrderError, "tag must be 1-"),
    (dict(tag="has space"), tt.InvalidOrderError, "tag must be 1-"),
    (dict(side="HOLD"), tt.InvalidOrderError, "side 'HOLD' is not valid"),
    (dict(validity="GTC"), tt.InvalidOrderError, "validity 'GTC'"),
    (dict(product="BO"), tt.InvalidOrderError, "product 'BO' is not valid"),
]


@pytest.mark.parametrize("broker", ["zerodha", "angelone"])
@pytest.mark.parametrize("change, error, words", INVALID_ORDERS)
def test_invalid_orders_fail_before_any_request(broker: str, change: Dict[str, Any], error: type, words: str,
                                                tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = rest_client(clients, broker, tmp_path, day_clock)
    order = dict(instrument=tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type="CE"),
                 qty=65, side="BUY", product="NRML", order_type="LIMIT", price=120.5)
    order.update(change)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(error) as info:
            client.place_order(**order)
        assert len(rs.calls) == 0
    assert words in str(info.value)


def test_unsupported_segment_fails_before_any_request(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    gold = tt.Future(exchange="MCX", symbol="GOLD", expiry="2026-12-04")  # built before any client is open
    client = rest_client(clients, "zerodha", tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.UnsupportedFeatureError, match="MCX"):
            client.place_order(gold, 1, "BUY", "NRML", "MARKET")
        assert len(rs.calls) == 0


def test_kite_tag_limit_is_20_and_angel_19(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    sbin = tt.Equity(exchange="NSE", symbol="SBIN")
    kite = rest_client(clients, "zerodha", tmp_path / "k", day_clock)
    angel = rest_client(clients, "angelone", tmp_path / "a", day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, "zerodha").all()
        assert kite.place_order(sbin, 1, "BUY", "CNC", "MARKET", tag="a" * 20) == "1993504512367362048"
        with pytest.raises(tt.InvalidOrderError):
            angel.place_order(sbin, 1, "BUY", "CNC", "MARKET", tag="a" * 20)


# ============================================================================
# 7. Transport
# ============================================================================

def check_reply(spec: Any, route: str, resp: Any) -> Any:
    return tt._check_reply(spec, route, spec["routes"][route], resp)


KITE_ERRORS = [
    ("TokenException", 403, "get_profile", tt.AuthenticationError),
    ("PermissionException", 403, "get_profile", tt.AuthenticationError),
    ("UserException", 403, "get_profile", tt.AuthenticationError),
    ("TwoFAException", 403, "get_profile", tt.AuthenticationError),
    ("InputException", 400, "get_profile", tt.BrokerError),
    ("InputException", 400, "place_order", tt.InvalidOrderError),
    ("OrderException", 500, "place_order", tt.OrderError),
    ("MarginException", 400, "place_order", tt.InsufficientFundsError),
    ("HoldingException", 400, "place_order", tt.InsufficientFundsError),
    ("NetworkException", 429, "get_orders", tt.RateLimitError),
    ("NetworkException", 503, "get_orders", tt.NetworkError),
    ("DataException", 502, "get_orders", tt.BrokerError),
    ("GeneralException", 500, "get_orders", tt.BrokerError),
    ("SomethingNewException", 400, "get_orders", tt.BrokerError),
]
ANGEL_ERRORS = [
    ("AG8001", "get_positions", tt.AuthenticationError), ("AG8002", "get_positions", tt.AuthenticationError),
    ("AG8003", "get_positions", tt.AuthenticationError), ("AG8004", "get_positions", tt.AuthenticationError),
    ("AB8050", "renew_token", tt.AuthenticationError), ("AB8051", "renew_token", tt.AuthenticationError),
    ("AB1000", "login", tt.AuthenticationError), ("AB1001", "login", tt.AuthenticationError),
    ("AB1002", "login", tt.AuthenticationError), ("AB1003", "login", tt.BrokerError),
    ("AB1004", "get_positions", tt.BrokerError), ("AB1005", "get_positions", tt.ConfigurationError),
    ("AB1006", "login", tt.BrokerError), ("AB1007", "place_order", tt.BrokerError),
    ("AB1008", "place_order", tt.InvalidOrderError), ("AB1009", "place_order", tt.InstrumentNotFoundError),
    ("AB1010", "get_positions", tt.AuthenticationError), ("AB1011", "get_positions", tt.AuthenticationError),
    ("AB1012", "place_order", tt.InvalidOrderError), ("AB1013", "cancel_order", tt.OrderNotFoundError),
    ("AB1014", "get_profile", tt.BrokerError), ("AB1015", "get_profile", tt.BrokerError),
    ("AB1016", "get_profile", tt.BrokerError), ("AB1017", "place_order", tt.OrderError),
    ("AB1018", "place_order", tt.InstrumentNotFoundError), ("AB1031", "login", tt.AuthenticationError),
    ("AB1032", "login", tt.AuthenticationError), ("AB2000", "get_positions", tt.BrokerError),
    ("AB2001", "get_positions", tt.BrokerError), ("AB2002", "place_order", tt.OrderError),
    ("AB4008", "place_order", tt.InvalidOrderError), ("AB1050", "login", tt.AuthenticationError),
    ("AB1021", "get_positions", tt.RateLimitError), ("AB4018", "place_order", tt.InstrumentNotFoundError),
]


@pytest.mark.parametrize("code, status, route, expected", KITE_ERRORS)
def test_kite_error_types_map_to_documented_exceptions(code: str, status: int, route: str, expected: type) -> None:
    body = json.dumps({"status": "error", "message": "Something went wrong", "data": None, "error_type": code})
    with pytest.raises(tt.TTConnectError) as info:
        check_reply(tt._ZERODHA, route, tt._Response(status, {}, body))
    assert type(info.value) is expected
    assert info.value.broker_code == code and info.value.http_status == status
    assert f"HTTP {status}" in str(info.value) and "Something went wrong" in str(info.value)


@pytest.mark.parametrize("code, route, expected", ANGEL_ERRORS)
def test_angel_error_codes_map_to_documented_exceptions(code: str, route: str, expected: type) -> None:
    for body in ({"status": False, "message": "Some failure", "errorcode": code, "data": None},
                 {"success": False, "message": "Some failure", "errorCode": code, "data": ""}):
        with pytest.raises(tt.TTConnectError) as info:
            check_reply(tt._ANGELONE, route, tt._Response(200, {}, json.dumps(body)))
        assert type(info.value) is expected and info.value.broker_code == code
    assert tt._ANGELONE["errors"].get(code, expected) is expected


def test_every_documented_code_has_a_mapping() -> None:
    documented_kite = {"TokenException", "PermissionException", "UserException", "TwoFAException", "InputException",
                       "OrderException", "MarginException", "HoldingException", "NetworkException", "DataException",
                       "GeneralException"}
    assert documented_kite <= set(tt._ZERODHA["errors"])
    documented_angel = {"AG8001", "AG8002", "AG8003", "AG8004", "AB8050", "AB8051"} | {
        f"AB{n}" for n in (1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                           1015, 1016, 1017, 1018, 1031, 1032, 2000, 2001, 2002, 4008, 1050, 1021, 4018)}
    assert documented_angel <= set(tt._ANGELONE["errors"])


def test_fixture_error_bodies_map(tmp_path: Path) -> None:
    cases = [
        ("zerodha", "error.token_exception.json", 403, "get_orders", tt.AuthenticationError),
        ("zerodha", "place_order.margin_exception.json", 400, "place_order", tt.InsufficientFundsError),
        ("zerodha", "place_order.input_exception.json", 400, "place_order", tt.InvalidOrderError),
        ("zerodha", "get_order_history.order_not_found.json", 500, "get_order_history", tt.OrderNotFoundError),
        ("angelone", "error.AG8001.json", 200, "get_orders", tt.AuthenticationError),
        ("angelone", "place_order.AB4008.json", 200, "place_order", tt.InvalidOrderError),
        ("angelone", "login.AB1050.json", 200, "login", tt.AuthenticationError),
    ]
    for broker, name, status, route, expected in cases:
        with pytest.raises(expected):
            check_reply(tt._BROKERS[broker], route, tt._Response(status, {}, fixture_text(broker, name)))


@pytest.mark.parametrize("status, body, headers, expected, words", [
    (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", {}, tt.BrokerError, "HTTP 502 with a non-JSON body: <html>"),
    (200, "", {}, tt.BrokerError, "empty response body with HTTP 200"),
    (503, "", {}, tt.BrokerError, "empty response body with HTTP 503"),
    (403, "Access denied because of exceeding access rate", {}, tt.RateLimitError, "rate limited (HTTP 403"),
    (429, "Too many requests", {"Retry-After": "3"}, tt.RateLimitError, "rate limited (HTTP 429"),
    (200, '{"status": false, "message": "Internal Error", "errorcode": "AB2001", "data": null}', {}, tt.BrokerError, "AB2001"),
    (200, '{"message": "IP not allowed", "data": null}', {}, tt.BrokerError, "without a status"),
    (200, '["not", "an", "envelope"]', {}, tt.BrokerError, "unexpected JSON body"),
])
def test_non_json_and_odd_bodies_become_clear_errors(status: int, body: str, headers: Dict[str, str], expected: type, words: str) -> None:
    with pytest.raises(tt.TTConnectError) as info:
        check_reply(tt._ANGELONE, "get_orders", tt._Response(status, headers, body))
    assert type(info.value) is expected and words in str(info.value)
    assert info.value.http_status == status
    assert info.value.retryable is (expected is tt.RateLimitError or status >= 500 or "AB2001" in body)
    if headers:
        assert info.value.retry_after == 3.0


def test_environment_proxies_are_honoured_once_per_host(monkeypatch: Any) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "api.kite.trade")
    transport = tt._Transport(7.0, 2, lambda s: None)
    assert transport._proxies("https://apiconnect.angelone.in/rest/x")["https"] == "http://proxy.example:3128"
    assert transport._proxies("https://api.kite.trade/orders") == {}  # NO_PROXY
    assert transport.session().trust_env is False  # ~/.netrc can never replace the broker's Authorization


def test_safe_calls_retry_with_backoff_and_retry_after(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, max_retries=3)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "zerodha")
        api.on("get_positions", body=requests.ConnectionError("connection reset"))
        api.on("get_positions", body="<html>503</html>", status=503)
        api.on("get_positions", body=json.dumps({"status": "error", "error_type": "NetworkException",
                                                  "message": "Too many requests"}), status=429, headers={"Retry-After": "3"})
        api.on("get_positions")
        positions = kite.get_positions()
    assert len(positions) == 2
    assert day_clock.slept == [0.5, 1.0, 3.0]  # backoff, backoff, then the server's Retry-After


def test_rate_limiter_windows(day_clock: FakeClock) -> None:
    limiter = tt._RateLimiter({"default": [(1, 1.0)], "orders": [(9, 1.0), (500, 60.0)]}, day_clock, day_clock.sleep)
    start = day_clock()
    for _ in range(10):
        limiter.acquire("orders")
    assert day_clock.slept == [pytest.approx(1.0)]  # the 10th call waits for the 1-second window
    assert day_clock() - start == pytest.approx(1.0)
    for _ in range(3):
        limiter.acquire("unknown-class")  # falls back to default: 1/s
    assert sum(day_clock.slept) == pytest.approx(3.0)


def test_angel_place_modify_cancel_share_one_budget(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock)
    routes = {spec.rate for name, spec in tt._ANGELONE["routes"].items() if name in ("place_order", "modify_order", "cancel_order")}
    assert routes == {"orders"} and tt._ANGELONE["rate_limits"]["orders"][0] == (9, 1.0)
    sbin = tt.Equity(exchange="NSE", symbol="SBIN")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, "angelone").all()
        angel.get_profile()  # logs in first
        day_clock.slept.clear()
        for _ in range(12):
            angel.place_order(sbin, 1, "BUY", "CNC", "MARKET")
    assert sum(day_clock.slept) == pytest.approx(1.0)  # calls 10-12 wait for the next second


# -- orders are never placed twice ---------------------------------------------------------


def _accept_then(failure: Any, book: List[Dict[str, Any]], broker: str) -> Any:
    """A broker that files the order, then fails to answer."""

    def callback(request: Any) -> Any:
        if broker == "zerodha":
            from urllib.parse import parse_qs

            tag = parse_qs(request.body)["tag"][0]
        else:
            tag = json.loads(request.body)["ordertag"]
        book.append({"tag": tag})
        if isinstance(failure, Exception):
            raise failure
        return failure

    return callback


def _book_with(broker: str, tags: List[str]) -> str:
    payload = json.loads(fixture_text(broker, "get_orders.json"))
    rows = payload["data"]
    for row, tag in zip(rows, tags):
        row["tag" if broker == "zerodha" else "ordertag"] = tag
    return json.dumps(payload)


@pytest.mark.parametrize("broker", ["zerodha", "angelone"])
@pytest.mark.parametrize("failure", ["timeout", "connection_drop", "http_502"])
def test_an_accepted_order_that_times_out_is_found_not_resent(broker: str, failure: str, tmp_path: Path,
                                                              day_clock: FakeClock, clients: list) -> None:
    client = rest_client(clients, broker, tmp_path, day_clock)
    book: List[Dict[str, Any]] = []
    kind = {"timeout": requests.exceptions.ReadTimeout("read timed out"),
            "connection_drop": requests.exceptions.ConnectionError("Connection aborted: RemoteDisconnected"),
            "http_502": (502, {}, "<html>Bad Gateway</html>")}[failure]
    sbin = tt.Equity(exchange="NSE", symbol="SBIN")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.all("place_order", "get_orders")
        api.on("place_order", callback=_accept_then(kind, book, broker))

        def order_book(request: Any) -> Any:
            return 200, {}, _book_with(broker, [row["tag"] for row in book])

        api.on("get_orders", callback=order_book)
        order_id = client.place_order(sbin, 5, "SELL", "CNC", "MARKET")
        assert len(api.calls("place_order")) == 1  # sent once, never again
    assert len(book) == 1 and book[0]["tag"].startswith("tt")
    expected = json.loads(fixture_text(broker, "get_orders.json"))["data"][0]
    assert order_id == str(expected["order_id" if broker == "zerodha" else "orderid"])


def test_an_ambiguous_failure_with_no_order_found_is_not_resent(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha")
        api.on("place_order", body=requests.exceptions.ReadTimeout("read timed out"))
        api.on("get_orders")  # the order book does not hold our tag
        with pytest.raises(tt.OrderError) as info:
            kite.place_order(tt.Equity(exchange="NSE", symbol="SBIN"), 5, "SELL", "CNC", "MARKET", tag="mytag1")
        assert len(api.calls("place_order")) == 1 and len(api.calls("get_orders")) == 4
    assert "mytag1" in str(info.value) and "most likely not placed" in str(info.value)
    assert info.value.retryable is False
    assert day_clock.slept == [0.5, 1.0, 2.0]  # the book is read over ~3.5 s


def test_an_ambiguous_failure_with_an_unreadable_book_says_do_not_replace(tmp_path: Path, day_clock: FakeClock,
                                                                          clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, max_retries=0)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha")
        api.on("place_order", body=requests.exceptions.ReadTimeout("read timed out"))
        api.on("get_orders", body=requests.exceptions.ConnectionError("network is unreachable"))
        with pytest.raises(tt.OrderError) as info:
            kite.place_order(tt.Equity(exchange="NSE", symbol="SBIN"), 5, "SELL", "CNC", "MARKET", tag="mytag2")
        assert len(api.calls("place_order")) == 1
    assert "could not be read" in str(info.value) and "Do NOT place it again" in str(info.value)
    assert "most likely not placed" not in str(info.value)


def test_one_early_read_of_the_book_is_not_proof_of_absence(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, max_retries=0)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha")
        api.on("place_order", body=requests.exceptions.ReadTimeout("read timed out"))
        api.on("get_orders")  # read at once, before the OMS lists the order...
        api.on("get_orders", body=requests.exceptions.ConnectionError("network is unreachable"))  # ...then no more
        with pytest.raises(tt.OrderError, match="Do NOT place it again"):
            kite.place_order(tt.Equity(exchange="NSE", symbol="SBIN"), 5, "SELL", "CNC", "MARKET", tag="mytag3")


def test_a_connection_that_never_opened_is_retried_for_orders(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    import urllib3

    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    refused = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(
        None, "/orders/regular", urllib3.exceptions.NewConnectionError(None, "Connection refused")))
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "zerodha")
        api.on("place_order", body=refused)
        api.on("place_order")
        assert kite.place_order(tt.Equity(exchange="NSE", symbol="SBIN"), 5, "SELL", "CNC", "MARKET") == "1993504512367362048"
        assert len(api.calls("place_order")) == 2


def test_cancel_all_and_close_all(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    from urllib.parse import parse_qs

    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha")
        api.on("get_orders")
        api.on("get_positions")
        cancelled_urls: List[str] = []

        def cancel(request: Any) -> Any:
            cancelled_urls.append(request.url)
            if request.url.endswith("1993509757441089536"):
                return 400, {}, fixture_text("zerodha", "cancel_order.order_exception.json")
            return 200, {}, json.dumps({"status": "success", "data": {"order_id": request.url.rsplit("/", 1)[1]}})

        api.on("cancel_order", callback=cancel)
        api.on("place_order")
        cancelled, failed = kite.cancel_all_orders()
        assert cancelled == ["1993504512367362048", "1993507134982946816"]  # OPEN and TRIGGER PENDING
        assert failed == ["1993509757441089536"]  # the partly filled one, refused by the broker
        assert all("/orders/regular/" in url for url in cancelled_urls)
        placed, failed = kite.close_all_positions()
        assert placed == ["1993504512367362048", "1993504512367362048"] and failed == []
        bodies = [parse_qs(c.request.body) for c in api.calls("place_order")]
        assert [(b["tradingsymbol"][0], b["transaction_type"][0], b["quantity"][0], b["product"][0], b["order_type"][0])
                for b in bodies] == [("NIFTY26NOV23500CE", "SELL", "65", "NRML", "MARKET"),
                                     ("BANKNIFTY26NOVFUT", "BUY", "30", "NRML", "MARKET")]
        assert all(b["market_protection"] == ["-1"] for b in bodies)


def test_kill_switches_cover_pending_orders_and_unloaded_segments(tmp_path: Path, day_clock: FakeClock,
                                                                   clients: list, caplog: Any) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    orders = json.loads(fixture_text("zerodha", "get_orders.json"))
    amo = dict(orders["data"][0], order_id="2000000000000000001", status="AMO REQ RECEIVED", variety="amo")
    gold = dict(orders["data"][0], order_id="2000000000000000002", exchange="MCX", tradingsymbol="GOLD26DECFUT",
                instrument_token=58424839, status="OPEN", variety="regular")
    orders["data"] += [amo, gold]
    positions = json.loads(fixture_text("zerodha", "get_positions.json"))
    positions["data"]["net"].append(dict(positions["data"]["net"][0], exchange="MCX", tradingsymbol="GOLD26DECFUT",
                                         quantity=1, product="NRML"))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha")
        api.on("get_orders", body=orders)
        api.on("get_positions", body=positions)
        api.on("cancel_order", callback=lambda r: (200, {}, json.dumps({"status": "success", "data": {}})))
        api.on("place_order")
        cancelled, failed = kite.cancel_all_orders()
        assert cancelled == ["1993504512367362048", "1993507134982946816", "1993509757441089536",
                             "2000000000000000001", "2000000000000000002"] and failed == []
        urls = [c.request.url.split("/orders/")[1] for c in api.calls("cancel_order")]
        assert "amo/2000000000000000001" in urls and "regular/2000000000000000002" in urls
        placed, failed = kite.close_all_positions()
        assert len(placed) == 2 and failed == ["MCX:GOLD26DECFUT"]
    assert any("close it in the broker's app" in r.getMessage() for r in caplog.records)


def test_modify_applies_stop_rules_and_tolerates_broker_float_noise(tmp_path: Path, day_clock: FakeClock,
                                                                    clients: list) -> None:
    from urllib.parse import parse_qs

    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    history = json.loads(fixture_text("zerodha", "get_order_history.json"))
    history["data"][-1]["price"] = 120.50000000000001  # a float as Kite may send it
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha")
        api.on("get_order_history", callback=lambda request: (200, {}, json.dumps(history)))
        api.on("modify_order")
        kite.modify_order("1993504512367362048", qty=130)
        assert parse_qs(api.calls("modify_order")[0].request.body)["price"] == ["120.5"]
        with pytest.raises(tt.InvalidOrderError, match="stop-loss BUY triggers at or below"):
            kite.modify_order("1993504512367362048", order_type="SL", trigger_price=150.0)
        assert len(api.calls("modify_order")) == 1
        # A price really off the master's tick (the tick changed since the last refresh) is kept as
        # the broker has it: changing the quantity must not move the price.
        history["data"][-1]["price"] = 120.52
        kite.modify_order("1993504512367362048", qty=65)
        assert parse_qs(api.calls("modify_order")[1].request.body)["price"] == ["120.52"]


def test_modify_checks_the_new_price_and_keeps_the_rest(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    from urllib.parse import parse_qs

    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha").all()
        with pytest.raises(tt.InvalidOrderError, match="tick"):
            kite.modify_order("1993504512367362048", price=121.03)
        assert api.calls("modify_order") == []
        kite.modify_order("1993504512367362048", qty=130)
        body = parse_qs(api.calls("modify_order")[0].request.body)
        assert body == {"order_type": ["LIMIT"], "quantity": ["130"], "price": ["120.5"]}
        kite.modify_order("1993504512367362048", order_type=tt.OrderType.MARKET)
        body = parse_qs(api.calls("modify_order")[1].request.body)
        assert body == {"order_type": ["MARKET"], "quantity": ["65"], "market_protection": ["-1"]}


# ============================================================================
# 8. Auth & session stores
# ============================================================================


def test_zerodha_request_token_is_exchanged_and_stored(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        api = MockApi(rs, "zerodha")
        api.on("login")
        client = tt.TTConnect("zerodha", {"api_key": "kitekey01", "api_secret": "kite-api-SECRET",
                                          "request_token": "req-TOKEN-1", "cache_dir": str(tmp_path),
                                          "cache_session": True}, clock=day_clock, sleep=day_clock.sleep)
        clients.append(client)
        from urllib.parse import parse_qs

        sent = parse_qs(api.calls("login")[0].request.body)
    checksum = hashlib.sha256(b"kitekey01req-TOKEN-1kite-api-SECRET").hexdigest()
    assert sent == {"api_key": ["kitekey01"], "request_token": ["req-TOKEN-1"], "checksum": [checksum]}
    path = tmp_path / "zerodha_session.json"
    stored = json.loads(path.read_text())
    login = json.loads(fixture_text("zerodha", "login.json"))["data"]
    assert stored["access_token"] == login["access_token"] and stored["broker"] == "zerodha" and stored["mode"] == "manual"
    assert stored["expires_at"] == "2026-11-24T06:00:00+05:30"  # 06:00 IST the next day
    assert stored["obtained_at"] == "2026-11-23T10:00:00+05:30"
    assert (path.stat().st_mode & 0o777) == 0o600
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "zerodha")
        api.on("get_profile")
        client.get_profile()
        assert api.calls("get_profile")[0].request.headers["Authorization"] == f"token kitekey01:{login['access_token']}"


def test_a_reused_request_token_config_reuses_the_stored_session(tmp_path: Path, day_clock: FakeClock,
                                                                  clients: list) -> None:
    config = {"api_key": "kitekey01", "api_secret": "kite-api-SECRET", "request_token": "req-TOKEN-1",
              "cache_dir": str(tmp_path), "cache_session": True}
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        MockApi(rs, "zerodha").on("login")
        clients.append(tt.TTConnect("zerodha", config, clock=day_clock))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:  # a notebook cell run again
        second = tt.TTConnect("zerodha", config, clock=day_clock)
        clients.append(second)
        assert len(rs.calls) == 0  # the single-use request_token is not sent twice
    login = json.loads(fixture_text("zerodha", "login.json"))["data"]
    assert second._auth.current().access_token == login["access_token"]


def test_login_url() -> None:
    assert tt.TTConnect.login_url("zerodha", {"api_key": "abc"}) == "https://kite.zerodha.com/connect/login?v=3&api_key=abc"
    assert tt.TTConnect.login_url("angelone", {"api_key": "k1", "redirect_url": "https://x.example/cb"}) == (
        "https://smartapi.angelone.in/publisher-login?api_key=k1&redirect_url=https%3A%2F%2Fx.example%2Fcb")
    with pytest.raises(tt.ConfigurationError, match="api_key"):
        tt.TTConnect.login_url("zerodha", {})


@pytest.mark.parametrize("obtained, rule, expected", [
    (ist(2026, 11, 23, 10, 0), (6, 0), ist(2026, 11, 24, 6, 0)),
    (ist(2026, 11, 23, 5, 0), (6, 0), ist(2026, 11, 23, 6, 0)),  # a token made before 06:00 dies that morning
    (ist(2026, 11, 23, 10, 0), (0, 0), ist(2026, 11, 24, 0, 0)),  # AngelOne: midnight
    (ist(2026, 11, 23, 2, 0), (3, 30), ist(2026, 11, 23, 3, 30)),  # Upstox: 03:30
])
def test_session_expiry_rules(obtained: dt.datetime, rule: Any, expected: dt.datetime) -> None:
    assert tt._session_expiry(obtained, rule) == expected


def test_auth_mode_the_broker_lacks_is_refused_at_init(tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        with pytest.raises(tt.UnsupportedFeatureError, match="zerodha does not support auth_mode 'auto'"):
            tt.TTConnect("zerodha", {"auth_mode": "auto", "cache_dir": str(tmp_path)})
        with pytest.raises(tt.ConfigurationError, match="'pin' must be a non-empty string"):
            tt.TTConnect("angelone", {"pin": 1234, "cache_dir": str(tmp_path)})


def test_missing_credentials_are_named_before_any_request(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, day_clock, KITE_CSV, access_token="tok-SECRET")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.ConfigurationError, match="needs config 'api_key'"):
            kite.get_profile()
        with pytest.raises(tt.ConfigurationError, match="'totp_secret'"):
            tt.TTConnect("angelone", {"api_key": "k", "client_id": "A1", "pin": "1234", "cache_dir": str(tmp_path)})
        with pytest.raises(tt.ConfigurationError, match="'client_id', 'pin', 'totp_secret'"):
            tt.TTConnect("angelone", {"api_key": "k", "auth_mode": "auto", "cache_dir": str(tmp_path)})
        assert len(rs.calls) == 0


def test_an_sdk_style_bearer_jwt_is_sent_with_one_prefix(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, auth_mode="manual", access_token="Bearer eyJabc.def")
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("get_funds")
        angel.get_funds()
        assert api.calls("get_funds")[0].request.headers["Authorization"] == "Bearer eyJabc.def"


@pytest.mark.parametrize("fixture, code", [("error.token_exception.json", "TokenException"),
                                           ("error.permission_exception.json", "PermissionException")])
def test_manual_token_refused_is_not_retried_and_says_how_to_log_in(fixture: str, code: str, tmp_path: Path,
                                                                     day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "zerodha")
        api.on("get_positions", fixture=fixture, status=403)
        with pytest.raises(tt.AuthenticationError) as info:
            kite.get_positions()
        assert len(api.calls("get_positions")) == 1
    assert info.value.broker_code == code and "request_token" in str(info.value)
    assert "kite.zerodha.com/connect/login?v=3&api_key=kitekey01" in str(info.value)


def test_angel_expired_token_is_renewed_once_and_the_call_retried(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_positions", fixture="error.AG8001.json")
        api.on("renew_token")
        api.on("get_positions")
        assert len(angel.get_positions()) == 2
        renew = api.calls("renew_token")[0].request
        login = json.loads(fixture_text("angelone", "login.json"))["data"]
        renewed = json.loads(fixture_text("angelone", "renew_token.json"))["data"]
        assert json.loads(renew.body) == {"refreshToken": login["refreshToken"]}
        assert renew.headers["Authorization"] == f"Bearer {login['jwtToken']}"
        assert api.calls("get_positions")[1].request.headers["Authorization"] == f"Bearer {renewed['jwtToken']}"
    stored = json.loads((tmp_path / "angelone_session.json").read_text())
    assert stored["access_token"] == renewed["jwtToken"] and stored["feed_token"] == renewed["feedToken"]
    assert stored["expires_at"] == "2026-11-24T00:00:00+05:30"


def test_angel_refused_renewal_falls_back_to_a_full_login(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_orders", fixture="error.AG8002.json")
        api.on("renew_token", fixture="renew_token.AB8050.json")
        api.on("login")
        api.on("get_orders")
        assert len(angel.get_orders()) == 6
        assert len(api.calls("login")) == 2 and len(api.calls("get_orders")) == 2


def test_a_relogin_without_login_credentials_names_them(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    tmp_path.mkdir(exist_ok=True)
    _write_session(tmp_path / "angelone_session.json", obtained_at="2026-11-23T09:00:00+05:30",
                   expires_at="2026-11-24T00:00:00+05:30")
    angel = open_client(clients, "angelone", tmp_path, day_clock, ANGEL_JSON, api_key="angelkey01", cache_session=True)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("get_orders", fixture="error.AG8001.json")
        api.on("renew_token", fixture="renew_token.AB8051.json")
        with pytest.raises(tt.ConfigurationError, match="'client_id', 'pin', 'totp_secret'"):
            angel.get_orders()


def test_auth_failure_after_recovery_is_raised_not_looped(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_orders", fixture="error.AG8001.json")
        api.on("renew_token")
        api.on("get_orders", fixture="error.AG8001.json")
        with pytest.raises(tt.AuthenticationError, match="AG8001"):
            angel.get_orders()
        assert len(api.calls("get_orders")) == 2


def _write_session(path: Path, **fields: Any) -> None:
    base = {"broker": "angelone", "mode": "auto", "access_token": "old-jwt-SECRET", "refresh_token": "old-refresh-SECRET",
            "feed_token": "old-feed-SECRET", "obtained_at": "2026-11-22T10:00:00+05:30", "expires_at": "2026-11-23T00:00:00+05:30",
            "app_key": "angelkey01", "user_id": "A123456"}
    base.update(fields)
    path.write_text(json.dumps(base))


@pytest.mark.parametrize("content", ["expired", "corrupt"])
def test_expired_or_corrupt_session_file_means_a_fresh_login(content: str, tmp_path: Path, day_clock: FakeClock,
                                                            clients: list, caplog: Any) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True)
    path = tmp_path / "angelone_session.json"
    if content == "expired":
        _write_session(path)
    else:
        path.write_text('{"broker": "angelone", "access_tok')
    caplog.set_level(logging.DEBUG, logger="ttconnect")
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_profile")
        angel.get_profile()
        assert api.calls("get_profile")[0].request.headers["Authorization"] != "Bearer old-jwt-SECRET"
    assert json.loads(path.read_text())["expires_at"] == "2026-11-24T00:00:00+05:30"
    if content == "corrupt":
        assert any("ignoring unreadable session file" in r.getMessage() for r in caplog.records)


def test_a_valid_session_file_is_reused_without_login(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    path = tmp_path / "angelone_session.json"
    tmp_path.mkdir(exist_ok=True)
    _write_session(path, obtained_at="2026-11-23T09:00:00+05:30", expires_at="2026-11-24T00:00:00+05:30")
    angel = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("get_funds")
        assert angel.get_funds().available == 100000.0
        assert api.calls("get_funds")[0].request.headers["Authorization"] == "Bearer old-jwt-SECRET"


def test_manual_mode_with_a_corrupt_session_file_and_no_token_is_a_clear_error(tmp_path: Path, day_clock: FakeClock,
                                                                               clients: list) -> None:
    (tmp_path / "zerodha_session.json").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "zerodha_session.json").write_text("not json at all")
    kite = open_client(clients, "zerodha", tmp_path, day_clock, KITE_CSV, api_key="kitekey01", cache_session=True)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.ConfigurationError) as info:
            kite.get_profile()
        assert len(rs.calls) == 0
    assert "log in at https://kite.zerodha.com/connect/login?v=3&api_key=kitekey01" in str(info.value)


def test_pluggable_session_store(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    class Vault:
        def __init__(self) -> None:
            self.saved: List[tt.SessionData] = []

        def load(self) -> Optional[tt.SessionData]:
            return self.saved[-1] if self.saved else None

        def save(self, session: tt.SessionData) -> None:
            self.saved.append(session)

        def clear(self) -> None:
            self.saved.clear()

    vault = Vault()
    angel = rest_client(clients, "angelone", tmp_path, day_clock, session_store=vault)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_profile")
        angel.get_profile()
    assert len(vault.saved) == 1 and vault.saved[0].feed_token and vault.saved[0].mode is tt.AuthMode.AUTO
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.ConfigurationError, match="session_store"):
            tt.TTConnect("angelone", {**CREDS["angelone"], "cache_dir": str(tmp_path), "session_store": object()})
        assert len(rs.calls) == 0


def test_no_secret_reaches_logs_reprs_or_errors(tmp_path: Path, day_clock: FakeClock, clients: list, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    errors: List[str] = []
    angel = rest_client(clients, "angelone", tmp_path / "a", day_clock, cache_session=True)
    kite = rest_client(clients, "zerodha", tmp_path / "k", day_clock, api_secret="kite-api-SECRET")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_positions", fixture="error.AG8001.json")
        api.on("renew_token")
        api.on("get_positions")
        api.on("place_order", fixture="place_order.AB4008.json")
        angel.get_positions()
        try:
            angel.place_order(tt.Equity(exchange="NSE", symbol="SBIN"), 1, "BUY", "CNC", "MARKET")
        except tt.TTConnectError as exc:
            errors.append(str(exc) + repr(exc))
        kapi = MockApi(rs, "zerodha")
        kapi.on("get_orders", fixture="error.token_exception.json", status=403)
        try:
            kite.get_orders()
        except tt.TTConnectError as exc:
            errors.append(str(exc) + repr(exc))
        session = angel._auth.current()
    login = json.loads(fixture_text("angelone", "login.json"))["data"]
    renewed = json.loads(fixture_text("angelone", "renew_token.json"))["data"]
    secrets = [TOTP_SECRET, "4321", "kite-access-SECRET-1", "kite-api-SECRET", login["jwtToken"], login["refreshToken"],
               login["feedToken"], renewed["jwtToken"], renewed["refreshToken"], renewed["feedToken"]]
    import pyotp

    secrets.append(pyotp.TOTP(TOTP_SECRET).at(day_clock()))
    texts = [r.getMessage() + repr(r.args) for r in caplog.records] + errors
    texts += [repr(angel), repr(kite), repr(session), str(session), repr(angel._auth.current())]
    assert len(caplog.records) > 3  # the run did log (requests at DEBUG)
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"secret leaked into: {text[:120]}"


def test_an_expired_token_is_refreshed_once_across_threads(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, rate_limits={"positions": 1000, "renew": 1000})
    login = json.loads(fixture_text("angelone", "login.json"))["data"]
    barrier = threading.Barrier(4)

    def positions(request: Any) -> Any:
        if request.headers["Authorization"] == f"Bearer {login['jwtToken']}":
            return 200, {}, fixture_text("angelone", "error.AG8001.json")
        return 200, {}, fixture_text("angelone", "get_positions.json")

    results: List[Any] = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("renew_token")
        api.on("get_positions", callback=positions)
        angel._auth.current()  # the first session: the one the broker will refuse

        def worker() -> None:
            barrier.wait(timeout=5)
            results.append(len(angel.get_positions()))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert results == [2, 2, 2, 2]
        assert len(api.calls("renew_token")) == 1 and len(api.calls("login")) == 1


# ============================================================================
# 9. Client
# ============================================================================


def test_unknown_broker_lists_the_known_ones() -> None:
    with pytest.raises(tt.UnsupportedFeatureError) as info:
        tt.TTConnect("kotak", {})
    assert "kotak" in str(info.value) and "angelone, zerodha" in str(info.value)


@pytest.mark.parametrize("config, key", [
    ({"on_stale": "ignore"}, "on_stale"),
    ({"timeout": 0}, "timeout"),
    ({"max_retries": -1}, "max_retries"),
    ({"instruments_url": "ftp://x"}, "instruments_url"),
    ({"cache_dir": 5}, "cache_dir"),
])
def test_bad_config_is_refused_before_any_request(config: Dict[str, Any], key: str, tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        with pytest.raises(tt.ConfigurationError, match=key):
            tt.TTConnect("zerodha", {"cache_dir": str(tmp_path), **config})


def test_cache_dir_precedence(tmp_path: Path, clock: FakeClock, clients: list, monkeypatch: Any) -> None:
    monkeypatch.setenv("TTCONNECT_CACHE_DIR", str(tmp_path / "env"))
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        clients.append(tt.TTConnect("zerodha", clock=clock))
    assert (tmp_path / "env" / "instruments.db").exists()
    open_client(clients, "zerodha", tmp_path / "cfg", clock, KITE_CSV)
    assert (tmp_path / "cfg" / "instruments.db").exists()
    monkeypatch.delenv("TTCONNECT_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        clients.append(tt.TTConnect("zerodha", clock=clock))
    assert (tmp_path / "_cache" / "instruments.db").exists()


def test_instruments_url_override(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV, instruments_url="http://127.0.0.1:9/kite.csv")
    assert kite.resolve(tt.Equity(exchange="NSE", symbol="SBIN")) == "779521"


def test_async_facade_runs_the_same_calls_off_the_loop(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    import asyncio

    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    seen_threads: List[str] = []

    def positions(request: Any) -> Any:
        seen_threads.append(threading.current_thread().name)
        return 200, {}, fixture_text("zerodha", "get_positions.json")

    async def main() -> Any:
        client = tt.AsyncTTConnect(kite)
        eq = tt.Equity(exchange="NSE", symbol="SBIN")
        got = await asyncio.gather(client.get_positions(), client.get_funds(),
                                   client.place_order(eq, 5, tt.Side.SELL, tt.ProductType.CNC, tt.OrderType.MARKET))
        assert client.expiries("NIFTY")[0] == dt.date(2026, 11, 24) and client.lot_size(eq) == 1
        return got, client.resolve(eq), threading.current_thread().name

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha").all("get_positions")
        api.on("get_positions", callback=positions)
        (positions_, funds, order_id), token, loop_thread = asyncio.run(main())
    assert len(positions_) == 2 and funds.available == 100000.0 and order_id == "1993504512367362048"
    assert token == "779521"
    assert seen_threads and loop_thread not in seen_threads  # the request ran on a worker thread
    with pytest.raises(TypeError):
        tt.AsyncTTConnect("zerodha")  # type: ignore[arg-type]


def test_async_open_builds_the_client_on_a_worker(tmp_path: Path, day_clock: FakeClock) -> None:
    import asyncio

    async def main() -> str:
        async with await tt.AsyncTTConnect.open("zerodha", {"cache_dir": str(tmp_path), **CREDS["zerodha"]},
                                                clock=day_clock) as client:
            return client.resolve(tt.Equity(exchange="NSE", symbol="INFY"))

    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        assert asyncio.run(main()) == "408065"
    assert tt._validation_store() is None  # closed by the context manager


def test_concurrent_calls_from_threads(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, rate_limits={"default": 1000})
    out: List[Any] = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, "zerodha").all()
        calls = [kite.get_positions, kite.get_holdings, kite.get_funds, kite.get_orders] * 3
        threads = [threading.Thread(target=lambda f=f: out.append(f())) for f in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert len(out) == 12 and sum(1 for o in out if isinstance(o, tt.Fund)) == 3


# ============================================================================
# 10. Streamer
# ============================================================================

import base64
import queue
import socket
import struct as _struct


class WsServer:
    """A small RFC 6455 server on 127.0.0.1 (stdlib only) that can misbehave on purpose.

    It records every handshake and every text message clients send, answers pings (and, if
    asked, text pings), sends a heartbeat while not silenced, and can refuse, drop, go silent.
    """

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, heartbeat: Optional[bytes] = b"\x00", text_replies: Optional[Dict[str, str]] = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}"
        self.heartbeat, self.text_replies = heartbeat, text_replies or {}
        self.handshakes: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.messages: "queue.Queue[str]" = queue.Queue()
        self.conns: List[socket.socket] = []
        self.refuse = 0
        self.refuse_status = "503 Service Unavailable"
        self.silent = threading.Event()
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    # -- control ---------------------------------------------------------------------------

    def send(self, payload: bytes, opcode: int = 2) -> None:
        frame = self.frame(payload, opcode)
        with self.lock:
            for conn in list(self.conns):
                try:
                    conn.sendall(frame)
                except OSError:
                    pass

    def send_raw(self, data: bytes) -> None:
        with self.lock:
            for conn in list(self.conns):
                conn.sendall(data)

    def drop(self) -> None:
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.conns.clear()

    def close(self) -> None:
        self.stopped.set()
        self.drop()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self.sock.close()
        for thread in self.threads:
            thread.join(timeout=2)

    def wait_message(self, timeout: float = 3.0, skip: Tuple[str, ...] = ()) -> str:
        while True:
            message = self.messages.get(timeout=timeout)
            if message not in skip:
                return message

    @staticmethod
    def frame(payload: bytes, opcode: int = 2) -> bytes:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([n])
        elif n < 65536:
            head += bytes([126]) + _struct.pack(">H", n)
        else:
            head += bytes([127]) + _struct.pack(">Q", n)
        return head + payload

    # -- serving ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            lines = request.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
            self.handshakes.put({"path": lines[0].split(" ")[1], "headers": headers})
            if self.refuse > 0:
                self.refuse -= 1
                conn.sendall(f"HTTP/1.1 {self.refuse_status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                conn.close()
                return
            accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + self.GUID).encode()).digest()).decode()
            conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
            with self.lock:
                self.conns.append(conn)
            if self.heartbeat is not None:
                beat = threading.Thread(target=self._beat, args=(conn,), daemon=True)
                self.threads.append(beat)
                beat.start()
            while not self.stopped.is_set():
                b0, b1 = self._recv_exact(conn, 2)
                n = b1 & 0x7F
                if n == 126:
                    n = _struct.unpack(">H", self._recv_exact(conn, 2))[0]
                elif n == 127:
                    n = _struct.unpack(">Q", self._recv_exact(conn, 8))[0]
                mask = self._recv_exact(conn, 4) if b1 & 0x80 else b"\0\0\0\0"
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._recv_exact(conn, n)))
                opcode = b0 & 0x0F
                if opcode == 1:
                    text = payload.decode()
                    self.messages.put(text)
                    if text in self.text_replies and not self.silent.is_set():
                        with self.lock:
                            conn.sendall(self.frame(self.text_replies[text].encode(), 1))
                elif opcode == 9 and not self.silent.is_set():
                    with self.lock:
                        conn.sendall(self.frame(payload, 10))
                elif opcode == 8:
                    return
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            with self.lock:
                if conn in self.conns:
                    self.conns.remove(conn)
            conn.close()

    def _beat(self, conn: socket.socket) -> None:
        while not self.stopped.wait(0.05):
            if self.silent.is_set():
                continue
            try:
                with self.lock:
                    if conn not in self.conns:
                        return
                    conn.sendall(self.frame(self.heartbeat or b"", 2))
            except OSError:
                return


# -- frame builders (the exact broker layouts, from field values) ---------------------------

KITE_DIV = {3: 10_000_000, 6: 10_000}


def kite_packet(token: int, length: int, **f: Any) -> bytes:
    div = KITE_DIV.get(token & 0xFF, 100)
    p = lambda name: int(round(f.get(name, 0) * div))  # noqa: E731 - rupees -> wire integer
    if length == 8:
        return _struct.pack(">II", token, p("ltp"))
    if length in (28, 32):
        body = _struct.pack(">6Ii", token, p("ltp"), p("high"), p("low"), p("open"), p("close"), f.get("wire_change", 0))
        return body + (_struct.pack(">I", f.get("exchange_ts", 0)) if length == 32 else b"")
    quote = _struct.pack(">11I", token, p("ltp"), f.get("last_qty", 0), p("avg_price"), f.get("volume", 0),
                         f.get("buy_qty", 0), f.get("sell_qty", 0), p("open"), p("high"), p("low"), p("close"))
    if length == 44:
        return quote
    full = quote + _struct.pack(">5I", f.get("ltt", 0), f.get("oi", 0), f.get("oi_high", 0), f.get("oi_low", 0),
                                f.get("exchange_ts", 0))
    levels = list(f.get("bids", [])) + [(0, 0, 0)] * (5 - len(f.get("bids", [])))
    levels += list(f.get("asks", [])) + [(0, 0, 0)] * (5 - len(f.get("asks", [])))
    for price, qty, orders in levels:
        full += _struct.pack(">IIH2x", qty, int(round(price * div)), orders)
    return full


def kite_frame(*packets: bytes) -> bytes:
    return _struct.pack(">H", len(packets)) + b"".join(_struct.pack(">H", len(pk)) + pk for pk in packets)


def angel_packet(mode: int, exchange_type: int, token: str, **f: Any) -> bytes:
    p = lambda name: int(round(f.get(name, 0) * 100))  # noqa: E731 - rupees -> paise
    data = _struct.pack("<BB25sqqq", mode, exchange_type, token.encode(), f.get("seq", 1), f.get("exchange_ms", 0), p("ltp"))
    if mode == 1:
        return data
    data += _struct.pack("<qqqddqqqq", f.get("last_qty", 0), p("avg_price"), f.get("volume", 0), float(f.get("buy_qty", 0)),
                         float(f.get("sell_qty", 0)), p("open"), p("high"), p("low"), p("close"))
    if mode == 2:
        return data
    data += _struct.pack("<qqd", f.get("ltt", 0), f.get("oi", 0), f.get("oi_change", 0.0))
    # the best-five block: 5 buy levels (flag 1), then 5 sell levels (flag 0); empty ones all zero
    bids = [(1, q, pr, o) for pr, q, o in f.get("bids", [])]
    asks = [(0, q, pr, o) for pr, q, o in f.get("asks", [])]
    levels = bids + [(0, 0, 0, 0)] * (5 - len(bids)) + asks + [(0, 0, 0, 0)] * (5 - len(asks))
    for flag, qty, price, orders in levels:
        data += _struct.pack("<Hqqh", flag, qty, int(round(price * 100)), orders)
    return data + _struct.pack("<qqqq", 0, 0, 0, 0)


def decode(broker: str, data: bytes, instruments: Dict[Any, Any]) -> List[tt.Tick]:
    out: List[tt.Tick] = []
    tt._BROKERS[broker]["hooks"]["stream_decode"](data, instruments, out)
    return out


INT32_MAX = 2**31 - 1


@pytest.mark.parametrize("token, ltp, close", [
    (408065, 1573.70, 1567.80),  # NSE, ltp above close
    (13364994, 0.05, 120.0),  # NFO, a collapse: negative change
    (412675, 82.1234, 82.2000),  # CDS: prices scaled by 1e7
    (3032326, 82.1234, 82.0001),  # BCD: prices scaled by 1e4
    (779521, INT32_MAX / 100, 1.0),  # the largest wire value
])
def test_kite_packets_decode_exactly(token: int, ltp: float, close: float) -> None:
    inst = object()
    fields = dict(ltp=ltp, last_qty=INT32_MAX, avg_price=ltp, volume=1192471, buy_qty=0, sell_qty=363009,
                  open=close, high=ltp, low=close, close=close, ltt=1625461887, oi=INT32_MAX, oi_high=10, oi_low=0,
                  exchange_ts=1625461888, bids=[(ltp, 5, 1), (close, 7, 65535)], asks=[(ltp, 172, 3)])
    frame = kite_frame(kite_packet(token, 8, **fields), kite_packet(token, 44, **fields), kite_packet(token, 184, **fields))
    ltp_t, quote, full = decode("zerodha", frame, {token: inst})
    assert (ltp_t.mode, ltp_t.ltp, ltp_t.close, ltp_t.bids, ltp_t.last_trade_time) == ("ltp", ltp, None, (), None)
    change = (ltp - close) * 100 / close
    for tick, mode in ((quote, "quote"), (full, "full")):
        assert tick.instrument is inst and tick.mode == mode
        assert (tick.ltp, tick.last_qty, tick.avg_price, tick.volume, tick.buy_qty, tick.sell_qty) == (
            ltp, INT32_MAX, ltp, 1192471, 0, 363009)
        assert (tick.open, tick.high, tick.low, tick.close, tick.change) == (close, ltp, close, close, change)
    assert (full.oi, full.oi_day_high, full.oi_day_low) == (INT32_MAX, 10, 0)
    assert full.last_trade_time == dt.datetime(2021, 7, 5, 10, 41, 27, tzinfo=tt.IST)
    assert full.exchange_time == dt.datetime(2021, 7, 5, 10, 41, 28, tzinfo=tt.IST)
    assert full.bids == (tt.DepthLevel(price=ltp, qty=5, orders=1), tt.DepthLevel(price=close, qty=7, orders=65535))
    assert full.asks == (tt.DepthLevel(price=ltp, qty=172, orders=3),)
    assert quote.bids == () and quote.oi is None and quote.exchange_time is None
    for tick in (ltp_t, quote, full):  # built through the fast twin, but a real, frozen Tick
        assert type(tick) is tt.Tick and tick == tt.Tick(**{f: getattr(tick, f) for f in tt.Tick.__dataclass_fields__})
        with pytest.raises(dataclasses_frozen_error()):
            tick.ltp = 0.0  # type: ignore[misc]
    if token == 13364994:
        assert full.change < 0


def test_kite_index_packets_have_their_own_ohlc_order() -> None:
    inst = object()
    token = 256265  # NIFTY 50: segment 9
    fields = dict(ltp=23512.35, high=23600.0, low=23400.5, open=23450.0, close=23500.0, wire_change=-123, exchange_ts=1795415400)
    quote, full = decode("zerodha", kite_frame(kite_packet(token, 28, **fields), kite_packet(token, 32, **fields)), {token: inst})
    for tick in (quote, full):
        assert (tick.ltp, tick.open, tick.high, tick.low, tick.close) == (23512.35, 23450.0, 23600.0, 23400.5, 23500.0)
        assert tick.change == (23512.35 - 23500.0) * 100 / 23500.0 and tick.volume is None
    assert (quote.mode, full.mode) == ("quote", "full")
    assert quote.exchange_time is None and full.exchange_time == dt.datetime.fromtimestamp(1795415400, tt.IST)


def test_kite_frame_edges() -> None:
    assert decode("zerodha", b"\x00", {}) == []  # heartbeat
    assert decode("zerodha", kite_frame(kite_packet(779521, 44, ltp=1.0)), {}) == []  # not subscribed
    for bad in (b"\x00\x02\x00\x08" + bytes(8), kite_frame(kite_packet(779521, 44))[:-3],
                _struct.pack(">HH", 1, 12) + bytes(12)):
        with pytest.raises(tt._FrameError):
            decode("zerodha", bad, {779521: object(), 0: object()})


@pytest.mark.parametrize("exchange_type, ltp, close", [(1, 2885.45, 2900.0), (2, 0.05, 0.0), (3, INT32_MAX / 100, 1.0)])
def test_angel_packets_decode_exactly(exchange_type: int, ltp: float, close: float) -> None:
    inst = object()
    key = bytes([exchange_type]) + b"52207".ljust(25, b"\0")
    fields = dict(ltp=ltp, exchange_ms=1795415400123, last_qty=75, avg_price=ltp, volume=2**40, buy_qty=1500,
                  sell_qty=0, open=close, high=ltp, low=close, close=close, ltt=1795415399, oi=123456,
                  bids=[(ltp, 65, 2), (close, 130, 1)], asks=[(ltp, 650, 9)])
    ticks = [decode("angelone", angel_packet(m, exchange_type, "52207", **fields), {key: inst})[0] for m in (1, 2, 3)]
    ltp_t, quote, snap = ticks
    assert (ltp_t.mode, ltp_t.ltp, ltp_t.volume) == ("ltp", ltp, None)
    assert ltp_t.exchange_time == dt.datetime.fromtimestamp(1795415400.123, tt.IST)
    change = (ltp - close) * 100 / close if close else None
    for tick, mode in ((quote, "quote"), (snap, "full")):
        assert tick.instrument is inst and tick.mode == mode
        assert (tick.ltp, tick.last_qty, tick.avg_price, tick.volume, tick.buy_qty, tick.sell_qty) == (ltp, 75, ltp, 2**40, 1500, 0)
        assert (tick.open, tick.high, tick.low, tick.close, tick.change) == (close, ltp, close, close, change)
        assert tick.exchange_time == dt.datetime.fromtimestamp(1795415400.123, tt.IST)
    assert snap.oi == 123456 and snap.last_trade_time == dt.datetime.fromtimestamp(1795415399, tt.IST)
    assert snap.bids == (tt.DepthLevel(price=ltp, qty=65, orders=2), tt.DepthLevel(price=close, qty=130, orders=1))
    assert snap.asks == (tt.DepthLevel(price=ltp, qty=650, orders=9),)
    with pytest.raises(tt._FrameError):
        decode("angelone", angel_packet(3, exchange_type, "52207", **fields)[:-1], {key: inst})


# -- the live feed against a real local server ----------------------------------------------


def wait_until(predicate: Any, timeout: float = 3.0) -> bool:
    done = threading.Event()
    deadline = dt.datetime.now().timestamp() + timeout
    while dt.datetime.now().timestamp() < deadline:
        if predicate():
            return True
        done.wait(0.01)
    return predicate()


@pytest.fixture
def ws_server() -> Iterator[WsServer]:
    server = WsServer()
    yield server
    server.close()


def kite_feed(clients: list, tmp_path: Path, clock: FakeClock, server: WsServer, **config: Any) -> tt.TTConnect:
    cfg = dict(ws_url=server.url + "/", stream_silence_timeout=1.0, stream_reconnect_delay=0.01,
               stream_reconnect_max_delay=0.05)
    cfg.update(config)
    return rest_client(clients, "zerodha", tmp_path, clock, **cfg)


def kite_subscribed(server: WsServer, expected: int = 2) -> Dict[int, str]:
    """Read the client's messages until ``expected`` tokens are subscribed with a mode."""
    subscribed: set = set()
    modes: Dict[int, str] = {}
    while not (len(subscribed) >= expected and set(modes) >= subscribed):
        message = json.loads(server.wait_message())
        if message["a"] == "subscribe":
            subscribed.update(message["v"])
        elif message["a"] == "mode":
            modes.update({token: message["v"][0] for token in message["v"][1]})
    assert subscribed == set(modes)
    return modes


def test_kite_stream_ticks_reconnects_and_resubscribes(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                       ws_server: WsServer) -> None:
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    ce = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type="CE")
    sbin = tt.Equity(exchange="NSE", symbol="SBIN")
    kite.subscribe([ce], on_tick=ticks.put, mode="full")
    kite.subscribe(sbin, mode="ltp")
    hello = ws_server.handshakes.get(timeout=3)
    assert hello["path"] == "/?api_key=kitekey01&access_token=kite-access-SECRET-1"
    assert hello["headers"]["x-kite-version"] == "3"
    # Depending on timing the two subscriptions go out together (on connect) or apart.
    assert kite_subscribed(ws_server) == {13364994: "full", 779521: "ltp"}
    ws_server.send(kite_frame(kite_packet(13364994, 184, ltp=120.5, close=118.0, bids=[(120.45, 65, 1)]),
                              kite_packet(779521, 8, ltp=801.05)))
    first, second = ticks.get(timeout=3), ticks.get(timeout=3)
    assert first.instrument == ce and first.ltp == 120.5 and first.bids == (tt.DepthLevel(120.45, 65, 1),)
    assert second.instrument == sbin and (second.mode, second.ltp) == ("ltp", 801.05)
    # The server drops the connection: the client reconnects and subscribes the same set again.
    ws_server.drop()
    again = ws_server.handshakes.get(timeout=3)
    assert again["path"] == hello["path"]
    resent = [ws_server.wait_message() for _ in range(3)]
    assert resent == ['{"a": "subscribe", "v": [13364994, 779521]}', '{"a": "mode", "v": ["ltp", [779521]]}',
                      '{"a": "mode", "v": ["full", [13364994]]}']
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=802.0)))
    assert ticks.get(timeout=3).ltp == 802.0
    stats = kite.stream_stats()
    assert stats["reconnects"] >= 1 and stats["ticks"] == 3 and stats["connected"] is True
    assert stats["subscriptions"] == 2 and stats["last_frame_at"].tzinfo is tt.IST
    # Unsubscribe from another thread while streaming.
    worker = threading.Thread(target=kite.unsubscribe, args=([sbin],))
    worker.start()
    worker.join(timeout=3)
    assert ws_server.wait_message() == '{"a": "unsubscribe", "v": [779521]}'


def test_kite_stream_survives_garbage_and_a_raising_handler(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                           ws_server: WsServer, caplog: Any) -> None:
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    got: "queue.Queue[float]" = queue.Queue()

    def handler(tick: tt.Tick) -> None:
        if tick.ltp == 1.0:
            raise RuntimeError("strategy bug")
        got.put(tick.ltp)

    kite.subscribe(tt.Equity(exchange="NSE", symbol="SBIN"), on_tick=handler, mode="ltp")
    assert wait_until(lambda: kite.stream_stats()["connected"])
    ws_server.wait_message()
    ws_server.send(b"\x00\x03\x00\x08garbage!")  # says 3 packets, holds one bad one
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=1.0)))  # the handler raises on this one
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=2.0)))
    assert got.get(timeout=3) == 2.0
    stats = kite.stream_stats()
    assert stats["frames_dropped"] == 1 and stats["handler_errors"] == 1 and stats["reconnects"] == 0
    assert any("on_tick handler raised" in r.getMessage() for r in caplog.records)


def test_kite_stream_outlasts_refusals_and_silence(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                   ws_server: WsServer) -> None:
    ws_server.refuse = 2
    kite = kite_feed(clients, tmp_path, day_clock, ws_server, stream_silence_timeout=0.3)
    got: "queue.Queue[float]" = queue.Queue()
    kite.subscribe(tt.Equity(exchange="NSE", symbol="SBIN"), on_tick=lambda t: got.put(t.ltp), mode="ltp")
    for _ in range(3):
        ws_server.handshakes.get(timeout=3)  # two refused, the third accepted
    assert wait_until(lambda: kite.stream_stats()["connected"])
    assert kite.stream_stats()["reconnects"] >= 2
    # Silence: the socket stays open but nothing arrives; the client must notice and reconnect.
    ws_server.silent.set()
    assert wait_until(lambda: kite.stream_stats()["silence_reconnects"] >= 1, timeout=4)
    assert "no frame for" in kite.stream_stats()["last_error"]
    ws_server.silent.clear()
    ws_server.handshakes.get(timeout=3)
    assert wait_until(lambda: kite.stream_stats()["connected"])
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=5.5)))
    assert got.get(timeout=3) == 5.5


def test_kite_order_updates_and_errors_arrive_as_text(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                      ws_server: WsServer) -> None:
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    orders: "queue.Queue[tt.Order]" = queue.Queue()
    kite.on_order_update(orders.put)
    assert wait_until(lambda: kite.stream_stats()["connected"])
    row = json.loads(fixture_text("zerodha", "get_orders.json"))["data"][1]
    ws_server.send(json.dumps({"type": "order", "data": row}).encode(), opcode=1)
    order = orders.get(timeout=3)
    assert (order.id, order.status, str(order.instrument), order.average_price) == (
        "1993505823145369600", tt.OrderStatus.COMPLETE, "NSE:SBIN", 790.0)
    ws_server.send(json.dumps({"type": "error", "data": "Invalid token"}).encode(), opcode=1)
    assert wait_until(lambda: "Invalid token" in (kite.stream_stats()["last_error"] or ""))


def test_close_returns_fast_and_leaves_no_thread(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                 ws_server: WsServer) -> None:
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    kite.subscribe(tt.Equity(exchange="NSE", symbol="SBIN"), on_tick=lambda t: None)
    assert wait_until(lambda: kite.stream_stats()["connected"])
    started = dt.datetime.now()
    kite.close()
    assert (dt.datetime.now() - started).total_seconds() < 2
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ttconnect-")]


def test_streaming_after_close_is_refused(tmp_path: Path, day_clock: FakeClock) -> None:
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        kite = tt.TTConnect("zerodha", {"cache_dir": str(tmp_path), **CREDS["zerodha"]}, clock=day_clock)
    kite.close()
    with pytest.raises(tt.ConfigurationError, match="closed"):
        kite.subscribe(tt.Equity(exchange="NSE", symbol="SBIN"), on_tick=lambda t: None)


def test_a_millisecond_trade_time_is_read_as_such() -> None:
    inst = object()
    key = bytes([1]) + b"3045".ljust(25, b"\0")
    tick = decode("angelone", angel_packet(3, 1, "3045", ltp=1.0, ltt=1795415399123), {key: inst})[0]
    assert tick.last_trade_time == dt.datetime.fromtimestamp(1795415399.123, tt.IST)


def test_stream_limits_and_bad_modes_fail_clearly(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                  monkeypatch: Any) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, ws_url="ws://127.0.0.1:9/")
    monkeypatch.setitem(tt._ZERODHA, "stream_max_tokens", 2)
    three = [tt.Equity(exchange="NSE", symbol=s) for s in ("SBIN", "INFY", "IDEA")]
    with pytest.raises(tt.UnsupportedFeatureError, match="at most 2 instruments per connection; this would make 3"):
        kite.subscribe(three, on_tick=lambda t: None)
    with pytest.raises(tt.UnsupportedFeatureError, match="stream mode 'depth'"):
        kite.subscribe(three[:1], on_tick=lambda t: None, mode="depth")
    with pytest.raises(tt.ConfigurationError, match="on_tick"):
        tt.TTConnect.subscribe(kite, three[:1])
    assert tt._ZERODHA["stream_max_tokens"] == 2 and tt._ANGELONE["stream_max_tokens"] == 1000


def test_a_feed_missing_credentials_fails_on_the_callers_thread(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, auth_mode="manual", access_token="jwt-SECRET-9",
                        ws_url="ws://127.0.0.1:9/")
    with pytest.raises(tt.ConfigurationError, match="'feed_token'"):
        angel.subscribe(tt.Equity(exchange="NSE", symbol="SBIN"), on_tick=lambda t: None)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ttconnect-")]


def test_angel_stream_headers_subscribe_ping_and_order_socket(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    market = WsServer(heartbeat=None, text_replies={"ping": "pong"})
    orders_srv = WsServer(heartbeat=None)
    try:
        angel = rest_client(clients, "angelone", tmp_path, day_clock, auth_mode="manual", access_token="jwt-SECRET-9",
                            feed_token="feed-SECRET-9", ws_url=market.url + "/smart-stream",
                            order_ws_url=orders_srv.url + "/smart-order-update", stream_silence_timeout=0.5,
                            stream_reconnect_delay=0.01)
        ticks: "queue.Queue[tt.Tick]" = queue.Queue()
        updates: "queue.Queue[tt.Order]" = queue.Queue()
        ce = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type="CE")
        sbin = tt.Equity(exchange="NSE", symbol="SBIN")
        angel.subscribe([ce, sbin], on_tick=ticks.put, mode="full", on_order_update=updates.put)
        hello = market.handshakes.get(timeout=3)
        assert hello["path"] == "/smart-stream"
        assert {k: hello["headers"][k] for k in ("authorization", "x-api-key", "x-client-code", "x-feed-token")} == {
            "authorization": "Bearer jwt-SECRET-9", "x-api-key": "angelkey01", "x-client-code": "A123456",
            "x-feed-token": "feed-SECRET-9"}
        assert json.loads(market.wait_message()) == {"correlationID": "tt31", "action": 1, "params": {"mode": 3, "tokenList": [
            {"exchangeType": 2, "tokens": ["52207"]}, {"exchangeType": 1, "tokens": ["3045"]}]}}
        market.send(angel_packet(3, 2, "52207", ltp=120.5, close=118.0, bids=[(120.45, 65, 3)], asks=[(120.5, 130, 1)]))
        tick = ticks.get(timeout=3)
        assert tick.instrument == ce and tick.mode == "full" and tick.asks == (tt.DepthLevel(120.5, 130, 1),)
        assert market.wait_message() == "ping"  # keep-alive, answered with "pong": no silence reconnects
        assert wait_until(lambda: angel.stream_stats()["frames"] >= 2)
        assert angel.stream_stats()["silence_reconnects"] == 0
        # Order updates: AngelOne's separate order-status socket.
        orders_hello = orders_srv.handshakes.get(timeout=3)
        assert orders_hello["path"] == "/smart-order-update"
        assert orders_hello["headers"]["authorization"] == "Bearer jwt-SECRET-9"
        assert wait_until(lambda: angel.stream_stats()["orders_connected"])
        orders_srv.send(json.dumps({"user-id": "A123456", "status-code": "200", "order-status": "AB00",
                                    "error-message": "", "orderData": {}}).encode(), opcode=1)
        row = json.loads(fixture_text("angelone", "get_orders.json"))["data"][4]
        orders_srv.send(json.dumps({"user-id": "A123456", "status-code": "200", "order-status": "AB01",
                                    "error-message": "", "orderData": row}).encode(), opcode=1)
        update = updates.get(timeout=3)
        assert (update.id, update.status, update.filled_qty) == ("261123000166902", tt.OrderStatus.PARTIALLY_FILLED, 65)
        # A frame that decodes to nonsense (an infinite quantity) is dropped and counted; the feed goes on.
        market.send(angel_packet(3, 2, "52207", ltp=1.0, buy_qty=float("inf")))
        market.send(angel_packet(1, 2, "52207", ltp=121.0))
        assert ticks.get(timeout=3).ltp == 121.0 and angel.stream_stats()["frames_dropped"] == 1
        # AngelOne counts each (token, mode): moving SBIN to ltp drops its full-mode subscription first.
        angel.subscribe(sbin, mode="ltp")
        assert json.loads(market.wait_message(skip=("ping",))) == {"correlationID": "tt30", "action": 0, "params": {
            "mode": 3, "tokenList": [{"exchangeType": 1, "tokens": ["3045"]}]}}
        assert json.loads(market.wait_message(skip=("ping",))) == {"correlationID": "tt11", "action": 1, "params": {
            "mode": 1, "tokenList": [{"exchangeType": 1, "tokens": ["3045"]}]}}
        angel.unsubscribe(sbin)
        assert json.loads(market.wait_message(skip=("ping",))) == {"correlationID": "tt10", "action": 0, "params": {
            "mode": 1, "tokenList": [{"exchangeType": 1, "tokens": ["3045"]}]}}
    finally:
        for client in clients:
            client.close()
        market.close()
        orders_srv.close()


def test_angel_feed_refused_renews_the_session_and_reconnects(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    market = WsServer(heartbeat=None, text_replies={"ping": "pong"})
    market.refuse, market.refuse_status = 1, "401 Unauthorized"
    try:
        angel = rest_client(clients, "angelone", tmp_path, day_clock, ws_url=market.url, stream_silence_timeout=0.5,
                            stream_reconnect_delay=0.01)
        login = json.loads(fixture_text("angelone", "login.json"))["data"]
        renewed = json.loads(fixture_text("angelone", "renew_token.json"))["data"]
        with responses.RequestsMock(assert_all_requests_are_fired=True) as rs:
            api = MockApi(rs, "angelone")
            api.on("login")
            api.on("renew_token")
            angel.subscribe(tt.Equity(exchange="NSE", symbol="SBIN"), on_tick=lambda t: None, mode="ltp")
            first = market.handshakes.get(timeout=3)
            second = market.handshakes.get(timeout=3)
            assert wait_until(lambda: angel.stream_stats()["connected"])
        assert first["headers"]["x-feed-token"] == login["feedToken"]
        assert second["headers"]["x-feed-token"] == renewed["feedToken"]
        assert second["headers"]["authorization"] == f"Bearer {renewed['jwtToken']}"
    finally:
        for client in clients:
            client.close()
        market.close()


# ============================================================================
# 11. CLI
# ============================================================================


def test_cli_search_and_expiries(tmp_path: Path, clock: FakeClock, clients: list, capsys: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    clients.clear()
    # The CLI runs on the real clock: make the cached DB look fresh for it.
    db = sqlite3.connect(tmp_path / "instruments.db")
    db.execute("UPDATE _meta SET refreshed_at = ?", (dt.datetime.now(tt.IST).isoformat(),))
    db.commit()
    db.close()
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        assert tt.main(["search", "zerodha", "INF", "--cache-dir", str(tmp_path)]) == 0
        assert tt.main(["expiries", "zerodha", "SENSEX", "--exchange", "BFO", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["NSE:INFY\t408065", "2026-11-26"]
