r"""Fact-RLHF PPO (LLaVA-RLHF, arXiv 2309.14525, Sec. 2.3; PPO: Schulman et al. 2017; RLHF recipe:
Ziegler et al. 2019, InstructGPT). One frozen base serves four roles through named LoRA adapters:

    policy     base + 'policy' LoRA (new, B = 0: starts as the SFT model)          trained
    reference  base with no adapter                                                 frozen
    (--policy_lora, LLaVA-RLHF's recipe: 'policy' starts as that LoRA and 'reference' is a frozen
     copy of it. A reward model on another base is a second model; it may read images at another
     size, each prompt then expanded to its own image tokens: critic_ids)
    reward     base + 'reward' LoRA + 'reward' head (loaded from --reward)          frozen
    value      base + 'value' LoRA (a copy of 'reward') + 'value' head (zeros)      trained

    python ppo.py  # Shapes RL prompts, ckpt/sft policy, ckpt/rm reward
    torchrun --nproc_per_node=2 ppo.py --reward ckpt/rm
    python ppo.py --reward ckpt/rm_plain --out ckpt/ppo_plain  # plain RLHF: the RM's --facts false
    torchrun --nproc_per_node=8 ppo.py --init sft_model --reward rm \
        --data llava_ppo50k-aokvqa12k-vqa10k.json --captions image_to_caption.json \
        --image_folder coco/train2017 --rollout_batch 512 --minibatch_size 256 --max_steps 562 \
        --max_prompt_len 383 --max_new_tokens 896 --lora_r 64 --lr 3e-5 --value_lr 0 \
        --length_penalty -10 --device cuda --dtype bf16 --warmup_from_zero true \
        --stop_at_question true --rm_input tokens --correct_rule prefix --reward_scale 10 \
        --loss_divisor columns --micro_batch 16 --grad_checkpoint true

Per rollout, for response token k of a sequence whose last real token is T (length L = T + 1):
    kl_k     = logp_k - logp_ref_k, clamped at 0 (k1, LLaVA-RLHF)
               or (r - 1) - log r, r = p_ref / p (k3)
    s        = RM score + correctness * bonus(caption_type)
               + length_penalty * length_bonus * L / max_new_tokens + no_eos_penalty * [no EOS]
    r_k      = -kl_coef * kl_k + [k == T] * s
    delta_k  = r_k + gamma V_{k+1} - V_k  (V after T is 0)
    A_k      = sum_l (gamma lam)^l delta_{k+l},   R_k = A_k + V_k
    A       <- (A - mean) / (std + 1e-8) over all response tokens of the global batch
    L_pi     = mean_k max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)),
               ratio = exp(logp_new - logp_old)
    L_V      = mean_k 0.5 max((V_new - R)^2, (V_old + clip(V_new - V_old, -vf_clip, vf_clip) - R)^2)
    loss     = L_pi + vf_coef * L_V        (means over the response tokens of the global minibatch)

Where LLaVA-RLHF differs (flags give its behaviour; the real-data command in README sets them):
  --stop_at_question true   each response is cut at a '?' token, which drops its EOS (-8 penalty);
  --rm_input tokens         the RM reads the sampled ids, '</s>' only when sampled (ours
                            re-tokenizes the text);
  (reward.py --prompt_space true: '</s> USER: Please evaluate...' as its reward prompt file is
                            joined; PPO reads the RM's setting from its checkpoint)
  --correct_rule prefix     the Yes/No bonus tests startswith('No'), so 'None ...' earns it;
  --reward_scale 10         its PPO trainer scales rewards by 10 before GAE when its scripts turn
                            reward whitening off (hard-coded in ppo_trainer.py);
  --loss_divisor columns    its losses are means over every response column (sequences x 896),
                            ours sums / real response tokens: its gradients are smaller by
                            their ratio, which moves where --grad_clip 1.0 bites.
Not offered: LLaVA-RLHF whitens the advantages over every response column, the padding after EOS
included, and trains the value head there too (its masks cover the whole response length). Ours
whitens and trains on real response tokens only (EOS included): padding is no decision the policy
made, and statistics over it depend on how long the batch's longest response happens to be. So
are the logged clipfrac, approx_kl and vf_clipfrac (means over real tokens; LLaVA-RLHF's are over
every column, ours x tokens / columns on a padded batch).
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import json
import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

import common
import distributed
import rundir
import oracle
import shapes
from data import (DataError, ImageCache, check_images, collate, normalize, read_rl_prompts,
                  record_label, require_records, reward_item, reward_item_from_ids,
                  tokenize_conversations)
from checkpoint import (base_weights_dir, is_peft_dir, load_adapters, recorded_template,
                        refuse_scalar_model, resolve_checkpoint)
from interop import import_llava_rlhf_command, llava_rlhf_reward_of
from model import entropy_of, tempered_log_softmax


@dataclass
class Config:
    """Fact-RLHF PPO: policy and value LoRA adapters on the SFT model, rewarded by a reward.py
    checkpoint."""
    out: str = "ckpt/ppo"  # run directory: checkpoint-N/ (each the policy alone) and metrics.jsonl
    init: str = "ckpt/sft"  # the SFT checkpoint: policy start, reference, frozen base
    vision_tower: str = ""  # CLIP folder if --init has no CLIP weights (default: the one it names)
    # a PEFT LoRA on --init (LLaVA-RLHF's RL-INIT lora_default): the policy starts as it and trains
    # it further (--lora_* unused), the reference is it, frozen; empty: a new LoRA, reference --init
    policy_lora: str = ""
    reward: str = "ckpt/rm"  # reward.py checkpoint ('reward' adapter + head; its --facts is used)
    data: str = "{world}/rl_prompts.json"  # LLaVA-RLHF RL prompts (the world's: captions inline)
    captions: str = ""  # LLaVA-RLHF image_to_caption.json (facts --data lacks)
    image_folder: str = ""  # folder image paths are relative to (default: the data file's folder)
    world: str = "data/shapes"  # Shapes world: {world} in paths; written on first use
    world_seed: int = 0  # seed of the Shapes world
    max_prompt_len: int = 256  # longest prompt in tokens, image included (longer: dropped, counted)
    max_new_tokens: int = 48  # response length limit (LLaVA-RLHF: 896)
    # rollouts decoded through torch.compile (model.generate(compile=True); its decode cache
    # stays allocated): CUDA graphs on a GPU; on a CPU slower than eager and 10-40 s to compile
    compile_decode: bool = False
    temperature: float = 1.0  # sampling temperature of rollouts and of the log-probs (logits / T)
    rollout_batch: int = 64  # prompts per PPO step (global; LLaVA-RLHF: 512)
    minibatch_size: int = 32  # sequences per optimizer step (global; LLaVA-RLHF: 256)
    ppo_epochs: int = 2  # passes over each rollout batch (LLaVA-RLHF: 2)
    # (rollouts are sampled in these chunks from one stream: another value draws other samples;
    # the update's sums are the same up to float rounding)
    micro_batch: int = 0  # sequences per pass per process (0: all; LLaVA-RLHF: 16; moves samples)
    lora_r: int = 16  # policy LoRA rank (LLaVA-RLHF: 64; the value LoRA copies the RM's)
    lora_alpha: int = 16  # policy LoRA alpha
    lora_dropout: float = 0.0  # policy LoRA dropout
    lora_targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")  # policy LoRA's projections
    lr: float = 5e-4  # peak learning rate of the policy adapter (LLaVA-RLHF: 3e-5 on 7B/13B)
    value_lr: float = 1e-3  # value adapter and head lr (0: --lr, as LLaVA-RLHF's one optimizer)
    warmup: int = 5  # linear warmup steps (LLaVA-RLHF: 5)
    warmup_from_zero: bool = False  # warmup step s at lr s/W (transformers'); false: (s+1)/W
    min_lr_ratio: float = 0.0  # final lr / peak of the cosine schedule (LLaVA-RLHF: cosine to 0)
    weight_decay: float = 0.0  # AdamW weight decay on every trained parameter (value head bias too)
    grad_clip: float = 1.0  # gradient norm clip over policy + value (LLaVA-RLHF: 1.0)
    kl_coef: float = 0.1  # per-token KL penalty coefficient (LLaVA-RLHF scripts: 0.1)
    kl_estimator: str = "k1"  # 'k1': logp - logp_ref (LLaVA-RLHF); 'k3': r - 1 - log r, r = p_ref/p
    kl_clamp: bool = True  # k1 clamped at >= 0 per token, as LLaVA-RLHF
    target_kl: float = 0.0  # > 0: adapt kl_coef toward this KL per sequence (Ziegler et al.; TRL)
    kl_horizon: int = 10000  # adaptive controller horizon (sequences)
    gamma: float = 1.0  # discount
    lam: float = 1.0  # GAE lambda (LLaVA-RLHF: 1.0; TRL: 0.95)
    clip: float = 0.2  # policy ratio clip
    vf_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # value loss coefficient
    # losses summed / 'tokens': real response tokens of the minibatch; 'columns': its sequences x
    # --max_new_tokens (LLaVA-RLHF's mean over every response column, padding included)
    loss_divisor: str = "tokens"
    reward_scale: float = 1.0  # shaped rewards x this before GAE (LLaVA-RLHF, no whitening: 10)
    # bonus (correctness()): right letter (caption types 2-5) 1; type 6: 'No' +0.5, 'Yes' -0.5
    correctness: float = 2.0  # x bonus: right letter 1; type 6 No .5, Yes -.5 (LLaVA-RLHF: 2)
    length_penalty: float = -2.0  # x length_bonus x tokens / max_new_tokens (LLaVA-RLHF: -10)
    no_eos_penalty: float = -8.0  # added to the score of a response without EOS (LLaVA-RLHF: -8)
    stop_at_question: bool = False  # LLaVA-RLHF: cut a response at '?' (no EOS left: the penalty)
    rm_input: str = "text"  # RM reads 'text' (rendered anew, ends in eos) or 'tokens' (LLaVA-RLHF)
    correct_rule: str = "word"  # Yes/No bonus test: 'word' (whole word) or 'prefix' (LLaVA-RLHF)
    max_steps: int = 40  # PPO steps (rollout + update)
    log_every: int = 1  # a log line every N steps
    oracle_every: int = 1  # world's --data: oracle hallucination rate every N steps
    save_every: int = 20  # checkpoint every N steps (and at the end)
    export: str = "merged"  # final policy: 'merged' (full weights) or 'adapter' (LoRA on --init)
    seed: int = 0  # seed for prompt order, sampling and minibatches
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, or bf16 (base weights in bf16 on GPU; LoRA and heads stay fp32)
    grad_checkpoint: bool = False  # activation checkpointing in the decoder during updates
    resume: bool = False  # continue from the newest checkpoint in --out
    overwrite: bool = False  # a run already in --out is moved aside (kept) and a new one starts
    fsdp: bool = False  # not supported: the four roles share one frozen base, replicated (README)
    skip_nonfinite: bool = False  # skip a step with a non-finite loss/gradient instead of stopping
    # allowed values (common.parse_config refuses others in one line; any float must also be finite)
    RANGES = dict(world_seed="[0, inf)", max_prompt_len="[1, inf)", max_new_tokens="[1, inf)",
                  temperature="(0, inf)", rollout_batch="[1, inf)", minibatch_size="[1, inf)",
                  ppo_epochs="[1, inf)", micro_batch="[0, inf)", lora_r="[1, inf)",
                  lora_alpha="[1, inf)", lora_dropout="[0, 1)",
                  lora_targets=("q", "k", "v", "o", "gate", "up", "down"), lr="(0, inf)",
                  value_lr="[0, inf)", warmup="[0, inf)", min_lr_ratio="[0, 1]",
                  weight_decay="[0, inf)", grad_clip="[0, inf)", kl_coef="[0, inf)",
                  kl_estimator=("k1", "k3"), target_kl="[0, inf)", kl_horizon="[1, inf)",
                  gamma="[0, 1]", lam="[0, 1]", clip="(0, inf)", vf_clip="(0, inf)",
                  vf_coef="[0, inf)", loss_divisor=("tokens", "columns"),
                  reward_scale="(0, inf)", correctness="(-inf, inf)",
                  length_penalty="(-inf, inf)", no_eos_penalty="(-inf, inf)",
                  rm_input=("text", "tokens"), correct_rule=("word", "prefix"),
                  max_steps="[1, inf)", log_every="[1, inf)", oracle_every="[0, inf)",
                  save_every="[1, inf)", export=("merged", "adapter"), seed=common.SEED_RANGE,
                  device=("cpu", "cuda"), dtype=("fp32", "bf16"))


def correctness(response, caption_type, rule="word"):
    """(bonus, correct) for LLaVA-RLHF's symbolic reward (ppo_trainer.py rollout). caption_type 2-5:
    the answer is A-D; bonus 1 when the response starts with 'B.' or states 'correct option is B.'.
    6: the answer is No; +0.5 for a response starting with No, -0.5 for Yes. 7 (answer Yes): no
    bonus (LLaVA-RLHF: "for now, we do not give symbolic award"), but correctness is still measured.
    1 (general): (0, None).
    rule 'prefix' is LLaVA-RLHF's test, startswith('No') / startswith('Yes'), so 'Nothing is there'
    and 'None' earn the No bonus; 'word' (ours) needs 'No' / 'Yes' as a whole word, which is what
    the bonus means."""
    s = response.strip()
    if 2 <= caption_type <= 5:
        letter = "ABCD"[caption_type - 2]
        ok = s.startswith(letter + ".") or f"correct option is {letter}." in s
        return float(ok), ok
    if caption_type in (6, 7):
        if rule == "prefix":
            yes, no = s.startswith("Yes"), s.startswith("No")
        else:
            yes, no = re.match(r"Yes\b", s) is not None, re.match(r"No\b", s) is not None
        if caption_type == 7:
            return 0.0, yes
        return 0.5 if no else -0.5 if yes else 0.0, no
    return 0.0, None


def question_stop_ids(tokenizer):
    """LLaVA-RLHF's extra stop tokens: tok('?')[0] (LLaMA: 1577, '▁?') and tok('\\n?')[-1] (29973,
    '?'), in that order. We take the last token of each (the same ids on LLaMA; a tokenizer that
    splits '?' into '▁' + '?', as the Shapes one, would otherwise stop at every lone '▁')."""
    question = tokenizer("?", add_special_tokens=False)["input_ids"][-1]
    newline_question = tokenizer("\n?")["input_ids"][-1]
    return list(dict.fromkeys([question, newline_question]))


def cut_at_stop_tokens(tokens, lengths, eos_ids, pad_id, stop_ids):
    """LLaVA-RLHF's truncate_after_eos_with_padding on sampled responses (B, K) with `lengths` (EOS
    included): the end is the first EOS, overridden by the first occurrence of each stop id in turn
    (so the last stop id found wins), the token at the end kept and everything after it padded. Cut
    at a '?', a response has no EOS left: it gets the no-EOS penalty. eos_ids: one id or a list
    (common.answer_eos: any of them is an EOS). Returns (tokens, lengths, finished)."""
    eos = set(eos_ids) if isinstance(eos_ids, (list, tuple)) else {eos_ids}
    tokens, lengths = tokens.clone(), lengths.clone()
    for i in range(len(tokens)):
        row = tokens[i, :int(lengths[i])].tolist()
        end = next((k for k, t in enumerate(row) if t in eos), None)
        for t in stop_ids:
            end = row.index(t) if t in row else end
        if end is not None:
            tokens[i, end + 1:] = pad_id
            lengths[i] = end + 1
    finished = torch.tensor([int(lengths[i]) > 0 and int(tokens[i, int(lengths[i]) - 1]) in eos
                             for i in range(len(tokens))], device=tokens.device)
    return tokens, lengths, finished


def kl_penalty(logp, ref_logp, estimator="k1", clamp=True):
    """Per-token KL(pi || pi_ref) estimate from the sampled token's log-probs (Schulman's k1 /
    k3)."""
    if estimator == "k1":
        kl = logp - ref_logp
        return kl.clamp(min=0.0) if clamp else kl
    log_r = ref_logp - logp  # k3: r = p_ref / p, (r - 1) - log r >= 0, unbiased
    return torch.exp(log_r) - 1.0 - log_r


def sequence_reward(score, bonus, length_bonus, lengths, finished, cfg):
    """The score added at a response's last token: RM score + correctness term + length term
    (LLaVA-RLHF's length_bonus_score * length_bonus * tokens / response_len; tokens include the EOS)
    + no-EOS penalty."""
    length_term = cfg.length_penalty * length_bonus * lengths.float() / cfg.max_new_tokens
    no_eos_term = cfg.no_eos_penalty * (~finished).float()
    return score + cfg.correctness * bonus + length_term + no_eos_term


def shape_rewards(score, logp, ref_logp, lengths, kl_coef, estimator="k1", clamp=True):
    """Per-token rewards r_k = -kl_coef * kl_k, plus the sequence score at the last real token
    (index length - 1: found by the length, never by searching for pad, which may equal eos). (B, K)
    each."""
    mask = torch.arange(logp.shape[1], device=logp.device)[None] < lengths[:, None]
    # 0 past the end by where, not x mask: a log-prob of -inf there (a pad the reference gives
    # probability 0) is an inf KL, and inf x 0 = NaN ran back through GAE into the whole row
    kl = torch.where(mask, kl_penalty(logp, ref_logp, estimator, clamp), 0.0)
    rewards = -kl_coef * kl
    rewards[torch.arange(len(score), device=score.device), lengths - 1] += score
    return rewards, kl, mask


def gae(rewards, values, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016, Eq. 16). rewards and values are zero
    after each sequence's last token, so V after the end is 0 (terminal). Returns (advantages,
    returns)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for k in reversed(range(rewards.shape[1])):
        next_v = values[:, k + 1] if k + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, k] + gamma * next_v - values[:, k]
        last = delta + gamma * lam * last
        adv[:, k] = last
    return adv, adv + values


def whiten(x, mask, d, eps=1e-8):
    """(x - mean) / (std + eps), mean and (biased) std over the masked entries of the whole global
    batch."""
    xs = distributed.all_gather_cat(x, d)[distributed.all_gather_cat(mask, d).bool()]
    return (x - xs.mean()) / (xs.std(unbiased=False) + eps) * mask


def policy_loss(logp, old_logp, adv, mask, clip, n_tokens, divisor=None):
    """PPO clipped surrogate (Schulman et al. 2017, Eq. 7), summed over tokens / tokens in the
    global minibatch (or / divisor: --loss_divisor columns); the stats per token."""
    ratio = torch.exp(logp - old_logp)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = (torch.maximum(pg1, pg2) * mask).sum() / (n_tokens if divisor is None else divisor)
    stats = {"clipfrac": ((pg2 > pg1).float() * mask).sum() / n_tokens,
             # LLaVA-RLHF's approxkl
             "approx_kl": (0.5 * (logp - old_logp) ** 2 * mask).sum() / n_tokens}
    return loss, stats


def value_loss(values, old_values, returns, mask, vf_clip, n_tokens, divisor=None):
    """Clipped value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2), summed / global
    tokens (or / divisor)."""
    clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * (torch.maximum(l1, l2) * mask).sum() / (n_tokens if divisor is None else divisor)
    return loss, {"vf_clipfrac": ((l2 > l1).float() * mask).sum() / n_tokens}


def response_logprobs(model, feats, seq, mask, prompt_len, temperature, entropy=True):
    """log p(token) under softmax(logits / T) and the entropy (None unless `entropy`), for the
    response tokens seq[:, prompt_len:]: the logits at position j predict token j + 1."""
    h = model(None, seq, mask, return_hidden=True, image_features=feats,
              keep=slice(prompt_len - 1, -1))
    logp_all = tempered_log_softmax(model.logits(h).float(), temperature)
    logp = logp_all.gather(-1, seq[:, prompt_len:, None])[..., 0]
    return logp, entropy_of(logp_all) if entropy else None


def response_values(model, feats, seq, mask, prompt_len):
    """V_k for response token k: the value head on the hidden state that predicts token k
    (LLaVA-RLHF's AutoregressiveValue alignment)."""
    h = model(None, seq, mask, return_hidden=True, image_features=feats,
              keep=slice(prompt_len - 1, -1))
    return model.heads["value"](h)


# ----------------------------------------------------------------------------------------
# roles, data, checkpoints
# ----------------------------------------------------------------------------------------

def reward_settings(rm_dir):
    """The RM's own run settings (facts, wording, template, prompt_space): PPO scores exactly as
    the RM was trained."""
    path = os.path.join(rm_dir, "config.json")
    if not os.path.isfile(path):
        # a LLaVA-RLHF one (its LoRA and reward_head) is imported, not read
        rlhf = llava_rlhf_reward_of(rm_dir)
        how = "python reward.py writes one"
        if rlhf:
            how = f"{import_llava_rlhf_command(rlhf)} imports this LLaVA-RLHF one"
        raise common.ConfigError(f"--reward {rm_dir}: no reward model checkpoint there ({how})")
    try:
        with open(path) as f:
            rc = json.load(f)
    except (OSError, ValueError) as e:  # (UnicodeDecodeError is a ValueError)
        raise common.ConfigError(f"{path}: cannot read the reward model's config "
                                 f"({type(e).__name__}: {e})")
    rc = rc.get("run_config") if isinstance(rc, dict) else None
    if not isinstance(rc, dict) or "facts" not in rc:
        raise common.ConfigError(f"{path}: field 'run_config.facts' is missing "
                                 "(not a reward.py checkpoint?)")
    if not isinstance(rc["facts"], bool):  # ("false" would read as facts on)
        raise common.ConfigError(f"{path}: field 'run_config.facts': expected true or false, got "
                                 f"{rc['facts']!r:.40}")
    wording, template = rc.get("eval_prompt", "llava-rlhf"), rc.get("template", "vicuna_v1")
    space = rc.get("prompt_space", False)  # (absent: a reward model from before the flag)
    for key, value, allowed in (("eval_prompt", wording, ("llava-rlhf", "short")),
                                ("template", template, ("vicuna_v1", "llava_v1")),
                                ("prompt_space", space, (True, False))):
        if value not in allowed or type(value) is int:  # (a KeyError at the first reward otherwise;
            # 1 == True, but it is not the flag's value)
            want = " or ".join(json.dumps(a) if type(a) is bool else a for a in allowed)
            raise common.ConfigError(f"{path}: field 'run_config.{key}': expected {want}, got "
                                     f"{value!r:.40}")
    return rc["facts"], wording, template, space


def build_roles(cfg, d):
    """(policy model, critic model, tokenizer). When the RM was trained on the policy's base weights
    the two are ONE model (four adapters on one frozen base); otherwise the RM is a second, frozen
    model, and the value adapter lives on it (as LLaVA-RLHF's value model lives on the RM backbone).
    Token ids and image tokens must agree: the RM and the value model read the policy's
    sequences."""
    # (each checkpoint's own tokenizer: the world's would be another vocabulary)
    policy, tokenizer = common.load_model_and_tokenizer(cfg.init, vision_tower=cfg.vision_tower,
                                                        device=d.device,
                                                        dtype=common.base_dtype(cfg))
    common.check_new_tokens(policy, cfg, "max_new_tokens")
    if policy.adapters:
        raise common.ConfigError(f"{cfg.init}: the SFT checkpoint holds LoRA adapters "
                                 f"{sorted(policy.adapters)}: pass its base as --init and "
                                 "a PEFT LoRA as --policy_lora, or merge them first (README: "
                                 "'A LoRA policy start')")
    rm_dir = resolve_checkpoint(cfg.reward)
    # (a PEFT adapter as --init: its merged vision/projector LoRA is in no reward model's base)
    init = resolve_checkpoint(cfg.init)
    if not is_peft_dir(init) and base_weights_dir(rm_dir) == base_weights_dir(init):
        critic = policy
        load_adapters(critic, rm_dir)
    else:
        critic, rm_tok = common.load_model_and_tokenizer(rm_dir, device=d.device, policy=False,
                                                         dtype=common.base_dtype(cfg))
        a, b = policy.config, critic.config
        # (the image size may differ: the critic sees each image at its own, as LLaVA-RLHF's 7B
        # policy at 224 px and its 13B reward model at 336 px do)
        key = lambda c: (c.vocab_size, c.image_token_id, c.eos_token_id, c.pad_token_id)
        if key(a) != key(b) or rm_tok.get_vocab() != tokenizer.get_vocab():
            raise common.ConfigError(
                f"--reward {rm_dir} (vocab {b.vocab_size}, hidden {b.hidden}) does not fit "
                f"--init {resolve_checkpoint(cfg.init)} (vocab {a.vocab_size}, "
                f"hidden {a.hidden}): the reward and value models must read the policy's tokens "
                f"(train the RM on a model with this tokenizer)")
    if "reward" not in critic.adapters or "reward" not in critic.heads:
        raise common.ConfigError(f"--reward {rm_dir}: no 'reward' adapter and head "
                                 "(not a reward.py checkpoint?)")
    if cfg.policy_lora:  # (LLaVA-RLHF: PeftModel.from_pretrained(sft_model, RL-INIT) for both)
        if not is_peft_dir(cfg.policy_lora):
            raise common.ConfigError(f"--policy_lora {cfg.policy_lora}: not a PEFT adapter folder "
                                     "(adapter_config.json, no config.json)")
        refuse_scalar_model(cfg.policy_lora)  # (a reward model's LoRA: its head left unread)
        load_adapters(policy, cfg.policy_lora, "policy")
        policy.copy_adapter("policy", "reference")
    else:
        policy.add_adapter("policy", cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                           cfg.lora_targets)
    # value model initialised from the reward model (init_value_with_reward)
    critic.copy_adapter("reward", "value")
    critic.add_head("value")                # new head, zero-initialised: V = 0 at the start
    trained = ["value"] + (["policy"] if critic is policy else [])
    critic.set_trainable(adapters=trained, heads=["value"])
    if critic is not policy:
        policy.set_trainable(adapters=["policy"])
    if cfg.dtype == "bf16" and cfg.device == "cuda":
        for m in {id(policy): policy, id(critic): critic}.values():
            m.cast_base(torch.bfloat16)
    for m in (policy, critic):
        m.gradient_checkpointing = cfg.grad_checkpoint
    return policy, critic, tokenizer


def check_policy_template(cfg, init_dir, template):
    """The policy's prompts are rendered with the reward model's template (LLaVA-RLHF uses one for
    both): an SFT checkpoint of ours (init_dir) that recorded another one is refused, not
    re-prompted."""
    sft_template = recorded_template(init_dir)
    if sft_template is not None and sft_template != template:
        raise common.ConfigError(f"--init {cfg.init}: trained with --template {sft_template}, "
                                 f"but --reward {cfg.reward} with --template {template}: PPO "
                                 "prompts the policy as its reward model was trained (train them "
                                 "with one template)")


def load_prompts(cfg, need_captions, tokenizer, model, template, d=None):
    """RL prompts (LLaVA-RLHF format) tokenized for generation; too-long ones dropped and
    counted."""
    path = cfg.data
    recs = read_rl_prompts(path, cfg.image_folder or None, captions_path=cfg.captions or None,
                           need_captions=need_captions)
    require_records(recs, path, "RL prompts")  # (not "no prompt fits --max_prompt_len")
    check_images(recs, path, d=d)  # every image decodes, before any step
    # the length term as sequence_reward computes it, at its longest: past float32 it would stop
    # the run at the first step's non-finite guard
    def longest(bonus):  # float32, as the rollout's tensors are
        return cfg.length_penalty * bonus * float(cfg.max_new_tokens)
    scaled = f" x --reward_scale {cfg.reward_scale:g}"  # (the terms are scaled before GAE)
    for flag, factor, times in (("reward_scale", 1.0, ""),
                                ("correctness", cfg.reward_scale, scaled),
                                ("no_eos_penalty", cfg.reward_scale, scaled)):
        value = getattr(cfg, flag)
        if not torch.isfinite(torch.tensor(value * factor, dtype=torch.float32)):
            raise common.ConfigError(f"--{flag} {value:g}{times} overflows a float32 reward")
    if not torch.isfinite(longest(torch.tensor(1.0))):
        raise common.ConfigError(f"--length_penalty {cfg.length_penalty:g}: x --max_new_tokens "
                                 f"{cfg.max_new_tokens} overflows a float32 reward")
    for i, r in enumerate(recs):
        bonus = torch.tensor(r["length_bonus"], dtype=torch.float32)
        if not (torch.isfinite(bonus) and torch.isfinite(longest(bonus))):
            raise DataError(path, record_label(i, r), "length_bonus",
                            f"{r['length_bonus']:g} x --length_penalty {cfg.length_penalty:g} x "
                            f"--max_new_tokens {cfg.max_new_tokens} overflows a float32 reward")
    c, out = model.config, []
    tokenized = tokenize_conversations(tokenizer, [r["prompt"] for r in recs], c.image_token_id,
                                       c.num_image_tokens, 1 << 30, template)
    for r, t in zip(recs, tokenized):
        if len(t["input_ids"]) <= cfg.max_prompt_len:
            out.append(dict(r, input_ids=t["input_ids"]))
    if not out:
        raise common.ConfigError(f"{path}: no prompt fits --max_prompt_len {cfg.max_prompt_len}")
    return out, len(recs) - len(out)


@contextmanager
def policy_only(model):
    """While saving: hide every other adapter and head, so a checkpoint is the policy alone
    ('policy' active)."""
    others = [n for n in model.adapters if n != "policy"]
    loras = [(lin, n, lin.lora.pop(n))
             for _, lin in model.lora_linears() for n in others if n in lin.lora]
    adapters = {n: model.adapters.pop(n) for n in others}
    heads = {n: model.heads.pop(n) for n in list(model.heads)}
    active = model.active_adapter
    model.set_adapter("policy")
    try:
        yield model
    finally:
        for lin, n, ad in loras:
            lin.lora[n] = ad
        model.adapters.update(adapters)
        model.heads.update(heads)
        model.set_adapter(active)


def folder_digest(folder, names):
    """{name: sha256} of the named files of a folder (those there): recorded with each checkpoint
    for what the run reads again at --resume (--reward's config and adapters, --policy_lora's),
    so one retrained, replaced or grown since the run started is found there (the run went on
    scoring with the new reward model, or took the new adapter as its KL reference, without a
    word)."""
    digests = rundir.file_digests([os.path.join(folder, name) for name in names])
    return {os.path.basename(path): digest for path, digest in digests.items()}


# a PEFT adapter's files (--policy_lora): its config and weights in either format
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def trainer_extra(policy, critic, kl_coef, gen, d, digests=None):
    """What --resume needs besides the optimizer: both trained adapters, the value head, kl_coef and
    every rank's rollout generator state (collective: call on all ranks); and the digests of the
    files it reads again at --resume (folder_digest), which it checks."""
    states = [None] * d.world
    if d.world > 1:
        dist.all_gather_object(states, gen.get_state())
    else:
        states = [gen.get_state()]
    grab = lambda ps: [p.detach().cpu().clone() for p in ps]
    return {"policy": grab(policy.adapter_parameters("policy")),
            "value": grab(critic.adapter_parameters("value")),
            "value_head": grab(critic.heads["value"].parameters()),
            "kl_coef": kl_coef, "generators": states, **(digests or {})}


def restore_extra(extra, policy, critic, gen, d):
    with torch.no_grad():
        for ps, ts in ((policy.adapter_parameters("policy"), extra["policy"]),
                       (critic.adapter_parameters("value"), extra["value"]),
                       (list(critic.heads["value"].parameters()), extra["value_head"])):
            for p, t in zip(ps, ts, strict=True):
                p.copy_(t)
    # bitwise resume; another world size continues from fresh streams (rundir.restore says so)
    if len(extra["generators"]) == d.world:
        gen.set_state(extra["generators"][d.rank])
    return extra["kl_coef"]


# ----------------------------------------------------------------------------------------
# rollout and update
# ----------------------------------------------------------------------------------------

def batched(fn, n, size):
    """fn(slice) over consecutive slices of at most `size` rows (0: all at once), outputs
    concatenated."""
    outs = [fn(slice(s, s + (size or n))) for s in range(0, n, size or n)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)


def reference(policy):
    """The reference policy: the same base with no adapter, or with the frozen copy of the
    --policy_lora the policy started from."""
    if "reference" in policy.adapters:
        return policy.use_adapter("reference")
    return policy.no_adapter()


def critic_ids(ids, policy, critic):
    """A prompt's ids with the critic's image tokens in place of the policy's (a reward model at
    another image size: LLaVA-RLHF expands its one image placeholder inside each model)."""
    a, b = policy.config, critic.config
    at = (ids == a.image_token_id).nonzero()[:, 0]
    if a.num_image_tokens == b.num_image_tokens or not len(at):
        return ids
    image = torch.full((b.num_image_tokens,), b.image_token_id, dtype=ids.dtype)
    return torch.cat([ids[:int(at[0])], image, ids[int(at[0]) + a.num_image_tokens:]])


def prompt_batch(prompts, ids_of, images, pad_id, dev):
    """Left-padded prompt ids, their mask and the images: every response starts at column P."""
    rows = [{"input_ids": ids_of(p), "pixel_values": normalize(images.unit(p["image"]))}
            for p in prompts]
    b = collate(rows, pad_id, side="left")
    return b["input_ids"].to(dev), b["attention_mask"].to(dev), b["pixel_values"].to(dev)


@torch.no_grad()
def rollout(policy, critic, tokenizer, prompts, images, cfg, rm, kl_coef, gen, key,
            critic_images=None):
    """Sample responses with the KV cache (the policy's log-probs and entropies come with the
    samples), score them, and compute the reference's log-probs, values and shaped rewards.
    critic_images: the critic's ImageCache when it reads images at another size than the policy
    (default: a new one)."""
    policy.eval()
    critic.eval()
    dev, n, mb = next(policy.parameters()).device, len(prompts), cfg.micro_batch
    pad = tokenizer.pad_token_id
    ids, pmask, pix = prompt_batch(prompts, lambda p: p["input_ids"], images, pad, dev)
    # frozen tower: once, for every role and epoch
    feats = batched(lambda s: policy.encode_images(pix[s]), n, mb)
    a, c = policy.config, critic.config
    own_view = (a.image_size, a.num_image_tokens) != (c.image_size, c.num_image_tokens)
    if own_view:  # the critic's own prompt ids (its image tokens) and images (its size)
        critic_images = critic_images or ImageCache(c.image_size)
        cids, cpmask, cpix = prompt_batch(
            prompts, lambda p: critic_ids(p["input_ids"], policy, critic), critic_images, pad, dev)
        cfeats = batched(lambda s: critic.encode_images(cpix[s]), n, mb)
    else:
        cfeats = feats if critic is policy else batched(lambda s: critic.encode_images(pix[s]),
                                                        n, mb)

    eos = common.answer_eos(policy, tokenizer)  # (any id a Llama 3 config lists ends a rollout)

    def sample(s):
        g = policy.generate(None, ids[s], pmask[s], cfg.max_new_tokens, cfg.temperature,
                            generator=gen, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id, image_features=feats[s],
                            return_logprobs=True, return_entropy=True,
                            compile=cfg.compile_decode)
        return g.tokens, g.lengths, g.finished, g.logprobs, g.entropy
    with policy.use_adapter("policy"):
        tokens, lengths, finished, logp, entropy = batched(sample, n, mb)
    if cfg.stop_at_question:
        stop_ids = question_stop_ids(tokenizer)
        tokens, lengths, finished = cut_at_stop_tokens(tokens, lengths, eos,
                                                       tokenizer.pad_token_id, stop_ids)
    # a sampled image placeholder cannot be fed back (it marks image-feature slots): read it as
    # <unk> (or pad, for a tokenizer without one)
    unk_id = tokenizer.unk_token_id
    stand_in = unk_id if unk_id is not None else tokenizer.pad_token_id
    replaced = tokens == policy.config.image_token_id
    tokens[replaced] = stand_in
    P, seq = ids.shape[1], torch.cat([ids, tokens], 1)
    rmask = torch.arange(tokens.shape[1], device=dev)[None] < lengths[:, None]
    mask = torch.cat([pmask, rmask.long()], 1)
    logprobs = lambda s: response_logprobs(policy, feats[s], seq[s], mask[s], P, cfg.temperature)
    # the policy's log-probs and entropies are the sampler's: the same function of the same
    # tokens as a pass over the whole sequence (up to float rounding), so there is no such pass;
    # past a response's end (EOS, or a cut at a stop token) every use masks them: zeros there.
    # A row whose tokens were changed after sampling (an image placeholder read as <unk>) gets
    # the pass, as the sampler never saw what the other roles will read.
    redo = (replaced & rmask).any(1)
    if cfg.dtype == "bf16" and cfg.device == "cuda":  # (on a bf16 base the sampler's cache and a
        # full pass round apart, 0.2 nats on sharp logits: the ratio would be noise from step 0;
        # LLaVA-RLHF takes the old log-probs from a full pass): every row gets the pass
        redo = torch.ones_like(redo)
    redo = redo.nonzero()[:, 0]
    if len(redo):
        with policy.use_adapter("policy"):
            logp[redo], entropy[redo] = batched(lambda s: logprobs(redo[s]), len(redo), mb)
    # zeros past the end in the rows the pass gave too (it scores the pads there, every row on
    # bf16 CUDA): a pad's log-prob ~90 nats below the reference's (k3's exp(ref - logp)) or the
    # updated policy's (the update's ratio) overflowed exp to inf, and inf x mask 0 is NaN
    logp, entropy = logp.masked_fill(~rmask, 0.0), entropy.masked_fill(~rmask, 0.0)
    with reference(policy):
        ref_logp, _ = batched(logprobs, n, mb)
    cseq, cmask, cP = seq, mask, P
    if own_view:
        cseq, cmask, cP = torch.cat([cids, tokens], 1), torch.cat([cpmask, rmask.long()], 1), \
            cids.shape[1]
    value_of = lambda s: response_values(critic, cfeats[s], cseq[s], cmask[s], cP)
    with critic.use_adapter("value"):
        values = batched(value_of, n, mb) * rmask
    texts = [tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True).strip()
             for i in range(n)]
    facts, wording, template, space = rm
    if cfg.rm_input == "tokens":  # LLaVA-RLHF: the sampled ids, '</s>' only where it was sampled
        items = [reward_item_from_ids(tokenizer, critic_ids(p["input_ids"], policy, critic),
                                      tokens[i, :lengths[i]],
                                      p["captions"] if facts else None,
                                      random.Random(f"{key}-{i}"), 1 << 30, wording, space)
                 for i, p in enumerate(prompts)]
    else:  # ours: the text decoded, stripped and rendered again as a finished turn (always eos)
        items = [reward_item(tokenizer, critic.config, p["prompt"], t,
                             p["captions"] if facts else None, random.Random(f"{key}-{i}"),
                             template, 1 << 30, wording, space)
                 for i, (p, t) in enumerate(zip(prompts, texts))]

    def rm_score(s):
        rb = common.to_device(collate(items[s], tokenizer.pad_token_id, side="right"), dev)
        return common.score_sequences(critic, "reward", rb["input_ids"], rb["attention_mask"],
                                      cfeats[s]).float()
    with critic.use_adapter("reward"):
        score = batched(rm_score, n, mb)
    checks = [correctness(t, p["caption_type"], cfg.correct_rule) for t, p in zip(texts, prompts)]
    bonus, correct = zip(*checks)
    length_bonus = torch.tensor([p["length_bonus"] for p in prompts], device=dev)
    bonuses = torch.tensor(bonus, device=dev)
    total = sequence_reward(score, bonuses, length_bonus, lengths, finished, cfg)
    rewards, kl, rmask = shape_rewards(total, logp, ref_logp, lengths, kl_coef, cfg.kl_estimator,
                                       cfg.kl_clamp)
    return dict(seq=seq, mask=mask, P=P, feats=feats, cfeats=cfeats, cseq=cseq, cmask=cmask,
                cP=cP, logp=logp, values=values,
                rewards=rewards, kl=kl, rmask=rmask.float(), entropy=entropy, score=score,
                lengths=lengths, finished=finished, correct=list(correct), texts=texts)


