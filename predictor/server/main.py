"""`python -m predictor` / `qwen-vl-predictor`: parse flags, load the model, serve it.

Order matters: the model loads and warms up before the server starts listening, so that
`/v2/models/{name}/ready` can never say ready before the first real generation could run.
(A Kubernetes startup probe covers the load time.)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from predictor.errors import StartupError
from predictor.server.request_limits import raise_grpc_message_limits, request_bytes_limit
from predictor.settings import Settings, build_parser

if TYPE_CHECKING:
    from predictor.engine.client import FrontLink

logger = logging.getLogger("predictor")

GIL_SWITCH_INTERVAL_S = 0.001


def _configure_logging(front: int = 0) -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        where = f" [front {front}]" if front else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def use_event_loop(choice: str) -> None:
    """Apply KServe's `--event-loop` (auto: uvloop when installed) to the loop the server runs
    on. KServe passes it to uvicorn but then starts its servers with `asyncio.run`, which
    makes a default asyncio loop whatever the flag says; a policy set first is honoured."""
    if choice == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise StartupError("--event-loop uvloop, but uvloop is not installed") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # KServe configures `asyncio.get_event_loop()` before `asyncio.run`; give it one to find.
    asyncio.set_event_loop(asyncio.new_event_loop())
    logger.info("event loop: uvloop")


def argument_parser() -> argparse.ArgumentParser:
    """KServe's flags and ours: what `python -m predictor --help` lists (and
    docs/configuration.md documents, from this same parser)."""
    # Imported here: KServe parses sys.argv when its model_server module is imported.
    from kserve import model_server as kserve_server

    parser = build_parser(parents=[kserve_server.parser])
    # KServe logs three lines per request when on (two from a timing middleware that also
    # reads the process's CPU time twice a request); the predictor's own line per request
    # already has its id, decode and generate times, and uvicorn's access log its status.
    parser.set_defaults(enable_latency_logging=False)
    return parser


def main(argv: Sequence[str] | None = None, link: FrontLink | None = None) -> None:
    """Serve: front 0 (what `python -m predictor` runs) starts the engine core and, with
    `--workers N`, the other fronts, which call this with the `link` to that core."""
    from kserve import ModelServer
    from kserve import model_server as kserve_server

    from predictor.inputs.addresses import AddressPolicy
    from predictor.inputs.image_urls import RemotePolicy
    from predictor.model import QwenVLModel
    from predictor.openai.router import register_openai_routes
    from predictor.openai.serving import ChatService
    from predictor.server import fronts, kserve_servers
    from predictor.server.drain import Drain
    from predictor.server.fail_fast import FailFast
    from predictor.server.kserve_servers import harden
    from predictor.server.openapi import install_openapi
    from predictor.server.rest import register_config_routes, register_infer_routes
    from predictor.ui.routes import page_config, register_ui_routes

    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers > 1 and not settings.engine_process:
        parser.error("--workers above 1 needs --engine_process true: one process owns the model")
    if args.workers > 1 and link is None:
        fronts.multiprocess_metrics_dir(sys.argv[1:] if argv is None else argv)
    _configure_logging(0 if link is None else link.index)
    raise_grpc_message_limits(kserve_server.args, settings)
    # The engine thread runs Python between tensor operations; a shorter GIL switch interval
    # (default 5 ms) lets the event loop answer health checks and 503s promptly meanwhile.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Pillow's own decompression-bomb guard, lowered to ours (it also guards other readers).
    Image.MAX_IMAGE_PIXELS = settings.max_decoded_pixels

    model = QwenVLModel(settings, fronts=args.workers, link=link)
    others = None  # the other fronts, when this is front 0 of several
    if args.workers > 1 and link is None:
        others = fronts.Fronts(sys.argv[1:] if argv is None else argv, run_front)
        others.on_death = model.fail

        def start_other_fronts(engine: Any) -> None:
            others.start(engine.sibling_links)
            engine.release_sibling_links()

        model.on_engine_started = start_other_fronts
    try:
        use_event_loop(args.event_loop)
        model.load()
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        sys.exit(2)

    server = ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    harden(server, kserve_server, model, settings)
    if args.workers > 1:  # every front listens on the ports; the kernel spreads connections
        kserve_servers.LimitedRESTServer.reuse_port = True
        fronts.register_metrics_route(kserve_server.app)
    register_infer_routes(kserve_server.app, server.dataplane, request_bytes_limit(settings))
    register_config_routes(kserve_server.app, server.dataplane)
    remote = RemotePolicy(
        allowed=settings.allow_remote_images,
        hosts=settings.remote_image_hosts,
        timeout_s=settings.remote_image_timeout_s,
        max_bytes=settings.max_image_bytes,
        addresses=AddressPolicy.from_strings(settings.remote_image_allow_networks),
        max_redirects=settings.remote_image_max_redirects,
    )
    chat = ChatService(model, settings.served_model_aliases, remote)
    register_openai_routes(kserve_server.app, chat)
    if settings.enable_ui:
        assert model.limits is not None  # set by load()
        config = page_config(model.name, settings, model.limits)
        register_ui_routes(kserve_server.app, config)
    install_openapi(kserve_server.app)
    # Everything built so far (the model, transformers, KServe, FastAPI: about half a million
    # objects) lives as long as the process; frozen, the garbage collector's full passes,
    # which would otherwise walk all of them and stall a request for ~0.1 s, skip them.
    drain = Drain(server, model, settings.drain_timeout_s)
    if others is not None:
        drain.on_begin.append(others.begin_drain)
    drain.install(kserve_server.app)
    FailFast(server, model).install(kserve_server.app)
    gc.collect()
    gc.freeze()
    try:
        server.start([model])  # returns once the drain has stopped both servers
    finally:
        if others is not None:  # their drains answer what they accepted: the engine waits
            others.join(settings.drain_timeout_s + fronts.KILL_AFTER_S)
        model.stop()  # the engine (and its process) last, with nothing left to serve
        if link is None:
            fronts.remove_metrics_dir()
        logger.info("stopped")


def run_front(argv: Sequence[str], link: FrontLink) -> None:
    """A front other than the first (`predictor.server.fronts`): the same server, attached
    to front 0's engine core."""
    from predictor.engine import core as engine_core

    engine_core._exit_with_parent()  # no front outlives the first (nor the core it started)
    main(argv, link=link)


if __name__ == "__main__":
    main()
