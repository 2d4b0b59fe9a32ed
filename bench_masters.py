"""Full-size instrument masters for the benchmark, and the floors it is measured against.

The benchmark imports this module; it is stdlib only and does nothing at import time.

* :func:`make_kite_csv` writes a Zerodha Kite instrument dump (12-column CSV, current-dump
  style, grouped by exchange with BFO first and NSE last, so derivatives precede their
  underlyings).
* :func:`make_angel_json` writes an AngelOne ``OpenAPIScripMaster.json`` (one compact JSON
  array; strike and tick in paise x100 with six decimals, all values strings except
  ``is_cas_enabled``; rows in a deterministic shuffled order).
* :func:`make_upstox_json_gz` writes an Upstox ``complete.json.gz`` (one compact JSON array,
  gzip-compressed with mtime 0; typed values, tick in paise, expiry in epoch ms; equities keyed
  by ISIN, derivatives by exchange token; rows in a deterministic shuffled order).
* :func:`floor_kite` / :func:`floor_angel` / :func:`floor_upstox` time the least work any loader
  must do for such a file: parse it with the stdlib (gunzip first for Upstox) and insert every
  row into a one-table SQLite database in a single transaction.

All generators are deterministic for a given ``rows`` and ``seed`` and draw the same universe
of underlyings, equities and expiries, so with the defaults every Kite option contract is also
present in the AngelOne and Upstox files with the same exchange token (they simply list more
strikes). Field formats follow ``shared/brokers/zerodha.md`` section 7,
``shared/brokers/angelone.md`` section 6 and ``shared/brokers/upstox.md`` section 5 (row shapes
as in ``fixtures/upstox/instruments.json``).

Run ``python bench_masters.py [kite_rows angel_rows upstox_rows]`` to generate the files into a
temporary directory and print row counts, sizes, generation times and the floors.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import io
import json
import math
import os
import random
import sqlite3
import sys
import tempfile
import time
from typing import IO, Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

__all__ = ["make_kite_csv", "make_angel_json", "make_upstox_json_gz", "floor_kite", "floor_angel", "floor_upstox",
           "KITE_HEADER", "ANGEL_FIELDS", "UPSTOX_FIELDS"]

PathLike = Union[str, "os.PathLike[str]"]

KITE_HEADER: Tuple[str, ...] = (
    "instrument_token", "exchange_token", "tradingsymbol", "name", "last_price", "expiry",
    "strike", "tick_size", "lot_size", "instrument_type", "segment", "exchange",
)
ANGEL_FIELDS: Tuple[str, ...] = (
    "token", "symbol", "name", "expiry", "strike", "lotsize", "instrumenttype", "exch_seg",
    "tick_size", "freeze_qty", "is_cas_enabled",
)

_DEFAULT_SEED = 20261124
_MIN_ROWS = 1_000

# Kite: instrument_token = exchange_token * 256 + segment code (zerodha.md 8.4).
_KITE_CODE = {"NSE": 1, "NFO": 2, "CDS": 3, "BSE": 4, "BFO": 5, "BCD": 6, "MCX": 7}
_KITE_INDEX_CODE = 9
# Kite groups its dump by exchange, BFO first and NSE last.
_KITE_ORDER = ("BFO", "BCD", "BSE", "CDS", "MCX", "NFO", "NSE")

_MON = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_KITE_WEEKLY_MONTH = "123456789OND"
_MONTHS = ((2026, 11), (2026, 12), (2027, 1), (2027, 2), (2027, 3))
_TUE, _THU = 1, 3

# Units used internally: strikes in paise (1/100 rupee), ticks in 1/10000 rupee so that
# currency ticks such as 0.0025 stay integral.
_TICK_DIV = 10_000


class _Inst(NamedTuple):
    """One master row in broker-neutral form (formatted per broker at write time)."""

    exch: str            # NSE BSE NFO BFO MCX CDS BCD NCDEX
    kind: str            # IDX EQ FUT CE PE
    sym: str             # index official name / equity tradingsymbol / derivative underlying
    expiry: Optional[_dt.date]
    strike: int          # paise; 0 unless an option
    tick: int            # 1/10000 rupee
    lot: int
    et: int              # exchange token (Kite exchange_token, AngelOne token for non-indices)
    kname: str           # Kite `name` ("" -> empty, unquoted)
    asym: str            # AngelOne symbol (indices and cash only; derivatives are built)
    aname: str           # AngelOne name
    atok: str            # AngelOne token
    freeze: int
    cas: bool
    old_schema: bool     # AngelOne row without freeze_qty / is_cas_enabled
    weekly: bool         # Kite weekly-form option symbol
    index_under: bool    # derivative on an index (FUTIDX/OPTIDX)


# ============================================================================
# Reference data
# ============================================================================

# (Kite tradingsymbol/name, canonical, Kite exchange_token, AngelOne token, AngelOne symbol)
_KNOWN_INDICES: Tuple[Tuple[str, str, str, int, str, str], ...] = (
    ("NSE", "NIFTY 50", "NIFTY", 1001, "99926000", "Nifty 50"),
    ("NSE", "NIFTY BANK", "BANKNIFTY", 1016, "99926009", "Nifty Bank"),
    ("NSE", "NIFTY FIN SERVICE", "FINNIFTY", 1007, "99926037", "Nifty Fin Service"),
    ("NSE", "NIFTY MID SELECT", "MIDCPNIFTY", 1125, "99926074", "NIFTY MID SELECT"),
    ("NSE", "NIFTY NEXT 50", "NIFTYNXT50", 1058, "99926013", "Nifty Next 50"),
    ("NSE", "INDIA VIX", "INDIA VIX", 1035, "99926017", "India VIX"),
    ("NSE", "NIFTY IT", "NIFTY IT", 1015, "99926008", "Nifty IT"),
    ("BSE", "SENSEX", "SENSEX", 1, "99919000", "SENSEX"),
    ("BSE", "BANKEX", "BANKEX", 1072, "99919012", "BANKEX"),
)
_EXTRA_NSE_INDICES = (
    "NIFTY AUTO", "NIFTY FMCG", "NIFTY METAL", "NIFTY PHARMA", "NIFTY PSU BANK", "NIFTY REALTY",
    "NIFTY MEDIA", "NIFTY ENERGY", "NIFTY INFRA", "NIFTY MIDCAP 100", "NIFTY SMLCAP 100",
    "NIFTY 100", "NIFTY 200", "NIFTY 500", "NIFTY PVT BANK", "NIFTY CPSE", "NIFTY PSE",
    "NIFTY COMMODITIES", "NIFTY CONSUMPTION", "NIFTY MNC", "NIFTY SERV SECTOR",
    "NIFTY DIV OPPS 50", "NIFTY GROWSECT 15", "NIFTY50 VALUE 20", "NIFTY MIDCAP 50",
    "NIFTY MIDCAP 150", "NIFTY SMLCAP 50", "NIFTY SMLCAP 250", "NIFTY MID LIQ 15",
    "NIFTY HEALTHCARE", "NIFTY OIL AND GAS", "NIFTY CONSR DURBL", "NIFTY MIDSML 400",
    "NIFTY TOTAL MKT", "NIFTY IND DIGITAL", "NIFTY MICROCAP250", "NIFTY INDIA MFG",
    "NIFTY ALPHA 50", "NIFTY100 LOWVOL30", "NIFTY200 QUALTY30", "NIFTY50 EQL WGT",
    "NIFTY100 EQL WGT", "NIFTY GS 10YR", "NIFTY FINSRV25 50", "NIFTY IND DEFENCE",
)
_EXTRA_BSE_INDICES = ("BSE 100", "BSE 200", "BSE 500", "BSE MIDCAP", "BSE SMALLCAP", "BSE IT")

# Real large caps: (symbol, company name, price, NSE token, BSE scrip code).
_KNOWN_EQUITIES: Tuple[Tuple[str, str, float, int, int], ...] = (
    ("RELIANCE", "RELIANCE INDUSTRIES", 1400.0, 2885, 500325),
    ("SBIN", "STATE BANK OF INDIA", 800.0, 3045, 500112),
    ("INFY", "INFOSYS", 1500.0, 1594, 500209),
    ("IDEA", "VODAFONE IDEA", 8.5, 14366, 532822),
    ("HDFCBANK", "HDFC BANK", 1900.0, 1333, 500180),
    ("ICICIBANK", "ICICI BANK", 1350.0, 4963, 532174),
    ("TCS", "TATA CONSULTANCY SERV LT", 3100.0, 11536, 532540),
    ("M&M", "MAHINDRA & MAHINDRA", 3300.0, 2031, 500520),
    ("ITC", "ITC", 410.0, 1660, 500875),
    ("LT", "LARSEN & TOUBRO", 3600.0, 11483, 500510),
    ("AXISBANK", "AXIS BANK", 1150.0, 5900, 532215),
    ("KOTAKBANK", "KOTAK MAHINDRA BANK", 2100.0, 1922, 500247),
    ("BHARTIARTL", "BHARTI AIRTEL", 1900.0, 10604, 532454),
    ("HINDUNILVR", "HINDUSTAN UNILEVER", 2400.0, 1394, 500696),
    ("MARUTI", "MARUTI SUZUKI INDIA", 12500.0, 10999, 532500),
    ("TATASTEEL", "TATA STEEL", 150.0, 3499, 500470),
)

# NFO/BFO index underlyings: (exchange, name, spot, strike step, lot, freeze, weekly weekday or None,
# monthly weekday, futures tick)
_INDEX_UNDERLYINGS = (
    ("NFO", "NIFTY", 23_500, 50, 65, 1800, _TUE, _TUE, 1000),
    ("NFO", "BANKNIFTY", 52_000, 100, 30, 600, None, _TUE, 1000),
    ("NFO", "FINNIFTY", 24_500, 50, 65, 1800, None, _TUE, 1000),
    ("NFO", "MIDCPNIFTY", 12_700, 25, 120, 2800, None, _TUE, 1000),
    ("NFO", "NIFTYNXT50", 67_000, 100, 25, 600, None, _TUE, 1000),
    ("BFO", "SENSEX", 85_000, 100, 20, 1000, _THU, _THU, 500),
    ("BFO", "BANKEX", 60_000, 100, 30, 900, None, _THU, 500),
)

# Skipped-segment underlyings: (name, spot, strike step, tick) in rupees.
_MCX = (("GOLD", 130_000, 1000, 1.0), ("GOLDM", 130_000, 500, 1.0), ("SILVER", 160_000, 1000, 1.0),
        ("SILVERM", 160_000, 500, 1.0), ("CRUDEOIL", 5_600, 50, 1.0), ("NATURALGAS", 300, 5, 0.1),
        ("COPPER", 900, 5, 0.05), ("ZINC", 270, 2.5, 0.05), ("ALUMINIUM", 240, 2.5, 0.05),
        ("LEAD", 180, 1, 0.05))
_MCX_DAY = {"GOLD": 5, "GOLDM": 5, "SILVER": 5, "SILVERM": 5, "CRUDEOIL": 19, "NATURALGAS": 24}
_CURRENCY = (("USDINR", 88.5, 0.25, 0.0025), ("EURINR", 103.0, 0.25, 0.0025),
             ("GBPINR", 118.0, 0.25, 0.0025), ("JPYINR", 59.0, 0.25, 0.0025))
# NSE commodity derivatives (Upstox segment NSE_COM), skipped like MCX: (name, spot, step, tick).
_NSE_COM = (("CRUDEOIL", 5_600, 50, 1.0), ("NATURALGAS", 300, 5, 0.1), ("GOLDM", 130_000, 500, 1.0),
            ("SILVERM", 160_000, 500, 1.0))
_NCDEX = ("DHANIYA", "JEERAUNJHA", "GUARSEED10", "GUARGUM5", "CASTOR", "TMCFGRNZM", "COCUDAKL",
          "KAPAS", "SYBEANIDR")

_W1 = ("ADITYA", "AMBER", "APEX", "ARIHANT", "ASIAN", "BHARAT", "CENTURY", "CITY", "COSMO",
       "DECCAN", "DHANLAXMI", "EASTERN", "GANGA", "GOLDEN", "GUJARAT", "HIMALAYA", "INDO", "JAYA",
       "KAVERI", "KRISHNA", "LAKSHMI", "MAHA", "MALABAR", "NAVA", "NILKANTH", "ORIENT", "PARAS",
       "PRAGATI", "RAJ", "SAGAR", "SHREE", "SHIVA", "SIDDHI", "SUPREME", "SURYA", "TRIVENI",
       "UNITED", "UTKAL", "VARDHMAN", "VIJAY", "VISHAL", "WESTERN", "YAMUNA", "ZENITH", "ALPINE",
       "BLUE", "CROWN", "DELTA", "EVEREST", "GARNET", "HERITAGE", "IVORY", "JUPITER", "KESAR",
       "LOTUS", "METRO", "NOVA", "OMEGA", "PIONEER", "QUALITY", "ROYAL", "SILVERLINE", "TITANIA",
       "UNIVERSAL", "VALIANT")
_W2 = ("STEEL", "FINANCE", "PHARMA", "TEXTILES", "CHEMICALS", "POWER", "CEMENT", "AGRO",
       "MOTORS", "INFRA", "SOFTWARE", "FOODS", "PAPER", "ENERGY", "CAPITAL", "SUGAR", "SPINNING",
       "POLYMERS", "CABLES", "GLASS", "LOGISTICS", "REALTY", "HOTELS", "BEARINGS", "FORGINGS",
       "ALLOYS", "TEA", "DYES", "FERTILISERS", "SECURITIES", "TECHNOLOGIES", "PACKAGING", "PIPES",
       "CERAMICS", "LEASING", "BIOTECH", "MEDIA", "ELECTRICALS", "PLASTICS", "MINERALS")
_SUFFIX = ("LIMITED", "LTD", "INDUSTRIES LTD", "CORPORATION LTD", "(INDIA) LTD", "INDIA LIMITED")


# ============================================================================
# Small helpers
# ============================================================================

def _last_weekday(year: int, month: int, weekday: int) -> _dt.date:
    nxt = _dt.date(year + (month == 12), month % 12 + 1, 1)
    d = nxt - _dt.timedelta(days=1)
    return d - _dt.timedelta(days=(d.weekday() - weekday) % 7)


def _weekdays_in(year: int, month: int, weekday: int) -> List[_dt.date]:
    d = _dt.date(year, month, 1)
    d += _dt.timedelta(days=(weekday - d.weekday()) % 7)
    out = []
    while d.month == month:
        out.append(d)
        d += _dt.timedelta(days=7)
    return out


def _business_days_before_month_end(year: int, month: int, n: int) -> _dt.date:
    d = _dt.date(year + (month == 12), month % 12 + 1, 1) - _dt.timedelta(days=1)
    while d.weekday() >= 5:
        d -= _dt.timedelta(days=1)
    for _ in range(n):
        d -= _dt.timedelta(days=1)
        while d.weekday() >= 5:
            d -= _dt.timedelta(days=1)
    return d


def _add_months(year: int, month: int, k: int) -> Tuple[int, int]:
    m = year * 12 + (month - 1) + k
    return m // 12, m % 12 + 1


def _plain(n: int, div: int) -> str:
    """Render n/div as Kite does: integers bare, otherwise the shortest decimal."""
    q, r = divmod(n, div)
    if r == 0:
        return str(q)
    frac = str(r * 10**6 // div).rjust(6, "0").rstrip("0")
    return f"{q}.{frac}"


def _fixed6(n: int, div: int) -> str:
    """Render n/div with exactly six decimals (AngelOne style)."""
    scaled = n * 10**6 // div
    return f"{scaled // 10**6}.{scaled % 10**6:06d}"


def _nice_lot(value: float) -> int:
    for limit, unit in ((10, 1), (100, 5), (1000, 25), (10_000, 250)):
        if value < limit:
            return max(unit, int(round(value / unit)) * unit)
    return max(1000, int(round(value / 1000)) * 1000)


def _equity_tick(price: float) -> int:
    for limit, tick in ((250, 100), (1000, 500), (5000, 1000), (10_000, 5000)):
        if price < limit:
            return tick
    return 10_000


def _stock_step_paise(price: float) -> int:
    for limit, step in ((15, 50), (50, 100), (150, 250), (300, 500), (700, 1000), (1500, 2000),
                        (3000, 5000), (6000, 10_000)):
        if price < limit:
            return step
    return 25_000


class _ExpiryText(NamedTuple):
    iso: str          # 2026-11-24
    kite_mon: str     # 26NOV
    kite_week: str    # 26N24 (weekly form)
    angel_exp: str    # 24NOV2026
    angel_sym: str    # 24NOV26
    angel_long: str   # 24NOV2026 (NCDEX symbol form)


def _expiry_text(d: _dt.date, cache: Dict[_dt.date, _ExpiryText]) -> _ExpiryText:
    t = cache.get(d)
    if t is None:
        yy = f"{d.year % 100:02d}"
        mon = _MON[d.month - 1]
        t = _ExpiryText(d.isoformat(), f"{yy}{mon}", f"{yy}{_KITE_WEEKLY_MONTH[d.month - 1]}{d.day:02d}",
                        f"{d.day:02d}{mon}{d.year}", f"{d.day:02d}{mon}{yy}", f"{d.day:02d}{mon}{d.year}")
        cache[d] = t
    return t


# ============================================================================
# Universe
# ============================================================================

class _Universe:
    """Deterministic set of underlyings, cash rows and derivative slots shared by both masters."""

    def __init__(self, seed: int, scale: float) -> None:
        self.seed = seed
        self.scale = scale
        self.indices: List[_Inst] = []
        self.nse: List[_Inst] = []
        self.bse: List[_Inst] = []
        self.fno_stocks: List[Tuple[str, float, int]] = []   # (symbol, price, lot)
        self._build_indices()
        self._build_equities()

    # -- indices -------------------------------------------------------------
    def _build_indices(self) -> None:
        rng = random.Random(self.seed * 7 + 1)
        used_et = {k[3] for k in _KNOWN_INDICES}
        used_tok = {k[4] for k in _KNOWN_INDICES}
        for exch, name, canon, et, atok, asym in _KNOWN_INDICES:
            self.indices.append(self._index_row(exch, name, canon, et, atok, asym, rng))
        n_nse = max(2, int(len(_EXTRA_NSE_INDICES) * self.scale))
        n_bse = max(1, int(len(_EXTRA_BSE_INDICES) * self.scale))
        next_et = 1002
        counters = {"NSE": 99926001, "BSE": 99919001}
        for exch, names in (("NSE", _EXTRA_NSE_INDICES[:n_nse]), ("BSE", _EXTRA_BSE_INDICES[:n_bse])):
            for name in names:
                while next_et in used_et:
                    next_et += 1
                used_et.add(next_et)
                while str(counters[exch]) in used_tok:
                    counters[exch] += 1
                atok = str(counters[exch])
                used_tok.add(atok)
                display = " ".join(w.capitalize() if w.isalpha() and w != "IT" else w for w in name.split())
                self.indices.append(self._index_row(exch, name, name, next_et, atok, display, rng))

    @staticmethod
    def _index_row(exch: str, name: str, canon: str, et: int, atok: str, asym: str,
                   rng: random.Random) -> _Inst:
        return _Inst(exch, "IDX", name, None, 0, 0, 0, et, name, asym, canon, atok, 0, False,
                     rng.random() < 0.1, False, False)

    # -- equities ------------------------------------------------------------
    def _build_equities(self) -> None:
        rng = random.Random(self.seed * 7 + 2)
        s = self.scale
        n_eq = max(30, int(2200 * s))
        n_be, n_sm, n_st, n_bond = int(300 * s), int(180 * s), int(20 * s), int(100 * s)
        n_bse = max(20, int(3500 * s))
        n_fno = max(4, int(200 * s))

        taken: Set[str] = {k[0] for k in _KNOWN_EQUITIES}
        taken.update(k[1] for k in _KNOWN_INDICES)
        used_nse = {k[3] for k in _KNOWN_EQUITIES}
        used_bse = {k[4] for k in _KNOWN_EQUITIES}

        def token(pool: Set[int], lo: int, hi: int) -> int:
            while True:
                t = rng.randrange(lo, hi)
                if t not in pool:
                    pool.add(t)
                    return t

        def company() -> Tuple[str, str]:
            w1, w2 = rng.choice(_W1), rng.choice(_W2)
            suffix = rng.choice(_SUFFIX)
            roll = rng.random()
            if roll < 0.08:
                w3 = rng.choice(_W2)
                name = f"{w1} {w2} & {w3} {suffix}"
                cands = [f"{w1[:1]}&{w3[:1]}{w2[:4]}", f"{w1[:4]}{w2[:2]}&{w3[:2]}"]
            else:
                name = f"{w1} {w2}, {suffix}" if roll < 0.14 else f"{w1} {w2} {suffix}"
                cands = []
            cands += [w1 + w2[:4], w1[:5] + w2[:3], w1[:3] + w2[:5], w1 + w2[:1], w1[:6] + w2]
            for c in cands:
                c = c[:10]
                if c not in taken:
                    taken.add(c)
                    return c, name
            n = 2
            while f"{cands[0][:10]}{n}" in taken:
                n += 1
            sym = f"{cands[0][:10]}{n}"
            taken.add(sym)
            return sym, name

        def price() -> float:
            return round(math.exp(rng.uniform(math.log(5), math.log(15_000))), 2)

        def eq_row(exch: str, sym: str, kname: str, px: float, et: int, asym: str, aname: str,
                   lot: int = 1) -> _Inst:
            return _Inst(exch, "EQ", sym, None, 0, _equity_tick(px), lot, et, kname, asym, aname,
                         str(et), rng.randrange(10_000, 5_000_000), rng.random() < 0.3,
                         rng.random() < 0.08, False, False)

        eq_prices: List[Tuple[str, str, float]] = []   # (symbol, company, price) for EQ series
        for sym, name, px, et, _code in _KNOWN_EQUITIES:
            self.nse.append(eq_row("NSE", sym, name, px, et, f"{sym}-EQ", sym))
            eq_prices.append((sym, name, px))
        for _ in range(n_eq - len(_KNOWN_EQUITIES)):
            sym, name = company()
            px = price()
            self.nse.append(eq_row("NSE", sym, name, px, token(used_nse, 100, 30_000), f"{sym}-EQ", sym))
            eq_prices.append((sym, name, px))
        for series, count in (("BE", n_be), ("SM", n_sm), ("ST", n_st)):
            for _ in range(count):
                base, name = company()
                px = price() if series == "BE" else round(rng.uniform(20, 500), 2)
                lot = 1 if series == "BE" else rng.choice((400, 600, 800, 1000, 1200, 1600, 2000, 3000))
                sym = f"{base}-{series}"
                self.nse.append(eq_row("NSE", sym, name, px, token(used_nse, 100, 30_000), sym, base, lot))
        for _ in range(n_bond):
            issuer = (rng.choice(_W1)[:3] + rng.choice(_W2)[:1] + "L")
            base = f"{rng.choice((725, 800, 850, 875, 900, 925, 950, 1000, 1050, 1125))}{issuer}{rng.randint(27, 34)}"
            sym = f"{base}-N{rng.randint(0, 9)}"
            if sym in taken:
                continue
            taken.add(sym)
            # bonds carry no company name in the Kite dump
            self.nse.append(eq_row("NSE", sym, "", 1000.0, token(used_nse, 700_000, 800_000), sym, base))

        # BSE: many NSE names are dual listed (same symbol), the rest are BSE-only.
        for sym, name, px, _et, code in _KNOWN_EQUITIES:
            self.bse.append(eq_row("BSE", sym, name, px, code, sym, sym))
        dual = [e for e in eq_prices[len(_KNOWN_EQUITIES):] if rng.random() < 0.6]
        for sym, name, px in dual[: max(0, n_bse - len(_KNOWN_EQUITIES)) * 2 // 3]:
            code = token(used_bse, 500_001, 545_000)
            self.bse.append(eq_row("BSE", sym, name, px, code, sym, sym))
        while len(self.bse) < n_bse:
            sym, name = company()
            code = token(used_bse, 500_001, 545_000)
            kname = "" if rng.random() < 0.12 else name
            self.bse.append(eq_row("BSE", sym, kname, price(), code, sym, sym))

        # F&O stocks: the known large caps plus liquid-looking EQ names.
        known = {k[0] for k in _KNOWN_EQUITIES}
        for sym, _name, px in eq_prices:
            if len(self.fno_stocks) >= n_fno:
                break
            if sym in known or px >= 50:
                lot = 500 if sym == "RELIANCE" else _nice_lot(600_000 / px)
                self.fno_stocks.append((sym, px, lot))

    # -- derivatives -----------------------------------------------------------
    def futures(self) -> Tuple[List[_Inst], List[List[Any]]]:
        """Return the NFO/BFO futures and the option slots (for :meth:`options`)."""
        rng = random.Random(self.seed * 7 + 3)
        futs: List[_Inst] = []
        slots: List[List[Any]] = []
        tokens = {"NFO": 35_001, "BFO": 820_001}
        for exch, name, spot, step, lot, freeze, weekly_wd, monthly_wd, ftick in _INDEX_UNDERLYINGS:
            monthlies = [_last_weekday(y, m, monthly_wd) for y, m in _MONTHS]
            for exp in monthlies[:3]:
                futs.append(_Inst(exch, "FUT", name, exp, 0, ftick, lot, tokens[exch], name, "", name,
                                  str(tokens[exch]), freeze, False, rng.random() < 0.08, False, True))
                tokens[exch] += rng.randint(1, 3)
            expiries = list(monthlies)
            if weekly_wd is not None:
                weeklies = [d for y, m in _MONTHS[:2] for d in _weekdays_in(y, m, weekly_wd)]
                expiries = sorted(set(weeklies) | set(monthlies))
            for exp in expiries:
                is_weekly = exp not in monthlies
                near = exp <= _dt.date(2026, 12, 31)
                width = 3 if near else 2
                cap = 150 if near else 80
                slots.append([exch, name, exp, spot * 100, step * 100, lot, freeze, is_weekly, True,
                              width, cap, spot * 100 // 3, 0, 0])
        for sym, px, lot in self.fno_stocks:
            step = _stock_step_paise(px)
            atm = max(step, int(round(px * 100 / step)) * step)
            ftick = 1000 if px >= 250 else 100
            freeze = lot * 20
            for y, m in _MONTHS[:3]:
                exp = _last_weekday(y, m, _TUE)
                futs.append(_Inst("NFO", "FUT", sym, exp, 0, ftick, lot, tokens["NFO"], sym, "", sym,
                                  str(tokens["NFO"]), freeze, False, rng.random() < 0.08, False, False))
                tokens["NFO"] += rng.randint(1, 3)
                slots.append(["NFO", sym, exp, atm, step, lot, freeze, False, False, 1, 60,
                              atm // 3, 0, 0])
        self._next_tokens = tokens
        return futs, slots

    def options(self, slots: List[List[Any]], count: int) -> List[_Inst]:
        """Walk strikes outward from the money, round-robin over slots, until ``count`` options.

        The walk does not depend on ``count``, so a smaller master's options are a prefix of a
        larger one's (same strikes, same tokens).
        """
        rng = random.Random(self.seed * 7 + 4)
        tokens = dict(self._next_tokens)
        out: List[_Inst] = []
        uncapped = False

        def emit(slot: List[Any], strike: int) -> bool:
            exch, name, exp, _atm, _step, lot, freeze, weekly, is_idx = slot[:9]
            old = rng.random() < 0.08
            for typ in ("CE", "PE"):
                if len(out) >= count:
                    return False
                out.append(_Inst(exch, typ, name, exp, strike, 500, lot, tokens[exch], name, "", name,
                                 str(tokens[exch]), freeze, False, old, weekly, is_idx))
                tokens[exch] += rng.randint(1, 2)
            return True

        for slot in slots:
            if not emit(slot, slot[3]):
                return out
        while len(out) < count:
            added = False
            for slot in slots:
                atm, step, width, cap, floor_ = slot[3], slot[4], slot[9], slot[10], slot[11]
                for _ in range(width):
                    if uncapped or slot[12] < cap:
                        slot[12] += 1
                        added = True
                        if not emit(slot, atm + slot[12] * step):
                            return out
                    if slot[13] < cap and atm - (slot[13] + 1) * step >= max(floor_, 1):
                        slot[13] += 1
                        added = True
                        if not emit(slot, atm - slot[13] * step):
                            return out
            if not added:
                uncapped = True
        return out

    def other(self, flavour: str, count: int) -> List[_Inst]:
        """Rows of segments the library skips for now, ``count`` of them: MCX, CDS and BCD (Kite),
        MCX, CDS and NCDEX (AngelOne), MCX, CDS, BCD and NSE commodity (Upstox)."""
        rng = random.Random(self.seed * 7 + 5)
        futs: List[_Inst] = []
        slots: List[Tuple[str, str, _dt.date, int, int, int, int]] = []
        tok = {"MCX": 440_001, "CDS": 1_201, "BCD": 11_001, "NCDEX": 60_001, "NSCOM": 3_901}

        def add_fut(exch: str, name: str, exp: _dt.date, tick: int, lot: int) -> None:
            futs.append(_Inst(exch, "FUT", name, exp, 0, tick, lot, tok[exch], name, "", name,
                              str(tok[exch]), 0, False, rng.random() < 0.08, False, False))
            tok[exch] += rng.randint(1, 4)

        for name, spot, step, tick in _MCX:
            day = _MCX_DAY.get(name)
            for k in range(6):
                y, m = _add_months(2026, 11, k)
                exp = _dt.date(y, m, day) if day else _last_weekday(y, m, 4)
                t = int(round(tick * _TICK_DIV))
                add_fut("MCX", name, exp, t, 1)
                if k < 3:
                    slots.append(("MCX", name, exp, int(round(spot * 100)), int(round(step * 100)), t, 1))
        cur_exchanges = ("CDS", "BCD") if flavour in ("kite", "upstox") else ("CDS",)
        for exch in cur_exchanges:
            for name, cspot, cstep, tick in _CURRENCY:
                for k in range(12):
                    y, m = _add_months(2026, 11, k)
                    exp = _business_days_before_month_end(y, m, 2)
                    t = int(round(tick * _TICK_DIV))
                    add_fut(exch, name, exp, t, 1)
                    if k < 3:
                        slots.append((exch, name, exp, int(round(cspot * 100)), int(round(cstep * 100)), t, 1))
        if flavour == "upstox":
            for name, spot, step, tick in _NSE_COM:
                for k in range(4):
                    y, m = _add_months(2026, 11, k)
                    exp = _dt.date(y, m, _MCX_DAY.get(name, 20))
                    add_fut("NSCOM", name, exp, int(round(tick * _TICK_DIV)), 1)
        if flavour == "angel":
            for name in _NCDEX:
                for k in range(6):
                    y, m = _add_months(2026, 11, k)
                    add_fut("NCDEX", name, _dt.date(y, m, 20), 2_0000, 5)
        out = futs[:count]
        r = 0
        while len(out) < count:
            for exch, name, exp, atm, step, tick, lot in slots:
                for strike in ((atm,) if r == 0 else (atm + r * step, atm - r * step)):
                    if strike <= 0:
                        continue
                    for typ in ("CE", "PE"):
                        if len(out) >= count:
                            return out
                        out.append(_Inst(exch, typ, name, exp, strike, tick, lot, tok[exch], name, "",
                                         name, str(tok[exch]), 0, False, rng.random() < 0.08, False, False))
                        tok[exch] += rng.randint(1, 2)
            r += 1
        return out


def _plan(rows: int, seed: int, flavour: str) -> Tuple[_Universe, List[_Inst], List[_Inst], List[_Inst]]:
    if rows < _MIN_ROWS:
        raise ValueError(f"rows={rows} is too small for a real-shaped master; pass at least {_MIN_ROWS}")
    uni = _Universe(seed, min(1.0, rows / 60_000))
    futs, slots = uni.futures()
    n_other = round(rows * 0.05)
    fixed = len(uni.indices) + len(uni.nse) + len(uni.bse) + len(futs)
    n_opts = rows - fixed - n_other
    if n_opts < len(slots):
        raise ValueError(f"rows={rows} leaves no room for options; pass more rows")
    return uni, futs, uni.options(slots, n_opts), uni.other(flavour, n_other)


# ============================================================================
# Kite CSV
# ============================================================================

def _kite_line(r: _Inst, etext: Dict[_dt.date, _ExpiryText], tick_txt: Dict[int, str]) -> str:
    kind = r.kind
    tick = tick_txt.get(r.tick)
    if tick is None:
        tick = tick_txt[r.tick] = _plain(r.tick, _TICK_DIV)
    name = f'"{r.kname}"' if r.kname else ""
    if kind == "IDX":
        tok = r.et * 256 + _KITE_INDEX_CODE
        return f"{tok},{r.et},{r.sym},{name},0,,0,0,0,EQ,INDICES,{r.exch}\n"
    code = _KITE_CODE[r.exch]
    tok = r.et * 256 + code
    if kind == "EQ":
        return f"{tok},{r.et},{r.sym},{name},0,,0,{tick},{r.lot},EQ,{r.exch},{r.exch}\n"
    e = _expiry_text(r.expiry, etext)  # type: ignore[arg-type]
    if kind == "FUT":
        return f"{tok},{r.et},{r.sym}{e.kite_mon}FUT,{name},0,{e.iso},0,{tick},{r.lot},FUT,{r.exch}-FUT,{r.exch}\n"
    strike = _plain(r.strike, 100)
    mid = e.kite_week if r.weekly else e.kite_mon
    return (f"{tok},{r.et},{r.sym}{mid}{strike}{kind},{name},0,{e.iso},{strike},{tick},{r.lot},"
            f"{kind},{r.exch}-OPT,{r.exch}\n")


def _write_chunked(f: IO[str], lines: Iterable[str], chunk: int = 4096) -> None:
    buf: List[str] = []
    for line in lines:
        buf.append(line)
        if len(buf) >= chunk:
            f.write("".join(buf))
            buf.clear()
    if buf:
        f.write("".join(buf))


def make_kite_csv(path: PathLike, rows: int = 110_000, *, seed: int = _DEFAULT_SEED) -> int:
    """Write a real-shaped Kite instrument dump of exactly ``rows`` data rows; return ``rows``.

    Mix: NFO index and stock options (most rows), NFO/BFO futures, BFO SENSEX/BANKEX options,
    a few thousand NSE and BSE cash rows (EQ, BE, SM, ST series, bonds without names), index rows
    (segment INDICES) and about 5 % MCX/CDS/BCD rows. Every NFO/BFO underlying has a cash or
    index row; no canonical instrument appears twice.

    Raises:
        ValueError: ``rows`` is too small to hold the fixed part of the universe.
    """
    uni, futs, opts, other = _plan(rows, seed, "kite")
    groups: Dict[str, List[_Inst]] = {ex: [] for ex in _KITE_ORDER}
    for r in uni.indices:
        groups[r.exch].append(r)
    for seq in (uni.bse, uni.nse, futs, opts, other):
        for r in seq:
            groups[r.exch].append(r)
    etext: Dict[_dt.date, _ExpiryText] = {}
    tick_txt: Dict[int, str] = {}
    written = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(KITE_HEADER) + "\n")
        for ex in _KITE_ORDER:
            _write_chunked(f, (_kite_line(r, etext, tick_txt) for r in groups[ex]))
            written += len(groups[ex])
    if written != rows:  # pragma: no cover - guards the planner's arithmetic
        raise AssertionError(f"wrote {written} rows, planned {rows}")
    return written


# ============================================================================
# AngelOne JSON
# ============================================================================

_ANGEL_ITYPE = {
    ("NFO", "FUT", True): "FUTIDX", ("NFO", "FUT", False): "FUTSTK",
    ("NFO", "OPT", True): "OPTIDX", ("NFO", "OPT", False): "OPTSTK",
    ("BFO", "FUT", True): "FUTIDX", ("BFO", "OPT", True): "OPTIDX",
    ("MCX", "FUT", False): "FUTCOM", ("MCX", "OPT", False): "OPTFUT",
    ("CDS", "FUT", False): "FUTCUR", ("CDS", "OPT", False): "OPTCUR",
    ("NCDEX", "FUT", False): "FUTCOM",
}


def _angel_obj(r: _Inst, etext: Dict[_dt.date, _ExpiryText], tick_txt: Dict[int, str]) -> str:
    # All strings here are generated from [A-Za-z0-9 &.-], so no JSON escaping is needed.
    kind = r.kind
    if kind == "IDX":
        head = (f'{{"token":"{r.atok}","symbol":"{r.asym}","name":"{r.aname}","expiry":"",'
                f'"strike":"0.000000","lotsize":"1","instrumenttype":"AMXIDX","exch_seg":"{r.exch}",'
                f'"tick_size":"0.000000"')
        return head + ("}" if r.old_schema else ',"freeze_qty":"0","is_cas_enabled":false}')
    tick = tick_txt.get(r.tick)
    if tick is None:
        # tick in paise: 1/10000-rupee units / 100
        tick = tick_txt[r.tick] = _fixed6(r.tick, 100)
    if kind == "EQ":
        head = (f'{{"token":"{r.atok}","symbol":"{r.asym}","name":"{r.aname}","expiry":"",'
                f'"strike":"-1.000000","lotsize":"{r.lot}","instrumenttype":"","exch_seg":"{r.exch}",'
                f'"tick_size":"{tick}"')
    else:
        e = _expiry_text(r.expiry, etext)  # type: ignore[arg-type]
        exch = r.exch
        if kind == "FUT":
            itype = _ANGEL_ITYPE[(exch, "FUT", r.index_under)]
            strike = "-1.000000"
            if exch == "BFO":
                sym = f"{r.sym}{e.kite_mon}FUT"
            elif exch == "NCDEX":
                sym = f"{r.sym}{e.angel_long}"
            else:
                sym = f"{r.sym}{e.angel_sym}FUT"
        else:
            itype = _ANGEL_ITYPE[(exch, "OPT", r.index_under)]
            # strike is rupees x100 (paise); currency options use x1e7 instead.
            strike = f"{r.strike * 100_000}.000000" if exch == "CDS" else f"{r.strike}.000000"
            k = _plain(r.strike, 100)
            if exch == "BFO":
                sym = f"{r.sym}{e.kite_week if r.weekly else e.kite_mon}{k}{kind}"
            else:
                sym = f"{r.sym}{e.angel_sym}{k}{kind}"
        head = (f'{{"token":"{r.atok}","symbol":"{sym}","name":"{r.aname}","expiry":"{e.angel_exp}",'
                f'"strike":"{strike}","lotsize":"{r.lot}","instrumenttype":"{itype}","exch_seg":"{exch}",'
                f'"tick_size":"{tick}"')
    if r.old_schema:
        return head + "}"
    return f'{head},"freeze_qty":"{r.freeze}","is_cas_enabled":{"true" if r.cas else "false"}}}'


def _angel_lots(rows: Sequence[_Inst]) -> Iterator[_Inst]:
    """AngelOne gives MCX lot sizes in units where Kite says 1 lot."""
    for r in rows:
        if r.exch == "MCX":
            yield r._replace(lot=100 if r.sym in ("GOLD", "CRUDEOIL") else 10)
        elif r.exch == "CDS":
            yield r._replace(lot=1000)
        else:
            yield r


def make_angel_json(path: PathLike, rows: int = 160_000, *, seed: int = _DEFAULT_SEED) -> int:
    """Write a real-shaped AngelOne scrip master of exactly ``rows`` objects; return ``rows``.

    Same universe as :func:`make_kite_csv` (more strikes at the default size), AngelOne naming
    (``SBIN-EQ``, ``NIFTY24NOV2623500CE``, 999-prefixed index tokens), about 5 % MCX/CDS/NCDEX
    rows, and about 8 % of rows in the older schema without ``freeze_qty``/``is_cas_enabled``.
    Rows come in a deterministic shuffled order, so derivatives often precede their underlyings.

    Raises:
        ValueError: ``rows`` is too small to hold the fixed part of the universe.
    """
    uni, futs, opts, other = _plan(rows, seed, "angel")
    everything: List[_Inst] = []
    for seq in (uni.indices, uni.nse, uni.bse, futs, opts):
        everything.extend(seq)
    everything.extend(_angel_lots(other))
    random.Random(seed * 7 + 6).shuffle(everything)
    etext: Dict[_dt.date, _ExpiryText] = {}
    tick_txt: Dict[int, str] = {}
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("[")
        _write_chunked(f, (("," if i else "") + _angel_obj(r, etext, tick_txt)
                           for i, r in enumerate(everything)))
        f.write("]")
    if len(everything) != rows:  # pragma: no cover - guards the planner's arithmetic
        raise AssertionError(f"wrote {len(everything)} rows, planned {rows}")
    return len(everything)


# ============================================================================
# Upstox complete.json.gz
# ============================================================================

# Real ISINs for the known names the fixtures use (fixtures/README.md); every other ISIN is
# synthesised (issuer codes ending F..Z, which no real-ISIN entry here uses) with a valid check digit.
_UPX_ISIN = {"RELIANCE": "INE002A01018", "SBIN": "INE062A01020", "INFY": "INE009A01021", "IDEA": "INE669E01016"}
_UPX_ISSUER_LETTERS = "FGHJKLMNPQRSTUVWXYZ"
# BSE equity groups (BSE_EQ ``instrument_type``), cycled over non-known scrips.
_UPX_BSE_GROUPS = ("A", "B", "B", "T", "X", "XT", "M", "MT", "Z")
# MCX contract multipliers (qty_multiplier; lot_size carries the same number, as in the one observed row).
_UPX_MCX_MULT = {"GOLD": 100, "GOLDM": 10, "SILVER": 30, "SILVERM": 5, "CRUDEOIL": 100, "NATURALGAS": 1250,
                 "COPPER": 2500, "ZINC": 5000, "ALUMINIUM": 5000, "LEAD": 5000}
_UPX_NSE_COM_MULT = {"CRUDEOIL": 100, "NATURALGAS": 1250, "GOLDM": 100, "SILVERM": 5}

UPSTOX_FIELDS: Tuple[str, ...] = (
    "segment", "name", "exchange", "isin", "instrument_type", "instrument_key", "exchange_token",
    "trading_symbol", "lot_size", "tick_size", "freeze_quantity", "expiry", "strike_price", "weekly",
    "underlying_symbol", "qty_multiplier",
)
_UPSTOX_TYPES: Tuple[str, ...] = (
    "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT", "INTEGER", "REAL", "REAL", "INTEGER", "REAL",
    "INTEGER", "TEXT", "REAL",
)


def _isin_check(body: str) -> str:
    """Append the ISIN check digit (Luhn over the base-36 digits) to an 11-character body."""
    digits = "".join(str(int(c, 36)) for c in body)
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


class _UpstoxText:
    """Per-file caches and look-ups for :func:`_upstox_obj`."""

    def __init__(self, uni: _Universe, other: Sequence[_Inst]) -> None:
        self.isin: Dict[str, str] = dict(_UPX_ISIN)
        self._issuer = 0
        self.expiry_ms: Dict[_dt.date, int] = {}
        self.tick: Dict[int, str] = {}
        self.index_key: Dict[str, str] = {}
        for r in uni.indices:
            self.index_key[r.aname] = self.index_row_key(r)
        # MCX options refer to their future (underlying_key), keyed by (name, expiry).
        self.mcx_future: Dict[Tuple[str, Optional[_dt.date]], int] = {}
        for r in other:
            if r.exch == "MCX" and r.kind == "FUT":
                self.mcx_future.setdefault((r.sym, r.expiry), r.et)

    @staticmethod
    def index_row_key(r: _Inst) -> str:
        return f"NSE_INDEX|{r.asym}" if r.exch == "NSE" else f"BSE_INDEX|{r.sym.replace(' ', '')}"

    def isin_of(self, base: str, security: str = "01") -> str:
        isin = self.isin.get(base)
        if isin is None:
            n = self._issuer
            self._issuer += 1
            isin = self.isin[base] = _isin_check(f"INE{n % 1000:03d}{_UPX_ISSUER_LETTERS[n // 1000]}{security}01")
        return isin

    def ms(self, d: _dt.date) -> int:
        v = self.expiry_ms.get(d)
        if v is None:
            # 23:59:59 IST = 18:29:59 UTC of the expiry day
            v = self.expiry_ms[d] = ((d - _dt.date(1970, 1, 1)).days * 86_400 + 66_599) * 1000
        return v

    def tick_text(self, tick: int) -> str:
        t = self.tick.get(tick)
        if t is None:
            t = self.tick[tick] = repr(tick / 100)  # 1/10000-rupee units -> paise
        return t


_UPX_SEGMENT = {"NFO": "NSE_FO", "BFO": "BSE_FO", "MCX": "MCX_FO", "CDS": "NCD_FO", "BCD": "BCD_FO",
                "NSCOM": "NSE_COM"}
_UPX_EXCHANGE = {"NFO": "NSE", "BFO": "BSE", "MCX": "MCX", "CDS": "NSE", "BCD": "BSE", "NSCOM": "NSE"}


def _upstox_obj(r: _Inst, ctx: _UpstoxText) -> str:
    # All strings here are generated from [A-Za-z0-9 &.,()|-], so no JSON escaping is needed.
    kind = r.kind
    if kind == "IDX":
        if r.exch == "NSE":
            seg, name, token, tsym = "NSE_INDEX", r.asym, r.atok[3:], r.aname
        else:
            seg, tsym, token = "BSE_INDEX", r.sym.replace(" ", ""), str(r.et)
            name = r.sym if r.sym.startswith("BSE") else f"BSE {r.sym}"
        return (f'{{"segment":"{seg}","name":"{name}","exchange":"{r.exch}","instrument_type":"INDEX",'
                f'"instrument_key":"{ctx.index_row_key(r)}","exchange_token":"{token}","trading_symbol":"{tsym}"}}')
    tick = ctx.tick_text(r.tick)
    if kind == "EQ":
        if r.exch == "NSE":
            base, _, series = r.sym.rpartition("-")
            if not base:
                base, series = r.sym, "EQ"
            isin = ctx.isin_of(base, "07" if series.startswith("N") else "01")
            name = r.kname or base
            short = name.split(" ")[0].capitalize()
            return (f'{{"segment":"NSE_EQ","name":"{name}","exchange":"NSE","isin":"{isin}",'
                    f'"instrument_type":"{series}","instrument_key":"NSE_EQ|{isin}","lot_size":{r.lot},'
                    f'"freeze_quantity":{r.freeze}.0,"exchange_token":"{r.et}","tick_size":{tick},'
                    f'"trading_symbol":"{base}","short_name":"{short}","security_type":"NORMAL",'
                    f'"qty_multiplier":1.0}}')
        isin = ctx.isin_of(r.sym)
        group = "A" if r.sym in _UPX_ISIN else _UPX_BSE_GROUPS[r.et % len(_UPX_BSE_GROUPS)]
        return (f'{{"segment":"BSE_EQ","name":"{r.kname or r.sym}","exchange":"BSE","isin":"{isin}",'
                f'"instrument_type":"{group}","instrument_key":"BSE_EQ|{isin}","lot_size":{r.lot},'
                f'"freeze_quantity":{r.freeze}.0,"exchange_token":"{r.et}","tick_size":{tick},'
                f'"trading_symbol":"{r.sym}","short_name":"{r.sym}","qty_multiplier":1.0}}')
    exch = r.exch
    seg = _UPX_SEGMENT[exch]
    d = r.expiry
    assert d is not None
    date_txt = f"{d.day:02d} {_MON[d.month - 1]} {d.year % 100:02d}"
    if kind == "FUT":
        tsym, strike = f"{r.sym} FUT {date_txt}", "0.0"
    else:
        tsym, strike = f"{r.sym} {_plain(r.strike, 100)} {kind} {date_txt}", repr(r.strike / 100)
    lot, mult, minimum = r.lot, "1.0", True
    weekly = "true" if r.weekly and kind != "FUT" and exch in ("NFO", "BFO") else "false"
    if exch in ("NFO", "BFO"):
        if r.index_under:
            under, utype = ctx.index_key[r.sym], "INDEX"
        else:
            under, utype = f"NSE_EQ|{ctx.isin_of(r.sym)}", "EQUITY"
    elif exch == "MCX":
        m = _UPX_MCX_MULT.get(r.sym, 1)
        lot, mult, minimum, utype = m, f"{m}.0", False, "COM"
        under = (f"MCX_COM|{r.sym}" if kind == "FUT"
                 else f"MCX_FO|{ctx.mcx_future.get((r.sym, d), r.et)}")
    elif exch == "NSCOM":
        m = _UPX_NSE_COM_MULT.get(r.sym, 1)
        lot, mult, minimum, utype, under = m, f"{m}.0", False, "COM", f"NSE_COM|{r.sym}"
    else:  # currency: lot 1 x 1000, no asset/underlying keys on these rows
        lot, mult, utype, under = 1, "1000.0", "CUR", ""
    freeze = r.freeze or 1000 * lot
    parts = [f'{{"weekly":{weekly},"segment":"{seg}","name":"{r.sym}","exchange":"{_UPX_EXCHANGE[exch]}",'
             f'"expiry":{ctx.ms(d)},"instrument_type":"{kind}","asset_symbol":"{r.sym}",'
             f'"underlying_symbol":"{r.sym}","instrument_key":"{seg}|{r.et}","lot_size":{lot},'
             f'"freeze_quantity":{freeze}.0,"exchange_token":"{r.et}"']
    if minimum:
        parts.append(f',"minimum_lot":{lot}')
    if under:
        parts.append(f',"asset_key":"{under}","underlying_key":"{under}"')
    parts.append(f',"tick_size":{tick},"asset_type":"{utype}","underlying_type":"{utype}",'
                 f'"trading_symbol":"{tsym}","strike_price":{strike}')
    # BSE_FO rows carry no qty_multiplier (a live parse found it missing on all of them)
    parts.append("}" if exch == "BFO" else f',"qty_multiplier":{mult}}}')
    return "".join(parts)


def make_upstox_json_gz(path: PathLike, rows: int = 160_000, *, seed: int = _DEFAULT_SEED) -> int:
    """Write a real-shaped Upstox ``complete.json.gz`` of exactly ``rows`` objects; return ``rows``.

    One compact JSON array, gzip-compressed with ``mtime`` 0 and no file name (byte-stable for a
    given ``rows`` and ``seed``). Same universe and exchange tokens as :func:`make_kite_csv` /
    :func:`make_angel_json`: NSE_EQ and BSE_EQ keyed by ISIN, NSE_FO/BSE_FO keyed by exchange token
    with the BOD ``trading_symbol`` form (``NIFTY 23500 CE 24 NOV 26``), NSE_INDEX/BSE_INDEX rows
    without lot or tick; tick in paise, expiry in epoch ms at 23:59:59 IST; about 5 % MCX_FO,
    NCD_FO, BCD_FO and NSE_COM rows. Rows come in a deterministic shuffled order.

    Raises:
        ValueError: ``rows`` is too small to hold the fixed part of the universe.
    """
    uni, futs, opts, other = _plan(rows, seed, "upstox")
    ctx = _UpstoxText(uni, other)
    everything: List[_Inst] = []
    for seq in (uni.indices, uni.nse, uni.bse, futs, opts, other):
        everything.extend(seq)
    random.Random(seed * 7 + 8).shuffle(everything)
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            with io.TextIOWrapper(gz, encoding="utf-8", newline="") as f:
                f.write("[")
                _write_chunked(f, (("," if i else "") + _upstox_obj(r, ctx) for i, r in enumerate(everything)))
                f.write("]")
    if len(everything) != rows:  # pragma: no cover - guards the planner's arithmetic
        raise AssertionError(f"wrote {len(everything)} rows, planned {rows}")
    return len(everything)


# ============================================================================
# Floors
# ============================================================================

def _fresh_db(db_path: PathLike) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        try:
            os.remove(os.fspath(db_path) + suffix)
        except FileNotFoundError:
            pass


def floor_kite(csv_path: PathLike, db_path: PathLike) -> float:
    """Return seconds to ``csv.reader`` the dump and insert every row into SQLite, committed.

    One table of 12 TEXT columns, one ``executemany`` in one transaction, default pragmas.
    The clock covers opening the file and the database through the commit. ``db_path`` is
    deleted first if it exists.
    """
    _fresh_db(db_path)
    cols = ", ".join(f"{c} TEXT" for c in KITE_HEADER)
    insert = f"INSERT INTO kite VALUES ({', '.join('?' * len(KITE_HEADER))})"
    t0 = time.perf_counter()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        conn = sqlite3.connect(os.fspath(db_path))
        try:
            conn.execute(f"CREATE TABLE kite ({cols})")
            conn.executemany(insert, reader)
            conn.commit()
        finally:
            conn.close()
    return time.perf_counter() - t0


def floor_angel(json_path: PathLike, db_path: PathLike) -> float:
    """Return seconds to ``json.loads`` the master and insert every object into SQLite, committed.

    One table of the 11 fields as TEXT columns (missing fields stored as NULL), one
    ``executemany`` in one transaction, default pragmas; the clock covers reading the file's
    bytes through the commit. ``db_path`` is deleted first if it exists.
    """
    _fresh_db(db_path)
    cols = ", ".join(f"{c} TEXT" for c in ANGEL_FIELDS)
    insert = f"INSERT INTO angel VALUES ({', '.join('?' * len(ANGEL_FIELDS))})"
    t0 = time.perf_counter()
    with open(json_path, "rb") as f:
        data = json.loads(f.read())
    conn = sqlite3.connect(os.fspath(db_path))
    try:
        conn.execute(f"CREATE TABLE angel ({cols})")
        conn.executemany(insert, (
            (d.get("token"), d.get("symbol"), d.get("name"), d.get("expiry"), d.get("strike"),
             d.get("lotsize"), d.get("instrumenttype"), d.get("exch_seg"), d.get("tick_size"),
             d.get("freeze_qty"), d.get("is_cas_enabled"))
            for d in data))
        conn.commit()
    finally:
        conn.close()
    return time.perf_counter() - t0


def floor_upstox(gz_path: PathLike, db_path: PathLike) -> float:
    """Return seconds to gunzip and ``json.loads`` the master and insert every object into SQLite.

    One table of the 16 fields in :data:`UPSTOX_FIELDS` (TEXT, INTEGER or REAL; missing fields
    stored as NULL), one ``executemany`` in one transaction, default pragmas; the clock covers
    reading the file's bytes through the commit. ``db_path`` is deleted first if it exists.
    """
    _fresh_db(db_path)
    cols = ", ".join(f"{c} {t}" for c, t in zip(UPSTOX_FIELDS, _UPSTOX_TYPES))
    insert = f"INSERT INTO upstox VALUES ({', '.join('?' * len(UPSTOX_FIELDS))})"
    t0 = time.perf_counter()
    with open(gz_path, "rb") as f:
        data = json.loads(gzip.decompress(f.read()))
    conn = sqlite3.connect(os.fspath(db_path))
    try:
        conn.execute(f"CREATE TABLE upstox ({cols})")
        conn.executemany(insert, (
            (d.get("segment"), d.get("name"), d.get("exchange"), d.get("isin"), d.get("instrument_type"),
             d.get("instrument_key"), d.get("exchange_token"), d.get("trading_symbol"), d.get("lot_size"),
             d.get("tick_size"), d.get("freeze_quantity"), d.get("expiry"), d.get("strike_price"),
             d.get("weekly"), d.get("underlying_symbol"), d.get("qty_multiplier"))
            for d in data))
        conn.commit()
    finally:
        conn.close()
    return time.perf_counter() - t0


# ============================================================================
# __main__
# ============================================================================

def _main(argv: Sequence[str]) -> int:
    kite_rows = int(argv[0]) if len(argv) > 0 else 110_000
    angel_rows = int(argv[1]) if len(argv) > 1 else 160_000
    upstox_rows = int(argv[2]) if len(argv) > 2 else 160_000
    with tempfile.TemporaryDirectory(prefix="ttc-bench-") as tmp:
        kite_csv = os.path.join(tmp, "instruments.csv")
        angel_json = os.path.join(tmp, "OpenAPIScripMaster.json")
        upstox_gz = os.path.join(tmp, "complete.json.gz")
        t0 = time.perf_counter()
        nk = make_kite_csv(kite_csv, kite_rows)
        tk = time.perf_counter() - t0
        t0 = time.perf_counter()
        na = make_angel_json(angel_json, angel_rows)
        ta = time.perf_counter() - t0
        t0 = time.perf_counter()
        nu = make_upstox_json_gz(upstox_gz, upstox_rows)
        tu = time.perf_counter() - t0
        fk = floor_kite(kite_csv, os.path.join(tmp, "kite.db"))
        fa = floor_angel(angel_json, os.path.join(tmp, "angel.db"))
        fu = floor_upstox(upstox_gz, os.path.join(tmp, "upstox.db"))
        print(f"kite  : {nk:>7} rows  {os.path.getsize(kite_csv) / 1e6:6.2f} MB  generated in {tk:.2f} s"
              f"  floor {fk:.3f} s")
        print(f"angel : {na:>7} rows  {os.path.getsize(angel_json) / 1e6:6.2f} MB  generated in {ta:.2f} s"
              f"  floor {fa:.3f} s")
        print(f"upstox: {nu:>7} rows  {os.path.getsize(upstox_gz) / 1e6:6.2f} MB gz  generated in {tu:.2f} s"
              f"  floor {fu:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
