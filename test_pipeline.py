"""The main job and the lab, end to end at two steps per stage on the tiny world; the lab's
statistics."""
import contextlib
import dataclasses
import json
import os
import re
import time
import zlib

import pytest
import torch
from PIL import Image

import common
import distributed
import rundir
import lab
import lab_report
from conftest import HERE, FullDisk, process_states, run_cli


def test_pipeline_two_steps(tmp_path, tiny_world):
    out, ev = str(tmp_path / "ckpt"), str(tmp_path / "eval")
    argv = ["--steps", "2", "--model", "tiny", "--world", tiny_world, "--out", out,
            "--eval_out", ev, "--eval_limit", "4"]
    # (pipeline.py in this process, as its __main__ block would run it: each stage is a process
    # of its own all the same; a pipeline.py process cost an interpreter and torch's import)
    code, stdout, err = run_cli("pipeline", argv, strict=True)
    assert code == 0, stdout[-3000:] + err[-3000:]
    for stage in ("sft", "lrv", "rm", "ppo", "dpo", "vigc"):
        assert any(n.startswith("checkpoint-") for n in os.listdir(os.path.join(out, stage))), stage
    rows = json.load(open(os.path.join(ev, "compare.json")))["rows"]
    assert [r["checkpoint"] for r in rows] == ["sft", "lrv", "ppo", "dpo"]
    assert all(0.0 <= r["CHAIR_i"] <= 1.0 for r in rows)
    assert "stage times:" in stdout and "| ppo " in open(os.path.join(ev, "compare.md")).read()


def test_lab_one_claim_two_steps_then_its_records(tmp_path, tiny_world, tiny_sft):
    """The lab, one claim, one seed, from an SFT run folder (the pipeline's, in use; the fixture's
    here, so that the two end-to-end runs share the suite's two processes)."""
    import shutil
    out = str(tmp_path / "ckpt")
    shutil.copytree(tiny_sft, os.path.join(out, "sft"))
    runs = str(tmp_path / "lab")
    results = str(tmp_path / "RESULTS.md")
    plots = str(tmp_path / "plots")
    argv = ["--sft", os.path.join(out, "sft"), "--world", tiny_world, "--claims", "povid",
            "--seeds", "0", "--steps", "2", "--eval_limit", "4",
            "--out", runs, "--results", results, "--plots", plots]
    code, stdout, err = run_cli("lab", argv, strict=True)  # (each run a process of its own)
    assert code == 0, stdout[-3000:] + err[-3000:]
    text = open(results).read()
    assert "## POVID" in text and "| POVID stage 2 |" in text and "python dpo.py" in text
    # stage 2 goes on from stage 1 (POVID's run_povid.sh), not from the SFT
    stage1 = os.path.join(runs, "povid", "stage1-s0")
    assert f"--init {stage1} --povid_stage 2" in text, text
    assert Image.open(os.path.join(plots, "povid.png")).size[0] > 100
    # everything on disk: nothing runs again
    code, stdout, _ = run_cli("lab", argv, strict=True)
    assert code == 0 and "0 to go" in stdout
    # every finished run keeps its command, folders written {out}, {sft}, {world}; one whose
    # recipe changed since (as if stage 1 had trained 7 steps) is stale, with each run after it
    cfg = lab.Config(sft=os.path.join(out, "sft"), world=tiny_world, claims=("povid",), seeds=(0,),
                     steps=2, eval_limit=4, out=runs)
    planned = lab.plan(cfg)
    assert lab.stale_runs(planned, cfg) == set()
    record = lab.run_record(cfg, "povid/stage2-s0")
    assert "{out}/povid/stage1-s0" in json.load(open(record))["command"]
    record = lab.run_record(cfg, "povid/stage1-s0")
    kept = open(record).read()
    json.dump({"command": [a if a != "2" else "7" for a in json.loads(kept)["command"]]},
              open(record, "w"))
    assert lab.stale_runs(planned, cfg) == {"povid/stage1-s0", "povid/stage1-s0/eval",
                                            "povid/stage2-s0", "povid/stage2-s0/eval"}
    code, stdout, err = run_cli("lab", argv + ["--report_only", "true"], strict=True)
    assert code == 2 and "4 run(s) were made with another command" in err, err
    assert "povid/stage1-s0" in err and "start" not in stdout
    os.remove(record)  # a run finished before commands were recorded is kept
    assert lab.stale_runs(planned, cfg) == set()
    open(record, "w").write(kept)
    # ... unless its checkpoint says it went on from another --init: an unrecorded stage 2 from
    # before it was chained (POVID's stage 2 started from the SFT until 2026-12-03)
    record = lab.run_record(cfg, "povid/stage2-s0")
    kept2 = open(record).read()
    os.remove(record)
    assert lab.stale_runs(planned, cfg) == set()
    made = os.path.join(lab.latest_checkpoint(os.path.join(runs, "povid", "stage2-s0")),
                        "config.json")
    config = json.load(open(made))
    config["run_config"]["init"] = os.path.join(out, "sft")
    json.dump(config, open(made, "w"))
    assert lab.stale_runs(planned, cfg) == {"povid/stage2-s0", "povid/stage2-s0/eval"}
    config["run_config"]["init"] = stage1 + "/"
    json.dump(config, open(made, "w"))
    assert lab.stale_runs(planned, cfg) == set()
    open(record, "w").write(kept2)
    # stage 1 gone (removed, or cut off while it ran again): what was made from it is stale too
    done = os.path.join(runs, "povid", "stage1-s0", "DONE")
    os.rename(done, done + ".away")
    assert lab.stale_runs(planned, cfg) == {"povid/stage1-s0/eval", "povid/stage2-s0",
                                            "povid/stage2-s0/eval"}
    os.rename(done + ".away", done)
    # the folders spelled otherwise, or another --device: the same recipe
    sft_slash = os.path.join(out, "sft") + "/"
    same = dataclasses.replace(cfg, out=runs + "/", sft=sft_slash, device="cuda")
    assert lab.stale_runs(lab.plan(same), same) == set()
    # the same runs at another budget would be reported with these flags: refused, nothing run
    longer = [a if a != "4" else "8" for a in argv]  # --eval_limit 8
    code, stdout, err = run_cli("lab", longer, strict=True)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds runs made with --eval_limit 4 --steps 2" in err and "start" not in stdout
    # from another SFT checkpoint: its runs are not these (lab.json), so --out is refused
    shutil.copytree(os.path.join(out, "sft"), os.path.join(out, "lrv"))
    made = os.path.join(lab.latest_checkpoint(os.path.join(out, "lrv")), "config.json")
    json.dump({**json.load(open(made)), "trained_on": "other data"}, open(made, "w"))
    other = argv[:1] + [os.path.join(out, "lrv")] + argv[2:]
    code, stdout, err = run_cli("lab", other, strict=True)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {runs}: holds runs from another SFT checkpoint" in err and "lab.json" in err
    assert "start" not in stdout
    # a damaged lab.json: one line naming it, nothing run
    with open(os.path.join(runs, "lab.json"), "w") as f:
        f.write("{")
    code, stdout, err = run_cli("lab", argv, strict=True)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{os.path.join(runs, 'lab.json')}: cannot read" in err and "start" not in stdout


def test_lab_json_from_before_the_flags_is_taken_and_a_damaged_one_refused(tmp_path):
    """OUT/lab.json without 'flags' (written before they were recorded) is accepted as made with
    today's --steps and --eval_limit; one whose 'flags' is not an object is one clear line."""
    world, sft, out = tmp_path / "world", tmp_path / "sft", tmp_path / "runs"
    for d in (world, sft, out):
        d.mkdir()
    (world / "world.json").write_text("{}")
    cfg = lab.Config(sft=str(sft), world=str(world), out=str(out))
    lab.check_out_matches(cfg)  # writes lab.json
    stamp = json.load(open(out / "lab.json"))
    del stamp["flags"]
    (out / "lab.json").write_text(json.dumps(stamp))
    lab.check_out_matches(cfg)
    (out / "lab.json").write_text(json.dumps(dict(stamp, flags="steps 2")))
    with pytest.raises(lab.common.ConfigError, match="'flags' is not a JSON object"):
        lab.check_out_matches(cfg)


def test_lab_statistics_and_verdicts():
    assert lab_report.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert lab_report.fmt([0.5, 0.7]) == "0.600 ± 0.141"
    g = {"a": {"CHAIR_i": [0.30, 0.32, 0.31]},
         "b": {"CHAIR_i": [0.20, 0.21, 0.19]},
         "c": {"CHAIR_i": [0.29, 0.40, 0.20]}}
    assert "**held**" in lab_report.verdict(g, "a", "b", "CHAIR_i", True, "x")
    assert "did not hold" in lab_report.verdict(g, "b", "a", "CHAIR_i", True, "x")
    # better mean, inside the spread
    assert "not shown" in lab_report.verdict(g, "a", "c", "CHAIR_i", True, "x")
    assert "not measured" in lab_report.verdict(g, "a", "missing", "CHAIR_i", True, "x")
    # a baseline measured once: the other side's seeds give the spread
    g["sft"] = {"CHAIR_i": [0.05]}
    assert "did not hold" in lab_report.verdict(g, "sft", "b", "CHAIR_i", True, "x")
    assert "**held**" in lab_report.verdict(g, "sft", "b", "CHAIR_i", False, "x")
    g["one"] = {"CHAIR_i": [0.01]}
    # one run each: no spread to judge by, and none printed as "± 0.000"
    line = lab_report.verdict(g, "sft", "one", "CHAIR_i", True, "x")
    assert "not judged (one seed" in line and "0.050 (sft) -> 0.010 (one)" in line, line
    g["nan"] = {"CHAIR_i": [float("nan"), None]}  # every run of a side without the number
    assert "not measured (CHAIR_i missing" in lab_report.verdict(g, "sft", "nan", "CHAIR_i", True,
                                                                 "x")


def test_lab_table_escapes_a_bar_in_a_column_name():
    """The column 'POPE |yes-ratio - 0.5|' split its header cell in two: the header had two
    cells more than the rows, and the table did not render."""
    g = {"sft": {"POPE |yes-ratio - 0.5|": [0.284], "F1": [0.8]}}
    table = lab_report.md_table(g, ["POPE |yes-ratio - 0.5|", "F1"], ["sft"])
    header, rule, row = table.splitlines()
    cells = lambda line: len(re.split(r"(?<!\\)\|", line.strip("|")))
    assert cells(header) == cells(row) == cells(rule) == 4, (header, row)
    assert "POPE \\|yes-ratio - 0.5\\|" in header


def test_lab_verdict_needs_two_measured_seeds_a_side_and_a_real_difference():
    """A seeded side with one measured seed (the others failed, or lack the number) counted as
    no spread and the claim 'held' from one run; equal values averaged over seeds (the last bit
    apart) 'held' or 'did not hold'. The seeds column counts measured values."""
    rows = {f"lrv/neg0.0-s{s}": {"F1": 0.70 + 0.01 * s} for s in range(5)}
    rows.update({"lrv/neg0.5-s0": {"F1": 0.90}, "lrv/neg0.5-s1": {"F1": float("nan")},
                 "lrv/neg0.5-s2": {"F1": None}, "sft": {"F1": 0.5}})
    g = lab_report.group(rows, lambda r: lab_report.setting(r))
    line = lab_report.verdict(g, "lrv/neg0.0", "lrv/neg0.5", "F1", False, "x")
    assert "not judged (one measured seed of lrv/neg0.5" in line and "5 and 1 seeds" in line, line
    assert "not judged (one measured seed of lrv/neg0.5" in lab_report.verdict(
        g, "sft", "lrv/neg0.5", "F1", False, "x")
    assert "| lrv/neg0.5 | 0.900 | 1 |" in lab_report.md_table(g, ["F1"], ["lrv/neg0.5"])
    same = {"sft": {"CHAIR_i": [70 / 400]}, "ppo": {}}
    for s in range(3):
        lab_report.add_value(same, "ppo", "CHAIR_i", s, 70 / 400)
    # (the last bit: fmean's rounding)
    assert lab_report.mean_sd(same["ppo"]["CHAIR_i"])[0] != 70 / 400
    for lower in (True, False):
        line = lab_report.verdict(same, "sft", "ppo", "CHAIR_i", lower, "x")
        assert "not shown" in line, line


def test_lab_an_inf_metric_counts_as_unmeasured_like_a_nan(tmp_path):
    """A scores.json or report.json may hold Infinity (json reads it, as NaN): NaN was left out of
    the means, inf ended the report in an AttributeError traceback (statistics.stdev). Both are
    left out now, in the tables, the verdicts and PPO's curves."""
    rows = {f"lrv/neg0.0-s{s}": {"F1": 0.70 + 0.01 * s} for s in range(3)}
    rows.update({"lrv/neg0.5-s0": {"F1": 0.90}, "lrv/neg0.5-s1": {"F1": float("inf")},
                 "lrv/neg0.5-s2": {"F1": 0.92}})
    g = lab_report.group(rows, lambda r: lab_report.setting(r))
    assert "| lrv/neg0.5 | 0.910 ± 0.014 | 2 |" in lab_report.md_table(g, ["F1"], ["lrv/neg0.5"])
    line = lab_report.verdict(g, "lrv/neg0.0", "lrv/neg0.5", "F1", False, "x")
    assert "**held**" in line and "3 and 2 seeds" in line and "on 2 of 2" in line, line
    cfg = lab.Config(out=str(tmp_path), seeds=(0,), rlhf_seeds=1)
    run = tmp_path / "rlhf" / "ppo-facts-s0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"length": 10.0}\n{"length": Infinity}\n')
    (run / "DONE").write_text("")
    assert lab_report.ppo_curves(cfg)["length"]["facts"] == [[10.0]]


