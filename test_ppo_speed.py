"""The faster PPO paths (issue 19) compute the same functions as the plain ones, up to float
rounding: a LoRA adapter merged into its frozen weight (MergedLoRA) gives autograd's outputs and
gradients; the last layer run at the kept positions only (keep) gives the full pass indexed; the
fused RMSNorm backward gives autograd's; and the rollout's policy log-probs and entropies, taken
from the sampler, equal a pass over the whole sequence (and a row whose tokens changed after
sampling gets that pass)."""
import os

import pytest
import torch

import bench
import ppo
from data import ImageCache
from model import FrozenRMSNorm, LLaVA, LoRAAdapter, LoRALinear, RMSNorm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lora_linear(slices, targets, r=3, alpha=5, seed=0):
    torch.manual_seed(seed)
    lin = LoRALinear(7, slices)
    torch.nn.init.normal_(lin.weight)
    lin.weight.requires_grad_(False)
    adapter = LoRAAdapter(7, {k: v for k, v in slices.items() if k in targets}, r, alpha, 0.0)
    for b in adapter.B.values():
        torch.nn.init.normal_(b)
    lin.lora["p"], lin.active = adapter, "p"
    return lin, adapter


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("slices,targets", [({"q": 8, "k": 4, "v": 4}, ("q", "v")),
                                            ({"gate": 6, "up": 6}, ("gate", "up")),
                                            ({"o": 5}, ("o",))])
def test_merged_lora_equals_the_plain_lora_path(slices, targets, split):
    lin, adapter = lora_linear(slices, targets)
    x = torch.randn(2, 5, 7, requires_grad=True)
    g = torch.randn(2, 5, sum(slices.values()))
    params = [x] + list(adapter.parameters())

    def outputs_and_grads(fn):
        for p in params:
            p.grad = None
        y = fn(x)
        y.backward(g)
        return y.detach(), [p.grad.clone() for p in params]
    merged = (lambda x: torch.cat(lin.forward_slices(x), -1)) if split else lin
    assert lin.mergeable(adapter, x)
    y1, g1 = outputs_and_grads(merged)
    lin.weight.requires_grad_(True)  # a trained weight cannot merge: the plain autograd path
    assert not lin.mergeable(adapter, x)
    y2, g2 = outputs_and_grads(lin)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lora_on_an_fp32_frozen_base_trains_under_autocast():
    """Under torch.autocast (bf16) the merged path is not taken: its backward multiplied bf16
    gradients by the fp32 merged weight (a dtype error), and the merged bf16 matmul would round
    the LoRA term away. The plain path's gradients are autocast's, as autograd takes them."""
    lin, adapter = lora_linear({"q": 8, "k": 4, "v": 4}, ("q", "v"))
    x = torch.randn(2, 5, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.cat(lin.forward_slices(x), -1)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())
    assert lin.mergeable(adapter, x)  # (outside autocast: merged again)


def test_merged_lora_with_a_frozen_adapter_gives_the_input_gradient_alone():
    lin, adapter = lora_linear({"q": 8, "k": 4, "v": 4}, ("q", "v"))
    adapter.requires_grad_(False)  # e.g. the reward adapter read while the policy trains
    x = torch.randn(2, 5, 7, requires_grad=True)
    g = torch.randn(2, 5, 16)
    lin(x).backward(g)
    merged = lin.weight.detach().clone()
    for name in ("q", "v"):
        a, b = lin.slice_range(name)
        merged[a:b] += adapter.scale * adapter.B[name] @ adapter.A[name]
    torch.testing.assert_close(x.grad, g @ merged, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in adapter.parameters())


def test_a_new_adapter_merges_to_the_base_weight_exactly():
    lin, adapter = lora_linear({"q": 8, "k": 4, "v": 4}, ("q", "k", "v"))
    with torch.no_grad():
        for b in adapter.B.values():
            b.zero_()  # B = 0: the policy at step 0 must equal the reference bit for bit
        x = torch.randn(3, 7)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))


