"""Cluster-wide limits per provider (``execution.limits``), enforced through Redis.

A study binds agents to providers (``bindings.providers``) and gives each provider limits::

    execution:
      limits:
        openai: {max_concurrency: 8, requests_per_minute: 600, tokens_per_minute: 200000}

Every worker process of the deployment counts against the same Redis keys, so the limits
hold for the whole cluster, never per worker.

* **max_concurrency** — a run of an agent bound to the provider executes only while it holds
  one of the provider's slots. A slot is a lease: a member of a sorted set scored by its
  expiry (Redis server time), taken by one Lua script that drops expired members and adds
  the run's if fewer than the cap are held. A thread of each process renews the slots its
  runs hold every :data:`RENEW_S` seconds; a killed worker stops renewing, so its slots
  come back on their own within one lease (``STUDYQ_LEASE_S``). A run that finds no slot
  free polls for :data:`ADMIT_WAIT_S` seconds, then goes back to the queue *without
  charging an attempt* (its claim is released, its message requeued): a worker thread is
  never parked on a slot.
* **requests_per_minute** — a moving window (the ``limits`` package's Redis moving window:
  exact, one list entry per request). Each run counts one request when it is admitted;
  an agent that calls :func:`request` around its API calls has its first call use that
  count and each further call count one more. So an agent that never calls it counts one
  request per run.
* **tokens_per_minute** — ``request(provider, tokens=estimate)`` counts the estimate
  against a sliding window counter (``limits``' sliding window: two counters, O(1) per hit
  whatever the amount; a moving window would keep one list entry per *token*).

Inside a run, a full window is waited on for at most :data:`REQUEST_WAIT_S` seconds, then
:func:`request` raises :class:`RateLimited` with ``retry_after_s`` (the retry policy
re-queues it, see :mod:`workers.transient`). At admission, a full requests window is waited
on like a busy slot, then the run goes back to the queue uncharged.

Written here by hand, because no library does it: the concurrency leases (``limits`` has
windows, not semaphores with expiry) and their renewal. The windows are ``limits``'.

**Keys.** ``studyq:limits:<deployment>:<provider>...``, where ``<deployment>`` is a digest
of the result store's identity (driver, host, port, database; no password): two deployments
sharing one Redis do not share limits; the workers of one deployment always do.

**Which Redis.** ``STUDYQ_LIMITS_URL`` when set, else the broker when it is Redis
(``redis://``/``rediss://``). A run of a study that declares limits on a worker with
neither fails as a ``binding`` error saying so (:class:`LimitsUnavailable`).

**A Redis restart** (no persistence) forgets slots and windows. The renewal thread puts
back the slots of runs still executing on its next pass, and for :data:`RESTART_GRACE_S`
after Redis comes back empty no new slot is handed out, so the cap still holds. The
windows' history is lost: in the minute after a restart up to one more window's worth of
requests may be counted.

Outside a studyq run (a notebook, the embedded executor, a unit test) :func:`request` does
nothing: agent code runs unchanged everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import redis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from sqlalchemy.engine import URL, make_url

from orchestrator.contracts.errors import StudyqError
from orchestrator.contracts.extensions import Bindings, ExecutionPolicy, ProviderLimit
from orchestrator.contracts.runspec import RunSpec
from workers.retrying import retry_unavailable
from workers.transient import RateLimited

if TYPE_CHECKING:
    from orchestrator.contracts.settings import Settings
    from workers.runtime import WorkerRuntime

__all__ = [
    "ADMIT_WAIT_S",
    "REQUEST_WAIT_S",
    "RESTART_GRACE_S",
    "Limiter",
    "LimitsUnavailable",
    "NoSlot",
    "RateLimited",
    "StudyLimits",
    "admit",
    "limits_url",
    "release_killed",
    "request",
]

log = logging.getLogger("studyq.worker")

ADMIT_WAIT_S = 2.0
"""How long a run waits for a slot (or room in the requests window) before it goes back to
the queue uncharged."""
REQUEST_WAIT_S = 5.0
"""How long :func:`request` waits for room in a window before it raises RateLimited."""
RENEW_S = 0.5
"""How often a process renews the slots its runs hold (one script call per provider)."""
RESTART_GRACE_S = 2.5 * RENEW_S
"""After Redis comes back empty, how long only renewals (no new slots) are accepted: every
live process renews within it. (A deployment's very first run waits it out once, too: Redis
cannot tell a first start from a restart without persistence.) Below :data:`ADMIT_WAIT_S`."""
WINDOW_MARGIN_S = 1
"""The windows are a minute plus this long, so that jitter between counting a request and
its arrival at the provider never lets the provider's own 60 s window see more."""
_POLL_S = 0.1

