"""The dashboard's web app: a Starlette application rendering Jinja2 templates.

Pages (HTML, server-rendered; plots are inline SVG drawn in Python):

* ``GET /``: the studies; ``GET /fragments/studies``: its live table.
* ``GET /studies/{study_id}[?metric=source:name]``: one study; ``.../fragment``: its live part.
* ``GET /studies/{study_id}/failures?kind=&type=&message=``: the failed runs of one error group.
* ``GET /studies/{study_id}/runs/{run_id}``: one run; ``.../fragment``: its live part.
* ``POST /studies/{study_id}/resubmit``, ``/cancel`` and ``/budget``
  (:func:`orchestrator.budget.set_budget`: a higher ``max_cost_usd`` / ``max_tokens``, which
  continues a study its budget stopped): actions, each refused with 401 unless the token
  is set (``STUDYQ_DASHBOARD_TOKEN``) and the request carries it (``Authorization: Bearer
  TOKEN`` or a ``token`` form field); without it the dashboard is read-only.

The studies list and a study's figures are served as snapshots at most :data:`SNAPSHOT_S`
old, refreshed in the background (:meth:`Dashboard.snapshot`); runs, failure listings and
actions read the database on every request.

Errors are pages, never tracebacks: 404 for an unknown study, run or path, 503 while the
database cannot be reached (the app starts anyway and recovers when it is back), 401 for a
missing or wrong token, 400 for a bad form, 500 (logged) for anything else. Every response
carries a Content-Security-Policy that allows only this origin, so a page cannot load
anything from elsewhere.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.contracts.errors import (
    BrokerUnavailableError,
    StoreError,
    StoreUnavailableError,
    StudyError,
)
from orchestrator.contracts.settings import Settings
from orchestrator.dashboard import views
from orchestrator.insight.plots import format_number
from orchestrator.store import ResultStore, mask_url
from orchestrator.store.engine import transaction
from orchestrator.store.lookup import open_existing
from orchestrator.store.queries import find_study

__all__ = ["REFRESH_S", "Dashboard", "create_app"]

log = logging.getLogger("studyq.dashboard")

REFRESH_S = 3
"""Seconds between two refreshes of a page's live part."""

SNAPSHOT_S = 2.0
"""How long the studies list and a study page's figures are served from memory before they
are read again (see :meth:`Dashboard.snapshot`)."""

STALE_S = 30.0
"""A snapshot older than this is never served: the request reads the database itself."""

_SNAPSHOTS = 64
"""Snapshots kept (least recently used dropped first)."""

