"""Tests for the Fact-RLHF stages: reward.py (reward model) and ppo.py (PPO). Hand-computed math on
made-up numbers, tiny models built in-process, and short CLI runs on the tiny Shapes world
(conftest.py)."""
import copy
import json
import math
import os
import re
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import HERE, assert_same_metrics, count_decode_compiles, free_port, run_cli
import common
import distributed
import rundir
import data
import ppo
import reward
from data import load_tokenizer
from checkpoint import (load_checkpoint, recorded_template, resolve_checkpoint,
                        save_checkpoint_files)
from interop import export_llava_hf
from model import LLaVA

ONE = distributed.Dist()  # a world of one process


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and far steadier on a shared machine, than
    two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------
# reward model
# ----------------------------------------------------------------------------------------

def test_preference_loss_hand_computed():
    rc = torch.tensor([1.0, -0.5], requires_grad=True)
    rr = torch.tensor([0.0, 0.5], requires_grad=True)
    loss, value = reward.preference_loss(rc, rr, torch.tensor(2.0), 1e-3, ONE)
    # -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-1) = log(1 + e); centring: 1e-3 * |(1 + 0) / 2|
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2 + 1e-3 * 0.5
    assert abs(float(value) - want) < 1e-6 and abs(float(loss.detach()) - want) < 1e-6
    loss.backward()
    exact_c, exact_r = rc.detach().clone().requires_grad_(), rr.detach().clone().requires_grad_()
    (-F.logsigmoid(exact_c - exact_r).mean() + 1e-3 * (exact_c + exact_r).mean().abs()).backward()
    assert torch.allclose(rc.grad, exact_c.grad) and torch.allclose(rr.grad, exact_r.grad)



def test_preference_loss_centring_is_the_absolute_mean_when_rewards_are_negative():
    """The centring term is |mean(r_c + r_r)| (LLaVA-RLHF): a negative mean adds, not subtracts."""
    rc = torch.tensor([-1.0, -2.0], requires_grad=True)
    rr = torch.tensor([-3.0, 0.0], requires_grad=True)
    loss, value = reward.preference_loss(rc, rr, torch.tensor(2.0), 0.5, ONE)
    # -log sigmoid(2), -log sigmoid(-2); mean(r_c + r_r) = (-4 - 2) / 2 = -3: + 0.5 * 3
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2 + 0.5 * 3
    assert float(value) == pytest.approx(want) and float(loss.detach()) == pytest.approx(want)
    loss.backward()  # d/dr of 0.5 |m| = 0.5 * sign(m) / 2 = -0.25 beside the pairwise term
    assert rc.grad.tolist() == pytest.approx([-torch.sigmoid(torch.tensor(-2.0)).item() / 2 - 0.25,
                                              -torch.sigmoid(torch.tensor(2.0)).item() / 2 - 0.25])


def test_held_out_accuracy_counts_a_tie_as_llava_rlhf_does(monkeypatch):
    """val_accuracy is the share of pairs with r_chosen > r_rejected, and a tie is a hit only where
    the chosen answer is output_2 (LLaVA-RLHF's prediction on a tie): a head that scores every
    answer alike (a fresh zero head) is right where output_2 was chosen, not on every pair. Loss
    and margin are means over pairs."""
    scores = [(1.0, 0.0), (0.5, 0.5), (-1.0, 2.0), (0.0, 0.0)]  # (chosen, rejected) per pair
    chose_second = [False, False, False, True]  # (the first tie a miss, the second a hit)
    monkeypatch.setattr(reward, "pair_batch", lambda val, chunk, *a: (
        {"chose_second": torch.tensor([chose_second[i] for i in chunk]), "pairs": chunk}, None))
    monkeypatch.setattr(reward, "forward_pairs", lambda model, b, device: torch.tensor(
        [scores[i] for i in b["pairs"]]).T)
    got = reward.evaluate(torch.nn.Linear(1, 1), scores, reward.Config(batch_size=3), None, None,
                          ONE)
    margins = [1.0, 0.0, -3.0, 0.0]
    assert got["val_accuracy"] == 0.5 and got["n_val"] == 4
    assert got["val_margin"] == pytest.approx(sum(margins) / 4)
    assert got["val_loss"] == pytest.approx(sum(math.log(1 + math.exp(-m)) for m in margins) / 4)


# RLHF/prompts/fact_rlhf_reward_prompt.txt with {factual_prompt} filled as ppo_trainer.py does
LLAVA_RLHF_FACT_PROMPT = (
    "USER: Please evaluate the quality of your last response. There are several dimensions you "
    "should consider in your evaluation:\n\n1. Accurate: The AI should provide factual and "
    "accurate information from the image, and refrain from making statements that are not "
    "supported by the image or inconsistent with the image. {factual_prompt}\n2. Helpful: The "
    "AI\u2019s response should precisely serve the user's needs and interests, while grounding the "
    "response in the image.\n3. Language Natural: The AI should employ language that flows "
    "smoothly and is free from repetitive or awkward constructs.\n4. Concise: The AI should "
    "efficiently address the task or answer the question, communicating the necessary information "
    "with brevity and clarity.\n\nA good response should be accurate, helpful, language natural, "
    "and concise. ASSISTANT: Following your definitions, the quality score of my last response is")


def test_eval_turn_is_llava_rlhfs_wording():
    caps = ["A red circle.", "Two squares.", "A blue ring at the top."]
    order = list(caps)
    random.Random(7).shuffle(order)
    factual = ("Specifically, the AI's response should be fully supported by the combination of "
               "the following captions:\n")
    factual += "".join(f"  - {c}\n" for c in order)
    got = "USER: " + data.eval_question(caps, random.Random(7)) + " ASSISTANT: " + data.EVAL_ANSWER
    assert got == LLAVA_RLHF_FACT_PROMPT.format(factual_prompt=factual)
    # RLHF/prompts/reward_prompt.txt
    plain = LLAVA_RLHF_FACT_PROMPT.replace(" {factual_prompt}", "")
    assert "USER: " + data.eval_question(None, None) + " ASSISTANT: " + data.EVAL_ANSWER == plain


def tiny(vocab=960, seed=0):
    torch.manual_seed(seed)
    return LLaVA.from_preset("tiny", vocab_size=vocab, image_token_id=4, pad_token_id=3,
                             bos_token_id=1, eos_token_id=2).eval()


def test_fact_prompt_holds_captions_and_response_and_score_is_at_last_prompt_token(tiny_world):
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    m = tiny()
    m.add_adapter("reward", 4, 8)
    torch.nn.init.normal_(m.add_head("reward").weight)
    caps = ["A small red circle.", "One circle.", "A dark picture with a red circle."]
    prompt = [{"from": "human", "value": "<image>\nDescribe the image."}]
    response = "There is one object. A small red circle is in the center."
    item = data.reward_item(tok, m.config, prompt, response, caps, random.Random(0))
    ids = item["input_ids"]
    text = tok.decode([t for t in ids.tolist() if t != 4])
    assert response in text and all(c in text for c in caps)
    assert text.rstrip().endswith("the quality score of my last response is")
    assert int(ids[-1]) != tok.eos_token_id
    plain_ids = data.reward_item(tok, m.config, prompt, response, None, None)["input_ids"]
    plain = tok.decode(plain_ids.tolist())
    assert not any(c in plain for c in caps) and response in plain
    # the score is the head on the hidden state of the last prompt token, whatever follows it
    feats = torch.randn(2, m.config.num_image_tokens, m.config.hidden)
    longer = torch.cat([ids, torch.tensor([7, 8, 9])])
    from data import collate
    b = collate([{"input_ids": ids}, {"input_ids": longer}], tok.pad_token_id)
    with m.use_adapter("reward"), torch.no_grad():
        both = feats[:1].expand(2, -1, -1)
        s = common.score_sequences(m, "reward", b["input_ids"], b["attention_mask"], both)
        h = m(None, longer[None], return_hidden=True, image_features=feats[:1])
    assert torch.allclose(s[0], m.heads["reward"](h[0, len(ids) - 1]), atol=1e-5)
    assert torch.allclose(s[1], m.heads["reward"](h[0, -1]), atol=1e-5)
    assert not torch.allclose(s[0], s[1])
    # no padding mask goes into the model, so a left-padded batch would be scored wrongly: refused
    left = collate([{"input_ids": ids}, {"input_ids": longer}], tok.pad_token_id, side="left")
    with pytest.raises(ValueError, match="right-padded"):
        common.score_sequences(m, "reward", left["input_ids"], left["attention_mask"], both)


def test_sampled_pairs_are_ranked_by_the_oracle_and_ties_dropped(tiny_world, monkeypatch):
    import shapes
    from data import read_llava_rlhf_preference
    recs = read_llava_rlhf_preference(os.path.join(tiny_world, "pref_pairs.json"), tiny_world)[:3]
    # ground truth, injected hallucination
    truth, fake = [r["chosen"] for r in recs], [r["rejected"] for r in recs]
    # two samples per prompt; the third ties
    answers = [truth[0], fake[0], fake[1], truth[1], truth[2], truth[2]]
    fake_generate = lambda model, tok, items, *a, **k: answers[:len(items)]
    monkeypatch.setattr(common, "generate_answers", fake_generate)
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    objects = shapes.load_world(tiny_world)["by_file"]
    pairs, stats = reward.sample_pairs(reward.Config(), ONE, tiny(), tok, recs, objects,
                                       tiny_world, 0)
    assert stats == {"prompts": 3, "ties": 1, "empty": 0, "pairs": 2}
    want = [(truth[0], fake[0]), (truth[1], fake[1])]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == want
    assert all(p["hallucinations"][0] == 0 < p["hallucinations"][1] for p in pairs)


# ----------------------------------------------------------------------------------------
# PPO math
# ----------------------------------------------------------------------------------------

def test_reward_shaping_hand_computed_with_pad_equal_to_eos():
    eos = pad = 2
    tokens = torch.tensor([[5, 6, eos, pad], [7, eos, pad, pad]])  # lengths 3 and 2; pad == eos
    lengths = torch.tensor([3, 2])
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -3.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-0.5, -3.0, -9.0, -9.0]])
    score = torch.tensor([2.0, -1.0])
    r, kl, mask = ppo.shape_rewards(score, logp, ref, lengths, kl_coef=0.1)
    # k1 clamped: [0.5, 0 (-1 clamped), 0, -], [0 (-0.5 clamped), 0, -, -]
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([[-0.05, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 0.0]]))
    first_pad = (tokens == pad).float().argmax(1)
    # searching for pad would miss the EOS token
    assert (first_pad - 1).tolist() == [1, 0] != (lengths - 1).tolist()
    _, kl3, _ = ppo.shape_rewards(score, logp, ref, lengths, 0.1, estimator="k3")
    lr = ref - logp  # log(p_ref / p)
    want = (lr.exp() - 1 - lr) * mask
    assert torch.allclose(kl3, want) and float(kl3[0, 1]) == pytest.approx(math.exp(1) - 2)
    _, kl_raw, _ = ppo.shape_rewards(score, logp, ref, lengths, 0.1, clamp=False)
    assert float(kl_raw[0, 1]) == -1.0
    cfg = ppo.Config(correctness=2.0, length_penalty=-10.0, no_eos_penalty=-8.0, max_new_tokens=4)
    total = ppo.sequence_reward(torch.tensor([1.0, 1.0]), torch.tensor([1.0, -0.5]),
                                torch.tensor([1.0, 0.0]), lengths, torch.tensor([True, False]), cfg)
    assert torch.allclose(total, torch.tensor([1 + 2 - 10 * 3 / 4, 1 - 1 - 8.0]))


