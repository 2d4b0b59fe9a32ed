"""Benchmark ttconnect against floors measured in the same run (machines are noisy).

Run ``python bench_ttconnect.py`` (``--quick`` for fewer repetitions). Everything is offline:
the full-size masters are generated here (bench_masters.py) and served from 127.0.0.1.

Sections:
  instruments  cold refresh of each master (Kite, AngelOne, Upstox) vs its floor, peak memory, warm start, resolve,
               import time.
  rest         per-call cost of get_positions and place_order against a Kite-like server on
               127.0.0.1, vs the same request on a bare kept-alive requests.Session.
  ticks        decode throughput of Kite full packets and AngelOne SnapQuotes into Ticks, vs
               one precompiled struct.Struct.unpack_from over the same bytes.
  paper        paper place_order -> filled MARKET order vs one INSERT + COMMIT into a WAL table in
               the same cache dir (the best of 5 interleaved rounds each); replay of 1,000,000 recorded
               ticks with 100 resting LIMIT orders (the best of 3 replays); the wall time of
               `python -m ttconnect demo`.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import py_compile
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_masters  # noqa: E402


# ----------------------------------------------------------------------------------------
# helpers


def _serve_files(routes: Dict[str, str]) -> Tuple[http.server.ThreadingHTTPServer, str]:
    """Serve local files on 127.0.0.1 (streamed, with Content-Length) from a thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = routes.get(self.path)
            if path is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.end_headers()
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_refresh(broker: str, url: str, cache_dir: str) -> None:
    """In a fresh process: one cold refresh; print seconds and memory as JSON."""
    import requests  # noqa: F401 - part of the baseline: the refresh needs it anyway

    import ttconnect

    # Start the high-water mark from here: whatever the imports peaked at (compiling the
    # module when no bytecode is cached, say) is not the refresh's doing.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # an older kernel: the peak then includes the imports, which only overstates it
    base = _proc_status_kib("VmRSS")
    started = time.perf_counter()
    client = ttconnect.TTConnect(broker, cache_dir=cache_dir, instruments_url=url, on_stale="fail")
    seconds = time.perf_counter() - started
    peak = _proc_status_kib("VmHWM")
    client.close()
    print(json.dumps({"seconds": seconds, "base_kib": base, "peak_kib": peak}))


