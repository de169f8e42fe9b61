"""`pipemon run --pipeline NAME [--records N] -- COMMAND ...`: run a command and report it as one pipeline run.

The start is reported (in the background) when the command starts, the finish when it ends: success when it
exits 0, failure otherwise, with the duration and the records processed (`--records N`, or the number the
command writes to the file named by PIPEMON_RECORDS_FILE). The command's exit status is passed through: its
exit code, or death by the same signal. Signals sent to `pipemon run` are forwarded to the command. Reporting
uses the Python client (`pipemon.client`): retries, then the local spool; it never changes the exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from pipemon.client import Reporter, Run, new_run_id

log = logging.getLogger("pipemon.run")
RECORDS_ENV = "PIPEMON_RECORDS_FILE"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="pipeline name")
    parser.add_argument("--records", type=_records, help="records processed (else read from $PIPEMON_RECORDS_FILE)")
    parser.add_argument("--team", help="owning team, for a pipeline the registry does not list")
    parser.add_argument("--run-id", help="run id (default: $PIPEMON_RUN_ID, else a random one)")
    parser.add_argument("--url", action="append",
                        help="exporter URL; repeat it (or separate by commas) for replicas to fail over between"
                             " (default: $PIPEMON_URL, else http://127.0.0.1:9464)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...]")


def _records(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("pipemon run: no command given (pipemon run --pipeline NAME -- COMMAND ...)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="pipemon run: %(message)s")
    reporter = Reporter(args.url)
    pipeline_run = Run(args.pipeline, args.run_id or new_run_id(), args.team)
    with tempfile.TemporaryDirectory(prefix="pipemon-run-") as tmp:
        records_file = Path(tmp) / "records"
        starting = threading.Thread(target=reporter.start, args=(pipeline_run,), daemon=True)
        starting.start()
        returncode = execute(command, {**os.environ, RECORDS_ENV: str(records_file)})
        pipeline_run.end()
        pipeline_run.records = args.records if args.records is not None else read_records(records_file)
        starting.join()
        reporter.finish(pipeline_run, returncode == 0)
    return exit_status(returncode)


def execute(command: list[str], env: dict[str, str]) -> int:
    """Run the command with signals forwarded; its return code (negative: killed by that signal)."""
    forwarder = _Forwarder()
    previous = {sig: signal.signal(sig, forwarder.handle) for sig in FORWARDED}
    try:
        try:
            forwarder.child = subprocess.Popen(command, env=env)
        except FileNotFoundError:
            print(f"pipemon run: {command[0]}: command not found", file=sys.stderr)
            return 127
        except OSError as exc:
            print(f"pipemon run: {command[0]}: {exc.strerror}", file=sys.stderr)
            return 126
        forwarder.deliver_pending()
        return forwarder.child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Forwarder:
    """Passes signals on to the child. SIGINT is not passed on while we run in the foreground of a terminal:
    the terminal sent Ctrl-C to the child as well (same process group), and it must arrive only once."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []
        self.terminal_sends_sigint = _in_terminal_foreground()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.terminal_sends_sigint:
            return
        if self.child is None:
            self.pending.append(signum)  # arrived while starting the child
        else:
            self.child.send_signal(signum)

    def deliver_pending(self) -> None:
        assert self.child is not None
        for signum in self.pending:
            self.child.send_signal(signum)


def _in_terminal_foreground() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def read_records(path: Path) -> int | None:
    """The number the command wrote to $PIPEMON_RECORDS_FILE, if it wrote one."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        log.warning("ignoring %s=%s: expected a non-negative integer, found %.40r", RECORDS_ENV, path, text)
        return None
    return int(text)


def exit_status(returncode: int) -> int:
    """Exit like the child: with its code, or by the signal that killed it (128 + N if that fails)."""
    if returncode >= 0:
        return returncode
    signum = -returncode
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum
