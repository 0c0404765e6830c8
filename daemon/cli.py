"""`dataflare`: the daemon and the commands that talk to it.

Exit codes: 0 ok, 1 failure (invalid config, request refused, a check failed),
2 usage, 3 daemon not running, 78 configuration invalid at `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from dataflare.cdc.errors import EXIT_NOT_RUNNING

EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dataflare",
        description="DataFlare change-data-capture daemon",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 daemon not running",
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
    s.add_argument("workflow", nargs="?", help="only this workflow (with details)")
    sub.add_parser("reload", help="re-read the configuration (same as SIGHUP)")
    for cmd in ("pause", "resume", "restart"):
        c = sub.add_parser(cmd, help=f"{cmd} a workflow")
        c.add_argument("workflow")
    dl = sub.add_parser("dlq", help="dead letters: list, show, replay or purge them")
    dl.add_argument("action", choices=("list", "show", "replay", "purge"))
    dl.add_argument("workflow")
    dl.add_argument("ids", nargs="*", type=int, help="dead letter ids (default: all)")
    dl.add_argument("--json", action="store_true", help="JSON output")
    dl.add_argument(
        "--wait", type=float, default=30.0, help="replay: wait this long for the outcome"
    )
    pl = sub.add_parser("plan", help="draw a workflow's DAG")
    pl.add_argument("workflow", help="workflow name (in the daemon config) or workflow file")
    ck = sub.add_parser(
        "check", help="check a workflow's sources and destinations (connectivity, settings)"
    )
    ck.add_argument("workflow", help="workflow name (in the daemon config) or workflow file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = args.config or os.environ.get("DATAFLARE_CONFIG") or "/etc/dataflare/dataflare.yaml"
    if args.command == "run":
        from dataflare.daemon import zygote_client

        zygote_client.start()  # first thing: its imports overlap the supervisor's
        from dataflare.daemon.supervisor import run_daemon

        return run_daemon(config)
    if args.command == "validate":
        from dataflare.daemon.config import validate_main

        return validate_main(args.paths or [config])
    if args.command in ("plan", "check"):
        return _local(args.command, config, args.workflow)
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
        wait = float(getattr(args, "wait", 0) or 0)
        with ControlClient(path, timeout=10.0 + wait) as client:
            if args.command == "status":
                st = client.request("status")
                if args.workflow:
                    found = [w for w in st["workflows"] if w["name"] == args.workflow]
                    if not found:
                        print(f"no workflow named {args.workflow!r}", file=sys.stderr)
                        return EXIT_FAILED
                    print(
                        json.dumps(found[0], indent=2)
                        if args.json
                        else render_workflow_detail(found[0])
                    )
                else:
                    print(json.dumps(st, indent=2) if args.json else render_status(st))
            elif args.command == "reload":
                res = client.request("reload")
                for e in res.get("errors", []):
                    print(e)
                for w in res.get("warnings", []):
                    print(f"warning: {w}")
                if not res.get("applied"):
                    print("configuration rejected; the daemon keeps its running configuration")
                    return EXIT_FAILED
                print(
                    f"configuration generation {res['generation']} applied: "
                    f"{' '.join(res['changes']) or 'no workflow changed'}"
                )
            elif args.command == "dlq":
                return _dlq(client, args)
            else:
                st = client.request(args.command, workflow=args.workflow)
                print(f"{st['name']}: {st['state']}")
    except DaemonNotRunning as e:
        print(str(e), file=sys.stderr)
        return EXIT_NOT_RUNNING
    except RequestFailed as e:
        print(f"dataflare {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, TimeoutError) as e:
        print(f"dataflare {args.command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _dlq(client: Any, args: argparse.Namespace) -> int:
    from dataflare.daemon.dlq_view import render_letters

    wf, ids = args.workflow, args.ids
    if args.action == "list":
        res = client.request("dlq_list", workflow=wf)
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(render_letters(wf, res["count"], res["letters"]))
        return 0
    if args.action == "show":
        if not ids:
            print("dataflare dlq show: give one or more dead letter ids", file=sys.stderr)
            return EXIT_FAILED
        res = client.request("dlq_show", workflow=wf, ids=ids)
        letters = res["letters"]
        print(json.dumps(letters[0] if len(ids) == 1 else letters, indent=2))
        return 0
    if args.action == "purge":
        res = client.request("dlq_purge", workflow=wf, ids=ids or None)
        print(json.dumps(res) if args.json else f"{wf}: {res['purged']} dead letter(s) purged")
        return 0
    res = client.request("dlq_replay", workflow=wf, ids=ids or None, wait=args.wait)
    if args.json:
        print(json.dumps(res))
    elif "replayed" in res:
        print(f"{wf}: {res['replayed']} replayed, {res['failed']} still failing")
    else:
        print(
            f"{wf}: replay of {res['requested']} dead letter(s) requested"
            + (f" ({res['note']})" if res.get("note") else "")
        )
    return EXIT_FAILED if res.get("failed") else 0


def _load_workflow(config: str, workflow: str) -> Any:
    """A workflow by name from the daemon config, or from a workflow file."""
    from dataflare.daemon.config import load_daemon_config, load_workflow_file

    if os.path.isfile(workflow):
        return load_workflow_file(workflow)
    cfg, _ = load_daemon_config(config)
    for w in cfg.workflows:
        if w.name == workflow:
            return w
    raise LookupError(f"no workflow named {workflow!r} in {config}")


def _local(command: str, config: str, workflow: str) -> int:
    from dataflare.daemon.config import ConfigInvalid

    try:
        wf = _load_workflow(config, workflow)
    except ConfigInvalid as e:
        for issue in e.issues:
            print(issue)
        return EXIT_FAILED
    except (LookupError, OSError) as e:
        print(f"dataflare {command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if command == "plan":
        print(render_plan(wf))
        return 0
    results = run_checks(wf)
    print(render_checks(wf.name, results))
    return EXIT_FAILED if any(not ok for _, _, ok, _ in results) else 0


# ------------------------------------------------------------------------- check

CheckResult = tuple[str, str, bool, str]  # (role, node name, ok, message)


def _builtin_check(role: str, node: Any) -> list[tuple[bool, str]] | None:
    """Checks of the built-in connectors that have no ``check`` of their own."""
    if node.type == "generate":
        return [(True, "synthetic source: nothing to connect to")]
    if node.type == "stdout":
        return [(True, "writes to the daemon's standard output")]
    if node.type == "file":
        path = os.path.abspath(str(node.config.path))
        d = os.path.dirname(path)
        out: list[tuple[bool, str]] = []
        if not os.path.isdir(d):
            out.append((False, f"directory {d} does not exist: create it"))
        elif not os.access(d, os.W_OK | os.X_OK):
            out.append((False, f"directory {d} is not writable: fix its owner or mode"))
        else:
            out.append((True, f"directory {d} is writable"))
        if os.path.exists(path) and not os.access(path, os.W_OK):
            out.append((False, f"{path} exists and is not writable"))
        return out
    return None


def check_node(role: str, node: Any, workflow: str = "") -> list[tuple[bool, str]]:
    """Run a source's or destination's checks: the implementation class's optional
    ``check(name, config[, workflow=]) -> list[(ok, message)]``, else the built-in ones
    (the workflow name gives defaults such as the Postgres slot name)."""
    from dataflare.cdc.registry import SOURCE_TYPES
    from dataflare.daemon.worker_spec import load_class
    from dataflare.sinks.registry import SINK_TYPES

    registry = SOURCE_TYPES if role == "source" else SINK_TYPES
    ctype = registry.get(node.type)
    if ctype is None:
        return [(False, f"unknown {role} type {node.type!r}")]
    try:
        cls = load_class(ctype.implementation)
    except Exception as e:
        return [(False, f"cannot load {ctype.implementation}: {type(e).__name__}: {e}")]
    check = getattr(cls, "check", None)
    if check is None:
        return _builtin_check(role, node) or [(True, "no checks for this type")]
    try:
        kwargs = {"workflow": workflow} if _accepts(check, "workflow") else {}
        return [(bool(ok), str(msg)) for ok, msg in check(node.name, node.config, **kwargs)]
    except Exception as e:
        return [(False, f"check failed: {type(e).__name__}: {e}")]


def _accepts(fn: Any, name: str) -> bool:
    import inspect  # not at the top: `run` starts the zygote before anything heavy

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_checks(wf: Any) -> list[CheckResult]:
    out: list[CheckResult] = []
    for role, nodes in (("source", wf.sources), ("destination", wf.destinations)):
        for node in nodes:
            out += [
                (role, f"{node.name} ({node.type})", ok, m)
                for ok, m in check_node(role, node, wf.name)
            ]
    return out


def render_checks(workflow: str, results: list[CheckResult]) -> str:
    lines = [f"workflow {workflow}"]
    last = None
    for role, name, ok, message in results:
        if (role, name) != last:
            lines.append(f"  {role} {name}")
            last = (role, name)
        lines.append(f"    {'OK  ' if ok else 'FAIL'}  {message}")
    failed = sum(1 for r in results if not r[2])
    lines.append(f"{failed} check(s) failed" if failed else "all checks passed")
    return "\n".join(lines)


# -------------------------------------------------------------------------- plan


def render_plan(wf: Any) -> str:
    """The workflow's DAG as a tree from each source (pure: tested without a daemon).

    A node reached along several paths is drawn in full the first time and
    referred to after that."""
    from dataflare.daemon.dag import consumers

    downstream = consumers(wf)
    kinds: dict[str, tuple[str, Any]] = {}
    for role, nodes in (
        ("source", wf.sources),
        ("transform", wf.transformations),
        ("destination", wf.destinations),
    ):
        for n in nodes:
            kinds[n.name] = (role, n)

    def label(name: str) -> str:
        role, node = kinds[name]
        extra = ""
        tables = getattr(node.config, "tables", None)
        if role == "source" and tables:
            extra = "  tables: " + ", ".join(str(t) for t in tables)
        if role == "transform" and len(node.inputs) > 1:
            extra = "  (joins " + ", ".join(node.inputs) + ")"
        if role == "destination" and len(node.inputs) > 1:
            extra = "  (from " + ", ".join(node.inputs) + ")"
        return f"{name} [{node.type} {role}]{extra}"

    title = f"workflow {wf.name}" + (f": {wf.description}" if wf.description else "")
    lines = [title, ""]
    drawn: set[str] = set()

    def walk(name: str, prefix: str) -> None:
        kids = downstream.get(name, [])
        for i, kid in enumerate(kids):
            last = i == len(kids) - 1
            branch = "└─▶ " if last else "├─▶ "
            if kid in drawn and downstream.get(kid):
                lines.append(f"{prefix}{branch}{kid} (see above)")
                continue
            drawn.add(kid)
            lines.append(f"{prefix}{branch}{label(kid)}")
            walk(kid, prefix + ("    " if last else "│   "))

    for src in wf.sources:
        lines.append(label(src.name))
        walk(src.name, "")
        lines.append("")
    n_t, n_d = len(wf.transformations), len(wf.destinations)
    lines.append(f"{len(wf.sources)} source(s), {n_t} transformation(s), {n_d} destination(s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------ status


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def workflow_lag(w: dict[str, Any]) -> float:
    return max((s.get("lag_seconds") or 0.0 for s in w.get("sources", [])), default=0.0)


def workflow_ring_fill(w: dict[str, Any]) -> float | None:
    fills = [s["ring_fill"] for s in w.get("sources", []) if s.get("ring_fill") is not None]
    return max(fills) if fills else None


def render_status(st: dict[str, Any]) -> str:
    """A readable table of a status snapshot (pure: tested without a daemon)."""
    from dataflare.daemon.status_model import human_duration

    d = st["daemon"]
    lines = [
        f"dataflare {d['version']}  up {human_duration(d['uptime_s'])}  "
        f"config generation {d['config_generation']}"
        + (f"  {len(d['config_errors'])} config error(s)" if d.get("config_errors") else "")
    ]
    for e in d.get("config_errors", []):
        key = f"{e['key']}: " if e.get("key") else ""
        lines.append(f"  config error: {e['file']}:{e['line']}: {key}{e['message']}")
    header = (
        f"{'WORKFLOW':<20} {'STATE':<12} {'IN/s':>8} {'OUT/s':>8} {'LAG':>6} {'RING':>5} "
        f"{'ERR':>4} {'IN':>10} {'OUT':>10}"
    )
    lines += ["", header]
    if not st["workflows"]:
        lines.append("(no workflows)")
    for w in st["workflows"]:
        fill = workflow_ring_fill(w)
        lines.append(
            f"{w['name']:<20} {w['state']:<12} {w.get('rate_in', 0.0):>8.1f} "
            f"{w.get('rate_out', 0.0):>8.1f} {workflow_lag(w):>5.1f}s "
            f"{'-' if fill is None else f'{fill:.0%}':>5} {w['errors']:>4} "
            f"{w['records_in']:>10} {w['records_out']:>10}"
        )
        for s in w["sources"]:
            lag_b = s.get("lag_bytes")
            lines.append(
                f"  <- {s['name']} ({s.get('type', '?')}) at {_fmt(s['position'])}"
                f"  lag {human_bytes(lag_b)} / {_fmt(s.get('lag_seconds'))}s"
                + (f"  snapshot {_snapshot_text(s['snapshot'])}" if s.get("snapshot") else "")
            )
        for dst in w["destinations"]:
            lines.append(
                f"  -> {dst['name']} ({dst.get('type', '?')}) written {dst['records_written']}"
                f"  at {_fmt(dst['position'])}"
            )
        reason = w.get("state_reason") if w["state"] in ("failed", "retrying") else None
        if reason:
            lines.append(f"  {w['state']}: {reason}")
        elif w.get("last_error"):
            lines.append(f"  last error: {w['last_error']}")
    return "\n".join(lines)


def _snapshot_text(snap: Any) -> str:
    if isinstance(snap, dict):
        done, total = snap.get("rows_done"), snap.get("rows_total")
        if isinstance(done, int) and isinstance(total, int) and total > 0:
            return f"{done}/{total} rows ({done / total:.0%})"
        return ", ".join(f"{k}={v}" for k, v in snap.items())
    return str(snap)


def render_workflow_detail(w: dict[str, Any]) -> str:
    """One workflow with per-table counters, recent errors and log tail."""
    lines = [render_status({"daemon": _NO_DAEMON, "workflows": [w]}).split("\n", 2)[2]]
    tables = w.get("tables") or {}
    if tables:
        lines += ["", f"{'TABLE':<32} {'INSERT':>9} {'UPDATE':>9} {'DELETE':>9} {'SNAPSHOT':>9}"]
        for t, ops in sorted(tables.items()):
            lines.append(
                f"{t:<32} {ops.get('c', 0):>9} {ops.get('u', 0):>9} {ops.get('d', 0):>9} "
                f"{ops.get('r', 0):>9}"
            )
    if w.get("recent_errors"):
        lines += ["", "recent errors:"]
        for e in w["recent_errors"][-10:]:
            lines.append(f"  {_clock(e['ts'])} {e['component']}: {e['message']}")
    if w.get("log"):
        lines += ["", "log:"]
        for e in w["log"][-15:]:
            lines.append(f"  {_clock(e['ts'])} {e['level']:<7} {e['component']}: {e['message']}")
    return "\n".join(lines)


_NO_DAEMON = {"version": "", "uptime_s": 0, "config_generation": 0, "config_errors": []}


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


if __name__ == "__main__":
    sys.exit(main())
