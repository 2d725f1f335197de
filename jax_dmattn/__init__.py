"""jax_dmattn: flash dynamic-mask attention for JAX (trainable bias + sparse boolean mask, fused kernels)."""
import pkgutil

# Run from a source checkout (e.g. `python -m jax_dmattn` in the repo root), this package shadows the installed
# one, which alone holds the compiled extension: let submodule imports also search installed copies.
__path__ = pkgutil.extend_path(__path__, __name__)

from jax_dmattn import _ffi  # noqa: E402
from jax_dmattn.attention import attention, default_implementation  # noqa: E402
from jax_dmattn.masks import KeyIndices, TopKMask, block_topk_mask, topk_mask  # noqa: E402
from jax_dmattn.reference import attention_reference  # noqa: E402
from jax_dmattn import context_parallel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KeyIndices", "TopKMask", "attention", "attention_reference", "block_topk_mask", "context_parallel",
           "default_implementation", "topk_mask"]

_ffi.register_targets()
