"""The command-line interface: ``python -m engine COMMAND``.

Its names, output formats and exit codes are a contract (see docs/cli.md):
0 success, 1 a waited-for project failed or was cancelled, 2 invalid input,
3 not found, 4 forbidden, 5 cluster unavailable.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from engine import accounts, cluster, export, projects
from engine.errors import ConstellationError
from engine.models import Project
from engine.settings import Settings
from engine.status import ProjectStatus
from engine.verification import Comparison
from engine.store import Store

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine",
                                     description="Constellation: run main(row) over a dataset on a Ray cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="submit a script and a dataset as a new project")
    submit.add_argument("script", type=Path)
    submit.add_argument("dataset", type=Path)
    submit.add_argument("--title")
    submit.add_argument("--description", default="")
    submit.add_argument("--owner", help="user name (default: the command line's own account, "
                                        "'admin')")
    submit.add_argument("--batch-size", type=int)
    submit.add_argument("--row-timeout", type=float)
    submit.add_argument("--replication", type=int,
                        help="volunteers that must agree on each row (default: the setting, 2)")
    submit.add_argument("--comparison", choices=[c.value for c in Comparison],
                        default=Comparison.EXACT.value)
    submit.add_argument("--memory-limit-mb", type=int, help="address space per row's process")
    submit.add_argument("--output-limit-mb", type=int, help="largest output of one row")
    submit.add_argument("--tolerance", type=float, default=1e-9,
                        help="relative tolerance of the numeric comparison")
    submit.add_argument("--wait", action="store_true",
                        help="block until the project ends; exit 0 if complete, 1 otherwise")

    status = commands.add_parser("status", help="a project's status")
    status.add_argument("id", type=int)
    status.add_argument("--json", action="store_true")

    results = commands.add_parser("results", help="a project's results, in dataset order")
    results.add_argument("id", type=int)
    results.add_argument("--format", choices=export.FORMATS, default="json")
    results.add_argument("--output", type=Path, help="write to this file instead of stdout")
    results.add_argument("--no-escape-formulas", dest="escape_formulas", action="store_false",
                         help="CSV: write cells that begin with = + - @ tab or CR as they are "
                              "(by default they get a leading ' so that spreadsheets show them "
                              "as text; see docs/datasets.md)")

    cancel = commands.add_parser("cancel", help="cancel a project; stored results stay")
    cancel.add_argument("id", type=int)

    listing = commands.add_parser("list", help="all projects")
    listing.add_argument("--json", action="store_true")

    rerun = commands.add_parser("rerun-failed", help="run a finished project's failed rows again")
    rerun.add_argument("id", type=int)

    backup = commands.add_parser("backup", help="copy the database (SQLite online backup)")
    backup.add_argument("path", type=Path)

    user = commands.add_parser("user", help="manage portal accounts")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    user_add = user_commands.add_parser("add", help="add an account (the only way to make an admin)")
    user_add.add_argument("name")
    user_add.add_argument("--role", action="append", required=True,
                          choices=[r.value for r in accounts.Role],
                          help="repeat for several roles")
    user_add.add_argument("--email", default="")
    user_add.add_argument("--password-stdin", action="store_true", required=True,
                          help="read the password from the first line of standard input")
    user_list = user_commands.add_parser("list", help="all accounts")
    user_list.add_argument("--json", action="store_true")
    user_disable = user_commands.add_parser("disable", help="stop an account from signing in")
    user_disable.add_argument("name")
    user_enable = user_commands.add_parser("enable", help="let a disabled account sign in again")
    user_enable.add_argument("name")
    user_grant = user_commands.add_parser("grant", help="give an account another role")
    user_grant.add_argument("name")
    user_grant.add_argument("--role", required=True, choices=[r.value for r in accounts.Role])
    user_commands.add_parser(
        "reclaim-admin", help=f"make '{accounts.LOCAL_ADMIN}' the command line's own account again "
                              f"(if someone registered the name before it was reserved): the "
                              f"admin role, no password, its sessions ended")

    join = commands.add_parser("join-command", help="the command that joins a machine as VOLUNTEER's node")
    join.add_argument("volunteer")
    commands.add_parser("rotate-cluster-token",
                        help="replace the cluster token: every node must join again with the "
                             "new join command; a running `engine serve` restarts its Ray head")
    approve = commands.add_parser(
        "approve-volunteer", help="let VOLUNTEER see the join command while the "
                                  "volunteer_approval setting is on")
    approve.add_argument("volunteer")
    rotate = commands.add_parser("rotate-signature",
                                 help="void VOLUNTEER's node signature; their nodes must re-join")
    rotate.add_argument("volunteer")
    node_list = commands.add_parser("nodes", help="the node registry")
    node_list.add_argument("--json", action="store_true")
    trust = commands.add_parser(
        "trust-node", help="mark NODE (an id, or its first 12 characters) as one of the "
                           "operator's own machines: its results are accepted without replication")
    trust.add_argument("node")
    trust.add_argument("--undo", action="store_true", help="no longer trust it")
    board = commands.add_parser("leaderboard", help="volunteers ranked by credit")
    board.add_argument("--window", choices=["24h", "7d", "all"], default="all")
    board.add_argument("--json", action="store_true")

    commands.add_parser("init", help="create the database, the cluster token and the command "
                                     "line's own account ('admin', without a password)")
    commands.add_parser("dispatcher", help="run the dispatcher in the foreground")
    serve = commands.add_parser("serve", help="run the Ray head, the dispatcher and the portal (make run)")
    serve.add_argument("--no-portal", action="store_true", help="run only the head and the dispatcher")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    long_running = args.command in ("dispatcher", "serve")
    level = settings.log_level if (long_running or args.verbose) else "WARNING"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args, settings)
    except ConstellationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; that is not an error of ours.
        sys.stderr.close()
        return 0


def _print(args, views: list, line: Callable[[Any], str]) -> int:
    """A listing on stdout: with ``--json`` one JSON array of the views, else one line each."""
    if args.json:
        print(json.dumps([v.to_dict() for v in views]))
    else:
        for v in views:
            print(line(v))
    return 0


def _actor(store: Store, owner: str | None):
    return accounts.get_user(store, owner) if owner else accounts.local_admin(store)


def _submit(args, settings: Settings) -> int:
    store = Store(settings)
    actor = _actor(store, args.owner)
    for path in (args.script, args.dataset):
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    project_id = projects.submit_project(
        store, settings, actor, title=args.title or args.script.name,
        description=args.description, script_name=args.script.name,
        script_bytes=args.script.read_bytes(), dataset_name=args.dataset.name,
        dataset_bytes=args.dataset.read_bytes(), batch_size=args.batch_size,
        row_timeout=args.row_timeout, replication=args.replication, comparison=args.comparison,
        tolerance=args.tolerance, memory_limit_mb=args.memory_limit_mb,
        output_limit_mb=args.output_limit_mb)
    print(project_id, flush=True)
    if not args.wait:
        return 0
    final = wait_for_project(store, settings, project_id)
    return 0 if final is ProjectStatus.COMPLETE else 1


def wait_for_project(store: Store, settings: Settings, project_id: int) -> ProjectStatus:
    """Block until the project ends. Hands it to a live dispatcher, or runs one meanwhile."""
    from engine.scheduler import Dispatcher

    last_notice: list[str | None] = [None]

    def status() -> ProjectStatus:
        with store.session() as session:
            project = session.get(Project, project_id)
            if project.notice != last_notice[0] and project.notice:
                # e.g. "waiting for 1 more volunteer": say so rather than hang in silence.
                print(f"project {project_id}: {project.notice} (replication {project.replication}; "
                      f"--replication 1 runs without verification)", file=sys.stderr, flush=True)
            last_notice[0] = project.notice
            return ProjectStatus(project.status)

    while not status().is_terminal():
        if store.lease_holder() is not None:
            time.sleep(0.05)
            continue
        head = cluster.ensure_head(settings)
        try:
            Dispatcher(store, settings).run(until=lambda: status().is_terminal())
        finally:
            import ray

            ray.shutdown()
            if head is not None:
                head.stop(grace=2)
    return status()


def _status(args, settings: Settings) -> int:
    store = Store(settings)
    view = projects.project_status(store, accounts.local_admin(store), args.id)
    if args.json:
        print(json.dumps(view.to_dict()))
    else:
        print(f"project {view.id} ({view.title}): {view.status}; {view.rows_succeeded} succeeded, "
              f"{view.rows_failed} failed, {view.rows_pending} pending of {view.rows_total}")
        if view.error:
            print(f"error: {view.error}")
    return 0


def _results(args, settings: Settings) -> int:
    store = Store(settings)
    actor = accounts.local_admin(store)
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as out:
            export.export_results(store, actor, args.id, args.format, out,
                                  escape_formulas=args.escape_formulas)
    else:
        export.export_results(store, actor, args.id, args.format, sys.stdout,
                              escape_formulas=args.escape_formulas)
    return 0


def _cancel(args, settings: Settings) -> int:
    store = Store(settings)
    projects.cancel_project(store, accounts.local_admin(store), args.id)
    return 0


def _rerun_failed(args, settings: Settings) -> int:
    store = Store(settings)
    count = projects.rerun_failed_rows(store, accounts.local_admin(store), args.id)
    print(f"project {args.id}: {count} failed rows will run again")
    return 0


def _backup(args, settings: Settings) -> int:
    path = Store(settings).backup(args.path)
    print(f"backed up to {path}")
    return 0


def _list(args, settings: Settings) -> int:
    store = Store(settings)
    views = projects.list_projects(store, accounts.local_admin(store))
    return _print(args, views, lambda v: f"{v.id}\t{v.status}\t{v.rows_succeeded + v.rows_failed}"
                                         f"/{v.rows_total}\t{v.title}")


def _user(args, settings: Settings) -> int:
    store = Store(settings)
    if args.user_command == "add":
        password = sys.stdin.readline().rstrip("\r\n")
        user = accounts.add_user(store, args.name, {accounts.Role(r) for r in args.role},
                                 password=password, email=args.email)
        print(f"user {user.name} added ({user.roles})")
    elif args.user_command == "list":
        views = accounts.list_users(store, accounts.local_admin(store))
        _print(args, views, lambda v: f"{v.name}\t{','.join(v.roles)}\t"
                                      f"{'disabled' if v.disabled else 'active'}\t{v.email}")
    elif args.user_command == "enable":
        accounts.enable_user(store, accounts.local_admin(store), args.name)
        print(f"user {args.name} enabled")
    elif args.user_command == "grant":
        user = accounts.grant_role(store, accounts.local_admin(store), args.name,
                                   accounts.Role(args.role))
        print(f"user {user.name}: roles {user.roles}")
    elif args.user_command == "reclaim-admin":
        accounts.reclaim_local_admin(store)
        print(f"user {accounts.LOCAL_ADMIN} is the command line's own account again")
    else:
        accounts.disable_user(store, accounts.local_admin(store), args.name)
        print(f"user {args.name} disabled")
    return 0


def _join_command(args, settings: Settings) -> int:
    from engine import nodes

    print(nodes.join_command(Store(settings), settings, args.volunteer))
    return 0


def _approve_volunteer(args, settings: Settings) -> int:
    store = Store(settings)
    accounts.approve_volunteer(store, accounts.local_admin(store), args.volunteer)
    print(f"volunteer {args.volunteer} approved: the portal's Join page shows them the join command"
          + ("" if settings.volunteer_approval else " (volunteer_approval is off: it already did)"))
    return 0


def _rotate_cluster_token(args, settings: Settings) -> int:
    cluster.rotate_cluster_token(settings)
    print("The cluster token was replaced. A running `engine serve` restarts its Ray head "
          "within seconds (the dispatcher with it); every volunteer's node leaves the cluster "
          "and must join again with the new command from the portal's Join page (or "
          "`join-command NAME`). Old join commands no longer join.")
    return 0


def _rotate_signature(args, settings: Settings) -> int:
    from engine import nodes

    generation = nodes.rotate_signature(Store(settings), args.volunteer)
    print(f"volunteer {args.volunteer}: signature rotated (generation {generation}); "
          f"their nodes earn again once they re-join with the new join command")
    return 0


def _nodes(args, settings: Settings) -> int:
    from engine import credit, nodes

    store = Store(settings)
    credit.refresh(store)  # the dispatcher may not be running to keep the counts fresh
    return _print(args, nodes.list_nodes(store), lambda v: (
        f"{nodes.short_id(v.node_id)}\t{v.status}\t{v.attribution}\t{v.cpus:g} CPUs\t"
        f"{v.tasks_completed} tasks\t{v.host}\t{v.health}"
        + (f" ({v.health_reason})" if v.health_reason else "") + ("\ttrusted" if v.trusted else "")))


def _trust_node(args, settings: Settings) -> int:
    from engine import nodes

    nodes.set_trusted(Store(settings), args.node, not args.undo)
    print(f"node {args.node}: {'no longer trusted' if args.undo else 'trusted'}")
    return 0


def _leaderboard(args, settings: Settings) -> int:
    from engine import credit

    store = Store(settings)
    credit.refresh(store)
    return _print(args, credit.leaderboard(store, args.window), lambda r: (
        f"{r.rank}\t{r.volunteer}\t{r.credit:.6f}\t{r.tasks} tasks\t{r.nodes} nodes"))


def _init(args, settings: Settings) -> int:
    store = Store(settings)
    cluster.cluster_token(settings)
    accounts.local_admin(store)  # reserved from the start: nobody can register the name first
    print(f"database ready (schema {store.schema_version()}) at {settings.database_url}")
    return 0


EXIT_HEAD_LOST = 75


def _dispatcher(args, settings: Settings) -> int:
    from engine.scheduler import Dispatcher, HeadLost

    # SIGTERM (from the supervisor) unwinds normally, so the lease is released at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        Dispatcher(Store(settings), settings).run()
    except HeadLost as exc:
        logger.error("dispatcher: %s; exiting so that the supervisor can recover", exc)
        return EXIT_HEAD_LOST
    return 0


def _serve(args, settings: Settings) -> int:
    from engine.supervisor import Supervisor

    # The command line's own account exists before the portal lets anyone register.
    accounts.local_admin(Store(settings))
    return Supervisor(settings, portal=not args.no_portal).run()


_COMMANDS = {"submit": _submit, "status": _status, "results": _results, "cancel": _cancel,
             "list": _list, "init": _init, "rerun-failed": _rerun_failed, "backup": _backup,
             "user": _user,
             "join-command": _join_command, "approve-volunteer": _approve_volunteer,
             "rotate-signature": _rotate_signature,
             "rotate-cluster-token": _rotate_cluster_token, "nodes": _nodes, "trust-node": _trust_node, "leaderboard": _leaderboard,
             "dispatcher": _dispatcher, "serve": _serve}