def test_lab_partner_claim_asks_that_partner_pairs_gain_most(tmp_path):
    """'Facts help most on partner pairs' was judged by the partner accuracy alone: facts raising
    all pairs 0.70 -> 0.90 and partner pairs 0.70 -> 0.72 'held'. The gain there must beat the
    gain on all pairs."""
    cfg = lab.Config(out=str(tmp_path), seeds=(0, 1, 2), rlhf_seeds=3)
    for s in range(3):
        for facts, (all_, partner) in (("facts", (0.90, 0.72)), ("nofacts", (0.70, 0.70))):
            run = tmp_path / "rlhf" / f"rm-{facts}-s{s}"
            run.mkdir(parents=True)
            (run / "report.json").write_text(json.dumps(
                {"val_accuracy": all_ + 0.01 * s, "val_accuracy_partner": partner + 0.01 * s}))
    rm = lab_report.reward_model_groups(cfg)
    line = lab_report.verdict(rm, "RM without facts", "RM with facts", lab_report.PARTNER_GAP,
                              False, "x")
    assert "did not hold" in line, line
    assert "**held**" in lab_report.verdict(rm, "RM without facts", "RM with facts",
                                     "on pairs naming a co-occurring partner", False, "x")


def test_lab_scores_an_sft_checkpoint_folder_where_eval_writes_it():
    """--sft ckpt/sft/checkpoint-000600: eval.py writes sft-checkpoint-000600/scores.json, the lab
    waited for checkpoint-000600/scores.json, so the SFT baseline never counted as done."""
    import eval as E
    ckpt = os.path.join("ckpt", "sft", "checkpoint-000600")
    runs = lab.plan(lab.Config(sft=ckpt))
    done = runs["sft/eval"][2]
    assert os.path.basename(os.path.dirname(done)) == E.run_names([ckpt])[0]


def test_lab_verdict_pairs_seeds_beside_the_rule():
    """Where both sides ran the same seeds, the verdict line adds the seed-by-seed differences
    (the claimed way on k of n); the verdict word stays the unpaired rule's. Not against the one
    SFT baseline, and only over the seeds both sides have."""
    rows = {"lrv/neg0.0-s0": {"F1": 0.70}, "lrv/neg0.0-s1": {"F1": 0.80},
            "lrv/neg0.0-s2": {"F1": 0.60}, "lrv/neg0.5-s0": {"F1": 0.72},
            "lrv/neg0.5-s1": {"F1": 0.81}, "lrv/neg0.5-s2": {"F1": 0.61},
            "lrv/neg0.5-s3": {"F1": 0.10}, "sft": {"F1": 0.5}}
    g = lab_report.group(rows, lambda r: lab_report.setting(r))
    line = lab_report.verdict(g, "lrv/neg0.0", "lrv/neg0.5", "F1", False, "x")
    # the means differ by less than the spread (seed 3 has no neg0.0 run to pair with)
    assert "not shown" in line
    assert "Paired by seed: the claimed way on 3 of 3 (difference +0.013 ± 0.006)." in line
    assert "the claimed way on 0 of 3" in lab_report.verdict(g, "lrv/neg0.5", "lrv/neg0.0", "F1",
                                                       False, "x")
    assert "Paired" not in lab_report.verdict(g, "sft", "lrv/neg0.5", "F1", False, "x")
    g["lrv/neg0.5"]["F1"][1] = float("nan")  # a seed without the number is left out
    assert "on 2 of 2" in lab_report.verdict(g, "lrv/neg0.0", "lrv/neg0.5", "F1", False, "x")
    rm = {}
    for s, (a, b) in enumerate([(0.8, 0.7), (0.9, 0.8)]):
        lab_report.add_value(rm, "with", "acc", s, a)
        lab_report.add_value(rm, "without", "acc", s, b)
    line = lab_report.verdict(rm, "without", "with", "acc", False, "x")
    assert "on 2 of 2 (difference +0.100" in line


def test_lab_plots_draw(tmp_path):
    g = {"x": {"m1": [1.0, 2.0], "m2": [0.5]}, "y": {"m1": [3.0, 3.5]}}
    lab_report.bar_plot(str(tmp_path / "b.png"), "t", g, ["m1", "m2"], ["x", "y"])
    lab_report.line_plot(str(tmp_path / "l.png"), "t", {"x": [[1, 2, 3], [2, 3, 4]]}, "tokens")
    bars = Image.open(tmp_path / "b.png")
    assert bars.format == "PNG" and min(bars.size) >= 100
    colours = {c for _, c in bars.convert("RGB").getcolors(10000)}
    # one colour per group
    assert lab_report.COLOURS[0] in colours and lab_report.COLOURS[1] in colours
    line = Image.open(tmp_path / "l.png")
    assert line.format == "PNG" and line.size == (640, 360)
    line = line.convert("RGB")
    # the mean over seeds, 1.5 2.5 3.5, runs from the bottom left of the plot area (x 50, y 300)
    # through its centre to the top right (x 620, y 40)
    for x, y in ((50, 300), (335, 170), (619, 41)):
        assert line.getpixel((x, y)) == lab_report.COLOURS[0], (x, y)
    assert line.getpixel((335, 100)) == (255, 255, 255)  # above the line: background
    # one logged step (a PPO run of one step): a dot, where a line of one point drew nothing
    lab_report.line_plot(str(tmp_path / "l.png"), "t", {"x": [[2.0], [2.0]]}, "tokens")
    line = Image.open(tmp_path / "l.png").convert("RGB")
    assert line.getpixel((52, 298)) == lab_report.COLOURS[0]


def test_lab_plan_seeds():
    cfg = lab.Config()
    seeds_of = lambda runs, prefix: {int(n.rsplit("-s", 1)[1].split("/")[0])
                                     for n in runs if n.startswith(prefix)}
    # five seeds for the cheap claims, the first three for RLHF (its reward models are the cost)
    runs = lab.plan(cfg)
    assert seeds_of(runs, "lrv/") == seeds_of(runs, "povid/") == seeds_of(runs, "vigc/")
    assert seeds_of(runs, "vigc/") == {0, 1, 2, 3, 4}
    assert seeds_of(runs, "rlhf/") == {0, 1, 2}
    cfg = lab.Config(seeds=(7, 3), rlhf_seeds=1, claims=("rlhf",))
    assert seeds_of(lab.plan(cfg), "rlhf/") == {7}
    assert "RLHF on seeds 7" in lab_report.intro_section(cfg, False)[2]


def lab_makespan(runs, priority, jobs=2):
    """Minutes a lab takes on `jobs` cores when every run takes lab.minutes and ready runs start
    in `priority` order (an event simulation of lab.execute's loop)."""
    todo, running, now, done = dict(runs), {}, 0.0, set()
    while todo or running:
        ready = [k for k, v in todo.items() if all(n in done for n in v[1])]
        for name in sorted(ready, key=priority)[:jobs - len(running)]:
            running[name] = now + lab.minutes(todo.pop(name)[0])
        name = min(running, key=running.get)
        now = running.pop(name)
        done.add(name)
    return now


def test_lab_starts_the_longest_chain_first():
    runs = lab.plan(lab.Config(seeds=(0, 1, 2)))
    # every run of the lab has its own cost entry; none falls back to the 1-minute guess
    costs = {n: lab.minutes(v[0]) for n, v in runs.items()}
    assert costs["rlhf/rm-facts-s0"] == 23 and costs["rlhf/rm-nofacts-s0"] == 13
    assert costs["lrv/neg0.5-s1"] == 3.5 and costs["vigc/sft-plus-vig-s2"] == 2
    assert costs["vigc/vigc-s0"] == 6 and costs["povid/stage2-s0/eval"] == 0.4
    assert set(lab.MINUTES.values()) == set(costs.values())
    chain = lab.chain_minutes(runs)
    assert chain["rlhf/rm-facts-s0"] == pytest.approx(23 + 1.7 + 0.4)  # a PPO run, its eval
    assert chain["vigc/vigc-s1"] == pytest.approx(6 + 2 + 0.4)
    # on 2 cores the longest chain first ends within half a minute of the bound (all the work
    # split evenly); plan order leaves one core idle longer, behind the last runs it starts
    order = list(runs)
    in_plan_order = lab_makespan(runs, order.index)
    longest_first = lab_makespan(runs, lambda k: -chain[k])
    bound = sum(costs.values()) / 2
    assert longest_first - bound <= 0.5 < in_plan_order - bound


def test_lab_execute_starts_the_longest_chains_first(tmp_path, monkeypatch):
    """lab.execute itself, each run's process stubbed to end at once: the facts reward models (the
    longest chains: 23 minutes and a PPO run behind each) start first, then the plain ones; in plan
    order the SFT eval and the LRV runs went first."""
    started = []

    class Ended:  # a process that has already exited 0
        returncode = 0

        def __init__(self, cmd, **kwargs):
            started.append(tuple(cmd[2:]))
            os.makedirs(cmd[cmd.index("--out") + 1], exist_ok=True)  # where the run would write

        def poll(self):
            return 0

    monkeypatch.setattr(lab.subprocess, "Popen", Ended)
    monkeypatch.setattr(lab.time, "sleep", lambda s: None)
    cfg = lab.Config(seeds=(0, 1, 2), out=str(tmp_path))
    runs = lab.plan(cfg)
    finished = []  # execute reports each run that ended well, as it ends (the wall clock's record)
    assert lab.execute(runs, cfg, finished.append) == set()
    assert finished == list(range(1, len(runs) + 1))
    name_of = {tuple(v[0][1:]): k for k, v in runs.items()}
    order = [name_of[a] for a in started]
    assert sorted(order) == sorted(runs)  # every run once
    assert order[:3] == [f"rlhf/rm-facts-s{s}" for s in (0, 1, 2)]
    assert order[3:6] == [f"rlhf/rm-nofacts-s{s}" for s in (0, 1, 2)]
    assert list(runs)[0] == "sft/eval"


def test_lab_skips_everything_after_a_failed_run(tmp_path, monkeypatch, capsys):
    """POVID stage 1 failed: stage 2 was skipped, but its eval, taken in the same pass, counted as
    ready and started (and scored an old stage 2 on disk into the report). Every run downstream of
    a failure is skipped now, transitively. A run killed by a signal is said so (it read 'exit
    -9', as if the stage had exited with that code)."""
    started = []

    class Ended:  # a process that has already exited: stage 1 killed (kill -9), the others 0
        def __init__(self, cmd, **kwargs):
            out = cmd[cmd.index("--out") + 1]
            started.append(out)
            os.makedirs(out, exist_ok=True)
            self.returncode = -9 if out.endswith("stage1-s0") else 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(lab.subprocess, "Popen", Ended)
    monkeypatch.setattr(lab.time, "sleep", lambda s: None)
    cfg = lab.Config(claims=("povid",), seeds=(0,), out=str(tmp_path))
    runs = lab.plan(cfg)
    failed = lab.execute(runs, cfg)
    assert failed == {"povid/stage1-s0", "povid/stage1-s0/eval", "povid/stage2-s0",
                      "povid/stage2-s0/eval"}
    assert not [out for out in started if "stage2" in out], started
    log = os.path.join(str(tmp_path), "povid", "stage1-s0.log")
    assert f"FAIL  povid/stage1-s0 in 0s (killed by signal SIGKILL; see {log})" in \
        capsys.readouterr().out


def test_world_seed_moves_default_folders():
    import pipeline
    cfg = pipeline.Config(world_seed=3, out="mine")
    common.seed_suffix(cfg, pipeline.Config, ("world", "out", "eval_out"))
    assert (cfg.world, cfg.out, cfg.eval_out) == ("data/shapes-seed3", "mine", "runs/eval-seed3")
    argv = pipeline.stage_commands(cfg)["sft"]
    assert "--world_seed" in argv and argv[argv.index("--world_seed") + 1] == "3"
    cfg = lab.Config(world_seed=2)
    runs = lab.plan(common.seed_suffix(cfg, lab.Config, ("world", "out", "results", "plots")))
    assert cfg.results == "RESULTS-seed2.md"
    assert all("data/shapes-seed2" in argv for argv, _, _ in runs.values())
    cfg = pipeline.Config()
    # seed 0: as before
    assert common.seed_suffix(cfg, pipeline.Config, ("world",)).world == "data/shapes"


def fake_lab(root):
    """A lab's inputs for every claim and two seeds, as the runs would have left them on disk: a
    world.json and POPE files, each eval run's scores.json, the reward models' and VIGC's
    report.json, PPO's metrics.jsonl. Numbers are made up; the facts reward model is clearly
    better than the plain one, everything else varies with the run's name."""
    world = root / "world"
    world.mkdir()
    with open(world / "world.json", "w") as f:
        json.dump({"seed": 0, "version": 7, "params": {"cooc": 0.95}, "stats": {"images": 2}}, f)
    questions = {"random": ["a", "b", "c", "d"], "popular": ["a", "x", "c", "d"],
                 "adversarial": ["a", "x", "c", "y"]}
    for split, texts in questions.items():
        with open(world / f"pope_{split}.jsonl", "w") as f:
            records = [{"image": f"{k}.png", "text": t} for k, t in enumerate(texts)]
            f.writelines(json.dumps(r) + "\n" for r in records)
    cfg = lab.Config(sft=str(root / "sft"), world=str(world), out=str(root / "runs"), seeds=(0, 1),
                     results=str(root / "RESULTS.md"), plots=str(root / "plots"))
    runs = lab.plan(cfg)

    def made_up(name, k):  # a number in [0, 1) per run name and field
        return zlib.crc32(f"{name}:{k}".encode()) % 1000 / 1000

    for name, (_, _, done) in runs.items():
        os.makedirs(os.path.dirname(done), exist_ok=True)
        if name.endswith("/eval"):
            pope = {s: {"f1": made_up(name, s)} for s in ("random", "popular", "adversarial")}
            pope["average"] = {"yes_ratio": made_up(name, "yes"), "accuracy": made_up(name, "acc")}
            chair = {"chair_i": made_up(name, "ci"), "chair_s": made_up(name, "cs"),
                     "answer_words": 30 * made_up(name, "w")}
            mmhal = {"score": 6 * made_up(name, "ms"), "hallucination_rate": made_up(name, "mh")}
            with open(done, "w") as f:
                json.dump({"pope": pope, "chair": chair, "mmhal": mmhal}, f)
        elif name.startswith("rlhf/rm-"):
            seed = int(name.rsplit("-s", 1)[1])
            accuracy = (0.8 if "-facts-" in name else 0.6) + 0.01 * seed
            rep = {"val_accuracy": accuracy, "val_accuracy_partner": accuracy - 0.1}
            if "-facts-" in name:  # the control: another image's captions
                rep["val_accuracy_other_facts"] = accuracy - 0.2
            with open(done, "w") as f:
                json.dump(rep, f)
        elif name.startswith("rlhf/ppo-"):
            with open(os.path.join(os.path.dirname(done), "metrics.jsonl"), "w") as f:
                for step in range(3):
                    row = {"step": step, "length": 10 + step * made_up(name, "l"),
                           "halluc_per_answer": made_up(name, step), "kl": 0.5 * step,
                           "score": 1.0 + step}
                    f.write(json.dumps(row) + "\n")
        elif name.startswith("vigc/vigc-"):
            answers = {k: {"hallucinations_per_100": 100 * made_up(name, k),
                           "answers_with_hallucination": made_up(name, k + "a"),
                           "sentences_per_answer": 3 * made_up(name, k + "s")}
                       for k in ("vig_only", "vic")}
            with open(done, "w") as f:
                json.dump({**answers, "parsed": 100, "images": 120}, f)
        if not os.path.exists(done):  # the lab's DONE marker of a finished run
            open(done, "w").close()
    return cfg, runs


