"""Beam search in model.generate (num_beams > 1) against transformers' beam search on a tiny LLaVA
with random weights, and by hand on a model whose next-token table is fixed."""
import pytest
import torch

from checkpoint import load_checkpoint
from model import LLaVA

IMG = 28
VOCAB = 40  # a small vocabulary: EOS and repeated tokens come up often
IMAGE_ID = 39
# conftest: tiny models run fastest on one thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers' LlavaForConditionalGeneration, ours loaded from its save_pretrained
    directory)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=IMG, patch_size=14,
                              projection_dim=16, layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                       rms_norm_eps=1e-5, max_position_embeddings=128,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=4, pad_token_id=0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("beam") / "hf"
    hf.save_pretrained(path)
    return hf, load_checkpoint(str(path)).eval()


def prompts(batch, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, IMG, IMG, generator=g)
    ids = torch.randint(3, IMAGE_ID, (batch, 5), generator=g)
    return pixels, torch.cat([ids[:, :1], torch.full((batch, 4), IMAGE_ID), ids[:, 1:]], 1)


def hf_beams(hf, pixels, ids, n, beams, eos, mask=None):
    out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=n,
                      num_beams=beams, do_sample=False, eos_token_id=eos, pad_token_id=0,
                      early_stopping=False, length_penalty=1.0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("beams,n,seed", [(5, 12, 0), (2, 10, 2)])
def test_beam_search_equals_transformers(pair, beams, n, seed):
    hf, ours = pair
    pixels, ids = prompts(3, seed)
    free = ours.generate(pixels, ids, max_new_tokens=n, eos_token_id=-1, num_beams=beams).tokens
    eos_hits = 0
    # tokens the beams do produce, so hypotheses finish early
    for eos in {int(free[0, 2]), int(free[1, 4]), 2}:
        got = ours.generate(pixels, ids, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                            num_beams=beams)
        want = hf_beams(hf, pixels, ids, n, beams, eos)
        for i in range(len(ids)):
            L = int(got.lengths[i])
            assert got.tokens[i, :L].tolist() == want[i, :L].tolist(), (eos, i)
            # transformers fills with EOS when pad is 0
            assert len(set(want[i, L:].tolist()) - {0, eos}) == 0
            assert torch.all(got.tokens[i, L:] == 0)
            assert L == n or int(got.tokens[i, L - 1]) == eos
            eos_hits += bool(got.finished[i]) and L < n
    assert eos_hits > 0  # some hypotheses ended before the length limit


@pytest.mark.parametrize("beams", [1, 3])
def test_several_eos_ids_end_as_in_transformers(pair, beams):
    """eos_token_id as a list (transformers' generate takes one): any of them ends a row, greedy
    and in beam search (whose candidates per step grow with the number of ids, as there). It
    was a traceback ('bool value of Tensor' / a list compared with a tensor)."""
    hf, ours = pair
    pixels, ids = prompts(3, 4)
    n = 10
    free = ours.generate(pixels, ids, max_new_tokens=n, eos_token_id=-1, num_beams=beams).tokens
    eos = [int(free[0, 3]), int(free[1, 1]), int(free[2, 6])]
    got = ours.generate(pixels, ids, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                        num_beams=beams)
    want = hf_beams(hf, pixels, ids, n, beams, eos)
    ended_on = set()
    for i in range(len(ids)):
        L = int(got.lengths[i])
        assert got.tokens[i, :L].tolist() == want[i, :L].tolist(), i
        assert bool(got.finished[i]) == (int(got.tokens[i, L - 1]) in eos)
        if got.finished[i] and L < n:
            ended_on.add(int(got.tokens[i, L - 1]))
    assert len(ended_on) >= 2  # rows ended on different ids of the list


def test_beam_search_left_padded_batch_equals_one_by_one(pair):
    _, ours = pair
    pixels, _ = prompts(2, 5)
    short = prompts(1, 6)[1][0, :7]
    long = prompts(1, 7)[1][0]
    ids = torch.zeros(2, len(long), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0, -len(short):], mask[0, -len(short):] = short, 1
    ids[1], mask[1] = long, 1
    batch = ours.generate(pixels, ids, mask, max_new_tokens=8, eos_token_id=2, num_beams=4)
    for i, p in enumerate((short, long)):
        one = ours.generate(pixels[i:i + 1], p[None], max_new_tokens=8, eos_token_id=2,
                            num_beams=4)
        assert torch.equal(batch.tokens[i], one.tokens[0])
        assert int(batch.lengths[i]) == int(one.lengths[0])


