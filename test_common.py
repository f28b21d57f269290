"""common.py: flags from a dataclass Config, the LR schedule and batch order, model presets."""
import dataclasses
import errno
import gc
import json
import os
import subprocess
import sys

import pytest
import torch

import common
import distributed
import rundir
from checkpoint import FORMAT_VERSION, base_fingerprint
from conftest import HERE, forked, run_cli, two_ranks
from model import LLaVA


@dataclasses.dataclass
class _Flags:
    lr: float = 0.1            # learning rate
    facts: bool = True         # use facts
    targets: tuple = ("q", "v")  # targets
    name: str = "x"            # a name
    files: tuple = ()          # files (none by default)


def test_parse_config_types_and_errors(capsys):
    c = common.parse_config(_Flags, ["--lr", "2e-3", "--facts", "false", "--targets", "q,k", "o"])
    assert c == _Flags(lr=2e-3, facts=False, targets=("q", "k", "o"), name="x")
    for argv, needle in ((["--lr", "fast"], "expected float"),
                         (["--nope", "1"], "unrecognized arguments"),
                         (["--facts", "maybe"], "expected true or false"),
                         (["--targets"], "--targets: give at least one value (default: q v)"),
                         (["--targets", ","], "--targets: give at least one value"),
                         (["--targets", "q,k", "q"], "--targets: q is given twice"),
                         # (`--pope_files $EMPTY` scored the Shapes world, as if not given)
                         (["--files"], "--files: give at least one value (or leave it out)")):
        with pytest.raises(SystemExit) as e:
            common.parse_config(_Flags, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_a_path_flag_given_with_equals_expands_home(tmp_path, monkeypatch):
    """`--out=~/x`: the shell expands '~' only at a word's start, so the stage wrote a folder
    named '~' in the working folder; every path flag expands it (in a list, each item's, and a
    `name=FILE`'s), a flag that is not a path keeps it, and a '~name' of no user stays as given."""
    import eval as evaluate
    import sft
    home = str(tmp_path / "home")
    monkeypatch.setenv("HOME", home)
    c = common.parse_config(sft.Config, ["--out=~/runs/sft", "--data=a.json:2,~/b.json",
                                         "--world", "~", "--init=~nobody_here_xyz/ckpt"])
    assert c.out == os.path.join(home, "runs/sft") and c.world == home
    assert c.data == f"a.json:2,{home}/b.json" and c.init == "~nobody_here_xyz/ckpt"
    e = common.parse_config(evaluate.Config, ["--pope_files=~/a.jsonl,~/b.jsonl",
                                              "--judge_prompt", "mmhal=~/p.txt",
                                              "--chair_prompt=~/not a path"])
    assert e.pope_files == (f"{home}/a.jsonl", f"{home}/b.jsonl")
    assert e.judge_prompt == (f"mmhal={home}/p.txt",) and e.chair_prompt == "~/not a path"


# text flags of the scripts that name no file or folder (a preset, a choice, a name, a key, a URL)
NOT_PATHS = {"benchmarks", "caption_shuffle", "chair_counting", "chair_prompt", "claims",
             "correct_rule", "device", "dtype", "eval_prompt", "export", "format", "gen_batches",
             "gen_types", "hf_load", "judge", "judge_key", "judge_url", "kl_estimator",
             "llava_bench_caption", "lora_targets", "loss", "loss_divisor", "mmhal_rating",
             "model", "noise_on", "noisy_tokens", "pairs", "pope_suffix", "rm_input",
             "roles_model", "rollout_model", "seeds", "stages", "template", "train_modes",
             "vic_mode"}


def test_every_text_flag_is_a_path_flag_or_named_as_none():
    """'~' expands in the path flags (common.PATH_FLAGS): reward's --import_llava_rlhf and ppo's
    --policy_lora, two folders, were left out of it and kept a literal '~'. Every text flag of
    every script is one or the other here, so a flag added later is sorted too."""
    import importlib
    for script in ("sft", "reward", "ppo", "dpo", "vigc", "eval", "lab", "pipeline", "bench",
                   "shapes"):
        for f in dataclasses.fields(importlib.import_module(script).Config):
            if "str" in str(f.type) or "tuple" in str(f.type).lower():
                assert f.name in common.PATH_FLAGS or f.name in NOT_PATHS, (script, f.name)
    assert not common.PATH_FLAGS & NOT_PATHS


def test_a_name_is_measured_without_its_weight_or_its_role(tmp_path, monkeypatch):
    """A 255-byte --data file given as FILE:2 (a weight) or an eval file as mmhal=FILE was refused
    as a name of 257 bytes (a file that is there: its weight or role is not part of its name);
    a name past 255 bytes is refused on Linux alone (macOS and Windows count characters, not
    bytes: a name of CJK characters fits there)."""
    import eval as evaluate
    import sft
    file = tmp_path / ("d" * 250 + ".json")
    file.write_text("[]")
    c = common.parse_config(sft.Config, ["--data", f"{file}:2,{file}:conv"])
    assert c.data == f"{file}:2,{file}:conv"
    common.parse_config(evaluate.Config, ["--judge_prompt", f"mmhal={file}"])
    with pytest.raises(SystemExit):
        common.parse_config(sft.Config, ["--data", f"{tmp_path / ('x' + file.name)}:2"])
    with pytest.raises(SystemExit):  # (--out names no list: all of it is the name)
        common.parse_config(sft.Config, ["--out", f"{tmp_path}/run:{'y' * 252}"])
    monkeypatch.setattr(sys, "platform", "darwin")
    common.parse_config(sft.Config, ["--out", "/x/" + "\u6f22" * 86])  # (258 bytes, 86 characters)


def test_a_folder_made_half_way_is_removed_when_the_next_fails(tmp_path, monkeypatch):
    """--out a/NEW/<a name no file system takes>: makedirs made a/NEW, then failed; the failed run
    left them behind, empty (the folders are noted before makedirs now)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.ConfigError, match="cannot be written"):
        rundir.ensure_writable(os.path.join("a", "new", "x" * 256, "run"))
    rundir.release_locks()
    assert os.listdir(tmp_path) == []


def test_warmup_from_zero_is_transformers_schedule_step_for_step():
    """--warmup_from_zero true: the rate each optimizer step runs at equals transformers' cosine,
    cosine-with-min-lr and constant-with-warmup schedulers (LLaVA's SFT, TRL, LLaVA-RLHF), stepped
    after each update as their trainers do; without it, step s of the warmup runs at (s+1)/W."""
    from transformers import optimization as hf
    lr, total, warmup = 2e-3, 30, 7
    cases = ((0.0, lambda o: hf.get_cosine_schedule_with_warmup(o, warmup, total)),
             (0.1, lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(
                 o, warmup, total, min_lr_rate=0.1)),
             (1.0, lambda o: hf.get_constant_schedule_with_warmup(o, warmup)))
    for min_ratio, make in cases:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = make(opt)
        for step in range(total):
            theirs = opt.param_groups[0]["lr"]  # the rate this update runs at
            opt.step()
            sched.step()
            ours = common.cosine_lr(step, total, lr, warmup, min_ratio, from_zero=True)
            assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15), (min_ratio, step)
            ours_default = common.cosine_lr(step, total, lr, warmup, min_ratio)
            shift = lr / warmup if step < warmup else 0.0
            assert ours_default == pytest.approx(theirs + shift, rel=1e-12), (min_ratio, step)


def test_lab_refuses_empty_flags_and_leaves_its_report_alone(tmp_path):
    """`lab.py --seeds` with no seeds used to run nothing and rewrite RESULTS.md as all missing;
    `lab.py --out ''` ended in a traceback."""
    results = tmp_path / "RESULTS.md"
    results.write_text("the last lab")
    code, _, err = run_cli("lab", ["--out", "", "--results", str(results)], strict=True)
    assert code == 2 and "lab.py: --out '': give a path" in err
    assert "Traceback" not in err and results.read_text() == "the last lab"
    argv = ["--seeds", "--results", str(results), "--out", str(tmp_path / "runs")]
    code, _, err = run_cli("lab", argv, strict=True)
    assert code == 2 and err.strip().splitlines() == [
        "error: lab.py: --seeds: give at least one value (default: 0 1 2 3 4)"]
    assert results.read_text() == "the last lab" and not (tmp_path / "runs").exists()


def test_cosine_schedule_and_batch_order():
    assert common.cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert common.cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert common.cosine_lr(100, 100, 1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert common.cosine_lr(55, 100, 1.0, warmup=10) == pytest.approx(0.5)
    assert common.cosine_lr(0, 100, 1.0, warmup=10, from_zero=True) == 0.0
    one = common.batch_indices(7, 50, 8, seed=3)
    rank0 = common.batch_indices(7, 50, 8, seed=3, rank=0, world=2)
    rank1 = common.batch_indices(7, 50, 8, seed=3, rank=1, world=2)
    two = rank0 + rank1
    assert one == two and len(set(one)) == 8
    epoch = [i for s in range(6) for i in common.batch_indices(s, 50, 8, seed=3)]
    assert len(set(epoch)) == 48  # no repeats inside an epoch
    # a batch larger than the data wraps around as often as it needs: every item 4 or 5 times
    big = common.batch_indices(0, 6, 27, seed=3)
    assert len(big) == 27 and sorted({big.count(i) for i in range(6)}) == [4, 5]
    assert common.batch_indices(0, 6, 9, seed=3)[:6] == big[:6]  # (one lap more: as before)


def test_each_epoch_has_its_own_order():
    """batch_indices draws a fresh permutation per epoch (seeded by seed and epoch): the same order
    every epoch would repeat the same batches in step."""
    first = [common.batch_indices(s, 48, 8, seed=3) for s in range(6)]
    second = [common.batch_indices(s, 48, 8, seed=3) for s in range(6, 12)]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(48))
    assert first != second and common.batch_indices(0, 48, 8, seed=4) != first[0]


def test_rng_state_puts_back_every_stream():
    """--resume continues each random stream a stage may draw from: Python's, NumPy's, torch's
    and the stage's own generators."""
    import random
    import numpy as np
    gen = torch.Generator().manual_seed(5)
    draw = lambda: (random.random(), float(np.random.rand()), float(torch.rand(())),
                    float(torch.rand((), generator=gen)))
    state = rundir.rng_state({"g": gen})
    first = draw()
    draw()
    rundir.set_rng_state(state, {"g": gen})
    assert draw() == first


def test_optimizer_decays_matrices_only_and_scales_the_vision_lr():
    """AdamW's weight decay on matrices alone (biases, norms, 1-D parameters: none); the vision
    tower and projector at vision_lr_ratio x lr through set_lr."""
    model = torch.nn.ModuleDict({"projector": torch.nn.Linear(2, 3),
                                 "language_model": torch.nn.Sequential(torch.nn.Linear(3, 4),
                                                                       torch.nn.LayerNorm(4))})
    opt = common.make_optimizer(model, 1e-3, weight_decay=0.1, vision_lr_ratio=0.5)
    common.set_lr(opt, 2e-3)
    got = {(p.dim(), g["weight_decay"], g["lr"]) for g in opt.param_groups for p in g["params"]}
    assert got == {(2, 0.1, 2e-3), (1, 0.0, 2e-3), (2, 0.1, 1e-3), (1, 0.0, 1e-3)}
    assert sum(len(g["params"]) for g in opt.param_groups) == 6


def test_model_presets_have_real_sizes():
    with torch.device("meta"):
        for name, billions in (("llava-7b", 7.06), ("llava-13b", 13.35)):
            m = LLaVA.from_preset(name)
            n = sum(p.numel() for p in m.parameters()) / 1e9
            # CLIP-L/14-336 (last layer never built) + Vicuna
            assert abs(n - billions) < 0.05, (name, n)
            assert m.config.num_image_tokens == 576


def test_negative_flag_values_in_scientific_notation():
    """'--length_penalty -1e-1' (argparse before Python 3.13 takes '-1e-1' for an option and
    said the flag had no value); '--flag=value' and plain negatives as before."""
    import ppo
    argv = ["--length_penalty", "-1e-1", "--correctness=-2", "--no_eos_penalty", "-3"]
    cfg = common.parse_config(ppo.Config, argv)
    assert (cfg.length_penalty, cfg.correctness, cfg.no_eos_penalty) == (-0.1, -2.0, -3.0)


def run_without(cfg, out, fields):
    """OUT/checkpoint-000003 of a run whose config lacks `fields` (started before they were
    added): (its folder, that config)."""
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in fields}
    ckpt = out / "checkpoint-000003"
    os.makedirs(ckpt)
    (ckpt / "config.json").write_text("{}")
    torch.save({"format_version": FORMAT_VERSION, "step": 3, "run_config": old,
                "rng": rundir.rng_state()}, ckpt / "trainer_state.pt")
    return ckpt, old


def test_resume_of_a_run_started_before_a_field_was_added(tmp_path):
    """A run whose config predates a field (rundir.ADDED_FIELDS: reward.py's prompt_space and
    vision_tower) resumes as long as the field keeps the value that means what the stage did
    before; another value is a different config, named."""
    import reward
    cfg = reward.Config(out=str(tmp_path))
    ckpt, old = run_without(cfg, tmp_path, ("prompt_space", "vision_tower"))
    path, state = rundir.load_resume(str(tmp_path), cfg)
    assert path == str(ckpt) and state["step"] == 3
    with pytest.raises(common.ConfigError, match="field 'prompt_space' was False, now True"):
        rundir.load_resume(str(tmp_path), dataclasses.replace(cfg, prompt_space=True))
    # a field no stage gained since: still another stage's run
    del old["facts"]
    torch.save({"format_version": FORMAT_VERSION, "step": 3, "run_config": old,
                "rng": rundir.rng_state()}, ckpt / "trainer_state.pt")
    with pytest.raises(common.ConfigError, match="lacks this script's field 'facts'"):
        rundir.load_resume(str(tmp_path), cfg)


def _mapped_from(file):
    """The address ranges of /proc/self/maps backed by `file`, removed or not (Linux)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip().removesuffix(" (deleted)") == str(file):
            ranges.append(tuple(int(x, 16) for x in fields[0].split("-")))
    return ranges


def _state_with_moments(tmp_path, cfg):
    """A checkpoint of `cfg`'s run whose trainer state holds an AdamW's moments after a step, and
    that optimizer's parameter."""
    ckpt, _ = run_without(cfg, tmp_path, ())
    lin = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(2, 64)).sum().backward()
    opt.step()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    state["optimizer"] = opt.state_dict()
    torch.save(state, ckpt / "trainer_state.pt")
    return ckpt / "trainer_state.pt", lin


