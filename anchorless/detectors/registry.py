"""The detectors by name, and building one from a plain config dict; every weight has a
dotted path.

A detector registers itself with one line, ``@register("onenet")`` on its class;
:data:`DETECTORS` is the read-only view of the names registered so far (the package's
``__init__`` imports every detector module, so all are registered once
``anchorless.detectors`` is imported).

A config names the detector and gives, per section, the keyword-only arguments of that
section's module::

    {"name": "onenet", "num_classes": 3,
     "backbone": {"depth": 18}, "assigner": {"cost_giou": 2.0}, "loss": {"giou": 2.0}}

Missing sections and keys take the defaults (the papers' values, per detector), so
``detector.assigner.cost_giou`` is both a config path and a Tune search-space key. An
unknown name or key, or a value of the wrong type, raises :class:`DetectorConfigError`
whose message starts with the dotted key.
"""

from __future__ import annotations

import copy
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from anchorless.detectors.base import SECTIONS, BaseDetector, DetectorConfigError

DetectorClass = TypeVar("DetectorClass", bound=type[BaseDetector])

_REGISTERED: dict[str, type[BaseDetector]] = {}
DETECTORS: Mapping[str, type[BaseDetector]] = types.MappingProxyType(_REGISTERED)
DEFAULT_NUM_CLASSES = 80  # COCO
ROOT = "detector"

__all__ = [
    "DETECTORS",
    "BaseDetector",
    "DetectorConfigError",
    "build_detector",
    "default_detector_config",
    "register",
    "resolve_detector_config",
]


def register(name: str) -> Callable[[DetectorClass], DetectorClass]:
    """Class decorator: make a detector buildable as ``{"name": name, ...}``.

    A name belongs to one class: registering another class under a taken name raises
    ``ValueError`` (registering the same class again is a no-op). The class must give a
    component for every section, so a config can be resolved against it.
    """

    def decorator(cls: DetectorClass) -> DetectorClass:
        if not (isinstance(cls, type) and issubclass(cls, BaseDetector)):
            raise TypeError(f"register({name!r}): {cls!r} is not a BaseDetector subclass")
        taken = _REGISTERED.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(
                f"detector name {name!r} is already registered to {taken.__module__}.{taken.__qualname__}; "
                f"register {cls.__module__}.{cls.__qualname__} under another name"
            )
        missing = [section for section in SECTIONS if section not in getattr(cls, "components", {})]
        if missing:
            raise TypeError(f"register({name!r}): {cls.__qualname__}.components lacks {', '.join(missing)}")
        _REGISTERED[name] = cls
        return cls

    return decorator


# --------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(matches, plain value): ints become floats where a float is wanted, sequences lists."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in typing.get_args(tp))
        return ok, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, plain = _coerce(value, arg)
            if ok:
                return True, plain
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_type = args[0] if args else Any
        items = [_coerce(item, item_type) for item in value]
        return all(ok for ok, _ in items), [plain for _, plain in items]
    return isinstance(value, tp), value


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"


def config_parameters(component: type) -> dict[str, tuple[Any, Any]]:
    """The keyword-only constructor arguments of a component: {name: (default, type)}.

    A constructor that also takes ``**kwargs`` hands them to its parent's, so the parent's
    arguments are settings too, at the parent's defaults unless the constructor names them
    again with its own (a subclass states only what it adds or changes).
    """
    signature = inspect.signature(component.__init__)
    parameters: dict[str, tuple[Any, Any]] = {}
    if any(param.kind is inspect.Parameter.VAR_KEYWORD for param in signature.parameters.values()):
        parent = next((base for base in component.__mro__[1:] if "__init__" in vars(base)), object)
        if parent.__module__.startswith("anchorless."):  # not torch's Module or object
            parameters.update(config_parameters(parent))
    hints = typing.get_type_hints(component.__init__)
    parameters.update(
        (name, (param.default, hints.get(name, Any)))
        for name, param in signature.parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    )
    return parameters


# --------------------------------------------------------------------------- resolve


def _resolve_section(detector: type[BaseDetector], section: str, given: Any) -> dict[str, Any]:
    path = f"{ROOT}.{section}"
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise DetectorConfigError(f"{path}: expected a mapping of settings, got {_describe(given)}")
    parameters = config_parameters(detector.components[section])
    resolved = {name: default for name, (default, _) in parameters.items()}
    resolved.update(copy.deepcopy(detector.defaults.get(section, {})))
    for key, value in given.items():
        if key not in parameters:
            expected = ", ".join(sorted(parameters)) or "(no settings)"
            raise DetectorConfigError(f"{path}.{key}: unknown key; expected one of {expected}")
        ok, plain = _coerce(value, parameters[key][1])
        if not ok:
            raise DetectorConfigError(
                f"{path}.{key}: expected {_type_name(parameters[key][1])}, got {_describe(value)}"
            )
        resolved[key] = plain
    return {key: list(v) if isinstance(v, tuple) else v for key, v in resolved.items()}


def resolve_detector_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a detector config and fill in every default; returns a new plain dict."""
    if not isinstance(cfg, Mapping):
        raise DetectorConfigError(f"{ROOT}: expected a mapping, got {_describe(cfg)}")
    allowed = ("name", "num_classes", *SECTIONS)
    for key in cfg:
        if key not in allowed:
            raise DetectorConfigError(f"{ROOT}.{key}: unknown key; expected one of {', '.join(allowed)}")
    name = cfg.get("name")
    if name not in DETECTORS:
        what = "missing" if name is None else f"unknown detector {name!r}"
        raise DetectorConfigError(f"{ROOT}.name: {what}; expected one of {', '.join(sorted(DETECTORS))}")
    num_classes = cfg.get("num_classes", DEFAULT_NUM_CLASSES)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DetectorConfigError(f"{ROOT}.num_classes: expected a positive int, got {_describe(num_classes)}")
    detector = DETECTORS[name]
    resolved: dict[str, Any] = {"name": name, "num_classes": num_classes}
    for section in SECTIONS:
        resolved[section] = _resolve_section(detector, section, cfg.get(section))
    return resolved


def default_detector_config(name: str) -> dict[str, Any]:
    """The full resolved default config of a detector (to print, edit or validate against)."""
    return resolve_detector_config({"name": name})


def build_detector(cfg: Mapping[str, Any]) -> BaseDetector:
    """Build a detector from its config; ``detector.config`` holds the resolved config."""
    resolved = resolve_detector_config(cfg)
    detector = DETECTORS[resolved["name"]].from_config(resolved["num_classes"], copy.deepcopy(resolved))
    detector.config = resolved
    return detector
