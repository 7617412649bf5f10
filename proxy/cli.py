"""``databroker``: serve, migrate, rotate-secrets, prune, export, erase, stats. Validates settings,
then forwards to uvicorn, Alembic, the source store or a running broker's admin API.

Every refusal ends the process with one line on stderr and a non-zero exit: a bad
or incomplete setting (2, naming the variable), a service or database that cannot
be used (1, or 3 from uvicorn when the application's start-up refuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import grp
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import click
import httpx
import orjson
from pydantic import ValidationError
from starlette.types import ASGIApp

from proxy import quiet_server, tracing
from proxy.cache import RedisCache
from proxy.database import Database, describe, prepare
from proxy.errors import StartupError
from proxy.keys import KeyLayout, make_cache_key
from proxy.logs import FORMATS, LEVELS, LogFormat, default_format, log_config
from proxy.pruner import Pruned, Pruner
from proxy.redis_pool import create_redis, is_cluster
from proxy.secrets import SecretKeyError, load_secret_box
from proxy.settings import Settings

# How long uvicorn's supervisor (--workers N) waits for a worker's answer to its
# health check before killing it. Its default, 5 s, ends workers that are still
# importing on a busy node (a spawned worker answers only once it has imported this
# module): at a load average of 12 on 2 cores, the workers of `serve --workers 2` were
# killed and restarted again and again before they served (seen in its log).
WORKER_HEALTHCHECK_TIMEOUT = 30
# prometheus-client's; named here so that serve need not import it (see _shared_metrics).
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def _refuse(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(2)


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors(include_input=False):
            name = "DATABROKER_" + str(error["loc"][0]).upper() if error["loc"] else "settings"
            reason = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
            named = reason if reason.startswith(name) else f"{name}: {reason}"
            click.echo(f"invalid setting {named}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="databroker", message="%(prog)s %(version)s")
def main() -> None:
    """A Redis-cached data broker sidecar for decision engines."""


def _socket_mode(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    """Octal permission bits of the Unix socket: the owner reads and writes, others never
    (connecting takes write permission, so 0660 is what lets a group in)."""
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o770 or mode & 0o607 != 0o600:
        raise click.BadParameter(
            f"{value!r} is not 0600, 0660 or another octal mode with owner read-write"
            " and no access for others"
        )
    return mode


def _socket_group(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """A group name or numeric id, resolved to the id."""
    if value is None or value.isdigit():
        return None if value is None else int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise click.BadParameter(f"no group named {value!r}") from None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8787, show_default=True, type=int, help="TCP port to listen on.")
@click.option("--uds", type=click.Path(path_type=Path), help="Listen on a Unix socket instead.")
@click.option(
    "--uds-mode",
    default="0600",
    show_default=True,
    metavar="MODE",
    callback=_socket_mode,
    help="Permissions of the --uds socket; 0660 lets its group connect.",
)
@click.option(
    "--uds-group",
    metavar="GROUP",
    callback=_socket_group,
    help="Group (name or id) of the --uds socket, e.g. a group the worker's container shares.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes (more than one needs Postgres and Redis).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    show_envvar=True,
    envvar="DATABROKER_LOG_LEVEL",
    type=click.Choice(LEVELS, case_sensitive=False),
    help="Lowest level logged.",
)
@click.option(
    "--log-format",
    show_envvar=True,
    envvar="DATABROKER_LOG_FORMAT",
    type=click.Choice(FORMATS, case_sensitive=False),
    help="One JSON object a line, or text. [default: json when DATABROKER_DATABASE_URL is set]",
)
@click.option(
    "--access-log",
    is_flag=True,
    show_envvar=True,
    envvar="DATABROKER_ACCESS_LOG",
    help="One line per request: method, path, status, duration, request id, run_id.",
)
def serve(
    host: str,
    port: int,
    uds: Path | None,
    uds_mode: int,
    uds_group: int | None,
    workers: int,
    log_level: str,
    log_format: LogFormat | None,
    access_log: bool,
) -> None:
    """Run the broker."""
    if uds is None and (uds_mode != 0o600 or uds_group is not None):
        raise click.UsageError("--uds-mode and --uds-group apply to --uds")
    settings = _settings()
    try:
        settings.check_serving()
    except StartupError as exc:
        _refuse(f"invalid settings: {exc}")
    if workers > 1 and settings.embedded:
        raise click.UsageError(
            "the embedded default (SQLite, in-process Redis) runs one worker; "
            "set DATABROKER_DATABASE_URL and DATABROKER_REDIS_URL for more"
        )
    if uds is None:
        _check_port(host, port)
    if tracing.configured():
        try:
            tracing.check()
        except ImportError:
            _refuse("OTEL_* variables configure traces: install them with 'databroker[otel]'")
        except StartupError as exc:
            _refuse(f"invalid settings: {exc}")
    # Here, before uvicorn: its workers would each print the failure and their parent exit 0.
    # SIGTERM meanwhile has its default effect (the process ends): nothing has started.
    from proxy.app import check_services  # the web application: for serve only

    try:
        asyncio.run(check_services(settings))
    except StartupError as exc:
        raise click.ClickException(str(exc)) from exc
    # uvicorn handles SIGTERM gracefully (drain requests, run the lifespan shutdown, ship the
    # outbox), then restores the previous handler and re-raises the signal: with the default
    # one the process would die of it (exit -15). After a clean drain, exit 0 instead.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    listener = _unix_socket(uds, uds_mode, uds_group) if uds else None
    made = _shared_metrics() if workers > 1 else None
    try:
        quiet_server.run(
            "proxy.cli:serving_app",
            factory=True,
            host=host,
            port=port,
            fd=listener.fileno() if listener else None,
            workers=workers,
            loop="uvloop",
            http="httptools",
            ws="none",  # no WebSocket route: "auto" would import the websockets package
            lifespan="on",
            access_log=False,  # ours (proxy.request_ids) replaces uvicorn's
            log_config=log_config(
                log_format or default_format(settings.database_url), log_level, access_log
            ),
            log_level=log_level,
            timeout_graceful_shutdown=int(settings.shutdown_grace),
            timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT,
        )
    finally:
        if listener is not None and uds is not None:
            listener.close()
            uds.unlink(missing_ok=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def _shared_metrics() -> Path | None:
    """With several workers, one metrics directory for all (prometheus-client's
    multiprocess mode, see proxy.metrics): ``PROMETHEUS_MULTIPROC_DIR`` if set, else a
    temporary directory made here, whose path is returned to be removed at exit.

    Set once this process has imported prometheus-client (which picks its value store
    at import) and before uvicorn spawns the workers, which inherit it: this process
    serves no metrics, so its own stay in memory and out of the sum. A previous run's
    files are removed — its counts are not this run's, nor are this process's if the
    variable was set from the start (a restarted worker's are kept: they are this run's).
    """
    given = os.environ.get(MULTIPROCESS_VARIABLE)
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="databroker-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROCESS_VARIABLE] = str(directory)
    return None if given else directory


def serving_app() -> ASGIApp:
    """The application as ``serve`` runs it: uvicorn's factory, called in each worker process."""
    from proxy.app import create_app

    if tracing.configured():
        tracing.install()  # here: the exporters' threads belong to the worker process
    return create_app(Settings(), started=_StartupGuard().started)