def test_reward_shaping_is_finite_past_the_end_whatever_the_log_probs_there():
    """Past a response's end the KL is 0 whatever the log-probs there: a reference log-prob of -inf
    (a pad given probability 0, as under a tiny --temperature) made k1 and k3 inf, and inf x mask 0
    NaN, which GAE carried back into every advantage of the row."""
    logp = torch.tensor([[-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -math.inf, -math.inf]])
    for estimator in ("k1", "k3"):
        r, kl, mask = ppo.shape_rewards(torch.tensor([2.0]), logp, ref, torch.tensor([1]), 0.1,
                                        estimator)
        assert kl[0, 1:].tolist() == [0.0, 0.0] and r[0, 1:].tolist() == [0.0, 0.0]
        adv, _ = ppo.gae(r, torch.zeros(1, 3), 1.0, 1.0)
        assert torch.isfinite(adv).all()


def test_defaults_are_llava_rlhfs_method_constants():
    """DESIGN.md's method facts, the defaults a run without flags trains with."""
    c = ppo.Config()
    assert (c.kl_coef, c.gamma, c.lam, c.clip, c.vf_clip) == (0.1, 1.0, 1.0, 0.2, 0.2)
    assert c.vf_coef == 0.1
    assert (c.ppo_epochs, c.temperature, c.correctness, c.no_eos_penalty) == (2, 1.0, 2.0, -8.0)
    assert reward.Config().center_coef == 1e-3


