"""Hostile inputs and faults for ttconnect (issue #8).

Every case feeds one bad input or fault and asserts the exact outcome: a typed error (a
``TTConnectError`` subclass whose message says what to do), or correct recovery with nothing
lost and nothing silently wrong. Nothing here touches the internet: HTTP goes through
``responses`` or small servers on 127.0.0.1, time is injected (``FakeClock``), and the only
real waits are bounded ones on events and queues.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import gzip
import io
import json
import logging
import os
import queue
import random
import re
import socket
import sqlite3
import subprocess
import threading
import time
import traceback
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
import responses

import ttconnect as tt
from test_ttconnect import (  # noqa: F401 - clients, clock, day_clock and ws_server are fixtures
    ANGEL_JSON,
    ANGELONE,
    CASE,
    CREDS,
    KITE_CSV,
    MASTERS,
    NIFTY_CE,
    SBIN,
    TOTP_SECRET,
    URLS,
    ZERODHA,
    FakeClock,
    MockApi,
    WsServer,
    _book_with,
    angel_packet,
    clients,
    clock,
    contract_client,
    day_clock,
    file_digest,
    fixture_text,
    ist,
    kite_feed,
    kite_frame,
    kite_packet,
    open_client,
    rest_client,
    stream_event,
    ws_server,
)

INFY = tt.Equity(exchange="NSE", symbol="INFY")
INFY_TOKEN = {"zerodha": "408065", "angelone": "1594"}
DAY2 = ist(2026, 11, 22, 10, 0)  # the day after ``clock``: a new master dump is due
LOGIN = json.loads(fixture_text("angelone", "login.json"))["data"]
RENEWED = json.loads(fixture_text("angelone", "renew_token.json"))["data"]
KITE_LOGIN = json.loads(fixture_text("zerodha", "login.json"))["data"]


# ============================================================================
# Shared checks
# ============================================================================


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
# 1. Instrument masters (both brokers)
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
# "skips_row" (NSE:SBIN's row is counted malformed, the rest loads), "loads" (the master is
# fine), "row_or_refused" (either of the first two, never garbage in the DB).
MASTER_CASES = [
    pytest.param("zerodha", lambda: gzip.compress(KITE_CSV), {}, "refused", "not a readable Kite instrument CSV",
                 id="kite-gzip-bytes-without-content-encoding"),
    pytest.param("zerodha", lambda: gzip.compress(KITE_CSV), {"Content-Encoding": "gzip"}, "loads", "",
                 id="kite-gzip-with-content-encoding"),
    pytest.param("zerodha", _garbage, {}, "refused", "not a", id="kite-binary-garbage"),
    pytest.param("zerodha", lambda: KITE_CSV.split(b"\n", 1)[0] + b"\n", {}, "refused", "no usable instrument rows",
                 id="kite-header-only"),
    pytest.param("zerodha", lambda: kite_with(name="X" * 200_000), {}, "row_or_refused", "",
                 id="kite-field-over-csv-field-limit"),
    pytest.param("zerodha", lambda: kite_with(lot_size="nan"), {}, "skips_row", "", id="kite-lot-nan"),
    pytest.param("zerodha", lambda: kite_with(lot_size="-1"), {}, "skips_row", "", id="kite-lot-negative"),
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
    pytest.param("angelone", lambda: b"", {}, "refused", "the file is empty", id="angel-empty"),
    pytest.param("angelone", lambda: b"[]", {}, "refused", "no usable instrument rows", id="angel-empty-array"),
    pytest.param("angelone", lambda: b"[" * 100_000, {}, "refused", "truncated or malformed", id="angel-nesting-100000"),
    pytest.param("angelone", lambda: _angel_inserted(["NSE", "SBIN-EQ", "3045"]), {}, "skips_row_any", "",
                 id="angel-array-where-a-row-object-belongs"),
    pytest.param("angelone", lambda: angel_with(name=json.loads("[" * 900 + "]" * 900)), {}, "row_or_refused", "",
                 id="angel-one-row-nested-900-deep"),
    pytest.param("angelone", lambda: ANGEL_JSON.replace(b'"name":"SBIN"', b'"name":' + b"[" * 5000 + b"]" * 5000, 1),
                 {}, "row_or_refused", "", id="angel-one-row-nested-5000-deep"),
    pytest.param("angelone", lambda: ANGEL_JSON[: len(ANGEL_JSON) * 2 // 3], {}, "refused", "truncated",
                 id="angel-truncated-json"),
    pytest.param("angelone", lambda: angel_with(lotsize=float("inf")), {}, "skips_row", "", id="angel-lot-infinity"),
    pytest.param("angelone", lambda: angel_with(lotsize=1e30), {}, "skips_row", "", id="angel-lot-1e30"),
    pytest.param("angelone", lambda: angel_with(tick_size="NaN"), {}, "skips_row", "", id="angel-tick-nan"),
    pytest.param("angelone", lambda: angel_with(token={"value": "3045"}), {}, "skips_row", "",
                 id="angel-object-where-token-belongs"),
    pytest.param("angelone", lambda: angel_with(exch_seg=["NSE"]), {}, "skips_row", "",
                 id="angel-list-where-exchange-belongs"),
    pytest.param("angelone", lambda: angel_with(freeze_qty="9" * 30), {}, "skips_row", "", id="angel-freeze-qty-huge"),
    pytest.param("angelone", lambda: json.dumps(angel_rows()[:10]).encode(), {}, "refused", "under half",
                 id="angel-under-half-the-previous-rows"),
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
        assert any("skipped malformed row" in m for m in messages(caplog))

    if kind == "refused":
        refused((detail,))
    elif kind == "row_or_refused":
        try:
            client = start("fail")
        except tt.BrokerError:
            refused(())
        else:
            skipped(client)
            conn = sqlite3.connect(db)
            assert conn.execute("SELECT COUNT(*) FROM instruments WHERE symbol LIKE '%' || char(65533) || '%'"
                                " OR length(name) > 1000").fetchone()[0] == 0
            conn.close()
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
def test_first_run_with_a_garbage_master_says_what_failed(broker_id: str, tmp_path: Path, clock: FakeClock) -> None:
    with responses.RequestsMock() as rs:
        rs.get(URLS[broker_id], body=b"\x1f\x8b\x08\x00" + _garbage(512))
        expect(tt.BrokerError, lambda: tt.TTConnect(broker_id, cache_dir=str(tmp_path), on_stale="warn", clock=clock),
               f"No instrument DB for {broker_id} is cached", "check the network or config 'instruments_url'")
    assert os.listdir(tmp_path) == ["instruments.db.lock"]


# ============================================================================
# 2. The instrument DB and the cache dir
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
        client = no_raw(lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), clock=clock, sleep=clock.sleep))
        clients.append(client)
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
            expect(tt.ConfigurationError, lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), clock=clock,
                                                               sleep=clock.sleep),
                   "could not be loaded", "kept untouched", "permissions")
            client = no_raw(lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                                 sleep=clock.sleep))
            clients.append(client)
        assert client.resolve(SBIN) == "779521"
        assert [str(i) for i in client.search("INF")] == ["NSE:INFY"]  # no index can be built: it scans
    assert file_digest(tmp_path / "instruments.db") == before
    assert any("serving the cached DB" in m for m in messages(caplog))


@pytest.mark.parametrize("on_stale", ["fail", "warn"])
def test_a_cache_dir_that_is_a_file(on_stale: str, tmp_path: Path, clock: FakeClock) -> None:
    target = tmp_path / "cache.txt"
    target.write_text("a user's file")
    with no_request():
        expect(tt.ConfigurationError, lambda: tt.TTConnect("zerodha", cache_dir=str(target), on_stale=on_stale,
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
            expect(tt.ConfigurationError, lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), clock=clock,
                                                               sleep=clock.sleep),
                   "database or disk is full", "kept untouched", "free space")
        else:
            client = no_raw(lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                                 sleep=clock.sleep))
            clients.append(client)
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

    def no_space(self: Any, url: str, dest: str, headers: Any) -> int:
        with open(dest, "wb") as f:
            f.write(KITE_CSV[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tt._Transport, "_download_once", no_space)
    clock.set(DAY2)
    expect(tt.ConfigurationError, lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), clock=clock,
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
        expect(tt.ConfigurationError, lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), clock=clock,
                                                           sleep=clock.sleep), "cache dir", "kept untouched")
        client = no_raw(lambda: tt.TTConnect("zerodha", cache_dir=str(tmp_path), on_stale="warn", clock=clock,
                                             sleep=clock.sleep))
        clients.append(client)
        assert client.resolve(SBIN) == "779521"
        expect(tt.ConfigurationError, client.refresh_instruments, "cache dir")
    assert any("serving the cached DB" in m for m in messages(caplog))


# ============================================================================
# 3. Session files and session stores
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
    pytest.param(_session(mode="bogus"), id="unknown-mode"),
    pytest.param(_session(expires_at="2026-11-24T00:00:00"), id="naive-timestamp"),
    pytest.param(_session(obtained_at="2026-11-22T10:00:00+05:30", expires_at="2026-11-23T00:00:00+05:30"), id="expired"),
    pytest.param(_session(expires_at=1795458600), id="expiry-a-number"),
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
        kite = tt.TTConnect("zerodha", {"cache_dir": str(tmp_path), "cache_session": True, **creds}, clock=day_clock,
                            sleep=day_clock.sleep)
        clients.append(kite)
        kite.get_profile()
        assert len(api.calls("login")) == 1
        assert api.calls("get_profile")[0].request.headers["Authorization"] == f"token kitekey01:{KITE_LOGIN['access_token']}"


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
            assert angel.get_profile().user_id == "A123456"
        except tt.ConfigurationError as exc:
            if "angelone_session.json" not in str(exc):
                problem = f"ConfigurationError does not name the session file: {exc}"
        except BaseException as exc:  # noqa: BLE001
            problem = _raw(exc, " (expected the call to work, or a ConfigurationError naming the session file)")
    if problem:
        _fail_clean(problem)
