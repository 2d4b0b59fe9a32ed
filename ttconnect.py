"""ttconnect: one typed, broker-agnostic interface to Indian brokers.

Zerodha (Kite Connect v3), AngelOne (SmartAPI) and Upstox behind a single blocking client,
``TTConnect``. A strategy never contains broker-specific code: the broker is one string in a
config. The whole library is this file; it needs ``requests`` (imported lazily, on the first
network call), ``pyotp`` (AngelOne auto-login) and ``websocket-client`` (streaming).

    >>> import ttconnect as tt
    >>> broker = tt.TTConnect("zerodha", {"api_key": "...", "access_token": "..."})
    >>> broker.resolve(tt.Equity(exchange=tt.Exchange.NSE, symbol="RELIANCE"))
    '738561'
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "AuthMode",
    "AuthenticationError",
    "BrokerError",
    "ConfigurationError",
    "DepthLevel",
    "Equity",
    "Exchange",
    "Fund",
    "Future",
    "Holding",
    "Index",
    "InstrumentNotFoundError",
    "InsufficientFundsError",
    "InvalidOrderError",
    "Margin",
    "NetworkError",
    "Option",
    "OptionType",
    "Order",
    "OrderError",
    "OrderLeg",
    "OrderNotFoundError",
    "OrderStatus",
    "OrderType",
    "Position",
    "ProductType",
    "Profile",
    "RateLimitError",
    "SessionData",
    "Side",
    "TTConnect",
    "TTConnectError",
    "Tick",
    "Trade",
    "UnsupportedFeatureError",
    "main",
]

import codecs
import csv
import dataclasses
import datetime as _dt
import enum
import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    Union,
)

if TYPE_CHECKING:  # pragma: no cover - imported for type checkers only
    import requests

log = logging.getLogger("ttconnect")

# Compat: ``dataclass(slots=True)`` is Python 3.10+. Drop this shim with Python 3.9 support.
if sys.version_info >= (3, 10):
    _model = dataclass(frozen=True, slots=True)
else:  # pragma: no cover - exercised on 3.9 only
    _model = dataclass(frozen=True)


# ============================================================================
# 1. Constants & enums
# ============================================================================

IST = _dt.timezone(_dt.timedelta(hours=5, minutes=30), "IST")

DEFAULT_CACHE_DIR = "_cache"
CACHE_DIR_ENV = "TTCONNECT_CACHE_DIR"


class Exchange(str, enum.Enum):
    """Exchange segments, named as the exchanges and brokers name them."""

    NSE = "NSE"
    BSE = "BSE"
    NFO = "NFO"
    BFO = "BFO"
    CDS = "CDS"
    BCD = "BCD"
    MCX = "MCX"


class OptionType(str, enum.Enum):
    CE = "CE"
    PE = "PE"


class ProductType(str, enum.Enum):
    CNC = "CNC"
    MIS = "MIS"
    NRML = "NRML"


class OrderType(str, enum.Enum):
    MARKET = "MARKET"
    LIMIT = "LIMIT"
    SL = "SL"
    SL_M = "SL_M"


class Side(str, enum.Enum):
    BUY = "BUY"
    SELL = "SELL"


class OrderStatus(str, enum.Enum):
    """The canonical order states every broker's raw statuses map onto."""

    PENDING = "PENDING"  # accepted by the broker, not yet open at the exchange
    OPEN = "OPEN"
    TRIGGER_PENDING = "TRIGGER_PENDING"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    COMPLETE = "COMPLETE"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"


class AuthMode(str, enum.Enum):
    MANUAL = "manual"
    AUTO = "auto"


# Cash segment that holds the underlying of each derivative segment.
_UNDERLYING_EXCHANGE = {Exchange.NFO: Exchange.NSE, Exchange.BFO: Exchange.BSE}
_UNDERLYING_CODE = {k.value: v.value for k, v in _UNDERLYING_EXCHANGE.items()}
_CASH_EXCHANGES = frozenset({Exchange.NSE, Exchange.BSE})
_DERIVATIVE_EXCHANGES = frozenset({Exchange.NFO, Exchange.BFO, Exchange.CDS, Exchange.BCD, Exchange.MCX})
# Segments whose instrument rows are parsed into the store. The rest are counted and skipped
# until their own issue lands; asking for one raises UnsupportedFeatureError.
_LOADED_EXCHANGES = frozenset({Exchange.NSE, Exchange.BSE, Exchange.NFO, Exchange.BFO})

# Canonical index symbols are the F&O underlying names. Keys are upper-cased spellings used by
# the exchanges (official names) and by the brokers' masters.
_INDEX_ALIASES = {
    "NIFTY 50": "NIFTY",
    "NIFTY50": "NIFTY",
    "NIFTY BANK": "BANKNIFTY",
    "BANK NIFTY": "BANKNIFTY",
    "NIFTY FIN SERVICE": "FINNIFTY",
    "NIFTY FINANCIAL SERVICES": "FINNIFTY",
    "NIFTY MID SELECT": "MIDCPNIFTY",
    "NIFTY MIDCAP SELECT": "MIDCPNIFTY",
    "NIFTY NEXT 50": "NIFTYNXT50",
    "SENSEX 50": "SENSEX50",
    "BSE SENSEX": "SENSEX",
    "S&P BSE SENSEX": "SENSEX",
    "BSE BANKEX": "BANKEX",
}
# Derivative underlyings that are indices (a master that does not say so, like Kite's, needs this
# to file an underlying it has not seen yet).
_INDEX_UNDERLYINGS = frozenset(
    {"NIFTY", "BANKNIFTY", "FINNIFTY", "MIDCPNIFTY", "NIFTYNXT50", "SENSEX", "BANKEX", "SENSEX50"}
)


def _canonical_index_symbol(name: str) -> str:
    upper = name.strip().upper()
    return _INDEX_ALIASES.get(upper, upper)


# ============================================================================
# 2. Exceptions
# ============================================================================