def test_gae_equals_a_naive_loop():
    torch.manual_seed(0)
    B, K, gamma, lam = 3, 6, 0.9, 0.8
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (K - n) for n in lengths])
    rewards, values = torch.randn(B, K) * mask, torch.randn(B, K) * mask
    adv, ret = ppo.gae(rewards, values, gamma, lam)
    for b, n in enumerate(lengths):
        V = values[b].tolist()[:n] + [0.0]
        deltas = [rewards[b, t].item() + gamma * V[t + 1] - V[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert adv[b, t].item() == pytest.approx(want, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(want + V[t], abs=1e-5)
        assert adv[b, n:].abs().sum() == 0


def test_whitening_is_global_and_masked():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = ppo.whiten(x, mask, ONE)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    want = (vals - 3.0) / (vals.std(unbiased=False) + 1e-8)
    assert torch.allclose(w[mask.bool()], want, atol=1e-6) and w[0, 2] == 0


def test_clipped_policy_and_value_losses_hand_computed():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, st = ppo.policy_loss(logp, old, adv, torch.ones(3), 0.2, torch.tensor(3.0))
    # ratio 1.5, A 1: max(-1.5, -1.2) = -1.2; ratio 0.5, A -1: max(0.5, 0.8) = 0.8; ratio 1, A 2: -2
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.0) / 3)
    assert float(st["clipfrac"]) == pytest.approx(2 / 3)
    want_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3
    assert float(st["approx_kl"]) == pytest.approx(want_kl)
    v = torch.tensor([1.0, 0.0, 9.0])
    v_old = torch.tensor([0.5, 0.0, 0.0])
    ret = torch.tensor([2.0, -1.0, 0.0])
    vl, vst = ppo.value_loss(v, v_old, ret, torch.tensor([1.0, 1.0, 0.0]), 0.2, torch.tensor(2.0))
    # token 1: V clipped to 0.7, max((1-2)^2, (0.7-2)^2) = 1.69; token 2: 1; token 3 masked
    assert float(vl) == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert float(vst["vf_clipfrac"]) == pytest.approx(0.5)


@pytest.mark.parametrize("text,ctype,bonus,correct", [
    ("B. The circle is red.", 3, 1.0, True),
    ("The circle at the top is red. So the correct option is B.", 3, 1.0, True),
    ("So the correct option is C.", 3, 0.0, False),
    ("A. It is blue.", 2, 1.0, True),
    ("D", 5, 0.0, False),                      # LLaVA-RLHF wants 'D.' or 'correct option is D.'
    ("No, there is no ring.", 6, 0.5, True),
    ("Yes, there is a ring.", 6, -0.5, False),
    ("Nothing like that.", 6, 0.0, False),     # word boundary: 'Nothing' is not 'No'
    ("Yes, there is a circle.", 7, 0.0, True),  # LLaVA-RLHF gives no symbolic reward for 'Yes'
    ("No, there is no circle.", 7, 0.0, False),
    ("There are two squares.", 1, 0.0, None),
])
def test_correctness_table(text, ctype, bonus, correct):
    assert ppo.correctness(text, ctype) == (bonus, correct)


@pytest.mark.parametrize("text,ctype,bonus,correct", [
    # LLaVA-RLHF's startswith('No'): 'Nothing' earns the No bonus
    ("Nothing like that.", 6, 0.5, True),
    ("None.", 6, 0.5, True),
    ("Yesterday it was there.", 6, -0.5, False),
    ("No, there is no ring.", 6, 0.5, True),
    ("Nothing here.", 7, 0.0, False),
    ("B. The circle is red.", 3, 1.0, True),
])
def test_correctness_prefix_rule_is_llava_rlhfs(text, ctype, bonus, correct):
    assert ppo.correctness(text, ctype, "prefix") == (bonus, correct)


def test_cut_at_question_tokens_as_llava_rlhf_truncates():
    """truncate_after_eos_with_padding by hand: end = first EOS, then overridden by the first
    occurrence of each extra stop id in turn (the last one found wins); the end token kept, the rest
    padded."""
    eos, pad, q1, q2 = 2, 0, 7, 9  # q1 = tok('?')[0], q2 = tok('\n?')[-1]
    tokens = torch.tensor([[5, q1, 6, eos, pad], [5, q2, q1, eos, pad], [5, 6, eos, pad, pad],
                           [5, 6, 6, 6, 6], [q1, 6, 6, 6, 6]])
    lengths = torch.tensor([4, 4, 3, 5, 5])
    got, n, fin = ppo.cut_at_stop_tokens(tokens, lengths, eos, pad, [q1, q2])
    assert got.tolist() == [[5, q1, 0, 0, 0], [5, q2, 0, 0, 0], [5, 6, eos, 0, 0],
                            [5, 6, 6, 6, 6], [q1, 0, 0, 0, 0]]
    assert n.tolist() == [2, 2, 3, 5, 1] and fin.tolist() == [False, False, True, False, False]
    # a cut response has no EOS: the -8 penalty
    cfg = ppo.Config(correctness=0.0, length_penalty=0.0)
    total = ppo.sequence_reward(torch.zeros(5), torch.zeros(5), torch.zeros(5), n, fin, cfg)
    assert total.tolist() == [-8.0, -8.0, 0.0, -8.0, -8.0]


def test_rollouts_end_at_any_eos_id_the_config_lists(sft, tiny_rm, tiny_world, tmp_path):
    """A Llama 3 config lists its turn end (<|eot_id|>) beside the tokenizer's eos: PPO's rollouts
    sampled past it (generate and cut_at_stop_tokens read the tokenizer's one id), and such an
    answer drew the no-EOS penalty. Any listed id ends a rollout now, and the cut at a '?' counts
    it as an EOS."""
    eos, pad, q, eot = 2, 0, 7, 9
    tokens = torch.tensor([[5, eot, 6, pad], [5, 6, eos, pad], [q, eot, pad, pad]])
    got, n, fin = ppo.cut_at_stop_tokens(tokens, torch.tensor([3, 3, 2]), [eos, eot], pad, [q])
    assert n.tolist() == [2, 3, 1] and fin.tolist() == [True, True, False]
    assert got[0].tolist() == [5, eot, 0, 0]
    cfg = ppo.Config(init=sft, reward=tiny_rm[0], max_new_tokens=6,
                     data=os.path.join(tiny_world, "rl_prompts.json"), out=str(tmp_path / "unused"))
    policy, critic, tok = ppo.build_roles(cfg, ONE)
    rm = ppo.reward_settings(resolve_checkpoint(tiny_rm[0]))
    prompts = ppo.load_prompts(cfg, True, tok, policy, "vicuna_v1")[0][:2]
    roll = lambda: ppo.rollout(policy, critic, tok, prompts, data.ImageCache(48), cfg, rm, 0.1,
                               torch.Generator().manual_seed(0), "k")
    first = int(roll()["seq"][0, -cfg.max_new_tokens])
    assert first != tok.eos_token_id
    policy.config.eos_token_id = [tok.eos_token_id, first]
    ro = roll()
    assert int(ro["lengths"][0]) == 1 and bool(ro["finished"][0])


def test_reward_model_reads_sampled_ids_and_the_spaced_prompt(tiny_world):
    """--rm_input tokens: prompt ids + the sampled ids as they are ('</s>' only when sampled) + the
    evaluation turn tokenized alone without special tokens, ' USER: Please evaluate ...' (LLaVA-RLHF
    ppo_trainer.py)."""
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    # '?' alone, not '▁'
    assert [tok.convert_ids_to_tokens(i) for i in ppo.question_stop_ids(tok)] == ["?"]

    prompt_ids, resp = torch.tensor([1, 4, 4, 11, 12]), torch.tensor([20, 21])
    caps = ["A red circle.", "One circle."]
    question = data.eval_question(caps, random.Random(3))
    tail = " USER: " + question + " ASSISTANT: " + data.EVAL_ANSWER
    want = [1, 4, 4, 11, 12, 20, 21] + tok(tail, add_special_tokens=False)["input_ids"]
    got = data.reward_item_from_ids(tok, prompt_ids, resp, caps, random.Random(3))["input_ids"]
    # no EOS sampled: none added
    assert got.tolist() == want and tok.eos_token_id not in got.tolist()
    eos_resp = torch.tensor([20, tok.eos_token_id])
    with_eos = data.reward_item_from_ids(tok, prompt_ids, eos_resp, caps, random.Random(3))
    assert with_eos["input_ids"].tolist()[6] == tok.eos_token_id
    # the text path with the space: the rendered conversation + ' ' + the turn, one string, one
    # tokenization
    m = tiny()
    prompt = [{"from": "human", "value": "<image>\nDescribe the image."}]
    text = data.render(prompt + [{"from": "gpt", "value": "A red circle."}])[0] + tail
    head, rest = text.split("<image>")
    # as after a special token
    after_image = tok(tok.bos_token + rest, add_special_tokens=False)["input_ids"][1:]
    want = tok(head)["input_ids"] + [4] * m.config.num_image_tokens + after_image
    spaced = data.reward_item(tok, m.config, prompt, "A red circle.", caps, random.Random(3),
                              space=True)
    assert spaced["input_ids"].tolist() == want and "</s> USER: Please evaluate" in text
    plain = data.reward_item(tok, m.config, prompt, "A red circle.", caps, random.Random(3))
    assert plain["input_ids"].tolist() != want  # ours: '</s>USER:'
    # the sampled ids of an answer that ended, then the turn: the ids the text gives, with the
    # space and without it (without, the turn alone took a word-start mark: '</s> USER' where the
    # reward model, trained without --prompt_space, read '</s>USER')
    item = common.prompt_item(tok, m, prompt)
    answer = tok("A red circle.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for space in (True, False):
        text = data.reward_item(tok, m.config, prompt, "A red circle.", caps, random.Random(3),
                                space=space)["input_ids"]
        ids = data.reward_item_from_ids(tok, item["input_ids"], torch.tensor(answer), caps,
                                        random.Random(3), space=space)["input_ids"]
        assert ids.tolist() == text.tolist(), space


def fixed_rollout(m, B=4, P=16, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_img = m.config.num_image_tokens
    ids = torch.randint(5, 900, (B, P), generator=g)
    ids[:, 3:3 + n_img] = 4
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[0, :2], ids[0, :2] = 0, 3  # one left-padded prompt (the image tokens stay)
    resp = torch.randint(5, 900, (B, K), generator=g)
    lengths = torch.tensor([5, 3, 4, 1])
    rmask = (torch.arange(K)[None] < lengths[:, None]).float()
    seq, mask = torch.cat([ids, resp], 1), torch.cat([pmask, rmask.long()], 1)
    feats = torch.randn(B, n_img, m.config.hidden, generator=g)
    with torch.no_grad(), m.use_adapter("policy"):
        logp, _ = ppo.response_logprobs(m, feats, seq, mask, P, 1.0)
    with torch.no_grad(), m.use_adapter("value"):
        values = ppo.response_values(m, feats, seq, mask, P) * rmask
    adv = torch.randn(B, K, generator=g) * rmask
    ro = dict(seq=seq, mask=mask, P=P, feats=feats, cfeats=feats, cseq=seq, cmask=mask, cP=P,
              logp=logp, values=values,
              rmask=rmask)
    return ro, adv


def policy_and_value():
    """A tiny model with PPO's trainable parts: the policy and value adapters and the value head."""
    m = tiny()
    m.add_adapter("policy", 4, 8)
    m.add_adapter("value", 4, 8)
    m.add_head("value")
    m.set_trainable(adapters=["policy", "value"], heads=["value"])
    return m


def test_one_ppo_update_raises_the_advantage_weighted_logprob():
    m = tiny()
    m.add_adapter("policy", 4, 8)
    m.add_adapter("reward", 4, 8)
    m.copy_adapter("reward", "value")
    m.add_head("value")
    m.set_trainable(adapters=["policy", "value"], heads=["value"])
    ro, adv = fixed_rollout(m)
    returns = torch.randn_like(adv) * ro["rmask"]
    twin = copy.deepcopy(m)
    frozen_before = {n: p.detach().clone() for n, p in frozen_weights(m).items()}
    params = (m.adapter_parameters("policy") + m.adapter_parameters("value")
              + list(m.heads["value"].parameters()))
    opt = torch.optim.AdamW(params, lr=1e-2)
    cfg = ppo.Config(ppo_epochs=1, minibatch_size=4, out="/nonexistent")
    before = (adv * ro["logp"] * ro["rmask"]).sum()
    stats = ppo.ppo_update(m, m, ro, adv, returns, opt, params, cfg, ONE, 0)
    # micro-batches of 2 accumulate to the same update (losses are normalised by the minibatch's
    # token count)
    tparams = (twin.adapter_parameters("policy") + twin.adapter_parameters("value")
               + list(twin.heads["value"].parameters()))
    twin_opt = torch.optim.AdamW(tparams, lr=1e-2)
    twin_cfg = ppo.Config(ppo_epochs=1, minibatch_size=4, micro_batch=2, out="/nonexistent")
    ppo.ppo_update(twin, twin, ro, adv, returns, twin_opt, tparams, twin_cfg, ONE, 0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params, tparams))
    with torch.no_grad(), m.use_adapter("policy"):
        after_logp, _ = ppo.response_logprobs(m, ro["feats"], ro["seq"], ro["mask"], ro["P"], 1.0)
    assert (adv * after_logp * ro["rmask"]).sum() > before
    # one minibatch, one epoch: still on-policy
    assert stats["clipfrac"] == 0 and stats["approx_kl"] < 1e-10
    # the reference (the base, no adapter) and the reward adapter did not move
    frozen_after = frozen_weights(m)
    assert frozen_after.keys() == frozen_before.keys() and len(frozen_after) > 20
    assert all(torch.equal(frozen_after[n], frozen_before[n]) for n in frozen_before)
    assert all(p.grad is None for p in m.adapter_parameters("reward"))


def test_ppo_update_weighs_the_value_loss_by_vf_coef(monkeypatch):
    """The value head's gradient is vf_coef x that of the clipped value loss (the policy loss does
    not reach it), summed over the minibatch's response tokens."""
    m = policy_and_value()
    ro, adv = fixed_rollout(m)
    returns = torch.randn_like(adv) * ro["rmask"]
    head = list(m.heads["value"].parameters())
    seen = []
    monkeypatch.setattr(common, "optimizer_step",
                        lambda opt, *a, **k: (seen.append([p.grad.clone() for p in head]), 0.0))
    cfg = ppo.Config(ppo_epochs=1, minibatch_size=4, vf_coef=0.3, out="/nonexistent")
    params = m.adapter_parameters("policy") + m.adapter_parameters("value") + head
    ppo.ppo_update(m, m, ro, adv, returns, torch.optim.SGD(params), params, cfg, ONE, 0)
    with m.use_adapter("value"):
        v = ppo.response_values(m, ro["feats"], ro["seq"], ro["mask"], ro["P"])
    vf, _ = ppo.value_loss(v, ro["values"], returns, ro["rmask"], 0.2, ro["rmask"].sum())
    want = torch.autograd.grad(0.3 * vf, head)
    assert len(seen) == 1 and all(torch.allclose(g, w, atol=1e-6) for g, w in zip(seen[0], want))


def frozen_weights(m):
    """The weights PPO must leave alone: every base weight and the reward adapter."""
    return {n: p for n, p in m.named_parameters()
            if (".lora." not in n and not n.startswith("heads.")) or ".lora.reward." in n}


def test_rollout_logprobs_match_the_sampling_logprobs():
    """Left-padded prompt + right-padded response recomputed in one forward gives generate's own
    log-probs."""
    m = tiny()
    B, P = 3, 12
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 900, (B, P), generator=g)
    ids[:, 2:2 + m.config.num_image_tokens] = 4
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[1, :2] = 0
    feats = torch.randn(B, m.config.num_image_tokens, m.config.hidden, generator=g)
    out = m.generate(None, ids, pmask, max_new_tokens=6, temperature=0.7, eos_token_id=2,
                     pad_token_id=3, generator=g, return_logprobs=True, image_features=feats)
    rmask = torch.arange(6)[None] < out.lengths[:, None]
    with torch.no_grad():
        logp, _ = ppo.response_logprobs(m, feats, torch.cat([ids, out.tokens], 1),
                                        torch.cat([pmask, rmask.long()], 1), P, 0.7)
    assert torch.allclose(logp[rmask], out.logprobs[rmask], atol=1e-4)


# ----------------------------------------------------------------------------------------
# roles share one base when they can
# ----------------------------------------------------------------------------------------

def base_storages(*models):
    return {p.untyped_storage().data_ptr() for m in models for n, p in m.named_parameters()
            if ".lora." not in n and not n.startswith("heads.")}


def make_rm(sft_dir, out, shared=True, vocab=None, facts=True, prompt_space=False,
            template="vicuna_v1"):
    if vocab is None:
        m = load_checkpoint(sft_dir)
    else:
        m = tiny(vocab=vocab)
    m.add_adapter("reward", 4, 8)
    m.add_head("reward")
    m.set_adapter("reward")
    run_config = {"facts": facts, "eval_prompt": "short", "template": template,
                  "prompt_space": prompt_space}
    save_checkpoint_files(m, out, base=resolve_checkpoint(sft_dir) if shared else None,
                          extra_config={"run_config": run_config})
    shutil.copy(os.path.join(resolve_checkpoint(sft_dir), "tokenizer.json"), out)
    shutil.copy(os.path.join(resolve_checkpoint(sft_dir), "tokenizer_config.json"), out)
    return str(out)


def test_roles_share_one_base_when_the_reward_model_was_trained_on_it(sft, tmp_path):
    n_base = len(base_storages(load_checkpoint(sft)))
    cfg = ppo.Config(init=sft, reward=make_rm(sft, tmp_path / "rm"))
    policy, critic, _ = ppo.build_roles(cfg, ONE)
    assert policy is critic and len(base_storages(policy, critic)) == n_base
    assert set(policy.adapters) == {"policy", "reward", "value"}
    assert set(policy.heads) == {"reward", "value"}
    reward_and_value = zip(policy.adapter_parameters("reward"), policy.adapter_parameters("value"))
    assert all(torch.equal(a, b) for a, b in reward_and_value)
    assert float(policy.heads["value"].weight.detach().abs().sum()) == 0
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    trained = (policy.adapter_parameters("policy") + policy.adapter_parameters("value")
               + list(policy.heads["value"].parameters()))
    assert trainable == {id(p) for p in trained}
    cfg = ppo.Config(init=sft, reward=make_rm(sft, tmp_path / "rm_full", shared=False))
    policy, critic, _ = ppo.build_roles(cfg, ONE)
    assert policy is not critic and len(base_storages(policy, critic)) == 2 * n_base
    assert set(policy.adapters) == {"policy"} and set(critic.adapters) == {"reward", "value"}


def test_a_reward_model_at_another_image_size_reads_its_own_view(sft, tiny_world, tmp_path):
    """LLaVA-RLHF's 7B policy (224 px) is rewarded by its 13B reward model (336 px): each model
    expands the one image placeholder to its own image tokens and sees the image at its own size.
    Refused before ('must read the policy's tokens and images'). Row 0's score and values are
    checked against the critic run on that prompt tokenized for it, unpadded."""
    rm_model = LLaVA.from_preset("tiny", vocab_size=960, image_token_id=4, pad_token_id=3,
                                 bos_token_id=1, eos_token_id=2, image_size=32).eval()
    rm_model.add_adapter("reward", 4, 8)
    torch.nn.init.normal_(rm_model.add_head("reward").weight, std=0.5)
    rm_dir = tmp_path / "rm32"
    run_config = {"facts": True, "eval_prompt": "short", "template": "vicuna_v1",
                  "prompt_space": True}
    save_checkpoint_files(rm_model, rm_dir, extra_config={"run_config": run_config})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_world, "tokenizer", f), rm_dir)
    cfg = ppo.Config(init=sft, reward=str(rm_dir), data=os.path.join(tiny_world, "rl_prompts.json"),
                     max_new_tokens=6, rm_input="tokens", out=str(tmp_path / "unused"))
    policy, critic, tok = ppo.build_roles(cfg, ONE)
    assert (policy.config.num_image_tokens, critic.config.num_image_tokens) == (9, 4)
    rm = ppo.reward_settings(str(rm_dir))
    prompts = ppo.load_prompts(cfg, True, tok, policy, "vicuna_v1")[0][:3]
    ro = ppo.rollout(policy, critic, tok, prompts, data.ImageCache(48), cfg, rm, 0.1,
                     torch.Generator().manual_seed(0), "k")
    p, n = prompts[0], int(ro["lengths"][0])
    mc = critic.config
    ids = data.tokenize_conversations(tok, [p["prompt"]], mc.image_token_id, mc.num_image_tokens,
                                      1 << 30, "vicuna_v1")[0]["input_ids"]
    assert torch.equal(ppo.critic_ids(p["input_ids"], policy, critic), ids)
    response = ro["seq"][0, ro["P"]:ro["P"] + n]
    with torch.no_grad():
        feats = critic.encode_images(data.normalize(data.ImageCache(32).unit(p["image"]))[None])
        item = data.reward_item_from_ids(tok, ids, response, p["captions"], random.Random("k-0"),
                                         1 << 30, "short", True)["input_ids"]
        with critic.use_adapter("reward"):
            score = common.score_sequences(critic, "reward", item[None],
                                           torch.ones_like(item)[None], feats)
        seq = torch.cat([ids, ro["seq"][0, ro["P"]:]])[None]
        with critic.use_adapter("value"):
            values = ppo.response_values(critic, feats, seq, torch.ones_like(seq), len(ids))
    torch.testing.assert_close(ro["score"][0], score[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ro["values"][0, :n], values[0, :n], atol=1e-5, rtol=0)
    # and a PPO step with it
    argv = ["--init", sft, "--reward", str(rm_dir), "--world", tiny_world, "--max_steps", "1",
            "--out", str(tmp_path / "ppo")] + PPO_ARGS
    code, _, err = run_cli("ppo", argv)
    assert code == 0, err


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_world):
    """A random `tiny` model saved as the SFT checkpoint (the RLHF stages only need its format)."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    save_checkpoint_files(tiny(), out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_world, "tokenizer", f), out)
    return str(out)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, tiny_world, sft):
    out = str(tmp_path_factory.mktemp("rm") / "rm")
    argv = ["--init", sft, "--world", tiny_world, "--max_steps", "2", "--batch_size", "4",
            "--out", out, "--eval_prompt", "short", "--log_every", "1", "--eval_size", "8"]
    code, stdout, err = run_cli("reward", argv)
    assert code == 0, err
    return out, stdout


def test_reward_cli_injected_pairs(tiny_rm, sft):
    out, stdout = tiny_rm
    ck = resolve_checkpoint(out)
    cfg = json.load(open(os.path.join(ck, "config.json")))
    # adapter + head only, base = the SFT checkpoint
    assert not os.path.exists(os.path.join(ck, "model.safetensors"))
    base = os.path.realpath(os.path.join(ck, cfg["base"]))
    assert base == os.path.realpath(resolve_checkpoint(sft))
    assert set(cfg["adapters"]) == {"reward"} and cfg["heads"] == ["reward"]
    assert cfg["run_config"]["facts"] is True
    rep = json.load(open(os.path.join(out, "report.json")))
    assert 0 <= rep["val_accuracy"] <= 1 and rep["n_val"] > 0
    assert "held-out pairwise accuracy" in stdout
    # the facts control: the same pairs with another image's captions
    assert 0 <= rep["val_accuracy_other_facts"] <= 1 and "another image's captions" in stdout
    m = load_checkpoint(out)
    assert m.active_adapter == "reward" and "reward" in m.heads


def test_reward_facts_control_needs_another_image(sft, tiny_world, tmp_path):
    """Held-out pairs that all show one image have no other image's captions to swap in: the
    control is left out of report.json (it was reported as accuracy 0.000 over no pairs)."""
    one = json.load(open(os.path.join(tiny_world, "pref_pairs.json")))[0]
    val = tmp_path / "one_image.json"
    val.write_text(json.dumps([dict(one, id=f"{one['id']}-{k}") for k in range(2)]))
    argv = ["--init", sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--eval_prompt", "short", "--val_data", str(val), "--image_folder", tiny_world,
            "--out", str(tmp_path / "rm")]
    code, stdout, err = run_cli("reward", argv)
    assert code == 0, err
    rep = json.load(open(tmp_path / "rm" / "report.json"))
    assert rep["n_val"] == 2 and "val_accuracy_other_facts" not in rep, rep
    assert "another image's captions" not in stdout


def test_reward_trains_on_pairs_whose_two_answers_are_alike(sft, tiny_world, tmp_path):
    """A preference file holding a pair whose two outputs are the same was refused whole; LLaVA-RLHF
    trains on such a pair (its centring term learns from it), so reward.py keeps it, counted.
    Such a pair's two scores tie: held-out accuracy counted a tie as a miss; LLaVA-RLHF predicts
    output_2 on a tie, a hit where the record chose output_2."""
    recs = json.load(open(os.path.join(tiny_world, "pref_pairs.json")))[:7]
    for r in recs[2], recs[4], recs[5]:
        r["output_2"] = dict(r["output_1"])
    recs[4]["preference"], recs[5]["preference"] = 2, 1  # (held out: one tie a hit, one a miss)
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    train.write_text(json.dumps(recs[:4]))
    val.write_text(json.dumps(recs[4:6]))
    argv = ["--init", sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "4",
            "--eval_prompt", "short", "--data", str(train), "--val_data", str(val),
            "--captions", os.path.join(tiny_world, "image_to_caption.json"),
            "--image_folder", tiny_world, "--out", str(tmp_path / "rm")]
    code, stdout, err = run_cli("reward", argv)
    assert code == 0, err
    assert "4 training pairs, 2 held-out" in stdout, stdout
    assert "note: 1 training and 2 held-out pairs have the same chosen and rejected answer: " \
        "kept, as LLaVA-RLHF keeps them (accuracy counts a tie as a hit where output_2 was " \
        "chosen, as it does)" in stdout
    report = json.load(open(tmp_path / "rm" / "report.json"))
    assert report["n_val"] == 2 and report["val_accuracy"] == 0.5, report


def test_reward_leaves_out_held_out_pairs_too_long_before_the_first_step(sft, tiny_world,
                                                                         tmp_path):
    """Held-out pairs longer than --max_len were dropped as their batch was made: under FSDP a rank
    whose whole share was such a pair skipped its forward pass while the others gathered weights
    for theirs, and the run hung (reproduced under torchrun, two ranks, 2026-12-05; that test took
    10 s of the suite's budget). They are left out before the first step now, and counted."""
    pairs = json.load(open(os.path.join(tiny_world, "pref_pairs_val.json")))[:2]
    pairs[1]["output_1"]["value"] += " It is red." * 400
    val = tmp_path / "val.json"
    val.write_text(json.dumps(pairs))
    argv = ["--init", sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "1",
            "--eval_size", "2", "--eval_prompt", "short", "--val_data", str(val),
            "--image_folder", tiny_world, "--out", str(tmp_path / "rm")]
    code, stdout, err = run_cli("reward", argv)
    assert code == 0, err
    assert "1 held-out (1 longer left out)" in stdout, stdout
    assert json.load(open(tmp_path / "rm" / "report.json"))["n_val"] == 1


def test_reward_trains_on_pairs_that_fit_every_step(sft, tiny_world, tmp_path):
    """Pairs longer than --max_len are left out before training, counted: they were drawn into
    batches and dropped there, and a step whose pairs all were dropped logged loss 0, grad_norm 0
    and trained nothing (at --max_len 266, 5 of the tiny world's 40 pairs fit)."""
    out = tmp_path / "rm"
    argv = ["--init", sft, "--world", tiny_world, "--eval_prompt", "short", "--max_len", "266",
            "--batch_size", "1", "--max_steps", "4", "--log_every", "1", "--out", str(out)]
    code, stdout, err = run_cli("reward", argv)
    assert code == 0, err
    left_out = int(re.search(r"training pairs \((\d+) longer than --max_len left out\)",
                             stdout).group(1))
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert left_out > 0 and len(rows) == 4
    assert all(r["grad_norm"] > 0 and r["dropped"] == left_out for r in rows), rows


def test_ppo_metrics_over_nothing_are_null_and_the_file_strict_json(tiny_rm, sft, tiny_world,
                                                                      tmp_path):
    """One prompt, one new token: no variance of returns to explain, and (on a prompt without a
    checkable answer) no correctness rate. They were NaN / -inf, written as bare NaN into
    metrics.jsonl, which strict JSON readers refuse."""
    out = tmp_path / "one"
    argv = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--rollout_batch", "1",
            "--minibatch_size", "1", "--max_new_tokens", "1", "--max_steps", "2", "--out",
            str(out)]
    code, stdout, err = run_cli("ppo", argv)
    assert code == 0, err
    assert "advantages whitened over one token are 0" in stdout  # (said, not silent)

    def strict(token):
        raise ValueError(f"not JSON: {token}")
    rows = [json.loads(x, parse_constant=strict) for x in open(out / "metrics.jsonl")]
    rows = [r for r in rows if "explained_var" in r]
    assert rows and all(r["explained_var"] is None for r in rows)
    assert all(r["correct"] is None or 0 <= r["correct"] <= 1 for r in rows)


