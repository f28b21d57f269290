"""Shared pytest fixtures: one tiny Shapes world and one tiny SFT checkpoint per test session,
and an in-process CLI runner (the same code path as `python stage.py ...`, minus interpreter
start-up)."""
import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# `pytest -n 2` (the README's command): two workers on CI's two cores, one intra-op thread each,
# and one in the processes the tests start (pytest_configure); two threads a worker oversubscribed
# the cores (OpenMP's threads wait for each other by spinning): test_sft + test_dpo took 26-111 s,
# 16-42 s on one thread, measured back to back. A run without -n keeps two.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)


def pytest_configure(config):
    """The controller of `-n N`, before its workers start (they and their children inherit it)."""
    if getattr(config.option, "numprocesses", None):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# A suite started in the background (`pytest ... &` in a shell script, a CI step run so) inherits
# SIGINT ignored, and so would every script it starts: the tests that stop a run with Ctrl-C saw
# it ignored and failed. A handler of our own here is the default again in the processes started
# (exec keeps an ignored signal ignored, not a handler). The tests of scripts started with SIGINT
# ignored set that up themselves.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


TINY_WORLD = dict(n_train=60, n_val=12, n_test=36, n_unlabeled=12, n_pref=40, n_povid=40, n_rl=40)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread (and a loaded machine punishes spinning ones);
    restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    import shapes
    d = str(tmp_path_factory.mktemp("world") / "shapes")
    shapes.write_world(d, seed=0, **TINY_WORLD)
    return d


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory, tiny_world):
    """A `tiny`-preset SFT run directory (3 steps) on the tiny world."""
    out = str(tmp_path_factory.mktemp("sft") / "sft")
    argv = ["--model", "tiny", "--world", tiny_world, "--max_steps", "3", "--batch_size", "8",
            "--align_steps", "1", "--read_steps", "1", "--out", out, "--report", "false",
            "--log_every", "1"]
    code, _, err = run_cli("sft", argv)
    assert code == 0, err
    return out


def count_decode_compiles(monkeypatch):
    """model.compiled_decode_step made afresh with its own settings, a counting backend standing
    in for inductor (tens of seconds per compile on a CPU): returns the counter
    (frame_count: graphs compiled)."""
    import model
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    torch._dynamo.reset()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **dict(kw, backend=counter)))
    monkeypatch.setattr(model, "_COMPILED_DECODE", [])
    return counter


def merge_flags(argv):
    """A command line with each flag once: a later `--flag values` replaces an earlier one (tests
    extend shared base command lines; the real command line refuses a repeated flag, see
    test_reliability)."""
    groups = {}
    for token in argv:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            groups.pop(name, None)
            groups[name] = [token]
        else:
            groups[next(reversed(groups))].append(token)
    return [t for g in groups.values() for t in g]


