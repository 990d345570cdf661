"""Registry commands: lineage, promotion, rollback, the ledger, customers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from atelier.cli.common import cli_settings, friendly
from atelier.kernel.errors import GateRefused

ledger_app = typer.Typer(help="The tamper-evident promotion ledger.", no_args_is_help=True)
customer_app = typer.Typer(help="Customers and their access to the registry.", no_args_is_help=True)


def _registry():
    from atelier.registry.client import client_for
    from atelier.registry.ledger import open_ledger

    settings = cli_settings()
    if settings.tracking_uri is None or settings.ledger_url is None:  # embedded stores live in the workspace
        from atelier.kernel.workspace import require_workspace

        require_workspace(settings)
    return settings, client_for(settings), open_ledger(settings)


@friendly
def lineage_cmd(
    ref: str = typer.Argument(..., help="NAME@ALIAS or NAME/VERSION"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    verify: bool = typer.Option(False, "--verify", help="re-hash model artifacts and input data; exit 4 on drift"),
) -> None:
    """Walk a registered version back to its run, flow run, data files, base model, priors, code and promotions."""
    from atelier.registry.lineage import lineage
    from atelier.registry.lineage import verify as verify_lineage

    settings, client, ledger = _registry()
    report = lineage(client, ledger, ref)
    if verify:
        report["drift"] = verify_lineage(settings, report)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_lineage(report)
    if verify and report["drift"] and any("not checked" not in d for d in report["drift"]):
        raise typer.Exit(4)


def _print_lineage(r: dict) -> None:
    typer.echo(f"{r['model']} version {r['version']}  aliases: {', '.join(r['aliases']) or '-'}  customer: {r['customer']}")
    typer.echo(f"  model sha256     {r['model_sha256']}")
    typer.echo(f"  MLflow run       {r['run']['id']} ({r['run']['status']}), artifacts {r['run']['artifact_uri']}")
    typer.echo(
        f"  Prefect run      {r['prefect_flow_run']['id']} ({r['prefect_flow_run']['flow']} v{r['prefect_flow_run']['flow_version']})"
    )
    typer.echo(f"  data             {r['customer']}/{r['subject']} at workspace commit {r['data']['rev']} (DVC md5 {r['data']['dvc_md5']})")
    for name, digest in sorted((r["data"]["files"] or {}).items()):
        typer.echo(f"                     {name}  sha256 {digest}")
    typer.echo(f"  base model       {r['base_model']['id']}  sha256 {r['base_model']['sha256']}")
    typer.echo(f"  class priors     {r['class_priors']['key']}  sha256 {r['class_priors']['sha256']}")
    typer.echo(f"  code             git {r['code']['git_sha']} (dirty: {r['code']['dirty']}), atelier {r['code']['version']}")
    summary = r["evaluation"]["summary"] or {}
    typer.echo(
        f"  evaluation       final loss {summary.get('final_loss')}, {summary.get('sample_count')} samples; "
        f"gate passed: {(r['evaluation']['gate'] or {}).get('passed')}"
    )
    typer.echo("  promotions")
    for row in r["promotions"]:
        typer.echo(
            f"    #{row['seq']} {row['created_at'][:19]} {row['action']:<8} v{row['version']} "
            f"(was v{row['replaced_version'] or '-'}) by {row['actor']}: {row['reason']}"
        )
    for line in r.get("drift", []) or (["  verify: everything matches"] if "drift" in r else []):
        typer.echo(f"  drift: {line}" if not line.startswith("  verify") else line)


@friendly
def promote_cmd(
    model: str = typer.Argument(..., help="registered model name"),
    version: str = typer.Argument(..., help="version to make champion"),
    reason: str = typer.Option(..., "--reason", help="why (kept in the ledger)"),
) -> None:
    """Make VERSION the champion, if it passes the gate; the ledger records the outcome."""
    from atelier.registry.promotion import promote

    settings, client, ledger = _registry()
    done = promote(client, ledger, model, version, actor=settings.actor, reason=reason, rules=settings.gate)
    if not done.passed:
        raise GateRefused(f"{model} version {version}", "; ".join(done.reasons), "champion unchanged; see `atelier lineage`")
    typer.echo(f"{model}@champion is version {version} (ledger row {done.row.seq})")


@friendly
def rollback_cmd(
    model: str = typer.Argument(..., help="registered model name"),
    reason: str = typer.Option("rollback", "--reason", help="why (kept in the ledger)"),
    to: Optional[str] = typer.Option(
        None,
        "--to",
        metavar="VERSION",
        help="this version (default: the last good champion before the current one; versions rolled back or refused are skipped)",
    ),
) -> None:
    """Move champion back to the last good version before it, through the gate and the ledger."""
    from atelier.registry.promotion import rollback

    settings, client, ledger = _registry()
    done = rollback(client, ledger, model, actor=settings.actor, reason=reason, rules=settings.gate, to=to)
    typer.echo(f"{model}@champion is back to version {done.version} (ledger row {done.row.seq})")


@ledger_app.command("verify")
@friendly
def ledger_verify() -> None:
    """Check the hash chain, its anchor in the registry and every champion/candidate alias against the
    ledger (after settling what a crash left half-done); exit 5 if anything was tampered with or moved
    outside Atelier."""
    from atelier.registry.audit import verify_all

    _, client, ledger = _registry()
    settled, problems = verify_all(client, ledger)
    _report_audit(settled, problems, len(ledger.rows()))


def _report_audit(settled: list[str], problems, rows: int) -> None:
    for line in settled:
        typer.echo(f"reconciled: {line}")
    for p in problems:
        label = {"alias_drift": "DRIFT", "damaged_champion": "DAMAGED"}.get(p.kind, "TAMPERED")
        typer.secho(f"{label}: {p.detail}", fg=typer.colors.RED, err=True)
    if problems:
        raise typer.Exit(5)
    typer.echo(f"ledger intact: {rows} rows, chain, anchor, aliases and the champions' stored files verified")


@friendly
def audit_cmd(
    restore: bool = typer.Option(
        False,
        "--restore",
        help="put champion/candidate aliases moved outside Atelier back to the ledger's versions (each correction is a ledger row)",
    ),
    adopt: bool = typer.Option(
        False,
        "--adopt",
        help="take over a ledger written before anchors or signatures existed "
        "(only when its chain verifies): sign its rows, anchor it, and record a row that says so",
    ),
) -> None:
    """Reconcile interrupted promotions, verify the ledger against the registry and, with --restore,
    undo alias moves made outside Atelier. Exit 5 while a problem remains. `schedules.yaml`'s `audit`
    entry runs the same as a flow."""
    from atelier.registry.audit import restore as restore_aliases
    from atelier.registry.audit import verify_all

    settings, client, ledger = _registry()
    if adopt:
        from atelier.registry.ledger_anchor import AnchorStore

        head = AnchorStore(client).adopt(ledger, actor=f"{settings.actor} via atelier audit --adopt")
        typer.echo(
            f"adopted the ledger: signed and anchored at row {head.split(':')[0]}"
            if head
            else "nothing to adopt: the ledger is signed and anchored, empty, or broken"
        )
    settled, problems = verify_all(client, ledger)
    if restore and any(p.kind == "alias_drift" for p in problems):
        for line in restore_aliases(client, ledger, f"{settings.actor} via atelier audit"):
            typer.echo(f"restored: {line}")
        settled, problems = verify_all(client, ledger)
    _report_audit(settled, problems, len(ledger.rows()))


@ledger_app.command("key")
@friendly
def ledger_key() -> None:
    """Print the ledger's verify key (public: hand it to auditors; it checks row signatures and cannot make them)."""
    from atelier.registry.ledger_keys import load_key

    settings = cli_settings()
    typer.echo(load_key(settings.resolved_ledger_keys).verify_pem.decode().strip())