_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_T = TypeVar("_T")


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _rate(per_s: float | None) -> str:
    if not per_s:
        return "-"
    return f"{per_s * 60:,.1f}/min" if per_s < 1 else f"{per_s:,.1f}/s"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("orchestrator.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, rate=_rate, eta=_eta, money=_money, num=format_number)
    env.globals.update(refresh_s=REFRESH_S, urlencode=urlencode)
    return env


class Dashboard:
    """The app's state: the store (opened on first use, so the app starts while the
    database is down), the settings, and the templates."""

    def __init__(
        self,
        db_url: str,
        settings: Settings,
        *,
        broker: str | None = None,
        snapshot_s: float = SNAPSHOT_S,
    ) -> None:
        self.db_url = db_url
        self.settings = settings
        self.broker = broker or settings.broker_url
        self.token = settings.dashboard_token or None
        self.env = _environment()
        self.snapshot_s = snapshot_s
        self._store: ResultStore | None = None
        self._lock = threading.Lock()
        self._snapshots: OrderedDict[tuple[Any, ...], tuple[float, Any]] = OrderedDict()
        self._refreshing: set[tuple[Any, ...]] = set()

    @property
    def where(self) -> str:
        """The database URL, password masked."""
        return mask_url(self.db_url)

    def store(self) -> ResultStore:
        with self._lock:
            if self._store is None:
                self._store = open_existing(self.db_url, command="dashboard")
            return self._store

    def read(self, view: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``view(connection, *args)`` in one read-only transaction (one snapshot)."""
        with transaction(self.store().engine, readonly=True) as connection:
            return view(connection, *args, **kwargs)

    def snapshot(self, view: Callable[..., _T], *args: Any) -> _T:
        """``view``'s result at most :attr:`snapshot_s` seconds old, shared by every viewer.

        Younger than ``snapshot_s``: served as is. Older, up to :data:`STALE_S`: served, and
        recomputed on a background thread (one at a time per page), so a page refreshing
        every few seconds never waits for the scan. Older still, or never read: computed
        now. With ``snapshot_s`` 0 every request reads the database."""
        if self.snapshot_s <= 0:
            return self.read(view, *args)
        key = (view.__name__, *args)
        now = time.monotonic()
        with self._lock:
            entry = self._snapshots.get(key)
            if entry is not None:
                self._snapshots.move_to_end(key)
                age = now - entry[0]
                if age < self.snapshot_s:
                    return cast(_T, entry[1])
                if age < STALE_S and key not in self._refreshing:
                    self._refreshing.add(key)
                    threading.Thread(
                        target=self._refresh, args=(key, view, args), daemon=True
                    ).start()
                if age < STALE_S:
                    return cast(_T, entry[1])
        value = self.read(view, *args)
        self._keep(key, value)
        return value

    def _refresh(self, key: tuple[Any, ...], view: Callable[..., Any], args: Any) -> None:
        try:
            self._keep(key, self.read(view, *args))
        except Exception:  # the next request past STALE_S reads (and reports) it itself
            log.warning("dashboard: refreshing %s failed", key[0], exc_info=True)
        finally:
            with self._lock:
                self._refreshing.discard(key)

    def _keep(self, key: tuple[Any, ...], value: Any) -> None:
        with self._lock:
            self._snapshots[key] = (time.monotonic(), value)
            self._snapshots.move_to_end(key)
            while len(self._snapshots) > _SNAPSHOTS:
                self._snapshots.popitem(last=False)

    def forget(self, study_id: str) -> None:
        """Drop the snapshots of a study (after an action changed it) and of the list."""
        with self._lock:
            for key in [k for k in self._snapshots if study_id in k[1:2] or k[0] == "studies_view"]:
                del self._snapshots[key]

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def page(self, name: str, context: dict[str, Any], *, status: int = 200) -> HTMLResponse:
        common = {
            "actions": self.token is not None,
            "flower_url": self.settings.flower_url.rstrip("/"),
            "where": self.where,
        }
        html = self.env.get_template(name).render(**common, **context)
        return HTMLResponse(html, status_code=status)


class _Headers:
    """Security headers on every response (pure ASGI, so streaming is untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", _CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


def _not_found(dashboard: Dashboard, what: str) -> HTTPException:
    return HTTPException(
        404, f"There is no {what} in {dashboard.where}. The studies page lists those it holds."
    )


async def _read(request: Request, view: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    return await run_in_threadpool(_dashboard(request).read, view, *args, **kwargs)


# -- pages ---------------------------------------------------------------------------------


async def _snapshot(request: Request, view: Callable[..., _T], *args: Any) -> _T:
    return await run_in_threadpool(_dashboard(request).snapshot, view, *args)


async def studies_page(request: Request) -> Response:
    context = await _snapshot(request, views.studies_view)
    return _dashboard(request).page("studies.html", context)


async def studies_fragment(request: Request) -> Response:
    context = await _snapshot(request, views.studies_view)
    return _dashboard(request).page("_studies.html", context)


async def _study(request: Request) -> dict[str, Any]:
    study_id = request.path_params["study_id"]
    metric = request.query_params.get("metric")
    context = await _snapshot(request, views.study_view, study_id, metric)
    if context is None:
        raise _not_found(_dashboard(request), f"study '{study_id}'")
    query = f"?{urlencode({'metric': metric})}" if metric else ""
    return {**context, "metric_query": query}


async def study_page(request: Request) -> Response:
    return _dashboard(request).page("study.html", await _study(request))


async def study_fragment(request: Request) -> Response:
    return _dashboard(request).page("_study.html", await _study(request))


async def _run(request: Request) -> dict[str, Any]:
    study_id, run_id = request.path_params["study_id"], request.path_params["run_id"]
    context = await _read(request, views.run_view, study_id, run_id)
    if context is None:
        raise _not_found(_dashboard(request), f"run '{run_id}' of study '{study_id}'")
    return context


async def run_page(request: Request) -> Response:
    return _dashboard(request).page("run.html", await _run(request))


async def run_fragment(request: Request) -> Response:
    return _dashboard(request).page("_run.html", await _run(request))


async def failures_page(request: Request) -> Response:
    study_id = request.path_params["study_id"]
    query = request.query_params
    context = await _read(
        request,
        views.failed_runs_view,
        study_id,
        error_kind=query.get("kind"),
        error_type=query.get("type"),
        error_message=query.get("message"),
    )
    if context is None:
        raise _not_found(_dashboard(request), f"study '{study_id}'")
    return _dashboard(request).page("failures.html", context)


# -- actions ---------------------------------------------------------------------------------


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form (the last value of each field); other bodies are refused."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    body = await request.body()
    if body and kind != "application/x-www-form-urlencoded":
        raise HTTPException(
            400, "send the form as application/x-www-form-urlencoded (as the page's forms do)."
        )
    if len(body) > 64 * 1024:
        raise HTTPException(400, "the form is larger than 64 KiB.")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise HTTPException(400, "the form is not UTF-8.") from None
    return {key: values[-1] for key, values in fields.items()}


def _authorize(dashboard: Dashboard, request: Request, form: dict[str, str]) -> None:
    """Refuse (401) unless a token is configured and the request carries it."""
    if dashboard.token is None:
        raise HTTPException(
            401,
            "The dashboard is read-only: actions need STUDYQ_DASHBOARD_TOKEN set where "
            "`studyq dashboard` runs. Fix: restart it with the variable set, or use the CLI "
            "(studyq resubmit / cancel).",
        )
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else form.get("token", "")
    if not given or not hmac.compare_digest(given.encode(), dashboard.token.encode()):
        raise HTTPException(
            401,
            "Missing or wrong token. Fix: enter the dashboard token "
            "(STUDYQ_DASHBOARD_TOKEN) in the form, or send Authorization: Bearer TOKEN.",
        )


async def _action(request: Request, name: str) -> tuple[Dashboard, str, dict[str, str]]:
    dashboard = _dashboard(request)
    study_id = request.path_params["study_id"]
    form = await _form(request)
    _authorize(dashboard, request, form)
    info = await run_in_threadpool(dashboard.read, find_study, study_id)
    if info is None:
        raise _not_found(dashboard, f"study '{study_id}'")
    log.info("dashboard action %s on %s", name, study_id)
    dashboard.forget(study_id)
    return dashboard, study_id, form


def _done(dashboard: Dashboard, study_id: str, action: str, message: str) -> Response:
    dashboard.forget(study_id)  # the next page shows what the action changed
    return dashboard.page("done.html", {"study_id": study_id, "action": action, "message": message})


async def resubmit_action(request: Request) -> Response:
    from orchestrator.distributed import resubmit

    dashboard, study_id, form = await _action(request, "resubmit")
    error_class = form.get("error_class", "").strip() or None
    contains = form.get("error_contains", "").strip() or None
    report = await run_in_threadpool(
        resubmit,
        study_id,
        statuses=("failed",),
        error_contains=contains,
        error_class=error_class,
        db=dashboard.db_url,
        broker=dashboard.broker,
        settings=dashboard.settings,
    )
    which = f" of error class {error_class}" if error_class else ""
    which += f" whose error contains {contains!r}" if contains else ""
    return _done(
        dashboard,
        study_id,
        "resubmit",
        f"{report.planned} failed runs{which} put back; {report.published} published to the queue.",
    )


async def cancel_action(request: Request) -> Response:
    from orchestrator.distributed import cancel

    dashboard, study_id, form = await _action(request, "cancel")
    terminate = form.get("terminate", "") in ("1", "on", "true", "yes")
    report = await run_in_threadpool(
        cancel,
        study_id,
        terminate=terminate,
        db=dashboard.db_url,
        broker=dashboard.broker,
        settings=dashboard.settings,
    )
    extra = f"; {len(report.terminated)} running runs stopped" if terminate else ""
    locked = f"; {report.locked} held by a worker, cancel again later" if report.locked else ""
    return _done(
        dashboard, study_id, "cancel", f"{report.cancelled} runs cancelled{extra}{locked}."
    )


def _number(form: dict[str, str], name: str, kind: type[float] | type[int]) -> float | None:
    text = form.get(name, "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise HTTPException(
            400,
            f"{name}: {text!r} is not a number. Fix: enter a positive number or leave it empty.",
        ) from None


async def budget_action(request: Request) -> Response:
    from orchestrator.budget import set_budget

    dashboard, study_id, form = await _action(request, "budget")
    max_cost = _number(form, "max_cost_usd", float)
    max_tokens = _number(form, "max_tokens", int)
    report = await run_in_threadpool(
        set_budget,
        study_id,
        max_cost_usd=max_cost,
        max_tokens=None if max_tokens is None else int(max_tokens),
        db=dashboard.db_url,
        broker=dashboard.broker,
        settings=dashboard.settings,
    )
    limits = report.limits
    parts = []
    if limits.max_cost_usd is not None:
        parts.append(f"max cost ${limits.max_cost_usd:,.2f} (spent ${report.spent.cost_usd:,.2f})")
    if limits.max_tokens is not None:
        parts.append(f"max tokens {limits.max_tokens:,} (spent {report.spent.tokens:,})")
    if report.resumed is not None:
        state = "; the study continues"
    elif report.still_paused is not None:
        state = f"; still paused ({report.still_paused.reason})"
    else:
        state = ""
    published = (
        f"; {report.published} waiting runs published again"
        if report.published
        else "; no broker: the next `studyq run` continues it"
        if report.published is None and report.resumed is not None
        else ""
    )
    return _done(
        dashboard, study_id, "budget", f"Budget set: {', '.join(parts)}{state}{published}."
    )


# -- errors ----------------------------------------------------------------------------------

_TITLES = {
    400: "Bad request",
    401: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    500: "Internal error",
    503: "Database unavailable",
}


def _error_page(request: Request, status: int, message: str) -> Response:
    dashboard = _dashboard(request)
    headers = {"WWW-Authenticate": 'Bearer realm="studyq dashboard"'} if status == 401 else None
    response = dashboard.page(
        "error.html",
        {"status": status, "heading": _TITLES.get(status, "Error"), "message": message},
        status=status,
    )
    if headers:
        response.headers.update(headers)
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404 and message == "Not Found":
        message = f"There is no page at {request.url.path}."
    return _error_page(request, exc.status_code, str(message))


async def _store_down(request: Request, exc: Exception) -> Response:
    return _error_page(
        request,
        503,
        f"The results database {_dashboard(request).where} cannot be reached: "
        f"{_first_line(exc)}. This page works again once it is back (try again in a moment).",
    )


async def _study_error(request: Request, exc: Exception) -> Response:
    return _error_page(request, 400, _first_line(exc))


async def _broker_down(request: Request, exc: Exception) -> Response:
    return _error_page(request, 503, f"The broker cannot be reached: {_first_line(exc)}.")


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("dashboard: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error_page(request, 500, "Something went wrong on the server; its log has the details.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the app ---------------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    try:
        yield
    finally:
        app.state.dashboard.close()


def create_app(
    db_url: str,
    settings: Settings,
    *,
    broker: str | None = None,
    snapshot_s: float = SNAPSHOT_S,
) -> Starlette:
    """The dashboard for the store at ``db_url`` (nothing is opened until the first page);
    ``snapshot_s`` 0 reads the database on every request (see :meth:`Dashboard.snapshot`)."""
    dashboard = Dashboard(db_url, settings, broker=broker, snapshot_s=snapshot_s)
    routes = [
        Route("/", studies_page),
        Route("/fragments/studies", studies_fragment),
        Route("/studies/{study_id}", study_page),
        Route("/studies/{study_id}/fragment", study_fragment),
        Route("/studies/{study_id}/failures", failures_page),
        Route("/studies/{study_id}/runs/{run_id}", run_page),
        Route("/studies/{study_id}/runs/{run_id}/fragment", run_fragment),
        Route("/studies/{study_id}/resubmit", resubmit_action, methods=["POST"]),
        Route("/studies/{study_id}/cancel", cancel_action, methods=["POST"]),
        Route("/studies/{study_id}/budget", budget_action, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("orchestrator.dashboard", "static")])),
    ]
    app = Starlette(
        debug=False,
        routes=routes,
        middleware=[Middleware(_Headers)],
        exception_handlers={
            HTTPException: _http_error,
            StoreUnavailableError: _store_down,
            StoreError: _store_down,
            BrokerUnavailableError: _broker_down,
            StudyError: _study_error,
            Exception: _internal,
        },
        lifespan=_lifespan,
    )
    app.state.dashboard = dashboard
    return app
