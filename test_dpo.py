"""Tests for dpo.py: the losses, the reference policy, answer log-probs, POVID noise and injection,
the reference cache, the CLI (every loss, both POVID stages, --resume, DDP) and bad input.
The Shapes world fixture (tiny_world) and the CLI runners come from conftest.py."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (HERE, calls_outside_autocast, merge_flags, run_cli, run_script,
                      two_ranks)

import common
import dpo
import oracle
import shapes
from data import (CLIP_MEAN, CLIP_STD, IGNORE, ImageCache, collate, ddpm_noise,
                  inject_hallucination, normalize, povid_noisy_image, to_pil_bytes,
                  tokenize_conversation)
from checkpoint import load_checkpoint, save_checkpoint_files


# conftest: tiny models run fastest on one thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tiny_world, tmp_path_factory):
    """Small pair files from the session's Shapes world (image paths absolute, so their size does
    not depend on the world's) and a tiny `init` checkpoint built in-process (random weights, the
    world's tokenizer)."""
    root = tmp_path_factory.mktemp("dpo")
    files = {}
    for name, src, n in (("train", "povid_pairs.json", 24), ("val", "pref_pairs_val.json", 8)):
        recs = json.load(open(os.path.join(tiny_world, src)))[:n]
        for r in recs:
            r["image"] = os.path.join(tiny_world, r["image"])
        files[name] = str(root / f"{name}.json")
        with open(files[name], "w") as f:
            json.dump(recs, f)
    torch.manual_seed(0)
    tok_dir = os.path.join(tiny_world, "tokenizer")
    model, tok = common.load_model_and_tokenizer("", "tiny", tokenizer_dir=tok_dir)
    save_checkpoint_files(model, str(root / "init"))
    tok.save_pretrained(str(root / "init"))
    return dict(world=tiny_world, init=str(root / "init"), tok=tok, **files)


def args(env, out, *extra):
    return ["--init", env["init"], "--out", str(out), "--data", env["train"], "--val_data",
            env["val"], "--batch_size", "4", "--max_steps", "2", "--log_every", "1", "--eval_n",
            "4", *extra]


def pairs(env, model, n=4, cfg=None):
    recs, _, _ = dpo.load_pairs(cfg or dpo.Config(data=env["train"], val_data=""))
    images = ImageCache(model.config.image_size)
    return dpo.Pairs(recs[:n], env["tok"], model.config, cfg or dpo.Config(), images)


def test_pairs_cut_at_max_len_are_kept_and_counted(env, tmp_path):
    """A pair longer than --max_len is cut there and trained on (as POVID's collator cuts it),
    but the warning counted only pairs whose answer starts past it as "longer than --max_len",
    and config said longer pairs were dropped. The cut ones are now counted in a note."""
    recs = json.load(open(env["train"]))[:2]
    recs[0]["conversations"][-1]["value"] += " It is red." * 40  # (POVID's layout: chosen)
    data = tmp_path / "long.json"
    data.write_text(json.dumps(recs))
    model = load_checkpoint(env["init"])
    images = ImageCache(model.config.image_size)
    read, _, _ = dpo.load_pairs(dpo.Config(data=str(data), val_data=""))
    whole = dpo.Pairs(read, env["tok"], model.config, dpo.Config(max_len=100000), images)
    short = max(len(x["input_ids"]) for x in whole.items[1][:2])
    got = dpo.Pairs(read, env["tok"], model.config, dpo.Config(max_len=short + 5), images)
    assert (len(got), got.cut, got.dropped, got.tied) == (2, 1, 0, 0)
    code, out, _ = run_cli("dpo", args(env, tmp_path / "o", "--data", str(data), "--max_len",
                                       str(short + 5), "--val_data", ""))
    assert code == 0 and f"note: 1 of 2 pairs reach --max_len {short + 5}: trained on their " \
        "first tokens alone (as POVID's collator cuts them)" in out, out


def test_a_pair_with_two_answers_alike_is_dropped_and_counted(env, tmp_path):
    """A file holding one pair whose chosen equals its rejected (POVID and TRL train on it) was
    refused whole. It is dropped and counted now; a file of such pairs alone is refused."""
    recs = json.load(open(env["train"]))[:3]
    recs[1]["rejected_conversations"] = recs[1]["conversations"]
    data = tmp_path / "alike.json"
    data.write_text(json.dumps(recs))
    out = cli(*args(env, tmp_path / "o", "--data", data, "--val_data", ""))
    assert "warning: dropped 1 of 3 pairs: 0 whose answer starts past --max_len 512, 1 whose " \
        "chosen and rejected are the same tokens (as written, or once cut there)" in out, out
    data.write_text(json.dumps(recs[1:2]))
    code, _, err = run_cli("dpo", args(env, tmp_path / "p", "--data", str(data), "--val_data", ""))
    assert code == 2 and "no training pairs left (1 read, 0 whose answer starts past --max_len " \
        "512, 1 whose two answers are the same tokens, 0 bad records skipped)" in err, err


def lora_model(env, randomise=True):
    model = load_checkpoint(env["init"])
    model.add_adapter("dpo", 4, 8)
    model.set_adapter("dpo")
    if randomise:  # B = 0 would make the adapter a no-op
        with torch.no_grad():
            for p in model.adapter_parameters("dpo"):
                p.normal_(0, 0.3)
    return model