@ledger_app.command("show")
@friendly
def ledger_show(model: str = typer.Argument(None, help="only this model")) -> None:
    """List promotions, refusals and rollbacks, oldest first."""
    _, _, ledger = _registry()
    for row in ledger.rows(model):
        typer.echo(
            f"#{row.seq} {row.created_at[:19]} {row.model} v{row.version} {row.action} "
            f"(replaced v{row.replaced_version or '-'}) by {row.actor}: {row.reason}"
        )


@customer_app.command("add")
@friendly
def customer_add(
    name: str = typer.Argument(..., help="customer id (slug)"),
    out: Path = typer.Option(
        None, "--out", help="where to write the customer's credentials (0600 env file); default: WORKSPACE/.atelier/customers/NAME.env"
    ),
    password_stdin: bool = typer.Option(
        False,
        "--password-stdin",
        help="read the MLflow password from standard input (default: a random one); never pass a password as an argument",
    ),
) -> None:
    """Create (or reset) the customer's MLflow user with READ on its own experiment and registered models;
    on `atelier up`'s stack also S3 keys that read only its own artifacts. The credentials go to a 0600
    file, never to the terminal."""
    import functools
    import sys

    from atelier.cli import stack_processes as stack
    from atelier.registry.isolation import add_customer, write_customer_env

    settings = cli_settings()
    password = sys.stdin.readline().strip() if password_stdin else None
    access = add_customer(settings, name, password or None, grant_s3_reader=functools.partial(stack.grant_s3_reader, settings))
    path = write_customer_env(out or settings.state_dir / "customers" / f"{name}.env", access)
    typer.echo(
        f"customer {name}: MLflow user with READ on its experiment and {len(access.models)} model(s): "
        f"{', '.join(access.models) or '-'}" + ("; S3 keys that read only its artifacts" if access.s3_access_key else "")
    )
    typer.echo(f"credentials (0600, hand them over securely): {path}")


