"""Round trips with the tools users already have: PEFT adapters both ways (peft itself is the
reference for its format), an export that AutoProcessor + LlavaForConditionalGeneration use as our
generate does, the same tokens after <image> in training, our generation and LlavaProcessor (legacy
and non-legacy Llama tokenizers), original LLaVA's image token -200 on export, any PIL image
mode."""
import json
import logging
import os
import warnings

import pytest
import torch

import common
import rundir
from data import IMAGE, SYSTEM, preprocess_image, render, tokenize_conversation
from checkpoint import (CheckpointError, load_adapters, load_checkpoint, recorded_template,
                        resolve_checkpoint, save_checkpoint_files)
from interop import export_llava_hf, export_peft_adapter
from model import LLaVA, ModelConfig
from test_checkpoint import _rewrite_keys, _to_original_llava
from test_model import IMAGE_ID, IMG, hf_llava, inputs, randomize_adapter, tiny_model

ATOL = 1e-4
LM_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def peft_logits(pm, pixels, ids):
    with torch.no_grad():
        return pm(pixel_values=pixels, input_ids=ids).logits


@pytest.fixture
def caught():
    """Python warnings and transformers/peft log records of WARNING and above, as one list of
    strings."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    handler = Keep(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        yield records
        records += [str(x.message) for x in w]
    for lg in loggers:
        lg.removeHandler(handler)


# ----------------------------------------------------------------------------------------
# PEFT: ours -> peft
# ----------------------------------------------------------------------------------------

def test_llava_hf_export_merges_the_active_adapter(tmp_path):
    """A model answering through a LoRA adapter (a DPO or SFT LoRA run) exports as it answers: the
    adapter merged (it was left out without a word: the export was the base model); merge=False
    writes the base alone. An adapter not in use is left out with a note."""
    from transformers import LlavaForConditionalGeneration
    m = tiny_model()
    m.add_adapter("dpo", r=4, alpha=16, targets=LM_TARGETS)
    randomize_adapter(m, "dpo", 4)
    m.add_adapter("other", r=2, alpha=2, targets=("q",))
    pixels, ids = inputs()
    with torch.no_grad():
        base = m(pixels, ids)
        with m.use_adapter("dpo"):
            tuned = m(pixels, ids)
    assert (tuned - base).abs().max() > 1e-2
    m.set_adapter("dpo")
    for merge, want in ((True, tuned), (False, base)):
        out = tmp_path / str(merge)
        export_llava_hf(m, out, merge=merge)
        hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
        torch.testing.assert_close(peft_logits(hf, pixels, ids), want, atol=ATOL, rtol=0)
    assert m.active_adapter == "dpo" and set(m.adapters) == {"dpo", "other"}  # left as it was
    torch.testing.assert_close(m(pixels, ids).detach(), tuned, atol=0, rtol=0)


def test_export_peft_loads_in_peft_without_warnings_and_matches(tmp_path, caught):
    from peft import AutoPeftModel, PeftModel
    from transformers import LlavaForConditionalGeneration
    m = tiny_model()
    m.add_adapter("policy", r=4, alpha=16, targets=LM_TARGETS)
    randomize_adapter(m, "policy", 4)
    export_llava_hf(m, tmp_path / "hf")
    export_peft_adapter(m, tmp_path / "peft", "policy", base=tmp_path / "hf")
    cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == str(tmp_path / "hf")
    pixels, ids = inputs()
    with torch.no_grad(), m.use_adapter("policy"):
        ours = m(pixels, ids)
    caught.clear()
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    pm = PeftModel.from_pretrained(base, tmp_path / "peft")
    pm.eval()
    assert not [w for w in caught if "adapter" in w.lower() or "missing" in w.lower()], caught
    lora = {n for n, _ in pm.named_modules() if n.endswith(".lora_A")}
    assert lora and all(".language_model." in n for n in lora)  # no LoRA on CLIP's q/k/v
    assert len(lora) == 2 * 7  # 2 decoder layers x 7 projections
    torch.testing.assert_close(peft_logits(pm, pixels, ids), ours, atol=ATOL, rtol=0)
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    trainable = PeftModel.from_pretrained(base, tmp_path / "peft", is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".language_model." in n and ".lora_" in n for n in names)
    # no base given: the adapter carries its own base (path/base) and AutoPeftModel needs nothing
    # else
    export_peft_adapter(m, tmp_path / "alone", "policy")
    auto = AutoPeftModel.from_pretrained(str(tmp_path / "alone")).eval()
    torch.testing.assert_close(peft_logits(auto, pixels, ids), ours, atol=ATOL, rtol=0)
    # moved, it is read back from the base inside it (it named the old place alone)
    os.rename(tmp_path / "alone", tmp_path / "moved")
    with torch.no_grad():
        back = load_checkpoint(tmp_path / "moved").eval()
        torch.testing.assert_close(back(pixels, ids), ours, atol=ATOL, rtol=0)


def test_export_refuses_what_it_cannot_write_before_writing(tmp_path):
    """A reward model's adapter was exported without its head, and then loaded as a policy (eval
    answered with it), as PEFT adapter and, merged in, as llava-hf (until 2026-12-06: a note
    alone); a template without a chat template was refused after the weights, config and
    tokenizer were written, beside an empty chat_template.jinja."""
    m = tiny_model()
    m.add_adapter("reward", r=4, alpha=16, targets=LM_TARGETS)
    m.add_head("reward")
    with pytest.raises(ValueError, match="scalar head of its name"):
        export_peft_adapter(m, tmp_path / "rm", "reward")
    m.set_adapter("reward")
    with pytest.raises(ValueError, match="scalar head of its name"):
        export_llava_hf(m, tmp_path / "rm_hf")
    assert not (tmp_path / "rm_hf").exists()
    export_llava_hf(m, tmp_path / "rm_base", merge=False)  # (the base alone, as asked)
    m.set_adapter(None)
    tok = llama_tokenizer(True)
    with pytest.raises(ValueError, match="no chat template for 'plain'"):
        export_llava_hf(model_for(tok, seed=1), tmp_path / "hf", tok, template="plain")
    assert not (tmp_path / "rm").exists() and not (tmp_path / "hf").exists()
    # (without a tokenizer no template is written: weights and config, as before)
    export_llava_hf(m, tmp_path / "bare", template="plain")
    assert (tmp_path / "bare" / "config.json").exists()


def test_export_refuses_a_folder_whose_files_would_be_read_instead(tmp_path):
    """export_llava_hf wrote into a folder as it found it: over a PEFT adapter's folder,
    transformers loaded the adapter (its base + LoRA: logits 0.4 off ours, without a word) while
    load_checkpoint read the export; over a checkpoint of ours it overwrote its config.json and
    weights beside its adapters and trainer state; into a run folder it hid the run's
    checkpoint-N/ from --init and --resume. Refused now, nothing written; an export cut off (a
    config.json that is not JSON) is mended by exporting again."""
    m = tiny_model()
    m.add_adapter("x", r=4, alpha=8, targets=LM_TARGETS)
    randomize_adapter(m, "x", 1)
    export_peft_adapter(m, tmp_path / "peft", "x")
    save_checkpoint_files(m, str(tmp_path / "ours"))
    save_checkpoint_files(m, str(tmp_path / "run" / "checkpoint-000001"))
    other = tiny_model(seed=7)
    for folder in ("peft", "ours", "run"):
        before = {f: (tmp_path / folder / f).read_bytes()
                  for f in os.listdir(tmp_path / folder) if (tmp_path / folder / f).is_file()}
        with pytest.raises(CheckpointError, match=f"{folder}: holds .*: export into another"):
            export_llava_hf(other, tmp_path / folder)
        after = {f: (tmp_path / folder / f).read_bytes()
                 for f in os.listdir(tmp_path / folder) if (tmp_path / folder / f).is_file()}
        assert after == before, folder
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text('{"architectures": ["Llava')
    export_llava_hf(other, tmp_path / "cut")
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(str(tmp_path / "cut"))(pixels, ids),
                                   other(pixels, ids), atol=0, rtol=0)


def test_peft_export_refuses_a_folder_holding_a_model(tmp_path):
    """export_peft_adapter over a llava-hf export's folder (or ours) wrote its adapter beside that
    config.json, and load_checkpoint (so --init and --policy_lora's checks) read the model there:
    logits 0.6 off the adapter's, without a word; into a run folder, --init read the run's newest
    checkpoint-N/ instead. Refused now, nothing written; exporting the adapter twice into its own
    folder still works."""
    m = tiny_model()
    m.add_adapter("x", r=4, alpha=8, targets=LM_TARGETS)
    randomize_adapter(m, "x", 1)
    m.set_adapter("x")
    export_llava_hf(tiny_model(seed=7), tmp_path / "hf")
    save_checkpoint_files(m, str(tmp_path / "run" / "checkpoint-000001"))
    for folder in ("hf", "run"):
        before = sorted(os.listdir(tmp_path / folder))
        with pytest.raises(CheckpointError, match=f"{folder}: holds .*: export into another"):
            export_peft_adapter(m, tmp_path / folder, "x")
        assert sorted(os.listdir(tmp_path / folder)) == before, folder
    for _ in range(2):
        export_peft_adapter(m, tmp_path / "peft", "x")
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(str(tmp_path / "peft"))(pixels, ids),
                                   m(pixels, ids), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------
# PEFT: peft -> ours
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_elsewhere(tmp_path_factory):
    """A llava-hf base saved by transformers and a PEFT LoRA trained on it with bare target names,
    so PEFT also put LoRA on CLIP's q/k/v and on the projector's linear_1 (as users' adapters
    do)."""
    from peft import LoraConfig
    root = tmp_path_factory.mktemp("peft")
    base = hf_llava()
    base.save_pretrained(root / "base")
    targets = [f"{t}_proj" for t in LM_TARGETS] + ["linear_1"]
    pm = trained_peft(root, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return pm, root


def trained_peft(root, config):
    """get_peft_model(config) on root/base, its LoRA weights random (B not zero), saved to
    root/adapter."""
    from peft import get_peft_model
    from transformers import LlavaForConditionalGeneration
    pm = get_peft_model(LlavaForConditionalGeneration.from_pretrained(root / "base"), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(root / "adapter")
    return pm


def test_peft_adapter_loads_by_from_pretrained_and_load_adapters(peft_elsewhere, capsys):
    pm, root = peft_elsewhere
    cfg = json.load(open(root / "adapter" / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == str(root / "base")
    pixels, ids = inputs(seed=3)
    ref = peft_logits(pm, pixels, ids)
    with pm.disable_adapter():
        base_ref = peft_logits(pm, pixels, ids)
    assert (ref - base_ref).abs().max() > 1e-2  # the adapter matters
    ours = load_checkpoint(root / "adapter").eval()  # --init takes the same path
    assert ours.active_adapter == "default"
    assert ours.adapters["default"]["targets"] == list(LM_TARGETS)
    notice = capsys.readouterr().out
    assert "merged into the base weights" in notice and len(notice.strip().splitlines()) == 1
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels, ids), ref, atol=ATOL, rtol=0)
    other = load_checkpoint(root / "base").eval()
    load_adapters(other, root / "adapter", name="elsewhere")
    assert other.active_adapter is None
    with torch.no_grad(), other.use_adapter("elsewhere"):
        torch.testing.assert_close(other(pixels, ids), ref, atol=ATOL, rtol=0)


def test_peft_adapter_folder_with_adapters_false_loads_its_base_alone(peft_elsewhere):
    """LLaVA.from_pretrained(peft_dir, adapters=False) is the base, as for our adapter checkpoints:
    the adapter was loaded and made active all the same (the model answered as the adapter)."""
    pm, root = peft_elsewhere
    pixels, ids = inputs(seed=3)
    with pm.disable_adapter():
        base_ref = peft_logits(pm, pixels, ids)
    bare = LLaVA.from_pretrained(root / "adapter", adapters=False)
    assert bare.adapters == {} and bare.active_adapter is None and not bare.base_edited
    with torch.no_grad():
        torch.testing.assert_close(bare(pixels, ids), base_ref, atol=ATOL, rtol=0)


def test_peft_adapter_on_the_projector_alone_loads_merged(tmp_path):
    """LoRA only outside the language model: merged into the base, no adapter left to activate
    (load_checkpoint failed with a ValueError, 'no adapter default')."""
    from peft import LoraConfig
    hf_llava().save_pretrained(tmp_path / "base")
    pm = trained_peft(tmp_path, LoraConfig(r=4, lora_alpha=8,
                                           target_modules=["linear_1", "linear_2"]))
    pixels, ids = inputs(seed=3)
    ours = load_checkpoint(tmp_path / "adapter").eval()
    assert ours.active_adapter is None and not ours.adapters
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels, ids), peft_logits(pm, pixels, ids), atol=ATOL,
                                   rtol=0)


def test_peft_adapter_on_a_linear_projector_says_why_it_is_refused(tmp_path):
    """A 'linear' llava-hf projector (two linears, no activation) is read as one: LoRA on one of
    them was refused as if it were another model ("does not fit this model")."""
    from peft import LoraConfig
    hf_llava("linear").save_pretrained(tmp_path / "base")
    trained_peft(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["linear_1"]))
    with pytest.raises(CheckpointError, match="of a projector whose two linears are read as one "
                                              r"\(projector_hidden_act 'linear'\) is not "
                                              "supported: merge it with PEFT first"):
        load_checkpoint(tmp_path / "adapter")


def test_load_adapters_refuses_to_merge_into_a_shared_base(peft_elsewhere):
    """LoRA outside the language model, loaded beside other adapters (PPO's --policy_lora on the
    reward model's base): merging it would change what the reward adapter reads, so it is
    refused, and the model is left as it was."""
    _, root = peft_elsewhere
    model = load_checkpoint(root / "base").eval()
    model.add_adapter("reward", r=2, alpha=2)
    model.add_head("reward")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="reward share: merge this adapter into the base"):
        load_adapters(model, root / "adapter", name="policy")
    assert sorted(model.adapters) == ["reward"] and not model.base_edited
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("broken", ["language_model", "vision_tower", "projector rank"])
def test_refused_peft_adapter_leaves_the_model_as_it_was(peft_elsewhere, tmp_path, broken):
    """A key that fails (a LoRA pair of the wrong shape) is found before anything changes: the
    projector's LoRA had been merged and, for a language-model key, a half-filled adapter
    added, before the refusal. A projector pair of another rank than the config's r was merged
    at the wrong scale (or was a traceback where A's and B's ranks differ)."""
    from safetensors.torch import load_file, save_file
    _, root = peft_elsewhere
    (tmp_path / "adapter").mkdir()
    cfg = json.load(open(root / "adapter" / "adapter_config.json"))
    json.dump(cfg, open(tmp_path / "adapter" / "adapter_config.json", "w"))
    state = load_file(root / "adapter" / "adapter_model.safetensors")
    if broken == "projector rank":
        key = next(k for k in state if "projector" in k and k.endswith("lora_B.weight"))
        state[key] = torch.ones(state[key].shape[0], state[key].shape[1] + 2)
        a = key.replace("lora_B", "lora_A")
        state[a] = torch.ones(state[a].shape[0] + 2, state[a].shape[1])
    else:
        key = min(k for k in state if broken in k and k.endswith("lora_B.weight"))  # (layer 0)
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, tmp_path / "adapter" / "adapter_model.safetensors")
    model = load_checkpoint(root / "base").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="has shape"):
        load_adapters(model, tmp_path / "adapter", name="other")
    assert not model.adapters and not model.base_edited
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_peft_export_after_a_merge_writes_the_merged_base(peft_elsewhere, tmp_path):
    """export_peft_adapter names the llava-hf directory the model came from as the base only
    while the base weights are unchanged: after merge_adapter it writes the merged base (it
    named the unmerged directory, so PEFT answered with other weights)."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration
    _, root = peft_elsewhere
    model = load_checkpoint(root / "base").eval()
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, r=4, alpha=8)
        randomize_adapter(model, name, seed)
    model.merge_adapter("a")
    export_peft_adapter(model, tmp_path / "out", "b")
    cfg = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == str(tmp_path / "out" / "base")
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "base")
    pm = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    pixels, ids = inputs(seed=3)
    model.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(pm, pixels, ids), model(pixels, ids), atol=ATOL,
                                   rtol=0)


