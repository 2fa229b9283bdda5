"""Results tables (console, markdown, JSON) and plots.

`write_summary` writes `summary.json` ({"stages": [{"name", "modalities", "metrics"}]} and the
accuracy matrix, metrics as produced by `unialign_jax.eval`, rates as fractions in [0, 1]) and
`summary.md` (per stage: a table of modality pairs marked seen/unseen, then codebook, routing,
continual scores, forgetting and any other metrics; then the accuracy matrix; rates printed as
percentages). `compare_runs` (`python -m unialign_jax.report`) compares methods over seeds with
t intervals and paired differences (`eval.statistics`). Every file is written to a temporary file
beside it and renamed into place, so a crash never leaves a half-written result; only process 0
writes, and `gs://` paths work (`unialign_jax.files`).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from unialign_jax import cli
from unialign_jax import files
from unialign_jax.errors import UserError
from unialign_jax.eval import continual
from unialign_jax.eval import statistics as stats_lib
from unialign_jax.eval.cross_modal import pair_name, pair_status

_PAIR = r"(\w+)->(\w+)"
# (pattern, column, scale) of the per-pair metrics a stage's table shows; None scale: a 0/1 flag.
_PAIR_COLUMNS = (
    (re.compile(rf"^classification/{_PAIR}$"), "classification %", 100.0),
    (re.compile(rf"^aligned/classification/{_PAIR}$"), "aligned classes %", 100.0),
    (re.compile(rf"^localisation/{_PAIR}$"), "localisation F1 %", 100.0),
    (re.compile(rf"^retrieval/{_PAIR}/R@(\d+)$"), "R@{} %", 100.0),
    (re.compile(rf"^code_sharing/{_PAIR}$"), "code sharing %", 100.0),
    (re.compile(rf"^below_chance/{_PAIR}$"), "below chance", None),
)
_ALWAYS_SHOWN = ("classification %", "localisation F1 %")
_RATE_PREFIXES = ("classification/", "localisation/", "retrieval/", "routing/")
_MISSING = "-"


# ---------------------------------------------------------------------------------------------------
# Tables.


def _format_cell(value: object) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.2f}" if math.isfinite(value) else str(float(value))
    return str(value)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str], *, markdown: bool = False) -> str:
    """Renders rows (dicts keyed by column name) as an aligned text table, or a markdown table.

    Floats print with two decimals, missing cells and None as '-'. Columns holding only numbers (and
    missing cells) are right-aligned, the others left-aligned.
    """
    cells = [[_format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    numeric = [
        all(isinstance(row.get(c), (int, float, np.number, type(None))) for row in rows) for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)]
        return f"| {' | '.join(padded)} |" if markdown else "  ".join(padded)

    if markdown:
        rule = "|" + "|".join("-" * (w + 1) + (":" if right else "-") for w, right in zip(widths, numeric)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(columns)), rule] + [line(values) for values in cells])


def _pair_metric(key: str) -> tuple[str, str, float | None] | None:
    """(pair, column, scale) of a per-pair metric key, None for other keys."""
    for pattern, column, scale in _PAIR_COLUMNS:
        match = pattern.match(key)
        if match:
            source, target, *k = match.groups()
            return pair_name(source, target), column.format(*k), scale
    return None


def pair_rows(
    metrics: Mapping[str, float], trained_modalities: Sequence[Sequence[str]]
) -> tuple[list[dict[str, object]], list[str]]:
    """Per-pair rows of one stage's metrics, ready for `format_table(rows, columns)`.

    Rows follow the order in which pairs first appear in `metrics`; `status` is 'seen' when the two
    modalities were trained together in one of the `trained_modalities` stages so far. Rates are
    converted to percentages, the below-chance flag to 'yes'/'no'. Columns: pair, status,
    classification %, then (when present) aligned classes %, localisation F1 %, R@k % (one per k
    found), code sharing %, below chance.
    """
    values: dict[str, dict[str, object]] = {}
    found: set[str] = set()
    for key, value in metrics.items():
        parsed = _pair_metric(key)
        if parsed is None:
            continue
        pair, column, scale = parsed
        values.setdefault(pair, {})[column] = ("yes" if value else "no") if scale is None else scale * float(value)
        found.add(column)
    modalities = list(dict.fromkeys(m for pair in values for m in pair.split("->")))
    status = pair_status(modalities, trained_modalities)
    rows = [{"pair": pair, "status": status[pair], **cells} for pair, cells in values.items()]
    recall = sorted((c for c in found if c.startswith("R@")), key=lambda c: int(c[2:-2]))
    ordered = ["classification %", "aligned classes %", "localisation F1 %", *recall, "code sharing %",
               "below chance"]
    columns = ["pair", "status"] + [c for c in ordered if c in found or c in _ALWAYS_SHOWN]
    return rows, columns


# ---------------------------------------------------------------------------------------------------
# Summary files.


def _json_number(key: str, value: object) -> float | int:
    """A metric as a JSON number: ints stay ints; a non-finite float is refused."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"metric {key!r} is a boolean, expected a number")
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r} = {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"metric {key!r} is {number}: results must be finite")
    return number


