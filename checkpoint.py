"""Checkpoints: every directory layout a LLaVA comes in, read and written by explicit key maps.

    ours (config.json + model.safetensors [or a `base` pointer] + adapters.safetensors)
    llava-hf (the hub layout and every layout transformers writes)
    original LLaVA / LLaVA-RLHF (CLIP weights often in a separate directory)
    a bare LLaMA + a CLIP directory (a fresh projector: the start of LLaVA's own recipe)
    a PEFT LoRA adapter on any of them (its weights read by interop.load_peft_adapter)

load_checkpoint(path) builds a model.LLaVA from any of them; save_checkpoint_files writes ours.
What other tools' formats are written as, or loaded as adapters (export_llava_hf,
export_peft_adapter, load_peft_adapter, LLaVA-RLHF's reward model), is in interop.py. No
transformers import for weights: they load by explicit key mapping (see `canonical_key`).
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import pickle
import re
import zipfile
from dataclasses import asdict, fields, replace

import torch
import torch.nn as nn

from formats import not_found
from model import LORA_TARGETS, CheckpointError, LLaVA, ModelConfig, eos_ids_ok

FORMAT_NAME, FORMAT_VERSION = "factalign", 1


def note(text, **print_kwargs):
    """A loader's note, said by rank 0 alone under torchrun: every rank loads the model, and each
    said the same note."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(text, **print_kwargs)


# ----------------------------------------------------------------------------------------
# Checkpoints: key mapping between our modules and every layout users have
# ----------------------------------------------------------------------------------------
# Our names mirror HF's except that q/k/v and gate/up are stored fused in memory. On disk we
# always write the llava-hf hub layout (unfused), so any tool that reads llava-hf reads ours.

def canonical_key(key):
    """Map a checkpoint key from any supported layout to (part, name): part in {'vision',
    'projector', 'text', 'lm_head'} and name relative to that part, or None to ignore."""
    k = key
    for p in ("model.vision_tower.vision_tower.", "model.vision_tower.", "model.language_model.",
              "model.multi_modal_projector."):
        if k.startswith(p):  # transformers 5 in-memory names / original LLaVA's nested tower
            if p == "model.vision_tower.vision_tower.":
                k = "vision_tower." + k[len(p):]
            else:
                k = k[len("model."):]
            break
    if k.startswith("vision_tower."):
        k = k[len("vision_tower."):]
    if k.startswith("vision_model."):
        return "vision", k[len("vision_model."):]
    if k.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        # transformers 5 save_pretrained: vision_tower.embeddings.* (no vision_model.)
        return "vision", k
    if k.startswith("multi_modal_projector."):
        return "projector", k[len("multi_modal_projector."):]
    # original LLaVA: Linear, or Sequential(Linear, GELU, Linear)
    if k.startswith("model.mm_projector."):
        rest = k[len("model.mm_projector."):]
        linear = {"0.": "linear_1.", "2.": "linear_2."}.get(rest[:2])
        # another projector's key (mlp3x_gelu's 4.*) was read as linear_1, over 0.*
        if linear is None and rest not in ("weight", "bias"):
            return "unknown", key
        return "projector", (linear or "linear_1.") + rest.split(".")[-1]
    if k.startswith("language_model.lm_head.") or k.startswith("lm_head."):
        return "lm_head", k.split("lm_head.", 1)[1]
    if k.startswith("language_model.model."):
        return "text", k[len("language_model.model."):]
    if k.startswith("language_model."):
        return "text", k[len("language_model."):]
    if k.startswith("model."):
        return "text", k[len("model."):]
    if k.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale")):
        return None, None  # the text half of a full CLIPModel
    return "unknown", key


def our_targets(c):
    """Our parameter name -> list of (part, canonical name) it is made of (several: stacked in
    order)."""
    t = {}
    t["vision_tower.embeddings.class_embedding"] = [("vision", "embeddings.class_embedding")]
    for e in ("patch_embedding.weight", "position_embedding.weight"):
        t[f"vision_tower.embeddings.{e}"] = [("vision", f"embeddings.{e}")]
    for w in ("weight", "bias"):
        t[f"vision_tower.pre_layrnorm.{w}"] = [("vision", f"pre_layrnorm.{w}")]
    for i in range(c.vision_layers_run):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            for w in ("weight", "bias"):
                name = f"encoder.layers.{i}.{m}.{w}"
                t[f"vision_tower.{name}"] = [("vision", name)]
    for lin in ("linear_1", "linear_2") if c.projector == "mlp2x_gelu" else ("linear_1",):
        for w in ("weight", "bias"):
            t[f"projector.{lin}.{w}"] = [("projector", f"{lin}.{w}")]
    t["language_model.embed_tokens.weight"] = [("text", "embed_tokens.weight")]
    for i in range(c.layers):
        p = f"layers.{i}."
        qkv = [("text", p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        t[f"language_model.{p}self_attn.qkv_proj.weight"] = qkv
        t[f"language_model.{p}self_attn.o_proj.weight"] = [("text", p + "self_attn.o_proj.weight")]
        gate_up = [("text", p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
        t[f"language_model.{p}mlp.gate_up_proj.weight"] = gate_up
        t[f"language_model.{p}mlp.down_proj.weight"] = [("text", p + "mlp.down_proj.weight")]
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[f"language_model.{p}{n}.weight"] = [("text", p + f"{n}.weight")]
    t["language_model.norm.weight"] = [("text", "norm.weight")]
    if not c.tie_embeddings:
        t["lm_head.weight"] = [("lm_head", "weight")]
    return t


HUB_PREFIX = {"vision": "vision_tower.vision_model.", "projector": "multi_modal_projector.",
              "text": "language_model.model.", "lm_head": "language_model.lm_head."}


class TensorSource:
    """Lazy access to the tensors of one or more weight files, by canonical (part, name)."""

    def __init__(self):
        self.where = {}   # (part, name) -> (file, original key)
        self.handles = {}
        self.whole = set()  # .bin files read whole (torch's pre-zip format: no mmap)
        self.shapes_alone = set()  # such files read so far for their names and shapes alone
        self.pending = {}  # such a file -> its keys still to be read (expect)

    def add_dir(self, path, only_parts=None):
        files = _weight_files(path)
        for f in files:
            self.add_file(f, only_parts)
        return files

    def add_file(self, f, only_parts=None):
        for key in self._keys(f):
            part, name = canonical_key(key)
            if part is None or (only_parts and part not in only_parts):
                continue
            if part == "unknown":
                raise CheckpointError(f"{f}: key '{key}' is not part of a LLaVA model (another "
                                      "architecture?)")
            if (part, name) in self.where:  # (the file read last won, in file-name order)
                other, other_key = self.where[(part, name)]
                again = f" again as '{key}'" if key != other_key else " again"
                held = (f"'{other_key}' and '{key}'" if other == f else
                        f"'{other_key}' of {other}{again}")
                raise CheckpointError(f"{f}: holds {held}: two copies of one weight (a stale "
                                      "shard or a merged copy?): keep one")
            self.where[(part, name)] = (f, key)

    def vision_from(self, clip_dir):
        """The CLIP weights from clip_dir instead of any read so far."""
        self.where = {k: v for k, v in self.where.items() if k[0] != "vision"}
        self.add_dir(clip_dir, only_parts={"vision"})

    def expect(self, reads):
        """reads: the (part, name)s the model is about to be built from. A .bin read whole is let
        go once the last of them is taken: each shard of an old-format 7B was held whole beside
        the model built from them (the model twice in memory)."""
        self.pending = {}
        for pn in reads:
            f, key = self.where.get(pn, (None, None))
            if f in self.whole:
                self.pending.setdefault(f, set()).add(key)

    def _taken(self, f, key):
        left = self.pending.get(f)
        if left is None:
            return
        left.discard(key)
        if not left:
            del self.pending[f]
            self.handles.pop(f)

    def _keys(self, f):
        return list(self._handle(f).keys())

    def _handle(self, f, values=False):
        """values: the tensors' data, not only their names and shapes (an old-format .bin's)."""
        if f not in self.handles or (values and f in self.shapes_alone):
            if f.endswith(".safetensors"):
                self.handles[f] = _open_safetensors(f)
            else:
                self.handles[f] = self._load_bin(f, values)
        return self.handles[f]

    def _load_bin(self, f, values):
        # mmap reads torch's zip format alone: an older .bin, valid, is read whole, as
        # transformers reads it, when its first tensor is taken; its names and shapes alone
        # before (on the meta device, skip_data: its pickle alone read, not its tensors' bytes,
        # which a meta load still reads through, the file read twice). Every such file was read
        # as it was listed: a sharded model all at once, and whole on each FSDP rank, which takes
        # shapes alone.
        mmap = zipfile.is_zipfile(f)
        where = "meta" if not mmap and not values else "cpu"
        try:
            with torch.serialization.skip_data() if where == "meta" else contextlib.nullcontext():
                state = torch.load(f, map_location=where, weights_only=True, mmap=mmap)
        except Exception as e:
            raise unreadable(f, e)
        _check_state_dict(f, state)
        if not mmap:
            self.whole.add(f)
        if where == "meta":
            self.shapes_alone.add(f)
        else:
            self.shapes_alone.discard(f)
        return state

    def has(self, part, name):
        return (part, name) in self.where

    def get(self, part, name):
        f, key = self.where[(part, name)]
        h = self._handle(f, values=True)
        try:
            t = h.get_tensor(key) if f.endswith(".safetensors") else h[key]
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor '{key}' (truncated or corrupt file?): "
                                  f"{e}")
        self._taken(f, key)
        if not t.is_floating_point():  # (integers would be read as weights without a word)
            raise CheckpointError(f"{f}: tensor '{key}' is {str(t.dtype).removeprefix('torch.')}: "
                                  "weights are floating-point")
        return t

    def shape(self, part, name):
        f, key = self.where[(part, name)]
        h = self._handle(f)
        if f.endswith(".safetensors"):
            return tuple(h.get_slice(key).get_shape())
        return tuple(h[key].shape)

    def key(self, part, name):
        f, key = self.where[(part, name)]
        return f"{f}: key '{key}'"


def _open_safetensors(f):
    from safetensors import safe_open
    try:
        return safe_open(f, framework="pt", device="cpu")
    except Exception as e:
        raise unreadable(f, e)


# how a file torch.save wrote begins: its zip archive, or (before torch 1.6, or saved with
# _use_new_zipfile_serialization=False) the pickle of torch's magic number, in any protocol
TORCH_FILE_STARTS = (b"PK\x03\x04",) + tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p)
    for p in range(pickle.HIGHEST_PROTOCOL + 1))


def unreadable(f, e, what="weights"):
    """The error for a weights file that torch.load or safetensors refused with `e`. One that is no
    such file at all is named so: a .bin that begins as neither of torch's formats (a web page or a
    text saved under its name was 'cannot read weights (truncated or corrupt file?): 101', torch's
    KeyError of its first byte), a Git LFS pointer (a clone without git-lfs). Else one cut short
    or damaged: 'truncated or corrupt', with the library's first line."""
    try:
        with open(f, "rb") as file:
            head = file.read(64)
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return CheckpointError(f"{f}: a Git LFS pointer, not the file itself (`git lfs pull` in "
                               "its repository fetches it)")
    # a safetensors file: 8 bytes of header length, then the header's JSON (a web page saved
    # under its name was "header too large": its first 8 bytes read as a length)
    if f.endswith(".safetensors") and len(head) > 8 and head[8:9] != b"{":
        return CheckpointError(f"{f}: not a safetensors file (no JSON header after its 8-byte "
                               f"length); it begins {head[:24]!r}")
    # (a head shorter than a start that begins it: a file cut within its first bytes)
    if head and not f.endswith(".safetensors") and \
            not any(start.startswith(head[:len(start)]) for start in TORCH_FILE_STARTS):
        return CheckpointError(f"{f}: not a PyTorch checkpoint (neither the zip archive nor the "
                               f"pickle torch.save writes); it begins {head[:24]!r}")
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"{f}: cannot read {what} (truncated or corrupt file?): {first}")