def test_rslora_adapter_loads_and_exports_as_plain_lora(tmp_path):
    """use_rslora (scaling alpha / sqrt(r)) was refused: it is plain LoRA with alpha * sqrt(r),
    on the language model (an adapter) and on the projector (merged); exported, PEFT reads it back
    as plain LoRA with the same logits."""
    from peft import LoraConfig, PeftModel
    from transformers import LlavaForConditionalGeneration
    hf_llava().save_pretrained(tmp_path / "base")
    targets = [f"{t}_proj" for t in LM_TARGETS] + ["linear_1"]
    pm = trained_peft(tmp_path, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                           target_modules=targets))
    pixels, ids = inputs(seed=3)
    ours = load_checkpoint(tmp_path / "adapter")
    assert ours.adapters["default"]["alpha"] == pytest.approx(16.0)  # (8 * sqrt(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels, ids), peft_logits(pm, pixels, ids), atol=ATOL,
                                   rtol=0)
    export_peft_adapter(ours, tmp_path / "out", "default")
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "base")
    back = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    torch.testing.assert_close(peft_logits(back, pixels, ids), peft_logits(pm, pixels, ids),
                               atol=ATOL, rtol=0)


def test_loaded_models_are_in_eval_mode_as_transformers_returns_them(tmp_path):
    """load_checkpoint returned a model in training mode (transformers' and PEFT's from_pretrained
    return eval mode): an adapter's dropout stayed on, so two calls of a loaded PEFT adapter with
    lora_dropout 0.3 answered differently, and neither as PEFT does."""
    from peft import LoraConfig
    hf_llava().save_pretrained(tmp_path / "base")
    targets = [f"{t}_proj" for t in LM_TARGETS]
    pm = trained_peft(tmp_path, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                           target_modules=targets))
    pixels, ids = inputs(seed=3)
    ours = load_checkpoint(tmp_path / "adapter")  # (no .eval())
    assert not ours.training and not load_checkpoint(tmp_path / "base").training
    with torch.no_grad():
        first, second = ours(pixels, ids), ours(pixels, ids)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, peft_logits(pm, pixels, ids), atol=ATOL, rtol=0)


