"""Reading the deployment files the way their tools do, without the tools.

* :func:`interpolate`: docker compose's variable interpolation (``${VAR}``, ``${VAR:-x}``,
  ``${VAR-x}``, ``${VAR:?msg}``, ``${VAR?msg}``, ``${VAR:+x}``, ``$$``), so a test can
  resolve docker-compose.yml with the values of .env.example as ``docker compose`` would.
* :func:`secret_leaks`: every place in a parsed file where a secret is written in plain text
  (a password in a URL, a secret-named variable, the value after ``--requirepass``).
* :func:`parse_duration`, :func:`parse_env_file`, :func:`dockerfile_instructions`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
"""The repository's root."""

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|BASIC_AUTH|API_KEY|PRIVATE_KEY|AUTH)$")
"""Variable names whose value is a secret (a ``*_FILE`` variable holds a path, not one)."""
SECRET_FLAGS = ("--requirepass", "--basic-auth", "--password", "-a")
"""Command-line flags followed by a secret."""
URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^:@/\s]*:(?P<password>[^@/\s]+)@")
COMPOSE_SECRET = re.compile(r"\$\{[A-Z][A-Z0-9_]*(:?\?[^}]*)?\}")
"""A compose value that is nothing but a variable, required to be set (``${VAR:?msg}``)."""


class MissingVariable(ValueError):
    """``${VAR:?msg}`` or ``${VAR?msg}`` with VAR unset (or empty): compose refuses to start."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with its variables replaced as docker compose replaces them."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        present = value is not None
        nonempty = bool(value)
        if op is None:
            return value or ""
        if op == ":-":
            return value if nonempty and value is not None else arg
        if op == "-":
            return value if present and value is not None else arg
        if op == ":?":
            if not nonempty:
                raise MissingVariable(f"{name}: {arg}")
            return value or ""
        if op == "?":
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return value or ""
        if op == ":+":
            return arg if nonempty else ""
        return arg if present else ""  # "+"

    return _INTERPOLATION.sub(replace, text)


def variables(text: str) -> set[str]:
    """The variable names ``text`` interpolates."""
    return {
        match.group("name") or match.group("bare")
        for match in _INTERPOLATION.finditer(text)
        if match.group(0) != "$$"
    }


def defaults(text: str) -> dict[str, str]:
    """``{VAR: default}`` for every ``${VAR:-default}`` in ``text``."""
    return {
        match.group("name"): match.group("arg") or ""
        for match in _INTERPOLATION.finditer(text)
        if match.group("op") == ":-"
    }


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    """A parsed compose document with every string interpolated."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    return node


def compact(node: Any) -> Any:
    """A parsed compose document with each ``${VAR...}`` shortened to ``${VAR}`` (so a
    password interpolated with an error message containing spaces still reads as one word
    inside its URL)."""
    if isinstance(node, str):
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}", r"${\1}", node)
    if isinstance(node, list):
        return [compact(item) for item in node]
    if isinstance(node, dict):
        return {key: compact(value) for key, value in node.items()}
    return node


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a parsed document, with its path (``services.worker.command[3]``)."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from strings(item, f"{path}[{index}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{path}.{key}" if path else str(key))


def _pairs(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every mapping entry, and of every ``{name:, value:}`` pair as
    Kubernetes writes environment variables."""
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and "value" in node:
            yield path, node["name"], node["value"]
        for key, value in node.items():
            yield path, str(key), value
            yield from _pairs(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _pairs(item, f"{path}[{index}]")
            if (
                isinstance(item, str)
                and item in SECRET_FLAGS
                and index + 1 < len(node)
                and isinstance(node[index + 1], str)
            ):
                yield f"{path}[{index + 1}]", item, node[index + 1]


def secret_leaks(document: Any, is_reference: Callable[[str], bool]) -> list[str]:
    """Where ``document`` writes a secret in plain text.

    A secret is a URL's password, the value of a variable named like a secret, or the
    argument of a secret flag. Each must be a reference (``is_reference``: an interpolated
    variable, a placeholder), never a literal.
    """
    leaks = []
    for path, text in strings(document):
        for match in URL_PASSWORD.finditer(text):
            if not is_reference(match.group("password")):
                leaks.append(f"{path}: password in URL {text!r}")
    for path, key, value in _pairs(document):
        secretive = key in SECRET_FLAGS or (
            SECRET_NAME.search(key.upper()) and not key.upper().endswith("_FILE")
        )
        if secretive and isinstance(value, str) and not is_reference(value):
            leaks.append(f"{path}.{key}: secret value {value!r}")
    return leaks


_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>us|ms|h|m|s)")
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a compose duration (``1m30s``, ``360s``, ``3m``)."""
    parts = list(_DURATION.finditer(text))
    if not parts or "".join(part.group(0) for part in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(part.group("value")) * _SECONDS[part.group("unit")] for part in parts)


def parse_env_file(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``(values, comments)`` of a .env file: each variable's value, and the comment lines
    just above it."""
    values: dict[str, str] = {}
    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
        elif not stripped:
            pending = []
        else:
            name, sep, value = stripped.partition("=")
            assert sep, f"{path}: not NAME=value: {line!r}"
            values[name] = value
            comments[name] = [text for text in pending if text and not text.startswith("---")]
    return values, comments


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction, continuation lines joined, comments
    dropped."""
    instructions: list[tuple[str, str]] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, arguments = buffer.partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        buffer = ""
    assert not buffer, f"{path}: a continuation line ends the file"
    return instructions