def test_beam_search_by_hand(monkeypatch):
    """Two beams, vocabulary {0 pad, 1 'a', 2 EOS, 3 'b'}, next-token probabilities by the last
    token (the model's calls are replaced by this table):
        after the prompt: a .5, b .4, EOS .1;  after a: EOS .6, a .25, b .15;
        after b: b .9, EOS .1.
    Step 1: running sums a log .5, b log .4 (EOS, log .1, ranks 3rd of 4 kept: no top-2 place,
      dropped).
    Step 2: candidates b-b .36, a-EOS .3, a-a .125, a-b .075: a-EOS is in the top 2 and finishes
      with log(.3) / 2 = -0.602; the running beams are b-b and a-a.
    Step 3 (the limit): b-b-b .324, a-a-EOS .075, b-b-EOS .036, ...: the top 2 finish at the
      limit, b-b-b with log(.324) / 3 = -0.376 and a-a-EOS with log(.075) / 3 = -0.863.
    Best: b b b (-0.376 beats a EOS at -0.602), although greedy decoding says a EOS. With a limit
    of 2, step 2 ends everything: b-b log(.36) / 2 = -0.511 beats a-EOS -0.602."""
    import math
    import model as M
    probs = {None: [0, .5, .1, .4], 1: [0, .25, .6, .15], 3: [0, 0, .1, .9]}
    m = LLaVA.from_preset("tiny", vocab_size=4, image_token_id=3, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
    state = {}

    def backbone(x, mask, position_ids=None, cache=None):
        last = state["next"]
        rows = [probs[None]] * x.shape[0] if last is None else [probs[int(t)] for t in last]
        cache.length += x.shape[1]
        return torch.log(torch.tensor(rows).clamp(min=1e-12))[:, None, :]

    def embed(ids, pixels=None, feats=None):
        state["next"] = None
        return torch.zeros(ids.shape[0], ids.shape[1], 1)

    class EmbedTokens(torch.nn.Module):
        def forward(self, tok):
            state["next"] = tok[:, 0]
            return torch.zeros(tok.shape[0], 1, 1)

    monkeypatch.setattr(m, "backbone", backbone)
    monkeypatch.setattr(m, "embed", embed)
    monkeypatch.setattr(m.language_model, "embed_tokens", EmbedTokens())
    monkeypatch.setattr(m, "logits", lambda h: h)
    def kv_cache(c, b, n, dev, dt):
        fields = {"length": 0, "k": [torch.zeros(b)] * c.layers, "v": [torch.zeros(b)] * c.layers}
        return type("C", (), fields)()
    monkeypatch.setattr(M, "KVCache", kv_cache)
    prompt = torch.tensor([[1, 3]])
    out = m.generate(None, prompt, max_new_tokens=3, eos_token_id=2, pad_token_id=0, num_beams=2)
    assert out.tokens.tolist() == [[3, 3, 3]] and out.lengths.tolist() == [3]
    assert not bool(out.finished[0])
    assert math.log(.324) / 3 > math.log(.3) / 2  # why b b b wins
    two = m.generate(None, prompt, max_new_tokens=2, eos_token_id=2, pad_token_id=0, num_beams=2)
    assert two.tokens.tolist() == [[3, 3]] and not bool(two.finished[0])


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
@pytest.mark.parametrize("beams", [1, 4])
def test_repetition_penalty_equals_transformers_from_embeddings(pair, beams):
    """repetition_penalty as transformers applies it when generate starts from inputs_embeds (how
    VIGC's LAVIS model calls it): only the tokens generated so far are penalised; on logits when
    greedy, on log-probs in beam search."""
    hf, ours = pair
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, IMAGE_ID, (3, 6), generator=g)
    n = 14
    plain = ours.generate(None, ids, max_new_tokens=n, eos_token_id=-1, num_beams=beams).tokens
    got = ours.generate(None, ids, max_new_tokens=n, eos_token_id=-1, num_beams=beams,
                        repetition_penalty=1.5).tokens
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        want = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                           max_new_tokens=n, min_new_tokens=n, num_beams=beams, do_sample=False,
                           repetition_penalty=1.5, eos_token_id=None, pad_token_id=0,
                           early_stopping=False, length_penalty=1.0)
    assert want.shape[1] == n  # (from embeddings, transformers returns the new tokens only)
    assert got.tolist() == want.tolist()
    assert not torch.equal(got, plain)  # the penalty changed what was generated
    repeats = lambda t: sum(len(r) - len(set(r)) for r in t.tolist())
    assert repeats(got) < repeats(plain)


@pytest.mark.parametrize("beams", [1, 3])
def test_repetition_penalty_on_a_left_padded_batch_penalises_what_each_row_generated(pair, beams):
    """A left-padded batch: each row's generated tokens alone are penalised (transformers 5's
    generate(inputs_embeds=...) leaves a padded row's first pad-count generated tokens unpenalised,
    its prompt_ignore_length being the row's pads: the reference here is its processor given the
    whole padded prompt's width to ignore)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
    hf, ours = pair
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, IMAGE_ID, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    for row, pads in ((0, 2), (2, 3)):
        ids[row, :pads], mask[row, :pads] = 0, 0
    n = 12
    got = ours.generate(None, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=-1,
                        pad_token_id=0, num_beams=beams, repetition_penalty=1.5).tokens
    penalty = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=ids.shape[1])
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, num_beams=beams, do_sample=False,
                           logits_processor=LogitsProcessorList([penalty]), eos_token_id=None,
                           pad_token_id=0, early_stopping=False, length_penalty=1.0)
    assert got.tolist() == want[:, ids.shape[1]:].tolist()
    plain = ours.generate(None, ids, attention_mask=mask, max_new_tokens=n, eos_token_id=-1,
                          pad_token_id=0, num_beams=beams).tokens
    assert not torch.equal(got, plain)
