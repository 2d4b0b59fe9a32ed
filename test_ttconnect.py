"""Tests for ttconnect. No test touches the internet: HTTP goes through ``responses`` or a
server bound to 127.0.0.1, and time is injected."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import datetime as dt
import enum
import errno
import gc
import gzip
import hashlib
import http.server
import inspect
import io
import json
import logging
import os
import pickle
import queue
import random
import re
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

import pytest
import requests
import responses

import ttconnect as tt

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
KITE_CSV = (FIXTURES / "zerodha" / "instruments.csv").read_bytes()
ANGEL_JSON = (FIXTURES / "angelone" / "instruments.json").read_bytes()
UPSTOX_GZ = (FIXTURES / "upstox" / "instruments.json.gz").read_bytes()
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
        if body is not None:  # looked up now: a broker the test registered (the toy) is not in URLS
            rs.get(config.get("instruments_url", tt._BROKERS[broker]["urls"]["instruments_url"]), body=body)
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


def test_with_several_clients_each_record_names_its_broker(tmp_path: Path, clock: FakeClock, clients: list,
                                                            caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="ttconnect")
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV, **CREDS["zerodha"])
    angel = open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON)
    with responses.RequestsMock() as rs:
        MockApi(rs, ZERODHA).on("get_funds")
        kite.get_funds()
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "skipped malformed row" in m] == [
        "zerodha instrument master: skipped malformed row 18: NIFTY26NOV23700CE: could not convert string to float: 'abc'",
        "angelone instrument master: skipped malformed row 19: ValueError: day is out of range for month"]
    assert any(m.startswith("zerodha GET /user/margins -> 200 in ") for m in messages)
    assert angel.broker == "angelone"


@pytest.mark.parametrize("symbol, token, instrument", [
    ("NIFTY26NOVFUT", "13355010", tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-11-24")),
    # the options table is keyed by the chain: a repeated option is filed once too
    ("NIFTY26NOV23500CE", "13364994", tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500,
                                                option_type="CE")),
])
def test_duplicate_canonical_rows_are_counted(symbol: str, token: str, instrument: tt.Instrument, tmp_path: Path,
                                              clock: FakeClock, clients: list) -> None:
    lines = KITE_CSV.decode().splitlines()
    dup = next(line for line in lines if f",{symbol}," in line).replace(token, "99999999")
    body = ("\n".join(lines + [dup]) + "\n").encode()
    kite = open_client(clients, "zerodha", tmp_path, clock, body)
    assert kite.resolve(instrument) == token  # first wins
    assert [str(o) for o in kite.option_chain("NIFTY", "2026-11-24")].count("NFO:NIFTY 2026-11-24 23500 CE") == 1
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=body)
        assert kite.refresh_instruments()["duplicates"] == 1


def test_an_equity_spelled_like_an_index_is_refused(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    """A cash row with an index's canonical key (NSE:NIFTY listed as an equity too) would share its id, and so
    resolve to the index's token: the later row counts as malformed, the first row's instrument and token stay."""
    body = KITE_CSV + b'999001,9,NIFTY,"NIFTY EQ",0,,0,0.05,1,EQ,NSE,NSE\n'
    kite = open_client(clients, "zerodha", tmp_path, clock, body)
    assert kite._instruments.loaded is not None
    assert (kite._instruments.loaded["duplicates"], kite._instruments.loaded["malformed"]) == (0, 2)  # 1: the fixture's
    with pytest.raises(tt.InstrumentNotFoundError):
        tt.Equity(exchange="NSE", symbol="NIFTY")  # construction checks the open client's DB
    assert kite.resolve(tt.Index(exchange="NSE", symbol="NIFTY")) == "256265"
    assert kite.lot_size(tt.Index(exchange="NSE", symbol="NIFTY")) == 0  # the index row's, listed first


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


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


@pytest.mark.parametrize("body, words", [
    (UPSTOX_GZ[: len(UPSTOX_GZ) // 2], "gzip|truncated"),  # a cut-off download
    (b"\x1f\x8b" + os.urandom(64), "gzip"),  # garbage behind the gzip magic
    (_gz(b'{"status": "error"}'), "not a JSON array"),
    (_gz(json.dumps([{"segment": "NSE_EQ", "name": "X"}]).encode()), r"key\(s\) instrument_key"),
    (_gz(b"\n".join([b"["] + [json.dumps(r).encode() + b"," for r in json.loads(
        (FIXTURES / "upstox" / "instruments.json").read_bytes())[:5]] + [b'{"segment": "NSE_EQ"}]'])), "under half"),
])
def test_bad_upstox_master_keeps_the_previous_db(body: bytes, words: str, tmp_path: Path, clock: FakeClock,
                                                 clients: list) -> None:
    open_client(clients, "upstox", tmp_path, clock, UPSTOX_GZ)
    before = file_digest(tmp_path / "instruments.db")
    clock.set(ist(2026, 11, 22, 10, 0))
    with responses.RequestsMock() as rs:
        rs.get(URLS["upstox"], body=body)
        with pytest.raises(tt.BrokerError, match=words):
            tt.TTConnect("upstox", cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep)
        rs.get(URLS["upstox"], body=body)
        warm = tt.TTConnect("upstox", cache_dir=str(tmp_path), on_stale="warn", clock=clock, sleep=clock.sleep)
        assert warm.resolve(SBIN) == "NSE_EQ|INE062A01020"  # warn: starts on the cached DB
        warm.close()
    assert file_digest(tmp_path / "instruments.db") == before


def test_one_canonical_universe_resolves_on_all_three_brokers_from_one_db(tmp_path: Path, clock: FakeClock,
                                                                          clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    angel = open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON)
    upstox = open_client(clients, "upstox", tmp_path, clock, UPSTOX_GZ)
    db = sqlite3.connect(tmp_path / "instruments.db")
    assert db.execute("SELECT COUNT(*) FROM instruments").fetchone()[0] == 30  # one row each: no duplicates
    assert dict(db.execute("SELECT broker_id, COUNT(*) FROM broker_tokens GROUP BY broker_id")) == {
        "zerodha": 30, "angelone": 30, "upstox": 30}
    db.close()
    universe = kite.search("", limit=500) + [o for s in ("NIFTY", "BANKNIFTY", "RELIANCE", "IDEA")
                                             for e in kite.expiries(s) for o in kite.option_chain(s, e)]
    universe += [o for e in kite.expiries("SENSEX", "BFO") for o in kite.option_chain("SENSEX", e, "BFO")]
    assert len(universe) == 30
    tokens = {str(i): (kite.resolve(i), angel.resolve(i), upstox.resolve(i)) for i in universe}
    assert tokens["NFO:NIFTY 2026-11-24 23500 CE"] == ("13364994", "52207", "NSE_FO|52207")
    assert tokens["NSE:NIFTY"] == ("256265", "99926000", "NSE_INDEX|Nifty 50")
    assert tokens["NSE:SUZLON-BE"] == ("3076609", "12018", "NSE_EQ|INE040H01021")
    assert tokens["BSE:SBIN"] == ("128028676", "500112", "BSE_EQ|INE062A01020")
    assert tokens["NFO:IDEA 2026-11-24 8.5 CE"][2] == "NSE_FO|53650"  # a paise tick, a rupee strike
    assert upstox.tick_size(tt.Equity(exchange="NSE", symbol="IDEA")) == 0.01
    assert upstox._instruments.freeze_qty(NIFTY_CE) == 1800  # kept from the master, shared with every broker
    assert kite._instruments.freeze_qty(NIFTY_CE) == 1800


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


def test_a_db_of_the_previous_schema_is_rebuilt_the_same_day(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    """Schema 2 (options a rowid table beside a separate chain index) predates the chain-keyed
    options table: a DB file of it is reloaded, not read, even though its masters are current;
    the other broker in it reloads on its next start (nothing is carried from an older schema)."""
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON).close()
    clients.clear()
    old = sqlite3.connect(tmp_path / "instruments.db")
    old.executescript(
        "CREATE TABLE options_v2 AS SELECT * FROM options; DROP TABLE options;"
        " ALTER TABLE options_v2 RENAME TO options;"
        " CREATE INDEX ix_options_chain ON options(underlying_id, expiry, strike, option_type, instrument_id);"
        " PRAGMA user_version = 2;")
    old.close()
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)  # the download must happen
    assert NIFTY_CE in kite.option_chain("NIFTY", "2026-11-24")
    assert kite.resolve(NIFTY_CE) == "13364994"
    db = sqlite3.connect(tmp_path / "instruments.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == tt._SCHEMA_VERSION
    assert db.execute("SELECT DISTINCT broker_id FROM broker_tokens").fetchall() == [("zerodha",)]
    db.close()
    angel = open_client(clients, "angelone", tmp_path, clock, ANGEL_JSON)  # reloads too
    assert angel.resolve(NIFTY_CE) == "52207"
    assert kite.resolve(NIFTY_CE) == "13364994"


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
        server.server_close()
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
        with pytest.raises(tt.ConfigurationError, match="disk full"):  # a typed error; the DB is untouched
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
        server.server_close()
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



def test_reverse_lookup_index_is_built_on_first_use(broker: "Case", tmp_path: Path, day_clock: FakeClock,
                                                    clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    db = sqlite3.connect(tmp_path / "instruments.db")
    indexes = "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'ix_broker_tokens_symbol'"
    assert db.execute(indexes).fetchall() == []  # a refresh does not pay for it
    with responses.RequestsMock() as rs:
        MockApi(rs, broker).on("get_positions")
        positions = client.get_positions()
    assert db.execute(indexes).fetchall() == [("ix_broker_tokens_symbol",)]
    assert str(positions[0].instrument) == "NFO:NIFTY 2026-11-24 23500 CE"
    plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT instrument_id FROM broker_tokens WHERE broker_symbol = 'X'"))
    assert "ix_broker_tokens_symbol" in plan
    db.close()


def test_a_refresh_leaves_no_file_or_socket_open(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for broker, body in (("zerodha", KITE_CSV), ("angelone", ANGEL_JSON)):
            client = open_client(clients, broker, tmp_path, clock, body)
            with responses.RequestsMock() as rs:
                rs.get(URLS[broker], body=body)
                assert client.refresh_instruments()["rows"] == 30
            client.close()
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_the_search_index_is_built_on_first_search(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    db = sqlite3.connect(tmp_path / "instruments.db")
    named = "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'ix_instruments_exchange_symbol'"
    assert db.execute(named).fetchall() == []  # ~7% of a cold refresh, paid only by clients that search
    assert [str(i) for i in kite.search("SB", exchange="NSE")] == ["NSE:SBIN"]
    assert db.execute(named).fetchall() == [("ix_instruments_exchange_symbol",)]
    plan = " ".join(r[3] for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM instruments WHERE exchange = 'NSE' AND symbol >= 'SB' AND symbol < 'SC'"))
    assert "ix_instruments_exchange_symbol" in plan
    db.close()


# ============================================================================
# 6. Broker specs
# ============================================================================
# The REST tests read each broker's side of the shared scenario (fixtures/README.md: both
# brokers describe one account, so the same calls give equal canonical results) from one case
# table per broker, a ``Case``: ids, credentials, where a request carries the tag, what each
# error payload means. Cross-broker tests take the ``broker`` fixture (6z), parametrised over
# every table, so each is written once; a broker's own facts (handshakes, header schemes, wire
# codes) sit in its subsection. The toy broker (6c) is a spec written in this file that runs the
# whole contract with no change to ttconnect.py: broker N+1 is one section.

TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
CREDS = {
    "zerodha": {"api_key": "kitekey01", "access_token": "kite-access-SECRET-1"},
    "angelone": {"api_key": "angelkey01", "client_id": "A123456", "pin": "4321", "totp_secret": TOTP_SECRET},
    "upstox": {"api_key": "upstoxkey01", "access_token": "upstox-access-SECRET-1"},
}
SCENARIO_DAY = ist(2026, 11, 23, 10, 0)
NIFTY_CE = tt.Option(exchange=tt.Exchange.NFO, symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type=tt.OptionType.CE)
SBIN = tt.Equity(exchange=tt.Exchange.NSE, symbol="SBIN")
# Order (1) of the scenario, as a strategy places it.
ORDER_1 = dict(instrument=NIFTY_CE, qty=65, side="BUY", product="NRML", order_type="LIMIT", price=120.5, tag="tt-strategy-1")


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    """One error payload of a broker and what it must become."""

    file: str  # fixtures/<broker>/<file>, or a key of the case's in-file payloads
    status: int  # the HTTP status the broker sends it with
    route: str  # the route that answers it
    expected: Optional[type]  # the exception class; None: the route reads it as "nothing to list"
    code: Optional[str]  # the broker_code the error carries
    retryable: bool = False
    via_client: bool = True  # also served to a real client call on the mocked API
    also: Tuple[int, ...] = ()  # further statuses the same body is seen with (same class)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Case:
    """One broker's facts about the shared scenario, for the cross-broker tests."""

    broker: str
    master: bytes
    master_file: Optional[str]  # fixtures/<broker>/<master_file>; None: the master is built in this file
    creds: Mapping[str, Any]  # the account's usual config
    manual_creds: Mapping[str, Any]  # a pasted session token (auth_mode manual)
    login_creds: Optional[Mapping[str, Any]]  # a config whose client calls the "login" route
    logs_in: bool  # ``creds`` make the client call "login" before its first request
    reauth_words: Tuple[str, ...]  # what the error of a refused manual session tells the user
    placed_id: str  # place/modify/cancel fixtures: order (1)
    order_ids: Tuple[str, ...]  # get_orders: the six orders, in book order
    sbin_token: str  # resolve(NSE:SBIN)
    body: Callable[[Any], Dict[str, Any]]  # a sent request's body, decoded (form or JSON)
    tag_key: str  # the place body's tag field
    price_key: str  # the place/modify body's price field
    tag_field: str  # the order-book row's tag field
    id_field: str  # the order-book row's order id field
    placed_fields: Callable[[dt.datetime], Dict[str, Any]]  # order-row fields saying it was placed at that time
    price_field: str  # the order row's price field
    book_rows: Tuple[Any, ...]  # path to the rows in get_orders.json
    position_rows: Tuple[Any, ...]  # path to the rows in get_positions.json
    current_route: str  # the route get_order reads order (1)'s current state from
    current_row: Tuple[Any, ...]  # path to that state in the route's payload
    cancel_target: Callable[[Any], str]  # the order (and variety, where sent) a cancel request names
    live_targets: Tuple[str, ...]  # cancel_all: the OPEN, TRIGGER PENDING and partly filled orders
    cancel_refusal: Tuple[str, int]  # a payload (and status) refusing a cancel
    amo_order: Mapping[str, Any]  # changes over order (1)'s row making a pending after-market order
    mcx_order: Mapping[str, Any]  # ... making an open order in MCX (a segment ttconnect does not load)
    mcx_position: Mapping[str, Any]  # changes over position (1)'s row making an open MCX position
    holding_sale: Mapping[str, Any]  # ... making the CNC row of 5 NSE:SBIN sold today out of holdings
    kill_ids: Tuple[str, str]  # the ids of those two orders
    kill_targets: Tuple[str, str]  # and their cancel targets
    mcx_label: str  # how close_all_positions names the MCX position it cannot close
    close_bodies: Tuple[Mapping[str, Any], ...]  # close_all_positions: the two MARKET orders (fields)
    modify_qty_body: Mapping[str, Any]  # modify_order(order 1, qty=130): the whole body
    modify_market_body: Mapping[str, Any]  # modify_order(order 1, order_type=MARKET): the whole body
    # (place_order kwargs, body fields, the body is exactly that, fields that must be absent)
    place_shapes: Tuple[Tuple[Mapping[str, Any], Mapping[str, Any], bool, Tuple[str, ...]], ...]
    max_tag_len: int  # the broker's documented tag limit
    margin_exposure: Optional[float]  # the scenario margin's exposure (None: not given)
    rate_limit_error: Tuple[str, int]  # a "slow down" payload and its status
    statuses: Mapping[str, str]  # the broker's documented raw order statuses -> canonical
    status_table: Mapping[str, Any]  # the spec's table they go through
    errors: Tuple[ErrorCase, ...]  # EVERY error payload of the broker
    details: Mapping[str, Tuple[str, str]]  # one-order replies: payload -> (its order id, DETAILS key)
    detail_route: Optional[str]  # the route get_order reads them through; None: not wired yet
    unwired: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # routes the fixtures describe, the spec lacks
    fund_gaps: Tuple[str, ...] = ()  # Fund fields the broker does not give (None)
    extras: Mapping[str, str] = dataclasses.field(default_factory=dict)  # payload -> the test that reads it
    empty_book: str = "get_orders.empty.json"
    own_spec: Optional[Any] = None  # a spec this file brings (the toy), registered by the fixture
    payloads: Optional[Mapping[str, Any]] = None  # in-file payloads instead of fixtures/<broker>/

    def __repr__(self) -> str:
        return f"Case({self.broker!r})"

    @property
    def spec(self) -> Any:
        return self.own_spec if self.own_spec is not None else tt._BROKERS[self.broker]

    def payload(self, name: str) -> str:
        """A response body, exactly as the broker sends it."""
        if self.payloads is None:
            return fixture_text(self.broker, name)
        value = self.payloads[name]
        return value if isinstance(value, str) else json.dumps(value)

    def has_payload(self, name: str) -> bool:
        return (FIXTURES / self.broker / name).is_file() if self.payloads is None else name in self.payloads

    def route_payloads(self) -> Set[str]:
        """The success bodies MockApi.all() serves: ``<route>.json`` of every route that has one."""
        return {f"{route}.json" for route in self.spec["routes"] if self.has_payload(f"{route}.json")}

    def referenced(self) -> Set[str]:
        """Every payload this table makes some test read."""
        names = self.route_payloads() | {e.file for e in self.errors} | set(self.details) | set(self.extras)
        names |= {self.empty_book, self.cancel_refusal[0], self.rate_limit_error[0]}
        if self.master_file:
            names.add(self.master_file)
        return names


def fixture_text(broker: str, name: str) -> str:
    return (FIXTURES / broker / name).read_text()


def at(payload: Any, path: Tuple[Any, ...]) -> Any:
    """The part of a payload a path of keys and indexes leads to (the object itself, not a copy)."""
    for key in path:
        payload = payload[key]
    return payload


def form_body(request: Any) -> Dict[str, str]:
    from urllib.parse import parse_qs

    body = request.body.decode() if isinstance(request.body, bytes) else request.body or ""
    return {key: values[0] for key, values in parse_qs(body).items()}


def json_body(request: Any) -> Dict[str, Any]:
    return json.loads(request.body) if request.body else {}


def query_of(request: Any) -> Dict[str, str]:
    from urllib.parse import parse_qs, urlsplit

    return {key: values[0] for key, values in parse_qs(urlsplit(request.url).query).items()}


def case_of(broker: Any) -> "Case":
    return broker if isinstance(broker, Case) else CASE[broker]


def route_regex(broker: Any, route: str) -> Any:
    spec = case_of(broker).spec
    spec_route = spec["routes"][route]
    pattern = re.escape(spec["urls"][spec_route.host] + spec_route.path)
    pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/?]+", pattern)
    return spec_route.verb, re.compile(pattern + r"(\?.*)?$")


class MockApi:
    """A broker's REST API on ``responses``: each route answers its payload unless told otherwise."""

    def __init__(self, rs: responses.RequestsMock, broker: Any) -> None:
        self.rs, self.case = rs, case_of(broker)
        self.spec = self.case.spec
        self.registered: List[str] = []

    def on(self, route: str, body: Any = None, status: int = 200, fixture: Optional[str] = None,
           callback: Any = None, **kwargs: Any) -> None:
        method, url = route_regex(self.case, route)
        self.registered.append(route)
        if callback is not None:
            self.rs.add_callback(method, url, callback=callback)
            return
        if body is None:
            body = self.case.payload(fixture or f"{route}.json")
        elif not isinstance(body, (str, bytes, Exception)):
            body = json.dumps(body)
        self.rs.add(method, url, body=body, status=status, **kwargs)

    def all(self, *skip: str) -> "MockApi":
        for route in self.spec["routes"]:
            if route not in skip and self.case.has_payload(f"{route}.json"):
                self.on(route)
        return self

    def calls(self, route: str) -> List[Any]:
        method, url = route_regex(self.case, route)
        return [c for c in self.rs.calls if c.request.method == method and url.match(c.request.url)]


@pytest.fixture
def day_clock() -> FakeClock:
    return FakeClock(SCENARIO_DAY)


def rest_client(clients: list, broker: str, tmp_path: Path, clock: FakeClock, **config: Any) -> tt.TTConnect:
    """A client configured as the broker's users configure it (for the per-broker tests)."""
    case = CASE[broker]
    return open_client(clients, broker, tmp_path, clock, case.master, **{**case.creds, **config})


def contract_client(clients: list, case: Case, tmp_path: Path, clock: FakeClock, creds: Optional[Mapping[str, Any]] = None,
                    warm: bool = True, **config: Any) -> tt.TTConnect:
    """A client for the cross-broker tests: unthrottled (the limiter has tests of its own) and,
    where the account logs in, signed in already, so the mocked API serves only the calls under test."""
    unthrottled = {name: 1000 for name in case.spec["rate_limits"]}
    cfg = {"rate_limits": unthrottled, **(case.creds if creds is None else creds), **config}
    client = open_client(clients, case.broker, tmp_path, clock, case.master, **cfg)
    if warm and creds is None and case.logs_in:
        with responses.RequestsMock() as rs:
            MockApi(rs, case).on("login")
            client._auth.current()
        clock.slept.clear()
    return client


def provoke(client: tt.TTConnect, case: Case, route: str, cache_dir: Path, clock: FakeClock, clients: list) -> Any:
    """Make ``client`` call ``route`` the way a user's code would; return what the call returns."""
    if route == "login":  # a client whose config logs in (at init with a single-use code, else on first use)
        assert case.login_creds is not None
        fresh = tt.TTConnect(case.broker, {"cache_dir": str(cache_dir), **case.login_creds}, clock=clock, sleep=clock.sleep)
        clients.append(fresh)
        return fresh.get_profile()
    if route == "place_order":
        return client.place_order(**ORDER_1)
    if route == "modify_order":
        return client.modify_order(case.placed_id, price=121.0)
    if route == "calculate_margin":
        leg = {k: v for k, v in ORDER_1.items() if k != "tag"}
        return client.calculate_margin([leg])
    if route == "get_order":
        knows_order(client, case, "get_order.json", case.placed_id)
    if route in ("cancel_order", "get_order", "get_order_history"):
        return getattr(client, route)(case.placed_id)
    return getattr(client, route)()


def run_strategy(client: tt.TTConnect, expiry: str = "2026-11-24") -> Dict[str, Any]:
    """One broker-agnostic strategy: the same code for every broker."""
    ce = tt.Option(exchange=tt.Exchange.NFO, symbol="NIFTY", expiry=expiry, strike=23500, option_type=tt.OptionType.CE)
    ce_hi = tt.Option(exchange=tt.Exchange.NFO, symbol="NIFTY", expiry=expiry, strike=23600, option_type=tt.OptionType.CE)
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
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if isinstance(value, tuple) and all(isinstance(v, enum.Enum) for v in value):
        return sorted(v.value for v in value)  # a set in all but type
    if dataclasses.is_dataclass(value) and not isinstance(value, tt._Instrument):
        skip = {"raw", "id", "order_id", "trade_id", "user_id", "broker", "exchanges"}
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in skip}
    return value


# -- the one reply check -------------------------------------------------------------------


def check_reply(spec: Any, route: str, resp: Any) -> Any:
    return tt._check_reply(spec, route, spec["routes"][route], resp)


@pytest.mark.parametrize("status, body, headers, expected, words", [
    (502, "<html><body><h1>502 Bad Gateway</h1></body></html>", {}, tt.BrokerError, "HTTP 502 with a non-JSON body: <html>"),
    (200, "", {}, tt.BrokerError, "empty response body with HTTP 200"),
    (503, "", {}, tt.BrokerError, "empty response body with HTTP 503"),
    (403, "Access denied because of exceeding access rate", {}, tt.RateLimitError, "rate limited (HTTP 403"),
    (429, "Too many requests", {"Retry-After": "3"}, tt.RateLimitError, "rate limited (HTTP 429"),
    (200, '{"status": false, "message": "Internal Error", "errorcode": "AB2001", "data": null}', {}, tt.BrokerError, "AB2001"),
    (200, '{"message": "IP not allowed", "data": null}', {}, tt.BrokerError, "without a status"),
    (200, '["not", "an", "envelope"]', {}, tt.BrokerError, "unexpected JSON body"),
    (401, "", {}, tt.AuthenticationError, "HTTP 401 (unauthorized) with an empty body"),  # was an empty-body BrokerError
    (401, "<html><h1>401 Authorization Required</h1></html>", {}, tt.AuthenticationError,
     "HTTP 401 (unauthorized) with a non-JSON body: <html>"),
])
def test_non_json_and_odd_bodies_become_clear_errors(status: int, body: str, headers: Dict[str, str], expected: type, words: str) -> None:
    with pytest.raises(tt.TTConnectError) as info:
        check_reply(tt._ANGELONE, "get_orders", tt._Response(status, headers, body))
    assert type(info.value) is expected and words in str(info.value)
    assert info.value.http_status == status
    assert info.value.retryable is (expected is tt.RateLimitError or status >= 500 or "AB2001" in body)
    if headers:
        assert info.value.retry_after == 3.0


# ============================================================================
# 6a. Broker spec: Zerodha
# ============================================================================

KITE_STATUSES = {  # Kite notes section 5
    "OPEN": "OPEN", "TRIGGER PENDING": "TRIGGER_PENDING", "COMPLETE": "COMPLETE", "CANCELLED": "CANCELLED",
    "REJECTED": "REJECTED", "PUT ORDER REQ RECEIVED": "PENDING", "VALIDATION PENDING": "PENDING",
    "OPEN PENDING": "PENDING", "MODIFY VALIDATION PENDING": "OPEN", "MODIFY PENDING": "OPEN", "MODIFIED": "OPEN",
    "CANCEL PENDING": "OPEN", "AMO REQ RECEIVED": "PENDING", "UPDATE": "OPEN",
}


def kite_cancel_target(request: Any) -> str:
    """``<variety>/<order_id>``: Kite names both in the URL."""
    return request.url.split("/orders/", 1)[1].split("?", 1)[0]


ZERODHA = Case(
    broker="zerodha", master=KITE_CSV, master_file="instruments.csv",
    creds=CREDS["zerodha"], manual_creds=CREDS["zerodha"],
    login_creds={"api_key": "kitekey01", "api_secret": "kite-api-SECRET", "request_token": "req-TOKEN-1"},
    logs_in=False,
    reauth_words=("request_token", "kite.zerodha.com/connect/login?v=3&api_key=kitekey01"),
    placed_id="1993504512367362048",
    order_ids=("1993504512367362048", "1993505823145369600", "1993507134982946816", "1993508446213627904",
               "1993509757441089536", "1993511068674596864"),
    sbin_token="779521",
    body=form_body, tag_key="tag", price_key="price", tag_field="tag", price_field="price", id_field="order_id",
    placed_fields=lambda when: {"order_timestamp": when.strftime("%Y-%m-%d %H:%M:%S"), "exchange_timestamp": None},
    book_rows=("data",), position_rows=("data", "net"),
    current_route="get_order_history", current_row=("data", -1),  # the history's last state
    cancel_target=kite_cancel_target,
    live_targets=("regular/1993504512367362048", "regular/1993507134982946816", "regular/1993509757441089536"),
    cancel_refusal=("cancel_order.order_exception.json", 400),
    amo_order={"order_id": "2000000000000000001", "status": "AMO REQ RECEIVED", "variety": "amo",
               "exchange_order_id": None},  # not at the exchange yet: still addressed as "amo"
    mcx_order={"order_id": "2000000000000000002", "exchange": "MCX", "tradingsymbol": "GOLD26DECFUT",
               "instrument_token": 58424839, "status": "OPEN", "variety": "regular"},
    mcx_position={"exchange": "MCX", "tradingsymbol": "GOLD26DECFUT", "quantity": 1, "product": "NRML"},
    holding_sale={"exchange": "NSE", "tradingsymbol": "SBIN", "quantity": -5, "product": "CNC", "pnl": -50.0},
    kill_ids=("2000000000000000001", "2000000000000000002"),
    kill_targets=("amo/2000000000000000001", "regular/2000000000000000002"),
    mcx_label="MCX:GOLD26DECFUT",
    close_bodies=(
        {"tradingsymbol": "NIFTY26NOV23500CE", "transaction_type": "SELL", "quantity": "65", "product": "NRML",
         "order_type": "MARKET", "market_protection": "-1"},
        {"tradingsymbol": "BANKNIFTY26NOVFUT", "transaction_type": "BUY", "quantity": "30", "product": "NRML",
         "order_type": "MARKET", "market_protection": "-1"},
    ),
    modify_qty_body={"order_type": "LIMIT", "quantity": "130", "price": "120.5"},
    modify_market_body={"order_type": "MARKET", "quantity": "65", "market_protection": "-1"},
    place_shapes=(
        (dict(instrument=SBIN, qty=5, side="SELL", product="CNC", order_type="MARKET", tag="exit1"),
         {"tradingsymbol": "SBIN", "exchange": "NSE", "transaction_type": "SELL", "order_type": "MARKET",
          "quantity": "5", "product": "CNC", "validity": "DAY", "tag": "exit1", "market_protection": "-1"}, True, ()),
        (dict(instrument=SBIN, qty=5, side="BUY", product="MIS", order_type="SL", price=801.05, trigger_price=800.5),
         {"order_type": "SL", "price": "801.05", "trigger_price": "800.5"}, False, ("market_protection",)),
    ),
    max_tag_len=20, margin_exposure=29151.23,
    rate_limit_error=("error.network_exception.json", 429),
    statuses=KITE_STATUSES, status_table=tt._KITE_STATUSES,
    errors=(  # fixtures/README.md (Zerodha error bodies) and MAPPING.md section 4
        ErrorCase("error.token_exception.json", 403, "get_orders", tt.AuthenticationError, "TokenException"),
        ErrorCase("error.permission_exception.json", 403, "get_profile", tt.AuthenticationError, "PermissionException"),
        ErrorCase("login.token_exception.json", 403, "login", tt.AuthenticationError, "TokenException"),
        ErrorCase("place_order.input_exception.json", 400, "place_order", tt.InvalidOrderError, "InputException"),
        ErrorCase("place_order.market_protection.json", 400, "place_order", tt.InvalidOrderError, "InputException"),
        ErrorCase("place_order.margin_exception.json", 400, "place_order", tt.InsufficientFundsError, "MarginException"),
        ErrorCase("cancel_order.order_exception.json", 400, "cancel_order", tt.OrderError, "OrderException"),
        ErrorCase("error.network_exception.json", 429, "get_orders", tt.RateLimitError, "NetworkException", retryable=True),
        ErrorCase("error.general_exception.json", 500, "get_orders", tt.BrokerError, "GeneralException", retryable=True),
        # HTTP status unconfirmed (README: 400); the message decides either way.
        ErrorCase("get_order_history.order_not_found.json", 400, "get_order_history", tt.OrderNotFoundError,
                  "GeneralException", also=(500,)),
    ),
    details={"get_order_history.json": ("1993504512367362048", "order_1"),
             "get_order_history.insufficient_funds.json": ("1993514990127554560", "rejected_for_funds")},
    detail_route="get_order_history",
    extras={"login.json": "test_zerodha_request_token_is_exchanged_and_stored"},
)

KITE_ERRORS = [
    ("TokenException", 403, "get_profile", tt.AuthenticationError),
    ("PermissionException", 403, "get_profile", tt.AuthenticationError),
    ("UserException", 403, "get_profile", tt.BrokerError),  # an account problem: the session stays
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


@pytest.mark.parametrize("code, status, route, expected", KITE_ERRORS)
def test_kite_error_types_map_to_documented_exceptions(code: str, status: int, route: str, expected: type) -> None:
    body = json.dumps({"status": "error", "message": "Something went wrong", "data": None, "error_type": code})
    with pytest.raises(tt.TTConnectError) as info:
        check_reply(tt._ZERODHA, route, tt._Response(status, {}, body))
    assert type(info.value) is expected
    assert info.value.broker_code == code and info.value.http_status == status
    assert f"HTTP {status}" in str(info.value) and "Something went wrong" in str(info.value)


def test_every_documented_kite_code_has_a_mapping() -> None:
    documented_kite = {"TokenException", "PermissionException", "UserException", "TwoFAException", "InputException",
                       "OrderException", "MarginException", "HoldingException", "NetworkException", "DataException",
                       "GeneralException"}
    assert documented_kite <= set(tt._ZERODHA["errors"])


def test_kite_requests_carry_its_headers_and_the_basket_query(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "zerodha").all()
        kite.place_order(SBIN, 5, "SELL", "CNC", "MARKET", tag="exit1")
        req = api.calls("place_order")[0].request
        assert req.url.endswith("/orders/regular")
        assert req.headers["Authorization"] == "token kitekey01:kite-access-SECRET-1"
        assert req.headers["X-Kite-Version"] == "3"
        kite.calculate_margin([tt.OrderLeg(SBIN, 5, tt.Side.BUY, tt.ProductType.CNC, tt.OrderType.LIMIT, price=800.0)])
        margin_req = api.calls("calculate_margin")[0].request
        assert "consider_positions=false" in margin_req.url  # the legs alone, as on every broker
        assert json.loads(margin_req.body) == [{"exchange": "NSE", "tradingsymbol": "SBIN", "transaction_type": "BUY",
                                                "variety": "regular", "product": "CNC", "order_type": "LIMIT",
                                                "quantity": 5, "price": 800.0, "trigger_price": 0.0}]


def test_kite_amo_orders_at_the_exchange_are_addressed_as_regular() -> None:
    # The book keeps "amo"; once at the exchange the order is modified and cancelled as "regular".
    assert tt._zerodha_variety({"variety": "amo", "exchange_order_id": None}) == "amo"
    assert tt._zerodha_variety({"variety": "amo", "exchange_order_id": "1100000012345678"}) == "regular"
    assert tt._zerodha_variety({"variety": "iceberg"}) == "iceberg"


def test_kite_slices_natively_learning_the_freeze_limit_from_its_refusal(tmp_path: Path, day_clock: FakeClock,
                                                                          clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    assert kite._instruments.freeze_qty(NIFTY_CE) == 0  # Kite's master has no freeze limits
    refusal = json.dumps({"status": "error", "error_type": "InputException", "data": None,
                          "message": "The order quantity 5265 (81 lots) is higher than the maximum quantity of 1755 "
                                     "(27 lots) allowed by the exchanges."})
    sliced = {"status": "success", "data": {"order_id": "2000000000000000101",
                                            "children": [{"order_id": "2000000000000000102"},
                                                         {"order_id": "2000000000000000103"}]}}
    with responses.RequestsMock() as rs:
        api = MockApi(rs, ZERODHA)
        api.on("place_order", body=refusal, status=400)
        api.on("place_order", body=refusal, status=400)
        api.on("place_order", body=sliced)
        with pytest.raises(tt.InvalidOrderError, match="maximum quantity of 1755.*slice=True"):
            kite.place_order(NIFTY_CE, 5265, "BUY", "NRML", "MARKET")  # without slice: the broker's refusal, explained
        ids = kite.place_order(NIFTY_CE, 5265, "BUY", "NRML", "MARKET", slice=True)
        bodies = [form_body(c.request) for c in api.calls("place_order")]
    assert ids == ["2000000000000000101", "2000000000000000102", "2000000000000000103"]
    assert [b.get("autoslice") for b in bodies] == [None, None, "true"]  # refused plain (not placed), then autoslice
    assert bodies[2]["quantity"] == "5265"


def test_kite_autoslice_children_that_fail_are_reported(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    data = {"order_id": "2000000000000000101", "children": [
        {"order_id": "2000000000000000102"},
        {"error": {"code": 400, "error_type": "InputException", "message": "Insufficient funds"}}]}
    with pytest.raises(tt.OrderError, match="1 slice\\(s\\) rejected") as info:
        tt._zerodha_placed(None, data)  # type: ignore[arg-type]
    assert info.value.placed_ids == ["2000000000000000101", "2000000000000000102"]
    assert tt._zerodha_placed(None, ["1", "2"]) == ["1", "2"]  # the pre-2026 reply: a bare list  # type: ignore[arg-type]


def test_kite_autoslice_refused_in_part_never_says_no_unit_was_placed(tmp_path: Path, day_clock: FakeClock,
                                                                      clients: list) -> None:
    # Two of the broker's slices went through: "the remaining 5265 units were not" would have the
    # caller place all of it again.
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    refusal = json.dumps({"status": "error", "error_type": "InputException", "data": None,
                          "message": "The order quantity 5265 (81 lots) is higher than the maximum quantity of 1755 "
                                     "(27 lots) allowed by the exchanges."})
    part = {"status": "success", "data": {"order_id": "2000000000000000101", "children": [
        {"order_id": "2000000000000000102"},
        {"error": {"code": 400, "error_type": "InputException", "message": "Insufficient funds"}}]}}
    with responses.RequestsMock() as rs:
        api = MockApi(rs, ZERODHA)
        api.on("place_order", body=refusal, status=400)
        api.on("place_order", body=part)
        with pytest.raises(tt.OrderError) as info:
            kite.place_order(NIFTY_CE, 5265, "BUY", "NRML", "MARKET", slice=True)
        assert len(api.calls("place_order")) == 2
    assert info.value.placed_ids == ["2000000000000000101", "2000000000000000102"]
    assert "only part of the remaining 5265 units was placed" in str(info.value)
    assert "units were not" not in str(info.value)


def test_kite_an_unreadable_latest_state_never_lets_an_older_one_pass_for_current(tmp_path: Path, day_clock: FakeClock,
                                                                                  clients: list) -> None:
    # Kite's current state is its history's last: left out as malformed, the OPEN state before it
    # passed for current, and a COMPLETE order was modified and cancelled.
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock)
    payload = json.loads(ZERODHA.payload("get_order_history.json"))
    payload["data"].append({**payload["data"][-1], "status": "COMPLETE", "filled_quantity": 65, "pending_quantity": 0,
                            "average_price": "n/a"})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, ZERODHA)
        api.on("get_order_history", body=json.dumps(payload))
        api.on("modify_order")
        api.on("cancel_order")
        for call in (lambda: kite.get_order(ZERODHA.placed_id), lambda: kite.get_order_history(ZERODHA.placed_id),
                     lambda: kite.modify_order(ZERODHA.placed_id, price=121.0),
                     lambda: kite.cancel_order(ZERODHA.placed_id)):
            with pytest.raises(tt.BrokerError, match="1 of the 5 states of order 1993504512367362048 could not be "
                                                     "read .*average_price.*current state is unknown"):
                call()
        assert api.calls("modify_order") == [] and api.calls("cancel_order") == []


def test_kite_margin_can_consider_positions_on_request(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path / "k", day_clock)
    angel = rest_client(clients, "angelone", tmp_path / "a", day_clock)
    leg = tt.OrderLeg(SBIN, 5, tt.Side.BUY, tt.ProductType.CNC, tt.OrderType.LIMIT, price=800.0)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, ZERODHA).all()
        kite.calculate_margin([leg], consider_positions=True)
        assert "consider_positions=true" in api.calls("calculate_margin")[0].request.url
        with pytest.raises(tt.UnsupportedFeatureError, match="legs alone"):
            angel.calculate_margin([leg], consider_positions=True)  # AngelOne cannot: refused before sending
        assert len(rs.calls) == 1


@pytest.mark.parametrize("error_type", ["PermissionException", "InputException", "GeneralException"])
def test_kite_static_ip_refusals_name_the_rule_and_keep_the_session(error_type: str, tmp_path: Path,
                                                                    day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, cache_session=True)
    body = json.dumps({"status": "error", "error_type": error_type, "data": None,
                       "message": "No IPs configured for this app. Add allowed IPs on the Kite developer console."})
    with responses.RequestsMock() as rs:
        MockApi(rs, ZERODHA).on("place_order", body=body, status=403)
        with pytest.raises(tt.ConfigurationError, match="static IP registered for this Kite Connect app"):
            kite.place_order(SBIN, 1, "BUY", "CNC", "MARKET")
    assert (tmp_path / "zerodha_session.json").exists()  # not an expired session: nothing cleared
    user = json.dumps({"status": "error", "error_type": "UserException", "data": None, "message": "Account blocked"})
    with responses.RequestsMock() as rs:
        MockApi(rs, ZERODHA).on("get_profile", body=user, status=403)
        with pytest.raises(tt.BrokerError, match="Account blocked"):
            kite.get_profile()
    assert (tmp_path / "zerodha_session.json").exists()


def test_sensex_50_resolves_on_every_broker_that_lists_it(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    # BSE lists the index as SNSX50 (Kite, AngelOne); its options' underlying is SENSEX50.
    assert tt.Index(exchange="BSE", symbol="SNSX50").symbol == "SENSEX50"
    kite_row = '293127,1145,SNSX50,"SENSEX 50",0,,0,0,0,EQ,INDICES,BSE\n'
    kite = open_client(clients, "zerodha", tmp_path / "k", clock, KITE_CSV + kite_row.encode())
    assert kite.resolve(tt.Index(exchange="BSE", symbol="SENSEX50")) == "293127"
    angel_row = {"token": "99919082", "symbol": "SNSX50", "name": "SNSX50", "expiry": "", "strike": "0.000000",
                 "lotsize": "1", "instrumenttype": "AMXIDX", "exch_seg": "BSE", "tick_size": "0.000000"}
    rows = json.loads(ANGEL_JSON) + [angel_row]
    angel = open_client(clients, "angelone", tmp_path / "a", clock, json.dumps(rows).encode())
    assert angel.resolve(tt.Index(exchange="BSE", symbol="SENSEX 50")) == "99919082"


# ============================================================================
# 6b. Broker spec: AngelOne
# ============================================================================

ANGEL_STATUSES = {  # AngelOne notes section 5.2 (lower case on the wire)
    "open": "OPEN", "complete": "COMPLETE", "cancelled": "CANCELLED", "rejected": "REJECTED",
    "trigger pending": "TRIGGER_PENDING", "open pending": "PENDING", "validation pending": "PENDING",
    "put order req received": "PENDING", "modify validation pending": "OPEN", "modify pending": "OPEN",
    "modified": "OPEN", "not modified": "OPEN", "cancel pending": "OPEN", "not cancelled": "OPEN",
    "after market order req received": "PENDING", "modify after market order req received": "PENDING",
    "cancelled after market order": "CANCELLED",
}
def angel_cancel_target(request: Any) -> str:
    """``<variety>/<orderid>``: AngelOne names both in the body."""
    body = json.loads(request.body)
    return f"{body['variety']}/{body['orderid']}"


ANGELONE = Case(
    broker="angelone", master=ANGEL_JSON, master_file="instruments.json",
    creds=CREDS["angelone"],
    manual_creds={"api_key": "angelkey01", "client_id": "A123456", "auth_mode": "manual", "access_token": "jwt-SECRET-9"},
    login_creds=CREDS["angelone"], logs_in=True,
    reauth_words=("AngelOne sessions end at midnight IST",),
    placed_id="261123000104562",
    order_ids=("261123000104562", "261123000121877", "261123000139015", "261123000150348", "261123000166902",
               "261123000181274"),
    sbin_token="3045",
    body=json_body, tag_key="ordertag", price_key="price", tag_field="ordertag", price_field="price", id_field="orderid",
    placed_fields=lambda when: dict.fromkeys(("exchtime", "updatetime"), when.strftime("%d-%b-%Y %H:%M:%S")),
    book_rows=("data",), position_rows=("data",),
    current_route="get_order", current_row=("data",),  # details/{uniqueorderid}: one object
    cancel_target=angel_cancel_target,
    live_targets=("NORMAL/261123000104562", "STOPLOSS/261123000139015", "NORMAL/261123000166902"),
    # AB1013 "Order not found" is how AngelOne refuses a cancel of an order it no longer has
    # (MAPPING.md: details / modify / cancel -> OrderNotFoundError); the one fixture of it is
    # the details route's.
    cancel_refusal=("get_order.AB1013.json", 200),
    amo_order={"orderid": "261123000200001", "status": "after market order req received",
               "orderstatus": "after market order req received", "variety": "AMO"},
    mcx_order={"orderid": "261123000200002", "exchange": "MCX", "tradingsymbol": "GOLD04DEC26FUT",
               "symboltoken": "440937", "status": "open", "orderstatus": "open", "variety": "NORMAL"},
    holding_sale={"exchange": "NSE", "tradingsymbol": "SBIN-EQ", "symboltoken": "3045", "netqty": "-5",
                  "producttype": "DELIVERY", "pnl": "-50.0"},
    mcx_position={"exchange": "MCX", "tradingsymbol": "GOLD04DEC26FUT", "symboltoken": "440937", "netqty": "1",
                  "producttype": "CARRYFORWARD"},
    kill_ids=("261123000200001", "261123000200002"),
    # the book shows AMO; modify/cancel take it as NORMAL (SmartAPI admin, forum topics 5177, 5188)
    kill_targets=("NORMAL/261123000200001", "NORMAL/261123000200002"),
    mcx_label="MCX:GOLD04DEC26FUT",
    close_bodies=(
        {"tradingsymbol": "NIFTY24NOV2623500CE", "transactiontype": "SELL", "quantity": "65",
         "producttype": "CARRYFORWARD", "ordertype": "MARKET", "price": "0"},
        {"tradingsymbol": "BANKNIFTY24NOV26FUT", "transactiontype": "BUY", "quantity": "30",
         "producttype": "CARRYFORWARD", "ordertype": "MARKET", "price": "0"},
    ),
    # AngelOne wants the whole order restated (MAPPING.md section 5).
    modify_qty_body={"variety": "NORMAL", "orderid": "261123000104562", "ordertype": "LIMIT",
                     "producttype": "CARRYFORWARD", "duration": "DAY", "price": "120.5", "quantity": "130",
                     "tradingsymbol": "NIFTY24NOV2623500CE", "symboltoken": "52207", "exchange": "NFO"},
    modify_market_body={"variety": "NORMAL", "orderid": "261123000104562", "ordertype": "MARKET",
                        "producttype": "CARRYFORWARD", "duration": "DAY", "price": "0", "quantity": "65",
                        "tradingsymbol": "NIFTY24NOV2623500CE", "symboltoken": "52207", "exchange": "NFO"},
    place_shapes=(
        (dict(instrument=NIFTY_CE, qty=130, side="SELL", product="NRML", order_type="SL_M", trigger_price=99.95,
              tag="stop-1"),
         {"variety": "STOPLOSS", "tradingsymbol": "NIFTY24NOV2623500CE", "symboltoken": "52207",
          "transactiontype": "SELL", "exchange": "NFO", "ordertype": "STOPLOSS_MARKET", "producttype": "CARRYFORWARD",
          "duration": "DAY", "price": "0", "triggerprice": "99.95", "quantity": "130", "squareoff": "0",
          "stoploss": "0", "ordertag": "stop-1"}, True, ()),
    ),
    max_tag_len=19, margin_exposure=None,  # AngelOne gives no exposure
    rate_limit_error=("error.rate_limit.txt", 403),
    statuses=ANGEL_STATUSES, status_table=tt._ANGEL_STATUSES,
    errors=(  # fixtures/README.md (AngelOne error bodies) and MAPPING.md section 4
        ErrorCase("error.AG8001.json", 200, "get_orders", tt.AuthenticationError, "AG8001"),
        ErrorCase("error.AG8002.json", 200, "get_positions", tt.AuthenticationError, "AG8002"),
        ErrorCase("error.AG8003.json", 200, "get_profile", tt.AuthenticationError, "AG8003"),
        ErrorCase("error.AG8004.json", 200, "get_funds", tt.AuthenticationError, "AG8004"),
        ErrorCase("error.AB1010.json", 200, "get_orders", tt.AuthenticationError, "AB1010"),
        ErrorCase("error.AB1011.json", 200, "get_holdings", tt.AuthenticationError, "AB1011"),
        ErrorCase("error.AB1004.json", 200, "get_positions", tt.BrokerError, "AB1004", retryable=True),
        ErrorCase("error.AB2001.json", 200, "get_trades", tt.BrokerError, "AB2001", retryable=True),
        ErrorCase("error.AB1021.json", 200, "get_orders", tt.RateLimitError, "AB1021", retryable=True),
        ErrorCase("error.rate_limit.txt", 403, "get_orders", tt.RateLimitError, None, retryable=True, also=(429,)),
        ErrorCase("place_order.AB1008.json", 200, "place_order", tt.InvalidOrderError, "AB1008"),
        ErrorCase("place_order.AB1009.json", 200, "place_order", tt.InstrumentNotFoundError, "AB1009"),
        ErrorCase("place_order.AB1012.json", 200, "place_order", tt.InvalidOrderError, "AB1012"),
        ErrorCase("place_order.AB4008.json", 200, "place_order", tt.InvalidOrderError, "AB4008"),
        ErrorCase("login.AB1000.json", 200, "login", tt.AuthenticationError, "AB1000"),
        ErrorCase("login.AB1006.json", 200, "login", tt.BrokerError, "AB1006"),
        ErrorCase("login.AB1050.json", 200, "login", tt.AuthenticationError, "AB1050"),
        # A refused renewal falls back to a full login, so no caller sees these; the auth tests
        # (section 8) serve them to a client.
        ErrorCase("renew_token.AB8050.json", 200, "renew_token", tt.AuthenticationError, "AB8050", via_client=False),
        ErrorCase("renew_token.AB8051.json", 200, "renew_token", tt.AuthenticationError, "AB8051", via_client=False),
        ErrorCase("get_holdings.AB1015.json", 200, "get_holdings", None, "AB1015"),  # "no holdings": []
        ErrorCase("get_order.AB1013.json", 200, "get_order", tt.OrderNotFoundError, "AB1013"),
    ),
    # details/{uniqueorderid}: read for orders this client knows the uniqueorderid of
    details={"get_order.json": ("261123000104562", "order_1"),
             "get_order.insufficient_funds.json": ("261123000197730", "rejected_for_funds")},
    detail_route="get_order",
    extras={"renew_token.json": "test_angel_expired_token_is_renewed_once_and_the_call_retried"},
)

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


@pytest.mark.parametrize("code, route, expected", ANGEL_ERRORS)
def test_angel_error_codes_map_to_documented_exceptions(code: str, route: str, expected: type) -> None:
    for body in ({"status": False, "message": "Some failure", "errorcode": code, "data": None},
                 {"success": False, "message": "Some failure", "errorCode": code, "data": ""}):
        with pytest.raises(tt.TTConnectError) as info:
            check_reply(tt._ANGELONE, route, tt._Response(200, {}, json.dumps(body)))
        assert type(info.value) is expected and info.value.broker_code == code
    assert tt._ANGELONE["errors"].get(code, expected) is expected


def test_every_documented_angel_code_has_a_mapping() -> None:
    documented_angel = {"AG8001", "AG8002", "AG8003", "AG8004", "AB8050", "AB8051"} | {
        f"AB{n}" for n in (1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                           1015, 1016, 1017, 1018, 1031, 1032, 2000, 2001, 2002, 4008, 1050, 1021, 4018)}
    assert documented_angel <= set(tt._ANGELONE["errors"])


def test_angel_requests_log_in_with_totp_and_carry_its_headers(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    import pyotp

    angel = rest_client(clients, "angelone", tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "angelone").all()
        angel.place_order(NIFTY_CE, 130, "SELL", "NRML", "SL_M", trigger_price=99.95, tag="stop-1")
        login = api.calls("login")[0].request
        assert json.loads(login.body) == {"clientcode": "A123456", "password": "4321",
                                          "totp": pyotp.TOTP(TOTP_SECRET).at(day_clock())}
        headers = api.calls("place_order")[0].request.headers
        assert headers["X-PrivateKey"] == "angelkey01" and headers["X-UserType"] == "USER"
        assert headers["Authorization"].startswith("Bearer eyJ") and not headers["Authorization"].startswith("Bearer Bearer")
        assert "Authorization" not in login.headers


@pytest.mark.parametrize("option, value", [("client_local_ip", 5), ("mac_address", "00:11\n"), ("client_public_ip", ["1.2.3.4"])])
def test_angel_address_options_that_no_header_takes_are_refused(option: str, value: Any, tmp_path: Path,
                                                                day_clock: FakeClock, clients: list) -> None:
    """An int raised a raw TypeError inside requests; a newline failed as a retried NetworkError."""
    angel = rest_client(clients, "angelone", tmp_path, day_clock, **{option: value})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.ConfigurationError, match=f"config '{option}' must be printable ASCII text"):
            angel.get_profile()
        assert len(rs.calls) == 0
    kept = rest_client(clients, "angelone", tmp_path / "ok", day_clock, client_local_ip="10.0.0.7")
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_profile")
        kept.get_profile()
        assert api.calls("get_profile")[0].request.headers["X-ClientLocalIP"] == "10.0.0.7"


def test_angel_holdings_without_their_list_are_malformed_not_empty(tmp_path: Path, day_clock: FakeClock,
                                                                   clients: list) -> None:
    """A reply holding the totals but no 'holdings' list read as an account with no holdings."""
    angel = contract_client(clients, ANGELONE, tmp_path, day_clock)
    reply = json.loads(ANGELONE.payload("get_holdings.json"))
    del reply["data"]["holdings"]
    with responses.RequestsMock() as rs:
        MockApi(rs, ANGELONE).on("get_holdings", body=reply)
        expect(tt.BrokerError, angel.get_holdings, "angelone get_holdings: malformed reply (field 'holdings' missing)")
    reply["data"]["holdings"] = None  # an explicit null is an empty list, as everywhere
    with responses.RequestsMock() as rs:
        MockApi(rs, ANGELONE).on("get_holdings", body=reply)
        assert angel.get_holdings() == []


def test_angel_place_modify_cancel_share_one_budget(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock)
    routes = {spec.rate for name, spec in tt._ANGELONE["routes"].items() if name in ("place_order", "modify_order", "cancel_order")}
    assert routes == {"orders"} and tt._ANGELONE["rate_limits"]["orders"][0] == (9, 1.0)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, "angelone").all()
        angel.get_profile()  # logs in first
        day_clock.slept.clear()
        for _ in range(12):
            angel.place_order(SBIN, 1, "BUY", "CNC", "MARKET")
    assert sum(day_clock.slept) == pytest.approx(1.0)  # calls 10-12 wait for the next second


def test_angel_amo_orders_are_modified_and_cancelled_as_normal() -> None:
    # The book shows AMO; modify and cancel take NORMAL (SmartAPI admin, forum topics 5177, 5188).
    assert tt._angelone_cancel_order("1", {"variety": "AMO", "ordertype": "LIMIT"}).body["variety"] == "NORMAL"
    assert tt._angelone_cancel_order("1", {"variety": "AMO", "ordertype": "STOPLOSS_LIMIT"}).body["variety"] == "STOPLOSS"
    assert tt._angelone_cancel_order("1", {"variety": "STOPLOSS"}).body["variety"] == "STOPLOSS"


def test_angel_get_order_reads_one_order_not_the_book(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = contract_client(clients, ANGELONE, tmp_path, day_clock, rate_limits={})  # AngelOne's own limits
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, ANGELONE).all()
        order_id = angel.place_order(**ORDER_1)
        day_clock.slept.clear()
        for _ in range(5):  # details/{uniqueorderid}: 10/s, where the book is 1/s
            assert angel.get_order(order_id).status is tt.OrderStatus.OPEN
        assert api.calls("get_orders") == [] and len(api.calls("get_order")) == 5
        unique = json.loads(ANGELONE.payload("place_order.json"))["data"]["uniqueorderid"]
        assert api.calls("get_order")[0].request.url.endswith(f"/order/v1/details/{unique}")
        assert day_clock.slept == []  # five reads within the 10/s budget: no waiting
        # An order this client did not place: its uniqueorderid comes from the book.
        other = ANGELONE.order_ids[2]
        assert angel.get_order(other).id == other and len(api.calls("get_orders")) == 1


def test_angel_unregistered_ip_names_the_rule_and_keeps_the_session(tmp_path: Path, day_clock: FakeClock,
                                                                     clients: list) -> None:
    angel = contract_client(clients, ANGELONE, tmp_path, day_clock, cache_session=True)
    body = json.dumps({"success": False, "errorCode": "AG7002", "data": "",
                       "message": "Access denied: Unregistered IP address. Register your IP before retrying."})
    with responses.RequestsMock() as rs:
        MockApi(rs, ANGELONE).on("get_funds", body=body)
        with pytest.raises(tt.ConfigurationError, match="registered static IP") as info:
            angel.get_funds()
        assert len(rs.calls) == 1  # no renewal, no re-login: the session is fine
    assert info.value.broker_code == "AG7002" and (tmp_path / "angelone_session.json").exists()


def test_angel_order_updates_need_only_the_jwt(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    orders_srv = WsServer(heartbeat=None)
    try:
        angel = rest_client(clients, "angelone", tmp_path, day_clock, auth_mode="manual", access_token="jwt-SECRET-9",
                            order_ws_url=orders_srv.url + "/smart-order-update", stream_reconnect_delay=0.01)
        updates: "queue.Queue[tt.Order]" = queue.Queue()
        angel.on_order_update(updates.put)  # no feed_token, no client_id: fine for order updates
        hello = orders_srv.handshakes.get(timeout=10)
        assert hello["headers"]["authorization"] == "Bearer jwt-SECRET-9"
        assert "x-feed-token" not in hello["headers"] and "x-client-code" not in hello["headers"]
        row = json.loads(ANGELONE.payload("get_orders.json"))["data"][1]
        assert stream_event(angel, lambda s: s["orders_connected"])
        orders_srv.send(json.dumps({"order-status": "AB05", "orderData": row}).encode(), opcode=1)
        assert updates.get(timeout=10).status is tt.OrderStatus.COMPLETE
    finally:
        for client in clients:
            client.close()
        orders_srv.close()


# ============================================================================
# 6c. Broker spec: Upstox
# ============================================================================

UPSTOX_STATUSES = {  # https://upstox.com/developer/api-documentation/orders (lower case on the wire)
    "put order req received": "PENDING", "validation pending": "PENDING", "open pending": "PENDING",
    "after market order req received": "PENDING", "modify after market order req received": "PENDING",
    "trigger pending": "TRIGGER_PENDING", "open": "OPEN", "modify pending": "OPEN", "modify validation pending": "OPEN",
    "modified": "OPEN", "not modified": "OPEN", "cancel pending": "OPEN", "not cancelled": "OPEN",
    "complete": "COMPLETE", "cancelled": "CANCELLED", "cancelled after market order": "CANCELLED", "rejected": "REJECTED",
}


def upstox_cancel_target(request: Any) -> str:
    """Upstox names the order in the cancel's query string."""
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(request.url).query)["order_id"][0]


# (fixture, HTTP status, route that answers it, class) for every Upstox error payload
# (fixtures/README.md, MAPPING.md section 7.4). ``None`` code: the file's own.
_UPSTOX_ERROR_ROWS = [
    ("UDAPI100050", 401, "get_profile", tt.AuthenticationError), ("UDAPI100016", 401, "login", tt.AuthenticationError),
    ("UDAPI100068", 400, "login", tt.AuthenticationError), ("UDAPI100067", 403, "get_orders", tt.AuthenticationError),
    ("UDAPI100073", 403, "get_profile", tt.AuthenticationError), ("UDAPI10005", 429, "get_orders", tt.RateLimitError),
    ("UDAPI10000", 404, "get_profile", tt.BrokerError), ("UDAPI100015", 400, "get_profile", tt.BrokerError),
    ("UDAPI100036", 400, "place_order", tt.InvalidOrderError), ("UDAPI100038", 400, "modify_order", tt.InvalidOrderError),
    ("UDAPI100060", 404, "get_order", tt.OrderNotFoundError), ("UDAPI100500", 500, "get_positions", tt.BrokerError),
    ("UDAPI1154", 403, "place_order", tt.ConfigurationError), ("UDAPI1156", 400, "place_order", tt.ConfigurationError),
    ("UDAPI100049", 403, "cancel_order", tt.OrderError), ("UDAPI1026", 400, "place_order", tt.InvalidOrderError),
    ("UDAPI1052", 400, "place_order", tt.InvalidOrderError), ("UDAPI1004", 400, "place_order", tt.InvalidOrderError),
    ("UDAPI1007", 400, "place_order", tt.InvalidOrderError), ("UDAPI1055", 400, "modify_order", tt.InvalidOrderError),
    ("UDAPI1056", 400, "modify_order", tt.InvalidOrderError), ("UDAPI1118", 400, "place_order", tt.InvalidOrderError),
    ("UDAPI1158", 400, "place_order", tt.InvalidOrderError), ("UDAPI1161", 400, "place_order", tt.OrderError),
    ("UDAPI1010", 400, "cancel_order", tt.InvalidOrderError), ("UDAPI1023", 400, "cancel_order", tt.InvalidOrderError),
    ("UDAPI100010", 400, "get_order", tt.OrderNotFoundError), ("UDAPI100040", 400, "cancel_order", tt.OrderError),
    ("UDAPI1009", 400, "place_order", tt.InstrumentNotFoundError),
    ("UDAPI1011", 400, "place_order", tt.InstrumentNotFoundError),
    ("UDAPI100011", 400, "place_order", tt.InstrumentNotFoundError),
    ("UDAPI1019", 400, "get_funds", tt.InvalidOrderError), ("UDAPI100072", 423, "get_funds", tt.BrokerError),
    *[(f"UDAPI{n}", 400, "calculate_margin", tt.InvalidOrderError) for n in range(1095, 1105)],
    ("UDAPI1108", 400, "cancel_order", tt.OrderError), ("UDAPI1109", 400, "cancel_order", tt.OrderError),
    ("UDAPI1111", 400, "place_order", tt.OrderError), ("UDAPI1113", 400, "place_order", tt.OrderError),
]

UPSTOX = Case(
    broker="upstox", master=UPSTOX_GZ, master_file="instruments.json.gz",
    creds=CREDS["upstox"], manual_creds=CREDS["upstox"],
    login_creds={"api_key": "upstoxkey01", "api_secret": "upstox-api-SECRET", "redirect_uri": "https://example.com/cb",
                 "auth_code": "upstox-CODE-1"},
    logs_in=False,
    reauth_words=("auth_code", "log in at https://api.upstox.com/v2/login/authorization/dialog"),
    placed_id="261123010452871",
    order_ids=("261123010452871", "261123010521877", "261123010639015", "261123010750348", "261123010866902",
               "261123010978413"),
    sbin_token="NSE_EQ|INE062A01020",
    body=json_body, tag_key="tag", price_key="price", tag_field="tag", price_field="price", id_field="order_id",
    placed_fields=lambda when: {"order_timestamp": when.strftime("%Y-%m-%d %H:%M:%S"), "exchange_timestamp": None},
    book_rows=("data",), position_rows=("data",),
    current_route="get_order", current_row=("data",),  # /v2/order/details?order_id=: one object
    cancel_target=upstox_cancel_target,
    live_targets=("261123010452871", "261123010639015", "261123010866902"),
    cancel_refusal=("error.UDAPI100040.json", 400),
    amo_order={"order_id": "261123012000001", "status": "after market order req received", "is_amo": True,
               "exchange_order_id": None},
    mcx_order={"order_id": "261123012000002", "exchange": "MCX", "instrument_token": "MCX_FO|440937",
               "trading_symbol": "GOLD26DECFUT", "status": "open"},
    holding_sale={"exchange": "NSE", "instrument_token": "NSE_EQ|INE062A01020", "trading_symbol": "SBIN",
                  "quantity": -5, "product": "D", "pnl": -50.0},
    mcx_position={"exchange": "MCX", "instrument_token": "MCX_FO|440937", "trading_symbol": "GOLD26DECFUT",
                  "quantity": 1, "product": "D"},
    kill_ids=("261123012000001", "261123012000002"),
    kill_targets=("261123012000001", "261123012000002"),
    mcx_label="MCX:GOLD26DECFUT",
    close_bodies=(
        {"instrument_token": "NSE_FO|52207", "transaction_type": "SELL", "quantity": 65, "product": "D",
         "order_type": "MARKET", "price": 0, "market_protection": -1},
        {"instrument_token": "NSE_FO|52161", "transaction_type": "BUY", "quantity": 30, "product": "D",
         "order_type": "MARKET", "price": 0, "market_protection": -1},
    ),
    # Upstox restates type, validity and prices on every modify (MAPPING.md section 7.5).
    modify_qty_body={"order_id": "261123010452871", "order_type": "LIMIT", "validity": "DAY", "price": 120.5,
                     "trigger_price": 0, "quantity": 130},
    modify_market_body={"order_id": "261123010452871", "order_type": "MARKET", "validity": "DAY", "price": 0,
                        "trigger_price": 0, "quantity": 65, "market_protection": -1},
    place_shapes=(
        (dict(instrument=SBIN, qty=5, side="SELL", product="CNC", order_type="MARKET", tag="exit1"),
         {"quantity": 5, "product": "D", "validity": "DAY", "price": 0, "tag": "exit1",
          "instrument_token": "NSE_EQ|INE062A01020", "order_type": "MARKET", "transaction_type": "SELL",
          "disclosed_quantity": 0, "trigger_price": 0, "is_amo": False, "slice": False, "market_protection": -1},
         True, ()),
        (dict(instrument=NIFTY_CE, qty=130, side="SELL", product="NRML", order_type="SL", price=99.0,
              trigger_price=99.95),
         {"order_type": "SL", "price": 99.0, "trigger_price": 99.95, "product": "D", "instrument_token": "NSE_FO|52207"},
         False, ("market_protection",)),
    ),
    max_tag_len=40, margin_exposure=29151.23,
    rate_limit_error=("error.UDAPI10005.json", 429),
    statuses=UPSTOX_STATUSES, status_table=tt._UPSTOX_STATUSES,
    errors=tuple(
        [ErrorCase(f"error.{code}.json", status, route, cls, code,
                   retryable=cls is tt.RateLimitError or status >= 500) for code, status, route, cls in _UPSTOX_ERROR_ROWS]
        + [ErrorCase("get_funds.UDAPI100072.json", 423, "get_funds", tt.BrokerError, "UDAPI100072"),
           # an HTML gateway page: no code, retryable (a GET)
           ErrorCase("error.html.txt", 502, "get_orders", tt.BrokerError, None, retryable=True)]),
    details={"get_order.json": ("261123010452871", "order_1")},
    detail_route="get_order",
    fund_gaps=("collateral", "m2m_unrealized", "m2m_realized"),  # Upstox v2 funds give none of them
    extras={"instruments.json": "test_upstox_master_fixture_is_the_readable_json_gzipped",
            "login.json": "test_upstox_auth_code_is_exchanged_once_and_stored",
            "get_order_history.json": "test_upstox_history_and_a_funds_rejection",
            "get_order_history.insufficient_funds.json": "test_upstox_history_and_a_funds_rejection",
            "feed_authorize.json": "test_upstox_feed_authorizes_each_connect_and_streams",
            "portfolio_authorize.json": "test_upstox_order_updates_arrive_on_the_portfolio_stream",
            "order_update.json": "test_upstox_order_updates_arrive_on_the_portfolio_stream"},
)


def test_upstox_master_fixture_is_the_readable_json_gzipped() -> None:
    import gzip

    readable = (FIXTURES / "upstox" / "instruments.json").read_bytes()
    assert gzip.decompress(UPSTOX_GZ) == readable  # the .gz is served; the .json is what a reader reviews
    assert len(json.loads(readable)) == 34


def test_upstox_auth_code_is_exchanged_once_and_stored(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    from urllib.parse import parse_qs

    config = {**UPSTOX.login_creds, "cache_dir": str(tmp_path), "cache_session": True}
    with responses.RequestsMock() as rs:
        rs.get(URLS["upstox"], body=UPSTOX_GZ)
        api = MockApi(rs, UPSTOX)
        api.on("login")
        clients.append(tt.TTConnect("upstox", config, clock=day_clock, sleep=day_clock.sleep))
        sent = api.calls("login")[0].request
        assert parse_qs(sent.body) == {"code": ["upstox-CODE-1"], "client_id": ["upstoxkey01"],
                                       "client_secret": ["upstox-api-SECRET"], "redirect_uri": ["https://example.com/cb"],
                                       "grant_type": ["authorization_code"]}
        assert "Authorization" not in sent.headers and sent.headers["Api-Version"] == "2.0"
    stored = json.loads((tmp_path / "upstox_session.json").read_text())
    login = json.loads(UPSTOX.payload("login.json"))
    assert stored["access_token"] == login["access_token"] and stored["user_id"] == "5UX9KQ"
    assert stored["expires_at"] == "2026-11-24T03:30:00+05:30"  # 03:30 IST the next day
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:  # the same cell run again
        clients.append(tt.TTConnect("upstox", config, clock=day_clock))
        assert len(rs.calls) == 0  # the single-use code is not sent twice
    with responses.RequestsMock() as rs:  # a new code is a new login: exchanged
        api = MockApi(rs, UPSTOX)
        api.on("login")
        clients.append(tt.TTConnect("upstox", {**config, "auth_code": "upstox-CODE-2"}, clock=day_clock))
        assert parse_qs(api.calls("login")[0].request.body)["code"] == ["upstox-CODE-2"]


def test_upstox_login_url_and_auth_modes(tmp_path: Path) -> None:
    assert tt.TTConnect.login_url("upstox", {"api_key": "k1", "redirect_uri": "https://x.example/cb", "state": "s"}) == (
        "https://api.upstox.com/v2/login/authorization/dialog?response_type=code&client_id=k1"
        "&redirect_uri=https%3A%2F%2Fx.example%2Fcb&state=s")
    with pytest.raises(tt.ConfigurationError, match="'redirect_uri'"):
        tt.TTConnect.login_url("upstox", {"api_key": "k1"})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.UnsupportedFeatureError, match="upstox does not support auth_mode 'auto'; it supports: manual"):
            tt.TTConnect("upstox", {"auth_mode": "auto", "cache_dir": str(tmp_path)})
        with pytest.raises(tt.ConfigurationError, match="'request_token'"):  # another broker's login
            tt.TTConnect("upstox", {"request_token": "r", "cache_dir": str(tmp_path)})
        assert len(rs.calls) == 0
    caps = tt.Capabilities(tt._UPSTOX)
    assert (caps.auto_auth, caps.native_slicing, caps.sandbox, caps.margin_with_positions) == (False, True, True, False)


def test_upstox_hosts_headers_and_sandbox(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = rest_client(clients, "upstox", tmp_path / "a", day_clock, algo_name="my-algo")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, UPSTOX).all()
        client.get_positions()
        client.place_order(SBIN, 5, "SELL", "CNC", "MARKET")
        read, order = api.calls("get_positions")[0].request, api.calls("place_order")[0].request
        assert read.url.startswith("https://api.upstox.com/v2/") and read.headers["Api-Version"] == "2.0"
        assert order.url == "https://api-hft.upstox.com/v3/order/place" and "Api-Version" not in order.headers
        assert order.headers["X-Algo-Name"] == "my-algo" and "X-Algo-Name" not in read.headers
        assert order.headers["Authorization"] == "Bearer upstox-access-SECRET-1"
        client.cancel_order(UPSTOX.placed_id)
        assert api.calls("cancel_order")[0].request.url.endswith("/v3/order/cancel?order_id=261123010452871")
    # Only root_url overridden: the orders follow it; sandbox sends orders to Upstox's sandbox.
    proxied = rest_client(clients, "upstox", tmp_path / "b", day_clock, root_url="http://127.0.0.1:9/up")
    assert proxied._urls["order_root_url"] == "http://127.0.0.1:9/up"
    sandbox = rest_client(clients, "upstox", tmp_path / "c", day_clock, sandbox=True)
    assert sandbox._urls["order_root_url"] == "https://api-sandbox.upstox.com"
    assert sandbox._urls["root_url"] == "https://api.upstox.com"
    with pytest.raises(tt.UnsupportedFeatureError, match="zerodha has no sandbox"):
        tt.TTConnect("zerodha", {**CREDS["zerodha"], "cache_dir": str(tmp_path / "d"), "sandbox": True})


@pytest.mark.parametrize("errors, cls, code, words", [
    ({"errorCode": "UDAPI1052", "message": "The order quantity cannot be zero"}, tt.InvalidOrderError, "UDAPI1052",
     "The order quantity cannot be zero (UDAPI1052, HTTP 400)"),  # one object, not a list of them
    ("Invalid order request", tt.BrokerError, None, "Invalid order request (no code, HTTP 400)"),  # a bare text
])
def test_upstox_errors_of_an_odd_shape_keep_what_the_broker_said(errors: Any, cls: type, code: Optional[str], words: str,
                                                                tmp_path: Path, day_clock: FakeClock,
                                                                clients: list) -> None:
    """Both read as 'no message (no code)'."""
    upstox = contract_client(clients, UPSTOX, tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        MockApi(rs, UPSTOX).on("get_funds", body={"status": "error", "errors": errors}, status=400)
        assert expect(cls, upstox.get_funds, f"upstox get_funds: {words}").broker_code == code


def test_upstox_history_and_a_funds_rejection(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = rest_client(clients, "upstox", tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, UPSTOX)
        api.on("get_order_history")
        history = client.get_order_history(UPSTOX.placed_id)
        assert "order_id=261123010452871" in api.calls("get_order_history")[0].request.url
    assert [o.status for o in history] == [tt.OrderStatus.PENDING] * 3 + [tt.OrderStatus.OPEN]  # oldest first
    assert all(o.pending_qty == o.qty - o.filled_qty for o in history)  # history rows have no pending_quantity
    with responses.RequestsMock() as rs:
        MockApi(rs, UPSTOX).on("get_order_history", fixture="get_order_history.insufficient_funds.json")
        rejected = client.get_order_history("261123011097730")[-1]
    # Insufficient funds is no error on Upstox: the order is accepted, then rejected.
    assert (rejected.status, rejected.pending_qty) == (tt.OrderStatus.REJECTED, 0)
    assert "You need to add Rs. 145832.50" in rejected.status_message


def test_orders_above_the_freeze_limit_are_refused_or_sliced(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                             clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    freeze = client._instruments.freeze_qty(NIFTY_CE)
    if not freeze:
        pytest.skip(f"{broker.broker}'s master gives no freeze limits")
    big = 1755 * 3  # 81 lots of 65; the limit is 1800: 27 lots (1755) per order
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker).all()
        with pytest.raises(tt.InvalidOrderError, match=f"above the exchange freeze limit of {freeze}"):
            client.place_order(NIFTY_CE, big, "BUY", "NRML", "MARKET")
        assert api.calls("place_order") == []
        ids = client.place_order(NIFTY_CE, big, "BUY", "NRML", "MARKET", slice=True)
        bodies = [broker.body(c.request) for c in api.calls("place_order")]
    qty_key = {"upstox": "quantity", "angelone": "quantity"}.get(broker.broker, "quantity")
    if broker.spec["max_slices"]:  # the broker slices by itself: one order asking for it
        assert len(bodies) == 1 and bodies[0].get("slice") is True and int(bodies[0][qty_key]) == big
    else:  # several orders of at most the limit, each with its own tag
        assert [int(b[qty_key]) for b in bodies] == [1755, 1755, 1755] and len(ids) == 3
        assert len({b[broker.tag_key] for b in bodies}) == 3


# ============================================================================
# 6d. Broker spec: the toy broker (written here; proof that a new broker is one section)
# ============================================================================
# A made-up REST broker unlike both real ones: a TSV master with its own tokens and symbols,
# an {"ok": ..., "result" | "error": {"code", "text"}} envelope with real HTTP statuses, order
# ids in the QUERY string (GET/PUT/DELETE /order?id=), reads and orders on two hosts, its own
# rate classes, codes, statuses and field names. Its payloads below describe the scenario of
# fixtures/README.md, so the shared expectations hold for it too. It is put into tt._BROKERS
# only by the ``toy`` and ``broker`` fixtures (monkeypatched), and runs the whole cross-broker
# contract with NO change to ttconnect.py.

TOY_MASTER_COLUMNS = ("token", "symbol", "segment", "kind", "underlying", "expiry", "strike_paise", "right", "lot",
                      "tick_paise")
TOY_MASTER_ROWS = (
    # the 30 canonical instruments of fixtures/README.md, with the toy's tokens and symbols
    ("TX0001", "NIFTY 50", "NSE", "IDX", "NIFTY 50", "", "", "", "0", "0"),
    ("TX0002", "NIFTY BANK", "NSE", "IDX", "NIFTY BANK", "", "", "", "0", "0"),
    ("TX0003", "INDIA VIX", "NSE", "IDX", "INDIA VIX", "", "", "", "0", "0"),
    ("TX0004", "NIFTY IT", "NSE", "IDX", "NIFTY IT", "", "", "", "0", "0"),
    ("TX0005", "SENSEX", "BSE", "IDX", "SENSEX", "", "", "", "0", "0"),
    ("TX0006", "RELIANCE", "NSE", "EQ", "RELIANCE INDUSTRIES", "", "", "", "1", "5"),
    ("TX0007", "SBIN", "NSE", "EQ", "STATE BANK OF INDIA", "", "", "", "1", "5"),
    ("TX0008", "INFY", "NSE", "EQ", "INFOSYS", "", "", "", "1", "10"),
    ("TX0009", "IDEA", "NSE", "EQ", "VODAFONE IDEA", "", "", "", "1", "1"),
    ("TX0010", "SUZLON-BE", "NSE", "EQ", "SUZLON ENERGY", "", "", "", "1", "1"),
    ("TX0011", "SBIN", "BSE", "EQ", "STATE BANK OF INDIA", "", "", "", "1", "5"),
    ("TX0012", "NIFTY-20261124-FUT", "NFO", "FUT", "NIFTY", "20261124", "", "", "65", "10"),
    ("TX0013", "NIFTY-20261229-FUT", "NFO", "FUT", "NIFTY", "20261229", "", "", "65", "10"),
    ("TX0014", "NIFTY-20261124-23400-CE", "NFO", "OPT", "NIFTY", "20261124", "2340000", "CE", "65", "5"),
    ("TX0015", "NIFTY-20261124-23400-PE", "NFO", "OPT", "NIFTY", "20261124", "2340000", "PE", "65", "5"),
    ("TX0016", "NIFTY-20261124-23500-CE", "NFO", "OPT", "NIFTY", "20261124", "2350000", "CE", "65", "5"),
    ("TX0017", "NIFTY-20261124-23500-PE", "NFO", "OPT", "NIFTY", "20261124", "2350000", "PE", "65", "5"),
    ("TX0018", "NIFTY-20261124-23600-CE", "NFO", "OPT", "NIFTY", "20261124", "2360000", "CE", "65", "5"),
    ("TX0019", "NIFTY-20261124-23600-PE", "NFO", "OPT", "NIFTY", "20261124", "2360000", "PE", "65", "5"),
    ("TX0020", "NIFTY-20261201-23500-CE", "NFO", "OPT", "NIFTY", "20261201", "2350000", "CE", "65", "5"),
    ("TX0021", "NIFTY-20261201-23500-PE", "NFO", "OPT", "NIFTY", "20261201", "2350000", "PE", "65", "5"),
    ("TX0022", "NIFTY-20261229-23500-CE", "NFO", "OPT", "NIFTY", "20261229", "2350000", "CE", "65", "5"),
    ("TX0023", "BANKNIFTY-20261124-FUT", "NFO", "FUT", "BANKNIFTY", "20261124", "", "", "30", "10"),
    ("TX0024", "BANKNIFTY-20261124-52000-CE", "NFO", "OPT", "BANKNIFTY", "20261124", "5200000", "CE", "30", "5"),
    ("TX0025", "RELIANCE-20261124-FUT", "NFO", "FUT", "RELIANCE", "20261124", "", "", "500", "10"),
    ("TX0026", "RELIANCE-20261124-1400-CE", "NFO", "OPT", "RELIANCE", "20261124", "140000", "CE", "500", "5"),
    ("TX0027", "IDEA-20261124-8.5-CE", "NFO", "OPT", "IDEA", "20261124", "850", "CE", "10000", "5"),
    ("TX0028", "SENSEX-20261126-FUT", "BFO", "FUT", "SENSEX", "20261126", "", "", "20", "5"),
    ("TX0029", "SENSEX-20261126-85000-CE", "BFO", "OPT", "SENSEX", "20261126", "8500000", "CE", "20", "5"),
    ("TX0030", "SENSEX-20261126-85000-PE", "BFO", "OPT", "SENSEX", "20261126", "8500000", "PE", "20", "5"),
    # a segment ttconnect does not load yet: skipped and counted
    ("TX9001", "GOLD-20261204-FUT", "MCX", "FUT", "GOLD", "20261204", "", "", "100", "100"),
    # malformed (a strike that is no number): skipped and counted
    ("TX9002", "NIFTY-20261124-23700-CE", "NFO", "OPT", "NIFTY", "20261124", "abc", "CE", "65", "5"),
)
TOY_MASTER = "".join("\t".join(row) + "\n" for row in (TOY_MASTER_COLUMNS,) + TOY_MASTER_ROWS).encode()


def _toy_parse_master(f: Any, stats: Any) -> Iterator[Tuple[Any, ...]]:
    """The toy's master: tab-separated, strikes and ticks in paise, expiries as YYYYMMDD."""
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    try:
        header = tuple(text.readline().rstrip("\n").split("\t"))
        if header != TOY_MASTER_COLUMNS:
            raise tt._MasterFormatError(f"not a toy master (header {header[:4]!r})")
        for line, raw in enumerate(text, 2):
            cols = raw.rstrip("\n").split("\t")
            if len(cols) != len(TOY_MASTER_COLUMNS):
                stats.bad(line, f"{len(cols)} columns")
                continue
            token, symbol, segment, kind, underlying, expiry, strike, right, lot, tick = cols
            if segment not in ("NSE", "BSE", "NFO", "BFO"):
                stats.skip(segment)
                continue
            try:
                lot_size, tick_size = int(lot), int(tick) / 100
                if kind == "IDX":
                    yield ("I", segment, tt._canonical_index_symbol(underlying), underlying, lot_size, tick_size, token,
                           symbol, None, None, None, None, 0)
                elif kind == "EQ":
                    yield ("E", segment, symbol, underlying, lot_size, tick_size, token, symbol, None, None, None, None, 0)
                elif kind in ("FUT", "OPT"):
                    und_kind = "I" if underlying in tt._INDEX_UNDERLYINGS else "E"
                    iso = dt.datetime.strptime(expiry, "%Y%m%d").date().isoformat()
                    if kind == "FUT":
                        yield ("F", segment, underlying, underlying, lot_size, tick_size, token, symbol, iso, und_kind,
                               None, None, 0)
                    elif right in ("CE", "PE"):
                        yield ("O", segment, underlying, underlying, lot_size, tick_size, token, symbol, iso, und_kind,
                               int(strike) / 100, right, 0)
                    else:
                        raise ValueError(f"right {right!r}")
                else:
                    raise ValueError(f"kind {kind!r}")
            except ValueError as exc:
                stats.bad(line, f"{symbol}: {exc}")
    finally:
        text.detach()  # the caller owns (and closes) the file


_TOY_PRODUCTS = {tt.ProductType.CNC: "C", tt.ProductType.MIS: "I", tt.ProductType.NRML: "N"}
_TOY_ORDER_TYPES = {tt.OrderType.MARKET: "MKT", tt.OrderType.LIMIT: "LMT", tt.OrderType.SL: "SL", tt.OrderType.SL_M: "SLM"}
_TOY_SIDES = {tt.Side.BUY: "B", tt.Side.SELL: "S"}
_TOY_PRODUCT_OF, _TOY_ORDER_TYPE_OF, _TOY_SIDE_OF = (tt._reverse(m) for m in (_TOY_PRODUCTS, _TOY_ORDER_TYPES, _TOY_SIDES))
_TOY_STATUSES = {
    "NEW": tt.OrderStatus.PENDING, "QUEUED_AMO": tt.OrderStatus.PENDING, "WORKING": tt.OrderStatus.OPEN,
    "STOP_WAITING": tt.OrderStatus.TRIGGER_PENDING, "FILLED": tt.OrderStatus.COMPLETE,
    "CANCELLED": tt.OrderStatus.CANCELLED, "REJECTED": tt.OrderStatus.REJECTED,
}


def _toy_headers(config: Mapping[str, Any], session: Any, route: Any) -> Dict[str, str]:
    headers = {"X-Toy-Key": str(config.get("api_key") or "")}
    if session is not None:
        headers["Authorization"] = f"Bearer {session.access_token}"
    return headers


def _toy_envelope(status: int, body: Dict[str, Any]) -> Any:
    """``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "text"}}``."""
    if status < 400 and body.get("ok") is True:
        return tt._Reply(True, body.get("result"), "", "")
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    return tt._Reply(False, None, str(error.get("code") or ""), str(error.get("text") or "no message"))


def _toy_reauth_hint(config: Mapping[str, Any], base: str) -> str:
    return "toy sessions end at 05:00 IST: copy a fresh token from the toy dashboard into 'access_token'"


def _toy_time(value: Any) -> Optional[dt.datetime]:
    return dt.datetime.fromisoformat(value) if value else None  # ISO 8601 with its offset


def _toy_profile(ctx: Any, data: Any) -> tt.Profile:
    data = tt._object(data)
    return tt.Profile(user_id=tt._str_field(data, "client"), name=str(data.get("display_name") or ""),
                      email=data.get("mail") or None, broker="toy",
                      exchanges=tuple(dict.fromkeys(tt.Exchange(s) for s in data.get("segments") or ()
                                                    if s in tt.Exchange.__members__)),
                      products=tuple(dict.fromkeys(_TOY_PRODUCT_OF[p] for p in data.get("products") or ()
                                                   if p in _TOY_PRODUCT_OF)), raw=data)


def _toy_funds(ctx: Any, data: Any) -> tt.Fund:
    data = tt._object(data)
    mtm = tt._object(data.get("mtm") or {}, "mtm")
    available, used = tt._num(data.get("available")) or 0.0, tt._num(data.get("used")) or 0.0
    return tt.Fund(available=available, used=used, total=available + used, collateral=tt._num(data.get("collateral")),
                   m2m_unrealized=tt._num(mtm.get("unrealised")), m2m_realized=tt._num(mtm.get("realised")),
                   utilised_debits=used, raw=data)


def _toy_holding(ctx: Any, row: Mapping[str, Any]) -> tt.Holding:
    avg, ltp = tt._num(row.get("avg")) or 0.0, tt._num(row.get("ltp"))
    return tt.Holding(instrument=ctx.instrument(tt._field(row, "seg"), tt._field(row, "sym")), qty=tt._int(row.get("qty")),
                      avg_price=avg, ltp=ltp, pnl=tt._num(row.get("pnl")), pnl_percent=tt._pnl_percent(avg, ltp, None),
                      raw=row)


def _toy_position(ctx: Any, row: Mapping[str, Any]) -> tt.Position:
    return tt.Position(instrument=ctx.instrument(tt._field(row, "seg"), tt._field(row, "sym")), qty=tt._int(row.get("net")),
                       avg_price=tt._num(row.get("avg")) or 0.0, ltp=tt._num(row.get("ltp")), pnl=tt._num(row.get("pnl")),
                       product=_TOY_PRODUCT_OF.get(row.get("prod")), raw=row)


def _toy_raw_status(row: Mapping[str, Any]) -> tt.OrderStatus:
    return tt._order_status(row.get("state") or "", _TOY_STATUSES, row, "filled", "qty")


def _toy_order(ctx: Any, row: Mapping[str, Any]) -> tt.Order:
    qty, filled = tt._int(row.get("qty")), tt._int(row.get("filled"))
    status = _toy_raw_status(row)
    return tt.Order(
        id=tt._str_field(row, "id"), instrument=ctx.instrument(tt._field(row, "seg"), tt._field(row, "sym")),
        side=tt._mapped(_TOY_SIDE_OF, row, "side"), qty=qty, filled_qty=filled,
        pending_qty=qty - filled if status in tt._LIVE_STATUSES else 0,
        order_type=tt._mapped(_TOY_ORDER_TYPE_OF, row, "type"), product=_TOY_PRODUCT_OF.get(row.get("prod")),
        status=status, price=tt._num(row.get("px")) or None, trigger_price=tt._num(row.get("trg")) or None,
        average_price=tt._num(row.get("avg")) or None, tag=row.get("label") or None,
        status_message=row.get("note") or None, placed_at=_toy_time(row.get("placed")),
        updated_at=_toy_time(row.get("updated")), raw=row,
    )


def _toy_one_order(ctx: Any, data: Any) -> tt.Order:
    return _toy_order(ctx, tt._object(data))


def _toy_trade(ctx: Any, row: Mapping[str, Any]) -> tt.Trade:
    qty, price = tt._int(row.get("qty")), tt._num(row.get("px")) or 0.0
    return tt.Trade(trade_id=tt._str_field(row, "fill"), order_id=tt._str_field(row, "order"),
                    instrument=ctx.instrument(tt._field(row, "seg"), tt._field(row, "sym")),
                    side=tt._mapped(_TOY_SIDE_OF, row, "side"), qty=qty, avg_price=price, trade_value=qty * price,
                    product=_TOY_PRODUCT_OF.get(row.get("prod")), timestamp=_toy_time(row.get("at")), raw=row)


def _toy_margin(ctx: Any, data: Any) -> tt.Margin:
    data = tt._object(data)
    total, final_total = tt._num(data.get("required")) or 0.0, tt._num(data.get("after_hedge")) or 0.0
    return tt.Margin(total=total, span=tt._num(data.get("span")), exposure=tt._num(data.get("exposure")),
                     option_premium=tt._num(data.get("premium")), final_total=final_total,
                     benefit=tt._paise(total - final_total), raw=data)


def _toy_order_ref(order_id: str) -> Any:
    return tt._Request(query={"id": order_id})


def _toy_place_order(req: Any) -> Any:
    body = {"sym": req.broker_symbol, "seg": req.instrument.exchange.value, "side": _TOY_SIDES[req.side],
            "qty": str(req.qty), "type": _TOY_ORDER_TYPES[req.order_type], "prod": _TOY_PRODUCTS[req.product],
            "validity": req.validity, "label": req.tag}
    if req.price is not None:
        body["px"] = tt._price_text(req.price)
    if req.trigger_price is not None:
        body["trg"] = tt._price_text(req.trigger_price)
    return tt._Request(body=body)


def _toy_placed(ctx: Any, data: Any) -> str:
    return tt._str_field(tt._object(data), "id")


def _toy_modify_order(current: tt.Order, req: Any) -> Any:
    body = {"type": _TOY_ORDER_TYPES[req.order_type], "qty": str(req.qty)}
    if req.price is not None:
        body["px"] = tt._price_text(req.price)
    if req.trigger_price is not None:
        body["trg"] = tt._price_text(req.trigger_price)
    return tt._Request(query={"id": current.id}, body=body)


def _toy_cancel_order(order_id: str, raw: Mapping[str, Any]) -> Any:
    return tt._Request(query={"id": order_id})


def _toy_margin_body(legs: Any, consider_positions: bool) -> Any:
    return tt._Request(body={"legs": [
        {"token": leg.token, "side": _TOY_SIDES[leg.side], "qty": leg.qty, "type": _TOY_ORDER_TYPES[leg.order_type],
         "prod": _TOY_PRODUCTS[leg.product], "px": float(leg.price or 0)} for leg in legs]})


TOY_SPEC = tt._broker(
    id="toy",
    name="Toy Broker (defined by the tests)",
    urls={"root_url": "https://api.toy.example", "order_root_url": "https://orders.toy.example",
          "instruments_url": "https://static.toy.example/master.tsv"},
    url_follows={"order_root_url": "root_url"},
    master=tt._Master(published=(7, 0), parse=_toy_parse_master),
    auth=(tt._Flow("access_token", tt.AuthMode.MANUAL, needs=("api_key", "access_token"), trigger=("access_token",),
                   token="access_token", signs=("api_key",), app="api_key"),),
    session_expiry=(5, 0),
    routes={
        "get_profile": tt._Route("GET", "/me", rate="reads", parse=_toy_profile),
        "get_funds": tt._Route("GET", "/funds", rate="reads", parse=_toy_funds),
        "get_holdings": tt._Route("GET", "/holdings", rate="reads", row=_toy_holding),
        "get_positions": tt._Route("GET", "/positions", rate="reads", row=_toy_position),
        "get_orders": tt._Route("GET", "/orders", rate="reads", row=_toy_order),
        "get_order": tt._Route("GET", "/order", rate="reads", about_order=True, build=_toy_order_ref,
                               parse=_toy_one_order),
        "get_trades": tt._Route("GET", "/trades", rate="reads", row=_toy_trade),
        "place_order": tt._Route("POST", "/order", "json", rate="orders", host="order_root_url", idempotent=False,
                                 about_order=True, build=_toy_place_order, parse=_toy_placed),
        "modify_order": tt._Route("PUT", "/order", "json", rate="orders", host="order_root_url", about_order=True,
                                  build=_toy_modify_order),
        "cancel_order": tt._Route("DELETE", "/order", rate="orders", host="order_root_url", about_order=True,
                                  build=_toy_cancel_order),
        "calculate_margin": tt._Route("POST", "/margin", "json", build=_toy_margin_body, parse=_toy_margin),
    },
    rate_limits={"default": [(5, 1.0)], "reads": [(4, 1.0)], "orders": [(3, 1.0), (100, 60.0)]},
    errors={"AUTH_EXPIRED": tt.AuthenticationError, "AUTH_INVALID": tt.AuthenticationError,
            "FUNDS": tt.InsufficientFundsError, "BAD_ORDER": tt.InvalidOrderError, "NO_SYMBOL": tt.InstrumentNotFoundError,
            "NO_SUCH_ORDER": tt.OrderNotFoundError, "ORDER_LOCKED": tt.OrderError, "SLOW_DOWN": tt.RateLimitError,
            "BUSY": tt.BrokerError, "EMPTY": tt.BrokerError},
    rate_limit_texts=("rate limit exceeded",),
    empty_codes=frozenset({"EMPTY"}),
    retryable_codes=frozenset({"BUSY"}),
    exchanges=frozenset({tt.Exchange.NSE, tt.Exchange.BSE, tt.Exchange.NFO, tt.Exchange.BFO}),
    products=_TOY_PRODUCTS,
    order_types=_TOY_ORDER_TYPES,
    validities=("DAY", "IOC"),
    max_tag_len=24,
    row_fields={"order_id": "id", "position_qty": "net", "exchange": "seg", "symbol": "sym"},
    has={"margin": True},
    hooks={"headers": _toy_headers, "envelope": _toy_envelope, "reauth_hint": _toy_reauth_hint,
           "raw_status": _toy_raw_status},
)


def _toy_ok(result: Any) -> Dict[str, Any]:
    return {"ok": True, "result": result}


def _toy_error(code: str, text: str) -> Dict[str, Any]:
    return {"ok": False, "error": {"code": code, "text": text}}


def _toy_row(id_: str, seg: str, sym: str, side: str, qty: int, filled: int, type_: str, prod: str, state: str,
             placed: str, updated: str, px: Optional[str] = None, trg: Optional[str] = None, avg: Optional[str] = None,
             label: Optional[str] = None, note: Optional[str] = None) -> Dict[str, Any]:
    return {"id": id_, "seg": seg, "sym": sym, "side": side, "qty": qty, "filled": filled, "type": type_, "prod": prod,
            "state": state, "px": px, "trg": trg, "avg": avg, "label": label, "note": note, "validity": "DAY",
            "placed": f"2026-11-23T{placed}+05:30", "updated": f"2026-11-23T{updated}+05:30"}


TOY_ORDERS = [  # the six orders of fixtures/README.md
    _toy_row("T1001", "NFO", "NIFTY-20261124-23500-CE", "B", 65, 0, "LMT", "N", "working", "09:20:05", "09:20:05",
             px="120.50", label="tt-strategy-1"),
    _toy_row("T1002", "NSE", "SBIN", "S", 5, 5, "MKT", "C", "filled", "09:25:10", "09:25:10", avg="790.00"),
    _toy_row("T1003", "NSE", "RELIANCE", "B", 10, 0, "SL", "I", "stop_waiting", "09:30:15", "09:30:15", px="2500.00",
             trg="2495.00"),
    _toy_row("T1004", "NSE", "INFY", "B", 1, 0, "LMT", "C", "rejected", "09:35:20", "09:35:20", px="1.00",
             note="Your order price is lower than the current lower circuit limit of 1450.10. Place an order within "
                  "the daily range."),
    _toy_row("T1005", "NFO", "NIFTY-20261124-23400-PE", "B", 130, 65, "LMT", "N", "working", "09:40:25", "09:41:02",
             px="90.00", avg="90.00"),
    _toy_row("T1006", "NFO", "NIFTY-20261124-23600-CE", "S", 65, 0, "LMT", "N", "cancelled", "09:45:30", "09:50:00",
             px="85.00"),
]
TOY_PAYLOADS: Dict[str, Any] = {
    "get_profile.json": _toy_ok({"client": "TOY-42", "display_name": "Test User", "mail": "test@example.com",
                                 "segments": ["NFO", "NSE", "BFO", "BSE", "MCX", "CDS", "NCDEX"],
                                 "products": ["N", "C", "I", "X"]}),
    "get_funds.json": _toy_ok({"available": "100000.00", "used": "25000.00", "collateral": "5000.00",
                               "mtm": {"unrealised": "1200.50", "realised": "-300.25"}}),
    "get_holdings.json": _toy_ok([
        {"seg": "NSE", "sym": "RELIANCE", "qty": 10, "avg": "2400.00", "ltp": "2450.00", "pnl": "500.00"},
        {"seg": "NSE", "sym": "SBIN", "qty": 5, "avg": "800.00", "ltp": "790.00", "pnl": "-50.00"}]),
    "get_positions.json": _toy_ok([
        {"seg": "NFO", "sym": "NIFTY-20261124-23500-CE", "net": 65, "avg": "120.50", "ltp": "130.00", "pnl": "617.50",
         "prod": "N"},
        {"seg": "NFO", "sym": "BANKNIFTY-20261124-FUT", "net": -30, "avg": "52100.00", "ltp": "52000.00",
         "pnl": "3000.00", "prod": "N"},
        {"seg": "NSE", "sym": "SBIN", "net": 0, "avg": "0", "ltp": "790.00", "pnl": "-10.00", "prod": "I"}]),
    "get_orders.json": _toy_ok(TOY_ORDERS),
    "get_orders.empty.json": _toy_ok([]),
    "get_order.json": _toy_ok(TOY_ORDERS[0]),
    "get_order.insufficient_funds.json": _toy_ok(_toy_row(
        "T1099", "NFO", "BANKNIFTY-20261124-FUT", "B", 30, 0, "LMT", "N", "rejected", "10:05:00", "10:05:00",
        px="52000.00", note="Rejected: insufficient funds (required 245832.50, available 100000.00)")),
    "get_trades.json": _toy_ok([
        {"fill": "F-501", "order": "T1002", "seg": "NSE", "sym": "SBIN", "side": "S", "qty": 5, "px": "790.00",
         "prod": "C", "at": "2026-11-23T09:25:10+05:30"},
        {"fill": "F-502", "order": "T1005", "seg": "NFO", "sym": "NIFTY-20261124-23400-PE", "side": "B", "qty": 65,
         "px": "90.00", "prod": "N", "at": "2026-11-23T09:41:02+05:30"}]),
    "place_order.json": _toy_ok({"id": "T1001"}),
    "modify_order.json": _toy_ok({"id": "T1001"}),
    "cancel_order.json": _toy_ok({"id": "T1001"}),
    "calculate_margin.json": _toy_ok({"required": 96504.98, "after_hedge": 34786.73, "span": 66832.5,
                                      "exposure": 29151.23, "premium": 521.25}),
    # errors
    "error.auth_expired.json": _toy_error("AUTH_EXPIRED", "Session expired"),
    "error.auth_invalid.json": _toy_error("AUTH_INVALID", "Unknown token"),
    "error.busy.json": _toy_error("BUSY", "Try again shortly"),
    "error.slow_down.json": _toy_error("SLOW_DOWN", "Too many calls"),
    "error.rate_limit.txt": "Rate limit exceeded. Retry in a moment.",  # the gateway's, not JSON
    "place_order.funds.json": _toy_error("FUNDS", "Not enough funds: required 245832.50, available 100000.00"),
    "place_order.bad_order.json": _toy_error("BAD_ORDER", "qty must be a multiple of 65"),
    "place_order.no_symbol.json": _toy_error("NO_SYMBOL", "Unknown symbol"),
    "get_order.not_found.json": _toy_error("NO_SUCH_ORDER", "No order T1001"),
    "cancel_order.locked.json": _toy_error("ORDER_LOCKED", "The order is being modified"),
    "get_holdings.empty.json": _toy_error("EMPTY", "No holdings"),
}


def toy_cancel_target(request: Any) -> str:
    return query_of(request)["id"]


TOY = Case(
    broker="toy", master=TOY_MASTER, master_file=None,
    creds={"api_key": "toykey01", "access_token": "toy-access-SECRET-1"},
    manual_creds={"api_key": "toykey01", "access_token": "toy-access-SECRET-1"},
    login_creds=None, logs_in=False,
    reauth_words=("copy a fresh token from the toy dashboard",),
    placed_id="T1001",
    order_ids=("T1001", "T1002", "T1003", "T1004", "T1005", "T1006"),
    sbin_token="TX0007",
    body=json_body, tag_key="label", price_key="px", tag_field="label", price_field="px", id_field="id",
    placed_fields=lambda when: {"placed": when.isoformat()},
    book_rows=("result",), position_rows=("result",),
    current_route="get_order", current_row=("result",),
    cancel_target=toy_cancel_target,
    live_targets=("T1001", "T1003", "T1005"),
    cancel_refusal=("cancel_order.locked.json", 409),
    amo_order={"id": "T2001", "state": "queued_amo"},
    mcx_order={"id": "T2002", "seg": "MCX", "sym": "GOLD-20261204-FUT", "state": "working"},
    mcx_position={"seg": "MCX", "sym": "GOLD-20261204-FUT", "net": 1, "prod": "N"},
    holding_sale={"seg": "NSE", "sym": "SBIN", "net": -5, "prod": "C", "pnl": -50.0},
    kill_ids=("T2001", "T2002"),
    kill_targets=("T2001", "T2002"),
    mcx_label="MCX:GOLD-20261204-FUT",
    close_bodies=({"sym": "NIFTY-20261124-23500-CE", "side": "S", "qty": "65", "prod": "N", "type": "MKT"},
                  {"sym": "BANKNIFTY-20261124-FUT", "side": "B", "qty": "30", "prod": "N", "type": "MKT"}),
    modify_qty_body={"type": "LMT", "qty": "130", "px": "120.5"},
    modify_market_body={"type": "MKT", "qty": "65"},
    place_shapes=(
        (ORDER_1, {"sym": "NIFTY-20261124-23500-CE", "seg": "NFO", "side": "B", "qty": "65", "type": "LMT",
                   "prod": "N", "px": "120.5", "validity": "DAY", "label": "tt-strategy-1"}, True, ()),
        (dict(instrument=SBIN, qty=5, side="SELL", product="CNC", order_type="MARKET"),
         {"sym": "SBIN", "seg": "NSE", "side": "S", "type": "MKT", "prod": "C"}, False, ("px", "trg")),
    ),
    max_tag_len=24, margin_exposure=29151.23,
    rate_limit_error=("error.slow_down.json", 429),
    statuses={"working": "OPEN", "new": "PENDING", "queued_amo": "PENDING", "stop_waiting": "TRIGGER_PENDING",
              "filled": "COMPLETE", "cancelled": "CANCELLED", "rejected": "REJECTED"},
    status_table=_TOY_STATUSES,
    errors=(
        ErrorCase("error.auth_expired.json", 401, "get_orders", tt.AuthenticationError, "AUTH_EXPIRED"),
        ErrorCase("error.auth_invalid.json", 403, "get_profile", tt.AuthenticationError, "AUTH_INVALID"),
        ErrorCase("error.busy.json", 503, "get_positions", tt.BrokerError, "BUSY", retryable=True),
        ErrorCase("error.slow_down.json", 429, "get_funds", tt.RateLimitError, "SLOW_DOWN", retryable=True),
        # not JSON, and not 429: the text alone says "slow down"
        ErrorCase("error.rate_limit.txt", 503, "get_orders", tt.RateLimitError, None, retryable=True),
        ErrorCase("place_order.funds.json", 422, "place_order", tt.InsufficientFundsError, "FUNDS"),
        ErrorCase("place_order.bad_order.json", 422, "place_order", tt.InvalidOrderError, "BAD_ORDER"),
        ErrorCase("place_order.no_symbol.json", 422, "place_order", tt.InstrumentNotFoundError, "NO_SYMBOL"),
        ErrorCase("get_order.not_found.json", 404, "get_order", tt.OrderNotFoundError, "NO_SUCH_ORDER"),
        ErrorCase("cancel_order.locked.json", 409, "cancel_order", tt.OrderError, "ORDER_LOCKED"),
        ErrorCase("get_holdings.empty.json", 404, "get_holdings", None, "EMPTY"),  # "no holdings": []
    ),
    details={"get_order.json": ("T1001", "order_1"), "get_order.insufficient_funds.json": ("T1099", "rejected_for_funds")},
    detail_route="get_order",
    own_spec=TOY_SPEC, payloads=TOY_PAYLOADS,
)


@pytest.fixture
def toy(monkeypatch: Any) -> Case:
    """The toy broker, registered for one test (the client looks brokers up at construction)."""
    monkeypatch.setitem(tt._BROKERS, "toy", TOY_SPEC)
    return TOY


def test_the_toy_broker_lives_in_this_file_only() -> None:
    assert "toy" not in Path(tt.__file__).read_text(encoding="utf-8").lower()
    assert "toy" not in tt._BROKERS  # registered per test, by the toy and broker fixtures


def test_toy_master_describes_the_canonical_instruments(toy: Case, tmp_path: Path, clock: FakeClock,
                                                       clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    client = open_client(clients, "toy", tmp_path, clock, TOY_MASTER)
    with responses.RequestsMock() as rs:
        rs.get(TOY_SPEC["urls"]["instruments_url"], body=TOY_MASTER)
        assert client.refresh_instruments() == {"rows": 30, "skipped": {"MCX": 1}, "malformed": 1, "duplicates": 0}
    db = sqlite3.connect(tmp_path / "instruments.db")
    assert dict(db.execute("SELECT broker_id, COUNT(*) FROM broker_tokens GROUP BY broker_id")) == {"toy": 30, "zerodha": 30}
    assert db.execute("SELECT COUNT(*) FROM instruments").fetchone()[0] == 30  # the same 30 canonical rows
    db.close()
    idea = tt.Option(exchange="NFO", symbol="IDEA", expiry="2026-11-24", strike="8.5", option_type="CE")
    assert (kite.resolve(NIFTY_CE), client.resolve(NIFTY_CE)) == ("13364994", "TX0016")
    assert (client.resolve(idea), client.resolve(tt.Index(exchange="NSE", symbol="NIFTY 50"))) == ("TX0027", "TX0001")
    assert client.resolve(tt.Equity(exchange="BSE", symbol="SBIN")) == "TX0011"
    assert (client.lot_size(idea), client.tick_size(tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-11-24"))) == (10000, 0.1)


def test_toy_orders_go_to_their_own_host_with_ids_in_the_query(toy: Case, tmp_path: Path, day_clock: FakeClock,
                                                              clients: list) -> None:
    client = rest_client(clients, "toy", tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, toy).all()
        client.modify_order("T1001", price=121.0)
        client.cancel_order("T1001")
        client.get_orders()
        sent = [(c.request.method, c.request.url) for c in rs.calls]
        assert sent == [
            ("GET", "https://api.toy.example/order?id=T1001"), ("PUT", "https://orders.toy.example/order?id=T1001"),
            ("GET", "https://api.toy.example/order?id=T1001"), ("DELETE", "https://orders.toy.example/order?id=T1001"),
            ("GET", "https://api.toy.example/orders")]
        assert json_body(api.calls("modify_order")[0].request) == {"type": "LMT", "qty": "65", "px": "121"}
        headers = api.calls("cancel_order")[0].request.headers
        assert headers["X-Toy-Key"] == "toykey01" and headers["Authorization"] == "Bearer toy-access-SECRET-1"
    # The order host follows an overridden root_url unless given itself.
    moved = rest_client(clients, "toy", tmp_path / "moved", day_clock, root_url="http://127.0.0.1:9")
    assert moved._urls["order_root_url"] == "http://127.0.0.1:9"


# ============================================================================
# 6z. The registry: one case table per broker, and the cross-broker contract
# ============================================================================

CASES = (ZERODHA, ANGELONE, UPSTOX, TOY)
CASE = {case.broker: case for case in CASES}
REFERENCE = ZERODHA  # the strategy's results on every broker must equal its results here
DOCS = {"README.md", "MAPPING.md"}  # fixtures/ documentation, not payloads


@pytest.fixture(params=[case.broker for case in CASES])
def broker(request: Any, monkeypatch: Any) -> Case:
    """Each broker's case table in turn; a broker this file brings (the toy) is registered for the test."""
    case = CASE[request.param]
    if case.own_spec is not None:
        monkeypatch.setitem(tt._BROKERS, case.broker, case.own_spec)
    return case


def _error_params(keep: Callable[[ErrorCase], bool] = lambda e: True) -> List[Any]:
    return [pytest.param(case.broker, entry, id=f"{case.broker}-{entry.file}")
            for case in CASES for entry in case.errors if keep(entry)]


def test_every_registered_broker_has_a_case_table() -> None:
    """Every broker that talks HTTP runs the fixture contract; one that answers its routes in
    process (paper) has no wire to fake and runs the contract in its own section (6e)."""
    http = {b for b, spec in tt._BROKERS.items() if "local" not in spec["hooks"]}
    missing = http - set(CASE)
    assert not missing, f"add a Case for {sorted(missing)} (section 6)"
    assert set(tt._BROKERS) - http == {"paper"}


# What only a broker's section and the registry may name: brokers, their credential keys (config
# keys a flow takes; the session's own tokens are canonical SessionData fields) and the field
# names of their payloads.
BROKER_WORDS = ("zerodha", "kite", "angel", "smartapi", "upstox", "api_key", "api_secret", "request_token",
                "client_id", "totp", "auth_code", "redirect_uri", "tradingsymbol", "orderid", "error_type",
                "errorcode", "jwt", "instrument_key", "trading_symbol", "exchange_token", r"\bpaper\b")


def test_no_broker_is_named_outside_its_section_and_the_registry() -> None:
    import re

    lines = (HERE / "ttconnect.py").read_text().splitlines()
    pattern = re.compile("|".join(BROKER_WORDS) + r"|\bpin\b", re.I)
    section, offenders = "", []
    for number, line in enumerate(lines, 1):
        banner = re.match(r"^# (\d+[a-z]?)\. ", line)
        if banner:
            section = banner.group(1)
        in_broker_section = section.startswith("6") and section != "6"  # 6a..6y: the brokers; 6z: the registry
        usage_example = section == ""  # the module docstring shows a config, as a user writes it
        words = pattern.findall(line)
        cli_paper = section == "11" and {w.lower() for w in words} == {"paper"}  # the spec's 'demo' and 'paper' commands
        if not (in_broker_section or usage_example or cli_paper) and words:
            offenders.append(f"{number}: {line.strip()[:100]}")
    assert offenders == [], "broker specifics outside the broker sections:\n" + "\n".join(offenders)
    banners = [line for line in lines if re.match(r"^# \d+[a-z]?\. ", line)]
    assert "# 6z. The registry" in banners and banners.index("# 6z. The registry") > banners.index("# 6b. Broker spec: AngelOne")
    assert not re.search(r"broker(_id)?\s*==\s*['\"]", "\n".join(lines))  # no branching on a broker's name


def test_every_fixture_file_is_read_by_some_case() -> None:
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*") if p.is_file() and p.name not in DOCS}
    named = {f"{case.broker}/{name}" for case in CASES if case.payloads is None for name in case.referenced()}
    assert sorted(on_disk - named) == []  # every file is some case's
    assert sorted(named - on_disk) == []  # every file a case names exists
    assert set(TOY_PAYLOADS) == TOY.referenced()  # the same for the toy's in-file payloads
    for case in CASES:
        for name, test in case.extras.items():
            # An extra names the test that reads it; that test must exist and serve it.
            source = inspect.getsource(globals()[test])
            route = name.split(".", 1)[0]
            assert name in source or f'"{route}"' in source, (case.broker, name, test)


def test_same_strategy_runs_unchanged_on_every_broker(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                      clients: list) -> None:
    runs = {}
    for case in [REFERENCE] if broker is REFERENCE else [REFERENCE, broker]:
        client = contract_client(clients, case, tmp_path / case.broker, day_clock, warm=False, rate_limits={})
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            api = MockApi(rs, case).all()
            runs[case.broker] = run_strategy(client)
            # Every route payload the API served was read, but those another test reads (extras).
            unread = {f"{route}.json" for route in api.registered if not api.calls(route)}
            assert unread <= set(case.extras), unread
    res, ref = runs[broker.broker], runs[REFERENCE.broker]
    assert res["placed"] == res["modified"] == res["cancelled"] == broker.placed_id
    # Real values from the real-shaped payloads, the same on every broker.
    expected_funds = tt.Fund(available=100000.0, used=25000.0, total=125000.0, collateral=5000.0,
                             m2m_unrealized=1200.5, m2m_realized=-300.25, utilised_debits=25000.0)
    assert res["funds"] == dataclasses.replace(expected_funds, **dict.fromkeys(broker.fund_gaps))
    assert [(str(h.instrument), h.qty, h.avg_price, h.ltp, h.pnl) for h in res["holdings"]] == [
        ("NSE:RELIANCE", 10, 2400.0, 2450.0, 500.0), ("NSE:SBIN", 5, 800.0, 790.0, -50.0)]
    assert res["holdings"][0].pnl_percent == pytest.approx(2.0833333)
    assert [(str(p.instrument), p.qty, p.avg_price, p.product) for p in res["positions"]] == [
        ("NFO:NIFTY 2026-11-24 23500 CE", 65, 120.5, tt.ProductType.NRML),
        ("NFO:BANKNIFTY FUT 2026-11-24", -30, 52100.0, tt.ProductType.NRML)]
    assert [o.status for o in res["orders"]] == [
        tt.OrderStatus.OPEN, tt.OrderStatus.COMPLETE, tt.OrderStatus.TRIGGER_PENDING, tt.OrderStatus.REJECTED,
        tt.OrderStatus.PARTIALLY_FILLED, tt.OrderStatus.CANCELLED]
    assert [o.id for o in res["orders"]] == list(broker.order_ids)
    sl = res["orders"][2]
    assert (sl.order_type, sl.price, sl.trigger_price, sl.product) == (tt.OrderType.SL, 2500.0, 2495.0, tt.ProductType.MIS)
    partial = res["orders"][4]
    assert (partial.qty, partial.filled_qty, partial.pending_qty) == (130, 65, 65)
    assert res["orders"][0].placed_at == ist(2026, 11, 23, 9, 20, 5)
    assert [(t.qty, t.avg_price, t.trade_value, t.timestamp) for t in res["trades"]] == [
        (5, 790.0, 3950.0, ist(2026, 11, 23, 9, 25, 10)), (65, 90.0, 5850.0, ist(2026, 11, 23, 9, 41, 2))]
    m = res["margin"]
    assert (m.total, m.final_total, m.benefit, m.span, m.option_premium) == (96504.98, 34786.73, 61718.25, 66832.5, 521.25)
    assert m.exposure == broker.margin_exposure
    assert res["order"].tag == "tt-strategy-1" and res["order"].status is tt.OrderStatus.OPEN
    assert res["profile"].name == "Test User" and tt.Exchange.NFO in res["profile"].exchanges
    assert res["profile"].broker == broker.broker
    for key in res:
        if key not in ("placed", "modified", "cancelled", "margin", "funds"):
            assert canonical(res[key]) == canonical(ref[key]), key


def test_place_requests_have_the_documented_shape(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                  clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker).all()
        for i, (order, fields, exact, absent) in enumerate(broker.place_shapes):
            assert client.place_order(**order) == broker.placed_id
            body = broker.body(api.calls("place_order")[i].request)
            if "tag" in order:  # a user's tag goes out made unique: "<tag>-" + 4 hex digits
                sent = body[broker.tag_key]
                assert sent.startswith(order["tag"] + "-") and len(sent) == len(order["tag"]) + 5, sent
                body[broker.tag_key] = order["tag"]
            assert (body if exact else {k: body.get(k) for k in fields}) == fields
            assert not set(absent) & set(body)
            if "tag" not in order:  # a tag of the library's own, to find the order again after a timeout
                assert body[broker.tag_key].startswith("tt") and len(body[broker.tag_key]) <= broker.max_tag_len


def test_every_documented_status_maps(broker: Case, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="ttconnect")
    table = broker.status_table
    for raw, expected in broker.statuses.items():
        assert tt._order_status(raw, table, {"f": 0, "q": 10}, "f", "q").value == expected, raw
    assert not caplog.records  # none fell through to "unknown"
    live = next(raw for raw, status in broker.statuses.items() if status == "OPEN")
    assert tt._order_status(live, table, {"f": 4, "q": 10}, "f", "q") is tt.OrderStatus.PARTIALLY_FILLED
    assert tt._order_status(live, table, {"f": "abc", "q": 10}, "f", "q") is tt.OrderStatus.OPEN  # unreadable: live
    assert tt._order_status("SOMETHING NEW", table, {}, "f", "q") is tt.OrderStatus.PENDING  # unknown: not terminal
    assert any("unknown order status" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("broker, entry", _error_params(), indirect=["broker"])
def test_every_error_payload_maps_through_the_central_check(broker: Case, entry: ErrorCase) -> None:
    spec = broker.spec
    route = spec["routes"].get(entry.route) or broker.unwired[entry.route]
    for status in (entry.status,) + entry.also:
        resp = tt._Response(status, {}, broker.payload(entry.file))
        if entry.expected is None:  # the broker's way of saying "nothing to list"
            assert tt._check_reply(spec, entry.route, route, resp) is None
            continue
        with pytest.raises(tt.TTConnectError) as info:
            tt._check_reply(spec, entry.route, route, resp)
        assert type(info.value) is entry.expected
        assert info.value.broker_code == entry.code and info.value.http_status == status
        assert f"HTTP {status}" in str(info.value)
        if status == entry.status:
            assert info.value.retryable is entry.retryable


@pytest.mark.parametrize("broker, entry", _error_params(lambda e: e.via_client), indirect=["broker"])
def test_every_error_payload_reaches_the_caller_as_its_class(broker: Case, entry: ErrorCase, tmp_path: Path,
                                                             day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock, warm=False)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker).all(entry.route)
        api.on(entry.route, fixture=entry.file, status=entry.status)
        if entry.expected is None:
            assert provoke(client, broker, entry.route, tmp_path, day_clock, clients) == []
        else:
            with pytest.raises(entry.expected) as info:
                provoke(client, broker, entry.route, tmp_path, day_clock, clients)
            assert type(info.value) is entry.expected and info.value.broker_code == entry.code
        assert api.calls(entry.route)  # the payload was served


DETAILS = {  # one order's state as the scenario gives it: (fields, a fragment of its status message)
    "order_1": (dict(instrument="NFO:NIFTY 2026-11-24 23500 CE", side=tt.Side.BUY, qty=65, filled_qty=0, pending_qty=65,
                     order_type=tt.OrderType.LIMIT, product=tt.ProductType.NRML, status=tt.OrderStatus.OPEN, price=120.5,
                     trigger_price=None, average_price=None, tag="tt-strategy-1", placed_at=ist(2026, 11, 23, 9, 20, 5)),
                None),
    "rejected_for_funds": (dict(instrument="NFO:BANKNIFTY FUT 2026-11-24", side=tt.Side.BUY, qty=30, filled_qty=0,
                                pending_qty=0, order_type=tt.OrderType.LIMIT, product=tt.ProductType.NRML,
                                status=tt.OrderStatus.REJECTED, price=52000.0, trigger_price=None, average_price=None,
                                tag=None, placed_at=ist(2026, 11, 23, 10, 5)),
                           "insufficient funds"),
}


def knows_order(client: tt.TTConnect, broker: Case, payload: str, order_id: str) -> None:
    """Where a broker addresses one order by its own key (AngelOne's uniqueorderid), make the
    client know it, as it does for the orders it places and the ones its book lists."""
    ref = broker.spec["hooks"].get("order_ref")
    if ref is not None:
        reply = json.loads(broker.payload(payload))
        client._order_refs[order_id] = ref(reply["data"])


def test_one_order_replies_read_as_the_scenario_says(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                     clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    for name, (order_id, kind) in broker.details.items():
        knows_order(client, broker, name, order_id)
        with responses.RequestsMock() as rs:
            api = MockApi(rs, broker)
            api.on(broker.detail_route, fixture=name)
            order = client.get_order(order_id)
            assert len(api.calls(broker.detail_route)) == 1
        fields, words = DETAILS[kind]
        got = {key: str(order.instrument) if key == "instrument" else getattr(order, key) for key in fields}
        assert (order.id, got) == (order_id, fields), name
        if words is None:
            assert order.status_message is None
        else:
            assert words in order.status_message.lower()


def test_an_empty_order_book_reads_as_no_orders(broker: Case, tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, broker)
        api.on("get_orders", fixture=broker.empty_book)
        assert client.get_orders() == []
        assert client.cancel_all_orders() == ([], [])
        assert len(api.calls("get_orders")) == 2


# ============================================================================
# 6e. The paper broker (offline: its routes answered in-process)
# ============================================================================

PAPER_DAY = ist(2026, 12, 2, 10, 0)  # a Wednesday, a trading day


@pytest.fixture
def paper_clock() -> FakeClock:
    return FakeClock(PAPER_DAY)


def paper_client(clients: list, tmp_path: Path, clock: FakeClock, **config: Any) -> tt.TTConnect:
    client = tt.TTConnect("paper", {"cache_dir": str(tmp_path), **config}, clock=clock)
    clients.append(client)
    return client


@pytest.fixture
def scripted(tmp_path: Path) -> str:
    """A tick file with no ticks: prices then come only from ``push`` (scripted paths)."""
    path = tmp_path / "no-ticks.jsonl"
    path.write_text("")
    return str(path)


def push(client: tt.TTConnect, instrument: Any, ltp: float, bid: Optional[float] = None,
         ask: Optional[float] = None) -> None:
    """One price update of a scripted path, as the feed would deliver it."""
    engine = client._local
    token = client.resolve(instrument)
    quote = tt._PaperQuote(round(ltp * 100), round((bid or ltp) * 100), round((ask or ltp) * 100), client._clock())
    with engine.lock:
        engine._quotes[token] = quote
        engine.on_quote(token, quote)


PAPER_SBIN = tt.Equity(exchange="NSE", symbol="SBIN")
PAPER_ITC = tt.Equity(exchange="NSE", symbol="ITC")


def paper_option(client: tt.TTConnect, strike: float = 23500, option_type: str = "CE", nth: int = 0) -> tt.Option:
    expiry = client.expiries("NIFTY")[nth]
    return tt.Option(exchange="NFO", symbol="NIFTY", expiry=expiry, strike=strike, option_type=option_type)


def test_paper_universe_follows_nse_expiry_rules(tmp_path: Path, clients: list) -> None:
    # 17 Nov 2026 (a Tuesday): Guru Nanak Jayanti on Tue 24 Nov moves that week's expiry and
    # November's monthly one to Mon 23 Nov; Republic Day moves January's to Mon 25 Jan.
    client = paper_client(clients, tmp_path, FakeClock(ist(2026, 11, 17, 9, 30)))
    d = dt.date
    assert client.expiries("NIFTY") == [d(2026, 11, 17), d(2026, 11, 23), d(2026, 12, 1), d(2026, 12, 8),
                                        d(2026, 12, 29), d(2027, 1, 25)]
    assert client.expiries("BANKNIFTY") == client.expiries("FINNIFTY") == [d(2026, 11, 23), d(2026, 12, 29),
                                                                            d(2027, 1, 25)]
    chain = client.option_chain("NIFTY", "2026-12-01")
    assert len(chain) == 190 and (chain[0].strike, chain[-1].strike) == (21150, 25850)  # 10% each side
    nifty_fut = tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-11-23")
    bank_opt = tt.Option(exchange="NFO", symbol="BANKNIFTY", expiry="2026-12-29", strike=56000, option_type="PE")
    assert (client.lot_size(nifty_fut), client.tick_size(nifty_fut)) == (65, 0.1)
    assert (client.lot_size(bank_opt), client.tick_size(bank_opt)) == (30, 0.05)
    assert client.lot_size(tt.Future(exchange="NFO", symbol="FINNIFTY", expiry="2026-12-29")) == 60
    assert client._instruments.freeze_qty(bank_opt) == 600
    ticks = {s: client.tick_size(tt.Equity(exchange="NSE", symbol=s)) for s in ("TATASTEEL", "SBIN", "TCS", "MARUTI")}
    assert ticks == {"TATASTEEL": 0.01, "SBIN": 0.05, "TCS": 0.1, "MARUTI": 1.0}
    assert len([i for i in client.search("", exchange="NSE", limit=500) if isinstance(i, tt.Equity)]) == 50
    assert client.resolve(bank_opt) == "NFO:BANKNIFTY 2026-12-29 56000 PE"  # a paper token is the instrument's text
    with pytest.raises(tt.InstrumentNotFoundError):  # not a listed strike
        client.resolve(tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-12-01", strike=23525, option_type="CE"))
    with pytest.raises(tt.InstrumentNotFoundError):  # no weekly BANKNIFTY
        client.resolve(tt.Option(exchange="NFO", symbol="BANKNIFTY", expiry="2026-12-01", strike=56000,
                                 option_type="CE"))


def test_paper_universe_after_the_close_is_the_next_sessions(tmp_path: Path, clients: list) -> None:
    client = paper_client(clients, tmp_path, FakeClock(ist(2026, 12, 1, 16, 0)))  # Tuesday's expiry is over
    assert client.expiries("NIFTY")[0] == dt.date(2026, 12, 8)


def test_paper_index_levels_stay_inside_their_listed_strikes(tmp_path: Path, clients: list) -> None:
    """The walk's level wanders about the seed level: each index stays inside its chain. Every
    day's opening level of two years is 2% (two intraday swings) inside it, and the price at
    10:00 and 15:00 of every 20th day inside it, for three seeds (at +-20 strikes NIFTY left its
    chain one week in six)."""
    import math

    start = ist(2026, 1, 1, 10, 0).timestamp()
    for seed in (0, 1, "demo"):
        client = paper_client(clients, tmp_path / str(seed), FakeClock(ist(2026, 12, 7, 10, 0)), seed=seed)
        source = client._local.source
        for symbol in ("NIFTY", "BANKNIFTY", "FINNIFTY"):
            chain = client.option_chain(symbol, client.expiries(symbol)[0])
            low, high = chain[0].strike, chain[-1].strike
            walk = source.prices._walk(tt.Index(exchange="NSE", symbol=symbol))
            opens = [walk.base * math.exp(walk._open(day)) for day in range(730)]
            assert low * 1.02 < min(opens) and max(opens) * 1.02 < high, (seed, symbol, low, min(opens), max(opens))
            prices = [source.quote(f"NSE:{symbol}", start + day * 86400 + hours * 3600).ltp / 100
                      for day in range(0, 730, 20) for hours in (0, 5)]
            assert low < min(prices) and max(prices) < high
        client.close()


def test_parse_instrument_reads_exactly_what_str_prints(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    kinds = [PAPER_SBIN, tt.Index(exchange="NSE", symbol="NIFTY"), tt.Index(exchange="NSE", symbol="BANKNIFTY"),
             tt.Future(exchange="NFO", symbol="NIFTY", expiry=client.expiries("NIFTY")[-3]), paper_option(client),
             tt.Equity(exchange="NSE", symbol="M&M"), tt.Equity(exchange="NSE", symbol="BAJAJ-AUTO")]
    for inst in kinds:
        assert tt.parse_instrument(str(inst)) == inst and type(tt.parse_instrument(str(inst))) is type(inst)
    for text in ("SBIN", "NSE:", ":SBIN", "NSE:sbin", "XYZ:SBIN", "NFO:NIFTY 2026-13-01 23500 CE", "NFO:NIFTY FUT 20261229",
                 "NFO:NIFTY 2026-12-29 abc CE", "NSE: SBIN", None, 7):
        with pytest.raises(ValueError, match="write one of: 'NSE:SBIN' .an equity., 'NSE:NIFTY' .an index."):
            tt.parse_instrument(text)  # type: ignore[arg-type]
    with pytest.raises(tt.InstrumentNotFoundError):  # well formed, not listed
        tt.parse_instrument("NSE:NOSUCHSTOCK")


def test_an_instrument_at_the_edges_prints_as_it_is_read_or_is_refused() -> None:
    """No client open (so no listing is checked): strikes with an exponent in repr are printed
    without one (1e-05 was refused when read back); an aware expiry at year 1 is refused."""
    for strike, shown in ((1e-05, "0.00001"), (2.5e-07, "0.00000025"), (23500.05, "23500.05"), (1e16, "10000000000000000")):
        option = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-12-29", strike=strike, option_type="CE")
        assert str(option) == f"NFO:NIFTY 2026-12-29 {shown} CE"
        assert tt._instrument_parts(str(option)) == (tt.Option, {"exchange": "NFO", "symbol": "NIFTY",
                                                                 "expiry": "2026-12-29", "strike": shown,
                                                                 "option_type": "CE"})
    edge = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5)))  # IST of it is before year 1
    with pytest.raises(tt.InvalidInstrumentError, match="beyond the dates"):
        tt.Future(exchange="NFO", symbol="NIFTY", expiry=edge)


def test_paper_market_and_limit_orders_fill_at_the_touch(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                         scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.00, bid=899.95, ask=900.05)
    market = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    order = client.get_order(market)
    assert (order.status, order.average_price, order.filled_qty) == (tt.OrderStatus.COMPLETE, 900.05, 10)  # the ask
    buy = client.place_order(PAPER_SBIN, 5, "BUY", "CNC", "LIMIT", price=899.0)
    sell = client.place_order(PAPER_SBIN, 4, "SELL", "CNC", "LIMIT", price=901.0)
    assert {client.get_order(i).status for i in (buy, sell)} == {tt.OrderStatus.OPEN}
    push(client, PAPER_SBIN, 899.50, bid=899.45, ask=899.55)  # not yet
    assert client.get_order(buy).status is tt.OrderStatus.OPEN
    push(client, PAPER_SBIN, 898.50, bid=898.45, ask=898.55)  # gapped through the limit: filled at the ask, better
    assert (client.get_order(buy).status, client.get_order(buy).average_price) == (tt.OrderStatus.COMPLETE, 898.55)
    push(client, PAPER_SBIN, 901.00, bid=901.00, ask=901.05)  # the bid reaches the limit: filled at it
    assert (client.get_order(sell).status, client.get_order(sell).average_price) == (tt.OrderStatus.COMPLETE, 901.0)
    # without depth (a quote that has only a last price), the last price is the touch
    push(client, PAPER_SBIN, 902.00)
    again = client.place_order(PAPER_SBIN, 1, "SELL", "CNC", "MARKET")
    assert client.get_order(again).average_price == 902.0
    trades = client.get_trades()
    assert [(t.side, t.qty, t.avg_price) for t in trades] == [
        (tt.Side.BUY, 10, 900.05), (tt.Side.BUY, 5, 898.55), (tt.Side.SELL, 4, 901.0), (tt.Side.SELL, 1, 902.0)]
    # a marketable limit fills at once, at the touch
    now = client.place_order(PAPER_SBIN, 2, "BUY", "CNC", "LIMIT", price=905.0)
    assert client.get_order(now).average_price == 902.0


def test_paper_stop_orders_trigger_exactly_at_their_trigger(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                            scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 20, "BUY", "CNC", "MARKET")
    sl_m = client.place_order(PAPER_SBIN, 10, "SELL", "CNC", "SL_M", trigger_price=895.0)
    sl = client.place_order(PAPER_SBIN, 10, "SELL", "CNC", "SL", price=893.0, trigger_price=894.0)
    buy_stop = client.place_order(PAPER_SBIN, 3, "BUY", "MIS", "SL", price=906.0, trigger_price=905.0)
    assert {client.get_order(i).status for i in (sl_m, sl, buy_stop)} == {tt.OrderStatus.TRIGGER_PENDING}
    push(client, PAPER_SBIN, 895.05)
    assert client.get_order(sl_m).status is tt.OrderStatus.TRIGGER_PENDING
    push(client, PAPER_SBIN, 895.0, bid=894.95, ask=895.05)  # triggered: a market sell at the bid
    assert (client.get_order(sl_m).status, client.get_order(sl_m).average_price) == (tt.OrderStatus.COMPLETE, 894.95)
    push(client, PAPER_SBIN, 893.5, bid=892.5, ask=893.55)  # triggered, but the bid is below its limit: it rests
    assert client.get_order(sl).status is tt.OrderStatus.OPEN
    push(client, PAPER_SBIN, 893.2, bid=893.1, ask=893.25)
    assert (client.get_order(sl).status, client.get_order(sl).average_price) == (tt.OrderStatus.COMPLETE, 893.1)
    push(client, PAPER_SBIN, 905.5, bid=905.45, ask=905.55)  # the buy stop: triggered and within its limit
    assert client.get_order(buy_stop).average_price == 905.55
    history = client.get_order_history(sl)
    assert [h.status for h in history] == [tt.OrderStatus.TRIGGER_PENDING, tt.OrderStatus.OPEN,
                                           tt.OrderStatus.COMPLETE]
    with pytest.raises(tt.InvalidOrderError, match="would fire at once"):  # a sell stop above the last price
        client.place_order(PAPER_SBIN, 1, "SELL", "MIS", "SL_M", trigger_price=906.0)


def test_paper_modify_and_cancel_working_orders(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    start = client.get_funds().available
    buy = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=890.0)
    assert client.get_funds().available == start - 8900.0  # the order blocks its value
    client.modify_order(buy, price=891.5, qty=20)
    assert client.get_funds().available == start - 17830.0
    assert (client.get_order(buy).price, client.get_order(buy).qty) == (891.5, 20)
    push(client, PAPER_SBIN, 891.5)
    order = client.get_order(buy)
    assert (order.status, order.average_price, order.filled_qty) == (tt.OrderStatus.COMPLETE, 891.5, 20)
    assert client.get_funds().available == start - 17830.0  # now the shares' cost
    other = client.place_order(PAPER_SBIN, 5, "BUY", "CNC", "LIMIT", price=880.0)
    assert client.cancel_order(other) == other
    assert client.get_order(other).status is tt.OrderStatus.CANCELLED
    assert client.get_funds().available == start - 17830.0  # released
    with pytest.raises(tt.OrderError, match="only open orders"):
        client.cancel_order(other)
    with pytest.raises(tt.OrderNotFoundError):
        client.get_order("999")
    ioc = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=880.0, validity="IOC")
    assert client.get_order(ioc).status is tt.OrderStatus.CANCELLED


def test_paper_modify_to_market_is_checked_for_funds_at_the_touch(tmp_path: Path, clients: list,
                                                                  paper_clock: FakeClock, scripted: str) -> None:
    """A working order made a MARKET one needs what it takes at the ask (a buy) or bid: if that
    does not fit, the modify is refused and the order works on as it was (it was accepted, then
    rejected at its fill)."""
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    push(client, PAPER_SBIN, 900.0, bid=899.9, ask=900.1)
    buy = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=850.0)  # 8,500 blocked
    with pytest.raises(tt.InsufficientFundsError, match="needs 10,801.20, available 10,000.00"):
        client.modify_order(buy, qty=12, order_type="MARKET")
    order = client.get_order(buy)
    assert (order.status, order.order_type, order.qty, order.price) == (OPEN, tt.OrderType.LIMIT, 10, 850.0)
    assert client.get_funds().available == 1500.0
    client.modify_order(buy, order_type="MARKET")  # 10 at the ask fit: filled at once
    order = client.get_order(buy)
    assert (order.status, order.average_price) == (COMPLETE, 900.1)
    assert client.get_funds().available == 10000 - 9001.0


def test_paper_a_sale_of_held_shares_needs_no_funds_also_with_the_account_in_debit(
        tmp_path: Path, clients: list, scripted: str) -> None:
    """A day's MIS loss can put the account in debit: a delivery sale of held shares needs
    nothing, so it is placed, or modified to MARKET, and fills (it was refused "for funds": it
    needs 0.00, more than the -1,800.00 available)."""
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted, capital=10000)
    itc = tt.Equity(exchange="NSE", symbol="ITC")
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 2, "BUY", "CNC", "MARKET")
    clock.t = ist(2026, 12, 3, 9, 20).timestamp()  # the next session: a holding of 2
    push(client, PAPER_SBIN, 900.0)
    push(client, itc, 400.0)
    working = client.place_order(PAPER_SBIN, 1, "SELL", "CNC", "LIMIT", price=990.0)
    client.place_order(itc, 100, "BUY", "MIS", "MARKET")
    push(client, itc, 300.0)
    client.place_order(itc, 100, "SELL", "MIS", "MARKET")  # a loss of 10,000
    assert client.get_funds().available == -1800.0
    client.modify_order(working, order_type="MARKET")
    assert (client.get_order(working).status, client.get_order(working).average_price) == (COMPLETE, 900.0)
    again = client.place_order(PAPER_SBIN, 1, "SELL", "CNC", "MARKET")
    assert client.get_order(again).status is COMPLETE
    assert client.get_funds().available == 0.0
    with pytest.raises(tt.InsufficientFundsError):  # a buy needs money: still refused
        client.place_order(itc, 1, "BUY", "CNC", "MARKET")


def test_paper_money_is_exact_to_the_paisa(tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=200000)
    ce = paper_option(client)
    fut = tt.Future(exchange="NFO", symbol="NIFTY", expiry=client.expiries("NIFTY")[-3])
    nifty = tt.Index(exchange="NSE", symbol="NIFTY")
    push(client, nifty, 23500.0)
    push(client, ce, 120.50)
    client.place_order(ce, 65, "BUY", "NRML", "MARKET")  # an option's premium is paid: 7,832.50
    assert client.get_funds().available == 192167.5
    push(client, ce, 130.25)
    client.place_order(ce, 65, "SELL", "NRML", "MARKET")  # and received: 8,466.25
    funds = client.get_funds()
    assert (funds.available, funds.total, funds.used, funds.m2m_realized) == (200633.75, 200633.75, 0.0, 633.75)
    # a future blocks 12% of its notional (NRML) and settles its P&L when reduced
    push(client, fut, 23600.0)
    client.place_order(fut, 65, "BUY", "NRML", "MARKET")
    funds = client.get_funds()
    assert (funds.used, funds.available) == (184080.0, 16553.75)  # 65 x 23,600 x 12%
    push(client, fut, 23650.1)
    assert client.get_funds().m2m_unrealized == 3256.5  # 65 x 50.10
    client.place_order(fut, 65, "SELL", "NRML", "MARKET")
    funds = client.get_funds()
    assert (funds.used, funds.available, funds.m2m_realized) == (0.0, 203890.25, 3890.25)
    # MIS equity: 20%; adds average by quantity, a flip starts a new average at the fill price
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 10, "BUY", "MIS", "MARKET")
    push(client, PAPER_SBIN, 910.0)
    client.place_order(PAPER_SBIN, 10, "BUY", "MIS", "MARKET")
    (pos,) = [p for p in client.get_positions() if p.instrument == PAPER_SBIN]
    assert (pos.qty, pos.avg_price, client.get_funds().used) == (20, 905.0, 3620.0)
    push(client, PAPER_SBIN, 920.0)
    client.place_order(PAPER_SBIN, 30, "SELL", "MIS", "MARKET")
    (pos,) = [p for p in client.get_positions() if p.instrument == PAPER_SBIN]
    assert (pos.qty, pos.avg_price, pos.pnl) == (-10, 920.0, 300.0)  # 20 x (920 - 905) realised
    funds = client.get_funds()
    assert (funds.used, funds.available) == (1840.0, 203890.25 + 300.0 - 1840.0)
    # a short option blocks 12% of its underlying's notional and is paid its premium
    client.place_order(PAPER_SBIN, 10, "BUY", "MIS", "MARKET")  # flat again at 920: no P&L
    push(client, ce, 120.0)
    before = client.get_funds()
    client.place_order(ce, 65, "SELL", "NRML", "MARKET")
    funds = client.get_funds()
    assert (funds.used, funds.total) == (183300.0, before.total + 7800.0)  # 12% of 65 x 23,500; premium in
    assert funds.available == before.available - 175500.0
    with pytest.raises(tt.InsufficientFundsError, match="needs 183,300.00, available 28,690.25"):
        client.place_order(ce, 65, "SELL", "NRML", "MARKET")


def test_paper_margin_calculator_uses_the_documented_rates(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                           scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    ce = paper_option(client)
    fut = tt.Future(exchange="NFO", symbol="NIFTY", expiry=client.expiries("NIFTY")[-3])
    push(client, tt.Index(exchange="NSE", symbol="NIFTY"), 23500.0)
    m = client.calculate_margin([tt.OrderLeg(fut, 65, tt.Side.BUY, tt.ProductType.MIS, tt.OrderType.LIMIT, price=23600)])
    assert (m.total, m.final_total, m.benefit, m.span) == (92040.0, 92040.0, 0.0, 92040.0)  # 6% intraday
    m = client.calculate_margin([tt.OrderLeg(ce, 65, tt.Side.BUY, tt.ProductType.NRML, tt.OrderType.LIMIT, price=120.5),
                                 tt.OrderLeg(PAPER_SBIN, 100, tt.Side.BUY, tt.ProductType.CNC, tt.OrderType.LIMIT,
                                             price=900)])
    assert (m.total, m.option_premium) == (7832.5 + 90000.0, 7832.5)
    m = client.calculate_margin([{"instrument": ce, "qty": 65, "side": "SELL", "product": "NRML",
                                  "order_type": "LIMIT", "price": 120.0}])
    assert m.total == 183300.0  # 12% of 65 x 23,500 (the premium received does not count towards it)


def test_paper_refuses_what_does_not_fit_and_changes_nothing(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                             scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    push(client, PAPER_SBIN, 900.0)
    before = (client.get_funds(), client.get_orders(), client.get_positions())
    with pytest.raises(tt.InsufficientFundsError, match="needs 11,700.00, available 10,000.00"):
        client.place_order(PAPER_SBIN, 13, "BUY", "CNC", "MARKET")
    with pytest.raises(tt.InsufficientFundsError, match="can sell at most 0"):  # no holdings, no buys today
        client.place_order(PAPER_SBIN, 1, "SELL", "CNC", "MARKET")
    with pytest.raises(tt.InvalidOrderError, match="tick"):
        client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=900.03)
    with pytest.raises(tt.InvalidOrderError, match="lot size 65"):
        client.place_order(paper_option(client), 50, "BUY", "NRML", "MARKET")
    assert (client.get_funds(), client.get_orders(), client.get_positions()) == before
    client.place_order(PAPER_SBIN, 11, "BUY", "CNC", "MARKET")  # 9,900 of 10,000
    client.place_order(PAPER_SBIN, 11, "SELL", "CNC", "LIMIT", price=950.0)  # a same-day buy can be sold
    with pytest.raises(tt.InsufficientFundsError, match="in open sell orders 11"):
        client.place_order(PAPER_SBIN, 1, "SELL", "CNC", "LIMIT", price=950.0)


def test_paper_funds_never_go_negative_under_many_threads(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                          scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=50000)
    push(client, PAPER_SBIN, 1000.0)
    placed, refused = [], []

    def trade() -> None:
        for _ in range(10):
            try:
                placed.append(client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=999.0))
            except tt.InsufficientFundsError:
                refused.append(1)

    threads = [threading.Thread(target=trade) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(placed) == 50 and len(refused) == 30  # 50 x 999 fits in 50,000; the 51st does not
    assert len(set(placed)) == 50
    funds = client.get_funds()
    assert (funds.available, funds.used) == (50.0, 49950.0)
    push(client, PAPER_SBIN, 998.0)  # every one fills: the cash moves, nothing goes below zero
    funds = client.get_funds()
    assert (funds.available, funds.total, funds.used) == (100.0, 100.0, 0.0)  # 50,000 - 50 x 998


def test_paper_state_survives_a_restart_and_accounts_stay_apart(tmp_path: Path, clients: list,
                                                                paper_clock: FakeClock, scripted: str) -> None:
    first = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(first, PAPER_SBIN, 900.0)
    filled = first.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    resting = first.place_order(PAPER_SBIN, 5, "BUY", "CNC", "LIMIT", price=880.0)
    def state(client: tt.TTConnect) -> Any:  # (last prices are the feed's: a restart waits for the next)
        funds = client.get_funds()
        return ((funds.available, funds.used, funds.total), client.get_orders(), client.get_trades(),
                [(p.instrument, p.qty, p.avg_price, p.product) for p in client.get_positions()])

    snapshot = state(first)
    first.close()
    again = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    assert state(again) == snapshot
    push(again, PAPER_SBIN, 880.0)  # the resting order still works after the restart
    assert again.get_order(resting).status is tt.OrderStatus.COMPLETE
    other = paper_client(clients, tmp_path, paper_clock, prices=scripted, account="second")
    assert other.get_orders() == [] and other.get_funds().available == 1000000.0
    assert filled not in {o.id for o in other.get_orders()}
    assert sorted(p.name for p in tmp_path.glob("paper_*.db")) == ["paper_default.db", "paper_second.db"]


def test_text_that_is_no_utf8_is_refused_as_a_symbol_not_raised_deep_inside(tmp_path: Path, clients: list,
                                                                           paper_clock: FakeClock) -> None:
    """Bytes that were no UTF-8 (a command-line argument) reach Python as lone surrogates: as a
    symbol they raised UnicodeEncodeError from the instrument's hash or the DB."""
    client = paper_client(clients, tmp_path, paper_clock)
    for call in (lambda: tt.Equity(exchange="NSE", symbol="S\udcff"), lambda: tt.Index(exchange="NSE", symbol="N\ud800"),
                 lambda: client.search("S\udcff"), lambda: client.expiries("NIFTY\udcff"),
                 lambda: client.option_chain("N\udcff", "2026-12-29")):
        with pytest.raises(tt.InvalidInstrumentError, match="no text"):
            call()
    done = subprocess.run([sys.executable, "-m", "ttconnect", "--cache-dir", str(tmp_path / "cli"), "instruments",
                           "search", b"S\xff"], cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("TTCONNECT_")},
                               "PYTHONPATH": str(HERE)})
    assert done.returncode == 2 and "no text" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_paper_takes_the_credentials_of_other_brokers_and_ignores_them(tmp_path: Path, clients: list,
                                                                       paper_clock: FakeClock) -> None:
    """A user with broker credentials in the environment or one config file for all brokers:
    paper needs none and ignores them (access_token, pin, totp_secret, request_token refused it)."""
    creds = {"access_token": "tok-x1", "pin": "9731", "totp_secret": "JBSWY3DPEHPK3PXP", "request_token": "rt-x2",
             "api_key": "key-x3", "api_secret": "sec-x4", "client_id": "C1X5", "auth_code": "ac-x6"}
    client = paper_client(clients, tmp_path, paper_clock, **creds)
    assert client.get_funds().available == 1_000_000.0
    assert not any(v in repr(client.get_profile()) for v in creds.values())
    done = cli(["--cache-dir", str(tmp_path / "cli"), "funds"], tmp_path,
               env={"TTCONNECT_ACCESS_TOKEN": "tok", "TTCONNECT_PIN": "1234"})
    assert done.returncode == 0 and "1,000,000.00" in done.stdout, done.stderr


@pytest.mark.parametrize("config, words", [
    ({"account": "../escape"}, "config 'account' must be 1-64 letters"),
    ({"account": ""}, "config 'account'"),
    ({"capital": -5}, "config 'capital' must be a positive amount"),
    ({"capital": float("nan")}, "config 'capital'"),
    ({"prices": "no-such-file.jsonl"}, "nor a tick file: no file"),
    ({"prices": "."}, "nor a tick file: a directory, not a file '.'"),
    ({"prices": 42}, "config 'prices' must be 'random'"),
    ({"seed": True}, "config 'seed' must be an int or a string"),
    ({"seed": "\udcff"}, "config 'seed' must be an int or a string (UTF-8 text)"),  # failed at every price
    ({"seed": 10 ** 5000}, "config 'seed' is an int too long to write out"),  # ValueError at every price
    ({"market_hours": "yes"}, "config 'market_hours' must be True or False"),
    ({"replay_speed": -1}, "config 'replay_speed'"),
    ({"clock": lambda: dt.datetime(2026, 12, 2, 10, 0)}, "naive datetime"),
    ({"instruments": "db"}, "needs a real broker's instrument DB in the cache dir"),
])
def test_paper_config_is_checked_at_init(config: Dict[str, Any], words: str, tmp_path: Path, clients: list,
                                         paper_clock: FakeClock) -> None:
    if config.get("prices") == "no-such-file.jsonl":
        config = {"prices": str(tmp_path / "no-such-file.jsonl")}
    kwargs = {} if "clock" in config else {"clock": paper_clock}
    with pytest.raises(tt.TTConnectError, match=re.escape(words) if "'" in words else words):
        clients.append(tt.TTConnect("paper", {"cache_dir": str(tmp_path), **config}, **kwargs))


def test_paper_market_hours_and_an_aware_clock(tmp_path: Path, clients: list) -> None:
    now = [dt.datetime(2026, 12, 2, 8, 0, tzinfo=tt.IST)]
    client = tt.TTConnect("paper", cache_dir=str(tmp_path), clock=lambda: now[0], market_hours=True)
    clients.append(client)
    with pytest.raises(tt.OrderError, match="the market is closed"):
        client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET")
    now[0] = dt.datetime(2026, 12, 2, 9, 15, tzinfo=tt.IST)
    assert client.get_order(client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET")).status is tt.OrderStatus.COMPLETE
    assert client.get_order(client.get_orders()[0].id).placed_at == now[0]


def test_paper_square_off_at_1520_and_the_day_roll(tmp_path: Path, clients: list, scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 2, 15, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    ce = paper_option(client)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 10, "BUY", "MIS", "MARKET")
    client.place_order(PAPER_SBIN, 7, "BUY", "CNC", "MARKET")
    mis_limit = client.place_order(PAPER_SBIN, 3, "BUY", "MIS", "LIMIT", price=850.0)
    day_limit = client.place_order(PAPER_SBIN, 3, "BUY", "CNC", "LIMIT", price=850.0)
    push(client, ce, 100.0)
    client.place_order(ce, 65, "BUY", "NRML", "MARKET")
    push(client, PAPER_SBIN, 905.0)
    clock.set(ist(2026, 12, 2, 15, 19, 59))
    assert {p.product for p in client.get_positions()} == {tt.ProductType.MIS, tt.ProductType.CNC, tt.ProductType.NRML}
    clock.set(ist(2026, 12, 2, 15, 20))
    positions = {(p.product, str(p.instrument)): p for p in client.get_positions()}
    assert (tt.ProductType.MIS, "NSE:SBIN") not in positions  # squared off at the last price
    squared = [o for o in client.get_orders() if o.tag == "mis"]
    assert [(o.side, o.qty, o.average_price, o.status_message) for o in squared] == [
        (tt.Side.SELL, 10, 905.0, "MIS square-off at 15:20")]
    assert client.get_order(mis_limit).status is tt.OrderStatus.CANCELLED
    assert client.get_order(day_limit).status is tt.OrderStatus.OPEN
    clock.set(ist(2026, 12, 3, 9, 20))  # the next session: DAY orders expired, delivery buys are holdings
    assert client.get_orders() == [] and client.get_trades() == []
    (holding,) = client.get_holdings()
    assert (holding.instrument, holding.qty, holding.avg_price, holding.ltp) == (PAPER_SBIN, 7, 900.0, 905.0)
    assert [(str(p.instrument), p.qty, p.product) for p in client.get_positions()] == [
        (str(ce), 65, tt.ProductType.NRML)]  # the carried derivative
    sold = client.place_order(PAPER_SBIN, 7, "SELL", "CNC", "MARKET")  # holdings can be sold
    assert client.get_order(sold).status is tt.OrderStatus.COMPLETE
    (pos,) = [p for p in client.get_positions() if p.product is tt.ProductType.CNC]
    assert (pos.qty, pos.sold_from_holdings, pos.pnl) == (0, 7, 35.0)


def test_paper_day_roll_over_a_weekend_and_a_holiday(tmp_path: Path, clients: list, scripted: str) -> None:
    """Friday's close makes the day's delivery buys holdings and ends its DAY orders; an order
    placed on Saturday belongs to the next trading session, Tuesday (Monday 26 January 2026 is
    Republic Day): no square-off on the holiday, Tuesday's at 15:20."""
    clock = FakeClock(ist(2026, 1, 23, 15, 0))  # a Friday
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 5, "BUY", "CNC", "MARKET")
    friday_limit = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=850.0)
    clock.set(ist(2026, 1, 24, 10, 0))  # Saturday
    assert client.get_orders() == []  # the DAY order ended with Friday's session
    with pytest.raises(tt.OrderNotFoundError):
        client.get_order(friday_limit)
    assert [(h.instrument, h.qty, h.avg_price) for h in client.get_holdings()] == [(PAPER_SBIN, 5, 900.0)]
    mis = client.place_order(PAPER_SBIN, 3, "BUY", "MIS", "MARKET")
    assert mis.startswith("260127")  # Tuesday's session
    clock.set(ist(2026, 1, 26, 16, 0))  # the holiday, after 15:20: nothing happens
    assert [(p.product, p.qty) for p in client.get_positions()] == [(tt.ProductType.MIS, 3)]
    push(client, PAPER_SBIN, 910.0)
    clock.set(ist(2026, 1, 27, 15, 20))
    assert client.get_positions() == []
    (squared,) = [o for o in client.get_orders() if o.tag == "mis"]
    assert (squared.side, squared.qty, squared.average_price) == (tt.Side.SELL, 3, 910.0)
    assert client.get_funds().m2m_realized == 30.0


def test_paper_market_hours_refuse_weekends_holidays_and_the_close(tmp_path: Path, clients: list) -> None:
    clock = FakeClock(ist(2026, 1, 27, 9, 15))
    client = paper_client(clients, tmp_path, clock, market_hours=True)
    for when, taken in ((ist(2026, 1, 27, 9, 14, 59), False), (ist(2026, 1, 27, 9, 15), True),
                        (ist(2026, 1, 27, 15, 29, 59), True), (ist(2026, 1, 27, 15, 30), False),
                        (ist(2026, 1, 24, 10, 0), False), (ist(2026, 1, 26, 10, 0), False)):  # Saturday; Republic Day
        clock.set(when)
        if taken:
            assert client.get_order(client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET")).status is \
                tt.OrderStatus.COMPLETE
        else:
            with pytest.raises(tt.OrderError, match="the market is closed"):
                client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET")


def test_paper_square_off_is_at_the_last_price_not_the_bid_or_ask(tmp_path: Path, clients: list) -> None:
    clock = FakeClock(ist(2026, 12, 2, 15, 0))
    client = paper_client(clients, tmp_path, clock)  # random prices: the bid and ask are a tick either side
    client.place_order(PAPER_SBIN, 10, "BUY", "MIS", "MARKET")
    client.place_order(PAPER_ITC, 20, "SELL", "MIS", "MARKET")
    at = ist(2026, 12, 2, 15, 20).timestamp()
    sbin, itc = (client._local.source.quote(token, at) for token in ("NSE:SBIN", "NSE:ITC"))
    assert sbin.bid < sbin.ltp < sbin.ask and itc.bid < itc.ltp < itc.ask
    clock.set(ist(2026, 12, 2, 15, 21))
    squared = {str(o.instrument): (o.side, o.qty, o.average_price) for o in client.get_orders() if o.tag == "mis"}
    assert squared == {"NSE:SBIN": (tt.Side.SELL, 10, sbin.ltp / 100), "NSE:ITC": (tt.Side.BUY, 20, itc.ltp / 100)}
    opened = {str(o.instrument): o.average_price for o in client.get_orders() if o.tag != "mis"}
    assert client.get_positions() == []  # flat
    realised = 10 * (sbin.ltp / 100 - opened["NSE:SBIN"]) + 20 * (opened["NSE:ITC"] - itc.ltp / 100)
    assert client.get_funds().m2m_realized == round(realised, 2)


def test_paper_expired_contracts_settle_at_the_roll(tmp_path: Path, clients: list, scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 8, 10, 0))  # a Tuesday: the weekly expiry
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    ce = paper_option(client)
    assert ce.expiry == dt.date(2026, 12, 8)
    push(client, ce, 50.0)
    client.place_order(ce, 65, "BUY", "NRML", "MARKET")
    push(client, ce, 80.0)  # the last price it traded at settles it
    cash = client.get_funds().total
    clock.set(ist(2026, 12, 9, 9, 30))
    assert client.get_positions() == []
    assert client.get_funds().total == cash + 65 * 80.0


def test_paper_random_prices_are_a_function_of_seed_instrument_and_time(tmp_path: Path, clients: list,
                                                                        paper_clock: FakeClock) -> None:
    a = paper_client(clients, tmp_path / "a", paper_clock, seed=7)
    b = paper_client(clients, tmp_path / "b", paper_clock, seed=7)
    c = paper_client(clients, tmp_path / "c", paper_clock, seed=8)
    tokens = ["NSE:SBIN", "NSE:NIFTY", str(paper_option(a))]
    at = paper_clock()
    later = [at + 0.25 * i for i in range(0, 4000, 97)]
    path_a = [a._local.source.quote(t, x).ltp for t in tokens for x in later]
    backwards = {(t, x): b._local.source.quote(t, x).ltp for t in reversed(tokens) for x in reversed(later)}
    assert path_a == [backwards[(t, x)] for t in tokens for x in later]  # the order it was asked in is no matter
    assert path_a != [c._local.source.quote(t, x).ltp for t in tokens for x in later]
    assert len(set(path_a[:len(later)])) > 5  # it moves
    sbin = [a._local.source.quote("NSE:SBIN", at + 86400 * d).ltp / 100 for d in range(0, 60)]
    assert all(700 < p < 1150 for p in sbin) and len(set(sbin)) == 60  # it wanders around its level
    assert all(p % 5 == 0 for p in [a._local.source.quote("NSE:SBIN", x).ltp for x in later])  # on its 0.05 tick


def test_paper_random_prices_fill_resting_orders_over_the_path_they_took(tmp_path: Path, clients: list,
                                                                          paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock, seed=3)
    source = client._local.source
    start = source.quote("NSE:SBIN", paper_clock()).ltp
    path = [source.quote("NSE:SBIN", paper_clock() + 0.25 * k) for k in range(1, 14401)]
    low = min(q.ask for q in path)
    first = next(q for q in path if q.ask <= low)
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=low / 100)
    assert start > low and client.get_order(order_id).status is tt.OrderStatus.OPEN
    paper_clock.set(ist(2026, 12, 2, 11, 0))  # an hour later: it filled when the path first got there
    order = client.get_order(order_id)
    assert (order.status, order.average_price) == (tt.OrderStatus.COMPLETE, low / 100)
    assert client.get_trades()[0].timestamp == dt.datetime.fromtimestamp(first.at, tt.IST)


def test_paper_a_resting_order_fills_the_same_whenever_the_client_next_looks(tmp_path: Path, clients: list) -> None:
    """An order placed on Friday evening works in Monday's session; its fill is the path's, so a
    client that looks again on Sunday evening (over two days later) sees the fill one that
    looked after an hour saw. Matching only the last two days of so long a gap missed it."""
    placed = ist(2026, 12, 4, 16, 0)  # a Friday, after the close
    fills = []
    for run, looks in (("often", [ist(2026, 12, 4, 17, 0), ist(2026, 12, 6, 17, 0)]),
                       ("once", [ist(2026, 12, 6, 17, 0)])):
        clock = FakeClock(placed)
        client = paper_client(clients, tmp_path / run, clock)
        source = client._local.source
        start = source.quote("NSE:SBIN", clock())
        low = min(source.quote("NSE:SBIN", clock() + 0.25 * k).ask for k in range(1, 14401))  # the hour's lowest ask
        assert low < start.ask
        order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=low / 100)
        assert client.get_order(order_id).status is tt.OrderStatus.OPEN
        for when in looks:
            clock.set(when)
            order = client.get_order(order_id)
        fills.append((order.status, order.average_price, order.updated_at))
        client.close()
    assert fills[0][:2] == (tt.OrderStatus.COMPLETE, low / 100) and fills[0][2] < ist(2026, 12, 4, 17, 0)
    assert fills[1] == fills[0]


def test_paper_streams_random_ticks_and_order_updates(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock, tick_interval=0.01)
    ce = paper_option(client)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    updates: "queue.Queue[tt.Order]" = queue.Queue()
    client.subscribe([PAPER_SBIN, ce], on_tick=ticks.put, mode="full")
    client.subscribe(tt.Index(exchange="NSE", symbol="NIFTY"), mode="ltp")
    client.on_order_update(updates.put)
    seen: Dict[str, tt.Tick] = {}
    deadline = time.monotonic() + 10
    while len(seen) < 3 and time.monotonic() < deadline:
        tick = ticks.get(timeout=5)
        seen[str(tick.instrument)] = tick
    full, index = seen["NSE:SBIN"], seen["NSE:NIFTY"]
    quote = client._local.source.quote("NSE:SBIN", paper_clock())
    assert (full.mode, full.ltp, full.bids[0].price, full.asks[0].price) == (
        "full", quote.ltp / 100, quote.bid / 100, quote.ask / 100)
    assert full.close is not None and full.change == pytest.approx((full.ltp - full.close) * 100 / full.close)
    assert full.exchange_time == PAPER_DAY and len(full.bids) == 5
    assert (index.mode, index.bids, index.close) == ("ltp", (), None)
    order_id = client.place_order(ce, 65, "BUY", "NRML", "MARKET")
    update = updates.get(timeout=5)
    while update.status is not tt.OrderStatus.COMPLETE:
        update = updates.get(timeout=5)
    assert (update.id, update.filled_qty, update.instrument) == (order_id, 65, ce)
    assert client.stream_stats()["order_updates"] >= 2


def test_paper_streams_without_websocket_client(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "websocket", None)  # not installed
    client = paper_client(clients, tmp_path, paper_clock, tick_interval=0.01)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode="ltp")
    assert ticks.get(timeout=5).instrument == PAPER_SBIN


def write_ticks(path: Path, rows: List[Tuple[str, float, float, float]], start: dt.datetime) -> None:
    """A tick file: (instrument, ltp, bid, ask) per line, a second apart."""
    with open(path, "w") as f:
        for i, (inst, ltp, bid, ask) in enumerate(rows):
            f.write(json.dumps({"instrument": inst, "ts": int((start.timestamp() + i) * 1000), "mode": "full",
                                "ltp": ltp, "bids": [[bid, 100, 1]], "asks": [[ask, 100, 1]]}) + "\n")


def test_paper_a_recorded_tick_file_replays_into_the_same_fills(tmp_path: Path, clients: list,
                                                                paper_clock: FakeClock) -> None:
    rows = [("NSE:SBIN", 900 + (i % 40 - 20) * 0.5, 900 + (i % 40 - 20) * 0.5 - 0.05, 900 + (i % 40 - 20) * 0.5 + 0.05)
            for i in range(400)] + [("NSE:NOSUCH", 1.0, 1.0, 1.0)]
    path = tmp_path / "ticks.jsonl"
    write_ticks(path, rows, PAPER_DAY)
    runs = []
    for run in ("one", "two"):
        client = paper_client(clients, tmp_path / run, paper_clock, prices=str(path))
        ids = [client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=price) for price in (895.0, 891.0)]
        ids.append(client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "SL", price=905.5, trigger_price=905.0))
        ticks: "queue.Queue[tt.Tick]" = queue.Queue()
        client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode="quote")
        got = [ticks.get(timeout=10) for _ in range(400)]
        assert [t.ltp for t in got] == [r[1] for r in rows[:400]] and {t.mode for t in got} == {"quote"}
        runs.append([(o.status, o.average_price, o.updated_at) for o in map(client.get_order, ids)])
        assert [o.status for o in map(client.get_order, ids)] == [tt.OrderStatus.COMPLETE] * 3
        client.close()
    assert runs[0] == runs[1]
    assert [r[1] for r in runs[0]] == [890.05, 890.05, 905.05]  # at the ask the path first offered


def test_paper_full_ticks_of_a_cheap_option_bid_nothing_at_zero_and_replay_with_their_depth(
        tmp_path: Path, clients: list) -> None:
    """A far out-of-the-money option at one tick: its full ticks bid one level, not four more at
    0.00 with quantities (no one bids nothing), which made a recording of them replay without
    depth ('impossible depth'), so a MARKET buy filled at the last price, not the ask it had."""
    clock = FakeClock(ist(2026, 12, 7, 10, 0))
    client = paper_client(clients, tmp_path, clock)
    ce = tt.Option(exchange="NFO", symbol="NIFTY", expiry=client.expiries("NIFTY")[0], strike=25850, option_type="CE")
    (tick,) = client._local.source.ticks({client.resolve(ce): "full"}, clock())
    assert tick.ltp == 0.05 and [(b.price, b.qty) for b in tick.bids] == [(0.05, 195)]
    assert [(a.price, a.qty) for a in tick.asks] == [(0.1, 130), (0.15, 260), (0.2, 390), (0.25, 520), (0.3, 650)]
    client.close()
    path = tmp_path / "ticks.jsonl"
    path.write_text(json.dumps(tt._tick_record(tick, clock())) + "\n")
    replay = paper_client(clients, tmp_path, clock, prices=str(path), account="replay")
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    replay.subscribe(ce, on_tick=ticks.put, mode="full")
    assert ticks.get(timeout=10).asks[0].price == 0.1
    order = replay.get_order(replay.place_order(ce, 65, "BUY", "NRML", "MARKET"))
    assert (order.status, order.average_price) == (tt.OrderStatus.COMPLETE, 0.1)  # the recorded ask


def test_paper_runs_the_same_strategy_as_a_real_broker(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                       scripted: str) -> None:
    """The cross-broker contract on paper: the strategy code of section 6z, unchanged, gives the
    same models (the values are paper's own)."""
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    expiry = client.expiries("NIFTY")[0]
    ce = tt.Option(exchange="NFO", symbol="NIFTY", expiry=expiry, strike=23500, option_type="CE")
    push(client, ce, 125.0, bid=124.95, ask=125.05)
    push(client, tt.Option(exchange="NFO", symbol="NIFTY", expiry=expiry, strike=23600, option_type="CE"), 80.0)
    push(client, tt.Index(exchange="NSE", symbol="NIFTY"), 23500.0)
    out = run_strategy(client, expiry=expiry.isoformat())
    assert out["placed"] == out["modified"] == out["cancelled"]
    assert (out["order"].status, out["order"].price) == (tt.OrderStatus.OPEN, 121.0)
    assert out["order"].tag.startswith("tt-strategy-1-")  # as sent: made unique
    types = {key: type(value) for key, value in out.items()}
    assert types["funds"] is tt.Fund and types["margin"] is tt.Margin and types["profile"] is tt.Profile
    assert [o.status for o in out["orders"]] == [tt.OrderStatus.CANCELLED]
    assert out["positions"] == out["holdings"] == out["trades"] == []
    assert out["profile"].broker == "paper" and out["margin"].total == 65 * 120.5 + 183300.0
    for model in (out["funds"], out["margin"], out["profile"], out["orders"][0]):  # canonical fields only
        assert set(f.name for f in dataclasses.fields(model)) == set(f.name for f in dataclasses.fields(type(model)))


# ============================================================================
# 7. Transport
# ============================================================================


def test_a_missing_dependency_says_what_to_install(tmp_path: Path) -> None:
    """requests, pyotp and websocket-client are imported when first needed; without one, the
    call that needs it says which package to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["requests"] = sys.modules["pyotp"] = sys.modules["websocket"] = None  # not installed
        import ttconnect as tt
        for call in (lambda: tt._import_requests(),
                     lambda: tt._angelone_login(None, {"totp_secret": "JBSWY3DPEHPK3PXP"}, 0.0)):
            try:
                call()
            except tt.UnsupportedFeatureError as exc:
                print(exc)
        try:
            tt.TTConnect("zerodha", cache_dir=sys.argv[1], api_key="k", access_token="t")
        except tt.TTConnectError as exc:
            print(type(exc).__name__, exc)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.abspath(tt.__file__)))
    lines = done.stdout.splitlines()
    assert lines[:2] == ["ttconnect talks to brokers through requests: pip install requests",
                         "AngelOne auto login needs pyotp: pip install pyotp"], done.stderr[-2000:]
    assert lines[2].startswith("UnsupportedFeatureError the zerodha instrument master") and \
        "pip install requests" in lines[2]


def test_streaming_without_websocket_client_says_what_to_install(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                                 monkeypatch: Any) -> None:
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock)
    monkeypatch.setitem(sys.modules, "websocket", None)  # not installed
    with pytest.raises(tt.UnsupportedFeatureError, match="pip install websocket-client"):
        kite.subscribe(SBIN, on_tick=print)


def test_environment_proxies_are_honoured_once_per_host(monkeypatch: Any) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "api.kite.trade")
    transport = tt._Transport(7.0, 2, lambda s: None)
    assert transport._proxies("https://apiconnect.angelone.in/rest/x")["https"] == "http://proxy.example:3128"
    assert transport._proxies("https://api.kite.trade/orders") == {}  # NO_PROXY
    assert transport.session().trust_env is False  # ~/.netrc can never replace the broker's Authorization


def test_safe_calls_retry_with_backoff_and_retry_after(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                       clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock, max_retries=3)
    slow_down, status = broker.rate_limit_error
    with responses.RequestsMock() as rs:
        api = MockApi(rs, broker)
        api.on("get_positions", body=requests.ConnectionError("connection reset"))
        api.on("get_positions", body="<html>503</html>", status=503)
        api.on("get_positions", fixture=slow_down, status=status, headers={"Retry-After": "3"})
        api.on("get_positions")
        positions = client.get_positions()
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


def _refused_session(entry: ErrorCase) -> bool:
    return entry.expected is tt.AuthenticationError and entry.via_client and entry.route not in ("login", "renew_token")


@pytest.mark.parametrize("broker, entry", _error_params(_refused_session), indirect=["broker"])
def test_manual_token_refused_is_not_retried_and_says_how_to_log_in(broker: Case, entry: ErrorCase, tmp_path: Path,
                                                                     day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock, creds=broker.manual_creds)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, broker)
        api.on(entry.route, fixture=entry.file, status=entry.status)
        with pytest.raises(tt.AuthenticationError) as info:
            provoke(client, broker, entry.route, tmp_path, day_clock, clients)
        assert len(api.calls(entry.route)) == 1
    assert info.value.broker_code == entry.code
    for words in broker.reauth_words:  # Kite: "request_token" and its login URL with the api_key
        assert words in str(info.value)


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


@pytest.mark.parametrize("body, status", [
    ({"status": True, "message": "SUCCESS", "errorcode": "", "data": {"feedToken": "f"}}, 200),  # no jwtToken
    ({"status": True, "message": "SUCCESS", "errorcode": "", "data": ""}, 200),
    ({"status": True, "message": "SUCCESS", "errorcode": "", "data": {"jwtToken": 7, "feedToken": "LEAK-SECRET-feed"}}, 200),
    ("<html><body>502 Bad Gateway</body></html>", 502),
])
def test_angel_garbled_renewal_falls_back_to_a_full_login(body: Any, status: int, tmp_path: Path, day_clock: FakeClock,
                                                          clients: list, caplog: Any) -> None:
    """A renewal that said success without a token (or failed with a gateway page) was the caller's
    BrokerError, though auto auth can log in by itself. What it held is never logged."""
    caplog.set_level(logging.DEBUG)
    angel = rest_client(clients, "angelone", tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_orders", fixture="error.AG8001.json")
        api.on("renew_token", body=body, status=status)
        api.on("login")
        api.on("get_orders")
        assert len(angel.get_orders()) == 6
        assert len(api.calls("renew_token")) == 1 and len(api.calls("login")) == 2 and len(api.calls("get_orders")) == 2
        jwt = json.loads(fixture_text("angelone", "login.json"))["data"]["jwtToken"]
        assert api.calls("get_orders")[1].request.headers["Authorization"] == f"Bearer {jwt}"
    assert "token renewal failed (BrokerError); logging in again" in caplog.text and "LEAK-SECRET" not in caplog.text


def test_a_401_without_json_is_an_auth_failure_recovered_or_explained(tmp_path: Path, day_clock: FakeClock,
                                                                       clients: list) -> None:
    """A gateway's bare 401 was a BrokerError: auto auth did not log in again, manual gave no hint."""
    angel = rest_client(clients, "angelone", tmp_path, day_clock)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_orders", body="", status=401)
        api.on("renew_token")
        api.on("get_orders")
        assert len(angel.get_orders()) == 6
        assert len(api.calls("renew_token")) == 1 and len(api.calls("get_orders")) == 2
    upstox = rest_client(clients, "upstox", tmp_path / "upstox", day_clock)
    with responses.RequestsMock() as rs:
        MockApi(rs, "upstox").on("get_funds", body="<html><h1>401 Authorization Required</h1></html>", status=401)
        exc = expect(tt.AuthenticationError, upstox.get_funds, "upstox get_funds: HTTP 401 (unauthorized)",
                     "Upstox access tokens die at 03:30 IST")
        assert exc.retryable is False and len(rs.calls) == 1


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


@pytest.mark.parametrize("content", ["expired", "corrupt", "expiry-past-the-rule", "token-with-a-line-break"])
def test_expired_or_corrupt_session_file_means_a_fresh_login(content: str, tmp_path: Path, day_clock: FakeClock,
                                                            clients: list, caplog: Any) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True)
    path = tmp_path / "angelone_session.json"
    if content == "expired":
        _write_session(path)
    elif content == "expiry-past-the-rule":  # obtained yesterday, so dead at midnight, whatever the file says
        _write_session(path, expires_at="2030-01-01T00:00:00+05:30")
    elif content == "token-with-a-line-break":  # unexpired, but no header takes it: each call was a retried NetworkError
        _write_session(path, access_token="old-jwt-SECRET\r\nX-Evil: 1", obtained_at="2026-11-23T09:00:00+05:30",
                       expires_at="2026-11-24T00:00:00+05:30")
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


def test_a_stored_session_is_used_only_for_its_own_account(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    first = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, ANGELONE)
        api.on("login")
        first._auth.current()
    stored = json.loads((tmp_path / "angelone_session.json").read_text())
    assert (stored["user_id"], stored["app_key"]) == ("A123456", "angelkey01")
    other = open_client(clients, "angelone", tmp_path, day_clock, None, **{**CREDS["angelone"], "client_id": "B765432",
                                                                           "cache_session": True})
    with responses.RequestsMock() as rs:
        api = MockApi(rs, ANGELONE)
        api.on("login")
        api.on("get_funds")
        other.get_funds()  # B logs in as B: A's session is never used for B's calls
        assert json.loads(api.calls("login")[0].request.body)["clientcode"] == "B765432"
    other_app = open_client(clients, "angelone", tmp_path, day_clock, None, **{**CREDS["angelone"],
                                                                               "api_key": "anotherapp", "cache_session": True})
    with responses.RequestsMock() as rs:
        MockApi(rs, ANGELONE).on("login")
        other_app._auth.current()  # another app key: a login of its own
        assert len(rs.calls) == 1


def test_a_refused_client_never_clears_another_clients_stored_session(tmp_path: Path, day_clock: FakeClock,
                                                                      clients: list) -> None:
    first = open_client(clients, "zerodha", tmp_path, day_clock, KITE_CSV, api_key="kitekey01", access_token="tok-A",
                        cache_session=True)
    second = open_client(clients, "zerodha", tmp_path, day_clock, None, api_key="kitekey02", access_token="tok-B",
                         cache_session=True)
    path = tmp_path / "zerodha_session.json"
    with responses.RequestsMock() as rs:
        MockApi(rs, ZERODHA).on("get_funds")
        first.get_funds()
        second.get_funds()  # the file now holds the second client's session
    with responses.RequestsMock() as rs:
        MockApi(rs, ZERODHA).on("get_funds", fixture="error.token_exception.json", status=403)
        with pytest.raises(tt.AuthenticationError):
            first.get_funds()
    assert json.loads(path.read_text())["access_token"] == "tok-B"  # not the refused one's: kept
    with responses.RequestsMock() as rs:
        MockApi(rs, ZERODHA).on("get_funds", fixture="error.token_exception.json", status=403)
        with pytest.raises(tt.AuthenticationError):
            second.get_funds()
    assert not path.exists()  # the refused session itself is forgotten


def test_a_request_token_from_another_login_is_exchanged_anew(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    config = {"api_key": "kitekey01", "api_secret": "kite-api-SECRET", "request_token": "req-TOKEN-1",
              "cache_dir": str(tmp_path), "cache_session": True}
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        MockApi(rs, ZERODHA).on("login")
        clients.append(tt.TTConnect("zerodha", config, clock=day_clock))
    with responses.RequestsMock() as rs:  # another user's login: never A's stored session
        api = MockApi(rs, ZERODHA)
        api.on("login")
        clients.append(tt.TTConnect("zerodha", {**config, "request_token": "req-TOKEN-2"}, clock=day_clock))
        assert "request_token=req-TOKEN-2" in api.calls("login")[0].request.body


# ============================================================================
# 9. Client
# ============================================================================


def test_unknown_broker_lists_the_known_ones() -> None:
    with pytest.raises(tt.UnsupportedFeatureError) as info:
        tt.TTConnect("kotak", {})
    assert "kotak" in str(info.value) and ", ".join(sorted(tt._BROKERS)) in str(info.value)


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


# -- orders are checked before anything is sent ----------------------------------------------

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
    (dict(tag="x" * 41), tt.InvalidOrderError, "tag must be 1-"),  # over every broker's limit
    (dict(tag="has space"), tt.InvalidOrderError, "tag must be 1-"),
    (dict(side="HOLD"), tt.InvalidOrderError, "side 'HOLD' is not valid"),
    (dict(validity="GTC"), tt.InvalidOrderError, "validity 'GTC'"),
    (dict(product="BO"), tt.InvalidOrderError, "product 'BO' is not valid"),
]


@pytest.mark.parametrize("change, error, words", INVALID_ORDERS)
def test_invalid_orders_fail_before_any_request(broker: Case, change: Dict[str, Any], error: type, words: str,
                                                tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    order = dict(instrument=tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type="CE"),
                 qty=65, side="BUY", product="NRML", order_type="LIMIT", price=120.5)
    order.update(change)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(error) as info:
            client.place_order(**order)
        assert len(rs.calls) == 0
    assert words in str(info.value)


def test_unsupported_segment_fails_before_any_request(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                      clients: list) -> None:
    gold = tt.Future(exchange="MCX", symbol="GOLD", expiry="2026-12-04")  # built before any client is open
    client = contract_client(clients, broker, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.UnsupportedFeatureError, match="MCX"):
            client.place_order(gold, 1, "BUY", "NRML", "MARKET")
        assert len(rs.calls) == 0


def test_the_tag_limit_is_the_brokers(broker: Case, tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    # Kite allows 20 characters, AngelOne 19 ("ordertag length should be less than 20"), the toy 24;
    # a user's tag gets a 5-character suffix that makes each order's tag unique.
    client = contract_client(clients, broker, tmp_path, day_clock)
    longest = "a" * (broker.max_tag_len - 5)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker).all()
        assert client.place_order(SBIN, 1, "BUY", "CNC", "MARKET", tag=longest) == broker.placed_id
        sent = broker.body(api.calls("place_order")[0].request)[broker.tag_key]
        assert sent.startswith(longest + "-") and len(sent) == broker.max_tag_len
        with pytest.raises(tt.InvalidOrderError, match=f"tag must be 1-{broker.max_tag_len - 5} "):
            client.place_order(SBIN, 1, "BUY", "CNC", "MARKET", tag=longest + "a")
        assert len(api.calls("place_order")) == 1


# -- orders are never placed twice ---------------------------------------------------------


def _accept_then(failure: Any, book: List[Dict[str, Any]], case: Case) -> Any:
    """A broker that files the order, then fails to answer."""

    def callback(request: Any) -> Any:
        book.append({"tag": case.body(request)[case.tag_key]})
        if isinstance(failure, Exception):
            raise failure
        return failure

    return callback


def _book_with(case: Case, tags: List[str], when: dt.datetime) -> str:
    """The scenario's book whose first rows are the orders these tests lose the reply of: SBIN
    SELL 5 MARKET CNC (the scenario's second order), placed at ``when`` with those tags."""
    payload = json.loads(case.payload("get_orders.json"))
    rows = at(payload, case.book_rows)
    for i, tag in enumerate(tags):
        rows[i] = {**rows[1], case.id_field: rows[i][case.id_field], case.tag_field: tag, **case.placed_fields(when)}
    return json.dumps(payload)


@pytest.mark.parametrize("failure", ["timeout", "connection_drop", "http_502"])
def test_an_accepted_order_that_times_out_is_found_not_resent(broker: Case, failure: str, tmp_path: Path,
                                                              day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    book: List[Dict[str, Any]] = []
    kind = {"timeout": requests.exceptions.ReadTimeout("read timed out"),
            "connection_drop": requests.exceptions.ConnectionError("Connection aborted: RemoteDisconnected"),
            "http_502": (502, {}, "<html>Bad Gateway</html>")}[failure]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.all("place_order", "get_orders")
        api.on("place_order", callback=_accept_then(kind, book, broker))

        def order_book(request: Any) -> Any:
            return 200, {}, _book_with(broker, [row["tag"] for row in book], dt.datetime.fromtimestamp(day_clock(), tt.IST))

        api.on("get_orders", callback=order_book)
        order_id = client.place_order(SBIN, 5, "SELL", "CNC", "MARKET")
        assert len(api.calls("place_order")) == 1  # sent once, never again
    assert len(book) == 1 and book[0]["tag"].startswith("tt")
    assert order_id == broker.order_ids[0]  # the book's row that carries the tag


def test_an_ambiguous_failure_with_no_order_found_is_not_resent(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                                clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("place_order", body=requests.exceptions.ReadTimeout("read timed out"))
        api.on("get_orders")  # the order book does not hold our tag
        with pytest.raises(tt.OrderError) as info:
            client.place_order(SBIN, 5, "SELL", "CNC", "MARKET", tag="mytag1")
        assert len(api.calls("place_order")) == 1 and len(api.calls("get_orders")) == 4
    assert "mytag1" in str(info.value) and "most likely not placed" in str(info.value)
    assert info.value.retryable is False
    assert day_clock.slept == [0.5, 1.0, 2.0]  # the book is read over ~3.5 s


def test_an_ambiguous_failure_with_an_unreadable_book_says_do_not_replace(broker: Case, tmp_path: Path,
                                                                          day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock, max_retries=0)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("place_order", body=requests.exceptions.ReadTimeout("read timed out"))
        api.on("get_orders", body=requests.exceptions.ConnectionError("network is unreachable"))
        with pytest.raises(tt.OrderError) as info:
            client.place_order(SBIN, 5, "SELL", "CNC", "MARKET", tag="mytag2")
        assert len(api.calls("place_order")) == 1
    assert "could not be read" in str(info.value) and "Do NOT place it again" in str(info.value)
    assert "most likely not placed" not in str(info.value)


def test_one_early_read_of_the_book_is_not_proof_of_absence(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                            clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock, max_retries=0)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("place_order", body=requests.exceptions.ReadTimeout("read timed out"))
        api.on("get_orders")  # read at once, before the OMS lists the order...
        api.on("get_orders", body=requests.exceptions.ConnectionError("network is unreachable"))  # ...then no more
        with pytest.raises(tt.OrderError, match="Do NOT place it again"):
            client.place_order(SBIN, 5, "SELL", "CNC", "MARKET", tag="mytag3")


def test_a_connection_that_never_opened_is_retried_for_orders(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                              clients: list) -> None:
    import urllib3

    client = contract_client(clients, broker, tmp_path, day_clock)
    refused = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(
        None, "/orders/regular", urllib3.exceptions.NewConnectionError(None, "Connection refused")))
    with responses.RequestsMock() as rs:
        api = MockApi(rs, broker)
        api.on("place_order", body=refused)
        api.on("place_order")
        assert client.place_order(SBIN, 5, "SELL", "CNC", "MARKET") == broker.placed_id
        assert len(api.calls("place_order")) == 2


# -- kill switches and modify ----------------------------------------------------------------


def test_cancel_all_and_close_all(broker: Case, tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    refusal, refusal_status = broker.cancel_refusal
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("get_orders")
        api.on("get_positions")

        def cancel(request: Any) -> Any:
            if broker.cancel_target(request).endswith(broker.order_ids[4]):
                return refusal_status, {}, broker.payload(refusal)
            return 200, {}, broker.payload("cancel_order.json")

        api.on("cancel_order", callback=cancel)
        api.on("place_order")
        cancelled, failed = client.cancel_all_orders()
        assert cancelled == [broker.order_ids[0], broker.order_ids[2]]  # OPEN and TRIGGER PENDING
        assert failed == [broker.order_ids[4]]  # the partly filled one, refused by the broker
        assert [broker.cancel_target(c.request) for c in api.calls("cancel_order")] == list(broker.live_targets)
        placed, failed = client.close_all_positions()
        assert placed == [broker.placed_id, broker.placed_id] and failed == []
        bodies = [broker.body(c.request) for c in api.calls("place_order")]
        assert [{key: body.get(key) for key in fields} for body, fields in zip(bodies, broker.close_bodies)] == list(
            broker.close_bodies)
        assert len(bodies) == 2


def test_kill_switches_cover_pending_orders_and_unloaded_segments(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                                   clients: list, caplog: Any) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    orders = json.loads(broker.payload("get_orders.json"))
    book = at(orders, broker.book_rows)
    book += [dict(book[0], **broker.amo_order), dict(book[0], **broker.mcx_order)]
    positions = json.loads(broker.payload("get_positions.json"))
    net = at(positions, broker.position_rows)
    net.append(dict(net[0], **broker.mcx_position))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("get_orders", body=orders)
        api.on("get_positions", body=positions)
        api.on("cancel_order")
        api.on("place_order")
        cancelled, failed = client.cancel_all_orders()
        ids = broker.order_ids
        assert cancelled == [ids[0], ids[2], ids[4], *broker.kill_ids] and failed == []
        targets = [broker.cancel_target(c.request) for c in api.calls("cancel_order")]
        assert broker.kill_targets[0] in targets and broker.kill_targets[1] in targets
        placed, failed = client.close_all_positions()
        assert len(placed) == 2 and failed == [broker.mcx_label]
    assert any("close it in the broker's app" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("repeat", ["same", "other-qty"])
def test_kill_switches_act_once_on_a_row_listed_twice(broker: Case, repeat: str, tmp_path: Path, day_clock: FakeClock,
                                                      clients: list) -> None:
    """A position listed twice was closed twice (two offsetting orders: the position flipped), an
    order listed twice was cancelled and reported twice."""
    client = contract_client(clients, broker, tmp_path, day_clock)
    orders = json.loads(broker.payload("get_orders.json"))
    book = at(orders, broker.book_rows)
    book.append(dict(book[0]))
    positions = json.loads(broker.payload("get_positions.json"))
    rows = at(positions, broker.position_rows)
    copy = dict(rows[0])
    if repeat == "other-qty":  # which quantity is true is not known: closed once, reported for a look
        qty_key = broker.spec["row_fields"]["position_qty"]
        copy[qty_key] = type(copy[qty_key])(int(copy[qty_key]) * 2)
    rows.append(copy)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("get_orders", body=orders)
        api.on("get_positions", body=positions)
        api.on("cancel_order")
        api.on("place_order")
        cancelled, failed = client.cancel_all_orders()
        assert cancelled == [broker.order_ids[0], broker.order_ids[2], broker.order_ids[4]] and failed == []
        assert len(api.calls("cancel_order")) == 3
        first = client.get_positions()[0].instrument
        placed, failed = client.close_all_positions()
        bodies = [broker.body(c.request) for c in api.calls("place_order")]
    assert len(bodies) == 2 and len(placed) == 2  # the option once, and the future
    assert [{key: body.get(key) for key in fields} for body, fields in zip(bodies, broker.close_bodies)] == list(
        broker.close_bodies)
    assert failed == ([] if repeat == "same" else [str(first)])


def test_a_sale_out_of_holdings_is_no_short_and_is_never_bought_back(broker: Case, tmp_path: Path,
                                                                     day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    positions = json.loads(broker.payload("get_positions.json"))
    rows = at(positions, broker.position_rows)
    rows.append(dict(rows[0], **broker.holding_sale))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("get_positions", body=positions)
        api.on("place_order")
        sale = [p for p in client.get_positions() if str(p.instrument) == "NSE:SBIN"]
        assert [(p.qty, p.sold_from_holdings, p.product, p.pnl) for p in sale] == [(0, 5, tt.ProductType.CNC, -50.0)]
        placed, failed = client.close_all_positions()
        bodies = [broker.body(c.request) for c in api.calls("place_order")]
    assert len(placed) == 2 and failed == []  # the option and the future; never a BUY of SBIN
    assert not [b for b in bodies if broker.sbin_token in json.dumps(b) or "SBIN" in json.dumps(b)]


def test_modify_applies_stop_rules_and_tolerates_broker_float_noise(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                                    clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    knows_order(client, broker, f"{broker.current_route}.json", broker.placed_id)
    current = json.loads(broker.payload(f"{broker.current_route}.json"))
    row = at(current, broker.current_row)
    row[broker.price_field] = 120.50000000000001  # a float as a broker may send it
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on(broker.current_route, callback=lambda request: (200, {}, json.dumps(current)))
        api.on("modify_order")
        client.modify_order(broker.placed_id, qty=130)
        assert str(broker.body(api.calls("modify_order")[0].request)[broker.price_key]) == "120.5"
        with pytest.raises(tt.InvalidOrderError, match="stop-loss BUY triggers at or below"):
            client.modify_order(broker.placed_id, order_type="SL", trigger_price=150.0)
        assert len(api.calls("modify_order")) == 1
        # A price really off the master's tick (the tick changed since the last refresh) is kept as
        # the broker has it: changing the quantity must not move the price.
        row[broker.price_field] = 120.52
        client.modify_order(broker.placed_id, qty=65)
        assert str(broker.body(api.calls("modify_order")[1].request)[broker.price_key]) == "120.52"


def test_modify_checks_the_new_price_and_keeps_the_rest(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                        clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker).all()
        with pytest.raises(tt.InvalidOrderError, match="tick"):
            client.modify_order(broker.placed_id, price=121.03)
        assert api.calls("modify_order") == []
        client.modify_order(broker.placed_id, qty=130)
        assert broker.body(api.calls("modify_order")[0].request) == broker.modify_qty_body
        client.modify_order(broker.placed_id, order_type=tt.OrderType.MARKET)
        assert broker.body(api.calls("modify_order")[1].request) == broker.modify_market_body


# -- threads and asyncio ---------------------------------------------------------------------


def test_async_facade_runs_the_same_calls_off_the_loop(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                       clients: list) -> None:
    import asyncio

    sync = contract_client(clients, broker, tmp_path, day_clock)
    seen_threads: List[str] = []

    def positions(request: Any) -> Any:
        seen_threads.append(threading.current_thread().name)
        return 200, {}, broker.payload("get_positions.json")

    async def main() -> Any:
        client = tt.AsyncTTConnect(sync)
        eq = tt.Equity(exchange="NSE", symbol="SBIN")
        got = await asyncio.gather(client.get_positions(), client.get_funds(),
                                   client.place_order(eq, 5, tt.Side.SELL, tt.ProductType.CNC, tt.OrderType.MARKET))
        assert client.expiries("NIFTY")[0] == dt.date(2026, 11, 24) and client.lot_size(eq) == 1
        return got, client.resolve(eq), threading.current_thread().name

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker).all("get_positions")
        api.on("get_positions", callback=positions)
        (positions_, funds, order_id), token, loop_thread = asyncio.run(main())
    assert len(positions_) == 2 and funds.available == 100000.0 and order_id == broker.placed_id
    assert token == broker.sbin_token
    assert seen_threads and loop_thread not in seen_threads  # the request ran on a worker thread
    with pytest.raises(tt.ConfigurationError, match=r"await AsyncTTConnect\.open\(broker, config\)"):
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


def test_concurrent_calls_from_threads(broker: Case, tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)  # unthrottled: twelve calls at once
    out: List[Any] = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, broker).all()
        calls = [client.get_positions, client.get_holdings, client.get_funds, client.get_orders] * 3
        threads = [threading.Thread(target=lambda f=f: out.append(f())) for f in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert len(out) == 12 and sum(1 for o in out if isinstance(o, tt.Fund)) == 3


def _api_losing_places(rs: Any, case: Case, tags: List[str]) -> MockApi:
    """The broker's mocked API whose place_order reply never comes (a read timeout): the request
    reached the broker; each one's tag is kept in ``tags``."""
    def lost(request: Any) -> Any:
        tags.append(case.body(request)[case.tag_key])
        raise requests.exceptions.ReadTimeout("read timed out")

    api = MockApi(rs, case)
    api.on("place_order", callback=lost)
    return api


def test_a_reused_tag_never_resolves_to_an_older_order(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                       clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    sent: List[str] = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = _api_losing_places(rs, broker, sent)

        def book(request: Any) -> Any:  # an OLDER order (09:20) carries the sent tag
            payload = json.loads(broker.payload("get_orders.json"))
            at(payload, broker.book_rows)[0][broker.tag_field] = sent[0]
            return 200, {}, json.dumps(payload)

        api.on("get_orders", callback=book)
        with pytest.raises(tt.OrderError, match="most likely not placed"):
            client.place_order(SBIN, 5, "SELL", "CNC", "MARKET", tag="my-strategy")
        assert len(api.calls("place_order")) == 1
    assert sent[0].startswith("my-strategy-") and len(sent[0]) == len("my-strategy") + 5


def test_two_orders_carrying_the_sent_tag_are_both_reported(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                            clients: list) -> None:
    # The one request reached the broker twice (a proxy retried it): returning one id would hide
    # the second order.
    client = contract_client(clients, broker, tmp_path, day_clock)
    sent: List[str] = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = _api_losing_places(rs, broker, sent)
        api.on("get_orders", callback=lambda request: (200, {}, _book_with(
            broker, sent * 2, dt.datetime.fromtimestamp(day_clock(), tt.IST))))
        with pytest.raises(tt.OrderError, match="lists 2 orders tagged .*more than once") as info:
            client.place_order(SBIN, 5, "SELL", "CNC", "MARKET")
        assert len(api.calls("place_order")) == 1
    assert info.value.placed_ids == list(broker.order_ids[:2]) and info.value.retryable is False


def test_an_unreadable_book_row_with_the_sent_tag_is_never_taken_for_not_placed(broker: Case, tmp_path: Path,
                                                                                day_clock: FakeClock, clients: list) -> None:
    # The order went through, but its row in the book has a malformed number: the row is left
    # out of get_orders, and "most likely not placed" would invite placing it twice.
    client = contract_client(clients, broker, tmp_path, day_clock)
    sent: List[str] = []

    def book(request: Any) -> Any:
        payload = json.loads(_book_with(broker, sent, dt.datetime.fromtimestamp(day_clock(), tt.IST)))
        row = at(payload, broker.book_rows)[0]
        for key, value in row.items():
            if key not in (broker.id_field, broker.tag_field) and isinstance(value, (int, float)) or \
                    isinstance(value, str) and value.replace(".", "").isdigit() and key != broker.id_field:
                row[key] = "n/a"
        return 200, {}, json.dumps(payload)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = _api_losing_places(rs, broker, sent)
        api.on("get_orders", callback=book)
        with pytest.raises(tt.OrderError, match="could not be read, so it was most likely placed. Do NOT place") as info:
            client.place_order(SBIN, 5, "SELL", "CNC", "MARKET")
        assert len(api.calls("place_order")) == 1
    assert info.value.placed_ids == [broker.order_ids[0]] and info.value.retryable is False


def test_a_place_reply_without_an_order_id_is_resolved_by_the_tag(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                                  clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    accepted: List[str] = []

    def no_id(request: Any) -> Any:
        accepted.append(broker.body(request)[broker.tag_key])
        reply = json.loads(broker.payload("place_order.json"))
        return 200, {}, json.dumps(_drop_order_ids(reply))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("place_order", callback=no_id)
        api.on("get_orders", callback=lambda request: (200, {}, _book_with(
            broker, accepted, dt.datetime.fromtimestamp(day_clock(), tt.IST))))
        order_id = client.place_order(SBIN, 5, "SELL", "CNC", "MARKET")
    assert order_id == broker.order_ids[0] and order_id not in ("None", "")


def _drop_order_ids(reply: Any) -> Any:
    """A success reply with every order id field emptied (the broker accepted, but says nothing)."""
    if isinstance(reply, dict):
        return {k: (None if "order" in k.lower() and "id" in k.lower() else _drop_order_ids(v)) for k, v in reply.items()}
    return reply


def test_an_order_call_does_not_wait_minutes_for_retry_after(broker: Case, tmp_path: Path, day_clock: FakeClock,
                                                             clients: list) -> None:
    client = contract_client(clients, broker, tmp_path, day_clock)
    body, status = broker.rate_limit_error
    with responses.RequestsMock() as rs:
        MockApi(rs, broker).on("place_order", fixture=body, status=429, headers={"Retry-After": "99999"})
        with pytest.raises(tt.RateLimitError) as info:
            client.place_order(SBIN, 5, "SELL", "CNC", "MARKET")
    assert day_clock.slept == [] and info.value.retry_after == 99999.0  # the caller decides


def test_closing_a_position_above_the_freeze_limit_slices_it(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = contract_client(clients, ANGELONE, tmp_path, day_clock)
    positions = json.loads(ANGELONE.payload("get_positions.json"))
    rows = at(positions, ANGELONE.position_rows)
    rows[0]["netqty"] = "5265"  # 81 lots of NIFTY: three orders of 27 lots under the 1800 limit
    del rows[1:]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, ANGELONE)
        api.on("get_positions", body=positions)
        api.on("place_order")
        placed, failed = angel.close_all_positions()
        quantities = [json_body(c.request)["quantity"] for c in api.calls("place_order")]
    assert quantities == ["1755", "1755", "1755"] and len(placed) == 3 and failed == []


def test_a_closed_client_refuses_further_use(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    kite.close()
    kite.close()  # twice: still quiet
    for call in (lambda: kite.resolve(SBIN), kite.get_orders, lambda: kite.search("SB"), lambda: kite.lot_size(SBIN),
                 lambda: kite.place_order(SBIN, 1, "BUY", "CNC", "MARKET"), kite.refresh_instruments):
        with pytest.raises(tt.ConfigurationError, match="client is closed"):
            call()
    assert "closed" in repr(kite)


def test_close_never_raises_even_when_the_socket_does(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                      ws_server: WsServer, monkeypatch: Any) -> None:
    import websocket

    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    kite.subscribe(SBIN, on_tick=lambda t: None)
    assert stream_event(kite, lambda s: s["connected"])

    def broken(self: Any) -> None:
        raise OSError(9, "Bad file descriptor")  # websocket-client 1.9 on Python 3.9, an already closed socket

    monkeypatch.setattr(websocket.WebSocket, "abort", broken)
    kite.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ttconnect-")]


@pytest.mark.parametrize("config, words", [
    ({"acess_token": "x"}, "did you mean 'access_token'"),
    ({"timeout": float("nan")}, "'timeout' must be a positive number"),
    ({"timeout": float("inf")}, "'timeout' must be a positive number"),
    ({"timeout": 1e10}, "'timeout' must be a positive number of seconds up to 3600, got 10000000000.0"),  # was a raw OverflowError
    ({"rate_limits": {"ordrs": 5}}, "unknown class 'ordrs'; zerodha's classes are default, orders"),
    ({"rate_limits": {"orders": float("nan")}}, "positive finite"),
    ({"rate_limits": {"orders": [(1e308, 1.0)]}}, "allows over 1,000,000 calls per window"),  # was a raw OverflowError
    ({"rate_limits": {"orders": [(3000, 1e300)]}}, "has a window over 86400 s (a day)"),  # a raw OverflowError at the 3001st call
    ({"root_url": "http://[::1"}, "config 'root_url' must be an http(s):// or ws(s):// URL with a host"),  # a raw ValueError
    ({"root_url": "http://"}, "config 'root_url' must be an http(s):// or ws(s):// URL with a host, got 'http://'"),
    ({"stream_silence_timeout": 0}, "stream_silence_timeout"),
    ({"ws_url": "http://127.0.0.1:9/"}, "config 'ws_url' must be a ws:// or wss:// URL with a host"),  # never connects
    ({"ws_url": "ws://127.0.0.1:99999/"}, "config 'ws_url' must be a ws:// or wss:// URL with a host (and a port"),
    ({"ws_url": "wss:///feed"}, "config 'ws_url' must be a ws:// or wss:// URL with a host"),
    ({"ws_url": ""}, "config 'ws_url' must be a ws:// or wss:// URL"),  # Kite's feed needs one
    ({"pin": "1234"}, "zerodha has no login with config 'pin'"),
    ({"access_token": "tok\r\nX-Evil: 1"}, "control character"),
    ({"access_token": "tok-SECRET\udcff"}, "config 'access_token' holds a character that is not ASCII"),  # no header takes it
    ({"api_key": "kéy-SECRET"}, "config 'api_key' holds a character that is not ASCII"),
])
def test_bad_config_values_are_refused_naming_the_fix(config: Dict[str, Any], words: str, tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        with pytest.raises(tt.ConfigurationError, match=re.escape(words)) as refused:
            client = tt.TTConnect("zerodha", {"cache_dir": str(tmp_path), **config})
            client.subscribe(SBIN, on_tick=lambda t: None)  # stream timings are read when the feed starts
        assert len(rs.calls) == 0
    assert "SECRET" not in str(refused.value)  # a credential's value is never shown


def test_another_brokers_option_is_accepted_and_a_token_with_a_newline_is_stripped(tmp_path: Path, day_clock: FakeClock,
                                                                                  clients: list, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, algo_name="upstox-only-option",
                       access_token="kite-access-SECRET-1\n")  # read from a file, newline and all
    with responses.RequestsMock() as rs:
        api = MockApi(rs, ZERODHA)
        api.on("get_profile")
        kite.get_profile()
        assert api.calls("get_profile")[0].request.headers["Authorization"] == "token kitekey01:kite-access-SECRET-1"


def test_order_messages_and_expiry_forms_a_newcomer_meets(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    with pytest.raises(tt.InvalidOrderError, match="multiple of the lot size 65 for .*; use 65$"):
        kite.place_order(NIFTY_CE, 50, "BUY", "NRML", "MARKET")  # not "use 65 or 65"
    with pytest.raises(tt.InvalidOrderError, match="beyond any listed price"):
        kite.place_order(NIFTY_CE, 65, "BUY", "NRML", "LIMIT", price=1e308)
    from decimal import Decimal

    with pytest.raises(tt.InvalidOrderError):
        kite.place_order(NIFTY_CE, 65, "BUY", "NRML", "LIMIT", price=Decimal("1E+400"))
    when = dt.datetime(2026, 11, 24, 15, 30, tzinfo=tt.IST)
    assert tt.Option(exchange="NFO", symbol="NIFTY", expiry=when, strike=23500, option_type="CE") == NIFTY_CE
    with pytest.raises(tt.InvalidInstrumentError, match="not a valid date .day is out of range"):
        tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-02-30")
    with pytest.raises(tt.InvalidInstrumentError, match="derivatives on NSE is not possible"):
        kite.expiries("NIFTY", exchange="NSE")  # a TTConnectError, also a ValueError
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=b"<html>maintenance</html>")
        with pytest.raises(tt.BrokerError, match="instrument master .* is unusable.*kept as it was"):
            kite.refresh_instruments()  # never the private _MasterFormatError


def test_the_async_facade_offers_every_public_method(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock)
    facade = tt.AsyncTTConnect(kite)
    public = {n for n in dir(tt.TTConnect) if not n.startswith("_")}
    assert public <= set(dir(facade)) and "zerodha" in repr(facade)
    assert facade.capabilities.broker == "zerodha" and "zerodha" in facade.brokers()


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
        self.binary_messages: "queue.Queue[bytes]" = queue.Queue()  # what clients send in binary frames
        self.conns: List[socket.socket] = []
        self.refuse = 0
        self.refuse_status = "503 Service Unavailable"
        self.refuse_echo = False  # a refusal's body repeats the request line, as some proxies' error pages do
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
                if self.refuse_echo:  # (no other header: the client's error text shows the body in full)
                    body = lines[0].encode()
                    conn.sendall(f"HTTP/1.1 {self.refuse_status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                else:
                    conn.sendall(f"HTTP/1.1 {self.refuse_status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                conn.close()
                return
            accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + self.GUID).encode()).digest()).decode()
            with self.lock:  # listed before the client can see the upgrade: a send() right after reaches it
                conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
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
                elif opcode == 2:
                    self.binary_messages.put(payload)
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


def stream_event(client: tt.TTConnect, test: Callable[[Dict[str, Any]], bool], timeout: float = 3.0) -> bool:
    """Wait until ``test(stream_stats())`` holds, woken by the feed's own events (never polling)."""
    streamer = client._streamer
    assert streamer is not None
    return streamer.wait_for(lambda: test(client.stream_stats()), timeout)


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
    assert stream_event(kite, lambda s: s["connected"])
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
    assert stream_event(kite, lambda s: s["connected"])
    assert kite.stream_stats()["reconnects"] >= 2
    # Silence: the socket stays open but nothing arrives; the client must notice and reconnect.
    ws_server.silent.set()
    assert stream_event(kite, lambda s: s["silence_reconnects"] >= 1, timeout=4)
    assert "no frame for" in kite.stream_stats()["last_error"]
    ws_server.silent.clear()
    ws_server.handshakes.get(timeout=3)
    assert stream_event(kite, lambda s: s["connected"])
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=5.5)))
    assert got.get(timeout=3) == 5.5


def test_a_feed_dropping_every_connection_at_once_is_retried_ever_later(tmp_path: Path, day_clock: FakeClock,
                                                                       clients: list, ws_server: WsServer) -> None:
    # Let in, then cut at once (a connection limit, say): the delay must grow as after refusals.
    def dropper() -> None:
        while not ws_server.stopped.is_set():
            try:
                ws_server.handshakes.get(timeout=0.2)
            except queue.Empty:
                continue
            time.sleep(0.02)  # the upgrade went through
            ws_server.drop()

    threading.Thread(target=dropper, daemon=True).start()
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    attempts: List[int] = []
    kite.subscribe(SBIN, on_tick=lambda t: None, mode="ltp")
    streamer = kite._streamer
    assert streamer is not None
    backoff = streamer.backoff
    streamer.backoff = lambda attempt: (attempts.append(attempt), backoff(attempt))[1]  # type: ignore[method-assign]
    assert stream_event(kite, lambda s: len(attempts) >= 4)
    assert attempts[1:4] == [attempts[0] + 1, attempts[0] + 2, attempts[0] + 3]  # never back to the first delay


def test_a_refused_upgrade_echoing_the_url_shows_no_token(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                          ws_server: WsServer, caplog: Any) -> None:
    # A proxy's error page repeating the request line: Kite's feed URL carries the access token.
    ws_server.refuse, ws_server.refuse_status, ws_server.refuse_echo = 1, "400 Bad Request", True
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    kite.subscribe(SBIN, on_tick=lambda t: None, mode="ltp")
    assert stream_event(kite, lambda s: "Handshake status 400" in (s["last_error"] or ""))
    error = kite.stream_stats()["last_error"]
    assert "GET /?api_key=" in error and "SECRET" not in error  # the page is shown, the token blanked out
    assert stream_event(kite, lambda s: s["connected"])  # the next attempt is let in
    assert not [r for r in caplog.records if "SECRET" in r.getMessage()]


def test_unsubscribe_with_an_unknown_instrument_changes_nothing(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                               ws_server: WsServer) -> None:
    ghost = tt.Equity(exchange="NSE", symbol="NOSUCH")  # made before any client opened: not checked yet
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    kite.subscribe(SBIN, on_tick=lambda t: None, mode="ltp")
    assert kite_subscribed(ws_server, expected=1) == {779521: "ltp"}
    with pytest.raises(tt.InstrumentNotFoundError, match="NOSUCH"):
        kite.unsubscribe([SBIN, ghost])
    assert kite.stream_stats()["subscriptions"] == 1  # SBIN is still subscribed, on the server too
    kite.unsubscribe(SBIN)
    assert ws_server.wait_message() == '{"a": "unsubscribe", "v": [779521]}'
    assert kite.stream_stats()["subscriptions"] == 0


def test_kite_order_updates_and_errors_arrive_as_text(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                      ws_server: WsServer, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="ttconnect")
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    orders: "queue.Queue[tt.Order]" = queue.Queue()
    kite.on_order_update(orders.put)
    assert stream_event(kite, lambda s: s["connected"])
    row = json.loads(fixture_text("zerodha", "get_orders.json"))["data"][1]
    ws_server.send(json.dumps({"type": "order", "data": row}).encode(), opcode=1)
    order = orders.get(timeout=3)
    assert (order.id, order.status, str(order.instrument), order.average_price) == (
        "1993505823145369600", tt.OrderStatus.COMPLETE, "NSE:SBIN", 790.0)
    ws_server.send(json.dumps({"type": "message", "data": "maintenance tonight " + "x" * 100_000}).encode(), opcode=1)
    ws_server.send(json.dumps({"type": "error", "data": "Invalid token"}).encode(), opcode=1)
    assert stream_event(kite, lambda s: "Invalid token" in (s["last_error"] or ""))
    said = [r.getMessage() for r in caplog.records if "broker message" in r.getMessage()]
    assert len(said) == 1 and "maintenance tonight xxx" in said[0] and len(said[0]) < 300  # one log line, cut short


def test_close_returns_fast_and_leaves_no_thread(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                 ws_server: WsServer) -> None:
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    kite.subscribe(tt.Equity(exchange="NSE", symbol="SBIN"), on_tick=lambda t: None)
    assert stream_event(kite, lambda s: s["connected"])
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


def test_subscribe_with_a_bad_order_handler_subscribes_nothing(tmp_path: Path, day_clock: FakeClock,
                                                               clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path, day_clock, ws_url="ws://127.0.0.1:9/")
    with pytest.raises(tt.ConfigurationError, match="on_order_update needs a callable"):
        kite.subscribe(SBIN, on_tick=lambda t: None, on_order_update="print")
    assert kite.stream_stats()["subscriptions"] == 0 and kite._streamer is None  # no feed was started


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
        assert stream_event(angel, lambda s: s["frames"] >= 2)
        assert angel.stream_stats()["silence_reconnects"] == 0
        # Order updates: AngelOne's separate order-status socket.
        orders_hello = orders_srv.handshakes.get(timeout=3)
        assert orders_hello["path"] == "/smart-order-update"
        assert orders_hello["headers"]["authorization"] == "Bearer jwt-SECRET-9"
        assert stream_event(angel, lambda s: s["orders_connected"])
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
            assert stream_event(angel, lambda s: s["connected"])
        assert first["headers"]["x-feed-token"] == login["feedToken"]
        assert second["headers"]["x-feed-token"] == renewed["feedToken"]
        assert second["headers"]["authorization"] == f"Bearer {renewed['jwtToken']}"
    finally:
        for client in clients:
            client.close()
        market.close()


# -- Upstox: the protobuf feed ------------------------------------------------------------
# A test-side protobuf ENCODER, so frames are built field by field from values (the wire
# format: https://protobuf.dev/programming-guides/encoding/), and the notes' test vectors.


def pb_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64: two's complement
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def pb_field(number: int, value: Any, kind: str = "auto") -> bytes:
    """One field: an int (varint), a float (double), bytes/str (length-delimited) or a message."""
    if kind == "fixed32":
        return pb_varint(number << 3 | 5) + _struct.pack("<I", value)
    if isinstance(value, float):
        return pb_varint(number << 3 | 1) + _struct.pack("<d", value)
    if isinstance(value, int):
        return pb_varint(number << 3 | 0) + pb_varint(value)
    data = value.encode() if isinstance(value, str) else value
    return pb_varint(number << 3 | 2) + pb_varint(len(data)) + data


def pb_ltpc(ltp: float, ltt: int = 0, ltq: int = 0, cp: float = 0.0) -> bytes:
    return pb_field(1, ltp) + (pb_field(2, ltt) if ltt else b"") + (pb_field(3, ltq) if ltq else b"") + \
        (pb_field(4, cp) if cp else b"")


def pb_ohlc(interval: str, o: float, h: float, lo: float, c: float, vol: int = 0, ts: int = 0) -> bytes:
    return pb_field(1, interval) + pb_field(2, o) + pb_field(3, h) + pb_field(4, lo) + pb_field(5, c) + \
        (pb_field(6, vol) if vol else b"") + (pb_field(7, ts) if ts else b"")


def pb_market_ff(ltpc: bytes, depth: List[Tuple[int, float, int, float]] = (), ohlc: List[bytes] = (),  # type: ignore[assignment]
                 greeks: Tuple[float, ...] = (), atp: float = 0.0, vtt: int = 0, oi: float = 0.0, iv: float = 0.0,
                 tbq: float = 0.0, tsq: float = 0.0) -> bytes:
    levels = b"".join(pb_field(1, pb_field(1, bq) + pb_field(2, bp) + pb_field(3, aq) + pb_field(4, ap))
                      for bq, bp, aq, ap in depth)
    out = pb_field(1, ltpc) + pb_field(2, levels)
    if greeks:
        out += pb_field(3, b"".join(pb_field(i + 1, g) for i, g in enumerate(greeks)))
    out += pb_field(4, b"".join(pb_field(1, c) for c in ohlc))
    for number, value in ((5, atp), (6, vtt), (7, oi), (8, iv), (9, tbq), (10, tsq)):
        if value:
            out += pb_field(number, value)
    return out


def pb_feed_response(feeds: Dict[str, bytes], kind: int = 1, ts: int = 1795415400000) -> bytes:
    """FeedResponse{type, feeds: map<string, Feed>, currentTs}; a feed value is a Feed message."""
    out = pb_field(1, kind) if kind else b""
    for key, feed in feeds.items():
        out += pb_field(2, pb_field(1, key) + pb_field(2, feed))
    return out + pb_field(3, ts)


def pb_full(market_ff: bytes) -> bytes:
    return pb_field(2, pb_field(1, market_ff)) + pb_field(4, 1)  # Feed.fullFeed.marketFF, requestMode full_d5


def pb_index(ltpc: bytes, ohlc: bytes) -> bytes:
    return pb_field(2, pb_field(2, pb_field(1, ltpc) + pb_field(2, pb_field(1, ohlc)))) + pb_field(4, 1)


UPSTOX_VECTORS = {  # shared/brokers/upstox.md section 6.7 (made with the official SDK's classes)
    "market_info": "08021895b3c18bb732221b0a0a0a064e53455f455110020a0d0a094e53455f494e4445581002",
    "ltpc": "080112350a134e53455f45517c494e45383438453031303136121e0a1c09cdcccccccc9c544010f4b1c18bb732189601219a9999999979544018e8b5c18bb732",
    "index": "0801126a0a124e53455f494e4445587c4e6966747920353012541250124e0a190966666666c690d7401080aec18bb7322100000000a0a0d74012310a2f0a023164110000000000a2d7401900000000a0aed74021000000000089d7402966666666c690d74038a0d1d5f6b632200118e8b5c18bb732",
    "greeks": "08011287010a0c4e53455f464f7c343338383512771a730a1b093333333333c379401080aec18bb732184b219a99999999f989401217084b110000000000c07940189601210000000000c879401a240924b9fc87f4dbe9bf11068195438bec49c019fca9f1d24d62403f21e6ae25e4831e0b402080a8dc01290000000035e54241311b2fdd240681d53f200218e8b5c18bb732",
    "full": "12a2020a0c4e53455f464f7c3433393139129102128c020a89020a1b09000000000050594010fbaec18bb732184b210000000000a0584012280a1808f70211cdcccccccc4c594018d8042133333333335359400a0c089601119a999999994959401a2409a4703d0ad7a3e03f1100000000000029c0192f6ea301bc05523f219a9999999999234022690a330a023164110000000000c05740190000000000005a40210000000000a0574029000000000050594030d0a54c38a0d1d5f6b6320a320a024931110000000000405940199a99999999595940219a9999999939594029000000000050594030b81738a0d3bf8bb7322948e17a14aef7584030d0a54c3900000000005e4a4141f8c264aa6054c23f490000000000db0a41510000000000f90541200118e8b5c18bb732",
}


def upstox_decode(data: bytes, targets: Dict[str, Tuple[Any, str]]) -> List[Any]:
    out: List[Any] = []
    tt._upstox_decode(data, {key.encode(): target for key, target in targets.items()}, out)
    return out


def test_upstox_vectors_decode_to_the_documented_values() -> None:
    a, b, c, d = object(), object(), object(), object()
    (info,) = upstox_decode(bytes.fromhex(UPSTOX_VECTORS["market_info"]), {})
    assert info["type"] == "market_info" and info["segments"] == {"NSE_EQ": "NORMAL_OPEN", "NSE_INDEX": "NORMAL_OPEN"}
    assert info["at"] == dt.datetime.fromtimestamp(1732775008.661, tt.IST)
    (ltp,) = upstox_decode(bytes.fromhex(UPSTOX_VECTORS["ltpc"]), {"NSE_EQ|INE848E01016": (a, "ltp")})
    assert (ltp.instrument, ltp.mode, ltp.ltp, ltp.close) == (a, "ltp", 82.45, None)  # an ltp tick: the price alone
    (index,) = upstox_decode(bytes.fromhex(UPSTOX_VECTORS["index"]), {"NSE_INDEX|Nifty 50": (b, "full")})
    assert (index.mode, index.ltp, index.open, index.high, index.low, index.close) == (
        "full", 24131.1, 24200.0, 24250.5, 24100.0, 24194.5)
    assert index.change == pytest.approx((24131.1 - 24194.5) * 100 / 24194.5) and index.volume is None
    assert index.exchange_time == dt.datetime.fromtimestamp(1732775009, tt.IST) and index.bids == ()
    (greeks,) = upstox_decode(bytes.fromhex(UPSTOX_VECTORS["greeks"]), {"NSE_FO|43885": (c, "full")})
    assert (greeks.ltp, greeks.last_qty, greeks.close, greeks.volume, greeks.oi) == (412.2, 75, 831.2, 3609600, 2476650)
    assert greeks.bids == (tt.DepthLevel(412.0, 75, None),) and greeks.asks == (tt.DepthLevel(412.5, 150, None),)
    (full,) = upstox_decode(bytes.fromhex(UPSTOX_VECTORS["full"]), {"NSE_FO|43919": (d, "full")})
    assert (full.mode, full.ltp, full.last_qty, full.close, full.avg_price, full.volume) == (
        "full", 101.25, 75, 98.5, 99.87, 1250000)
    assert (full.open, full.high, full.low) == (95.0, 104.0, 94.5)  # today's candle, not the I1 one
    assert (full.buy_qty, full.sell_qty, full.oi) == (220000, 180000, 3456000)
    assert full.last_trade_time == dt.datetime.fromtimestamp(1732775008.123, tt.IST)
    assert full.exchange_time == dt.datetime.fromtimestamp(1732775009, tt.IST)
    assert full.bids == (tt.DepthLevel(101.2, 375, None), tt.DepthLevel(101.15, 150, None))
    assert full.asks == (tt.DepthLevel(101.3, 600, None),)  # the second level has no ask
    assert type(full) is tt.Tick and full.change == pytest.approx((101.25 - 98.5) * 100 / 98.5)


def test_upstox_messages_built_field_by_field_decode_exactly() -> None:
    ce, idx, sbin = object(), object(), object()
    frame = pb_feed_response({
        "NSE_FO|52207": pb_full(pb_market_ff(
            pb_ltpc(120.5, 1795415399123, 65, 118.0), depth=[(65, 120.45, 130, 120.5), (130, 120.4, 195, 120.55)],
            ohlc=[pb_ohlc("I1", 1.0, 2.0, 0.5, 1.5), pb_ohlc("1d", 115.0, 122.0, 110.5, 120.5, 9000)],
            greeks=(0.52, -12.5, 0.0011, 9.8, 0.01), atp=119.3, vtt=1192471, oi=4500000.0, iv=0.14, tbq=256443.0,
            tsq=363009.0)),
        "NSE_INDEX|Nifty 50": pb_index(pb_ltpc(23512.35, cp=23500.0), pb_ohlc("1d", 23450.0, 23600.0, 23400.5, 23512.35)),
        "NSE_EQ|INE062A01020": pb_field(1, pb_ltpc(801.05, 1795415399000, 5, 800.0)),
        "NSE_EQ|NOT-SUBSCRIBED": pb_field(1, pb_ltpc(1.0)),
    })
    ticks = upstox_decode(frame, {"NSE_FO|52207": (ce, "full"), "NSE_INDEX|Nifty 50": (idx, "quote"),
                                  "NSE_EQ|INE062A01020": (sbin, "ltp")})
    full, index, ltp = ticks  # several keys per frame, in frame order; the unsubscribed one dropped
    assert (full.instrument, full.ltp, full.last_qty, full.avg_price, full.volume, full.buy_qty, full.sell_qty) == (
        ce, 120.5, 65, 119.3, 1192471, 256443, 363009)
    assert (full.open, full.high, full.low, full.close, full.oi) == (115.0, 122.0, 110.5, 118.0, 4500000)
    assert full.bids == (tt.DepthLevel(120.45, 65, None), tt.DepthLevel(120.4, 130, None))
    assert full.asks == (tt.DepthLevel(120.5, 130, None), tt.DepthLevel(120.55, 195, None))
    assert (index.mode, index.open, index.high, index.low, index.close) == ("quote", 23450.0, 23600.0, 23400.5, 23500.0)
    assert index.exchange_time is None  # a quote tick carries no times, as on every broker
    assert (ltp.mode, ltp.ltp, ltp.last_qty) == ("ltp", 801.05, None)
    # quote mode on a tradable: Kite's quote fields, no depth, no OI, no times
    (quote,) = upstox_decode(frame, {"NSE_FO|52207": (ce, "quote")})
    assert (quote.mode, quote.ltp, quote.volume, quote.open, quote.close, quote.bids, quote.oi, quote.last_trade_time) == (
        "quote", 120.5, 1192471, 115.0, 118.0, (), None, None)


def test_upstox_reader_skips_unknown_fields_of_every_wire_type() -> None:
    inst = object()
    unknown = pb_field(15, 7) + pb_field(14, 2.5) + pb_field(13, b"\x01\x02") + pb_field(12, 99, "fixed32") + \
        pb_varint(300 << 3 | 0) + pb_varint(2**63)  # a 2-byte key and a 10-byte varint
    ltpc = pb_ltpc(101.25, 1, 75, 98.5) + unknown
    market = pb_field(1, ltpc) + unknown + pb_field(16, 1)  # casEligible (field 16: two-byte key)
    frame = unknown + pb_feed_response({"NSE_FO|43919": pb_field(2, pb_field(1, market)) + unknown}) + unknown
    (tick,) = upstox_decode(frame, {"NSE_FO|43919": (inst, "full")})
    assert (tick.ltp, tick.last_qty, tick.close) == (101.25, 75, 98.5)


def test_upstox_layouts_off_the_fast_paths_decode_the_same() -> None:
    """The decoder reads the usual field order straight and falls back to the general reader:
    fields out of order, a zero one left out, a long quantity and a repeated field (the last
    one wins, as protobuf says) must all give the same canonical values."""
    inst = object()
    quote = pb_field(4, 120.5) + pb_field(3, 70000) + pb_field(2, 120.45) + pb_field(1, 1_300_000)  # reversed, 3-byte q
    bid_only = pb_field(1, 65) + pb_field(2, 120.4)  # no ask: zero fields are left out
    candle = pb_field(4, 110.5) + pb_field(3, 122.0) + pb_field(2, 1.0) + pb_field(1, "1d") + pb_field(2, 115.0)
    market = (pb_field(10, 363009.0) + pb_field(9, 256443.0) + pb_field(7, 4500000.0)  # no iv, reversed
              + pb_field(4, pb_field(1, candle)) + pb_field(2, pb_field(1, quote) + pb_field(1, bid_only))
              + pb_field(1, pb_ltpc(120.5, 1795415399123, 65, 118.0)))
    frame = pb_feed_response({"NSE_FO|52207": pb_full(market), "NSE_FO|1": pb_field(2, b"")})  # and an empty fullFeed
    (tick,) = upstox_decode(frame, {"NSE_FO|52207": (inst, "full"), "NSE_FO|1": (inst, "full")})
    assert (tick.open, tick.high, tick.low) == (115.0, 122.0, 110.5)  # the repeated open: its last value
    assert (tick.oi, tick.buy_qty, tick.sell_qty) == (4500000, 256443, 363009)
    assert tick.bids == (tt.DepthLevel(120.45, 1_300_000, None), tt.DepthLevel(120.4, 65, None))
    assert tick.asks == (tt.DepthLevel(120.5, 70000, None),)  # the empty ask level is dropped
    # the usual order gives the same tick
    usual = pb_market_ff(pb_ltpc(120.5, 1795415399123, 65, 118.0), depth=[(1_300_000, 120.45, 70000, 120.5)],
                         ohlc=[pb_ohlc("1d", 115.0, 122.0, 110.5, 120.5)], oi=4500000.0, iv=0.2, tbq=256443.0,
                         tsq=363009.0)
    (same,) = upstox_decode(pb_feed_response({"NSE_FO|52207": pb_full(usual)}), {"NSE_FO|52207": (inst, "full")})
    assert (same.open, same.high, same.low, same.oi, same.buy_qty, same.sell_qty) == (
        115.0, 122.0, 110.5, 4500000, 256443, 363009)
    assert same.bids[0] == tick.bids[0] and same.asks[0] == tick.asks[0]


@pytest.mark.parametrize("cut", [1, 2, 5, 17, 40, 100, 200, 299])
def test_upstox_truncated_or_malformed_frames_raise_a_frame_error(cut: int) -> None:
    frame = bytes.fromhex(UPSTOX_VECTORS["full"])
    with pytest.raises(tt._FrameError):
        upstox_decode(frame[:cut], {"NSE_FO|43919": (object(), "full")})


@pytest.mark.parametrize("bad", [
    b"\x0b",  # wire type 3 (a group)
    b"\x12\xff\xff\xff\xff\x0f",  # a length beyond the frame
    b"\x18" + b"\xff" * 11,  # a varint of 11 bytes
    b"\x12\x05\x0a\x09NSE",  # a map entry whose key runs past it
    b"\x12\x10\x0a\x0cNSE_FO|43919\x12\x09",  # a feed value cut short
])
def test_upstox_garbage_raises_a_frame_error_never_an_index_error(bad: bytes) -> None:
    with pytest.raises(tt._FrameError):
        upstox_decode(bad, {"NSE_FO|43919": (object(), "full")})


def test_upstox_decode_matches_the_official_protobuf_classes() -> None:
    pb2 = pytest.importorskip("upstox_client.feeder.proto.MarketDataFeedV3_pb2")
    inst = object()
    for name, key, mode in (("full", "NSE_FO|43919", "full"), ("index", "NSE_INDEX|Nifty 50", "full"),
                            ("greeks", "NSE_FO|43885", "full")):
        data = bytes.fromhex(UPSTOX_VECTORS[name])
        feed = pb2.FeedResponse.FromString(data).feeds[key]
        (tick,) = upstox_decode(data, {key: (inst, mode)})
        which = feed.WhichOneof("FeedUnion")
        if which == "firstLevelWithGreeks":
            fl = feed.firstLevelWithGreeks
            assert (tick.ltp, tick.last_qty, tick.close, tick.volume, tick.oi) == (
                fl.ltpc.ltp, fl.ltpc.ltq, fl.ltpc.cp, fl.vtt, int(fl.oi))
            continue
        full = feed.fullFeed
        ff = full.marketFF if full.WhichOneof("FullFeedUnion") == "marketFF" else full.indexFF
        assert (tick.ltp, tick.close) == (ff.ltpc.ltp, ff.ltpc.cp)
        day = next(c for c in ff.marketOHLC.ohlc if c.interval == "1d")
        assert (tick.open, tick.high, tick.low) == (day.open, day.high, day.low)
        if full.WhichOneof("FullFeedUnion") == "marketFF":
            assert (tick.avg_price, tick.volume, tick.oi, tick.buy_qty, tick.sell_qty, tick.last_qty) == (
                ff.atp, ff.vtt, int(ff.oi), int(ff.tbq), int(ff.tsq), ff.ltpc.ltq)
            assert [(d.qty, d.price) for d in tick.bids] == [(q.bidQ, q.bidP) for q in ff.marketLevel.bidAskQuote
                                                             if q.bidQ or q.bidP]


def upstox_feed(clients: list, tmp_path: Path, clock: FakeClock, **config: Any) -> tt.TTConnect:
    cfg = dict(stream_silence_timeout=1.0, stream_reconnect_delay=0.01, stream_reconnect_max_delay=0.05)
    cfg.update(config)
    return rest_client(clients, "upstox", tmp_path, clock, **cfg)


def authorize_to(server: WsServer, path: str, hits: List[str]) -> Any:
    """An authorize route answering a fresh single-use URL on the local server each time."""

    def callback(request: Any) -> Any:
        hits.append(request.headers.get("Authorization", ""))
        url = f"{server.url}/{path}?code=single-use-{len(hits)}"
        return 200, {}, json.dumps({"status": "success", "data": {"authorized_redirect_uri": url}})

    return callback


def test_upstox_feed_authorizes_each_connect_and_streams(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    server = WsServer(heartbeat=None)
    try:
        client = upstox_feed(clients, tmp_path, day_clock)
        hits: List[str] = []
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            api = MockApi(rs, UPSTOX)
            assert json.loads(UPSTOX.payload("feed_authorize.json"))["data"]["authorized_redirect_uri"].startswith("wss://")
            api.on("feed_authorize", callback=authorize_to(server, "feeds", hits))
            ticks: "queue.Queue[tt.Tick]" = queue.Queue()
            client.subscribe([NIFTY_CE], on_tick=ticks.put, mode="full")
            client.subscribe(SBIN, mode="ltp")
            first = server.handshakes.get(timeout=3)
            assert first["path"] == "/feeds?code=single-use-1" and "authorization" not in first["headers"]
            assert hits[0] == "Bearer upstox-access-SECRET-1"
            subs: Dict[str, str] = {}
            while len(subs) < 2:
                message = json.loads(server.binary_messages.get(timeout=3))  # JSON in BINARY frames
                assert message["method"] == "sub" and len(message["guid"]) == 16
                subs.update({key: message["data"]["mode"] for key in message["data"]["instrumentKeys"]})
            assert subs == {"NSE_FO|52207": "full", "NSE_EQ|INE062A01020": "ltpc"}
            server.send(bytes.fromhex(UPSTOX_VECTORS["market_info"]))
            server.send(pb_feed_response({"NSE_FO|52207": pb_full(pb_market_ff(pb_ltpc(120.5, cp=118.0),
                                                                              depth=[(65, 120.45, 130, 120.5)])),
                                          "NSE_EQ|INE062A01020": pb_field(1, pb_ltpc(801.05))}))
            one, two = ticks.get(timeout=3), ticks.get(timeout=3)
            assert (one.instrument, one.ltp, one.bids) == (NIFTY_CE, 120.5, (tt.DepthLevel(120.45, 65, None),))
            assert (two.instrument, two.mode, two.ltp) == (SBIN, "ltp", 801.05)
            stats = client.stream_stats()
            assert stats["market_messages"] == 1 and stats["last_market_info"]["segments"]["NSE_EQ"] == "NORMAL_OPEN"
            assert stats["ticks"] == 2
            # A drop: the single-use URL is fetched again, and every subscription re-sent.
            server.drop()
            again = server.handshakes.get(timeout=3)
            assert again["path"] == "/feeds?code=single-use-2" and len(hits) == 2
            resent = [json.loads(server.binary_messages.get(timeout=3)) for _ in range(2)]
            assert sorted(k for m in resent for k in m["data"]["instrumentKeys"]) == ["NSE_EQ|INE062A01020", "NSE_FO|52207"]
            # A mode change is unsub + sub; unsubscribe names the keys alone.
            client.subscribe(SBIN, mode="full")
            change = [json.loads(server.binary_messages.get(timeout=3)) for _ in range(2)]
            assert [(m["method"], m["data"]) for m in change] == [
                ("unsub", {"instrumentKeys": ["NSE_EQ|INE062A01020"]}),
                ("sub", {"mode": "full", "instrumentKeys": ["NSE_EQ|INE062A01020"]})]
            server.send(b"\x12\x05garbage")  # malformed: dropped and counted, the feed goes on
            server.send(pb_feed_response({"NSE_EQ|INE062A01020": pb_field(1, pb_ltpc(802.0))}))
            assert ticks.get(timeout=3).ltp == 802.0 and client.stream_stats()["frames_dropped"] == 1
    finally:
        for c in clients:
            c.close()
        server.close()


@pytest.mark.parametrize("url", ["wss:///feed?code=x", "wss://host:99999/feed", "https://host/feed", None, 5])
def test_upstox_authorize_reply_without_a_usable_feed_url_is_a_broker_error(url: Any) -> None:
    # refused as the broker's fault (a retried "connect failed"), not an unexpected error with a traceback
    with pytest.raises(tt.BrokerError, match="no websocket URL in the reply"):
        tt._upstox_authorized_url({"authorized_redirect_uri": url})
    assert tt._upstox_authorized_url({"authorized_redirect_uri": "wss://h.example/f?code=1"}) == "wss://h.example/f?code=1"


def test_upstox_feed_limits_follow_the_documented_key_counts(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                              monkeypatch: Any) -> None:
    client = upstox_feed(clients, tmp_path, day_clock)
    items = [(NIFTY_CE, "NSE_FO|52207", "full")] * 2001
    assert "2001 in full (limit 2000)" in tt._upstox_stream_limits(items)
    assert tt._upstox_stream_limits([(SBIN, "k", "ltp")] * 5000) is None
    assert "1501 in full (limit 1500)" in tt._upstox_stream_limits([(SBIN, "k", "full")] * 1501 + [(SBIN, "x", "ltp")])
    monkeypatch.setitem(tt._UPSTOX["hooks"], "stream_limits", lambda subs: "upstox streams at most 0 full keys")
    with pytest.raises(tt.UnsupportedFeatureError, match="at most 0 full keys"):
        client.subscribe(NIFTY_CE, on_tick=lambda t: None, mode="full")
    assert not [t for t in threading.enumerate() if t.name.startswith("ttconnect-upstox")]


def test_upstox_order_updates_arrive_on_the_portfolio_stream(tmp_path: Path, day_clock: FakeClock,
                                                              clients: list) -> None:
    server = WsServer(heartbeat=None)
    try:
        client = upstox_feed(clients, tmp_path, day_clock)
        hits: List[str] = []
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            api = MockApi(rs, UPSTOX)
            assert "order-updates" in json.loads(UPSTOX.payload("portfolio_authorize.json"))["data"]["authorized_redirect_uri"]
            api.on("portfolio_authorize", callback=authorize_to(server, "order-updates", hits))
            updates: "queue.Queue[tt.Order]" = queue.Queue()
            client.on_order_update(updates.put)
            hello = server.handshakes.get(timeout=3)
            assert hello["path"].startswith("/order-updates?code=single-use-1")
            assert "update_types=order" in api.calls("portfolio_authorize")[0].request.url
            assert stream_event(client, lambda s: s["orders_connected"])
            server.send(b'{"update_type": "position", "quantity": 1}', opcode=1)  # not an order: ignored
            server.send(UPSTOX.payload("order_update.json").encode(), opcode=1)
            order = updates.get(timeout=3)
            assert (order.id, str(order.instrument), order.status, order.qty, order.pending_qty) == (
                "261123010452871", "NFO:NIFTY 2026-11-24 23500 CE", tt.OrderStatus.OPEN, 65, 65)
            assert client.stream_stats()["order_updates"] == 1
    finally:
        for c in clients:
            c.close()
        server.close()


STREAMED = dict(ltp=120.5, last_qty=65, avg_price=119.3, volume=1192471, buy_qty=256443, sell_qty=363009, open=115.0,
                high=122.0, low=110.5, close=118.0, oi=4500000, ltt=1795415399,
                bids=[(120.45, 65, 1), (120.4, 130, 2)], asks=[(120.5, 130, 3)])


def _streamed_frame(broker: str) -> bytes:
    f = STREAMED
    if broker == "zerodha":
        return kite_frame(kite_packet(13364994, 184, **f))
    if broker == "angelone":
        return angel_packet(3, 2, "52207", **f)
    return pb_feed_response({"NSE_FO|52207": pb_full(pb_market_ff(
        pb_ltpc(f["ltp"], f["ltt"] * 1000, f["last_qty"], f["close"]),
        depth=[(65, 120.45, 130, 120.5), (130, 120.4, 0, 0.0)],
        ohlc=[pb_ohlc("1d", f["open"], f["high"], f["low"], f["ltp"])], atp=f["avg_price"], vtt=f["volume"],
        oi=float(f["oi"]), tbq=float(f["buy_qty"]), tsq=float(f["sell_qty"])))})


@pytest.mark.parametrize("name", ["zerodha", "angelone", "upstox"])
def test_streams_give_the_same_ticks_on_every_broker(name: str, tmp_path: Path, day_clock: FakeClock,
                                                     clients: list) -> None:
    server = WsServer(heartbeat=None, text_replies={"ping": "pong"})
    try:
        hits: List[str] = []
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            config: Dict[str, Any] = dict(stream_reconnect_delay=0.01, stream_silence_timeout=2.0)
            if name == "upstox":
                MockApi(rs, UPSTOX).on("feed_authorize", callback=authorize_to(server, "feed", hits))
            else:
                config["ws_url"] = server.url + "/feed"
            if name == "angelone":
                config.update(auth_mode="manual", access_token="jwt-SECRET-9", feed_token="feed-SECRET-9")
            client = rest_client(clients, name, tmp_path, day_clock, **config)
            ticks: "queue.Queue[tt.Tick]" = queue.Queue()
            client.subscribe(NIFTY_CE, on_tick=ticks.put, mode="full")
            server.handshakes.get(timeout=3)
            assert stream_event(client, lambda s: s["connected"])
            (server.binary_messages if name == "upstox" else server.messages).get(timeout=3)  # its subscription
            server.send(_streamed_frame(name))
            tick = ticks.get(timeout=3)
    finally:
        for c in clients:
            c.close()
        server.close()
    f = STREAMED
    assert (tick.instrument, tick.mode, tick.ltp, tick.last_qty, tick.avg_price, tick.volume, tick.buy_qty,
            tick.sell_qty) == (NIFTY_CE, "full", f["ltp"], f["last_qty"], f["avg_price"], f["volume"], f["buy_qty"],
                               f["sell_qty"])
    assert (tick.open, tick.high, tick.low, tick.close, tick.oi) == (f["open"], f["high"], f["low"], f["close"], f["oi"])
    assert tick.change == pytest.approx((f["ltp"] - f["close"]) * 100 / f["close"])
    assert tick.last_trade_time == dt.datetime.fromtimestamp(f["ltt"], tt.IST)
    assert [(d.price, d.qty) for d in tick.bids] == [(p, q) for p, q, _ in f["bids"]]
    assert [(d.price, d.qty) for d in tick.asks] == [(p, q) for p, q, _ in f["asks"]]


# ============================================================================
# 11. CLI (each command as a subprocess, on paper unless it says otherwise)
# ============================================================================


@pytest.fixture(scope="session", autouse=True)
def compiled_module() -> None:
    """The CLI tests start ~100 interpreters that import ttconnect: with bytecode writing off
    (PYTHONDONTWRITEBYTECODE, as CI machines often set it) each compiled the module anew, ~0.2 s."""
    import importlib.util
    import py_compile

    try:
        py_compile.compile(tt.__file__, cfile=importlib.util.cache_from_source(tt.__file__), doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass  # a read-only checkout: each interpreter compiles it, slower but the same


def cli(args: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, stdin: str = "",
        timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TTCONNECT_")}
    full_env.update(PYTHONPATH=str(HERE), **(env or {}))
    return subprocess.run([sys.executable, "-m", "ttconnect", *args], cwd=str(cwd), env=full_env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def cli_json(args: List[str], cwd: Path, **kwargs: Any) -> Any:
    done = cli([*args, "--json"], cwd, **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("closed, args, code, said", [
    (0, ["funds"], 0, ""),  # no stdin: nothing to ask, the figures shown
    (0, ["paper", "reset"], 2, "pass --yes"),  # no terminal to confirm on
    (1, ["funds"], 3, "standard output is closed"),
    (1, ["stream", "NSE:SBIN", "--seconds", "0.2"], 3, "standard output is closed"),
    (2, ["funds"], 0, None),
], ids=["stdin funds", "stdin reset", "stdout funds", "stdout stream", "stderr funds"])
def test_cli_with_a_standard_stream_closed_exits_with_a_line_not_a_traceback(
        closed: int, args: List[str], code: int, said: Optional[str], tmp_path: Path) -> None:
    """Started with stdin, stdout or stderr closed (``<&-``): Python gives None for it. The CLI
    printed a traceback (stdin or stdout's isatty) or showed nothing and exited 0 (stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTCONNECT_")}
    env["PYTHONPATH"] = str(HERE)
    if args[0] == "paper":  # an account to reset
        assert cli(["--cache-dir", str(tmp_path / "cache"), "funds"], tmp_path).returncode == 0
    done = subprocess.run([sys.executable, "-m", "ttconnect", "--cache-dir", str(tmp_path / "cache"), *args],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: os.close(closed))
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    if said is not None:
        assert said in done.stderr
    if closed != 1 and code == 0:
        assert "1,000,000.00" in done.stdout


def test_cli_main_in_process_puts_back_the_closed_streams_it_stood_in_for(tmp_path: Path, monkeypatch: Any,
                                                                          capsys: Any) -> None:
    """main() called in a process whose stdin and stderr are None: it stands /dev/null in for
    them for the run, then puts None back and closes its files (they stayed open and set)."""
    monkeypatch.setattr(sys, "stdin", None)
    monkeypatch.setattr(sys, "stderr", None)
    opened: List[Any] = []
    real_open = open

    def spy(*args: Any, **kwargs: Any) -> Any:
        f = real_open(*args, **kwargs)
        if args and args[0] == os.devnull:
            opened.append(f)
        return f

    monkeypatch.setattr("builtins.open", spy)
    for _ in range(2):
        assert tt.main(["--cache-dir", str(tmp_path), "funds"]) == 0
        assert sys.stdin is None and sys.stderr is None
    assert len(opened) == 4 and all(f.closed for f in opened)
    assert "1,000,000.00" in capsys.readouterr().out


def test_cli_demo_runs_offline_quickly_and_writes_only_the_cache_dir(tmp_path: Path) -> None:
    started = time.monotonic()
    done = cli(["demo"], tmp_path)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took < 15
    out = done.stdout
    assert "paper account 'demo': 1,000,000.00 available" in out and "streaming for 3 seconds" in out
    assert re.search(r"MARKET BUY 65 NFO:NIFTY \d{4}-\d\d-\d\d \d+ CE: COMPLETE at [\d,.]+", out)
    assert re.search(r"LIMIT  BUY 65 NFO:NIFTY .* OPEN \(below the market, it rests\)", out)
    assert "orders:" in out and "positions:" in out and "funds:" in out and "done in" in out
    assert sorted(os.listdir(tmp_path)) == ["_cache"]
    assert sorted(os.listdir(tmp_path / "_cache")) == ["instruments.db", "instruments.db.lock", "paper_demo.db",
                                                       "paper_demo.db-shm", "paper_demo.db-wal"] or \
        sorted(os.listdir(tmp_path / "_cache")) == ["instruments.db", "instruments.db.lock", "paper_demo.db"]
    again = cli(["demo", "--json"], tmp_path)  # a second run starts the demo account afresh
    data = json.loads(again.stdout)
    assert [o["status"] for o in data["orders"]] == ["COMPLETE", "OPEN"] and len(data["positions"]) == 1


def test_cli_demo_keeps_a_users_own_account_named_demo(tmp_path: Path) -> None:
    # someone traded in the account 'demo' by hand: the demo, which starts 'demo' afresh, refuses
    placed = cli_json(["--account", "demo", "place", "NSE:SBIN", "BUY", "10"], tmp_path)
    done = cli(["demo"], tmp_path)
    assert done.returncode == 3 and "Traceback" not in done.stderr
    assert "holds orders, positions or holdings the demo did not make" in done.stderr and "paper reset" in done.stderr
    kept = cli_json(["--account", "demo", "orders"], tmp_path)
    assert [(o["id"], o["instrument"], o["qty"], o["status"]) for o in kept] == [
        (placed["order_id"], "NSE:SBIN", 10, "COMPLETE")]
    assert cli(["--account", "demo", "paper", "reset", "--yes"], tmp_path).returncode == 0
    assert cli(["demo"], tmp_path).returncode == 0  # the account is the demo's again


def test_cli_instrument_commands(tmp_path: Path) -> None:
    loaded = cli_json(["instruments", "refresh"], tmp_path)
    assert loaded["rows"] > 1000 and loaded["malformed"] == 0
    found = cli_json(["instruments", "search", "SB", "--exchange", "NSE"], tmp_path)
    assert {"instrument": "NSE:SBIN", "token": "NSE:SBIN"} in found and {"instrument": "NSE:SBILIFE",
                                                                         "token": "NSE:SBILIFE"} in found
    expiries = cli_json(["instruments", "expiries", "BANKNIFTY"], tmp_path)
    assert len(expiries) == 3 and all(dt.date.fromisoformat(e).weekday() in (0, 1) for e in expiries)
    chain = cli(["instruments", "chain", "BANKNIFTY", expiries[0]], tmp_path)
    assert chain.returncode == 0 and len(chain.stdout.splitlines()) == 1 + 226  # a header line and the options
    table = cli(["instruments", "search", "INFY"], tmp_path).stdout.splitlines()
    assert table[0].split() == ["instrument", "token"] and table[1].split() == ["NSE:INFY", "NSE:INFY"]


def test_cli_account_and_order_commands(tmp_path: Path) -> None:
    env = {"TTCONNECT_CAPITAL": "500000"}
    funds = cli_json(["funds"], tmp_path, env=env)
    assert funds["available"] == 500000.0 and set(funds) >= {"available", "used", "total", "m2m_unrealized"}
    placed = cli_json(["place", "NSE:SBIN", "BUY", "10"], tmp_path, env=env)
    assert placed["order"]["status"] == "COMPLETE" and placed["order"]["product"] == "CNC"
    resting = cli_json(["--json", "place", "NSE:SBIN", "buy", "5", "--type", "LIMIT", "--price", "1", "--tag", "cli"],
                       tmp_path, env=env)
    assert (resting["order"]["status"], resting["order"]["price"]) == ("OPEN", 1.0)
    assert resting["order"]["tag"].startswith("cli-")
    rid = resting["order_id"]
    modified = cli_json(["modify", rid, "--price", "2"], tmp_path, env=env)
    assert (modified["id"], modified["price"]) == (rid, 2.0)
    table = cli(["orders"], tmp_path, env=env).stdout.splitlines()
    assert table[0].split()[:4] == ["id", "instrument", "side", "qty"] and len(table) == 3
    assert cli_json(["cancel", rid], tmp_path, env=env)["status"] == "CANCELLED"
    cli_json(["place", "NSE:INFY", "BUY", "1", "--type", "LIMIT", "--price", "1"], tmp_path, env=env)
    other = cli_json(["place", "NSE:TCS", "BUY", "1", "--type", "LIMIT", "--price", "1"], tmp_path, env=env)
    cancelled = cli_json(["cancel-all"], tmp_path, env=env)
    assert len(cancelled["done"]) == 2 and other["order_id"] in cancelled["done"] and cancelled["failed"] == []
    positions = cli_json(["positions"], tmp_path, env=env)
    assert [(p["instrument"], p["qty"], p["product"]) for p in positions] == [("NSE:SBIN", 10, "CNC")]
    assert cli_json(["trades"], tmp_path, env=env)[0]["qty"] == 10
    assert cli_json(["holdings"], tmp_path, env=env) == []
    profile = cli_json(["profile", "--account", "default"], tmp_path, env=env)
    assert (profile["broker"], profile["user_id"]) == ("paper", "default")
    closed = cli_json(["close-all"], tmp_path, env=env)
    assert len(closed["done"]) == 1 and closed["failed"] == []
    assert cli_json(["positions"], tmp_path, env=env) == [] or all(
        p["qty"] == 0 for p in cli_json(["positions"], tmp_path, env=env))
    other_account = cli_json(["--account", "second", "orders"], tmp_path, env=env)
    assert other_account == []


def test_cli_stream_records_a_file_that_paper_replays(tmp_path: Path) -> None:
    record = tmp_path / "ticks.jsonl"
    done = cli(["stream", "NSE:SBIN", "NSE:NIFTY", "--mode", "full", "--seconds", "1.5", "--record", str(record),
                "--json"], tmp_path, env={"TTCONNECT_TICK_INTERVAL": "0.05"})
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert {line["instrument"] for line in lines} == {"NSE:SBIN", "NSE:NIFTY"} and len(lines) >= 10
    assert {"ltp", "ts", "bids", "asks", "mode"} <= set(lines[0]) and lines[0]["mode"] == "full"
    recorded = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["ltp"] for r in recorded] == [line["ltp"] for line in lines]
    plain = cli(["stream", "NSE:SBIN", "--seconds", "0.5"], tmp_path, env={"TTCONNECT_TICK_INTERVAL": "0.05"})
    assert plain.returncode == 0 and plain.stdout.splitlines()[0].startswith("NSE:SBIN  ")
    replayed = cli(["stream", "NSE:SBIN", "--mode", "full", "--seconds", "3", "--json", "--account", "replay"], tmp_path,
                   env={"TTCONNECT_PRICES": str(record)})
    assert [json.loads(line)["ltp"] for line in replayed.stdout.splitlines()] == [
        r["ltp"] for r in recorded if r["instrument"] == "NSE:SBIN"]


def test_cli_paper_reset(tmp_path: Path) -> None:
    cli_json(["place", "NSE:SBIN", "BUY", "1"], tmp_path)
    refused = cli(["paper", "reset"], tmp_path)  # no terminal to ask on
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert len(cli_json(["orders"], tmp_path)) == 1
    cli_json(["--account", "keep", "place", "NSE:SBIN", "BUY", "1"], tmp_path)
    done = cli(["paper", "reset", "--yes"], tmp_path)
    assert done.returncode == 0 and "paper account 'default' reset" in done.stdout
    assert cli_json(["orders"], tmp_path) == [] and len(cli_json(["orders", "--account", "keep"], tmp_path)) == 1
    assert cli(["--broker", "zerodha", "paper", "reset", "--yes"], tmp_path).returncode == 2


@pytest.mark.parametrize("args, code, words", [
    (["place", "NSE:SBIN", "BUY"], 2, "the following arguments are required: qty"),
    (["place", "NSE:NOSUCH", "BUY", "1"], 2, "NSE:NOSUCH"),
    (["place", "SBIN", "BUY", "1"], 2, "is not an instrument"),
    (["place", "NSE:SBIN", "BUY", "1", "--type", "LIMIT"], 2, "LIMIT orders need a price"),
    (["place", "NSE:MARUTI", "BUY", "1000"], 4, "needs 1"),
    (["cancel", "12345"], 4, "has no order 12345"),
    (["--broker", "nosuch", "funds"], 2, "unknown broker 'nosuch'; known brokers: angelone, paper, upstox, zerodha"),
    (["funds", "--config", "missing.json"], 3, "config file 'missing.json' cannot be read"),
    (["funds", "--config", "bad.json"], 3, "config file 'bad.json' is not valid JSON"),
    (["funds", "--config", "list.json"], 3, "must hold a JSON object"),
    (["funds", "--config", "huge.json"], 3, "config file 'huge.json' is over 1 MiB"),  # read no further
    (["funds", "--config", "/dev/zero"], 3, "config file '/dev/zero' is over 1 MiB"),
    (["--config", "typo.json", "funds"], 3, "config key 'capitl' is not one ttconnect knows; did you mean 'capital'?"),
    (["nosuchcommand"], 2, "invalid choice"),
    (["funds"], 3, "TTCONNECT_CAPITAL must be a number"),
    (["demo", "--cache-dir", "afile"], 3, "afile/paper_demo.db: Not a directory"),
    (["paper", "reset", "--yes", "--account", "x", "--cache-dir", "dirs"], 3, "paper_x.db: Is a directory"),
    (["paper", "reset", "--yes", "--account", ""], 3, "config 'account' must be 1-64 letters"),
    (["funds", "--cache-dir", ""], 3, "config 'cache_dir' must be a path"),
    (["stream", "NSE:SBIN", "--seconds", "nan"], 2, "--seconds: must be a number of seconds above 0, got 'nan'"),
    (["stream", "NSE:SBIN", "--seconds", "-1"], 2, "--seconds: must be a number of seconds above 0, got '-1'"),
    (["instruments", "expiries", "NOPE"], 2, "no contracts of 'NOPE' are listed on NFO"),
])
def test_cli_errors_say_what_was_wrong_with_the_documented_exit_code(args: List[str], code: int, words: str,
                                                                     tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "huge.json").write_text("{" + " " * 1024 ** 2 + "}")
    (tmp_path / "typo.json").write_text('{"capitl": 5}')
    (tmp_path / "afile").write_text("a file where a directory should be")
    (tmp_path / "dirs" / "paper_x.db").mkdir(parents=True)
    env = {"TTCONNECT_CAPITAL": "lots"} if words.startswith("TTCONNECT_CAPITAL") else {}
    done = cli(args, tmp_path, env=env)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert words in done.stderr
    assert "Traceback" not in done.stderr
    if code != 2 or "invalid choice" not in words:
        verbose = cli([*args, "-v"], tmp_path, env=env)
        assert verbose.returncode == code and ("Traceback" in verbose.stderr or "usage:" in verbose.stderr)


def test_the_ttconnect_script_is_declared(tmp_path: Path) -> None:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(HERE / "setup.cfg")
    assert cfg["options.entry_points"]["console_scripts"].split() == ["ttconnect", "=", "ttconnect:main"]
    assert cli(["--version"], tmp_path).stdout.strip() == f"ttconnect {tt.__version__}"


def test_cli_help_documents_the_exit_codes(tmp_path: Path) -> None:
    done = cli(["--help"], tmp_path)
    assert done.returncode == 0
    for line in ("0  done", "2  bad usage", "3  configuration or authentication", "4  the broker refused", "5  network"):
        assert line in done.stdout
    assert "TTCONNECT_<KEY>" in done.stdout


class _FakeKite(http.server.BaseHTTPRequestHandler):
    """Kite's REST API on 127.0.0.1, as far as the CLI tests need it."""

    replies: Dict[Tuple[str, str], Tuple[int, bytes]] = {}
    seen: List[Tuple[str, str, str]] = []

    def _reply(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append((method, path, self.rfile.read(length).decode() if length else ""))
        status, body = self.replies.get((method, path), (404, b'{"status": "error", "message": "no route"}'))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/csv" if path == "/instruments" else "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._reply("GET")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self._reply("POST")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_kite() -> Iterator[Tuple[str, Any]]:
    handler = type("Handler", (_FakeKite,), {"replies": {("GET", "/instruments"): (200, KITE_CSV)}, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def kite_cli_config(tmp_path: Path, url: str, **extra: str) -> Path:
    path = tmp_path / "kite.json"
    path.write_text(json.dumps({"broker": "zerodha", "api_key": "kitekey01", "root_url": url,
                                "instruments_url": f"{url}/instruments", "max_retries": 0, **extra}))
    return path


def test_cli_on_a_real_broker_an_auth_failure_exits_3_without_the_token(tmp_path: Path, fake_kite: Any) -> None:
    url, handler = fake_kite
    handler.replies[("GET", "/user/profile")] = (403, fixture_text("zerodha", "login.token_exception.json").encode())
    config = kite_cli_config(tmp_path, url, access_token="kite-access-SECRET-9")
    done = cli(["--config", str(config), "profile"], tmp_path)
    assert done.returncode == 3 and "TokenException" in done.stderr and "log in at" in done.stderr
    assert "kite-access-SECRET-9" not in done.stdout + done.stderr
    handler.replies[("GET", "/user/profile")] = (200, fixture_text("zerodha", "get_profile.json").encode())
    profile = cli_json(["profile", "--config", str(config)], tmp_path)
    assert (profile["user_id"], profile["broker"]) == ("AB1234", "zerodha")
    down = kite_cli_config(tmp_path, "http://127.0.0.1:9", access_token="t")  # nothing listens there
    (tmp_path / "_cache").mkdir(exist_ok=True)
    offline = cli(["--config", str(down), "--cache-dir", str(tmp_path / "_cache"), "profile"], tmp_path)
    assert offline.returncode == 5 and "failed" in offline.stderr


def test_cli_login_stores_a_session_later_commands_use(tmp_path: Path, fake_kite: Any) -> None:
    url, handler = fake_kite
    handler.replies[("POST", "/session/token")] = (200, fixture_text("zerodha", "login.json").encode())
    handler.replies[("GET", "/user/profile")] = (200, fixture_text("zerodha", "get_profile.json").encode())
    config = kite_cli_config(tmp_path, url, api_secret="kite-secret-7")
    done = cli(["login", "--config", str(config)], tmp_path, stdin="req-token-42\n")
    assert done.returncode == 0, done.stderr
    assert "https://kite.zerodha.com/connect/login?v=3&api_key=kitekey01" in done.stderr
    assert "logged in as AB1234" in done.stderr
    assert "req-token-42" not in done.stdout + done.stderr and "kite-secret-7" not in done.stdout + done.stderr
    logins = [s for s in handler.seen if s[1] == "/session/token"]
    assert len(logins) == 1 and "request_token=req-token-42" in logins[0][2]
    again = cli_json(["profile", "--config", str(config)], tmp_path)  # the stored session: no second login
    assert again["user_id"] == "AB1234" and len([s for s in handler.seen if s[1] == "/session/token"]) == 1
    assert cli(["login"], tmp_path).stdout.strip() == "paper needs no login"


@pytest.mark.parametrize("extra, words", [
    ({"api_secret": "kite-secret-7", "access_token": "old-access-SECRET"},
     "the config gives 'access_token', and commands would use it instead of the session login makes: remove it"),
    ({}, "zerodha login needs 'api_secret' in the config (or as TTCONNECT_API_SECRET) to exchange the code"),
], ids=["a config token", "no api_secret"])
def test_cli_login_refuses_a_config_it_cannot_complete_before_the_browser_step(
        extra: Dict[str, str], words: str, tmp_path: Path, fake_kite: Any) -> None:
    """Both were refused only once the user had logged in and pasted the request_token, which works
    once: the login was spent for nothing."""
    url, handler = fake_kite
    done = cli(["login", "--config", str(kite_cli_config(tmp_path, url, **extra))], tmp_path, stdin="req-token-42\n")
    assert done.returncode == 3 and done.stderr.startswith(f"error: {words}")  # the first thing said
    assert "Log in at" not in done.stderr and "old-access-SECRET" not in done.stderr
    assert [s for s in handler.seen if s[1] == "/session/token"] == []


def test_cli_login_takes_the_pasted_redirect_address_and_refuses_one_without_the_code(tmp_path: Path,
                                                                                     fake_kite: Any) -> None:
    url, handler = fake_kite
    handler.replies[("POST", "/session/token")] = (200, fixture_text("zerodha", "login.json").encode())
    handler.replies[("GET", "/user/profile")] = (200, fixture_text("zerodha", "get_profile.json").encode())
    config = kite_cli_config(tmp_path, url, api_secret="kite-secret-7")
    pasted = "https://app.example/cb?action=login&type=login&status=success&request_token=req-token-42\n"
    done = cli(["login", "--config", str(config)], tmp_path, stdin=pasted)
    assert done.returncode == 0, done.stderr
    logins = [s[2] for s in handler.seen if s[1] == "/session/token"]
    assert len(logins) == 1 and "request_token=req-token-42&" in logins[0]  # the token, not the whole address
    assert "req-token-42" not in done.stdout + done.stderr
    cancelled = cli(["login", "--config", str(config), "--cache-dir", str(tmp_path / "other")], tmp_path,
                    stdin="https://app.example/cb?action=login&status=cancelled\n")
    assert cancelled.returncode == 3 and "Traceback" not in cancelled.stderr
    assert "the pasted address has no 'request_token' (its query has action, status)" in cancelled.stderr
    assert len([s for s in handler.seen if s[1] == "/session/token"]) == 1  # nothing sent for it
    upstox = next(f for f in tt._BROKERS["upstox"]["auth"] if f.single_use)
    param = upstox.redirect_param or upstox.single_use
    assert tt._cli_pasted_code(" https://app.example/up?code=Qc1Ig&state=s1 \n", param, "L") == "Qc1Ig"
    assert tt._cli_pasted_code("Qc1Ig\n", param, "L") == "Qc1Ig"


@pytest.mark.parametrize("pasted, words", [
    ("https://127.0.0.1/callback/req-SECRET-42", "(it has no query)"),  # was read whole as its query, and named
    ("https://127.0.0.1/", "(it has no query)"),
    ("https://127.0.0.1/?req-SECRET-42", "(its query names no field)"),  # a value without a name is no field name
])
def test_cli_login_refusing_a_pasted_address_shows_nothing_of_it(pasted: str, words: str) -> None:
    with pytest.raises(tt._CliError) as refused:
        tt._cli_pasted_code(pasted, "request_token", "https://kite.example/login")
    assert words in str(refused.value) and "SECRET" not in str(refused.value)
    assert "127.0.0.1" not in str(refused.value)



# ============================================================================
# 11.1 The README: its Quickstart, its first example and its snippets' types
# ============================================================================

README = (HERE / "README.md").read_text(encoding="utf-8")


def readme_blocks(language: str) -> List[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_the_quickstart_has_exactly_the_two_commands_ci_runs() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["pip install -e . && python -m ttconnect demo",
                        "python -m pip install -e '.[test]' && python -m pytest -q"]
    ci = (HERE / ".ci" / "run").read_text()
    assert "python -m pip install --quiet -e '.[test]'" in ci and "\npython -m pytest -q\n" in ci


def test_the_readme_first_example_runs_on_paper(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)  # its cache dir is ./_cache
    monkeypatch.delenv("TTCONNECT_CACHE_DIR", raising=False)
    out = io.StringIO()
    namespace: Dict[str, Any] = {"__name__": "readme"}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(readme_blocks("python")[0], "README.md", "exec"), namespace)
    finally:
        if isinstance(namespace.get("paper"), tt.TTConnect):
            namespace["paper"].close()  # (its functions hold the namespace: a cycle only the gc would free)
    assert out.getvalue().strip() == "OrderStatus.COMPLETE"
    assert [p.name for p in tmp_path.iterdir()] == ["_cache"]
    assert (tmp_path / "_cache" / "paper_default.db").is_file()


def test_the_readme_snippets_type_check_as_a_user_would(tmp_path: Path) -> None:
    """A user's mypy accepts the README's own examples (issue 8, item 22)."""
    pytest.importorskip("mypy")
    prelude = textwrap.dedent("""
        import ttconnect as tt
        KEY = SECRET = REQ = TOKEN = JWT = FEED = URI = CODE = ""
        broker: tt.TTConnect = tt.TTConnect("paper")
        ce = tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-12-29", strike=23500, option_type="CE")
        """)
    blocks = readme_blocks("python")
    assert len(blocks) >= 8
    for i, block in enumerate(blocks):
        (tmp_path / f"readme_{i}.py").write_text(prelude + block)
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
                           "--cache-dir", str(tmp_path / ".mypy"), *sorted(str(p) for p in tmp_path.glob("*.py"))],
                          capture_output=True, text=True, timeout=300, cwd=str(HERE),
                          env={**os.environ, "MYPYPATH": str(HERE)})
    assert done.returncode == 0, done.stdout + done.stderr

# ============================================================================
# 12. Hostile inputs and faults (issue 8)
# ============================================================================
# Every case feeds one bad input or fault and asserts the exact outcome: a typed error (a
# TTConnectError subclass whose message says what to do), or correct recovery with nothing
# lost and nothing silently wrong. Servers bind 127.0.0.1; time is injected; the only real
# waits are bounded ones on events and queues.

INFY = tt.Equity(exchange="NSE", symbol="INFY")
INFY_TOKEN = {"zerodha": "408065", "angelone": "1594"}
DAY2 = ist(2026, 11, 22, 10, 0)  # the day after ``clock``: a new master dump is due
LOGIN = json.loads(fixture_text("angelone", "login.json"))["data"]
RENEWED = json.loads(fixture_text("angelone", "renew_token.json"))["data"]
KITE_LOGIN = json.loads(fixture_text("zerodha", "login.json"))["data"]


# ----------------------------------------------------------------------------
# 12.0 Hostile: shared checks
# ----------------------------------------------------------------------------


def _is(exc: BaseException, cls: type) -> bool:
    """The exact class (InvalidInstrumentError also covers its TypeError twin)."""
    return type(exc) is cls or (cls is tt.InvalidInstrumentError and isinstance(exc, cls))


def _raw(exc: BaseException, expected: str) -> str:
    return f"raw {type(exc).__module__}.{type(exc).__name__} escaped{expected}: {exc!r}"[:700]


def _fail_clean(message: str) -> None:
    """Fail outside the except block: an abandoned generator in the raw exception's frames
    (a master parser) is finalised here, not while pytest renders the report."""
    import gc

    gc.collect()
    pytest.fail(message, pytrace=False)


def expect(cls: type, call: Callable[[], Any], *words: str) -> tt.TTConnectError:
    """Run ``call``; it must raise exactly ``cls`` with every fragment of ``words`` in its text.
    A raw Python exception is reported as such (it must never reach a user)."""
    problem = ""
    try:
        result = call()
    except tt.TTConnectError as exc:
        if not _is(exc, cls):
            problem = f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"[:700]
        else:
            missing = [w for w in words if w not in str(exc)]
            if not missing:
                return exc
            problem = f"{cls.__name__} text lacks {missing}: {exc}"[:900]
    except BaseException as exc:  # noqa: BLE001 - the point of the check
        problem = _raw(exc, f" (expected {cls.__name__})")
    else:
        problem = f"expected {cls.__name__}, but the call returned {result!r}"[:500]
    _fail_clean(problem)
    raise AssertionError("unreachable")


def no_raw(call: Callable[[], Any]) -> Any:
    """Run ``call``; a raw (non-ttconnect) exception fails the test with a clear message."""
    problem = ""
    try:
        return call()
    except tt.TTConnectError as exc:
        problem = f"unexpected {type(exc).__name__}: {exc}"[:900]
    except BaseException as exc:  # noqa: BLE001
        problem = _raw(exc, "")
    _fail_clean(problem)


def kept(clients: list, *args: Any, **kwargs: Any) -> tt.TTConnect:
    """``TTConnect(...)``, closed by the test's teardown should it open (even where it should not)."""
    client = tt.TTConnect(*args, **kwargs)
    clients.append(client)
    return client


@contextlib.contextmanager
def no_request() -> Iterator[responses.RequestsMock]:
    """Nothing may be sent (an unregistered URL would fail, and none may be tried)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        yield rs
        assert [c.request.url for c in rs.calls] == []


def messages(caplog: Any) -> List[str]:
    return [r.getMessage() for r in caplog.records]


def ok_body(broker: str, data: Any) -> Dict[str, Any]:
    """A success envelope of ``broker`` around ``data``."""
    if broker == "zerodha":
        return {"status": "success", "data": data}
    return {"status": True, "message": "SUCCESS", "errorcode": "", "data": data}


def payload(broker: str, route: str) -> Any:
    return json.loads(CASE[broker].payload(f"{route}.json"))


# ============================================================================
# 12.1 Hostile: Instrument masters (both brokers)
# ============================================================================


def kite_rows() -> List[List[str]]:
    return list(csv.reader(io.StringIO(KITE_CSV.decode())))


def kite_csv(rows: List[List[str]], newline: str = "\n") -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator=newline).writerows(rows)
    return out.getvalue().encode()


def kite_with(**changes: str) -> bytes:
    """Kite's master with NSE:SBIN's row changed (column name -> raw text)."""
    rows = kite_rows()
    head = rows[0]
    for row in rows[1:]:
        if row[head.index("tradingsymbol")] == "SBIN" and row[head.index("exchange")] == "NSE":
            for col, value in changes.items():
                row[head.index(col)] = value
    return kite_csv(rows)


def angel_rows() -> List[Any]:
    return json.loads(ANGEL_JSON)


def angel_with(**changes: Any) -> bytes:
    """AngelOne's master with NSE:SBIN's row (SBIN-EQ) changed."""
    rows = angel_rows()
    for row in rows:
        if row["symbol"] == "SBIN-EQ":
            row.update(changes)
    return json.dumps(rows).encode()


def _garbage(n: int = 4096) -> bytes:
    rng = random.Random(8)
    return bytes(rng.randrange(256) for _ in range(n))


def _angel_inserted(item: Any, at_index: int = 5) -> bytes:
    rows = angel_rows()
    rows.insert(at_index, item)
    return json.dumps(rows).encode()


# kind: "refused" (the old DB is kept: on_stale='fail' raises, 'warn' starts on it),
# "skips_row" (NSE:SBIN's row is counted malformed, the rest loads), "skips_row_any" (an extra
# row is counted malformed, the rest loads), "row_or_refused" (either "skips_row" or "refused",
# never garbage in the DB), "duplicates" (every row twice: counted once, as duplicates),
# "loads" (the master is fine: it loads exactly as the plain one).
MASTER_CASES = [
    pytest.param("zerodha", lambda: gzip.compress(KITE_CSV), {}, "refused", "not a readable Kite instrument CSV",
                 id="kite-gzip-bytes-without-content-encoding"),
    pytest.param("zerodha", lambda: gzip.compress(KITE_CSV), {"Content-Encoding": "gzip"}, "loads", "",
                 id="kite-gzip-with-content-encoding"),
    pytest.param("zerodha", lambda: KITE_CSV.split(b"\n", 1)[0] + b"\n", {}, "refused", "no usable instrument rows",
                 id="kite-header-only"),
    pytest.param("zerodha", lambda: b"", {}, "refused", "the file is empty", id="kite-empty"),
    pytest.param("zerodha", lambda: b"\n".join(KITE_CSV.split(b"\n")[:8]) + b"\n", {}, "refused", "under half",
                 id="kite-under-half-the-previous-rows"),
    pytest.param("zerodha", lambda: kite_with(name="X" * 200_000), {}, "row_or_refused", "",
                 id="kite-field-over-csv-field-limit"),
    pytest.param("zerodha", lambda: kite_with(lot_size="nan"), {}, "skips_row", "", id="kite-lot-nan"),
    pytest.param("zerodha", lambda: kite_with(lot_size="9" * 30), {}, "skips_row", "", id="kite-lot-huge"),
    pytest.param("zerodha", lambda: kite_with(tick_size="Infinity"), {}, "skips_row", "", id="kite-tick-infinity"),
    pytest.param("zerodha", lambda: kite_csv(kite_rows() + kite_rows()[1:]), {}, "duplicates", "",
                 id="kite-every-row-twice"),
    pytest.param("zerodha", lambda: b"\xef\xbb\xbf" + KITE_CSV, {}, "loads", "", id="kite-utf8-bom"),
    pytest.param("zerodha", lambda: KITE_CSV.replace(b"\n", b"\r\n"), {}, "loads", "", id="kite-crlf"),
    pytest.param("zerodha", lambda: KITE_CSV.replace(b"779521,3045,SBIN,", b"779521,3045,SB\xffIN,"), {},
                 "row_or_refused", "", id="kite-non-utf8-byte-in-one-row"),
    pytest.param("angelone", lambda: b"<!DOCTYPE html><html><body>Access denied</body></html>", {}, "refused",
                 "not a JSON array", id="angel-html-page"),
    pytest.param("angelone", lambda: b"[]", {}, "refused", "no usable instrument rows", id="angel-empty-array"),
    pytest.param("angelone", lambda: b"[" * 100_000, {}, "refused", "truncated or malformed", id="angel-nesting-100000"),
    pytest.param("angelone", lambda: ANGEL_JSON[: len(ANGEL_JSON) * 2 // 3], {}, "refused", "truncated",
                 id="angel-truncated-json"),
    pytest.param("angelone", lambda: _angel_inserted(["NSE", "SBIN-EQ", "3045"]), {}, "skips_row_any", "",
                 id="angel-array-where-a-row-object-belongs"),
    pytest.param("angelone", lambda: angel_with(name=json.loads("[" * 900 + "]" * 900)), {}, "row_or_refused", "",
                 id="angel-one-row-nested-900-deep"),
    pytest.param("angelone", lambda: ANGEL_JSON.replace(b'"name":"SBIN"', b'"name":' + b"[" * 5000 + b"]" * 5000, 1),
                 {}, "row_or_refused", "", id="angel-one-row-nested-5000-deep"),
    pytest.param("angelone", lambda: angel_with(lotsize=float("inf")), {}, "skips_row", "", id="angel-lot-infinity"),
    pytest.param("angelone", lambda: angel_with(lotsize=1e30), {}, "skips_row", "", id="angel-lot-1e30"),
    pytest.param("angelone", lambda: angel_with(tick_size="NaN"), {}, "skips_row", "", id="angel-tick-nan"),
    pytest.param("angelone", lambda: angel_with(token={"value": "3045"}), {}, "skips_row", "",
                 id="angel-object-where-token-belongs"),
    pytest.param("angelone", lambda: angel_with(freeze_qty="9" * 30), {}, "skips_row", "", id="angel-freeze-qty-huge"),
    pytest.param("angelone", lambda: b"\xef\xbb\xbf" + ANGEL_JSON, {}, "loads", "", id="angel-utf8-bom"),
    pytest.param("angelone", lambda: ANGEL_JSON.replace(b'"SBIN-EQ"', b'"SB\xffIN-EQ"'), {}, "row_or_refused", "",
                 id="angel-non-utf8-byte-in-one-row"),
]


@pytest.mark.parametrize("broker_id, make, headers, kind, detail", MASTER_CASES)
def test_hostile_master(broker_id: str, make: Callable[[], bytes], headers: Dict[str, str], kind: str, detail: str,
                        tmp_path: Path, clock: FakeClock, clients: list, caplog: Any) -> None:
    first = open_client(clients, broker_id, tmp_path, clock, MASTERS[broker_id])
    base = first._instruments.loaded
    assert base is not None
    db = tmp_path / "instruments.db"
    before = file_digest(db)
    clock.set(DAY2)
    body = make()
    caplog.set_level(logging.WARNING, logger="ttconnect")
    caplog.clear()

    def start(on_stale: str) -> tt.TTConnect:
        with responses.RequestsMock(assert_all_requests_are_fired=True) as rs:
            rs.get(URLS[broker_id], body=body, headers=headers)
            client = tt.TTConnect(broker_id, cache_dir=str(tmp_path), on_stale=on_stale, clock=clock, sleep=clock.sleep)
        clients.append(client)
        return client

    def refused(words: Tuple[str, ...]) -> None:
        expect(tt.BrokerError, lambda: start("fail"), f"the {broker_id} instrument master", "could not be loaded",
               "kept untouched", *words)
        assert file_digest(db) == before
        assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]
        caplog.clear()
        warm = start("warn")
        assert warm.resolve(SBIN) == CASE[broker_id].sbin_token
        assert any("serving the cached DB" in m for m in messages(caplog))
        assert file_digest(db) == before

    def skipped(client: tt.TTConnect) -> None:
        loaded = client._instruments.loaded
        assert loaded is not None, "the new master was not loaded"
        assert loaded["malformed"] == base["malformed"] + 1
        assert loaded["rows"] == base["rows"] - 1
        expect(tt.InstrumentNotFoundError, lambda: client.resolve(SBIN))
        assert client.resolve(INFY) == INFY_TOKEN[broker_id]
        assert sum("skipped malformed row" in m for m in messages(caplog)) == loaded["malformed"]

    if kind == "refused":
        refused((detail,))
    elif kind == "row_or_refused":
        problem = ""
        try:
            client = start("fail")
        except tt.BrokerError:
            refused(())
        except BaseException as exc:  # noqa: BLE001
            problem = _raw(exc, " (expected the row skipped, or a BrokerError keeping the old DB)")
        else:
            skipped(client)
            conn = sqlite3.connect(db)
            assert conn.execute("SELECT COUNT(*) FROM instruments WHERE symbol LIKE '%' || char(65533) || '%'"
                                " OR length(name) > 1000").fetchone()[0] == 0
            conn.close()
        if problem:
            _fail_clean(problem)
    elif kind == "skips_row":
        skipped(no_raw(lambda: start("fail")))
    elif kind == "skips_row_any":
        client = no_raw(lambda: start("fail"))
        loaded = client._instruments.loaded
        assert loaded is not None and loaded["malformed"] == base["malformed"] + 1 and loaded["rows"] == base["rows"]
    elif kind == "duplicates":
        client = no_raw(lambda: start("fail"))
        loaded = client._instruments.loaded
        assert loaded is not None and loaded["rows"] == base["rows"] and loaded["duplicates"] == base["rows"]
        assert client.resolve(SBIN) == CASE[broker_id].sbin_token
    else:
        assert kind == "loads"
        client = no_raw(lambda: start("fail"))
        assert client._instruments.loaded == base
        assert client.resolve(SBIN) == CASE[broker_id].sbin_token


@pytest.mark.parametrize("broker_id", ["zerodha", "angelone"])
def test_first_run_with_a_garbage_master_says_what_failed(broker_id: str, tmp_path: Path, clock: FakeClock,
                                                          clients: list) -> None:
    with responses.RequestsMock() as rs:
        rs.get(URLS[broker_id], body=b"\x1f\x8b\x08\x00" + _garbage(512))
        expect(tt.BrokerError, lambda: kept(clients, broker_id, cache_dir=str(tmp_path), on_stale="warn", clock=clock),
               f"No instrument DB for {broker_id} is cached", "check the network or config 'instruments_url'")
    assert os.listdir(tmp_path) == ["instruments.db.lock"]


# ============================================================================
# 12.2 Hostile: The instrument DB and the cache dir
# ============================================================================


def _sql(statement: str) -> Callable[[Path], None]:
    def damage(db: Path) -> None:
        conn = sqlite3.connect(db)
        conn.execute(statement)
        conn.commit()
        conn.close()

    return damage


def _as_directory(db: Path) -> None:
    db.unlink()
    db.mkdir()


def _magic_then_garbage(db: Path) -> None:
    size = db.stat().st_size
    db.write_bytes(b"SQLite format 3\x00" + _garbage(size - 16))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda db: db.write_bytes(b""), id="truncated-to-0-bytes"),
    pytest.param(lambda db: db.write_bytes(db.read_bytes()[:4096]), id="truncated-to-its-first-page"),
    pytest.param(_magic_then_garbage, id="sqlite-header-then-garbage"),
    pytest.param(_as_directory, id="a-directory-in-its-place"),
])
def test_a_damaged_db_is_moved_aside_and_rebuilt(damage: Callable[[Path], None], tmp_path: Path, clock: FakeClock,
                                                  clients: list, caplog: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    damage(tmp_path / "instruments.db")
    caplog.set_level(logging.WARNING, logger="ttconnect")
    client = no_raw(lambda: open_client(clients, "zerodha", tmp_path, clock, KITE_CSV))  # same day: only the damage
    assert client.resolve(SBIN) == "779521"
    assert (tmp_path / "instruments.db.corrupt").exists()
    assert any("is damaged" in m and "rebuilding" in m for m in messages(caplog))


# The per-broker refresh record is damaged (another program, a half-restored backup, a machine
# whose clock was a year ahead when it refreshed): the master must be loaded again, not trusted.
@pytest.mark.parametrize("damage", [
    pytest.param(_sql("UPDATE _meta SET refreshed_at = 'garbage'"), id="refreshed-at-not-a-timestamp"),
    pytest.param(_sql("UPDATE _meta SET refreshed_at = '2026-11-21T10:00:00'"), id="refreshed-at-naive"),
    pytest.param(_sql("UPDATE _meta SET refreshed_at = '2027-11-21T10:00:00+05:30'"), id="refreshed-at-in-the-future"),
    pytest.param(_sql("UPDATE _meta SET rows = 'abc'"), id="row-count-not-a-number"),
])
def test_a_damaged_refresh_record_means_a_fresh_load(damage: Callable[[Path], None], tmp_path: Path, clock: FakeClock,
                                                     clients: list) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    damage(tmp_path / "instruments.db")
    clock.set(DAY2)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        client = no_raw(lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep))
        assert len(rs.calls) == 1, "the master was not downloaded again"
    assert client.resolve(SBIN) == "779521"
    conn = sqlite3.connect(tmp_path / "instruments.db")
    (refreshed,), = conn.execute("SELECT refreshed_at FROM _meta WHERE broker_id = 'zerodha'").fetchall()
    conn.close()
    assert refreshed == DAY2.isoformat()


def _damage_pages(db: Path) -> None:
    """Overwrite every page after the first one in place (the open client's file)."""
    data = bytearray(db.read_bytes())
    data[4096:] = b"\xa5" * (len(data) - 4096)
    with open(db, "r+b") as f:
        f.write(data)


def test_a_page_damaged_after_start_is_repaired_at_resolve(tmp_path: Path, clock: FakeClock, clients: list,
                                                           caplog: Any) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    _damage_pages(tmp_path / "instruments.db")
    caplog.set_level(logging.WARNING, logger="ttconnect")
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        assert no_raw(lambda: kite.resolve(INFY)) == "408065"
    assert [str(i) for i in kite.search("SBI", exchange="NSE")] == ["NSE:SBIN"]
    assert any("found damaged at a look-up" in m for m in messages(caplog))


def test_a_damaged_page_without_a_master_to_rebuild_from_says_what_to_do(tmp_path: Path, clock: FakeClock,
                                                                         clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    _damage_pages(tmp_path / "instruments.db")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        rs.get(URLS["zerodha"], body=requests.ConnectionError("network is unreachable"))
        expect(tt.ConfigurationError, lambda: kite.resolve(INFY), "is damaged and could not be rebuilt", "delete it")


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make a directory read-only for this process: chmod for a normal user; root ignores
    modes, so there the directory is made immutable instead (entries can be neither added nor
    removed, existing files stay writable -- what a read-only mode means to a normal user)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr: cannot make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_cache_dir_with_a_stale_db(tmp_path: Path, clock: FakeClock, clients: list, caplog: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    before = file_digest(tmp_path / "instruments.db")
    clock.set(DAY2)
    caplog.set_level(logging.WARNING, logger="ttconnect")
    with read_only(tmp_path):
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            rs.get(URLS["zerodha"], body=KITE_CSV)
            expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), clock=clock,
                                                       sleep=clock.sleep),
                   "could not be loaded", "kept untouched", "permissions")
            client = no_raw(lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                         sleep=clock.sleep))
        assert client.resolve(SBIN) == "779521"
        assert [str(i) for i in client.search("INF")] == ["NSE:INFY"]  # no index can be built: it scans
    assert file_digest(tmp_path / "instruments.db") == before
    assert any("serving the cached DB" in m for m in messages(caplog))


@pytest.mark.parametrize("on_stale", ["fail", "warn"])
def test_a_cache_dir_that_is_a_file(on_stale: str, tmp_path: Path, clock: FakeClock, clients: list) -> None:
    target = tmp_path / "cache.txt"
    target.write_text("a user's file")
    with no_request():
        expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cache_dir=str(target), on_stale=on_stale,
                                                   clock=clock), "'cache_dir'", str(target))
    assert target.read_text() == "a user's file"


def _disk_full(*args: Any, **kwargs: Any) -> Any:
    raise sqlite3.OperationalError("database or disk is full")


@pytest.mark.parametrize("how", ["init-fail", "init-warn", "refresh"])
def test_disk_full_while_building_keeps_the_old_db(how: str, tmp_path: Path, clock: FakeClock, clients: list,
                                                   monkeypatch: Any) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    before = file_digest(tmp_path / "instruments.db")
    monkeypatch.setattr(tt, "_create_indexes", _disk_full)
    clock.set(DAY2)
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        if how == "refresh":
            expect(tt.ConfigurationError, kite.refresh_instruments, "database or disk is full", "free space")
        elif how == "init-fail":
            expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), clock=clock,
                                                       sleep=clock.sleep),
                   "database or disk is full", "kept untouched", "free space")
        else:
            client = no_raw(lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                         sleep=clock.sleep))
            assert client.resolve(SBIN) == "779521"
    assert file_digest(tmp_path / "instruments.db") == before
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]


def test_disk_full_in_the_middle_of_the_bulk_load(tmp_path: Path, clock: FakeClock, clients: list,
                                                  monkeypatch: Any) -> None:
    """The disk fills while rows are being inserted (the parser is suspended mid-file): a typed
    error, the old DB, and no 'Exception ignored' from the abandoned parser afterwards."""
    import gc
    import sys

    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    before = file_digest(tmp_path / "instruments.db")
    real_staged = tt._Loader._staged

    def filling(self: Any, rows: Any) -> Iterator[tuple]:
        for i, row in enumerate(real_staged(self, rows)):
            if i == 10:
                raise sqlite3.OperationalError("database or disk is full")
            yield row

    monkeypatch.setattr(tt._Loader, "_staged", filling)
    ignored: List[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: ignored.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        expect(tt.ConfigurationError, kite.refresh_instruments, "database or disk is full")
    gc.collect()
    assert ignored == [], f"exceptions were ignored after the failed load: {ignored}"
    assert file_digest(tmp_path / "instruments.db") == before
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]


def test_disk_full_while_saving_the_download(tmp_path: Path, clock: FakeClock, clients: list, monkeypatch: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    before = file_digest(tmp_path / "instruments.db")

    def no_space(self: Any, url: str, dest: str, headers: Any, deadline: float) -> int:
        with open(dest, "wb") as f:
            f.write(KITE_CSV[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tt._Transport, "_download_once", no_space)
    clock.set(DAY2)
    expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), clock=clock,
                                               sleep=clock.sleep), "No space left on device", "kept untouched")
    assert file_digest(tmp_path / "instruments.db") == before
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]


def test_a_lock_file_that_cannot_be_opened(tmp_path: Path, clock: FakeClock, clients: list, caplog: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    lock = tmp_path / "instruments.db.lock"
    lock.unlink()
    lock.mkdir()  # something else holds the name: it cannot be opened as a file
    clock.set(DAY2)
    caplog.set_level(logging.WARNING, logger="ttconnect")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), clock=clock,
                                                   sleep=clock.sleep), "cache dir", "kept untouched")
        client = no_raw(lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                     sleep=clock.sleep))
        assert client.resolve(SBIN) == "779521"
        expect(tt.ConfigurationError, client.refresh_instruments, "cache dir")
    assert any("serving the cached DB" in m for m in messages(caplog))


# ----------------------------------------------------------------------------
# 12.2a Hostile: masters and the instrument DB (adversarial pass, each case reproduced first)
# ----------------------------------------------------------------------------


def _kite_rows_db(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT rows FROM _meta WHERE broker_id = 'zerodha'").fetchone()[0]
    finally:
        conn.close()


def test_a_gzip_master_cut_short_with_a_matching_length_keeps_the_old_db(tmp_path: Path, clock: FakeClock,
                                                                          clients: list) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    rows = _kite_rows_db(tmp_path / "instruments.db")
    body = gzip.compress(KITE_CSV)
    clock.set(DAY2)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        # a proxy serving a partial object: the Content-Length matches the cut body
        rs.get(URLS["zerodha"], body=body[: len(body) * 4 // 5], headers={"Content-Encoding": "gzip"})
        expect(tt.BrokerError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep),
               "download truncated", "gzip", "kept untouched")
        client = no_raw(lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                     sleep=clock.sleep))
    assert client.resolve(SBIN) == "779521"
    assert _kite_rows_db(tmp_path / "instruments.db") == rows


def test_a_whole_gzip_master_still_loads_and_another_encoding_is_refused(tmp_path: Path, clock: FakeClock,
                                                                         clients: list) -> None:
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=gzip.compress(KITE_CSV), headers={"Content-Encoding": "gzip"})
        client = kept(clients, "zerodha", cache_dir=str(tmp_path / "a"), clock=clock, sleep=clock.sleep)
        assert rs.calls[0].request.headers["Accept-Encoding"] == "gzip"
    assert client.resolve(SBIN) == "779521"
    assert _kite_rows_db(tmp_path / "a" / "instruments.db") == client._instruments.loaded["rows"] > 10
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=b"\x00" * 64, headers={"Content-Encoding": "br"})
        expect(tt.BrokerError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path / "b"), clock=clock,
                                            sleep=clock.sleep), "Content-Encoding 'br'")


def test_a_gzip_master_of_several_members_loads_whole(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    """A gzip body may be several members one after another (pigz, bgzip, files joined): the
    inflater starts again after each (it stopped after the first: the rest was refused, or,
    arriving in the same read, dropped, and a shorter master kept). Junk after them is refused."""
    half = KITE_CSV.index(b"\n", len(KITE_CSV) // 2) + 1
    members = gzip.compress(KITE_CSV[:half]) + gzip.compress(KITE_CSV[half:])
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=members, headers={"Content-Encoding": "gzip"})
        client = kept(clients, "zerodha", cache_dir=str(tmp_path / "a"), clock=clock, sleep=clock.sleep)
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        plain = kept(clients, "zerodha", cache_dir=str(tmp_path / "b"), clock=clock, sleep=clock.sleep)
    assert client.resolve(SBIN) == "779521"
    assert _kite_rows_db(tmp_path / "a" / "instruments.db") == _kite_rows_db(tmp_path / "b" / "instruments.db") > 10
    assert client._instruments.loaded["rows"] == plain._instruments.loaded["rows"]
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=members + b"not gzip", headers={"Content-Encoding": "gzip"})
        expect(tt.BrokerError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path / "c"), clock=clock,
                                            sleep=clock.sleep), "gzip")


def _with_rows(broker: str, extra: List[Any]) -> bytes:
    """``broker``'s fixture master with ``extra`` rows appended (CSV lines for Kite, objects else)."""
    if broker == "zerodha":
        return KITE_CSV.rstrip(b"\n") + b"\n" + "".join(line + "\n" for line in extra).encode()
    if broker == "angelone":
        return json.dumps(json.loads(ANGEL_JSON) + extra).encode()
    return gzip.compress(json.dumps(json.loads(gzip.decompress(UPSTOX_GZ)) + extra).encode())


_FIXTURE = {"zerodha": KITE_CSV, "angelone": ANGEL_JSON, "upstox": UPSTOX_GZ}
_ZERO_LOT_OR_TICK = {  # an option with lot 0, its put with tick 0, an equity with lot 0
    "zerodha": ['99001,1,NIFTY26NOV24000CE,"NIFTY",0,2026-11-24,24000,0.05,0,CE,NFO-OPT,NFO',
                '99002,2,NIFTY26NOV24000PE,"NIFTY",0,2026-11-24,24000,0,65,PE,NFO-OPT,NFO',
                '99003,3,ZEROLOT,"ZERO LOT",0,,0,0.05,0,EQ,NSE,NSE'],
    "angelone": [
        {"token": "99001", "symbol": "NIFTY24NOV2624000CE", "name": "NIFTY", "expiry": "24NOV2026",
         "strike": "2400000.000000", "lotsize": "0", "instrumenttype": "OPTIDX", "exch_seg": "NFO", "tick_size": "5.000000"},
        {"token": "99002", "symbol": "NIFTY24NOV2624000PE", "name": "NIFTY", "expiry": "24NOV2026",
         "strike": "2400000.000000", "lotsize": "65", "instrumenttype": "OPTIDX", "exch_seg": "NFO", "tick_size": "0.000000"},
        {"token": "99003", "symbol": "ZEROLOT-EQ", "name": "ZEROLOT", "expiry": "", "strike": "-1.000000", "lotsize": "0",
         "instrumenttype": "", "exch_seg": "NSE", "tick_size": "5.000000"}],
    "upstox": [
        {"segment": "NSE_FO", "name": "NIFTY", "expiry": 1795544999000, "instrument_type": "CE", "underlying_symbol": "NIFTY",
         "instrument_key": "NSE_FO|99001", "lot_size": 0, "tick_size": 5.0, "underlying_type": "INDEX",
         "trading_symbol": "NIFTY 24000 CE 24 NOV 26", "strike_price": 24000.0},
        {"segment": "NSE_FO", "name": "NIFTY", "expiry": 1795544999000, "instrument_type": "PE", "underlying_symbol": "NIFTY",
         "instrument_key": "NSE_FO|99002", "lot_size": 65, "tick_size": 0.0, "underlying_type": "INDEX",
         "trading_symbol": "NIFTY 24000 PE 24 NOV 26", "strike_price": 24000.0},
        {"segment": "NSE_EQ", "name": "ZERO LOT", "instrument_type": "EQ", "instrument_key": "NSE_EQ|INE000Z01010",
         "lot_size": 0, "tick_size": 5.0, "trading_symbol": "ZEROLOT"}],
}


@pytest.mark.parametrize("broker", sorted(_ZERO_LOT_OR_TICK))
def test_a_traded_row_with_lot_or_tick_0_is_malformed(broker: str, tmp_path: Path, clock: FakeClock,
                                                     clients: list) -> None:
    plain = open_client(clients, broker, tmp_path / "plain", clock, _FIXTURE[broker])._instruments.loaded
    client = open_client(clients, broker, tmp_path, clock, _with_rows(broker, _ZERO_LOT_OR_TICK[broker]))
    loaded = client._instruments.loaded
    assert (loaded["rows"], loaded["malformed"]) == (plain["rows"], plain["malformed"] + 3)
    for option_type in ("CE", "PE"):
        expect(tt.InstrumentNotFoundError, lambda: tt.Option("NFO", "NIFTY", "2026-11-24", 24000, option_type),
               "strike 24000 not listed")
    expect(tt.InstrumentNotFoundError, lambda: tt.Equity("NSE", "ZEROLOT"), "no equity 'ZEROLOT'")
    assert client.lot_size(tt.Option("NFO", "NIFTY", "2026-11-24", 23400, "CE")) == 65  # its neighbours still load
    assert client.lot_size(tt.Index("NSE", "NIFTY")) in (0, 1)  # index rows may carry 0 (Angel says 1)


def test_an_index_and_an_equity_of_one_name_never_share_a_token(tmp_path: Path, clock: FakeClock, clients: list,
                                                               caplog: Any) -> None:
    # Their keys are equal (BSE|METAL): the second row would file under the first's id and resolve
    # to its token. It is refused, loudly.
    plain = open_client(clients, "zerodha", tmp_path / "plain", clock, KITE_CSV)._instruments.loaded
    caplog.set_level(logging.WARNING, logger="ttconnect")
    client = open_client(clients, "zerodha", tmp_path, clock, _with_rows("zerodha", [
        '265,1,METAL,"METAL",0,,0,0,0,EQ,INDICES,BSE',
        '128000001,500001,METAL,"METAL LTD",0,,0,0.05,1,EQ,BSE,BSE',
    ]))
    loaded = client._instruments.loaded
    assert (loaded["rows"], loaded["malformed"]) == (plain["rows"] + 1, plain["malformed"] + 1)
    assert client.resolve(tt.Index("BSE", "METAL")) == "265"
    expect(tt.InstrumentNotFoundError, lambda: tt.Equity("BSE", "METAL"), "no equity 'METAL'")
    assert any("BSE:METAL" in m and "token 265" in m and "token 128000001" in m for m in messages(caplog))


def _die_mid_write(db: Path) -> None:
    """A process killed (SIGKILL) while it builds indexes in place: its hot journal stays behind."""
    script = textwrap.dedent(f"""
        import os, sqlite3
        w = sqlite3.connect({str(db)!r}, isolation_level=None)
        w.execute("PRAGMA cache_size = 1")  # spill pages into the file before the commit, as a big master does
        w.execute("BEGIN")
        w.execute("CREATE INDEX ix_broker_tokens_symbol ON broker_tokens(broker_symbol)")
        w.execute("CREATE INDEX ix_broker_tokens_token ON broker_tokens(token)")
        os.kill(os.getpid(), 9)
    """)
    subprocess.run([sys.executable, "-c", script], timeout=20)
    assert (db.parent / (db.name + "-journal")).stat().st_size > 0


def test_a_hot_journal_left_by_a_killed_process_is_rolled_back_at_start(tmp_path: Path, clock: FakeClock,
                                                                        clients: list) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    db = tmp_path / "instruments.db"
    _die_mid_write(db)
    client = no_raw(lambda: open_client(clients, "zerodha", tmp_path, clock))  # same day: nothing to download
    assert client.resolve(SBIN) == "779521"
    assert tt.Equity("NSE", "SBIN") in client.search("SB")
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]  # not moved aside
    client.close()
    db.unlink()  # a journal whose file is gone must not pair with the next one
    (tmp_path / "instruments.db-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + b"\x00" * 504)
    client = no_raw(lambda: open_client(clients, "zerodha", tmp_path, clock, KITE_CSV))
    assert client.resolve(SBIN) == "779521"
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]


def test_a_hot_journal_left_after_a_client_opened_is_rolled_back_at_its_look_up(tmp_path: Path, clock: FakeClock,
                                                                                clients: list) -> None:
    client = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    _die_mid_write(tmp_path / "instruments.db")
    assert tt.Equity("NSE", "SBIN") in no_raw(lambda: client.search("SB"))
    assert client.resolve(tt.Equity("BSE", "SBIN")) == "128028676"
    assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]


def test_a_db_locked_by_another_program_is_not_moved_aside(tmp_path: Path, clock: FakeClock, clients: list,
                                                           monkeypatch: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    db = tmp_path / "instruments.db"
    before = file_digest(db)
    monkeypatch.setattr(tt, "_DB_BUSY_TIMEOUT", 0.05)
    other = sqlite3.connect(db, isolation_level=None)  # a DB browser in the middle of a write
    other.execute("BEGIN EXCLUSIVE")
    clock.set(DAY2)
    try:
        with no_request():
            err = expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), on_stale="warn",
                                                             clock=clock, sleep=clock.sleep),
                         "locked by another program", "retry")
        assert err.retryable
        assert sorted(os.listdir(tmp_path)) == ["instruments.db", "instruments.db.lock"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert file_digest(db) == before
    client = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)  # once released, the refresh goes ahead
    assert client.resolve(SBIN) == "779521"
    assert _kite_rows_db(db) == client._instruments.loaded["rows"]


def test_a_kite_derivative_on_a_cash_exchange_is_malformed(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    plain = open_client(clients, "zerodha", tmp_path / "plain", clock, KITE_CSV)._instruments.loaded
    odd = _with_rows("zerodha", ['99990010,390010,ODDFUT,"SBIN",0,2026-11-24,0,0.05,1,FUT,NSE,NSE',
                                 '99990011,390011,ODDEQ,"ODD EQ",0,,0,0.05,1,EQ,NFO-OPT,NFO'])
    client = no_raw(lambda: open_client(clients, "zerodha", tmp_path, clock, odd))
    assert client._instruments.loaded == dict(plain, malformed=plain["malformed"] + 2)
    with responses.RequestsMock() as rs:  # the same through refresh_instruments()
        rs.get(URLS["zerodha"], body=odd)
        assert no_raw(client.refresh_instruments)["malformed"] == plain["malformed"] + 2
    assert client.resolve(SBIN) == "779521"


@pytest.mark.parametrize("broker", ["angelone", "upstox"])
def test_a_json_master_element_that_never_closes_is_refused_early(broker: str, tmp_path: Path, clock: FakeClock,
                                                                  clients: list) -> None:
    never_closes = b'[{"token": "' + b"x" * 300_000  # the buffer used to grow (and be rescanned) to the end
    body = gzip.compress(never_closes) if broker == "upstox" else never_closes
    with responses.RequestsMock() as rs:
        rs.get(URLS[broker], body=body)
        expect(tt.BrokerError, lambda: kept(clients, broker, cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep),
               "65,536 characters without closing")


def test_a_json_master_past_the_size_cap_is_refused(tmp_path: Path, clock: FakeClock, clients: list,
                                                    monkeypatch: Any) -> None:
    monkeypatch.setattr(tt, "_MAX_MASTER_BYTES", 60_000)
    readable = gzip.decompress(UPSTOX_GZ)
    assert len(readable) < 60_000
    assert open_client(clients, "upstox", tmp_path / "a", clock, UPSTOX_GZ).resolve(tt.Equity("NSE", "RELIANCE"))
    bomb = gzip.compress(b"[" + b" " * 100_000 + readable.lstrip()[1:])  # valid JSON, inflating past the cap
    with responses.RequestsMock() as rs:
        rs.get(URLS["upstox"], body=bomb)
        expect(tt.BrokerError, lambda: kept(clients, "upstox", cache_dir=str(tmp_path / "b"), clock=clock,
                                            sleep=clock.sleep), "over 60,000 bytes of JSON")


@pytest.mark.parametrize("encoded", [True, False], ids=["gzip-bomb", "plain"])
def test_a_master_download_past_the_size_cap_is_stopped_there(encoded: bool, tmp_path: Path, clock: FakeClock,
                                                               clients: list, monkeypatch: Any) -> None:
    monkeypatch.setattr(tt, "_MAX_MASTER_BYTES", 50_000)
    written: List[int] = []  # what the partial download held when it was removed
    remove = tt._remove_quietly

    def measured(path: str) -> None:
        if path.endswith(".download") and os.path.exists(path):
            written.append(os.path.getsize(path))
        remove(path)

    monkeypatch.setattr(tt, "_remove_quietly", measured)
    assert open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).resolve(SBIN) == "779521"  # under the cap
    big = KITE_CSV.split(b"\n", 1)[0] + b"\n" + b"1" * 400_000
    clock.set(DAY2)
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=gzip.compress(big) if encoded else big,
               headers={"Content-Encoding": "gzip"} if encoded else {})
        expect(tt.BrokerError, lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep),
               "runs past 50,000 bytes", "kept untouched")
        assert no_raw(lambda: kept(clients, "zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                   sleep=clock.sleep)).resolve(SBIN) == "779521"
    assert written and max(written) <= 50_000


def test_a_kite_token_must_be_ascii_digits_that_fit_the_feed(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    plain = open_client(clients, "zerodha", tmp_path / "plain", clock, KITE_CSV)._instruments.loaded
    client = open_client(clients, "zerodha", tmp_path, clock, _with_rows("zerodha", [
        '²,3046,SUPERSCRIPT,"S LTD",0,,0,0.05,1,EQ,NSE,NSE',  # str.isdigit() passes these two
        '١٢٣٤٥٦,3047,ARABIC,"A LTD",0,,0,0.05,1,EQ,NSE,NSE',
        '4294967296,3048,PASTUINT,"P LTD",0,,0,0.05,1,EQ,NSE,NSE',  # 2**32: the feed's tokens are uint32
        '4294967295,3049,LASTUINT,"L LTD",0,,0,0.05,1,EQ,NSE,NSE',
    ]))
    loaded = client._instruments.loaded
    assert (loaded["rows"], loaded["malformed"]) == (plain["rows"] + 1, plain["malformed"] + 3)
    for symbol in ("SUPERSCRIPT", "ARABIC", "PASTUINT"):
        expect(tt.InstrumentNotFoundError, lambda: tt.Equity("NSE", symbol), f"no equity {symbol!r}")
    assert client.resolve(tt.Equity("NSE", "LASTUINT")) == "4294967295"


class _TrickleHandler(http.server.BaseHTTPRequestHandler):
    """A stalled proxy: the master one byte at a time, each well within the read timeout."""

    stop = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        try:
            for byte in KITE_CSV:
                if self.stop.wait(0.02):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:  # the client gave up
            pass

    def log_message(self, *args: Any) -> None:
        pass


def test_a_master_download_is_bounded_in_all(tmp_path: Path, clock: FakeClock, clients: list,
                                             monkeypatch: Any) -> None:
    open_client(clients, "zerodha", tmp_path, clock, KITE_CSV).close()
    monkeypatch.setattr(tt, "_DOWNLOAD_DEADLINE", 0.4)  # 300 s for real; a trickle of 2654 bytes takes 53 s here
    handler = type("Handler", (_TrickleHandler,), {"stop": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clock.set(DAY2)
    config = {"cache_dir": str(tmp_path), "instruments_url": f"http://127.0.0.1:{server.server_address[1]}/kite",
              "timeout": 1, "max_retries": 0}
    started = time.monotonic()
    try:
        expect(tt.NetworkError, lambda: kept(clients, "zerodha", config, clock=clock, sleep=clock.sleep),
               "took over 0.4 s", "stalled", "kept untouched")
        assert time.monotonic() - started < 1.5
        client = no_raw(lambda: kept(clients, "zerodha", dict(config, on_stale="warn"), clock=clock, sleep=clock.sleep))
    finally:
        handler.stop.set()
        server.shutdown()
        server.server_close()
    assert client.resolve(SBIN) == "779521"


def test_an_upstox_expiry_in_another_unit_is_malformed(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    plain = open_client(clients, "upstox", tmp_path / "plain", clock, UPSTOX_GZ)
    expiries = plain.expiries("NIFTY")
    row = {"segment": "NSE_FO", "name": "NIFTY", "instrument_type": "FUT", "underlying_symbol": "NIFTY", "lot_size": 65,
           "tick_size": 10.0, "underlying_type": "INDEX", "trading_symbol": "NIFTY FUT 24 NOV 26", "strike_price": 0.0}
    client = open_client(clients, "upstox", tmp_path, clock, _with_rows("upstox", [
        dict(row, expiry=1795544999, instrument_key="NSE_FO|99101"),  # seconds: 1970-01-21 as milliseconds
        dict(row, expiry=-5, instrument_key="NSE_FO|99102"),
    ]))
    assert client._instruments.loaded["malformed"] == plain._instruments.loaded["malformed"] + 2
    assert client.expiries("NIFTY") == expiries and expiries[0] == dt.date(2026, 11, 24)


def test_a_nul_in_cache_dir_and_a_huge_integer_strike_are_typed_errors(tmp_path: Path, clients: list) -> None:
    with no_request():
        expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cache_dir=f"{tmp_path}/a\x00b"),
               "'cache_dir'", "no NUL character")
    expect(tt.InvalidInstrumentError, lambda: tt.Option("NFO", "NIFTY", "2026-11-24", 10**5000, "CE"),
           "strike must be a positive number")
    assert tt.Option("NFO", "NIFTY", "2026-11-24", 10**6, "CE").strike == 1e6  # no store open: shape only


# ============================================================================
# 12.3 Hostile: Session files and session stores
# ============================================================================

_VALID_SESSION = {"broker": "angelone", "mode": "auto", "access_token": "old-jwt-SECRET", "refresh_token": "old-refresh-SECRET",
                  "feed_token": "old-feed-SECRET", "obtained_at": "2026-11-23T09:00:00+05:30",
                  "expires_at": "2026-11-24T00:00:00+05:30", "app_key": "angelkey01", "user_id": "A123456"}


def _session(**changes: Any) -> bytes:
    return json.dumps({**_VALID_SESSION, **changes}).encode()


SESSION_FILES = [
    pytest.param(b'{"broker": "angelone", "access_tok', id="corrupt-json"),
    pytest.param(b'["angelone", "auto", "old-jwt-SECRET"]', id="a-json-list"),
    pytest.param(_session(access_token=12345), id="token-of-the-wrong-type"),
    pytest.param(_session(expires_at="2026-11-24T00:00:00"), id="naive-timestamp"),
    pytest.param(_session(obtained_at="2026-11-22T10:00:00+05:30", expires_at="2026-11-23T00:00:00+05:30"), id="expired"),
    pytest.param(_session(user_id="B999999"), id="another-client-id"),
    pytest.param(_session(app_key="otherkey01"), id="another-api-key"),
    pytest.param(_session(user_id=None, app_key=None), id="no-identity-recorded"),
    pytest.param(_session(broker="zerodha"), id="another-broker"),
    pytest.param(b"[" * 100_000, id="nested-100000-deep"),
    pytest.param(b'{"broker": "angelone", "access_token": "\xff\xfe"}', id="not-utf8"),
]


@pytest.mark.parametrize("content", SESSION_FILES)
def test_an_unusable_session_file_means_a_fresh_login(content: bytes, tmp_path: Path, day_clock: FakeClock,
                                                      clients: list, caplog: Any) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True)
    path = tmp_path / "angelone_session.json"
    path.write_bytes(content)
    caplog.set_level(logging.DEBUG, logger="ttconnect")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_profile")
        profile = no_raw(angel.get_profile)
        assert len(api.calls("login")) == 1
        assert api.calls("get_profile")[0].request.headers["Authorization"] == f"Bearer {LOGIN['jwtToken']}"
    assert profile.user_id == "A123456"
    saved = json.loads(path.read_text())
    assert (saved["access_token"], saved["user_id"], saved["app_key"], saved["expires_at"]) == (
        LOGIN["jwtToken"], "A123456", "angelkey01", "2026-11-24T00:00:00+05:30")
    for text in messages(caplog):
        assert "old-jwt-SECRET" not in text and "old-refresh-SECRET" not in text


def test_a_stored_session_for_another_app_is_not_reused_for_a_single_use_code(tmp_path: Path, day_clock: FakeClock,
                                                                               clients: list) -> None:
    creds = {"api_key": "kitekey01", "api_secret": "kite-api-SECRET", "request_token": "req-TOKEN-1"}
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "zerodha_session.json").write_text(json.dumps({
        "broker": "zerodha", "mode": "manual", "access_token": "other-app-SECRET", "refresh_token": None,
        "feed_token": None, "obtained_at": "2026-11-23T09:00:00+05:30", "expires_at": "2026-11-24T06:00:00+05:30",
        "user_id": "AB1234", "app_key": "otherkey01", "source": tt._digest("req-TOKEN-1")}))
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        api = MockApi(rs, "zerodha")
        api.on("login")
        api.on("get_profile")
        kite = kept(clients, "zerodha", {"cache_dir": str(tmp_path), "cache_session": True, **creds}, clock=day_clock,
                    sleep=day_clock.sleep)
        kite.get_profile()
        assert len(api.calls("login")) == 1
        assert api.calls("get_profile")[0].request.headers["Authorization"] == f"token kitekey01:{KITE_LOGIN['access_token']}"


@pytest.mark.parametrize("whose, words", [
    ({"app_key": "otherkey01"}, "it was made with another 'api_key'"),
    ({"broker": "upstox"}, "it is for broker 'upstox'"),
])
def test_a_stored_session_of_another_app_is_named_so_not_expired(whose: Dict[str, Any], words: str, tmp_path: Path,
                                                                 day_clock: FakeClock, clients: list) -> None:
    """With no token in the config, another app's unexpired session was reported as 'the session has expired'."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "zerodha_session.json").write_text(json.dumps({
        "broker": "zerodha", "mode": "manual", "access_token": "other-app-SECRET", "refresh_token": None,
        "feed_token": None, "obtained_at": "2026-11-23T09:00:00+05:30", "expires_at": "2026-11-24T06:00:00+05:30",
        "user_id": "AB1234", "app_key": "kitekey01", **whose}))
    kite = open_client(clients, "zerodha", tmp_path, day_clock, KITE_CSV, api_key="kitekey01", cache_session=True)
    with responses.RequestsMock() as rs:
        exc = expect(tt.AuthenticationError, kite.get_profile, "the stored zerodha session (", "zerodha_session.json) is "
                     "not this account's: " + words, "log in at https://kite.zerodha.com/connect/login")
        assert len(rs.calls) == 0
    assert "expired" not in str(exc) and "SECRET" not in str(exc)


class _Vault:
    """A session store an application brings; each test makes one method misbehave."""

    def __init__(self, load: Callable[[], Any] = lambda: None, save_error: Optional[BaseException] = None) -> None:
        self._load, self._save_error = load, save_error
        self.saved: List[Any] = []

    def load(self) -> Any:
        return self._load()

    def save(self, session: Any) -> None:
        if self._save_error is not None:
            raise self._save_error
        self.saved.append(session)

    def clear(self) -> None:
        self.saved.clear()


def _raises(exc: BaseException) -> Callable[[], Any]:
    def load() -> Any:
        raise exc

    return load


@pytest.mark.parametrize("vault", [
    pytest.param(lambda: _Vault(load=_raises(OSError(5, "vault unreachable"))), id="load-raises-oserror"),
    pytest.param(lambda: _Vault(load=_raises(ValueError("decryption failed: bad padding"))), id="load-raises-valueerror"),
    pytest.param(lambda: _Vault(load=lambda: {"access_token": "dict-SECRET", "broker": "angelone"}), id="load-returns-a-dict"),
    pytest.param(lambda: _Vault(load=lambda: "jwt-as-a-string-SECRET"), id="load-returns-a-string"),
    pytest.param(lambda: _Vault(load=lambda: tt.SessionData(broker="angelone", mode=tt.AuthMode.AUTO,
                                                           access_token="odd-SECRET",
                                                           expires_at="2099-01-01T00:00:00+05:30")),  # type: ignore[arg-type]
                 id="load-returns-sessiondata-with-a-text-expiry"),
    pytest.param(lambda: _Vault(save_error=OSError(28, "No space left on device")), id="save-raises"),
])
def test_a_misbehaving_session_store(vault: Callable[[], _Vault], tmp_path: Path, day_clock: FakeClock,
                                     clients: list) -> None:
    """The store is the application's code: whatever it does, the caller sees a working call
    (a fresh login) or a ConfigurationError naming the session_store -- never its raw error."""
    angel = rest_client(clients, "angelone", tmp_path, day_clock, session_store=vault())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_profile")
        problem = ""
        try:
            profile = angel.get_profile()
        except tt.ConfigurationError as exc:
            if "session_store" not in str(exc):
                problem = f"ConfigurationError does not name the session_store: {exc}"
        except BaseException as exc:  # noqa: BLE001
            problem = _raw(exc, " (expected a fresh login or a ConfigurationError naming session_store)")
        else:
            assert profile.user_id == "A123456" and len(api.calls("login")) == 1
    if problem:
        _fail_clean(problem)


def test_a_session_file_path_taken_by_a_directory(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True)
    (tmp_path / "angelone_session.json").mkdir()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_profile")
        problem = ""
        try:
            profile = angel.get_profile()
        except tt.ConfigurationError as exc:
            if "angelone_session.json" not in str(exc):
                problem = f"ConfigurationError does not name the session file: {exc}"
        except BaseException as exc:  # noqa: BLE001
            problem = _raw(exc, " (expected the call to work, or a ConfigurationError naming the session file)")
        else:
            assert profile.user_id == "A123456" and len(api.calls("login")) == 1
    if problem:
        _fail_clean(problem)


def test_a_file_or_symlink_planted_where_the_session_is_written_gets_no_token(tmp_path: Path) -> None:
    # A shared cache dir (mode 0777): another user plants, at every name the old code could have
    # picked, a world-readable file and a symlink to a file of theirs.
    os.chmod(tmp_path, 0o777)
    path = tmp_path / "zerodha_session.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("their data\n")
    planted = tmp_path / f"zerodha_session.json.{os.getpid()}.{threading.get_ident()}.tmp"
    planted.symlink_to(victim)
    now = dt.datetime(2026, 11, 23, 10, 0, tzinfo=tt.IST)
    session = tt.SessionData(broker="zerodha", mode=tt.AuthMode.MANUAL, access_token="kite-access-SECRET",
                             obtained_at=now, expires_at=now + dt.timedelta(hours=20))
    store = tt._FileStore(str(path))
    store.save(session)
    store.save(session)
    assert victim.read_text() == "their data\n" and planted.is_symlink()
    assert (path.stat().st_mode & 0o777) == 0o600 and not path.is_symlink()
    assert store.load() == session
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, victim.name, planted.name])  # no temp left


# ============================================================================
# 12.4 Hostile: Broker replies, route by route
# ============================================================================

MARGIN_LEG = [tt.OrderLeg(NIFTY_CE, 65, tt.Side.BUY, tt.ProductType.NRML, tt.OrderType.LIMIT, price=120.5)]
CALLS: Dict[str, Callable[[tt.TTConnect], Any]] = {
    "get_profile": lambda c: c.get_profile(),
    "get_funds": lambda c: c.get_funds(),
    "get_holdings": lambda c: c.get_holdings(),
    "get_positions": lambda c: c.get_positions(),
    "get_orders": lambda c: c.get_orders(),
    "get_trades": lambda c: c.get_trades(),
    "calculate_margin": lambda c: c.calculate_margin(MARGIN_LEG),
    "get_order_history": lambda c: c.get_order(ZERODHA.placed_id),
    "get_order": lambda c: c.get_order(ANGELONE.placed_id),
}


def _funds(broker: str, path: Tuple[str, ...], value: Any) -> Any:
    data = payload(broker, "get_funds")["data"]
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def _order_detail(**changes: Any) -> Any:
    data = payload("angelone", "get_order")["data"]
    data.update(changes)
    return {k: v for k, v in data.items() if v is not _DROP}


def _kite_history(**changes: Any) -> Any:
    rows = payload("zerodha", "get_order_history")["data"]
    return [dict(row, **changes) for row in rows]


_DROP = object()

# (broker, route, the reply's data, fragments the BrokerError must carry: the route and the field)
OBJECT_REPLIES = [
    pytest.param("zerodha", "get_profile", None, ("get_profile", "expected an object"), id="kite-profile-data-null"),
    pytest.param("zerodha", "get_profile", {"user_name": "Test User"}, ("get_profile", "user_id"),
                 id="kite-profile-user-id-missing"),
    pytest.param("angelone", "get_profile", [{"clientcode": "A123456"}], ("get_profile", "expected an object"),
                 id="angel-profile-data-a-list"),
    pytest.param("angelone", "get_profile", {"clientcode": {"id": "A123456"}}, ("get_profile", "clientcode"),
                 id="angel-profile-clientcode-an-object"),
    pytest.param("zerodha", "get_funds", {}, ("get_funds", "net"), id="kite-funds-data-empty"),
    pytest.param("angelone", "get_funds", {}, ("get_funds", "net"), id="angel-funds-data-empty"),
    pytest.param("zerodha", "get_funds", _funds("zerodha", ("equity", "utilised", "debits"), "NaN"),
                 ("get_funds", "debits"), id="kite-funds-nan-as-a-string"),
    pytest.param("angelone", "get_funds", _funds("angelone", ("net",), 10 ** 400), ("get_funds", "net"),
                 id="angel-funds-a-400-digit-number"),
    pytest.param("zerodha", "calculate_margin", {"initial": "abc", "final": {"total": 1.0}},
                 ("calculate_margin", "initial"), id="kite-margin-initial-a-string"),
    pytest.param("angelone", "calculate_margin", {"totalMarginRequired": "NaN", "marginComponents": {}},
                 ("calculate_margin", "totalMarginRequired"), id="angel-margin-nan"),
    pytest.param("angelone", "get_order", _order_detail(transactiontype="HOLD"), ("get_order", "transactiontype", "HOLD"),
                 id="angel-order-side-hold"),
    pytest.param("angelone", "get_order", _order_detail(orderid=_DROP), ("get_order", "orderid"),
                 id="angel-order-id-missing"),
    pytest.param("zerodha", "get_order_history", _kite_history(transaction_type="HOLD"),
                 ("get_order_history", "transaction_type"), id="kite-history-every-state-side-hold"),
]


@pytest.mark.parametrize("broker_id, route, data, words", OBJECT_REPLIES)
def test_a_malformed_object_reply_names_the_route_and_field(broker_id: str, route: str, data: Any,
                                                           words: Tuple[str, ...], tmp_path: Path,
                                                           day_clock: FakeClock, clients: list) -> None:
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    if route == "get_order":
        client._order_refs[case.placed_id] = "5c1f7e3a-8d42-4b6e-9a07-31d2c4e8f915"  # as its place reply gave it
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, case).on(route, body=json.dumps(ok_body(broker_id, data)))
        expect(tt.BrokerError, lambda: CALLS[route](client), f"{broker_id} ", *words)


NESTED = "[" * 100_000 + "]" * 100_000

# A reply that is no usable JSON envelope at all: a BrokerError naming the route, sent once.
ODD_BODIES = [
    pytest.param("zerodha", "get_profile", 200, "<html><body>Session portal: please log in</body></html>",
                 ("HTTP 200", "non-JSON"), id="kite-200-with-html"),
    pytest.param("angelone", "get_funds", 200, "<!doctype html><title>Maintenance</title>", ("HTTP 200", "non-JSON"),
                 id="angel-200-with-html"),
    pytest.param("zerodha", "get_orders", 200, NESTED, (), id="kite-body-nested-100000-deep"),
    pytest.param("angelone", "get_positions", 200, '{"status": true, "data": ' + NESTED + "}", (),
                 id="angel-data-nested-100000-deep"),
    pytest.param("zerodha", "get_holdings", 200, "null", (), id="kite-json-null"),
]


@pytest.mark.parametrize("broker_id, route, status, body, words", ODD_BODIES)
def test_a_reply_that_is_no_envelope(broker_id: str, route: str, status: int, body: str, words: Tuple[str, ...],
                                     tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, case)
        api.on(route, body=body, status=status)
        expect(tt.BrokerError, lambda: CALLS[route](client), f"{broker_id} {route}", *words)
        assert len(api.calls(route)) == 1  # a 200 is not retried
    assert day_clock.slept == []


def _rows(broker: str, route: str) -> Tuple[Any, List[Any]]:
    """The route's fixture payload and (a reference to) its rows."""
    body = payload(broker, route)
    if route == "get_positions" and broker == "zerodha":
        return body, body["data"]["net"]
    if route == "get_holdings" and broker == "angelone":
        return body, body["data"]["holdings"]
    return body, body["data"]


def _first_row(broker: str, route: str, **changes: Any) -> Any:
    row = dict(_rows(broker, route)[1][0], **changes)
    return {k: v for k, v in row.items() if v is not _DROP}


# (broker, route, the bad row added among the good ones, the field the warning names)
BAD_ROWS = [
    pytest.param("zerodha", "get_orders", _first_row("zerodha", "get_orders", transaction_type="HOLD", order_id="9"),
                 "HOLD", id="kite-order-side-hold"),
    pytest.param("zerodha", "get_orders", "garbage", "expected an object", id="kite-order-row-a-string"),
    pytest.param("angelone", "get_orders", _first_row("angelone", "get_orders", quantity="NaN", orderid="9"),
                 "NaN", id="angel-order-quantity-nan"),
    pytest.param("angelone", "get_orders", _first_row("angelone", "get_orders", orderid=_DROP), "orderid",
                 id="angel-order-id-missing"),
    pytest.param("zerodha", "get_holdings", _first_row("zerodha", "get_holdings", exchange=_DROP), "exchange",
                 id="kite-holding-exchange-missing"),
    pytest.param("angelone", "get_holdings", _first_row("angelone", "get_holdings", tradingsymbol={"s": "X"}),
                 "trading symbol", id="angel-holding-symbol-an-object"),
    pytest.param("zerodha", "get_positions", _first_row("zerodha", "get_positions", quantity={"net": 65}),
                 "number expected", id="kite-position-quantity-an-object"),
    pytest.param("angelone", "get_trades", _first_row("angelone", "get_trades", filltime="25:61:00", fillid="9"),
                 "filltime", id="angel-trade-time-impossible"),
    pytest.param("zerodha", "get_trades", _first_row("zerodha", "get_trades", trade_id=None), "trade_id",
                 id="kite-trade-id-null"),
]


@pytest.mark.parametrize("broker_id, route, bad, words", BAD_ROWS)
def test_one_bad_row_is_left_out_counted_and_logged(broker_id: str, route: str, bad: Any, words: str, tmp_path: Path,
                                                    day_clock: FakeClock, clients: list, caplog: Any) -> None:
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, case).on(route)
        good = no_raw(lambda: CALLS[route](client))
    body, rows = _rows(broker_id, route)
    rows.insert(1, bad)
    caplog.set_level(logging.WARNING, logger="ttconnect")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, case).on(route, body=body)
        got = no_raw(lambda: CALLS[route](client))
    assert got == good  # the good rows, all of them, unchanged
    logged = [m for m in messages(caplog) if f"{broker_id} {route}:" in m]
    assert any("left out malformed row 1" in m and words in m for m in logged), logged
    assert any(f"1 of {len(rows)} rows were malformed" in m for m in logged), logged


@pytest.mark.parametrize("broker_id, route, data, words", [
    pytest.param("zerodha", "get_positions", {"day": []}, ("get_positions", "net"), id="kite-positions-without-net"),
    pytest.param("angelone", "get_orders", "SUCCESS", ("get_orders", "expected a list"), id="angel-orders-a-string"),
    pytest.param("zerodha", "get_trades", {"0": {}}, ("get_trades", "expected a list"), id="kite-trades-an-object"),
])
def test_a_list_reply_of_the_wrong_shape(broker_id: str, route: str, data: Any, words: Tuple[str, ...],
                                         tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, CASE[broker_id], tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, broker_id).on(route, body=ok_body(broker_id, data))
        expect(tt.BrokerError, lambda: CALLS[route](client), *words)


# -- the kill switches: one bad row never kills them, and no live order is silently left -------


def _book(broker: str, extra: Any) -> Any:
    body, rows = _rows(broker, "get_orders")
    rows.append(extra)
    return body


KILL_ORDERS = [
    # a live order whose side the library does not know: still cancelled
    pytest.param("zerodha", lambda: _first_row("zerodha", "get_orders", order_id="7000000000000000001",
                                               transaction_type="HOLD"), "7000000000000000001", id="kite-side-hold"),
    pytest.param("angelone", lambda: _first_row("angelone", "get_orders", orderid="270000000000001",
                                                transactiontype="HOLD"), "270000000000001", id="angel-side-hold"),
    # a live (OPEN) order whose filled quantity is unreadable: it is open all the same
    pytest.param("zerodha", lambda: _first_row("zerodha", "get_orders", order_id="7000000000000000002",
                                               filled_quantity="abc"), "7000000000000000002",
                 id="kite-open-order-filled-qty-unreadable"),
    pytest.param("angelone", lambda: _first_row("angelone", "get_orders", orderid="270000000000002",
                                                filledshares="abc"), "270000000000002",
                 id="angel-open-order-filled-qty-unreadable"),
    pytest.param("zerodha", lambda: ["not", "an", "order"], None, id="kite-row-a-list"),
    # a live order whose id is missing: it cannot be cancelled, and is reported (not passed over)
    pytest.param("zerodha", lambda: _first_row("zerodha", "get_orders", order_id=None), "NFO:NIFTY26NOV23500CE",
                 id="kite-open-order-id-null"),
    pytest.param("angelone", lambda: _first_row("angelone", "get_orders", orderid=""), "NFO:NIFTY24NOV2623500CE",
                 id="angel-open-order-id-empty"),
    pytest.param("upstox", lambda: _first_row("upstox", "get_orders", order_id=_DROP), "NFO:NIFTY26NOV23500CE",
                 id="upstox-open-order-id-missing"),
]


@pytest.mark.parametrize("broker_id, extra, extra_id", KILL_ORDERS)
def test_cancel_all_orders_survives_a_bad_row(broker_id: str, extra: Callable[[], Any], extra_id: Optional[str],
                                              tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, case)
        api.on("get_orders", body=_book(broker_id, extra()))
        api.on("cancel_order")
        cancelled, failed = no_raw(client.cancel_all_orders)
    live = [case.order_ids[0], case.order_ids[2], case.order_ids[4]]
    if extra_id is None:
        assert (cancelled, failed) == (live, [])
    else:
        assert cancelled[:3] == live
        assert extra_id in cancelled + failed, (
            f"live order {extra_id} was neither cancelled nor reported as failed: {cancelled}, {failed}")


KILL_POSITIONS = [
    pytest.param("zerodha", {"quantity": "abc"}, "NFO:NIFTY26NOV23500CE", id="kite-quantity-unreadable"),
    pytest.param("angelone", {"netqty": "NaN"}, "NFO:NIFTY24NOV2623500CE", id="angel-quantity-nan"),
    pytest.param("zerodha", {"exchange": ["NFO"]}, "NIFTY26NOV23500CE", id="kite-exchange-a-list"),
]


@pytest.mark.parametrize("broker_id, changes, label", KILL_POSITIONS)
def test_close_all_positions_survives_a_bad_row(broker_id: str, changes: Dict[str, Any], label: str, tmp_path: Path,
                                                day_clock: FakeClock, clients: list) -> None:
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    body, rows = _rows(broker_id, "get_positions")
    rows.append(dict(rows[0], **changes))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, case)
        api.on("get_positions", body=body)
        api.on("place_order")
        placed, failed = no_raw(client.close_all_positions)
    assert placed == [case.placed_id, case.placed_id]
    assert len(failed) == 1 and label in failed[0]


# -- a place reply without an order id is resolved by the tag look-up --------------------------

PLACED_WITHOUT_ID = [
    pytest.param("zerodha", {}, id="kite-data-empty"),
    pytest.param("zerodha", None, id="kite-data-null"),
    pytest.param("zerodha", {"order_id": ""}, id="kite-order-id-empty"),
    pytest.param("zerodha", {"order_id": {"id": "1993504512367362048"}}, id="kite-order-id-an-object"),
    pytest.param("zerodha", {"order_id": True}, id="kite-order-id-true"),
    pytest.param("angelone", {"script": "SBIN-EQ"}, id="angel-orderid-missing"),
    pytest.param("angelone", {"orderid": None, "uniqueorderid": "a7e0b2d9"}, id="angel-orderid-null"),
    pytest.param("angelone", {"orderid": ["261123000121877"]}, id="angel-orderid-a-list"),
]


@pytest.mark.parametrize("broker_id, data", PLACED_WITHOUT_ID)
def test_a_place_reply_without_an_id_is_resolved_by_tag(broker_id: str, data: Any, tmp_path: Path,
                                                        day_clock: FakeClock, clients: list) -> None:
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    tags: List[str] = []

    def place(request: Any) -> Any:
        tags.append(case.body(request)[case.tag_key])
        return 200, {}, json.dumps(ok_body(broker_id, data))

    def book(request: Any) -> Any:
        return 200, {}, _book_with(case, tags, dt.datetime.fromtimestamp(day_clock(), tt.IST))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, case)
        api.on("place_order", callback=place)
        api.on("get_orders", callback=book)
        order_id = no_raw(lambda: client.place_order(SBIN, 5, "SELL", "CNC", "MARKET"))
        assert order_id == case.order_ids[0], f"place_order returned {order_id!r} instead of looking the order up by tag"
        assert len(api.calls("place_order")) == 1 and len(api.calls("get_orders")) >= 1


# -- Retry-After: an order call never sleeps minutes ----------------------------------------------

@pytest.mark.parametrize("broker_id, route, status, body", [
    pytest.param("zerodha", "place_order", 429, fixture_text("zerodha", "error.network_exception.json"),
                 id="kite-place"),
    pytest.param("angelone", "place_order", 403, fixture_text("angelone", "error.rate_limit.txt"), id="angel-place"),
    pytest.param("zerodha", "cancel_order", 429, fixture_text("zerodha", "error.network_exception.json"),
                 id="kite-cancel"),
    pytest.param("zerodha", "get_orders", 429, "Too many requests", id="kite-order-book"),
])
def test_a_huge_retry_after_is_not_slept(broker_id: str, route: str, status: int, body: str, tmp_path: Path,
                                         day_clock: FakeClock, clients: list) -> None:
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, case)
        if route == "cancel_order":
            api.on("get_order_history")
        api.on(route, body=body, status=status, headers={"Retry-After": "99999"})
        call = {"place_order": lambda: client.place_order(SBIN, 5, "SELL", "CNC", "MARKET"),
                "cancel_order": lambda: client.cancel_order(case.placed_id),
                "get_orders": client.get_orders}[route]
        exc = expect(tt.RateLimitError, call, f"{broker_id} {route}")
        assert len(api.calls(route)) == 1
    assert exc.retry_after == 99999.0 and exc.retryable is True
    assert sum(day_clock.slept) <= 5.0, f"slept {day_clock.slept}"


# -- a server on 127.0.0.1 that answers slowly, stalls or cuts its reply ---------------------------


class SlowApi:
    """An HTTP/1.1 server on 127.0.0.1 whose replies misbehave on purpose, per request path:
    ``trickle`` sends the body one byte at a time, ``stall`` sends the headers and one byte,
    then nothing; ``cut`` promises more bytes than it sends and closes; ``ok`` answers normally.
    It records each request (method, path, body)."""

    def __init__(self, plan: Callable[[str, str, bytes], Tuple[str, bytes]]) -> None:
        self.plan = plan
        self.requests: "queue.Queue[Tuple[str, str, bytes]]" = queue.Queue()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self.stopped.is_set():
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, body = data.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                               if line.lower().startswith("content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                self.requests.put((method, path, body))
                mode, reply = self.plan(method, path, body)
                announced = len(reply) + (1000 if mode == "cut" else 0)
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {announced}\r\n\r\n"
                             .encode())
                if mode == "trickle":
                    for byte in reply:
                        if self.stopped.wait(0.02):  # the server's pace, not a test's sync
                            return
                        conn.sendall(bytes([byte]))
                elif mode == "stall":
                    conn.sendall(reply[:1])
                    self.stopped.wait(5)
                    return
                elif mode == "cut":
                    conn.sendall(reply[: len(reply) // 2])
                    return
                else:
                    conn.sendall(reply)
        except OSError:
            return
        finally:
            conn.close()


PROFILE_REPLY = fixture_text("zerodha", "get_profile.json").encode()


@pytest.mark.parametrize("mode", ["trickle", "stall", "cut"])
def test_a_slow_or_broken_reply_is_bounded_and_typed(mode: str, tmp_path: Path, day_clock: FakeClock,
                                                     clients: list) -> None:
    server = SlowApi(lambda method, path, body: (mode, PROFILE_REPLY))
    try:
        kite = rest_client(clients, "zerodha", tmp_path, day_clock, root_url=server.url, timeout=0.3, max_retries=1)
        started = time.monotonic()
        expect(tt.NetworkError, kite.get_profile, "GET /user/profile")
        elapsed = time.monotonic() - started
        assert elapsed < 1.2, f"two attempts of at most 0.3 s took {elapsed:.2f} s"
        assert server.requests.qsize() == 2  # retried once (a read is safe to repeat), then raised
        assert day_clock.slept == [0.5]
    finally:
        server.close()


def test_a_place_order_whose_reply_trickles_is_found_by_tag_not_resent(tmp_path: Path, day_clock: FakeClock,
                                                                     clients: list) -> None:
    tags: List[str] = []

    def plan(method: str, path: str, body: bytes) -> Tuple[str, bytes]:
        if method == "POST":
            from urllib.parse import parse_qs

            tags.append(parse_qs(body.decode())["tag"][0])
            return "trickle", fixture_text("zerodha", "place_order.json").encode()
        when = dt.datetime.fromtimestamp(day_clock(), tt.IST)
        return "ok", _book_with(ZERODHA, tags, when).encode()

    server = SlowApi(plan)
    try:
        kite = rest_client(clients, "zerodha", tmp_path, day_clock, root_url=server.url, timeout=0.2)
        started = time.monotonic()
        order_id = no_raw(lambda: kite.place_order(SBIN, 5, "SELL", "CNC", "MARKET"))
        assert time.monotonic() - started < 1.0
        assert order_id == ZERODHA.order_ids[0]
        sent = [server.requests.get_nowait() for _ in range(server.requests.qsize())]
        assert [m for m, _, _ in sent].count("POST") == 1
    finally:
        server.close()


def test_cancel_all_orders_over_a_stalling_connection_reports_every_failure(tmp_path: Path, day_clock: FakeClock,
                                                                          clients: list) -> None:
    """The kill switch on a bad line: each cancel's reply stalls after its headers."""
    book = fixture_text("zerodha", "get_orders.json").encode()
    server = SlowApi(lambda method, path, body: ("stall" if method == "DELETE" else "ok",
                                                 book if method == "GET" else b'{"status": "success", "data": {}}'))
    try:
        kite = rest_client(clients, "zerodha", tmp_path, day_clock, root_url=server.url, timeout=0.2, max_retries=0)
        started = time.monotonic()
        cancelled, failed = no_raw(kite.cancel_all_orders)
        assert time.monotonic() - started < 1.5
        assert (cancelled, failed) == ([], [ZERODHA.order_ids[0], ZERODHA.order_ids[2], ZERODHA.order_ids[4]])
    finally:
        server.close()


# 12.4a Hostile: REST transport, replies and sessions (adversarial pass, each case reproduced first)


def _placed_by_tag(case: Case, day_clock: FakeClock, reply: Any) -> Tuple[Any, Any, List[str]]:
    """(place_order's callback answering ``reply``, get_orders' callback listing the order then, the tags sent)."""
    tags: List[str] = []

    def place(request: Any) -> Any:
        tags.append(case.body(request)[case.tag_key])
        return reply

    def book(request: Any) -> Any:
        return 200, {}, _book_with(case, tags, dt.datetime.fromtimestamp(day_clock(), tt.IST))

    return place, book, tags


def test_a_redirected_place_order_is_not_followed_and_is_found_by_its_tag(broker: Case, tmp_path: Path,
                                                                        day_clock: FakeClock, clients: list) -> None:
    """A 302 on the POST used to be followed as a GET of the book: another order's id came back."""
    client = contract_client(clients, broker, tmp_path, day_clock)
    place, book, tags = _placed_by_tag(broker, day_clock, (302, {"Location": "/elsewhere"}, ""))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("place_order", callback=place)
        api.on("get_orders", callback=book)
        order_id = no_raw(lambda: client.place_order(SBIN, 5, "SELL", "CNC", "MARKET"))
        assert len(api.calls("place_order")) == 1 and all("/elsewhere" not in c.request.url for c in rs.calls)
    assert order_id == broker.order_ids[0] and len(tags) == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_broker_error_naming_the_route_and_nothing_follows_it(status: int, tmp_path: Path,
                                                                            day_clock: FakeClock,
                                                                            clients: list) -> None:
    """A redirected DELETE read as success; a 307 on AngelOne's login re-posted the password elsewhere."""
    kite = contract_client(clients, ZERODHA, tmp_path / "kite", day_clock)
    angel = contract_client(clients, ANGELONE, tmp_path / "angel", day_clock, warm=False)
    elsewhere = "http://collector.example.net/grab"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, ZERODHA).on("get_order_history")
        MockApi(rs, ZERODHA).on("cancel_order", status=status, headers={"Location": elsewhere})
        MockApi(rs, ANGELONE).on("login", status=status, headers={"Location": elsewhere})
        rs.add(responses.GET, elsewhere, body="{}")
        rs.add(responses.POST, elsewhere, body="{}")
        expect(tt.BrokerError, lambda: kite.cancel_order(ZERODHA.placed_id), "zerodha cancel_order", f"HTTP {status}",
               "redirect")
        expect(tt.BrokerError, angel.get_profile, "angelone login", f"HTTP {status}", "redirect")
        assert [c.request.url for c in rs.calls if c.request.url.startswith(elsewhere)] == []
    assert day_clock.slept == []  # a redirect is not retried


@pytest.mark.parametrize("cut", ["half", "empty", "json-null"])
def test_a_place_order_200_whose_body_cannot_be_read_is_found_by_its_tag(broker: Case, cut: str, tmp_path: Path,
                                                                       day_clock: FakeClock, clients: list) -> None:
    """A 200 cut short used to raise a final BrokerError with no look-up (a retry by hand doubles the order)."""
    client = contract_client(clients, broker, tmp_path, day_clock)
    full = broker.payload("place_order.json")
    body = {"half": full[: len(full) // 2], "empty": "", "json-null": "null"}[cut]
    place, book, tags = _placed_by_tag(broker, day_clock, (200, {}, body))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on("place_order", callback=place)
        api.on("get_orders", callback=book)
        order_id = no_raw(lambda: client.place_order(SBIN, 5, "SELL", "CNC", "MARKET"))
        assert len(api.calls("place_order")) == 1 and len(api.calls("get_orders")) == 1
    assert order_id == broker.order_ids[0] and len(tags) == 1


class GzipApi:
    """An HTTP server on 127.0.0.1 answering each path with its body gzipped (Content-Encoding:
    gzip, as a compressing proxy sends it); ``responses`` cannot stand in: it decodes by itself."""

    def __init__(self, bodies: Mapping[str, bytes]) -> None:
        zipped = {path: gzip.compress(body) for path, body in bodies.items()}

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = zipped[self.path.split("?")[0]]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_gzip_reply_is_decoded_and_a_gzip_bomb_stays_bounded(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                              monkeypatch: Any) -> None:
    """requests asks for gzip; the reply used to be read undecoded (a non-JSON body, an accepted order unread)."""
    monkeypatch.setattr(tt._Transport, "_MAX_REPLY", 1 << 20, raising=False)
    server = GzipApi({"/user/profile": ZERODHA.payload("get_profile.json").encode(),
                      "/orders/regular": ZERODHA.payload("place_order.json").encode(),
                      "/user/margins": b" " * (8 << 20)})  # 8 KiB on the wire, 8 MiB decoded
    try:
        kite = contract_client(clients, ZERODHA, tmp_path, day_clock, root_url=server.url, max_retries=0)
        assert no_raw(kite.get_profile).user_id == "AB1234"
        assert no_raw(lambda: kite.place_order(**ORDER_1)) == ZERODHA.placed_id
        expect(tt.BrokerError, kite.get_funds, "GET /user/margins", "over 1 MiB")
    finally:
        server.close()


@pytest.mark.parametrize("status, cls", [(502, tt.BrokerError), (429, tt.RateLimitError)])
def test_an_echoed_token_is_scrubbed_before_the_body_is_shortened(status: int, cls: type, tmp_path: Path,
                                                                  day_clock: FakeClock, clients: list) -> None:
    """Cut to 120 (80) characters first, a token straddling the cut leaked all but its tail."""
    token = "Xk39fLq02ZpW7mNvB4tR8sYc1uHe6dJa"  # Kite-like: 32 characters
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock, access_token=token, max_retries=0)
    for pad in range(0, 140, 7):  # the token across every cut point
        page = f"<h1>{status}</h1>" + "." * pad + f" upstream: Authorization: token kitekey01:{token}</p>"
        with responses.RequestsMock() as rs:
            MockApi(rs, ZERODHA).on("get_profile", body=page, status=status)
            message = str(expect(cls, kite.get_profile, "zerodha get_profile", f"HTTP {status}"))
        assert not [token[i:i + 6] for i in range(len(token) - 5) if token[i:i + 6] in message], (pad, message)


LEAK = "eyJhbGciOi.LEAK-SECRET-JWT.sig"
# (broker, route, the "success" reply, what the BrokerError names): a login reply without a usable token
BAD_SESSION_REPLIES = [
    pytest.param("zerodha", "login", ok_body("zerodha", {"user_id": "AB1234"}), "'access_token' is missing",
                 id="kite-exchange-no-access-token"),
    pytest.param("zerodha", "login", ok_body("zerodha", {"access_token": [LEAK]}), "'access_token' is of type list",
                 id="kite-exchange-token-a-list"),
    pytest.param("upstox", "login", {"access_token": {"value": LEAK}, "user_id": "5UX9KQ"}, "'access_token' is of type dict",
                 id="upstox-exchange-token-an-object"),
    pytest.param("angelone", "login", ok_body("angelone", None), "payload is NoneType", id="angel-login-data-null"),
    pytest.param("angelone", "login", ok_body("angelone", {"jwtToken": [LEAK], "refreshToken": "r", "feedToken": "f"}),
                 "'jwtToken' is of type list", id="angel-login-jwt-a-list"),
]  # a renewal's: test_angel_garbled_renewal_falls_back_to_a_full_login


@pytest.mark.parametrize("broker_id, route, reply, words", BAD_SESSION_REPLIES)
def test_a_login_reply_without_a_usable_token_is_a_broker_error_that_quotes_no_token(
        broker_id: str, route: str, reply: Any, words: str, tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    """The login hooks read outside _parse: the private _Malformed escaped, quoting an odd token's value."""
    case = CASE[broker_id]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        rs.get(URLS[broker_id], body=case.master)
        api = MockApi(rs, case)
        api.on(route, body=json.dumps(reply))
        if broker_id != "angelone":  # a single-use code, exchanged at init
            call: Callable[[], Any] = lambda: kept(clients, broker_id, {"cache_dir": str(tmp_path), **case.login_creds},
                                                   clock=day_clock, sleep=day_clock.sleep)
        else:
            angel = contract_client(clients, case, tmp_path, day_clock, warm=route == "renew_token")
            api.on("get_profile", fixture="error.AG8001.json")  # the JWT expired: renewed with the refresh token
            call = angel.get_profile
        exc = expect(tt.BrokerError, call, f"{broker_id} {route}: malformed reply", words)
    assert "LEAK-SECRET" not in str(exc) and "LEAK-SECRET" not in repr(exc.args)


def _sliced_book(case: Case, tag: str, quantities: Tuple[int, ...], when: dt.datetime) -> str:
    """The scenario's book whose first rows are the slices the broker made of order (1) (BUY NIFTY CE LIMIT)."""
    payload = json.loads(case.payload("get_orders.json"))
    rows = at(payload, case.book_rows)
    first = rows[0]
    for i, qty in enumerate(quantities):
        rows[i] = {**first, case.id_field: rows[i][case.id_field], case.tag_field: tag, "quantity": qty,
                   "pending_quantity": qty, **case.placed_fields(when)}
    return json.dumps(payload)


@pytest.mark.parametrize("listed", [(1755, 1755, 390), (1755, 1755)], ids=["every-slice", "two-of-three"])
def test_a_natively_sliced_order_whose_reply_is_lost_is_found_slice_by_slice(
        listed: Tuple[int, ...], tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    """The look-up returned the first slice alone: 1755 of 3900 units reported, 2145 live and unreported.
    (Upstox: its master gives the freeze limit, 1800, so one order of 3900 goes with "slice": true and
    comes back as slices of whole lots of 65 within it.)"""
    case = UPSTOX
    client = contract_client(clients, case, tmp_path, day_clock)
    assert client._instruments.freeze_qty(NIFTY_CE) == 1800
    tags: List[str] = []

    def book(request: Any) -> Any:
        return 200, {}, _sliced_book(case, tags[0], listed, dt.datetime.fromtimestamp(day_clock(), tt.IST))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = _api_losing_places(rs, case, tags)
        api.on("get_orders", callback=book)
        place = lambda: client.place_order(NIFTY_CE, 3900, "BUY", "NRML", "LIMIT", price=120.5, slice=True)
        if len(listed) == 3:
            assert no_raw(place) == list(case.order_ids[:3])
            assert len(api.calls("get_orders")) == 1
        else:
            exc = expect(tt.OrderError, place, "3510 units, not 3900", f"{case.order_ids[0]} (1755)",
                         f"{case.order_ids[1]} (1755)")
            assert exc.placed_ids == list(case.order_ids[:2]) and len(api.calls("get_orders")) == 4
        assert len(api.calls("place_order")) == 1


@pytest.mark.parametrize("action", ["cancel", "modify"])
def test_cancel_and_modify_refuse_a_reply_about_another_order(broker: Case, action: str, tmp_path: Path,
                                                              day_clock: FakeClock, clients: list) -> None:
    """The one-order reply named order B for order A: B was cancelled (or changed), and its id returned."""
    client = contract_client(clients, broker, tmp_path, day_clock)
    knows_order(client, broker, f"{broker.current_route}.json", broker.placed_id)
    other = broker.placed_id[:-4] + "9999"
    reply = broker.payload(f"{broker.current_route}.json").replace(broker.placed_id, other)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        api.on(broker.current_route, body=reply)
        api.on("cancel_order")
        api.on("modify_order")
        call = (lambda: client.cancel_order(broker.placed_id)) if action == "cancel" else \
            (lambda: client.modify_order(broker.placed_id, qty=130))
        expect(tt.BrokerError, call, f"asked for order {broker.placed_id}", f"answered with order {other}",
               {"cancel": "nothing was cancelled", "modify": "nothing was modified"}[action])
        assert api.calls("cancel_order") == [] and api.calls("modify_order") == []


def _odd_sums(broker: str, funds: Dict[str, Any], trades: Dict[str, Any]) -> None:
    """Funds of 1234.55 available + 100.10 used, and a fill of 7 at 1234.35, in the broker's fields."""
    row = trades["data"][0]
    if broker == "angelone":
        funds["data"].update(net="1234.55", utiliseddebits="100.1")
        row.update(fillsize="7", fillprice="1234.35")
        row.pop("tradevalue", None)  # not given: computed
    elif broker == "zerodha":
        equity = funds["data"]["equity"]
        equity.update(net=1234.55, utilised={**equity["utilised"], "debits": 100.1})
        row.update(quantity=7, average_price=1234.35)
    else:
        funds["data"]["equity"].update(available_margin=1234.55, used_margin=100.1)
        row.update(quantity=7, average_price=1234.35)


@pytest.mark.parametrize("broker_id", ["zerodha", "angelone", "upstox"])
def test_sums_computed_from_broker_figures_are_whole_paise(broker_id: str, tmp_path: Path, day_clock: FakeClock,
                                                           clients: list) -> None:
    """Fund.total and Trade.trade_value were 1334.6499999999999 and 8640.449999999999 on Kite and
    AngelOne (int(x * 100) a paisa short), 1334.65 and 8640.45 on Upstox for the same figures."""
    case = CASE[broker_id]
    client = contract_client(clients, case, tmp_path, day_clock)
    funds, trades = json.loads(case.payload("get_funds.json")), json.loads(case.payload("get_trades.json"))
    _odd_sums(broker_id, funds, trades)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, case)
        api.on("get_funds", body=funds)
        api.on("get_trades", body=trades)
        assert client.get_funds().total == 1334.65
        assert client.get_trades()[0].trade_value == 8640.45


def test_get_order_and_its_history_refuse_a_reply_about_another_order(broker: Case, tmp_path: Path,
                                                                      day_clock: FakeClock, clients: list) -> None:
    """The one-order reply (or history) named order B for order A: B's state came back as A's."""
    client = contract_client(clients, broker, tmp_path, day_clock)
    knows_order(client, broker, f"{broker.current_route}.json", broker.placed_id)
    other = broker.placed_id[:-4] + "9999"
    routes = {broker.current_route} | ({"get_order_history"} if broker.spec["has"]["order_history"] else set())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, broker)
        for route in routes:
            api.on(route, body=broker.payload(f"{route}.json").replace(broker.placed_id, other))
        expect(tt.BrokerError, lambda: client.get_order(broker.placed_id), f"asked for order {broker.placed_id}",
               f"answered with order {other}")
        if broker.spec["has"]["order_history"]:
            expect(tt.BrokerError, lambda: client.get_order_history(broker.placed_id),
                   f"asked for the history of order {broker.placed_id}", f"states of order {other}")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        MockApi(rs, broker).on(broker.current_route)
        assert client.get_order(broker.placed_id).id == broker.placed_id  # its own reply still reads


@pytest.mark.parametrize("now", ["CANCELLED", "COMPLETE"])
def test_a_cancel_resent_after_a_timeout_and_refused_reads_what_the_order_is(now: str, tmp_path: Path,
                                                                             day_clock: FakeClock,
                                                                             clients: list) -> None:
    """The first cancel timed out after the broker had cancelled the order; the re-sent one was
    refused ("cannot be cancelled"), and cancel_order reported a failure for a cancelled order.
    It now reads the order: cancelled is success; filled meanwhile is the broker's refusal."""
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock, max_retries=1)
    history = json.loads(fixture_text("zerodha", "get_order_history.json"))
    after = json.loads(json.dumps(history))
    after["data"].append({**after["data"][-1], "status": now})
    order_id = history["data"][-1]["order_id"]
    replies = iter([(200, {}, json.dumps(history)), (200, {}, json.dumps(after))])
    cancels = iter(["timeout", "refused"])

    def cancel(request: Any) -> Any:
        if next(cancels) == "timeout":
            raise requests.exceptions.ReadTimeout("read timed out")
        return 400, {}, fixture_text("zerodha", "cancel_order.order_exception.json")

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        api = MockApi(rs, ZERODHA)
        api.on("get_order_history", callback=lambda request: next(replies))
        api.on("cancel_order", callback=cancel)
        if now == "CANCELLED":
            assert no_raw(lambda: kite.cancel_order(order_id)) == order_id
        else:
            expect(tt.OrderError, lambda: kite.cancel_order(order_id), "cannot be cancelled")
        assert len(api.calls("cancel_order")) == 2 and len(api.calls("get_order_history")) == 2


@pytest.mark.parametrize("header", ["\u00b2", "\u0662", "1\u00bd", "Wed, 21 Oct 2026 07:28:00 GMT", "soon"])
def test_an_unreadable_retry_after_is_treated_as_absent(header: str, tmp_path: Path, day_clock: FakeClock,
                                                        clients: list) -> None:
    """'Retry-After: \u00b2' (latin-1 0xB2 passes str.isdigit) raised a raw ValueError from float()."""
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock, max_retries=1)
    with responses.RequestsMock() as rs:
        api = MockApi(rs, ZERODHA)
        for _ in range(2):
            api.on("get_profile", fixture="error.network_exception.json", status=429, headers={"Retry-After": header})
        exc = expect(tt.RateLimitError, kite.get_profile, "zerodha get_profile", "HTTP 429")
    assert exc.retry_after is None and day_clock.slept == [0.5]  # the usual backoff, not the header's


HUGE_ORDERS = [
    pytest.param(dict(qty=10 ** 5000), "qty is beyond any order", id="qty-5000-digits"),
    pytest.param(dict(qty=-10 ** 5000), "qty must be a positive whole number", id="qty-minus-5000-digits"),
    pytest.param(dict(qty=65 * 10 ** 20), "qty is beyond any order (over 1,000,000,000,000,000 units)", id="qty-6.5e21"),
    pytest.param(dict(price=10 ** 5000), "price is beyond any listed price", id="price-5000-digits"),
    pytest.param(dict(price=-10 ** 5000), "price is beyond any listed price", id="price-minus-5000-digits"),
    pytest.param(dict(order_type="SL", trigger_price=10 ** 5000), "trigger_price is beyond any listed price",
                 id="trigger-5000-digits"),
]


@pytest.mark.parametrize("changes, words", HUGE_ORDERS)
def test_an_absurd_qty_or_price_is_refused_before_anything_is_sent(changes: Dict[str, Any], words: str, tmp_path: Path,
                                                                   day_clock: FakeClock, clients: list) -> None:
    """10**5000 raised str()'s raw ValueError (4300 digits); 10**30 units went to the broker as is."""
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock)
    order = {**LIMIT_BUY, **changes}
    with no_request():
        expect(tt.InvalidOrderError, lambda: kite.place_order(**order), words)
        expect(tt.InvalidOrderError, lambda: kite.calculate_margin([order]), words)


@pytest.mark.parametrize("value", ["false", "no", "0", 0, 1, None])
def test_cache_session_must_be_a_bool(value: Any, tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    """Read by truthiness, cache_session="false" (an .ini's, an env var's) wrote the token to disk."""
    config = {"cache_dir": str(tmp_path), **CREDS["zerodha"], "cache_session": value}
    with no_request():
        expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", config, clock=day_clock),
               f"config 'cache_session' must be True or False, got {value!r}")
    assert not (tmp_path / "zerodha_session.json").exists()


@pytest.fixture
def french_months(monkeypatch: Any) -> None:
    """strptime's month names as under LC_TIME=fr_FR (its %b reads them from calendar.month_abbr,
    which follows the locale); the box may have no French locale installed to switch to."""
    import _strptime
    import calendar

    monkeypatch.setattr(calendar, "month_abbr",
                        ["", "janv.", "févr.", "mars", "avr.", "mai", "juin", "juil.", "août", "sept.", "oct.", "nov.", "déc."])
    monkeypatch.setattr(_strptime, "_TimeRE_cache", _strptime.TimeRE())
    monkeypatch.setattr(_strptime, "_regex_cache", {})
    with pytest.raises(ValueError):
        dt.datetime.strptime("23-Nov-2026", "%d-%b-%Y")


def test_month_names_are_read_without_the_locale(french_months: None, tmp_path: Path, day_clock: FakeClock,
                                                  clients: list) -> None:
    """AngelOne's "23-Nov-2026 09:20:05" (and Upstox's documented trade time) parsed with %b: under a
    French or German LC_TIME every placed_at and updated_at became None."""
    angel = contract_client(clients, ANGELONE, tmp_path / "angel", day_clock)
    upstox = contract_client(clients, UPSTOX, tmp_path / "upstox", day_clock)
    trades = payload("upstox", "get_trades")
    trades["data"][0]["exchange_timestamp"] = "23-Nov-2026 09:25:10"  # the docs' example's spelling
    with responses.RequestsMock() as rs:
        MockApi(rs, ANGELONE).on("get_orders")
        MockApi(rs, UPSTOX).on("get_trades", body=trades)
        orders = angel.get_orders()
        fills = upstox.get_trades()
    assert [o.placed_at for o in orders[:2]] == [ist(2026, 11, 23, 9, 20, 5), ist(2026, 11, 23, 9, 25, 10)]
    assert all(o.updated_at is not None for o in orders)
    assert fills[0].timestamp == ist(2026, 11, 23, 9, 25, 10)


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "text/html; charset=ISO-8859-1"])
def test_a_reply_is_read_as_utf8_json_with_or_without_a_bom(content_type: str, tmp_path: Path, day_clock: FakeClock,
                                                            clients: list) -> None:
    """A BOM made the reply "non-JSON" (an accepted order reported failed); text/plain read UTF-8 as latin-1."""
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock)
    profile = payload("zerodha", "get_profile")
    profile["data"]["user_name"] = "Sūrya Nārāyaṇ"
    with responses.RequestsMock() as rs:
        api = MockApi(rs, ZERODHA)
        api.on("get_profile", body=json.dumps(profile, ensure_ascii=False).encode(), content_type=content_type)
        api.on("place_order", body=b"\xef\xbb\xbf" + ZERODHA.payload("place_order.json").encode(),
               content_type=content_type)
        assert no_raw(kite.get_profile).name == "Sūrya Nārāyaṇ"
        assert no_raw(lambda: kite.place_order(**ORDER_1)) == ZERODHA.placed_id


def test_a_profile_lists_exchanges_and_products_in_enum_order_once(tmp_path: Path, day_clock: FakeClock,
                                                                    clients: list) -> None:
    """MAPPING.md: declaration order, de-duplicated, so one account's Profile compares equal across
    brokers; they came out in each payload's order, and Kite's repeated entries twice."""
    profiles = []
    for case in (ZERODHA, ANGELONE, UPSTOX):
        client = contract_client(clients, case, tmp_path / case.broker, day_clock)
        body = payload(case.broker, "get_profile")
        if case is ZERODHA:
            body["data"]["exchanges"] += ["NSE"]
            body["data"]["products"] += ["CNC"]
        with responses.RequestsMock() as rs:
            MockApi(rs, case).on("get_profile", body=body)
            profiles.append(client.get_profile())
    E, P = tt.Exchange, tt.ProductType
    for profile in profiles:
        assert profile.exchanges == (E.NSE, E.BSE, E.NFO, E.BFO, E.CDS, E.MCX), profile.broker
        assert profile.products == (P.CNC, P.MIS, P.NRML), profile.broker


# ============================================================================
# 12.5 Hostile: User input
# ============================================================================

LIMIT_BUY = dict(instrument=NIFTY_CE, qty=65, side="BUY", product="NRML", order_type="LIMIT", price=120.5)

BAD_ORDERS = [
    pytest.param(dict(price=1e308), "beyond any listed price", id="price-1e308"),
    pytest.param(dict(price=Decimal("1E+400")), "beyond any listed price", id="price-decimal-1e400"),
    pytest.param(dict(price="nan"), "price", id="price-nan-text"),
    pytest.param(dict(price=Decimal("sNaN")), "price", id="price-signalling-nan"),
    pytest.param(dict(price="-0"), "must be positive", id="price-minus-zero"),
    pytest.param(dict(price=0.0499999), "use 0.05", id="price-just-under-one-tick"),
    pytest.param(dict(price=b"120.5"), "must be a number", id="price-bytes"),
    pytest.param(dict(qty=True), "positive whole number", id="qty-bool"),
    pytest.param(dict(qty="65"), "positive whole number", id="qty-text"),
    pytest.param(dict(qty=65.0), "positive whole number", id="qty-float"),
    pytest.param(dict(qty=10 ** 30), "qty is beyond any order", id="qty-huge"),
    pytest.param(dict(tag="नमन1"), "tag must be", id="tag-devanagari-letters"),
    pytest.param(dict(tag="ＡＢＣ１"), "tag must be", id="tag-fullwidth-letters"),
    pytest.param(dict(tag="a\nb"), "tag must be", id="tag-with-a-newline"),
    pytest.param(dict(tag="my tag"), "tag must be", id="tag-with-a-space"),
    pytest.param(dict(tag="x" * 16), "tag must be 1-15", id="tag-too-long"),
    pytest.param(dict(instrument="NFO:NIFTY 2026-11-24 23500 CE"), "instrument must be", id="instrument-a-string"),
]


@pytest.mark.parametrize("change, words", BAD_ORDERS)
def test_bad_order_input_is_refused_before_sending(change: Dict[str, Any], words: str, tmp_path: Path,
                                                   day_clock: FakeClock, clients: list) -> None:
    client = contract_client(clients, ZERODHA, tmp_path, day_clock)
    with no_request():
        expect(tt.InvalidOrderError, lambda: client.place_order(**{**LIMIT_BUY, **change}), words)


def test_a_huge_quantity_stops_at_the_freeze_limit(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = contract_client(clients, ANGELONE, tmp_path, day_clock)
    with no_request():
        expect(tt.InvalidOrderError, lambda: angel.place_order(**{**LIMIT_BUY, "qty": 65 * 10 ** 10}), "freeze limit of 1800")
        expect(tt.InvalidOrderError, lambda: angel.place_order(**{**LIMIT_BUY, "qty": 65 * 10 ** 10}, slice=True),
               "at most 100")


@pytest.mark.parametrize("call, order_id", [
    pytest.param("get_order", "..", id="get-dot-dot"),
    pytest.param("cancel_order", ".", id="cancel-dot"),
    pytest.param("get_order", "../../user/margins", id="get-traversal"),
    pytest.param("cancel_order", "1993504512367362048/../1", id="cancel-with-slashes"),
])
def test_order_ids_cannot_leave_their_path(call: str, order_id: str, tmp_path: Path, day_clock: FakeClock,
                                           clients: list) -> None:
    """An order id is one path segment: '/', '.' and '..' must not move the request elsewhere."""
    from urllib.parse import unquote, urlsplit

    kite = contract_client(clients, ZERODHA, tmp_path, day_clock)
    seen: List[str] = []

    def anything(request: Any) -> Any:
        """The order's history (under the id the path names), or the cancel's success."""
        seen.append(request.url)
        named = unquote(urlsplit(request.url).path.rsplit("/", 1)[1])
        if request.method == "DELETE":
            return 200, {}, json.dumps(ok_body("zerodha", {"order_id": named}))
        return 200, {}, json.dumps(ok_body("zerodha", _kite_history(order_id=named)))

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        rs.add_callback(responses.GET, re.compile(r"https://api\.kite\.trade/.*"), callback=anything)
        rs.add_callback(responses.DELETE, re.compile(r"https://api\.kite\.trade/.*"), callback=anything)
        try:
            getattr(kite, call)(order_id)
        except tt.InvalidOrderError:
            seen.append("refused")  # the id refused before sending: as good
        except tt.TTConnectError as exc:
            seen.append(f"error: {exc}")
    assert seen and "refused" not in seen[1:], seen
    if seen == ["refused"]:
        return
    for url in [u for u in seen if u.startswith("https://")]:
        path = urlsplit(url).path
        assert path.startswith("/orders/"), f"{order_id!r} sent the request to {path!r}"
        assert unquote(path.rsplit("/", 1)[1]) == order_id, f"{order_id!r} became the path {path!r}"


WRONG_INSTRUMENTS = [
    pytest.param(lambda c: c.resolve("NSE:SBIN"), id="resolve-a-string"),
    pytest.param(lambda c: c.resolve(None), id="resolve-none"),
    pytest.param(lambda c: c.lot_size("SBIN"), id="lot-size-a-string"),
    pytest.param(lambda c: c.tick_size({"exchange": "NSE", "symbol": "SBIN"}), id="tick-size-a-dict"),
    pytest.param(lambda c: c.subscribe(None, on_tick=print), id="subscribe-none"),
    pytest.param(lambda c: c.subscribe("SBIN", on_tick=print), id="subscribe-a-string"),
]


@pytest.mark.parametrize("call", WRONG_INSTRUMENTS)
def test_an_instrument_of_the_wrong_type(call: Callable[[tt.TTConnect], Any], tmp_path: Path, day_clock: FakeClock,
                                         clients: list) -> None:
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock, ws_url="ws://127.0.0.1:9/")
    with no_request():
        expect(tt.InvalidInstrumentError, lambda: call(kite), "Equity")
    assert _feed_threads(kite) == []  # nothing was started for it


class _Datetime64:
    """What numpy.datetime64 is to ttconnect (numpy is not a test dependency): neither a str nor a date,
    though it prints like one."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


BAD_SHAPES = [
    pytest.param(lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-02-30"), "not a valid date",
                 id="expiry-february-30"),
    pytest.param(lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry=20261124), "expiry must be",
                 id="expiry-an-int"),
    pytest.param(lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry=_Datetime64("2026-11-24")),
                 "expiry must be", id="expiry-numpy-datetime64"),
    pytest.param(lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike="abc", option_type="CE"),
                 "not a number", id="strike-abc"),
    pytest.param(lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=-5, option_type="CE"),
                 "positive", id="strike-negative"),
    pytest.param(lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=float("inf"),
                                   option_type="CE"), "positive", id="strike-inf"),
    pytest.param(lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike="1e400",
                                   option_type="CE"), "positive", id="strike-1e400-text"),
    pytest.param(lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=True, option_type="CE"),
                 "strike must be a number", id="strike-bool"),
    pytest.param(lambda: tt.Equity(exchange=None, symbol="SBIN"), "exchange None is not valid", id="exchange-none"),
]


@pytest.mark.parametrize("build, words", BAD_SHAPES)
def test_a_malformed_instrument_fails_at_construction(build: Callable[[], Any], words: str) -> None:
    expect(tt.InvalidInstrumentError, build, words)


def test_an_exchange_with_a_trailing_space(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    try:
        sbin = tt.Equity(exchange="nse ", symbol="SBIN")
    except tt.InvalidInstrumentError as exc:
        assert "exchange 'nse ' is not valid" in str(exc) and "NSE" in str(exc)
    else:
        assert sbin == SBIN and kite.resolve(sbin) == "779521"


class _Timestamp(dt.datetime):
    """What pandas.Timestamp is to ttconnect: a datetime subclass."""


@pytest.mark.parametrize("expiry", [
    pytest.param(dt.datetime(2026, 11, 24, 15, 30, tzinfo=tt.IST), id="aware-ist-datetime"),
    pytest.param(dt.datetime(2026, 11, 23, 20, 0, tzinfo=dt.timezone.utc), id="utc-datetime-already-the-24th-in-ist"),
    pytest.param(_Timestamp(2026, 11, 24), id="pandas-like-timestamp"),
])
def test_datetime_expiries_are_accepted(expiry: Any, tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    fut = no_raw(lambda: tt.Future(exchange="NFO", symbol="NIFTY", expiry=expiry))
    assert fut == tt.Future(exchange="NFO", symbol="NIFTY", expiry="2026-11-24")
    assert kite.resolve(fut) == "13355010"
    opt = no_raw(lambda: tt.Option(exchange="NFO", symbol="NIFTY", expiry=expiry, strike="2.35e4", option_type="ce"))
    assert kite.resolve(opt) == "13364994"  # strike '2.35e4' is 23500


@pytest.mark.parametrize("call, words", [
    pytest.param(lambda c: c.search("SB", limit=0), "limit must be", id="limit-0"),
    pytest.param(lambda c: c.search("SB", limit=-1), "limit must be", id="limit-negative"),
    pytest.param(lambda c: c.search("SB", limit="5"), "limit must be", id="limit-text"),
    pytest.param(lambda c: c.search(None), "symbol must be", id="prefix-none"),
    pytest.param(lambda c: c.option_chain("NIFTY", "2026-02-30"), "not a valid date", id="chain-impossible-date"),
])
def test_bad_discovery_arguments(call: Callable[[tt.TTConnect], Any], words: str, tmp_path: Path, clock: FakeClock,
                                 clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    expect(tt.InvalidInstrumentError, lambda: call(kite), words)


def test_a_search_limit_beyond_sqlite_integers(tmp_path: Path, clock: FakeClock, clients: list) -> None:
    kite = open_client(clients, "zerodha", tmp_path, clock, KITE_CSV)
    try:
        found = kite.search("SB", limit=10 ** 20)
    except tt.InvalidInstrumentError as exc:
        assert "limit" in str(exc)
    except BaseException as exc:  # noqa: BLE001
        problem = _raw(exc, " (expected every match, or InvalidInstrumentError naming limit)")
        del exc
        _fail_clean(problem)
    else:
        assert [str(i) for i in found] == ["BSE:SBIN", "NSE:SBIN"]


# 12.5a Hostile: deadlines, sandbox and closing (adversarial pass, each case reproduced first)


def _head_trickler(reply: bytes, stopped: threading.Event) -> str:
    """A server on 127.0.0.1 that sends each reply's status line and headers a byte every 0.05 s
    (each byte well inside any socket timeout), then the body; its URL."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.1)
    head, body = reply.split(b"\r\n\r\n", 1)

    def serve() -> None:
        with srv:
            while not stopped.is_set():
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                with conn:
                    try:
                        conn.recv(65536)
                        for i in range(len(head) + 4):
                            if stopped.wait(0.05):  # the server's pace, not a test's sync
                                return
                            conn.sendall((head + b"\r\n\r\n")[i:i + 1])
                        conn.sendall(body)
                    except OSError:
                        continue

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}"


def test_a_reply_whose_headers_trickle_is_bounded_by_the_timeout(tmp_path: Path, day_clock: FakeClock,
                                                                 clients: list) -> None:
    """The per-call deadline covered only the body: headers sent a byte at a time held a
    timeout=0.5 call for 28 s."""
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 60
             + b"\r\nContent-Length: %d\r\n\r\n" % len(PROFILE_REPLY) + PROFILE_REPLY)
    stopped = threading.Event()
    try:
        kite = rest_client(clients, "zerodha", tmp_path, day_clock, root_url=_head_trickler(reply, stopped),
                           timeout=0.5, max_retries=0)
        started = time.monotonic()
        err = expect(tt.NetworkError, kite.get_profile, "GET /user/profile: no complete reply within 0.5 s",
                     "may have reached the broker")
        elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 1.5, f"a 0.5 s deadline took {elapsed:.2f} s"
        assert getattr(err, "maybe_sent") is True
    finally:
        stopped.set()


def test_the_deadline_watch_ends_with_the_call_and_its_thread_with_the_client(tmp_path: Path, day_clock: FakeClock,
                                                                              clients: list) -> None:
    """A call that finishes in time is never cut afterwards (its connection goes back to the pool
    unharmed), and close() leaves no deadline thread behind."""
    server = SlowApi(lambda method, path, body: ("ok", PROFILE_REPLY))
    try:
        kite = rest_client(clients, "zerodha", tmp_path, day_clock, root_url=server.url, timeout=0.3, max_retries=0)
        first = kite.get_profile()
        time.sleep(0.4)  # past the first call's deadline: nothing may fire on its pooled connection
        assert kite.get_profile() == first
        assert server.requests.qsize() == 2
        kite.close()
        assert not [t.name for t in threading.enumerate() if t.name == "ttconnect-deadline"]
    finally:
        server.close()


def test_a_client_dropped_without_close_leaves_no_deadline_thread(tmp_path: Path, day_clock: FakeClock) -> None:
    """The deadline thread kept its watchdog (and itself) alive forever: a dashboard or notebook
    that dropped clients without close() gained one idle thread per client."""
    def dropped_client(n: int) -> threading.Thread:
        opened: list = []
        kite = open_client(opened, "zerodha", tmp_path, day_clock, None if n else KITE_CSV, **CREDS["zerodha"])
        with responses.RequestsMock() as rs:
            MockApi(rs, ZERODHA).on("get_funds")
            kite.get_funds()
        thread = kite._transport._watchdog._thread
        assert thread is not None and thread.is_alive()
        return thread

    threads = [dropped_client(n) for n in range(3)]
    gc.collect()
    for thread in threads:
        thread.join(2.0)
    assert [t.is_alive() for t in threads] == [False, False, False]
    assert tt._validation_store() is None


def test_an_upstox_feed_error_frame_is_scrubbed_before_it_is_shortened(tmp_path: Path, day_clock: FakeClock,
                                                                         clients: list) -> None:
    """The error text was cut to 200 characters and kept whole otherwise: an access token or the
    single-use URL's code echoed in it reached stream_stats() and the log."""
    server = WsServer(heartbeat=None)
    try:
        client = upstox_feed(clients, tmp_path, day_clock)
        hits: List[str] = []
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            MockApi(rs, UPSTOX).on("feed_authorize", callback=authorize_to(server, "feeds", hits))
            client.subscribe(SBIN, on_tick=lambda t: None, mode="ltp")
            assert stream_event(client, lambda s: s["connected"])
            token = "upstox-access-SECRET-1"
            text = ("x" * 100 + f" bad token {token} for code single-use-1 " + "y" * 300)
            server.send(json.dumps({"status": "failed", "message": text}).encode(), opcode=1)
            assert stream_event(client, lambda s: s["last_error"] is not None)
            last = client.stream_stats()["last_error"]
            assert "SECRET" not in last and "single-use-1" not in last and "upstox-access" not in last
            assert last.startswith('broker: {"status": "failed"') and last.endswith("...")
            assert len(last) <= len("broker: ") + 203
    finally:
        for c in clients:
            c.close()
        server.close()


def test_upstox_sandbox_cancels_without_reading_the_live_host_and_says_what_it_cannot_do(
        tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    """The sandbox serves single place/modify/cancel only: cancel and modify read the order from
    the live host first and the lost-reply look-up read the live book, each refused the sandbox
    token (cancel: AuthenticationError; the look-up failed four times)."""
    client = contract_client(clients, UPSTOX, tmp_path, day_clock, sandbox=True, access_token="sandbox-token-SECRET-1")
    sandbox = "https://api-sandbox.upstox.com"
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rs:
        rs.add("DELETE", f"{sandbox}/v3/order/cancel", body=UPSTOX.payload("cancel_order.json"),
               match=[responses.matchers.query_param_matcher({"order_id": UPSTOX.placed_id})])
        assert client.cancel_order(UPSTOX.placed_id) == UPSTOX.placed_id
        expect(tt.UnsupportedFeatureError, lambda: client.modify_order(UPSTOX.placed_id, price=121.0),
               "modify_order in the upstox sandbox", "does not serve", "cancel the order and place")
        rs.add("POST", f"{sandbox}/v3/order/place", body=requests.exceptions.ReadTimeout("timed out"))
        err = expect(tt.OrderError, lambda: client.place_order(**ORDER_1), "failed ambiguously",
                     "sandbox serves no order book", "could not be checked", "Do NOT place it again")
        assert err.retryable is False
        assert [(c.request.method, c.request.url.split("?")[0]) for c in rs.calls] == [
            ("DELETE", f"{sandbox}/v3/order/cancel"), ("POST", f"{sandbox}/v3/order/place")]
    assert day_clock.slept == []  # no look-up rounds waited for


def test_close_ends_an_upstox_feed_stuck_in_its_authorize_call(tmp_path: Path, day_clock: FakeClock,
                                                                clients: list) -> None:
    """The feed's connect step is a REST call on its thread: against an API that accepts and never
    answers, the thread outlived close() by ~20 s (three 7 s attempts)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: "queue.Queue[socket.socket]" = queue.Queue()
    threading.Thread(target=lambda: [accepted.put(listener.accept()[0]) for _ in range(8)], daemon=True).start()
    try:
        client = upstox_feed(clients, tmp_path, day_clock, root_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
        client.subscribe(SBIN, on_tick=lambda t: None, mode="ltp")
        # the authorize request is out, its reply never comes; the server's end is held open (dropped,
        # it closed at once, and the client saw the connection end and tried again before close())
        held = accepted.get(timeout=10)
        started = time.monotonic()
        client.close()
        assert not _feed_threads(client)
        assert time.monotonic() - started < 5.0  # one attempt's own timeout is 7 s; a loaded machine is slow
        assert accepted.qsize() == 0  # not tried again after close()
        held.close()
    finally:
        listener.close()


# ============================================================================
# 12.6 Hostile: Config values
# ============================================================================

BAD_CONFIGS = [
    pytest.param({"timeout": float("nan")}, "'timeout'", id="timeout-nan"),
    pytest.param({"timeout": float("inf")}, "'timeout'", id="timeout-inf"),
    pytest.param({"timeout": 0}, "'timeout'", id="timeout-0"),
    pytest.param({"timeout": -1}, "'timeout'", id="timeout-negative"),
    pytest.param({"timeout": "7"}, "'timeout'", id="timeout-text"),
    pytest.param({"timeout": 10 ** 400}, "'timeout'", id="timeout-400-digits"),
    pytest.param({"max_retries": True}, "'max_retries'", id="max-retries-bool"),
    pytest.param({"max_retries": -1}, "'max_retries'", id="max-retries-negative"),
    pytest.param({"max_retries": 100}, "'max_retries'", id="max-retries-100"),
    pytest.param({"rate_limits": {"ordres": 5}}, "unknown class 'ordres'", id="rate-limit-unknown-class"),
    pytest.param({"rate_limits": {"orders": 0}}, "'rate_limits'", id="rate-limit-0"),
    pytest.param({"rate_limits": {"orders": float("nan")}}, "'rate_limits'", id="rate-limit-nan"),
    pytest.param({"rate_limits": {"orders": [(0, 1)]}}, "'rate_limits'", id="rate-limit-0-calls-per-second"),
    pytest.param({"rate_limits": {"orders": 10 ** 400}}, "'rate_limits'", id="rate-limit-400-digits"),
    pytest.param({"rate_limits": {"orders": "10/s"}}, "'rate_limits'", id="rate-limit-text"),
    pytest.param({"stream_silence_timeout": float("nan")}, "'stream_silence_timeout'", id="stream-silence-nan"),
    pytest.param({"stream_reconnect_delay": float("inf")}, "'stream_reconnect_delay'", id="stream-reconnect-inf"),
    pytest.param({"stream_connect_timeout": 0}, "'stream_connect_timeout'", id="stream-connect-0"),
    # 1e10 s overflowed the socket's timeout on the feed's thread (OverflowError, never seen by the user)
    pytest.param({"stream_connect_timeout": 1e10}, "'stream_connect_timeout' must be a positive number of seconds up to 3600",
                 id="stream-connect-1e10"),
    pytest.param({"stream_silence_timeout": 3601}, "'stream_silence_timeout'", id="stream-silence-over-an-hour"),
    pytest.param({"acess_token": "kite-access-SECRET-1"}, "did you mean 'access_token'", id="key-typo"),
    pytest.param({1: "x"}, "keys must be strings", id="key-not-a-string"),
    pytest.param({"access_token": "kite-access-SECRET-1\r\nX-Injected: 1"}, "control character",
                 id="token-with-embedded-crlf"),
    pytest.param({"totp_secret": TOTP_SECRET}, "'totp_secret'", id="kite-given-an-angel-credential"),
]


@pytest.mark.parametrize("config, words", BAD_CONFIGS)
def test_a_bad_config_value_is_refused_at_init(config: Dict[Any, Any], words: str, tmp_path: Path, clients: list) -> None:
    cfg = {"cache_dir": str(tmp_path), "api_key": "kitekey01", "access_token": "kite-access-SECRET-1", **config}
    with no_request():
        exc = expect(tt.ConfigurationError, lambda: kept(clients, "zerodha", cfg), words)
    assert "kite-access-SECRET-1" not in str(exc)


@pytest.mark.parametrize("config, words", [
    pytest.param([("api_key", "angelkey01")], "config must be a dict", id="config-a-list"),
    pytest.param("api_key=angelkey01", "config must be a dict", id="config-a-string"),
    pytest.param({**CREDS["angelone"], "request_token": "req-TOKEN-1"}, "'request_token'", id="angel-given-a-request-token"),
    pytest.param({**CREDS["angelone"], "pin": 4321}, "'pin'", id="pin-an-int"),
])
def test_a_bad_angel_config_is_refused_at_init(config: Any, words: str, tmp_path: Path, clients: list) -> None:
    with no_request():
        if isinstance(config, dict):
            config = {**config, "cache_dir": str(tmp_path)}
        exc = expect(tt.ConfigurationError, lambda: kept(clients, "angelone", config), words)
    assert TOTP_SECRET not in str(exc)


def test_credentials_with_surrounding_whitespace_are_stripped_and_work(tmp_path: Path, day_clock: FakeClock,
                                                                       clients: list) -> None:
    kite = rest_client(clients, "zerodha", tmp_path / "k", day_clock, api_key=" kitekey01\n",
                       access_token="kite-access-SECRET-1\n")
    angel = rest_client(clients, "angelone", tmp_path / "a", day_clock, client_id="A123456\n", pin="4321\n",
                        totp_secret=TOTP_SECRET + "\n")
    import pyotp

    with responses.RequestsMock() as rs:
        MockApi(rs, "zerodha").on("get_profile")
        api = MockApi(rs, "angelone")
        api.on("login")
        api.on("get_profile")
        kite.get_profile()
        angel.get_profile()
        assert rs.calls[0].request.headers["Authorization"] == "token kitekey01:kite-access-SECRET-1"
        assert json.loads(api.calls("login")[0].request.body) == {
            "clientcode": "A123456", "password": "4321", "totp": pyotp.TOTP(TOTP_SECRET).at(day_clock())}


def test_a_totp_secret_that_is_not_base32(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    angel = rest_client(clients, "angelone", tmp_path, day_clock, totp_secret="not-base32-!!")
    with no_request():
        exc = expect(tt.ConfigurationError, angel.get_profile, "'totp_secret'", "base32")
    assert "not-base32-!!" not in "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# ============================================================================
# 12.7 Hostile: Feed frames and feed lifecycles (WsServer on 127.0.0.1)
# ============================================================================

SBIN_TICK = kite_frame(kite_packet(779521, 8, ltp=801.05))


def _kite_streaming(clients: list, tmp_path: Path, clock: FakeClock, server: WsServer,
                    on_tick: Callable[[tt.Tick], Any], **config: Any) -> tt.TTConnect:
    kite = kite_feed(clients, tmp_path, clock, server, **config)
    kite.subscribe(SBIN, on_tick=on_tick, mode="ltp")
    assert stream_event(kite, lambda s: s["connected"])
    assert json.loads(server.wait_message()) == {"a": "subscribe", "v": [779521]}
    assert json.loads(server.wait_message()) == {"a": "mode", "v": ["ltp", [779521]]}
    return kite


HOSTILE_KITE_FRAMES = [
    pytest.param(_garbage(300), 2, 1, id="binary-garbage"),
    pytest.param(kite_frame(kite_packet(779521, 44, ltp=1.0))[:-7], 2, 1, id="truncated-packet"),
    pytest.param(b"\x00\x01\x00\x00", 2, 1, id="zero-length-packet"),
    pytest.param(b"\xff\xff" + bytes(1 << 20), 2, 1, id="one-megabyte-binary-frame"),
    pytest.param(b"{" * (1 << 20), 1, 0, id="one-megabyte-text-frame"),
    pytest.param(b"not json at all {", 1, 0, id="text-not-json"),
    pytest.param(json.dumps({"type": "order", "data": {"order_id": "1"}}).encode(), 1, 1, id="order-update-malformed"),
]


@pytest.mark.parametrize("frame, opcode, dropped", HOSTILE_KITE_FRAMES)
def test_a_hostile_kite_frame_is_dropped_and_the_feed_goes_on(frame: bytes, opcode: int, dropped: int, tmp_path: Path,
                                                              day_clock: FakeClock, clients: list,
                                                              ws_server: WsServer) -> None:
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    orders: "queue.Queue[tt.Order]" = queue.Queue()
    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, ticks.put)
    kite.on_order_update(orders.put)
    ws_server.send(frame, opcode=opcode)
    ws_server.send(SBIN_TICK)
    tick = ticks.get(timeout=3)
    assert (tick.instrument, tick.ltp) == (SBIN, 801.05)
    stats = kite.stream_stats()
    assert (stats["frames_dropped"], stats["reconnects"], stats["ticks"]) == (dropped, 0, 1)
    assert orders.empty()


def test_a_protocol_violation_reconnects_and_resubscribes(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                         ws_server: WsServer) -> None:
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, ticks.put)
    ws_server.handshakes.get(timeout=3)
    ws_server.send_raw(bytes([0x80, 3]) + b"abc")  # a continuation frame with nothing to continue
    ws_server.handshakes.get(timeout=3)  # it reconnects...
    assert json.loads(ws_server.wait_message()) == {"a": "subscribe", "v": [779521]}  # ...and subscribes again
    assert stream_event(kite, lambda s: s["connected"])
    ws_server.wait_message()
    ws_server.send(SBIN_TICK)
    assert ticks.get(timeout=3).ltp == 801.05
    assert kite.stream_stats()["reconnects"] >= 1


def angel_streaming_sbin(clients: list, tmp_path: Path, day_clock: FakeClock,
                         market: WsServer) -> Tuple[tt.TTConnect, "queue.Queue[tt.Tick]"]:
    """An AngelOne client streaming SBIN's ltp from ``market``, connected: (client, its ticks)."""
    angel = rest_client(clients, "angelone", tmp_path, day_clock, auth_mode="manual", access_token="jwt-SECRET-9",
                        feed_token="feed-SECRET-9", ws_url=market.url, stream_silence_timeout=1.0,
                        stream_reconnect_delay=0.01)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    angel.subscribe(SBIN, on_tick=ticks.put, mode="ltp")
    market.wait_message(skip=("ping",))
    assert stream_event(angel, lambda s: s["connected"])
    return angel, ticks


@pytest.mark.parametrize("frame", [
    pytest.param(angel_packet(1, 1, "3045", ltp=5.0)[:-1], id="packet-one-byte-short"),
    pytest.param(angel_packet(2, 1, "3045", ltp=5.0, buy_qty=float("nan")), id="quantity-nan"),
    pytest.param(bytes(1 << 20), id="one-megabyte-frame"),
])
def test_a_hostile_angel_frame_is_dropped_and_the_feed_goes_on(frame: bytes, tmp_path: Path, day_clock: FakeClock,
                                                               clients: list) -> None:
    market = WsServer(heartbeat=None, text_replies={"ping": "pong"})
    try:
        angel, ticks = angel_streaming_sbin(clients, tmp_path, day_clock, market)
        market.send(frame)
        market.send(b"{oops", opcode=1)
        market.send(angel_packet(1, 1, "3045", ltp=801.05))
        assert ticks.get(timeout=3).ltp == 801.05
        stats = angel.stream_stats()
        assert (stats["frames_dropped"], stats["reconnects"]) == (1, 0)
    finally:
        for client in clients:
            client.close()
        market.close()


def _feed_threads(client: tt.TTConnect) -> List[threading.Thread]:
    """The client's feed threads that are still alive (after up to 2 s for each to end)."""
    streamer = client._streamer
    conns = [c for c in (streamer.market, streamer.orders) if c is not None] if streamer is not None else []
    threads = [c._thread for c in conns]
    for thread in threads:
        thread.join(2)
    return [t for t in threads if t.is_alive()]


def test_close_from_inside_on_tick(tmp_path: Path, day_clock: FakeClock, clients: list, ws_server: WsServer,
                                   caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="ttconnect")
    done = threading.Event()
    errors: List[BaseException] = []
    holder: Dict[str, tt.TTConnect] = {}

    def handler(tick: tt.Tick) -> None:
        try:
            holder["kite"].close()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)
        finally:
            done.set()

    holder["kite"] = kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, handler)
    ws_server.send(SBIN_TICK)
    assert done.wait(3)
    assert errors == []
    assert _feed_threads(kite) == []
    assert kite.stream_stats()["handler_errors"] == 0
    assert not any("cannot join" in m for m in messages(caplog))
    expect(tt.ConfigurationError, lambda: kite.subscribe(INFY, on_tick=print), "closed")


def test_close_while_the_first_connect_is_in_progress(tmp_path: Path, day_clock: FakeClock, clients: list) -> None:
    """A feed that accepts the TCP connection and never answers the upgrade."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted: "queue.Queue[socket.socket]" = queue.Queue()
    threading.Thread(target=lambda: accepted.put(listener.accept()[0]), daemon=True).start()
    conns: List[socket.socket] = []
    try:
        kite = rest_client(clients, "zerodha", tmp_path, day_clock, ws_url=f"ws://127.0.0.1:{listener.getsockname()[1]}/",
                           stream_connect_timeout=30)
        kite.subscribe(SBIN, on_tick=print, mode="ltp")
        conns.append(accepted.get(timeout=3))  # the client is inside its handshake now
        started = time.monotonic()
        kite.close()
        assert time.monotonic() - started < 2.0
        assert _feed_threads(kite) == [], "the feed thread is still in its handshake after close()"
    finally:
        for conn in conns:
            conn.close()
        listener.close()


def test_close_racing_the_first_subscribe_leaves_no_feed(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                         ws_server: WsServer) -> None:
    rest_client(clients, "zerodha", tmp_path, day_clock).close()  # the DB is fresh now: clients open offline
    cfg = {"cache_dir": str(tmp_path), **CREDS["zerodha"], "ws_url": ws_server.url + "/", "stream_reconnect_delay": 0.01}
    with no_request():
        for _ in range(8):
            kite = tt.TTConnect("zerodha", cfg, clock=day_clock, sleep=day_clock.sleep)
            clients.append(kite)
            barrier = threading.Barrier(2)
            outcomes: List[str] = []

            def subscribe() -> None:
                barrier.wait(2)
                try:
                    kite.subscribe(SBIN, on_tick=print, mode="ltp")
                    outcomes.append("subscribed")
                except tt.ConfigurationError as exc:
                    outcomes.append(str(exc))

            def close() -> None:
                barrier.wait(2)
                kite.close()

            workers = [threading.Thread(target=subscribe), threading.Thread(target=close)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(5)
            assert len(outcomes) == 1 and (outcomes[0] == "subscribed" or "closed" in outcomes[0]), outcomes
            assert _feed_threads(kite) == [], f"a feed thread outlived close() ({outcomes[0]})"


def test_a_feed_refusing_every_handshake_renews_the_session_once(tmp_path: Path, day_clock: FakeClock,
                                                                 clients: list) -> None:
    market = WsServer(heartbeat=None)
    market.refuse, market.refuse_status = 10 ** 6, "401 Unauthorized"
    try:
        angel = rest_client(clients, "angelone", tmp_path, day_clock, ws_url=market.url, stream_reconnect_delay=0.01,
                            stream_reconnect_max_delay=0.02, rate_limits={"login": 1000, "renew": 1000})
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            api = MockApi(rs, "angelone")
            api.on("login")
            api.on("renew_token")
            angel.subscribe(SBIN, on_tick=print, mode="ltp")
            for _ in range(6):
                market.handshakes.get(timeout=3)
            angel.close()
            assert len(api.calls("login")) == 1
            assert len(api.calls("renew_token")) <= 1
        assert "refused the session" in (angel.stream_stats()["last_error"] or "")
    finally:
        market.close()


def test_a_kite_feed_refusing_every_handshake_makes_no_rest_calls(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                                  ws_server: WsServer) -> None:
    ws_server.refuse, ws_server.refuse_status = 10 ** 6, "403 Forbidden"
    kite = kite_feed(clients, tmp_path, day_clock, ws_server)
    with no_request():
        kite.subscribe(SBIN, on_tick=print, mode="ltp")
        for _ in range(5):
            ws_server.handshakes.get(timeout=3)
        kite.close()
    last = kite.stream_stats()["last_error"] or ""
    assert "refused the session (HTTP 403)" in last and "log in" in last


def test_raising_handlers_do_not_kill_the_feed(tmp_path: Path, day_clock: FakeClock, clients: list,
                                               ws_server: WsServer) -> None:
    ticks: "queue.Queue[float]" = queue.Queue()

    def on_tick(tick: tt.Tick) -> None:
        if tick.ltp == 1.0:
            raise KeyError("strategy bug")
        ticks.put(tick.ltp)

    def on_order(order: tt.Order) -> None:
        raise RecursionError("handler bug")

    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, on_tick)
    kite.on_order_update(on_order)
    row = payload("zerodha", "get_orders")["data"][1]
    ws_server.send(json.dumps({"type": "order", "data": row}).encode(), opcode=1)
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=1.0)))
    ws_server.send(SBIN_TICK)
    assert ticks.get(timeout=3) == 801.05
    stats = kite.stream_stats()
    assert (stats["handler_errors"], stats["order_updates"], stats["reconnects"]) == (2, 1, 0)


# ============================================================================
# 12.7a Hostile: feed frames and the streamer (adversarial pass, each case reproduced first)
# ============================================================================


def _decode_within(broker_decode: Callable[[], Any], seconds: float = 2.0) -> Any:
    """Run a decode on a daemon thread: what it returned or raised, or "hung" after ``seconds``."""
    outcome: List[Any] = ["hung"]

    def run() -> None:
        try:
            outcome[0] = broker_decode()
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcome[0] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0]


@pytest.mark.parametrize("frame", [
    pytest.param(pb_varint(5 << 3 | 2) + pb_varint(-11), id="top-level-length-minus-11"),
    pytest.param(pb_feed_response({"NSE_EQ|INE062A01020": pb_field(1, pb_varint(6 << 3 | 2) + pb_varint(-3))}),
                 id="inside-a-feed"),
])
def test_upstox_a_negative_length_is_a_frame_error_not_a_hang(frame: bytes) -> None:
    # an int64 varint as a length: stepping back onto its own key looped forever on the feed thread
    outcome = _decode_within(lambda: upstox_decode(frame, {"NSE_EQ|INE062A01020": (SBIN, "ltp")}))
    assert isinstance(outcome, tt._FrameError) and "negative length" in str(outcome), outcome


def test_upstox_a_negative_length_frame_is_dropped_and_the_feed_goes_on(tmp_path: Path, day_clock: FakeClock,
                                                                        clients: list) -> None:
    server = WsServer(heartbeat=None)
    try:
        client = upstox_feed(clients, tmp_path, day_clock)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            MockApi(rs, UPSTOX).on("feed_authorize", callback=authorize_to(server, "feeds", []))
            ticks: "queue.Queue[tt.Tick]" = queue.Queue()
            client.subscribe(SBIN, on_tick=ticks.put, mode="ltp")
            server.binary_messages.get(timeout=3)
            server.send(pb_varint(5 << 3 | 2) + pb_varint(-11))
            server.send(pb_feed_response({"NSE_EQ|INE062A01020": pb_field(1, pb_ltpc(801.05))}))
            assert ticks.get(timeout=3).ltp == 801.05
            stats = client.stream_stats()
            assert (stats["frames_dropped"], stats["ticks"], stats["reconnects"]) == (1, 1, 0)
            client.close()
            assert _feed_threads(client) == []
    finally:
        server.close()


def _upstox_overruns() -> List[Any]:
    """Frames where one sub-message is shorter than its fields, followed by good bytes it would borrow."""
    good = pb_field(1, pb_ltpc(801.05))
    quote = pb_field(1, 65) + pb_field(2, 120.45) + pb_field(3, 130) + pb_field(4, 120.5)
    candle = pb_field(1, "1d") + pb_field(2, 115.0) + pb_field(3, 122.0) + pb_field(4, 110.5)
    after = {"NSE_EQ|INE062A01020": good}  # a second entry: the bytes an overrun reads

    def with_market(market: bytes) -> bytes:
        return pb_feed_response({"NSE_FO|52207": pb_full(market), **after})

    return [
        pytest.param(pb_feed_response({"NSE_FO|52207": pb_field(1, b"\x09"), **after}), "LTPC", id="ltpc-of-one-byte"),
        pytest.param(with_market(pb_field(1, pb_ltpc(120.5)) + pb_field(4, pb_field(1, candle[:-5])
                                                                         + pb_field(1, candle))),
                     "OHLC", id="day-candle-cut-in-its-low"),
        pytest.param(with_market(pb_field(1, pb_ltpc(120.5)) + b"\x29"), "MarketFullFeed", id="market-atp-key-alone"),
        pytest.param(pb_feed_response({"NSE_FO|52207": pb_field(3, pb_field(1, pb_ltpc(120.5)) + b"\x20"), **after}),
                     "FirstLevelWithGreeks", id="greeks-vtt-key-alone"),
        pytest.param(pb_field(4, pb_field(1, pb_field(1, "NSE_EQ") + b"\x10") + pb_field(1, pb_field(1, "NSE_FO")
                                                                                      + pb_field(2, 2))),
                     "segment status", id="market-info-status-key-alone"),
    ]


def test_upstox_a_nan_or_infinite_quantity_is_unknown_and_the_frame_stays() -> None:
    # int(nan) raised ValueError: the frame, with every other instrument's tick, was dropped
    targets = {"NSE_FO|52207": (NIFTY_CE, "full"), "NSE_EQ|INE062A01020": (SBIN, "ltp"),
               "NSE_FO|52208": (NIFTY_CE, "quote")}
    odd = pb_market_ff(pb_ltpc(120.5, cp=118.0), tbq=float("nan"), tsq=363009.0, oi=float("inf"))
    ce, sbin, quote = upstox_decode(pb_feed_response({"NSE_FO|52207": pb_full(odd), "NSE_EQ|INE062A01020": pb_field(
        1, pb_ltpc(801.05)), "NSE_FO|52208": pb_full(odd)}), targets)
    assert (ce.ltp, ce.buy_qty, ce.sell_qty, ce.oi) == (120.5, None, 363009, None)
    assert (quote.mode, quote.buy_qty, quote.sell_qty) == ("quote", None, 363009)
    assert (sbin.instrument, sbin.ltp) == (SBIN, 801.05)


def _upstox_depth_overruns() -> List[Any]:
    """Full frames whose depth holds a Quote shorter than its fields, a good Quote after it."""
    quote = pb_field(1, 65) + pb_field(2, 120.45) + pb_field(3, 130) + pb_field(4, 120.5)
    after = {"NSE_EQ|INE062A01020": pb_field(1, pb_ltpc(801.05))}

    def with_depth(depth: bytes) -> bytes:
        return pb_feed_response({"NSE_FO|52207": pb_full(pb_field(1, pb_ltpc(120.5)) + pb_field(2, depth)), **after})

    return [pytest.param(with_depth(pb_field(1, b"\x08") + pb_field(1, quote)), id="depth-quote-of-one-byte"),
            pytest.param(with_depth(pb_field(1, quote[:-4]) + pb_field(1, quote)), id="depth-quote-cut-in-its-ask-price")]


@pytest.mark.parametrize("frame", _upstox_depth_overruns())
def test_upstox_a_depth_that_cannot_be_read_is_empty_and_the_ticks_stay(frame: bytes, caplog: Any) -> None:
    # The depth is read when a tick's depth is (most strategies read the price only): a Quote
    # shorter than its fields no longer borrows the next level's key as its quantity, and the
    # tick keeps what the frame's checked fields say.
    targets = {"NSE_FO|52207": (NIFTY_CE, "full"), "NSE_EQ|INE062A01020": (SBIN, "ltp")}
    ce, sbin = upstox_decode(frame, targets)
    assert (ce.instrument, ce.ltp, sbin.instrument, sbin.ltp) == (NIFTY_CE, 120.5, SBIN, 801.05)
    with caplog.at_level(logging.WARNING, logger="ttconnect"):
        assert (ce.bids, ce.asks) == ((), ())
    assert [r.getMessage() for r in caplog.records] == [
        "upstox stream: a tick's market depth could not be read (a Quote field runs past its message); it has none"]
    assert ce == pickle.loads(pickle.dumps(ce)) and hash(ce) == hash(copy.deepcopy(ce))  # read once, then plain


@pytest.mark.parametrize("frame, what", _upstox_overruns())
def test_upstox_a_sub_message_shorter_than_its_fields_is_refused(frame: bytes, what: str) -> None:
    # each read stays inside its message: before, the LTPC of one byte gave ltp 8.7e150 out of
    # the next entry's bytes, and a one-byte Quote took the next level's key as its quantity
    targets = {"NSE_FO|52207": (NIFTY_CE, "full"), "NSE_EQ|INE062A01020": (SBIN, "ltp")}
    with pytest.raises(tt._FrameError, match=f"{what} .*runs past its"):
        upstox_decode(frame, targets)
    # the neighbour whose bytes an overrun would read decodes alone to its real values
    (tick,) = upstox_decode(pb_feed_response({"NSE_EQ|INE062A01020": pb_field(1, pb_ltpc(801.05))}), targets)
    assert (tick.instrument, tick.ltp) == (SBIN, 801.05)


def test_a_text_frame_that_is_not_utf8_is_skipped_and_counted_without_a_reconnect(
        tmp_path: Path, day_clock: FakeClock, clients: list, ws_server: WsServer) -> None:
    # websocket-client's own UTF-8 check tore the connection down: a reconnect for one frame
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    orders: "queue.Queue[tt.Order]" = queue.Queue()
    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, ticks.put)
    kite.on_order_update(orders.put)
    ws_server.handshakes.get(timeout=3)
    row = {**payload("zerodha", "get_orders")["data"][1], "tag": "caf\u00e9"}
    ws_server.send(json.dumps({"type": "order", "data": row}, ensure_ascii=False).encode("latin-1"), opcode=1)
    ws_server.send(SBIN_TICK)
    assert ticks.get(timeout=3).ltp == 801.05
    stats = kite.stream_stats()
    assert (stats["frames_dropped"], stats["reconnects"], stats["ticks"], stats["order_updates"]) == (1, 0, 1, 0)
    assert "not UTF-8" in stats["last_error"] and orders.empty()
    assert ws_server.handshakes.empty()  # the one connection still


def test_a_handler_calling_sys_exit_is_a_handler_error_and_the_feed_goes_on(
        tmp_path: Path, day_clock: FakeClock, clients: list, ws_server: WsServer) -> None:
    # SystemExit is no Exception: it ended the feed thread silently, and later subscribes
    # never started another
    ticks: "queue.Queue[float]" = queue.Queue()

    def on_tick(tick: tt.Tick) -> None:
        if tick.ltp == 1.0:
            sys.exit("strategy says stop")
        ticks.put(tick.ltp)

    def on_order(order: tt.Order) -> None:
        sys.exit(3)

    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, on_tick)
    kite.on_order_update(on_order)
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=1.0)))
    ws_server.send(json.dumps({"type": "order", "data": payload("zerodha", "get_orders")["data"][1]}).encode(), opcode=1)
    ws_server.send(SBIN_TICK)
    assert ticks.get(timeout=3) == 801.05
    stats = kite.stream_stats()
    assert (stats["handler_errors"], stats["order_updates"], stats["reconnects"], stats["ticks"]) == (2, 1, 0, 2)
    assert kite._streamer is not None and kite._streamer.market is not None and kite._streamer.market.alive()


def test_a_handler_raising_keyboard_interrupt_ends_the_feed_loudly_and_subscribe_restarts_it(
        tmp_path: Path, day_clock: FakeClock, clients: list, ws_server: WsServer, caplog: Any) -> None:
    ticks: "queue.Queue[float]" = queue.Queue()

    def on_tick(tick: tt.Tick) -> None:
        if tick.ltp == 1.0:
            raise KeyboardInterrupt
        ticks.put(tick.ltp)

    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, on_tick)
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=1.0)))
    assert stream_event(kite, lambda s: not s["connected"])
    assert _feed_threads(kite) == []
    assert "stopped by KeyboardInterrupt" in (kite.stream_stats()["last_error"] or "")
    assert any("stopped by KeyboardInterrupt" in m for m in messages(caplog))
    kite.subscribe(INFY, mode="ltp")  # a new feed, greeted with both instruments
    kite_subscribed(ws_server)
    ws_server.send(SBIN_TICK)
    assert ticks.get(timeout=3) == 801.05


def _kite_frame_counting(count: int, *packets: bytes) -> bytes:
    return _struct.pack(">H", count) + kite_frame(*packets)[2:]


def test_kite_a_packet_count_lower_than_the_packets_sent_drops_and_counts_the_frame(
        tmp_path: Path, day_clock: FakeClock, clients: list, ws_server: WsServer) -> None:
    # the packets past the count were ignored without a trace
    packets = (kite_packet(779521, 8, ltp=801.0), kite_packet(408065, 8, ltp=1573.7), kite_packet(779521, 8, ltp=802.0))
    instruments = {779521: SBIN, 408065: INFY}
    assert [t.ltp for t in decode("zerodha", _kite_frame_counting(3, *packets), instruments)] == [801.0, 1573.7, 802.0]
    with pytest.raises(tt._FrameError, match=r"declares 1 packet\(s\) but 20 bytes follow"):
        decode("zerodha", _kite_frame_counting(1, *packets), instruments)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, ticks.put)
    ws_server.send(_kite_frame_counting(1, *packets))
    ws_server.send(SBIN_TICK)
    assert ticks.get(timeout=3).ltp == 801.05  # nothing of the lying frame
    stats = kite.stream_stats()
    assert (stats["frames_dropped"], stats["ticks"], stats["reconnects"]) == (1, 1, 0)
    assert "declares 1 packet(s)" in stats["last_error"]


def test_angel_a_token_ends_at_its_nul_and_a_one_byte_keep_alive_is_no_malformed_frame(
        tmp_path: Path, day_clock: FakeClock, clients: list, caplog: Any) -> None:
    # the token is NUL-terminated (brokers/angelone.md 7.4; the official SDK reads it up to the
    # first NUL): bytes after the NUL lost the tick; the keep-alive b"\\x00" was logged as malformed
    key = bytes([1]) + b"3045".ljust(25, b"\0")
    after_nul = bytearray(angel_packet(1, 1, "3045", ltp=801.05))
    after_nul[2:27] = b"3045\0" + b"\x7f" * 20
    assert [(t.instrument, t.ltp) for t in decode("angelone", bytes(after_nul), {key: SBIN})] == [(SBIN, 801.05)]
    other = bytearray(after_nul)
    other[2:7] = b"30450"  # a different token, not a prefix match
    assert decode("angelone", bytes(other), {key: SBIN}) == []
    assert decode("angelone", b"\x00", {key: SBIN}) == [] and decode("angelone", b"", {key: SBIN}) == []
    market = WsServer(heartbeat=None, text_replies={"ping": "pong"})
    try:
        angel, ticks = angel_streaming_sbin(clients, tmp_path, day_clock, market)
        market.send(b"\x00")
        market.send(bytes(after_nul))
        assert ticks.get(timeout=3).ltp == 801.05
        stats = angel.stream_stats()
        assert (stats["frames_dropped"], stats["ticks"], stats["last_error"]) == (0, 1, None)
        assert not [m for m in messages(caplog) if "stream" in m and "malformed" in m]
    finally:
        for client in clients:
            client.close()
        market.close()


def test_no_tick_reaches_a_handler_after_close_or_unsubscribe_inside_it(
        tmp_path: Path, day_clock: FakeClock, clients: list, ws_server: WsServer) -> None:
    # the rest of the frame's ticks were still delivered after close()/unsubscribe() had returned
    got: List[Tuple[str, float]] = []
    done = threading.Event()
    holder: Dict[str, tt.TTConnect] = {}

    def handler(tick: tt.Tick) -> None:
        got.append((str(tick.instrument), tick.ltp))
        if tick.ltp == 800.0:
            holder["kite"].unsubscribe(SBIN)
        elif tick.ltp == 900.0:
            holder["kite"].close()
        elif tick.ltp == 1573.7:
            done.set()

    holder["kite"] = kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, handler)
    kite.subscribe(INFY, mode="ltp")
    assert [json.loads(ws_server.wait_message())["a"] for _ in range(2)] == ["subscribe", "mode"]
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=800.0), kite_packet(779521, 8, ltp=801.0),
                              kite_packet(408065, 8, ltp=1573.7), kite_packet(779521, 8, ltp=802.0)))
    assert done.wait(3)
    assert got == [("NSE:SBIN", 800.0), ("NSE:INFY", 1573.7)]  # SBIN's later ticks are not delivered
    assert kite.stream_stats()["ticks"] == 2
    ws_server.send(kite_frame(*[kite_packet(408065, 8, ltp=900.0 + i) for i in range(4)]))
    assert stream_event(kite, lambda s: s["ticks"] == 3) and _feed_threads(kite) == []
    assert got[2:] == [("NSE:INFY", 900.0)]  # nothing after close()


def test_a_second_on_tick_handler_replaces_the_first_with_a_warning(
        tmp_path: Path, day_clock: FakeClock, clients: list, ws_server: WsServer, caplog: Any) -> None:
    # it replaced the first one for every instrument without a word (README: one handler per client)
    first: "queue.Queue[tt.Tick]" = queue.Queue()
    second: "queue.Queue[tt.Tick]" = queue.Queue()
    kite = _kite_streaming(clients, tmp_path, day_clock, ws_server, first.put)
    kite.subscribe(SBIN, on_tick=first.put, mode="ltp")  # the same handler again: no warning
    assert not [m for m in messages(caplog) if "replaces the previous one" in m]
    kite.subscribe(INFY, on_tick=second.put, mode="ltp")
    (warning,) = [m for m in messages(caplog) if "replaces the previous one" in m]
    assert "for every instrument" in warning and "tick.instrument" in warning
    ws_server.send(SBIN_TICK)
    assert (second.get(timeout=3).instrument, first.empty()) == (SBIN, True)


# ============================================================================
# 12.8 Hostile: Secrets under DEBUG logging
# ============================================================================


def _texts(caplog: Any, errors: List[BaseException], *more: Any) -> List[str]:
    """Everything a secret must stay out of: every log record (any logger), every error's
    text, repr and formatted traceback (with its causes), and the given objects' reprs."""
    out = [r.getMessage() + " " + repr(r.args) for r in caplog.records]
    for exc in errors:
        out += [str(exc), repr(exc), "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    out += [repr(x) + " " + str(x) for x in more]
    return out


def _assert_no_secret(secrets: List[str], texts: List[str]) -> None:
    for secret in secrets:
        # short numeric secrets (a PIN, a TOTP code) only as whole numbers: port numbers may hold their digits
        pattern = re.compile(rf"(?<!\d){re.escape(secret)}(?!\d)" if secret.isdigit() else re.escape(secret))
        for text in texts:
            assert not pattern.search(text), f"secret {secret[:6]}... leaked into: {text[:300]}"


def test_no_secret_leaks_from_an_angel_session_that_is_refused_renewed_and_fails(tmp_path: Path, day_clock: FakeClock,
                                                                                 clients: list, caplog: Any) -> None:
    import pyotp

    caplog.set_level(logging.DEBUG)
    market = WsServer(heartbeat=None, text_replies={"ping": "pong"})
    market.refuse, market.refuse_status = 1, "401 Unauthorized"
    errors: List[BaseException] = []
    try:
        angel = rest_client(clients, "angelone", tmp_path, day_clock, cache_session=True, ws_url=market.url,
                            stream_silence_timeout=0.5, stream_reconnect_delay=0.01)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
            api = MockApi(rs, "angelone")
            api.on("login")
            api.on("renew_token")
            api.on("get_positions", fixture="error.AG8001.json")  # refused: renewed once more, then refused again
            api.on("place_order", body=requests.exceptions.ConnectionError("connection reset by peer"))
            api.on("get_orders", body="<html>502</html>", status=502)
            angel.subscribe(SBIN, on_tick=print, mode="ltp")
            market.handshakes.get(timeout=3)
            market.handshakes.get(timeout=3)
            assert stream_event(angel, lambda s: s["connected"])
            for call in (angel.get_positions, lambda: angel.place_order(SBIN, 1, "BUY", "CNC", "MARKET")):
                try:
                    call()
                except tt.TTConnectError as exc:
                    errors.append(exc)
            session = angel._auth.current()
            angel.close()
        assert len(errors) == 2
        secrets = [TOTP_SECRET, "4321", pyotp.TOTP(TOTP_SECRET).at(day_clock())]
        secrets += [d[k] for d in (LOGIN, RENEWED) for k in ("jwtToken", "refreshToken", "feedToken")]
        stats = angel.stream_stats()
        _assert_no_secret(secrets, _texts(caplog, errors, angel, session, stats))
    finally:
        market.close()


def test_no_secret_leaks_from_a_refused_request_token_exchange(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                               caplog: Any) -> None:
    import hashlib

    caplog.set_level(logging.DEBUG)
    creds = {"api_key": "kitekey01", "api_secret": "kite-api-SECRET-77", "request_token": "req-TOKEN-seven-77"}
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        MockApi(rs, "zerodha").on("login", fixture="login.token_exception.json", status=403)
        exc = expect(tt.AuthenticationError, lambda: kept(clients, "zerodha", {"cache_dir": str(tmp_path), **creds},
                                                          clock=day_clock, sleep=day_clock.sleep),
                     "zerodha login")
    checksum = hashlib.sha256(b"kitekey01req-TOKEN-seven-77kite-api-SECRET-77").hexdigest()
    _assert_no_secret(["kite-api-SECRET-77", "req-TOKEN-seven-77", checksum], _texts(caplog, [exc]))


def test_no_pin_or_totp_leaks_from_a_login_page_that_echoes_the_form(tmp_path: Path, day_clock: FakeClock,
                                                                      clients: list, caplog: Any) -> None:
    # values under 8 characters were never blanked: a 4-digit PIN and a 6-digit TOTP came back whole
    import pyotp

    caplog.set_level(logging.DEBUG)
    code = pyotp.TOTP(TOTP_SECRET).at(day_clock())
    page = f"<html>500: bad request clientcode=A123456 password=4321 totp={code} (order 94321012)</html>"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rs:
        rs.get(URLS["angelone"], body=ANGEL_JSON)
        MockApi(rs, "angelone").on("login", body=page, status=500)
        angel = kept(clients, "angelone", {"cache_dir": str(tmp_path), **CREDS["angelone"]}, clock=day_clock,
                     sleep=day_clock.sleep)
        exc = expect(tt.BrokerError, angel.get_profile, "angelone login")
    assert "password=*** totp=***" in exc.message and "order 94321012" in exc.message  # digits inside a word stay
    _assert_no_secret(["4321 ", code, TOTP_SECRET], _texts(caplog, [exc]))


def test_a_refused_request_token_says_how_to_get_a_fresh_one(tmp_path: Path, day_clock: FakeClock,
                                                             clients: list) -> None:
    creds = {"api_key": "kitekey01", "api_secret": "kite-api-SECRET", "request_token": "req-TOKEN-used-twice"}
    with responses.RequestsMock() as rs:
        rs.get(URLS["zerodha"], body=KITE_CSV)
        MockApi(rs, "zerodha").on("login", fixture="login.token_exception.json", status=403)
        expect(tt.AuthenticationError, lambda: kept(clients, "zerodha", {"cache_dir": str(tmp_path), **creds},
                                                    clock=day_clock, sleep=day_clock.sleep),
               "TokenException", "request_token", "kite.zerodha.com/connect/login?v=3&api_key=kitekey01")


class _TokenStore:
    """A store handing out a session whose token carries a line break (a badly pasted secret)."""

    def __init__(self, token: str) -> None:
        self.session = tt.SessionData(broker="angelone", mode=tt.AuthMode.AUTO, access_token=token,
                                      obtained_at=ist(2026, 11, 23, 9, 0), expires_at=ist(2026, 11, 24, 0, 0),
                                      user_id="A123456", app_key="angelkey01")

    def load(self) -> tt.SessionData:
        return self.session

    def save(self, session: tt.SessionData) -> None:
        self.session = session

    def clear(self) -> None:
        pass


def test_no_secret_leaks_into_a_network_error_when_a_token_carries_a_newline(tmp_path: Path, day_clock: FakeClock,
                                                                            clients: list, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    token = "eyJhbGciOi-FIRST-HALF-SECRET\neyJzdWIiOi-SECOND-HALF-SECRET"
    angel = rest_client(clients, "angelone", tmp_path, day_clock, session_store=_TokenStore(token), max_retries=0)
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        exc = expect(tt.NetworkError, angel.get_funds)
    _assert_no_secret(["eyJhbGciOi-FIRST-HALF-SECRET", "eyJzdWIiOi-SECOND-HALF-SECRET"], _texts(caplog, [exc]))


def test_no_secret_leaks_when_a_proxy_echoes_the_request_headers(tmp_path: Path, day_clock: FakeClock, clients: list,
                                                                 caplog: Any) -> None:
    """Some proxies answer a failure with a page that lists the request's headers."""
    caplog.set_level(logging.DEBUG)
    kite = contract_client(clients, ZERODHA, tmp_path, day_clock, max_retries=0)
    page = ("<html><body><h1>502 Bad Gateway</h1><pre>GET /user/profile\nAuthorization: token "
            "kitekey01:kite-access-SECRET-1\nX-Kite-Version: 3</pre></body></html>")
    with responses.RequestsMock() as rs:
        MockApi(rs, "zerodha").on("get_profile", body=page, status=502)
        exc = expect(tt.BrokerError, kite.get_profile, "HTTP 502")
    _assert_no_secret(["kite-access-SECRET-1"], _texts(caplog, [exc]))


# ============================================================================
# 12.9 Hostile: the paper broker (its account file, config, clock, orders, tick files, live
# source, feed) and instrument texts. Time is injected; the only waits are bounded waits on
# queues and events for the feed thread (and on a helper subprocess holding an SQLite lock).
# ============================================================================

NIFTY = tt.Index(exchange="NSE", symbol="NIFTY")
TCS = tt.Equity(exchange="NSE", symbol="TCS")
OPEN, COMPLETE, CANCELLED, REJECTED, TRIGGER_PENDING = (
    tt.OrderStatus.OPEN, tt.OrderStatus.COMPLETE, tt.OrderStatus.CANCELLED, tt.OrderStatus.REJECTED,
    tt.OrderStatus.TRIGGER_PENDING)


def account_file(tmp_path: Path, account: str = "default") -> Path:
    return tmp_path / f"paper_{account}.db"


def nifty_future(client: tt.TTConnect) -> tt.Future:
    return tt.Future(exchange="NFO", symbol="NIFTY", expiry=client.expiries("NIFTY")[-3])


def rich_account(clients: list, tmp_path: Path, scripted: str) -> Tuple[Path, List[str]]:
    """An account file with a holding (yesterday's delivery buy), positions of three products and
    working orders; closed again. Returns (its path, the ids of its orders)."""
    clock = FakeClock(ist(2026, 12, 1, 14, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    ids = [client.place_order(PAPER_SBIN, 5, "BUY", "CNC", "MARKET")]
    clock.set(ist(2026, 12, 2, 10, 0))  # the 1 Dec roll: a holding
    push(client, PAPER_SBIN, 900.0)
    push(client, NIFTY, 23500.0)
    fut = nifty_future(client)
    push(client, fut, 23600.0)
    ids.append(client.place_order(PAPER_SBIN, 3, "BUY", "CNC", "MARKET"))
    ids.append(client.place_order(PAPER_SBIN, 2, "BUY", "MIS", "MARKET"))
    ids.append(client.place_order(fut, 65, "BUY", "NRML", "MARKET"))
    ids.append(client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0))
    ids.append(client.place_order(PAPER_SBIN, 1, "SELL", "CNC", "SL_M", trigger_price=850.0))
    client.close()
    return account_file(tmp_path), ids


def open_paper(clients: list, tmp_path: Path, clock: Any, **config: Any) -> tt.TTConnect:
    client = tt.TTConnect("paper", {"cache_dir": str(tmp_path), **config}, clock=clock)
    clients.append(client)
    return client


def tables(path: Path) -> List[str]:
    con = sqlite3.connect(str(path))
    try:
        return [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                          "AND name NOT LIKE 'sqlite_%'")]
    finally:
        con.close()


def assert_refused_or_works(clients: list, tmp_path: Path, path: Path, scripted: str) -> None:
    """A damaged account file: refused with a ConfigurationError that names the file (at open or
    at the first call), or an account that still works. Never a raw exception."""
    clock = FakeClock(ist(2026, 12, 2, 11, 0))
    try:
        client = open_paper(clients, tmp_path, clock, prices=scripted)
        client.get_funds()
        client.get_orders()
        client.get_positions()
        client.get_holdings()
    except tt.ConfigurationError as exc:
        assert str(path) in str(exc) or path.name in str(exc)
        return
    push(client, PAPER_SBIN, 900.0)
    new = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=700.0)
    assert client.get_order(new).status is OPEN
    assert client.cancel_order(new) == new


# ============================================================================
# A. The account file
# ============================================================================


@pytest.mark.parametrize("content", [b"\x00\xff" * 2048, b"SQLite format 3\x00" + b"\x07" * 500,
                                     b"this is my trading journal, not a database\n" * 50])
def test_account_file_of_garbage_is_refused_by_name(content: bytes, tmp_path: Path, clients: list,
                                                    paper_clock: FakeClock) -> None:
    path = account_file(tmp_path)
    path.write_bytes(content)
    with pytest.raises(tt.ConfigurationError, match=r"paper account file .*paper_default\.db cannot be used"):
        open_paper(clients, tmp_path, paper_clock)
    assert path.read_bytes() == content  # nothing was overwritten


def test_account_file_truncated_is_refused_and_kept(tmp_path: Path, clients: list, scripted: str) -> None:
    path, _ = rich_account(clients, tmp_path, scripted)
    con = sqlite3.connect(str(path))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = path.read_bytes()
    assert len(data) >= 8192
    path.write_bytes(data[: len(data) // 2])
    for leftover in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        if leftover.exists():
            leftover.unlink()
    with pytest.raises(tt.ConfigurationError, match="paper_default.db"):
        client = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
        client.get_orders()
    assert path.read_bytes() == data[: len(data) // 2]


def test_account_file_that_is_a_directory_is_refused(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    account_file(tmp_path).mkdir()
    with pytest.raises(tt.ConfigurationError, match="paper_default.db"):
        open_paper(clients, tmp_path, paper_clock)


def test_account_file_of_zero_bytes_starts_a_fresh_account(tmp_path: Path, clients: list,
                                                           paper_clock: FakeClock) -> None:
    account_file(tmp_path).write_bytes(b"")
    client = open_paper(clients, tmp_path, paper_clock, capital=12345.67)
    funds = client.get_funds()
    assert (funds.available, funds.total, funds.used) == (12345.67, 12345.67, 0.0)
    assert client.get_orders() == [] and client.get_positions() == []


def test_account_file_with_a_garbage_wal_keeps_the_committed_state(tmp_path: Path, clients: list,
                                                                   scripted: str) -> None:
    path, ids = rich_account(clients, tmp_path, scripted)
    before = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
    snapshot = (before.get_funds(), [o.id for o in before.get_orders()])
    before.close()
    Path(f"{path}-wal").write_bytes(os.urandom(10000))
    again = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
    assert (again.get_funds(), [o.id for o in again.get_orders()]) == snapshot
    assert snapshot[1] == ids[1:]


def test_account_file_from_a_newer_schema_is_refused_or_works(tmp_path: Path, clients: list,
                                                              scripted: str) -> None:
    """A newer ttconnect added a column to every table and bumped the schema version."""
    path, _ = rich_account(clients, tmp_path, scripted)
    con = sqlite3.connect(str(path))
    for name in tables(path):
        con.execute(f'ALTER TABLE "{name}" ADD COLUMN future_field TEXT')
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    assert_refused_or_works(clients, tmp_path, path, scripted)


def test_account_file_whose_tables_have_wrong_columns_is_refused_by_name(tmp_path: Path, clients: list,
                                                                         scripted: str) -> None:
    path, _ = rich_account(clients, tmp_path, scripted)
    con = sqlite3.connect(str(path))
    for name in tables(path):
        con.execute(f'DROP TABLE "{name}"')
        con.execute(f'CREATE TABLE "{name}" (something_else TEXT)')
        con.execute(f'INSERT INTO "{name}" VALUES (\'x\')')
    con.commit()
    con.close()
    with pytest.raises(tt.ConfigurationError, match="paper_default.db"):
        client = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
        client.get_funds()
        client.get_positions()


def test_account_file_with_values_of_wrong_types_is_refused_by_name(tmp_path: Path, clients: list,
                                                                    scripted: str) -> None:
    path, _ = rich_account(clients, tmp_path, scripted)
    con = sqlite3.connect(str(path))
    for name in tables(path):
        for (_, column, *_rest) in con.execute(f'PRAGMA table_info("{name}")').fetchall():
            try:
                con.execute(f'UPDATE "{name}" SET "{column}" = \'garbage\'')
            except sqlite3.Error:
                pass  # a constraint keeps that column as it was
    con.commit()
    con.close()
    with pytest.raises(tt.ConfigurationError, match="paper_default.db"):
        client = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
        client.get_funds()
        client.get_positions()
        client.get_holdings()
        client.get_orders()


def test_account_file_that_lost_its_last_log_row_is_the_account_one_transaction_earlier(
        tmp_path: Path, clients: list, scripted: str) -> None:
    """A partial restore (the WAL's last commit lost to a power cut can do the same): the log
    reads as the account one transaction earlier, whole and consistent, never half of one."""
    path, ids = rich_account(clients, tmp_path, scripted)
    con = sqlite3.connect(str(path))
    con.execute("DELETE FROM events WHERE seq = (SELECT MAX(seq) FROM events)")
    con.commit()
    con.close()
    client = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
    orders = client.get_orders()
    assert [o.id for o in orders] == ids[1:-1]  # the last order (the SL_M sell) is gone, whole
    assert [o.status for o in orders] == [COMPLETE, COMPLETE, COMPLETE, OPEN]
    funds = client.get_funds()
    assert funds.available == funds.total - funds.used and funds.available > 0


HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    if sys.argv[2] == "exclusive":
        con.execute("PRAGMA locking_mode = EXCLUSIVE")
        con.execute("BEGIN EXCLUSIVE")
        con.execute("CREATE TABLE IF NOT EXISTS lock_probe (x)")
    else:
        con.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    con.execute("ROLLBACK")
""")


def hold_lock(path: Path, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), how], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def release(proc: subprocess.Popen) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_account_locked_by_another_process_during_an_order_is_a_typed_error(
        tmp_path: Path, clients: list, scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    proc = hold_lock(account_file(tmp_path), "immediate")
    try:
        try:
            placed: Optional[str] = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0)
        except tt.TTConnectError as exc:  # typed, and says why
            placed = None
            assert "lock" in str(exc).lower() or "in use" in str(exc).lower() or "another" in str(exc).lower()
    finally:
        release(proc)
    orders = client.get_orders()
    assert [o.id for o in orders] == ([placed] if placed else [])  # nothing half-written
    again = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0)  # usable afterwards
    assert client.get_order(again).status is OPEN


def test_account_locked_exclusively_at_open_says_so_without_bad_advice(
        tmp_path: Path, clients: list, scripted: str) -> None:
    path, _ = rich_account(clients, tmp_path, scripted)
    proc = hold_lock(path, "exclusive")
    try:
        with pytest.raises(tt.ConfigurationError) as info:
            client = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
            client.get_funds()
    finally:
        release(proc)
    message = str(info.value)
    assert "locked" in message or "in use" in message
    # The file is in use, not damaged: moving it aside would orphan the other process's account.
    assert "move it aside" not in message


# ============================================================================
# B. Two clients, one account
# ============================================================================


def test_two_clients_on_one_account_in_one_process_share_it(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                            scripted: str) -> None:
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    try:
        b = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    except tt.ConfigurationError as exc:  # refusing the second is as good, if it says why
        assert "in use" in str(exc) or "another" in str(exc)
        return
    push(a, PAPER_SBIN, 900.0)
    push(b, PAPER_SBIN, 900.0)
    first = a.place_order(PAPER_SBIN, 5, "BUY", "CNC", "LIMIT", price=800.0)  # blocks 4,000
    with pytest.raises(tt.InsufficientFundsError, match="available 6,000.00"):
        b.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")  # 9,000 does not fit what is left
    second = b.place_order(PAPER_SBIN, 5, "BUY", "CNC", "MARKET")  # 4,500 does
    assert second != first
    for client in (a, b):
        funds = client.get_funds()
        assert (funds.available, funds.used, funds.total) == (1500.0, 4000.0, 5500.0)
        assert sorted(o.id for o in client.get_orders()) == sorted([first, second])


def test_a_second_client_can_cancel_an_order_the_first_placed(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                              scripted: str) -> None:
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    try:
        b = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    except tt.ConfigurationError:
        return  # refused at open: covered above
    push(a, PAPER_SBIN, 900.0)
    first = a.place_order(PAPER_SBIN, 5, "BUY", "CNC", "LIMIT", price=800.0)
    assert b.get_order(first).status is OPEN
    assert b.cancel_order(first) == first
    assert a.get_order(first).status is CANCELLED
    assert a.get_funds().available == b.get_funds().available == 10000.0


CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import ttconnect as tt, datetime as dt
    now = dt.datetime(2026, 12, 2, 10, 0, tzinfo=tt.IST).timestamp()
    client = tt.TTConnect("paper", cache_dir=sys.argv[1], clock=lambda: now, capital=50000)
    sbin = tt.Equity(exchange="NSE", symbol="SBIN")
    ids, errors = [], []
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(60):
        try:
            ids.append(client.place_order(sbin, 1, "BUY", "CNC", "LIMIT", price=500.0))
        except tt.TTConnectError as exc:
            errors.append(type(exc).__name__)
        except Exception as exc:
            errors.append("RAW " + type(exc).__name__ + ": " + str(exc))
    client.close()
    print(json.dumps({"ids": ids, "errors": errors}), flush=True)
""")


KILLED_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    import ttconnect as tt, datetime as dt
    now = dt.datetime(2026, 12, 2, 10, 0, tzinfo=tt.IST).timestamp()
    client = tt.TTConnect("paper", cache_dir=sys.argv[1], clock=lambda: now)
    sbin = tt.Equity(exchange="NSE", symbol="SBIN")
    while True:  # until killed: each id is printed once place_order has returned it
        print(client.place_order(sbin, 1, "BUY", "MIS", "MARKET"), flush=True)
""")


def test_a_process_killed_mid_update_loses_no_order_it_reported(tmp_path: Path, clients: list) -> None:
    import signal

    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(tmp_path), str(HERE)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        reported = [proc.stdout.readline().strip() for _ in range(40)]
        proc.send_signal(signal.SIGKILL)  # mid-way through the next order, as like as not
        proc.wait(10)
        reported += proc.stdout.read().split()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    now = ist(2026, 12, 2, 10, 0).timestamp()
    again = open_paper(clients, tmp_path, lambda: now)
    book = {o.id: o for o in again.get_orders()}
    assert all(i in book for i in reported) and len(book) - len(reported) in (0, 1)  # the last may have gone in
    assert {o.status for o in book.values()} == {COMPLETE}
    (pos,) = again.get_positions()
    assert pos.qty == len(book) == len(again.get_trades())  # every order whole: its trade and position with it
    cost = sum(round(t.avg_price * 100) for t in again.get_trades())
    assert round(pos.avg_price * len(book) * 100) == cost


def test_two_processes_on_one_account_never_overspend_or_share_ids(tmp_path: Path, clients: list) -> None:
    now = ist(2026, 12, 2, 10, 0).timestamp()
    parent = open_paper(clients, tmp_path, lambda: now, capital=50000)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(HERE)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        ids, errors = [], []
        for _ in range(60):
            try:
                ids.append(parent.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0))
            except tt.TTConnectError as exc:
                errors.append(type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - recorded: a raw exception is the defect
                errors.append(f"RAW {type(exc).__name__}: {exc}")
        child = json.loads(proc.stdout.readline())
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    raw = [e for e in errors + child["errors"] if e.startswith("RAW")]
    assert raw == []
    assert set(e for e in errors + child["errors"]) <= {"InsufficientFundsError", "OrderError", "BrokerError"}
    assert not set(ids) & set(child["ids"])  # no id given to two orders
    parent.close()
    check = open_paper(clients, tmp_path, lambda: now, capital=50000)
    working = [o for o in check.get_orders() if o.status is OPEN]
    assert sorted(o.id for o in working) == sorted(ids + child["ids"])
    assert len(working) <= 100  # 50,000 / 500
    funds = check.get_funds()
    assert funds.available == 50000 - 500 * len(working) >= 0


# ============================================================================
# C. Config
# ============================================================================


@pytest.mark.parametrize("account", ["../escape", "a/b", "a\\b", "caf\u00e9", "x" * 65, "", " ", ".", "..",
                                     "a\x00b", "tab\tname", 5, None])
def test_account_names_that_are_not_plain_file_names_are_refused(account: Any, tmp_path: Path, clients: list,
                                                                 paper_clock: FakeClock) -> None:
    with pytest.raises(tt.ConfigurationError, match="config 'account' must be 1-64 letters, digits"):
        open_paper(clients, tmp_path / "cache", paper_clock, account=account)
    assert not any(p.name.startswith("paper_") for p in tmp_path.rglob("*"))


def test_an_account_name_of_64_characters_names_its_file(tmp_path: Path, clients: list,
                                                         paper_clock: FakeClock) -> None:
    name = "A-_9" * 16
    client = open_paper(clients, tmp_path, paper_clock, account=name)
    assert client.get_profile().user_id == name
    assert account_file(tmp_path, name).is_file()


@pytest.mark.parametrize("capital", [True, "100000", None, float("inf"), float("nan"), -1, 0, 1.0000001e13,
                                     10 ** 400, [1000]])
def test_capital_that_is_not_an_amount_is_refused(capital: Any, tmp_path: Path, clients: list,
                                                  paper_clock: FakeClock) -> None:
    with pytest.raises(tt.ConfigurationError, match="config 'capital' must be a positive amount"):
        open_paper(clients, tmp_path, paper_clock, capital=capital)


def test_capital_below_one_paisa_is_refused(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    with pytest.raises(tt.ConfigurationError, match="config 'capital'"):
        open_paper(clients, tmp_path, paper_clock, capital=0.001)  # would be an account of 0 paise


def test_capital_that_differs_from_the_existing_account_is_not_silently_ignored(
        tmp_path: Path, clients: list, paper_clock: FakeClock, caplog: Any) -> None:
    open_paper(clients, tmp_path, paper_clock, capital=1000).close()
    caplog.set_level(logging.WARNING, logger="ttconnect")
    try:
        client = open_paper(clients, tmp_path, paper_clock, capital=5000)
    except tt.ConfigurationError as exc:
        assert "capital" in str(exc)
        return
    total = client.get_funds().total
    assert total == 5000.0 or any("capital" in r.getMessage() for r in caplog.records), (
        f"asked for capital 5000, got an account of {total} and no word about it")


@pytest.mark.parametrize("seed", [-1, 2 ** 100, "", "\u00fc\u00f1\u00ee", 10 ** 30, "0"])
def test_odd_seeds_work_and_are_deterministic(seed: Any, tmp_path: Path, clients: list,
                                              paper_clock: FakeClock) -> None:
    a = open_paper(clients, tmp_path / "a", paper_clock, seed=seed)
    b = open_paper(clients, tmp_path / "b", paper_clock, seed=seed)
    at = paper_clock() + 3600
    assert a._local.source.quote("NSE:SBIN", at) == b._local.source.quote("NSE:SBIN", at)
    order = a.get_order(a.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET"))
    assert order.status is COMPLETE and order.average_price > 0


@pytest.mark.parametrize("seed", [1.5, None, b"x", [1], float("nan"), False])
def test_seeds_that_are_not_int_or_str_are_refused(seed: Any, tmp_path: Path, clients: list,
                                                   paper_clock: FakeClock) -> None:
    with pytest.raises(tt.ConfigurationError, match="config 'seed' must be an int or a string"):
        open_paper(clients, tmp_path, paper_clock, seed=seed)


@pytest.mark.parametrize("instruments", ["DB", "database", "Bundled", None, 1])
def test_instruments_other_than_bundled_or_db_is_refused(instruments: Any, tmp_path: Path, clients: list,
                                                         paper_clock: FakeClock) -> None:
    with pytest.raises(tt.ConfigurationError, match="instruments"):
        open_paper(clients, tmp_path, paper_clock, instruments=instruments)


def test_prices_that_is_a_directory_is_refused(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    folder = tmp_path / "ticks"
    folder.mkdir()
    with pytest.raises(tt.ConfigurationError, match="tick file"):
        open_paper(clients, tmp_path, paper_clock, prices=str(folder))
    with pytest.raises(tt.ConfigurationError, match="'random'"):
        open_paper(clients, tmp_path, paper_clock, prices="RANDOM")


def test_prices_that_is_another_paper_client_is_refused(tmp_path: Path, clients: list,
                                                        paper_clock: FakeClock) -> None:
    other = open_paper(clients, tmp_path / "other", paper_clock)
    with pytest.raises(tt.ConfigurationError, match="not another paper one"):
        open_paper(clients, tmp_path, paper_clock, prices=other)


@pytest.mark.parametrize("key, value, words", [
    ("tick_interval", 0, "tick_interval"), ("tick_interval", float("nan"), "tick_interval"),
    ("tick_interval", True, "tick_interval"), ("tick_interval", 1e10, "tick_interval"), ("market_hours", 1, "market_hours"),
    ("replay_speed", float("nan"), "replay_speed"), ("replay_speed", "fast", "replay_speed"),
])
def test_odd_feed_options_are_refused(key: str, value: Any, words: str, tmp_path: Path, clients: list,
                                      paper_clock: FakeClock) -> None:
    with pytest.raises(tt.ConfigurationError, match=words):
        open_paper(clients, tmp_path, paper_clock, **{key: value})


def test_cache_dir_that_is_a_file_is_refused(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(tt.ConfigurationError, match="cache dir"):
        open_paper(clients, blocker, paper_clock)


# ============================================================================
# D. The clock
# ============================================================================


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e12, 1e20, -1e20])
def test_a_clock_giving_an_impossible_time_is_refused_at_init(value: float, tmp_path: Path, clients: list) -> None:
    with pytest.raises(tt.ConfigurationError, match="clock"):
        open_paper(clients, tmp_path, lambda: value)


class SwitchClock:
    """An aware-datetime clock whose later answers a test can replace."""

    def __init__(self, when: dt.datetime) -> None:
        self.answer: Any = when

    def __call__(self) -> Any:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.mark.parametrize("later", ["2026-12-02 10:00", None, RuntimeError("the time server is down")],
                         ids=["a string", "None", "raising"])
def test_a_clock_that_goes_bad_later_is_a_typed_error(later: Any, tmp_path: Path, clients: list) -> None:
    clock = SwitchClock(ist(2026, 12, 2, 10, 0))
    client = open_paper(clients, tmp_path, clock)
    order = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0)
    clock.answer = later
    with pytest.raises(tt.ConfigurationError, match="clock"):
        client.get_funds()
    clock.answer = ist(2026, 12, 2, 10, 0)
    assert client.get_order(order).status is OPEN


def test_a_clock_that_turns_naive_later_is_refused_not_misread(tmp_path: Path, clients: list) -> None:
    clock = SwitchClock(ist(2026, 12, 2, 10, 0))
    client = open_paper(clients, tmp_path, clock)
    order = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0)
    clock.answer = dt.datetime(2026, 12, 2, 10, 0)  # naive: which zone?
    with pytest.raises(tt.ConfigurationError, match="naive"):
        client.get_funds()
    clock.answer = ist(2026, 12, 2, 10, 0)
    assert client.get_order(order).status is OPEN  # not expired by a misread 15:30


def find_gap(source: Any, token: str, scan_from: float, placed: float) -> Optional[int]:
    """A limit (paise) the path reached between ``scan_from`` and ``placed`` but not in the 10 s
    after ``placed``: an order at it placed at ``placed`` must stay open for those 10 s."""
    steps = int((placed - scan_from) / 0.25)
    low = min(source.quote(token, scan_from + 0.25 * k).ask for k in range(1, steps))
    after = min(source.quote(token, placed + 0.25 * k).ask for k in range(0, 41))
    return low if after > low else None


def test_an_order_never_fills_at_a_price_from_before_it_was_placed(tmp_path: Path, clients: list) -> None:
    """An earlier order on the instrument was matched up to 10:01 and cancelled; a new one placed at
    11:00 must be matched from 11:00 on, not over the hour before it existed."""
    for seed in range(20):
        clock = FakeClock(ist(2026, 12, 2, 10, 0))
        client = paper_client(clients, tmp_path / str(seed), clock, seed=seed)
        start = clock()
        earlier = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0)
        clock.t = start + 60
        client.cancel_order(earlier)
        limit = find_gap(client._local.source, "NSE:SBIN", start + 60, start + 3600)
        if limit is not None:
            break
    else:
        pytest.fail("no seed gave a usable path")
    clock.t = start + 3600
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=limit / 100)
    clock.t = start + 3610
    order = client.get_order(order_id)
    assert (order.status, client.get_trades()) == (OPEN, [])


def test_a_clock_going_backwards_never_fills_an_order_before_it_was_placed(tmp_path: Path, clients: list) -> None:
    for seed in range(20):
        clock = FakeClock(ist(2026, 12, 2, 11, 0))
        client = paper_client(clients, tmp_path / str(seed), clock, seed=seed)
        placed = clock()
        limit = find_gap(client._local.source, "NSE:SBIN", placed - 3600, placed)
        if limit is not None:
            break
    else:
        pytest.fail("no seed gave a usable path")
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=limit / 100)
    clock.t = placed - 3600  # the clock steps back an hour
    client.get_funds()
    clock.t = placed + 10
    order = client.get_order(order_id)
    assert order.status is OPEN
    assert all(t.timestamp >= order.placed_at for t in client.get_trades())


def test_a_clock_going_back_over_a_day_roll_keeps_the_account_consistent(tmp_path: Path, clients: list,
                                                                         scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted, capital=100000)
    push(client, PAPER_SBIN, 900.0)
    first = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    clock.set(ist(2026, 12, 3, 10, 0))
    assert [(h.qty, h.avg_price) for h in client.get_holdings()] == [(10, 900.0)]
    clock.set(ist(2026, 12, 2, 14, 0))  # back across the roll
    funds = client.get_funds()
    assert (funds.total, funds.used) == (91000.0, 0.0)
    assert [(h.qty, h.avg_price) for h in client.get_holdings()] == [(10, 900.0)]
    second = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0)
    assert second != first and client.get_order(second).status is OPEN


# ============================================================================
# E. Orders, matching and money
# ============================================================================


@pytest.mark.parametrize("qty", [0, -1, 1.0, True, "1", None, 2.5, float("nan")])
def test_quantities_that_are_not_whole_units_are_refused(qty: Any, tmp_path: Path, clients: list,
                                                         paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    with pytest.raises(tt.InvalidOrderError, match="qty must be a positive whole number"):
        client.place_order(PAPER_SBIN, qty, "BUY", "CNC", "MARKET")
    assert client.get_orders() == []


def test_a_huge_quantity_with_a_price_is_refused_for_funds(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                           scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    with pytest.raises(tt.InsufficientFundsError, match="needs 900,000,000,000,000.00, available 1,000,000.00"):
        client.place_order(PAPER_SBIN, 10 ** 12, "BUY", "CNC", "MARKET")
    assert client.get_orders() == []


def test_a_huge_market_quantity_before_any_price_is_a_typed_error(tmp_path: Path, clients: list,
                                                                  paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)  # no price yet
    with pytest.raises(tt.InvalidOrderError):
        client.place_order(PAPER_SBIN, 10 ** 19, "BUY", "CNC", "MARKET")
    assert client.get_orders() == []


@pytest.mark.parametrize("price, words", [
    (0, "price must be positive"), (-1, "price must be positive"), (float("nan"), "price must be positive"),
    (float("inf"), "price must be positive"), ("abc", "is not a number"), (1e-9, "not a multiple of the tick"),
    (900.03, "use 900 or 900.05"), (10 ** 11, "beyond any listed price"), (True, "price must be a number"),
    ([900], "price must be a number"),
])
def test_prices_that_make_no_sense_are_refused(price: Any, words: str, tmp_path: Path, clients: list,
                                               paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    with pytest.raises(tt.InvalidOrderError, match=words):
        client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=price)
    assert client.get_orders() == [] and client.get_funds().available == 1000000.0


def test_orders_that_cannot_exist_are_refused(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                              scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    fut = nifty_future(client)
    expiry = client.expiries("NIFTY")[0]
    with pytest.raises(tt.InstrumentNotFoundError, match="strike 23525 not listed"):
        tt.Option(exchange="NFO", symbol="NIFTY", expiry=expiry, strike=23525, option_type="CE")
    with pytest.raises(tt.InvalidOrderError, match="indices cannot be traded"):
        client.place_order(NIFTY, 1, "BUY", "MIS", "MARKET")
    with pytest.raises(tt.InvalidOrderError, match="product CNC is for cash equities"):
        client.place_order(fut, 65, "BUY", "CNC", "MARKET")
    with pytest.raises(tt.InvalidOrderError, match="product NRML is for derivatives"):
        client.place_order(PAPER_SBIN, 1, "BUY", "NRML", "MARKET")
    with pytest.raises(tt.InvalidOrderError, match="IOC is for MARKET and LIMIT"):
        client.place_order(PAPER_SBIN, 1, "BUY", "MIS", "SL", price=906.0, trigger_price=905.0, validity="IOC")
    with pytest.raises(tt.InvalidOrderError, match="validity 'GTC' is not supported"):
        client.place_order(PAPER_SBIN, 1, "BUY", "MIS", "LIMIT", price=899.0, validity="GTC")
    with pytest.raises(tt.InvalidOrderError, match="MARKET orders take no price"):
        client.place_order(PAPER_SBIN, 1, "BUY", "MIS", "MARKET", price=900.0)
    with pytest.raises(tt.InvalidOrderError, match="lot size 65"):
        client.place_order(fut, 1, "BUY", "NRML", "MARKET")
    assert client.get_orders() == []


@pytest.mark.parametrize("order_type", ["MARKET", "LIMIT"])
def test_ioc_without_any_price_does_not_rest(order_type: str, tmp_path: Path, clients: list, paper_clock: FakeClock,
                                             scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)  # no price known yet
    price = 900.0 if order_type == "LIMIT" else None
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", order_type, price=price, validity="IOC")
    assert client.get_order(order_id).status is CANCELLED  # immediate or cancel: nothing to match now
    push(client, PAPER_SBIN, 899.0)
    assert client.get_order(order_id).status is CANCELLED and client.get_trades() == []


def test_a_short_option_without_an_underlying_price_is_not_margined_on_its_premium(
        tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    ce = paper_option(client)
    push(client, ce, 120.0)  # the option has a price, NIFTY has none yet
    with pytest.raises(tt.OrderError):  # 12% of the notional (~1.8 lakh) cannot fit in 10,000
        client.place_order(ce, 65, "SELL", "NRML", "MARKET")
    assert client.get_orders() == [] and client.get_funds().total == 10000.0


def test_the_margin_of_a_short_option_without_an_underlying_price_is_not_zero(
        tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    ce = paper_option(client)
    push(client, ce, 120.0)
    try:
        margin = client.calculate_margin([tt.OrderLeg(ce, 65, tt.Side.SELL, tt.ProductType.NRML,
                                                      tt.OrderType.LIMIT, price=120)])
    except tt.OrderError as exc:
        assert "NSE:NIFTY" in str(exc)  # no price for the underlying: says so
        return
    assert margin.total > 100000  # 12% of ~23,500 x 65 less the premium


def test_a_margin_leg_without_a_price_gives_advice_that_works(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                              scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    leg = tt.OrderLeg(PAPER_SBIN, 1, tt.Side.BUY, tt.ProductType.CNC, tt.OrderType.MARKET)
    with pytest.raises(tt.OrderError) as info:
        client.calculate_margin([leg])
    # A MARKET leg cannot be given a price (that is refused): the advice must name LIMIT.
    assert "LIMIT" in str(info.value)


@pytest.mark.parametrize("legs, words", [
    ([], "non-empty list"), ("NSE:SBIN", "non-empty list"), (None, "non-empty list"),
    ([{"instrument": PAPER_SBIN, "qty": 1, "side": "BUY", "product": "CNC", "order_type": "LIMIT", "price": 900,
       "bogus": 1}], "must have OrderLeg's fields"),
    ([tt.OrderLeg(NIFTY, 1, tt.Side.BUY, tt.ProductType.MIS, tt.OrderType.MARKET)], "indices cannot be traded"),
    ([tt.OrderLeg(PAPER_SBIN, 0, tt.Side.BUY, tt.ProductType.CNC, tt.OrderType.LIMIT, price=900)], "qty"),
    ([42], "OrderLeg or a dict"),
])
def test_margin_with_odd_legs_is_refused(legs: Any, words: str, tmp_path: Path, clients: list,
                                         paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    with pytest.raises(tt.InvalidOrderError, match=words):
        client.calculate_margin(legs)


def test_modify_cannot_sell_more_delivery_shares_than_are_held(tmp_path: Path, clients: list,
                                                               paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 5, "BUY", "CNC", "MARKET")
    sell = client.place_order(PAPER_SBIN, 5, "SELL", "CNC", "LIMIT", price=950.0)
    with pytest.raises(tt.InsufficientFundsError, match="can sell at most 5"):
        client.modify_order(sell, qty=50)
    assert client.get_order(sell).qty == 5
    push(client, PAPER_SBIN, 950.0)
    assert client.get_funds().total == 100000.0 - 5 * 900 + 5 * 950


def test_modify_to_a_quantity_that_does_not_fit_changes_nothing(tmp_path: Path, clients: list,
                                                                paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    push(client, PAPER_SBIN, 900.0)
    order_id = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=890.0)
    before = client.get_order(order_id)
    with pytest.raises(tt.InsufficientFundsError, match="needs 10,680.00, available 10,000.00"):
        client.modify_order(order_id, qty=12)
    after = client.get_order(order_id)
    assert (after.qty, after.price, after.status) == (before.qty, before.price, before.status) == (10, 890.0, OPEN)
    assert client.get_funds().available == 1100.0
    assert [h.status_message for h in client.get_order_history(order_id)] == [None]


def test_modify_sl_to_limit_and_back_keeps_exact_blocks_and_history(tmp_path: Path, clients: list,
                                                                    paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    push(client, PAPER_SBIN, 900.0)
    order_id = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "SL", price=906.0, trigger_price=905.0)
    assert client.get_funds().available == 100000 - 9060.0
    paper_clock.t += 1
    client.modify_order(order_id, order_type="LIMIT", price=890.0)
    order = client.get_order(order_id)
    assert (order.status, order.order_type, order.price, order.trigger_price) == (OPEN, tt.OrderType.LIMIT, 890.0,
                                                                                  None)
    assert client.get_funds().available == 100000 - 8900.0
    paper_clock.t += 1
    client.modify_order(order_id, order_type="SL", price=912.0, trigger_price=910.0)
    order = client.get_order(order_id)
    assert (order.status, order.price, order.trigger_price) == (TRIGGER_PENDING, 912.0, 910.0)
    assert client.get_funds().available == 100000 - 9120.0
    paper_clock.t += 1
    push(client, PAPER_SBIN, 910.0)
    order = client.get_order(order_id)
    assert (order.status, order.average_price) == (COMPLETE, 910.0)
    funds = client.get_funds()
    assert (funds.available, funds.total, funds.used) == (90900.0, 90900.0, 0.0)
    history = client.get_order_history(order_id)
    assert [(h.status, h.order_type.value) for h in history] == [
        (TRIGGER_PENDING, "SL"), (OPEN, "LIMIT"), (TRIGGER_PENDING, "SL"), (OPEN, "SL"), (COMPLETE, "SL")]
    times = [h.updated_at for h in history]
    assert times == sorted(times)


def test_modify_to_a_stop_that_would_fire_at_once_changes_nothing(tmp_path: Path, clients: list,
                                                                  paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    push(client, PAPER_SBIN, 900.0)
    order_id = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=890.0)
    with pytest.raises(tt.InvalidOrderError, match="would fire at once"):
        client.modify_order(order_id, order_type="SL", price=900.0, trigger_price=899.0)
    order = client.get_order(order_id)
    assert (order.status, order.order_type, order.price, order.trigger_price) == (OPEN, tt.OrderType.LIMIT, 890.0,
                                                                                  None)
    assert client.get_funds().available == 100000 - 8900.0


def test_modify_and_cancel_of_orders_that_cannot_change(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                        scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, account="mine")
    other = paper_client(clients, tmp_path, paper_clock, prices=scripted, account="theirs")
    push(client, PAPER_SBIN, 900.0)
    done = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET")
    gone = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0)
    client.cancel_order(gone)
    working = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0)
    for order_id, status in ((done, "COMPLETE"), (gone, "CANCELLED")):
        with pytest.raises(tt.OrderError, match=f"is {status}: only open orders can be modified"):
            client.modify_order(order_id, qty=2)
        with pytest.raises(tt.OrderError, match=f"is {status}: only open orders can be cancelled"):
            client.cancel_order(order_id)
    for call in (lambda: client.modify_order("261202999999999", qty=2),
                 lambda: client.cancel_order("261202999999999"),
                 lambda: other.cancel_order(working), lambda: other.modify_order(working, price=801.0),
                 lambda: other.get_order_history(working)):
        with pytest.raises(tt.OrderNotFoundError):
            call()
    for bad in ("../x", "", " ", "..", None, 5, "a/b", "\u0661\u0662"):
        with pytest.raises(tt.InvalidOrderError, match="order_id must be"):
            client.cancel_order(bad)  # type: ignore[arg-type]
    assert client.get_order(working).status is OPEN and client.get_order(working).price == 800.0


def test_market_orders_waiting_for_a_first_price_never_overdraw(tmp_path: Path, clients: list,
                                                                paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    ids = [client.place_order(PAPER_SBIN, 3, "BUY", "CNC", "MARKET") for _ in range(5)]  # no price yet
    push(client, PAPER_SBIN, 900.0)
    assert [client.get_order(i).status for i in ids] == [COMPLETE] * 3 + [REJECTED] * 2
    funds = client.get_funds()
    assert (funds.available, funds.total, funds.used) == (1900.0, 1900.0, 0.0)
    assert all("insufficient funds" in (client.get_order(i).status_message or "") for i in ids[3:])


def test_a_losing_intraday_position_can_still_be_closed(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                        scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=20000)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 100, "BUY", "MIS", "MARKET")  # blocks 18,000
    push(client, PAPER_SBIN, 500.0)  # a 40,000 loss
    exit_id = client.place_order(PAPER_SBIN, 100, "SELL", "MIS", "MARKET")  # reducing risk needs no funds
    assert client.get_order(exit_id).status is COMPLETE
    assert client.get_positions() == []


def test_the_1520_square_off_closes_mis_even_at_a_loss_beyond_the_cash(tmp_path: Path, clients: list,
                                                                       paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=20000)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 100, "BUY", "MIS", "MARKET")
    push(client, PAPER_SBIN, 500.0)
    paper_clock.set(ist(2026, 12, 2, 15, 21))
    assert [p for p in client.get_positions() if p.product is tt.ProductType.MIS] == []
    paper_clock.set(ist(2026, 12, 3, 10, 0))
    assert [p for p in client.get_positions() if p.product is tt.ProductType.MIS] == []  # never carried


def test_the_square_off_after_weeks_away_is_exact_and_fast(tmp_path: Path, clients: list) -> None:
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    client = paper_client(clients, tmp_path, clock)
    source = client._local.source
    start = clock()
    fut = nifty_future(client)
    sbin_ask, fut_ask = source.quote("NSE:SBIN", start).ask, source.quote(str(fut), start).ask
    mis = client.place_order(PAPER_SBIN, 10, "BUY", "MIS", "MARKET")
    cnc = client.place_order(PAPER_SBIN, 7, "BUY", "CNC", "MARKET")
    client.place_order(fut, 65, "BUY", "NRML", "MARKET")
    resting = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0)
    client.close()
    clock.set(ist(2026, 12, 23, 10, 0))  # three weeks later, the process started again
    began = time.monotonic()
    again = paper_client(clients, tmp_path, clock)
    funds = again.get_funds()
    assert time.monotonic() - began < 3.0
    square_off = source.quote("NSE:SBIN", ist(2026, 12, 2, 15, 20).timestamp())
    expected_cash = 1000000 * 100 - 7 * sbin_ask + 10 * (square_off.ltp - sbin_ask)  # squared off at the last price
    assert round(funds.total * 100) == expected_cash
    assert round(funds.used * 100) == -(-12 * 65 * fut_ask // 100)
    for order_id in (mis, cnc, resting):  # as at a real broker, the order book is today's
        with pytest.raises(tt.OrderNotFoundError, match="today"):
            again.get_order(order_id)
    (holding,) = again.get_holdings()
    assert (holding.instrument, holding.qty, round(holding.avg_price * 100)) == (PAPER_SBIN, 7, sbin_ask)
    assert [(p.instrument, p.qty, p.product) for p in again.get_positions()] == [(fut, 65, tt.ProductType.NRML)]
    assert again.get_orders() == [] and again.get_trades() == []


def test_a_clock_a_year_ahead_settles_everything_quickly(tmp_path: Path, clients: list) -> None:
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    client = paper_client(clients, tmp_path, clock)
    source = client._local.source
    fut = nifty_future(client)
    fut_ask = source.quote(str(fut), clock()).ask
    client.place_order(fut, 65, "BUY", "NRML", "MARKET")
    clock.set(ist(2027, 12, 2, 10, 0))
    began = time.monotonic()
    funds = client.get_funds()
    assert time.monotonic() - began < 3.0
    settle = source.quote(str(fut), tt._paper_expiry_epoch(fut.expiry))
    assert client.get_positions() == [] and funds.used == 0.0
    assert round(funds.total * 100) == 1000000 * 100 + 65 * (settle.ltp - fut_ask)  # at the settlement price


def test_a_worthless_option_settles_at_zero(tmp_path: Path, clients: list) -> None:
    clock = FakeClock(ist(2026, 12, 8, 10, 0))  # the weekly expiry
    client = paper_client(clients, tmp_path, clock)
    chain = client.option_chain("NIFTY", "2026-12-08")
    ce = max((o for o in chain if o.option_type is tt.OptionType.CE), key=lambda o: o.strike)
    spot = client._local.source.quote("NSE:NIFTY", tt._paper_expiry_epoch(ce.expiry)).ltp / 100
    assert spot < ce.strike  # far out of the money at expiry
    client.place_order(ce, 65, "BUY", "NRML", "MARKET")
    paid = client.get_funds().total
    clock.set(ist(2026, 12, 9, 10, 0))
    assert client.get_positions() == []
    assert client.get_funds().total == paid  # worth nothing: no 0.05 a unit paid out


def test_an_expired_option_settles_at_its_last_price_not_the_bid(tmp_path: Path, clients: list,
                                                                 scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 8, 10, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted, capital=200000)
    ce = paper_option(client)
    push(client, ce, 50.0)
    client.place_order(ce, 65, "BUY", "NRML", "MARKET")
    push(client, ce, 80.0, bid=79.0, ask=81.0)
    cash = client.get_funds().total
    clock.set(ist(2026, 12, 9, 9, 30))
    assert client.get_positions() == []
    assert client.get_funds().total == cash + 65 * 80.0


def test_an_expired_contract_cannot_be_traded_after_its_expiry(tmp_path: Path, clients: list) -> None:
    clock = FakeClock(ist(2026, 12, 8, 10, 0))
    client = paper_client(clients, tmp_path, clock)
    ce = paper_option(client)
    assert ce.expiry == dt.date(2026, 12, 8)
    clock.set(ist(2026, 12, 9, 10, 0))  # the same process, the next session
    with pytest.raises(tt.TTConnectError, match="expire"):
        client.place_order(ce, 65, "BUY", "NRML", "MARKET")
    assert client.get_orders() == []


def test_an_expired_short_option_does_not_block_margin_forever_after_a_restart(
        tmp_path: Path, clients: list, scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 8, 10, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    ce = paper_option(client)
    push(client, NIFTY, 23500.0)
    push(client, ce, 120.0)
    client.place_order(ce, 65, "SELL", "NRML", "MARKET")
    assert client.get_funds().used == 183300.0
    client.close()
    clock.set(ist(2026, 12, 9, 10, 0))
    again = paper_client(clients, tmp_path, clock, prices=scripted)
    funds = again.get_funds()
    shown = [p for p in again.get_positions() if str(p.instrument) == str(ce)]
    # settled (nothing blocked), or still shown so the blocked margin is explained and can be closed
    assert funds.used == 0.0 or shown, f"{funds.used} blocked by a position get_positions() does not show"


def test_cancel_all_orders_cancels_exactly_the_working_ones(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                            scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    push(client, PAPER_SBIN, 900.0)
    filled = client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    working = [client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=p) for p in (890.0, 880.0, 870.0)]
    working.append(client.place_order(PAPER_SBIN, 5, "SELL", "CNC", "SL_M", trigger_price=850.0))
    working.append(client.place_order(PAPER_SBIN, 2, "BUY", "MIS", "SL", price=921.0, trigger_price=920.0))
    gone = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=860.0)
    client.cancel_order(gone)
    cancelled, failed = client.cancel_all_orders()
    assert (sorted(cancelled), failed) == (sorted(working), [])
    assert {o.id: o.status for o in client.get_orders()} == {filled: COMPLETE, gone: CANCELLED,
                                                               **{i: CANCELLED for i in working}}
    funds = client.get_funds()
    assert (funds.available, funds.used, funds.total) == (91000.0, 0.0, 91000.0)
    assert client.cancel_all_orders() == ([], [])


def test_close_all_positions_closes_every_product_with_exact_ids_and_money(
        tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    ce, fut = paper_option(client), nifty_future(client)
    for inst, price in ((PAPER_SBIN, 900.0), (TCS, 3100.0), (fut, 23600.0), (ce, 120.0), (NIFTY, 23500.0)):
        push(client, inst, price)
    client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    client.place_order(TCS, 5, "SELL", "MIS", "MARKET")
    client.place_order(fut, 65, "BUY", "NRML", "MARKET")
    client.place_order(ce, 65, "SELL", "NRML", "MARKET")
    before = {o.id for o in client.get_orders()}
    for inst, price in ((PAPER_SBIN, 910.0), (TCS, 3090.0), (fut, 23650.0), (ce, 110.0)):
        push(client, inst, price)
    placed, failed = client.close_all_positions()
    assert failed == [] and len(placed) == 4 == len(set(placed))
    new = {o.id: o for o in client.get_orders() if o.id not in before}
    assert set(new) == set(placed)
    assert sorted((str(o.instrument), o.side.value, o.qty, o.status, o.average_price) for o in new.values()) == sorted([
        ("NSE:SBIN", "SELL", 10, COMPLETE, 910.0), ("NSE:TCS", "BUY", 5, COMPLETE, 3090.0),
        (str(fut), "SELL", 65, COMPLETE, 23650.0), (str(ce), "BUY", 65, COMPLETE, 110.0)])
    assert client.get_positions() == []
    funds = client.get_funds()
    pnl = 10 * 10 + 5 * 10 + 65 * 50 + 65 * 10
    assert (funds.available, funds.total, funds.used, funds.m2m_realized) == (1000000.0 + pnl, 1000000.0 + pnl, 0.0,
                                                                              pnl)
    assert client.close_all_positions() == ([], [])


def test_a_sliced_order_that_runs_out_of_funds_names_exactly_the_slices_placed(
        tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=20000)
    ce = paper_option(client)
    push(client, ce, 10.0)
    with pytest.raises(tt.OrderError) as info:
        client.place_order(ce, 3510, "BUY", "NRML", "MARKET", slice=True)  # two slices of 1,755
    orders = client.get_orders()
    assert [(o.qty, o.status) for o in orders] == [(1755, COMPLETE)]
    assert info.value.placed_ids == [orders[0].id]
    assert client.get_funds().total == 20000 - 17550.0


def test_order_history_is_oldest_first_with_each_change(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                        scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 20, "BUY", "CNC", "MARKET")
    paper_clock.t += 1
    stop = client.place_order(PAPER_SBIN, 10, "SELL", "CNC", "SL", price=893.0, trigger_price=894.0)
    paper_clock.t += 1
    client.modify_order(stop, price=894.0, trigger_price=895.0)
    paper_clock.t += 1
    push(client, PAPER_SBIN, 895.0)
    history = client.get_order_history(stop)
    assert [(h.status, h.trigger_price, h.price, h.status_message) for h in history] == [
        (TRIGGER_PENDING, 894.0, 893.0, None), (TRIGGER_PENDING, 895.0, 894.0, "modified"),
        (OPEN, 895.0, 894.0, "triggered"), (COMPLETE, 895.0, 894.0, None)]
    assert [h.updated_at.timestamp() - PAPER_DAY.timestamp() for h in history] == [1.0, 2.0, 3.0, 3.0]
    assert {h.id for h in history} == {stop} and history[-1].average_price == 895.0


# ============================================================================
# F. Tick files
# ============================================================================

T0_MS = int(PAPER_DAY.timestamp() * 1000)


def tick_line(ltp: Any, i: int = 0, instrument: str = "NSE:SBIN", **extra: Any) -> Dict[str, Any]:
    return {"instrument": instrument, "ts": T0_MS + 1000 * i, "mode": "ltp", "ltp": ltp, **extra}


def tick_file(path: Path, lines: List[Any]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def stream(client: tt.TTConnect, want: int, timeout: float = 5.0, mode: str = "ltp") -> List[float]:
    """The ltps of the first ``want`` ticks of SBIN (fewer if the feed gives no more in time)."""
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode=mode)
    got: List[float] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            got.append(ticks.get(timeout=max(0.01, min(0.25, deadline - time.monotonic()))).ltp)
        except queue.Empty:
            pass
    return got


def test_a_tick_file_of_junk_lines_delivers_exactly_its_good_ticks(tmp_path: Path, clients: list,
                                                                   paper_clock: FakeClock) -> None:
    path = tick_file(tmp_path / "ticks.jsonl", [
        tick_line(901.0, 0), "", "   ", "garbage{", "[1, 2, 3]", '"a string"', "null", "{}",
        '{"instrument": "NSE:SBIN", "ts": 1, "ltp": NaN}', tick_line(-5, 1), tick_line(0, 1), tick_line("abc", 1),
        tick_line(None, 1), {"instrument": ["x"], "ts": 1, "ltp": 3}, {"instrument": 7, "ts": 1, "ltp": 3},
        {"ts": 5, "ltp": 1}, {"instrument": "NSE:SBIN", "ltp": 900}, {"instrument": "NSE:SBIN", "ts": "x", "ltp": 900},
        tick_line(900.0, 1, mode="weird"), tick_line(900.0, 1, mode="full", bids=[[1, 2]]),
        tick_line(902.0, 2), b"\x00\x01\x02\x03", tick_line(1.0, 3, instrument="NSE:NOSUCH"),
        tick_line(1.0, 3, instrument="garbage"), tick_line(903.0, 4),
    ])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    assert stream(client, 3, timeout=2.0) == [901.0, 902.0, 903.0]
    assert client.stream_stats()["reconnects"] == 0


def test_a_tick_file_field_of_an_odd_type_is_read_as_a_plain_one_would_be(tmp_path: Path, clients: list,
                                                                         paper_clock: FakeClock, caplog: Any) -> None:
    """The replay takes a plain line (one JSON value to the newline, an int ts, a float ltp in
    range, no times) without its general checks: every other shape gets them all, so these
    lines are kept or skipped as json.loads and the checks say. Each line is known by its volume."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    last_ms = int(dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000) - 1
    first_ms = int(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)
    lines: List[Any] = [  # (line, kept)
        (tick_line(900.0, volume=0), True),
        (tick_line(900.0, ts=float(T0_MS), volume=1), True),  # a float ts
        (tick_line(900.0, ts=first_ms, volume=2), True), (tick_line(900.0, ts=last_ms, volume=3), True),
        (tick_line(900.0, ts=first_ms - 1, volume=4), False), (tick_line(900.0, ts=last_ms + 1, volume=5), False),
        (tick_line(900.0, ts=True, volume=6), False), (tick_line(900.0, ts=str(T0_MS), volume=7), False),
        (tick_line(900.0, ts=0, volume=8), False), (tick_line(900.0, ts=None, volume=9), False),
        (tick_line(900.0, ts=[T0_MS], volume=10), False),
        (tick_line(900, volume=11), True), (tick_line("900.5", volume=12), False),  # an int; text is no number
        (tick_line(0.01, volume=13), True), (tick_line(0.009, volume=14), False), (tick_line(1e11, volume=15), False),
        (tick_line(-900.0, volume=16), False), ('{"instrument": "NSE:SBIN", "ts": %d, "ltp": Infinity, "volume": 17}'
                                               % T0_MS, False),
        (tick_line(900.0, last_trade_time=None, exchange_time=0, volume=18), True),
        (tick_line(900.0, last_trade_time=T0_MS - 1000, volume=19), True),
        (tick_line(900.0, last_trade_time="x", volume=20), False), (tick_line(900.0, exchange_time=1, volume=21), False),
        ("  " + json.dumps(tick_line(900.0, volume=22)) + " \t", True),  # blanks around the value: json.loads's
        (json.dumps(tick_line(900.0, volume=23)) + "\r", True),
        (json.dumps(tick_line(900.0, volume=24)) + " x", False), (json.dumps(tick_line(900.0, volume=25)) * 2, False),
        (json.dumps(tick_line(900.0, volume=26)) + " {}", False),
        ("\ufeff" + json.dumps(tick_line(900.0, volume=27)), False),  # a byte-order mark: json.loads refuses it
        (tick_line(910.0, volume=28), True),  # the end
    ]
    path = tmp_path / "ticks.jsonl"
    tick_file(path, [line for line, _ in lines])
    with open(path, "ab") as f:
        f.write(json.dumps(tick_line(911.0, volume=29)).encode())  # a last line without its newline
    client = paper_client(clients, tmp_path, paper_clock, prices=str(path))
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode="full")
    got = [ticks.get(timeout=5)]
    while got[-1].volume != 29:
        got.append(ticks.get(timeout=5))
    assert [t.volume for t in got] == [i for i, (_, kept) in enumerate(lines) if kept] + [29]
    by_volume = {t.volume: t for t in got}
    assert by_volume[11].ltp == 900.0 and type(by_volume[11].ltp) is float
    assert by_volume[1].exchange_time is None and by_volume[18].last_trade_time is None
    assert by_volume[19].last_trade_time == PAPER_DAY - dt.timedelta(seconds=1)
    skipped = {int(m.group(1)) - 1 for r in caplog.records
               for m in [re.match(r"paper replay: skipped line (\d+) of ", r.getMessage())] if m}
    assert skipped == {i for i, (_, kept) in enumerate(lines) if not kept}  # each named by its line number
    assert client.get_positions() == [] and client.stream_stats()["reconnects"] == 0


@pytest.mark.parametrize("batch", [256, 1])  # read in a batch (the inline path) and line by line
def test_a_tick_file_field_that_is_no_number_skips_its_line_by_name(batch: int, tmp_path: Path, clients: list,
                                                                      paper_clock: FakeClock, caplog: Any,
                                                                      monkeypatch: Any) -> None:
    """A tick's numbers are JSON numbers: text, a bool, a list, an object or NaN skips the line
    with a warning naming the field (they reached the Tick as they were, and the CLI's table
    failed on them). Numbers are kept as JSON has them."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    monkeypatch.setattr(tt._PaperReplaySource, "_BATCH", batch)
    bad = [("change", "x"), ("volume", "lots"), ("oi", [1]), ("close", {"a": 1}), ("volume", True), ("ltp", True),
           ("high", {}), ("volume", False), ("change", float("nan")), ("low", float("-inf"))]
    lines: List[Any] = [tick_line(900.0 + i, i, mode="quote", **{field: value})
                        if field != "ltp" else tick_line(value, i) for i, (field, value) in enumerate(bad)]
    good = [tick_line(950.0, 20, mode="quote", volume=7.0, close=940, change=1.06),  # numbers as JSON has them
            tick_line(951.0, 21, mode="full", bids=[[950.5, 10, 2]], asks=[[951.5, 5, 1]])]
    bad_depth = [tick_line(952.0, 22, mode="full", bids=[[950.5, 10, {"n": 2}]]),
                 tick_line(953.0, 23, mode="full", bids=[["950.5", 10, 2]]), tick_line(954.0, 24, mode="full",
                                                                                 asks=[[951.0, True, 1]])]
    path = tick_file(tmp_path / "ticks.jsonl", lines + good + bad_depth + [tick_line(960.0, 30, volume=END)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    got = replayed(client)
    assert [t.ltp for t in got] == [950.0, 951.0, 960.0]
    assert (got[0].volume, got[0].close, got[0].change) == (7.0, 940, 1.06)
    assert got[1].bids == (tt.DepthLevel(950.5, 10, 2),) and got[1].asks == (tt.DepthLevel(951.5, 5, 1),)
    warnings = [r.getMessage() for r in caplog.records if "skipped line" in r.getMessage()]
    assert len(warnings) == len(bad) + len(bad_depth)
    for (field, value), warning in zip(bad, warnings):
        assert f"{field} " in warning or value != value or value == float("-inf"), warning
        assert "is no number" in warning, warning
    assert [w.split("(")[1].split()[1] for w in warnings[len(bad):]] == ["depth", "depth", "depth"]


END = 999_999  # the volume of the last line of a file the tests below replay


def replayed(client: tt.TTConnect, mode: str = "full") -> List[tt.Tick]:
    """Every tick of SBIN the file gives, up to the one of volume END."""
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode=mode)
    got = [ticks.get(timeout=5)]
    while got[-1].volume != END:
        got.append(ticks.get(timeout=5))
    return got


def tick_fields(tick: tt.Tick) -> List[Tuple[str, Any, type]]:
    """Every field of a tick with its type: 900 and 900.0 are equal, but not the same reading."""
    return [(f.name, getattr(tick, f.name), type(getattr(tick, f.name))) for f in dataclasses.fields(tick)]


def skipped_lines(caplog: Any) -> List[int]:
    return [int(m.group(1)) for r in caplog.records
            for m in [re.match(r"paper replay: skipped line (\d+) of ", r.getMessage())] if m]


def spy_batches(monkeypatch: Any, run: str = "batches") -> List[bool]:
    """Whether each batch of the replay was decoded as one JSON array (False: line by line).
    ``run`` "one by one": no batch is decoded whole (each line is read alone)."""
    decoded: List[bool] = []
    records = tt._PaperReplaySource._records

    def spy(self: Any, joined: str, count: int) -> Any:
        out = records(self, joined, count) if run == "batches" else None
        if run == "batches":
            decoded.append(out is not None)
        return out

    monkeypatch.setattr(tt._PaperReplaySource, "_records", spy)
    return decoded


def test_a_tick_file_read_in_batches_gives_what_its_lines_give_one_by_one(tmp_path: Path, clients: list,
                                                                         paper_clock: FakeClock, caplog: Any,
                                                                         monkeypatch: Any) -> None:
    """A batch of lines is decoded as one JSON array, and its common records are read inline,
    only where that is what each line gives alone: the same ticks (each field, each type), the
    same warnings and line numbers, the same fills, whatever the lines hold. Batches of 4 lines
    here, so that some are decoded whole and some line by line. Each line is known by its volume."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    monkeypatch.setattr(tt._PaperReplaySource, "_BATCH", 4)
    deep = '{"a": ' * 100_000  # no "[": the batch's decoder goes too deep, as the line's does
    last_ms = int(dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000) - 1
    first_ms = int(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)
    lines: List[Any] = [
        tick_line(901.0, volume=0, mode="quote", close=890.0, change=1.2, oi=None),
        tick_line(902.0, volume=1, ts=float(T0_MS)), tick_line(903, volume=2), tick_line("903.5", volume=3),
        tick_line(904.0, volume=4, mode=None), {"instrument": "NSE:SBIN", "ts": T0_MS, "ltp": 904.5, "volume": 5},
        '{"instrument": "NSE:SBIN", "ts": %d, "\\u006ctp": 905.0, "volume": 6}' % T0_MS,  # an escaped key
        '{"instrument": "NSE:SBIN", "ts": %d, "ltp": 1.0, "ltp": 905.5, "volume": 7}' % T0_MS,  # the last one counts
        tick_line(906.0, volume=8, note="}{ ,{", meta={"a": {"b": None}}), tick_line(906.5, volume=9, bids=5),
        tick_line(907.0, volume=10, instrument={"a": 1}), tick_line(907.5, volume=11, instrument="NSE:NOSUCH"),
        tick_line(908.0, volume=12, last_trade_time=None, exchange_time=T0_MS), tick_line(908.5, volume=13, bids=[]),
        tick_line(float("nan"), volume=14), '{"instrument": "NSE:SBIN", "ltp": 909.5, "volume": 15}',
        tick_line(910.0, volume=16, note="[x]"), "", json.dumps(tick_line(910.5, volume=18)) + "\r",
        "  " + json.dumps(tick_line(911.0, volume=19)), "\ufeff" + json.dumps(tick_line(911.5, volume=20)),
        deep, tick_line(912.0, volume=22), '{"instrument": "NSE:SBIN", "ts": 1%s, "ltp": 912.5}' % ("0" * 5000),
        tick_line(913.0, volume=24, mode="full", bids=[[912.9, 10, 1]], asks=[[913.1, 5, 2]]),
        tick_line(913.5, volume=25, last_trade_time=T0_MS - 1000, mode="quote"), tick_line(914.0, volume=26),
        tick_line(914.5, volume=27), tick_line(915.0, volume=28, ts=first_ms - 1),
        tick_line(915.0, volume=29, ts=last_ms + 1), tick_line(915.0, volume=30, ts=last_ms), tick_line(915.0, volume=31, ts=True), tick_line(0.009, volume=32),
        tick_line(1e11, volume=33), tick_line(0.01, volume=34), tick_line(float("inf"), volume=35),
        tick_line(916.0, volume=36, mode="weird"), tick_line(916.0, volume=37, exchange_time=1),
        tick_line(916.0, volume=38, last_trade_time=0), tick_line(916.0, volume=39, ts=str(T0_MS)),
        tick_line(916.5, volume=40, last_trade_time=T0_MS - 1000), tick_line(916.5, volume=41, asks=5),
    ]
    path = tmp_path / "ticks.jsonl"
    tick_file(path, lines)
    with open(path, "ab") as f:
        f.write(json.dumps(tick_line(917.0, volume=END)).encode())  # a last line without its newline
    runs = []
    for run in ("batches", "one by one"):
        caplog.clear()
        decoded = spy_batches(monkeypatch, run)
        client = paper_client(clients, tmp_path / run, paper_clock, prices=str(path))
        buy = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=904.0)
        sell = client.place_order(PAPER_SBIN, 1, "SELL", "MIS", "LIMIT", price=912.0)
        got = replayed(client)
        fills = [(o.status, o.average_price) for o in map(client.get_order, (buy, sell))]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        runs.append(([tick_fields(t) for t in got], warnings, client._local.source.unknown, fills))
        if run == "batches":
            assert True in decoded and False in decoded  # both ways were taken
        client.close()
    assert runs[0] == runs[1]
    ticks, _, unknown, fills = runs[0]
    skipped = skipped_lines(caplog)
    volumes = [dict((name, value) for name, value, _ in t)["volume"] for t in ticks]
    assert volumes == [0, 1, 2, 5, 6, 7, 8, 12, 13, 16, 18, 19, 22, 24, 25, 26, 27, 30, 34, 38, 40, END]  # 3: "903.5"
    assert skipped == [4, 5, 10, 11, 15, 16, 18, 21, 22, 24, 29, 30, 32, 33, 34, 36, 37, 38, 40, 42] and unknown == 1
    assert fills == [(COMPLETE, 901.0), (COMPLETE, 912.0)]
    by_volume = {dict((n, v) for n, v, _ in t)["volume"]: dict((n, (v, k)) for n, v, k in t) for t in ticks}
    assert by_volume[2]["ltp"] == (903.0, float)
    assert by_volume[6]["ltp"] == (905.0, float) and by_volume[7]["ltp"] == (905.5, float)
    assert by_volume[0]["close"] == (890.0, float) and by_volume[0]["mode"] == ("quote", str)
    assert by_volume[5]["mode"] == ("full", str) and by_volume[24]["_depth"][0] is not None
    assert by_volume[40]["_last_trade_epoch"] == (T0_MS / 1000 - 1, float)


@pytest.mark.parametrize("first, second, joiner, extra", [
    ('{"instrument": "NSE:SBIN", "ts": %d, "mode": "ltp", "volume": 1' % T0_MS, '"ltp": 905.0}', ",", 2),
    ('{"instrument": "NSE:SBIN", "ts": %d, "mode": "ltp", "volume": 1' % T0_MS, '  "ltp": 905.0}', ",", 2),
    ('{"instrument": "NSE:SBIN", "ts": %d, "mode": "ltp", "ltp": 905.0, "volume": 1, "x": [1' % T0_MS, '{"y": 2}]}',
     ",null,", 3),
], ids=["an object over two lines", "a key after blanks", "an array over two lines"])
def test_tick_file_lines_that_make_one_value_only_when_joined_are_skipped(first: str, second: str, joiner: str,
                                                                          extra: int, tmp_path: Path, clients: list,
                                                                          paper_clock: FakeClock, caplog: Any,
                                                                          monkeypatch: Any) -> None:
    """Two broken lines that join into one tick inside a JSON array (joined by ``joiner``), and a
    line of ``extra`` ticks that makes the count of values what it would be for one value a line:
    each is skipped, as it is read alone, and none of their prices reaches an order."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    several = ", ".join(json.dumps(tick_line(906.0 + i, volume=2 + i)) for i in range(extra))
    lines = [json.dumps(tick_line(901.0, volume=0)), first, second, several, json.dumps(tick_line(902.0, volume=END))]
    joined = json.loads("[" + joiner.join(line + "\n" for line in lines) + "]")
    per_line = 1 if joiner == "," else 2  # the values a line and its joiner would give
    assert len(joined) == per_line * len(lines) - per_line + 1  # what a line-a-value batch has
    assert [v["ltp"] for v in joined if isinstance(v, dict)][1] == 905.0  # the two lines, read as one tick
    decoded = spy_batches(monkeypatch)
    client = paper_client(clients, tmp_path, paper_clock, prices=tick_file(tmp_path / "ticks.jsonl", lines))
    order_id = client.place_order(PAPER_SBIN, 1, "SELL", "MIS", "LIMIT", price=904.0)
    assert [t.ltp for t in replayed(client, mode="ltp")] == [901.0, 902.0]
    assert decoded[0] is False and skipped_lines(caplog) == [2, 3, 4]
    assert client.get_order(order_id).status is OPEN


@pytest.mark.parametrize("bad, whole", [
    (json.dumps(tick_line(906.0, volume=1)) + ", " + json.dumps(tick_line(907.0, volume=2)), False),
    ("{}, {}", False), ("null, null", False), (json.dumps(tick_line(906.0, volume=1)) + "]", False),
    ("7", True), ('"NSE:SBIN"', True), ("null", True), ("  {}  ", True),
], ids=["two ticks", "two objects", "two nulls", "a closing bracket", "a number", "a string", "null", "blanks"])
def test_a_tick_file_line_of_no_single_object_is_read_in_a_batch_as_alone(bad: str, whole: bool, tmp_path: Path,
                                                                          clients: list, paper_clock: FakeClock,
                                                                          caplog: Any, monkeypatch: Any) -> None:
    """Such a line, the first of its batch or the last, is skipped with the warning it gets
    alone. A line of one value is decoded with its batch (``whole``), a line of two or of a
    stray "]" makes its batch be read line by line."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    monkeypatch.setattr(tt._PaperReplaySource, "_BATCH", 2)
    path = tick_file(tmp_path / "ticks.jsonl", [bad, tick_line(901.0, volume=0), tick_line(902.0, volume=3), bad,
                                                tick_line(903.0, volume=END)])
    runs = []
    for run in ("batches", "one by one"):
        caplog.clear()
        decoded = spy_batches(monkeypatch, run)
        client = paper_client(clients, tmp_path / run, paper_clock, prices=path)
        got = [(t.ltp, t.volume) for t in replayed(client, mode="ltp")]
        runs.append((got, [r.getMessage() for r in caplog.records]))
        assert decoded == ([whole, whole, True] if run == "batches" else [])
        client.close()
    assert runs[0] == runs[1] and runs[0][0] == [(901.0, 0), (902.0, 3), (903.0, END)]
    assert skipped_lines(caplog) == [1, 4]


@pytest.mark.parametrize("odd", [
    ["7", tick_line(901.5, volume={})],  # no object: the other line's empty object is not made up for
    [tick_line(901.5, volume={}), "7"],
    [tick_line(901.5, volume="12"), tick_line(901.6, instrument="NSE:NOSUCH", volume=4)],  # text beside an unlisted line
    [tick_line(901.5, instrument="NSE:NOSUCH", note='a "quoted" {} text'), tick_line(901.6, volume=4)],
    [tick_line(901.5, instrument="NSE:NOSUCH", flag=True), tick_line(901.6, volume=4)],
    ['{"instrument": "NSE:SBIN", "ts": %d, "mode": "ltp", "ltp": 901.5, "volume": 5, "volume": "5"}' % T0_MS,
     tick_line(901.6, volume=4)],
    ['{"instrument": "NSE:SBIN", "ts": %d, "mode": "ltp", "ltp": 901.5, "volume": 5, "note": "\\"\\""}' % T0_MS,
     tick_line(901.6, volume=4)],
], ids=["no object first", "no object last", "text", "an unlisted line's text", "an unlisted line's bool",
        "a duplicate key", "escaped quotes"])
def test_a_batch_read_whole_gives_what_its_lines_give_alone_whatever_they_hold(
        odd: List[Any], tmp_path: Path, clients: list, paper_clock: FakeClock, caplog: Any, monkeypatch: Any) -> None:
    """A batch's plain records are read without _record only where the batch's own counts (its
    quotes, its braces) show that no line holds more than a plain record: one line cannot make up
    for another's text or empty object. Each batch (4 lines) gives what its lines give alone."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    monkeypatch.setattr(tt._PaperReplaySource, "_BATCH", 4)
    first = [tick_line(900.5, instrument="NSE:NOSUCH"), tick_line(901.0, volume=0), tick_line(901.2, volume=7),
             tick_line(901.3, volume=8)]  # a batch of its own: NOSUCH is known as unlisted from here on
    lines = [*first, *odd, tick_line(902.0, volume=1), tick_line(903.0, volume=2), tick_line(904.0, volume=3),
             tick_line(905.0, volume=6), tick_line(906.0, volume=END)]
    path = tick_file(tmp_path / "ticks.jsonl", lines)
    runs = []
    for run in ("batches", "one by one"):
        caplog.clear()
        decoded = spy_batches(monkeypatch, run)
        client = paper_client(clients, tmp_path / run, paper_clock, prices=path)
        got = replayed(client)
        runs.append(([tick_fields(t) for t in got], [r.getMessage() for r in caplog.records],
                     client._local.source.unknown))
        assert decoded == ([True, True, True] if run == "batches" else [])
        client.close()
    assert runs[0] == runs[1]
    assert all(type(v) in (int, float, type(None)) for t in runs[0][0] for name, v, _ in t
               if name in tt._RECORD_FIELDS)  # no text, bool or object reached a tick
    assert [dict((n, v) for n, v, _ in t)["volume"] for t in runs[0][0]][-5:] == [1, 2, 3, 6, END]


@pytest.mark.parametrize("price", [1.15, 2.45, 0.55, 1.1, 4.35, 8.2])  # each * 100 is no whole number in a float
@pytest.mark.parametrize("side", ["BUY", "SELL"])
@pytest.mark.parametrize("hair", [0, 1e-7])  # the price itself, or a hair on the far side: its paise are the limit's
def test_a_replayed_last_price_at_a_limit_fills_it_though_its_float_is_off_by_a_hair(
        price: float, side: str, hair: float, tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    """A book's quiet band (last prices that move none of its orders, looked at without a call)
    leaves a price that rounds to a limit's paise to the full test: the limit fills at the tick
    that reaches it, at the limit, not before, not after."""
    step = 0.05 if side == "BUY" else -0.05
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(round(price + 2 * step, 2), 0, volume=0),
                                                tick_line(round(price + step, 2), 1, volume=1),
                                                tick_line(price + hair * step, 2, volume=2),
                                                tick_line(round(price - step, 2), 3, volume=3),
                                                tick_line(round(price + step, 2), 4, volume=END)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    order_id = client.place_order(PAPER_SBIN, 1, side, "MIS", "LIMIT", price=price)
    updates: "queue.Queue[tt.Order]" = queue.Queue()
    client.on_order_update = updates.put
    seen = [t.volume for t in replayed(client, mode="ltp")]
    assert seen == [0, 1, 2, 3, END]
    order = client.get_order(order_id)
    assert (order.status, order.average_price) == (COMPLETE, price)
    trade, = client.get_trades()
    assert trade.avg_price == price and trade.timestamp == PAPER_DAY + dt.timedelta(seconds=2)


def test_a_deeply_nested_line_is_read_alone_as_in_its_batch(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                           caplog: Any, monkeypatch: Any) -> None:
    """Lines nested about as deep as the decoder goes, blanks around them: each is read alone
    (one level less deep) wherever its batch reads it. On 3.11 json.loads's own frames made one
    depth fail alone that its batch read."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    monkeypatch.setattr(tt._PaperReplaySource, "_BATCH", 1)  # each line a batch: one level deeper than alone
    head = ' {"instrument": "NSE:SBIN", "ts": %d, "mode": "ltp", "ltp": 900.0, "volume": %d, "x": '
    lines = [head % (T0_MS, depth) + '{"a": ' * depth + "1" + "}" * depth + "} " for depth in range(900, 1001)]
    path = tick_file(tmp_path / "ticks.jsonl", [*lines, tick_line(901.0, volume=END)])
    runs = []
    for run in ("batches", "one by one"):  # no spy on the batches: a frame more would move the limit
        caplog.clear()
        if run == "one by one":
            monkeypatch.setattr(tt._PaperReplaySource, "_records", lambda self, joined, count: None)
        client = paper_client(clients, tmp_path / run, paper_clock, prices=path)
        runs.append(([t.volume for t in replayed(client, mode="ltp")], skipped_lines(caplog)))
        client.close()
    assert runs[0] == runs[1]
    assert runs[0][0][0] == 900 and runs[0][0][-1] == END


def test_a_tick_after_the_account_was_read_again_mid_batch_meets_the_new_books(
        tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    """Another client's order, read in when a fill found the log moved on, is matched by the
    rest of the same batch: the fill does not wait for the next batch, or miss its price."""
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(400.0, 0, instrument="NSE:ITC"), tick_line(904.0, 1, volume=1),
                                                tick_line(910.0, 2, volume=END)])
    mine = paper_client(clients, tmp_path, paper_clock, prices=path)
    other = paper_client(clients, tmp_path, paper_clock, prices=path)  # the same account, not streaming
    itc = mine.place_order(tt.Equity(exchange="NSE", symbol="ITC"), 1, "BUY", "MIS", "LIMIT", price=401.0)
    theirs = other.place_order(PAPER_SBIN, 1, "BUY", "MIS", "LIMIT", price=905.0)  # unknown to mine until it reads
    assert [t.volume for t in replayed(mine, mode="ltp")] == [1, END]
    assert (mine.get_order(itc).status, mine.get_order(itc).average_price) == (COMPLETE, 400.0)
    assert (mine.get_order(theirs).status, mine.get_order(theirs).average_price) == (COMPLETE, 904.0)
    assert other.get_order(theirs).average_price == 904.0


def test_a_paced_replay_keeps_the_rest_of_its_batch_for_later(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                             monkeypatch: Any) -> None:
    """A paced replay parses a batch at once and delivers it tick by tick as each falls due."""
    monkeypatch.setattr(tt._PaperReplaySource, "_BATCH", 2)
    path = tick_file(tmp_path / "ticks.jsonl", [{**tick_line(901.0 + i, volume=i), "ts": T0_MS + 60 * i}
                                                for i in range(4)] + [tick_line(990.0, 1, volume=END)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path, replay_speed=1)
    began = time.monotonic()
    got = replayed(client, mode="ltp")
    assert [t.ltp for t in got] == [901.0, 902.0, 903.0, 904.0, 990.0]
    assert 0.9 <= time.monotonic() - began < 5.0  # the last tick is 1 s of file time after the first


def test_the_ticks_after_one_whose_fill_failed_are_still_replayed(tmp_path: Path, clients: list,
                                                                  paper_clock: FakeClock, caplog: Any) -> None:
    """An error in the fill of one tick ends its feed frame (the stream reconnects); the rest of
    its batch is replayed after it, as the lines after it in the file were."""
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(901.0, 0, volume=0), tick_line(902.0, 1, volume=1),
                                                tick_line(903.0, 2, volume=END)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=905.0)
    engine = client._local
    on_quote = engine.on_quote
    failed: List[float] = []

    def failing_once(token: str, quote: Any) -> None:
        if not failed:
            failed.append(quote.ltp)
            raise RuntimeError("a fill's bug")
        on_quote(token, quote)

    engine.on_quote = failing_once
    got = replayed(client, mode="ltp")
    assert failed == [90100] and [t.volume for t in got] == [1, END]
    assert (client.get_order(order_id).status, client.get_order(order_id).average_price) == (COMPLETE, 902.0)


def test_a_full_tick_replayed_to_a_lesser_mode_keeps_only_that_modes_fields(tmp_path: Path, clients: list,
                                                                           paper_clock: FakeClock) -> None:
    full = tick_line(900.0, mode="full", last_qty=5, avg_price=899.5, volume=END, buy_qty=10, sell_qty=20, open=890.0,
                     high=905.0, low=889.0, close=895.0, change=0.5, oi=7, oi_day_high=8, oi_day_low=6,
                     last_trade_time=T0_MS - 1000, exchange_time=T0_MS, bids=[[899.9, 10, 1]], asks=[[900.1, 5, 2]])
    path = tick_file(tmp_path / "ticks.jsonl", [full])
    got: Dict[str, tt.Tick] = {}
    for mode in ("full", "quote", "ltp"):
        client = paper_client(clients, tmp_path / mode, paper_clock, prices=path)
        ticks: "queue.Queue[tt.Tick]" = queue.Queue()
        client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode=mode)
        got[mode] = ticks.get(timeout=5)
        client.close()
    expected = {  # the fields of each mode; every other one as a tick of that mode has it
        "quote": dataclasses.replace(got["full"], mode="quote", oi=None, oi_day_high=None, oi_day_low=None,
                                     _last_trade_epoch=0, _exchange_epoch=0, _depth=None),
        "ltp": tt.Tick(instrument=got["full"].instrument, mode="ltp", ltp=900.0),
    }
    for mode in ("quote", "ltp"):
        assert tick_fields(got[mode]) == tick_fields(expected[mode])
    assert got["full"].bids[0].price == 899.9 and got["quote"].bids == () and got["quote"].volume == END
    assert got["quote"].last_trade_time is None and got["ltp"].close is None and got["full"].oi == 7


def test_replayed_ticks_are_counted_by_the_frame_and_a_raising_handler_by_the_tick(tmp_path: Path, clients: list,
                                                                                  paper_clock: FakeClock) -> None:
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(900.0 + i, i, volume=i) for i in range(6)]
                     + [tick_line(990.0, 6, volume=END)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    seen: List[Tuple[int, int]] = []  # (volume, the ticks counted when its handler ran)
    done = threading.Event()

    def on_tick(tick: tt.Tick) -> None:
        seen.append((tick.volume, client.stream_stats()["ticks"]))
        if tick.volume == END:
            done.set()
        elif tick.volume in (1, 4):
            raise RuntimeError("a handler's bug")

    client.subscribe(PAPER_SBIN, on_tick=on_tick, mode="ltp")
    assert done.wait(5)
    assert [v for v, _ in seen] == [0, 1, 2, 3, 4, 5, END] and all(n >= i + 1 for i, (_, n) in enumerate(seen))
    stats = client.stream_stats()
    assert (stats["ticks"], stats["handler_errors"]) == (7, 2)


def test_a_tick_file_number_beyond_a_float_or_json_nested_too_deep_is_a_skipped_line(tmp_path: Path, clients: list,
                                                                                    paper_clock: FakeClock) -> None:
    """Not an error of the feed: the ticks read with it in its batch are delivered, nothing reconnects."""
    huge = "1" + "0" * 400  # a JSON int no float can hold
    path = tick_file(tmp_path / "ticks.jsonl", [
        tick_line(901.0, 0), '{"instrument": "NSE:SBIN", "ts": %s, "ltp": 900.0}' % huge,
        '{"instrument": "NSE:SBIN", "ts": %d, "ltp": %s}' % (T0_MS, huge),
        tick_line(900.0, 1, mode="full", bids=[[899.0, 1e400, 1]], asks=[[900.5, 10, 1]]),  # qty: Infinity
        '{"instrument": "NSE:SBIN", "ts": %d, "ltp": 900.0, "exchange_time": %s}' % (T0_MS, huge),
        "[" * 100_000, tick_line(902.0, 2),
    ])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    assert stream(client, 2, timeout=5.0) == [901.0, 902.0]
    assert client.stream_stats()["reconnects"] == 0


def test_a_replayed_fill_sees_the_prices_of_the_lines_before_it(tmp_path: Path, clients: list,
                                                                paper_clock: FakeClock) -> None:
    """A short option's margin is on its underlying's price: a fill by a line of the file uses the
    underlying's price of the file's lines before it (the same feed frame), not an older one."""
    client = paper_client(clients, tmp_path, paper_clock, prices=tick_file(tmp_path / "none.jsonl", []))
    nifty = tt.Index(exchange="NSE", symbol="NIFTY")
    ce = tt.Option(exchange="NFO", symbol="NIFTY", expiry=client.expiries("NIFTY")[0], strike=23500, option_type="CE")
    client.close()
    path = tick_file(tmp_path / "ticks.jsonl", [
        tick_line(23500.0, 0, instrument=str(nifty)), tick_line(23600.0, 1, instrument=str(nifty)),
        tick_line(130.0, 2, instrument=str(ce)), tick_line(901.0, 3),
    ])
    client = paper_client(clients, tmp_path / "replay", paper_clock, prices=path)
    push(client, nifty, 23000.0)  # a price to place the short sale against
    lot = client.lot_size(ce)
    order_id = client.place_order(ce, lot, "SELL", "NRML", "LIMIT", price=125.0)
    assert stream(client, 1) == [901.0]
    order = client.get_order(order_id)
    assert (order.status, order.average_price) == (COMPLETE, 130.0)
    assert client.get_funds().used == pytest.approx(0.12 * lot * 23600.0)  # 12% of the notional at the last price


def test_a_tick_file_line_that_is_not_utf8_is_skipped(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(901.0, 0), b"\xff\xfe\xfd not utf-8 \xc3\x28",
                                                tick_line(902.0, 1)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    assert stream(client, 2, timeout=2.0) == [901.0, 902.0]


def test_a_tick_file_price_too_large_to_hold_is_skipped(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(901.0, 0), tick_line(1e308, 1), tick_line(902.0, 2)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    assert stream(client, 2, timeout=2.0) == [901.0, 902.0]
    assert client.stream_stats()["reconnects"] == 0


def test_a_tick_file_line_of_ten_megabytes_is_skipped(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(901.0, 0), '{"instrument": "' + "A" * (10 << 20) + '"}',
                                                tick_line(902.0, 1)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    assert stream(client, 2, timeout=5.0) == [901.0, 902.0]


@pytest.mark.parametrize("ts", ["10000000000000000", "NaN", "-1e300", "1e400"])
def test_a_tick_file_time_that_is_no_time_never_poisons_the_account(ts: str, tmp_path: Path, clients: list,
                                                                   paper_clock: FakeClock) -> None:
    bad = '{"instrument": "NSE:SBIN", "ts": %s, "mode": "ltp", "ltp": 899.0}' % ts
    path = tick_file(tmp_path / "ticks.jsonl", [bad, tick_line(898.0, 1)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=900.0)
    got = stream(client, 1, timeout=2.0)
    assert got == [898.0]
    # the line with no usable time is skipped: the account stays readable
    order = client.get_order(order_id)
    assert (order.status, order.average_price) in {(COMPLETE, 898.0), (COMPLETE, 899.0)}
    (trade,) = client.get_trades()
    assert trade.avg_price == order.average_price and trade.timestamp.year < 10000
    assert client.stream_stats()["reconnects"] == 0


@pytest.mark.parametrize("side, order_type, price, bids, asks", [
    ("SELL", "MARKET", None, [[-5.0, 100, 1]], [[900.05, 100, 1]]),
    ("BUY", "MARKET", None, [[899.95, 100, 1]], [[0.0001, 100, 1]]),
    ("SELL", "LIMIT", 950.0, [[5000.0, 100, 1]], [[900.05, 100, 1]]),
], ids=["negative bid", "ask of zero", "bid far above the ask"])
def test_tick_file_depth_that_cannot_be_never_gives_a_fill(side: str, order_type: str, price: Optional[float],
                                                           bids: Any, asks: Any, tmp_path: Path, clients: list,
                                                           paper_clock: FakeClock) -> None:
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(900.0, 0, mode="full", bids=bids, asks=asks)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    order_id = client.place_order(PAPER_SBIN, 10, side, "MIS", order_type, price=price)  # before any price
    assert stream(client, 1, timeout=2.0, mode="full") == [900.0]
    order = client.get_order(order_id)
    if order_type == "MARKET":  # the bad depth ignored (the last price is the touch), or the line skipped
        assert (order.status, order.average_price) in {(OPEN, None), (COMPLETE, 900.0)}
    else:
        assert (order.status, order.average_price) == (OPEN, None)


def test_a_paced_replay_delivers_its_first_tick_at_once_and_answers_calls(tmp_path: Path, clients: list,
                                                                         paper_clock: FakeClock) -> None:
    path = tick_file(tmp_path / "ticks.jsonl", [tick_line(901.0, 0), tick_line(902.0, 1), tick_line(903.0, 2)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path, replay_speed=1)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    took: Dict[str, float] = {}
    asked = threading.Event()

    def ask() -> None:
        asked.wait(0.3)  # a bounded wait: the replay is pacing by then
        began = time.monotonic()
        client.get_funds()
        took["get_funds"] = time.monotonic() - began

    helper = threading.Thread(target=ask)
    began = time.monotonic()
    client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode="ltp")
    helper.start()
    first = ticks.get(timeout=5)
    took["first tick"] = time.monotonic() - began
    helper.join(10)
    assert first.ltp == 901.0
    assert took["first tick"] < 0.8 and took["get_funds"] < 0.5, took


@pytest.mark.parametrize("batch", [256, 2])  # the long line inside a batch, and across batches
def test_a_line_too_long_to_be_a_tick_is_skipped_without_being_held_whole(batch: int, tmp_path: Path, clients: list,
                                                                           paper_clock: FakeClock, caplog: Any,
                                                                           monkeypatch: Any) -> None:
    """A tick file's line is read at most _RECORD_LINE_MAX characters at a time: a longer one (a
    400 MB line made the batch's join run out of memory, and every tick around it was lost) is
    skipped with a warning naming it, and the ticks either side of it are replayed."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    monkeypatch.setattr(tt, "_RECORD_LINE_MAX", 200)
    monkeypatch.setattr(tt._PaperReplaySource, "_BATCH", batch)
    long = json.dumps(tick_line(903.0, 3, note="x" * 500))  # valid JSON, but no line of a tick file is that long
    lines = [tick_line(901.0, 1), tick_line(902.0, 2), long, tick_line(904.0, 4), "x" * 150, long,
             tick_line(906.0, 6), ('{"instrument": "NSE:SBIN", "note": "' + "y" * 199)[:197] + '"}']  # 200 with "\n"
    path = tick_file(tmp_path / "ticks.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b"z" * 450)  # and the file ends inside one
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    source = client._local.source
    reads: List[int] = []
    real_lines = source._lines

    def spied() -> Any:  # the pieces read: none longer than the bound
        found = real_lines()
        reads.extend(len(line) for line in found or () if line is not tt._LONG_LINE)
        return found

    monkeypatch.setattr(source, "_lines", spied)
    subs = {client.resolve(PAPER_SBIN): "ltp"}
    got: List[float] = []
    more = True
    while more:  # read here, not by a feed: the file's end is reached deterministically
        ticks, more = source.read(subs)
        got += [t.ltp for t in ticks]
    assert got == [901.0, 902.0, 904.0, 906.0]
    assert skipped_lines(caplog) == [3, 5, 6, 8, 9]  # the long lines by number, and the short junk lines 5 and 8
    assert [m for m in caplog.messages if "longer than 200" in m] == [
        f"paper replay: skipped line {n} of {path} (longer than 200 characters: no tick)" for n in (3, 6, 9)]
    assert max(reads) == 200


def test_a_file_of_endless_distinct_junk_instruments_is_counted_not_kept(tmp_path: Path, clients: list,
                                                                          paper_clock: FakeClock, caplog: Any,
                                                                          monkeypatch: Any) -> None:
    """Each text that names no paper instrument is warned about once and remembered, up to a
    bound; a text of over 100 characters (no instrument's) never is: 40 lines of 10 MB texts
    kept 400 MB."""
    caplog.set_level(logging.WARNING, logger="ttconnect")
    monkeypatch.setattr(tt, "_RECORD_UNKNOWN_MAX", 5)
    junk = [tick_line(900.0, i, instrument=f"NSE:JUNK{i}") for i in range(8)]
    long = [tick_line(900.0, 10 + i, instrument="NSE:" + "L" * 300 + str(i)) for i in range(2)]
    path = tick_file(tmp_path / "ticks.jsonl", [*long, *junk, tick_line(950.0, 30, volume=END)])
    client = paper_client(clients, tmp_path, paper_clock, prices=path)
    assert [t.ltp for t in replayed(client, mode="ltp")] == [950.0]
    source = client._local.source
    assert source.unknown == 10
    assert [text for text, label in source._labels.items() if label is None] == [f"NSE:JUNK{i}" for i in range(3)]
    assert len([m for m in caplog.messages if "is not a paper instrument" in m]) == 5  # the first five texts


# ============================================================================
# G. A live price source
# ============================================================================


def test_a_live_source_first_price_is_used_as_soon_as_it_arrives(tmp_path: Path, clients: list,
                                                                 paper_clock: FakeClock) -> None:
    live = open_client(clients, "zerodha", tmp_path / "zerodha", FakeClock(ist(2026, 11, 21, 10, 0)), KITE_CSV)

    class FakeFeed:
        def __init__(self, listener: Any) -> None:
            self.listener = listener

        def subscribe(self, instruments: List[Any], mode: str, on_tick: Any) -> None:
            def later() -> None:
                threading.Event().wait(0.05)  # the live feed's first tick, 50 ms later
                tick = tt._TickBuilder(instruments[0], "ltp", 900.0)
                tick.__class__ = tt.Tick
                self.listener(tick)
            threading.Thread(target=later, daemon=True).start()

    live._price_feed = FakeFeed  # type: ignore[assignment]
    client = paper_client(clients, tmp_path / "paper", paper_clock, prices=live)
    began = time.monotonic()
    with pytest.raises(tt.InvalidOrderError, match="would fire at once"):  # checked against that first price
        client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "SL", price=896.0, trigger_price=895.0)
    assert time.monotonic() - began < 1.0


def test_a_live_tick_with_a_garbled_touch_trades_at_its_last_price(tmp_path: Path, clients: list,
                                                                   paper_clock: FakeClock) -> None:
    """A depth level below 0 (a signed feed's garbage) was taken as the touch: a MARKET SELL filled at
    -500.00; a NaN one (a float feed's) raised in the feed, and the tick was lost."""
    live = open_client(clients, "zerodha", tmp_path / "zerodha", FakeClock(ist(2026, 11, 21, 10, 0)), KITE_CSV)
    listeners: List[Any] = []

    class FakeFeed:
        def __init__(self, listener: Any) -> None:
            listeners.append(listener)

        def subscribe(self, instruments: List[Any], mode: str, on_tick: Any) -> None:
            pass

    live._price_feed = FakeFeed  # type: ignore[assignment]
    client = paper_client(clients, tmp_path / "paper", paper_clock, prices=live)
    client._local.source.watch(client.resolve(PAPER_SBIN))
    for bid, ask in ((-50000, 89300), (float("nan"), float("nan"))):
        tick = tt._TickBuilder(PAPER_SBIN, "full", 892.0, _depth=((10, bid, 1), (10, ask, 1), 100.0))
        tick.__class__ = tt.Tick
        listeners[0](tick)
        sold = client.get_order(client.place_order(PAPER_SBIN, 1, "SELL", "MIS", "MARKET"))
        assert (sold.status, sold.average_price) == (tt.OrderStatus.COMPLETE, 892.0)
    bought = client.get_order(client.place_order(PAPER_SBIN, 2, "BUY", "MIS", "MARKET"))
    assert bought.average_price == 892.0 and sum(p.qty for p in client.get_positions()) == 0
    assert client.get_funds().available == 1_000_000  # sold and bought back at 892.00: nothing made or lost


def test_a_live_price_source_leaves_the_live_clients_own_feed_alone(tmp_path: Path, clients: list,
                                                                     day_clock: FakeClock, ws_server: WsServer,
                                                                     monkeypatch: Any) -> None:
    """Paper takes its prices on a feed of its own: the strategy's handler, subscriptions and
    modes on the live client stay as they were (paper's watch used to replace its on_tick, and a
    later subscribe of the strategy's took paper's prices away)."""
    monkeypatch.setattr(tt._PaperLiveSource, "_WAIT", 0.01)  # no first price is waited for: the order rests
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    sbin_token = 779521
    mine: "queue.Queue[tt.Tick]" = queue.Queue()
    live.subscribe(PAPER_SBIN, on_tick=mine.put, mode="quote")
    paper = paper_client(clients, tmp_path / "paper", FakeClock(ist(2026, 12, 2, 10, 0)), prices=live)
    first = paper.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=893.0)
    modes: Set[str] = set()
    while modes != {"quote", "full"}:  # the strategy's connection and paper's, each with its own mode
        message = json.loads(ws_server.wait_message())
        if message["a"] == "mode" and sbin_token in message["v"][1]:
            modes.add(message["v"][0])
    feed = live._price_streamer
    assert feed is not None and feed is not live._streamer
    ws_server.send(kite_frame(kite_packet(sbin_token, 44, ltp=892.0, close=890.0)))
    tick = mine.get(timeout=3)
    assert (tick.instrument, tick.mode, tick.ltp) == (PAPER_SBIN, "quote", 892.0)
    assert feed.wait_for(lambda: paper.get_order(first).status is tt.OrderStatus.COMPLETE, 3)
    assert paper.get_order(first).average_price == 892.0
    # The strategy subscribes more with a handler of its own: paper's prices go on.
    theirs: "queue.Queue[tt.Tick]" = queue.Queue()
    live.subscribe(tt.Equity(exchange="NSE", symbol="INFY"), on_tick=theirs.put, mode="ltp")
    second = paper.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=885.0)
    ws_server.send(kite_frame(kite_packet(sbin_token, 44, ltp=880.0, close=890.0)))
    assert theirs.get(timeout=3).ltp == 880.0 and mine.empty()
    assert feed.wait_for(lambda: paper.get_order(second).status is tt.OrderStatus.COMPLETE, 3)
    assert paper.get_order(second).average_price == 880.0
    paper.close()
    assert live.stream_stats()["subscriptions"] == 2  # the strategy's own: SBIN and INFY
    assert live._price_streamer is None  # its last listener gone, paper's connection is closed


def test_a_live_tick_in_flight_as_the_paper_client_closes_is_dropped_quietly(
        tmp_path: Path, clients: list, day_clock: FakeClock, ws_server: WsServer, monkeypatch: Any, caplog: Any) -> None:
    # it reached the closed account file and logged "the account file is busy (Cannot operate on a closed database)"
    monkeypatch.setattr(tt._PaperLiveSource, "_WAIT", 0.01)
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    paper = paper_client(clients, tmp_path / "paper", FakeClock(ist(2026, 12, 2, 10, 0)), prices=live)
    paper.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=893.0)  # a working order the tick would reach
    source = paper._local.source
    paper.close()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ttconnect"):
        source._on_tick(tt.Tick(instrument=PAPER_SBIN, mode="ltp", ltp=880.0))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_paper_accounts_sharing_a_live_source_all_get_its_prices(tmp_path: Path, clients: list,
                                                                 day_clock: FakeClock, ws_server: WsServer,
                                                                 monkeypatch: Any) -> None:
    monkeypatch.setattr(tt._PaperLiveSource, "_WAIT", 0.01)
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    a = paper_client(clients, tmp_path / "paper", clock, prices=live, account="a")
    b = paper_client(clients, tmp_path / "paper", clock, prices=live, account="b")
    ids = [a.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=893.0),
           b.place_order(PAPER_SBIN, 2, "BUY", "CNC", "LIMIT", price=894.0)]
    assert json.loads(ws_server.wait_message())["a"] == "subscribe"  # one connection: the price feed's
    feed = live._price_streamer
    assert feed is not None and live._streamer is None
    feed.wait_for(lambda: feed.snapshot()["connected"], 3)
    ws_server.send(kite_frame(kite_packet(779521, 44, ltp=892.0, close=890.0)))
    assert feed.wait_for(lambda: a.get_order(ids[0]).status is b.get_order(ids[1]).status is tt.OrderStatus.COMPLETE, 3)
    assert (a.get_order(ids[0]).average_price, b.get_order(ids[1]).average_price) == (892.0, 892.0)
    a.close()
    assert live._price_streamer is feed  # b still listens
    b.close()
    assert live._price_streamer is None and not feed.snapshot()["connected"]


def test_a_live_tick_without_a_price_fills_nothing(tmp_path: Path, clients: list, day_clock: FakeClock,
                                                  ws_server: WsServer, monkeypatch: Any) -> None:
    """Kite sends ltp 0 for a contract not traded yet today: that is no price. It fired a stop-loss
    SELL and filled it, and the next MARKET BUY, at 0.00."""
    monkeypatch.setattr(tt._PaperLiveSource, "_WAIT", 0.01)
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    paper = paper_client(clients, tmp_path / "paper", FakeClock(ist(2026, 12, 2, 10, 0)), prices=live)
    bought = paper.place_order(PAPER_SBIN, 2, "BUY", "CNC", "LIMIT", price=893.0)
    feed = live._price_streamer
    assert feed is not None and feed.wait_for(lambda: feed.snapshot()["connected"], 3)
    ws_server.send(kite_frame(kite_packet(779521, 44, ltp=892.0, close=890.0)))
    assert feed.wait_for(lambda: paper.get_order(bought).status is tt.OrderStatus.COMPLETE, 3)
    stop = paper.place_order(PAPER_SBIN, 2, "SELL", "CNC", "SL_M", trigger_price=880.0)
    ws_server.send(kite_frame(kite_packet(779521, 184, ltp=0.0, close=890.0, bids=[], asks=[])))
    ws_server.send(kite_frame(kite_packet(779521, 8, ltp=891.5)))  # after the empty one: once it is seen, so was that
    assert feed.wait_for(lambda: paper._local._quotes[paper.resolve(PAPER_SBIN)].ltp == 89150, 3)
    assert paper.get_order(stop).status is tt.OrderStatus.TRIGGER_PENDING
    market = paper.get_order(paper.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET"))
    assert (market.status, market.average_price) == (tt.OrderStatus.COMPLETE, 891.5)
    assert paper.get_funds().available == 1_000_000 - 2 * 892.0 - 891.5


def test_a_contract_the_live_source_does_not_list_is_refused_on_the_callers_thread(
        tmp_path: Path, clients: list, day_clock: FakeClock, ws_server: WsServer, monkeypatch: Any) -> None:
    """Paper's bundled contracts are not all the live broker's: subscribing one failed on the feed's
    thread, the paper feed retried its connect forever and no instrument got a tick; an order was
    told to 'refresh the instrument master'."""
    monkeypatch.setattr(tt._PaperLiveSource, "_WAIT", 0.01)
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    paper = paper_client(clients, tmp_path / "paper", FakeClock(ist(2026, 12, 2, 10, 0)), prices=live)
    unlisted = paper.option_chain("NIFTY", "2026-12-08")[0]
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    with pytest.raises(tt.InstrumentNotFoundError, match=rf"^{re.escape(str(unlisted))} has no live price: paper's "
                       "price source, the zerodha client, does not list it"):
        paper.subscribe([PAPER_SBIN, unlisted], on_tick=ticks.put, mode="quote")
    with pytest.raises(tt.InstrumentNotFoundError, match="has no live price"):
        paper.place_order(unlisted, 65, "BUY", "NRML", "LIMIT", price=100.0)
    assert paper.get_orders() == [] and paper.stream_stats()["subscriptions"] == 0
    paper.subscribe([PAPER_SBIN], on_tick=ticks.put, mode="quote")
    feed = live._price_streamer
    assert feed is not None and feed.wait_for(lambda: feed.snapshot()["connected"], 3)
    assert paper._streamer is not None and paper._streamer.wait_for(lambda: paper.stream_stats()["connected"], 3)
    ws_server.send(kite_frame(kite_packet(779521, 44, ltp=892.0, close=890.0)))
    assert ticks.get(timeout=3).ltp == 892.0
    assert paper.stream_stats()["reconnects"] == 0


def test_a_live_source_whose_client_is_closed_refuses_every_order_that_needs_its_price(
        tmp_path: Path, clients: list, day_clock: FakeClock, ws_server: WsServer) -> None:
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    paper = paper_client(clients, tmp_path / "paper", FakeClock(ist(2026, 12, 2, 10, 0)), prices=live)
    live.close()
    for _ in range(2):  # the second too: the failed watch was not taken as done
        with pytest.raises(tt.ConfigurationError, match="this zerodha client is closed"):
            paper.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=893.0)
    assert paper.get_orders() == []


def test_a_live_source_closed_after_its_prices_came_fills_nothing_at_its_last_price(
        tmp_path: Path, clients: list, day_clock: FakeClock, ws_server: WsServer, monkeypatch: Any) -> None:
    """Closed once it had given SBIN a price, the live client's last price was used for good: MARKET
    orders filled at it (hours stale), and a subscribe took no price, silently."""
    monkeypatch.setattr(tt._PaperLiveSource, "_WAIT", 0.01)
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    paper = paper_client(clients, tmp_path / "paper", FakeClock(ist(2026, 12, 2, 10, 0)), prices=live)
    bought = paper.place_order(PAPER_SBIN, 2, "BUY", "CNC", "LIMIT", price=893.0)
    resting = paper.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0)
    feed = live._price_streamer
    assert feed is not None and feed.wait_for(lambda: feed.snapshot()["connected"], 3)
    ws_server.send(kite_frame(kite_packet(779521, 44, ltp=892.0, close=890.0)))
    assert feed.wait_for(lambda: paper.get_order(bought).status is tt.OrderStatus.COMPLETE, 3)
    live.close()
    for order_type, price in (("MARKET", None), ("LIMIT", 880.0)):
        with pytest.raises(tt.ConfigurationError, match="this zerodha client is closed"):
            paper.place_order(PAPER_SBIN, 1, "SELL", "CNC", order_type, price=price)
    with pytest.raises(tt.ConfigurationError, match="this zerodha client is closed"):
        paper.subscribe(PAPER_SBIN, on_tick=lambda tick: None)
    assert [o.id for o in paper.get_orders()] == [bought, resting]
    assert paper.cancel_order(resting) == resting  # what it holds stays the user's to manage
    assert [(p.qty, p.avg_price, p.ltp) for p in paper.get_positions()] == [(2, 892.0, None)]
    assert paper.get_funds().available == 1_000_000 - 2 * 892.0


def test_the_paper_feed_reconnects_after_its_live_source_is_closed(tmp_path: Path, clients: list,
                                                                   day_clock: FakeClock, ws_server: WsServer) -> None:
    """Its reconnect greets with every subscription: watched again on the feed's thread, a closed
    live client failed the connect, and the feed retried it for good (order updates lost too)."""
    live = kite_feed(clients, tmp_path / "zerodha", day_clock, ws_server)
    paper = paper_client(clients, tmp_path / "paper", FakeClock(ist(2026, 12, 2, 10, 0)), prices=live)
    paper.subscribe(PAPER_SBIN, on_tick=lambda tick: None)
    streamer = paper._streamer
    assert streamer is not None and streamer.wait_for(lambda: paper.stream_stats()["connected"], 3)
    live.close()
    for sock in list(paper._local.sockets):
        sock.abort()  # the connection ends: the streamer reconnects
    assert streamer.wait_for(lambda: paper.stream_stats()["reconnects"] == 1 and paper.stream_stats()["connected"], 3)
    assert "zerodha client is closed" not in (paper.stream_stats()["last_error"] or "")


# ============================================================================
# H. The feed, threads and the client's lifecycle
# ============================================================================


def test_close_while_the_feed_runs_stops_it_promptly(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock, tick_interval=0.005)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    updates: "queue.Queue[tt.Order]" = queue.Queue()
    client.subscribe([PAPER_SBIN, TCS], on_tick=ticks.put, mode="full", on_order_update=updates.put)
    ticks.get(timeout=5)
    began = time.monotonic()
    client.close()
    assert time.monotonic() - began < 3.0
    while not ticks.empty():
        ticks.get_nowait()
    with pytest.raises(queue.Empty):
        ticks.get(timeout=0.3)
    assert client.stream_stats()["connected"] is False
    client.close()  # twice: still fine


def test_a_closed_client_refuses_every_call_with_one_typed_error(tmp_path: Path, clients: list,
                                                                 paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0)
    client.close()
    calls = [client.get_funds, client.get_orders, client.get_positions, client.get_holdings, client.get_trades,
             client.get_profile, lambda: client.get_order(order_id), lambda: client.get_order_history(order_id),
             lambda: client.cancel_order(order_id), lambda: client.modify_order(order_id, price=501.0),
             lambda: client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET"), client.cancel_all_orders,
             client.close_all_positions, lambda: client.resolve(PAPER_SBIN), lambda: client.search("SB"),
             lambda: client.expiries("NIFTY"), lambda: client.subscribe(PAPER_SBIN, on_tick=print),
             lambda: client.on_order_update(print), lambda: client.calculate_margin(
                 [tt.OrderLeg(PAPER_SBIN, 1, tt.Side.BUY, tt.ProductType.CNC, tt.OrderType.LIMIT, price=900)])]
    for call in calls:
        with pytest.raises(tt.ConfigurationError, match="this paper client is closed"):
            call()
    again = paper_client(clients, tmp_path, paper_clock)
    assert again.get_order(order_id).status is OPEN  # nothing was lost by the close


def test_close_racing_an_order_is_a_typed_error(tmp_path: Path, clients: list) -> None:
    now = PAPER_DAY.timestamp()
    armed: Dict[str, Any] = {}

    def clock() -> float:
        victim = armed.pop("client", None)
        if victim is not None:  # another thread closes the client just as the order goes out
            closer = threading.Thread(target=victim.close)
            closer.start()
            closer.join(5)
        return now

    client = open_paper(clients, tmp_path, clock)
    armed["client"] = client
    # said so, not "the paper account file cannot be used (...closed database); ... move the file aside"
    with pytest.raises(tt.ConfigurationError, match="^this paper client is closed; create a new TTConnect"):
        client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0)
    again = open_paper(clients, tmp_path, lambda: now)
    assert again.get_orders() == []  # not half-placed


def test_a_call_waiting_on_a_close_by_another_thread_is_told_the_client_is_closed(tmp_path: Path, clients: list,
                                                                                    paper_clock: FakeClock) -> None:
    """It was told the account file 'cannot be used (Cannot operate on a closed database); ... move the
    file aside to start the account afresh': advice to throw the account away."""
    client = paper_client(clients, tmp_path, paper_clock)
    engine = client._local
    main = threading.current_thread()

    class AnnouncedLock:  # says when another thread starts waiting for the engine's lock
        def __init__(self, lock: Any) -> None:
            self.lock, self.waiting = lock, threading.Event()

        def __enter__(self) -> Any:
            if threading.current_thread() is not main:
                self.waiting.set()
            return self.lock.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return self.lock.__exit__(*exc)

    engine.lock = lock = AnnouncedLock(engine.lock)
    errors: "queue.Queue[BaseException]" = queue.Queue()

    def call() -> None:
        try:
            client.get_funds()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.put(exc)

    with lock:
        waiter = threading.Thread(target=call)
        waiter.start()
        assert lock.waiting.wait(5)
        client.close()  # this thread holds the lock: the call waits on, past its own closed check
    waiter.join(5)
    error = errors.get(timeout=1)
    assert isinstance(error, tt.ConfigurationError)
    assert str(error) == "this paper client is closed; create a new TTConnect to use it again"


def test_a_thread_storm_with_the_feed_running_stays_exact(tmp_path: Path, clients: list,
                                                          paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock, capital=50000, tick_interval=0.002)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    updates: "queue.Queue[tt.Order]" = queue.Queue()
    client.subscribe([PAPER_SBIN, TCS], on_tick=ticks.put, mode="full")
    client.on_order_update(updates.put)
    ticks.get(timeout=5)
    prices: Dict[str, float] = {}
    raw: List[str] = []
    guard = threading.Lock()

    def worker(n: int) -> None:
        rnd = random.Random(n)
        mine: List[str] = []
        for _ in range(50):
            try:
                roll = rnd.random()
                price = 400.0 + rnd.randrange(100) * 0.05  # far below SBIN: they rest
                if roll < 0.5 or not mine:
                    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=price)
                    with guard:
                        prices[order_id] = price
                    mine.append(order_id)
                elif roll < 0.75:
                    client.cancel_order(mine.pop(rnd.randrange(len(mine))))
                else:
                    order_id = rnd.choice(mine)
                    client.modify_order(order_id, price=price)
                    with guard:
                        prices[order_id] = price
            except tt.TTConnectError:
                pass
            except Exception as exc:  # noqa: BLE001 - recorded: the defect
                raw.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker never finished"
    assert raw == []
    orders = client.get_orders()
    assert len({o.id for o in orders}) == len(orders) == len(prices)
    working = [o for o in orders if o.status is OPEN]
    assert all(o.price == prices[o.id] for o in working)
    funds = client.get_funds()
    assert funds.available >= 0
    assert round(funds.available * 100) == 50000 * 100 - sum(round(o.price * 100) for o in working)
    events = sum(len(client.get_order_history(o.id)) for o in orders)
    assert client._streamer is not None
    client._streamer.wait_for(lambda: updates.qsize() >= events, 10)
    last: Dict[str, tt.Order] = {}
    while not updates.empty():
        update = updates.get_nowait()
        last[update.id] = update
    assert {i: (u.status, u.price) for i, u in last.items()} == {o.id: (o.status, o.price) for o in orders}


def test_subscribing_to_what_cannot_stream_is_refused(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    with pytest.raises(tt.UnsupportedFeatureError, match="stream mode 'tick'"):
        client.subscribe(PAPER_SBIN, on_tick=print, mode="tick")
    with pytest.raises(tt.InvalidInstrumentError):
        client.subscribe("NSE:SBIN", on_tick=print)  # type: ignore[arg-type]
    with pytest.raises(tt.ConfigurationError, match="needs on_tick"):
        client.subscribe(PAPER_SBIN)
    with pytest.raises(tt.ConfigurationError, match="on_tick must be a callable"):
        client.subscribe(PAPER_SBIN, on_tick=42)  # type: ignore[arg-type]


# ============================================================================
# I. parse_instrument
# ============================================================================


def universe(client: tt.TTConnect) -> List[Any]:
    found = list(client.search("", limit=100000))
    for symbol in sorted({i.symbol for i in found}):
        for exchange in ("NFO", "BFO"):
            for expiry in client.expiries(symbol, exchange):
                try:
                    found.extend(client.option_chain(symbol, expiry, exchange))
                except tt.InstrumentNotFoundError:
                    pass  # futures only on that expiry
    return found


def assert_round_trips(client: tt.TTConnect, instruments: List[Any]) -> None:
    bad = []
    for inst in instruments:
        text = str(inst)
        back = tt.parse_instrument(text)
        if back != inst or type(back) is not type(inst) or client.resolve(inst) != text:
            bad.append((text, type(inst).__name__, type(back).__name__, str(back)))
    assert bad == []


def test_every_bundled_instrument_round_trips_through_its_text(tmp_path: Path, clients: list,
                                                               paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    found = universe(client)
    kinds = {type(i).__name__ for i in found}
    assert kinds == {"Index", "Equity", "Future", "Option"} and len(found) > 1000
    assert_round_trips(client, found)


@pytest.mark.parametrize("broker, body", [("zerodha", KITE_CSV), ("angelone", ANGEL_JSON), ("upstox", UPSTOX_GZ)])
def test_every_instrument_of_a_real_brokers_db_round_trips(broker: str, body: bytes, tmp_path: Path,
                                                           clients: list) -> None:
    clock = FakeClock(ist(2026, 11, 21, 10, 0))
    open_client(clients, broker, tmp_path, clock, body)
    client = paper_client(clients, tmp_path, clock, instruments="db")
    found = universe(client)
    assert len(found) > 20
    assert_round_trips(client, found)


@pytest.mark.parametrize("text", [None, 7, b"NSE:SBIN", "", ":", "NSE:", ":SBIN", "NSE:sbin", "XYZ:SBIN",
                                  "NFO:NIFTY 2026-02-30 23500 CE", "NFO:NIFTY FUT 2026-02-30", "NFO:NIFTY FUT",
                                  "NFO:NIFTY 2026-12-29 -23500 CE", "NFO:NIFTY 2026-12-29 0 CE",
                                  "NFO:NIFTY 2026-12-29 nan CE", "NFO:NIFTY 2026-12-29 inf CE",
                                  "NFO:NIFTY FUT 2026-12-29T00", "NFO:NIFTY  2026-12-29 23500 CE",
                                  "NFO:NIFTY 2026-12-29 23500  CE", "NFO:NIFTY 2026-12-29 23500 ce", "NFO:NIFTY",
                                  "NSE:SBIN FUT 2026-12-29", "NFO:NIFTY 2026-12-29 0x5BCC CE", "NSE: SBIN"])
def test_malformed_instrument_texts_raise_value_error(text: Any, tmp_path: Path, clients: list,
                                                      paper_clock: FakeClock) -> None:
    paper_client(clients, tmp_path, paper_clock)
    with pytest.raises(ValueError, match="write one of: 'NSE:SBIN'"):
        tt.parse_instrument(text)


@pytest.mark.parametrize("strike", ["2.35e4", "23_500", "+23500", "23500.0",
                                    "\uff12\uff13\uff15\uff10\uff10", "\u0662\u0663\u0665\u0660\u0660"],
                         ids=["exponent", "underscore", "plus", "trailing .0", "fullwidth digits",
                              "arabic-indic digits"])
def test_a_strike_not_spelled_as_str_prints_it_is_malformed(strike: str, tmp_path: Path, clients: list,
                                                            paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    expiry = client.expiries("NIFTY")[-1].isoformat()
    assert str(tt.parse_instrument(f"NFO:NIFTY {expiry} 23500 CE")) == f"NFO:NIFTY {expiry} 23500 CE"
    with pytest.raises(ValueError):
        tt.parse_instrument(f"NFO:NIFTY {expiry} {strike} CE")


@pytest.mark.parametrize("text", ["NSE:SB\tIN", "NSE:SBIN\x00", "NSE:SB\nIN", "NSE:\u0053\u0042\u0049\u004e\u200b"])
def test_control_characters_in_a_symbol_are_malformed_not_unlisted(text: str, tmp_path: Path, clients: list,
                                                                   paper_clock: FakeClock) -> None:
    paper_client(clients, tmp_path, paper_clock)
    with pytest.raises(ValueError):
        tt.parse_instrument(text)


@pytest.mark.parametrize("text", ["nse:SBIN", "Nse:SBIN", "nfo:NIFTY FUT 2026-12-29"])
def test_a_lower_case_exchange_is_not_what_str_prints(text: str, tmp_path: Path, clients: list,
                                                      paper_clock: FakeClock) -> None:
    paper_client(clients, tmp_path, paper_clock)
    with pytest.raises(ValueError, match="write one of"):
        tt.parse_instrument(text)


def test_a_very_long_instrument_text_fails_fast_with_a_short_message(tmp_path: Path, clients: list,
                                                                     paper_clock: FakeClock) -> None:
    paper_client(clients, tmp_path, paper_clock)
    for text in ("NSE:" + "A" * 200000, "NFO:" + "NIFTY " * 50000 + "FUT 2026-12-29", "N" * 10 ** 6):
        began = time.monotonic()
        with pytest.raises(tt.TTConnectError) as info:
            tt.parse_instrument(text)
        assert time.monotonic() - began < 1.0
        assert len(str(info.value)) < 1000, f"a message of {len(str(info.value))} characters"


@pytest.mark.parametrize("text, words", [
    ("NFO:NIFTY FUT", "expiry"), ("NFO:NIFTY 2026-12-29 23500 ce", "CE"), ("NFO:NIFTY 2026-12-29 23500 XX", "CE"),
])
def test_malformed_texts_are_told_what_is_actually_wrong(text: str, words: str, tmp_path: Path, clients: list,
                                                        paper_clock: FakeClock) -> None:
    paper_client(clients, tmp_path, paper_clock)
    with pytest.raises(ValueError) as info:
        tt.parse_instrument(text)
    assert words in str(info.value).split("write one of")[0], str(info.value)  # in the reason, not the examples


@pytest.mark.parametrize("inst, text", [
    (tt.Index(exchange="BSE", symbol="BSE500"), "BSE:BSE500 INDEX"),  # an index outside the known names
    (tt.Index(exchange="NSE", symbol="NIFTY IT"), "NSE:NIFTY IT"),  # a space: bare, an index
    (tt.Index(exchange="NSE", symbol="X FUT"), "NSE:X FUT INDEX"),  # bare, it reads as a future without expiry
    (tt.Index(exchange="NSE", symbol="A INDEX"), "NSE:A INDEX INDEX"),
    (tt.Equity(exchange="NSE", symbol="NIFTY"), "NSE:NIFTY EQ"),  # an index's name
    (tt.Equity(exchange="BSE", symbol="NIFTY50"), "BSE:NIFTY50 EQ"),  # an index's alias
    (tt.Equity(exchange="BSE", symbol="TATA STEEL"), "BSE:TATA STEEL EQ"),  # a space
    (tt.Equity(exchange="NSE", symbol="FUT"), "NSE:FUT EQ"),
    (tt.Equity(exchange="NSE", symbol="A 2026-12-29 5 CE"), "NSE:A 2026-12-29 5 CE EQ"),  # an option's layout
    (tt.Equity(exchange="NSE", symbol="EQ"), "NSE:EQ"), (tt.Equity(exchange="NSE", symbol="SBIN"), "NSE:SBIN"),
], ids=str)
def test_an_index_or_equity_named_like_the_other_kind_still_reads_back_as_itself(inst: Any, text: str) -> None:
    # Made while no client is open (nothing checks that they are listed): only the text is at stake.
    assert str(inst) == text
    back = tt.parse_instrument(text)
    assert back == inst and type(back) is type(inst)


def test_a_kind_suffix_on_a_plain_name_is_read_as_that_kind() -> None:
    assert tt.parse_instrument("NSE:SBIN EQ") == tt.Equity(exchange="NSE", symbol="SBIN")
    assert type(tt.parse_instrument("NSE:NIFTY INDEX")) is tt.Index
    assert type(tt.parse_instrument("NSE:EQ")) is tt.Equity  # a bare word is a symbol, not a suffix


def test_index_names_and_well_formed_unlisted_texts(tmp_path: Path, clients: list, paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    for alias in ("NSE:NIFTY 50", "NSE:NIFTY", "NSE:NIFTY50"):
        assert tt.parse_instrument(alias) == NIFTY and type(tt.parse_instrument(alias)) is tt.Index
    expiry = client.expiries("NIFTY")[-1].isoformat()
    for text in ("NSE:NOSUCHSTOCK", f"NFO:NIFTY {expiry} 23525 CE", "NFO:SBIN FUT 2026-12-29", "BSE:SBIN",
                 "NFO:NIFTY FUT 2026-12-30"):
        with pytest.raises(tt.InstrumentNotFoundError):
            tt.parse_instrument(text)


# ============================================================================
# 12.10 Hostile: a review pass on the paper broker (each case reproduced a defect first)
# ============================================================================


def test_two_clients_on_one_account_never_fill_an_order_twice(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                               scripted: str) -> None:
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    b = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    order_id = a.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=100.0)
    assert b.get_order(order_id).status is OPEN  # b has read the order from the log
    push(b, PAPER_SBIN, 99.0)  # b's price fills it
    assert b.get_order(order_id).status is COMPLETE
    push(a, PAPER_SBIN, 99.0)  # a's book still held it as open: it must see the fill, not fill it again
    for client in (a, b):
        assert [(t.order_id, t.qty) for t in client.get_trades()] == [(order_id, 10)]
        assert [p.qty for p in client.get_positions()] == [10] and client.get_funds().total == 1000000.0 - 990.0
    again = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    assert [h.status for h in again.get_order_history(order_id)] == [OPEN, COMPLETE]


def test_an_order_cancelled_by_another_client_is_never_filled(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                              scripted: str) -> None:
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    b = paper_client(clients, tmp_path, paper_clock, prices=scripted)
    order_id = a.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=100.0)
    b.cancel_order(order_id)
    push(a, PAPER_SBIN, 99.0)
    assert [h.status for h in a.get_order_history(order_id)] == [OPEN, CANCELLED]
    assert a.get_trades() == [] and a.get_positions() == [] and b.get_funds().available == 1000000.0


def test_no_mis_order_after_the_square_off(tmp_path: Path, clients: list, scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 2, 15, 25))
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    with pytest.raises(tt.OrderError, match="not taken after the 15:20 square-off"):
        client.place_order(PAPER_SBIN, 10, "BUY", "MIS", "MARKET")
    assert client.get_orders() == []
    assert client.get_order(client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")).status is COMPLETE
    clock.set(ist(2026, 12, 2, 16, 0))  # after the close the next session's MIS orders are taken
    assert client.get_order(client.place_order(PAPER_SBIN, 1, "BUY", "MIS", "LIMIT", price=800.0)).status is OPEN


def test_a_sale_from_holdings_is_no_open_short_in_funds_or_holdings(tmp_path: Path, clients: list,
                                                                      scripted: str) -> None:
    clock = FakeClock(ist(2026, 12, 7, 10, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted)
    push(client, PAPER_SBIN, 100.0)
    client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    clock.set(ist(2026, 12, 8, 10, 0))  # the 10 are a holding at 100
    push(client, PAPER_SBIN, 110.0)
    client.place_order(PAPER_SBIN, 4, "SELL", "CNC", "MARKET")
    push(client, PAPER_SBIN, 120.0)
    (holding,) = client.get_holdings()
    assert (holding.qty, holding.avg_price) == (6, 100.0)  # what is left of it
    funds = client.get_funds()
    assert (funds.m2m_realized, funds.m2m_unrealized) == (40.0, 0.0)
    client.place_order(PAPER_SBIN, 6, "SELL", "CNC", "MARKET")
    assert client.get_holdings() == [] and client.get_funds().m2m_unrealized == 0.0
    assert client.get_funds().total == 1000000.0 - 1000.0 + 440.0 + 720.0


def test_buying_back_shares_sold_from_holdings_pays_in_full_and_is_refused_without_funds(
        tmp_path: Path, clients: list, scripted: str) -> None:
    """Shares sold from the holding show as a negative CNC position, but that is no short: a
    delivery buy of them pays its value in full, so it is refused where the funds do not cover it
    (it was taken as an exit, and funds went negative)."""
    clock = FakeClock(ist(2026, 12, 7, 10, 0))
    client = paper_client(clients, tmp_path, clock, prices=scripted, capital=10000)
    push(client, PAPER_SBIN, 900.0)
    client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    clock.set(ist(2026, 12, 8, 10, 0))  # a holding of 10 at 900
    push(client, PAPER_SBIN, 890.0)
    push(client, PAPER_ITC, 400.0)
    client.place_order(PAPER_SBIN, 10, "SELL", "CNC", "MARKET")  # 8,900 back in cash
    client.place_order(PAPER_ITC, 22, "BUY", "CNC", "MARKET")  # 8,800 of it spent
    before = client.get_funds()
    assert before.available == 10000 - 9000 + 8900 - 8800 == 1100.0
    with pytest.raises(tt.InsufficientFundsError, match="needs 8,900.00, available 1,100.00"):
        client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    assert client.get_funds() == before and len(client.get_orders()) == 2
    client.place_order(PAPER_ITC, 22, "SELL", "CNC", "MARKET")  # the ITC sold again: funds for the buy-back
    client.place_order(PAPER_SBIN, 10, "BUY", "CNC", "MARKET")
    assert client.get_funds().available == 1100.0 + 8800.0 - 8900.0 == 1000.0
    clock.set(ist(2026, 12, 9, 10, 0))
    (holding,) = client.get_holdings()
    assert (holding.qty, holding.avg_price) == (10, 900.0)  # sold and bought back the same day: the holding stays
    assert client.get_funds().total == 1000.0


def test_a_short_option_margin_is_12_percent_of_the_underlying_in_margin_and_orders(
        tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=190000)
    ce = paper_option(client)
    push(client, NIFTY, 23500.0)
    push(client, ce, 200.0)
    margin = client.calculate_margin([tt.OrderLeg(ce, 65, tt.Side.SELL, tt.ProductType.NRML, tt.OrderType.LIMIT,
                                                  price=200.0)])
    assert (margin.total, margin.span, margin.final_total) == (183300.0, 183300.0, 183300.0)
    client.place_order(ce, 65, "SELL", "NRML", "MARKET")
    funds = client.get_funds()
    assert (funds.used, funds.total) == (183300.0, 190000.0 + 65 * 200.0)
    with pytest.raises(tt.InsufficientFundsError, match="needs 183,300.00"):  # the premium received is no margin
        client.place_order(ce, 65, "SELL", "NRML", "MARKET")


def test_a_replayed_tick_never_fills_an_order_before_it_was_placed(tmp_path: Path, clients: list) -> None:
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    early = int(ist(2026, 12, 2, 9, 30).timestamp() * 1000)  # recorded half an hour before the order
    path = tmp_path / "ticks.jsonl"
    path.write_text(json.dumps({"instrument": "NSE:SBIN", "ts": early, "mode": "ltp", "ltp": 899.0}) + "\n")
    client = paper_client(clients, tmp_path, clock, prices=str(path))
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=900.0)
    ticks: "queue.Queue[tt.Tick]" = queue.Queue()
    client.subscribe(PAPER_SBIN, on_tick=ticks.put, mode="ltp")
    assert ticks.get(timeout=5).ltp == 899.0
    order = client.get_order(order_id)
    (trade,) = client.get_trades()
    assert order.status is COMPLETE and trade.timestamp >= order.placed_at and order.updated_at >= order.placed_at


def test_order_updates_right_after_registering_are_not_lost(tmp_path: Path, clients: list,
                                                            paper_clock: FakeClock) -> None:
    client = paper_client(clients, tmp_path, paper_clock)
    updates: "queue.Queue[tt.Order]" = queue.Queue()
    client.on_order_update(updates.put)
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "MARKET")  # before the feed has connected
    got = [updates.get(timeout=5), updates.get(timeout=5)]
    assert [(o.id, o.status) for o in got] == [(order_id, OPEN), (order_id, COMPLETE)]
    with pytest.raises(queue.Empty):
        updates.get(timeout=0.3)  # each change once


def test_cli_stream_record_after_a_cut_line_keeps_every_new_tick(tmp_path: Path) -> None:
    """A recording killed mid-line (kill -9, a full disk) and appended to: the first new tick was
    glued to the cut line, and replay skipped both."""
    record = tmp_path / "ticks.jsonl"
    record.write_text('{"instrument": "NSE:SBIN", "ts": 17961')
    done = cli(["stream", "NSE:SBIN", "--seconds", "0.5", "--record", str(record), "--json"], tmp_path,
               env={"TTCONNECT_TICK_INTERVAL": "0.05"})
    assert done.returncode == 0, done.stderr
    shown = [json.loads(line)["ltp"] for line in done.stdout.splitlines()]
    lines = record.read_text().splitlines()
    assert lines[0] == '{"instrument": "NSE:SBIN", "ts": 17961' and len(shown) >= 3
    assert [json.loads(line)["ltp"] for line in lines[1:]] == shown


def test_cli_stream_faults_are_one_line_errors(tmp_path: Path) -> None:
    done = cli(["stream", "NSE:SBIN", "--seconds", "1", "--record", str(tmp_path / "no" / "such" / "x.jsonl")],
               tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: --record") and "cannot write it" in done.stderr
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TTCONNECT_")}
    full_env["PYTHONPATH"] = str(HERE)
    reader = subprocess.run(f"{shlex_quote(sys.executable)} -m ttconnect stream NSE:SBIN --seconds 3 | head -1",
                            shell=True, cwd=str(tmp_path), env=full_env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in reader.stderr and "BrokenPipe" not in reader.stderr
    assert reader.stdout.startswith("NSE:SBIN")


def test_cli_environment_variables_of_other_tools_are_ignored_and_typos_refused(tmp_path: Path) -> None:
    assert cli_json(["funds"], tmp_path, env={"TTCONNECT_CI_VENV": "/tmp/venv"})["total"] == 1000000.0  # .ci/run's
    typo = cli(["funds"], tmp_path, env={"TTCONNECT_API_KY": "abc"})
    assert typo.returncode == 3 and "TTCONNECT_API_KY names no config key; did you mean TTCONNECT_API_KEY?" in typo.stderr
    hours = cli(["funds"], tmp_path, env={"TTCONNECT_MARKET_HOURS": "1"})  # as shells say true
    assert hours.returncode == 0, hours.stderr
    for seed in ("--5", "\u00b2", "-"):  # not integers: text seeds, as any other text
        assert cli_json(["funds"], tmp_path, env={"TTCONNECT_SEED": seed})["total"] == 1000000.0
    for name, near in (("TTCONNECT_SEDD", "TTCONNECT_SEED"), ("TTCONNECT_PIM", "TTCONNECT_PIN")):
        done = cli(["funds"], tmp_path, env={name: "1"})  # one letter off a short key
        assert done.returncode == 3 and f"did you mean {near}?" in done.stderr
    for other in ("TTCONNECT_API_SECRET_FILE", "TTCONNECT_MARKET_HOURS_TZ"):  # another tool's names: not typos
        assert cli(["funds"], tmp_path, env={other: "x"}).returncode == 0


def test_cli_rate_limits_from_the_environment_are_read_as_json(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    """Any config key may come from TTCONNECT_<KEY>: rate_limits, a mapping, was taken as text and
    refused ('must map an endpoint class...') whatever it said."""
    monkeypatch.setenv("TTCONNECT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TTCONNECT_RATE_LIMITS", '{"default": [[5, 1.0], [100, 60.0]]}')
    assert tt.main(["--json", "funds"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 1000000.0
    monkeypatch.setenv("TTCONNECT_RATE_LIMITS", '{"defualt": 5}')  # read, and its class checked by name
    assert tt.main(["funds"]) == 3
    assert "'defualt'" in capsys.readouterr().err
    monkeypatch.setenv("TTCONNECT_RATE_LIMITS", "{default: 5}")
    assert tt.main(["funds"]) == 3
    assert "TTCONNECT_RATE_LIMITS must be a JSON object such as" in capsys.readouterr().err


@pytest.mark.parametrize("name, value, words", [
    ("TTCONNECT_SEED", "9" * 5000, "TTCONNECT_SEED has 5000 digits, more than an int seed may have"),  # int(): ValueError
    ("TTCONNECT_CAPITAL", "[" * 100000, "TTCONNECT_CAPITAL must be a number or true/false, got '[[["),  # RecursionError
], ids=["long seed", "deep capital"])
def test_cli_environment_values_past_pythons_limits_are_one_line_errors(name: str, value: str, words: str,
                                                                        tmp_path: Path, monkeypatch: Any,
                                                                        capsys: Any) -> None:
    """Both printed a traceback and exited 1."""
    monkeypatch.setenv("TTCONNECT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(name, value)
    assert tt.main(["funds"]) == 3
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err) < 300


@pytest.mark.parametrize("args", [
    ["place", "NSE:SBIN", "BUY", "1_000"], ["place", "NSE:SBIN", "BUY", "1_00"], ["place", "NSE:SBIN", "BUY", "\u0661\u0660"],
    ["place", "NSE:SBIN", "BUY", "1", "--type", "LIMIT", "--price", "8_00"],
    ["modify", "261202000000001", "--qty", "1_0"],
], ids=["underscores", "misplaced underscore", "arabic-indic digits", "price underscores", "modify qty"])
def test_cli_numbers_are_ascii_digits_only(args: List[str], tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    """int() and float() read '1_000' and other scripts' digits: 'place NSE:SBIN BUY 1_00' placed
    100 shares (and '1e3' was refused)."""
    monkeypatch.setenv("TTCONNECT_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        tt.main(args)
    assert exited.value.code == 2
    assert "in digits" in capsys.readouterr().err
    assert tt.main(["orders", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_main_in_process_puts_back_the_sigterm_handler(tmp_path: Path, monkeypatch: Any,
                                                           capsys: Any) -> None:
    import signal

    monkeypatch.setenv("TTCONNECT_CACHE_DIR", str(tmp_path))
    mine = lambda signum, frame: None  # noqa: E731 - the host program's own handler
    before = signal.signal(signal.SIGTERM, mine)
    try:
        assert tt.main(["funds", "--json"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
    assert json.loads(capsys.readouterr().out)["total"] == 1000000.0


def test_cli_cells_show_money_to_the_paisa_and_finer_prices_whole() -> None:
    cells = [tt._cli_cell(v) for v in (0.5, -0.05, 0.1 + 0.2, 1234.5, 0.0025, 0.1225, 0.0)]
    assert cells == ["0.50", "-0.05", "0.30", "1,234.50", "0.0025", "0.1225", "0.00"]


def test_cli_errors_writing_the_output_are_one_line(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "ttconnect", "orders"], cwd=str(tmp_path), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith("TTCONNECT_")},
                                   "PYTHONPATH": str(HERE)})
    assert done.returncode == 3 and done.stderr.strip() == "error: No space left on device"
    record = cli(["stream", "NSE:SBIN", "--seconds", "5", "--record", "/dev/full"], tmp_path)
    assert record.returncode == 3 and "Traceback" not in record.stderr and "No space left on device" in record.stderr


def test_cli_stream_stopped_by_sigterm_keeps_every_tick_it_showed(tmp_path: Path) -> None:
    """kill/timeout/a service manager stop with SIGTERM: the recording is closed whole."""
    import signal

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TTCONNECT_")}, "PYTHONPATH": str(HERE)}
    proc = subprocess.Popen([sys.executable, "-m", "ttconnect", "stream", "NSE:SBIN", "NSE:NIFTY", "--seconds", "60",
                             "--record", "rec.jsonl"], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        shown = [proc.stdout.readline() for _ in range(6)]  # type: ignore[union-attr]
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip() == "terminated", err
    assert all(line.startswith(("NSE:SBIN", "NSE:NIFTY")) for line in shown)
    recorded = (tmp_path / "rec.jsonl").read_text().splitlines()
    assert len(recorded) == len(shown) + len(rest.splitlines()) >= 6
    assert [json.loads(line)["instrument"] for line in recorded[:6]] == [line.split()[0] for line in shown]


def test_cli_seed_from_the_environment_may_be_text(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = cli_json(["funds"], tmp_path / "a", env={"TTCONNECT_SEED": "abc"})
    assert a["total"] == 1000000.0
    assert cli_json(["funds"], tmp_path / "b", env={"TTCONNECT_SEED": "-12"})["total"] == 1000000.0


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_two_clients_writing_in_turn_across_compactions_agree(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                              scripted: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(tt, "_PAPER_COMPACT_AFTER", 3)  # the whole state is rewritten every few orders
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    b = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    placed = []
    for i in range(20):
        client = (a, b)[i % 2] if i % 5 else b  # in turn, sometimes one twice: each write starts on a stale state
        placed.append(client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0 + i))
    assert len(set(placed)) == 20
    for client in (a, b, paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)):
        assert sorted(o.id for o in client.get_orders()) == sorted(placed)
        funds = client.get_funds()
        assert (funds.used, funds.available) == (sum(500.0 + i for i in range(20)), 100000 - 10190.0)
    events = sqlite3.connect(str(tmp_path / "paper_default.db")).execute("SELECT seq, kind FROM events").fetchall()
    assert events[0][1] == "state" and [seq for seq, _ in events] == list(range(events[0][0], events[-1][0] + 1))


def test_opening_an_account_another_process_creates_at_the_same_moment(tmp_path: Path, clients: list,
                                                                       paper_clock: FakeClock, scripted: str,
                                                                       monkeypatch: Any) -> None:
    real_load = tt._PaperEngine._load
    raced: List[bool] = []

    def load_then_lose_the_race(engine: Any) -> None:
        real_load(engine)
        if not raced:  # it found no account; another process creates it before this one writes
            raced.append(True)
            other = tt.TTConnect("paper", {"cache_dir": str(tmp_path), "prices": scripted, "capital": 5000},
                                 clock=paper_clock)
            other.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=800.0)
            other.close()

    monkeypatch.setattr(tt._PaperEngine, "_load", load_then_lose_the_race)
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=5000)
    assert raced == [True]
    (order,) = client.get_orders()  # the other process's account, read again: not overwritten
    assert order.price == 800.0 and client.get_funds().available == 4200.0


def test_a_busy_account_file_on_the_feed_thread_is_a_warning(tmp_path: Path, clients: list, scripted: str,
                                                             caplog: Any) -> None:
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    client = paper_client(clients, tmp_path, clock)  # the random walk: the feed runs advance()
    order_id = client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=1.0)
    caplog.set_level(logging.WARNING, logger="ttconnect")
    proc = hold_lock(account_file(tmp_path), "immediate")
    try:
        clock.set(ist(2026, 12, 2, 16, 0))  # the day's close is due: the roll must write
        client._local.advance()  # as the feed thread calls it
    finally:
        release(proc)
    assert any("account file is busy" in r.getMessage() for r in caplog.records)
    assert client.get_orders() == [] and client.get_funds().available == 1000000.0  # the next look rolls the day
    with pytest.raises(tt.OrderNotFoundError):
        client.get_order(order_id)  # expired with the session it was placed in


# -- the account log is checked at the end of each answer (optimistic): a stale state is never believed

def test_a_cancel_of_an_order_another_process_placed_is_not_refused_on_a_stale_state(
        tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    b = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    placed = b.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=500.0)
    assert a.cancel_order(placed) == placed  # a's state had no such order: refused on it, then read again
    assert [o.status for o in b.get_orders()] == [tt.OrderStatus.CANCELLED]
    with pytest.raises(tt.OrderNotFoundError):  # an order no process has is still refused
        a.cancel_order("261202999999999")


def test_funds_another_process_released_are_seen_before_an_order_is_refused(
        tmp_path: Path, clients: list, paper_clock: FakeClock, scripted: str) -> None:
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    first = a.place_order(PAPER_SBIN, 18, "BUY", "CNC", "LIMIT", price=500.0)  # blocks 9,000 of 10,000
    b = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    a.cancel_order(first)  # b's state still has the 9,000 blocked
    second = b.place_order(PAPER_SBIN, 18, "BUY", "CNC", "LIMIT", price=500.0)
    assert b.get_funds().available == 1000.0 and a.get_order(second).status is tt.OrderStatus.OPEN
    with pytest.raises(tt.InsufficientFundsError):  # refused on the log's latest state: it does not fit
        a.place_order(PAPER_SBIN, 4, "BUY", "CNC", "LIMIT", price=500.0)


def test_the_paper_log_refuses_a_row_that_is_not_its_next(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                          scripted: str) -> None:
    client = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=10000)
    client.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=500.0)
    db = sqlite3.connect(str(tmp_path / "paper_default.db"))
    (last,) = db.execute("SELECT MAX(seq) FROM events").fetchone()
    for seq in (last, last + 2):  # a writer behind the log, or one that skips a row
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO events (seq, kind, data) VALUES (?, 'change', '{}')", (seq,))
    db.close()
    assert len(client.get_orders()) == 1


def test_a_read_is_answered_while_another_process_keeps_writing(tmp_path: Path, clients: list,
                                                                 paper_clock: FakeClock, scripted: str,
                                                                 monkeypatch: Any) -> None:
    writer = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    reader = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    writer.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=100.0)  # the reader is behind
    real_load = tt._PaperEngine._load
    reads = [0]

    def read_then_the_writer_appends(engine: Any) -> None:  # the log has moved again by every check
        real_load(engine)
        if engine is not writer._local:
            reads[0] += 1
            writer.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=100.0)

    monkeypatch.setattr(tt._PaperEngine, "_load", read_then_the_writer_appends)
    # Each call reads the log once and answers on that (the account as of a moment during the call),
    # not again until the log stands still: a busy writer would starve the reader.
    assert len(reader.get_orders()) == 1 and reads == [1]
    assert reader.get_funds().available == 100000 - 2 * 100.0 and reads == [2]
    with pytest.raises(tt.OrderNotFoundError):  # a refusal on a state read during the call is final
        reader.cancel_order("261202999999999")
    assert reads == [3]
    third = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)  # opening reads too
    assert len(third.get_orders()) == 5 and reads == [5]


def test_an_interrupted_re_read_is_done_again_by_the_next_call(tmp_path: Path, clients: list,
                                                                paper_clock: FakeClock, scripted: str,
                                                                monkeypatch: Any) -> None:
    a = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    b = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    placed = b.place_order(PAPER_SBIN, 10, "BUY", "CNC", "LIMIT", price=500.0)  # a is behind
    real_load = tt._PaperEngine._load
    interrupted: List[bool] = []

    def ctrl_c_once(engine: Any) -> None:
        if engine is a._local and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # the user pressed Ctrl-C while the account was read again
        real_load(engine)

    monkeypatch.setattr(tt._PaperEngine, "_load", ctrl_c_once)
    with pytest.raises(KeyboardInterrupt):
        a.cancel_order(placed)
    assert [o.id for o in a.get_orders()] == [placed]  # not taken as up to date: read again
    assert a.get_funds().available == 95000.0
    assert a.cancel_order(placed) == placed and b.get_order(placed).status is tt.OrderStatus.CANCELLED


def test_opening_an_account_file_puts_back_its_order_check(tmp_path: Path, clients: list, paper_clock: FakeClock,
                                                           scripted: str) -> None:
    first = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    first.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=100.0)
    first.close()
    db = sqlite3.connect(str(tmp_path / "paper_default.db"))
    db.execute("DROP TRIGGER events_in_order")  # a file written by an older ttconnect has none
    db.close()
    again = paper_client(clients, tmp_path, paper_clock, prices=scripted, capital=100000)
    db = sqlite3.connect(str(tmp_path / "paper_default.db"))
    assert db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall() == [("events_in_order",)]
    db.close()
    assert len(again.get_orders()) == 1


def account_snapshot(client: tt.TTConnect) -> Tuple[Any, ...]:
    return (client.get_funds(), client.get_orders(), client.get_positions(), client.get_holdings(),
            client.get_trades(), [client.get_order_history(o.id) for o in client.get_orders()])


def test_an_account_logged_as_json_text_by_an_earlier_version_reads_the_same(tmp_path: Path, clients: list,
                                                                              scripted: str) -> None:
    """Earlier versions wrote each log row as JSON text; this one pickles them. An account of
    JSON rows reads exactly as it was, and goes on (new rows pickled after the old ones)."""
    path, ids = rich_account(clients, tmp_path, scripted)
    before = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
    expected = account_snapshot(before)
    before.close()
    con = sqlite3.connect(str(path))
    rows = con.execute("SELECT seq, data FROM events ORDER BY seq").fetchall()
    assert rows and all(isinstance(data, bytes) for _, data in rows)
    unpickled = [(seq, pickle.loads(data)) for seq, data in rows]
    for seq, value in unpickled:
        con.execute("UPDATE events SET data = ? WHERE seq = ?", (json.dumps(value, separators=(",", ":")), seq))
    con.commit()
    assert all(isinstance(data, str) for (data,) in con.execute("SELECT data FROM events"))
    con.close()
    again = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
    assert account_snapshot(again) == expected
    assert [o.id for o in expected[1]] == ids[1:] and expected[1][-1].status is tt.OrderStatus.TRIGGER_PENDING
    push(again, PAPER_SBIN, 900.0)
    new = again.place_order(PAPER_SBIN, 1, "BUY", "CNC", "LIMIT", price=700.0)
    con = sqlite3.connect(str(path))
    kinds = [type(data) for (data,) in con.execute("SELECT data FROM events ORDER BY seq")]
    con.close()
    assert kinds[:len(rows)] == [str] * len(rows) and kinds[len(rows):] == [bytes]
    again.close()
    third = open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
    assert third.get_order(new).status is tt.OrderStatus.OPEN and len(third.get_orders()) == len(ids)


class _Validity(str, enum.Enum):
    """A strategy's own enum of validities: equal to the strings, but no plain str."""

    DAY = "DAY"


class _Lots(int):
    pass


def test_order_values_of_the_callers_own_str_and_int_types_are_stored_plain(tmp_path: Path, clients: list,
                                                                            scripted: str) -> None:
    """They pass validation (they equal what is valid); the account must still read back."""
    clock = FakeClock(ist(2026, 12, 2, 10, 0))
    client = open_paper(clients, tmp_path, clock, prices=scripted)
    push(client, PAPER_SBIN, 900.0)
    placed = client.place_order(PAPER_SBIN, _Lots(2), "BUY", "CNC", "LIMIT", price=800.0, validity=_Validity.DAY)
    client.close()
    again = open_paper(clients, tmp_path, clock, prices=scripted)
    order = again.get_order(placed)
    assert (order.qty, order.status) == (2, tt.OrderStatus.OPEN) and type(order.qty) is int
    con = sqlite3.connect(str(account_file(tmp_path)))
    (data,) = con.execute("SELECT data FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    con.close()
    assert b"_Validity" not in data and b"_Lots" not in data


class _Touch:
    """Pickled, it would run ``open(path, "w")`` when loaded: what a doctored log row could try."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("doctor", ["code", "class", "truncated", "not a pickle", "garbage json", "huge length",
                                    "deep json"])
def test_a_doctored_log_row_is_refused_by_name_and_runs_nothing(doctor: str, tmp_path: Path, clients: list,
                                                                scripted: str) -> None:
    path, _ = rich_account(clients, tmp_path, scripted)
    touched = tmp_path / "touched"
    con = sqlite3.connect(str(path))
    seq, data = con.execute("SELECT seq, data FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    value = pickle.loads(data)
    doctored: Any = {
        "code": pickle.dumps(_Touch(str(touched))),
        "class": pickle.dumps({**value, "a": dt.date(2026, 12, 2)}),  # a class, even a harmless one
        "truncated": data[: len(data) // 2],
        "not a pickle": b"\x80\x04this is no pickle",
        "garbage json": "{not json",
        "huge length": b"\x80\x04\x8e" + (2 ** 62).to_bytes(8, "little") + b"abc",  # BINBYTES8: MemoryError
        "deep json": "[" * 100000 + "]" * 100000,  # RecursionError
    }[doctor]
    con.execute("UPDATE events SET data = ? WHERE seq = ?", (doctored, seq))
    con.commit()
    con.close()
    with pytest.raises(tt.ConfigurationError, match=r"paper account file .*paper_default\.db is damaged") as caught:
        open_paper(clients, tmp_path, FakeClock(ist(2026, 12, 2, 11, 0)), prices=scripted)
    assert f"log row {seq}" in str(caught.value) and "move it aside" in str(caught.value)
    assert not touched.exists()
    if doctor in ("code", "class"):
        assert "rows hold only data" in str(caught.value)


def test_the_lazy_indexes_are_written_under_the_store_file_lock(tmp_path: Path, clients: list,
                                                                paper_clock: FakeClock, monkeypatch: Any) -> None:
    # The one in-place write to the shared instruments file: another process checking the file
    # under the lock must never see it grow between its size and its header (it would move a
    # good store aside as damaged; 12 processes opening and searching at once did, 1 round in 3).
    client = paper_client(clients, tmp_path, paper_clock)
    held = [False]
    seen: List[bool] = []
    real_lock = tt._FileLock

    class RecordingLock(real_lock):  # type: ignore[misc, valid-type]
        def __enter__(self) -> Any:
            got = super().__enter__()
            held[0] = True
            return got

        def __exit__(self, *exc: Any) -> None:
            held[0] = False
            super().__exit__(*exc)

    class Probe(tuple):
        def __iter__(self) -> Any:
            seen.append(held[0])
            return super().__iter__()

    monkeypatch.setattr(tt, "_FileLock", RecordingLock)
    monkeypatch.setattr(tt, "_LAZY_INDEXES", Probe(tt._LAZY_INDEXES))
    assert PAPER_SBIN in client.search("SBI")
    assert seen == [True] and held == [False]
    db = sqlite3.connect(str(tmp_path / "instruments.db"))
    names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    assert "ix_broker_tokens_symbol" in names