def test_a_resumed_optimizer_state_is_read_from_its_file_not_copied_in(tmp_path):
    """trainer_state.pt was read whole into memory: a replicated full fine-tune resumed held its
    AdamW moments on the host before they went to the GPU (28 GB at 7B in bf16, 56 GB in fp32).
    Where the optimizer lives on a GPU it is mapped now (torch.load mmap): its tensors are the
    file's pages until copied there. The rest of the state (its random streams, kept by the run;
    AdamW's step, which load_state_dict leaves on the host) is copied out: it held the whole file
    mapped, its space held after rotation deleted it."""
    import sft
    cfg = sft.Config(out=str(tmp_path), device="cuda")  # (not built: the config alone)
    file, _ = _state_with_moments(tmp_path, cfg)
    path, state = rundir.load_resume(str(tmp_path), cfg)
    ptr = next(iter(state["optimizer"]["state"].values()))["exp_avg"].data_ptr()
    assert any(start <= ptr < end for start, end in _mapped_from(file))
    # restored onto another device (meta standing in for the GPU: none here); AdamW keeps its step
    # on the host, which held the whole file mapped too
    on = torch.nn.Linear(64, 64, device="meta")
    opt = torch.optim.AdamW(on.parameters())
    rundir.restore(on, opt, path, state, distributed.Dist(device=torch.device("meta")))
    assert {v.device.type for s in opt.state.values() for v in s.values()} == {"meta", "cpu"}
    os.remove(file)
    gc.collect()
    assert _mapped_from(file) == [] and state["step"] == 3 and "optimizer" not in state