# ----------------------------------------------------------------------------------- losses by hand

def test_losses_match_hand_arithmetic():
    # pi_c -10, pi_r -12, ref_c -11, ref_r -11.5, beta 0.1:
    # h = (-10 - -11) - (-12 - -11.5) = 1 - (-0.5) = 1.5 ; beta h = 0.15
    # sigmoid: -log sig(0.15) = log(1 + e^-0.15)
    # cdpo eps 0.2: 0.8 log(1 + e^-0.15) + 0.2 log(1 + e^0.15)
    # rdpo eps 0.2: (0.8 log(1 + e^-0.15) - 0.2 log(1 + e^0.15)) / 0.6
    # ipo: (1.5 - 1/(2*0.1))^2 = (1.5 - 5)^2 = 12.25
    # ref_free: h = -10 - -12 = 2 -> log(1 + e^-0.2)
    # rewards: chosen 0.1 * (-10 - -11) = 0.1, rejected 0.1 * (-12 - -11.5) = -0.05
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    pc, pr, rc, rr = t(-10.0, -3.0), t(-12.0, -1.0), t(-11.0, -3.0), t(-11.5, -1.0)
    want = {"sigmoid": [math.log(1 + math.exp(-0.15)), math.log(2)],
            "cdpo": [0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15)),
                     math.log(2)],
            "rdpo": [(0.8 * math.log(1 + math.exp(-0.15)) - 0.2 * math.log(1 + math.exp(0.15)))
                     / 0.6, math.log(2)],
            "ipo": [12.25, 25.0],
            # pair 2: h = -3 - -1 = -2
            "ref_free": [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.2))]}
    for loss, w in want.items():
        eps = 0.2 if loss in ("cdpo", "rdpo") else 0.0
        losses, r_c, r_r = dpo.preference_loss(pc, pr, rc, rr, 0.1, loss, eps)
        assert torch.allclose(losses, t(*w), atol=1e-12), loss
        if loss != "ref_free":
            assert torch.allclose(r_c, t(0.1, 0.0)) and torch.allclose(r_r, t(-0.05, 0.0))
    pc.requires_grad_(True)  # the gradient raises the chosen log-prob
    dpo.preference_loss(pc, pr, rc, rr, 0.1)[0].sum().backward()
    assert (pc.grad < 0).all()


def test_robust_dpo_is_unbiased_under_flipped_labels():
    # rDPO's point (arXiv 2403.00409): with each label flipped with chance eps, its expected loss
    # is DPO's on the true labels; cDPO's is not. A flip swaps chosen and rejected (h -> -h).
    h = torch.linspace(-4, 4, 9, dtype=torch.float64)
    zero = torch.zeros_like(h)
    eps = 0.3
    dpo_loss = dpo.preference_loss(h, zero, zero, zero, 1.0)[0]
    for loss, unbiased in (("rdpo", True), ("cdpo", False)):
        right = dpo.preference_loss(h, zero, zero, zero, 1.0, loss, eps)[0]
        flipped = dpo.preference_loss(-h, zero, zero, zero, 1.0, loss, eps)[0]
        expected = (1 - eps) * right + eps * flipped
        assert torch.allclose(expected, dpo_loss, atol=1e-12) == unbiased, loss


# ---------------------------------------------------------------------------------------- log-probs

def test_reference_pass_is_the_base_model_with_adapters_off(env):
    model, fresh = lora_model(env), load_checkpoint(env["init"])
    ds = pairs(env, model)
    b = ds.batch(range(len(ds)))
    cfg = dpo.Config()
    with torch.no_grad():
        want = dpo.answer_logps(fresh, b, fresh.encode_images(b["pixel_values"]))
        with model.no_adapter():
            got = dpo.answer_logps(model, b, model.encode_images(b["pixel_values"]))
        on = dpo.answer_logps(model, b, model.encode_images(b["pixel_values"]))
        _, m = dpo.pair_losses(model, b, cfg)  # the training path: rewards = beta * (policy - base)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    # the randomised adapter does change the policy
    assert not torch.allclose(on[0], want[0], atol=1e-3)
    assert torch.allclose(m["rewards/chosen"], 0.1 * (on[0] - want[0]), atol=1e-5)
    assert torch.allclose(m["rewards/rejected"], 0.1 * (on[1] - want[1]), atol=1e-5)


def _item(env, model, prompt, answer):
    c = model.config
    turns = prompt + [{"from": "gpt", "value": answer}]
    full = tokenize_conversation(env["tok"], turns, c.image_token_id, c.num_image_tokens,
                                 train_on="last")
    only_prompt = tokenize_conversation(env["tok"], prompt, c.image_token_id, c.num_image_tokens)
    return full, len(only_prompt["input_ids"])


