"""Reading a study file into a plain mapping, safely, with errors that point at the line.

The upstream package reads YAML with PyYAML ``safe_load`` (YAML 1.1 typing decides the
hashes, UPSTREAM.md 3.6) and JSON with ``json.load``. studyq does the same, but refuses,
before parsing, files over a size limit, and after parsing, documents whose alias graph
expands beyond a bound (a "billion laughs" document is small on disk and shared in memory,
but hashing walks every expanded node).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from orchestrator.contracts.errors import Problem, StudyValidationError

__all__ = ["DEFAULT_MAX_STUDY_BYTES", "MAX_EXPANDED_NODES", "read_study_mapping"]

DEFAULT_MAX_STUDY_BYTES = 10 * 1024 * 1024
MAX_EXPANDED_NODES = 1_000_000
_FILE = "(file)"


def _fail(source: str, message: str, fix: str = "") -> StudyValidationError:
    return StudyValidationError([Problem(_FILE, message, fix)], source=source)


def read_study_mapping(
    path: str | Path, *, max_bytes: int = DEFAULT_MAX_STUDY_BYTES
) -> dict[str, Any]:
    """Return the top-level mapping of a study file, or raise one clear problem."""
    resolved = Path(path)
    source = str(path)
    suffix = resolved.suffix.lower()
    if suffix not in {".yaml", ".yml", ".json"}:
        raise _fail(
            source,
            "Study file must end with .yaml/.yml or .json.",
            "rename the file with a .yaml, .yml or .json suffix.",
        )
    try:
        size = resolved.stat().st_size
    except FileNotFoundError:
        raise _fail(source, "file not found.", "check the path.") from None
    except OSError as exc:
        raise _fail(source, f"cannot read the file ({exc.strerror}).") from None
    if resolved.is_dir():
        raise _fail(source, "is a directory, not a study file.", "name the study file itself.")
    limit = max_bytes
    if size > limit:
        raise _fail(
            source,
            f"the file is {size:,} bytes, over the {limit:,}-byte limit for study files.",
            "keep large data (design matrices) in a separate file, or raise "
            "STUDYQ_MAX_STUDY_BYTES.",
        )
    data = resolved.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(
            source,
            f"the file is not UTF-8 text (invalid byte at offset {exc.start}).",
            "save the study file as UTF-8.",
        ) from None
    if not text.strip():
        raise _fail(
            source,
            "the file is empty.",
            "write a study: at least `study_id:`, `title:` and `factors:`.",
        )
    payload = _parse_json(text, source) if suffix == ".json" else _parse_yaml(text, source)
    if payload is None:  # a YAML document of comments only
        payload = {}
    if not isinstance(payload, dict):
        raise _fail(
            source,
            f"the top level is a {_type_name(payload)}, but a study must be a mapping.",
            "start the file with top-level keys such as `study_id:` and `title:`.",
        )
    _check_expansion(payload, source)
    return payload


def _parse_json(text: str, source: str) -> Any:
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(
            source,
            f"JSON syntax error at line {exc.lineno}, column {exc.colno}: {exc.msg}.",
            "fix the JSON syntax at that position.",
        ) from None
    except RecursionError:
        raise _fail(source, "JSON nesting is too deep.", "flatten the document.") from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.context_mark and exc.problem_mark:
            # PyYAML gives up where it noticed (often the end of the file); the construct
            # that is wrong started at the context mark, which is the line to look at.
            start = exc.context_mark
            what += f" ({exc.context} started at line {start.line + 1}, column {start.column + 1})"
        if isinstance(exc, yaml.constructor.ConstructorError):
            raise _fail(
                source,
                f"YAML tag not allowed{where}: {what}.",
                "study files may only use plain YAML values (no !!python tags).",
            ) from None
        raise _fail(
            source, f"YAML syntax error{where}: {what}.", "fix the YAML at that position."
        ) from None
    except yaml.YAMLError as exc:
        raise _fail(source, f"YAML error: {exc}.", "fix the YAML syntax.") from None
    except RecursionError:
        raise _fail(source, "YAML nesting is too deep.", "flatten the document.") from None


def _check_expansion(payload: Any, source: str) -> None:
    """Refuse alias bombs and self-referencing documents before anything walks them."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise _fail(
                source,
                "the document refers to itself through a YAML alias.",
                "remove the recursive anchor/alias.",
            )
        in_progress.add(key)
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                break
        in_progress.discard(key)
        sizes[key] = total
        if total > MAX_EXPANDED_NODES:
            raise _fail(
                source,
                f"YAML aliases expand the document beyond {MAX_EXPANDED_NODES:,} values.",
                "write the values out instead of nesting anchors and aliases.",
            )
        return total

    try:
        size(payload)
    except RecursionError:
        raise _fail(source, "the document is nested too deeply.", "flatten it.") from None


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__
