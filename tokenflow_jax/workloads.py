"""Request workloads: bursts, Poisson and gamma arrivals, multi-turn chat, and Azure trace replay.

Every generator is seeded through `numpy.random.default_rng(seed)` and returns `RequestSpec`s sorted by
arrival (seconds from the start of the run). Lengths come from `LengthDist` (normal, rounded, clipped) and
each request's consumption rate from `RateMix` (the paper's 20, 25, 30 tok/s or 40% at 15 / 60% at 20; "none" draws
rate-less requests, which state no rate).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

AZURE_CONV_2023 = Path(__file__).parent / "traces" / "azure_llm_2023_conv.csv"  # shipped: traces/README.md


@dataclass(frozen=True)
class RequestSpec:
    """One request to replay: when it arrives, how long its prompt and output are, how fast it is read.
    `segments`: the prompt as (content seed, length) pieces, which requests share (empty: its own content)."""

    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    rate: float | None  # None: states no rate (rate-less)
    segments: tuple[tuple[int, int], ...] = ()


def _parse_rate(text: str, spec: str) -> float | None:
    return None if text.lower() == "none" else _parse_number(text, "rate", spec)


def _parse_number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"malformed {what} {text!r} in spec {spec!r}: not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"malformed {what} {text!r} in spec {spec!r}: must be finite")
    return value


@dataclass(frozen=True)
class LengthDist:
    """Token lengths ~ Normal(mean, std), rounded and clipped to [1, max_len] (no upper bound if None)."""

    mean: float
    std: float = 0.0
    max_len: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and self.mean > 0):
            raise ValueError(f"length mean must be > 0, got {self.mean!r}")
        if not (math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"length std must be >= 0, got {self.std!r}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max length must be >= 1, got {self.max_len!r}")

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        """Parse "MEAN", "MEAN:STD" or "MEAN:STD:MAX", e.g. "512:128"."""
        parts = spec.strip().split(":")
        if not 1 <= len(parts) <= 3 or any(not p.strip() for p in parts):
            raise ValueError(f"malformed length spec {spec!r}: expected MEAN[:STD[:MAX]], e.g. '512:128'")
        mean = _parse_number(parts[0], "mean", spec)
        std = _parse_number(parts[1], "std", spec) if len(parts) > 1 else 0.0
        max_len = None
        if len(parts) == 3:
            max_value = _parse_number(parts[2], "max", spec)
            if max_value != int(max_value):
                raise ValueError(f"malformed max {parts[2]!r} in spec {spec!r}: must be an integer")
            max_len = int(max_value)
        try:
            return cls(mean, std, max_len)
        except ValueError as error:
            raise ValueError(f"bad length spec {spec!r}: {error}") from None

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n integer lengths."""
        values = np.rint(rng.normal(self.mean, self.std, size=n))
        upper = self.max_len if self.max_len is not None else np.inf
        return np.clip(values, 1, upper).astype(np.int64)

    def scaled(self, factor: float) -> LengthDist:
        """Same shape, scaled by `factor` (to fit the paper's lengths to a tiny CPU model)."""
        if not factor > 0:
            raise ValueError(f"length scale must be > 0, got {factor!r}")
        max_len = None if self.max_len is None else max(1, round(self.max_len * factor))
        return LengthDist(self.mean * factor, self.std * factor, max_len)


@dataclass(frozen=True)
class RateMix:
    """Consumption rates (tokens/s; None: rate-less) with their probabilities; each request draws one."""

    rates: tuple[float | None, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.rates or len(self.rates) != len(self.weights):
            raise ValueError("a rate mix needs one weight per rate and at least one rate")
        if any(r is not None and not (math.isfinite(r) and r > 0) for r in self.rates):
            raise ValueError(f"rates must be > 0 tokens/s, got {self.rates}")
        if any(not (math.isfinite(w) and w >= 0) for w in self.weights):
            raise ValueError(f"rate weights must be >= 0, got {self.weights}")
        if abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"rate weights must sum to 1 (within 1e-6), got {sum(self.weights)}")

    @classmethod
    def single(cls, rate: float | None) -> RateMix:
        return cls((None if rate is None else float(rate),), (1.0,))

    @classmethod
    def parse(cls, spec: str) -> RateMix:
        """Parse "20" (one rate) or "RATE:WEIGHT,..." e.g. "15:0.4,20:0.6"; RATE "none" is rate-less."""
        entries = [e.strip() for e in spec.strip().split(",")]
        if len(entries) == 1 and ":" not in entries[0]:
            try:
                return cls.single(_parse_rate(entries[0], spec))
            except ValueError as error:
                raise ValueError(f"bad rate spec {spec!r}: {error}") from None
        rates, weights = [], []
        for entry in entries:
            parts = entry.split(":")
            if len(parts) != 2:
                raise ValueError(
                    f"malformed rate entry {entry!r} in spec {spec!r}: expected RATE:WEIGHT, "
                    "e.g. '15:0.4,20:0.6', or a single rate like '20'"
                )
            rates.append(_parse_rate(parts[0], spec))
            weights.append(_parse_number(parts[1], "weight", spec))
        try:
            return cls(tuple(rates), tuple(weights))
        except ValueError as error:
            raise ValueError(f"bad rate spec {spec!r}: {error}") from None

    def sample(self, rng: np.random.Generator, n: int) -> list[float | None]:
        """n rates drawn with the mix's probabilities."""
        # Indices, then rates: the same draws as choosing from the rates themselves, and None stays None.
        picks = rng.choice(len(self.rates), size=n, p=np.asarray(self.weights))
        return [self.rates[i] for i in picks.tolist()]