def ppo_update(policy, critic, ro, adv, returns, opt, params, cfg, d, step):
    """ppo_epochs passes over the rollout in shuffled minibatches (micro-batches accumulate);
    gradients summed over ranks, every loss normalised by the response tokens of the global
    minibatch. Returns mean stats over the updates taken (a skipped update's non-finite losses left
    out; NaN, logged as null, where --skip_nonfinite skipped them all)."""
    policy.train()
    critic.train()
    n_local, mb = len(ro["seq"]), cfg.minibatch_size // d.world
    dev = ro["seq"].device
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    sums, n_updates, n_skipped = {}, 0, 0
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(n_local, generator=g).to(ro["seq"].device)
        for s in range(0, n_local, mb):
            n_tok = distributed.all_reduce_sum(ro["rmask"][perm[s:s + mb]].sum(), d).clamp(min=1)
            # (LLaVA-RLHF: every micro-batch's mean over its sequences x response columns)
            columns = len(perm[s:s + mb]) * d.world * cfg.max_new_tokens
            divisor = columns if cfg.loss_divisor == "columns" else None
            before = dict(sums)  # (put back if this update is skipped)
            for j in range(s, s + mb, cfg.micro_batch or mb):
                i = perm[j:min(j + (cfg.micro_batch or mb), s + mb)]
                m = ro["rmask"][i]
                # each backward inside its adapter: --grad_checkpoint recomputes the forward there
                with policy.use_adapter("policy"):
                    logp, _ = response_logprobs(policy, ro["feats"][i], ro["seq"][i], ro["mask"][i],
                                                ro["P"], cfg.temperature, entropy=False)
                    pg, st = policy_loss(logp, ro["logp"][i], adv[i], m, cfg.clip, n_tok,
                                         divisor)
                    pg.backward()  # policy and value graphs one after the other: lower peak memory
                with critic.use_adapter("value"):
                    v = response_values(critic, ro["cfeats"][i], ro["cseq"][i],
                                        ro["cmask"][i], ro["cP"])
                    vf, vst = value_loss(v, ro["values"][i], returns[i], m, cfg.vf_clip, n_tok,
                                         divisor)
                    (cfg.vf_coef * vf).backward()
                for k, x in {"pg_loss": pg, "vf_loss": vf, **st, **vst}.items():
                    sums[k] = sums.get(k, 0.0) + x.detach().float()
            last = epoch == cfg.ppo_epochs - 1 and s + mb >= n_local
            _, norm = common.optimizer_step(opt, params, d, step, cfg, last=last)
            if norm is None:  # skipped (--skip_nonfinite; the same on every rank)
                sums, n_skipped = before, n_skipped + 1
                continue
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.tensor(norm, device=dev)
            n_updates += 1
    keys = ("approx_kl", "clipfrac", "grad_norm", "pg_loss", "vf_clipfrac", "vf_loss")
    nan = torch.tensor(float("nan"), device=dev)
    tot = distributed.all_reduce_sum(torch.stack([sums.get(k, nan) for k in keys]).cpu(), d)
    out = {k: float(v) / max(n_updates, 1) / (d.world if k == "grad_norm" else 1)
           for k, v in zip(keys, tot)}
    return {**out, "skipped_updates": n_skipped} if cfg.skip_nonfinite else out


