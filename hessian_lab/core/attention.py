"""Attention kernels that support the derivatives curvature needs, inside the library only.

PyTorch's fused attention has neither forward-mode AD nor double backward (torch 2.13, CPU):
``F.scaled_dot_product_attention`` picks a flash kernel, and ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer`` take a fused "fast path" in eval mode or under ``no_grad``
(``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``). Hugging Face models call
SDPA by default. :func:`differentiable_attention` routes both through the math implementation,
which is composed of differentiable operations, and restores the caller's settings on exit,
also when an exception is raised (DESIGN.md §6).

Cost: the math backend materializes the T×T attention matrix; on a GPU it is slower and needs
more memory than flash attention (docs/your_model.md has measured figures).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Use the math SDPA backend and switch the MHA fast path off, then restore both.

    The SDPA choice is scoped by ``sdpa_kernel`` (it restores the previous backends itself);
    the fast-path flag is global, so it is read before and written back in ``finally``.

    Example:
        >>> import torch
        >>> before = torch.backends.mha.get_fastpath_enabled()
        >>> with differentiable_attention():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> torch.backends.mha.get_fastpath_enabled() == before
        True
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
