"""``polypseg models``: the trained models that ship with polypseg, and where they came from."""

from __future__ import annotations

import json

import typer

from polypseg.cli.common import console


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_command(
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Check each file against its recorded SHA-256."),
        as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
    ) -> None:
        """List the shipped models: name, size, SHA-256, training data and test scores.

        predict, explain, serve and the Python Predictor use the first (default) one when no --model is given.
        """
        from polypseg.pretrained import PretrainedError, available_models, get_model

        rows = []
        for model in available_models():
            status = "not checked"
            if verify:
                try:
                    get_model(model.name)
                    status = "verified"
                except PretrainedError as error:
                    status = f"FAILED: {error}"
            release = model.release() if model.weights.is_file() else {}
            rows.append(
                {
                    "name": model.name,
                    "path": str(model.weights),
                    "bytes": model.size_bytes,
                    "sha256": model.sha256,
                    "sha256_check": status,
                    "summary": model.summary,
                    "release": release,
                }
            )
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        if not rows:
            console.print(
                "no shipped model in this installation; pass --model RUN_OR_CHECKPOINT to predict/explain/serve"
            )
            raise typer.Exit(1)
        for index, row in enumerate(rows):
            release = row["release"]
            default = " (default)" if index == 0 else ""
            console.print(f"[bold]{row['name']}[/]{default}: {row['summary']}", highlight=False)
            console.print(f"  file    {row['path']} ({row['bytes'] / 1e6:.1f} MB, fp16)", highlight=False)
            console.print(f"  sha256  {row['sha256']} [{row['sha256_check']}]", highlight=False)
            data = release.get("data", {})
            if data:
                console.print(f"  trained {data.get('trained_on', '?')}", highlight=False, soft_wrap=True)
                if data.get("held_out"):
                    console.print(f"  unseen  {data['held_out']}", highlight=False, soft_wrap=True)
            for label, metrics in release.get("test_metrics", {}).items():
                scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
                console.print(f"  test    {label}: {scores}", highlight=False, soft_wrap=True)
            if release.get("training_command"):
                console.print(f"  made by {release['training_command']}", highlight=False, soft_wrap=True)
        if any(row["sha256_check"].startswith("FAILED") for row in rows):
            raise typer.Exit(1)
