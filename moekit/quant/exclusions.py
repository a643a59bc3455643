"""Which modules a checkpoint's ``quantization_config`` keeps unquantized, and what that means for an MoE block's
routed experts (``MoE.from_pretrained`` asks before it builds the layer).

Each format names its exclusions its own way, matched here as its producer matches them:

    ignore                     compressed-tensors: a module name, or "re:<regex>" (``re.match``); the class name
                               "Linear" matches every expert linear
    config_groups.*.targets    compressed-tensors: what is quantized; a module no group targets is not ("Linear",
                               names, "re:" as above; another class name cannot be told from names: refused where
                               it would decide)
    modules_to_not_convert     transformers (fp8, mxfp4): a name matched from the start up to a module boundary,
                               as a regex with that boundary, or as a suffix (``should_convert_module``); AutoAWQ
                               (awq): a substring of the name, as AutoAWQ skips modules when quantizing
    ignored_layers             vLLM's fp8 spelling: a module name, or "re:<regex>"
    exclude_modules            ModelOpt (top level or under ``quantization``): shell wildcards (``fnmatch``)
    dynamic                    GPTQModel: "-:<regex>" (``re.match``) keeps a module unquantized; "+:<regex>" (or a
                               bare regex) overrides its bits / group_size / sym / desc_act: refused where it would
                               change the experts (one block's experts are one format)

The routed experts of a block are unquantized when the block's ``experts`` module or every expert linear in the
checkpoint is excluded; some excluded and some not is refused (one layer holds one format).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence

from moekit.quant.config import UnsupportedQuantization

# GPTQModel's per-module overrides that change how a module's tensors read.
_GPTQ_OVERRIDES = ("bits", "group_size", "sym", "desc_act")


def excluded(quantization_config: Mapping, name: str) -> str | None:
    """Why module ``name`` (a dotted module path, e.g. ``model.layers.3.mlp.experts.0.gate_proj``) is kept
    unquantized by ``quantization_config`` ("ignore: 're:.*mlp.experts.*'"), or None when it is quantized.

    Raises:
        UnsupportedQuantization: a rule that cannot be decided from the name (a compressed-tensors class-name
            target) or an override that changes the module's format (GPTQModel ``dynamic``), naming it.
    """
    qc = quantization_config
    awq = qc.get("quant_method") == "awq"
    for field, match in (("ignore", _ct_match), ("ignored_layers", _ct_match),
                         ("modules_to_not_convert", _substring if awq else _transformers_match)):
        for pattern in _patterns(qc, field):
            if match(name, pattern):
                return f"{field}: {pattern!r}"
    modelopt = qc.get("quantization") if isinstance(qc.get("quantization"), Mapping) else qc
    for pattern in _patterns(modelopt, "exclude_modules"):
        if fnmatch.fnmatchcase(name, pattern):
            return f"exclude_modules: {pattern!r}"
    if qc.get("quant_method") == "gptq":
        return _gptq_dynamic(qc, name)
    if qc.get("quant_method") == "compressed-tensors":
        return _ct_untargeted(qc, name)
    return None


def experts_excluded(quantization_config: Mapping, block: str, modules: Sequence[str]) -> bool:
    """Whether the routed experts of ``block`` (``model.layers.3.mlp``) are stored unquantized: its ``experts``
    module is excluded, or every one of ``modules`` (the expert modules the checkpoint holds under
    ``{block}.experts``, e.g. ``…experts.0.gate_proj``, or ``…experts`` itself for fused tensors) is.

    Raises:
        UnsupportedQuantization: some expert modules are excluded and others not, naming one of each; or as
            ``excluded``.
    """
    if excluded(quantization_config, f"{block}.experts") is not None:
        return True
    reasons = {m: excluded(quantization_config, m) for m in modules}
    kept = [m for m, why in reasons.items() if why is not None]
    if not kept:
        return False
    if len(kept) == len(reasons):
        return True
    quantized = next(m for m, why in reasons.items() if why is None)
    raise UnsupportedQuantization(
        f"quantization_config: {len(kept)} of the {len(reasons)} expert modules of {block!r} are kept unquantized "
        f"({kept[0]!r}, by {reasons[kept[0]]}) but {quantized!r} is quantized; a layer holds one format")


def _patterns(qc: Mapping, field: str) -> list[str]:
    value = qc.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
        raise UnsupportedQuantization(f"quantization_config.{field}: expected a list of module names, got {value!r}")
    return list(value)


def _ct_match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in (name, "Linear")


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
        for target in targets:
            if not isinstance(target, str):
                raise UnsupportedQuantization(f"quantization_config.config_groups.{group_name}.targets: expected "
                                              f"module names, got {target!r}")
            # Class names are CamelCase ("Linear", "Qwen3MoeSparseMoeBlock"); module names are not.
            if target.startswith("re:") or target == "Linear" or not target[:1].isupper():
                names.append(target)
            else:
                classes.append(target)
    if any(_ct_match(name, t) for t in names):
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
    for pattern, overrides in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return f"dynamic: {pattern!r}"
            continue
        if re.match(pattern.removeprefix("+:"), name) is None:
            continue
        changed = {k: v for k, v in (overrides or {}).items() if k in _GPTQ_OVERRIDES and v != qc.get(k)}
        if changed:
            raise UnsupportedQuantization(f"quantization_config.dynamic: {pattern!r} gives module {name!r} {changed} "
                                          "instead of the config's; per-module GPTQ formats are not supported")
    return None
