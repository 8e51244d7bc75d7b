"""The HTML status page at ``/``: per entity a table of expressions against assets, running jobs.

Rendered on the server from ``services/templates/status.html`` (jinja2, autoescaped); no
JavaScript and no build step. It refreshes itself every 10 seconds.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from services.auth import require_status_page
from services.errors import error_responses
from services.runtime import RuntimeDep

router = APIRouter()
ASSETS = ("photo", "texture", "average_texture", "mesh_bin", "mesh_obj", "transform", "audio", "all")
ASSET_LABELS = ("photo", "texture", "average tex", "mesh .bin", "mesh .obj", "head pose", "audio", "all")
_templates = Environment(
    loader=PackageLoader("services", "templates"), autoescape=select_autoescape(["html"])
)


@router.get(
    "/",
    response_class=HTMLResponse,
    dependencies=[Depends(require_status_page)],
    tags=["status"],
    responses=error_responses(401),
)
def status_page(runtime: RuntimeDep) -> HTMLResponse:
    """Human-readable status of every entity and job."""
    entities = []
    for name in runtime.catalog.names():
        state = runtime.reports.entity(name)
        report = runtime.catalog.scan(name)
        rows = []
        if report is not None:
            for expression in report.expressions:
                totals = expression.totals()
                rows.append(
                    {
                        "name": expression.expression,
                        "num_frames": expression.num_frames,
                        "num_samples": expression.num_samples,
                        "cells": [totals.get(asset) for asset in ASSETS],
                    }
                )
            overall = report.totals()
            rows.append(
                {
                    "name": "total",
                    "num_frames": sum(expression.num_frames for expression in report.expressions),
                    "num_samples": report.num_samples,
                    "cells": [overall.get(asset) for asset in ASSETS],
                }
            )
        entities.append(
            {"state": state, "rows": rows, "num_missing": len(report.missing) if report else None}
        )
    jobs = runtime.jobs.find(limit=20)
    html = _templates.get_template("status.html").render(
        entities=entities, assets=ASSET_LABELS, jobs=jobs, percent=_percent
    )
    return HTMLResponse(html)


def _percent(tally) -> str:
    if tally is None or tally.num_expected == 0:
        return "-"
    return f"{tally.percent:.2f}%"
