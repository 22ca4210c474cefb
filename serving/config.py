"""Server settings (what `python -m serving` flags set beyond the engine's own sizing)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str  # the id clients send as "model" and /v1/models lists
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_queue: int = 256  # accepted and unfinished requests (waiting + running + paused) before 503
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1  # Retry-After of a 503 when the queue is full
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
