"""The static decode path of model.generate (issue 19): its tokens and log-probabilities equal a
reference that recomputes the whole sequence at every step without any cache (greedy, and sampled
from the same seed), on a left-padded batch, with grouped-query attention and an active LoRA adapter
(the fused decode matrices); and positions, masks and the cache are made once per call, not once per
token."""
import pytest
import torch

import model as model_lib
from conftest import count_decode_compiles
from model import LLaVA, sample_token


def tiny_model(lora=True):
    torch.manual_seed(0)
    # heads 4, kv_heads 2: GQA; the image id outside the vocabulary, so that no sampled token is one
    m = LLaVA.from_preset("tiny", image_token_id=4000, pad_token_id=510).eval()
    if lora:
        m.add_adapter("policy", r=4, alpha=8)
        with torch.no_grad():  # B != 0, so that the adapter changes every output
            for _, lin in m.lora_linears():
                for b in lin.lora["policy"].B.values():
                    b.normal_(0, 0.5)
        m.set_adapter("policy")
    return m


def pack_everything(monkeypatch):
    """model.prepack for every matrix and batch of the tiny model, not only where it pays."""
    monkeypatch.setattr(model_lib, "PACK_MIN_ROWS", 2)
    monkeypatch.setattr(model_lib, "PACK_MIN_NUMEL", 0)


