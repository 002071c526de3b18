"""Serve a bundle over HTTP.

    python -m serving --bundle PATH [--host 127.0.0.1] [--port 8000] [--workers 1]

Each worker process loads its own copy of the bundle. ``POST /admin/reload`` reaches the one worker that
takes the request, so with ``--workers`` above 1 roll out a new bundle by restarting instead.
"""

from __future__ import annotations

import argparse
import json
import os

import uvicorn

from recsys.bundle import BundleError
from serving.app import CONFIG_ENV, create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle directory")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its own bundle")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per request")
    parser.add_argument("--search-threads", type=int, default=1, help="FAISS OpenMP threads per request")
    parser.add_argument("--max-history", type=int, default=1000, help="longest history a request may send")
    parser.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask for")
    parser.add_argument("--max-batch", type=int, default=1024, help="most requests in one batch call")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    config = {
        "bundle_path": args.bundle,
        "max_history": args.max_history,
        "max_k": args.max_k,
        "max_batch": args.max_batch,
        "intra_op_threads": args.threads,
        "search_threads": args.search_threads,
    }
    server = {"host": args.host, "port": args.port, "log_level": args.log_level}
    if args.workers == 1:
        try:
            app = create_app(**config)
        except BundleError as error:
            parser.exit(2, f"error: {error}\n")
        uvicorn.run(app, **server)
    else:
        # Worker processes import the app by name, so its configuration travels in the environment.
        os.environ[CONFIG_ENV] = json.dumps(config)
        uvicorn.run("serving.app:app_from_env", factory=True, workers=args.workers, **server)


if __name__ == "__main__":
    main()
