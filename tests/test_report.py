"""Tests for unialign_jax.report: console/markdown tables, summary files, code-usage plot."""

import json
import math

import numpy as np
import pytest

from unialign_jax import report


def _stages():
    stage_1 = {
        "classification/video->text": 0.5,
        "classification/text->video": np.float32(0.25),
        "retrieval/video->text/R@1": 0.125,
        "retrieval/video->text/R@10": 0.75,
        "codebook/active": np.int64(8),
        "codebook/used_by_1": 3,
        "codebook/used_by_2": 2,
        "codebook/used_by_3+": 0,
        "codebook/dead": 3,
        "codebook/perplexity/video": 2.5,
        "codebook/perplexity/text": 3.0,
    }
    stage_2 = {
        "classification/video->audio": 0.375,
        "localisation/video->audio": 0.3125,
        "classification/video->text": 0.4,
        "routing/audio/expert_0": 0.25,
        "routing/audio/expert_1": 0.75,
        "forgetting/classification/video->text": -0.1,
        "loss/total": 2.5,
    }
    return [
        {"name": "video_text", "modalities": ["video", "text"], "metrics": stage_1},
        {"name": "audio_text", "modalities": ["audio", "text"], "metrics": stage_2},
    ]


def test_format_table_console_and_markdown():
    rows = [{"pair": "video->audio", "acc": 12.345}, {"pair": "a->t", "acc": None, "n": 7}]
    assert report.format_table(rows, ["pair", "acc", "n"]) == (
        "pair            acc  n\n"
        "------------  -----  -\n"
        "video->audio  12.35  -\n"
        "a->t              -  7"
    )
    assert report.format_table(rows, ["pair", "acc"], markdown=True) == (
        "| pair         |   acc |\n"
        "|--------------|------:|\n"
        "| video->audio | 12.35 |\n"
        "| a->t         |     - |"
    )


def test_pair_rows_mark_seen_and_convert_to_percent():
    rows, columns = report.pair_rows(_stages()[1]["metrics"], [["video", "text"], ["audio", "text"]])
    assert columns == ["pair", "status", "classification %", "localisation F1 %"]
    assert rows == [
        {"pair": "video->audio", "status": "unseen", "classification %": 37.5, "localisation F1 %": 31.25},
        {"pair": "video->text", "status": "seen", "classification %": 40.0},
    ]


def test_write_summary_refuses_non_finite_metrics_and_writes_nothing(tmp_path):
    stages = _stages()
    stages[1]["metrics"]["loss/total"] = float("nan")
    with pytest.raises(ValueError, match="'loss/total' is nan"):
        report.write_summary(tmp_path / "results", stages)
    assert not (tmp_path / "results").exists()


def test_write_summary_exact_json_schema_and_markdown(tmp_path):
    json_path, md_path = report.write_summary(tmp_path / "results", _stages())
    summary = json.loads(json_path.read_text())
    assert list(summary) == ["stages", "accuracy_matrix"]
    assert summary["accuracy_matrix"] == {
        "stages": ["video_text", "audio_text"],
        "all_classes": {"pairs": ["video->text", "text->video", "video->audio"],
                        "rows": [[0.5, 0.25, None], [0.4, None, 0.375]]},
    }
    assert [list(stage) for stage in summary["stages"]] == [["name", "modalities", "metrics"]] * 2
    first, second = summary["stages"]
    assert first["name"] == "video_text" and first["modalities"] == ["video", "text"]
    assert first["metrics"]["classification/text->video"] == 0.25 and first["metrics"]["codebook/active"] == 8
    assert second["metrics"]["forgetting/classification/video->text"] == -0.1
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["summary.json", "summary.md"]

    markdown = md_path.read_text()
    assert "## Stage 1: video_text (video, text)" in markdown
    assert "| pair        | status | classification % | localisation F1 % | R@1 % | R@10 % |" in markdown
    assert "|-------------|--------|-----------------:|------------------:|------:|-------:|" in markdown
    assert "| video->text | seen   |            50.00 |                 - | 12.50 |  75.00 |" in markdown
    assert "| video->audio | unseen |            37.50 |             31.25 |" in markdown
    assert (
        "Codebook: 8 active codes; used by 1 / 2 / 3+ modalities: 3 / 2 / 0; dead: 3; "
        "perplexity: video 2.50, text 3.00"
    ) in markdown
    assert "Routing load (% per expert): audio 25.00 / 75.00" in markdown
    assert "| classification/video->text |               -10.00 |" in markdown
    assert "| loss/total |  2.50 |" in markdown
    assert "## Accuracy matrix" in markdown
    assert "| after stage   | video->text | text->video | video->audio |" in markdown
    assert "| 2: audio_text |       40.00 |           - |        37.50 |" in markdown


