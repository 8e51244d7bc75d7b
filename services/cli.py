"""``multiface serve``: run the data service.

    multiface serve --data-root DIR --shard-root DIR [--host H] [--port N] [--workers N]
                    [--download-base-url URL] [--download-workers N]

Every flag also reads ``MULTIFACE_<NAME>`` from the environment (a flag wins). Tokens are read
from the environment only (``MULTIFACE_READ_TOKEN``, ``MULTIFACE_ADMIN_TOKEN``), never from flags,
which ``ps`` would show. The lead registers it as ``serve = "services.cli:register"`` in the
``multiface.commands`` entry-point group.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve published shards over HTTP, report completeness, run ingest and download jobs",
        description="Run the data service (FastAPI under uvicorn): shards, metadata and manifests with Range "
        "and ETag; entity state and completeness; ingest, verify and release download jobs; a status page at /; "
        "/metrics. "
        "Set MULTIFACE_READ_TOKEN and MULTIFACE_ADMIN_TOKEN in the environment to require Bearer tokens.",
    )
    parser.add_argument(
        "--data-root", type=Path, help="downloaded entities, one folder each (MULTIFACE_DATA_ROOT)"
    )
    parser.add_argument(
        "--shard-root",
        type=Path,
        help="one folder per entity as written by 'multiface ingest' (MULTIFACE_SHARD_ROOT)",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument(
        "--workers",
        type=int,
        help="uvicorn worker processes (default 1; jobs are coordinated across them by file locks)",
    )
    parser.add_argument(
        "--ingest-workers", type=int, help="shards one ingest job writes at once (default: CPU count)"
    )
    parser.add_argument(
        "--shard-size", type=int, help="default target bytes per shard of ingest jobs (default 1e9)"
    )
    parser.add_argument(
        "--header-timeout", type=float, help="seconds a client has to send its request headers (default 10)"
    )
    parser.add_argument(
        "--download-base-url",
        metavar="URL",
        help="release root for download jobs (POST /api/v1/downloads), e.g. the seed's S3 "
        ".../MugsyDataRelease/v0.0/identities/; they write into the data root, which must then be "
        "writable. Unset: download jobs are refused (MULTIFACE_DOWNLOAD_BASE_URL)",
    )
    parser.add_argument(
        "--download-workers",
        type=int,
        metavar="N",
        help="release tars one download job fetches at once (default 4; MULTIFACE_DOWNLOAD_WORKERS)",
    )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from services.server import run
    from services.settings import Settings

    flags = {
        name: getattr(args, name)
        for name in (
            "data_root",
            "shard_root",
            "host",
            "port",
            "workers",
            "ingest_workers",
            "shard_size",
            "header_timeout",
            "download_base_url",
            "download_workers",
        )
        if getattr(args, name) is not None
    }
    try:
        settings = Settings(**flags)
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"]) or "settings"
            print(
                f"multiface serve: {field}: {problem['msg']} (flag --{field.replace('_', '-')} or MULTIFACE_{field.upper()})",
                file=sys.stderr,
            )
        return 2
    for name in ("data_root", "shard_root"):
        if not getattr(settings, name).is_dir():
            print(
                f"multiface serve: --{name.replace('_', '-')} {getattr(settings, name)} is not a folder",
                file=sys.stderr,
            )
            return 2
    run(settings)
    return 0
