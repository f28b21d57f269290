"""Checkpoints (checkpoint.py): every layout loads and matches transformers, exports load in
transformers and PEFT, our own format round-trips exactly, bad files give one clear line."""
import json
import os

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint_files
from interop import export_llava_hf, export_peft_adapter
from model import CheckpointError, LLaVA, ModelConfig
from test_model import (ATOL, IMAGE_ID, IMG, VOCAB, hf_logits, hf_text_config, hf_vision_config,
                        inputs, randomize_adapter, tiny_model, write_hf_dirs)
from conftest import run_cli


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return write_hf_dirs(tmp_path_factory)


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

    # the hub layout: vision_tower.vision_model.*, language_model.model.*, language_model.lm_head.*
    def hub(k):
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + k[len("vision_tower."):]
        return k

    # transformers 5 module names: model.language_model.*, model.vision_tower.*, lm_head.*
    def in_memory(k):
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


@pytest.mark.parametrize("head", ["differs", "absent"])
def test_tied_head_is_read_as_transformers_reads_it(hf_dirs, tmp_path, head):
    """Each tie_word_embeddings flag (top level, text_config: true, false, absent) over a file whose
    lm_head differs from the embeddings or is absent, loaded as transformers 5 loads it: a
    differing head is used as saved whatever the flags (we tied it: logits ~6 away); an absent one
    is the embeddings when either flag is true (a top-level flag was not read: refused) and
    refused otherwise (transformers answers with a random head)."""
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging
    _, path = hf_dirs["gelu"]
    pixels, ids = inputs()
    config = json.load(open(os.path.join(path, "config.json")))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # (its untie warning and missing-key report)
    try:
        for top in (None, True, False):
            for text in (None, True, False):
                cfg = json.loads(json.dumps(config))
                for where, flag in ((cfg, top), (cfg["text_config"], text)):
                    where.pop("tie_word_embeddings", None)
                    if flag is not None:
                        where["tie_word_embeddings"] = flag
                out = tmp_path / f"{top}-{text}"

                def rewrite(k):
                    if k == "language_model.lm_head.weight":
                        return None if head == "absent" else k
                    return k
                state = _rewrite_keys(path, out, rewrite, cfg)
                if head == "differs":
                    from safetensors.torch import save_file
                    state["language_model.lm_head.weight"] += 1.0
                    save_file(state, out / "model.safetensors")
                if head == "absent" and not (top or text):
                    with pytest.raises(CheckpointError, match="tie_word_embeddings is false"):
                        load_checkpoint(out)
                    continue
                ref = hf_logits(LlavaForConditionalGeneration.from_pretrained(out).eval(),
                                pixels, ids)
                ours = load_checkpoint(out).eval()
                assert ours.config.tie_embeddings == (head == "absent"), (top, text)
                with torch.no_grad():
                    torch.testing.assert_close(ours(pixels, ids), ref, atol=ATOL, rtol=0)
    finally:
        hf_logging.set_verbosity(verbosity)


@pytest.mark.parametrize("projector", ["gelu", "linear"])
def test_export_hf_loads_in_transformers(hf_dirs, tmp_path, projector):
    from transformers import LlavaForConditionalGeneration
    _, path = hf_dirs[projector]
    ours = load_checkpoint(path).eval()
    export_llava_hf(ours, tmp_path / "export")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    # (the logits alone cannot tell -1 from -2: the export's unbuilt last CLIP layer is zeros, an
    # identity; a tool that trains the tower or reads the config can)
    assert theirs.config.vision_feature_layer == ours.config.vision_select_layer == -2
    pixels, ids = inputs(seed=5)
    torch.testing.assert_close(hf_logits(theirs, pixels, ids), ours(pixels, ids), atol=ATOL,
                               rtol=0)
    # and a model of ours made from scratch (not loaded) exports too
    ours_projector = "linear" if projector == "linear" else "mlp2x_gelu"
    config = ModelConfig(image_size=IMG, patch_size=14, vision_hidden=32, vision_intermediate=64,
                         vision_layers=3, vision_heads=4, projector=ours_projector,
                         vocab_size=VOCAB, hidden=32, intermediate=72, layers=2, heads=4,
                         kv_heads=2, image_token_id=IMAGE_ID, pad_token_id=0)
    fresh = LLaVA(config).eval()
    export_llava_hf(fresh, tmp_path / "fresh")
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "fresh").eval()
    torch.testing.assert_close(hf_logits(theirs, pixels, ids), fresh(pixels, ids), atol=ATOL,
                               rtol=0)