def test_summed_logprobs_count_answer_tokens_only(env):
    model = lora_model(env)
    prompts = [[{"from": "human", "value": "<image>\nIs there a square?"}],
               [{"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": "A red circle."},
                {"from": "human", "value": "How many circles are there?"}]]
    answers = ["Yes, there is a square.", "There is one circle."]
    items, P = zip(*[_item(env, model, p, a) for p, a in zip(prompts, answers)])
    # labels on exactly the final answer: not the image, the prompt or the earlier answer
    for it, p in zip(items, P):
        assert (it["labels"][:p] == IGNORE).all() and (it["labels"][p:] != IGNORE).all()
    pix = normalize(torch.rand(1, 3, 48, 48)).expand(2, -1, -1, -1)
    b = collate(list(items) * 2, env["tok"].pad_token_id)  # 2 'pairs': chosen == rejected here
    with torch.no_grad():
        c, r, _, _ = dpo.answer_logps(model, b, model.encode_images(pix[:1]).expand(2, -1, -1))
        logits = model(pix.repeat(2, 1, 1, 1), b["input_ids"], b["attention_mask"]).double()
    for i, (it, p) in enumerate(zip(items, P)):  # by hand: log p(x_t | x_<t) for t = P .. L-1
        ids, lp = it["input_ids"], torch.log_softmax(logits[i], -1)
        hand = sum(float(lp[t - 1, ids[t]]) for t in range(p, len(ids)))
        assert abs(float(c[i]) - hand) < 1e-3 and abs(float(r[i]) - hand) < 1e-3
    # more right padding, junk ids on the pads
    wide = collate(list(items) * 2, env["tok"].pad_token_id)
    T = wide["input_ids"].shape[1]
    fill = {"input_ids": 7, "attention_mask": 0, "labels": IGNORE}
    for k in ("input_ids", "attention_mask", "labels"):
        wide[k] = torch.cat([wide[k], torch.full((4, 7), fill[k])], 1)
    pads = wide["attention_mask"] == 0
    wide["input_ids"][pads] = torch.randint(5, 50, (int(pads.sum()),))
    with torch.no_grad():
        c2, _, _, _ = dpo.answer_logps(model, wide, model.encode_images(pix[:1]).expand(2, -1, -1))
    assert wide["input_ids"].shape[1] == T + 7 and torch.allclose(c, c2, atol=1e-5)

    # logits depend on the position only: prompt/image tokens cannot matter
    class PositionOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.head = torch.randn(256, 8), torch.randn(model.config.vocab_size, 8)

        def forward(self, pix, ids, mask, return_hidden=False, image_features=None):
            return self.table[:ids.shape[1]].expand(len(ids), -1, -1)

        def logits(self, h):
            return h @ self.head.t()

    fake, b2 = PositionOnly(), {k: v.clone() for k, v in b.items() if v is not None}
    b2["input_ids"][b2["labels"] == IGNORE] = 9  # every prompt, image and pad token changed
    feats = torch.zeros(2, 1, 8)
    a, b_ = dpo.answer_logps(fake, b, feats)[0], dpo.answer_logps(fake, b2, feats)[0]
    assert torch.equal(a, b_)


def answer_logprob_reference(model, batch):
    """Sum over the labelled tokens of log p(token | prefix), from the full logits of one plain
    forward pass with pixels: the reference dpo.answer_logps must equal."""
    logits = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE
    token_logp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (token_logp * labelled).sum(-1)


def test_concatenated_pass_with_shared_features_equals_two_passes(env):
    model = lora_model(env)
    ds = pairs(env, model)
    idx = list(range(len(ds)))
    b = ds.batch(idx)
    with torch.no_grad():
        c, r, _, _ = dpo.answer_logps(model, b, model.encode_images(b["pixel_values"]))
        # each side alone, its own padding, pixels through the model
        for k, want in ((0, c), (1, r)):
            sep = collate([ds.items[i][k] for i in idx], env["tok"].pad_token_id)
            sep["pixel_values"] = b["pixel_values"]
            got = answer_logprob_reference(model, sep)
            assert torch.allclose(got, want, atol=1e-4), (k, got, want)
        feats = model.encode_images(b["pixel_values"])
        ipo_c, _, _, _ = dpo.answer_logps(model, b, feats, average=True)
    n = (b["labels"][:len(idx), 1:] != IGNORE).sum(-1)
    assert torch.allclose(ipo_c, c / n, atol=1e-5)  # IPO: the mean over answer tokens


def test_one_step_raises_the_margin(env):
    model = lora_model(env, randomise=False)
    model.set_trainable(adapters=["dpo"])
    ds = pairs(env, model, n=2)
    b = ds.batch([0, 1])
    cfg = dpo.Config()
    opt = torch.optim.Adam(model.adapter_parameters("dpo"), lr=1e-2)
    losses, m0 = dpo.pair_losses(model, b, cfg)
    losses.mean().backward()
    opt.step()
    with torch.no_grad():
        _, m1 = dpo.pair_losses(model, b, cfg)
    assert float(m0["rewards/margins"].abs().max()) < 1e-6  # step 0: policy == reference
    assert (m1["rewards/margins"] > 1e-4).all() and (m1["loss"] < m0["loss"]).all()


def test_povid_noisy_rejection_is_the_noisy_argmax_scored_under_the_clean_image(env):
    model = lora_model(env)
    ds = pairs(env, model, n=2)
    b = ds.batch([0, 1])
    npix = dpo.noisy_pixels(b["units"], [1, 2], 500)
    with torch.no_grad():
        feats = model.encode_images(b["pixel_values"])
        c, _, n, tokens = dpo.answer_logps(model, b, feats, noisy=model.encode_images(npix))
        # the batch's chosen rows
        chosen = {k: b[k][:2] for k in ("input_ids", "attention_mask", "labels")}
        logits = model(b["pixel_values"], chosen["input_ids"], chosen["attention_mask"])
        clean = torch.log_softmax(logits, -1)
        noisy = model(npix, chosen["input_ids"], chosen["attention_mask"])
    for i in range(2):
        # positions predicting the chosen answer
        pos = (chosen["labels"][i, 1:] != IGNORE).nonzero()[:, 0]
        arg = noisy[i, pos].argmax(-1)
        assert abs(float(n[i]) - float(clean[i, pos].gather(-1, arg[:, None]).sum())) < 1e-3
    assert len(tokens) == int((b["labels"][:2, 1:] != IGNORE).sum())
    assert float(n.sum()) != float(c.sum())



