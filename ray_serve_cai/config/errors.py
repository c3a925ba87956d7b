"""Problems found in a config file, and the one exception that carries all of them."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError

from ray_serve_cai.errors import BadInput

M = TypeVar("M", bound=BaseModel)


class Problem(NamedTuple):
    """One thing wrong with a config: where (a field path such as ``ray_cluster.worker_groups[1].gpus``,
    an environment variable name, or ``line 3`` for YAML syntax) and what."""

    field: str
    message: str


class ConfigError(BadInput):
    """Invalid configuration (bad input, exit 2). Carries every problem found, not just the first one.

    ``str()`` gives one line per problem: ``<source>: <field>: <message>``.
    """

    def __init__(self, problems: Sequence[Problem], source: str) -> None:
        self.problems: list[Problem] = list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        return "\n".join(
            f"{self.source}: {p.field}: {p.message}" if p.field else f"{self.source}: {p.message}"
            for p in self.problems
        )

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes despite the custom __init__
        return (type(self), (self.problems, self.source))

    def lines(self) -> list[str]:
        """One line per problem, as printed by the CLI."""
        return self._render().splitlines()


def format_path(loc: Iterable[Any]) -> str:
    """``("ray_cluster", "worker_groups", 1, "gpus")`` → ``ray_cluster.worker_groups[1].gpus``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue  # pydantic's marker for "the key itself"; the key is already in the path
        else:
            out += f".{part}" if out else str(part)
    return out


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a close match, else ``""``."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class of the mapping at ``loc`` inside ``model`` (None when it is not one model)."""
    annotation: Any = model
    for part in loc:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return None
            annotation = args[0]
            origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif origin in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    models = _models_in(annotation)
    return models[0] if len(models) == 1 else None


def _known_keys(model: type[BaseModel], loc: Sequence[Any]) -> set[str] | None:
    """The field names of the model that sits at ``loc`` (the mapping holding an unknown key)."""
    found = _model_at(model, loc)
    return set(found.model_fields) if found is not None else None


class _Removed:
    """Stands where a list item was removed for the lenient pass, so indices keep meaning the user's."""

    def __repr__(self) -> str:
        return "REMOVED"

    def __deepcopy__(self, memo: dict[int, Any]) -> _Removed:
        return self


REMOVED = _Removed()


def _without(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_without(v) for v in data if v is not REMOVED]
    return data


def lenient_validate(
    model: type[M], data: Any, error: ValidationError, stand_ins: Mapping[str, Any]
) -> M | None:
    """Validate ``data`` once more without what ``error`` refused, so cross-field rules can still
    check everything else; pydantic's error list already names every refused value.

    ``data`` is changed in place: a refused value with a default is removed; a refused or missing
    required one is replaced by ``stand_ins[field]`` when there is one, else the mapping that holds
    it goes (a list item becomes ``REMOVED``, keeping the user's indices). Returns the model, or
    None when the file's top level is unusable.
    """
    for err in error.errors():
        loc = tuple(part for part in err["loc"] if part != "[key]")
        holder = _model_at(model, loc[:-1]) if loc else None
        field = holder.model_fields.get(str(loc[-1])) if holder is not None else None
        if field is not None and field.is_required():
            if loc[-1] in stand_ins:
                _put(data, loc, stand_ins[str(loc[-1])])
                continue
            loc = loc[:-1]  # a mapping without a usable required value cannot be checked further
        if len(loc) < 2:  # the whole file or a whole top-level section is unusable
            return None
        _put(data, loc, REMOVED)
    try:
        return model.model_validate(_without(data))
    except ValidationError:  # pragma: no cover - every refused value is gone; stay safe regardless
        return None


def _put(data: Any, loc: tuple[Any, ...], value: Any) -> None:
    """Set (or with REMOVED, remove) the value at ``loc``; a path that no longer exists is left alone."""
    parent = data
    for part in loc[:-1]:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            return
    last = loc[-1]
    if isinstance(parent, dict) and (value is not REMOVED or last in parent):
        if value is REMOVED:
            del parent[last]
        else:
            parent[last] = value
    elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        parent[last] = value


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


_MESSAGES = {
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "missing": "is required",
}


_BOUNDS = {
    "greater_than": ("gt", "must be greater than {}"),
    "greater_than_equal": ("ge", "must be {} or more"),
    "less_than_equal": ("le", "must be {} or less"),
}


def problems_from_validation(
    error: ValidationError, model: type[BaseModel], prefix: Sequence[Any] = ()
) -> list[Problem]:
    """Turn pydantic's errors into problems with readable paths and messages."""
    problems: list[Problem] = []
    for err in error.errors(include_url=False):
        loc = tuple(prefix) + tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, err["loc"][:-1])
            hint = suggest(str(err["loc"][-1]), known) if known else ""
            if known and not hint:
                hint = "; known keys: " + ", ".join(sorted(known))
            problems.append(Problem(format_path(loc), f"unknown key{hint}"))
        else:
            problems.append(Problem(format_path(loc), _message(err, loc)))
    return problems


def _message(err: Any, loc: tuple[Any, ...]) -> str:
    """What is wrong with one value, then what it was (except for our own value errors)."""
    kind = err["type"]
    if kind == "missing":
        return "is required"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if loc and loc[-1] == "[key]" and kind == "string_type":
        message = "key must be a string"
    elif kind in _MESSAGES:
        message = _MESSAGES[kind]
    elif kind in _BOUNDS:
        bound, text = _BOUNDS[kind]
        message = text.format(_number(err["ctx"][bound]))
    elif kind == "literal_error":
        message = f"must be one of {err['ctx']['expected']}"
    else:
        message = str(err["msg"])
    return f"{message}, got {_describe(err['input'])}"
