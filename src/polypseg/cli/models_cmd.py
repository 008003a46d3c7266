"""``polypseg models``: the trained models that ship with polypseg, and where they came from."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

from polypseg.cli.common import console, say


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_command(
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Check each file against its recorded SHA-256."),
        as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
    ) -> None:
        """List the shipped models: name, size, SHA-256, training data and test scores.

        predict, explain, serve and the Python Predictor use the first (default) one when no --model is given.
        """
        from polypseg.models.pretrained import PretrainedError, available_models, get_model

        rows = []
        model_by_name = {model.name: model for model in available_models()}
        for model in model_by_name.values():
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
                    "earlier": [earlier.to_json() for earlier in model.earlier],
                }
            )
        failed = any(row["sha256_check"].startswith("FAILED") for row in rows)
        if as_json:  # the same exit status as the text form: a script checking an install relies on it
            print(json.dumps(rows, indent=2))
            if failed or not rows:
                raise typer.Exit(1)
            return
        if not rows:
            console.print(
                "no shipped model in this installation; pass --model RUN_OR_CHECKPOINT to predict/explain/serve"
            )
            raise typer.Exit(1)
        for index, row in enumerate(rows):
            release = row["release"]
            default = " (default)" if index == 0 else ""
            console.print(
                f"[bold]{escape(row['name'])}[/]{default}: {escape(row['summary'])}", highlight=False, markup=True
            )
            say(f"  file    {row['path']} ({row['bytes'] / 1e6:.1f} MB, fp16)")
            say(f"  sha256  {row['sha256']} [{row['sha256_check']}]")
            data = release.get("data", {})
            if data:
                say(f"  trained {data.get('trained_on', '?')}")
                if data.get("held_out"):
                    say(f"  unseen  {data['held_out']}")
            for key, how in (("test_metrics", ""), ("test_metrics_flip_tta", " (--tta)")):
                for label, metrics in release.get(key, {}).items():
                    if not isinstance(metrics, dict):  # a flat {"dice": 0.85}: one line per metric
                        metrics = {"": metrics}
                    scores = ", ".join(
                        f"{k} {v:.4f}".strip() for k, v in metrics.items() if isinstance(v, (int, float))
                    )
                    say(f"  test    {label}{how}: {scores}")
            if release.get("training_command"):
                say(f"  made by {release['training_command']}")
            if release.get("stages"):
                say(f"  stages  {release['stages']}")
            for earlier in model_by_name[row["name"]].earlier:
                say(f"  earlier {earlier.summary} (sha256 {earlier.sha256[:12]}..., shipped in {earlier.commit[:10]})")
                say(
                    f"          restore: {earlier.restore_command(row['name'] + '-' + earlier.sha256[:8] + '.safetensors')}"
                )
        if failed:
            raise typer.Exit(1)
