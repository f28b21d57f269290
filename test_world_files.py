"""The Shapes world as files: every stage reads its default data through the public readers, and
gets the same records, in the same order, that it built from the world in memory before (each test
writes the old road's code out as it was, on the world's own functions)."""
import dataclasses
import json
import os
import types

import torch

import common
import dpo
import ppo
import reward
import sft
import shapes
import vigc
from checkpoint import latest_checkpoint, load_checkpoint
from data import ImageCache, load_json, load_tokenizer, read_any_conversations
from data import read_llava_rlhf_preference, read_rl_prompts
from conftest import two_ranks


def resolved(module, world, **flags):
    """A stage's Config: its defaults, --world WORLD and flags, '{world}' resolved as main does."""
    cfg = module.Config(world=world, **flags)
    return common.world_paths(cfg)[0]


def same_conversations(a, b):
    key = lambda r: (r["id"], r["image"], r["conversations"])
    return [key(r) for r in a] == [key(r) for r in b]


def test_world_paths_resolve_and_drop_companions_of_a_users_data():
    reads, companions = ("data", "tokenizer"), ("val_data", "align_data", "read_data")
    got, named = common.world_paths(sft.Config(world="/w"), reads, companions)
    paths = (got.data, got.val_data, got.align_data, got.read_data, got.tokenizer)
    assert paths == ("/w/sft.json", "/w/sft_val.json", "/w/align.json", "/w/sft_read.json",
                     "/w/tokenizer")
    assert named == ["data", "tokenizer", "val_data", "align_data", "read_data"]
    mine = sft.Config(world="/w", data="mine.json")  # a user's data brings its own validation set
    got, named = common.world_paths(mine, reads, companions)
    paths = (got.data, got.val_data, got.align_data, got.read_data, got.tokenizer)
    assert paths == ("mine.json", "", "", "", "/w/tokenizer") and named == ["tokenizer"]
    checkpoint = sft.Config(world="/w", data="mine.json", init="ck")
    got, named = common.world_paths(checkpoint, companions=("val_data",))
    assert named == [] and got.tokenizer == "/w/tokenizer"  # resolved (a fallback), not read


def test_world_writes_the_stage_inputs_in_public_formats(tiny_world):
    captions = load_json(os.path.join(tiny_world, "image_to_caption.json"))
    assert captions == shapes.world_captions(tiny_world)  # LLaVA-RLHF's {image: [captions]}
    info = load_json(os.path.join(tiny_world, "vigc_instructions.json"))
    listed = open(os.path.join(tiny_world, "vigc_images.txt")).read().splitlines()
    assert listed == [x["image"] for x in info["unlabeled"]] and len(listed) == 12
    default = shapes.lrv_file(tiny_world, shapes.DEFAULTS["neg_ratio"], 0)
    assert os.path.dirname(default) == os.path.join(tiny_world, "lrv")  # written with the world
    world = json.load(open(os.path.join(tiny_world, "world.json")))
    assert world["version"] == shapes.FORMAT_VERSION


def test_sft_reads_the_world_files_as_it_built_them(tiny_world):
    cfg = resolved(sft, tiny_world, lrv=True, neg_ratio=0.25, seed=3)
    train, val, skipped = sft.load_records(cfg)
    read = lambda name: read_any_conversations(os.path.join(tiny_world, name), tiny_world)
    old_train = read("sft.json") + shapes.lrv_mix(tiny_world, 0.25, seed=3)
    assert same_conversations(train, old_train) and not skipped
    assert same_conversations(val, read("sft_val.json"))
    assert os.path.exists(os.path.join(tiny_world, "lrv", "neg0.25-seed3.json"))  # on first use
    aligned = read_any_conversations(cfg.align_data, cfg.image_folder or None)
    assert same_conversations(aligned, read("align.json"))


def test_reward_reads_the_world_files_as_it_built_them(tiny_world):
    cfg = resolved(reward, tiny_world, eval_size=5)
    train, val, stats = reward.load_pairs(cfg, None, None, None)
    caps = shapes.world_captions(tiny_world)
    old = []
    for name, n in (("pref_pairs.json", None), ("pref_pairs_val.json", cfg.eval_size)):
        recs = read_llava_rlhf_preference(os.path.join(tiny_world, name), tiny_world)[:n]
        for r in recs:
            r["captions"] = caps[os.path.relpath(r["image"], tiny_world)]
        old.append(recs)
    assert train == old[0] and val == old[1] and len(val) == 5 and stats == {}


