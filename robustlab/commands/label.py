"""`robustlab label`: collect human labels in a browser, create stores, report agreement.

robustlab label --store S --rater NAME [--port N]     serve the labelling page
robustlab label --store S --init-from candidates.npz  new store from `generate` output
robustlab label --store S --import thesis|tramer_linf_eps0.3|tramer_linf_eps0.4|tramer_l0
robustlab label --store S --stats                     agreement and tie-policy report
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robustlab.commands import SubParsers, optional
from robustlab.data import labels as L
from robustlab.data import votes as V
from robustlab.errors import ConfigError, DataError


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "label",
        help="labelling page, label-store creation and agreement statistics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", required=True, help="label store JSON file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--rater", type=optional, default=None, help="serve the labelling page for this rater"
    )
    mode.add_argument(
        "--init-from",
        type=optional,
        default=None,
        metavar="NPZ",
        help="create the store from candidates.npz",
    )
    mode.add_argument(
        "--import",
        dest="import_set",
        type=optional,
        default=None,
        metavar="SET",
        help="create the store from a published set: thesis or a Tramèr set name",
    )
    mode.add_argument("--stats", action="store_true", help="print agreement statistics")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 = any free port)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; anything else exposes the page, with a warning)",
    )
    p.add_argument(
        "--tie-policy", default="flag", help="drop | original | flag (for new stores and --stats)"
    )
    p.add_argument(
        "--data-dir",
        type=optional,
        default=None,
        help="shared data folder (default $ROBUSTLAB_DATA_DIR)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing store")
    p.set_defaults(func=run)
    return ["label"]


def run(args: argparse.Namespace) -> None:
    store_path = Path(args.store)
    if args.init_from or args.import_set:
        policy = V.check_tie_policy(args.tie_policy)
        if store_path.exists() and not args.force:
            raise ConfigError(f"{store_path} already exists; pass --force to overwrite it")
        if args.init_from:
            store = L.store_from_candidates(store_path, args.init_from, tie_policy=policy)
        elif args.import_set == "thesis":
            store = L.import_thesis(store_path, args.data_dir, tie_policy=policy)
        else:
            store = L.import_tramer(store_path, args.import_set, args.data_dir, tie_policy=policy)
        store.save()
        print(f"wrote {store_path} ({len(store)} examples, tie policy {policy})")
    elif args.stats:
        print_stats(L.LabelStore.load(store_path), args)
    elif args.rater:
        from robustlab.invariance.label_server import serve

        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port {args.port} is not a port number (0..65535)")
        if not store_path.is_file():
            raise ConfigError(
                f"{store_path}: no such label store; create it first with --init-from or --import"
            )
        try:
            serve(store_path, args.rater, args.host, args.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve on {args.host}:{args.port} ({exc.strerror}); pick another --port"
            ) from None
    else:
        raise ConfigError(
            "nothing to do: pass --rater NAME, --init-from NPZ, --import SET or --stats"
        )


def print_stats(store: L.LabelStore, args: argparse.Namespace) -> None:
    """Agreement statistics and, for the thesis set, published majority vs each tie policy."""
    votes, raters = store.vote_matrix()
    print(
        f"{store.path}: {len(store)} examples, {len(raters)} raters, tie policy {store.tie_policy}"
    )
    if not raters:
        print("no votes yet")
        return
    try:
        a = L.agreement(votes, raters)
    except DataError as exc:
        print(f"agreement: {exc}")
        return
    print(
        f"examples with >=2 votes: {a.n_examples}; unanimous: {a.unanimity:.1%}; "
        f"Fleiss' kappa: {a.fleiss_kappa:.3f}; tied: {a.ties}"
    )
    for r, v in a.per_rater.items():
        print(f"  {r}: agrees with the others' majority on {v:.1%} of its votes")
    for pol in V.TIE_POLICIES:
        y, status = store.labels(pol)  # type: ignore[arg-type]
        orig = np.array([e.original_label for e in store.examples])
        changed = int(((y >= 0) & (y != orig)).sum())
        print(
            f"  policy {pol}: {int((y >= 0).sum())} labelled, {changed} label changed, "
            f"{status.count('dropped') + status.count('flagged')} without label"
        )
    if store.name.startswith("thesis"):
        from robustlab.data.invariance import invariance_root, read_rater_votes

        table = read_rater_votes(
            invariance_root(args.data_dir) / "thesis" / "eps0.3" / "rater_votes.csv"
        )
        published = table["majority_label_as_published"]
        for pol in V.TIE_POLICIES:
            diffs = L.published_vs_policy(store, published, pol)  # type: ignore[arg-type]
            print(f"  published majority vs policy {pol}: {len(diffs)} differ")
            for d in diffs:
                print(
                    f"    {d.example}: votes {d.votes} original {d.original_label} "
                    f"published {d.published} -> {d.resolved} ({d.status})"
                )
