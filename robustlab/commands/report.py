"""`robustlab report`: an experiment's report from its published tables (offline) or exported
from its MLflow parent run into a folder."""

from __future__ import annotations

import argparse
import math
import sys

from robustlab.commands import SubParsers, flag, optional
from robustlab.errors import ConfigError


def add_parser(sub: SubParsers) -> list[str]:
    p = sub.add_parser(
        "report",
        help="recompute an experiment's figures and verdicts from its published tables "
        "(--tables), or export its parent run into such a folder (--run-id --out)",
    )
    p.add_argument("--tables", type=optional, default=None, help="a published results folder")
    p.add_argument("--run-id", type=optional, default=None, help="an experiment's parent run")
    p.add_argument(
        "--out",
        type=optional,
        default=None,
        help="where report.md goes (--tables: default the folder itself; --run-id: required)",
    )
    p.add_argument(
        "--margins",
        default="",
        help="override pre-registered margins, e.g. changed=0.1,balanced=0.05 (sensitivity)",
    )
    p.add_argument(
        "--verdicts",
        type=flag,
        default=False,
        help="true: refuse tables with fewer than 3 seeds instead of reporting effects only",
    )
    p.set_defaults(func=run)
    return ["report"]


def parse_margins(text: str) -> dict[str, float]:
    """`key=value,...` into numbers; ConfigError (one line) for anything else."""
    from robustlab.experiment.verdicts import check_margins

    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not math.isfinite(number):
            raise ConfigError(f"--margins {item!r}: expected metric=number, e.g. changed=0.1")
        out[key.strip()] = number
    return check_margins(out)


def run(args: argparse.Namespace) -> None:
    margins = parse_margins(args.margins)
    if bool(args.tables) == bool(args.run_id):
        raise ConfigError("give either --tables FOLDER or --run-id ID --out FOLDER")
    from robustlab.experiment import published

    if args.run_id:
        if not args.out:
            raise ConfigError("--run-id needs --out FOLDER (e.g. results/cv-default)")
        from robustlab.tracking import configure_tracking

        configure_tracking()
        results = published.export(args.run_id, args.out)
    else:
        results = published.load(args.tables)
    if args.verdicts:
        published.check_verdicts_possible(len(results.seeds))
    fig = published.render(results, args.out if args.tables else None, margins)
    for c in fig.claims:
        without = "".join(f" (without {k}: {v})" for k, v in c.without.items())
        print(f"{c.claim.text}: {c.verdict}{without}")
    where = args.out or args.tables
    print(f"report.md and forest_plot.png written to {where}", file=sys.stderr)