def test_pair_losses_average_for_ipo_and_halve_povid_stage_2(env):
    """IPO compares log-probs averaged over answer tokens (the other losses sum them); POVID stage
    2's loss is 0.5 DPO(chosen, injected) + 0.5 DPO(chosen, noisy argmax), by the metrics' rewards
    (beta h = r_chosen - r_rejected)."""
    model = lora_model(env)
    b = pairs(env, model, n=2).batch([0, 1])
    n_tok = (b["labels"][:, 1:] != IGNORE).sum(-1).float()
    with torch.no_grad():
        sums = dpo.answer_logps(model, b, model.encode_images(b["pixel_values"]))
        _, m = dpo.pair_losses(model, b, dpo.Config(loss="ipo"))
        assert torch.allclose(m["logps/chosen"], sums[0] / n_tok[:2], atol=1e-5)
        assert torch.allclose(m["logps/rejected"], sums[1] / n_tok[2:], atol=1e-5)
        noisy = dpo.noisy_pixels(b["units"], [1, 2], 500)
        losses, m = dpo.pair_losses(model, b, dpo.Config(), noisy_pix=noisy)
    rc, rr, rn = m["rewards/chosen"], m["rewards/rejected"], m["noisy/rewards/rejected"]
    want = -0.5 * torch.nn.functional.logsigmoid(rc - rr) - 0.5 * torch.nn.functional.logsigmoid(
        rc - rn)
    assert not torch.allclose(rr, rn) and torch.allclose(losses, want, atol=1e-6)

# --------------------------------------------------------------------------------------- POVID data

def test_ddpm_noise_matches_the_closed_form():
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (5e-3 - 1e-5) + 1e-5 for i in range(1000)]
    abar = math.prod(1 - b for b in betas[:501])  # t = 500: alpha-bar after steps 0..500
    x0 = torch.full((400, 3, 16, 16), 0.3)
    x = ddpm_noise(x0, 500, torch.Generator().manual_seed(0))
    assert abs(float(x.mean()) - math.sqrt(abar) * 0.3) < 3e-3  # E[x_t] = sqrt(abar) x0
    assert abs(float(x.var()) - (1 - abar)) < 5e-3  # Var[x_t] = 1 - abar
    # dpo: noise in [0,1] space, then CLIP normalisation; one seed per pair
    units = torch.rand(2, 3, 48, 48)
    got = dpo.noisy_pixels(units, [5, 6], 500)
    want = torch.stack([normalize(ddpm_noise(u, 500, torch.Generator().manual_seed(s)))
                        for u, s in zip(units, [5, 6])])
    assert torch.equal(got, want) and not torch.equal(got, dpo.noisy_pixels(units, [5, 7], 500))


