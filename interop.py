"""Other tools' formats, written or loaded as adapters (checkpoint.py detects, reads, loads and
saves checkpoints; this module holds what goes to and comes from the tools around it):

    export_llava_hf: a directory transformers' LlavaForConditionalGeneration and AutoProcessor
        load (hub layout, tokenizer, LlavaProcessor files, a chat template)
    PEFT LoRA adapters, both ways: export_peft_adapter, load_peft_adapter (checkpoint's
        load_checkpoint and load_adapters read a PEFT folder through it)
    LLaVA-RLHF reward models (its LoRA + reward_head): load_llava_rlhf_reward

Weights go by explicit key mapping, as in checkpoint.py; transformers is imported for tokenizer
files alone.
"""
import copy
import json
import math
import os
import re

import torch

from checkpoint import (EXPORT_TEMPLATE, FORMAT_NAME, all_finite, canonical_key, canonical_state,
                        detect_layout, is_peft_dir, latest_checkpoint, merged_makers, module_of,
                        note, our_targets, peft_base_dir, read_json, recorded_template,
                        save_safetensors, unreadable)
from model import LORA_TARGETS, CheckpointError, check_name


# ----------------------------------------------------------------------------------------
# llava-hf export: what transformers' LlavaForConditionalGeneration and AutoProcessor load
# ----------------------------------------------------------------------------------------

