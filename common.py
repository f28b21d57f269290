"""What every training script shares: dataclass config -> command line, torchrun setup (replicated
data parallelism, or FSDP2 sharding with --fsdp), seeding, AdamW + cosine schedule, logging, atomic
checkpoints (sharded under FSDP) and --resume, clean errors."""
import argparse
import atexit
import copy
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import typing
import warnings
import zipfile
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
# imported before any process group exists: its functions take group.WORLD as a default argument,
# evaluated at import. Imported later (AdamW does, through torch._dynamo), they hold the group past
# destroy_process_group, and gloo's threads then race the interpreter's exit (SIGABRT).
import torch.distributed.nn.functional  # noqa: F401

from checkpoint import (FORMAT_NAME, FORMAT_VERSION, base_fingerprint, base_weights_dir,
                        checkpoint_step, clip_alone, complete_checkpoints, detect_layout,
                        init_fingerprint, is_peft_dir, latest_checkpoint, load_checkpoint, no_dir,
                        peft_base_dir, recorded_template, refuse_scalar_model, resolve_checkpoint,
                        save_checkpoint_files, tensors_fingerprint)
import interrupts
from formats import DataError, digests_read, not_found
from interrupts import INTERRUPT_SAID_BY
from model import PRESETS, CheckpointError, LLaVA, ModelConfig

# a stage's --seed: numpy's global seed (np.random.seed) takes 32 bits
SEED_RANGE = "[0, 4294967295]"

# ----------------------------------------------------------------------------------------
# errors users cause: one line, exit code 2, no traceback
# ----------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A flag value or combination that cannot work."""


class NonFiniteError(Exception):
    """A non-finite loss or gradient."""


USER_ERRORS = (ConfigError, CheckpointError, NonFiniteError, DataError)


# ESC and what follows: CSI (colours, the cursor), OSC (titles, links; ended by BEL or ESC \),
# and the two- and three-byte codes (ESC M, ESC ( B of `tput sgr0`)
TERMINAL_CODE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[ -/]*[0-~])")


def torchrun_rank():
    """This process's rank under torchrun (0 in a plain run)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def fail(message):
    """The one line of a user's error, and exit code 2. Under torchrun every rank that meets the
    error says it (one rank's own file may be the cause), the other ranks' lines named as theirs,
    each written whole (two ranks' lines ran together)."""
    rank = torchrun_rank()
    # (a library's own text may carry terminal colours, as torch.load's refusal of a pickled
    # module does, links, or several lines)
    message = " ".join(TERMINAL_CODE.sub("", str(message)).splitlines())
    message = re.sub(r"[\x00-\x08\x0e-\x1f\x7f]", "", message)  # (a bell, a stray escape)
    if sys.stderr:  # (None: started with stderr closed, `2>&-`; the exit code still says it)
        sys.stderr.write(f"error{f' (rank {rank})' if rank else ''}: {message}\n")
        sys.stderr.flush()
    tell_the_waiting_ranks(message)
    raise SystemExit(2)


def tell_the_waiting_ranks(message):
    """A rank refused before it joined the process group (a flag or input given on one node only):
    the other nodes' ranks waited for it in setup_dist, 30 minutes (gloo's timeout), after its
    node had ended. It joins to hand them its line (same_flags_everywhere), for up to a minute
    (a rank that never comes: a traceback before setup_dist). Where every rank is on this node,
    torchrun stops them itself once this one exits: nothing to hand over (and the join, inside
    C++, could not be interrupted: a Ctrl-C waited for it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if _made_process_group or world == 1 or "TORCHELASTIC_RUN_ID" not in os.environ or \
            _runs_alone or int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:
        return
    import datetime
    try:  # ("gloo": the object collectives of the others' "cpu:gloo,cuda:nccl" run on it too)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
        dist.all_gather_object([None] * dist.get_world_size(), (rank - local, message))
    # (the others gone, or never there)
    except BaseException:
        pass


_runs_alone = False  # refuse_torchrun: no rank of this script makes a process group


# set by pipeline.py and lab.py for their stages and runs: their own pid (end_with_the_launcher)
STARTED_BY = "FACTALIGN_STARTED_BY"


RESUME_IF_SAVED = "a training run that saved a checkpoint goes on from it with --resume true"
INTERRUPTED = f"interrupted: what was written is kept ({RESUME_IF_SAVED})"


def escape_what_stdout_cannot_write():
    """A strict stdout (a UTF-8 or Latin-1 locale's) escapes what its encoding cannot write, as
    Python's stderr does: a name holding a byte that is not UTF-8 (a surrogate escape), or a CJK
    one under Latin-1, made a progress line raise UnicodeEncodeError mid-run. (The C locale's
    'surrogateescape' writes such a name's own bytes back: kept.)"""
    if hasattr(sys.stdout, "reconfigure") and sys.stdout.errors == "strict":  # (not a StringIO)
        sys.stdout.reconfigure(errors="backslashreplace")


@contextmanager
def user_errors(*extra, interrupted=INTERRUPTED):
    """Turn the errors a user can cause (bad data, bad checkpoint, bad flags, unwritable paths)
    into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
    Ctrl-C, or SIGTERM: the line `interrupted` (what a run of this script leaves, how to go on),
    exit 130. (Before it, and after it in a script, interrupts.py's handlers.)"""
    escape_what_stdout_cannot_write()
    interrupts.hand_over()
    sigterm = sigterm_as_interrupt()
    try:
        yield
        if sys.stdout:  # (None: started with stdout closed)
            sys.stdout.flush()  # (a pipe's reader gone: said here, not in the interpreter's exit)
    except UnicodeDecodeError as e:  # (readers name the file; this is the last resort)
        fail(f"bytes that are not UTF-8 at offset {e.start}: {e.reason}")
    except USER_ERRORS + tuple(extra) as e:
        fail(str(e))
    except MemoryError:  # (a size too large for this machine: one line, not a traceback)
        fail("out of memory: lower --batch_size, --micro_batch, --lora_r or the model size")
    except RuntimeError as e:  # torch's allocator failing (CPU: "can't allocate", CUDA: OOM)
        text = str(e)
        if peer_ended(text):
            said_on_each_node(PEER_ENDED)
            raise SystemExit(1) from None
        if "can't allocate memory" not in text and "out of memory" not in text.lower():
            raise
        first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
        fail(f"out of memory ({first}): lower --batch_size, --micro_batch, --lora_r or the model "
             "size")
    except PermissionError as e:
        fail(f"{e.filename}: permission denied")
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        fail(f"{e.filename}: {e.strerror}")
    except BrokenPipeError as e:
        if e.filename is not None or not reader_gone(sys.stdout):
            raise
        stdout_reader_gone(interrupted)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        # (a full disk while logging, answering or drawing: named by `naming` where it can be)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"{where}{e.strerror} while writing: free some space and run again (checkpoints "
                 f"and worlds are written whole or not at all; {RESUME_IF_SAVED})")
        if e.errno in (errno.EROFS, errno.EFBIG):
            fail(f"{where}{e.strerror} while writing")
        if e.errno == errno.EIO:
            fail(f"{where}{e.strerror} while reading or writing: check the disk")
        if where and e.strerror:  # (no strerror: no system call's error, a bug's: its traceback)
            fail(f"{where}{e.strerror}")
        raise
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback per process
        # under torchrun each launcher passes the SIGINT to its ranks: its local rank 0 says it
        # for them (each rank wrote the same line; one line a node, where each has a terminal)
        if not os.environ.get(INTERRUPT_SAID_BY):
            said_on_each_node(interrupted)
        raise SystemExit(130) from None
    finally:
        release_locks()
        if not interrupts.work_done() and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


STDOUT_READER_GONE = "the program reading the output has ended (a pipe to `head`?)"


def reader_gone(stream):
    """Whether `stream` is a pipe whose reading end is closed (poll says POLLERR on its writing
    end): `script.py | head` once head has its lines."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # (no file behind it, closed, no poll)
        return False


def stdout_reader_gone(interrupted):
    """A print to a pipe whose reader has ended (`| head`): Python's BrokenPipeError traceback,
    exit code 1, and one more at exit as it flushed stdout. One line on stderr now (where it is
    not that pipe too), the script's `interrupted` line, and exit code 141, as a program killed by
    SIGPIPE reads in a shell. A stage of pipeline.py says the cause alone: how to go on is the
    pipeline's to say (a stage's `--resume true`, which the pipeline does not take)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit: quiet)
    if not reader_gone(sys.stderr):
        said_on_each_node(STDOUT_READER_GONE if os.environ.get(INTERRUPT_SAID_BY)
                          else f"{STDOUT_READER_GONE}: {interrupted}")
    raise SystemExit(141) from None


def said_on_each_node(line):
    """`line` on stderr from local rank 0 alone: one line a node, where each has a terminal."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and sys.stderr:  # (None: `2>&-`)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


PEER_ENDED = ("stopped: another process of this run has ended (interrupted, refused or killed: "
              f"its lines, on its node's terminal, say why); what was written is kept "
              f"({RESUME_IF_SAVED})")


def peer_ended(text):
    """Whether a collective's error says that another rank's process is gone (gloo's words where
    its connection closes: Ctrl-C, an error or kill -9 on another node). Each rank of the nodes
    left printed a gloo traceback."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "gloo" in text and any(
        words in text for words in ("Connection closed by peer", "Connection reset by peer"))
    # ("gloo": its transport's file names its errors; another library's reset keeps its traceback)


def sigterm_as_interrupt():
    """SIGTERM (a scheduler's time limit, `kill`, torchrun passing on its own to its ranks) taken
    as Ctrl-C, where it would kill the process: a stage ended without its line, in the middle of
    whatever it did (nothing torn: checkpoints are renamed whole). A second one is dropped (it cut
    the stop short). Returns the handler to put back, or None where SIGTERM is left as it was
    (ignored, or handled: pipeline.py's and lab.py's own)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, _drop_signal)
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, interrupt)


# ----------------------------------------------------------------------------------------
# dataclass config -> command line
# ----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage otherwise)
        fail(f"{self.prog}: {message} (see --help)")


def _parse_bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{s}'")


def _converter(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]: 'none' -> None
        inner = _converter(next(a for a in args if a is not type(None)))
        return lambda s: None if s.strip().lower() in ("none", "") else inner(s)
    if origin in (tuple, list) or tp in (tuple, list):  # comma-separated: --lora_targets q,v
        inner = _converter(args[0]) if args else str
        return lambda s: tuple(inner(x) for x in s.split(",") if x.strip() != "")
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        def conv(s, tp=tp):
            try:
                return tp(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got '{s}'")
        return conv
    raise TypeError(f"unsupported config field type {tp}")


def checkpoint_name(path):
    """The folder eval.py scores a checkpoint into: its name (ckpt/sft -> sft), a checkpoint-N
    with its run's (ckpt/sft/checkpoint-000100 -> sft-checkpoint-000100)."""
    p = os.path.normpath(os.path.abspath(path))
    n = os.path.basename(p)
    return f"{os.path.basename(os.path.dirname(p))}-{n}" if n.startswith("checkpoint-") else n


