"""factalign test suite (pytest). Tiny random models; transformers is the reference implementation."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from checkpoint import (export_llava_hf, export_peft_adapter, load_checkpoint,  # noqa: E402
                        save_checkpoint_files)
from model import CheckpointError, LLaVA, ModelConfig  # noqa: E402

ATOL = 1e-4
IMG = 28          # tiny CLIP: 28 px / 14 px patches -> 4 patch tokens
VOCAB = 100
IMAGE_ID = 99


# ----------------------------------------------------------------------------------------
# reference models from transformers, written with save_pretrained
# ----------------------------------------------------------------------------------------

def hf_vision_config():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=IMG, patch_size=14, projection_dim=16, layer_norm_eps=1e-5)


def hf_text_config(kv_heads=2):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_llava(projector="gelu", seed=0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=hf_vision_config(), text_config=hf_text_config(), image_token_index=IMAGE_ID,
                      projector_hidden_act=projector, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=4, pad_token_id=0)
    m = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random weights big enough that errors would show
        for p in m.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """llava-hf directories (both projectors) written by transformers' own save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for proj in ("gelu", "linear"):
        m = hf_llava(proj)
        m.save_pretrained(root / proj)
        out[proj] = (m, str(root / proj))
    return out


def inputs(batch=2, text=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, IMG, IMG, generator=g)
    ids = torch.randint(3, VOCAB - 1, (batch, text), generator=g)
    ids = torch.cat([ids[:, :1], torch.full((batch, 4), IMAGE_ID), ids[:, 1:]], 1)  # bos-ish, 4 image tokens, text
    return pixels, ids