def no_dir(path):
    """Why `path` is not a checkpoint directory (a file is named as one: it exists)."""
    if os.path.isfile(path):
        return f"{path}: a file, not a checkpoint directory (pass the folder that holds it)"
    return f"{path}: {not_found(path, 'checkpoint directory')}"


def _check_state_dict(f, obj):
    """A .bin read is a state dict, {name: tensor} (a list or a number in one was a traceback)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{f}: not a state dict of named tensors (a {type(obj).__name__})")
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{f}: key {k!r:.60} is not a name (not a state dict of named "
                                  "tensors)")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{f}: key {k!r:.60} holds a value of type {type(v).__name__}, "
                                  "not a tensor (not a state dict of named tensors)")


def _weight_files(path):
    """The files transformers' from_pretrained reads: model.safetensors when there, else the
    shards its index lists, else pytorch_model.bin, else its index's shards; then (ours, where
    transformers reads nothing) shards named model-N-of-M without an index, else every
    *.safetensors, else every pytorch_model*.bin. Another file beside them (a variant such as
    model.fp16.safetensors, an optimizer's tensors, a stale copy) is not read. Adapters' files
    are never base weights."""
    if not os.path.isdir(path):
        raise CheckpointError(no_dir(path))
    names = sorted(os.listdir(path))
    adapter_files = ("adapters.safetensors", "adapter_model.safetensors")
    kinds = (("model.safetensors", [n for n in names if n.endswith(".safetensors")
                                    and n not in adapter_files]),
             ("pytorch_model.bin", [n for n in names if n.startswith("pytorch_model")
                                    and n.endswith(".bin")]))
    for single, files in kinds:
        if single in files:
            return [os.path.join(path, single)]
        index = os.path.join(path, single + ".index.json")
        if files and os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: field 'weight_map': expected an object "
                                      "{key: file}")
            listed = sorted({str(f) for f in weight_map.values()})
            if not listed:  # (else 'no weight for ...' named neither the index nor the folder)
                raise CheckpointError(f"{index}: field 'weight_map' is empty (it lists no "
                                      "shards)")
            # (an interrupted download would otherwise show up as a missing key, far from its
            # cause)
            absent = [f for f in listed if f not in names]
            if absent:
                raise CheckpointError(f"{index}: lists the shard '{absent[0]}', which is not in "
                                      f"{path} (an incomplete copy or download?)")
            return [os.path.join(path, n) for n in listed]
    for single, files in kinds:
        stem, ext = os.path.splitext(single)
        shards = [n for n in files if re.fullmatch(re.escape(stem) + r"-\d+-of-\d+"
                                                   + re.escape(ext), n)]
        if shards:
            _check_shard_set(path, shards, stem, ext)
            return [os.path.join(path, n) for n in shards]
    for _, files in kinds:
        if files:
            return [os.path.join(path, n) for n in files]
    hint = ""
    # LLaVA's stage-1 output folder: its projector alone
    if os.path.isfile(os.path.join(path, "mm_projector.bin")):
        hint = ("; its mm_projector.bin alone is LLaVA's stage-1 projector: put the weights of "
                "the language model it was trained on beside it")
    raise CheckpointError(f"{path}: no weights found (model.safetensors, model-*.safetensors "
                          f"or pytorch_model*.bin){hint}")


def _check_shard_set(path, shards, stem, ext):
    """Shards without an index are one set, whole: a missing one was read as 'no weight for ...'
    naming no file, and two sets (a stale one of another count) were read into one model. Their
    numbers are compared as numbers (model-1-of-10 is as whole a set as model-00001-of-00010)."""
    parsed = {n: re.fullmatch(r"-(\d+)-of-(\d+)", n[len(stem):-len(ext)]).groups() for n in shards}
    totals = sorted({int(total) for _, total in parsed.values()})
    if len(totals) > 1:
        raise CheckpointError(f"{path}: shards of {len(totals)} sets ({stem}-*-of-{totals[0]} and "
                              f"-of-{totals[1]}) and no index to say which: remove the stale set")
    total, seen = totals[0], {}
    for n, (i, _) in sorted(parsed.items()):
        if not 1 <= int(i) <= total or int(i) in seen:
            why = f"the number of {seen[int(i)]} too" if int(i) in seen else f"not in 1..{total}"
            raise CheckpointError(f"{os.path.join(path, n)}: shard number {int(i)} is {why} (a "
                                  "stale or misnamed file?)")
        seen[int(i)] = n
    missing = next((i for i in range(1, total + 1) if i not in seen), None)
    if missing is not None:
        # named in the set's own padding (model-00002-of-00005, or model-2-of-5)
        width = min(len(i) for i, _ in parsed.values())
        total_text = next(iter(parsed.values()))[1]
        name = f"{stem}-{missing:0{width}d}-of-{total_text}{ext}"
        raise CheckpointError(f"{os.path.join(path, name)}: shard not found (an incomplete copy "
                              "or download?)")


def check_weight_headers(path):
    """The safetensors files loading `path` reads first (its weights, its adapters) open: their
    headers parse and the file is as long as they say (a truncated copy fails here, cheaply, not
    after an earlier model's hour of answers). The tensors themselves are read when it loads."""
    files = [os.path.join(path, n) for n in ("adapters.safetensors", "adapter_model.safetensors")]
    try:
        files += _weight_files(path)
    except CheckpointError:  # (weights in its base, or none: loading says which)
        pass
    from safetensors import safe_open
    for f in files:
        if f.endswith(".safetensors") and os.path.isfile(f):
            try:
                with safe_open(f, framework="pt", device="cpu"):
                    pass
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CheckpointError(f"{f}: cannot read weights (truncated or corrupt file?): "
                                      f"{first}")


def read_json(path):
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})")
    if not isinstance(obj, dict):  # every checkpoint JSON file we read is an object
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _get(d, key, default):
    v = d.get(key)
    return default if v is None else v


def _typed_get(d, key, default, kind, prefix=""):
    """_get, the value checked to be an integer (kind int) or a number (kind float): a hand edit
    ("32") or a list would fail far from the file."""
    v = _get(d, key, default)
    if type(v) is not int and not (kind is float and type(v) is float):
        want = "an integer" if kind is int else "a number"
        raise CheckpointError(f"config: field '{prefix}{key}': expected {want}, got {v!r:.40}")
    return v


# transformers' MistralConfig defaults where they differ from LlamaConfig's
MISTRAL_DEFAULTS = {"intermediate_size": 14336, "num_key_value_heads": 8,
                    "max_position_embeddings": 131072}


