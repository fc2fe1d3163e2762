"""The `splitfuse router` subcommand: one OpenAI-compatible endpoint in front of several OpenAI servers.

    splitfuse router --backend http://10.0.0.1:8000 --backend http://10.0.0.2:8000 --routing cache-aware

The backends may be any OpenAI-compatible servers (splitfuse, vLLM, llama-server). The router
does not tokenize, so cache-aware routing matches prompt text in its approximate prefix tree.
The health and circuit-breaker flags are the fields of ``BackendConfig``, with their help text.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any
from urllib.parse import urlsplit

from splitfuse.config import ROUTING_POLICIES
from splitfuse.entrypoints.openai.cli_args import add_config_flags, config_kwargs
from splitfuse.entrypoints.openai.server_config import LOG_LEVELS, ServerConfig
from splitfuse.router.backends import BackendConfig


def add_router_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``splitfuse router --backend URL [--backend URL ...] [flags]``."""
    parser = subparsers.add_parser(
        "router", help="Route OpenAI requests across several OpenAI-compatible servers.",
        description="An OpenAI-compatible proxy (/v1/completions, /v1/chat/completions, /v1/models, /health, "
                    "/metrics) that sends each request to one backend, passes streams through as they come "
                    "and retries requests a backend could not take on another.")
    parser.add_argument("--backend", dest="backends", action="append", required=True, metavar="URL",
                        help="Base URL of an upstream server (http://host:port, without /v1); repeat for each.")
    parser.add_argument("--routing", choices=ROUTING_POLICIES, default="cache-aware",
                        help="How a backend is picked per request: round-robin, least-load (queues from each "
                             "backend's /metrics and the router's in-flight counts), cache-aware (the longest "
                             "prompt prefix already routed there, unless the loads are imbalanced) or session "
                             "(X-Session-ID header or the 'user' field keeps to one backend). (default: "
                             "cache-aware)")
    parser.add_argument("--host", default=ServerConfig.host, help="Address to listen on. (default: %(default)s)")
    parser.add_argument("--port", type=int, default=ServerConfig.port,
                        help="TCP port to listen on. (default: %(default)s)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=ServerConfig.log_level,
                        help="Log level. (default: %(default)s)")
    parser.add_argument("--access-log", action="store_true",
                        help="Log a line per request (off by default: at hundreds of requests a second the "
                             "log lines cost more of the router's time than routing).")
    add_config_flags(parser, BackendConfig, group_title="backends")
    parser.set_defaults(func=run_router)
    return parser


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--backend {url!r} is not an http(s)://host:port URL")
    if parts.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"--backend {url!r}: give the server's base URL, without /v1")
    return url


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from splitfuse.entrypoints.openai.server import GracefulServer
    from splitfuse.router.backends import BackendPool
    from splitfuse.router.policies import make_policy
    from splitfuse.router.server import build_router_app

    try:
        config = BackendConfig(**config_kwargs(args, (BackendConfig,), skip=()))
        pool = BackendPool([_check_url(url) for url in args.backends], config)
    except (ValueError, TypeError) as error:
        print(f"splitfuse router: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper() if args.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_router_app(pool, make_policy(args.routing))
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                                    access_log=args.access_log,
                                    timeout_graceful_shutdown=int(ServerConfig.shutdown_timeout_s))
    server = GracefulServer(uvicorn_config)
    server.run()
    return 0 if server.started else 1