# KEYS: slots zset, epoch key (when Redis first handed out a slot; kept a day past the last
# renewal). ARGV: member, lease_s, cap, grace_s.
# Returns {admitted (0/1), slots held}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local epoch = tonumber(redis.call('GET', KEYS[2]))
if not epoch then
  redis.call('SET', KEYS[2], tostring(now), 'EX', 86400)
  epoch = now
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  return {1, redis.call('ZCARD', KEYS[1])}
end
local held = redis.call('ZCARD', KEYS[1])
if now - epoch < tonumber(ARGV[4]) or held >= tonumber(ARGV[3]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000) + 1000)
return {1, held + 1}
"""

# KEYS: slots zset, epoch key. ARGV: lease_s, member... Re-adds members a restarted Redis
# lost: their runs are executing. Returns how many were missing.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('SET', KEYS[2], tostring(now), 'NX')
redis.call('EXPIRE', KEYS[2], 86400)
local lease = tonumber(ARGV[1])
local missing = 0
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) == 1 then missing = missing + 1 end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000) + 1000)
return missing
"""


class LimitsUnavailable(StudyqError):
    """A study declares provider limits, but this worker has no Redis to enforce them."""


class NoSlot(Exception):
    """No slot (or no room in the requests window) within :data:`ADMIT_WAIT_S`: the run goes
    back to the queue without charging an attempt."""

    def __init__(self, provider: str, what: str, retry_after_s: float) -> None:
        super().__init__(f"provider {provider}: {what}; retry after {retry_after_s:.2f} s")
        self.provider = provider
        self.retry_after_s = retry_after_s


def limits_url(settings: Settings) -> str | None:
    """The Redis that holds the limits: ``STUDYQ_LIMITS_URL``, else a Redis broker."""
    explicit = getattr(settings, "limits_url", None)
    if explicit:
        return str(explicit)
    broker = settings.broker_url or ""
    return broker if broker.startswith(("redis://", "rediss://")) else None


def deployment_id(database_url: str | URL) -> str:
    """The digest that namespaces a deployment's keys: the store's identity (the dialect
    without its driver, host, port, database; no user or password)."""
    url = make_url(database_url)
    identity = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def _window_item(per_minute: float) -> RateLimitItem:
    """``per_minute`` as a ``limits`` item over a minute plus :data:`WINDOW_MARGIN_S` (a rate
    below one a minute: one per the matching longer window)."""
    if per_minute >= 1:
        return RateLimitItemPerSecond(int(per_minute), 60 + WINDOW_MARGIN_S)
    return RateLimitItemPerSecond(1, math.ceil(60 / per_minute) + WINDOW_MARGIN_S)