@pytest.mark.parametrize("beside", ["model.safetensors", "model.fp16.safetensors"])
def test_weight_files_are_the_ones_transformers_reads(hf_dirs, tmp_path, beside):
    """Shards and their index, and beside them another full copy with other values: a stale
    model.safetensors (transformers reads it, not the shards) or a variant file (transformers
    reads the shards). Ours reads the same files: the same logits as transformers' load."""
    import shutil
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration
    _, path = hf_dirs["gelu"]
    d = tmp_path / "shards"
    shutil.copytree(path, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    where = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for f in set(where.values()):
        save_file({k: state[k] for k in keys if where[k] == f}, str(d / f), {"format": "pt"})
    size = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": size}, "weight_map": where}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({k: v * 0.5 for k, v in state.items()}, str(d / beside), {"format": "pt"})
    theirs = LlavaForConditionalGeneration.from_pretrained(d).eval()
    ours = load_checkpoint(d).eval()
    pixels, ids = inputs(seed=8)
    ref = hf_logits(theirs, pixels, ids)
    torch.testing.assert_close(ours(pixels, ids), ref, atol=ATOL, rtol=0)
    halved = beside == "model.safetensors"  # (so the two cases read different weights)
    head = next(k for k in state if k.endswith("lm_head.weight"))
    assert torch.equal(theirs.lm_head.weight, state[head] * (0.5 if halved else 1))


def test_a_shard_index_listing_a_missing_shard_or_none_is_named(hf_dirs, tmp_path):
    """An index naming a shard not on disk, or with an empty weight_map (it read no file:
    "checkpoint: no weight for 'vision' ...", naming neither index nor folder), is one line naming
    the index."""
    import shutil
    _, path = hf_dirs["gelu"]
    d = tmp_path / "shards"
    shutil.copytree(path, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = d / "model.safetensors.index.json"
    for weight_map, match in (({"a": "model-00002-of-00002.safetensors"},
                               "lists the shard 'model-00002-of-00002.safetensors', which is not"),
                              ({}, "field 'weight_map' is empty")):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=f"^{index}: {match}"):
            load_checkpoint(d)


def test_shards_without_an_index_are_one_whole_set(hf_dirs, tmp_path):
    """Shards model-N-of-M with no index (read where transformers reads nothing): a missing one
    was 'checkpoint: no weight for ...' naming no file; a stale set of another count beside them
    was read into the same model (its tensors over the others, without a word). Their numbers are
    numbers: an unpadded whole set was 'model-01-of-10...: shard not found', and a shard 3 of 2
    was read."""
    from safetensors.torch import load_file, save_file
    hf, path = hf_dirs["gelu"]
    pixels, ids = inputs(seed=3)
    ref = hf_logits(hf, pixels, ids)
    d = tmp_path / "shards"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    state = load_file(os.path.join(path, "model.safetensors"))
    keys = sorted(state)

    def write_set(total, pad):
        for old in d.glob("model-*"):
            old.unlink()
        for i in range(1, total + 1):
            save_file({k: state[k] for k in keys[i - 1::total]},
                      str(d / f"model-{i:0{pad}d}-of-{total:0{pad}d}.safetensors"))

    for total, pad in ((2, 5), (10, 1)):
        write_set(total, pad)
        torch.testing.assert_close(load_checkpoint(d)(pixels, ids), ref, atol=ATOL, rtol=0)
    (d / "model-3-of-10.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"^{d / 'model-3-of-10.safetensors'}: shard not "
                                              "found"):
        load_checkpoint(d)
    write_set(2, 5)
    # (the first shard of a stale set of three: its halved tensors were read over the first's)
    save_file({k: v * 0.5 for k, v in state.items()}, str(d / "model-00001-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="shards of 2 sets .*and no index"):
        load_checkpoint(d)
    (d / "model-00001-of-00003.safetensors").unlink()
    for stray in ("model-00003-of-00002", "model-1-of-2"):
        save_file({k: v * 0.5 for k, v in state.items()}, str(d / f"{stray}.safetensors"))
        with pytest.raises(CheckpointError, match=f"^{d / stray}.safetensors: shard number"):
            load_checkpoint(d)
        (d / f"{stray}.safetensors").unlink()
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"^{d / 'model-00002-of-00002.safetensors'}: shard "
                                              "not found"):
        load_checkpoint(d)


def test_a_weight_in_two_files_or_under_two_keys_is_refused(hf_dirs, tmp_path):
    """One weight held twice (a shard of a set holding a key of another, a file holding a tensor
    under its original-LLaVA key beside its llava-hf one): the file read last won, in file-name
    order, without a word. Refused now, naming both."""
    from safetensors.torch import load_file, save_file
    _, path = hf_dirs["gelu"]
    state = load_file(os.path.join(path, "model.safetensors"))
    keys = sorted(state)
    head = next(k for k in keys if k.endswith("lm_head.weight"))
    d = tmp_path / "shards"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    first, second = (d / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    save_file({k: state[k] for k in keys[0::2]} | {head: state[head] * 0.5}, str(first))
    save_file({k: state[k] for k in keys[1::2]} | {head: state[head]}, str(second))
    with pytest.raises(CheckpointError, match=f"^{second}: holds '{head}' of {first} again: two "
                                              "copies of one weight"):
        load_checkpoint(d)
    projector = next(k for k in keys if "projector" in k and k.endswith("weight"))
    original = _to_original_llava(projector)
    rest = [k for k in keys if k != projector]
    save_file({k: state[k] for k in rest[0::2]}, str(first))
    twice = {projector: state[projector], original: state[projector].clone()}
    save_file({k: state[k] for k in rest[1::2]} | twice, str(second))
    with pytest.raises(CheckpointError, match=f"^{second}: holds '{original}' and '{projector}': "
                                              "two copies of one weight"):
        load_checkpoint(d)
    save_file({k: state[k] for k in rest[1::2]} | {original: state[projector]}, str(second))
    load_checkpoint(d)  # (one copy, under its original-LLaVA key: read)


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


def _original_llava_config(hf_cfg, tower):
    """An original LLaVA (LlavaLlamaForCausalLM) config.json for the llava-hf config's model."""
    return dict(hf_cfg["text_config"], architectures=["LlavaLlamaForCausalLM"], model_type="llava",
                mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                mm_vision_select_feature="patch", mm_use_im_start_end=False,
                image_aspect_ratio="pad", mm_vision_tower=tower)


@pytest.mark.parametrize("with_vision", [True, False])
def test_original_llava_layout_loads_and_matches(hf_dirs, tmp_path, with_vision, capsys):
    from transformers import CLIPVisionModel
    hf, path = hf_dirs["gelu"]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    cfg = _original_llava_config(hf_cfg, str(tmp_path / "clip"))
    _rewrite_keys(path, tmp_path / "orig", lambda k: _to_original_llava(k, with_vision), config=cfg)
    clip = CLIPVisionModel(hf_vision_config())
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path / "clip")
    # the weights must then come from the LLaVA checkpoint, only the config from the CLIP dir
    if with_vision:
        os.remove(tmp_path / "clip" / "model.safetensors")
    ours = load_checkpoint(tmp_path / "orig").eval()
    assert ours.config.image_token_id == -200  # LLaVA's IMAGE_TOKEN_INDEX
    pixels, ids = inputs()
    ref = hf_logits(hf, pixels, ids)
    got = ours(pixels, ids.masked_fill(ids == IMAGE_ID, -200))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # LLaVA reads one CLIP layer (llava-hf's list of layers is not its field); a vision tower
    # that is not a CLIP directory is refused, not passed over
    with pytest.raises(CheckpointError, match="not a CLIP directory"):
        load_checkpoint(tmp_path / "orig", vision_tower=str(tmp_path / "clip" / "config.json"))
    edited = dict(cfg, mm_vision_select_layer=[-2])
    (tmp_path / "orig" / "config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="'mm_vision_select_layer': expected an integer"):
        load_checkpoint(tmp_path / "orig")
    # LLaVA's process_images reads image_aspect_ratio (it was never read): LLaVA-NeXT's tiles are
    # refused; LLaVA-1.0's resize and crop (the field absent) is named, as images here are padded
    anyres = dict(cfg, image_aspect_ratio="anyres")
    (tmp_path / "orig" / "config.json").write_text(json.dumps(anyres))
    with pytest.raises(CheckpointError, match="field 'image_aspect_ratio': 'anyres'"):
        load_checkpoint(tmp_path / "orig")
    capsys.readouterr()
    del cfg["image_aspect_ratio"]
    (tmp_path / "orig" / "config.json").write_text(json.dumps(cfg))
    load_checkpoint(tmp_path / "orig")
    assert "image_aspect_ratio absent" in capsys.readouterr().out


def _llava_without_clip(hf_dirs, out):
    """An original LLaVA folder at `out` without CLIP weights, its config naming
    'openai/clip-tiny', as LLaVA's released checkpoints; returns (the llava-hf model, its CLIP
    tower as a CLIPVisionModel, unsaved)."""
    from transformers import CLIPVisionModel
    hf, path = hf_dirs["gelu"]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    cfg = _original_llava_config(hf_cfg, "openai/clip-tiny")
    _rewrite_keys(path, out, lambda k: _to_original_llava(k, False), config=cfg)
    clip = CLIPVisionModel(hf_vision_config())
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    return hf, clip


def test_adapter_on_a_llava_without_clip_weights_loads_again(hf_dirs, tmp_path):
    """LLaVA's released checkpoints hold no CLIP weights (config.json names the tower). An adapter
    checkpoint saved on one (SFT+ with LoRA) records the CLIP directory it was loaded with, so it,
    and a checkpoint on it, load again without --vision_tower (before, even with it: 'no weight
    for vision')."""
    import shutil
    hf, clip = _llava_without_clip(hf_dirs, tmp_path / "llava")
    clip.save_pretrained(tmp_path / "clips" / "tiny")
    pixels, ids = inputs()
    ids = ids.masked_fill(ids == IMAGE_ID, -200)
    ref = hf_logits(hf, pixels, ids.masked_fill(ids == -200, IMAGE_ID))
    with pytest.raises(CheckpointError, match="vision_tower DIR; config names 'openai/clip-tiny'"):
        load_checkpoint(tmp_path / "llava")
    m = load_checkpoint(tmp_path / "llava", vision_tower=str(tmp_path / "clips" / "tiny")).eval()
    m.add_adapter("default", 4, 8)
    m.set_adapter("default")
    save_checkpoint_files(m, tmp_path / "sft", base=tmp_path / "llava")
    assert json.load(open(tmp_path / "sft" / "config.json"))["vision_tower"] == "../clips/tiny"
    again = load_checkpoint(tmp_path / "sft").eval()
    torch.testing.assert_close(again(pixels, ids), ref, atol=ATOL, rtol=0)
    # a reward model on it (base: the SFT checkpoint) records it too, and finds it through its base
    again.add_adapter("reward", 4, 8)
    save_checkpoint_files(again, tmp_path / "rm", base=tmp_path / "sft")
    cfg_rm = json.load(open(tmp_path / "rm" / "config.json"))
    del cfg_rm["vision_tower"]
    (tmp_path / "rm" / "config.json").write_text(json.dumps(cfg_rm))
    torch.testing.assert_close(load_checkpoint(tmp_path / "rm").eval()(pixels, ids), ref,
                               atol=ATOL, rtol=0)
    # the CLIP folder moved: one line naming the field
    shutil.move(tmp_path / "clips", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="sft/config.json: field 'vision_tower'"):
        load_checkpoint(tmp_path / "sft")
    # ... or found beside the base by the name LLaVA's config gives it, when nothing is recorded
    shutil.copytree(tmp_path / "elsewhere" / "tiny", tmp_path / "clip-tiny")
    cfg_sft = json.load(open(tmp_path / "sft" / "config.json"))
    del cfg_sft["vision_tower"]
    (tmp_path / "sft" / "config.json").write_text(json.dumps(cfg_sft))
    torch.testing.assert_close(load_checkpoint(tmp_path / "sft").eval()(pixels, ids), ref,
                               atol=ATOL, rtol=0)
    shutil.rmtree(tmp_path / "clip-tiny")
    with pytest.raises(CheckpointError, match="holds no CLIP weights.*'openai/clip-tiny'"):
        load_checkpoint(tmp_path / "sft")


def test_a_clip_named_by_its_hub_id_is_read_from_the_local_hub_cache(hf_dirs, tmp_path,
                                                                      monkeypatch):
    """LLaVA's released checkpoints name their CLIP by hub id, which LLaVA's own code reads from
    the hub cache; a CLIP found only there was refused ('pass --vision_tower'). Now its cached
    snapshot is read (never the network), and a checkpoint saved on it records that folder."""
    from huggingface_hub import constants
    hf, clip = _llava_without_clip(hf_dirs, tmp_path / "llava")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="vision_tower DIR; config names 'openai/clip-tiny'"):
        load_checkpoint(tmp_path / "llava")  # (not in the cache yet)
    repo = tmp_path / "hub" / "models--openai--clip-tiny"
    clip.save_pretrained(repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    pixels, ids = inputs()
    ref = hf_logits(hf, pixels, ids)
    m = load_checkpoint(tmp_path / "llava").eval()
    torch.testing.assert_close(m(pixels, ids.masked_fill(ids == IMAGE_ID, -200)), ref,
                               atol=ATOL, rtol=0)
    m.add_adapter("default", 4, 8)
    m.set_adapter("default")
    save_checkpoint_files(m, tmp_path / "sft", base=tmp_path / "llava")
    recorded = json.load(open(tmp_path / "sft" / "config.json"))["vision_tower"]
    assert os.path.normpath(tmp_path / "sft" / recorded) == str(repo / "snapshots" / ("c" * 40))


def test_vision_tower_beside_a_checkpoint_holding_clip_is_named_not_read(tmp_path, capsys):
    """Our checkpoint holding its (trained) CLIP weights keeps them under --vision_tower (the flag
    is for a base without them); it was passed over without a word, now a one-line note says so."""
    from transformers import CLIPVisionModel
    m = tiny_model(seed=3)
    save_checkpoint_files(m, tmp_path / "ours")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    capsys.readouterr()
    got = load_checkpoint(tmp_path / "ours", vision_tower=str(tmp_path / "clip"))
    note = capsys.readouterr().out.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"note: --vision_tower {tmp_path / 'clip'} not "
                                                 "read"), note
    for a, b in zip(got.vision_tower.parameters(), m.vision_tower.parameters()):
        assert torch.equal(a, b)


def test_llama_plus_clip_dirs_start_sft_with_fresh_projector(tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM
    LlamaForCausalLM(hf_text_config()).save_pretrained(tmp_path / "llama")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="CLIP") as e:
        load_checkpoint(tmp_path / "llama")
    assert str(e.value).endswith("(--vision_tower DIR)"), e.value  # (it said "names 'None'")
    ours = load_checkpoint(tmp_path / "llama", vision_tower=str(tmp_path / "clip"))
    fresh = ours.projector.linear_1.weight
    assert fresh.shape == (32, 32) and fresh.std() > 0


def test_a_bare_mistral_plus_clip_starts_sft_as_a_llama_does(tmp_path):
    """Mistral was read inside a llava-hf folder but refused bare ("unsupported model_type
    'mistral'"); a window shorter than its positions is still refused."""
    from transformers import CLIPVisionModel, MistralConfig, MistralForCausalLM
    text = hf_text_config().to_dict()
    text.pop("model_type", None)
    mistral = MistralForCausalLM(MistralConfig(**dict(text, sliding_window=None))).eval()
    mistral.save_pretrained(tmp_path / "mistral")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    ours = load_checkpoint(tmp_path / "mistral", vision_tower=str(tmp_path / "clip")).eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(None, ids), mistral(input_ids=ids).logits, atol=ATOL,
                                   rtol=0)
    cfg = json.load(open(tmp_path / "mistral" / "config.json"))
    (tmp_path / "mistral" / "config.json").write_text(json.dumps(dict(cfg, sliding_window=4)))
    with pytest.raises(CheckpointError, match="field 'sliding_window': 4 is not supported"):
        load_checkpoint(tmp_path / "mistral", vision_tower=str(tmp_path / "clip"))


def test_a_fresh_projector_is_refused_outside_sft_and_a_missing_tower_path_is_named(tmp_path,
                                                                                   tiny_world):
    """A LLaMA plus CLIP (or a LLaVA without projector weights) loaded for eval, DPO, reward or
    VIGC got a random projector without a word (scores of random image features; adapters that
    could not be loaded again). Only SFT starts from it. And an --vision_tower path that is not
    there was replaced by a CLIP folder of its name beside the checkpoint."""
    from transformers import CLIPVisionModel, LlamaForCausalLM
    import common
    LlamaForCausalLM(hf_text_config()).save_pretrained(tmp_path / "llama")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    clip = str(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="a language model: its projector would be random; "
                                              "only sft.py starts from one"):
        load_checkpoint(tmp_path / "llama", vision_tower=clip, fresh_projector_ok=False)
    assert load_checkpoint(tmp_path / "llama", vision_tower=clip).projector is not None
    with pytest.raises(CheckpointError, match="a language model: its projector"):  # (not "pass
        load_checkpoint(tmp_path / "llama", fresh_projector_ok=False)  # --vision_tower" first)
    import shutil
    for f in os.listdir(os.path.join(tiny_world, "tokenizer")):
        shutil.copy(os.path.join(tiny_world, "tokenizer", f), tmp_path / "llama")
    with pytest.raises(CheckpointError, match="projector would be random"):  # the stages' loader
        common.load_model_and_tokenizer(str(tmp_path / "llama"), vision_tower=clip)
    # sft.py's start (LLaVA's stage 1): allowed there (a vocabulary the world's tokenizer fits)
    from conftest import run_cli
    config = hf_text_config()
    config.vocab_size = 1024
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    code, _, err = run_cli("sft", ["--init", str(tmp_path / "llama"), "--vision_tower", clip,
                                   "--world", tiny_world, "--max_steps", "1", "--batch_size", "2",
                                   "--report", "false", "--out", str(tmp_path / "sft")])
    assert code == 0, err
    gone = str(tmp_path / "elsewhere" / "clip")  # ('clip' beside the checkpoint stood in)
    with pytest.raises(CheckpointError, match=f"--vision_tower {gone}: no such directory"):
        load_checkpoint(tmp_path / "llama", vision_tower=gone)


def test_vision_tower_beside_a_llava_hf_checkpoint_is_named_not_read(hf_dirs, tmp_path, capsys):
    """A llava-hf folder always holds its CLIP: --vision_tower was passed over without a word."""
    from transformers import CLIPVisionModel
    _, path = hf_dirs["gelu"]
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    plain = load_checkpoint(path)
    capsys.readouterr()
    got = load_checkpoint(path, vision_tower=str(tmp_path / "clip"))
    note = capsys.readouterr().out.strip().splitlines()
    assert note == [f"note: --vision_tower {tmp_path / 'clip'} not read: {path} (llava-hf) holds "
                    "the CLIP config and weights it was trained with"], note
    for a, b in zip(got.vision_tower.parameters(), plain.vision_tower.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_a_loaders_note_is_said_by_rank_0_alone_under_torchrun(hf_dirs, tmp_path, capsys,
                                                              monkeypatch, rank, said):
    """Every torchrun rank loads the model: each rank said each of the loader's notes (the
    mm_projector.bin note twice per dpo.py run on 2 processes)."""
    from transformers import CLIPVisionModel
    _, path = hf_dirs["gelu"]
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    capsys.readouterr()
    load_checkpoint(path, vision_tower=str(tmp_path / "clip"))
    assert ("--vision_tower" in capsys.readouterr().out) == said


def test_an_original_llava_without_projector_weights_is_sfts_start_alone(hf_dirs, tmp_path):
    """An original LLaVA whose files hold no mm_projector keys: a fresh projector for SFT,
    refused elsewhere (it was used at random)."""
    from transformers import CLIPVisionModel
    hf, path = hf_dirs["gelu"]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    cfg = _original_llava_config(hf_cfg, str(tmp_path / "clip"))
    _rewrite_keys(path, tmp_path / "orig", lambda k: None if "projector" in k else
                  _to_original_llava(k, keep_vision=False), config=cfg)
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="a LLaVA without projector weights: its projector "
                                              "would be random"):
        load_checkpoint(tmp_path / "orig", fresh_projector_ok=False)
    assert load_checkpoint(tmp_path / "orig").projector.linear_1.weight.std() > 0


def test_an_original_llava_projector_of_three_linears_is_named_not_read_as_two(hf_dirs, tmp_path):
    """mlp3x_gelu's model.mm_projector.4.* under a config saying mlp2x_gelu: 4.* was read as
    linear_1 over 0.* (a square projector fits), a wrong projector without a word."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModel
    _, path = hf_dirs["gelu"]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    state = _rewrite_keys(path, tmp_path / "orig", _to_original_llava,
                          config=_original_llava_config(hf_cfg, str(tmp_path / "clip")))
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")  # (its config)
    assert state["model.mm_projector.0.weight"].shape == state["model.mm_projector.2.weight"].shape
    state = load_file(str(tmp_path / "orig" / "model.safetensors"))
    for w in ("weight", "bias"):
        state[f"model.mm_projector.4.{w}"] = state[f"model.mm_projector.2.{w}"] + 1
    save_file(state, str(tmp_path / "orig" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="key 'model.mm_projector.4.bias' is not part of a "
                                              "LLaVA model"):
        load_checkpoint(tmp_path / "orig")
    # a real mlp3x_gelu LLaVA says so: its config is named before its 4.* keys are read
    cfg = json.load(open(tmp_path / "orig" / "config.json"))
    json.dump(dict(cfg, mm_projector_type="mlp3x_gelu"), open(tmp_path / "orig" / "config.json",
                                                                "w"))
    with pytest.raises(CheckpointError, match="field 'mm_projector_type': 'mlp3x_gelu' is not "
                                              "supported \\(linear, mlp2x_gelu\\)"):
        load_checkpoint(tmp_path / "orig")


def test_llava_stage1_mm_projector_bin_beside_weights_is_the_projector(hf_dirs, tmp_path, capsys):
    """LLaVA's stage 1 saves its projector alone (mm_projector.bin, model.mm_projector.* keys);
    its stage 2 reads it. Beside a LLaVA's weights without a projector it was passed over and SFT
    began from a random projector without a word (logits 5.3 from transformers')."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel
    hf, path = hf_dirs["gelu"]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    cfg = _original_llava_config(hf_cfg, str(tmp_path / "clip"))
    _rewrite_keys(path, tmp_path / "orig", lambda k: None if "projector" in k else
                  _to_original_llava(k, keep_vision=False), config=cfg)
    state = load_file(os.path.join(path, "model.safetensors"))
    torch.save({_to_original_llava(k): v for k, v in state.items() if "projector" in k},
               tmp_path / "orig" / "mm_projector.bin")
    clip = CLIPVisionModel(hf_vision_config())
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path / "clip")
    ours = load_checkpoint(tmp_path / "orig", fresh_projector_ok=False).eval()
    assert "projector is read from mm_projector.bin" in capsys.readouterr().out
    pixels, ids = inputs()
    got = ours(pixels, ids.masked_fill(ids == IMAGE_ID, -200))
    torch.testing.assert_close(got, hf_logits(hf, pixels, ids), atol=ATOL, rtol=0)
    # an adapter checkpoint on it (dpo.py's, reward.py's: 'base' the folder) reads it again, and
    # names the base as changed when mm_projector.bin is
    ours.add_adapter("a", r=4, alpha=8)
    save_checkpoint_files(ours, tmp_path / "dpo", base=tmp_path / "orig")
    again = load_checkpoint(tmp_path / "dpo").eval()
    assert torch.equal(again.projector.linear_2.weight, ours.projector.linear_2.weight)
    torch.save({k: v + 1 for k, v in torch.load(tmp_path / "orig" / "mm_projector.bin").items()},
               tmp_path / "orig" / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="holds other weights than this checkpoint"):
        load_checkpoint(tmp_path / "dpo")
    # a key of another projector in it (mlp3x_gelu's 4.*) is refused, not passed over
    stage1 = torch.load(tmp_path / "orig" / "mm_projector.bin")
    torch.save(dict(stage1, **{"model.mm_projector.4.bias": stage1["model.mm_projector.2.bias"]}),
               tmp_path / "orig" / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="mm_projector.bin: key 'model.mm_projector.4.bias' "
                                              "is not part of a LLaVA model"):
        load_checkpoint(tmp_path / "orig")
    # alone (LLaVA's stage-1 output folder: config.json and mm_projector.bin): what to add
    (tmp_path / "orig" / "model.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="its mm_projector.bin alone is LLaVA's stage-1 "
                                              "projector: put the weights of the language model"):
        load_checkpoint(tmp_path / "orig")
    (tmp_path / "model.safetensors").rename(tmp_path / "orig" / "model.safetensors")
    # beside a LLaMA's config.json (no mm_projector_type: its shape unknown): named, not random
    (tmp_path / "orig" / "config.json").write_text(json.dumps(hf_cfg["text_config"]))
    with pytest.raises(CheckpointError, match="mm_projector.bin: not read beside a LLaMA"):
        load_checkpoint(tmp_path / "orig", vision_tower=str(tmp_path / "clip"))


def test_a_stray_mm_projector_bin_beside_a_llava_hf_base_is_not_its_weights(hf_dirs, tmp_path):
    """mm_projector.bin is read beside an original LLaVA's weights without a projector alone;
    beside a llava-hf base nothing reads it, yet it was hashed into the base's fingerprint: its
    adapters (saved before it came, or since) were refused as 'holds other weights'."""
    import shutil
    _, path = hf_dirs["gelu"]
    shutil.copytree(path, tmp_path / "base")
    ours = load_checkpoint(tmp_path / "base")
    ours.add_adapter("a", r=4, alpha=8)
    save_checkpoint_files(ours, tmp_path / "dpo", base=tmp_path / "base")
    torch.save({"model.mm_projector.0.weight": torch.ones(2, 2)},
               tmp_path / "base" / "mm_projector.bin")
    again = load_checkpoint(tmp_path / "dpo")
    assert torch.equal(again.projector.linear_1.weight, ours.projector.linear_1.weight)
    save_checkpoint_files(ours, tmp_path / "dpo2", base=tmp_path / "base")
    (tmp_path / "base" / "mm_projector.bin").unlink()
    assert load_checkpoint(tmp_path / "dpo2") is not None


def test_a_llava_config_without_text_config_is_named(hf_dirs, tmp_path):
    """model_type 'llava' with no text_config and no mm_* field was read as an original LLaVA and
    said "mm_vision_tower '' is not on disk"."""
    import shutil
    from checkpoint import detect_layout
    _, path = hf_dirs["gelu"]
    shutil.copytree(path, tmp_path / "flat")
    cfg = json.load(open(tmp_path / "flat" / "config.json"))
    cfg.update(cfg.pop("text_config"))
    cfg["model_type"] = "llava"
    (tmp_path / "flat" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llava' with neither text_config"):
        detect_layout(str(tmp_path / "flat"))


def test_a_hub_cache_model_folder_names_its_snapshot(hf_dirs, tmp_path):
    """The hub cache's models--org--name folder given for the model: its files are in
    snapshots/REVISION/ ("no config.json (not a checkpoint directory)" said neither)."""
    import shutil
    _, path = hf_dirs["gelu"]
    repo = tmp_path / "models--llava-hf--tiny"
    shutil.copytree(path, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    with pytest.raises(CheckpointError, match=f"^{repo}: no config.json; a hub cache folder: pass "
                                              f"its {repo / 'snapshots'}/REVISION folder \\(here: "
                                              "0123abc\\)$"):
        load_checkpoint(repo)
    assert load_checkpoint(repo / "snapshots" / "0123abc") is not None


def test_llava_lora_release_and_stacked_adapters_are_named(tmp_path):
    """LLaVA's LoRA release (adapter_model + non_lora_trainables.bin beside a LLaVA config.json)
    was reported as missing tokenizer files or weights; an adapter whose base is another adapter
    ended in a traceback (two naming each other: RecursionError)."""
    from checkpoint import detect_layout, peft_base_dir
    lora = tmp_path / "llava-v1.5-7b-lora"
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps({"model_type": "llava_llama",
                                                   "mm_vision_tower": "openai/clip"}))
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (lora / "non_lora_trainables.bin").write_bytes(b"")
    (lora / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"LLaVA's LoRA release layout \(.*merge_lora"):
        detect_layout(str(lora))
    (lora / "adapter_model.safetensors").rename(lora / "model.safetensors")  # (a merged model
    assert detect_layout(str(lora)) == "llava"  # that kept the file from its training)
    for a, b in (("a", "b"), ("b", "a")):
        (tmp_path / a).mkdir()
        (tmp_path / a / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / b)}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: field "
                                              r"'base_model_name_or_path': .* is another PEFT"):
        peft_base_dir(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match="is another PEFT adapter"):
        load_checkpoint(tmp_path / "a")
    # an adapter and its base (a run folder: its checkpoint-N) without tokenizer files: both named
    import common
    (tmp_path / "run" / "checkpoint-000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-000002" / "config.json").write_text("{}")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "run")}))
    base = tmp_path / "run" / "checkpoint-000002"
    with pytest.raises(common.ConfigError, match=f"{tmp_path / 'c'}: no tokenizer files in the "
                       f"checkpoint directory nor in its base {base}"):
        common.load_model_and_tokenizer(str(tmp_path / "c"))


