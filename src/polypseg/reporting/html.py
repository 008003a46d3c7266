"""Render the report template: one HTML file, CSS inline, figures as base64 data URIs, no external URL."""

from __future__ import annotations

import base64
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_report(context: dict[str, Any]) -> str:
    """The HTML text of ``templates/report.html.j2`` for ``context`` (see :func:`polypseg.reporting.write_report`)."""
    environment = Environment(
        loader=PackageLoader("polypseg.reporting", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["data_uri"] = _data_uri
    return environment.get_template("report.html.j2").render(**context)
