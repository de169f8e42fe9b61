"""The `pipemon` command line. Every subcommand lives in its own module; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module has `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("pipemon.serve", "run the exporter"),
    "check-config": ("pipemon.check_config", "validate a registry file (pipelines.yaml)"),
    "render-rules": ("pipemon.rules_render", "render Prometheus rule files from rules/config.yaml"),
    "render-alertmanager": ("pipemon.alertmanager_render", "render alertmanager.yml from the registry"),
    "stack": ("pipemon.stack", "run exporter, Prometheus and two Alertmanagers locally"),
    "run": ("pipemon.wrapper", "run a command and report it as a pipeline run"),
    "hash-token": ("pipemon.auth", "print the hash of a token, for the tokens file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipemon", description="Monitoring for data pipelines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # not built yet
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