# The paper's setups (input / output means); the spread (std = mean / 4) is our choice.
PAPER_LENGTHS: dict[str, tuple[LengthDist, LengthDist]] = {
    "short": (LengthDist(512, 128), LengthDist(1024, 256)),
    "long": (LengthDist(1024, 256), LengthDist(2048, 512)),
}
DEFAULT_PROMPT = PAPER_LENGTHS["short"][0]
DEFAULT_OUTPUT = PAPER_LENGTHS["short"][1]
DEFAULT_RATES = RateMix.single(20.0)

LengthLike = LengthDist | str
RateLike = RateMix | str | float


def paper_lengths(setup: str, scale: float = 1.0) -> tuple[LengthDist, LengthDist]:
    """(prompt, output) length distributions of the paper's "short" or "long" setup, scaled by `scale`."""
    if setup not in PAPER_LENGTHS:
        raise ValueError(f"unknown setup {setup!r}; expected one of {sorted(PAPER_LENGTHS)}")
    prompt, output = PAPER_LENGTHS[setup]
    return prompt.scaled(scale), output.scaled(scale)


def scale_lengths(
    specs: Iterable[RequestSpec], *, prompt_scale: float = 1.0, output_scale: float = 1.0
) -> list[RequestSpec]:
    """Specs with lengths scaled and rounded (at least 1 token), arrivals and rates unchanged."""
    if not (prompt_scale > 0 and output_scale > 0):
        raise ValueError(f"length scales must be > 0, got {prompt_scale!r}, {output_scale!r}")
    return [
        replace(
            s,
            prompt_len=max(1, round(s.prompt_len * prompt_scale)),
            output_len=max(1, round(s.output_len * output_scale)),
        )
        for s in specs
    ]


def _as_lengths(value: LengthLike) -> LengthDist:
    return LengthDist.parse(value) if isinstance(value, str) else value


def _as_rates(value: RateLike) -> RateMix:
    if isinstance(value, RateMix):
        return value
    return RateMix.parse(value) if isinstance(value, str) else RateMix.single(float(value))


def _check_count(n: int) -> None:
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")


def _assemble(
    arrivals: np.ndarray, rng: np.random.Generator, prompt: LengthLike, output: LengthLike, rates: RateLike
) -> list[RequestSpec]:
    n = arrivals.size
    # Draw order is fixed (arrivals, prompts, outputs, rates) so a seed always gives the same workload.
    prompt_lens = _as_lengths(prompt).sample(rng, n)
    output_lens = _as_lengths(output).sample(rng, n)
    request_rates = _as_rates(rates).sample(rng, n)
    return [
        RequestSpec(f"req-{i}", float(arrivals[i]), int(prompt_lens[i]), int(output_lens[i]), request_rates[i])
        for i in range(n)
    ]


def burst(
    n: int,
    *,
    prompt: LengthLike = DEFAULT_PROMPT,
    output: LengthLike = DEFAULT_OUTPUT,
    rates: RateLike = DEFAULT_RATES,
    seed: int = 0,
) -> list[RequestSpec]:
    """n requests all arriving at t = 0."""
    _check_count(n)
    rng = np.random.default_rng(seed)
    return _assemble(np.zeros(n), rng, prompt, output, rates)


