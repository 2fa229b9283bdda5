"""Tests for unialign_jax.report: console/markdown tables, summary files, code-usage plot."""

import json

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
    assert list(summary) == ["stages"]
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


def test_compare_runs_averages_unseen_seen_and_forgetting_over_seeds(tmp_path):
    def run(name, unseen, seen, forgetting):
        stages = [
            {"name": "vt", "modalities": ["video", "text"], "metrics": {"classification/video->text": 0.9}},
            {"name": "at", "modalities": ["audio", "text"], "metrics": {
                "classification/video->text": seen, "classification/audio->text": seen,
                "classification/video->audio": unseen, "classification/audio->video": unseen,
                "forgetting/classification/video->text": forgetting}},
        ]
        (tmp_path / name / "results").mkdir(parents=True)
        (tmp_path / name / "results" / "summary.json").write_text(json.dumps({"stages": stages}))
        return tmp_path / name

    table = report.compare_runs({"comet": [run("a", 0.3, 0.6, -0.1), run("b", 0.5, 0.8, -0.3)]})
    row = table.splitlines()[2]
    assert "| comet" in row and "40.0 ± 10.0" in row and "70.0 ± 10.0" in row and "-20.0 ± 10.0" in row


def test_compare_runs_names_every_workdir_without_results_before_reading_any(tmp_path):
    (tmp_path / "done" / "results").mkdir(parents=True)
    (tmp_path / "done" / "results" / "summary.json").write_text(json.dumps({"stages": []}))
    with pytest.raises(FileNotFoundError, match=r"comet: .*running/results/summary.json; dcid: .*typo/results"):
        report.compare_runs({"comet": [tmp_path / "done", tmp_path / "running"], "dcid": [tmp_path / "typo"]})
