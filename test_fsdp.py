"""FSDP2 (--fsdp true) on CPU: gloo, the tiny preset, `torchrun --nproc_per_node 2` subprocesses.

- sft and dpo: the 2-process sharded run logs the losses of one plain process within 1e-5, and its
  consolidated final checkpoint holds the weights of the 1-process checkpoint within 1e-5;
- each rank's shard files hold about half of the parameters and of the AdamW moments (read from the
  torch.distributed.checkpoint metadata, not assumed);
- a 2-process run killed with SIGKILL mid-run (all processes at once) and resumed with --resume true
  ends bitwise where the uninterrupted run ends;
- --fsdp where it cannot work is one line and exit 2.
torchrun subprocesses cost seconds each, so one uninterrupted sft run serves three checks.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import HERE, assert_same_metrics, descendants, free_port, run_cli

# align 1 + instruct 5; checkpoints at 2, 4, 6 (the kill lands after 2: Adam moments in flight)
STEPS = 6


def torchrun(script, argv, nproc=2, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", os.path.join(HERE, script), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc):
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    return out


def run_script_here(argv):
    """`python SCRIPT.py FLAGS...` as run_cli runs it: in this process (--fsdp on one process needs
    no launcher, and a new interpreter would cost seconds of start-up)."""
    return run_cli(argv[0].removesuffix(".py"), argv[1:], strict=True)


def rows(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def same_metrics(one, two, keys):
    a = rows(one)
    assert assert_same_metrics(a, rows(two), keys, min_rows=3) >= len(a)


def same_weights(ck_one, ck_two, exact=False):
    files = [f for f in ("model.safetensors", "adapters.safetensors")
             if os.path.exists(os.path.join(ck_one, f))]
    assert files, ck_one  # (a sharded checkpoint before the last step holds shards/ alone)
    for f in files:
        a, b = load_file(os.path.join(ck_one, f)), load_file(os.path.join(ck_two, f))
        assert a.keys() == b.keys() and a
        for k in a:
            ok = torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], atol=1e-5, rtol=0)
            assert ok, (f, k, float((a[k] - b[k]).abs().max()))


def per_rank_elements(ck):
    """Elements of model weights and of AdamW moments in each rank's shard file, from the
    torch.distributed.checkpoint metadata (which file holds which chunk of which tensor)."""
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(os.path.join(ck, "shards")).read_metadata()
    held = {}
    for index, info in meta.storage_data.items():
        tensor = meta.state_dict_metadata[index.fqn]
        if not hasattr(tensor, "chunks"):  # pickled bytes (optimizer param groups)
            continue
        chunk = next(c for c in tensor.chunks if tuple(c.offsets) == tuple(index.offset))
        if index.fqn.startswith("model."):
            kind = "model"
        elif "exp_avg" in index.fqn:
            kind = "moments"
        else:
            kind = "other"
        held.setdefault(kind, {}).setdefault(info.relative_path, 0)
        held[kind][info.relative_path] += chunk.sizes.numel()
    return held


def sft_args(world, out, *extra):
    return ["--model", "tiny", "--world", world, "--max_steps", str(STEPS), "--align_steps", "1",
            "--align_batch_size", "8", "--batch_size", "8", "--report", "false", "--log_every", "1",
            "--eval_every", "3", "--save_every", "2", "--out", str(out), *extra]


def test_sft_fsdp_equals_one_process_shards_by_half_and_resumes_bitwise_after_sigkill(
        tiny_world, tmp_path, monkeypatch):
    """(Also: rank 1 builds the fresh model on the meta device, and takes rank 0's weights and
    random streams: it drew neither, and its LoRA dropout masks would differ from a run where
    every rank drew the model.)"""
    from checkpoint import load_checkpoint
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    straight = watched_sft(sft_args(tiny_world, two, "--fsdp", "true"), tmp_path / "seen",
                           monkeypatch)
    # the same run, killed (every process at once, SIGKILL) once checkpoint 2 is complete
    victim = torchrun("sft.py", sft_args(tiny_world, killed, "--fsdp", "true"))
    deadline = time.time() + 240
    while victim.poll() is None and time.time() < deadline:
        if os.path.exists(killed / "checkpoint-000002" / "config.json"):
            break
        time.sleep(0.005)
    for pid in [victim.pid] + descendants(victim.pid):  # the launcher and its workers, at once
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = victim.communicate()[0]
    assert victim.returncode == -signal.SIGKILL, (
        f"not killed mid-run (exit {victim.returncode}): {log[-2000:]}")
    assert not os.path.exists(killed / f"checkpoint-{STEPS:06d}")
    code, stdout, err = run_cli("sft", sft_args(tiny_world, one))  # one plain process, meanwhile
    assert code == 0 and "1 process(es)" in stdout, err
    assert "2 process(es)" in finish(straight)
    seen = seen_by_rank(tmp_path / "seen")
    assert [s["before"] for s in seen] == [["cpu"], ["meta"]], seen
    assert seen[0]["streams"] == seen[1]["streams"], seen
    resume_args = sft_args(tiny_world, killed, "--fsdp", "true", "--resume", "true")
    resumed = finish(torchrun("sft.py", resume_args))
    assert "resumed from" in resumed
    final = f"checkpoint-{STEPS:06d}"

    # 1. the losses of one process, and the same final weights (consolidated from the shards)
    same_metrics(one, two, ["loss", "grad_norm", "val_loss"])
    same_weights(one / final, two / final)
    # the consolidated model loads as usual
    assert load_checkpoint(str(two / final)).config.hidden == 32
    # sharded only, by default
    assert not os.path.exists(two / "checkpoint-000004" / "model.safetensors")

    # 2. each rank holds about half of the weights and of the AdamW moments, measured from its shard
    # file
    n_params = sum(t.numel() for t in load_file(str(two / final / "model.safetensors")).values())
    held = per_rank_elements(two / final)
    # full fine-tune: all trained
    for kind, total in (("model", n_params), ("moments", 2 * n_params)):
        assert sorted(held[kind]) == ["__0_0.distcp", "__1_0.distcp"], held
        assert sum(held[kind].values()) == total, (kind, held[kind], total)
        for rank_file, n in held[kind].items():
            assert 0.4 <= n / total <= 0.6, (kind, rank_file, n, total)

    # 3. killed and resumed == uninterrupted, bitwise (weights, last loss, the shards' AdamW
    # moments)
    same_weights(two / final, killed / final, exact=True)
    assert rows(killed)[-2]["loss"] == rows(two)[-2]["loss"]
    import torch.distributed.checkpoint as dcp
    a, b = ({}, {})
    for path, into in ((two / final / "shards", a), (killed / final / "shards", b)):
        meta = dcp.FileSystemReader(str(path)).read_metadata()
        moments = {k: torch.empty(m.size)
                   for k, m in meta.state_dict_metadata.items() if "exp_avg" in k}
        into.update(moments)
        with warnings.catch_warnings():  # (a plain read, in this process)
            warnings.simplefilter("ignore")
            dcp.load(into, checkpoint_id=str(path), no_dist=True)
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_full_finetune_fsdp_equals_one_process(tiny_sft, tiny_world, tmp_path):
    """Full fine-tune DPO: the reference log-probs are computed by the sharded model itself
    (cached)."""
    argv = ["--init", tiny_sft, "--world", tiny_world, "--lora_r", "0", "--max_steps", "3",
            "--batch_size", "8", "--log_every", "1", "--eval_every", "3", "--save_every", "3",
            "--eval_n", "12"]
    two = torchrun("dpo.py", argv + ["--fsdp", "true", "--out", str(tmp_path / "two")])
    code, _, err = run_cli("dpo", argv + ["--out", str(tmp_path / "one")])
    assert code == 0, err
    assert "2 process(es)" in finish(two)
    keys = ["loss", "rewards/margins", "logps/chosen", "grad_norm", "val_reward_accuracy",
            "val_reward_margin"]
    same_metrics(tmp_path / "one", tmp_path / "two", keys)
    same_weights(tmp_path / "one/checkpoint-000003", tmp_path / "two/checkpoint-000003")


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_fsdp_where_it_cannot_work_is_one_line_and_exit_2(script, tiny_world, tiny_sft, tmp_path,
                                                          monkeypatch):
    code, _, err = run_cli("ppo", ["--fsdp", "true", "--out", str(tmp_path / "ppo")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "ppo.py --fsdp: not supported" in err, err
    # what torchrun --nproc_per_node 2 sets; the check comes before any process group or file
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--world", tiny_world, "--fsdp", "true", "--batch_size", "3",
            "--out", str(tmp_path / script)]
    model_args = ["--init", tiny_sft] if script == "dpo" else ["--model", "tiny"]
    code, _, err = run_cli(script, argv + model_args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--batch_size 3 does not split over the 2 processes" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / script)


def test_fsdp_lora_run_resumes_from_its_shards(tiny_sft, tiny_world, tmp_path):
    """A sharded LoRA run (every base weight frozen, so not in the shards) resumed from a mid-run
    checkpoint: loading the shards into the model failed on the frozen weights ('Missing key(s)
    in state_dict'); it ends where the run that was not stopped ends. A truncated shard is one
    line naming it."""
    import shutil
    argv = ["dpo.py", "--init", tiny_sft, "--world", tiny_world, "--max_steps", "4",
            "--save_every", "2", "--batch_size", "4", "--eval_n", "4", "--fsdp", "true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = run_script_here(argv + ["--out", str(straight)])
    assert code == 0, err
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint-000004")  # as if killed after step 2's checkpoint
    # read as a model (eval --ckpt, a stage's --init of the killed run): it said "no weights
    # found" or "adapters.safetensors: file not found"
    from checkpoint import CheckpointError, load_checkpoint
    with pytest.raises(CheckpointError, match="an FSDP checkpoint of shards alone .*resume its "
                                              "run .*--save_full true"):
        load_checkpoint(str(resumed / "checkpoint-000002"))
    # a shard cut off (copied in part): a CheckpointError (one line) naming the file, not
    # "CheckpointException ranks:dict_keys([0])" (checked in this process, as restore() does)
    import common
    import rundir
    shard = resumed / "checkpoint-000002" / "shards" / "__0_0.distcp"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:3000])
    with pytest.raises(common.CheckpointError) as e:
        rundir.check_shard_files(str(shard.parent.parent))
    assert str(e.value) == (
        f"{shard}: truncated (3000 bytes; the shards' index reads up to byte {len(whole)}); the "
        f"checkpoint is damaged: move {shard.parent.parent} away and --resume takes the one "
        "before it")
    index = shard.parent / ".metadata"
    kept = index.read_bytes()
    index.write_bytes(kept[:100])
    with pytest.raises(common.CheckpointError, match=r"\.metadata: cannot be read"):
        rundir.check_shard_files(str(shard.parent.parent))
    index.write_bytes(kept)
    shard.unlink()
    with pytest.raises(common.CheckpointError, match=r"__0_0\.distcp: missing"):
        rundir.check_shard_files(str(shard.parent.parent))
    shard.write_bytes(whole)
    code, said, err = run_script_here(argv + ["--out", str(resumed), "--resume", "true"])
    assert code == 0 and "resumed from" in said, err[-2000:]
    same_weights(straight / "checkpoint-000004", resumed / "checkpoint-000004")


@pytest.mark.parametrize("script,extra", [("sft.py", ["--train_vision", "false", "--align_steps",
                                                     "1", "--read_steps", "1"]),
                                          ("vigc.py", ["--init", "", "--lora_r", "4", "--generate",
                                                       "0"])])
def test_fsdp_fresh_model_with_frozen_weights_resumes_bitwise(script, extra, tiny_world,
                                                               tmp_path):
    """A fresh --model (no --init) with frozen weights (a frozen tower, or a LoRA's base), sharded:
    the shards hold the trained weights only, and on resume the fresh model was built from the
    checkpoint's random streams, not --seed's, so every frozen weight differed from the run that
    was not stopped."""
    argv = [script, "--model", "tiny", "--world", tiny_world, "--max_steps", "4", "--save_every",
            "2", "--batch_size", "8", "--fsdp", "true", *extra]
    if script == "sft.py":
        argv += ["--report", "false", "--align_batch_size", "8"]
    stopped_and_resumed(argv, tmp_path)


def stopped_and_resumed(argv, root, meanwhile=lambda: None):
    """`python argv` for 4 steps (checkpoints at 2 and 4) into root/straight, and the same run
    stopped after step 2 (a copy without checkpoint 4), `meanwhile` run, then resumed: the two
    end bitwise alike. Returns the resumed run's stdout."""
    import shutil
    straight, resumed = root / "straight", root / "resumed"
    code, _, err = run_script_here(argv + ["--out", str(straight)])
    assert code == 0, err[-2000:]
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint-000004")
    meanwhile()
    code, said, err = run_script_here(argv + ["--out", str(resumed), "--resume", "true"])
    assert code == 0 and "resumed from" in said, err[-2000:]
    same_weights(straight / "checkpoint-000004", resumed / "checkpoint-000004", exact=True)
    return said


@pytest.mark.parametrize("script,extra", [("sft.py", ["--report", "false"]),
                                          ("vigc.py", ["--generate", "0"])])
def test_fsdp_resume_keeps_the_base_the_run_was_trained_on(script, extra, tiny_sft, tiny_world,
                                                           tmp_path):
    """sft.py and vigc.py resumed from shards built their frozen weights from --init's newest
    checkpoint: an --init run folder that had grown a checkpoint since moved the resumed run onto
    other weights without a word (dpo, reward and ppo resumed on the recorded base)."""
    import shutil
    from checkpoint import load_checkpoint, save_checkpoint_files
    init = tmp_path / "init"
    shutil.copytree(tiny_sft, init)
    argv = [script, "--init", str(init), "--world", tiny_world, "--max_steps", "4",
            "--save_every", "2", "--batch_size", "8", "--lora_r", "4", "--fsdp", "true", *extra]

    def grow():  # (--init's run, trained on since)
        grown = load_checkpoint(str(init / "checkpoint-000003"))
        with torch.no_grad():
            for p in grown.parameters():
                p.add_(0.05)
        save_checkpoint_files(grown, str(init / "checkpoint-000009"))
        for f in os.listdir(init / "checkpoint-000003"):
            if "token" in f:
                shutil.copy(init / "checkpoint-000003" / f, init / "checkpoint-000009")
    said = stopped_and_resumed(argv, tmp_path, grow)
    assert f"note: --init {init} now holds {init / 'checkpoint-000009'}" in said, said


def test_fsdp_resume_refuses_an_init_rewritten_at_its_path(tiny_sft, tiny_world, tmp_path):
    """A sharded full fine-tune builds its frozen weights (here the vision tower) from --init at
    --resume, the shards holding the trained ones alone: an --init retrained in its folder since
    the run started (sft.py --overwrite true there) went on as the run's frozen tower, exit 0
    (every tensor off the run not stopped). run.json records --init's fingerprint: files only
    touched go on; other weights are refused in one line naming them."""
    import shutil
    from checkpoint import load_checkpoint, save_checkpoint_files
    init = tmp_path / "init"
    shutil.copytree(tiny_sft, init)
    out = tmp_path / "out"
    argv = ["--init", str(init), "--world", tiny_world, "--batch_size", "4", "--report", "false",
            "--save_every", "1", "--lora_r", "0", "--train_vision", "false", "--fsdp", "true",
            "--out", str(out)]
    code, _, err = run_cli("sft", argv + ["--max_steps", "1"])
    assert code == 0, err
    ckpt = init / "checkpoint-000003"
    for f in ckpt.iterdir():
        os.utime(f, (time.time() + 60, time.time() + 60))  # (the same bytes)
    code, said, err = run_cli("sft", argv + ["--max_steps", "2", "--resume", "true"])
    assert code == 0 and "resumed from" in said, err
    other = load_checkpoint(str(ckpt))
    with torch.no_grad():
        other.vision_tower.embeddings.patch_embedding.weight.mul_(1.5)
    save_checkpoint_files(other, str(ckpt))
    code, said, err = run_cli("sft", argv + ["--max_steps", "3", "--resume", "true"])
    assert code == 2 and "resumed from" not in said, err
    assert err.strip() == f"error: --init {init}: {ckpt} holds other weights than this run " \
        "started from (retrained or replaced at its path since: its fingerprint differs from " \
        "the one the run recorded); put those back, or start a new run", err


def test_a_rank_that_cannot_read_its_part_stops_every_rank(tiny_sft, tiny_world, tmp_path):
    """An FSDP checkpoint that one rank cannot read (its random streams' file gone): that rank
    said so and stopped; rank 0 went on into the collective load and ended in gloo's traceback
    ("Connection closed by peer"; on NCCL, a hang). Every rank stops with one line now."""
    import shutil
    argv = ["--init", tiny_sft, "--world", tiny_world, "--max_steps", "4", "--save_every", "2",
            "--batch_size", "4", "--eval_n", "4", "--fsdp", "true"]
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    finish(torchrun("dpo.py", argv + ["--out", str(straight)]))
    shutil.copytree(straight, damaged)
    shutil.rmtree(damaged / "checkpoint-000004")
    lost = damaged / "checkpoint-000002" / "rng-rank1.pt"
    lost.unlink()
    proc = torchrun("dpo.py", argv + ["--out", str(damaged), "--resume", "true"])
    out = proc.communicate(timeout=240)[0]
    # (torchrun's own launcher prints its ChildFailedError; no worker prints a traceback)
    ours = re.search('File "' + re.escape(HERE) + r'/\w+\.py"', out)  # (a frame of our code)
    assert proc.returncode != 0 and not ours, out[-3000:]
    assert "Connection closed" not in out and f"error (rank 1): {lost}: missing" in out, out[-3000:]
    assert f"error: {damaged / 'checkpoint-000002'}: another process could not read its part " \
        "of this checkpoint (its line says why)" in out, out[-3000:]


# sft.py as torchrun runs it, each rank recording the weights it read from the checkpoint's files
# (TensorSource.get), the devices of its parameters as shard_model gets them and after it, and its
# random streams after it
WATCHED_SFT = """
import hashlib, json, os, runpy, sys
here = sys.argv.pop(1)
sys.path.insert(0, here)
import torch
import checkpoint
import distributed
seen = {"read": 0}
real_get, real_shard = checkpoint.TensorSource.get, distributed.shard_model
def get(self, part, name):
    seen["read"] += 1
    return real_get(self, part, name)
def shard_model(model, d, bf16=False):
    seen["before"] = sorted({p.device.type for p in model.parameters()})
    real_shard(model, d, bf16)
    seen["after"] = sorted({p.device.type for p in model.parameters()})
    seen["streams"] = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
    with open(os.path.join(os.environ["SEEN_DIR"], os.environ["RANK"] + ".json"), "w") as f:
        json.dump(seen, f)
    return model
checkpoint.TensorSource.get, distributed.shard_model = get, shard_model
sys.argv[0] = os.path.join(here, "sft.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def watched_sft(argv, seen_dir, monkeypatch):
    """torchrun sft.py argv, each rank writing what WATCHED_SFT records to seen_dir/RANK.json."""
    os.makedirs(seen_dir)
    watched = os.path.join(seen_dir, "watched_sft.py")
    with open(watched, "w") as f:
        f.write(WATCHED_SFT)
    monkeypatch.setenv("SEEN_DIR", str(seen_dir))
    return torchrun(watched, [HERE] + argv)


def seen_by_rank(seen_dir):
    return [json.loads(open(os.path.join(seen_dir, f"{rank}.json")).read()) for rank in (0, 1)]


def test_fsdp_with_text_only_records_beside_image_ones(tiny_sft, tiny_world, tmp_path,
                                                       monkeypatch):
    """Data mixing text-only and image records (LLaVA's mix665k, ScienceQA): a rank whose
    micro-batch had no image skipped the tower while the other all-gathered its layers (gloo:
    'Received data size doesn't match expected size', SIGABRT; NCCL would hang). The tower now
    runs on every rank, its features weighted 0 where there is no image: the losses are those of
    one plain process. Rank 1 builds the model on the meta device and reads no weight of --init
    (every rank held the whole fp32 model in host memory before sharding: 8 x 28 GB on a node of
    8 ranks at 7B): rank 0's are broadcast into its shards."""
    recs = [r for r in json.load(open(os.path.join(tiny_world, "sft.json"))) if "image" in r][:8]
    text_only = []
    for r in recs:
        turns = [dict(t, value=t["value"].replace("<image>\n", "").replace("\n<image>", ""))
                 for t in r["conversations"]]
        text_only.append({"id": r["id"] + "-text", "conversations": turns})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([x for pair in zip(recs, text_only) for x in pair]))
    argv = ["--init", tiny_sft, "--data", str(data), "--image_folder", tiny_world, "--world",
            tiny_world, "--max_steps", "6", "--batch_size", "2", "--report", "false",
            "--log_every", "1", "--eval_every", "0", "--save_every", "6", "--val_data", ""]
    two = watched_sft(argv + ["--fsdp", "true", "--out", str(tmp_path / "two")], tmp_path / "seen",
                      monkeypatch)
    code, _, err = run_cli("sft", argv + ["--out", str(tmp_path / "one")])
    assert code == 0, err
    assert "2 process(es)" in finish(two)
    same_metrics(tmp_path / "one", tmp_path / "two", ["loss"])
    seen = seen_by_rank(tmp_path / "seen")
    assert seen[0]["read"] > 0 and seen[0]["before"] == ["cpu"], seen
    assert seen[1]["read"] == 0 and seen[1]["before"] == ["meta"] and seen[1]["after"] == ["cpu"]


def test_reward_sampled_pairs_under_fsdp_equal_one_process(tiny_sft, tiny_world, tmp_path):
    """reward.py --pairs sampled --fsdp: each rank samples its share of the pairs with a whole
    model of its own, before sharding (in parallel: rank 0 alone sampling every pair was tried in
    session 48 and not taken, N times slower). The pairs are those of one plain process, as
    sample_pairs promises at any world size, and so are the trained weights (within FSDP's sums)."""
    argv = ["--init", tiny_sft, "--world", tiny_world, "--pairs", "sampled", "--n_sampled", "33",
            "--sample_max_new_tokens", "8", "--eval_size", "4", "--eval_prompt", "short",
            "--max_steps", "1", "--batch_size", "2", "--lora_r", "4"]
    two = torchrun("reward.py", argv + ["--fsdp", "true", "--out", str(tmp_path / "two")])
    code, _, err = run_cli("reward", argv + ["--out", str(tmp_path / "one")])
    assert code == 0, err
    assert "2 process(es)" in finish(two)
    pairs = [json.load(open(tmp_path / run / "sampled_pairs.json")) for run in ("one", "two")]
    assert pairs[0] == pairs[1] and pairs[0]["train"], pairs[0]["stats"]
    assert pairs[0]["stats"]["train"]["prompts"] == 33
    same_weights(tmp_path / "one" / "checkpoint-000001", tmp_path / "two" / "checkpoint-000001")


def test_two_process_lora_dropout_resumes_bitwise_and_a_refused_launch_touches_nothing(
        tiny_world, tiny_sft, tmp_path):
    """Replicated (no --fsdp) 2-process runs: a checkpoint held rank 0's random streams only, and
    on resume every rank took them, so rank 1's LoRA dropout masks changed (sft.py --lora_r 4's
    default dropout 0.05: 39 of 46 tensors off, up to 1.5e-3): now each rank's are saved and
    restored. A second launch on a locked --out: rank 1 went on while rank 0 was refused, and its
    --resume cleaned the running writer's half-written checkpoint away: now every rank waits for
    rank 0's answer (eval.py under torchrun: test_pipeline.py). Resumed by
    one process: a note (not bitwise). Every rank said "resumed from" (now rank 0), and two ranks'
    error lines ran together (now each whole, rank 1's named)."""
    import shutil
    import common
    import rundir
    argv = ["--init", tiny_sft, "--world", tiny_world, "--max_steps", "4", "--batch_size", "8",
            "--report", "false", "--save_every", "2", "--lora_r", "4", "--lora_dropout", "0.1",
            "--lr", "1e-3"]
    finish(torchrun("sft.py", argv + ["--out", str(tmp_path / "straight")]))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-000004")
    os.remove(tmp_path / "resumed" / ".lock")
    out = finish(torchrun("sft.py", argv + ["--out", str(tmp_path / "resumed"), "--resume",
                                            "true"]))
    assert out.count("resumed from") == 1, out[-2000:]  # (rank 0 says it; every rank did)
    same_weights(str(tmp_path / "straight" / "checkpoint-000004"),
                 str(tmp_path / "resumed" / "checkpoint-000004"), exact=True)
    # resumed by one process: allowed (a node lost), and said (it is not bitwise)
    shutil.copytree(tmp_path / "straight", tmp_path / "alone")
    shutil.rmtree(tmp_path / "alone" / "checkpoint-000004")
    code, out, err = run_cli("sft", argv + ["--out", str(tmp_path / "alone"), "--resume", "true"])
    assert code == 0 and "note: --resume on 1 process(es), the checkpoint was written by 2: " \
        "the same global batches, summed in another order" in out, err
    # an error every rank meets: each rank's line whole (one write), rank 1's named as its own
    writes = []
    for rank in ("0", "1"):
        env = {"RANK": rank, "WORLD_SIZE": "2"}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            mp.setattr(sys, "stderr", type("W", (), {"write": writes.append,
                                                     "flush": lambda self: None})())
            with pytest.raises(SystemExit):
                common.fail("bad.json: record 0")
    assert writes == ["error: bad.json: record 0\n", "error (rank 1): bad.json: record 0\n"]
    # a writer holds --out (this process's lock); its checkpoint in the making must survive
    held = tmp_path / "resumed"
    rundir.lock_out(str(held))
    try:
        (held / ".tmp-checkpoint-999999-writing").mkdir()
        # (--data outside the world: no wait for rank 0 writing the world held rank 1 back)
        data = ["--data", os.path.join(tiny_world, "sft.json"), "--image_folder", tiny_world]
        proc = torchrun("sft.py", argv + data + ["--out", str(held), "--resume", "true"])
        out = proc.communicate(timeout=240)[0]
        assert proc.returncode != 0 and "another process" in out, out[-2000:]
        assert (held / ".tmp-checkpoint-999999-writing").is_dir()
    finally:
        rundir.release_locks()


def test_a_gpu_process_group_takes_cpu_tensors_too(monkeypatch):
    """`--device cuda` under torchrun made an NCCL-only process group, which refuses the CPU tensors
    every stage all-reduces (counts, the DPO held-out sums): step 1 failed on any GPU run. The group
    now has gloo for CPU tensors beside NCCL for CUDA ones. (No GPU here: the group is caught.)"""
    import torch.distributed as dist
    import distributed
    made = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "check_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(distributed, "join_process_group", made.append)  # (init_process_group's)
    monkeypatch.setattr(distributed, "made_process_group", False)
    d = distributed.setup_dist("cuda")
    devices = dist.BackendConfig(dist.Backend(made[0])).get_device_backend_map()
    assert devices == {"cpu": "gloo", "cuda": "nccl"} and d.device == torch.device("cuda", 0)


def test_fsdp_bf16_lora_and_head_run_outside_autocast():
    """Under --fsdp --dtype bf16 the mixed-precision policy gives LoRA and the scalar heads bf16
    weights to compute with, but both cast their input to fp32 first: every pass outside autocast
    (reward.py's steps, held-out losses) failed on mismatched dtypes. One rank, gloo, on the CPU,
    in a process of its own (FSDP's threads can abort an interpreter's exit:
    distributed.end_process)."""
    script = """
import json, os, sys, torch, torch.distributed as dist
import common
import distributed
import rundir
from test_model import inputs, randomize_adapter, tiny_model
model = tiny_model()
model.add_adapter("reward", r=4, alpha=8)
randomize_adapter(model, "reward", 4)
model.add_head("reward")
with torch.no_grad():
    model.heads["reward"].weight.normal_()
model.set_adapter("reward")
pixels, ids = inputs()
mask = torch.ones_like(ids)
with torch.no_grad():
    want = common.score_sequences(model, "reward", ids, mask, model.encode_images(pixels))
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
distributed.shard_model(model, distributed.Dist(device=torch.device("cpu"), fsdp=True), bf16=True)
with torch.no_grad():
    got = common.score_sequences(model, "reward", ids, mask, model.encode_images(pixels))
print(json.dumps({"dtype": str(got.dtype), "want": want.tolist(), "got": got.tolist()}))
sys.stdout.flush()
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "torch.float32", out
    assert torch.allclose(torch.tensor(out["got"]), torch.tensor(out["want"]), atol=0.1,
                          rtol=0.05), out


def test_a_sharded_run_builds_on_the_cpu_and_gathers_only_what_is_used(tiny_sft, tiny_world,
                                                                        tmp_path, monkeypatch):
    """--fsdp: every GPU loaded the whole fp32 model before sharding (fully_shard moves each unit
    there as it shards it), and rank 0 gathered a full copy onto its GPU beside the optimizer's
    state even where nothing used it (a full fine-tune without the Shapes report). The model is
    built on the CPU; the gather happens for the LoRA merge (on the CPU) and for answers alone."""
    import common
    import distributed
    loaded, gathered = [], []
    real_load, real_gather = common.load_model_and_tokenizer, distributed.gather_full_model
    marker = torch.device("cpu")  # (what load_device gives, told apart from d.device by identity)
    monkeypatch.setattr(common, "load_model_and_tokenizer",
                        lambda *a, **k: loaded.append(k.get("device", a[4] if len(a) > 4 else None)
                                                      is marker) or real_load(*a, **k))
    monkeypatch.setattr(distributed, "gather_full_model",
                        lambda model, d, device="cpu": gathered.append(str(device))
                        or real_gather(model, d, device))
    monkeypatch.setattr(distributed, "load_device", lambda cfg, d: marker if cfg.fsdp else d.device)
    base = ["--init", tiny_sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--fsdp", "true", "--report", "false"]
    # (the last checkpoint's consolidated weights are gathered on the CPU in every run)
    for lora, want in (("0", ["cpu"]), ("4", ["cpu", "cpu"])):
        loaded.clear(), gathered.clear()
        code, _, err = run_cli("sft", base + ["--lora_r", lora, "--out", str(tmp_path / lora)])
        assert code == 0, err
        assert loaded == [True] and gathered == want, (lora, loaded, gathered)


RANK_THAT_WAITS = """
import sys, time
sys.path.insert(0, sys.argv[1])
import common
import distributed
import rundir
distributed.setup_dist("cpu")
print("ready", flush=True)
time.sleep(60)
"""


def running(pid):
    """pid is a process not yet dead (a zombie waiting to be reaped is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_launcher_killed_outright_takes_its_ranks_with_it(tmp_path, nproc):
    """torchrun's launcher killed with SIGKILL (kill -9, the OOM killer) cannot stop its ranks:
    they trained on as orphans, into --out and holding its lock. Each now dies with it (a single
    rank too: setup_dist's world of one returned before asking)."""
    (tmp_path / "rank.py").write_text(RANK_THAT_WAITS)
    launcher = torchrun(str(tmp_path / "rank.py"), [HERE], nproc=nproc)
    ready = 0
    while ready < nproc:  # (every rank past setup_dist)
        line = launcher.stdout.readline()
        assert line, "torchrun ended early"
        ready += line.count("ready")  # (two ranks' lines can land in one read)
    ranks = descendants(launcher.pid)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(running(p) for p in ranks):
        time.sleep(0.1)
    alive = [p for p in ranks if running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"ranks {alive} outlived their launcher"


# -- two nodes on one host: `torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1` twice ---------

def two_nodes(script, argv, logs, cwds=(HERE, HERE), node1_argv=None):
    """Node 0's and node 1's launchers, as two machines start them (one master address and port).
    cwds: each node's working folder: a relative --out then names a folder of each node's own, as
    on nodes that share no file system. Their output goes to logs/node0.log and node1.log."""
    port, procs = free_port(), []
    os.makedirs(logs, exist_ok=True)
    for node, (cwd, args) in enumerate(zip(cwds, (argv, node1_argv or argv))):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               os.path.join(HERE, script), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
        log = open(os.path.join(logs, f"node{node}.log"), "w")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def both_ended(procs, logs, within=90):
    """Each node's output once both launchers have ended; a node still running after `within`
    seconds (a rank left in a collective) is killed and fails the test."""
    import distributed
    distributed.wait_a_moment(procs, within)
    hung = [node for node, p in enumerate(procs) if p.poll() is None]
    for node in hung:
        os.killpg(procs[node].pid, signal.SIGKILL)
        procs[node].wait()
    out = [open(os.path.join(logs, f"node{node}.log")).read() for node in range(len(procs))]
    assert not hung, f"node(s) {hung} still running after {within} s: {out}"
    return out


def no_worker_traceback(out):
    """No frame of our scripts in a node's output (torchrun's launcher prints its own
    ChildFailedError)."""
    return not re.search('File "' + re.escape(HERE) + r'/\w+\.py"', out) and \
        "Connection closed" not in out and "Connection reset" not in out


def test_two_nodes_of_one_process_train_as_one_node_of_two(tiny_world, tmp_path):
    """2 nodes x 1 process with --fsdp on one shared --out: the losses and the final weights of one
    plain process (as 1 node x 2 processes gives them, above); rank 0 writes the run once. A
    --resume that rank 0 alone refuses (run.json: the data changed since) is said on node 1 too:
    node 1 went on into the first step and printed gloo's traceback."""
    import shutil
    world, shared, one, logs = str(tmp_path / "world"), tmp_path / "shared", tmp_path / "one", \
        tmp_path / "logs"
    shutil.copytree(tiny_world, world)
    procs = two_nodes("sft.py", sft_args(world, shared, "--fsdp", "true"), logs)
    code, _, err = run_cli("sft", sft_args(world, one))
    assert code == 0, err
    out = both_ended(procs, logs)
    assert [p.returncode for p in procs] == [0, 0] and "2 process(es)" in out[0], out
    assert "step 1 |" not in out[1]  # (rank 0 logs, on node 0's terminal)
    same_metrics(one, shared, ["loss", "grad_norm", "val_loss"])
    same_weights(one / f"checkpoint-{STEPS:06d}", shared / f"checkpoint-{STEPS:06d}")
    assert sorted(os.listdir(shared / f"checkpoint-{STEPS:06d}" / "shards")) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]

    data = tmp_path / "world" / "sft.json"
    records = json.loads(data.read_text())
    records[0]["conversations"][1]["value"] = "Another answer, written since."
    data.write_text(json.dumps(records))
    resume = sft_args(world, shared, "--fsdp", "true", "--resume", "true")
    out = both_ended(two_nodes("sft.py", resume, logs), logs)
    line = f"{data}: --resume on other data: this file changed since the run started"
    assert f"error: {line}" in out[0] and f"error (rank 1): rank 0: {line}" in out[1], out
    assert all(no_worker_traceback(o) for o in out), out


def test_nodes_with_an_out_of_their_own_say_what_is_missing_where(tiny_world, tmp_path):
    """Nodes that share no file system (a relative --out in each node's own folder): a replicated
    run is written by rank 0 alone, said on node 1. --resume on both found a checkpoint on node 0
    and none on node 1: node 1 trained from step 0 beside node 0's resumed run and both hung in a
    collective. --fsdp wrote node 1's shards into node 1's folder: node 0's checkpoint lacked
    them, exit 0. Now one line on each node, nothing hangs, nothing damaged is written."""
    homes = [tmp_path / "node0", tmp_path / "node1"]
    for home in homes:
        home.mkdir()
    argv = sft_args(tiny_world, "run")
    logs = tmp_path / "logs"
    out = both_ended(two_nodes("sft.py", argv, logs, cwds=homes), logs)
    assert "note: --out run on this node is not the folder rank 0 writes" in out[1], out
    assert "note:" not in out[0] and os.listdir(homes[1]) == [], out
    assert os.path.exists(homes[0] / "run" / f"checkpoint-{STEPS:06d}" / "model.safetensors")

    out = both_ended(two_nodes("sft.py", argv + ["--resume", "true"], logs,
                               cwds=homes), logs)
    line = ("error: run: --resume: rank 0 resumes from checkpoint-000006, rank 1 finds no "
            "checkpoint there: every node must see the run's --out")
    assert line in out[0] and line.replace("error:", "error (rank 1):") in out[1], out
    assert all(no_worker_traceback(o) and "note:" not in o for o in out), out

    fsdp = sft_args(tiny_world, "sharded", "--fsdp", "true")
    out = both_ended(two_nodes("sft.py", fsdp, logs, cwds=homes), logs)
    line = ("--out sharded: rank 1 does not see the folder rank 0 writes (the nodes share no file "
            "system there): --fsdp writes each process's shards into it")
    assert all(line in o and no_worker_traceback(o) for o in out), out
    assert not (homes[0] / "sharded").exists() and not (homes[1] / "sharded").exists()


def test_a_flag_given_on_one_node_only_is_one_line_on_each(tiny_world, tmp_path):
    """Node 1 given another --max_steps trained on its own plan: both nodes hung in a collective
    (gloo's 30-minute timeout) once the plans parted. Node 1 given a flag it refuses ended at
    once; node 0 waited for it in the process group's start, 30 minutes. Now each node says why in
    one line, before anything is written."""
    logs, argv = tmp_path / "logs", sft_args(tiny_world, tmp_path / "run")
    other = [("8" if a == "6" else a) for a in argv]  # (--max_steps 6 -> 8)
    out = both_ended(two_nodes("sft.py", argv, logs, node1_argv=other), logs)
    line = "--max_steps: 6 on rank 0, 8 on rank 1 (another node's command line?): give every node"
    assert f"error: {line}" in out[0] and f"error (rank 1): {line}" in out[1], out
    assert all(no_worker_traceback(o) and o.count(line) == 1 for o in out), out

    out = both_ended(two_nodes("sft.py", argv, logs, node1_argv=argv + ["--lr", "fast"]), logs)
    line = "sft.py: argument --lr: expected float, got 'fast'"
    assert f"error: rank 1: {line}" in out[0] and f"error (rank 1): {line}" in out[1], out
    assert all(no_worker_traceback(o) and o.count(line) == 1 for o in out), out
    assert not (tmp_path / "run").exists()


def no_pil_on_rank_1(tmp_path, monkeypatch):
    """Rank 1's import of PIL fails (a package missing where it runs): it ends before it joins."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "class NoPIL:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'PIL' and os.environ.get('RANK') == '1':\n"
        "            raise ImportError('no PIL on node 1')\n"
        "sys.meta_path.insert(0, NoPIL())\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))


def test_a_rank_that_dies_before_it_joins_stops_its_node_at_once(tiny_world, tmp_path,
                                                                 monkeypatch):
    """One node, rank 1 gone before the process group: rank 0 sat in the join's C++ wait, deaf to
    torchrun's SIGTERM, until torchrun killed it 30 s later ("forcefully exiting via 9"). The join
    runs in a thread now, the wait in Python: rank 0 takes the SIGTERM at once."""
    no_pil_on_rank_1(tmp_path, monkeypatch)
    proc = torchrun("sft.py", sft_args(tiny_world, tmp_path / "run"))
    out = proc.communicate(timeout=120)[0]
    assert "ImportError: no PIL on node 1" in out and proc.returncode != 0, out[-3000:]
    assert "forcefully exiting" not in out, out[-3000:]  # (torchrun's SIGKILL, 30 s on)
    assert "interrupted while starting: nothing was written" in out and "--resume" not in out
    assert not (tmp_path / "run").exists()


def test_a_rank_that_dies_before_it_joins_ends_the_other_node_in_one_line(tiny_world, tmp_path,
                                                                         monkeypatch):
    """Node 1's rank ended with a traceback before the process group (a package missing on that
    node: PIL here): node 0's rank waited for it in the group's start, gloo's 30 minutes, without
    a word. The join waits FACTALIGN_JOIN_TIMEOUT seconds (300; 3 here), then one line, exit 1."""
    no_pil_on_rank_1(tmp_path, monkeypatch)
    monkeypatch.setenv("FACTALIGN_JOIN_TIMEOUT", "3")
    logs = tmp_path / "logs"
    procs = two_nodes("sft.py", sft_args(tiny_world, tmp_path / "run"), logs)
    out = both_ended(procs, logs, within=60)
    assert "ImportError: no PIL on node 1" in out[1], out  # (its own traceback, on its node)
    line = ("stopped: the run's other processes did not all start within 3 s "
            "(FACTALIGN_JOIN_TIMEOUT)")
    assert line in out[0] and no_worker_traceback(out[0]) and procs[0].returncode != 0, out
    assert not (tmp_path / "run").exists()


def test_a_rank_0_started_by_hand_whose_others_never_come_says_so_in_one_line(tiny_world,
                                                                             tmp_path):
    """Rank 0 started without torchrun (RANK, WORLD_SIZE and MASTER_* set by hand or by another
    launcher) hosts the store itself; its wait for the others ended in a DistStoreError traceback
    ("Timed out after N seconds waiting for clients"), not the line torchrun's ranks say."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "FACTALIGN_JOIN_TIMEOUT": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sft.py"),
                           *sft_args(tiny_world, tmp_path / "run")], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    line = ("stopped: the run's other processes did not all start within 1 s "
            "(FACTALIGN_JOIN_TIMEOUT)")
    assert line in proc.stderr + proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1 and not (tmp_path / "run").exists()


def test_data_that_differs_on_one_node_is_one_line_on_each(tiny_world, tmp_path):
    """Each node reads its own copy of the world (a relative --world in each node's folder), node
    1's sft.json changed: its rank trained its share of every batch on other records, exit 0, and
    run.json recorded node 0's. Now refused on both nodes, naming the file, before any write."""
    import shutil
    homes = [tmp_path / "node0", tmp_path / "node1"]
    for home in homes:
        shutil.copytree(tiny_world, home / "world")
    records = json.loads((homes[1] / "world" / "sft.json").read_text())
    records[0]["conversations"][1]["value"] = "Another answer, on node 1 alone."
    (homes[1] / "world" / "sft.json").write_text(json.dumps(records))
    argv = sft_args("world", tmp_path / "run")  # (one shared --out)
    out = both_ended(two_nodes("sft.py", argv, tmp_path / "logs", cwds=homes), tmp_path / "logs")
    for home, said in zip(homes, out):
        line = (f"{home / 'world' / 'sft.json'}: other contents on rank 1's node than on rank 0's "
                "(sha256 differs): every node must read the same data files")
        assert said.count(line) == 1 and no_worker_traceback(said) and "note:" not in said, out
    assert not (tmp_path / "run").exists()


def test_one_node_stopped_stops_the_other_with_a_line_and_the_run_resumes(tiny_world, tmp_path):
    """Node 1 killed outright (or Ctrl-C to its launcher, the same on node 0): node 0's rank
    printed gloo's traceback ("Connection closed by peer"). Now it says in one line that another
    process ended and that the run is kept; both nodes then go on from the last checkpoint with
    --resume."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    argv = sft_args(tiny_world, run)
    # (steps enough that the kill lands mid-run: node 0 cannot end without node 1)
    argv[argv.index("--max_steps") + 1], argv[argv.index("--save_every") + 1] = "20", "5"
    procs = two_nodes("sft.py", argv, logs)
    deadline = time.time() + 120
    while not (run / "checkpoint-000005" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert procs[0].poll() is None, open(logs / "node0.log").read()
    for pid in [procs[1].pid] + descendants(procs[1].pid):
        os.kill(pid, signal.SIGKILL)
    out = both_ended(procs, logs, within=60)
    assert out[0].count("stopped: another process of this run has ended") == 1, out[0]
    assert no_worker_traceback(out[0]), out[0]
    procs = two_nodes("sft.py", argv + ["--resume", "true"], logs)
    out = both_ended(procs, logs)
    assert [p.returncode for p in procs] == [0, 0] and "resumed from" in out[0], out
    assert (run / "checkpoint-000020" / "config.json").exists(), out
