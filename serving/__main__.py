"""Serve a bundle over HTTP.

    python -m serving --bundle PATH [--host 127.0.0.1] [--port 8000] [--workers 1]
    CADDIE_ADMIN_TOKEN=... python -m serving --bundle ROOT/v1 --admin --bundle-root ROOT

Each worker process loads its own copy of the bundle. The admin surface (``POST /admin/reload``) is off
unless ``--admin``; it then needs the token from ``$CADDIE_ADMIN_TOKEN`` or ``--admin-token-file`` and
loads bundles from ``--bundle-root`` only. A reload reaches the one worker that takes the request, so with
``--workers`` above 1 roll out a new bundle by restarting instead. Every limit and its reason:
docs/security.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from recsys.bundle import BundleError
from serving.app import (
    ADMIN_TOKEN_ENV,
    CONFIG_ENV,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_ITEMS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_K,
    create_app,
    read_admin_token,
)

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional: uvicorn[standard] brings it
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

# Open connections (keep-alive ones included) per worker before uvicorn answers 503 to everything,
# probes included: the last line of defence against a connection flood, well above the recommend
# limit so that one sheds load first.
DEFAULT_LIMIT_CONNECTIONS = 512
DEFAULT_TIMEOUT_KEEP_ALIVE = 5  # seconds an idle keep-alive connection is kept (uvicorn's default)
DEFAULT_MAX_HEADER_BYTES = 16 * 1024  # largest request head (request line and headers)
DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send a complete request head
# Worker processes are spawned, so the guard's timeout reaches them the way the app's config does.
HEADER_TIMEOUT_ENV = "CADDIE_HEADER_TIMEOUT"
TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class _SlowHeadGuard:
    """Mixin for uvicorn's HTTP protocols: a connection must send each request head in time.

    uvicorn times out a keep-alive connection only while it is silent: a connection that never sends a
    byte, or sends part of a request head and stops, stays open for good, and each one counts against
    ``--limit-connections`` (slowloris). Here a connection waiting for a request (after connecting, or
    after its previous response) is closed when no new request head is complete within
    ``$CADDIE_HEADER_TIMEOUT`` seconds.

    It relies on what both uvicorn protocols have: ``cycle`` (the current request, replaced by each new
    request head), ``loop`` and ``transport``; tests/test_http.py checks it on a real server.
    """

    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._head_timer: asyncio.TimerHandle | None = None
        self._wait_for_head()

    def _wait_for_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        waiting_since = self.cycle  # a new request head replaces it
        timeout = float(os.environ.get(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT))

        def expired() -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is waiting_since and idle and not self.transport.is_closing():
                self.transport.close()

        self._head_timer = self.loop.call_later(timeout, expired)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


class GuardedH11Protocol(_SlowHeadGuard, H11Protocol):
    """uvicorn's h11 protocol with :class:`_SlowHeadGuard`; h11 bounds the head's size itself
    (``h11_max_incomplete_event_size``, 400 beyond)."""


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_SlowHeadGuard, HttpToolsProtocol):
        """uvicorn's httptools protocol with :class:`_SlowHeadGuard` and a bound on the head's size.

        httptools buffers a request head of any size (BENCHMARKS.md, "Serving limits and hardening"),
        and uvicorn's ``h11_max_incomplete_event_size`` applies to h11 only; here a head still
        incomplete after more than that many bytes gets 431 and the connection is closed. The parser's
        callbacks say where a head begins and ends; a read that continues an open head and leaves it
        open is all head, and the read where a head begins is not counted (it may end the previous
        body), so a head is cut off within one socket read past the limit.
        """

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_open = False
            self._head_bytes = 0
            super().connection_made(transport)

        def on_message_begin(self) -> None:
            self._head_open, self._head_bytes = True, 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._head_open = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            continued = self._head_open
            super().data_received(data)
            if not (continued and self._head_open) or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > (self.config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES):
                self.transport.write(TOO_LARGE)
                self.transport.close()

else:
    GuardedHttpToolsProtocol = None  # type: ignore[assignment,misc]


def http_protocol(name: str) -> str:
    """The guarded protocol for ``--http`` (``auto``: httptools when installed, as uvicorn picks), named
    by import path: spawned worker processes import it, and this module runs as ``__main__``."""
    if name == "h11" or (name == "auto" and GuardedHttpToolsProtocol is None):
        return "serving.__main__:GuardedH11Protocol"
    if GuardedHttpToolsProtocol is None:
        raise SystemExit("error: --http httptools needs httptools (pip install 'uvicorn[standard]')")
    return "serving.__main__:GuardedHttpToolsProtocol"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # an operator sees every limit's default
    )
    parser.add_argument("--bundle", required=True, help="bundle directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its own bundle")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per request")
    parser.add_argument("--search-threads", type=int, default=1, help="FAISS OpenMP threads per request")

    limits = parser.add_argument_group("request limits (docs/security.md)")
    limits.add_argument("--max-history", type=int, default=DEFAULT_MAX_HISTORY, help="longest history")
    limits.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="largest k a request may ask for")
    limits.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="most requests per batch")
    limits.add_argument(
        "--max-batch-items",
        type=int,
        default=DEFAULT_MAX_BATCH_ITEMS,
        help="most history entries in one batch, all requests together",
    )
    limits.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body (413 beyond)"
    )
    limits.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULT_MAX_CONCURRENCY,
        help="recommend requests in progress per worker (503 + Retry-After beyond)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT,
        help="seconds a request body may take to arrive (408 beyond)",
    )
    limits.add_argument(
        "--limit-connections",
        type=int,
        default=DEFAULT_LIMIT_CONNECTIONS,
        help="open connections per worker before uvicorn answers 503 to all (uvicorn limit_concurrency)",
    )
    limits.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=DEFAULT_TIMEOUT_KEEP_ALIVE,
        help="seconds an idle keep-alive connection stays open",
    )
    limits.add_argument(
        "--max-header-bytes",
        type=int,
        default=DEFAULT_MAX_HEADER_BYTES,
        help="largest request head, request line and headers (431 beyond)",
    )
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT,
        help="seconds a connection has to send a complete request head (closed beyond)",
    )
    limits.add_argument(
        "--http", choices=["auto", "h11", "httptools"], default="auto", help="uvicorn HTTP implementation"
    )

    admin = parser.add_argument_group("admin surface (off by default)")
    admin.add_argument("--admin", action="store_true", help="mount POST /admin/reload")
    admin.add_argument(
        "--admin-token-file", help=f"file holding the admin token (without it: ${ADMIN_TOKEN_ENV})"
    )
    admin.add_argument("--bundle-root", help="the only directory reloads may load bundles from")

    parser.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        help="proxies whose X-Forwarded-* headers are trusted (comma-separated)",
    )
    parser.add_argument("--root-path", default="", help="path prefix a reverse proxy mounts the API under")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    for flag, value in [
        ("--limit-connections", args.limit_connections),
        ("--timeout-keep-alive", args.timeout_keep_alive),
        ("--max-header-bytes", args.max_header_bytes),
        ("--header-timeout", args.header_timeout),
    ]:
        if value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    token = None
    if args.admin:
        if args.bundle_root is None:
            parser.error("--admin needs --bundle-root")
        try:
            token = read_admin_token(args.admin_token_file)
        except (OSError, ValueError) as error:
            parser.error(str(error))
    elif args.admin_token_file or args.bundle_root:
        parser.error("--admin-token-file and --bundle-root configure the admin surface: add --admin")

    config = {
        "bundle_path": args.bundle,
        "max_history": args.max_history,
        "max_k": args.max_k,
        "max_batch": args.max_batch,
        "max_batch_items": args.max_batch_items,
        "intra_op_threads": args.threads,
        "search_threads": args.search_threads,
        "max_body_bytes": args.max_body_bytes,
        "max_concurrency": args.max_concurrency,
        "body_timeout": args.body_timeout,
    }
    if args.admin:
        config |= {"admin": True, "bundle_root": args.bundle_root}
    server = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "http": http_protocol(args.http),
        "limit_concurrency": args.limit_connections,
        "timeout_keep_alive": args.timeout_keep_alive,
        "h11_max_incomplete_event_size": args.max_header_bytes,
        "forwarded_allow_ips": args.forwarded_allow_ips,
        "root_path": args.root_path,
        "server_header": False,  # no "server: uvicorn": nothing to gain from naming the stack
    }
    os.environ[HEADER_TIMEOUT_ENV] = str(args.header_timeout)
    if args.workers == 1:
        try:
            app = create_app(**config, admin_token=token)
        except (BundleError, ValueError, OSError) as error:
            parser.exit(2, f"error: {error}\n")
        uvicorn.run(app, **server)
    else:
        # Worker processes import the app by name, so its configuration travels in the environment; the
        # token does not (each worker reads it from the same file or variable, see app_from_env).
        if args.admin and args.admin_token_file:
            config["admin_token_file"] = os.path.abspath(args.admin_token_file)
        os.environ[CONFIG_ENV] = json.dumps(config)
        uvicorn.run("serving.app:app_from_env", factory=True, workers=args.workers, **server)


if __name__ == "__main__":
    main()