class Limiter:
    """One process's view of the limits in one Redis, for one deployment."""

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        lease_s: float,
        renew_s: float = RENEW_S,
        grace_s: float | None = None,
    ) -> None:
        """``grace_s``: :data:`RESTART_GRACE_S` unless given."""
        self.url = url
        self.namespace = namespace
        self.lease_s = lease_s
        self.renew_s = renew_s
        self.grace_s = RESTART_GRACE_S if grace_s is None else grace_s
        self.prefix = f"studyq:limits:{namespace}"
        # Short timeouts and two quick retries: a caller waits a bounded time in any case.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        )
        storage = RedisStorage(
            url, connection_pool=self.client.connection_pool, key_prefix=self.prefix
        )
        self.requests_window = MovingWindowRateLimiter(storage)
        self.tokens_window = SlidingWindowCounterRateLimiter(storage)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)
        self._lock = threading.Lock()
        self._held: dict[str, set[str]] = {}
        self._renewer: threading.Thread | None = None

    def keys(self, provider: str) -> list[str]:
        """The provider's slots set and epoch key."""
        return [f"{self.prefix}:{provider}:slots", f"{self.prefix}:{provider}:epoch"]

    # -- concurrency slots -----------------------------------------------------------------

    def try_slot(self, provider: str, member: str, cap: int) -> bool:
        """One attempt to take a slot (True: held, and renewed until released)."""
        with self._lock:
            admitted, _ = self._acquire(
                keys=self.keys(provider), args=[member, self.lease_s, cap, self.grace_s]
            )
            if admitted:
                self._held.setdefault(provider, set()).add(member)
                self._start_renewer()
        return bool(admitted)

    def acquire_slot(self, provider: str, member: str, cap: int, wait_s: float) -> bool:
        """Take a slot, polling for up to ``wait_s`` (Redis unreachable counts as busy)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.try_slot(provider, member, cap):
                    return True
            except RedisError as error:
                log.warning("provider %s: limits Redis unreachable (%s)", provider, error)
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, _POLL_S * (0.5 + random.random())))

    def release_slot(self, provider: str, member: str) -> None:
        """Give a slot back (if Redis is unreachable, its lease expires by itself)."""
        with self._lock:
            held = self._held.get(provider)
            if held is not None:
                held.discard(member)
            try:
                self.client.zrem(self.keys(provider)[0], member)
            except RedisError as error:
                log.warning(
                    "provider %s: could not release a slot (%s); it expires within %s s",
                    provider,
                    error,
                    self.lease_s,
                )

    def release_prefixed(self, provider: str, prefix: str) -> int:
        """Give back every slot of ``provider`` whose member starts with ``prefix`` (those of
        a killed process, which renews and releases nothing any more); returns how many."""
        key = self.keys(provider)[0]
        try:
            members: list[Any] = list(self.client.zrange(key, 0, -1))
            killed = [m for m in members if bytes(m).decode("utf-8", "replace").startswith(prefix)]
            return int(self.client.zrem(key, *killed)) if killed else 0
        except RedisError as error:
            log.warning(
                "provider %s: could not release a killed run's slot (%s); it expires within %s s",
                provider,
                error,
                self.lease_s,
            )
            return 0

    def held(self, provider: str) -> int:
        """Slots of ``provider`` held cluster-wide now (expired ones not counted)."""
        now = time.time()
        return int(self.client.zcount(self.keys(provider)[0], now, "+inf"))

    def renew(self) -> int:
        """Renew every slot this process holds; returns how many Redis had lost."""
        missing = 0
        with self._lock:
            for provider, members in self._held.items():
                if members:
                    missing += int(
                        self._renew(keys=self.keys(provider), args=[self.lease_s, *members])
                    )
        return missing

    def _start_renewer(self) -> None:
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(
                target=self._renew_loop, name="studyq-limits-renewer", daemon=True
            )
            self._renewer.start()

    def _renew_loop(self) -> None:
        while True:
            time.sleep(self.renew_s)
            try:
                missing = self.renew()
            except RedisError as error:
                log.warning("limits Redis unreachable while renewing slots: %s", error)
                continue
            except Exception:  # keep renewing
                log.exception("renewing provider slots failed")
                continue
            if missing:
                log.warning("limits Redis had lost %d slot(s) held here; put back", missing)

    # -- windows ---------------------------------------------------------------------------

    def hit(
        self, provider: str, what: str, per_minute: float, cost: int, wait_s: float
    ) -> float | None:
        """Count ``cost`` against the provider's ``what`` window (``requests``: moving window;
        ``tokens``: sliding window counter), waiting up to ``wait_s`` for room. None when
        counted; else the seconds until there may be room."""
        item = _window_item(per_minute)
        window = self.requests_window if what == "requests" else self.tokens_window
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if window.hit(item, provider, what, cost=cost):
                    return None
                reset = window.get_window_stats(item, provider, what).reset_time
                # a sliding window counter frees room as the last window's weight decays
                decay = 60.0 * cost / item.amount if what == "tokens" else _POLL_S
                retry_after = max(reset - time.time(), decay, _POLL_S)
            except RedisError as error:
                log.warning("provider %s: limits Redis unreachable (%s)", provider, error)
                retry_after = 1.0
            left = deadline - time.monotonic()
            if left <= 0:
                return retry_after
            time.sleep(min(left, retry_after, 0.25) * (0.5 + random.random() / 2))


class _Bounces:
    """The runs that went back to the queue waiting for a provider: logged at INFO once per
    :data:`BOUNCE_LOG_S` per provider and process, and Celery's WARNING (with traceback)
    for the task's ``Reject`` is dropped, in the thread that raised it."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def note(self, error: NoSlot) -> None:
        self._local.pending = time.monotonic()
        now = time.monotonic()
        with self._lock:
            count = self._counts[error.provider] = self._counts.get(error.provider, 0) + 1
            if now - self._logged.get(error.provider, -BOUNCE_LOG_S) < BOUNCE_LOG_S:
                return
            self._logged[error.provider] = now
            self._counts[error.provider] = 0
        log.info(
            "%d run(s) went back to the queue here since the last such line, waiting for "
            "provider %s; attempts not charged (latest: %s)",
            count,
            error.provider,
            error,
        )

    def filter(self, record: logging.LogRecord) -> bool:
        pending = getattr(self._local, "pending", None)
        if pending is None or time.monotonic() - pending > 5.0:
            return True
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ != "Reject":
            return True
        self._local.pending = None
        return False


