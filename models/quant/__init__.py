"""Int8 weights, per output channel or in a GGUF's blocks, swapped into a built model.

linear.py: the quantizer, `Int8Linear` and the swap (`quantize`, `swap_int8`); fusion.py:
layers that read one input run as one, and `prepare_int8`; screened.py: the LM head read
through an int8 screen; calibrate.py: GPTQ rounding at convert time. The kernels an
Int8Linear runs are models/kernels/backends.py's.
"""

from llm_shard.models.kernels.backends import (
    KERNELS,
    PREFERENCE,
    Kernel,
    Nibbles,
    choose_kernel,
    resolve_kernel,
)
from llm_shard.models.quant.fusion import (
    fuse_int8,
    fused_layers,
    fused_of,
    plan_serials,
    prepare_int8,
    w8a16_calls,
)
from llm_shard.models.quant.linear import (
    QMAX,
    Int8Linear,
    Predicate,
    int8_formats,
    int8_state_dict,
    keeps_dtype,
    plan_epoch,
    quantize,
    quantize_weight,
    swap_int8,
)
from llm_shard.models.quant.screened import ScreenedLinear, screen_head

__all__ = [
    "KERNELS", "PREFERENCE", "QMAX", "Int8Linear", "Kernel", "Nibbles", "Predicate",
    "ScreenedLinear", "choose_kernel", "fuse_int8", "fused_layers", "fused_of",
    "int8_formats", "int8_state_dict", "keeps_dtype", "plan_epoch", "plan_serials",
    "prepare_int8", "quantize", "quantize_weight", "resolve_kernel", "screen_head",
    "swap_int8", "w8a16_calls",
]