def test_bin_weights_beside_a_safetensors_variant_are_read_as_transformers_reads(hf_dirs,
                                                                                tmp_path):
    """pytorch_model.bin beside model.fp16.safetensors (no model.safetensors, no index):
    transformers reads the .bin; ours read the variant (logits 0.38 apart)."""
    import shutil
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration
    _, path = hf_dirs["gelu"]
    d = tmp_path / "bin"
    shutil.copytree(path, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    save_file({k: v * 0.5 for k, v in state.items()}, str(d / "model.fp16.safetensors"),
              {"format": "pt"})
    theirs = LlavaForConditionalGeneration.from_pretrained(d).eval()
    ours = load_checkpoint(d).eval()
    pixels, ids = inputs(seed=8)
    torch.testing.assert_close(hf_logits(theirs, pixels, ids), ours(pixels, ids), atol=ATOL,
                               rtol=0)


def test_a_bin_in_torchs_older_format_loads_as_transformers_loads_it(hf_dirs, tmp_path):
    """A pytorch_model.bin written before torch's zip format (_use_new_zipfile_serialization
    False), which transformers reads: it was refused as 'truncated or corrupt' (mmap needs zip)."""
    import shutil
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration
    _, path = hf_dirs["gelu"]
    d = tmp_path / "legacy"
    shutil.copytree(path, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    theirs = LlavaForConditionalGeneration.from_pretrained(d).eval()
    pixels, ids = inputs(seed=8)
    torch.testing.assert_close(load_checkpoint(d)(pixels, ids), hf_logits(theirs, pixels, ids),
                               atol=ATOL, rtol=0)


def old_format_shards(hf_dirs, tmp_path):
    """The "gelu" llava-hf model as two shards in torch's pre-zip format: the folder, its files."""
    import shutil
    from safetensors.torch import load_file
    _, path = hf_dirs["gelu"]
    d = tmp_path / "legacy"
    shutil.copytree(path, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    # the CLIP tower and projector first, the language model second: the order they are read in
    first = {k: v for k, v in state.items() if not k.startswith("language_model.")}
    shards = [d / f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    torch.save(first, shards[0], _use_new_zipfile_serialization=False)
    torch.save({k: v for k, v in state.items() if k not in first}, shards[1],
               _use_new_zipfile_serialization=False)
    return d, shards


def test_old_format_bin_shards_are_let_go_once_read(hf_dirs, tmp_path, monkeypatch):
    """Shards in torch's pre-zip format are read whole (no mmap); each was held to the end of the
    load, beside the model built from it (a sharded old-format 7B: the model twice in memory)."""
    import checkpoint
    hf, _ = hf_dirs["gelu"]
    d, shards = old_format_shards(hf_dirs, tmp_path)
    held, get = [], checkpoint.TensorSource.get

    def recording_get(self, part, name):
        t = get(self, part, name)
        held.append((self.where[part, name][0], set(self.handles)))
        return t
    monkeypatch.setattr(checkpoint.TensorSource, "get", recording_get)
    pixels, ids = inputs(seed=8)
    torch.testing.assert_close(load_checkpoint(d)(pixels, ids), hf_logits(hf, pixels, ids),
                               atol=ATOL, rtol=0)
    second = [files for f, files in held if f == str(shards[1])]
    assert second and not any(str(shards[0]) in files for files in second), held[-1]
    assert held[-1][1] == set(), held[-1]


def test_old_format_bin_shards_are_not_read_for_their_shapes_alone(hf_dirs, tmp_path):
    """An FSDP rank other than 0 builds its model on the meta device from the files' shapes
    alone: pre-zip shards were read whole there, every one at once (each rank held the whole
    checkpoint to the end of the load), and on rank 0 each as it was listed. Their names and
    shapes are read on the meta device now (no data), each file's tensors when one is taken.
    The peak of host memory is read from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile
    hf, _ = hf_dirs["gelu"]
    d, shards = old_format_shards(hf_dirs, tmp_path)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        shapes = load_checkpoint(d, device="meta")
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    files = sum(os.path.getsize(f) for f in shards)
    assert peak < files / 2, (peak, files)  # (before: the files' tensors, all of them)
    assert all(p.is_meta for p in shapes.parameters())
    pixels, ids = inputs(seed=8)
    torch.testing.assert_close(load_checkpoint(d)(pixels, ids), hf_logits(hf, pixels, ids),
                               atol=ATOL, rtol=0)


def test_a_pre_zip_bin_is_read_once_its_names_and_shapes_from_its_pickle(tmp_path):
    """A pre-zip .bin listed for its names and shapes (map_location="meta") was read through all
    the same (torch's meta load reads each tensor's bytes, and drops them), then again when its
    first tensor was taken: every such file read twice in a load. Bytes read: /proc/self/io."""
    import checkpoint

    def bytes_read():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])
    names = [f"vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(4)]
    weights = {name: torch.randn(256, 1024) for name in names}  # (4 MB)
    torch.save(weights, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    size = os.path.getsize(tmp_path / "pytorch_model.bin")
    src, before = checkpoint.TensorSource(), bytes_read()
    src.add_dir(str(tmp_path))
    listed = bytes_read() - before
    assert src.shape("vision", names[0][len("vision_model."):]) == (256, 1024)
    got = [src.get("vision", name[len("vision_model."):]) for name in names]
    read = bytes_read() - before
    assert listed < size / 10 and read < 1.2 * size, (listed, read, size)
    assert all(torch.equal(a, weights[name]) for a, name in zip(got, names))
    with open(tmp_path / "pytorch_model.bin", "r+b") as f:  # (its tensors' bytes cut short)
        f.truncate(size // 2)
    src = checkpoint.TensorSource()
    src.add_dir(str(tmp_path))
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights "
                       r"\(truncated or corrupt"):
        src.get("vision", names[0][len("vision_model."):])


def test_a_bin_that_is_no_pytorch_file_is_named_so(tmp_path):
    """A pytorch_model.bin that is no PyTorch file at all (a web page or a text saved under its
    name) was refused as 'cannot read weights (truncated or corrupt file?): 101' (torch's KeyError
    of its first byte); a Git LFS pointer as an unpickling error; a model.safetensors web page as
    'header too large'. A file cut short, within its first bytes too, is still 'truncated or
    corrupt'."""
    import checkpoint
    weights = {"vision_model.post_layernorm.weight": torch.ones(8)}
    (tmp_path / "ckpt").mkdir()
    f = tmp_path / "ckpt" / "pytorch_model.bin"
    zipped, legacy = (tmp_path / "zip.bin", tmp_path / "legacy.bin")
    torch.save(weights, zipped)
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:0a1b\nsize 6000000\n"
    for content, match in (
            (b"error: model not found\n", r"not a PyTorch checkpoint \(neither the zip archive "
             r"nor the pickle torch.save writes\); it begins b'error: model not found\\n'$"),
            (b"<!DOCTYPE html><html>404</html>", "not a PyTorch checkpoint .* b'<!DOCTYPE html>"),
            (lfs, r"a Git LFS pointer, not the file itself \(`git lfs pull`"),
            (zipped.read_bytes()[:100], r"cannot read weights \(truncated or corrupt file\?\)"),
            (legacy.read_bytes()[:5], r"cannot read weights \(truncated or corrupt file\?\)")):
        f.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"^{f}: {match}"):
            checkpoint.TensorSource().add_dir(str(tmp_path / "ckpt"))
    # a model.safetensors that is a web page was "header too large" (its first 8 bytes taken for
    # the header's length); one cut short is still truncated
    from safetensors.torch import save_file
    f.unlink()
    f = tmp_path / "ckpt" / "model.safetensors"
    save_file(weights, str(tmp_path / "whole.safetensors"))
    for content, match in (
            (b"<!DOCTYPE html><html>404</html>", r"not a safetensors file \(no JSON header "
             r"after its 8-byte length\); it begins b'<!DOCTYPE html>"),
            (lfs, r"a Git LFS pointer, not the file itself"),
            ((tmp_path / "whole.safetensors").read_bytes()[:60],
             r"cannot read weights \(truncated or corrupt file\?\)")):
        f.write_bytes(content)
        with pytest.raises(CheckpointError, match=f"^{f}: {match}"):
            checkpoint.TensorSource().add_dir(str(tmp_path / "ckpt"))


def test_a_bin_that_is_not_a_state_dict_is_one_line(hf_dirs, tmp_path):
    """A pytorch_model.bin of a list, or with a number among its tensors, was a traceback
    (AttributeError: no 'keys' / no 'shape')."""
    import shutil
    from safetensors.torch import load_file
    _, path = hf_dirs["gelu"]
    d = tmp_path / "bin"
    shutil.copytree(path, d)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    for obj, match in (([torch.zeros(2)], "not a state dict of named tensors \\(a list\\)"),
                       ({**state, "language_model.model.norm.weight": 3},
                        "key 'language_model.model.norm.weight' holds a value of type int")):
        torch.save(obj, d / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match=f"^{d / 'pytorch_model.bin'}: {match}"):
            load_checkpoint(d)


def test_llama_one_pad_id_minus_one_is_llavas_unk(tmp_path):
    """LLaMA-1 era configs write pad_token_id -1 for 'none'. It was taken as the pad id, which
    generate feeds back in for the rows that have finished: an index error once one row ended
    before another. It is LLaVA's <unk> (0) now; a pad id that is not an integer is refused."""
    from transformers import CLIPVisionModel, LlamaForCausalLM
    LlamaForCausalLM(hf_text_config()).save_pretrained(tmp_path / "llama")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    cfg = json.load(open(tmp_path / "llama" / "config.json"))
    (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(cfg, pad_token_id=-1)))
    ours = load_checkpoint(tmp_path / "llama", vision_tower=str(tmp_path / "clip")).eval()
    assert ours.config.pad_token_id == 0
    torch.manual_seed(0)
    pixels = None  # (the ids hold no image token: images given beside them are refused)
    ids = torch.randint(3, VOCAB, (2, 6))
    first = ours.generate(pixels, ids, max_new_tokens=1, eos_token_id=-1).tokens[:, 0]
    if first[0] == first[1]:  # (row 1 must go on after row 0 ends)
        ids[1, -1] = (ids[1, -1] + 1) % VOCAB
        first = ours.generate(pixels, ids, max_new_tokens=1, eos_token_id=-1).tokens[:, 0]
    assert first[0] != first[1]
    out = ours.generate(pixels, ids, max_new_tokens=4, eos_token_id=int(first[0]))
    assert out.lengths[0] == 1 and out.tokens[0, 1:].eq(0).all()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(cfg, pad_token_id="0")))
    with pytest.raises(CheckpointError, match="llama/config.json: field 'pad_token_id': expected "
                                              "an integer"):
        load_checkpoint(tmp_path / "llama", vision_tower=str(tmp_path / "clip"))


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