def test_povid_noisy_image_is_noised_at_original_size_cast_to_8_bits_then_padded(tmp_path):
    """POVID train_dpo_inherent.py by hand: ToTensor, x_t = sqrt(abar) x + sqrt(1 - abar) eps,
    ToPILImage (mul(255).byte(): truncate toward zero, wrap modulo 256), expand2square with the
    clean CLIP-mean colour, then resize (none here: the padded side is the encoder size) and
    normalise."""
    from PIL import Image
    rng = np.random.default_rng(0)
    # 4 wide, 2 high: padded to 4 x 4, rows 1-2
    pixels = rng.integers(0, 256, (2, 4, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    got = povid_noisy_image(img, 4, 500, torch.Generator().manual_seed(3))
    # the same draw, same shape
    eps = torch.randn((3, 2, 4), generator=torch.Generator().manual_seed(3))
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (5e-3 - 1e-5) + 1e-5 for i in range(1000)]
    abar = math.prod(1 - b for b in betas[:501])
    wrapped = 0
    for c in range(3):
        fill = int(CLIP_MEAN[c] * 255)  # padding rows 0 and 3 stay clean
        for x in range(4):
            for y in (0, 3):
                assert abs(float(got[c, y, x]) - (fill / 255 - CLIP_MEAN[c]) / CLIP_STD[c]) < 1e-5
            for y in (1, 2):
                signal = math.sqrt(abar) * pixels[y - 1, x, c] / 255
                noise = math.sqrt(1 - abar) * float(eps[c, y - 1, x])
                v = signal + noise
                byte = int(math.trunc(v * 255)) % 256  # 1.2 -> 306 -> 50: wraps, no clipping
                wrapped += not 0 <= v * 255 < 256
                want = (byte / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
                assert abs(float(got[c, y, x]) - want) < 1e-5, (c, y, x)
    assert wrapped > 0  # the example does exercise the wrap-around
    noisy = ddpm_noise(torch.rand(3, 64, 64), 500, torch.Generator().manual_seed(0))
    # torch's cast
    assert torch.equal(torch.from_numpy(to_pil_bytes(noisy)), (noisy * 255).byte().permute(1, 2, 0))
    share = float(((noisy < 0) | (noisy * 255 >= 256)).float().mean())
    assert 0.3 < share < 0.5, share  # about 40% of the pixels of a uniform image wrap at t = 500
    # dpo.noisy_pixels with paths (--noise_on original) is this image
    path = str(tmp_path / "im.png")
    img.save(path)
    units = torch.zeros(1, 3, 4, 4)
    assert torch.equal(dpo.noisy_pixels(units, [3], 500, [path]), got[None])


def test_injected_answers_are_hallucinations_per_the_oracle(env):
    w = shapes.load_world(env["world"])
    for r in json.load(open(env["train"])):  # the pairs DPO trains on
        objs = w["by_file"][os.path.relpath(r["image"], env["world"])]
        assert oracle.oracle(r["conversations"][1]["value"], objs)["num_hallucinations"] == 0
        rejected = r["rejected_conversations"][1]["value"]
        assert oracle.oracle(rejected, objs)["num_hallucinations"] > 0
    rng, seen = np.random.default_rng(1), set()
    partners = {"triangle": ["circle"], "cross": ["square"]}
    for k, img in enumerate(w["images"][:24]):  # fresh injections of every kind
        answer = "yes" if k % 2 else "no"
        qa = shapes.make_question(shapes.QUESTION_TYPES[k % 6], img["objects"], rng, answer)
        for kind in ("object", "attribute", "relation"):
            got = qa and inject_hallucination(qa[1], img["objects"], rng, kind, shapes.SHAPES,
                                              partners, list(shapes.COLORS))
            if got:
                seen.add(kind)
                assert oracle.oracle(got[0], img["objects"])["num_hallucinations"] > 0, (qa, got)
    assert seen == {"object", "attribute", "relation"}


# ---------------------------------------------------------------------------------- reference cache

def cli(*argv):
    code, out, err = run_cli("dpo", [str(a) for a in argv])
    assert code == 0, err[-3000:]
    return out


def test_the_reference_and_held_out_passes_run_under_the_training_autocast(env, tmp_path,
                                                                           monkeypatch):
    """--dtype bf16 on a GPU: the cached reference log-probs and the held-out rewards were computed
    outside the training pass's autocast (CLIP's norms and the residual stream at another
    precision), so a full fine-tune's policy and reference differed at step 0. Every scoring pass
    runs inside distributed.bf16_autocast now (off on the CPU: recorded here, not switched on)."""
    outside = calls_outside_autocast(monkeypatch, dpo, "answer_logps")
    cli(*args(env, tmp_path / "full", "--lora_r", "0", "--max_steps", "1", "--eval_n", "2"))
    assert outside and not any(outside), outside


def test_full_finetune_reference_cache_reused_and_invalidated(env, tmp_path):
    out = tmp_path / "full"
    full = ["--lora_r", "0", "--max_steps", "1", "--eval_n", "2"]
    assert "computed" in cli(*args(env, out, *full))
    first = [f for f in os.listdir(out) if f.startswith("ref_logps-")]
    table = torch.load(out / first[0])
    model = load_checkpoint(env["init"])
    ds = pairs(env, model, n=100)
    b = ds.batch(range(len(ds)))
    with torch.no_grad():
        c, r, _, _ = dpo.answer_logps(model, b, model.encode_images(b["pixel_values"]))
    # the init's log-probs
    assert len(first) == 1 and torch.allclose(table["train"], torch.stack([c, r], 1), atol=1e-4)
    # the same run goes on
    assert "reusing" in cli(*args(env, out, *full, "--resume", "true", "--max_steps", "2"))
    assert len([f for f in os.listdir(out) if f.startswith("ref_logps-")]) == 1
    recs = json.load(open(env["train"]))
    recs[0]["conversations"][1]["value"] += " Nothing else."
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(recs))
    os.mkdir(tmp_path / "other")
    # another run's cache, keyed by what it was made of
    shutil.copy(out / first[0], tmp_path / "other" / first[0])
    # a killed run's half-written cache (its temp name) was left there for good
    (tmp_path / "other" / (first[0] + ".tmp99999")).write_bytes(b"half")
    assert "computed" in cli(*args(env, tmp_path / "other", *full, "--data", changed))
    assert not [f for f in os.listdir(tmp_path / "other") if ".tmp" in f]
    # a rewritten checkpoint (new mtime): a new cache too
    weights = os.path.join(env["init"], "model.safetensors")
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10 ** 9))
    # (the old run is moved aside)
    assert "computed" in cli(*args(env, out, *full, "--overwrite", "true"))
    assert len([f for f in os.listdir(tmp_path / "other") if f.startswith("ref_logps-")]) == 2


def test_a_hidden_temp_file_in_the_init_folder_keeps_the_reference_cache_key(tmp_path):
    """A save killed mid-write leaves a hidden .PID.tmp beside the weights (save_safetensors),
    which no loader reads: fingerprint() hashed every file of the --init folder, so the same
    weights got another reference-cache key. Hidden names are passed over; a weight file that
    changes still changes the key."""
    from model import LLaVA
    LLaVA.from_preset("tiny").save_pretrained(tmp_path / "ck")
    cfg = dpo.Config(out=str(tmp_path / "out"))
    before = dpo.fingerprint(cfg, str(tmp_path / "ck"))
    (tmp_path / "ck" / ".4242.tmp").write_bytes(b"half a safetensors file")
    assert dpo.fingerprint(cfg, str(tmp_path / "ck")) == before
    os.utime(tmp_path / "ck" / "model.safetensors", ns=(0, 0))  # (as if written again)
    assert dpo.fingerprint(cfg, str(tmp_path / "ck")) != before