def test_a_cpu_run_resumed_holds_no_mapping_of_its_trainer_state(tmp_path):
    """A CPU run's trainer_state.pt was mapped, and restore() kept state["optimizer"]: the
    optimizer's moments were the private mapping itself (copy-on-write), so the file stayed
    mapped for the whole run, its disk space held after checkpoint rotation deleted it. It is
    read whole on the CPU now, and restore() lets the state's copy go."""
    import sft
    cfg = sft.Config(out=str(tmp_path))
    file, lin = _state_with_moments(tmp_path, cfg)
    want = torch.load(file, weights_only=False)["optimizer"]
    path, state = rundir.load_resume(str(tmp_path), cfg)
    opt = torch.optim.AdamW(lin.parameters())
    rundir.restore(lin, opt, path, state, distributed.Dist())
    assert "optimizer" not in state
    got = opt.state_dict()
    assert all(torch.equal(got["state"][i][k], want["state"][i][k])
               for i in want["state"] for k in want["state"][i])
    os.remove(file)
    gc.collect()
    assert _mapped_from(file) == []


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("content", [b"", b"garbage, not a zip archive" * 100])
def test_an_empty_or_garbage_trainer_state_is_named_truncated_or_corrupt(tmp_path, device,
                                                                          content):
    """Read mapped, an empty or non-zip trainer_state.pt said "mmap can only be used with files
    saved with torch.save(..., _use_new_zipfile_serialization=True)", which tells a user nothing
    (unmapped: a bare EOFError or UnpicklingError). It is named truncated or corrupt."""
    import sft
    cfg = sft.Config(out=str(tmp_path), device=device)  # (not built: the config alone)
    ckpt, _ = run_without(cfg, tmp_path, ())
    (ckpt / "trainer_state.pt").write_bytes(content)
    with pytest.raises(common.CheckpointError) as e:
        rundir.load_resume(str(tmp_path), cfg)
    assert str(e.value) == (f"{ckpt / 'trainer_state.pt'}: truncated or corrupt (not the zip "
                            "archive torch.save writes): move the checkpoint away and --resume "
                            "takes the one before it")


def test_ppo_resumes_a_run_from_before_its_newest_flags(tmp_path):
    """ppo.py gained --loss_divisor and --compile_decode: a run started before them was refused
    at --resume ("lacks this script's field ..."). It resumes now: --loss_divisor at 'tokens'
    (what ppo.py did before; 'columns' is another config), --compile_decode on or off (the
    decoding path: the same tokens up to float rounding)."""
    import ppo
    cfg = ppo.Config(out=str(tmp_path))
    ckpt, _ = run_without(cfg, tmp_path, ("compile_decode", "loss_divisor"))
    for on in (False, True):
        path, state = rundir.load_resume(str(tmp_path), dataclasses.replace(cfg, compile_decode=on))
        assert path == str(ckpt) and state["step"] == 3
    with pytest.raises(common.ConfigError, match="'loss_divisor' was 'tokens', now 'columns'"):
        rundir.load_resume(str(tmp_path), dataclasses.replace(cfg, loss_divisor="columns"))


def test_a_povid_stage_2_run_from_before_noise_on_resumes_on_the_resized_image(tmp_path):
    """dpo.py gained --noise_on (default 'original', POVID's own noising): a run started before it
    was refused at --resume ("lacks this script's field 'noise_on'"). A stage-2 run noised the
    resized image then: it resumes with --noise_on resized, and the default is another config."""
    import dpo
    cfg = dpo.Config(out=str(tmp_path), povid_stage=2, noise_on="resized")
    ckpt, _ = run_without(cfg, tmp_path, ("noise_on",))
    assert rundir.load_resume(str(tmp_path), cfg)[0] == str(ckpt)
    with pytest.raises(common.ConfigError, match="'noise_on' was 'resized', now 'original'"):
        rundir.load_resume(str(tmp_path), dataclasses.replace(cfg, noise_on="original"))


def test_a_resume_on_a_moved_world_names_the_world(tmp_path):
    """A run resumed with --world at another path (the folder moved) was refused naming
    'tokenizer', the first of sft's fields under it, a flag the user never gave: 'world' first."""
    import sft
    cfg = sft.Config(out=str(tmp_path), world="/data/w")
    cfg = dataclasses.replace(cfg, **{f: getattr(cfg, f).replace(common.WORLD, cfg.world)
                                      for f in ("tokenizer", "data", "val_data", "align_data",
                                                "read_data")})
    run_without(cfg, tmp_path, ())
    moved = dataclasses.replace(cfg, **{f: getattr(cfg, f).replace("/data/w", "/data/w2")
                                        for f in ("world", "tokenizer", "data", "val_data",
                                                  "align_data", "read_data")})
    with pytest.raises(common.ConfigError, match="field 'world' was '/data/w', now '/data/w2'"):
        rundir.load_resume(str(tmp_path), moved)


# each stage's Config fields added after the stage first saved a trainer state (git log -S), each
# read as what the stage did before; fields free at --resume need no entry
GAINED = {"ppo": ("fsdp", "stop_at_question", "rm_input", "correct_rule", "vision_tower",
                  "policy_lora", "warmup_from_zero", "loss_divisor", "compile_decode"),
          "reward": ("fsdp", "blank_images", "prompt_space", "vision_tower", "import_llava_rlhf",
                     "caption_shuffle", "warmup_from_zero"),
          "dpo": ("fsdp", "noise_on", "warmup_from_zero"),
          "vigc": ("fsdp", "vic_mode", "answer_length", "num_beams", "tokenizer", "instructions",
                   "repetition_penalty", "warmup_from_zero", "grad_checkpoint")}


@pytest.mark.parametrize("script", sorted(GAINED))
def test_a_run_from_before_every_field_its_stage_gained_resumes(script, tmp_path, monkeypatch):
    """A run saved before any of the fields its stage gained since (ppo.py, reward.py and vigc.py
    from their first day) was refused at --resume ("lacks this script's field 'fsdp'"): each
    field now reads as what the stage did before, vigc's tokenizer the run's own world's (as
    '{world}/tokenizer' resolves) and its --instructions '' (a --data run's built-in phrasings);
    with any one entry gone it is refused again."""
    import importlib
    stage = importlib.import_module(script)
    cfg = stage.Config(out=str(tmp_path), world=str(tmp_path / "w"))
    free = getattr(stage, "GEN_FIELDS", ())  # (vigc's generation flags: free at --resume)
    paths = {f.name: getattr(cfg, f.name).replace(common.WORLD, cfg.world)
             for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), str)}
    cfg = dataclasses.replace(cfg, **paths)  # (as common.world_paths resolves them)
    if script == "vigc":  # (a --data of one's own: the world's instructions dropped)
        cfg = dataclasses.replace(cfg, data="mine.json", instructions="")
    ckpt, _ = run_without(cfg, tmp_path, GAINED[script])
    path, state = rundir.load_resume(str(tmp_path), cfg, free)
    assert path == str(ckpt) and state["step"] == 3
    for field in set(GAINED[script]) & set(rundir.ADDED_FIELDS) - set(free):
        kept = {k: v for k, v in rundir.ADDED_FIELDS.items() if k != field}
        monkeypatch.setattr(rundir, "ADDED_FIELDS", kept)
        with pytest.raises(common.ConfigError, match=f"lacks this script's field '{field}'"):
            rundir.load_resume(str(tmp_path), cfg, free)
        monkeypatch.undo()

@pytest.mark.parametrize("script", ["sft", "reward", "ppo", "dpo", "vigc", "eval", "pipeline",
                                    "lab", "bench", "shapes"])
def test_help_explains_every_flag(script, capsys):
    """`python SCRIPT.py --help` gives every flag its one-line comment (shapes.py's world
    parameters come from its World dataclass, which its Config extends)."""
    import importlib
    config = importlib.import_module(script).Config
    with pytest.raises(SystemExit):
        common.parse_config(config, ["--help"], prog=f"{script}.py")
    text = "".join(capsys.readouterr().out.split())
    comments = common._field_comments(config)
    for field in dataclasses.fields(config):
        assert comments.get(field.name, "").strip(), f"--{field.name} has no comment"
        # the comment reaches --help (argparse re-wraps it, also after a hyphen: compare without
        # whitespace)
        assert "".join(comments[field.name].split()) in text, field.name


def test_trained_base_refuses_a_run_json_init_that_is_not_a_path(tmp_path):
    # a full model resumed: the --init its run started from is run.json's "init"
    ckpt = tmp_path / "run" / "checkpoint-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")  # (no "base": a full model)
    (tmp_path / "init").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"data": {}, "init": 5}')
    with pytest.raises(common.ConfigError, match="run.json: field 'init': expected the path"):
        rundir.trained_base(str(ckpt), str(tmp_path / "init"))
    (tmp_path / "run" / "run.json").write_text('{"data": {}, "init": "%s"}' % (tmp_path / "init"))
    assert rundir.trained_base(str(ckpt), str(tmp_path / "init")) == str(tmp_path / "init")
    # a moved project: run.json's absolute path is gone, --init (relative) finds it
    (tmp_path / "run" / "run.json").write_text('{"data": {}, "init": "/gone/sft"}')
    assert rundir.trained_base(str(ckpt), str(tmp_path / "init")) == str(tmp_path / "init")