def export_llava_hf(model, path, tokenizer=None, template=None, merge=True):
    """A directory that transformers' LlavaForConditionalGeneration.from_pretrained loads (hub
    layout), with the tokenizer, a LlavaProcessor (LLaVA's pad-to-square image processor) and a chat
    template for `template` (default: the one the model's source records, as trained, else
    vicuna_v1), so that AutoProcessor.from_pretrained(path) prepares inputs as our
    tokenization does. `tokenizer` defaults to the one saved beside the weights this model was
    loaded from. An image token id < 0 (original LLaVA's -200) becomes a real id: the tokenizer's
    <image>, or a new token with a new embedding row (the mean row, as llava-hf's conversion does).
    A 'linear' projector is written as linear_1 + identity activation + an identity linear_2
    (exact); CLIP layers after the selected one are never used by LLaVA, so they are written as
    zeros. merge: the active LoRA adapter is merged into the weights (the export answers as the
    model does); merge=False writes the base alone (the base of export_peft_adapter). Other
    adapters and scalar heads have no place in the format: left out, named in a note."""
    c = model.config
    tok = tokenizer if tokenizer is not None else _saved_tokenizer(model)
    # (as trained: vicuna_v1 whatever the model was trained with prompted a llava_v1 model's
    # export with another system text)
    source = getattr(model, "source_path", None)
    trained = recorded_template(source) if source else None
    known = template or trained  # (recorded in config.json: a fallback is not what it was
    # trained with, and read back as such it gave wrong advice and refused a PPO run)
    written = template or (trained if trained != "plain" else None) or "vicuna_v1"
    if tok is not None:  # (a template it cannot write: refused before anything is written)
        chat_template(written)
        if known == "plain":  # (LLaVA's stage 1 has no chat template; it was refused)
            note(f"note: {path}: {source} was trained with --template plain, which has no chat "
                 f"template: the export carries {written}'s", flush=True)
    if merge and model.active_adapter in model.heads:  # (merged in, its head left out: the export
        # answered as a policy, as export_peft_adapter's did before it refused it)
        raise ValueError(f"adapter '{model.active_adapter}' has a scalar head of its name (a "
                         "reward or value model), which the llava-hf format has no place for; "
                         "set_adapter the policy's adapter to export the policy, merge=False "
                         "writes the base alone, save_pretrained the whole model")
    _refuse_other_checkpoint(path)
    stale = [f for f in PROCESSOR_FILES if os.path.exists(os.path.join(path, f))]
    if tok is None and stale:  # (AutoProcessor paired them with these weights, without a word)
        raise CheckpointError(f"{path}: holds {', '.join(stale)} of an earlier export, not this "
                              "model's: pass the tokenizer (export_llava_hf(model, path, "
                              "tokenizer)), or export into another folder")
    # views of the weights where they are; each merged weight is made, and each weight brought to
    # the host, as the file is written (save_safetensors)
    state = dict(canonical_state(model))
    made = merged_makers(model) if merge else {}
    merged = model.active_adapter if merge else None
    left = sorted(set(model.adapters) - {merged} - {None}) + sorted(model.heads)
    if merged or left:
        kept = f"adapter '{merged}' merged in" if merged else ""
        gone = f"left out: {', '.join(left)} (adapters/heads)" if left else ""
        note(f"note: {path}: {'; '.join(x for x in (kept, gone) if x)}", flush=True)
    dtype = _export_dtype(state, path)  # (before the filler below: its dtype follows the tower)
    if c.projector == "linear":
        dev = state["multi_modal_projector.linear_1.weight"]
        state["multi_modal_projector.linear_2.weight"] = torch.eye(c.hidden, dtype=dev.dtype)
        state["multi_modal_projector.linear_2.bias"] = torch.zeros(c.hidden, dtype=dev.dtype)
    vdt = state["vision_tower.vision_model.pre_layrnorm.weight"].dtype
    h, m = c.vision_hidden, c.vision_intermediate
    for i in range(c.vision_layers_run, c.vision_layers):
        pre = f"vision_tower.vision_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[pre + f"self_attn.{n}.weight"] = torch.zeros(h, h, dtype=vdt)
            state[pre + f"self_attn.{n}.bias"] = torch.zeros(h, dtype=vdt)
        for n in ("layer_norm1", "layer_norm2"):
            state[pre + f"{n}.weight"] = torch.ones(h, dtype=vdt)
            state[pre + f"{n}.bias"] = torch.zeros(h, dtype=vdt)
        state[pre + "mlp.fc1.weight"] = torch.zeros(m, h, dtype=vdt)
        state[pre + "mlp.fc1.bias"] = torch.zeros(m, dtype=vdt)
        state[pre + "mlp.fc2.weight"] = torch.zeros(h, m, dtype=vdt)
        state[pre + "mlp.fc2.bias"] = torch.zeros(h, dtype=vdt)
    state["vision_tower.vision_model.post_layernorm.weight"] = torch.ones(h, dtype=vdt)
    state["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(h, dtype=vdt)
    image_id, vocab, tok = _export_image_token(model, tok, state)
    # the tokenizer's pad where it has one (config.json's is what transformers' generate fills
    # finished rows with): a config without one was read as vocab_size - 1, an ordinary token
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else None
    pad = pad if pad is not None and 0 <= pad < vocab else c.pad_token_id
    os.makedirs(path, exist_ok=True)
    save_safetensors(state, os.path.join(path, "model.safetensors"), {"format": "pt"}, made)
    vision_config = {"model_type": "clip_vision_model", "hidden_size": c.vision_hidden,
                     "intermediate_size": c.vision_intermediate,
                     "num_hidden_layers": c.vision_layers, "num_attention_heads": c.vision_heads,
                     "image_size": c.image_size, "patch_size": c.patch_size,
                     "layer_norm_eps": c.vision_eps, "hidden_act": "quick_gelu",
                     "projection_dim": c.vision_hidden}
    text_config = {"model_type": "llama", "vocab_size": vocab, "hidden_size": c.hidden,
                   "intermediate_size": c.intermediate, "num_hidden_layers": c.layers,
                   "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads,
                   "head_dim": c.head_dim, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
                   "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
                   "max_position_embeddings": c.max_position,
                   "tie_word_embeddings": c.tie_embeddings,
                   "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                   "pad_token_id": pad, "hidden_act": "silu"}
    hf = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": image_id, "image_seq_length": c.num_image_tokens,
        "vision_feature_layer": c.vision_select_layer,
        "vision_feature_select_strategy": _feature_strategy(c),
        "projector_hidden_act": "gelu" if c.projector == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": True, "pad_token_id": pad,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": dtype,
        "vision_config": vision_config,
        "text_config": text_config,
    }
    if known:
        hf[EXPORT_TEMPLATE] = known
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if tok is None:
        note(f"note: {path}: no tokenizer given or saved with the model: weights and config only "
             "(AutoProcessor needs export_llava_hf(model, path, tokenizer))", flush=True)
        return
    if tok.pad_token is None and 0 <= c.pad_token_id < len(tok):  # (the processor pads with what
        # config.json names: it had no pad token while config.json named one)
        tok = copy.deepcopy(tok)  # (the caller's tokenizer stays as it was)
        tok.pad_token = tok.convert_ids_to_tokens(c.pad_token_id)
    tok.save_pretrained(path)
    _write_processor(model, path, written, tok.eos_token)


def _export_dtype(state, path):
    """config.json's torch_dtype for an export's tensors: the dtype most of their elements have.
    The file keeps each tensor's own, but transformers loads every weight of a model in one dtype
    (its config's under dtype="auto"; no field holds one per module): a bf16 base beside the fp32
    projector a LoRA run trains was loaded with the projector rounded to bf16, without a word.
    Said in a note then, with how to keep each weight as written (widening the whole export to
    fp32 would double what dtype="auto" loads of a 7B base for a projector's few million weights;
    rounding the file would lose what load_checkpoint keeps)."""
    numel = {}
    for v in state.values():
        if v.is_floating_point():
            numel[v.dtype] = numel.get(v.dtype, 0) + v.numel()
    bulk = max(numel, key=numel.get)
    name = lambda dt: str(dt).replace("torch.", "")
    others = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dtype != bulk:
            others.setdefault(k.split(".")[0], set()).add(name(v.dtype))
    if others:
        parts = ", ".join(f"{p} ({'/'.join(sorted(d))})" for p, d in sorted(others.items()))
        note(f"note: {path}: {parts} written as held, the rest {name(bulk)}: transformers loads "
             f"every weight in one dtype (dtype='auto': config.json's {name(bulk)}), so those are "
             "cast there; from_pretrained(path, dtype=torch.float32) keeps each weight as written "
             "(load_checkpoint keeps each dtype)", flush=True)
    return name(bulk)


def _refuse_other_checkpoint(path, adapter=False):
    """An export writes into `path` as it is; what another kind of checkpoint left there was read
    in place of the export (transformers loads a PEFT adapter's adapter_config.json over the
    config.json beside it: other weights, without a word; load_checkpoint reads a model's
    config.json over an adapter's files) or damaged (a checkpoint of ours: its config.json and
    weights overwritten; a run folder: --init and --resume read the export in place of its newest
    checkpoint-N/, or that in place of an adapter). adapter: export_peft_adapter's folder.
    Refused before anything is written."""
    path = str(path)
    cfg_path = os.path.join(path, "config.json")
    what = None
    if adapter and os.path.exists(cfg_path):
        what = "a model (config.json), which load_checkpoint and --init would read instead"
    elif not adapter and os.path.exists(os.path.join(path, "adapter_config.json")):
        what = "a PEFT adapter (adapter_config.json), which transformers would load instead"
    elif os.path.isfile(cfg_path) and _is_ours(cfg_path):
        what = "a checkpoint of ours, which the export would overwrite"
    elif latest_checkpoint(path):
        what = ("a run's checkpoint-N/ folders (--init and --resume of a folder read either them "
                "or an export, not both)")
    if what:
        raise CheckpointError(f"{path}: holds {what}: export into another folder")


def _is_ours(cfg_path):
    """Whether a config.json is our checkpoint's (one that is not JSON, as an export cut off
    leaves, is not: exporting again mends it)."""
    try:
        return read_json(cfg_path).get("format") == FORMAT_NAME
    except CheckpointError:
        return False


def _feature_strategy(c):
    """transformers' vision_feature_select_strategy: 'default' drops the CLS feature."""
    return "default" if c.vision_select_feature == "patch" else "full"


# LLaVA's image preprocessing (data.CLIP_MEAN / CLIP_STD; pad to square with the mean colour,
# bicubic)
IMAGE_PROCESSOR = {"image_processor_type": "LlavaImageProcessor", "do_pad": True,
                   "do_resize": True, "resample": 3, "do_center_crop": True, "do_rescale": True,
                   "rescale_factor": 1 / 255,
                   "do_normalize": True, "do_convert_rgb": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}


# what an export writes beside the weights and config.json when it has a tokenizer
PROCESSOR_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "preprocessor_config.json", "processor_config.json", "chat_template.jinja")


