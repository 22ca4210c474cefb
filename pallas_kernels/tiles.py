"""Tile sizes per kernel shape, from a small table that the kernel bench writes (`tiles.json` beside this file).

Each entry was measured (or, in the checked-in default, chosen) at one shape; a call takes the entry nearest
its own shape on a log scale. `PALLAS_TILES=path` reads another table, e.g. one the bench just wrote.
Decode entries are keyed by sequence-heads (batch x kv heads, the programs without a context split) and
context (block-table width x page size, the longest the call can see); prefill entries by tokens per call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

DEFAULT_TABLE = Path(__file__).with_name("tiles.json")


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    pages_per_block: int  # pages read per loop step
    num_splits: int  # context splits (flash-decoding); 1 = none
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    block_rows: int  # dot rows per query block: block_q tokens x the (padded) query group
    pages_per_block: int
    num_warps: int
    num_stages: int


def table_path() -> Path:
    return Path(os.environ.get("PALLAS_TILES") or DEFAULT_TABLE)


@functools.lru_cache(maxsize=4)
def read_table(path: Path) -> dict[str, Any]:
    with open(path) as f:
        table = json.load(f)
    for kernel in ("decode", "prefill"):
        if not table.get(kernel):
            raise ValueError(f"tile table {path} has no {kernel!r} entries")
    return table


def write_table(path: str | Path, table: dict[str, Any]) -> None:
    """The table as JSON with one entry per line, so a diff shows which shapes changed."""
    lines = ["{"]
    header = {k: v for k, v in table.items() if k not in ("decode", "prefill")}
    lines += [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()]
    for i, kernel in enumerate(("decode", "prefill")):
        entries = ",\n".join(f"  {json.dumps(e)}" for e in table[kernel])
        lines.append(f' "{kernel}": [\n{entries}\n ]' + ("," if i == 0 else ""))
    lines.append("}")
    Path(path).write_text("\n".join(lines) + "\n")


def nearest(entries: list[dict[str, Any]], **shape: int) -> dict[str, Any]:
    """The entry whose shape is closest to `shape`, summing |log2| ratios over the keys."""
    return min(entries, key=lambda e: sum(abs(math.log2(max(e[k], 1) / max(v, 1))) for k, v in shape.items()))


def decode_tiles(batch: int, num_kv_heads: int, max_pages: int, page_size: int) -> DecodeTiles:
    entry = nearest(
        read_table(table_path())["decode"], sequence_heads=batch * num_kv_heads, context=max_pages * page_size
    )
    return DecodeTiles(
        pages_per_block=max(1, entry["tokens_per_block"] // page_size),
        num_splits=entry["num_splits"],
        num_warps=entry["num_warps"],
        num_stages=entry["num_stages"],
    )


def prefill_tiles(num_tokens: int, page_size: int) -> PrefillTiles:
    entry = nearest(read_table(table_path())["prefill"], tokens=num_tokens)
    return PrefillTiles(
        block_rows=entry["block_rows"],
        pages_per_block=max(1, entry["tokens_per_block"] // page_size),
        num_warps=entry["num_warps"],
        num_stages=entry["num_stages"],
    )