def test_a_run_folder_moved_without_its_base_is_not_said_to_have_another_init(tmp_path, capsys):
    """A LoRA run folder moved alone (its base, named relative to it, left behind): resuming said
    "--init now holds ...; resuming on /sft/...", --init unchanged, then failed on 'base'."""
    from test_model import tiny_model
    import sft
    init = tmp_path / "sft"
    rundir.save_checkpoint(tiny_model(), str(init), 1, sft.Config(out=str(init)))
    model = tiny_model()
    model.add_adapter("dpo", 2, 4)
    run = tmp_path / "a" / "b" / "run"
    rundir.save_checkpoint(model, str(run), 1, sft.Config(out=str(run)),
                           base=str(init / "checkpoint-000001"))
    os.rename(tmp_path / "a" / "b", tmp_path / "b")  # (one folder up: '../..' misses it)
    moved = tmp_path / "b" / "run" / "checkpoint-000001"
    capsys.readouterr()
    assert rundir.trained_base(str(moved), str(init)) == str(init / "checkpoint-000001")
    said = capsys.readouterr().out
    assert "now holds" not in said and "the base this run recorded, is not there" in said, said
    from checkpoint import load_checkpoint
    with pytest.raises(common.CheckpointError, match="not found .read from this checkpoint's "
                                                     "folder: moved without it"):
        load_checkpoint(str(moved))


SCRIPTS = ("sft.py", "reward.py", "ppo.py", "dpo.py", "vigc.py", "eval.py", "pipeline.py",
           "lab.py", "bench.py", "shapes.py")


def documented_commands():
    """(where, script, argv) of every `python X.py ...` / `torchrun ... X.py ...` command in
    the bash blocks of README.md and of docs/*.md and in the scripts' docstrings (continued lines
    joined, comments and `&&`-joined commands split off)."""
    import ast
    import glob
    import re
    import shlex
    from conftest import HERE
    read = lambda name: open(os.path.join(HERE, name), encoding="utf-8").read()
    docs = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "docs", "*.md")))
    texts = [(name, b) for name in ["README.md"] + docs
             for b in re.findall(r"```bash\n(.*?)```", read(name), re.S)]
    texts += [(s, ast.get_docstring(ast.parse(read(s))) or "") for s in SCRIPTS]
    out = []
    for where, text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", re.split(r"\s#", line)[0]):
                if not re.search(r"\b(python|torchrun)\b.*\.py\b", part):
                    continue
                tokens = shlex.split(part)
                at = [i for i, t in enumerate(tokens) if t in SCRIPTS]
                if at and any(t in ("python", "torchrun") for t in tokens[:at[0]]):
                    out.append((where, tokens[at[0]], tokens[at[0] + 1:]))
    return out


def test_every_documented_command_parses():
    """Each command the README and the scripts' docstrings give takes flags that its script
    knows, with values in their ranges, and a LLaVA-1.5 command room for its image's 576 tokens
    (the dpo.py and vigc.py examples named no --max_len: at 512 they trained on nothing, which
    only a run on real data would have told), and bench.py's rows room for them. A value
    written as an upper-case placeholder (`--warmup W`) is left out."""
    import importlib
    import re
    commands = documented_commands()
    assert len(commands) > 50 and {s for _, s, _ in commands} >= {"sft.py", "ppo.py", "dpo.py"}
    for where, script, argv in commands:
        if argv == ["--help"]:
            continue
        placeholder = [i for i, t in enumerate(argv) if re.fullmatch(r"[A-Z]{1,5}", t)
                       and i and argv[i - 1].startswith("--")]
        kept = [t for i, t in enumerate(argv) if i not in placeholder and i + 1 not in placeholder]
        module = importlib.import_module(script[:-3])
        try:
            cfg = common.parse_config(module.Config, kept, prog=script)
        except SystemExit:
            pytest.fail(f"{where}: {script} {' '.join(argv)}")
        # LLaVA-1.5's 576 image tokens fit (dpo.py's and vigc.py's examples kept the default 512:
        # every sequence dropped)
        for field in ("max_len", "max_prompt_len") if "llava-v1.5" in " ".join(argv) else ():
            assert getattr(cfg, field, 1e9) > 576, f"{where}: {script} {' '.join(argv)}"
        if script == "bench.py":  # its rows fit the preset's image tokens (README's GPU command
            # left --seq at 256: 576 image tokens of llava-7b did not fit, refused before a run)
            try:
                module.check_positions(cfg)
            except common.ConfigError as e:
                pytest.fail(f"{where}: {script} {' '.join(argv)}: {e}")


def test_a_full_disk_while_saving_a_checkpoint_is_one_error_and_keeps_the_last(tmp_path,
                                                                              monkeypatch):
    """A disk filling up while a checkpoint was written ended in torch's or safetensors' own
    traceback ("basic_ios::clear: iostream error", "unexpected pos"), with the half-written temp
    folder left behind. Now one error naming the folder and the free space; nothing of it kept;
    the checkpoint before it untouched. Other errors stay what they were."""
    from test_model import tiny_model
    import sft
    model, cfg, out = tiny_model(), sft.Config(out=str(tmp_path)), str(tmp_path)
    rundir.save_checkpoint(model, out, 1, cfg)
    before = {f: open(os.path.join(out, "checkpoint-000001", f), "rb").read()
              for f in os.listdir(os.path.join(out, "checkpoint-000001"))}

    def fails(error):
        def save(*args, **kwargs):
            raise error
        return save
    for target, name, error in (
            (torch, "save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                         "pos 4096 vs 4010")),
            (torch, "save", RuntimeError("basic_ios::clear: iostream error")),
            (rundir, "save_checkpoint_files", OSError(28, "No space left on device"))):
        with monkeypatch.context() as m:
            m.setattr(target, name, fails(error))
            with pytest.raises(common.CheckpointError, match=r"cannot write checkpoint-000002 "
                               r"\(.*; \d+ MB free there\); nothing of it was kept, what was "
                               r"written before is: free some space \(or mend the disk\) and run "
                               r"again \(a training run that saved a checkpoint goes on from it "
                               r"with --resume true\)"):
                rundir.save_checkpoint(model, out, 2, cfg)
        assert os.listdir(out) == ["checkpoint-000001"], name
    assert {f: open(os.path.join(out, "checkpoint-000001", f), "rb").read()
            for f in before} == before
    # an --out near PATH_MAX whose checkpoint files pass it: safetensors' own error (a traceback)
    from safetensors import SafetensorError
    with monkeypatch.context() as m:
        m.setattr(rundir, "save_checkpoint_files", fails(SafetensorError(
            "Error while serializing: I/O error: File name too long (os error 36)")))
        with pytest.raises(common.CheckpointError, match=r"cannot write checkpoint-000002 \(File "
                           r"name too long: .*nothing of it was kept: choose a shorter --out"):
            rundir.save_checkpoint(model, out, 2, cfg)
    assert os.listdir(out) == ["checkpoint-000001"]
    monkeypatch.setattr(torch, "save", fails(RuntimeError("a bug of ours")))
    with pytest.raises(RuntimeError, match="a bug of ours"):
        rundir.save_checkpoint(model, out, 2, cfg)


def test_saving_a_step_again_keeps_it_where_the_rename_fails(tmp_path, monkeypatch):
    """The same step saved again (a run's last save) deleted the one there before the temp folder
    was renamed into its place: a failing rename lost both. It is put back now; a folder that may
    not be written is one line too (it was a traceback)."""
    import errno
    from test_model import tiny_model
    import sft
    model, out = tiny_model(), str(tmp_path)
    cfg = sft.Config(out=out)
    rundir.save_checkpoint(model, out, 1, cfg)
    ck = os.path.join(out, "checkpoint-000001")
    before = {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)}
    real = os.rename
    for error, says in ((OSError(errno.EIO, "Input/output error"), "free some space"),
                        (PermissionError(errno.EACCES, "Permission denied", out),
                         "make the folder writable")):
        def rename(src, dst, error=error):
            if ".tmp-checkpoint-000001-" in str(src):  # (the temp folder into place)
                raise error
            return real(src, dst)
        with monkeypatch.context() as m:
            m.setattr(os, "rename", rename)
            with pytest.raises(common.CheckpointError, match=says):
                rundir.save_checkpoint(model, out, 1, cfg)
        assert os.listdir(out) == ["checkpoint-000001"]
        assert {f: open(os.path.join(ck, f), "rb").read() for f in before} == before


def test_a_shard_file_this_rank_may_not_read_is_one_line(tmp_path, monkeypatch):
    """Any error of this rank's reading before the ranks agree (not only a CheckpointError) is
    a line: an OSError passed the agreement on one rank, the others waited in the load."""
    from test_model import tiny_model
    model = tiny_model()
    opt = common.make_optimizer(model, 1e-3)
    ck = tmp_path / "checkpoint-000001"
    (ck / rundir.SHARDS).mkdir(parents=True)
    denied = str(ck / rundir.SHARDS / "__0_0.distcp")

    def check(path):
        raise PermissionError(13, "Permission denied", denied)
    monkeypatch.setattr(rundir, "check_shard_files", check)
    with pytest.raises(common.CheckpointError, match=f"{denied}: cannot be read .Permission"):
        rundir.restore(model, opt, str(ck), {"rng": None}, distributed.Dist(fsdp=True))


