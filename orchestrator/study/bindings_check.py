"""Whether every agent, problem and condition runner a study names resolves on this machine.

``studyq validate`` and ``studyq run`` ask the worker's own resolver (the entry point
``resolver`` of :mod:`orchestrator.contracts.worker_api`, built as the embedded executor
builds it) for each id the plan uses, before anything runs. An id that does not resolve would
fail every one of its runs as a ``binding`` error; here it is one :class:`Problem` naming the
field that names it, the error and the fix:

- a reference that cannot be imported: make its module importable (``PYTHONPATH``,
  ``pip install -e``);
- an id that no source knows: bind it, or use the known id it is probably a misspelling of.

Resolving imports the study's code and builds its problems, in this process, exactly as a
run on this machine would: with the study file's folder first on the import path, as
``studyq run`` puts it (:class:`~orchestrator.executors.embedded.ResolverSpec`). It says
nothing about workers on other machines, which may have other code installed (``studyq
submit`` does not check); :func:`study_folder_notes` says which modules a cluster worker
would not find.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from importlib.machinery import ModuleSpec
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from orchestrator.contracts.errors import BindingError, Problem
from orchestrator.contracts.worker_api import worker_entry
from orchestrator.study.model import Study
from orchestrator.study.plan import PreparedStudy, plan_cells
from orchestrator.study.validation import AGENT_FACTORS, PROBLEM_FACTORS

__all__ = ["binding_problems", "import_path_of", "on_import_path", "study_folder_notes"]

Kind = Literal["agent", "problem"]

# The entry-point groups workers.bindings looks ids up in (docs/agents.md); named here
# because orchestrator/ does not import workers/.
_GROUPS: dict[Kind, str] = {"agent": "studyq.agents", "problem": "studyq.problems"}
_LISTS: dict[Kind, str] = {"agent": "agent_specs", "problem": "problem_ids"}
_FACTORS: dict[Kind, tuple[str, ...]] = {"agent": AGENT_FACTORS, "problem": PROBLEM_FACTORS}


class _Resolving(Protocol):
    """What ``workers.bindings.Resolver`` offers beyond the coordinator's ``RunResolver``."""

    def agent(self, agent_id: Any) -> Any: ...
    def problem(self, problem_id: Any) -> Any: ...
    def runner(self) -> Callable[..., Any]: ...


def binding_problems(
    prepared: PreparedStudy, *, allowed_imports: Iterable[str] = (), import_code: bool = True
) -> list[Problem]:
    """One problem per agent id, problem id or runner of ``prepared`` that does not resolve.

    ``import_code`` asks the worker's own resolver, which imports the study's modules and
    builds its problems (their module-level code runs); without it each reference is checked
    without running it (:func:`_static_error`: the module is found, the name is defined).

    ``allowed_imports`` is ``STUDYQ_ALLOWED_IMPORTS``; the study's own references are trusted,
    as the embedded executor trusts them. Empty when the installed worker's resolver cannot
    be asked for single ids (another worker implementation).
    """
    study = prepared.study
    here = _study_dir(prepared.source)
    problems: list[Problem] = []
    with _no_bytecode(), on_import_path(import_path_of(prepared.source)):
        problems.extend(_retry_problems(study, here, import_code=import_code))
        if import_code:
            lookups = _resolver_lookups(study, allowed_imports)
            if lookups is None:
                return []
        else:
            lookups = _static_lookups(study)
        agent, problem, runner = lookups
        if prepared.standalone:
            if study.bindings.runner is not None:
                error = _attempt(runner)
                if error is not None:
                    problems.append(
                        _broken("bindings.runner", "runner", study.bindings.runner, error, here)
                    )
            return problems
        for kind in ("agent", "problem"):
            lookup = agent if kind == "agent" else problem
            for key, where in _planned_ids(prepared, kind):
                error = _attempt(partial(lookup, key))
                if error is not None:
                    problems.append(_explain(study, kind, key, where, error, here))
    return problems


_Lookups = tuple[Callable[[str], Any], Callable[[str], Any], Callable[[], Any]]


def _resolver_lookups(study: Study, allowed_imports: Iterable[str]) -> _Lookups | None:
    built = worker_entry("resolver")(study.bindings, allowed_imports=tuple(allowed_imports))
    if not all(callable(getattr(built, name, None)) for name in ("agent", "problem", "runner")):
        return None
    resolver = cast(_Resolving, built)
    return resolver.agent, resolver.problem, resolver.runner


def _static_lookups(study: Study) -> _Lookups:
    """Lookups that raise what the resolver would, without importing the study's code: a
    bound reference must be found and define its name; an unbound id must be an installed
    entry point (which is not loaded)."""

    def lookup(kind: Kind, key: str) -> None:
        bound = study.bindings.agents if kind == "agent" else study.bindings.problems
        reference = bound.get(key)
        if reference is not None:
            error = _static_error(reference)
            if error is not None:
                raise error
        elif key not in _installed(kind):
            raise LookupError(f"unknown {kind} {key!r}")

    def runner() -> None:
        error = _static_error(str(study.bindings.runner))
        if error is not None:
            raise error

    return partial(lookup, "agent"), partial(lookup, "problem"), runner


