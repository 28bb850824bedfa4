"""Canonical artifacts from the store: the files design-research-experiments 0.4.0 writes.

study.yaml, manifest.json, conditions.csv, runs.csv, events.csv, evaluations.csv,
hypotheses.json and analysis_plan.json (UPSTREAM.md section 7), with the upstream's formats:
JSON with ``indent=2, sort_keys=True``, CSV through ``csv.DictWriter`` (excel dialect,
required columns first, then any other keys in first-seen order).

Rows are streamed from the database in plan order, never held all at once: a column union
that depends on every row (events, evaluations) is computed in a first pass over the
``extra`` column only. Only terminal runs are rows of runs.csv; a sweep still in progress
exports what has finished and says so in manifest.json (``partial``, ``runs_planned``,
``runs_pending``).

runs.csv adds columns after the upstream's (extra columns only, as upstream allows): each
factor under its name and each block as ``block_<name>`` (so no join through
conditions.csv is needed), then each of the run's metrics as ``metric_<name>`` (nested
mappings flattened as ``metric_<name>.<key>``, lists as canonical JSON), except those that
already are a column (``latency_s``, ``cost_usd``, ``input_tokens``, ``output_tokens``,
``primary_outcome``). A factor named like a runs.csv column (``agent_id``, ``seed``,
``status``, ...) gets ``factor_`` in front.
These columns depend on every run, so the rows go through a spool file next to runs.csv
(one pass over the runs) before runs.csv is written with the full header.

With ``run_files`` (the default) the export also writes each run's upstream checkpoint
and run-evidence record (:mod:`orchestrator.export_records`), what ``drexp
export-analysis`` and ``drexp draft-paper`` read.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy.pool import StaticPool

from orchestrator.contracts.canonical import canonical_json
from orchestrator.contracts.conditions import condition_label
from orchestrator.contracts.errors import StoreError, StudyqError
from orchestrator.contracts.results import RunStatus
from orchestrator.executors.embedded import file_writers
from orchestrator.executors.forked import ForkedCall, can_fork
from orchestrator.export_records import RunFiles
from orchestrator.export_tables import ATTEMPT_COLUMNS, JSON_CELLS, SpooledCsv, write_side_tables
from orchestrator.store.columns import EVALUATION_COLUMNS as STORED_EVALUATIONS
from orchestrator.store.columns import EVENT_COLUMNS as STORED_EVENTS
from orchestrator.store.columns import RESULT_COLUMNS
from orchestrator.store.export_reads import ExportRun, has_repeated_run_ids, iter_run_records

if TYPE_CHECKING:
    from orchestrator.store import ResultStore
    from orchestrator.store.records import EvaluationRecord, EventRecord

__all__ = [
    "ATTEMPT_COLUMNS",
    "CONDITION_COLUMNS",
    "EVALUATION_COLUMNS",
    "EVENT_COLUMNS",
    "RUN_COLUMNS",
    "ExportReport",
    "export_artifacts",
    "validate_artifacts",
]

SCHEMA_VERSION = "0.2.0"
EVENT_COLUMNS = STORED_EVENTS.csv_columns
RUN_COLUMNS = (
    "study_id", "condition_id", "run_id", "problem_id", "problem_family", "agent_id",
    "agent_kind", "pattern_name", "model_name", "seed", "replicate", "status", "start_time",
    "end_time", "latency_s", "input_tokens", "output_tokens", "cost_usd", "primary_outcome",
    "trace_path", "manifest_path",
)  # fmt: skip
CONDITION_COLUMNS = (
    "study_id",
    "condition_id",
    "admissible",
    "constraint_messages",
    "assignment_meta_json",
)
EVALUATION_COLUMNS = STORED_EVALUATIONS.csv_columns
_RESULT_CELLS = tuple((spec.export, spec.cell) for spec in RESULT_COLUMNS if spec.export)
"""runs.csv cells of the declared result columns (``orchestrator.store.columns``)."""
RUN_CSV_COLUMNS = (*RUN_COLUMNS, *(name for name, _ in _RESULT_CELLS if name not in RUN_COLUMNS))
"""runs.csv: the upstream's required columns, then the declared result columns it lacks."""
_FIXED_RUN_COLUMNS = frozenset(RUN_CSV_COLUMNS)
_STUDY_KEYS = ("schema_version", "study_id", "title", "description")
_MANIFEST_KEYS = (
    "schema_version",
    "study_id",
    "generated_at",
    "status_counts",
    "model_ids",
    "run_count",
    "provenance",
)
_CSV_FILES = {
    "conditions.csv": CONDITION_COLUMNS,
    "runs.csv": RUN_COLUMNS,
    "events.csv": EVENT_COLUMNS,
    "evaluations.csv": EVALUATION_COLUMNS,
}
# The store's lifecycle words, in the upstream's vocabulary for runs.csv / status_counts.
_UPSTREAM_STATUS = {
    RunStatus.SUCCESS.value: "success",
    RunStatus.FAILED.value: "failed",
    RunStatus.CANCELLED.value: "skipped",
}
_TERMINAL = tuple(_UPSTREAM_STATUS)


