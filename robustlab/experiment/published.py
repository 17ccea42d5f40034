"""A finished experiment as a folder of files (`results/cv-default/`): its per-example tables,
folds and `run.json`, and the report recomputed from them with no MLflow.

- `export(parent_run_id, out)`: the parent run's tables and folds from MLflow, `run.json` (commit,
  host CPU, versions, wall time, per-regime unit times and evaluation share, seeds, K), tables
  over `COMPRESS_OVER` bytes gzip-compressed, then `render` into the same folder.
- `load(folder)`: the files, checked (missing, truncated or inconsistent tables are one line).
- `render(results, out)`: every figure and verdict (`robustlab.experiment.estimates`), report.md and
  the forest plot. `robustlab report --tables <folder>` runs `load` + `render`, so the committed
  report.md is what anyone recomputes from the committed tables.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from robustlab.errors import ConfigError
from robustlab.experiment.design import MIN_SEEDS
from robustlab.experiment.estimates import Figures, compute_figures
from robustlab.experiment.report import forest_plot, write_report
from robustlab.experiment.tables import INV_TABLE, TEST_TABLE, read_csv
from robustlab.experiment.verdicts import MARGINS, check_margins

RUN_JSON = "run.json"
FOLDS_TABLE = "folds"
COMPRESS_OVER = 2_000_000  # bytes: a table above this is committed as .csv.gz
INV_COLUMNS = ("set", "index", "source_index", "label_changed", "regime", "seed", "correct")
TEST_COLUMNS = ("source_index", "regime", "seed", "clean", "pgd40")
RUN_KEYS = ("regimes", "seeds", "budget", "inv_folds")
VERSIONED = ("tensorflow-cpu", "keras", "adversarial-robustness-toolbox", "mlflow", "optuna")


@dataclass(frozen=True)
class Results:
    """A published experiment: its two tables, folds and run record."""

    folder: Path
    inv_rows: list[dict[str, str]]
    test_rows: list[dict[str, str]]
    folds_rows: list[dict[str, str]]
    run: dict

    @property
    def regimes(self) -> list[str]:
        return list(self.run["regimes"])

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.run["seeds"]]


def _table_path(folder: Path, name: str) -> Path:
    for path in (folder / f"{name}.csv", folder / f"{name}.csv.gz"):
        if path.is_file():
            return path
    raise ConfigError(
        f"{folder}: no {name}.csv or {name}.csv.gz; point --tables at a folder written by "
        "robustlab report --run-id (or restore the file)"
    )


def _read_table(folder: Path, name: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
    path = _table_path(folder, name)
    try:
        rows = read_csv(path)
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as exc:
        raise ConfigError(
            f"{path} cannot be read ({type(exc).__name__}: truncated or corrupt); restore it"
        ) from None
    if not rows:
        raise ConfigError(f"{path} has no rows; restore it")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ConfigError(f"{path} lacks the column(s) {missing}; restore it")
    short = next((i for i, r in enumerate(rows) if None in r.values() or None in r), None)
    if short is not None:
        raise ConfigError(
            f"{path} row {short + 2} has the wrong number of fields (truncated?); restore it"
        )
    return rows


def _check_complete(path_name: str, rows: list[dict[str, str]], key: tuple[str, ...], run: dict):
    """Every (regime, seed) holds the same items, each once; the seeds and regimes are the run's."""
    seeds = {str(s) for s in run["seeds"]}
    found_seeds = {r["seed"] for r in rows}
    if found_seeds != seeds:
        raise ConfigError(
            f"{path_name}: seeds {sorted(found_seeds)} but {RUN_JSON} says {sorted(seeds)}; "
            "the tables and run.json come from different experiments"
        )
    unknown = {r["regime"] for r in rows} - set(run["regimes"])
    if unknown:
        raise ConfigError(f"{path_name}: regimes {sorted(unknown)} are not in {RUN_JSON}")
    counts = Counter((r["regime"], r["seed"], *(r[k] for k in key)) for r in rows)
    twice = next((k for k, n in counts.items() if n > 1), None)
    if twice is not None:
        raise ConfigError(
            f"{path_name}: {twice[0]} seed {twice[1]} has {'/'.join(twice[2:])} twice; the "
            "table is inconsistent: export it again"
        )
    items = {k[2:] for k in counts}
    for regime in run["regimes"]:
        for seed in seeds:
            have = {k[2:] for k in counts if k[0] == regime and k[1] == seed}
            if have != items:
                raise ConfigError(
                    f"{path_name}: {regime} seed {seed} misses {len(items - have)} of "
                    f"{len(items)} items; the table is inconsistent: export it again"
                )