def _text_fields(t, prefix=""):
    """LLaMA config fields -> ours, with transformers' LlamaConfig defaults for absent fields
    (hub configs list only what differs from those defaults). prefix: where t is in the file."""
    for key in ("rope_scaling", "rope_parameters"):  # (a hand edit: a string or a list)
        if t.get(key) is not None and not isinstance(t[key], dict):
            raise CheckpointError(f"config: field '{prefix}{key}': expected an object, got "
                                  f"{t[key]!r:.40}")
    scaling = t.get("rope_scaling")
    scaling_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if scaling not in (None, {}) and scaling_type not in (None, "default"):
        raise CheckpointError(f"config: rope_scaling {t['rope_scaling']} is not supported")
    # transformers 5 writes the scaling here (and rope_scaling: null)
    params = t.get("rope_parameters")
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type != "default":
        raise CheckpointError(f"config: field '{prefix}rope_parameters.rope_type': "
                              f"{rope_type!r:.60} is not supported (default RoPE only)")
    # what the decoder computes: LLaMA's SiLU MLP (Gemma, Granite and Mistral's sliding window
    # share its weight names but not its math: read, they would answer wrongly without a word)
    act = t.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"config: field '{prefix}hidden_act': {act!r:.60} is not supported "
                              "(LLaMA's silu only)")
    for key in ("attention_bias", "mlp_bias"):  # (its weights were refused naming a bias key)
        if t.get(key):
            raise CheckpointError(f"config: field '{prefix}{key}': {t[key]!r:.20} is not "
                                  "supported (LLaMA's projections without biases)")
    kind = t.get("model_type", "llama")
    if kind not in ("llama", "mistral", "llava", "llava_llama", "llava_mistral"):
        raise CheckpointError(f"config: field '{prefix}model_type': {kind!r:.60} is not supported "
                              "(a LLaMA language model)")
    # an absent field is the config class's default: Mistral's differ from LLaMA's (its window:
    # 4096 tokens when absent, none when null)
    mistral = kind in ("mistral", "llava_mistral")
    defaults = MISTRAL_DEFAULTS if mistral else {}
    get = lambda key, default, kind=int: _typed_get(t, key, defaults.get(key, default), kind,
                                                    prefix)
    default_window = mistral and "sliding_window" not in t
    # (LLaMA's attention reads no window: a field left over in its config is ignored, as
    # transformers ignores it)
    window = 4096 if default_window else (t.get("sliding_window") if mistral else None)
    if window is not None and type(window) is not int:
        raise CheckpointError(f"config: field '{prefix}sliding_window': expected an integer or "
                              f"null, got {window!r:.40}")
    if window is not None and window < get("max_position_embeddings", 2048):
        absent = " (absent: Mistral's default)" if default_window else ""
        raise CheckpointError(f"config: field '{prefix}sliding_window': {window}{absent} is not "
                              "supported (attention over every earlier token only)")
    heads = get("num_attention_heads", 32)
    hidden = get("hidden_size", 4096)
    rope = t.get("rope_parameters") or {}
    theta = _typed_get(rope, "rope_theta", get("rope_theta", 10000.0, float), float,
                       prefix + "rope_parameters.")
    return dict(vocab_size=get("vocab_size", 32000), hidden=hidden,
                intermediate=get("intermediate_size", 11008),
                layers=get("num_hidden_layers", 32), heads=heads,
                kv_heads=get("num_key_value_heads", heads),
                head_dim=get("head_dim", hidden // heads if heads else 0),
                rms_eps=get("rms_norm_eps", 1e-6, float), rope_theta=theta,
                max_position=get("max_position_embeddings", 2048),
                tie_embeddings=bool(_get(t, "tie_word_embeddings", False)),
                bos_token_id=get("bos_token_id", 1), eos_token_id=_eos_ids(t, prefix))


def _eos_ids(t, prefix=""):
    """eos_token_id: one id, or several (Llama 3's configs list 128001, 128008, 128009), any of
    which ends an answer in model.generate; a list of one is its id."""
    ids = _get(t, "eos_token_id", 2)
    if not eos_ids_ok(ids):
        raise CheckpointError(f"config: field '{prefix}eos_token_id': expected an integer or a "
                              f"non-empty list of integers, got {ids!r:.40}")
    return ids[0] if type(ids) is list and len(ids) == 1 else ids


# original LLaVA's mm_vision_select_feature and mm_projector_type values this model has
FEATURES = ("patch", "cls_patch")
PROJECTORS = ("linear", "mlp2x_gelu")


def _pad_id(d, default, prefix=""):
    """d's pad_token_id, an integer; a negative one (LLaMA-1 era configs write -1 for 'none')
    is the default, as an absent one: generate feeds the pad id of finished rows back in."""
    pad = _typed_get(d, "pad_token_id", default, int, prefix)
    return default if pad < 0 else pad


def _from_file(path, make, names=()):
    """make(), its "config: ..." errors naming the checkpoint's config.json, and a field by the
    file's name for it (names: pairs of (ours, the file's))."""
    try:
        return make()
    except CheckpointError as e:
        msg = str(e)
        if not msg.startswith("config:"):
            raise
        for ours, theirs in names:
            msg = msg.replace(f"field '{ours}'", f"field '{theirs}'")
        raise CheckpointError(f"{path}/config.json{msg[len('config'):]}") from None


# transformers' LlavaConfig without a vision_config: CLIP ViT-L/14 at 336 px (LLaVA-1.5's)
LLAVA_DEFAULT_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14,
                        "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}


def vision_fields(v, prefix=""):
    """CLIPVisionConfig fields -> ours, with transformers' defaults for absent fields. prefix:
    where v is in the file."""
    if _get(v, "hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"config: field '{prefix}hidden_act': {v['hidden_act']!r:.60} is not "
                              "supported (CLIP's quick_gelu only)")
    get = lambda key, default, kind=int: _typed_get(v, key, default, kind, prefix)
    return dict(image_size=get("image_size", 224), patch_size=get("patch_size", 32),
                vision_hidden=get("hidden_size", 768),
                vision_intermediate=get("intermediate_size", 3072),
                vision_layers=get("num_hidden_layers", 12),
                vision_heads=get("num_attention_heads", 12),
                vision_eps=get("layer_norm_eps", 1e-5, float))


def _sub_config(cfg, key):
    """cfg[key], an object (absent or null: {})."""
    sub = cfg.get(key)
    if sub is not None and not isinstance(sub, dict):
        raise CheckpointError(f"config: field '{key}': expected an object, got {sub!r:.40}")
    return sub or {}


# OpenAI's CLIP ViTs' depth by width: ViT-B/32 and B/16 (768 wide) 12 layers, ViT-L/14 (1024) 24
OPENAI_CLIP_LAYERS = {768: 12, 1024: 24}


def _vision_fields_from_weights(src, path, tower):
    """Infer the CLIP config from tensor shapes: only for OpenAI's CLIP ViTs (config names
    openai/clip-vit-...), whose heads are 64 wide and whose activation is quick_gelu. Other towers
    (OpenCLIP's ViT-H has 80-wide heads and gelu) would load with the wrong heads without a word."""
    name = str(tower or "")
    openai_name = os.path.basename(os.path.normpath(name)).startswith("clip-vit-")
    if not (name.startswith("openai/") or openai_name):  # (OpenAI's hub names: clip-vit-...)
        raise CheckpointError(f"{path}: mm_vision_tower {name!r:.60} is neither on disk nor in "
                              "the local hub cache, and the CLIP weights here do not give its "
                              "head count or activation (read from the weights for OpenAI's CLIP "
                              "ViTs only); pass its directory (--vision_tower DIR)")
    hidden, _, p, _ = src.shape("vision", "embeddings.patch_embedding.weight")
    n_pos = src.shape("vision", "embeddings.position_embedding.weight")[0]
    vision = [n for part, n in src.where if part == "vision"]
    layer_keys = [n for n in vision if n.startswith("encoder.layers.")]
    # (a release may leave out the layers after the selected one, never run: counted from the
    # weights, the tower was short and -2 selected another layer's output)
    layers = max(1 + max(int(n.split(".")[2]) for n in layer_keys),
                 OPENAI_CLIP_LAYERS.get(hidden, 0))
    if hidden % 64:
        where = src.key("vision", "embeddings.patch_embedding.weight")
        raise CheckpointError(f"{where}: cannot infer the CLIP head count for width {hidden}; pass "
                              "the CLIP directory (--vision_tower DIR)")
    return dict(image_size=int(round(math.sqrt(n_pos - 1))) * p, patch_size=p, vision_hidden=hidden,
                vision_intermediate=src.shape("vision", "encoder.layers.0.mlp.fc1.weight")[0],
                vision_layers=layers, vision_heads=hidden // 64)


def clip_alone(path):
    return (f"{path}: a CLIP checkpoint alone is not a LLaVA; pass a LLaMA or LLaVA directory "
            "and this one as the vision tower")


def detect_layout(path):
    """'factalign' | 'llava-hf' | 'llava' (original LLaVA / LLaVA-RLHF) | 'llama' | 'clip' | 'run'
    (a run dir)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(no_dir(path))
    if not os.path.exists(cfg_path):
        if os.path.isdir(path) and latest_checkpoint(path):
            return "run"
        adapters = sorted(n for n in os.listdir(path)
                          if os.path.exists(os.path.join(path, n, "adapter_config.json")))
        if adapters:  # (PEFT's save_pretrained of several adapters: one folder each)
            raise CheckpointError(f"{path}: no config.json; it holds the PEFT adapters "
                                  f"{', '.join(a + '/' for a in adapters)}: pass one of them")
        snapshots = os.path.join(path, "snapshots")
        # a model's folder in the hub cache, models--org--name: its files are in
        # snapshots/REVISION/
        if os.path.isdir(snapshots) and os.listdir(snapshots):
            revs = ", ".join(sorted(os.listdir(snapshots)))
            raise CheckpointError(f"{path}: no config.json; a hub cache folder: pass its "
                                  f"{snapshots}/REVISION folder (here: {revs:.200})")
        raise CheckpointError(f"{path}: no config.json (not a checkpoint directory)")
    lora_release = os.path.exists(os.path.join(path, "non_lora_trainables.bin")) and \
        any(n.startswith("adapter_model.") for n in os.listdir(path))
    if lora_release:  # (llava-v1.5-7b-lora; a merged model may keep the file beside its weights)
        raise CheckpointError(f"{path}: LLaVA's LoRA release layout (adapter_model with "
                              "non_lora_trainables.bin) is not read: merge it into its base with "
                              "LLaVA's scripts/merge_lora_weights.py and pass the merged folder")
    cfg = read_json(cfg_path)
    if cfg.get("format") == FORMAT_NAME:
        _check_own_config(cfg_path, cfg)
        return "factalign"
    if "format_version" in cfg:  # written by a checkpoint format that is not this one
        raise CheckpointError(f"{cfg_path}: format {cfg.get('format')!r:.60} version "
                              f"{cfg['format_version']!r:.60} is not a {FORMAT_NAME} checkpoint "
                              "format this code reads")
    mt = cfg.get("model_type", "")
    if mt == "llava" and "text_config" in cfg:
        return "llava-hf"
    if mt == "llava" and "mm_vision_tower" not in cfg and "mm_hidden_size" not in cfg:  # (read
        # as an original LLaVA, it was said to name a CLIP tower '' that is not on disk)
        raise CheckpointError(f"{cfg_path}: model_type 'llava' with neither text_config (a "
                              "llava-hf config) nor mm_vision_tower / mm_hidden_size (an original "
                              "LLaVA one)")
    if "mm_vision_tower" in cfg or "mm_hidden_size" in cfg or mt in ("llava", "llava_llama"):
        return "llava"
    if mt in ("llama", "mistral"):  # (Mistral: a LLaMA with a window, _text_fields checks it)
        return "llama"
    if mt in ("clip", "clip_vision_model"):
        return "clip"
    raise CheckpointError(f"{cfg_path}: unsupported model_type {mt!r:.60} (expected a LLaVA, "
                          "LLaMA or CLIP checkpoint)")


def _check_own_config(cfg_path, cfg):
    """The fields of our config.json that loading reads beside 'model' (checked in
    load_checkpoint): a hand edit or another tool's file would fail deep inside the loader."""
    def bad(field, want):
        raise CheckpointError(f"{cfg_path}: field '{field}': expected {want}, got "
                              f"{cfg.get(field)!r:.60}")
    version = cfg.get("format_version", 0)
    if type(version) is not int:
        bad("format_version", "an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version} is newer than this code reads "
                              f"({FORMAT_VERSION}); update factalign")
    if cfg.get("base") is not None and not isinstance(cfg["base"], str):
        bad("base", "a path (string)")
    if cfg.get("base_fingerprint") is not None and not isinstance(cfg["base_fingerprint"], str):
        bad("base_fingerprint", "a string (written with 'base')")
    adapters, heads = cfg.get("adapters", {}), cfg.get("heads", [])
    if not isinstance(adapters, dict):
        bad("adapters", "an object {name: {r, alpha, dropout, targets}}")
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        bad("heads", "a list of head names")
    for name, a in adapters.items():
        # (a dropout outside [0, 1) or an unknown target: a ValueError inside the model; a NaN
        # alpha: a non-finite gradient at step 1, far from its cause)
        ok = isinstance(a, dict) and type(a.get("r")) is int and a["r"] > 0 \
            and type(a.get("alpha")) in (int, float) and math.isfinite(a["alpha"]) \
            and type(a.get("dropout")) in (int, float) and 0 <= a["dropout"] < 1 \
            and isinstance(a.get("targets"), list) \
            and all(isinstance(t, str) and t.removesuffix("_proj") in LORA_TARGETS
                    for t in a["targets"]) and _layer_lists(a.get("layers"))
        if not ok:
            want = ('{"r": int > 0, "alpha": finite, "dropout": in [0, 1), "targets": some of '
                    f'{", ".join(LORA_TARGETS)}, optional "layers": {{target: [int >= 0]}}}}')
            raise CheckpointError(f"{cfg_path}: field 'adapters.{name}': expected {want}, got "
                                  f"{a!r:.60}")
    if cfg.get("active_adapter") is not None and cfg["active_adapter"] not in adapters:
        bad("active_adapter", f"null or one of the adapters {sorted(adapters)}")


def _layer_lists(layers):
    """An adapter's optional 'layers' field: {target: [layer index >= 0, ...]} (null: every
    layer)."""
    return layers is None or isinstance(layers, dict) and all(
        isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)
        for ids in layers.values())


def checkpoint_step(name):
    """N of a folder named checkpoint-N, else None. ASCII digits alone: str.isdigit takes '²',
    which int() refuses (a traceback)."""
    tail = name[len("checkpoint-"):]
    if name.startswith("checkpoint-") and tail.isascii() and tail.isdigit():
        return int(tail)
    return None


def complete_checkpoints(run_dir):
    """The complete checkpoint-N folders' names in a run directory (temp dirs are ignored),
    oldest first: by step, not by name (checkpoint-1000000 after checkpoint-999999)."""
    names = [n for n in os.listdir(run_dir) if checkpoint_step(n) is not None
             and os.path.exists(os.path.join(run_dir, n, "config.json"))]
    return sorted(names, key=checkpoint_step)


def latest_checkpoint(run_dir):
    """The newest complete checkpoint-N directory in a run directory (temp dirs are ignored)."""
    if not os.path.isdir(run_dir):
        return None
    steps = complete_checkpoints(run_dir)
    return os.path.join(run_dir, steps[-1]) if steps else None


def resolve_checkpoint(path):
    """A checkpoint directory, or a run directory -> its latest checkpoint."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        latest = latest_checkpoint(path)
        if latest:
            return latest
    return path


def _resolve_clip_dir(name, checkpoint):
    """A local CLIP directory: as named, beside the checkpoint, or, for a hub id, its snapshot in
    the local hub cache (config names like 'openai/clip-vit-large-patch14-336': where LLaVA's
    own code reads it from, offline; it was refused, 'pass --vision_tower')."""
    if not name:
        return None
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), os.path.basename(name))
    for cand in (name, beside):
        if os.path.isdir(cand) and os.path.exists(os.path.join(cand, "config.json")):
            return cand
    cached = hub_cache_dir(name)  # (asked only where neither is there)
    return cached if cached and os.path.exists(os.path.join(cached, "config.json")) else None


def hub_cache_dir(name):
    """A hub id's ('org/name') snapshot folder in the local hub cache, or None; never the
    network."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)) or os.path.exists(name):
        return None
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:  # (not in the cache, or a cache this library cannot read: not there)
        return None


def load_checkpoint(path, vision_tower=None, dtype=None, device=None, adapters=True,
                    fresh_projector_ok=True):
    """Load a LLaVA from any supported directory layout (see detect_layout). `vision_tower` names a
    CLIP directory when the checkpoint lacks the CLIP weights (original LLaVA, or a bare LLaMA:
    then the projector is freshly initialised: the starting point of SFT; fresh_projector_ok
    False refuses that). adapters False: the base weights alone, without the checkpoint's (or
    PEFT folder's) adapters and heads. Returned in eval mode, as transformers' and PEFT's
    from_pretrained do (an adapter's dropout off); the stages call train() where they train."""
    if vision_tower is not None:  # (a pathlib.Path: an AttributeError where a str's startswith
        # was read)
        vision_tower = os.fspath(vision_tower)
    if isinstance(dtype, str):  # (transformers' from_pretrained takes dtype="bfloat16"; "auto":
        # the files' own, as None; a name was a TypeError from inside the first weight's .to())
        dtype = None if dtype == "auto" else getattr(torch, dtype, dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"dtype: expected a floating-point torch dtype or its name "
                              f"(torch.bfloat16, 'bfloat16', 'auto'), got {dtype!r:.40}")
    return _load_checkpoint(path, vision_tower, dtype, device, adapters,
                            fresh_projector_ok).eval()


def _load_checkpoint(path, vision_tower, dtype, device, adapters, fresh_projector_ok):
    path = resolve_checkpoint(str(path))
    # a PEFT LoRA adapter: its base (a local directory), then the adapter, active
    if is_peft_dir(path):
        from interop import load_peft_adapter  # (it imports this module)
        model = load_checkpoint(peft_base_dir(path), vision_tower, dtype, device, adapters,
                                fresh_projector_ok)
        if not adapters:  # the base alone, as for our adapter checkpoints (it was loaded, active)
            return model
        load_peft_adapter(model, path, "default")
        if "default" in model.adapters:  # (LoRA only on CLIP or the projector: merged, no adapter)
            model.set_adapter("default")
        return model
    if vision_tower and not os.path.exists(vision_tower) and \
            (os.path.isabs(vision_tower) or vision_tower.startswith(".")):
        # (a folder of its name beside the checkpoint stood in without a word: that is for the
        # hub names configs record, as 'openai/clip-vit-large-patch14-336')
        raise CheckpointError(f"--vision_tower {vision_tower}: no such directory")
    if vision_tower and _resolve_clip_dir(vision_tower, path) is None:  # (was passed over unread)
        raise CheckpointError(f"--vision_tower {vision_tower}: not a CLIP directory (no "
                              "config.json in it, nor in a folder of its name beside the "
                              "checkpoint)")
    layout = detect_layout(path)
    cfg = read_json(os.path.join(path, "config.json"))
    src = TensorSource()
    fresh_projector = False
    clip_from = None  # the CLIP directory the vision weights come from, when not from path's files
    if layout == "factalign":  # (detect_layout checked format_version, base, adapters, heads)
        whole = ("model.safetensors", "adapters.safetensors")
        if cfg.get("fsdp_shards") and not any(os.path.exists(os.path.join(path, f))
                                              for f in whole):
            raise CheckpointError(f"{path}: an FSDP checkpoint of shards alone (written mid-run, "
                                  "each process's part of the trained weights): resume its run "
                                  "(--resume true), or give the run --save_full true for whole "
                                  "checkpoints")
        if not isinstance(cfg.get("model"), dict):
            raise CheckpointError(f"{path}/config.json: field 'model': missing or not an object")
        known = {f.name: type(f.default) for f in fields(ModelConfig)}
        unknown = set(cfg["model"]) - set(known)
        if unknown:
            raise CheckpointError(f"{path}/config.json: field 'model': unknown fields "
                                  f"{sorted(unknown)}")
        for k, v in cfg["model"].items():  # (an int is a fine float)
            int_as_float = known[k] is float and type(v) is int
            # (ModelConfig checks these lists)
            layer_list = k in ("vision_select_layer", "eos_token_id") and type(v) is list
            if (type(v) is not known[k] and not int_as_float and not layer_list
                    and known[k] is not type(None)):
                raise CheckpointError(f"{path}/config.json: field 'model.{k}': expected "
                                      f"{known[k].__name__}, got {v!r:.60}")
        try:
            config = ModelConfig(**cfg["model"])
        except CheckpointError as e:  # "config: field ...": name the file
            raise CheckpointError(f"{path}/{e}") from None
        weights_dir = base_weights_dir(path)
        _check_base_fingerprint(path, cfg)
        src.add_dir(weights_dir)
        if detect_layout(weights_dir) == "llava":  # (a base read with LLaVA's stage-1 file)
            _stage1_projector(src, weights_dir, "llava")
        has_vision = any(p == "vision" for p, _ in src.where)
        clip_from = _clip_for_base(path, vision_tower, required=not has_vision)
        if clip_from is not None:  # (a base without CLIP weights, as LLaVA's released ones)
            src.vision_from(clip_from)
        elif vision_tower:  # (it was passed over without a word)
            note(f"note: --vision_tower {vision_tower} not read: {path} holds the CLIP weights "
                 "it was trained with", flush=True)
        if detect_layout(weights_dir) == "llava-hf":  # (its projector as its config says)
            src = _llava_hf_projector(src, weights_dir,
                                      read_json(os.path.join(weights_dir, "config.json")))
    elif layout == "llava-hf":
        if vision_tower:  # (its CLIP config and weights are its own: passed over without a word)
            note(f"note: --vision_tower {vision_tower} not read: {path} (llava-hf) holds the "
                 "CLIP config and weights it was trained with", flush=True)
        # (no vision_config, or null: LlavaConfig's CLIP-L/336, not CLIPVisionConfig's own)
        vision = _from_file(path, lambda: _sub_config(cfg, "vision_config")
                            if cfg.get("vision_config") is not None else LLAVA_DEFAULT_VISION)
        vf = _from_file(path, lambda: vision_fields(vision, "vision_config."))
        strategy = _get(cfg, "vision_feature_select_strategy", "default")
        layer = _get(cfg, "vision_feature_layer", -2)  # (a list: ModelConfig checks it)
        act = _get(cfg, "projector_hidden_act", "gelu")
        if act not in ("gelu", "linear"):
            raise CheckpointError(f"{path}/config.json: projector_hidden_act {act!r:.60} is not "
                                  "supported (gelu, linear)")
        if strategy not in ("default", "full"):  # (any other word read as 'full' before)
            raise CheckpointError(f"{path}/config.json: field 'vision_feature_select_strategy': "
                                  f"{strategy!r:.60} (default or full)")
        text = _from_file(path, lambda: _sub_config(cfg, "text_config"))
        tf = _from_file(path, lambda: _text_fields(text, "text_config."))
        vocab = tf["vocab_size"]
        id_key = "image_token_index" if "image_token_index" in cfg else "image_token_id"
        image_id = cfg.get(id_key, 32000)  # (LlavaConfig's default)
        if type(image_id) is not int:
            raise CheckpointError(f"{path}/config.json: field '{id_key}': expected an integer, "
                                  f"got {image_id!r:.40}")
        if not 0 <= image_id < vocab:  # (transformers embeds it before it is replaced)
            raise CheckpointError(f"{path}/config.json: field '{id_key}': {image_id} is not a "
                                  f"token of the {vocab}-token vocabulary")
        text_pad = _from_file(path, lambda: _pad_id(text, vocab - 1, "text_config."))
        if text_pad >= vocab:  # (transformers' embedding refuses it as its padding index)
            raise CheckpointError(f"{path}/config.json: field 'text_config.pad_token_id': "
                                  f"{text_pad} is not a token of the {vocab}-token vocabulary")
        pad = _from_file(path, lambda: _pad_id(cfg, text_pad))
        if pad >= vocab:  # (transformers reads the text model's own; an export would not load)
            note(f"note: {path}/config.json: pad_token_id {pad} is not a token of the "
                 f"{vocab}-token vocabulary; text_config's {text_pad} is used, as transformers "
                 "does", flush=True)
            pad = text_pad
        feature = "patch" if strategy == "default" else "cls_patch"
        projector = "mlp2x_gelu" if act == "gelu" else "linear"
        config = _from_file(path, lambda: ModelConfig(
            **vf, **tf, vision_select_layer=layer, vision_select_feature=feature,
            projector=projector, image_token_id=image_id, pad_token_id=pad),
            names=[("vision_select_layer", "vision_feature_layer")])
        src.add_dir(path)
        src = _llava_hf_projector(src, path, cfg)
    elif layout in ("llava", "llama"):
        if layout == "llama" and not fresh_projector_ok:  # (before asking for its CLIP)
            raise _random_projector(path, "a language model")
        tf = _from_file(path, lambda: _text_fields(cfg))
        feature = _get(cfg, "mm_vision_select_feature", "patch")
        projector = _get(cfg, "mm_projector_type", "linear")
        # before the weights: another projector's keys (mlp3x_gelu's 4.*) are its, not unknown
        _check_llava_choices(path, feature, projector)
        src.add_dir(path)
        _stage1_projector(src, path, layout)
        has_vision = any(p == "vision" for p, _ in src.where)
        clip_dir = _resolve_clip_dir(vision_tower or cfg.get("mm_vision_tower"), path)
        # the CLIP config (and, when absent here, its weights) from the CLIP dir
        if clip_dir is not None:
            clip_cfg = read_json(os.path.join(clip_dir, "config.json"))
            nested = "vision_config" in clip_cfg
            vision = _from_file(clip_dir, lambda: _sub_config(clip_cfg, "vision_config")
                                if nested else clip_cfg)
            prefix = "vision_config." if nested else ""
            vf = _from_file(clip_dir, lambda: vision_fields(vision, prefix))
            if not has_vision:
                src.vision_from(clip_dir)
                clip_from = clip_dir
            elif vision_tower:  # (its own weights are what it was trained with: ShareGPT4V's are)
                note(f"note: --vision_tower {vision_tower}: its config is read; the CLIP weights "
                     f"are {path}'s own", flush=True)
        elif has_vision:
            vf = _vision_fields_from_weights(src, path, cfg.get("mm_vision_tower"))
        else:
            name = cfg.get("mm_vision_tower")
            named = f"; config names {name!r:.80}" if name else ""
            raise CheckpointError(f"{path}: the CLIP weights are not in this checkpoint; pass the "
                                  f"local CLIP directory (--vision_tower DIR{named})")
        if _get(cfg, "mm_use_im_start_end", False):
            raise CheckpointError(f"{path}/config.json: mm_use_im_start_end true is not supported")
        if layout == "llava":
            _check_aspect_ratio(path, cfg.get("image_aspect_ratio"))
        fresh_projector = layout == "llama" or not any(p == "projector" for p, _ in src.where)
        if fresh_projector and not fresh_projector_ok:  # (random image features, scored or
            # trained on without a word, into adapters that could not be loaded again)
            raise _random_projector(path, "a LLaVA without projector weights")
        pad = _from_file(path, lambda: _pad_id(cfg, 0))  # LLaVA pads with <unk> (id 0)
        layer = _get(cfg, "mm_vision_select_layer", -2)
        if type(layer) is not int:  # (LLaVA indexes hidden_states with it: one layer)
            raise CheckpointError(f"{path}/config.json: field 'mm_vision_select_layer': expected "
                                  f"an integer, got {layer!r:.40}")
        config = _from_file(path, lambda: ModelConfig(
            **vf, **tf, vision_select_layer=layer, vision_select_feature=feature,
            projector=projector, image_token_id=-200,  # LLaVA's IMAGE_TOKEN_INDEX
            pad_token_id=pad), names=[("vision_select_layer", "mm_vision_select_layer")])
    elif layout == "clip":
        raise CheckpointError(clip_alone(path))
    else:  # unreachable: resolve_checkpoint handled run dirs
        raise CheckpointError(f"{path}: no checkpoint found")
    if layout != "factalign":  # (ours records the tie as resolved when first loaded)
        top_tie = layout == "llava-hf" and bool(_get(cfg, "tie_word_embeddings", False))
        config = _tie_as_transformers(config, src, path, config.tie_embeddings or top_tie)
    model = _materialize(config, src, dtype, device, fresh_projector)
    if layout == "factalign" and adapters:
        _load_adapters(model, path, cfg, device)
    model.source_path = path
    # an adapter checkpoint saved on this model records it (save_checkpoint_files)
    model.clip_dir = None if clip_from is None else os.path.realpath(clip_from)
    return model


def _stage1_file(path, layout, src=None):
    """LLaVA's stage-1 mm_projector.bin in path when the loader reads it (an original LLaVA's
    config, its weights without a projector; src: those weights, read from path when None), else
    None: a stray one beside other weights is neither read nor part of the base's fingerprint."""
    file = os.path.join(path, "mm_projector.bin")
    if layout != "llava" or not os.path.isfile(file):
        return None
    if src is None:
        src = TensorSource()
        src.add_dir(path)
    return None if any(p == "projector" for p, _ in src.where) else file


def _stage1_projector(src, path, layout):
    """LLaVA's stage 1 saves its projector alone, as mm_projector.bin, and its stage 2 reads it
    (--pretrain_mm_mlp_adapter): beside weights without a projector it is theirs (passed over, SFT
    began from a random one beside it without a word)."""
    # (layout: 'llava' or 'llama', the configs a stage-1 file may stand beside)
    file = _stage1_file(path, "llava", src)
    if file is None:
        return
    if layout == "llama":  # (its projector_type is in LLaVA's config.json, not a LLaMA's)
        raise CheckpointError(f"{file}: not read beside a LLaMA config.json (no "
                              "mm_projector_type gives its shape): use the config.json of the "
                              "LLaVA run that saved it")
    # (a key of another projector, as mlp3x_gelu's 4.*, is refused, not passed over)
    src.add_file(file, only_parts={"projector", "unknown"})
    if not any(p == "projector" for p, _ in src.where):
        raise CheckpointError(f"{file}: no model.mm_projector.* keys (LLaVA's stage-1 projector)")
    note(f"note: {path}: the projector is read from mm_projector.bin (LLaVA's stage 1)",
         flush=True)


def _check_llava_choices(path, feature, projector):
    """An original LLaVA config's mm_vision_select_feature and mm_projector_type, named as the file
    names them (ModelConfig has its own names)."""
    for field, value, allowed in (("mm_vision_select_feature", feature, FEATURES),
                                  ("mm_projector_type", projector, PROJECTORS)):
        if value not in allowed:
            raise CheckpointError(f"{path}/config.json: field '{field}': {value!r:.60} is not "
                                  f"supported ({', '.join(allowed)})")


def _random_projector(path, what):
    return CheckpointError(f"{path}: {what}: its projector would be random; only sft.py starts "
                           "from one (LLaVA's stage 1); pass a LLaVA checkpoint")


def _check_aspect_ratio(path, aspect):
    """Original LLaVA's image_aspect_ratio (its process_images): 'pad' is what this repository
    does (pad to square, then resize); absent or 'square' (LLaVA-1.0) resizes and centre-crops,
    answered here on padded images with a note; 'anyres' (LLaVA-NeXT's tiles) is refused."""
    if aspect == "pad":
        return
    if aspect not in (None, "square"):
        raise CheckpointError(f"{path}/config.json: field 'image_aspect_ratio': {aspect!r:.40} is "
                              "not supported ('pad': LLaVA-1.5's pad to square)")
    note(f"note: {path}/config.json: image_aspect_ratio {aspect or 'absent'} (LLaVA resizes and "
         "centre-crops); images here are padded to square ('pad'), so on non-square images "
         "answers can differ from LLaVA's", flush=True)


def _clip_for_base(path, vision_tower, required):
    """The CLIP directory of our checkpoint at path when its vision weights are not its base's: the
    'vision_tower' that it, or a checkpoint on its way to the base, recorded when saved, or, when
    the base holds no CLIP weights (required; LLaVA's released checkpoints name theirs, e.g.
    'openai/clip-vit-large-patch14-336'), the base's mm_vision_tower (as named, or a folder of its
    name beside the base). --vision_tower comes before either; with a base that holds CLIP weights
    and no record it is not read (the flag is for an --init without them; load_checkpoint says so
    in a note). None: the base's own."""
    here, recorded = path, None  # (base_weights_dir has refused loops of base pointers)
    while detect_layout(here) == "factalign":
        cfg = read_json(os.path.join(here, "config.json"))
        recorded = cfg.get("vision_tower")
        if recorded is not None or cfg.get("base") is None:
            break
        here = _base_dir(here, cfg["base"])
    if recorded is None and not required:
        return None
    if vision_tower:
        return _resolve_clip_dir(vision_tower, path)  # (load_checkpoint checked that it is one)
    if recorded is not None:
        found = os.path.normpath(os.path.join(here, str(recorded)))  # (an absolute one stays)
        if not (isinstance(recorded, str) and os.path.isfile(os.path.join(found, "config.json"))):
            raise CheckpointError(f"{here}/config.json: field 'vision_tower': no CLIP directory at "
                                  f"{recorded!r:.80} (moved? pass --vision_tower DIR)")
        return found
    name = read_json(os.path.join(here, "config.json")).get("mm_vision_tower")
    found = _resolve_clip_dir(name, here) if isinstance(name, str) else None
    if found is None:
        named = f"; it names {name!r:.80}" if name else ""
        raise CheckpointError(f"{path}: its base {here} holds no CLIP weights: pass the CLIP "
                              f"directory it was trained with (--vision_tower DIR{named})")
    return found


def _llava_hf_projector(src, path, cfg):
    """A llava-hf folder's weights with its projector read as its config.json says: without
    biases (multimodal_projector_bias false: ours with zero ones, exactly), and 'linear' (our
    export of a one-layer projector: linear_2 is the identity, folded back)."""
    bias = _get(cfg, "multimodal_projector_bias", True)
    if not isinstance(bias, bool):
        raise CheckpointError(f"{path}/config.json: field 'multimodal_projector_bias': "
                              f"expected true or false, got {bias!r:.40}")
    if not bias:
        src = _ZeroProjectorBias(src)
    if _get(cfg, "projector_hidden_act", "gelu") == "linear":
        src = _FoldedLinearProjector(src)
    return src


class _ZeroProjectorBias:
    """Presents a llava-hf projector saved without biases (multimodal_projector_bias false) as one
    with zero biases: the same function."""

    def __init__(self, src):
        self.src, self.where = src, src.where

    def _zero(self, part, name):
        return part == "projector" and name.endswith(".bias") and not self.src.has(part, name)

    def has(self, part, name):
        return self._zero(part, name) or self.src.has(part, name)

    def get(self, part, name):
        if self._zero(part, name):
            weight = self.src.get(part, name[:-len("bias")] + "weight")
            return torch.zeros(weight.shape[0], dtype=weight.dtype)
        return self.src.get(part, name)

    def shape(self, part, name):
        if self._zero(part, name):
            return (self.src.shape(part, name[:-len("bias")] + "weight")[0],)
        return self.src.shape(part, name)

    def key(self, part, name):
        weight = name[:-len("bias")] + "weight"
        return self.src.key(part, weight if self._zero(part, name) else name)


class _FoldedLinearProjector:
    """Presents a llava-hf 'linear' projector (linear_1, identity act, linear_2) as one linear:
    W = W2 W1, b = W2 b1 + b2 (exact when linear_2 is the identity our export writes)."""

    def __init__(self, src):
        self.src = src
        # (linear_2 is read through linear_1: not a key left over)
        self.where = {k: v for k, v in src.where.items()
                      if not (k[0] == "projector" and k[1].startswith("linear_2."))}

    def has(self, part, name):
        return self.src.has(part, name)

    def get(self, part, name):
        if part == "projector" and name.startswith("linear_1."):
            w2 = self.src.get("projector", "linear_2.weight").float()
            if name.endswith("weight"):
                return w2 @ self.src.get("projector", "linear_1.weight").float()
            b1 = self.src.get("projector", "linear_1.bias").float()
            b2 = self.src.get("projector", "linear_2.bias").float()
            return w2 @ b1 + b2
        return self.src.get(part, name)

    def shape(self, part, name):
        if part == "projector" and name.startswith("linear_1."):
            return tuple(self.get(part, name).shape)
        return self.src.shape(part, name)

    def key(self, part, name):
        return self.src.key(part, name)


def _tie_as_transformers(config, src, path, asked):
    """The config with the head tied to the embeddings as transformers 5 ties it at load: when a
    tie_word_embeddings flag asks (a llava-hf file's top-level or text_config one), unless the file
    also holds an lm_head.weight that differs from the embeddings: then both are used as saved
    (transformers warns and does not tie)."""
    head, embed = ("lm_head", "weight"), ("text", "embed_tokens.weight")
    if asked and src.has(*head) and src.has(*embed):
        same = src.shape(*head) == src.shape(*embed) and torch.equal(src.get(*head),
                                                                     src.get(*embed))
        if not same:
            note(f"note: {path}: tie_word_embeddings is true but lm_head.weight differs from "
                 "embed_tokens: both read as saved (as transformers 5 loads it)", flush=True)
            asked = False
    return replace(config, tie_embeddings=bool(asked))


# a CLIP's buffers, no weights: old pytorch_model.bin files hold them, transformers >= 4.31's
# save_pretrained does not write them (the loader leaves them unused; tensors_fingerprint too)
CLIP_BUFFERS = ("embeddings.position_ids",)


def _materialize(config, src, dtype, device, fresh_projector=False):
    """Build the model on the meta device, then fill each parameter from the source one tensor at
    a time (no second full copy of the weights in RAM). `device` meta: the model's shapes alone,
    checked against the files' headers, no weight read (an FSDP rank other than 0:
    distributed.load_device)."""
    shapes_only = torch.device(device or "cpu").type == "meta"
    with torch.device("meta"):
        model = LLaVA(config)
    targets = our_targets(config)
    wanted = {pn for parts in targets.values() for pn in parts}
    unused_ok = ("post_layernorm.",)
    for part, name in src.where:
        if (part, name) in wanted or part is None:
            continue
        if part == "vision" and (name.startswith(unused_ok) or name.startswith("encoder.layers.") or
                                 name.startswith(CLIP_BUFFERS)):
            continue  # layers after the selected one, post_layernorm: never used by LLaVA
        if part == "text" and "rotary_emb" in name:
            continue
        if part == "lm_head" and config.tie_embeddings:
            # tied: the head is embed_tokens, and a saved lm_head.weight (some exports write
            # both) equals it (_tie_as_transformers unties a differing one)
            continue
        raise CheckpointError(f"{src.key(part, name)} does not fit this model config (unexpected "
                              "key)")
    params = dict(model.named_parameters())
    fresh = lambda our_name: fresh_projector and our_name.startswith("projector.")
    inner = src
    # (the projector's wrappers hold the files' TensorSource)
    while not isinstance(inner, TensorSource):
        inner = inner.src
    inner.expect([pn for n, parts in targets.items() if not fresh(n) for pn in parts])
    for our_name, parts in targets.items():
        p = params[our_name]
        # (a projector asked for in a half dtype is kept fp32: a LoRA run trains it on a bf16
        # base, LLaVA's 2e-5 steps lost in bf16; cast_base makes a frozen one bf16 again)
        want = torch.float32 if dtype is not None and our_name.startswith("projector.") else dtype
        if fresh(our_name):
            t = torch.empty(p.shape)
            if our_name.endswith("weight"):
                nn.init.normal_(t, std=0.02)
            else:
                nn.init.zeros_(t)
        else:
            for part, name in parts:
                if not src.has(part, name):
                    where = sorted({os.path.dirname(f) for f, _ in src.where.values()})
                    why = ("tie_word_embeddings is false, so the head is its own weight"
                           if part == "lm_head" else "expected by the config")
                    raise CheckpointError(f"{', '.join(where) or 'checkpoint'}: no weight for "
                                          f"'{part}' '{name}' ({why}; another architecture or a "
                                          "partial file?)")
            expected = _split_shapes(our_name, p.shape, config, len(parts))
            tensors = []
            for (part, name), shp in zip(parts, expected):
                got = tuple(src.shape(part, name))
                if got != tuple(shp):
                    raise CheckpointError(f"{src.key(part, name)} has shape {got} but the config "
                                          f"expects {tuple(shp)}")
                if shapes_only:
                    continue
                tensors.append(src.get(part, name))
                if not all_finite(tensors[-1]):  # (a model of NaNs answers ''
                    # to everything, and POPE reads that as 'yes': scores without a word)
                    raise CheckpointError(f"{src.key(part, name)} holds NaN or infinite values")
            if shapes_only:
                t = torch.empty(p.shape, device="meta")
            elif len(tensors) == 1:
                t = tensors[0]
            else:  # q/k/v or gate/up: each copied into its rows of the weight, in the dtype and
                # on the device asked for (torch.cat made the fused weight in the file's dtype
                # on the host, and .to() a second one beside it)
                kind = functools.reduce(torch.promote_types, [x.dtype for x in tensors])
                t = torch.empty(p.shape, dtype=want or kind, device=device or "cpu")
                row = 0
                for x in tensors:
                    t[row:row + len(x)].copy_(x)
                    row += len(x)
        t = t.to(dtype=want or t.dtype, device=device or "cpu")  # (TensorSource.get: a float)
        set_param(model, our_name, t)
    if shapes_only:  # (no weight taken: the files read whole, old .bin ones, are let go here)
        inner.handles.clear()
    return model


def all_finite(t):
    """Whether t holds no NaN or infinity, read through its min and max (NaN propagates to both):
    torch.isfinite(t).all() made a bool copy of every weight loaded, of which the heap kept ~0.8 GB
    at 1.1B, and the load took 5x as long."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _split_shapes(our_name, shape, c, n):
    if n == 1:
        return [shape]
    if "qkv_proj" in our_name:
        q_rows, kv_rows = c.heads * c.head_dim, c.kv_heads * c.head_dim
        return [(q_rows, c.hidden), (kv_rows, c.hidden), (kv_rows, c.hidden)]
    return [(c.intermediate, c.hidden), (c.intermediate, c.hidden)]  # gate_up


def set_param(model, name, tensor):
    mod_name, _, pname = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[pname] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def _base_dir(path, base):
    # (relative to the checkpoint's real folder, reached through a link or not; one written before
    # 2026-12-05 is relative to the folder as it was named then)
    tried = [os.path.normpath(os.path.join(p, base)) for p in (os.path.realpath(path), path)]
    cand = base if os.path.isabs(base) else next(filter(os.path.isdir, tried), tried[0])
    cand = resolve_checkpoint(cand)
    if not os.path.isdir(cand):
        raise CheckpointError(f"{path}/config.json: field 'base': base checkpoint {base!r:.80} "
                              "not found (read from this checkpoint's folder: moved without "
                              "it? keep the two where they were to each other, as a moved ckpt/ "
                              "tree does)")
    return cand


def canonical_state(model, merge_active=False):
    """Yield (hub-layout key, tensor) for every base weight, q/k/v and gate/up unfused.
    merge_active: the active adapter merged in (W + (alpha/r) B A, as model.merge_adapter
    computes it), the model left as it is; each merged weight is made as it is yielded (all made
    first held a merged copy of the decoder on the device: 13 GB more at 7B)."""
    c = model.config
    params = dict(model.named_parameters())
    adapted = {id(lin.weight): lin for _, lin in model.lora_linears()
               if merge_active and model.active_adapter in lin.lora}
    for our_name, parts in our_targets(c).items():
        lin = adapted.get(id(params[our_name]))
        t = lin.weight_with(model.active_adapter) if lin else params[our_name].detach()
        sizes = [s[0] for s in _split_shapes(our_name, t.shape, c, len(parts))]
        for (part, name), piece in zip(parts, t.split(sizes, 0) if len(parts) > 1 else [t]):
            yield HUB_PREFIX[part] + name, piece


def merged_makers(model):
    """{hub key: make()} for each weight the active adapter changes: make() gives it merged (W + s B
    A), made when save_safetensors writes it. One merged weight is held at a time: made for the
    first of its pieces (q, k, v; gate, up), let go after the last (they are written in a row)."""
    c, held = model.config, {}
    names = {id(p): n for n, p in model.named_parameters()}
    targets = our_targets(c)

    def piece(lin, sizes, i):
        if held.get("lin") is not lin:
            held.update(lin=lin, pieces=lin.weight_with(model.active_adapter).split(sizes, 0))
        t = held["pieces"][i]
        if i == len(sizes) - 1:
            held.clear()
        return t

    makers = {}
    for _, lin in model.lora_linears():
        if model.active_adapter not in lin.lora:
            continue
        our_name = names[id(lin.weight)]
        parts = targets[our_name]
        sizes = [s[0] for s in _split_shapes(our_name, lin.weight.shape, c, len(parts))]
        for i, (part, name) in enumerate(parts):
            makers[HUB_PREFIX[part] + name] = lambda lin=lin, sizes=sizes, i=i: piece(lin, sizes, i)
    return makers


# safetensors' own dtype names (its safetensors.torch table); a tensor of any other dtype is refused
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64",
                       torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
                       torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2"}


def save_safetensors(tensors, file, metadata=None, made=None):
    """The safetensors format, written one tensor at a time: each is brought to the host as it is
    written (safetensors' save_file takes host tensors: a model on a GPU was copied to the host
    whole first, 14 GB at 7B), and made then where `made` (key -> make()) has a maker for it
    (`tensors` gives its shape and dtype: an export held a merged copy of the whole decoder).
    Into a new file renamed over `file`: a model loaded from `file` reads its weights from it
    (mmap), so writing in place would change them under the writer."""
    made = made or {}
    # widest elements first, each width in the order `tensors` gives (a stable sort): every
    # tensor's data aligned to its element size, and a layer's q/k/v (gate/up) pieces written one
    # after another, so a merged weight is made once and let go (merged_makers). Not save_file's
    # order (dtype, then name; json.dumps escapes a non-ASCII name as \uXXXX): a valid file all
    # the same, read back by load_file
    odd = next((k for k, v in tensors.items() if v.dtype not in _SAFETENSORS_DTYPES), None)
    if odd is not None:  # (a bare KeyError from the table below)
        raise ValueError(f"{file}: tensor {odd!r} is {tensors[odd].dtype}, which safetensors has "
                         "no name for")
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    header = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in order:
        v = tensors[k]
        end = offset + v.numel() * v.element_size()
        header[k] = {"dtype": _SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape),
                     "data_offsets": [offset, end]}
        offset = end
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    # (a name no longer than the file's: a path that fits the system's limit still does)
    tmp = os.path.join(os.path.dirname(file), f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for k in order:
                t = made[k]() if k in made else tensors[k]
                if t.shape != tensors[k].shape or t.dtype != tensors[k].dtype:  # (a maker's bug)
                    raise ValueError(f"{k}: made {t.dtype} {tuple(t.shape)}, header says "
                                     f"{tensors[k].dtype} {tuple(tensors[k].shape)}")
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _adapter_state(model):
    state = {}
    for i, lin in model.lora_linears():
        for name, ad in lin.lora.items():
            for s in ad.A:
                key = f"adapter.{name}.layers.{i}.{module_of(s)}.{s}_proj"
                state[key + ".lora_A.weight"] = ad.A[s].detach()
                state[key + ".lora_B.weight"] = ad.B[s].detach()
    for name, head in model.heads.items():
        state[f"head.{name}.weight"] = head.weight.detach()
        state[f"head.{name}.bias"] = head.bias.detach()
    return state


def module_of(slice_name):
    return "self_attn" if slice_name in ("q", "k", "v", "o") else "mlp"


def save_checkpoint_files(model, path, base=None, extra_config=None):
    """Write config.json, model.safetensors (unless `base` names a checkpoint holding the frozen
    base weights) and adapters.safetensors (LoRA + heads) into the directory `path`. Callers that
    need atomicity write into a temp directory and rename (rundir.save_checkpoint does). A model
    whose base weights changed since loading (a merge) is written whole: `base` lacks them."""
    if base is not None and model.base_edited:
        note(f"note: {path}: the base weights changed since they were loaded (merged LoRA): "
             f"written whole, not as adapters on {base}", flush=True)
        base = None
    if base is not None and os.path.realpath(path) in base_chain(base):  # (a config.json there
        # overwritten to point at the base: a loop of base pointers, the folder no longer loaded)
        raise CheckpointError(f"{path}: the base {base} is, or sits on, the checkpoint here: "
                              "adapters saved on it would overwrite its config.json; save into "
                              "another folder")
    os.makedirs(path, exist_ok=True)
    cfg = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": asdict(model.config),
           "adapters": model.adapters, "heads": sorted(model.heads),
           "active_adapter": model.active_adapter, "base": None}
    if base is not None:
        cfg["base"] = os.path.relpath(os.path.realpath(base), os.path.realpath(path))
        cfg["base_fingerprint"] = base_fingerprint(base_weights_dir(base))
        clip = getattr(model, "clip_dir", None)
        if clip is not None:  # the CLIP weights are not the base's: where they came from
            cfg["vision_tower"] = os.path.relpath(clip, os.path.abspath(path))
    else:
        weights = dict(canonical_state(model))
        save_safetensors(weights, os.path.join(path, "model.safetensors"), {"format": "pt"})
    state = _adapter_state(model)
    if state:
        save_safetensors(state, os.path.join(path, "adapters.safetensors"), {"format": "pt"})
    if extra_config:
        cfg.update(extra_config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def base_fingerprint(weights_dir):
    """Which weights a base folder holds, cheaply: each weight file's name and size and a sha256 of
    its first and last MiB (any retraining changes both). An adapter records its base's, so a base
    retrained or replaced under the same path is found (the adapter would run on other weights)."""
    h = hashlib.sha256()
    stage1 = _stage1_file(weights_dir, detect_layout(weights_dir))
    for f in _weight_files(weights_dir) + ([stage1] if stage1 else []):
        _hash_ends(h, f)
    return h.hexdigest()[:32]


def tensors_fingerprint(weights_dir, only_parts=("vision",)):
    """Which tensors a folder holds, whatever files hold them (a CLIP converted from
    pytorch_model.bin to model.safetensors, or sharded otherwise, is the same weights; its files'
    base_fingerprint differs): each tensor's canonical name, dtype, shape and first and last rows
    (slices read alone: a few MB of a CLIP-L). Weights replaced or retrained differ there, and
    a copy in another dtype (fp16 of fp32: other values) too: the same is a lossless copy. A
    vision buffer (CLIP_BUFFERS) is left out: a CLIP re-saved through transformers drops it."""
    src, h = TensorSource(), hashlib.sha256()
    src.add_dir(weights_dir, only_parts=set(only_parts))
    for part, name in sorted(src.where):
        if part == "vision" and name.startswith(CLIP_BUFFERS):
            continue
        f, key = src.where[(part, name)]
        handle = src._handle(f, values=True)
        whole = f.endswith(".safetensors") and handle.get_slice(key)
        shape = list(whole.get_shape() if whole else handle[key].shape)
        if not shape:  # (a scalar: no rows)
            rows = [handle.get_tensor(key) if whole else handle[key]]
        else:
            rows = [whole[:1], whole[-1:]] if whole else [handle[key][:1], handle[key][-1:]]
        h.update(f"{part}.{name}:{rows[0].dtype}:{shape};".encode())
        for row in rows:
            h.update(row.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def init_fingerprint(path):
    """base_fingerprint of the weights a checkpoint stands on, and of the adapters of each
    checkpoint on the way to them (a LoRA run's: a run started from it merges them in, so its
    adapters retrained at their path are other starting weights too)."""
    chain = base_chain(path)
    h = hashlib.sha256(base_fingerprint(chain[-1]).encode())
    for folder in chain[:-1]:
        file = os.path.join(folder, "adapters.safetensors")
        if os.path.isfile(file):
            _hash_ends(h, file)
    return h.hexdigest()[:32]


def _hash_ends(h, file):
    """A file's name and size and its first and last MiB into the hash h (any retraining changes
    both; reading the whole of a 13 GB base at each start would not be cheap)."""
    size = os.path.getsize(file)
    h.update(f"{os.path.basename(file)}:{size};".encode())
    with open(file, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())


def _check_base_fingerprint(path, cfg):
    """The base a checkpoint's adapters were trained on is still the one its 'base' points to."""
    saved = cfg.get("base_fingerprint")
    if saved is None:  # (written before 2026-12-03, or not an adapter-only checkpoint)
        return
    if saved != base_fingerprint(base_weights_dir(path)):
        raise CheckpointError(f"{path}/config.json: field 'base': {cfg['base']!r:.60} holds other "
                              "weights than this checkpoint was trained on (retrained or replaced "
                              "since; its 'base_fingerprint' differs): point 'base' at the model "
                              "it was trained on")