def test_lab_report_of_every_claim(tmp_path, capsys, monkeypatch):
    cfg, runs = fake_lab(tmp_path)
    lab.save_wall_clock(cfg, "2026-12-01T10:00:00", 12.5, 3, len(runs))
    lab.report_runs(cfg, runs)
    text = open(cfg.results).read()
    # cut off while it is written again (a kill, a full disk): the report there before is whole
    # (it was cut, and a cut report, titled, is taken as the lab's own)
    with monkeypatch.context() as m:
        def full(self, *args):
            raise OSError(28, "No space left on device")
        whole = common.write_whole
        cut = lambda write: lambda f: (write(f), full(None))  # (the report's write alone)
        m.setattr(lab_report.common, "write_whole", lambda path, write, **kw: whole(
            path, cut(write) if path == cfg.results else write, **kw))
        with pytest.raises(OSError):
            lab.report_runs(cfg, runs)
    assert open(cfg.results).read() == text
    assert not [f for f in os.listdir(os.path.dirname(cfg.results)) if ".tmp" in f]
    assert f"for the 3 of {len(runs)} runs not already on disk" in text and "rebuilt" not in text
    for section in ("## The world and the baseline", "## LRV-Instruction", "## LLaVA-RLHF",
                    "## POVID", "## VIGC", "## Verdicts", "## Commands"):
        assert text.count(section) == 1, section
    assert "lab wall clock 12.5 min" in text and "seeds 0, 1" in text
    assert "popular = adversarial for 75% of them, random = popular for 75%" in text
    # the SFT baseline beside the anchor papers' published models
    sft = json.load(open(runs["sft/eval"][2]))
    shapes_row = (f"| Shapes SFT baseline | this lab (oracle, held-out test split) | "
                  f"{sft['pope']['random']['f1']:.3f} | ")
    assert shapes_row in text and f"| {sft['mmhal']['score']:.2f} |" in text
    llava = "| POPE paper (Li et al., EMNLP 2023), Table 3 | 0.686 | 0.677 | 0.670 | 0.973 |"
    assert llava in text
    assert "| LLaVA-RLHF 13B | LLaVA-RLHF paper, POPE and MMHal-Bench tables |" in text
    held = "- Fact-RLHF (facts raise the reward model's held-out accuracy): **held** here"
    assert held in text
    with_facts = "| RM with facts | 0.805 ± 0.007 | 0.705 ± 0.007 | -0.100 ± 0.000 | 0.605 ± 0.007"
    assert with_facts + " | 2 |" in text
    assert "| RM without facts | 0.605 ± 0.007 | 0.505 ± 0.007 | -0.100 ± 0.000 | - | 2 |" in text
    verdicts = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 3 + 10 + 2 + 3  # LRV, RLHF, POVID, VIGC
    # PPO's rollouts over steps: each variant's KL from SFT and RM score, first -> last step
    assert "| KL from SFT (nats/answer) | RM score |" in text
    assert "| no-facts | " in text and "| 0.00 -> 1.00 | 1.00 -> 3.00 |" in text
    assert capsys.readouterr().out.splitlines()[:len(verdicts)] == verdicts
    assert text.count("python ") >= len(runs)
    for plot in ("lrv", "rlhf", "rlhf_length", "povid", "vigc"):
        image = Image.open(os.path.join(cfg.plots, plot + ".png"))
        assert image.format == "PNG" and min(image.size) >= 100, plot
    # a report rebuilt from the runs on disk keeps the last run's wall clock
    lab.report_runs(cfg, runs, rebuilt=True)
    text = open(cfg.results).read()
    assert "lab wall clock 12.5 min on " in text and "this report rebuilt from the runs" in text
    assert f"for the 3 of {len(runs)} runs" in text
    # the same invocation, later: its record is replaced, not added to
    lab.save_wall_clock(cfg, "2026-12-01T10:00:00", 40.0, len(runs), len(runs))
    lab.report_runs(cfg, runs)
    text = open(cfg.results).read()
    assert f"lab wall clock 40.0 min on 2026-12-01 for all {len(runs)} runs." in text
    # a second invocation (a lab stopped, then resumed): the minutes add up, each one shown
    lab.save_wall_clock(cfg, "2026-12-02T09:00:00", 20.0, 5, len(runs))
    lab.report_runs(cfg, runs, rebuilt=True)
    text = open(cfg.results).read()
    assert (f"lab wall clock 60.0 min on 2026-12-01 to 2026-12-02 for all {len(runs)} runs in 2 "
            "invocations (40.0 + 20.0 min); this report rebuilt") in text
    # a wall_clock.json from before invocations were kept is read as one
    common.write_json({"minutes": 52.0, "date": "2026-11-30", "ran": 80, "runs": 82,
                       "claims": list(lab_report.CLAIMS)}, os.path.join(cfg.out, "wall_clock.json"))
    lab.report_runs(cfg, runs)
    text = open(cfg.results).read()
    assert "lab wall clock 52.0 min on 2026-11-30 for the 80 of 82 runs not already on" in text


def test_lab_report_links_plots_and_quotes_commands_in_odd_folders(tmp_path):
    """A --plots or --out with a space or parentheses in its name: the figure links ended at the
    space (no figure showed) and the commands listed as run did not run when pasted. The links
    are URL-quoted and the commands shell-quoted; plain paths read as before."""
    import shlex
    import subprocess
    root = tmp_path / "lab (v2)"
    root.mkdir()
    cfg, runs = fake_lab(root)
    cfg = lab.replace(cfg, plots=str(root / "my plots"))
    lab.report_runs(cfg, runs)
    text = open(cfg.results).read()
    assert "![LRV](my%20plots/lrv.png)" in text
    commands = [c for c in text.split("```")[1].splitlines() if c.startswith("python dpo.py")]
    argv = shlex.split(commands[0])
    assert argv[argv.index("--out") + 1] == str(root / "runs" / "povid" / "stage1-s0"), argv
    said = subprocess.run(["bash", "-n", "-c", commands[0]], capture_output=True, text=True)
    assert said.returncode == 0, said.stderr
    plain = lab.replace(cfg, plots=str(tmp_path / "plots"), results=str(tmp_path / "R.md"))
    assert lab_report.plot_link(plain, "LRV", "lrv.png") == "![LRV](plots/lrv.png)"


def test_lab_damaged_files_are_one_line_run_again_or_left_out(tmp_path, capsys, monkeypatch):
    """Damaged or wrongly-typed files ended the report in a traceback (TypeError, KeyError,
    JSONDecodeError), and a cut scores.json counted as done forever. A run's file names itself (and
    its field) in one line; a done-file that is not a JSON object is not done (run again); the
    lab's own wall_clock.json is left out with a note."""
    cfg, runs = fake_lab(tmp_path)
    clock = os.path.join(cfg.out, "wall_clock.json")
    common.write_json({"invocations": [{"minutes": 3.0, "ran": "x", "runs": 5}]}, clock)
    lab.report_runs(cfg, runs)
    said = capsys.readouterr().out
    assert f"note: {clock}: an entry that cannot be read is left out" in said
    assert "lab wall clock not recorded" in open(cfg.results).read()
    scores = runs["sft/eval"][2]
    text = open(scores).read()
    open(scores, "w").write(text[:20])  # (cut)
    rm = runs["rlhf/rm-facts-s0"][2]
    common.write_json("a string", rm)
    assert lab.stale_runs(runs, cfg) == {"rlhf/ppo-facts-s0", "rlhf/ppo-facts-s0/eval",
                                         "rlhf/ppo-no-length-penalty-s0",
                                         "rlhf/ppo-no-length-penalty-s0/eval",
                                         "rlhf/ppo-no-correctness-s0",
                                         "rlhf/ppo-no-correctness-s0/eval"}
    started = []

    class Ended:  # a process that has already exited 0
        returncode = 0

        def __init__(self, cmd, **kwargs):
            started.append(cmd[cmd.index("--out") + 1])

        def poll(self):
            return 0
    monkeypatch.setattr(lab.subprocess, "Popen", Ended)
    monkeypatch.setattr(lab.time, "sleep", lambda s: None)
    import shutil  # (a copy: execute removes the folder of each run it starts)
    copy = lab.replace(cfg, out=str(tmp_path / "copy"))
    shutil.copytree(cfg.out, copy.out)
    lab.execute(lab.plan(copy), copy)
    assert os.path.join(copy.out, "sft", "eval") in started
    assert os.path.join(copy.out, "rlhf", "rm-facts-s0") in started
    open(scores, "w").write(text)
    common.write_json(13, rm)
    lab.report_runs(cfg, runs)  # (the reward model not done: left out)
    common.write_json({"val_accuracy": "x"}, rm)
    with pytest.raises(common.DataError, match=re.escape(f"{rm}: field 'val_accuracy': expected "
                                                         "a number, got 'x'")):
        lab.report_runs(cfg, runs)
    common.write_json({"val_accuracy": 0.8}, rm)
    vigc = runs["vigc/vigc-s0"][2]
    kept = open(vigc).read()
    common.write_json({**json.loads(kept), "vic": {}}, vigc)
    with pytest.raises(common.DataError, match=re.escape(f"{vigc}: field "
                                                         "'vic.hallucinations_per_100': missing")):
        lab.report_runs(cfg, runs)
    os.makedirs(cfg.sft)  # (and from the command line: one line, exit 2)
    argv = ["--sft", cfg.sft, "--world", cfg.world, "--out", cfg.out, "--results", cfg.results,
            "--plots", cfg.plots, "--seeds", "0", "1", "--report_only", "true"]
    code, _, err = run_cli("lab", argv, strict=True)
    assert code == 2 and err.startswith(f"error: {vigc}: field 'vic.") and err.count("\n") == 1
    open(vigc, "w").write(kept)
    metrics = os.path.join(os.path.dirname(runs["rlhf/ppo-facts-s1"][2]), "metrics.jsonl")
    with open(metrics, "a") as f:  # (a NaN is logged as null: left out, as an absent value)
        f.write('{"step": 3, "length": null, "kl": 0.1, "score": 1.0}\n')
    lab.report_runs(cfg, runs)
    with open(metrics, "a") as f:
        f.write('{"step": 3, "len')
    with pytest.raises(common.DataError, match=re.escape(f"{metrics}: record 5: not a JSON")):
        lab.report_runs(cfg, runs)
    os.remove(metrics)
    pope = os.path.join(cfg.world, "pope_popular.jsonl")
    with open(pope, "a") as f:
        f.write('{"image": "9.png", "te')
    with pytest.raises(common.DataError, match=re.escape(f"{pope}: record 5: not a JSON")):
        lab.report_runs(cfg, runs)


def test_lab_reads_the_worlds_pope_files_as_eval_reads_them(tmp_path):
    """A POPE file of the world saved with a BOM (an editor's), which eval reads, made the report
    refuse its first line once every run had ended; one with a byte that is not UTF-8 (which eval
    refuses in one line) was a UnicodeDecodeError traceback."""
    cfg, runs = fake_lab(tmp_path)
    pope = os.path.join(cfg.world, "pope_popular.jsonl")
    raw = open(pope, "rb").read()
    for ends in (b"\r\n", b"\r"):  # (eval reads both)
        open(pope, "wb").write(b"\xef\xbb\xbf" + raw.replace(b"\n", ends))
        lab.report_runs(cfg, runs)
        assert "popular = adversarial for 75% of them" in open(cfg.results).read()
    open(pope, "wb").write(raw.replace(b'"x"', b'"caf\xe9"'))
    with pytest.raises(common.DataError, match=re.escape(f"{pope}: not UTF-8 text: byte 0xe9")):
        lab.report_runs(cfg, runs)


def test_lab_vigc_with_nothing_generated_says_so(tmp_path):
    """VIGC runs whose VIG parsed nothing write empty vig_only.json / vigc_data.json: the '+' runs
    then train on the SFT data alone, and the report compared two such runs as if they differed,
    and called the generation claim's runs missing (they were there, with nothing counted)."""
    cfg, runs = fake_lab(tmp_path)
    for s in cfg.seeds:
        folder = os.path.join(cfg.out, f"vigc/vigc-s{s}")
        for f in ("vig_only.json", "vigc_data.json"):
            common.write_json([], os.path.join(folder, f))
        nothing = {k: {"hallucinations_per_100": None, "answers_with_hallucination": None,
                       "sentences_per_answer": None} for k in ("vig_only", "vic")}
        common.write_json({**nothing, "parsed": 0, "images": 120},
                          os.path.join(folder, "report.json"))
    os.makedirs(cfg.plots)
    md, verdicts = lab_report.vigc_section(cfg, runs, None)
    assert "No generated record for seed(s) 0, 1 (no VIG output parsed): their '+' runs trained " \
        "on the SFT data alone." in md
    assert verdicts == [
        "- VIGC (iterative correction lowers hallucinations in generated answers): not measured "
        "(hallucinations / 100 answers missing from the runs).",
        "- VIGC data (SFT plus VIGC data beats SFT plus VIG-only data on CHAIR_i): not measured "
        "(no generated record on any seed).",
        "- VIGC data (adding it to SFT lowers CHAIR_i): not measured (no generated record on any "
        "seed)."]