def test_peft_target_rule_agrees_with_peft():
    """interop._peft_left_out_by decides as PEFT's check_target_module_exists which modules an
    adapter config gives LoRA (a module it leaves out: PEFT drops its saved weights, so loading
    refuses them): target_modules as a regex or a list, exclude_modules, layers_to_transform as an
    index or a list, layers_pattern as a name or a list, an MoE expert index after the layer's."""
    from types import SimpleNamespace
    from peft.tuners.tuners_utils import check_target_module_exists
    from interop import _peft_left_out_by
    modules = [f"{p}.layers.{i}.{kind}" for p in ("model.language_model", "language_model.model")
               for i in (0, 1, 2, 11) for kind in ("self_attn.q_proj", "self_attn.v_proj",
                                                   "mlp.down_proj", "mlp.experts.1.up_proj")]
    modules += ["model.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj",
                "model.multi_modal_projector.linear_1", "lm_head", "q_proj"]
    configs = [dict(target_modules=["q_proj", "v_proj"]),
               dict(target_modules=r".*language_model.*\.(q|v)_proj"),
               dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2]),
               dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
               dict(target_modules=["q_proj"], layers_to_transform=[11], layers_pattern="layers"),
               dict(target_modules=["q_proj"], layers_to_transform=[1],
                    layers_pattern=["blocks", "layers"]),
               dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="blocks"),
               dict(target_modules=["lm_head", "q_proj"], layers_to_transform=[2]),
               dict(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"],
                    layers_to_transform=[0, 1]),
               dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[]),
               dict(target_modules=["q_proj"], exclude_modules=r".*layers\.0\..*"),
               dict(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern=""),
               dict(target_modules=["q_proj"], layers_to_transform=[1],
                    layers_pattern="layers|blocks"),
               dict(target_modules=[], layers_to_transform=[1]),
               dict(target_modules=[])]
    for cfg in configs:
        ours = _peft_left_out_by(cfg, "adapter_config.json")
        ns = SimpleNamespace(**{k: None for k in ("exclude_modules", "layers_to_transform",
                                                  "layers_pattern", "modules_to_save",
                                                  "target_parameters")})
        vars(ns).update(cfg)
        for m in modules:
            assert (ours(m) is None) == bool(check_target_module_exists(ns, m)), (cfg, m)
    # a list of 20+ whole names: get_peft_model condenses it to suffixes before matching, so the
    # layer check applies to them (below 20 a name listed whole skips it)
    from peft import LoraConfig, get_peft_model
    for n_layers in (8, 12):
        toy = torch.nn.Module()
        toy.model = torch.nn.Module()
        toy.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(n_layers))
        for layer in toy.model.layers:
            layer.q_proj, layer.v_proj = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        names = [f"model.layers.{i}.{p}" for i in range(n_layers) for p in ("q_proj", "v_proj")]
        cfg = dict(target_modules=names, layers_to_transform=[1])
        peft_model = get_peft_model(toy, LoraConfig(r=2, **cfg))
        with_lora = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                     if hasattr(m, "lora_A")}
        ours = _peft_left_out_by(cfg, "adapter_config.json")
        assert {n for n in names if ours(n) is None} == with_lora, n_layers
    # 'all-linear' (which PEFT expands from the model, without its output head)
    all_linear = _peft_left_out_by(dict(target_modules="ALL-linear"), "a.json")
    assert all_linear("lm_head") == all_linear("language_model.lm_head") == "target_modules"
    assert all_linear("model.multi_modal_projector.linear_1") is None
    why = _peft_left_out_by(configs[2], "a.json")
    assert why("model.language_model.layers.1.self_attn.q_proj") == "layers_to_transform"
    assert why("model.language_model.layers.1.self_attn.v_proj") == "target_modules"
    for bad, field in ((dict(layers_to_transform="0"), "layers_to_transform"),
                       (dict(layers_to_transform=[0], layers_pattern=3), "layers_pattern"),
                       (dict(layers_to_transform=[0], layers_pattern="(l"), "layers_pattern"),
                       (dict(layers_pattern="layers"), "layers_pattern"),
                       (dict(target_modules="all-linear", layers_to_transform=[0]),
                        "layers_to_transform"),
                       (dict(target_modules=".*q_proj", layers_pattern="layers"),
                        "layers_pattern")):
        with pytest.raises(CheckpointError, match=f"a.json: field '{field}'"):
            _peft_left_out_by(dict(dict(target_modules=["q_proj"]), **bad), "a.json")
    from peft import LoraConfig  # PEFT refuses the last three too
    for bad in (dict(layers_pattern="layers"), dict(target_modules="all-linear",
                                                      layers_to_transform=[0])):
        with pytest.raises(ValueError):
            LoraConfig(**dict(dict(target_modules=["q_proj"]), **bad))


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


