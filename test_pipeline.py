"""The main job and the lab, end to end at two steps per stage on the tiny world; the lab's statistics."""
import json
import os

from PIL import Image

import lab
from conftest import run_script


def test_pipeline_then_lab_two_steps(tmp_path, tiny_world):
    out, ev = str(tmp_path / "ckpt"), str(tmp_path / "eval")
    code, stdout, err = run_script("pipeline.py", ["--steps", "2", "--model", "tiny", "--world", tiny_world, "--out", out,
                                                   "--eval_out", ev, "--eval_limit", "4"], timeout=600)
    assert code == 0, stdout[-3000:] + err[-3000:]
    for stage in ("sft", "lrv", "rm", "ppo", "dpo", "vigc"):
        assert any(n.startswith("checkpoint-") for n in os.listdir(os.path.join(out, stage))), stage
    rows = json.load(open(os.path.join(ev, "compare.json")))["rows"]
    assert [r["checkpoint"] for r in rows] == ["sft", "lrv", "ppo", "dpo"]
    assert all(0.0 <= r["CHAIR_i"] <= 1.0 for r in rows)
    assert "stage times:" in stdout and "| ppo " in open(os.path.join(ev, "compare.md")).read()

    # the lab, one claim, one seed, from the pipeline's SFT checkpoint
    runs, results, plots = str(tmp_path / "lab"), str(tmp_path / "RESULTS.md"), str(tmp_path / "plots")
    argv = ["--sft", os.path.join(out, "sft"), "--world", tiny_world, "--claims", "povid", "--seeds", "0", "--steps", "2",
            "--eval_limit", "4", "--out", runs, "--results", results, "--plots", plots]
    code, stdout, err = run_script("lab.py", argv, timeout=600)
    assert code == 0, stdout[-3000:] + err[-3000:]
    text = open(results).read()
    assert "## POVID" in text and "| POVID stage 2 |" in text and "python dpo.py" in text
    assert Image.open(os.path.join(plots, "povid.png")).size[0] > 100
    code, stdout, _ = run_script("lab.py", argv, timeout=120)  # everything on disk: nothing runs again
    assert code == 0 and "0 to go" in stdout


def test_lab_statistics_and_verdicts():
    assert lab.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert lab.fmt([0.5, 0.7]) == "0.600 ± 0.141"
    g = {"a": {"CHAIR_i": [0.30, 0.32, 0.31]}, "b": {"CHAIR_i": [0.20, 0.21, 0.19]}, "c": {"CHAIR_i": [0.29, 0.40, 0.20]}}
    assert "**held**" in lab.verdict(g, "a", "b", "CHAIR_i", True, "x")
    assert "did not hold" in lab.verdict(g, "b", "a", "CHAIR_i", True, "x")
    assert "not shown" in lab.verdict(g, "a", "c", "CHAIR_i", True, "x")  # better mean, inside the spread
    assert "not measured" in lab.verdict(g, "a", "missing", "CHAIR_i", True, "x")
    g["sft"] = {"CHAIR_i": [0.05]}  # a baseline measured once: the other side's seeds give the spread
    assert "did not hold" in lab.verdict(g, "sft", "b", "CHAIR_i", True, "x")
    assert "**held**" in lab.verdict(g, "sft", "b", "CHAIR_i", False, "x")
    g["one"] = {"CHAIR_i": [0.01]}
    assert "not shown" in lab.verdict(g, "sft", "one", "CHAIR_i", True, "x")  # one run each: no spread to judge by


def test_lab_plots_draw(tmp_path):
    g = {"x": {"m1": [1.0, 2.0], "m2": [0.5]}, "y": {"m1": [3.0, 3.5]}}
    lab.bar_plot(str(tmp_path / "b.png"), "t", g, ["m1", "m2"], ["x", "y"])
    lab.line_plot(str(tmp_path / "l.png"), "t", {"x": [[1, 2, 3], [2, 3, 4]]}, "tokens")
    img = Image.open(tmp_path / "b.png").convert("RGB")
    assert lab.COLOURS[0] in {c for _, c in img.getcolors(10000)} and lab.COLOURS[1] in {c for _, c in img.getcolors(10000)}


def test_world_seed_moves_default_folders():
    import common
    import pipeline
    cfg = pipeline.Config(world_seed=3, out="mine")
    common.seed_suffix(cfg, pipeline.Config, ("world", "out", "eval_out"))
    assert (cfg.world, cfg.out, cfg.eval_out) == ("data/shapes-seed3", "mine", "runs/eval-seed3")
    assert "--world_seed" in (argv := pipeline.stage_commands(cfg)["sft"]) and argv[argv.index("--world_seed") + 1] == "3"
    cfg = lab.Config(world_seed=2)
    runs = lab.plan(common.seed_suffix(cfg, lab.Config, ("world", "out", "results", "plots")))
    assert cfg.results == "RESULTS-seed2.md" and all("data/shapes-seed2" in argv for argv, _, _ in runs.values())
    cfg = pipeline.Config()
    assert common.seed_suffix(cfg, pipeline.Config, ("world",)).world == "data/shapes"  # seed 0: as before