class ArtifactError(StudyqError):
    """A written artifact set breaks the contract (the message says which file and why)."""


@dataclass(slots=True)
class ExportReport:
    """What an export wrote; ``partial`` when runs were still pending."""

    out_dir: Path
    runs: int
    runs_planned: int
    events: int
    evaluations: int
    partial: bool
    files: dict[str, Path]
    run_files: int = 0
    """Runs given an upstream checkpoint and evidence record (0 with ``run_files=False``)."""


def utc_now_iso() -> str:
    """UTC ISO-8601 without microseconds, ``+00:00`` offset (the upstream's format)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def default_provenance() -> dict[str, Any]:
    """The upstream's captured provenance, used when a study declares none."""
    versions = {}
    for name in (
        "design-research-experiments",
        "design-research-agents",
        "design-research-problems",
        "design-research-analysis",
        "studyq",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not-installed"
    return {
        "captured_at": utc_now_iso(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python_version": sys.version.split()[0],
        "package_versions": versions,
        "git_sha": _git_sha(),
        "extra": {},
    }


def _write_json(path: Path, payload: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, ensure_ascii=True)
        handle.write("\n")


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    count = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key) for key in columns})
            count += 1
    return count


def _union(required: Sequence[str], extra_keys: Iterable[Iterable[str]]) -> list[str]:
    ordered = list(required)
    seen = set(ordered)
    for keys in extra_keys:
        for key in keys:
            if key not in seen:
                seen.add(key)
                ordered.append(key)
    return ordered