def is_utf8(name):
    """Whether a name read from the file system holds no byte that is not UTF-8 (a surrogate
    escape)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dash_free(path):
    """A relative path that starts with '-' as './-...': passed on to a stage ('--out -runs/sft'),
    argparse read it as a flag and the stage refused '--out: expected one argument'."""
    return os.path.join(".", path) if path.startswith("-") else path


def seed_suffix(cfg, config_class, fields):
    """A world seed N > 0 moves each of `fields` still at its default to 'NAME-seedN' (data/shapes
    -> data/shapes-seed1), so that worlds of two seeds and the runs on them never share a folder."""
    if not cfg.world_seed:
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for name in fields:
        if getattr(cfg, name) == defaults[name]:
            root, ext = os.path.splitext(getattr(cfg, name))
            setattr(cfg, name, f"{root}-seed{cfg.world_seed}{ext}")
    return cfg


# the flags of any script that name files or folders (a list's items, `FILE:weight`, `name=FILE`)
PATH_FLAGS = {"out", "init", "vision_tower", "tokenizer", "data", "image_folder", "val_data",
              "align_data", "read_data", "world", "captions", "reward", "instructions", "images",
              "ckpt", "compare", "pope_files", "pope_labels", "chair_instances", "chair_synonyms",
              "chair_captions", "mmhal_file", "gavie_file", "gavie_annotations", "llava_bench_file",
              "llava_bench_answers", "llava_bench_context", "llava_bench_rule", "judge_prompt",
              "judge_model", "llava_answers", "sft", "results", "plots", "eval_out",
              "import_llava_rlhf", "policy_lora"}
# '~' or '~user' that starts a path (or an item of a list, or the FILE of `name=FILE`)
HOME_PREFIX = re.compile(r"(^|,)(\w+=)?(~[^/,]*)(?=/|,|$)")
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs, NFS)


def expand_home(value):
    """'~/x' -> '/home/me/x' in a path flag, as the shell does for `--out ~/x` but not for
    `--out=~/x` (nor `--data a.json,~/b.json`): that wrote a folder named '~' in the working
    folder. A '~name' that names no user is kept as it is (os.path.expanduser)."""
    return HOME_PREFIX.sub(lambda m: m[1] + (m[2] or "") + os.path.expanduser(m[3]), value)


def refuse_long_names(flag, value):
    """A file name longer than a file system takes: one line naming the flag (the error came from
    deep in a write, naming a temp file, or as "not found" for a file that cannot exist). Linux's
    limit, in bytes (macOS and Windows count characters: left to their own error there); a list
    item's `name=` and `:weight` or `:role` are not part of its file's name."""
    if not sys.platform.startswith("linux"):
        return
    for name in (name for item in value.split(",") for name in _file_of(item).split(os.sep)):
        size = len(name.encode("utf-8", "surrogateescape"))
        if size > NAME_MAX:
            raise ConfigError(f"--{flag} {value}: a name of {size} bytes ('{name[:24]}...'); a "
                              f"file system takes at most {NAME_MAX} bytes a name")


def _file_of(item):
    """The file a list item names: without its `name=` or `:weight`/`:role` where the rest is a
    file there (as the list readers take it); else the item whole."""
    for rest in (re.sub(r"^\w+=", "", item), re.sub(r":[^/:]*$", "", item)):
        if rest != item and os.path.exists(rest):
            return rest
    return item


def parse_config(cls, argv=None, prog=None):
    """`--field value` for every field of the dataclass `cls`; types are checked, unknown or
    repeated flags are an error, and every value is checked against `cls.RANGES` (check_ranges).
    Help text comes from the comment after each field."""
    prog = prog or os.path.basename(sys.argv[0])
    argv = _join_negative_values(sys.argv[1:] if argv is None else argv)
    _refuse_repeats(cls, argv, prog)
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip(),
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        if tp in (tuple, list) or typing.get_origin(tp) in (tuple, list):  # --x a b c or --x a,b,c
            parser.add_argument(f"--{f.name}", type=_converter(tp), nargs="*", default=default,
                                help=comments.get(f.name, " "), metavar=f.name.upper())
        elif tp is bool:  # --resume alone is --resume true (it was "expected one argument")
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True,
                                default=default, help=comments.get(f.name, " "),
                                metavar=f.name.upper())
        else:
            parser.add_argument(f"--{f.name}", type=_converter(tp), default=default,
                                help=comments.get(f.name, " "), metavar=f.name.upper())
    args = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):  # nargs lists of comma-split tuples -> one flat tuple
        v = args[f.name]
        if isinstance(v, list):
            args[f.name] = tuple(x for part in v for x in part)
            _check_list_flag(f, args[f.name], prog)
    try:
        for name in PATH_FLAGS & set(args):
            v = args[name]
            args[name] = tuple(map(expand_home, v)) if isinstance(v, tuple) else expand_home(v)
            for value in args[name] if isinstance(v, tuple) else [args[name]]:
                refuse_long_names(name, value)
        cfg = cls(**args)
        # the flags typed (refuse_unread: `--instruct_lr 1e-3` beside --init is not read though
        # 1e-3 is its default; the user asked for that rate and got --lr's without a word)
        cfg._given = frozenset(given_flags(cls, argv))
        check_ranges(cfg)
    except ConfigError as e:
        fail(f"{prog}: {e}")
    return cfg


def _join_negative_values(argv):
    """'--flag -1e-1' -> '--flag=-1e-1': argparse before Python 3.13 reads a negative number in
    scientific notation (or -inf) as an option name and says the flag has no value."""
    out, i = [], 0
    while i < len(argv):
        token, value = argv[i], argv[i + 1] if i + 1 < len(argv) else ""
        if token.startswith("--") and "=" not in token and value.startswith("-"):
            try:
                float(value)
            except ValueError:
                pass
            else:
                out.append(f"{token}={value}")
                i += 2
                continue
        out.append(token)
        i += 1
    return out


def _check_list_flag(field, values, prog):
    """A list flag given with no values (`--seeds` alone, `--seeds ,`) where the default has some
    would run nothing and still rewrite the outputs (lab.py's RESULTS.md); where it has none, it
    is the default (`--pope_files $EMPTY` scored the Shapes world); an item given twice is a
    typo, not a weight."""
    no_default = field.default is dataclasses.MISSING
    default = field.default_factory() if no_default else field.default
    if not values:
        hint = f"default: {' '.join(map(str, default))}" if default else "or leave it out"
        fail(f"{prog}: --{field.name}: give at least one value ({hint})")
    repeated = [x for i, x in enumerate(values) if x in values[:i]]
    if repeated:
        fail(f"{prog}: --{field.name}: {repeated[0]} is given twice (give each value once)")


def given_flags(cls, argv=None):
    """The names of `cls`'s fields given on the command line, in order (a flag given at its
    default value is given: only the command line tells it from one left out)."""
    names = {f.name for f in dataclasses.fields(cls)}
    argv = sys.argv[1:] if argv is None else argv
    tokens = (t[2:].split("=", 1)[0] for t in argv if t.startswith("--"))
    return [name for name in tokens if name in names]


def _refuse_repeats(cls, argv, prog):
    """A flag given twice is a mistake (argparse would keep the last one without a word)."""
    seen = set()
    for name in given_flags(cls, argv):
        if name in seen:
            fail(f"{prog}: --{name} is given twice (give each flag once)")
        seen.add(name)


def _interval(rule):
    """'[0, 1]', '(0, inf)', '[1, inf)' -> (lo, hi, lo_closed, hi_closed)."""
    lo, hi = (x.strip() for x in rule[1:-1].split(","))
    return float(lo), float(hi), rule[0] == "[", rule[-1] == "]"


def check_value(flag, value, rule):
    """One value against its rule; returns what is wrong (None: fine). Rules: an interval in maths
    notation ('[1, inf)', '(0, 1]'; inf only when the bracket is closed) or a tuple of allowed
    choices (for a tuple field: of each item). A float must be finite unless its interval holds inf;
    None passes (Optional)."""
    if value is None or rule is None:
        return None
    if isinstance(rule, tuple):
        items = value if isinstance(value, tuple) else (value,)
        bad = [x for x in items if x not in rule]
        if not bad:
            return None
        if len(rule) > 1:
            names = ", ".join(map(str, rule[:-1])) + f" or {rule[-1]}"
        else:
            names = str(rule[0])
        if isinstance(value, tuple):
            return f"--{flag}: {bad[0]!r} is not one of {', '.join(map(str, rule))}"
        return f"--{flag} {value}: choose {names}"
    lo, hi, lo_closed, hi_closed = _interval(rule)
    for x in value if isinstance(value, tuple) else (value,):
        if isinstance(x, float) and math.isnan(x):
            return f"--{flag} {x}: must be a number in {rule}"
        closed_end = hi_closed and x == hi or lo_closed and x == lo  # e.g. inf in "[0, inf]"
        if isinstance(x, float) and math.isinf(x) and not closed_end:
            return f"--{flag} {x}: must be a finite number in {rule}"
        if x < lo or x > hi or (x == lo and not lo_closed) or (x == hi and not hi_closed):
            return f"--{flag} {x}: must be in {rule}"
        # an open-ended size past what a tensor holds (a typo'd 1e20) failed deep in torch with a
        # traceback; a seed may be any size
        if isinstance(x, int) and not isinstance(x, bool) and x > INT_MAX \
                and not (flag.endswith("seed") or rule == SEED_RANGE):
            return f"--{flag} {x}: must be in {rule} and at most {INT_MAX}"
        if isinstance(x, float) and not math.isinf(x) and abs(x) > FLOAT32_MAX:
            return f"--{flag} {x}: must be in {rule} and at most {FLOAT32_MAX:.1e} (float32)"
    return None


INT_MAX = 2 ** 31 - 1  # the largest open-ended integer flag taken
FLOAT32_MAX = 3.4028234663852886e38  # a float flag reaches tensors as float32


# flags that name where a script reads its world or checkpoint, or writes: never empty (a path
# flag read only in some runs, as --init or --tokenizer, is checked where read: require_paths)
NONEMPTY_PATH_FLAGS = ("out", "world", "results", "plots", "eval_out", "ckpt", "sft",
                       "reward")


def check_ranges(cfg):
    """Every field against the rule its Config declares in RANGES (floats without a rule: finite);
    a NONEMPTY_PATH_FLAGS field must not be empty."""
    rules = getattr(cfg, "RANGES", {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in NONEMPTY_PATH_FLAGS and isinstance(value, str) and not value.strip():
            raise ConfigError(f"--{f.name} {value!r}: give a path (an empty one would mean the "
                              "current folder)")
        rule = rules.get(f.name, "(-inf, inf)" if isinstance(value, float) else None)
        problem = check_value(f.name, value, rule)
        if problem:
            raise ConfigError(problem)


def _field_comments(cls):
    """Field comments from the class source, for --help: the one after a field (`name: type =
    default  # comment`, with the comment lines indented below it that go on with it), else the
    comment lines right above the field, at its indentation."""
    import inspect
    out = {}
    for klass in reversed(cls.__mro__[:-1]):  # a subclass's comment replaces its base's
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above, last, last_indent = [], None, 0
        for line in src.splitlines():
            s, indent = line.strip(), len(line) - len(line.lstrip())
            field = re.match(r"(\w+)\s*:[^=]*=", s)
            if s.startswith("#") and last and indent > last_indent:  # goes on with `last`
                out[last] += " " + s.lstrip("# ")
            elif s.startswith("#"):
                above.append(s.lstrip("# "))
                last = None
            elif field and "#" in s:
                out[field.group(1)] = s.split("#", 1)[1].strip()
                above, last, last_indent = [], field.group(1), indent
            else:
                if field and above:
                    out[field.group(1)] = " ".join(above)
                above, last = [], None
    return out


# ----------------------------------------------------------------------------------------
# distributed, seeding, device
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False  # parameters, gradients and optimizer state sharded over the ranks (FSDP2)

    @property
    def main(self):
        return self.rank == 0


_made_process_group = False  # set by setup_dist; end_process reads it


def check_device(device):
    """--device cuda where there is none: one line before any work (eval's model load, each of a
    lab's runs failing after it, was where it showed)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")


def setup_dist(device="cpu", fsdp=False, flags=None):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` runs as a world of one (under --fsdp
    a one-rank process group, so the sharded code path is the same at any world size). `flags`:
    the stage's parsed config, which every process must have been given alike
    (same_flags_everywhere)."""
    global _made_process_group
    check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # (CPU tensors too: the stages all-reduce small counts on the CPU, which an NCCL-only group
    # refuses, "No backend type associated with device type cpu"; tests run gloo alone)
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    end_with_the_launcher()  # (torchrun --nproc_per_node 1 too)
    if world == 1:
        if fsdp:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            _made_process_group = True
        return Dist(device=torch.device(device), fsdp=fsdp)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    join_process_group(backend)
    _made_process_group = True
    d = Dist(rank, world, local, dev, fsdp)
    if flags is not None:
        same_flags_everywhere(flags, d)
    return d


JOIN_TIMEOUT = "FACTALIGN_JOIN_TIMEOUT"  # seconds the ranks wait for each other to start (300)


def join_process_group(backend):
    """init_process_group, waiting for the other ranks at most JOIN_TIMEOUT seconds (their launchers
    met before they started: only imports and flag checks lie between them), then for each of the
    run's collectives gloo's 30 minutes as before. A rank of another node that ended before it
    joined (a traceback: a bug, a package missing there) held these ranks for those 30 minutes
    without a word. (Where torch lacks _set_pg_timeout or _get_default_store the join keeps the
    30 minutes.)"""
    import datetime
    from torch.distributed import constants, distributed_c10d
    text = os.environ.get(JOIN_TIMEOUT, "300")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        fail(f"{JOIN_TIMEOUT}={text!r}: give the seconds to wait for the other ranks, in (0, inf)")
    # (private: the short join only where both exist to put the 30 minutes back after it)
    set_timeout = getattr(distributed_c10d, "_set_pg_timeout", None)
    default_store = getattr(distributed_c10d, "_get_default_store", None)
    short = set_timeout is not None and default_store is not None
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds)
                                if short else constants.default_pg_timeout)
    except dist.DistStoreError as e:
        if "timeout" not in str(e):
            raise
        said_on_each_node(f"stopped: the run's other processes did not all start within {text} s "
                          f"({JOIN_TIMEOUT}): one that ended before it joined (a traceback or an "
                          "error on its node's terminal), a node not started, or one that cannot "
                          "reach --master_addr; nothing was written")
        raise SystemExit(1) from None
    if short:
        set_timeout(constants.default_pg_timeout)
        # the join's timeout was the store's too: later store waits (NCCL's communicators waiting
        # for rank 0's id, FSDP's mesh groups) would be cut at JOIN_TIMEOUT
        default_store().set_timeout(constants.default_pg_timeout)


def same_flags_everywhere(cfg, d):
    """Every process runs with the flags rank 0 has. torchrun on several nodes starts each node's
    processes from that node's own command line: one node given another --max_steps (or batch size,
    seed, ...) trained on its own plan, and the run hung in a collective once the plans parted."""
    mine = dataclasses.asdict(cfg)
    every = [None] * d.world
    dist.all_gather_object(every, (d.rank - d.local_rank, mine))
    # (a rank refused before it came sent its line: tell_the_waiting_ranks; on its node it is said)
    refused = [(rank, node, said) for rank, (node, said) in enumerate(every)
               if isinstance(said, str)]
    if refused:
        if d.local_rank == 0 and d.rank - d.local_rank not in [node for _, node, _ in refused]:
            fail(f"rank {refused[0][0]}: {refused[0][2]}")
        raise SystemExit(2)
    every = [flags for _, flags in every]
    for rank, theirs in enumerate(every):
        differ = [k for k in mine if theirs.get(k) != every[0].get(k)]
        if differ:
            k = differ[0]
            refuse_once_per_node(d, f"--{k}: {every[0][k]!r} on rank 0, {theirs[k]!r} on rank "
                                 f"{rank} (another node's command line?): give every node the same "
                                 "flags")


def refuse_once_per_node(d, message):
    """A refusal every process reached alike: one line on each node's terminal (its local rank 0
    says it; under torchrun each node has its own), exit code 2 on every process."""
    if d.local_rank == 0:
        fail(message)
    raise SystemExit(2)


def end_with_the_launcher():
    """Under torchrun on Linux this rank is killed when its launcher dies. torchrun stops its ranks
    itself on SIGINT or SIGTERM, but a launcher killed outright (kill -9, the OOM killer) left
    them training on as orphans, writing checkpoints into --out and holding its lock (1800 steps,
    130 s, until their stdout was closed). The same for a stage or run that pipeline.py or lab.py
    started (STARTED_BY, their pid): one of them killed outright left its stages training on for
    up to tens of minutes (a reward model), which the next pipeline or lab refused, then ran
    again. (Taken out of the environment: this process's own children were not started by it.)"""
    started_by = os.environ.pop(STARTED_BY, "")
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if not (torchrun or started_by.isdecimal()) or not sys.platform.startswith("linux"):
        return
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    launcher = LAUNCHER_PID if torchrun else int(started_by)
    if os.getppid() != launcher:  # (it died before the call: this rank is an orphan already)
        who = "torchrun's launcher" if torchrun else "the pipeline or lab that started it"
        sys.stderr.write(f"error: {who} (pid {launcher}) has ended: nothing run\n")
        sys.stderr.flush()
        os._exit(1)


# this process's parent as it started (torchrun's launcher: end_with_the_launcher)
LAUNCHER_PID = os.getppid()


def check_world(script, fsdp, grad_accum=1, **batch_sizes):
    """Before any process group: the global batch sizes must split evenly over the torchrun
    processes (every rank runs the same number of forward passes, which FSDP's collectives need),
    and into --grad_accum micro-batches of at least one sequence each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and script == "ppo.py":
        raise ConfigError("ppo.py --fsdp: not supported; PPO trains LoRA adapters on one frozen "
                          "base that its four roles share, replicated on every process (see "
                          "README, 'Sharded training')")
    for flag, size in batch_sizes.items():
        if size % world:
            raise ConfigError(f"--{flag} {size} does not split over the {world} processes "
                              f"(torchrun --nproc_per_node {world}): use a multiple of {world}")
        if grad_accum > size // world:  # (an empty micro-batch)
            raise ConfigError(f"--grad_accum {grad_accum}: more micro-batches than the "
                              f"{size // world} sequences per process of --{flag} {size} "
                              f"(allowed: 1 to {size // world})")


def cleanup_dist():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank done with its collectives before gloo's threads are torn down
        dist.destroy_process_group()


def wait_a_moment(procs, seconds=2.0):
    """Wait up to `seconds` in all for processes to end on their own (stopping them comes next)."""
    deadline = time.time() + seconds
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass


def _drop_signal(signum, frame):
    """A further Ctrl-C or SIGTERM while stopping: dropped. (A Python handler, not SIG_IGN: a
    stage started in that moment would inherit SIG_IGN and ignore the SIGINT that stops it.)"""


def hold_stop_signals():
    """From now on SIGINT and SIGTERM are dropped (main thread alone can set handlers; signals run
    there). Returns the handlers they had. A second signal raised KeyboardInterrupt inside the
    stop itself: no stage got SIGINT, they trained on, and common's --resume line was printed."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, _drop_signal) for s in (signal.SIGINT, signal.SIGTERM)}


@contextmanager
def stop_signals_deferred():
    """A SIGINT or SIGTERM arriving inside the block is taken when it ends (as it would have been
    taken there). Around starting a child and recording it: a Ctrl-C raised between the two left
    the child unknown to the stop, running on as an orphan. Python handlers, not a signal mask:
    the child must not inherit the signals blocked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    held = {s: signal.signal(s, lambda signum, frame: got.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(s) != signal.SIG_IGN}  # (ignored: the child inherits that)
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if got:
            signal.raise_signal(got[0])  # (to the handler put back: the interrupt, a drop, ...)


def ended_how(code):
    """A child's exit status in words: 'exit code N', or 'killed by signal SIGKILL' where Python's
    returncode is -N (a signal's number, which read as 'exit -9' looked like the stage's own
    code)."""
    if code >= 0:
        return f"exit code {code}"
    return f"killed by signal {({s.value: s.name for s in signal.Signals}).get(-code, -code)}"


STOP_PATIENCE = 60  # seconds a stopped child may take before the stop says what it waits for


def stop_processes(procs, grace=True):
    """Stop child processes (pipeline's stages, lab's runs) and wait for them: each gets SIGINT
    (their Ctrl-C: a checkpoint-safe exit), after up to 2 s to end on their own where grace (a
    terminal's Ctrl-C reached them too: a second interrupt could cut their last words). Further
    signals meanwhile are dropped, so that the stop always runs to its end."""
    held = hold_stop_signals()
    try:
        if grace:
            wait_a_moment(procs)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        wait_a_moment(procs, STOP_PATIENCE)
        stuck = [proc for proc in procs if proc.poll() is None]
        if stuck:  # (waited for without a word: a stuck one looked like a hung stop)
            pids = " ".join(str(proc.pid) for proc in stuck)
            print(f"still waiting for {len(stuck)} process{'es' * (len(stuck) > 1)} to stop (it "
                  f"may be saving a checkpoint); `kill -9 {pids}` ends "
                  f"{'them' if len(stuck) > 1 else 'it'} now (checkpoints saved stay whole)",
                  file=sys.stderr, flush=True)
        for proc in stuck:
            proc.wait()
    finally:
        for signum, handler in held.items():
            if handler is not None:  # (None: set outside Python, not restorable from here)
                signal.signal(signum, handler)


def interrupt_on_sigterm():
    """SIGTERM (a batch scheduler's time limit, `kill`) taken as Ctrl-C: pipeline.py and lab.py stop
    their running stages and say how to go on (they ended at once, their stages running on as
    orphans that the next pipeline or lab refused until they ended). The first SIGTERM or SIGINT
    raises KeyboardInterrupt; any after it is dropped (one landing in the stop, or on the way to it,
    cut it short). A SIGINT ignored at start (`pipeline.py &` in a script) is dropped instead: with
    SIG_IGN its stages inherited it, ignored the SIGINT that stops them, and trained on."""
    global SIGINT_IGNORED_AT_START
    interrupts.hand_over()

    def interrupt(signum, frame):
        hold_stop_signals()
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    elif signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        SIGINT_IGNORED_AT_START = True
        signal.signal(signal.SIGINT, _drop_signal)
    atexit.register(_ignore_stop_signals_at_exit)


SIGINT_IGNORED_AT_START = False  # (interrupt_on_sigterm: started as `pipeline.py &` in a script)


def stage_process_kwargs():
    """Popen keywords for a pipeline stage or a lab run. Started with SIGINT ignored (`&` in a
    script), the stages go in a session of their own: they no longer inherit SIG_IGN (they take
    the SIGINT that stops them), and a Ctrl-C meant for the script that started us must not reach
    them through its process group either (they ignored it before); ours is sent to each."""
    return {"start_new_session": True} if SIGINT_IGNORED_AT_START else {}


def _ignore_stop_signals_at_exit():
    """A process that has stopped its stages: as it exits, Python puts its signal handlers back to
    the default (SIG_IGN excepted), and one more SIGTERM then killed it (-15) after its stop and
    its line. Its threads are done by now: no stage starts to inherit SIG_IGN."""
    if signal.getsignal(signal.SIGTERM) is _drop_signal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def end_process(code=0):
    """A script's last call after a run that made a process group (torchrun, or --fsdp): exit at
    once, skipping the interpreter's teardown. Under FSDP torch's DTensor caches keep the device
    mesh, and with it the gloo group and its threads, alive past destroy_process_group; one of
    those threads that needs the GIL while the interpreter shuts down aborts the process (SIGABRT,
    exit code -6, after every file is written). Every file is closed by now; stdout and stderr
    are flushed here."""
    if _made_process_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@contextmanager
def ending_process():
    """A stage script's main block: end_process after a run, and after a user's error (exit 2) or
    an interrupt (130) too. An error under torchrun left the group (never destroyed) to the
    interpreter's teardown, which aborted the rank after its line in 2 of 6 runs ('terminate
    called without an active exception', SIGABRT, -6 instead of 2)."""
    try:
        yield
    except SystemExit as e:  # (sys.exit's codes: None is 0, a message is 1)
        end_process(e.code if isinstance(e.code, int) else int(e.code is not None))
        raise
    end_process()


def all_gather_cat(t, d):
    """Concatenate equally-shaped tensors from all ranks along dim 0."""
    if d.world == 1:
        return t
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, 0)


SYNC_BUCKET = 1 << 26  # gradient elements per all-reduce (256 MB in fp32)


def sync_grads(params, d):
    """Sum gradients across ranks (explicit data parallelism: flat all-reduces after backward).
    Our losses are normalised by global counts (tokens or pairs in the global batch), so the
    per-rank gradients add up to the single-process gradient exactly. Why not
    DistributedDataParallel: PPO calls one shared base under four roles (policy, reference, reward,
    value adapters) several times per step and DPO runs the model twice (policy, then adapters off),
    which DDP's one-forward-one-backward bucket hooks do not follow; the trainable set here is LoRA
    (small), so a few flat all-reduces cost little. Under FSDP the gradients come back
    reduce-scattered already (shard_model)."""
    if d.world == 1 or d.fsdp:
        return
    for p in params:  # every rank must all-reduce the same tensors, also after an empty micro-batch
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # flat all-reduces of up to SYNC_BUCKET elements, not one per tensor (nor one of them all: its
    # copy of a 7B full fine-tune's bf16 gradients was 13.5 GB beside them)
    bucket, size = [], 0
    for g in [p.grad for p in params] + [None]:
        if bucket and (g is None or size + g.numel() > SYNC_BUCKET):
            flat = torch.cat([x.reshape(-1) for x in bucket])
            dist.all_reduce(flat)
            _unflatten(flat, bucket)
            bucket, size = [], 0
        if g is not None:
            bucket.append(g)
            size += g.numel()


def _unflatten(flat, grads):
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def bf16_autocast(cfg):
    """The training passes' autocast: bf16 on a GPU with --dtype bf16, else none. Every pass whose
    numbers meet the training pass's runs under it too (DPO's cached reference log-probs, held-out
    losses): outside it CLIP's norms and the residual stream ran at another precision, so the
    policy and its reference differed at step 0."""
    on = cfg.dtype == "bf16" and cfg.device == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def all_reduce_sum(t, d):
    """Sum of a tensor over ranks (identity in a single process)."""
    if d.world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def on_main_first(d, fn):
    """Run fn on the main process first (e.g. writing the Shapes world), then on the others."""
    if d.main:
        out = fn()
    if d.world > 1:
        dist.barrier()
    if not d.main:
        out = fn()
    return out


WORLD = "{world}"  # in a path flag: the folder --world names: the Shapes world


def require_paths(cfg, flags):
    """The path flags a run reads: none empty."""
    for f in flags:
        if not getattr(cfg, f).strip():
            raise ConfigError(f"--{f} '': give a path (this run reads it)")


def world_paths(cfg, reads=("data",), companions=()):
    """cfg with '{world}' in its path flags replaced by --world, and those of the flags it reads
    that named it (the stage writes the world first when one does). The `companions` of --data (its
    validation file, captions, ...) keep a world default only while --data is in the world: a
    user's --data brings its own, so there they drop to '' (none). A flag it reads must not be
    empty ('' named no file: the failure came later, as a nameless ": file not found"), and
    --val_data is not a --data file (refuse_val_in_data)."""
    require_paths(cfg, reads)
    data_in_world = WORLD in cfg.data
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    values = {k: v for k, v in values.items() if isinstance(v, str)}
    dropped = [f for f in companions if WORLD in values[f] and not data_in_world]
    for f in dropped:
        values[f] = ""
    if dropped:
        note_world_file_spelled_out(cfg, dropped)
    named = [f for f in reads + companions if WORLD in values[f]]
    paths = {f: v.replace(WORLD, cfg.world) for f, v in values.items()}
    out = replace_config(cfg, **paths)
    refuse_val_in_data(out)
    return out, named


def note_world_file_spelled_out(cfg, dropped):
    """--data naming a world file by its path (data/shapes/sft.json), not as '{world}/sft.json':
    read as a file of the user's own, without the world's `dropped` companions (its validation
    file, captions, ...). Said: the run changed without a word (the lab's VIGC control means it)."""
    default = next(f.default for f in dataclasses.fields(cfg) if f.name == "data")
    if WORLD not in default:
        return
    world_file = default.replace(WORLD, cfg.world)
    try:
        paths = [path for path, _ in data_specs(cfg.data)]
    except ConfigError:  # (said where the stage reads it)
        return
    if torchrun_rank() == 0 and any(samefile(path, world_file) for path in paths):
        flags = ", ".join(f"--{f}" for f in dropped)
        print(f"note: --data names the world's {os.path.basename(world_file)} by its path: read "
              f"as a file of your own, without the world's {flags}; give it as {default} to keep "
              "them", flush=True)


def samefile(a, b):
    """Whether two paths name one existing file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_val_in_data(cfg):
    """--val_data naming a --data file, under any spelling: its held-out scores would be of
    training records."""
    val = getattr(cfg, "val_data", "")
    if not val:
        return
    files = {cfg.data}  # (reward.py, dpo.py: one file; sft.py: FILE[:weight],...)
    try:
        files |= {path for path, _ in data_specs(cfg.data)}
    except ConfigError:  # (said where the stage reads it)
        pass
    # (a hard link of a --data file is that file too: samefile)
    if any(os.path.realpath(f) == os.path.realpath(val) or samefile(f, val) for f in files):
        raise ConfigError(f"--val_data {val}: one of the --data files (its held-out scores would "
                          "be of training records); give another file, or '' for none")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    """The order of n items in an epoch (read, never written: cached, as every step of the epoch
    and sft's plan of a rank's items ask for it)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(step, n, batch_size, seed, rank=0, world=1):
    """Indices of the global batch number `step` over a dataset of n items, split across ranks.
    A fresh permutation per epoch, seeded by (seed, epoch): the data order depends only on the
    step, so --resume needs no sampler state and any world size sees the same global batches."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = epoch_order(n, seed, epoch)
    idx = perm[(i * batch_size) % n:][:batch_size]
    if len(idx) < batch_size and n:  # n < batch_size: wrap around, as often as it needs
        laps = -(-(batch_size - len(idx)) // n)
        idx = torch.cat([idx, perm.repeat(laps)[:batch_size - len(idx)]])
    if batch_size % world:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {world} processes")
    per = batch_size // world
    return idx[rank * per:(rank + 1) * per].tolist()


# ----------------------------------------------------------------------------------------
# optimizer and schedule
# ----------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.999), vision_lr_ratio=1.0):
    """AdamW over trainable parameters; matrices decay, biases/norms/1-D parameters do not. The
    vision tower and projector may run at vision_lr_ratio x lr (set_lr keeps the ratio)."""
    # (FSDP: the shards)
    named = [(n, p) for n, p in resharded(model).named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("nothing to train: no parameter requires grad")
    groups = []
    for is_vision in (False, True):
        part = [(n, p) for n, p in named
                if n.startswith(("vision_tower.", "projector.")) == is_vision]
        scale = vision_lr_ratio if is_vision else 1.0
        for decay in (True, False):
            ps = [p for _, p in part if (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": scale})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def cosine_lr(step, max_steps, lr, warmup=0, min_ratio=0.0, from_zero=False):
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio * lr at max_steps. Step s
    (from 0) of the warmup runs at lr (s + 1) / warmup, or (from_zero) at lr s / warmup, as
    transformers' schedulers: their first update has rate 0."""
    if step < warmup:
        return lr * (step + (0 if from_zero else 1)) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_and_check(params, max_norm, step, out_dir, skip_nonfinite=False, loss=None,
                   first=False):
    """Clip the gradient norm. A non-finite loss or gradient stops the run naming the step (numbered
    as the log lines and checkpoints number them: the update after checkpoint-N is step N + 1) and
    the last good checkpoint, or (skip_nonfinite) returns None so the caller skips the update.
    first: no update has run yet (said: then no learning rate made it)."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: the norm over every rank's shards
        norm = norm.full_tensor()
    bad_loss = loss is not None and not math.isfinite(float(loss))
    if bad_loss or not torch.isfinite(norm):
        if skip_nonfinite:
            for p in params:
                p.grad = None
            return None
        last = latest_checkpoint(out_dir)
        # (with none, --resume has nothing to go on from: start again)
        again = "resume with --resume true" if last else "start again with --overwrite true"
        cause = "; no update has run: the weights loaded, the data or a loss setting at an " \
            "extreme (as --beta or --kl_coef) made it" if first else ""
        raise NonFiniteError(f"step {step + 1}: non-finite {'loss' if bad_loss else 'gradient'}"
                             f"{cause}; stopped. Last good checkpoint: {last or 'none yet'} "
                             f"({again}, and --skip_nonfinite true to skip such steps)")
    return float(norm)


# --skip_nonfinite: this many skipped updates in a row stop the run (every step skipped trained
# nothing, and the run exited 0)
MAX_SKIPPED_IN_A_ROW = 10


def optimizer_step(opt, params, d, step, cfg, loss=None, reduce=True, last=True):
    """One update, the same in every stage: sum the gradients over ranks, clip, check that loss and
    gradient are finite, step, zero. `loss` is this rank's share (summed over ranks when reduce) and
    comes back global, with the gradient norm; the norm is None when --skip_nonfinite skipped the
    step. last: whether this is the step's last update (PPO takes several)."""
    sync_grads(params, d)
    if loss is not None and reduce:
        loss = all_reduce_sum(loss, d)
    skip_nonfinite = getattr(cfg, "skip_nonfinite", False)
    # (PPO takes several updates per step: the run's first update, not its first step)
    first = step == 0 and getattr(opt, "applied", 0) == 0
    norm = clip_and_check(params, cfg.grad_clip, step, cfg.out, skip_nonfinite, loss, first)
    opt.skipped_in_a_row = 0 if norm is not None else getattr(opt, "skipped_in_a_row", 0) + 1
    opt.applied = getattr(opt, "applied", 0) + (norm is not None)  # (updates in this process)
    opt.first_step = getattr(opt, "first_step", step)  # (> 0: resumed, updates came before)
    # a run from step 0 to its last with no update applied at all: it would end with exit 0 and
    # a final checkpoint equal to its start
    nothing = norm is None and opt.applied == 0 and opt.first_step == 0 and \
        step + 1 == cfg.max_steps and last
    if norm is not None:
        opt.step()
    elif opt.skipped_in_a_row == MAX_SKIPPED_IN_A_ROW or nothing:  # (the same on every rank)
        last = latest_checkpoint(cfg.out) or "none yet"
        what = (f"{MAX_SKIPPED_IN_A_ROW} updates in a row" if not nothing else
                "every update of this run")
        raise NonFiniteError(f"step {step + 1}: {what} non-finite and skipped (--skip_nonfinite "
                             "skips a bad batch; this is the settings or the weights); stopped. "
                             f"Last good checkpoint: {last}")
    elif d.main:
        print(f"warning: step {step + 1}: non-finite loss or gradient; update skipped "
              "(--skip_nonfinite)", flush=True)
    opt.zero_grad(set_to_none=True)
    return loss, norm


# ----------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------

class Logger:
    """One nanoGPT-style line per log step on stdout and the same numbers in OUT/metrics.jsonl."""

    def __init__(self, out_dir, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.t0 = time.time()
        # a run killed mid-line: drop the cut line before appending; killed between checkpoints:
        # drop the rows of the steps after the newest one (resumed, they are run and logged again)
        if enabled and os.path.exists(self.path):
            unshare(self.path)
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
            newest = latest_checkpoint(out_dir)
            self.keep_rows_up_to(int(os.path.basename(newest)[11:]) if newest else 0)

    def keep_rows_up_to(self, step):
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        kept = [line for line in lines if _row_step(line) <= step]
        if len(kept) < len(lines):  # (whole: a full disk left a torn metrics.jsonl.tmp)
            write_whole(self.path, lambda f: f.writelines(kept))

    def log(self, step, **metrics):
        if not self.enabled:
            return
        numbers = (torch.Tensor, np.floating)
        metrics = {k: (float(v) if isinstance(v, numbers) else v) for k, v in metrics.items()}
        elapsed = time.time() - self.t0
        parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        print(" | ".join(parts + [f"{elapsed:.1f}s"]), flush=True)
        with naming(self.path), open(self.path, "a") as f:  # (NaN and inf are not JSON: null)
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in metrics.items()}
            row = {"step": step, "time": round(elapsed, 3), **finite}
            f.write(json.dumps(row) + "\n")


def unshare(path):
    """path made a file of its own where it is one of several hard links: a run folder copied with
    them (`cp -al`, `rsync --link-dest` snapshots) shares its files with the original, and the
    copy's resume appended its rows to the original's metrics.jsonl too (and eval's answers and
    judge replies, appended likewise; the .lock: lock_out). Every other file of a run is written
    whole under a new name, which breaks the link itself."""
    if os.stat(path).st_nlink > 1:
        with open(path, "rb") as f:
            data = f.read()
        write_whole(path, lambda f: f.write(data), binary=True)


def _row_step(line):
    """A metrics.jsonl row's step (0 for a line that is not a row: kept as it is)."""
    try:
        step = json.loads(line).get("step", 0)
    except (ValueError, AttributeError):
        return 0
    return step if isinstance(step, (int, float)) else 0


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def progress(iterable, total=None, desc="", enabled=True, every=1.0):
    """A minimal progress bar on stderr (no dependency): count, rate and ETA, redrawn each second.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    t0 = last = time.time()
    i = 0
    for i, x in enumerate(iterable, 1):
        yield x
        now = time.time()
        if enabled and (now - last >= every or i == total):
            last = now
            rate = i / max(now - t0, 1e-9)
            eta = f" eta {int((total - i) / rate)}s" if total else ""
            line = f"\r{desc} {i}/{total or '?'} {rate:.1f}/s{eta}   "
            print(line, end="", file=sys.stderr, flush=True)
    if enabled and i:
        print(file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# checkpoints: OUT/checkpoint-NNNNNN/ written to a temp dir and renamed (a crash never leaves
# a half checkpoint); --init OUT and --resume read the newest complete one
# ----------------------------------------------------------------------------------------

RESUME_FREE_FIELDS = {"resume", "overwrite", "out", "log_every", "save_every", "eval_every",
                      "max_steps",
                      # do not change the math (skip_nonfinite: the way out of a stopped run;
                      # grad_checkpoint: the same gradients, recomputed: bitwise in the tests)
                      "skip_nonfinite", "save_full", "grad_checkpoint",
                      # the same global batch in other micro-batches (resumed on fewer GPUs, the
                      # memory a process has): allowed, with a note (not bitwise)
                      "grad_accum",
                      # the rollouts' decoding path: the same tokens up to float rounding (and a
                      # run started before the flag was added resumes)
                      "compile_decode"}
# why a field that looks like a memory setting is not free at --resume (said with the refusal)
RESUME_WHY = {"micro_batch": " (ppo.py's rollout samples in chunks of it: another value draws "
                             "other samples from the same stream)",
              "world": " (pass the --world the run had, or put the world back there)"}
# fields a stage gained after runs were started without them: such a run's config reads as having
# this value, what the stage did before (vigc's repetition_penalty: its default, as vigc resumes
# with every generation flag at its default; '{world}' in a value: the run's own --world, as
# world_paths resolves it; a function: of the run's config). Left out, as no one value is what the
# stage did before: sft's reading stage (read_steps, read_data, instruct_lr, instruct_warmup: none
# read with --init, where each must be its default; a fresh run read none, which --read_steps 0 or
# --read_data '' says) and so every field sft gained before it (pack, align_data, ...): such a run
# is refused in one line ("lacks this script's field")
ADDED_FIELDS = {"prompt_space": False, "vision_tower": "", "repetition_penalty": 1.5,
                "policy_lora": "", "warmup_from_zero": False, "caption_shuffle": "pair",
                "loss_divisor": "tokens",
                # 2026-12-01: no stage sharded before --fsdp
                "fsdp": False,
                # ppo.py 2026-12-01: LLaVA-RLHF's variants as flags, ours kept as the defaults
                "stop_at_question": False, "rm_input": "text", "correct_rule": "word",
                # reward.py 2026-12-01 and 12-03: the blank-image control, the import
                "blank_images": False, "import_llava_rlhf": "",
                # vigc.py 2026-12-01: --vic_mode reference beside ours; the world's tokenizer as a
                # flag; --instructions (a --data run used the built-in phrasings, '' now; a run on
                # the world before it read a world of format 7, which no stage reads now)
                "vic_mode": "ours", "tokenizer": "{world}/tokenizer", "instructions": "",
                # dpo.py 2026-12-01: POVID stage 2 noised the resized image before; stage 1 reads
                # none, and refuses all but the default
                "noise_on": lambda was: "resized" if was.get("povid_stage") == 2 else "original"}


def check_output_path(flag, path, folder=True):
    """Before any work: `flag` PATH can be written at the end of a long run: a folder (or, with
    folder=False, a file) that is not the other kind, under an existing ancestor that is a folder
    this process may write (the folders between are made when it writes)."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        kind = "is not a folder" if folder else "is a folder, not a file"
        raise ConfigError(f"{flag} {path}: exists and {kind}")
    parent = os.path.abspath(path if folder else os.path.dirname(path) or ".")
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {parent} cannot be written")


_made_out = []  # folders make_dirs made (deepest last): release_locks removes them if empty


def make_dirs(path):
    """os.makedirs(path, exist_ok=True), noting the folders it made: a run refused later (a
    checkpoint that fails to load) leaves none of them behind, empty."""
    # (walked as given: makedirs of 'a/new/../run' makes 'a/new' too; each is noted by its
    # normalized name, and 'a/new/..' (which is 'a', there before) is not)
    # (a link to a folder not made yet: the folder it names is made, as shapes.py makes a world
    # there; makedirs of the link itself said "File exists")
    if os.path.islink(path) and not os.path.exists(path):
        path = os.path.realpath(path)
    made, parent = [], os.path.join(os.getcwd(), path)
    while not os.path.exists(parent):
        if os.path.basename(parent) not in ("..", "."):
            made.insert(0, os.path.normpath(parent))
        parent = os.path.dirname(parent)
    _made_out.extend(made)  # (before: one failing half way left those made before it)
    os.makedirs(path, exist_ok=True)


def ensure_writable(out_dir):
    """Fail early, with one line, when the output directory cannot be written."""
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    try:
        make_dirs(out_dir)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        if os.path.exists(probe):  # (made, then its write failed: a full disk's)
            os.remove(probe)
        # (a file, or a link that loops, read "cannot be written (File exists)")
        why = ("a file, not a folder" if os.path.exists(out_dir) and not os.path.isdir(out_dir)
               else not_found(out_dir) if os.path.islink(out_dir) and not os.path.exists(out_dir)
               else "")  # (a link to a folder that is there: its write failed, as any other's)
        parent = os.path.dirname(os.path.normpath(out_dir))
        while not why and parent not in ("", os.sep):  # (a link on the way that names nothing)
            if os.path.islink(parent) and not os.path.exists(parent):
                why = f"{parent} is {not_found(parent)}"
            parent = os.path.dirname(parent)
        if why:
            raise ConfigError(f"{out_dir}: output directory: {why}")
        raise ConfigError(f"{out_dir}: output directory cannot be written ({e.strerror})")


# ----------------------------------------------------------------------------------------
# one writer per run directory, and no run replaced by accident: claim_out() before anything is
# read or written (lock, refusals), start_writing() once the inputs are checked (move aside,
# run.json)
# ----------------------------------------------------------------------------------------

LOCK = ".lock"  # in --out: flock'ed by the process writing there, holds its pid
RUN_FILE = "run.json"  # in --out: sha256 of the data files the run started on (--resume compares)
_locks = {}  # real path of a locked --out -> the open lock file


def lock_out(out_dir):
    """Hold an exclusive flock on OUT/.lock for as long as this process lives (or release_locks());
    a second writer fails in one line naming the holder's pid. Taking it again in one process is a
    no-op."""
    import fcntl
    key = os.path.realpath(out_dir)
    if key in _locks:
        return
    path = os.path.join(out_dir, LOCK)
    made = not os.path.exists(path)
    if not made and os.stat(path).st_nlink > 1:  # (a run copied with hard links shares its
        # .lock: the copy was refused while the original ran, and wrote its pid into it)
        _split_lock(out_dir, path)
    f = open(path, "a+")
    f.made = made  # (release_locks removes it again where it is all this run left)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"{out_dir}: another process (pid {holder}) is writing there; wait for "
                          "it to end or choose another --out")
    try:  # a refused run removes the .lock it made (release_locks): the one locked must be there
        same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except OSError:
        same = False
    if not same:
        f.close()
        raise ConfigError(f"{out_dir}: another process was starting there at the same moment; "
                          "start again")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[key] = f


def _split_lock(out_dir, path):
    """OUT/.lock made a file of its own, under a flock of the folder itself (which no copy shares:
    a folder cannot be hard-linked): two runs starting in one copy each split it, and each locked
    its own file."""
    import fcntl
    folder = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        unshare(path)  # (split already by the other: left as it is)
    finally:
        os.close(folder)  # (and its flock with it)


def release_locks():
    """Drop the locks. A run refused after claiming --out (bad data, a world it cannot use) left
    the folder holding only the .lock it made, or a new empty folder: both are removed again (the
    lock file while still held; the empty folders it made inside first)."""
    _remove_empty(_made_out)
    for key, f in _locks.items():
        try:
            if f.made and os.listdir(key) == [LOCK]:
                os.remove(os.path.join(key, LOCK))
        except OSError:  # (gone, or not ours to clean: leave it)
            pass
        f.close()  # (closing the file drops the flock)
    _locks.clear()
    _remove_empty(_made_out)
    _made_out.clear()


def _remove_empty(folders):
    for path in reversed(folders):  # (deepest first)
        try:
            os.rmdir(path)  # (only while empty)
        except OSError:
            pass


def lock_holder(out_dir):
    """The pid in OUT/.lock while a live process holds its flock (a stage a killed pipeline or lab
    left running goes on writing there), else None."""
    import fcntl
    path = os.path.join(out_dir, LOCK)
    if os.path.realpath(out_dir) in _locks or not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "unknown"
    return None


def run_progress(run_dir):
    """(step, planned max_steps) of a run folder's newest checkpoint, from its config.json; None
    where either is not recorded."""
    ck = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    try:
        with open(os.path.join(ck, "config.json")) as f:
            config = json.load(f)
        step, planned = config["step"], config["run_config"]["max_steps"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    return (step, planned) if isinstance(step, int) and isinstance(planned, int) else None


def holds_run(out_dir):
    """What in OUT shows that a run wrote there (checkpoints, their temp dirs, metrics)."""
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    prefixes = ("checkpoint-", ".tmp-checkpoint-")
    return [n for n in names if n.startswith(prefixes) or n == "metrics.jsonl"]


# the images data.check_images decoded for this run and records (images_fingerprint; not those
# of an input free at --resume: check_images(record=False))
_images_read = set()


def note_images_read(paths):
    _images_read.update(paths)


def images_fingerprint():
    """{"count", "names_sizes"} of the images this run's data files name (those check_images
    decoded and recorded), or None for none: each one's file name and size, as a sorted multiset,
    so a folder moved or copied elsewhere is the same images and one replaced by other pixels
    (another size) is not; one gone (or not a file) counts as size -1. Cheap (one stat each, the
    files just decoded: 118k COCO images, under 0.5 s; their bytes were read once to decode them,
    and reading them again to hash them would double that); an image edited to the very same size
    is not seen."""
    if not _images_read:
        return None
    h = hashlib.sha256()
    for name in sorted(f"{os.path.basename(p)}:{_file_size(p)}" for p in _images_read):
        h.update(f"{name};".encode())
    return {"count": len(_images_read), "names_sizes": h.hexdigest()[:32]}


def _file_size(path):
    """path's size, or -1 where it is no file: one stat (isfile + getsize took two, each a round
    trip on NFS, for every image on rank 0)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def file_digests(paths, as_read=False):
    """{path: sha256 hex} of the data files that exist (a missing one is the reader's error to
    report). as_read: of the bytes this run's readers read, where they read the file (it may have
    changed since: while a run decodes its images, minutes for COCO)."""
    out = {}
    for p in paths:
        if p and os.path.isfile(p):
            path = os.path.abspath(p)
            out[path] = digests_read.get(path) if as_read else None
            if out[path] is None:  # (no reader read it this run)
                with open(p, "rb") as f:
                    out[path] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def claim_out(cfg, d, inits=()):
    """Before anything is read or written (main process): --out writable and locked; a run already
    there is continued only with --resume true (which needs a checkpoint) and replaced only with
    --overwrite true. Under torchrun every rank waits for rank 0's answer: the others went on
    while rank 0 was refused (a locked --out's half-written checkpoints were cleaned away by
    another rank's --resume)."""
    # (a run before it in this process, a test's: not this run's images and files)
    _images_read.clear()
    digests_read.clear()
    if d.world == 1:
        return _claim_out(cfg, inits)
    rank0_lock = main_first(d, lambda: _claim_out(cfg, inits), lambda: lock_seen(cfg.out))
    check_out_shared(cfg, d, rank0_lock)


def main_first(d, work, seen=lambda: None):
    """work() on the main process alone, a refusal of it told to every rank (rank 0 says why; each
    other node's terminal too), and the main process's seen() after it returned on every rank.
    Rank 0 refused alone, the others went on: into the first step's collective, where the other
    nodes learnt of it as gloo's "Connection closed by peer"."""
    refused = None
    if d.main:
        try:
            work()
        except Exception as e:  # (told to the other ranks before it is raised here)
            refused = e
    told = [None if refused is None else str(refused), seen() if d.main else None]
    dist.broadcast_object_list(told, src=0)
    if refused is not None:
        raise refused
    if told[0] is not None:
        refuse_once_per_node(d, f"rank 0: {told[0]}")
    return told[1]


def lock_seen(out_dir):
    """OUT/.lock as this process sees it (its text and modification time), or None. (Opened, not
    stat'ed: NFS checks its cached attributes on open.)"""
    try:
        with open(os.path.join(out_dir, LOCK), "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime_ns
    except OSError:
        return None


def check_out_shared(cfg, d, rank0_lock):
    """Whether every process sees the --out rank 0 claimed (its .lock as rank 0 wrote it): on nodes
    without a shared file system each has a folder of its own. --fsdp is refused there (each rank
    wrote its shards into its own node's folder: rank 0's checkpoint lacked the others' and ended
    with exit 0); a replicated run is written by rank 0 alone, said on the nodes that see none of
    it (load_resume refuses a --resume on nodes without the checkpoint)."""
    sees = [None] * d.world
    dist.all_gather_object(sees, lock_seen(cfg.out) == rank0_lock)
    if all(sees):
        return
    apart = sees.index(False)
    if getattr(cfg, "fsdp", False):
        refuse_once_per_node(d, f"--out {cfg.out}: rank {apart} does not see the folder rank 0 "
                             "writes (the nodes share no file system there): --fsdp writes each "
                             "process's shards into it; give every node one shared --out")
    if d.local_rank == 0 and not sees[d.rank] and not cfg.resume:  # (resume_together: the
        # checkpoint every rank finds, which a copy of the run on each node gives them)
        print(f"note: --out {cfg.out} on this node is not the folder rank 0 writes (no shared file "
              "system): the run is written on rank 0's node alone; copy it to every node's --out "
              "before a --resume", flush=True)


def _claim_out(cfg, inits):
    out, resume, overwrite = cfg.out, cfg.resume, getattr(cfg, "overwrite", False)
    try:  # (a byte that is not UTF-8: the tokenizer's files failed to be written, a traceback)
        out.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"--out {out!r}: not valid UTF-8 (checkpoint files record paths in "
                          "UTF-8 JSON): choose another name") from None
    for init in inits:  # before the out folder or a world is written (both cost time to undo)
        if init and not os.path.isdir(init):
            raise ConfigError(no_dir(init))
        # a run folder still being written: its newest checkpoint is replaced (and removed) as
        # it goes, under this run's load or later under the adapters saved against it
        holder = lock_holder(init) if init else None
        if holder and not os.path.isfile(os.path.join(init, "config.json")):
            raise ConfigError(f"{init}: a process (pid {holder}) is still writing this run "
                              "folder; wait for its run to end, or pass one of its checkpoint-N "
                              "folders copied aside")
    refuse_in_world("--out", out, getattr(cfg, "world", ""), "the run")  # (and --overwrite
    # would move the world away)
    out_real = os.path.realpath(out)
    if resume and overwrite:
        raise ConfigError("--resume true and --overwrite true: choose one (continue the run, or "
                          "replace it)")
    ensure_writable(out)
    lock_out(out)
    found = holds_run(out)
    resumable = latest_checkpoint(out) is not None
    if found and not resume and not overwrite:
        what = ", ".join(found[:3])
        if not resumable:  # (cut off before its first checkpoint: --resume has nothing)
            raise ConfigError(f"{out}: holds a run stopped before its first checkpoint ({what}); "
                              "pass --overwrite true to move it aside and start again, or "
                              "another --out")
        raise ConfigError(f"{out}: holds a run ({what}); pass --resume true to continue it, "
                          "--overwrite true to move it aside and start again, or another --out")
    if resume and not resumable:
        fresh = "drop --resume and pass --overwrite true to move it aside and start again" \
            if found else "run without --resume to start fresh"
        raise ConfigError(f"{out}: --resume true, but there is no checkpoint to resume from "
                          f"({fresh})")
    for f in dataclasses.fields(cfg) if overwrite else ():  # --overwrite would move the inputs
        # of this run away (the checkpoint it starts from, its world or data files)
        value = getattr(cfg, f.name)
        if f.name == "out" or not isinstance(value, str):
            continue
        for path in paths_in_flag(value):
            real = os.path.realpath(path)
            if real == out_real or real.startswith(out_real + os.sep):
                named = "" if path == value else f" ({path})"
                raise ConfigError(f"--{f.name} {value}{named} lies inside --out {out}, which "
                                  "--overwrite true moves aside; copy it elsewhere or choose "
                                  "another --out")


def replace_config(cfg, **changes):
    """dataclasses.replace that keeps the flags parse_config saw typed (refuse_unread reads them;
    a replaced Config had none, and a flag typed at its default was let through again)."""
    out = dataclasses.replace(cfg, **changes)
    if hasattr(cfg, "_given"):
        out._given = cfg._given
    return out


def refuse_unread(cfg, flags, why, runs=(False,)):
    """One line for a flag among `flags` given on the command line, or changed from its default,
    where it is not read (`why` completes '--flag VALUE: not read ...'): it would be ignored
    without a word (a value typed at its default too: its user meant it, unless it is among
    `runs`, what happens anyway: false for off, by default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    given = getattr(cfg, "_given", frozenset())  # (parse_config's; none for a Config built in code)
    for flag in flags:
        value = getattr(cfg, flag)
        # ('' typed asks for none: nothing is left unread; a value in `runs` is what happens)
        typed = flag in given and value not in ("", ()) and \
            not any(value is r or (type(value) is type(r) and value == r) for r in runs)
        if value != defaults[flag] or typed:
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            shown = str(value).lower() if isinstance(value, bool) else shown  # (as it is typed)
            shown = "(a key, not shown)" if flag.endswith("_key") else shown  # (a secret)
            raise ConfigError(f"--{flag} {shown}: not read {why}")


def refuse_unread_shared(cfg, warmups=None):
    """The stages' shared flags that another flag leaves unread: bf16 off the GPU, --save_full
    without --fsdp, LoRA's shape with --lora_r 0 (a full fine-tune), --warmup_from_zero without
    warmup steps (`warmups`: the warmup lengths the run reads, default --warmup's)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if cfg.device != "cuda" and cfg.dtype != "fp32":  # (fp32, typed or not, is what runs)
        refuse_unread(cfg, ["dtype"], f"with --device {cfg.device} (bf16 runs on GPU only); "
                      "drop it")
    if "save_full" in names and not cfg.fsdp:
        refuse_unread(cfg, ["save_full"], "without --fsdp (every checkpoint holds the whole "
                      "model); drop it", runs=())  # (false, 'the last alone', is not what runs)
    if "lora_r" in names and cfg.lora_r == 0:
        lora = [f for f in ("lora_alpha", "lora_dropout", "lora_targets") if f in names]
        refuse_unread(cfg, lora, "with --lora_r 0 (a full fine-tune); drop it")
    if "warmup_from_zero" in names and not any([cfg.warmup] if warmups is None else warmups):
        refuse_unread(cfg, ["warmup_from_zero"], "with --warmup 0 (no warmup step for it to "
                      "change); drop it")


def paths_in_flag(value):
    """The existing paths a flag value names: itself, or the files of a list (`A,B`) whose items
    may carry a weight or a role (`FILE:2`, `FILE:conv`) or a name (`mmhal=FILE`)."""
    pieces = [value] + value.split(",")
    pieces += [p.rsplit(":", 1)[0] for p in pieces] + [p.split("=", 1)[-1] for p in pieces]
    return sorted({p for p in pieces if p and os.path.exists(p)})


@contextmanager
def naming(path):
    """An OSError raised inside that names no file names `path`: a write failing for want of space
    names none, and the user's line would not say which file could not be written."""
    try:
        yield
    except OSError as e:
        # (one without an errno is no system call's: a library's message, a bug's traceback)
        if e.filename is None and e.errno is not None:
            e.filename = path
        raise


def write_json(obj, path, indent=1):
    """path holds the whole of obj or what it held before (write_whole)."""
    write_whole(path, lambda f: json.dump(obj, f, indent=indent))


def pid_alive(pid):
    """Whether a process of this id runs on this machine (someone else's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (someone else's process)
        return True
    return True


def write_whole(path, write, encoding="utf-8", binary=False):
    """write(f) into path.tmpPID, then renamed onto path: path holds all of it or what it held
    before (a disk full, or an error, while writing leaves no half file, nor a temp file). The
    temp file is this process's own: two processes writing one path (two labs' RESULTS.md) each
    rename a whole file; with one shared name each truncated the other's, and one renamed a mix.
    UTF-8 whatever the locale: under an ASCII one (LC_ALL=C without UTF-8 mode) the lab's report
    and its '±' failed at the end of the lab, and every reader here reads UTF-8. binary: f takes
    bytes (a figure, a torch.save)."""
    tmp = f"{path}.tmp{os.getpid()}"
    if os.path.isdir(path):  # (the rename's error named the temp file)
        raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
    try:
        with naming(path):
            with open(tmp, "wb") if binary else open(tmp, "w", encoding=encoding) as f:
                write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename == tmp:  # (the temp file is gone: its path)
            e.filename = path
        raise


def start_writing(cfg, d, data_files=(), model=None, reward_model=None, free_files=()):
    """Once the inputs are checked, just before the first write (main process). --resume: the data
    files must be those the run started on (sha256 in OUT/run.json), and the CLIP folder `model`
    read its vision weights from (--vision_tower, or the one its checkpoint names) must hold the
    weights it held then (tensors_fingerprint), and the images the data names must be those it named
    then (images_fingerprint). --overwrite true: a run already in --out is moved aside in one
    rename (kept, never deleted). A fresh run records its data files' digests, its images'
    fingerprint and that CLIP's (ppo.py: its `reward_model`'s CLIP too, where that is another
    model). free_files: files a run recorded with its data before 2026-12-06 that may change at
    --resume now (vigc's --images list): left out of the comparison."""
    # (each node's local rank 0 reads its node's files: the other ranks there see the same)
    digests = file_digests(data_files, as_read=True) if d.local_rank == 0 else None
    if d.world == 1:
        return _start_writing(cfg, digests, model, reward_model, free_files)
    same_data_on_every_node(digests, d)
    main_first(d, lambda: _start_writing(cfg, digests, model, reward_model, free_files))


def _start_writing(cfg, digests, model, reward_model=None, free_files=()):
    out = cfg.out
    run_file = os.path.join(out, RUN_FILE)
    # the CLIP folder each model read its vision weights from (None: the checkpoint's own)
    clips = {"clip_tensors": getattr(model, "clip_dir", None),
             "reward_clip_tensors": getattr(reward_model, "clip_dir", None)
             if reward_model is not model else None}
    clip_prints = {k: tensors_fingerprint(clip) for k, clip in clips.items() if clip}
    images = images_fingerprint()
    if cfg.resume and os.path.exists(run_file):
        try:
            with open(run_file) as f:
                run = json.load(f)
            was = run["data"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{run_file}: cannot read ({type(e).__name__}); it records the run's "
                              "data files")
        for key, clip in clips.items():
            # (a folder replaced since: the rest of the run read another CLIP without a word;
            # runs from before it was recorded: not checked; before 2026-12-06 the files'
            # base_fingerprint, which a CLIP converted to other files fails. Another
            # --vision_tower is refused before, with the config)
            if clip and key in run:
                same = run[key] == clip_prints[key]
            elif clip and key == "clip_tensors" and "clip_fingerprint" in run:
                same = run["clip_fingerprint"] == base_fingerprint(clip)
            else:
                continue
            if not same:
                flag = f"--reward {cfg.reward}: its CLIP " if key == "reward_clip_tensors" else \
                    "--vision_tower " if getattr(cfg, "vision_tower", "") else ""
                raise ConfigError(f"{flag}{clip}: other CLIP weights than this run started "
                                  f"with (replaced since: the fingerprint in {run_file} "
                                  "differs); put those back, or start a new run")
        if not isinstance(was, dict) or not all(isinstance(v, str) for v in was.values()):
            raise ConfigError(f"{run_file}: field 'data': expected an object {{file: sha256}} (it "
                              "records the run's data files)")
        free = {os.path.abspath(p) for p in free_files}
        was = {path: digest for path, digest in was.items() if path not in free}
        # (each file's contents in its place: both are in the run's order of its data files)
        moved = was != digests and list(was.values()) == list(digests.values())
        if moved:  # (the same files' contents, the folder moved or mounted elsewhere)
            print(f"note: --resume: the run's data files are read from other paths now (the same "
                  f"contents, sha256): {', '.join(sorted(set(digests) - set(was)))}")
        for path in sorted(set(was) | set(digests)) if not moved else ():
            if was.get(path) != digests.get(path):
                if path not in digests:
                    how = "is not part of it now"
                elif path not in was:
                    how = "was not part of it"
                else:
                    how = "changed since the run started (sha256 differs)"
                raise ConfigError(f"{path}: --resume on other data: this file {how}; resume with "
                                  "the data the run started on, or start a new run")
        images_was = run.get("images")  # (a run recorded before 2026-12-06: not checked)
        if images_was is not None and images_was != images:
            now = images["count"] if images else 0
            then = images_was.get("count") if isinstance(images_was, dict) else "?"
            raise ConfigError(f"--resume on other images: the {now} images the data files name "
                              f"are not the {then} the run started on (their names or sizes "
                              f"differ from {run_file}'s 'images'); put those back, or start a "
                              "new run")
    if getattr(cfg, "overwrite", False) and holds_run(out):
        real = os.path.normpath(out)
        if os.path.islink(real):  # (the folder: a link (to /scratch) stays one, to a new folder)
            real = os.path.realpath(real)
        aside = f"{real}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            os.rename(real, aside)  # the one atomic step: the old run is whole under its new name
        except OSError as e:  # (a name near 255 bytes: the line said "File name too long" of OUT)
            raise ConfigError(f"--overwrite: cannot move the run in {out} aside to {aside} "
                              f"({e.strerror}); it is as it was: move it yourself, or choose "
                              "another --out") from None
        old_lock = _locks.pop(os.path.realpath(out))
        os.makedirs(real)
        lock_out(out)
        old_lock.close()
        print(f"--overwrite: the previous run in {out} is now {aside} (delete it when it is no "
              "longer needed)")
    if not cfg.resume:  # (and the checkpoint --init stood for: --resume keeps to it, and its
        # weights' fingerprint: check_base_unchanged)
        init = getattr(cfg, "init", "")
        record = {"init": os.path.abspath(resolve_checkpoint(init))} if init else {}
        record.update(clip_prints)
        try:
            record.update({"init_fingerprint": init_fingerprint(init)} if init else {})
        except (CheckpointError, OSError):  # (a layout without weight files of its own: none)
            pass
        record.update({"images": images} if images else {})
        write_json({"data": digests, **record}, run_file, indent=2)


def same_data_on_every_node(digests, d):
    """Every node's data files hold rank 0's contents (sha256, in the order of the flags that name
    them). On nodes without a shared file system each reads its own copy: a copy that differed
    trained its ranks' share of every batch on other records, without a word (run.json recorded
    rank 0's)."""
    every = [None] * d.world
    dist.all_gather_object(every, digests)
    ours = list(every[0].items())
    for rank, theirs in enumerate(every):
        if theirs is None:
            continue
        theirs = list(theirs.values())
        for i, (path, digest) in enumerate(ours):
            if i >= len(theirs) or theirs[i] != digest:
                path = list(digests or {path: 0})[i]  # (as this node names it: its local rank 0's)
                refuse_once_per_node(d, f"{path}: other contents on rank {rank}'s node than on "
                                     "rank 0's (sha256 differs): every node must read the same "
                                     "data files (copy them alike, or share one file system)")


def data_specs(value, weighted=False):
    """--data FILE[:x],FILE[:x] -> [(path, x or '')]. An item that is an existing file is a path as
    a whole (so a path may hold ':'); otherwise what follows its last ':' is x. Items are read
    left to right, each the longest run of ','-joined pieces that names an existing file (with or
    without its ':x'), so a path may hold ',' in a list too; an item naming no file is one piece
    (its reader says "not found"). weighted: x is a weight (sft.py), which the refusal of a file
    named twice points at (in vigc.py x is a type: FILE:2 would mislead)."""
    pieces = value.split(",")
    out, i = [], 0
    while i < len(pieces):
        if not pieces[i].strip():  # ('' would read as the file '', "file not found" naming nothing)
            raise ConfigError(f"--data {value!r}: an empty file name (give FILE[:x],FILE[:x])")
        for j in range(len(pieces), i, -1):
            item = ",".join(pieces[i:j])
            path, _, x = item.rpartition(":")
            if os.path.isfile(item):
                out.append((item, ""))
                break
            if path and "," not in x and os.path.isfile(path):
                out.append((path, x))
                break
        else:  # no run of pieces names a file: this piece alone, as given
            j = i + 1
            item = pieces[i]
            path, _, x = item.rpartition(":")
            out.append((item, "") if os.path.exists(item) or ":" not in item else (path, x))
        i = j
    for k, (path, _) in enumerate(out):  # (read twice, its records counted twice, unsaid)
        was = next((p for p, _ in out[:k] if p == path or samefile(p, path)), None)
        if was is not None:
            same = "is named twice" if was == path else f"is {was}, named before it"
            hint = " (sft.py reads one twice as FILE:2)" if weighted else ""
            raise ConfigError(f"--data {value!r}: {path} {same}: its records would be read twice; "
                              f"name each file once{hint}")
    return out


def rng_state(generators=None):
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # (this process's device alone: a resume may see fewer)
        state["cuda"] = torch.cuda.get_rng_state()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def set_rng_state(state, generators=None):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # (saved before 2026-12-05: every visible device's;
            # set_rng_state_all raised an IndexError on a machine that sees fewer)
            i = torch.cuda.current_device()
            cuda = cuda[i] if i < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def save_checkpoint(model, out_dir, step, run_config, optimizer=None, tokenizer=None, base=None,
                    generators=None, extra_state=None, keep=2, d=None, full=None):
    """Write OUT/checkpoint-{step}: model files (+ tokenizer) and trainer_state.pt (optimizer, step,
    RNG, run config). Written into a temp dir and renamed; older checkpoints beyond `keep` removed.
    Replicated: only the main process writes; all processes wait for it. Under FSDP see
    _save_sharded. A model whose base weights changed since they were loaded (a PEFT adapter's
    vision or projector LoRA merged in) is written whole: `base` no longer holds its weights."""
    if getattr(model, "base_edited", False):
        base = None
    if d is not None and d.fsdp:
        return _save_sharded(model, out_dir, step, run_config, optimizer, tokenizer, base,
                             generators, extra_state, keep, d, full)
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    ranks_rng = None  # every rank's random streams (each draws its own LoRA dropout masks)
    if d is not None and d.world > 1:
        ranks_rng = [None] * d.world if d.main else None
        dist.gather_object(rng_state(generators), ranks_rng, dst=0)
    tmp, failed = os.path.join(out_dir, f".tmp-checkpoint-{step:06d}-{os.getpid()}"), None
    if d is None or d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        cfg = _config_dict(run_config)
        try:
            # base is stored relative to the checkpoint, so a moved ckpt/ tree keeps working
            save_checkpoint_files(model, tmp, base=base,
                                  extra_config={"step": step, "run_config": cfg})
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            state = {"format_version": FORMAT_VERSION, "step": step, "run_config": cfg,
                     "optimizer": optimizer.state_dict() if optimizer is not None else None,
                     "rng": rng_state(generators), "rng_ranks": ranks_rng,
                     "world": d.world if d is not None else 1, "extra": extra_state or {}}
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        except Exception as e:  # (a full disk: torch's and safetensors' own errors, a traceback)
            failed = e
    agree_written(failed, tmp, out_dir, final, d)
    _commit(tmp, final, out_dir, keep, d)
    return final


def write_failure(error, out_dir, what):
    """A user's error for a checkpoint that could not be written for want of space (or a failing
    disk, or a file-size limit): OSError's ENOSPC, EDQUOT, EIO or EFBIG, or the same in torch's and
    safetensors' own errors, which carry no errno; or for want of permission (EACCES, EPERM,
    EROFS). Anything else is raised as it was."""
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG) or \
            "os error 36" in text:  # (safetensors' own error: an --out near PATH_MAX)
        return CheckpointError(f"{out_dir}: cannot write {what} (File name too long: a path "
                               "inside it is past the system's limit); nothing of it was kept: "
                               "choose a shorter --out")
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CheckpointError(f"{out_dir}: cannot write {what} ({error.strerror}: "
                               f"{error.filename or out_dir}); nothing of it was kept, what was "
                               "written before is: make the folder writable and run again "
                               f"({RESUME_IF_SAVED})")
    full = isinstance(error, OSError) and \
        error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)
    signs = ("No space left", "os error 28", "os error 27", "File too large", "Disk quota",
             "iostream error", "unexpected pos", "file write failed")
    if not full and not any(sign in text for sign in signs):
        raise error
    try:
        free = f"{shutil.disk_usage(out_dir).free / 2 ** 20:.0f} MB free there"
    except OSError:
        free = "its free space unknown"
    first = text.strip().splitlines()[0][:120] if text.strip() else type(error).__name__
    return CheckpointError(f"{out_dir}: cannot write {what} ({first}; {free}); nothing of it "
                           "was kept, what was written before is: free some space (or mend the "
                           f"disk) and run again ({RESUME_IF_SAVED})")


def _config_dict(run_config):
    """The run config as a checkpoint records it; a run on a Shapes world also records a digest of
    its world.json (seed, format, parameters, statistics: the same bytes when written again with
    them), so a world rewritten since with other parameters is noticed (note_world)."""
    is_dataclass = dataclasses.is_dataclass(run_config)
    cfg = dataclasses.asdict(run_config) if is_dataclass else dict(run_config)
    digest = world_digest(cfg["world"]) if isinstance(cfg.get("world"), str) else None
    if digest:
        cfg["world_digest"] = digest
    return cfg


def world_digest(world):
    """A digest of the world's world.json, or None where there is none."""
    try:
        with open(os.path.join(world, "world.json"), "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:16]
    except OSError:
        return None


def rewritten_world(ckpt_dir, world):
    """The recorded world path when the checkpoint was trained on `world` and that folder has been
    written again since with other parameters (its world.json differs from the one recorded), else
    None (another world, not recorded, or the same)."""
    rc = recorded_run_config(ckpt_dir)
    if not isinstance(rc.get("world"), str):
        return None
    same_folder = os.path.realpath(rc["world"]) == os.path.realpath(world)
    now = world_digest(world)
    stale = same_folder and rc.get("world_digest") not in (None, now) and now is not None
    return rc["world"] if stale else None


def other_world(ckpt, world):
    """(kind, why) where the checkpoint `ckpt` was not trained on the Shapes world in `world` as it
    is now, else None: 'rewritten' (that folder written again since with other parameters) or
    'elsewhere' (another world folder with other contents; a copy of the same world is the same
    world, and a world not written yet here is the same folder to be written again)."""
    if rewritten_world(ckpt, world):
        return "rewritten", (f"was trained on {world} before it was written again with other "
                             "parameters (its world.json differs from the one recorded)")
    rc = recorded_run_config(ckpt)
    now = world_digest(world)
    elsewhere = isinstance(rc.get("world"), str) and \
        os.path.realpath(rc["world"]) != os.path.realpath(world)
    if rc.get("world_digest") not in (None, now) and (now is not None or elsewhere):
        return "elsewhere", (f"was trained on the world in {rc.get('world')}, not on --world "
                             f"{world} (their world.json differ)")
    return None


def refuse_torchrun(script, why):
    """A script that runs in one process, started by torchrun: rank 0 says so once, the others
    leave quietly (they were refused by rank 0's lock on --out, naming its pid)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    global _runs_alone
    _runs_alone = True  # (no rank waits for another: nothing to tell them)
    if int(os.environ.get("RANK", "0")) != 0:
        raise SystemExit(2)
    raise ConfigError(f"{script} runs in one process ({why}): run it with python, not torchrun")


def refuse_in_world(flag, path, world, what="it"):
    """An output inside the --world folder: written among the world's files (which shapes.py then
    refuses to write again)."""
    if not (world and path):
        return
    real, world_real = os.path.realpath(path), os.path.realpath(world)
    if real == world_real:
        raise ConfigError(f"{flag} {path} is the --world folder: {what} would be written among "
                          f"the world's files; choose another {flag}")
    if real.startswith(world_real + os.sep):
        raise ConfigError(f"{flag} {path} lies inside the --world folder {world}: {what} would be "
                          f"written among the world's files; choose another {flag}")


def note_world(flag, path, world):
    """A note where --init/--ckpt was trained on this --world folder before it was written again
    with other parameters: its answers are then judged against, or trained on, another world; and
    where it names a run folder whose run stopped before its last step (its newest checkpoint is
    taken: not the model the run was to make). world None: the second note alone (a run that reads
    no Shapes world)."""
    if path and world and rewritten_world(resolve_checkpoint(path), world):
        print(f"note: {flag} {path} was trained on {world} before it was written again with "
              "other parameters (its world.json differs from the one recorded): this run reads "
              "the world as it is now", flush=True)
    progress = None
    if path and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        progress = run_progress(path)  # (a run folder, not a checkpoint picked by hand)
    holder = lock_holder(path) if progress else None
    if progress and holder:  # (eval of a run as it trains: its newest checkpoint now)
        print(f"note: {flag} {path}: its run is still being written (pid {holder}, at step "
              f"{progress[0]} of {progress[1]}); its newest checkpoint now is read (and may be "
              "removed by its run meanwhile)", flush=True)
    elif progress and progress[0] < progress[1]:
        # (a run resumed there later removes that checkpoint, which adapters saved against it
        # name as their base)
        print(f"note: {flag} {path}: its run stopped at step {progress[0]} of {progress[1]} "
              "(unfinished); its newest checkpoint is read (resuming that run later may remove "
              "it: copy it aside to keep what is made from it)", flush=True)


def _commit(tmp, final, out_dir, keep, d):
    """fsync the temp dir and rename it to its final name (the one atomic step) on the writing
    process, every process stopping with one line where that fails (rank 0 stopping alone left the
    others waiting at the next barrier); then drop old checkpoints."""
    failed = None
    if d is None or d.main:
        try:
            _fsync_dir(tmp)
            _swap_in(tmp, final)
        except OSError as e:
            failed = e
    agree_written(failed, tmp, out_dir, final, d)
    if d is None or d.main:
        _drop_old_checkpoints(out_dir, keep)
    if d is not None and d.world > 1:
        dist.barrier()


def agree_written(failed, tmp, out_dir, final, d):
    """Raise write_failure's line where this process (or, several processes: any) failed, the
    temp folder removed (a temp file: by the caller, as dpo's reference cache)."""
    if d is not None and d.world > 1:
        _stop_together(failed, tmp, out_dir, final, d)
    elif failed is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(failed, out_dir, os.path.basename(final)) from None


def _drop_old_checkpoints(out_dir, keep):
    """Keep the newest `keep` complete checkpoints and every one that ended a run. One that cannot
    be removed is a note: the new checkpoint is written, the run goes on."""
    old = complete_checkpoints(out_dir)  # (keep counts complete ones)
    for n in old[:-keep] if keep > 0 else []:
        if _ended_a_run(os.path.join(out_dir, n)):
            continue
        try:
            _discard(os.path.join(out_dir, n))
        except OSError as e:
            print(f"note: {out_dir}: could not remove the older {n} ({e.strerror or e}); "
                  "it stays", flush=True)


def _ended_a_run(path):
    """Whether a checkpoint was the last of a finished run (its step is its run's max_steps): a run
    resumed for more steps keeps it, as other runs name it as their base (a reward model, a DPO
    or --export adapter run from this SFT) and would no longer load."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        return cfg["step"] == cfg["run_config"]["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _trash(path):
    """Where a checkpoint directory goes before it is deleted (a name load_resume clears)."""
    name = f".tmp-checkpoint-discard-{os.path.basename(path)}-{os.getpid()}"
    return os.path.join(os.path.dirname(path), name)


def _discard(path):
    """Delete a checkpoint directory after renaming it to a temp name (one atomic step): a kill
    during the deletion never leaves a checkpoint-N that looks complete (has config.json) but is
    not."""
    os.rename(path, _trash(path))
    shutil.rmtree(_trash(path), ignore_errors=True)


def _swap_in(tmp, final):
    """Rename tmp to final; a final already there (the same step saved again, e.g. the last save)
    is put back where the rename fails (deleted first, a failing rename lost both)."""
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    os.rename(final, _trash(final))
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(_trash(final), final)
        raise
    shutil.rmtree(_trash(final), ignore_errors=True)


def _fsync_dir(path):
    for folder, _, names in os.walk(path):  # (FSDP checkpoints hold a shards/ folder)
        for n in names:
            with open(os.path.join(folder, n), "rb") as f:
                os.fsync(f.fileno())


def load_resume(out_dir, run_config, free=()):
    """The newest checkpoint in OUT and its trainer state, after checking that the run config is the
    same (except fields that do not change the math, and the script's `free` ones: vigc's
    generation settings). None if there is none. The random streams
    are left as --seed set them (building the model draws from them, as at the start):
    `restore` sets the checkpoint's once the model is built. Under torchrun every process must
    resume from the same checkpoint (resume_together)."""
    found, refused = (None, None), None
    try:
        found = _load_resume(out_dir, run_config, free)
    except USER_ERRORS as e:
        refused = e
    resume_together(out_dir, found[0], refused)
    return found


def resume_together(out_dir, path, refused):
    """Every rank goes on from the same checkpoint, or every rank stops, one line a node. Nodes with
    an --out of their own (no shared file system) found none, or an older copy: they started again
    from step 0 beside rank 0's resumed run and hung in a collective once their steps parted; a
    refusal on one node left the others in a collective (a gloo traceback)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if refused is not None:
            raise refused
        return
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    every = [None] * dist.get_world_size()
    name = os.path.basename(path) if path else None
    dist.all_gather_object(every, (rank - local, None if refused is None else str(refused), name))
    stopped = [(r, node, text) for r, (node, text, _) in enumerate(every) if text is not None]
    here = [r for r, node, _ in stopped if node == rank - local]
    if here and here[0] == rank:  # (the first rank of its node that could not: its own line)
        raise refused
    if stopped:
        if not here and local == 0:
            fail(f"rank {stopped[0][0]}: {stopped[0][2]}")
        raise SystemExit(2)
    apart = next((r for r, (_, _, n) in enumerate(every) if n != every[0][2]), None)
    if apart is not None:
        def what(n):
            return f"resumes from {n}" if n else "finds no checkpoint there"
        message = (f"{out_dir}: --resume: rank 0 {what(every[0][2])}, rank {apart} "
                   f"{what(every[apart][2])}: every node must see the run's --out (one shared "
                   "file system, or a copy of the run on each node)")
        if local == 0:
            fail(message)
        raise SystemExit(2)


def _load_resume(out_dir, run_config, free):
    for n in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        has_config = os.path.exists(os.path.join(out_dir, n, "config.json"))
        # (a cut write of ours holds files alone: checkpoint-best/ of a user's, or checkpoint-N/
        # holding a folder, a run written there by another stage, were deleted with all they
        # held; an FSDP one cut with its shares/ is kept, never loaded without its config.json)
        incomplete = (checkpoint_step(n) is not None and not has_config
                      and os.path.isdir(os.path.join(out_dir, n))
                      and not any(e.is_dir() for e in os.scandir(os.path.join(out_dir, n))))
        # a checkpoint whose writing (or deletion) was cut off
        if n.startswith(".tmp-checkpoint-") or incomplete:
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
    path = latest_checkpoint(out_dir)
    if path is None:
        return None, None
    file = os.path.join(path, "trainer_state.pt")
    # mapped where the optimizer lives on a GPU: a full fine-tune's AdamW moments were read whole
    # onto the host on their way there, 28 GB at 7B in bf16. Read whole on the CPU: the moments
    # would be the mapping itself (copy-on-write), keeping the file's disk space held after
    # checkpoint rotation deleted it, for the rest of the run
    mapped = getattr(run_config, "device", "cpu") != "cpu"
    # (torch.save writes a zip archive, and mapped an empty or cut file was "mmap can only be
    # used with files saved with torch.save(..., _use_new_zipfile_serialization=True)")
    if os.path.isfile(file) and not zipfile.is_zipfile(file):
        raise CheckpointError(f"{file}: truncated or corrupt (not the zip archive torch.save "
                              "writes): move the checkpoint away and --resume takes the one "
                              "before it")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False, mmap=mapped)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read trainer state ({type(e).__name__}: {e})")
    if mapped and isinstance(state, dict):  # (all but the moments copied out: a random stream
        # kept by the run held the whole file mapped; restore() lets the moments go)
        state = {k: v if k == "optimizer" else copy.deepcopy(v) for k, v in state.items()}
    needed = {"format_version", "step", "run_config", "rng"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{file}: not a factalign trainer state (expected format_version, "
                              "step, run_config, rng)")
    if state["format_version"] != FORMAT_VERSION:
        relation = "is newer than" if _newer(state["format_version"]) else "differs from"
        raise CheckpointError(f"{file}: format_version {state['format_version']!r} {relation} "
                              f"the {FORMAT_VERSION} this code reads; resume with the factalign "
                              "version that wrote it")
    now = dataclasses.asdict(run_config)
    was = dict(state["run_config"])
    for k, v in ADDED_FIELDS.items():
        if k in now and k not in was:
            v = v(was) if callable(v) else v
            was[k] = v.replace(WORLD, str(was.get("world", ""))) if isinstance(v, str) else v
    # fields this script has that the run's config lacks: another stage wrote it (a field that
    # differs would name one of them, which says nothing about what went wrong)
    free = RESUME_FREE_FIELDS | set(free)
    absent = [k for k in now if k not in free and k not in was]
    if absent:
        fields = ", ".join(map(repr, absent[:3])) + (", ..." if len(absent) > 3 else "")
        raise ConfigError(f"{path}: --resume: this run's config lacks this script's field"
                          f"{'s' if len(absent) > 1 else ''} {fields}: another stage or an older "
                          "factalign wrote it; resume with the stage and version that wrote it, "
                          "or pass another --out")
    diff = [k for k in now if k not in free and _norm(now[k], k) != _norm(was.get(k), k)]
    # (a --world moved or renamed: its '{world}/...' paths differ too, and sft's and vigc's
    # --tokenizer came first, naming a flag that was not given)
    diff.sort(key=lambda k: k != "world")
    if diff:
        k = diff[0]
        why = RESUME_WHY.get(k, "")
        raise ConfigError(f"{path}: --resume with a different config: field '{k}' was "
                          f"{was.get(k)!r}, now {now[k]!r}{why}")
    if rewritten_world(path, now.get("world", "")):  # (the rest of the run would read another)
        raise ConfigError(f"{path}: --resume: {now['world']} was written again with other "
                          "parameters since this run started (its world.json differs from the "
                          "one recorded); start again with --overwrite true, or pass the world "
                          "it was trained on")
    max_steps, planned = now.get("max_steps"), was.get("max_steps")
    if isinstance(planned, int) and isinstance(max_steps, int) and max_steps != planned and \
            int(os.environ.get("RANK", "0")) == 0:  # (the cosine schedule is over max_steps)
        print(f"note: --resume with --max_steps {max_steps}, the run planned {planned}: the "
              f"learning-rate schedule stretches from step {state['step']} on, so the run "
              "matches neither a run of one plan nor of the other", flush=True)
    accum, was_accum = now.get("grad_accum"), was.get("grad_accum")
    if None not in (accum, was_accum) and accum != was_accum and \
            int(os.environ.get("RANK", "0")) == 0:
        print(f"note: --resume with --grad_accum {accum}, the run had {was_accum}: the same global "
              "batches in other micro-batches, summed in another order: not bitwise the run that "
              "was not stopped", flush=True)
    if isinstance(max_steps, int) and state["step"] > max_steps:  # (it would train nothing)
        raise ConfigError(f"{path}: --resume: the run is at step {state['step']}, past --max_steps "
                          f"{max_steps}; give --max_steps {state['step']} or more")
    return path, state


def _newer(version):
    return isinstance(version, int) and version > FORMAT_VERSION


# the fields that name files or folders (a run's other strings are choices)
PATH_FIELDS = {"world", "init", "data", "val_data", "align_data", "read_data", "tokenizer",
               "image_folder", "captions", "reward", "vision_tower", "policy_lora",
               "import_llava_rlhf", "instructions", "images"}


def _norm(v, field=None):
    """A config value as compared on --resume: a path spelled otherwise (`w/`, `./w`, `w//x`, the
    absolute path) is the same path; not through links (one may point elsewhere since)."""
    if field in PATH_FIELDS and isinstance(v, str) and v:
        return os.path.normpath(os.path.abspath(v))
    return list(v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------------------
# FSDP2 (--fsdp true): full-parameter training that does not fit one GPU. Each CLIP layer, each
# decoder layer and the root (embeddings, projector, final norm, lm_head, scalar heads) is one unit;
# its parameters, gradients and AdamW moments live 1/world on each rank, and its whole weights are
# all-gathered just before it runs and freed after it (forward and backward), as DeepSpeed ZeRO-3,
# which LLaVA's own recipe uses. Checkpoints: each rank writes its shards
# (torch.distributed.checkpoint) into the temp dir that is renamed as a whole; the final one also
# holds the whole model.
# ----------------------------------------------------------------------------------------

SHARDS = "shards"  # the torch.distributed.checkpoint folder inside an FSDP checkpoint-N/

# our callers never modify a model output in place, which is all this warning is about
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def load_device(cfg, d):
    """Where a stage builds its model: a checkpoint on the CPU under --fsdp (fully_shard moves each
    unit's weights to the GPU as it shards them, one unit whole at a time; loaded there first,
    every GPU held the whole fp32 model: 28 GB at 7B, 52 at 13B), else on the run's device (a
    fresh model too: its weights drawn where a run without --fsdp draws them)."""
    return torch.device("cpu") if cfg.fsdp and cfg.init else d.device


def shard_model(model, d, bf16=False):
    """fully_shard each vision and decoder layer, then the root. Call after adapters, heads and
    set_trainable, before make_optimizer (the optimizer must see the sharded parameters). bf16
    (GPU): compute in bf16 on all-gathered copies, fp32 master weights and optimizer state, fp32
    reduce-scatter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    mesh = init_device_mesh(d.device.type, (d.world,))
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    units = (list(model.vision_tower.encoder.layers) + list(model.language_model.layers)
             + list(model.heads.values()))
    for unit in units:  # (a scalar head too: score_sequences calls it outside forward())
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # the root keeps its gathered weights from forward to backward (FSDP's default; so
    # encode_images and logits, called inside forward too, do not free them mid-forward). After a
    # no_grad pass nothing frees them: resharded() puts the shards back before the optimizer or a
    # checkpoint looks at the parameters.
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # SUM, not FSDP's default mean: our losses are divided by global counts already
    for unit in units + [model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    # called outside forward(): they too must all-gather the root
    for name in ("encode_images", "logits"):
        register_fsdp_forward_method(model, name)
    model.encode_every_batch = True  # (a text-only micro-batch on one rank: see LLaVA.embed)
    return model


def resharded(model):
    """The model with its root's shards registered again (FSDP; a plain model as it is)."""
    if hasattr(model, "reshard"):
        model.reshard()
    return model


def rank_chunks(n, batch_size, d):
    """This rank's share of range(n) (rank::world) in chunks of batch_size, each with whether it
    counts. Under FSDP every forward pass all-gathers weights, so every rank must run as many as the
    others: a rank with fewer chunks runs its first one again and discards the result (counts
    False)."""
    mine = list(range(n))[d.rank::d.world]
    chunks = [(mine[s:s + batch_size], True) for s in range(0, len(mine), batch_size)]
    if d.fsdp and n:
        most = math.ceil(math.ceil(n / d.world) / batch_size)  # rank 0 holds ceil(n / world) items
        chunks += [(chunks[0][0] if chunks else [0], False)] * (most - len(chunks))
    return chunks


def recorded_init(run):
    """The --init a training run recorded in its run.json (None: not recorded)."""
    path = os.path.join(run, RUN_FILE)
    try:
        with open(path) as f:
            init = json.load(f).get("init")
    except (OSError, ValueError, AttributeError):
        return None
    if init is not None and not isinstance(init, str):  # (a hand edit: a TypeError where read)
        raise ConfigError(f"{path}: field 'init': expected the path of the checkpoint the run "
                          "started from")
    return init


def trained_base(resume_path, init, loads_adapters=False):
    """The checkpoint --init stands for in this run: on --resume, the base the run's adapters were
    trained on (the resumed checkpoint's 'base'; a full model: the --init run.json recorded), not
    --init's newest checkpoint-N: a run folder given as --init may have grown one since, and the
    adapters (a full DPO run: its reference) would move onto other weights. loads_adapters: the
    stage loads the resumed checkpoint itself (its adapters through their own 'base'); else the
    resumed run is built from the base returned, which must hold the weights the run started
    from (check_base_unchanged)."""
    base = _trained_base(resume_path, init, loads_adapters)
    if resume_path and not loads_adapters:
        check_base_unchanged(resume_path, base, init)
    return base


def _trained_base(resume_path, init, loads_adapters):
    now = resolve_checkpoint(init)
    if not resume_path:
        return now
    was = recorded_base(resume_path)
    # (an adapter checkpoint loaded as such whose base is gone: its load says so, and the run
    # does not resume on --init, as the note said before it)
    loads_adapters = loads_adapters and was is not None
    if was is None:  # a full model: the --init its run started from (run.json; older runs: none)
        was = recorded_init(os.path.dirname(resume_path))
    if not was:
        return now
    main = int(os.environ.get("RANK", "0")) == 0  # (said once under torchrun)
    if not os.path.exists(was):  # (a moved project: run.json's absolute path; not --init's change)
        if main and not loads_adapters:
            print(f"note: {was}, the base this run recorded, is not there (moved?): resuming on "
                  f"--init {init} ({now})", flush=True)
        return now
    if os.path.realpath(was) != os.path.realpath(now) and main:
        print(f"note: --init {init} now holds {now}; resuming on {was}, what this run was "
              "trained from", flush=True)
    return was


def check_base_unchanged(resume_path, base, init):
    """--resume building the model from `base` (the checkpoint --init stood for) rather than from
    the checkpoint resumed (FSDP shards hold the trained weights alone; ppo restores its adapters
    onto it): refused where `base` holds other weights than the run recorded (the checkpoint's
    'base_fingerprint', and run.json's 'init_fingerprint', which covers the adapters of a LoRA
    --init as well; neither in older runs: not checked). An --init retrained or replaced at its
    path went on as the run's frozen weights."""
    recorded = ((os.path.join(resume_path, "config.json"), "base_fingerprint",
                 lambda: base_fingerprint(base_weights_dir(base))),
                (os.path.join(os.path.dirname(resume_path), RUN_FILE), "init_fingerprint",
                 lambda: init_fingerprint(base)))
    for path, key, now in recorded:
        try:
            with open(path) as f:
                saved = json.load(f).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if saved is not None and saved != now():
            raise ConfigError(f"--init {init}: {base} holds other weights than this run started "
                              "from (retrained or replaced at its path since: its fingerprint "
                              "differs from the one the run recorded); put those back, or start a "
                              "new run")


def fold_init_adapters(model):
    """A run started from a checkpoint with adapters trains the policy it holds: its active
    adapter merged into the base (e.g. POVID stage 2 from a LoRA stage-1 run), every adapter
    dropped; the run adds its own from its flags. (A new adapter beside it left it off: the bare
    base was trained; one of the run's name was taken over with its old shape.) True when one
    was merged."""
    merged = model.active_adapter is not None
    if merged:
        model.merge_adapter(model.active_adapter)
    for name in list(model.adapters):
        model.delete_adapter(name)
    return merged


def recorded_run_config(ckpt_dir):
    """The run config a checkpoint of ours records, or {} (not ours, or no config: loading says
    what is wrong)."""
    try:
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            rc = json.load(f).get("run_config")
    except (OSError, ValueError, AttributeError):
        return {}
    return rc if isinstance(rc, dict) else {}


def note_template(flag, path, template):
    """A note where a checkpoint of ours was trained with another --template than this run
    prompts it with (its answers, rewards and log-probabilities are then of another prompt
    format; sometimes meant, as LLaVA-RLHF evaluating with llava_v1)."""
    trained = recorded_template(resolve_checkpoint(path)) if path else None  # ('': a fresh model)
    if trained is not None and trained != template:
        print(f"note: {flag} {path} was trained with --template {trained}; this run prompts it "
              f"with --template {template} (pass --template {trained} to prompt it as trained)",
              flush=True)


def recorded_base(ckpt_dir):
    """The frozen base a checkpoint's adapters sit on, as its config.json names it (relative to
    the checkpoint); None for a full model."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        recorded = json.load(f).get("base")
    return os.path.normpath(os.path.join(ckpt_dir, recorded)) if recorded else None


def sharded_resume(resume_path, d):
    """Whether --resume loads FSDP shards: then the model is built from --init (or fresh) as at the
    start, sharded, and restore() loads the shards into it. (A final LoRA-merged model has no
    shards: loaded whole.)"""
    return bool(resume_path) and d.fsdp and os.path.isdir(os.path.join(resume_path, SHARDS))


def restore(model, opt, path, state, d, what="the other ranks' random streams",
            generators=None):
    """Continue where the checkpoint being resumed left off: the optimizer state, this rank's
    random streams and the stage's own `generators` (set here, after the model was built from
    --seed's streams as at the start); under FSDP also the model's and optimizer's shards.
    `what`: what starts again on another number of processes (note_other_world)."""
    if not sharded_resume(path, d):
        # (popped: the moments read from a mapped trainer_state.pt, kept in `state`, held the
        # file mapped for the whole run, its disk space held after rotation deleted it)
        moments = state.pop("optimizer", None)
        if moments is not None:
            opt.load_state_dict(moments)
            if d.device.type != "cpu":  # (what the optimizer keeps on the host, AdamW's step,
                # was still the mapped file's, and held all of it mapped: copied out)
                for s in opt.state.values():
                    s.update({k: v.clone() for k, v in s.items()
                              if torch.is_tensor(v) and v.device.type == "cpu"})
        # each rank its own (rank 0's alone changed the other ranks' LoRA dropout masks), rank
        # 0's on another number of processes
        ranks = state.get("rng_ranks")
        note_other_world(state.get("world", len(ranks) if ranks else None), d, what)
        set_rng_state(ranks[d.rank] if ranks and len(ranks) == d.world else state["rng"],
                      generators)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    # frozen weights come from --init, as at the start
    trained = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(resharded(model), opt, options=trained)
    both = {"model": model_sd, "optim": optim_sd}
    # this rank's files first, every rank stopping where one cannot read its own (one went on
    # alone into the collective load: a gloo traceback, or a hang)
    rng, failed = os.path.join(path, f"rng-rank{d.rank}.pt"), None
    try:
        check_shard_files(path)
        # (absent when resumed on more ranks: rank 0's)
        if not os.path.exists(rng) and state.get("fsdp_world") == d.world:  # (lost: not bitwise)
            raise CheckpointError(f"{rng}: missing (the checkpoint was written by {d.world} "
                                  "processes, each with its random streams)")
        streams = _read_rng(rng) if os.path.exists(rng) else state["rng"]
    except CheckpointError as e:
        failed = e
    except OSError as e:  # (a file this rank may not read: the others would wait in the load)
        failed = CheckpointError(f"{e.filename or path}: cannot be read ({e.strerror or e})")
    _stop_reading_together(failed, path, d)
    try:
        dcp.load(both, checkpoint_id=os.path.join(path, SHARDS))
    # e.g. another model size
    except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
        if isinstance(e, CheckpointException) and e.failures:  # (its own text: the ranks only)
            e = (e.failures.get(d.rank) or next(iter(e.failures.values())))[0]
        raise CheckpointError(f"{path}/{SHARDS}: cannot load the FSDP shards into this model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    # (strict=False: the frozen weights are not in the shards, by the option above; every trained
    # one is, or dcp.load raised)
    set_state_dict(model, opt, model_state_dict=both["model"], optim_state_dict=both["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    note_other_world(state.get("fsdp_world"), d, what)
    set_rng_state(streams, generators)


def _read_rng(path):
    """A rank's random streams as its checkpoint holds them; a file that cannot be read is a
    CheckpointError (a torch.load traceback on one rank)."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # (a truncated or foreign file: pickle's, zip's, torch's errors)
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}); the checkpoint is "
                              "damaged: move it away and --resume takes the one before it")