def run_cli(module, argv, strict=False):
    """Run a stage script's main() in this process as its __main__ block would: parse flags, run,
    turn user errors into one line + exit 2. Returns (exit code, stdout, stderr). Later flags
    replace earlier ones (merge_flags) unless strict."""
    import common
    mod = importlib.import_module(module)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    argv = list(argv) if strict else merge_flags(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cfg = common.parse_config(mod.Config, argv, prog=f"{module}.py")
            with common.user_errors(interrupted=getattr(mod, "INTERRUPTED", common.INTERRUPTED)):
                mod.main(cfg)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:  # (a process's end drops its process group: a run refused after making its
            # one-rank group, bench --fsdp's, left it to the next in-process run, "twice!")
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    return code, out.getvalue(), err.getvalue()


def forked(fn, log):
    """fn() in a forked copy of this process, started: a process of its own without an
    interpreter's start and torch's import (about 2 s of CPU each). Its stdout and stderr go to
    the open file log. Returns the multiprocessing.Process: exitcode is fn's SystemExit code, as
    Python's would be (0 when it returns; a message: said, 1), or -N if signal N ended it. It
    starts with none of this process's run folders (a lock held here was taken as its own, and its
    release deleted ours) nor the images this process recorded reading, as a new process would."""
    import multiprocessing
    import rundir

    def child():
        torch.set_num_threads(1)
        rundir._locks.clear()  # (the open lock files stay this process's: closed at its exit)
        rundir._made_out.clear()
        rundir._images_read.clear()
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        sys.stdout = sys.stderr = log
        code = 0
        try:
            fn()
        except SystemExit as e:
            code = e.code
            if code is not None and not isinstance(code, int):  # (a message: said, exit 1)
                print(code, file=log)
                code = 1
        log.flush()
        os._exit(code or 0)
    proc = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    proc.start()
    return proc


def forked_cli(module, argv, log):
    """run_cli(module, argv) in a forked copy of this process (forked), its stderr to log."""
    def run():
        code, _, err = run_cli(module, argv)
        log.write(err)
        sys.exit(code)
    return forked(run, log)


def calls_outside_autocast(monkeypatch, module, name):
    """distributed.bf16_autocast replaced by a recorder and module.name wrapped: the list returned
    gets, for each call of module.name, whether it ran outside every bf16_autocast block (autocast
    is off on a CPU: where the passes run is what a test can check here)."""
    import distributed
    inside, outside = [0], []

    class Recording:  # (reusable, as torch.autocast is: a training loop enters it each step)
        def __enter__(self):
            inside[0] += 1

        def __exit__(self, *exc):
            inside[0] -= 1

    def wrapped(*args, **kwargs):
        outside.append(inside[0] == 0)
        return real(*args, **kwargs)
    real = getattr(module, name)
    monkeypatch.setattr(distributed, "bf16_autocast", lambda cfg: Recording())
    monkeypatch.setattr(module, name, wrapped)
    return outside


class FullDisk:
    """An open file (as a context manager) whose writes fail as on a full disk."""
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")

    writelines = write


def free_port():
    """A TCP port free on this host now (torchrun's --master_port, a spawned rank's MASTER_PORT)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(target, args):
    """target(rank, args) run in two forked processes joined in a gloo process group, as torchrun's
    two ranks would be; returns {rank: what target returned} (lists and numbers: a tensor sent back
    is shared memory that dies with its process)."""
    import multiprocessing
    ctx, port = multiprocessing.get_context("fork"), free_port()
    q = ctx.Queue()

    def rank_main(rank):
        import distributed
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        try:
            d = distributed.setup_dist("cpu")
            q.put((rank, target(rank, d, args)))
        except BaseException as e:
            q.put((rank, f"{type(e).__name__}: {e}"))
        distributed.cleanup_dist()
    # (daemons, ended below whatever happens: a rank stuck in a collective would hold pytest)
    ps = [ctx.Process(target=rank_main, args=(r,), daemon=True) for r in range(2)]
    for p in ps:
        p.start()
    try:
        got = dict(q.get(timeout=120) for _ in ps)
        for p in ps:
            p.join(60)
    finally:
        for p in ps:
            if p.is_alive():
                p.terminate()
    assert [p.exitcode for p in ps] == [0, 0]
    return got


def run_script(script, argv, timeout=300, env=None):
    """A real subprocess (`python script.py ...`) for the checks that need a process of their
    own."""
    command = [sys.executable, os.path.join(HERE, script)] + list(argv)
    r = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                       env={**os.environ, **(env or {})})
    return r.returncode, r.stdout, r.stderr


def assert_same_metrics(a, b, keys, min_rows):
    """Two runs' metrics.jsonl rows: the same steps (at least min_rows) and every `keys` value
    within 1e-5 (relative above 1); returns how many values were compared."""
    assert [x["step"] for x in a] == [x["step"] for x in b] and len(a) >= min_rows
    compared = 0
    for x, y in zip(a, b):
        for k in keys:
            if k in x:
                assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
                compared += 1
    return compared


def descendants(pid):
    """Process ids below pid (torchrun's workers run in sessions of their own: killpg misses
    them)."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = [], [pid]
    while todo:
        up = todo.pop()
        kids = [c for c, pp in parent.items() if pp == up]
        out += kids
        todo += kids
    return out


def process_states(pid):
    """What each process below pid is doing, one line each (state, kernel wait channel, signals
    ignored and caught, command line): said where a test waits past its limit on a stop."""
    lines = []
    for p in descendants(pid):
        try:
            status = open(f"/proc/{p}/status").read().splitlines()
            fields = {k: v.strip() for k, _, v in (s.partition(":") for s in status)}
            wchan = open(f"/proc/{p}/wchan").read()
            command = open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:200]
        except OSError:
            continue
        lines.append(f"{p} {fields.get('State')} wchan={wchan} ignored={fields.get('SigIgn')} "
                     f"caught={fields.get('SigCgt')} {command}")
    return "\n".join(lines)