def test_reward_resume_is_bitwise(sft, tiny_world, tmp_path):
    args = ["--init", sft, "--world", tiny_world, "--batch_size", "4", "--eval_prompt", "short",
            "--eval_size", "4", "--save_every", "1"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert run_cli("reward", args + ["--max_steps", "3", "--out", straight])[0] == 0
    assert run_cli("reward", args + ["--max_steps", "2", "--out", resumed])[0] == 0
    resume = ["--max_steps", "3", "--out", resumed, "--resume", "true"]
    code, stdout, err = run_cli("reward", args + resume)
    assert code == 0 and "at step 2" in stdout, err
    a, b = load_checkpoint(straight).state_dict(), load_checkpoint(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_cli_sampled_pairs(tiny_world, sft, tmp_path):
    out = str(tmp_path / "rm_sampled")
    argv = ["--init", sft, "--world", tiny_world, "--pairs", "sampled",
            "--n_sampled", "16", "--sample_max_new_tokens", "8", "--max_steps", "1",
            "--batch_size", "2", "--out", out, "--eval_prompt", "short", "--facts", "false",
            "--eval_size", "4"]
    code, stdout, err = run_cli("reward", argv)
    assert code == 0, err  # (every prompt a tie: test_reliability's sampled-all-ties case)
    got = json.load(open(os.path.join(out, "sampled_pairs.json")))
    st = got["stats"]["train"]
    assert st["prompts"] == 16 and st["pairs"] + st["ties"] + st["empty"] == 16
    assert st["pairs"] == len(got["train"]) > 0
    for p in got["train"]:
        assert p["hallucinations"][0] < p["hallucinations"][1] and p["chosen"] != p["rejected"]


PPO_ARGS = ["--rollout_batch", "4", "--minibatch_size", "2", "--max_new_tokens", "6",
            "--log_every", "1"]


def test_ppo_refuses_captions_its_reward_model_does_not_read(tiny_world, sft, tmp_path):
    """A reward model trained with --facts false gets no captions in the rollout: a --captions
    file given beside it was parsed and never used (the run looked like Fact-RLHF)."""
    rm = str(tmp_path / "rm")
    argv = ["--init", sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "2",
            "--eval_prompt", "short", "--eval_size", "4", "--facts", "false", "--out", rm]
    code, _, err = run_cli("reward", argv)
    assert code == 0, err
    captions = os.path.join(tiny_world, "image_to_caption.json")
    ppo = ["--init", sft, "--reward", rm, "--world", tiny_world, "--max_steps", "1",
           "--captions", captions, "--out", str(tmp_path / "ppo")] + PPO_ARGS
    code, _, err = run_cli("ppo", ppo)
    assert code == 2 and f"--captions {captions}: not read with --reward {rm}" in err, err


def test_ppo_loss_divisor_columns_is_llava_rlhfs_mean_over_response_columns():
    """--loss_divisor columns: LLaVA-RLHF's losses are .mean() over every response column of its
    sequences (padding included; its log-probs there are 0, so padding adds no gradient): the
    update is ours x real tokens / (sequences x --max_new_tokens)."""
    def update(divisor):
        torch.manual_seed(0)
        m = policy_and_value()
        ro, adv = fixed_rollout(m)
        returns = torch.randn(adv.shape, generator=torch.Generator().manual_seed(1)) * ro["rmask"]
        params = (m.adapter_parameters("policy") + m.adapter_parameters("value")
                  + list(m.heads["value"].parameters()))
        before = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=1.0)  # (the step is the gradient)
        cfg = ppo.Config(ppo_epochs=1, minibatch_size=4, max_new_tokens=5, grad_clip=0.0,
                         loss_divisor=divisor, out="/nonexistent")
        stats = ppo.ppo_update(m, m, ro, adv, returns, opt, params, cfg, ONE, 0)
        return [b - p.detach() for b, p in zip(before, params)], stats, ro["rmask"].sum()
    ours, ours_stats, n_real = update("tokens")
    theirs, theirs_stats, _ = update("columns")
    scale = float(n_real) / (4 * 5)  # 13 real response tokens of 4 x 5 columns
    assert scale < 1 and any(float(g.abs().max()) > 1e-6 for g in ours)
    assert all(torch.allclose(b, a * scale, atol=1e-7) for a, b in zip(ours, theirs))
    assert theirs_stats["pg_loss"] == pytest.approx(ours_stats["pg_loss"] * scale, rel=1e-5)
    assert theirs_stats["approx_kl"] == ours_stats["approx_kl"]  # (stats stay per token)


def test_ppo_update_with_grad_checkpoint_equals_without(tiny_rm, sft, tiny_world, tmp_path):
    """--grad_checkpoint true recomputes each layer's forward during backward; the policy and
    value backward passes used to run after their adapter was switched off, so the recomputation
    ran another model (torch.utils.checkpoint: 'a different number of tensors was saved')."""
    args = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--max_steps", "1",
            "--export", "adapter"] + PPO_ARGS
    trained = {}
    for flag in ("false", "true"):
        out = str(tmp_path / flag)
        code, _, err = run_cli("ppo", args + ["--out", out, "--grad_checkpoint", flag])
        assert code == 0, err
        path = os.path.join(resolve_checkpoint(out), "trainer_state.pt")
        trained[flag] = torch.load(path, weights_only=False)["extra"]
    for k in ("policy", "value", "value_head"):
        for u, v in zip(trained["false"][k], trained["true"][k], strict=True):
            assert torch.allclose(u, v, atol=1e-6), k


