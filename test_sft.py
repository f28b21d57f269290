"""sft.py end to end on the tiny world: checkpoints that load, --resume, alignment first,
LoRA and file data, bad input ending in one line and exit code 2."""
import json
import os

import pytest
import torch

from checkpoint import latest_checkpoint, load_checkpoint
from conftest import calls_outside_autocast, run_cli


def test_sft_cli_writes_loadable_checkpoint_and_resume_continues(tiny_world, tiny_sft, tmp_path):
    ck = latest_checkpoint(tiny_sft)
    assert ck.endswith("checkpoint-000003")
    load_checkpoint(tiny_sft)  # a run dir resolves to its newest checkpoint
    assert os.path.exists(os.path.join(ck, "tokenizer.json"))
    assert os.path.exists(os.path.join(ck, "trainer_state.pt"))
    rows = [json.loads(line) for line in open(os.path.join(tiny_sft, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    # resume: a 3-step run continued to 5 steps equals an uninterrupted 5-step run, bitwise. The
    # 3-step run is made here, not copied from tiny_sft: at 2 threads the first training run of a
    # fresh process (tiny_sft's, when this test runs alone) ends a few ulps away from later ones
    # about once in 30 (MKL's matrix products; gone with MKL_CBWR or one thread: README,
    # Reliability), which is not resume's doing; every later run in the process is bitwise the same.
    args = ["--model", "tiny", "--world", tiny_world, "--batch_size", "8", "--align_steps", "1",
            "--read_steps", "1", "--report", "false", "--save_every", "3"]
    out = str(tmp_path / "resumed")
    code, _, err = run_cli("sft", args + ["--max_steps", "3", "--out", out])
    assert code == 0, err
    resume = ["--max_steps", "5", "--out", out, "--resume", "true", "--save_every", "1"]
    code, stdout, err = run_cli("sft", args + resume)
    assert code == 0, err
    assert "resumed from" in stdout and "at step 3" in stdout
    # checkpoints 4 and 5 are the two kept, and 3 stays too: it ended the 3-step run, and later
    # stages started from it name it as their base (it was deleted, and they no longer loaded)
    names = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert names == ["checkpoint-000003", "checkpoint-000004", "checkpoint-000005"]
    code, _, err = run_cli("sft", args + ["--max_steps", "5", "--out", str(tmp_path / "straight")])
    assert code == 0, err
    a = load_checkpoint(out).state_dict()
    b = load_checkpoint(str(tmp_path / "straight")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_aligns_first_on_shapes_from_scratch(tiny_world, tiny_sft, tmp_path):
    """A fresh model on Shapes: stage 1 (plain-template captions from align.json), stage 2 (the
    reading conversations of sft_read.json), stage 3 (sft.json at --instruct_lr), each with its own
    warmup and fresh Adam moments; --read_steps 0 leaves two stages; a model given by --init
    skips both first stages."""
    shared = ["--world", tiny_world, "--batch_size", "4", "--warmup", "2", "--report", "false",
              "--log_every", "1", "--eval_every", "0"]
    args = ["--model", "tiny", "--align_batch_size", "8", *shared]  # (a fresh model's flags)
    out = str(tmp_path / "three")
    three = ["--max_steps", "7", "--align_steps", "2", "--read_steps", "2", "--instruct_lr", "1e-2",
             "--instruct_warmup", "1", "--out", out]
    code, stdout, err = run_cli("sft", args + three)
    assert code == 0, err
    assert "2 alignment + 2 reading + 3 instruction steps" in stdout
    metrics = open(os.path.join(out, "metrics.jsonl"))
    rows = [json.loads(line) for line in metrics if '"loss"' in line]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 3, 3, 3]
    lrs = [r["lr"] for r in rows]
    # warmup restarts at stages 1 and 2 (--lr, --warmup 2); stage 3 peaks at --instruct_lr at once
    assert lrs[0] == lrs[2] < lrs[1] == lrs[3]
    assert lrs[4] == 1e-2 and lrs[6] < lrs[4]
    state_file = os.path.join(out, "checkpoint-000007", "trainer_state.pt")
    state = torch.load(state_file, weights_only=False)
    # fresh Adam moments at stage 3
    assert {float(v["step"]) for v in state["optimizer"]["state"].values()} == {3.0}
    out = str(tmp_path / "two")
    two = ["--max_steps", "4", "--align_steps", "2", "--read_steps", "0", "--out", out]
    code, stdout, err = run_cli("sft", args + two)
    assert code == 0, err
    assert "2 alignment + 2 instruction steps" in stdout
    metrics = open(os.path.join(out, "metrics.jsonl"))
    rows = [json.loads(line) for line in metrics if '"loss"' in line]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2]
    lrs = [r["lr"] for r in rows]
    assert lrs[::2] == [lrs[0]] * 2 and lrs[1] > lrs[0]  # --lr in both: no reading stage
    init = ["--max_steps", "2", "--init", tiny_sft, "--out", str(tmp_path / "init")]
    code, stdout, err = run_cli("sft", shared + init)
    assert code == 0, err
    assert "alignment" not in stdout
    init_rows = [json.loads(line) for line in open(tmp_path / "init" / "metrics.jsonl")]
    assert all("stage" not in r for r in init_rows)
    plain = ["--max_steps", "2", "--template", "plain", "--out", str(tmp_path / "plain")]
    code, _, err = run_cli("sft", args + plain)
    # multi-turn conversations under the caption template
    assert code == 2 and len(err.strip().splitlines()) == 1
    # (named in its file: it read 'record sft_000000', the id as if the number, and no file)
    assert "sft.json: record 0 (id 'sft_000000'): field 'conversations': the plain " in err, err
    assert "one human turn" in err


def test_sft_lora_and_file_data(tiny_world, tmp_path):
    out = str(tmp_path / "lora")
    # an empty file beside another adds nothing (VIGC's generated file after a weak run); only a
    # --data of nothing but empty files is refused (test_reliability: sft-no-records)
    empty = _write(tmp_path / "vig_only.json", [])
    argv = ["--model", "tiny", "--data", os.path.join(tiny_world, "sft.json") + f",{empty}:4",
            "--image_folder", tiny_world, "--max_steps", "2", "--batch_size", "4", "--lora_r", "4",
            "--out", out, "--report", "false", "--world", tiny_world]
    code, stdout, err = run_cli("sft", argv)
    assert code == 0, err
    m = load_checkpoint(out)
    assert not m.adapters  # the SFT adapter is merged into the weights that later stages start from
    # --resume on the finished run: its last checkpoint holds the merged weights and no optimizer
    # state; resuming there trained a fresh random adapter on top, unlike the straight run
    before = sorted(os.listdir(out))
    code, _, err = run_cli("sft", argv + ["--max_steps", "3", "--resume", "true"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "this run finished and merged its 'sft' adapter" in err and "--init" in err
    assert sorted(os.listdir(out)) == before


def _write(path, obj):
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_sft_bad_input_one_line_exit_2(tiny_world, tmp_path):
    img = os.path.join(tiny_world, "images", "train", "000000.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good_conv = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Yes."}]
    empty_answer = [good_conv[0], {"from": "gpt", "value": " "}]
    cases = {
        "missing image": ([{"id": "a", "image": "nope.png", "conversations": good_conv}],
                          "field 'image'"),
        "undecodable image": ([{"id": "a", "image": str(broken), "conversations": good_conv}],
                              "cannot decode"),
        "bad json": ("[{\"id\": ", "invalid JSON"),
        "no conversations": ([{"id": "a", "image": img}], "field 'conversations'"),
        "not alternating": ([{"id": "a", "image": img, "conversations": good_conv[:1] * 2}],
                            "expected 'gpt'"),
        "empty answer": ([{"id": "a", "image": img, "conversations": empty_answer}], "empty"),
        "image tag text-only": ([{"id": "a", "conversations": good_conv}], "<image>"),
    }
    for name, (content, needle) in cases.items():
        f = _write(tmp_path / "data.json", content)
        out = tmp_path / "out"
        code, _, err = run_cli("sft", ["--model", "tiny", "--data", f, "--max_steps", "1",
                                       "--out", str(out), "--report", "false",
                                       "--image_folder", str(tmp_path), "--world", tiny_world])
        assert code == 2, name
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert needle in err and "data.json" in err, (name, err)
        # stopped before training
        assert not out.exists(), name  # (nothing written: the folder it made is gone again)


def test_lora_with_dropout_resumes_bitwise(tiny_world, tiny_sft, tmp_path):
    """A LoRA run (dropout 0.05, the default) stopped after checkpoint 2 and resumed ends bitwise
    where the straight run ends: loading the model for the resume drew from the random streams
    load_resume had just restored, so the dropout masks after it differed (1.7e-4 apart)."""
    import shutil
    args = ["--init", tiny_sft, "--world", tiny_world, "--max_steps", "4", "--save_every", "2",
            "--report", "false", "--eval_every", "0", "--batch_size", "4", "--lora_r", "4"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for out in (straight, resumed):
        code, _, err = run_cli("sft", args + ["--out", out])
        assert code == 0, err
    shutil.rmtree(os.path.join(resumed, "checkpoint-000004"))  # as if killed after step 2's save
    code, stdout, err = run_cli("sft", args + ["--out", resumed, "--resume", "true"])
    assert code == 0 and "at step 2" in stdout, err
    a, b = load_checkpoint(straight).state_dict(), load_checkpoint(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_says_none_for_a_type_without_questions(tiny_world, tiny_sft, tmp_path, capsys):
    """A held-out type with no questions (a world edited by hand, or one written before shapes.py
    refused it) is reported as null and 'n/a', not as accuracy 0.00."""
    import shutil

    import common
    import sft
    world = tmp_path / "w"
    shutil.copytree(tiny_world, world)
    (world / "test_relation.json").write_text("[]")
    model, tokenizer = common.load_model_and_tokenizer(tiny_sft)
    cfg = sft.Config(world=str(world), out=str(tmp_path), report_n=2)
    rows = sft.report(model, tokenizer, cfg)
    assert rows["relation"] is None and isinstance(rows["count"], float), rows
    assert json.load(open(tmp_path / "report.json"))["relation"] is None
    assert "relation n/a" in capsys.readouterr().out
    # a disk full while it is written: the report there before is kept whole (it was cut to 0
    # bytes; the lab takes a run whose report is there as done, and read it as no result)
    kept = (tmp_path / "report.json").read_text()

    def half(obj, f, **kwargs):
        f.write("{")
        raise OSError(28, "No space left on device")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(common.json, "dump", half)
        with pytest.raises(OSError):
            sft.report(model, tokenizer, cfg)
    assert (tmp_path / "report.json").read_text() == kept
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_lrv_reads_the_worlds_neg_ratio_unless_given(tiny_sft, tmp_path):
    """`sft.py --lrv true` takes the world's --neg_ratio (it took 0.5 whatever the world said, and
    wrote a second LRV file beside the world's); --neg_ratio given: that share."""
    import shapes
    from conftest import TINY_WORLD
    world = str(tmp_path / "w")
    shapes.write_world(world, seed=0, neg_ratio=0.0, **TINY_WORLD)
    args = ["--init", tiny_sft, "--world", world, "--lrv", "true", "--max_steps", "1",
            "--batch_size", "4", "--report", "false"]
    code, _, err = run_cli("sft", args + ["--out", str(tmp_path / "a")])
    assert code == 0, err
    assert os.listdir(os.path.join(world, "lrv")) == ["neg0.0-seed0.json"]
    state = torch.load(os.path.join(latest_checkpoint(str(tmp_path / "a")), "trainer_state.pt"),
                       weights_only=False)
    assert state["run_config"]["neg_ratio"] == 0.0
    code, _, err = run_cli("sft", args + ["--out", str(tmp_path / "b"), "--neg_ratio", "0.5"])
    assert code == 0, err
    assert sorted(os.listdir(os.path.join(world, "lrv"))) == ["neg0.0-seed0.json",
                                                              "neg0.5-seed0.json"]


def test_a_stage_without_steps_does_not_check_its_batch(tiny_world, tmp_path):
    """--max_steps 1 leaves the alignment stage no step: its --align_batch_size is not split into
    --grad_accum micro-batches, so it is not refused for that (it was)."""
    argv = ["--model", "tiny", "--world", tiny_world, "--max_steps", "1", "--align_batch_size",
            "1", "--grad_accum", "2", "--batch_size", "2", "--report", "false", "--out",
            str(tmp_path / "one")]
    code, _, err = run_cli("sft", argv)
    assert code == 0, err


def test_resume_refuses_a_max_steps_that_moves_the_stages(tiny_world, tmp_path):
    """The stage boundaries come from --max_steps (alignment at most half, reading leaves the last
    step to --data): a 2-step run resumed to 6 steps ran reading again after instruction tuning."""
    args = ["--model", "tiny", "--world", tiny_world, "--batch_size", "4", "--align_steps", "2",
            "--read_steps", "2", "--report", "false", "--save_every", "1", "--out",
            str(tmp_path / "run")]
    assert run_cli("sft", args + ["--max_steps", "2"])[0] == 0  # 1 alignment + 1 instruction
    before = sorted(os.listdir(tmp_path / "run"))
    code, _, err = run_cli("sft", args + ["--max_steps", "6", "--resume", "true"])
    assert code == 2 and "--max_steps 6 on --resume" in err and "planned with 1 + 0" in err, err
    assert sorted(os.listdir(tmp_path / "run")) == before


@pytest.mark.parametrize("name,flag", [("sft_read.json", "read_data"), ("align.json",
                                                                         "align_data")])
def test_val_data_naming_an_earlier_stages_file_is_refused(tiny_world, tmp_path, name, flag):
    """--val_data naming a --data file is refused (held-out scores of training records), but the
    file a fresh model's reading or alignment stage trains on was taken as held-out data."""
    val = os.path.join(tiny_world, "..", os.path.basename(tiny_world), name)  # (another spelling)
    args = ["--model", "tiny", "--world", tiny_world, "--batch_size", "4", "--align_steps", "1",
            "--read_steps", "1", "--max_steps", "3", "--report", "false", "--val_data", val,
            "--out", str(tmp_path / "run")]
    code, _, err = run_cli("sft", args)
    assert code == 2 and f"--val_data {val}: the --{flag} file" in err, err
    assert not os.path.exists(tmp_path / "run")


def test_resume_after_a_kill_between_checkpoints_logs_each_step_once(tiny_world, tmp_path):
    """Rows of the steps after the newest checkpoint were kept, and the resumed run logged those
    steps again: metrics.jsonl held step 3 twice (lab.py reads its rows in order)."""
    import shutil
    out = tmp_path / "run"
    args = ["--model", "tiny", "--world", tiny_world, "--batch_size", "4", "--align_steps", "1",
            "--read_steps", "1", "--report", "false", "--save_every", "2", "--log_every", "1",
            "--max_steps", "3", "--out", str(out)]
    assert run_cli("sft", args)[0] == 0
    shutil.rmtree(out / "checkpoint-000003")  # killed after logging step 3, before its checkpoint
    code, _, err = run_cli("sft", args + ["--resume", "true"])
    assert code == 0, err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_sft_and_vigc_from_an_adapter_checkpoint_train_the_policy_it_holds(tiny_world, tiny_sft,
                                                                          tmp_path):
    """An --init whose active adapter holds the policy (a DPO LoRA run, an intermediate LoRA SFT
    checkpoint): with --lora_r > 0 the new adapter left it off, and the bare base was trained;
    one named like the run's was taken over with its old shape. Now the policy is merged first:
    at a learning rate of ~0 the result is the init's policy, not the bare base."""
    import shutil
    from checkpoint import save_checkpoint_files
    m = load_checkpoint(tiny_sft)
    m.add_adapter("dpo", 2, 4, 0.0, ("q", "v"))  # (as a DPO LoRA run leaves it)
    torch.manual_seed(0)
    for _, lin in m.lora_linears():
        for b in lin.lora["dpo"].B.values() if "dpo" in lin.lora else ():
            b.data.normal_(0, 0.5)
    m.set_adapter("dpo")
    init = str(tmp_path / "init")
    save_checkpoint_files(m, init)
    ck = latest_checkpoint(tiny_sft)
    for f in os.listdir(ck):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(ck, f), init)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    m.eval()
    with torch.no_grad():
        policy = m(None, ids)
        m.set_adapter(None)
        bare = m(None, ids)
    assert not torch.allclose(policy, bare, atol=1e-3)  # (the adapter matters)
    common = ["--init", init, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
              "--lr", "1e-12", "--lora_r", "4"]
    for script, extra in (("sft", ["--report", "false", "--lora_targets", "down"]),
                          ("vigc", ["--generate", "0"])):
        out = str(tmp_path / script)
        code, _, err = run_cli(script, common + extra + ["--out", out])
        assert code == 0, err
        trained = load_checkpoint(out).eval()
        with torch.no_grad():
            logits = trained(None, ids)
        assert torch.allclose(logits, policy, atol=1e-4), script


def test_a_fresh_model_takes_the_worlds_geometry(tiny_world, tmp_path):
    """A fresh --model on a world was built at the preset's 48 px / 16 px whatever the world's
    size: a 2 x 2 grid's 15 px cells straddled its patches, a 1023 px world's shapes shrank below a
    pixel, without a word. Now its image size is the world's and each patch a grid cell, with a
    note where that differs from the preset (none on the default geometry), in sft.py and
    vigc.py; a cell too large to be a patch is refused in one line."""
    import shapes
    small = dict(n_train=30, n_val=6, n_test=30, n_unlabeled=4, n_pref=8, n_povid=8, n_rl=8)
    grid2 = str(tmp_path / "grid2")
    shapes.write_world(grid2, image_size=30, grid=2, **small)
    base = ["--model", "tiny", "--max_steps", "2", "--batch_size", "4", "--report", "false"]
    code, stdout, err = run_cli("sft", base + ["--world", grid2, "--out", str(tmp_path / "s2")])
    assert code == 0, err
    c = load_checkpoint(str(tmp_path / "s2")).config
    assert (c.image_size, c.patch_size, c.num_image_tokens) == (30, 15, 4)
    assert ("note: a fresh --model tiny takes the world's geometry: 30 px images, 15 px patches "
            "(one per cell of its 2x2 grid), not the preset's 48 / 16") in stdout
    argv = ["--init", "", "--model", "tiny", "--max_steps", "1", "--batch_size", "4",
            "--generate", "0", "--world", grid2, "--out", str(tmp_path / "v2")]
    code, stdout, err = run_cli("vigc", argv)
    assert code == 0, err
    assert load_checkpoint(str(tmp_path / "v2")).config.image_size == 30
    assert "takes the world's geometry: 30 px images, 15 px patches" in stdout
    code, stdout, err = run_cli("sft", base + ["--world", tiny_world, "--out", str(tmp_path / "d")])
    assert code == 0, err
    c = load_checkpoint(str(tmp_path / "d")).config
    assert (c.image_size, c.patch_size) == (48, 16) and "geometry" not in stdout
    big = str(tmp_path / "big")
    shapes.write_world(big, image_size=192, **small)  # 64 px cells
    code, _, err = run_cli("sft", base + ["--world", big, "--out", str(tmp_path / "b")])
    assert code == 2 and err.strip() == (
        f"error: --world {big}: the world's --image_size 192 --grid 3 makes 64 px cells, and a "
        "fresh --model takes one patch per cell (at most 63 px): write a world with --image_size "
        "at most 189, or start from --init")
    assert not os.path.exists(os.path.join(tmp_path, "b", "checkpoint-000001"))


def test_an_empty_file_beside_others_in_data_is_said(tiny_world, tiny_sft, tmp_path):
    """An empty file among several in --data adds nothing (VIGC's generated files can be empty
    after a weak run) and is not refused, but it went by without a word."""
    empty = tmp_path / "none.json"
    empty.write_text("[]")
    data = f"{os.path.join(tiny_world, 'sft.json')},{empty}:4"
    code, out, err = run_cli("sft", ["--init", tiny_sft, "--data", data, "--image_folder",
                                     tiny_world, "--max_steps", "1", "--batch_size", "2",
                                     "--report", "false", "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert f"note: --data {empty}: no records, adds nothing to the training data" in out


def test_init_of_an_unfinished_run_is_said(tiny_world, tiny_sft, tmp_path):
    """--init of a run folder whose run stopped before its last step trained on its newest
    checkpoint without a word (pipeline.py refuses such a run; a stage run by hand says so)."""
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(tiny_sft, cut)
    config = cut / os.path.basename(latest_checkpoint(str(cut))) / "config.json"
    meta = json.load(open(config))
    meta["run_config"]["max_steps"] = 1200  # (as if stopped at step 3 of 1200)
    config.write_text(json.dumps(meta))
    argv = ["--world", tiny_world, "--max_steps", "1", "--batch_size", "2", "--report", "false"]
    code, out, err = run_cli("sft", ["--init", str(cut), *argv, "--out", str(tmp_path / "o")])
    assert code == 0 and f"note: --init {cut}: its run stopped at step 3 of 1200 (unfinished)" \
        in out, err
    code, out, err = run_cli("sft", ["--init", tiny_sft, *argv, "--out", str(tmp_path / "o2")])
    assert code == 0 and "unfinished" not in out, err
    # a run on its own --data reads no world, and says it too (it was silent there)
    own = ["--data", os.path.join(tiny_world, "sft.json"), "--image_folder", tiny_world]
    code, out, err = run_cli("sft", ["--init", str(cut), *argv[2:], *own,
                                     "--out", str(tmp_path / "o3")])
    assert code == 0 and f"note: --init {cut}: its run stopped at step 3 of 1200 (unfinished)" \
        in out, err


def test_init_without_tokenizer_files_reads_the_tokenizer_given(tiny_world, tiny_sft, tmp_path):
    # a LLaMA-style --init folder without tokenizer files: --tokenizer stands in for it, and the
    # run (and its resume, from a checkpoint that holds the tokenizer now) trains
    import shutil
    from checkpoint import resolve_checkpoint
    src = resolve_checkpoint(tiny_sft)
    init = tmp_path / "no_tok"
    init.mkdir()
    for f in os.listdir(src):
        if not f.startswith("tokenizer"):
            shutil.copy(os.path.join(src, f), init)
    out = str(tmp_path / "run")
    args = ["--init", str(init), "--tokenizer", src, "--world", tiny_world, "--batch_size", "4",
            "--report", "false", "--out", out]
    code, _, err = run_cli("sft", args + ["--max_steps", "1"])
    assert code == 0, err
    assert os.path.exists(os.path.join(latest_checkpoint(out), "tokenizer.json"))
    code, _, err = run_cli("sft", args + ["--max_steps", "2", "--resume", "true"])
    assert code == 0, err
    assert latest_checkpoint(out).endswith("2")


def test_resume_takes_a_path_spelled_otherwise_and_a_moved_folder(tiny_world, tiny_sft, tmp_path,
                                                                 monkeypatch):
    """--resume refused `--world w/` (tab completion's slash) for a run started with `--world w`
    ("field 'tokenizer' was 'w/tokenizer', now 'w//tokenizer'"), and `--init sft/` or an absolute
    path for a relative one; and a project folder moved (or mounted elsewhere) as "other data" (its
    files are recorded by absolute path). The same path, and the same files' contents in their
    places, go on (the second said); another file, or two files' contents swapped, are refused."""
    import shutil
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(tiny_world, project / "w")
    shutil.copytree(tiny_sft, project / "sft")
    monkeypatch.chdir(project)
    argv = ["--init", "sft", "--world", "w", "--batch_size", "4", "--report", "false",
            "--save_every", "1", "--out", "o"]
    assert run_cli("sft", argv + ["--max_steps", "1"])[0] == 0
    code, out, err = run_cli("sft", argv + ["--init", "sft/", "--world", "./w/", "--resume", "true",
                                            "--max_steps", "2"])
    assert code == 0 and "resumed from" in out, err
    shutil.move(project, tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    code, out, err = run_cli("sft", argv + ["--resume", "true", "--max_steps", "3"])
    assert code == 0, err
    assert "note: --resume: the run's data files are read from other paths now (the same " \
        "contents, sha256)" in out
    absolute = str(tmp_path / "moved" / "w") + "/"
    code, out, err = run_cli("sft", argv + ["--world", absolute, "--resume", "true",
                                            "--max_steps", "4"])
    assert code == 0 and "resumed from" in out, err
    val, train = tmp_path / "moved" / "w" / "sft_val.json", tmp_path / "moved" / "w" / "sft.json"
    kept = val.read_text(), train.read_text()
    val.write_text(kept[1]), train.write_text(kept[0])  # (each file's contents in the other)
    code, _, err = run_cli("sft", argv + ["--world", absolute, "--resume", "true",
                                          "--max_steps", "5"])
    assert code == 2 and "--resume on other data" in err, err
    val.write_text(json.dumps(json.loads(kept[0])[1:])), train.write_text(kept[1])
    code, _, err = run_cli("sft", argv + ["--world", absolute, "--resume", "true",
                                          "--max_steps", "5"])
    assert code == 2 and "--resume on other data" in err, err


def test_resume_refuses_images_replaced_since_the_run_started(tiny_world, tiny_sft, tmp_path):
    """run.json digested the data files only: an image the data names, replaced by other pixels
    after a run started, was trained on by its --resume without a word. The images' names and
    sizes are recorded now, and another image under a name the data gives is refused."""
    import shutil
    world, out = str(tmp_path / "w"), str(tmp_path / "o")
    shutil.copytree(tiny_world, world)
    argv = ["--init", tiny_sft, "--world", world, "--batch_size", "4", "--report", "false",
            "--save_every", "1", "--out", out]
    assert run_cli("sft", argv + ["--max_steps", "1"])[0] == 0
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["images"]["count"] > 0, run
    named = os.path.join(world, json.load(open(os.path.join(world, "sft.json")))[0]["image"])
    folder = os.path.dirname(named)
    other = next(os.path.join(folder, f) for f in sorted(os.listdir(folder))
                 if os.path.getsize(os.path.join(folder, f)) != os.path.getsize(named))
    shutil.copy(other, named)
    code, _, err = run_cli("sft", argv + ["--max_steps", "2", "--resume", "true"])
    assert code == 2 and err.count("\n") == 1, err
    assert f"--resume on other images: the {run['images']['count']} images the data files name " \
        f"are not the {run['images']['count']} the run started on (their names or sizes differ " \
        f"from {out}/run.json's 'images')" in err, err
    assert latest_checkpoint(out).endswith("1")


def test_report_questions_too_long_are_refused_before_training(tiny_world, tmp_path):
    """A --max_len its training data fits but a held-out question of the report does not: the run
    trained to its end, then stopped in the report (exit 2, no report.json: the lab takes such a run
    as not done). Refused before step 1 now, nothing written."""
    out = tmp_path / "o"
    argv = ["--model", "tiny", "--world", tiny_world, "--max_steps", "3", "--batch_size", "2",
            "--align_steps", "1", "--read_steps", "1", "--max_len", "45", "--out", str(out)]
    code, stdout, err = run_cli("sft", argv)
    assert code == 2 and "its question is longer than --max_len 45 tokens (the report after " \
        "training asks it)" in err, err
    assert "step 1" not in stdout and not out.exists()
    code, _, err = run_cli("sft", argv + ["--report", "false"])
    assert code == 0, err


def test_the_held_out_loss_runs_under_the_training_autocast(tiny_world, tmp_path, monkeypatch):
    """--dtype bf16 on a GPU: the validation loss was computed outside the training pass's
    autocast (another precision than the training loss it is read beside); it runs inside
    distributed.bf16_autocast now (off on the CPU: recorded here, not switched on)."""
    import sft
    outside = calls_outside_autocast(monkeypatch, sft, "lm_loss")
    argv = ["--model", "tiny", "--world", tiny_world, "--batch_size", "4", "--align_steps", "1",
            "--read_steps", "1", "--max_steps", "3", "--report", "false", "--eval_batches", "1",
            "--out", str(tmp_path / "sft")]
    code, _, err = run_cli("sft", argv)
    assert code == 0, err
    assert len(outside) > 3 and not any(outside), outside


def test_flags_of_a_stage_that_does_not_run_are_refused(tiny_world, tmp_path):
    """A hunt found flags read by nothing, ignored without a word: --instruct_lr and
    --instruct_warmup without a reading stage (instruction tuning ran at --lr), --align_data or
    --align_batch_size with --align_steps 0, --read_data with --read_steps 0, --report_n with a
    --data outside the world (no report is made). Each is one line now; a reading stage cut off by
    a short --max_steps (a trial of the full command) is not refused."""
    base = ["--model", "tiny", "--world", tiny_world, "--max_steps", "3", "--batch_size", "4",
            "--align_steps", "1", "--read_steps", "1", "--report", "false"]
    mix = tmp_path / "mix.json"
    mix.write_text(open(os.path.join(tiny_world, "sft.json")).read())
    align = os.path.join(tiny_world, "align.json")
    for extra, words in (
            (["--read_steps", "0", "--instruct_lr", "0.5"], "--instruct_lr 0.5: not read without "
                                                             "a reading stage"),
            (["--read_data", "", "--read_steps", "0", "--instruct_warmup", "3"],
             "--instruct_warmup 3: not read without a reading stage"),
            (["--align_steps", "0", "--align_data", align], "not read with --align_steps 0"),
            (["--align_steps", "0", "--align_batch_size", "7"],
             "--align_batch_size 7: not read with --align_steps 0"),
            (["--read_steps", "0", "--read_data", str(mix)], "not read with --read_steps 0"),
            (["--data", str(mix), "--image_folder", tiny_world, "--align_steps", "0",
              "--read_steps", "0", "--report", "true", "--report_n", "5"],
             "--report_n 5: not read with a --data outside the world")):
        small = [] if "--align_steps" in extra else ["--align_batch_size", "4"]
        code, _, err = run_cli("sft", base + small + extra + ["--out", str(tmp_path / "o")])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (extra, err)
    # (a trial run whose --max_steps leaves the reading stage no step: the full command's flags)
    code, _, err = run_cli("sft", base + ["--align_batch_size", "4", "--max_steps", "2",
                                          "--instruct_lr", "0.5", "--out", str(tmp_path / "trial")])
    assert code == 0, err


def test_a_flag_of_a_stage_that_does_not_run_is_refused_at_its_default_value_too(
        tiny_world, tiny_sft, tmp_path):
    """README: flags of a stage that does not run are refused, not ignored. Typed at its default
    value (`--instruct_lr 1e-3` beside --init, as the README gives the rate) it was taken as left
    out: the run trained at --lr's 2e-3 without a word. A Config built in code (no command line)
    keeps the default-value rule."""
    import common
    import rundir
    import sft
    code, _, err = run_cli("sft", ["--init", tiny_sft, "--world", tiny_world, "--max_steps", "1",
                                   "--report", "false", "--instruct_lr", "1e-3",
                                   "--out", str(tmp_path / "o")])
    assert code == 2 and "--instruct_lr 0.001: not read with --init" in err \
        and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o" / "run.json")
    rundir.refuse_unread(sft.Config(init=tiny_sft, instruct_lr=1e-3), ["instruct_lr"], "x")
    # refused after the world's paths are filled in too (a replaced Config kept no typed flags),
    # and a flag typed at the value that runs is let be: fp32 on a CPU, false for off (not
    # --save_full false without --fsdp, where every checkpoint is whole: test_reliability)
    code, _, err = run_cli("sft", ["--model", "tiny", "--world", tiny_world, "--read_steps", "0",
                                   "--instruct_lr", "1e-3", "--out", str(tmp_path / "p")])
    assert code == 2 and "--instruct_lr 0.001: not read" in err, err
    code, _, err = run_cli("sft", ["--init", tiny_sft, "--world", tiny_world, "--max_steps", "1",
                                   "--report", "false", "--dtype", "fp32",
                                   "--out", str(tmp_path / "q")])
    assert code == 0, err
    typed = common.parse_config(sft.Config, ["--warmup_from_zero", "false"])
    rundir.refuse_unread(typed, ["warmup_from_zero"], "x")  # (false: off, what runs)
    with pytest.raises(common.ConfigError, match="--warmup_from_zero false: not read x"):
        rundir.refuse_unread(typed, ["warmup_from_zero"], "x", runs=())


def test_vision_lr_ratio_with_nothing_it_sets_is_refused(tiny_world, tiny_sft, tmp_path):
    """--vision_lr_ratio sets the CLIP tower's and projector's learning rate; with both frozen it
    was read by nothing and ignored without a word. One line now; with the projector trained it
    runs (LLaVA's stage 1: --train_vision false, the projector at --vision_lr_ratio 1)."""
    base = ["--init", tiny_sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--report", "false", "--train_vision", "false", "--vision_lr_ratio", "1"]
    code, _, err = run_cli("sft", base + ["--train_projector", "false", "--out",
                                          str(tmp_path / "o")])
    assert code == 2 and "--vision_lr_ratio 1.0: not read with --train_vision false and " \
        "--train_projector false" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli("sft", base + ["--out", str(tmp_path / "p")])
    assert code == 0, err


def test_an_unplain_record_after_skipped_ones_is_named_by_its_id():
    """Under --template plain with --skip_bad, records left out before it shifted the number a
    conversation the template cannot read was named by (a review): its id alone names it then."""
    import sft
    from data import DataError
    recs = [{"id": "a", "conversations": [{"from": "human", "value": "<image>"},
                                          {"from": "gpt", "value": "A circle."}]},
            {"id": "b", "conversations": [{"from": "human", "value": "Hi?"}]}]
    with pytest.raises(DataError, match=r"^f.json: record 1 \(id 'b'\): field 'conversations'"):
        sft.refuse_unplain(recs, "f.json")
    with pytest.raises(DataError, match=r"^f.json: record with id 'b': field 'conversations'"):
        sft.refuse_unplain(recs, "f.json", numbered=False)