def test_frozen_rmsnorm_backward_equals_autograd():
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    norm.weight.requires_grad_(False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    y = FrozenRMSNorm.apply(x, norm.weight, norm.eps)
    (dx,) = torch.autograd.grad(y, x, g)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    (want,) = torch.autograd.grad(norm.weight * h, x, g)
    assert torch.equal(y, norm.weight * h)
    torch.testing.assert_close(dx, want, atol=1e-5, rtol=1e-5)


def test_keep_equals_the_full_pass_indexed_forward_and_backward():
    torch.manual_seed(0)
    m = LLaVA.from_preset("tiny", image_token_id=511, pad_token_id=510).eval()
    m.add_adapter("p", 4, 8)
    with torch.no_grad():
        for _, lin in m.lora_linears():
            for b in lin.lora["p"].B.values():
                b.normal_(0, 0.1)
    m.set_adapter("p")
    c = m.config
    ids = torch.randint(3, 500, (3, 20))
    ids[:, 1:1 + c.num_image_tokens] = c.image_token_id
    pixels = torch.randn(3, 3, c.image_size, c.image_size)
    padded = torch.ones(3, 20, dtype=torch.long)
    padded[0, :3], padded[1, -4:] = 0, 0
    last = torch.tensor([[19], [15], [7]])
    for mask in (None, padded):
        with torch.no_grad():
            full = m(pixels, ids, mask, return_hidden=True)
            kept = m(pixels, ids, mask, return_hidden=True, keep=slice(5, -1))
            torch.testing.assert_close(kept, full[:, 5:-1], atol=1e-5, rtol=1e-5)
            kept = m(pixels, ids, mask, return_hidden=True, keep=last)[:, 0]
            want = full[torch.arange(3), last[:, 0]]
            torch.testing.assert_close(kept, want, atol=1e-5, rtol=1e-5)
    m.train()
    m.set_trainable(adapters=["p"])
    grads = []
    for keep in (slice(5, -1), None):
        m.zero_grad()
        h = m(pixels, ids, padded, return_hidden=True, keep=keep)
        (h if keep is not None else h[:, 5:-1]).sum().backward()
        grads.append([p.grad.clone() for p in m.adapter_parameters("p")])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def rollout_setup(tmp_path, plant_image_token, planted_length=6):
    """ppo.rollout on the tiny preset with random weights (bench's helpers); plant_image_token: the
    sampler is made to emit the image placeholder in row 1, with log-probs no pass would give, and
    row 1 ends after planted_length tokens."""
    cfg, dev = bench.Config(), torch.device("cpu")
    c = bench.model_config(cfg, "tiny")
    m = bench.build_ours(c, dev, torch.float32, 0)
    bench.add_roles(m, 4, 8)
    with torch.no_grad():
        for _, lin in m.lora_linears():
            for name in ("policy", "reward"):
                for b in lin.lora[name].B.values():
                    b.normal_(0, 0.1)
    g = torch.Generator().manual_seed(7)
    ids, _ = bench.prompt_ids(c, 4, 5, g, dev)
    records = bench.rollout_prompts(ids, c.image_size, os.path.join(tmp_path, "img"), g)
    pcfg = ppo.Config(max_new_tokens=6, minibatch_size=2, rm_input="tokens", out=str(tmp_path))
    if plant_image_token:
        generate = m.generate

        def planted(*a, **k):
            out = generate(*a, **k)
            out.tokens[1, 2] = c.image_token_id
            out.logprobs[1, 2:] = -123.0
            out.lengths[1], out.finished[1] = planted_length, False
            return out
        m.generate = planted
    with torch.no_grad():
        ro = ppo.rollout(m, m, bench.word_tokenizer(c), records, ImageCache(c.image_size), pcfg,
                         (False, "llava-rlhf", "vicuna_v1", False), 0.1,
                         torch.Generator().manual_seed(0), "k")
        with m.use_adapter("policy"):
            logp, entropy = ppo.response_logprobs(m, ro["feats"], ro["seq"], ro["mask"], ro["P"],
                                                  1.0)
    return ro, logp, entropy


@pytest.mark.parametrize("plant_image_token", [False, True])
def test_rollout_logprobs_from_the_sampler_equal_a_full_pass(tmp_path, plant_image_token):
    ro, logp, entropy = rollout_setup(tmp_path, plant_image_token)
    real = ro["rmask"].bool()
    torch.testing.assert_close(ro["logp"][real], logp[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ro["entropy"][real], entropy[real], atol=1e-5, rtol=0)
    assert torch.equal(ro["logp"][~real], torch.zeros_like(ro["logp"][~real]))
    if plant_image_token:  # read as <unk> by every role, and the policy's numbers are the pass's
        assert int(ro["seq"][1, ro["P"] + 2]) == 0
        assert torch.equal(ro["logp"][1], logp[1])


def test_rollout_rows_scored_by_a_pass_hold_zeros_past_their_end(tmp_path):
    """A row the full pass scores (an image placeholder read as <unk>; every row on bf16 CUDA)
    kept the pass's log-probs and entropies past its end, where every other row holds zeros: a
    pad's log-prob there ~90 nats below the reference's made k3's exp(ref - logp) inf (and the
    update's ratio), and inf x mask 0 is NaN: every advantage of the batch."""
    ro, logp, entropy = rollout_setup(tmp_path, plant_image_token=True, planted_length=4)
    real = ro["rmask"].bool()
    assert real[1].tolist() == [True] * 4 + [False] * 2
    assert torch.equal(ro["logp"][~real], torch.zeros_like(ro["logp"][~real]))
    assert torch.equal(ro["entropy"][~real], torch.zeros_like(ro["entropy"][~real]))
    assert torch.equal(ro["logp"][1, :4], logp[1, :4])  # (the pass's, where the row is real)
