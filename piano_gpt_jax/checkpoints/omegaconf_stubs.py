"""Stand-ins for OmegaConf's classes, so a piano-gpt checkpoint unpickles without running code.

Reference checkpoints pickle OmegaConf `DictConfig` objects (`run_config`, `model_cfg`). A plain
`torch.load(weights_only=False)` would need omegaconf and would execute whatever the pickle asks
for. Instead torch's weights-only unpickler (torch_format.py) allow-lists, under the omegaconf
class names, the small stub classes below, which only store the pickled state. `to_plain` then
turns the stubs into plain dicts/lists (resolving simple `${a.b}` interpolations): omegaconf is
never imported or needed. No torch here.
"""

from __future__ import annotations

import collections
import pickle
import re
import typing
from typing import Any

import numpy as np

__all__ = ["allowed_globals", "to_plain"]

class _Stub:
    """Holds the pickled `__dict__` of an omegaconf object; never runs omegaconf code."""

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")
        self.__dict__.update(state)


class _DictConfig(_Stub):
    pass


class _ListConfig(_Stub):
    pass


class _ValueNode(_Stub):
    pass


class _Metadata(_Stub):
    pass


_NODE_NAMES = ["AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode",
               "PathNode", "EnumNode", "ValueNode", "UnionNode", "InterpolationResultNode"]


class _SimpleNamespace(_Stub):
    """Stand-in for types.SimpleNamespace (what our exporter writes when omegaconf is absent)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


def _numpy_scalar_globals() -> list[tuple[Any, str]]:
    """numpy scalars and dtypes (e.g. a loss stored as np.float64); torch documents them as safe."""
    from numpy._core import multiarray

    out: list[tuple[Any, str]] = [(multiarray.scalar, "numpy.core.multiarray.scalar"),
                                  (multiarray.scalar, "numpy._core.multiarray.scalar"),
                                  (np.dtype, "numpy.dtype")]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        out.append((getattr(np.dtypes, name), f"numpy.dtypes.{name}"))
    return out


def allowed_globals() -> list[tuple[Any, str]]:
    allowed: list[tuple[Any, str]] = [
        (_DictConfig, "omegaconf.dictconfig.DictConfig"),
        (_ListConfig, "omegaconf.listconfig.ListConfig"),
        (_Metadata, "omegaconf.base.Metadata"),
        (_Metadata, "omegaconf.base.ContainerMetadata"),
        (_SimpleNamespace, "types.SimpleNamespace"),
        (collections.defaultdict, "collections.defaultdict"),
        (typing.Any, "typing.Any"),
        (typing.Dict, "typing.Dict"),  # noqa: UP006 - the pickled name
        (typing.List, "typing.List"),  # noqa: UP006
        (typing.Tuple, "typing.Tuple"),  # noqa: UP006
    ]
    allowed += [(_ValueNode, f"omegaconf.nodes.{n}") for n in _NODE_NAMES]
    # Type objects stored as metadata (object_type / key_type / ref_type); calling them is harmless.
    for t in (dict, list, tuple, int, float, bool, str, bytes):
        allowed.append((t, f"builtins.{t.__name__}"))
    return allowed + _numpy_scalar_globals()



_INTERP = re.compile(r"\$\{([^${}]*)\}")
_MISSING = "???"


def to_plain(obj: Any) -> Any:
    """Stubbed omegaconf objects (and containers of them) as plain Python values.

    Interpolations `${a.b}` / `${.sibling}` that point inside the same config are resolved;
    anything else (resolvers such as `${now:...}`, dangling keys) is kept as its string.
    """
    return _Converter().convert(obj)


class _Converter:
    def __init__(self) -> None:
        self._resolving: set[int] = set()

    def convert(self, obj: Any) -> Any:
        if isinstance(obj, _DictConfig):
            content = obj.__dict__.get("_content")
            if content is None or isinstance(content, str):
                return self._scalar(obj, content)
            return {k: self.convert(v) for k, v in content.items()}
        if isinstance(obj, _ListConfig):
            content = obj.__dict__.get("_content")
            if content is None or isinstance(content, str):
                return self._scalar(obj, content)
            return [self.convert(v) for v in content]
        if isinstance(obj, _ValueNode):
            return self._scalar(obj, obj.__dict__.get("_val"))
        if isinstance(obj, _SimpleNamespace):
            return {k: self.convert(v) for k, v in obj.__dict__.items()}
        if isinstance(obj, dict):
            return {k: self.convert(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.convert(v) for v in obj)
        return obj

    def _scalar(self, node: Any, value: Any) -> Any:
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _INTERP.fullmatch(value)
        if whole:
            found, resolved = self._resolve(node, whole.group(1))
            return resolved if found else value
        parts: list[str] = []
        pos = 0
        for m in _INTERP.finditer(value):
            found, resolved = self._resolve(node, m.group(1))
            if not found or isinstance(resolved, (dict, list)):
                return value
            parts += [value[pos:m.start()], str(resolved)]
            pos = m.end()
        return "".join(parts) + value[pos:]

    def _resolve(self, node: Any, expr: str) -> tuple[bool, Any]:
        expr = expr.strip()
        if ":" in expr or not expr:  # a resolver call such as ${now:%Y}; cannot run it here
            return False, None
        if id(node) in self._resolving:  # interpolation cycle
            return False, None
        if expr.startswith("."):
            start = _parent(node)
            depth = len(expr) - len(expr.lstrip("."))
            for _ in range(depth - 1):
                start = _parent(start) if start is not None else None
            keys = expr[depth:].split(".") if expr[depth:] else []
        else:
            start = node
            while _parent(start) is not None:
                start = _parent(start)
            keys = expr.split(".")
        target = start
        for key in keys:
            target = _child(target, key)
            if target is None:
                return False, None
        self._resolving.add(id(node))
        try:
            value = self.convert(target)
        finally:
            self._resolving.discard(id(node))
        if isinstance(value, str) and (value == _MISSING or _INTERP.fullmatch(value)):
            return False, None
        return True, value


def _parent(node: Any) -> Any:
    return node.__dict__.get("_parent") if isinstance(node, _Stub) else None


def _child(container: Any, key: str) -> Any:
    content = container.__dict__.get("_content") if isinstance(container, _Stub) else None
    if isinstance(content, dict):
        if key in content:
            return content[key]
        if key.lstrip("-").isdigit() and int(key) in content:
            return content[int(key)]
        return None
    if isinstance(content, list) and key.lstrip("-").isdigit():
        i = int(key)
        return content[i] if -len(content) <= i < len(content) else None
    return None