def base_weights_dir(path):
    """The directory that holds a checkpoint's base weights (following 'base' pointers), as a real
    path: two checkpoints with the same answer share one frozen base."""
    return base_chain(path)[-1]


def base_chain(path):
    """The real paths of a checkpoint's folder and of each folder its 'base' pointers lead through,
    the one holding the base weights last."""
    path, chain = resolve_checkpoint(str(path)), []
    while detect_layout(path) == "factalign":
        base = read_json(os.path.join(path, "config.json")).get("base")
        if base is None:
            break
        if os.path.realpath(path) in chain:  # ("base": "." would go round without end)
            raise CheckpointError(f"{path}/config.json: field 'base': {base!r:.60} leads back to "
                                  "this checkpoint (a loop of base pointers)")
        chain.append(os.path.realpath(path))
        path = _base_dir(path, base)
    return chain + [os.path.realpath(path)]


def is_peft_dir(path):
    """A PEFT adapter directory (adapter_config.json, no model config.json)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and \
        not os.path.exists(os.path.join(path, "config.json"))


def peft_base_dir(path):
    """The local base directory a PEFT adapter names: as written, else relative to the adapter,
    else a folder of its last name inside the adapter folder (an export moved), beside it or
    beside its parent (a released pair moved off the machine it was trained on, as LLaVA-RLHF's
    sft_model/ beside rlhf_lora_adapter_model/, whose config names the training machine's path;
    the CLIP tower is found beside a LLaVA the same way)."""
    cfg_path = os.path.join(path, "adapter_config.json")
    base = read_json(cfg_path).get("base_model_name_or_path")
    candidates = []
    if isinstance(base, str) and base:
        name, here = os.path.basename(os.path.normpath(base)), os.path.abspath(path)
        # (and inside it: export_peft_adapter writes its base to ADAPTER/base, named absolute)
        candidates = [base, os.path.join(path, base), os.path.join(path, name)]
        for folder in (here, os.path.dirname(here)):  # beside the adapter, beside its parent
            candidates.append(os.path.join(os.path.dirname(folder), name))
    for cand in candidates:
        if os.path.isdir(cand) and os.path.realpath(cand) != os.path.realpath(path):
            if is_peft_dir(resolve_checkpoint(cand)):  # (its base's base...: a traceback, or
                # endless recursion; a run folder's newest checkpoint-N as well)
                raise CheckpointError(f"{cfg_path}: field 'base_model_name_or_path': {cand} is "
                                      "another PEFT adapter; an adapter on an adapter is not "
                                      "read: merge that one into its base first")
            return cand
    raise CheckpointError(f"{cfg_path}: field 'base_model_name_or_path': "
                          f"{base!r:.80} is not a local directory, nor a folder of its name "
                          "beside the adapter; put the base there, "
                          f"or load it, then load_adapters(model, {path!r})")


def refuse_scalar_model(path):
    """A checkpoint that scores instead of answering (our reward model: its active adapter is
    read through a scalar head of the same name) passed where a policy is wanted: one line.
    Generating from it runs the reward LoRA as if it were a policy, without a word. So does
    LLaVA-RLHF's: a PEFT adapter with its reward_head beside it (llava_rlhf_reward_of)."""
    if is_peft_dir(path):
        # (interop imports this module)
        from interop import import_llava_rlhf_command, llava_rlhf_reward_of
        rm = llava_rlhf_reward_of(path)
        if rm is not None:
            raise CheckpointError(f"{path}: the LoRA of a LLaVA-RLHF reward model (its "
                                  f"reward_head is in {rm}), not a policy: import it with "
                                  f"{import_llava_rlhf_command(rm)}, or pass a policy")
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        return
    cfg = read_json(os.path.join(path, "config.json"))
    active, heads = cfg.get("active_adapter"), cfg.get("heads")
    if isinstance(heads, list) and active is not None and active in heads:
        raise CheckpointError(f"{path}/config.json: a scalar model (adapter and head "
                              f"'{active}', as reward.py saves a reward model), not a policy: "
                              "pass the SFT checkpoint (or another policy)")