def test_a_full_disk_while_caching_the_reference_is_one_line(env, tmp_path, monkeypatch):
    """A disk filling up while a full fine-tune cached its reference log-probs ended in torch's own
    RuntimeError (basic_ios::clear: iostream error), a traceback. Now one line naming the cache
    and exit 2, no half cache left; the same command with space goes on."""
    out, real = tmp_path / "full", torch.save

    def full_disk(obj, f, *a, **kw):
        if "ref_logps-" in str(f):
            real(obj, f, *a, **kw)  # (part of it on disk, as a full disk leaves it)
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(obj, f, *a, **kw)
    monkeypatch.setattr(dpo.torch, "save", full_disk)
    full = ["--lora_r", "0", "--max_steps", "1", "--eval_n", "2"]
    code, _, err = run_cli("dpo", [str(a) for a in args(env, out, *full)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{out}: cannot write ref_logps-" in err and "free some space" in err, err
    # (no checkpoint yet: --resume true would refuse)
    assert "a training run that saved a checkpoint goes on from it with --resume" in err, err
    assert not [f for f in os.listdir(out) if f.startswith("ref_logps-")]
    monkeypatch.undo()
    assert "computed" in cli(*args(env, out, *full))


def _cache_on_rank(rank, d, out):
    """One of two processes caching a reference table; rank 0's disk is full."""
    dpo.fingerprint = lambda *a: "f"
    dpo.reference_table = lambda *a: {0: torch.zeros(2)}
    if rank == 0:
        def full(obj, f, *a, **kw):
            raise RuntimeError("basic_ios::clear: iostream error")
        dpo.torch.save = full
    try:
        dpo.cached_reference(dpo.Config(out=out), d, "init", [], [], lambda: torch.nn.Linear(1, 1))
        return "cached"
    except common.CheckpointError as e:
        return str(e)


def test_a_reference_cache_the_main_process_cannot_write_stops_every_process(tmp_path):
    """Under torchrun only the main process writes the reference cache: where it could not, it
    stopped alone and the others went on into training, waiting at its first collective until
    torchrun stopped them. Every process stops with one line now."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    said = two_ranks(_cache_on_rank, out)
    assert said[0].startswith(f"{out}: cannot write ref_logps-f.pt (basic_ios"), said
    assert "another process could not write its part" in said[1], said
    assert os.listdir(out) == [], os.listdir(out)


def _rows(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [x for x in rows if "loss" in x], [x for x in rows if "val_reward_accuracy" in x]


def test_cli_every_loss_both_povid_stages_and_resume(env, tmp_path):
    root = tmp_path
    stage2 = ["--povid_stage", "2", "--max_steps", "4", "--save_every", "2"]
    # a real `python dpo.py`; meanwhile the same entry point in-process:
    stage2_argv = merge_flags(args(env, root / "stage2", *stage2))
    proc = subprocess.Popen([sys.executable, "dpo.py", *stage2_argv], cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    losses = {"sigmoid": [], "ipo": ["--loss", "ipo"],
              "cdpo": ["--loss", "cdpo", "--label_smoothing", "0.1"],
              "rdpo": ["--loss", "rdpo", "--label_smoothing", "0.1"],
              "ref_free": ["--loss", "ref_free"], "full": ["--lora_r", "0", "--loss", "ipo"]}
    for name, flags in losses.items():
        cli(*args(env, root / name, *flags))
        train_rows, val_rows = _rows(root / name)
        assert len(train_rows) == 2 and math.isfinite(train_rows[-1]["loss"]) and val_rows, name
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected"):
            assert key in train_rows[-1], (name, key)
    # step 1: policy == reference
    assert abs(_rows(root / "sigmoid")[0][0]["loss"] - math.log(2)) < 1e-6
    assert abs(_rows(root / "ipo")[0][0]["loss"] - 25.0) < 1e-4  # (0 - 1/(2*0.1))^2
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    train_rows, _ = _rows(root / "stage2")
    assert len(train_rows) == 4
    assert "noisy/rewards/margins" in train_rows[-1] and "noisy/logps/rejected" in train_rows[-1]
    # the final policy: the 'dpo' adapter on the init's base
    policy = load_checkpoint(str(root / "stage2"))
    last = root / "stage2" / "checkpoint-000004"
    assert policy.active_adapter == "dpo" and json.load(open(last / "config.json"))["base"]
    assert not os.path.exists(last / "model.safetensors")
    assert os.path.exists(root / "full/checkpoint-000002/model.safetensors")
    # --resume from stage 2's step-2 checkpoint, in a new run dir: bitwise the same weights
    shutil.copytree(root / "stage2" / "checkpoint-000002", root / "resumed" / "checkpoint-000002")
    assert "resumed from" in cli(*args(env, root / "resumed", *stage2, "--resume", "true"))
    from safetensors.torch import load_file
    a = load_file(str(last / "adapters.safetensors"))
    b = load_file(str(root / "resumed/checkpoint-000004/adapters.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(root / "resumed")[0][-1]["loss"] == train_rows[-1]["loss"]


def _ddp_worker(rank, port, argv):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code, _, err = run_cli("dpo", argv)
    if code:
        print(err, file=sys.stderr)
    os._exit(code)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one(env, tmp_path):
    """What `torchrun --nproc_per_node=2` does (env:// rendezvous, gloo), with forked workers (no
    new interpreter): gradients summed over ranks, losses normalised by the global pair count == one
    process."""
    import multiprocessing
    cli(*args(env, tmp_path / "one", "--povid_stage", "2"))
    ctx, port = multiprocessing.get_context("fork"), free_port()
    argv = args(env, tmp_path / "two", "--povid_stage", "2")
    ps = [ctx.Process(target=_ddp_worker, args=(r, port, argv)) for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    assert [p.exitcode for p in ps] == [0, 0]
    from safetensors.torch import load_file
    one = load_file(str(tmp_path / "one/checkpoint-000002/adapters.safetensors"))
    two = load_file(str(tmp_path / "two/checkpoint-000002/adapters.safetensors"))
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)
    (r1, v1), (r2, v2) = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert abs(r1[-1]["loss"] - r2[-1]["loss"]) < 1e-6
    assert abs(v1[-1]["val_reward_accuracy"] - v2[-1]["val_reward_accuracy"]) < 1e-9


def test_bad_input_exits_2_with_one_line(env, tmp_path):
    img = os.path.join(env["world"], "images/train/000000.png")
    q = {"from": "human", "value": "<image>\nIs there a square?"}
    conv = lambda a, qq=q: [qq, {"from": "gpt", "value": a}]  # noqa: E731
    other_q = {"from": "human", "value": "<image>\nIs there a ring?"}
    cases = {
        "empty": ({"id": "b", "image": img, "conversations": conv(""),
                   "rejected_conversations": conv("No.")}, "empty"),
        "preference": ({"id": "c", "image": img, "conversations": conv("Yes."),
                        "output_1": {"value": "Yes."}, "output_2": {"value": "No."},
                        "preference": 3}, "preference"),
        "prompt": ({"id": "d", "image": img, "conversations": conv("Yes."),
                    "rejected_conversations": conv("No.", other_q)},
                   "prompt turns differ"),
    }
    good = json.load(open(env["train"]))[:3]
    for name, (rec, words) in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(good[:1] + [rec]))
        data = str(tmp_path / f"{name}.json")
        code, _, err = run_cli("dpo", args(env, tmp_path / name, "--data", data))
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert "record 1" in err and words in err, (name, err)
        assert not os.path.exists(tmp_path / name / "metrics.jsonl")  # stopped before training
    mixed = good + [cases["empty"][0], cases["prompt"][0]]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    skip = args(env, tmp_path / "skip", "--data", tmp_path / "mixed.json", "--skip_bad", "true",
                "--max_steps", "1")
    assert "skipped 2 bad records" in cli(*skip)
    for flags, words in ((["--loss", "hinge"], "--loss"),
                         (["--povid_stage", "2", "--lora_r", "0"], "lora_r"),
                         (["--loss", "cdpo"], "label_smoothing"),
                         (["--loss", "rdpo"], "label_smoothing"),
                         (["--train_projector", "true"], "adapters off"),
                         (["--loss", "ipo", "--beta", "1e-30"], "past float32"),
                         (["--loss", "ipo", "--beta", "1e-200"], "past float32")):
        code, _, err = run_cli("dpo", args(env, tmp_path / "cfg", *flags))
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    argv = merge_flags(args(env, tmp_path / "sub", "--data", str(tmp_path / "empty.json")))
    code, _, err = run_script("dpo.py", argv, env={"OMP_NUM_THREADS": "1"})
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_full_finetune_resume_keeps_the_reference_it_started_from(env, tmp_path):
    """--init an SFT run folder that grew a newer checkpoint-N: a resumed full fine-tune took the
    newer one as its reference (a new cache computed from other weights)."""
    run = tmp_path / "sft_run"
    shutil.copytree(env["init"], run / "checkpoint-000001")
    out = tmp_path / "full"
    full = ["--init", run, "--lora_r", "0", "--max_steps", "1", "--eval_n", "2"]
    assert "computed" in cli(*args(env, out, *full))
    newer = load_checkpoint(env["init"])
    with torch.no_grad():
        newer.language_model.embed_tokens.weight.mul_(1.5)
    save_checkpoint_files(newer, str(run / "checkpoint-000002"))
    env["tok"].save_pretrained(str(run / "checkpoint-000002"))
    stdout = cli(*args(env, out, *full, "--resume", "true", "--max_steps", "2"))
    assert "reusing" in stdout and "what this run was trained from" in stdout
    assert len([f for f in os.listdir(out) if f.startswith("ref_logps-")]) == 1


def test_full_finetune_resume_refuses_an_init_replaced_at_its_path(env, tmp_path):
    """A full fine-tune's --init rewritten at the same path (other weights) between a run's start
    and its --resume: the run computed a second reference cache from the new weights and went on
    against it without a word (its first cache sat unread beside it). Refused now, in one line;
    files only touched (copied without their times: a new cache key) give the same log-probs, and
    the run goes on (a review: a first version refused that too)."""
    init = tmp_path / "init"
    shutil.copytree(env["init"], init)
    out = tmp_path / "full"
    full = ["--init", init, "--lora_r", "0", "--max_steps", "1", "--eval_n", "2"]
    assert "computed" in cli(*args(env, out, *full))
    for f in init.iterdir():
        os.utime(f)  # (touched: the same bytes)
    resumed = cli(*args(env, out, *full, "--resume", "true", "--max_steps", "2"))
    assert "computed" in resumed and "resumed from" in resumed
    other = load_checkpoint(str(init))
    with torch.no_grad():
        other.language_model.embed_tokens.weight.mul_(1.5)
    save_checkpoint_files(other, str(init))
    code, _, err = run_cli("dpo", [str(a) for a in args(env, out, *full, "--resume", "true",
                                                       "--max_steps", "3")])
    assert code == 2 and "reference log-probs (ref_logps-" in err and \
        "differ from those of today's inputs" in err and len(err.strip().splitlines()) == 1


def test_a_skipped_step_leaves_the_log_window_means_finite(env, tmp_path, monkeypatch):
    """--skip_nonfinite true: a step whose loss is NaN is skipped, and the means logged over its
    window are those of the steps taken (its NaN made every mean of the window NaN, null in
    metrics.jsonl); a window of skipped steps alone logs a null loss."""
    pair_losses, calls = dpo.pair_losses, []

    def nan_at_second_step(model, batch, cfg, *rest):
        losses, m = pair_losses(model, batch, cfg, *rest)
        calls.append(1)
        if len(calls) == 2:  # (step 2's one micro-batch: no held-out pass runs before it)
            nan = float("nan")
            return losses * nan, {k: v * nan for k, v in m.items()}
        return losses, m
    monkeypatch.setattr(dpo, "pair_losses", nan_at_second_step)
    out = tmp_path / "run"
    cli(*args(env, out, "--max_steps", "3", "--log_every", "3", "--val_data", "",
              "--skip_nonfinite", "true"))
    (row,), _ = _rows(str(out))
    assert row["step"] == 3 and row["grad_norm"] is not None
    assert all(row[k] is not None and math.isfinite(row[k])
               for k in row if k.startswith(("loss", "rewards/", "logps/"))), row
    calls.clear()
    cli(*args(env, tmp_path / "each", "--max_steps", "3", "--log_every", "1", "--val_data", "",
              "--skip_nonfinite", "true"))
    rows, _ = _rows(str(tmp_path / "each"))
    assert [r["loss"] is None for r in rows] == [False, True, False], rows
    assert rows[1].keys() == rows[0].keys() and rows[1]["rewards/margins"] is None, rows


def test_a_resume_refuses_a_vision_tower_replaced_since(tiny_world, tmp_path):
    """An adapter run on a base without CLIP weights (LLaVA's releases name theirs) reads them from
    --vision_tower at its start and again at --resume: a folder replaced in between was read
    without a word (the rest of the run trained, and its reference scored, on another CLIP).
    run.json records the fingerprint of the CLIP folder the model read; another is refused in one
    line, the same goes on."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from test_checkpoint import _original_llava_config, _rewrite_keys, _to_original_llava
    from test_model import hf_text_config, hf_vision_config
    text = hf_text_config()
    text.vocab_size = 1024  # (the world's tokenizer fits)

    def clip_and_llava(seed):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=hf_vision_config(),
                                                         text_config=text, pad_token_id=0))
    hf = clip_and_llava(0)
    hf.save_pretrained(tmp_path / "hf")
    hf.model.vision_tower.save_pretrained(tmp_path / "clip")
    with open(tmp_path / "hf" / "config.json") as f:
        config = _original_llava_config(json.load(f), "openai/clip-tiny")
    _rewrite_keys(tmp_path / "hf", tmp_path / "llava", lambda k: _to_original_llava(k, False),
                  config=config)
    for f in os.listdir(os.path.join(tiny_world, "tokenizer")):
        shutil.copy(os.path.join(tiny_world, "tokenizer", f), tmp_path / "llava")
    out = tmp_path / "dpo"
    args = ["--init", str(tmp_path / "llava"), "--vision_tower", str(tmp_path / "clip"),
            "--world", tiny_world, "--max_steps", "2", "--save_every", "1", "--batch_size", "2",
            "--lora_r", "4", "--out", str(out)]
    code, _, err = run_cli("dpo", args)
    assert code == 0, err
    assert json.load(open(out / "checkpoint-000001" / "config.json"))["base"] is not None
    shutil.rmtree(out / "checkpoint-000002")
    code, stdout, err = run_cli("dpo", args + ["--resume", "true"])  # (the same CLIP: goes on)
    assert code == 0 and "resumed from" in stdout, err
    shutil.rmtree(out / "checkpoint-000002")
    clip_and_llava(1).model.vision_tower.save_pretrained(tmp_path / "clip")
    code, stdout, err = run_cli("dpo", args + ["--resume", "true"])
    assert code == 2 and "resumed from" not in stdout, err
    assert f"--vision_tower {tmp_path / 'clip'}: other CLIP weights than this run started with " \
        "(replaced since: the fingerprint in" in err and "Traceback" not in err, err
    assert not (out / "checkpoint-000002").exists()
    # a run recorded before the fingerprint was: not checked, it goes on
    run = json.load(open(out / "run.json"))
    del run["clip_tensors"]
    json.dump(run, open(out / "run.json", "w"))
    code, stdout, err = run_cli("dpo", args + ["--resume", "true"])
    assert code == 0 and "resumed from" in stdout, err