def test_lab_subset_keeps_the_other_claims(tmp_path):
    """`lab.py --claims lrv` reports every claim whose runs are all on disk, not only lrv, and says
    which claims its wall clock covers."""
    full, runs = fake_lab(tmp_path)
    cfg = lab.replace(full, claims=("lrv",))
    assert lab.reported_claims(cfg) == ("lrv", "rlhf", "povid", "vigc")
    os.remove(runs["povid/stage2-s1/eval"][2])  # one POVID run missing: POVID is not reported
    assert lab.reported_claims(cfg) == ("lrv", "rlhf", "vigc")
    assert lab.reported_claims(lab.replace(full, claims=("povid",))) == lab_report.CLAIMS
    lab.save_wall_clock(cfg, "2026-12-01T10:00:00", 7.5, 30, 30)
    os.makedirs(cfg.sft)
    lab.main(lab.replace(cfg, report_only=True))  # `python lab.py --claims lrv --report_only true`
    text = open(cfg.results).read()
    assert "## LRV-Instruction" in text and "## LLaVA-RLHF" in text and "## VIGC" in text
    assert "## POVID" not in text
    assert "lab wall clock 7.5 min" in text and "(a lab of lrv only)" in text
    # invocations that together timed every claim reported, in whatever order: no note
    lab.save_wall_clock(lab.replace(cfg, claims=("vigc", "rlhf")), "2026-12-01T11:00:00", 9.0, 30,
                        30)
    lab.main(lab.replace(cfg, report_only=True))
    text = open(cfg.results).read()
    assert "lab wall clock 16.5 min" in text and "a lab of" not in text


def test_lab_reports_no_stale_run_with_or_without_report_only(tmp_path):
    """Another claim's runs made with another command (their lab_run.json) were reported by
    `lab.py --claims povid` with today's commands, while --report_only refused the same --out
    and advised a lab that would not run them. Both leave that claim out of the report now; a
    claim reported with stale runs is refused with advice that runs them; and runs left stale
    by a failed run before them (not made again) are not reported."""
    cfg, runs = fake_lab(tmp_path)
    os.makedirs(cfg.sft)
    lab.save_wall_clock(cfg, "2026-12-01T10:00:00", 7.5, 30, 30)
    name = "lrv/neg0.0-s0"
    edited = [a if a != "600" else "7" for a in lab.portable(cfg, runs[name][0])]
    common.write_json({"command": edited}, lab.run_record(cfg, name))
    povid = lab.replace(cfg, claims=("povid",))
    assert lab.reported_claims(povid) == ("rlhf", "povid", "vigc")
    lab.main(lab.replace(povid, report_only=True))
    text = open(cfg.results).read()
    assert "## LRV" not in text and "## POVID" in text and "## VIGC" in text
    with pytest.raises(common.ConfigError, match="run this command without --report_only to run"):
        lab.main(lab.replace(cfg, report_only=True, claims=("lrv",)))
    os.remove(lab.run_record(cfg, name))
    # stage 1 of seed 0 failed when run again: stage 2 and the evals after it are left as they
    # were, from the stage 1 before; not reported
    os.remove(runs["povid/stage1-s0"][2])
    lab.report_runs(cfg, runs)
    text = open(cfg.results).read()
    assert re.search(r"\| POVID stage 2 \|.* \| 1 \|", text), text
    assert re.search(r"\| DPO \(POVID stage 1\) \|.* \| 1 \|", text), text
    # the Commands section lists them, said so (it read as every run run)
    commands = text.split("## Commands")[1].splitlines()
    marked = [c for c in commands if c.endswith("# not reported: not done, or made otherwise")]
    assert any("--povid_stage 1" in c and "-s0" in c for c in marked), marked
    assert any("--povid_stage 2" in c and "-s0" in c for c in marked), marked
    assert not any("-s1" in c for c in marked), marked


def test_lab_report_only_refuses_seeds_and_claims_never_run(tmp_path):
    """--report_only with a --seeds or --claims that ran nothing replaced the report with one of
    runs that never happened (the SFT baseline's eval, done for any seed, passed the guard)."""
    cfg, runs = fake_lab(tmp_path)  # (seeds 0 and 1, every claim)
    os.makedirs(cfg.sft)
    lab.save_wall_clock(cfg, "2026-12-01T10:00:00", 7.5, 30, 30)
    with pytest.raises(common.ConfigError, match="--seeds 5: no finished run of this seed"):
        lab.main(lab.replace(cfg, report_only=True, seeds=(0, 5)))
    with pytest.raises(common.ConfigError, match="--jobs 4: not read with --report_only true"):
        lab.main(lab.replace(cfg, report_only=True, jobs=4))
    # another world seed than the world's (it said the runs were made with another command)
    with pytest.raises(common.ConfigError, match="holds the world of seed 0, not --world_seed 1"):
        lab.main(lab.replace(cfg, report_only=True, world_seed=1))
    for name, (_, _, done) in runs.items():
        if name.startswith("povid/"):
            os.remove(done)
    with pytest.raises(common.ConfigError, match="--claims povid: no finished run of it"):
        lab.main(lab.replace(cfg, report_only=True, claims=("povid",)))
    assert not os.path.exists(cfg.results)
    # RLHF runs --rlhf_seeds of the seeds: a seed it does not run is not asked of it
    lab.main(lab.replace(cfg, report_only=True, claims=("rlhf",), rlhf_seeds=1))
    assert os.path.exists(cfg.results)
    # left at their defaults (every claim, seeds 0-4: the docstring's `--claims lrv povid --seeds
    # 0 1 2`, then `--report_only true`), they report what is there
    lab.main(lab.replace(cfg, report_only=True, claims=lab.Config.claims, seeds=lab.Config.seeds))


def test_lab_replaces_a_report_or_an_empty_file_only(tmp_path):
    results = tmp_path / "R.md"
    results.write_text("")  # (empty: nothing to lose)
    lab.refuse_foreign_results(str(results))
    # (an editor's BOM and CRLF)
    results.write_text(lab_report.TITLE + "\r\n", encoding="utf-8-sig")
    lab.refuse_foreign_results(str(results))
    results.write_text("# My notes\n")
    with pytest.raises(common.ConfigError, match="R.md: exists and is not a lab report"):
        lab.refuse_foreign_results(str(results))


def test_eval_alone_refuses_models_older_than_the_sft(tmp_path, tiny_world):
    """--stages eval compared whatever was under --out: after --stages sft --overwrite true, the
    new SFT stood beside LRV, PPO and DPO trained from the old one."""
    import pipeline
    out = tmp_path / "ckpt"
    for i, stage in enumerate(("lrv", "dpo", "sft")):  # written in this order
        ck = out / stage / "checkpoint-000001"
        ck.mkdir(parents=True)
        (ck / "config.json").write_text("{}")
        os.utime(ck / "config.json", (1000 + i, 1000 + i))
    cfg = pipeline.Config(out=str(out), stages=("eval",), world=tiny_world)
    with pytest.raises(common.ConfigError, match="ckpt/lrv was trained before .*ckpt/sft's newest"):
        pipeline.refuse_stale_models(cfg, pipeline.compared_models(cfg))
    # the command the refusal names: the stages it lists train those models again first (it
    # refused itself: the old models were checked before the stages that replace them ran)
    again = pipeline.Config(out=str(out), stages=("lrv", "dpo", "eval"), world=tiny_world)
    pipeline.refuse_stale_models(again, pipeline.compared_models(again))
    for stage in ("lrv", "dpo"):  # trained again after it
        os.utime(out / stage / "checkpoint-000001" / "config.json", (2000, 2000))
    pipeline.refuse_stale_models(cfg, pipeline.compared_models(cfg))
    argv = ["--out", str(out), "--stages", "eval", "--world", tiny_world, "--eval_out",
            str(tmp_path / "eval")]
    os.utime(out / "dpo" / "checkpoint-000001" / "config.json", (10, 10))
    code, _, err = run_cli("pipeline", argv)
    assert code == 2 and "dpo was trained before" in err, err
    # a run.json whose init is not a path (a hand edit): one line, not a TypeError
    os.utime(out / "dpo" / "checkpoint-000001" / "config.json", (2000, 2000))
    (out / "dpo" / "run.json").write_text('{"data": {}, "init": 5}')
    code, _, err = run_cli("pipeline", argv)
    assert code == 2 and "dpo/run.json: field 'init': expected the path" in err, err


def hold_lock(folder):
    """A process that holds folder/.lock (as a stage a killed pipeline left running does)."""
    import subprocess
    import sys
    code = ("import fcntl, os, sys, time; f = open(os.path.join(sys.argv[1], '.lock'), 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print('held', "
            "flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_still_written_is_refused_as_init_and_said_to_eval(tmp_path, tiny_world,
                                                                        tiny_sft):
    """dpo.py (any stage) --init a run folder an SFT still writes: its adapters were saved against
    a checkpoint that run removed seconds later ("base checkpoint ... not found" ever after), or
    the load met a checkpoint removed under it. Refused now; eval.py reads the newest checkpoint of
    a run as it trains and says so (its note said the run "stopped")."""
    import shutil
    run = tmp_path / "sft"
    shutil.copytree(tiny_sft, run, ignore=shutil.ignore_patterns(".lock"))
    holder = hold_lock(run)
    try:
        code, _, err = run_cli("dpo", ["--init", str(run), "--world", tiny_world,
                                       "--out", str(tmp_path / "dpo")])
        assert code == 2 and f"{run}: a process (pid {holder.pid}) is still writing this run " \
            "folder" in err, err
        assert not (tmp_path / "dpo").exists()
        code, out, err = run_cli("eval", ["--ckpt", str(run), "--world", tiny_world,
                                          "--benchmarks", "pope", "--limit", "2",
                                          "--out", str(tmp_path / "eval")])
        assert code == 0 and f"note: --ckpt {run}: its run is still being written (pid " \
            f"{holder.pid}, at step 3 of 3)" in out, err
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli("dpo", ["--init", str(run), "--world", tiny_world, "--max_steps", "1",
                                   "--batch_size", "2", "--out", str(tmp_path / "dpo")])
    assert code == 0, err


def fake_run(folder, step, max_steps, init=None):
    ck = folder / f"checkpoint-{step:06d}"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text(json.dumps({"step": step,
                                                "run_config": {"max_steps": max_steps}}))
    if init:
        (folder / "run.json").write_text(json.dumps({"data": {}, "init": str(init)}))
    return ck


def test_pipeline_refuses_what_a_killed_pipeline_left(tmp_path, tiny_world):
    """A pipeline killed mid-SFT left sft.py writing and an unfinished run: the refusal's own hint
    (leave sft out of --stages) trained every later stage on step 500 of 1200, beside the orphan
    still writing; a second pipeline replaced the SFT while the first's later stages trained on it,
    and --stages eval compared models of two SFT runs (the time check missed it). Now: a run still
    written, an unfinished run, or a model whose recorded --init is not the SFT there is refused,
    and one pipeline at a time holds --out."""
    import pipeline
    out = tmp_path / "ckpt"
    fake_run(out / "sft", 500, 1200)
    argv = ["--out", str(out), "--stages", "lrv", "--world", tiny_world]
    code, _, err = run_cli("pipeline", argv)
    assert code == 2 and "ckpt/sft stopped at step 500 of 1200 (unfinished)" in err, err
    # finished with the command the pipeline runs it with (a bare --resume was refused field by
    # field, and took the script's own --max_steps)
    assert f"or finish it first (python sft.py --out {out / 'sft'} --model shapes --world " \
        f"{tiny_world} --world_seed 0 --device cpu --resume true)" in err, err
    # the same command again (a pipeline stopped in its SFT): its hint said to leave sft out of
    # --stages "to use it", which the line above refuses
    code, _, err = run_cli("pipeline", ["--out", str(out), "--world", tiny_world])
    assert code == 2 and "holds a run: pass --overwrite true" in err and "to use it" not in err
    assert "or finish it (it stopped at step 500 of 1200: python sft.py --out " \
        f"{out / 'sft'} --model shapes --world {tiny_world} --world_seed 0 --device cpu " \
        "--resume true), then leave sft out of --stages" in err, err
    holder = hold_lock(out / "sft")
    try:
        code, _, err = run_cli("pipeline", argv)
        assert code == 2 and f"(pid {holder.pid}) is still writing there" in err, err
        lrv = fake_run(out / "lrv", 8, 8, init=out / "sft" / "checkpoint-000300")
    finally:
        holder.kill()
        holder.wait()
    (out / "sft" / "checkpoint-000500" / "config.json").write_text(json.dumps(
        {"step": 1200, "run_config": {"max_steps": 1200}}))
    later = os.path.getmtime(out / "sft" / "checkpoint-000500" / "config.json") + 100
    os.utime(lrv / "config.json", (later, later))  # (after the SFT's: the time check passes)
    cfg = pipeline.Config(out=str(out), stages=("eval",), world=tiny_world)
    with pytest.raises(common.ConfigError, match="ckpt/lrv was trained before"):
        pipeline.refuse_stale_models(cfg, pipeline.compared_models(cfg))
    holder = hold_lock(out)  # another pipeline on this --out
    try:
        code, _, err = run_cli("pipeline", ["--out", str(out), "--stages", "sft", "--model",
                                            "tiny", "--overwrite", "true", "--world", tiny_world])
        assert code == 2 and f"another process (pid {holder.pid}) is writing there" in err, err
    finally:
        holder.kill()
        holder.wait()


def test_pipeline_stopped_before_the_first_sft_checkpoint(tmp_path, tiny_world):
    """Ctrl-C before SFT's first checkpoint left ckpt/sft with metrics and run.json alone: the
    rerun's refusal said to leave sft out of --stages to use it, and doing so started LRV, which
    failed on 'no config.json'. Now the hint says there is nothing to use, and later stages are
    refused before any starts."""
    out = tmp_path / "ckpt"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0}) + "\n")
    (out / "sft" / "run.json").write_text(json.dumps({"data": {}, "init": ""}))
    code, _, err = run_cli("pipeline", ["--out", str(out), "--world", tiny_world])
    assert code == 2 and "holds a run: pass --overwrite true" in err and \
        "(it stopped before its first checkpoint: nothing there to use)" in err, err
    code, _, err = run_cli("pipeline", ["--out", str(out), "--stages", "lrv", "rm", "ppo",
                                        "--world", tiny_world])
    assert code == 2 and "ckpt/sft holds no checkpoint (its run stopped before its first): " \
        "train it again (--stages sft,... --overwrite true)" in err, err
    assert not (out / "lrv").exists()
    import pipeline  # a PEFT adapter folder is a checkpoint the stages load
    (out / "sft" / "adapter_config.json").write_text("{}")
    assert pipeline.has_checkpoint(str(out / "sft"))


