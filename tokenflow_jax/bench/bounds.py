"""The limit beside every figure: what no scheduler can beat on a workload, given the executor's step costs and
its memory.

For a workload (requests i with arrival a_i, prompt P_i, output L_i, reading rate r_i) on an executor whose
step costs

    a + b * batch_tokens + c * context_tokens + p * prefill_tokens + q * prefill_pairs      (`SimProfile`)

times a speed factor s (the smallest `slowdown` factor, or 1), with M = device pages x page size tokens of KV,
at most N sequences and T tokens per step, this module gives an upper bound on effective and token throughput
and a lower bound on every TTFT, hence on mean and P99 TTFT. `summarize` is what the bounds bound: duration
D = last token - first arrival t0; effective throughput = sum of token weights / D.

**Work of a set R of requests.** Every schedule computes, for each request, every prompt token and L - 1
output tokens at least once (recomputes, swaps and idle time only add). The step that yields output token k
holds the request's KV up to context P + k - 1, all of it in device pages of its own, so
- the b term is at least b * sum (P + L - 1);
- the c term is at least c * C(R) with C(R) = sum (L P + L (L - 1) / 2), the contexts of the token-yielding
  steps (earlier prefill chunks add context; that is only more);
- a prompt token at position t either sits in a chunk of n > 1 tokens starting at s <= t, costing p + q (s +
  n / 2) >= p + q (t + 1) / 2 per token, or is a chunk of its own whose context t + 1 the c term has not counted
  unless t = P - 1: the prompt costs at least X(P) = sum_{t < P - 1} min(p + q (t + 1) / 2, c (t + 1));
- the number of steps S is at least max L (one token per request per step), sum L / N (N sequences a step),
  sum (P + L - 1) / T (T tokens a step) and C(R) / M (one step's contexts fit the device pool), each rounded
  up; each step costs at least a.
So the steps serving R take at least W(R) = s (a S(R) + b sum (P + L - 1) + c C(R) + sum X(P)). The requests
that arrive at or after time u cannot be served before u, and steps run one at a time, so

    D >= D_min = max over arrival times u of (u - t0 + W({i : a_i >= u})).

**Token throughput** <= sum L / D_min.

**TTFT.** Request i's first token needs its whole prompt computed after its arrival: tau_i = s (a ceil(P / T) +
(b + c) P + X(P)). Among the k requests of one arrival time (a burst) the k-th first token needs the prompts of
k requests, at least the k smallest: the k-th smallest TTFT of the group is at least s (a max(ceil(sum P / T),
ceil(k / N)) + sum (b + c) P + X(P)) over its k shortest prompts. Matching sorted bounds to sorted TTFTs per
group gives a vector that the sorted TTFTs dominate element by element, so its mean and (linearly
interpolated, as `summarize` takes it) P99 are lower bounds of the run's.

**Effective throughput.** A token's weight is at most 1 and positive only while the unread buffer B_j =
(j - 1) - #{k < j : read_k <= g_j} is below 0.2 L. Reads come no faster than 1/r after the first token g_1, so
#{k < j : read_k <= g_j} <= r (g_j - g_1) + 1 and a weighted token j has j < 2 + 0.2 L + r (g_j - g_1). With
g_1 >= a_i + tau_i and g_j <= t0 + D, request i earns at most E_i(D) = min(L, max(0, 2 + 0.2 L + r (t0 + D -
a_i - tau_i))). A run of duration D >= D_min earns at most sum E_i(D) / D per second; that is piecewise of the
form alpha / D + beta, monotone between the breakpoints of the E_i, so its maximum over D >= D_min is at D_min
or at a breakpoint: the bound.

These are relaxations (swap and load traffic, memory for prefills, the policy's own time are free), so they
are true but not tight; they hold for any order, preemption or batching a policy picks. They assume every
prompt token is computed (no prefix cache) and that the run completes every request.

On the real engine there is no cost model: `engine_floor_costs` takes the shortest token-yielding step
observed (over every policy's run) as `a` and zero for the rest, a floor that every step of those runs met;
and since in each run at least half the steps took that run's median or longer, a run of S steps lasts at
least S / 2 x its median: half the smallest median floors the mean step of a whole run (`run_base_s`, which
bounds D from the first arrival only: the steps after a later arrival may be the short ones). A step's time
there runs from the start of the loop iteration that yields tokens to their time stamp; these intervals do
not overlap and lie between the first arrival and the last token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from tokenflow_jax.reader import TAU2_FRACTION
from tokenflow_jax.workloads import RequestSpec

P99 = 99


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """The executor's step cost model (seconds) and the limits every step obeys."""

    base_s: float  # a
    per_token_s: float  # b
    per_context_token_s: float  # c
    prefill_per_token_s: float  # p
    prefill_per_pair_s: float  # q
    device_tokens: int  # M: device pages x page size
    max_num_seqs: int  # N
    max_batch_tokens: int  # T
    speed: float = 1.0  # the smallest factor a step's cost is ever multiplied by
    # A floor on the mean of a whole run's steps, if higher than `base_s` (which floors every single step):
    # it bounds the run's duration from its first arrival, not the part after a later arrival.
    run_base_s: float | None = None

    @classmethod
    def of_executor(cls, executor) -> StepCosts:  # noqa: ANN001 (a SimExecutor; sim imports stay lazy)
        """The cost model a `SimExecutor` charges, with its pool and batch limits."""
        prof = executor.profile
        slowest_down = min((f for _, f in executor.slowdown), default=1.0)
        return cls(prof.step_base_s, prof.step_per_token_s, prof.step_per_context_token_s,
                   prof.prefill_per_token_s, prof.prefill_per_token_pair_s,
                   executor.num_device_pages * executor.page_size, executor.max_num_seqs,
                   executor.max_batch_tokens, min(1.0, slowest_down))  # fmt: skip


