"""transformers integration: the ``"moekit"`` experts implementation and whole-block conversion.

    import moekit.hf
    moekit.hf.register()                          # then: model.set_experts_implementation("moekit")
    n = moekit.hf.convert(model)                  # or: replace every sparse MoE block with a moekit.MoE
    moe = moekit.hf.moe_from_hf(block)            # one block, left in place

Needs ``pip install 'moekit[hf]'`` (transformers >= 5.0). ``import moekit`` alone never imports transformers.

Inside the package imports run one way: ``spec`` (what an experts module is), ``fp8`` (transformers' fp8 experts
in moekit's layout) <- ``experts`` (the registered implementation); ``spec``, ``fp8``, ``saving`` <- ``layouts``;
``layouts``, ``routers``, ``saving`` <- ``convert``.
"""

try:
    import transformers
except ImportError as err:  # an optional dependency: say which extra brings it
    raise ImportError("moekit.hf needs transformers >= 5.0: pip install 'moekit[hf]'") from err

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"moekit.hf needs transformers >= 5.0, found {transformers.__version__}: pip install 'moekit[hf]'"
    )

from moekit.hf.convert import SUPPORTED_BLOCKS, convert, moe_from_hf, supported_families  # noqa: E402
from moekit.hf.experts import experts_forward, register, weights_changed  # noqa: E402
from moekit.hf.spec import ExpertsSpec, experts_spec  # noqa: E402

__all__ = [
    "SUPPORTED_BLOCKS",
    "ExpertsSpec",
    "convert",
    "experts_forward",
    "experts_spec",
    "moe_from_hf",
    "register",
    "supported_families",
    "weights_changed",
]