def _stop_reading_together(failed, path, d):
    """A barrier that raises on every rank where one could not read its part of the checkpoint
    (that rank: its own line; the others: a line saying another process could not)."""
    flag = torch.tensor([0.0 if failed is None else 1.0], device=d.device)
    if d.world > 1:
        dist.all_reduce(flag)
    if failed is not None:
        raise failed
    if flag.item():
        raise CheckpointError(f"{path}: another process could not read its part of this "
                              "checkpoint (its line says why)")


def rank_states(obj, d):
    """Every rank's `obj`, in rank order, for the checkpoint rank 0 writes (collective)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def own_state(saved, d):
    """This rank's entry of what rank_states saved; None where nothing was saved or another number
    of processes wrote it (note_other_world says so)."""
    return saved[d.rank] if isinstance(saved, list) and len(saved) == d.world else None


def note_other_world(written_by, d, streams="the other ranks' random streams"):
    """--resume on another number of processes than wrote the checkpoint is allowed (a node lost),
    and said: the global batches are the same, but their sums run in another order and
    `streams` start again, so the run is no longer bitwise the one not stopped."""
    if d.main and written_by is not None and written_by != d.world:
        print(f"note: --resume on {d.world} process(es), the checkpoint was written by "
              f"{written_by}: the same global batches, summed in another order, and {streams} "
              "start again: not bitwise the run that was not stopped", flush=True)


def check_shard_files(ckpt):
    """Every file the shards' index (.metadata) reads from is there and holds the bytes it names
    (a checkpoint cut off while written or copied said only "CheckpointException ranks: [0]")."""
    from torch.distributed.checkpoint import FileSystemReader
    shards = os.path.join(ckpt, SHARDS)
    damaged = f"the checkpoint is damaged: move {ckpt} away and --resume takes the one before it"
    try:
        index = FileSystemReader(shards).read_metadata().storage_data
    except Exception as e:  # (any unpickling error of a damaged index)
        raise CheckpointError(f"{shards}/.metadata: cannot be read ({type(e).__name__}); "
                              f"{damaged}")
    ends = {}
    for info in index.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = os.path.join(shards, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing (the shards' index reads from it); {damaged}")
        if os.path.getsize(file) < end:
            raise CheckpointError(f"{file}: truncated ({os.path.getsize(file)} bytes; the shards' "
                                  f"index reads up to byte {end}); {damaged}")


def gather_full_model(model, d, device="cpu"):
    """The whole model, unsharded, on `device` of rank 0 (None on the others); every rank must call
    it. Adapters, heads and the active adapter as in the sharded model. For the LoRA merge,
    generation and the consolidated checkpoint that load_checkpoint, --init and export_llava_hf
    read."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(resharded(model), options=whole)
    if not d.main:
        return None
    # the same modules, no memory: load_state_dict(assign=True) fills them
    with torch.device("meta"):
        plain = LLaVA(model.config)
        for name, a in model.adapters.items():
            plain.add_adapter(name, a["r"], a["alpha"], a["dropout"], a["targets"], a.get("layers"))
        for name in model.heads:
            plain.add_head(name)
    plain.load_state_dict(full, assign=True)
    plain.set_adapter(model.active_adapter)
    plain.clip_dir = getattr(model, "clip_dir", None)  # (save_checkpoint_files records it)
    return plain.to(device)


