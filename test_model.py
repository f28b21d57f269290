"""The network against transformers (the reference implementation): CLIP, LLaMA with
grouped-query attention and padding, LLaVA logits, generation with and without the KV cache,
LoRA adapters. Tiny random models; the helpers here serve test_checkpoint.py and test_interop.py."""
import pytest
import torch

from checkpoint import load_checkpoint
from interop import export_llava_hf
from model import LLaVA, ModelConfig


ATOL = 1e-4
IMG = 28          # tiny CLIP: 28 px / 14 px patches -> 4 patch tokens
VOCAB = 100
IMAGE_ID = 99


# ----------------------------------------------------------------------------------------
# reference models from transformers, written with save_pretrained
# ----------------------------------------------------------------------------------------

def hf_vision_config():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, image_size=IMG, patch_size=14, projection_dim=16,
                            layer_norm_eps=1e-5)


def hf_text_config(kv_heads=2):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                       rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)


def hf_llava(projector="gelu", seed=0, feature_layer=-2, strategy="default"):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=hf_vision_config(), text_config=hf_text_config(),
                      image_token_index=IMAGE_ID, projector_hidden_act=projector,
                      vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy,
                      image_seq_length=4 + (strategy == "full"), pad_token_id=0)
    m = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random weights big enough that errors would show
        for p in m.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