BOUNCE_LOG_S = 30.0
_BOUNCES = _Bounces()
logging.getLogger("celery.app.trace").addFilter(_BOUNCES.filter)

_LIMITERS: dict[tuple[int, str, str], Limiter] = {}
_LIMITERS_LOCK = threading.Lock()


def limiter_for(url: str, namespace: str, lease_s: float) -> Limiter:
    """This process's :class:`Limiter` on ``url`` (one per process: never across a fork)."""
    key = (os.getpid(), url, namespace)
    with _LIMITERS_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = Limiter(url, namespace, lease_s=lease_s)
        return limiter


@dataclass(frozen=True, slots=True)
class StudyLimits:
    """A study's provider bindings and limits, as registered."""

    providers: dict[str, str]
    limits: dict[str, ProviderLimit]

    @classmethod
    def from_definition(cls, definition: dict[str, Any]) -> StudyLimits | None:
        """None when the study declares no limits (or its sections do not parse: the run
        fails as a binding error elsewhere)."""
        try:
            bindings = Bindings.model_validate(definition.get("bindings") or {})
            execution = ExecutionPolicy.model_validate(definition.get("execution") or {})
        except ValidationError:
            return None
        if not execution.limits:
            return None
        return cls(dict(bindings.providers), dict(execution.limits))


@dataclass(slots=True)
class _Scope:
    """What :func:`request` needs inside one admitted run."""

    limiter: Limiter
    study: StudyLimits
    provider: str | None
    reserved: bool = False  # the run's first request was counted at admission
    requests: int = field(default=0)


_SCOPE: ContextVar[_Scope | None] = ContextVar("studyq_limits_scope", default=None)
_STUDIES: weakref.WeakKeyDictionary[WorkerRuntime, dict[str, StudyLimits | None]] = (
    weakref.WeakKeyDictionary()
)
_NOTHING: AbstractContextManager[None] = nullcontext()


def study_limits(runtime: WorkerRuntime, study_id: str) -> StudyLimits | None:
    """The study's limits, read from the store once per study and process."""
    cache = _STUDIES.setdefault(runtime, {})
    if study_id in cache:
        return cache[study_id]
    info = retry_unavailable(
        lambda: runtime.store.find_study(study_id),
        what=f"loading the provider limits of study {study_id}",
        budget_s=runtime.settings.result_retry_s,
        log=log,
    )
    found = None if info is None else StudyLimits.from_definition(info.definition)
    cache[study_id] = found
    return found


