"""`edgecase flagged`: look at, review and export the flagged-frame store.

`export` turns reviewed flags into a labelled folder that `edgecase train --data` reads (frames
reviewed as normal go back into the normal training set); `list` shows what is in the store; `review`
labels one flag from the shell. The store is opened directly (no server needed): the embedded one
(`service/flagged.py`, a folder) or the shared one (`service/flagged_postgres.py`, a PostgreSQL URL plus
the images' location), read through the same interface (`service/flag_store.py`).
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edgecase.commands import add_command

if TYPE_CHECKING:  # the service is imported inside the handlers (no heavy imports at parse time)
    from service.flag_store import FlagStore

STORE_ENV = "EDGECASE_FLAGGED_DIR"
URL_ENV = "EDGECASE_FLAGGED_URL"
IMAGES_ENV = "EDGECASE_FLAGGED_IMAGES"


def _default_store() -> str:
    """The store the service writes to when started from this shell (same env vars), else ./flagged."""
    return os.environ.get(URL_ENV) or os.environ.get(STORE_ENV, "flagged")


def _datetime(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r} (e.g. 2026-01-31T08:00)") from exc


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "flagged",
        "List, review and export flagged frames (export: a labelled folder for `edgecase train --data`).",
        "edgecase flagged export --review normal --out data/reviewed --store flagged/\n"
        "  edgecase flagged list --store postgresql://edgecase@db/edgecase --images s3://bucket/flagged/",
    )
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    store_help = (
        f"flagged-frame store: a folder (SQLite + files) or a postgresql:// URL (default: ${URL_ENV}, "
        f"else ${STORE_ENV}, else ./flagged)"
    )
    images_help = (
        f"with a postgresql:// store: where its images are, s3://bucket/prefix/ or a folder "
        f"(default: ${IMAGES_ENV})"
    )
    export = actions.add_parser(
        "export",
        help="write flags in one review state as frames + labels.csv",
        description="Write the flags in one review state as PNG frames plus labels.csv (normal -> split "
        "train, family normal; edge_case/unreviewed -> split test, family edge_case).",
        epilog="Example:\n  edgecase flagged export --review normal --out data/reviewed\n"
        "  edgecase train vae --data data/synth --data data/reviewed --out runs/vae2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--review", required=True, choices=["normal", "edge_case", "unreviewed"])
    export.add_argument("--out", type=Path, required=True, help="output folder (must not hold a labels.csv)")
    export.add_argument("--store", default=None, help=store_help)
    export.add_argument("--images", default=None, help=images_help)
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.set_defaults(handler=run_export)

    listing = actions.add_parser(
        "list",
        help="show flags, newest first",
        description="Show flags, newest first, with filters.",
        epilog="Example:\n  edgecase flagged list --review unreviewed --model vae-vae-elbo --limit 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument("--store", default=None, help=store_help)
    listing.add_argument("--images", default=None, help=images_help)
    listing.add_argument("--model", default=None)
    listing.add_argument("--version", type=int, default=None)
    listing.add_argument("--review", choices=["normal", "edge_case", "unreviewed"], default=None)
    listing.add_argument("--since", type=_datetime, default=None, help="ISO-8601 time, UTC if no zone")
    listing.add_argument("--until", type=_datetime, default=None, help="ISO-8601 time, UTC if no zone")
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--offset", type=int, default=0)
    listing.set_defaults(handler=run_list)

    review = actions.add_parser(
        "review",
        help="label one flag as edge_case or normal",
        description="Label one flag as a true edge case or as normal (a false alarm).",
        epilog="Example:\n  edgecase flagged review 42 normal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    review.add_argument("id", type=int, help="flag id (from `edgecase flagged list`)")
    review.add_argument("label", choices=["edge_case", "normal"])
    review.add_argument("--store", default=None, help=store_help)
    review.add_argument("--images", default=None, help=images_help)
    review.set_defaults(handler=run_review)


def _open_store(args: argparse.Namespace) -> FlagStore:
    return open_store(args.store, args.images)


def open_store(location: str | None, images: str | None, *, create: bool = False) -> FlagStore:
    """The flagged store at ``location`` (a folder or a postgresql:// URL; None = the environment's).

    One opener for every command that reads or writes the store (``flagged``, ``score --flag-store``);
    ``create`` makes an embedded store that does not exist yet instead of refusing a mistyped path.
    """
    from edgecase.cli import CliError

    store = location if location is not None else _default_store()
    if store.startswith(("postgresql://", "postgres://")):
        from service.flagged_postgres import PostgresFlagStore

        images = images or os.environ.get(IMAGES_ENV)
        if not images:
            raise CliError(f"a postgresql:// store needs --images or ${IMAGES_ENV} (s3://bucket/prefix/)")
        try:
            from service.settings import Settings

            # EDGECASE_FLAGGED_IMAGES_OPTIONS (fsspec options, e.g. an S3 endpoint), as the service reads it
            return PostgresFlagStore(store, images, storage_options=Settings().flagged_images_options)
        except Exception as exc:  # unreachable database, missing bucket: one line, not a traceback
            raise CliError(f"cannot open the flagged store {store.split('@')[-1]}: {exc}") from exc
    from service.flagged import DB_FILE, FlaggedStore

    if not create and not (Path(store) / DB_FILE).is_file():
        raise CliError(f"no flagged-frame store at {store} (no {DB_FILE}); pass --store or set ${STORE_ENV}")
    return FlaggedStore(store)


def run_export(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError

    with _open_store(args) as store:
        try:
            written = store.export(args.review, args.out, overwrite=args.overwrite)
        except (FileExistsError, ValueError) as exc:
            raise CliError(str(exc)) from exc
    print(f"exported {written} {args.review} frame(s) to {args.out} (labels: {args.out / 'labels.csv'})")
    if args.review == "normal" and written:
        print(f"train on them: edgecase train vae --data <your data> {args.out} --out runs/next")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError

    if args.limit < 0 or args.offset < 0:
        raise CliError("--limit and --offset must be >= 0")
    with _open_store(args) as store:
        records, total = store.list(
            model=args.model,
            version=args.version,
            since=args.since,
            until=args.until,
            review=args.review,
            limit=args.limit,
            offset=args.offset,
        )
        print(f"{total} flag(s) match; showing {len(records)} from offset {args.offset}")
        header = f"{'id':>6}  {'created (UTC)':<19}  {'model/version':<24}{'score':>10}{'p':>9}"
        print(f"{header}  {'review':<10}  key")
        for r in records:
            print(
                f"{r.id:>6}  {r.created_at:%Y-%m-%d %H:%M:%S}  {f'{r.model}/{r.version}':<24}"
                f"{r.score:>10.4g}{r.p_value:>9.4f}  {r.review:<10}  {r.key or ''}"
            )
    return 0


def run_review(args: argparse.Namespace) -> int:
    from edgecase.cli import CliError
    from service.flag_store import FlaggedNotFoundError

    with _open_store(args) as store:
        try:
            record = store.review(args.id, args.label)
        except FlaggedNotFoundError as exc:
            raise CliError(str(exc)) from exc
    print(f"flag {record.id} ({record.key or 'no key'}) reviewed as {record.review}")
    return 0
