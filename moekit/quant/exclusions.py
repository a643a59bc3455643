"""Which modules a checkpoint's ``quantization_config`` keeps unquantized, and what that means for an MoE block's
routed experts (``MoE.from_pretrained`` asks before it builds the layer).

Each format names its exclusions its own way, matched here as its producer (or vLLM, its reader) matches them:

    ignore                     compressed-tensors: a linear's name, or "re:<regex>" (``re.match``); the class name
                               "Linear" matches every linear. Names linears only: the experts container is
                               not matched. ModelOpt's config.json ("quant_method": "modelopt"): wildcards
    config_groups.*.targets    compressed-tensors: what is quantized; a linear no group targets is not ("Linear",
                               names, "re:" as above; another class name cannot be told from names: refused where
                               it would decide)
    modules_to_not_convert     transformers (fp8, mxfp4): a name matched from the start up to a module boundary,
                               as a regex with that boundary, or as a suffix (``should_convert_module``); awq: a
                               substring of the name, as vLLM reads AutoAWQ's list
    ignored_layers             vLLM's fp8 spelling: a module name, or "re:<regex>"
    exclude_modules            ModelOpt's hf_quant_config.json (top level or under ``quantization``): shell
                               wildcards (``fnmatch``)
    dynamic                    GPTQModel: the first pattern that matches decides (``re.match``): "-:<regex>"
                               keeps the module unquantized; "+:<regex>" (or a bare regex) overrides its bits /
                               group_size / sym / desc_act, refused where it changes them (one block's experts
                               are one format)

The routed experts of a block are unquantized when every expert linear in the checkpoint is excluded (or, for
fused expert tensors, the ``experts`` module is); some excluded and some not is refused (one layer holds one
format). ``MoE.from_pretrained`` then checks the checkpoint agrees: excluded experts must be stored as floats.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

from moekit.quant.config import UnsupportedQuantization

# GPTQModel's per-module overrides that change how a module's tensors read, with GPTQ's defaults.
_GPTQ_OVERRIDES = {"bits": None, "group_size": None, "sym": True, "desc_act": False}


def excluded(quantization_config: Mapping, name: str, *, linear: bool = True) -> str | None:
    """Why module ``name`` (a dotted module path, e.g. ``model.layers.3.mlp.experts.0.gate_proj``) is kept
    unquantized by ``quantization_config`` ("ignore: 're:.*mlp.experts.*'"), or None when it is quantized.
    ``linear``: whether ``name`` is a linear (compressed-tensors' ``ignore`` and ``targets`` match linears only).

    Raises:
        UnsupportedQuantization: a field of the wrong type or a bad regex (named); a rule that cannot be decided
            from the name (a compressed-tensors class-name target); an override that changes the module's format
            (GPTQModel ``dynamic``).
    """
    qc = quantization_config
    method = qc.get("quant_method")
    ignore_match = _wildcard if method == "modelopt" else _ct_match
    rules = [("ignored_layers", _name_match),
             ("modules_to_not_convert", _substring if method == "awq" else _transformers_match)]
    if linear or method == "modelopt":
        rules.insert(0, ("ignore", ignore_match))
    for field, match in rules:
        for pattern in _patterns(qc, field):
            if _safe(match, name, pattern, field):
                return f"{field}: {pattern!r}"
    nested = qc.get("quantization")
    for where, fields in (("", qc), ("quantization.", nested if isinstance(nested, Mapping) else {})):
        for pattern in _patterns(fields, "exclude_modules", where):
            if fnmatch.fnmatchcase(name, pattern):
                return f"{where}exclude_modules: {pattern!r}"
    if method == "gptq":
        return _gptq_dynamic(qc, name)
    if method == "compressed-tensors" and linear:
        return _ct_untargeted(qc, name)
    return None


def experts_excluded(quantization_config: Mapping, block: str, modules: Sequence[str]) -> str | None:
    """Why the routed experts of ``block`` (``model.layers.3.mlp``) are stored unquantized, or None: every one of
    ``modules`` (the expert modules the checkpoint holds under ``{block}.experts``: ``…experts.0.gate_proj``,
    or ``…experts`` itself for fused tensors) is excluded, or the ``experts`` module is by a rule that names
    containers (not compressed-tensors' ``ignore``/``targets``, which name linears).

    Raises:
        UnsupportedQuantization: some expert modules are excluded and others not, naming one of each; or as
            ``excluded``.
    """
    container = f"{block}.experts"
    why = excluded(quantization_config, container, linear=list(modules) == [container])
    if why is not None:
        return f"{container!r} by {why}"
    reasons = {m: excluded(quantization_config, m, linear=m != container) for m in modules}
    kept = [m for m, why in reasons.items() if why is not None]
    if not kept:
        return None
    if len(kept) == len(reasons):
        return f"every expert linear ({kept[0]!r} by {reasons[kept[0]]}, ...)"
    quantized = next(m for m, why in reasons.items() if why is None)
    raise UnsupportedQuantization(
        f"quantization_config: {len(kept)} of the {len(reasons)} expert modules of {block!r} are kept unquantized "
        f"({kept[0]!r}, by {reasons[kept[0]]}) but {quantized!r} is quantized; a layer holds one format")


def _patterns(qc: Mapping, field: str, where: str = "") -> list[str]:
    value = qc.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise UnsupportedQuantization(f"quantization_config.{where}{field}: expected a list of module names, got "
                                      f"{value!r}")
    return list(value)


def _safe(match, name: str, pattern: str, field: str) -> bool:
    try:
        return match(name, pattern)
    except re.error as err:
        raise UnsupportedQuantization(f"quantization_config.{field}: {pattern!r} is not a valid regex ({err})") from None


def _name_match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def _ct_match(name: str, pattern: str) -> bool:
    return pattern == "Linear" or _name_match(name, pattern)


def _wildcard(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def _substring(name: str, pattern: str) -> bool:
    return pattern in name


def _transformers_match(name: str, pattern: str) -> bool:
    # From the start up to a module boundary ("layers.1" is not "layers.11"), as a regex with that boundary, or as
    # a suffix.
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return re.match(rf"(?:{pattern}){boundary}", name) is not None or name.endswith(pattern)


def _ct_untargeted(qc: Mapping, name: str) -> str | None:
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping):
        return None  # get_quant_method refuses such a config
    names, classes = [], []
    for group_name, group in groups.items():
        targets = group.get("targets", ["Linear"]) if isinstance(group, Mapping) else ["Linear"]
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise UnsupportedQuantization(f"quantization_config.config_groups.{group_name}.targets: expected a list "
                                          f"of module names, got {targets!r}")
        for target in targets:
            # Class names are CamelCase ("Linear", "Qwen3MoeSparseMoeBlock"); module names are not.
            if target.startswith("re:") or target == "Linear" or not target[:1].isupper():
                names.append(target)
            else:
                classes.append(target)
    if any(_safe(_ct_match, name, t, "config_groups.targets") for t in names):
        return None
    if classes:
        raise UnsupportedQuantization(f"quantization_config.config_groups: targets {classes} are class names, which "
                                      f"say nothing about module {name!r} from its name; moekit cannot tell whether "
                                      "it is quantized")
    return f"config_groups: no group targets it ({names})"


def _gptq_dynamic(qc: Mapping, name: str) -> str | None:
    dynamic = qc.get("dynamic")
    if dynamic is None:
        return None
    if not isinstance(dynamic, Mapping):
        raise UnsupportedQuantization(f"quantization_config.dynamic: expected an object of patterns, got {dynamic!r}")
    for pattern, overrides in dynamic.items():  # the first match decides, as GPTQModel and vLLM read it
        regex = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        if not _safe(lambda n, p: re.match(p, n) is not None, name, regex, "dynamic"):
            continue
        if pattern.startswith("-:"):
            return f"dynamic: {pattern!r}"
        if not isinstance(overrides, Mapping):
            raise UnsupportedQuantization(f"quantization_config.dynamic.{pattern}: expected an object of overrides, "
                                          f"got {overrides!r}")
        changed = {k: v for k, v in overrides.items()
                   if k in _GPTQ_OVERRIDES and v != qc.get(k, _GPTQ_OVERRIDES[k])}
        if changed:
            raise UnsupportedQuantization(f"quantization_config.dynamic: {pattern!r} gives module {name!r} {changed} "
                                          "instead of the config's; per-module GPTQ formats are not supported")
        return None
    return None