def test_write_summary_validates_before_writing(tmp_path):
    report.write_summary(tmp_path, _stages())
    before = (tmp_path / "summary.json").read_text()
    bad = _stages() + [{"name": "image_text", "modalities": ["image", "text"], "metrics": {"x": "high"}}]
    with pytest.raises(ValueError, match="metric 'x' = 'high' is not a number"):
        report.write_summary(tmp_path, bad)
    with pytest.raises(ValueError, match="exactly the keys name, modalities, metrics"):
        report.write_summary(tmp_path, [{"name": "s", "modalities": ["video"], "metrics": {}, "extra": 1}])
    assert (tmp_path / "summary.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "summary.md"]  # no temporary files left


def test_plot_code_usage_writes_png(tmp_path):
    usage = np.array([[3, 0, 0], [2, 1, 0], [1, 1, 2], [0, 0, 0]])
    path = report.plot_code_usage(tmp_path / "plots" / "codes.png", usage, ("video", "audio", "text"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["codes.png"]
    with pytest.raises(ValueError, match=r"usage_matrix must be \[codes, 2\]"):
        report.plot_code_usage(tmp_path / "x.png", usage, ("video", "audio"))


def _run(root, name, seed, unseen, seen, forgetting, aligned=None):
    """A fake finished two-stage workdir: config.json with its seed, results/summary.json."""
    last = {"classification/video->text": seen, "classification/audio->text": seen,
            "classification/video->audio": unseen, "classification/audio->video": unseen,
            "forgetting/classification/video->text": forgetting}
    if aligned is not None:
        last.update({"aligned/classification/video->audio": aligned, "aligned/classification/audio->video": aligned,
                     "aligned/classification/video->text": 1.0, "continual/FWT": unseen - 0.1})
    stages = [{"name": "vt", "modalities": ["video", "text"], "metrics": {"classification/video->text": 0.9}},
              {"name": "at", "modalities": ["audio", "text"], "metrics": last}]
    (root / name / "results").mkdir(parents=True)
    (root / name / "results" / "summary.json").write_text(json.dumps({"stages": stages}))
    (root / name / "config.json").write_text(json.dumps({"seed": seed}))
    return root / name


def test_final_stage_scores_of_one_run(tmp_path):
    summary = json.loads((_run(tmp_path, "a", 0, 0.3, 0.6, -0.1, aligned=0.5) / "results" / "summary.json").read_text())
    assert report.final_stage_scores(summary) == pytest.approx(
        {"unseen": 0.3, "seen": 0.6, "unseen_aligned": 0.5, "ACC": 0.45, "BWT": -0.1, "FWT": 0.2})
    old = json.loads((_run(tmp_path, "b", 0, 0.3, 0.6, -0.1) / "results" / "summary.json").read_text())
    scores = report.final_stage_scores(old)  # written before the aligned and FWT metrics
    assert math.isnan(scores["unseen_aligned"]) and math.isnan(scores["FWT"]) and scores["ACC"] == pytest.approx(0.45)


def test_compare_runs_mean_and_t_interval_over_seeds(tmp_path):
    comet = [_run(tmp_path, "a", 0, 0.3, 0.6, -0.1), _run(tmp_path, "b", 1, 0.5, 0.8, -0.3)]
    table = report.compare_runs({"comet": comet, "one": [_run(tmp_path, "c", 0, 0.2, 0.5, 0.0, aligned=0.4)]})
    lines = table.splitlines()
    # Two seeds: s = 14.142 pp, half-width t_{0.975,1} * s / sqrt(2) = 12.706 * 10 = 127.1 pp.
    assert lines[2].startswith("| comet  |    2 | 40.0 ± 127.1   | -")
    assert "70.0 ± 127.1" in lines[2] and "-20.0 ± 127.1" in lines[2]
    assert lines[3].startswith("| one    |    1 | 20.0           | 40.0")  # one run: no interval
    assert "Warning: fewer than 5 seeds for comet (2), one (1)" in table


def test_paired_differences_resolve_a_gap_or_call_it_noise(tmp_path):
    a = [_run(tmp_path, f"a{s}", s, unseen, seen, -0.1) for s, unseen, seen in ((0, 0.30, 0.6), (1, 0.35, 0.7),
                                                                                   (2, 0.40, 0.8))]
    b = [_run(tmp_path, f"b{s}", s, unseen, seen, -0.1) for s, unseen, seen in ((2, 0.25, 0.7), (0, 0.20, 0.5),
                                                                                   (1, 0.30, 0.6))]
    table = report.compare_runs({"A": a, "B": b}, paired=[("A", "B")])
    assert "Paired by seed (0, 1, 2): A - B" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    # unseen: +10, +5, +15 (paired by seed, not by order); mean 10, s = 5,
    # half-width t_{0.975,2} * 5 / sqrt(3) = 4.303 * 2.887 = 12.42 -> [-2.4, +22.4]: noise.
    assert "+10.0, +5.0, +15.0" in rows["unseen pairs (pp)"] and "[-2.4, +22.4]" in rows["unseen pairs (pp)"]
    assert "noise" in rows["unseen pairs (pp)"]
    # seen: +10 on every seed: a zero-width interval that excludes 0.
    assert "[+10.0, +10.0]" in rows["seen pairs (pp)"] and "resolved: A higher" in rows["seen pairs (pp)"]
    assert "missing in some run" in rows["FWT (pp)"]


def test_paired_differences_refuse_unmatched_or_repeated_seeds(tmp_path):
    a = [_run(tmp_path, "a0", 0, 0.3, 0.6, -0.1), _run(tmp_path, "a1", 1, 0.3, 0.6, -0.1)]
    b = [_run(tmp_path, "b0", 0, 0.3, 0.6, -0.1), _run(tmp_path, "b2", 2, 0.3, 0.6, -0.1)]
    with pytest.raises(ValueError, match=r"needs the same seeds .*A has \[0, 1\], B has \[0, 2\]"):
        report.compare_runs({"A": a, "B": b}, paired=[("A", "B")])
    with pytest.raises(ValueError, match="A: several workdirs with seed \\[0\\]"):
        report.compare_runs({"A": [a[0], b[0]]})
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['C'\]"):
        report.compare_runs({"A": a}, paired=[("A", "C")])


def test_report_cli_prints_the_paired_table(tmp_path, capsys):
    a, b = _run(tmp_path, "a", 0, 0.3, 0.6, -0.1), _run(tmp_path, "b", 0, 0.2, 0.6, -0.1)
    report.main([f"comet={a}", f"w/o PM={b}", "--paired=comet,w/o PM"])
    out = capsys.readouterr().out
    assert "| w/o PM |" in out and "Paired by seed (0): comet - w/o PM" in out and "one seed: no interval" in out
    with pytest.raises(report.ReportError, match="--paired takes two labels"):
        report.main([f"comet={a}", "--paired=comet"])


def test_compare_runs_names_every_workdir_without_results_before_reading_any(tmp_path):
    (tmp_path / "done" / "results").mkdir(parents=True)
    (tmp_path / "done" / "results" / "summary.json").write_text(json.dumps({"stages": []}))
    (tmp_path / "done" / "config.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(report.ReportError, match=r"comet: .*running/results/summary.json; .*running/config.json; "
                                                r"dcid: .*typo/results"):
        report.compare_runs({"comet": [tmp_path / "done", tmp_path / "running"], "dcid": [tmp_path / "typo"]})


def test_plot_accuracy_matrix_writes_png(tmp_path):
    path = report.plot_accuracy_matrix(tmp_path / "accuracy_matrix.png", _stages())
    pixels = report.read_png(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    with pytest.raises(ValueError, match="no classification/X->Y metrics"):
        report.plot_accuracy_matrix(tmp_path / "x.png", [{"name": "s", "modalities": ["a"], "metrics": {}}])


def test_report_adds_the_unseen_pairs_of_earlier_stages(tmp_path):
    # The paper's "Second Stage" columns: video<->audio after audio-text, before image-text.
    stages = [
        {"name": "vt", "modalities": ["video", "text"], "metrics": {"classification/video->text": 0.9}},
        {"name": "at", "modalities": ["audio", "text"], "metrics": {
            "classification/video->text": 0.8, "classification/video->audio": 0.3,
            "classification/audio->video": 0.2}},
        {"name": "it", "modalities": ["image", "text"], "metrics": {
            "classification/video->audio": 0.1, "classification/image->text": 0.7}},
    ]
    scores = report.final_stage_scores({"stages": stages})
    assert scores["unseen@2"] == pytest.approx(0.25) and "unseen@1" not in scores
    assert scores["unseen"] == pytest.approx(0.1) and scores["seen"] == pytest.approx(0.7)
    (tmp_path / "a" / "results").mkdir(parents=True)
    (tmp_path / "a" / "results" / "summary.json").write_text(json.dumps({"stages": stages}))
    (tmp_path / "a" / "config.json").write_text(json.dumps({"seed": 3}))
    table = report.compare_runs({"comet": [tmp_path / "a"]})
    header = table.splitlines()[0]
    assert "| unseen pairs % | unseen after stage 2 % | unseen, aligned classes % |" in header
    assert "| 10.0           | 25.0                   | -" in table.splitlines()[2]
