"""The sentence ``studyq status`` prints for one group of failed runs: how many, which kind
and class of error, an example message, and the fix for that kind of error."""

from __future__ import annotations

from orchestrator.store.records import ErrorSummary

__all__ = ["ERROR_FIXES", "describe_error"]

ERROR_FIXES: dict[str, str] = {
    "error": "{show}; fix the agent, problem or evaluator, then {rerun} re-runs the failed runs.",
    "timeout": "raise `execution.timeout_s` in the study file (or make the run faster), then "
    "{rerun} re-runs them.",
    "binding": "make the module importable where the workers run (PYTHONPATH, or "
    "`pip install -e .` of its package; `studyq validate STUDY_FILE` checks it), then {rerun} "
    "re-runs them.",
    "lost": "the worker died or stopped heartbeating on every attempt (out of memory, killed, "
    "node lost): check the worker logs and memory, then {rerun} re-runs them.",
    "cancelled": "nothing, if you cancelled the study; {rerun} re-runs them.",
}
"""The fix of each :class:`~orchestrator.contracts.results.ErrorKind`; an unknown kind gets
the ``error`` one."""


def describe_error(error: ErrorSummary, study_id: str = "STUDY", *, embedded: bool = False) -> str:
    """One group of failed runs as a sentence ending in the fix for its
    kind, naming one run of the group for ``studyq show``; ``embedded`` studies are re-run
    with ``studyq run``, distributed ones with ``studyq resubmit``."""
    count = int(error.count)
    kind_name = str(error.error_kind or "error")
    kind = "an error" if kind_name == "error" else f"a {kind_name} error"
    cls = f" ({error.error_type})" if error.error_type else ""
    example = " ".join(str(error.example or "").split())
    example = example if len(example) <= 120 else example[:117] + "..."
    runs = "1 run" if count == 1 else f"{count:,} runs"
    run_id = error.example_run_id
    show = (
        f"`studyq show {run_id}` prints one of them with its traceback"
        if run_id
        else f"`studyq runs {study_id} --status failed` lists them and `studyq show RUN_ID` "
        "prints one with its traceback"
    )
    fix = ERROR_FIXES.get(kind_name, ERROR_FIXES["error"])
    if "{show}" not in fix:
        fix += " {show}."
    if embedded:
        rerun = "`studyq run STUDY_FILE`"
    else:
        only = f" --error {kind_name}" if kind_name in ERROR_FIXES and kind_name != "error" else ""
        rerun = f"`studyq resubmit {study_id}{only}`"
    sentence = f"{runs} failed with {kind}{cls}" + (f", e.g.: {example}" if example else "")
    stop = "" if sentence.endswith(".") else "."
    return f"{sentence}{stop} Fix: {fix.format(show=show, rerun=rerun)}"