def test_adapters_saved_onto_their_own_base_folder_are_refused(tmp_path):
    """save_pretrained(dir, base=dir) (adapters saved beside the base they sit on) overwrote the
    base's config.json with a pointer to itself: the folder no longer loaded (a loop of base
    pointers). Refused now, the folder as it was; another folder takes them."""
    tiny_model().save_pretrained(tmp_path / "base")
    m = load_checkpoint(tmp_path / "base")
    m.add_adapter("x", r=2, alpha=2)
    randomize_adapter(m, "x", 1)
    before = (tmp_path / "base" / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match="is, or sits on, the checkpoint here"):
        m.save_pretrained(tmp_path / "base", base=tmp_path / "base")
    assert (tmp_path / "base" / "config.json").read_bytes() == before
    load_checkpoint(tmp_path / "base")
    m.save_pretrained(tmp_path / "adapter", base=tmp_path / "base")
    assert load_checkpoint(tmp_path / "adapter").adapters.keys() == {"x"}
    # an adapter checkpoint as its own base, or as the base of one it is the base of: the loop
    # was written (only a base holding weights was checked)
    a = load_checkpoint(tmp_path / "adapter")
    a.save_pretrained(tmp_path / "on_adapter", base=tmp_path / "adapter")
    kept = {f: (tmp_path / "adapter" / f).read_bytes() for f in os.listdir(tmp_path / "adapter")}
    for base in ("adapter", "on_adapter"):
        with pytest.raises(CheckpointError, match="is, or sits on, the checkpoint here"):
            a.save_pretrained(tmp_path / "adapter", base=tmp_path / base)
    assert kept == {f: (tmp_path / "adapter" / f).read_bytes()
                    for f in os.listdir(tmp_path / "adapter")}
    load_checkpoint(tmp_path / "on_adapter")


