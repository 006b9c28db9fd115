"""`moe report RUN_DIR` and the plotting functions: real PNGs from real-shaped data, bad input refused cleanly."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from moe_model.cli import main as moe
from moe_model.estimate.planner import pareto_indices
from moe_model.report import plot_memory, plot_pareto
from tests.conftest import ROOT


def fake_run(folder, steps=30, layers=3, experts=4, eval_every=10):
    rng = random.Random(0)
    folder.mkdir()
    lines = []
    for step in range(1, steps + 1):
        tokens = [[rng.randint(0, 200) for _ in range(experts)] for _ in range(layers)]
        line = {"step": step, "loss": 6.0 - step * 0.05, "lm_loss": 5.99 - step * 0.05, "aux_loss": 1.1,
                "expert_load_max_over_mean_per_layer": [max(r) / (sum(r) / experts) for r in tokens],
                "expert_tokens": tokens}
        if step % eval_every == 0:
            line["val_loss"] = 6.1 - step * 0.04
        lines.append(json.dumps(line))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "run.json").write_text(json.dumps({"recipe": {"name": "fake-run"}}))
    return folder


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10, f"{path} looks blank"
        return image.size


def test_report_writes_loss_and_expert_load_pngs(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert moe(["report", str(run), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)["pngs"]
    assert [p.rsplit("/", 1)[-1] for p in written] == ["loss.png", "expert_load.png"]
    for path in written:
        width, height = png_size(path)
        assert width >= 600 and height >= 400
    assert not [p for p in (run / "report").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_of_a_bad_run_folder_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    assert moe(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder; pass the output_dir of a training run" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert moe(["report", str(empty)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    broken = fake_run(tmp_path / "broken")
    with (broken / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    assert moe(["report", str(broken)]) == 2
    assert "line 31 is not JSON" in capsys.readouterr().err
    assert not (empty / "report").exists() and not (broken / "report").exists()


def test_pareto_front_matches_brute_force():
    rng = random.Random(1)
    points = [(rng.choice([1, 2, 4, 8, 16, 32]), rng.uniform(0.1, 10)) for _ in range(200)]
    dominated = {i for i, (g, t) in enumerate(points)
                 if any(g2 <= g and t2 <= t and (g2, t2) != (g, t) for g2, t2 in points)}
    assert set(pareto_indices(points)) == set(range(len(points))) - dominated


def test_pareto_and_memory_plots_from_plan_and_estimate_shaped_data(tmp_path):
    from moe_model.estimate import estimate
    from moe_model.recipe import load_recipe

    result = estimate(load_recipe(ROOT / "recipes/tiny_cpu.yaml")).as_json()
    assert png_size(plot_memory(result["stages"], result["budget_bytes"], tmp_path / "memory.png"))[0] > 300
    candidates = [{"parallel": {"tp": 1, "pp": pp, "ep": 2, "dp": g // pp}, "gpus": g, "step_time_s": 8.0 / g + pp,
                   "fits": g > 1} for g in (1, 2, 4, 8, 16) for pp in (1, 2) if g % pp == 0]
    assert png_size(plot_pareto(candidates, tmp_path / "pareto.png"))[0] > 300
    with pytest.raises(ValueError):
        plot_pareto([{"gpus": 4, "step_time_s": None}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