def export_artifacts(
    store: ResultStore,
    study_id: str,
    out_dir: str | Path | None = None,
    *,
    run_files: bool = True,
    jobs: int | None = None,
) -> ExportReport:
    """Write the canonical artifact set of ``study_id`` from ``store`` and validate it.

    ``out_dir`` defaults to the study's ``output_dir`` (``artifacts/<study_id>``).
    ``run_files`` also writes upstream's per-run checkpoint and evidence files under
    ``artifacts/`` (three small files per run; turn it off for a CSV-only export).
    ``jobs`` is how many processes write, one per core at most; every byte is the same
    whatever it is. None (the default): evaluations.csv, events.csv and attempts.csv are
    written by a forked process while this one writes runs.csv, where a fork is safe
    (:func:`_beside`); 1: this process only; above 1: that forked process too, and the
    per-run files by up to that many writer processes.
    """
    if jobs is not None and jobs < 1:
        raise StudyqError(f"jobs must be 1 or more, got {jobs}.")
    study = store.find_study(study_id)
    if study is None:
        raise StoreError(
            f"study '{study_id}' is not in the store; `studyq status` lists the studies there."
        )
    definition: dict[str, Any] = dict(study.definition)
    target = Path(out_dir) if out_dir is not None else Path(str(definition["output_dir"]))
    (target / "artifacts" / "checkpoints").mkdir(parents=True, exist_ok=True)
    files = {name: target / name for name in (
        "study.yaml", "manifest.json", "conditions.csv", "runs.csv", "events.csv",
        "evaluations.csv", "hypotheses.json", "analysis_plan.json", "attempts.csv",
    )}  # fmt: skip
    manifest_path = files["manifest.json"]

    with files["study.yaml"].open("w", encoding="utf-8") as handle:
        yaml.safe_dump(
            {
                key: value
                for key, value in definition.items()
                if key not in ("bindings", "execution")
            }
            | {key: definition[key] for key in ("bindings", "execution") if key in definition},
            handle,
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=False,
        )

    condition_rows = list(_condition_rows(study_id, store.iter_conditions(study_id)))
    _write_csv(files["conditions.csv"], _union(CONDITION_COLUMNS, condition_rows), condition_rows)

    status_counts: dict[str, int] = {}
    model_ids: set[str] = set()
    side_tables = partial(
        write_side_tables,
        store.engine,
        study_id,
        files["evaluations.csv"],
        files["events.csv"],
        files["attempts.csv"],
    )
    beside = _beside(store, side_tables, jobs)
    try:
        runs, with_files = _write_runs(
            store,
            study_id,
            target,
            manifest_path,
            status_counts,
            model_ids,
            run_files=run_files,
            writers=_writers(store, study_id, jobs) if run_files else 1,
        )
    except BaseException:
        if beside is not None:
            beside.cancel()
        raise
    evaluations, events = side_tables() if beside is None else beside.result()
    _write_json(files["hypotheses.json"], definition.get("hypotheses", []))
    _write_json(files["analysis_plan.json"], definition.get("analysis_plans", []))

    planned = int(study.run_count)
    provenance = definition.get("provenance_metadata") or default_provenance()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "study_id": study_id,
        "generated_at": utc_now_iso(),
        "status_counts": status_counts,
        "model_ids": sorted(model_ids),
        "run_count": runs,
        "provenance": provenance,
        "partial": runs < planned,
        "runs_planned": planned,
        "runs_pending": planned - runs,
        "attempts_file": "attempts.csv",  # studyq's own (upstream readers ignore the key)
        "condition_completion": _completion(store, study_id),
    }
    _write_json(manifest_path, manifest)
    validate_artifacts(target)
    return ExportReport(
        target, runs, planned, events, evaluations, runs < planned, files, with_files
    )


def _beside(
    store: ResultStore, side_tables: Callable[[], tuple[int, int]], jobs: int | None
) -> ForkedCall[tuple[int, int]] | None:
    """Unless ``jobs`` is 1, on more than one core, evaluations.csv, events.csv and
    attempts.csv are written by a forked child while this process writes runs.csv: about
    two fifths of an export's work, and a fork costs about 10 ms
    (orchestrator.executors.forked says when a fork is safe). The child reads through
    connections of its own (:func:`_own_connections`). An in-memory SQLite store cannot be
    read from another process."""
    if jobs == 1 or (os.cpu_count() or 1) < 2 or isinstance(store.engine.pool, StaticPool):
        return None
    if not can_fork():
        return None
    return ForkedCall(partial(_own_connections, store, side_tables), name="studyq export tables")


_INHERITED: list[Any] = []
"""In a forked child: the pools it inherited, kept so that they are never collected."""


