"""The Celery app of studyq workers, built from the settings.

``create_app(settings)`` is what ``studyq worker`` calls (the coordinator has an app of its
own, :mod:`orchestrator.executors.celery.app`, configured from the same
:func:`~orchestrator.contracts.broker.celery_broker_conf`); the module attribute ``app``
is built from the environment on first use, so ``celery -A workers.app worker`` works too.

Configuration, and why:

* JSON only (``task_serializer``, ``accept_content``, ``result_serializer``): a pickled
  message is refused before it is deserialized, so a broker message can never run code.
* ``task_acks_late`` + ``task_reject_on_worker_lost`` + ``worker_prefetch_multiplier=1``: a
  message is acknowledged after its run is recorded, a message whose process died is
  requeued, and a worker holds no more messages than it has processes. Duplicates this
  produces are refused by the claim (see :mod:`workers.runtask`).
* ``visibility_timeout`` (``STUDYQ_VISIBILITY_TIMEOUT_S``, 2 h): Redis redelivers a message
  nobody acknowledged after this long; it must exceed the longest run's hard limit. On
  RabbitMQ, queues are quorum queues and a message of a closed connection comes back at once;
  the broker's ``consumer_timeout`` (30 min by default) must exceed the longest run instead.
* Task events on: Flower sees every run by its readable name from ``task-received`` on. The
  worker sends them in batches (:mod:`workers.consumer`), at most 0.1 s late. ``task-sent``
  (a queued run in Flower before any worker took it) is off unless
  ``STUDYQ_TASK_SENT_EVENTS`` is set: it costs submit one more message per run.
* ``task_ignore_result``: results live in the store, not in a result backend.
* ``worker_cancel_long_running_tasks_on_connection_loss=False``: a Redis blip must not kill
  running agents; their results go to the database, and a redelivered duplicate is refused.

Per process (see :meth:`StudyqCelery.runtime`): the database engine is created in each
worker process after the fork (``worker_process_init``) and never shared across a fork.

Warm shutdown (SIGTERM to the worker's main process, as Docker, Kubernetes and
``systemctl stop`` send it): Celery stops taking messages and lets running runs finish. After
``STUDYQ_SHUTDOWN_GRACE_S`` the runs still executing are handed back: their lease is released
without charging an attempt and their message is requeued (prefork: the main process sends
the busy child SIGTERM; the run, interrupted by ``SystemExit``, releases its lease and the
child exits, so Celery requeues the message as a lost worker's; solo/threads: the run's
supervisor releases the lease and the task rejects its message with requeue; Celery logs the
prefork child's exit as a ``WorkerLostError``, which is expected). A run past its soft time
limit is recorded as a timeout instead. A SIGTERM sent straight to a pool child
(a signal to the whole process group, e.g. Slurm's default) hands its run back at once, with
no grace: deliver the signal to the main process only (``exec`` the worker, or
``sbatch --signal=B:TERM@<seconds>``). SIGKILL loses the runs in flight until their leases
expire; the coordinator then re-queues them (charging the attempt).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from celery import Celery, signals
from celery.worker import state as worker_state

from orchestrator.contracts.broker import celery_broker_conf
from orchestrator.contracts.errors import StoreError, StoreUnavailableError, StudyError
from orchestrator.contracts.extensions import ExecutionPolicy
from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import TASK_NAME
from orchestrator.store import ResultStore, mask_url
from workers.config import WorkerSettings, load_worker_settings
from workers.redis_clients import patch_redis_channel
from workers.runtime import WorkerRuntime, worker_name
from workers.tasks import register_run_task

__all__ = ["DEFAULT_QUEUE", "EXIT_STORE_UNUSABLE", "StudyqCelery", "create_app"]

log = logging.getLogger("studyq.worker")

EXIT_STORE_UNUSABLE = 2
"""Exit code of a worker whose result store has another schema version (``studyq db
upgrade``), the same as the CLI's usage error."""

DEFAULT_QUEUE = ExecutionPolicy().queue
"""The queue a study publishes to unless its ``execution.queue`` says otherwise."""


class StudyqCelery(Celery):  # type: ignore[misc]  # Celery ships no type hints
    """A Celery app that carries studyq's settings and this process's worker runtime."""

    def __init__(self, settings: WorkerSettings, **kwargs: Any) -> None:
        super().__init__("studyq", **kwargs)
        self.settings = settings
        self._runtime: WorkerRuntime | None = None
        self._runtime_lock = threading.Lock()
        self._shutdown_timer: threading.Timer | None = None

    def runtime(self, nodename: str | None = None) -> WorkerRuntime:
        """This process's runtime, created on first use in this process.

        A runtime inherited through a fork (prefork children are forked after the main
        process may have created one to record a hard time limit) is abandoned without
        closing the parent's connections, and a new one is built here.
        """
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self._runtime_lock:
            runtime = self._runtime
            if runtime is not None and runtime.pid == os.getpid():
                return runtime
            if runtime is not None:
                runtime.abandon_after_fork()
            name = worker_name(nodename or f"celery@{os.uname().nodename}")
            self._runtime = WorkerRuntime(self.settings, worker=name, write_behind=True)
            return self._runtime

    def runtime_if_created(self) -> WorkerRuntime | None:
        """This process's runtime if it has one (solo/threads pools execute runs here)."""
        runtime = self._runtime
        return runtime if runtime is not None and runtime.pid == os.getpid() else None