def test_ppo_oracle_steps_between_log_lines_are_logged(tiny_rm, sft, tiny_world, tmp_path):
    """--oracle_every 3 with --log_every 2: the oracle ran at step 3 and its hallucination rate was
    thrown away (logged only on log steps); it gets its own line."""
    out = tmp_path / "ppo"
    args = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, *PPO_ARGS,
            "--max_steps", "4", "--log_every", "2", "--oracle_every", "3", "--out", str(out)]
    code, _, err = run_cli("ppo", args)
    assert code == 0, err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 3, 4]
    assert "score" in rows[0] and "halluc_rate" not in rows[0] and "halluc_rate" not in rows[2]
    assert set(rows[1]) == {"step", "time", "halluc_rate", "halluc_per_answer"}, rows[1]
    # the world's prompts spelled out as --data: the same counts (read as a file outside the
    # world, --oracle_every was refused, and without it the counts were dropped)
    spelled = args + ["--data", os.path.join(tiny_world, ".", "rl_prompts.json"),
                      "--out", str(tmp_path / "spelled")]
    code, _, err = run_cli("ppo", spelled)
    assert code == 0, err
    again = [json.loads(x) for x in open(tmp_path / "spelled" / "metrics.jsonl")]
    assert again[1]["halluc_rate"] == rows[1]["halluc_rate"]
    # (its world checked as the default's is: another --world_seed is refused, not counted with)
    code, _, err = run_cli("ppo", spelled + ["--world_seed", "1", "--out", str(tmp_path / "s1")])
    assert code == 2 and "holds the world of seed 0, not --world_seed 1" in err, err


def test_ppo_cli_exports_a_loadable_policy_and_resume_is_bitwise(tiny_rm, sft, tiny_world,
                                                                  tmp_path):
    rm = tiny_rm[0]
    # the adaptive KL controller on (Ziegler et al.): its kl_coef is checked and resumed below
    args = ["--init", sft, "--reward", rm, "--world", tiny_world, "--target_kl", "0.5",
            "--kl_horizon", "10"] + PPO_ARGS
    straight = str(tmp_path / "straight")
    code, stdout, err = run_cli("ppo", args + ["--max_steps", "2", "--out", straight])
    assert code == 0, err
    lines = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    # kl_coef x (1 + clip(KL / target - 1, -0.2, 0.2) x rollout_batch / horizon) after each step
    kl_coef = 0.1
    for row in lines:
        kl_coef *= 1 + min(max(row["kl"] / 0.5 - 1, -0.2), 0.2) * 4 / 10
        assert row["kl_coef"] == pytest.approx(kl_coef, rel=1e-6)
    assert lines[-1]["kl_coef"] < 0.1  # (the policy starts as the reference: KL below target)
    for k in ("score", "kl", "reward", "length", "correct", "pg_loss", "vf_loss", "approx_kl",
              "clipfrac", "vf_clipfrac", "entropy", "explained_var", "halluc_rate", "rollout_s",
              "update_s"):
        assert k in lines[-1], k
    m = load_checkpoint(straight)
    assert not m.adapters and not m.heads  # merged export: the policy alone, full weights
    resumed = str(tmp_path / "resumed")
    args += ["--export", "adapter"]
    code, _, err = run_cli("ppo", args + ["--max_steps", "1", "--out", resumed])
    assert code == 0, err
    # adapter export: base = the SFT checkpoint, only the policy adapter
    a = load_checkpoint(resumed)
    assert set(a.adapters) == {"policy"} and a.active_adapter == "policy" and not a.heads
    assert not os.path.exists(os.path.join(resolve_checkpoint(resumed), "model.safetensors"))
    resume = ["--max_steps", "2", "--out", resumed, "--resume", "true"]
    code, stdout, err = run_cli("ppo", args + resume)
    assert code == 0, err
    assert "at step 1" in stdout
    # bitwise: the resumed run's trained tensors and rollouts equal the uninterrupted run's

    def extra_state(run):
        path = os.path.join(resolve_checkpoint(run), "trainer_state.pt")
        return torch.load(path, weights_only=False)["extra"]
    x = extra_state(straight)
    y = extra_state(resumed)
    for k in ("policy", "value", "value_head"):
        assert all(torch.equal(u, v) for u, v in zip(x[k], y[k], strict=True)), k
    last = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))][-1]
    assert last["score"] == lines[-1]["score"] and last["pg_loss"] == lines[-1]["pg_loss"]
    assert last["kl_coef"] == lines[-1]["kl_coef"]
    with torch.no_grad():  # the adapter export and the merged export are the same policy
        b = load_checkpoint(resumed).eval()
        ids = torch.randint(5, 900, (1, 20))
        ids[0, 2:2 + m.config.num_image_tokens] = m.config.image_token_id
        pix = torch.randn(1, 3, 48, 48)
        assert torch.allclose(m.eval()(pix, ids), b(pix, ids), atol=1e-4)


def test_ppo_scales_rewards_before_gae_and_whitens_only_the_advantages(tiny_rm, sft, tiny_world,
                                                                      tmp_path, monkeypatch):
    """The update gets GAE over the shaped rewards x --reward_scale: whitened advantages, and the
    returns unwhitened (the value head's targets)."""
    seen, real = [], ppo.ppo_update
    monkeypatch.setattr(ppo, "ppo_update", lambda policy, critic, ro, adv, returns, *a: (
        seen.append((ro, adv, returns)), real(policy, critic, ro, adv, returns, *a))[1])
    args = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--max_steps",
            "1", "--reward_scale", "3", "--out", str(tmp_path / "run")] + PPO_ARGS
    code, _, err = run_cli("ppo", args)
    assert code == 0, err
    (ro, adv, returns), = seen
    raw, want_returns = ppo.gae(ro["rewards"] * 3.0, ro["values"], 1.0, 1.0)
    assert torch.allclose(returns, want_returns, atol=1e-6)
    assert torch.allclose(adv, ppo.whiten(raw, ro["rmask"], ONE), atol=1e-6)