def test_a_boolean_flag_alone_is_true():
    """`--resume` alone (as HF's and most trainers' switches are written) ended in "expected one
    argument"; `--resume true/false` still reads as before."""
    import sft
    assert common.parse_config(sft.Config, ["--resume"]).resume is True
    cfg = common.parse_config(sft.Config, ["--resume", "--report", "false", "--lrv"])
    assert cfg.resume is True and cfg.report is False and cfg.lrv is True
    assert common.parse_config(sft.Config, ["--resume", "false"]).resume is False
    assert common.parse_config(sft.Config, []).resume is False
    with pytest.raises(SystemExit):
        common.parse_config(sft.Config, ["--resume", "maybe"])


def _save_worker(rank, port, out, fsdp, results, fsync_fails=False):
    """One of two processes saving a tiny model's checkpoint, the one that writes under a 2 KB
    file-size limit (a disk that fills): DDP's rank 0 (it writes the checkpoint), FSDP's rank 1
    (each writes its shards). fsync_fails: instead, rank 0's last step (fsync and rename, after
    every process wrote its part) fails with EIO."""
    import resource
    import signal
    from test_model import tiny_model
    import sft
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    d = distributed.setup_dist("cpu", fsdp)
    model = tiny_model()
    if fsdp:
        distributed.shard_model(model, d)
    if fsync_fails and rank == 0:
        def fsync_dir(path):
            raise OSError(5, "Input/output error")
        rundir._fsync_dir = fsync_dir
    elif rank == int(fsdp) and not fsync_fails:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past the limit fails, EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    try:
        rundir.save_checkpoint(model, out, 1, sft.Config(out=out), d=d)
        results.put((rank, "saved"))
    except common.CheckpointError as e:
        results.put((rank, str(e)))
    results.close()
    results.join_thread()  # (os._exit drops what the queue has not sent)
    os._exit(0)


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_process_that_cannot_write_its_part_stops_every_process(tmp_path, fsdp):
    """Two processes (DDP: rank 0 writes the checkpoint; FSDP: each writes its shards and random
    streams), one of which cannot write: every rank stops with one line, none waits at the next
    barrier, no temp folder is left (FSDP's was, with dcp's or torch's traceback)."""
    import multiprocessing
    from test_dpo import free_port
    ctx, port, out = multiprocessing.get_context("fork"), free_port(), str(tmp_path / "run")
    os.makedirs(out)
    results = ctx.Queue()
    ps = [ctx.Process(target=_save_worker, args=(r, port, out, fsdp, results)) for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    for p in ps:  # (a hang: nothing left holding the port)
        if p.is_alive():
            p.kill()
    said = dict(results.get(timeout=5) for _ in range(2))
    assert all(p.exitcode == 0 for p in ps), [p.exitcode for p in ps]
    assert os.listdir(out) == [], os.listdir(out)
    limited = int(fsdp)
    mine = said[limited]  # (DDP: safetensors' "I/O error ... (os error 27)"; FSDP: dcp's OSError)
    assert mine.startswith(f"{out}: cannot write checkpoint-000001 (") and "MB free there" in mine
    assert "File too large" in mine or "os error 27" in mine, said
    other = said[1 - limited]  # (FSDP: dcp tells every rank the cause)
    assert other.startswith(f"{out}: cannot write checkpoint-000001"), said
    assert fsdp or "another process could not write its part" in other, said


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_checkpoint_rank_0_cannot_commit_stops_every_process(tmp_path, fsdp):
    """Rank 0's last step of a save (fsync the temp folder, rename it) came after the processes
    agreed that every part was written: where it failed, rank 0 raised alone and the others waited
    at the next barrier until torchrun stopped them. Now every process stops with one line, the
    temp folder removed."""
    import multiprocessing
    from test_dpo import free_port
    ctx, port, out = multiprocessing.get_context("fork"), free_port(), str(tmp_path / "run")
    os.makedirs(out)
    results = ctx.Queue()
    ps = [ctx.Process(target=_save_worker, args=(r, port, out, fsdp, results, True))
          for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    for p in ps:
        if p.is_alive():
            p.kill()
    said = dict(results.get(timeout=5) for _ in range(2))
    assert all(p.exitcode == 0 for p in ps), [p.exitcode for p in ps]
    assert os.listdir(out) == [], os.listdir(out)
    assert said[0].startswith(f"{out}: cannot write checkpoint-000001 ("), said
    assert "Input/output error" in said[0] and "MB free there" in said[0], said
    assert "another process could not write its part" in said[1], said


def test_an_older_checkpoint_that_cannot_be_removed_is_a_note(tmp_path, monkeypatch, capsys):
    """A save that keeps the newest `keep` checkpoints goes on where an older one cannot be
    removed: the new one is written, the old one stays, a note says so (it was a traceback after
    the new checkpoint was in place)."""
    from test_model import tiny_model
    import sft
    model, out = tiny_model(), str(tmp_path)
    cfg = sft.Config(out=out, max_steps=10)
    rundir.save_checkpoint(model, out, 1, cfg, keep=1)

    def discard(path):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(rundir, "_discard", discard)
    rundir.save_checkpoint(model, out, 2, cfg, keep=1)
    assert sorted(os.listdir(out)) == ["checkpoint-000001", "checkpoint-000002"]
    assert capsys.readouterr().out == (f"note: {out}: could not remove the older "
                                       "checkpoint-000001 (Permission denied); it stays\n")


def test_an_error_line_is_one_line_without_terminal_colours(capsys):
    """A library's text quoted in the line (torch.load's refusal of a pickled module) carried ANSI
    colour codes and line breaks into the one line."""
    with pytest.raises(SystemExit) as e:
        common.fail("x.pt: cannot load (\x1b[1mWeightsUnpickler error\x1b[0m:\x1b[?25h "
                    "Unsupported\r\nglobal)")
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: x.pt: cannot load (WeightsUnpickler error: "
                                       "Unsupported global)\n")
    # a link (OSC 8, ended by ESC \), `tput sgr0`'s ESC ( B, ESC M, a bell, a stray escape
    with pytest.raises(SystemExit):
        common.fail("see \x1b]8;;http://x.org\x1b\\link\x1b]8;;\x1b\\ end\x1b(B\x1bM\x07 .\x1b")
    assert capsys.readouterr().err == "error: see link end .\n"


def test_cuda_random_state_is_this_devices_and_old_lists_still_read(monkeypatch):
    """Every visible GPU's state was saved and set back, so a resume on a machine that sees fewer
    (CUDA_VISIBLE_DEVICES) stopped with an IndexError; now the process's own device's is, and a
    checkpoint's list gives it its entry. (No GPU here: torch.cuda is stood in for.)"""
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_to.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    state = rundir.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    rundir.set_rng_state(state)
    old = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    rundir.set_rng_state(dict(state, cuda=old))  # (saved by an 8-GPU process, read on device 1)
    rundir.set_rng_state(dict(state, cuda=old[:1]))  # (one state: device 1 has none, left)
    assert [int(t[0]) for t in set_to] == [7, 1]


def _sync_in_buckets(rank, d, bucket):
    distributed.SYNC_BUCKET = bucket
    sizes, all_reduce = [], common.dist.all_reduce
    common.dist.all_reduce = lambda t, *a, **k: sizes.append(t.numel()) or all_reduce(t, *a, **k)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5, 1, 4)]
    for i, p in enumerate(params):
        p.grad = torch.arange(p.numel(), dtype=torch.float32) * (rank + 1) + i
    distributed.sync_grads(params, d)
    return [p.grad.tolist() for p in params] + [sizes]


def test_gradients_are_summed_over_ranks_in_buckets():
    """sync_grads all-reduces at most SYNC_BUCKET elements at a time (one flat copy of every
    gradient was 13.5 GB for a 7B full fine-tune): the same sums with buckets of 4 elements
    (a tensor larger than a bucket goes alone) as in one."""
    want = [[(1 + 2) * j + 2 * i for j in range(n)] for i, n in enumerate((3, 5, 1, 4))]
    for bucket, sizes in ((4, [3, 5, 1, 4]), (6, [3, 6, 4]), (1 << 26, [13])):
        got = two_ranks(_sync_in_buckets, bucket)
        assert got[0] == got[1] == want + [sizes], (bucket, got)