def test_eval_after_later_stages_keeps_the_sft_baseline(tmp_path):
    """--stages lrv,eval (the way on from an SFT run already there) compared LRV alone: the table
    lost its baseline row."""
    import pipeline
    out = tmp_path / "ckpt"
    (out / "sft").mkdir(parents=True)
    cfg = pipeline.Config(out=str(out), stages=("lrv", "eval"))
    assert pipeline.compared_models(cfg) == [str(out / "sft"), str(out / "lrv")]
    fresh = pipeline.Config(out=str(tmp_path / "none"), stages=("lrv", "eval"))
    assert pipeline.compared_models(fresh) == [str(tmp_path / "none" / "lrv")]
    # going on after an interrupt with --stages naming the rest (lrv and dpo had ended): the table
    # held the SFT and PPO alone, and replaced the full one
    for stage in ("lrv", "dpo"):
        (out / stage).mkdir()
    rest = pipeline.Config(out=str(out), stages=("rm", "ppo", "vigc", "eval"))
    assert pipeline.compared_models(rest) == [str(out / s) for s in ("sft", "lrv", "ppo", "dpo")]
    # an SFT trained again: the models beside it sit on the one it replaces
    again = pipeline.Config(out=str(out), stages=("sft", "lrv", "eval"))
    assert pipeline.compared_models(again) == [str(out / "sft"), str(out / "lrv")]


def test_pipeline_interrupted_starts_no_later_stage(tmp_path, capsys, monkeypatch):
    """Ctrl-C to pipeline.py during the side-by-side lanes: the lanes went on starting reward.py,
    ppo.py and vigc.py, and it ended in a traceback. The running stages are stopped, none starts
    after, and one line says how to go on."""
    import threading
    import pipeline
    slow = tmp_path / "slow.py"
    # (Ctrl-C's handler set: a shell's background job, as `bash .ci/run &`, starts it ignored)
    slow.write_text("import signal, sys, time\nsignal.signal(signal.SIGINT, "
                    "signal.default_int_handler)\nopen(sys.argv[1], 'w').close()\n"
                    "time.sleep(60)\n")
    commands = {n: [str(slow), str(tmp_path / f"{n}.started")] for n in ("a", "b")}
    times = {}
    lane = threading.Thread(target=pipeline.run_lane, args=(("a", "b"), commands, "/", None,
                                                            times))
    t0 = time.time()
    lane.start()
    while not (tmp_path / "a.started").exists():
        time.sleep(0.05)
    pipeline.stop_stages()
    lane.join(30)
    assert not lane.is_alive() and time.time() - t0 < 30
    assert not (tmp_path / "b.started").exists() and not pipeline._running
    pipeline._stopping.clear()

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "run_stages", interrupted)
    code, _, err = run_cli("pipeline", ["--out", str(tmp_path / "ckpt"), "--model", "tiny",
                                        "--stages", "sft", "--world", str(tmp_path / "w")])
    said = ("interrupted: the stages that ran to the end are kept; go on with --stages naming the "
            "rest, or start again with --overwrite true\n")
    assert code == 130 and err == said, err
    pipeline._stopping.clear()
    # before any stage (it said common's "--resume true", which the pipeline does not take)
    monkeypatch.setattr(pipeline.common, "refuse_torchrun", interrupted)  # (its first call)
    code, _, err = run_cli("pipeline", ["--out", str(tmp_path / "ckpt")])
    assert code == 130 and err == said, err
    pipeline._stopping.clear()


def test_a_lab_refuses_runs_a_killed_lab_left_writing(tmp_path):
    """lab.py killed, then run again: it deleted the folders of runs the killed lab had left going
    and started new runs there (four writers, every step logged twice); it now refuses in one line
    while a process holds such a run's lock."""
    cfg, runs = fake_lab(tmp_path)
    name = "povid/stage2-s0"
    os.remove(runs[name][2])  # not done: this lab would start it again
    folder = tmp_path / "runs" / name
    folder.mkdir(parents=True, exist_ok=True)
    holder = hold_lock(folder)
    try:
        with pytest.raises(common.ConfigError, match=f"pid {holder.pid}"):
            lab.refuse_live_writers(cfg, runs, set())
    finally:
        holder.kill()
        holder.wait()
    lab.refuse_live_writers(cfg, runs, set())


def test_a_lab_killed_while_removing_a_stale_run_leaves_it_not_done(tmp_path, monkeypatch):
    """A stale run's folder is removed before it runs again; rmtree took DONE last (after
    lab_run.json and the checkpoint), so a lab killed meanwhile left a torn run counted done,
    kept as a run from before records, and the runs made from its old version (POVID's stage 2)
    reported as today's. Its done-file goes first: the run and those after it run again."""
    cfg, runs = fake_lab(tmp_path)
    name = "povid/stage1-s0"
    edited = [a if a != "100" else "7" for a in lab.portable(cfg, runs[name][0])]
    common.write_json({"command": edited}, lab.run_record(cfg, name))
    real_rmtree = lab.shutil.rmtree

    def killed(folder):  # (everything but DONE, in rmtree's order here, then the kill)
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if entry != "DONE":
                real_rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise KeyboardInterrupt
    monkeypatch.setattr(lab.shutil, "rmtree", killed)
    monkeypatch.setattr(lab.subprocess, "Popen", None)  # (nothing may start)
    with pytest.raises(KeyboardInterrupt):
        lab.execute(runs, cfg)
    assert not lab.is_done(runs[name][2])
    for after in ("povid/stage2-s0", "povid/stage2-s0/eval"):
        assert not lab.is_done(runs[after][2]) or after in lab.stale_runs(runs, cfg), after


def test_a_lab_refused_by_the_lock_leaves_lab_json_alone(tmp_path, tiny_world, tiny_sft):
    """Two labs started on one new --out (each from its own SFT): the one refused by the other's
    lock had written lab.json first, so the runs there were tied to the refused lab's SFT (a
    lab from that SFT would have reported them as its own). The lock comes first now."""
    out = tmp_path / "runs"
    out.mkdir()
    cfg = lab.Config(sft=tiny_sft, world=tiny_world, claims=("povid",), seeds=(0,), steps=2,
                     out=str(out), results=str(tmp_path / "R.md"), plots=str(tmp_path / "p"))
    holder = hold_lock(out)  # (the other lab, its lab.json not yet written)
    try:
        with pytest.raises(common.ConfigError, match=f"pid {holder.pid}"):
            lab.main(cfg)
    finally:
        holder.kill()
        holder.wait()
        rundir.release_locks()
    assert not (out / "lab.json").exists()


def test_a_lab_stopped_after_a_stale_run_leaves_the_runs_after_it_to_run(tmp_path,
                                                                          monkeypatch):
    """A stale run (its recipe changed) was made again, then the lab was stopped (Ctrl-C, a
    time limit) while another run held the core, before POVID's stage 2 made from the old stage 1
    started: stage 1 done with today's command, stage 2 done with its own, so the next lab kept
    that stage 2 and reported it as made from the new stage 1. The runs after a stale one are
    marked not done as the lab starts."""
    import subprocess
    cfg, runs = fake_lab(tmp_path)
    cfg = lab.replace(cfg, jobs=1)
    name = "povid/stage1-s0"
    edited = [a if a != "100" else "7" for a in lab.portable(cfg, runs[name][0])]
    common.write_json({"command": edited}, lab.run_record(cfg, name))
    os.remove(runs["lrv/neg0.0-s1"][2])  # (not done: a longer chain, it goes before stage 2)
    started = []

    class Run:  # stage 1 ends well at once; the LRV run after it trains on
        def __init__(self, cmd, **kwargs):
            started.append(cmd[cmd.index("--out") + 1])
            self.returncode = 0 if len(started) == 1 else None

        def poll(self):
            return self.returncode

        def send_signal(self, signum):
            self.returncode = 130

        def wait(self, timeout=None):
            if self.returncode is None:
                raise subprocess.TimeoutExpired("run", timeout)
            return self.returncode

    def sleep(seconds):  # (the stop, once the LRV run holds the one core)
        if len(started) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(lab.subprocess, "Popen", Run)
    monkeypatch.setattr(lab.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        lab.execute(runs, cfg)
    assert started[0].endswith(name) and started[1].endswith("neg0.0-s1"), started
    assert lab.is_done(runs[name][2]) and not lab.stale_runs(runs, cfg) & {name}
    for after in ("povid/stage2-s0", "povid/stage2-s0/eval"):
        assert not lab.is_done(runs[after][2]) or after in lab.stale_runs(runs, cfg), after


def test_ctrl_c_in_a_stage_is_one_line():
    """A stage stopped with Ctrl-C printed a KeyboardInterrupt traceback (three at once under
    pipeline.py); one line, exit code 130."""
    import contextlib
    import io
    err, code = io.StringIO(), None
    with contextlib.redirect_stderr(err):
        try:
            with common.user_errors():
                raise KeyboardInterrupt
        except KeyboardInterrupt:  # (the traceback)
            code = "KeyboardInterrupt"
        except SystemExit as e:
            code = e.code
    assert code == 130 and err.getvalue() == (
        "interrupted: what was written is kept (a training run that saved a checkpoint goes on "
        "from it with --resume true)\n")


def test_ctrl_c_says_what_each_script_leaves(tmp_path, monkeypatch, capsys):
    """shapes.py, eval.py and bench.py said the training stages' line (a training run goes on with
    --resume true), which none of them takes; each says what it leaves and how to go on."""
    import importlib
    import bench
    import shapes
    eval_module = importlib.import_module("eval")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    out = str(tmp_path / "w")
    monkeypatch.setattr(shapes, "write_world", interrupted)
    monkeypatch.setattr(eval_module, "main", interrupted)
    monkeypatch.setattr(bench, "main", interrupted)
    for call in (lambda: shapes.main(["--out", out]), lambda: eval_module.cli([]),
                 lambda: bench.cli(["--quick", "true"])):
        with pytest.raises(SystemExit) as stop:
            call()
        assert stop.value.code == 130
    printed = capsys.readouterr()
    said = printed.err.splitlines()
    assert printed.out == "", printed.out
    assert said == [f"interrupted: no half-written world; {out} is as it was, or holds this whole "
                    "world if its writing had just ended",
                    "interrupted: the answers and judge replies written are kept; the same "
                    "command goes on from them", "interrupted: no report written"]


def test_lab_where_no_run_ends_well_leaves_the_results_as_they_were(tmp_path, tiny_world,
                                                                    tiny_sft, monkeypatch, capsys):
    """Every run of this invocation failed (a broken machine, a missing file): the report of none
    would replace a good --results with an empty one; it is left as it was, and lab exits 1."""
    results = tmp_path / "RESULTS.md"
    good = "# Results: the hallucination lab\n\na good report\n"
    results.write_text(good)
    cfg = lab.Config(sft=tiny_sft, world=tiny_world, claims=("povid",), seeds=(0,), steps=2,
                     eval_limit=4, out=str(tmp_path / "runs"), results=str(results),
                     plots=str(tmp_path / "plots"))
    monkeypatch.setattr(lab, "execute", lambda runs, cfg, clock: set(runs))
    with pytest.raises(SystemExit) as e:
        lab.main(cfg)
    assert e.value.code == 1 and results.read_text() == good
    assert f"no run ended well: {results} left as it was" in capsys.readouterr().out


def test_an_sft_changed_while_the_lab_ran_leaves_the_results_as_they_were(tmp_path, tiny_world,
                                                                          tiny_sft, monkeypatch):
    """--sft trained again or resumed while the lab ran (`pipeline.py --overwrite true` beside
    it): the runs started after it went on from the new checkpoint, the ones before from the old,
    and the report set them side by side as runs of one SFT. It says so now, and leaves --results
    as it was (lab.json keeps the first SFT: the next lab refuses --out)."""
    import shutil
    sft = tmp_path / "sft"
    shutil.copytree(tiny_sft, sft, ignore=shutil.ignore_patterns(".lock"))
    results = tmp_path / "RESULTS.md"
    cfg = lab.Config(sft=str(sft), world=tiny_world, claims=("povid",), seeds=(0,), steps=2,
                     eval_limit=4, out=str(tmp_path / "runs"), results=str(results),
                     plots=str(tmp_path / "plots"))

    def trained_again(runs, cfg, clock):  # (a newer checkpoint, as a resumed SFT writes)
        ck = lab.latest_checkpoint(str(sft))
        shutil.copytree(ck, str(sft / "checkpoint-999999"))
        config = sft / "checkpoint-999999" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "step": 999999}))
        return set()
    monkeypatch.setattr(lab, "execute", trained_again)
    try:
        with pytest.raises(common.ConfigError, match=f"^--sft {sft} changed while the lab ran"):
            lab.main(cfg)
    finally:
        rundir.release_locks()
    assert not results.exists()
    with pytest.raises(common.ConfigError, match="holds runs from another SFT checkpoint"):
        lab.check_out_matches(cfg)


def test_an_out_whose_name_starts_with_a_dash_is_passed_on_as_a_path(monkeypatch, tiny_world,
                                                                     tiny_sft, tmp_path):
    """--out=-runs (a folder named '-runs'): the pipeline and the lab passed '--out -runs/sft' on,
    which the stage read as a flag ('--out: expected one argument'): the pipeline's first stage
    failed, and every lab run."""
    import importlib
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("pipeline", ["--out=-pp", "--world", tiny_world, "--model", "tiny",
                                        "--steps", "1", "--stages", "sft"])
    assert code == 0, err
    assert os.path.isfile(os.path.join(lab.latest_checkpoint("-pp/sft"), "config.json"))

    class Planned(Exception):
        pass

    def planned(runs, cfg, clock):
        raise Planned(runs)
    monkeypatch.setattr(lab, "execute", planned)
    with pytest.raises(Planned) as e:
        run_cli("lab", ["--sft", tiny_sft, "--world", tiny_world, "--out=-runs", "--claims",
                        "povid", "--seeds", "0"])
    for argv, _, _ in e.value.args[0].values():
        module = importlib.import_module(argv[0][:-3])
        cfg = common.parse_config(module.Config, argv[1:], prog=argv[0])
        assert cfg.out.startswith("./-runs/"), cfg.out
        # (recorded with {out}: runs moved with their lab keep matching their commands)
        mine = lab.Config(sft=tiny_sft, world=tiny_world, out="-runs")
        recorded = lab.portable(mine, argv)
        assert recorded[recorded.index("--out") + 1].startswith("{out}/"), recorded