def gamma(
    n: int,
    request_rate: float,
    burstiness: float = 1.0,
    *,
    prompt: LengthLike = DEFAULT_PROMPT,
    output: LengthLike = DEFAULT_OUTPUT,
    rates: RateLike = DEFAULT_RATES,
    seed: int = 0,
) -> list[RequestSpec]:
    """Gamma arrivals like vLLM's `--burstiness`: inter-arrivals ~ Gamma(k, 1/(rate k)), first at t = 0.

    burstiness k = 1 is Poisson; k < 1 is burstier (CV^2 = 1/k); request_rate = inf is a burst.
    """
    _check_count(n)
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 requests/s, got {request_rate!r}")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise ValueError(f"burstiness must be > 0, got {burstiness!r}")
    rng = np.random.default_rng(seed)
    if math.isinf(request_rate):
        arrivals = np.zeros(n)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=max(n - 1, 0))
        arrivals = np.concatenate([np.zeros(min(n, 1)), np.cumsum(gaps)])
    return _assemble(arrivals, rng, prompt, output, rates)


def poisson(
    n: int,
    request_rate: float,
    *,
    prompt: LengthLike = DEFAULT_PROMPT,
    output: LengthLike = DEFAULT_OUTPUT,
    rates: RateLike = DEFAULT_RATES,
    seed: int = 0,
) -> list[RequestSpec]:
    """Poisson arrivals at `request_rate` requests/s (exponential inter-arrivals), first at t = 0."""
    return gamma(n, request_rate, 1.0, prompt=prompt, output=output, rates=rates, seed=seed)


