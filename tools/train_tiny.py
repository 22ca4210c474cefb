"""Train the embedded `tiny` model: a byte-level Llama with `tiny-random`'s shapes, trained on the CPython
documentation every Python install ships (`pydoc_data.topics`), saved as an HF folder (safetensors, config,
generation config, tokenizer) that `LLM("tiny")` and transformers both load.

    pip install -e ".[train]" && python -m tools.train_tiny [--steps N] [--out checkpoints/tiny]

A few minutes on 2 CPU cores. The same machine, Python and package versions give the same weights. The model
function here is the dense (unpaged) form of `tokenflow_jax.model.forward`, sharing its RoPE and RMSNorm; the
engine's HF parity tests and the test of the embedded model check what is saved.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.hf import save_hf_model
from checkpoints.presets import EMBEDDED_MODELS
from tokenflow_jax.config import BYTE_BOS_ID, BYTE_EOS_ID, PRESETS
from tokenflow_jax.model import Params, apply_rope, init_params, rms_norm, rope_frequencies

CFG = PRESETS["tiny-random"]
BOS, EOS = "<s>", "</s>"
# The built-in chat format (`tokenflow_jax.tokenizer.builtin_chat_template`) as a jinja template, after the BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus() -> np.ndarray:
    """Every documentation topic as UTF-8 bytes, each followed by EOS, in a fixed order."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    parts = [np.frombuffer(topics[k].strip().encode("utf-8"), np.uint8).astype(np.int32) for k in sorted(topics)]
    return np.concatenate([np.append(p, BYTE_EOS_ID) for p in parts])


def forward(params: Params, tokens: jax.Array) -> jax.Array:
    """Logits [B, L, V] of causal sequences [B, L] starting at position 0."""
    cfg = CFG
    b, n = tokens.shape
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv_freq, scale = rope_frequencies(cfg)
    positions = jnp.arange(n)
    rope = jax.vmap(lambda x: apply_rope(x, positions, inv_freq, scale))
    causal = jnp.tril(jnp.ones((n, n), bool))
    x = params["embed"][tokens]
    for layer in params["layers"]:
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q = rope((h @ layer["wq"]).reshape(b, n, hq, hd))
        k = jnp.repeat(rope((h @ layer["wk"]).reshape(b, n, hkv, hd)), hq // hkv, axis=2)  # HF's repeat_kv
        v = jnp.repeat((h @ layer["wv"]).reshape(b, n, hkv, hd), hq // hkv, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, hq * hd) @ layer["wo"]
        h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps) @ params["lm_head"]


def loss_fn(params: Params, batch: jax.Array) -> jax.Array:
    logits = forward(params, batch[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


def batches(data: np.ndarray, batch: int, length: int, rng: np.random.Generator):
    """Windows of `length` bytes after BOS, each starting at a word (after a space or a new line)."""
    starts = np.flatnonzero((data[:-length] == ord(" ")) | (data[:-length] == ord("\n"))) + 1
    while True:
        picked = rng.choice(starts, batch)
        windows = data[picked[:, None] + np.arange(length)]
        yield np.concatenate([np.full((batch, 1), BYTE_BOS_ID, np.int32), windows], axis=1)


def train(steps: int, batch: int, length: int, lr: float, seed: int) -> tuple[Params, dict]:
    import optax

    data = corpus()
    split = int(len(data) * 0.97)
    train_data, val_data = data[:split], data[split:]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    params = init_params(CFG, jax.random.PRNGKey(seed))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    stream = batches(train_data, batch, length, rng)
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(next(stream)))
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.3f}  {time.perf_counter() - start:6.1f} s", flush=True)
    val = next(batches(val_data, 64, length, np.random.default_rng(seed + 1)))
    stats = {"train_s": time.perf_counter() - start, "val_loss": float(jax.jit(loss_fn)(params, jnp.asarray(val)))}
    return params, stats


def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of `tokenizers`' ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {b: chr(256 + i) for i, b in enumerate(extra)} | {b: chr(b) for b in printable}


def byte_tokenizer_json() -> str:
    """A `tokenizers` tokenizer whose ids are the UTF-8 bytes (0..255), BOS 256 and EOS 257: byte-level BPE
    with no merges, so it encodes exactly as `tokenflow_jax.tokenizer.ByteTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {char: byte for byte, char in byte_level_chars().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BYTE_BOS_ID)])
    assert (tok.token_to_id(BOS), tok.token_to_id(EOS)) == (BYTE_BOS_ID, BYTE_EOS_ID)
    return tok.to_str(pretty=True)


def save(params: Params, out: Path) -> None:
    save_hf_model(CFG, params, out)
    (out / "tokenizer.json").write_text(byte_tokenizer_json() + "\n")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CFG.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    generation = {"bos_token_id": BYTE_BOS_ID, "eos_token_id": BYTE_EOS_ID}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def greedy(params: Params, prompt: str, n: int) -> str:
    """`n` greedy bytes after `prompt`, on one fixed-length buffer (one compilation)."""
    ids = [BYTE_BOS_ID, *prompt.encode("utf-8")]
    buffer = np.zeros((1, len(ids) + n), np.int32)
    buffer[0, : len(ids)] = ids
    logits_of = jax.jit(forward)
    for i in range(len(ids), len(ids) + n):
        buffer[0, i] = int(jnp.argmax(logits_of(params, jnp.asarray(buffer))[0, i - 1]))
    return bytes(int(t) for t in buffer[0, 1:] if t < 256).decode("utf-8", errors="replace")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=EMBEDDED_MODELS["tiny"], help="the HF folder to write")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--length", type=int, default=256, help="bytes per sequence (after BOS)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batches")
    args = p.parse_args()
    params, stats = train(args.steps, args.batch, args.length, args.lr, args.seed)
    save(params, args.out)
    print(f"trained in {stats['train_s']:.0f} s, held-out loss {stats['val_loss']:.3f} nats/byte; saved {args.out}")
    print(repr(greedy(params, "The ", 80)))


if __name__ == "__main__":
    main()