def test_every_lab_command_passes_its_scripts_checks(monkeypatch, tiny_world, tiny_sft, capsys,
                                                     tmp_path):
    """Each run the lab plans (every claim, its real step budgets) is parsed by its script and
    passes every check the script makes before it claims --out: its flags exist, are in range,
    and none is refused as unread beside the others. The suite runs one claim's runs end to end
    (test_lab_one_claim_two_steps_then_its_records); a refusal added to a script could break the
    others' unseen until a lab of an hour or more stopped on it."""
    import importlib

    class Reached(Exception):
        """The script got to the point where it writes --out: its up-front checks passed."""

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(rundir, "claim_out", reached)  # (the stages)
    monkeypatch.setattr(rundir, "lock_out", reached)  # (eval.py)
    cfg = lab.Config(sft=tiny_sft, world=tiny_world, out=str(tmp_path / "lab"),
                     claims=lab_report.CLAIMS, seeds=(0,))
    planned = lab.plan(cfg)
    scripts = {argv[0] for argv, _, _ in planned.values()}
    assert scripts == {"sft.py", "reward.py", "ppo.py", "dpo.py", "vigc.py", "eval.py"}
    refused = []
    for name, (argv, _, _) in planned.items():
        module = importlib.import_module(argv[0][:-3])
        if argv[0] == "eval.py":  # (eval finds its checkpoint first: the SFT's stands in)
            argv = [tiny_sft if a == argv[argv.index("--ckpt") + 1] else a for a in argv]
        try:
            run_cfg = common.parse_config(module.Config, argv[1:], prog=argv[0])
            module.main(run_cfg)
        except Reached:
            continue
        except (SystemExit, common.ConfigError) as e:
            refused.append(f"{name}: {e} {capsys.readouterr().err.strip()}")
            continue
        refused.append(f"{name} ran without claiming --out")
    assert not refused, "\n".join(refused)



def test_a_world_written_again_after_sft_is_noticed(tmp_path, tiny_world, tiny_sft, capsys):
    """A checkpoint records a digest of its world's world.json. After the world folder is written
    again with other parameters (shapes.py --overwrite true), a stage with that --init says so,
    pipeline.py --stages lrv refuses to go on from the old SFT, and --resume of a run started on
    the old world is refused: before, each went on without a word on another world."""
    import shutil
    from checkpoint import latest_checkpoint
    world, out = tmp_path / "world", tmp_path / "ckpt"
    shutil.copytree(tiny_world, world)
    shutil.copytree(tiny_sft, out / "sft")
    ck = latest_checkpoint(str(out / "sft"))
    with open(os.path.join(ck, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["run_config"]["world_digest"] == rundir.world_digest(tiny_world)  # recorded
    cfg["run_config"]["world"] = str(world)  # (as if trained on this copy)
    with open(os.path.join(ck, "config.json"), "w") as f:
        json.dump(cfg, f)
    import sft
    run = common.parse_config(sft.Config, ["--world", str(world), "--out", str(out / "sft"),
                                           "--model", "tiny", "--max_steps", "3",
                                           "--resume", "true"])
    state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=False)
    state["run_config"] = dict(dataclasses.asdict(run), world_digest=rundir.world_digest(world))
    torch.save(state, os.path.join(ck, "trainer_state.pt"))
    rundir.note_world("--init", str(out / "sft"), str(world))
    assert "note:" not in capsys.readouterr().out  # the same world: nothing to say
    with open(world / "world.json") as f:  # written again: other bytes
        text = f.read()
    (world / "world.json").write_text(text + "\n")
    rundir.note_world("--init", str(out / "sft"), str(world))
    assert f"note: --init {out / 'sft'} was trained on {world} before it was written again" in \
        capsys.readouterr().out
    code, stdout, err = run_cli("eval", ["--ckpt", str(out / "sft"), "--world", str(world),
                                         "--benchmarks", "pope", "--limit", "2",
                                         "--out", str(tmp_path / "eval")], strict=True)
    assert code == 0 and f"note: --ckpt {out / 'sft'} was trained on {world}" in stdout, err
    argv = ["--stages", "lrv", "--world", str(world), "--out", str(out)]
    code, _, err = run_cli("pipeline", argv, strict=True)
    assert code == 2 and f"{out / 'sft'} was trained on {world} before it was written again" in err
    with pytest.raises(common.ConfigError, match="--resume: .* was written again with other"):
        rundir.load_resume(str(out / "sft"), run)


def test_later_stages_refuse_another_world_than_the_sfts(tmp_path, tiny_world, tiny_sft):
    """--stages lrv,... on another --world folder than the SFT in --out learnt ran without a word
    (only the same folder written again was refused); a copy of its world is the same world."""
    import shutil
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_sft, out / "sft")
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(tiny_world, same)
    shutil.copytree(tiny_world, other)
    (other / "world.json").write_text((other / "world.json").read_text() + "\n")
    import pipeline
    pipeline.refuse_rewritten_world(pipeline.Config(out=str(out), world=str(same),
                                                    stages=("lrv",)))
    argv = ["--stages", "lrv", "--world", str(other), "--out", str(out)]
    code, _, err = run_cli("pipeline", argv, strict=True)
    assert code == 2 and f"was trained on the world in {tiny_world}, not on --world {other}" \
        in err, err
    typo = tmp_path / "typo"  # (not written yet: it would be written, and trained on)
    code, _, err = run_cli("pipeline", ["--stages", "lrv", "--world", str(typo), "--out",
                                        str(out)], strict=True)
    assert code == 2 and f"not on --world {typo}" in err and not typo.exists(), err


def test_resume_with_another_max_steps_says_the_schedule_stretches(tmp_path, tiny_sft, capsys):
    """--max_steps may change on --resume (to train on), but the cosine schedule is over it: the
    learning rate jumps at the resumed step and the run matches neither plan; it said nothing."""
    import shutil
    import sft
    from checkpoint import latest_checkpoint
    shutil.copytree(tiny_sft, tmp_path / "sft")
    ck = latest_checkpoint(str(tmp_path / "sft"))
    run = common.parse_config(sft.Config, ["--out", str(tmp_path / "sft"), "--model", "tiny",
                                           "--max_steps", "3", "--resume", "true"])
    state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=False)
    state["run_config"] = dataclasses.asdict(run)
    torch.save(state, os.path.join(ck, "trainer_state.pt"))
    rundir.load_resume(str(tmp_path / "sft"), run)
    assert "note:" not in capsys.readouterr().out  # the plan as it was: nothing to say
    rundir.load_resume(str(tmp_path / "sft"), dataclasses.replace(run, max_steps=8))
    assert "note: --resume with --max_steps 8, the run planned 3: the learning-rate schedule " \
        "stretches from step 3 on" in capsys.readouterr().out


def test_lab_refuses_an_sft_of_another_world_an_unfinished_one_and_outputs_in_the_world(
        tmp_path, tiny_world, tiny_sft):
    """lab.py ran every claim from an SFT trained on another world (reported as this one's), and
    from an SFT run stopped before its last step (a note inside each run's log alone); its --out,
    --results and --plots could lie inside the world folder (shapes.py then refused the world).
    Each is one line now, before any run."""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_world, other)
    (other / "world.json").write_text((other / "world.json").read_text() + "\n")
    base = lab.Config(sft=tiny_sft, world=tiny_world, claims=("povid",), seeds=(0,), steps=2,
                      eval_limit=4, out=str(tmp_path / "runs"), results=str(tmp_path / "R.md"),
                      plots=str(tmp_path / "plots"))
    unfinished = tmp_path / "unfinished"
    fake_run(unfinished, 2, 10)
    cases = [(dict(world=str(other)), f"--sft {tiny_sft} was trained on the world in "
                                      f"{tiny_world}, not on --world {other}"),
             (dict(sft=str(unfinished)), f"--sft {unfinished} stopped at step 2 of 10 "
                                         "(unfinished)"),
             (dict(out=os.path.join(tiny_world, "lab")), "--out " + os.path.join(tiny_world, "lab")
              + " lies inside the --world folder"),
             (dict(results=os.path.join(tiny_world, "R.md")), "--results "),
             (dict(plots=os.path.join(tiny_world, "images", "p")), "--plots ")]
    for change, says in cases:
        with pytest.raises(common.ConfigError, match=re.escape(says)):
            lab.main(dataclasses.replace(base, **change))
    assert not (tmp_path / "runs").exists() and not os.path.exists(os.path.join(tiny_world, "lab"))
    held = hold_lock(unfinished)
    try:
        fake_run(unfinished, 10, 10)
        with pytest.raises(common.ConfigError, match="is still writing there"):
            lab.main(dataclasses.replace(base, sft=str(unfinished)))
    finally:
        held.kill()


def test_lab_refuses_a_missing_world_and_an_out_at_the_sft(tmp_path, tiny_world, tiny_sft,
                                                           monkeypatch):
    """A --world that is not there (removed since the SFT trained on it) was never checked: each
    stage wrote a default-size world there and trained on it, and lab.json recorded "world": [];
    --report_only said "another world". An --out that is the --sft folder, inside it or around it
    failed every run on the lab's own lock. Each is one line now, before anything is written."""
    import shutil
    from checkpoint import latest_checkpoint
    world, sft = tmp_path / "world", tmp_path / "ckpt" / "sft"
    shutil.copytree(tiny_sft, sft, ignore=shutil.ignore_patterns(".lock"))
    made = os.path.join(latest_checkpoint(str(sft)), "config.json")
    config = json.load(open(made))
    config["run_config"]["world"] = str(world)  # (trained on this world, since removed)
    json.dump(config, open(made, "w"))
    monkeypatch.setattr(lab, "execute", lambda runs, cfg, clock: set(runs))  # (no run started)
    base = lab.Config(sft=str(sft), world=str(world), claims=("povid",), seeds=(0,), steps=2,
                      eval_limit=4, out=str(tmp_path / "runs"), results=str(tmp_path / "R.md"),
                      plots=str(tmp_path / "plots"))
    for report_only in (False, True):
        with pytest.raises(common.ConfigError, match=re.escape(f"--world {world}: not found; pass "
                                                               "the world the --sft checkpoint")):
            lab.main(dataclasses.replace(base, report_only=report_only))
    world.mkdir()  # (an empty folder: the stages wrote a world into it)
    with pytest.raises(common.ConfigError, match="holds no world.json"):
        lab.main(base)
    assert not (tmp_path / "runs").exists() and not os.listdir(world)
    shutil.rmtree(world)
    shutil.copytree(tiny_world, world)
    for out, where in ((sft, "is"), (sft / "lab", "lies inside"), (tmp_path / "ckpt", "holds")):
        with pytest.raises(common.ConfigError, match=re.escape(f"--out {out} {where} the --sft "
                                                               f"folder {sft}")):
            lab.main(dataclasses.replace(base, out=str(out)))
    assert not (sft / "lab.json").exists() and not (sft / "lab").exists()
    assert not (tmp_path / "ckpt" / "lab.json").exists()
    # (an --out holding the SFT outside its own run folders, runs/pipe/sft beside runs/lrv, is fine)
    assert lab.refuse_out_in_sft(dataclasses.replace(base, out=str(tmp_path))) is None


def test_pipeline_and_eval_refuse_eval_outputs_among_the_runs_or_the_world(tmp_path, tiny_world,
                                                                           tiny_sft):
    """--eval_out equal to --out failed only after every stage had trained (its lock met the
    pipeline's own, naming the pipeline's pid); --eval_out (or eval.py's --out) in the world
    folder wrote answers among the world's files."""
    import shutil
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_sft, out / "sft")
    in_runs = "is --out or lies in a stage's run folder in it"
    # (in a checkpoint folder: eval wrote its answers among the weights)
    for eval_out, says in ((out, in_runs), (out / "sft", in_runs),
                           (out / "sft" / "checkpoint-000003", in_runs),
                           (os.path.join(tiny_world, "ev"), "lies inside the --world folder")):
        argv = ["--stages", "eval", "--world", tiny_world, "--out", str(out), "--eval_out",
                str(eval_out)]
        code, _, err = run_cli("pipeline", argv, strict=True)
        assert code == 2 and says in err, err
    code, _, err = run_cli("eval", ["--ckpt", tiny_sft, "--world", tiny_world, "--out",
                                    os.path.join(tiny_world, "ev"), "--limit", "2"])
    assert code == 2 and "lies inside the --world folder" in err, err
    assert not os.path.exists(os.path.join(tiny_world, "ev"))


def test_a_failed_stage_starts_no_later_stage_in_the_other_lane(tmp_path, tiny_world, tiny_sft):
    """lrv failed at once, dpo ran on beside it, and vigc started after it: the failing stage's
    line was buried in vigc's output. No lane starts a stage after a failure now."""
    import shutil
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_sft, out / "sft")
    (out / "lrv").write_text("not a folder")
    argv = ["--stages", "lrv,rm,ppo,dpo,vigc", "--world", tiny_world, "--out", str(out),
            "--steps", "2"]
    code, stdout, err = run_cli("pipeline", argv, strict=True)
    assert code == 2 and "=== dpo" in stdout and "=== vigc" not in stdout, stdout[-2000:]
    assert err.strip().endswith("error: stage 'lrv' failed (its line above); later stages not "
                                "run"), err


@pytest.mark.parametrize("script", ["pipeline", "lab", "eval"])
def test_pipeline_lab_and_eval_under_torchrun_say_run_with_python(script, tmp_path, monkeypatch):
    """`torchrun pipeline.py` (or lab.py, eval.py) ran the whole job once per process: rank 1 was
    refused by rank 0's lock on --out ("another process (pid N) is writing there") and torchrun
    stopped rank 0. Rank 0 now says what to do, once; the other ranks leave without a word. (What
    torchrun sets is set here: a real launch costs seconds of the suite.)"""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(script, ["--out", str(tmp_path / "out")])
    assert code == 2 and err.strip().endswith("run it with python, not torchrun"), err
    assert err.startswith(f"error: {script}.py runs in one process") and not out
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "1")
    assert run_cli(script, ["--out", str(tmp_path / "out")]) == (2, "", "")


