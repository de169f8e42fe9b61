"""`pipemon check-config FILE`: validate a registry file and say what it holds."""

from __future__ import annotations

import argparse
import sys

from pipemon.model.registry import RegistryError, load_registry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="registry file, e.g. pipelines.yaml")


def run(args: argparse.Namespace) -> int:
    try:
        registry = load_registry(args.file)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    patterns = len(registry.source.pipelines) - len(registry.registered_specs())
    print(
        f"{args.file}: OK: {len(registry.teams)} teams, {len(registry.registered_specs())} pipelines by name,"
        f" {patterns} patterns, unknown pipelines: {registry.source.unknown_pipelines}"
    )
    return 0
