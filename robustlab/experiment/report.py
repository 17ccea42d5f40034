"""The experiment's report: report.md (verdicts, effects, intervals, power, per-set tables, the
thesis's numbers beside ours, how to reproduce) and the forest plot, from `Figures`."""

from __future__ import annotations

import math
from pathlib import Path

from robustlab.experiment import design
from robustlab.experiment.estimates import ALL, Figures
from robustlab.experiment.verdicts import MARGIN_REASONS, METRIC_NAMES, PartVerdict
from robustlab.experiment.verdicts import __doc__ as RULE_DOC

# The thesis's numbers (100 test images, single runs): clean / PGD-50 / INV (Tramèr L-inf 0.3).
THESIS = {
    "vanilla": ("vanilla", 1.00, 0.00, 0.80),
    "perturbation": ("PGD-only", 0.99, 0.84, 0.24),
    "invariance": ("run 2, human labels (vanilla fine-tuned)", 0.95, 0.00, 0.78),
    "invariance_target": ("run 1, target labels (vanilla fine-tuned)", 0.08, 0.08, 0.26),
    "sequential_ptb_inv": ("ptb→inv", 0.98, 0.36, 0.69),
    "sequential_inv_ptb": ("inv→ptb", 0.99, 0.84, 0.27),
    "joint": ("simultaneous", 0.99, 0.73, 0.72),
}
COLORS = {
    "supported": "tab:green",
    "not supported": "tab:red",
    "inconclusive": "tab:gray",
    "no verdict": "tab:orange",
}


def _iv(v: tuple[float, float, float, int] | None, n: bool = True) -> str:
    if v is None or not math.isfinite(v[0]):
        return "–"
    text = f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
    return f"{text} (n={v[3]})" if n else text


