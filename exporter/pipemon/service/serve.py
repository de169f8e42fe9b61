"""`pipemon serve`: run the exporter."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from pipemon.backends import StorageError
from pipemon.model.registry import RegistryError
from pipemon.render.rules import ConfigError
from pipemon.service.app import EXPORTER_KEY, create_app
from pipemon.service.auth import TokensError, load_tokens
from pipemon.service.config import ServeConfig, add_serve_arguments, config_from_args
from pipemon.web.config import WebConfigError, load_web_config

log = logging.getLogger("pipemon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_serve_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(config)
    except (RegistryError, TokensError, WebConfigError, StorageError, ConfigError) as exc:
        log.error("%s", exc)
        return 1


def serve(config: ServeConfig) -> int:
    tokens = load_tokens(config.tokens) if config.tokens else None
    if tokens is None:
        log.warning("no tokens file (--tokens): anyone who reaches %s:%d can report runs", config.host, config.port)
    else:
        log.info("%d tokens loaded from %s", len(tokens), config.tokens)
    web_config = load_web_config(config.web_config) if config.web_config else None
    if web_config is not None and web_config.users and config.protect_reads:
        # both would want the Authorization header of a /metrics scrape (Basic and Bearer)
        raise WebConfigError(f"{config.web_config}: basic_auth_users and --protect-reads exclude each other: with"
                             " --protect-reads, Prometheus scrapes with a reader token instead")
    if web_config is not None:
        log.info("web config %s: TLS %s, basic auth on /metrics %s", config.web_config,
                 "on" if web_config.tls else "off", f"for {len(web_config.users)} users" if web_config.users else "off")
    app = create_app(config, tokens, web_config=web_config)
    ssl_context = web_config.ssl_context() if web_config is not None else None
    # The storage and compression threads take the GIL back and forth; a short switch interval lets the
    # event loop get it back sooner (p99 of POSTs during /metrics scrapes about halves).
    sys.setswitchinterval(0.0005)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    async def on_startup(app: web.Application) -> None:
        exporter = app[EXPORTER_KEY]

        def reload() -> None:
            try:
                exporter.reload_registry()
            except RegistryError as exc:
                log.error("registry not reloaded, the previous one stays: %s", exc)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
        log.info("pipemon listening on %s://%s:%d (state in %s)", "https" if ssl_context else "http", config.host,
                 config.port, app[EXPORTER_KEY].recorder.storage.describe())

    app.on_startup.append(on_startup)
    web.run_app(app, host=config.host, port=config.port, print=None,
                access_log=log if config.access_log else None, shutdown_timeout=10, ssl_context=ssl_context)
    return 0
