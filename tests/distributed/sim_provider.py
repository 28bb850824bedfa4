"""A simulated LLM provider: a local HTTP server on 127.0.0.1 that answers 429 above a set
concurrency and rate, and records what it saw.

``GET /call?hold=S`` holds the request ``S`` seconds (the "API latency") and answers 200, or
answers 429 at once (with ``Retry-After``) when accepting it would put more than
``max_concurrency`` requests in flight or more than ``requests_per_minute`` accepted
requests in the last 60 s. Whatever it answers, it records every arrival: the peak number in
flight (this one included) and the peak number of arrivals in any 60 s, refused ones included.
A request leaves the in-flight count before its answer is written, so a client that waits
for the answer before letting another request go never looks concurrent to it.

The server runs on daemon threads and stops itself after ``max_life_s`` (a test that forgets
it cannot leave it running); ``with SimProvider(...) as provider:`` stops it at the end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

__all__ = ["SimProvider"]

WINDOW_S = 60.0


class SimProvider:
    """The simulated provider; read its counters while or after a sweep runs."""

    def __init__(
        self,
        *,
        max_concurrency: int | None = None,
        requests_per_minute: int | None = None,
        max_life_s: float = 600.0,
        port: int = 0,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.requests_per_minute = requests_per_minute
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak_concurrency = 0
        self.peak_per_minute = 0
        self.accepted = 0
        self.refused = 0
        self.arrivals: list[tuple[float, int, bool]] = []  # (monotonic, in flight, accepted)
        self._window: deque[float] = deque()  # arrivals in the last 60 s
        self._accepted_window: deque[float] = deque()  # accepted ones
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlparse(self.path).query)
                hold = float(query.get("hold", ["0"])[0])
                retry_after = provider._arrive()
                if retry_after is not None:
                    self._answer(429, b'{"error": "rate limited"}', retry_after)
                    return
                time.sleep(hold)
                provider._leave()
                self._answer(200, b'{"text": "ok"}')

            def _answer(self, code: int, body: bytes, retry_after: float | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if retry_after is not None:
                    self.send_header("Retry-After", f"{retry_after:.0f}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="sim-provider", daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(max_life_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def _arrive(self) -> float | None:
        """Record an arrival; None if accepted (now in flight), else Retry-After seconds."""
        with self._lock:
            now = time.monotonic()
            for window in (self._window, self._accepted_window):
                while window and window[0] <= now - WINDOW_S:
                    window.popleft()
            self._window.append(now)
            self.peak_per_minute = max(self.peak_per_minute, len(self._window))
            in_flight = self.in_flight + 1
            self.peak_concurrency = max(self.peak_concurrency, in_flight)
            over_concurrency = self.max_concurrency is not None and in_flight > self.max_concurrency
            over_rate = (
                self.requests_per_minute is not None
                and len(self._accepted_window) >= self.requests_per_minute
            )
            accepted = not (over_concurrency or over_rate)
            self.arrivals.append((now, in_flight, accepted))
            if not accepted:
                self.refused += 1
                if over_rate:
                    return max(1.0, self._accepted_window[0] + WINDOW_S - now)
                return 1.0
            self.in_flight = in_flight
            self.accepted += 1
            self._accepted_window.append(now)
            return None

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def peak_since(self, since: float) -> tuple[int, int]:
        """(peak in flight, peak arrivals in any 60 s window) among arrivals after the
        monotonic time ``since``."""
        with self._lock:
            arrivals = [item for item in self.arrivals if item[0] >= since]
        times = [item[0] for item in arrivals]
        peak_window = 0
        start = 0
        for end, moment in enumerate(times):
            while times[start] <= moment - WINDOW_S:
                start += 1
            peak_window = max(peak_window, end - start + 1)
        return max((item[1] for item in arrivals), default=0), peak_window

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> SimProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve a simulated provider until Ctrl-C, printing its counters every 10 s."""
    import argparse

    parser = argparse.ArgumentParser(
        description="A simulated LLM provider on 127.0.0.1 that answers 429 above its limits.",
        epilog="example: python tests/distributed/sim_provider.py --max-concurrency 5 "
        "--requests-per-minute 300",
    )
    parser.add_argument("--max-concurrency", type=int)
    parser.add_argument("--requests-per-minute", type=int)
    parser.add_argument("--max-life-s", type=float, default=3600.0)
    parser.add_argument("--port", type=int, default=8999)
    args = parser.parse_args(argv)
    provider = SimProvider(
        max_concurrency=args.max_concurrency,
        requests_per_minute=args.requests_per_minute,
        max_life_s=args.max_life_s,
        port=args.port,
    )
    print(f"simulated provider at {provider.url}", flush=True)
    try:
        while provider._thread.is_alive():
            time.sleep(10)
            print(
                f"accepted {provider.accepted}, refused {provider.refused}, peak concurrency "
                f"{provider.peak_concurrency}, peak per minute {provider.peak_per_minute}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    finally:
        provider.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