def test_an_adapter_checkpoint_written_through_a_link_loads_by_either_path(tmp_path):
    """--out through a symlink (runs/ -> /scratch/...): the base was recorded relative to the
    folder as named, so the checkpoint loaded by that path and not by its real one ("base
    checkpoint '../../sft' not found"). It is recorded from the real folder now; one recorded the
    old way still loads by the path it was written through."""
    m = tiny_model()
    m.add_adapter("dpo", 4, 8, 0.0)
    randomize_adapter(m, "dpo", 3)
    m.set_adapter("dpo")
    save_checkpoint_files(m, tmp_path / "sft")
    (tmp_path / "deep" / "x" / "y").mkdir(parents=True)
    os.symlink(tmp_path / "deep" / "x" / "y", tmp_path / "runs")
    save_checkpoint_files(m, tmp_path / "runs" / "dpo", base=tmp_path / "sft")
    pixels, ids = inputs()
    with torch.no_grad():
        want = m.eval()(pixels, ids)
        for path in (tmp_path / "runs" / "dpo", tmp_path / "deep" / "x" / "y" / "dpo"):
            assert torch.equal(load_checkpoint(path).eval()(pixels, ids), want), path
    config = tmp_path / "runs" / "dpo" / "config.json"  # as written before: from the link's name
    json.dump({**json.load(open(config)), "base": "../../sft"}, open(config, "w"))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "runs" / "dpo").eval()(pixels, ids), want)


def test_checkpoint_of_another_shape_names_key_and_shapes(tmp_path):
    save_checkpoint_files(tiny_model(), tmp_path / "a")
    cfg = json.load(open(tmp_path / "a" / "config.json"))
    cfg["model"]["intermediate"] = 80
    json.dump(cfg, open(tmp_path / "a" / "config.json", "w"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "a")
    msg = str(e.value)
    assert "model.safetensors" in msg and "gate_proj.weight" in msg
    assert "(72, 32)" in msg and "(80, 32)" in msg
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
    # a weights file given for its folder exists: it was called 'not found'
    file = tmp_path / "a" / "config.json"
    with pytest.raises(CheckpointError, match="a file, not a checkpoint directory"):
        load_checkpoint(file)
    code, _, err = run_cli("sft", ["--init", str(file), "--out", str(tmp_path / "out")])
    assert code == 2 and err.strip() == f"error: {file}: a file, not a checkpoint " \
        "directory (pass the folder that holds it)", err


def test_checkpoint_cli_errors_are_one_line(tmp_path):
    """Through a script: a bad checkpoint ends with one line and exit code 2, not a traceback."""
    save_checkpoint_files(tiny_model(), tmp_path / "a")
    f = tmp_path / "a" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    import contextlib
    import io
    from common import user_errors
    err = io.StringIO()  # (what a script's main runs in: common.user_errors)
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        with user_errors():
            load_checkpoint(str(tmp_path / "a"))
    assert e.value.code == 2
    err = err.getvalue()
    assert len(err.strip().splitlines()) == 1 and "model.safetensors" in err
    assert "Traceback" not in err


def test_public_model_api_of_design_md(hf_dirs, tmp_path):
    """DESIGN.md's public API on the model class: LLaVA.from_pretrained (any layout),
    save_pretrained, load_adapters, export_hf and export_peft give what checkpoint.* gives."""
    from transformers import LlavaForConditionalGeneration
    _, hf_path = hf_dirs["gelu"]
    pixels, ids = inputs(seed=3)
    ours = LLaVA.from_pretrained(hf_path).eval()
    torch.testing.assert_close(ours(pixels, ids), load_checkpoint(hf_path).eval()(pixels, ids),
                               atol=0, rtol=0)
    ours.add_adapter("policy", r=4, alpha=8)
    randomize_adapter(ours, "policy", 7)
    ours.set_adapter("policy")
    ours.save_pretrained(tmp_path / "ck")
    back = LLaVA.from_pretrained(tmp_path / "ck").eval()
    with torch.no_grad():
        assert torch.equal(back(pixels, ids), ours(pixels, ids))
    ours.export_hf(tmp_path / "hf", merge=False)  # the base; the adapter goes out as PEFT below
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad(), ours.no_adapter():
        torch.testing.assert_close(hf_logits(theirs, pixels, ids), ours(pixels, ids), atol=ATOL,
                                   rtol=0)
    ours.export_hf(tmp_path / "hf_merged")  # the model as it answers: the active adapter merged
    theirs = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf_merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(theirs, pixels, ids), ours(pixels, ids), atol=ATOL,
                                   rtol=0)
    ours.export_peft(tmp_path / "peft", "policy")
    assert os.path.exists(tmp_path / "peft" / "adapter_model.safetensors")
    fresh = LLaVA.from_pretrained(hf_path).eval()
    fresh.load_adapters(tmp_path / "peft", name="policy")
    fresh.set_adapter("policy")
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixels, ids), ours(pixels, ids), atol=ATOL, rtol=0)


def _edited_hf(hf_dirs, tmp_path, edit):
    """A copy of the llava-hf folder whose config.json `edit(cfg)` changed."""
    import shutil
    _, path = hf_dirs["gelu"]
    dst = tmp_path / "edited"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(path, dst)
    cfg = json.load(open(dst / "config.json"))
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["vision_config"].update(layer_norm_eps="1e-5"), "vision_config.layer_norm_eps"),
    (lambda c: c["vision_config"].update(hidden_size=32.0), "vision_config.hidden_size"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "vision_config.hidden_act"),
    (lambda c: c.update(vision_config=[1]), "'vision_config': expected an object"),
    (lambda c: c.update(text_config="llama"), "'text_config': expected an object"),
    (lambda c: c["text_config"].update(rope_scaling="linear"), "text_config.rope_scaling"),
    (lambda c: c["text_config"].update(rope_parameters=[1]), "text_config.rope_parameters"),
    # (a LLaMA with biases: refused naming an unexpected weight key, not the field, before)
    (lambda c: c["text_config"].update(attention_bias=True), "'text_config.attention_bias': True"),
    (lambda c: c["text_config"].update(mlp_bias=True), "'text_config.mlp_bias': True is not"),
    (lambda c: c["text_config"].update(max_position_embeddings="256", sliding_window=128),
     "text_config.max_position_embeddings"),
    (lambda c: c["text_config"].update(model_type="mistral", sliding_window="128"),
     "text_config.sliding_window"),
    (lambda c: c.update(image_token_index=None), "'image_token_index': expected an integer"),
    (lambda c: c.update(image_token_index="99"), "'image_token_index': expected an integer"),
    (lambda c: c.update(image_token_index=150), "'image_token_index': 150 is not a token of the"),
    (lambda c: c["text_config"].update(pad_token_id=150), "text_config.pad_token_id': 150 is not"),
    (lambda c: c["text_config"].update(model_type="mistral", max_position_embeddings=8192),
     "'text_config.sliding_window': 4096 (absent: Mistral's default)"),
    (lambda c: (c["text_config"].update(model_type="mistral"),
                c["text_config"].pop("max_position_embeddings")),
     "'text_config.sliding_window': 4096 (absent: Mistral's default)"),
])
def test_hand_edited_llava_hf_config_is_one_line_naming_the_field(hf_dirs, tmp_path, edit, field):
    """A llava-hf config.json with a field of the wrong type or outside the model: one error naming
    the file and the field (each was a traceback deep in loading, or loaded and failed at the first
    forward; a Mistral text model without sliding_window has transformers' 4096-token window, and
    loaded as one without a window)."""
    path = _edited_hf(hf_dirs, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{path}/config.json") and field in str(e.value), str(e.value)


def test_llava_hf_config_defaults_are_llava_configs(hf_dirs, tmp_path, capsys):
    """Without vision_config transformers' LlavaConfig builds CLIP-L/336 (not CLIPVisionConfig's
    ViT-B/32 defaults, which we read before: a real checkpoint written so was refused with a
    misleading shape); a Mistral text model whose window is null loads; a top-level pad id
    outside the vocabulary (transformers reads the text model's own) gives a note and text_config's
    id, and the export loads in transformers (it was written into text_config: 'Padding_idx must
    be within num_embeddings')."""
    from transformers import LlavaForConditionalGeneration
    from checkpoint import LLAVA_DEFAULT_VISION, vision_fields
    from transformers import LlavaConfig
    for edit in (lambda c: c.pop("vision_config"), lambda c: c.update(vision_config=None)):
        path = _edited_hf(hf_dirs, tmp_path, edit)
        with pytest.raises(CheckpointError, match=r"\(1024,\)"):  # CLIP-L's width, not tiny's
            load_checkpoint(path)
    want = LlavaConfig().vision_config
    assert vision_fields(LLAVA_DEFAULT_VISION) == dict(
        image_size=want.image_size, patch_size=want.patch_size, vision_hidden=want.hidden_size,
        vision_intermediate=want.intermediate_size, vision_layers=want.num_hidden_layers,
        vision_heads=want.num_attention_heads, vision_eps=want.layer_norm_eps)
    assert want.hidden_act == "quick_gelu"
    hf, _ = hf_dirs["gelu"]
    pixels, ids = inputs()
    # (LLaMA's attention reads no window: a leftover field was refused, transformers ignores it)
    for text in (dict(model_type="mistral", max_position_embeddings=8192, sliding_window=None),
                 dict(sliding_window=4)):
        path = _edited_hf(hf_dirs, tmp_path, lambda c: c["text_config"].update(text))
        torch.testing.assert_close(load_checkpoint(path).eval()(pixels, ids),
                                   hf_logits(hf, pixels, ids), atol=ATOL, rtol=0)
    capsys.readouterr()
    path = _edited_hf(hf_dirs, tmp_path, lambda c: c.update(pad_token_id=VOCAB + 50))
    m = load_checkpoint(path)
    assert f"pad_token_id {VOCAB + 50} is not a token" in capsys.readouterr().out
    assert m.config.pad_token_id == 0  # text_config's
    export_llava_hf(m, tmp_path / "export")
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "export")


