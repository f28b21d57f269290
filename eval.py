r"""Evaluation: POPE, CHAIR, MMHal-Bench, GAVIE and LLaVA-Bench, with judges that run offline.

    python eval.py  # ckpt/sft, Shapes world, all four, oracle judge
    python eval.py --compare ckpt/sft ckpt/ppo ckpt/dpo  # one Markdown table: OUT/compare.md, .json
    python eval.py --ckpt llava-v1.5-7b --device cuda --benchmarks pope \
        --image_folder coco/val2014 \
        --pope_files coco_pope_random.jsonl,coco_pope_popular.jsonl,coco_pope_adversarial.jsonl \
        --pope_suffix '\nAnswer the question using a single word or phrase.' --template llava_v1 \
        --pope_max_new_tokens 64
    python eval.py --ckpt DIR --benchmarks chair --chair_instances instances_val2014.json \
        --chair_synonyms synonyms.txt --image_folder coco/val2014 --limit 500 --max_new_tokens 512
    python eval.py --ckpt DIR --benchmarks mmhal --mmhal_file response_template.json \
        --judge openai --judge_model gpt-4-0314 --max_new_tokens 1024 --template llava_v1 \
        --judge_prompt mmhal=mmhal_judge.txt --judge_max_tokens 0
        # key: --judge_key or $OPENAI_API_KEY; the real-data settings are LLaVA-RLHF's
        # (Eval/model_vqa*.py)
    python eval.py --ckpt DIR --benchmarks llava_bench --llava_bench_file qa90_questions.jsonl \
        --llava_bench_answers qa90_gpt4_answer.jsonl --image_folder eval_image \
        --llava_bench_context caps_boxes_coco2014_val_80.jsonl --llava_bench_rule rule.json \
        --judge openai --judge_model gpt-4-0314 --judge_max_tokens 1024 --max_new_tokens 1024 \
        --template llava_v1 --temperature 0.2
        # LLaVA-RLHF's Eval/eval_scripts/eval_llava_bench.sh (its model_vqa.py samples at 0.2);
        # no Shapes version (its score is a judge's preference between two answers, which the
        # oracle cannot give)

Files (OUT = --out; NAME = the checkpoint's folder name: ckpt/sft -> sft; sft-1, ... where
another checkpoint of that name has its scores in OUT/sft, a note says so):
  OUT/NAME/answers_<bench>[_<split>].jsonl  one line per question {"id", "prompt", "answer",
      + what scoring needs, "source", "image_digest"}, appended batch by batch: a run that stops
      keeps its answers, the next run generates only the missing ones (a stored line counts when
      its prompt, its image's bytes and its source, i.e. checkpoint files and decoding settings,
      are the same). --rescore true: score what is there, no model (the lines of one source: the
      one these flags write, else --ckpt's; scores.json names it in "answers_from"; questions
      without a stored answer: the row is marked "(partial)", the score "partial"); --rescore
      true --llava_answers FILE scores a LLaVA answers file
      instead; LLaVA-1.5's POPE: --pope_files llava_pope_test.jsonl --pope_labels
      coco_pope_random.json coco_pope_popular.json coco_pope_adversarial.json (labels paired by
      order within each category, as LLaVA's eval_pope.py).
  OUT/NAME/judge_<bench>.jsonl   judge replies {"id", "judge", "answer", "reply",
                                 "prompt_digest"}, reused for the same judge (with its endpoint
                                 and --judge_max_tokens) and the same prompt and image
  OUT/NAME/scores.json           every number (benchmarks of earlier runs of the same model
                                 into OUT kept: "model" names its checkpoint and files' time;
                                 "answers_made": how each one's answers were made, how many);
                                 OUT/compare.md and .json with --compare
  OUT/NAME/export/               --export true: pope_<split>.jsonl and llava_bench.jsonl as LLaVA's
                                 model_vqa.py writes answers, mmhal.json as MMHal-Bench's
                                 eval_gpt4.py reads them, chair.jsonl as the CHAIR scripts read
                                 captions (for the reference scorers)
References read for the definitions (each named again where it is implemented): RUCAIBox/POPE
evaluate.py, haotian-liu/LLaVA llava/eval/eval_pope.py and scripts/v1_5/eval/pope.sh,
llava-rlhf/LLaVA-RLHF Eval/summarize_eval_pope.py, Eval/eval_scripts/eval_pope.sh,
Eval/model_vqa.py and MMHal-Bench-eval/eval_gpt4.py, LisaAnne/Hallucination utils/chair.py,
FuxiaoLiu/LRV-Instruction Evaluation/evaluate.py.

benchmarks.py reads each benchmark's questions (the Shapes world's and the published files');
this file asks them and keeps the answers; metrics.py turns answers into POPE and CHAIR
numbers, judges.py holds the judge prompts, reply parsers and metrics of MMHal-Bench, GAVIE and
LLaVA-Bench, and the judges.
"""
import interrupts  # noqa: F401 (first: a Ctrl-C during the imports below is one line)
import collections
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass

import torch

import common
import distributed
import rundir
from benchmarks import JUDGED, load_benchmarks, shapes_world_read
from data import IMAGE, DataError, ImageCache, load_json, read_text
from formats import QUESTIONS_NOT_ANSWERS, TAG_IN_TEXT
from checkpoint import (base_weights_dir, check_weight_headers, detect_layout, is_peft_dir,
                        no_dir, peft_base_dir, refuse_scalar_model, resolve_checkpoint)
from model import CheckpointError
from judges import (PLACEHOLDERS, JudgeError, gavie_metrics, judge_prompt, llava_bench_metrics,
                    load_judge_prompts, make_judge, mmhal_metrics, system_line)
from metrics import chair_counts, chair_metrics, mean, pope_metrics, pope_yes_no

BENCHMARKS = ("pope", "chair", "mmhal", "gavie", "llava_bench")
SHAPES_BENCHMARKS = BENCHMARKS[:4]  # the default: the ones the Shapes world has


