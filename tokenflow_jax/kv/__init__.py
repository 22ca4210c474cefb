"""Paged KV: page allocation on both tiers, the host tier and transfers."""