def test_ppo_resume_refuses_a_reward_model_replaced_since(sft, tiny_world, tmp_path):
    """--reward is read anew at --resume: a reward run retrained in its folder (or resumed there
    for more steps) since the PPO run started scored the rest of the run with another reward
    model, exit 0. Each checkpoint records the reward model's digest: another (here: retrained)
    is refused in one line naming it; the same one goes on (a copy of the PPO run resumed before
    the reward run changed)."""
    rm, project = tmp_path / "rm", tmp_path / "project"
    rm_args = ["--init", sft, "--world", tiny_world, "--max_steps", "2", "--batch_size", "4",
               "--eval_prompt", "short", "--eval_size", "8", "--out", str(rm)]
    assert run_cli("reward", rm_args)[0] == 0
    args = ["--init", sft, "--reward", str(rm), "--world", tiny_world, *PPO_ARGS,
            "--out", str(tmp_path / "ppo")]
    code, _, err = run_cli("ppo", args + ["--max_steps", "1"])
    assert code == 0, err
    shutil.copytree(tmp_path / "ppo", project)  # (a copy to resume before anything changed)
    code, out, err = run_cli("ppo", args + ["--max_steps", "2", "--out", str(project),
                                            "--resume", "true"])
    assert code == 0 and "resumed from" in out, err
    code, _, err = run_cli("reward", rm_args + ["--seed", "7", "--overwrite", "true"])
    assert code == 0, err
    code, out, err = run_cli("ppo", args + ["--max_steps", "2", "--resume", "true"])
    assert code == 2 and "resumed from" not in out, err
    assert f"--reward {rm}: {rm}/checkpoint-000002 is not the reward model this run was " \
        "trained against" in err and "Traceback" not in err, err