def _saved_tokenizer(model):
    """The tokenizer saved beside the weights the model was loaded from (our checkpoints and
    llava-hf directories hold one), or None."""
    path = getattr(model, "source_path", None)
    files = ("tokenizer.json", "tokenizer.model")
    if not path or not any(os.path.exists(os.path.join(path, f)) for f in files):
        return None
    # tokenizer files only; weights never go through transformers
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _export_image_token(model, tok, state):
    """(image token id, vocab size, tokenizer) of the export. An id < 0 (original LLaVA's -200,
    which transformers cannot embed) becomes the tokenizer's <image> id, or a new token: then the
    embedding and lm_head grow by the rows it needs, set to the mean row (its logit is the mean
    logit: never the argmax)."""
    c = model.config
    image_id, vocab = c.image_token_id, c.vocab_size
    has_image_token = tok is not None and "<image>" in tok.get_vocab()
    have = tok.convert_tokens_to_ids("<image>") if has_image_token else None
    if image_id >= 0:
        if tok is not None and have != image_id:
            raise ValueError(f"the tokenizer's <image> id is {have} but the model's image_token_id "
                             f"is {image_id}")
        return image_id, vocab, tok
    if have is None and tok is not None:
        from tokenizers import AddedToken
        tok = copy.deepcopy(tok)  # the caller's tokenizer stays as it was
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        have = tok.convert_tokens_to_ids("<image>")
    image_id = have if have is not None else vocab
    grow = max(0, image_id + 1 - vocab)
    keys = ["language_model.model.embed_tokens.weight"]
    keys += [] if c.tie_embeddings else ["language_model.lm_head.weight"]
    for k in keys if grow else []:
        w = state[k]
        state[k] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(grow, -1)])
    return image_id, vocab + grow, tok


