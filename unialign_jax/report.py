"""Results tables (console, markdown, JSON) and plots.

`write_summary` writes `summary.json` ({"stages": [{"name", "modalities", "metrics"}]}, metrics as
produced by `unialign_jax.eval`, rates as fractions in [0, 1]) and `summary.md` (per stage: a table
of modality pairs marked seen/unseen, then codebook, routing, forgetting and any other metrics; rates
printed as percentages). Every file is written to a temporary file beside it and renamed into place,
so a crash never leaves a half-written result; only process 0 writes, and `gs://` paths work
(`unialign_jax.files`).
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

from unialign_jax import files
from unialign_jax.eval.cross_modal import pair_status

_PAIR_METRIC = re.compile(r"^(classification|localisation)/(\w+)->(\w+)$|^retrieval/(\w+)->(\w+)/R@(\d+)$")
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


def pair_rows(
    metrics: Mapping[str, float], trained_modalities: Sequence[Sequence[str]]
) -> tuple[list[dict[str, object]], list[str]]:
    """Per-pair rows of one stage's metrics, ready for `format_table(rows, columns)`.

    Rows follow the order in which pairs first appear in `metrics`; `status` is 'seen' when the two
    modalities were trained together in one of the `trained_modalities` stages so far. Rates are
    converted to percentages. Columns: pair, status, classification %, localisation F1 %, R@k %
    (one per k found).
    """
    values: dict[str, dict[str, float]] = {}
    recall_ks: set[int] = set()
    for key, value in metrics.items():
        match = _PAIR_METRIC.match(key)
        if match is None:
            continue
        task, source, target, retrieval_source, retrieval_target, k = match.groups()
        if task is None:
            column, source, target = f"R@{k} %", retrieval_source, retrieval_target
            recall_ks.add(int(k))
        else:
            column = "classification %" if task == "classification" else "localisation F1 %"
        values.setdefault(f"{source}->{target}", {})[column] = 100.0 * float(value)
    modalities = list(dict.fromkeys(m for pair in values for m in pair.split("->")))
    status = pair_status(modalities, trained_modalities)
    rows = [{"pair": pair, "status": status[pair], **cells} for pair, cells in values.items()]
    columns = ["pair", "status", "classification %", "localisation F1 %"] + [f"R@{k} %" for k in sorted(recall_ks)]
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
        shown |= {k for k in metrics if _PAIR_METRIC.match(k)}

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


def stages_markdown(stages: Sequence[Mapping[str, object]]) -> str:
    """The default `summary.md`: per stage, the pair table, codebook, routing and forgetting."""
    normalised = [_normalise_stage(i, stage) for i, stage in enumerate(stages)]
    sections = [
        _stage_markdown(i, stage, [s["modalities"] for s in normalised[: i + 1]])
        for i, stage in enumerate(normalised)
    ]
    preamble = ["# Results", "", "Rates in %; seen = trained together in some stage so far.", ""]
    return "\n".join(preamble + sections)


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
    trained together in some stage <= i. The JSON is exactly
    {"stages": [{"name", "modalities", "metrics"}]}; a non-finite metric is refused (ValueError
    naming it). `markdown` is the method's `summary.md` (default: `stages_markdown`). Everything is
    validated and rendered before anything is written. Returns (json path, md path).
    """
    normalised = [_normalise_stage(i, stage) for i, stage in enumerate(stages)]
    summary_json = json.dumps({"stages": normalised}, indent=2, allow_nan=False) + "\n"
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


# ---------------------------------------------------------------------------------------------------
# Comparing methods over seeds.


def final_stage_scores(summary: Mapping[str, object]) -> dict[str, float]:
    """Headline numbers of a run's last stage: mean classification accuracy over unseen and seen
    pairs, and mean forgetting of the classification pairs learned in earlier stages."""
    stages = summary["stages"]
    last = stages[-1]
    pairs = [key.split("/", 1)[1] for key in last["metrics"] if key.startswith("classification/")]
    modalities = list(dict.fromkeys(m for pair in pairs for m in pair.split("->")))
    status = pair_status(modalities, [s["modalities"] for s in stages])
    groups: dict[str, list[float]] = {"unseen": [], "seen": [], "forgetting": []}
    for key, value in last["metrics"].items():
        if value is None:
            continue
        if key.startswith("classification/"):
            groups[status[key.split("/", 1)[1]]].append(float(value))
        elif key.startswith("forgetting/classification/"):
            groups["forgetting"].append(float(value))
    return {name: float(np.mean(values)) if values else math.nan for name, values in groups.items()}


def compare_runs(runs: Mapping[str, Sequence[epath.PathLike]]) -> str:
    """Markdown table: per method, mean ± std over its workdirs (seeds) of `final_stage_scores`."""
    summaries = {method: [epath.Path(w) / "results" / "summary.json" for w in workdirs]
                 for method, workdirs in runs.items()}
    missing = [f"{method}: {path}" for method, paths in summaries.items() for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError("no results (unfinished run or wrong workdir?): " + "; ".join(missing))
    rows = []
    for method, paths in summaries.items():
        scores = [final_stage_scores(files.read_json(path)) for path in paths]
        row: dict[str, object] = {"method": method, "runs": len(scores)}
        for name, column in (("unseen", "unseen pairs %"), ("seen", "seen pairs %"),
                             ("forgetting", "forgetting (pp)")):
            values = 100.0 * np.asarray([s[name] for s in scores])
            row[column] = f"{values.mean():.1f} ± {values.std():.1f}"
        rows.append(row)
    columns = ["method", "runs", "unseen pairs %", "seen pairs %", "forgetting (pp)"]
    return format_table(rows, columns, markdown=True)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m unialign_jax.report comet=w1,w2,w3 dcid=w4,w5,w6` prints the comparison table."""
    import sys

    arguments = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m unialign_jax.report METHOD=WORKDIR[,WORKDIR...] ..."
    if any(a in ("-h", "--help") for a in arguments):
        print(usage)
        return
    if not arguments or any("=" not in a for a in arguments):
        raise SystemExit(usage)
    runs = {name: value.split(",") for name, value in (a.split("=", 1) for a in arguments)}
    print(compare_runs(runs))


if __name__ == "__main__":
    main()