def rollout_stats(ro, returns, cfg, d, objects=None, prompts=None):
    """Means over the global rollout batch (gathered from every rank): score, KL, reward, length,
    correctness, entropy, explained variance of the values, and on Shapes the oracle's hallucination
    rate."""
    dev = ro["score"].device
    g = lambda x: distributed.all_gather_cat(x.float(), d)
    m = g(ro["rmask"]).bool()
    typed = g(torch.tensor([c is not None for c in ro["correct"]], device=dev)).bool()
    right = g(torch.tensor([bool(c) for c in ro["correct"]], device=dev))
    R, V = g(returns)[m], g(ro["values"])[m]
    out = {"score": g(ro["score"]).mean(),
           "kl": g(ro["kl"].sum(1)).mean(),
           "reward": g(ro["rewards"].sum(1)).mean(),
           "length": g(ro["lengths"]).mean(),
           "no_eos": g(~ro["finished"]).mean(),
           # (None: no prompt with a checkable answer; one return, or all equal)
           "correct": right[typed].mean() if typed.any() else None,
           "entropy": g(ro["entropy"])[m].mean(),
           "explained_var": 1 - (R - V).var() / R.var() if R.numel() > 1 and R.var() > 0 else None}
    if objects is not None:  # the exact oracle: is reward hacking turning into hallucination?
        counts = []
        for t, p in zip(ro["texts"], prompts):
            truth = objects[os.path.relpath(p["image"], cfg.world)]
            counts.append(oracle.oracle(t, truth)["num_hallucinations"])
        h = g(torch.tensor(counts, device=dev))
        out["halluc_rate"] = (h > 0).float().mean()
        out["halluc_per_answer"] = h.mean()
    return {k: None if v is None else float(v) for k, v in out.items()}


