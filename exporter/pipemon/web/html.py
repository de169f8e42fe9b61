"""HTML building blocks: escaping, times the browser shows in its own zone, and the page layout.

Plain f-strings rather than a template engine: the pages are small, and every value goes through `e()`.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape
from urllib.parse import quote, urlencode

from pipemon import __version__


def e(value: object) -> str:
    return escape(str(value), quote=True)


def url_path(name: str) -> str:
    """A pipeline name as one path segment (names may hold '/', spaces, anything printable)."""
    return quote(name, safe="")


def query(params: dict[str, str | int | None]) -> str:
    kept = {k: v for k, v in params.items() if v not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def when(ts: float, empty: str = "never", absolute: bool = False) -> str:
    """A timestamp as <time>: ui.js shows it relative ("5 min ago") with the browser's local time on hover, or
    (`absolute`, for tables of runs) the local time with the relative one on hover."""
    if not ts or math.isnan(ts):
        return f'<span class="muted">{e(empty)}</span>'
    iso = datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    kind = ' data-absolute="1"' if absolute else ""
    return f'<time datetime="{iso}" data-ts="{ts:.3f}"{kind}>{iso}</time>'


def duration(seconds: float) -> str:
    if seconds is None or math.isnan(seconds) or math.isinf(seconds):
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def number(value: float) -> str:
    if value is None or math.isnan(value) or math.isinf(value):
        return "–"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f} M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f} k"
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def percent(ratio: float) -> str:
    return "–" if ratio is None or math.isnan(ratio) else f"{ratio * 100:.0f}%"


def page(title: str, body: str, *, signed_in: str | None = None, refresh: bool = True) -> str:
    """The whole document. `refresh`: ui.js reloads the main part every 30 s, keeping the URL's filters."""
    account = ""
    if signed_in is not None:
        account = (f'<form method="post" action="/logout" class="account"><span>{e(signed_in)}</span>'
                   '<button type="submit">Sign out</button></form>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · pipemon</title>
<link rel="stylesheet" href="/static/ui.css">
<script src="/static/ui.js" defer></script>
</head><body{' data-refresh="30"' if refresh else ''}>
<a class="skip" href="#main">Skip to content</a>
<header><a class="brand" href="/">pipemon</a>{account}</header>
<main id="main" tabindex="-1">
{body}
</main>
<footer>pipemon {e(__version__)} · <a href="/metrics">/metrics</a> · <a href="/api/v1/pipelines">/api/v1/pipelines</a>
· <a href="/api/v1/openapi.json">/api/v1/openapi.json</a></footer>
</body></html>
"""