def test_original_llava_clip_config_is_inferred_only_for_openai_clip(hf_dirs, tmp_path,
                                                                      capsys):
    """An original LLaVA checkpoint holding its CLIP weights whose tower is not on disk: the CLIP
    config was inferred from the weights assuming OpenAI's 64-wide heads and quick_gelu, which
    reads OpenCLIP's ViT-H (80-wide heads, gelu) wrongly without a word. Now refused for any tower
    but OpenAI's, naming --vision_tower."""
    hf, path = hf_dirs["gelu"]
    hf_cfg = json.load(open(os.path.join(path, "config.json")))
    cfg = _original_llava_config(hf_cfg, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    _rewrite_keys(path, tmp_path / "orig", _to_original_llava, config=cfg)
    with pytest.raises(CheckpointError, match="'laion/CLIP-ViT-H-14-laion2B-s32B-b79K' is neither "
                                              "on disk nor in the local hub cache.*--vision_tower "
                                              "DIR"):
        load_checkpoint(tmp_path / "orig")
    for tower in ("openai/clip-vit-large-patch14-336", "/models/clip-vit-large-patch14-336/"):
        cfg["mm_vision_tower"] = tower  # (OpenAI's: read from the weights; the tiny one is 32 wide)
        (tmp_path / "orig" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match="cannot infer the CLIP head count for width 32"):
            load_checkpoint(tmp_path / "orig")
    # --vision_tower gives the config; the weights stay the checkpoint's own (they were swapped
    # for the folder's without a word)
    from transformers import CLIPVisionModel
    torch.manual_seed(5)
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")  # other weights
    ours = load_checkpoint(tmp_path / "orig", vision_tower=str(tmp_path / "clip")).eval()
    assert "its config is read; the CLIP weights are" in capsys.readouterr().out
    pixels, ids = inputs()
    torch.testing.assert_close(ours(pixels, ids.masked_fill(ids == IMAGE_ID, -200)),
                               hf_logits(hf, pixels, ids), atol=ATOL, rtol=0)


def test_original_llava_clip_without_its_unused_last_layer_keeps_its_depth(tmp_path,
                                                                          monkeypatch):
    """An original LLaVA checkpoint holding its CLIP weights but not the layer after the selected
    one (never run), its tower named by OpenAI's hub id: the depth was counted from the weights,
    one short, so -2 selected the output of the layer before (logits 0.8 apart, no word). OpenAI's
    ViTs' depth is known by their width (the test's tiny width stands in for ViT-L's 1024)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    import checkpoint
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=1, image_size=IMG, patch_size=14)
    hf = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=hf_text_config(), image_token_index=IMAGE_ID,
        vision_feature_layer=-2, image_seq_length=4, pad_token_id=0)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    cfg = dict(_original_llava_config(json.load(open(tmp_path / "hf" / "config.json")),
                                      "openai/clip-vit-large-patch14-336"), mm_hidden_size=64)
    unused = lambda k: None if ".encoder.layers.2." in k else _to_original_llava(k)  # noqa: E731
    _rewrite_keys(tmp_path / "hf", tmp_path / "orig", unused, config=cfg)
    monkeypatch.setattr(checkpoint, "OPENAI_CLIP_LAYERS", {64: 3}, raising=False)
    ours = load_checkpoint(tmp_path / "orig").eval()
    assert ours.config.vision_layers == 3
    pixels, ids = inputs()
    torch.testing.assert_close(ours(pixels, ids.masked_fill(ids == IMAGE_ID, -200)),
                               hf_logits(hf, pixels, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("act", ["gelu", "linear"])
def test_llava_hf_projector_without_biases_loads(tmp_path, act):
    """transformers' multimodal_projector_bias false (a projector saved without biases) was
    refused as "no weight for 'projector' 'linear_1.bias' (... a partial file?)"; it is read as
    zero biases (the same function) and exported back as such."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=hf_vision_config(), text_config=hf_text_config(),
        image_token_index=IMAGE_ID, projector_hidden_act=act, multimodal_projector_bias=False,
        image_seq_length=4, pad_token_id=0)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(tmp_path / "hf").eval()
    pixels, ids = inputs()
    want = hf_logits(hf, pixels, ids)
    torch.testing.assert_close(ours(pixels, ids), want, atol=ATOL, rtol=0)
    export_llava_hf(ours, tmp_path / "export")
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    torch.testing.assert_close(hf_logits(again, pixels, ids), want, atol=ATOL, rtol=0)
    adapter_checkpoint_on_it_loads_again(ours, tmp_path / "hf", tmp_path / "adapter")


def adapter_checkpoint_on_it_loads_again(model, hf_dir, out):
    """An adapter checkpoint (dpo.py's, reward.py's) whose base is this llava-hf folder loads
    again as it was saved: it read the base's weights as our layout's, so a 'linear' or bias-free
    projector was refused ("unexpected key" / "no weight for 'linear_1.bias'") and the run could
    not be evaluated, resumed or used as a reward model."""
    model.add_adapter("a", r=4, alpha=8)
    randomize_adapter(model, "a", 1)
    model.set_adapter("a")
    save_checkpoint_files(model, out, base=hf_dir)
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(out)(pixels, ids), model(pixels, ids),
                                   atol=1e-6, rtol=0)


def test_adapter_checkpoint_on_a_linear_projector_base_loads_again(hf_dirs, tmp_path):
    _, path = hf_dirs["linear"]
    adapter_checkpoint_on_it_loads_again(load_checkpoint(path), path, tmp_path / "adapter")


def test_peft_folder_of_several_adapters_and_lm_head_lora_on_a_tied_head(tmp_path):
    """PEFT's save_pretrained of two adapters writes one folder each and nothing at the root: the
    error names them (it said 'not a checkpoint directory'). LoRA on the lm_head of a tied model
    is refused for that reason (it said the head's copy differed from this model's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=hf_vision_config(), text_config=hf_text_config(),
        image_token_index=IMAGE_ID, image_seq_length=4, tie_word_embeddings=True))
    base.save_pretrained(tmp_path / "base")
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="first")
    peft.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    peft.save_pretrained(tmp_path / "two", selected_adapters=["first", "second"])
    with pytest.raises(CheckpointError, match="holds the PEFT adapters first/, second/: pass one"):
        load_checkpoint(tmp_path / "two")
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    head = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    head.save_pretrained(tmp_path / "head")
    with open(tmp_path / "head" / "adapter_config.json") as f:
        adapter_cfg = json.load(f)
    adapter_cfg["base_model_name_or_path"] = str(tmp_path / "base")
    (tmp_path / "head" / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    for embedding_layers in (True, False):  # (with the head's copy beside its LoRA, or without)
        head.save_pretrained(tmp_path / "head", save_embedding_layers=embedding_layers)
        adapter_cfg["base_model_name_or_path"] = str(tmp_path / "base")
        (tmp_path / "head" / "adapter_config.json").write_text(json.dumps(adapter_cfg))
        with pytest.raises(CheckpointError, match="LoRA on the lm_head of a model whose lm_head "
                                                  "is its input embedding"):
            load_checkpoint(tmp_path / "head")


def test_an_eos_list_is_read_and_any_of_its_ids_ends_an_answer(tmp_path):
    """Llama 3's configs list several eos ids (128001, 128008, 128009): such a config was refused
    ('expected an integer'). Read now: model.generate ends a row at any of them, as transformers'
    generate does; our checkpoint and the llava-hf export keep the list; an empty list, or one
    holding a string, is refused naming the field."""
    from transformers import CLIPVisionModel, LlamaForCausalLM
    LlamaForCausalLM(hf_text_config()).save_pretrained(tmp_path / "llama")
    CLIPVisionModel(hf_vision_config()).save_pretrained(tmp_path / "clip")
    clip = str(tmp_path / "clip")
    cfg = json.load(open(tmp_path / "llama" / "config.json"))
    torch.manual_seed(0)
    pixels = None  # (the ids hold no image token: images given beside them are refused)
    ids = torch.randint(3, VOCAB, (2, 6))
    ours = load_checkpoint(tmp_path / "llama", vision_tower=clip).eval()
    first = ours.generate(pixels, ids, max_new_tokens=2, eos_token_id=-1).tokens
    if first[1, 0] in (first[0, 0], 2):  # (row 1 must go on after row 0 ends)
        ids[1, -1] = (ids[1, -1] + 1) % VOCAB
        first = ours.generate(pixels, ids, max_new_tokens=2, eos_token_id=-1).tokens
    eos = [2, int(first[0, 0])]
    (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=eos)))
    ours = load_checkpoint(tmp_path / "llama", vision_tower=clip).eval()
    assert ours.config.eos_token_id == eos
    out = ours.generate(pixels, ids, max_new_tokens=4)  # (the config's eos ids)
    assert out.lengths[0] == 1 and out.finished[0] and out.lengths[1] > 1
    save_checkpoint_files(ours, str(tmp_path / "ours"))
    assert load_checkpoint(str(tmp_path / "ours")).config.eos_token_id == eos
    export_llava_hf(ours, str(tmp_path / "hf"))
    assert json.load(open(tmp_path / "hf" / "config.json"))["text_config"]["eos_token_id"] == eos
    assert load_checkpoint(str(tmp_path / "hf")).config.eos_token_id == eos
    for bad in ([], [2, "3"]):
        (tmp_path / "llama" / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=bad)))
        with pytest.raises(CheckpointError, match=r"field 'eos_token_id': expected an integer or "
                                                  r"a non-empty list of integers"):
            load_checkpoint(tmp_path / "llama", vision_tower=clip)


def test_a_merged_export_makes_one_merged_weight_at_a_time(monkeypatch):
    """canonical_state(merge_active=True) made every merged weight before yielding the first: a
    merged copy of the whole decoder on the device while export_llava_hf wrote (13 GB at 7B).
    Each is made as it is yielded now, and the same weights come out."""
    import checkpoint
    import model as model_module
    torch.manual_seed(0)
    m = LLaVA.from_preset("tiny")
    m.add_adapter("policy", 4, 8)
    for p in m.adapter_parameters("policy"):
        torch.nn.init.normal_(p, std=0.1)
    m.set_adapter("policy")
    want = {k: v.clone() for k, v in checkpoint.canonical_state(m, merge_active=True)}
    made = []
    real = model_module.LoRALinear.weight_with
    monkeypatch.setattr(model_module.LoRALinear, "weight_with",
                        lambda self, name: (made.append(1), real(self, name))[1])
    got, merges_at = {}, []
    for k, v in checkpoint.canonical_state(m, merge_active=True):
        got[k] = v
        merges_at.append(len(made))
    assert len(made) == len(list(m.lora_linears())) > 1
    assert merges_at[0] <= 1  # (not all of them before the first weight)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_merged_export_holds_one_merged_weight_at_a_time_on_the_host(tmp_path, monkeypatch):
    """export_llava_hf gathered every merged weight into one dict before writing the file: a merged
    copy of the whole decoder in host memory beside the model (12 GB more at 7B in bf16; measured
    at 1.1B: +1.9 GB). Each is made as the file is written now, and let go after it; the file
    holds the same weights, and transformers' safetensors reads it."""
    import weakref

    import checkpoint
    import model as model_module
    from safetensors.torch import load_file
    torch.manual_seed(0)
    m = LLaVA.from_preset("tiny", pad_token_id=0)
    m.add_adapter("policy", 4, 8)
    for p in m.adapter_parameters("policy"):
        torch.nn.init.normal_(p, std=0.1)
    m.set_adapter("policy")
    want = {k: v.clone() for k, v in checkpoint.canonical_state(m, merge_active=True)}
    made, most_alive = [], [0]
    real = model_module.LoRALinear.weight_with

    def counted(self, name):
        w = real(self, name)  # (its pieces are views: w lives while any of them does)
        made.append(weakref.ref(w))
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in made))
        return w
    monkeypatch.setattr(model_module.LoRALinear, "weight_with", counted)
    export_llava_hf(m, tmp_path / "e")
    assert len(made) == len(list(m.lora_linears())) > 2  # (each merged once)
    assert most_alive[0] <= 2  # (the one written last, until the next is made, and that one)
    got = load_file(tmp_path / "e" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_load_checks_weights_for_nan_without_a_copy_of_each(tmp_path, monkeypatch):
    """The NaN check made a bool copy of every weight (torch.isfinite(t).all()): at 1.1B the heap
    kept ~0.8 GB of them after the load (peak 2.1 GB of anonymous memory for 1.1 GB of live
    weights) and the load took 5x as long. It reads each weight's min and max now; a NaN or an
    infinity anywhere is still named."""
    torch.manual_seed(0)
    LLaVA.from_preset("tiny").save_pretrained(tmp_path / "ck")
    largest = [0]
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: (
        largest.__setitem__(0, max(largest[0], t.numel())), real(t))[1])
    load_checkpoint(tmp_path / "ck")
    assert 0 < largest[0] <= 1  # (a scalar at a time)
    from safetensors.torch import load_file, save_file
    for bad in (float("nan"), float("-inf")):
        state = load_file(tmp_path / "ck" / "model.safetensors")
        state["language_model.model.layers.1.mlp.down_proj.weight"][3, 5] = bad
        save_file(state, tmp_path / "ck" / "model.safetensors")
        with pytest.raises(CheckpointError, match="down_proj.weight' holds NaN or infinite"):
            load_checkpoint(tmp_path / "ck")


