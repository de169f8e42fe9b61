"""Team isolation for reads (`--protect-reads`): who may read which pipelines, and the UI's sign-in.

Every read needs a token: `Authorization: Bearer …` (API, /metrics, scripts), or a session cookie the
sign-in form sets after checking a token posted in the form's body. The cookie holds a random session
id, never the token; it is HttpOnly and SameSite=Strict (no other site can make the browser send it, so
the sign-in and sign-out forms need no CSRF token). Sessions live in memory: a restart signs people out.
"""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from pipemon.service.auth import Principal, Tokens

COOKIE = "pipemon_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000  # beyond this the oldest are dropped: sign-ins cannot grow memory without bound
# request key: the Principal reading, absent when reads are open (a RequestKey where aiohttp has them)
READER_KEY = web.RequestKey("reader", Principal) if hasattr(web, "RequestKey") else "pipemon.reader"
UI_PATHS = ("/", "/pipelines/")
PROTECTED = ("/metrics", "/api/v1/pipelines")


class Sessions:
    def __init__(self, tokens: Tokens, clock=time.monotonic) -> None:
        self.tokens = tokens
        self.clock = clock
        self._by_id: dict[str, tuple[Principal, float]] = {}

    def sign_in(self, token: str) -> str | None:
        """A new session id for a valid token, else None."""
        principal = self.tokens.identify_token(token.strip()) if token.strip() else None
        if principal is None:
            return None
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        session = secrets.token_urlsafe(32)
        self._by_id[session] = (principal, self.clock() + SESSION_SECONDS)
        return session

    def sign_out(self, session: str | None) -> None:
        if session:
            self._by_id.pop(session, None)

    def principal(self, session: str | None) -> Principal | None:
        entry = self._by_id.get(session or "")
        if entry is None:
            return None
        if entry[1] < self.clock():
            del self._by_id[session]  # type: ignore[arg-type]
            return None
        return entry[0]


def reader(request: web.Request) -> Principal | None:
    """Who reads (None: reads are open to anyone, the default)."""
    return request.get(READER_KEY)


def may_read(request: web.Request, team: str) -> bool:
    principal = reader(request)
    return principal is None or principal.may_read(team)


def _is_protected(path: str) -> bool:
    return path == "/" or path.startswith(UI_PATHS[1]) or any(path.startswith(p) for p in PROTECTED)


def read_guard(sessions: Sessions) -> web.middleware:
    """Middleware: the reads listed above need a principal; HTML pages send people to the sign-in form."""

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.method not in ("GET", "HEAD") or not _is_protected(request.path):
            return await handler(request)
        principal = sessions.tokens.identify(request.headers.get("Authorization"))
        if principal is None:
            principal = sessions.principal(request.cookies.get(COOKIE))
        if principal is None:
            if request.path == "/" or request.path.startswith(UI_PATHS[1]):
                raise web.HTTPSeeOther("/login")
            return web.json_response({"status": "rejected", "code": 401, "error": {
                "reason": "unauthorized", "message": "reads are protected (--protect-reads): send a valid"
                " bearer token (Authorization: Bearer …)"}}, status=401)
        request[READER_KEY] = principal
        return await handler(request)

    return guard