def load(folder: str | Path) -> Results:
    """The published files in `folder`, checked; ConfigError (one line) otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--tables {folder}: no such folder")
    try:
        run = json.loads((folder / RUN_JSON).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no {RUN_JSON}; restore it") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{folder / RUN_JSON} is not JSON ({exc.msg}); restore it") from None
    missing = [k for k in RUN_KEYS if k not in run]
    if missing:
        raise ConfigError(f"{folder / RUN_JSON} lacks {missing}; restore it")
    inv = _read_table(folder, INV_TABLE, INV_COLUMNS)
    test = _read_table(folder, TEST_TABLE, TEST_COLUMNS)
    folds = _read_table(folder, FOLDS_TABLE, ("set", "index", "source_index", "fold"))
    _check_complete(INV_TABLE, inv, ("set", "index"), run)
    _check_complete(TEST_TABLE, test, ("source_index",), run)
    n_pool = len({(r["set"], r["index"]) for r in inv})
    if len(folds) != n_pool:
        raise ConfigError(
            f"{FOLDS_TABLE}: {len(folds)} examples but the invariance table predicts {n_pool}; "
            "the files come from different experiments"
        )
    return Results(folder, inv, test, folds, run)


def check_verdicts_possible(seeds: int) -> None:
    """A verdict asked for explicitly needs MIN_SEEDS seeds; ConfigError otherwise."""
    if seeds < MIN_SEEDS:
        raise ConfigError(
            f"a verdict needs >= {MIN_SEEDS} seeds (training runs per regime), got {seeds}; "
            f"use --seeds {MIN_SEEDS} or drop --verdicts true (the effects are reported anyway)"
        )


def conditions() -> dict[str, str]:
    """What the verdicts hold for, beyond the budget: recorded in run.json."""
    from robustlab.data.folds import TIE_POLICY
    from robustlab.regimes import make_regime

    mix = make_regime("joint").phases[0].mix
    return {"joint_mix": f"{mix.clean:g} / {mix.ptb:g} / {mix.inv:g}", "tie_policy": TIE_POLICY}


def wall_line(run: dict) -> str:
    """The wall time, and for a study resumed under several leaders (sessions) what it hides:
    the last leader's time covers only the units it ran."""
    wall = f"{run.get('wall_seconds', 0) / 60:.1f} min"
    if run.get("leaders", 1) <= 1:
        return wall
    return (
        f"{wall} under the last of {run['leaders']} leaders (the study was resumed); the finished "
        f"units ran during {run['busy_seconds'] / 3600:.1f} h of wall time in all (the union of "
        f"their run intervals) and {run['worker_seconds'] / 3600:.1f} h of worker time"
    )


def meta_lines(run: dict) -> dict[str, str]:
    """The report's header, from a run record (`run.json` or the live experiment's)."""
    times = run.get("unit_seconds", {})
    share = run.get("eval_share", {})
    out = {
        "budget": str(run["budget"]),
        "seeds": str(len(run["seeds"])),
        "cross-validation": f"{run['inv_folds']} source-grouped folds (seed "
        f"{run.get('fold_seed', 0)}, digest {run.get('fold_digest', '?')}) over "
        f"{', '.join(run.get('inv_sets', []))}",
        "parent run": str(run.get("parent_run_id", "")),
        "wall time": wall_line(run),
        "training + evaluation time per regime (all seeds and folds)": ", ".join(
            f"{k} {v / 60:.1f} min" + (f" ({share[k]:.0%} evaluation)" if k in share else "")
            for k, v in times.items()
        ),
    }
    if "joint_mix" in run:
        out["joint mixture"] = (
            f"{run['joint_mix']} of each batch (clean / PGD / invariance), `joint`'s default "
            "mixture fixed before the run, not tuned on these data"
        )
    if "tie_policy" in run:
        out["label-tie policy"] = (
            f"{run['tie_policy']}: a thesis example whose raters tie has no human label and "
            "is left out of the pool"
        )
    return out