def _run_child(args: List[str]) -> Dict[str, Any]:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                         capture_output=True, text=True, check=True, cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _per_call(fn: Callable[[], Any], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def _median_subprocess(code: str, env: Dict[str, str], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


MISSED: List[str] = []  # figures over their target: the run exits 1


def _verdict(label: str, ok: bool, over: str) -> str:
    if not ok:
        MISSED.append(label)
    return "ok" if ok else over


def _ratio_line(label: str, ours: float, floor: float, unit: str, limit: float) -> str:
    ratio = ours / floor
    verdict = _verdict(label, ratio <= limit, f"OVER {limit:g}x")
    return f"  {label:<34} {ours:9.3f} {unit}  floor {floor:9.3f} {unit}  ratio {ratio:5.2f}x  ({verdict})"


# ----------------------------------------------------------------------------------------
# instruments


def bench_instruments(reps: int) -> None:
    import ttconnect

    # Bytecode first, as an installed module has it: a child that compiles ttconnect.py keeps the
    # freed compiler memory and the refresh would reuse it unseen, understating its peak.
    py_compile.compile(os.path.join(HERE, "ttconnect.py"), doraise=True)
    work = tempfile.mkdtemp(prefix="ttbench-")
    try:
        kite_csv = os.path.join(work, "kite.csv")
        angel_json = os.path.join(work, "angel.json")
        upstox_gz = os.path.join(work, "complete.json.gz")
        kite_rows = bench_masters.make_kite_csv(kite_csv)
        angel_rows = bench_masters.make_angel_json(angel_json)
        upstox_rows = bench_masters.make_upstox_json_gz(upstox_gz)
        import gzip

        with gzip.open(upstox_gz, "rb") as f:
            upstox_json_size = len(f.read())
        print(f"masters: kite {kite_rows:,} rows {os.path.getsize(kite_csv) / 2**20:.1f} MiB, "
              f"angelone {angel_rows:,} rows {os.path.getsize(angel_json) / 2**20:.1f} MiB, "
              f"upstox {upstox_rows:,} rows {os.path.getsize(upstox_gz) / 2**20:.1f} MiB gzipped "
              f"({upstox_json_size / 2**20:.1f} MiB of JSON)")
        server, root = _serve_files({"/kite.csv": kite_csv, "/angel.json": angel_json, "/complete.json.gz": upstox_gz})
        # (file, URL, floor, refresh ratio limit, memory limit in bytes over the baseline)
        masters = {"zerodha": (kite_csv, root + "/kite.csv", bench_masters.floor_kite, 2.5, 2 * os.path.getsize(kite_csv)),
                   "angelone": (angel_json, root + "/angel.json", bench_masters.floor_angel, 3.0,
                                2 * os.path.getsize(angel_json)),
                   # the memory bound: the uncompressed JSON (the SDK's way holds all of it, and more)
                   "upstox": (upstox_gz, root + "/complete.json.gz", bench_masters.floor_upstox, 2.5, upstox_json_size)}
        print(f"cold refresh (download from 127.0.0.1 + parse + build + atomic swap): best of {reps}, floor and "
              "refresh interleaved")
        for broker, (path, url, floor_fn, limit, memory_limit) in masters.items():
            ours, floors, mem = [], [], []
            for i in range(reps):
                floors.append(floor_fn(path, os.path.join(work, f"floor-{broker}-{i}.db")))
                cache = os.path.join(work, f"cache-{broker}-{i}")
                result = _run_child(["refresh", broker, url, cache])
                ours.append(result["seconds"])
                mem.append((result["peak_kib"] - result["base_kib"]) * 1024)
            size = os.path.getsize(path)
            print(_ratio_line(f"{broker} refresh", min(ours), min(floors), "s ", limit))
            worst = max(mem)
            verdict = _verdict(f"{broker} refresh memory", worst <= memory_limit, f"OVER {memory_limit / 2**20:.1f} MiB")
            print(f"  {broker + ' peak memory over baseline':<34} {worst / 2**20:9.1f} MiB  master {size / 2**20:.1f} MiB"
                  f"  ratio {worst / size:5.2f}x  (limit {memory_limit / 2**20:.1f} MiB: {verdict})")

        # Warm start and resolve, in this process, against the zerodha DB built above.
        cache = os.path.join(work, "cache-zerodha-0")
        url = masters["zerodha"][1]

        def warm() -> None:
            ttconnect.TTConnect("zerodha", cache_dir=cache, instruments_url=url).close()

        warm()
        starts = sorted(_per_call(warm, 1) for _ in range(20))
        median = starts[len(starts) // 2]
        print(f"  {'warm start TTConnect(...)':<34} {median * 1e3:9.2f} ms  (limit 50 ms: "
              f"{_verdict('warm start', median < 0.05, 'OVER')})")

        client = ttconnect.TTConnect("zerodha", cache_dir=cache, instruments_url=url)
        instruments: List[Any] = []
        for symbol in ("NIFTY", "BANKNIFTY", "RELIANCE", "SBIN", "INFY"):
            for expiry in client.expiries(symbol)[:3]:
                instruments.extend(client.option_chain(symbol, expiry))
        instruments = instruments[:5000]
        started = time.perf_counter()
        for inst in instruments:
            client.resolve(inst)
        uncached = (time.perf_counter() - started) / len(instruments)
        cached = min(_per_call(lambda: [client.resolve(i) for i in instruments], 1) for _ in range(5)) / len(instruments)
        client.close()
        print(f"  {'resolve, uncached':<34} {uncached * 1e6:9.2f} us  over {len(instruments)} options (limit 100 us: "
              f"{_verdict('resolve uncached', uncached < 100e-6, 'OVER')})")
        print(f"  {'resolve, cached':<34} {cached * 1e6:9.2f} us  (limit 5 us: {_verdict('resolve cached', cached < 5e-6, 'OVER')})")
        server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Import time, as an installed module runs it: from compiled bytecode. Bare, ttconnect and
    # requests start in turn, and the medians of the paired differences are reported (drift on a
    # shared machine hits all three alike).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = HERE
    ours, theirs = [], []
    for _ in range(31):
        bare = _median_subprocess("pass", env, 1)
        ours.append(_median_subprocess("import ttconnect", env, 1) - bare)
        theirs.append(_median_subprocess("import requests", env, 1) - bare)
    added, requests_added = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    # Against requests in the same run: the machine's speed swings 2x, the ratio holds.
    ratio = added / requests_added
    print(f"  {'import ttconnect adds':<34} {added:9.1f} ms  (median of 31 paired starts; import requests adds "
          f"{requests_added:.1f} ms, so {ratio:.2f}x of it; limit 0.35x: {_verdict('import', ratio <= 0.35, 'OVER')})")


# ----------------------------------------------------------------------------------------
# rest


def _child_serve() -> None:
    """A Kite-like REST server on 127.0.0.1 (own process, so it does not share our GIL)."""
    fixtures = os.path.join(HERE, "fixtures")
    bodies = {
        ("GET", "/portfolio/positions"): "zerodha/get_positions.json",
        ("POST", "/orders/regular"): "zerodha/place_order.json",
        ("GET", "/instruments"): "zerodha/instruments.csv",
        ("GET", "/v2/portfolio/short-term-positions"): "upstox/get_positions.json",
        ("POST", "/v3/order/place"): "upstox/place_order.json",
        ("GET", "/complete.json.gz"): "upstox/instruments.json.gz",
    }
    payload = {key: open(os.path.join(fixtures, name), "rb").read() for key, name in bodies.items()}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real API

        def setup(self) -> None:
            super().setup()
            # headers and body go out as two writes: without this, Nagle + delayed ACK add 40 ms
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = payload.get((method, self.path.split("?", 1)[0]))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self._answer("POST")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a thread per kept-alive connection
    print(server.server_address[1], flush=True)
    server.serve_forever()


def bench_rest(rounds: int) -> None:
    import logging

    import requests

    import ttconnect

    logging.getLogger("ttconnect").setLevel(logging.ERROR)  # the fixture master has one malformed row on purpose
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", "serve"], stdout=subprocess.PIPE,
                              text=True, cwd=HERE)
    work = tempfile.mkdtemp(prefix="ttbench-rest-")
    try:
        assert server.stdout is not None
        root = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        client = ttconnect.TTConnect("zerodha", {
            "api_key": "benchkey", "access_token": "bench-token", "cache_dir": work, "root_url": root,
            "instruments_url": root + "/instruments", "rate_limits": {"default": 1e6, "orders": 1e6}})
        upstox = ttconnect.TTConnect("upstox", {
            "access_token": "bench-token", "cache_dir": work, "root_url": root,
            "instruments_url": root + "/complete.json.gz", "rate_limits": {"default": 1e6, "orders": 1e6}})
        up_headers = {"Accept": "application/json", "Api-Version": "2.0", "Authorization": "Bearer bench-token"}
        bare = requests.Session()
        headers = {"X-Kite-Version": "3", "Authorization": "token benchkey:bench-token"}
        opt = ttconnect.Option(exchange="NFO", symbol="NIFTY", expiry="2026-11-24", strike=23500, option_type="CE")
        form = {"tradingsymbol": "NIFTY26NOV23500CE", "exchange": "NFO", "transaction_type": "BUY", "order_type": "LIMIT",
                "quantity": "65", "product": "NRML", "validity": "DAY", "tag": "bench", "price": "120.5"}

        up_body = {"quantity": 65, "product": "D", "validity": "DAY", "price": 120.5, "tag": "bench-0000",
                   "instrument_token": "NSE_FO|52207", "order_type": "LIMIT", "transaction_type": "BUY",
                   "disclosed_quantity": 0, "trigger_price": 0, "is_amo": False, "slice": False}
        cases = {
            "get_positions": (lambda: client.get_positions(),
                              lambda: bare.get(root + "/portfolio/positions", headers=headers, timeout=7).json()),
            "place_order": (lambda: client.place_order(opt, 65, "BUY", "NRML", "LIMIT", price=120.5, tag="bench"),
                            lambda: bare.post(root + "/orders/regular", headers=headers, data=form, timeout=7).json()),
            "upstox get_positions": (lambda: upstox.get_positions(),
                                     lambda: bare.get(root + "/v2/portfolio/short-term-positions", headers=up_headers,
                                                      timeout=7).json()),
            "upstox place_order": (lambda: upstox.place_order(opt, 65, "BUY", "NRML", "LIMIT", price=120.5, tag="bench"),
                                   lambda: bare.post(root + "/v3/order/place", headers=up_headers, json=up_body,
                                                     timeout=7).json()),
        }
        print(f"REST per call against a Kite-like server on 127.0.0.1 (median of {rounds} rounds x 200 calls; floor = "
              "the same request on a bare kept-alive requests.Session, .json() included)")
        for name, (ours_fn, bare_fn) in cases.items():
            for _ in range(50):  # warm both connections and caches
                ours_fn()
                bare_fn()
            ours, floor = [], []
            for _ in range(rounds):  # interleaved, so drift hits both alike
                floor.append(_per_call(bare_fn, 200))
                ours.append(_per_call(ours_fn, 200))
            print(_ratio_line(name, statistics.median(ours) * 1e6, statistics.median(floor) * 1e6, "us", 1.1))
        client.close()
        upstox.close()
    finally:
        server.terminate()
        server.wait(timeout=5)
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# ticks


def bench_ticks(rounds: int) -> None:
    import struct

    import ttconnect

    n = 20_000
    # Kite: frames of 10 full packets (the feed batches), every field set, depth on both sides.
    kite_tokens = [13364994 + 256 * i for i in range(10)]
    packets = []
    for token in kite_tokens:
        values = [token, 12050, 65, 12010, 1_192_471, 256_443, 363_009, 11900, 12100, 11800, 11800, 1_795_415_400,
                  4_500_000, 4_600_000, 4_400_000, 1_795_415_401]
        depth = []
        for i in range(10):
            depth += [65 * (i + 1), 12050 + (i - 5) * 5, i + 1]
        body = struct.pack(">16I" + "IIH2x" * 10, *values, *depth)
        packets.append(struct.pack(">H", len(body)) + body)
    kite_frame = struct.pack(">H", len(packets)) + b"".join(packets)
    kite_instruments = {t: object() for t in kite_tokens}
    kite_floor_struct = struct.Struct(">16I" + "IIH2x" * 10)

    angel_key = bytes([2]) + b"52207".ljust(25, b"\0")
    levels = []
    for i in range(10):
        levels += [1 if i < 5 else 0, 65 * (i + 1), 12050 + (i - 5) * 5, i + 1]
    snap = struct.pack("<BB25sqqqqqqddqqqqqqd" + "Hqqh" * 10 + "qqqq", 3, 2, b"52207", 1, 1_795_415_400_123, 12050, 65,
                       12010, 1_192_471, 256_443.0, 363_009.0, 11900, 12100, 11800, 11800, 1_795_415_399, 4_500_000,
                       0.0, *levels, 13000, 11000, 20000, 9000)
    angel_instruments = {angel_key: object()}
    angel_floor_struct = struct.Struct("<BB25sqqqqqqddqqqqqqd" + "Hqqh" * 10 + "qqqq")

    def kite_ours() -> None:
        out: List[Any] = []
        decode = ttconnect._zerodha_decode
        for _ in range(n // 10):
            decode(kite_frame, kite_instruments, out)
            out.clear()

    def kite_floor() -> None:
        unpack = kite_floor_struct.unpack_from
        for _ in range(n // 10):
            pos = 4
            for _ in range(10):
                unpack(kite_frame, pos)
                pos += 186

    def angel_ours() -> None:
        out: List[Any] = []
        decode = ttconnect._angelone_decode
        for _ in range(n):
            decode(snap, angel_instruments, out)
            out.clear()

    def angel_floor() -> None:
        unpack = angel_floor_struct.unpack_from
        for _ in range(n):
            unpack(snap)

    # Upstox: one FeedResponse per frame, one instrument, 5-level depth, greeks, today's and two
    # minute candles (the official SDK's protobuf parse + MessageToDict: ~48-75 us a message here).
    sys.path.insert(0, HERE)
    from test_ttconnect import pb_feed_response, pb_full, pb_ltpc, pb_market_ff, pb_ohlc

    upstox_frame = pb_feed_response({"NSE_FO|52207": pb_full(pb_market_ff(
        pb_ltpc(120.5, 1795415399123, 65, 118.0),
        depth=[(65 * (i + 1), 120.45 - 0.05 * i, 130 * (i + 1), 120.5 + 0.05 * i) for i in range(5)],
        ohlc=[pb_ohlc("1d", 115.0, 122.0, 110.5, 120.5, 9000, 1795370000000),
              pb_ohlc("I1", 120.0, 121.0, 119.5, 120.5, 300, 1795415340000),
              pb_ohlc("I1", 120.1, 121.0, 119.5, 120.5, 300, 1795415400000)],
        greeks=(0.52, -12.5, 0.0011, 9.8, 0.01), atp=119.3, vtt=1192471, oi=4500000.0, iv=0.14, tbq=256443.0,
        tsq=363009.0))})
    upstox_targets = {b"NSE_FO|52207": (object(), "full")}

    def upstox_ours() -> None:
        out: List[Any] = []
        decode = ttconnect._upstox_decode
        for _ in range(n // 4):
            decode(upstox_frame, upstox_targets, out)
            out.clear()

    print(f"tick decode, per tick (best of {rounds} x {n:,}; floor = precompiled Struct.unpack_from over the same bytes, "
          "no object built)")
    for name, ours_fn, floor_fn in (("kite full packet (184 B)", kite_ours, kite_floor),
                                    ("angelone SnapQuote (379 B)", angel_ours, angel_floor)):
        ours_t, floor_t = [], []
        for _ in range(rounds):  # interleaved, so drift hits both alike
            ours_t.append(_per_call(ours_fn, 1))
            floor_t.append(_per_call(floor_fn, 1))
        ours, floor = min(ours_t) / n, min(floor_t) / n
        print(_ratio_line(name, ours * 1e6, floor * 1e6, "us", 5.0) + f"  = {1 / ours:,.0f} ticks/s")
        if name.startswith("kite"):
            kite_full = ours
    up_t, kite_t = [], []
    for _ in range(rounds):  # interleaved with Kite's full packet, its reference
        up_t.append(_per_call(upstox_ours, 1) / (n // 4))
        kite_t.append(_per_call(kite_ours, 1) / n)
    up = min(up_t)
    print(_ratio_line("upstox full feed (FeedResponse)", up * 1e6, min(kite_t) * 1e6, "us", 6.0)
          + f"  = {1 / up:,.0f} messages/s  (floor: Kite full packet)")


# ----------------------------------------------------------------------------------------
# paper


def bench_paper(rounds: int) -> None:
    import datetime as dt
    import queue
    import sqlite3

    import ttconnect as tt

    print("paper broker")
    work = tempfile.mkdtemp(prefix="ttbench-paper-")
    try:
        # place_order -> a filled MARKET order, vs one INSERT + COMMIT (WAL, synchronous=NORMAL)
        day = dt.datetime(2026, 12, 2, 10, 0, tzinfo=tt.IST)
        clock = [day.timestamp()]
        client = tt.TTConnect("paper", cache_dir=work, clock=lambda: clock[0], capital=1e12)
        sbin = tt.Equity(exchange="NSE", symbol="SBIN")
        client.place_order(sbin, 1, "BUY", "CNC", "MARKET")  # warm: the walk's hour, the statements
        floor_db = sqlite3.connect(os.path.join(work, "floor.db"), isolation_level=None)
        floor_db.execute("PRAGMA journal_mode = WAL")
        floor_db.execute("PRAGMA synchronous = NORMAL")
        floor_db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, instrument TEXT, side TEXT, qty INTEGER, price INTEGER)")
        n = 300

        def ours() -> None:
            for _ in range(n):
                client.place_order(sbin, 1, "BUY", "CNC", "MARKET")

        def floor() -> None:
            for i in range(n):
                floor_db.execute("BEGIN")
                floor_db.execute("INSERT INTO t (instrument, side, qty, price) VALUES (?,?,?,?)", ("NSE:SBIN", "BUY", 1, i))
                floor_db.execute("COMMIT")

        ours_t, floor_t = [], []
        for _ in range(rounds):
            ours_t.append(_per_call(ours, 1) / n)
            floor_t.append(_per_call(floor, 1) / n)
        assert client.get_order(client.get_orders()[-1].id).status is tt.OrderStatus.COMPLETE
        print(_ratio_line("place_order -> filled MARKET", min(ours_t) * 1e6, min(floor_t) * 1e6, "us", 5.0))
        client.close()
        floor_db.close()

        # replay: 1,000,000 recorded quote ticks of 20 instruments, 100 resting LIMIT orders
        symbols = [s for s, _ in tt._PAPER_STOCKS[:20]]
        path = os.path.join(work, "ticks.jsonl")
        total = 1_000_000
        start_ms = int(day.timestamp() * 1000)
        with open(path, "w") as f:
            for i in range(total):
                symbol = symbols[i % 20]
                base = dict(tt._PAPER_STOCKS)[symbol]
                ltp = round(base * (1 + 0.002 * ((i // 20) % 50 - 25) / 25), 2)
                f.write(json.dumps({"instrument": f"NSE:{symbol}", "ts": start_ms + i, "mode": "quote", "ltp": ltp,
                                    "volume": i, "close": base, "change": round((ltp - base) * 100 / base, 4)}) + "\n")
        def replay(cache_dir: str) -> Tuple[float, int, float, int]:
            """(ticks/s, ticks delivered, seconds, orders still working) of one replay of the file."""
            client = tt.TTConnect("paper", cache_dir=cache_dir, clock=lambda: clock[0], prices=path, capital=1e12)
            for k in range(100):  # five per instrument, below the path: they rest all the way
                symbol = symbols[k % 20]
                price = round(dict(tt._PAPER_STOCKS)[symbol] * (0.9 - 0.01 * (k // 20)), 1)
                client.place_order(tt.Equity(exchange="NSE", symbol=symbol), 1, "BUY", "CNC", "LIMIT", price=price)
            got = [0]
            done = threading.Event()

            def on_tick(tick: Any) -> None:
                got[0] += 1
                if got[0] == total:
                    done.set()

            started = time.perf_counter()
            client.subscribe([tt.Equity(exchange="NSE", symbol=s) for s in symbols], on_tick=on_tick, mode="quote")
            done.wait(120)
            took = time.perf_counter() - started
            working = sum(1 for o in client.get_orders() if o.status is tt.OrderStatus.OPEN)
            client.close()
            return got[0] / took, got[0], took, working

        # Best of three runs, each on an account of its own: a run is 5 s on a shared machine,
        # and one of them often loses a quarter of its speed to a neighbour's load.
        runs = [replay(os.path.join(work, f"replay{run}")) for run in range(3)]
        rate, delivered, took, working = max(runs)
        verdict = _verdict("paper replay", delivered == total and working == 100 and rate >= 200_000
                           and all(r[1] == total and r[3] == 100 for r in runs), "UNDER 200,000/s")
        print(f"  {'replay 1,000,000 ticks, 100 resting':<34} {rate:12,.0f} ticks/s  (best of 3: {delivered:,} "
              f"delivered in {took:.2f} s; others {', '.join(f'{r[0]:,.0f}' for r in sorted(runs)[:2])}/s; "
              f"target >= 200,000/s)  ({verdict})")

        # the demo, as a newcomer runs it
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ttconnect", "demo"], cwd=work, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": HERE})
        wall = time.perf_counter() - started
        verdict = _verdict("demo wall time", wall < 15, "OVER 15 s")
        print(f"  {'python -m ttconnect demo':<34} {wall:9.2f} s   (target < 15 s)  ({verdict})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: List[str]) -> int:
    if argv[:1] == ["--child"]:
        if argv[1] == "refresh":
            _child_refresh(*argv[2:5])
            return 0
        if argv[1] == "serve":
            _child_serve()
            return 0
        raise SystemExit(f"unknown child task {argv[1:]}")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    sections = ("instruments", "rest", "ticks", "paper")
    parser.add_argument("sections", nargs="*", default=list(sections), help=", ".join(sections))
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in sections]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(sections)}")
    reps = 1 if args.quick else 5
    print(f"ttconnect benchmark on {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    if "instruments" in args.sections:
        bench_instruments(reps)
    if "rest" in args.sections:
        bench_rest(3 if args.quick else 9)
    if "ticks" in args.sections:
        bench_ticks(3 if args.quick else 7)
    if "paper" in args.sections:
        bench_paper(3 if args.quick else 5)
    if MISSED:
        print(f"missed targets: {', '.join(MISSED)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