def test_a_ppo_checkpoint_records_the_template_its_policy_was_prompted_with(sft, tiny_world,
                                                                             tmp_path, capsys):
    """PPO prompts the policy with its reward model's --template and has no flag of its own: its
    checkpoints recorded none, so a PPO run on a llava_v1 reward model exported with vicuna_v1's
    chat template (recording none), and a stage or eval prompting it with vicuna_v1 said nothing.
    Its checkpoints (an adapter one and the merged end) record the reward model's template now,
    which --resume does not compare (it goes on)."""
    rm = make_rm(sft, tmp_path / "rm", template="llava_v1")
    out = tmp_path / "ppo"
    args = ["--init", sft, "--reward", rm, "--world", tiny_world, *PPO_ARGS, "--max_steps", "2",
            "--save_every", "1", "--out", str(out)]
    code, _, err = run_cli("ppo", args)
    assert code == 0, err
    adapter_step, merged_end = str(out / "checkpoint-000001"), str(out / "checkpoint-000002")
    assert rundir.recorded_base(adapter_step) is not None  # (the policy's LoRA on --init)
    for ck in (adapter_step, merged_end):
        assert recorded_template(ck) == "llava_v1", ck
    export_llava_hf(load_checkpoint(merged_end), tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["factalign_template"] == "llava_v1"
    assert data.SYSTEM["llava_v1"] in (tmp_path / "hf" / "chat_template.jinja").read_text()
    capsys.readouterr()
    rundir.note_template("--init", str(out), "vicuna_v1")
    assert "was trained with --template llava_v1" in capsys.readouterr().out
    shutil.rmtree(merged_end)
    code, stdout, err = run_cli("ppo", args + ["--resume", "true"])
    assert code == 0 and "resumed from" in stdout, err
    assert recorded_template(merged_end) == "llava_v1"


def test_ppo_resume_refuses_an_init_rewritten_at_its_path(tiny_rm, sft, tiny_world, tmp_path):
    """ppo.py --resume rebuilds the policy from --init and restores its adapters from the
    checkpoint: an --init rewritten in its folder since the run started (a reward model on
    another base, which would have noticed, beside it) went on as the policy's base, exit 0.
    Refused now in one line, as the checkpoint's base fingerprint differs."""
    init = tmp_path / "init"
    shutil.copytree(sft, init)
    args = ["--init", str(init), "--reward", tiny_rm[0], "--world", tiny_world, *PPO_ARGS,
            "--export", "adapter", "--out", str(tmp_path / "ppo")]
    code, _, err = run_cli("ppo", args + ["--max_steps", "1"])
    assert code == 0, err
    other = load_checkpoint(str(init))
    with torch.no_grad():
        other.language_model.embed_tokens.weight.mul_(1.5)
    save_checkpoint_files(other, str(init))
    code, out, err = run_cli("ppo", args + ["--max_steps", "2", "--resume", "true"])
    assert code == 2 and "resumed from" not in out, err
    assert f"--init {init}: {init} holds other weights than this run started from" in err, err


def test_ppo_with_lora_dropout_resumes_bitwise(tiny_rm, sft, tiny_world, tmp_path):
    """ppo.py restored the optimizer and its adapters but not the random streams that building the
    roles had drawn from, so after --resume the LoRA dropout masks differed from the run that was
    not stopped (the other stages' rundir.restore sets them)."""
    args = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, *PPO_ARGS,
            "--lora_dropout", "0.1", "--export", "adapter"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    for out, steps, more in ((straight, "2", []), (resumed, "1", []),
                             (resumed, "2", ["--resume", "true"])):
        code, _, err = run_cli("ppo", args + ["--max_steps", steps, "--out", out, *more])
        assert code == 0, err

    def extra_state(run):
        path = os.path.join(resolve_checkpoint(run), "trainer_state.pt")
        return torch.load(path, weights_only=False)["extra"]
    x, y = extra_state(straight), extra_state(resumed)
    for k in ("policy", "value", "value_head"):
        assert all(torch.equal(u, v) for u, v in zip(x[k], y[k], strict=True)), k


def test_ppo_under_torchrun_two_processes(tiny_rm, sft, tiny_world, tmp_path):
    """Two processes run; resumed by one, the run says that its sampling streams start again."""
    import shutil
    out = str(tmp_path / "ddp")
    argv = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--max_steps", "2",
            "--save_every", "1", *PPO_ARGS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", os.path.join(HERE, "ppo.py"), *argv, "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    assert load_checkpoint(out) is not None
    # the merged export (the last checkpoint) says two processes wrote it, with both streams (it
    # said 1, without rank 1's: resumed on two, rank 1's sampling stream started again)
    state = torch.load(os.path.join(out, "checkpoint-000002", "trainer_state.pt"),
                       weights_only=False)
    assert state["world"] == 2 and len(state["rng_ranks"]) == 2
    alone = tmp_path / "alone"
    shutil.copytree(out, alone, ignore=shutil.ignore_patterns("checkpoint-000002", ".lock"))
    code, stdout, err = run_cli("ppo", argv + ["--out", str(alone), "--resume", "true"])
    assert code == 0 and "note: --resume on 1 process(es), the checkpoint was written by 2: " \
        "the same global batches, summed in another order, and the sampling streams (from " \
        "--seed) start again" in stdout, err
    assert stdout.count("note: --resume on") == 1, stdout  # (the streams' note came twice)


def one_line_error(code, err):
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:")


def test_bad_inputs_exit_2_with_one_line(sft, tiny_world, tmp_path, monkeypatch):
    bad_rm = make_rm(sft, tmp_path / "rm_other_vocab", shared=False, vocab=1024)
    argv = ["--init", sft, "--reward", bad_rm, "--world", tiny_world, "--out", str(tmp_path / "o1")]
    code, _, err = run_cli("ppo", argv)
    assert one_line_error(code, err) and "rm_other_vocab" in err and resolve_checkpoint(sft) in err
    rm = make_rm(sft, tmp_path / "rm")
    recs = json.load(open(os.path.join(tiny_world, "rl_prompts.json")))[:3]
    no_caps = [{k: v for k, v in r.items() if k != "captions"} for r in recs]
    bad_type = [dict(r, caption_type=9) for r in recs]
    for name, content, want in (("nocaps.json", no_caps, "captions"),
                                ("badtype.json", bad_type, "caption_type")):
        path = tmp_path / name
        json.dump(content, open(path, "w"))
        argv = ["--init", sft, "--reward", rm, "--data", str(path), "--image_folder", tiny_world,
                "--out", str(tmp_path / "o2")]
        code, _, err = run_cli("ppo", argv)
        assert one_line_error(code, err) and want in err and name in err, err
    # a plain-RLHF reward model (trained with --facts false) needs no captions: PPO follows the
    # RM's setting
    plain = make_rm(sft, tmp_path / "rm_plain", facts=False)
    argv = ["--init", sft, "--reward", plain, "--data", str(tmp_path / "nocaps.json"),
            "--image_folder", tiny_world, "--out", str(tmp_path / "o4"), "--max_steps", "1",
            "--rollout_batch", "2", "--minibatch_size", "2", "--max_new_tokens", "4"]
    code, stdout, err = run_cli("ppo", argv)
    assert code == 0 and "facts False" in stdout, err
    # LLaVA-RLHF's details all on (the real-data recipe's flags) run end to end with a
    # fact-augmented RM that was trained on its spaced reward prompt
    spaced = make_rm(sft, tmp_path / "rm_spaced", prompt_space=True)
    argv = ["--init", sft, "--reward", spaced, "--world", tiny_world, "--out", str(tmp_path / "o5"),
            "--max_steps", "1", "--rollout_batch", "2", "--minibatch_size", "2",
            "--max_new_tokens", "4", "--stop_at_question", "true", "--rm_input", "tokens",
            "--correct_rule", "prefix", "--reward_scale", "10", "--loss_divisor", "columns"]
    scored = []  # every sequence PPO gives the RM: the spaced evaluation turn, as it trained

    def spy(tokenizer, *args):
        item = data.reward_item_from_ids(tokenizer, *args)
        scored.append((args[-1], tokenizer.decode(item["input_ids"].tolist())))
        return item
    monkeypatch.setattr(ppo, "reward_item_from_ids", spy)
    code, stdout, err = run_cli("ppo", argv)
    assert code == 0, err
    assert len(scored) == 2 and all(space for space, _ in scored), scored
    assert all(" USER: Please evaluate" in text for _, text in scored), scored
    cfg_path = os.path.join(spaced, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["run_config"]["prompt_space"] = 1  # (a hand edit: 1 is not true)
    json.dump(cfg, open(cfg_path, "w"))
    code, _, err = run_cli("ppo", [str(tmp_path / "o6") if a.endswith("o5") else a for a in argv])
    assert one_line_error(code, err) and "field 'run_config.prompt_space'" in err, err
    argv = ["--init", str(tmp_path / "missing"), "--world", tiny_world, "--out",
            str(tmp_path / "o3")]
    code, _, err = run_cli("reward", argv)
    assert one_line_error(code, err) and "missing" in err


def test_reward_model_and_ppo_score_one_prompt_spacing(sft, tiny_world, tmp_path):
    """reward.py --prompt_space true trains on '...</s> USER: Please evaluate' (LLaVA-RLHF's
    reward prompt joined with a space), records it, and PPO scores its rollouts the same way (it
    trained on '</s>USER:' whatever PPO was told, before)."""
    out = str(tmp_path / "rm")
    argv = ["--init", sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "2",
            "--eval_prompt", "short", "--eval_size", "2", "--prompt_space", "true", "--out", out]
    code, _, err = run_cli("reward", argv)
    assert code == 0, err
    assert ppo.reward_settings(resolve_checkpoint(out))[3] is True
    m = load_checkpoint(sft)
    tok = load_tokenizer(resolve_checkpoint(sft))
    pair = {"prompt": [{"from": "human", "value": "<image>\nWhat is there?"}],
            "chosen": "A red circle.", "rejected": "A blue cross.", "captions": ["A red circle."],
            "image": None}
    cfg = reward.Config(eval_prompt="short", prompt_space=True)
    batch, _ = reward.pair_batch([pair], [0], cfg, tok, m, None, "k")
    want = data.reward_item(tok, m.config, pair["prompt"], "A red circle.", ["A red circle."],
                            random.Random("k-0"), space=True, wording="short")["input_ids"]
    assert batch["input_ids"][0, :len(want)].tolist() == want.tolist()
    assert "</s> USER: Please evaluate" in tok.decode(want.tolist())


def test_reward_caption_shuffle_per_pair_or_per_answer(sft):
    """--caption_shuffle pair: chosen and rejected read their captions in one order; answer: each
    answer its own order, as LLaVA-RLHF's reward-model data shuffles them (a permutation each,
    the same for the same key: a resumed run draws them again)."""
    m = load_checkpoint(sft)
    tok = load_tokenizer(resolve_checkpoint(sft))
    caps = ["A red circle.", "A blue square.", "A green cross.", "A small star."]
    pair = {"prompt": [{"from": "human", "value": "What is there?"}], "chosen": "A red circle.",
            "rejected": "A blue cross.", "captions": caps, "image": None}
    n = 12

    def orders(shuffle):
        cfg = reward.Config(eval_prompt="short", caption_shuffle=shuffle)
        b, _ = reward.pair_batch([pair] * n, range(n), cfg, tok, m, None, "k")
        text = [tok.decode(row[row != tok.pad_token_id].tolist()) for row in b["input_ids"]]
        order = [sorted(caps, key=lambda c: t.index(f"- {c}")) for t in text]
        return order[:n], order[n:]

    chosen, rejected = orders("pair")
    assert chosen == rejected and len({tuple(o) for o in chosen}) > 1
    chosen, rejected = orders("answer")
    assert chosen != rejected and sorted(caps) == sorted(rejected[0])
    assert sum(c != r for c, r in zip(chosen, rejected)) >= n // 2
    assert orders("answer") == (chosen, rejected)


def test_reward_subsets_are_scored_as_in_the_whole_held_out_set(sft, tiny_world, tmp_path,
                                                                   monkeypatch):
    """The partner pairs' accuracy is over a subset of the held-out pairs, but each pair's caption
    order was drawn from its place in the subset, not in the held-out set: a pair could be right
    in one and wrong in the other (0.250 overall, 0.750 on 4 of the 8). Every held-out pair is now
    read with one caption order wherever it is scored."""
    seen = {}
    real = reward.pair_batch

    def spy(pairs, idx, cfg, tok, model, images, rng_key, keys=None):
        given = {} if keys is None else {"keys": keys}
        b, dropped = real(pairs, idx, cfg, tok, model, images, rng_key, **given)
        if rng_key.startswith("val-") and b is not None:
            for row, i in zip(b["input_ids"][:len(idx)], idx):
                pair = pairs[i]
                key = i if keys is None else keys[i]
                seen.setdefault((key, pair["rejected"], str(pair["captions"])), []).append(
                    tuple(row[row != tok.pad_token_id].tolist()))
        return b, dropped
    monkeypatch.setattr(reward, "pair_batch", spy)
    argv = ["--init", sft, "--world", tiny_world, "--max_steps", "1", "--batch_size", "2",
            "--caption_shuffle", "answer", "--eval_every", "0", "--out", str(tmp_path / "rm")]
    code, _, err = run_cli("reward", argv)
    assert code == 0, err
    report = json.load(open(tmp_path / "rm" / "report.json"))
    assert report.get("n_val_partner"), report  # (the tiny world has partner pairs)
    twice = [rows for rows in seen.values() if len(rows) > 1]
    assert len(twice) == report["n_val_partner"]  # (in the whole, then among the partner pairs)
    assert all(len(set(rows)) == 1 for rows in twice)  # one caption order wherever scored


def test_reward_partner_pairs(tiny_world):
    import reward
    import shapes
    w = shapes.load_world(tiny_world)
    names = lambda i: {o["name"] for o in i["objects"]}
    alone = next(i for i in w["images"] if "triangle" in names(i) and "circle" not in names(i))
    plain = next(i for i in w["images"] if not {"triangle", "cross", "circle"} & names(i))
    pair = lambda img, rejected: {"image": os.path.join(tiny_world, img["file_name"]),
                                  "rejected": rejected}
    val = [pair(alone, "Yes, there is a circle."), pair(alone, "There is no circle."),
           pair(plain, "Yes, there is a circle."),
           pair(alone, "The triangle is blue and purple and huge.")]
    # names the absent partner of a present trigger
    assert reward.partner_pairs(val, tiny_world) == [0]  # (its place in val)
    # a text-only pair, or an image from outside the world, has no objects to look up: left out
    # (a traceback, or a line blaming annotations.json, after the reward model had trained)
    outside = dict(val[0], image=os.path.join(os.path.dirname(tiny_world), "elsewhere.png"))
    assert reward.partner_pairs([dict(val[0], image=None), outside] + val, tiny_world) == [2]


def test_reward_partner_pairs_without_pairs_in_world_json(tiny_world, tmp_path):
    # ensure_world reads a world.json lacking a key as the default; so must partner_pairs (a
    # KeyError traceback after the reward model had trained and its checkpoint was written)
    import reward
    import shapes
    world = tmp_path / "w"
    shutil.copytree(tiny_world, world)
    meta = json.load(open(world / "world.json"))
    del meta["params"]["pairs"]
    json.dump(meta, open(world / "world.json", "w"))
    img = next(i for i in shapes.load_world(str(world))["images"]
               if {"triangle"} == {o["name"] for o in i["objects"]} & {"triangle", "circle"})
    val = [{"image": os.path.join(str(world), img["file_name"]),
            "rejected": "Yes, there is a circle."}]
    assert reward.partner_pairs(val, str(world)) == [0]


def test_reward_other_image_facts():
    import reward
    val = [{"image": img, "captions": [f"caption of {img}"], "chosen": str(k)}
           for k, img in enumerate(["a", "a", "b", "a", "c"])]
    places, other = zip(*reward.other_image_facts(val))
    assert places == (0, 1, 2, 3, 4) and [p["chosen"] for p in other] == ["0", "1", "2", "3", "4"]
    # every pair keeps its own image and answers, and reads another image's captions
    assert all(p["image"] != p["captions"][0][len("caption of "):] for p in other)
    assert [p["captions"][0][-1] for p in other] == ["b", "b", "a", "c", "a"]
    # one image only: no other captions to take
    assert reward.other_image_facts(val[:2]) == []


def test_reward_blank_images(tiny_world, sft):
    model = load_checkpoint(sft)
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    pairs = json.load(open(os.path.join(tiny_world, "pref_pairs_val.json")))[:2]
    pairs = [dict(p, image=os.path.join(tiny_world, p["image"]),
                  prompt=p["conversations"][:1], chosen=p["output_1"]["value"],
                  rejected=p["output_2"]["value"]) for p in pairs]
    images = data.ImageCache(model.config.image_size)
    pix = {}
    for blank in (False, True):
        cfg = reward.Config(facts=False, eval_prompt="short", blank_images=blank)
        b, _ = reward.pair_batch(pairs, [0, 1], cfg, tok, model, images, "k")
        pix[blank] = b["pixel_values"]
    black = data.normalize(torch.zeros_like(images.unit(pairs[0]["image"])))
    assert all(torch.equal(x, black) for x in pix[True])
    assert not torch.equal(pix[False][0], black) and not torch.equal(pix[False][0], pix[False][1])


def test_resume_keeps_the_base_the_adapters_were_trained_on(sft, tiny_world, tmp_path):
    """--init names an SFT run folder; resumed after that run grew a newer checkpoint-N, reward.py
    pointed its new checkpoints at the newer one and ppo.py built its roles on it (the reward and
    value adapters then sat on weights they were not trained on)."""
    run = tmp_path / "sft_run"
    shutil.copytree(sft, run / "checkpoint-000001")
    rm, policy = str(tmp_path / "rm"), str(tmp_path / "ppo")
    rm_args = ["--init", str(run), "--world", tiny_world, "--batch_size", "4", "--eval_prompt",
               "short", "--eval_size", "4", "--save_every", "1", "--out", rm]
    assert run_cli("reward", rm_args + ["--max_steps", "1"])[0] == 0
    ppo_args = ["--init", str(run), "--reward", rm, "--world", tiny_world, "--save_every", "1",
                "--export", "adapter", "--out", policy, *PPO_ARGS]
    code, stdout, err = run_cli("ppo", ppo_args + ["--max_steps", "1"])
    assert code == 0 and "one shared base" in stdout, err
    newer = load_checkpoint(sft)  # the SFT run trained on: other weights
    with torch.no_grad():
        newer.language_model.embed_tokens.weight.mul_(1.5)
    save_checkpoint_files(newer, run / "checkpoint-000002")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(sft, f), run / "checkpoint-000002")

    def base_of(out, step):
        path = os.path.join(out, f"checkpoint-{step:06d}")
        recorded = json.load(open(os.path.join(path, "config.json")))["base"]
        return os.path.basename(os.path.normpath(os.path.join(path, recorded)))
    # (ppo first: a reward run resumed since is another reward model, which ppo refuses)
    code, stdout, err = run_cli("ppo", ppo_args + ["--max_steps", "2", "--resume", "true"])
    assert code == 0 and "one shared base" in stdout, err
    assert base_of(policy, 2) == "checkpoint-000001"
    code, stdout, err = run_cli("reward", rm_args + ["--max_steps", "2", "--resume", "true"])
    assert code == 0 and "resuming on" in stdout, err
    assert base_of(rm, 1) == base_of(rm, 2) == "checkpoint-000001"


def test_a_resume_refused_for_a_moved_adapter_run_says_no_more(sft, tiny_world, tmp_path):
    """A reward run's --out moved a level away from its --init: its adapters' relative base is
    gone, so the load of its checkpoint refuses it; before that refusal a note said the run was
    resuming on --init, which it did not."""
    out = tmp_path / "rm"
    args = ["--init", sft, "--world", tiny_world, "--batch_size", "4", "--eval_prompt", "short",
            "--eval_size", "4", "--save_every", "1"]
    assert run_cli("reward", args + ["--max_steps", "1", "--out", str(out)])[0] == 0
    os.makedirs(tmp_path / "x" / "y")
    moved = tmp_path / "x" / "y" / "rm"
    shutil.move(out, moved)
    code, said, err = run_cli("reward", args + ["--max_steps", "2", "--out", str(moved),
                                                "--resume", "true"])
    assert code == 2 and "field 'base': base checkpoint" in err and "not found" in err, err
    assert "resuming on --init" not in said, said


def test_ppo_says_where_its_batches_repeat_prompts(tiny_rm, sft, tiny_world, tmp_path):
    """Fewer prompts left than --rollout_batch: every batch held some prompts twice (batch
    indices wrap around) without a word."""
    data = tmp_path / "two.json"
    data.write_text(json.dumps(json.load(open(os.path.join(tiny_world, "rl_prompts.json")))[:2]))
    args = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--max_steps", "1",
            "--data", str(data), "--image_folder", tiny_world, "--out", str(tmp_path / "ppo")
            ] + PPO_ARGS
    code, stdout, err = run_cli("ppo", args)
    assert code == 0, err
    assert "note: 2 prompts for --rollout_batch 4: every step's batch holds some prompts more " \
           "than once" in stdout, stdout