def write_hf_dirs(tmp_path_factory):
    """llava-hf directories (both projectors) written by transformers' own save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for proj in ("gelu", "linear"):
        m = hf_llava(proj)
        m.save_pretrained(root / proj)
        out[proj] = (m, str(root / proj))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return write_hf_dirs(tmp_path_factory)


def inputs(batch=2, text=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, IMG, IMG, generator=g)
    ids = torch.randint(3, VOCAB - 1, (batch, text), generator=g)
    # bos-ish, 4 image tokens, text
    ids = torch.cat([ids[:, :1], torch.full((batch, 4), IMAGE_ID), ids[:, 1:]], 1)
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


@pytest.mark.parametrize("layers,strategy", [([-3, -1], "default"), ([0, -2], "full"),
                                             ([-2], "default")])
def test_several_vision_feature_layers_match_transformers(tmp_path, layers, strategy):
    """llava-hf's vision_feature_layer as a list: those CLIP layers' features side by side (the
    projector's input is as many times wider); loaded, saved as ours and exported, same logits."""
    from transformers import LlavaForConditionalGeneration
    hf = hf_llava(feature_layer=layers, strategy=strategy)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf").eval()
    assert ours.config.vision_select_layer == layers
    assert ours.projector.linear_1.in_features == 32 * len(layers)
    assert len(ours.vision_tower.encoder.layers) == max(3 + 1 + k if k < 0 else k for k in layers)
    pixels, ids = inputs(seed=3)
    if strategy == "full":  # one more image token: the CLS feature is kept
        ids = torch.cat([ids[:, :1], torch.full((2, 1), IMAGE_ID), ids[:, 1:]], 1)
    ref = hf_logits(hf, pixels, ids)
    torch.testing.assert_close(ours(pixels, ids), ref, atol=ATOL, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    again = load_checkpoint(tmp_path / "ours").eval()
    assert again.config.vision_select_layer == layers
    torch.testing.assert_close(again(pixels, ids), ref, atol=ATOL, rtol=0)
    export_llava_hf(again, tmp_path / "export")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    assert theirs.config.vision_feature_layer == layers
    torch.testing.assert_close(hf_logits(theirs, pixels, ids), ref, atol=ATOL, rtol=0)


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
    ref = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0, min_new_tokens=n)[:, ids.shape[1]:]
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
    settings = dict(max_new_tokens=8, eos_token_id=-1, return_logprobs=True)
    batch = ours.generate(pixels, ids, mask, **settings)
    for i, p in enumerate(prompts):
        one = ours.generate(pixels[i:i + 1], p[None], **settings)
        assert torch.equal(batch.tokens[i], one.tokens[0])
        torch.testing.assert_close(batch.logprobs[i], one.logprobs[0], atol=1e-5, rtol=0)


def test_generate_stops_at_eos_and_returns_logprobs(hf_dirs):
    _, path = hf_dirs["gelu"]
    ours = load_checkpoint(path).eval()
    pixels, ids = inputs(batch=2)
    free = ours.generate(pixels, ids, max_new_tokens=6, eos_token_id=-1)
    seq = free.tokens[0].tolist()
    # pretend row 0's first new-token value there is EOS
    j = next(j for j in range(1, 6) if seq[j] not in seq[:j])
    out = ours.generate(pixels, ids, max_new_tokens=6, eos_token_id=seq[j], pad_token_id=0,
                        return_logprobs=True)
    assert out.lengths[0] == j + 1 and out.finished[0]
    assert torch.all(out.tokens[0, j + 1:] == 0) and torch.all(out.logprobs[0, j + 1:] == 0)
    # log-probs are those of the full forward pass at the sampled tokens
    prompt_and_answer = torch.cat([ids[:1], out.tokens[:1, :j + 1]], 1)
    full = torch.log_softmax(ours(pixels[:1], prompt_and_answer).float(), -1)
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
    cfg = dict(image_size=IMG, patch_size=14, vision_hidden=32, vision_intermediate=64,
               vision_layers=3, vision_heads=4, vocab_size=VOCAB, hidden=32, intermediate=72,
               layers=2, heads=4, kv_heads=2, image_token_id=IMAGE_ID, pad_token_id=0)
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
        # B = 0: a fresh adapter changes nothing
        torch.testing.assert_close(m(pixels, ids), base, atol=0, rtol=0)
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


def test_lora_linear_is_w_x_plus_alpha_over_r_b_a_x_on_the_merged_path_too():
    """W x + (alpha / r) B A x by hand, with alpha / r = 3, on the one-matmul path a frozen fp32
    base takes (MergedLoRA) and on the plain one; untargeted slices (k) get no LoRA term. The
    gradients of A and B are the hand formula's."""
    import model as model_module
    torch.manual_seed(0)
    lin = model_module.LoRALinear(6, {"q": 4, "k": 2})
    torch.nn.init.normal_(lin.weight)
    lin.lora["a"] = model_module.LoRAAdapter(6, {"q": 4}, r=2, alpha=6, dropout=0.0)
    lin.active = "a"
    A, B = lin.lora["a"].A["q"], lin.lora["a"].B["q"]
    torch.nn.init.normal_(B)
    x = torch.randn(3, 6)
    want = x @ lin.weight.T + torch.cat([3 * (x @ A.T) @ B.T, torch.zeros(3, 2)], 1)
    grads = torch.autograd.grad(want.square().sum(), (A, B))
    for frozen in (True, False):  # merged path, then the plain one
        lin.weight.requires_grad_(not frozen)
        assert lin.mergeable(lin.lora["a"], x) == frozen
        got = lin(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for g, w in zip(torch.autograd.grad(got.square().sum(), (A, B)), grads):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_an_unknown_adapter_name_is_one_clear_error_and_changes_nothing():
    """delete_adapter, merge_adapter and copy_adapter of a name the model does not hold raise
    set_adapter's ValueError (a bare KeyError before), and a refused merge leaves the base marked
    as loaded (it marked it edited first: a later save with base= wrote the whole model)."""
    m = tiny_model()
    m.add_adapter("a", r=2, alpha=2)
    m.set_adapter("a")
    for call in (lambda: m.delete_adapter("zz"), lambda: m.merge_adapter("zz"),
                 lambda: m.copy_adapter("zz", "b")):
        with pytest.raises(ValueError, match="no adapter 'zz' \\(have: a\\)"):
            call()
    assert not m.base_edited and list(m.adapters) == ["a"] and m.active_adapter == "a"


def test_a_head_of_a_name_taken_is_refused_as_an_adapter_is():
    """add_head of a name the model holds replaced the trained head by a fresh one without a word
    (a reward model's scores gone); refused, as add_adapter refuses a taken name."""
    m = tiny_model()
    head = m.add_head("reward")
    with torch.no_grad():
        head.weight.fill_(0.5)
    with pytest.raises(ValueError, match="head 'reward' exists already"):
        m.add_head("reward")
    assert m.heads["reward"] is head and bool((head.weight == 0.5).all())


@pytest.mark.parametrize("name", ["", "a.b", 3, None, "keys", "update", "training"])
def test_an_adapter_or_head_name_that_cannot_be_a_key_is_one_clear_error(name):
    """'', 'a.b' or a number raised a KeyError or TypeError from inside torch's nn.ModuleDict, and
    so did the name of one of its attributes ('keys'); one line naming the name, the model left
    as it was."""
    m = tiny_model()
    for add in (m.add_adapter, m.add_head):
        with pytest.raises(ValueError, match=f"name {name!r}: "):
            add(name)
    assert m.adapters == {} and len(m.heads) == 0


def test_images_beside_ids_without_an_image_token_are_refused_under_fsdp_too():
    """The refusal of images no image token reads came after FSDP's blank-image branch
    (encode_every_batch), which returned first: the images were left unread there."""
    m = tiny_model()
    m.encode_every_batch = True
    pixels = torch.zeros(1, 3, m.config.image_size, m.config.image_size)
    with pytest.raises(ValueError, match="hold no image token"):
        m(pixels, torch.tensor([[5, 6, 7]]))
    m(None, torch.tensor([[5, 6, 7]]))  # (text alone: the blank image, as before)


def test_adapter_added_to_an_eval_model_has_no_dropout():
    """A new adapter takes the model's mode: in an eval-mode model its dropout does not draw (it
    did: a fresh module trains, so eval and loaded adapters answered differently each call)."""
    m = tiny_model()
    m.add_adapter("a", r=4, alpha=8, dropout=0.5)
    m.copy_adapter("a", "b")
    randomize_adapter(m, "b", 1)
    pixels, ids = inputs()
    m.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(m(pixels, ids), m(pixels, ids), atol=0, rtol=0)
    m.train()
    with torch.no_grad():
        assert (m(pixels, ids) - m(pixels, ids)).abs().max() > 1e-4  # training: dropout draws


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
        trainable = ".lora.policy." in n or n.startswith(("heads.value", "projector."))
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


def test_a_lora_runs_trained_projector_keeps_fp32_on_a_bf16_base(tmp_path):
    """--dtype bf16 with LoRA cast the trained projector to bf16 too, where an AdamW step of 2e-5 on
    a weight of 0.02 is below half its last bit: most updates were lost (LLaVA keeps fp32 masters).
    Trained parameters now stay fp32 (loaded so, as the stages load: in bf16), and the model runs
    with and without autocast; a frozen projector is cast as before."""
    from checkpoint import load_checkpoint, save_checkpoint_files
    saved = tiny_model()
    save_checkpoint_files(saved, str(tmp_path / "ck"))
    frozen = load_checkpoint(str(tmp_path / "ck"), dtype=torch.bfloat16).cast_base(torch.bfloat16)
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    m = load_checkpoint(str(tmp_path / "ck"), dtype=torch.bfloat16)
    m.add_adapter("a", r=4, alpha=8)
    m.set_adapter("a")
    m.set_trainable(adapters=["a"], projector=True)
    m.cast_base(torch.bfloat16, keep_trained=True)
    assert m.language_model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert m.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    trained = [p for p in m.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    assert {id(p) for p in m.projector.parameters()} <= {id(p) for p in trained}
    # as saved, not rounded to bf16 on the way (a resumed run reads its fp32 projector whole)
    assert torch.equal(m.projector.linear_1.weight, saved.projector.linear_1.weight)
    pixels, ids = inputs()
    with torch.no_grad():
        assert torch.isfinite(m(pixels, ids)).all()  # (no autocast: bf16 CLIP, fp32 projector)
    before = m.projector.linear_1.weight.detach().clone()
    opt = torch.optim.AdamW(trained, lr=2e-5, weight_decay=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(pixels, ids).float().pow(2).mean().backward()
    opt.step()
    moved = (m.projector.linear_1.weight != before).float().mean()
    assert moved > 0.9, moved  # (in bf16 about a third of them moved)


def test_lora_term_is_fp32_under_bf16_autocast():
    """On a bf16 base the LoRA term is computed in fp32 (so a small early update is not rounded
    away), but under bf16 autocast (sft, dpo and vigc's training passes with --dtype bf16 on a
    GPU) autocast cast its matmuls back to bf16. Autocast is off for the term now: under it the
    layer gives what it gives with the term in fp32 (CPU autocast stands in for CUDA's)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    m = LLaVA.from_preset("tiny")
    m.add_adapter("a", r=8, alpha=16, targets=("q_proj",))
    lin = m.language_model.layers[0].self_attn.qkv_proj
    m.cast_base(torch.bfloat16)
    lin.active = "a"
    ad = lin.lora["a"]
    with torch.no_grad():
        for b in ad.B.values():
            b.normal_(0, 1e-3)  # (a small update: bf16 keeps ~3 digits of it)
    x = torch.randn(5, lin.weight.shape[1]).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin(x)
        y = F.linear(x, lin.weight, lin.bias)
    names = [n for n in lin.slices if n in ad.A]
    delta = [(x.float() @ ad.A[n].float().t() * ad.scale) @ ad.B[n].float().t() if n in ad.A
             else torch.zeros(5, size) for n, size in lin.slices.items()]
    assert names and got.dtype == torch.bfloat16
    assert torch.equal(got, y + torch.cat(delta, -1).to(y.dtype))