def _static_error(reference: str) -> BindingError | None:
    """Why ``module:name`` would not import, found without running the module: the module
    is looked up (``importlib.util.find_spec``; a dotted module imports its parent package,
    as Python does) and its source is parsed for a top-level definition of ``name``. None
    when it would import, or when the source cannot tell (compiled code, ``__getattr__``, a
    star import)."""
    module, _, attribute = reference.partition(":")
    cause: Exception
    try:
        spec = importlib.util.find_spec(module)
    except Exception as raised:  # a missing parent, or a parent package that raises
        cause = raised
    else:
        if spec is None:
            cause = ModuleNotFoundError(f"No module named '{module}'", name=module)
        else:
            missing = _undefined(spec, module, attribute.split(".")[0])
            if missing is None:
                return None
            cause = AttributeError(missing)
    failure = BindingError(f"cannot import '{reference}': {cause}")
    failure.__cause__ = cause
    return failure


def _undefined(spec: ModuleSpec, module: str, name: str) -> str | None:
    """Why ``module`` does not define ``name`` at its top level, or None (it does, or its
    source cannot tell)."""
    origin = spec.origin
    if not origin or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_bytes(), origin)
    except (OSError, SyntaxError, ValueError):
        return None  # importing it reports the error; ``--import`` shows it
    names: set[str] = set()
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.If | ast.Try | ast.With | ast.For | ast.While):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    statements.extend(
                        child.body if isinstance(child, ast.ExceptHandler) else [child]
                    )
    if name in names or "__getattr__" in names:
        return None
    if spec.submodule_search_locations and importlib.util.find_spec(f"{module}.{name}"):
        return None  # a submodule of the package
    return f"module '{module}' has no attribute '{name}'"


def _retry_problems(study: Study, here: Path | None, *, import_code: bool) -> Iterator[Problem]:
    """One problem per import reference in ``execution.retry.on`` that does not import, or
    (``import_code``) is not an exception class (its errors would fail their runs instead of
    retrying)."""
    retry = study.execution.retry
    for index, name in enumerate(retry.on if retry is not None else ()):
        if ":" not in name:
            continue  # a builtin name or RateLimited: checked when the study file was read
        field = f"execution.retry.on[{index}]"
        if not import_code:
            failure = _static_error(name)
            if failure is not None:
                yield _broken(field, f"retry class '{name}'", name, failure, here)
            continue
        module, _, path = name.partition(":")
        try:
            value: Any = importlib.import_module(module)
            for attribute in path.split("."):
                value = getattr(value, attribute)
        except Exception as error:  # a module may raise anything while it is imported
            yield _broken(field, f"retry class '{name}'", name, error, here)
            continue
        if not (isinstance(value, type) and issubclass(value, BaseException)):
            yield Problem(
                field,
                f"retry class '{name}' is {type(value).__name__}, not an exception class.",
                "name an exception class (a subclass of Exception) after ':'.",
            )


def _planned_ids(prepared: PreparedStudy, kind: Kind) -> Iterator[tuple[str, str]]:
    """Each distinct id of ``kind`` the plan uses, with the field that names it."""
    study = prepared.study
    seen: set[str] = set()
    for cell in plan_cells(study, prepared.conditions, standalone=False):
        for value in cell.agents if kind == "agent" else cell.problems:
            key = str(value)
            if key not in seen:
                seen.add(key)
                yield key, _field_of(study, kind, key)


def _field_of(study: Study, kind: Kind, key: str) -> str:
    for f_index, factor in enumerate(study.factors):
        if factor.name in _FACTORS[kind]:
            for l_index, level in enumerate(factor.levels):
                if str(level.value) == key:
                    return f"factors[{f_index}].levels[{l_index}].value"
            return f"factors[{f_index}]"
    listed = study.agent_specs if kind == "agent" else study.problem_ids
    for index, value in enumerate(listed):
        if str(value) == key:
            return f"{_LISTS[kind]}[{index}]"
    return _LISTS[kind]  # nothing names one: the plan's default id


def _attempt(resolve: Callable[[], Any]) -> BaseException | None:
    """The error resolving raises, if any; a module may raise anything while it is imported."""
    try:
        resolve()
    except Exception as exc:  # a module may raise anything: report it, never escape
        return exc
    return None


