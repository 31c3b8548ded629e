"""The keys the schema accepts at a key path, and the closest one to a misspelt key ("did you mean")."""
from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel


def _alternatives(annotation: Any) -> list[Any]:
    """Optional[X] / Union[X, Y] / Annotated[X, ...] -> [X, Y]."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return [a for arg in get_args(annotation) for a in _alternatives(arg)]
    if origin is Annotated:
        return _alternatives(get_args(annotation)[0])
    return [annotation]


def _step(annotation: Any, part: Any) -> list[Any]:
    found = []
    for option in _alternatives(annotation):
        origin = get_origin(option)
        if isinstance(part, int) and origin is list and get_args(option):
            found += _alternatives(get_args(option)[0])
        elif isinstance(part, str) and isinstance(option, type) and issubclass(option, BaseModel) \
                and part in option.model_fields:
            found += _alternatives(option.model_fields[part].annotation)
    return found


def known_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Every key the models at `loc` (a pydantic error location, without the unknown key) accept."""
    candidates: list[Any] = [root]
    for part in loc:
        candidates = [found for c in candidates for found in _step(c, part)]
    keys: list[str] = []
    for option in candidates:
        if isinstance(option, type) and issubclass(option, BaseModel):
            keys += [k for k in option.model_fields if k not in keys]
    return keys


def did_you_mean(key: Any, known: list[str]) -> str:
    """' (did you mean 'epochs'?)' when a known key is close to `key`, else ''."""
    text = str(key)
    same_letters = [k for k in known if sorted(k.lower()) == sorted(text.lower())]  # case, swapped letters
    close = same_letters or difflib.get_close_matches(text, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
