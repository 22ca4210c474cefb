"""Command-line generation through the `LLM` facade (a contract other scripts and tests rely on).

    python -m tokenflow_jax.generate --model tiny|PRESET|DIR (--prompt TEXT | --prompt-ids 1,2,3)
        --max-tokens N [--temperature T] [--top-p P] [--top-k K] [--seed S] [--ignore-eos]
        [--dtype float32|bfloat16] [--tensor-parallel-size N] [--json]
        [--coordinator-address HOST:PORT --num-processes N --process-id I]

Sampling flags left out take the checkpoint's `generation_config.json` values, else greedy. `--seed` seeds both
sampling and a preset's random weights. With `--json` exactly one JSON object
`{"token_ids": [...generated ids...], "text": "..."}` is printed; otherwise the text. Bad arguments, unknown
models and models that do not fit the device print one line on stderr and exit 2. Across processes (hosts), every
process runs the same command but for --process-id: process 0 prints the output, the others follow it silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokenflow_jax import distributed

if TYPE_CHECKING:
    from tokenflow_jax import LLM

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
    models = "model name (tiny, tiny-random, llama3-8b, ...), HF model folder or orbax folder (required)"
    parser.add_argument("--model", required=True, help=models)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument(
        "--prompt", help="prompt text, tokenized by the model's tokenizer (required: this or --prompt-ids)"
    )
    prompt.add_argument(
        "--prompt-ids", type=_prompt_ids, help="prompt token ids, e.g. 1,2,3 (required: this or --prompt)"
    )
    parser.add_argument("--max-tokens", type=int, required=True, help="tokens to generate at most (required)")
    from_checkpoint = "default: the checkpoint's generation_config.json, else"
    parser.add_argument("--temperature", type=float, help=f"0 is greedy ({from_checkpoint} 0)")
    parser.add_argument("--top-p", type=float, help=f"nucleus sampling mass ({from_checkpoint} 1: off)")
    parser.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens ({from_checkpoint} 0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed and a preset's weight seed (default: 0)")
    parser.add_argument("--ignore-eos", action="store_true", help="run to --max-tokens past EOS (default: stop)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weight and KV cache dtype (default: float32)")  # fmt: skip
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="split the model over this many devices (default: 1)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object {token_ids, text} (default: text)")
    distributed.add_arguments(parser)
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Range checks argparse cannot express, and the model name, before loading anything."""
    from checkpoints.presets import model_source

    if args.max_tokens < 1:
        raise _UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temperature is not None and not 0.0 <= args.temperature <= 100.0:
        raise _UsageError(f"--temperature must be in [0, 100], got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise _UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
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

    from tokenflow_jax import LLM

    try:
        distributed.initialize_from_args(args)
        # One request: compile only the shapes it uses instead of warming up every bucket.
        llm = LLM(args.model, dtype=args.dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
                  warmup=False)  # fmt: skip
    except ValueError as e:  # an unsupported checkpoint, a model the device cannot hold, heads N cannot split
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    if not llm.is_leader:
        llm.follow()
        distributed.shutdown()
        return 0
    try:
        _generate(llm, args)
    finally:
        llm.close()  # followers stop following
    distributed.shutdown()
    return 0


def _generate(llm: LLM, args: argparse.Namespace) -> None:
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    sampling = llm.generation.sampling_params(
        max_tokens=args.max_tokens,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        **{k: v for k, v in given.items() if v is not None},
    )
    prompt = args.prompt_ids if args.prompt_ids is not None else args.prompt
    (output,) = llm.generate([prompt], sampling)
    if args.json:
        print(json.dumps({"token_ids": [int(t) for t in output.token_ids], "text": output.text}))
    else:
        print(output.text)


if __name__ == "__main__":
    sys.exit(main())
