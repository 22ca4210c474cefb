"""Paged attention kernels (Pallas) and their plain-XLA references."""

from pallas_kernels.decode import paged_decode_attention
from pallas_kernels.prefill import paged_prefill_attention
from pallas_kernels.reference import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
    write_kv_pages,
)

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "write_kv_pages",
]