def test_a_resume_refused_for_ppo_micro_batch_says_why(tmp_path):
    """ppo.py --resume with another --micro_batch (PPO's one memory setting, where the other
    stages' --grad_accum may change) was refused without a reason: it moves the samples."""
    import os
    import ppo
    cfg = ppo.Config(out=str(tmp_path), micro_batch=2)
    ckpt = tmp_path / "checkpoint-000002"
    os.makedirs(ckpt)
    (ckpt / "config.json").write_text("{}")
    torch.save({"format_version": FORMAT_VERSION, "step": 2,
                "run_config": dataclasses.asdict(cfg), "rng": rundir.rng_state()},
               ckpt / "trainer_state.pt")
    with pytest.raises(common.ConfigError, match=r"field 'micro_batch' was 2, now 4 \(ppo.py's "
                                                 r"rollout samples in chunks of it"):
        rundir.load_resume(str(tmp_path), dataclasses.replace(cfg, micro_batch=4))


def test_data_specs_take_a_path_holding_a_comma(tmp_path):
    """sft.py/vigc.py --data 'dir/comma,name.jsonl' (a file there) was split at the comma and
    refused, naming 'dir/comma' (not given)."""
    one = tmp_path / "comma,name.jsonl"
    one.write_text("")
    other = tmp_path / "b.json"
    other.write_text("")
    assert common.data_specs(str(one)) == [(str(one), "")]
    assert common.data_specs(f"{one}:0.5") == [(str(one), "0.5")]
    assert common.data_specs(f"{one}:2,{other}") == [(str(one), "2"), (str(other), "")]


def test_resume_compares_each_clip_by_its_tensors_not_its_files(tmp_path):
    """run.json's CLIP fingerprint hashed the CLIP folder's files: the same weights converted from
    pytorch_model.bin to model.safetensors read as replaced; and ppo.py's reward model, a second
    model reading a CLIP folder of its own, had none recorded (replaced, its scores changed
    without a word). Each model's CLIP tensors are compared now; a run recorded before keeps its
    files' fingerprint."""
    from types import SimpleNamespace
    from safetensors.torch import load_file, save_file

    def clip(folder, seed):  # (a few of a CLIP's tensors, under their HF names)
        torch.manual_seed(seed)
        names = ("embeddings.class_embedding", "pre_layrnorm.weight",
                 "encoder.layers.0.mlp.fc1.weight")
        os.makedirs(tmp_path / folder, exist_ok=True)
        (tmp_path / folder / "config.json").write_text('{"model_type": "clip_vision_model"}')
        save_file({f"vision_model.{n}": torch.randn(8, 4)[:1 + i].squeeze(0)
                   for i, n in enumerate(names)}, tmp_path / folder / "model.safetensors")
        return str(tmp_path / folder)
    policy, rm = SimpleNamespace(clip_dir=clip("pol", 0)), SimpleNamespace(clip_dir=clip("rm", 0))
    cfg = SimpleNamespace(out=str(tmp_path / "run"), resume=False, overwrite=False, init="",
                          vision_tower="", reward="ckpt/rm")
    os.makedirs(cfg.out)
    rundir._images_read.clear()
    rundir._start_writing(cfg, {}, policy, rm)
    cfg.resume = True
    weights = tmp_path / "pol" / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "pol" / "pytorch_model.bin")
    weights.unlink()
    rundir._start_writing(cfg, {}, policy, rm)  # (the same weights in other files: goes on)
    clip("rm", 1)
    with pytest.raises(common.ConfigError) as e:
        rundir._start_writing(cfg, {}, policy, rm)
    assert str(e.value).startswith(f"--reward ckpt/rm: its CLIP {rm.clip_dir}: other CLIP weights "
                                   "than this run started with (replaced since"), e.value
    rundir._start_writing(cfg, {}, policy, policy)  # (one model: its CLIP alone)
    run_file = os.path.join(cfg.out, "run.json")
    old = {"data": {}, "clip_fingerprint": base_fingerprint(policy.clip_dir)}
    common.write_json(old, run_file)  # (recorded before 2026-12-06: its files, as before)
    rundir._start_writing(cfg, {}, policy, rm)
    common.write_json(dict(old, clip_fingerprint="0" * 32), run_file)
    with pytest.raises(common.ConfigError, match="other CLIP weights than this run started with"):
        rundir._start_writing(cfg, {}, policy, rm)


def test_images_fingerprint_stats_each_image_once(tmp_path, monkeypatch):
    """run.json's images took isfile + getsize per image, two stats (each a round trip on NFS,
    on rank 0 for every image of the run): one now. A gone image or a folder counts as size -1,
    another size is another fingerprint, a moved folder is the same."""
    for folder in ("a", "b", "c"):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "1.png").write_bytes(b"12")
    os.makedirs(tmp_path / "c" / "gone.png")  # (a folder: no image, as a gone one)
    calls = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    prints = []
    for names in (["a/1.png", "a/gone.png"], ["b/1.png", "b/gone.png"], ["c/1.png", "c/gone.png"]):
        rundir._images_read.clear()
        rundir.note_images_read([str(tmp_path / n) for n in names])
        prints.append(rundir.images_fingerprint())
    assert len(calls) == 6, calls
    assert prints[0] == prints[1] == prints[2] and prints[0]["count"] == 2  # (moved: the same)
    (tmp_path / "b" / "1.png").write_bytes(b"123")  # (other pixels, another size)
    rundir._images_read.clear()
    rundir.note_images_read([str(tmp_path / n) for n in ("b/1.png", "b/gone.png")])
    assert rundir.images_fingerprint() != prints[0]
    rundir._images_read.clear()


def test_run_json_records_a_data_file_as_it_was_read(tmp_path):
    """run.json digested each data file after the stage had read it and decoded every image it
    names (minutes for COCO): a file edited in between was recorded by its new contents, and a
    --resume on it went on, though the run trained on the old. The bytes the reader read are
    recorded now."""
    import hashlib
    from types import SimpleNamespace
    import formats
    data = tmp_path / "sft.json"
    data.write_text('[{"id": 1}]')
    cfg = SimpleNamespace(out=str(tmp_path / "run"), resume=False, overwrite=False)
    os.makedirs(cfg.out)
    formats.load_json(str(data))
    data.write_text('[{"id": 2}]')  # (edited while the run decoded its images)
    rundir.start_writing(cfg, SimpleNamespace(local_rank=0, world=1), [str(data)])
    run = json.load(open(tmp_path / "run" / "run.json"))
    assert run["data"] == {str(data): hashlib.sha256(b'[{"id": 1}]').hexdigest()}, run


def test_data_specs_refuse_a_file_named_twice(tmp_path, monkeypatch):
    """--data a.json,a.json (or a.json:2,./a.json) read the file's records twice, as a weight of 2
    would, without a word; run.json recorded it once. Refused now, naming the flag and the file."""
    one, other = tmp_path / "a.json", tmp_path / "b.json"
    one.write_text("")
    other.write_text("")
    monkeypatch.chdir(tmp_path)
    for value, line in ((f"{one},{other},{one}", f"{one} is named twice"),
                        ("a.json:2,./a.json", "./a.json is a.json, named before it")):
        with pytest.raises(common.ConfigError) as e:
            common.data_specs(value, weighted=True)
        assert str(e.value) == f"--data {value!r}: {line}: its records would be read twice; " \
            "name each file once (sft.py reads one twice as FILE:2)", e.value
        with pytest.raises(common.ConfigError) as e:  # (vigc.py: FILE:x is a type there)
            common.data_specs(value)
        assert str(e.value).endswith("read twice; name each file once"), e.value


def test_data_specs_take_a_comma_path_in_a_list(tmp_path):
    """--data 'comma,name.jsonl:2,b.json' (several files, one holding a comma) was split at that
    comma: 'comma' and 'name.jsonl:2' read as two files, neither there."""
    one = tmp_path / "comma,name.jsonl"
    one.write_text("")
    other = tmp_path / "b.json"
    other.write_text("")
    assert common.data_specs(f"{one}:2,{other}") == [(str(one), "2"), (str(other), "")]
    assert common.data_specs(f"{other},{one}") == [(str(other), ""), (str(one), "")]
    third = tmp_path / "c.json"
    third.write_text("")
    assert common.data_specs(f"{other}:3,{one},{third}:0.5") == [
        (str(other), "3"), (str(one), ""), (str(third), "0.5")]
    missing = tmp_path / "gone.json"  # a file not there stays one item, for its reader to name
    assert common.data_specs(f"{missing}:2,{one}") == [(str(missing), "2"), (str(one), "")]


