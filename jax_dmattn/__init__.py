"""jax_dmattn: flash dynamic-mask attention for JAX (trainable bias + sparse boolean mask, fused kernels)."""
from jax_dmattn import _ffi
from jax_dmattn.attention import attention, default_implementation
from jax_dmattn.masks import block_topk_mask, topk_mask
from jax_dmattn.reference import attention_reference

__version__ = "0.1.0"
__all__ = ["attention", "attention_reference", "block_topk_mask", "default_implementation", "topk_mask"]

_ffi.register_targets()
