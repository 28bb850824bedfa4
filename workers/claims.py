"""Claims of concurrent deliveries made together: one statement for all of them.

Under the ``threads`` pool up to ``--concurrency`` deliveries claim their runs at the same
moment. One statement per claim would put them all on the connection pool and the
database at once, each paying a round trip and Python's per-statement cost under one GIL.
:class:`ClaimBatcher` is a group commit: the first delivery to arrive claims its run and,
in the same statement, the runs of every delivery that arrived while the previous statement
was running. No thread waits for a timer, and a lone caller (a prefork child, which runs one
delivery at a time) makes exactly the statement it would have made alone.

Each claim is still the store's guarded transition (``ResultStore.claim_runs``), verified
against the message (the stored spec's digest and the attempt; see
``orchestrator.store.attempts.Verify``): a run is claimed at most once, only for a delivery
that carries its registered spec, and a delivery whose run another delivery of the same
batch already claimed (a duplicate message) gets nothing. Deliveries naming the same run go
in separate statements, first come first, so a forged copy cannot take the claim of the
genuine message beside it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from orchestrator.store import Claim, ResultStore

__all__ = ["ClaimBatcher"]


@dataclass(eq=False, slots=True)
class _Request:
    study_id: str
    index: int
    digest: str
    attempt: int
    durable: bool
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to make the next statement, not with an answer
    claim: Claim | None = None
    error: BaseException | None = None


class ClaimBatcher:
    """Claims runs for one worker process, batching concurrent callers.

    Args:
        store: This process's store.
        worker: The lease owner written with each claim.
        lease_s: The lease each claim gets.
    """

    def __init__(self, store: ResultStore, *, worker: str, lease_s: float) -> None:
        self._store = store
        self._worker = worker
        self._lease_s = lease_s
        self._lock = threading.Lock()
        self._waiting: list[_Request] = []
        self._busy = False

    def claim(
        self, study_id: str, index: int, digest: str, attempt: int, *, durable: bool = False
    ) -> Claim | None:
        """Claim the run at ``index`` for a message with spec digest ``digest`` published for
        ``attempt`` (see ``ResultStore.claim_runs``); None if it is not claimable or the
        message disagrees with the store. ``durable``: the claim is committed synchronously.

        Raises:
            StoreUnavailableError, StoreError: as ``ResultStore.claim_runs``, for every
                request of the statement that failed.
        """
        request = _Request(study_id, index, digest, attempt, durable)
        with self._lock:
            self._waiting.append(request)
            lead = not self._busy
            self._busy = True
        if not lead:
            request.done.wait()
            if not request.lead:
                return _answer(request)
        self._lead()
        return _answer(request)

    def _lead(self) -> None:
        """Claim everything waiting (this caller's request included), then pass the lead to
        the first request that arrived meanwhile."""
        with self._lock:
            batch, self._waiting = self._waiting, []
        try:
            self._claim_batch(batch)
        except BaseException as error:  # every waiter must wake, whatever happened
            for request in batch:
                request.error = error
        for request in batch:
            request.done.set()
        with self._lock:
            if self._waiting:
                successor = self._waiting[0]
                successor.lead = True
                successor.done.set()
            else:
                self._busy = False

    def _claim_batch(self, batch: list[_Request]) -> None:
        # Per study and commit mode, rounds of requests with one request per run in each.
        groups: dict[tuple[str, bool], list[dict[int, _Request]]] = {}
        for request in batch:
            rounds = groups.setdefault((request.study_id, request.durable), [])
            for requests in rounds:
                if request.index not in requests:
                    requests[request.index] = request
                    break
            else:
                rounds.append({request.index: request})
        for (study_id, durable), rounds in groups.items():
            for requests in rounds:
                verify = {index: (r.digest, r.attempt) for index, r in requests.items()}
                for claim in self._store.claim_runs(
                    study_id,
                    list(requests),
                    worker=self._worker,
                    lease_s=self._lease_s,
                    verify=verify,
                    durable=durable,
                ):
                    requests[claim.index].claim = claim


def _answer(request: _Request) -> Claim | None:
    if request.error is not None:
        raise request.error
    return request.claim