def admit(runtime: WorkerRuntime, spec: RunSpec) -> AbstractContextManager[None]:
    """Admit one claimed run under its provider's limits: take a slot (``max_concurrency``)
    and count its first request (``requests_per_minute``), waiting at most
    :data:`ADMIT_WAIT_S`. Returns the context manager the run executes in (it releases the
    slot at the end and lets :func:`request` count the run's calls).

    Raises:
        NoSlot: nothing free in time; release the claim and requeue the message.
        LimitsUnavailable: the study declares limits and this worker has no Redis.
    """
    study = study_limits(runtime, spec.study_id)
    if study is None:
        return _NOTHING
    url = limits_url(runtime.settings)
    if url is None:
        raise LimitsUnavailable(
            f"study {spec.study_id} declares execution.limits, but this worker has no Redis "
            "to enforce them: its broker is not Redis and STUDYQ_LIMITS_URL is not set. "
            "Fix: set STUDYQ_LIMITS_URL=redis://host:6379/0 on every worker."
        )
    limiter = limiter_for(url, deployment_id(runtime.store.engine.url), runtime.settings.lease_s)
    provider = study.providers.get(spec.agent_key)
    limit = study.limits.get(provider) if provider is not None else None
    scope = _Scope(limiter, study, provider)
    member = f"{runtime.worker}/{spec.run_id}/{time.time_ns()}"
    holding = False
    if provider is not None and limit is not None:
        if limit.max_concurrency is not None:
            if not limiter.acquire_slot(provider, member, limit.max_concurrency, ADMIT_WAIT_S):
                _bounce(NoSlot(provider, f"all {limit.max_concurrency} slots busy", ADMIT_WAIT_S))
            holding = True
        if limit.requests_per_minute is not None:
            retry_after = limiter.hit(
                provider, "requests", limit.requests_per_minute, 1, ADMIT_WAIT_S
            )
            if retry_after is not None:
                if holding:
                    limiter.release_slot(provider, member)
                _bounce(NoSlot(provider, "requests_per_minute reached", retry_after))
            scope.reserved = True
    return _admitted(scope, member if holding else None)


def release_killed(runtime: WorkerRuntime, spec: RunSpec, worker: str) -> int:
    """The prefork parent, after it killed its child ``worker`` at ``spec``'s hard time
    limit: give back the slot the child held for the run (:func:`admit`'s member), at once
    instead of a lease later. Returns how many slots it gave back."""
    study = study_limits(runtime, spec.study_id)
    url = limits_url(runtime.settings)
    provider = None if study is None else study.providers.get(spec.agent_key)
    if study is None or url is None or provider is None or provider not in study.limits:
        return 0
    limiter = limiter_for(url, deployment_id(runtime.store.engine.url), runtime.settings.lease_s)
    return limiter.release_prefixed(provider, f"{worker}/{spec.run_id}/")


def _bounce(error: NoSlot) -> NoReturn:
    _BOUNCES.note(error)
    raise error


@contextmanager
def _admitted(scope: _Scope, member: str | None) -> Iterator[None]:
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)
        if member is not None and scope.provider is not None:
            scope.limiter.release_slot(scope.provider, member)


@contextmanager
def request(provider: str, tokens: int = 0) -> Iterator[None]:
    """Count one API request (and ``tokens``, an estimate) against ``provider``'s limits,
    around the call::

        with workers.limits.request("openai", tokens=1200):
            reply = client.chat.completions.create(...)

    Waits up to :data:`REQUEST_WAIT_S` for room in a full window, then raises
    :class:`RateLimited` (``retry_after_s`` set). A no-op outside a studyq run, and for a
    provider the run's study declares no limits for.

    Raises:
        RateLimited: the provider's window stayed full.
        ValueError: ``tokens`` is negative, or more than ``tokens_per_minute`` itself.
    """
    if tokens < 0:
        raise ValueError(f"request({provider!r}, tokens={tokens}): tokens must be >= 0")
    scope = _SCOPE.get()
    limit = None if scope is None else scope.study.limits.get(provider)
    if scope is not None and limit is not None:
        _count(scope, provider, limit, tokens)
    yield


def _count(scope: _Scope, provider: str, limit: ProviderLimit, tokens: int) -> None:
    scope.requests += 1
    limiter = scope.limiter
    if limit.requests_per_minute is not None:
        if scope.reserved and provider == scope.provider:
            scope.reserved = False  # counted when the run was admitted
        else:
            retry_after = limiter.hit(
                provider, "requests", limit.requests_per_minute, 1, REQUEST_WAIT_S
            )
            if retry_after is not None:
                raise RateLimited(retry_after_s=retry_after)
    if limit.tokens_per_minute is not None and tokens > 0:
        if tokens > limit.tokens_per_minute:
            raise ValueError(
                f"request({provider!r}, tokens={tokens}): more than the provider's "
                f"tokens_per_minute ({limit.tokens_per_minute:g}) in one request; it could "
                "never be sent. Fix: split the request or raise tokens_per_minute."
            )
        retry_after = limiter.hit(
            provider, "tokens", limit.tokens_per_minute, tokens, REQUEST_WAIT_S
        )
        if retry_after is not None:
            raise RateLimited(retry_after_s=retry_after)