def _load_adapters(model, path, cfg, device, only_new=False):
    file = os.path.join(path, "adapters.safetensors")
    if not cfg.get("adapters") and not cfg.get("heads"):
        return
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: file not found (config.json lists adapters/heads)")
    try:
        from safetensors.torch import load_file
        state = load_file(file)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read safetensors (truncated or corrupt?): {e}")
    for name, a in cfg.get("adapters", {}).items():
        try:  # (layers the model does not have, or of a projection the adapter does not target)
            model.add_adapter(name, a["r"], a["alpha"], a["dropout"], a["targets"],
                              a.get("layers"))
        except ValueError as e:
            raise CheckpointError(f"{path}/config.json: field 'adapters.{name}': {e}")
    for name in cfg.get("heads", []):
        try:  # (a name that cannot be one, or given twice)
            model.add_head(name)
        except ValueError as e:
            raise CheckpointError(f"{path}/config.json: field 'heads': {e}")
    own = _adapter_state(model)
    if only_new:  # keep the model's own adapters/heads as they are
        new = set(cfg.get("adapters", {})) | set(cfg.get("heads", []))
        own = {k: v for k, v in own.items() if k.split(".")[1] in new}
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointError(f"{file}: key '{missing[0]}' is missing")
    # LoRA weights on a projection the config's targets leave out would be dropped without a word
    # (the model would not be the one trained)
    names = set(cfg.get("adapters", {})) | set(cfg.get("heads", []))
    extra = sorted(k for k in state if k.split(".")[1] in names and k not in own)
    if extra:
        raise CheckpointError(f"{file}: key '{extra[0]}' does not fit config.json (field "
                              f"'adapters': {cfg.get('adapters')!r:.80})")
    with torch.no_grad():
        for k, t in own.items():
            if tuple(state[k].shape) != tuple(t.shape):
                raise CheckpointError(f"{file}: key '{k}' has shape {tuple(state[k].shape)} but "
                                      f"the config expects {tuple(t.shape)}")
            if not all_finite(state[k]):
                raise CheckpointError(f"{file}: key '{k}' holds NaN or infinite values")
            t.copy_(state[k])
    if device:
        model.to(device)
    if not only_new:
        model.set_adapter(cfg.get("active_adapter"))