class _StartupGuard:
    """Until start-up completes, SIGTERM and SIGINT end the process at once.

    uvicorn's handler only sets a flag its main loop reads, and that loop starts after
    start-up: a start-up waiting on a database would not hear SIGTERM until it gave up.
    Ending at once is safe there: nothing was served yet, and whatever the outbox
    holds is on disk (exactly as after kill -9, which the outbox is built for).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        # uvicorn's own handlers: installed before it calls the factory, restored at start.
        self._handlers = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self._stop)

    @staticmethod
    def _stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        os.write(2, f"databroker: stopped by {name} during start-up\n".encode())
        os._exit(128 + signum)

    def started(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        # What start-up allocated (modules, SQLAlchemy, pydantic…) lives as long as the
        # process: kept out of the collector, a full collection scans only what requests
        # allocate. Measured under hit load: the longest GC pause went from 82 ms to 4 ms,
        # the hit p99 from 64 ms to 6 ms. Process-wide, so here and not in create_app.
        gc.freeze()


def _check_port(host: str, port: int) -> None:
    """Refuse a taken address now: uvicorn would find out only after the whole start-up.

    Bound the way asyncio's server binds (SO_REUSEADDR), then released for uvicorn.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise click.ClickException(
                    f"cannot listen on {host}:{port}: {exc.strerror}"
                ) from exc


def _exit_after_drain(_signum: int, _frame: FrameType | None) -> None:
    sys.exit(0)


