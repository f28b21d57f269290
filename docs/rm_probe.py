"""Diagnosis of the lab's Fact-RLHF claim (docs/lab-notes.md, "Why PPO against the facts RM
hallucinates no less"): how each reward model of a finished lab scores the held-out test
descriptions of the SFT model and of both PPO policies (eval's CHAIR answers), against the
oracle's count of absent shapes named. Per seed and RM: mean and spread of the scores, the share
of descriptions that hallucinate, the AUC of clean over hallucinating descriptions, the
standardized score gap and the correlation with length.

    python docs/rm_probe.py data/shapes-seed2 runs/lab-seed2 0 1 2   # WORLD LAB_OUT SEED...
"""
import json
import os
import random
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
import common  # noqa: E402
import oracle  # noqa: E402
import shapes  # noqa: E402
from checkpoint import resolve_checkpoint  # noqa: E402
from data import ImageCache, collate, normalize, reward_item  # noqa: E402
from ppo import reward_settings  # noqa: E402

if len(sys.argv) < 4 or not all(a.isdigit() for a in sys.argv[3:]):
    common.fail("usage: python docs/rm_probe.py WORLD LAB_OUT SEED... (seeds: whole numbers)")
world, lab, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]


def answers(run, questions, by_file):
    d = os.path.join(lab, run, "eval")
    found = os.listdir(d) if os.path.isdir(d) else []
    subs = [x for x in found if os.path.isdir(os.path.join(d, x))]
    if not subs:
        common.fail(f"{d}: no eval answers (run the lab to the end first)")
    rows = [json.loads(line) for line in open(os.path.join(d, subs[0], "answers_chair.jsonl"))]
    out = []
    for r in rows:
        q = questions[r["id"]]
        truth = by_file[q["image"]]
        h = oracle.oracle(r["answer"], truth)["num_hallucinated_objects"]  # CHAIR's objects
        out.append(dict(image=q["image"], prompt=q["conversations"][0]["value"],
                        answer=r["answer"], halluc=h, words=len(r["answer"].split())))
    return out


def load_rm(rm_dir):
    """(model, tokenizer, its run settings: facts, wording, template, prompt_space), loaded once
    per RM."""
    rm_dir = resolve_checkpoint(rm_dir)
    model, tok = common.load_model_and_tokenizer(rm_dir, policy=False)  # (a reward model)
    return model.eval(), tok, reward_settings(rm_dir)


def score(rm, rows, captions):
    model, tok, (facts, wording, template, space) = rm
    images = ImageCache(model.config.image_size)
    out = []
    with torch.no_grad(), model.use_adapter("reward"):
        for s in range(0, len(rows), 64):
            chunk = rows[s:s + 64]
            items = [reward_item(tok, model.config, [{"from": "human", "value": r["prompt"]}],
                                 r["answer"],
                                 captions[r["image"]] if facts else None,
                                 random.Random(f"probe-{s + i}"), template, 1 << 30, wording,
                                 space)
                     for i, r in enumerate(chunk)]
            b = collate(items, tok.pad_token_id, side="right")
            pix = torch.stack([normalize(images.unit(os.path.join(world, r["image"])))
                               for r in chunk])
            feats = model.encode_images(pix)
            out += common.score_sequences(model, "reward", b["input_ids"], b["attention_mask"],
                                          feats).float().tolist()
    return out


def auc(pos, neg):
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def corr(x, y):
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sx = sum((a - mx) ** 2 for a in x) ** 0.5
    sy = sum((b - my) ** 2 for b in y) ** 0.5
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / (sx * sy)


def main():
    by_file = shapes.load_world(world)["by_file"]
    questions = {q["id"]: q for q in json.load(open(os.path.join(world, "test_describe.json")))}
    captions = json.load(open(os.path.join(world, "image_to_caption.json")))
    policies = ["sft"] + [f"rlhf/ppo-{v}-s{s}" for s in seeds for v in ("facts", "no-facts")]
    rows = {p: answers(p, questions, by_file) for p in policies}
    for s in seeds:
        print(f"=== seed {s}")
        for rm in ("facts", "nofacts"):
            reward_model = load_rm(os.path.join(lab, f"rlhf/rm-{rm}-s{s}"))
            line = [f"RM {rm:7s}"]
            for p in ["sft", f"rlhf/ppo-facts-s{s}", f"rlhf/ppo-no-facts-s{s}"]:
                sc = score(reward_model, rows[p], captions)
                h = [r["halluc"] for r in rows[p]]
                clean = [x for x, k in zip(sc, h) if k == 0]
                bad = [x for x, k in zip(sc, h) if k > 0]
                sd = statistics.pstdev(sc)
                gap = (statistics.fmean(clean) - statistics.fmean(bad)) / sd if clean and bad else 0
                words = [r["words"] for r in rows[p]]
                line.append(f"{p.split('/')[-1]}: mean {statistics.fmean(sc):+.2f} sd {sd:.2f} "
                            f"halluc share {len(bad) / len(h):.2f} AUC(clean>halluc) "
                            f"{auc(clean, bad):.3f} gap/sd {gap:+.2f} r(words) "
                            f"{corr(sc, words):+.2f}")
            print("\n  ".join(line))


with common.user_errors():  # a missing file or checkpoint: one line, exit code 2
    main()