def test_write_whole_onto_a_folder_names_the_folder(tmp_path):
    """A scores.json that is a folder was refused naming the temp file (scores.json.tmp16422)."""
    (tmp_path / "scores.json").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        common.write_json({}, str(tmp_path / "scores.json"))
    assert e.value.filename == str(tmp_path / "scores.json")
    assert os.listdir(tmp_path) == ["scores.json"]


def test_write_whole_leaves_other_files_named_like_its_temp_files(tmp_path):
    """A write removed the FILE.tmpPID files beside FILE whose pid was not alive here: it deleted a
    user's `RESULTS.md.tmp20261206` backup, the live temp file of a writer in another pid namespace
    (a container sharing the volume), and a huge number failed the write (OverflowError). A write
    touches its own temp file alone now: a leftover one is never read."""
    left = ["RESULTS.md.tmp20261206", f"RESULTS.md.tmp{4 * 10**6 + 1}", "RESULTS.md.tmp" + "9" * 30]
    for name in left:
        (tmp_path / name).write_text("not this write's")
    common.write_whole(str(tmp_path / "RESULTS.md"), lambda f: f.write("whole"))
    assert (tmp_path / "RESULTS.md").read_text() == "whole"
    assert sorted(os.listdir(tmp_path)) == sorted(["RESULTS.md", *left])


def test_write_whole_by_two_processes_at_once_leaves_a_whole_file(tmp_path):
    """Two processes writing one path (two labs' RESULTS.md, two bench.py's bench.md) shared the
    temp name path.tmp: each truncated the other's, one renamed a mix of both (NUL bytes too) into
    place, the other's rename failed. Each writes its own temp file now: every read finds one
    writer's whole text, and neither fails."""
    import tempfile
    import time
    target = tmp_path / "RESULTS.md"

    def write(ch):  # (each writer a forked copy of this process: no interpreter's start)
        text, end = ch * 200_000, time.time() + 1.5
        while time.time() < end:
            common.write_whole(str(target), lambda f: f.write(text))
    logs = [tempfile.TemporaryFile("w+") for _ in "AB"]
    writers = [forked(lambda ch=ch: write(ch), log) for ch, log in zip("AB", logs)]
    seen = set()
    while any(w.is_alive() for w in writers):
        if target.exists():
            text = target.read_text()
            seen.add("whole" if text in ("A" * 200_000, "B" * 200_000) else "mixed")
    for log in logs:
        log.seek(0)
    assert [w.exitcode for w in writers] == [0, 0], [log.read()[-300:] for log in logs]
    assert seen == {"whole"}
    assert sorted(os.listdir(tmp_path)) == ["RESULTS.md"]


def test_a_full_disk_while_the_log_is_cut_back_keeps_it_whole(tmp_path, monkeypatch):
    """A run resumed drops the log rows of the steps after its newest checkpoint, rewriting
    metrics.jsonl through metrics.jsonl.tmp: a disk filling up there left the torn temp file in
    --out and an error naming no file. Now the log is as it was, no temp file, the log named."""
    import builtins
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(f'{{"step": {i}, "loss": 1.0}}\n' for i in (1, 2, 3)))
    before = log.read_bytes()

    def opened(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        if mode == "w" and str(path).startswith(str(log) + ".tmp"):
            f.write('{"step": 1')  # (what fitted)
            f.close()
            raise OSError(28, "No space left on device")
        return f
    monkeypatch.setattr(common, "open", opened, raising=False)
    with pytest.raises(OSError) as e:
        common.Logger(str(tmp_path))  # (no checkpoint: every row goes)
    assert e.value.filename == str(log)
    assert log.read_bytes() == before and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_write_whole_writes_utf8_under_an_ascii_locale(tmp_path):
    """RESULTS.md and compare.md hold '±': under an ASCII locale (LC_ALL=C, UTF-8 mode off) the
    lab's report failed with a UnicodeEncodeError once every run had ended."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common\n"
            "common.write_whole(sys.argv[2], lambda f: f.write('0.8 \\u00b1 0.1'))\n")
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, HERE, str(tmp_path / "RESULTS.md")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert (tmp_path / "RESULTS.md").read_bytes() == "0.8 \u00b1 0.1".encode("utf-8")


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_join_timeout_that_is_no_number_of_seconds_is_one_line(value, monkeypatch, capsys):
    """FACTALIGN_JOIN_TIMEOUT (how long the ranks wait for each other to start) is refused in one
    line naming it, before any process group is made."""
    monkeypatch.setenv(distributed.JOIN_TIMEOUT, value)
    with pytest.raises(SystemExit) as stop:
        distributed.join_process_group("gloo")
    assert stop.value.code == 2 and not torch.distributed.is_initialized()
    assert capsys.readouterr().err == (f"error: {distributed.JOIN_TIMEOUT}={value!r}: give the "
                                       "seconds to wait for the other ranks, in (0, inf)\n")


def test_after_the_join_the_store_waits_its_30_minutes_again(monkeypatch):
    """The join's short timeout (FACTALIGN_JOIN_TIMEOUT) was the TCPStore's too, and stayed after
    it: NCCL's communicators waiting on the store for rank 0's id, and FSDP's mesh groups, were cut
    at 300 s. After the join the store has torch's 30 minutes again, as the collectives had."""
    from conftest import free_port
    from torch.distributed import constants, distributed_c10d
    monkeypatch.setenv(distributed.JOIN_TIMEOUT, "7")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    distributed.join_process_group("gloo")
    try:
        assert distributed_c10d._get_default_store().timeout == constants.default_pg_timeout
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("under_pipeline", [False, True])
def test_a_stage_under_the_pipeline_leaves_how_to_go_on_to_it(under_pipeline, monkeypatch, capsys,
                                                                tmp_path):
    """Output piped to a reader that ended (`pipeline.py | head`): a stage said its own
    interrupted line, advising its `--resume true`, which pipeline.py does not take. A stage
    says the cause alone, as it leaves a Ctrl-C's line to the pipeline; a script alone says both."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if under_pipeline:
        monkeypatch.setenv(common.INTERRUPT_SAID_BY, "1")
    else:
        monkeypatch.delenv(common.INTERRUPT_SAID_BY, raising=False)
    with open(tmp_path / "stdout", "w") as out:  # (its fd is the one sent to /dev/null)
        monkeypatch.setattr(sys, "stdout", out)
        with pytest.raises(SystemExit) as stop:
            common.stdout_reader_gone("interrupted: run again with --resume true")
    said = common.STDOUT_READER_GONE + ("" if under_pipeline else
                                        ": interrupted: run again with --resume true")
    assert (stop.value.code, capsys.readouterr().err) == (141, said + "\n")


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False), ("2", True), ("3", False)])
def test_an_interrupt_under_torchrun_is_said_by_rank_0_alone(rank, said, monkeypatch, capsys):
    """torchrun passes a Ctrl-C (or its SIGINT) to every rank: each wrote the same 'interrupted'
    line; each launcher's rank 0 now says it for its ranks (rank 2 on a second node: that node's
    terminal gets its line), and every rank exits 130."""
    monkeypatch.delenv(common.INTERRUPT_SAID_BY, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", str(int(rank) % 2))  # (two nodes of two)
    with pytest.raises(SystemExit) as e, common.user_errors():
        raise KeyboardInterrupt
    assert e.value.code == 130
    assert capsys.readouterr().err == (common.INTERRUPTED + "\n" if said else "")


def test_a_world_file_spelled_out_as_data_is_said_to_drop_the_worlds_companions(tmp_path, capsys,
                                                                                monkeypatch):
    """--data data/shapes/sft.json (the world's own file by its path, not '{world}/sft.json') is
    read as a file of the user's own: no validation file, report or captions from the world. The
    run changed without a word; a note says so now (and not for the '{world}' spelling)."""
    import dataclasses

    @dataclasses.dataclass
    class Config:
        data: str = "{world}/sft.json"
        val_data: str = "{world}/sft_val.json"
        world: str = str(tmp_path)
    (tmp_path / "sft.json").write_text("[]")
    cfg, _ = common.world_paths(Config(data=str(tmp_path / "sft.json")), ("data",), ("val_data",))
    out = capsys.readouterr().out
    assert cfg.val_data == "" and "note: --data names the world's sft.json by its path" in out
    assert "without the world's --val_data; give it as {world}/sft.json" in out, out
    cfg, _ = common.world_paths(Config(), ("data",), ("val_data",))
    assert cfg.val_data == str(tmp_path / "sft_val.json") and not capsys.readouterr().out
    (tmp_path / "mine.json").write_text("[]")
    common.world_paths(Config(data=str(tmp_path / "mine.json")), ("data",), ("val_data",))
    assert not capsys.readouterr().out  # (a file of the user's own: nothing to say)
    monkeypatch.setenv("WORLD_SIZE", "2")  # (under torchrun: said by rank 0 alone)
    monkeypatch.setenv("RANK", "1")
    common.world_paths(Config(data=str(tmp_path / "sft.json")), ("data",), ("val_data",))
    assert not capsys.readouterr().out


def test_a_failed_write_is_named_with_its_own_advice_and_a_bug_keeps_its_traceback(tmp_path,
                                                                                   capsys):
    """common.naming put a path on every OSError without one: a library's bare OSError (Pillow's
    'encoder error -2', no errno) became the line 'PATH: None' instead of its traceback; and a
    named error lost its advice (an I/O error's 'check the disk'). write_whole whose temp file
    could not be opened named the temp file, which is not there."""
    import errno
    log = str(tmp_path / "metrics.jsonl")
    with pytest.raises(OSError, match="encoder error"):  # (not SystemExit: a bug's traceback)
        with common.user_errors(), common.naming(log):
            raise OSError("encoder error -2")
    for code, says in ((errno.EIO, "Input/output error while reading or writing: check the disk"),
                       (errno.EFBIG, "File too large while writing"),
                       (errno.ENOSPC, "No space left on device while writing: free some space")):
        with pytest.raises(SystemExit) as e:
            with common.user_errors(), common.naming(log):
                raise OSError(code, os.strerror(code))
        assert e.value.code == 2
        assert f"{log}: {says}" in capsys.readouterr().err
    missing = str(tmp_path / "gone" / "RESULTS.md")
    with pytest.raises(FileNotFoundError) as e:
        common.write_whole(missing, lambda f: f.write("x"))
    assert e.value.filename == missing


def test_a_resume_from_a_lora_init_refuses_its_adapters_retrained_at_their_path(tmp_path):
    """A run from a LoRA checkpoint (POVID stage 2 on a LoRA stage-1 run) merges its adapters into
    the weights it starts from; a resume that builds the model from --init (FSDP shards) checked
    the base weights alone, so stage-1 adapters retrained at their path went on as the run's
    starting weights. run.json's fingerprint covers them now; files only touched still go on."""
    from checkpoint import init_fingerprint, save_checkpoint_files
    from test_model import randomize_adapter, tiny_model
    save_checkpoint_files(tiny_model(), tmp_path / "base")
    stage1 = tiny_model()
    stage1.add_adapter("default", r=2, alpha=2)
    randomize_adapter(stage1, "default", 1)
    save_checkpoint_files(stage1, tmp_path / "stage1", base=tmp_path / "base")
    resumed = tmp_path / "run" / "checkpoint-000002"  # (shards: no base_fingerprint of its own)
    resumed.mkdir(parents=True)
    (resumed / "config.json").write_text("{}")
    run_file = tmp_path / "run" / rundir.RUN_FILE
    run_file.write_text(json.dumps({"init_fingerprint": init_fingerprint(tmp_path / "stage1")}))
    adapters = tmp_path / "stage1" / "adapters.safetensors"
    os.utime(adapters, (1, 1))  # (touched, the same bytes: goes on)
    rundir.check_base_unchanged(str(resumed), str(tmp_path / "stage1"), "stage1")
    randomize_adapter(stage1, "default", 2)  # (stage 1 trained again into its folder)
    save_checkpoint_files(stage1, tmp_path / "stage1", base=tmp_path / "base")
    with pytest.raises(common.ConfigError, match="holds other weights than this run started"):
        rundir.check_base_unchanged(str(resumed), str(tmp_path / "stage1"), "stage1")


def test_a_stop_that_waits_on_a_stuck_process_says_so(monkeypatch, capsys):
    """pipeline's and lab's stop waits for each stopped child; one that does not end (stuck, or
    ignoring SIGINT) was waited for without a word, a hung stop to the user. After STOP_PATIENCE
    it says which processes it waits for and how to end them, then goes on waiting."""
    import threading
    stuck = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                              "print('ready', flush=True)\ntime.sleep(60)\n"],
                             stdout=subprocess.PIPE, text=True)
    quick = subprocess.Popen([sys.executable, "-c", "import time\ntime.sleep(60)\n"])
    assert stuck.stdout.readline() == "ready\n"
    monkeypatch.setattr(distributed, "STOP_PATIENCE", 0.5)
    killer = threading.Timer(3.0, stuck.kill)
    killer.start()
    try:
        distributed.stop_processes([quick, stuck], grace=False)
    finally:
        killer.cancel()
        stuck.kill()
    assert quick.returncode != 0 and stuck.returncode == -9  # (waited for until it ended)
    assert capsys.readouterr().err == (
        f"still waiting for 1 process to stop (it may be saving a checkpoint); `kill -9 "
        f"{stuck.pid}` ends it now (checkpoints saved stay whole)\n")