def load_adapters(model, path, name="default"):
    """Add the LoRA adapters and heads saved in another checkpoint of this same base (PPO puts the
    reward model's adapter and head next to the policy's on one copy of the base weights), or a
    PEFT LoRA adapter directory trained on this base (added as adapter `name`, not made active)."""
    path = resolve_checkpoint(str(path))
    if is_peft_dir(path):
        from interop import load_peft_adapter  # (it imports this module)
        if name in model.adapters:
            raise CheckpointError(f"{path}: adapter '{name}' exists already in this model")
        shared = sorted(set(model.adapters) | set(model.heads))
        # merged into the one base, it would also change what those adapters and heads read
        why = (f"would be merged into the base that {', '.join(shared)} share: merge this "
               "adapter into the base first" if shared else None)
        load_peft_adapter(model, path, name, no_merge=why)
        return
    cfg = read_json(os.path.join(path, "config.json"))
    if cfg.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: adapters load only from factalign checkpoints")
    _check_own_config(os.path.join(path, "config.json"), cfg)
    _check_base_fingerprint(path, cfg)
    adapter_clash = set(cfg.get("adapters", {})) & set(model.adapters)
    head_clash = set(cfg.get("heads", [])) & set(model.heads)
    clash = sorted(adapter_clash | head_clash)
    if clash:
        raise CheckpointError(f"{path}: adapter/head '{clash[0]}' exists already in this model")
    active = model.active_adapter
    _load_adapters(model, path, cfg, None, only_new=True)
    model.set_adapter(active)


# the config.json key in which an export records the template the model was trained with (its
# chat template alone could not tell it from the vicuna_v1 fallback an unknown one gets)
EXPORT_TEMPLATE = "factalign_template"


def recorded_template(path):
    """The conversation template a checkpoint folder records: its run's --template (a checkpoint
    of ours), or the one export_llava_hf knew and recorded in an export's config.json (the
    template survives export and import), a PEFT adapter's base's; else None."""
    if is_peft_dir(path):  # (export_peft_adapter's: its base, an export, holds the template)
        try:
            path = peft_base_dir(path)
        except CheckpointError:  # (loading says what is wrong)
            return None
    try:
        cfg = read_json(os.path.join(path, "config.json"))
    except (CheckpointError, OSError):  # (none, or unreadable: loading says what is wrong)
        return None
    run = cfg.get("run_config") if cfg.get("format") == FORMAT_NAME else None
    found = run.get("template") if isinstance(run, dict) else cfg.get(EXPORT_TEMPLATE)
    return found if isinstance(found, str) else None  # ('plain': the export says what it wrote)