def experiment_command(params: Mapping[str, object], study_name: str) -> str:
    """The `robustlab experiment` command that ran, and resumes, an experiment: from its plan's
    record or its parent run's params (the same keys, as values or as MLflow's strings)."""
    # a plan's True, or MLflow's "True" / "true" (as `mlflow run` logged what was typed)
    allowed = str(params.get("allow_small_folds", "")).strip().lower() == "true"
    small = " --allow-small-folds true" if allowed else ""
    study = f" --study-name {study_name}" if study_name else ""
    return (
        f"robustlab experiment --budget {params['budget']} --seeds {params['seeds']} "
        f"--eps {params['eps']} --regimes {params['regimes']} --inv-folds {params['inv_folds']} "
        f"--inv-sets {params['inv_sets']} --fold-seed {params['fold_seed']}{small}{study}"
    )


def reproduce_lines(run: dict, folder: str) -> list[str]:
    return [
        "# the experiment (resumable: the same command continues its study; add --workers N to",
        "# train N units at a time, or join from other machines with robustlab experiment-worker)",
        str(run.get("command", "")),
        "# its tables, folds and run.json as a folder, with this report",
        f"robustlab report --run-id {run.get('parent_run_id', '<parent run>')} --out {folder}",
        "# every figure and verdict of this report, offline (no MLflow), from that folder:",
        f"robustlab report --tables {folder}",
    ]


def render(
    results: Results,
    out: str | Path | None = None,
    margins: dict[str, float] = MARGINS,
    folder_name: str | None = None,
) -> Figures:
    """report.md and forest_plot.png in `out` (default: the results' folder); the figures."""
    out = Path(out or results.folder)
    out.mkdir(parents=True, exist_ok=True)
    fig = compute_figures(
        results.inv_rows, results.test_rows, results.regimes, results.seeds, check_margins(margins)
    )
    name = folder_name or str(results.run.get("published_as", results.folder))
    write_report(
        out / "report.md", fig, meta_lines(results.run), reproduce_lines(results.run, name)
    )
    forest_plot(fig, out / "forest_plot.png")
    return fig


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = platform.processor() or platform.machine()
    except OSError:
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} logical CPUs"


