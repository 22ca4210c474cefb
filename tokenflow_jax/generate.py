"""Command-line generation through the `LLM` facade (a contract other scripts and tests rely on).

    python -m tokenflow_jax.generate --model tiny|PRESET|DIR (--prompt TEXT | --prompt-ids 1,2,3)
        --max-tokens N [--temperature T] [--top-p P] [--top-k K] [--seed S]
        [--dtype float32|bfloat16] [--json]

`--seed` seeds both sampling and a preset's random weights. With `--json` exactly one JSON object
`{"token_ids": [...generated ids...], "text": "..."}` is printed; otherwise the text. Bad arguments and
unknown models print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

USAGE_ERROR = 2


class _UsageError(Exception):
    pass


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tokenflow_jax.generate", description="Generate text.")
    parser.add_argument("--model", required=True, help="preset name, HF model folder or orbax folder")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    prompt.add_argument("--prompt-ids", type=_prompt_ids, help="prompt token ids, e.g. 1,2,3")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON object {token_ids, text}")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Range checks argparse cannot express, and the model name, before loading anything."""
    from checkpoints.presets import model_source

    if args.max_tokens < 1:
        raise _UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 0.0 <= args.temperature <= 100.0:
        raise _UsageError(f"--temperature must be in [0, 100], got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise _UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise _UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if args.seed < 0:
        raise _UsageError(f"--seed must be >= 0, got {args.seed}")
    try:
        model_source(args.model)
    except ValueError as e:
        raise _UsageError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _validate(args)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR

    from tokenflow_jax import LLM, SamplingParams

    sampling = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    # One request: compile only the shapes it uses instead of warming up every bucket.
    llm = LLM(args.model, dtype=args.dtype, seed=args.seed, warmup=False)
    prompt = args.prompt_ids if args.prompt_ids is not None else args.prompt
    (output,) = llm.generate([prompt], sampling)
    if args.json:
        print(json.dumps({"token_ids": [int(t) for t in output.token_ids], "text": output.text}))
    else:
        print(output.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