@friendly
def compare_cmd(
    a: str = typer.Argument(..., metavar="A", help="a version: NAME@ALIAS or NAME/VERSION"),
    b: str = typer.Argument(..., metavar="B", help="the version to compare it with"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """What changed from version A to version B: parameters, metrics (with the change), the photos file
    by file, base model, class priors, code, and the gate's verdict on each."""
    from atelier.registry.compare import compare

    _, client, ledger = _registry()
    diff = compare(client, ledger, a, b)
    if as_json:
        typer.echo(json.dumps(diff, indent=1, default=str))
        return
    typer.echo(f"{diff['a']} -> {diff['b']}   aliases {diff['aliases'][0] or '-'} -> {diff['aliases'][1] or '-'}")
    typer.echo(f"  gate passed       {diff['gate'][0]} -> {diff['gate'][1]}")
    data = diff["data"]
    rev = "same" if data["rev"][0] == data["rev"][1] else f"{str(data['rev'][0])[:12]} -> {str(data['rev'][1])[:12]}"
    typer.echo(
        f"  photos            revision {rev}; {len(data['added'])} added, {len(data['removed'])} removed, {len(data['changed'])} changed"
    )
    for kind in ("added", "removed", "changed"):
        for name in data[kind]:
            typer.echo(f"                      {kind:<8} {name}")
    for key, (x, y) in diff["inputs"].items():
        typer.echo(f"  {key:<17} {str(x)[:16]} -> {str(y)[:16]}")
    for key, (x, y, delta) in diff["metrics"].items():
        typer.echo(f"  metric {key:<32} {x} -> {y}" + (f"  ({delta:+.4g})" if delta is not None else ""))
    for key, (x, y) in diff["params"].items():
        typer.echo(f"  param  {key:<32} {x} -> {y}")
    if not (diff["metrics"] or diff["params"] or diff["inputs"] or any(data[k] for k in ("added", "removed", "changed"))):
        typer.echo("  no difference in parameters, metrics, photos or inputs")


@customer_app.command("list")
@friendly
def customer_list(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every customer the workspace and the registry know: its subjects, its models with their champion
    version, and whether `customer add` gave it credentials."""
    from atelier.kernel.workspace import list_subjects
    from atelier.registry.catalog import catalog

    settings, client, _ = _registry()
    found: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return found.setdefault(name, {"customer": name, "subjects": [], "models": {}, "credentials": None})

    for name in list_subjects(settings) if settings.workspace.is_dir() else []:
        customer, subject = name.split("/", 1)
        entry(customer)["subjects"].append(subject)
    for m in catalog(client):
        if m["customer"]:
            champion = next((v["version"] for v in m["versions"] if "champion" in v["aliases"]), None)
            entry(m["customer"])["models"][m["name"]] = champion
    for path in sorted((settings.state_dir / "customers").glob("*.env")):
        entry(path.stem)["credentials"] = str(path)
    rows = [found[k] for k in sorted(found)]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no customers yet: `atelier subject add CUSTOMER SUBJECT ...` starts one")
    for r in rows:
        models = ", ".join(f"{name}" + (f" (champion v{v})" if v else " (no champion)") for name, v in r["models"].items())
        typer.echo(f"{r['customer']}")
        typer.echo(f"  subjects:    {', '.join(r['subjects']) or '-'}")
        typer.echo(f"  models:      {models or '-'}")
        typer.echo(f"  credentials: {r['credentials'] or '- (atelier customer add ' + r['customer'] + ')'}")


@friendly
def models_cmd(
    customer: Optional[str] = typer.Option(None, "--customer", metavar="CUSTOMER", help="only this customer's models"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List registered models and their versions: aliases, the gate's verdict, damaged ones."""
    from atelier.kernel.storage import check_customer
    from atelier.registry.catalog import catalog

    if customer is not None:
        check_customer(customer)
    _, client, _ = _registry()
    models = catalog(client, customer)
    if as_json:
        typer.echo(json.dumps(models, indent=1))
        return
    if not models:
        typer.echo("no registered models" + (f" for customer {customer}" if customer else "") + " yet")
        return
    for m in models:
        typer.echo(f"{m['name']}  ({m['kind'] or 'model'}{', customer ' + m['customer'] if m['customer'] else ''})")
        for v in m["versions"]:
            aliases = f"  @{' @'.join(v['aliases'])}" if v["aliases"] else ""
            typer.echo(f"  v{v['version']:<4} {v['verdict']:<10}{aliases}")


def install(app: typer.Typer) -> None:
    app.command("models")(models_cmd)
    app.command("lineage")(lineage_cmd)
    app.command("compare")(compare_cmd)
    app.command("promote")(promote_cmd)
    app.command("rollback")(rollback_cmd)
    app.add_typer(ledger_app, name="ledger")
    app.command("audit")(audit_cmd)
    app.add_typer(customer_app, name="customer")
