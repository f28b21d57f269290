"""Where a PPO iteration's time goes at the `shapes` preset; what torch.compile does to decoding.

    OMP_NUM_THREADS=1 python docs/profile_shapes.py [update|update-compiled|decode|compile|cpp]

update: one PPO iteration of bench.py's `rollout_ppo` shape (64 prompts x 48 new tokens, LoRA r 16,
    2 epochs of 2 minibatches), random weights, with torch.profiler over the update: the operators
    by self time, and the matmul count and time (compare with the FLOPs and the matmul peak that
    bench.py measures). update-compiled: the same with each decoder layer run through
    torch.compile (inductor, dynamic shapes), forward and backward; the first iteration compiles.
decode: greedy decoding of 64 x 48 tokens, eager; ms per decode step (whole call minus a 1-token
    call, over 47 steps). compile: the same with generate(compile=True) (inductor on CPU);
    cpp: with inductor's C++ wrapper too. Each prints its first-call (compilation) time.
docs/speed-notes.md's "Where the two unmet targets stand" quotes these.
"""
import contextlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import distributed  # noqa: E402
import ppo  # noqa: E402
from data import ImageCache  # noqa: E402

BATCH, NEW_TOKENS, PROMPT_TEXT = 64, 48, 32


def shapes_model():
    preset = bench.Config(model="shapes")
    c = bench.model_config(preset, "shapes")
    return c, bench.build_ours(c, torch.device("cpu"), torch.float32, 0)


def profile_update(compiled=False):
    c, model = shapes_model()
    if compiled:  # (the update's memory-bound RoPE, SwiGLU and norm work, fused or not)
        for layer in model.language_model.layers:
            layer.compile(dynamic=True)
    bench.add_roles(model, 16, 16)
    model.set_trainable(adapters=["policy", "value"], heads=["value"])
    pol = model.adapter_parameters("policy")
    val = model.adapter_parameters("value") + list(model.heads["value"].parameters())
    opt = torch.optim.AdamW([{"params": pol}, {"params": val}], lr=1e-5)
    g = torch.Generator().manual_seed(7)
    tmp = tempfile.mkdtemp()
    ids, _ = bench.prompt_ids(c, BATCH, PROMPT_TEXT, g, torch.device("cpu"))
    records = bench.rollout_prompts(ids, c.image_size, os.path.join(tmp, "images"), g)
    tokenizer, images = bench.word_tokenizer(c), ImageCache(c.image_size)
    cfg = ppo.Config(max_new_tokens=NEW_TOKENS, minibatch_size=BATCH // 2, ppo_epochs=2,
                     rm_input="tokens", out=tmp, seed=0)
    rm = (False, "llava-rlhf", "vicuna_v1", False)  # (facts, wording, template, space): no facts
    d = distributed.Dist(device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for i in range(4):  # three warm iterations, then one profiled
        t0 = time.perf_counter()
        ro = ppo.rollout(model, model, tokenizer, records, images, cfg, rm, cfg.kl_coef, gen, "k")
        adv, ret = ppo.gae(ro["rewards"] * cfg.reward_scale, ro["values"], cfg.gamma, cfg.lam)
        adv = ppo.whiten(adv, ro["rmask"], d)
        t1 = time.perf_counter()
        profiler = torch.profiler.profile() if i == 3 else contextlib.nullcontext()
        with profiler:
            ppo.ppo_update(model, model, ro, adv, ret, opt, pol + val, cfg, d, 0)
        print(f"iteration {i}: rollout {t1 - t0:.3f} s, update {time.perf_counter() - t1:.3f} s"
              + (" (profiled)" if i == 3 else ""))
    table = profiler.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=20))
    mm = [e for e in table if e.key == "aten::mm"]
    if mm:
        print(f"aten::mm: {mm[0].count} calls, {mm[0].self_cpu_time_total / 1e3:.1f} ms")


def time_decode(mode):
    if mode == "cpp":
        import torch._inductor.config as inductor_config
        inductor_config.cpp_wrapper = True
    c, model = shapes_model()
    model.add_adapter("sft", 16, 16)
    g = torch.Generator().manual_seed(4 + BATCH)
    ids, pix = bench.prompt_ids(c, BATCH, PROMPT_TEXT, g, torch.device("cpu"))

    def run(n):
        with torch.no_grad():
            return model.generate(pix, ids, None, max_new_tokens=n, eos_token_id=-1,
                                  compile=mode != "decode").tokens
    t0 = time.perf_counter()
    run(NEW_TOKENS)
    run(1)
    print(f"{mode}: first calls {time.perf_counter() - t0:.1f} s")
    for _ in range(3):
        t0 = time.perf_counter()
        run(NEW_TOKENS)
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(1)
        prefill = time.perf_counter() - t0
        step_ms = 1e3 * (whole - prefill) / (NEW_TOKENS - 1)
        print(f"{mode}: {BATCH} x {NEW_TOKENS} in {1e3 * whole:.1f} ms, prefill "
              f"{1e3 * prefill:.1f} ms, {step_ms:.2f} ms per decode step")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "update"
    if what not in ("update", "update-compiled", "decode", "compile", "cpp"):
        print(f"usage: {sys.argv[0]} [update|update-compiled|decode|compile|cpp], got {what!r}",
              file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if what.startswith("update"):
        profile_update(compiled=what == "update-compiled")
    else:
        time_decode(what)
