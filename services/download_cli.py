"""``multiface download``: fetch, verify and extract Multiface release tars.

multiface download --config mini_download_config.json --dest /data/multiface [--workers 4]

Registered through the ``multiface.commands`` entry point ``download =
"services.download_cli:register"``. Exit status: 0 all selected tars extracted, 1 some tars
failed (each named on stderr), 2 bad config or release index (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from services.download import (
    DEFAULT_BASE_URL,
    DEFAULT_WORKERS,
    ConfigError,
    DownloadFailed,
    FetchError,
    ReleaseFormatError,
    RetryPolicy,
    download_release,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="download, md5-verify and safely extract Multiface release tars",
        description="Download the release tars a config selects, check each against the release's CHECKSUM, "
        "and extract them into DEST/m--YYYYMMDD--HHMM--<ENTITY_ID>--GHS. Interrupted downloads resume with "
        "HTTP Range; a tar that fails its md5 or holds unsafe members is reported by name and never extracted. "
        "DEST/.release/<ENTITY_ID>/index.json records each tar's state (absent, downloaded, verified, "
        "extracted, failed). Rerunning the same command retries what failed and skips what is extracted.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="the seed's download config JSON: {entity: [ids], image, mesh, texture, metadata, audio: "
        "true/false, expression: [names]}, e.g. mini_download_config.json",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        required=True,
        metavar="DIR",
        help="destination folder (created if missing); entities land in DIR/m--...--<ENTITY_ID>--GHS",
    )
    parser.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        metavar="URL",
        help="release root holding one folder per entity id (default: the seed's S3 root, %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="tars downloaded in parallel (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=RetryPolicy.retries,
        metavar="N",
        help="retries per tar after a failure that brought no new byte, with exponential backoff "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--keep-tars",
        action="store_true",
        help="keep verified tars in DIR/.release/<ENTITY_ID>/tars after extracting them",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run_download)


def run_download(args: argparse.Namespace) -> int:
    if args.workers < 1:
        print(f"multiface download: --workers {args.workers}: use 1 or more", file=sys.stderr)
        return 2
    if args.retries < 0:
        print(f"multiface download: --retries {args.retries}: use 0 or more", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        report = download_release(
            args.config,
            args.dest,
            base_url=args.base_url,
            workers=args.workers,
            progress=not args.no_progress,
            policy=RetryPolicy(retries=args.retries),
            keep_tars=args.keep_tars,
        )
    except (ConfigError, ReleaseFormatError, FetchError) as error:
        print(f"multiface download: {error}", file=sys.stderr)
        return 2
    except DownloadFailed as error:
        print(f"multiface download: {error}", file=sys.stderr)
        for entity in error.report.entities:
            print(f"  states of every tar: {entity.index_path}", file=sys.stderr)
        return 1
    for entity in report.entities:
        done = sum(tar.state == "extracted" for tar in entity.tars if tar.selected)
        print(f"{entity.entity_id}: {done} tar(s) extracted into {entity.root}; index {entity.index_path}")
    return 0
