"""`sampling.sample` against an independent numpy reference: the empirical distribution of many seeded draws
matches softmax(logits / T) restricted by top-k and top-p; tokens outside the allowed set never appear.

False-alarm rate: for N draws over K tokens, P(TV(empirical, true) >= eps) <= 2^K exp(-2 N eps^2)
(Bretagnolle-Huber-Carol). With K = 8, N = 20,000 and eps = 0.02 that is 256 e^-16 < 3e-5 per case, so a
correct sampler fails a case about once in 30,000 runs; a sampler that ignores T, top-k or top-p moves the
distribution by far more than eps (each case asserts the wrong distribution is > 3 eps away).

The same check runs on the logits a trained HF checkpoint gives (the embedded `tiny` model's folder, through
transformers' own forward pass): a 512-token vocabulary, peaked and flat next-token distributions. There K is
the allowed set's size (at most 16), N = 20,000 and eps = 0.025, so the bound is 2^16 e^-25 < 1e-6 per case.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflow_jax.sampling import sample

N_DRAWS = 20_000
EPS = 0.02
LOGITS = np.array([2.0, 1.5, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5])  # distinct: no ties at the top-k / top-p cut


def reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The sampling contract in plain numpy: scale by 1/T, keep the k largest, then the smallest prefix (by
    probability) whose mass reaches p, renormalise."""
    scaled = logits / temperature
    order = np.argsort(-scaled)
    keep = np.zeros(logits.size, dtype=bool)
    keep[order[: top_k or logits.size]] = True
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    sorted_probs = probs[order]
    mass_before = np.cumsum(sorted_probs) - sorted_probs
    in_nucleus = np.zeros(logits.size, dtype=bool)
    in_nucleus[order[mass_before < top_p]] = True
    probs = np.where(keep & in_nucleus, probs, 0.0)
    return probs / probs.sum()


def empirical(temperature: float, top_k: int, top_p: float, *, step: int = 0, logits: np.ndarray = LOGITS,
              n: int = N_DRAWS) -> np.ndarray:  # fmt: skip
    tokens = sample(
        jnp.asarray(np.tile(logits, (n, 1)), jnp.float32),
        jnp.full(n, temperature, jnp.float32),
        jnp.full(n, top_k, jnp.int32),
        jnp.full(n, top_p, jnp.float32),
        jnp.arange(n, dtype=jnp.int32),  # one seed per draw: independent keys
        jnp.full(n, step, jnp.int32),
    )
    return np.bincount(np.asarray(tokens), minlength=logits.size) / n


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


CASES = {
    "T=1": (1.0, 0, 1.0),
    "T=0.5": (0.5, 0, 1.0),
    "T=2": (2.0, 0, 1.0),
    "top_k=3": (1.0, 3, 1.0),
    "top_p=0.7": (1.0, 0, 0.7),
    "T=0.7 top_k=5 top_p=0.8": (0.7, 5, 0.8),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_draws_follow_the_restricted_softmax(case: str) -> None:
    temperature, top_k, top_p = CASES[case]
    want = reference(LOGITS, temperature, top_k, top_p)
    got = empirical(temperature, top_k, top_p)
    assert np.all(got[want == 0] == 0), f"tokens outside the allowed set drawn: {got[want == 0]}"
    assert total_variation(got, want) < EPS, (got, want)
    # The test can tell: the distribution with this knob ignored is far from what was drawn.
    ignored = [reference(LOGITS, 1.0, top_k, top_p), reference(LOGITS, temperature, 0, top_p),
               reference(LOGITS, temperature, top_k, 1.0)]  # fmt: skip
    for wrong in ignored:
        if total_variation(wrong, want) > 0:
            assert total_variation(wrong, want) > 3 * EPS


def test_temperature_zero_is_greedy_whatever_the_filters() -> None:
    got = empirical(0.0, 3, 0.5)
    assert got[int(np.argmax(LOGITS))] == 1.0


def test_a_seed_and_step_give_the_same_token_in_any_batch() -> None:
    n = 64
    logits = np.random.default_rng(0).normal(size=(n, 50)).astype(np.float32)

    def draw(rows: np.ndarray) -> np.ndarray:
        m = rows.size
        return np.asarray(sample(jnp.asarray(logits[rows]), jnp.full(m, 1.0), jnp.zeros(m, jnp.int32),
                                 jnp.ones(m), jnp.asarray(rows, jnp.int32), jnp.full(m, 7, jnp.int32)))  # fmt: skip

    alone = np.array([draw(np.array([i]))[0] for i in range(0, n, 8)])
    together = draw(np.arange(n))[::8]
    shuffled_rows = np.random.default_rng(1).permutation(n)
    shuffled = dict(zip(shuffled_rows.tolist(), draw(shuffled_rows).tolist(), strict=True))
    assert alone.tolist() == together.tolist() == [shuffled[i] for i in range(0, n, 8)]
    # Different seeds draw differently from the same logits.
    same = np.asarray(sample(jnp.asarray(np.tile(logits[0], (n, 1))), jnp.full(n, 1.0), jnp.zeros(n, jnp.int32),
                             jnp.ones(n), jnp.arange(n, dtype=jnp.int32), jnp.zeros(n, jnp.int32)))  # fmt: skip
    assert len(set(same.tolist())) > 10


def test_a_row_draws_the_same_token_whichever_filters_its_batch_runs() -> None:
    """A batch with no filter skips them, top-k alone takes `lax.top_k`, top-p (or a large top_k) one sort: the
    rows that ask for neither, or for top-k alone, draw the same tokens in all three."""
    n, vocab = 32, 300
    jit_sample = jax.jit(sample)  # one compilation for the four batches
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(n, vocab)) * 3, jnp.float32)
    top_k = np.where(np.arange(n) % 2 == 0, 0, 5).astype(np.int32)  # half plain, half top-k 5

    def draw(top_k: np.ndarray, top_p: np.ndarray) -> np.ndarray:
        return np.asarray(jit_sample(logits, jnp.ones(n), jnp.asarray(top_k), jnp.asarray(top_p, jnp.float32),
                                     jnp.arange(n, dtype=jnp.int32), jnp.full(n, 3, jnp.int32)))  # fmt: skip

    plain = draw(np.zeros(n, np.int32), np.ones(n))[::2]
    by_top_k = draw(top_k, np.ones(n))
    with_nucleus = draw(top_k, np.where(np.arange(n) == n - 1, 0.5, 1.0))  # one row asks for top-p
    with_large_k = draw(np.where(np.arange(n) == n - 1, 200, top_k), np.ones(n))  # one top_k past lax.top_k's
    assert by_top_k[::2].tolist() == plain.tolist() == with_nucleus[::2].tolist() == with_large_k[::2].tolist()
    assert by_top_k[1::2].tolist() == with_nucleus[1:-1:2].tolist() + [by_top_k[-1]]
    assert by_top_k[1::2].tolist() == with_large_k[1:-1:2].tolist() + [by_top_k[-1]]
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    assert all(t in top5[i] for i, t in enumerate(by_top_k) if i % 2)