def test_a_base_changed_since_loading_is_saved_whole(peft_elsewhere, tmp_path):
    """A PEFT adapter's vision and projector LoRA is merged into the base weights as it is added
    (ppo.py --policy_lora beside a reward model of another base); the adapter checkpoint then
    written named the unchanged base, so the merged LoRA was lost without a word (reloaded, the
    policy answered otherwise). Such a model is written whole."""
    import sft
    pm, root = peft_elsewhere
    model = load_checkpoint(root / "base")
    load_adapters(model, root / "adapter", "policy")
    model.set_adapter("policy")
    path = rundir.save_checkpoint(model, str(tmp_path / "run"), 1, sft.Config(),
                                  base=str(root / "base"))
    assert json.load(open(os.path.join(path, "config.json")))["base"] is None
    pixels, ids = inputs(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(path)(pixels, ids), peft_logits(pm, pixels, ids),
                                   atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "api", base=str(root / "base"))  # (the public API too)
    assert json.load(open(tmp_path / "api" / "config.json"))["base"] is None


def test_a_peft_adapter_refused_for_its_name_leaves_the_base_as_it_was(peft_elsewhere):
    """load_adapters(peft_dir, 'a.b'): the adapter's vision and projector LoRA was merged into
    the base before the name was refused, so a refused adapter left the model changed."""
    _, root = peft_elsewhere
    model = load_checkpoint(root / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="adapter name 'a.b'"):
        load_adapters(model, root / "adapter", "a.b")
    assert not model.base_edited
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_peft_adapter_with_lora_on_lm_head_loads_with_its_saved_head(tmp_path):
    """LoRA on lm_head: PEFT also saves the head's own weight (save_embedding_layers 'auto'),
    which was refused as 'not a LoRA A/B weight'. The same weight as the base's is passed over
    (LoRA merged, as PEFT answers); another one (a resized or trained head) is refused. On the
    meta device (an FSDP rank other than 0) the shape alone is compared: it died copying out of a
    meta tensor."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file
    hf_llava().save_pretrained(tmp_path / "base")
    targets = [f"{t}_proj" for t in LM_TARGETS] + ["lm_head"]
    pm = trained_peft(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    file = tmp_path / "adapter" / "adapter_model.safetensors"
    state = load_file(file)
    assert "base_model.model.lm_head.base_layer.weight" in state
    pixels, ids = inputs(seed=3)
    ours = load_checkpoint(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels, ids), peft_logits(pm, pixels, ids), atol=ATOL,
                                   rtol=0)
    assert load_checkpoint(tmp_path / "adapter", device="meta").lm_head.weight.is_meta
    state["base_model.model.lm_head.base_layer.weight"] += 1.0
    save_file(state, file, {"format": "pt"})
    with pytest.raises(CheckpointError, match="a copy of 'lm_head' that differs"):
        load_checkpoint(tmp_path / "adapter")


def test_peft_adapter_on_some_layers_stays_on_them(tmp_path, caught):
    """layers_to_transform: PEFT puts LoRA on the listed layers only; so do we, through our own
    checkpoint and back out to PEFT (before, every layer got an adapter, zero B on the others,
    which further training and the export spread to layers the config left out)."""
    from peft import LoraConfig, PeftModel
    from transformers import LlavaForConditionalGeneration
    from checkpoint import save_checkpoint_files
    hf_llava().save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        layers_to_transform=[1], layers_pattern="layers")
    pm = trained_peft(tmp_path, config)
    pixels, ids = inputs(seed=4)
    ref = peft_logits(pm, pixels, ids)
    ours = load_checkpoint(tmp_path / "adapter").eval()
    where = {(i, s) for i, lin in ours.lora_linears() if "default" in lin.lora
             for s in lin.lora["default"].A}
    assert where == {(1, "q"), (1, "v"), (1, "down")}
    assert len(ours.adapter_parameters("default")) == 2 * 3  # what training would update
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels, ids), ref, atol=ATOL, rtol=0)
    save_checkpoint_files(ours, tmp_path / "ours")
    again = load_checkpoint(tmp_path / "ours").eval()
    assert again.adapters["default"]["layers"] == {"q": [1], "v": [1], "down": [1]}
    with torch.no_grad():
        torch.testing.assert_close(again(pixels, ids), ref, atol=ATOL, rtol=0)
    export_llava_hf(again, tmp_path / "hf", merge=False)  # (the base the adapter goes on)
    export_peft_adapter(again, tmp_path / "out", "default", base=tmp_path / "hf")
    caught.clear()
    back = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "hf"), tmp_path / "out").eval()
    assert not [w for w in caught if "adapter" in w.lower() or "missing" in w.lower()], caught
    lora = {n.split("language_model.")[1] for n, _ in back.named_modules() if n.endswith(".lora_A")}
    assert lora == {"layers.1.self_attn.q_proj.lora_A", "layers.1.self_attn.v_proj.lora_A",
                    "layers.1.mlp.down_proj.lora_A"}
    torch.testing.assert_close(peft_logits(back, pixels, ids), ref, atol=ATOL, rtol=0)


def test_peft_adapter_without_local_base_is_one_clear_error(peft_elsewhere, tmp_path):
    from model import CheckpointError
    _, root = peft_elsewhere
    d = tmp_path / "hubbase"
    d.mkdir()
    cfg = json.load(open(root / "adapter" / "adapter_config.json"))
    hub_cfg = dict(cfg, base_model_name_or_path="llava-hf/llava-1.5-7b-hf")
    json.dump(hub_cfg, open(d / "adapter_config.json", "w"))
    no_base = "base_model_name_or_path.*not a local directory"
    with pytest.raises(CheckpointError, match=no_base) as e:
        load_checkpoint(d)
    assert "\n" not in str(e.value)


def test_peft_adapter_finds_its_base_beside_it_when_moved(peft_elsewhere, tmp_path):
    """A released base + adapter pair whose adapter_config.json names the training machine's path
    (LLaVA-RLHF's sft_model/ and rlhf_lora_adapter_model/): the base is the folder of that name
    beside the adapter folder, or beside its parent (an adapter in lora_default/); before, only
    an edit of the file loaded it."""
    import shutil
    pm, root = peft_elsewhere
    pixels, ids = inputs(seed=3)
    ref = peft_logits(pm, pixels, ids)
    cfg = json.load(open(root / "adapter" / "adapter_config.json"))
    release = tmp_path / "LLaVA-RLHF-7b"
    shutil.copytree(root / "base", release / "sft_model")
    for adapter in (release / "rlhf_lora_adapter_model", release / "rl" / "lora_default"):
        shutil.copytree(root / "adapter", adapter)
        moved = dict(cfg, base_model_name_or_path="/shared/their/models/LLaVA-RLHF-7b/sft_model")
        (adapter / "adapter_config.json").write_text(json.dumps(moved))
        with torch.no_grad():
            torch.testing.assert_close(load_checkpoint(adapter).eval()(pixels, ids), ref,
                                       atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------
# tokenizers of both kinds; the export's processor
# ----------------------------------------------------------------------------------------

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: What color is the circle? ASSISTANT: The circle is red.</s>",
    "\nWhat is in the image? There is a red circle and a blue square.",
    "Is there a cat?"]


def llama_tokenizer(legacy):
    """transformers' own LlamaTokenizer, legacy (a '▁' before every piece after a special token, as
    LLaVA's Vicuna tokenizers) or not ('▁' only at the start: transformers 5's default), on a small
    BPE with byte fallback; <image> and <pad> special tokens as llava-hf's tokenizers have them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken, LlamaTokenizer
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(CORPUS * 3, trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = LlamaTokenizer(vocab=learned["vocab"], merges=merges, legacy=legacy)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False),
                    AddedToken("<pad>", special=True)],
                   special_tokens=True)
    tok.pad_token = "<pad>"
    return tok