def test_fused_weights_load_in_the_dtype_asked_without_a_copy_in_the_files_dtype(tmp_path):
    """q/k/v and gate/up are one weight each in memory: torch.cat made it in the file's dtype
    on the host, then .to() the dtype (or device) asked for, the two alive at once (an fp16
    release loaded as fp32, as the stages do: the fp16 copy of each fused weight was extra).
    Each part is copied into its rows of the weight as asked now; the values are the same as
    the file's, cast. The peak of host memory during the load is read from the profiler's
    allocation events."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    saved = LLaVA.from_preset("tiny", hidden=256, intermediate=1024, heads=4, kv_heads=4,
                              layers=1, vocab_size=128)
    saved.save_pretrained(tmp_path / "ck")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m = load_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    fused = m.language_model.layers[0].mlp.gate_up_proj.weight
    assert fused.dtype == torch.bfloat16
    # (before: the fp32 gate_up, 2 MB, beside its bf16 copy: 1.5 MB above what the load ends
    # holding; now 0)
    half_of_it = fused.numel()  # (bytes: half the bf16 weight)
    assert peak - live < half_of_it, (peak, live)
    for (name, a), b in zip(m.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b.to(a.dtype)), name
    assert m.projector.linear_1.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.bfloat16, torch.bool])
def test_the_safetensors_writer_writes_every_dtype_safetensors_names(tmp_path, dtype):
    """The writer's dtype table lacked uint16/32/64 and fp8: such a tensor was a bare KeyError.
    Each dtype safetensors names is written, and read back bitwise by safetensors itself; a dtype
    it has no name for is refused naming the tensor and the dtype."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import checkpoint
    bits = torch.arange(48, dtype=torch.uint8).reshape(3, 16)  # (every dtype from the same bytes)
    t = bits.view(dtype) if dtype != torch.bool else bits % 2 == 1
    f = tmp_path / "t.safetensors"
    checkpoint.save_safetensors({"a": t, "b": torch.ones(3)}, str(f), {"format": "pt"})
    with safe_open(str(f), "pt") as s:
        assert s.get_tensor("a").dtype == dtype and s.metadata() == {"format": "pt"}
    got = load_file(f)
    assert got["a"].dtype == dtype and torch.equal(got["a"].view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(got["b"], torch.ones(3))


def test_the_safetensors_writer_names_a_dtype_safetensors_has_no_name_for(tmp_path):
    """Such a dtype was a bare KeyError from the writer's table."""
    import checkpoint
    with pytest.raises(ValueError, match=r"'c' is torch.complex128, which safetensors has no name"):
        checkpoint.save_safetensors({"a": torch.ones(2),
                                      "c": torch.ones(2, dtype=torch.complex128)},
                                     str(tmp_path / "t.safetensors"))
    assert os.listdir(tmp_path) == []  # (nothing written)


def test_a_model_saved_over_the_folder_it_was_loaded_from_keeps_its_weights(tmp_path):
    """A loaded model's weights are read from its files (mmap): the file is written anew and
    renamed over the old one, never rewritten in place under the weights it is written from."""
    torch.manual_seed(0)
    m = LLaVA.from_preset("tiny")
    m.save_pretrained(tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    loaded.save_pretrained(tmp_path / "ck")
    again = load_checkpoint(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]  # (no tmp)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                 again.state_dict().values()))


def test_checkpoint_folders_are_ordered_by_step_and_odd_names_are_passed_over(tmp_path):
    """A folder checkpoint-² (str.isdigit takes it) made latest_checkpoint an int() traceback; and
    old checkpoints were dropped by name, so past step 999999 (seven digits) the newest sorted
    first and was the one removed."""
    import checkpoint
    import rundir
    for name in ("checkpoint-999998", "checkpoint-999999", "checkpoint-1000000", "checkpoint-²"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert checkpoint.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1000000")
    rundir._drop_old_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1000000", "checkpoint-999999",
                                            "checkpoint-²"]


def test_dtype_by_name_loads_as_transformers_takes_it(tmp_path):
    """LLaVA.from_pretrained(dir, dtype="bfloat16") as transformers' from_pretrained takes it
    ("auto": the files' own): a name was a TypeError from inside the first weight's .to().
    Anything else is one line naming dtype."""
    tiny_model().save_pretrained(tmp_path / "m")
    named = LLaVA.from_pretrained(tmp_path / "m", dtype="bfloat16")
    typed = LLaVA.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert named.lm_head.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(),
                                                 typed.state_dict().values()))
    assert LLaVA.from_pretrained(tmp_path / "m", dtype="auto").lm_head.weight.dtype == torch.float32
    # "auto" keeps a bf16 save's dtype, each tensor's own where they differ (a bf16 LoRA run's
    # base beside its fp32 projector), bit for bit (an fp32 save could not tell "auto" from fp32)
    held = tiny_model()
    held.set_trainable(projector=True)
    held.cast_base(torch.bfloat16, keep_trained=True)
    held.save_pretrained(tmp_path / "bf16")
    auto = LLaVA.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert auto.lm_head.weight.dtype == torch.bfloat16
    assert auto.projector.linear_1.weight.dtype == torch.float32
    for (name, a), b in zip(auto.state_dict().items(), held.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for bad in ("bfloat", "int8", torch.int64):
        with pytest.raises(CheckpointError, match="dtype: expected a floating-point torch dtype"):
            LLaVA.from_pretrained(tmp_path / "m", dtype=bad)


def test_vision_tower_as_a_path_object_is_read_as_its_string(tmp_path, monkeypatch):
    """from_pretrained(dir, vision_tower=pathlib.Path("clip")) raised an AttributeError (str's
    startswith read on a Path) where the same name as a str is one line."""
    import pathlib
    tiny_model().save_pretrained(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    for tower in ("clip", pathlib.Path("clip")):
        with pytest.raises(CheckpointError, match="--vision_tower clip: not a CLIP directory"):
            LLaVA.from_pretrained(tmp_path / "m", vision_tower=tower)


def test_a_bad_head_name_in_a_checkpoint_names_its_file_and_field(tmp_path):
    """A config.json whose 'heads' holds a name that cannot be one (or one twice) raised the bare
    ValueError of add_head; an adapter's names its file and field, and so does a head's now."""
    m = tiny_model()
    m.add_head("reward")
    m.save_pretrained(tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    for heads in (["a.b"], ["reward", "reward"]):
        (tmp_path / "rm" / "config.json").write_text(json.dumps(dict(cfg, heads=heads)))
        with pytest.raises(CheckpointError, match="rm/config.json: field 'heads': "):
            load_checkpoint(tmp_path / "rm")


def test_clip_fingerprint_leaves_out_position_ids_a_resave_drops(tmp_path):
    """tensors_fingerprint hashed every vision key, embeddings.position_ids too: a buffer old
    pytorch_model.bin CLIPs hold and transformers >= 4.31's save_pretrained does not write, so the
    same CLIP re-saved through transformers read as replaced (a --resume refused). An fp16 copy
    of an fp32 CLIP is other values: still another fingerprint."""
    from safetensors.torch import save_file
    from checkpoint import tensors_fingerprint
    torch.manual_seed(0)
    weights = {"vision_model.embeddings.class_embedding": torch.randn(8),
               "vision_model.pre_layrnorm.weight": torch.randn(8),
               "vision_model.encoder.layers.0.mlp.fc1.weight": torch.randn(4, 8)}

    def clip(folder, tensors, name, zipped=True):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "config.json").write_text('{"model_type": "clip_vision_model"}')
        if name.endswith(".bin"):
            torch.save(tensors, tmp_path / folder / name, _use_new_zipfile_serialization=zipped)
        else:
            save_file(tensors, tmp_path / folder / name)
        return tensors_fingerprint(str(tmp_path / folder))
    old = clip("bin", {**weights, "vision_model.embeddings.position_ids": torch.arange(5)[None]},
               "pytorch_model.bin")
    assert clip("resaved", weights, "model.safetensors") == old
    assert clip("prezip", weights, "pytorch_model.bin", zipped=False) == old  # (its values read)
    half = clip("fp16", {k: v.half() for k, v in weights.items()}, "model.safetensors")
    assert half != old
