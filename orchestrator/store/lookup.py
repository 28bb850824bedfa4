"""Finding a study's store and the study in it, with the one message a wrong ``--db`` or a
mistyped study id gets from every command.

Opening a SQLite store creates its file, so a command that only reads or changes an existing
study checks first (:func:`open_existing`): a typo in ``--db`` then says so instead of
leaving an empty ``studyq.db`` behind and reporting "no such study".
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.contracts.errors import StudyError
from orchestrator.store.engine import mask_url, normalize_url
from orchestrator.store.records import StudyInfo
from orchestrator.store.store import ResultStore

__all__ = ["missing_sqlite_file", "no_such_study", "open_existing", "require_study"]

_LISTED_STUDIES = 20
_ELSEWHERE = "point --db / STUDYQ_DATABASE_URL at the store the study ran in"


def missing_sqlite_file(url: str) -> str | None:
    """The path of the SQLite file ``url`` names when it does not exist, else None (also for
    in-memory SQLite and PostgreSQL).

    Raises:
        StoreError: the URL cannot be parsed or names an unsupported backend.
    """
    parsed = normalize_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if Path(database).exists() else database


def open_existing(url: str, *, command: str) -> ResultStore:
    """The store at ``url``; a SQLite file that does not exist is refused, not created.

    Raises:
        StudyError: the SQLite file does not exist (names the file and the fix).
    """
    missing = missing_sqlite_file(url)
    if missing:
        raise StudyError(
            f"studyq {command}: no store at {mask_url(url)}: the file {missing} does not "
            f"exist. Fix: run from the folder the study ran in, or {_ELSEWHERE}."
        )
    return ResultStore.open(url)


def require_study(store: ResultStore, study_id: str, *, command: str) -> StudyInfo:
    """The registered study ``study_id``.

    Raises:
        StudyError: it is not registered (names the studies that are, and the fix).
    """
    info = store.find_study(study_id)
    if info is None:
        raise no_such_study(
            study_id, store.url, [s.study_id for s in store.list_studies()], command=command
        )
    return info


def no_such_study(study_id: str, where: str, known: list[str], *, command: str) -> StudyError:
    """The error for a study id that ``where`` does not hold, listing those it does."""
    if not known:
        listed, fix = "it holds no studies", f"run or submit the study first, or {_ELSEWHERE}"
    else:
        listed = "studies: " + ", ".join(known[:_LISTED_STUDIES])
        if len(known) > _LISTED_STUDIES:
            listed += f", ... ({len(known)} in all; `studyq status` lists them)"
        fix = f"pass one of these study_ids, or {_ELSEWHERE}"
    return StudyError(f"studyq {command}: no study '{study_id}' in {where}; {listed}. Fix: {fix}.")