def _part_rows(parts: tuple[PartVerdict, ...], fig: Figures) -> list[str]:
    rows = [
        "| part | claim | metric | effect [95% CI] | SE: examples / seeds | planned MDE (80% "
        "power) | margin | examples (label-changed) / sources / seeds | verdict | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pv in parts:
        for e in pv.effects or (None,):
            if e is None:
                rows.append(
                    f"| {pv.part.key} | {pv.part.text} | – | – | – | – | – | – | "
                    f"**{pv.verdict}** | {pv.reason} |"
                )
                continue
            mde = fig.planned.get((pv.part.a, pv.part.b, e.metric), math.nan)
            rows.append(
                f"| {pv.part.key} | {pv.part.text} | {METRIC_NAMES[e.metric]} | "
                f"{e.estimate:+.3f} [{e.ci_low:+.3f}, {e.ci_high:+.3f}] | "
                f"{e.se_examples:.3f} / {e.se_seeds:.3f} | {mde:.3f} | "
                f"{fig.margins[e.metric]:.2f} | {e.n_examples} ({e.n_changed}) / "
                f"{e.n_clusters} / {e.n_seeds} | **{pv.verdict}** | {pv.reason} |"
            )
    return rows


def _design_lines(fig: Figures) -> list[str]:
    lines = [
        "## Margins and design (pre-registered: fixed before the run, the same after it)",
        "",
        "| metric | margin | why |",
        "|---|---|---|",
    ]
    lines += [
        f"| {METRIC_NAMES[k]} | {fig.margins[k]:.2f} | {MARGIN_REASONS[k]} |" for k in fig.margins
    ]
    d = ", ".join(f"{METRIC_NAMES[k]} {v:.2f}" for k, v in design.DISCORDANCE.items())
    lines += [
        "",
        f"Planned MDE = {design.Z_POWER:.2f} × the planned standard error, from the planned "
        "sample alone (examples, MNIST sources, seeds) under these assumptions: share of "
        f"examples on which two regimes disagree — {d}; every example of a source fully "
        f"correlated; a seed-to-seed standard deviation of {design.SEED_SD:.2f} per regime. "
        "It qualifies an interval that straddles its threshold and never overrides a clear one. "
        "The PGD-40 subset is sized so that the example part of its planned MDE is at most half "
        f"the margin (≥ {design.pgd_size_for(fig.margins['pgd40'])} images at margin "
        f"{fig.margins['pgd40']:.2f}).",
    ]
    return lines


def write_report(path: Path, fig: Figures, meta: dict[str, str], reproduce: list[str]) -> None:
    """report.md (see the module docstring)."""
    lines = ["# Thesis reproduction report", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        f"- human-labelled examples: {fig.n_examples} ({fig.n_changed} label-changed) from "
        f"{fig.n_sources} MNIST test sources, each predicted once per regime and seed by a "
        "model that never trained or was selected on its source",
        f"- test images: {fig.n_test} (the MNIST test set minus every invariance source), the "
        "same for every regime, seed and fold",
        "",
        "## Verdicts",
        "",
        "| claim | verdict |",
        "|---|---|",
    ]
    for c in fig.claims:
        without = "".join(f"; without {k}: **{v}**" for k, v in c.without.items())
        lines.append(f"| {c.claim.text} | **{c.verdict}**{without} |")
    for c in fig.claims:
        lines += ["", f"### {c.claim.text}", "", f"**{c.verdict}**"]
        lines += [f"(without part {k}: **{v}**)" for k, v in c.without.items()]
        lines += [""]
        lines += _part_rows(c.parts, fig)
    lines += [
        "",
        "![forest plot](forest_plot.png)",
        "",
        *_design_lines(fig),
        "",
        "## The rule",
        "",
        RULE_DOC.strip(),
        "",
        "Intervals: estimate ± t × SE, SE² = the cluster-robust variance over MNIST sources of "
        "the seed-averaged per-example differences + the between-seed variance of the per-seed "
        "effects / seeds, t with Welch–Satterthwaite degrees of freedom "
        "(`robustlab.evaluation.intervals`).",
        "",
        "## Test accuracy (shared test images; fold models averaged; PGD-40 on the fixed "
        "subset, AutoAttack from each seed's fold-0 model)",
        "",
        "| regime | thesis run | thesis clean / PGD-50 / INV | clean | PGD-40 | AutoAttack |",
        "|---|---|---|---|---|---|",
    ]
    for regime in fig.regimes:
        name, c, p, i = THESIS.get(regime, ("–", math.nan, math.nan, math.nan))
        thesis = "–" if math.isnan(c) else f"{c:.2f} / {p:.2f} / {i:.2f}"
        t = fig.test.get(regime, {})
        lines.append(
            f"| {regime} | {name} | {thesis} | {_iv(t.get('clean'), False)} | "
            f"{_iv(t.get('pgd40'), False)} | {_iv(t.get('autoattack'))} |"
        )
    sets = sorted({s for r in fig.inv.values() for s in r})
    for s in [ALL, *[x for x in sets if x != ALL]]:
        title = "all human-labelled examples" if s == ALL else s
        lines += [
            "",
            f"## Invariance accuracy, out of fold: {title}",
            "",
            "| regime | label-changed | label-kept | balanced |",
            "|---|---|---|---|",
        ]
        for regime in fig.regimes:
            per = fig.inv.get(regime, {}).get(s, {})
            lines.append(
                f"| {regime} | {_iv(per.get('changed'))} | {_iv(per.get('kept'))} | "
                f"{_iv(per.get('balanced'), False)} |"
            )
    lines += ["", "## Reproduce", "", "```bash", *reproduce, "```", ""]
    path.write_text("\n".join(lines))


def forest_plot(fig: Figures, path: Path) -> Path:
    """Each claim part's effect with its 95% interval and its margin, coloured by verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for c in fig.claims:
        for pv in c.parts:
            for e in pv.effects:
                rows.append(
                    (f"{pv.part.key}: {pv.part.a} − {pv.part.b}\n{METRIC_NAMES[e.metric]}", e, pv)
                )
    height = max(2.5, 0.6 * len(rows) + 1)
    f, ax = plt.subplots(figsize=(8, height))
    for y, (_, e, pv) in enumerate(reversed(rows)):
        colour = COLORS[pv.verdict]
        ax.errorbar(
            e.estimate,
            y,
            xerr=[[e.estimate - e.ci_low], [e.ci_high - e.estimate]],
            fmt="o",
            color=colour,
            capsize=3,
        )
        margin = fig.margins[e.metric]
        t = -margin if (pv.part.kind == "keeps" or e.metric == "pgd40") else margin
        ax.plot([t, t], [y - 0.35, y + 0.35], color="black", linewidth=1.5)
        ax.text(
            1.02,
            y,
            pv.verdict,
            transform=ax.get_yaxis_transform(),
            va="center",
            color=colour,
            fontsize=8,
        )
    ax.axvline(0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=7)
    ax.set_xlabel("paired effect A − B (95% interval: sources and seeds); black bar: margin")
    ax.set_title("Claim parts: effect, interval and margin")
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)
    return path