def ctrl_c_once(ready, first=lambda real_sleep: None):
    """A time.sleep for the lab's poll (time.sleep is global: Popen.wait sleeps too) that raises
    KeyboardInterrupt once, the first time the file `ready` is there, after first()."""
    real_sleep, pressed = time.sleep, []

    def sleep(seconds):
        if os.path.exists(ready) and not pressed:
            pressed.append(True)
            first(real_sleep)
            raise KeyboardInterrupt
        real_sleep(seconds)
    return sleep


def test_ctrl_c_sent_to_the_lab_alone_stops_its_runs(tmp_path, monkeypatch, capsys):
    """SIGINT to lab.py alone (kill -INT, not the terminal's whole group): exit 130, and its
    running runs went on as orphans. They get it too now, and the lab waits for them, then says
    how to go on in its own words."""
    script = tmp_path / "sleeper.py"
    said = tmp_path / "said"
    ready = tmp_path / "ready"
    script.write_text("import sys, time\ntry:\n"
                      f"    open({str(ready)!r}, 'w').close()\n    time.sleep(60)\n"
                      "except KeyboardInterrupt:\n"
                      f"    open({str(said)!r}, 'w').write('stopped')\n    sys.exit(130)\n")
    runs = {"a": ([str(script)], [], str(tmp_path / "runs" / "a" / "DONE"))}
    cfg = lab.Config(out=str(tmp_path / "runs"), jobs=1)
    monkeypatch.setattr(lab.time, "sleep", ctrl_c_once(ready))  # (once the run is under way)
    with pytest.raises(KeyboardInterrupt):
        lab.execute(runs, cfg)
    assert said.read_text() == "stopped"
    # and the lab says how it goes on, wherever the Ctrl-C lands (it said the stages' "--resume
    # true", which the lab does not take)
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(lab.common, "refuse_torchrun", interrupted)  # (its first call)
    code, _, err = run_cli("lab", ["--out", str(tmp_path / "runs")])
    assert code == 130 and err == ("interrupted: the runs that ended are kept; the same command "
                                   "goes on from them (the runs cut off start again)\n"), err