def left_padded_prompts(m, lengths=(4, 9, 6), seed=0):
    c, g = m.config, torch.Generator().manual_seed(seed)
    T = 1 + c.num_image_tokens + max(lengths)
    ids = torch.full((len(lengths), T), c.pad_token_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        bos = torch.tensor([c.bos_token_id])
        image = torch.full((c.num_image_tokens,), c.image_token_id)
        row = torch.cat([bos, image, torch.randint(3, 500, (n,), generator=g)])
        ids[i, T - len(row):], mask[i, T - len(row):] = row, 1
    pixels = torch.randn(len(lengths), 3, c.image_size, c.image_size, generator=g)
    return pixels, ids, mask


@torch.no_grad()
def reference(m, pixels, ids, mask, n, temperature, top_p, generator):
    """Today's semantics without a cache: the whole sequence through forward() at every step, the
    next token from sample_token (the same random draws as generate), EOS disabled."""
    tokens, logps = [], []
    for _ in range(n):
        seq = torch.cat([ids] + [t[:, None] for t in tokens], 1)
        full_mask = torch.cat([mask, torch.ones(len(ids), len(tokens), dtype=torch.long)], 1)
        logits = m(pixels, seq, full_mask)[:, -1].float()
        tok, lp = sample_token(logits, temperature, top_p, generator)
        tokens.append(tok)
        logps.append(lp)
    return torch.stack(tokens, 1), torch.stack(logps, 1)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_static_decode_equals_uncached_reference(one_thread, monkeypatch, packed, lora,
                                                 temperature, top_p):
    if packed:  # the tiny model's matrices prepacked for oneDNN too (model.prepack)
        pack_everything(monkeypatch)
    m = tiny_model(lora)
    pixels, ids, mask = left_padded_prompts(m)
    n = 10
    out = m.generate(pixels, ids, mask, max_new_tokens=n, temperature=temperature, top_p=top_p,
                     eos_token_id=-1, generator=torch.Generator().manual_seed(5),
                     return_logprobs=True)
    ref_generator = torch.Generator().manual_seed(5)
    ref_tokens, ref_logps = reference(m, pixels, ids, mask, n, temperature, top_p, ref_generator)
    assert torch.equal(out.tokens, ref_tokens)
    torch.testing.assert_close(out.logprobs, ref_logps, atol=2e-5, rtol=0)
    if temperature > 0:  # sampling really happened: not the greedy tokens
        greedy = m.generate(pixels, ids, mask, max_new_tokens=n, eos_token_id=-1)
        assert not torch.equal(out.tokens, greedy.tokens)


def test_generate_under_autocast_scores_its_own_tokens(one_thread):
    """Under torch.autocast (bf16) on an fp32 model, as a caller's mixed-precision loop runs it:
    the decode step wrote bf16 values into the fp32 cache (an index_copy_ dtype error). Now each
    sampled token's log-prob is the full forward's under the same autocast, up to bf16 rounding,
    and that rounding is really there (fp32 scores them otherwise); the adapter is not merged
    into a weight that autocast would round; beam search runs too."""
    m = tiny_model(lora=True)
    pixels, ids, mask = left_padded_prompts(m)
    n, T = 8, ids.shape[1]

    def scored(tokens):  # each token's log-prob from one forward over the whole sequence
        seq = torch.cat([ids, tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
        logits = m(pixels, seq, full_mask)[:, T - 1:-1].float()
        return logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with m.fused_lora(rows=3):  # (nothing merged or packed: the forward's own bf16 path)
            assert all(lin.fused_lora is None for _, lin in m.lora_linears())
        out = m.generate(pixels, ids, mask, max_new_tokens=n, temperature=1.0, eos_token_id=-1,
                         generator=torch.Generator().manual_seed(3), return_logprobs=True)
        under_autocast = scored(out.tokens)
        beams = m.generate(pixels, ids, mask, max_new_tokens=4, num_beams=2, eos_token_id=-1)
    with torch.no_grad():
        in_fp32 = scored(out.tokens)
    torch.testing.assert_close(out.logprobs, under_autocast, atol=0.02, rtol=0)
    assert (out.logprobs - in_fp32).abs().max() > 1e-3  # (bf16 did run)
    assert beams.tokens.shape == (3, 4)


def test_fused_lora_matrices_are_cleared_and_follow_the_weights(one_thread):
    m = tiny_model(lora=True)
    pixels, ids, mask = left_padded_prompts(m)
    before = m.generate(pixels, ids, mask, max_new_tokens=6, eos_token_id=-1).tokens
    assert all(lin.fused_lora is None for _, lin in m.lora_linears())  # nothing stale left behind
    with torch.no_grad():  # an optimizer step between two rollouts: the next generate must see it
        for _, lin in m.lora_linears():
            for b in lin.lora["policy"].B.values():
                b.mul_(-3.0)
    after = m.generate(pixels, ids, mask, max_new_tokens=6, eos_token_id=-1)
    ref, _ = reference(m, pixels, ids, mask, 6, 0.0, 1.0, None)
    assert torch.equal(after.tokens, ref) and not torch.equal(after.tokens, before)


def test_positions_masks_and_cache_are_made_once_per_call(one_thread, monkeypatch):
    m = tiny_model(lora=False)
    pixels, ids, mask = left_padded_prompts(m)
    calls = {"rope": 0, "mask": 0, "cache": 0}
    rope, attn_mask, cache = model_lib.rope_cos_sin, LLaVA._attention_mask, model_lib.KVCache

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(model_lib, "rope_cos_sin", counting("rope", rope))
    monkeypatch.setattr(LLaVA, "_attention_mask", counting("mask", attn_mask))
    monkeypatch.setattr(model_lib, "KVCache", counting("cache", cache))
    ptrs = []
    step = LLaVA.decode_step

    def watched(self, tokens, state):  # the same storage every step: nothing reallocated
        ptrs.append((state.key_bias.data_ptr(), state.cache.k[0].data_ptr(), state.cos.data_ptr()))
        return step(self, tokens, state)
    monkeypatch.setattr(LLaVA, "decode_step", watched)
    m.generate(pixels, ids, mask, max_new_tokens=12, eos_token_id=-1)
    # prefill + the decode tables; not once per token
    assert calls == {"rope": 2, "mask": 1, "cache": 1}
    assert len(ptrs) == 11 and len(set(ptrs)) == 1


def test_decode_weights_are_prepacked_for_a_batch_and_cleared(one_thread, monkeypatch):
    """On an fp32 CPU model a batch decodes with every decoder matrix (adapter merged in) and the
    lm_head prepacked for oneDNN (model.prepack); one row keeps F.linear on the merged weight;
    nothing stays packed after the call. (The tests above check the packed tokens and log-probs.)"""
    pack_everything(monkeypatch)
    m = tiny_model(lora=True)
    pixels, ids, mask = left_padded_prompts(m)
    seen, step = [], LLaVA.decode_step

    def watched(self, tokens, state):
        kinds = {lin.fused_lora[0] for _, lin in self.lora_linears()}
        seen.append((len(tokens), self.packed_head is not None, kinds))
        return step(self, tokens, state)
    monkeypatch.setattr(LLaVA, "decode_step", watched)
    m.generate(pixels, ids, mask, max_new_tokens=3, eos_token_id=-1)
    m.generate(pixels[:1], ids[:1], mask[:1], max_new_tokens=3, eos_token_id=-1)
    assert seen[0] == (3, True, {"packed"}) and seen[-1] == (1, False, {"merged"})
    assert m.packed_head is None and all(lin.fused_lora is None for _, lin in m.lora_linears())


def test_prepack_only_where_it_pays():
    """At the default thresholds: a large matrix at 8 rows is packed (and gives F.linear's output
    up to rounding); 2 rows, or a small matrix, keep F.linear."""
    big, small = torch.randn(1024, 512), torch.randn(384, 128)
    x = torch.randn(8, 1, 512)
    packed = model_lib.prepack(big, 8)
    torch.testing.assert_close(model_lib.packed_linear(x, packed, None), x @ big.t(),
                               atol=1e-4, rtol=1e-5)
    assert model_lib.prepack(big, 2) is None and model_lib.prepack(small, 64) is None
    assert model_lib.prepack(big.bfloat16(), 8) is None


def test_packed_copies_stay_within_their_memory_cap(one_thread, monkeypatch):
    """PACK_MAX_TOTAL bounds the extra memory of the packed copies: the lm_head first, then the
    decoder matrices in order while they fit; the rest decode as before (merged weight)."""
    pack_everything(monkeypatch)
    m = tiny_model(lora=True)
    head = m.head_weight().numel()
    first = next(m.lora_linears())[1].weight.numel()
    monkeypatch.setattr(model_lib, "PACK_MAX_TOTAL", head + first)
    with m.fused_lora(rows=3):
        kinds = [lin.fused_lora[0] for _, lin in m.lora_linears()]
        assert m.packed_head is not None
    assert kinds[0] == "packed" and set(kinds[1:]) == {"merged"}


def test_a_tiny_temperature_samples_the_top_token_without_nan():
    """temperature 1e-40 is in every sampling flag's range (0, inf): logits / T overflowed to
    inf - inf = NaN and torch.multinomial raised. The largest logit is taken out first (the same
    distribution), so it samples the top token with log-prob 0 and entropy 0."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    tok, lp, ent = sample_token(logits, 1e-40, with_entropy=True)
    assert tok.tolist() == [1, 0] and lp.tolist() == [0.0, 0.0] and ent.tolist() == [0.0, 0.0]
    # at ordinary temperatures the same numbers as the plain formula
    for t in (0.7, 1.0, 3.0):
        logp = torch.log_softmax(logits / t, -1)
        assert torch.allclose(model_lib.tempered_log_softmax(logits, t), logp, atol=1e-6)
        assert torch.allclose(model_lib.entropy_of(logp), -(logp.exp() * logp).sum(-1))


def test_top_p_zero_samples_the_top_token_as_transformers():
    """top_p 0 keeps the most likely token alone, as transformers' TopPLogitsWarper does (its
    min_tokens_to_keep 1): generate(top_p=0.0) raised 'invalid multinomial distribution' from
    inside torch, every token dropped. Any top_p > 0 keeps the same tokens as before."""
    from transformers.generation.logits_process import TopPLogitsWarper
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for top_p in (0.0, 0.3, 0.7, 0.9):
        kept = TopPLogitsWarper(top_p)(None, logits.clone()).isfinite()
        for seed in range(20):
            tok, _ = sample_token(logits, 1.0, top_p, torch.Generator().manual_seed(seed))
            assert kept.gather(1, tok[:, None]).all(), (top_p, tok)
    tok, _ = sample_token(logits, 1.0, 0.0, torch.Generator().manual_seed(0))
    assert tok.tolist() == [1, 0]
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    greedy = m.generate(pixels, ids, mask, max_new_tokens=4, eos_token_id=-1).tokens
    out = m.generate(pixels, ids, mask, max_new_tokens=4, temperature=1.0, top_p=0.0,
                     eos_token_id=-1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.tokens, greedy)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_right_padded_prompts_are_refused_and_an_all_padding_row_is_not(num_beams):
    """generate reads each row's next token at the last column: a prompt padded on the right
    answered from its padding without a word (other tokens than the same prompt alone, greedy and
    beam search). Refused in one line; a row of padding alone still decodes beside the others."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    right_ids, right_mask = torch.full_like(ids, m.config.pad_token_id), torch.zeros_like(mask)
    for b in range(len(ids)):
        n = int(mask[b].sum())
        right_ids[b, :n], right_mask[b, :n] = ids[b, -n:], 1
    with pytest.raises(ValueError, match="attention_mask: a row ends in padding"):
        m.generate(pixels, right_ids, right_mask, max_new_tokens=3, num_beams=num_beams)
    want = m.generate(pixels[[0, 2]], ids[[0, 2]], mask[[0, 2]], max_new_tokens=3,
                      num_beams=num_beams, eos_token_id=-1).tokens
    ids[1], mask[1] = m.config.pad_token_id, 0
    out = m.generate(pixels[[0, 2]], ids, mask, max_new_tokens=3, num_beams=num_beams,
                     eos_token_id=-1)
    assert torch.equal(out.tokens[[0, 2]], want)


def test_no_new_tokens_is_an_empty_answer_and_fewer_is_refused():
    """max_new_tokens 0 gives empty answers in beam search as in greedy decoding (beam search
    raised an IndexError from its final argmax); a negative one is one line naming it (a tensor
    of negative size, from deep inside the cache)."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    for num_beams in (1, 3):
        out = m.generate(pixels, ids, mask, max_new_tokens=0, num_beams=num_beams)
        assert out.tokens.shape == (3, 0) and out.lengths.tolist() == [0, 0, 0]
        assert not out.finished.any()
        with pytest.raises(ValueError, match="max_new_tokens: must be 0 or more, got -1"):
            m.generate(pixels, ids, mask, max_new_tokens=-1, num_beams=num_beams)


@torch.no_grad()
def test_an_empty_prompt_and_ids_outside_the_vocabulary_are_one_line(monkeypatch):
    """An empty prompt failed inside a reshape of the prefill, and an id outside the vocabulary
    (a tokenizer of another model) was torch's "index out of range in self" (on CUDA a device
    assert). One line naming input_ids, looked for once per generate call (a host sync), never
    per decode step, and in forward only once the embedding has failed (the training path pays
    nothing)."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    for num_beams in (1, 3):
        with pytest.raises(ValueError, match="input_ids: an empty prompt \\(0 tokens\\)"):
            m.generate(None, ids[:, :0], mask[:, :0], max_new_tokens=2, num_beams=num_beams)
    looked = []
    real = model_lib.token_ids_error
    monkeypatch.setattr(model_lib, "token_ids_error", lambda *a: looked.append(1) or real(*a))
    m.generate(pixels, ids, mask, max_new_tokens=5)
    m(pixels, ids, mask)
    assert len(looked) == 1  # (the call's own check; none per step, none in forward)
    vocab = m.config.vocab_size
    for bad in (vocab, -5):
        wrong = ids.clone()
        wrong[1, -2] = bad
        message = f"input_ids: id {bad} at row 1, position {ids.shape[1] - 2} is outside the " \
            f"vocabulary \\(0 to {vocab - 1}, and the image token 4000\\)"
        for num_beams in (1, 3):
            with pytest.raises(ValueError, match=message):
                m.generate(pixels, wrong, mask, max_new_tokens=2, num_beams=num_beams)
        with pytest.raises(ValueError, match=message):
            m(pixels, wrong, mask)


def test_an_attention_mask_of_another_shape_is_refused():
    """forward read a mask longer than input_ids from its first columns without a word (other
    positions and logits); a shorter one, or 1-D ids, failed deep inside attention. One line
    naming the argument, in forward and generate."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    longer = torch.cat([torch.zeros(3, 1, dtype=mask.dtype), mask], 1)
    for bad in (longer, mask[:, 1:], mask[:2]):
        for call in (lambda: m(pixels, ids, bad),
                     lambda: m.generate(pixels, ids, bad, max_new_tokens=2)):
            with pytest.raises(ValueError, match="attention_mask: shape .* but input_ids has"):
                call()
    with pytest.raises(ValueError, match="input_ids: expected \\(batch, length\\)"):
        m(pixels[:1], ids[0])


def test_pixels_of_another_size_are_refused():
    """Images up to a patch larger than config.image_size (50 px on a 48 px, 16 px-patch tower)
    ran with their edge cut off without a word; other sizes failed deep inside CLIP. One line
    naming pixel_values, as transformers' CLIP refuses them."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    for bad in (torch.randn(3, 3, 50, 50), torch.randn(3, 3, 32, 32), pixels[0]):
        for call in (lambda: m(bad, ids, mask), lambda: m.generate(bad, ids, mask, 2),
                     lambda: m.generate(bad, ids, mask, 2, num_beams=2)):
            with pytest.raises(ValueError, match="pixel_values: expected \\(images, 3, 48, 48\\)"):
                call()


def test_a_list_of_generators_of_another_length_is_refused():
    """generator as a list (one stream per row) of another length than the batch failed with a
    shape error from inside sampling; one line naming it."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    streams = [torch.Generator().manual_seed(i) for i in range(2)]
    with pytest.raises(ValueError, match="generator: a list of 2 generators for 3 rows"):
        m.generate(pixels, ids, mask, max_new_tokens=2, temperature=1.0, generator=streams)


def test_eos_ids_as_a_tensor_end_rows_as_the_list_does():
    """eos_token_id as a tensor of ids (transformers' generate takes one) was a TypeError; it ends
    rows as the same ids in a list do, greedy and beam search."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    free = m.generate(pixels, ids, mask, max_new_tokens=6, eos_token_id=-1).tokens
    eos = [int(free[0, 2]), int(free[1, 4])]
    for num_beams in (1, 2):
        want = m.generate(pixels, ids, mask, 6, eos_token_id=eos, num_beams=num_beams)
        got = m.generate(pixels, ids, mask, 6, eos_token_id=torch.tensor(eos),
                         num_beams=num_beams)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    assert want.finished.any()


@pytest.mark.parametrize("kwargs,message", [
    (dict(repetition_penalty=0.0), "repetition_penalty: must be > 0"),
    (dict(repetition_penalty=-1.5), "repetition_penalty: must be > 0"),
    (dict(temperature=float("nan")), "temperature: must be a number"),
    (dict(temperature=1.0, top_p=-0.5), "top_p: must be 0 or more"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p: must be 0 or more")])
def test_sampling_arguments_outside_their_range_are_refused(kwargs, message):
    """As transformers' logits processors refuse them: a repetition penalty of 0 divided the seen
    tokens' logits by 0 (inf: greedy decoding repeated them), a negative one flipped their signs,
    both without a word; a NaN temperature or top_p raised from inside torch.multinomial."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    with pytest.raises(ValueError, match=message):
        m.generate(pixels, ids, mask, max_new_tokens=3, eos_token_id=-1,
                   generator=torch.Generator().manual_seed(0), **kwargs)


def test_images_given_for_prompts_without_image_tokens_are_refused():
    """Images beside input_ids that hold no image token were left unread without a word (the
    answer came from the text alone; a prompt built without <image>), in forward, generate and
    beam search; transformers refuses them. Text alone, without images, still runs."""
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    text = ids.masked_fill(ids == m.config.image_token_id, 5)
    for call in (lambda: m(pixels, text, mask), lambda: m.generate(pixels, text, mask, 2),
                 lambda: m.generate(pixels, text, mask, 2, num_beams=2),
                 lambda: m.generate(None, text, mask, 2, image_features=m.encode_images(pixels))):
        with pytest.raises(ValueError, match="images given .*, but input_ids hold no image"):
            call()
    assert m.generate(None, text, mask, 2).tokens.shape == (3, 2)


def test_compiled_decode_compiles_once_across_prompt_lengths(monkeypatch):
    """generate(compile=True) made its cache of the prompt's length plus the new tokens' and new
    state tensors each call, so every prompt length compiled the step again (eval's batches each
    have their own) and CUDA graphs saw new addresses. Now the lengths are rounded up to
    COMPILE_BUCKET and the state kept on the model: prompts of three lengths, padded and not, and
    two answer limits run one compiled graph, over the same tensors, with eager decoding's tokens
    and log-probs (a counting backend stands in for inductor: the graph count is dynamo's)."""
    counter = count_decode_compiles(monkeypatch)
    m = tiny_model()
    addresses = set()
    for lengths, n in (((4, 9, 6), 6), ((3, 3, 3), 6), ((12, 2, 7), 9)):
        pixels, ids, mask = left_padded_prompts(m, lengths)
        kw = dict(max_new_tokens=n, eos_token_id=-1, temperature=1.0, return_logprobs=True)
        eager = m.generate(pixels, ids, mask, generator=torch.Generator().manual_seed(1), **kw)
        comp = m.generate(pixels, ids, mask, generator=torch.Generator().manual_seed(1),
                          compile=True, **kw)
        assert torch.equal(comp.tokens, eager.tokens)
        torch.testing.assert_close(comp.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)
        addresses.add(m._static_decode.cache.k[0].data_ptr())
    assert counter.frame_count == 1
    assert len(addresses) == 1


def test_compiled_decode_takes_any_batch_size_and_no_earlier_call_leaks(monkeypatch):
    """Static shapes compiled the step once per batch size, and past torch's recompile limit (8)
    decoded eagerly without a word (eval's batches are whatever is left to answer). Now a second
    size compiles one graph for all. And the kept cache is zeroed when a call starts again: the
    compiled step reads every slot, and a value an earlier call left (inf, in fp16) weighed 0 x
    inf = NaN."""
    counter = count_decode_compiles(monkeypatch)
    m = tiny_model()
    for rows in range(1, 12):
        pixels, ids, mask = left_padded_prompts(m, tuple(3 + (i * 5) % 7 for i in range(rows)))
        eager = m.generate(pixels, ids, mask, max_new_tokens=4, eos_token_id=-1)
        comp = m.generate(pixels, ids, mask, max_new_tokens=4, eos_token_id=-1, compile=True)
        assert torch.equal(comp.tokens, eager.tokens), rows
    assert counter.frame_count <= 3
    for t in m._static_decode.cache.k + m._static_decode.cache.v:
        t.fill_(float("inf"))
    comp = m.generate(pixels, ids, mask, max_new_tokens=4, eos_token_id=-1, compile=True,
                      temperature=1.0, return_logprobs=True, generator=torch.Generator())
    assert torch.isfinite(comp.logprobs).all()


def test_compiled_decode_after_a_call_under_inference_mode(monkeypatch):
    """The kept state made by a compiled call under torch.inference_mode() holds inference
    tensors, which no later call outside that mode may write: every such call failed in the
    state's start ("Inplace update to inference tensor outside InferenceMode"). A new state is
    made for it now; calls inside the mode go on using one made outside."""
    count_decode_compiles(monkeypatch)
    m = tiny_model()
    pixels, ids, mask = left_padded_prompts(m)
    kw = dict(max_new_tokens=4, eos_token_id=-1, compile=True)
    eager = m.generate(pixels, ids, mask, max_new_tokens=4, eos_token_id=-1)
    with torch.inference_mode():
        assert torch.equal(m.generate(pixels, ids, mask, **kw).tokens, eager.tokens)
    assert torch.equal(m.generate(pixels, ids, mask, **kw).tokens, eager.tokens)
    kept = m._static_decode
    with torch.inference_mode():
        assert torch.equal(m.generate(pixels, ids, mask, **kw).tokens, eager.tokens)
    assert m._static_decode is kept


def test_compiled_decode_does_not_merge_the_adapter_at_every_token(monkeypatch):
    """Compiled, the decode step of an fp32 base with an active adapter took MergedLoRA's path,
    which makes W + s B A anew at every call: a copy of every adapted weight per token (in a CUDA
    graph, at every replay). It takes the plain path now (W x + s B A x, which the compiler
    fuses): the step's graph copies no weight, with eager decoding's tokens."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward
    torch._dynamo.reset()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **dict(kw, backend=keep)))
    monkeypatch.setattr(model_lib, "_COMPILED_DECODE", [])
    m = tiny_model()
    m.requires_grad_(False)  # (a frozen base, as PPO's policy: where MergedLoRA's path is taken)
    pixels, ids, mask = left_padded_prompts(m)
    eager = m.generate(pixels, ids, mask, max_new_tokens=4, eos_token_id=-1)
    comp = m.generate(pixels, ids, mask, max_new_tokens=4, eos_token_id=-1, compile=True)
    assert torch.equal(comp.tokens, eager.tokens)
    assert graphs and not any("clone" in code or "addmm_" in code for code in graphs)