def test_a_refused_rank_hands_its_line_over_only_to_other_nodes(monkeypatch):
    """A rank refused before the process group joins it to hand its line to the ranks of other
    nodes (they waited 30 minutes). On one node torchrun stops the other ranks itself, and the
    join, inside C++, held a Ctrl-C and the exit for up to a minute: it is not made there."""
    joined = []

    def join(*args, **kwargs):
        joined.append(os.environ["LOCAL_WORLD_SIZE"])
        raise RuntimeError("no peers here")
    monkeypatch.setattr(common.dist, "init_process_group", join)
    monkeypatch.setattr(common, "_runs_alone", False)  # (another test's refuse_torchrun may set it)
    monkeypatch.setattr(distributed, "made_process_group", False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local_world in ("2", "1"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        common.tell_the_waiting_ranks("bad flag")
    assert joined == ["1"]
    # a script whose ranks never make a group (eval, pipeline, lab: refuse_torchrun) has no one
    # waiting to tell
    monkeypatch.setattr(common, "_runs_alone", True)
    common.tell_the_waiting_ranks("bad flag")
    assert joined == ["1"]


def test_only_gloos_peer_closed_error_is_taken_for_another_rank_gone(monkeypatch):
    """Under torchrun a collective failing because another rank's process ended is one line per
    node (exit 1); any other "Connection reset by peer" (an HTTP client's, a bug's) keeps its
    traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    gloo = "[third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:5"
    with pytest.raises(SystemExit) as e, common.user_errors():
        raise RuntimeError(gloo)
    assert e.value.code == 1
    with pytest.raises(RuntimeError, match="reset by peer"), common.user_errors():
        raise RuntimeError("Connection reset by peer")


def test_a_linked_out_that_cannot_be_written_says_why(tmp_path, monkeypatch):
    """--out a link to a folder that is there, its write failing (a full disk): it read "file not
    found", which only a link that loops or points nowhere is; it is the write's error now."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    real_open = open

    def full_disk(path, *args, **kwargs):
        if ".write-test-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(common.ConfigError, match=r"link: output directory cannot be written "
                                                 r"\(No space left on device\)$"):
        rundir.ensure_writable(str(tmp_path / "link"))


def test_a_run_copied_with_hard_links_takes_a_lock_of_its_own(tmp_path):
    """`cp -al run copy` links run/.lock too: the copy's lock_out locked the original's file, so
    the copy was refused while the original ran ('another process is writing there'), and wrote
    its pid into the original's .lock. The copy's .lock is a file of its own now."""
    run, copy = tmp_path / "run", tmp_path / "copy"
    import multiprocessing
    import tempfile
    import time
    run.mkdir()
    locked = multiprocessing.get_context("fork").Event()

    def hold():  # (another process: a forked copy of this one)
        rundir.lock_out(str(run))
        locked.set()
        time.sleep(60)
    holder = forked(hold, tempfile.TemporaryFile("w+"))
    try:
        assert locked.wait(60)
        copy.mkdir()
        os.link(run / rundir.LOCK, copy / rundir.LOCK)
        rundir.lock_out(str(copy))
        assert (run / rundir.LOCK).read_text() == f"{holder.pid}\n"
        assert (copy / rundir.LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        rundir.release_locks()
        holder.kill()
        holder.join()


def test_an_out_under_a_link_that_names_nothing_says_so(tmp_path):
    """--out sl/run where sl is a symbolic link to a folder that is gone read "cannot be written
    (File exists)"; the link on the way is named."""
    (tmp_path / "sl").symlink_to(tmp_path / "gone")
    with pytest.raises(common.ConfigError, match=f"^{tmp_path / 'sl' / 'run'}: output directory: "
                                                 f"{tmp_path / 'sl'} is a symbolic link to "
                                                 f"{tmp_path / 'gone'}, which is not there$"):
        rundir.ensure_writable(str(tmp_path / "sl" / "run"))