def chat(
    n: int, *, turns: int = 4, system_len: int = 64, think_s: float = 2.0, burst_size: int | None = None,
    burst_interval: float = 10.0, prompt: LengthLike = "32:8", output: LengthLike = DEFAULT_OUTPUT,
    rates: RateLike = DEFAULT_RATES, seed: int = 0,
) -> list[RequestSpec]:  # fmt: skip
    """n requests of conversations of `turns` turns that share a system prompt; each turn's prompt is the one
    before, its answer (`output` long; drawn content, not the model's own) and a new user message (`prompt`
    long). Conversations start in bursts of `burst_size` (None: all at once) and send a turn every `think_s`."""
    _check_count(n)
    if turns < 1 or system_len < 0 or think_s < 0 or (burst_size is not None and burst_size < 1):
        raise ValueError("chat needs turns >= 1, system_len >= 0, think_s >= 0 and burst_size >= 1")
    rng = np.random.default_rng(seed)
    conversations = -(-n // turns)
    users = _as_lengths(prompt).sample(rng, conversations * turns).reshape(conversations, turns)
    answers = _as_lengths(output).sample(rng, conversations * turns).reshape(conversations, turns)
    conv_rates = _as_rates(rates).sample(rng, conversations)
    specs = []
    for c in range(conversations):
        start = (c // burst_size) * burst_interval if burst_size else 0.0
        history: tuple[tuple[int, int], ...] = ((0, system_len),) if system_len else ()
        for k in range(turns):
            if len(specs) == n:
                break
            turn_id = 1 + 2 * (c * turns + k)  # content seeds: 0 the system prompt, odd a user's, even an answer's
            segments = (*history, (turn_id, int(users[c, k])))
            specs.append(RequestSpec(f"chat-{c}-{k}", start + k * think_s, sum(n for _, n in segments),
                                     int(answers[c, k]), float(conv_rates[c]), segments))  # fmt: skip
            history = (*segments, (turn_id + 1, int(answers[c, k])))
    return sorted(specs, key=lambda s: s.arrival)


_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*(Z|[+-]\d{2}:?\d{2})?$")


def parse_timestamp(text: str) -> tuple[int, float]:
    """(whole epoch seconds, fraction) of "2023-11-16 18:15:46.6805900" (any number of fraction digits).

    Kept as two parts so differences between timestamps keep sub-microsecond precision. Naive
    timestamps are taken as UTC; plain numbers are taken as seconds.
    """
    text = text.strip()
    match = _TIMESTAMP.match(text)
    if match is None:
        try:
            value = float(text)
        except ValueError:
            expected = "'YYYY-MM-DD HH:MM:SS.fffffff' or seconds"
            raise ValueError(f"unparseable timestamp {text!r}; expected {expected}") from None
        whole = math.floor(value)
        return whole, value - whole
    date, clock, digits, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    try:
        moment = datetime.fromisoformat(f"{date}T{clock}{zone}")
    except ValueError as error:
        raise ValueError(f"unparseable timestamp {text!r}: {error}") from None
    fraction = int(digits) / 10 ** len(digits) if digits else 0.0
    return int(moment.astimezone(UTC).timestamp()), fraction


TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def trace(
    path: str | Path,
    *,
    time_scale: float = 1.0,
    max_requests: int | None = None,
    start: int = 0,
    length_scale: float = 1.0,
    rates: RateLike = DEFAULT_RATES,
    seed: int = 0,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
) -> list[RequestSpec]:
    """Replay an Azure LLM trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).

    Rows are sorted by time; `start` rows are skipped and at most `max_requests` kept. Arrivals are
    seconds after the first kept row divided by `time_scale`, so time_scale=2 replays twice as fast
    (half the span). Lengths are multiplied by `length_scale`, rounded and clipped to [1, max_*_len].
    Rates are drawn from `rates` with `seed`. Request ids are "trace-<row index in file>".
    """
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    if not (math.isfinite(length_scale) and length_scale > 0):
        raise ValueError(f"length_scale must be > 0, got {length_scale!r}")
    if start < 0 or (max_requests is not None and max_requests < 0):
        raise ValueError(f"start and max_requests must be >= 0, got {start}, {max_requests}")
    rows = _read_trace_rows(Path(path))
    rows.sort(key=lambda row: row[1])
    stop = None if max_requests is None else start + max_requests
    rows = rows[start:stop]
    if not rows:
        return []
    first_whole, first_fraction = rows[0][1]
    arrivals = np.array(
        [((whole - first_whole) + (fraction - first_fraction)) / time_scale for _, (whole, fraction), _, _ in rows]
    )
    prompt_lens = _scaled_lengths([row[2] for row in rows], length_scale, max_prompt_len)
    output_lens = _scaled_lengths([row[3] for row in rows], length_scale, max_output_len)
    request_rates = _as_rates(rates).sample(np.random.default_rng(seed), len(rows))
    return [
        RequestSpec(f"trace-{row[0]}", float(arrivals[i]), int(prompt_lens[i]), int(output_lens[i]), request_rates[i])
        for i, row in enumerate(rows)
    ]


def _scaled_lengths(lengths: Sequence[int], scale: float, max_len: int | None) -> np.ndarray:
    values = np.rint(np.asarray(lengths, dtype=np.float64) * scale)
    return np.clip(values, 1, max_len if max_len is not None else np.inf).astype(np.int64)


def _read_trace_rows(path: Path) -> list[tuple[int, tuple[int, float], int, int]]:
    """(row index, timestamp, context tokens, generated tokens) for every data row."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"trace {path} lacks column(s) {missing}; found {header}")
        reader.fieldnames = header
        rows = []
        for index, row in enumerate(reader):
            line = index + 2  # 1-based, after the header
            try:
                stamp = parse_timestamp(row["TIMESTAMP"] or "")
                context, generated = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (TypeError, ValueError) as error:
                raise ValueError(f"trace {path} line {line}: {error}") from None
            if context < 0 or generated < 0:
                raise ValueError(f"trace {path} line {line}: token counts must be >= 0")
            rows.append((index, stamp, context, generated))
    return rows


def make_workload(
    kind: str,
    n: int | None = None,
    *,
    request_rate: float = 1.0,
    burstiness: float = 1.0,
    prompt: LengthLike = DEFAULT_PROMPT,
    output: LengthLike = DEFAULT_OUTPUT,
    rates: RateLike = DEFAULT_RATES,
    seed: int = 0,
    time_scale: float = 1.0,
    start: int = 0,
    length_scale: float = 1.0,
) -> list[RequestSpec]:
    """Dispatch on kind "burst", "poisson", "gamma", "chat" (`chat`'s defaults) or "trace:PATH" (n caps the
    trace's requests).

    `length_scale` multiplies prompt and output lengths for every kind.
    """
    if kind.startswith("trace:"):
        path = kind.removeprefix("trace:")
        if not path:
            raise ValueError("trace workload needs a path: 'trace:PATH'")
        return trace(
            path, time_scale=time_scale, max_requests=n, start=start, length_scale=length_scale, rates=rates, seed=seed
        )
    if kind not in ("burst", "poisson", "gamma", "chat"):
        raise ValueError(f"unknown workload kind {kind!r}; expected burst, poisson, gamma, chat or trace:PATH")
    if n is None:
        raise ValueError(f"workload {kind!r} needs a number of requests n")
    common = {
        "prompt": _as_lengths(prompt).scaled(length_scale),
        "output": _as_lengths(output).scaled(length_scale),
        "rates": rates,
        "seed": seed,
    }
    if kind == "burst":
        return burst(n, **common)
    if kind == "chat":
        return chat(n, **common)
    if kind == "poisson":
        return poisson(n, request_rate, **common)
    return gamma(n, request_rate, burstiness, **common)