def _normalise_stage(index: int, stage: Mapping[str, object]) -> dict[str, object]:
    if set(stage) != {"name", "modalities", "metrics"}:
        raise ValueError(f"stage {index} must have exactly the keys name, modalities, metrics; got {sorted(stage)}")
    name, modalities, metrics = stage["name"], stage["modalities"], stage["metrics"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"stage {index}: name must be a non-empty string, got {name!r}")
    if isinstance(modalities, str) or not all(isinstance(m, str) for m in modalities):
        raise ValueError(f"stage {index} ({name}): modalities must be a list of names, got {modalities!r}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"stage {index} ({name}): metrics must be a mapping, got {type(metrics).__name__}")
    return {
        "name": name,
        "modalities": list(modalities),
        "metrics": {str(key): _json_number(str(key), value) for key, value in metrics.items()},
    }


def _stage_markdown(index: int, stage: Mapping[str, object], trained_modalities: Sequence[Sequence[str]]) -> str:
    metrics: dict[str, float | None] = stage["metrics"]
    lines = [f"## Stage {index + 1}: {stage['name']} ({', '.join(stage['modalities'])})", ""]
    shown = set()

    present = {k: v for k, v in metrics.items() if v is not None}
    rows, columns = pair_rows(present, trained_modalities)
    if rows:
        lines += [format_table(rows, columns, markdown=True), ""]
        shown |= {k for k in metrics if _pair_metric(k) is not None}

    if "codebook/active" in metrics:
        perplexities = [(k.split("/", 2)[2], v) for k, v in metrics.items() if k.startswith("codebook/perplexity/")]
        used = " / ".join(_format_cell(metrics.get(f"codebook/used_by_{n}")) for n in ("1", "2", "3+"))
        text = (
            f"Codebook: {_format_cell(metrics['codebook/active'])} active codes; used by 1 / 2 / 3+ modalities: "
            f"{used}; dead: {_format_cell(metrics.get('codebook/dead'))}"
        )
        if perplexities:
            text += "; perplexity: " + ", ".join(f"{m} {_format_cell(v)}" for m, v in perplexities)
        lines += [text, ""]
        shown |= {k for k in metrics if k.startswith("codebook/")}

    routing: dict[str, list[str]] = {}
    for key, value in metrics.items():
        if key.startswith("routing/"):
            routing.setdefault(key.split("/")[1], []).append(_format_cell(None if value is None else 100 * value))
            shown.add(key)
    if routing:
        lines += ["Routing load (% per expert): " + "; ".join(f"{m} {' / '.join(v)}" for m, v in routing.items()), ""]

    summary = _continual_line(metrics)
    if summary:
        lines += [summary, ""]
        shown |= {k for k in metrics if k.startswith(("continual/", "chance/"))}

    forgetting_rows = []
    for key, value in metrics.items():
        if key.startswith("forgetting/"):
            measured = key.removeprefix("forgetting/")
            scale = 100 if measured.startswith(_RATE_PREFIXES) else 1
            change = None if value is None else scale * value
            forgetting_rows.append({"metric": measured, "change since learned": change})
            shown.add(key)
    if forgetting_rows:
        lines += ["Forgetting (rates in percentage points; negative = forgotten):", ""]
        lines += [format_table(forgetting_rows, ["metric", "change since learned"], markdown=True), ""]

    other = [{"metric": k, "value": v} for k, v in metrics.items() if k not in shown]
    if other:
        lines += [format_table(other, ["metric", "value"], markdown=True), ""]
    return "\n".join(lines)


def _continual_line(metrics: Mapping[str, float]) -> str:
    """'Continual: ACC ..%, BWT .. pp, FWT .. pp; aligned classes: ...; chance ..%', or ''."""
    def scores(prefix: str) -> str:
        parts = [f"{name} {_format_cell(100 * metrics[prefix + name])}{unit}"
                 for name, unit in (("ACC", "%"), ("BWT", " pp"), ("FWT", " pp")) if prefix + name in metrics]
        return ", ".join(parts)

    parts = [text for text in (scores("continual/"), scores("continual/aligned/")) if text]
    if not parts:
        return ""
    line = "Continual (classification): " + parts[0]
    if len(parts) > 1:
        line += "; on the aligned classes: " + parts[1]
    if "chance/classification" in metrics:
        line += f"; chance {_format_cell(100 * metrics['chance/classification'])}%"
    return line


def _matrix_markdown(stages: Sequence[Mapping[str, object]]) -> str:
    """The accuracy matrix a_{s,p} (`eval.continual.accuracy_matrix`) as markdown tables, or ''."""
    sections = []
    for prefix, title in (("classification/", "all classes"), ("aligned/classification/", "aligned classes")):
        pairs, matrix = continual.accuracy_matrix([stage["metrics"] for stage in stages], prefix)
        if not pairs:
            continue
        rows = [{"after stage": f"{i + 1}: {stage['name']}",
                 **{pair: None if np.isnan(v) else 100 * v for pair, v in zip(pairs, matrix[i])}}
                for i, stage in enumerate(stages)]
        sections += [f"Classification accuracy %, {title} (row: after stage s; column: pair p):", "",
                     format_table(rows, ["after stage", *pairs], markdown=True), ""]
    return "\n".join(["## Accuracy matrix", "", *sections]) if sections else ""


def accuracy_matrices(stages: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The `accuracy_matrix` entry of `summary.json`: stage names, pairs, and per prefix the rows
    a_{s,p} (fractions; null where pair p was not scored after stage s)."""
    history = [stage["metrics"] for stage in stages]
    result: dict[str, object] = {"stages": [stage["name"] for stage in stages]}
    for prefix, name in (("classification/", "all_classes"), ("aligned/classification/", "aligned_classes")):
        pairs, matrix = continual.accuracy_matrix(history, prefix)
        if pairs:
            result[name] = {"pairs": pairs,
                            "rows": [[None if np.isnan(v) else float(v) for v in row] for row in matrix]}
    return result


def stages_markdown(stages: Sequence[Mapping[str, object]]) -> str:
    """The default `summary.md`: per stage, the pair table, codebook, routing, continual scores and
    forgetting; then the accuracy matrix over the stages."""
    normalised = [_normalise_stage(i, stage) for i, stage in enumerate(stages)]
    sections = [
        _stage_markdown(i, stage, [s["modalities"] for s in normalised[: i + 1]])
        for i, stage in enumerate(normalised)
    ]
    preamble = ["# Results", "", ("Rates in %; seen = trained together in some stage so far; aligned classes = "
                                  "the test examples of the classes both modalities of the pair were trained on."), ""]
    matrix = _matrix_markdown(normalised)
    return "\n".join(preamble + sections + ([matrix] if matrix else []))


def read_summary(results_dir: epath.PathLike) -> list[dict]:
    """The stages of `summary.json` in `results_dir` (`write_summary`'s schema), [] if there is none."""
    path = epath.Path(results_dir) / "summary.json"
    return list(files.read_json(path)["stages"]) if path.exists() else []


def write_summary(results_dir: epath.PathLike, stages: Sequence[Mapping[str, object]],
                  markdown: str | None = None) -> tuple[epath.Path, epath.Path]:
    """Writes `summary.json` and `summary.md` for all stages so far into `results_dir`: the one
    writer of a workdir's results.

    stages: [{'name': str, 'modalities': [str] (the modalities trained in that stage), 'metrics':
    {key: number}}], oldest first. A pair is marked 'seen' in stage i when both its modalities were
    trained together in some stage <= i. The JSON is {"stages": [{"name", "modalities", "metrics"}]},
    plus "accuracy_matrix" (`accuracy_matrices`) when a stage has classification scores; a
    non-finite metric is refused (ValueError naming it). `markdown` is the method's `summary.md`
    (default: `stages_markdown`). Everything is validated and rendered before anything is written.
    Returns (json path, md path).
    """
    normalised = [_normalise_stage(i, stage) for i, stage in enumerate(stages)]
    content: dict[str, object] = {"stages": normalised}
    matrices = accuracy_matrices(normalised)
    if len(matrices) > 1:
        content["accuracy_matrix"] = matrices
    summary_json = json.dumps(content, indent=2, allow_nan=False) + "\n"
    summary_md = stages_markdown(normalised) if markdown is None else markdown
    results_dir = epath.Path(results_dir)
    return (files.write_atomic(results_dir / "summary.json", summary_json),
            files.write_atomic(results_dir / "summary.md", summary_md))


# ---------------------------------------------------------------------------------------------------
# Plots.

_SHARING_COLOURS = ("black", "tab:blue", "tab:green", "tab:red")  # dead, 1, 2, 3+ modalities (COMET Fig. 3)


def read_png(path: epath.PathLike) -> np.ndarray:
    """A PNG written here as uint8 [H, W, C] (for the metric writers)."""
    import matplotlib.image  # pylint: disable=import-outside-toplevel

    with epath.Path(path).open("rb") as f:
        pixels = matplotlib.image.imread(f, format="png")
    return np.asarray(np.round(pixels * 255), np.uint8) if pixels.dtype != np.uint8 else pixels


def plot_code_usage(
    path: epath.PathLike, usage_matrix: np.ndarray, modalities: Sequence[str], *, min_count: int = 1
) -> epath.Path:
    """Saves a PNG of codebook usage by modality, in the manner of COMET Fig. 3.

    usage_matrix: int[K, len(modalities)] selection counts (`eval.code_usage_counts`). Top: heat map
    of log10(1 + count) per code and modality. Bottom: each code coloured by how many modalities use it
    (>= `min_count` selections): black = none, blue = 1, green = 2, red = 3 or more.
    """
    usage_matrix = np.asarray(usage_matrix)
    if usage_matrix.ndim != 2 or usage_matrix.shape[1] != len(modalities):
        raise ValueError(
            f"usage_matrix must be [codes, {len(modalities)}] for {list(modalities)}, got {usage_matrix.shape}"
        )
    sharing = np.minimum(np.sum(usage_matrix >= min_count, axis=1), 3)

    figure = Figure(figsize=(10, 1.2 + 0.45 * len(modalities)), layout="constrained")
    heat_axes, strip_axes = figure.subplots(2, 1, sharex=True, height_ratios=[len(modalities), 1])
    image = heat_axes.imshow(np.log10(1 + usage_matrix.T), aspect="auto", interpolation="nearest", cmap="viridis")
    heat_axes.set_yticks(range(len(modalities)), modalities)
    heat_axes.set_title(f"Codebook usage by modality ({usage_matrix.shape[0]} active codes)")
    figure.colorbar(image, ax=heat_axes, label="log10(1 + selections)")
    strip_axes.imshow(
        sharing[None, :], aspect="auto", interpolation="nearest", cmap=ListedColormap(_SHARING_COLOURS), vmin=0, vmax=3
    )
    strip_axes.set_yticks([])
    strip_axes.set_xlabel("code index")
    names = ("unused", "1 modality", "2 modalities", "3+ modalities")
    strip_axes.legend(
        handles=[
            Patch(color=colour, label=f"{name} ({np.sum(sharing == n)})")
            for n, (colour, name) in enumerate(zip(_SHARING_COLOURS, names))
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.9),
        ncol=4,
        frameon=False,
    )
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    return files.write_atomic(path, png.getvalue())


def plot_accuracy_matrix(path: epath.PathLike, stages: Sequence[Mapping[str, object]]) -> epath.Path:
    """Saves a PNG heat map of the classification accuracy matrix a_{s,p} of a run.

    stages: the run's results so far (`write_summary`'s schema). Rows: after stage s; columns: the
    pairs in the order they were first scored, '*' marking those never trained together; each cell
    printed in %, blank where the pair was not scored yet.
    """
    pairs, matrix = continual.accuracy_matrix([stage["metrics"] for stage in stages])
    if not pairs:
        raise ValueError("plot_accuracy_matrix: no classification/X->Y metrics in any stage")
    modalities = list(dict.fromkeys(m for pair in pairs for m in pair.split("->")))
    status = pair_status(modalities, [stage["modalities"] for stage in stages])
    figure = Figure(figsize=(1.2 + 0.75 * len(pairs), 1.4 + 0.5 * len(stages)), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(100 * np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest",
                        cmap="viridis", vmin=0, vmax=100)
    for (row, column), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            axes.text(column, row, f"{100 * value:.0f}", ha="center", va="center",
                      color="black" if value > 0.6 else "white", fontsize=8)
    axes.set_xticks(range(len(pairs)), [pair + ("*" if status[pair] == "unseen" else "") for pair in pairs],
                    rotation=45, ha="right")
    axes.set_yticks(range(len(stages)), [f"{i + 1}: {stage['name']}" for i, stage in enumerate(stages)])
    axes.set_title("Classification accuracy % after each stage (* never trained together)")
    figure.colorbar(image, ax=axes, label="accuracy %")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    return files.write_atomic(path, png.getvalue())


# ---------------------------------------------------------------------------------------------------
# Comparing methods over seeds.


# (score key, column): the headline numbers of a run, rates in %.
_HEADLINE = (
    ("unseen", "unseen pairs %"),
    ("unseen_aligned", "unseen, aligned classes %"),
    ("seen", "seen pairs %"),
    ("ACC", "ACC %"),
    ("BWT", "BWT (pp)"),
    ("FWT", "FWT (pp)"),
)
MIN_SEEDS = 5


def final_stage_scores(summary: Mapping[str, object]) -> dict[str, float]:
    """Headline numbers of a run's last stage (NaN where the summary lacks them).

    unseen / seen: mean classification accuracy over the pairs never / once trained together;
    unseen_aligned: the same on their aligned classes; ACC: the mean over every pair; BWT: the mean
    forgetting of the classification pairs scored before the last stage (= `continual/BWT`); FWT:
    `continual/FWT` (`eval.continual`); 'unseen@s': the unseen pairs' mean after an earlier stage s
    (1-based) that scored some (after stage 2 of 3: the paper's "Second Stage" columns). Summaries
    written before these metrics existed give NaN for the aligned and FWT numbers;
    `python -m unialign_jax.evaluate` recomputes them.
    """
    stages = summary["stages"]
    last = stages[-1]["metrics"]
    status = _pair_status_of(stages)
    groups: dict[str, list[float]] = {"unseen": [], "seen": [], "unseen_aligned": [], "ACC": [], "BWT": []}
    for key, value in last.items():
        if value is None:
            continue
        if key.startswith("classification/"):
            groups[status[key.split("/", 1)[1]]].append(float(value))
            groups["ACC"].append(float(value))
        elif key.startswith("aligned/classification/") and status[key.split("/", 2)[2]] == "unseen":
            groups["unseen_aligned"].append(float(value))
        elif key.startswith("forgetting/classification/"):
            groups["BWT"].append(float(value))
    scores = {name: float(np.mean(values)) if values else math.nan for name, values in groups.items()}
    scores["FWT"] = float(last.get("continual/FWT", math.nan))
    for index in range(len(stages) - 1):
        earlier = _pair_status_of(stages[: index + 1])
        unseen = [float(value) for key, value in stages[index]["metrics"].items()
                  if key.startswith("classification/") and earlier[key.split("/", 1)[1]] == "unseen"]
        if unseen:
            scores[f"unseen@{index + 1}"] = float(np.mean(unseen))
    return scores


def _pair_status_of(stages: Sequence[Mapping[str, object]]) -> dict[str, str]:
    """`pair_status` of the classification pairs of the last of `stages`, given all their modalities."""
    pairs = [key.split("/", 1)[1] for key in stages[-1]["metrics"] if key.startswith("classification/")]
    modalities = list(dict.fromkeys(m for pair in pairs for m in pair.split("->")))
    return pair_status(modalities, [s["modalities"] for s in stages])


def _headline(found: Mapping[str, Sequence[tuple[int, Mapping[str, float]]]]) -> list[tuple[str, str]]:
    """(score key, column) of the comparison: `_HEADLINE`, with 'unseen after stage s %' after the
    unseen column for every earlier stage some run scored unseen pairs at."""
    stages = sorted({int(key[len("unseen@"):]) for runs in found.values() for _, scores in runs
                     for key in scores if key.startswith("unseen@")})
    earlier = [(f"unseen@{s}", f"unseen after stage {s} %") for s in stages]
    return [_HEADLINE[0], *earlier, *_HEADLINE[1:]]


def _read_runs(runs: Mapping[str, Sequence[epath.PathLike]]) -> dict[str, list[tuple[int, dict[str, float]]]]:
    """{label: [(seed, final_stage_scores)]} from each workdir's results and config.json; names every
    missing file, and a label that repeats a seed, before returning."""
    problems, found = [], {}
    for label, workdirs in runs.items():
        for workdir in workdirs:
            for name in ("results/summary.json", "config.json"):
                if not (epath.Path(workdir) / name).exists():
                    problems.append(f"{label}: {epath.Path(workdir) / name}")
    if problems:
        raise ReportError("no results (unfinished run or wrong workdir?): " + "; ".join(problems))
    for label, workdirs in runs.items():
        seeds = [files.read_json(epath.Path(w) / "config.json").get("seed") for w in workdirs]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1}, key=str)
        if repeated:
            raise ReportError(f"{label}: several workdirs with seed {repeated} ({', '.join(map(str, workdirs))}): "
                             "one run per seed")
        found[label] = [(seed, final_stage_scores(files.read_json(epath.Path(w) / "results" / "summary.json")))
                        for seed, w in zip(seeds, workdirs)]
    return found


def _interval_cell(values: Sequence[float], signed: bool = False) -> str:
    """'mean ± half-width of the 95% t interval' (a single value: just the mean), '-' when NaN."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return _MISSING
    interval = stats_lib.mean_interval(values)
    sign = "+" if signed else ""
    if interval.n < 2:
        return f"{interval.mean:{sign}.1f}"
    return f"{interval.mean:{sign}.1f} ± {interval.high - interval.mean:.1f}"


def compare_runs(runs: Mapping[str, Sequence[epath.PathLike]],
                 paired: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown: per label, the mean ± 95% t-interval half-width over its workdirs (one per seed)
    of `final_stage_scores`; then, for each (A, B) in `paired`, the per-seed differences A - B
    (`paired_differences`). Warns in the text when a label has fewer than `MIN_SEEDS` runs."""
    for pair in paired:
        unknown = [label for label in pair if label not in runs]
        if unknown:
            raise ReportError(f"paired comparison {pair}: unknown label(s) {unknown}; labels: {list(runs)}")
    found = _read_runs(runs)
    headline = _headline(found)
    rows = []
    for label, scored in found.items():
        row: dict[str, object] = {"method": label, "runs": len(scored)}
        for name, column in headline:
            row[column] = _interval_cell([100.0 * scores.get(name, math.nan) for _, scores in scored])
        rows.append(row)
    lines = [format_table(rows, ["method", "runs", *(column for _, column in headline)], markdown=True), "",
             ("± is the half-width of the 95% confidence interval of the mean (Student t, n - 1 degrees of "
              "freedom, over seeds).")]
    few = [f"{label} ({len(scored)})" for label, scored in found.items() if len(scored) < MIN_SEEDS]
    if few:
        lines.append(f"Warning: fewer than {MIN_SEEDS} seeds for {', '.join(few)}: the intervals are wide "
                     "and rest on the normality of the seed-to-seed spread.")
    for first, second in paired:
        lines += ["", paired_differences(first, found[first], second, found[second], headline)]
    return "\n".join(lines)


def paired_differences(first: str, first_runs: Sequence[tuple[int, Mapping[str, float]]],
                       second: str, second_runs: Sequence[tuple[int, Mapping[str, float]]],
                       headline: Sequence[tuple[str, str]] = _HEADLINE) -> str:
    """Markdown table of the per-seed differences first - second of each headline score, their mean
    and paired 95% t interval, and whether the gap is resolved (the interval excludes 0) or noise.

    *_runs: [(seed, final_stage_scores)]; headline: the (score key, column) pairs to compare. The
    runs are paired by seed; the two labels must hold the same seeds (ValueError listing the
    unmatched ones otherwise).
    """
    by_seed = {seed: scores for seed, scores in first_runs}, {seed: scores for seed, scores in second_runs}
    if set(by_seed[0]) != set(by_seed[1]):
        raise ReportError(f"paired comparison {first} vs {second} needs the same seeds (config.json 'seed'): "
                         f"{first} has {sorted(by_seed[0], key=str)}, {second} has {sorted(by_seed[1], key=str)}")
    seeds = sorted(by_seed[0], key=str)
    rows = []
    for name, column in headline:
        differences = [100.0 * (by_seed[0][seed].get(name, math.nan) - by_seed[1][seed].get(name, math.nan))
                       for seed in seeds]
        row: dict[str, object] = {"score": column.removesuffix(" %").removesuffix(" (pp)") + " (pp)",
                                  "per seed": ", ".join(f"{d:+.1f}" if math.isfinite(d) else _MISSING
                                                        for d in differences)}
        finite = [d for d in differences if math.isfinite(d)]
        if len(finite) < len(differences) or not finite:
            row.update({"mean": _MISSING, "95% CI": _MISSING, "reading": "missing in some run"})
        elif len(finite) < 2:
            row.update({"mean": f"{finite[0]:+.1f}", "95% CI": _MISSING, "reading": "one seed: no interval"})
        else:
            interval = stats_lib.mean_interval(finite)
            reading = (f"resolved: {first if interval.mean > 0 else second} higher" if interval.resolved
                       else "noise (the interval contains 0)")
            row.update({"mean": f"{interval.mean:+.1f}", "95% CI": f"[{interval.low:+.1f}, {interval.high:+.1f}]",
                        "reading": reading})
        rows.append(row)
    title = f"Paired by seed ({', '.join(map(str, seeds))}): {first} - {second}"
    return "\n".join([title, "", format_table(rows, ["score", "per seed", "mean", "95% CI", "reading"],
                                                 markdown=True)])


class ReportError(UserError, ValueError):
    """The runs or arguments given to `report` cannot be compared as asked."""

    hint = "run with --help for the usage"


USAGE = ("usage: python -m unialign_jax.report LABEL=WORKDIR[,WORKDIR...] ... [--paired=LABEL_A,LABEL_B ...]\n"
         "  one workdir per seed; --paired adds the per-seed differences LABEL_A - LABEL_B (same seeds).")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m unialign_jax.report comet=w1,w2 dcid=w3,w4 --paired=comet,dcid` prints the markdown."""
    import sys

    arguments = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in arguments):
        print(USAGE)
        return
    paired, runs = [], {}
    for argument in arguments:
        if argument.startswith("--paired="):
            labels = argument.removeprefix("--paired=").split(",")
            if len(labels) != 2 or not all(labels):
                raise ReportError(f"--paired takes two labels separated by one comma, got {argument!r}")
            paired.append((labels[0], labels[1]))
        elif "=" in argument and not argument.startswith("-"):
            label, workdirs = argument.split("=", 1)
            runs[label] = [w for w in workdirs.split(",") if w]
        else:
            raise ReportError(f"unrecognised argument {argument!r}")
    if not runs:
        raise ReportError("no runs given")
    print(compare_runs(runs, paired))


if __name__ == "__main__":
    cli.guard(main)