def _explain(
    study: Study, kind: Kind, key: str, where: str, error: BaseException, here: Path | None
) -> Problem:
    bound = study.bindings.agents if kind == "agent" else study.bindings.problems
    reference = bound.get(key)
    if reference is not None:
        label = f"{kind} '{key}' ({where})"
        return _broken(f"bindings.{kind}s.{key}", label, reference, error, here)
    installed = _installed(kind)
    if key in installed:
        return Problem(
            where,
            f"{kind} '{key}': the installed '{_GROUPS[kind]}' entry point does not load: "
            f"{_text(error)}",
            "reinstall the package that provides it (`pip install -e` its checkout).",
        )
    known = sorted({*bound, *installed})
    if where == _LISTS[kind]:
        message = f"no {kind} is named, so every run uses the id '{key}', which nothing provides"
    else:
        message = f"unknown {kind} '{key}'"
    close = difflib.get_close_matches(key, known, n=3)
    hint = (
        f"did you mean {' or '.join(repr(name) for name in close)}?"
        if close
        else f"known {kind}s: {', '.join(known) or 'none'}."
    )
    fix = f"it is not bound in `bindings.{kind}s` and no installed {kind} has that name; {hint}"
    if where == _LISTS[kind]:
        fix = (
            f"name the {kind}s in `{_LISTS[kind]}: [...]` or a factor named "
            f"`{_FACTORS[kind][0]}`, or bind '{key}' in `bindings.{kind}s`; {hint}"
        )
    return Problem(where, message + ".", fix)


def _broken(
    field: str, label: str, reference: str, error: BaseException, here: Path | None
) -> Problem:
    message = f"{label}: {_text(error)}"
    if not message.endswith("."):
        message += "."
    missing = _missing_module(error)
    module = reference.partition(":")[0]
    if missing and missing.split(".")[0] != module.split(".")[0]:
        fix = (
            f"'{module}' imports '{missing}', which is not installed: install it where workers run."
        )
    elif missing is not None:
        folder = _folder_holding(module, here if here is not None else Path.cwd())
        fix = (
            f"'{module}' is in {folder}, which is not on the import path; make it importable "
            f"where workers run: PYTHONPATH={folder}, or `pip install -e` its package."
            if folder is not None
            else f"make '{module}' importable where workers run: `pip install -e` the package "
            "that provides it, or put the folder that holds it on PYTHONPATH."
        )
    elif _caused_by(error, AttributeError):
        fix = f"check the name after ':' in '{reference}'; the module has no such attribute."
    else:
        fix = f"fix the error '{reference}' raises when it is imported or built."
    return Problem(field, message, fix)


def _installed(kind: Kind) -> set[str]:
    return {entry.name for entry in entry_points(group=_GROUPS[kind])}


def _missing_module(error: BaseException) -> str | None:
    """The module whose absence caused ``error``, if that is what did."""
    for cause in _chain(error):
        if isinstance(cause, ModuleNotFoundError):
            return cause.name or ""
    return None


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(cause, kind) for cause in _chain(error))


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _text(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__


def _folder_holding(module: str, folder: Path, depth: int = 2) -> Path | None:
    """``folder`` or a subfolder (``depth`` levels down) holding ``module``'s top package."""
    if _lives_in(module, folder):
        return folder
    if depth:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and p.name[0] not in "._")
        except OSError:
            return None
        for child in children[:50]:
            found = _folder_holding(module, child, depth - 1)
            if found is not None:
                return found
    return None


def _lives_in(module: str, folder: Path) -> bool:
    top = module.split(".")[0]
    return (folder / f"{top}.py").is_file() or (folder / top).is_dir()


def _study_dir(source: str | None) -> Path | None:
    return Path(source).resolve().parent if source else None


def import_path_of(source: str | None) -> tuple[str, ...]:
    """The folders a run on this machine imports the study's code from, besides
    ``sys.path``: the study file's own folder (none for a study built in Python)."""
    here = _study_dir(source)
    return (str(here),) if here is not None else ()


@contextmanager
def on_import_path(folders: Iterable[str]) -> Iterator[None]:
    """``folders`` first on ``sys.path`` for the duration, then as before."""
    added = [folder for folder in folders if folder not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            if folder in sys.path:
                sys.path.remove(folder)


def study_folder_notes(prepared: PreparedStudy) -> list[str]:
    """One note per bound module that is found only in the study's folder: ``studyq run``
    imports it from there, a cluster worker does not."""
    here = _study_dir(prepared.source)
    if here is None or str(here) in sys.path:
        return []
    bindings = prepared.study.bindings
    references = [*bindings.agents.values(), *bindings.problems.values()]
    if bindings.runner is not None:
        references.append(bindings.runner)
    notes = []
    for module in dict.fromkeys(str(ref).partition(":")[0] for ref in references):
        if _lives_in(module, here) and not _importable_elsewhere(module, here):
            notes.append(
                f"'{module}' is imported from the study's folder {here}: `studyq run` finds "
                f"it there; a cluster worker needs it installed (`pip install -e`) or "
                f"PYTHONPATH={here}."
            )
    return notes


def _importable_elsewhere(module: str, here: Path) -> bool:
    top = module.split(".")[0]
    if top in sys.modules:
        origin = getattr(sys.modules[top], "__file__", None) or ""
        return bool(origin) and here not in Path(origin).resolve().parents
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    return spec is not None


@contextmanager
def _no_bytecode() -> Iterator[None]:
    """Import the study's code without writing ``__pycache__`` next to it: checking a study
    writes nothing."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before
