"""mergekit's parameter settings, as mergekit 0.1.5 resolves them: a scalar; a gradient (a list of
numbers interpolated over the layer's position in its slice); `filter:` rules (the first rule whose
filter is a substring of the tensor's name, or has none, wins); and their precedence (a source's own
parameters, then its slice's, then the recipe's global ones). Values are checked against the
operator's Param when the recipe is read, so a bad one is refused before any model is opened."""

from __future__ import annotations

from typing import Any, Iterable

from .errors import MergepipeError

Setting = Any  # a scalar, a list of scalars, a {value, filter} mapping or a list of them

SCALARS = (bool, int, float, str)


def _numeric_str(value: Any, param) -> Any:
    """What mergekit's validators accept besides the plain type: YAML 1.1 reads `1e-3` as a string,
    which is the number it spells; a flag given as 1 or 0 (`normalize: 1.0`) is true or false."""
    if param is None:
        return value
    if param.type is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if param.type is bool and not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return value


def check_setting(setting: Setting, param, where: str) -> Setting:
    """The setting in mergekit's forms with every scalar checked by `param` (its Param, or None to
    check only the form); returns it with numeric strings read as numbers."""
    if isinstance(setting, SCALARS):
        value = _numeric_str(setting, param)
        if param is not None:
            param.coerce(value, where)
        return value
    if isinstance(setting, dict):
        extra = set(setting) - {"value", "filter"}
        if extra or "value" not in setting:
            raise MergepipeError(f"{where}: a conditional parameter is a mapping with 'value' and an optional "
                                 f"'filter' (got keys {', '.join(sorted(map(str, setting)))})")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise MergepipeError(f"{where}: filter must be a string (a part of tensor names)")
        value = check_setting(setting["value"], param, where)
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
            raise MergepipeError(f"{where}: a filter's value must be a scalar or a gradient list")
        return {"value": value, "filter": setting.get("filter")}
    if isinstance(setting, list):
        if all(isinstance(v, SCALARS) for v in setting):
            return [check_setting(v, param, f"{where}[{i}]") for i, v in enumerate(setting)]
        if all(isinstance(v, dict) for v in setting):
            return [check_setting(v, param, f"{where}[{i}]") for i, v in enumerate(setting)]
        raise MergepipeError(f"{where}: a list is either a gradient (numbers) or filter rules "
                             "({value, filter} mappings), not a mix")
    raise MergepipeError(f"{where}: expected a number, a gradient list or filter rules, got {type(setting).__name__}")


def evaluate(setting: Setting, tensor: str, t: float, param, where: str) -> Any:
    """The setting's value for `tensor` at position `t` in [0, 1], or None where it gives none (no
    filter matched, an empty list), as mergekit's evaluate_setting computes it."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, SCALARS):
        return param.coerce(setting, where)
    if not setting:
        return None
    if all(isinstance(v, SCALARS) for v in setting):
        values = [param.coerce(v, where) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return param.coerce((1 - frac) * values[i0] + frac * values[i1], where)
    for rule in setting:
        f = rule.get("filter")
        if f is None or f == "*" or (tensor and f in tensor):
            return evaluate(rule["value"], tensor, t, param, where)
    return None


def resolve(param, scopes: Iterable[dict | None], tensor: str, t: float, where: str) -> Any:
    """The first value the scopes (highest precedence first) give `param` for `tensor`, or None."""
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate(scope[param.name], tensor, t, param, where)
            if value is not None:
                return value
    return None


def is_uniform(setting: Setting) -> bool:
    """A plain scalar: the same value for every tensor."""
    return isinstance(setting, SCALARS)
