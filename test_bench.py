"""bench.py: it runs end to end at the tiny config, and what it compares is the same model (logits,
loss, greedy tokens, trainable parameters) before anything is timed. Correctness of the comparison,
not speed."""
import json
import os
import sys
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from conftest import run_cli  # noqa: E402

SECTIONS = ("hardware", "train", "generate", "dpo", "ppo", "roles")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    # the CLI path, in-process
    code, stdout, err = run_cli("bench", ["--quick", "true", "--threads", "1", "--out", out])
    assert code == 0, err
    with open(os.path.join(out, "bench.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "bench.md")) as f:
        md = f.read()
    return report, md, stdout, err


def test_quick_run_reports_every_section_with_parity(quick_report):
    r, md, stdout, err = quick_report
    for k in SECTIONS + ("parity_max_abs_diff", "parity_lora_max_abs_diff", "torch", "transformers",
                         "date", "threads", "load_before", "device", "config", "model_config"):
        assert k in r, k
    assert r["parity_max_abs_diff"] <= 1e-4 and r["parity_lora_max_abs_diff"] <= 1e-4
    assert r["config"]["quick"] and r["config"]["model"] == "tiny"
    for mode in ("lora", "full"):
        t = r["train"][mode]
        # the same loss on the same batch
        assert abs(t["loss_ours"] - t["loss_transformers"]) <= 1e-4
        assert t["ours_s"] > 0 and t["transformers_s"] > 0 and t["flops"] > 0 and t["trainable"] > 0
        assert t["ratio"] == pytest.approx(t["ours_s"] / t["transformers_s"])
    assert r["train"]["lora"]["trainable"] < r["train"]["full"]["trainable"]
    assert set(r["generate"]) == {"1", "2"}
    for g in r["generate"].values():
        assert g["same_tokens"], g  # greedy decoding: the same tokens from both implementations
        assert g["ours_tok_s"] > 0 and g["transformers_tok_s"] > 0
    assert r["dpo"]["s"] > 0 and r["ppo"]["s"] > 0 and r["ppo"]["rollout_s"] > 0
    roles = r["roles"]["allocated"]
    assert 0 < roles["shared_bytes"] < roles["four_bytes"] and roles["ratio"] <= 0.35
    # meta count = real allocation
    assert r["roles"]["counted"]["ratio"] == pytest.approx(roles["ratio"], rel=1e-6)
    assert r["hardware"]["matmul_flops"] > 0 and r["hardware"]["bandwidth"] > 0
    for title in ("Training step", "Greedy generation", "Preference and RL", "PPO roles"):
        assert title in md
    assert "| lora" in md and "| full" in md


def _tiny_pair(how):
    cfg = bench.Config(**{**bench.QUICK})
    c = bench.model_config(cfg)
    dev = torch.device("cpu")
    ours = bench.build_ours(c, dev, torch.float32, 0)
    ours.add_adapter("sft", 4, 8)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = bench.build_theirs(ours, dev, torch.float32, how, tmp)
    return ours, theirs, c, dev


@pytest.mark.parametrize("how", ["export", "copy"])
def test_both_ways_of_building_transformers_model_agree(how):
    ours, theirs, c, dev = _tiny_pair(how)
    out = {}
    bench.check_parity(ours, theirs, c, dev, True, torch.autocast("cpu", enabled=False), out)
    assert out["parity_max_abs_diff"] <= 1e-4 and out["parity_lora_max_abs_diff"] <= 1e-4
    # the LoRA wrapper was taken off again: transformers' model is the plain base
    assert all(type(m).__name__ != "HFLoRA" for m in theirs.modules())


def test_parity_check_raises_when_the_models_differ():
    ours, theirs, c, dev = _tiny_pair("copy")
    with torch.no_grad():
        # a small mistake in one weight
        theirs.model.language_model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(bench.BenchError, match="logits differ"):
        bench.check_parity(ours, theirs, c, dev, True, torch.autocast("cpu", enabled=False), {})


def test_lora_wrapper_is_the_same_math_as_ours():
    ours, theirs, c, dev = _tiny_pair("copy")
    with torch.no_grad():
        for _, lin in ours.lora_linears():
            for p in lin.lora["sft"].B.values():
                p.normal_(0, 0.1)
    restore = bench.wrap_lora(theirs, ours, "sft")
    n_wrapped = sum(type(m).__name__ == "HFLoRA" for m in theirs.modules())
    assert n_wrapped == 7 * c.layers  # q, k, v, o, gate, up, down in every layer
    ids, pix = bench.prompt_ids(c, 2, 5, torch.Generator().manual_seed(0), dev)
    with torch.no_grad(), ours.use_adapter("sft"):
        their_logits = theirs(pixel_values=pix, input_ids=ids).logits
        torch.testing.assert_close(ours(pix, ids), their_logits, atol=1e-5, rtol=0)
    restore()


def test_flop_and_byte_counts():
    c = bench.model_config(bench.Config(model="llava-7b", image_size=0))
    n = bench.matmul_params(c, 64)
    assert 6.4e9 < n["decoder"] < 6.5e9  # Vicuna-7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008)
    assert n["lm_head"] == 4096 * 32064
    # full fine-tune = 6 N per token (+ attention, head, vision); LoRA = 4 N + 6 N_lora
    full = bench.train_flops(c, 1, 1000, 0, True, 64)
    lora = bench.train_flops(c, 1, 1000, 0, False, 64)
    projector = 2 * n["projector"] * c.num_image_tokens
    assert full - lora == pytest.approx(2 * n["decoder"] * 1000 - 6 * n["lora"] * 1000 + projector)
    decode_params = n["decoder"] + n["lm_head"] + 65 * 4096
    assert bench.decode_bytes(c, 1, 0, 2) == pytest.approx(2 * decode_params)


def test_cli_rejects_unknown_flags_in_one_line(tmp_path):
    code, _, err = run_cli("bench", ["--quick", "true", "--out", str(tmp_path), "--nope", "1"])
    assert code == 2 and err.count("\n") == 1 and "--nope" in err


@pytest.mark.parametrize("flag", ["--matmul_n", "--copy_mib"])
def test_a_peak_measured_too_small_to_mean_anything_is_refused(tmp_path, flag):
    """--matmul_n 1 reported an MFU of thousands of % (the 'peak' was one multiply's overhead)."""
    code, stdout, err = run_cli("bench", ["--quick", "true", flag, "1", "--out", str(tmp_path)])
    assert code == 2, err
    assert err.startswith(f"error: {flag} 1: 0 (the device's default) or at least"), err
    assert err.count("\n") == 1 and "parity" not in stdout, (stdout, err)


def test_a_sequence_with_no_room_for_the_answer_is_refused_before_any_section(tmp_path):
    """--seq leaving no text for --answer was refused by the training section, after the export
    and parity sections had run (minutes at a real preset)."""
    code, stdout, err = run_cli("bench", ["--quick", "true", "--seq", "10", "--out",
                                          str(tmp_path)])
    assert code == 2 and "--seq 10 leaves 0 text tokens" in err, err
    assert "parity" not in stdout, stdout


def test_a_failing_section_is_reported_and_the_run_exits_nonzero(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(bench, "ppo_section", broken)
    argv = ["--quick", "true", "--threads", "1", "--out", str(tmp_path), "--train_modes", "lora",
            "--gen_batches", "1"]
    code, _, err = run_cli("bench", argv)
    assert code != 0 and "ppo" in err
    with open(tmp_path / "bench.json") as f:
        r = json.load(f)
    assert r["ppo"] == {"error": "RuntimeError: boom"}
    assert "s" in r["dpo"] and "full" not in r["train"]
    assert "PPO iteration: failed: RuntimeError: boom" in (tmp_path / "bench.md").read_text()


def test_fsdp_checks_its_out_before_the_sharded_steps(tmp_path):
    # (it was checked after them: on a 7B model, the whole measurement was lost to a typo)
    out = tmp_path / "b.log"
    out.write_text("x")
    code, stdout, err = run_cli("bench", ["--quick", "true", "--fsdp", "true", "--threads", "1",
                                          "--dtype", "fp32", "--out", str(out)])
    # (--dtype fp32 typed on a CPU is what runs: not refused as unread)
    assert code == 2 and "b.log" in err and "a file, not a folder" in err, err
    assert "fsdp lora" not in stdout and "fsdp full" not in stdout, stdout


def test_flags_checks_a_run_can_answer(tmp_path):
    """A bench hunt: under --fsdp the generation and rollout lengths were checked against the
    preset's positions while their flags were refused as unread (no way out); an odd
    --rollout_batch timed a PPO update split in minibatches ppo.py refuses. The first passes the
    position check now, the second is one line."""
    assert bench.check_positions(bench.Config(fsdp=True, model="tiny", image_size=352, seq=500,
                                              answer=8)) is None
    code, _, err = run_cli("bench", ["--quick", "true", "--rollout_batch", "5",
                                     "--out", str(tmp_path / "r")])
    assert code == 2 and "--rollout_batch 5: must be even" in err and err.count("\n") == 1, err


def test_quick_leaves_every_flag_typed_alone_even_at_its_default(monkeypatch):
    """'--quick true (given flags win)': a flag typed at its default value (--new_tokens 64) was
    replaced by the tiny config's, as if it had not been typed (only values were compared)."""
    seen = []
    monkeypatch.setattr(bench, "run", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(bench, "check_positions", lambda cfg: None)
    bench.cli(["--quick", "true", "--new_tokens", "64", "--seq=256", "--reps", "3"])
    cfg = seen[0]
    assert (cfg.new_tokens, cfg.seq, cfg.reps) == (64, 256, 3)
    assert (cfg.model, cfg.answer) == (bench.QUICK["model"], bench.QUICK["answer"])
    bench.main(bench.Config(quick=True, reps=5))  # (a Config in-process: what differs is given)
    assert (seen[1].reps, seen[1].new_tokens) == (5, bench.QUICK["new_tokens"])


def test_a_failing_rollout_ppo_step_keeps_the_rollouts_decoding_table(tmp_path, monkeypatch):
    """The rollout section's PPO step failing replaced the decoding table measured before it with
    its error (one section): it is its own section now."""
    real = bench.ppo_section

    def broken_at_rollout(*args, key="ppo", **kw):
        if key == "rollout_ppo":
            raise RuntimeError("boom")
        return real(*args, key=key, **kw)
    monkeypatch.setattr(bench, "ppo_section", broken_at_rollout)
    argv = ["--quick", "true", "--threads", "1", "--out", str(tmp_path), "--train_modes", "lora",
            "--gen_batches", "1"]
    code, _, err = run_cli("bench", argv)
    assert code != 0 and "sections failed: rollout_ppo" in err, err
    with open(tmp_path / "bench.json") as f:
        r = json.load(f)
    assert r["rollout_ppo"] == {"error": "RuntimeError: boom"} and "error" not in r["rollout"]
    assert "ratio_tok_s" in r["rollout"]["4"]
    md = (tmp_path / "bench.md").read_text()
    assert "PPO iteration failed: RuntimeError: boom" in md and "| 4 |" in md


def test_tokens_differing_in_the_compiled_step_alone_say_where():
    """With --compile_decode, tokens that differed in the compiled decode alone read 'NO (from
    token None)' (the index was of ours against transformers)."""
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert bench.first_difference(a, a.clone()) is None
    assert bench.first_difference(a, torch.tensor([[1, 2, 3], [4, 0, 6]])) == 1
    assert bench.first_difference(a, a[:, :2]) == 0
    row = dict(same_tokens=False, first_difference=None, compiled_first_difference=2)
    assert bench.same_tokens_cell(row) == "NO compiled (from token 2)"
    row.update(first_difference=1)
    assert bench.same_tokens_cell(row) == "NO (from token 1); NO compiled (from token 2)"
    assert bench.same_tokens_cell(dict(same_tokens=True)) == "yes"


def test_the_report_names_the_presets_overrides():
    """bench.md named the preset alone when --image_size/--layers changed it (two different
    models' reports read alike)."""
    base = dict(model="bench", image_size=0, layers=0)
    assert bench.model_label(base) == "bench"
    assert bench.model_label({**base, "layers": 4}) == "bench (layers 4)"
    assert bench.model_label({**base, "image_size": 224, "layers": 4}) == \
        "bench (image_size 224, layers 4)"