def chat_template(template="vicuna_v1", eos=None):
    """A Jinja chat template that renders messages exactly as data.render does for `template`:
    "{system} USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:" (image items become
    "<image>\n" before the text, as our prompts put them); eos: the text that ends an answer (the
    tokenizer's eos token, as data.end_text; default '</s>')."""
    from data import EOS_TEXT, SYSTEM  # the template text lives with the tokenization it must match
    if template not in SYSTEM:
        raise ValueError(f"no chat template for '{template}' (choose from {', '.join(SYSTEM)})")
    return ("{{- " + json.dumps(SYSTEM[template] + " ") + " -}}"
            "{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
            "{%- else -%}{%- set text = namespace(s='') -%}"
            "{%- for item in message['content'] if item['type'] == 'image' -%}"
            "{%- set text.s = text.s + '<image>\\n' -%}{%- endfor -%}"
            "{%- for item in message['content'] if item['type'] == 'text' -%}"
            "{%- set text.s = text.s + item['text'] -%}{%- endfor -%}"
            "{%- set text = text.s -%}{%- endif -%}"
            "{%- if message['role'] == 'user' -%}{{- 'USER: ' + text + ' ' -}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- 'ASSISTANT: ' + text + " + json.dumps(eos or EOS_TEXT) + " -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")


