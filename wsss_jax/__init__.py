"""wsss_jax: weakly-supervised semantic segmentation in JAX/Flax."""

# First, before any thread allocates: see the module's docstring.
from wsss_jax.host import allocator as _allocator

_allocator.keep_freed_memory()

__version__ = '0.1.0'
