"""`--web-config`: TLS for the whole server and HTTP basic auth on `/metrics`, in the file format of the
Prometheus exporter-toolkit (https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md):

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file
      key_file: server.key
      client_ca_file: ca.crt         # optional: client certificates
      client_auth_type: RequireAndVerifyClientCert   # NoClientCert (default) | VerifyClientCertIfGiven
      min_version: TLS12             # TLS12 (default) | TLS13
    basic_auth_users:
      prometheus: $2b$12$…           # bcrypt hashes only (htpasswd -nBC 12 "" | tr -d ':\\n', or python -m bcrypt)

Unknown keys are errors, as in the toolkit. Basic auth guards `/metrics` only: the write endpoints have their
own bearer tokens (`--tokens`). A password is checked with bcrypt in a worker thread; an unknown user is checked
against a dummy hash, so the answer takes as long as for a known user with a wrong password, and outcomes are
cached by a digest of user, password and hash (as the toolkit does), so Prometheus' scrapes cost one bcrypt.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import secrets
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import yaml
from aiohttp import web

PROTECTED_PATHS = frozenset({"/metrics"})
CLIENT_AUTH_TYPES = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                     "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_CACHE_SIZE = 128


class WebConfigError(ValueError):
    pass


class TLSServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"


class WebConfigFile(msgspec.Struct, forbid_unknown_fields=True):
    tls_server_config: TLSServerConfig | None = None
    basic_auth_users: dict[str, str] | None = None


class WebConfig:
    def __init__(self, path: Path, tls: TLSServerConfig | None, users: dict[str, bytes]) -> None:
        self.path = path
        self.tls = tls
        self.users = users
        # Unknown users are checked against a hash of a random password at the cost of the configured ones.
        self._dummy = _dummy_hash(max((int(h[4:6]) for h in users.values()), default=10)) if users else b""
        self._cache: OrderedDict[bytes, bool] = OrderedDict()

    # ---- TLS -----------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        tls, base = self.tls, self.path.parent
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = TLS_VERSIONS[tls.min_version]
        try:
            context.load_cert_chain(base / tls.cert_file, base / tls.key_file)
            if tls.client_ca_file:
                context.load_verify_locations(base / tls.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise WebConfigError(f"{self.path}: tls_server_config: {exc}") from exc
        context.verify_mode = CLIENT_AUTH_TYPES[tls.client_auth_type]
        return context

    # ---- basic auth ----------------------------------------------------------------------------------

    async def authorized(self, header: str | None) -> bool:
        """Whether an `Authorization: Basic …` header names a configured user with the right password."""
        user, password = _basic_credentials(header)
        known = user in self.users
        hashed = self.users[user] if known else self._dummy
        key = hashlib.sha256(b"\0".join((user.encode(), password, hashed))).digest()
        cached = self._cache.get(key)
        if cached is None:
            cached = await asyncio.get_running_loop().run_in_executor(None, _bcrypt_ok, password, hashed)
            self._cache[key] = cached
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return known and cached

    def middleware(self) -> Callable:
        @web.middleware
        async def basic_auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
            if (self.users and request.path in PROTECTED_PATHS
                    and not await self.authorized(request.headers.get("Authorization"))):
                return web.Response(status=401, text="Unauthorized\n",
                                    headers={"WWW-Authenticate": 'Basic realm="pipemon", charset="UTF-8"'})
            return await handler(request)

        return basic_auth


def _basic_credentials(header: str | None) -> tuple[str, bytes]:
    """(user, password) of a Basic header; ("", b"") when absent or malformed, which no user matches."""
    if not header or header[:6].lower() != "basic ":
        return "", b""
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return "", b""
    user, sep, password = decoded.partition(b":")
    if not sep:
        return "", b""
    return user.decode("utf-8", errors="replace"), password


def _bcrypt_ok(password: bytes, hashed: bytes) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


def load_web_config(path: str | Path) -> WebConfig:
    path = Path(path).resolve()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        parsed = msgspec.convert(data, WebConfigFile)
    except OSError as exc:
        raise WebConfigError(f"{path}: cannot read web config: {exc.strerror}") from exc
    except (yaml.YAMLError, msgspec.ValidationError) as exc:
        raise WebConfigError(f"{path}: invalid web config: {exc}") from exc
    tls = parsed.tls_server_config
    if tls is not None:
        if tls.client_auth_type not in CLIENT_AUTH_TYPES:
            raise WebConfigError(f"{path}: tls_server_config.client_auth_type: expected one of"
                                 f" {', '.join(CLIENT_AUTH_TYPES)}, got {tls.client_auth_type!r}")
        if tls.min_version not in TLS_VERSIONS:
            raise WebConfigError(f"{path}: tls_server_config.min_version: expected TLS12 or TLS13, got"
                                 f" {tls.min_version!r}")
        if tls.client_auth_type != "NoClientCert" and not tls.client_ca_file:
            raise WebConfigError(f"{path}: tls_server_config.client_auth_type {tls.client_auth_type} needs"
                                 " client_ca_file")
    users: dict[str, bytes] = {}
    for user, hashed in (parsed.basic_auth_users or {}).items():
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")) or len(hashed) != 60 or not hashed[4:6].isdigit():
            raise WebConfigError(f"{path}: basic_auth_users.{user}: expected a bcrypt hash ($2b$…), never a"
                                 " plain password")
        users[user] = hashed.encode()
    if users:
        try:
            import bcrypt  # noqa: F401
        except ImportError as exc:
            raise WebConfigError(f"{path}: basic_auth_users needs the bcrypt package: pip install bcrypt") from exc
    config = WebConfig(path, tls, users)
    config.ssl_context()  # fail at start-up, not at the first connection
    return config


def _dummy_hash(cost: int) -> bytes:
    import bcrypt

    return bcrypt.hashpw(secrets.token_hex(16).encode(), bcrypt.gensalt(cost))
