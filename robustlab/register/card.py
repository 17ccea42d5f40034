"""The model card: a registered version's description (Markdown the MLflow UI renders), written
from what the version's tags, its source run and its model's provenance say."""

from __future__ import annotations

import math
from collections.abc import Mapping

from robustlab.attacks.registry import card_rows
from robustlab.evaluation.selection import RULE

CLEAN_ROW = ("test/clean_acc", "clean accuracy")
HUMAN_ROWS = (  # after the attacks' rows (the attack registry's, in its order)
    ("test/human_pool_acc_changed", "human-labelled invariance examples, label changed"),
    ("test/human_pool_acc_kept", "human-labelled invariance examples, label kept"),
    ("test/human_pool_bal_acc", "human-labelled invariance examples, balanced"),
)
EVALUATIONS = "## Later evaluations"
ARCHITECTURES = {  # model name -> its layers, as a reader wants them
    "madry_cnn": "conv 5×5×32 → max-pool → ReLU → conv 5×5×64 → max-pool → ReLU → dense 1024 → "
    "10 logits",
    "small_cnn": "TRADES' SmallCNN: conv 3×3×32 → ReLU → conv 3×3×32 → max-pool → ReLU → conv "
    "3×3×64 → ReLU → conv 3×3×64 → max-pool → ReLU → dense 200 → ReLU → dropout 0.5 → dense 200 "
    "→ ReLU → 10 logits; 312,202 parameters",
}