def test_dpo_reads_the_world_files_as_it_built_them(tiny_world):
    train, val, skipped = dpo.load_pairs(resolved(dpo, tiny_world))
    read = lambda f, fmt: dpo.read_pairs(os.path.join(tiny_world, f), fmt, tiny_world, "raise")
    old_train, _ = read("povid_pairs.json", "povid")
    old_val, _ = read("pref_pairs_val.json", "llava_rlhf")
    assert train == old_train and val == old_val and not skipped


def test_ppo_reads_the_world_files_as_it_built_them(tiny_world):
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    config = types.SimpleNamespace(image_token_id=4, num_image_tokens=4)
    cfg = resolved(ppo, tiny_world)
    model = types.SimpleNamespace(config=config)
    prompts, dropped = ppo.load_prompts(cfg, True, tok, model, "vicuna_v1")
    path = os.path.join(tiny_world, "rl_prompts.json")
    old = read_rl_prompts(path, tiny_world, need_captions=True)
    assert [{k: v for k, v in p.items() if k != "input_ids"} for p in prompts] == old
    assert dropped == 0


def test_vigc_reads_the_world_files_as_it_built_them(tiny_world):
    cfg = resolved(vigc, tiny_world)
    records, instructions = vigc.load_records(cfg), vigc.load_instructions(cfg.instructions)
    info = load_json(os.path.join(tiny_world, "vigc_instructions.json"))
    assert instructions == {t: info[t] for t in vigc.TYPES.values()}
    old = []
    path = os.path.join(tiny_world, "sft.json")
    raw = load_json(path)
    for j, r in enumerate(read_any_conversations(path, tiny_world)):
        conv, qtypes = r["conversations"], raw[j].get("qtypes")
        kind = lambda i: info["qtype_to_type"][qtypes[i // 2]]  # (an unknown one: refused)
        pairs = [(conv[i]["value"].replace("<image>", "").strip(), conv[i + 1]["value"].strip(),
                  kind(i) if qtypes else "conversation") for i in range(0, len(conv) - 1, 2)]
        pairs = pairs if r["image"] else []
        old.append({"image": r["image"], "conversations": conv, "pairs": pairs})
    assert records == old
    unlabeled = [(x["image"], os.path.join(tiny_world, x["image"])) for x in info["unlabeled"]]
    assert vigc.image_list(cfg) == unlabeled


def test_a_data_weight_repeats_records_tokenized_once(tiny_world, tiny_sft, monkeypatch):
    cfg = resolved(sft, tiny_world, data="{world}/sft.json:2.5", lrv=False)
    train = sft.load_records(cfg)[0]
    n = len(read_any_conversations(cfg.data.rsplit(":", 1)[0], tiny_world))
    assert len(train) == round(2.5 * n) and len({id(r) for r in train}) == n  # references
    tokenized_counts = []
    tokenize = sft.tokenize_conversations

    def counting(tokenizer, conversations, *args):
        tokenized_counts.append(len(conversations))
        return tokenize(tokenizer, conversations, *args)

    monkeypatch.setattr(sft, "tokenize_conversations", counting)
    model_config = load_checkpoint(latest_checkpoint(tiny_sft)).config
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    data = sft.Tokenized(train, tok, model_config, cfg, images=None)
    assert tokenized_counts == [n] and len(data) == len(train) and data.dropped == 0
    for r, ((ids, learned), image) in zip(train, data.items):  # each as if tokenized alone
        (alone_ids, alone_learned), alone_image = sft.Tokenized([r], tok, model_config, cfg,
                                                                images=None).items[0]
        assert image == alone_image and torch.equal(ids, alone_ids)
        assert torch.equal(learned, alone_learned)


def test_sft_keeps_each_conversation_compact_and_gives_it_back_whole(tiny_world, tiny_sft,
                                                                       monkeypatch, capsys):
    """Two int64 rows per conversation (ids and labels) were ~14 GB per process for LLaVA's 665k at
    576 image tokens, tokenized without a word for minutes: int32 ids and a bool mask of the
    learned ones now, the same ids and labels out, and a progress line over the parts."""
    cfg = resolved(sft, tiny_world, lrv=False)
    train = sft.load_records(cfg)[0][:40]
    model_config = load_checkpoint(latest_checkpoint(tiny_sft)).config
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    monkeypatch.setattr(sft, "TOKENIZE_PART", 16)
    images = ImageCache(model_config.image_size)
    data = sft.Tokenized(train, tok, model_config, cfg, images, show=True)
    assert "tokenizing 40 conversations, parts 3/3" in capsys.readouterr().err
    want = sft.tokenize_conversations(tok, [r["conversations"] for r in train],
                                      model_config.image_token_id,
                                      model_config.num_image_tokens, cfg.max_len, cfg.template)
    assert len(data) == len(want) == 40
    for i, w in enumerate(want):
        (ids, learned), _ = data.items[i]
        assert ids.dtype == torch.int32 and learned.dtype == torch.bool
        item = {k: v for k, v in data[i].items() if k != "pixel_values"}
        assert item.keys() == w.keys() and item["input_ids"].dtype == torch.long
        assert all(torch.equal(item[k], w[k]) for k in w)


def _tokenized_rank(rank, d, args):
    records, tok, model_config, cfg, template = args
    counted, tokenize = [], sft.tokenize_conversations
    sft.tokenize_conversations = lambda t, turns, *rest: counted.append(len(turns)) or tokenize(
        t, turns, *rest)
    images = ImageCache(model_config.image_size)
    data = sft.Tokenized(records, tok, model_config, cfg, images, template=template, d=d,
                         needed=sft.items_taken(range(2), 4, cfg.seed, d))
    held = {i: {k: v.tolist() for k, v in data[i].items()}
            for i, (tokens, _) in enumerate(data.items) if tokens is not None}
    return data.dropped, data.n_labels.tolist(), held, sum(counted)


def test_under_torchrun_each_rank_tokenizes_a_share_and_keeps_its_batches(tiny_world, tiny_sft):
    """Every rank tokenized and held the whole mix (LLaVA's 665k: ~9 min and ~10 GB per process):
    each measures a share now (what fits, and the learned tokens), and keeps the ids of the items
    its own batches take; the counts, the drops and those items are one process's."""
    cfg = resolved(sft, tiny_world, data="{world}/sft.json:1.5", lrv=False, max_len=50)
    records = sft.load_records(cfg)[0]
    model_config = load_checkpoint(latest_checkpoint(tiny_sft)).config
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    whole = sft.Tokenized(records, tok, model_config, cfg, ImageCache(model_config.image_size))
    assert 0 < whole.dropped < len(records) / 2  # (--max_len 50: some do not fit)
    got = two_ranks(_tokenized_rank, (records, tok, model_config, cfg, None))
    unique = len({id(r) for r in records})
    for rank in (0, 1):
        assert not isinstance(got[rank], str), got[rank]
        dropped, n_labels, held, counted = got[rank]
        assert dropped == whole.dropped and n_labels == whole.n_labels.tolist()
        mine = sft.items_taken(range(2), 4, cfg.seed, types.SimpleNamespace(rank=rank, world=2))
        # (a repeated record's copies come with it)
        assert mine(len(whole)) <= set(held) and len(held) < len(whole) / 2
        for i, item in held.items():
            assert item == {k: v.tolist() for k, v in whole[i].items()}
        assert counted <= unique // 2 + 1 + len(held)  # (its share, and its batches' items)
    # none fits: every rank has none (main says so in one line, as with one process; it was a
    # ZeroDivisionError planning the batches of no items)
    short = dataclasses.replace(cfg, max_len=20)
    got = two_ranks(_tokenized_rank, (records, tok, model_config, short, None))
    assert got == {rank: (len(records), [], {}, unique // 2) for rank in (0, 1)}, got
    # a conversation the template cannot render: every rank stops on the first, as one process
    captions = json.load(open(os.path.join(tiny_world, "align.json")))[:8]
    two_turn = json.load(open(os.path.join(tiny_world, "sft.json")))
    two_turn = [r for r in two_turn if len(r["conversations"]) > 2][:2]
    mixed = captions[:3] + two_turn[:1] + captions[3:5] + two_turn[1:] + captions[5:]
    mixed = read_any_conversations_of(mixed, tiny_world)
    try:
        sft.Tokenized(mixed, tok, model_config, cfg, None, template="plain")
        raise AssertionError("plain rendered a multi-turn conversation")
    except common.ConfigError as e:
        want = str(e)
    assert f"record {two_turn[0]['id']}" in want
    nameless = read_any_conversations_of([{k: v for k, v in r.items() if k != "id"}
                                          for r in mixed], tiny_world)
    try:  # (records without ids: it said "record None")
        sft.Tokenized(nameless, tok, model_config, cfg, None, template="plain")
        raise AssertionError("plain rendered a multi-turn conversation")
    except common.ConfigError as e:
        assert "--template plain: conversation 3 of the run's data: " in str(e), str(e)
    want = f"ConfigError: {want}"
    assert two_ranks(_tokenized_rank, (mixed, tok, model_config, cfg, "plain")) == {0: want,
                                                                                   1: want}


def read_any_conversations_of(records, world):
    """records read as a --data file of them is."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(records, f)
    try:
        return read_any_conversations(f.name, world)
    finally:
        os.remove(f.name)


def test_a_turn_holding_the_end_text_teaches_nothing_as_in_llava(tiny_world, tiny_sft, tmp_path):
    """A value holding '</s>' (HTML's strikethrough in a ShareGPT chat) is tokenized as the end of
    the turn: the model learned to end its answer there, and the rest after it. LLaVA's preprocess
    finds a 'tokenization mismatch' and masks the whole conversation: so does ours, said."""
    from conftest import run_cli
    cfg = resolved(sft, tiny_world, lrv=False)
    records = [dict(r) for r in sft.load_records(cfg)[0][:4]]
    turns = [dict(t) for t in records[1]["conversations"]]
    turns[1]["value"] = "Use </s> to end a strikethrough. " + turns[1]["value"]
    records[1]["conversations"] = turns
    model_config = load_checkpoint(latest_checkpoint(tiny_sft)).config
    tok = load_tokenizer(os.path.join(tiny_world, "tokenizer"))
    data = sft.Tokenized(records, tok, model_config, cfg, None)
    assert data.unlearned == 1 and data.n_labels[1] == 0 and all(data.n_labels[[0, 2, 3]] > 0)
    assert not data.items[1][0][1].any() and data.items[0][0][1].any()
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": r["id"], "image": os.path.relpath(r["image"], tiny_world),
                                 "conversations": r["conversations"]} for r in records]))
    code, out, err = run_cli("sft", ["--init", tiny_sft, "--world", tiny_world, "--data", str(path),
                                     "--image_folder", tiny_world, "--max_steps", "1",
                                     "--batch_size", "4", "--out", str(tmp_path / "o")])
    assert code == 0 and "warning: 1 training conversations teach no token: a turn holds the " \
        "template's end text '</s>'" in out, err
    # ' ASSISTANT: ' inside a question or an answer: LLaVA's round splits in three, a mismatch
    # (ours learned the answers)
    for i, at in ((0, 0), (2, 1)):
        turns = [dict(t) for t in records[i]["conversations"]]
        turns[at]["value"] += " Say ASSISTANT: hi"
        records[i] = dict(records[i], conversations=turns)
    data = sft.Tokenized(records, tok, model_config, cfg, None)
    assert data.unlearned == 3 and data.n_labels[3] > 0 and not any(data.n_labels[:3]), \
        data.n_labels
    assert "or its answer mark ' ASSISTANT: '" in out
    # --template plain: LLaVA's preprocess_plain checks nothing (a caption is learned as it is)
    captions = read_any_conversations(os.path.join(tiny_world, "align.json"), tiny_world)[:2]
    captions[0]["conversations"][1]["value"] += " </s> and more."
    plain = sft.Tokenized(captions, tok, model_config, cfg, None, template="plain")
    assert plain.unlearned == 0 and all(plain.n_labels > 0)