def test_ppo_weights_gone_bad_under_skip_nonfinite_stop_in_one_line(tiny_rm, sft, tiny_world,
                                                                     tmp_path):
    """--lr 1e20 --skip_nonfinite true: step 1's first update is finite and applied, the weights
    huge; the next rollout's sampling was torch.multinomial's traceback (exit 1)."""
    args = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--max_steps", "3",
            "--lr", "1e20", "--skip_nonfinite", "true", "--out", str(tmp_path / "ppo")] + PPO_ARGS
    code, _, err = run_cli("ppo", args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the policy's next-token probabilities are not finite" in err and "--lr" in err, err


@pytest.mark.parametrize("steps, poisoned, skipped", [(2, 2, [1, 0]), (1, 1, [1])])
def test_ppo_step_with_one_skipped_update_logs_the_updates_taken(tiny_rm, sft, tiny_world,
                                                                 tmp_path, monkeypatch, steps,
                                                                 poisoned, skipped):
    """--skip_nonfinite: a step whose second update (of four) had a non-finite gradient logged its
    losses and grad_norm as null (the skipped update's NaN in the mean): the mean over the updates
    taken now, and how many were skipped. A run of one step whose first update was skipped stopped
    there ('every update of this run non-finite'), its other updates never run."""
    import common
    real_step, calls = common.optimizer_step, [0]

    def poison(opt, params, *args, **kwargs):
        calls[0] += 1
        if calls[0] == poisoned:  # (that update's gradient turned NaN)
            next(p for p in params if p.grad is not None).grad.fill_(float("nan"))
        return real_step(opt, params, *args, **kwargs)
    monkeypatch.setattr(common, "optimizer_step", poison)
    args = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--max_steps",
            str(steps), "--skip_nonfinite", "true", "--out", str(tmp_path / "ppo")] + PPO_ARGS
    code, stdout, err = run_cli("ppo", args)
    assert code == 0, err
    assert "step 1: non-finite loss or gradient; update skipped" in stdout, stdout
    rows = [json.loads(x) for x in open(tmp_path / "ppo" / "metrics.jsonl") if "pg_loss" in x]
    assert [r["skipped_updates"] for r in rows] == skipped, rows
    keys = ("pg_loss", "vf_loss", "grad_norm", "clipfrac", "approx_kl", "vf_clipfrac")
    assert all(isinstance(r[k], float) and math.isfinite(r[k]) for r in rows for k in keys), rows


def test_an_init_whose_vision_lora_was_merged_as_loaded_is_saved_whole(sft, tiny_world, tmp_path):
    """--init a PEFT adapter whose LoRA sits on CLIP alone (merged into the base as it loads):
    reward.py and dpo.py trained, then failed at the first save ('no config.json': the adapter
    folder named as the frozen base). Their checkpoints are whole now; a resumed reward run ends
    bitwise where one straight run does."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration
    from interop import export_llava_hf
    export_llava_hf(load_checkpoint(sft), tmp_path / "hf", tokenizer=load_tokenizer(sft))
    pm = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf"),
                        LoraConfig(r=4, lora_alpha=8,
                                   target_modules=r".*vision_tower.*\.(q_proj|v_proj)"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "clip_lora")
    init = ["--init", str(tmp_path / "clip_lora"), "--world", tiny_world]
    rm = init + ["--batch_size", "4", "--eval_prompt", "short", "--eval_size", "4",
                 "--save_every", "1"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert run_cli("reward", rm + ["--max_steps", "2", "--out", straight])[0] == 0
    assert run_cli("reward", rm + ["--max_steps", "1", "--out", resumed])[0] == 0
    code, _, err = run_cli("reward", rm + ["--max_steps", "2", "--out", resumed, "--resume",
                                           "true"])
    assert code == 0, err
    for run in (straight, resumed):
        assert json.load(open(os.path.join(resolve_checkpoint(run), "config.json")))["base"] \
            is None
    a, b = load_checkpoint(straight).state_dict(), load_checkpoint(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    vision = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    merged = load_checkpoint(tmp_path / "clip_lora").state_dict()[vision]
    unmerged = load_checkpoint(sft).state_dict()[vision]
    assert torch.equal(a[vision], merged) and not torch.equal(merged, unmerged)
    dpo = init + ["--max_steps", "1", "--batch_size", "4", "--eval_n", "4", "--out",
                  str(tmp_path / "dpo")]
    code, _, err = run_cli("dpo", dpo)
    assert code == 0, err
    assert torch.equal(load_checkpoint(tmp_path / "dpo").state_dict()[vision], merged)
    # a full fine-tune's reference cache and PPO's policy from such an --init ('no config.json':
    # the adapter folder was read as a checkpoint's base)
    code, _, err = run_cli("dpo", dpo[:-1] + [str(tmp_path / "dpo_full"), "--lora_r", "0"])
    assert code == 0, err
    code, _, err = run_cli("ppo", init + ["--reward", str(tmp_path / "straight"), "--max_steps",
                                          "1", "--out", str(tmp_path / "ppo")] + PPO_ARGS)
    assert code == 0, err
    assert torch.equal(load_checkpoint(tmp_path / "ppo").state_dict()[vision], merged)


def test_ppo_policy_lora_with_vision_lora_keeps_it_and_resumes_bitwise(sft, tiny_world, tmp_path):
    """--policy_lora a PEFT adapter that also holds LoRA on CLIP (PEFT's bare ['q_proj',
    'v_proj'] hits CLIP too), beside a reward model of another base: the CLIP LoRA is merged into
    the policy's base as it loads, and the adapter checkpoints named the SFT as their base, so the
    saved policy lost it without a word. They are whole now, and a resumed run ends bitwise where
    a straight one does."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration
    from checkpoint import load_adapters
    from interop import export_llava_hf
    export_llava_hf(load_checkpoint(sft), tmp_path / "hf", tokenizer=load_tokenizer(sft))
    pm = get_peft_model(LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf"),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "rl_init")
    shutil.copytree(sft, tmp_path / "sft_copy")  # (another folder: a second, frozen critic)
    rm = ["--init", str(tmp_path / "sft_copy"), "--world", tiny_world, "--max_steps", "1",
          "--batch_size", "4", "--eval_prompt", "short", "--eval_size", "4", "--out",
          str(tmp_path / "rm")]
    assert run_cli("reward", rm)[0] == 0
    args = ["--init", sft, "--reward", str(tmp_path / "rm"), "--world", tiny_world,
            "--policy_lora", str(tmp_path / "rl_init"), "--export", "adapter", "--save_every",
            "1"] + PPO_ARGS
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    code, _, err = run_cli("ppo", args + ["--max_steps", "1", "--lr", "1e-12", "--out",
                                          str(tmp_path / "still")])
    assert code == 0, err
    want = load_checkpoint(sft)
    load_adapters(want, str(tmp_path / "rl_init"), "policy")
    want.set_adapter("policy")
    got = load_checkpoint(str(tmp_path / "still"))
    assert got.active_adapter == "policy"
    g = torch.Generator().manual_seed(0)
    c = want.config
    pixels = torch.randn(1, 3, c.image_size, c.image_size, generator=g)
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, c.num_image_tokens), c.image_token_id),
                     torch.arange(20, 25)[None]], 1)
    with torch.no_grad():
        torch.testing.assert_close(got(pixels, ids), want(pixels, ids), atol=1e-4, rtol=0)
    assert run_cli("ppo", args + ["--max_steps", "2", "--out", straight])[0] == 0
    assert run_cli("ppo", args + ["--max_steps", "1", "--out", resumed])[0] == 0
    code, _, err = run_cli("ppo", args + ["--max_steps", "2", "--out", resumed, "--resume",
                                          "true"])
    assert code == 0, err
    a, b = load_checkpoint(straight).state_dict(), load_checkpoint(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the adapter replaced at its path since: the frozen reference, made from it again at
    # --resume, was the new one, without a word
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "rl_init")
    code, out, err = run_cli("ppo", args + ["--max_steps", "3", "--out", resumed, "--resume",
                                            "true"])
    assert code == 2 and "resumed from" not in out, err
    assert f"--policy_lora {tmp_path / 'rl_init'}: not the adapter this run started from" in err


def test_held_out_pairs_are_the_ones_llava_rlhf_holds_out():
    """--val_data '': the held-out pairs were the first of the permutation, where LLaVA-RLHF's
    random_split holds out the last: with its seed (42) none of its 500 were ours."""
    from torch.utils.data import random_split
    for n, n_val, seed in ((9422, 500, 42), (37, 3, 0)):
        theirs = random_split(range(n), [n - n_val, n_val],
                              generator=torch.Generator().manual_seed(seed))
        assert reward.split_off(n, n_val, seed) == (list(theirs[0].indices),
                                                    list(theirs[1].indices))


def test_ppo_compile_decode_samples_the_eager_rollouts(tiny_rm, sft, tiny_world, tmp_path,
                                                       monkeypatch):
    """ppo.py --compile_decode true samples its rollouts through the compiled step: the same
    responses, so the same metrics as eager decoding, step after step while the policy's adapter
    trains (the compiled step reads the updated weights); a counting backend stands in for
    inductor."""
    counter = count_decode_compiles(monkeypatch)
    argv = ["--init", sft, "--reward", tiny_rm[0], "--world", tiny_world, "--rollout_batch", "4",
            "--minibatch_size", "2", "--max_new_tokens", "6", "--max_steps", "3"]
    rows = []
    for name, extra in (("eager", []), ("compiled", ["--compile_decode", "true"])):
        code, _, err = run_cli("ppo", argv + ["--out", str(tmp_path / name)] + extra)
        assert code == 0, err
        rows.append([json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")])
    assert counter.frame_count >= 1
    keys = ("score", "reward", "kl", "entropy", "pg_loss", "vf_loss", "grad_norm")
    assert assert_same_metrics(*rows, keys, min_rows=3) == 21