def test_the_lab_whose_output_reader_ended_says_its_own_line(tmp_path, tiny_world, tiny_sft):
    """`lab.py | head`, head gone: the lab said common's line, advising --resume true, which it
    does not take; its own line now (pipeline.py passes its own alike)."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "lab.py"), "--sft", tiny_sft,
                             "--claims", "lrv", "--seeds", "0", "--steps", "1", "--world",
                             tiny_world, "--out", str(tmp_path / "out")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # (the reader gone before the lab's first line)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert err == f"{common.STDOUT_READER_GONE}: {lab.INTERRUPTED}\n", err


@pytest.mark.parametrize("script", ["pipeline", "lab"])
def test_sigterm_to_the_lab_or_the_pipeline_stops_their_runs(script, tmp_path, tiny_world,
                                                             tiny_sft):
    """SIGTERM (a scheduler's time limit, `kill PID`) ended lab.py and pipeline.py at once, their
    runs going on as orphans (the next lab or pipeline refused their folders until they ended); it
    is taken as Ctrl-C now: the running stage gets SIGINT and is waited for (exit 130)."""
    import signal
    import subprocess
    import sys
    out = tmp_path / "out"
    argv = {"pipeline": ["--stages", "sft", "--model", "tiny", "--steps", "100000"],
            "lab": ["--sft", tiny_sft, "--claims", "lrv", "--seeds", "0", "--steps", "100000"]}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, f"{script}.py"),
                             *argv[script], "--world", tiny_world, "--out", str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    running = lambda: [d for d, _, files in os.walk(out) if ".lock" in files and d != str(out)
                       and rundir.lock_holder(d)]
    deadline = time.time() + 120
    while not running() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    stage = running()
    assert stage, proc.communicate()[1][-2000:]
    pid = rundir.lock_holder(stage[0])
    proc.send_signal(signal.SIGTERM)
    try:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # (failed so, rarely, under load: what each waits on)
            raise AssertionError(f"{script} not stopped in 120 s:\n{process_states(proc.pid)}")
        assert proc.returncode == 130 and "interrupted:" in err, err[-2000:]
        # one line, the pipeline's or the lab's (the stage's own named --resume true first)
        assert err.count("interrupted:") == 1 and "--resume true" not in err, err[-2000:]
        assert rundir.lock_holder(stage[0]) is None  # (the stage ended before its pipeline)
    finally:  # (nothing left running, whatever failed)
        if proc.poll() is None:
            proc.kill()
        if rundir.lock_holder(stage[0]):
            os.kill(int(pid), signal.SIGKILL)


def wait_for(paths, proc, seconds=60):
    """Until every path exists (the stages' pid files), proc ends or the time is up; a path still
    missing fails the test with proc's last words."""
    deadline = time.time() + seconds
    while not all(p.exists() for p in paths) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert all(p.exists() for p in paths), proc.communicate()[1][-2000:]


def sleeper_run(tmp_path, seconds=30):
    """A stand-in for a stage: writes `ready` once under way, sleeps, and writes `said` if it is
    stopped with Ctrl-C (SIGINT)."""
    script, said, ready = tmp_path / "sleeper.py", tmp_path / "said", tmp_path / "ready"
    script.write_text("import sys, time\ntry:\n"
                      f"    open({str(ready)!r}, 'w').close()\n    time.sleep({seconds})\n"
                      "except KeyboardInterrupt:\n"
                      f"    open({str(said)!r}, 'w').write('stopped')\n    sys.exit(130)\n")
    return script, said, ready


def test_sigterm_stops_the_runs_of_a_lab_started_in_the_background(tmp_path, monkeypatch):
    """A lab started with `&` from a script has SIGINT ignored, and so had its runs: SIGTERM to the
    lab sent them SIGINT, which they ignored, and the lab waited until they had trained to their
    end. Its runs take SIGINT as Ctrl-C again."""
    import signal
    script, said, ready = sleeper_run(tmp_path)
    runs = {"a": ([str(script)], [], str(tmp_path / "runs" / "a" / "DONE"))}
    cfg = lab.Config(out=str(tmp_path / "runs"), jobs=1)
    monkeypatch.setattr(lab.time, "sleep", ctrl_c_once(ready))  # (SIGTERM, taken as Ctrl-C)
    was = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (what `lab.py &` in a script inherits)
    distributed.interrupt_on_sigterm()  # (as lab.py's main does)
    t0 = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            lab.execute(runs, cfg)
    finally:
        for signum, handler in was.items():
            signal.signal(signum, handler)
        distributed.SIGINT_IGNORED_AT_START = False
    assert said.read_text() == "stopped" and time.time() - t0 < 20


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (the lost one)
def test_a_sigterm_taken_inside_a_finalizer_stops_the_lab(capsys):
    """The lab's (or the pipeline's) SIGTERM handler raised its KeyboardInterrupt inside a __del__
    the garbage collector called: "Exception ignored", and the lab, every further signal dropped
    by then, ran its runs on to their end. It reaches the lab's stop now, and not between starting
    a run and recording it (stop_signals_deferred holds it as it holds a SIGTERM: an orphan run
    otherwise). A SIGALRM handler of the program's own is left alone (the interrupt stays lost)."""
    import signal

    class TakesTheSigterm:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # (its handler runs here, inside __del__)
    was = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    distributed.interrupt_on_sigterm()  # (as lab.py's main does)
    t0, recorded = time.time(), []
    try:
        with pytest.raises(SystemExit) as stop, common.user_errors(interrupted=lab.INTERRUPTED):
            TakesTheSigterm()  # (dropped at once: its __del__ takes the SIGTERM)
            with distributed.stop_signals_deferred():  # (the lab: start a run, then record it)
                time.sleep(0.05)  # (a slow start: the 10 ms timer fires in here)
                recorded.append("run")
            while time.time() - t0 < 5:  # (the lab's loop)
                time.sleep(0.01)
        assert stop.value.code == 130 and time.time() - t0 < 2 and recorded == ["run"]
        assert capsys.readouterr().err == lab.INTERRUPTED + "\n"
        own = lambda signum, frame: None
        signal.signal(signal.SIGALRM, own)
        distributed.interrupt_on_sigterm()
        with common.user_errors(interrupted=lab.INTERRUPTED):
            TakesTheSigterm()
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGALRM) is own
    finally:
        for signum, handler in was.items():
            signal.signal(signum, handler)


def test_an_error_in_the_lab_stops_its_runs(tmp_path, monkeypatch):
    """Any error of the lab's own (here a run's log path that is a folder: one line, exit 2) left
    the runs already started going on as orphans; they are stopped and waited for now."""
    script, said, ready = sleeper_run(tmp_path)
    runs = {"a": ([str(script)], [], str(tmp_path / "runs" / "a" / "DONE")),
            "b": ([str(script)], [], str(tmp_path / "runs" / "b" / "DONE"))}
    (tmp_path / "runs" / "b.log").mkdir(parents=True)
    started = []
    popen = lab.subprocess.Popen

    def recorded(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(lab.subprocess, "Popen", recorded)
    cfg = lab.Config(out=str(tmp_path / "runs"), jobs=2)
    try:
        with pytest.raises(IsADirectoryError):
            lab.execute(runs, cfg)
        assert len(started) == 1 and started[0].poll() is not None
    finally:  # (nothing left running, whatever failed)
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_run_that_ends_well_as_the_lab_is_stopped_is_kept(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM to the lab just after a run ended well, before the lab's poll saw it (or
    in the stop's 2 s grace wait): the run got no DONE and no record, and the next lab ran it
    again from nothing. It is kept now."""
    ready, bye = tmp_path / "ready", tmp_path / "bye"
    script = tmp_path / "quick.py"
    script.write_text(f"import time\nopen({str(ready)!r}, 'w').close()\ntime.sleep(0.5)\n"
                      f"open({str(bye)!r}, 'w').close()\n")  # (then it ends well)
    runs = {"a": ([str(script)], [], str(tmp_path / "runs" / "a" / "DONE"))}
    cfg = lab.Config(out=str(tmp_path / "runs"), jobs=1)

    def ended(real_sleep):  # (the run has exited by the time of the Ctrl-C)
        while not bye.exists():
            real_sleep(0.01)
        real_sleep(0.5)
    monkeypatch.setattr(lab.time, "sleep", ctrl_c_once(ready, ended))
    counted = []  # (the wall clock's count of runs made: the kept one was left out)
    with pytest.raises(KeyboardInterrupt):
        lab.execute(runs, cfg, counted.append)
    assert lab.is_done(runs["a"][2]) and counted == [1]
    assert json.load(open(lab.run_record(cfg, "a")))["command"] == [str(script)]


def test_a_terminals_ctrl_c_reaches_a_lab_run_once(tmp_path, monkeypatch):
    """Ctrl-C in a terminal reaches the lab and its runs at once; the lab then sent its runs a
    second one, which could cut their last words (the line saying how to go on) into a traceback.
    A run that ends on its own within a moment is not interrupted again."""
    import signal
    counted, ready = tmp_path / "count", tmp_path / "ready"
    script = tmp_path / "counter.py"
    script.write_text("import os, signal, sys, time\nn = []\n"
                      "def count(*a):\n    n.append(1)\n"
                      f"    open({str(counted)!r}, 'w').write(str(len(n)))\n"
                      "signal.signal(signal.SIGINT, count)\n"
                      f"open({str(ready)!r}, 'w').write(str(os.getpid()))\n"
                      "while not n:\n    time.sleep(0.01)\n"
                      "time.sleep(0.5)\nsys.exit(130)\n")  # (its last words take a moment)
    runs = {"a": ([str(script)], [], str(tmp_path / "runs" / "a" / "DONE"))}
    cfg = lab.Config(out=str(tmp_path / "runs"), jobs=1)

    def terminal(real_sleep):  # (the terminal's Ctrl-C reaches the run too, taken before the lab's)
        while not ready.read_text():  # (its pid, written once the file is made)
            real_sleep(0.01)
        os.kill(int(ready.read_text()), signal.SIGINT)
        while not counted.exists():  # (a second one sent before it is taken would merge into it)
            real_sleep(0.01)
    monkeypatch.setattr(lab.time, "sleep", ctrl_c_once(ready, terminal))
    with pytest.raises(KeyboardInterrupt):
        lab.execute(runs, cfg)
    assert counted.read_text() == "1"


def test_ppo_curves_read_done_runs_alone(tmp_path):
    """A PPO run cut off while it wrote its metrics (half a last line) ended --report_only in a
    JSONDecodeError traceback; a run not done is not the run reported, and is not read."""
    cfg = lab.Config(out=str(tmp_path), seeds=(0,), rlhf_seeds=1)
    run = tmp_path / "rlhf" / "ppo-facts-s0"
    run.mkdir(parents=True)
    row = {"step": 1, "length": 10.0, "hallucinations": 0.5, "kl": 0.1, "score": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(row) + '\n{"step": 2, "length": 1')
    assert lab_report.ppo_curves(cfg)["length"]["facts"] == [[]]
    (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (run / "DONE").write_text("")
    assert lab_report.ppo_curves(cfg)["length"]["facts"][0] != []


# a stand-in stage or run: says its pid once under way, sleeps, says 'stopped' on Ctrl-C (SIGINT)
SIGNAL_SLEEPER = """import os, sys, time
name, folder = sys.argv[1], sys.argv[2]
try:
    open(os.path.join(folder, name + '.pid.tmp'), 'w').write(str(os.getpid()))
    os.replace(os.path.join(folder, name + '.pid.tmp'), os.path.join(folder, name + '.pid'))
    time.sleep(60)
except KeyboardInterrupt:
    open(os.path.join(folder, name + '.stopped'), 'w').close()
    sys.exit(130)
"""

# pipeline.py or lab.py as its __main__ block runs it, its stages or runs two sleepers side by side
SIGNAL_DRIVER = """import os, sys
here, script, sleeper, folder, out = sys.argv[1:6]
sys.path.insert(0, here)
import common, distributed, lab, pipeline
stage = lambda name: [sleeper, name, folder]
pipeline.stage_commands = lambda cfg: {{n: stage(n) for n in pipeline.STAGES}}
runs = {{n: (stage(n), [], os.path.join(out, n, 'DONE')) for n in ('lrv', 'dpo')}}
lab.run_lab = lambda cfg: lab.execute(runs, cfg)
module = {{'pipeline': pipeline, 'lab': lab}}[script]
cfg = common.parse_config(module.Config, sys.argv[6:])
distributed.interrupt_on_sigterm()
with common.user_errors():
    module.main(cfg)
"""


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("script", ["pipeline", "lab"])
def test_a_second_signal_while_stopping_still_stops_every_stage(script, background, tmp_path):
    """A second SIGTERM (or SIGINT) in the stop's 2 s grace wait raised KeyboardInterrupt inside
    it: no stage got SIGINT, they trained on (the pipeline waited for lrv and dpo to end, the lab
    left its runs as orphans), and the stages' own "--resume true" line was printed. Signals after
    the first are dropped now: every stage gets SIGINT and is waited for, one line, exit 130.
    Started with SIGINT ignored (`pipeline.py &` in a script), the pipeline's stages inherited it
    and ignored the SIGINT that stops them: it waited for them to train to their end. (A review:
    given back SIGINT, they would die of a Ctrl-C meant for the script: a session of their own.)"""
    import signal
    import subprocess
    import sys
    folder, out = tmp_path / "said", tmp_path / "ckpt"
    folder.mkdir()
    fake_run(out / "sft", 3, 3)  # (the pipeline's later stages read it)
    sleeper, driver = tmp_path / "sleeper.py", tmp_path / "driver.py"
    sleeper.write_text(SIGNAL_SLEEPER)
    driver.write_text(SIGNAL_DRIVER.format())
    flags = {"pipeline": ["--stages", "lrv,dpo", "--world", str(tmp_path / "w")],
             "lab": ["--jobs", "2"]}[script]
    # (as a script's `&` starts it: SIGINT ignored)
    ignored = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, "
               "signal.SIG_IGN); os.execv(sys.executable, [sys.executable] + sys.argv[1:])"]
    proc = subprocess.Popen([*(ignored if background else [sys.executable]), str(driver), HERE,
                             script, str(sleeper), str(folder), str(out), "--out", str(out),
                             *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [folder / f"{n}.pid" for n in ("lrv", "dpo")]
    try:
        wait_for(pids, proc)
        # started in the background, the stages are in a session of their own: a Ctrl-C meant
        # for the script (its process group) does not reach them, as when they ignored it
        groups = {os.getpgid(int(p.read_text())) for p in pids}
        assert (os.getpgid(proc.pid) in groups) != background, (groups, os.getpgid(proc.pid))
        t0 = time.time()
        # (through the stop's grace waits, and on while it exits: Python's handlers are put back
        # to the default then, and one more SIGTERM killed it)
        for signum in [signal.SIGTERM, signal.SIGINT] * 40:
            if proc.poll() is not None:
                break
            proc.send_signal(signum)
            time.sleep(0.2)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130 and time.time() - t0 < 20, err[-2000:]
        assert all((folder / f"{n}.stopped").exists() for n in ("lrv", "dpo")), err[-2000:]
        assert err.count("interrupted:") == 1 and "--resume true" not in err, err[-2000:]
    finally:  # (nothing left running, whatever failed)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if p.exists() and not (folder / p.name.replace(".pid", ".stopped")).exists():
                try:
                    os.kill(int(p.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


# a stand-in stage or run that ends with its pipeline or lab as the stages do (setup_dist, eval)
PARENT_SLEEPER = """import os, sys, time
name, folder = sys.argv[1], sys.argv[2]
sys.path.insert(0, {here!r})
import common
import distributed
import rundir
distributed.end_with_the_launcher()
open(os.path.join(folder, name + '.pid.tmp'), 'w').write(str(os.getpid()))
os.replace(os.path.join(folder, name + '.pid.tmp'), os.path.join(folder, name + '.pid'))
time.sleep(60)
"""


@pytest.mark.parametrize("script", ["pipeline", "lab"])
def test_stages_end_with_a_pipeline_or_lab_killed_outright(script, tmp_path):
    """pipeline.py or lab.py killed outright (kill -9, the OOM killer, a scheduler's hard limit):
    its stages or runs trained on as orphans, up to tens of minutes for a reward model, holding
    their folders (the next lab refused them, then ran them again). They die with it now, as
    torchrun's ranks die with their launcher."""
    import signal
    import subprocess
    import sys
    folder, out = tmp_path / "said", tmp_path / "ckpt"
    folder.mkdir()
    fake_run(out / "sft", 3, 3)  # (the pipeline's later stages read it)
    sleeper, driver = tmp_path / "sleeper.py", tmp_path / "driver.py"
    sleeper.write_text(PARENT_SLEEPER.format(here=HERE))
    driver.write_text(SIGNAL_DRIVER.format())
    flags = {"pipeline": ["--stages", "lrv,dpo", "--world", str(tmp_path / "w")],
             "lab": ["--jobs", "2"]}[script]
    proc = subprocess.Popen([sys.executable, str(driver), HERE, script, str(sleeper), str(folder),
                             str(out), "--out", str(out), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [folder / f"{n}.pid" for n in ("lrv", "dpo")]
    alive = lambda pid: os.path.exists(f"/proc/{pid}") and \
        open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"
    try:
        wait_for(pids, proc)
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while any(alive(p.read_text()) for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(p.read_text()) for p in pids)
    finally:  # (nothing left running, whatever failed)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if p.exists() and alive(p.read_text()):
                os.kill(int(p.read_text()), signal.SIGKILL)


def test_ppo_without_rm_in_stages_refuses_a_missing_or_replaced_reward_model(tmp_path,
                                                                              monkeypatch):
    """--stages sft,ppo on an empty --out trained SFT for minutes, then ppo failed on the missing
    reward model; after the SFT was trained again (rm not in --stages), ppo failed with a
    misleading 'base ... holds other weights'. Both are refused before any stage starts."""
    import pipeline
    started = []
    monkeypatch.setattr(pipeline, "run_stages", lambda *args: started.append(args))
    out, world = tmp_path / "ckpt", str(tmp_path / "w")
    argv = ["--out", str(out), "--world", world, "--model", "tiny"]
    code, _, err = run_cli("pipeline", argv + ["--stages", "sft,ppo"], strict=True)
    assert code == 2 and f"ppo reads the reward model {out / 'rm'}, which is not there: add rm " \
        "to --stages" in err, err
    assert not out.exists()
    for i, stage in enumerate(("rm", "sft")):  # (the SFT trained again after the reward model)
        ck = fake_run(out / stage, 3, 3)
        os.utime(ck / "config.json", (1000 + i, 1000 + i))
    code, _, err = run_cli("pipeline", argv + ["--stages", "sft,ppo", "--overwrite", "true"],
                           strict=True)
    assert code == 2 and "trained on the SFT model these stages replace: add rm" in err, err
    assert sorted(os.listdir(out)) == ["rm", "sft"]  # (nothing moved aside)
    code, _, err = run_cli("pipeline", ["--out", str(out), "--world", world, "--stages", "ppo"],
                           strict=True)
    assert code == 2 and f"{out / 'rm'} was trained before {out / 'sft'}'s newest" in err, err
    assert not started
    os.utime(out / "rm" / "checkpoint-000003" / "config.json", (2000, 2000))  # (trained after it)
    code, _, err = run_cli("pipeline", ["--out", str(out), "--world", world, "--stages", "ppo"],
                           strict=True)
    assert code == 0 and len(started) == 1, err


def test_pipeline_refuses_an_out_in_the_world_before_writing(tmp_path, monkeypatch):
    """--out inside (or equal to) --world: the sft stage refused it, after the pipeline had left
    its .lock among the world's files. Refused before anything is written now."""
    import pipeline
    started = []
    monkeypatch.setattr(pipeline, "run_stages", lambda *args: started.append(args))
    world = tmp_path / "w"
    for out, says in ((world, "is the --world folder"), (world / "ck", "lies inside the --world")):
        code, _, err = run_cli("pipeline", ["--out", str(out), "--world", str(world), "--stages",
                                            "sft", "--model", "tiny"], strict=True)
        assert code == 2 and f"--out {out} {says}" in err, err
        assert not world.exists() and not started


def test_a_stage_killed_by_a_signal_is_named_so(tmp_path, capsys):
    """A stage killed by a signal read 'failed with exit code -9', and the pipeline exited 247
    (-9 as a byte); the signal is named, and the exit code is a shell's 128 + N."""
    import pipeline
    killed = tmp_path / "killed.py"
    killed.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    cfg = pipeline.Config(stages=("sft",), jobs=1)
    with pytest.raises(SystemExit) as e:
        pipeline.run_stages(cfg, {"sft": [str(killed)]}, "/", {})
    assert e.value.code == 137
    assert capsys.readouterr().err == ("error: stage 'sft' was killed by signal SIGKILL; later "
                                       "stages not run\n")
    killed.write_text("import sys\nsys.exit(3)\n")  # (a stage's own code: passed on as it is)
    with pytest.raises(SystemExit) as e:
        pipeline.run_stages(cfg, {"sft": [str(killed)]}, "/", {})
    assert e.value.code == 3
    assert capsys.readouterr().err == ("error: stage 'sft' failed with exit code 3; later stages "
                                       "not run\n")


def test_stale_adapters_are_judged_by_their_bases_fingerprint_not_file_times(tmp_path, tiny_sft):
    """A tree copied with a plain `cp -r` (every file time reset, in no set order) was refused as
    stale, and a replaced SFT could pass where the times happened to fall right. Adapters (DPO,
    PPO, the reward model) record the fingerprint of their base's weights: it decides."""
    import shutil
    import checkpoint
    import pipeline
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_sft, out / "sft", ignore=shutil.ignore_patterns(".lock"))
    sft_ck = checkpoint.latest_checkpoint(str(out / "sft"))
    ck = fake_run(out / "dpo", 2, 2)
    config = json.loads((ck / "config.json").read_text())
    sft_time = os.path.getmtime(os.path.join(sft_ck, "config.json"))
    cfg = pipeline.Config(out=str(out), stages=("eval",))
    fingerprint = checkpoint.base_fingerprint(checkpoint.base_weights_dir(sft_ck))
    for recorded, later, stale in ((fingerprint, -100, False), ("0" * 32, 100, True)):
        (ck / "config.json").write_text(json.dumps({**config, "base_fingerprint": recorded}))
        os.utime(ck / "config.json", (sft_time + later, sft_time + later))
        if stale:
            with pytest.raises(common.ConfigError, match="ckpt/dpo was trained before"):
                pipeline.refuse_stale_models(cfg, pipeline.compared_models(cfg))
        else:  # (its SFT's weights, though its file is older: copied first)
            pipeline.refuse_stale_models(cfg, pipeline.compared_models(cfg))


@contextlib.contextmanager
def sigterm_right_after_popen(module, monkeypatch, ready):
    """module's Popen starts its child, then SIGTERM reaches this process once the child is under
    way (the moment before the caller records it), taken as lab.py's and pipeline.py's main
    blocks take it; yields the children started, killed after the block."""
    import signal
    popen, started = module.subprocess.Popen, []

    def popen_then_sigterm(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        return started[-1]
    monkeypatch.setattr(module.subprocess, "Popen", popen_then_sigterm)
    was = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    distributed.interrupt_on_sigterm()
    try:
        yield started
    finally:
        for signum, handler in was.items():
            signal.signal(signum, handler)
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_signal_between_starting_a_run_and_recording_it_still_stops_it(tmp_path, monkeypatch):
    """SIGTERM landing just after the lab started a run and before it recorded it raised there:
    the stop did not know the run, which trained on as an orphan (seen once in CI under load: an
    LRV run of 100000 steps left running). The signal is taken once the run is recorded."""
    script, said, ready = sleeper_run(tmp_path)
    runs = {"a": ([str(script)], [], str(tmp_path / "runs" / "a" / "DONE"))}
    cfg = lab.Config(out=str(tmp_path / "runs"), jobs=1)
    with sigterm_right_after_popen(lab, monkeypatch, ready) as started:
        with pytest.raises(KeyboardInterrupt):
            lab.execute(runs, cfg)
        assert started and started[0].poll() is not None and said.read_text() == "stopped"


def test_a_signal_between_starting_a_stage_and_recording_it_still_stops_it(tmp_path,
                                                                           monkeypatch):
    """The pipeline's stages started in its main thread (SFT, eval, any with --jobs 1): a SIGTERM
    landing between Popen and recording the stage raised there, so the stop did not know the
    stage and left it training (the lab's runs had this fixed before)."""
    import pipeline
    script, said, ready = sleeper_run(tmp_path)
    pipeline._lane_failed.clear()  # (another test's failed stage: no lane would start one)
    try:
        with sigterm_right_after_popen(pipeline, monkeypatch, ready) as started:
            with pytest.raises(KeyboardInterrupt):
                pipeline.run_lane(("a",), {"a": [str(script)]}, "/", None, {})
            pipeline.stop_stages()  # (as pipeline.main does on the interrupt)
            assert started and started[0].poll() is not None and said.read_text() == "stopped"
    finally:
        pipeline._stopping.clear()
        pipeline._running.clear()


def test_a_lab_figure_that_cannot_be_written_leaves_the_one_before(tmp_path, monkeypatch):
    """The lab's figures were saved in place: a full disk left a torn PNG (and a line naming no
    file). Written whole now: the figure before stays, no temp file, the line names the figure."""
    import errno
    path = tmp_path / "b.png"
    g = {"x": {"m1": [1.0, 2.0]}}
    lab_report.bar_plot(str(path), "t", g, ["m1"], ["x"])
    before = path.read_bytes()
    real = Image.Image.save

    def full(img, fp, *args, **kwargs):
        real(img, fp, *args, **kwargs)  # (part of it on disk, as a full disk leaves it)
        with open(fp, "r+b") if isinstance(fp, str) else contextlib.nullcontext(fp) as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError) as e:
        lab_report.bar_plot(str(path), "t", {"x": {"m1": [5.0, 6.0]}}, ["m1"], ["x"])
    assert e.value.filename == str(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["b.png"]


def test_an_output_folder_probe_that_cannot_be_written_is_removed(tmp_path, monkeypatch):
    """ensure_writable's probe file was left behind when its write failed (a full disk)."""
    import builtins
    real = builtins.open
    monkeypatch.setattr(rundir, "open", lambda p, *a, **k: FullDisk(real(p, *a, **k)),
                        raising=False)
    with pytest.raises(common.ConfigError, match="cannot be written .No space left"):
        rundir.ensure_writable(str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == []
