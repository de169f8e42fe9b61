"""`python -m pipemon.stack.balancer`: one address in front of exporter replicas, for `pipemon stack --ha`.

What a load balancer or a Kubernetes Service does in production, in a few lines for the local stack: every
request goes to the replica that answered last; one that refuses the connection (or times out before
answering) is passed over for the next. Prometheus scrapes this one address and sees one target whichever
replica answers (the replicas catch up with the shared log before rendering). Not for production: no health
checks, no TLS, one process.
"""

from __future__ import annotations

import argparse
import logging

import aiohttp
from aiohttp import web

log = logging.getLogger("pipemon.stack.balancer")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
UPSTREAM_KEY = web.AppKey("upstreams", "Upstreams")


class Upstreams:
    def __init__(self, urls: list[str], timeout: float) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.current = 0
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=1.0)
        self.session: aiohttp.ClientSession | None = None

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.setdefault("Accept-Encoding", "identity")  # else aiohttp asks for gzip the caller cannot read
        assert self.session is not None
        for step in range(len(self.urls)):
            index = (self.current + step) % len(self.urls)
            try:
                async with self.session.request(request.method, self.urls[index] + request.path_qs, data=body,
                                                headers=headers, allow_redirects=False,
                                                auto_decompress=False) as resp:
                    payload = await resp.read()
                    out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                log.warning("%s did not answer (%s): trying the next replica", self.urls[index], exc)
                continue
            if index != self.current:
                log.warning("now sending to %s", self.urls[index])
                self.current = index
            return web.Response(status=resp.status, body=payload, headers=out)
        return web.Response(status=502, text="no exporter replica answers\n")


async def handle(request: web.Request) -> web.Response:
    return await request.app[UPSTREAM_KEY].forward(request)


def create_app(urls: list[str], timeout: float = 30.0) -> web.Application:
    upstreams = Upstreams(urls, timeout)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[UPSTREAM_KEY] = upstreams

    async def session(app: web.Application):
        upstreams.session = aiohttp.ClientSession(auto_decompress=False)
        yield
        await upstreams.session.close()

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="one address in front of pipemon exporter replicas")
    parser.add_argument("--listen", default="127.0.0.1:9464")
    parser.add_argument("--upstream", action="append", required=True, help="a replica's URL (repeat)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    web.run_app(create_app(args.upstream), host=host, port=int(port), print=None, access_log=None)


if __name__ == "__main__":
    main()
