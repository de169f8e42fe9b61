"""Handlers of the UI's routes, and the state they share (`Ui`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from pipemon.model.health import HealthJudge
from pipemon.model.state import Pipelines
from pipemon.web import overview, pipeline
from pipemon.web.access import COOKIE, Sessions, may_read, read_guard, reader
from pipemon.web.alerts import AlertSource
from pipemon.web.html import e, page

log = logging.getLogger("pipemon.web")
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}
WARM_CHUNK = 20  # pipelines judged between two yields to the event loop while warming up (~15 ms)
WARM_INTERVAL = 5.0  # seconds between two background rounds of judging the pipelines that changed


@dataclass
class Ui:
    pipelines: Callable[[], Pipelines]
    judge: HealthJudge
    alerts: AlertSource
    links: pipeline.Links
    clock: Callable[[], float]
    sessions: Sessions | None = None  # set: --protect-reads
    secure_cookie: bool = False  # served over TLS: the session cookie is Secure too


UI_KEY = web.AppKey("ui", Ui)


def install(app: web.Application, ui: Ui) -> None:
    """Add the UI's routes (and, with --protect-reads, the read guard) to the exporter's app."""
    app[UI_KEY] = ui
    if ui.sessions is not None:
        app.middlewares.append(read_guard(ui.sessions))
    app.router.add_get("/", get_overview)
    app.router.add_get("/pipelines/{name}", get_pipeline_page)
    app.router.add_get("/static/{file}", get_static)
    app.router.add_get("/login", get_login)
    app.router.add_post("/login", post_login)
    app.router.add_post("/logout", post_logout)
    app.cleanup_ctx.append(_warm_up)


async def _warm_up(app: web.Application):
    """Keep every pipeline's health judged in the background: after start-up (baselines are not persisted)
    and then every WARM_INTERVAL for the pipelines whose state changed. Judging a pipeline's new runs against
    its baseline (the clock-free part of a health judgement, cached) costs up to a millisecond; without this
    the first overview after a restart or a burst of runs would pay it for each (seconds at 20,000).
    Unchanged pipelines cost a cache lookup (~2 µs). Installed after the recorder's lifecycle, so the state is
    restored by then."""
    ui = app[UI_KEY]

    async def warm() -> None:
        while True:
            try:
                for index, state in enumerate(list(ui.pipelines())):
                    ui.judge.prepare(state)
                    if index % WARM_CHUNK == 0:
                        await asyncio.sleep(0)
            except Exception:  # a bug here must not end the warming for good; pages judge on their own anyway
                log.exception("judging pipelines in the background failed")
            await asyncio.sleep(WARM_INTERVAL)

    task = asyncio.get_running_loop().create_task(warm())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _ui(request: web.Request) -> Ui:
    return request.app[UI_KEY]


def _html(text: str, status: int = 200) -> web.Response:
    # no-store: a shared browser's back button must not show a signed-out team's pipelines
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                                 "Content-Security-Policy": "default-src 'self'; img-src 'self' data:;"
                                                            " style-src 'self'; script-src 'self'"})


def _signed_in(request: web.Request) -> str | None:
    principal = reader(request)
    if principal is None:
        return None
    return principal.name + (f" (team {principal.team})" if principal.team else " (all teams)")


async def get_overview(request: web.Request) -> web.Response:
    ui = _ui(request)
    try:
        filters = overview.Filters.parse(request.query)
    except overview.FilterError as exc:
        return _html(page("Bad filter", f'<h1>Bad filter</h1><p class="error">{e(exc)}</p>'
                          '<p><a href="/">All pipelines</a></p>', refresh=False), 400)
    pipelines = ui.pipelines()
    ui.judge.prune(pipelines.by_name, len(pipelines))
    states = (s for s in pipelines if may_read(request, s.team))
    view = overview.build(states, ui.judge, filters, ui.clock())
    alerts = await ui.alerts.view()
    body = overview.render(view, filters, ui.judge, alerts)
    return _html(page("Pipelines", body, signed_in=_signed_in(request)))


async def get_pipeline_page(request: web.Request) -> web.Response:
    ui = _ui(request)
    state = ui.pipelines().get(request.match_info["name"])
    if state is None or not may_read(request, state.team):  # another team's: as if it did not exist
        return _html(page("Not found", '<h1>No such pipeline</h1><p><a href="/">All pipelines</a></p>',
                          signed_in=_signed_in(request), refresh=False), 404)
    now = ui.clock()
    health = ui.judge.judge(state, now)
    alerts = await ui.alerts.view()
    body = pipeline.render(state, health, ui.judge, alerts, ui.links, now)
    return _html(page(state.name, body, signed_in=_signed_in(request)))


async def get_static(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    data = (resources.files("pipemon.web") / "static" / name).read_bytes()
    return web.Response(body=data, content_type=STATIC[name], headers={"Cache-Control": "max-age=300"})


LOGIN_FORM = """<h1>Sign in</h1>
<p>Reads are protected on this exporter. Sign in with your team's read token (or an admin or reader token).</p>
{error}<form method="post" action="/login" class="login">
<label>Token <input type="password" name="token" autocomplete="current-password" required autofocus></label>
<button type="submit">Sign in</button></form>"""


async def get_login(request: web.Request) -> web.Response:
    return _html(page("Sign in", LOGIN_FORM.format(error=""), refresh=False))


async def post_login(request: web.Request) -> web.Response:
    ui = _ui(request)
    if ui.sessions is None:
        raise web.HTTPSeeOther("/")
    form = await request.post()
    token = form.get("token")
    session = ui.sessions.sign_in(token) if isinstance(token, str) and len(token) <= 4096 else None
    if session is None:
        error = '<p class="error" role="alert">That token is not valid.</p>'
        return _html(page("Sign in", LOGIN_FORM.format(error=error), refresh=False), 401)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", secure=ui.secure_cookie, path="/",
                        max_age=12 * 3600)
    raise response


async def post_logout(request: web.Request) -> web.Response:
    ui = _ui(request)
    if ui.sessions is not None:
        ui.sessions.sign_out(request.cookies.get(COOKIE))
    response = web.HTTPSeeOther("/login" if ui.sessions is not None else "/")
    response.del_cookie(COOKIE, path="/")
    raise response
