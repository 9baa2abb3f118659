"""The ``quantgate`` command: parse, call the API, map errors to exit codes, print.

Exit codes: 0 a candidate passed and was registered; 1 ran, none passed, nothing registered;
2 bad input or configuration; 3 a failure inside quantgate or a backend (nothing left half-registered).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantgate.console import ProgressHandler, history_table, print_summary
from quantgate.errors import InputError, QuantgateError

if TYPE_CHECKING:
    from quantgate.automation.config import AutomationConfig

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress registered MLflow models, gate them on this hardware, register the winners.",
)
local_prefect = typer.Typer(no_args_is_help=True, help="The local Prefect server quantgate starts for itself.")
app.add_typer(local_prefect, name="local-prefect")
webhooks_app = typer.Typer(no_args_is_help=True, help="MLflow registry webhooks that start compressions.")
app.add_typer(webhooks_app, name="webhooks")
stack_app = typer.Typer(no_args_is_help=True, help="The whole automation as local processes (make stack).")
app.add_typer(stack_app, name="stack")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="automation config YAML (default: every model with data tags)")
]
TrackingOption = Annotated[str | None, typer.Option(help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")]

err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped output (CI logs) gets a wide table instead of rich's 80-column default.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    # Some warnings get past that filter (MLflow shows its UserWarnings "once" whatever the filters say, e.g. for a
    # plugin's pyfunc model without type hints, at import): they go to logging, quiet, not to the stderr we own.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.CRITICAL)
    for name in ("mlflow", "alembic", "prefect", "urllib3", "httpx", "onnxruntime", "root", "torch", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # MLflow 3 sends usage telemetry by default; a CI plugin on a closed network should not try.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow prints run URLs to stdout (which --json owns) and INFO progress to stderr.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _drop_library_root_handlers() -> None:
    """Some imports (mlflow.pytorch's dependencies) call logging.basicConfig, which echoes every INFO
    record that propagates to the root logger, Prefect's task-run logs included, onto the user's terminal."""
    for handler in list(logging.root.handlers):
        if type(handler) is logging.StreamHandler:
            logging.root.removeHandler(handler)
    if not logging.root.handlers:
        # onnxruntime's quantizer logs through logging.info(), which calls basicConfig() on a root logger
        # without handlers and so would put the echo right back.
        logging.root.addHandler(logging.NullHandler())
    # And a library imported later (mlflow.pytorch during intake) may call basicConfig again: Prefect's run
    # logs still reach its API handler, but never the root logger.
    logging.getLogger("prefect").propagate = False


def _fail(message: str, code: int) -> typer.Exit:
    from quantgate.redact import redact

    lines = message.strip().splitlines() or ["(no message)"]
    err.print(f"quantgate: error: {redact(lines[0])}", markup=False)
    return typer.Exit(code)


def _mlflow_error(exc: BaseException) -> str:
    """An MLflow client failure (5xx, a dropped connection, a refused request) as the one line a user reads."""
    lines = str(exc).strip().splitlines()
    return f"MLflow: {lines[0] if lines else type(exc).__name__}"


def _is_mlflow_error(exc: BaseException) -> bool:
    # Not imported to check: a command that never imported MLflow cannot have raised its exception.
    module = sys.modules.get("mlflow.exceptions")
    return module is not None and isinstance(exc, module.MlflowException)


P = ParamSpec("P")
R = TypeVar("R")


def exit_codes(command: Callable[P, R]) -> Callable[P, R]:
    """Every command's errors as the documented exit codes, with one line on stderr (README, "Exit codes"):
    bad input or configuration 2; quantgate's other errors and MLflow's 3. Anything else is a bug: ``main``
    prints its traceback."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except InputError as exc:
            raise _fail(str(exc), EXIT_BAD_INPUT) from None
        except QuantgateError as exc:
            raise _fail(str(exc), EXIT_INTERNAL) from None
        except Exception as exc:
            if _is_mlflow_error(exc):
                raise _fail(_mlflow_error(exc), EXIT_INTERNAL) from None
            raise

    return run


def _use_tracking_uri(uri: str, *, create: bool = False) -> str:
    """Check the URI before anything touches it, and keep it (with its credentials) in this process's environment
    only; what flow-run parameters and outputs carry is the masked form."""
    from quantgate import registry

    registry.check_tracking_uri(uri, create=create)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return registry.flow_tracking_uri(uri)


def _run_flow(model_uri: str, policy: dict[str, Any], tracking_uri: str, show_progress: bool) -> dict[str, Any]:
    from quantgate.flows.compress import compress_model

    _drop_library_root_handlers()
    qlog = logging.getLogger("quantgate")
    qlog.setLevel(logging.INFO)
    qlog.propagate = False  # progress goes to the spinner; Prefect's API handler still gets flow logs
    # Whatever a library print()s while the flow runs is not ours to show: stdout carries --json.
    with contextlib.redirect_stdout(io.StringIO()):
        if not show_progress:
            return compress_model(model_uri, policy, tracking_uri)
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
        with Progress(*columns, TextColumn("[dim]{task.fields[note]}"), console=err, transient=True) as progress:
            handler = ProgressHandler(progress)
            qlog.addHandler(handler)
            try:
                return compress_model(model_uri, policy, tracking_uri)
            finally:
                qlog.removeHandler(handler)


@app.command()
@exit_codes
def compress(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@ALIAS")],
    policy: Annotated[Path | None, typer.Option("--policy", "-p", help="policy YAML (defaults: README)")] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False,
    prefect: Annotated[str, typer.Option(help="local (reused local server) or ephemeral")] = "local",
) -> None:
    """Compress one registered model version, gate every candidate, register what passes."""
    from quantgate import gate, registry
    from quantgate.flows.prefect_server import PrefectStart
    from quantgate.policy import load_policy
    from quantgate.validators.base import load_validators

    _quiet_libraries()
    pol = load_policy(policy)
    registry.parse_model_uri(model_uri)
    uri = tracking_uri or registry.default_tracking_uri()
    shown = _use_tracking_uri(uri)
    starting = PrefectStart(prefect)
    gate.configure(pol.gate, load_validators())  # gate.checks against what is installed (the flow checks it too)
    registry.check_reachable(uri)
    _preload_backends(pol.backends)
    starting.wait()
    doc = _run_flow(model_uri, pol.model_dump(mode="json"), shown, err.is_terminal and not as_json)
    doc["timings_s"]["process_start_to_flow_s"] = doc["timings_s"]["flow_started_at"] - _process_start()
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        print_summary(out, doc)
    raise typer.Exit(EXIT_OK if doc["promoted_uri"] else EXIT_GATE_FAILED)


@app.command()
@exit_codes
def report(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION or @ALIAS: a source or a compressed version")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    ] = None,
    html: Annotated[Path | None, typer.Option("--html", help="also write the self-contained HTML report here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result document as JSON")] = False,
) -> None:
    """Print the latest gate table for a model version (its own compression, or the one that produced it)."""
    from quantgate import registry, review
    from quantgate import report as reports

    _quiet_libraries()
    ref = registry.parse_model_uri(model_uri)
    uri = tracking_uri or registry.default_tracking_uri()
    _use_tracking_uri(uri)
    client = registry.connect(uri)
    version = registry.resolve(client, ref)
    run_id = review.result_run_id(client, version)
    doc = review.load_result(client, run_id)
    gate = _logged_gate(client, run_id)
    if html is not None:
        try:
            html.write_text(reports.html_report(doc, gate))
        except OSError as exc:
            raise InputError(f"cannot write {html}: {exc.strerror}") from None
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return
    print_summary(out, doc)
    out.print(f"run {run_id} in experiment '{doc.get('experiment', '?')}', policy {doc.get('policy_hash', '?')}")
    if html is not None:
        out.print(f"HTML report written to {escape(str(html))}")


def _logged_gate(client: Any, run_id: str) -> dict[str, Any] | None:
    """The gate thresholds of the policy that run used (for threshold lines in the plots), if logged."""
    from quantgate import names, review

    with contextlib.suppress(InputError):
        policy = review.load_artifact_json(client, run_id, names.POLICY)
        gate = policy.get("gate")
        return gate if isinstance(gate, dict) else None
    return None


@app.command()
@exit_codes
def history(
    name: Annotated[str, typer.Argument(help="a registered model name")],
    tracking_uri: Annotated[
        str | None, typer.Option(help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the attempts as a JSON list")] = False,
) -> None:
    """List every compression attempt for a registered model, newest first, with outcome and policy hash."""
    from quantgate import registry, review

    _quiet_libraries()
    uri = tracking_uri or registry.default_tracking_uri()
    _use_tracking_uri(uri)
    client = registry.connect(uri)
    attempts = review.history(client, name)
    if as_json:
        sys.stdout.write(json.dumps([a.as_dict() for a in attempts], indent=2) + "\n")
        return
    if not attempts:
        out.print(f"no compression attempts recorded for '{escape(name)}'")
        return
    out.print(history_table(name, attempts))


def _preload_backends(names: tuple[str, ...]) -> None:
    """Import the backends' libraries while the Prefect server may still be starting."""
    from quantgate.plugins.base import backend_names, load_backend

    for name in names:
        if name in backend_names():
            try:
                load_backend(name).available()
            except QuantgateError:
                continue  # reported properly, per candidate, inside the flow


def _process_start() -> float:
    import psutil

    return float(psutil.Process().create_time())


@app.command()
@exit_codes
def demo(
    tracking_uri: Annotated[
        str | None, typer.Option(help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    ] = None,
    workdir: Annotated[Path, typer.Option(help="where the demo writes its data sets")] = Path("demo-data"),
    prefect: Annotated[str, typer.Option(help="local (reused local server) or ephemeral")] = "local",
    register_only: Annotated[
        bool, typer.Option("--register-only", help="only train and register (with data tags): automation compresses")
    ] = False,
) -> None:
    """Train a small CNN on scikit-learn's digits, register it, compress it, show the gate table."""
    from quantgate import registry
    from quantgate.demo import register_demo_model
    from quantgate.flows.prefect_server import PrefectStart

    _quiet_libraries()
    uri = tracking_uri or registry.default_tracking_uri()
    shown = _use_tracking_uri(uri, create=True)
    registry.connect(uri)
    with err.status("[bold]quantgate[/] training the digits CNN", spinner="dots"):
        model_uri = register_demo_model(uri, workdir.resolve())
    if register_only:
        out.print(f"registered {model_uri} with its data tags")
        return
    err.print(f"registered {model_uri}; compressing it")
    PrefectStart(prefect).wait()
    doc = _run_flow(model_uri, {}, shown, err.is_terminal)
    print_summary(out, doc)
    out.print(f"\nOpen the results: mlflow ui --backend-store-uri {shown} --port 5000  ->  http://127.0.0.1:5000")
    out.print(
        f"  experiment '{doc['experiment']}', run {doc['parent_run_id']}; models: {model_uri}"
        + (f", {doc['promoted_uri']}" if doc["promoted_uri"] else "")
    )
    raise typer.Exit(EXIT_OK if doc["promoted_uri"] else EXIT_GATE_FAILED)


@app.command()
@exit_codes
def backends() -> None:
    """List every installed backend, whether it is available on this host, and why not."""
    from quantgate.plugins.base import BACKENDS, ReferenceRuntime, reference_name

    _quiet_libraries()
    reference = reference_name()
    table = Table("backend", "available", "why not / what runs here")
    for plugin in BACKENDS.installed():
        if plugin.error is not None:
            table.add_row(plugin.name, "[red]refused[/]", escape(plugin.error))
            continue
        backend = BACKENDS.load(plugin.name)
        status = backend.available()
        ref = (
            "; the reference runtime for ranking"
            if isinstance(backend, ReferenceRuntime) and (backend.name == reference)
            else ""
        )
        if status.ok:
            table.add_row(plugin.name, "[green]yes[/]", ref.removeprefix("; "))
            continue
        why = escape(f"{status.reason} ({status.hint})" if status.hint else status.reason)
        if status.prepares_here:
            why += "; its host-independent step (and a quality check on the reference runtime) still runs here"
        table.add_row(plugin.name, "[red]no[/]", why + ref)
    out.print(table)


@app.command()
@exit_codes
def validators() -> None:
    """List every installed validator, the gate checks it declares, and why one that is installed cannot be used."""
    from quantgate.gate import policy_key
    from quantgate.validators.base import VALIDATORS, check_declarations, declared_checks

    _quiet_libraries()
    table = Table("validator", "entry point", "loaded", "gate checks: the policy key that sets them", "why not")
    for plugin in VALIDATORS.installed():
        ok = plugin.error is None
        specs = declared_checks(VALIDATORS.load(plugin.name)) if ok else ()
        checks = ", ".join(f"{s.name}: {policy_key(plugin.name, s.name)}" for s in specs)
        loaded = "[green]yes[/]" if ok else "[red]refused[/]"
        table.add_row(plugin.name, plugin.target, loaded, escape(checks), escape(plugin.error or ""))
    out.print(table)
    check_declarations(VALIDATORS.loadable())  # two that declare the same name stop every run: say so here too


def _automation(config: Path | None, tracking_uri: str | None) -> tuple[AutomationConfig, str]:
    from quantgate import registry
    from quantgate.automation.config import load_config

    cfg = load_config(config)
    return cfg, tracking_uri or cfg.tracking_uri or registry.default_tracking_uri()


@app.command("serve-webhooks")
@exit_codes
def serve_webhooks(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8088,
    config: ConfigOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Run the webhook bridge: verified MLflow registry events in, compress-model flow runs out.

    Env: QUANTGATE_WEBHOOK_SECRET (required), QUANTGATE_WEBHOOK_DB, PREFECT_API_URL, MLFLOW_TRACKING_URI.
    """
    import uvicorn

    from quantgate.automation.bridge import make_app

    _quiet_libraries()
    cfg, uri = _automation(config, tracking_uri)
    app_ = make_app(cfg, uri)
    logging.getLogger("quantgate").setLevel(logging.INFO)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
@exit_codes
def deploy(config: ConfigOption = None, tracking_uri: TrackingOption = None) -> None:
    """Create the work pool and the compress-model and nightly deployments on the Prefect server (PREFECT_API_URL)."""
    from quantgate.flows.deployments import deploy as apply_deployments
    from quantgate.redact import redact

    _quiet_libraries()
    cfg, uri = _automation(config, tracking_uri)
    apply_deployments(cfg, uri)
    out.print(
        f"work pool {cfg.pool.name} (concurrency {cfg.pool.concurrency_limit}); deployments"
        f" compress-model/compress-model and nightly/nightly ({escape(cfg.nightly.cron)} {cfg.nightly.timezone});"
        f" tracking {escape(redact(uri))}"
    )


@app.command()
@exit_codes
def nightly(config: ConfigOption = None, tracking_uri: TrackingOption = None) -> None:
    """Run the nightly reconciliation now: a compress-model run for every selected version without a result."""
    from quantgate.flows.nightly import nightly as nightly_flow

    _quiet_libraries()
    cfg, uri = _automation(config, tracking_uri)
    started = nightly_flow(cfg.inlined(), _use_tracking_uri(uri))
    for item in started:
        out.print(f"started {item['flow_run_id']}: {escape(item['detail'])}")
    out.print(f"{len(started)} run(s) started")


@webhooks_app.command("register")
@exit_codes
def webhooks_register(
    url: Annotated[str, typer.Option(help="the bridge's endpoint, e.g. http://bridge:8088/webhooks/mlflow")],
    tracking_uri: TrackingOption = None,
) -> None:
    """Register (or replace) the MLflow webhook that calls the bridge; the secret is QUANTGATE_WEBHOOK_SECRET."""
    from mlflow.exceptions import MlflowException

    from quantgate import registry
    from quantgate.automation.setup import register_webhook

    _quiet_libraries()
    secret = os.environ.get("QUANTGATE_WEBHOOK_SECRET", "")
    uri = tracking_uri or registry.default_tracking_uri()
    _use_tracking_uri(uri)
    client = registry.connect(uri)
    try:
        hook_id = register_webhook(client, url, secret)
    except MlflowException as exc:  # listing or deleting webhooks failed: MLflow's refusal of this request
        raise InputError(_mlflow_error(exc)) from None
    out.print(f"webhook {hook_id} -> {escape(url)}")


@stack_app.command("up")
@exit_codes
def stack_up(config: ConfigOption = None) -> None:
    """Start MLflow and Prefect (PostgreSQL), the bridge and a worker per CPU pool on 127.0.0.1, until all answer."""
    from quantgate.automation import stack

    _quiet_libraries()
    settings = stack.StackSettings.from_env(config=config)
    state = stack.up(settings)
    for name, url in state.urls.items():
        out.print(f"{name:8} {url}")
    workers = [name for name in state.processes if name.startswith("worker")]
    out.print(f"workers  {', '.join(workers)}")
    out.print(f"logs and state in {settings.home}; stop with `make stack-down`")


@stack_app.command("down")
@exit_codes
def stack_down() -> None:
    """Stop exactly the processes `stack up` started."""
    from quantgate.automation import stack

    stopped = stack.down(stack.StackSettings.from_env())
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "no stack was running")


@local_prefect.command("start")
@exit_codes
def local_prefect_start() -> None:
    """Start (or find) the local Prefect server now, e.g. in a CI job's set-up, so no command waits for it."""
    from quantgate.flows.prefect_server import ensure_local_server

    out.print(ensure_local_server())


@local_prefect.command("status")
@exit_codes
def local_prefect_status() -> None:
    """Show the local Prefect server quantgate started, if one is running."""
    from quantgate.flows.prefect_server import local_server_status

    status = local_server_status()
    out.print(json.dumps(status, indent=2) if status else "no local Prefect server is running")


@local_prefect.command("stop")
@exit_codes
def local_prefect_stop() -> None:
    """Stop the local Prefect server quantgate started."""
    from quantgate.flows.prefect_server import stop_local_server

    out.print("stopped" if stop_local_server() else "no local Prefect server was running")


def _terminate_cleanly() -> None:
    """SIGTERM (a cancelled CI job, ``kill``, Prefect cancelling a run) unwinds like Ctrl-C: temporary directories are
    removed and an open MLflow run is marked FAILED instead of left RUNNING."""
    import signal

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


def main() -> None:
    from quantgate.redact import install

    install()
    _terminate_cleanly()
    try:
        app()
    except Exception:
        # A bug, not a user error: keep the traceback, but never let it look like "gate failed" (exit 1).
        import traceback

        traceback.print_exc()
        err.print("quantgate: internal error (exit 3); please report it with the traceback above", markup=False)
        sys.exit(EXIT_INTERNAL)