def engine_floor_costs(executor, step_seconds: Sequence[Sequence[float]]) -> StepCosts:  # noqa: ANN001
    """Floors for the real engine from each run's token-yielding steps (`step_seconds`, one list per run): every
    step took at least the shortest of all (`base_s`), and in each run at least half its steps took at least
    that run's median, so its steps average at least half the smallest median (`run_base_s`)."""
    runs = [sorted(r) for r in step_seconds if len(r)]
    if not runs:
        raise ValueError("no step was timed: the bound needs at least one token-yielding step")
    shortest = float(min(r[0] for r in runs))
    half_median = 0.5 * float(min(r[len(r) // 2] for r in runs))
    pool = executor.num_device_pages * executor.page_size
    return StepCosts(shortest, 0.0, 0.0, 0.0, 0.0, pool, executor.max_num_seqs, executor.max_batch_tokens,
                     run_base_s=max(shortest, half_median))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Bounds:
    effective_throughput: float  # tokens/s, upper bound
    output_throughput: float  # tokens/s, upper bound
    mean_ttft_s: float  # lower bound
    p99_ttft_s: float  # lower bound
    min_duration_s: float  # D_min

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def prompt_extra(prompt_len: np.ndarray, costs: StepCosts) -> np.ndarray:
    """X(P) = sum over positions t < P - 1 of min(p + q (t + 1) / 2, c (t + 1)), per prompt."""
    longest = int(prompt_len.max(initial=1))
    t1 = np.arange(1, longest, dtype=np.float64)  # t + 1 for t = 0 .. longest - 2
    per_token = np.minimum(costs.prefill_per_token_s + costs.prefill_per_pair_s * t1 / 2,
                           costs.per_context_token_s * t1)  # fmt: skip
    cumulative = np.concatenate([[0.0, 0.0], np.cumsum(per_token)])  # index P -> sum over t < P - 1
    return cumulative[np.clip(prompt_len, 0, longest)]


def min_duration(specs: Sequence[RequestSpec], costs: StepCosts) -> float:
    """D_min: seconds from the first arrival to the last token below which no schedule finishes `specs`."""
    order = sorted(specs, key=lambda s: s.arrival)
    arrival = np.array([s.arrival for s in order], dtype=np.float64)
    p = np.array([s.prompt_len for s in order], dtype=np.float64)
    out = np.array([s.output_len for s in order], dtype=np.float64)

    # Suffix sums over requests sorted by arrival: the set arriving at or after each arrival time.
    def suffix(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x[::-1])[::-1]

    tokens = suffix(p + out - 1)
    context = suffix(out * p + out * (out - 1) / 2)
    extra = suffix(prompt_extra(p.astype(np.int64), costs))
    steps = np.maximum.reduce([
        np.maximum.accumulate(out[::-1])[::-1],
        np.ceil(suffix(out) / costs.max_num_seqs),
        np.ceil(tokens / costs.max_batch_tokens),
        np.ceil(context / costs.device_tokens),
    ])  # fmt: skip
    rest = costs.per_token_s * tokens + costs.per_context_token_s * context + extra
    work = costs.speed * (costs.base_s * steps + rest)
    whole_run = costs.speed * ((costs.run_base_s or costs.base_s) * steps[0] + rest[0])
    return float(max(np.max(arrival - arrival[0] + work), whole_run))


def first_token_bounds(specs: Sequence[RequestSpec], costs: StepCosts) -> tuple[np.ndarray, np.ndarray]:
    """(tau_i per request in spec order, a vector the sorted TTFTs dominate element by element)."""
    p = np.array([s.prompt_len for s in specs], dtype=np.int64)
    work = (costs.per_token_s + costs.per_context_token_s) * p + prompt_extra(p, costs)
    tau = costs.speed * (costs.base_s * np.maximum(1, np.ceil(p / costs.max_batch_tokens)) + work)
    groups: dict[float, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(s.arrival, []).append(i)
    ranked = []
    for members in groups.values():
        idx = np.array(sorted(members, key=lambda i: p[i]))
        k = np.arange(1, idx.size + 1)
        steps = np.maximum(np.ceil(np.cumsum(p[idx]) / costs.max_batch_tokens), np.ceil(k / costs.max_num_seqs))
        ranked.append(costs.speed * (costs.base_s * np.maximum(steps, 1) + np.cumsum(work[idx])))
    return tau, np.sort(np.concatenate(ranked)) if ranked else np.zeros(0)


def max_effective_throughput(specs: Sequence[RequestSpec], tau: np.ndarray, d_min: float) -> float:
    """max over D >= d_min of sum_i E_i(D) / D (see the module docstring)."""
    t0 = min(s.arrival for s in specs)
    out = np.array([s.output_len for s in specs], dtype=np.float64)
    rate = np.array([s.rate for s in specs], dtype=np.float64)
    # E_i(D) = min(L, max(0, offset + r D)); offset = 2 + 0.2 L + r (t0 - a - tau).
    offset = 2 + TAU2_FRACTION * out + rate * (t0 - np.array([s.arrival for s in specs]) - tau)
    breaks = np.concatenate([-offset / rate, (out - offset) / rate])
    candidates = np.unique(np.concatenate([[d_min], breaks[breaks > d_min]]))
    if d_min <= 0:
        return math.inf
    best = 0.0
    for chunk in np.array_split(candidates, max(1, candidates.size // 256)):
        earned = np.minimum(out, np.maximum(0.0, offset[None, :] + rate[None, :] * chunk[:, None])).sum(axis=1)
        best = max(best, float(np.max(earned / chunk)))
    return best


def workload_bounds(specs: Sequence[RequestSpec], costs: StepCosts) -> Bounds:
    """Every bound of the module docstring for `specs` on an executor with `costs`."""
    if not specs:
        raise ValueError("no bound for an empty workload")
    d_min = min_duration(specs, costs)
    tau, ranked = first_token_bounds(specs, costs)
    total = sum(s.output_len for s in specs)
    return Bounds(
        effective_throughput=max_effective_throughput(specs, tau, d_min),
        output_throughput=total / d_min if d_min > 0 else math.inf,
        mean_ttft_s=float(np.mean(ranked)),
        p99_ttft_s=float(np.percentile(ranked, P99)),
        min_duration_s=d_min,
    )


def of_bound(summary: dict, bounds: Bounds) -> dict[str, float]:
    """A run as fractions of the bounds: effective and token throughput over their ceilings (<= 1), and the
    P99 and mean TTFT floors over the run's (<= 1; 1 is as fast as possible)."""

    def frac(a: float, b: float) -> float:
        return a / b if b and math.isfinite(b) else math.nan

    return {
        "effective_of_bound": frac(summary["effective_throughput"], bounds.effective_throughput),
        "output_of_bound": frac(summary["output_throughput"], bounds.output_throughput),
        "p99_ttft_of_bound": frac(bounds.p99_ttft_s, summary["p99_ttft_ms"] / 1e3),
        "mean_ttft_of_bound": frac(bounds.mean_ttft_s, summary["mean_ttft_ms"] / 1e3),
    }


def bench_bounds(
    executor,  # noqa: ANN001
    specs: Sequence[RequestSpec],
    step_seconds: Sequence[Sequence[float]],
) -> Bounds:
    """The bounds of one bench: the simulator's own cost model, or on the real engine the floors of the
    token-yielding steps of every run on it (`step_seconds`: one list per run, all policies and repeats)."""
    costs = StepCosts.of_executor(executor) if hasattr(executor, "profile") else engine_floor_costs(
        executor, step_seconds)  # fmt: skip
    return workload_bounds(specs, costs)


# The streams' stall under a TTFT cap (the mixed-traffic target: streams' rebuffer within 10% of their playback
# time while their P99 TTFT is at most fcfs's).
#
# **What is bounded.** A stream read at r from its first token g_1 reads token j at read_j = max(g_j, read_{j-1}
# + 1/r) (`metrics.read_times`); its rebuffer S is the sum of its stalls max(0, g_j - read_{j-1} - 1/r). The
# target's share is the completed streams' total rebuffer over their total playback, sum S_i / sum L_i / r_i
# (`stream_rebuffer_s` / `stream_playback_s` in `metrics.summarize`); the worst stream's share
# (`stream_max_rebuffer_share`) is at least that (a largest ratio is at least the ratio of the sums).
#
# **Lower bound for any schedule whose streams' P99 TTFT is at most T.** P99 is linearly interpolated over the
# n streams' sorted TTFTs, so entry floor(0.99 (n - 1)) is <= T: a set K of k = floor(0.99 (n - 1)) + 1 streams
# have g_1 <= a + T. The stall up to token j is g_j - g_1 - (j - 1)/r plus nothing negative, and it never
# shrinks; so if stream i has made N_i(t) < L_i tokens by time t (token N_i + 1 comes later),
#     S_i >= (d_i(t) - N_i(t)) / r_i  for i in K,  d_i(t) = min(L_i, r_i (t - a_i - T)),
# and also when N_i(t) = L_i (the right side is <= 0). What N_i(t) any schedule can reach, on the cost model
# of the module docstring, with S(t) token-yielding steps ended by t:
# - N_i(t) <= L_i, N_i is 0 until a_i and never falls, and N_i(t') - N_i(t) <= S(t') - S(t): a stream gets at
#   most one token a step;
# - the steps ended by t ran, one at a time, between the first arrival t0 and t: s (a S(t) + sum_i cost_i) <=
#   t - t0, where a stream's first N tokens cost at least b N + c Ctx(N), Ctx(N) = N P + N (N - 1) / 2 the
#   contexts of their steps, plus, for a started stream, its prompt: (b + c) P + X(P) - b - c P more (the
#   first token is the prefill; `first_token_bounds`);
# - one step's sequences and contexts fit: sum_i N_i(t) <= N S(t) and sum_i Ctx(N_i(t)) <= M S(t).
# - the steps ending in (t', t], but the first of them, ran inside it: s (a (S(t) - S(t') - 1) + b (sum_i N_i(t)
#   - N_i(t') - N)) <= t - t' (time left idle is not banked);
# - every stream, whatever its TTFT, waits for its tokens 2 .. L one step each after its first: S_i >= s ((L - 1)
#   (a + b) + c sum_{j=2..L} (P + j - 1)) - (L - 1) / r.
# The schedule picks K. Relaxing "i in K" to a weight w_i in [0, 1] with sum w_i >= k, each i's stall to z_i
# >= max(0, (w_i d_i(t) - N_i(t)) / r_i) at the points t of a grid, and the convex Ctx to the largest of a few
# tangents (below it), gives a linear program whose every constraint is implied by the schedule's; its least
# sum z_i is a lower bound on the streams' total rebuffer. Rate-less requests' work, swaps, loads and the
# policy's own time are left out (they only add), so it holds whatever a schedule does for the rate-less, as long as
# it completes every stream.


@dataclasses.dataclass(frozen=True)
class StallBound:
    stall_s: float  # lower bound on the streams' total rebuffer
    playback_s: float  # the streams' total playback, sum L / r

    @property
    def share(self) -> float:
        """The bound over the streams' playback: above 0.10, no schedule meets the 10% target at this TTFT."""
        return self.stall_s / self.playback_s if self.playback_s else 0.0


TANGENTS = 6  # points where Ctx(N) is linearised from below, per stream


def stream_stall_bound(
    specs: Sequence[RequestSpec], costs: StepCosts, p99_ttft_s: float, points: int = 48, span_s: float | None = None
) -> StallBound:
    """A lower bound on the streams' total rebuffer for any schedule of `specs` on `costs` whose streams' P99
    TTFT is at most `p99_ttft_s`: the linear program of the comment above `StallBound`, on `points` times. With
    `span_s`, only schedules that also make every token of every request, the rate-less ones included, within
    `span_s` of the first arrival (a token throughput of at least total tokens / `span_s`); infinite where none
    does."""
    from scipy import optimize, sparse  # (scipy comes with jax; imported here, the rest of the module needs none)

    streams = [x for x in specs if x.rate is not None]
    if not streams:
        return StallBound(0.0, 0.0)
    # Streams first (rows 0..n-1 of N and Q), then, with a span, the rate-less requests: their work shares the
    # steps, and they have no stall of their own.
    requests = streams + ([x for x in specs if x.rate is None] if span_s is not None else [])
    t0 = min(x.arrival for x in specs)
    arrival_all = np.array([x.arrival for x in requests]) - t0
    p_all = np.array([x.prompt_len for x in requests], dtype=np.int64)
    out_all = np.array([x.output_len for x in requests], dtype=np.float64)
    n, na, big_t = len(streams), len(requests), float(p99_ttft_s)
    arrival, p, out = arrival_all[:n], p_all[:n], out_all[:n]
    rate = np.array([x.rate for x in streams], dtype=np.float64)
    playback = float((out / rate).sum())
    k = math.floor(P99 / 100 * (n - 1)) + 1
    horizon = float((arrival + big_t + out / rate).max()) if span_s is None else float(span_s)
    t = np.linspace(0.0, horizon, points + 1)[1:]
    K = t.size
    s = costs.speed
    # What a started request's prompt costs beyond its first token's step share (`first_token_bounds`).
    prompt_more = s * ((costs.per_token_s + costs.per_context_token_s) * p_all + prompt_extra(p_all, costs)
                       - costs.per_token_s - costs.per_context_token_s * p_all)  # fmt: skip
    demand = np.minimum(out[:, None], rate[:, None] * (t[None, :] - arrival[:, None] - big_t))  # (n, K)

    # Variables: N (na, K), Q (na, K) >= Ctx(N), S (K), w (n), z (n).
    nN = na * K
    iN, iQ, iS, iw, iz = 0, nN, 2 * nN, 2 * nN + K, 2 * nN + K + n
    nvar = iz + n

    def ni(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return i * K + j

    rows, cols, vals, rhs = [], [], [], []
    row = 0

    def add(r_cols: list[np.ndarray], r_vals: list, b: np.ndarray, at: list | None = None) -> None:
        """Rows `b.size` more: term j puts r_vals[j] at columns r_cols[j] of the rows at[j] (default: one each)."""
        nonlocal row
        for j, (c, v) in enumerate(zip(r_cols, r_vals, strict=True)):
            local = np.arange(b.size).reshape(c.shape) if at is None or at[j] is None else at[j]
            rows.append(row + np.broadcast_to(local, c.shape).ravel())
            cols.append(c.ravel())
            vals.append(np.broadcast_to(v, c.shape).ravel().astype(np.float64))
        rhs.append(b.ravel().astype(np.float64))
        row += b.size

    ii, kk = np.meshgrid(np.arange(na), np.arange(K), indexing="ij")
    si, sk = ii[:n], kk[:n]  # the streams' rows
    # Stall: w_i d_i(t_k) - N_ik - r_i z_i <= 0 where d > 0.
    live = demand > 0
    li, lk = si[live], sk[live]
    add([iw + li, iN + ni(li, lk), iz + li], [demand[live], -1.0, -rate[li]], np.zeros(li.size))
    # Monotone and one token a step: N_{i,k-1} - N_ik <= 0; N_ik - N_{i,k-1} - S_k + S_{k-1} <= 0.
    mi, mk = ii[:, 1:].ravel(), kk[:, 1:].ravel()
    add([iN + ni(mi, mk - 1), iN + ni(mi, mk)], [1.0, -1.0], np.zeros(mi.size))
    add([iN + ni(mi, mk), iN + ni(mi, mk - 1), iS + mk, iS + mk - 1], [1.0, -1.0, -1.0, 1.0], np.zeros(mi.size))
    fi, fk = ii[:, 0], kk[:, 0]
    add([iN + ni(fi, fk), iS + fk], [1.0, -1.0], np.zeros(na))
    # Ctx(N) >= tangent at q: Ctx(q) + Ctx'(q) (N - q) <= Q.
    for frac in np.linspace(0.0, 1.0, TANGENTS):
        q = np.round(frac * out_all)
        slope = p_all + q - 0.5
        offset = p_all * q + q * (q - 1) / 2 - slope * q
        add([iN + ni(ii, kk), iQ + ni(ii, kk)], [slope[:, None] * np.ones((na, K)), -1.0],
            -np.broadcast_to(offset[:, None], (na, K)))  # fmt: skip
    # Time: s a S_k + sum_i (s b N_ik + s c Q_ik + w_i more_i [started by t_k]) <= t_k; at the span's end every
    # rate-less request has started too (its prompt paid).
    started = (t[None, :] >= arrival[:, None] + big_t).astype(np.float64)
    budget = t.copy()
    budget[-1] -= float(prompt_more[n:].sum())
    add([iS + kk[0], iN + ni(ii, kk), iQ + ni(ii, kk), iw + si],
        [np.full(K, s * costs.base_s), s * costs.per_token_s, s * costs.per_context_token_s,
         prompt_more[:n, None] * started], budget, at=[None, kk, kk, sk])  # fmt: skip
    # A step's sequences and contexts: sum_i N_ik - N S_k <= 0; sum_i Q_ik - M S_k <= 0.
    add([iN + ni(ii, kk), iS + kk[0]], [1.0, np.full(K, -float(costs.max_num_seqs))], np.zeros(K), at=[kk, None])
    add([iQ + ni(ii, kk), iS + kk[0]], [1.0, np.full(K, -float(costs.device_tokens))], np.zeros(K), at=[kk, None])
    # Steps ending in a slot, but its first, ran inside it: s (a (S_k - S_{k-1} - 1) + b (tokens - N)) <= t_k - t_{k-1}.
    dt = np.diff(t, prepend=0.0)
    add([iS + kk[0], iS + kk[0, 1:] - 1, iN + ni(ii, kk), iN + ni(ii[:, 1:], kk[:, 1:] - 1)],
        [np.full(K, s * costs.base_s), np.full(K - 1, -s * costs.base_s), s * costs.per_token_s,
         -s * costs.per_token_s], dt + s * (costs.base_s + costs.per_token_s * costs.max_num_seqs),
        at=[None, kk[0, 1:], kk, kk[:, 1:]])  # fmt: skip
    # K: sum w >= k.
    add([iw + np.arange(n)], [-1.0], np.array([-float(k)]), at=[np.zeros(n, dtype=np.int64)])

    a_ub = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(row, nvar))
    upper = np.full(nvar, np.inf)
    upper[iN:iQ] = np.where(t[None, :] > arrival_all[:, None], out_all[:, None], 0.0).ravel()
    upper[iw:iz] = 1.0
    lower = np.zeros(nvar)
    if span_s is not None:  # every request complete by the span's end
        lower[iN + K - 1 : iQ : K] = out_all
    # Every stream, alone: its tokens 2 .. L come a step apart, each step at least s (a + b + c context).
    lone = s * ((out - 1) * (costs.base_s + costs.per_token_s) + costs.per_context_token_s * (
        (out - 1) * p + out * (out - 1) / 2)) - (out - 1) / rate  # fmt: skip
    lower[iz:] = np.maximum(lone, 0.0)
    cost = np.zeros(nvar)
    cost[iz:] = 1.0
    res = optimize.linprog(cost, A_ub=a_ub, b_ub=np.concatenate(rhs), bounds=np.stack([lower, upper], 1),
                           method="highs")  # fmt: skip
    if res.status == 2:  # no schedule has this TTFT (within this span) at all: every stall bound holds vacuously
        return StallBound(math.inf, playback)
    if res.status != 0:
        raise RuntimeError(f"the stall bound's linear program did not solve: {res.message}")
    # The dual bound of HiGHS, slightly lowered for its tolerance, keeps the bound a bound.
    return StallBound(max(0.0, float(res.fun) * (1 - 1e-6) - 1e-6), playback)
