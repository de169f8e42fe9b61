"""Bearer tokens: a tokens file maps hashed tokens to a team, to admin, or to reader (reads everything,
writes nothing; for Prometheus and dashboards under --protect-reads).

The file keeps SHA-256 hashes only (`pipemon hash-token` makes one). Every presented token is compared
against every entry with `hmac.compare_digest` and no early exit, so timing says nothing about how much
of a token matched.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import yaml

from pipemon.model.registry import TEAM_NAME_PATTERN

Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class TokenEntry(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    sha256: Sha256Hex
    team: Annotated[str, msgspec.Meta(pattern=TEAM_NAME_PATTERN)] | None = None
    admin: bool = False
    reader: bool = False

    def __post_init__(self) -> None:
        if [self.team is not None, self.admin, self.reader].count(True) != 1:
            raise ValueError(f"token {self.name!r} needs exactly one of `team:`, `admin: true` or `reader: true`")


class TokensFile(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[TokenEntry]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    team: str | None
    admin: bool
    reader: bool = False

    def may_write(self, team: str) -> bool:
        return self.admin or self.team == team

    def may_read(self, team: str) -> bool:
        return self.admin or self.reader or self.team == team


class TokensError(ValueError):
    pass


class Tokens:
    def __init__(self, entries: list[TokenEntry]) -> None:
        self._entries = [(bytes.fromhex(e.sha256), Principal(e.name, e.team, e.admin, e.reader)) for e in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def identify(self, authorization: str | None) -> Principal | None:
        """The principal of an `Authorization: Bearer …` header, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self.identify_token(authorization[len("Bearer "):].strip())

    def identify_token(self, token: str) -> Principal | None:
        """The principal of a bare token (the sign-in form's), or None."""
        digest = hash_token(token)
        found = None
        for expected, principal in self._entries:
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: str | Path) -> Tokens:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return Tokens(msgspec.convert(data, TokensFile).tokens)
    except OSError as exc:
        raise TokensError(f"{path}: cannot read tokens file: {exc.strerror}") from exc
    except (yaml.YAMLError, msgspec.ValidationError) as exc:
        raise TokensError(f"{path}: invalid tokens file: {exc}") from exc


# ---- `pipemon hash-token` ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Read a token on standard input and print its SHA-256, for the tokens file."


def run(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print("error: no token on standard input", file=sys.stderr)
        return 1
    print(hash_token(token).hex())
    return 0