def unit_times(child_runs: list) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Per regime: total seconds of its units (run start to end), the share spent in the final
    evaluation (`test/eval_seconds`), and the number of units."""
    total: Counter = Counter()
    evaluation: Counter = Counter()
    units: Counter = Counter()
    for run in child_runs:
        label = run.data.tags.get("robustlab.experiment_regime")
        if label is None:
            continue
        info = run.info
        total[label] += ((info.end_time or info.start_time) - info.start_time) / 1000
        evaluation[label] += run.data.metrics.get("test/eval_seconds", 0.0)
        units[label] += 1
    share = {k: evaluation[k] / total[k] for k in total if total[k] > 0}
    return dict(total), share, dict(units)


def busy_seconds(runs: list) -> float:
    """Seconds during which at least one of `runs` ran (the union of their intervals): the wall
    time of a run spread over sessions, without the gaps between them."""
    spans = sorted((r.info.start_time, r.info.end_time or r.info.start_time) for r in runs)
    busy, reach = 0, None
    for start, end in spans:
        if reach is None or start > reach:
            busy, reach = busy + end - start, end
        elif end > reach:
            busy, reach = busy + end - reach, end
    return busy / 1000


def export(parent_run_id: str, out: str | Path) -> Results:
    """Write the experiment `parent_run_id` as a published folder (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    client = MlflowClient()
    try:
        parent = client.get_run(parent_run_id)
    except Exception as exc:  # noqa: BLE001 - one line for an unknown run
        raise ConfigError(f"--run-id {parent_run_id}: no such run ({type(exc).__name__})") from None
    if parent.data.tags.get("robustlab.kind") != "experiment":
        raise ConfigError(f"--run-id {parent_run_id} is not an experiment's parent run")
    out = Path(out)
    p = parent.data.params
    with tempfile.TemporaryDirectory() as tmp:
        tables = _download_tables(parent, Path(tmp))
        # the finished units' runs, whichever leader ran them (the tables hold every unit; a study
        # resumed over several sessions had a parent run per leader)
        unit_ids = sorted({row["run_id"] for row in read_csv(tables[0])})
        unit_runs = [client.get_run(run_id) for run_id in unit_ids]
        out.mkdir(parents=True, exist_ok=True)
        for path in tables:
            for old in out.glob(f"{path.stem}.csv*"):
                old.unlink()
            _publish_table(path, out)
    total, share, units = unit_times(unit_runs)
    study = parent.data.tags.get("robustlab.study", "")
    leaders = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`robustlab.study` = '{study}' and tags.`robustlab.kind` = 'experiment'",
    )
    seeds = list(range(int(p["seeds"])))
    info = parent.info
    run = {
        "parent_run_id": parent_run_id,
        "published_as": str(out),
        "commit": parent.data.tags.get("mlflow.source.git.commit", "unknown"),
        "host_cpu": host_cpu(),
        "versions": _versions(),
        "budget": p["budget"],
        "eps": float(p["eps"]),
        "regimes": p["regimes"].split(","),
        "seeds": seeds,
        "inv_folds": int(p["inv_folds"]),
        "fold_seed": int(p["fold_seed"]),
        "fold_digest": p["fold_digest"],
        "inv_sets": p["inv_sets"].split(","),
        "n_test": int(p["n_test"]),
        "wall_seconds": parent.data.metrics.get(
            "experiment/wall_seconds", ((info.end_time or info.start_time) - info.start_time) / 1000
        ),
        "leaders": len({r.info.run_id for r in leaders} | {parent_run_id}),
        "worker_seconds": round(sum(total.values()), 1),
        "busy_seconds": round(busy_seconds(unit_runs), 1),
        "unit_seconds": {k: round(v, 1) for k, v in total.items()},
        "eval_share": {k: round(v, 3) for k, v in share.items()},
        "units": units,
        **conditions(),
        "study_name": study,
        "command": experiment_command(p, study),
    }
    (out / RUN_JSON).write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    results = load(out)
    render(results)
    return results


def _download_tables(parent, tmp: Path) -> list[Path]:
    """The parent run's inv table, test table and folds, downloaded into `tmp` (inv table first);
    one line when the run has not published them (an experiment still running or stopped)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    paths = []
    for artifact in (f"tables/{INV_TABLE}.csv", f"tables/{TEST_TABLE}.csv", "folds.csv"):
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=parent.info.run_id, artifact_path=artifact, dst_path=str(tmp)
            )
        except MlflowException:
            raise ConfigError(
                f"--run-id {parent.info.run_id} has no {artifact} ({parent.info.status}): its "
                "experiment has not finished; rerun its `robustlab experiment` command to resume "
                "it, then report its last parent run"
            ) from None
        paths.append(Path(path))
    return paths


def _publish_table(path: Path, out: Path) -> Path:
    """Copy a CSV into `out`, gzip-compressed (deterministically: no name, no time) when big."""
    if path.stat().st_size <= COMPRESS_OVER:
        return Path(shutil.copy(path, out / path.name))
    target = out / f"{path.name}.gz"
    with (
        open(path, "rb") as src,
        open(target, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
    ):
        shutil.copyfileobj(src, gz)
    return target