class TTConnectError(Exception):
    """Base of every error ttconnect raises.

    ``retryable`` says whether the same call may succeed if tried again later; ``broker_code``
    carries the broker's own error code (Kite ``error_type``, AngelOne ``errorcode``, Upstox
    ``errorCode``) where there is one.
    """

    default_retryable = False

    def __init__(
        self,
        message: str = "",
        *,
        retryable: Optional[bool] = None,
        broker_code: Optional[str] = None,
        http_status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        self.broker_code = broker_code
        self.http_status = http_status


class AuthenticationError(TTConnectError):
    """The broker refused the credentials or the session (log in again)."""


class RateLimitError(TTConnectError):
    """The broker (or the client-side limiter) says: too many requests; retry later."""

    default_retryable = True


class NetworkError(TTConnectError):
    """The broker could not be reached or the connection broke; retrying may help."""

    default_retryable = True


class InstrumentNotFoundError(TTConnectError):
    """The instrument does not exist in the loaded instrument master."""


class UnsupportedFeatureError(TTConnectError):
    """The broker (or this version of ttconnect) does not support what was asked."""


class ConfigurationError(TTConnectError):
    """A config value is missing or malformed."""


class OrderError(TTConnectError):
    """The broker refused or failed an order operation."""


class InvalidOrderError(OrderError):
    """The order is malformed (quantity, price, tick, lot, trigger...)."""


class InsufficientFundsError(OrderError):
    """Not enough margin or holdings for the order."""


class OrderNotFoundError(OrderError):
    """No order with that id exists for this account today."""


class BrokerError(TTConnectError):
    """Anything else the broker reported; keeps the raw code and message."""


class _MasterFormatError(Exception):
    """An instrument master download is unusable (wrong format, truncated, too small)."""


# ============================================================================
# 3. Models
# ============================================================================


def _raw_field() -> Any:
    return field(default_factory=dict, repr=False, compare=False)


@_model
class Profile:
    user_id: str
    name: str
    email: Optional[str]
    broker: str
    exchanges: Tuple[Exchange, ...] = ()
    products: Tuple[ProductType, ...] = ()
    raw: Mapping[str, Any] = _raw_field()


@_model
class Fund:
    available: float
    used: float
    total: float
    collateral: Optional[float] = None
    m2m_unrealized: Optional[float] = None
    m2m_realized: Optional[float] = None
    utilised_debits: Optional[float] = None
    raw: Mapping[str, Any] = _raw_field()


@_model
class Holding:
    instrument: "Instrument"
    qty: int
    avg_price: float
    ltp: Optional[float] = None
    pnl: Optional[float] = None
    pnl_percent: Optional[float] = None
    raw: Mapping[str, Any] = _raw_field()


@_model
class Position:
    instrument: "Instrument"
    qty: int
    avg_price: float
    ltp: Optional[float] = None
    pnl: Optional[float] = None
    product: Optional[ProductType] = None
    raw: Mapping[str, Any] = _raw_field()


@_model
class Order:
    id: str
    instrument: "Instrument"
    side: Side
    qty: int
    filled_qty: int
    pending_qty: int
    order_type: OrderType
    product: ProductType
    status: OrderStatus
    price: Optional[float] = None
    trigger_price: Optional[float] = None
    average_price: Optional[float] = None
    tag: Optional[str] = None
    status_message: Optional[str] = None
    placed_at: Optional[_dt.datetime] = None
    updated_at: Optional[_dt.datetime] = None
    raw: Mapping[str, Any] = _raw_field()


@_model
class Trade:
    trade_id: str
    order_id: str
    instrument: "Instrument"
    side: Side
    qty: int
    avg_price: float
    trade_value: float
    product: Optional[ProductType] = None
    timestamp: Optional[_dt.datetime] = None
    raw: Mapping[str, Any] = _raw_field()


@_model
class Margin:
    total: float
    span: float = 0.0
    exposure: float = 0.0
    option_premium: float = 0.0
    final_total: float = 0.0
    benefit: float = 0.0
    raw: Mapping[str, Any] = _raw_field()


@_model
class OrderLeg:
    """One leg of a basket for ``calculate_margin``."""

    instrument: "Instrument"
    qty: int
    side: Side
    product: ProductType
    order_type: OrderType
    price: Optional[float] = None
    trigger_price: Optional[float] = None


@_model
class DepthLevel:
    price: float
    qty: int
    orders: int


@_model
class Tick:
    instrument: "Instrument"
    mode: str
    ltp: float
    last_qty: Optional[int] = None
    avg_price: Optional[float] = None
    volume: Optional[int] = None
    buy_qty: Optional[int] = None
    sell_qty: Optional[int] = None
    open: Optional[float] = None
    high: Optional[float] = None
    low: Optional[float] = None
    close: Optional[float] = None
    change: Optional[float] = None
    oi: Optional[int] = None
    oi_day_high: Optional[int] = None
    oi_day_low: Optional[int] = None
    last_trade_time: Optional[_dt.datetime] = None
    exchange_time: Optional[_dt.datetime] = None
    bids: Tuple[DepthLevel, ...] = ()
    asks: Tuple[DepthLevel, ...] = ()


@_model
class SessionData:
    broker: str
    mode: AuthMode
    access_token: str = field(repr=False)
    refresh_token: Optional[str] = field(default=None, repr=False)
    feed_token: Optional[str] = field(default=None, repr=False)
    obtained_at: Optional[_dt.datetime] = None
    expires_at: Optional[_dt.datetime] = None


# ============================================================================
# 4. Instruments (validation, identity)
# ============================================================================


def _instrument_id(key: str, _blake2b: Any = hashlib.blake2b, _from_bytes: Any = int.from_bytes) -> int:
    """Return the broker-independent row id of a canonical instrument key.

    The id is a 63-bit digest of the key, so every broker's loader files the same canonical
    instrument under the same id without a lookup table, and two brokers' rows merge by key.
    (A collision needs ~4e9 instruments to become likely; a master has ~1e5.)
    """
    return _from_bytes(_blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def _as_enum(enum_cls: Any, value: Any, what: str) -> Any:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        try:
            return enum_cls(value.upper())
        except ValueError:
            pass
    valid = ", ".join(m.value for m in enum_cls)
    raise ValueError(f"{what} {value!r} is not valid; expected one of {valid}")


def _check_symbol(symbol: Any) -> str:
    if not isinstance(symbol, str) or not symbol.strip():
        raise TypeError(f"symbol must be a non-empty string, got {symbol!r}")
    if symbol != symbol.upper() or symbol != symbol.strip():
        raise ValueError(f"symbol {symbol!r} must be upper case without surrounding spaces, e.g. {symbol.strip().upper()!r}")
    return symbol


def _check_expiry(expiry: Any) -> _dt.date:
    if isinstance(expiry, _dt.datetime):
        raise TypeError(f"expiry must be a date or an ISO date string 'YYYY-MM-DD', got a datetime {expiry!r}")
    if isinstance(expiry, _dt.date):
        return expiry
    if isinstance(expiry, str) and len(expiry) == 10 and expiry[4] == "-" and expiry[7] == "-":
        try:
            return _dt.date.fromisoformat(expiry)
        except ValueError:
            pass
    raise ValueError(f"expiry {expiry!r} is not an ISO date; expected 'YYYY-MM-DD', e.g. '2025-01-30'")


def _check_strike(strike: Any) -> float:
    if isinstance(strike, bool) or not isinstance(strike, (int, float, str, Decimal)):
        raise TypeError(f"strike must be a number (int, float, str or Decimal), got {strike!r}")
    try:
        value = Decimal(str(strike).strip())
    except InvalidOperation:
        raise ValueError(f"strike {strike!r} is not a number") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"strike must be a positive number, got {strike!r}")
    return float(value)


def _check_exchange(exchange: Any, allowed: frozenset, kind: str) -> Exchange:
    exch = _as_enum(Exchange, exchange, "exchange")
    if exch not in allowed:
        names = ", ".join(sorted(e.value for e in allowed))
        raise ValueError(f"{kind} on {exch.value} is not possible; {kind} trade on {names}")
    return exch


class _Instrument:
    """Shared behaviour of the four instrument types (plain, hashable values)."""

    __slots__ = ()

    def _key(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def __str__(self) -> str:
        return self._label()

    def _label(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def _after_init(self) -> None:
        object.__setattr__(self, "_iid", _instrument_id(self._key()))
        store = _validation_store()
        if store is not None:
            store.check_exists(self)


@_model
class Index(_Instrument):
    """An index (NSE NIFTY, BSE SENSEX...); accepts exchange and broker spellings as aliases."""

    exchange: Exchange
    symbol: str
    _iid: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exchange", _check_exchange(self.exchange, _CASH_EXCHANGES, "indices"))
        if not isinstance(self.symbol, str) or not self.symbol.strip():
            raise TypeError(f"symbol must be a non-empty string, got {self.symbol!r}")
        canonical = _canonical_index_symbol(self.symbol)
        if canonical != self.symbol and self.symbol.strip().upper() not in _INDEX_ALIASES:
            _check_symbol(self.symbol)
        object.__setattr__(self, "symbol", canonical)
        self._after_init()

    def _key(self) -> str:
        return f"{self.exchange.value}|{self.symbol}"

    def _label(self) -> str:
        return f"{self.exchange.value}:{self.symbol}"


@_model
class Equity(_Instrument):
    """A cash-market security; non-EQ series keep their suffix (``XYZ-BE``)."""

    exchange: Exchange
    symbol: str
    _iid: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exchange", _check_exchange(self.exchange, _CASH_EXCHANGES, "equities"))
        _check_symbol(self.symbol)
        self._after_init()

    def _key(self) -> str:
        return f"{self.exchange.value}|{self.symbol}"

    def _label(self) -> str:
        return f"{self.exchange.value}:{self.symbol}"


@_model
class Future(_Instrument):
    """A futures contract on ``symbol`` (the underlying's canonical symbol) expiring ``expiry``."""

    exchange: Exchange
    symbol: str
    expiry: _dt.date
    _iid: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exchange", _check_exchange(self.exchange, _DERIVATIVE_EXCHANGES, "futures"))
        _check_symbol(self.symbol)
        object.__setattr__(self, "expiry", _check_expiry(self.expiry))
        self._after_init()

    def _key(self) -> str:
        return f"{self.exchange.value}|{self.symbol}|{self.expiry.isoformat()}|FUT"

    def _label(self) -> str:
        return f"{self.exchange.value}:{self.symbol} FUT {self.expiry.isoformat()}"


@_model
class Option(_Instrument):
    """An option on ``symbol`` (the underlying's canonical symbol)."""

    exchange: Exchange
    symbol: str
    expiry: _dt.date
    strike: float
    option_type: OptionType
    _iid: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "exchange", _check_exchange(self.exchange, _DERIVATIVE_EXCHANGES, "options"))
        _check_symbol(self.symbol)
        object.__setattr__(self, "expiry", _check_expiry(self.expiry))
        object.__setattr__(self, "strike", _check_strike(self.strike))
        object.__setattr__(self, "option_type", _as_enum(OptionType, self.option_type, "option_type"))
        self._after_init()

    def _key(self) -> str:
        return _option_key(self.exchange.value, self.symbol, self.expiry.isoformat(), self.strike, self.option_type.value)

    def _label(self) -> str:
        return f"{self.exchange.value}:{self.symbol} {self.expiry.isoformat()} {_fmt_num(self.strike)} {self.option_type.value}"


Instrument = Union[Index, Equity, Future, Option]


def _option_key(exchange: str, symbol: str, expiry: str, strike: float, option_type: str) -> str:
    return f"{exchange}|{symbol}|{expiry}|{strike!r}|{option_type}"


def _fmt_num(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _make(cls: Any, iid: int, **values: Any) -> Any:
    """Build an instrument from trusted store data, skipping validation and the existence check."""
    obj = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(obj, name, value)
    object.__setattr__(obj, "_iid", iid)
    return obj


# Stores of the clients open in this process, newest last: instrument construction checks
# existence against the newest one (canonical instruments are broker-independent).
_OPEN_STORES: "List[weakref.ReferenceType[_InstrumentStore]]" = []
_OPEN_STORES_LOCK = threading.Lock()


def _validation_store() -> Optional["_InstrumentStore"]:
    with _OPEN_STORES_LOCK:
        while _OPEN_STORES:
            store = _OPEN_STORES[-1]()
            if store is not None and not store.closed:
                return store
            _OPEN_STORES.pop()
    return None


def _register_store(store: "_InstrumentStore") -> None:
    with _OPEN_STORES_LOCK:
        _OPEN_STORES.append(weakref.ref(store))


def _unregister_store(store: "_InstrumentStore") -> None:
    with _OPEN_STORES_LOCK:
        _OPEN_STORES[:] = [r for r in _OPEN_STORES if r() is not None and r() is not store]


# ============================================================================
# 5. Instrument store (sqlite3)
# ============================================================================

_SCHEMA_VERSION = 1

# Rows are appended in load order and every key is a unique index built after the bulk load:
# inserting ~1e5 hashed ids into a keyed b-tree row by row is ~3x slower than appending and
# sorting once. ``id`` is the canonical identity (see _instrument_id), the same in every
# broker's rows.
_SCHEMA = """
CREATE TABLE instruments (
    id        INTEGER NOT NULL,
    exchange  TEXT    NOT NULL,
    symbol    TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    lot_size  INTEGER NOT NULL,
    tick_size REAL    NOT NULL
);
CREATE TABLE indices (
    instrument_id INTEGER NOT NULL REFERENCES instruments(id)
);
CREATE TABLE equities (
    instrument_id INTEGER NOT NULL REFERENCES instruments(id),
    isin          TEXT    NOT NULL  -- '' while no loaded master carries it (Kite and AngelOne do not)
);
CREATE TABLE futures (
    instrument_id INTEGER NOT NULL REFERENCES instruments(id),
    underlying_id INTEGER NOT NULL REFERENCES instruments(id),
    expiry        TEXT    NOT NULL
);
CREATE TABLE options (
    instrument_id INTEGER NOT NULL REFERENCES instruments(id),
    underlying_id INTEGER NOT NULL REFERENCES instruments(id),
    expiry        TEXT    NOT NULL,
    strike        REAL    NOT NULL,
    option_type   TEXT    NOT NULL CHECK (option_type IN ('CE', 'PE'))
);
CREATE TABLE broker_tokens (
    instrument_id INTEGER NOT NULL REFERENCES instruments(id),
    broker_id     TEXT    NOT NULL,
    token         TEXT    NOT NULL,
    broker_symbol TEXT    NOT NULL
);
CREATE TABLE _meta (
    broker_id    TEXT PRIMARY KEY,
    refreshed_at TEXT    NOT NULL,
    rows         INTEGER NOT NULL,
    skipped      INTEGER NOT NULL,
    malformed    INTEGER NOT NULL,
    source       TEXT    NOT NULL
);
"""

# Derivative ids are unique to their type (the key spells FUT or strike and CE/PE), so the
# unique key of ``instruments`` covers futures and options; only cash ids, shared by the
# index and the equity spelling of one symbol, need the type tables to tell them apart.
_DEDUPE_KEYS = (
    ("instruments", "id"),
    ("indices", "instrument_id"),
    ("equities", "instrument_id"),
    ("futures", "instrument_id"),
    ("options", "instrument_id"),
    ("broker_tokens", "instrument_id, broker_id"),
)
_INDEXES = (
    "CREATE UNIQUE INDEX ix_indices_key ON indices(instrument_id)",
    "CREATE UNIQUE INDEX ix_equities_key ON equities(instrument_id)",
    "CREATE UNIQUE INDEX ix_broker_tokens_key ON broker_tokens(instrument_id, broker_id)",
    "CREATE INDEX ix_instruments_exchange_symbol ON instruments(exchange, symbol)",
    "CREATE INDEX ix_futures_underlying_expiry ON futures(underlying_id, expiry)",
    "CREATE INDEX ix_options_chain ON options(underlying_id, expiry, strike, option_type)",
    "CREATE INDEX ix_broker_tokens_token ON broker_tokens(token)",
)


def _create_indexes(conn: sqlite3.Connection) -> int:
    """Build every index, first dropping duplicate canonical rows (the first one of each key
    stays) if the master had any. Return how many broker rows were dropped as duplicates."""
    dropped = 0
    try:
        conn.execute(f"CREATE UNIQUE INDEX ix_instruments_key ON instruments(id)")
    except sqlite3.IntegrityError:
        for table, cols in _DEDUPE_KEYS:
            gone = conn.execute(
                f"DELETE FROM {table} WHERE rowid NOT IN (SELECT MIN(rowid) FROM {table} GROUP BY {cols})"
            ).rowcount
            dropped += gone if table == "broker_tokens" else 0
        conn.execute(f"CREATE UNIQUE INDEX ix_instruments_key ON instruments(id)")
    for statement in _INDEXES:
        conn.execute(statement)
    return dropped


# Cash ids are shared by the index and the equity spelling of a symbol, so cash look-ups
# also check the type table; a derivative's id already names its type.
_EXISTS_SQL = {
    Index: "SELECT 1 FROM indices WHERE instrument_id = ?",
    Equity: "SELECT 1 FROM equities WHERE instrument_id = ?",
    Future: "SELECT 1 FROM instruments WHERE id = ?",
    Option: "SELECT 1 FROM instruments WHERE id = ?",
}
_TOKEN_SQL = {
    Index: "SELECT t.token, t.broker_symbol FROM broker_tokens t JOIN indices x ON x.instrument_id = t.instrument_id"
           " WHERE t.instrument_id = ? AND t.broker_id = ?",
    Equity: "SELECT t.token, t.broker_symbol FROM broker_tokens t JOIN equities x ON x.instrument_id = t.instrument_id"
            " WHERE t.instrument_id = ? AND t.broker_id = ?",
    Future: "SELECT token, broker_symbol FROM broker_tokens WHERE instrument_id = ? AND broker_id = ?",
    Option: "SELECT token, broker_symbol FROM broker_tokens WHERE instrument_id = ? AND broker_id = ?",
}


class _CorruptStore(Exception):
    pass


@dataclass
class _LoadStats:
    """What one master load did: rows filed, rows skipped by segment, malformed rows."""

    rows: int = 0
    duplicates: int = 0
    malformed: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)

    def skip(self, segment: str) -> None:
        self.skipped[segment] = self.skipped.get(segment, 0) + 1

    def bad(self, line: int, reason: str) -> None:
        self.malformed += 1
        if self.malformed <= 5:
            log.warning("instrument master: skipped malformed row %d: %s", line, reason)


# Row shapes yielded by a broker's master parser (see _zerodha_parse_master):
#   ("I", exchange, symbol, name, lot_size, tick_size, token, broker_symbol)           index
#   ("E", exchange, symbol, name, lot_size, tick_size, token, broker_symbol)           equity
#   ("F", exchange, symbol, name, lot_size, tick_size, token, broker_symbol, expiry, und_kind)
#   ("O", ... as "F" ..., strike, option_type)                                         option
# ``symbol`` of a derivative is its underlying's canonical symbol; ``und_kind`` is "I" or "E".
_MasterRow = Tuple[Any, ...]



class _Loader:
    """Files canonical master rows into a fresh database with bounded memory.

    Rows are appended to one wide staging table as they are parsed (one insert per row),
    then fanned out to the normalised tables by ``INSERT ... SELECT`` inside SQLite.
    A derivative may come before its underlying (Kite lists NSE last): the underlying's id is
    known from its key alone, and a placeholder row is filed at the end only for underlyings
    the master never lists itself.
    """

    STAGE = (
        "CREATE TEMP TABLE stage (id INTEGER, kind TEXT, exchange TEXT, symbol TEXT, name TEXT,"
        " lot_size INTEGER, tick_size REAL, token TEXT, broker_symbol TEXT, underlying_id INTEGER,"
        " expiry TEXT, strike REAL, option_type TEXT)"
    )
    FAN_OUT = (
        "INSERT INTO instruments SELECT id, exchange, symbol, name, lot_size, tick_size FROM temp.stage",
        "INSERT INTO indices SELECT id FROM temp.stage WHERE kind = 'I'",
        "INSERT INTO equities SELECT id, '' FROM temp.stage WHERE kind = 'E'",
        "INSERT INTO futures SELECT id, underlying_id, expiry FROM temp.stage WHERE kind = 'F'",
        "INSERT INTO options SELECT id, underlying_id, expiry, strike, option_type FROM temp.stage WHERE kind = 'O'",
        "INSERT INTO broker_tokens SELECT id, ?, token, broker_symbol FROM temp.stage",
    )

    def __init__(self, conn: sqlite3.Connection, broker_id: str, stats: _LoadStats) -> None:
        self.conn, self.broker_id, self.stats = conn, broker_id, stats
        self.cash_seen: set = set()
        self.pending: Dict[int, Tuple[str, str, str]] = {}  # id -> (kind, exchange, symbol)

    def load(self, rows: Iterable[_MasterRow]) -> None:
        conn = self.conn
        conn.execute(self.STAGE)
        conn.executemany("INSERT INTO temp.stage VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", self._staged(rows))
        self.stats.rows = conn.execute("SELECT COUNT(*) FROM temp.stage").fetchone()[0]
        for sql in self.FAN_OUT[:-1]:
            conn.execute(sql)
        conn.execute(self.FAN_OUT[-1], (self.broker_id,))  # temp.stage goes with the connection
        # Underlyings the master never listed itself get a row (no token) so that every
        # derivative points at an instrument.
        for uid, (kind, exchange, symbol) in self.pending.items():
            if uid not in self.cash_seen:
                conn.execute("INSERT INTO instruments VALUES (?,?,?,?,?,?)", (uid, exchange, symbol, symbol, 0, 0.0))
                if kind == "I":
                    conn.execute("INSERT INTO indices VALUES (?)", (uid,))
                else:
                    conn.execute("INSERT INTO equities VALUES (?, '')", (uid,))

    def _staged(self, rows: Iterable[_MasterRow]) -> Iterator[tuple]:
        iid_of = _instrument_id
        underlyings: Dict[Tuple[str, str], int] = {}
        for row in rows:
            kind, exchange, symbol = row[0], row[1], row[2]
            if kind == "O":
                uid = underlyings.get((exchange, symbol))
                if uid is None:
                    uid = self._underlying(underlyings, row)
                yield (iid_of(f"{exchange}|{symbol}|{row[8]}|{row[10]!r}|{row[11]}"),  # = _option_key
                       kind, exchange, symbol, row[3], row[4], row[5], row[6], row[7], uid, row[8], row[10], row[11])
            elif kind == "F":
                uid = underlyings.get((exchange, symbol))
                if uid is None:
                    uid = self._underlying(underlyings, row)
                yield (iid_of(f"{exchange}|{symbol}|{row[8]}|FUT"),
                       kind, exchange, symbol, row[3], row[4], row[5], row[6], row[7], uid, row[8], None, None)
            else:
                iid = iid_of(f"{exchange}|{symbol}")
                self.cash_seen.add(iid)
                yield (iid, kind, exchange, symbol, row[3], row[4], row[5], row[6], row[7], None, None, None, None)

    def _underlying(self, underlyings: Dict[Tuple[str, str], int], row: _MasterRow) -> int:
        und_exchange = _UNDERLYING_CODE[row[1]]
        uid = underlyings[(row[1], row[2])] = _instrument_id(f"{und_exchange}|{row[2]}")
        self.pending[uid] = (row[9], und_exchange, row[2])
        return uid


class _InstrumentStore:
    """The instrument database: one SQLite file shared by every broker (and process).

    Readers use one read-only connection per thread. A refresh builds a complete new file
    beside the old one and swaps it in with ``os.replace``, so a reader (or a crash) sees the
    old data or the new, never a mix.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.closed = False
        self._local = threading.local()
        self._generation = 0
        self._lock = threading.Lock()

    # -- connections -----------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.generation != self._generation:
            if conn is not None:
                conn.close()
            conn = self._open_readonly()
            local.conn, local.generation = conn, self._generation
        return conn

    def _open_readonly(self) -> sqlite3.Connection:
        uri = "file:" + _sqlite_uri_path(self.path) + "?mode=ro"
        return sqlite3.connect(uri, uri=True, check_same_thread=True)

    def reopen(self) -> None:
        """Make every thread open the (replaced) file afresh on its next query."""
        with self._lock:
            self._generation += 1

    def close(self) -> None:
        self.closed = True
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- health and metadata -------------------------------------------------------------

    def check(self) -> Dict[str, Tuple[str, int]]:
        """Return {broker: (refreshed_at, rows)}; raise _CorruptStore if the file is damaged."""
        try:
            size = os.path.getsize(self.path)
            conn = self.conn()
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            page_count = conn.execute("PRAGMA page_count").fetchone()[0]
            if size < page_size * page_count or size == 0:
                raise _CorruptStore(f"file is {size} bytes, header says {page_size * page_count}")
            if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                raise _CorruptStore("schema version differs")
            rows = conn.execute("SELECT broker_id, refreshed_at, rows FROM _meta").fetchall()
        except sqlite3.DatabaseError as exc:
            raise _CorruptStore(str(exc)) from exc
        return {b: (at, n) for b, at, n in rows}

    # -- lookups -----------------------------------------------------------------------------

    def has_type(self, instrument: Instrument) -> bool:
        sql = _EXISTS_SQL[type(instrument)]
        return self.conn().execute(sql, (instrument._iid,)).fetchone() is not None

    def token(self, broker_id: str, instrument: Instrument) -> Optional[Tuple[str, str]]:
        return self.conn().execute(_TOKEN_SQL[type(instrument)], (instrument._iid, broker_id)).fetchone()

    def info(self, instrument: Instrument) -> Optional[Tuple[str, int, float]]:
        if not self.has_type(instrument):
            return None
        sql = "SELECT name, lot_size, tick_size FROM instruments WHERE id = ?"
        return self.conn().execute(sql, (instrument._iid,)).fetchone()

    def check_exists(self, instrument: Instrument) -> None:
        """Raise if ``instrument`` is in an unloaded segment or absent from the store."""
        if instrument.exchange not in _LOADED_EXCHANGES:
            raise UnsupportedFeatureError(
                f"{instrument}: the {instrument.exchange.value} segment is not loaded yet; "
                f"ttconnect loads {', '.join(sorted(e.value for e in _LOADED_EXCHANGES))} instruments"
            )
        if not self.has_type(instrument):
            raise InstrumentNotFoundError(self.not_found_message(instrument))

    def underlying_id(self, exchange: Exchange, symbol: str) -> Optional[int]:
        und = _UNDERLYING_EXCHANGE.get(exchange)
        if und is None:
            return None
        return _instrument_id(f"{und.value}|{symbol}")

    def expiries(self, exchange: Exchange, symbol: str, table: str, broker_id: Optional[str] = None) -> List[str]:
        uid = self.underlying_id(exchange, symbol)
        if uid is None:
            return []
        if broker_id is None:
            sql = f"SELECT DISTINCT expiry FROM {table} WHERE underlying_id = ? ORDER BY expiry"
            return [r[0] for r in self.conn().execute(sql, (uid,))]
        sql = (
            f"SELECT DISTINCT x.expiry FROM {table} x JOIN broker_tokens t ON t.instrument_id = x.instrument_id"
            " AND t.broker_id = ? WHERE x.underlying_id = ? ORDER BY x.expiry"
        )
        return [r[0] for r in self.conn().execute(sql, (broker_id, uid))]

    def strikes(self, exchange: Exchange, symbol: str, expiry: str, option_type: str) -> List[float]:
        uid = self.underlying_id(exchange, symbol)
        sql = "SELECT strike FROM options WHERE underlying_id = ? AND expiry = ? AND option_type = ? ORDER BY strike"
        return [r[0] for r in self.conn().execute(sql, (uid, expiry, option_type))]

    def similar_symbols(self, exchange: Exchange, symbol: str, limit: int = 5) -> List[str]:
        prefix = symbol[:3]
        sql = (
            "SELECT DISTINCT symbol FROM instruments WHERE exchange = ? AND symbol >= ? AND symbol < ?"
            " ORDER BY symbol LIMIT ?"
        )
        return [r[0] for r in self.conn().execute(sql, (exchange.value, prefix, prefix + "\uffff", limit))]

    def not_found_message(self, inst: Instrument) -> str:
        """Say what was asked and, cheaply, what exists nearby."""
        hint = "check the instrument or refresh the instrument master"
        if isinstance(inst, (Future, Option)):
            table = "futures" if isinstance(inst, Future) else "options"
            expiries = self.expiries(inst.exchange, inst.symbol, table)
            if not expiries:
                similar = self.similar_symbols(inst.exchange, inst.symbol)
                tail = f"; similar symbols on {inst.exchange.value}: {', '.join(similar)}" if similar else ""
                return f"{inst}: no {table} on {inst.exchange.value} for underlying {inst.symbol!r}{tail}; {hint}"
            iso = inst.expiry.isoformat()
            if iso not in expiries:
                near = sorted(expiries, key=lambda e: abs(_dt.date.fromisoformat(e) - inst.expiry))[:3]
                return f"{inst}: expiry {iso} not found; nearest on file: {', '.join(sorted(near))}; pass one of those or {hint}"
            if isinstance(inst, Option):
                strikes = self.strikes(inst.exchange, inst.symbol, iso, inst.option_type.value)
                near_s = sorted(strikes, key=lambda s: abs(s - inst.strike))[:4]
                listed = ", ".join(_fmt_num(s) for s in sorted(near_s))
                return f"{inst}: strike {_fmt_num(inst.strike)} not listed; nearest strikes: {listed}; {hint}"
            return f"{inst}: not found; {hint}"
        kind = "index" if isinstance(inst, Index) else "equity"
        similar = self.similar_symbols(inst.exchange, inst.symbol)
        tail = f"; similar symbols on {inst.exchange.value}: {', '.join(similar)}" if similar else ""
        return f"{inst}: no {kind} {inst.symbol!r} on {inst.exchange.value}{tail}; {hint}"

    def search(self, prefix: str, exchange: Optional[Exchange], broker_id: str, limit: int) -> List[Instrument]:
        prefix = prefix.strip().upper()
        params: List[Any] = [broker_id, prefix, prefix + "\uffff"]
        where = ""
        if exchange is not None:
            where = " AND i.exchange = ?"
            params.append(exchange.value)
        params.append(limit)
        sql = (
            "SELECT i.id, i.exchange, i.symbol, x.instrument_id IS NOT NULL, f.expiry"
            " FROM instruments i JOIN broker_tokens t ON t.instrument_id = i.id AND t.broker_id = ?"
            " LEFT JOIN indices x ON x.instrument_id = i.id"
            " LEFT JOIN futures f ON f.instrument_id = i.id"
            " LEFT JOIN equities e ON e.instrument_id = i.id"
            " WHERE i.symbol >= ? AND i.symbol < ? AND (x.instrument_id IS NOT NULL"
            " OR e.instrument_id IS NOT NULL OR f.instrument_id IS NOT NULL)" + where +
            " ORDER BY f.expiry IS NOT NULL, i.symbol, i.exchange, f.expiry LIMIT ?"
        )
        out: List[Instrument] = []
        for iid, exch, symbol, is_index, expiry in self.conn().execute(sql, params):
            exch_e = Exchange(exch)
            if expiry is not None:
                out.append(_make(Future, iid, exchange=exch_e, symbol=symbol, expiry=_dt.date.fromisoformat(expiry)))
            else:
                out.append(_make(Index if is_index else Equity, iid, exchange=exch_e, symbol=symbol))
        return out

    def chain(self, exchange: Exchange, symbol: str, expiry: str, broker_id: str) -> List[Option]:
        uid = self.underlying_id(exchange, symbol)
        sql = (
            "SELECT o.instrument_id, o.strike, o.option_type FROM options o JOIN broker_tokens t"
            " ON t.instrument_id = o.instrument_id AND t.broker_id = ?"
            " WHERE o.underlying_id = ? AND o.expiry = ? ORDER BY o.strike, o.option_type"
        )
        exp = _dt.date.fromisoformat(expiry)
        return [
            _make(Option, iid, exchange=exchange, symbol=symbol, expiry=exp, strike=strike, option_type=OptionType(ot))
            for iid, strike, ot in self.conn().execute(sql, (broker_id, uid, expiry))
        ]


def _sqlite_uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(os.path.abspath(path).replace(os.sep, "/"), safe="/:")


def _build_store(path: str, broker_id: str, rows: Iterable[_MasterRow], stats: _LoadStats,
                 source: str, refreshed_at: str, previous_rows: int) -> None:
    """Build a complete new store file from one broker's master and swap it in atomically.

    Other brokers' data is carried over from the current file (if it is healthy). Nothing is
    replaced unless the new file is complete and passes the sanity checks.
    """
    tmp = f"{path}.build-{os.getpid()}-{threading.get_ident()}"
    _remove_quietly(tmp)
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        # The file is private until the rename below and fsynced before it, so it needs no
        # durable journal; an in-memory one still lets a failed statement roll back (and
        # costs nothing for pages a fresh file adds).
        conn.execute("PRAGMA journal_mode = MEMORY")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA secure_delete = OFF")  # some builds default it on: no page wiping
        conn.execute("PRAGMA cache_size = -4096")  # 4 MiB: most index sorting stays in memory
        conn.execute("PRAGMA threads = 2")  # lets SQLite sort an index on a helper thread
        conn.executescript(_SCHEMA)
        carry = os.path.exists(path)
        if carry:  # attached outside the transaction: DETACH is refused inside one
            conn.execute("ATTACH DATABASE ? AS old", (path,))
        conn.execute("BEGIN")
        _Loader(conn, broker_id, stats).load(rows)
        stats.duplicates = _create_indexes(conn)
        stats.rows -= stats.duplicates
        if stats.rows == 0:
            raise _MasterFormatError("the master holds no usable instrument rows")
        if stats.rows * 2 < previous_rows:
            raise _MasterFormatError(
                f"the master holds {stats.rows} usable rows, under half of the previous good dump's "
                f"{previous_rows}; it looks truncated or partial"
            )
        if stats.malformed > stats.rows:
            raise _MasterFormatError(f"{stats.malformed} of {stats.malformed + stats.rows} rows are malformed")
        if carry:
            _carry_over(conn, broker_id)
        conn.execute(
            "INSERT OR REPLACE INTO _meta VALUES (?,?,?,?,?,?)",
            (broker_id, refreshed_at, stats.rows, sum(stats.skipped.values()), stats.malformed, source),
        )
        conn.execute("COMMIT")
        if carry:
            conn.execute("DETACH DATABASE old")
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        conn.close()
        _remove_quietly(tmp)
        raise


_CARRY_OVER = (
    "INSERT INTO main.instruments SELECT * FROM old.instruments WHERE id IN temp.keep",
    "INSERT INTO main.indices SELECT * FROM old.indices WHERE instrument_id IN temp.keep",
    "INSERT INTO main.equities SELECT * FROM old.equities WHERE instrument_id IN temp.keep",
    "INSERT INTO main.futures SELECT * FROM old.futures WHERE instrument_id IN temp.keep",
    "INSERT INTO main.options SELECT * FROM old.options WHERE instrument_id IN temp.keep",
)


def _carry_over(conn: sqlite3.Connection, broker_id: str) -> None:
    """Copy the other brokers' tokens, and the instruments only they list, from the old file.

    All or nothing: on a damaged old file the new one simply holds this broker alone (the
    others refresh on their next start).
    """
    conn.execute("SAVEPOINT carry_over")
    try:
        if conn.execute("PRAGMA old.user_version").fetchone()[0] != _SCHEMA_VERSION:
            return
        conn.execute("CREATE TEMP TABLE keep (id INTEGER PRIMARY KEY)")
        conn.execute("INSERT OR IGNORE INTO keep SELECT instrument_id FROM old.broker_tokens WHERE broker_id != ?", (broker_id,))
        if conn.execute("SELECT COUNT(*) FROM keep").fetchone()[0] == 0:
            return
        for table in ("futures", "options"):
            conn.execute(f"INSERT OR IGNORE INTO keep SELECT underlying_id FROM old.{table} WHERE instrument_id IN keep")
        # Instruments the new master lists keep the new master's row.
        conn.execute("DELETE FROM keep WHERE id IN (SELECT id FROM main.instruments)")
        for statement in _CARRY_OVER:
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO main.broker_tokens SELECT * FROM old.broker_tokens WHERE broker_id != ?", (broker_id,))
        conn.execute("INSERT OR IGNORE INTO main._meta SELECT * FROM old._meta WHERE broker_id != ?", (broker_id,))
    except sqlite3.DatabaseError as exc:
        conn.execute("ROLLBACK TO carry_over")
        log.warning("instrument store: could not carry other brokers' data over (%s); they will refresh on their next start", exc)
    finally:
        conn.execute("RELEASE carry_over")
        conn.execute("DROP TABLE IF EXISTS temp.keep")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileLock:
    """An exclusive lock on a file, held across processes (fcntl / msvcrt)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def __enter__(self) -> "_FileLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.name == "posix":
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(self._fd, msvcrt.LK_LOCK, 1)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._fd is not None
        if os.name == "posix":
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(self._fd, msvcrt.LK_UNLCK, 1)
        os.close(self._fd)
        self._fd = None


# ============================================================================
# 6. Broker specs
# ============================================================================


class BrokerSpec(TypedDict):
    """Everything that differs between brokers, as data plus small named hooks."""

    id: str
    name: str
    root_url: str  # REST root
    login_url: str  # browser login page, "" where there is none
    ws_url: str  # market-data websocket
    order_ws_url: str  # order-update websocket, "" where the market feed carries them
    instruments_url: str  # the full master file (one file per broker)
    instruments_headers: Mapping[str, str]
    instruments_published: Tuple[int, int]  # (hour, minute) IST of the daily dump
    auth_modes: Tuple[AuthMode, ...]
    default_auth_mode: AuthMode
    hooks: Mapping[str, Callable[..., Any]]


class _ExpiryCache(dict):
    """Memoises a broker's expiry spelling -> ISO date (a master repeats a few hundred values)."""

    def __init__(self, convert: Callable[[str], str]) -> None:
        super().__init__()
        self.convert = convert

    def __missing__(self, raw: str) -> str:
        iso = self.convert(raw)  # raises ValueError on a bad date; not cached then
        self[raw] = iso
        return iso


# ============================================================================
# 6a. Broker spec: Zerodha
# ============================================================================

_KITE_MASTER_COLUMNS = (
    "instrument_token", "tradingsymbol", "name", "expiry", "strike", "tick_size",
    "lot_size", "instrument_type", "segment", "exchange",
)


def _kite_iso_date(raw: str) -> str:
    return _dt.date.fromisoformat(raw).isoformat()


def _zerodha_parse_master(f: IO[bytes], stats: _LoadStats) -> Iterator[_MasterRow]:
    """Parse Kite's instrument CSV (section 7 of the Kite notes) into canonical rows.

    Kite gives strike and tick size in rupees; index rows carry tick 0 and lot 0; the
    derivative ``name`` column is the underlying's F&O name.
    """
    import io

    reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
    header = next(reader, None)
    if not header:
        raise _MasterFormatError("the file is empty")
    cols = {name.strip(): i for i, name in enumerate(header)}
    missing = [c for c in _KITE_MASTER_COLUMNS if c not in cols]
    if missing:
        snippet = ",".join(header)[:80]
        raise _MasterFormatError(f"not a Kite instrument CSV: column(s) {', '.join(missing)} missing (header {snippet!r})")
    c_tok, c_sym, c_name, c_exp, c_strike, c_tick, c_lot, c_type, c_seg, c_exch = (cols[c] for c in _KITE_MASTER_COLUMNS)
    width = len(header)
    loaded = {e.value for e in _LOADED_EXCHANGES}
    expiries = _ExpiryCache(_kite_iso_date)
    underlyings: Dict[str, Tuple[str, str]] = {}
    line = 1
    for row in reader:
        line += 1
        if len(row) != width:
            stats.bad(line, f"{len(row)} columns, expected {width}")
            continue
        exchange = row[c_exch]
        if exchange not in loaded:
            stats.skip(exchange)
            continue
        token = row[c_tok]
        tsym = row[c_sym]
        itype = row[c_type]
        try:
            if not token.isdigit() or not tsym:
                raise ValueError(f"bad instrument_token {token!r} or tradingsymbol {tsym!r}")
            lot = int(row[c_lot])
            tick = float(row[c_tick])
            if itype == "CE" or itype == "PE" or itype == "FUT":
                name = row[c_name]
                underlying = underlyings.get(name)
                if underlying is None:
                    underlying = underlyings[name] = _kite_underlying(name)
                if itype == "FUT":
                    yield ("F", exchange, underlying[0], name, lot, tick, token, tsym, expiries[row[c_exp]], underlying[1])
                else:
                    strike = float(row[c_strike])
                    if not strike > 0:
                        raise ValueError(f"strike {row[c_strike]!r}")
                    yield ("O", exchange, underlying[0], name, lot, tick, token, tsym, expiries[row[c_exp]],
                           underlying[1], strike, itype)
            elif row[c_seg] == "INDICES":
                yield ("I", exchange, _canonical_index_symbol(tsym), row[c_name] or tsym, lot, tick, token, tsym)
            elif itype == "EQ":
                yield ("E", exchange, tsym.upper(), row[c_name] or tsym, lot, tick, token, tsym)
            else:
                raise ValueError(f"unknown instrument_type {itype!r}")
        except ValueError as exc:
            stats.bad(line, f"{tsym or token}: {exc}")


def _kite_underlying(name: str) -> Tuple[str, str]:
    """Kite's derivative ``name`` -> (canonical underlying symbol, "I" index or "E" equity)."""
    symbol = name.strip().upper()
    if not symbol:
        raise ValueError("derivative row without an underlying name")
    return symbol, ("I" if symbol in _INDEX_UNDERLYINGS else "E")


_ZERODHA: BrokerSpec = {
    "id": "zerodha",
    "name": "Zerodha Kite Connect",
    "root_url": "https://api.kite.trade",
    "login_url": "https://kite.zerodha.com/connect/login",
    "ws_url": "wss://ws.kite.trade",
    "order_ws_url": "",  # order updates arrive as text frames on the market feed
    "instruments_url": "https://api.kite.trade/instruments",
    "instruments_headers": {"X-Kite-Version": "3"},
    # Kite regenerates the dump early each morning and advises fetching it after ~08:30 IST.
    "instruments_published": (8, 30),
    "auth_modes": (AuthMode.MANUAL,),
    "default_auth_mode": AuthMode.MANUAL,
    "hooks": {"parse_master": _zerodha_parse_master},
}


# ============================================================================
# 6b. Broker spec: AngelOne
# ============================================================================

_ANGEL_MASTER_KEYS = ("token", "symbol", "name", "expiry", "strike", "lotsize", "instrumenttype", "exch_seg", "tick_size")
_MONTHS = {m: i for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}


def _angelone_iso_date(raw: str) -> str:
    """``28JUL2026`` -> ``2026-07-28``."""
    if len(raw) != 9 or raw[2:5] not in _MONTHS:
        raise ValueError(f"expiry {raw!r} is not DDMMMYYYY")
    return _dt.date(int(raw[5:]), _MONTHS[raw[2:5]], int(raw[:2])).isoformat()


def _iter_json_array(f: IO[bytes], chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array without holding the whole document.

    Each chunk's complete objects are decoded by one ``json.loads`` (C speed); a chunk whose
    cut falls inside a string falls back to decoding object by object.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    raw_decode = json.JSONDecoder().raw_decode
    buf = ""
    started = False
    while True:
        chunk = f.read(chunk_size)
        buf += decoder.decode(chunk, final=not chunk)
        if not started:
            stripped = buf.lstrip()
            if not stripped:
                if not chunk:
                    raise _MasterFormatError("the file is empty")
                continue
            if stripped[0] != "[":
                raise _MasterFormatError(f"not a JSON array (starts {stripped[:60]!r})")
            buf = stripped[1:]
            started = True
        cut = buf.rfind("}")
        if cut >= 0:
            part = buf[: cut + 1].lstrip(" \t\r\n,")
            try:
                items = json.loads("[" + part + "]")
                rest = buf[cut + 1:]
            except ValueError:
                items, pos = [], 0
                while True:
                    while pos < len(part) and part[pos] in " \t\r\n,":
                        pos += 1
                    if pos >= len(part):
                        break
                    try:
                        obj, pos = raw_decode(part, pos)
                    except ValueError:
                        break
                    items.append(obj)
                rest = part[pos:] + buf[cut + 1:]
            yield from items
            buf = rest
        if not chunk:
            tail = buf.strip(" \t\r\n,")
            if tail != "]":
                raise _MasterFormatError(f"the JSON array is truncated or malformed near {tail[:60]!r}")
            return


def _angelone_parse_master(f: IO[bytes], stats: _LoadStats) -> Iterator[_MasterRow]:
    """Parse AngelOne's OpenAPIScripMaster.json (section 6 of the AngelOne notes).

    AngelOne gives strike and tick size in paise (x100) as strings; index rows carry the
    canonical name in ``name`` and a display name in ``symbol``.
    """
    expiries = _ExpiryCache(_angelone_iso_date)
    derivative = {"FUTIDX": ("F", "I"), "FUTSTK": ("F", "E"), "OPTIDX": ("O", "I"), "OPTSTK": ("O", "E")}
    cash = {"NSE", "BSE"}
    deriv_exchanges = {"NFO", "BFO"}
    line = 0
    for obj in _iter_json_array(f):
        line += 1
        if line == 1 and isinstance(obj, dict):
            missing = [k for k in _ANGEL_MASTER_KEYS if k not in obj]
            if missing:
                raise _MasterFormatError(f"not an AngelOne scrip master: key(s) {', '.join(missing)} missing")
        try:
            exchange = obj["exch_seg"]
            itype = obj["instrumenttype"].strip()
            if exchange in cash:
                if itype == "AMXIDX":
                    kind = "I"
                elif itype == "":
                    kind = "E"
                else:
                    stats.skip(f"{exchange}:{itype}")
                    continue
            elif exchange in deriv_exchanges:
                shape = derivative.get(itype)
                if shape is None:
                    stats.skip(f"{exchange}:{itype}")
                    continue
            else:
                stats.skip(exchange)
                continue
            token, bsym, name = obj["token"], obj["symbol"], obj["name"]
            if not token or not bsym:
                raise ValueError(f"bad token {token!r} or symbol {bsym!r}")
            lot = int(obj["lotsize"])
            tick = float(obj["tick_size"]) / 100
            if exchange in cash:
                if kind == "I":
                    yield ("I", exchange, _canonical_index_symbol(name or bsym), name or bsym, lot, tick, token, bsym)
                else:
                    symbol = bsym[:-3] if exchange == "NSE" and bsym.endswith("-EQ") else bsym
                    yield ("E", exchange, symbol.upper(), name or symbol, lot, tick, token, bsym)
                continue
            underlying = name.strip().upper()
            if not underlying:
                raise ValueError("derivative row without an underlying name")
            expiry = expiries[obj["expiry"]]
            if shape[0] == "F":
                yield ("F", exchange, underlying, name, lot, tick, token, bsym, expiry, shape[1])
            else:
                strike = float(obj["strike"]) / 100
                otype = bsym[-2:]
                if not strike > 0 or otype not in ("CE", "PE"):
                    raise ValueError(f"strike {obj['strike']!r} / option type {otype!r}")
                yield ("O", exchange, underlying, name, lot, tick, token, bsym, expiry, shape[1], strike, otype)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            stats.bad(line, f"{exc.__class__.__name__}: {exc}")


_ANGELONE: BrokerSpec = {
    "id": "angelone",
    "name": "AngelOne SmartAPI",
    "root_url": "https://apiconnect.angelone.in",
    "login_url": "https://smartapi.angelone.in/publisher-login",
    "ws_url": "wss://smartapisocket.angelone.in/smart-stream",
    "order_ws_url": "wss://tns.angelone.in/smart-order-update",
    "instruments_url": "https://margincalculator.angelbroking.com/OpenAPI_File/files/OpenAPIScripMaster.json",
    "instruments_headers": {},
    "instruments_published": (8, 0),
    "auth_modes": (AuthMode.AUTO, AuthMode.MANUAL),
    "default_auth_mode": AuthMode.AUTO,
    "hooks": {"parse_master": _angelone_parse_master},
}


_BROKERS: Mapping[str, BrokerSpec] = {spec["id"]: spec for spec in (_ZERODHA, _ANGELONE)}


def _spec_for(broker: Any) -> BrokerSpec:
    spec = _BROKERS.get(broker) if isinstance(broker, str) else None
    if spec is None:
        raise UnsupportedFeatureError(f"unknown broker {broker!r}; known brokers: {', '.join(sorted(_BROKERS))}")
    return spec


# ============================================================================
# 7. Transport
# ============================================================================


class _Transport:
    """The one HTTP path: a pooled ``requests.Session`` (imported on first use), timeouts."""

    def __init__(self, timeout: float, max_retries: int, sleep: Callable[[float], None]) -> None:
        self.timeout = timeout
        self.max_retries = max_retries
        self.sleep = sleep
        self._session: Optional["requests.Session"] = None
        self._lock = threading.Lock()

    def session(self) -> "requests.Session":
        with self._lock:
            if self._session is None:
                import requests

                self._session = requests.Session()
            return self._session

    def download(self, url: str, dest: str, headers: Mapping[str, str]) -> int:
        """Stream ``url`` into ``dest``; retry connection failures; return the byte count."""
        import requests

        attempt = 0
        while True:
            try:
                return self._download_once(url, dest, headers)
            except requests.RequestException as exc:
                if attempt >= self.max_retries:
                    cut = " (the body was cut short: truncated)" if isinstance(exc, requests.exceptions.ChunkedEncodingError) else ""
                    raise NetworkError(f"download of {url} failed{cut}: {exc.__class__.__name__}: {_short(str(exc))}") from exc
                delay = min(8.0, 0.5 * 2 ** attempt)
                log.warning("download of %s failed (%s); retrying in %.1f s", url, exc.__class__.__name__, delay)
                self.sleep(delay)
                attempt += 1

    def _download_once(self, url: str, dest: str, headers: Mapping[str, str]) -> int:
        with self.session().get(url, headers=dict(headers), stream=True, timeout=self.timeout) as resp:
            if resp.status_code != 200:
                snippet = _short(resp.text)
                raise BrokerError(
                    f"GET {url} answered HTTP {resp.status_code}: {snippet}",
                    http_status=resp.status_code, retryable=resp.status_code >= 500,
                )
            size = 0
            with open(dest, "wb") as out:
                for chunk in resp.iter_content(chunk_size=1 << 18):
                    out.write(chunk)
                    size += len(chunk)
            expected = resp.headers.get("Content-Length")
            if expected and expected.isdigit() and not resp.headers.get("Content-Encoding") and int(expected) != size:
                raise _MasterFormatError(f"download truncated: got {size} of {expected} bytes")
            return size

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ============================================================================
# 8. Auth & session stores
# ============================================================================

# (The next issue fills this section: manual/auto auth, session stores, expiry rules.)


# ============================================================================
# 9. Client
# ============================================================================

_URL_KEYS = ("root_url", "login_url", "ws_url", "order_ws_url", "instruments_url")


def _latest_publication(now: float, published: Tuple[int, int]) -> _dt.datetime:
    """Return the IST time of the newest daily dump that exists at epoch ``now``."""
    local = _dt.datetime.fromtimestamp(now, IST)
    pub = local.replace(hour=published[0], minute=published[1], second=0, microsecond=0)
    return pub if local >= pub else pub - _dt.timedelta(days=1)


class TTConnect:
    """A blocking client for one broker account.

    Args:
        broker: ``"zerodha"`` or ``"angelone"``.
        config: credentials and options (keyword arguments are merged in): ``cache_dir``,
            ``on_stale`` (``"fail"`` or ``"warn"``), ``timeout``, ``max_retries``, and the
            endpoint roots ``root_url``, ``login_url``, ``ws_url``, ``order_ws_url``,
            ``instruments_url``.
        clock: seconds since the epoch (``time.time``); injected by tests.
        sleep: how to wait (``time.sleep``); injected by tests.

    Raises:
        UnsupportedFeatureError: unknown broker.
        ConfigurationError: a config value is malformed.
        TTConnectError: the instrument master is needed and could not be loaded.
    """

    def __init__(
        self,
        broker: str,
        config: Optional[Mapping[str, Any]] = None,
        *,
        clock: Optional[Callable[[], float]] = None,
        sleep: Optional[Callable[[float], None]] = None,
        **options: Any,
    ) -> None:
        self._spec = _spec_for(broker)
        self.broker = self._spec["id"]
        if config is not None and not isinstance(config, Mapping):
            raise ConfigurationError(f"config must be a dict, got {type(config).__name__}")
        cfg: Dict[str, Any] = {**(config or {}), **options}
        self._clock = clock or time.time
        self._sleep = sleep or time.sleep
        self._config = cfg
        self._urls = {key: self._url_option(cfg, key) for key in _URL_KEYS}
        self._on_stale = cfg.get("on_stale", "fail")
        if self._on_stale not in ("fail", "warn"):
            raise ConfigurationError(f"config 'on_stale' must be 'fail' or 'warn', got {self._on_stale!r}")
        timeout = cfg.get("timeout", 7.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigurationError(f"config 'timeout' must be a positive number of seconds, got {timeout!r}")
        retries = cfg.get("max_retries", 2)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"config 'max_retries' must be a whole number >= 0, got {retries!r}")
        self._cache_dir = self._cache_dir_option(cfg)
        self._transport = _Transport(float(timeout), retries, self._sleep)
        self._tokens: Dict[int, Tuple[str, str]] = {}
        self._store = _InstrumentStore(os.path.join(self._cache_dir, "instruments.db"))
        self._ensure_instruments()
        _register_store(self._store)

    # -- config --------------------------------------------------------------------------

    def _url_option(self, cfg: Mapping[str, Any], key: str) -> str:
        value = cfg.get(key, self._spec[key])  # type: ignore[literal-required]
        if not isinstance(value, str) or (value and not value.split("://", 1)[0] in ("http", "https", "ws", "wss")):
            raise ConfigurationError(f"config {key!r} must be an http(s):// or ws(s):// URL, got {value!r}")
        return value

    @staticmethod
    def _cache_dir_option(cfg: Mapping[str, Any]) -> str:
        value = cfg.get("cache_dir") or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigurationError(f"config 'cache_dir' must be a path, got {value!r}")
        return os.fspath(value)

    def __repr__(self) -> str:
        return f"TTConnect(broker={self.broker!r}, cache_dir={self._cache_dir!r})"

    # -- instrument master lifecycle -----------------------------------------------------

    def _store_state(self, repair: bool) -> Optional[Dict[str, Tuple[str, int]]]:
        """Return the store's per-broker metadata, None if there is no usable file."""
        if not os.path.exists(self._store.path):
            return None
        try:
            return self._store.check()
        except _CorruptStore as exc:
            if not repair:
                return None
            aside = f"{self._store.path}.corrupt"
            log.warning("instrument store %s is damaged (%s); moved to %s and rebuilding", self._store.path, exc, aside)
            self._store.close()
            self._store.closed = False
            os.replace(self._store.path, aside)
            self._store.reopen()
            return None

    def _is_fresh(self, state: Optional[Dict[str, Tuple[str, int]]]) -> bool:
        if not state or self.broker not in state:
            return False
        refreshed = _dt.datetime.fromisoformat(state[self.broker][0])
        return refreshed >= _latest_publication(self._clock(), self._spec["instruments_published"])

    def _ensure_instruments(self) -> None:
        if self._is_fresh(self._store_state(repair=False)):
            return
        os.makedirs(self._cache_dir, exist_ok=True)
        with _FileLock(self._store.path + ".lock"):
            # Another process may have replaced the file while this one waited: look again
            # through a new connection (an open one still reads the old file).
            self._store.reopen()
            state = self._store_state(repair=True)
            if self._is_fresh(state):
                return
            try:
                self.refresh_instruments(_state=state)
            except (TTConnectError, _MasterFormatError, OSError) as exc:
                self._refresh_failed(exc, state)

    def _refresh_failed(self, exc: BaseException, state: Optional[Dict[str, Tuple[str, int]]]) -> None:
        url = self._urls["instruments_url"]
        cached = state.get(self.broker) if state else None
        what = f"the {self.broker} instrument master ({url}) could not be loaded: {exc}"
        if cached is None:
            raise self._refresh_error(
                exc, f"{what}. No instrument DB for {self.broker} is cached in {self._cache_dir!r} yet, so the client "
                f"cannot start: check the network or config 'instruments_url', then retry"
            ) from exc
        if self._on_stale == "warn":
            log.warning("%s; serving the cached DB refreshed at %s (on_stale='warn')", what, cached[0])
            return
        raise self._refresh_error(
            exc, f"{what}. The cached DB (refreshed at {cached[0]}) was kept untouched; pass "
            f"on_stale='warn' to start with it, or retry later"
        ) from exc

    @staticmethod
    def _refresh_error(exc: BaseException, message: str) -> TTConnectError:
        if isinstance(exc, TTConnectError):
            return type(exc)(message, retryable=exc.retryable, broker_code=exc.broker_code, http_status=exc.http_status)
        return BrokerError(message)

    def refresh_instruments(self, *, _state: Optional[Dict[str, Tuple[str, int]]] = None) -> Dict[str, Any]:
        """Download this broker's master now and rebuild the store from it (atomically).

        Returns what was loaded: ``rows``, ``skipped`` (per segment), ``malformed``, ``duplicates``.
        """
        state = _state if _state is not None else self._store_state(repair=True)
        previous = state.get(self.broker, ("", 0))[1] if state else 0
        url = self._urls["instruments_url"]
        os.makedirs(self._cache_dir, exist_ok=True)
        part = os.path.join(self._cache_dir, f"{self.broker}_master.{os.getpid()}.download")
        stats = _LoadStats()
        started = time.perf_counter()
        try:
            self._transport.download(url, part, self._spec["instruments_headers"])
            refreshed_at = _dt.datetime.fromtimestamp(self._clock(), IST).isoformat()
            with open(part, "rb") as f:
                rows = self._spec["hooks"]["parse_master"](f, stats)
                _build_store(self._store.path, self.broker, rows, stats, url, refreshed_at, previous)
        finally:
            _remove_quietly(part)
        self._store.reopen()
        self._tokens.clear()
        log.info(
            "%s instruments refreshed: %d rows, %d skipped by segment %s, %d malformed, %d duplicates, %.2f s",
            self.broker, stats.rows, sum(stats.skipped.values()), stats.skipped, stats.malformed,
            stats.duplicates, time.perf_counter() - started,
        )
        return {"rows": stats.rows, "skipped": dict(stats.skipped), "malformed": stats.malformed, "duplicates": stats.duplicates}

    # -- instruments ---------------------------------------------------------------------

    def _lookup(self, instrument: Instrument) -> Tuple[str, str]:
        found = self._tokens.get(instrument._iid)
        if found is not None:
            return found
        if not isinstance(instrument, _Instrument):
            raise TypeError(f"expected an Index, Equity, Future or Option, got {instrument!r}")
        store = self._store
        found = store.token(self.broker, instrument)
        if found is None:
            store.check_exists(instrument)
            raise InstrumentNotFoundError(f"{instrument} exists but {self.broker} does not list it")
        self._tokens[instrument._iid] = found
        return found

    def resolve(self, instrument: Instrument) -> str:
        """Return the broker's token for ``instrument`` (Kite: instrument_token; AngelOne: token)."""
        found = self._tokens.get(instrument._iid)
        return found[0] if found is not None else self._lookup(instrument)[0]

    def expiries(self, symbol: str, exchange: Union[Exchange, str] = Exchange.NFO) -> List[_dt.date]:
        """List the expiries (futures and options) of an underlying, soonest first."""
        exch = _check_exchange(exchange, _DERIVATIVE_EXCHANGES, "derivatives")
        sym = _canonical_index_symbol(symbol)
        found = set(self._store.expiries(exch, sym, "futures", self.broker))
        found.update(self._store.expiries(exch, sym, "options", self.broker))
        return [_dt.date.fromisoformat(e) for e in sorted(found)]

    def option_chain(self, symbol: str, expiry: Union[_dt.date, str], exchange: Union[Exchange, str] = Exchange.NFO) -> List[Option]:
        """List the options of an underlying for one expiry, by strike then CE/PE."""
        exch = _check_exchange(exchange, _DERIVATIVE_EXCHANGES, "options")
        iso = _check_expiry(expiry).isoformat()
        sym = _canonical_index_symbol(symbol)
        chain = self._store.chain(exch, sym, iso, self.broker)
        if not chain:
            on_file = [e.isoformat() for e in self.expiries(sym, exch)]
            listed = ", ".join(on_file[:6]) if on_file else "none"
            raise InstrumentNotFoundError(f"{exch.value}:{sym} has no options expiring {iso}; expiries on file: {listed}")
        return chain

    def search(self, prefix: str, exchange: Union[Exchange, str, None] = None, limit: int = 50) -> List[Instrument]:
        """Find indices, equities and futures whose canonical symbol starts with ``prefix``."""
        exch = None if exchange is None else _as_enum(Exchange, exchange, "exchange")
        return self._store.search(prefix, exch, self.broker, limit)

    def lot_size(self, instrument: Instrument) -> int:
        """Return the lot size (units per lot; 1 for cash equities, 0 for indices)."""
        return self._info(instrument)[1]

    def tick_size(self, instrument: Instrument) -> float:
        """Return the price tick in rupees (0 for indices)."""
        return self._info(instrument)[2]

    def _info(self, instrument: Instrument) -> Tuple[str, int, float]:
        info = self._store.info(instrument)
        if info is None:
            self._store.check_exists(instrument)
            raise InstrumentNotFoundError(f"{instrument} not found")  # pragma: no cover - check_exists raised
        return info

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Release connections and files; the client cannot be used afterwards."""
        _unregister_store(self._store)
        self._store.close()
        self._transport.close()

    def __enter__(self) -> "TTConnect":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ============================================================================
# 11. CLI
# ============================================================================


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line: ``python -m ttconnect <command> ...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ttconnect", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ttconnect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_refresh = sub.add_parser("refresh", help="download a broker's instrument master into the cache")
    p_search = sub.add_parser("search", help="find instruments by symbol prefix")
    p_exp = sub.add_parser("expiries", help="list the expiries of an underlying")
    for p in (p_refresh, p_search, p_exp):
        p.add_argument("broker", choices=sorted(_BROKERS))
        p.add_argument("--cache-dir", default=None)
        p.add_argument("--instruments-url", default=None)
    p_search.add_argument("prefix")
    p_exp.add_argument("symbol")
    p_exp.add_argument("--exchange", default="NFO")
    args = parser.parse_args(argv)
    cfg = {k: v for k, v in {"cache_dir": args.cache_dir, "instruments_url": args.instruments_url}.items() if v}
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with TTConnect(args.broker, cfg) as client:
            if args.command == "refresh":
                print(json.dumps(client.refresh_instruments(), indent=2))
            elif args.command == "search":
                for inst in client.search(args.prefix):
                    print(f"{inst}\t{client.resolve(inst)}")
            else:
                for expiry in client.expiries(args.symbol, args.exchange):
                    print(expiry.isoformat())
    except TTConnectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