def _own_connections(store: ResultStore, call: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """``call()`` in a forked child, on a pool of its own. The inherited pool's connections
    are the parent's sockets: used here they would mix two processes' statements on one
    session, and closed or collected here (libpq says goodbye to the server) they would end
    the parent's. So the old pool stays referenced until the child exits (``os._exit``: no
    collection), and the engine gets a new one (SQLAlchemy's ``dispose(close=False)``). The
    parent keeps its pool and whatever it has checked out (the store's autocommit lane): an
    earlier version emptied the parent's pool instead, which left the lane's connections
    to be collected unclosed later."""
    _INHERITED.append(store.engine.pool)
    store.engine.dispose(close=False)
    return call()


def _writers(store: ResultStore, study_id: str, jobs: int | None) -> int:
    """Processes for the per-run files: ``jobs``, one per core at most (None: one, this
    process: starting writers takes 0.3 s), and one when two runs share a run id and so the
    paths of their files: the later run's files are the ones kept, as when one process
    writes them in plan order."""
    writers = min(jobs or 1, os.cpu_count() or 1)
    if writers > 1 and has_repeated_run_ids(store.engine, study_id):
        return 1
    return writers


def _completion(store: ResultStore, study_id: str) -> dict[str, dict[str, Any]]:
    """How complete each condition is (a study stopped by a budget, the breaker or a cancel
    is partial): its label, runs per status, and the share that finished (success or
    failed)."""
    grouped = store.count_by(study_id, "condition")
    out: dict[str, dict[str, Any]] = {}
    for condition in store.iter_conditions(study_id):
        counts = {s: n for s, n in grouped.get(condition.condition_id, {}).items() if n}
        total = sum(counts.values())
        done = counts.get("success", 0) + counts.get("failed", 0)
        out[condition.condition_id] = {
            "label": condition_label(condition),
            "runs": total,
            "status_counts": counts,
            "finished": round(done / total, 4) if total else 0.0,
        }
    return out


def _condition_rows(study_id: str, rows: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for row in rows:
        out: dict[str, Any] = {
            "study_id": study_id,
            "condition_id": row.condition_id,
            "admissible": bool(row.admissible),
            "constraint_messages": canonical_json(row.constraint_messages),
            "assignment_meta_json": canonical_json(row.metadata),
        }
        out.update(row.factor_assignments)
        out.update({f"block_{key}": value for key, value in row.block_assignments.items()})
        yield out


_PREFIX = {"factor": "factor_", "block": "block_", "metric": "metric_"}
"""What a runs.csv column of each kind starts with when its name is taken."""


class _ExtraColumns:
    """runs.csv's columns after the fixed ones, named once each, in first-seen order."""

    def __init__(self, fixed: Sequence[str]) -> None:
        self.order: list[str] = []
        self._taken = set(fixed)
        self._names: dict[tuple[str, str], str] = {}
        self._first = len(fixed)
        self._positions: dict[tuple[str, str], int] = {}

    def position(self, kind: str, key: str) -> int:
        """The row position of :meth:`name`'s column (after the fixed columns)."""
        known = self._positions.get((kind, key))
        if known is None:
            self.name(kind, key)
            known = self._positions[(kind, key)] = self._first + len(self.order) - 1
        return known

    def name(self, kind: str, key: str) -> str:
        """The column of a factor, block or metric ``key``: a factor keeps its name, a
        block or metric gets its prefix; a name already taken gets the prefix (again)."""
        known = self._names.get((kind, key))
        if known is None:
            prefix = _PREFIX[kind]
            known = key if kind == "factor" else prefix + key
            while known in self._taken:
                known = prefix + known
            self._taken.add(known)
            self.order.append(known)
            self._names[(kind, key)] = known
        return known


def _flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(name, scalar)`` of each metric: mappings flattened with ``.``, lists as JSON."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if type(value) in _SCALARS:  # most metrics; skips the slow Mapping checks
            yield name, value
        elif isinstance(value, Mapping) and value:
            yield from _flat_metrics(value, f"{name}.")
        elif isinstance(value, Mapping | list | tuple):
            yield name, canonical_json(value)
        else:
            yield name, value


_SCALARS = frozenset((str, int, float, bool, type(None)))


class _ByRun:
    """The CSV rows of a child table (plan order) taken run by run, in the same order."""

    def __init__(self, records: Iterable[EvaluationRecord | EventRecord]) -> None:
        self._records = iter(records)
        self._next = next(self._records, None)

    def take(self, index: int) -> list[dict[str, Any]]:
        """The rows of the run at plan ``index``; rows of runs before it are skipped."""
        rows: list[dict[str, Any]] = []
        while self._next is not None and self._next.index <= index:
            if self._next.index == index:
                rows.append(_table_row(self._next.row))
            self._next = next(self._records, None)
        return rows


def _write_runs(
    store: ResultStore,
    study_id: str,
    target: Path,
    manifest_path: Path,
    status_counts: dict[str, int],
    model_ids: set[str],
    *,
    run_files: bool,
    writers: int = 1,
) -> tuple[int, int]:
    """runs.csv (through a spool file) and, with ``run_files``, each run's checkpoint and
    evidence record (written by ``writers`` processes when above 1); returns the rows
    written and the runs given files."""
    extra = _ExtraColumns(RUN_CSV_COLUMNS)
    assignments = _AssignmentCells(extra)
    metric_cells = _MetricCells(extra)
    with (
        file_writers(writers) if writers > 1 else nullcontext() as pool,
        SpooledCsv(target / "runs.csv") as out,
        RunFiles(target, writers=pool) if run_files else nullcontext() as records,
    ):
        # with run files: every run (the unfinished get evidence only), and each run's
        # evaluations and events merged in from their plan-ordered streams
        statuses = None if run_files else _TERMINAL
        every = iter_run_records(
            store.engine,
            study_id,
            statuses=statuses,
            without=() if run_files else ("outputs",),  # only a checkpoint holds them
        )
        runs = _terminal(every, records)
        evaluations = _ByRun(store.iter_evaluations(study_id) if run_files else ())
        events = _ByRun(store.iter_events(study_id) if run_files else ())
        for run, cells in _run_rows(study_id, runs, manifest_path, status_counts, model_ids):
            if records is not None:
                row = dict(zip(RUN_CSV_COLUMNS, cells, strict=True))
                records.write(
                    run, row, evaluations.take(run.plan_index), events.take(run.plan_index)
                )
            placed = assignments(run)
            metrics = metric_cells(run)
            cells.extend([None] * len(extra.order))
            for at, value in placed:
                cells[at] = value
            for at, value in metrics:
                cells[at] = value
            out.write(cells)
        written = records.written if records is not None else 0
        count = out.finish([*RUN_CSV_COLUMNS, *extra.order])
    return count, written


def _terminal(runs: Iterable[ExportRun], records: RunFiles | None) -> Iterator[ExportRun]:
    """The terminal runs; the others get their evidence record only (with ``records``)."""
    for run in runs:
        if run.status in _TERMINAL:
            yield run
        elif records is not None:
            records.write_unfinished(run)


def _assignment_cells(run: ExportRun, extra: _ExtraColumns) -> list[tuple[int, Any]]:
    """The factor and block cells of one run, by row position."""
    cells = [
        (extra.position("factor", str(key)), value)
        for key, value in (run.factor_assignments or {}).items()
    ]
    cells.extend(
        (extra.position("block", str(key)), value)
        for key, value in (run.block_assignments or {}).items()
    )
    return cells


class _AssignmentCells:
    """:func:`_assignment_cells`, computed once per distinct pair of assignment mappings
    (the reader shares one decoded mapping between the runs of a condition)."""

    def __init__(self, extra: _ExtraColumns) -> None:
        self._extra = extra
        self._known: dict[tuple[int, int], tuple[Any, Any, list[tuple[int, Any]]]] = {}

    def __call__(self, run: ExportRun) -> list[tuple[int, Any]]:
        factors, blocks = run.factor_assignments, run.block_assignments
        key = (id(factors), id(blocks))
        known = self._known.get(key)
        if known is not None and known[0] is factors and known[1] is blocks:
            return known[2]
        if len(self._known) >= 4096:
            self._known.clear()
        cells = _assignment_cells(run, self._extra)
        self._known[key] = (factors, blocks, cells)  # holds them: their ids stay theirs
        return cells


def _metric_cells(run: ExportRun, extra: _ExtraColumns) -> Iterator[tuple[int, Any]]:
    """The metric cells of one run, by row position."""
    for key, value in _flat_metrics(run.metrics or {}):
        if key not in _FIXED_RUN_COLUMNS:  # latency_s, cost_usd, ...: already a column
            yield extra.position("metric", key), value


class _MetricCells:
    """:func:`_metric_cells`, with the row positions of a run's metrics looked up once per
    tuple of metric names when every value is a scalar: the runs of a study mostly report
    the same metrics, and flattening them name by name was 8 % of runs.csv's process.
    Metrics holding mappings or lists go through :func:`_metric_cells`."""

    def __init__(self, extra: _ExtraColumns) -> None:
        self._extra = extra
        self._known: dict[tuple[str, ...], list[int | None]] = {}

    def __call__(self, run: ExportRun) -> list[tuple[int, Any]]:
        metrics = run.metrics
        if not metrics:
            return []
        values = list(metrics.values())
        if not _SCALARS.issuperset(map(type, values)):
            return list(_metric_cells(run, self._extra))
        names = tuple(metrics)
        positions = self._known.get(names)
        if positions is None:
            if len(self._known) >= 4096:
                self._known.clear()
            positions = self._known[names] = [
                None if name in _FIXED_RUN_COLUMNS else self._extra.position("metric", name)
                for name in names
            ]
        return [(at, value) for at, value in zip(positions, values, strict=True) if at is not None]


def _run_rows(
    study_id: str,
    runs: Iterable[ExportRun],
    manifest_path: Path,
    status_counts: dict[str, int],
    model_ids: set[str],
) -> Iterator[tuple[ExportRun, list[Any]]]:
    """Each run with the cells of its runs.csv row (:data:`RUN_CSV_COLUMNS`, in order)."""
    manifest = str(manifest_path)
    for run in runs:
        status = _UPSTREAM_STATUS.get(run.status, run.status)
        status_counts[status] = status_counts.get(status, 0) + 1
        provenance = run.provenance or {}
        model_name = provenance.get("model_name")
        if model_name:
            model_ids.add(str(model_name))
        cells: list[Any] = [
            study_id,
            run.condition_id,
            run.run_id,
            run.problem_key,
            provenance.get("problem_family") or "unknown",
            "" if run.agent_id is None else run.agent_key,
            provenance.get("agent_kind") or "unknown",
            provenance.get("pattern_name") or "unknown",
            model_name or "unknown",
            run.seed,
            run.replicate,
            status,
            run.started_at,
            run.ended_at,
            *_BLANK_RESULT,
            manifest,
            *_BLANK_TAIL,
        ]
        for at, cell in _RESULT_AT:
            cells[at] = cell(run)
        yield run, cells


_FIXED_AT = {name: at for at, name in enumerate(RUN_CSV_COLUMNS)}
_RESULT_AT = tuple((_FIXED_AT[name], cell) for name, cell in _RESULT_CELLS)
"""Where each declared result column's cell goes in a runs.csv row."""
_BLANK_RESULT = (None,) * (_FIXED_AT["manifest_path"] - _FIXED_AT["end_time"] - 1)
_BLANK_TAIL = (None,) * (len(RUN_CSV_COLUMNS) - _FIXED_AT["manifest_path"] - 1)


def _table_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings in the declared JSON cells (``notes_json``, ``meta_json``) as
    ``json.dumps(sort_keys=True)``, as the upstream writes raw mappings."""
    out = dict(row)
    for key in JSON_CELLS:
        if isinstance(out.get(key), Mapping):
            out[key] = json.dumps(out[key], sort_keys=True)
    return out


def validate_artifacts(out_dir: str | Path) -> dict[str, Path]:
    """The upstream's post-write checks; raises :class:`ArtifactError` naming file and fix."""
    root = Path(out_dir)
    names = ("study.yaml", "manifest.json", *_CSV_FILES)
    missing = sorted(name for name in names if not (root / name).exists())
    if missing:
        raise ArtifactError(f"Missing canonical artifacts: {', '.join(missing)}.")
    with (root / "study.yaml").open(encoding="utf-8") as handle:
        study = yaml.safe_load(handle) or {}
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    for name, payload, keys in (
        ("study.yaml", study, _STUDY_KEYS),
        ("manifest.json", manifest, _MANIFEST_KEYS),
    ):
        absent = [key for key in keys if key not in payload]
        if absent:
            raise ArtifactError(f"{name} is missing required keys: {', '.join(absent)}.")
        if payload.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{name} schema_version {payload.get('schema_version')!r} does not match "
                f"{SCHEMA_VERSION!r}."
            )
    if study.get("study_id") != manifest.get("study_id"):
        raise ArtifactError(
            "study.yaml and manifest.json disagree on study_id: "
            f"{study.get('study_id')!r} != {manifest.get('study_id')!r}."
        )
    for name, required in _CSV_FILES.items():
        with (root / name).open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle), [])
        absent = [column for column in required if column not in header]
        if absent:
            raise ArtifactError(f"{name} is missing required columns: {', '.join(absent)}.")
    return {name: root / name for name in names}
