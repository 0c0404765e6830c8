"""`dataflare`: the daemon and the commands that talk to it.

Exit codes: 0 ok, 1 failure (invalid config, request refused), 2 usage,
3 daemon not running, 78 configuration invalid at `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from dataflare.cdc.errors import EXIT_NOT_RUNNING

EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dataflare", description="DataFlare change-data-capture daemon"
    )
    p.add_argument(
        "--config",
        help="daemon config file (default $DATAFLARE_CONFIG or /etc/dataflare/dataflare.yaml)",
    )
    p.add_argument("--socket", help="control socket (default $DATAFLARE_SOCKET or daemon.socket)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the daemon in the foreground")
    v = sub.add_parser("validate", help="check config files; every error with file, line and key")
    v.add_argument("paths", nargs="*", help="daemon or workflow files (default: the daemon config)")
    s = sub.add_parser("status", help="workflows, positions, lag and counters")
    s.add_argument("--json", action="store_true", help="one JSON object")
    sub.add_parser("reload", help="re-read the configuration (same as SIGHUP)")
    for cmd in ("pause", "resume", "restart"):
        c = sub.add_parser(cmd, help=f"{cmd} a workflow")
        c.add_argument("workflow")
    pl = sub.add_parser("plan", help="draw a workflow's DAG")
    pl.add_argument("workflow")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = args.config or os.environ.get("DATAFLARE_CONFIG") or "/etc/dataflare/dataflare.yaml"
    if args.command == "run":
        from dataflare.daemon.supervisor import run_daemon

        return run_daemon(config)
    if args.command == "validate":
        from dataflare.daemon.config import validate_main

        return validate_main(args.paths or [config])
    if args.command == "plan":
        return _plan(config, args.workflow)
    return _remote(args, config)


def _remote(args: argparse.Namespace, config: str) -> int:
    from dataflare.daemon.control_client import (
        ControlClient,
        DaemonNotRunning,
        RequestFailed,
        socket_path,
    )

    path = socket_path(args.socket, config)
    try:
        with ControlClient(path) as client:
            if args.command == "status":
                st = client.request("status")
                print(json.dumps(st, indent=2) if args.json else render_status(st))
            elif args.command == "reload":
                res = client.request("reload")
                for e in res.get("errors", []):
                    print(e)
                if not res.get("applied"):
                    print("configuration rejected; the daemon keeps its running configuration")
                    return EXIT_FAILED
                print(
                    f"configuration generation {res['generation']} applied: "
                    f"{' '.join(res['changes']) or 'no workflow changed'}"
                )
            else:
                st = client.request(args.command, workflow=args.workflow)
                print(f"{st['name']}: {st['state']}")
    except DaemonNotRunning as e:
        print(str(e), file=sys.stderr)
        return EXIT_NOT_RUNNING
    except RequestFailed as e:
        print(f"dataflare {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _plan(config: str, workflow: str) -> int:
    from dataflare.daemon.config import ConfigInvalid, load_daemon_config, load_workflow_file
    from dataflare.daemon.dag import paths

    try:
        if os.path.isfile(workflow):
            wf = load_workflow_file(workflow)
        else:
            cfg, _ = load_daemon_config(config)
            found = [w for w in cfg.workflows if w.name == workflow]
            if not found:
                print(f"no workflow named {workflow!r} in {config}", file=sys.stderr)
                return EXIT_FAILED
            wf = found[0]
    except ConfigInvalid as e:
        for issue in e.issues:
            print(issue)
        return EXIT_FAILED
    types = {n.name: n.type for n in (*wf.sources, *wf.transformations, *wf.destinations)}
    print(f"workflow {wf.name}" + (f": {wf.description}" if wf.description else ""))
    for path in paths(wf):
        print("  " + " -> ".join(f"{n} ({types[n]})" for n in path))
    return 0


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def render_status(st: dict[str, Any]) -> str:
    """A readable table of a status snapshot (pure: tested without a daemon)."""
    d = st["daemon"]
    lines = [
        f"dataflare {d['version']}  up {d['uptime_s']:.0f}s  "
        f"config generation {d['config_generation']}"
    ]
    for e in d.get("config_errors", []):
        lines.append(f"  config error: {e['file']}:{e['line']}: {e.get('key', '')}: {e['message']}")
    header = (
        f"{'WORKFLOW':<24} {'STATE':<13} {'IN':>10} {'OUT':>10} {'LAG s':>7} {'ERR':>4}  POSITION"
    )
    lines += ["", header]
    for w in st["workflows"]:
        lag = max((s.get("lag_seconds") or 0.0 for s in w["sources"]), default=0.0)
        pos = ", ".join(f"{s['name']}@{_fmt(s['position'])}" for s in w["sources"])
        lines.append(
            f"{w['name']:<24} {w['state']:<13} {w['records_in']:>10} "
            f"{w['records_out']:>10} {lag:>7.1f} {w['errors']:>4}  {pos}"
        )
        for dst in w["destinations"]:
            lines.append(
                f"  -> {dst['name']:<20} written {dst['records_written']:>10}  "
                f"at {_fmt(dst['position'])}"
            )
        if w.get("last_error"):
            lines.append(f"  last error: {w['last_error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
