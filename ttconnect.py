"""ttconnect: one typed, broker-agnostic interface to Indian brokers.

Every broker (``TTConnect.brokers()`` lists them; each is one section of this file) sits behind
one blocking client, ``TTConnect``. A strategy never contains broker-specific code: the broker
is one string in a config. The whole library is this file; it needs ``requests`` (imported on
the first network call), ``pyotp`` (automatic login with one-time codes) and ``websocket-client`` (streaming).

    import ttconnect as tt
    broker = tt.TTConnect("paper")  # the offline broker: no account, no network
    sbin = tt.Equity(exchange="NSE", symbol="SBIN")
    order_id = broker.place_order(sbin, 10, "BUY", "CNC", "MARKET")
    broker.get_positions()
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "AsyncTTConnect",
    "AuthMode",
    "AuthenticationError",
    "BrokerError",
    "Capabilities",
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
    "InvalidInstrumentError",
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
    "parse_instrument",
]

import codecs
import collections
import contextlib
import dataclasses
import datetime as _dt
import enum
import functools
import itertools
import operator
import os
import random
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
    TypedDict,
    TypeVar,
    Union,
    overload,
)

if TYPE_CHECKING:  # pragma: no cover - imported for type checkers only
    import sqlite3
    from typing import Literal
    from decimal import Decimal

    import requests

# CPython's built-in md5, without loading OpenSSL (hashlib pulls in _hashlib: ~3 ms of import).
# It only spreads instrument keys over 64 bits (no security role), and is twice blake2b's speed.
try:
    from _md5 import md5 as _md5  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - non-CPython
    from hashlib import md5 as _md5

class _Log:
    """The ``ttconnect`` logger, fetched on first use: importing ``logging`` is ~5 ms of
    ``import ttconnect``, and a quiet client may never log. Handlers are never added here."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        import logging

        return getattr(logging.getLogger("ttconnect"), name)


log: Any = _Log()


class _Model:
    """The ``__repr__``, ``__eq__`` and ``__hash__`` every model shares.

    They follow the dataclass rules (fields with ``repr``/``compare`` set), but are written
    once here instead of generated per class: generating them for every model cost ~10 ms of
    ``import ttconnect``.
    """

    __slots__ = ()

    @classmethod
    def _shown(cls) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        names = cls.__dict__.get("_field_names")
        if names is None:
            fields_ = dataclasses.fields(cls)  # type: ignore[arg-type]
            names = (tuple(f.name for f in fields_ if f.repr), tuple(f.name for f in fields_ if f.compare))
            type.__setattr__(cls, "_field_names", names)
        return names

    def _key_values(self) -> tuple:
        return tuple(getattr(self, name) for name in self._shown()[1])

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown()[0])
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key_values() == other._key_values()

    def __hash__(self) -> int:
        return hash(self._key_values())


# Compat: ``dataclass(slots=True)`` is Python 3.10+. Drop this shim with Python 3.9 support.
# Type checkers are told what it is (PEP 681), so models keep their typed constructors.
if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import dataclass_transform

    _T = TypeVar("_T")

    @dataclass_transform(frozen_default=True, field_specifiers=(field,))
    def _model(cls: "type[_T]") -> "type[_T]": ...
elif sys.version_info >= (3, 10):
    _model = dataclass(frozen=True, slots=True, repr=False, eq=False)
else:  # pragma: no cover - exercised on 3.9 only
    _model = dataclass(frozen=True, repr=False, eq=False)


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
    "SNSX50": "SENSEX50",  # BSE's own code for the index, as brokers' masters list it
    "BSE SENSEX 50": "SENSEX50",
    "S&P BSE SENSEX 50": "SENSEX50",
    "BSE SENSEX": "SENSEX",
    "S&P BSE SENSEX": "SENSEX",
    "BSE BANKEX": "BANKEX",
}
# Derivative underlyings that are indices (a master that does not say so needs this
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
    carries the broker's own error code (its error type or code, as the broker spells it) where
    there is one.
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


class InvalidInstrumentError(TTConnectError, ValueError):
    """An instrument (or a discovery argument) is malformed; also a ``ValueError``."""


class _InstrumentTypeError(InvalidInstrumentError, TypeError):
    """An instrument field of the wrong type; also a ``TypeError``."""


class UnsupportedFeatureError(TTConnectError):
    """The broker (or this version of ttconnect) does not support what was asked."""


class ConfigurationError(TTConnectError):
    """A config value is missing or malformed."""


class OrderError(TTConnectError):
    """The broker refused or failed an order operation.

    ``placed_ids`` lists the orders that were placed nonetheless, when part of a request went
    through (some slices of a sliced order).
    """

    def __init__(self, message: str = "", *, placed_ids: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.placed_ids = list(placed_ids)


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


class _FrameError(Exception):
    """A streamed frame is malformed or truncated (it is skipped and counted)."""


# ============================================================================
# 3. Models
# ============================================================================


def _raw_field() -> Any:
    return field(default_factory=dict, repr=False, compare=False)


@_model
class Profile(_Model):
    """The account holder and what the account may trade."""

    user_id: str
    name: str
    email: Optional[str]
    broker: str
    exchanges: Tuple[Exchange, ...] = ()
    products: Tuple[ProductType, ...] = ()
    raw: Mapping[str, Any] = _raw_field()


@_model
class Fund(_Model):
    """Equity-segment funds in rupees: available to trade, used, and their parts."""

    available: float
    used: float
    total: float
    collateral: Optional[float] = None
    m2m_unrealized: Optional[float] = None
    m2m_realized: Optional[float] = None
    utilised_debits: Optional[float] = None
    raw: Mapping[str, Any] = _raw_field()


@_model
class Holding(_Model):
    """A delivery holding (settled plus T1 quantity)."""

    instrument: "Instrument"
    qty: int
    avg_price: float
    ltp: Optional[float] = None
    pnl: Optional[float] = None
    pnl_percent: Optional[float] = None
    raw: Mapping[str, Any] = _raw_field()


@_model
class Position(_Model):
    """A net position; ``qty`` is signed (negative = short).

    A delivery (CNC) position in a cash segment can never be short: the negative quantity a
    broker shows after you sell shares you hold is that sale, reported here as ``qty`` 0 and
    ``sold_from_holdings`` N (its P&L kept), and never offset by ``close_all_positions``.
    """

    instrument: "Instrument"
    qty: int
    avg_price: float
    ltp: Optional[float] = None
    pnl: Optional[float] = None
    product: Optional[ProductType] = None
    sold_from_holdings: int = 0
    raw: Mapping[str, Any] = _raw_field()


@_model
class Order(_Model):
    """One order's current state (or one state of its history)."""

    id: str
    instrument: "Instrument"
    side: Side
    qty: int
    filled_qty: int
    pending_qty: int
    order_type: OrderType
    product: Optional[ProductType]  # None for products outside the canonical set (MTF, CO...)
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
class Trade(_Model):
    """One fill of an order."""

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
class Margin(_Model):
    """Margin a basket needs, before and after the spread/hedge benefit."""

    total: float  # before any spread/hedge benefit
    span: Optional[float] = None
    exposure: Optional[float] = None
    option_premium: Optional[float] = None
    final_total: float = 0.0  # after the benefit: what the basket blocks
    benefit: float = 0.0  # total - final_total
    raw: Mapping[str, Any] = _raw_field()


@_model
class OrderLeg(_Model):
    """One leg of a basket for ``calculate_margin``."""

    instrument: "Instrument"
    qty: int
    side: Side
    product: ProductType
    order_type: OrderType
    price: Optional[float] = None
    trigger_price: Optional[float] = None


@_model
class DepthLevel(_Model):
    """One level of market depth."""

    price: float
    qty: int
    orders: Optional[int]  # None where the feed gives no order count


@_model
class Tick(_Model):
    """One market-data update, decoded from the broker's binary feed.

    The numeric fields are set when the tick is decoded; ``last_trade_time``,
    ``exchange_time``, ``bids`` and ``asks`` are built on first access from the packet's raw
    values (the feed's hot path stays cheap: most handlers never look at them).
    """

    instrument: "Instrument"
    mode: str  # "ltp" | "quote" | "full": the packet this came in
    ltp: float
    last_qty: Optional[int] = None
    avg_price: Optional[float] = None
    volume: Optional[int] = None
    buy_qty: Optional[int] = None
    sell_qty: Optional[int] = None
    open: Optional[float] = None
    high: Optional[float] = None
    low: Optional[float] = None
    close: Optional[float] = None  # the previous session's close
    change: Optional[float] = None  # percent vs close
    oi: Optional[int] = None
    oi_day_high: Optional[int] = None
    oi_day_low: Optional[int] = None
    # Epoch seconds (0: not given), and the depth as the feed sent it: (bids, asks, divisor),
    # each side a flat sequence of (qty, price, orders) per level, prices times the divisor.
    _last_trade_epoch: float = field(default=0, repr=False)
    _exchange_epoch: float = field(default=0, repr=False)
    _depth: Optional[Tuple[Sequence[Any], Sequence[Any], float]] = field(default=None, repr=False)

    @property
    def last_trade_time(self) -> Optional[_dt.datetime]:
        return _epoch_time(self._last_trade_epoch)

    @property
    def exchange_time(self) -> Optional[_dt.datetime]:
        return _epoch_time(self._exchange_epoch)

    @property
    def bids(self) -> Tuple["DepthLevel", ...]:
        """Buy side, best first (empty outside ``full``)."""
        return _depth_levels(self._depth[0], self._depth[2]) if self._depth else ()

    @property
    def asks(self) -> Tuple["DepthLevel", ...]:
        """Sell side, best first (empty outside ``full``)."""
        return _depth_levels(self._depth[1], self._depth[2]) if self._depth else ()


def _epoch_time(epoch: float) -> Optional[_dt.datetime]:
    try:
        return _dt.datetime.fromtimestamp(epoch, IST) if epoch else None
    except (OverflowError, OSError, ValueError):  # a garbage timestamp is no time at all
        return None


def _depth_levels(flat: Sequence[Any], div: float) -> Tuple["DepthLevel", ...]:
    """(qty, price, orders) triples -> DepthLevels; empty levels (no qty, no price) dropped."""
    return tuple(DepthLevel(price=flat[i + 1] / div, qty=flat[i], orders=flat[i + 2])
                 for i in range(0, len(flat) - 2, 3) if flat[i] or flat[i + 1])


# The feed builds Ticks through a mutable twin with the same slots, then relabels each one as a
# Tick (``__class__`` assignment is allowed between identical layouts): a frozen dataclass pays
# an ``object.__setattr__`` call per field in ``__init__``, ~1.2 us of a ~2.5 us decode.
_TICK_FIELDS = [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(Tick)]
if sys.version_info >= (3, 10):
    _TickBuilder: Any = dataclasses.make_dataclass("_TickBuilder", _TICK_FIELDS, bases=(_Model,), repr=False, eq=False,
                                                   slots=True)
else:  # pragma: no cover - exercised on 3.9 only
    _TickBuilder = dataclasses.make_dataclass("_TickBuilder", _TICK_FIELDS, bases=(_Model,), repr=False, eq=False)


@_model
class SessionData(_Model):
    """A broker session: its tokens (never shown in reprs) and its lifetime."""

    broker: str
    mode: AuthMode
    access_token: str = field(repr=False)
    refresh_token: Optional[str] = field(default=None, repr=False)
    feed_token: Optional[str] = field(default=None, repr=False)
    obtained_at: Optional[_dt.datetime] = None
    expires_at: Optional[_dt.datetime] = None
    # Whose it is: a stored session is used only for the same account, app and login.
    user_id: Optional[str] = None
    app_key: Optional[str] = field(default=None, repr=False)  # the app (API key) it was made for
    source: Optional[str] = field(default=None, repr=False)  # digest of the single-use code that made it


# ============================================================================
# 4. Instruments (validation, identity)
# ============================================================================


def _instrument_id(key: str, _md5: Any = _md5, _from_bytes: Any = int.from_bytes) -> int:
    """Return the broker-independent row id of a canonical instrument key.

    The id is 63 bits of the key's digest, so every broker's loader files the same canonical
    instrument under the same id without a lookup table, and two brokers' rows merge by key.
    (A collision needs ~4e9 instruments to become likely; a master has ~1e5.)
    """
    return _from_bytes(_md5(key.encode()).digest()[:8], "big") >> 1


_ENUM_TEXT: Dict[Tuple[type, str], Any] = {}  # (enum, text as given) -> member: the order path's strings


def _as_enum(enum_cls: Any, value: Any, what: str, error: Type[TTConnectError] = InvalidInstrumentError) -> Any:
    """``value`` (a member, or its text in any case) as a member of ``enum_cls``; else ``error``."""
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        found = _ENUM_TEXT.get((enum_cls, value))
        if found is not None:
            return found
        try:
            found = enum_cls(value.upper())
        except ValueError:
            pass
        else:
            if len(_ENUM_TEXT) < 1000:
                _ENUM_TEXT[(enum_cls, value)] = found
            return found
    valid = ", ".join(m.value for m in enum_cls)
    raise error(f"{what} {value!r} is not valid; expected one of {valid}")


def _utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a lone surrogate cannot: it comes from bytes that
    were no UTF-8, a command-line argument say, and fails later in the DB or a hash)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_text(symbol: str) -> None:
    if not _utf8(symbol):
        raise InvalidInstrumentError(f"symbol {symbol!r} holds characters that are no text (bytes that were not "
                                     "UTF-8?)")


def _check_symbol(symbol: Any) -> str:
    if not isinstance(symbol, str) or not symbol.strip():
        raise _InstrumentTypeError(f"symbol must be a non-empty string, got {symbol!r}")
    _check_text(symbol)
    if symbol != symbol.upper() or symbol != symbol.strip():
        raise InvalidInstrumentError(f"symbol {symbol!r} must be upper case without surrounding spaces, "
                                     f"e.g. {symbol.strip().upper()!r}")
    return symbol


def _check_expiry(expiry: Any) -> _dt.date:
    if isinstance(expiry, _dt.datetime):  # pandas.Timestamp is one too: its date (in IST when aware)
        try:
            return (expiry.astimezone(IST) if expiry.tzinfo is not None else expiry).date()
        except OverflowError:  # an aware time at the calendar's very edge, year 1 or 9999
            raise InvalidInstrumentError(f"expiry {expiry!r} is beyond the dates an expiry can have") from None
    if isinstance(expiry, _dt.date):
        return expiry
    if isinstance(expiry, str):
        text = expiry.strip()
        if len(text) == 10 and text[4] == "-" and text[7] == "-" and text.replace("-", "").isdigit():
            try:
                return _dt.date.fromisoformat(text)
            except ValueError as exc:
                raise InvalidInstrumentError(f"expiry {expiry!r} is not a valid date ({exc})") from None
        raise InvalidInstrumentError(f"expiry {expiry!r} is not an ISO date; expected 'YYYY-MM-DD', e.g. '2025-01-30'")
    raise _InstrumentTypeError(f"expiry must be a date or an ISO date string 'YYYY-MM-DD', got {expiry!r}")


def _check_strike(strike: Any) -> float:
    # A Decimal is accepted without importing decimal here: it converts through str like the rest.
    if isinstance(strike, bool) or not (isinstance(strike, (int, float, str)) or type(strike).__name__ == "Decimal"):
        raise _InstrumentTypeError(f"strike must be a number (int, float, str or Decimal), got {strike!r}")
    if isinstance(strike, int) and strike.bit_length() > 64:  # str() and repr() of it may be refused outright
        raise InvalidInstrumentError(f"strike must be a positive number, got an integer of {strike.bit_length():,} bits")
    try:
        value = float(str(strike).strip())
    except ValueError:
        raise InvalidInstrumentError(f"strike {strike!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise InvalidInstrumentError(f"strike must be a positive number, got {strike!r}")
    return value


def _check_exchange(exchange: Any, allowed: frozenset, kind: str) -> Exchange:
    exch = _as_enum(Exchange, exchange, "exchange")
    if exch not in allowed:
        names = ", ".join(sorted(e.value for e in allowed))
        raise InvalidInstrumentError(f"{kind} on {exch.value} is not possible; {kind} trade on {names}")
    return exch


class _Instrument(_Model):
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
            import sqlite3

            try:
                store.check_exists(self)  # type: ignore[arg-type]  # self is one of the four concrete types
            except sqlite3.Error as exc:  # a damaged DB: resolve() repairs it; construction only checks shape
                log.warning("instrument DB unreadable (%s); %s is checked when it is resolved", exc, self)


@_model
class Index(_Instrument):
    """An index (NSE NIFTY, BSE SENSEX...); accepts exchange and broker spellings as aliases."""

    exchange: Exchange
    symbol: str
    _iid: int = field(init=False, repr=False, compare=False, default=0)

    if TYPE_CHECKING:  # what callers may pass: __post_init__ checks and normalises it
        def __init__(self, exchange: Union[Exchange, str], symbol: str) -> None: ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "exchange", _check_exchange(self.exchange, _CASH_EXCHANGES, "indices"))
        if not isinstance(self.symbol, str) or not self.symbol.strip():
            raise _InstrumentTypeError(f"symbol must be a non-empty string, got {self.symbol!r}")
        canonical = _canonical_index_symbol(self.symbol)
        if (canonical != self.symbol and self.symbol.strip().upper() not in _INDEX_ALIASES) or not _utf8(canonical):
            _check_symbol(self.symbol)
        object.__setattr__(self, "symbol", canonical)
        self._after_init()

    def _key(self) -> str:
        return f"{self.exchange.value}|{self.symbol}"

    def _label(self) -> str:
        return _index_label(self.exchange.value, self.symbol)


@functools.lru_cache(maxsize=4096)  # a live feed's index ticks are labelled one by one
def _index_label(exchange: str, symbol: str) -> str:
    """An index's text: bare where it reads back as this index (an index name, or a name with a
    space), else marked as one."""
    bare = f"{exchange}:{symbol}"
    try:
        cls, fields = _instrument_parts(bare)
        if cls is Index and _canonical_index_symbol(fields["symbol"]) == symbol:
            return bare
    except InvalidInstrumentError:
        pass
    return f"{bare} INDEX"


@_model
class Equity(_Instrument):
    """A cash-market security; non-EQ series keep their suffix (``XYZ-BE``)."""

    exchange: Exchange
    symbol: str
    _iid: int = field(init=False, repr=False, compare=False, default=0)

    if TYPE_CHECKING:  # what callers may pass: __post_init__ checks and normalises it
        def __init__(self, exchange: Union[Exchange, str], symbol: str) -> None: ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "exchange", _check_exchange(self.exchange, _CASH_EXCHANGES, "equities"))
        _check_symbol(self.symbol)
        self._after_init()

    def _key(self) -> str:
        return f"{self.exchange.value}|{self.symbol}"

    def _label(self) -> str:
        if " " in self.symbol or self.symbol in _NOT_BARE_EQUITY:  # would read back as an index (or a future)
            return f"{self.exchange.value}:{self.symbol} EQ"
        return f"{self.exchange.value}:{self.symbol}"


@_model
class Future(_Instrument):
    """A futures contract on ``symbol`` (the underlying's canonical symbol) expiring ``expiry``."""

    exchange: Exchange
    symbol: str
    expiry: _dt.date
    _iid: int = field(init=False, repr=False, compare=False, default=0)

    if TYPE_CHECKING:  # what callers may pass: __post_init__ checks and normalises it
        def __init__(self, exchange: Union[Exchange, str], symbol: str, expiry: Union[_dt.date, str]) -> None: ...

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

    if TYPE_CHECKING:  # what callers may pass: __post_init__ checks and normalises it
        def __init__(self, exchange: Union[Exchange, str], symbol: str, expiry: Union[_dt.date, str],
                     strike: Union[float, str, "Decimal"], option_type: Union[OptionType, str]) -> None: ...

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


_INSTRUMENT_FORMS = ("'NSE:SBIN' (an equity)", "'NSE:NIFTY' (an index)", "'NFO:NIFTY FUT 2026-12-29' (a future)",
                     "'NFO:NIFTY 2026-12-29 23500 CE' (an option)",
                     "'BSE:BSE500 INDEX' or 'NSE:NIFTY EQ' (an index or equity whose bare name reads as the other)")
# Bare "EXCHANGE:SYMBOL" is an index when the symbol names one (or has a space): an equity of such
# a name is written with " EQ" after it, and an index of any other name with " INDEX", so that
# every instrument's text reads back as itself.
_KIND_SUFFIXES = ("EQ", "INDEX")
_NOT_BARE_EQUITY = frozenset(_INDEX_UNDERLYINGS | {a for a in _INDEX_ALIASES if " " not in a} | {"FUT"})


def parse_instrument(text: str) -> Instrument:
    """The instrument ``str(instrument)`` printed: ``parse_instrument(str(x)) == x`` for every kind.

    ``"EXCHANGE:SYMBOL"`` is an index when the symbol is an index's canonical name (or has a
    space, as index names do), else an equity; ``" EQ"`` or ``" INDEX"`` after the symbol says
    which where the bare name would read as the other kind (``str()`` adds it only then:
    ``"BSE:BSE500 INDEX"``, ``"NSE:NIFTY EQ"``). A malformed text raises ``ValueError`` (an
    ``InvalidInstrumentError``) naming the accepted forms; a well-formed one that an open
    client's instrument DB lacks raises ``InstrumentNotFoundError``.
    """
    cls, fields = _instrument_parts(text)
    try:
        return cls(**fields)  # type: ignore[no-any-return]
    except InvalidInstrumentError as exc:  # (an InstrumentNotFoundError, well formed but unlisted, passes through)
        raise _not_an_instrument(text, str(exc)) from None


def _not_an_instrument(text: Any, why: str) -> InvalidInstrumentError:
    return InvalidInstrumentError(f"{_short(repr(text), 80)} is not an instrument ({why}); write one of: "
                                  + ", ".join(_INSTRUMENT_FORMS))


def _looks_like_date(text: str) -> bool:
    return len(text) == 10 and text[4] == text[7] == "-" and (text[:4] + text[5:7] + text[8:]).isdigit()


def _instrument_parts(text: Any) -> Tuple[type, Dict[str, Any]]:
    """(class, constructor arguments) of an instrument's text, written as ``str()`` prints it;
    only the layout is checked here."""
    if not isinstance(text, str):
        raise _not_an_instrument(text, "not a string")
    if len(text) > 100:
        raise _not_an_instrument(text, f"{len(text)} characters; an instrument's text is far shorter")
    if not (text.isascii() and text.isprintable()):
        raise _not_an_instrument(text, "it holds a control or non-ASCII character")
    exchange, sep, rest = text.strip().partition(":")
    if not sep or not exchange or not rest or rest != rest.strip():
        raise _not_an_instrument(text, "expected EXCHANGE:SYMBOL...")
    if exchange != exchange.upper():
        raise _not_an_instrument(text, f"the exchange is written in capitals, {exchange.upper()}")
    parts = rest.split(" ")
    if len(parts) >= 2 and parts[-1] in _KIND_SUFFIXES:  # an equity or index named like the other kind
        return Equity if parts[-1] == "EQ" else Index, {"exchange": exchange, "symbol": " ".join(parts[:-1])}
    if len(parts) >= 4 and _looks_like_date(parts[-3]):  # an option's layout: the type and strike as printed
        if parts[-1] not in ("CE", "PE"):
            raise _not_an_instrument(text, f"option type {parts[-1]!r}: write CE or PE")
        strike = parts[-2]
        if not (strike.replace(".", "", 1).isdigit() and _fmt_num(float(strike)) == strike):
            raise _not_an_instrument(text, f"strike {strike!r}: write it as printed, e.g. 23500 or 52.5")
        return Option, {"exchange": exchange, "symbol": " ".join(parts[:-3]), "expiry": parts[-3], "strike": strike,
                        "option_type": parts[-1]}
    if parts[-1] == "FUT":
        raise _not_an_instrument(text, "a future needs its expiry after FUT, as YYYY-MM-DD")
    if len(parts) >= 3 and parts[-2] == "FUT":
        return Future, {"exchange": exchange, "symbol": " ".join(parts[:-2]), "expiry": parts[-1]}
    if " " in rest or _canonical_index_symbol(rest) in _INDEX_UNDERLYINGS or rest.upper() in _INDEX_ALIASES:
        return Index, {"exchange": exchange, "symbol": rest}
    return Equity, {"exchange": exchange, "symbol": rest}


def _option_key(exchange: str, symbol: str, expiry: str, strike: float, option_type: str) -> str:
    return f"{exchange}|{symbol}|{expiry}|{strike!r}|{option_type}"


def _fmt_num(value: float) -> str:
    """A strike as text: whole ones without ".0", others in full and never with an exponent
    (1e-05 is written 0.00001, which parse_instrument reads back)."""
    if value == int(value):
        return str(int(value))
    text = repr(value)
    if "e" in text:
        from decimal import Decimal

        text = format(Decimal(text), "f")
    return text


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


# -- order validation: one set of rules for place, modify and margin ------------------------


class _OrderRequest(NamedTuple):
    """A validated order, ready for a broker's route builder to encode."""

    instrument: Instrument
    token: str
    broker_symbol: str
    qty: int
    side: Side
    product: Optional[ProductType]  # None only when modifying an order of a product outside the set
    order_type: OrderType
    price: Optional["Decimal"]
    trigger_price: Optional["Decimal"]
    tag: str
    validity: str
    user_tag: Optional[str] = None  # the caller's tag, before it was made unique
    native_slice: bool = False  # ask the broker to split this order at the freeze limit itself


def _check_stop(side: Side, price: Optional["Decimal"], trigger: Optional["Decimal"]) -> None:
    """An SL order's trigger on the right side of its limit price."""
    if price is not None and trigger is not None:
        if side is Side.BUY and trigger > price:
            raise InvalidOrderError(f"a stop-loss BUY triggers at or below its limit price: trigger {trigger} > price {price}")
        if side is Side.SELL and trigger < price:
            raise InvalidOrderError(f"a stop-loss SELL triggers at or above its limit price: trigger {trigger} < price {price}")


def _on_tick(value: Optional[float], tick: float) -> Optional["Decimal"]:
    """A broker-reported price as an exact decimal, with float noise removed (120.50000000000001
    -> 120.5). A price genuinely off the master's tick is kept as the broker has it: a modify
    that only changes the quantity must not move the order's price."""
    if value is None:
        return None
    from decimal import Decimal

    exact = Decimal(repr(value))
    if tick <= 0:
        return exact
    step = Decimal(repr(tick))
    steps = exact / step
    nearest = steps.to_integral_value()
    return nearest * step if abs(steps - nearest) < Decimal("1e-6") else exact


# Prices beyond this are typing mistakes (no listed instrument trades near it); refusing them
# also keeps Decimal arithmetic far from its exponent limits.
_MAX_PRICE = 10_000_000_000
# Likewise quantities (units in one call, before any slicing; the simulated account's limit too). An
# int this side of it also stays far from str()'s 4300-digit limit, which raised a raw ValueError.
_MAX_ORDER_QTY = 10 ** 15


def _order_price(value: Any, what: str, tick: float, instrument: Instrument) -> Optional["Decimal"]:
    """Check a price (rupees) is positive and on the instrument's tick, exactly."""
    if value is None:
        return None
    from decimal import Decimal, InvalidOperation

    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise InvalidOrderError(f"{what} must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > _MAX_PRICE:  # before str(): 10**5000 has no str
        raise InvalidOrderError(f"{what} is beyond any listed price (over {_MAX_PRICE:,} rupees)")
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidOrderError(f"{what} {value!r} is not a number") from None
    if not price.is_finite() or price <= 0:
        raise InvalidOrderError(f"{what} must be positive, got {value!r}")
    if price > _MAX_PRICE:
        raise InvalidOrderError(f"{what} {value!r} is beyond any listed price (over {_MAX_PRICE:,} rupees)")
    if tick > 0:
        step = Decimal(repr(tick))
        if price % step:
            below = (price // step) * step
            options = f"{(below + step).normalize():f}" if below <= 0 else \
                f"{below.normalize():f} or {(below + step).normalize():f}"
            raise InvalidOrderError(
                f"{what} {price} is not a multiple of the tick size {step} for {instrument}; use {options}"
            )
    return price


def _check_order(spec: "BrokerSpec", instrument: Any, qty: Any, side: Any, product: Any, order_type: Any,
                 price: Any, trigger_price: Any, validity: Any, lot: int, tick: float,
                 kept_price: Optional[float] = None, kept_trigger: Optional[float] = None
                 ) -> Tuple[int, Side, Optional[ProductType], OrderType, Optional["Decimal"], Optional["Decimal"]]:
    """Validate an order completely before anything is sent.

    ``price`` and ``trigger_price`` are the caller's (checked strictly); when modifying,
    ``kept_price``/``kept_trigger`` are the broker's current values, kept where the new order
    type needs them and not given. ``product`` and ``validity`` may be None (modify: unchanged).
    """
    broker = spec["id"]
    if isinstance(instrument, Index):
        raise InvalidOrderError(f"{instrument} is an index: indices cannot be traded; trade its futures or options")
    if not isinstance(instrument, (Equity, Future, Option)):
        raise InvalidOrderError(f"instrument must be an Equity, Future or Option, got {instrument!r}")
    if instrument.exchange not in spec["exchanges"]:
        raise UnsupportedFeatureError(f"{broker} does not trade the {instrument.exchange.value} segment through ttconnect")
    side_e = _as_enum(Side, side, "side", InvalidOrderError)
    product_e = None if product is None else _as_enum(ProductType, product, "product", InvalidOrderError)
    type_e = _as_enum(OrderType, order_type, "order_type", InvalidOrderError)
    if product_e is not None and product_e not in spec["products"]:
        raise UnsupportedFeatureError(f"{broker} does not support product {product_e.value}")
    if type_e not in spec["order_types"]:
        raise UnsupportedFeatureError(f"{broker} does not support order type {type_e.value}")
    cash = instrument.exchange in _CASH_EXCHANGES
    if product_e is ProductType.CNC and not cash:
        raise InvalidOrderError(f"product CNC is for cash equities; {instrument} needs NRML (carry) or MIS (intraday)")
    if product_e is ProductType.NRML and cash:
        raise InvalidOrderError(f"product NRML is for derivatives; {instrument} needs CNC (delivery) or MIS (intraday)")
    if validity is not None and validity not in spec["validities"]:
        raise InvalidOrderError(f"validity {validity!r} is not supported by {broker}; use one of {', '.join(spec['validities'])}")
    if isinstance(qty, bool) or not isinstance(qty, int) or qty <= 0:
        shown = repr(qty) if not isinstance(qty, int) or abs(qty) <= _MAX_ORDER_QTY else "a huge negative number"
        raise InvalidOrderError(f"qty must be a positive whole number of units, got {shown}")
    if qty > _MAX_ORDER_QTY:  # not quoted: str() of a 5000-digit int raises
        raise InvalidOrderError(f"qty is beyond any order (over {_MAX_ORDER_QTY:,} units); check the quantity")
    qty = int(qty)  # a plain int from here on (a caller's int subclass is no value to store or send)
    if lot > 1 and qty % lot:
        below, above = qty // lot * lot, (qty // lot + 1) * lot
        options = f"{above}" if below == 0 else f"{below} or {above}"
        raise InvalidOrderError(f"qty {qty} is not a multiple of the lot size {lot} for {instrument}; use {options}")
    needs_price = type_e in (OrderType.LIMIT, OrderType.SL)
    needs_trigger = type_e in (OrderType.SL, OrderType.SL_M)
    price_d = None if price is None else _order_price(price, "price", tick, instrument)
    trigger_d = None if trigger_price is None else _order_price(trigger_price, "trigger_price", tick, instrument)
    if price_d is None and needs_price:
        price_d = _on_tick(kept_price, tick)
    if trigger_d is None and needs_trigger:
        trigger_d = _on_tick(kept_trigger, tick)
    if needs_price and price_d is None:
        raise InvalidOrderError(f"{type_e.value} orders need a price")
    if not needs_price and price_d is not None:
        raise InvalidOrderError(f"{type_e.value} orders take no price (got {price!r}); use LIMIT or SL to set one")
    if needs_trigger and trigger_d is None:
        raise InvalidOrderError(f"{type_e.value} orders need a trigger_price")
    if not needs_trigger and trigger_d is not None:
        raise InvalidOrderError(f"{type_e.value} orders take no trigger_price (got {trigger_price!r}); use SL or SL_M")
    if type_e is OrderType.SL:
        _check_stop(side_e, price_d, trigger_d)
    return qty, side_e, product_e, type_e, price_d, trigger_d


# ============================================================================
# 5. Instrument store (sqlite3)
# ============================================================================

_SCHEMA_VERSION = 3  # 2: broker_tokens.freeze_qty; 3: options keyed by the chain (WITHOUT ROWID)

# Rows are appended in load order and every key is a unique index built after the bulk load:
# inserting ~1e5 hashed ids into a keyed b-tree row by row is ~3x slower than appending and
# sorting once. ``id`` is the canonical identity (see _instrument_id), the same in every
# broker's rows. ``options`` is the exception: keyed by the chain, which covers every column,
# it is stored once instead of as a table plus a chain index copying it, and filing each row
# into that key costs less than appending and sorting (masters list a chain's strikes
# together; even shuffled, it still does).
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
    isin          TEXT    NOT NULL  -- '' where the loaded masters do not carry it
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
    option_type   TEXT    NOT NULL CHECK (option_type IN ('CE', 'PE')),
    -- the chain; ending in the id, an option is also found within its underlying's range
    PRIMARY KEY (underlying_id, expiry, strike, option_type, instrument_id)
) WITHOUT ROWID;
CREATE TABLE broker_tokens (
    instrument_id INTEGER NOT NULL REFERENCES instruments(id),
    broker_id     TEXT    NOT NULL,
    token         TEXT    NOT NULL,
    broker_symbol TEXT    NOT NULL,
    freeze_qty    INTEGER NOT NULL  -- the exchange's per-order limit as this broker's master gives it; 0: not given
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
# (``options`` holds no duplicates to drop: its loader skips a repeated key, see _Loader.)
_DEDUPE_KEYS = (
    ("instruments", "id"),
    ("indices", "instrument_id"),
    ("equities", "instrument_id"),
    ("futures", "instrument_id"),
    ("broker_tokens", "instrument_id, broker_id"),
)
_INDEXES = (
    "CREATE UNIQUE INDEX ix_indices_key ON indices(instrument_id)",
    "CREATE UNIQUE INDEX ix_equities_key ON equities(instrument_id)",
    "CREATE UNIQUE INDEX ix_broker_tokens_key ON broker_tokens(instrument_id, broker_id)",
    "CREATE INDEX ix_futures_underlying_expiry ON futures(underlying_id, expiry)",
    "CREATE UNIQUE INDEX ix_futures_key ON futures(instrument_id)",
)


def _create_indexes(conn: sqlite3.Connection) -> int:
    """Build every index, first dropping duplicate canonical rows (the first one of each key
    stays) if the master had any. Return how many broker rows were dropped as duplicates."""
    import sqlite3

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


class _BusyStore(Exception):
    """The file is locked by another program (a DB browser, a backup): transient, not damage."""


# How long a connection waits for another program's lock on the file before giving up.
_DB_BUSY_TIMEOUT = 5.0


def _is_busy(exc: BaseException) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)  # SQLITE_BUSY, SQLITE_LOCKED


class _LoadStats:
    """What one master load did: rows filed, rows skipped by segment, malformed rows."""

    __slots__ = ("rows", "duplicates", "malformed", "skipped", "broker")

    def __init__(self, broker: str = "") -> None:
        self.rows = self.duplicates = self.malformed = 0
        self.skipped: Dict[str, int] = {}
        self.broker = broker  # named in its warnings: several clients may load masters in one process

    def skip(self, segment: str) -> None:
        self.skipped[segment] = self.skipped.get(segment, 0) + 1

    def bad(self, line: int, reason: str) -> None:
        self.malformed += 1
        if self.malformed <= 5:
            log.warning("%s instrument master: skipped malformed row %d: %s", self.broker or "a", line, reason)


# The row every broker's master parser yields (its spec's ``master.parse``), always 13 values:
#   (kind, exchange, symbol, name, lot_size, tick_size, token, broker_symbol,
#    expiry, und_kind, strike, option_type, freeze_qty)
# kind is "I" index, "E" equity, "F" future or "O" option; the last four are None for cash
# rows, strike and option_type None for futures. ``symbol`` of a derivative is its
# underlying's canonical symbol; ``und_kind`` says whether that is an index ("I") or equity.
_MasterRow = Tuple[Any, ...]



class _Loader:
    """Files canonical master rows into a fresh database with bounded memory.

    Rows are appended to one wide staging table as they are parsed (one insert per row),
    then fanned out to the normalised tables by ``INSERT ... SELECT`` inside SQLite. The
    type tables of the few cash and future rows (options are ~90% of a master) are filed
    from lists kept during the parse instead: each ``INSERT ... SELECT`` reads the whole stage.
    A derivative may come before its underlying (a master may list cash last): the underlying's id is
    known from its key alone, and a placeholder row is filed at the end only for underlyings
    the master never lists itself.
    """

    # A master row without its kind and underlying's kind (the type tables below are filled
    # without them: options are the rows with an option type), prefixed by the two ids.
    STAGE = (
        "CREATE TEMP TABLE stage (id INTEGER, underlying_id INTEGER, exchange TEXT, symbol TEXT,"
        " name TEXT, lot_size INTEGER, tick_size REAL, token TEXT, broker_symbol TEXT, expiry TEXT,"
        " strike REAL, option_type TEXT, freeze_qty INTEGER)"
    )
    FAN_OUT = (
        "INSERT INTO instruments SELECT id, exchange, symbol, name, lot_size, tick_size FROM temp.stage",
        # A repeated option's rows are equal in every column (all follow from its key): the
        # first one stays, as _create_indexes keeps the first of other rows.
        "INSERT OR IGNORE INTO options SELECT id, underlying_id, expiry, strike, option_type FROM temp.stage"
        " WHERE option_type IS NOT NULL",
        "INSERT INTO broker_tokens SELECT id, ?, token, broker_symbol, freeze_qty FROM temp.stage",
    )

    def __init__(self, conn: sqlite3.Connection, broker_id: str, stats: _LoadStats) -> None:
        self.conn, self.broker_id, self.stats = conn, broker_id, stats
        self.cash_seen: Dict[int, Tuple[str, str]] = {}  # id -> (kind, token) of the cash row filed under it
        self.pending: Dict[int, Tuple[str, str, str]] = {}  # id -> (kind, exchange, symbol)
        # in master order, like the stage: a duplicate's first row is the one kept
        self.indices: List[Tuple[int]] = []
        self.equities: List[Tuple[int]] = []
        self.futures: List[Tuple[int, int, str]] = []

    def load(self, rows: Iterable[_MasterRow]) -> None:
        conn = self.conn
        conn.execute(self.STAGE)
        self.stats.rows = conn.executemany("INSERT INTO temp.stage VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                           self._staged(rows)).rowcount
        for sql in self.FAN_OUT[:-1]:
            conn.execute(sql)
        conn.execute(self.FAN_OUT[-1], (self.broker_id,))  # temp.stage goes with the connection
        conn.executemany("INSERT INTO indices VALUES (?)", self.indices)
        conn.executemany("INSERT INTO equities VALUES (?, '')", self.equities)
        conn.executemany("INSERT INTO futures VALUES (?, ?, ?)", self.futures)
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
        """Each row as a stage row: its canonical id and its underlying's, then the row without
        its two kinds (tuple slices and concatenation: C speed, cheaper than binding the two)."""
        digest, from_bytes = _md5, int.from_bytes  # _instrument_id, inlined: this runs per row
        underlyings: Dict[Tuple[str, str], int] = {}
        strike_text = _Memo(repr)  # repr(float) is slow and a master has a few thousand distinct strikes
        cash_seen = self.cash_seen
        for row in rows:
            kind = row[0]
            if kind == "O":
                uid = underlyings.get((row[1], row[2])) or self._underlying(underlyings, row)
                key = f"{row[1]}|{row[2]}|{row[8]}|{strike_text[row[10]]}|{row[11]}"  # = _option_key
                iid = from_bytes(digest(key.encode()).digest()[:8], "big") >> 1
            elif kind == "F":
                uid = underlyings.get((row[1], row[2])) or self._underlying(underlyings, row)
                iid = _instrument_id(f"{row[1]}|{row[2]}|{row[8]}|FUT")
                self.futures.append((iid, uid, row[8]))
            else:
                uid = None
                iid = _instrument_id(f"{row[1]}|{row[2]}")
                first = cash_seen.setdefault(iid, (kind, row[6]))
                if first[0] != kind:  # an index and an equity of one name share an id (and would share a token)
                    self._clash(row, first)
                    continue
                (self.indices if kind == "I" else self.equities).append((iid,))
            yield (iid, uid) + row[1:9] + row[10:]

    def _clash(self, row: _MasterRow, first: Tuple[str, str]) -> None:
        """Count the second of an index and an equity of one name as malformed, always loudly:
        their keys are equal, so each would resolve to the token of whichever row came first."""
        self.stats.malformed += 1
        kinds = {"I": "an index", "E": "an equity"}
        log.warning("%s instrument master: %s:%s is listed as %s (token %s) and as %s (token %s); the two would share "
                    "one instrument id, so the second row was skipped as malformed", self.stats.broker or "a", row[1],
                    row[2], kinds[first[0]],
                    first[1], kinds[row[0]], row[6])

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
        self._symbol_indexed = -1  # the generation whose file is known to have the symbol index
        self._lock = threading.RLock()
        self._conns: List[sqlite3.Connection] = []

    # -- connections -----------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.generation != self._generation:
            if conn is not None:
                self._forget(conn)
            conn = self._open_readonly()
            local.conn, local.generation = conn, self._generation
            with self._lock:
                self._conns.append(conn)
        return conn

    def _open_readonly(self) -> sqlite3.Connection:
        import sqlite3

        uri = "file:" + _sqlite_uri_path(self.path) + "?mode=ro"
        # Each connection is used by its own thread only; check_same_thread is off so that
        # close() can release the other threads' handles too.
        return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=_DB_BUSY_TIMEOUT)

    def _forget(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        conn.close()

    def reopen(self) -> None:
        """Make every thread open the (replaced) file afresh on its next query."""
        with self._lock:
            self._generation += 1

    def close(self) -> None:
        """Close every thread's connection (call it when those threads are done)."""
        self.closed = True
        with self._lock:
            conns, self._conns = self._conns, []
            self._generation += 1  # a thread that queries again opens afresh
        for conn in conns:
            conn.close()

    # -- health and metadata -------------------------------------------------------------

    def roll_back_journal(self) -> None:
        """Undo what a writer killed mid-change left (a hot journal); the caller holds the file lock.

        Only a read-write connection can: every read-only one fails ("attempt to write a readonly
        database"), for good. A journal whose file is gone is stale: a new file beside it would be
        "rolled back" with the old file's pages.
        """
        import sqlite3

        journal = self.path + "-journal"
        if not os.path.exists(journal):
            return
        if not os.path.exists(self.path):
            log.warning("instrument store: removed %s, left without its database", journal)
            _remove_quietly(journal)
            return
        try:
            writer = sqlite3.connect("file:" + _sqlite_uri_path(self.path) + "?mode=rw", uri=True,
                                     timeout=_DB_BUSY_TIMEOUT)
            try:
                writer.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # the first read plays the journal back
            finally:
                writer.close()
        except sqlite3.Error as exc:  # the check that follows finds the file unusable and moves both aside
            log.warning("instrument store: could not roll back %s (%s)", journal, exc)

    def check(self) -> Dict[str, Tuple[str, int, str]]:
        """Return {broker: (refreshed_at, rows, source)}; raise _CorruptStore if the file is damaged,
        _BusyStore if another program holds a lock on it (longer than the busy timeout)."""
        import sqlite3

        try:
            size = os.path.getsize(self.path)
            conn = self.conn()
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            page_count = conn.execute("PRAGMA page_count").fetchone()[0]
            if size < page_size * page_count or size == 0:
                raise _CorruptStore(f"file is {size} bytes, header says {page_size * page_count}")
            if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                raise _CorruptStore("schema version differs")
            rows = conn.execute("SELECT broker_id, refreshed_at, rows, source FROM _meta").fetchall()
        except sqlite3.OperationalError as exc:
            raise (_BusyStore if _is_busy(exc) else _CorruptStore)(str(exc)) from exc
        except sqlite3.DatabaseError as exc:
            raise _CorruptStore(str(exc)) from exc
        # A record edited or damaged by hand reads as never refreshed (so the master is loaded again).
        return {b: (at if isinstance(at, str) else "", n if isinstance(n, int) else 0, str(src)) for b, at, n, src in rows}

    # -- lookups -----------------------------------------------------------------------------

    def has_type(self, instrument: Instrument) -> bool:
        sql = _EXISTS_SQL[type(instrument)]
        return self.conn().execute(sql, (instrument._iid,)).fetchone() is not None

    def token(self, broker_id: str, instrument: Instrument) -> Optional[Tuple[str, str]]:
        return self.conn().execute(_TOKEN_SQL[type(instrument)], (instrument._iid, broker_id)).fetchone()

    def freeze_qty(self, instrument: Instrument) -> int:
        """Any loaded broker's figure: freeze quantities are the exchange's, not a broker's."""
        row = self.conn().execute("SELECT MAX(freeze_qty) FROM broker_tokens WHERE instrument_id = ?",
                                  (instrument._iid,)).fetchone()
        return int(row[0] or 0)

    def _ensure_lazy_indexes(self) -> None:
        import sqlite3

        with self._lock:
            if self._symbol_indexed == self._generation:
                return
            generation = self._generation
            found = self.conn().execute(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name IN "
                "('ix_broker_tokens_symbol', 'ix_broker_tokens_token', 'ix_instruments_exchange_symbol')").fetchone()[0]
        if found < len(_LAZY_INDEXES):
            try:
                # The only in-place write to the shared file: under the store's file lock, like every
                # other change (build, swap, move aside), so another process's check() never sees the
                # file grow between its size and its header, and no swap lands mid-write (leaving this
                # journal beside the new file). Taken outside self._lock: a thread holding the file
                # lock calls reopen(). mode=rw: never create an empty file where the DB was moved aside.
                with _FileLock(self.path + ".lock"):
                    writer = sqlite3.connect("file:" + _sqlite_uri_path(self.path) + "?mode=rw", uri=True, timeout=30)
                    try:
                        for statement in _LAZY_INDEXES:
                            writer.execute(statement)
                        writer.commit()
                    finally:
                        writer.close()
            except (sqlite3.Error, OSError) as exc:  # e.g. a read-only cache dir: look-ups still work, by scanning
                log.warning("instrument store: could not index broker symbols (%s); reverse look-ups will scan", exc)
        with self._lock:
            self._symbol_indexed = generation

    def by_broker_symbol(self, broker_id: str, exchange: str, broker_symbol: str) -> Optional[Instrument]:
        """Reverse look-up: a broker's (exchange, trading symbol) -> canonical instrument."""
        self._ensure_lazy_indexes()
        row = self.conn().execute(
            "SELECT i.id, i.symbol FROM broker_tokens t JOIN instruments i ON i.id = t.instrument_id"
            " WHERE t.broker_symbol = ? AND t.broker_id = ? AND i.exchange = ?",
            (broker_symbol, broker_id, exchange),
        ).fetchone()
        if row is None or exchange not in Exchange.__members__:
            return None
        return self._instrument(row[0], Exchange(exchange), row[1])

    def by_token(self, broker_id: str, token: str) -> Optional[Instrument]:
        """Reverse look-up by a broker's token, where it is unique across segments (segment-prefixed keys)."""
        self._ensure_lazy_indexes()
        row = self.conn().execute(
            "SELECT i.id, i.exchange, i.symbol FROM broker_tokens t JOIN instruments i ON i.id = t.instrument_id"
            " WHERE t.token = ? AND t.broker_id = ?", (token, broker_id)).fetchone()
        return None if row is None else self._instrument(row[0], Exchange(row[1]), row[2])

    def _instrument(self, iid: int, exch: Exchange, symbol: str) -> Instrument:
        """The canonical instrument filed under ``iid`` (its type tables say which kind)."""
        conn = self.conn()
        # the options key (the chain) ends in the id: find the option within its underlying's range
        uid = self.underlying_id(exch, symbol)
        opt = conn.execute("SELECT expiry, strike, option_type FROM options WHERE underlying_id = ? AND instrument_id = ?",
                           (uid, iid)).fetchone() if uid is not None else None
        if opt is not None:
            return _make(Option, iid, exchange=exch, symbol=symbol, expiry=_dt.date.fromisoformat(opt[0]),
                         strike=opt[1], option_type=OptionType(opt[2]))
        fut = conn.execute("SELECT expiry FROM futures WHERE instrument_id = ?", (iid,)).fetchone()
        if fut is not None:
            return _make(Future, iid, exchange=exch, symbol=symbol, expiry=_dt.date.fromisoformat(fut[0]))
        is_index = conn.execute("SELECT 1 FROM indices WHERE instrument_id = ?", (iid,)).fetchone() is not None
        return _make(Index if is_index else Equity, iid, exchange=exch, symbol=symbol)

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
        self._ensure_lazy_indexes()
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
        self._ensure_lazy_indexes()
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
    import sqlite3

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
        # 16 KiB pages (default 4): a quarter as many page reads and writes for the staging
        # table (it spills to a temp file), the fan-out and the index sorts. It also sets the
        # temp database's pages. Set before the cache sizes (set after them, the main cache
        # grew ~4x), and the temp cache capped in KiB too: its default, 500 pages, is 8 MiB here.
        conn.execute("PRAGMA page_size = 16384")
        conn.execute("PRAGMA cache_size = -4096")  # 4 MiB: most index sorting stays in memory
        conn.execute("PRAGMA temp.cache_size = -2048")
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


# Indexes only some clients need, built on first use rather than in every refresh (together
# ~12% of a cold refresh; a client that only resolves and streams never needs them): broker
# payloads name instruments by trading symbol or by token, the reverse keys; search and the
# "similar symbols" of a not-found message go by (exchange, symbol).
_LAZY_INDEXES = ("CREATE INDEX IF NOT EXISTS ix_broker_tokens_symbol ON broker_tokens(broker_symbol)",
                 "CREATE INDEX IF NOT EXISTS ix_broker_tokens_token ON broker_tokens(token)",
                 "CREATE INDEX IF NOT EXISTS ix_instruments_exchange_symbol ON instruments(exchange, symbol)")

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
    import sqlite3

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

            msvcrt.locking(self._fd, msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._fd is not None
        if os.name == "posix":
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(self._fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        os.close(self._fd)
        self._fd = None



# -- the master lifecycle and the resolve caches --------------------------------------------


def _latest_publication(now: float, published: Tuple[int, int]) -> _dt.datetime:
    """Return the IST time of the newest daily dump that exists at epoch ``now``."""
    local = _dt.datetime.fromtimestamp(now, IST)
    pub = local.replace(hour=published[0], minute=published[1], second=0, microsecond=0)
    return pub if local >= pub else pub - _dt.timedelta(days=1)


class _MasterContext:
    """What a spec that makes its master in-process (no download) is given."""

    __slots__ = ("now", "config", "db_path")

    def __init__(self, now: _dt.datetime, config: Mapping[str, Any], db_path: str) -> None:
        self.now, self.config = now, config
        self.db_path = db_path  # the shared DB as it is now (it may hold other brokers' instruments)


class _Instruments:
    """One client's view of the shared instrument DB: keeps its broker's master fresh
    (staleness, cross-process lock, repair, download, atomic swap) and caches look-ups."""

    def __init__(self, broker_id: str, master: _Master, url: str, cache_dir: str, clock: Callable[[], float],
                 on_stale: str, download: Callable[[str, str, Mapping[str, str]], int],
                 config: Mapping[str, Any]) -> None:
        self.broker, self.master, self.url, self.cache_dir = broker_id, master, url, cache_dir
        self._clock, self._on_stale, self._download, self._config = clock, on_stale, download, config
        self.store = _InstrumentStore(os.path.join(cache_dir, "instruments.db"))
        self._tokens: Dict[int, Tuple[str, str]] = {}
        self._infos: Dict[int, Tuple[str, int, float]] = {}  # name, lot, tick: fixed until the next refresh
        self._freezes: Dict[int, int] = {}
        self._by_symbol: Dict[Tuple[str, str], Instrument] = {}
        self._by_token: Dict[str, Instrument] = {}
        self.loaded: Optional[Dict[str, Any]] = None  # what this client's own refresh loaded, if it made one

    @property
    def source(self) -> str:
        if self.master.build is None:
            return self.url
        what = self.master.label(self._config) if self.master.label is not None else self.broker
        return f"built-in ({what})"

    # -- lifecycle -----------------------------------------------------------------------

    def _state(self, repair: bool) -> Optional[Dict[str, Tuple[str, int, str]]]:
        """Return the store's per-broker metadata, None if there is no usable file."""
        if repair:  # the caller holds the file lock
            self.store.roll_back_journal()
        if not os.path.exists(self.store.path):
            return None
        try:
            return self.store.check()
        except _BusyStore as exc:  # never moved aside: the lock goes when the other program is done
            raise ConfigurationError(
                f"the instrument DB {self.store.path!r} is locked by another program ({exc}, for over "
                f"{_DB_BUSY_TIMEOUT:g} s): close what holds it (a DB browser, a backup, a sqlite3 shell) and retry",
                retryable=True) from None
        except _CorruptStore as exc:
            if not repair:
                return None
            self._move_aside(str(exc))
            return None

    def _move_aside(self, why: str) -> None:
        aside = f"{self.store.path}.corrupt"
        log.warning("instrument store %s is damaged (%s); moved to %s and rebuilding", self.store.path, why, aside)
        self.store.close()
        self.store.closed = False
        os.replace(self.store.path, aside)
        journal = self.store.path + "-journal"
        if os.path.exists(journal):  # it goes with its file: next to a new one it would "roll back" that one
            os.replace(journal, aside + "-journal")
        self.store.reopen()

    def _is_fresh(self, state: Optional[Dict[str, Tuple[str, int, str]]]) -> bool:
        if not state or self.broker not in state:
            return False
        try:
            refreshed = _dt.datetime.fromisoformat(state[self.broker][0])
        except ValueError:
            return False
        if refreshed.tzinfo is None:
            return False
        if self.master.build is not None and state[self.broker][2] != self.source:
            return False  # built from other config (another set of instruments asked for)
        now = self._clock()
        # a refresh "in the future" (a clock that was wrong then) proves nothing: load again
        return _latest_publication(now, self.master.published) <= refreshed <= _dt.datetime.fromtimestamp(now + 3600, IST)

    def ensure(self) -> None:
        """Load this broker's master if the DB's copy predates the broker's latest dump."""
        import sqlite3

        if self._is_fresh(self._state(repair=False)):
            return
        state: Optional[Dict[str, Tuple[str, int, str]]] = None
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            with _FileLock(self.store.path + ".lock"):
                # Another process may have replaced the file while this one waited: look again
                # through a new connection (an open one still reads the old file).
                self.store.reopen()
                state = self._state(repair=True)
                if self._is_fresh(state):
                    return
                try:
                    self.loaded = self._refresh_locked(state)
                except (TTConnectError, _MasterFormatError, OSError, sqlite3.Error) as exc:
                    self._failed(exc, state)
        except OSError as exc:  # the cache dir cannot be written: a read-only dir, a file in its place
            self._failed(_cache_dir_error(self.cache_dir, exc), state if state is not None else self._state(repair=False))

    def _failed(self, exc: BaseException, state: Optional[Dict[str, Tuple[str, int, str]]]) -> None:
        cached = state.get(self.broker) if state else None
        what = f"the {self.broker} instrument master ({self.source}) could not be loaded: {exc}"
        if cached is None:
            raise _refresh_error(
                exc, f"{what}. No instrument DB for {self.broker} is cached in {self.cache_dir!r} yet, so the client "
                f"cannot start: check the network or config 'instruments_url', then retry"
            ) from exc
        if self._on_stale == "warn":
            log.warning("%s; serving the cached DB refreshed at %s (on_stale='warn')", what, cached[0])
            return
        raise _refresh_error(
            exc, f"{what}. The cached DB (refreshed at {cached[0]}) was kept untouched; pass "
            f"on_stale='warn' to start with it, or retry later"
        ) from exc

    def refresh(self) -> Dict[str, Any]:
        """Load this broker's master now and rebuild the store from it (atomically)."""
        import sqlite3

        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            with _FileLock(self.store.path + ".lock"):
                self.store.reopen()
                try:
                    return self._refresh_locked(self._state(repair=True))
                except _MasterFormatError as exc:
                    raise BrokerError(f"the {self.broker} instrument master ({self.source}) is unusable: {exc}; "
                                      "the instrument DB was kept as it was") from None
                except sqlite3.Error as exc:
                    raise ConfigurationError(f"the {self.broker} instrument DB could not be built ({exc}); the old one "
                                             "was kept: check the cache dir's free space") from None
        except OSError as exc:
            raise _cache_dir_error(self.cache_dir, exc) from None

    def _refresh_locked(self, state: Optional[Dict[str, Tuple[str, int, str]]]) -> Dict[str, Any]:
        """The refresh proper; the caller holds the store's file lock."""
        # A built master is what its config asks for: its size may change at will.
        previous = state.get(self.broker, ("", 0, ""))[1] if state and self.master.build is None else 0
        # Nobody else builds while the lock is held: what a crashed build left is garbage. Only
        # ttconnect's own names are touched (the cache dir may be shared with other files).
        build_prefix = os.path.basename(self.store.path) + ".build-"
        for name in os.listdir(self.cache_dir):
            if name.startswith(build_prefix) or (name.endswith(".download") and "_master." in name):
                try:
                    _remove_quietly(os.path.join(self.cache_dir, name))
                except OSError as exc:
                    log.warning("could not remove stale %s (%s)", name, exc.__class__.__name__)
        stats = _LoadStats(self.broker)
        started = time.perf_counter()
        refreshed_at = _dt.datetime.fromtimestamp(self._clock(), IST)
        if self.master.build is not None:
            rows = self.master.build(_MasterContext(refreshed_at, self._config, self.store.path))
            _build_store(self.store.path, self.broker, rows, stats, self.source, refreshed_at.isoformat(), previous)
        else:
            part = os.path.join(self.cache_dir, f"{self.broker}_master.{os.getpid()}.{threading.get_ident()}.download")
            try:
                self._download(self.url, part, self.master.headers)
                refreshed_at = _dt.datetime.fromtimestamp(self._clock(), IST)
                assert self.master.parse is not None
                with open(part, "rb") as f:
                    _build_store(self.store.path, self.broker, self.master.parse(f, stats), stats, self.url,
                                 refreshed_at.isoformat(), previous)
            finally:
                _remove_quietly(part)
        self.store.reopen()
        self._forget()
        log.info(
            "%s instruments refreshed: %d rows, %d skipped by segment %s, %d malformed, %d duplicates, %.2f s",
            self.broker, stats.rows, sum(stats.skipped.values()), stats.skipped, stats.malformed,
            stats.duplicates, time.perf_counter() - started,
        )
        return {"rows": stats.rows, "skipped": dict(stats.skipped), "malformed": stats.malformed, "duplicates": stats.duplicates}

    # -- look-ups (cached) -----------------------------------------------------------------

    def read(self, query: Callable[..., Any], *args: Any) -> Any:
        """Run a store query; a damaged file is moved aside and rebuilt once, as at start-up."""
        import sqlite3

        try:
            return query(*args)
        except sqlite3.Error as exc:
            why = str(exc)
        if "readonly" in why and os.path.exists(self.store.path + "-journal"):
            # another process died mid-change after this one opened the file: roll its journal back, read again
            with _FileLock(self.store.path + ".lock"):
                self.store.roll_back_journal()
            try:
                return query(*args)
            except sqlite3.Error as exc:
                why = str(exc)
        if not any(w in why.lower() for w in ("malformed", "not a database", "no such table", "corrupt")):
            raise ConfigurationError(f"the instrument DB {self.store.path!r} cannot be read ({why})") from None
        log.warning("instrument store %s found damaged at a look-up (%s); rebuilding it", self.store.path, why)
        try:
            with _FileLock(self.store.path + ".lock"):
                if os.path.exists(self.store.path):
                    self._move_aside(why)
                self._forget()
                self.loaded = self._refresh_locked(None)
        except (TTConnectError, _MasterFormatError, OSError, sqlite3.Error) as err:
            raise ConfigurationError(f"the instrument DB {self.store.path!r} is damaged and could not be rebuilt "
                                     f"({err}); delete it and start the client again") from None
        try:
            return query(*args)
        except sqlite3.Error as err:
            raise ConfigurationError(f"the instrument DB {self.store.path!r} cannot be read ({err})") from None

    def _forget(self) -> None:
        self._tokens.clear()
        self._infos.clear()
        self._freezes.clear()
        self._by_symbol.clear()
        self._by_token.clear()

    def lookup(self, instrument: Instrument) -> Tuple[str, str]:
        """(broker token, broker trading symbol) of an instrument this broker lists."""
        try:
            found = self._tokens.get(instrument._iid)
        except AttributeError:  # not an instrument: refused below
            found = None
        if found is not None:
            return found
        if not isinstance(instrument, _Instrument):
            raise InvalidInstrumentError(f"expected an Index, Equity, Future or Option, got {instrument!r}")
        found = self.read(self.store.token, self.broker, instrument)
        if found is None:
            self.read(self.store.check_exists, instrument)
            raise InstrumentNotFoundError(f"{instrument} exists but {self.broker} does not list it")
        self._tokens[instrument._iid] = found
        return found

    def info(self, instrument: Instrument) -> Tuple[str, int, float]:
        """(name, lot size, tick size) of an instrument."""
        info = self._infos.get(instrument._iid) if isinstance(instrument, _Instrument) else None
        if info is None:
            if not isinstance(instrument, _Instrument):
                raise InvalidInstrumentError(f"expected an Index, Equity, Future or Option, got {instrument!r}")
            info = self.read(self.store.info, instrument)
            if info is None:
                self.read(self.store.check_exists, instrument)
                raise InstrumentNotFoundError(f"{instrument} not found")  # pragma: no cover - check_exists raised
            self._infos[instrument._iid] = info
        return info

    def freeze_qty(self, instrument: Instrument) -> int:
        """The exchange's freeze quantity for one order (0 where no loaded master gives it)."""
        found = self._freezes.get(instrument._iid)
        if found is None:
            found = self._freezes[instrument._iid] = self.read(self.store.freeze_qty, instrument)
        return found

    def by_broker_symbol(self, exchange: str, broker_symbol: str) -> Instrument:
        key = (exchange, broker_symbol)
        found = self._by_symbol.get(key)
        if found is None:
            found = self.read(self.store.by_broker_symbol, self.broker, exchange, broker_symbol)
            if found is None:
                raise InstrumentNotFoundError(
                    f"{self.broker} reported {exchange}:{broker_symbol}, which is not in the loaded instrument master "
                    "(an unloaded segment, or a contract listed after the last refresh)"
                )
            self._by_symbol[key] = found
        return found

    def by_token(self, token: str) -> Instrument:
        found = self._by_token.get(token)
        if found is None:
            found = self.read(self.store.by_token, self.broker, token)
            if found is None:
                raise InstrumentNotFoundError(
                    f"{self.broker} reported instrument {token!r}, which is not in the loaded instrument master "
                    "(an unloaded segment, or a contract listed after the last refresh)"
                )
            self._by_token[token] = found
        return found

    def close(self) -> None:
        self.store.close()


def _refresh_error(exc: BaseException, message: str) -> TTConnectError:
    if isinstance(exc, TTConnectError):
        return type(exc)(message, retryable=exc.retryable, broker_code=exc.broker_code, http_status=exc.http_status)
    if isinstance(exc, _MasterFormatError):
        return BrokerError(message)
    return ConfigurationError(message + " (check the cache dir's free space and permissions)")


def _cache_dir_error(cache_dir: str, exc: OSError) -> ConfigurationError:
    return ConfigurationError(f"the cache dir {cache_dir!r} cannot be written ({exc.strerror or exc}): pass a "
                              "writable 'cache_dir' (or set TTCONNECT_CACHE_DIR)")
# ============================================================================
# 6. Broker specs
# ============================================================================

# A broker is one ``BrokerSpec``: data (routes, hosts, limits, error tables, enum maps,
# capabilities, auth flows) plus the small named hooks a dict cannot express. Each spec is
# built by ``_broker(...)`` over ``_BASE_SPEC``, so it states only what differs. The client
# turns every public call into: validate, then ``execute(route, request)``, which builds the
# request, rate-limits and sends it (or hands it to the spec's local answerer), runs the one
# central reply check below and the route's parser.

_NO_ARGS: Mapping[str, str] = MappingProxyType({})


class _Request(NamedTuple):
    """One request as a route's builder makes it: path-template arguments, query, body."""

    path: Mapping[str, str] = _NO_ARGS
    query: Optional[Mapping[str, Any]] = None
    body: Any = None


class _Reply(NamedTuple):
    """A broker envelope, opened: success flag, payload, the broker's code and message."""

    ok: bool
    data: Any
    code: str
    message: str


class _Route(NamedTuple):
    """The unit of a spec: one broker endpoint and how to build and read it."""

    verb: str
    path: str  # template: "/orders/{variety}"; ids may also travel in the query
    encoding: Optional[str] = None  # None | "form" | "json"
    rate: str = "default"  # rate-limit class
    host: str = "root_url"  # which configured root it talks to
    idempotent: bool = True  # False: never re-sent blindly once it may have reached the broker
    signed: bool = True  # carries the session (False: the login calls that make one)
    about_order: bool = False  # addresses one order: HTTP 404 and ``order_errors`` mean that order
    build: Optional[Callable[..., _Request]] = None  # the public call's values -> _Request
    parse: Optional[Callable[["_Ctx", Any], Any]] = None  # payload -> model
    rows: Optional[Callable[[Any], Sequence[Any]]] = None  # list routes: payload -> its rows
    row: Optional[Callable[["_Ctx", Mapping[str, Any]], Any]] = None  # list routes: one row -> model
    envelope: Optional[Callable[[int, Dict[str, Any]], _Reply]] = None  # where the route has its own


class _Flow(NamedTuple):
    """One way a broker gives a session, with the config keys it takes."""

    name: str
    mode: AuthMode
    needs: Tuple[str, ...]  # config keys it cannot do without
    trigger: Tuple[str, ...]  # keys whose presence picks it
    obtain: Optional[Callable[..., SessionData]] = None  # login / code exchange; None: the token is given
    token: str = ""  # config key holding a ready session token
    single_use: str = ""  # config key of a single-use code: exchanged once, at init
    redirect_param: str = ""  # the login redirect's query parameter carrying that code (when named otherwise)
    session_keys: Mapping[str, str] = _NO_ARGS  # SessionData field <- config key (feed tokens...)
    user: str = ""  # config key naming the account: a stored session must be that account's
    signs: Tuple[str, ...] = ()  # config keys every signed call needs besides the session (an app key)
    app: str = ""  # config key naming the app: a stored session must be that app's


class _Master(NamedTuple):
    """Where a broker's instrument master comes from and when it is renewed."""

    published: Tuple[int, int]  # (hour, minute) IST of the daily dump
    parse: Optional[Callable[[IO[bytes], "_LoadStats"], Iterator["_MasterRow"]]] = None  # a downloaded file
    headers: Mapping[str, str] = _NO_ARGS
    build: Optional[Callable[["_MasterContext"], Iterable["_MasterRow"]]] = None  # made here, no download
    label: Optional[Callable[[Mapping[str, Any]], str]] = None  # what a built master is made of, by config


# The signatures of the hooks a spec may carry; every one is a module-level function named
# ``_<broker>_*`` in that broker's section.
_Call = Callable[..., Any]  # call(route_name, request=None, session=None) -> payload
_Sub = Tuple[Instrument, str, str]  # (instrument, broker token, mode)


# The spec's shape, for type checkers. At run time a spec is a plain dict: building these
# TypedDicts compiles every field's annotation (~2.5 ms of ``import ttconnect``).
if TYPE_CHECKING:  # pragma: no cover

    class _Hooks(TypedDict, total=False):
        headers: Callable[[Mapping[str, Any], Optional[SessionData], _Route], Dict[str, str]]
        envelope: Callable[[int, Dict[str, Any]], _Reply]
        manual_token: Callable[[str], str]  # a token as users paste it -> as it is sent
        login_url: Callable[[Mapping[str, Any], str], str]
        reauth_hint: Callable[[Mapping[str, Any], str], str]
        renew: Callable[[_Call, Mapping[str, Any], SessionData, float], SessionData]
        raw_status: Callable[[Mapping[str, Any]], OrderStatus]  # status of an order row no model was made of
        order_ref: Callable[[Mapping[str, Any]], Optional[str]]  # how the broker addresses one order, if not by id
        freeze_limit: Callable[[str], Optional[int]]  # the freeze limit a broker names in a refusal
        local: Callable[["_LocalContext"], Any]  # answers routes in-process instead of HTTP (an offline broker)
        stream_connect: Callable[[_Call, Mapping[str, Any], SessionData, str], Tuple[str, Dict[str, str]]]
        stream_key: Callable[[Instrument, str], Any]  # a subscription's key, as the frames name it
        stream_target: Callable[[Instrument, str], Any]  # what the decoder gets per key (default: the instrument)
        stream_limits: Callable[[Sequence[_Sub]], Optional[str]]  # why these subscriptions are too many, if so
        stream_watch: Callable[[Any, str], None]  # on the subscriber's thread: the feed can carry this token
        stream_subscribe: Callable[[Sequence[_Sub]], List[Union[str, bytes]]]
        stream_unsubscribe: Callable[[Sequence[_Sub]], List[Union[str, bytes]]]
        stream_decode: Callable[[bytes, Mapping[Any, Instrument], List[Tick]], None]
        stream_text: Callable[[str], Tuple[str, Any]]
        stream_socket: Callable[..., Any]  # an in-process feed socket instead of a websocket (an offline broker)
        order_stream_connect: Callable[[_Call, Mapping[str, Any], SessionData, str], Tuple[str, Dict[str, str]]]
        order_stream_text: Callable[[str], Tuple[str, Any]]


    class BrokerSpec(TypedDict):
        """Everything that differs between brokers, as data plus small named hooks."""

        id: str
        name: str
        urls: Mapping[str, str]  # root_url, login_url, ws_url, order_ws_url, instruments_url, more hosts
        url_follows: Mapping[str, str]  # a host left at its default follows an overridden one
        sandbox_urls: Mapping[str, str]  # hosts replaced by config ``sandbox: True``
        master: _Master
        auth: Tuple[_Flow, ...]  # in order of preference
        session_expiry: Tuple[int, int]  # (hour, minute) IST at which a day's session dies
        routes: Mapping[str, _Route]
        rate_limits: Mapping[str, Sequence[Tuple[int, float]]]  # class -> [(calls, per seconds)]
        errors: Mapping[str, type]  # broker error code -> exception class
        order_errors: Mapping[str, type]  # refinements for routes about one order
        error_messages: Sequence[Tuple[str, type]]  # lower-case message fragment -> class
        error_hints: Mapping[str, str]  # broker code or lower-case message fragment -> what to do
        rate_limit_texts: Sequence[str]  # non-JSON bodies that mean "slow down"
        empty_codes: frozenset  # codes a list route uses for "nothing to list"
        retryable_codes: frozenset  # codes that mean "try again later"
        exchanges: frozenset  # segments it trades
        products: Mapping[ProductType, str]
        order_types: Mapping[OrderType, str]
        validities: Tuple[str, ...]
        max_tag_len: int
        max_slices: int  # orders the broker makes of one when it slices natively (0: it cannot)
        row_fields: Mapping[str, str]  # raw row keys the kill switches read about rows no model was made of
        options: Tuple[str, ...]  # further config keys the broker reads
        has: Mapping[str, bool]  # capabilities (see Capabilities)
        stream_max_tokens: int  # instruments per market-data connection
        stream_keepalive: Optional[str]  # text the client must send to keep the feed alive; "" a ping frame
        stream_silence_timeout: float  # seconds without any frame before the feed counts as dead
        stream_modes_additive: bool  # True: each (token, mode) is a separate subscription
        hooks: _Hooks

else:
    _Hooks = BrokerSpec = dict


def _plain_envelope(status: int, body: Dict[str, Any]) -> _Reply:
    return _Reply(status < 400, body, "", "" if status < 400 else f"HTTP {status}")


def _no_headers(config: Mapping[str, Any], session: Optional[SessionData], route: _Route) -> Dict[str, str]:
    return {}


def _same_token(token: str) -> str:
    return token


def _log_in_again(config: Mapping[str, Any], base: str) -> str:
    return "log in again"


_BASE_SPEC: BrokerSpec = {
    "id": "",
    "name": "",
    "urls": {"root_url": "", "login_url": "", "ws_url": "", "order_ws_url": "", "instruments_url": ""},
    "url_follows": {},
    "sandbox_urls": {},
    "master": _Master(published=(0, 0)),
    "auth": (),
    "session_expiry": (0, 0),
    "routes": {},
    "rate_limits": {"default": [(10, 1.0)]},
    "errors": {},
    "order_errors": {},
    "error_messages": (),
    "error_hints": {},
    "rate_limit_texts": (),
    "empty_codes": frozenset(),
    "retryable_codes": frozenset(),
    "exchanges": frozenset(),
    "products": {},
    "order_types": {},
    "validities": ("DAY",),
    "max_tag_len": 20,
    "max_slices": 0,
    "row_fields": {},
    "options": (),
    "has": {"auto_auth": False, "order_history": False, "margin": False, "margin_with_positions": False,
            "order_updates": False, "streaming": False, "native_slicing": False, "gtt": False, "sandbox": False,
            "feed_authorize": False},
    "stream_max_tokens": 0,
    "stream_keepalive": None,
    "stream_silence_timeout": 10.0,
    "stream_modes_additive": False,
    "hooks": {"headers": _no_headers, "envelope": _plain_envelope, "manual_token": _same_token,
              "reauth_hint": _log_in_again},
}
# Keys whose mappings merge over the base one level deep (a broker adds hosts, capabilities and
# hooks); every other key is replaced whole.
_MERGED_KEYS = ("urls", "has", "hooks", "rate_limits")


def _broker(**fields: Any) -> BrokerSpec:
    """Build a broker's spec over the base: state only what differs."""
    unknown = set(fields) - set(_BASE_SPEC)
    if unknown:  # pragma: no cover - a spec-writing mistake, caught by the first test run
        raise TypeError(f"unknown spec keys: {', '.join(sorted(unknown))}")
    spec: Dict[str, Any] = dict(_BASE_SPEC)
    for key, value in fields.items():
        spec[key] = {**_BASE_SPEC[key], **value} if key in _MERGED_KEYS else value  # type: ignore[literal-required]
    return spec  # type: ignore[return-value]


class _Ctx:
    """What parsers may ask: canonical instruments for broker rows, and today's date."""

    def __init__(self, instruments: "_Instruments", clock: Callable[[], float]) -> None:
        self._instruments, self._clock = instruments, clock

    def instrument(self, exchange: Any, broker_symbol: Any) -> Instrument:
        """The canonical instrument a broker names by (exchange, trading symbol)."""
        return self._instruments.by_broker_symbol(_text(exchange, "exchange"), _text(broker_symbol, "trading symbol"))

    def instrument_by_token(self, token: Any) -> Instrument:
        """The canonical instrument a broker names by its token (where the token is unique)."""
        return self._instruments.by_token(_text(token, "instrument token"))

    def today(self) -> _dt.date:
        return _dt.datetime.fromtimestamp(self._clock(), IST).date()


class _LocalContext:
    """What a spec that answers its routes in-process (the send seam) is given."""

    __slots__ = ("broker", "config", "cache_dir", "clock", "instruments", "ctx")

    def __init__(self, broker: str, config: Mapping[str, Any], cache_dir: str, clock: Callable[[], float],
                 instruments: "_Instruments", ctx: _Ctx) -> None:
        self.broker, self.config, self.cache_dir, self.clock = broker, config, cache_dir, clock
        self.instruments, self.ctx = instruments, ctx


class _Malformed(Exception):
    """A broker reply lacks a field or holds one of the wrong kind (reported as a BrokerError)."""


def _text(value: Any, what: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
        raise _Malformed(f"{what} is {value!r}")
    return str(value)


def _field(row: Mapping[str, Any], key: str) -> Any:
    """A field a row cannot do without."""
    try:
        value = row[key]
    except (KeyError, TypeError):
        raise _Malformed(f"field {key!r} missing") from None
    if value is None or value == "":
        raise _Malformed(f"field {key!r} is empty")
    return value


def _str_field(row: Mapping[str, Any], key: str) -> str:
    return _text(_field(row, key), f"field {key!r}")


def _secret_field(data: Any, key: str, where: str, required: bool = True) -> str:
    """A token a login or renewal reply carries ("" for an optional one it lacks). Login hooks run
    outside the parsers' checks, so a reply without it is a BrokerError here, never quoting it."""
    if not isinstance(data, Mapping):
        problem = f"the payload is {type(data).__name__}, expected an object"
    else:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if value in (None, "") and not required:
            return ""
        problem = f"field {key!r} is " + ("missing" if value in (None, "") else f"of type {type(value).__name__}, not text")
    raise BrokerError(f"{where}: malformed reply ({problem}); the broker said success but gave no usable session: "
                      "log in again, and report it if it persists")


def _mapped(table: Mapping[Any, Any], row: Mapping[str, Any], key: str) -> Any:
    """A field translated through a broker table; an unknown value is malformed."""
    raw = _field(row, key)
    try:
        return table[raw]
    except (KeyError, TypeError):
        raise _Malformed(f"field {key!r} has unknown value {raw!r}") from None


def _object(data: Any, what: str = "payload") -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise _Malformed(f"{what} is {type(data).__name__}, expected an object")
    return data


def _list_rows(data: Any) -> Sequence[Any]:
    """The rows of a list payload (``null`` is an empty list)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise _Malformed(f"payload is {type(data).__name__}, expected a list")
    return data


def _ws_url_ok(url: str) -> bool:
    """Can websocket-client connect to ``url`` at all: a ws(s) scheme, a host, a valid port."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError:
        return False
    return parts.scheme in ("ws", "wss") and bool(parts.hostname)


def _json_object(text: str) -> Optional[Dict[str, Any]]:
    """A feed's text frame as a JSON object, or None when it is not one."""
    import json

    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


# Field readers the master parsers share; each raises ValueError on a bad value.

def _positive_number(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError(f"{raw!r} is not a positive number")
    return value


_MAX_QTY = 10**9  # no lot, freeze limit or order on an Indian exchange comes near it


def _lot(raw: Union[str, int, float]) -> int:
    """A lot size or freeze quantity: a whole number from 0 to 10**9."""
    if isinstance(raw, float) and not raw.is_integer():  # also NaN and infinities
        raise ValueError(f"{raw!r} is not a whole number")
    value = int(raw)
    if not 0 <= value <= _MAX_QTY:
        raise ValueError(f"{_short(str(raw), 40)} is not between 0 and {_MAX_QTY:,}")
    return value


def _tick(raw: str) -> float:
    value = float(raw)
    if not 0 <= value < float("inf"):
        raise ValueError(f"tick size {raw!r} is not a finite number >= 0")
    return value


def _untradable(lot: int, tick: float) -> ValueError:
    """The error of a traded row (equity or derivative) with a lot or tick of 0: only index rows
    may carry them, and an order on such a row would skip the lot and tick checks."""
    return ValueError(f"lot size {lot} or tick size {tick:g} is 0 on a traded instrument")


def _whole(value: Any, what: str) -> int:
    """A count from JSON: an int, or a float with no fraction (freeze quantities come as 1800.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not 0 <= value <= _MAX_QTY \
            or value != int(value):
        raise ValueError(f"{what} {value!r} is not a whole number from 0 to {_MAX_QTY:,}")
    return int(value)


# Bounds of a master, far above the real ones (the CSV one ~10 MB, the JSON ones ~35-60 MB
# inflated, ~120k rows; a row is under 1 KB): what passes them is a gzip bomb or a row that
# never closes, refused before it fills the disk or memory.
_MAX_MASTER_BYTES = 256 << 20  # inflated: as downloaded into the cache dir, and as a parser reads it
_MAX_MASTER_ROW = 64 << 10  # characters of one JSON array element


def _iter_json_array(f: IO[bytes], chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array without holding the whole document.

    Each chunk's complete objects are decoded by one ``json.loads`` (C speed); a chunk whose
    cut falls inside a string falls back to decoding object by object. What is left over
    between chunks is one incomplete element, so an element that never closes (or a document
    past _MAX_MASTER_BYTES) is refused instead of growing and rescanning the buffer.
    """
    import json

    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: a byte-order mark is dropped
    raw_decode = json.JSONDecoder().raw_decode
    buf = ""
    started = False
    total = 0
    while True:
        chunk = f.read(chunk_size)
        total += len(chunk)
        if total > _MAX_MASTER_BYTES:
            raise _MasterFormatError(f"over {_MAX_MASTER_BYTES:,} bytes of JSON, far more than any real master")
        try:
            buf += decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise _MasterFormatError(f"not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk)") from None
        if not started:
            stripped = buf.lstrip()
            if not stripped:
                if not chunk:
                    raise _MasterFormatError("the file is empty")
                buf = ""
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
            except (ValueError, RecursionError):
                items, pos = [], 0
                while True:
                    while pos < len(part) and part[pos] in " \t\r\n,":
                        pos += 1
                    if pos >= len(part):
                        break
                    try:
                        obj, pos = raw_decode(part, pos)
                    except (ValueError, RecursionError):
                        break
                    items.append(obj)
                rest = part[pos:] + buf[cut + 1:]
            yield from items
            buf = rest
        buf = buf.lstrip(" \t\r\n,")
        if len(buf) > _MAX_MASTER_ROW:
            raise _MasterFormatError(f"the JSON array is truncated or malformed: an element runs past "
                                     f"{_MAX_MASTER_ROW:,} characters without closing (starts {buf[:60]!r})")
        if not chunk:
            tail = buf.strip(" \t\r\n,")
            if tail != "]":
                raise _MasterFormatError(f"the JSON array is truncated or malformed near {tail[:60]!r}")
            return


def _num(value: Any) -> Optional[float]:
    """A broker number (float, int or string, possibly "- 2235.80") -> finite float; blank -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _Malformed(f"number expected, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int of hundreds of digits
            raise _Malformed(f"number expected, got an integer of {len(str(value))} digits") from None
    elif isinstance(value, str):
        text = value.replace(" ", "").replace(",", "")
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            raise _Malformed(f"number expected, got {value!r}") from None
    else:
        raise _Malformed(f"number expected, got {type(value).__name__}")
    if number != number or number in (float("inf"), float("-inf")):
        raise _Malformed(f"number expected, got {value!r}")
    return number


def _int(value: Any) -> int:
    number = _num(value)
    return 0 if number is None else int(round(number))


def _num_at(row: Mapping[str, Any], key: str) -> Optional[float]:
    """A row's number field (see _num), None if absent; a bad value names the field."""
    try:
        return _num(row.get(key))
    except _Malformed as exc:
        raise _Malformed(f"field {key!r}: {exc}") from None


def _int_at(row: Mapping[str, Any], key: str) -> int:
    number = _num_at(row, key)
    return 0 if number is None else int(round(number))


def _required_num(row: Mapping[str, Any], key: str) -> float:
    """A number field a reply cannot do without."""
    number = _num_at(row, key)
    if number is None:
        raise _Malformed(f"field {key!r} missing")
    return number


_MONTH_NUMBERS = {name: f"{number:02d}" for number, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}


def _strptime(text: str, fmt: str) -> _dt.datetime:
    """``datetime.strptime`` with ``%b`` read as an English month abbreviation, whatever the
    process locale (strptime's own %b follows LC_TIME: "Nov" fails under fr_FR); ValueError if not."""
    if "%b" in fmt:
        import re

        found = re.search(r"[A-Za-z]+", text)
        number = _MONTH_NUMBERS.get(found.group().lower()) if found else None
        if found is None or number is None:
            raise ValueError(f"no English month abbreviation in {text!r}")
        text, fmt = text[:found.start()] + number + text[found.end():], fmt.replace("%b", "%m")
    return _dt.datetime.strptime(text, fmt)


def _ist(text: Any, fmt: str = "%Y-%m-%d %H:%M:%S") -> Optional[_dt.datetime]:
    """Parse a naive IST timestamp; blank and the "0001-01-01" placeholder give None."""
    if not text or not isinstance(text, str) or text.startswith("0001-01-01"):
        return None
    try:
        return _strptime(text, fmt).replace(tzinfo=IST)
    except ValueError:
        log.warning("unparsed timestamp %r (expected %s)", text, fmt)
        return None


def _declared_order(cls: Any, members: Iterable[Any]) -> Tuple[Any, ...]:
    """``members`` of the enum ``cls`` in its declaration order, each once: brokers list a profile's
    exchanges and products in orders of their own, and the tuples must compare equal across them."""
    found = set(members)
    return tuple(member for member in cls if member in found)


def _reverse(mapping: Mapping[Any, str]) -> Dict[Any, Any]:
    return {raw: canonical for canonical, raw in mapping.items()}


_LIVE_STATUSES = frozenset({OrderStatus.PENDING, OrderStatus.OPEN, OrderStatus.TRIGGER_PENDING, OrderStatus.PARTIALLY_FILLED})


def _order_status(raw: Any, table: Mapping[str, OrderStatus], row: Mapping[str, Any], filled_key: str,
                  qty_key: str) -> OrderStatus:
    """Map a raw status; a live order with some fills is PARTIALLY_FILLED; unknown is PENDING."""
    status = table.get(raw.strip().upper() if isinstance(raw, str) else "")
    if status is None:
        log.warning("unknown order status %r; treating it as PENDING (not terminal)", raw)
        status = OrderStatus.PENDING
    if status is OrderStatus.OPEN:
        try:
            filled, qty = _int_at(row, filled_key), _int_at(row, qty_key)
        except _Malformed:  # unreadable fills: live all the same (the kill switch must still cancel it)
            return status
        if 0 < filled < qty:
            return OrderStatus.PARTIALLY_FILLED
    return status


def _pnl_percent(avg: float, ltp: Optional[float], given: Any) -> Optional[float]:
    """Percent gain on cost, computed the same way for every broker (their own figures are rounded
    differently, and some give none); the broker's figure only when price data is missing."""
    if avg and ltp is not None:
        return (ltp - avg) / avg * 100
    return _num(given)


def _paise(value: float) -> float:
    """Round a rupee amount computed here to whole paise (broker floats carry binary noise)."""
    return round(value, 2)


def _price_text(value: Optional["Decimal"]) -> str:
    return "0" if value is None else format(value.normalize(), "f")


def _require_config(config: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    """For hooks that read config keys: name the missing ones."""
    missing = [k for k in keys if not (isinstance(config.get(k), str) and config[k])]
    if missing:
        raise ConfigurationError(f"config {', '.join(repr(k) for k in missing)} is needed for {what}")


def _product(req: _OrderRequest) -> ProductType:
    """The product of a new order or margin leg (only a modify may lack one)."""
    assert req.product is not None
    return req.product


def _order_id_path(order_id: str) -> _Request:
    """A request naming one order in its path (``/orders/{order_id}``)."""
    return _Request(path={"order_id": order_id})


def _order_id_query(order_id: str) -> _Request:
    """A request naming one order in its query (``?order_id=``)."""
    return _Request(query={"order_id": order_id})


class _Memo(dict):
    """Memoises a conversion of master text (expiry spellings, lots, ticks, strikes)."""

    def __init__(self, convert: Callable[[str], Any]) -> None:
        super().__init__()
        self.convert = convert

    def __missing__(self, raw: str) -> Any:
        iso = self.convert(raw)  # raises ValueError on a bad value; not cached then
        self[raw] = iso
        return iso


# -- the one reply check -------------------------------------------------------------------


def _retry_after(headers: Mapping[str, str]) -> Optional[float]:
    value = headers.get("Retry-After") if headers else None
    # Seconds only; anything else (an HTTP date, "²", which isdigit() accepts) is treated as absent.
    if value and value.isascii() and value.strip().replace(".", "", 1).isdigit():
        return float(value)
    return None


def _check_reply(spec: BrokerSpec, name: str, route: _Route, resp: "_Response", sent: Sequence[str] = ()) -> Any:
    """The one check every broker reply passes: return the payload or raise the right error.

    A body quoted in an error is shortened only after what was ``sent`` (tokens, keys) is
    blanked out of it: cut first, a token straddling the cut would no longer be found whole.
    """
    import json

    where = f"{spec['id']} {name}"
    if 300 <= resp.status < 400:  # the transport follows no redirect (see _Transport.request)
        moved = BrokerError(f"{where}: HTTP {resp.status}, a redirect, which ttconnect does not follow (a proxy, a "
                            "login portal or a wrong root URL in the way); check the configured URLs and the network",
                            http_status=resp.status)
        moved.unread_reply = True  # type: ignore[attr-defined]  # the request may have been acted on before it
        raise moved
    text = resp.text or ""
    try:
        body = json.loads(text) if text.strip() else None
    except (ValueError, RecursionError):
        body = None
    # A 2xx cut short or garbled: the broker took the request, what it did is unknown.
    unread = 200 <= resp.status < 300
    if body is None:
        lowered = text.lower()
        retry_after = _retry_after(resp.headers)
        if resp.status == 429 or any(t in lowered for t in spec["rate_limit_texts"]):
            err: TTConnectError = RateLimitError(f"{where}: rate limited (HTTP {resp.status}: {_short(_scrub(text, sent), 80)}); slow down and retry",
                                                 http_status=resp.status)
            unread = False  # refused, not processed
        elif resp.status == 401:  # HTTP's own "unauthorized" (a gateway's page, or no body): the session was refused
            err = AuthenticationError(f"{where}: HTTP 401 (unauthorized) with "
                                      + (f"a non-JSON body: {_short(_scrub(text, sent), 80)}" if text.strip() else "an empty body"),
                                      http_status=resp.status)
            unread = False  # refused, not processed
        elif not text.strip():
            err = BrokerError(f"{where}: empty response body with HTTP {resp.status}", http_status=resp.status,
                              retryable=resp.status >= 500)
        else:
            err = BrokerError(f"{where}: HTTP {resp.status} with a non-JSON body: {_short(_scrub(text, sent), 120)}",
                              http_status=resp.status, retryable=resp.status >= 500)
        err.retry_after = retry_after  # type: ignore[attr-defined]
        err.unread_reply = unread  # type: ignore[attr-defined]
        raise err
    if not isinstance(body, dict):  # every broker wraps its replies in a JSON object
        odd = BrokerError(f"{where}: HTTP {resp.status} with an unexpected JSON body: "
                          f"{_short(_scrub(text, sent), 120)}",
                          http_status=resp.status, retryable=resp.status >= 500)
        odd.unread_reply = unread  # type: ignore[attr-defined]
        raise odd
    reply = (route.envelope or spec["hooks"]["envelope"])(resp.status, body)
    if reply.ok:
        return reply.data
    code, message = reply.code, reply.message
    cls = _error_class(spec, route, resp.status, code, message)
    if code in spec["empty_codes"] and route.row is not None:
        return None
    retryable = cls in (RateLimitError, NetworkError) or resp.status >= 500 or code in spec["retryable_codes"]
    lowered = message.lower()
    hint = spec["error_hints"].get(code) or next((h for k, h in spec["error_hints"].items() if k in lowered), None)
    err = cls(f"{where}: {message} ({code or 'no code'}, HTTP {resp.status})" + (f"; {hint}" if hint else ""),
              broker_code=code or None, http_status=resp.status, retryable=retryable)
    err.retry_after = _retry_after(resp.headers)  # type: ignore[attr-defined]
    raise err


def _error_class(spec: BrokerSpec, route: _Route, status: int, code: str, message: str) -> type:
    # The message first: some refusals (static IP, funds) come under whatever code is at hand.
    lowered = message.lower()
    for fragment, cls in spec["error_messages"]:
        if fragment in lowered:
            return cls
    if route.about_order and code in spec["order_errors"]:
        return spec["order_errors"][code]
    if code in spec["errors"]:
        cls = spec["errors"][code]
        if cls is NetworkError and status == 429:
            return RateLimitError
        return cls
    if status == 429:
        return RateLimitError
    if status in (401, 403):
        return AuthenticationError
    if status == 404 and route.about_order:
        return OrderNotFoundError
    return BrokerError


# ============================================================================
# 6a. Broker spec: Zerodha
# ============================================================================
# Kite Connect v3: https://kite.trade/docs/connect/v3/

_KITE_MASTER_COLUMNS = (
    "instrument_token", "tradingsymbol", "name", "expiry", "strike", "tick_size",
    "lot_size", "instrument_type", "segment", "exchange",
)


def _kite_iso_date(raw: str) -> str:
    return _dt.date.fromisoformat(raw).isoformat()


def _zerodha_parse_master(f: IO[bytes], stats: _LoadStats) -> Iterator[_MasterRow]:
    """Parse Kite's instrument CSV into canonical rows
    (https://kite.trade/docs/connect/v3/market-quotes/#instruments).

    Kite gives strike and tick size in rupees; index rows carry tick 0 and lot 0; the
    derivative ``name`` column is the underlying's F&O name.
    """
    import csv
    import io

    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")  # -sig: a byte-order mark is dropped
    try:
        reader = csv.reader(text)
        try:
            yield from _zerodha_rows(reader, stats)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise _MasterFormatError(f"not a readable Kite instrument CSV ({exc.__class__.__name__}: {_short(str(exc), 80)})") from None
    finally:
        if not f.closed:  # the caller owns (and closes) the file; a parser dropped late finds it closed
            text.detach()


def _zerodha_rows(reader: Iterator[List[str]], stats: _LoadStats) -> Iterator[_MasterRow]:
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
    # A master repeats a few hundred distinct expiries, lots, ticks and strikes: convert each once.
    expiries = _Memo(_kite_iso_date)
    lots, ticks, strikes = _Memo(_lot), _Memo(_tick), _Memo(_positive_number)
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
            # the feed subscribes by the token as a uint32 (str.isdigit alone also passes '²' and '٣')
            if not (token.isascii() and token.isdigit()) or (len(token) >= 10 and int(token) >= 1 << 32) or not tsym:
                raise ValueError(f"bad instrument_token {token!r} or tradingsymbol {tsym!r}")
            lot = lots[row[c_lot]]
            tick = ticks[row[c_tick]]
            if itype == "CE" or itype == "PE" or itype == "FUT":
                if not (lot and tick):
                    raise _untradable(lot, tick)
                if exchange not in _UNDERLYING_CODE:
                    raise ValueError(f"a {itype} row on the cash exchange {exchange}")
                name = row[c_name]
                underlying = underlyings.get(name)
                if underlying is None:
                    underlying = underlyings[name] = _kite_underlying(name)
                if itype == "FUT":
                    yield ("F", exchange, underlying[0], name, lot, tick, token, tsym, expiries[row[c_exp]], underlying[1],
                           None, None, 0)
                else:
                    strike = strikes[row[c_strike]]
                    yield ("O", exchange, underlying[0], name, lot, tick, token, tsym, expiries[row[c_exp]],
                           underlying[1], strike, itype, 0)
            elif exchange in _UNDERLYING_CODE:
                raise ValueError(f"a {itype} row on the derivatives exchange {exchange}")
            elif row[c_seg] == "INDICES":
                yield ("I", exchange, _canonical_index_symbol(tsym), row[c_name] or tsym, lot, tick, token, tsym,
                       None, None, None, None, 0)
            elif itype == "EQ":
                if not (lot and tick):
                    raise _untradable(lot, tick)
                yield ("E", exchange, tsym.upper(), row[c_name] or tsym, lot, tick, token, tsym, None, None, None, None, 0)
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


_KITE_PRODUCTS = {ProductType.CNC: "CNC", ProductType.MIS: "MIS", ProductType.NRML: "NRML"}
_KITE_ORDER_TYPES = {OrderType.MARKET: "MARKET", OrderType.LIMIT: "LIMIT", OrderType.SL: "SL", OrderType.SL_M: "SL-M"}
_KITE_PRODUCT_OF = _reverse(_KITE_PRODUCTS)
_KITE_ORDER_TYPE_OF = _reverse(_KITE_ORDER_TYPES)
_KITE_SIDE_OF = {"BUY": Side.BUY, "SELL": Side.SELL}
# Kite's OMS states (https://kite.trade/docs/connect/v3/orders/#order-statuses); in-flight
# modify/cancel states are still live orders.
_KITE_STATUSES = {
    "PUT ORDER REQ RECEIVED": OrderStatus.PENDING,
    "VALIDATION PENDING": OrderStatus.PENDING,
    "OPEN PENDING": OrderStatus.PENDING,
    "AMO REQ RECEIVED": OrderStatus.PENDING,
    "OPEN": OrderStatus.OPEN,
    "MODIFY VALIDATION PENDING": OrderStatus.OPEN,
    "MODIFY PENDING": OrderStatus.OPEN,
    "MODIFIED": OrderStatus.OPEN,
    "CANCEL PENDING": OrderStatus.OPEN,
    "UPDATE": OrderStatus.OPEN,
    "TRIGGER PENDING": OrderStatus.TRIGGER_PENDING,
    "COMPLETE": OrderStatus.COMPLETE,
    "CANCELLED": OrderStatus.CANCELLED,
    "CANCELLED AMO": OrderStatus.CANCELLED,
    "REJECTED": OrderStatus.REJECTED,
}


def _zerodha_headers(config: Mapping[str, Any], session: Optional[SessionData], route: _Route) -> Dict[str, str]:
    headers = {"X-Kite-Version": "3"}
    if session is not None:
        headers["Authorization"] = f"token {config.get('api_key', '')}:{session.access_token}"
    return headers


def _zerodha_envelope(status: int, body: Dict[str, Any]) -> _Reply:
    """Kite: ``{"status": "success", "data": ...}`` or ``{"status": "error", "error_type", "message"}``."""
    if status < 400 and body.get("status") == "success" and "error_type" not in body:
        return _Reply(True, body.get("data"), "", "")
    return _Reply(False, None, str(body.get("error_type") or ""), str(body.get("message") or "no message"))


def _zerodha_exchange_token(call: _Call, config: Mapping[str, Any], now: float) -> SessionData:
    """Turn a login redirect's request_token into an access token
    (https://kite.trade/docs/connect/v3/user/#login-flow)."""
    import hashlib

    api_key, request_token = config["api_key"], config["request_token"]
    checksum = hashlib.sha256((api_key + request_token + config["api_secret"]).encode()).hexdigest()
    data = call("login", _Request(body={"api_key": api_key, "request_token": request_token, "checksum": checksum}))
    token = _secret_field(data, "access_token", "zerodha login")
    return SessionData(broker="zerodha", mode=AuthMode.MANUAL, access_token=token,
                       refresh_token=_secret_field(data, "refresh_token", "zerodha login", required=False) or None,
                       obtained_at=_dt.datetime.fromtimestamp(now, IST), user_id=str(data.get("user_id") or "") or None)


def _zerodha_login_url(config: Mapping[str, Any], base: str) -> str:
    from urllib.parse import urlencode

    _require_config(config, ("api_key",), "the zerodha login URL")
    return f"{base}?{urlencode({'v': '3', 'api_key': config['api_key']})}"


def _zerodha_reauth_hint(config: Mapping[str, Any], base: str) -> str:
    key = config.get("api_key")
    where = _zerodha_login_url(config, base) if key else base
    return (f"Kite access tokens die at 06:00 IST and on logout: log in at {where}, then pass the "
            "redirect's request_token with api_secret (or a fresh access_token) in the config")


def _zerodha_profile(ctx: _Ctx, data: Any) -> Profile:
    data = _object(data)
    return Profile(
        user_id=_str_field(data, "user_id"), name=str(data.get("user_name") or ""), email=data.get("email") or None,
        broker="zerodha",
        exchanges=_declared_order(Exchange, (Exchange(e) for e in data.get("exchanges") or () if e in Exchange.__members__)),
        products=_declared_order(ProductType, (ProductType(p) for p in data.get("products") or ()
                                               if p in ProductType.__members__)), raw=data,
    )


def _zerodha_funds(ctx: _Ctx, data: Any) -> Fund:
    data = _object(data)
    equity = _object(data.get("equity") or data, "equity")  # /user/margins gives segments; /user/margins/equity one
    available, utilised = _object(equity.get("available") or {}), _object(equity.get("utilised") or {})
    net, debits = _required_num(equity, "net"), _num_at(utilised, "debits") or 0.0
    return Fund(
        available=net, used=debits, total=_paise(net + debits), collateral=_num_at(available, "collateral"),
        m2m_unrealized=_num_at(utilised, "m2m_unrealised"), m2m_realized=_num_at(utilised, "m2m_realised"),
        utilised_debits=debits, raw=data,
    )


def _zerodha_holding(ctx: _Ctx, row: Mapping[str, Any]) -> Holding:
    # ``quantity`` is settled; shares bought in the last session sit in ``t1_quantity``.
    qty = _int_at(row, "quantity") + _int_at(row, "t1_quantity")
    avg, ltp = _num_at(row, "average_price") or 0.0, _num_at(row, "last_price")
    return Holding(instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")), qty=qty,
                   avg_price=avg, ltp=ltp, pnl=_num_at(row, "pnl"), pnl_percent=_pnl_percent(avg, ltp, None), raw=row)


def _zerodha_position_rows(data: Any) -> Sequence[Any]:
    if data is None:
        return ()
    data = _object(data)
    if "net" not in data:  # "net" is the whole book; "day" only today's part
        raise _Malformed("field 'net' missing")
    return _list_rows(data["net"])


def _zerodha_position(ctx: _Ctx, row: Mapping[str, Any]) -> Position:
    return Position(instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")),
                    qty=_int_at(row, "quantity"), avg_price=_num_at(row, "average_price") or 0.0,
                    ltp=_num_at(row, "last_price"), pnl=_num_at(row, "pnl"),
                    product=_KITE_PRODUCT_OF.get(row.get("product")), raw=row)


def _zerodha_raw_status(row: Mapping[str, Any]) -> OrderStatus:
    return _order_status(row.get("status") or "", _KITE_STATUSES, row, "filled_quantity", "quantity")


def _zerodha_order(ctx: _Ctx, row: Mapping[str, Any]) -> Order:
    qty, filled = _int_at(row, "quantity"), _int_at(row, "filled_quantity")
    status = _zerodha_raw_status(row)
    pending = _int_at(row, "pending_quantity") if status in _LIVE_STATUSES else 0
    placed = _ist(row.get("exchange_timestamp")) or _ist(row.get("order_timestamp"))
    return Order(
        id=_str_field(row, "order_id"), instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")),
        side=_mapped(_KITE_SIDE_OF, row, "transaction_type"), qty=qty, filled_qty=filled, pending_qty=pending,
        order_type=_mapped(_KITE_ORDER_TYPE_OF, row, "order_type"), product=_KITE_PRODUCT_OF.get(row.get("product")),
        status=status, price=_num_at(row, "price") or None, trigger_price=_num_at(row, "trigger_price") or None,
        average_price=_num_at(row, "average_price") or None, tag=row.get("tag") or None,
        status_message=row.get("status_message") or None, placed_at=placed,
        updated_at=_ist(row.get("exchange_update_timestamp")) or _ist(row.get("order_timestamp")), raw=row,
    )


def _zerodha_trade(ctx: _Ctx, row: Mapping[str, Any]) -> Trade:
    qty, price = _int_at(row, "quantity"), _num_at(row, "average_price") or 0.0
    return Trade(
        trade_id=_str_field(row, "trade_id"), order_id=_str_field(row, "order_id"),
        instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")),
        side=_mapped(_KITE_SIDE_OF, row, "transaction_type"), qty=qty, avg_price=price, trade_value=_paise(qty * price),
        product=_KITE_PRODUCT_OF.get(row.get("product")),
        timestamp=_ist(row.get("fill_timestamp")) or _ist(row.get("exchange_timestamp")), raw=row,
    )


def _zerodha_margin(ctx: _Ctx, data: Any) -> Margin:
    data = _object(data)
    initial, final = _object(data.get("initial") or {}, "initial"), _object(data.get("final") or {}, "final")
    total = _required_num(initial, "total")
    final_total = _num_at(final, "total")
    final_total = total if final_total is None else final_total  # no final figure: no benefit known
    return Margin(total=total, span=_num_at(initial, "span"), exposure=_num_at(initial, "exposure"),
                  option_premium=_num_at(initial, "option_premium"), final_total=final_total,
                  benefit=_paise(total - final_total), raw=data)


def _zerodha_place_order(req: _OrderRequest) -> _Request:
    body = {
        "tradingsymbol": req.broker_symbol, "exchange": req.instrument.exchange.value,
        "transaction_type": req.side.value, "order_type": _KITE_ORDER_TYPES[req.order_type],
        "quantity": str(req.qty), "product": _KITE_PRODUCTS[_product(req)], "validity": req.validity, "tag": req.tag,
    }
    if req.price is not None:
        body["price"] = _price_text(req.price)
    if req.trigger_price is not None:
        body["trigger_price"] = _price_text(req.trigger_price)
    if req.order_type in (OrderType.MARKET, OrderType.SL_M):
        # Kite rejects API MARKET/SL-M orders without it; -1 asks for its automatic protection.
        body["market_protection"] = "-1"
    if req.native_slice:  # only above the freeze limit: Kite refuses autoslice for smaller orders
        body["autoslice"] = "true"
    return _Request(path={"variety": "regular"}, body=body)


def _zerodha_placed(ctx: _Ctx, data: Any) -> List[str]:
    """The order id; an autoslice placement answers {order_id: first slice, children: [...]}
    (since 2026-03-27; a bare list of ids and errors before). A child that failed means part of
    the order was not placed."""
    if isinstance(data, list):
        results = data
    else:
        data = _object(data)
        results = [data] + list(data.get("children") or ())
    ids, errors = [], []
    for result in results:
        found = result.get("order_id") if isinstance(result, Mapping) else result
        if isinstance(found, (str, int)) and not isinstance(found, bool) and str(found).strip():
            ids.append(str(found).strip())
        else:
            error = result.get("error") if isinstance(result, Mapping) else None
            errors.append(str(error.get("message") if isinstance(error, Mapping) else result))
    if not ids:
        raise _Malformed("no order_id in the reply")
    if errors:
        raise OrderError(f"zerodha autoslice: {len(errors)} slice(s) rejected ({'; '.join(errors)[:200]}); placed: "
                         f"{', '.join(ids)}", placed_ids=ids)
    return ids


def _zerodha_freeze_limit(message: str) -> Optional[int]:
    """The limit in Kite's refusal "... higher than the maximum quantity of 900 (36 lots) allowed
    by the exchanges" (https://kite.trade/forum/discussion/comment/42709): its master has none."""
    import re

    found = re.search(r"maximum quantity of (\d+)", message)
    return int(found.group(1)) if found else None


def _zerodha_variety(raw: Mapping[str, Any]) -> str:
    # The URL's variety must be the one the order was placed with
    # (https://kite.trade/docs/connect/v3/orders/#modifying-orders) -- except an AMO that has
    # reached the exchange, which is modified and cancelled as "regular" although the book keeps
    # showing "amo" (staff answer, https://kite.trade/forum/discussion/comment/40302/).
    variety = str(raw.get("variety") or "regular")
    if variety == "amo" and raw.get("exchange_order_id"):
        return "regular"
    return variety


def _zerodha_modify_order(current: Order, req: _OrderRequest) -> _Request:
    body = {"order_type": _KITE_ORDER_TYPES[req.order_type], "quantity": str(req.qty)}
    if req.price is not None:
        body["price"] = _price_text(req.price)
    if req.trigger_price is not None:
        body["trigger_price"] = _price_text(req.trigger_price)
    if req.order_type in (OrderType.MARKET, OrderType.SL_M):
        body["market_protection"] = "-1"
    return _Request(path={"variety": _zerodha_variety(current.raw), "order_id": current.id}, body=body)


def _zerodha_cancel_order(order_id: str, raw: Mapping[str, Any]) -> _Request:
    return _Request(path={"variety": _zerodha_variety(raw), "order_id": order_id})


def _zerodha_margin_body(legs: Sequence[_OrderRequest], consider_positions: bool) -> _Request:
    body = [
        {"exchange": leg.instrument.exchange.value, "tradingsymbol": leg.broker_symbol,
         "transaction_type": leg.side.value, "variety": "regular", "product": _KITE_PRODUCTS[_product(leg)],
         "order_type": _KITE_ORDER_TYPES[leg.order_type], "quantity": leg.qty,
         "price": float(leg.price or 0), "trigger_price": float(leg.trigger_price or 0)}
        for leg in legs
    ]
    # "Boolean to consider users positions": sent either way, the server's default being undocumented.
    return _Request(query={"consider_positions": "true" if consider_positions else "false"}, body=body)


# Kite ticker (https://kite.trade/docs/connect/v3/websocket/): big-endian frames of
# length-prefixed packets; the packet's length says what it is. All fields are unsigned 32-bit;
# prices are scaled by the segment.
_KITE_COUNT = struct.Struct(">H")
_KITE_TOKEN = struct.Struct(">I")
_KITE_LTP = struct.Struct(">II")
_KITE_INDEX_QUOTE = struct.Struct(">6I")  # token, ltp, high, low, open, close (then a change field)
_KITE_INDEX_FULL = struct.Struct(">6I4xI")  # ... + exchange timestamp at 28
_KITE_QUOTE = struct.Struct(">11I")
_KITE_FULL = struct.Struct(">16I" + "IIH2x" * 10)  # + 10 depth levels: qty, price, orders, padding
_KITE_DIVISORS = {3: 10_000_000.0, 6: 10_000.0}  # CDS, BCD; every other segment: 100


def _zerodha_decode(data: bytes, instruments: Mapping[Any, Instrument], out: List[Tick]) -> None:
    """Decode one binary frame into ``out``; raise _FrameError if it is malformed."""
    size = len(data)
    if size < 2:
        return  # the 1-byte heartbeat
    count = _KITE_COUNT.unpack_from(data, 0)[0]
    pos = 2
    for _ in range(count):
        if pos + 2 > size:
            raise _FrameError(f"frame ends before packet header at byte {pos}")
        length = _KITE_COUNT.unpack_from(data, pos)[0]
        pos += 2
        if pos + length > size:
            raise _FrameError(f"packet of {length} bytes runs past the frame end ({size})")
        if length < 8:
            raise _FrameError(f"packet of {length} bytes")
        token = _KITE_TOKEN.unpack_from(data, pos)[0]
        instrument = instruments.get(token)
        if instrument is not None:
            div = _KITE_DIVISORS.get(token & 0xFF, 100.0)
            if length == 184:
                v = _KITE_FULL.unpack_from(data, pos)
                ltp, close = v[1] / div, v[10] / div
                tick = _TickBuilder(instrument, "full", ltp, v[2], v[3] / div, v[4], v[5], v[6], v[7] / div,
                                    v[8] / div, v[9] / div, close, (ltp - close) * 100 / close if close else None,
                                    v[12], v[13], v[14], v[11], v[15], (v[16:31], v[31:46], div))
            elif length == 44:
                v = _KITE_QUOTE.unpack_from(data, pos)
                ltp, close = v[1] / div, v[10] / div
                tick = _TickBuilder(instrument, "quote", ltp, v[2], v[3] / div, v[4], v[5], v[6], v[7] / div,
                                    v[8] / div, v[9] / div, close, (ltp - close) * 100 / close if close else None)
            elif length == 8:
                tick = _TickBuilder(instrument, "ltp", _KITE_LTP.unpack_from(data, pos)[1] / div)
            elif length == 28 or length == 32:
                # index packets carry high, low, open, close, in that order
                v = _KITE_INDEX_FULL.unpack_from(data, pos) if length == 32 else _KITE_INDEX_QUOTE.unpack_from(data, pos)
                ltp, close = v[1] / div, v[5] / div
                tick = _TickBuilder(instrument, "full" if length == 32 else "quote", ltp, None, None, None, None, None,
                                    v[4] / div, v[2] / div, v[3] / div, close, (ltp - close) * 100 / close if close else None,
                                    None, None, None, 0, v[6] if length == 32 else 0)
            else:
                raise _FrameError(f"unknown packet length {length}")
            tick.__class__ = Tick
            out.append(tick)
        pos += length
    if pos != size:  # a count lower than the packets sent: which one is wrong is not known, so neither is trusted
        raise _FrameError(f"the frame declares {count} packet(s) but {size - pos} bytes follow them")


def _zerodha_stream_connect(call: _Call, config: Mapping[str, Any], session: SessionData, url: str
                            ) -> Tuple[str, Dict[str, str]]:
    from urllib.parse import urlencode

    query = urlencode({"api_key": config.get("api_key", ""), "access_token": session.access_token})
    return f"{url}?{query}", {"X-Kite-Version": "3"}


def _zerodha_stream_key(instrument: Instrument, token: str) -> int:
    return int(token)


def _zerodha_stream_subscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    # Subscribe, then set each mode explicitly: Kite's default mode is not documented.
    import json

    messages: List[Union[str, bytes]] = [json.dumps({"a": "subscribe", "v": [int(token) for _, token, _ in items]})]
    for mode in ("ltp", "quote", "full"):
        tokens = [int(token) for _, token, m in items if m == mode]
        if tokens:
            messages.append(json.dumps({"a": "mode", "v": [mode, tokens]}))
    return messages


def _zerodha_stream_unsubscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    import json

    return [json.dumps({"a": "unsubscribe", "v": [int(token) for _, token, _ in items]})]


def _zerodha_stream_text(text: str) -> Tuple[str, Any]:
    """Text frames: ``{"type": "order"|"error"|"message", "data": ...}``."""
    message = _json_object(text)
    if message is None:
        return "unknown", text
    kind = message.get("type")
    if kind == "order" and isinstance(message.get("data"), dict):
        return "order", message["data"]
    if kind in ("error", "message"):
        return kind, str(message.get("data"))
    return "unknown", text


_ZERODHA: BrokerSpec = _broker(
    id="zerodha",
    name="Zerodha Kite Connect",
    urls={
        "root_url": "https://api.kite.trade",
        "login_url": "https://kite.zerodha.com/connect/login",
        "ws_url": "wss://ws.kite.trade",  # order updates arrive as text frames on the market feed
        "instruments_url": "https://api.kite.trade/instruments",
    },
    # Kite regenerates the dump early each morning and advises fetching it after ~08:30 IST.
    master=_Master(published=(8, 30), parse=_zerodha_parse_master, headers={"X-Kite-Version": "3"}),
    auth=(
        _Flow("access_token", AuthMode.MANUAL, needs=("api_key", "access_token"), trigger=("access_token",),
              token="access_token", signs=("api_key",), app="api_key"),
        _Flow("request_token", AuthMode.MANUAL, needs=("api_key", "api_secret", "request_token"),
              trigger=("request_token",), obtain=_zerodha_exchange_token, single_use="request_token",
              signs=("api_key",), app="api_key"),
    ),
    session_expiry=(6, 0),
    routes={
        "login": _Route("POST", "/session/token", "form", signed=False, idempotent=False),
        "get_profile": _Route("GET", "/user/profile", parse=_zerodha_profile),
        "get_funds": _Route("GET", "/user/margins", parse=_zerodha_funds),
        "get_holdings": _Route("GET", "/portfolio/holdings", row=_zerodha_holding),
        "get_positions": _Route("GET", "/portfolio/positions", rows=_zerodha_position_rows, row=_zerodha_position),
        "get_orders": _Route("GET", "/orders", row=_zerodha_order),
        "get_order_history": _Route("GET", "/orders/{order_id}", about_order=True, build=_order_id_path,
                                    row=_zerodha_order),
        "get_trades": _Route("GET", "/trades", row=_zerodha_trade),
        "place_order": _Route("POST", "/orders/{variety}", "form", rate="orders", idempotent=False, about_order=True,
                              build=_zerodha_place_order, parse=_zerodha_placed),
        "modify_order": _Route("PUT", "/orders/{variety}/{order_id}", "form", rate="orders", about_order=True,
                               build=_zerodha_modify_order),
        "cancel_order": _Route("DELETE", "/orders/{variety}/{order_id}", rate="orders", about_order=True,
                               build=_zerodha_cancel_order),
        "calculate_margin": _Route("POST", "/margins/basket", "json", build=_zerodha_margin_body, parse=_zerodha_margin),
    },
    # https://kite.trade/docs/connect/v3/exceptions/#api-rate-limit: 10/s per api_key; orders
    # 10/s and 200/min.
    rate_limits={"default": [(10, 1.0)], "orders": [(10, 1.0), (200, 60.0)]},
    errors={  # https://kite.trade/docs/connect/v3/exceptions/
        "TokenException": AuthenticationError,
        "PermissionException": AuthenticationError,
        "UserException": BrokerError,  # "user account related errors": not the session's fault
        "TwoFAException": AuthenticationError,
        "InputException": BrokerError,
        "OrderException": OrderError,
        "MarginException": InsufficientFundsError,
        "HoldingException": InsufficientFundsError,
        "NetworkException": NetworkError,
        "DataException": BrokerError,
        "GeneralException": BrokerError,
    },
    order_errors={"InputException": InvalidOrderError},
    error_messages=(
        # The static-IP rule (SEBI, 2026) is reported under several error types: match the text.
        ("no ips configured", ConfigurationError),
        ("not in the list of allowed ips", ConfigurationError),
        ("too many requests", RateLimitError),
        ("insufficient funds", InsufficientFundsError),
        ("couldn't find that", OrderNotFoundError),
        ("order not found", OrderNotFoundError),
        ("invalid order_id", OrderNotFoundError),
    ),
    error_hints={
        "no ips configured": "orders are accepted only from the static IP registered for this Kite Connect app: add "
                             "this machine's public IP on the Kite developer console (https://developers.kite.trade)",
        "not in the list of allowed ips": "orders are accepted only from the static IP registered for this Kite "
                                          "Connect app: add this machine's public IP on the Kite developer console",
        "maximum quantity of": "the order is above the exchange freeze limit: pass slice=True to send it as several "
                               "orders",
    },
    rate_limit_texts=("too many requests",),
    retryable_codes=frozenset({"NetworkException", "DataException"}),
    exchanges=frozenset({Exchange.NSE, Exchange.BSE, Exchange.NFO, Exchange.BFO}),
    products=_KITE_PRODUCTS,
    order_types=_KITE_ORDER_TYPES,
    validities=("DAY", "IOC"),
    max_tag_len=20,
    max_slices=10,  # autoslice makes at most 10 orders (https://kite.trade/forum/discussion/15912)
    row_fields={"order_id": "order_id", "position_qty": "quantity", "exchange": "exchange", "symbol": "tradingsymbol"},
    has={"order_history": True, "margin": True, "margin_with_positions": True, "order_updates": True,
         "streaming": True, "native_slicing": True},
    stream_max_tokens=3000,
    stream_keepalive=None,  # the server sends a 1-byte heartbeat about every second
    stream_silence_timeout=5.0,
    stream_modes_additive=False,  # a "mode" message moves a token to the new mode
    hooks={
        "headers": _zerodha_headers,
        "envelope": _zerodha_envelope,
        "login_url": _zerodha_login_url,
        "reauth_hint": _zerodha_reauth_hint,
        "raw_status": _zerodha_raw_status,
        "freeze_limit": _zerodha_freeze_limit,
        "stream_connect": _zerodha_stream_connect,
        "stream_key": _zerodha_stream_key,
        "stream_subscribe": _zerodha_stream_subscribe,
        "stream_unsubscribe": _zerodha_stream_unsubscribe,
        "stream_decode": _zerodha_decode,
        "stream_text": _zerodha_stream_text,
    },
)


# ============================================================================
# 6b. Broker spec: AngelOne
# ============================================================================
# SmartAPI: https://smartapi.angelbroking.com/docs

_ANGEL_MASTER_KEYS = ("token", "symbol", "name", "expiry", "strike", "lotsize", "instrumenttype", "exch_seg", "tick_size")
_MONTHS = {m: i for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}


def _angelone_iso_date(raw: str) -> str:
    """``28JUL2026`` -> ``2026-07-28``."""
    if not isinstance(raw, str) or len(raw) != 9 or raw[2:5] not in _MONTHS:
        raise ValueError(f"expiry {raw!r} is not DDMMMYYYY")
    return _dt.date(int(raw[5:]), _MONTHS[raw[2:5]], int(raw[:2])).isoformat()


def _angelone_parse_master(f: IO[bytes], stats: _LoadStats) -> Iterator[_MasterRow]:
    """Parse AngelOne's OpenAPIScripMaster.json into canonical rows
    (https://smartapi.angelbroking.com/docs/Instruments).

    AngelOne gives strike and tick size in paise (x100) as strings; index rows carry the
    canonical name in ``name`` and a display name in ``symbol``.
    """
    expiries = _Memo(_angelone_iso_date)
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
                stats.skip(str(exchange))
                continue
            token, bsym, name = obj["token"], obj["symbol"], obj["name"]
            if not isinstance(token, str) or not token or not isinstance(bsym, str) or not bsym or not isinstance(name, str):
                raise ValueError(f"bad token {token!r}, symbol {bsym!r} or name {name!r}")
            lot = _lot(obj["lotsize"])
            tick = _tick(obj["tick_size"]) / 100
            # Older rows lack it; "0" (indices) means none is known.
            freeze = _lot(obj.get("freeze_qty") or "0")
            if not (lot and tick) and (exchange not in cash or kind != "I"):
                raise _untradable(lot, tick)
            if exchange in cash:
                if kind == "I":
                    yield ("I", exchange, _canonical_index_symbol(name or bsym), name or bsym, lot, tick, token, bsym,
                           None, None, None, None, 0)
                else:
                    symbol = bsym[:-3] if exchange == "NSE" and bsym.endswith("-EQ") else bsym
                    yield ("E", exchange, symbol.upper(), name or symbol, lot, tick, token, bsym, None, None, None, None,
                           freeze)
                continue
            underlying = name.strip().upper()
            if not underlying:
                raise ValueError("derivative row without an underlying name")
            expiry = expiries[obj["expiry"]]
            assert shape is not None  # derivative rows only reach here
            if shape[0] == "F":
                yield ("F", exchange, underlying, name, lot, tick, token, bsym, expiry, shape[1], None, None, freeze)
            else:
                strike = _positive_number(obj["strike"]) / 100
                otype = bsym[-2:]
                if otype not in ("CE", "PE"):
                    raise ValueError(f"option type {otype!r}")
                yield ("O", exchange, underlying, name, lot, tick, token, bsym, expiry, shape[1], strike, otype, freeze)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            stats.bad(line, f"{exc.__class__.__name__}: {_short(str(exc), 80)}")
        except (OverflowError, RecursionError) as exc:  # a number beyond a float, a row nested too deep
            stats.bad(line, exc.__class__.__name__)


_ANGEL_PRODUCTS = {ProductType.CNC: "DELIVERY", ProductType.MIS: "INTRADAY", ProductType.NRML: "CARRYFORWARD"}
_ANGEL_ORDER_TYPES = {OrderType.MARKET: "MARKET", OrderType.LIMIT: "LIMIT", OrderType.SL: "STOPLOSS_LIMIT",
                      OrderType.SL_M: "STOPLOSS_MARKET"}
_ANGEL_PRODUCT_OF = _reverse(_ANGEL_PRODUCTS)
_ANGEL_ORDER_TYPE_OF = _reverse(_ANGEL_ORDER_TYPES)
_ANGEL_SIDE_OF = {"BUY": Side.BUY, "SELL": Side.SELL}
# AngelOne's (NEST) order states, lower case with spaces
# (https://smartapi.angelbroking.com/docs/Orders); keys are upper-cased here.
_ANGEL_STATUSES = {
    "PUT ORDER REQ RECEIVED": OrderStatus.PENDING,
    "VALIDATION PENDING": OrderStatus.PENDING,
    "OPEN PENDING": OrderStatus.PENDING,
    "AFTER MARKET ORDER REQ RECEIVED": OrderStatus.PENDING,
    "OPEN": OrderStatus.OPEN,
    "MODIFY VALIDATION PENDING": OrderStatus.OPEN,
    "MODIFY PENDING": OrderStatus.OPEN,
    "MODIFIED": OrderStatus.OPEN,
    "NOT MODIFIED": OrderStatus.OPEN,
    "CANCEL PENDING": OrderStatus.OPEN,
    "NOT CANCELLED": OrderStatus.OPEN,
    "MODIFY AFTER MARKET ORDER REQ RECEIVED": OrderStatus.PENDING,
    "TRIGGER PENDING": OrderStatus.TRIGGER_PENDING,
    "COMPLETE": OrderStatus.COMPLETE,
    "CANCELLED": OrderStatus.CANCELLED,
    "CANCELLED AFTER MARKET ORDER": OrderStatus.CANCELLED,
    "REJECTED": OrderStatus.REJECTED,
}
_ANGEL_TIME = "%d-%b-%Y %H:%M:%S"  # "20-Oct-2020 13:10:59"
_MAC_ADDRESS: List[str] = []


def _angelone_mac() -> str:
    if not _MAC_ADDRESS:  # computed once per process: uuid's node lookup can touch the system
        import uuid

        node = uuid.getnode()
        _MAC_ADDRESS.append(":".join(f"{(node >> shift) & 0xFF:02x}" for shift in range(40, -8, -8)))
    return _MAC_ADDRESS[0]


def _angelone_header_option(config: Mapping[str, Any], key: str) -> str:
    """An address option as its header carries it ("" when not set). Options are not credentials,
    so nothing checked them: an int raised a raw TypeError in requests, a newline a NetworkError."""
    value = config.get(key)
    if not value:
        return ""
    if not (isinstance(value, str) and value.isascii() and value.isprintable()):
        raise ConfigurationError(f"config {key!r} must be printable ASCII text (it is sent as a header), got "
                                 f"{_short(repr(value), 60)}")
    return value


def _angelone_headers(config: Mapping[str, Any], session: Optional[SessionData], route: _Route) -> Dict[str, str]:
    # AngelOne requires these on every call but does not validate the address values
    # (https://smartapi.angelbroking.com/docs/User).
    headers = {
        "Content-Type": "application/json", "Accept": "application/json", "X-UserType": "USER", "X-SourceID": "WEB",
        "X-ClientLocalIP": _angelone_header_option(config, "client_local_ip") or "127.0.0.1",
        "X-ClientPublicIP": _angelone_header_option(config, "client_public_ip") or "127.0.0.1",
        "X-MACAddress": _angelone_header_option(config, "mac_address") or _angelone_mac(),
        "X-PrivateKey": config.get("api_key") or "",
    }
    if session is not None:
        headers["Authorization"] = f"Bearer {session.access_token}"
    return headers


def _angelone_envelope(status: int, body: Dict[str, Any]) -> _Reply:
    """Two dialects: ``status``/``errorcode`` and the gateway's ``success``/``errorCode``."""
    ok = body.get("status", body.get("success"))
    code = str(body.get("errorcode") or body.get("errorCode") or "")
    if ok is True and status < 400 and not code:
        return _Reply(True, body.get("data"), "", "")
    message = str(body.get("message") or "no message")
    if ok is None:  # e.g. a static-IP refusal: no status key at all
        message = f"unexpected reply without a status: {message}"
    return _Reply(False, None, code, message)


def _angelone_raw_jwt(token: str) -> str:
    """The SDK hands out ``"Bearer eyJ..."``; the header needs exactly one prefix."""
    token = token.strip()
    return token[len("Bearer "):].strip() if token.startswith("Bearer ") else token


def _angelone_session(data: Any, now: float, client_id: Optional[str], where: str) -> SessionData:
    jwt = _angelone_raw_jwt(_secret_field(data, "jwtToken", where))
    return SessionData(broker="angelone", mode=AuthMode.AUTO, access_token=jwt,
                       refresh_token=_secret_field(data, "refreshToken", where, required=False) or None,
                       feed_token=_secret_field(data, "feedToken", where, required=False) or None,
                       obtained_at=_dt.datetime.fromtimestamp(now, IST), user_id=client_id)


def _angelone_login(call: _Call, config: Mapping[str, Any], now: float) -> SessionData:
    """Log in with client code + PIN + TOTP (https://smartapi.angelbroking.com/docs/User)."""
    try:
        import pyotp
    except ImportError:
        raise UnsupportedFeatureError("AngelOne auto login needs pyotp: pip install pyotp") from None
    try:
        code = pyotp.TOTP(config["totp_secret"].replace(" ", "")).at(now)
    except (ValueError, TypeError) as exc:  # binascii.Error (bad base32) is a ValueError
        raise ConfigurationError("config 'totp_secret' is not a base32 TOTP secret (the text under the QR code)") from exc
    data = call("login", _Request(body={"clientcode": config["client_id"], "password": config["pin"], "totp": code}))
    return _angelone_session(data, now, config["client_id"], "angelone login")


def _angelone_renew(call: _Call, config: Mapping[str, Any], session: SessionData, now: float) -> SessionData:
    """Trade the refresh token for a new JWT/feed token."""
    data = call("renew_token", _Request(body={"refreshToken": session.refresh_token}), session=session)
    return _angelone_session(data, now, session.user_id, "angelone renew_token")


def _angelone_login_url(config: Mapping[str, Any], base: str) -> str:
    """The publisher login page; it redirects with auth_token (the JWT) and feed_token."""
    from urllib.parse import urlencode

    _require_config(config, ("api_key",), "the angelone login URL")
    params = {"api_key": config["api_key"]}
    params.update({k: config[k] for k in ("redirect_url", "state") if config.get(k)})
    return f"{base}?{urlencode(params)}"


def _angelone_reauth_hint(config: Mapping[str, Any], base: str) -> str:
    return ("AngelOne sessions end at midnight IST: pass a fresh JWT as 'access_token', or give 'client_id', "
            "'pin' and 'totp_secret' (auth_mode='auto') and ttconnect logs in by itself")


def _angelone_profile(ctx: _Ctx, data: Any) -> Profile:
    data = _object(data)
    # AngelOne lists segments as nse_cm, nse_fo, bse_cm, bse_fo, mcx_fo, cde_fo...
    segments = {"nse_cm": Exchange.NSE, "bse_cm": Exchange.BSE, "nse_fo": Exchange.NFO, "bse_fo": Exchange.BFO,
                "mcx_fo": Exchange.MCX, "cde_fo": Exchange.CDS}
    exchanges = _declared_order(Exchange, (segments[e] for e in data.get("exchanges") or () if e in segments))
    products = _declared_order(ProductType, (_ANGEL_PRODUCT_OF.get(p) or ProductType(p) for p in data.get("products") or ()
                                             if p in _ANGEL_PRODUCT_OF or p in ProductType.__members__))
    return Profile(user_id=_str_field(data, "clientcode"), name=str(data.get("name") or "").strip(),
                   email=data.get("email") or None, broker="angelone", exchanges=exchanges, products=products, raw=data)


def _angelone_funds(ctx: _Ctx, data: Any) -> Fund:
    data = _object(data)
    available, debits = _required_num(data, "net"), _num_at(data, "utiliseddebits") or 0.0
    return Fund(available=available, used=debits, total=_paise(available + debits), collateral=_num_at(data, "collateral"),
                m2m_unrealized=_num_at(data, "m2munrealized"), m2m_realized=_num_at(data, "m2mrealized"),
                utilised_debits=debits, raw=data)


def _angelone_holding_rows(data: Any) -> Sequence[Any]:
    if not isinstance(data, Mapping):
        return _list_rows(data)
    if "holdings" not in data:  # totals without the rows: "no holdings" would be a guess
        raise _Malformed("field 'holdings' missing")
    return _list_rows(data["holdings"])


def _angelone_holding(ctx: _Ctx, row: Mapping[str, Any]) -> Holding:
    qty = _int_at(row, "quantity") + _int_at(row, "t1quantity")
    avg, ltp = _num_at(row, "averageprice") or 0.0, _num_at(row, "ltp")
    return Holding(instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")), qty=qty,
                   avg_price=avg, ltp=ltp, pnl=_num_at(row, "profitandloss"),
                   pnl_percent=_pnl_percent(avg, ltp, row.get("pnlpercentage")), raw=row)


def _angelone_position(ctx: _Ctx, row: Mapping[str, Any]) -> Position:
    pnl = _num_at(row, "pnl")
    if pnl is None and (row.get("realised") is not None or row.get("unrealised") is not None):
        pnl = _paise((_num_at(row, "realised") or 0.0) + (_num_at(row, "unrealised") or 0.0))
    avg = _num_at(row, "avgnetprice") or _num_at(row, "netprice") or 0.0
    return Position(instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")),
                    qty=_int_at(row, "netqty"), avg_price=avg, ltp=_num_at(row, "ltp"), pnl=pnl,
                    product=_ANGEL_PRODUCT_OF.get(row.get("producttype")), raw=row)


def _angelone_raw_status(row: Mapping[str, Any]) -> OrderStatus:
    return _order_status(row.get("orderstatus") or row.get("status") or "", _ANGEL_STATUSES, row, "filledshares",
                         "quantity")


def _angelone_order(ctx: _Ctx, row: Mapping[str, Any]) -> Order:
    qty, filled = _int_at(row, "quantity"), _int_at(row, "filledshares")
    status = _angelone_raw_status(row)
    return Order(
        id=_str_field(row, "orderid"), instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")),
        side=_mapped(_ANGEL_SIDE_OF, row, "transactiontype"), qty=qty, filled_qty=filled,
        pending_qty=_int_at(row, "unfilledshares") if status in _LIVE_STATUSES else 0,
        order_type=_mapped(_ANGEL_ORDER_TYPE_OF, row, "ordertype"), product=_ANGEL_PRODUCT_OF.get(row.get("producttype")),
        status=status, price=_num_at(row, "price") or None, trigger_price=_num_at(row, "triggerprice") or None,
        average_price=_num_at(row, "averageprice") or None, tag=row.get("ordertag") or None,
        status_message=row.get("text") or None,
        placed_at=_ist(row.get("exchtime"), _ANGEL_TIME) or _ist(row.get("updatetime"), _ANGEL_TIME),
        updated_at=_ist(row.get("exchorderupdatetime"), _ANGEL_TIME) or _ist(row.get("updatetime"), _ANGEL_TIME),
        raw=row,
    )


def _angelone_one_order(ctx: _Ctx, data: Any) -> Order:
    return _angelone_order(ctx, _object(data))


def _angelone_order_ref(row: Mapping[str, Any]) -> Optional[str]:
    """One order's details are addressed by ``uniqueorderid`` (in place replies and book rows),
    not by the order id (https://smartapi.angelbroking.com/topic/4013)."""
    ref = row.get("uniqueorderid")
    return str(ref) if ref else None


def _angelone_details(ref: str) -> _Request:
    return _Request(path={"uniqueorderid": ref})


def _angelone_trade(ctx: _Ctx, row: Mapping[str, Any]) -> Trade:
    qty, price = _int_at(row, "fillsize"), _num_at(row, "fillprice") or 0.0
    stamp = None
    if row.get("filltime"):  # time only ("13:27:53"): the trade book holds today's fills only
        try:
            when = _dt.datetime.strptime(str(row["filltime"]), "%H:%M:%S").time()
        except ValueError:
            raise _Malformed(f"field 'filltime' is {row['filltime']!r}, expected HH:MM:SS") from None
        stamp = _dt.datetime.combine(ctx.today(), when, IST)
    return Trade(trade_id=_str_field(row, "fillid"), order_id=_str_field(row, "orderid"),
                 instrument=ctx.instrument(_field(row, "exchange"), _field(row, "tradingsymbol")),
                 side=_mapped(_ANGEL_SIDE_OF, row, "transactiontype"), qty=qty, avg_price=price,
                 trade_value=_num_at(row, "tradevalue") or _paise(qty * price),
                 product=_ANGEL_PRODUCT_OF.get(row.get("producttype")), timestamp=stamp, raw=row)


def _angelone_margin(ctx: _Ctx, data: Any) -> Margin:
    data = _object(data)
    parts = _object(data.get("marginComponents") or {}, "marginComponents")
    final_total = _required_num(data, "totalMarginRequired")
    benefit = _num_at(parts, "marginBenefit") or 0.0
    # AngelOne reports the requirement after the benefit plus the benefit itself; it has no
    # exposure figure.
    return Margin(total=_paise(final_total + benefit), span=_num_at(parts, "spanMargin"), exposure=None,
                  option_premium=_num_at(parts, "totOptionsPremium"), final_total=final_total, benefit=benefit, raw=data)


def _angelone_variety(order_type: OrderType) -> str:
    return "STOPLOSS" if order_type in (OrderType.SL, OrderType.SL_M) else "NORMAL"


def _angelone_book_variety(raw: Mapping[str, Any], order_type: Optional[OrderType]) -> str:
    """The variety to modify or cancel an order with. The book shows AMO orders as "AMO", but
    place, modify and cancel take them as NORMAL (or STOPLOSS): "AMO" is refused
    (admin, https://smartapi.angelbroking.com/topic/5177/update-on-amo-and-normal-order-api-changes/1)."""
    variety = str(raw.get("variety") or "")
    if variety and variety != "AMO":
        return variety
    if order_type is None:
        order_type = OrderType.SL if str(raw.get("ordertype", "")).startswith("STOPLOSS") else OrderType.LIMIT
    return _angelone_variety(order_type)


def _angelone_place_order(req: _OrderRequest) -> _Request:
    body = {
        "variety": _angelone_variety(req.order_type), "tradingsymbol": req.broker_symbol, "symboltoken": req.token,
        "transactiontype": req.side.value, "exchange": req.instrument.exchange.value,
        "ordertype": _ANGEL_ORDER_TYPES[req.order_type], "producttype": _ANGEL_PRODUCTS[_product(req)],
        "duration": req.validity, "price": _price_text(req.price), "triggerprice": _price_text(req.trigger_price),
        "quantity": str(req.qty), "squareoff": "0", "stoploss": "0", "ordertag": req.tag,
    }
    return _Request(body=body)


def _angelone_placed(ctx: _Ctx, data: Any) -> str:
    return _str_field(_object(data), "orderid")


def _angelone_modify_order(current: Order, req: _OrderRequest) -> _Request:
    # AngelOne wants the whole order restated, under the variety it was placed with
    # (https://smartapi.angelbroking.com/docs/Orders).
    raw = current.raw
    body = {
        "variety": _angelone_book_variety(raw, current.order_type), "orderid": current.id,
        "ordertype": _ANGEL_ORDER_TYPES[req.order_type],
        "producttype": raw.get("producttype") or _ANGEL_PRODUCTS[current.product or ProductType.MIS],
        "duration": raw.get("duration") or "DAY", "price": _price_text(req.price), "quantity": str(req.qty),
        "tradingsymbol": req.broker_symbol, "symboltoken": req.token, "exchange": current.instrument.exchange.value,
    }
    if req.trigger_price is not None:
        body["triggerprice"] = _price_text(req.trigger_price)
    return _Request(body=body)


def _angelone_cancel_order(order_id: str, raw: Mapping[str, Any]) -> _Request:
    return _Request(body={"variety": _angelone_book_variety(raw, None), "orderid": order_id})


def _angelone_margin_body(legs: Sequence[_OrderRequest], consider_positions: bool) -> _Request:
    positions = [
        {"exchange": leg.instrument.exchange.value, "qty": leg.qty, "price": float(leg.price or 0),
         "productType": _ANGEL_PRODUCTS[_product(leg)], "token": leg.token, "tradeType": leg.side.value,
         "orderType": _ANGEL_ORDER_TYPES[leg.order_type]}
        for leg in legs
    ]
    return _Request(body={"positions": positions})


# SmartWebSocketV2 (https://smartapi.angelbroking.com/docs/WebSocket2): one little-endian packet
# per binary frame; its length says the mode. Prices in paise; the exchange timestamp in ms. The
# best-five block is 5 buy then 5 sell levels of (flag, qty, price, orders); the flag is skipped.
_ANGEL_LTP = struct.Struct("<BB25sqqq")
_ANGEL_QUOTE = struct.Struct("<BB25sqqqqqqddqqqq")
_ANGEL_SNAP = struct.Struct("<BB25sqqqqqqddqqqqqqd" + "2xqqh" * 10 + "qqqq")
_ANGEL_EXCHANGE_TYPES = {Exchange.NSE: 1, Exchange.NFO: 2, Exchange.BSE: 3, Exchange.BFO: 4, Exchange.MCX: 5,
                         Exchange.CDS: 13}
_ANGEL_MODES = {"ltp": 1, "quote": 2, "full": 3}
_ANGEL_DIVISORS = {13: 10_000_000.0}  # currency derivatives; everything else is in paise


def _angelone_decode(data: bytes, instruments: Mapping[Any, Instrument], out: List[Tick]) -> None:
    """Decode one binary frame (one packet) into ``out``; raise _FrameError if malformed."""
    size = len(data)
    if size not in (51, 123, 379):
        if size < 2:  # the server's one-byte keep-alive (b"\x00", brokers/angelone.md 7.3): no packet
            return
        raise _FrameError(f"packet of {size} bytes (expected 51, 123 or 379)")
    instrument = instruments.get(data[1:27])  # exchange type + 25-byte token: the subscription key
    if instrument is None:
        # The token ends at its first NUL (the official SDK reads it so): what follows is not
        # part of it, and need not be NULs. Looked at only on a miss, off the usual path.
        token = data[2:27].partition(b"\0")[0]
        instrument = instruments.get(data[1:2] + token.ljust(25, b"\0"))
        if instrument is None:
            return
    div = _ANGEL_DIVISORS.get(data[1], 100.0)
    if size == 379:
        v = _ANGEL_SNAP.unpack_from(data)
        ltp, close = v[5] / div, v[14] / div
        # The last-traded timestamp's unit is undocumented: seconds in observed data; a
        # millisecond value is read as such rather than dated 50,000 years out.
        traded = v[15] / 1000 if v[15] > 10**11 else v[15]
        tick = _TickBuilder(instrument, "full", ltp, v[6], v[7] / div, v[8], int(v[9]), int(v[10]), v[11] / div,
                            v[12] / div, v[13] / div, close, (ltp - close) * 100 / close if close else None, v[16], None,
                            None, traded, v[4] / 1000, (v[18:33], v[33:48], div))
    elif size == 123:
        v = _ANGEL_QUOTE.unpack_from(data)
        ltp, close = v[5] / div, v[14] / div
        tick = _TickBuilder(instrument, "quote", ltp, v[6], v[7] / div, v[8], int(v[9]), int(v[10]), v[11] / div,
                            v[12] / div, v[13] / div, close, (ltp - close) * 100 / close if close else None,
                            None, None, None, 0, v[4] / 1000)
    else:
        v = _ANGEL_LTP.unpack_from(data)
        tick = _TickBuilder(instrument, "ltp", v[5] / div, _exchange_epoch=v[4] / 1000)
    tick.__class__ = Tick
    out.append(tick)


def _angelone_stream_headers(config: Mapping[str, Any], session: SessionData) -> Dict[str, str]:
    missing = [k for k, v in (("client_id", config.get("client_id")), ("feed_token", session.feed_token)) if not v]
    if missing:
        raise ConfigurationError(f"AngelOne streaming needs {' and '.join(repr(m) for m in missing)} in the config "
                                 "(auth_mode 'auto' obtains the feed token by itself)")
    return {"Authorization": f"Bearer {session.access_token}", "x-api-key": config.get("api_key", ""),
            "x-client-code": config["client_id"], "x-feed-token": str(session.feed_token)}


def _angelone_stream_connect(call: _Call, config: Mapping[str, Any], session: SessionData, url: str
                             ) -> Tuple[str, Dict[str, str]]:
    return url, _angelone_stream_headers(config, session)


def _angelone_order_stream_connect(call: _Call, config: Mapping[str, Any], session: SessionData, url: str
                                   ) -> Tuple[str, Dict[str, str]]:
    # The order-status socket takes the JWT alone (admin, https://smartapi.angelbroking.com/topic/4041;
    # the Java SDK's OrderUpdateWebsocket sends nothing else).
    return url, {"Authorization": f"Bearer {session.access_token}"}


def _angelone_stream_key(instrument: Instrument, token: str) -> bytes:
    return bytes([_ANGEL_EXCHANGE_TYPES[instrument.exchange]]) + token.encode().ljust(25, b"\0")


def _angelone_stream_requests(action: int, items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    import json

    groups: Dict[Tuple[int, int], List[str]] = {}
    for instrument, token, mode in items:
        groups.setdefault((_ANGEL_MODES[mode], _ANGEL_EXCHANGE_TYPES[instrument.exchange]), []).append(token)
    by_mode: Dict[int, List[Dict[str, Any]]] = {}
    for (mode_code, exchange_type), tokens in groups.items():
        by_mode.setdefault(mode_code, []).append({"exchangeType": exchange_type, "tokens": tokens})
    return [json.dumps({"correlationID": f"tt{mode_code}{action}", "action": action,
                        "params": {"mode": mode_code, "tokenList": token_list}})
            for mode_code, token_list in sorted(by_mode.items())]


def _angelone_stream_subscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    return _angelone_stream_requests(1, items)


def _angelone_stream_unsubscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    return _angelone_stream_requests(0, items)


def _angelone_stream_text(text: str) -> Tuple[str, Any]:
    """Market-feed text frames: the ``pong`` heartbeat reply, or a JSON error (E1001, E1002)."""
    if text.strip() == "pong":
        return "pong", None
    message = _json_object(text)
    if message is not None and message.get("errorCode"):
        return "error", f"{message['errorCode']}: {message.get('errorMessage') or ''}".strip()
    return "unknown", text


def _angelone_order_text(text: str) -> Tuple[str, Any]:
    """Order-status socket: JSON with ``orderData``; the AB00 greeting has an empty one."""
    message = _json_object(text)
    if message is None:
        return "unknown", text
    data = message.get("orderData")
    if isinstance(data, dict) and data.get("orderid"):
        return "order", data
    if message.get("order-status") == "AB00":
        return "connected", None
    if message.get("error-message"):
        return "error", str(message["error-message"])
    return "unknown", text


_ANGEL_API = "/rest/secure/angelbroking"

_ANGELONE: BrokerSpec = _broker(
    id="angelone",
    name="AngelOne SmartAPI",
    urls={
        "root_url": "https://apiconnect.angelone.in",
        "login_url": "https://smartapi.angelone.in/publisher-login",
        "ws_url": "wss://smartapisocket.angelone.in/smart-stream",
        "order_ws_url": "wss://tns.angelone.in/smart-order-update",
        "instruments_url": "https://margincalculator.angelbroking.com/OpenAPI_File/files/OpenAPIScripMaster.json",
    },
    master=_Master(published=(8, 0), parse=_angelone_parse_master),
    auth=(
        _Flow("totp", AuthMode.AUTO, needs=("api_key", "client_id", "pin", "totp_secret"), trigger=("pin", "totp_secret"),
              obtain=_angelone_login, user="client_id", signs=("api_key",), app="api_key"),
        _Flow("access_token", AuthMode.MANUAL, needs=("api_key", "access_token"), trigger=("access_token",),
              token="access_token", session_keys={"feed_token": "feed_token"}, user="client_id", signs=("api_key",), app="api_key"),
    ),
    session_expiry=(0, 0),
    routes={
        "login": _Route("POST", "/rest/auth/angelbroking/user/v1/loginByPassword", "json", rate="login", signed=False,
                        idempotent=False),
        "renew_token": _Route("POST", "/rest/auth/angelbroking/jwt/v1/generateTokens", "json", rate="renew",
                              signed=False, idempotent=False),
        "get_profile": _Route("GET", _ANGEL_API + "/user/v1/getProfile", rate="profile", parse=_angelone_profile),
        "get_funds": _Route("GET", _ANGEL_API + "/user/v1/getRMS", rate="funds", parse=_angelone_funds),
        "get_holdings": _Route("GET", _ANGEL_API + "/portfolio/v1/getAllHolding", rate="holdings",
                               rows=_angelone_holding_rows, row=_angelone_holding),
        "get_positions": _Route("GET", _ANGEL_API + "/order/v1/getPosition", rate="positions", row=_angelone_position),
        "get_orders": _Route("GET", _ANGEL_API + "/order/v1/getOrderBook", rate="order_book", row=_angelone_order),
        "get_order": _Route("GET", _ANGEL_API + "/order/v1/details/{uniqueorderid}", rate="details", about_order=True,
                            build=_angelone_details, parse=_angelone_one_order),
        "get_trades": _Route("GET", _ANGEL_API + "/order/v1/getTradeBook", rate="trade_book", row=_angelone_trade),
        "place_order": _Route("POST", _ANGEL_API + "/order/v1/placeOrder", "json", rate="orders", idempotent=False,
                              about_order=True, build=_angelone_place_order, parse=_angelone_placed),
        "modify_order": _Route("POST", _ANGEL_API + "/order/v1/modifyOrder", "json", rate="orders", about_order=True,
                               build=_angelone_modify_order),
        "cancel_order": _Route("POST", _ANGEL_API + "/order/v1/cancelOrder", "json", rate="orders", about_order=True,
                               build=_angelone_cancel_order),
        "calculate_margin": _Route("POST", _ANGEL_API + "/margin/v1/batch", "json", rate="margin",
                                   build=_angelone_margin_body, parse=_angelone_margin),
    },
    # Per client code, from AngelOne's rate-limit table
    # (https://smartapi.angelbroking.com/docs/RateLimit); place, modify and cancel share one budget.
    rate_limits={
        "default": [(1, 1.0)],
        "login": [(1, 1.0)],
        "renew": [(1, 1.0), (1000, 3600.0)],
        "profile": [(3, 1.0), (1000, 3600.0)],
        "funds": [(2, 1.0)],
        "holdings": [(1, 1.0)],
        "positions": [(1, 1.0)],
        "order_book": [(1, 1.0)],
        "details": [(10, 1.0), (500, 60.0), (5000, 3600.0)],
        "trade_book": [(1, 1.0)],
        "orders": [(9, 1.0), (500, 60.0), (1000, 3600.0)],
        "margin": [(10, 1.0), (500, 60.0), (5000, 3600.0)],
    },
    errors={  # https://smartapi.angelbroking.com/docs/Exceptions
        "AG8001": AuthenticationError, "AG8002": AuthenticationError, "AG8003": AuthenticationError,
        "AG8004": AuthenticationError, "AB8050": AuthenticationError, "AB8051": AuthenticationError,
        "AB1000": AuthenticationError, "AB1001": AuthenticationError, "AB1002": AuthenticationError,
        "AB1010": AuthenticationError, "AB1011": AuthenticationError, "AB1031": AuthenticationError,
        "AB1032": AuthenticationError, "AB1050": AuthenticationError,
        "AB1005": ConfigurationError,
        "AB1003": BrokerError, "AB1004": BrokerError, "AB1006": BrokerError, "AB1007": BrokerError,
        "AB2000": BrokerError, "AB2001": BrokerError,
        "AB1008": InvalidOrderError, "AB1012": InvalidOrderError, "AB4008": InvalidOrderError,
        "AB1009": InstrumentNotFoundError, "AB1018": InstrumentNotFoundError, "AB4018": InstrumentNotFoundError,
        "AB1013": OrderNotFoundError, "AB1014": BrokerError, "AB1015": BrokerError, "AB1016": BrokerError,
        "AB1017": OrderError, "AB2002": OrderError,
        "AB1021": RateLimitError,
        "AG7002": ConfigurationError,  # unregistered IP: not the session's fault
    },
    error_messages=(("exceeding access rate", RateLimitError), ("too many requests", RateLimitError),
                    ("insufficient fund", InsufficientFundsError), ("unregistered ip", ConfigurationError),
                    # the details route answers an unknown id with AB1007 "Order not found"
                    ("order not found", OrderNotFoundError)),
    error_hints={
        "AG7002": "AngelOne accepts this app's calls only from its registered static IP: register this machine's "
                  "public IP for the app on https://smartapi.angelbroking.com (My Profile / apps)",
    },
    rate_limit_texts=("exceeding access rate", "exceeding rate limit", "too many requests"),
    # "Order/Trade/Holding/Position not found" is how AngelOne says "the list is empty".
    empty_codes=frozenset({"AB1013", "AB1014", "AB1015", "AB1016"}),
    retryable_codes=frozenset({"AB1004", "AB2001"}),
    exchanges=frozenset({Exchange.NSE, Exchange.BSE, Exchange.NFO, Exchange.BFO}),
    products=_ANGEL_PRODUCTS,
    order_types=_ANGEL_ORDER_TYPES,
    validities=("DAY", "IOC"),
    max_tag_len=19,  # "ordertag length should be less than 20 characters" (AB4008)
    row_fields={"order_id": "orderid", "position_qty": "netqty", "exchange": "exchange", "symbol": "tradingsymbol"},
    options=("client_local_ip", "client_public_ip", "mac_address", "redirect_url", "state"),
    has={"auto_auth": True, "margin": True, "order_updates": True, "streaming": True},
    stream_max_tokens=1000,
    stream_keepalive="ping",  # answered by a text "pong"
    stream_silence_timeout=10.0,
    stream_modes_additive=True,  # one tick per subscribed mode
    hooks={
        "headers": _angelone_headers,
        "envelope": _angelone_envelope,
        "manual_token": _angelone_raw_jwt,
        "login_url": _angelone_login_url,
        "reauth_hint": _angelone_reauth_hint,
        "renew": _angelone_renew,
        "raw_status": _angelone_raw_status,
        "order_ref": _angelone_order_ref,
        "stream_connect": _angelone_stream_connect,
        "stream_key": _angelone_stream_key,
        "stream_subscribe": _angelone_stream_subscribe,
        "stream_unsubscribe": _angelone_stream_unsubscribe,
        "stream_decode": _angelone_decode,
        "stream_text": _angelone_stream_text,
        "order_stream_connect": _angelone_order_stream_connect,
        "order_stream_text": _angelone_order_text,
    },
)


# ============================================================================
# 6c. Broker spec: Upstox
# ============================================================================
# Upstox API v2/v3: https://upstox.com/developer/api-documentation/ (the official SDK,
# upstox-python-sdk, settles what the pages leave open).

_UPSTOX_SEGMENTS = {  # master segment -> canonical exchange; every other segment is counted and skipped
    "NSE_EQ": "NSE", "BSE_EQ": "BSE", "NSE_INDEX": "NSE", "BSE_INDEX": "BSE", "NSE_FO": "NFO", "BSE_FO": "BFO",
}
_UPSTOX_MASTER_KEYS = ("segment", "instrument_key", "instrument_type", "trading_symbol")
_UPSTOX_MIN_EXPIRY_MS = 946684800000  # 2000-01-01 UTC: no listed contract expires before it


def _upstox_parse_master(f: IO[bytes], stats: _LoadStats) -> Iterator[_MasterRow]:
    """Parse Upstox's BOD master (``complete.json.gz``: one gzipped JSON array) into canonical rows.

    Streamed: the gzip stream feeds the chunked array reader. Tick sizes are in paise, expiries
    epoch milliseconds at 23:59:59 IST of the expiry day; an instrument's token is its
    ``instrument_key`` (``NSE_FO|43920``, ``NSE_EQ|INE002A01018``, ``NSE_INDEX|Nifty 50``).
    """
    import gzip
    import zlib

    head = f.read(2)
    f.seek(0)
    # Served as application/gzip (not Content-Encoding); a proxy that unpacked it gives plain JSON.
    stream: Any = gzip.GzipFile(fileobj=f, mode="rb") if head == b"\x1f\x8b" else f
    try:
        yield from _upstox_rows(_iter_json_array(stream), stats)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise _MasterFormatError(f"not a readable gzip file ({exc.__class__.__name__}: {_short(str(exc), 80)})") from None


def _upstox_rows(objects: Iterator[Any], stats: _LoadStats) -> Iterator[_MasterRow]:
    expiries: Dict[Any, str] = {}
    line = 0
    for obj in objects:
        line += 1
        if line == 1 and isinstance(obj, dict):
            missing = [k for k in _UPSTOX_MASTER_KEYS if k not in obj]
            if missing:
                raise _MasterFormatError(f"not an Upstox instrument master: key(s) {', '.join(missing)} missing")
        try:
            segment = obj["segment"]
            exchange = _UPSTOX_SEGMENTS.get(segment) if isinstance(segment, str) else None
            if exchange is None:
                stats.skip(str(segment))
                continue
            key, tsym, itype = obj["instrument_key"], obj["trading_symbol"], obj["instrument_type"]
            if not (isinstance(key, str) and key and isinstance(tsym, str) and tsym and isinstance(itype, str)):
                raise ValueError(f"bad instrument_key {key!r}, trading_symbol {tsym!r} or instrument_type {itype!r}")
            if segment.endswith("_INDEX"):
                name = obj.get("name") or tsym
                yield ("I", exchange, _canonical_index_symbol(tsym), str(name), 0, 0.0, key, tsym, None, None, None,
                       None, 0)
                continue
            lot = _whole(obj["lot_size"], "lot_size")
            tick = _tick(str(obj["tick_size"])) / 100  # paise
            freeze = _whole(obj.get("freeze_quantity") or 0, "freeze_quantity")
            if not (lot and tick):  # index rows were filed above
                raise _untradable(lot, tick)
            if segment.endswith("_EQ"):
                # NSE shows the series only in instrument_type: other series keep it as a suffix.
                symbol = tsym if segment == "BSE_EQ" or itype == "EQ" else f"{tsym}-{itype}"
                yield ("E", exchange, symbol.upper(), str(obj.get("name") or tsym), lot, tick, key, tsym, None, None,
                       None, None, freeze)
                continue
            underlying = str(obj.get("underlying_symbol") or obj.get("asset_symbol") or obj.get("name") or "").strip().upper()
            if not underlying:
                raise ValueError("derivative row without an underlying")
            stamp = obj["expiry"]
            expiry = expiries.get(stamp)
            if expiry is None:
                # seconds (or any unit but ms) would read as a January 1970 contract
                if isinstance(stamp, bool) or not isinstance(stamp, int) or stamp < _UPSTOX_MIN_EXPIRY_MS:
                    raise ValueError(f"expiry {stamp!r} is not epoch milliseconds of a date after 2000")
                expiry = expiries[stamp] = _dt.datetime.fromtimestamp(stamp / 1000, IST).date().isoformat()
            und_kind = "I" if obj.get("underlying_type") == "INDEX" or underlying in _INDEX_UNDERLYINGS else "E"
            if itype == "FUT":
                yield ("F", exchange, underlying, underlying, lot, tick, key, tsym, expiry, und_kind, None, None, freeze)
            elif itype in ("CE", "PE"):
                strike = _positive_number(str(obj["strike_price"]))
                yield ("O", exchange, underlying, underlying, lot, tick, key, tsym, expiry, und_kind, strike, itype,
                       freeze)
            else:
                raise ValueError(f"instrument_type {itype!r}")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError) as exc:
            # (OSError: an expiry beyond what the platform's clock can date)
            stats.bad(line, f"{exc.__class__.__name__}: {_short(str(exc), 80)}")


_UPSTOX_ORDER_TYPES = {OrderType.MARKET: "MARKET", OrderType.LIMIT: "LIMIT", OrderType.SL: "SL", OrderType.SL_M: "SL-M"}
_UPSTOX_ORDER_TYPE_OF = _reverse(_UPSTOX_ORDER_TYPES)
_UPSTOX_SIDE_OF = {"BUY": Side.BUY, "SELL": Side.SELL}
# Product D is delivery on cash and carry-forward on derivatives; I is intraday.
_UPSTOX_PRODUCTS = {ProductType.CNC: "D", ProductType.NRML: "D", ProductType.MIS: "I"}
_UPSTOX_EXCHANGES = {"NSE": Exchange.NSE, "BSE": Exchange.BSE, "NFO": Exchange.NFO, "BFO": Exchange.BFO,
                     "CDS": Exchange.CDS, "BCD": Exchange.BCD, "MCX": Exchange.MCX}
# Order statuses (https://upstox.com/developer/api-documentation/orders), lower case with spaces
# on the wire; keys are upper-cased here.
_UPSTOX_STATUSES = {
    "PUT ORDER REQ RECEIVED": OrderStatus.PENDING,
    "VALIDATION PENDING": OrderStatus.PENDING,
    "OPEN PENDING": OrderStatus.PENDING,
    "AFTER MARKET ORDER REQ RECEIVED": OrderStatus.PENDING,
    "MODIFY AFTER MARKET ORDER REQ RECEIVED": OrderStatus.PENDING,
    "TRIGGER PENDING": OrderStatus.TRIGGER_PENDING,
    "OPEN": OrderStatus.OPEN,
    "MODIFY PENDING": OrderStatus.OPEN,
    "MODIFY VALIDATION PENDING": OrderStatus.OPEN,
    "MODIFIED": OrderStatus.OPEN,
    "NOT MODIFIED": OrderStatus.OPEN,
    "CANCEL PENDING": OrderStatus.OPEN,
    "NOT CANCELLED": OrderStatus.OPEN,
    "COMPLETE": OrderStatus.COMPLETE,
    "CANCELLED": OrderStatus.CANCELLED,
    "CANCELLED AFTER MARKET ORDER": OrderStatus.CANCELLED,
    "REJECTED": OrderStatus.REJECTED,
}
_UPSTOX_TRADE_TIMES = ("%Y-%m-%d %H:%M:%S", "%d-%b-%Y %H:%M:%S")  # live rows; the docs' example


def _upstox_headers(config: Mapping[str, Any], session: Optional[SessionData], route: _Route) -> Dict[str, str]:
    headers = {"Accept": "application/json"}
    if route.path.startswith("/v2/"):
        headers["Api-Version"] = "2.0"  # required by older v2 gateways; never sent on v3
    if session is not None:
        headers["Authorization"] = f"Bearer {session.access_token}"
    if route.rate == "orders" and config.get("algo_name"):
        algo = str(config["algo_name"])
        if not (algo.isascii() and algo.isprintable()):
            raise ConfigurationError("config 'algo_name' must be printable ASCII (it is sent as the X-Algo-Name header)")
        headers["X-Algo-Name"] = algo
    return headers


def _upstox_envelope(status: int, body: Dict[str, Any]) -> _Reply:
    """``{"status": "success", "data": ...}`` or ``{"status": "error", "errors": [{error_code, message}]}``."""
    if status < 400 and body.get("status") == "success":
        return _Reply(True, body.get("data"), "", "")
    errors = body.get("errors")
    if isinstance(errors, Mapping):  # one error object where a list of them is documented
        errors = [errors]
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], Mapping) else {}
    code = str(first.get("error_code") or first.get("errorCode") or "")
    said = errors if isinstance(errors, str) else None  # a bare text is still what the broker said
    return _Reply(False, None, code, str(first.get("message") or said or body.get("message") or "no message"))


def _upstox_token_envelope(status: int, body: Dict[str, Any]) -> _Reply:
    """The token exchange answers its fields at top level, without the envelope."""
    if status < 400 and body.get("access_token"):
        return _Reply(True, body, "", "")
    return _upstox_envelope(status, body)


def _upstox_exchange_code(call: _Call, config: Mapping[str, Any], now: float) -> SessionData:
    """Turn a login redirect's single-use ``code`` into an access token
    (https://upstox.com/developer/api-documentation/get-token)."""
    data = call("login", _Request(body={
        "code": config["auth_code"], "client_id": config["api_key"], "client_secret": config["api_secret"],
        "redirect_uri": config["redirect_uri"], "grant_type": "authorization_code"}))
    token = _secret_field(data, "access_token", "upstox login")
    return SessionData(broker="upstox", mode=AuthMode.MANUAL, access_token=token,
                       obtained_at=_dt.datetime.fromtimestamp(now, IST), user_id=str(data.get("user_id") or "") or None)


def _upstox_login_url(config: Mapping[str, Any], base: str) -> str:
    from urllib.parse import urlencode

    _require_config(config, ("api_key", "redirect_uri"), "the upstox login URL")
    params = {"response_type": "code", "client_id": config["api_key"], "redirect_uri": config["redirect_uri"]}
    if config.get("state"):
        params["state"] = config["state"]
    return f"{base}?{urlencode(params)}"


def _upstox_reauth_hint(config: Mapping[str, Any], base: str) -> str:
    where = _upstox_login_url(config, base) if config.get("api_key") and config.get("redirect_uri") else base
    return (f"Upstox access tokens die at 03:30 IST: log in at {where}, then pass the redirect's code as "
            "'auth_code' with 'api_secret' and 'redirect_uri' (or a fresh 'access_token') in the config")


def _upstox_product(row: Mapping[str, Any]) -> Optional[ProductType]:
    product = row.get("product")
    if product == "I":
        return ProductType.MIS
    if product == "D":
        return ProductType.CNC if row.get("exchange") in ("NSE", "BSE") else ProductType.NRML
    return None  # MTF, CO, OCO: outside the canonical set


def _upstox_instrument(ctx: _Ctx, row: Mapping[str, Any]) -> Instrument:
    # Rows name instruments by key; their symbols follow no one form (SBIN-EQ, SBIN, NIFTY26NOV...).
    return ctx.instrument_by_token(row.get("instrument_token") or row.get("instrument_key"))


def _upstox_profile(ctx: _Ctx, data: Any) -> Profile:
    data = _object(data)
    products: List[ProductType] = []
    for code in data.get("products") or ():
        products += {"D": [ProductType.CNC, ProductType.NRML], "I": [ProductType.MIS]}.get(code, [])
    return Profile(user_id=_str_field(data, "user_id"), name=str(data.get("user_name") or ""),
                   email=data.get("email") or None, broker="upstox",
                   exchanges=tuple(e for e in Exchange if e.value in (data.get("exchanges") or ())),
                   products=tuple(p for p in ProductType if p in products), raw=data)


def _upstox_funds(ctx: _Ctx, data: Any) -> Fund:
    # Since July 2025 the equity block carries the combined figures; v2 gives no collateral or M2M.
    equity = _object(_object(data).get("equity"), "equity")
    available, used = _required_num(equity, "available_margin"), _num_at(equity, "used_margin") or 0.0
    return Fund(available=available, used=used, total=_paise(available + used), utilised_debits=used, raw=data)


def _upstox_holding(ctx: _Ctx, row: Mapping[str, Any]) -> Holding:
    qty = _int_at(row, "quantity") + _int_at(row, "t1_quantity")
    avg, ltp = _num_at(row, "average_price") or 0.0, _num_at(row, "last_price")
    return Holding(instrument=_upstox_instrument(ctx, row), qty=qty, avg_price=avg, ltp=ltp, pnl=_num_at(row, "pnl"),
                   pnl_percent=_pnl_percent(avg, ltp, None), raw=row)


def _upstox_position(ctx: _Ctx, row: Mapping[str, Any]) -> Position:
    return Position(instrument=_upstox_instrument(ctx, row), qty=_int_at(row, "quantity"),
                    avg_price=_num_at(row, "average_price") or 0.0, ltp=_num_at(row, "last_price"),
                    pnl=_num_at(row, "pnl"), product=_upstox_product(row), raw=row)


def _upstox_raw_status(row: Mapping[str, Any]) -> OrderStatus:
    return _order_status(row.get("status") or "", _UPSTOX_STATUSES, row, "filled_quantity", "quantity")


def _upstox_order(ctx: _Ctx, row: Mapping[str, Any]) -> Order:
    qty, filled = _int_at(row, "quantity"), _int_at(row, "filled_quantity")
    status = _upstox_raw_status(row)
    placed = _ist(row.get("order_timestamp"))
    return Order(
        id=_str_field(row, "order_id"), instrument=_upstox_instrument(ctx, row),
        side=_mapped(_UPSTOX_SIDE_OF, row, "transaction_type"), qty=qty, filled_qty=filled,
        # history rows have no pending_quantity; the book's disagrees by terminal status
        pending_qty=qty - filled if status in _LIVE_STATUSES else 0,
        order_type=_mapped(_UPSTOX_ORDER_TYPE_OF, row, "order_type"), product=_upstox_product(row), status=status,
        price=_num_at(row, "price") or None, trigger_price=_num_at(row, "trigger_price") or None,
        average_price=_num_at(row, "average_price") or None, tag=row.get("tag") or None,
        status_message=row.get("status_message") or None, placed_at=placed,
        updated_at=_ist(row.get("exchange_timestamp")) or placed, raw=row,
    )


def _upstox_one_order(ctx: _Ctx, data: Any) -> Order:
    return _upstox_order(ctx, _object(data))


def _upstox_trade(ctx: _Ctx, row: Mapping[str, Any]) -> Trade:
    qty, price = _int_at(row, "quantity"), _num_at(row, "average_price") or 0.0
    stamp = None
    for field_ in ("exchange_timestamp", "order_timestamp"):  # when the trade occurred; else the order's time
        for fmt in _UPSTOX_TRADE_TIMES:
            text = row.get(field_)
            if isinstance(text, str) and text:
                try:
                    stamp = _strptime(text, fmt).replace(tzinfo=IST)
                    break
                except ValueError:
                    continue
        if stamp is not None:
            break
    return Trade(trade_id=_str_field(row, "trade_id"), order_id=_str_field(row, "order_id"),
                 instrument=_upstox_instrument(ctx, row), side=_mapped(_UPSTOX_SIDE_OF, row, "transaction_type"),
                 qty=qty, avg_price=price, trade_value=_paise(qty * price), product=_upstox_product(row),
                 timestamp=stamp, raw=row)


def _upstox_margin(ctx: _Ctx, data: Any) -> Margin:
    data = _object(data)
    legs = [_object(leg, "margins[]") for leg in _list_rows(data.get("margins"))]
    total = _required_num(data, "required_margin")
    final_total = _num_at(data, "final_margin")
    final_total = total if final_total is None else final_total

    def summed(key: str) -> Optional[float]:
        values = [_num_at(leg, key) for leg in legs]
        return _paise(sum(v for v in values if v is not None)) if any(v is not None for v in values) else None

    return Margin(total=total, span=summed("span_margin"), exposure=summed("exposure_margin"),
                  option_premium=summed("net_buy_premium"), final_total=final_total,
                  benefit=_paise(total - final_total), raw=data)


def _upstox_price(value: Optional["Decimal"]) -> float:
    return float(value) if value is not None else 0  # the API takes numbers; 0 where none applies


def _upstox_place_order(req: _OrderRequest) -> _Request:
    body: Dict[str, Any] = {
        "quantity": req.qty, "product": _UPSTOX_PRODUCTS[_product(req)], "validity": req.validity,
        "price": _upstox_price(req.price), "tag": req.tag, "instrument_token": req.token,
        "order_type": _UPSTOX_ORDER_TYPES[req.order_type], "transaction_type": req.side.value,
        "disclosed_quantity": 0, "trigger_price": _upstox_price(req.trigger_price),
        "is_amo": False,  # required; the exchange session decides AMO handling
        "slice": req.native_slice,
    }
    if req.order_type in (OrderType.MARKET, OrderType.SL_M):
        body["market_protection"] = -1  # automatic: a market order without it can be refused (UDAPI1158)
    return _Request(body=body)


def _upstox_placed(ctx: _Ctx, data: Any) -> List[str]:
    ids = _list_rows(_object(data).get("order_ids"))  # several when Upstox sliced the order
    if not ids or not all(isinstance(i, (str, int)) and not isinstance(i, bool) and str(i) for i in ids):
        raise _Malformed(f"order_ids is {ids!r}")
    return [str(i) for i in ids]


def _upstox_modify_order(current: Order, req: _OrderRequest) -> _Request:
    body: Dict[str, Any] = {
        "order_id": current.id, "order_type": _UPSTOX_ORDER_TYPES[req.order_type],
        "validity": str(current.raw.get("validity") or "DAY"), "price": _upstox_price(req.price),
        "trigger_price": _upstox_price(req.trigger_price), "quantity": req.qty,
    }
    if req.order_type in (OrderType.MARKET, OrderType.SL_M):
        body["market_protection"] = -1
    return _Request(body=body)


def _upstox_cancel_order(order_id: str, raw: Mapping[str, Any]) -> _Request:
    return _order_id_query(order_id)


def _upstox_margin_body(legs: Sequence[_OrderRequest], consider_positions: bool) -> _Request:
    return _Request(body={"instruments": [
        {"instrument_key": leg.token, "quantity": leg.qty, "transaction_type": leg.side.value,
         "product": _UPSTOX_PRODUCTS[_product(leg)], "price": _upstox_price(leg.price)} for leg in legs]})


# -- the market feed: protobuf, read by hand ----------------------------------------------
# Market Data Feed v3 (https://upstox.com/developer/api-documentation/v3/get-market-data-feed)
# sends one protobuf ``FeedResponse`` per binary frame. The few messages it uses are read
# here straight off the wire format (https://protobuf.dev/programming-guides/encoding/):
# a field is a varint key (number << 3 | wire type) then a varint (0), 8 bytes (1), a varint
# length and that many bytes (2: strings, messages, map entries) or 4 bytes (5). Unknown
# fields are skipped by their wire type; proto3 leaves zero values out.

_PB_DOUBLE = struct.Struct("<d").unpack_from
# Runs of double fields the feed writes back to back, each after its one-byte key: read at once
_PB_THREE_DOUBLES = struct.Struct("<xdxdxd").unpack_from
_PB_FOUR_DOUBLES = struct.Struct("<xdxdxdxd").unpack_from


def _pb_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    """A varint at ``pos``: (value, position after it); int64 keeps its two's complement sign."""
    byte = buf[pos]  # IndexError past the end: the caller turns it into a _FrameError
    if byte < 0x80:
        return byte, pos + 1
    second = buf[pos + 1]
    if second < 0x80:  # quantities and prices in paise mostly fit two bytes
        return (byte & 0x7F) | second << 7, pos + 2
    value, shift, pos = (byte & 0x7F) | (second & 0x7F) << 7, 14, pos + 2
    while True:  # times in ms take six bytes
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value - (1 << 64) if value >= 1 << 63 else value), pos
        shift += 7
        if shift > 63:
            raise _FrameError("varint longer than 10 bytes")


def _pb_skip(buf: bytes, pos: int, key: int, end: int) -> int:
    """Skip the value of a field whose key was just read; return the position after it."""
    wire = key & 7
    if wire == 0:  # only its end is needed
        while buf[pos] >= 0x80:
            pos += 1
        pos += 1
    elif wire == 1:
        pos += 8
    elif wire == 2:
        size, pos = _pb_varint(buf, pos)
        if size < 0:  # a length read as int64: stepping back onto the key would loop forever
            raise _FrameError("a negative length")
        pos += size
    elif wire == 5:
        pos += 4
    else:
        raise _FrameError(f"wire type {wire} (groups are not used by this feed)")
    if pos > end:
        raise _FrameError("a field runs past its message")
    return pos


def _pb_key(buf: bytes, pos: int) -> Tuple[int, int]:
    key = buf[pos]
    return (key, pos + 1) if key < 0x80 else _pb_varint(buf, pos)


def _pb_message(buf: bytes, pos: int, end: int) -> Tuple[int, int]:
    """A length-delimited field's bounds: (start, end) of its bytes."""
    size, pos = _pb_varint(buf, pos)
    if size < 0 or pos + size > end:
        raise _FrameError("a message runs past its parent")
    return pos, pos + size


# The decoders below read keys and lengths of one byte (every field this schema numbers
# below 16, and any message under 128 bytes) inline, falling back to _pb_varint for longer
# ones: a function call per field was two thirds of a frame's cost. Their values are read
# unchecked, and each loop checks once, at its end, that it stopped at the message's end: a
# field that ran past it read its neighbour's bytes, and the frame is refused.


def _upstox_ltpc(buf: bytes, pos: int, end: int) -> Tuple[float, int, int, float]:
    """LTPC: (ltp, ltt epoch ms, ltq, cp)."""
    ltp = cp = 0.0
    ltt = ltq = 0
    while pos < end:
        key = buf[pos]
        pos += 1
        if key == 0x09:
            ltp = _PB_DOUBLE(buf, pos)[0]
            pos += 8
        elif key == 0x21:
            cp = _PB_DOUBLE(buf, pos)[0]
            pos += 8
        elif key == 0x10:
            ltt, pos = _pb_varint(buf, pos)
        elif key == 0x18:
            ltq = buf[pos]
            if ltq < 0x80:
                pos += 1
            else:
                ltq, pos = _pb_varint(buf, pos)
        else:
            if key >= 0x80:
                key, pos = _pb_varint(buf, pos - 1)
            pos = _pb_skip(buf, pos, key, end)
    if pos > end:
        raise _FrameError("an LTPC field runs past its message")
    return ltp, ltt, ltq, cp


def _upstox_quote(buf: bytes, pos: int, end: int) -> Tuple[int, float, int, float]:
    """Quote: (bidQ, bidP, askQ, askP)."""
    bid_q = ask_q = 0
    bid_p = ask_p = 0.0
    while pos < end:
        key = buf[pos]
        pos += 1
        if key == 0x11:
            bid_p = _PB_DOUBLE(buf, pos)[0]
            pos += 8
        elif key == 0x21:
            ask_p = _PB_DOUBLE(buf, pos)[0]
            pos += 8
        elif key == 0x08:
            bid_q, pos = _pb_varint(buf, pos)
        elif key == 0x18:
            ask_q, pos = _pb_varint(buf, pos)
        else:
            if key >= 0x80:
                key, pos = _pb_varint(buf, pos - 1)
            pos = _pb_skip(buf, pos, key, end)
    if pos > end:
        raise _FrameError("a Quote field runs past its message")
    return bid_q, bid_p, ask_q, ask_p


def _pb_length(buf: bytes, pos: int, end: int) -> Tuple[int, int]:
    """A length-delimited field's bounds (start, stop), a length of one or two bytes read inline."""
    size = buf[pos]
    if size < 0x80:
        pos += 1
    elif buf[pos + 1] < 0x80:
        size = (size & 0x7F) | buf[pos + 1] << 7
        pos += 2
    else:
        size, pos = _pb_varint(buf, pos)
        if size < 0:
            raise _FrameError("a negative length")
    stop = pos + size
    if stop > end:
        raise _FrameError("a message runs past its parent")
    return pos, stop


def _upstox_depth(buf: bytes, pos: int, end: int) -> Tuple[Tuple[Any, ...], Tuple[Any, ...], float]:
    """MarketLevel: repeated Quote {bidQ, bidP, askQ, askP}, best first -> the Tick's depth: flat
    (qty, price, orders) per side (the feed gives no order counts), prices in rupees."""
    bids: List[Any] = []
    asks: List[Any] = []
    double, varint = _PB_DOUBLE, _pb_varint
    while pos < end:
        if buf[pos] != 0x0A:  # not a Quote: skip it
            key, pos = _pb_key(buf, pos)
            pos = _pb_skip(buf, pos, key, end)
            continue
        size = buf[pos + 1]  # a Quote is about 20 bytes: its length takes one byte
        if size < 0x80 and pos + 2 + size <= end:
            start = pos + 2
            pos = start + size
        else:
            start, pos = _pb_length(buf, pos + 1, end)
        # Encoders write fields in number order (a zero one left out), and a quantity below
        # 16384 takes one or two bytes: read that layout straight; any other goes through the
        # general reader.
        bid_q = ask_q = 0
        bid_p = ask_p = 0.0
        p = start
        if p < pos and buf[p] == 0x08:
            bid_q = buf[p + 1]
            if bid_q < 0x80:
                p += 2
            elif buf[p + 2] < 0x80:
                bid_q = (bid_q & 0x7F) | buf[p + 2] << 7
                p += 3
            else:
                bid_q, p = varint(buf, p + 1)
        if p < pos and buf[p] == 0x11:
            bid_p = double(buf, p + 1)[0]
            p += 9
        if p < pos and buf[p] == 0x18:
            ask_q = buf[p + 1]
            if ask_q < 0x80:
                p += 2
            elif buf[p + 2] < 0x80:
                ask_q = (ask_q & 0x7F) | buf[p + 2] << 7
                p += 3
            else:
                ask_q, p = varint(buf, p + 1)
        if p < pos and buf[p] == 0x21:
            ask_p = double(buf, p + 1)[0]
            p += 9
        if p != pos:  # another layout, or a Quote shorter than its fields (the general reader refuses it)
            bid_q, bid_p, ask_q, ask_p = _upstox_quote(buf, start, pos)
        bids.extend((bid_q, bid_p, None))
        asks.extend((ask_q, ask_p, None))
    return tuple(bids), tuple(asks), 1.0


class _UpstoxDepth:
    """A tick's depth as the frame holds it (a MarketLevel's bytes), read on first use: a
    strategy that reads the price only never pays for it (reading it is a third of a full
    frame's decode). It stands in for the depth tuple, (bids, asks, 1.0): indexing, unpacking,
    equality, hashing and pickling see that tuple. A depth that cannot be read is empty, with a
    warning: the tick's other fields were read and checked with the frame."""

    __slots__ = ("_frame", "_start", "_stop", "_read")

    def __init__(self, frame: bytes, start: int, stop: int) -> None:
        self._frame, self._start, self._stop = frame, start, stop
        self._read: Optional[Tuple[Tuple[Any, ...], Tuple[Any, ...], float]] = None

    def _levels(self) -> Tuple[Tuple[Any, ...], Tuple[Any, ...], float]:
        read = self._read
        if read is None:
            try:
                read = _upstox_depth(self._frame, self._start, self._stop)
            except (_FrameError, IndexError, struct.error) as exc:
                log.warning("upstox stream: a tick's market depth could not be read (%s); it has none",
                            exc if isinstance(exc, _FrameError) else exc.__class__.__name__)
                read = ((), (), 1.0)
            self._read = read  # the frame stays: another thread may be reading it now
        return read

    def __getitem__(self, index: int) -> Any:
        return self._levels()[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._levels())

    def __len__(self) -> int:
        return 3

    def __eq__(self, other: Any) -> bool:
        return self._levels() == (other._levels() if isinstance(other, _UpstoxDepth) else other)

    def __hash__(self) -> int:
        return hash(self._levels())

    def __repr__(self) -> str:
        return repr(self._levels())

    def __reduce__(self) -> Tuple[Any, ...]:
        return tuple, (self._levels(),)  # a copy or a pickle holds the plain tuple


def _upstox_day_ohlc(buf: bytes, pos: int, end: int) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """MarketOHLC: the open, high and low of today's candle (interval "1d"); I1/I30 skipped."""
    while pos < end:
        key = buf[pos]
        pos += 1
        if key != 0x0A:
            if key >= 0x80:
                key, pos = _pb_varint(buf, pos - 1)
            pos = _pb_skip(buf, pos, key, end)
            continue
        start, pos = _pb_length(buf, pos, end)
        # the interval usually comes first ("0a 02 1d"); other candles are skipped whole
        if buf[start:start + 4] == b"\x0a\x021d":
            start += 4
        elif not _pb_interval_is_day(buf, start, pos):
            continue
        o = h = lo = 0.0
        if start + 27 <= pos and buf[start] == 0x11 and buf[start + 9] == 0x19 and buf[start + 18] == 0x21:
            o, h, lo = _PB_THREE_DOUBLES(buf, start)  # open, high, low in a row, as usually written
            start += 27
        while start < pos:
            key = buf[start]
            start += 1
            if key == 0x11:
                o = _PB_DOUBLE(buf, start)[0]
                start += 8
            elif key == 0x19:
                h = _PB_DOUBLE(buf, start)[0]
                start += 8
            elif key == 0x21:
                lo = _PB_DOUBLE(buf, start)[0]
                start += 8
            elif key == 0x29:  # close (a Tick's close is the previous day's)
                start += 8
            else:  # volume, the candle's time
                if key >= 0x80:
                    key, start = _pb_varint(buf, start - 1)
                start = _pb_skip(buf, start, key, pos)
        if start > pos:
            raise _FrameError("an OHLC field runs past its message")
        return o, h, lo
    return None, None, None


def _pb_interval_is_day(buf: bytes, pos: int, end: int) -> bool:
    """Does this OHLC candle (its fields in any order) have the interval "1d"?"""
    while pos < end:
        key, pos = _pb_key(buf, pos)
        if key == 0x0A:
            start, pos = _pb_message(buf, pos, end)
            return buf[start:pos] == b"1d"
        pos = _pb_skip(buf, pos, key, end)
    return False


def _upstox_tick(target: Tuple[Instrument, str], buf: bytes, pos: int, end: int, now_ms: int) -> Optional[Tick]:
    """One ``Feed`` -> a Tick in the mode it was subscribed in."""
    instrument, mode = target
    while pos < end:
        key = buf[pos]
        pos += 1
        if key == 0x0A:  # ltpc
            start, pos = _pb_length(buf, pos, end)
            ltp = _upstox_ltpc(buf, start, pos)[0]
            tick = _TickBuilder(instrument, "ltp", ltp)
        elif key == 0x12:  # fullFeed: marketFF (tradables) or indexFF (indices)
            start, pos = _pb_length(buf, pos, end)
            if start == pos:  # neither is set
                continue
            inner_key = buf[start]  # a oneof: marketFF or indexFF, one field
            if inner_key != 0x0A and inner_key != 0x12:
                raise _FrameError(f"fullFeed starts with key {inner_key:#x}, neither marketFF nor indexFF")
            start, stop = _pb_length(buf, start + 1, pos)
            tick = (_upstox_market(instrument, mode, buf, start, stop, now_ms) if inner_key == 0x0A
                    else _upstox_index(instrument, mode, buf, start, stop, now_ms))
        elif key == 0x1A:  # firstLevelWithGreeks (the option_greeks mode)
            start, pos = _pb_message(buf, pos, end)
            tick = _upstox_first_level(instrument, mode, buf, start, pos)
        else:
            if key >= 0x80:
                key, pos = _pb_varint(buf, pos - 1)
            pos = _pb_skip(buf, pos, key, end)
            continue
        tick.__class__ = Tick
        return tick
    return None


def _upstox_market(instrument: Instrument, mode: str, buf: bytes, pos: int, end: int, now_ms: int) -> Any:
    ltp = cp = 0.0
    ltt = ltq = vtt = 0
    atp = tbq = tsq = oi = 0.0
    depth: Any = None
    o = h = lo = None
    double = _PB_DOUBLE
    while pos < end:
        key = buf[pos]
        pos += 1
        if key == 0x0A:
            start, pos = _pb_length(buf, pos, end)
            ltp, ltt, ltq, cp = _upstox_ltpc(buf, start, pos)
        elif key == 0x12:
            start, pos = _pb_length(buf, pos, end)
            if mode == "full":
                depth = _UpstoxDepth(buf, start, pos)  # read when the tick's depth is
        elif key == 0x22:
            start, pos = _pb_length(buf, pos, end)
            o, h, lo = _upstox_day_ohlc(buf, start, pos)
        elif key == 0x29:
            atp = double(buf, pos)[0]
            pos += 8
        elif key == 0x39:
            if pos + 35 <= end and buf[pos + 8] == 0x41 and buf[pos + 17] == 0x49 and buf[pos + 26] == 0x51:
                oi, _, tbq, tsq = _PB_FOUR_DOUBLES(buf, pos - 1)  # oi, iv, tbq, tsq in a row, as usually written
                pos += 35
            else:
                oi = double(buf, pos)[0]
                pos += 8
        elif key == 0x49:
            tbq = double(buf, pos)[0]
            pos += 8
        elif key == 0x51:
            tsq = double(buf, pos)[0]
            pos += 8
        elif key == 0x30:
            vtt, pos = _pb_varint(buf, pos)
        elif key == 0x1A:  # greeks: not in a Tick
            pos = _pb_length(buf, pos, end)[1]
        elif key == 0x41:  # iv: not in a Tick
            pos += 8
        else:  # the auction fields and any newer ones
            if key >= 0x80:
                key, pos = _pb_varint(buf, pos - 1)
            pos = _pb_skip(buf, pos, key, end)
    if pos > end:
        raise _FrameError("a MarketFullFeed field runs past its message")
    change = (ltp - cp) * 100 / cp if cp else None
    buy: Optional[int]
    sell: Optional[int]
    held: Optional[int]
    try:
        buy, sell, held = int(tbq), int(tsq), int(oi)  # doubles on the wire
    except (ValueError, OverflowError):  # a NaN or an infinity: that figure is unknown, the frame is not lost
        buy, sell, held = _pb_count(tbq), _pb_count(tsq), _pb_count(oi)
    if mode == "quote":  # what a quote tick carries on every broker: no depth, no OI, no times
        return _TickBuilder(instrument, "quote", ltp, ltq, atp, vtt, buy, sell, o, h, lo, cp or None, change)
    return _TickBuilder(instrument, "full", ltp, ltq, atp, vtt, buy, sell, o, h, lo, cp or None, change,
                        held, None, None, ltt / 1000, now_ms / 1000, depth)


def _pb_count(value: float) -> Optional[int]:
    """A quantity sent as a double, None where it is NaN or infinite."""
    return int(value) if value - value == 0 else None  # inf - inf and NaN - NaN are NaN


def _upstox_index(instrument: Instrument, mode: str, buf: bytes, pos: int, end: int, now_ms: int) -> Any:
    ltp = cp = 0.0
    o = h = lo = None
    while pos < end:
        key, pos = _pb_key(buf, pos)
        if key == 0x0A:
            start, pos = _pb_message(buf, pos, end)
            ltp, _, _, cp = _upstox_ltpc(buf, start, pos)
        elif key == 0x12:
            start, pos = _pb_message(buf, pos, end)
            o, h, lo = _upstox_day_ohlc(buf, start, pos)
        else:
            pos = _pb_skip(buf, pos, key, end)
    change = (ltp - cp) * 100 / cp if cp else None
    return _TickBuilder(instrument, mode if mode != "ltp" else "quote", ltp, None, None, None, None, None, o, h, lo,
                        cp or None, change, None, None, None, 0, now_ms / 1000 if mode == "full" else 0)


def _upstox_first_level(instrument: Instrument, mode: str, buf: bytes, pos: int, end: int) -> Any:
    ltp = cp = oi = 0.0
    ltq = vtt = 0
    depth: Any = None
    while pos < end:
        key, pos = _pb_key(buf, pos)
        if key == 0x0A:
            start, pos = _pb_message(buf, pos, end)
            ltp, _, ltq, cp = _upstox_ltpc(buf, start, pos)
        elif key == 0x12:  # firstDepth: the best level only
            start, pos = _pb_message(buf, pos, end)
            bid_q, bid_p, ask_q, ask_p = _upstox_quote(buf, start, pos)
            depth = ((bid_q, bid_p, None), (ask_q, ask_p, None), 1.0)
        elif key == 0x20:
            vtt, pos = _pb_varint(buf, pos)
        elif key == 0x29:
            oi = _PB_DOUBLE(buf, pos)[0]
            pos += 8
        else:
            pos = _pb_skip(buf, pos, key, end)
    if pos > end:
        raise _FrameError("a FirstLevelWithGreeks field runs past its message")
    change = (ltp - cp) * 100 / cp if cp else None
    return _TickBuilder(instrument, "full", ltp, ltq, None, vtt, None, None, None, None, None, cp or None, change,
                        _pb_count(oi), None, None, 0, 0, depth)


_UPSTOX_MARKET_STATUS = ("PRE_OPEN_START", "PRE_OPEN_END", "NORMAL_OPEN", "NORMAL_CLOSE", "CLOSING_START", "CLOSING_END")


def _upstox_market_info(buf: bytes, pos: int, end: int, now_ms: int) -> Dict[str, Any]:
    """MarketInfo: which segments are open, as a status message for ``stream_stats``."""
    segments: Dict[str, str] = {}
    while pos < end:
        key, pos = _pb_key(buf, pos)
        if key != 0x0A:  # segmentStatus; the newer auction maps are skipped
            pos = _pb_skip(buf, pos, key, end)
            continue
        start, stop = _pb_message(buf, pos, end)
        pos = stop
        name, status = "", 0  # a map entry may leave out a default key or value
        while start < stop:
            key, start = _pb_key(buf, start)
            if key == 0x0A:
                s, e = _pb_message(buf, start, stop)
                name, start = buf[s:e].decode("utf-8", "replace"), e
            elif key == 0x10:
                status, start = _pb_varint(buf, start)
            else:
                start = _pb_skip(buf, start, key, stop)
        if start > stop:
            raise _FrameError("a segment status runs past its map entry")
        segments[name] = _UPSTOX_MARKET_STATUS[status] if 0 <= status < len(_UPSTOX_MARKET_STATUS) else str(status)
    return {"type": "market_info", "segments": segments,
            "at": _epoch_time(now_ms / 1000) if now_ms else None}


def _upstox_decode(data: bytes, instruments: Mapping[Any, Any], out: List[Any]) -> None:
    """Decode one ``FeedResponse`` frame into ``out``; raise _FrameError if it is malformed."""
    if type(data) is not bytes:  # the ticks' depth keeps the frame (read later): a buffer may be reused
        data = bytes(data)
    try:
        _upstox_feed_response(data, instruments, out)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise _FrameError(f"truncated or malformed protobuf ({exc.__class__.__name__})") from None


def _upstox_feed_response(buf: bytes, instruments: Mapping[Any, Any], out: List[Any]) -> None:
    end = len(buf)
    # currentTs (field 3) may follow the feeds: find it first, it stamps every tick
    now_ms, pos, feeds, info = 0, 0, [], None
    while pos < end:
        key = buf[pos]
        pos += 1
        if key == 0x12:
            start, pos = _pb_length(buf, pos, end)
            feeds.append((start, pos))
        elif key == 0x18:
            now_ms, pos = _pb_varint(buf, pos)
        elif key == 0x22:
            info = _pb_message(buf, pos, end)
            pos = info[1]
        else:
            if key >= 0x80:
                key, pos = _pb_varint(buf, pos - 1)
            pos = _pb_skip(buf, pos, key, end)
    if info is not None:
        out.append(_upstox_market_info(buf, info[0], info[1], now_ms))
    for start, stop in feeds:  # map<string, Feed> entries: key (1) and value (2)
        target = value = None
        while start < stop:
            key = buf[start]
            start += 1
            if key == 0x0A:
                s, e = _pb_length(buf, start, stop)
                target, start = instruments.get(buf[s:e]), e
            elif key == 0x12:
                value = _pb_length(buf, start, stop)
                start = value[1]
            else:
                if key >= 0x80:
                    key, start = _pb_varint(buf, start - 1)
                start = _pb_skip(buf, start, key, stop)
        if target is not None and value is not None:
            tick = _upstox_tick(target, buf, value[0], value[1], now_ms)
            if tick is not None:
                out.append(tick)


def _upstox_feed_connect(call: _Call, config: Mapping[str, Any], session: SessionData, url: str
                         ) -> Tuple[str, Dict[str, str]]:
    """The feed URL is single-use: authorize over REST before every (re)connect."""
    return _upstox_authorized_url(call("feed_authorize")), {}


def _upstox_orders_connect(call: _Call, config: Mapping[str, Any], session: SessionData, url: str
                           ) -> Tuple[str, Dict[str, str]]:
    return _upstox_authorized_url(call("portfolio_authorize", _Request(query={"update_types": "order"}))), {}


def _upstox_authorized_url(data: Any) -> str:
    data = _object(data)
    url = data.get("authorized_redirect_uri") or data.get("authorizedRedirectUri")  # snake case; camel deprecated
    if not isinstance(url, str) or not _ws_url_ok(url):  # (one without a host failed as an "unexpected error")
        raise BrokerError(f"upstox feed authorize: no websocket URL in the reply ({_short(repr(url), 80)})")
    return url


def _upstox_stream_key(instrument: Instrument, token: str) -> bytes:
    return token.encode()  # as the frames carry it: the decoder looks keys up without decoding them


def _upstox_stream_target(instrument: Instrument, mode: str) -> Tuple[Instrument, str]:
    return instrument, mode  # the decoder shapes a quote tick unlike a full one (both come as "full")


_UPSTOX_FEED_MODES = {"ltp": "ltpc", "quote": "full", "full": "full"}


def _upstox_stream_requests(method: str, items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    """Feed requests are JSON sent in BINARY frames."""
    import json

    by_mode: Dict[str, List[str]] = {}
    for _, token, mode in items:
        by_mode.setdefault(_UPSTOX_FEED_MODES[mode], []).append(token)
    out: List[Union[str, bytes]] = []
    for feed_mode, keys in sorted(by_mode.items()):
        data: Dict[str, Any] = {"instrumentKeys": keys} if method == "unsub" else {"mode": feed_mode, "instrumentKeys": keys}
        out.append(json.dumps({"guid": os.urandom(8).hex(), "method": method, "data": data}).encode())
    return out


def _upstox_stream_subscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    return _upstox_stream_requests("sub", items)


def _upstox_stream_unsubscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    return _upstox_stream_requests("unsub", items)


def _upstox_stream_limits(items: Sequence[_Sub]) -> Optional[str]:
    """Keys per connection (v3 feed docs): ltpc 5000 and full 2000 alone; 2000 and 1500 mixed."""
    counts: Dict[str, int] = {}
    for _, _, mode in items:
        feed_mode = _UPSTOX_FEED_MODES[mode]
        counts[feed_mode] = counts.get(feed_mode, 0) + 1
    limits = {"ltpc": 5000, "full": 2000} if len(counts) == 1 else {"ltpc": 2000, "full": 1500}
    over = [f"{n} in {m} (limit {limits[m]})" for m, n in sorted(counts.items()) if n > limits[m]]
    return f"upstox streams at most {', '.join(over)} keys on one connection" if over else None


def _upstox_stream_text(text: str) -> Tuple[str, Any]:
    """The market feed speaks protobuf; a text frame is a status or error object."""
    message = _json_object(text)
    if message is not None and str(message.get("status", "")).lower() in ("failed", "error"):
        return "error", text  # whole: the streamer scrubs secrets from it, then shortens it
    return "unknown", text


def _upstox_order_text(text: str) -> Tuple[str, Any]:
    """Portfolio stream: one JSON object per text frame; order updates have update_type "order"."""
    message = _json_object(text)
    if message is None:
        return "unknown", text
    if message.get("update_type") == "order":
        return "order", message
    return "message" if message.get("update_type") else "unknown", text


_UPSTOX: BrokerSpec = _broker(
    id="upstox",
    name="Upstox API",
    urls={
        "root_url": "https://api.upstox.com",
        "order_root_url": "https://api-hft.upstox.com",  # place, modify, cancel
        "login_url": "https://api.upstox.com/v2/login/authorization/dialog",
        # The feeds' URLs are single-use and come from their authorize routes (on root_url).
        "instruments_url": "https://assets.upstox.com/market-quote/instruments/exchange/complete.json.gz",
    },
    url_follows={"order_root_url": "root_url"},  # a proxy or mock for root_url takes the orders too
    sandbox_urls={"order_root_url": "https://api-sandbox.upstox.com"},  # the sandbox has order calls only
    # Regenerated daily around 06:00 IST.
    master=_Master(published=(6, 30), parse=_upstox_parse_master),
    auth=(
        _Flow("access_token", AuthMode.MANUAL, needs=("access_token",), trigger=("access_token",),
              token="access_token", app="api_key"),
        _Flow("auth_code", AuthMode.MANUAL, needs=("api_key", "api_secret", "redirect_uri", "auth_code"),
              trigger=("auth_code",), obtain=_upstox_exchange_code, single_use="auth_code", app="api_key",
              redirect_param="code"),
    ),
    session_expiry=(3, 30),
    routes={
        "login": _Route("POST", "/v2/login/authorization/token", "form", signed=False, idempotent=False,
                        envelope=_upstox_token_envelope),
        "get_profile": _Route("GET", "/v2/user/profile", parse=_upstox_profile),
        "get_funds": _Route("GET", "/v2/user/get-funds-and-margin", parse=_upstox_funds),
        "get_holdings": _Route("GET", "/v2/portfolio/long-term-holdings", row=_upstox_holding),
        "get_positions": _Route("GET", "/v2/portfolio/short-term-positions", row=_upstox_position),
        "get_orders": _Route("GET", "/v2/order/retrieve-all", row=_upstox_order),
        "get_order": _Route("GET", "/v2/order/details", about_order=True, build=_order_id_query,
                            parse=_upstox_one_order),
        "get_order_history": _Route("GET", "/v2/order/history", about_order=True, build=_order_id_query,
                                    row=_upstox_order),
        "get_trades": _Route("GET", "/v2/order/trades/get-trades-for-day", row=_upstox_trade),
        "place_order": _Route("POST", "/v3/order/place", "json", rate="orders", host="order_root_url",
                              idempotent=False, about_order=True, build=_upstox_place_order, parse=_upstox_placed),
        "modify_order": _Route("PUT", "/v3/order/modify", "json", rate="orders", host="order_root_url",
                               about_order=True, build=_upstox_modify_order),
        "cancel_order": _Route("DELETE", "/v3/order/cancel", rate="orders", host="order_root_url", about_order=True,
                               build=_upstox_cancel_order),
        "calculate_margin": _Route("POST", "/v2/charges/margin", "json", build=_upstox_margin_body,
                                   parse=_upstox_margin),
        "feed_authorize": _Route("GET", "/v3/feed/market-data-feed/authorize"),
        "portfolio_authorize": _Route("GET", "/v2/feed/portfolio-stream-feed/authorize"),
    },
    # Per user and API (https://upstox.com/developer/api-documentation/rate-limiting); the
    # 30-minute window binds first (~1.1 calls a second sustained).
    rate_limits={"default": [(50, 1.0), (500, 60.0), (2000, 1800.0)],
                 "orders": [(10, 1.0), (500, 60.0), (2000, 1800.0)]},
    errors={  # https://upstox.com/developer/api-documentation/error-codes
        "UDAPI100050": AuthenticationError, "UDAPI100016": AuthenticationError, "UDAPI100068": AuthenticationError,
        "UDAPI100067": AuthenticationError, "UDAPI100073": AuthenticationError,
        "UDAPI10005": RateLimitError,
        "UDAPI10000": BrokerError, "UDAPI100015": BrokerError, "UDAPI100060": BrokerError, "UDAPI100500": BrokerError,
        "UDAPI100036": BrokerError, "UDAPI100038": BrokerError, "UDAPI100072": BrokerError,
        "UDAPI1154": ConfigurationError, "UDAPI1156": ConfigurationError, "UDAPI100049": OrderError,
        "UDAPI1026": InvalidOrderError, "UDAPI1052": InvalidOrderError, "UDAPI1004": InvalidOrderError,
        "UDAPI1007": InvalidOrderError, "UDAPI1055": InvalidOrderError, "UDAPI1056": InvalidOrderError,
        "UDAPI1118": InvalidOrderError, "UDAPI1158": InvalidOrderError, "UDAPI1010": InvalidOrderError,
        "UDAPI1023": InvalidOrderError, "UDAPI1019": InvalidOrderError,
        "UDAPI1161": OrderError, "UDAPI100010": OrderNotFoundError, "UDAPI100040": OrderError,
        "UDAPI1009": InstrumentNotFoundError, "UDAPI1011": InstrumentNotFoundError,
        "UDAPI100011": InstrumentNotFoundError,
        **{f"UDAPI{n}": InvalidOrderError for n in range(1095, 1105)},
        "UDAPI1108": OrderError, "UDAPI1109": OrderError, "UDAPI1111": OrderError, "UDAPI1113": OrderError,
    },
    order_errors={"UDAPI100036": InvalidOrderError, "UDAPI100038": InvalidOrderError,
                  "UDAPI100060": OrderNotFoundError},
    error_hints={
        "UDAPI1154": "Upstox accepts orders only from the static IP registered for the app (and of the same family, "
                     "IPv4 or IPv6): register this machine's public IP on the Upstox developer apps page",
        "UDAPI1156": "config 'algo_name' (sent as X-Algo-Name) is not the exchange-approved name of your algo",
        "UDAPI100072": "the funds API answers from 05:30 to 24:00 IST; retry after 05:30",
        "UDAPI100049": "this app is multi-client: Upstox takes its orders through Uplink Business",
    },
    rate_limit_texts=("too many request",),
    exchanges=frozenset({Exchange.NSE, Exchange.BSE, Exchange.NFO, Exchange.BFO}),
    products={ProductType.CNC: "D", ProductType.MIS: "I", ProductType.NRML: "D"},
    order_types=_UPSTOX_ORDER_TYPES,
    validities=("DAY", "IOC"),
    max_tag_len=40,
    max_slices=25,  # "slice": at most 25 orders of one
    row_fields={"order_id": "order_id", "position_qty": "quantity", "exchange": "exchange", "symbol": "trading_symbol"},
    options=("algo_name", "state"),
    has={"order_history": True, "margin": True, "order_updates": True, "streaming": True, "native_slicing": True,
         "sandbox": True, "feed_authorize": True},
    stream_max_tokens=5000,  # per mode: see _upstox_stream_limits
    stream_keepalive="",  # a protocol ping: the server answers with a pong
    stream_silence_timeout=10.0,
    stream_modes_additive=True,  # a key changes mode as unsub + sub
    hooks={
        "headers": _upstox_headers,
        "envelope": _upstox_envelope,
        "login_url": _upstox_login_url,
        "reauth_hint": _upstox_reauth_hint,
        "raw_status": _upstox_raw_status,
        "stream_connect": _upstox_feed_connect,
        "stream_key": _upstox_stream_key,
        "stream_target": _upstox_stream_target,
        "stream_subscribe": _upstox_stream_subscribe,
        "stream_unsubscribe": _upstox_stream_unsubscribe,
        "stream_limits": _upstox_stream_limits,
        "stream_decode": _upstox_decode,
        "stream_text": _upstox_stream_text,
        "order_stream_connect": _upstox_orders_connect,
        "order_stream_text": _upstox_order_text,
    },
)


# ============================================================================
# 6d. Broker spec: paper (offline: every route is answered in this process)
# ============================================================================
# No network, no credentials. Instruments: a bundled universe built from today's date by NSE's
# expiry rules (or the canonical instruments of a real broker's DB in the cache dir). Prices: a
# deterministic walk, a live client's ticks, or a recorded tick file. Orders are matched on every
# price update; the account (orders, trades, positions, holdings, cash) lives in SQLite.

# NSE trading holidays on weekdays (https://www.nseindia.com/resources/exchange-communication-holidays):
# 2026 as published (NSE/CMTR/71775, amended by NSE/CMTR/72260); 2027 is not yet published,
# so only Republic Day, the one fixed weekday holiday, is listed.
_PAPER_HOLIDAYS = frozenset(_dt.date.fromisoformat(d) for d in (
    "2026-01-15", "2026-01-26", "2026-03-03", "2026-03-26", "2026-03-31", "2026-04-03", "2026-04-14",
    "2026-05-01", "2026-05-28", "2026-06-26", "2026-09-14", "2026-10-02", "2026-10-20", "2026-11-10",
    "2026-11-24", "2026-12-25",
    "2027-01-26",
))
_PAPER_OPEN, _PAPER_CLOSE, _PAPER_SQUARE_OFF = (9, 15), (15, 30), (15, 20)  # IST

# The NIFTY 50 (membership of December 2026) with rough price levels that seed the walk; they
# are not quotes.
_PAPER_STOCKS = (
    ("ADANIENT", 2400), ("ADANIPORTS", 1450), ("APOLLOHOSP", 7200), ("ASIANPAINT", 2800), ("AXISBANK", 1200),
    ("BAJAJ-AUTO", 8800), ("BAJAJFINSV", 1950), ("BAJFINANCE", 950), ("BEL", 380), ("BHARTIARTL", 2000),
    ("BSE", 3400), ("CIPLA", 1500), ("COALINDIA", 380), ("DRREDDY", 1250), ("EICHERMOT", 6800),
    ("ETERNAL", 280), ("GRASIM", 2700), ("HCLTECH", 1550), ("HDFCBANK", 950), ("HDFCLIFE", 740),
    ("HINDALCO", 780), ("HINDUNILVR", 2300), ("ICICIBANK", 1350), ("INDIGO", 5500), ("INFY", 1500),
    ("ITC", 400), ("JIOFIN", 290), ("JSWSTEEL", 1100), ("KOTAKBANK", 410), ("LT", 3900), ("M&M", 3500),
    ("MARUTI", 15500), ("MAXHEALTH", 1050), ("NESTLEIND", 1250), ("NTPC", 330), ("ONGC", 240),
    ("POWERGRID", 270), ("RELIANCE", 1450), ("SBILIFE", 1900), ("SBIN", 900), ("SHRIRAMFIN", 800),
    ("SUNPHARMA", 1750), ("TATACONSUM", 1100), ("TATASTEEL", 160), ("TCS", 3100), ("TECHM", 1450),
    ("TITAN", 3700), ("TMPV", 370), ("TRENT", 2700), ("ULTRACEMCO", 11500),
)


class _PaperIndex(NamedTuple):
    symbol: str
    name: str
    level: float  # seeds the walk
    lot: int
    strike_step: int
    future_tick: float
    freeze: int  # units per order (NSE's monthly freeze-limit circulars)
    weekly: bool  # weekly options besides the monthly ones


# NSE contract specifications: lots from NSE/FAOP/70616 (expiries from January 2026), freeze
# limits from the circular effective 3 August 2026, futures ticks by index level (0.05 below
# 15,000, 0.10 to 30,000, 0.20 above).
_PAPER_INDICES = (
    _PaperIndex("NIFTY", "Nifty 50", 23500, 65, 50, 0.10, 1800, True),
    _PaperIndex("BANKNIFTY", "Nifty Bank", 56000, 30, 100, 0.20, 600, False),
    _PaperIndex("FINNIFTY", "Nifty Fin Service", 25500, 60, 50, 0.10, 1800, False),
)
# Seed levels of indices a real broker's DB may hold besides those (``instruments: "db"``).
_PAPER_MORE_LEVELS = {"MIDCPNIFTY": 12700.0, "NIFTYNXT50": 66000.0, "SENSEX": 75000.0, "BANKEX": 62000.0,
                      "SENSEX50": 24000.0}
# Strikes are listed 10% either side of the seed level: the walk's level wanders about it by 2%
# (one standard deviation), so the index stays inside its chain (at +-20 strikes, +-4%, it left
# the chain one week in six)
_PAPER_STRIKE_SPAN = 0.10
_PAPER_WEEKLIES, _PAPER_MONTHLIES = 4, 3  # NIFTY weekly expiries listed; monthly ones per underlying


def _paper_trading_day(day: _dt.date) -> bool:
    return day.weekday() < 5 and day not in _PAPER_HOLIDAYS


def _paper_next_trading_day(day: _dt.date) -> _dt.date:
    """``day`` if it trades, else the next day that does."""
    while not _paper_trading_day(day):
        day += _dt.timedelta(days=1)
    return day


def _paper_expiry_day(day: _dt.date) -> _dt.date:
    """An expiry that falls on a holiday moves to the previous trading day."""
    while not _paper_trading_day(day):
        day -= _dt.timedelta(days=1)
    return day


def _paper_last_tuesday(year: int, month: int) -> _dt.date:
    first_of_next = _dt.date(year + month // 12, month % 12 + 1, 1)
    last = first_of_next - _dt.timedelta(days=1)
    return last - _dt.timedelta(days=(last.weekday() - 1) % 7)


def _paper_expiries(today: _dt.date, weekly: bool) -> Tuple[List[_dt.date], List[_dt.date]]:
    """(option expiries, futures expiries) listed on ``today``, by NSE's rules since September
    2025: every expiry on a Tuesday (NSE/FAOP/68747), monthly ones on the month's last Tuesday;
    NIFTY alone has weekly options."""
    monthly: List[_dt.date] = []
    year, month = today.year, today.month
    while len(monthly) < _PAPER_MONTHLIES:
        expiry = _paper_expiry_day(_paper_last_tuesday(year, month))
        if expiry >= today:
            monthly.append(expiry)
        year, month = year + month // 12, month % 12 + 1
    options = set(monthly)
    if weekly:
        tuesday = today + _dt.timedelta(days=(1 - today.weekday()) % 7)
        weeklies: List[_dt.date] = []
        while len(weeklies) < _PAPER_WEEKLIES:
            expiry = _paper_expiry_day(tuesday)
            if expiry >= today:
                weeklies.append(expiry)
            tuesday += _dt.timedelta(days=7)
        options.update(weeklies)
    return sorted(options), monthly


def _paper_equity_tick(price: float) -> float:
    """NSE's price-band tick sizes (effective 15 April 2025)."""
    for limit, tick in ((250, 0.01), (1000, 0.05), (5000, 0.10), (10000, 0.50), (20000, 1.00)):
        if price <= limit:
            return tick
    return 5.00


def _paper_label_option(exchange: str, symbol: str, expiry: str, strike: float, option_type: str) -> str:
    return f"{exchange}:{symbol} {expiry} {_fmt_num(strike)} {option_type}"


def _paper_bundled(today: _dt.date) -> Iterator[_MasterRow]:
    """The bundled universe of ``today``: a paper token is the instrument as ``str()`` prints it."""
    for symbol, price in _PAPER_STOCKS:
        label = f"NSE:{symbol}"
        yield ("E", "NSE", symbol, symbol, 1, _paper_equity_tick(price), label, label, None, None, None, None, 0)
    for index in _PAPER_INDICES:
        label = f"NSE:{index.symbol}"
        yield ("I", "NSE", index.symbol, index.name, 0, 0.0, label, label, None, None, None, None, 0)
        options, futures = _paper_expiries(today, index.weekly)
        for expiry in futures:
            label = f"NFO:{index.symbol} FUT {expiry.isoformat()}"
            yield ("F", "NFO", index.symbol, index.symbol, index.lot, index.future_tick, label, label,
                   expiry.isoformat(), "I", None, None, index.freeze)
        atm = round(index.level / index.strike_step) * index.strike_step
        each_side = int(index.level * _PAPER_STRIKE_SPAN // index.strike_step)
        strikes = [atm + i * index.strike_step for i in range(-each_side, each_side + 1)]
        for expiry in options:
            for strike in strikes:
                for option_type in ("CE", "PE"):
                    label = _paper_label_option("NFO", index.symbol, expiry.isoformat(), strike, option_type)
                    yield ("O", "NFO", index.symbol, index.symbol, index.lot, 0.05, label, label, expiry.isoformat(),
                           "I", float(strike), option_type, index.freeze)


def _paper_from_db(db_path: str) -> List[_MasterRow]:
    """The canonical instruments every real broker in the DB lists, as paper rows."""
    import sqlite3

    if not os.path.exists(db_path):
        raise ConfigurationError("config instruments='db' needs a real broker's instrument DB in the cache dir; "
                                 "there is none yet (load one first, e.g. python -m ttconnect --broker zerodha "
                                 "instruments refresh)")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        brokers = [b for (b,) in conn.execute("SELECT broker_id FROM _meta WHERE broker_id != 'paper'")]
        if not brokers:
            raise ConfigurationError("config instruments='db' needs a real broker's instruments in the cache dir's "
                                     "DB; it holds none (load one first, e.g. python -m ttconnect --broker zerodha "
                                     "instruments refresh)")
        picked = ("CREATE TEMP TABLE picked AS SELECT instrument_id, MAX(freeze_qty) AS freeze FROM broker_tokens "
                  "WHERE broker_id != 'paper' GROUP BY instrument_id")
        conn.execute(picked)
        rows: List[_MasterRow] = []
        base = "SELECT i.exchange, i.symbol, i.name, i.lot_size, i.tick_size, p.freeze FROM picked p JOIN instruments i ON i.id = p.instrument_id"
        for kind, table in (("I", "indices"), ("E", "equities")):
            for exch, symbol, name, lot, tick, freeze in conn.execute(
                    f"{base} JOIN {table} x ON x.instrument_id = p.instrument_id"):
                label = f"{exch}:{symbol}"
                rows.append((kind, exch, symbol, name, lot, tick, label, label, None, None, None, None, freeze))
        underlying_kind = "CASE WHEN EXISTS (SELECT 1 FROM indices u WHERE u.instrument_id = d.underlying_id) THEN 'I' ELSE 'E' END"
        for exch, symbol, name, lot, tick, freeze, expiry, und in conn.execute(
                f"{base.replace('p.freeze', 'p.freeze, d.expiry, ' + underlying_kind)} "
                "JOIN futures d ON d.instrument_id = p.instrument_id"):
            label = f"{exch}:{symbol} FUT {expiry}"
            rows.append(("F", exch, symbol, name, lot, tick, label, label, expiry, und, None, None, freeze))
        for exch, symbol, name, lot, tick, freeze, expiry, und, strike, option_type in conn.execute(
                f"{base.replace('p.freeze', 'p.freeze, d.expiry, ' + underlying_kind + ', d.strike, d.option_type')} "
                "JOIN options d ON d.instrument_id = p.instrument_id"):
            label = _paper_label_option(exch, symbol, expiry, strike, option_type)
            rows.append(("O", exch, symbol, name, lot, tick, label, label, expiry, und, strike, option_type, freeze))
        return rows
    except sqlite3.Error as exc:
        raise _MasterFormatError(f"the cache dir's instrument DB could not be read ({exc})") from None
    finally:
        conn.close()


def _paper_master(ctx: "_MasterContext") -> Iterable[_MasterRow]:
    if _paper_instruments(ctx.config) == "db":
        return _paper_from_db(ctx.db_path)
    return _paper_bundled_rows(_paper_session_day(ctx.now.timestamp()))


_PAPER_ROWS: Dict[_dt.date, Tuple[_MasterRow, ...]] = {}  # the day's bundled rows (one day at a time)


def _paper_bundled_rows(today: _dt.date) -> Tuple[_MasterRow, ...]:
    """The bundled universe's rows, made once a day per process (each paper client of the day
    loads the same ~2,500 rows: their making was a third of opening one)."""
    rows = _PAPER_ROWS.get(today)
    if rows is None:
        _PAPER_ROWS.clear()
        rows = _PAPER_ROWS[today] = tuple(_paper_bundled(today))
    return rows


def _paper_master_label(config: Mapping[str, Any]) -> str:
    return "instruments of the cache dir's DB" if _paper_instruments(config) == "db" else "bundled NIFTY universe"


# -- prices -------------------------------------------------------------------------------
# The random source: the k-th price of an instrument (k counts quarter-seconds from 2026-01-01
# IST) is a function of (seed, instrument, k) alone, so a seed gives the same path whatever the
# timing. Each day opens at a level that wanders slowly around the seed level (a moving average
# of ten daily shocks), and between two opens the path is a Brownian bridge: hourly points
# bridged over the day, steps of +-1 bridged within each hour. Futures and options follow their
# underlying (cost of carry; Black-Scholes at a flat volatility).

_PAPER_STEP = 0.25  # seconds per price step
_PAPER_HOUR = 14400  # steps per hour
_PAPER_DAY = 24 * _PAPER_HOUR
_PAPER_EPOCH = _dt.datetime(2026, 1, 1, tzinfo=IST).timestamp()
_PAPER_RATE = 0.065  # interest for futures carry and option prices, per year
# (level swing, intraday swing, option volatility) by underlying kind
_PAPER_VOL = {"I": (0.02, 0.012, 0.14), "E": (0.05, 0.02, 0.25)}


def _paper_seed(*parts: Any) -> int:
    return int.from_bytes(_md5("|".join(map(str, parts)).encode()).digest()[:8], "big")


class _PaperWalk:
    """The random price path of one cash instrument (an index or a stock)."""

    __slots__ = ("seed", "key", "base", "level_swing", "day_swing", "_opens", "_hours", "_block", "_block_at")

    def __init__(self, seed: Any, key: str, base: float, kind: str) -> None:
        self.seed, self.key, self.base = seed, key, base
        self.level_swing, self.day_swing = _PAPER_VOL[kind][0], _PAPER_VOL[kind][1]
        self._opens: Dict[int, float] = {}
        self._hours: Dict[int, List[float]] = {}
        self._block: List[float] = []
        self._block_at: Tuple[Optional[int], Optional[int]] = (None, None)

    def _shock(self, day: int) -> float:
        return random.Random(_paper_seed(self.seed, self.key, "day", day)).gauss(0.0, 1.0)

    def _open(self, day: int) -> float:
        """The log offset of the day's opening level from the seed level."""
        found = self._opens.get(day)
        if found is None:
            found = self.level_swing * sum(self._shock(day - i) for i in range(10)) / 10 ** 0.5
            if len(self._opens) > 64:
                self._opens.clear()
            self._opens[day] = found
        return found

    def _hour_points(self, day: int) -> List[float]:
        """The bridge at each whole hour of the day, 25 points from 0 to 0, in unit steps."""
        found = self._hours.get(day)
        if found is None:
            import random

            rng = random.Random(_paper_seed(self.seed, self.key, "hours", day))
            sums = [0.0]
            for _ in range(24):
                sums.append(sums[-1] + rng.gauss(0.0, _PAPER_HOUR ** 0.5))
            found = [s - sums[-1] * h / 24 for h, s in enumerate(sums)]
            if len(self._hours) > 8:
                self._hours.clear()
            self._hours[day] = found
        return found

    def _hour_path(self, day: int, hour: int) -> List[float]:
        """The bridge at every step of one hour (its two ends from the hourly points)."""
        if self._block_at != (day, hour):
            import itertools
            import random

            rng = random.Random(_paper_seed(self.seed, self.key, "steps", day, hour))
            steps = rng.choices((-1.0, 1.0), k=_PAPER_HOUR)
            sums = list(itertools.accumulate(steps, initial=0.0))
            start, end = self._hour_points(day)[hour], self._hour_points(day)[hour + 1]
            drift = (end - start - sums[-1]) / _PAPER_HOUR
            self._block = [start + s + drift * i for i, s in enumerate(sums)]
            self._block_at = (day, hour)
        return self._block

    def price(self, k: int) -> float:
        day, step = divmod(k, _PAPER_DAY)
        hour, within = divmod(step, _PAPER_HOUR)
        lo, hi = self._open(day), self._open(day + 1)
        bridge = self._hour_path(day, hour)[within] / (_PAPER_DAY ** 0.5)
        import math

        return self.base * math.exp(lo + (hi - lo) * step / _PAPER_DAY + 2 * self.day_swing * bridge)


def _paper_step(epoch: float) -> int:
    return int((epoch - _PAPER_EPOCH) // _PAPER_STEP)


def _paper_round(price: float, tick: float) -> float:
    """To the instrument's tick (at least one tick: a traded price is never zero)."""
    if tick <= 0:
        return round(price, 2)
    return round(max(tick, round(price / tick) * tick), 2)


def _paper_black_scholes(spot: float, strike: float, years: float, vol: float, call: bool) -> float:
    import math

    if years <= 0:
        return max(0.0, spot - strike) if call else max(0.0, strike - spot)
    root = vol * math.sqrt(years)
    d1 = (math.log(spot / strike) + (_PAPER_RATE + vol * vol / 2) * years) / root
    d2 = d1 - root

    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    discount = math.exp(-_PAPER_RATE * years)
    if call:
        return spot * cdf(d1) - strike * discount * cdf(d2)
    return strike * discount * cdf(-d2) - spot * cdf(-d1)


def _paper_expiry_epoch(expiry: _dt.date) -> float:
    return _dt.datetime(expiry.year, expiry.month, expiry.day, *_PAPER_CLOSE, tzinfo=IST).timestamp()


def _paper_seed_level(instrument: Instrument) -> float:
    """The level a cash instrument's walk wanders around."""
    symbol = instrument.symbol
    for index in _PAPER_INDICES:
        if index.symbol == symbol:
            return index.level
    if isinstance(instrument, Index):
        return _PAPER_MORE_LEVELS.get(symbol, 10000.0)
    for name, price in _PAPER_STOCKS:
        if name == symbol:
            return float(price)
    return 100.0 + _paper_seed("level", symbol) % 2900  # a stock outside the bundle: a stable level


class _PaperRandomPrices:
    """The ``prices: "random"`` source: the price of any instrument at any time, from the seed."""

    def __init__(self, seed: Any) -> None:
        self.seed = seed
        self._walks: Dict[str, _PaperWalk] = {}

    def _walk(self, underlying: Instrument) -> _PaperWalk:
        key = str(underlying)
        walk = self._walks.get(key)
        if walk is None:
            kind = "I" if isinstance(underlying, Index) else "E"
            walk = self._walks[key] = _PaperWalk(self.seed, key, _paper_seed_level(underlying), kind)
        return walk

    def price(self, instrument: Instrument, underlying: Optional[Instrument], k: int, tick: float) -> float:
        """The unrounded price at step ``k`` (``underlying``: of a future or option)."""
        if underlying is None:
            return self._walk(instrument).price(k)
        spot = self._walk(underlying).price(k)
        expiry = instrument.expiry  # type: ignore[union-attr]
        years = max(0.0, (_paper_expiry_epoch(expiry) - (_PAPER_EPOCH + k * _PAPER_STEP)) / (365 * 86400))
        if isinstance(instrument, Future):
            import math

            return spot * math.exp(_PAPER_RATE * years)
        kind = "I" if isinstance(underlying, Index) else "E"
        option = instrument  # an Option
        return _paper_black_scholes(spot, option.strike, years, _PAPER_VOL[kind][2],  # type: ignore[union-attr]
                                    option.option_type is OptionType.CE)  # type: ignore[union-attr]


# -- the account ----------------------------------------------------------------------------
# Money is kept in whole paise (integers), so every sum is exact. Delivery equity (CNC) and
# options settle in cash at each fill (a buy pays its value, a sell receives it); intraday
# equity (MIS) and futures block margin instead and settle their P&L when reduced. A short
# option blocks margin on its underlying's notional. Working orders block what their fill
# would take. Nothing is ever allowed to make the available funds negative.

# The engine keeps its rows as its log holds them: enums as their text, times as epoch ms.
_P_BUY, _P_SELL = Side.BUY.value, Side.SELL.value
_P_CNC, _P_MIS, _P_NRML = ProductType.CNC.value, ProductType.MIS.value, ProductType.NRML.value
_P_MARKET, _P_SL_M = OrderType.MARKET.value, OrderType.SL_M.value
_P_STOPS = (OrderType.SL.value, OrderType.SL_M.value)
_P_PENDING, _P_OPEN, _P_TRIGGER = OrderStatus.PENDING.value, OrderStatus.OPEN.value, OrderStatus.TRIGGER_PENDING.value
_P_COMPLETE, _P_CANCELLED, _P_REJECTED = (OrderStatus.COMPLETE.value, OrderStatus.CANCELLED.value,
                                          OrderStatus.REJECTED.value)
_P_LIVE = frozenset(s.value for s in _LIVE_STATUSES)


def _ms(epoch: float) -> int:
    return int(round(epoch * 1000))


_PAPER_MARGIN = {  # (kind, product) -> percent of notional blocked; kind: E equity, F future, O short option
    ("E", _P_MIS): 20, ("F", _P_NRML): 12, ("F", _P_MIS): 6, ("O", _P_NRML): 12, ("O", _P_MIS): 12,
}

# The account is an append-only log: one row per transaction, holding what it changed (the
# whole account state first, after each session's close). One table and one INSERT per order
# event keeps a commit to a page or two; the state itself lives in memory, rebuilt from the log
# at start, and re-read when another process has written.
_PAPER_SCHEMA = "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, data TEXT NOT NULL)"
_PAPER_LOG_VERSION = 1
# A row's data is pickled (a BLOB): 27k instructions for an order's row where JSON text took 71k,
# a third of the order path. It is read back refusing every class (only lists, tuples, dicts,
# numbers and text can come out of it, so a doctored file cannot run code). The JSON text rows
# of files written by earlier versions are read as they are.
_PAPER_PICKLE_PROTOCOL = 4
# Rows are written as lists in these field orders (a third of the encoding time of dicts)
_PAPER_ORDER_FIELDS = ("id", "instrument", "side", "qty", "filled", "order_type", "product", "price", "trigger_price",
                       "average", "status", "message", "tag", "validity", "placed_at", "updated_at", "blocked", "day")
_PAPER_TRADE_FIELDS = ("id", "order_id", "instrument", "side", "qty", "price", "product", "at", "day")
_PAPER_ACCOUNT_FIELDS = ("v", "capital", "cash", "day", "squared", "next_id")
_PAPER_ORDER_VALUES = operator.itemgetter(*_PAPER_ORDER_FIELDS)
_PAPER_TRADE_VALUES = operator.itemgetter(*_PAPER_TRADE_FIELDS)


def _paper_order_state(values: Sequence[Any]) -> Dict[str, Any]:
    """An order's state as the log holds it (checked: a damaged log is refused, not half-read)."""
    state = dict(zip(_PAPER_ORDER_FIELDS, values))
    Side(state["side"]), OrderType(state["order_type"]), ProductType(state["product"]), OrderStatus(state["status"])
    return state


def _paper_trade_state(values: Sequence[Any]) -> Dict[str, Any]:
    trade = dict(zip(_PAPER_TRADE_FIELDS, values))
    Side(trade["side"]), ProductType(trade["product"])
    return trade


def _paper_row_reader() -> Callable[[Any], Any]:
    """Reads a log row's data: pickled (refusing every class), or the JSON text of older rows."""
    import io
    import json
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"a log row names {_short(f'{module}.{name}', 60)}; rows hold only data")

    def read(data: Any) -> Any:
        if isinstance(data, bytes):
            return Unpickler(io.BytesIO(data)).load()
        return json.loads(data)

    return read


_PAPER_COMPACT_AFTER = 5000  # change events before the state is written whole again
# A row goes in only as the log's next one: a writer whose state is behind the log (another
# process appended since it read) is refused, and reads the log again.
_PAPER_IN_ORDER = ("CREATE TRIGGER IF NOT EXISTS events_in_order BEFORE INSERT ON events "
                   "WHEN NEW.seq <> (SELECT COALESCE(MAX(seq), 0) FROM events) + 1 "
                   "BEGIN SELECT RAISE(ABORT, 'the paper log moved on'); END")
_PAPER_APPEND = "INSERT INTO events (seq, kind, data) VALUES (?, 'change', ?)"
_PAPER_RETRIES = 10  # answers re-run after losing the race to another process's append
_PAPER_BACKLOG_SECONDS = 5.0  # order updates made while no feed was connected, delivered when one connects


def _div_round(a: int, b: int) -> int:
    """a / b (b > 0) to the nearest integer, halves up: exact in integers."""
    q, r = divmod(a, b)
    return q + (2 * r >= b)


def _to_paise(value: Any) -> Optional[int]:
    """A price in rupees (Decimal, float or None) as whole paise."""
    if value is None:
        return None
    return int(round(float(value) * 100))


def _paper_session_day(epoch: float) -> _dt.date:
    """The trading session ``epoch`` belongs to: after a session's close, the next one."""
    local = _dt.datetime.fromtimestamp(epoch, IST)
    day = local.date()
    if (local.hour, local.minute) >= _PAPER_CLOSE:
        day += _dt.timedelta(days=1)
    return _paper_next_trading_day(day)


def _paper_at(day: _dt.date, hm: Tuple[int, int]) -> float:
    return _dt.datetime(day.year, day.month, day.day, *hm, tzinfo=IST).timestamp()


_PAPER_MAX_QTY = 10 ** 15  # units in one order: beyond any real order, below a typo's 10**19


class _PaperQuote(NamedTuple):
    ltp: int  # paise
    bid: int  # best bid (the last price where no depth is known)
    ask: int
    at: float  # epoch seconds
    tick: Optional[Tick] = None  # the tick it came in, if it came from a feed


class _PaperPosition:
    __slots__ = ("instrument", "product", "qty", "cost", "blocked", "realised")

    def __init__(self, instrument: str, product: str, qty: int = 0, cost: int = 0, blocked: int = 0,
                 realised: int = 0) -> None:
        self.instrument, self.product = instrument, product
        self.qty, self.cost, self.blocked, self.realised = qty, cost, blocked, realised

    def row(self) -> Tuple[Any, ...]:
        return (self.instrument, self.product, self.qty, self.cost, self.blocked, self.realised)


class _PaperFill(NamedTuple):
    """What one fill does to the account (computed first, applied only if funds allow)."""

    qty: int
    cost: int
    blocked: int
    realised: int  # P&L realised by this fill
    cash: int  # change of cash
    reduces: bool  # it only closes (part of) a position: never refused for funds, a loss may leave a debit

    def need(self, blocked_before: int) -> int:
        """The funds this fill needs: the margin it adds plus what it pays. Premium it receives
        (a short option's) does not count towards its own margin; an exit needs nothing."""
        if self.reduces:
            return 0
        return max(0, self.blocked - blocked_before + max(0, -self.cash))

    def refused(self, need: int, available: int) -> bool:
        """Whether funds refuse it: it needs more than there is (needing nothing fits an account
        in debit) and it is no exit."""
        return need > max(available, 0) and not self.reduces


class _PaperBook:
    """The working orders of one instrument, with the prices that would move any of them."""

    __slots__ = ("orders", "max_buy", "min_sell", "min_buy_stop", "max_sell_stop", "waiting", "quiet_low",
                 "quiet_high")

    def __init__(self) -> None:
        self.orders: Dict[str, Dict[str, Any]] = {}
        self.refresh()

    def refresh(self) -> None:
        inf = float("inf")
        self.max_buy = self.max_sell_stop = -inf
        self.min_sell = self.min_buy_stop = inf
        self.waiting = False  # a MARKET order placed before any price was known
        for o in self.orders.values():
            buy = o["side"] == _P_BUY
            if o["status"] == _P_TRIGGER:
                if buy:
                    self.min_buy_stop = min(self.min_buy_stop, o["trigger_price"])
                else:
                    self.max_sell_stop = max(self.max_sell_stop, o["trigger_price"])
            elif o["price"] is None:
                self.waiting = True
            elif buy:
                self.max_buy = max(self.max_buy, o["price"])
            else:
                self.min_sell = min(self.min_sell, o["price"])
        # A last price (rupees, no depth) strictly between these moves none of the orders: its paise,
        # rounded, are above every buy limit and sell stop and below every sell limit and buy stop.
        # The 0.6 paise of slack keep a float's error and the rounding on the side of a full look.
        if self.waiting:
            self.quiet_low, self.quiet_high = inf, -inf
        else:
            self.quiet_low = (max(self.max_buy, self.max_sell_stop) + 0.6) / 100
            self.quiet_high = (min(self.min_sell, self.min_buy_stop) - 0.6) / 100

    def moves(self, q: _PaperQuote) -> bool:
        return self.reaches(q.ltp, q.bid, q.ask)

    def reaches(self, ltp: int, bid: int, ask: int) -> bool:
        """Whether a price (paise) fills or triggers any of these orders (what ``moves`` asks of a quote)."""
        return (self.waiting or ask <= self.max_buy or bid >= self.min_sell or ltp >= self.min_buy_stop
                or ltp <= self.max_sell_stop)


class _PaperConflict(Exception):
    """Another process appended to the account's log first: the state was re-read; do it again."""


class _PaperTransaction:
    """The account's transaction: the account as the log has it (another process may have
    written since), and the changes made in it appended as one log row, only if the log is
    still where it was read (else ``_PaperConflict``). On any error the state in memory is
    re-read from the log. Entered again while open, it is the same transaction (a fill inside
    a placement)."""

    __slots__ = ("engine", "depth")

    def __init__(self, engine: "_PaperEngine") -> None:
        self.engine, self.depth = engine, 0

    def __enter__(self) -> None:
        self.depth += 1
        if self.depth == 1:
            try:
                self.engine._begin()
            except BaseException:
                self.depth = 0
                raise

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        self.depth -= 1
        if self.depth:
            return
        if kind is None:
            try:
                self.engine._commit()
                return
            except BaseException as error:
                self.engine._abort(reload=isinstance(error, _PaperConflict))
                raise
        self.engine._abort(reload=kind is _PaperConflict)


class _PaperEngine:
    """The paper broker: answers every route of its spec from an account kept in SQLite.

    One lock guards the account: calls from any thread and price updates from the feed thread
    take it in turn, and each order event is one transaction (WAL, synchronous=NORMAL: a crash
    loses nothing that was reported).
    """

    def __init__(self, local: "_LocalContext") -> None:
        import functools
        import pickle
        import sqlite3

        self._encode = functools.partial(pickle.dumps, protocol=_PAPER_PICKLE_PROTOCOL)
        self._read_row = _paper_row_reader()
        cfg = local.config
        self.ctx, self.instruments, self.clock = local.ctx, local.instruments, local.clock
        self.account = _paper_account_name(cfg.get("account", "default"))
        self.capital = asked = _paper_capital(cfg.get("capital", 1_000_000))
        self.market_hours = cfg.get("market_hours", False)
        if not isinstance(self.market_hours, bool):
            raise ConfigurationError(f"config 'market_hours' must be True or False, got {self.market_hours!r}")
        self.tick_interval = _positive(cfg, "tick_interval", 0.25)
        self.source = _paper_source(cfg, self)
        self.path = os.path.join(local.cache_dir, f"paper_{self.account}.db")
        self.lock = threading.RLock()
        self.closed = False  # set under the lock: a call waiting for it then finds the file closed
        self.sockets: List["_PaperSocket"] = []
        self._infos: Dict[str, Tuple[Instrument, Optional[Instrument], int, float]] = {}
        self._books: Dict[str, _PaperBook] = {}
        self._quotes: Dict[str, _PaperQuote] = {}  # the last price seen per instrument (feed sources)
        self._scanned: Dict[str, int] = {}  # random source: the last step each book was matched at
        self._updates: List[Dict[str, Any]] = []  # order states changed in the current transaction
        # Order updates no feed socket took: the next one to connect within a few seconds gets them.
        self._backlog: "Deque[Tuple[float, List[Dict[str, Any]]]]" = collections.deque(maxlen=1000)  # per transaction
        self._log: Dict[str, Any] = {}  # what the current transaction changed, for its log row
        # sqlite3's errors, kept so the order path runs no import statement (~1k instructions each)
        self._db_error, self._out_of_order = sqlite3.Error, sqlite3.IntegrityError
        self._txn = _PaperTransaction(self)
        self._handlers = {name[7:]: getattr(self, name) for name in dir(self) if name.startswith("_route_")}
        self.now = 0.0  # the time of the route being answered
        self._id_day, self._id_prefix = "", ""
        self._seq = -1  # the last log row this state includes (-1: not read yet)
        self._version = -1  # PRAGMA data_version when the log was last looked at
        self._changes = 0  # change rows since the last whole state
        self._whole = False  # the current transaction writes the whole state (a new day, compaction)
        self._fresh = False  # the state was read from the log during the current answer
        self._next_event = 0.0  # when advance() next has something to do besides matching
        # The account itself, as _load() reads it from the log:
        self.cash, self.day, self.squared, self.next_id = 0, "", "", 1
        self.positions: Dict[Tuple[str, str], _PaperPosition] = {}
        self.holdings: Dict[str, Tuple[int, int]] = {}  # token -> (qty, cost in paise)
        self.orders: Dict[str, Dict[str, Any]] = {}  # today's orders by id: their latest state
        self.history: Dict[str, List[Dict[str, Any]]] = {}  # every state each order went through
        self.trades: List[Dict[str, Any]] = []
        try:
            os.makedirs(local.cache_dir, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = 1000")  # another process's transaction (microseconds): wait for it
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute(_PAPER_SCHEMA)
            self.db.execute(_PAPER_IN_ORDER)
            for _ in range(_PAPER_RETRIES):
                try:
                    with self.lock, self._transaction():
                        break  # loads the account (or creates it, or writes it whole)
                except _PaperConflict:
                    continue  # another process wrote it first: read it again
            else:
                raise sqlite3.OperationalError("database is busy: other processes kept writing")
        except sqlite3.Error as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise ConfigurationError(f"the paper account file {self.path} is locked by another process ({exc}): "
                                         "close the program using it, or use another 'account'") from None
            raise _paper_db_error(self.path, exc) from None
        except OSError as exc:
            raise _cache_dir_error(local.cache_dir, exc) from None
        if "capital" in cfg and asked != self.capital:
            log.warning("paper account %r keeps the capital it was opened with (%s); config capital %s is ignored: "
                        "use a new 'account' to start with it", self.account, f"{self.capital / 100:,.2f}",
                        f"{asked / 100:,.2f}")

    # -- state ----------------------------------------------------------------------------

    def _load(self) -> None:
        """The account as the log says: its last whole state, then the changes since."""
        import pickle

        self._version = self.db.execute("PRAGMA data_version").fetchone()[0]  # before the rows: never newer than them
        self._fresh = True  # read during this answer: what it says is final for a read or a refusal
        rows = self.db.execute("SELECT seq, kind, data FROM events WHERE seq >= (SELECT COALESCE(MAX(seq), 0) FROM "
                               "events WHERE kind = 'state') ORDER BY seq").fetchall()
        self._books, self._scanned, self._next_event = {}, {}, 0.0
        if not rows:  # a new account
            self.cash, self.day, self.squared, self.next_id = self.capital, _paper_session_day(self.clock()).isoformat(), "", 1
            self.positions, self.holdings = {}, {}
            self.orders, self.history, self.trades = {}, {}, []
            self._seq, self._whole = 0, True
            return
        try:
            for seq, kind, data in rows:
                change = self._read_row(data)
                if kind == "state":
                    self._apply_state(change)
                else:
                    self._apply_change(change)
                self._seq = seq
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, EOFError, OverflowError,
                MemoryError, RecursionError, pickle.UnpicklingError) as exc:  # a length field of 2**62: MemoryError
            raise ConfigurationError(f"the paper account file {self.path} is damaged ({_describe(exc)} in log row "
                                     f"{seq}); move it aside to start the account afresh") from None
        self._changes, self._whole = len(rows) - 1, False

    def _account_row(self) -> List[Any]:
        return [_PAPER_LOG_VERSION, self.capital, self.cash, self.day, self.squared, self.next_id]

    def _apply_account(self, values: Sequence[Any]) -> None:
        row = dict(zip(_PAPER_ACCOUNT_FIELDS, values))
        if row["v"] != _PAPER_LOG_VERSION:
            raise ValueError(f"log version {row['v']!r} (this ttconnect reads {_PAPER_LOG_VERSION})")
        self.capital, self.cash, self.day, self.squared, self.next_id = (
            int(row["capital"]), int(row["cash"]), str(row["day"]), str(row["squared"]), int(row["next_id"]))
        _dt.date.fromisoformat(self.day)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        self._apply_account(state["a"])
        self.orders, self.history = {}, {}
        for values in state["h"]:
            order = _paper_order_state(values)
            self.history.setdefault(order["id"], []).append(order)
            self.orders[order["id"]] = dict(order)
        self.trades = [_paper_trade_state(t) for t in state["t"]]
        self.positions = {}
        for row in state["p"]:
            self._apply_position(row)
        self.holdings = {token: (int(qty), int(cost)) for token, qty, cost in state["k"]}
        for order in self.orders.values():
            if order["status"] in _P_LIVE:
                self._book(order["instrument"]).orders[order["id"]] = order
        for book in self._books.values():
            book.refresh()

    def _apply_position(self, row: Sequence[Any]) -> None:
        token, product = row[0], ProductType(row[1]).value
        if row[2] is None:
            self.positions.pop((token, product), None)
        else:
            self.positions[(token, product)] = _PaperPosition(token, product, *(int(v) for v in row[2:6]))

    def _apply_change(self, change: Mapping[str, Any]) -> None:
        self._apply_account(change["a"])
        for values in change["h"]:
            state = _paper_order_state(values)
            order = self.orders.get(state["id"])
            if order is None:
                order = self.orders[state["id"]] = dict(state)
            else:
                order.update(state)
            self.history.setdefault(state["id"], []).append(dict(state))
            book = self._book(order["instrument"])
            if order["status"] in _P_LIVE:
                book.orders[order["id"]] = order
            else:
                book.orders.pop(order["id"], None)
            book.refresh()
        self.trades.extend(_paper_trade_state(t) for t in change["t"])
        for row in change["p"]:
            self._apply_position(row)
        for token, qty, cost in change["k"]:
            if qty:
                self.holdings[token] = (int(qty), int(cost))
            else:
                self.holdings.pop(token, None)

    def _state_row(self) -> Dict[str, Any]:
        return {"a": self._account_row(),
                "h": [_PAPER_ORDER_VALUES(s) for states in self.history.values() for s in states],
                "t": [_PAPER_TRADE_VALUES(t) for t in self.trades],
                "p": [p.row() for p in self.positions.values()],
                "k": [[token, qty, cost] for token, (qty, cost) in self.holdings.items()]}

    def _transaction(self) -> "_PaperTransaction":
        """One transaction (see _PaperTransaction); a nested one joins the outer."""
        return self._txn

    def _begin(self) -> None:
        """Start a transaction on the state in memory. It is checked against the log at its end
        (optimistic): what it writes is appended only if the log is still at the row this state
        was read from; one that writes nothing, or fails, looks then (``_stale``)."""
        # order states, trades, positions by (token, product) -> row, holdings by token -> [token, qty, cost]
        self._log = {"h": [], "t": [], "p": {}, "k": {}}
        if self._seq < 0:
            self._load()  # the first look

    def _stale(self) -> bool:
        """Has another connection written the log since this state was read?"""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]  # moves when another connection commits
        if version == self._version:
            return False
        if (self.db.execute("SELECT MAX(seq) FROM events").fetchone()[0] or 0) != self._seq:
            return True  # the caller re-reads; _load records the version
        self._version = version
        return False

    def _commit(self) -> None:
        """Append what the transaction changed as the log's next row, only if the log is still
        at the row this state was read from: one INSERT, its own transaction (optimistic: the
        write lock is held only while it runs)."""
        log_ = self._log
        if self._whole or self._changes >= _PAPER_COMPACT_AFTER:
            data = self._encode(self._state_row())
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if (self.db.execute("SELECT MAX(seq) FROM events").fetchone()[0] or 0) != self._seq:
                    raise _PaperConflict()
                seq = self._seq + 1
                self.db.execute("INSERT INTO events (seq, kind, data) VALUES (?, 'state', ?)", (seq, data))
                self.db.execute("DELETE FROM events WHERE seq < ?", (seq,))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self._seq, self._changes, self._whole = seq, 0, False
        elif log_["h"] or log_["t"] or log_["p"] or log_["k"] or log_.get("a"):
            # list(map()): a comprehension runs as a function of its own (~1.5k instructions each here)
            row = {"a": self._account_row(), "h": list(map(_PAPER_ORDER_VALUES, log_["h"])),
                   "t": list(map(_PAPER_TRADE_VALUES, log_["t"])), "p": list(log_["p"].values()),
                   "k": list(log_["k"].values())}
            seq = self._seq + 1
            try:
                self.db.execute(_PAPER_APPEND, (seq, self._encode(row)))
            except self._out_of_order:
                raise _PaperConflict() from None
            self._seq, self._changes = seq, self._changes + 1
        elif not self._fresh and self._stale():
            raise _PaperConflict()  # what it read may have changed: answer again on the log's state
        updates, self._updates = self._updates, []
        if not self.sockets:  # kept a moment for a feed that is connecting (on_order_update was just called)
            if updates:
                self._backlog.append((time.monotonic(), updates))
            return
        for sock in list(self.sockets):
            for row in updates:
                sock.order_update(row)

    def _abort(self, reload: bool = False) -> None:
        """Undo a transaction: memory back to what the log says (read again where it changed
        anything, or lost the race to another process: ``reload``)."""
        changed = any(self._log.values()) or self._whole
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._updates.clear()
        if changed or reload:
            self._version = -1
            self._load()  # memory back to what the log says

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for sock in list(self.sockets):
                sock.abort()
            self.source.close()
            try:
                self.db.close()
            except Exception:  # noqa: BLE001 - close never raises
                pass

    def _book(self, token: str) -> _PaperBook:
        book = self._books.get(token)
        if book is None:
            book = self._books[token] = _PaperBook()
        return book

    def info(self, token: str) -> Tuple[Instrument, Optional[Instrument], int, float]:
        """(instrument, underlying of a derivative, lot, tick) of a paper token."""
        found = self._infos.get(token)
        if found is None:
            try:
                inst = self.ctx.instrument_by_token(token)
                _, lot, tick = self.instruments.info(inst)
            except InstrumentNotFoundError:
                inst, lot, tick = _paper_unlisted(token), 1, 0.05  # a contract that expired since: its text says it
            underlying: Optional[Instrument] = None
            if isinstance(inst, (Future, Option)):
                exchange = Exchange.NSE if inst.exchange is Exchange.NFO else Exchange.BSE
                cls = Index if inst.symbol in _INDEX_UNDERLYINGS else Equity
                underlying = _make(cls, _instrument_id(f"{exchange.value}|{inst.symbol}"), exchange=exchange,
                                   symbol=inst.symbol)
            found = self._infos[token] = (inst, underlying, lot, tick)
        return found

    def available(self) -> int:
        available = self.cash
        for pos in self.positions.values():  # loops, not sum() of generators: this is on every order's path
            available -= pos.blocked
        for book in self._books.values():
            for order in book.orders.values():
                available -= order["blocked"]
        return available

    # -- time: the square-off, the day's end, and matching up to now -----------------------

    def advance(self, now: Optional[float] = None) -> None:
        """Bring the account to ``now``: match working orders against the prices since they were
        last matched, square off MIS positions at 15:20, roll the day at the session's close."""
        import sqlite3

        now = self.clock() if now is None else now
        with self.lock:
            if self._txn.depth:  # inside an answer: on the state it read
                self._advance(now)
                return
            self._fresh = False
            for _ in range(_PAPER_RETRIES):  # a feed thread: on the account as the log has it now
                try:
                    with self._txn:
                        self._advance(now)
                    return
                except _PaperConflict:
                    continue
                except sqlite3.Error as exc:
                    log.warning("paper: the account file is busy (%s); matching resumes with the next price", exc)
                    return

    def _advance(self, now: float) -> None:
        if now < self._next_event:  # nothing due but matching
            self.source.match_until(now)
            return
        while True:
            day = _dt.date.fromisoformat(self.day)
            square_off, close = _paper_at(day, _PAPER_SQUARE_OFF), _paper_at(day, _PAPER_CLOSE)
            if self.squared != self.day and now >= square_off:
                self.source.match_until(square_off)
                self._square_off(square_off)
                continue
            if now < close:
                self._next_event = square_off if self.squared != self.day else close
                self.source.match_until(now)
                return
            self.source.match_until(close)
            self._roll(close, _paper_session_day(close))

    def _square_off(self, at: float) -> None:
        with self._transaction():
            for book in list(self._books.values()):
                for order in [o for o in book.orders.values() if o["product"] == _P_MIS]:
                    self._finish(order, _P_CANCELLED, "cancelled by the 15:20 MIS square-off", at)
            for pos in [p for p in self.positions.values() if p.product == _P_MIS and p.qty]:
                quote = self.source.quote(pos.instrument, at)
                if quote is None:
                    log.warning("paper: no price for %s at the MIS square-off; it stays open", pos.instrument)
                    continue
                self._close_position(pos, quote, at, "MIS square-off at 15:20")
            self.squared = self.day
            self._log["a"] = True

    def _roll(self, at: float, next_day: _dt.date) -> None:
        """The session's close: working orders expire, delivery buys become holdings, expired
        contracts settle, and the day's P&L starts again."""
        with self._transaction():
            for book in list(self._books.values()):
                for order in list(book.orders.values()):
                    self._finish(order, _P_CANCELLED, "expired at the end of the trading day", at)
            day = _dt.date.fromisoformat(self.day)
            for key, pos in list(self.positions.items()):
                inst = self.info(pos.instrument)[0] if self._known(pos.instrument) else None
                expiry = getattr(inst, "expiry", None)
                if pos.qty and expiry is not None and expiry <= day:
                    settle = self.source.settlement(pos.instrument, _paper_expiry_epoch(expiry))
                    why = "settled at expiry"
                    if settle is None:  # no price seen (a tick file without it): no P&L, say so
                        log.warning("paper: no price for %s at its expiry; settled at its average price",
                                    pos.instrument)
                        average = _div_round(abs(pos.cost), abs(pos.qty))
                        settle, why = _PaperQuote(average, average, average, at), why + " at the average price"
                    self._close_position(pos, settle, at, why)
                if pos.product == _P_CNC:
                    if pos.qty:
                        qty, cost = self.holdings.get(pos.instrument, (0, 0))
                        qty, cost = qty + pos.qty, cost + pos.cost
                        if qty > 0:
                            self.holdings[pos.instrument] = (qty, cost)
                        else:
                            self.holdings.pop(pos.instrument, None)
                    del self.positions[key]
                elif not pos.qty:
                    del self.positions[key]
                else:
                    pos.realised = 0
            self.day = next_day.isoformat()
            self.orders, self.history, self.trades = {}, {}, []  # the new day's books start empty
            self._whole = True  # written whole: the log starts afresh with the new day

    def _known(self, token: str) -> bool:
        try:
            self.info(token)
            return True
        except TTConnectError:
            return False

    # -- matching ---------------------------------------------------------------------------

    def on_quote(self, token: str, quote: _PaperQuote, past: bool = False) -> None:
        """A new price of ``token``: fill or trigger whatever it reaches (caller holds the lock).
        ``past``: a price from before now (the random path, matched step by step): an order
        placed or changed after it is not touched by it."""
        book = self._books.get(token)
        if book is None or not book.orders or not book.moves(quote):
            return  # reaches nothing this engine knows of (an order only another client placed waits for its prices)
        if self._txn.depth:
            self._match_book(token, quote, past)
            return
        import sqlite3

        self._fresh = False
        for _ in range(_PAPER_RETRIES):
            try:
                with self._transaction():  # the account as the log has it now: another client may have filled it
                    self._match_book(token, quote, past)
                return
            except _PaperConflict:
                continue
            except sqlite3.Error as exc:
                log.warning("paper: the account file is busy (%s); a price of %s was not matched", exc, token)
                return
        log.warning("paper: a price of %s was not matched (other processes kept writing the account)", token)

    def _match_book(self, token: str, quote: _PaperQuote, past: bool) -> None:
        book = self._books.get(token)
        if book is None or not book.orders or not book.moves(quote):
            return
        at_ms = _ms(quote.at)
        for order in sorted(book.orders.values(), key=lambda o: o["id"]):
            if not (past and order["updated_at"] > at_ms) and order["status"] in _P_LIVE:
                self._match(order, quote)

    def _match(self, order: Dict[str, Any], quote: _PaperQuote) -> None:
        buy = order["side"] == _P_BUY
        if order["status"] == _P_TRIGGER:
            if not (quote.ltp >= order["trigger_price"] if buy else quote.ltp <= order["trigger_price"]):
                return
            if order["order_type"] == _P_SL_M:
                self._fill(order, quote.ask if buy else quote.bid, quote.at)
                return
            self._update(order, quote.at, status=_P_OPEN, message="triggered")
        if order["price"] is None:  # a MARKET order that waited for a first price
            self._fill(order, quote.ask if buy else quote.bid, quote.at)
        elif buy and quote.ask <= order["price"]:
            self._fill(order, quote.ask, quote.at)
        elif not buy and quote.bid >= order["price"]:
            self._fill(order, quote.bid, quote.at)

    def _fill_effect(self, token: str, product: str, side: str, qty: int, price: int, at: float) -> _PaperFill:
        """What filling ``qty`` at ``price`` (paise) would do to the position and the cash."""
        inst, underlying, _, _ = self.info(token)
        pos = self.positions.get((token, product)) or _PaperPosition(token, product)
        sign = 1 if side == _P_BUY else -1
        old_qty, old_cost, blocked = pos.qty, pos.cost, pos.blocked
        realised = 0
        if old_qty == 0 or (old_qty > 0) == (sign > 0):  # opening or adding
            new_qty, cost = old_qty + sign * qty, old_cost + sign * qty * price
            opened = qty
        else:
            closed = min(qty, abs(old_qty))
            removed = _div_round(old_cost * closed, abs(old_qty))
            realised = -sign * closed * price - removed
            blocked -= _div_round(blocked * closed, abs(old_qty))
            new_qty, cost = old_qty + sign * closed, old_cost - removed
            opened = qty - closed
            if opened:  # a flip: the rest opens a new position at this price
                new_qty, cost, blocked = sign * opened, sign * opened * price, 0
        if product == _P_CNC and side == _P_SELL and qty > max(0, old_qty):
            # Beyond today's buys, a delivery sale sells held shares: their cost is the holding's
            # average, their P&L is against it (the position goes negative until the day's end).
            today = max(0, old_qty)
            today_cost = _div_round(old_cost * today, old_qty) if today else 0
            held_qty, held_cost = self.holdings.get(token, (0, 0))
            rest = qty - today
            basis = _div_round(held_cost * rest, held_qty) if held_qty else rest * price
            new_qty, cost = old_qty - qty, old_cost - today_cost - basis
            realised = qty * price - today_cost - basis
            opened = 0
        kind = "O" if isinstance(inst, Option) else "F" if isinstance(inst, Future) else "E"
        premium = kind == "O" or product == _P_CNC  # settles its value in cash at each fill
        cash = -sign * qty * price if premium else realised
        if opened and (kind != "O" or new_qty < 0):
            rate = _PAPER_MARGIN.get((kind, product))
            if rate:
                base = price
                if kind == "O":  # a short option: on its underlying's notional
                    quote = self.source.quote(str(underlying), at)
                    if quote is None:
                        raise OrderError(f"no price yet for {underlying}: a short option's margin is on its "
                                         "underlying's notional; retry once it has a price")
                    base = quote.ltp
                blocked += -(-rate * opened * base // 100)  # rounded up to the paisa
        # Only an exit is never refused for funds; a delivery buy pays its value in full, also
        # the buy-back of shares sold from the holding today (that position is no short).
        reduces = old_qty != 0 and not opened and (old_qty > 0) != (sign > 0) and not (product == _P_CNC and sign > 0)
        return _PaperFill(new_qty, cost, blocked if new_qty else 0, realised, cash, reduces)

    def _fill(self, order: Dict[str, Any], price: int, at: float, message: str = "",
              effect: Optional[_PaperFill] = None, available: Optional[int] = None) -> None:
        """Fill ``order`` whole at ``price`` at the time of its price, ``at`` (``effect`` and
        ``available``: already worked out)."""
        token, product = order["instrument"], order["product"]
        at = max(at, order["updated_at"] / 1000)  # a replayed tick's recorded time can precede the order
        if effect is None:
            try:
                effect = self._fill_effect(token, product, order["side"], order["qty"], price, at)
            except OrderError as exc:
                self._finish(order, _P_REJECTED, str(exc), at)
                return
        pos = self.positions.get((token, product))
        if available is None:
            available = self.available()
        before = available + order["blocked"]
        after = before + effect.cash - (effect.blocked - (pos.blocked if pos else 0))
        if after < 0 and after < before and not effect.reduces:  # a fill that adds to the funds always goes
            self._finish(order, _P_REJECTED, f"insufficient funds at the fill price {price / 100:.2f} "
                         f"(short by {-after / 100:.2f})", at)
            return
        if pos is None:
            pos = self.positions[(token, product)] = _PaperPosition(token, product)
        pos.qty, pos.cost, pos.blocked = effect.qty, effect.cost, effect.blocked
        pos.realised += effect.realised
        self.cash += effect.cash
        trade = {"id": self._new_id(), "order_id": order["id"], "instrument": token, "side": order["side"],
                 "qty": order["qty"], "price": price, "product": product, "at": _ms(at), "day": self.day}
        self.trades.append(trade)
        self._log["t"].append(trade)
        self._log["p"][(token, product)] = pos.row()
        order["blocked"] = 0
        self._finish(order, _P_COMPLETE, message, at, filled=order["qty"], average=price)

    def _close_position(self, pos: _PaperPosition, quote: _PaperQuote, at: float, why: str) -> None:
        """Offset a position with a filled MARKET order at ``quote.ltp``: the last price at the
        15:20 square-off (the documented rule; the bid or ask is a tick away on paper, so a long
        and a short squared off at once had differed by two ticks), or the settlement price when
        a contract expires."""
        side = _P_SELL if pos.qty > 0 else _P_BUY
        order = self._new_order(pos.instrument, side, abs(pos.qty), _P_MARKET, pos.product, None, None,
                                why.split()[0].lower(), "DAY", at)
        self._record(order, _P_OPEN, why)
        self._fill(order, quote.ltp, at, why)

    # -- orders -----------------------------------------------------------------------------

    def _new_id(self) -> str:
        """The next order or trade id: the session's date, then a running number."""
        if self._id_day != self.day:
            self._id_day, self._id_prefix = self.day, self.day[2:].replace("-", "")
        self.next_id += 1
        return f"{self._id_prefix}{self.next_id - 1:09d}"

    def _new_order(self, token: str, side: str, qty: int, order_type: str, product: str,
                   price: Optional[int], trigger: Optional[int], tag: Optional[str], validity: str,
                   at: float) -> Dict[str, Any]:
        at_ms = _ms(at)
        return {"id": self._new_id(), "instrument": token, "side": side, "qty": qty, "filled": 0,
                "order_type": order_type, "product": product, "price": price, "trigger_price": trigger,
                "average": None, "status": _P_PENDING, "message": "", "tag": tag, "validity": validity,
                "placed_at": at_ms, "updated_at": at_ms, "blocked": 0, "day": self.day}

    def _record(self, order: Dict[str, Any], status: str, message: str, rests: bool = True) -> None:
        """Insert a new order in ``status``; working ones join their instrument's book (unless
        it fills at once: ``rests`` False)."""
        order["status"], order["message"] = status, message
        self.orders[order["id"]] = order
        self._history(order)
        if rests and status in _P_LIVE:
            book = self._book(order["instrument"])
            book.orders[order["id"]] = order
            book.refresh()

    def _history(self, order: Dict[str, Any]) -> None:
        state = dict(order)
        self.history.setdefault(order["id"], []).append(state)
        self._log["h"].append(state)
        self._updates.append(state)

    def _update(self, order: Dict[str, Any], at: float, **changes: Any) -> None:
        order.update(changes, updated_at=_ms(at))
        self._history(order)
        book = self._books.get(order["instrument"])
        if book is not None and order["id"] in book.orders:
            book.refresh()

    def _finish(self, order: Dict[str, Any], status: str, message: str, at: float, **changes: Any) -> None:
        """An order's last state: it leaves its book, and its margin is released."""
        order.update(changes, status=status, message=message, blocked=0, updated_at=_ms(at))
        self._history(order)
        book = self._books.get(order["instrument"])
        if book is not None and book.orders.pop(order["id"], None) is not None:
            book.refresh()

    # -- the routes -------------------------------------------------------------------------

    def answer(self, name: str, request: _Request) -> Any:
        """The payload of route ``name`` (rows shaped like the paper section's parsers read)."""
        try:
            with self.lock:
                if self.closed:  # by another thread while this call waited: not a damaged file (move it aside?)
                    raise ConfigurationError("this paper client is closed; create a new TTConnect to use it again")
                self._fresh = False
                for _ in range(_PAPER_RETRIES):
                    seq, fresh = self._seq, self._fresh
                    try:
                        with self._txn:
                            self.now = self.clock()
                            self._advance(self.now)  # inside the transaction: matching up to now joins it
                            return self._handlers[name](request)
                    except _PaperConflict:
                        continue  # the account was re-read from the log: answer again on it
                    except TTConnectError:
                        if fresh:
                            raise  # refused on the account as the log had it during this call: final
                        if self._stale():
                            self._load()
                        if self._seq == seq:
                            raise  # refused on the account as the log has it
                        # refused on a state another process had changed since: answer again
        except self._db_error as exc:
            raise _paper_db_error(self.path, exc) from None
        import sqlite3

        raise _paper_db_error(self.path, sqlite3.OperationalError("database is busy: other processes kept writing"))

    def _route_get_profile(self, request: _Request) -> Dict[str, Any]:
        return {"user_id": self.account, "name": f"Paper account {self.account}", "capital": self.capital / 100}

    def _route_get_funds(self, request: _Request) -> Dict[str, Any]:
        available = self.available()
        unrealised = 0
        for pos in self.positions.values():
            if pos.product == _P_CNC and pos.qty < 0:
                continue  # shares sold from holdings: no short, nothing open (the holding's P&L is realised)
            quote = self.source.quote(pos.instrument, self.clock()) if pos.qty else None
            if quote is not None:
                unrealised += pos.qty * quote.ltp - pos.cost
        return {"available": available, "used": self.cash - available, "cash": self.cash, "unrealised": unrealised,
                "realised": sum(p.realised for p in self.positions.values())}

    def _route_get_holdings(self, request: _Request) -> List[Dict[str, Any]]:
        out = []
        for token, (qty, cost) in sorted(self.holdings.items()):
            today = self.positions.get((token, _P_CNC))
            sold = -today.qty if today is not None and today.qty < 0 else 0  # sold from the holding today
            if sold >= qty:
                continue
            if sold:
                qty, cost = qty - sold, cost - _div_round(cost * sold, qty)
            quote = self.source.quote(token, self.clock())
            out.append({"instrument": token, "qty": qty, "cost": cost, "ltp": quote.ltp if quote else None})
        return out

    def _route_get_positions(self, request: _Request) -> List[Dict[str, Any]]:
        out = []
        for (token, product), pos in sorted(self.positions.items()):
            quote = self.source.quote(token, self.clock()) if pos.qty else None
            exchange, symbol = token.split(":", 1)
            out.append({"instrument": token, "exchange": exchange, "symbol": symbol, "product": product,
                        "qty": pos.qty, "cost": pos.cost, "realised": pos.realised, "ltp": quote.ltp if quote else None})
        return out

    def _route_get_orders(self, request: _Request) -> List[Dict[str, Any]]:
        return [dict(o) for o in sorted(self.orders.values(), key=lambda o: o["id"])]

    def _order_row(self, order_id: str) -> Dict[str, Any]:
        order = self.orders.get(order_id)
        if order is None:
            raise OrderNotFoundError(f"paper account {self.account!r} has no order {order_id} today")
        return dict(order)

    def _route_get_order(self, request: _Request) -> Dict[str, Any]:
        return self._order_row(request.path["order_id"])

    def _route_get_order_history(self, request: _Request) -> List[Dict[str, Any]]:
        self._order_row(request.path["order_id"])
        return [dict(state) for state in self.history[request.path["order_id"]]]

    def _route_get_trades(self, request: _Request) -> List[Dict[str, Any]]:
        return [dict(t) for t in self.trades]

    def _route_place_order(self, request: _Request) -> Dict[str, Any]:
        b = request.body
        now = self.now
        token, side, qty = b["instrument"], b["side"], b["qty"]
        order_type, product = b["order_type"], b["product"]
        price, trigger, validity = b["price"], b["trigger_price"], b["validity"]
        if self.market_hours:
            self._check_session(now)
        if product == _P_MIS and self.squared == self.day:
            raise OrderError("MIS orders are not taken after the 15:20 square-off (it closed the day's intraday "
                             "positions); use CNC or NRML, or place it after the session's close for the next one")
        if qty > _PAPER_MAX_QTY:
            raise InvalidOrderError(f"qty {qty} is beyond what an exchange takes in one order (paper: at most "
                                    f"{_PAPER_MAX_QTY:,})")
        inst = self.info(token)[0]
        if isinstance(inst, (Future, Option)) and inst.expiry.isoformat() < self.day:
            raise InvalidOrderError(f"{inst} expired on {inst.expiry}: it cannot be traded")
        quote = self.source.quote(token, now)
        if quote is None and order_type != _P_MARKET:
            quote = self.source.wait_quote(token)
        buy = side == _P_BUY
        if order_type in _P_STOPS and quote is not None:
            if (buy and trigger <= quote.ltp) or (not buy and trigger >= quote.ltp):
                where = "above" if buy else "below"
                raise InvalidOrderError(f"trigger price {trigger / 100:.2f} would fire at once: a {side} stop's trigger "
                                        f"must be {where} the last price {quote.ltp / 100:.2f}")
        if validity == "IOC" and order_type in _P_STOPS:
            raise InvalidOrderError("IOC is for MARKET and LIMIT orders; stop-loss orders are DAY orders")
        if product == _P_CNC and not buy:
            self._check_holding(token, qty)
        # What the order would take if it filled at its own price (a stop at its limit or
        # trigger, a MARKET order at the touch): refused now if it does not fit.
        reference = price if price is not None else trigger if trigger is not None else (
            (quote.ask if buy else quote.bid) if quote is not None else None)
        blocked, effect, available = 0, None, self.available()
        if reference is not None:
            effect = self._fill_effect(token, product, side, qty, reference, now)
            pos = self.positions.get((token, product))
            need = effect.need(pos.blocked if pos else 0)
            if effect.refused(need, available):
                raise InsufficientFundsError(
                    f"paper account {self.account!r}: {side} {qty} {self.info(token)[0]} needs {need / 100:,.2f}, "
                    f"available {available / 100:,.2f}")
            blocked = need
        order = self._new_order(token, side, qty, order_type, product, price, trigger, b["tag"], validity, now)
        order["blocked"] = blocked
        stop = order_type in _P_STOPS
        at_once = quote is not None and order_type == _P_MARKET  # at the touch: its checked price
        self._record(order, _P_TRIGGER if stop else _P_OPEN, "", rests=not at_once)
        if at_once:  # nothing changed since it was checked: its effect and the funds stand
            self._fill(order, reference, now, effect=effect,  # type: ignore[arg-type]
                       available=available - blocked)
        elif quote is not None:
            self._match(order, quote._replace(at=now))
            if validity == "IOC" and order["status"] == _P_OPEN:
                self._finish(order, _P_CANCELLED, "IOC: no match at placement", now)
        elif validity == "IOC":
            self._finish(order, _P_CANCELLED, "IOC: no price to match at placement", now)
        else:
            self.source.watch(token)
        return {"order_id": order["id"]}

    def _check_session(self, now: float) -> None:
        local = _dt.datetime.fromtimestamp(now, IST)
        if not (_paper_trading_day(local.date()) and _PAPER_OPEN <= (local.hour, local.minute) < _PAPER_CLOSE):
            raise OrderError(f"the market is closed ({local:%a %d %b %H:%M} IST); paper orders are taken 09:15-15:30 "
                             "IST on trading days (config market_hours=True)")

    def _check_holding(self, token: str, qty: int, replacing: Optional[Dict[str, Any]] = None) -> None:
        """Refuse a delivery sale of ``qty`` beyond what is held and bought today, less what open
        sell orders (but the one it replaces, on a modify) already sell."""
        held = self.holdings.get(token, (0, 0))[0]
        today = self.positions.get((token, _P_CNC))
        selling = sum(o["qty"] for o in self._book(token).orders.values()
                      if o["side"] == _P_SELL and o["product"] == _P_CNC and o is not replacing)
        sellable = held + (today.qty if today else 0) - selling
        if qty > sellable:
            raise InsufficientFundsError(f"paper account {self.account!r} can sell at most {max(0, sellable)} of "
                                         f"{self.info(token)[0]} for delivery (held {held}, bought today "
                                         f"{max(0, today.qty if today else 0)}, in open sell orders {selling})")

    def _working(self, order_id: str) -> Dict[str, Any]:
        order = self.orders.get(order_id)
        if order is None:
            raise OrderNotFoundError(f"paper account {self.account!r} has no order {order_id} today")
        if order["status"] not in _P_LIVE:
            raise OrderError(f"order {order_id} is {order['status']}: only open orders can be changed")
        return order

    def _route_modify_order(self, request: _Request) -> Dict[str, Any]:
        b, now = request.body, self.clock()
        order = self._working(b["order_id"])
        changes = {k: b[k] for k in ("qty", "price", "trigger_price", "order_type")}
        trial = {**order, **changes}
        token, product = order["instrument"], order["product"]
        if product == _P_CNC and order["side"] == _P_SELL and trial["qty"] > order["qty"]:
            self._check_holding(token, trial["qty"], replacing=order)
        quote = self.source.quote(token, now)
        # What it would take filled at its own price, as at placement (a MARKET one at the touch)
        reference = trial["price"] if trial["price"] is not None else trial["trigger_price"]
        if reference is None and quote is not None:
            reference = quote.ask if order["side"] == _P_BUY else quote.bid
        if reference is not None:
            effect = self._fill_effect(token, product, order["side"], trial["qty"], reference, now)
            pos = self.positions.get((token, product))
            need = effect.need(pos.blocked if pos else 0)
            available = self.available() + order["blocked"]
            if effect.refused(need, available):
                raise InsufficientFundsError(f"paper account {self.account!r}: the modified order needs "
                                             f"{need / 100:,.2f}, available {available / 100:,.2f}")
            changes["blocked"] = need
        stop = trial["order_type"] in _P_STOPS
        untriggered = order["status"] == _P_TRIGGER or order["order_type"] not in _P_STOPS
        if stop and untriggered and quote is not None:
            buy, trigger = order["side"] == _P_BUY, trial["trigger_price"]
            if (buy and trigger <= quote.ltp) or (not buy and trigger >= quote.ltp):
                raise InvalidOrderError(f"trigger price {trigger / 100:.2f} would fire at once: the last price is "
                                        f"{quote.ltp / 100:.2f}")
        with self._transaction():
            status = _P_TRIGGER if stop and untriggered else _P_OPEN
            self._update(order, now, status=status, message="modified", **changes)
            if quote is not None:
                self._match(order, quote._replace(at=now))
        return {"order_id": order["id"]}

    def _route_cancel_order(self, request: _Request) -> Dict[str, Any]:
        order = self._working(request.path["order_id"])
        with self._transaction():
            self._finish(order, _P_CANCELLED, "cancelled by the user", self.clock())
        return {"order_id": order["id"]}

    def _route_calculate_margin(self, request: _Request) -> Dict[str, Any]:
        """Each leg's requirement by the account's rules, alone or against the open positions."""
        now = self.clock()
        with_positions = request.body["consider_positions"]
        saved = (dict(self.positions), self.holdings)
        total = span = premium = 0
        try:
            if not with_positions:
                self.positions, self.holdings = {}, {}
            for leg in request.body["legs"]:
                token, product = leg["instrument"], leg["product"]
                price = leg["price"]
                if price is None:
                    quote = self.source.quote(token, now)
                    if quote is None:
                        raise OrderError(f"no price yet for {self.info(token)[0]}: make the leg a LIMIT one with "
                                         "a price, or ask again once it has a price")
                    price = quote.ask if leg["side"] == _P_BUY else quote.bid
                effect = self._fill_effect(token, product, leg["side"], leg["qty"], price, now)
                pos = self.positions.get((token, product))
                before = pos.blocked if pos else 0
                total += effect.need(before)
                if effect.cash < 0 and effect.blocked == before:
                    premium += -effect.cash if isinstance(self.info(token)[0], Option) else 0
                span += max(0, effect.blocked - before)
                if with_positions:  # the next leg sees this one's effect
                    self.positions[(token, product)] = _PaperPosition(token, product, effect.qty, effect.cost,
                                                                      effect.blocked)
        finally:
            self.positions, self.holdings = saved
        return {"total": total, "span": span, "premium": premium}


def _paper_instrument(ctx: _Ctx, token: str) -> Instrument:
    """The instrument of a paper token, also one that has expired since (and left the DB)."""
    try:
        return ctx.instrument_by_token(token)
    except InstrumentNotFoundError:
        return _paper_unlisted(token)


def _paper_unlisted(token: str) -> Instrument:
    """The instrument a paper token names, built from its text alone (no DB row: it expired)."""
    cls, fields = _instrument_parts(token)
    values: Dict[str, Any] = {"exchange": Exchange(fields["exchange"]), "symbol": fields["symbol"]}
    if "expiry" in fields:
        values["expiry"] = _dt.date.fromisoformat(fields["expiry"])
    if "strike" in fields:
        values.update(strike=float(fields["strike"]), option_type=OptionType(fields["option_type"]))
    inst = _make(cls, 0, **values)
    object.__setattr__(inst, "_iid", _instrument_id(inst._key()))
    return inst  # type: ignore[no-any-return]


def _paper_db_error(path: str, exc: BaseException) -> TTConnectError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        err = BrokerError(f"the paper account file {path} is busy in another process ({text}); retry",
                          retryable=True)
        err.maybe_sent = False  # type: ignore[attr-defined]  # its transaction was rolled back: nothing changed
        return err
    return ConfigurationError(f"the paper account file {path} cannot be used ({text}); check the cache dir's free "
                              "space and permissions, or move the file aside to start the account afresh")


def _paper_reset(path: str) -> None:
    """Delete a paper account's file (and its WAL files): the account starts afresh."""
    for suffix in ("", "-wal", "-shm"):
        _remove_quietly(path + suffix)


def _paper_account_name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isascii() \
            or not all(c.isalnum() or c in "-_" for c in value):
        raise ConfigurationError(f"config 'account' must be 1-64 letters, digits, '-' or '_' (it names a file in the "
                                 f"cache dir), got {value!r}")
    return value


def _paper_capital(value: Any) -> int:
    if not _finite_positive(value) or value > 1e13 or round(value * 100) < 100:
        raise ConfigurationError(f"config 'capital' must be a positive amount of rupees (1 to 1e13), got {value!r}")
    return int(round(value * 100))


def _paper_instruments(config: Mapping[str, Any]) -> str:
    value = config.get("instruments", "bundled")
    if value not in ("bundled", "db") or not isinstance(value, str):
        raise ConfigurationError(f"config 'instruments' must be 'bundled' (the built-in NIFTY universe) or 'db' (the "
                                 f"real brokers' instruments already in the cache dir), got {value!r}")
    return value


def _paper_int_seed(seed: int) -> bool:
    """Whether an int seed can be written out: every price hashes its text, and str() of an int
    past Python's digit limit raises ValueError (at every price, not at init)."""
    try:
        str(seed)
    except ValueError:
        return False
    return True


def _paper_source(cfg: Mapping[str, Any], engine: "_PaperEngine") -> Any:
    prices = cfg.get("prices", "random")
    speed = cfg.get("replay_speed", 0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 <= speed < float("inf"):
        raise ConfigurationError(f"config 'replay_speed' must be 0 (as fast as possible) or a positive speed-up "
                                 f"(1: real time), got {speed!r}")
    if prices == "random":
        seed = cfg.get("seed", 0)
        if not isinstance(seed, (int, str)) or isinstance(seed, bool) or (isinstance(seed, str) and not _utf8(seed)):
            raise ConfigurationError(f"config 'seed' must be an int or a string (UTF-8 text), got {seed!r}")
        if isinstance(seed, int) and not _paper_int_seed(seed):
            raise ConfigurationError("config 'seed' is an int too long to write out (past Python's limit on an int's "
                                     "digits, 4300 unless changed); use a shorter int or a string")
        return _PaperRandomSource(engine, seed)
    if isinstance(prices, TTConnect):
        if "local" in prices._spec["hooks"]:
            raise ConfigurationError("config 'prices' must be a client of a real broker, not another paper one")
        return _PaperLiveSource(engine, prices)
    if isinstance(prices, (str, os.PathLike)):
        path = os.fspath(prices)
        if not os.path.isfile(path):
            what = "a directory, not a file" if os.path.isdir(path) else "no file"  # 'no file' misled for a directory
            raise ConfigurationError(f"config 'prices' is neither 'random', a live client, nor a tick file: {what} "
                                     f"{path!r}")
        return _PaperReplaySource(engine, path, float(speed))
    raise ConfigurationError(f"config 'prices' must be 'random', a TTConnect client of a real broker, or the path of "
                             f"a tick file, got {prices!r}")


_PAPER_NO_PRICE = float("inf")  # a live price must be above 0 and below this (NaN is neither)


def _quote_of_tick(tick: Tick, at: float) -> _PaperQuote:
    ltp = int(round(tick.ltp * 100))
    bid = ask = ltp
    if tick._depth:
        bids, asks, div = tick._depth
        # an empty level is 0; a garbled one (below 0, NaN from a float feed: no comparison holds)
        # is no touch either: a MARKET SELL filled at a bid of -500.00, and NaN raised, losing the tick
        if bids and bids[1] > 0:
            bid = int(round(bids[1] / div * 100))
        if asks and asks[1] > 0:
            ask = int(round(asks[1] / div * 100))
    return _PaperQuote(ltp, bid, ask, at, tick)


class _PaperRandomSource:
    """Prices from the seeded walk: any instrument, any time, and working orders matched step by
    step over every price since they were last matched."""

    feed = "random"
    _MAX_SCAN = 2 * _PAPER_DAY  # a gap up to this long is matched as it is; a longer one, from the session's start

    def __init__(self, engine: "_PaperEngine", seed: Any) -> None:
        self.engine = engine
        self.prices = _PaperRandomPrices(seed)
        self._closes: Dict[Tuple[str, str], float] = {}
        self._cached: Dict[str, _PaperQuote] = {}
        self._cached_step = -1

    def close(self) -> None:
        pass

    def watch(self, token: str) -> None:
        pass

    def _ltp(self, token: str, k: int) -> Tuple[int, int]:
        inst, underlying, _, tick = self.engine.info(token)
        price = self.prices.price(inst, underlying, k, tick)
        tick_p = max(1, int(round(tick * 100))) if tick > 0 else 5
        return max(tick_p, int(round(price * 100 / tick_p)) * tick_p), tick_p

    def quote_at(self, token: str, k: int) -> _PaperQuote:
        if k != self._cached_step:  # one step's quotes are asked for again and again: keep them
            self._cached.clear()
            self._cached_step = k
        quote = self._cached.get(token)
        if quote is None:
            ltp, tick = self._ltp(token, k)
            quote = self._cached[token] = _PaperQuote(ltp, max(tick, ltp - tick), ltp + tick,
                                                      _PAPER_EPOCH + k * _PAPER_STEP)
        return quote

    def quote(self, token: str, at: float) -> Optional[_PaperQuote]:
        return self.quote_at(token, _paper_step(at))

    def wait_quote(self, token: str) -> Optional[_PaperQuote]:
        return self.quote(token, self.engine.clock())

    def settlement(self, token: str, at: float) -> Optional[_PaperQuote]:
        """An expiring contract's last price; an option's is its intrinsic value at the
        underlying's last price (a far out-of-the-money one is worth nothing, not one tick)."""
        quote = self.quote(token, at)
        inst, underlying, _, _ = self.engine.info(token)
        if quote is None or not isinstance(inst, Option) or underlying is None:
            return quote
        spot = self.quote(str(underlying), at)
        if spot is None:
            return quote
        strike = int(round(inst.strike * 100))
        value = max(0, spot.ltp - strike if inst.option_type is OptionType.CE else strike - spot.ltp)
        return quote._replace(ltp=value, bid=value, ask=value)

    def match_until(self, until: float) -> None:
        engine = self.engine
        end = _paper_step(until)
        for token, book in list(engine._books.items()):
            if not book.orders:
                continue
            start = engine._scanned.get(token)
            if start is None:
                start = _paper_step(min(o["updated_at"] for o in book.orders.values()) / 1000)
            if start < end - self._MAX_SCAN:
                # No working order predates the previous session's close (the roll cancels them all):
                # matched from there, none of its path is missed. Two days alone skipped the weekend
                # of an order placed on Friday evening when the client next looked on Monday, so its
                # fill depended on when the client looked.
                day = _dt.date.fromisoformat(engine.day)
                opened = _paper_at(_paper_expiry_day(day - _dt.timedelta(days=1)), _PAPER_CLOSE)
                start = max(start, _paper_step(opened) - 1)
            for k in range(start + 1, end + 1):
                quote = self.quote_at(token, k)
                if book.moves(quote):
                    engine.on_quote(token, quote, past=True)
                    if not book.orders:
                        break
            engine._scanned[token] = end

    def previous_close(self, token: str, day: _dt.date) -> float:
        """The last price of the session before ``day``."""
        found = self._closes.get((token, day.isoformat()))
        if found is None:
            before = _paper_expiry_day(day - _dt.timedelta(days=1))
            found = self._ltp(token, _paper_step(_paper_at(before, _PAPER_CLOSE)) - 1)[0] / 100
            if len(self._closes) > 4096:
                self._closes.clear()
            self._closes[(token, day.isoformat())] = found
        return found

    def ticks(self, subs: Mapping[str, str], now: float) -> List[Tick]:
        """One tick per subscription at ``now``; matching up to ``now`` first."""
        self.engine.advance(now)
        k = _paper_step(now)
        day = _paper_session_day(now)
        out = []
        for token, mode in subs.items():
            quote = self.quote_at(token, k)
            ltp = quote.ltp / 100
            if mode == "ltp":
                tick = _TickBuilder(self.engine.info(token)[0], "ltp", ltp)
            else:
                close = self.previous_close(token, day)
                change = (ltp - close) * 100 / close if close else None
                depth = None
                if mode == "full":
                    lot = max(1, self.engine.info(token)[2])
                    step = quote.ask - quote.ltp
                    # Bid levels only down to one tick: a level at 0.00 holding a quantity (as a cheap
                    # option's had) is no bid, and a recorded tick with one was replayed without depth
                    bids = tuple(v for i in range(5) if quote.bid - i * step > 0
                                 for v in (lot * (3 + 2 * i), quote.bid - i * step, 1 + i))
                    asks = tuple(v for i in range(5) for v in (lot * (2 + 2 * i), quote.ask + i * step, 1 + i))
                    depth = (bids, asks, 100.0)
                tick = _TickBuilder(self.engine.info(token)[0], mode, ltp, None, None, None, None, None, None, None,
                                    None, close, change, None, None, None, 0, now if mode == "full" else 0, depth)
            tick.__class__ = Tick
            out.append(tick)
        return out


class _PaperReplaySource:
    """Prices from a recorded tick file (JSON Lines), replayed in file order by the feed: each
    tick moves the orders it reaches before it is delivered, so a file gives the same fills on
    every run."""

    feed = "replay"
    _BATCH = 256  # lines per feed frame

    def __init__(self, engine: "_PaperEngine", path: str, speed: float) -> None:
        self.engine, self.path, self.speed = engine, path, speed
        self._file: Optional[IO[str]] = None
        self._line = 0
        self._readline: Any = None  # the file's readline, at most _RECORD_LINE_MAX characters a call
        self._long = False  # the line being read is longer than _RECORD_LINE_MAX: skipped
        self._started: Optional[Tuple[float, float]] = None  # (first tick's time, monotonic then)
        # a file's instrument text -> (paper token, its instrument); None: not a paper instrument
        self._labels: Dict[Any, Optional[Tuple[str, Instrument]]] = {}
        self._unknown_texts = 0  # the texts of no paper instrument in _labels
        self._decoder: Any = None  # json.JSONDecoder, once the file is open
        self._blanks: Any = None  # the match of JSON's blanks (a regex's), likewise
        self.unknown = 0
        self._ready: List[Tuple[str, Tick, float]] = []  # ticks read, not yet replayed (a paced one waits)
        self.resume_at = 0.0  # paced: when (monotonic) the first ready tick is due

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def watch(self, token: str) -> None:
        pass

    def quote(self, token: str, at: float) -> Optional[_PaperQuote]:
        return self.engine._quotes.get(token)

    settlement = quote

    def wait_quote(self, token: str) -> Optional[_PaperQuote]:
        return self.engine._quotes.get(token)  # the file's ticks come with the feed

    def match_until(self, until: float) -> None:
        pass  # prices move only as the file is read

    def _label(self, text: Any) -> Optional[Tuple[str, Instrument]]:
        """The paper token and instrument a file's instrument text names (None: none; said once)."""
        if text in self._labels:
            return self._labels[text]
        try:
            token = self.engine.instruments.lookup(parse_instrument(text))[0]
        except (TTConnectError, ValueError):
            # Warned about and remembered once each, up to a bound: a file of endless distinct junk
            # is counted, not kept (and a text of over 100 characters, no instrument's, never is).
            if self._unknown_texts < _RECORD_UNKNOWN_MAX:
                self._unknown_texts += 1
                log.warning("paper replay: %s is not a paper instrument; its ticks are skipped", _short(str(text), 80))
                if not isinstance(text, str) or len(text) <= 100:
                    self._labels[text] = None
            return None
        label = self._labels[text] = (token, self.engine.info(token)[0])
        return label

    def read(self, subs: Mapping[str, str]) -> Tuple[List[Tick], bool]:
        """The next batch of the file: (ticks for the subscriptions, whether the file went on)."""
        import functools
        import json
        import re

        if self._file is None:
            self._file = open(self.path, encoding="utf-8", errors="replace")  # a bad line fails as JSON
            self._readline = functools.partial(self._file.readline, _RECORD_LINE_MAX)
            self._decoder = json.JSONDecoder(parse_constant=_record_no_constant)
            self._blanks = re.compile(r"[ \t\n\r]*").match
        engine = self.engine
        books = engine._books
        speed = self.speed
        out: List[Tick] = []
        # The batch's last tick of each instrument: made into the engine's quote once, when the
        # batch ends or before a price reaches an order.
        latest: Dict[str, Tuple[str, Tick, float]] = {}
        self.resume_at = 0.0
        with engine.lock:
            if not self._ready:
                lines = self._lines()
                if lines is None:
                    return out, False
                self._ready = self._ticks(lines)
            ready, self._ready = iter(self._ready), []
            try:
                for item in ready:
                    token, tick, at = item
                    if speed:  # paced: a tick not due yet waits (outside the lock) for its time
                        due = self._due(at)
                        if due > time.monotonic():
                            self._ready, self.resume_at = [item, *ready], due
                            return out, True
                    latest[token] = item
                    book = books.get(token)
                    if book is not None and (tick._depth is not None
                                             or not book.quiet_low < tick.ltp < book.quiet_high):
                        if tick._depth is None:  # the touch is the last price (a float: round gives an int)
                            ltp = bid = ask = round(tick.ltp * 100)
                        else:
                            ltp, bid, ask = _quote_of_tick(tick, at)[:3]
                        if book.reaches(ltp, bid, ask):  # on_quote's first test
                            self._store(latest)  # every price so far first: a fill may look at another instrument's
                            engine.on_quote(token, engine._quotes[token])
                            books = engine._books  # new books where the account was read again (another writer)
                    mode = subs.get(token)
                    if mode is not None:
                        out.append(tick if mode == tick.mode or mode == "full" else _downgraded(tick, mode))
                return out, True
            finally:
                self._ready += ready  # the ticks after one whose fill raised: replayed on the next read
                self._store(latest)

    def _lines(self) -> Optional[List[str]]:
        """The file's next lines, up to a batch (None: the end, for now: a file being written may
        grow). A line is read at most _RECORD_LINE_MAX characters at a time: a longer one is
        never held whole; it is skipped, its place taken by _LONG_LINE, which _ticks warns about
        with the line's number."""
        lines = list(itertools.islice(iter(self._readline, ""), self._BATCH))
        if not lines:
            if not self._long:
                return None
            self._long = False  # the file ends in the middle of a line too long to read
            return [_LONG_LINE]
        if not self._long and max(map(len, lines)) < _RECORD_LINE_MAX:
            return lines
        kept = []
        for piece in lines:
            if self._long:  # a piece of a line too long to read: its last piece ends it
                if piece[-1] == "\n":
                    self._long = False
                    kept.append(_LONG_LINE)
            elif len(piece) >= _RECORD_LINE_MAX and piece[-1] != "\n":  # readline stopped mid-line
                self._long = True
            else:
                kept.append(piece)
        return kept

    def _ticks(self, lines: List[str]) -> List[Tuple[str, Tick, float]]:
        """(paper token, tick, epoch seconds) of each tick in these next lines of the file. A line
        naming an instrument paper does not list is counted; a line that is no tick is skipped
        with a warning naming it."""
        number = self._line
        self._line += len(lines)
        joined = "[" + ",null,".join(lines) + "]"
        records = self._records(joined, len(lines))
        if records is not None:
            ticks = self._plain(records, lines, joined)
            if ticks is not None:
                return ticks
        ticks = []
        for item in lines if records is None else records:  # the lines, or their values decoded
            number += 1
            if item is _LONG_LINE:
                log.warning("paper replay: skipped line %d of %s (longer than %d characters: no tick)", number,
                            self.path, _RECORD_LINE_MAX)
                continue
            try:
                found = self._parse(item) if records is None else self._record(item)
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
                # OverflowError: a number beyond a float (ts of 400 digits, an infinite depth qty);
                # RecursionError: JSON nested deeper than the parser goes
                log.warning("paper replay: skipped line %d of %s (%s)", number, self.path, _describe(exc))
                continue
            if found is None:
                self.unknown += 1
            else:
                ticks.append(found)
        return ticks

    def _records(self, joined: str, count: int) -> Optional[List[Any]]:
        """The JSON values of ``count`` lines joined as ``joined`` ("[" + ",null,".join(lines) + "]"),
        decoded as one array (~1.5k instructions a line less than a call each), or None where that
        might not give what each line gives alone.

        No line may hold a "[". Every line but the file's last ends in a newline, which no string
        holds, so at each join the decoder is in an object or in the one array: in an object, a key
        would have to follow the comma, not "null"; so every join is two commas around one more
        element of the array, and each line gives at least one element. With 2n - 1 elements for n
        lines, the array ending at the end, each line gave one: its own value, blanks around it."""
        if joined.find("[", 1) != -1:  # an array could take the joins in as elements of its own
            return None
        try:
            values, end = self._decoder.raw_decode(joined)
        except (ValueError, RecursionError):  # some line is no JSON: read one by one, it gets its warning
            return None
        return values[::2] if end == len(joined) and len(values) == 2 * count - 1 else None

    def _plain(self, records: List[Any], lines: List[str], joined: str) -> Optional[List[Tuple[str, Tick, float]]]:
        """The ticks of a batch whose every line is a plain record, read without a call a line
        (~3k instructions a tick less than _record); None for any other batch, which _record
        reads (or refuses) line by line as it would each line alone.

        A plain record: an object of a listed instrument; ts and ltp in range; a known mode; no
        depth, no times; no text but the instrument's and the mode's, no true or false, no object
        inside (each a number or null, then; and a "[" is not in the batch). A line naming an
        instrument paper does not list is counted as _record would, whatever else it holds."""
        if "true" in joined or "false" in joined or joined.count("{") != len(records):
            return None  # with every line an object (checked below), no line holds a second "{"
        labels = self._labels
        first_ms, end_ms = _CLOCK_SPAN_MS
        ticks: List[Tuple[str, Tick, float]] = []
        quotes = unknown = 0  # the quotes the lines' keys and texts need; the lines of no listed instrument
        for item, line in zip(records, lines):
            if type(item) is not dict:
                return None
            get = item.get
            text = get("instrument")
            label = labels.get(text) if type(text) is str else None
            if label is None:
                if type(text) is not str or text not in labels:
                    return None
                unknown += 1  # known as no paper instrument: counted, whatever else the line holds
                quotes += line.count('"')
                continue
            ts, ltp, mode = get("ts"), get("ltp"), get("mode", "full")
            if not (type(ts) is int and type(ltp) is float and first_ms <= ts < end_ms
                    and 0.01 <= ltp < _RECORD_PRICE_MAX and mode in _STREAM_MODES and "bids" not in item
                    and "asks" not in item and "last_trade_time" not in item and "exchange_time" not in item):
                return None
            quotes += 2 * len(item) + (4 if "mode" in item else 2)
            tick = _TickBuilder(label[1], mode, ltp, get("last_qty"), get("avg_price"), get("volume"), get("buy_qty"),
                                get("sell_qty"), get("open"), get("high"), get("low"), get("close"), get("change"),
                                get("oi"), get("oi_day_high"), get("oi_day_low"), 0.0, 0.0, None)
            tick.__class__ = Tick
            ticks.append((label[0], tick, ts / 1000))
        # Each line has at least the quotes its keys and texts need (more for a duplicate key, an
        # escaped quote or a field of text): the batch has no more only if no line has.
        if joined.count('"') != quotes:
            return None
        self.unknown += unknown
        return ticks

    def _parse(self, line: str) -> Optional[Tuple[str, Tick, float]]:
        """(paper token, tick, epoch seconds) of one line of the file; None for an instrument paper
        does not list; an exception for a line that is no tick."""
        # Blanks around the value are skipped here, not by json.loads: its two frames more would
        # make a deeply nested line fail alone (on 3.11 frames and nesting share one limit) that
        # its batch, decoded one level deeper, reads.
        try:
            record, end = self._decoder.raw_decode(line, self._blanks(line).end())
            plain = self._blanks(line, end).end() == len(line)
        except ValueError:
            plain = False
        if not plain:  # no JSON value, or more than one: json.loads says which, as the warning
            import json

            record = json.loads(line, parse_constant=_record_no_constant)
        return self._record(record)

    def _record(self, record: Any) -> Optional[Tuple[str, Tick, float]]:
        """_parse's reading of a line's JSON value. The common line takes no call here beyond a
        dict's get; any other part takes the general path (_record_epoch, _record_price,
        _record_depth), so it is read, or refused, with the same result and message."""
        label = self._labels.get(record["instrument"]) or self._label(record["instrument"])
        if label is None:
            return None
        token, instrument = label
        ts = record["ts"]
        if type(ts) is int and _CLOCK_SPAN_MS[0] <= ts < _CLOCK_SPAN_MS[1]:
            at = ts / 1000
        else:
            at = _record_epoch(ts, "ts")
            if not at:
                raise ValueError("ts 0")
        get = record.get
        mode = get("mode", "full")
        if mode not in _STREAM_MODES:
            raise ValueError(f"mode {mode!r}")
        ltp = record["ltp"]
        if type(ltp) is not float or not 0.01 <= ltp < _RECORD_PRICE_MAX:
            ltp = _record_price(ltp, "ltp")
        bids, asks = get("bids"), get("asks")
        depth = _record_depth(bids, asks, instrument) if bids or asks else None
        last_trade, exchange = get("last_trade_time"), get("exchange_time")
        tick = _TickBuilder(instrument, mode, ltp, *[_record_number(get(name), name) for name in _RECORD_FIELDS],
                            0.0 if last_trade is None else _record_epoch(last_trade, "last_trade_time"),
                            0.0 if exchange is None else _record_epoch(exchange, "exchange_time"), depth)
        tick.__class__ = Tick
        return token, tick, at

    def _store(self, latest: Dict[str, Tuple[str, Tick, float]]) -> None:
        """Make the batch's last ticks so far the engine's quotes (the caller holds the engine's lock)."""
        quotes = self.engine._quotes
        for token, (_, tick, at) in latest.items():
            quotes[token] = _quote_of_tick(tick, at)
        latest.clear()

    def _due(self, at: float) -> float:
        """When (monotonic) a tick of file time ``at`` is due at the replay's speed."""
        if self._started is None:
            self._started = (at, time.monotonic())
        first, then = self._started
        return then + (at - first) / self.speed


def _downgraded(tick: Tick, mode: str) -> Tick:
    """A recorded tick in a lesser mode than it was recorded in: the fields of that mode, the
    rest unset (built as the feed builds ticks: dataclasses.replace costs ~10 times as much)."""
    if mode == "ltp":
        lesser = _TickBuilder(tick.instrument, "ltp", tick.ltp)
    else:
        lesser = _TickBuilder(tick.instrument, "quote", tick.ltp, tick.last_qty, tick.avg_price, tick.volume,
                              tick.buy_qty, tick.sell_qty, tick.open, tick.high, tick.low, tick.close, tick.change)
    lesser.__class__ = Tick
    return lesser


class _PaperLiveSource:
    """Prices from a live client of a real broker: its ticks move the paper orders (virtual money)."""

    feed = "live"
    _WAIT = 3.0  # seconds to wait for a first live price

    def __init__(self, engine: "_PaperEngine", live: "TTConnect") -> None:
        self.engine, self.live = engine, live
        self._watched: Set[str] = set()
        self._arrived = threading.Condition(threading.Lock())

    def close(self) -> None:
        self.live._price_feed_release(self._on_tick)  # the live client is the caller's: it stays open

    def watch(self, token: str) -> None:
        self.live._open()  # a closed live client: refused by name, watched before or not (no price comes any more)
        if token not in self._watched:
            instrument = self.engine.info(token)[0]
            try:
                # a feed of its own: the live client's subscriptions and on_tick stay the user's
                self.live._price_feed(self._on_tick).subscribe([instrument], "full", None)
            except InstrumentNotFoundError as exc:  # paper lists it, the live broker does not (bundled contracts)
                raise InstrumentNotFoundError(
                    f"{instrument} has no live price: paper's price source, the {self.live.broker} client, does not "
                    f"list it ({exc}); trade what that broker lists (paper config instruments='db', with the live "
                    "client's cache_dir)") from exc
            self._watched.add(token)  # once subscribed: a refusal (a closed live client) is met again next time

    def quote(self, token: str, at: float) -> Optional[_PaperQuote]:
        if self.live._closed:  # its feed is gone: its last price is no price now (MARKET orders filled at it)
            return None
        return self.engine._quotes.get(token)

    settlement = quote

    def wait_quote(self, token: str) -> Optional[_PaperQuote]:
        self.watch(token)
        deadline = time.monotonic() + self._WAIT
        with self._arrived:
            while token not in self.engine._quotes and time.monotonic() < deadline:
                self._arrived.wait(deadline - time.monotonic())
        return self.engine._quotes.get(token)

    def match_until(self, until: float) -> None:
        pass

    def _on_tick(self, tick: Tick) -> None:
        engine = self.engine
        if engine.closed:
            return
        if not 0 < tick.ltp < _PAPER_NO_PRICE:
            # Kite sends ltp 0 for a contract not traded yet today (and a garbled feed may send
            # less, or NaN): no price at all, yet it filled a stop or a MARKET order at 0.00
            return
        token = str(tick.instrument)
        if token not in engine._infos and not engine._known(token):
            return
        quote = _quote_of_tick(tick, engine.clock())
        with self._arrived:  # first, for a call that waits for this price (it holds the engine's lock)
            engine._quotes[token] = quote
            self._arrived.notify_all()
        with engine.lock:
            if engine.closed:  # a tick in flight as the paper client closed: its account file is shut
                return
            engine.on_quote(token, quote)
            for sock in list(engine.sockets):
                sock.live_tick(token, tick)


def _tick_record(tick: Tick, at: float) -> Dict[str, Any]:
    """A tick as one line of a tick file (JSON Lines): the instrument as ``str()`` prints it,
    times in epoch milliseconds, depth as [price, qty, orders] lists."""
    record: Dict[str, Any] = {"instrument": str(tick.instrument), "ts": int(round(at * 1000)), "mode": tick.mode}
    for name in ("ltp", "last_qty", "avg_price", "volume", "buy_qty", "sell_qty", "open", "high", "low", "close",
                 "change", "oi", "oi_day_high", "oi_day_low"):
        value = getattr(tick, name)
        if value is not None:
            record[name] = value
    for name, epoch in (("last_trade_time", tick._last_trade_epoch), ("exchange_time", tick._exchange_epoch)):
        if epoch:
            record[name] = int(round(epoch * 1000))
    if tick.mode == "full":
        record["bids"] = [[d.price, d.qty, d.orders] for d in tick.bids]
        record["asks"] = [[d.price, d.qty, d.orders] for d in tick.asks]
    return record


_RECORD_PRICE_MAX = 1e11  # rupees: beyond any listed price (the order checks' bound too)
_RECORD_LINE_MAX = 1 << 16  # characters: a tick with full depth is under 2k; a longer line is no tick
_LONG_LINE = "\x00 a line longer than _RECORD_LINE_MAX"  # its stand-in (no JSON: its batch is read line by line)
_RECORD_UNKNOWN_MAX = 10_000  # distinct non-paper instrument texts remembered (and warned about) per file


# A tick's optional fields, in Tick's order
_RECORD_FIELDS = ("last_qty", "avg_price", "volume", "buy_qty", "sell_qty", "open", "high", "low", "close", "change",
                  "oi", "oi_day_high", "oi_day_low")


def _record_number(value: Any, what: str) -> Any:
    """A tick file's number as JSON has it (an int or a float; None stays None). Text, a bool, a
    list or an object is refused: a tick's numbers are JSON numbers (NaN and Infinity, no JSON,
    are refused by the decoder)."""
    if value is None or type(value) is int or type(value) is float:
        return value
    raise ValueError(f"{what} {_short(repr(value), 40)} is no number")


def _record_no_constant(name: str) -> Any:
    raise ValueError(f"{name} is no number")  # JSON has no NaN or Infinity; Python's decoder reads them


def _record_price(value: Any, what: str) -> float:
    price = _record_number(value, what)
    if price is None or not 0.01 <= price < _RECORD_PRICE_MAX:
        raise ValueError(f"{what} {_short(repr(value), 40)}")
    return float(price)


def _record_epoch(value: Any, what: str) -> float:
    """Epoch seconds of a tick file's milliseconds (0 for none), refused outside 2000-2100."""
    if value is None or value == 0:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not _CLOCK_SPAN[0] <= value / 1000 < _CLOCK_SPAN[1]:
        raise ValueError(f"{what} {value!r} is no time in epoch milliseconds")
    return value / 1000


def _record_depth(bids: Any, asks: Any, instrument: Instrument) -> Optional[Tuple[Any, Any, float]]:
    """A tick file's depth ([price, qty, orders] per level) as a Tick holds it; None (with a
    warning) for prices that cannot be: negative, zero, a crossed book. A malformed level fails
    the line."""
    def side(levels: Any) -> Tuple[Any, ...]:
        out: List[Any] = []
        for price, qty, orders in levels or ():
            level = (_record_number(qty, "depth qty"), _record_number(price, "depth price"),
                     _record_number(orders, "depth orders"))
            if None in level:
                raise ValueError(f"depth level {_short(repr([price, qty, orders]), 60)} lacks a number")
            out += (int(level[0]), float(level[1]), level[2])
        return tuple(out)

    bid_levels, ask_levels = side(bids), side(asks)
    crossed = bool(bid_levels and ask_levels and bid_levels[1] > ask_levels[1])
    if crossed or not all(0.01 <= p < _RECORD_PRICE_MAX for p in bid_levels[1::3] + ask_levels[1::3]):
        log.warning("paper replay: a tick of %s has impossible depth; its depth is ignored", instrument)
        return None  # the tick keeps its last price only
    return bid_levels, ask_levels, 1.0


class _PaperSocket:
    """The paper feed, shaped like a websocket for the streamer: ticks of the subscribed
    instruments as binary frames (lists of Ticks), order updates as text frames."""

    def __init__(self, engine: "_PaperEngine") -> None:
        self.engine = engine
        self.subs: Dict[str, str] = {}  # paper token -> mode
        self.connected = False
        self._timeout = 0.5
        self._wake = threading.Condition(threading.Lock())
        self._orders: List[bytes] = []
        self._live: List[Tick] = []
        self._closed = False
        self._next = time.monotonic()
        self._ws = _websocket_module()

    # the streamer's side
    def connect(self, url: str, header: Sequence[str] = (), timeout: float = 0) -> None:
        engine = self.engine
        with engine.lock:
            engine.sockets.append(self)
            since = time.monotonic() - _PAPER_BACKLOG_SECONDS
            for at, rows in engine._backlog:
                if at >= since:
                    for row in rows:
                        self.order_update(row)
            engine._backlog.clear()
        self.connected = True

    def settimeout(self, timeout: float) -> None:
        self._timeout = timeout

    def send(self, message: str) -> None:
        import json

        request = json.loads(message)
        with self._wake:
            for token in request.get("unsubscribe", ()):
                self.subs.pop(token, None)
            for token in request.get("subscribe", ()):
                self.subs[token] = request["mode"]  # a live source watches it already: _paper_stream_watch
            self._wake.notify_all()

    def ping(self, payload: str = "") -> None:
        pass

    def abort(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        with self.engine.lock:
            if self in self.engine.sockets:
                self.engine.sockets.remove(self)

    def close(self, timeout: float = 0) -> None:
        self.abort()
        self.connected = False

    # the engine's side
    def order_update(self, row: Mapping[str, Any]) -> None:
        import json

        with self._wake:
            self._orders.append(json.dumps({"order": row}).encode())
            self._wake.notify_all()

    def live_tick(self, token: str, tick: Tick) -> None:
        mode = self.subs.get(token)
        if mode is not None:
            with self._wake:
                self._live.append(tick if mode in (tick.mode, "full") else _downgraded(tick, mode))
                self._wake.notify_all()

    def recv_data(self, control_frame: bool = False) -> Tuple[int, Any]:
        abnf = self._ws.ABNF
        deadline = time.monotonic() + self._timeout
        source = self.engine.source
        while True:
            with self._wake:
                if self._closed:
                    raise self._ws.WebSocketException("the paper feed is closed")
                if self._orders:
                    return abnf.OPCODE_TEXT, self._orders.pop(0)
                if self._live:
                    ticks, self._live = self._live, []
                    return abnf.OPCODE_BINARY, ticks
                subs = dict(self.subs)
            now = time.monotonic()
            wake_at = deadline
            if source.feed == "replay" and subs:
                ticks, more = source.read(subs)
                if ticks:
                    return abnf.OPCODE_BINARY, ticks
                if more and not source.resume_at:
                    continue
                if more:  # paced: the next tick is due at resume_at
                    wake_at = min(wake_at, source.resume_at)
            elif source.feed == "random" and subs:
                if now >= self._next:
                    self._next = max(self._next + self.engine.tick_interval, now)
                    return abnf.OPCODE_BINARY, source.ticks(subs, self.engine.clock())
                wake_at = min(wake_at, self._next)
            if now >= deadline:
                raise self._ws.WebSocketTimeoutException("no paper tick yet")
            with self._wake:
                if not (self._closed or self._orders or self._live):
                    self._wake.wait(max(0.0, wake_at - now))


def _paper_socket(local: Any) -> _PaperSocket:
    return _PaperSocket(local)


# -- the spec ---------------------------------------------------------------------------------

def _paper_session(call: _Call, config: Mapping[str, Any], now: float) -> SessionData:
    return SessionData(broker="paper", mode=AuthMode.AUTO, access_token="paper",
                       user_id=str(config.get("account", "default")))


def _paper_local(local: "_LocalContext") -> _PaperEngine:
    return _PaperEngine(local)


def _paper_time(ms: Any) -> Optional[_dt.datetime]:
    return _dt.datetime.fromtimestamp(ms / 1000, IST) if ms else None


def _paper_rupees(paise: Any) -> Optional[float]:
    return None if paise is None else paise / 100


def _paper_profile(ctx: _Ctx, data: Any) -> Profile:
    return Profile(user_id=data["user_id"], name=data["name"], email=None, broker="paper",
                   exchanges=(Exchange.NSE, Exchange.BSE, Exchange.NFO, Exchange.BFO),
                   products=(ProductType.CNC, ProductType.MIS, ProductType.NRML), raw=data)


def _paper_funds(ctx: _Ctx, data: Any) -> Fund:
    return Fund(available=data["available"] / 100, used=data["used"] / 100, total=data["cash"] / 100, collateral=None,
                m2m_unrealized=data["unrealised"] / 100, m2m_realized=data["realised"] / 100,
                utilised_debits=data["used"] / 100, raw=data)


def _paper_holding(ctx: _Ctx, row: Mapping[str, Any]) -> Holding:
    qty, cost, ltp = row["qty"], row["cost"], _paper_rupees(row["ltp"])
    avg = cost / qty / 100
    return Holding(instrument=_paper_instrument(ctx, row["instrument"]), qty=qty, avg_price=avg, ltp=ltp,
                   pnl=None if ltp is None else round(qty * ltp - cost / 100, 2),
                   pnl_percent=_pnl_percent(avg, ltp, None), raw=row)


def _paper_position(ctx: _Ctx, row: Mapping[str, Any]) -> Position:
    qty, cost, ltp = row["qty"], row["cost"], _paper_rupees(row["ltp"])
    product = ProductType(row["product"])
    sold_held = product is ProductType.CNC and qty < 0  # a sale of held shares: nothing is open
    unrealised = 0.0 if ltp is None or not qty or sold_held else qty * ltp - cost / 100
    return Position(instrument=_paper_instrument(ctx, row["instrument"]), qty=qty,
                    avg_price=cost / qty / 100 if qty else 0.0, ltp=ltp,
                    pnl=round(row["realised"] / 100 + unrealised, 2), product=product, raw=row)


def _paper_order(ctx: _Ctx, row: Mapping[str, Any]) -> Order:
    status = OrderStatus(row["status"])
    qty, filled = row["qty"], row["filled"]
    return Order(id=row["id"], instrument=_paper_instrument(ctx, row["instrument"]), side=Side(row["side"]), qty=qty,
                 filled_qty=filled, pending_qty=qty - filled if status in _LIVE_STATUSES else 0,
                 order_type=OrderType(row["order_type"]), product=ProductType(row["product"]), status=status,
                 price=_paper_rupees(row["price"]), trigger_price=_paper_rupees(row["trigger_price"]),
                 average_price=_paper_rupees(row["average"]), tag=row["tag"], status_message=row["message"] or None,
                 placed_at=_paper_time(row["placed_at"]), updated_at=_paper_time(row["updated_at"]), raw=row)


def _paper_trade(ctx: _Ctx, row: Mapping[str, Any]) -> Trade:
    return Trade(trade_id=row["id"], order_id=row["order_id"], instrument=_paper_instrument(ctx, row["instrument"]),
                 side=Side(row["side"]), qty=row["qty"], avg_price=row["price"] / 100,
                 trade_value=row["qty"] * row["price"] / 100, product=ProductType(row["product"]),
                 timestamp=_paper_time(row["at"]), raw=row)


def _paper_margin(ctx: _Ctx, data: Any) -> Margin:
    total = data["total"] / 100
    return Margin(total=total, span=data["span"] / 100, exposure=None, option_premium=data["premium"] / 100,
                  final_total=total, benefit=0.0, raw=data)


def _paper_raw_status(row: Mapping[str, Any]) -> OrderStatus:
    return OrderStatus(row["status"])


def _paper_placed(ctx: _Ctx, data: Any) -> str:
    return data["order_id"]


def _paper_place_order(req: _OrderRequest) -> _Request:
    # ``_value_``: the member's value as stored (``.value`` is a descriptor call, ~2.5k instructions each here)
    price, trigger = req.price, req.trigger_price
    return _Request(_NO_ARGS, None, {
        "instrument": req.token, "side": req.side._value_, "qty": req.qty, "order_type": req.order_type._value_,
        "product": _product(req)._value_, "price": None if price is None else _to_paise(price),
        "trigger_price": None if trigger is None else _to_paise(trigger), "tag": req.tag, "validity": req.validity})


def _paper_modify_order(current: Order, req: _OrderRequest) -> _Request:
    return _Request(path={"order_id": current.id},
                    body={"order_id": current.id, "qty": req.qty, "order_type": req.order_type.value,
                          "price": _to_paise(req.price), "trigger_price": _to_paise(req.trigger_price)})


def _paper_cancel_order(order_id: str, raw: Mapping[str, Any]) -> _Request:
    return _Request(path={"order_id": order_id})


def _paper_margin_body(legs: Sequence[_OrderRequest], consider_positions: bool) -> _Request:
    return _Request(body={"consider_positions": consider_positions, "legs": [
        {"instrument": leg.token, "side": leg.side.value, "qty": leg.qty, "product": _product(leg).value,
         "price": _to_paise(leg.price if leg.price is not None else leg.trigger_price)} for leg in legs]})


def _paper_stream_connect(call: _Call, config: Mapping[str, Any], session: SessionData, url: str
                          ) -> Tuple[str, Dict[str, str]]:
    return url, {}


def _paper_stream_key(instrument: Instrument, token: str) -> str:
    return token


def _paper_stream_watch(local: "_PaperEngine", token: str) -> None:
    """A live price source must carry what is subscribed, checked here: refused on the feed's
    thread, the paper feed failed its connect and retried forever, every instrument's ticks lost."""
    if local.source.feed == "live":
        local.source.watch(token)


def _paper_subscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    import json

    by_mode: Dict[str, List[str]] = {}
    for _, token, mode in items:
        by_mode.setdefault(mode, []).append(token)
    return [json.dumps({"subscribe": tokens, "mode": mode}) for mode, tokens in by_mode.items()]


def _paper_unsubscribe(items: Sequence[_Sub]) -> List[Union[str, bytes]]:
    import json

    return [json.dumps({"unsubscribe": [token for _, token, _ in items]})]


def _paper_decode(data: Any, instruments: Mapping[Any, Any], out: List[Any]) -> None:
    out.extend(data)  # the paper feed hands over finished Ticks


def _paper_text(text: str) -> Tuple[str, Any]:
    import json

    return "order", json.loads(text)["order"]


_PAPER: BrokerSpec = _broker(
    id="paper",
    name="Paper trading (offline)",
    urls={},  # nothing to connect to: the routes and the feed are answered in-process
    master=_Master(published=_PAPER_CLOSE, build=_paper_master, label=_paper_master_label),  # the next session's
    auth=(_Flow("paper", AuthMode.AUTO, needs=(), trigger=(), obtain=_paper_session),),
    session_expiry=(0, 0),
    routes={
        "get_profile": _Route("GET", "profile", parse=_paper_profile),
        "get_funds": _Route("GET", "funds", parse=_paper_funds),
        "get_holdings": _Route("GET", "holdings", row=_paper_holding),
        "get_positions": _Route("GET", "positions", row=_paper_position),
        "get_orders": _Route("GET", "orders", row=_paper_order),
        "get_order": _Route("GET", "order", about_order=True, build=_order_id_path, parse=_paper_order),
        "get_order_history": _Route("GET", "history", about_order=True, build=_order_id_path, row=_paper_order),
        "get_trades": _Route("GET", "trades", row=_paper_trade),
        "place_order": _Route("POST", "place", idempotent=False, about_order=True, build=_paper_place_order,
                              parse=_paper_placed),
        "modify_order": _Route("PUT", "modify", about_order=True, build=_paper_modify_order),
        "cancel_order": _Route("DELETE", "cancel", about_order=True, build=_paper_cancel_order),
        "calculate_margin": _Route("POST", "margin", build=_paper_margin_body, parse=_paper_margin),
    },
    rate_limits={"default": [(1000, 1.0)]},
    exchanges=frozenset({Exchange.NSE, Exchange.BSE, Exchange.NFO, Exchange.BFO}),
    products={ProductType.CNC: "CNC", ProductType.MIS: "MIS", ProductType.NRML: "NRML"},
    order_types={OrderType.MARKET: "MARKET", OrderType.LIMIT: "LIMIT", OrderType.SL: "SL", OrderType.SL_M: "SL-M"},
    validities=("DAY", "IOC"),
    max_tag_len=20,
    row_fields={"order_id": "id", "position_qty": "qty", "exchange": "exchange", "symbol": "symbol"},
    options=("capital", "seed", "prices", "account", "instruments", "market_hours", "replay_speed", "tick_interval"),
    has={"order_history": True, "margin": True, "margin_with_positions": True, "order_updates": True,
         "streaming": True},
    stream_max_tokens=5000,
    stream_silence_timeout=3600.0,  # a replay that reached its end is quiet, not broken
    hooks={
        "local": _paper_local,
        "raw_status": _paper_raw_status,
        "stream_socket": _paper_socket,
        "stream_connect": _paper_stream_connect,
        "stream_key": _paper_stream_key,
        "stream_watch": _paper_stream_watch,
        "stream_subscribe": _paper_subscribe,
        "stream_unsubscribe": _paper_unsubscribe,
        "stream_decode": _paper_decode,
        "stream_text": _paper_text,
    },
)


# ============================================================================
# 6z. The registry
# ============================================================================

_BROKERS: Mapping[str, BrokerSpec] = {spec["id"]: spec for spec in (_ZERODHA, _ANGELONE, _UPSTOX, _PAPER)}
_DEFAULT_BROKER = "paper"  # the command line's: no account, no network


def _spec_for(broker: Any) -> BrokerSpec:
    spec = _BROKERS.get(broker) if isinstance(broker, str) else None
    if spec is None:
        raise UnsupportedFeatureError(f"unknown broker {broker!r}; known brokers: {', '.join(sorted(_BROKERS))}")
    return spec


# ============================================================================
# 7. Transport
# ============================================================================


class _RateLimiter:
    """Client-side pacing per endpoint class: sliding windows, e.g. [(9, 1.0), (500, 60.0)].

    ``acquire`` reserves the earliest slot every window allows and sleeps until it (FIFO), so
    threads share the budget fairly and the broker never sees a burst over its limit.
    """

    def __init__(self, limits: Mapping[str, Sequence[Tuple[int, float]]], clock: Callable[[], float],
                 sleep: Callable[[float], None]) -> None:
        import collections

        self._limits = {name: tuple(windows) for name, windows in limits.items()}
        self._log: Dict[str, "collections.deque[float]"] = {
            name: collections.deque(maxlen=max(n for n, _ in windows)) for name, windows in self._limits.items()}
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()

    def acquire(self, name: str) -> None:
        key = name if name in self._limits else "default"
        windows, stamps = self._limits[key], self._log[key]
        with self._lock:
            now = self._clock()
            slot = max(now, stamps[-1]) if stamps else now
            for calls, per in windows:
                if len(stamps) >= calls:
                    slot = max(slot, stamps[-calls] + per)
            stamps.append(slot)
        if slot > now:
            self._sleep(slot - now)


class _Response:
    __slots__ = ("status", "headers", "text")

    def __init__(self, status: int, headers: Mapping[str, str], text: str) -> None:
        self.status, self.headers, self.text = status, headers, text


class _Watch:
    __slots__ = ("deadline", "conn", "expired", "done")

    def __init__(self, deadline: float) -> None:
        self.deadline, self.conn, self.expired, self.done = deadline, None, False, False


class _Watchdog:
    """Ends the HTTP calls that outlive their deadline by shutting their socket down.

    A socket timeout bounds each read, not their sum: a server trickling its status line a byte
    at a time held a call for as long as it liked. Each call is armed with its deadline; the
    pool notes the connection it lends on the calling thread's watch (``_watched_adapter``), and
    at the deadline this thread shuts that socket down, which ends the blocked read at once.
    Arming costs a lock and a dict entry: the thread wakes at deadlines, not per call.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: Dict[int, _Watch] = {}
        self._wake_at = float("inf")  # when the thread next looks (inf: asleep until armed)
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._current = threading.local()  # the calling thread's watch: one call at a time per thread

    def arm(self, deadline: float) -> _Watch:
        watch = _Watch(deadline)
        with self._cond:
            self._armed[id(watch)] = watch
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ttconnect-deadline", daemon=True)
                self._thread.start()
            elif deadline < self._wake_at:
                self._cond.notify()
        self._current.watch = watch
        return watch

    def note(self, conn: Any) -> None:
        """Record the connection the calling thread's call goes out on."""
        watch = getattr(self._current, "watch", None)
        if watch is not None:
            watch.conn = conn

    def disarm(self, watch: _Watch) -> bool:
        """Stop watching (again is harmless); True when the deadline passed and the socket was shut."""
        self._current.watch = None
        with self._cond:
            self._armed.pop(id(watch), None)
            watch.done = True
        return watch.expired

    @staticmethod
    def _end(watch: _Watch) -> None:
        """Mark a call expired and shut its socket: its blocked read ends at once."""
        import socket

        watch.expired = True
        sock = getattr(watch.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed: the call is ending anyway
                pass

    def _run(self) -> None:
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                for key, watch in list(self._armed.items()):
                    if watch.deadline <= now:
                        del self._armed[key]
                        self._end(watch)
                self._wake_at = min((w.deadline for w in self._armed.values()), default=float("inf"))
                self._cond.wait(None if self._wake_at == float("inf") else self._wake_at - now)

    def stop(self) -> None:
        """End the thread without waiting for it (for a transport collected unclosed: its finalizer
        may run on any thread, this one included, so it cannot join)."""
        with self._cond:
            self._stop = True
            self._thread = None
            self._cond.notify()

    def close(self) -> None:
        """End every call in progress at once, and the thread."""
        with self._cond:
            ending = list(self._armed.values())
            for watch in ending:
                self._end(watch)
            self._armed.clear()
            thread, self._thread = self._thread, None
            self._stop = True
            self._cond.notify()
        if thread is not None:
            thread.join(1.0)
        with self._cond:
            self._stop = False  # a later call starts a new thread
        # A call whose connection was lent but not yet connected had no socket to shut: it would
        # send and wait out its timeout (a feed's authorize held close() for 7 s). Shut each as
        # soon as its socket exists, for up to a second.
        late = [w for w in ending if getattr(w.conn, "sock", None) is None]
        give_up = time.monotonic() + 1.0
        while late and time.monotonic() < give_up:
            time.sleep(0.005)
            for watch in list(late):
                if watch.done or getattr(watch.conn, "sock", None) is not None:
                    if not watch.done:
                        self._end(watch)
                    late.remove(watch)


def _watched_adapter(requests: Any, watchdog: _Watchdog) -> Any:
    """A requests HTTPAdapter class whose pools note each connection they lend on ``watchdog``."""
    import urllib3

    def noting(pool_class: Any) -> Any:
        class Pool(pool_class):  # type: ignore[misc,valid-type]
            def _get_conn(self, timeout: Optional[float] = None) -> Any:
                conn = super()._get_conn(timeout)
                watchdog.note(conn)
                return conn
        return Pool

    pools = {"http": noting(urllib3.HTTPConnectionPool), "https": noting(urllib3.HTTPSConnectionPool)}

    class Adapter(requests.adapters.HTTPAdapter):  # type: ignore[misc,name-defined]
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if type(manager) is urllib3.ProxyManager:  # a SOCKS manager brings its own pools
                manager.pool_classes_by_scheme = pools
            return manager
    return Adapter


class _Transport:
    """The one HTTP path: a pooled, kept-alive ``requests.Session`` (imported on first use).

    It knows HTTP, not brokers: one request in, status/headers/text out, or a NetworkError
    that says whether the request may have reached the server (``maybe_sent``). Each attempt
    is bounded by ``timeout`` seconds in all, also against a server that trickles its reply
    (its headers included: see _Watchdog).
    """

    def __init__(self, timeout: float, max_retries: int, sleep: Callable[[float], None], broker: str = "") -> None:
        self.broker = broker  # named in its records: a process may hold several brokers' clients
        self.timeout = timeout
        self.max_retries = max_retries
        self.sleep = sleep
        self._session: Optional["requests.Session"] = None
        self._proxy_cache: Dict[str, Dict[str, str]] = {}
        self._lock = threading.Lock()
        self._watchdog = _Watchdog()
        # The deadline thread holds the watchdog, not this transport: a client dropped without
        # close() (a notebook cell run again) would leave one idle thread behind per client.
        weakref.finalize(self, self._watchdog.stop)

    def session(self) -> "requests.Session":
        with self._lock:
            if self._session is None:
                requests = _import_requests()
                session = requests.Session()
                # The environment (proxy variables, CA bundle) is read once here instead of on
                # every request, which costs requests ~100 us a call; and ~/.netrc is never
                # consulted, so it cannot replace the broker's Authorization header.
                session.trust_env = False
                session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
                adapter = _watched_adapter(requests, self._watchdog)(pool_connections=4, pool_maxsize=16)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                self._session = session
            return self._session

    def _proxies(self, url: str) -> Dict[str, str]:
        """Environment proxies for ``url``'s host (honouring NO_PROXY), looked up once per host."""
        host = url.split("://", 1)[-1].split("/", 1)[0]
        proxies = self._proxy_cache.get(host)
        if proxies is None:
            requests = _import_requests()
            proxies = self._proxy_cache[host] = requests.utils.get_environ_proxies(url)
        return proxies

    def request(self, method: str, url: str, headers: Mapping[str, str], params: Optional[Mapping[str, Any]],
                form: Optional[Mapping[str, Any]], json_body: Any) -> _Response:
        requests = _import_requests()
        import urllib3.exceptions as urllib3_errors  # loaded with requests
        started = time.monotonic()
        deadline = started + self.timeout
        watch = self._watchdog.arm(deadline)
        try:
            # Never follows a redirect: requests would re-send a POST as a GET (a place_order read
            # back as the order book) or re-send a login's password to whatever host it names.
            resp = self.session().request(method, url, headers=headers, params=params, data=form, json=json_body,
                                          timeout=self.timeout, proxies=self._proxies(url), stream=True,
                                          allow_redirects=False)
            with resp:
                body = self._read(resp, deadline, method)
                # before the connection goes back to the pool; a shut socket may have cut the body short
                if self._watchdog.disarm(watch):
                    body = None
        except requests.RequestException as exc:
            sent = not _never_sent(exc)
            if self._watchdog.disarm(watch):
                err = NetworkError(f"{method} {_path_of(url)}: no complete reply within {self.timeout:g} s"
                                   + (" (the request may have reached the broker)" if sent else " (nothing was sent)"))
                err.maybe_sent = sent  # type: ignore[attr-defined]
                raise err from None
            text = _scrub(str(exc), headers.values())
            err = NetworkError(f"{method} {_path_of(url)} failed: {exc.__class__.__name__}: {_short(text)}"
                               + (" (the request may have reached the broker)" if sent else " (nothing was sent)"))
            err.maybe_sent = sent  # type: ignore[attr-defined]
            raise err from None
        except (urllib3_errors.HTTPError, OSError) as exc:  # the body's own reads: requests leaves them raw
            if self._watchdog.disarm(watch):
                body = None
            else:
                err = NetworkError(f"{method} {_path_of(url)}: the reply broke off ({exc.__class__.__name__}) "
                                   "(the request may have reached the broker)")
                err.maybe_sent = True  # type: ignore[attr-defined]
                raise err from None
        finally:
            self._watchdog.disarm(watch)
        if body is None:
            err = NetworkError(f"{method} {_path_of(url)}: no complete reply within {self.timeout:g} s "
                               "(the request may have reached the broker)")
            err.maybe_sent = True  # type: ignore[attr-defined]
            raise err
        if log.isEnabledFor(10):  # logging.DEBUG
            log.debug("%s %s %s -> %d in %.1f ms", self.broker, method, _path_of(url), resp.status_code,
                      (time.monotonic() - started) * 1e3)
        # Decoded here: Response.text would guess the charset (slowly) when none is declared. A
        # REST reply is JSON, which is UTF-8 (RFC 8259) whatever the Content-Type says (requests
        # reads text/plain without a charset as latin-1); a byte-order mark some gateways add is dropped.
        return _Response(resp.status_code, resp.headers, body.decode("utf-8-sig", "replace"))

    _MAX_REPLY = 64 << 20  # bytes of a REST reply, decoded: an order book of 100k rows is ~50 MB

    @classmethod
    def _read(cls, resp: "requests.Response", deadline: float, method: str) -> Optional[bytes]:
        """The whole body, decoded (gzip, deflate), or None when it does not arrive by ``deadline``.

        Each socket read is bounded by the timeout already; reading chunk by chunk with one read
        each (``read1``) lets the deadline bound the total too, and the size cap bounds what a
        small compressed body may expand to. urllib3 1.x lacks ``read1``: there the body is read
        in one call, bounded per read only.
        """
        raw = resp.raw
        read1 = getattr(raw, "read1", None)
        if read1 is None:  # pragma: no cover - urllib3 < 2
            return resp.content
        chunks: List[bytes] = []
        size = 0
        while True:
            if time.monotonic() > deadline:
                return None
            chunk = read1(1 << 16, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cls._MAX_REPLY:
                err = BrokerError(f"{method} {_path_of(resp.url)}: the reply is over {cls._MAX_REPLY >> 20} MiB "
                                  "(decoded), more than any broker sends; it was not read", http_status=resp.status_code)
                err.unread_reply = 200 <= resp.status_code < 300  # type: ignore[attr-defined]
                raise err
            chunks.append(chunk)

    def download(self, url: str, dest: str, headers: Mapping[str, str]) -> int:
        """Stream ``url`` into ``dest``; retry connection failures; return the byte count.

        All attempts together are bounded by _DOWNLOAD_DEADLINE, also against a server that
        trickles the body (each read is bounded by ``timeout`` only).
        """
        requests = _import_requests()
        import urllib3.exceptions as urllib3_errors  # loaded with requests
        deadline = time.monotonic() + _DOWNLOAD_DEADLINE
        attempt = 0
        while True:
            try:
                return self._download_once(url, dest, headers, deadline)
            except (requests.RequestException, urllib3_errors.HTTPError) as exc:  # urllib3's: the raw body reads
                if attempt >= self.max_retries:
                    cut_short = (requests.exceptions.ChunkedEncodingError, urllib3_errors.ProtocolError)
                    cut = " (the body was cut short: truncated)" if isinstance(exc, cut_short) else ""
                    raise NetworkError(f"download of {_path_of(url)} failed{cut}: {exc.__class__.__name__}: "
                                       f"{_short(_scrub(str(exc), headers.values()))}") from None
                delay = _backoff(attempt)
                log.warning("%s download of %s failed (%s); retrying in %.1f s", self.broker, _path_of(url),
                            exc.__class__.__name__, delay)
                self.sleep(delay)
                attempt += 1

    def _download_once(self, url: str, dest: str, headers: Mapping[str, str], deadline: float) -> int:
        import zlib

        # Only gzip is asked for, and it is inflated here rather than by urllib3, whose decoder
        # never checks that the stream reached its end: a gzip body cut short (a Content-Length
        # to match) would read as a complete, shorter master, and a CSV has no end marker.
        with self.session().get(url, headers={"Accept-Encoding": "gzip", **headers}, stream=True,
                                timeout=self.timeout, proxies=self._proxies(url), allow_redirects=False) as resp:
            if resp.status_code != 200:
                snippet = _short(_scrub(resp.text, headers.values()))
                raise BrokerError(
                    f"GET {url} answered HTTP {resp.status_code}: {snippet}",
                    http_status=resp.status_code, retryable=resp.status_code >= 500,
                )
            coding = resp.headers.get("Content-Encoding", "").strip().lower()
            if coding in ("gzip", "x-gzip"):
                inflate: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif coding in ("", "identity"):
                inflate = None
            else:
                raise _MasterFormatError(f"the master came with Content-Encoding {_short(coding, 40)!r}; "
                                         "only gzip (or none) was asked for")
            # read1 returns what has arrived, so the deadline is checked while a body trickles in
            # (urllib3 before 2.3 lacks it: there each read is bounded by the timeout only)
            read = getattr(resp.raw, "read1", None) or resp.raw.read
            received = size = 0
            with open(dest, "wb") as out:
                while True:
                    if time.monotonic() > deadline:
                        raise NetworkError(f"download of {_path_of(url)} took over {_DOWNLOAD_DEADLINE:g} s "
                                           f"({received:,} bytes so far): a stalled server or proxy; retry later")
                    chunk = read(1 << 18, decode_content=False)
                    if not chunk:
                        break
                    received += len(chunk)
                    if inflate is not None:
                        data, chunk = chunk, b""
                        try:  # inflated no further than the cap: a small bomb never fills the disk
                            while data and size + len(chunk) <= _MAX_MASTER_BYTES:
                                if inflate.eof:  # a gzip body may hold several members, one after another
                                    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                                chunk += inflate.decompress(data, _MAX_MASTER_BYTES - size - len(chunk) + 1)
                                data = inflate.unused_data if inflate.eof else b""
                        except zlib.error as exc:
                            raise _MasterFormatError(f"not a readable gzip body ({exc})") from None
                    if size + len(chunk) > _MAX_MASTER_BYTES:
                        raise _MasterFormatError(f"the master runs past {_MAX_MASTER_BYTES:,} bytes, far more than "
                                                 "any real one (a gzip bomb, or not a master)")
                    out.write(chunk)
                    size += len(chunk)
            expected = resp.headers.get("Content-Length")  # the bytes on the wire, before inflating
            if expected and expected.isdigit() and int(expected) != received:
                raise _MasterFormatError(f"download truncated: got {received} of {expected} bytes")
            if inflate is not None and not inflate.eof:
                raise _MasterFormatError(f"download truncated: the gzip body stops before its end ({received} bytes)")
            return size

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
        self._watchdog.close()


# The whole master download, retries included: real masters take seconds, a stalled proxy forever.
_DOWNLOAD_DEADLINE = 300.0


def _import_requests() -> Any:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests is a declared dependency
        raise UnsupportedFeatureError("ttconnect talks to brokers through requests: pip install requests") from None
    return requests


def _never_sent(exc: BaseException) -> bool:
    """True when a requests failure happened before any byte of the request left this host."""
    requests = _import_requests()
    unsent = (requests.exceptions.ConnectTimeout, requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL,
              requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.URLRequired,
              requests.exceptions.InvalidProxyURL)
    if isinstance(exc, unsent):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        import urllib3

        reason = getattr(exc.args[0], "reason", exc.args[0])
        return isinstance(reason, urllib3.exceptions.NewConnectionError)
    return False


class _LoginValue(str):
    """A value sent to log in (a short password, a one-time code): blanked from replies however short."""


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Blank out what was sent (tokens, keys, login values) from an error's text. Values under 8
    characters are left (an exchange, a quantity), except login values of 4 or more, blanked
    where they stand alone (a 4-digit password, not the same digits inside an order id)."""
    for value in secrets:
        if isinstance(value, _LoginValue) and 4 <= len(value) < 8:
            import re

            text = re.sub(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", "***", text)
            continue
        for part in {value, *str(value).replace(":", " ").split()}:
            if len(part) >= 8:
                text = text.replace(part, "***").replace(repr(part)[1:-1], "***")
    return text


def _path_of(url: str) -> str:
    """The path of a URL, for logs and messages (no host, no query: queries can hold secrets)."""
    rest = url.split("://", 1)[-1]
    return "/" + rest.split("/", 1)[1].split("?", 1)[0] if "/" in rest else "/"


def _backoff(attempt: int, retry_after: Optional[float] = None) -> float:
    """Exponential backoff (0.5 s, 1 s, 2 s ... capped at 8 s), or the server's Retry-After."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), 60.0)
    return min(8.0, 0.5 * 2 ** attempt)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# ============================================================================
# 8. Auth & session stores
# ============================================================================


class _MemoryStore:
    """Keeps the session for the life of the client (the default)."""

    def __init__(self) -> None:
        self._session: Optional[SessionData] = None

    def load(self) -> Optional[SessionData]:
        return self._session

    def save(self, session: SessionData) -> None:
        self._session = session

    def clear(self) -> None:
        self._session = None


_SESSION_TEXT_FIELDS = tuple(f for f in SessionData.__dataclass_fields__ if f not in ("broker", "mode", "obtained_at",
                                                                                       "expires_at"))


class _FileStore:
    """``<cache_dir>/<broker>_session.json``: written atomically, readable by the owner only."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> Optional[SessionData]:
        import json

        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
            if not isinstance(raw, dict) or not all(isinstance(raw.get(k), (str, type(None))) for k in _SESSION_TEXT_FIELDS):
                raise ValueError("not a session object")
            stamps = {k: _dt.datetime.fromisoformat(raw[k]) if raw.get(k) else None for k in ("obtained_at", "expires_at")}
            if any(s is not None and s.tzinfo is None for s in stamps.values()):
                raise ValueError("naive timestamp")
            texts = {k: raw.get(k) for k in _SESSION_TEXT_FIELDS}
            if not texts["access_token"]:
                raise ValueError("no token")
            return SessionData(broker=str(raw["broker"]), mode=AuthMode(raw["mode"]), **texts, **stamps)  # type: ignore[arg-type]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            # Say what kind of damage, never the content (it holds tokens).
            log.warning("ignoring unreadable session file %s (%s)", self.path, exc.__class__.__name__)
            return None

    def save(self, session: SessionData) -> None:
        import json

        data: Dict[str, Any] = {"broker": session.broker, "mode": session.mode.value}
        data.update({k: getattr(session, k) for k in _SESSION_TEXT_FIELDS})
        data.update({k: getattr(session, k).isoformat() if getattr(session, k) else None
                     for k in ("obtained_at", "expires_at")})
        import tempfile

        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        # A new file of a name no one can guess, owner-only (mkstemp: O_EXCL, mode 0600): a file or
        # symlink planted at a predictable name in a shared cache dir would get the tokens.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(self.path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            _remove_quietly(tmp)
            raise

    def clear(self) -> None:
        _remove_quietly(self.path)


def _usable_session(session: Any) -> bool:
    """Is a session a store handed back one that can be used (an application's store may be wrong)?"""
    def aware(stamp: Any) -> bool:
        return stamp is None or (isinstance(stamp, _dt.datetime) and stamp.tzinfo is not None)

    # the token goes into a header: a line break or non-ASCII text (a damaged file) could not be sent
    return (isinstance(session, SessionData) and isinstance(session.access_token, str) and bool(session.access_token)
            and session.access_token.isascii() and session.access_token.isprintable()
            and isinstance(session.broker, str) and aware(session.obtained_at) and aware(session.expires_at))


def _fault(exc: BaseException) -> str:
    """An error's kind (and an OS error's reason), never its text: it may quote a token."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.__class__.__name__}: {exc.strerror}"
    return exc.__class__.__name__


def _session_expiry(obtained: _dt.datetime, rule: Tuple[int, int]) -> _dt.datetime:
    """The first ``rule`` (hour, minute) IST strictly after ``obtained``."""
    local = obtained.astimezone(IST)
    cut = local.replace(hour=rule[0], minute=rule[1], second=0, microsecond=0)
    return cut if cut > local else cut + _dt.timedelta(days=1)


def _digest(value: str) -> str:
    """A one-way tag of a single-use code, so a stored session can say which code made it."""
    import hashlib

    return hashlib.sha256(value.encode()).hexdigest()[:32]


def _pick_flow(spec: BrokerSpec, config: Mapping[str, Any], mode: Optional[AuthMode]) -> _Flow:
    """The auth flow a config asks for; a config that mixes flows is refused, naming the keys."""
    flows = [f for f in spec["auth"] if mode is None or f.mode is mode]
    if not flows:
        modes = ", ".join(dict.fromkeys(f.mode.value for f in spec["auth"])) or "none (no login needed)"
        raise UnsupportedFeatureError(f"{spec['id']} does not support auth_mode {mode.value if mode else None!r}; "
                                      f"it supports: {modes}")
    chosen = [f for f in flows if any(config.get(k) for k in f.trigger)]
    if mode is None and chosen:
        # With no auth_mode the first flow (in the spec's order) the keys trigger wins; within
        # one mode two triggered flows are a mistake: which one did the user mean?
        chosen = [f for f in chosen if f.mode is chosen[0].mode]
    if len(chosen) > 1:
        keys = [next(k for k in f.trigger if config.get(k)) for f in chosen]
        raise ConfigurationError(
            f"{spec['id']} config mixes ways to log in: {' and '.join(repr(k) for k in keys)}; "
            f"pass the keys of one: " + "; ".join(f"{f.name}: {', '.join(f.needs)}" for f in chosen))
    return chosen[0] if chosen else flows[0]  # nothing given: the broker's usual way


class _Auth:
    """Owns the session: where it comes from, whose it is, when it expires, refreshing it once."""

    def __init__(self, spec: BrokerSpec, flow: _Flow, config: Mapping[str, Any], store: Any,
                 clock: Callable[[], float], call: _Call, login_url: str) -> None:
        self.spec, self.flow, self.config, self.store = spec, flow, config, store
        self.login_url = login_url
        self.mode = flow.mode
        self._clock, self._call = clock, call
        self._lock = threading.RLock()
        self._session: Optional[SessionData] = None
        self._state: Optional[Tuple[SessionData, int, float]] = None  # session, generation, expiry epoch
        self.generation = 0

    # -- reading the current session ------------------------------------------------------

    def current(self) -> SessionData:
        """Return a usable session, obtaining one if there is none or it expired."""
        return self.current_with_generation()[0]

    def current_with_generation(self) -> Tuple[SessionData, int]:
        """The session and the generation it belongs to, read together (for ``recover``)."""
        state = self._state
        if state is not None and self._clock() < state[2]:
            return state[0], state[1]
        with self._lock:
            state = self._state
            if state is None or self._clock() >= state[2]:
                self._install(self._obtain())
                state = self._state
            assert state is not None
            return state[0], state[1]

    def _install(self, session: SessionData) -> None:
        session = self._completed(session)
        self._session = session
        self.generation += 1
        # one reference, replaced whole: a reader never sees a session with another's generation
        self._state = (session, self.generation, session.expires_at.timestamp())  # type: ignore[union-attr]

    def _completed(self, session: SessionData) -> SessionData:
        """Stamp a new session with its lifetime and whose it is."""
        changes: Dict[str, Any] = {}
        if session.expires_at is None:
            obtained = session.obtained_at or _dt.datetime.fromtimestamp(self._clock(), IST)
            changes.update(obtained_at=obtained, expires_at=_session_expiry(obtained, self.spec["session_expiry"]))
        app = self.config.get(self.flow.app) if self.flow.app else None
        if session.app_key is None and app:
            changes["app_key"] = app
        user = self.config.get(self.flow.user) if self.flow.user else None
        if session.user_id is None and user:
            changes["user_id"] = user
        return dataclasses.replace(session, **changes) if changes else session

    def _belongs(self, session: Optional[SessionData]) -> bool:
        """True for a stored session that is unexpired and this account's."""
        if session is None or session.broker != self.spec["id"] or session.expires_at is None:
            return False
        now = self._clock()
        if session.expires_at.timestamp() <= now:
            return False
        # A stored expiry past the broker's rule (an edited file, an application's store keeping its
        # own TTL) does not keep a session alive that the broker ended at its daily cut.
        if session.obtained_at is not None and \
                _session_expiry(session.obtained_at, self.spec["session_expiry"]).timestamp() <= now:
            return False
        app = self.config.get(self.flow.app) if self.flow.app else None
        if app and session.app_key != app:
            return False
        user = self.config.get(self.flow.user) if self.flow.user else None
        return not (user and session.user_id != user)

    def _require(self, keys: Sequence[str]) -> None:
        missing = [k for k in keys if not self.config.get(k)]
        if missing:
            raise ConfigurationError(
                f"{self.spec['id']} ({self.mode.value} auth) needs config {', '.join(repr(k) for k in missing)}; "
                f"{self.hint()}")

    def _config_token(self) -> Optional[str]:
        token = self.config.get(self.flow.token) if self.flow.token else None
        return self.spec["hooks"]["manual_token"](token) if token else None

    def _obtain(self) -> SessionData:
        flow = self.flow
        self._require(flow.signs)
        stored = self._stored()
        config_token = self._config_token()
        if stored is not None and self._belongs(stored) and (config_token is None or stored.access_token == config_token):
            return stored
        now = _dt.datetime.fromtimestamp(self._clock(), IST)
        if flow.obtain is not None and not flow.single_use:
            self._require(flow.needs)
            return self._save(flow.obtain(self._call, self.config, self._clock()))
        if config_token and (self._session is None or self._session.access_token != config_token):
            self._require(flow.needs)
            extra = {field_: self.config.get(key) for field_, key in flow.session_keys.items()}
            session = SessionData(broker=self.spec["id"], mode=flow.mode, access_token=config_token, obtained_at=now,
                                  **extra)
            return self._save(session)
        whose = self._whose(stored) if stored is not None and self._session is None else ""
        if whose:  # not "expired": the user changed accounts or apps, and should know the file is not theirs
            raise AuthenticationError(f"the stored {self.spec['id']} session ({self._store_name()}) is not this "
                                      f"account's: {whose}; {self.hint()}")
        if self._session is not None or stored is not None:
            raise AuthenticationError(f"the {self.spec['id']} session has expired; {self.hint()}")
        raise ConfigurationError(f"{self.spec['id']} needs a session: {self.hint()}")

    def _whose(self, session: SessionData) -> str:
        """Why a stored session is another broker's, app's or account's ("" when it is this one's)."""
        if session.broker != self.spec["id"]:
            return f"it is for broker {_short(session.broker, 20)!r}"
        app = self.config.get(self.flow.app) if self.flow.app else None
        if app and session.app_key != app:
            return f"it was made with another {self.flow.app!r}"
        user = self.config.get(self.flow.user) if self.flow.user else None
        if user and session.user_id != user:
            return f"it is another {self.flow.user!r}'s"
        return ""

    def _save(self, session: SessionData) -> SessionData:
        session = self._completed(session)
        try:
            self.store.save(session)
        except Exception as exc:  # noqa: BLE001 - an application's store may fail any way; the session still works
            log.warning("%s: could not save the session to %s (%s); it lives in this process only, so the next "
                        "run logs in again", self.spec["id"], self._store_name(), _fault(exc))
        return session

    def _stored(self) -> Optional[SessionData]:
        """The store's session; None if it has none, fails, or hands back something unusable."""
        try:
            session = self.store.load()
        except Exception as exc:  # noqa: BLE001 - an application's store may fail any way
            log.warning("%s: could not read the session from %s (%s); logging in afresh", self.spec["id"],
                        self._store_name(), _fault(exc))
            return None
        if session is None or _usable_session(session):
            return session
        log.warning("%s: %s returned a %s, not a SessionData with a sendable token and timezone-aware times; logging in "
                    "afresh", self.spec["id"], self._store_name(), type(session).__name__)
        return None

    def _store_name(self) -> str:
        return self.store.path if isinstance(self.store, _FileStore) else "the session_store"

    # -- at init: single-use codes ----------------------------------------------------------

    def prepare(self) -> None:
        """Exchange a single-use login code now (a re-run with the same code reuses its session)."""
        flow = self.flow
        if not flow.single_use:
            return
        self._require(flow.needs)
        source = _digest(self.config[flow.single_use])
        with self._lock:
            stored = self._stored()
            if stored is not None and self._belongs(stored) and stored.source == source:
                # A code is single-use: re-running the same config (a notebook cell) reuses the
                # session it already produced instead of failing the exchange.
                log.info("%s: using the stored session; %s not exchanged again", self.spec["id"], flow.single_use)
                self._install(stored)
                return
            assert flow.obtain is not None
            try:
                session = flow.obtain(self._call, self.config, self._clock())
            except AuthenticationError as exc:  # a used or stale code: say how to get a fresh one
                raise AuthenticationError(f"{exc.message}. The {flow.single_use} works once, for minutes: "
                                          f"{self.hint()}", broker_code=exc.broker_code,
                                          http_status=exc.http_status) from None
            self._install(self._save(dataclasses.replace(session, source=source)))

    # -- after a refusal ------------------------------------------------------------------

    def recover(self, generation: int) -> bool:
        """After the broker refused the session seen at ``generation``: refresh it once.

        Returns True when the caller should retry. Threads that failed on the same session
        wait here and then retry with the one the first of them obtained.
        """
        with self._lock:
            if self.generation != generation:
                return True  # another thread already replaced the session
            if self.mode is not AuthMode.AUTO:
                self._clear_refused()
                return False
            old = self._session
            renew = self.spec["hooks"].get("renew")
            fresh = None
            if renew is not None and old is not None and old.refresh_token:
                try:
                    fresh = renew(self._call, self.config, old, self._clock())
                except AuthenticationError as exc:
                    log.info("%s token renewal refused (%s); logging in again", self.spec["id"], exc.broker_code)
                except BrokerError as exc:  # a garbled or failed renewal (no token, a 5xx page): the login still may work
                    log.warning("%s token renewal failed (%s); logging in again", self.spec["id"], _fault(exc))
            if fresh is None:
                self._require(self.flow.needs)
                assert self.flow.obtain is not None
                fresh = self.flow.obtain(self._call, self.config, self._clock())
            self._install(self._save(fresh))
            return True

    def _clear_refused(self) -> None:
        """Forget the refused session in the store, and only that one: another client on the same
        cache dir (another account or app of this broker) may have saved its own working session
        there since, and must not lose it to this client's refusal."""
        refused = self._session
        stored = self._stored()
        if stored is None or refused is None or stored.access_token != refused.access_token:
            return
        try:
            self.store.clear()
        except Exception as exc:  # noqa: BLE001 - the refusal the caller gets is what matters
            log.warning("%s: could not clear the refused session from %s (%s)", self.spec["id"],
                        self._store_name(), _fault(exc))

    def hint(self) -> str:
        return self.spec["hooks"]["reauth_hint"](self.config, self.login_url)


# ============================================================================
# 9. Client
# ============================================================================

# Config keys every broker understands; each spec adds its hosts, its flows' credentials and
# its ``options``. A key no broker knows is a typo, refused with the nearest known key.
_GENERAL_KEYS = frozenset({
    "auth_mode", "cache_session", "session_store", "cache_dir", "on_stale", "timeout", "max_retries", "rate_limits",
    "stream_silence_timeout", "stream_connect_timeout", "stream_reconnect_delay", "stream_reconnect_max_delay",
    "sandbox", "clock",
})


_MAX_TIMEOUT = 3600.0  # seconds: the longest config 'timeout' of one HTTP call
_MAX_RATE_CALLS = 1_000_000  # calls per window in config 'rate_limits'
_MAX_RATE_WINDOW = 86400.0  # seconds: the longest window in config 'rate_limits' (a broker's daily order limit)
_CLOCK_SPAN = (946684800.0, 4102444800.0)  # what a clock may say: 2000-01-01 to 2100-01-01 (UTC)
_CLOCK_SPAN_MS = (946684800000, 4102444800000)  # the same, in epoch milliseconds


def _clock_option(clock: Any) -> Callable[[], float]:
    """The client's clock as epoch seconds: ``clock`` may return those or an aware datetime.

    Every reading is checked, not just the first: a clock that later raises, turns naive or
    says something that is no time gives a ConfigurationError, never a misread date."""
    if clock is None:
        return time.time
    if not callable(clock):
        raise ConfigurationError(f"config 'clock' must be a callable returning an aware datetime (or epoch seconds), "
                                 f"got {clock!r}")

    def read() -> float:
        try:
            value = clock()
        except Exception as exc:  # noqa: BLE001 - the caller's code
            raise ConfigurationError(f"config 'clock' raised when called ({_describe(exc)})") from None
        if type(value) is float and _CLOCK_SPAN[0] <= value < _CLOCK_SPAN[1]:
            return value  # epoch seconds in range: read twice per order, so the common case goes first
        if isinstance(value, _dt.datetime):
            if value.tzinfo is None:
                raise ConfigurationError("config 'clock' returned a naive datetime; return an aware one, e.g. "
                                         "datetime.now(ttconnect.IST)")
            value = value.timestamp()
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigurationError(f"config 'clock' must return an aware datetime (or epoch seconds), "
                                     f"got {value!r}")
        if not _CLOCK_SPAN[0] <= value < _CLOCK_SPAN[1]:  # NaN fails this too
            hint = " (milliseconds? return seconds)" if _CLOCK_SPAN[0] * 1000 <= value < _CLOCK_SPAN[1] * 1000 else ""
            raise ConfigurationError(f"config 'clock' returned {value!r}, not a time between 2000 and 2100{hint}")
        return float(value)

    read()
    return read


def _url_host(url: str) -> str:
    """The host a URL names ("" for none, or one that cannot be parsed: "http://[::1" would make
    every request raise a raw ValueError, "http://" fail as a retried network error)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _known_keys(spec: BrokerSpec) -> frozenset:
    keys = set(spec["urls"]) | set(spec["options"])
    for flow in spec["auth"]:
        keys.update(flow.needs, flow.trigger, flow.session_keys.values())
        if flow.user:
            keys.add(flow.user)
    return frozenset(keys)


def _all_known_keys() -> frozenset:
    keys = set(_GENERAL_KEYS)
    for spec in _BROKERS.values():
        keys |= _known_keys(spec)
    return frozenset(keys)


def _finite_positive(value: Any) -> bool:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int beyond a float: no time or rate is that large
        return False


class Capabilities(_Model):
    """What a broker supports through ttconnect, for applications that adapt their UI.

    Read-only; the library still validates every request itself. (A plain slotted class, not
    a dataclass: it is built from a spec, never by users.)
    """

    broker: str
    exchanges: Tuple[Exchange, ...]
    products: Tuple[ProductType, ...]
    order_types: Tuple[OrderType, ...]
    validities: Tuple[str, ...]
    auth_modes: Tuple[AuthMode, ...]
    auto_auth: bool
    order_history: bool
    margin: bool
    margin_with_positions: bool  # calculate_margin(..., consider_positions=True)
    order_updates: bool
    streaming: bool
    stream_modes: Tuple[str, ...]
    max_stream_instruments: int
    native_slicing: bool  # the broker splits orders above the freeze limit itself
    gtt: bool
    sandbox: bool
    browser_login: bool  # TTConnect.login_url works
    __slots__ = tuple(__annotations__)
    _field_names = (__slots__, __slots__)  # what _Model's repr and == read

    def __init__(self, spec: BrokerSpec) -> None:
        has = spec["has"]
        values = dict(
            broker=spec["id"], exchanges=tuple(e for e in Exchange if e in spec["exchanges"]),
            products=tuple(spec["products"]), order_types=tuple(spec["order_types"]),
            validities=tuple(spec["validities"]), auth_modes=tuple(dict.fromkeys(f.mode for f in spec["auth"])),
            stream_modes=_STREAM_MODES if has["streaming"] else (), max_stream_instruments=spec["stream_max_tokens"],
            browser_login=bool(spec["urls"]["login_url"]) and "login_url" in spec["hooks"],
        )
        values.update((name, bool(has[name])) for name in self.__slots__ if name not in values)
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Capabilities are read-only (tried to set {name!r})")


def _instrument_list(instruments: Any) -> List[Instrument]:
    """One instrument or a sequence of them, as a list; anything else is refused."""
    if isinstance(instruments, _Instrument):
        return [instruments]  # type: ignore[list-item] # _Instrument is the base of Instrument's members
    if isinstance(instruments, (str, bytes, Mapping)) or not isinstance(instruments, Iterable):
        raise InvalidInstrumentError(f"expected an Index, Equity, Future or Option, or a list of them, got "
                                     f"{_short(repr(instruments), 80)}")
    items = list(instruments)
    for item in items:
        if not isinstance(item, _Instrument):
            raise InvalidInstrumentError(f"expected an Index, Equity, Future or Option, got {_short(repr(item), 80)}")
    return items


class TTConnect:
    """A blocking client for one broker account.

    Args:
        broker: a broker name (``TTConnect.brokers()`` lists them).
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
        self._closed = True  # until construction succeeds: close() and __del__ are safe
        spec = self._spec = _spec_for(broker)
        self.broker = spec["id"]
        if config is not None and not isinstance(config, Mapping):
            raise ConfigurationError(f"config must be a dict, got {type(config).__name__}")
        cfg: Dict[str, Any] = {**(config or {}), **options}
        self._check_keys(cfg)
        self._clock = _clock_option(clock if clock is not None else cfg.get("clock"))
        self._sleep = sleep or time.sleep
        self._credentials_option(cfg)
        self._config = cfg
        self._urls = self._urls_option(cfg)
        self._sandbox = cfg.get("sandbox", False) is True
        self._on_stale = cfg.get("on_stale", "fail")
        if self._on_stale not in ("fail", "warn"):
            raise ConfigurationError(f"config 'on_stale' must be 'fail' or 'warn', got {self._on_stale!r}")
        timeout = cfg.get("timeout", 7.0)
        # Bounded: sockets and the deadline thread's waits refuse a timeout past ~1e9 s with a raw
        # OverflowError, at the first request; no REST call is worth waiting an hour for.
        if not _finite_positive(timeout) or timeout > _MAX_TIMEOUT:
            raise ConfigurationError(f"config 'timeout' must be a positive number of seconds up to {_MAX_TIMEOUT:g}, "
                                     f"got {timeout!r}")
        retries = cfg.get("max_retries", 2)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ConfigurationError(f"config 'max_retries' must be a whole number from 0 to 10, got {retries!r}")
        self._cache_dir = self._cache_dir_option(cfg)
        for key, default in (("stream_silence_timeout", 1.0), ("stream_connect_timeout", 1.0),
                             ("stream_reconnect_delay", 1.0), ("stream_reconnect_max_delay", 1.0)):
            _positive(cfg, key, default)  # read when the feed starts; refused now, before any request
        flow = _pick_flow(spec, cfg, self._auth_mode_option(cfg))
        if flow.obtain is not None and not flow.single_use and (cfg.get("auth_mode") is not None
                                                                 or any(cfg.get(k) for k in flow.trigger)):
            # Some login credentials but not all is a mistake worth stopping at now; none at all
            # is a client used for instruments only (REST calls then say what is missing).
            missing = [k for k in flow.needs if not cfg.get(k)]
            if missing:
                raise ConfigurationError(f"{self.broker} auth_mode '{flow.mode.value}' needs config "
                                         f"{', '.join(repr(k) for k in missing)}")
        self._transport = _Transport(float(timeout), retries, self._sleep, self.broker)
        self._limiter = _RateLimiter(self._rate_limits_option(cfg), self._clock, self._sleep)
        self._auth = _Auth(spec, flow, cfg, self._session_store_option(cfg), self._clock, self._hook_call,
                           self._urls["login_url"])
        self._instruments = _Instruments(self.broker, spec["master"], self._urls["instruments_url"], self._cache_dir,
                                         self._clock, self._on_stale, self._transport.download, cfg)
        self._ctx = _Ctx(self._instruments, self._clock)
        self._streamer: Optional[_Streamer] = None
        self._price_streamer: Optional[_Streamer] = None  # another client's prices taken from this one (_price_feed)
        self._price_listeners: List[Callable[[Tick], Any]] = []
        self._stream_lock = threading.Lock()
        self._local: Any = None
        self._order_refs: Dict[str, str] = {}  # order id -> the broker's own address for it (order_ref hook)
        self._closed = False
        try:
            self._instruments.ensure()
            if "local" in spec["hooks"]:
                self._local = spec["hooks"]["local"](self._local_context())
            self._auth.prepare()
        except BaseException:
            self._instruments.close()
            self._transport.close()
            raise
        _register_store(self._instruments.store)  # from here on, instrument construction checks against this DB

    # -- config --------------------------------------------------------------------------

    def _check_keys(self, cfg: Mapping[str, Any]) -> None:
        known = _all_known_keys()
        for key in cfg:
            if not isinstance(key, str):
                raise ConfigurationError(f"config keys must be strings, got {key!r}")
            if key not in known:
                import difflib

                near = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(sorted(known))}"
                raise ConfigurationError(f"config key {key!r} is not one ttconnect knows{hint}")
        if not any(flow.needs or flow.trigger for flow in self._spec["auth"]):
            return  # a broker that needs no credentials ignores those meant for others
        ours = _known_keys(self._spec)
        for other in _BROKERS.values():
            for flow in other["auth"]:
                for key in flow.trigger:
                    if cfg.get(key) and key not in ours:
                        ways = "; ".join(f"{f.name} ({', '.join(f.needs)})" for f in self._spec["auth"])
                        raise ConfigurationError(f"{self.broker} has no login with config {key!r} "
                                                 f"(that is {other['id']}'s); {self.broker} logs in with: {ways}")

    def _credentials_option(self, cfg: Dict[str, Any]) -> None:
        """Credentials are non-empty strings; surrounding whitespace (a token read from a file
        with its newline) is stripped, control characters inside are refused."""
        keys: set = set()
        for flow in self._spec["auth"]:
            keys.update(flow.needs, flow.trigger, flow.session_keys.values())
        for key in sorted(keys):
            value = cfg.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value.strip():
                raise ConfigurationError(f"config {key!r} must be a non-empty string")
            value = value.strip()
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ConfigurationError(f"config {key!r} holds a control character (a line break?); pass the value alone")
            if not value.isascii():  # it could not go into a header or a form (a surrogate: bytes that were no UTF-8)
                raise ConfigurationError(f"config {key!r} holds a character that is not ASCII; keys, tokens and PINs "
                                         "are plain ASCII: check how the value was pasted")
            cfg[key] = value

    def _urls_option(self, cfg: Mapping[str, Any]) -> Dict[str, str]:
        spec = self._spec
        urls = dict(spec["urls"])
        sandbox = cfg.get("sandbox", False)
        if not isinstance(sandbox, bool):
            raise ConfigurationError(f"config 'sandbox' must be True or False, got {sandbox!r}")
        if sandbox:
            if not spec["has"]["sandbox"]:
                raise UnsupportedFeatureError(f"{self.broker} has no sandbox")
            urls.update(spec["sandbox_urls"])
        for key in spec["urls"]:
            value = cfg.get(key, urls[key])
            if not isinstance(value, str) or (value and not (value.split("://", 1)[0] in ("http", "https", "ws", "wss")
                                                             and (key.endswith("ws_url") or _url_host(value)))):
                raise ConfigurationError(f"config {key!r} must be an http(s):// or ws(s):// URL with a host, got {value!r}")
            if (value or spec["urls"][key]) and key.endswith("ws_url") and not _ws_url_ok(value):
                # refused here: on the feed's thread it would be retried (and logged) forever
                raise ConfigurationError(f"config {key!r} must be a ws:// or wss:// URL with a host (and a port "
                                         f"up to 65535), got {value!r}")
            urls[key] = value.rstrip("/") if key.endswith("root_url") else value
        for follower, leader in spec["url_follows"].items():
            if follower not in cfg and leader in cfg and not sandbox:
                urls[follower] = urls[leader]
        return urls

    def _auth_mode_option(self, cfg: Mapping[str, Any]) -> Optional[AuthMode]:
        raw = cfg.get("auth_mode")
        if raw is None:
            return None
        try:
            return AuthMode(raw.lower() if isinstance(raw, str) else raw)
        except ValueError:
            raise ConfigurationError(f"config 'auth_mode' must be 'manual' or 'auto', got {raw!r}") from None

    def _rate_limits_option(self, cfg: Mapping[str, Any]) -> Dict[str, Sequence[Tuple[int, float]]]:
        limits: Dict[str, Sequence[Tuple[int, float]]] = dict(self._spec["rate_limits"])
        extra = cfg.get("rate_limits") or {}
        if not isinstance(extra, Mapping):
            raise ConfigurationError("config 'rate_limits' must map an endpoint class to calls per second or [(calls, seconds)]")
        for name, value in extra.items():
            if name not in limits:
                raise ConfigurationError(f"config 'rate_limits' has unknown class {name!r}; {self.broker}'s classes are "
                                         f"{', '.join(sorted(limits))}")
            windows = [(value, 1.0)] if isinstance(value, (int, float)) else value
            try:
                parsed = [(n, per) for n, per in windows]
            except (TypeError, ValueError):
                raise ConfigurationError(f"config 'rate_limits'[{name!r}] must be calls per second or [(calls, seconds)], got {value!r}") from None
            if not parsed or not all(_finite_positive(n) and _finite_positive(per) for n, per in parsed):
                raise ConfigurationError(f"config 'rate_limits'[{name!r}] must be positive finite numbers, got {value!r}")
            if any(n < 1 for n, _ in parsed):
                raise ConfigurationError(f"config 'rate_limits'[{name!r}] allows under one call per window ({value!r}); "
                                         "for one call every 2 s pass [(1, 2.0)]")
            if any(n > _MAX_RATE_CALLS for n, _ in parsed):  # the limiter keeps that many stamps: 1e308 is no deque size
                raise ConfigurationError(f"config 'rate_limits'[{name!r}] allows over {_MAX_RATE_CALLS:,} calls per "
                                         f"window ({_short(repr(value), 60)}); no broker takes that many")
            if any(per > _MAX_RATE_WINDOW for _, per in parsed):  # the limiter sleeps to the window's end: 1e300 s overflows
                raise ConfigurationError(f"config 'rate_limits'[{name!r}] has a window over {_MAX_RATE_WINDOW:g} s (a day) "
                                         f"({_short(repr(value), 60)}); a broker's longest limit is per day")
            limits[name] = [(int(n), float(per)) for n, per in parsed]
        return limits

    def _session_store_option(self, cfg: Mapping[str, Any]) -> Any:
        cache = cfg.get("cache_session", False)
        if not isinstance(cache, bool):  # by truthiness, "false" from an .ini or env would write the token to disk
            raise ConfigurationError(f"config 'cache_session' must be True or False, got {cache!r}")
        store = cfg.get("session_store")
        if store is not None:
            if not all(callable(getattr(store, m, None)) for m in ("load", "save", "clear")):
                raise ConfigurationError("config 'session_store' must have load(), save(session) and clear() methods")
            return store
        if cache:
            return _FileStore(os.path.join(self._cache_dir, f"{self.broker}_session.json"))
        return _MemoryStore()

    @staticmethod
    def _cache_dir_option(cfg: Mapping[str, Any]) -> str:
        value = cfg.get("cache_dir")
        if value is None:
            value = os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
        path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else ""
        if not path or "\x00" in os.fsdecode(path):  # a NUL: every file call would raise a raw ValueError
            raise ConfigurationError(f"config 'cache_dir' must be a path (a directory, no NUL character), got {value!r}")
        return path

    def _local_context(self) -> "_LocalContext":
        return _LocalContext(self.broker, self._config, self._cache_dir, self._clock, self._instruments, self._ctx)

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return f"TTConnect(broker={self.broker!r}, cache_dir={self._cache_dir!r}{state})"

    @property
    def capabilities(self) -> Capabilities:
        """What this broker supports through ttconnect (read-only)."""
        return Capabilities(self._spec)

    @staticmethod
    def brokers() -> List[str]:
        """The broker names ``TTConnect`` accepts."""
        return sorted(_BROKERS)

    def _open(self) -> None:
        if self._closed:
            raise ConfigurationError(f"this {self.broker} client is closed; create a new TTConnect to use it again")

    # -- instruments ---------------------------------------------------------------------

    def refresh_instruments(self) -> Dict[str, Any]:
        """Download this broker's master now and rebuild the store from it (atomically).

        Returns what was loaded: ``rows``, ``skipped`` (per segment), ``malformed``, ``duplicates``.
        """
        self._open()
        return self._instruments.refresh()

    def resolve(self, instrument: Instrument) -> str:
        """Return the broker's token for ``instrument``, always a str (see the broker's section)."""
        if self._closed:
            self._open()
        return self._instruments.lookup(instrument)[0]

    def expiries(self, symbol: str, exchange: Union[Exchange, str] = Exchange.NFO) -> List[_dt.date]:
        """List the expiries (futures and options) of an underlying, soonest first."""
        self._open()
        exch = _check_exchange(exchange, _DERIVATIVE_EXCHANGES, "derivatives")
        sym = _canonical_index_symbol(_discovery_symbol(symbol))
        read, store = self._instruments.read, self._instruments.store
        found = set(read(store.expiries, exch, sym, "futures", self.broker))
        found.update(read(store.expiries, exch, sym, "options", self.broker))
        return [_dt.date.fromisoformat(e) for e in sorted(found)]

    def option_chain(self, symbol: str, expiry: Union[_dt.date, str], exchange: Union[Exchange, str] = Exchange.NFO) -> List[Option]:
        """List the options of an underlying for one expiry, by strike then CE/PE."""
        self._open()
        exch = _check_exchange(exchange, _DERIVATIVE_EXCHANGES, "options")
        iso = _check_expiry(expiry).isoformat()
        sym = _canonical_index_symbol(_discovery_symbol(symbol))
        chain = self._instruments.read(self._instruments.store.chain, exch, sym, iso, self.broker)
        if not chain:
            on_file = [e.isoformat() for e in self.expiries(sym, exch)]
            listed = ", ".join(on_file[:6]) if on_file else "none"
            raise InstrumentNotFoundError(f"{exch.value}:{sym} has no options expiring {iso}; expiries on file: {listed}")
        return chain

    def search(self, prefix: str, exchange: Union[Exchange, str, None] = None, limit: int = 50) -> List[Instrument]:
        """Find indices, equities and futures whose canonical symbol starts with ``prefix``."""
        self._open()
        exch = None if exchange is None else _as_enum(Exchange, exchange, "exchange")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise InvalidInstrumentError(f"limit must be a positive whole number, got {_short(repr(limit), 40)}")
        limit = min(limit, 1 << 62)  # SQLite's integers are 64-bit; no master has that many rows
        return self._instruments.read(self._instruments.store.search, _discovery_symbol(prefix, allow_empty=True), exch,
                                      self.broker, limit)

    def lot_size(self, instrument: Instrument) -> int:
        """Return the lot size (units per lot; 1 for cash equities, 0 for indices)."""
        self._open()
        return self._instruments.info(instrument)[1]

    def tick_size(self, instrument: Instrument) -> float:
        """Return the price tick in rupees (0 for indices)."""
        self._open()
        return self._instruments.info(instrument)[2]

    # -- the execute pipeline --------------------------------------------------------------

    def _route(self, name: str) -> _Route:
        route = self._spec["routes"].get(name)
        if route is None:
            raise UnsupportedFeatureError(f"{self.broker} has no {name.replace('_', ' ')} through ttconnect")
        return route

    def _sandbox_lacks(self, name: str) -> bool:
        """Is this a sandbox client, and ``name`` a route on a host the sandbox does not replace?
        (A sandbox serves only its own routes; its token is refused on the live hosts.)"""
        return self._sandbox and self._route(name).host not in self._spec["sandbox_urls"]

    def _execute(self, name: str, *args: Any, skipped: Optional[List[Mapping[str, Any]]] = None) -> Any:
        """Build the route's request from ``args``, send it, check the reply, parse it."""
        self._open()
        route = self._route(name)
        request = route.build(*args) if route.build is not None else _Request()
        return self._parse(name, route, self._call(name, route, request), skipped)

    def _send(self, name: str, route: _Route, request: _Request, session: Optional[SessionData]) -> Any:
        """One request through the limiter and the transport (or the spec's local answerer),
        then the central check."""
        if self._local is not None:
            return self._local.answer(name, request)
        from urllib.parse import quote

        path = route.path.format(**{k: quote(str(v), safe="") for k, v in request.path.items()}) if request.path \
            else route.path
        headers = self._spec["hooks"]["headers"](self._config, session, route)
        self._limiter.acquire(route.rate)
        body = request.body
        resp = self._transport.request(route.verb, self._urls[route.host] + path, headers, request.query,
                                       body if route.encoding == "form" else None,
                                       body if route.encoding == "json" else None)
        # A reply can echo the request (a proxy's error page listing its headers, a login
        # form's fields): nothing that was sent is quoted back.
        sent = [*headers.values(), *((v if route.signed else _LoginValue(v))
                                     for v in (body.values() if isinstance(body, Mapping) else ()) if isinstance(v, str))]
        try:
            return _check_reply(self._spec, name, route, resp, sent)
        except TTConnectError as exc:
            scrubbed = _scrub(exc.message, sent)
            if scrubbed != exc.message:
                exc.message, exc.args = scrubbed, (scrubbed,)
            raise

    def _hook_call(self, name: str, request: Optional[_Request] = None, session: Optional[SessionData] = None) -> Any:
        """The ``call`` handed to auth hooks: no session unless given, no auth recovery."""
        route = self._route(name)
        return self._send(name, route, request or _Request(), session)

    def _stream_call(self, name: str, request: Optional[_Request] = None) -> Any:
        """The ``call`` handed to feed hooks: an authenticated call (a feed's authorize step)."""
        route = self._route(name)
        return self._parse(name, route, self._call(name, route, request or _Request()), None)

    _ORDER_WAIT = 5.0  # the longest an order call waits for a broker's Retry-After

    def _call(self, name: str, route: _Route, request: _Request) -> Any:
        """An authenticated call: retries what is safe to retry, recovers the session once."""
        attempt, recovered = 0, False
        while True:
            self._open()  # closed: a feed thread's authorize step (its reconnect too) ends here
            session, generation = (self._auth.current_with_generation() if route.signed and self._local is None
                                   else (None, 0))
            try:
                return self._send(name, route, request, session)
            except AuthenticationError as exc:
                if recovered or session is None or not self._auth.recover(generation):
                    raise AuthenticationError(f"{exc}; {self._auth.hint()}", broker_code=exc.broker_code,
                                              http_status=exc.http_status) from exc
                recovered = True
            except (RateLimitError, NetworkError, BrokerError) as exc:
                # A rate-limit refusal was not processed; a connection that never opened sent
                # nothing. Anything else may have reached the broker: only idempotent calls retry.
                safe = route.idempotent or isinstance(exc, RateLimitError) or not getattr(exc, "maybe_sent", True)
                if not (exc.retryable and safe) or attempt >= self._transport.max_retries or self._closed:
                    raise
                retry_after = getattr(exc, "retry_after", None)
                if retry_after is not None and retry_after > (self._ORDER_WAIT if route.about_order else 60.0):
                    raise  # an order must not wait minutes: the caller decides (exc.retry_after)
                delay = _backoff(attempt, retry_after)
                log.warning("%s %s failed (%s); retry %d in %.1f s", self.broker, name, exc.__class__.__name__, attempt + 1, delay)
                self._sleep(delay)
                attempt += 1

    def _parse(self, name: str, route: _Route, data: Any, skipped: Optional[List[Mapping[str, Any]]]) -> Any:
        """Turn a checked payload into models. In list replies a row that names an instrument
        outside the loaded master, or is malformed, is logged and left out (and handed back in
        ``skipped`` to callers that must not ignore it: the kill switches)."""
        if route.row is not None:
            try:
                rows = (route.rows or _list_rows)(data)
            except (_Malformed, TypeError, ValueError, AttributeError) as exc:
                raise BrokerError(f"{self.broker} {name}: malformed reply ({_why(exc)})") from None
            out, bad, first_bad = [], 0, ""
            for index, row in enumerate(rows):
                try:
                    if not isinstance(row, Mapping):
                        raise _Malformed(f"row is {type(row).__name__}, expected an object")
                    out.append(route.row(self._ctx, row))
                except (InstrumentNotFoundError, UnsupportedFeatureError) as exc:
                    log.warning("%s %s: left out a row: %s", self.broker, name, exc)
                    if skipped is not None:
                        skipped.append(row)
                except (_Malformed, KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                    bad += 1
                    first_bad = first_bad or _why(exc)
                    log.warning("%s %s: left out malformed row %d (%s)", self.broker, name, index, _why(exc))
                    if skipped is not None and isinstance(row, Mapping):
                        skipped.append(row)
            if bad:
                log.warning("%s %s: %d of %d rows were malformed and left out", self.broker, name, bad, len(rows))
                if bad == len(rows) and skipped is None:  # nothing readable: an empty answer would mislead
                    raise BrokerError(f"{self.broker} {name}: malformed reply (every row: {first_bad})")
            return out
        if route.parse is not None:
            try:
                return route.parse(self._ctx, data)
            except (_Malformed, KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                raise BrokerError(f"{self.broker} {name}: malformed reply ({_why(exc)})") from None
        return data

    # -- account ---------------------------------------------------------------------------

    @staticmethod
    def login_url(broker: str, config: Optional[Mapping[str, Any]] = None) -> str:
        """Return the browser login URL for ``broker`` (``capabilities.browser_login``); the config
        gives what the broker's URL needs (its app key)."""
        spec = _spec_for(broker)
        if config is not None and not isinstance(config, Mapping):
            raise ConfigurationError(f"config must be a dict, got {type(config).__name__}")
        cfg = dict(config or {})
        if not Capabilities(spec).browser_login:
            raise UnsupportedFeatureError(f"{spec['id']} has no browser login")
        base = cfg.get("login_url") or spec["urls"]["login_url"]
        return spec["hooks"]["login_url"](cfg, base)

    def get_profile(self) -> Profile:
        """Return the account's profile."""
        return self._execute("get_profile")

    def get_funds(self) -> Fund:
        """Return the equity-segment funds (rupees)."""
        return self._execute("get_funds")

    def get_holdings(self) -> List[Holding]:
        """Return delivery holdings."""
        return self._execute("get_holdings")

    def get_positions(self, _skipped: Optional[List[Mapping[str, Any]]] = None) -> List[Position]:
        """Return net positions with a non-zero quantity (closed rows are skipped).

        A delivery row with negative quantity in a cash segment is a sale of held shares, not
        a short: it comes back with ``qty`` 0 and ``sold_from_holdings`` set.
        """
        out = []
        for pos in self._execute("get_positions", skipped=_skipped):
            if pos.qty < 0 and pos.product is ProductType.CNC and pos.instrument.exchange in _CASH_EXCHANGES:
                pos = dataclasses.replace(pos, qty=0, sold_from_holdings=-pos.qty)
            if pos.qty or pos.sold_from_holdings:
                out.append(pos)
        return out

    def get_orders(self, _skipped: Optional[List[Mapping[str, Any]]] = None) -> List[Order]:
        """Return today's orders."""
        orders = self._execute("get_orders", skipped=_skipped)
        ref = self._spec["hooks"].get("order_ref")
        if ref is not None:
            for order in orders:
                address = ref(order.raw)
                if address:
                    self._order_refs[order.id] = address
        return orders

    def get_trades(self) -> List[Trade]:
        """Return today's fills."""
        return self._execute("get_trades")

    def get_order(self, order_id: str) -> Order:
        """Return the current state of one order."""
        order_id = self._order_id(order_id)
        order = self._current_order(order_id)
        if order.id != order_id:  # a reply about another order must not pass for this one's state
            raise BrokerError(f"{self.broker}: asked for order {order_id}, the broker answered with order {order.id}; "
                              "check the order book")
        return order

    def _current_order(self, order_id: str) -> Order:
        """The broker's answer for one order, whichever order it names (callers check the id)."""
        routes, hooks = self._spec["routes"], self._spec["hooks"]
        if "get_order" not in routes and self._spec["has"]["order_history"]:
            return self._history(order_id)[-1]
        if "get_order" in routes:
            if "order_ref" not in hooks:
                return self._execute("get_order", order_id)
            address = self._order_refs.get(order_id)
            if address is not None:
                return self._execute("get_order", address)
        for order in self.get_orders():  # no route for one order, or one this client did not place
            if order.id == order_id:
                return order
        raise OrderNotFoundError(f"{self.broker} has no order {order_id} today")

    def get_order_history(self, order_id: str) -> List[Order]:
        """Return an order's states, oldest first (one state where the broker keeps no history)."""
        order_id = self._order_id(order_id)
        if not self._spec["has"]["order_history"]:
            return [self.get_order(order_id)]
        history = self._history(order_id)
        others = sorted({state.id for state in history} - {order_id})
        if others:  # another order's states must not pass for this one's
            raise BrokerError(f"{self.broker}: asked for the history of order {order_id}, the broker answered with "
                              f"states of order {', '.join(others)}; check the order book")
        return history

    def _history(self, order_id: str) -> List[Order]:
        skipped: List[Mapping[str, Any]] = []
        history = self._execute("get_order_history", order_id, skipped=skipped)
        if skipped:  # a state left out may be the latest: an older one must not pass for the order's current state
            raise BrokerError(f"{self.broker} get_order_history: {len(skipped)} of the {len(skipped) + len(history)} "
                              f"states of order {order_id} could not be read ({self._unreadable(skipped[-1])}); its "
                              "current state is unknown: check the order book")
        if not history:
            raise OrderNotFoundError(f"{self.broker} has no order {order_id} today")
        return history

    def _unreadable(self, row: Mapping[str, Any]) -> str:
        """Why an order-history row was left out (read again: only on this error path)."""
        parser = self._route("get_order_history").row
        try:
            if parser is not None:
                parser(self._ctx, row)
        except Exception as exc:  # noqa: BLE001 - whatever the parser refused, for the message
            return _why(exc)
        return "unknown"

    @staticmethod
    def _order_id(order_id: Any) -> str:
        """A broker order id: ASCII letters, digits, '-', '_' or '.' (never only dots: an id is
        one path segment, and '.' or '..' would move the request to another route)."""
        text = order_id.strip() if isinstance(order_id, str) else ""
        if not text or not text.isascii() or not all(c.isalnum() or c in "-_." for c in text) or not text.strip("."):
            raise InvalidOrderError(f"order_id must be the broker's order id (letters, digits, '-', '_', '.'), got "
                                    f"{_short(repr(order_id), 60)}")
        return text

    # -- orders ----------------------------------------------------------------------------

    def _order_request(self, instrument: Instrument, qty: Any, side: Any, product: Any, order_type: Any,
                       price: Any, trigger_price: Any, tag: Any, validity: Any) -> _OrderRequest:
        """Validate an order completely before anything is sent."""
        self._open()
        if not isinstance(instrument, _Instrument):
            raise InvalidOrderError(f"instrument must be an Equity, Future or Option, got {instrument!r}")
        if instrument.exchange in self._spec["exchanges"] and not isinstance(instrument, Index):
            token, bsym = self._instruments.lookup(instrument)
            _, lot, tick = self._instruments.info(instrument)
        else:
            token, bsym, lot, tick = "", "", 0, 0.0  # _check_order refuses it, naming why
        qty, side_e, product_e, type_e, price_d, trigger_d = _check_order(
            self._spec, instrument, qty, side, product, order_type, price, trigger_price, validity, lot, tick)
        if validity is not None and type(validity) is not str:  # a caller's str subclass (its own enum): plain text
            validity = self._spec["validities"][self._spec["validities"].index(validity)]
        return _OrderRequest(instrument, token, bsym, qty, side_e, product_e, type_e, price_d, trigger_d,
                             self._order_tag(tag), validity, tag)

    # A user's tag gets this suffix, so each order's tag is unique and the never-twice look-up
    # after a lost reply can only find the order it sent.
    _TAG_SUFFIX = 5  # "-" + 4 hex digits

    def _order_tag(self, tag: Any) -> str:
        limit = self._spec["max_tag_len"] - self._TAG_SUFFIX
        # random's generator (seeded from os.urandom, again in a forked child): unique tags without a
        # system call per order
        if tag is None:
            return f"tt{random.getrandbits(56):014x}"[: limit + self._TAG_SUFFIX]
        if not isinstance(tag, str) or not 0 < len(tag) <= limit or not tag.isascii() \
                or not all(c.isalnum() or c in "-_" for c in tag):
            raise InvalidOrderError(f"tag must be 1-{limit} ASCII letters, digits, '-' or '_' for {self.broker} (ttconnect "
                                    f"appends '-' and 4 characters to make each order's tag unique), got {tag!r}")
        return f"{tag}-{random.getrandbits(16):04x}"

    @overload
    def place_order(self, instrument: Instrument, qty: int, side: Union[Side, str], product: Union[ProductType, str],
                    order_type: Union[OrderType, str], price: Union[float, str, "Decimal", None] = ...,
                    trigger_price: Union[float, str, "Decimal", None] = ..., tag: Optional[str] = ...,
                    validity: str = ..., slice: "Literal[False]" = ...) -> str: ...

    @overload
    def place_order(self, instrument: Instrument, qty: int, side: Union[Side, str], product: Union[ProductType, str],
                    order_type: Union[OrderType, str], price: Union[float, str, "Decimal", None] = ...,
                    trigger_price: Union[float, str, "Decimal", None] = ..., tag: Optional[str] = ...,
                    validity: str = ..., *, slice: "Literal[True]") -> List[str]: ...

    def place_order(self, instrument: Instrument, qty: int, side: Union[Side, str], product: Union[ProductType, str],
                    order_type: Union[OrderType, str], price: Union[float, str, "Decimal", None] = None,
                    trigger_price: Union[float, str, "Decimal", None] = None, tag: Optional[str] = None,
                    validity: str = "DAY", slice: bool = False) -> Union[str, List[str]]:
        """Place an order and return the broker's order id.

        Everything is validated before a request is sent. The order is never sent twice: after
        an ambiguous failure (timeout, dropped connection, 5xx) it is looked up by its tag. An
        order above the exchange's freeze limit is refused before sending unless ``slice=True``:
        then it goes as several orders (or the broker's own slicing) and the ids come back as a
        list; if a slice fails, ``OrderError.placed_ids`` names the orders that went through.
        """
        if not isinstance(slice, bool):
            raise InvalidOrderError(f"slice must be True or False, got {slice!r}")
        req = self._order_request(instrument, qty, side, product, order_type, price, trigger_price, tag, validity)
        ids = self._place_all(req, slice)
        return ids if slice else ids[0]

    def _place_all(self, req: _OrderRequest, slice: bool) -> List[str]:
        """Place ``req``; as several orders where it is above the exchange's freeze limit."""
        freeze = self._instruments.freeze_qty(req.instrument)
        if freeze and req.qty > freeze:
            if not slice:
                raise InvalidOrderError(
                    f"qty {req.qty} of {req.instrument} is above the exchange freeze limit of {freeze} units per "
                    "order; pass slice=True to send it as several orders, or reduce it")
            return self._place_slices(req, freeze)
        try:
            return self._place(req)
        except InvalidOrderError as exc:
            # A broker whose master has no freeze limits names the limit when it refuses.
            learn = self._spec["hooks"].get("freeze_limit")
            learned = learn(str(exc)) if learn is not None else None
            if not (slice and learned and req.qty > learned):
                raise
            log.info("%s: %s is above the freeze limit %d; slicing", self.broker, req.instrument, learned)
            return self._place_slices(req, learned)

    _MAX_SLICES = 100  # beyond this, a quantity is a typing mistake rather than an order

    def _place_slices(self, req: _OrderRequest, freeze: int) -> List[str]:
        lot = max(1, self._instruments.info(req.instrument)[1])
        unit = freeze // lot * lot  # the largest whole number of lots within the limit
        if unit <= 0:
            raise InvalidOrderError(f"the freeze limit {freeze} of {req.instrument} is below one lot ({lot})")
        native = self._spec["max_slices"]
        per_order = unit * native if native else unit
        count = -(-req.qty // per_order)
        if count > self._MAX_SLICES:
            raise InvalidOrderError(f"qty {req.qty} of {req.instrument} would take {count} orders of at most "
                                    f"{per_order}; ttconnect sends at most {self._MAX_SLICES}")
        placed: List[str] = []
        remaining = req.qty
        while remaining:
            qty = min(remaining, per_order)
            part = req._replace(qty=qty, native_slice=bool(native) and qty > unit,
                                tag=req.tag if not placed else self._order_tag(req.user_tag))
            try:
                placed.extend(self._place(part))
            except TTConnectError as exc:
                done = [*placed, *getattr(exc, "placed_ids", [])]
                # A part the broker sliced itself may be placed in part (some of its orders went
                # through): how many of those units were not is then unknown, never "all of them".
                rest = (f"only part of the remaining {remaining} units was placed (check the order book for how much)"
                        if len(done) > len(placed) else f"the remaining {remaining} units were not")
                raise OrderError(
                    f"{req.side.value} {req.qty} {req.instrument}: {len(done)} order(s) were placed ({', '.join(done) or 'none'}) "
                    f"and {rest}: {exc}", placed_ids=done, broker_code=exc.broker_code) from exc
            remaining -= qty
        return placed

    def _place(self, req: _OrderRequest) -> List[str]:
        """Send one order; return its id (several where the broker sliced it)."""
        route = self._route("place_order")
        request = route.build(req)  # type: ignore[misc]
        sent_at = self._clock()
        try:
            data = self._call("place_order", route, request)
        except (NetworkError, BrokerError) as exc:
            # Ambiguous: a failure after the order may have gone out, or a reply (a redirect, a
            # 2xx cut short) that cannot say whether it was taken.
            if not (exc.retryable and getattr(exc, "maybe_sent", True)) and not getattr(exc, "unread_reply", False):
                raise
            return self._find_placed(req, exc, sent_at)
        try:
            placed = self._parse("place_order", route, data, None)
        except BrokerError as exc:  # accepted, but the reply names no order: find it by its tag
            return self._find_placed(req, exc, sent_at)
        ids = [placed] if isinstance(placed, str) else list(placed)
        ref = self._spec["hooks"].get("order_ref")
        if ref is not None and isinstance(data, Mapping) and ref(data):
            self._order_refs[ids[0]] = ref(data)  # type: ignore[assignment]
        return ids

    # Clocks differ between this machine and the broker's OMS: an order placed up to this long
    # before the request was sent is still taken as this request's.
    _CLOCK_SKEW = 120.0

    def _is_placed(self, order: Order, req: _OrderRequest, sent_at: float) -> bool:
        """Is ``order`` the one ``req`` placed? Its tag alone is not proof (a reused tag, a
        manual order): instrument, side, quantity, type and time must match too."""
        if order.tag != req.tag or order.instrument != req.instrument or order.side is not req.side:
            return False
        if order.order_type is not req.order_type or not (order.qty == req.qty or (req.native_slice and order.qty <= req.qty)):
            return False
        return order.placed_at is None or order.placed_at.timestamp() >= sent_at - self._CLOCK_SKEW

    def _find_placed(self, req: _OrderRequest, cause: TTConnectError, sent_at: float) -> List[str]:
        """After an ambiguous failure: find the order by its tag instead of sending it again; its id
        (the ids of every slice, for an order the broker slices itself).

        The book is read four times over ~3.5 s (an OMS can take a moment to list an order). Only
        a book that was actually read and lacks the order counts as "not placed".
        """
        what = f"placing {req.side.value} {req.qty} {req.instrument} failed ambiguously ({cause})"
        if self._sandbox_lacks("get_orders"):
            raise OrderError(f"{what}, and the {self.broker} sandbox serves no order book, so whether it was placed "
                             f"could not be checked. Do NOT place it again before checking for tag {req.tag!r}",
                             retryable=False) from cause
        log.warning("%s place_order outcome unknown (%s); looking for tag %s", self.broker, cause.__class__.__name__, req.tag)
        read = False  # did the last, latest look-up succeed? only then can absence be believed
        found: List[Order] = []
        for attempt in range(4):
            if attempt:
                self._sleep(_backoff(attempt - 1))
            skipped: List[Mapping[str, Any]] = []
            try:
                orders = self.get_orders(skipped)
            except TTConnectError as exc:
                log.warning("%s order book look-up failed (%s)", self.broker, exc.__class__.__name__)
                read = False
                continue
            # A row left out as unreadable may be this very order: absence is then no evidence.
            unread = [row for row in skipped if req.tag in row.values()]
            if unread:
                row_id = unread[0].get(self._spec["row_fields"]["order_id"])
                ids = [str(row_id)] if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) else []
                raise OrderError(
                    f"{what}; the order book lists an order tagged {req.tag!r} ({', '.join(ids) or 'no id'}) that "
                    "could not be read, so it was most likely placed. Do NOT place it again before checking the "
                    "order book", placed_ids=ids, retryable=False) from cause
            if skipped and not orders:  # every row unreadable (or outside the loaded segments): not a real read
                read = False
                continue
            read = True
            found = [order for order in orders if self._is_placed(order, req, sent_at)]
            # A natively sliced order is found once its slices add up to it (they may still be listing).
            if found and (not req.native_slice or sum(order.qty for order in found) == req.qty):
                ids = [order.id for order in found] if req.native_slice else [found[0].id]
                others = sorted({order.id for order in found} - {found[0].id}) if not req.native_slice else []
                if others:  # the one request reached the broker twice (a proxy's retry): both must be known
                    ids = [found[0].id, *others]
                    raise OrderError(
                        f"{what}; the order book lists {len(ids)} orders tagged {req.tag!r}: {', '.join(ids)}. The "
                        "request reached the broker more than once; cancel the extra order(s) or offset them",
                        placed_ids=ids, retryable=False) from cause
                log.info("%s order with tag %s was placed: %s", self.broker, req.tag, ", ".join(ids))
                return ids
        if found:
            listed = ", ".join(f"{order.id} ({order.qty})" for order in found)
            raise OrderError(
                f"{what}; the broker sliced it, and the order book lists slices tagged {req.tag!r} of "
                f"{sum(order.qty for order in found)} units, not {req.qty}: {listed}. Check the order book before "
                "placing the rest", placed_ids=[order.id for order in found], retryable=False) from cause
        if not read:
            raise OrderError(
                f"{what} and the order book could not be read (after the broker had time to list it) to find "
                "out whether it was placed. Do NOT place it "
                f"again before checking the order book for tag {req.tag!r}", retryable=False) from cause
        raise OrderError(
            f"{what} and no order tagged {req.tag!r} appeared in the order book; it was most likely not placed. "
            "Check the order book before placing again", retryable=False) from cause

    def _live_order(self, order_id: str, action: str) -> Order:
        order_id = self._order_id(order_id)
        order = self._current_order(order_id)
        if order.id != order_id:  # acting on it would change another order
            raise BrokerError(f"{self.broker}: asked for order {order_id}, the broker answered with order {order.id}; "
                              f"nothing was {action}: check the order book")
        if order.status not in _LIVE_STATUSES:
            raise OrderError(f"order {order_id} is {order.status.value}: only open orders can be {action}")
        return order

    def modify_order(self, order_id: str, qty: Optional[int] = None, price: Optional[float] = None,
                     trigger_price: Optional[float] = None, order_type: Union[OrderType, str, None] = None) -> str:
        """Change an open order; unspecified fields keep their current values. Returns the order id.

        The changed order is checked like a new one (tick, lot, stop-loss rules); unchanged
        prices are restated as the broker has them.
        """
        if self._sandbox_lacks("get_order"):
            raise UnsupportedFeatureError(
                f"modify_order in the {self.broker} sandbox: a modify restates the order's current quantity, type "
                "and prices, read from the order details, which the sandbox does not serve (only place, modify and "
                "cancel); cancel the order and place the changed one instead")
        current = self._live_order(order_id, "modified")
        token, bsym = self._instruments.lookup(current.instrument)
        _, lot, tick = self._instruments.info(current.instrument)
        new_qty = current.qty if qty is None else qty
        new_type = current.order_type if order_type is None else order_type
        qty_, side_e, product_e, type_e, price_d, trigger_d = _check_order(
            self._spec, current.instrument, new_qty, current.side, current.product, new_type, price, trigger_price,
            None, lot, tick, kept_price=current.price, kept_trigger=current.trigger_price)
        change = _OrderRequest(current.instrument, token, bsym, qty_, side_e, product_e, type_e, price_d, trigger_d,
                               current.tag or "", str(current.raw.get("validity") or "DAY"))
        self._execute("modify_order", current, change)
        return current.id

    def cancel_order(self, order_id: str) -> str:
        """Cancel an open order; returns its id."""
        if self._sandbox_lacks("get_order"):  # the order cannot be read first: the broker's cancel says if it is open
            return self._cancel(order_id, {})
        order = self._live_order(order_id, "cancelled")
        return self._cancel(order.id, order.raw)

    def _cancel(self, order_id: str, raw: Mapping[str, Any]) -> str:
        order_id = self._order_id(order_id)  # also an id from a broker's row (the kill switch)
        try:
            self._execute("cancel_order", order_id, raw)
        except (OrderError, BrokerError) as exc:
            # A cancel is re-sent after a timeout; the first may have cancelled the order, and
            # the second is then refused ("cannot be cancelled"). What the order is now decides.
            # (Not after a network failure: the read would fail too, and the kill switch wait.)
            if self._sandbox_lacks("get_order") or not self._cancelled_now(order_id):
                raise
            log.info("%s: order %s is cancelled (the cancel call said %s)", self.broker, order_id,
                     exc.__class__.__name__)
        return order_id

    def _cancelled_now(self, order_id: str) -> bool:
        """Does the broker say ``order_id`` is cancelled (False where it cannot be read, or the
        reply is about another order)?"""
        try:
            order = self.get_order(order_id)
        except TTConnectError:
            return False
        return order.id == order_id and order.status is OrderStatus.CANCELLED

    def cancel_all_orders(self) -> Tuple[List[str], List[str]]:
        """Cancel every order still working (pending, open, partly filled, trigger-pending).

        Orders in segments ttconnect does not load are cancelled too (from the broker's own
        fields). Returns (cancelled ids, ids whose cancel failed); a working order whose row has no
        usable id is in the second list as ``EXCHANGE:broker symbol`` (cancel it in the broker's app).
        """
        skipped: List[Mapping[str, Any]] = []
        live: Dict[str, Mapping[str, Any]] = {}  # by id: an order the book lists twice is cancelled (and reported) once
        for order in self.get_orders(skipped):
            if order.status in _LIVE_STATUSES:
                live.setdefault(order.id, order.raw)
        fields = self._spec["row_fields"]
        raw_status = self._spec["hooks"]["raw_status"]
        cancelled: List[str] = []
        failed: List[str] = []
        for row in skipped:
            try:
                if raw_status(row) in _LIVE_STATUSES:
                    live.setdefault(_str_field(row, fields["order_id"]), row)
            except (_Malformed, TypeError, ValueError, AttributeError) as exc:
                # A working order that cannot be addressed is still working: reported, not
                # passed over (an empty failed list tells the caller everything is cancelled).
                label = f"{row.get(fields['exchange'])}:{row.get(fields['symbol'])}"
                log.warning("%s: an order row without a usable id or status (%s) could not be cancelled; cancel %s "
                            "in the broker's app", self.broker, _why(exc), label)
                failed.append(label)
        for order_id, raw in live.items():
            try:
                cancelled.append(self._cancel(order_id, raw))
            except TTConnectError as exc:
                log.warning("%s: cancelling order %s failed: %s", self.broker, order_id, exc)
                failed.append(order_id)
        return cancelled, failed

    def close_all_positions(self) -> Tuple[List[str], List[str]]:
        """Offset every open position with a MARKET order of the same product, sliced at the
        exchange freeze limit where it is larger.

        Returns (placed order ids, positions not closed). A position is not closed when one of
        its orders fails (the ids of those that went through are in the first list), or when it
        is in a segment ttconnect does not load (listed as ``EXCHANGE:broker symbol`` — close it
        in the broker's own app). A sale out of holdings is no open position and is left alone.
        """
        placed, failed = [], []
        skipped: List[Mapping[str, Any]] = []
        closed: Dict[Tuple[Instrument, Optional[ProductType]], int] = {}  # (instrument, product) -> qty closed
        for pos in self.get_positions(skipped):
            if not pos.qty:
                continue  # a sale out of holdings: nothing is open
            key = (pos.instrument, pos.product)
            if key in closed and pos.product is not None:  # one net position per instrument and product: a repeat is no second one
                log.warning("%s: position %s %s is listed twice (qty %d and %d); it was closed once", self.broker,
                            pos.instrument, pos.product.value if pos.product else "", closed[key], pos.qty)
                if pos.qty != closed[key]:  # which quantity is true is not known: the user must look
                    failed.append(str(pos.instrument))
                continue
            closed[key] = pos.qty
            side = Side.SELL if pos.qty > 0 else Side.BUY
            try:
                if pos.product is None:
                    raise UnsupportedFeatureError(f"position in {pos.instrument} has a product outside CNC/MIS/NRML")
                req = self._order_request(pos.instrument, abs(pos.qty), side, pos.product, OrderType.MARKET, None, None,
                                          None, "DAY")
                placed.extend(self._place_all(req, slice=True))  # a position of any size: sliced at the freeze limit
            except TTConnectError as exc:
                placed.extend(getattr(exc, "placed_ids", []))  # part of it may be closed: report what was placed
                log.warning("%s: closing %s failed: %s", self.broker, pos.instrument, exc)
                failed.append(str(pos.instrument))
        fields = self._spec["row_fields"]
        for row in skipped:
            try:
                open_qty = _int_at(row, fields["position_qty"])
            except _Malformed:
                open_qty = 1  # unreadable: count it as open rather than miss it
            if open_qty:
                label = f"{row.get(fields['exchange'])}:{row.get(fields['symbol'])}"
                log.warning("%s: position %s could not be read or is in a segment ttconnect does not trade; "
                            "close it in the broker's app", self.broker, label)
                failed.append(label)
        return placed, failed

    def calculate_margin(self, legs: Sequence[Union[OrderLeg, Mapping[str, Any]]],
                         consider_positions: bool = False) -> Margin:
        """Return the margin a basket needs, before and after the spread benefit.

        By default the legs alone are priced, the same on every broker; ``consider_positions=True``
        nets them against the account's open positions where the broker can
        (``capabilities.margin_with_positions``).
        """
        self._open()
        if not self._spec["has"]["margin"]:
            raise UnsupportedFeatureError(f"{self.broker} has no margin calculator through ttconnect")
        if not isinstance(consider_positions, bool):
            raise InvalidOrderError(f"consider_positions must be True or False, got {consider_positions!r}")
        if consider_positions and not self._spec["has"]["margin_with_positions"]:
            raise UnsupportedFeatureError(f"{self.broker} prices margin for the legs alone: it cannot consider "
                                          "open positions (calculate_margin(legs) without consider_positions)")
        if isinstance(legs, (str, bytes, Mapping)) or not isinstance(legs, Sequence) or not legs:
            raise InvalidOrderError("calculate_margin needs a non-empty list of legs (OrderLeg or dicts of its fields)")
        checked = []
        for leg in legs:
            if isinstance(leg, Mapping):
                try:
                    leg = OrderLeg(**leg)
                except TypeError as exc:
                    raise InvalidOrderError(f"a margin leg dict must have OrderLeg's fields: {exc}") from None
            if not isinstance(leg, OrderLeg):
                raise InvalidOrderError(f"a margin leg must be an OrderLeg or a dict of its fields, got {leg!r}")
            req = self._order_request(leg.instrument, leg.qty, leg.side, leg.product, leg.order_type, leg.price,
                                      leg.trigger_price, "margin", "DAY")
            checked.append(req)
        return self._execute("calculate_margin", checked, consider_positions)

    # -- streaming -------------------------------------------------------------------------

    def _stream(self) -> "_Streamer":
        """The feed of this client's subscriptions (made on first use)."""
        with self._stream_lock:
            if self._streamer is None:
                self._streamer = self._new_streamer()
            return self._streamer

    def _price_feed(self, listener: Callable[[Tick], Any]) -> "_Streamer":
        """A feed of its own, for clients that take their prices from this one (simulated
        accounts): each ``listener`` gets every tick of it; the user's subscriptions, their modes
        and their on_tick stay as they are. It is a second connection on the same session (brokers
        allow a few per key), closed when the last listener is released."""
        with self._stream_lock:
            if listener not in self._price_listeners:
                self._price_listeners.append(listener)
            if self._price_streamer is None:
                self._price_streamer = self._new_streamer()
                self._price_streamer.on_tick = self._price_tick
            return self._price_streamer

    def _price_tick(self, tick: Tick) -> None:
        for listener in list(self._price_listeners):
            try:
                listener(tick)
            except Exception:  # noqa: BLE001 - one listener's fault must not starve the others
                log.exception("%s price feed: a listener raised; the feed goes on", self.broker)

    def _price_feed_release(self, listener: Callable[[Tick], Any]) -> None:
        with self._stream_lock:
            if listener in self._price_listeners:
                self._price_listeners.remove(listener)
            streamer = self._price_streamer if not self._price_listeners else None
            if streamer is not None:
                self._price_streamer = None
        if streamer is not None:
            streamer.close()

    def _new_streamer(self) -> "_Streamer":
        self._open()
        if not self._spec["has"]["streaming"]:
            raise UnsupportedFeatureError(f"{self.broker} has no live feed through ttconnect")
        if "stream_socket" not in self._spec["hooks"]:
            try:
                import websocket  # noqa: F401 - fail here, clearly, not on the background thread
            except ImportError:
                raise UnsupportedFeatureError("streaming needs websocket-client: pip install websocket-client") from None
        return _Streamer(self._stream_context())

    def _stream_context(self) -> "_StreamContext":
        spec = self._spec
        return _StreamContext(
            spec=spec, config=self._config, urls=self._urls, session=self._auth.current_with_generation,
            recover=self._auth.recover, hint=self._auth.hint, resolve=self.resolve, call=self._stream_call,
            order=self._order_update, monotonic=time.monotonic, local=self._local)

    def _order_update(self, row: Mapping[str, Any]) -> Order:
        row_parser = self._route("get_orders").row
        assert row_parser is not None
        return row_parser(self._ctx, row)

    def subscribe(self, instruments: Union[Instrument, Sequence[Instrument]], on_tick: Optional[Callable[[Tick], Any]] = None,
                  mode: str = "quote", on_order_update: Optional[Callable[[Order], Any]] = None) -> None:
        """Stream ``instruments`` in ``mode`` ("ltp", "quote" or "full") to ``on_tick``.

        Starts the background feed on first use; safe to call from any thread, any time. The
        handlers run on the feed's thread (see the README for handing ticks to a queue).
        """
        if mode not in _STREAM_MODES:
            raise UnsupportedFeatureError(f"stream mode {mode!r} is not one of {', '.join(_STREAM_MODES)}")
        items = _instrument_list(instruments)
        if on_tick is not None and not callable(on_tick):
            raise ConfigurationError("on_tick must be a callable taking a Tick")
        if on_order_update is not None:  # checked before subscribing: a refusal must leave no feed behind
            self._check_order_handler(on_order_update)
        streamer = self._stream()
        if on_tick is None and streamer.on_tick is None:
            raise ConfigurationError("subscribe needs on_tick=<callable taking a Tick> the first time")
        streamer.subscribe(items, mode, on_tick)
        if on_order_update is not None:
            self.on_order_update(on_order_update)

    def unsubscribe(self, instruments: Union[Instrument, Sequence[Instrument]]) -> None:
        """Stop streaming ``instruments`` (the feed stays up for the others)."""
        items = _instrument_list(instruments)
        if self._streamer is not None:
            self._streamer.unsubscribe(items)

    def on_order_update(self, handler: Callable[[Order], Any]) -> None:
        """Call ``handler`` with a canonical ``Order`` whenever the broker reports a change."""
        self._check_order_handler(handler)
        streamer = self._stream()
        streamer.on_order = handler
        streamer.watch_orders()

    def _check_order_handler(self, handler: Any) -> None:
        if not callable(handler):
            raise ConfigurationError("on_order_update needs a callable taking an Order")
        if not self._spec["has"]["order_updates"]:
            raise UnsupportedFeatureError(f"{self.broker} has no order-update stream through ttconnect")

    def stream_stats(self) -> Dict[str, Any]:
        """Ticks, frames (and dropped ones), reconnects, handler errors, last error, last frame time."""
        if self._streamer is None:
            return _Streamer.empty_stats()
        return self._streamer.snapshot()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the feed (within 2 s) and release connections and files. Never raises."""
        with self._stream_lock:
            if self._closed:
                return
            self._closed = True
            streamers = [s for s in (self._streamer, self._price_streamer) if s is not None]
        self._transport.close()  # first: it ends a feed's connect step blocked in a REST call (an authorize)
        for streamer in streamers:
            streamer.close()
        _unregister_store(self._instruments.store)
        self._instruments.close()
        if self._local is not None:
            self._local.close()

    def __enter__(self) -> "TTConnect":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _why(exc: BaseException) -> str:
    """What was wrong with a malformed reply, for messages (the field, when known)."""
    if isinstance(exc, KeyError):
        return f"field {exc.args[0]!r} missing" if exc.args else "a field is missing"
    return f"{exc}" if isinstance(exc, _Malformed) else f"{exc.__class__.__name__}: {_short(str(exc), 120)}"


def _discovery_symbol(symbol: Any, allow_empty: bool = False) -> str:
    if not isinstance(symbol, str) or (not symbol.strip() and not allow_empty):
        raise InvalidInstrumentError(f"symbol must be a non-empty string, got {symbol!r}")
    _check_text(symbol)
    return symbol.strip().upper()


class AsyncTTConnect:
    """The blocking client for asyncio code: every call runs on a worker thread.

    There is no second implementation: each method awaits the same ``TTConnect`` method via
    ``asyncio.to_thread``. Open it with ``await AsyncTTConnect.open(broker, config)`` so the
    instrument refresh stays off the event loop too.
    """

    def __init__(self, client: TTConnect) -> None:
        if not isinstance(client, TTConnect):
            raise ConfigurationError(f"AsyncTTConnect({client!r}, ...) cannot make a client: use "
                                     "'client = await AsyncTTConnect.open(broker, config)' (it builds the client off "
                                     "the event loop), or wrap one: AsyncTTConnect(TTConnect(broker, config))")
        self.sync = client

    def __repr__(self) -> str:
        return f"AsyncTTConnect({self.sync!r})"

    @property
    def broker(self) -> str:
        return self.sync.broker

    @property
    def capabilities(self) -> Capabilities:
        return self.sync.capabilities

    brokers = staticmethod(TTConnect.brokers)
    login_url = staticmethod(TTConnect.login_url)

    async def refresh_instruments(self) -> Dict[str, Any]:
        return await self._run(self.sync.refresh_instruments)

    @classmethod
    async def open(cls, broker: str, config: Optional[Mapping[str, Any]] = None, **options: Any) -> "AsyncTTConnect":
        """Create the client on a worker thread (it may download the instrument master)."""
        import asyncio

        return cls(await asyncio.to_thread(TTConnect, broker, config, **options))

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import asyncio

        return await asyncio.to_thread(fn, *args, **kwargs)

    def resolve(self, instrument: Instrument) -> str:
        """Return the broker token (a local, in-memory look-up: no need to await)."""
        return self.sync.resolve(instrument)

    def subscribe(self, instruments: Union[Instrument, Sequence[Instrument]], on_tick: Optional[Callable[[Tick], Any]] = None,
                  mode: str = "quote", on_order_update: Optional[Callable[[Order], Any]] = None) -> None:
        """Start streaming (returns at once). Handlers run on the feed's thread: from asyncio, hand
        ticks over with ``loop.call_soon_threadsafe(queue.put_nowait, tick)``."""
        self.sync.subscribe(instruments, on_tick=on_tick, mode=mode, on_order_update=on_order_update)

    def unsubscribe(self, instruments: Union[Instrument, Sequence[Instrument]]) -> None:
        self.sync.unsubscribe(instruments)

    def on_order_update(self, handler: Callable[[Order], Any]) -> None:
        self.sync.on_order_update(handler)

    def stream_stats(self) -> Dict[str, Any]:
        return self.sync.stream_stats()

    # Discovery reads the local instrument DB (microseconds): plain calls, like resolve.

    def expiries(self, symbol: str, exchange: Union[Exchange, str] = Exchange.NFO) -> List[_dt.date]:
        return self.sync.expiries(symbol, exchange)

    def option_chain(self, symbol: str, expiry: Union[_dt.date, str], exchange: Union[Exchange, str] = Exchange.NFO) -> List[Option]:
        return self.sync.option_chain(symbol, expiry, exchange)

    def search(self, prefix: str, exchange: Union[Exchange, str, None] = None, limit: int = 50) -> List[Instrument]:
        return self.sync.search(prefix, exchange, limit)

    def lot_size(self, instrument: Instrument) -> int:
        return self.sync.lot_size(instrument)

    def tick_size(self, instrument: Instrument) -> float:
        return self.sync.tick_size(instrument)

    async def get_profile(self) -> Profile:
        return await self._run(self.sync.get_profile)

    async def get_funds(self) -> Fund:
        return await self._run(self.sync.get_funds)

    async def get_holdings(self) -> List[Holding]:
        return await self._run(self.sync.get_holdings)

    async def get_positions(self) -> List[Position]:
        return await self._run(self.sync.get_positions)

    async def get_orders(self) -> List[Order]:
        return await self._run(self.sync.get_orders)

    async def get_order(self, order_id: str) -> Order:
        return await self._run(self.sync.get_order, order_id)

    async def get_order_history(self, order_id: str) -> List[Order]:
        return await self._run(self.sync.get_order_history, order_id)

    async def get_trades(self) -> List[Trade]:
        return await self._run(self.sync.get_trades)

    async def place_order(self, instrument: Instrument, qty: int, side: Union[Side, str], product: Union[ProductType, str],
                          order_type: Union[OrderType, str], price: Union[float, str, "Decimal", None] = None,
                          trigger_price: Union[float, str, "Decimal", None] = None, tag: Optional[str] = None,
                          validity: str = "DAY", slice: bool = False) -> Union[str, List[str]]:
        return await self._run(self.sync.place_order, instrument, qty, side, product, order_type, price=price,
                               trigger_price=trigger_price, tag=tag, validity=validity, slice=slice)

    async def modify_order(self, order_id: str, qty: Optional[int] = None, price: Optional[float] = None,
                           trigger_price: Optional[float] = None, order_type: Union[OrderType, str, None] = None) -> str:
        return await self._run(self.sync.modify_order, order_id, qty=qty, price=price, trigger_price=trigger_price,
                               order_type=order_type)

    async def cancel_order(self, order_id: str) -> str:
        return await self._run(self.sync.cancel_order, order_id)

    async def cancel_all_orders(self) -> Tuple[List[str], List[str]]:
        return await self._run(self.sync.cancel_all_orders)

    async def close_all_positions(self) -> Tuple[List[str], List[str]]:
        return await self._run(self.sync.close_all_positions)

    async def calculate_margin(self, legs: Sequence[Union[OrderLeg, Mapping[str, Any]]],
                               consider_positions: bool = False) -> Margin:
        return await self._run(self.sync.calculate_margin, legs, consider_positions)

    async def close(self) -> None:
        await self._run(self.sync.close)

    async def __aenter__(self) -> "AsyncTTConnect":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# ============================================================================
# 10. Streamer
# ============================================================================

_STREAM_MODES = ("ltp", "quote", "full")


class _StreamContext:
    """What the streamer may use of its client, and nothing more."""

    __slots__ = ("spec", "config", "urls", "session", "recover", "hint", "resolve", "call", "order", "monotonic",
                 "local")

    def __init__(self, spec: BrokerSpec, config: Mapping[str, Any], urls: Mapping[str, str],
                 session: Callable[[], Tuple[SessionData, int]], recover: Callable[[int], bool],
                 hint: Callable[[], str], resolve: Callable[[Instrument], str], call: _Call,
                 order: Callable[[Mapping[str, Any]], Order], monotonic: Callable[[], float], local: Any) -> None:
        self.spec, self.config, self.urls = spec, config, urls
        self.session = session  # the current session and its generation
        self.recover = recover  # the session of that generation was refused: renew it once
        self.hint = hint  # how to get a fresh session
        self.resolve = resolve  # instrument -> broker token (local)
        self.call = call  # an authenticated REST call (a feed's authorize step)
        self.order = order  # an order-update row -> Order
        self.monotonic = monotonic  # for silence and pacing
        self.local = local  # the spec's in-process answerer, if it has one (its feed socket comes from it)


def _send_frame(ws: Any, message: Union[str, bytes]) -> None:
    """Send a subscription message: text, or JSON in a binary frame where a feed wants that."""
    if isinstance(message, bytes):
        ws.send_binary(message)
    else:
        ws.send(message)


class _LocalWebsocket:
    """The part of websocket-client the streamer uses, for in-process feeds where it is not
    installed (an offline broker's feed needs none of it)."""

    class WebSocketException(Exception):
        pass

    class WebSocketTimeoutException(WebSocketException):
        pass

    class WebSocketBadStatusException(WebSocketException):
        pass

    class ABNF:
        OPCODE_TEXT, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def _websocket_module() -> Any:
    try:
        import websocket

        return websocket
    except ImportError:
        return _LocalWebsocket


def _quietly_shut(ws: Any) -> None:
    """Abort and close a socket that may already be dead (some websocket-client versions raise
    OSError on an already closed socket). Mid-handshake, ``abort`` does nothing (the socket is not
    "connected" yet): shutting the TCP socket itself wakes the thread reading the upgrade reply."""
    import socket

    websocket = _websocket_module()

    def shut_tcp() -> None:
        sock = getattr(ws, "sock", None)
        if sock is not None and not getattr(ws, "connected", True):
            sock.shutdown(socket.SHUT_RDWR)

    for step in (ws.abort, shut_tcp, lambda: ws.close(timeout=0)):
        try:
            step()
        except (OSError, websocket.WebSocketException) as exc:
            log.debug("closing a feed socket: %s", exc.__class__.__name__)


class _Connection:
    """One websocket, owned by one daemon thread: connect, greet, read, watch, reconnect.

    Any drop — an error, a close, or silence longer than ``silence`` seconds (a socket can
    stay "connected" while nothing arrives) — ends the read loop; the thread then waits an
    exponentially growing, jittered delay and connects again, greeting the server afresh
    (the streamer re-sends every subscription). ``stop`` wakes it at once.
    """

    def __init__(self, streamer: "_Streamer", name: str, url_key: str, connect: Callable[..., Any],
                 on_text: Callable[[str], None], on_binary: Optional[Callable[[bytes], None]],
                 greet: Callable[[Any], None], keepalive: Optional[str]) -> None:
        self.streamer, self.name = streamer, name
        self._url_key, self._connect_hook = url_key, connect
        self._on_text, self._on_binary, self._greet = on_text, on_binary, greet
        self._keepalive = keepalive  # text to send periodically; "" = a protocol ping
        self._stop = threading.Event()
        self.ws: Any = None
        self.connected = threading.Event()
        self._renewed_generation = -1  # the session this feed last renewed: renew each one once only
        self._thread = threading.Thread(target=self._run, name=f"ttconnect-{streamer.broker}-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        while True:
            ws = self.ws
            if ws is not None:
                _quietly_shut(ws)  # wakes the reader blocked in recv
            if threading.current_thread() is self._thread:  # close() from a handler: the thread ends itself
                return
            # Shut again until the thread ends: a TCP connect that completes after the first
            # shut (its socket not yet published) would otherwise sit in the upgrade read.
            self._thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
            if not self._thread.is_alive() or time.monotonic() >= deadline:
                return

    def alive(self) -> bool:
        return self._thread.is_alive()

    def ended(self) -> bool:
        """Did the thread end without stop() (a KeyboardInterrupt from a handler)? Then start another."""
        return not self._stop.is_set() and self._thread.ident is not None and not self._thread.is_alive()

    def _run(self) -> None:
        websocket = _websocket_module()

        streamer = self.streamer
        now = streamer.ctx.monotonic
        attempt = 0
        while not self._stop.is_set():
            ws = None
            opened: Optional[float] = None
            try:
                ws = self._open(websocket)
                opened = now()
                self._read(ws, websocket)
            except (OSError, websocket.WebSocketException, TTConnectError) as exc:
                if not self._stop.is_set():
                    what = "connection lost" if self.connected.is_set() else "connect failed"
                    streamer.failed(self.name, f"{what}: {_describe(exc)}")
            except Exception as exc:  # noqa: BLE001 - the feed thread must outlive any bug; logged with traceback
                log.exception("%s %s stream: unexpected error; reconnecting", streamer.broker, self.name)
                streamer.failed(self.name, f"unexpected error: {_describe(exc)}")
            except BaseException as exc:  # a KeyboardInterrupt raised by a handler: this feed ends, not silently
                log.exception("%s %s stream: stopped by %s", streamer.broker, self.name, exc.__class__.__name__)
                streamer.failed(self.name, f"stopped by {_describe(exc)}; the next subscribe() starts the feed again")
                return
            finally:
                with streamer.lock:
                    self.connected.clear()
                    self.ws = None
                streamer.changed()
                if ws is not None:
                    _quietly_shut(ws)
            if self._stop.is_set():
                return
            # The delay starts over only after a connection that held (a silence period): one let in
            # and dropped at once (a connection limit, a refused subscription) must not be retried
            # at the first delay forever.
            if opened is not None and now() - opened >= streamer.silence:
                attempt = 0
            delay = streamer.backoff(attempt)
            attempt += 1
            streamer.count("reconnects")
            log.info("%s %s stream: reconnecting in %.2f s", streamer.broker, self.name, delay)
            self._stop.wait(delay)

    def _open(self, websocket: Any) -> Any:
        streamer = self.streamer
        ctx = streamer.ctx
        session, generation = ctx.session()
        url, headers = self._connect_hook(ctx.call, ctx.config, session, ctx.urls[self._url_key])
        streamer.secrets[self.name] = (session.access_token, session.feed_token or "", session.refresh_token or "",
                                       url, url.partition("?")[2].replace("&", " ").replace("=", " "), *headers.values())
        make_socket = ctx.spec["hooks"].get("stream_socket")
        # UTF-8 is checked by _read, which skips a bad text frame: websocket-client's own check
        # would tear the connection down over it (a reconnect and a resubscribe for one frame).
        ws = (make_socket(ctx.local) if make_socket is not None
              else websocket.WebSocket(enable_multithread=True, skip_utf8_validation=True))
        # Published so that stop() can abort the upgrade; a TCP connect or TLS handshake in
        # progress cannot be interrupted and ends by stream_connect_timeout (the thread is a
        # daemon, and it exits right after: _read checks the stop flag before going live).
        self.ws = ws
        if self._stop.is_set():
            return ws
        try:
            ws.connect(url, header=[f"{k}: {v}" for k, v in headers.items()], timeout=streamer.connect_timeout)
        except websocket.WebSocketBadStatusException as exc:
            status = getattr(exc, "status_code", None)
            if status in (401, 403):
                # The feed refused the session (expired token): renew it once, as REST does, but
                # only once per session: a feed that refuses every handshake must not trigger a
                # renewal on every reconnect.
                if generation == self._renewed_generation or not ctx.recover(generation):
                    raise AuthenticationError(f"the {streamer.broker} feed refused the session (HTTP {status}); "
                                              f"{ctx.hint()}") from None
                self._renewed_generation = ctx.session()[1]
                raise AuthenticationError(f"the {streamer.broker} feed refused the session (HTTP {status}); "
                                          "the session was renewed, reconnecting") from None
            raise
        log.info("%s %s stream connected", streamer.broker, self.name)
        return ws

    def _read(self, ws: Any, websocket: Any) -> None:
        streamer = self.streamer
        now = streamer.ctx.monotonic
        silence = streamer.silence
        ws.settimeout(min(0.5, silence / 4))
        with streamer.lock:
            # Greet and go live in one step: a subscribe() from another thread either made it
            # into the greeting or sees the socket live and sends its own message.
            if self._stop.is_set():
                return
            self._greet(ws)
            self.connected.set()
        streamer.changed()
        last = now()
        ping_every = silence / 2.5
        next_ping = last + ping_every
        binary, text, close = websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_CLOSE
        while not self._stop.is_set():
            try:
                opcode, payload = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                opcode = None
            t = now()
            if opcode is None:
                if t - last > silence:
                    streamer.count("silence_reconnects")
                    streamer.failed(self.name, f"no frame for {t - last:.1f} s (limit {silence:g} s): reconnecting")
                    return
            else:
                last = t
                streamer.frame_arrived()
                if opcode == binary:
                    if self._on_binary is not None:
                        self._on_binary(payload)
                elif opcode == text:
                    try:
                        message = payload.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        streamer.dropped(self.name, f"skipped a text frame of {len(payload)} bytes that is not UTF-8 "
                                                    f"(byte {exc.start})")
                    else:
                        self._on_text(message)
                elif opcode == close:
                    streamer.failed(self.name, "the server closed the connection")
                    return
            if self._keepalive is not None and t >= next_ping:
                next_ping = t + ping_every
                if self._keepalive:
                    ws.send(self._keepalive)
                else:
                    ws.ping()


def _describe(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {_short(str(exc), 160)}" if str(exc) else exc.__class__.__name__


class _Streamer:
    """Live market data (and order updates) for one client, on background threads.

    Handlers run on the streamer's thread: a handler that raises is logged and counted, and
    the stream goes on. Subscriptions are remembered and re-sent after every reconnect.
    """

    def __init__(self, ctx: _StreamContext) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.spec = ctx.spec
        self.broker = ctx.spec["id"]
        self.lock = threading.RLock()
        self._changed = threading.Condition(threading.Lock())
        self.closed = False
        self.subscriptions: Dict[Any, _Sub] = {}  # stream key -> (instrument, token, mode)
        self.instruments: Dict[Any, Instrument] = {}  # replaced, never mutated: read lock-free by the decoder
        self.on_tick: Optional[Callable[[Tick], Any]] = None
        self.on_order: Optional[Callable[[Order], Any]] = None
        self.silence = _positive(cfg, "stream_silence_timeout", self.spec["stream_silence_timeout"])
        self.connect_timeout = _positive(cfg, "stream_connect_timeout", 10.0)
        self.delay = _positive(cfg, "stream_reconnect_delay", 0.5)
        self.max_delay = _positive(cfg, "stream_reconnect_max_delay", 30.0)
        self.stats: Dict[str, Any] = self.empty_stats()
        self.market: Optional[_Connection] = None
        self.orders: Optional[_Connection] = None
        self._decode = self.spec["hooks"]["stream_decode"]
        self._ticks: List[Tick] = []
        self._random = random.Random()
        # per connection, what it connected with (tokens, the single-use URL): scrubbed from the
        # broker's error and message frames, which may echo them, before they are logged or kept
        self.secrets: Dict[str, Tuple[str, ...]] = {"market": (), "orders": ()}

    @staticmethod
    def empty_stats() -> Dict[str, Any]:
        return {"connected": False, "orders_connected": False, "subscriptions": 0, "ticks": 0, "frames": 0,
                "frames_dropped": 0, "handler_errors": 0, "reconnects": 0, "silence_reconnects": 0,
                "order_updates": 0, "market_messages": 0, "last_error": None, "last_frame_at": None,
                "last_market_info": None}

    # -- events, for anyone waiting on the feed (tests, status displays) ------------------------

    def changed(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds (checked on every feed event) or ``timeout`` passes."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def count(self, name: str, n: int = 1) -> None:
        self.stats[name] += n
        self.changed()

    def frame_arrived(self) -> None:
        self.stats["frames"] += 1
        self.stats["last_frame_at"] = time.time()

    # -- control (any thread) --------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ConfigurationError(f"this {self.broker} client is closed; create a new TTConnect to stream again")

    def subscribe(self, instruments: Sequence[Instrument], mode: str, on_tick: Optional[Callable[[Tick], Any]]) -> None:
        items = []
        watch = self.spec["hooks"].get("stream_watch")
        for instrument in instruments:
            token = self.ctx.resolve(instrument)  # local: an unknown instrument never reaches the feed
            if watch is not None:
                watch(self.ctx.local, token)
            items.append((self.spec["hooks"]["stream_key"](instrument, token), (instrument, token, mode)))
        with self.lock:
            self._check_open()
            keys = set(self.subscriptions) | {key for key, _ in items}
            limit = self.spec["stream_max_tokens"]
            if len(keys) > limit:
                raise UnsupportedFeatureError(
                    f"{self.broker} streams at most {limit} instruments per connection; this would make "
                    f"{len(keys)}. Unsubscribe some, or split them across clients")
            check = self.spec["hooks"].get("stream_limits")
            if check is not None:
                after = {**self.subscriptions, **dict(items)}
                why = check(list(after.values()))
                if why:
                    raise UnsupportedFeatureError(f"{why}; unsubscribe some, or split them across clients")
            if on_tick is not None:
                if self.on_tick is not None and on_tick != self.on_tick:  # == holds for the same bound method
                    log.warning("%s stream: a new on_tick handler replaces the previous one for every instrument "
                                "(one handler per client: dispatch on tick.instrument inside it)", self.broker)
                self.on_tick = on_tick
            if self.spec["stream_modes_additive"]:
                # Where each (token, mode) is its own subscription, a mode change must drop the old one.
                moved = [old for key, (inst, token, mode_) in items
                         for old in [self.subscriptions.get(key)] if old is not None and old[2] != mode_]
                if moved:
                    self._send_market(self.spec["hooks"]["stream_unsubscribe"](moved))
            for key, item in items:
                self.subscriptions[key] = item
            self._retarget()
            self._send_market(self.spec["hooks"]["stream_subscribe"]([item for _, item in items]))
        self._ensure_market()

    def unsubscribe(self, instruments: Sequence[Instrument]) -> None:
        # Every key first, as subscribe does: an instrument that does not resolve must change
        # nothing (dropped from the book one by one, the earlier ones were never unsubscribed).
        key = self.spec["hooks"]["stream_key"]
        keys = [key(instrument, self.ctx.resolve(instrument)) for instrument in instruments]
        with self.lock:
            gone = []
            for k in keys:
                item = self.subscriptions.pop(k, None)
                if item is not None:
                    gone.append(item)
            self._retarget()
            if gone:
                self._send_market(self.spec["hooks"]["stream_unsubscribe"](gone))

    def _retarget(self) -> None:
        """Rebuild what the decoder reads keys against (replaced whole: read without the lock)."""
        target = self.spec["hooks"].get("stream_target")
        self.instruments = {key: (target(item[0], item[2]) if target is not None else item[0])
                            for key, item in self.subscriptions.items()}

    def watch_orders(self) -> None:
        if "order_stream_connect" not in self.spec["hooks"]:
            self._ensure_market()  # order updates arrive on the market feed
            return
        if self.orders is None or self.orders.ended():
            self.preflight("order_stream_connect", "order_ws_url")
        with self.lock:
            self._check_open()
            if self.orders is None or self.orders.ended():
                self.orders = _Connection(self, "orders", "order_ws_url", self.spec["hooks"]["order_stream_connect"],
                                          self._order_text, None, lambda ws: None, "")
                self.orders.start()

    def preflight(self, hook: str, url_key: str) -> None:
        """Check on the caller's thread what the feed needs (session, feed token, client id), so
        a missing credential is an exception here rather than endless retries in the background.
        Feeds whose connect step is a REST call (a single-use URL) make it on their own thread."""
        ctx = self.ctx
        if self.spec["has"].get("feed_authorize"):
            ctx.session()
            return
        self.spec["hooks"][hook](ctx.call, ctx.config, ctx.session()[0], ctx.urls[url_key])  # type: ignore[literal-required]

    def _ensure_market(self) -> None:
        if self.market is None or self.market.ended():
            self.preflight("stream_connect", "ws_url")
        with self.lock:
            self._check_open()
            if self.market is None or self.market.ended():
                self.market = _Connection(self, "market", "ws_url", self.spec["hooks"]["stream_connect"],
                                          self._market_text, self._binary, self._greet_market,
                                          self.spec["stream_keepalive"])
                self.market.start()

    def _send_market(self, messages: List[Union[str, bytes]]) -> None:
        conn = self.market
        ws = conn.ws if conn is not None and conn.connected.is_set() else None
        if ws is None:
            return  # sent with everything else when the connection (re)opens
        websocket = _websocket_module()

        try:
            for message in messages:
                _send_frame(ws, message)
        except (OSError, websocket.WebSocketException) as exc:
            # The connection is going down; the reconnect greets with every subscription.
            log.info("%s: subscription will be sent on reconnect (%s)", self.broker, exc.__class__.__name__)

    def _greet_market(self, ws: Any) -> None:
        with self.lock:
            items = list(self.subscriptions.values())
        if items:
            for message in self.spec["hooks"]["stream_subscribe"](items):
                _send_frame(ws, message)

    def close(self, timeout: float = 1.5) -> None:
        with self.lock:
            self.closed = True  # a subscribe racing this one starts no thread afterwards
            self.instruments = {}  # and a frame being delivered delivers no more (see _binary)
            conns = [c for c in (self.market, self.orders) if c is not None]
        deadline = time.monotonic() + timeout
        for conn in conns:
            conn.stop(max(0.05, deadline - time.monotonic()))
        self.changed()

    # -- the reader thread -----------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        delay = min(self.max_delay, self.delay * 2 ** min(attempt, 16))
        return delay * (0.5 + self._random.random() / 2)  # jitter: reconnecting clients spread out

    def failed(self, name: str, message: str) -> None:
        # A refused upgrade's text carries the reply body, which a proxy may fill with the request
        # line (a feed URL may hold the access token): scrubbed like the broker's own error frames.
        message = _scrub(message, [secret for sent in list(self.secrets.values()) for secret in sent])
        self.stats["last_error"] = f"{name}: {message}"
        log.warning("%s %s stream: %s", self.broker, name, message)
        self.changed()

    def dropped(self, name: str, message: str) -> None:
        """A frame was skipped as malformed: counted, logged, and the feed goes on."""
        self.stats["frames_dropped"] += 1
        self.stats["last_error"] = f"{name}: {message}"
        log.warning("%s %s stream: %s", self.broker, name, message)
        self.changed()

    def _binary(self, data: bytes) -> None:
        ticks = self._ticks
        instruments = self.instruments  # replaced by close() and (un)subscribe(): then each tick is checked
        try:
            self._decode(data, instruments, ticks)
        except Exception as exc:  # noqa: BLE001 - any undecodable frame (struct, overflow...) is dropped and counted
            ticks.clear()  # a half-decoded frame delivers nothing
            self.dropped("market", f"skipped a malformed frame of {len(data)} bytes ({exc})")
            return
        if not ticks:
            return
        handler = self.on_tick
        stats = self.stats
        # Counted a frame at a time, before its handlers run (an add a tick was ~700 instructions
        # a tick, ~2% of a replayed tick file's); a feed-status message is taken off when reached.
        stats["ticks"] += len(ticks)
        seen: Any = instruments
        wanted: Set[Any] = set()
        try:
            for tick in ticks:
                if isinstance(tick, dict):  # a decoder's feed-status message (which segments are open...)
                    stats["ticks"] -= 1
                    stats["market_messages"] += 1
                    stats["last_market_info"] = tick
                    continue
                if self.instruments is not instruments:  # closed or (un)subscribed mid-frame, by a handler or not
                    if self.instruments is not seen:
                        seen = self.instruments
                        wanted = self._subscribed()
                    if tick.instrument not in wanted:
                        stats["ticks"] -= 1  # not delivered: unsubscribed, or the client is closed
                        continue
                if handler is not None:
                    try:
                        handler(tick)
                    # sys.exit() on this thread would end the feed, never the program: a handler error too
                    except (Exception, SystemExit):  # noqa: BLE001 - a user handler must not kill the stream; logged with traceback
                        self.stats["handler_errors"] += 1
                        log.exception("%s stream: on_tick handler raised; the stream goes on", self.broker)
        finally:  # also when a KeyboardInterrupt ends the feed: the next one must not deliver this frame again
            ticks.clear()
        self.changed()

    def _subscribed(self) -> Set[Any]:
        """The instruments ticks may still go to (none once closed)."""
        with self.lock:
            return set() if self.closed else {item[0] for item in self.subscriptions.values()}

    def _market_text(self, text: str) -> None:
        self._text(text, self.spec["hooks"]["stream_text"])

    def _order_text(self, text: str) -> None:
        self._text(text, self.spec["hooks"]["order_stream_text"])

    def _text(self, text: str, parse: Callable[[str], Tuple[str, Any]]) -> None:
        kind, data = parse(text)
        if kind in ("error", "message"):
            data = _scrub(str(data), [secret for sent in list(self.secrets.values()) for secret in sent])
            data = _short(data, 200)  # a log line, whatever the broker sent
        if kind == "order":
            try:
                order = self.ctx.order(data)
            except Exception as exc:  # noqa: BLE001 - an unreadable update is dropped and counted, the feed goes on
                self.stats["frames_dropped"] += 1
                log.warning("%s stream: could not read an order update (%s)", self.broker, _describe(exc))
                self.changed()
                return
            self.stats["order_updates"] += 1
            handler = self.on_order
            if handler is not None:
                try:
                    handler(order)
                except (Exception, SystemExit):  # noqa: BLE001 - as on_tick: logged with traceback, the stream goes on
                    self.stats["handler_errors"] += 1
                    log.exception("%s stream: on_order_update handler raised; the stream goes on", self.broker)
        elif kind == "error":
            self.stats["last_error"] = f"broker: {data}"
            log.warning("%s stream: the broker reported an error: %s", self.broker, data)
        elif kind == "message":
            log.info("%s stream: broker message: %s", self.broker, data)
        elif kind == "unknown":
            log.debug("%s stream: ignored a text frame of %d characters", self.broker, len(text))
        self.changed()

    def snapshot(self) -> Dict[str, Any]:
        out = dict(self.stats)
        if out["last_frame_at"] is not None:
            out["last_frame_at"] = _dt.datetime.fromtimestamp(out["last_frame_at"], IST)
        out["connected"] = bool(self.market and self.market.connected.is_set())
        out["orders_connected"] = bool(self.orders and self.orders.connected.is_set())
        out["subscriptions"] = len(self.subscriptions)
        return out


def _positive(cfg: Mapping[str, Any], key: str, default: float) -> float:
    """A config duration: positive seconds, up to an hour (a socket or a wait of ~1e10 s raises
    OverflowError, on the feed's thread where the user would never see it)."""
    value = cfg.get(key, default)
    if not _finite_positive(value) or value > _MAX_TIMEOUT:
        raise ConfigurationError(f"config {key!r} must be a positive number of seconds up to {_MAX_TIMEOUT:g}, "
                                 f"got {value!r}")
    return float(value)

# ============================================================================
# 11. CLI
# ============================================================================
# ``python -m ttconnect`` and the ``ttconnect`` script. Global options go before or after the
# command; config comes from --config FILE.json, then TTCONNECT_<KEY> environment variables,
# then the options.

_CLI_EXIT_HELP = """exit codes:
  0  done
  2  bad usage: a wrong argument, an unknown broker, instrument or order field
  3  configuration or authentication: a missing or malformed config file or value, a refused login
  4  the broker refused: an order, an unknown order id, insufficient funds, a rate limit
  5  network: the broker could not be reached
"""
# TTCONNECT_<KEY> values are text, but for these keys, which JSON reads (numbers, true/false;
# rate_limits an object, as in a --config file: as text it was refused as no mapping)
_CLI_TYPED_KEYS = frozenset({
    "timeout", "max_retries", "capital", "seed", "market_hours", "replay_speed", "tick_interval", "cache_session",
    "sandbox", "stream_silence_timeout", "stream_connect_timeout", "stream_reconnect_delay",
    "stream_reconnect_max_delay", "rate_limits",
})


class _CliError(Exception):
    """A user error of the command line: printed without a traceback, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _cli_exit_code(exc: BaseException) -> int:
    if isinstance(exc, _CliError):
        return exc.code
    if isinstance(exc, (InvalidInstrumentError, InstrumentNotFoundError, InvalidOrderError, UnsupportedFeatureError)):
        return 2
    if isinstance(exc, (ConfigurationError, AuthenticationError)):
        return 3
    if isinstance(exc, NetworkError):
        return 5
    return 4  # OrderError, BrokerError, RateLimitError: the broker said no


def _cli_parser() -> Any:
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("global options (before or after the command)")
    g.add_argument("--broker", default=argparse.SUPPRESS, help=f"broker name (default {_DEFAULT_BROKER}; "
                   f"one of {', '.join(sorted(_BROKERS))})")
    g.add_argument("--config", metavar="FILE.json", default=argparse.SUPPRESS,
                   help="a JSON object of config keys (it may name the broker as \"broker\")")
    g.add_argument("--cache-dir", default=argparse.SUPPRESS, help="instrument DB, sessions and paper accounts")
    g.add_argument("--account", default=argparse.SUPPRESS, help="paper account name (default 'default')")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of tables")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log, and show tracebacks")
    parser = argparse.ArgumentParser(
        prog="python -m ttconnect", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ttconnect: one interface to Indian brokers, and an offline paper broker.",
        epilog="Config keys may also come as TTCONNECT_<KEY> environment variables (TTCONNECT_TIMEOUT=10).\n\n"
               + _CLI_EXIT_HELP)
    parser.add_argument("--version", action="version", version=f"ttconnect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help_: str) -> Any:
        return sub.add_parser(name, parents=[common], help=help_, description=help_)

    command("demo", "a tour on the paper broker: offline, about ten seconds")
    inst = command("instruments", "the instrument DB: refresh, search, expiries, chain")
    isub = inst.add_subparsers(dest="action", metavar="ACTION")
    isub.required = True
    isub.add_parser("refresh", parents=[common], help="load the broker's instrument master now")
    p = isub.add_parser("search", parents=[common], help="instruments whose symbol starts with PREFIX")
    p.add_argument("prefix")
    p.add_argument("--exchange")
    p.add_argument("--limit", type=int, default=50)
    p = isub.add_parser("expiries", parents=[common], help="expiries of an underlying, soonest first")
    p.add_argument("symbol")
    p.add_argument("--exchange", default="NFO")
    p = isub.add_parser("chain", parents=[common], help="the option chain of an underlying for an expiry")
    p.add_argument("symbol")
    p.add_argument("expiry", help="YYYY-MM-DD")
    p.add_argument("--exchange", default="NFO")
    for name in ("profile", "funds", "holdings", "positions", "orders", "trades"):
        command(name, f"show {name}")
    p = command("place", "place an order: place INSTRUMENT BUY|SELL QTY")
    p.add_argument("instrument", help="as printed, e.g. 'NSE:SBIN' or 'NFO:NIFTY 2026-12-29 23500 CE'")
    p.add_argument("side", type=str.upper, choices=["BUY", "SELL"])
    p.add_argument("qty", type=_cli_qty)
    p.add_argument("--type", dest="order_type", type=str.upper, default="MARKET", choices=["MARKET", "LIMIT", "SL", "SL_M"])
    p.add_argument("--price", type=_cli_price)
    p.add_argument("--trigger", type=_cli_price)
    p.add_argument("--product", type=str.upper, choices=["CNC", "MIS", "NRML"],
                   help="default CNC for equities, NRML for derivatives")
    p.add_argument("--tag")
    p = command("modify", "change an open order")
    p.add_argument("order_id")
    p.add_argument("--qty", type=_cli_qty)
    p.add_argument("--price", type=_cli_price)
    p.add_argument("--trigger", type=_cli_price)
    p.add_argument("--type", dest="order_type", type=str.upper, choices=["MARKET", "LIMIT", "SL", "SL_M"])
    p = command("cancel", "cancel an open order")
    p.add_argument("order_id")
    command("cancel-all", "cancel every open order")
    command("close-all", "close every open position with MARKET orders")
    p = command("stream", "stream ticks: a live table on a terminal, lines otherwise")
    p.add_argument("instruments", nargs="+", metavar="INSTRUMENT")
    p.add_argument("--mode", default="quote", choices=list(_STREAM_MODES))
    p.add_argument("--seconds", type=_cli_seconds, default=10.0, help="how long (default 10)")
    p.add_argument("--record", metavar="FILE", help="also write every tick to FILE (JSON Lines, replayable by paper)")
    command("login", "log in once (in a browser, where the broker asks for it); later commands reuse the session")
    p = command("paper", "paper account tools")
    psub = p.add_subparsers(dest="action", metavar="ACTION")
    psub.required = True
    r = psub.add_parser("reset", parents=[common], help="clear the chosen paper account (asks first)")
    r.add_argument("--yes", action="store_true", help="do not ask")
    return parser


def _edits(a: str, b: str) -> int:
    """The Levenshtein distance of two strings: insertions, deletions and substitutions."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def _cli_qty(text: str) -> int:
    """An order's quantity as typed: ASCII digits only. int() also reads '1_000', ' 1 ' and other
    scripts' digits ('\u0661\u0660'), so a slip ('1_00') would place an order of a size not typed."""
    import argparse

    digits = text[1:] if text.startswith("-") else text  # a negative one: the order checks say why not
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"must be a whole number of units in digits (0-9), got {text!r}")
    return int(text)


def _cli_price(text: str) -> float:
    """A price in rupees as float() reads it, but for '_' and non-ASCII digits (see _cli_qty)."""
    import argparse

    if "_" in text or not text.isascii():
        raise argparse.ArgumentTypeError(f"must be a price in rupees in digits (e.g. 1234.05), got {text!r}")
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a price in rupees in digits (e.g. 1234.05), got {text!r}") from None


def _cli_seconds(text: str) -> float:
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


_CLI_CONFIG_MAX = 1024 ** 2  # characters of a --config file


def _cli_config(args: Any) -> Tuple[str, Dict[str, Any]]:
    """(broker, config): the config file, then TTCONNECT_* variables, then the options."""
    import json

    cfg: Dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(_CLI_CONFIG_MAX + 1)  # bounded: --config /dev/zero, or a log given by mistake
            if len(text) > _CLI_CONFIG_MAX:
                raise _CliError(f"config file {path!r} is over {_CLI_CONFIG_MAX // 1024 ** 2} MiB: a config file "
                                "is a small JSON object of config keys", 3)
            loaded = json.loads(text)
        except OSError as exc:
            raise _CliError(f"config file {path!r} cannot be read ({exc.strerror or exc.__class__.__name__})", 3) from None
        except (ValueError, RecursionError) as exc:
            raise _CliError(f"config file {path!r} is not valid JSON ({_short(str(exc), 100)})", 3) from None
        if not isinstance(loaded, dict):
            raise _CliError(f"config file {path!r} must hold a JSON object of config keys, not a "
                            f"{type(loaded).__name__}", 3)
        cfg.update(loaded)
    file_broker = cfg.pop("broker", None)
    known = _all_known_keys()
    for name, value in os.environ.items():
        if name.startswith("TTCONNECT_") and name != CACHE_DIR_ENV and len(name) > 10:
            key = name[10:].lower()
            if key not in known and key != "broker":
                near = [k for k in sorted(known) if _edits(key, k) <= (1 if len(k) <= 5 else 2)]
                if near:  # a typo of a key is an error; other tools' TTCONNECT_* variables are not ours
                    raise _CliError(f"environment variable {name} names no config key; did you mean "
                                    f"TTCONNECT_{near[0].upper()}?", 3)
                log.info("ignoring environment variable %s: it names no config key", name)
                continue
            typed: Any = value
            if key == "seed":  # an int or any text
                digits = value[1:] if value.startswith("-") else value
                try:
                    typed = int(value) if digits.isascii() and digits.isdigit() else value
                except ValueError:  # past Python's limit on the digits of an int read from text (4300)
                    raise _CliError(f"environment variable {name} has {len(digits)} digits, more than an int seed "
                                    "may have; use a shorter one", 3) from None
            elif key in _CLI_TYPED_KEYS:
                try:
                    typed = json.loads(value)
                except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
                    shape = "a JSON object such as {\"orders\": 5}" if key == "rate_limits" else "a number or true/false"
                    raise _CliError(f"environment variable {name} must be {shape}, got {_short(repr(value), 60)}",
                                    3) from None
                if key == "market_hours" and typed in (0, 1) and not isinstance(typed, bool):
                    typed = bool(typed)  # TTCONNECT_MARKET_HOURS=1, as shells say it
            cfg[key] = typed
    broker = getattr(args, "broker", None) or os.environ.get("TTCONNECT_BROKER") or file_broker or _DEFAULT_BROKER
    cfg.pop("broker", None)
    if not isinstance(broker, str) or broker not in _BROKERS:
        raise _CliError(f"unknown broker {broker!r}; known brokers: {', '.join(sorted(_BROKERS))}", 2)
    for option in ("cache_dir", "account"):
        given = getattr(args, option, None)
        if given is not None:  # given, even empty: an empty one is refused by name, never skipped
            cfg[option] = given
    if "local" not in _BROKERS[broker]["hooks"]:
        cfg.setdefault("cache_session", True)  # a login lasts the day, across commands
    return broker, cfg


def _cli_ask_missing(broker: str, cfg: Dict[str, Any]) -> None:
    """On a terminal, ask for the credentials the broker's login needs that the config lacks
    (secrets without echo)."""
    if not sys.stdin.isatty():
        return
    import getpass

    spec = _BROKERS[broker]
    try:
        flow = _pick_flow(spec, cfg, None)
    except TTConnectError:
        return
    if flow.single_use or not flow.obtain:
        return  # a token to paste, or a browser login: said by the error / done by 'login'
    public = {flow.user, flow.app, *flow.signs}  # who logs in, with which app: the rest are secrets
    for key in flow.needs:
        if not cfg.get(key):
            prompt = f"{broker} {key}: "
            cfg[key] = input(prompt) if key in public else getpass.getpass(prompt)


_CLI_COLUMNS: Dict[type, Tuple[str, ...]] = {  # what a table shows of a model (--json shows every field)
    Order: ("id", "instrument", "side", "qty", "filled_qty", "order_type", "product", "status", "price",
            "trigger_price", "average_price", "tag", "status_message"),
    Position: ("instrument", "product", "qty", "avg_price", "ltp", "pnl", "sold_from_holdings"),
    Holding: ("instrument", "qty", "avg_price", "ltp", "pnl", "pnl_percent"),
    Trade: ("trade_id", "order_id", "instrument", "side", "qty", "avg_price", "trade_value", "product", "timestamp"),
}


class _CliOut:
    """Tables for people, JSON for programs."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, value: Any) -> None:
        import json

        if self.as_json:
            print(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))
        elif isinstance(value, list):
            self.table(value)
        elif dataclasses.is_dataclass(value):
            data = _jsonable(value)
            width = max((len(k) for k in data), default=0)
            for key, item in data.items():
                print(f"{key:<{width}}  {_cli_cell(item)}")
        elif isinstance(value, dict):
            width = max((len(str(k)) for k in value), default=0)
            for key, item in value.items():
                print(f"{key:<{width}}  {_cli_cell(item)}")
        else:
            print(value)

    def table(self, rows: List[Any]) -> None:
        if not rows:
            print("(none)")
            return
        data = [_jsonable(r) if not isinstance(r, (str, int, float)) else {"value": r} for r in rows]
        shown = _CLI_COLUMNS.get(type(rows[0]), tuple(data[0]))
        columns = [c for c in shown if any(d.get(c) not in (None, "", ()) for d in data)] or list(shown)
        cells = [[_cli_cell(d.get(c)) for c in columns] for d in data]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
        for row in cells:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _jsonable(value: Any) -> Any:
    """Models as plain JSON values, with the SPEC's field names (no raw payloads)."""
    if isinstance(value, Tick):
        return _tick_record(value, value._exchange_epoch or time.time())
    if isinstance(value, _Instrument):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name != "raw" and not f.name.startswith("_")}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _cli_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # money to the paisa; a finer price (a 0.0025 tick) as it is
        return f"{value:,.2f}" if abs(value - round(value, 2)) < 1e-9 else f"{value:,.4f}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _cli_open(broker: str, cfg: Mapping[str, Any], verbose: bool) -> "TTConnect":
    """The client; on a terminal, a spinner on stderr while the instrument master loads."""
    if not sys.stderr.isatty() or verbose:
        return TTConnect(broker, cfg)
    box: Dict[str, Any] = {}

    def work() -> None:
        try:
            box["client"] = TTConnect(broker, cfg)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(0.5)
    frames, i = "|/-\\", 0
    while worker.is_alive():
        sys.stderr.write(f"\rloading the {broker} instrument master {frames[i % 4]}")
        sys.stderr.flush()
        i += 1
        worker.join(0.15)
    if i:
        sys.stderr.write("\r" + " " * 50 + "\r")
    if "error" in box:
        raise box["error"]
    return box["client"]  # type: ignore[no-any-return]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line (``python -m ttconnect --help``); returns the exit code."""
    # Started with a standard stream closed (<&-, >&-): stdin reads as empty, no terminal, and a
    # closed stderr takes the messages, for this run only; a closed stdout is an error (its output
    # would be lost).
    stand_ins = {name: open(os.devnull, mode) for name, mode in (("stdin", "r"), ("stderr", "w"))
                 if getattr(sys, name) is None}
    for name, stand_in in stand_ins.items():
        setattr(sys, name, stand_in)
    try:
        if sys.stdout is None:
            print("error: standard output is closed, so nothing could be shown; run it with stdout open",
                  file=sys.stderr)
            return 3
        return _cli_main(argv)
    finally:
        for name, stand_in in stand_ins.items():
            setattr(sys, name, None)
            stand_in.close()


def _cli_main(argv: Optional[Sequence[str]]) -> int:
    import logging

    parser = _cli_parser()
    args = parser.parse_args(argv)  # bad usage: argparse prints it and exits 2
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = _CliOut(getattr(args, "json", False))
    import signal

    before = signal.getsignal(signal.SIGTERM)
    catch = threading.current_thread() is threading.main_thread() and before not in (None, signal.SIG_IGN)
    try:
        if catch:
            # `kill`, a service manager, `timeout`: stop as on Ctrl-C, so files (a --record) are closed whole
            signal.signal(signal.SIGTERM, lambda signum, frame: _cli_terminated())
        return _cli_run(args, out, verbose)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _CliTerminated:
        print("terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a Unix tool does
        try:
            sys.stdout = open(os.devnull, "w")  # nothing more to flush into the closed pipe at exit
        except OSError:
            pass
        return 0
    except (TTConnectError, _CliError) as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return _cli_exit_code(exc)
    except OSError as exc:  # a file or directory this command reads or writes (a full disk, a path that is a file)
        if verbose:
            import traceback

            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 3
    finally:
        if catch:
            signal.signal(signal.SIGTERM, before)  # a program calling main() keeps its own handling


class _CliTerminated(BaseException):
    """SIGTERM, raised in the main thread (a BaseException, like KeyboardInterrupt: nothing catches it by mistake)."""


def _cli_terminated() -> None:
    raise _CliTerminated()


def _cli_run(args: Any, out: _CliOut, verbose: bool) -> int:
    command = args.command
    broker, cfg = _cli_config(args)
    if command == "demo":
        return _cli_demo(cfg, out)
    if command == "paper":
        return _cli_paper_reset(broker, cfg, args)
    if command == "login":
        return _cli_login(broker, cfg, out)
    _cli_ask_missing(broker, cfg)
    with _cli_open(broker, cfg, verbose) as client:
        if command == "instruments":
            return _cli_instruments(client, args, out)
        if command in ("profile", "funds", "holdings", "positions", "orders", "trades"):
            out.emit(getattr(client, f"get_{command}")())
        elif command == "place":
            inst = parse_instrument(args.instrument)
            product = args.product or ("CNC" if isinstance(inst, Equity) else "NRML")
            order_id = client.place_order(inst, args.qty, args.side, product, args.order_type, price=args.price,
                                          trigger_price=args.trigger, tag=args.tag)
            out.emit(client.get_order(order_id) if not out.as_json else {"order_id": order_id,
                     "order": _jsonable(client.get_order(order_id))})
        elif command == "modify":
            order_id = client.modify_order(args.order_id, qty=args.qty, price=args.price, trigger_price=args.trigger,
                                           order_type=args.order_type)
            out.emit(client.get_order(order_id))
        elif command == "cancel":
            out.emit(client.get_order(client.cancel_order(args.order_id)))
        elif command in ("cancel-all", "close-all"):
            done, failed = client.cancel_all_orders() if command == "cancel-all" else client.close_all_positions()
            out.emit({"done": done, "failed": failed})
            return 4 if failed else 0
        elif command == "stream":
            return _cli_stream(client, args, out)
    return 0


def _cli_instruments(client: "TTConnect", args: Any, out: _CliOut) -> int:
    if args.action == "refresh":
        # a client that found its DB stale has just loaded the master: report that load
        out.emit(client._instruments.loaded or client.refresh_instruments())
    elif args.action == "search":
        found = client.search(args.prefix, args.exchange, args.limit)
        out.emit([{"instrument": str(i), "token": client.resolve(i)} for i in found])
    elif args.action == "expiries":
        expiries = client.expiries(args.symbol, args.exchange)
        if not expiries:
            raise _CliError(f"no contracts of {args.symbol!r} are listed"
                            f"{' on ' + args.exchange if args.exchange else ''}; try 'instruments search'", 2)
        out.emit([e.isoformat() for e in expiries])
    else:
        out.emit([str(o) for o in client.option_chain(args.symbol, args.expiry, args.exchange)])
    return 0


def _cli_stream(client: "TTConnect", args: Any, out: _CliOut) -> int:
    import json
    import queue

    instruments = [parse_instrument(text) for text in args.instruments]
    ticks: "queue.Queue[Tick]" = queue.Queue()
    try:
        # line-buffered: a line is in the file once its tick is shown (a kill -9 loses at most a part line)
        record = open(args.record, "a", encoding="utf-8", buffering=1) if args.record else None
        if record is not None and _cli_ends_mid_line(args.record):
            record.write("\n")  # ends the part line: the first tick of this run was glued to it, both lost
    except OSError as exc:
        raise _CliError(f"--record {args.record}: cannot write it ({exc.strerror or exc})", 2) from None
    live = sys.stdout.isatty() and not out.as_json
    latest: Dict[str, Tick] = {}
    try:
        client.subscribe(instruments, on_tick=ticks.put, mode=args.mode)
        deadline = time.monotonic() + args.seconds
        drawn = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                tick = ticks.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if record is not None:
                record.write(json.dumps(_tick_record(tick, time.time())) + "\n")
            if out.as_json:
                print(json.dumps(_jsonable(tick)), flush=True)
            elif live:
                latest[str(tick.instrument)] = tick
                if drawn:
                    sys.stdout.write(f"\x1b[{drawn}F")  # back to the table's first line: redraw in place
                drawn = _cli_tick_table(instruments, latest)
            else:
                print(_cli_tick_line(tick), flush=True)
    finally:
        if record is not None:
            record.close()
    return 0


def _cli_ends_mid_line(path: str) -> bool:
    """A regular file whose last line is cut (a recording killed mid-write: kill -9, a full disk)."""
    if not os.path.isfile(path):
        return False  # a pipe or a device: nothing to look back at
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _cli_tick_line(tick: Tick) -> str:
    bid = tick.bids[0].price if tick.bids else None
    ask = tick.asks[0].price if tick.asks else None
    parts = [str(tick.instrument), f"{tick.ltp:.2f}"]
    if tick.change is not None:
        parts.append(f"{tick.change:+.2f}%")
    if bid is not None and ask is not None:
        parts.append(f"{bid:.2f}/{ask:.2f}")
    return "  ".join(parts)


def _cli_tick_table(instruments: Sequence[Instrument], latest: Mapping[str, Tick]) -> int:
    rows = [("instrument", "ltp", "change", "bid", "ask")]
    for inst in instruments:
        tick = latest.get(str(inst))
        if tick is None:
            rows.append((str(inst), "", "", "", ""))
            continue
        rows.append((str(inst), f"{tick.ltp:,.2f}", "" if tick.change is None else f"{tick.change:+.2f}%",
                     f"{tick.bids[0].price:,.2f}" if tick.bids else "", f"{tick.asks[0].price:,.2f}" if tick.asks else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        sys.stdout.write("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                         + "\x1b[K\n")
    sys.stdout.flush()
    return len(rows)


def _cli_login(broker: str, cfg: Dict[str, Any], out: _CliOut) -> int:
    spec = _BROKERS[broker]
    flow = next((f for f in spec["auth"] if f.single_use), None)
    if "local" in spec["hooks"]:
        print(f"{broker} needs no login")
        return 0
    if flow is None:  # a login with credentials alone: make the session now
        _cli_ask_missing(broker, cfg)
        with TTConnect(broker, cfg) as client:
            out.emit(client.get_profile())
        return 0
    _cli_ask_missing(broker, {k: v for k, v in cfg.items()})
    url = TTConnect.login_url(broker, cfg)
    # Refused before the browser step, not after it: the pasted code works once, for minutes
    tokens = [k for f in spec["auth"] if f is not flow for k in f.trigger if cfg.get(k)]
    if tokens:
        raise _CliError(f"the config gives {', '.join(repr(k) for k in tokens)}, and commands would use it instead of "
                        f"the session login makes: remove it (from the config file or TTCONNECT_"
                        f"{tokens[0].upper()}), then run login", 3)
    lacking = [k for k in flow.needs if k != flow.single_use and not cfg.get(k)]
    if lacking and not sys.stdin.isatty():  # on a terminal they are asked for
        raise _CliError(f"{broker} login needs {', '.join(repr(k) for k in lacking)} in the config (or as "
                        f"TTCONNECT_{lacking[0].upper()}) to exchange the code", 3)
    print(f"1. Log in at {url}", file=sys.stderr)
    param = flow.redirect_param or flow.single_use
    print(f"2. Paste the address the broker sends you back to (or its '{param}' value):", file=sys.stderr)
    import getpass

    code = getpass.getpass(f"{flow.single_use}: ") if sys.stdin.isatty() else sys.stdin.readline()
    code = _cli_pasted_code(code, param, url)
    if not code:
        raise _CliError(f"no {flow.single_use} given", 3)
    for key in flow.needs:
        if key != flow.single_use and not cfg.get(key) and sys.stdin.isatty():
            cfg[key] = getpass.getpass(f"{broker} {key}: ")
    with TTConnect(broker, {**cfg, flow.single_use: code, "cache_session": True}) as client:
        profile = client.get_profile()
    print(f"logged in as {profile.user_id}; the session is stored in the cache dir for today", file=sys.stderr)
    out.emit(profile)
    return 0


def _cli_pasted_code(text: str, param: str, login_url: str) -> str:
    """The single-use code in what was pasted: the code alone, or the whole redirect address (people
    copy the address bar). That address sent as the code was refused as 'invalid or expired'."""
    from urllib.parse import parse_qs, unquote_plus, urlsplit

    code = text.strip()
    if "://" not in code and not code.startswith("?") and f"{param}=" not in code:
        return code  # the value alone: codes hold no '?' and no 'name='
    # the query alone: an address without one was read whole as its query, so its path (which may
    # hold a code) was named as a field in the refusal
    query = urlsplit(code).query if "?" in code else "" if "://" in code else code
    fields = parse_qs(query, keep_blank_values=True)
    values = {v.strip() for v in fields.get(param, ()) if v.strip()}
    if len(values) == 1:
        return values.pop()
    # name the fields, never their values: the address may carry other tokens (a part without
    # '=' is a value, not a name)
    names = sorted({unquote_plus(part.split("=", 1)[0]) for part in query.split("&") if "=" in part})
    has = f"its query has {', '.join(names)}" if names else "it has no query" if not query else "its query names no field"
    what = "two different" if values else "no"
    raise _CliError(f"the pasted address has {what} '{param}' ({has}): the login did not complete or the address "
                    f"was cut; log in again at {login_url} and paste the whole address you are sent back to", 3)


def _cli_paper_reset(broker: str, cfg: Mapping[str, Any], args: Any) -> int:
    spec = _BROKERS[broker]
    if "local" not in spec["hooks"]:
        raise _CliError(f"'paper reset' is for the paper broker, not {broker}", 2)
    account = _paper_account_name(cfg.get("account", "default"))
    cache_dir = TTConnect._cache_dir_option(cfg)
    path = os.path.join(cache_dir, f"paper_{account}.db")
    if not os.path.exists(path):
        print(f"paper account {account!r} has nothing to reset in {cache_dir}")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise _CliError("refusing to reset without confirmation: pass --yes", 2)
        answer = input(f"Delete paper account {account!r} (orders, trades, positions, holdings, funds) in "
                       f"{cache_dir}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 0
    _paper_reset(path)
    print(f"paper account {account!r} reset")
    return 0


def _cli_demo_check_own(demo_cfg: Mapping[str, Any], cache_dir: str) -> None:
    """Refuse to start the demo afresh over a paper account 'demo' that holds more than the
    demo's own trades (someone traded in it with --account demo): it would be deleted unasked."""
    with TTConnect(_DEFAULT_BROKER, demo_cfg) as old:
        orders, positions, holdings = old.get_orders(), old.get_positions(), old.get_holdings()
    # the demo buys NIFTY options (NRML), tagged "demo"; anything else is someone's
    own = (not holdings and all((o.tag or "").startswith("demo-") for o in orders)
           and all(p.product is ProductType.NRML and isinstance(p.instrument, Option)
                   and p.instrument.symbol == "NIFTY" for p in positions))
    if not own:
        raise _CliError(f"the paper account 'demo' in {cache_dir} holds orders, positions or holdings the demo did not "
                        "make, and the demo starts that account afresh on every run: keep your own trading in another "
                        "account (--account NAME), or delete it first with 'python -m ttconnect --account demo paper "
                        "reset'", 3)


def _cli_demo(cfg: Mapping[str, Any], out: _CliOut) -> int:
    """The README's first command: the whole interface on paper, offline, in about ten seconds."""
    import queue

    started = time.monotonic()
    cache_dir = TTConnect._cache_dir_option(cfg)
    demo_cfg = {"cache_dir": cache_dir, "account": "demo", "tick_interval": 0.25}
    path = os.path.join(cache_dir, "paper_demo.db")
    if os.path.exists(path):
        _cli_demo_check_own(demo_cfg, cache_dir)
    _paper_reset(path)  # every run starts from the same capital
    say = print if not out.as_json else (lambda *a, **k: None)
    with TTConnect(_DEFAULT_BROKER, demo_cfg) as broker:
        funds = broker.get_funds()
        say(f"paper account 'demo': {funds.available:,.2f} available (cache dir {cache_dir})")
        expiry = broker.expiries("NIFTY")[0]
        nifty = Index(exchange=Exchange.NSE, symbol="NIFTY")
        ticks: "queue.Queue[Tick]" = queue.Queue()
        broker.subscribe(nifty, on_tick=ticks.put, mode="full")
        spot = ticks.get(timeout=5).ltp
        chain = broker.option_chain("NIFTY", expiry)
        strike = min({o.strike for o in chain}, key=lambda k: abs(k - spot))
        call = next(o for o in chain if o.strike == strike and o.option_type is OptionType.CE)
        put = next(o for o in chain if o.strike == strike and o.option_type is OptionType.PE)
        say(f"NIFTY at {spot:,.2f}; nearest expiry {expiry}: {len(chain)} options, at the money {strike:g}")
        watched: List[Instrument] = [nifty, call, put]
        broker.subscribe([call, put], mode="full")
        say("\nstreaming for 3 seconds:")
        latest: Dict[str, Tick] = {}
        deadline, drawn = time.monotonic() + 3.0, 0
        live = sys.stdout.isatty() and not out.as_json
        while time.monotonic() < deadline:
            try:
                tick = ticks.get(timeout=0.5)
            except queue.Empty:
                continue
            latest[str(tick.instrument)] = tick
            if live:
                if drawn:
                    sys.stdout.write(f"\x1b[{drawn}F")
                drawn = _cli_tick_table(watched, latest)
        if not live and not out.as_json:
            for inst in watched:
                if str(inst) in latest:
                    print(_cli_tick_line(latest[str(inst)]))
        last = latest.get(str(call))
        price = last.ltp if last is not None else 100.0
        lot = broker.lot_size(call)
        market = broker.place_order(call, lot, Side.BUY, ProductType.NRML, OrderType.MARKET, tag="demo")
        limit_price = round(max(0.05, price * 0.8) / 0.05) * 0.05
        limit = broker.place_order(call, lot, Side.BUY, ProductType.NRML, OrderType.LIMIT, price=round(limit_price, 2),
                                   tag="demo")
        filled, resting = broker.get_order(market), broker.get_order(limit)
        say(f"\nMARKET BUY {lot} {call}: {filled.status.value} at {filled.average_price:,.2f}")
        say(f"LIMIT  BUY {lot} {call} at {resting.price:,.2f}: {resting.status.value} (below the market, it rests)")
        orders, positions, funds = broker.get_orders(), broker.get_positions(), broker.get_funds()
        if out.as_json:
            out.emit({"orders": orders, "positions": positions, "funds": funds})
        else:
            print("\norders:")
            out.table(orders)
            print("\npositions:")
            out.table(positions)
            print("\nfunds:")
            out.emit(funds)
            print(f"\ndone in {time.monotonic() - started:.1f} s. The same code runs on every broker: only the "
                  "broker's name and its config change.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