def _save_sharded(model, out_dir, step, run_config, optimizer, tokenizer, base, generators,
                  extra_state, keep, d, full):
    """FSDP checkpoint-N/: shards/ (each rank's part of the model and AdamW state,
    torch.distributed.checkpoint), rng-rank{r}.pt, config.json, trainer_state.pt, tokenizer; with
    `full` (default: the run's last step, or every save with --save_full) also the whole model as
    model/adapters.safetensors. All written into one temp dir that rank 0 renames once every rank is
    done: a kill at any moment leaves no half checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)

    cfg = _config_dict(run_config)
    if full is None:
        full = step == cfg.get("max_steps") or bool(cfg.get("save_full"))
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = os.path.join(out_dir, f".tmp-checkpoint-{step:06d}-fsdp")  # one name all ranks know
    failed = None
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(tmp)
        except OSError as e:
            failed = e
    _stop_together(failed, tmp, out_dir, final, d)
    resharded(model)
    # frozen weights: --init has them (LoRA: the whole base)
    trained = StateDictOptions(ignore_frozen_params=True)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=trained)
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=trained), {}
    failed = None
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, SHARDS))
        torch.save(rng_state(generators), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
    # (a full disk: every rank stops, none waits for the others; dcp's CheckpointException is
    # a BaseException)
    except (Exception, CheckpointException) as e:
        failed = e
        if isinstance(e, CheckpointException) and e.failures:  # (its text names the ranks only)
            failed = (e.failures.get(d.rank) or next(iter(e.failures.values())))[0]
    _stop_together(failed, tmp, out_dir, final, d)  # every rank's files are in tmp
    plain = gather_full_model(model, d) if full else None
    failed = None
    if d.main:
        try:
            _write_sharded_rest(tmp, final, step, cfg, model, plain, tokenizer, base, generators,
                                extra_state, d)
        except Exception as e:
            failed = e
    _stop_together(failed, tmp, out_dir, final, d)
    _commit(tmp, final, out_dir, keep, d)
    return final


def _stop_together(failed, tmp, out_dir, final, d):
    """A barrier that raises on every rank when one could not write its part of the checkpoint
    (that rank: write_failure's line; the others: a line saying a process could not), the temp
    folder removed: a rank that stopped alone left the others waiting at the next barrier."""
    flag = torch.tensor([0.0 if failed is None else 1.0], device=d.device)
    dist.all_reduce(flag)
    if not flag.item():
        return
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
    what = os.path.basename(final)
    if failed is not None:
        raise write_failure(failed, out_dir, what) from None
    raise CheckpointError(f"{out_dir}: cannot write {what}: another process could not write its "
                          "part (its line says why); nothing of it was kept")


def _write_sharded_rest(tmp, final, step, cfg, model, plain, tokenizer, base, generators,
                        extra_state, d):
    """Rank 0's part of an FSDP checkpoint: config.json (with the whole model when `plain`),
    the tokenizer, trainer_state.pt."""
    extra = {"step": step, "run_config": cfg, "fsdp_shards": SHARDS}
    if plain is not None:  # the whole model, as a replicated run writes it
        save_checkpoint_files(plain, tmp, base=base, extra_config=extra)
    else:  # what latest_checkpoint and --resume read; the weights are in shards/ only
        base_rel = None
        if base:
            base_rel = os.path.relpath(os.path.realpath(base), os.path.realpath(final))
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "model": dataclasses.asdict(model.config), "adapters": model.adapters,
                "heads": sorted(model.heads), "active_adapter": model.active_adapter,
                "base": base_rel, **extra}
        clip = getattr(model, "clip_dir", None)
        if base and clip:  # as save_checkpoint_files records it
            meta["vision_tower"] = os.path.relpath(clip, os.path.abspath(final))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    trainer_state = {"format_version": FORMAT_VERSION, "step": step, "run_config": cfg,
                     "optimizer": None, "rng": rng_state(generators),
                     "extra": extra_state or {}, "fsdp_world": d.world}
    torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))


# ----------------------------------------------------------------------------------------
# models, tokenizers and the computations several stages share
# ----------------------------------------------------------------------------------------

def has_tokenizer(path):
    return any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer_config.json", "tokenizer.json"))


def tokenizer_source(given, cfg, load_from):
    """(tokenizer_dir, tokenizer_flag) for load_model_and_tokenizer in sft.py and vigc.py (given:
    the config before '{world}' was filled in). A fresh model reads --tokenizer. From --init the
    checkpoint's own tokenizer is read; a --tokenizer given stands in for one it lacks (a LLaMA
    dir), and is refused beside one it has; the default (the world's) never stands in: another
    vocabulary (given: a value other than the default's text). A resumed run's checkpoint holds
    the tokenizer it trained with."""
    if not cfg.init:
        return cfg.tokenizer, ""
    if load_from != cfg.init:
        return "", ""
    default = type(cfg).__dataclass_fields__["tokenizer"].default
    return (cfg.tokenizer if given.tokenizer != default else ""), "--tokenizer"


def base_dtype(cfg):
    """The dtype a stage keeps its frozen base in, and so loads a checkpoint in (one tensor at a
    time: a 13B fp16 release is not held in fp32 on the way): bf16 for --dtype bf16 on a GPU
    without FSDP (which keeps fp32 master weights and computes in bf16), else fp32."""
    bf16 = cfg.dtype == "bf16" and cfg.device == "cuda" and not getattr(cfg, "fsdp", False)
    return torch.bfloat16 if bf16 else torch.float32


def load_model_and_tokenizer(init="", preset="shapes", vision_tower="", tokenizer_dir="",
                             device="cpu", dtype=None, policy=True, geometry=None,
                             tokenizer_flag="", fresh_projector_ok=False):
    """A model from a checkpoint (`init`: ours, llava-hf, original LLaVA, or a LLaMA dir plus
    `vision_tower`), or a fresh `preset` sized to the tokenizer in `tokenizer_dir` (geometry: its
    image_size and patch_size replaced, see world_geometry), in `dtype` (None: fp32, whatever
    the checkpoint stores; the stages pass base_dtype; 'auto': a checkpoint's as stored). The
    tokenizer comes from the
    checkpoint directory (or tokenizer_dir when the checkpoint has none). policy: a reward model
    is refused (policy=False: a reward model is what is wanted). tokenizer_flag: the user's flag
    that gave tokenizer_dir beside `init` (refused where the checkpoint's own tokenizer is read).
    fresh_projector_ok: a LLaMA (or a LLaVA without projector weights) plus CLIP is a start (SFT's
    alone; elsewhere refused)."""
    from data import load_tokenizer
    if init:
        path = resolve_checkpoint(init)
        if not is_peft_dir(path):  # a config.json that cannot work is named before the tokenizer
            if detect_layout(path) == "clip":  # (which reads it too, and would take the blame)
                raise CheckpointError(clip_alone(path))
        if policy:
            refuse_scalar_model(path)
        # a PEFT adapter is often saved without a tokenizer: its base's is the model's own
        base = resolve_checkpoint(peft_base_dir(path)) \
            if is_peft_dir(path) and not has_tokenizer(path) else None
        own = path if has_tokenizer(path) else base if base and has_tokenizer(base) else ""
        if own and tokenizer_flag and tokenizer_dir:
            raise ConfigError(f"{tokenizer_flag} {tokenizer_dir}: not read ({own} holds the "
                              "checkpoint's own tokenizer); drop it")
        tok_dir = own or tokenizer_dir
        if not tok_dir:  # (before loading: a 7B model loaded for minutes to be refused)
            hint = f" (pass {tokenizer_flag} DIR: the world's default does not stand in)" \
                if tokenizer_flag else ""
            where = f" nor in its base {base}" if base else ""
            raise ConfigError(f"{path}: no tokenizer files in the checkpoint directory{where}"
                              f"{hint}")
        # the model first: transformers' tokenizer classes read config.json too, and a value
        # there they refuse would be blamed on the tokenizer, without the field's value
        # fp32 unless asked (LLaVA's releases are fp16: kept as stored, --dtype fp32 trained in
        # fp16 on the CPU and its loss was NaN at step 2)
        # (each weight to `device` as it is read: loaded on the host and moved after, a GPU run
        # held the whole model on the host first, 28 GB for a 7B fp16 release read as fp32)
        model = load_checkpoint(path, vision_tower=vision_tower or None,
                                dtype=dtype or torch.float32, device=device,
                                fresh_projector_ok=fresh_projector_ok)
        tokenizer = load_tokenizer(tok_dir)
        # a token id beyond the embedding would fail mid-run
        if len(tokenizer) > model.config.vocab_size:
            raise CheckpointError(f"{tok_dir}: the tokenizer has {len(tokenizer)} tokens, more "
                                  f"than the {model.config.vocab_size} embedding rows of the model "
                                  f"in {path}")
        # an image id the tokenizer gives to text (not its '<image>') would make that text fill
        # image slots: "N image tokens in input_ids, but ..." at the first batch
        image_id = model.config.image_token_id
        text_token = tokenizer.convert_ids_to_tokens(image_id) \
            if 0 <= image_id < len(tokenizer) else None
        if text_token not in (None, "<image>"):
            raise CheckpointError(f"{path}: the model's image_token_id {image_id} is the token "
                                  f"{text_token!r} of the tokenizer in {tok_dir}, not '<image>' "
                                  "(config.json and tokenizer do not belong together)")
    else:
        tokenizer = load_tokenizer(tokenizer_dir)
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        vocab = -(-len(tokenizer) // 64) * 64  # rounded up: friendlier matmul shapes
        model = LLaVA.from_preset(preset, **(geometry or {}), vocab_size=vocab,
                                  image_token_id=image_id if image_id is not None else -200,
                                  pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
        if dtype is not None:
            model = model.to(dtype)
    return model.to(device), tokenizer


MAX_CELL_PATCH = 63  # px: a fresh model's patch is a world's grid cell; larger is refused


def world_geometry(params, preset, world):
    """A fresh --model on a Shapes world (params: shapes.load_params): its vision geometry is the
    world's, image_size the image side and patch_size the cell side, so each patch is one grid
    cell as the presets' 48 px / 16 px are on the default 3 x 3 grid (the preset's alone resized
    a 1023 px world to 48 px, shapes below a pixel, and a 2 x 2 grid's cells straddled patches).
    Returns (overrides for from_preset, a note when they differ from the preset's, else None);
    a cell too large to be one patch is refused."""
    size, grid = params["image_size"], params["grid"]
    patch = size // grid  # (shapes.py: the image is grid x cell)
    if patch > MAX_CELL_PATCH:
        raise ConfigError(f"--world {world}: the world's --image_size {size} --grid {grid} makes "
                          f"{patch} px cells, and a fresh --model takes one patch per cell (at "
                          f"most {MAX_CELL_PATCH} px): write a world with --image_size at most "
                          f"{MAX_CELL_PATCH * grid}, or start from --init")
    was = {**dataclasses.asdict(ModelConfig()), **PRESETS[preset]}
    note = None
    if (was["image_size"], was["patch_size"]) != (size, patch):
        note = (f"note: a fresh --model {preset} takes the world's geometry: {size} px images, "
                f"{patch} px patches (one per cell of its {grid}x{grid} grid), not the preset's "
                f"{was['image_size']} / {was['patch_size']}")
    return dict(image_size=size, patch_size=patch), note


def refuse_merged_resume(resume_path, model, adapter, then=""):
    """--resume on a finished LoRA run: its last checkpoint holds the adapter merged into the base
    and no optimizer state, so a run resumed there trained a fresh random adapter on top (unlike
    the uninterrupted run); one line saying how to go on instead (then: the flags that do what the
    run had left, e.g. vigc's generation alone)."""
    if resume_path and adapter not in model.adapters:
        raise ConfigError(f"{resume_path}: --resume true: this run finished and merged its "
                          f"'{adapter}' adapter into the base here (no optimizer state kept), so "
                          f"it cannot go on as the same run; start a new run with --init "
                          f"{resume_path}{then}")


def prompt_item(tokenizer, model, turns, image_unit=None, template="vicuna_v1", max_len=2048):
    """Tokenized generation prompt (turns end with a human turn) with its normalised image; None
    where it is longer than max_len (cut, it lost its end and 'ASSISTANT:': the model went on
    writing the question)."""
    from data import normalize, tokenize_conversation
    c = model.config
    item = tokenize_conversation(tokenizer, turns, c.image_token_id, c.num_image_tokens, 1 << 30,
                                 template)
    if len(item["input_ids"]) > max_len:
        return None
    if image_unit is not None:
        item["pixel_values"] = normalize(image_unit)
    return item


@torch.no_grad()
def oracle_errors(result):
    """Every false claim in an oracle.oracle result, in one list: the hallucinated objects,
    attributes and relations and the claimed absences of present things (the terms of its
    num_hallucinations)."""
    kinds = ("hallucinated_objects", "hallucinated_attributes", "hallucinated_relations",
             "false_negatives")
    return [claim for kind in kinds for claim in result[kind]]


def check_new_tokens(model, cfg, *flags):
    """Each --flag (a count of new tokens) within the model's positions: generate preallocates its
    cache for prompt + new tokens, and 1e9 failed there with an allocation traceback."""
    limit = model.config.max_position
    for flag in flags:
        n = getattr(cfg, flag)
        if n > limit:
            raise ConfigError(f"--{flag} {n}: more new tokens than the model's {limit} positions "
                              "(max_position_embeddings in its config)")


def answer_eos(model, tokenizer):
    """The ids that end an answer: the tokenizer's eos, or with a config that lists several (Llama
    3's lists <|eot_id|> beside it) all of them, sorted: any ends an answer (eval, VIGC, the reports
    and PPO's rollouts stop at the same ones)."""
    eos = tokenizer.eos_token_id
    if isinstance(model.config.eos_token_id, list):
        return sorted({eos, *model.config.eos_token_id})
    return eos


def generate_answers(model, tokenizer, items, batch_size=32, max_new_tokens=64, temperature=0.0,
                     top_p=1.0, generator=None, desc="generate", show=True, num_beams=1,
                     return_finished=False, repetition_penalty=1.0, compile=False):
    """Decode answers for prompt items (from prompt_item) in left-padded batches with the KV cache
    (num_beams > 1: beam search; repetition_penalty, compile: model.generate's). generator: one,
    or a list of one per item. Returns the decoded answer texts (cut at EOS: the tokenizer's, or
    any the model's config lists), and with return_finished whether each one ended with EOS."""
    from data import collate
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    eos = answer_eos(model, tokenizer)
    out = []
    finished = []
    batches = range(0, len(items), batch_size)
    for start in progress(batches, total=len(batches), desc=desc, enabled=show):
        chunk = items[start:start + batch_size]
        b = collate(chunk, tokenizer.pad_token_id, side="left")
        pix = b["pixel_values"].to(dev) if b["pixel_values"] is not None else None
        ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
        g = model.generate(pix, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id,
                           generator=generator[start:start + len(chunk)]
                           if isinstance(generator, list) else generator,
                           num_beams=num_beams, repetition_penalty=repetition_penalty,
                           compile=compile)
        for i in range(len(chunk)):
            n = int(g.lengths[i])
            toks = g.tokens[i, :n].tolist()
            out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
            finished.append(bool(g.finished[i]))
    model.train(was_training)
    return (out, finished) if return_finished else out


def to_device(batch, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def score_sequences(model, head, input_ids, attention_mask, image_features):
    """Scalar score per right-padded sequence: head(hidden state at the last real token). Every pad
    comes after the real tokens, so the causal mask alone keeps a real token from seeing one and
    positions count from 0 as they do unpadded: no padding mask goes in (SDPA's fused causal path,
    not a (B, 1, T, T) mask), the same scores."""
    lengths = attention_mask.sum(1, keepdim=True)
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), cols < lengths):
        raise ValueError("score_sequences: the batch must be right-padded")
    h = model(None, input_ids, None, return_hidden=True, image_features=image_features,
              keep=lengths - 1)  # the last layer runs for the scored position alone
    return model.heads[head](h[:, 0])