TINY_HF_FOLDER = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
HF_DRAWS, HF_EPS = 20_000, 0.025
# (prompt, temperature, top_k, top_p): a flat and a peaked next-byte distribution; every knob moves one case.
HF_CASES = [("The module ", 1.0, 10, 1.0), ("def main(", 0.7, 0, 0.9), ("The module ", 1.3, 12, 0.8)]


def hf_next_token_logits(texts: list[str]) -> dict[str, np.ndarray]:
    """Next-token logits of the trained `tiny` HF folder, computed by transformers (not by our model code)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_HF_FOLDER).eval()
    out = {}
    for text in texts:
        ids = [model.config.bos_token_id, *text.encode("utf-8")]
        with torch.no_grad():
            out[text] = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    return out


def test_draws_on_an_hf_checkpoints_logits_follow_the_restricted_softmax() -> None:
    """All cases in one batch (per-row temperature, top-k and top-p), HF_DRAWS rows each."""
    logits = hf_next_token_logits(sorted({c[0] for c in HF_CASES}))
    n = HF_DRAWS
    rows = np.concatenate([np.tile(logits[text], (n, 1)) for text, *_ in HF_CASES])
    params = np.repeat(np.array([c[1:] for c in HF_CASES]), n, axis=0)
    tokens = np.asarray(sample(jnp.asarray(rows, jnp.float32), jnp.asarray(params[:, 0], jnp.float32),
                               jnp.asarray(params[:, 1], jnp.int32), jnp.asarray(params[:, 2], jnp.float32),
                               jnp.arange(len(rows), dtype=jnp.int32), jnp.zeros(len(rows), jnp.int32)))  # fmt: skip
    for i, (text, temperature, top_k, top_p) in enumerate(HF_CASES):
        lg = logits[text]
        want = reference(lg, temperature, top_k, top_p)
        assert 2 <= (want > 0).sum() <= 16  # the stated false-alarm bound holds for this K
        # float32 there and float64 here agree on the top-p cut: no prefix mass lies within 1e-4 of p.
        scaled = np.sort(lg / temperature)[::-1][: top_k or lg.size]
        probs = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
        assert top_p == 1.0 or np.min(np.abs(np.cumsum(probs) - probs - top_p)) > 1e-4
        got = np.bincount(tokens[i * n : (i + 1) * n], minlength=lg.size) / n
        outside = np.flatnonzero(got * (want == 0))
        assert outside.size == 0, f"{text!r}: drawn outside the allowed set: {outside}"
        assert total_variation(got, want) < HF_EPS, (text, np.round(got[want > 0], 3), np.round(want[want > 0], 3))
        knobs_ignored = [reference(lg, 1.0, top_k, top_p), reference(lg, temperature, 0, top_p),
                         reference(lg, temperature, top_k, 1.0)]  # fmt: skip
        assert max(total_variation(wrong, want) for wrong in knobs_ignored) > 3 * HF_EPS  # the case can tell
