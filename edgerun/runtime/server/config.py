"""Server settings: one frozen dataclass, validated once."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import OptionError


@dataclass(frozen=True)
class ServerConfig:
    """Limits and sizes of `edge-run serve`. The defaults suit a kiosk on a small board."""

    workers: int = 1  # threads running the models at once
    queue_size: int = 8  # requests waiting for a worker; beyond it: 503 with Retry-After
    timeout_s: float = 30.0  # per request, queueing included; beyond it: 504
    max_upload_bytes: int = 10 * 1024 * 1024  # request body; beyond it: 413
    max_pixels: int = 40_000_000  # width x height read from the image header, before decoding; beyond: 413
    threads: int | None = None  # onnxruntime threads per session (None: all cores)
    token: str | None = None  # bearer token required on /v1/* (health excepted) when set
    max_num_beams: int = 8  # per-request decoding limits, so one request cannot hold a worker for long
    max_new_tokens: int = 64
    max_k: int = 50  # search results per request
    handle_sighup: bool = False  # reload on SIGHUP (the CLI sets it; needs the main thread)

    def __post_init__(self):
        for name in ("workers", "max_upload_bytes", "max_pixels", "max_num_beams", "max_new_tokens", "max_k"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int) or self.queue_size < 0:
            raise OptionError(f"queue_size must be an integer >= 0, got {self.queue_size!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise OptionError(f"timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")
        if self.threads is not None:
            _positive_int("threads", self.threads)
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 8):
            raise OptionError("token must be a string of at least 8 characters")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}")