def _unix_socket(path: Path, mode: int, group: int | None) -> socket.socket:
    """A Unix socket bound at ``path`` with ``mode`` and ``group``, never wider on the way.

    uvicorn's own ``uds=`` binds, then chmods the socket to 0o666: any local user could
    call the broker. Bound here under umask 0o177 instead, the file is 0600 from the
    moment it exists: there is no window between bind and chmod in which another user
    could connect. The group is set next and the mode widened last, so a group gains
    access only once it is the intended one. uvicorn then serves this socket (``fd=``).
    The umask is process-wide, but nothing else runs yet that could create a file under it.
    """
    if path.is_socket():
        path.unlink()  # left behind by a killed run; uvicorn and asyncio do the same
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        raise click.ClickException(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(umask)
    try:
        if group is not None:
            os.chown(path, -1, group)
        if mode != 0o600:
            path.chmod(mode)
    except OSError as exc:
        listener.close()
        path.unlink()
        raise click.ClickException(
            f"cannot set the group or mode of {path}: {exc.strerror}"
        ) from exc
    return listener


@main.command("migrate")
def migrate_command() -> None:
    """Apply the Alembic migrations to DATABROKER_DATABASE_URL."""
    settings = _settings()

    async def run() -> None:
        from proxy.engine import create_engine, migrate  # SQLAlchemy: serve never migrates

        # No statement timeout: building an index on a large table is not a hang.
        engine = create_engine(
            settings.resolved_database_url, settings.database_connect_timeout, None
        )
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    from alembic.util import CommandError  # here: serve never loads Alembic

    try:
        asyncio.run(run())
    except CommandError as exc:
        raise click.ClickException(f"migrate: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:
        raise click.ClickException(f"migrate: {describe(exc)}") from exc
    click.echo("database is at the latest migration")


@main.command("rotate-secrets")
def rotate_secrets_command() -> None:
    """Re-encrypt every stored variable and credential with the newest key of
    DATABROKER_SECRET_KEY."""
    settings = _settings()

    async def run() -> tuple[int, int]:
        from proxy.source_store import SourceStore  # SQLAlchemy: serve never rotates

        box = load_secret_box(settings)
        database = Database(
            settings.resolved_database_url,
            settings.database_connect_timeout,
            settings.database_command_timeout,
        )
        try:
            await prepare(database, settings.embedded)
            return await SourceStore(database.engine, box).rotate_secrets()
        finally:
            await database.close()

    try:
        variables, credentials = asyncio.run(run())
    except SecretKeyError as exc:
        click.echo(f"rotate-secrets: {exc}; nothing was changed", err=True)
        sys.exit(1)
    except StartupError as exc:
        raise click.ClickException(f"rotate-secrets: {exc}") from exc
    except Exception as exc:
        raise click.ClickException(f"rotate-secrets: {describe(exc)}") from exc
    click.echo(
        f"rotated {variables} stored variable values and {credentials} credential values "
        "to the newest key"
    )


@main.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
def prune_command(dry_run: bool) -> None:
    """Delete DataObjects and audit rows older than their source's retention, now."""
    settings = _settings()

    async def run() -> list[Pruned]:
        database = Database(
            settings.resolved_database_url,
            settings.database_connect_timeout,
            settings.database_command_timeout,
        )
        try:
            await prepare(database, settings.embedded)
            # The cache entries of pruned objects go too, where Redis is reachable from here
            # (the embedded default's is inside the serving process, which prunes its own).
            redis = None if settings.redis_url is None else create_redis(settings)
            layout = KeyLayout(settings.redis_prefix, cluster=is_cluster(settings))
            pruner = Pruner(
                database,
                settings.retention_days,
                settings.prune_batch_size,
                settings.prune_pause,
                cache=None if redis is None else RedisCache(redis, layout),
            )
            try:
                return await pruner.run(dry_run=dry_run)
            finally:
                if redis is not None:
                    await redis.aclose()
        finally:
            await database.close()

    try:
        done = asyncio.run(run())
    except StartupError as exc:
        raise click.ClickException(f"prune: {exc}") from exc
    except Exception as exc:
        raise click.ClickException(f"prune: {describe(exc)}") from exc
    if not done:
        click.echo(
            "no data source has a retention period (retention_days, DATABROKER_RETENTION_DAYS):"
            " every row is kept"
        )
    verb = "would go" if dry_run else "went"
    for pruned in done:
        cut = pruned.cut
        click.echo(
            f"{cut.name} ({cut.data_source_id}): {pruned.objects} DataObjects and"
            f" {pruned.requests} audit rows created before {cut.before.isoformat()}"
            f" ({cut.days} days) {verb}"
        )


@main.command("export")
@click.option("--source", "name", required=True, help="The data source's name.")
@click.option(
    "--from",
    "first",
    required=True,
    type=click.DateTime(["%Y-%m-%d"]),
    help="First UTC day, YYYY-MM-DD (included).",
)
@click.option(
    "--to",
    "last",
    required=True,
    type=click.DateTime(["%Y-%m-%d"]),
    help="Last UTC day, YYYY-MM-DD (included).",
)
@click.option(
    "--format",
    "form",
    default="jsonl",
    show_default=True,
    type=click.Choice(["jsonl", "parquet"]),
    help="One JSON object a line, or Parquet (the parquet extra).",
)
@click.option("--output", type=click.Path(path_type=Path), help="A file instead of stdout.")
@click.option("--project-id", type=click.UUID, help="The source's project (default: the setting).")
def export_command(
    name: str,
    first: datetime,
    last: datetime,
    form: str,
    output: Path | None,
    project_id: uuid.UUID | None,
) -> None:
    """Write a source's DataObjects created FROM..TO (UTC days, inclusive), for backtests."""
    from proxy import export  # here: the serving process never exports

    start, end = export.day_range(first.date(), last.date())
    if end <= start:
        raise click.UsageError("--to is before --from")
    if form == "parquet" and not export.parquet_available():
        raise click.UsageError("--format parquet needs pyarrow: pip install 'databroker[parquet]'")
    settings = _settings()
    project = project_id or settings.project_id

    async def run() -> int:
        database = Database(
            settings.resolved_database_url,
            settings.database_connect_timeout,
            # No statement timeout: the cursor stays open as long as the export writes.
            None,
        )
        engine = database.engine
        try:
            await prepare(database, settings.embedded)
            source = await export.find_source(engine, name, project)
            if source is None:
                raise click.ClickException(f"export: no data source named {name!r}")
            progress = None
            if output is not None or sys.stderr.isatty():
                total = await export.count(engine, source, start, end)
                progress = export.Progress(total, sys.stderr)
            with contextlib.ExitStack() as files:
                out = files.enter_context(output.open("wb")) if output else sys.stdout.buffer
                writer: export.Writer = (
                    export.Parquet(out) if form == "parquet" else export.JsonLines(out)
                )
                return await export.export(engine, source, start, end, writer, progress)
        finally:
            await database.close()

    try:
        asyncio.run(run())
    except click.ClickException:
        raise
    except StartupError as exc:
        raise click.ClickException(f"export: {exc}") from exc
    except Exception as exc:
        raise click.ClickException(f"export: {describe(exc)}") from exc


def _params(_ctx: click.Context, _param: click.Parameter, value: str) -> dict[str, Any]:
    """The JSON object the engine sends as ``configured_params``: the key is made from it."""
    try:
        params = orjson.loads(value)
    except orjson.JSONDecodeError:
        params = None
    if not isinstance(params, dict):
        raise click.BadParameter("not a JSON object")
    return params


def _admin_client(url: str, command: str) -> httpx.Client:
    """A client of a running broker's admin API, with the token of DATABROKER_ADMIN_TOKEN."""
    token = _settings().admin_token
    if token is None:
        _refuse(
            f"invalid settings: DATABROKER_ADMIN_TOKEN is not set ({command} uses the admin API)"
        )
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def _admin_call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    """An admin route's JSON answer; a refusal as one line with its code (never a value)."""
    try:
        answer = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise click.ClickException(
            f"cannot reach the broker at {client.base_url}: {type(exc).__name__}"
        ) from exc
    if answer.is_success:
        return answer.json()
    try:
        error = answer.json()
        detail = error["detail"]
        if isinstance(detail, list):  # a 422: FastAPI's list of {loc, msg, type}
            detail = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)
        reason = f"{error['code']}: {detail}"
    except (ValueError, KeyError, TypeError):
        reason = f"HTTP {answer.status_code}"
    raise click.ClickException(f"{method} {path}: {reason}")


# The admin commands' broker: one default for all of them, serve's own.
_broker_url = click.option(
    "--url", default="http://127.0.0.1:8787", show_default=True, help="A running broker."
)


@main.command("erase")
@click.option("--source", "name", required=True, help="The data source's name.")
@click.option(
    "--params",
    required=True,
    callback=_params,
    help="The configured_params whose DataObjects go, as JSON.",
)
@click.option("--project-id", type=click.UUID, help="The source's project (default: the broker's).")
@_broker_url
def erase_command(
    name: str, params: dict[str, Any], project_id: uuid.UUID | None, url: str
) -> None:
    """Erase the DataObjects and cache entry of one key, through a running broker's admin API.

    Every source of that name is erased, archived ones included: each has its own key for
    the same params. Audit rows stay, their object reference cleared and erased_at set.
    """
    project = {} if project_id is None else {"project_id": str(project_id)}
    with _admin_client(url, "erase") as client:
        listed = _admin_call(
            client, "GET", "/data-sources", params={"include_archived": "true", **project}
        )
        found = [source for source in listed if source["name"] == name]
        if not found:
            raise click.ClickException(f"no data source named {name!r} in this project")
        for source in found:
            key = make_cache_key(source["data_source_id"], params)
            done = _admin_call(
                client,
                "DELETE",
                f"/data-sources/{source['data_source_id']}/objects",
                params={"key": key, **project},
            )
            click.echo(
                f"{name} ({source['data_source_id']}, {source['status']}): key {key}:"
                f" {done['data_objects_erased']} DataObjects erased,"
                f" {done['audit_rows_marked']} audit rows marked erased"
            )


@main.command("stats")
@_broker_url
@click.option("--project-id", type=click.UUID, help="The project (default: the broker's).")
@click.option("--start-date", help="First UTC day, YYYY-MM-DD (default: 29 days before the end).")
@click.option("--end-date", help="Last UTC day, YYYY-MM-DD (default: today).")
def stats_command(
    url: str, project_id: uuid.UUID | None, start_date: str | None, end_date: str | None
) -> None:
    """Print hit rate, average latency, error rate and top sources of a running broker.

    Reads GET /analytics/summary of its admin API (token: DATABROKER_ADMIN_TOKEN).
    """
    from proxy.analytics import render  # here: the serving process renders no table

    given = {"project_id": project_id, "start_date": start_date, "end_date": end_date}
    params = {name: str(value) for name, value in given.items() if value is not None}
    with _admin_client(url, "stats") as client:
        summary = _admin_call(client, "GET", "/analytics/summary", params=params)
    click.echo(render(summary))


@main.group("sources")
def sources_group() -> None:
    """Data sources kept as files, applied to a running broker."""


@sources_group.command("apply")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--project-id", type=click.UUID, help="The sources' project (default: the broker's).")
@_broker_url
def sources_apply_command(
    directory: Path, dry_run: bool, project_id: uuid.UUID | None, url: str
) -> None:
    """Create, update and publish the sources DIRECTORY's files describe (.json, .yaml).

    Idempotent: a source already as its file says is left alone; sources no file names
    are never touched. Variable values come from the environment or files (variables_from),
    read before anything changes, and are never printed. Through the admin API of the
    broker at --url (token: DATABROKER_ADMIN_TOKEN).
    """
    from proxy.source_files import SourceFileError, describe, plan, read_dir, variable_values

    try:
        files = read_dir(directory)
        values = {file.spec["name"]: variable_values(file) for file in files}
    except SourceFileError as exc:
        raise click.ClickException(str(exc)) from exc
    project = {} if project_id is None else {"project_id": str(project_id)}
    with _admin_client(url, "sources apply") as client:
        steps = plan(files, _admin_call(client, "GET", "/data-sources", params=project))
        for step in steps:
            for line in describe(step, dry_run):
                click.echo(line)
            if dry_run:
                continue
            path = f"/data-sources/{step.data_source_id}"
            if step.action == "create":
                made = _admin_call(
                    client, "POST", "/data-sources", json=step.file.spec, params=project
                )
                path = f"/data-sources/{made['data_source_id']}"
            elif step.action == "update":
                _admin_call(client, "PUT", path, json=step.file.spec, params=project)
            if values[step.name]:
                _admin_call(
                    client, "PUT", f"{path}/variables", json=values[step.name], params=project
                )
            if step.publish:
                _admin_call(client, "POST", f"{path}/publish", params=project)
    counts = {action: sum(s.action == action for s in steps) for action in ("create", "update")}
    published = sum(s.publish for s in steps)
    click.echo(
        f"{'dry run: ' if dry_run else ''}{counts['create']} to create, {counts['update']} to"
        f" update, {published} to publish, {len(steps) - sum(counts.values())} unchanged"
    )