def _write_processor(model, path, template, eos):
    """preprocessor_config.json (LLaVA's pad-to-square), processor_config.json (LlavaProcessor:
    patch size, feature strategy; one CLS token that 'default' drops) and chat_template.jinja."""
    c = model.config
    pre = dict(IMAGE_PROCESSOR, size={"shortest_edge": c.image_size},
               crop_size={"height": c.image_size, "width": c.image_size})
    proc = {"processor_class": "LlavaProcessor", "patch_size": c.patch_size,
            "num_additional_image_tokens": 1,
            "vision_feature_select_strategy": _feature_strategy(c),
            "image_token": "<image>"}
    for name, obj in (("preprocessor_config.json", pre), ("processor_config.json", proc)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(chat_template(template, eos))
    # AutoProcessor reads processor_class here too; padding on the left, as llava-hf's files say
    # (batched generate in transformers reads right-padded prompts wrong, with a warning)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    tcfg = read_json(cfg_path) if os.path.exists(cfg_path) else {}
    with open(cfg_path, "w") as f:
        json.dump(dict(tcfg, processor_class="LlavaProcessor", padding_side="left"), f, indent=2)


# ----------------------------------------------------------------------------------------
# PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors), both ways
# ----------------------------------------------------------------------------------------

# PEFT full-matches a string target against module names
PEFT_LM_TARGETS = r".*language_model\..*\.({})"


def export_peft_adapter(model, path, adapter, base=None):
    """A LoRA adapter in PEFT's format, keyed by the module names of transformers'
    LlavaForConditionalGeneration (transformers >= 4.52 / 5), targeting the language model only (a
    regex: bare names like 'q_proj' would also put LoRA on CLIP's q/k/v). `base` is the directory
    transformers loads the base model from (an export_llava_hf directory); default: the llava-hf
    directory this model was loaded from while its base weights are unchanged (no merge, no base
    training since), else `path/base`, written here with export_llava_hf. The
    config names LlavaForConditionalGeneration (PEFT's auto_mapping), so
    peft.AutoPeftModel.from_pretrained(path) loads base and adapter on its own."""
    if adapter not in model.adapters:
        raise ValueError(f"no adapter '{adapter}'")
    if adapter in model.heads:  # (written alone, it loaded as a policy: eval answered with it)
        raise ValueError(f"adapter '{adapter}' has a scalar head of its name (a reward or value "
                         "model), which PEFT's adapter format has no place for; save the model "
                         "with save_pretrained instead")
    _refuse_other_checkpoint(path, adapter=True)
    a = model.adapters[adapter]
    state = {}
    for i, lin in model.lora_linears():
        if adapter in lin.lora:
            ad = lin.lora[adapter]
            for s in ad.A:
                key = f"base_model.model.model.language_model.layers.{i}.{module_of(s)}.{s}_proj"
                state[key + ".lora_A.weight"] = ad.A[s].detach()
                state[key + ".lora_B.weight"] = ad.B[s].detach()
    os.makedirs(path, exist_ok=True)
    if base is None:
        src = getattr(model, "source_path", None)
        unchanged = not model.base_edited  # (a merge or training since loading: not src's)
        if unchanged and src and not is_peft_dir(src) and detect_layout(src) == "llava-hf":
            base = src
        else:
            base = os.path.join(path, "base")
            export_llava_hf(model, base, merge=False)
    save_safetensors(state, os.path.join(path, "adapter_model.safetensors"), {"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": None, "r": a["r"], "lora_alpha": a["alpha"],
           "lora_dropout": a["dropout"], "target_modules": _peft_target_regex(a),
           "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "init_lora_weights": True, "use_rslora": False, "use_dora": False,
           "modules_to_save": None, "base_model_name_or_path": os.path.abspath(str(base)),
           "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                            "parent_library": "transformers.models.llava.modeling_llava"}}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _peft_target_regex(adapter):
    """PEFT's target_modules for one of our adapters: its projections of the language model, on
    every layer, or on the layers it has (a group per set of projections sharing their layers)."""
    targets = adapter["targets"]
    if adapter.get("layers") is None:
        return PEFT_LM_TARGETS.format("|".join(f"{t}_proj" for t in targets))
    by_layers = {}
    for t in targets:
        ids = tuple(adapter["layers"].get(t, ()))
        if ids:
            by_layers.setdefault(ids, []).append(f"{t}_proj")
    groups = [f"(?:{'|'.join(map(str, ids))})\\.[a-z_]+\\.(?:{'|'.join(projections)})"
              for ids, projections in by_layers.items()]
    return rf".*language_model\..*layers\.(?:{'|'.join(groups)})"


def _peft_names_rule(names, field, cfg_path, absent):
    """PEFT's match of a module name against target_modules or exclude_modules
    (peft.tuners.tuners_utils.check_target_module_exists): a string full-matches as a regex, a list
    matches a name or its last dotted parts (an empty list none); 'all-linear' every linear but
    the output head (lm_head, which PEFT leaves out of it); None (PEFT's defaults per model
    type): `absent`."""
    if names is None:
        return lambda module: absent
    if str(names).lower() == "all-linear":
        return lambda module: module.split(".")[-1] != "lm_head"
    if isinstance(names, str):
        try:
            rule = re.compile(names)
        except re.error as e:
            raise CheckpointError(f"{cfg_path}: field '{field}': not a regex ({e})")
        return lambda module: rule.fullmatch(module) is not None
    if isinstance(names, list) and all(isinstance(t, str) for t in names):
        return lambda module: any(module == t or module.endswith("." + t) for t in names)
    raise CheckpointError(f"{cfg_path}: field '{field}': expected a regex string or a list of "
                          f"module names, got {names!r:.60}")


def _peft_layer_rule(cfg, cfg_path):
    """PEFT's layers_to_transform (with layers_pattern): module name -> whether its layer index
    (the first number after a layers_pattern part, or after any part) is one listed, or the name
    is listed whole in target_modules; None where no layers are given. PEFT's LoraConfig refuses
    them beside a target_modules string (a regex, or 'all-linear'), and layers_pattern alone."""
    layers, patterns = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    targets = cfg.get("target_modules")
    for field in ("layers_to_transform", "layers_pattern"):
        if isinstance(targets, str) and cfg.get(field) is not None:
            raise CheckpointError(f"{cfg_path}: field '{field}': PEFT refuses it beside a "
                                  f"target_modules string ({targets!r:.60})")
    if patterns and layers is None:
        raise CheckpointError(f"{cfg_path}: field 'layers_pattern': PEFT refuses it without "
                              "layers_to_transform")
    if layers is None or layers == []:
        return None
    one = type(layers) is int
    if not one and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise CheckpointError(f"{cfg_path}: field 'layers_to_transform': expected a layer index "
                              f"or a list of them, got {layers!r:.60}")
    patterns = ([patterns] if patterns else None) if isinstance(patterns, str) else patterns
    if patterns and not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
        raise CheckpointError(f"{cfg_path}: field 'layers_pattern': expected a name or a list of "
                              f"names, got {patterns!r:.60}")
    try:  # the first numbered part: a MoE expert index after the layer's is not the layer
        rules = [re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns] if patterns \
            else [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    except re.error as e:
        raise CheckpointError(f"{cfg_path}: field 'layers_pattern': not a regex ({e})")
    # a name listed whole skips the layer check; PEFT first condenses a list of 20 or more names
    # to their shortest distinguishing suffixes, after which (about always) none is listed whole
    listed = targets if targets and len(targets) < 20 else []

    def in_layers(module):
        if module in listed:
            return True
        match = next((m for m in (r.match(module) for r in rules) if m), None)
        if match is None or match["idx"] is None:  # ('a|b' can match without the index)
            return False
        i = int(match["idx"])
        return i == layers if one else i in layers
    return in_layers


def _peft_left_out_by(cfg, cfg_path):
    """PEFT's choice of the modules an adapter gives LoRA (check_target_module_exists): module
    name -> None where PEFT targets it, else the config field that leaves it out."""
    targeted = _peft_names_rule(cfg.get("target_modules"), "target_modules", cfg_path, True)
    excluded = _peft_names_rule(cfg.get("exclude_modules"), "exclude_modules", cfg_path, False)
    in_layers = _peft_layer_rule(cfg, cfg_path)

    def left_out_by(module):
        if excluded(module):
            return "exclude_modules"
        if not targeted(module):
            return "target_modules"
        if in_layers is not None and not in_layers(module):
            return "layers_to_transform"
        return None
    return left_out_by


# llava-hf module prefixes before transformers 4.52 and after
LLAVA_HF_RENAMES = (("language_model.model.", "model.language_model."),
                    ("language_model.lm_head", "lm_head"),
                    ("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."))


def _llava_hf_layouts(module):
    """A module name as written, and in the other llava-hf layout if it is in one."""
    for old, new in LLAVA_HF_RENAMES:
        if module.startswith(old):
            return [module, new + module[len(old):]]
        if module.startswith(new):
            return [module, old + module[len(new):]]
    return [module]


def load_peft_adapter(model, path, name, no_merge=None):
    """Read a PEFT LoRA adapter trained on this model's base (llava-hf in any key layout, or LLaMA
    keys). LoRA on q,k,v,o,gate,up,down of the language model becomes the adapter `name`; LoRA on
    the vision tower, the projector or lm_head is merged into the base weights (W += (alpha/r) B A)
    with a one-line notice: our adapters live on the language model, so those modules have no
    adapter to hold it. no_merge (a reason, completing 'LoRA on X (not the language model) ...'):
    such LoRA is refused instead. A refused adapter leaves the model as it was."""
    check_name("adapter", name)  # (before any LoRA is merged into the base)
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: field 'peft_type': "
                              f"{cfg.get('peft_type')!r:.60} (only LORA is read)")
    for field in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if cfg.get(field):
            raise CheckpointError(f"{cfg_path}: field '{field}': true is not supported (plain LoRA "
                                  "only)")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices"):
        if cfg.get(field):
            raise CheckpointError(f"{cfg_path}: field '{field}': "
                                  f"{cfg[field]!r:.60} is not supported (plain LoRA only)")
    # a base PEFT rewrites from the weights at load (not converted when saved), LoRA from the
    # invocation tokens on (aLoRA), layers reordered: read as plain LoRA, each answered wrongly
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
        raise CheckpointError(f"{cfg_path}: field 'init_lora_weights': "
                              f"{init!r:.60} is not supported (save it converted to plain LoRA: "
                              "PEFT's "
                              "path_initial_model_for_weight_conversion)")
    for field in ("alora_invocation_tokens", "layer_replication", "target_parameters"):
        if cfg.get(field):
            raise CheckpointError(f"{cfg_path}: field '{field}': {cfg[field]!r:.60} is not "
                                  "supported (plain LoRA only)")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: field 'bias': {cfg['bias']!r:.60} is not supported "
                              "('none')")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    # (JSON true is an int to Python; Infinity and NaN parse: a model of NaNs answers '')
    if type(r) is not int or r < 1 or type(alpha) not in (int, float) \
            or not math.isfinite(alpha):
        raise CheckpointError(f"{cfg_path}: fields 'r' and 'lora_alpha': expected a positive "
                              f"integer and a finite number, got {r!r:.20} and {alpha!r:.20}")
    if cfg.get("use_rslora"):  # rank-stabilised LoRA scales by alpha / sqrt(r) (Kalajdzievski
        alpha = alpha * math.sqrt(r)  # 2023): held as plain LoRA's alpha / r with this alpha
    dropout = cfg.get("lora_dropout") or 0.0
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:  # (a ValueError in nn.Dropout)
        raise CheckpointError(f"{cfg_path}: field 'lora_dropout': expected a number in [0, 1), "
                              f"got {dropout!r:.40}")
    left_out_by = _peft_left_out_by(cfg, cfg_path)
    names = ("adapter_model.safetensors", "adapter_model.bin")
    files = [f for f in names if os.path.exists(os.path.join(path, f))]
    if not files:
        raise CheckpointError(f"{path}: no adapter_model.safetensors (or adapter_model.bin)")
    file = os.path.join(path, files[0])
    try:  # adapters are small: read whole
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unreadable(file, e, "the adapter weights")
    text, merged = {}, []
    ours = {parts[0]: n for n, parts in our_targets(model.config).items() if len(parts) == 1}
    params = dict(model.named_parameters())

    def refuse_tied_head(key, module):  # (saved with its base_layer copy or without it)
        if model.config.tie_embeddings and module.endswith("lm_head"):
            raise CheckpointError(f"{file}: key '{key}': LoRA on the lm_head of a model whose "
                                  "lm_head is its input embedding (tied) is not supported")

    for key in sorted(state):
        if key.endswith(".lora_B.weight"):
            if key.replace("lora_B", "lora_A") not in state:  # (else dropped without a word)
                raise CheckpointError(f"{file}: key '{key.replace('lora_B', 'lora_A')}' is "
                                      "missing")
            continue
        if key.endswith(".base_layer.weight"):  # (PEFT's save_embedding_layers, 'auto' with
            # LoRA on lm_head: the head's own weight beside its LoRA, which PEFT loads back in)
            module = key[:-len(".base_layer.weight")].removeprefix("base_model.model.")
            refuse_tied_head(key, module)
            own = params.get(ours.get(canonical_key(module + ".weight")))
            # (built on the meta device, an FSDP rank other than 0: the shape alone; rank 0, which
            # reads the weights, compares the values)
            if own is None or own.shape != state[key].shape or not own.is_meta and \
                    not torch.equal(own.detach().cpu().float(), state[key].float()):
                raise CheckpointError(f"{file}: key '{key}': a copy of '{module}' that differs "
                                      "from this model's (a resized or trained layer) is not "
                                      "supported")
            continue
        if not key.endswith(".lora_A.weight"):
            raise CheckpointError(f"{file}: key '{key}' is not a LoRA A/B weight (embedding LoRA "
                                  "or saved modules are not supported)")
        module = key[:-len(".lora_A.weight")].removeprefix("base_model.model.")
        refuse_tied_head(key, module)
        # PEFT gives a module it does not target no LoRA and drops its weights; PEFT may rename
        # llava-hf keys between layouts before matching, so a name passes in either layout
        reasons = [left_out_by(n) for n in _llava_hf_layouts(module)]
        if None not in reasons:
            field = next(f for f in ("exclude_modules", "layers_to_transform", "target_modules")
                         if f in reasons)
            raise CheckpointError(f"{cfg_path}: field '{field}': {cfg[field]!r:.80} leaves out "
                                  f"'{module}', which {os.path.basename(file)} holds LoRA "
                                  "weights for")
        if key.replace("lora_A", "lora_B") not in state:
            raise CheckpointError(f"{file}: key '{key.replace('lora_A', 'lora_B')}' is missing")
        A, B = state[key].float(), state[key.replace("lora_A", "lora_B")].float()
        for k, t in ((key, A), (key.replace("lora_A", "lora_B"), B)):
            if not all_finite(t):
                raise CheckpointError(f"{file}: key '{k}' holds NaN or infinite values")
        part, pname = canonical_key(module + ".weight")
        m = re.fullmatch(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight", pname or "")
        if part == "text" and m and m[3] in LORA_TARGETS and int(m[1]) < model.config.layers:
            text[int(m[1]), m[3]] = (key, A, B)
            continue
        if part == "vision" and pname.startswith("encoder.layers.") and \
                int(pname.split(".")[2]) >= model.config.vision_layers_run:
            continue  # a CLIP layer after the selected one: never run
        one_linear = part == "projector" and model.config.projector == "linear"
        if no_merge:
            raise CheckpointError(f"{file}: key '{key}': LoRA on '{module}' (not the language "
                                  f"model) {no_merge}")
        if one_linear:  # (llava-hf's: W2 (W1 + sBA) is W2 W1 + s W2 B A, not merged here)
            what = ("a projector whose two linears are read as one (projector_hidden_act "
                    "'linear')" if "multi_modal_projector" in module else "a one-linear projector")
            raise CheckpointError(f"{file}: key '{key}': LoRA on '{module}' of {what} is not "
                                  "supported: merge it with PEFT first")
        if (part, pname) not in ours:
            raise CheckpointError(f"{file}: key '{key}': LoRA on '{module}' does not fit this "
                                  "model")
        w = params[ours[part, pname]]
        want_a, want_b = (r, w.shape[1]), (w.shape[0], r)  # (r: the config's, as PEFT builds it)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise CheckpointError(f"{file}: key '{key}' has shape {tuple(A.shape)} / "
                                  f"{tuple(B.shape)} but '{module}' is {tuple(w.shape)}, so r "
                                  f"{r} expects {want_a} / {want_b}")
        merged.append((module, w, A, B))
    _check_text_lora_shapes(model, text, r, file)
    # the model changes only once every key has passed (a refusal leaves it as it was)
    with torch.no_grad():
        for _, w, A, B in merged:
            # W += (alpha/r) B A (LoRA, Hu et al. 2021, eq. 3); A, B read on the CPU
            w += (alpha / r * B @ A).to(w.device, w.dtype)
    if merged:
        model.base_edited = True
        note(f"note: {path}: LoRA on {len(merged)} vision tower / projector / lm_head modules "
             "merged into the base weights (factalign's adapters hold language-model LoRA only)",
             flush=True)
    if not text:
        return
    targets = [t for t in LORA_TARGETS if any(s == t for _, s in text)]
    # LoRA where the file holds it (PEFT saves every module it targets): layers_to_transform, or a
    # target regex naming layers, leaves the other layers without an adapter, as in PEFT
    layers = {t: sorted(i for i, s in text if s == t) for t in targets}
    every = all(len(ids) == model.config.layers for ids in layers.values())
    model.add_adapter(name, r, alpha, float(dropout), targets, None if every else layers)
    with torch.no_grad():
        for i, lin in model.lora_linears():
            ad = lin.lora[name] if name in lin.lora else None
            for s in ad.A if ad is not None else ():
                _, A, B = text[i, s]
                ad.A[s].copy_(A)
                ad.B[s].copy_(B)


def _check_text_lora_shapes(model, text, r, file):
    """Each language-model LoRA pair fits its projection: A (r, in), B (out, r)."""
    for (i, s), (key, A, B) in sorted(text.items()):
        lin = next(lin for j, lin in model.lora_linears() if j == i and s in lin.slices)
        want_a, want_b = (r, lin.weight.shape[1]), (lin.slices[s], r)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise CheckpointError(f"{file}: key '{key}' has shape {tuple(A.shape)} / "
                                  f"{tuple(B.shape)} but the model expects {want_a} / {want_b}")


# ----------------------------------------------------------------------------------------
# LLaVA-RLHF reward models: its LoRA (a PEFT adapter) + reward_head
# ----------------------------------------------------------------------------------------

def llava_rlhf_reward_of(path):
    """The LLaVA-RLHF reward model folder (checkpoint-N/, with reward_head) whose LoRA the PEFT
    adapter at path is: path itself, its adapter_model/ or adapter_model/lora_default/; else
    None."""
    here = os.path.abspath(path)
    for _ in range(3):
        if os.path.isfile(os.path.join(here, "reward_head")):
            return here
        if os.path.basename(here) not in ("adapter_model", "lora_default"):
            return None
        here = os.path.dirname(here)
    return None


def import_llava_rlhf_command(rm):
    """The reward.py command that imports the LLaVA-RLHF reward model folder rm onto its own base:
    --init defaults to ckpt/sft and the import checks no base, so the base is named (its LoRA's
    where that resolves, else ITS_BASE for the user to fill in)."""
    try:
        base = peft_base_dir(llava_rlhf_reward_parts(rm)[0])
    except CheckpointError:
        base = "ITS_BASE"
    return f"python reward.py --init {base} --import_llava_rlhf {rm}"


def llava_rlhf_reward_parts(path):
    """(PEFT adapter directory, head file) of a LLaVA-RLHF reward model: the checkpoint-N folder its
    finetune_lora_rm.py saves (SavePeftModelCallback): the backbone's LoRA in adapter_model/ (in
    adapter_model/lora_default/, PEFT's folder for an adapter not named 'default'), and
    torch.save(reward_head.state_dict()) as reward_head. Looked up as its
    load_4bit_reward_model_for_inference does."""
    head = os.path.join(path, "reward_head")
    if not os.path.isfile(head):
        raise CheckpointError(f"{path}: no reward_head file (not a LLaVA-RLHF reward model "
                              "checkpoint: checkpoint-N/ of its finetune_lora_rm.py)")
    adapter = path
    for sub in ("adapter_model", "lora_default"):
        if os.path.isdir(os.path.join(adapter, sub)):
            adapter = os.path.join(adapter, sub)
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise CheckpointError(f"{adapter}: no adapter_config.json (the reward model's LoRA, saved "
                              "beside its reward_head)")
    return adapter, head


def load_llava_rlhf_reward(model, path, name="reward"):
    """Add a LLaVA-RLHF reward model trained on this model's base: its LoRA as adapter `name` and
    its reward_head (nn.Linear(hidden, 1)) as head `name`. Its score is RewardModel.forward's:
    reward_head(the last hidden state, after the final norm, at the last token), which is what
    common.score_sequences reads with head `name`."""
    adapter, file = llava_rlhf_reward_parts(path)
    if name in model.adapters or name in model.heads:
        raise CheckpointError(f"{path}: adapter/head '{name}' exists already in this model")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise unreadable(file, e, "the reward head")
    shapes = {"weight": (1, model.config.hidden), "bias": (1,)}
    if not isinstance(state, dict) or sorted(state) != sorted(shapes):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{file}: expected nn.Linear(hidden, 1)'s state dict (weight, bias), "
                              f"got {keys!r:.80}")
    for key, shape in shapes.items():
        got = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else None
        if got != shape:
            raise CheckpointError(f"{file}: key '{key}': expected shape {shape} (hidden "
                                  f"{model.config.hidden}), got {got}")
        if not bool(torch.isfinite(state[key]).all()):
            raise CheckpointError(f"{file}: key '{key}' holds NaN or infinite values")
    load_peft_adapter(model, adapter, name, no_merge="cannot be kept beside base weights that "
                      "are not saved")
    if name not in model.adapters:
        raise CheckpointError(f"{adapter}: no LoRA weights on the language model")
    head = model.add_head(name)
    with torch.no_grad():
        head.weight.copy_(state["weight"].float())
        head.bias.copy_(state["bias"].float())
