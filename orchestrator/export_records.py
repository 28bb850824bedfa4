"""The per-run files of an export, in design-research-experiments 0.4.0's layout and fields.

Upstream's commands read runs from files, not from a database:

* ``drexp export-analysis`` rebuilds runs.csv, events.csv and evaluations.csv from
  ``artifacts/checkpoints/<run_id>.json`` (one ``RunResult`` each; ``runs.jsonl`` is the
  same records as one ledger);
* ``drexp draft-paper`` counts runs from ``artifacts/runs/<run_id>/run.json`` (run-evidence
  schema 0.1.0) plus its ``observations.jsonl`` and ``attachments/``; upstream keeps one for
  every planned run, so a run not finished yet gets a ``pending`` / ``running`` record.

:class:`RunFiles` writes both for each exported run, from the values the runs.csv row
already holds, so that upstream's rebuild gives the same cells. Evidence records are
redacted as upstream redacts them (credential-like keys and bearer tokens); checkpoints,
like upstream's, are not. The JSON is compact with sorted keys (upstream indents its files;
both read back alike with ``json.load``), as this writes three small files per run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["CHECKPOINTS_DIR", "EVIDENCE_DIR", "RunFiles"]

CHECKPOINTS_DIR = Path("artifacts") / "checkpoints"
EVIDENCE_DIR = Path("artifacts") / "runs"
EVIDENCE_SCHEMA_VERSION = "0.1.0"
_STATUS_REASON = {
    "pending": "awaiting_execution",
    "running": "execution_started",
    "success": "completed",
    "failed": "exception",
    "skipped": "not_executed",
}
_ATTEMPTED = frozenset({"running", "success", "failed"})
_TERMINAL = frozenset({"success", "failed", "skipped"})
_OBSERVED_KEYS = ("problem_family", "agent_kind", "pattern_name", "model_name")
_SENSITIVE_KEYS = frozenset({
    "api_key", "authorization", "bearer_token", "client_secret", "credential", "credentials",
    "password", "private_key", "refresh_token", "secret", "access_token",
})  # fmt: skip
_SENSITIVE_SUFFIXES = (
    "_api_key", "_access_token", "_refresh_token", "_password", "_secret", "_credential",
    "_credentials", "_private_key",
)  # fmt: skip
_SENSITIVE_TEXT = (
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)\b(?:api[_ -]?key|access[_ -]?token|refresh[_ -]?token)\s*[:=]\s*\S+"),
    re.compile(r"\b(?:sk-[A-Za-z0-9_-]{10,}|gh[pousr]_[A-Za-z0-9]{20,})\b"),
)
REDACTED = "[REDACTED]"


_MAYBE_SENSITIVE = re.compile(
    r"api|authorization|bearer|secret|credential|password|private"
    r"|(?:access|refresh)[_ -]?token|sk-|gh[pousr]_|\\u"
)
"""A lowercased JSON text (ASCII-escaped) without any of these has nothing :func:`redact`
would change (every sensitive key, normalized or not, and every text pattern contains one),
so the walk is skipped. Any escaped non-ASCII character walks too: ``str.lower`` maps a few
of them to ASCII letters (the Kelvin sign to ``k``). A bare ``token`` is not one: the
``input_tokens`` / ``output_tokens`` metrics of every LLM run would make every record walk."""
_PLAIN_MARKS = (
    "api", "authorization", "bearer", "secret", "credential", "password", "private", "sk-",
    "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "\\u",
)  # fmt: skip
"""The alternatives of :data:`_MAYBE_SENSITIVE` as plain substrings, all but the tokens."""


def maybe_sensitive(lowered: str) -> bool:
    """``_MAYBE_SENSITIVE.search(lowered) is not None`` at a fifth of its cost on a run's
    record (7 against 34 µs on 1.3 KB): substring tests make no regex step at each position.
    The regex runs only where a ``(access|refresh)[_ -]?token`` could be."""
    for mark in _PLAIN_MARKS:  # a loop, not any(): no generator frame per call
        if mark in lowered:
            return True
    return (
        "token" in lowered
        and ("access" in lowered or "refresh" in lowered)
        and _MAYBE_SENSITIVE.search(lowered) is not None
    )


_MAYBE_SENSITIVE_TEXT = re.compile(
    r"(?i)bearer|api[_ -]?key|access[_ -]?token|refresh[_ -]?token|sk-|gh[pousr]_"
)
"""A string none of :data:`_SENSITIVE_TEXT` can change lacks all of these."""


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
"""One encoder for every file: ``json.dumps`` with options builds a new one per call."""


def _compact(payload: Any) -> str:
    """Upstream's ``stable_json_dumps`` (sorted keys, no spaces, ASCII): the C encoder, so a
    million runs stay fast (the files are read back with ``json.load``, format-agnostic)."""
    return _ENCODER.encode(payload)


@functools.lru_cache(maxsize=4096)  # the keys of a study's records repeat run after run
def _sensitive(key: str) -> bool:
    normalized = key.strip().lower().replace("-", "_").replace(" ", "_")
    return normalized in _SENSITIVE_KEYS or normalized.endswith(_SENSITIVE_SUFFIXES)


def redact(value: Any) -> Any:
    """Upstream's evidence redaction: credential-like keys and token-like text."""
    if isinstance(value, Mapping):
        return {
            str(key): REDACTED if _sensitive(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str) and _MAYBE_SENSITIVE_TEXT.search(value):
        for pattern in _SENSITIVE_TEXT:
            value = pattern.sub(REDACTED, value)
    return value


def _as_is(value: Any) -> Any:
    return value


def _safe_run_id(run_id: str) -> bool:
    """Upstream's check that a run id is a plain file name."""
    return (
        bool(run_id)
        and run_id not in {".", ".."}
        and Path(run_id).name == run_id
        and ("\\" not in run_id)
    )


class RunFiles:
    """Writes the checkpoint and the evidence record of each exported run.

    Opening it removes the previous export's per-run files (checkpoint JSON files, the
    ledger, and evidence ``run.json`` / ``observations.jsonl``, then directories left
    empty), so a run that is no longer terminal does not linger; anything else a user put
    there is kept.

    With ``writers`` (an executor of processes), the files of each batch of runs are
    written there and this process only builds each run's checkpoint payload and keeps the
    ledger, in plan order: encoding and writing three files is most of a run's export cost
    (docs/embedded.md), and it is the part that parallelizes.
    """

    def __init__(self, root: Path, *, writers: Executor | None = None) -> None:
        self.root = root
        self.checkpoints = root / CHECKPOINTS_DIR
        self.evidence = root / EVIDENCE_DIR
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._clear()
        self.evidence.mkdir(parents=True, exist_ok=True)
        self._ledger: IO[str] = (self.checkpoints / "runs.jsonl").open(
            "w", encoding="utf-8", newline="\n"
        )
        self.written = 0
        self._writers = writers
        self._batch: list[dict[str, Any]] = []
        self._pending: deque[Future[str]] = deque()

    def _clear(self) -> None:
        with os.scandir(self.checkpoints) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.endswith(".json"):
                    os.unlink(entry.path)
        if not self.evidence.is_dir():
            return
        with os.scandir(self.evidence) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                run_dir = Path(entry.path)
                for name in ("run.json", "observations.jsonl"):
                    (run_dir / name).unlink(missing_ok=True)
                for empty in (run_dir / "attachments", run_dir):
                    try:
                        empty.rmdir()
                    except OSError:
                        break  # not empty (or absent): leave it

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self._hand_off()
                while self._pending:
                    self._ledger.write(self._pending.popleft().result())
        finally:
            for future in self._pending:
                future.cancel()
            self._ledger.close()

    def write(
        self,
        run: Any,
        row: Mapping[str, Any],
        evaluations: Sequence[Mapping[str, Any]],
        events: Sequence[Mapping[str, Any]],
    ) -> None:
        """The files of one run: ``row`` is its runs.csv row, ``evaluations`` and ``events``
        its evaluations.csv / events.csv rows."""
        if not _safe_run_id(str(run.run_id)):
            return  # upstream could not name its files either
        payload = checkpoint_payload(run, row, evaluations, events)
        self.written += 1
        if self._writers is None:
            self._ledger.write(write_run_files(self.root, payload))
            return
        self._batch.append(payload)
        if len(self._batch) >= _WRITER_BATCH:
            self._hand_off()

    def _hand_off(self) -> None:
        """Send the batch to a writer; write the ledger lines of the batches done, in order,
        keeping at most ``_WRITERS_AHEAD`` batches in flight (bounded memory)."""
        assert self._writers is not None or not self._batch
        if self._batch and self._writers is not None:
            self._pending.append(self._writers.submit(write_batch, self.root, self._batch))
            self._batch = []
        while self._pending and (self._pending[0].done() or len(self._pending) > _WRITERS_AHEAD):
            self._ledger.write(self._pending.popleft().result())

    def write_unfinished(self, run: Any) -> None:
        """The evidence record of a run not finished yet (``pending``, or ``running`` with
        its start time), as upstream keeps one for every planned run; no checkpoint."""
        if not _safe_run_id(str(run.run_id)):
            return
        status = "running" if run.status == "running" else "pending"
        started = run.started_at if status == "running" else None  # ISO text (ExportRun)
        row = {
            "status": status,
            "agent_id": "" if run.agent_id is None else run.agent_key,
            "problem_id": run.problem_key,
            "cost_usd": 0.0,
            "latency_s": 0.0,
            "error_info": None,
            "start_time": started,
            "end_time": None,
            **{key: "unknown" for key in _OBSERVED_KEYS},
        }
        payload = checkpoint_payload(run, row, (), ())
        payload.update(outputs={}, metrics={}, trace_refs=[], provenance_info={})
        payload["observed_execution_metadata"] = {}
        _write_evidence(self.root, payload, clean=False)


_WRITER_BATCH = 64
"""Runs per batch handed to a writer process: one pickled list, one reply."""
_WRITERS_AHEAD = 16
"""Batches in flight at most: 16 x 64 payloads, about 2 MB at 2 KB a no-op run's payload."""


def write_batch(root: Path, payloads: Sequence[Mapping[str, Any]]) -> str:
    """A writer process's task: the files of each payload, and their ledger lines."""
    return "".join([write_run_files(root, payload) for payload in payloads])


def write_run_files(root: Path, payload: Mapping[str, Any]) -> str:
    """The checkpoint and the evidence record of one run's ``payload``
    (:func:`checkpoint_payload`); returns its line of the ledger (``runs.jsonl``)."""
    text = _compact(payload)
    line = text + "\n"
    path = os.path.join(root, CHECKPOINTS_DIR, f"{payload['run_id']}.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(line)
    _write_evidence(root, payload, clean=not maybe_sensitive(text.lower()))
    return line


def _write_evidence(root: Path, checkpoint: Mapping[str, Any], *, clean: bool) -> None:
    """``clean``: the checkpoint's text has nothing to redact (see maybe_sensitive)."""
    scrub: Callable[[Any], Any] = _as_is if clean else redact
    run_dir = os.path.join(root, EVIDENCE_DIR, str(checkpoint["run_id"]))
    for folder in (run_dir, os.path.join(run_dir, "attachments")):
        with contextlib.suppress(FileExistsError):  # Path.mkdir(parents=True): 3 calls
            os.mkdir(folder)
    lines = [_compact(scrub(event)) for event in checkpoint["observations"]]
    observations = "\n".join(lines) + "\n" if lines else ""
    path = os.path.join(run_dir, "observations.jsonl")
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(observations)
    record = evidence_payload(
        checkpoint,
        root,
        hashlib.sha256(observations.encode("utf-8")).hexdigest(),
    )
    with open(os.path.join(run_dir, "run.json"), "w", encoding="utf-8") as handle:
        handle.write(_compact(scrub(record)) + "\n")


def checkpoint_payload(
    run: Any,
    row: Mapping[str, Any],
    evaluations: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Upstream's checkpoint of one ``RunResult`` (``to_jsonable(run_result)``), built so
    that upstream's runs.csv row of it has the cells of studyq's ``row``."""
    status = str(row["status"])
    spec_metadata = {
        "agent_id": row["agent_id"],
        "problem_id": run.problem_id,
        "condition_fingerprint": run.condition_fingerprint,
    }
    payload = {
        "run_id": run.run_id,
        "status": status,
        "status_reason": _STATUS_REASON.get(status, status),
        "outputs": run.outputs or {},
        "metrics": run.metrics or {},
        "evaluator_outputs": [dict(evaluation) for evaluation in evaluations],
        "observations": [dict(event) for event in events],
        "cost": row["cost_usd"],
        "latency": row["latency_s"],
        "trace_refs": [str(ref) for ref in run.trace_refs or []],
        "artifact_refs": [],
        "error_info": row.get("error_info"),
        "provenance_info": run.provenance or {},
        "run_spec": {
            "run_id": run.run_id,
            "study_id": run.study_id,
            "condition_id": run.condition_id,
            "problem_id": row["problem_id"],
            "replicate": run.replicate,
            "seed": run.seed,
            "agent_spec_ref": run.agent_id,
            "problem_spec_ref": run.problem_id,
            "execution_metadata": spec_metadata,
        },
        "started_at": row["start_time"],
        "ended_at": row["end_time"],
        "configured_execution_metadata": spec_metadata,
        "observed_execution_metadata": {key: row[key] for key in _OBSERVED_KEYS},
    }
    return payload


def _local_sha256(root: Path, reference: str) -> str | None:
    """A reference's hash when it is a file inside the study directory (upstream's rule)."""
    candidate = Path(reference) if Path(reference).is_absolute() else root / reference
    try:
        resolved = candidate.resolve()
        resolved.relative_to(root.resolve())
    except (OSError, ValueError):
        return None
    if not resolved.is_file():
        return None
    return hashlib.sha256(resolved.read_bytes()).hexdigest()


def evidence_payload(
    checkpoint: Mapping[str, Any], root: Path, observations_sha256: str
) -> dict[str, Any]:
    """Upstream's run-evidence record (schema 0.1.0) of a checkpoint, before redaction."""
    spec = checkpoint["run_spec"]
    status = str(checkpoint["status"])
    provenance = dict(checkpoint["provenance_info"])
    if isinstance(provenance.get("execution_metadata"), str):
        try:
            decoded = json.loads(provenance["execution_metadata"])
        except json.JSONDecodeError:
            decoded = None
        if isinstance(decoded, Mapping):
            provenance["execution_metadata"] = dict(decoded)
    return {
        "schema_version": EVIDENCE_SCHEMA_VERSION,
        "record_type": "run-evidence",
        "study_id": spec["study_id"],
        "condition_id": spec["condition_id"],
        "run_id": checkpoint["run_id"],
        "status": status,
        "status_reason": checkpoint["status_reason"],
        "attempted": status in _ATTEMPTED,
        "terminal": status in _TERMINAL,
        "configured": {
            "problem_id": spec["problem_id"],
            "problem_spec_ref": spec["problem_spec_ref"],
            "agent_spec_ref": spec["agent_spec_ref"],
            "replicate": spec["replicate"],
            "seed": spec["seed"],
            "execution_metadata": checkpoint["configured_execution_metadata"],
        },
        "observed": {
            "execution_metadata": checkpoint["observed_execution_metadata"],
            "outputs": checkpoint["outputs"],
            "metrics": checkpoint["metrics"],
            "evaluations": checkpoint["evaluator_outputs"],
            "provenance": provenance,
            "trace_refs": checkpoint["trace_refs"],
            "artifact_refs": checkpoint["artifact_refs"],
            "observation_count": len(checkpoint["observations"]),
        },
        "timing": {
            "started_at": checkpoint["started_at"],
            "ended_at": checkpoint["ended_at"],
            "latency_s": checkpoint["latency"],
        },
        "error": checkpoint["error_info"],
        "files": {"observations": "observations.jsonl", "attachments": "attachments"},
        "integrity": {
            "observations_sha256": observations_sha256,
            "referenced_artifacts": [
                {"kind": kind, "reference": str(ref), "sha256": _local_sha256(root, str(ref))}
                for kind, refs in (("trace", checkpoint["trace_refs"]), ("artifact", []))
                for ref in refs
            ],
        },
    }
