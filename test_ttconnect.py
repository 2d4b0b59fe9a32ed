"""Tests for ttconnect. No test touches the internet: HTTP goes through ``responses`` or a
server bound to 127.0.0.1, and time is injected."""

from __future__ import annotations

import datetime as dt
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
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests
import responses

import ttconnect as tt

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
KITE_CSV = (FIXTURES / "zerodha" / "instruments.csv").read_bytes()
ANGEL_JSON = (FIXTURES / "angelone" / "instruments.json").read_bytes()
MASTERS = {"zerodha": KITE_CSV, "angelone": ANGEL_JSON}
URLS = {name: spec["instruments_url"] for name, spec in tt._BROKERS.items()}


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
        (lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry=dt.datetime(2025, 1, 30)), TypeError, "datetime"),
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
    assert kite._lookup(weekly)[1] == "NIFTY26D0123500PE"

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
    kite._store.close()  # a cached answer needs no database
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


def test_a_failed_parse_midway_changes_nothing(tmp_path: Path, clock: FakeClock, clients: list, monkeypatch: Any) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    before = file_digest(tmp_path / "instruments.db")

    def exploding(f: Any, stats: Any) -> Iterator[Any]:
        for i, row in enumerate(tt._zerodha_parse_master(f, stats)):
            if i == 10:
                raise OSError("disk full")
            yield row

    monkeypatch.setitem(kite._spec["hooks"], "parse_master", exploding)  # type: ignore[arg-type]
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