def hf_logits(m, pixels, ids, mask=None):
    with torch.no_grad():
        return m(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits


# ----------------------------------------------------------------------------------------
# model parity
# ----------------------------------------------------------------------------------------

def test_clip_encoder_matches_transformers(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM
    torch.manual_seed(0)
    clip = CLIPVisionModel(hf_vision_config()).eval()
    clip.save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(hf_text_config()).save_pretrained(tmp_path / "llama")
    ours = load_checkpoint(tmp_path / "llama", vision_tower=str(tmp_path / "clip")).eval()
    assert len(ours.vision_tower.encoder.layers) == 2  # the last CLIP layer is never built
    pixels = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        ref = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = ours.vision_tower(pixels)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_decoder_matches_llama_with_gqa_and_padding(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf_text_config(kv_heads=2)).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    llama.save_pretrained(tmp_path / "llama")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    ours = load_checkpoint(tmp_path / "llama", vision_tower=str(tmp_path / "clip")).eval()
    assert ours.config.kv_heads == 2 and ours.config.heads == 4
    ids = torch.randint(3, VOCAB - 1, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ref = llama(input_ids=ids).logits
        got = ours(None, ids)
        ref_pad = llama(input_ids=ids, attention_mask=mask).logits
        got_pad = ours(None, ids, attention_mask=mask)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_pad[1, 3:], ref_pad[1, 3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_pad[0], ref_pad[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("projector", ["gelu", "linear"])
def test_llava_matches_transformers(hf_dirs, projector):
    hf, path = hf_dirs[projector]
    ours = load_checkpoint(path).eval()
    assert ours.config.projector == ("mlp2x_gelu" if projector == "gelu" else "linear")
    assert ours.config.num_image_tokens == 4 and ours.config.image_token_id == IMAGE_ID
    pixels, ids = inputs()
    torch.testing.assert_close(ours(pixels, ids), hf_logits(hf, pixels, ids), atol=ATOL, rtol=0)


def _rewrite_keys(src_dir, dst_dir, rename, config=None):
    from safetensors.torch import load_file, save_file
    os.makedirs(dst_dir, exist_ok=True)
    state = load_file(os.path.join(src_dir, "model.safetensors"))
    new = {}
    for k, v in state.items():
        nk = rename(k)
        if nk is not None:
            new[nk] = v
    save_file(new, os.path.join(dst_dir, "model.safetensors"))
    cfg = json.load(open(os.path.join(src_dir, "config.json"))) if config is None else config
    json.dump(cfg, open(os.path.join(dst_dir, "config.json"), "w"))
    return new


def test_llava_hub_and_in_memory_layouts_load(hf_dirs, tmp_path):
    hf, path = hf_dirs["gelu"]
    pixels, ids = inputs()
    ref = hf_logits(hf, pixels, ids)

    def hub(k):  # the hub layout: vision_tower.vision_model.*, language_model.model.*, language_model.lm_head.*
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + k[len("vision_tower."):]
        return k

    def in_memory(k):  # transformers 5 module names: model.language_model.*, model.vision_tower.*, lm_head.*
        if k.startswith("language_model.model."):
            return "model.language_model." + k[len("language_model.model."):]
        if k.startswith("language_model.lm_head."):
            return "lm_head." + k[len("language_model.lm_head."):]
        return "model." + k

    for name, fn in (("hub", hub), ("mem", in_memory)):
        keys = _rewrite_keys(path, tmp_path / name, fn)
        if name == "hub":
            assert any(k.startswith("vision_tower.vision_model.") for k in keys)
        ours = load_checkpoint(tmp_path / name).eval()
        torch.testing.assert_close(ours(pixels, ids), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("projector", ["gelu", "linear"])
def test_export_hf_loads_in_transformers(hf_dirs, tmp_path, projector):
    from transformers import LlavaForConditionalGeneration
    _, path = hf_dirs[projector]
    ours = load_checkpoint(path).eval()
    export_llava_hf(ours, tmp_path / "export")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    pixels, ids = inputs(seed=5)
    torch.testing.assert_close(hf_logits(theirs, pixels, ids), ours(pixels, ids), atol=ATOL, rtol=0)
    # and a model of ours made from scratch (not loaded) exports too
    fresh = LLaVA(ModelConfig(image_size=IMG, patch_size=14, vision_hidden=32, vision_intermediate=64, vision_layers=3,
                              vision_heads=4, projector="linear" if projector == "linear" else "mlp2x_gelu",
                              vocab_size=VOCAB, hidden=32, intermediate=72, layers=2, heads=4, kv_heads=2,
                              image_token_id=IMAGE_ID, pad_token_id=0)).eval()
    export_llava_hf(fresh, tmp_path / "fresh")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "fresh").eval()
    torch.testing.assert_close(hf_logits(theirs, pixels, ids), fresh(pixels, ids), atol=ATOL, rtol=0)


def _to_original_llava(k, keep_vision=True):
    """llava-hf key -> original LLaVA (LlavaLlamaForCausalLM) key."""
    if k.startswith("vision_tower."):
        if not keep_vision:
            return None
        rest = k[len("vision_tower."):]
        rest = rest if rest.startswith("vision_model.") else "vision_model." + rest
        return "model.vision_tower.vision_tower." + rest
    if k.startswith("multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + k.rsplit(".", 1)[1]
    if k.startswith("multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + k.rsplit(".", 1)[1]
    if k.startswith("language_model.model."):
        return "model." + k[len("language_model.model."):]
    if k.startswith("language_model.lm_head."):
        return "lm_head." + k.rsplit(".", 1)[1]
    raise AssertionError(k)


@pytest.mark.parametrize("with_vision", [True, False])
def test_original_llava_layout_loads_and_matches(hf_dirs, tmp_path, with_vision):
    from transformers import CLIPVisionModel
    hf, path = hf_dirs["gelu"]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    cfg = dict(hf_cfg["text_config"], architectures=["LlavaLlamaForCausalLM"], model_type="llava",
               mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", mm_use_im_start_end=False, image_aspect_ratio="pad",
               mm_vision_tower=str(tmp_path / "clip"))
    _rewrite_keys(path, tmp_path / "orig", lambda k: _to_original_llava(k, with_vision), config=cfg)
    clip = CLIPVisionModel(hf_vision_config())
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path / "clip")
    if with_vision:  # the weights must then come from the LLaVA checkpoint, only the config from the CLIP dir
        os.remove(tmp_path / "clip" / "model.safetensors")
    ours = load_checkpoint(tmp_path / "orig").eval()
    assert ours.config.image_token_id == -200  # LLaVA's IMAGE_TOKEN_INDEX
    pixels, ids = inputs()
    ref = hf_logits(hf, pixels, ids)
    got = ours(pixels, ids.masked_fill(ids == IMAGE_ID, -200))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_llama_plus_clip_dirs_start_sft_with_fresh_projector(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM
    LlamaForCausalLM(hf_text_config()).save_pretrained(tmp_path / "llama")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="CLIP"):
        load_checkpoint(tmp_path / "llama")
    ours = load_checkpoint(tmp_path / "llama", vision_tower=str(tmp_path / "clip"))
    assert ours.projector.linear_1.weight.shape == (32, 32) and ours.projector.linear_1.weight.std() > 0


# ----------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------

def greedy_without_cache(model, pixels, ids, n):
    out = ids
    for _ in range(n):
        nxt = model(pixels, out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
    return out[:, ids.shape[1]:]


def test_greedy_cache_equals_no_cache_and_transformers(hf_dirs):
    hf, path = hf_dirs["gelu"]
    ours = load_checkpoint(path).eval()
    pixels, ids = inputs(batch=1)
    n = 10
    cached = ours.generate(pixels, ids, max_new_tokens=n, eos_token_id=-1).tokens
    assert torch.equal(cached, greedy_without_cache(ours, pixels, ids, n))
    ref = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=n)[:, ids.shape[1]:]
    assert torch.equal(cached, ref)


def test_left_padded_batch_equals_one_by_one(hf_dirs):
    _, path = hf_dirs["gelu"]
    ours = load_checkpoint(path).eval()
    pixels, _ = inputs(batch=3)
    prompts = [inputs(batch=1, text=t, seed=t)[1][0] for t in (3, 8, 5)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    batch = ours.generate(pixels, ids, mask, max_new_tokens=8, eos_token_id=-1, return_logprobs=True)
    for i, p in enumerate(prompts):
        one = ours.generate(pixels[i:i + 1], p[None], max_new_tokens=8, eos_token_id=-1, return_logprobs=True)
        assert torch.equal(batch.tokens[i], one.tokens[0])
        torch.testing.assert_close(batch.logprobs[i], one.logprobs[0], atol=1e-5, rtol=0)


def test_generate_stops_at_eos_and_returns_logprobs(hf_dirs):
    _, path = hf_dirs["gelu"]
    ours = load_checkpoint(path).eval()
    pixels, ids = inputs(batch=2)
    free = ours.generate(pixels, ids, max_new_tokens=6, eos_token_id=-1)
    seq = free.tokens[0].tolist()
    j = next(j for j in range(1, 6) if seq[j] not in seq[:j])  # pretend row 0's first new-token value there is EOS
    out = ours.generate(pixels, ids, max_new_tokens=6, eos_token_id=seq[j], pad_token_id=0, return_logprobs=True)
    assert out.lengths[0] == j + 1 and out.finished[0]
    assert torch.all(out.tokens[0, j + 1:] == 0) and torch.all(out.logprobs[0, j + 1:] == 0)
    # log-probs are those of the full forward pass at the sampled tokens
    full = torch.log_softmax(ours(pixels[:1], torch.cat([ids[:1], out.tokens[:1, :j + 1]], 1)).float(), -1)
    T = ids.shape[1]
    ref = full[0, T - 1:T + j].gather(-1, out.tokens[0, :j + 1, None])[:, 0]
    torch.testing.assert_close(out.logprobs[0, :j + 1], ref, atol=1e-5, rtol=0)


def test_sampling_is_reproducible_with_a_generator_and_top_p(hf_dirs):
    _, path = hf_dirs["gelu"]
    ours = load_checkpoint(path).eval()
    pixels, ids = inputs(batch=2)
    a = ours.generate(pixels, ids, max_new_tokens=6, temperature=1.0, top_p=0.9,
                      generator=torch.Generator().manual_seed(3), eos_token_id=-1)
    b = ours.generate(pixels, ids, max_new_tokens=6, temperature=1.0, top_p=0.9,
                      generator=torch.Generator().manual_seed(3), eos_token_id=-1)
    assert torch.equal(a.tokens, b.tokens)
    tiny_p = ours.generate(pixels, ids, max_new_tokens=6, temperature=1.0, top_p=1e-6,
                           generator=torch.Generator().manual_seed(3), eos_token_id=-1)
    greedy = ours.generate(pixels, ids, max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(tiny_p.tokens, greedy.tokens)  # top-p -> 0 keeps only the argmax


# ----------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------

def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(image_size=IMG, patch_size=14, vision_hidden=32, vision_intermediate=64, vision_layers=3,
               vision_heads=4, vocab_size=VOCAB, hidden=32, intermediate=72, layers=2, heads=4, kv_heads=2,
               image_token_id=IMAGE_ID, pad_token_id=0)
    cfg.update(kw)
    return LLaVA(ModelConfig(**cfg)).eval()


def randomize_adapter(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_fresh_merge_none_and_isolation():
    m = tiny_model()
    pixels, ids = inputs()
    with torch.no_grad():
        base = m(pixels, ids)
        m.add_adapter("a", r=4, alpha=8)
        m.set_adapter("a")
        torch.testing.assert_close(m(pixels, ids), base, atol=0, rtol=0)  # B = 0: a fresh adapter changes nothing
        randomize_adapter(m, "a", 1)
        with_a = m(pixels, ids)
        assert (with_a - base).abs().max() > 1e-3
        with m.no_adapter():
            torch.testing.assert_close(m(pixels, ids), base, atol=0, rtol=0)
        m.add_adapter("b", r=2, alpha=2, targets=("q", "v"))
        randomize_adapter(m, "b", 2)
        m.set_adapter("b")
        with_b = m(pixels, ids)
        m.set_adapter("a")
        torch.testing.assert_close(m(pixels, ids), with_a, atol=0, rtol=0)  # b does not leak into a
        m.merge_adapter("a")
        m.set_adapter(None)
        torch.testing.assert_close(m(pixels, ids), with_a, atol=1e-5, rtol=0)
        m.set_adapter("b")  # b still applies on top of the (now merged) base
        assert (m(pixels, ids) - with_b).abs().max() > 1e-4


def test_lora_only_adapter_parameters_get_gradients():
    m = tiny_model().train()
    m.add_adapter("policy", r=4, alpha=8)
    m.add_head("value")
    m.set_adapter("policy")
    m.set_trainable(adapters=["policy"], heads=["value"], projector=True)
    pixels, ids = inputs()
    h = m(pixels, ids, return_hidden=True)
    (m.logits(h).logsumexp(-1).mean() + m.heads["value"](h).mean()).backward()
    for n, p in m.named_parameters():
        trainable = ".lora.policy." in n or n.startswith("heads.value") or n.startswith("projector.")
        assert p.requires_grad == trainable, n
        if not trainable:
            assert p.grad is None, n
    assert all(p.grad is not None for p in m.adapter_parameters("policy"))
    assert all(p.dtype == torch.float32 for p in m.adapter_parameters("policy"))


def test_lora_fp32_on_bf16_base_and_checkpointing_grads_match():
    m = tiny_model()
    m.add_adapter("a", r=4, alpha=8)
    randomize_adapter(m, "a", 3)
    m.set_adapter("a")
    m.set_trainable(adapters=["a"])
    pixels, ids = inputs()
    grads = []
    for ckpt in (False, True):
        m.train()
        m.gradient_checkpointing = ckpt
        for p in m.parameters():
            p.grad = None
        m(pixels, ids).float().pow(2).mean().backward()
        grads.append([p.grad.clone() for p in m.adapter_parameters("a")])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)
    m.eval().cast_base(torch.bfloat16)
    assert m.language_model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m.adapter_parameters("a"))
    with torch.no_grad():
        assert torch.isfinite(m(pixels, ids)).all()


def test_peft_export_applies_in_transformers(tmp_path):
    """The PEFT adapter's keys name real modules of LlavaForConditionalGeneration, and merging
    W += (alpha/r) B A there reproduces our adapter's logits."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    m = tiny_model()
    m.add_adapter("policy", r=4, alpha=16, targets=("q", "k", "v", "o", "gate", "up", "down"))
    randomize_adapter(m, "policy", 4)
    export_llava_hf(m, tmp_path / "hf")
    export_peft_adapter(m, tmp_path / "peft", "policy")
    cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    state = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    modules = dict(hf.named_modules())
    with torch.no_grad():
        for k in state:
            if k.endswith("lora_A.weight"):
                mod = modules[k[len("base_model.model."):-len(".lora_A.weight")]]
                B = state[k.replace("lora_A", "lora_B")]
                mod.weight += cfg["lora_alpha"] / cfg["r"] * B @ state[k]
    m.set_adapter("policy")
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, pixels, ids), m(pixels, ids), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------

def test_checkpoint_round_trip_is_exact_with_adapters_and_heads(tmp_path):
    m = tiny_model()
    m.add_adapter("reward", r=4, alpha=8)
    randomize_adapter(m, "reward", 5)
    m.add_head("reward")
    with torch.no_grad():
        m.heads["reward"].weight.normal_()
    m.set_adapter("reward")
    save_checkpoint_files(m, tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck").eval()
    assert back.active_adapter == "reward" and "reward" in back.heads
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # an adapter-only checkpoint that points at its base
    save_checkpoint_files(m, tmp_path / "base_only")
    save_checkpoint_files(m, tmp_path / "adapter_only", base=tmp_path / "base_only")
    assert not os.path.exists(tmp_path / "adapter_only" / "model.safetensors")
    again = load_checkpoint(tmp_path / "adapter_only").eval()
    pixels, ids = inputs()
    with torch.no_grad():
        assert torch.equal(again(pixels, ids), m(pixels, ids))


def test_checkpoint_of_another_shape_names_key_and_shapes(tmp_path):
    save_checkpoint_files(tiny_model(), tmp_path / "a")
    cfg = json.load(open(tmp_path / "a" / "config.json"))
    cfg["model"]["intermediate"] = 80
    json.dump(cfg, open(tmp_path / "a" / "config.json", "w"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "a")
    msg = str(e.value)
    assert "model.safetensors" in msg and "gate_proj.weight" in msg and "(72, 32)" in msg and "(80, 32)" in msg
    assert "\n" not in msg


def test_truncated_or_missing_weights_give_clear_errors(tmp_path):
    save_checkpoint_files(tiny_model(), tmp_path / "a")
    f = tmp_path / "a" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|corrupt)"):
        load_checkpoint(tmp_path / "a")
    f.unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(tmp_path / "a")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_checkpoint_cli_errors_are_one_line(tmp_path):
    """Through a script: a bad checkpoint ends with one line and exit code 2, not a traceback."""
    save_checkpoint_files(tiny_model(), tmp_path / "a")
    f = tmp_path / "a" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    code = ("import sys; sys.path.insert(0, %r)\nfrom common import user_errors\nfrom checkpoint import load_checkpoint\n"
            "with user_errors():\n    load_checkpoint(%r)\n") % (HERE, str(tmp_path / "a"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "model.safetensors" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------
# data: template, tokenization, labels, images, collation
# ----------------------------------------------------------------------------------------

from conftest import run_cli, run_script  # noqa: E402
import data  # noqa: E402

SYS_V = ("A chat between a curious user and an artificial intelligence assistant. "
         "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYS_L = ("A chat between a curious human and an artificial intelligence assistant. "
         "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CONV = [{"from": "human", "value": "<image>\nIs there a circle?"}, {"from": "gpt", "value": "Yes, there is a circle."},
        {"from": "human", "value": "How many squares are there?"}, {"from": "gpt", "value": "There are two squares."}]


def test_template_strings_are_llavas():
    text, spans = data.render(CONV, "vicuna_v1")
    assert text == (SYS_V + " USER: <image>\nIs there a circle? ASSISTANT: Yes, there is a circle.</s>"
                     "USER: How many squares are there? ASSISTANT: There are two squares.</s>")
    assert [text[a:b] for a, b in spans] == ["Yes, there is a circle.</s>", "There are two squares.</s>"]
    assert data.render(CONV[:1], "llava_v1")[0] == SYS_L + " USER: <image>\nIs there a circle? ASSISTANT:"
    assert data.render(CONV[:3])[0].endswith("</s>USER: How many squares are there? ASSISTANT:")


def llava_reference_preprocess(tok, turns, legacy):
    """LLaVA's preprocess_v1 (llava/train/train.py) written out from its definition: tokenizer_image_token
    over the whole prompt (chunks around <image> tokenized separately, IMAGE_TOKEN_INDEX between them),
    then per round (split at '</s>') the instruction part up to 'ASSISTANT: ' is masked. The text after
    <image> is tokenized as transformers' LlavaProcessor tokenizes it (the whole text, <image> a special
    token), so an exported model sees what training saw; with a legacy Llama tokenizer this is exactly
    tokenizer_image_token's split-and-tokenize (a '▁' after <image>), with the Shapes tokenizer ('▁' only
    at the start of a text) it is '\nIs', not '▁\nIs'."""
    def tokenizer_image_token(prompt):
        return [-200 if t == tok.convert_tokens_to_ids("<image>") else t for t in tok(prompt).input_ids]
    prompt = data.render(turns)[0]
    ids = tokenizer_image_token(prompt)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:1] = [-100]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou))
        instruction_len = len(tokenizer_image_token(parts[0])) - 2
        if i != 0 and not legacy:  # LLaVA's fix for tokenizers that add no prefix space after </s>
            round_len -= 1
            instruction_len -= 1
        target[cur:cur + instruction_len] = [-100] * instruction_len
        cur += round_len
    target[cur:] = [-100] * (len(target) - cur)
    return ids, target


def test_labels_match_llava_preprocess(tiny_world):
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    legacy = len(tok("USER: x").input_ids) == len(tok("</s>USER: x").input_ids) - 1
    digits = [CONV[0], {"from": "gpt", "value": "3 circles."}, CONV[2], {"from": "gpt", "value": "\n(A) two."}]
    for turns in (CONV, CONV[:2], digits):  # answers that start with a digit, a newline, a '(': a lone '▁' first
        got = data.tokenize_conversation(tok, turns, image_token_id=4, num_image_tokens=9, max_len=4096)
        ids, labels = got["input_ids"].tolist(), got["labels"].tolist()
        first = ids.index(4)
        assert ids[first:first + 9] == [4] * 9 and labels[first:first + 9] == [-100] * 9
        ids = ids[:first] + [-200] + ids[first + 9:]  # LLaVA keeps one placeholder
        labels = labels[:first] + [-100] + labels[first + 9:]
        ref_ids, ref_labels = llava_reference_preprocess(tok, turns, legacy)
        assert ids == ref_ids
        assert labels == ref_labels
        learned = tok.decode([t for t in labels if t != -100])
        assert "circle" in learned and "USER" not in learned and "ASSISTANT" not in learned
        after = ids.index(tok.convert_tokens_to_ids("▁ASSISTANT:")) + 1  # LLaVA learns the token after 'ASSISTANT:'
        assert labels[after] == ids[after] and (turns is not digits or tok.convert_ids_to_tokens(ids[after]) == "▁")
        assert sum(1 for t in labels if t == tok.eos_token_id) == sum(t["from"] == "gpt" for t in turns)


def test_plain_template_matches_llava_preprocess_plain(tiny_world):
    """LLaVA's stage-1 format (preprocess_plain): "<image>" + caption + "\n", the human text dropped,
    everything after the image learned."""
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    turns = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A red circle."}]
    assert data.render(turns, "plain") == ("<image>A red circle.\n", [(7, 21)])
    got = data.tokenize_conversation(tok, turns, image_token_id=4, num_image_tokens=9, template="plain")
    ids, labels = got["input_ids"].tolist(), got["labels"].tolist()
    caption = tok("<image>A red circle.\n").input_ids[2:]  # after BOS and <image>, as LlavaProcessor
    ref_ids = [tok.bos_token_id] + [4] * 9 + caption
    assert ids == ref_ids and labels == [-100] * 10 + caption
    with pytest.raises(ValueError):
        data.render(CONV, "plain")  # one caption per image


def test_train_on_last_and_truncation(tiny_world):
    tok = data.load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    last = data.tokenize_conversation(tok, CONV, 4, 9, train_on="last")
    learned = tok.decode([t for t in last["labels"].tolist() if t != -100])
    assert "two squares" in learned and "circle" not in learned
    full = data.tokenize_conversation(tok, CONV, 4, 9)
    n = len(full["input_ids"])
    first_label = next(i for i, l in enumerate(full["labels"].tolist()) if l != -100)
    cut = data.tokenize_conversation(tok, CONV, 4, 9, max_len=first_label + 2)
    assert len(cut["input_ids"]) == first_label + 2 and torch.equal(cut["input_ids"], full["input_ids"][:first_label + 2])
    assert data.tokenize_conversation(tok, CONV, 4, 9, max_len=first_label) is None  # no answer token left: dropped
    assert data.tokenize_conversation(tok, CONV, 4, 9, max_len=5) is None  # would cut the image tokens
    assert n > first_label + 2


def test_image_preprocessing_matches_clip_processor():
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))  # not square: padded
    ours = data.preprocess_image(img, 42)
    ref_proc = CLIPImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    ref = ref_proc(data.expand_to_square(img), return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 42, 42)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    padded = data.expand_to_square(img)
    assert padded.size == (50, 50) and padded.getpixel((0, 0)) == tuple(int(m * 255) for m in data.CLIP_MEAN)
    assert padded.getpixel((25, 10 + 15)) == img.getpixel((25, 15))  # centred: 10 rows of padding on top


def test_collate_pads_right_for_training_and_left_for_generation():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.ones(3, 2, 2)}
    b = {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}
    r = data.collate([a, b], pad_id=3)
    assert r["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]] and r["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert r["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]] and r["pixel_values"].shape == (1, 3, 2, 2)
    l = data.collate([a, b], pad_id=3, side="left")
    assert l["input_ids"].tolist() == [[5, 6, 7], [3, 3, 8]] and l["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ----------------------------------------------------------------------------------------
# common: flags, schedule, data order, checkpoints
# ----------------------------------------------------------------------------------------

import common  # noqa: E402
import dataclasses  # noqa: E402


@dataclasses.dataclass
class _Flags:
    lr: float = 0.1            # learning rate
    facts: bool = True         # use facts
    targets: tuple = ("q", "v")  # targets
    name: str = "x"            # a name


def test_parse_config_types_and_errors(capsys):
    c = common.parse_config(_Flags, ["--lr", "2e-3", "--facts", "false", "--targets", "q,k", "o"])
    assert c == _Flags(lr=2e-3, facts=False, targets=("q", "k", "o"), name="x")
    for argv, needle in ((["--lr", "fast"], "expected float"), (["--nope", "1"], "unrecognized arguments"),
                         (["--facts", "maybe"], "expected true or false")):
        with pytest.raises(SystemExit) as e:
            common.parse_config(_Flags, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_cosine_schedule_and_batch_order():
    assert common.cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert common.cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert common.cosine_lr(100, 100, 1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert common.cosine_lr(55, 100, 1.0, warmup=10) == pytest.approx(0.5)
    one = common.batch_indices(7, 50, 8, seed=3)
    two = common.batch_indices(7, 50, 8, seed=3, rank=0, world=2) + common.batch_indices(7, 50, 8, seed=3, rank=1, world=2)
    assert one == two and len(set(one)) == 8
    epoch = [i for s in range(6) for i in common.batch_indices(s, 50, 8, seed=3)]
    assert len(set(epoch)) == 48  # no repeats inside an epoch


def test_model_presets_have_real_sizes():
    with torch.device("meta"):
        for name, billions in (("llava-7b", 7.06), ("llava-13b", 13.35)):
            m = LLaVA.from_preset(name)
            n = sum(p.numel() for p in m.parameters()) / 1e9
            assert abs(n - billions) < 0.05, (name, n)  # CLIP-L/14-336 (last layer never built) + Vicuna
            assert m.config.num_image_tokens == 576


# ----------------------------------------------------------------------------------------
# sft.py
# ----------------------------------------------------------------------------------------

def test_sft_cli_writes_loadable_checkpoint_and_resume_continues(tiny_world, tiny_sft, tmp_path):
    from checkpoint import latest_checkpoint
    ck = latest_checkpoint(tiny_sft)
    assert ck.endswith("checkpoint-000003")
    m = load_checkpoint(tiny_sft)  # a run dir resolves to its newest checkpoint
    assert os.path.exists(os.path.join(ck, "tokenizer.json")) and os.path.exists(os.path.join(ck, "trainer_state.pt"))
    lines = [json.loads(l) for l in open(os.path.join(tiny_sft, "metrics.jsonl"))]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3]
    # resume: the 3-step run continued to 5 steps equals an uninterrupted 5-step run, bitwise
    args = ["--model", "tiny", "--world", tiny_world, "--batch_size", "8", "--align_steps", "1", "--report", "false",
            "--save_every", "3"]
    out = str(tmp_path / "resumed")
    shutil.copytree(tiny_sft, out)
    code, stdout, err = run_cli("sft", args + ["--max_steps", "5", "--out", out, "--resume", "true"])
    assert code == 0, err
    assert "resumed from" in stdout and "at step 3" in stdout
    code, _, err = run_cli("sft", args + ["--max_steps", "5", "--out", str(tmp_path / "straight")])
    assert code == 0, err
    a = load_checkpoint(out).state_dict()
    b = load_checkpoint(str(tmp_path / "straight")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_aligns_first_on_shapes_from_scratch(tiny_world, tiny_sft, tmp_path):
    """A fresh model on Shapes: stage 1 (plain-template captions from align.json) then stage 2
    (instruction conversations), each with its own warmup; a model given by --init skips stage 1."""
    args = ["--model", "tiny", "--world", tiny_world, "--batch_size", "4", "--align_batch_size", "8", "--warmup", "2",
            "--report", "false", "--log_every", "1", "--eval_every", "0"]
    out = str(tmp_path / "two")
    code, stdout, err = run_cli("sft", args + ["--max_steps", "4", "--align_steps", "2", "--out", out])
    assert code == 0, err
    assert "2 alignment + 2 instruction steps" in stdout
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]
    assert [l["stage"] for l in lines] == [1, 1, 2, 2]
    assert [l["lr"] for l in lines][::2] == [lines[0]["lr"]] * 2 and lines[1]["lr"] > lines[0]["lr"]  # warmup restarts
    state = torch.load(os.path.join(out, "checkpoint-000004", "trainer_state.pt"), weights_only=False)
    assert {float(v["step"]) for v in state["optimizer"]["state"].values()} == {2.0}  # fresh Adam moments at stage 2
    code, stdout, err = run_cli("sft", args + ["--max_steps", "2", "--init", tiny_sft, "--out", str(tmp_path / "init")])
    assert code == 0, err
    assert "alignment" not in stdout
    assert all("stage" not in json.loads(l) for l in open(tmp_path / "init" / "metrics.jsonl"))
    code, _, err = run_cli("sft", args + ["--max_steps", "2", "--template", "plain", "--out", str(tmp_path / "plain")])
    assert code == 2 and len(err.strip().splitlines()) == 1  # multi-turn conversations under the caption template
    assert "--template plain: record sft_000000" in err and "one human turn" in err


def test_sft_lora_and_file_data(tiny_world, tmp_path):
    out = str(tmp_path / "lora")
    code, stdout, err = run_cli("sft", ["--model", "tiny", "--data", os.path.join(tiny_world, "sft.json"),
                                        "--image_folder", tiny_world, "--max_steps", "2", "--batch_size", "4",
                                        "--lora_r", "4", "--out", out, "--report", "false", "--world", tiny_world])
    assert code == 0, err
    m = load_checkpoint(out)
    assert not m.adapters  # the SFT adapter is merged into the weights that later stages start from


def _write(path, obj):
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_sft_bad_input_one_line_exit_2(tiny_world, tmp_path):
    img = os.path.join(tiny_world, "images", "train", "000000.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good_conv = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Yes."}]
    cases = {
        "missing image": ([{"id": "a", "image": "nope.png", "conversations": good_conv}], "field 'image'"),
        "undecodable image": ([{"id": "a", "image": str(broken), "conversations": good_conv}], "cannot decode"),
        "bad json": ("[{\"id\": ", "invalid JSON"),
        "no conversations": ([{"id": "a", "image": img}], "field 'conversations'"),
        "not alternating": ([{"id": "a", "image": img, "conversations": good_conv[:1] * 2}], "expected 'gpt'"),
        "empty answer": ([{"id": "a", "image": img, "conversations": [good_conv[0], {"from": "gpt", "value": " "}]}], "empty"),
        "image tag text-only": ([{"id": "a", "conversations": good_conv}], "<image>"),
    }
    for name, (content, needle) in cases.items():
        f = _write(tmp_path / "data.json", content)
        out = tmp_path / "out"
        code, _, err = run_cli("sft", ["--model", "tiny", "--data", f, "--max_steps", "1", "--out", str(out),
                                       "--report", "false", "--image_folder", str(tmp_path)])
        assert code == 2, name
        assert len(err.strip().splitlines()) == 1 and needle in err and "data.json" in err, (name, err)
        assert not any(n.startswith("checkpoint-") for n in os.listdir(out)), name  # stopped before training