def main(cfg):
    given = cfg  # (as given: '{world}' paths unresolved, for refuse_unread's defaults)
    rundir.refuse_unread_shared(cfg)
    if cfg.target_kl == 0:
        rundir.refuse_unread(cfg, ["kl_horizon"], "with --target_kl 0 (a fixed --kl_coef); drop it")
    if cfg.kl_estimator == "k3":
        rundir.refuse_unread(cfg, ["kl_clamp"], "with --kl_estimator k3 (k3 is >= 0 already); "
                             "drop it")
    cfg, named = common.world_paths(cfg, ("data", "init"), ("captions",))
    # the oracle counts with the world's annotations: --data the world's prompts, by default or
    # spelled out (read as outside the world, its counts were dropped without a word)
    world_prompts = "data" in named or common.samefile(
        cfg.data, os.path.join(cfg.world, "rl_prompts.json"))
    if not world_prompts:
        rundir.refuse_unread(cfg, ["oracle_every"], "with a --data outside the world (the oracle "
                             "counts with the world's annotations); drop it")
    distributed.check_world("ppo.py", cfg.fsdp)
    d = distributed.setup_dist(cfg.device, flags=cfg)
    common.seed_everything(cfg.seed)
    for flag, ok, want in (
            ("kl_estimator", cfg.kl_estimator in ("k1", "k3"), "k1 or k3"),
            ("export", cfg.export in ("merged", "adapter"), "merged or adapter"),
            ("rm_input", cfg.rm_input in ("text", "tokens"), "text or tokens"),
            ("correct_rule", cfg.correct_rule in ("word", "prefix"), "word or prefix"),
            ("temperature", cfg.temperature > 0, "> 0 (rollouts sample)"),
            # the adaptive controller multiplies kl_coef by 1 + e * rollout_batch / kl_horizon,
            # e in [-0.2, 0.2]: from 0 it never moves, and at or below 0 it turns negative
            ("kl_coef", cfg.target_kl == 0 or cfg.kl_coef > 0, "> 0 with --target_kl > 0"),
            ("kl_horizon", cfg.target_kl == 0 or cfg.kl_horizon > 0.2 * cfg.rollout_batch,
             f"> 0.2 x --rollout_batch ({0.2 * cfg.rollout_batch:g}) with --target_kl > 0")):
        if not ok:
            raise common.ConfigError(f"--{flag} {getattr(cfg, flag)!r}: expected {want}")
    if cfg.rollout_batch == 1 and cfg.max_new_tokens == 1 and d.main:  # (the smallest smoke run)
        print("note: --rollout_batch 1 with --max_new_tokens 1: advantages whitened over one "
              "token are 0, so the policy does not move (the value model trains)", flush=True)
    if cfg.policy_lora:  # (the adapter's own rank, alpha, dropout and projections are used)
        rundir.refuse_unread(cfg, ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
                             "with --policy_lora (the adapter's own are used); drop it")
    if cfg.rollout_batch % cfg.minibatch_size or cfg.minibatch_size % d.world:
        raise common.ConfigError(f"--rollout_batch {cfg.rollout_batch} must be a multiple of "
                                 f"--minibatch_size {cfg.minibatch_size}, which must be a multiple "
                                 f"of the {d.world} processes")
    rundir.claim_out(cfg, d, inits=[cfg.init, cfg.reward])
    # the Shapes world, written once if missing; checked where the oracle reads its annotations
    if named or world_prompts and cfg.oracle_every:
        shapes.ensure_world(cfg.world, seed=cfg.world_seed)
    # rollout sampling stream
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000003 + d.rank)
    resume_path, state = rundir.load_resume(cfg.out, cfg) if cfg.resume else (None, None)
    rm = reward_settings(resolve_checkpoint(cfg.reward))
    digests = {"reward_digest": folder_digest(resolve_checkpoint(cfg.reward),
                                              ("config.json", "adapters.safetensors"))}
    if cfg.policy_lora:  # (the frozen reference is made from it again at every start)
        digests["policy_lora_digest"] = folder_digest(cfg.policy_lora, PEFT_FILES)
    was = state["extra"] if state is not None else {}
    if was.get("reward_digest") not in (None, digests["reward_digest"]):
        # (checkpoints from before it was recorded: not checked)
        raise common.ConfigError(
            f"--reward {cfg.reward}: {resolve_checkpoint(cfg.reward)} is not the reward model "
            f"this run was trained against (retrained, replaced or grown since: its config.json "
            "or adapters differ); put that one back (a reward run resumed since: move its newer "
            "checkpoint-N aside), or start a new run")
    if was.get("policy_lora_digest") not in (None, digests.get("policy_lora_digest")):
        raise common.ConfigError(
            f"--policy_lora {cfg.policy_lora}: not the adapter this run started from (replaced "
            "or retrained since: its files differ), which the frozen reference is made from "
            "again; put that one back, or start a new run")
    if not rm[0]:  # (the rollout hands the RM no facts)
        rundir.refuse_unread(given, ["captions"], f"with --reward {cfg.reward}, trained without "
                             "facts (--facts false); drop it")
    base = rundir.trained_base(resume_path, cfg.init)  # the SFT checkpoint the policy sits on
    check_policy_template(cfg, base, rm[2])
    if d.main:
        for flag, path in (("--init", cfg.init), ("--reward", cfg.reward)):
            rundir.note_world(flag, path, cfg.world)
    policy, critic, tokenizer = build_roles(replace(cfg, init=base), d)
    prompts, dropped = load_prompts(cfg, rm[0], tokenizer, policy, rm[2], d)
    oracle = world_prompts and cfg.oracle_every  # the world's annotations: exact counts
    objects = shapes.load_world(cfg.world)["by_file"] if oracle else None
    # look every prompt's image up now: one that hand-edited annotations lack is a DataError
    # here (ByFile), not a failure at the first step that scores it
    for p in prompts if oracle else []:
        objects[os.path.relpath(p["image"], cfg.world)]
    data_files = [cfg.data, cfg.captions]
    rundir.start_writing(cfg, d, data_files, policy, critic)  # (critic: the RM, where not policy)
    pol_params = policy.adapter_parameters("policy")
    val_params = critic.adapter_parameters("value") + list(critic.heads["value"].parameters())
    params = pol_params + val_params  # one AdamW, two parameter groups (policy lr, value lr)
    groups = [{"params": pol_params}, {"params": val_params}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, kl_coef = 0, cfg.kl_coef
    if state is not None:  # the optimizer, and the random streams building the roles drew from
        rundir.restore(policy, opt, resume_path, state, d, "the sampling streams (from --seed)")
        kl_coef = restore_extra(state["extra"], policy, critic, gen, d)
        start = state["step"]
        if d.main:
            print(f"resumed from {resume_path} at step {start}")
    shared = critic is policy
    if d.main:
        roles = "one shared base" if shared else "a separate frozen model"
        n_train = sum(p.numel() for p in params)
        print(f"{len(prompts)} RL prompts ({dropped} too long) | reward {cfg.reward}: "
              f"facts {rm[0]}, {roles} | {n_train / 1e6:.3f}M trainable | {d.world} process(es)")
        if len(prompts) < cfg.rollout_batch:  # (batch_indices wraps around the prompts)
            print(f"note: {len(prompts)} prompts for --rollout_batch {cfg.rollout_batch}: every "
                  "step's batch holds some prompts more than once")
    # what its checkpoints record: the flags, and the template the policy is prompted with (the
    # reward model's; PPO has no --template), so that an export writes that chat template and a
    # later stage notes another (none recorded: exported as vicuna_v1's); not a flag, so --resume
    # does not compare it (the reward model's digest covers it)
    record = {**asdict(cfg), "template": rm[2]}
    images = ImageCache(policy.config.image_size)
    critic_images = ImageCache(critic.config.image_size)  # (used when it reads another size)
    log = common.Logger(cfg.out, d.main)
    for step in range(start, cfg.max_steps):
        lr_mult = common.cosine_lr(step, cfg.max_steps, 1.0, cfg.warmup, cfg.min_lr_ratio,
                                   cfg.warmup_from_zero)
        opt.param_groups[0]["lr"] = cfg.lr * lr_mult
        opt.param_groups[1]["lr"] = (cfg.value_lr or cfg.lr) * lr_mult
        idx = common.batch_indices(step, len(prompts), cfg.rollout_batch, cfg.seed, d.rank, d.world)
        batch = [prompts[i] for i in idx]
        rollout_key = f"{cfg.seed}-{step}-{d.rank}"
        t0 = time.time()
        try:
            ro = rollout(policy, critic, tokenizer, batch, images, cfg, rm, kl_coef, gen,
                         rollout_key, critic_images)
        except RuntimeError as e:  # (an update past what fp32 holds well, e.g. --lr 1e20 beside
            # --skip_nonfinite: finite weights, non-finite probabilities; torch.multinomial's
            # traceback)
            if "probability tensor contains" not in str(e):
                raise
            last = common.latest_checkpoint(cfg.out)
            raise common.NonFiniteError(
                f"step {step + 1}: the policy's next-token probabilities are not finite (an update "
                f"took the weights past what they hold: lower --lr); stopped. Last good "
                f"checkpoint: {last or 'none yet'}") from None
        adv, returns = gae(ro["rewards"] * cfg.reward_scale, ro["values"], cfg.gamma, cfg.lam)
        adv = whiten(adv, ro["rmask"], d)
        t1 = time.time()
        upd = ppo_update(policy, critic, ro, adv, returns, opt, params, cfg, d, step)
        t2 = time.time()
        done = step + 1
        show = objects is not None and done % cfg.oracle_every == 0
        stats = rollout_stats(ro, returns, cfg, d, objects if show else None, batch)
        # adaptive KL controller (Ziegler et al. 2019): e = clip(KL / target - 1, +-0.2)
        if cfg.target_kl > 0:
            e = min(max(stats["kl"] / cfg.target_kl - 1.0, -0.2), 0.2)
            kl_coef *= 1.0 + e * cfg.rollout_batch / cfg.kl_horizon
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            log.log(done, **stats, **upd, kl_coef=kl_coef, lr=opt.param_groups[0]["lr"],
                    rollout_s=t1 - t0, update_s=t2 - t1)
        elif show:  # (an --oracle_every step between two log lines: its own line, not lost)
            log.log(done, **{k: stats[k] for k in ("halluc_rate", "halluc_per_answer")})
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            extra = trainer_extra(policy, critic, kl_coef, gen, d, digests)
            # base = the SFT checkpoint; reward/value adapters live in trainer_state
            with policy_only(policy):
                rundir.save_checkpoint(policy, cfg.out, done, record, opt, tokenizer, base=base,
                                       extra_state=extra, d=d)
    # the final checkpoint becomes the policy merged into the base (full weights)
    if cfg.export == "merged":
        extra = trainer_extra(policy, critic, kl_coef, gen, d, digests)
        if d.main:
            for n in [a for a in policy.adapters if a != "policy"]:
                policy.delete_adapter(n)
            for n in list(policy.heads):
                del policy.heads[n]
            policy.merge_adapter("policy")
        # (every rank: its random streams go into the checkpoint, which says how many wrote it;
        # saved by the main process alone, it said 1 and a resume restarted the others' streams)
        path = rundir.save_checkpoint(policy, cfg.out, cfg.max_steps, record, opt, tokenizer,
                                      extra_state=extra, d=d)
        if d.main:
            print(f"exported the merged policy to {path}")
    distributed.cleanup_dist()


if __name__ == "__main__":
    cfg = common.parse_config(Config)
    with distributed.ending_process(), common.user_errors():
        main(cfg)
