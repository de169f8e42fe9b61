import sys
from pathlib import Path

import pytest

# Tests import shared helpers as `tests.procs`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipemon.service.app import EXPORTER_KEY, create_app
from pipemon.service.auth import TokenEntry, Tokens, hash_token
from pipemon.service.config import ServeConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_REGISTRY = REPO / "pipelines.yaml"


def make_tokens(**teams: str) -> Tokens:
    """Tokens named after their secret: make_tokens(secret1="data-eng", admin1="admin")."""
    entries = [
        TokenEntry(name=secret, sha256=hash_token(secret).hex(), team=None if team == "admin" else team,
                   admin=team == "admin")
        for secret, team in teams.items()
    ]
    return Tokens(entries)


@pytest.fixture
def config(tmp_path: Path) -> ServeConfig:
    return ServeConfig(registry=EXAMPLE_REGISTRY, state_dir=tmp_path / "state", enable_lifecycle=True)


@pytest.fixture
def exporter_client(aiohttp_client, config):
    """Start an exporter app; returns a factory so tests can pick config and tokens."""

    async def start(cfg: ServeConfig | None = None, tokens: Tokens | None = None):
        app = create_app(cfg or config, tokens)
        client = await aiohttp_client(app)
        client.exporter = app[EXPORTER_KEY]
        return client

    return start


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the whole session (tests/pg.py), stopped at the end."""
    from tests import pg

    pg.require()
    with pg.postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL."""
    return postgres_server.new_database()