def model_for(tok, seed=0):
    torch.manual_seed(seed)
    m = LLaVA(ModelConfig(image_size=IMG, patch_size=14, vision_hidden=32, vision_intermediate=64,
                          vision_layers=3, vision_heads=4, vocab_size=len(tok), hidden=32,
                          intermediate=72, layers=2, heads=4, kv_heads=2,
                          image_token_id=tok.convert_tokens_to_ids("<image>"),
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


def test_a_bf16_base_with_an_fp32_projector_exports_each_weight_as_held(tmp_path, capsys):
    """A LoRA run in bf16 keeps its trained projector in fp32 (cast_base(keep_trained)); the export
    keeps it so in model.safetensors, but transformers loads every weight in one dtype,
    config.json's bfloat16 under dtype="auto": the projector was rounded there without a word.
    The export says so, and how to keep each weight: transformers' fp32 load then holds exactly
    our weights and gives our fp32 logits."""
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration
    m = tiny_model()
    m.set_trainable(projector=True)
    m.cast_base(torch.bfloat16, keep_trained=True)
    export_llava_hf(m, tmp_path / "hf")
    said = capsys.readouterr().out
    assert "multi_modal_projector (float32) written as held, the rest bfloat16" in said, said
    assert "dtype=torch.float32" in said
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"  # (the bulk: what dtype="auto" loads)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("multi_modal_projector.linear_1.weight").dtype == torch.float32
    held = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype="auto")
    assert held.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16  # (the note's)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight, m.projector.linear_1.weight)
    ours = load_checkpoint(str(tmp_path / "hf"))
    assert ours.projector.linear_1.weight.dtype == torch.float32
    pixels, ids = inputs()
    with torch.no_grad():
        want = ours.float()(pixels, ids)
    torch.testing.assert_close(peft_logits(hf, pixels, ids), want, atol=ATOL, rtol=0)
    export_llava_hf(m.float(), tmp_path / "fp32")  # (one dtype: no note)
    assert "written as held" not in capsys.readouterr().out


def test_export_of_a_tokenizer_without_a_pad_token_pads_with_the_configs(tmp_path):
    """A tokenizer without a pad token was exported as it was: the processor then had no pad token
    while config.json named one."""
    from transformers import AutoProcessor
    tok = llama_tokenizer(False)
    m = model_for(tok)
    tok.pad_token = None
    export_llava_hf(m, tmp_path / "hf", tok)
    assert tok.pad_token is None  # (the caller's tokenizer is left as it was)
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert proc.tokenizer.pad_token_id == m.config.pad_token_id == \
        json.load(open(tmp_path / "hf" / "config.json"))["pad_token_id"]


def test_export_writes_the_tokenizers_pad_where_the_config_named_none(tmp_path):
    """A checkpoint imported from a config without pad_token_id reads vocab_size - 1, an ordinary
    token: the export wrote it into config.json (transformers' generate filled finished rows with
    it) beside a tokenizer padding with its eos. config.json names the tokenizer's pad now."""
    from transformers import AutoProcessor
    tok = llama_tokenizer(False)
    m = model_for(tok)
    m.config.pad_token_id = 7  # (an ordinary token: what the import reads for none, vocab - 1)
    assert tok.pad_token_id != m.config.pad_token_id
    export_llava_hf(m, tmp_path / "hf", tok)
    config = json.load(open(tmp_path / "hf" / "config.json"))
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert config["pad_token_id"] == config["text_config"]["pad_token_id"] == tok.pad_token_id
    assert proc.tokenizer.pad_token_id == tok.pad_token_id


def test_export_without_a_tokenizer_refuses_an_earlier_exports_processor(tmp_path):
    """An export without a tokenizer (a model whose checkpoint holds none) over an earlier
    export's folder left that export's tokenizer, chat template and image processor beside the
    new weights: AutoProcessor paired them (another image size, another vocabulary) without a
    word, though the note said AutoProcessor needs a tokenizer. Refused now, nothing written;
    with the tokenizer the folder is written whole."""
    from transformers import AutoProcessor
    tok = llama_tokenizer(False)
    export_llava_hf(model_for(tok), tmp_path / "hf", tok)
    before = {f: (tmp_path / "hf" / f).read_bytes() for f in os.listdir(tmp_path / "hf")}
    bare = model_for(tok, seed=1)
    with pytest.raises(CheckpointError, match="chat_template.jinja of an earlier export"):
        export_llava_hf(bare, tmp_path / "hf")
    assert {f: (tmp_path / "hf" / f).read_bytes() for f in os.listdir(tmp_path / "hf")} == before
    export_llava_hf(bare, tmp_path / "hf", tok)
    assert AutoProcessor.from_pretrained(tmp_path / "hf").tokenizer.get_vocab() == tok.get_vocab()


def test_export_writes_the_template_the_model_was_trained_with(tmp_path):
    """A model trained with --template llava_v1 was exported with vicuna_v1's chat template unless
    the caller named it: AutoProcessor prompted it with another system text than it was trained
    on, without a word. The default is now the template its checkpoint records (and an export's
    own chat template, so an export imported and exported again writes the same one)."""
    from transformers import AutoProcessor
    tok = llama_tokenizer(False)
    save_checkpoint_files(model_for(tok), str(tmp_path / "ck"),
                          extra_config={"run_config": {"template": "llava_v1"}})
    tok.save_pretrained(tmp_path / "ck")
    export_llava_hf(load_checkpoint(str(tmp_path / "ck")), tmp_path / "hf")
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    content = [{"type": "image"}, {"type": "text", "text": "Is there a cat?"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}],
                                    add_generation_prompt=True)
    assert text == render([{"from": "human", "value": IMAGE + "\nIs there a cat?"}],
                          "llava_v1")[0]
    export_llava_hf(load_checkpoint(str(tmp_path / "hf")), tmp_path / "again")
    for f in ("chat_template.jinja", "model.safetensors", "config.json"):
        assert (tmp_path / "hf" / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f


def test_an_exports_template_is_noted_as_its_checkpoints_was(tmp_path, capsys):
    """A stage or eval given a checkpoint trained with llava_v1 and run with vicuna_v1 says so in
    a note (and PPO refuses a policy whose template is not its reward model's); given the same
    model's llava-hf export, it said nothing: the template was lost on the way. The export's chat
    template names it now."""
    tok = llama_tokenizer(False)
    m = model_for(tok)
    export_llava_hf(m, tmp_path / "hf", tok, template="llava_v1")
    export_llava_hf(m, tmp_path / "hf_vicuna", tok)
    assert recorded_template(str(tmp_path / "hf")) == "llava_v1"
    # a model whose template nothing records gets vicuna_v1's chat template, but is not recorded
    # as trained with it (read back so, it gave a wrong note and PPO refused a llava_v1 RM)
    assert recorded_template(str(tmp_path / "hf_vicuna")) is None
    assert SYSTEM["vicuna_v1"] in (tmp_path / "hf_vicuna" / "chat_template.jinja").read_text()
    capsys.readouterr()
    rundir.note_template("--init", str(tmp_path / "hf"), "vicuna_v1")
    assert "was trained with --template llava_v1" in capsys.readouterr().out
    # a PEFT adapter exported from it: its base (written beside it) holds the template
    m = load_checkpoint(str(tmp_path / "hf"))
    m.add_adapter("x", r=2, alpha=2, targets=("q",))
    export_peft_adapter(m, tmp_path / "peft", "x", base=tmp_path / "hf")
    assert recorded_template(str(tmp_path / "peft")) == "llava_v1"
    (tmp_path / "hub").mkdir()  # (a chat template of another kind: nothing recorded)
    (tmp_path / "hub" / "chat_template.jinja").write_text("{% for m in messages %}{% endfor %}")
    assert recorded_template(str(tmp_path / "hub")) is None
    # trained with --template plain (LLaVA's stage 1: no chat template): exported with
    # vicuna_v1's and a note, and recorded as plain (the export was refused)
    m = load_checkpoint(str(tmp_path / "hf"))
    save_checkpoint_files(m, tmp_path / "stage1", extra_config={"run_config": {
        "template": "plain"}})
    capsys.readouterr()
    export_llava_hf(load_checkpoint(str(tmp_path / "stage1")), tmp_path / "hf_plain", tok)
    assert "trained with --template plain, which has no chat template" in capsys.readouterr().out
    assert recorded_template(str(tmp_path / "hf_plain")) == "plain"
    assert recorded_template(str(tmp_path / "hub" / "chat_template.jinja")) is None


@pytest.mark.parametrize("legacy", [True, False])
def test_token_after_image_agrees_in_training_generation_and_llava_processor(legacy, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor
    tok = llama_tokenizer(legacy)
    m = model_for(tok)
    export_llava_hf(m, tmp_path / "hf", tok)
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    n_img = m.config.num_image_tokens
    image = Image.new("RGB", (30, 20), (200, 30, 30))
    question, answer = "What color is the circle?", "The circle is red."
    asked = {"from": "human", "value": IMAGE + "\n" + question}
    answered = {"from": "gpt", "value": answer}
    train = tokenize_conversation(tok, [asked, answered], m.config.image_token_id, n_img)
    prompt = tokenize_conversation(tok, [asked], m.config.image_token_id, n_img)
    text, _ = render([asked, answered])
    theirs = proc(images=image, text=text, return_tensors="pt")["input_ids"][0]
    assert torch.equal(train["input_ids"], theirs)  # training == the exported processor
    # generation == training
    assert torch.equal(prompt["input_ids"], train["input_ids"][:len(prompt["input_ids"])])
    first_after = int((train["input_ids"] == m.config.image_token_id).nonzero()[0]) + n_img
    after = tok.convert_ids_to_tokens(int(train["input_ids"][first_after]))
    # legacy: '▁\nWhat' (as LLaVA's own); else '\nWhat' / '<0x0A>'
    assert after.startswith("▁") == legacy, after


@pytest.mark.parametrize("legacy", [True, False])
def test_export_autoprocessor_generates_what_we_generate(legacy, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    import common
    tok = llama_tokenizer(legacy)
    m = model_for(tok, seed=1)
    export_llava_hf(m, tmp_path / "hf", tok, template="vicuna_v1")
    for f in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
              "chat_template.jinja"):
        assert os.path.exists(tmp_path / "hf" / f), f
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image = Image.effect_mandelbrot((40, 26), (-2, -1, 1, 1), 50).convert("RGB")
    question = "What is in the image?"
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    turns = [{"from": "human", "value": IMAGE + "\n" + question}]
    assert text == render(turns)[0]
    two = messages + [{"role": "assistant", "content": "A red circle."},
                      {"role": "user", "content": "Where?"}]
    two_turns = turns + [{"from": "gpt", "value": "A red circle."},
                         {"from": "human", "value": "Where?"}]
    assert proc.apply_chat_template(two, add_generation_prompt=True) == render(two_turns)[0]
    batch = proc(images=image, text=text, return_tensors="pt")
    pixels = preprocess_image(image, IMG)
    torch.testing.assert_close(batch["pixel_values"][0], pixels, atol=1e-5, rtol=0)
    item = common.prompt_item(tok, m, turns, None)
    assert torch.equal(batch["input_ids"][0], item["input_ids"])
    prompt_ids = item["input_ids"]
    ours = m.generate(pixels[None], prompt_ids[None], max_new_tokens=12, eos_token_id=-1).tokens[0]
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        out = out[0, prompt_ids.numel():]
    assert torch.equal(out, ours)
    assert len(set(ours.tolist())) > 1  # not a degenerate repeat
    # a batch of two prompts of different lengths, padded as the exported tokenizer says: each row
    # answers as it does alone (right-padded, the shorter one did not, with a warning)
    longer = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is the shape on the left?"}]}],
        add_generation_prompt=True)
    both = proc(images=[image, image], text=[text, longer], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**both, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(out[0, both["input_ids"].shape[1]:], ours)


def test_original_llava_export_maps_image_token_to_a_real_id(tmp_path):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration
    hf = hf_llava()
    hf.save_pretrained(tmp_path / "hf")
    hf_cfg = json.load(open(tmp_path / "hf" / "config.json"))
    cfg = dict(hf_cfg["text_config"], architectures=["LlavaLlamaForCausalLM"], model_type="llava",
               mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
               mm_vision_select_feature="patch", mm_use_im_start_end=False,
               image_aspect_ratio="pad", mm_vision_tower=str(tmp_path / "clip"))
    _rewrite_keys(tmp_path / "hf", tmp_path / "orig", lambda k: _to_original_llava(k), config=cfg)
    clip = CLIPVisionModel(hf_cfg_vision := hf.config.vision_config)
    assert hf_cfg_vision.image_size == IMG
    clip.save_pretrained(tmp_path / "clip")
    ours = load_checkpoint(tmp_path / "orig").eval()
    assert ours.config.image_token_id == -200
    export_llava_hf(ours, tmp_path / "export")
    exported = json.load(open(tmp_path / "export" / "config.json"))
    new_id = exported["image_token_index"]
    assert new_id >= 0 and exported["text_config"]["vocab_size"] == new_id + 1 == 101
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    pixels, ids = inputs()
    with torch.no_grad():
        got = theirs(pixel_values=pixels, input_ids=ids.masked_fill(ids == IMAGE_ID, new_id)).logits
        want = ours(pixels, ids.masked_fill(ids == IMAGE_ID, -200))
    torch.testing.assert_close(got[..., :100], want, atol=ATOL, rtol=0)
    # the new row is never the argmax
    assert bool((got[..., 100] < got[..., :100].max(-1).values).all())
    # with a tokenizer that lacks <image>: the token is added to it, with the id the config names
    from transformers import AutoTokenizer, LlamaTokenizer
    vocab = {t: i for t, i in llama_tokenizer(legacy=True).get_vocab().items() if i < 90}
    plain = LlamaTokenizer(vocab=vocab, merges=[], legacy=True)
    assert len(plain) == 90 and "<image>" not in plain.get_vocab()
    export_llava_hf(ours, tmp_path / "export_tok", plain)
    assert len(plain) == 90  # the caller's tokenizer is left as it was
    back = AutoTokenizer.from_pretrained(tmp_path / "export_tok")
    again = json.load(open(tmp_path / "export_tok" / "config.json"))
    assert back.convert_tokens_to_ids("<image>") == again["image_token_index"] == 90
    assert again["text_config"]["vocab_size"] == 100  # id 90 < 100 rows: nothing to grow


# ----------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------

# (not 16-bit grey, "I;16": LLaVA's convert clips it to white, scaled to 8 bits here instead,
# nor float grey of values in [0, 1], "F", read black by it:
# test_data.py::test_a_16_bit_or_float_grey_image_is_read_as_its_8_bit_grey)
@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK", "1"])
def test_preprocess_image_takes_any_pil_mode_as_llava_does(mode):
    from PIL import Image
    rgb = Image.effect_mandelbrot((30, 18), (-2, -1, 1, 1), 40).convert("RGB")
    img = rgb.convert(mode)
    got = preprocess_image(img, 28)
    assert got.shape == (3, 28, 28) and torch.isfinite(got).all()
    torch.testing.assert_close(got, preprocess_image(img.convert("RGB"), 28), atol=0, rtol=0)


def test_shapes_checkpoint_exports_with_its_tokenizer_and_generates_the_same(tiny_sft, tmp_path):
    """A model trained here (the Shapes tokenizer: '▁' only at the start) exported with no
    tokenizer argument: the checkpoint's own is written, and transformers generates what we
    generate."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    import common
    m, tok = common.load_model_and_tokenizer(tiny_sft)
    export_llava_hf(m.eval(), tmp_path / "hf")
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image = Image.effect_mandelbrot((48, 48), (-2, -1, 1, 1), 30).convert("RGB")
    turns = [{"from": "human", "value": IMAGE + "\nIs there a red circle?"}]
    content = [{"type": "image"}, {"type": "text", "text": "Is there a red circle?"}]
    text = proc.apply_chat_template([{"role": "user", "content": content}],
                                    add_generation_prompt=True)
    batch = proc(images=image, text=text, return_tensors="pt")
    item = common.prompt_item(tok, m, turns, None)
    assert torch.equal(batch["input_ids"][0], item["input_ids"])
    pixels = preprocess_image(image, m.config.image_size)
    prompt_ids = item["input_ids"]
    ours = m.generate(pixels[None], prompt_ids[None], max_new_tokens=8, eos_token_id=-1).tokens[0]
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        out = out[0, prompt_ids.numel():]
    assert torch.equal(out, ours)


def test_a_stage_puts_each_weight_on_its_device_as_it_is_read(tiny_sft, monkeypatch):
    """load_model_and_tokenizer loaded the checkpoint on the host, then moved it to the run's
    device: a GPU run held the whole model on the host first (28 GB for a 7B fp16 release read as
    fp32). Each weight goes to the device as it is read now (the meta device stands in for a
    GPU)."""
    import checkpoint
    placed = []
    real = checkpoint.set_param
    monkeypatch.setattr(checkpoint, "set_param", lambda model, name, t: (
        placed.append((name, t.device.type)), real(model, name, t))[1])
    m, _ = common.load_model_and_tokenizer(tiny_sft, device="meta")
    assert len(placed) == len(list(m.parameters())) and {d for _, d in placed} == {"meta"}


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_a_half_precision_release_loads_and_trains_in_fp32(tiny_sft, tiny_world, tmp_path, half):
    """LLaVA's releases store fp16 weights: the stages kept them as stored, so `sft.py --init`
    with the default --dtype fp32 trained in fp16 on the CPU (loss NaN at step 2) and a bf16
    release trained in bf16. The stages load fp32; load_checkpoint keeps the stored dtype."""
    from safetensors.torch import load_file, save_file
    from conftest import run_cli
    m, _ = common.load_model_and_tokenizer(tiny_sft)
    assert common.base_dtype(common.argparse.Namespace(dtype="fp32", device="cuda")) == \
        torch.float32
    bf16_gpu = common.argparse.Namespace(dtype="bf16", device="cuda", fsdp=False)
    assert common.base_dtype(bf16_gpu) == torch.bfloat16  # (loaded so: no fp32 copy on the way)
    # loaded in bf16, then cast as the stages cast: the model a fp32 load cast after would be
    direct = common.load_model_and_tokenizer(tiny_sft, dtype=torch.bfloat16)[0]
    after = m.cast_base(torch.bfloat16)
    for (n, p), (_, q) in zip(direct.cast_base(torch.bfloat16).named_parameters(),
                              after.named_parameters(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q), n
    m, _ = common.load_model_and_tokenizer(tiny_sft)
    hf = tmp_path / "hf"
    export_llava_hf(m, hf)
    weights = load_file(str(hf / "model.safetensors"))
    save_file({k: v.to(half) for k, v in weights.items()}, str(hf / "model.safetensors"),
              {"format": "pt"})
    assert {p.dtype for p in load_checkpoint(str(hf)).parameters()} == {half}
    loaded, _ = common.load_model_and_tokenizer(str(hf))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    out = tmp_path / "sft"
    code, _, err = run_cli("sft", ["--init", str(hf), "--world", tiny_world, "--max_steps", "2",
                                   "--batch_size", "4", "--report", "false", "--log_every", "1",
                                   "--out", str(out)])
    assert code == 0, err
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), rows
    assert {p.dtype for p in load_checkpoint(str(out)).parameters()} == {torch.float32}


# ----------------------------------------------------------------------------------------
# LLaVA-RLHF's reward model -> ours (reward.py --import_llava_rlhf, then ppo.py --reward)
# ----------------------------------------------------------------------------------------

def llava_rlhf_lora(base_dir, root, folder, seed=0):
    """A LoRA saved as LLaVA-RLHF saves its adapters: save_pretrained(folder) of a PEFT model whose
    adapter is 'lora_default' (so in folder/lora_default/, as .bin), on the language model of
    base_dir (LlavaLlamaForCausalLM names: model.layers.N...), B not zero. Returns the PEFT
    model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration
    m = load_checkpoint(base_dir).eval()
    export_llava_hf(m, root / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(root / "hf")
    llama = LlamaForCausalLM(hf.config.text_config)
    llama.model.load_state_dict(hf.model.language_model.state_dict())
    llama.lm_head.load_state_dict(hf.lm_head.state_dict())
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=[f"{t}_proj" for t in LM_TARGETS])
    pm = get_peft_model(llama, config, adapter_name="lora_default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval().save_pretrained(folder, safe_serialization=False)
    return pm


def llava_rlhf_reward_model(base_dir, root):
    """A reward model saved as LLaVA-RLHF's finetune_lora_rm.py saves one (checkpoint-N/: the
    backbone's LoRA in adapter_model/ (llava_rlhf_lora), and torch.save(reward_head.state_dict(),
    reward_head) in bf16). Returns (the PEFT model, head, folder)."""
    folder = root / "LLaVA-Fact-RM" / "checkpoint-200"
    pm = llava_rlhf_lora(base_dir, root, folder / "adapter_model")
    head = torch.nn.Linear(pm.config.hidden_size, 1).to(torch.bfloat16)
    torch.save(head.state_dict(), folder / "reward_head")
    return pm, head.float(), folder


def test_llava_rlhf_reward_model_imports_and_scores_as_it_does(tiny_sft, tiny_world, tmp_path):
    """LLaVA-RLHF's reward = reward_head(hidden_states[-1][:, -1]) of its LoRA'd backbone
    (RewardModel.forward); imported, our RM checkpoint scores the same, and ppo.py reads it with
    LLaVA-RLHF's prompt settings, here from LLaVA-RLHF's kind of policy start (--policy_lora).
    (Before: no way to use its reward weights at all, nor to start PPO from a LoRA.)"""
    import ppo
    from conftest import run_cli
    pm, head, folder = llava_rlhf_reward_model(tiny_sft, tmp_path)
    assert (folder / "adapter_model" / "lora_default" / "adapter_model.bin").exists()
    rows = [[1, 40, 41, 42, 43, 44, 45], [1, 50, 51, 52]]
    with torch.no_grad():
        ref = torch.stack([head(pm(torch.tensor([r]), output_hidden_states=True)
                                .hidden_states[-1][0, -1]).squeeze() for r in rows])
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    out = tmp_path / "rm"
    code, stdout, err = run_cli("reward", ["--init", tiny_sft, "--import_llava_rlhf", str(folder),
                                           "--out", str(out)])
    assert code == 0, err
    ckpt = resolve_checkpoint(str(out))
    assert ppo.reward_settings(ckpt) == (True, "llava-rlhf", "vicuna_v1", True)
    ours = load_checkpoint(ckpt).eval()
    assert ours.adapters["reward"]["r"] == 4 and "reward" in ours.heads
    with torch.no_grad(), ours.use_adapter("reward"):
        got = common.score_sequences(ours, "reward", ids, mask, None)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert (ref - head(torch.zeros(1, ours.config.hidden)).squeeze()).abs().max() > 1e-2
    # PPO against it (on the policy's own base: one model, five adapters) from LLaVA-RLHF's RL-INIT
    # LoRA (--policy_lora): the policy starts as it and the reference is it, so the first
    # rollout's KL is 0 although the LoRA moves the model
    ppo_args = ["--init", tiny_sft, "--reward", str(out), "--world", tiny_world,
                "--rollout_batch", "4", "--minibatch_size", "2", "--max_new_tokens", "6"]
    init = tmp_path / "LLaVA-RL-INIT" / "lora_default"
    llava_rlhf_lora(tiny_sft, tmp_path / "init_hf", init.parent, seed=1)
    with_init = load_checkpoint(tiny_sft).eval()
    load_adapters(with_init, str(init), "init")
    with torch.no_grad():
        base_logits = with_init(None, ids)
        with with_init.use_adapter("init"):
            assert (with_init(None, ids) - base_logits).abs().max() > 1e-2
    init_args = ppo_args + ["--policy_lora", str(init), "--max_steps", "2", "--export", "adapter"]
    code, stdout, err = run_cli("ppo", init_args + ["--out", str(tmp_path / "ppo_init")])
    assert code == 0, err
    first = json.loads(open(tmp_path / "ppo_init" / "metrics.jsonl").readline())
    assert first["step"] == 1 and abs(first["kl"]) < 1e-4, first
    # stopped after step 1 and resumed: the same policy at step 2 (the reference is rebuilt from
    # the LoRA, the trained policy from the checkpoint)
    half = init_args + ["--out", str(tmp_path / "ppo_half")]
    assert run_cli("ppo", half + ["--max_steps", "1"])[0] == 0
    code, _, err = run_cli("ppo", half + ["--resume", "true"])
    assert code == 0, err
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(resolve_checkpoint(str(tmp_path / r)), "adapters.safetensors"))
            for r in ("ppo_init", "ppo_half"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the reward model's own LoRA as --policy_lora: one line, its head would go unread
    rm_lora = folder / "adapter_model" / "lora_default"
    code, _, err = run_cli("ppo", ppo_args + ["--policy_lora", str(rm_lora), "--max_steps", "2",
                                              "--out", str(tmp_path / "ppo_rm_lora")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{rm_lora}: the LoRA of a LLaVA-RLHF reward model" in err, err
    # a head that is not nn.Linear(hidden, 1), or no adapter beside it: one line, nothing written
    torch.save({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, folder / "reward_head")
    code, _, err = run_cli("reward", ["--init", tiny_sft, "--import_llava_rlhf", str(folder),
                                      "--out", str(tmp_path / "rm2")])
    assert code == 2 and "reward_head: key 'weight': expected shape (1, " in err, err
    assert not (tmp_path / "rm2").exists()  # (the folder it made is removed again)
    os.remove(folder / "reward_head")
    code, _, err = run_cli("reward", ["--init", tiny_sft, "--import_llava_rlhf", str(folder),
                                      "--out", str(tmp_path / "rm3")])
    assert code == 2 and f"{folder}: no reward_head file" in err, err
    assert not (tmp_path / "rm3").exists()


def test_a_llava_rlhf_import_reads_its_base_as_stored(tiny_sft, tmp_path, monkeypatch):
    """reward.py --import_llava_rlhf loaded --init in fp32 on a CPU (the stages' default) to write
    adapters and a head on it: its base weights are never changed nor written, and a 13B fp16
    release read as fp32 took 52 GB. They are read as stored now (mapped, not converted)."""
    import shutil

    import checkpoint
    from conftest import run_cli
    half = tmp_path / "half"
    load_checkpoint(tiny_sft, dtype=torch.bfloat16).save_pretrained(half)
    src = resolve_checkpoint(tiny_sft)
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(src, f), half / f)
    _, _, folder = llava_rlhf_reward_model(tiny_sft, tmp_path)
    placed = []
    real = checkpoint.set_param
    monkeypatch.setattr(checkpoint, "set_param", lambda model, name, t: (
        placed.append((name, t.dtype)), real(model, name, t))[1])
    code, _, err = run_cli("reward", ["--init", str(half), "--import_llava_rlhf", str(folder),
                                      "--out", str(tmp_path / "rm")])
    assert code == 0, err
    decoder = {dt for name, dt in placed if name.startswith("language_model.")}
    assert decoder == {torch.bfloat16}
    assert "reward" in load_checkpoint(resolve_checkpoint(str(tmp_path / "rm"))).heads


def test_a_llava_rlhf_reward_lora_is_refused_as_a_policy(tmp_path):
    """The LoRA of a LLaVA-RLHF reward model (checkpoint-N/adapter_model/lora_default, its base
    found beside it) loaded as a policy (--init, --ckpt, --policy_lora) with its reward_head left
    unread: generation ran the reward LoRA without a word. Refused, as our reward models are; as
    --reward, how to import it is said."""
    import shutil
    from checkpoint import refuse_scalar_model
    tok = llama_tokenizer(legacy=True)
    save_checkpoint_files(model_for(tok), tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    _, _, folder = llava_rlhf_reward_model(str(tmp_path / "sft"), tmp_path)
    lora = folder / "adapter_model" / "lora_default"
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/elsewhere/sft"  # (the training machine's path)
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    shutil.copytree(tmp_path / "sft", folder / "sft")  # (its base beside it: found there)
    why = f"the LoRA of a LLaVA-RLHF reward model \\(its reward_head is in {folder}\\)"
    with pytest.raises(CheckpointError, match=f"^{lora}: {why}, not a policy"):
        common.load_model_and_tokenizer(str(lora))
    # its base named: reward.py's --init defaults to ckpt/sft, and the import checks no base
    command = f"python reward.py --init {folder / 'sft'} --import_llava_rlhf {folder}"
    with pytest.raises(CheckpointError, match=f"{why}, not a policy: import it with {command}, "
                                              "or pass a policy"):
        refuse_scalar_model(str(lora))  # (ppo.py's --policy_lora: test_llava_rlhf_reward_model_...)
    import ppo  # ... and as --reward it says how to import it ("python reward.py writes one")
    for given in (folder, lora):
        with pytest.raises(common.ConfigError, match=f"\\({command} imports this LLaVA-RLHF"):
            ppo.reward_settings(str(given))
    os.remove(folder / "reward_head")  # (a LoRA alone is a policy's)
    assert "default" in common.load_model_and_tokenizer(str(lora))[0].adapters
    (folder / "reward_head").write_bytes(b"")
    shutil.rmtree(folder / "sft")  # (its base not found: a word to fill in)
    with pytest.raises(common.ConfigError, match="--init ITS_BASE --import_llava_rlhf"):
        ppo.reward_settings(str(folder))


# ----------------------------------------------------------------------------------------
# LLaVA-1.5's POPE files (the real ones: realdata_check.py)
# ----------------------------------------------------------------------------------------

def test_llava_pope_test_file_labels_by_order_and_llava_answers(tmp_path):
    from conftest import run_cli

    def jsonl(name, rows):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return str(tmp_path / name)
    suffix = "\nAnswer the question using a single word or phrase."
    asks = [("a.jpg", "dog", "yes"), ("a.jpg", "cat", "no"), ("b.jpg", "car", "yes"),
            ("b.jpg", "bus", "no")]
    label_rows = [{"question_id": i, "image": im, "text": f"Is there a {o} in the image?",
                   "label": lab}
                  for i, (im, o, lab) in enumerate(asks)]
    labels = {c: jsonl(f"coco_pope_{c}.json", label_rows) for c in ("random", "adversarial")}
    questions = [{"question_id": 10 * k + i, "image": im,
                  "text": f"Is there a {o} in the image?" + suffix, "category": c}
                 for k, c in enumerate(("adversarial", "random"))
                 for i, (im, o, _) in enumerate(asks)]
    qfile = jsonl("llava_pope_test.jsonl", questions)
    said = {"adversarial": ["Yes", "Yes", "No", "No"], "random": ["Yes", "No", "Yes", "No"]}
    answer_rows = [{"question_id": q["question_id"], "prompt": q["text"],
                    "text": said[q["category"]][q["question_id"] % 10]}
                   for q in questions]
    answers = jsonl("answers.jsonl", answer_rows)
    argv = ["--rescore", "true", "--benchmarks", "pope", "--out", str(tmp_path / "out"),
            "--pope_files", qfile,
            "--pope_labels", labels["random"], labels["adversarial"], "--llava_answers", answers]
    code, _, err = run_cli("eval", argv)
    assert code == 0, err
    scores = json.load(open(tmp_path / "out" / "sft" / "scores.json"))["pope"]
    assert scores["random"]["f1"] == 1.0 and scores["random"]["n"] == 4
    adversarial = scores["adversarial"]
    assert (adversarial["tp"], adversarial["fp"], adversarial["fn"]) == (1, 1, 1)
    # question ids written as floats (pandas' 10.0) are the questions of those ids, as in LLaVA's
    # eval_pope.py (a dict lookup, 10.0 == 10); they matched nothing
    floats = jsonl("answers_float_ids.jsonl",
                   [dict(r, question_id=float(r["question_id"])) for r in answer_rows])
    code, _, err = run_cli("eval", argv[:-1] + [floats] + ["--out", str(tmp_path / "floats")])
    assert code == 0, err
    again = json.load(open(tmp_path / "floats" / "sft" / "scores.json"))["pope"]
    assert again["random"]["f1"] == 1.0 and again["adversarial"]["tp"] == 1
    # a label file of other questions: one line naming the question file and record, exit 2
    other_question = {"question_id": 0, "image": "a.jpg", "text": "Is there a cat in the image?",
                      "label": "no"}
    swapped = jsonl("coco_pope_adversarial_other.json", [other_question] * 4)
    code, _, err = run_cli("eval", argv[:9] + [labels["random"], swapped] + argv[11:])
    assert code == 2 and "llava_pope_test.jsonl: record 0 (id 0): field 'text'" in err
    # an answers file for other questions
    other_answer = {"question_id": 0, "prompt": "Describe the image.", "text": "Yes"}
    other = jsonl("other_answers.jsonl", [other_answer])
    code, _, err = run_cli("eval", argv[:-1] + [other])
    assert code == 2 and "other_answers.jsonl: record 0 (id '0'): field 'prompt'" in err