@dataclass
class Config:
    """Evaluate checkpoints on POPE, CHAIR, MMHal-Bench, GAVIE and LLaVA-Bench (Shapes world by
    default)."""
    ckpt: str = "ckpt/sft"  # checkpoint (or run directory: its newest checkpoint) to evaluate
    compare: tuple = ()  # several checkpoints on the same questions -> OUT/compare.md and .json
    out: str = "runs/eval"  # one subfolder per checkpoint: answers, judge replies, scores.json
    benchmarks: tuple = SHAPES_BENCHMARKS  # any of pope, chair, mmhal, gavie, llava_bench
    world: str = "data/shapes"  # Shapes world used when no file is given (written on first use)
    world_seed: int = 0  # seed of a Shapes world written on first use
    limit: int = 0  # questions per benchmark and POPE split (0: all; Shapes: all but GAVIE 60)
    image_folder: str = ""  # images of the given files (default: beside each file; MMHal: images/)
    pope_files: tuple = ()  # POPE JSON-lines files; split from a 'category' field or the file name
    pope_labels: tuple = ()  # label files (coco_pope_<split>.json) for a file without labels
    # LLaVA-1.5/-RLHF: --pope_suffix '\nAnswer the question using a single word or phrase.'
    pope_suffix: str = ""  # appended to POPE questions; '\n': newline (LLaVA's: eval.py docstring)
    chair_instances: str = ""  # COCO instances_val2014.json: CHAIR on its first --limit images
    chair_synonyms: str = ""  # CHAIR synonyms.txt: a comma-separated line per category, name first
    chair_captions: str = ""  # optional COCO captions: objects its captions name count as present
    chair_counting: str = "reference"  # 'reference' (chair.py: every mention) or 'ours' (once each)
    chair_prompt: str = "Please describe this image in detail."  # CHAIR prompt for COCO images
    mmhal_file: str = ""  # MMHal-Bench response_template.json (empty: Shapes mmhal.json)
    gavie_file: str = ""  # LRV evaluation_set.json [{"image_id", "question"}] (empty: Shapes test)
    gavie_annotations: str = ""  # {image_id: [{"caption", "bbox": [x, y, w, h]}]} for --gavie_file
    llava_bench_file: str = ""  # LLaVA-Bench questions: qa90_questions.jsonl (or the 30x3 file)
    llava_bench_answers: str = ""  # its reference answers, qa90_gpt4_answer.jsonl (30x3: inline)
    llava_bench_context: str = ""  # caps_boxes_coco2014_val_80.jsonl or In-the-Wild's context.jsonl
    llava_bench_rule: str = ""  # LLaVA's table/rule.json (its conv/detail/complex; empty: ours)
    # In-the-Wild's caption as the judge reads it: joined, '\n'.join(caption) as LLaVA's script
    # (a string one character a line), or whole, as lmms-eval sends it
    llava_bench_caption: str = "joined"
    judge: str = "oracle"  # MMHal/GAVIE judge: oracle (Shapes only), openai, local
    judge_model: str = "gpt-4-0314"  # openai: model name (MMHal-Bench's); local: causal LM folder
    judge_url: str = "https://api.openai.com/v1"  # OpenAI-compatible base URL (or its endpoint)
    judge_key: str = ""  # API key (default: $OPENAI_API_KEY)
    judge_retries: int = 5  # retries on 429, 5xx and connection errors
    judge_backoff: float = 2.0  # seconds before retry 1, doubled each time (at most an hour)
    judge_timeout: float = 120.0  # seconds to connect, to the headers, and for the body (a day max)
    # longest judge reply (openai: 0 sends no limit, as LLaVA-RLHF's eval_gpt_mmhal.py; LLaVA's
    # review scripts: 1024)
    judge_max_tokens: int = 512
    judge_prompt: tuple = ()  # mmhal=FILE / gavie=FILE: official judge prompt, named placeholders
    mmhal_rating: str = "reference"  # no single rating: 'reference' scores 0, 'ours' leaves it out
    rescore: bool = False  # score the answers on disk; never load a model or generate
    llava_answers: str = ""  # --rescore: score a LLaVA answers file {question_id, prompt, text}
    export: bool = False  # also write OUT/NAME/export/: the answers as reference scorers read them
    batch_size: int = 128  # questions per generation batch (real 7B models on one GPU: about 8-16)
    max_new_tokens: int = 64  # longest description/MMHal/GAVIE answer (real 512; LLaVA-RLHF 1024)
    pope_max_new_tokens: int = 16  # longest POPE answer (only its first sentence counts)
    # decode through torch.compile (model.generate(compile=True); its decode cache stays
    # allocated): CUDA graphs on a GPU; on a CPU slower than eager and 10-40 s to compile
    compile_decode: bool = False
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    seed: int = 0  # sampling seed
    template: str = "vicuna_v1"  # conversation template: vicuna_v1 or llava_v1
    max_len: int = 2048  # longest prompt in tokens
    vision_tower: str = ""  # CLIP folder if --ckpt has no CLIP weights (default: the one it names)
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, or bf16 (cuda)
    # allowed values (common.parse_config refuses others in one line; any float must also be finite)
    RANGES = dict(benchmarks=BENCHMARKS, world_seed="[0, inf)", limit="[0, inf)",
                  chair_counting=("reference", "ours"), judge=("oracle", "openai", "local"),
                  judge_retries="[0, inf)", judge_backoff="[0, 3600]", judge_timeout="(0, 86400]",
                  judge_max_tokens="[0, inf)", mmhal_rating=("reference", "ours"),
                  batch_size="[1, inf)", max_new_tokens="[1, inf)", pope_max_new_tokens="[1, inf)",
                  temperature="[0, inf)", top_p="(0, 1]", seed=common.SEED_RANGE,
                  template=("vicuna_v1", "llava_v1"), max_len="[1, inf)", device=("cpu", "cuda"),
                  dtype=("fp32", "bf16"), llava_bench_caption=("joined", "whole"))


# ----------------------------------------------------------------------------------------
# JSON-lines files written one line at a time
# ----------------------------------------------------------------------------------------

def read_jsonl(path):
    """The records of a file we append to. A last line without its newline that does not parse (a
    write cut short) is dropped and the file rewritten without it, so the next append starts on a
    clean line; any other line that is not a JSON object is an error (it was dropped too, and the
    file rewritten: a hand edit lost answers and scores counted fewer)."""
    if not os.path.exists(path):
        return []
    text = read_text(path)
    lines = [x for x in text.split("\n") if x.strip()]
    cut = text and not text.endswith("\n")  # (the last line's write did not finish)
    good = []
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if isinstance(r, dict):
            good.append(r)
        elif not (cut and i == len(lines) - 1):
            raise DataError(path, i, None, f"not a JSON object: {line.strip()!r:.60} (fix or "
                                           "delete the line)")
    if cut:
        common.write_whole(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in good))
    return good


# ----------------------------------------------------------------------------------------
# answers: reused from the answers file, else generated and appended batch by batch
# ----------------------------------------------------------------------------------------