def create_app(settings: Settings | None = None) -> StudyqCelery:
    """A studyq Celery app for ``settings`` (default: from the environment).

    Raises:
        StudyError: ``STUDYQ_BROKER_URL`` is not set.
    """
    worker_settings = (
        load_worker_settings() if settings is None else WorkerSettings.from_settings(settings)
    )
    if not worker_settings.broker_url:
        raise StudyError(
            "STUDYQ_BROKER_URL is not set: distributed sweeps need a Celery broker. Fix: export "
            "STUDYQ_BROKER_URL=redis://HOST:6379/0 (or run the study embedded with `studyq run`)."
        )
    patch_redis_channel()
    app = StudyqCelery(worker_settings)
    app.conf.update(
        celery_broker_conf(
            worker_settings.broker_url, visibility_timeout_s=worker_settings.visibility_timeout_s
        ),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend="workers.nobackend:NoResultBackend",  # quiet revokes: see there
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_consumer="workers.consumer:StudyqConsumer",
        task_default_queue=DEFAULT_QUEUE,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
        timezone="UTC",
    )
    register_run_task(app)
    _connect_worker_signals(app)
    return app


def _connect_worker_signals(app: StudyqCelery) -> None:
    """Hook ``app`` into the life of a worker process (no effect in a publishing process)."""
    uid = f"studyq-{id(app)}"

    def on_worker_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
        # Main process, before the pool starts: fail fast on a wrong schema, warn on an
        # unreachable database (the runs will wait for it), and leave no connection behind
        # for the children to inherit.
        if getattr(instance, "app", None) is not app:
            return
        url = app.settings.database_url
        try:
            ResultStore.open(url).close()
        except StoreUnavailableError as error:
            log.warning("result store %s is unavailable at start: %s", mask_url(url), error)
        except StoreError as error:
            # Celery logs and swallows a receiver's Exception; a worker on a store it cannot
            # use (schema of another version) must not start taking runs.
            log.critical("cannot start a worker on %s: %s", mask_url(url), error)
            raise SystemExit(EXIT_STORE_UNUSABLE) from error

    def on_process_init(sender: Any = None, **_: Any) -> None:
        # Each pool process (prefork child, or the solo pool's only process), after the fork.
        app.runtime(str(sender) if sender else None)

    def on_shutting_down(sig: Any = None, how: Any = None, **_: Any) -> None:
        # Runs in the main process's signal handler: only start a timer here.
        if app._shutdown_timer is not None:
            return
        grace = app.settings.shutdown_grace_s
        log.warning(
            "%s shutdown (%s): runs executing now have %.0f s to finish, then are handed back",
            how,
            sig,
            grace,
        )
        timer = threading.Timer(grace, _hand_back_running_runs, args=(app,))
        timer.name = "studyq-shutdown-grace"
        timer.daemon = True
        app._shutdown_timer = timer
        timer.start()

    def on_process_shutdown(**_: Any) -> None:
        # A prefork child about to exit (also at a warm shutdown's end), or the worker's
        # main process once its pool stopped (solo, threads): write the pending results.
        runtime = app.runtime_if_created()
        if runtime is not None:
            runtime.drain()

    signals.celeryd_init.connect(on_worker_init, weak=False, dispatch_uid=f"{uid}-init")
    signals.worker_process_shutdown.connect(
        on_process_shutdown, weak=False, dispatch_uid=f"{uid}-proc-down"
    )
    signals.worker_shutdown.connect(on_process_shutdown, weak=False, dispatch_uid=f"{uid}-down-end")
    signals.worker_process_init.connect(on_process_init, weak=False, dispatch_uid=f"{uid}-proc")
    signals.worker_shutting_down.connect(on_shutting_down, weak=False, dispatch_uid=f"{uid}-down")


def _hand_back_running_runs(app: StudyqCelery) -> None:
    """The shutdown grace is over: hand back every run still executing."""
    runtime = app.runtime_if_created()
    in_process = runtime.hand_back_all() if runtime is not None else 0
    children = 0
    for request in list(worker_state.active_requests):
        pid = getattr(request, "worker_pid", None)
        if request.name != TASK_NAME or not pid or pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGTERM)
            children += 1
        except ProcessLookupError:
            continue
    if in_process or children:
        log.warning(
            "shutdown grace over: handing back %d run(s) still executing",
            in_process + children,
        )


def __getattr__(name: str) -> Any:
    """``app`` (and ``celery``, Celery's other conventional name), built from the
    environment the first time ``celery -A workers.app`` asks for it."""
    if name not in ("app", "celery"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global _default_app
    if _default_app is None:
        _default_app = create_app()
    return _default_app


_default_app: StudyqCelery | None = None
