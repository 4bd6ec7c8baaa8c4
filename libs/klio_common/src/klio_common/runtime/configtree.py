"""The YAML tree and ``KLIO_*`` variables turned into settings Structs, every problem recorded."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

SERVICE_PORTS: dict[str, int] = {
    "wal-receiver": 9471,
    "basebackup": 9472,
    "relay": 9473,
    "retention": 9474,
}


def read_yaml(path: Path, problems: list[str]) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        problems.append(f"{path}: cannot read the configuration file: {exc.strerror or exc}")
        return {}
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}")
        return {}
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        problems.append(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
        return {}
    return tree


_INVALID: Any = object()


class Loader:
    """Turns the YAML tree into Structs, recording every problem instead of stopping at one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        self.origins: dict[str, str] = {}  # dotted key -> the variable that set or created it
        self.raw: dict[str, str] = {}  # dotted key -> the variable's text

    def problem(self, key: str, message: str) -> None:
        origin = self.origins.get(key)
        label = f"{key} (from {origin})" if origin else key
        self.problems.append(f"{label}: {message}")

    def apply_env(self, tree: dict[str, Any], env: Mapping[str, str]) -> None:
        for var in sorted(env):
            # Kubernetes injects KLIO_SERVICE_HOST and friends for a Service named "klio":
            # only nested names (with "__") are settings.
            if not var.startswith("KLIO_") or "__" not in var:
                continue
            parts = var[len("KLIO_") :].lower().split("__")
            if not all(parts):
                self.problems.append(f"{var}: empty key between '__' separators")
                continue
            if parts[0] == "services" and len(parts) > 1:
                parts[1] = parts[1].replace("_", "-")
            try:
                value = yaml.safe_load(env[var])
            except yaml.YAMLError:
                value = env[var]
            self.origins[".".join(parts)] = var
            self.raw[".".join(parts)] = env[var]
            self._set(tree, parts, value, var)

    def _set(self, tree: dict[str, Any], parts: list[str], value: Any, var: str) -> None:
        node: Any = tree
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            fresh: Any = value if last else ([] if parts[depth + 1].isdigit() else {})
            where = ".".join(parts[:depth]) or "the top level"
            key = ".".join(parts[: depth + 1])
            if isinstance(node, dict):
                if last or not isinstance(node.get(part), dict | list):
                    node[part] = fresh
                    self.origins.setdefault(key, var)
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) <= len(node):
                if int(part) == len(node):
                    node.append(fresh)
                    self.origins.setdefault(key, var)
                elif last:
                    node[int(part)] = fresh
                node = node[int(part)]
            elif isinstance(node, list):
                self.problems.append(
                    f"{var}: '{part}' is not an index of {where} (next index: {len(node)})"
                )
                return
            else:
                self.problems.append(f"{var}: {where} is not a mapping")
                return

    def merge_services(self, tree: dict[str, Any]) -> None:
        """Give each configured service its default port, so a partial entry is enough."""
        services = tree.get("services")
        if not isinstance(services, dict):
            return
        merged: dict[str, Any] = {}
        for name, value in services.items():
            key = str(name).replace("_", "-")
            if key not in SERVICE_PORTS:
                self._unknown("services", str(name), list(SERVICE_PORTS))
            elif isinstance(value, dict):
                merged[key] = {"http_port": SERVICE_PORTS[key], **value}
            else:
                merged[key] = value
        tree["services"] = merged

    def _unknown(self, path: str, key: str, known: list[str]) -> None:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        self.problem(_join(path, key), f"unknown key{hint}")

    def build(self, cls: type[msgspec.Struct], data: Any, path: str) -> Any:
        if not isinstance(data, dict):
            self.problem(path or "the top level", f"expected a mapping, got {_describe(data)}")
            return _INVALID
        fields = msgspec.structs.fields(cls)
        names = [f.encode_name for f in fields]
        for key in data:
            if key not in names:
                self._unknown(path, str(key), names)
        values: dict[str, Any] = {}
        for f in fields:
            key = _join(path, f.name)
            if f.name not in data:
                if f.required:
                    self.problem(key, "missing (required)")
                    values[f.name] = _INVALID
                continue
            values[f.name] = self.convert(f.type, data[f.name], key)
        invalid = {name for name, v in values.items() if v is _INVALID}
        if invalid:
            # Still check the valid fields, so that every problem is listed at once: invalid
            # ones get their default (or an empty stand-in) and their own checks are skipped.
            for f in fields:
                if f.name in invalid:
                    values[f.name] = _stand_in(f)
            try:
                self._check(cls(**values), path, skip=invalid)
            except (TypeError, ValueError, msgspec.ValidationError):
                pass
            return _INVALID
        obj = cls(**values)
        self._check(obj, path, skip=set())
        return obj

    def _check(self, obj: msgspec.Struct, path: str, *, skip: set[str]) -> None:
        check = getattr(obj, "_problems", None)
        if check is not None:
            for key, message in check():
                if key.split(".", 1)[0] not in skip:
                    self.problem(_join(path, key), message)

    def convert(self, tp: Any, value: Any, path: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            others = [a for a in args if a is not type(None)]
            return self.convert(others[0] if len(others) == 1 else tp, value, path)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return self.build(tp, value, path)
        if origin is list:
            if not isinstance(value, list):
                self.problem(path, f"expected a list, got {_describe(value)}")
                return _INVALID
            items = [self.convert(args[0], v, f"{path}.{i}") for i, v in enumerate(value)]
            return _INVALID if any(v is _INVALID for v in items) else items
        if origin is dict:
            if not isinstance(value, dict):
                self.problem(path, f"expected a mapping, got {_describe(value)}")
                return _INVALID
            entries = {
                str(k): self.convert(args[1], v, _join(path, str(k))) for k, v in value.items()
            }
            return _INVALID if any(v is _INVALID for v in entries.values()) else entries
        return self._scalar(tp, value, path)

    def _scalar(self, tp: Any, value: Any, path: str) -> Any:
        raw = self.raw.get(path)
        if tp is str and raw is not None and not isinstance(value, str | dict | list):
            return raw  # KLIO_X__SLOT=123 means the text "123"
        if path.endswith("_mode") and isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                self.problem(path, f"expected an octal mode such as 0640, got {value!r}")
                return _INVALID
        if tp is Path:
            if isinstance(value, str) and value:
                return Path(value)
            self.problem(path, f"expected a path, got {_describe(value)}")
            return _INVALID
        try:
            return msgspec.convert(value, tp)
        except msgspec.ValidationError:
            self.problem(path, f"expected {_type_name(tp)}, got {_describe(value)}")
            return _INVALID


def _stand_in(f: msgspec.structs.FieldInfo) -> Any:
    """A harmless value for a field whose own value was invalid (only to check the others)."""
    if f.default is not msgspec.NODEFAULT:
        return f.default
    if f.default_factory is not msgspec.NODEFAULT:
        return f.default_factory()
    tp = f.type
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)[0]
    stand_ins: dict[Any, Any] = {str: "", int: 0, float: 0.0, bool: False, Path: Path()}
    return stand_ins.get(tp)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"