class Answerer:
    """One checkpoint's answers: reused from its answers files when there, else generated and
    appended."""

    def __init__(self, cfg, ckpt, name, bench=None):
        self.cfg = cfg
        self.bench = bench or {}  # the run's questions (RUCAIBox's answers pair with them)
        self.ckpt = ckpt
        self.name = name
        self.model = None
        self.memo = {}
        self.last = (None, None)
        self.source = source(cfg, ckpt) if not cfg.rescore or os.path.isdir(ckpt) else None
        self.rescored_from = set()  # --rescore: the sources of the answers scored
        self.partial = {}  # --rescore: bench -> "N of M questions" where some have no answer
        self.made = {}  # bench -> {how its scored answers were made: count} (scores.json)
        self.digests = {}  # image file -> image_digest
        self.past_positions = False  # (said once)

    def _load(self):
        if self.model is None:
            cfg = self.cfg
            dtype = torch.bfloat16 if cfg.dtype == "bf16" and cfg.device == "cuda" else None
            self.model, self.tok = common.load_model_and_tokenizer(
                self.ckpt, vision_tower=cfg.vision_tower, device=cfg.device, dtype=dtype)
            # (the answer lengths this run reads: POPE's with pope, the other's with the others)
            lengths = ["pope_max_new_tokens"] if "pope" in cfg.benchmarks else []
            lengths += ["max_new_tokens"] if set(cfg.benchmarks) - {"pope"} else []
            common.check_new_tokens(self.model, cfg, *lengths)
            image_size = self.model.config.image_size
            self.images = ImageCache(image_size, 20000 if image_size <= 64 else 0)

    def _item(self, q):
        turns = [{"from": "human", "value": IMAGE + "\n" + q["prompt"]}]
        if self.last[0] != q["image"]:  # POPE asks about one image several times in a row
            self.last = (q["image"], self.images.unit(q["image"], q["file"], q["where"]))
        item = common.prompt_item(self.tok, self.model, turns, self.last[1], self.cfg.template,
                                  self.cfg.max_len)
        if item is None:  # (cut, the model went on writing the question)
            message = (f"the prompt does not fit --max_len {self.cfg.max_len} (tokens, image "
                       "included): raise it")
            raise DataError(q["file"], q["where"], None, message)
        return item

    def _generate(self, qs, max_new_tokens):
        cfg = self.cfg
        if cfg.temperature > 0:
            items = [self._item(q) for q in qs]
            self._note_positions(items, max_new_tokens)
            return common.generate_answers(self.model, self.tok, items, len(qs), max_new_tokens,
                                           cfg.temperature, cfg.top_p, self._generators(qs),
                                           show=False, compile=cfg.compile_decode)
        # greedy: same prompt, same answer (POPE splits share their 'yes' questions)
        keys = [(q["image"], q["prompt"], max_new_tokens) for q in qs]
        new = {k: q for k, q in zip(keys, qs) if k not in self.memo}
        texts = []
        if new:
            items = [self._item(q) for q in new.values()]
            self._note_positions(items, max_new_tokens)
            texts = common.generate_answers(self.model, self.tok, items, len(new), max_new_tokens,
                                            show=False, compile=cfg.compile_decode)
        self.memo.update(zip(new, texts))
        return [self.memo[k] for k in keys]

    def _note_positions(self, items, max_new_tokens):
        """A note, once a run, where a prompt and its answer pass the model's positions (as
        transformers warns: what the model does past them is untrained)."""
        limit = self.model.config.max_position
        longest = max(len(it["input_ids"]) for it in items) + max_new_tokens
        if longest > limit and not self.past_positions:
            self.past_positions = True
            print(f"note: {self.name}: a prompt of {longest - max_new_tokens} tokens and "
                  f"{max_new_tokens} new ones pass the model's {limit} positions", flush=True)

    def _generators(self, qs):
        """A sampling stream per question, seeded by --seed, its id and its prompt: its answer is
        the one it gets in any batch and any run (a continued run draws what an uninterrupted one
        would have; one stream for the run gave the questions left other samples)."""
        gens = []
        for q in qs:
            key = f"{self.cfg.seed}\n{q['id']}\n{q['prompt']}".encode()
            seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1
            gens.append(torch.Generator(device=self.cfg.device).manual_seed(seed))
        return gens

    def answers(self, bench, qs, path, max_new_tokens, keep=()):
        """{id: line} for the questions answered: a stored line with the same prompt, image
        (its bytes) and source (the same checkpoint files and decoding), else a new one.
        --rescore: the lines of one source (this run's flags' where present), whose images are
        the ones on disk (where they are there to compare)."""
        cfg = self.cfg
        src = self.source and f"{self.source} max_new_tokens={max_new_tokens}"
        if cfg.rescore and cfg.llava_answers:
            done = self.llava_answers(qs)
            if len(done) < len(qs):  # (the file answers part of them)
                self.partial[bench] = f"{len(done)} of {len(qs)} questions"
            self.made[bench] = {f"file {os.path.abspath(cfg.llava_answers)}": len(done)}
            return done
        for q in qs:  # (once per image file per run: POPE asks about each image many times)
            if q["image"] not in self.digests:
                self.digests[q["image"]] = image_digest(q["image"])
        digests = {(q["id"], q["prompt"]): self.digests[q["image"]] for q in qs}
        by_source, older = {}, {}  # source -> {(id, prompt) -> line}, lines without a digest
        for i, r in enumerate(read_jsonl(path)):
            strings(r, ("prompt", "source"), path, i)
            if not cfg.rescore and r.get("source") != src:
                continue
            key = (str(r.get("id")), r.get("prompt"))
            if key not in digests:  # (another run's question: --limit, another file or folder)
                continue
            if not isinstance(r.get("answer"), str):  # (a hand edit: a traceback when scored)
                raise DataError(path, f"{i} (id {key[0]!r:.40})", "answer",
                                f"expected a string, got {r.get('answer')!r:.40}")
            # an answer about other pixels under this id and prompt (a rewritten world, another
            # --image_folder) is stale; a line older than the digest: --rescore still reads it
            want, got = digests.get(key), r.get("image_digest")
            if got is None and want is not None:
                if cfg.rescore:
                    older.setdefault(r.get("source"), {})[key] = r
                continue
            if want is not None and got != want:
                continue
            stored = by_source.setdefault(r.get("source"), {})
            if key in stored and stored[key].get("image_digest") == got:
                raise DataError(path, f"{i} (id {key[0]!r:.40})", "id", "answered twice for "
                                "the same prompt and image by the same model (which counts?)")
            if key in stored:  # (--rescore without the images: which set they were is not known)
                raise DataError(path, f"{i} (id {key[0]!r:.40})", "image_digest", "answered "
                                "about two images under this id and prompt (another "
                                "--image_folder or world): give the folder of the images")
            stored[key] = r
        for source, lines in older.items():  # (a digest-checked line wins)
            by_source[source] = {**lines, **by_source.get(source, {})}
        # (a --ckpt folder that is gone has no source: the flags still ask for settings)
        asked = src or f"{os.path.abspath(self.ckpt)}@0 {decoding_source(cfg)} " \
                       f"max_new_tokens={max_new_tokens}"
        stored = self.one_source(by_source, src, asked, path, bench) if cfg.rescore else \
            by_source.get(src, {})
        done = {q["id"]: stored[q["id"], q["prompt"]]
                for q in qs if (q["id"], q["prompt"]) in stored}
        todo = [q for q in qs if q["id"] not in done]
        doing = "missing" if cfg.rescore else "generating"
        print(f"{self.name} {bench}: reused {len(done)} answers, {doing} {len(todo)}", flush=True)
        # (scores of nothing would read as a model that is always wrong)
        if cfg.rescore and qs and not done:
            raise DataError(path, message=f"--rescore: none of the {len(qs)} {bench} questions "
                                          "has an answer here; answer them first "
                                          "(run without --rescore)")
        if cfg.rescore and todo:  # (scores of a subset: the table says so, scores.json too)
            self.partial[bench] = f"{len(done)} of {len(qs)} questions"
        if not todo or cfg.rescore:
            self.note_made(bench, done)
            return done
        self._load()
        if os.path.exists(path):  # (appended to: a copy made with hard links writes its own)
            common.unshare(path)
        starts = range(0, len(todo), cfg.batch_size)
        for s in common.progress(starts, desc=f"{self.name} {bench}"):
            chunk = todo[s:s + cfg.batch_size]
            texts = self._generate(chunk, max_new_tokens)  # (a prompt too long: fails, writes none)
            lines = [{"id": q["id"], "prompt": q["prompt"], "answer": answer,
                      **{x: q[x] for x in keep}, "source": src,
                      "image_digest": digests[q["id"], q["prompt"]]}
                     for q, answer in zip(chunk, texts)]
            # each batch on disk before the next
            with common.naming(path), open(path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
            done.update((line["id"], line) for line in lines)
        self.note_made(bench, done)
        return done

    def note_made(self, bench, lines):
        """How the answers scored were made (their source's settings after the checkpoint, and
        how many of them): scores.json keeps it beside the scores, each kept benchmark's too."""
        made = collections.Counter(source_decoding(x.get("source")) for x in lines.values())
        self.made[bench] = dict(sorted(made.items()))

    def one_source(self, by_source, src, asked_source, path, bench):
        """--rescore: the stored answers of one run (several would mix runs, the last line
        written winning): the only one, if made as these flags ask (asked_source: src, or the
        settings of a --ckpt that is gone); of several, the one these flags would write, else the
        one this --ckpt wrote."""
        used = [s for s, lines in by_source.items() if lines]
        asked = source_settings(asked_source)  # (these flags' settings)
        if len(used) > 1:
            # (the same settings, where the files' time moved (a copy) or the device differs)
            # (a --ckpt that is gone: asked holds the flags' settings)
            alike = lambda s: all((source_settings(s) or {}).get(k) == asked.get(k)
                                  for k in SETTINGS)
            # (a moved tree: the answers' path is gone, its name and files' time are --ckpt's)
            moved = lambda s: bool(self.source) and not os.path.isdir(source_path(s) or "") \
                and source_model(s) == source_model(self.source)
            ours = lambda s: self.wrote(s) or moved(s)
            mine = [s for s in used if s == src] or \
                [s for s in used if ours(s) and alike(s)] or \
                [s for s in used if ours(s)]
            if len(mine) != 1:
                raise DataError(path, message=f"--rescore: {bench} answers of {len(used)} runs "
                                              f"here ({used[0]!r:.80}; {used[1]!r:.80}): give "
                                              "the --ckpt and decoding flags of one")
            used = mine
        elif used and used[0] != src:  # the only run: made as the flags given say?
            made_by = source_path(used[0])
            # (another checkpoint's answers under this one's name; a moved tree's old path is
            # gone; a --ckpt that is not there names the answers' folder alone)
            if self.source and made_by and os.path.isdir(made_by) and not self.wrote(used[0]):
                raise DataError(path, message=f"--rescore: the stored {bench} answers were made "
                                f"by another checkpoint ({made_by}, still there) than --ckpt "
                                f"{self.ckpt} ({source_path(src)}): answer with this one first "
                                "(without --rescore)")
            # (gone: moved here, its name and files' time kept, or another one: deleted)
            if self.source and made_by and not os.path.isdir(made_by) and \
                    source_model(used[0]) != source_model(self.source):
                raise DataError(path, message=f"--rescore: the stored {bench} answers were made "
                                f"by another checkpoint ({made_by}, no longer there; not moved "
                                f"to --ckpt {self.ckpt}: its name or files' time differ): answer "
                                "with this one first (without --rescore)")
            made = source_settings(used[0])
            length = "pope_max_new_tokens" if bench.startswith("pope") else "max_new_tokens"
            given = [f for f in DECODING_FLAGS if getattr(self.cfg, f) != getattr(Config, f)
                     and (not f.endswith("max_new_tokens") or f == length)]
            key = lambda f: "max_new_tokens" if f == length else f
            other = [f for f in given if made and made.get(key(f)) != asked.get(key(f))]
            if other:
                flags = ", ".join(f"--{f} {getattr(self.cfg, f)}" for f in other)
                raise DataError(path, message=f"--rescore: the stored {bench} answers were made "
                                f"otherwise ({used[0].split(' ', 1)[-1]}) than {flags} asks: "
                                "drop it, or answer with it first (without --rescore)")
        self.rescored_from.update(used)  # (scores.json names them beside --ckpt)
        return by_source[used[0]] if used else {}

    def wrote(self, source):
        """Whether a source string (answers' 'source') is this --ckpt's: its path is the
        checkpoint --ckpt resolves to (an older checkpoint-N of the run is another model); for a
        --ckpt that is gone, --ckpt or any checkpoint-N inside it."""
        path, own = source_path(source), source_path(self.source)
        if path and own:
            return os.path.realpath(path) == os.path.realpath(own)
        own = os.path.abspath(self.ckpt)
        return bool(path) and (path == own or path.startswith(own + os.sep))

    def llava_answers(self, qs):
        """{id: line} from a LLaVA answers file (model_vqa_loader.py's {"question_id", "prompt",
        "text"}), matched by question_id, an MMHal-Bench one (model_vqa_mmhal.py's), matched by
        position, or a CHAIR captions file ({"image_id", "caption"}, or coco-caption's output
        with them in 'imgToEval'), matched by the question's image id, or RUCAIBox/POPE's
        ({"question", "answer"}), matched by line order; its prompt must be the question's (else
        it answers other questions)."""
        path = self.cfg.llava_answers
        if "llava" not in self.memo:
            recs = load_json(path)
            if isinstance(recs, dict) and isinstance(recs.get("imgToEval"), dict):
                # (LisaAnne/Hallucination's chair.py reads coco-caption's output: its captions
                # are imgToEval's values, each {"image_id", "caption", its scores})
                recs = list(recs["imgToEval"].values())
            recs = [recs] if isinstance(recs, dict) else recs  # JSON lines with one line
            if not isinstance(recs, list):
                raise DataError(path, message="expected JSON lines of {question_id, prompt, text}")
            self.memo["llava"], self.memo["llava_by"] = {}, "question_id"
            first = recs[0] if recs and isinstance(recs[0], dict) else {}
            # LLaVA-RLHF's MMHal answers (the response template's fields, model_answer filled)
            if "question" in first and {"model_answer", "image_src", "question_type"} & set(first):
                recs = [mmhal_answer(path, i, r) for i, r in enumerate(recs)]
                empty = sum(not r["text"].strip() for r in recs)
                if empty == len(recs):
                    raise DataError(path, 0, "model_answer", "empty in every record: the "
                                    "template, not answers (model_vqa_mmhal.py fills it)")
                if empty:
                    print(f"note: {path}: {empty} empty model_answer judged as given "
                          "(eval_gpt_mmhal.py does: a model that stopped at once)", flush=True)
            # a CHAIR captions file (--export's chair.jsonl, CHAIR-metric-standalone's --cap_file
            # as OPERA's and VCD's scripts write it): its image_id is the question's id
            elif {"image_id", "caption"} <= set(first) and "text" not in first:
                recs = [chair_answer(path, i, r) for i, r in enumerate(recs)]
                self.memo["llava_by"] = "image_id"
            # RUCAIBox/POPE's answers ({question, answer}, no id): paired with the questions by
            # line order, as its evaluate.py pairs them with its label file
            elif {"question", "answer"} <= set(first) and not {"question_id", "text"} & set(first):
                recs = rucaibox_answers(path, recs, self.bench, self.cfg.limit)
            for i, r in enumerate(recs):
                has_text = isinstance(r, dict) and isinstance(r.get("text"), str)
                if not has_text or "question_id" not in r:
                    raise DataError(path, i, "text", "expected {\"question_id\", \"prompt\", "
                                                     "\"text\"}")
                if "image" in r:  # (its questions would be scored as the answers)
                    raise DataError(path, i, "image", QUESTIONS_NOT_ANSWERS)
                if r.get("prompt") is not None and not isinstance(r["prompt"], str):  # (compared
                    # with the question)
                    raise DataError(path, i, "prompt",
                                    f"expected a string, got {r['prompt']!r:.60}")
                qid = r["question_id"]  # (1.0, as pandas writes ids, is question 1: LLaVA's
                # eval_pope.py looks it up in a dict keyed by the int, and 1.0 == 1 there)
                qid = str(int(qid) if isinstance(qid, float) and qid.is_integer() else qid)
                if qid in self.memo["llava"]:  # (the last answer would win without a word)
                    first = self.memo["llava"][qid][0]
                    raise DataError(path, f"{i} (id {r['question_id']!r:.60})", "question_id",
                                    f"given twice (first at record {first})")
                self.memo["llava"][qid] = (i, r)
        done, by = {}, self.memo["llava_by"]
        for q in qs:
            # (a caption answers the question about its image: on Shapes the question's id is
            # not the image's, and a question without an image id, POPE's, has no caption)
            key = q["id"] if by == "question_id" else \
                str(q["image_id"]) if "image_id" in q else None
            if key in self.memo["llava"]:
                i, r = self.memo["llava"][key]
                # (LLaVA-RLHF's model_vqa.py records the question before its --test-prompt)
                asked = {q["prompt"].strip(), q.get("text", q["prompt"]).strip()}
                if r.get("prompt") is not None and r["prompt"].strip() not in asked:
                    message = f"is not the question in {q['file']} ({q['prompt'][:60]!r})"
                    raise DataError(path, f"{i} (id {q['id']!r:.60})", "prompt", message)
                # one answer, one question: POPE's split files number their questions from 1
                # each, and an answer without a prompt (or a prompt that two splits share, on
                # other images) answered every split's by id; the same question in two files
                # (the same image and text: splits share their questions) keeps its answer
                asked_first = self.memo.setdefault("llava_asked", {}).setdefault(
                    key, (q["file"], q["image"], q["prompt"]))
                if asked_first[1:] != (q["image"], q["prompt"]):
                    message = (f"answers question {q['id']!r:.60} of {asked_first[0]} and "
                               f"another question of {q['file']} under that id; score one "
                               "question file per run")
                    raise DataError(path, f"{i} (id {q['id']!r:.60})", "question_id", message)
                done[q["id"]] = {"id": q["id"], "prompt": q["prompt"], "answer": r["text"]}
        print(f"{self.name}: {len(done)} of {len(qs)} answers from {path}", flush=True)
        if qs and not done:
            message = f"no answer matches one of the {len(qs)} questions (by question_id)"
            if by == "image_id":
                message = (f"no caption's image_id is the image of one of the {len(qs)} "
                           "questions (a CHAIR captions file answers CHAIR's descriptions)")
            raise DataError(path, message=message)
        return done


def mmhal_answer(path, i, r):
    """A record of an MMHal-Bench answers file (model_vqa_mmhal.py's: the response template with
    model_answer filled) as a LLaVA answer: its position is its question's id. An empty answer
    is judged, as eval_gpt_mmhal.py does (a model that stopped at once)."""
    answer = r.get("model_answer") if isinstance(r, dict) else None
    if not isinstance(answer, str):
        raise DataError(path, i, "model_answer", "missing or not a string: the template, not "
                                                 "answers (model_vqa_mmhal.py fills it)")
    if not isinstance(r.get("question"), str):
        raise DataError(path, i, "question", "expected a string")
    return {"question_id": i, "prompt": r["question"], "text": answer}


def rucaibox_answers(path, recs, bench, limit=0):
    """RUCAIBox/POPE's answers ({"question", "answer"} lines, no id) as LLaVA answers: its
    evaluate.py pairs the k-th answer with the k-th line of its label file, and so are they paired
    here, where that is unambiguous: the run scores all of one POPE file of one split, and each
    answer's question is its question's text (case aside: its README's example is lower-case)."""
    splits = bench.get("pope", {})
    qs = [q for split in splits.values() for q in split]
    files = sorted({q["file"] for q in qs})
    layout = "RUCAIBox/POPE's answer layout ({question, answer}, no id; paired by line order)"
    others = [b for b in bench if b != "pope"]
    if others or len(splits) != 1 or len(files) != 1:
        scored = f"{', '.join(others)} too" if others else \
            f"{len(files)} POPE files, splits {', '.join(splits)}"
        raise DataError(path, message=f"{layout} answers one POPE file; this run scores {scored}: "
                                      "score one split per run (--benchmarks pope --pope_files F)")
    if len(recs) != len(qs) or any(q["record"] != k for k, q in enumerate(qs)):
        cut = f" (--limit {limit})" if limit and len(qs) == limit else ""
        raise DataError(path, message=f"{len(recs)} answers in {layout} for the {len(qs)} "
                                      f"questions scored{cut} of {files[0]}: pairing them by "
                                      "line order needs all of that file's questions, and no more")
    paired = []
    for i, (r, q) in enumerate(zip(recs, qs)):
        for field in ("question", "answer"):
            if not isinstance(r, dict) or not isinstance(r.get(field), str):
                raise DataError(path, i, field, "expected a string (RUCAIBox/POPE's layout)")
        if r["question"].strip().lower() != q["text"].strip().lower():
            raise DataError(path, i, "question", f"is not question {i} of {files[0]} "
                            f"({q['text'][:60]!r}): the files are out of step (paired by line "
                            "order)")
        paired.append({"question_id": q["id"], "prompt": q["text"], "text": r["answer"]})
    return paired


def chair_answer(path, i, r):
    """A record of a CHAIR captions file ({"image_id", "caption"}) as a LLaVA answer: the image id
    (the instances file's) is its question's id."""
    iid = r.get("image_id") if isinstance(r, dict) else None
    if not isinstance(iid, (int, str)) or isinstance(iid, bool):
        raise DataError(path, i, "image_id", "expected the COCO image id (an integer or string)")
    if not isinstance(r.get("caption"), str):
        raise DataError(path, f"{i} (image_id {iid!r:.60})", "caption", "expected a string")
    return {"question_id": iid, "text": r["caption"]}


def strings(record, fields, path, i):
    """A stored line's fields that key it, each a string or absent (a hand edit made a list one an
    unhashable-type traceback)."""
    for field in fields:
        if record.get(field) is not None and not isinstance(record[field], str):
            raise DataError(path, f"{i} (id {str(record.get('id'))!r:.40})", field,
                            f"expected a string, got {record[field]!r:.40}")


def image_digest(path):
    """A short hash of an image file's bytes (None where it is not there: --rescore needs no
    images): what an answer is about besides its prompt."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:16]
    except OSError:
        return None


def source_path(source):
    """The checkpoint folder of a source string (source()); None: not one."""
    m = re.match(r"(.*)@\d+ ", source or "")
    return m and m[1]


def source_model(source):
    """A source string's model: its checkpoint folder's name and files' time, which a moved tree
    keeps and a newer checkpoint of the run, or one trained again, does not; None: not one."""
    m = re.match(r"(.*)@(\d+) ", source or "")
    return m and f"{os.path.basename(m[1])}@{m[2]}"


def source_decoding(source):
    """A source string's settings after its checkpoint: template, dtype, device, decoding and
    answer length (source() and answers())."""
    m = re.match(r"(.*)@(\d+) (.*)", source or "")
    return m[3] if m else str(source)


def source_settings(source):
    """{setting: value} of a source string (source() and the answer length); None: not one."""
    m = re.match(r".*@\d+ (\S+) (\S+) (\S+)(.*)", source or "")
    if not m:
        return None
    out = dict(template=m[1], dtype=m[2], device=m[3], temperature="0")  # (greedy: no sampling)
    out.update(kv.split("=", 1) for kv in m[4].split() if "=" in kv)
    out["seed"] = out.get("seed", "").removesuffix("/question") or None
    return out


def source(cfg, ckpt):
    """What an answer depends on besides its prompt and image: the checkpoint's files (path and
    newest mtime, over the base its adapters sit on too), the CLIP tower given, the device and
    the decoding settings. Answers from another source are kept in the file but not reused."""
    path = os.path.abspath(resolve_checkpoint(ckpt))
    folders = [path]
    try:  # an adapter checkpoint's answers change when its base is trained again
        base = base_weights_dir(peft_base_dir(path) if is_peft_dir(path) else path)
        folders += [base] if base and os.path.realpath(base) != os.path.realpath(path) else []
    except (OSError, ValueError, CheckpointError):  # (loading names what is wrong with it)
        pass
    stamp = max((os.path.getmtime(os.path.join(d, f)) for d in folders for f in os.listdir(d)
                 if model_file(d, f)), default=0)
    return f"{path}@{int(stamp)} {decoding_source(cfg)}"


# what eval.py writes into OUT/NAME (and OUT): the model's files are the others
EVAL_WRITES = re.compile(r"answers_.+\.jsonl|judge_.+\.jsonl|scores\.json|compare\.(md|json)|"
                         + re.escape(rundir.LOCK) + r"|.+\.tmp\d+")


def model_file(folder, name):
    """Whether folder/name is one of a checkpoint's own files, which date its model: a file, not
    one eval.py writes (an --out on the checkpoint folder, or the lab's RUN/eval inside it, dated
    every run's model anew, and no answer was reused), nor a folder (an export/, an eval/)."""
    return os.path.isfile(os.path.join(folder, name)) and not EVAL_WRITES.fullmatch(name)


def decoding_source(cfg):
    """A source string's settings after its checkpoint (source())."""
    if cfg.temperature == 0:
        decoding = "greedy"
    else:
        # (per question: the streams of _generators; lines of the one run stream are not reused)
        decoding = f"temperature={cfg.temperature} top_p={cfg.top_p} seed={cfg.seed}/question"
    tower = f" vision_tower={os.path.abspath(cfg.vision_tower)}" if cfg.vision_tower else ""
    return f"{cfg.template} {cfg.dtype} {cfg.device}{tower} {decoding}"


# ----------------------------------------------------------------------------------------
# judge replies: reused from the judge file, else asked and appended one by one (judges.py)
# ----------------------------------------------------------------------------------------

def judge_replies(bench, qs, lines, path, judges, cfg, name):
    """{id: reply}; a reply already stored for (id, judge, prompt) is reused, new ones are
    appended. The prompt's digest covers question, reference, answer and template, and the
    image's bytes what the oracle reads beside them."""
    if "judge" not in judges:  # made once per run, on first use (a local judge loads a model)
        judges["judge"] = make_judge(cfg)
    judge, templates = judges["judge"], judges.get("templates", {})
    # a user's prompt template is part of who judged: another template, other replies
    jname = judge.name
    if bench in templates:
        jname += f"|prompt:{hashlib.sha1(templates[bench].encode()).hexdigest()[:10]}"
    stored = read_jsonl(path)
    for i, r in enumerate(stored):
        strings(r, ("judge", "prompt_digest"), path, i)
    cache = {(str(r.get("id")), r.get("judge"), r.get("prompt_digest")): r.get("reply", "")
             for r in stored}
    # replies the judge stopped at --judge_max_tokens (said on every run that reads them)
    cut = {(str(r.get("id")), r.get("judge"), r.get("prompt_digest")) for r in stored
           if r.get("cut")}
    asked = [q for q in qs if q["id"] in lines]
    prompts = {q["id"]: judge_prompt(bench, q, lines[q["id"]]["answer"], templates) for q in asked}
    pixels = {q["id"]: lines[q["id"]].get("image_digest") for q in asked}  # (the answer's)
    # what the judge reads: LLaVA-Bench's system line too (a reply to the prompt alone, as the
    # local judge's were before it sent the line, is not reused)
    system = f"{system_line(bench)}|" if system_line(bench) else ""
    digest = {q["id"]: hashlib.sha1(f"{system}{prompts[q['id']]}|{pixels[q['id']]}".encode())
              .hexdigest()[:16] for q in asked}
    todo = [q for q in asked if (q["id"], jname, digest[q["id"]]) not in cache]
    show = judge.name != "oracle"
    empty = {}  # id: the judge's finish reason, for replies without a word (not stored)
    if os.path.exists(path):  # (appended to: a copy made with hard links writes its own)
        common.unshare(path)
    with open(path, "a", encoding="utf-8") as f:
        for q in common.progress(todo, desc=f"{name} judge {bench}", enabled=show):
            answer = lines[q["id"]]["answer"]
            reply = judge(prompts[q["id"]], dict(q, answer=answer, bench=bench))
            if not reply.strip():  # (a content filter's: stored, it scored 0 on every run)
                empty[q["id"]] = getattr(judge, "last_finish", None)
                continue
            record = {"id": q["id"], "judge": jname, "answer": answer, "reply": reply,
                      "prompt_digest": digest[q["id"]]}
            if getattr(judge, "last_cut", False):
                record["cut"] = True
                cut.add((q["id"], jname, digest[q["id"]]))
            # (the write alone: an error of the judge's own is not this file's)
            with common.naming(path):
                f.write(json.dumps(record) + "\n")
                f.flush()
            cache[(q["id"], jname, digest[q["id"]])] = reply
    n_cut = sum((q["id"], jname, digest[q["id"]]) in cut for q in asked)
    if n_cut:  # (a reply cut before its score: MMHal's rating comes at its end)
        limit = f"--judge_max_tokens {cfg.judge_max_tokens}" if cfg.judge_max_tokens else \
            "the server's own limit (--judge_max_tokens 0 sends none)"
        fix = "raise it (openai: 0 sends no limit)" if cfg.judge_max_tokens else \
            "a judge whose replies may be longer"
        print(f"warning: {name} {bench}: {n_cut} of {len(asked)} judge replies stopped at "
              f"{limit} ('cut' in {os.path.basename(path)}); a score after the cut is lost: "
              f"{fix}, then judge again", flush=True)
    if empty:
        ids = ", ".join(repr(i) for i in list(empty)[:5]) + (", ..." if len(empty) > 5 else "")
        why = sorted({str(r) for r in empty.values()})
        print(f"warning: {name} {bench}: {len(empty)} judge replies were empty (finish_reason "
              f"{', '.join(why)}; {ids}): scored without a valid score this run and not stored, "
              "so the next run asks again (a local judge answers alike)", flush=True)
    return {q["id"]: cache.get((q["id"], jname, digest[q["id"]]), "") for q in asked}


# ----------------------------------------------------------------------------------------
# one checkpoint, several checkpoints
# ----------------------------------------------------------------------------------------

def export_answers(out, name, bench, qs, lines):
    """--export true: OUT/NAME/export/<bench>.jsonl in the layout of LLaVA's model_vqa.py answers
    ({"question_id" as the question file has it, "prompt": the question as the file asks it,
    "text", "answer_id", "model_id", "metadata"}), what LLaVA's eval_pope.py and
    eval_gpt_review_visual.py read; MMHal-Bench: export/mmhal.json, its response_template.json
    records with model_answer filled, what its eval_gpt4.py reads; CHAIR: export/chair.jsonl,
    {"image_id" as the instances file has it, "caption"}, what the CHAIR scripts in use read
    (CHAIR-metric-standalone's chair.py and its forks: --cap_file chair.jsonl --image_id_key
    image_id --caption_key caption; LisaAnne/Hallucination's first chair.py also wants
    coco-caption's BLEU to CIDEr per caption, which we do not compute). Rewritten whole each
    run."""
    folder = os.path.join(out, "export")
    os.makedirs(folder, exist_ok=True)
    got = [q for q in qs if q["id"] in lines]
    if bench == "mmhal":
        records = [dict(q["template"], model_answer=lines[q["id"]]["answer"]) for q in got]
        common.write_json(records, os.path.join(folder, "mmhal.json"))
        return
    def line(q):
        answer = lines[q["id"]]["answer"]
        if bench == "chair":
            return {"image_id": q["image_id"], "caption": answer}
        answer_id = hashlib.sha1(f"{name}|{bench}|{q['id']}".encode()).hexdigest()[:22]
        return {"question_id": q["question_id"], "prompt": q.get("text", q["prompt"]),
                "text": answer, "answer_id": answer_id, "model_id": name, "metadata": {}}
    common.write_whole(os.path.join(folder, f"{bench}.jsonl"),
                       lambda f: f.writelines(json.dumps(line(q)) + "\n" for q in got))


def evaluate(cfg, ckpt, name, bench, judges):
    out = os.path.join(cfg.out, name)
    rundir.make_dirs(out)
    ans = Answerer(cfg, ckpt, name, bench)
    scores = {"ckpt": ckpt}  # (as given; resolved below: a --rescore of a gone one has none)
    if os.path.exists(ckpt):
        scores["ckpt_path"] = os.path.realpath(ckpt)
    if "pope" in bench:
        scores["pope"] = {}
        for split, qs in bench["pope"].items():
            path = os.path.join(out, f"answers_pope_{split}.jsonl")
            lines = ans.answers(f"pope_{split}", qs, path, cfg.pope_max_new_tokens,
                                keep=("label",))
            if cfg.export:
                export_answers(out, name, f"pope_{split}", qs, lines)
            got = [q for q in qs if q["id"] in lines]
            preds = [pope_yes_no(lines[q["id"]]["answer"]) for q in got]
            scores["pope"][split] = pope_metrics(preds, [q["label"] for q in got])
            # (which questions, asked how: a split scored by an earlier run is kept beside them
            # where both agree: earlier_pope_splits)
            scores["pope"][split]["questions"] = sorted({os.path.abspath(q["file"]) for q in qs})
            scores["pope"][split]["asked"] = pope_asked(cfg, ans.made[f"pope_{split}"])
            if f"pope_{split}" in ans.partial:
                scores["pope"][split]["partial"] = ans.partial[f"pope_{split}"]
    if "chair" in bench:
        qs = bench["chair"]
        path = os.path.join(out, "answers_chair.jsonl")
        lines = ans.answers("chair", qs, path, cfg.max_new_tokens)
        if cfg.export:
            export_answers(out, name, "chair", qs, lines)
        texts = [(q, lines[q["id"]]["answer"]) for q in qs if q["id"] in lines]
        counts = [chair_counts(q, t, cfg.chair_counting) for q, t in texts]
        n_words = [len(t.split()) for _, t in texts]
        scores["chair"] = chair_metrics(counts, n_words)
    metrics = {"mmhal": lambda qs, r: mmhal_metrics(qs, r, cfg.mmhal_rating),
               "gavie": gavie_metrics, "llava_bench": llava_bench_metrics}
    keeps = {"mmhal": ("question_type",), "gavie": ("qtype",), "llava_bench": ("category",)}
    for b in JUDGED:
        if b in bench:
            answers_path = os.path.join(out, f"answers_{b}.jsonl")
            lines = ans.answers(b, bench[b], answers_path, cfg.max_new_tokens, keeps[b])
            if cfg.export and b != "gavie":
                export_answers(out, name, b, bench[b], lines)
            judge_path = os.path.join(out, f"judge_{b}.jsonl")
            replies = judge_replies(b, bench[b], lines, judge_path, judges, cfg, name)
            scores[b] = metrics[b](bench[b], replies)
            # (empty replies are not stored: scores.json says how many of its unparsed they are)
            n_empty = sum(replies.get(q["id"]) == "" for q in bench[b])
            if n_empty:
                scores[b]["empty_replies"] = n_empty
            if scores[b]["unparsed"]:
                how = "scored 0" if b == "mmhal" and cfg.mmhal_rating == "reference" else "excluded"
                how = "scored -1 -1, as LLaVA's summary does" if b == "llava_bench" else how
                n_unparsed = scores[b]["unparsed"]
                ids = scores[b]["unparsed_ids"][:5]
                empty = f", {n_empty} of them empty and not stored" if n_empty else ""
                print(f"warning: {name} {b}: {n_unparsed} judge replies without a valid score "
                      f"({how}; ids {ids}; replies in judge_{b}.jsonl{empty})")
    for b in ("chair", *JUDGED):
        if b in ans.partial:
            scores[b]["partial"] = ans.partial[b]
    if ans.partial:
        print(f"warning: {name}: scored the questions with stored answers alone: "
              + ", ".join(f"{b} {n}" for b, n in ans.partial.items())
              + " (the table marks the row partial)", flush=True)
    scores["answers_made"] = ans.made  # (per benchmark: how its answers were made, how many)
    if ans.rescored_from:  # (--rescore: --ckpt names the folder; these wrote the answers)
        scores["answers_from"] = sorted(ans.rescored_from, key=str)
    # the model the scores are of (another checkpoint of the run, or the run trained again, is
    # another model: its scores are not kept beside these)
    models = {source_model(s) for s in ans.rescored_from} if cfg.rescore else \
        {source_model(ans.source)}
    model = models.pop() if len(models) == 1 else None
    if cfg.rescore and cfg.llava_answers:  # (a LLaVA answers file: its scores are its own, not
        # kept beside a checkpoint's run into this folder later, nor its beside them)
        answers = os.path.abspath(cfg.llava_answers)
        scores["answers_from"] = [answers]
        model = f"file:{os.path.basename(answers)}@{int(os.path.getmtime(answers))}"
    if model:
        scores["model"] = model
    # the same checkpoint's other benchmarks, scored by earlier runs into this folder, are kept
    # (real benchmarks need runs of their own: one --image_folder each)
    path = os.path.join(out, "scores.json")
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        earlier = None
    same = same_checkpoint(earlier, ckpt)
    same = same or (same is None and isinstance(earlier, dict) and earlier.get("ckpt") == ckpt)
    if isinstance(earlier, dict) and isinstance(earlier.get("model"), str) and model:
        same = earlier["model"] == model  # (a moved tree's too)
    if same and "ckpt_path" not in scores and "ckpt_path" in earlier:  # (a --rescore of a gone
        scores["ckpt_path"] = earlier["ckpt_path"]  # one keeps what names the folder's model)
    kept = {b: v for b, v in earlier.items() if b in BENCHMARKS and b not in scores} if same else {}
    splits = earlier_pope_splits(earlier["pope"], scores["pope"]) \
        if same and "pope" in scores and isinstance(earlier.get("pope"), dict) else {}
    if "pope" in scores:
        scores["pope"] = {**splits, **scores["pope"]}
        scores["pope"]["average"] = pope_average(scores["pope"])
    made = earlier.get("answers_made") if kept or splits else None
    made = {k: v for k, v in made.items() if k.split("_")[0] in kept or k in kept
            or k.removeprefix("pope_") in splits} if isinstance(made, dict) else {}
    common.write_json({**scores, **kept, "answers_made": {**made, **ans.made}}, path)
    return scores


def pope_asked(cfg, made):
    """How a split's questions were asked, besides which: how its scored answers were made
    (Answerer.made: decoding, device, answer length, or the answers file; a --rescore's own flags
    say nothing of that), --limit, the suffix, the label files."""
    labels = ",".join(sorted(os.path.basename(f) for f in cfg.pope_labels))
    suffix = cfg.pope_suffix.replace("\\n", "\n")
    return f"{' | '.join(sorted(made))} limit={cfg.limit} suffix={suffix!r} labels={labels}"


def question_set(path, split):
    """A POPE file named apart from its split ('DIR/coco_pope_*.json' for coco_pope_random.json):
    the splits of one set share it; a file whose name holds no split word is a set of its own."""
    name = os.path.basename(path)
    if split == os.path.splitext(name)[0] or split not in name:
        return path
    return os.path.join(os.path.dirname(path), name.replace(split, "*"))


def earlier_pope_splits(earlier, now):
    """The POPE splits an earlier run scored into this folder for this checkpoint and this run did
    not (--pope_files random.jsonl, then popular.jsonl: the second run replaced the first's), kept
    where they are of this run's question set (coco_pope_* beside coco_pope_*, not A-OKVQA's or
    the Shapes world's) and were asked as this run asks (pope_asked: the same decoding, limit,
    suffix, labels)."""
    sets = {question_set(f, s) for s, m in now.items() for f in m["questions"]}
    asked = {m["asked"] for m in now.values()}

    def alike(split, m):
        files = m.get("questions") if isinstance(m, dict) else None
        return (isinstance(files, list) and files and {m.get("asked")} == asked
                and {question_set(str(f), split) for f in files} <= sets)
    return {s: m for s, m in earlier.items() if s != "average" and s not in now and alike(s, m)}


def pope_average(pope):
    """The mean of each metric over the splits, and which splits (some may come from earlier
    runs: earlier_pope_splits)."""
    per = {s: m for s, m in pope.items() if s != "average"}
    metrics = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    average = {k: mean([m[k] for m in per.values()]) for k in metrics}
    average["splits"] = list(per)
    if any("partial" in m for m in per.values()):
        average["partial"] = "a split is partial"
    return average


def refuse_inputs_in_export(cfg, names):
    """An input (a --llava_answers file, a question file) inside OUT/NAME/export/, which --export
    rewrites whole: it was replaced by this run's answers (cut to --limit) while being read."""
    folders = {name: os.path.realpath(os.path.join(cfg.out, name, "export")) for name in names}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if f.name == "out":
            continue
        for path in (p for v in values if isinstance(v, str) for p in rundir.paths_in_flag(v)):
            real = os.path.realpath(path)
            for name, folder in folders.items():
                if real.startswith(folder + os.sep):
                    raise common.ConfigError(
                        f"--{f.name} {path} lies in {os.path.join(cfg.out, name, 'export')}, "
                        "which --export true rewrites: copy it elsewhere, or choose another --out")


def run_names(ckpts, out=None, rescore=False):
    """Folder names: the checkpoint's name (ckpt/sft -> sft; ckpt/sft/checkpoint-000100 ->
    sft-checkpoint-000100), numbered where two share one (in any case: `taken`), or where OUT's
    folder of that name holds another checkpoint's scores (an earlier --compare x/run y/run scored
    y/run as run-1: a later --ckpt y/run replaced x/run's scores in run); a numbered folder that
    holds this checkpoint's scores is its own. --rescore: only that one (it scores stored runs;
    their answers' checkpoints are checked as they are read)."""
    names = []
    for c in ckpts:
        n = common.checkpoint_name(c)
        name, k = n, max(len(names), 1)
        if rescore and not taken(n, names) and scored(out, n, c) is False:
            name = next((m for m in numbered(out, n) if scored(out, m, c)), n)
        # (a name taken in another case keeps a folder of its own that holds its scores: one
        # written on a file system that tells case apart)
        elif (taken(n, names) and scored(out, n, c) is not True) or scored(out, n, c) is False:
            name = next((m for m in numbered(out, n) if not taken(m, names) and scored(out, m, c)),
                        None)
            while name is None or taken(name, names) or scored(out, name, c) is False:
                # (a/sft-2, b/sft, c/sft: the third is not sft-2 again)
                name, k = f"{n}-{k}", k + 1
        if name != n and scored(out, n, c) is False:
            print(f"note: {os.path.join(out, n)} holds the scores of another checkpoint; {c} is "
                  f"scored into {os.path.join(out, name)}", flush=True)
        names.append(name)
    return names


def taken(name, names):
    """Whether `name` is one of `names` in any case: a file system that ignores case (macOS's,
    Windows') holds OUT/SFT and OUT/sft as one folder, so --compare a/sft b/SFT scored both
    into it."""
    return name.casefold() in {m.casefold() for m in names}


def numbered(out, n):
    """OUT's folders named N-1, N-2, ... in order."""
    found = os.listdir(out) if out and os.path.isdir(out) else []
    return sorted((m for m in found if re.fullmatch(re.escape(n) + r"-\d+", m)),
                  key=lambda m: int(m.rsplit("-", 1)[1]))


def scored(out, name, ckpt):
    """Whether OUT/NAME/scores.json records `ckpt` (True), another checkpoint (False), or cannot
    tell (None: no scores; see same_checkpoint)."""
    path = os.path.join(out, name, "scores.json") if out else ""
    try:
        with open(path) as f:
            return same_checkpoint(json.load(f), ckpt)
    except (OSError, ValueError):
        return None


def same_checkpoint(recorded, ckpt):
    """Whether scores (a scores.json's dict) are of `ckpt`: by the resolved path recorded since
    2026-12-05 ("ckpt_path"; where it is gone, by the path as given resolved from here: a moved
    project's relative paths still meet, a deleted checkpoint's do not), else by the path as
    given where both are on disk; None where it cannot tell."""
    if not isinstance(recorded, dict):
        return None
    path, was = recorded.get("ckpt_path"), recorded.get("ckpt")
    if isinstance(path, str) and (os.path.exists(path) or not isinstance(was, str)):
        return path == os.path.realpath(ckpt)
    if isinstance(path, str):  # gone: moved (the path as given, from here, finds it) or deleted
        return os.path.realpath(was) == os.path.realpath(ckpt)
    if not isinstance(was, str) or not os.path.exists(was) or not os.path.exists(ckpt):
        return None
    return os.path.realpath(was) == os.path.realpath(ckpt)


COLUMNS = [("yes-ratio", ("pope", "average", "yes_ratio"), ".3f"),
           ("CHAIR_i", ("chair", "chair_i"), ".3f"),
           ("CHAIR_s", ("chair", "chair_s"), ".3f"),
           ("MMHal score", ("mmhal", "score"), ".2f"),
           ("MMHal halluc. rate", ("mmhal", "hallucination_rate"), ".2f"),
           ("GAVIE acc.", ("gavie", "accuracy"), ".2f"),
           ("GAVIE rel.", ("gavie", "relevancy"), ".2f"),
           ("LLaVA-Bench", ("llava_bench", "relative"), ".1f"),
           ("answer words", ("chair", "answer_words"), ".1f")]


def _get(d, keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _partial(scores):
    """Whether a benchmark's scores (POPE: any split's) are of a subset of its questions."""
    if not isinstance(scores, dict):
        return False
    return "partial" in scores or any(_partial(v) for v in scores.values())


def table(rows):
    """One Markdown table, a row per checkpoint (and the same rows as dicts, for compare.json)."""
    splits = dict.fromkeys(s for r in rows.values() for s in r.get("pope", {}) if s != "average")
    cols = [(f"POPE F1 {s}", ("pope", s, "f1"), ".3f") for s in splits] + COLUMNS
    # a column for each benchmark that ran (a null value shows '-')
    cols = [c for c in cols if any(_get(r, c[1][:-1]) is not None for r in rows.values())]
    flat = [{"checkpoint": n, **{c: _get(r, keys) for c, keys, _ in cols}} for n, r in rows.items()]
    header = "| checkpoint | " + " | ".join(c for c, _, _ in cols) + " |"
    md = [header, "|---" * (len(cols) + 1) + "|"]
    for f, r in zip(flat, rows.values()):
        values = ["-" if f[c] is None else format(f[c], fmt) for c, _, fmt in cols]
        # (--rescore of a --limit run: its scores are of the questions answered, not all)
        partial = any(_partial(v) for v in r.values())
        f["partial"] = partial
        name = f["checkpoint"] + (" (partial)" if partial else "")
        md.append("| " + " | ".join([name] + values) + " |")
    return "\n".join(md) + "\n", flat


# what an answer's source records besides its checkpoint, its device and dtype (eval.source, and
# the answer length): --rescore refuses one given that the one stored run was not made with
# (--device and --dtype may be the local judge's, answers made on another machine)
DECODING_FLAGS = ("template", "vision_tower", "temperature", "top_p", "seed", "max_new_tokens",
                  "pope_max_new_tokens")
SETTINGS = ("template", "vision_tower", "temperature", "top_p", "seed", "max_new_tokens")
# each benchmark's own files and scoring flags (unread when it is not in --benchmarks;
# the answer lengths are left to scripts that pass one set for every run, as are --batch_size and
# --max_len beside --rescore), and the judge's
BENCHMARK_FLAGS = {"pope": ("pope_files", "pope_labels", "pope_suffix"),
                   "chair": ("chair_instances", "chair_synonyms", "chair_captions",
                             "chair_counting", "chair_prompt"),
                   "mmhal": ("mmhal_file", "mmhal_rating"),
                   "gavie": ("gavie_file", "gavie_annotations"),
                   "llava_bench": ("llava_bench_file", "llava_bench_answers",
                                   "llava_bench_context", "llava_bench_rule",
                                   "llava_bench_caption")}
JUDGE_FLAGS = ("judge", "judge_model", "judge_url", "judge_key", "judge_retries", "judge_backoff",
               "judge_timeout", "judge_max_tokens", "judge_prompt")


def main(cfg):
    common.refuse_torchrun("eval.py", "it generates and judges one batch at a time")
    distributed.end_with_the_launcher()  # (a lab's or pipeline's eval dies with it)
    rundir.refuse_in_world("--out", cfg.out, cfg.world, "the answers and scores")
    bad = [b for b in cfg.benchmarks if b not in BENCHMARKS]
    if bad or not cfg.benchmarks:
        choices = ", ".join(BENCHMARKS)
        raise common.ConfigError(f"--benchmarks: unknown {bad} (choose from {choices})")
    if cfg.judge not in ("oracle", "openai", "local"):
        raise common.ConfigError(f"--judge {cfg.judge}: choose oracle, openai or local")
    if cfg.batch_size < 1 or cfg.temperature < 0:
        raise common.ConfigError("--batch_size must be >= 1 and --temperature >= 0")
    if cfg.mmhal_rating not in ("reference", "ours"):
        raise common.ConfigError(f"--mmhal_rating {cfg.mmhal_rating}: choose reference or ours")
    if cfg.chair_counting not in ("reference", "ours"):
        raise common.ConfigError(f"--chair_counting {cfg.chair_counting}: choose reference or ours")
    # a flag read only beside another would be ignored without a word (the Shapes files scored)
    for flag, needs in (("pope_labels", "pope_files"), ("chair_synonyms", "chair_instances"),
                        ("chair_captions", "chair_instances"), ("gavie_annotations", "gavie_file"),
                        ("llava_answers", "rescore true")):
        if getattr(cfg, flag) and not getattr(cfg, needs.split()[0]):
            raise common.ConfigError(f"--{flag} is read only with --{needs}, which is not given")
    if not cfg.chair_instances:  # (Shapes CHAIR asks its own question)
        rundir.refuse_unread(cfg, ["chair_prompt"], "without --chair_instances (Shapes CHAIR "
                             "asks its own question); drop it")
    if not {"pope", "chair", "mmhal", "llava_bench"} & set(cfg.benchmarks):
        rundir.refuse_unread(cfg, ["export"], "without pope, chair, mmhal or llava_bench in "
                             "--benchmarks (GAVIE has no answer file of its reference); drop it")
    if cfg.temperature == 0:
        rundir.refuse_unread(cfg, ["top_p", "seed"], "with --temperature 0 (greedy: no "
                             "sampling); drop it or sample with --temperature > 0")
    rundir.refuse_unread_shared(cfg)
    if not cfg.rescore or cfg.judge == "local":  # (--rescore loads no model, but a local judge)
        distributed.check_device(cfg.device)
    if "llava_bench" in cfg.benchmarks and not (cfg.llava_bench_file and cfg.llava_bench_context):
        raise common.ConfigError("--benchmarks llava_bench needs --llava_bench_file (LLaVA's "
                                 "qa90_questions.jsonl) and --llava_bench_context "
                                 "(caps_boxes_coco2014_val_80.jsonl): it has no Shapes version")
    for bench, flags in BENCHMARK_FLAGS.items():  # (the questions of the others are not asked)
        if bench not in cfg.benchmarks:
            rundir.refuse_unread(cfg, flags, f"without {bench} in --benchmarks; add it or drop "
                                 "the flag")
    if not set(JUDGED) & set(cfg.benchmarks):
        rundir.refuse_unread(cfg, JUDGE_FLAGS, "without mmhal, gavie or llava_bench in "
                             "--benchmarks (nothing is judged); drop it")
    elif cfg.judge == "oracle":
        rundir.refuse_unread(cfg, JUDGE_FLAGS[1:], "by --judge oracle (it reads the Shapes "
                             "record); drop it or choose another --judge")
    elif cfg.judge == "local":  # (a model folder: no API)
        rundir.refuse_unread(cfg, JUDGE_FLAGS[2:-2], "by --judge local (a model folder, no API); "
                             "drop it")
    for entry in cfg.judge_prompt:  # (a prompt for a benchmark not asked is never read)
        b = str(entry).partition("=")[0]
        if b in PLACEHOLDERS and b not in cfg.benchmarks:
            raise common.ConfigError(f"--judge_prompt {b}=...: {b} is not in --benchmarks")
    for flag in ("pope_suffix", "chair_prompt"):  # (put after the image, as a question is)
        if IMAGE in getattr(cfg, flag):
            raise common.ConfigError(f"--{flag} {getattr(cfg, flag)!r}: {TAG_IN_TEXT}")
        try:  # (a byte a Latin-1 terminal typed: the tokenizer's TypeError, after loading)
            getattr(cfg, flag).encode("utf-8")
        except UnicodeEncodeError:
            raise common.ConfigError(f"--{flag} {getattr(cfg, flag)!r}: holds a byte that is not "
                                     "UTF-8 (typed in another encoding?)") from None
    if cfg.compare and cfg.llava_answers:  # (one file scored as several checkpoints)
        raise common.ConfigError("--llava_answers scores one answers file: name it with --ckpt, "
                                 "not --compare")
    if cfg.compare and cfg.ckpt != Config.ckpt:  # (it would be ignored without a word)
        raise common.ConfigError(f"--ckpt {cfg.ckpt} is not read with --compare (list every "
                                 "checkpoint in --compare)")
    ckpts = list(cfg.compare) or [cfg.ckpt]
    seen = {}  # (a run folder and its newest checkpoint-N, or 'a/' and 'a': one model, two rows)
    for c in ckpts if not cfg.rescore else []:
        key = os.path.realpath(resolve_checkpoint(c)) if os.path.isdir(c) else c
        if key in seen:
            raise common.ConfigError(f"--compare: {seen[key]} and {c} are the same checkpoint "
                                     f"({key}); give it once")
        seen[key] = c
    # fail before any work on a checkpoint that cannot load
    for c in ckpts if not cfg.rescore else []:
        if not os.path.isdir(c):
            fix = "train it, or leave it out of --compare" if cfg.compare else \
                "train one: python sft.py; or pass --ckpt DIR"
            raise common.ConfigError(no_dir(c) if os.path.isfile(c) else f"{no_dir(c)} ({fix})")
        # (a PEFT adapter folder has no config.json: its adapter_config.json names the base)
        ckpt_dir = resolve_checkpoint(c)
        path = os.path.join(ckpt_dir, "adapter_config.json" if is_peft_dir(ckpt_dir) else
                            "config.json")
        if not os.path.exists(path):  # (a run folder without a checkpoint-N, an empty folder)
            detect_layout(ckpt_dir)  # (raises, naming what the folder holds)
        try:
            with open(path) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
            raise CheckpointError(f"{path}: cannot read the checkpoint config ({why})")
        refuse_scalar_model(ckpt_dir)  # (it would answer with its reward LoRA)
        # a truncated weight file: named before any checkpoint answers (--compare's third was
        # named after the first two had answered: hours, on real benchmarks)
        check_weight_headers(ckpt_dir)
        rundir.note_template("--ckpt" if not cfg.compare else "--compare", c, cfg.template)
        world = cfg.world if shapes_world_read(cfg) else None  # (the world's note: where read)
        rundir.note_world("--ckpt" if not cfg.compare else "--compare", c, world)
    rundir.ensure_writable(cfg.out)
    # one writer: two evals appending to one answers file would interleave
    rundir.lock_out(cfg.out)
    bench = load_benchmarks(cfg)
    judges, rows = {"templates": load_judge_prompts(cfg.judge_prompt)}, {}
    # --compare: a checkpoint after the first that has no scores here yet loads once before any
    # answers (one that fails to load was named after the others had answered: hours, on real
    # benchmarks; one scored here before is most likely answered already, and not loaded)
    names = run_names(ckpts, cfg.out, cfg.rescore)
    if cfg.export:
        refuse_inputs_in_export(cfg, names)
    for ckpt, name in list(zip(ckpts, names))[1:] if not cfg.rescore else []:
        if not os.path.exists(os.path.join(cfg.out, name, "scores.json")):
            Answerer(cfg, ckpt, name)._load()
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
    for ckpt, name in zip(ckpts, names):
        t0 = time.time()
        rows[name] = evaluate(cfg, ckpt, name, bench, judges)
        scores_path = os.path.join(cfg.out, name, "scores.json")
        print(f"{name}: evaluated in {time.time() - t0:.1f}s -> {scores_path}", flush=True)
    md, flat = table(rows)
    print(md, end="")
    if cfg.compare:
        common.write_whole(os.path.join(cfg.out, "compare.md"), lambda f: f.write(md))
        common.write_json({"rows": flat, "scores": rows}, os.path.join(cfg.out, "compare.json"))
    return rows

# Ctrl-C's line (answers and replies are appended as made, and reused)
INTERRUPTED = ("interrupted: the answers and judge replies written are kept; the same command goes "
               "on from them")


def cli(argv=None):
    cfg = common.parse_config(Config, argv, prog="eval.py")
    with common.user_errors(JudgeError, interrupted=INTERRUPTED):
        return main(cfg)


if __name__ == "__main__":
    cli()