def _value(tags: Mapping[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def _row(tags: Mapping[str, str], metric: str, label: str, prefix: str = "robustlab.") -> str:
    v = _value(tags, prefix + metric)
    if v is None or math.isnan(v):
        return ""
    low, high = _value(tags, f"{prefix}{metric}_ci_low"), _value(tags, f"{prefix}{metric}_ci_high")
    interval = f"[{low:.4f}, {high:.4f}]" if low is not None and high is not None else "–"
    return f"| {label} | {v:.4f} | {interval} |"


def figures_table(tags: Mapping[str, str], prefix: str = "robustlab.") -> list[str]:
    metrics = [k.removeprefix(prefix) for k in tags if k.startswith(prefix)]
    named = [CLEAN_ROW, *card_rows(metrics), *HUMAN_ROWS]
    rows = [_row(tags, m, label, prefix) for m, label in named]
    rows = [r for r in rows if r]
    return ["| figure | value | 95% interval |", "|---|---|---|", *rows] if rows else []


LIMITS = (
    "## Known limits",
    "",
    "- MNIST digits only; robustness measured for L∞ ε as above; AutoAttack and Square run on "
    "a seeded subset of the test images (see its n in the test run).",
    "- Invariance accuracy rests on a few hundred human-labelled examples (ten raters for the "
    "thesis set, published labels for Tramèr's), of which few change their label: read the "
    "intervals.",
    "- The selection set and the training pool are human-labelled L∞ and L0 examples; other "
    "kinds of label-changing perturbation are untested.",
)


def _usage(name: str, version: str) -> list[str]:
    """How to load, serve and re-evaluate the version."""
    body = "$(python -c 'import json, numpy as np; print(json.dumps(np.zeros((1, 28, 28, 1)).tolist()))')"
    return [
        "## Load and serve",
        "",
        "```python",
        "import mlflow, numpy as np",
        f'model = mlflow.pyfunc.load_model("models:/{name}/{version}")',
        "logits = model.predict(np.zeros((1, 28, 28, 1), np.float32))  # float32 in [0, 1]",
        "```",
        "",
        "```bash",
        f"mlflow models serve -m models:/{name}/{version} --env-manager local --port 5002",
        "curl -s localhost:5002/invocations -H 'Content-Type: application/json' \\",
        f'  -d "{{\\"inputs\\": {body}}}"  # (N, 28, 28, 1) float32 -> (N, 10) logits',
        f"robustlab evaluate --model-uri models:/{name}/{version}  # strong attacks again",
        "```",
        "",
    ]


def _method(params: Mapping[str, str]) -> str:
    """The training method, with TRADES' β only for a TRADES-trained model."""
    method = params.get("method", "–")
    beta = f" (TRADES β {params.get('trades_beta', '–')})" if method == "trades" else ""
    return f"method `{method}`{beta}"


def model_card(
    name: str,
    version: str,
    tags: Mapping[str, str],
    params: Mapping[str, str],
    meta: Mapping[str, object],
    n_excluded: int,
) -> str:
    """The Markdown description of `name` version `version` (see the module docstring)."""
    sel = [
        f"{m} = {tags[f'robustlab.{m}']}"
        for m in ("sel/clean_acc", "sel/pgd_acc", "sel/inv_bal_acc", "sel/inv_acc")
        if f"robustlab.{m}" in tags
    ]
    phases = ", ".join(
        f"{p.get('name')} {p.get('epochs')} epochs (clean {p.get('mix_clean', 0):.2f} / "
        f"attacked {p.get('mix_ptb', 0):.2f} / invariance {p.get('mix_inv', 0):.2f})"
        for p in meta.get("phases", []) or []
        if isinstance(p, Mapping)
    )
    arch = params.get("model", "madry_cnn")
    layers = f" ({ARCHITECTURES[arch]})" if arch in ARCHITECTURES else ""
    lines = [
        f"# {name} version {version}",
        "",
        f"An MNIST classifier trained and judged by robustlab: `{arch}`{layers}. Input: float32 "
        "images (N, 28, 28, 1) in [0, 1]; output: 10 logits (not probabilities).",
        "",
        "## Training",
        "",
        f"- regime `{meta.get('regime', params.get('regime', '?'))}`: {phases or '–'}",
        f"- {_method(params)}, L∞ ε = {meta.get('eps', params.get('eps', '?'))}, {params.get('attack_steps', '?')} "
        f"attack steps, seed {meta.get('seed', params.get('seed', '?'))}, training precision "
        f"{meta.get('training_precision', '?')} (the model is float32)",
        f"- source run `{tags.get('robustlab.source_run_id', meta.get('run_id', '?'))}`; MNIST "
        f"file digest `{meta.get('data_digest', tags.get('robustlab.data_digest', '?'))}`",
        "",
        "## Data and exclusions",
        "",
        "55,000 MNIST training images (5,000 more for validation); invariance examples: "
        f"{params.get('inv_pool') or 'none'} ({params.get('inv_label_source', '–')} labels). "
        f"**{n_excluded} MNIST test images are excluded** from every evaluation of this model: "
        "they are the source images of invariance examples it trained on, validated on, or was "
        "selected on (`robustlab.excluded_test_indices`); whatever URI loads it, robustlab "
        "refuses to score it on them.",
        "",
        "## Selection (validation data only)",
        "",
        f"Rule: {RULE}. Clean floor {tags.get('robustlab.clean_floor', '–')}; criterion "
        f"{tags.get('robustlab.criterion', '–')}. Validation figures: {', '.join(sel) or '–'}.",
        "",
        "## Test figures",
        "",
        f"From test run `{tags.get('robustlab.test_run_id', '–')}`, on the MNIST test set minus "
        "the excluded images, L∞ ε = "
        f"{tags.get('robustlab.eval_eps', '?')}:",
        "",
        *figures_table(tags),
        "",
        *_usage(name, version),
        *LIMITS,
    ]
    return "\n".join(lines) + "\n"


def with_evaluation(card: str, run_id: str, model_uri: str, metrics: Mapping[str, float]) -> str:
    """`card` with one more later evaluation (from `robustlab evaluate`) appended."""
    tags = {f"e.{k}": f"{v:.6g}" for k, v in metrics.items()}
    table = figures_table(tags, prefix="e.")
    head = card if EVALUATIONS in card else card.rstrip() + f"\n\n{EVALUATIONS}\n"
    entry = [f"\n### evaluate run `{run_id}` ({model_uri})", "", *table]
    return head.rstrip() + "\n" + "\n".join(entry) + "\n"
