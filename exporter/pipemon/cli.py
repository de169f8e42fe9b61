"""The `pipemon` command line. Every subcommand lives in its own module; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pipemon.service.serve", "run the exporter"),
    "check-config": ("pipemon.render.check", "validate a registry file (pipelines.yaml)"),
    "render-rules": ("pipemon.render.rules", "render Prometheus rule files from rules/config.yaml"),
    "render-alertmanager": ("pipemon.render.alertmanager", "render alertmanager.yml from the registry"),
    "stack": ("pipemon.stack.local", "run exporter, Prometheus and two Alertmanagers locally"),
    "run": ("pipemon.client.wrapper", "run a command and report it as a pipeline run"),
    "replay": ("pipemon.client.replay",
               "send NDJSON files of OpenLineage or native events (kept while pipemon was down)"),
    "hash-token": ("pipemon.service.auth", "print the hash of a token, for the tokens file"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of `command` is imported (so `pipemon run` starts fast)."""
    parser = argparse.ArgumentParser(prog="pipemon", description="Monitoring for data pipelines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
