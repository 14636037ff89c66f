"""Fault catalogue (issue #13): bad inputs and faults across the API, the command line, data files, checkpoints,
concurrency and kills, each run and its outcome classified automatically.

Outcomes: ``clear_error`` (raised / exited non-zero with a message holding the expected words), ``handled``
(succeeded and the result was checked correct), ``raw_error`` (failed, but the message does not name the problem),
``silent_wrong`` (accepted a bad input, or a result failed its check), ``lost_file`` (a file that existed before the
case changed or vanished), ``foreign_code`` (a pickled payload's marker file appeared). The last four are bugs.

    python benchmarks/fault_cases.py                # all cases -> benchmarks/results/fault_cases.{csv,md}
    python benchmarks/fault_cases.py --quick        # the representative subset (tests/test_fault_cases.py)
    python benchmarks/fault_cases.py --only cli     # one area (or case ids, comma separated)

Command-line and kill cases run ``python -m monai.bundle run ...`` in subprocesses on copies of
``bundles/classification_2d`` (tiny synthetic data); kills stop the run from inside at a chosen call
(``_kill`` entry of this file: a real SIGKILL / SIGINT of the process), then the rerun (``--resume true`` when a
resume file was left) is checked against an uninterrupted run's architecture.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "classification_2d"
RESULTS = ROOT / "benchmarks" / "results"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
TINY = ["--num_synthetic", "16", "--image_size", "16", "--batch_size", "8", "--epochs", "1"]
FAST = [
    "--finetune_epochs",
    "1",
    "--latency_repeats",
    "2",
    "--calibration_batches",
    "1",
    "--explain",
    "false",
]
FAST += ["--method", "taylor"]
KILL_RUN = ["--stages", "2", "--stage_epochs", "1", "--seed", "3"]
PRUNE = ["run", "prune", "--config_file", "['configs/train.json','configs/prune.json']"]
OUTCOMES = ("clear_error", "handled", "raw_error", "silent_wrong", "lost_file", "foreign_code")
BAD = ("raw_error", "silent_wrong", "lost_file", "foreign_code")
MARKER = "FOREIGN_CODE_RAN"


@dataclass
class Result:
    outcome: str
    message: str = ""


@dataclass
class Case:
    id: str
    area: str
    name: str
    expected: str
    fn: Callable[[Ctx], Result]
    quick: bool = False


CASES: list[Case] = []


def case(area: str, name: str, expected: str, quick: bool = False) -> Callable:
    def register(fn: Callable[[Ctx], Result]) -> Callable[[Ctx], Result]:
        n = sum(c.area == area for c in CASES) + 1
        CASES.append(Case(f"{area}-{n:02d}", area, name, expected, fn, quick))
        return fn

    return register


# ------------------------------------------------------------------------------------------------------ harness
def chain(exc: BaseException | None) -> str:
    msgs = []
    while exc is not None and len(msgs) < 10:
        msgs.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(msgs)


def excerpt(text: str, words: Iterable[str] = ()) -> str:
    """The line of ``text`` naming the most expected words (else its last error line), shortened for the table."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "Warning" not in ln]
    words = [w.lower() for w in words]
    best = max(lines, key=lambda ln: sum(w in ln.lower() for w in words), default="") if words else ""
    if not best or not any(w in best.lower() for w in words):
        errs = [ln for ln in lines if "Error" in ln or "error" in ln]
        best = errs[-1] if errs else (lines[-1] if lines else "")
    return " ".join(best.split())[:220]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Ctx:
    """One case's temporary folder, its file snapshot and the session's shared runs."""

    def __init__(self, tmp: Path, shared: Shared) -> None:
        self.tmp, self.shared = tmp, shared
        self.marker = tmp / MARKER
        self._snap: dict[Path, str] = {}

    def snapshot(self) -> None:
        """Record every file under the case folder: a later change or disappearance is a lost file."""
        self._snap = {p: _sha(p) for p in self.tmp.rglob("*") if p.is_file() and not p.is_symlink()}

    def lost(self, may_change: Iterable[str] = ()) -> list[str]:
        allowed = tuple(may_change)
        out = []
        for p, h in self._snap.items():
            if any(p.match(g) or g in str(p) for g in allowed):
                continue
            if not p.exists():
                out.append(f"{p.relative_to(self.tmp)} vanished")
            elif _sha(p) != h:
                out.append(f"{p.relative_to(self.tmp)} changed")
        return out

    def bundle(self, name: str = "b", trained: bool = True) -> Path:
        """A copy of the classification_2d bundle, with the shared trained ``models/model.pt`` when ``trained``."""
        dst = self.tmp / name
        shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
        if trained:
            (dst / "models").mkdir()
            shutil.copy2(self.shared.reference() / "models" / "model.pt", dst / "models" / "model.pt")
        return dst


def expect_error(ctx: Ctx, fn: Callable[[], object], *words: str, may_change: Iterable[str] = ()) -> Result:
    """Run ``fn``: an exception whose message chain holds every word is a clear error."""
    ctx.snapshot()
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt of a case is an outcome too
        if isinstance(e, SystemExit) and not e.code:
            return Result("silent_wrong", "exited 0")
        text = chain(e)
        lost = ctx.lost(may_change)
        if lost:
            return Result("lost_file", "; ".join(lost))
        ok = all(w.lower() in text.lower() for w in words)
        return Result("clear_error" if ok else "raw_error", excerpt(text, words))
    lost = ctx.lost(may_change)
    return Result("lost_file" if lost else "silent_wrong", "; ".join(lost) or "accepted without an error")


def expect_ok(
    ctx: Ctx, fn: Callable[[], object], verify: Callable[[object], str | None], may_change: Iterable[str] = ()
) -> Result:
    """Run ``fn``; ``verify(result)`` returns None when the result is correct, else what is wrong."""
    ctx.snapshot()
    try:
        out = fn()
    except BaseException as e:  # noqa: BLE001
        return Result("raw_error", excerpt(chain(e)))
    lost = ctx.lost(may_change)
    if lost:
        return Result("lost_file", "; ".join(lost))
    wrong = verify(out)
    return Result("silent_wrong", wrong) if wrong else Result("handled", "ok")


def cli(cwd: Path, args: list[str], timeout: float = 300) -> tuple[int, str]:
    """``python -m monai.bundle ARGS`` in ``cwd``: exit code and output (stdout + stderr, INFO log lines dropped).

    The command runs in a forked child that re-runs ``monai.bundle``'s ``__main__`` (fire parses ``args`` exactly as
    on the command line) without paying the interpreter's torch / MONAI import again; ``FAULT_CASES_EXEC=1`` runs a
    fresh interpreter instead.
    """
    if os.environ.get("FAULT_CASES_EXEC") == "1":
        cmd = [sys.executable, "-m", "monai.bundle", *args]
        proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, _drop_info(proc.stdout + "\n" + proc.stderr)
    import runpy

    log = Path(tempfile.mkstemp(prefix="fault_cli_", suffix=".log")[1])
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the catalogue
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(cwd)
            sys.argv = ["monai.bundle", *args]
            try:
                runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - printed like the interpreter would
                traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    t0 = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = 124 << 8
            break
        time.sleep(0.05)
    text = log.read_text(errors="replace")
    log.unlink()
    return os.waitstatus_to_exitcode(status), _drop_info(text)


def _drop_info(text: str) -> str:
    """Without MONAI's INFO log lines: they echo every override, so a word found there names nothing."""
    return "\n".join(ln for ln in text.splitlines() if " - INFO - " not in ln)


def prune_args(*extra: str, fast: bool = True) -> list[str]:
    return PRUNE + TINY + (FAST if fast else []) + list(extra)


def cli_error(ctx: Ctx, cwd: Path, args: list[str], *words: str, may_change: Iterable[str] = ()) -> Result:
    """A command that must exit non-zero with every word in its output, changing no existing file."""
    ctx.snapshot()
    rc, out = cli(cwd, args)
    lost = ctx.lost(may_change)
    if lost:
        return Result("lost_file", "; ".join(lost))
    if rc == 0:
        return Result("silent_wrong", "exited 0: " + excerpt(out, words))
    ok = all(w.lower() in out.lower() for w in words)
    return Result("clear_error" if ok else "raw_error", excerpt(out, words))


def cli_ok(
    ctx: Ctx, cwd: Path, args: list[str], verify: Callable[[Path], str | None], may_change: Iterable[str] = ()
) -> Result:
    ctx.snapshot()
    rc, out = cli(cwd, args)
    lost = ctx.lost(may_change)
    if lost:
        return Result("lost_file", "; ".join(lost))
    if rc != 0:
        return Result("raw_error", excerpt(out))
    wrong = verify(cwd)
    return Result("silent_wrong", wrong) if wrong else Result("handled", "ok")


def _literal(text: str) -> object:
    """A command-line value as fire reads it: a Python literal when it parses as one, else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def shapes(path: Path) -> dict[str, list[int]]:
    from monai_iaprune.pruning.checkpoint import safe_load

    return {k: list(v.shape) for k, v in safe_load(path)["state_dict"].items()}


def clean_folder(folder: Path) -> str | None:
    """None when ``folder`` holds no temporary file and no lock (what a finished or failed run must leave)."""
    left = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == ".monai_iaprune.lock"]
    return f"left behind in {folder.name}: {left}" if left else None


def pruned_output_ok(b: Path, reference: dict | None = None) -> str | None:
    """The pruned checkpoint loads into a fresh network, the report parses and no temporary file / lock is left."""
    from monai.networks.nets import DenseNet

    from monai_iaprune.pruning.checkpoint import load_pruned

    ckpt, report = b / "models" / "model_pruned.pt", b / "eval" / "prune_report.json"
    if not ckpt.is_file() or not report.is_file():
        return f"missing output: checkpoint {ckpt.is_file()}, report {report.is_file()}"
    net = DenseNet(2, 1, 2, init_features=16, growth_rate=8, block_config=(2, 4, 4), bn_size=2)
    load_pruned(ckpt, network_def=net)
    rep = json.loads(report.read_text())
    if not rep.get("params_after") or rep["params_after"] >= rep.get("params_before", 0):
        return f"report says params {rep.get('params_before')} -> {rep.get('params_after')}"
    if reference is not None and shapes(ckpt) != reference:
        return "pruned architecture differs from the uninterrupted run's"
    return clean_folder(b / "models") or clean_folder(b / "eval")


class Shared:
    """Runs shared by several cases: an uninterrupted prune run that trains ``models/model.pt`` (copied into the case
    bundles), and one from that ``model.pt`` whose pruned architecture the kill cases' reruns must reproduce."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ref: Path | None = None
        self._shapes: dict | None = None

    def reference(self) -> Path:
        if self._ref is None:
            b = self.root / "reference"
            shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
            rc, out = cli(b, prune_args(*KILL_RUN))
            if rc != 0:
                raise RuntimeError("the reference prune run failed:\n" + out[-3000:])
            self._ref = b
        return self._ref

    def reference_shapes(self) -> dict:
        """The pruned architecture of an uninterrupted run from the trained ``model.pt`` (as the kill cases start)."""
        if self._shapes is None:
            b = self.root / "reference_from_trained"
            shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
            (b / "models").mkdir()
            shutil.copy2(self.reference() / "models" / "model.pt", b / "models" / "model.pt")
            rc, out = cli(b, prune_args(*KILL_RUN))
            if rc != 0:
                raise RuntimeError("the reference prune run failed:\n" + out[-3000:])
            self._shapes = shapes(b / "models" / "model_pruned.pt")
        return self._shapes


# ------------------------------------------------------------------------------------------------ small models
def tiny_densenet():
    from monai.networks.nets import DenseNet

    return DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(1, 1), bn_size=2)


def tiny_resnet():
    from monai.networks.nets import resnet10

    return resnet10(spatial_dims=2, n_input_channels=1, num_classes=3, widen_factor=0.25)


def batches(n: int = 2, size: int = 16, classes: int = 2, channels: int = 1, nan: bool = False) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(4, channels, size, size, generator=g)
        if nan:
            x[0, 0, 0, 0] = float("nan")
        out.append((x, torch.randint(0, classes, (4,), generator=g)))
    return out


def tiny_evaluator():
    import torch
    from monai.engines import SupervisedEvaluator

    data = [{"image": torch.zeros(1, 1, 16, 16), "label": torch.zeros(1, dtype=torch.long)}]
    return SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=tiny_densenet())


def relevance_of(net, method: str = "magnitude"):
    from monai_iaprune import channel_relevance

    return channel_relevance(net, None if method == "magnitude" else batches(), method, progress=False)


def x16():
    import torch

    return torch.randn(2, 1, 16, 16)


class RunsCode:
    """Pickles as ``os.makedirs(marker)``: loading it with pickle creates the marker folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


# ============================================================================================== API: prune()
def _prune(ctx: Ctx, words: tuple[str, ...], **kw) -> Result:
    from monai_iaprune import prune

    net = tiny_densenet()
    rel = relevance_of(net)
    kw.setdefault("example_inputs", x16())
    ratio = kw.pop("ratio", 0.5)
    return expect_error(ctx, lambda: prune(net, rel, ratio, **kw), *words)


for _v in (0, 1, 1.5, -0.2, float("nan"), "0.5", True):
    case("api", f"prune(ratio={_v!r})", "error naming ratio", quick=_v == 1.5)(
        lambda ctx, v=_v: _prune(ctx, ("ratio", repr(v)), ratio=v)
    )
case("api", "prune(target='flops')", "error naming the target and the accepted ones")(
    lambda ctx: _prune(ctx, ("flops", "params"), target="flops")
)
case("api", "prune(target='latency', speedup=0.8)", "error naming speedup")(
    lambda ctx: _prune(ctx, ("speedup", "0.8"), target="latency", speedup=0.8)
)
case("api", "prune(speedup=2) with a params budget", "error: speedup is for latency")(
    lambda ctx: _prune(ctx, ("speedup", "latency"), speedup=2.0)
)
for _v in (0, 1.5, -1):
    case("api", f"prune(max_layer_ratio={_v})", "error naming max_layer_ratio")(
        lambda ctx, v=_v: _prune(ctx, ("max_layer_ratio", repr(v)), max_layer_ratio=v)
    )
for _v in (0, -8, 2.5):
    case("api", f"prune(round_to={_v})", "error naming round_to")(
        lambda ctx, v=_v: _prune(ctx, ("round_to", repr(v)), round_to=v)
    )
case("api", "prune(normalizer='median')", "error naming normalizer")(
    lambda ctx: _prune(ctx, ("normalizer", "median"), normalizer="median")
)
case("api", "prune(tolerance=-0.1)", "error naming tolerance")(
    lambda ctx: _prune(ctx, ("tolerance", "-0.1"), tolerance=-0.1)
)
case("api", "prune(group_reduction='median')", "error naming group_reduction")(
    lambda ctx: _prune(ctx, ("group_reduction", "median"), group_reduction="median")
)
case("api", "prune(ratoi=0.5) misspelt keyword", "error naming the keyword")(
    lambda ctx: _prune(ctx, ("ratoi",), ratoi=0.5)
)


@case("api", "prune() with NaN relevance", "refused naming the layer", quick=True)
def _(ctx):
    from monai_iaprune import prune

    net = tiny_densenet()
    rel = dict(relevance_of(net))
    name = next(iter(rel))
    rel[name] = rel[name].clone()
    rel[name][0] = float("nan")
    return expect_error(ctx, lambda: prune(net, rel, 0.5, example_inputs=x16()), "nan", name)


@case("api", "prune() relevance naming an unknown layer", "error naming the layer")
def _(ctx):
    from monai_iaprune import prune

    net = tiny_densenet()
    rel = dict(relevance_of(net))
    rel["no.such.layer"] = next(iter(rel.values()))
    return expect_error(ctx, lambda: prune(net, rel, 0.5, example_inputs=x16()), "no.such.layer")


@case("api", "prune() relevance of the wrong channel count", "error naming the layer and the counts")
def _(ctx):
    import torch

    from monai_iaprune import prune

    net = tiny_densenet()
    rel = dict(relevance_of(net))
    name = next(iter(rel))
    rel[name] = torch.rand(rel[name].numel() + 3)
    return expect_error(ctx, lambda: prune(net, rel, 0.5, example_inputs=x16()), name)


@case("api", "prune() with an empty relevance dict", "error: no relevance")
def _(ctx):
    from monai_iaprune import prune

    return expect_error(ctx, lambda: prune(tiny_densenet(), {}, 0.5, example_inputs=x16()), "relevance")


@case("api", "prune() without example_inputs", "error asking for example_inputs")
def _(ctx):
    from monai_iaprune import prune

    net = tiny_densenet()
    return expect_error(ctx, lambda: prune(net, relevance_of(net), 0.5), "example_inputs")


@case("api", "prune() example input with 3 channels for a 1-channel net", "error naming the input shape")
def _(ctx):
    import torch

    from monai_iaprune import prune

    net = tiny_densenet()
    x = torch.randn(2, 3, 16, 16)
    return expect_error(ctx, lambda: prune(net, relevance_of(net), 0.5, example_inputs=x), "channels")


@case("api", "prune() on a frozen network", "handled: frozen layers pruned, flags restored", quick=True)
def _(ctx):
    from monai_iaprune import prune

    net = tiny_densenet()
    for p in net.features.parameters():
        p.requires_grad_(False)
    rel = relevance_of(net)
    before = sum(p.numel() for p in net.features.parameters())

    def verify(res):
        after = sum(p.numel() for p in net.features.parameters())
        if after >= before:
            return f"frozen features kept all {before} parameters"
        if any(p.requires_grad for p in net.features.parameters()):
            return "requires_grad flags of frozen layers were not restored"
        return None

    return expect_ok(ctx, lambda: prune(net, rel, 0.5, example_inputs=x16()), verify)


@case("api", "prune() model in train mode", "handled: mode restored, params removed")
def _(ctx):
    from monai_iaprune import prune

    net = tiny_densenet().train()
    rel = relevance_of(net)
    return expect_ok(
        ctx,
        lambda: prune(net, rel, 0.5, example_inputs=x16()),
        lambda r: None if net.training and r.params_after < r.params_before else "mode or size wrong",
    )


@case("api", "prune(ignored_layers=['nope'])", "error naming the ignored layer")
def _(ctx):
    return _prune(ctx, ("nope",), ignored_layers=["nope"])


# ============================================================================ API: channel_relevance and friends
def _relevance(ctx: Ctx, words, data="default", method="taylor", **kw) -> Result:
    from monai_iaprune import channel_relevance

    net = tiny_densenet()
    data = batches() if isinstance(data, str) else data
    return expect_error(ctx, lambda: channel_relevance(net, data, method, progress=False, **kw), *words)


case("api", "channel_relevance(method='lrpp')", "error listing the methods")(
    lambda ctx: _relevance(ctx, ("lrpp", "taylor"), method="lrpp")
)
case("api", "channel_relevance on an empty loader", "error: no batch", quick=True)(
    lambda ctx: _relevance(ctx, ("no batch",), data=[])
)
case("api", "channel_relevance with a NaN image", "refused: non-finite input")(
    lambda ctx: _relevance(ctx, ("nan",), data=batches(nan=True))
)
case("api", "channel_relevance lrp with a NaN image", "refused: non-finite input")(
    lambda ctx: _relevance(ctx, ("nan",), data=batches(nan=True), method="lrp")
)
case("api", "channel_relevance with 3-channel images (net has 1)", "error naming the shape")(
    lambda ctx: _relevance(ctx, ("channels",), data=batches(channels=3))
)
case("api", "channel_relevance labels 0..4 for a 2-class net", "error naming the label / class range")(
    lambda ctx: _relevance(ctx, ("label",), data=batches(classes=5))
)
case("api", "channel_relevance(target=7) on a 2-class net", "error naming the class index")(
    lambda ctx: _relevance(ctx, ("7",), target=7)
)
case("api", "channel_relevance(target='banana')", "error naming the target")(
    lambda ctx: _relevance(ctx, ("banana",), target="banana")
)
case(
    "api", "channel_relevance(method='ig', n_stepz=4) misspelt method setting", "error listing accepted names"
)(lambda ctx: _relevance(ctx, ("n_stepz", "n_steps"), method="ig", n_stepz=4))
case("api", "channel_relevance(method='ig', n_steps=0)", "error naming n_steps")(
    lambda ctx: _relevance(ctx, ("n_steps", "0"), method="ig", n_steps=0)
)
case("api", "channel_relevance(max_batches=0)", "error naming max_batches")(
    lambda ctx: _relevance(ctx, ("max_batches", "0"), max_batches=0)
)
case("api", "channel_relevance(layers=['ghost'])", "error naming the layer")(
    lambda ctx: _relevance(ctx, ("ghost",), layers=["ghost"])
)
case("api", "channel_relevance with string batches", "error naming the batch type")(
    lambda ctx: _relevance(ctx, ("str",), data=["not a batch"])
)


@case("api", "block_relevance(method='lrpp')", "error listing block methods")
def _(ctx):
    from monai_iaprune import block_relevance

    return expect_error(ctx, lambda: block_relevance(tiny_resnet(), batches(classes=3), "lrpp"), "lrpp")


def _depth(ctx: Ctx, words, **kw) -> Result:
    from monai_iaprune import prune_depth

    net = tiny_resnet()
    from monai_iaprune.relevance.blocks import removable_blocks

    scores = {b: 1.0 for b in removable_blocks(net)}
    kw.setdefault("example_inputs", x16())
    ratio = kw.pop("ratio", 0.3)
    return expect_error(ctx, lambda: prune_depth(net, scores, ratio, **kw), *words)


for _v in (1.0, -0.1, float("nan")):
    case("api", f"prune_depth(ratio={_v})", "error naming ratio")(
        lambda ctx, v=_v: _depth(ctx, ("ratio", repr(v)), ratio=v)
    )


@case("api", "prune_depth(ratio=0)", "handled: nothing removed")
def _(ctx):
    from monai_iaprune import prune_depth
    from monai_iaprune.relevance.blocks import removable_blocks

    net = tiny_resnet()
    n = sum(p.numel() for p in net.parameters())
    scores = {b: 1.0 for b in removable_blocks(net)}
    verify = lambda r: None if sum(p.numel() for p in net.parameters()) == n else "blocks removed at ratio 0"  # noqa: E731
    return expect_ok(ctx, lambda: prune_depth(net, scores, 0.0, example_inputs=x16()), verify)


case("api", "prune_depth(min_blocks_per_stage=-1)", "error naming min_blocks_per_stage")(
    lambda ctx: _depth(ctx, ("min_blocks_per_stage", "-1"), min_blocks_per_stage=-1)
)
case("api", "prune_depth(target='flops')", "error naming target")(
    lambda ctx: _depth(ctx, ("flops",), target="flops")
)


@case("api", "prune_depth on a network without residual blocks", "error: no removable block")
def _(ctx):
    import torch

    from monai_iaprune import prune_depth

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    return expect_error(ctx, lambda: prune_depth(net, {}, 0.3, example_inputs=x16()), "block")


@case("api", "prune_iteratively(steps=0)", "error naming steps")
def _(ctx):
    from monai_iaprune import prune_iteratively

    f = lambda: prune_iteratively(tiny_densenet(), batches(), "taylor", 0.5, steps=0, example_inputs=x16())  # noqa: E731
    return expect_error(ctx, f, "steps", "0")


@case("api", "recalibrate_batchnorm on an empty loader", "error: no batch")
def _(ctx):
    from monai_iaprune import recalibrate_batchnorm

    return expect_error(ctx, lambda: recalibrate_batchnorm(tiny_densenet(), []), "batch")


@case("api", "recalibrate_batchnorm on NaN images", "refused: non-finite input")
def _(ctx):
    from monai_iaprune import recalibrate_batchnorm

    return expect_error(ctx, lambda: recalibrate_batchnorm(tiny_densenet(), batches(nan=True)), "nan")


# ===================================================================================== API: handlers
def _handler(ctx: Ctx, words, **kw) -> Result:
    from monai_iaprune.handlers import RelevancePruningHandler

    return expect_error(ctx, lambda: RelevancePruningHandler(**kw), *words)


for _kw, _w in (
    ({"ratio": 0}, ("ratio", "0")),
    ({"ratio": "half"}, ("ratio", "half")),
    ({"stages": 0}, ("stages", "0")),
    ({"steps": 0}, ("steps", "0")),
    ({"stages": 2, "prune_epochs": [1]}, ("prune_epochs", "stages")),
    ({"stages": 2, "prune_epochs": [2, 1]}, ("prune_epochs", "increasing")),
    ({"prune_target": "flops"}, ("prune_target", "flops")),
    ({"prune_target": "latency", "speedup": 0.9}, ("speedup", "0.9")),
    ({"depth_ratio": 1.0}, ("depth_ratio", "1.0")),
    ({"finetune_lr": -1}, ("finetune_lr", "-1")),
    ({"max_batches": 0}, ("max_batches", "0")),
    ({"method": "nope"}, ("nope", "lrp")),
    ({"prune_kwargs": {"ratio": 0.2}}, ("prune_kwargs", "ratio")),
    ({"recalibrate_bn": "maybe"}, ("recalibrate_bn", "maybe")),
    ({"cost_aware": "perhaps"}, ("cost_aware", "perhaps")),
    ({"min_blocks_per_stage": -1}, ("min_blocks_per_stage", "-1")),
    ({"collector": "not a collector"}, ("collector",)),
):
    case(
        "api",
        f"RelevancePruningHandler({', '.join(f'{k}={v!r}' for k, v in _kw.items())})",
        "error naming it",
    )(lambda ctx, kw=_kw, w=_w: _handler(ctx, w, **kw))


@case("api", "PruneReportHandler(latency_repeats=0)", "error naming latency_repeats")
def _(ctx):
    from monai_iaprune.handlers import PruneReportHandler

    f = lambda: PruneReportHandler(tiny_evaluator(), str(ctx.tmp / "r"), x16(), latency_repeats=0)  # noqa: E731
    return expect_error(ctx, f, "latency_repeats", "0")


@case("api", "PruneReportHandler(explain_method='nope')", "error naming explain_method")
def _(ctx):
    from monai_iaprune.handlers import PruneReportHandler

    f = lambda: PruneReportHandler(tiny_evaluator(), str(ctx.tmp / "r"), x16(), explain_method="nope")  # noqa: E731
    return expect_error(ctx, f, "explain_method", "nope")


@case("api", "RelevanceCollector(method='nope')", "error listing methods")
def _(ctx):
    from monai_iaprune.handlers import RelevanceCollector

    return expect_error(ctx, lambda: RelevanceCollector("nope"), "nope")


@case("api", "RelevanceCollector(max_batches=0)", "error naming max_batches")
def _(ctx):
    from monai_iaprune.handlers import RelevanceCollector

    return expect_error(ctx, lambda: RelevanceCollector("taylor", max_batches=0), "max_batches")


@case("api", "ExplanationConsistencyHandler(weight=-1)", "error naming weight")
def _(ctx):
    from monai_iaprune.handlers import ExplanationConsistencyHandler

    return expect_error(ctx, lambda: ExplanationConsistencyHandler(-1.0), "weight", "-1")


@case("api", "PruneResumeHandler(resume='maybe')", "error naming resume")
def _(ctx):
    from monai_iaprune.handlers import PruneResumeHandler

    return expect_error(
        ctx, lambda: PruneResumeHandler(ctx.tmp / "r.pt", None, resume="maybe"), "resume", "maybe"
    )


@case("api", "OutputTransaction(overwrite='maybe')", "error naming overwrite")
def _(ctx):
    from monai_iaprune.utils.outputs import OutputTransaction

    return expect_error(
        ctx, lambda: OutputTransaction([ctx.tmp / "x"], overwrite="maybe"), "overwrite", "maybe"
    )


@case("api", "save_pruned onto an existing file", "refused, the file kept")
def _(ctx):
    from monai_iaprune.pruning.checkpoint import save_pruned

    (ctx.tmp / "m.pt").write_bytes(b"keep me")
    return expect_error(ctx, lambda: save_pruned(tiny_densenet(), ctx.tmp / "m.pt"), "m.pt", "overwrite")


@case("api", "export_onnx onto an existing file", "refused, the file kept")
def _(ctx):
    from monai_iaprune.pruning.export import export_onnx

    (ctx.tmp / "m.onnx").write_bytes(b"keep me")
    return expect_error(ctx, lambda: export_onnx(tiny_densenet().eval(), ctx.tmp / "m.onnx", x16()), "m.onnx")


@case("api", "copy_overlay onto an existing file", "refused, the file kept")
def _(ctx):
    from monai_iaprune.overlay import copy_overlay

    (ctx.tmp / "prune_overlay.json").write_text("{}")
    return expect_error(ctx, lambda: copy_overlay(ctx.tmp), "prune_overlay.json", "overwrite")


# ====================================================================================== data files
def _cls(ctx: Ctx, path, words, spatial_dims=2, num_classes=2, split="train") -> Result:
    from monai_iaprune.data import classification_datalist

    return expect_error(
        ctx, lambda: classification_datalist(path, split, spatial_dims, num_classes=num_classes), *words
    )


def _npz(path: Path, n=(6, 4, 4), classes=2, dims=2, **override) -> Path:
    import numpy as np

    rs = np.random.RandomState(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, 8, 8) if dims == 2 else (k, 8, 8, 8)
        arrays[f"{split}_images"] = (rs.rand(*shape) * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % classes).reshape(-1, 1)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def _folders(root: Path, classes=2, per=3, corrupt: str | None = None) -> Path:
    import numpy as np
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per):
            Image.fromarray((np.random.rand(8, 8) * 255).astype(np.uint8)).save(
                root / f"class{c}" / f"{i}.png"
            )
    if corrupt is not None:
        (root / "class0" / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


case("data", "dataset_dir that does not exist", "error naming the path")(
    lambda ctx: _cls(ctx, ctx.tmp / "nowhere", ("nowhere",))
)


@case("data", "empty dataset folder", "error: no class sub-folders")
def _(ctx):
    (ctx.tmp / "empty").mkdir()
    return _cls(ctx, ctx.tmp / "empty", ("empty",))


@case("data", "class folder with one class only", "error: needs two classes")
def _(ctx):
    return _cls(ctx, _folders(ctx.tmp / "one", classes=1), ("class",))


@case("data", "3 class folders with num_classes 2", "error naming num_classes 3", quick=True)
def _(ctx):
    return _cls(ctx, _folders(ctx.tmp / "three", classes=3), ("num_classes", "3"))


@case("data", "class folders without images", "error: no images")
def _(ctx):
    for c in ("a", "b"):
        (ctx.tmp / "noimg" / c).mkdir(parents=True)
    return _cls(ctx, ctx.tmp / "noimg", ("no images",))


@case("data", "corrupt png in a class folder", "error naming the file")
def _(ctx):
    return _cls(ctx, _folders(ctx.tmp / "bad", corrupt="broken.png"), ("broken.png",))


@case("data", "zero-byte png in a class folder", "error naming the file")
def _(ctx):
    root = _folders(ctx.tmp / "zero")
    (root / "class1" / "empty.png").write_bytes(b"")
    return _cls(ctx, root, ("empty.png",))


@case("data", "class folder dataset for a 3D bundle", "error: folders are 2D")
def _(ctx):
    return _cls(ctx, _folders(ctx.tmp / "f"), ("2D", "3D"), spatial_dims=3)


@case("data", "train/ folder without val/", "error naming the missing split")
def _(ctx):
    _folders(ctx.tmp / "s" / "train")
    return _cls(ctx, ctx.tmp / "s", ("val",), split="val")


@case("data", "truncated MedMNIST npz", "error naming the file")
def _(ctx):
    p = _npz(ctx.tmp / "cut.npz")
    p.write_bytes(p.read_bytes()[:200])
    return _cls(ctx, p, ("cut.npz",))


@case("data", "npz without the split's keys", "error naming the missing keys")
def _(ctx):
    import numpy as np

    np.savez(ctx.tmp / "other.npz", x=np.zeros(3))
    return _cls(ctx, ctx.tmp / "other.npz", ("train_images",))


@case("data", "npz holding a pickled object array", "refused, no code run")
def _(ctx):
    import numpy as np

    p = ctx.tmp / "evil.npz"
    np.savez(p, train_images=np.array([RunsCode(ctx.marker)], dtype=object), train_labels=np.zeros((1, 1)))
    return _cls(ctx, p, ("evil.npz",))


@case("data", "3-class npz with num_classes 2", "error naming num_classes 3")
def _(ctx):
    return _cls(ctx, _npz(ctx.tmp / "m.npz", classes=3), ("num_classes", "3"))


@case("data", "3D npz for a 2D bundle", "error: 3D vs 2D")
def _(ctx):
    return _cls(ctx, _npz(ctx.tmp / "v.npz", dims=3), ("3D", "2D"))


@case("data", "npz with negative labels", "error naming the label")
def _(ctx):
    import numpy as np

    p = _npz(ctx.tmp / "neg.npz", train_labels=np.array([[0], [1], [-1], [0], [1], [0]]))
    return _cls(ctx, p, ("-1",))


@case("data", "npz with multi-label targets", "error: multi-label")
def _(ctx):
    import numpy as np

    return _cls(
        ctx, _npz(ctx.tmp / "ml.npz", train_labels=np.zeros((6, 3), dtype=np.int64)), ("multi-label",)
    )


@case("data", "npz with fewer labels than images", "error naming the counts")
def _(ctx):
    import numpy as np

    return _cls(
        ctx, _npz(ctx.tmp / "n.npz", train_labels=np.zeros((4, 1), dtype=np.int64)), ("labels", "images")
    )


@case("data", "unsupported dataset_dir (.csv file)", "error naming the accepted kinds")
def _(ctx):
    (ctx.tmp / "d.csv").write_text("a,b\n")
    return _cls(ctx, ctx.tmp / "d.csv", ("unsupported", "d.csv"))


def _datalist(ctx: Ctx, content, words) -> Result:
    p = ctx.tmp / "datalist.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return _cls(ctx, p, words, spatial_dims=3, num_classes=3)


def _nii(ctx: Ctx, name: str, shape=(8, 8, 8), nan=False) -> str:
    import nibabel as nib
    import numpy as np

    a = np.random.RandomState(0).rand(*shape).astype(np.float32)
    if nan:
        a[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(a, np.eye(4)), ctx.tmp / name)
    return name


case("data", "datalist JSON that is not JSON", "error naming the file")(
    lambda ctx: _datalist(ctx, "{not json", ("datalist.json",))
)
case("data", "datalist without a 'training' list", "error naming the key")(
    lambda ctx: _datalist(ctx, {"items": []}, ("training",))
)
case("data", "datalist with an empty 'training' list", "error: no item")(
    lambda ctx: _datalist(ctx, {"training": []}, ("no item",))
)


@case("data", "datalist naming a missing image", "error naming the file")
def _(ctx):
    return _datalist(ctx, {"training": [{"image": "gone.nii.gz", "label": 0}] * 3}, ("gone.nii.gz",))


@case("data", "datalist with a text label", "error naming the item and label")
def _(ctx):
    n = _nii(ctx, "a.nii.gz")
    return _datalist(ctx, {"training": [{"image": n, "label": "tumour"}] * 3}, ("tumour", "class index"))


@case("data", "datalist label 5 with num_classes 3", "error naming num_classes")
def _(ctx):
    n = _nii(ctx, "a.nii.gz")
    items = [{"image": n, "label": v} for v in (0, 5, 1, 2, 0)]
    return _datalist(ctx, {"training": items}, ("num_classes", "6"))


@case("data", "corrupt NIfTI file", "error naming the file")
def _(ctx):
    (ctx.tmp / "bad.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    items = [{"image": "bad.nii.gz", "label": 0}, {"image": _nii(ctx, "a.nii.gz"), "label": 1}] * 2
    return _datalist(ctx, {"training": items}, ("bad.nii.gz",))


@case("data", "2D NIfTI in a 3D datalist", "error naming the file and dims")
def _(ctx):
    items = [{"image": _nii(ctx, "flat.nii.gz", shape=(8, 8)), "label": 0}] * 3
    return _datalist(ctx, {"training": items}, ("flat.nii.gz", "2D"))


@case("data", "NIfTI image holding NaN", "error naming the file")
def _(ctx):
    items = [
        {"image": _nii(ctx, "nan.nii.gz", nan=True), "label": 0},
        {"image": _nii(ctx, "a.nii.gz"), "label": 1},
    ]
    return _datalist(ctx, {"training": items * 2}, ("nan.nii.gz",))


@case("data", "segmentation label on another grid than its image", "error naming both files")
def _(ctx):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from monai_iaprune.data import CheckSameSpatialShaped

    item = {
        "image": str(ctx.tmp / _nii(ctx, "img.nii.gz")),
        "label": str(ctx.tmp / _nii(ctx, "lab.nii.gz", (6, 8, 8))),
    }
    t = Compose(
        [LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), CheckSameSpatialShaped()]
    )
    return expect_error(ctx, lambda: t(item), "img.nii.gz", "lab.nii.gz")


def _seg_label(ctx: Ctx, value: float) -> Result:
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from monai_iaprune.data import CheckLabelValuesd

    lab = np.zeros((8, 8, 8), dtype=np.float32)
    lab[2:4, 2:4, 2:4] = 1
    lab[0, 0, 0] = value
    nib.save(nib.Nifti1Image(lab, np.eye(4)), ctx.tmp / "lab.nii.gz")
    # the segmentation bundle's first transforms
    t = Compose(
        [LoadImaged("label"), EnsureChannelFirstd("label"), CheckLabelValuesd("label", num_classes=2)]
    )
    return expect_error(ctx, lambda: t({"label": str(ctx.tmp / "lab.nii.gz")}), "lab.nii.gz", "num_classes")


case("data", "segmentation label value 3 with num_classes 2", "error naming the file and num_classes")(
    lambda ctx: _seg_label(ctx, 3.0)
)
case("data", "segmentation label with fractional values (0.5)", "error naming the file")(
    lambda ctx: _seg_label(ctx, 0.5)
)


@case(
    "data", "segmentation bundle trained on a label with class 3 (num_classes 2)", "exit != 0 naming the file"
)
def _(ctx):
    import nibabel as nib
    import numpy as np

    b = ctx.tmp / "seg"
    shutil.copytree(
        ROOT / "bundles" / "segmentation_3d", b, ignore=shutil.ignore_patterns("models", "eval", "data")
    )
    rs = np.random.RandomState(0)
    items = []
    for i in range(3):
        img, lab = rs.rand(16, 16, 16).astype(np.float32), np.zeros((16, 16, 16), dtype=np.float32)
        lab[4:10, 4:10, 4:10] = 3 if i == 1 else 1
        nib.save(nib.Nifti1Image(img, np.eye(4)), b / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), b / f"lab{i}.nii.gz")
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (b / "ds.json").write_text(json.dumps({"training": items, "validation": items[:1]}))
    args = ["run", "--config_file", "configs/train.json", "--dataset_dir", "ds.json", "--epochs", "1",
            "--roi_size", "[8, 8, 8]", "--pixdim", "[1.0, 1.0, 1.0]"]  # fmt: skip
    return cli_error(ctx, b, args, "lab1.nii.gz", "num_classes")


@case("data", "segmentation datalist JSON naming a missing label", "error naming the file")
def _(ctx):
    from monai_iaprune.data import segmentation_datalist

    img = _nii(ctx, "img.nii.gz")
    (ctx.tmp / "ds.json").write_text(
        json.dumps({"training": [{"image": img, "label": "nolabel.nii.gz"}] * 3})
    )
    return expect_error(
        ctx, lambda: segmentation_datalist(ctx.tmp / "ds.json", "train", ctx.tmp), "nolabel.nii.gz"
    )


@case("data", "synthetic data with image_size 4", "error naming size")
def _(ctx):
    from monai_iaprune.data import classification_datalist

    return expect_error(ctx, lambda: classification_datalist("", "train", 2, size=4), "size", "4")


@case("data", "num_classes 0", "error naming num_classes")
def _(ctx):
    from monai_iaprune.data import classification_datalist

    return expect_error(
        ctx, lambda: classification_datalist("", "train", 2, num_classes=0), "num_classes", "0"
    )


@case("data", "unknown split 'dev'", "error naming the split")
def _(ctx):
    from monai_iaprune.data import classification_datalist

    return expect_error(ctx, lambda: classification_datalist(_npz(ctx.tmp / "m.npz"), "dev", 2), "dev")


# ==================================================================================== checkpoints
def _state_file(ctx: Ctx, obj, name="model.pt") -> Path:
    import torch

    p = ctx.tmp / name
    torch.save(obj, p)
    return p


def _load_net(ctx: Ctx, path: Path, *words, net=None) -> Result:
    from monai_iaprune.bundle import load_network

    return expect_error(ctx, lambda: load_network(net or tiny_densenet(), path), *words)


@case("checkpoints", "state dict with a pickled payload (load_network)", "refused, no code run", quick=True)
def _(ctx):
    p = _state_file(ctx, {"model": tiny_densenet().state_dict(), "x": RunsCode(ctx.marker)})
    return _load_net(ctx, p, "model.pt", "weights_only")


@case("checkpoints", "pruned checkpoint with a pickled payload (load_pruned)", "refused, no code run")
def _(ctx):
    from monai_iaprune.pruning.checkpoint import load_pruned

    p = _state_file(ctx, {"pruned_structure": {}, "state_dict": {}, "evil": RunsCode(ctx.marker)}, "p.pt")
    return expect_error(ctx, lambda: load_pruned(p, network_def=tiny_densenet()), "p.pt")


@case("checkpoints", "format-1 pruned file (pickled module) without network_def", "refused, no code run")
def _(ctx):
    import torch

    from monai_iaprune.pruning.checkpoint import load_pruned

    buf = io.BytesIO()
    torch.save(RunsCode(ctx.marker), buf)
    p = _state_file(ctx, {"format": 1, "module": buf.getvalue(), "state_dict": {}}, "old.pt")
    return expect_error(ctx, lambda: load_pruned(p), "old.pt")


@case("checkpoints", "resume.pt with a pickled payload", "refused, no code run")
def _(ctx):
    from monai_iaprune.handlers import PruneResumeHandler

    p = _state_file(ctx, {"format": "monai_iaprune.resume/1", "x": RunsCode(ctx.marker)}, "resume.pt")
    return expect_error(ctx, lambda: PruneResumeHandler(p, None, resume=True), "resume.pt")


@case("checkpoints", "truncated state-dict file", "error naming the file")
def _(ctx):
    p = _state_file(ctx, tiny_densenet().state_dict())
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return _load_net(ctx, p, "model.pt")


@case("checkpoints", "empty checkpoint file", "error naming the file")
def _(ctx):
    (ctx.tmp / "model.pt").write_bytes(b"")
    return _load_net(ctx, ctx.tmp / "model.pt", "model.pt")


@case("checkpoints", "text file as checkpoint", "error naming the file")
def _(ctx):
    (ctx.tmp / "model.pt").write_text("hello")
    return _load_net(ctx, ctx.tmp / "model.pt", "model.pt")


@case("checkpoints", "folder as checkpoint", "error naming the path")
def _(ctx):
    (ctx.tmp / "model.pt").mkdir()
    return _load_net(ctx, ctx.tmp / "model.pt", "model.pt")


@case("checkpoints", "missing checkpoint", "error naming the path")
def _(ctx):
    return _load_net(ctx, ctx.tmp / "absent.pt", "absent.pt")


@case("checkpoints", "checkpoint of another network_def", "error naming the architecture mismatch")
def _(ctx):
    p = _state_file(ctx, tiny_resnet().state_dict())
    return _load_net(ctx, p, "model.pt", "network_def")


@case("checkpoints", "state dict with missing keys", "error listing missing keys")
def _(ctx):
    sd = tiny_densenet().state_dict()
    sd.pop(next(iter(sd)))
    return _load_net(ctx, _state_file(ctx, sd), "missing")


@case("checkpoints", "state dict with unexpected keys", "error listing unexpected keys")
def _(ctx):
    import torch

    sd = dict(tiny_densenet().state_dict(), extra_head=torch.zeros(3))
    return _load_net(ctx, _state_file(ctx, sd), "unexpected", "extra_head")


@case("checkpoints", "checkpoint holding a list", "error naming the type")
def _(ctx):
    import torch

    return _load_net(ctx, _state_file(ctx, [torch.zeros(2)]), "list")


@case("checkpoints", "float64 state dict of the right net", "handled: loaded as float32")
def _(ctx):
    from monai_iaprune.bundle import load_network

    src = tiny_densenet()
    p = _state_file(ctx, {k: v.double() for k, v in src.state_dict().items()})

    def verify(net):
        w = next(net.parameters())
        same = all(
            (a.double() - b.double()).abs().max() < 1e-6
            for a, b in zip(net.state_dict().values(), src.state_dict().values())
        )
        return None if w.dtype.is_floating_point and same else "weights differ after load"

    return expect_ok(ctx, lambda: load_network(tiny_densenet(), p), verify)


def _pruned_file(ctx: Ctx, name="p.pt", net=None) -> tuple[Path, object]:
    from monai_iaprune import prune
    from monai_iaprune.pruning.checkpoint import save_pruned

    net = net or tiny_densenet()
    prune(net, relevance_of(net), 0.4, target="channels", example_inputs=x16())
    path = ctx.tmp / name
    save_pruned(net, path)
    return path, net


@case("checkpoints", "pruned checkpoint loaded into another network_def", "error naming the module")
def _(ctx):
    from monai_iaprune.pruning.checkpoint import load_pruned

    p, _ = _pruned_file(ctx)
    return expect_error(ctx, lambda: load_pruned(p, network_def=tiny_resnet()), "p.pt")


@case("checkpoints", "pruned checkpoint with a tampered channel count", "error naming the layer")
def _(ctx):
    import torch

    from monai_iaprune.pruning.checkpoint import load_pruned, safe_load

    p, _ = _pruned_file(ctx)
    ck = safe_load(p)
    rec = next(v for v in ck["pruned_structure"].values() if v["params"].get("weight"))
    rec["params"]["weight"][0] += 1
    torch.save(ck, p)
    return expect_error(ctx, lambda: load_pruned(p, network_def=tiny_densenet()), "p.pt")


@case("checkpoints", "pruned checkpoint round trip (fresh network)", "handled: same outputs")
def _(ctx):
    import torch

    from monai_iaprune.pruning.checkpoint import load_pruned

    p, net = _pruned_file(ctx)
    x = x16()

    def verify(loaded):
        return None if torch.allclose(loaded.eval()(x), net.eval()(x), atol=1e-5) else "outputs differ"

    return expect_ok(ctx, lambda: load_pruned(p, network_def=tiny_densenet()), verify)


@case("checkpoints", "resume.pt of another format", "error naming the file and format")
def _(ctx):
    from monai_iaprune.handlers import PruneResumeHandler

    p = _state_file(ctx, {"format": "something/9"}, "resume.pt")
    return expect_error(ctx, lambda: PruneResumeHandler(p, None, resume=True), "resume.pt", "resume file")


@case("checkpoints", "truncated resume.pt", "error naming the file")
def _(ctx):
    from monai_iaprune.handlers import PruneResumeHandler

    p = _state_file(
        ctx, {"format": "monai_iaprune.resume/1", "settings": {}, "w": list(range(1000))}, "resume.pt"
    )
    p.write_bytes(p.read_bytes()[:100])
    return expect_error(ctx, lambda: PruneResumeHandler(p, None, resume=True), "resume.pt")


# ==================================================================================== command line
def _cli_err(ctx: Ctx, extra: list[str], *words: str, trained=True) -> Result:
    b = ctx.bundle(trained=trained)
    return cli_error(ctx, b, prune_args(*extra), *words)


for _args, _words, _quick in (
    (["--overwrite", "maybe"], ("overwrite", "maybe"), True),
    (["--resume", "perhaps"], ("resume", "perhaps"), False),
    (["--export_onnx", "sure"], ("export_onnx", "sure"), False),
    (["--explain", "maybe"], ("explain", "maybe"), False),
    (["--recalibrate_bn", "2"], ("recalibrate_bn", "2"), False),
    (["--fresh_optimizer", "nah"], ("fresh_optimizer", "nah"), False),
    (["--cost_aware", "perhaps"], ("cost_aware", "perhaps"), False),
    (["--train_if_missing", "ok"], ("train_if_missing", "ok"), False),
    (["--method", "lrpp"], ("method", "lrpp"), False),
    (["--ratio", "0"], ("ratio", "0"), False),
    (["--ratio", "1.5"], ("ratio", "1.5"), False),
    (["--ratio", "-1"], ("ratio", "-1"), False),
    (["--ratio", "abc"], ("ratio", "abc"), False),
    (["--stages", "0"], ("stages", "0"), False),
    (["--stages", "1.5"], ("stages", "1.5"), False),
    (["--steps", "0"], ("steps", "0"), False),
    (["--prune_target", "latency", "--speedup", "0.8"], ("speedup", "0.8"), False),
    (["--prune_target", "latency"], ("speedup",), False),
    (["--prune_target", "flops"], ("prune_target", "flops"), False),
    (["--speedup", "2"], ("speedup", "latency"), False),
    (["--finetune_epochs", "-1"], ("finetune_epochs", "-1"), False),
    (["--stage_epochs", "-1"], ("stage_epochs", "-1"), False),
    (["--finetune_epochs", "0"], ("finetune_epochs",), False),
    (["--calibration_batches", "0"], ("calibration_batches", "0"), False),
    (["--relevance_batches", "0"], ("relevance_batches", "0"), False),
    (["--finetune_lr", "-0.1"], ("finetune_lr", "-0.1"), False),
    (["--depth_ratio", "1.0"], ("depth_ratio", "1.0"), False),
    (["--min_blocks_per_stage", "-1"], ("min_blocks_per_stage", "-1"), False),
    (["--explain_weight", "-1"], ("explain_weight", "-1"), False),
    (["--min_agreement", "1.5"], ("min_agreement", "1.5"), False),
    (["--agreement_ratios", "[0.5,1.2]"], ("agreement_ratios", "1.2"), False),
    (["--latency_repeats", "0"], ("latency_repeats", "0"), False),
    (["--batch_size", "0"], ("batch_size", "0"), False),
    (["--learning_rate", "-1"], ("learning rate", "-1"), False),
    (["--prune_kwargs", "{'max_layer_ratio': 2}"], ("max_layer_ratio", "2"), False),
    (["--prune_kwargs", "{'round_to': 0}"], ("round_to", "0"), False),
    (["--prune_kwargs", "{'nonsense': 1}"], ("nonsense",), False),
    (["--relevance_kwargs", "{'bogus': 1}"], ("bogus",), False),
    (["--explain", "true", "--explain_kwargs", "{'n_imagez': 2}"], ("explain_kwargs", "n_imagez"), False),
    (["--explain", "true", "--explain_kwargs", "{'n_steps': 0}"], ("n_steps", "0"), False),
    (["--ratoi", "0.3"], ("ratoi", "ratio"), True),
    (["--finetune_epoch", "3"], ("finetune_epoch",), False),
    (["--target", "banana"], ("target", "banana"), False),
    (["--explain_method", "nope", "--explain", "true"], ("explain_method", "nope"), False),
    (["--patch_mode", "weird"], ("patch_mode", "weird"), False),
    (["--depth_ratio", "0.2", "--depth_method", "nope"], ("depth_method", "nope"), False),
    (["--dataset_dir", "/no/such/data"], ("dataset_dir", "/no/such/data"), False),
    (["--num_classes", "0"], ("num_classes", "0"), False),
    (["--image_size", "4"], ("size", "4"), False),
    (["--resume", "true"], ("resume",), False),
):
    case("cli", "bundle " + " ".join(_args), "exit != 0 naming " + "/".join(_words), quick=_quick)(
        lambda ctx, a=_args, w=_words: _cli_err(ctx, a, *w)
    )


@case("cli", "bundle prune, host model.pt holding a pickled payload", "refused, no code run")
def _(ctx):
    import torch

    b = ctx.bundle(trained=False)
    (b / "models").mkdir()
    torch.save({"x": RunsCode(ctx.marker)}, b / "models" / "model.pt")
    return cli_error(ctx, b, prune_args(), "model.pt", "weights_only")


@case("cli", "bundle prune, host model.pt of another num_classes", "error naming the mismatch")
def _(ctx):
    b = ctx.bundle()
    return cli_error(ctx, b, prune_args("--num_classes", "3"), "model.pt", "network_def")


@case("cli", "bundle prune, truncated host model.pt", "error naming the file")
def _(ctx):
    b = ctx.bundle()
    p = b / "models" / "model.pt"
    p.write_bytes(p.read_bytes()[:1000])
    return cli_error(ctx, b, prune_args(), "model.pt")


@case("cli", "bundle prune, existing outputs, --overwrite false", "refused, all files kept")
def _(ctx):
    b = ctx.bundle()
    (b / "models" / "model_pruned.pt").write_bytes(b"keep me")
    return cli_error(ctx, b, prune_args("--overwrite", "false"), "refusing to overwrite", "model_pruned.pt")


@case("cli", "bundle prune, existing outputs, --overwrite true", "handled: outputs replaced, host kept")
def _(ctx):
    b = ctx.bundle()
    (b / "models" / "model_pruned.pt").write_bytes(b"old")
    return cli_ok(ctx, b, prune_args("--overwrite", "true"), pruned_output_ok, may_change=["model_pruned.pt"])


@case("cli", "bundle prune, --resume true after a finished run", "error: no resume file")
def _(ctx):
    b = ctx.bundle()
    return cli_error(ctx, b, prune_args("--resume", "true"), "no resume file")


@case("cli", "bundle evaluate on a pickled eval_checkpoint", "refused, no code run")
def _(ctx):
    import torch

    b = ctx.bundle()
    torch.save({"state_dict": {}, "pruned_structure": RunsCode(ctx.marker)}, b / "models" / "evil.pt")
    args = ["run", "--config_file", "['configs/train.json','configs/evaluate.json']", *TINY,
            "--eval_checkpoint", "models/evil.pt"]  # fmt: skip
    return cli_error(ctx, b, args, "evil.pt")


@case("cli", "bundle evaluate_pruned without a pruned checkpoint", "error naming the file")
def _(ctx):
    b = ctx.bundle()
    args = ["run", "evaluate_pruned", "--config_file", "['configs/train.json','configs/prune.json']", *TINY]
    return cli_error(ctx, b, args, "model_pruned.pt")


@case(
    "cli", "bundle evaluate_pruned twice (existing prune_evaluate.json)", "refused without --overwrite true"
)
def _(ctx):
    b = ctx.bundle()
    for name in ("model_pruned.pt",):
        shutil.copy2(ctx.shared.reference() / "models" / name, b / "models" / name)
    (b / "eval").mkdir()
    (b / "eval" / "prune_evaluate.json").write_text('{"keep": "me"}')
    args = ["run", "evaluate_pruned", "--config_file", "['configs/train.json','configs/prune.json']", *TINY]
    return cli_error(ctx, b, args, "prune_evaluate.json", "overwrite")


@case("cli", "overlay on a host without validate#evaluator", "error naming the key and the override")
def _(ctx):
    from monai_iaprune.overlay import overlay_path

    b = ctx.bundle()
    cfg = json.loads((b / "configs" / "train.json").read_text())
    cfg["validate"]["my_evaluator"] = cfg["validate"].pop("evaluator")
    cfg["train"]["handlers"] = cfg["train"]["handlers"][1:]
    (b / "configs" / "host.json").write_text(json.dumps(cfg))
    args = ["run", "prune", "--config_file", f"['configs/host.json','{overlay_path()}']", *TINY]
    return cli_error(ctx, b, args, "validate#evaluator", "--host_evaluator")


def _overlay_err(ctx: Ctx, extra: list[str], *words: str) -> Result:
    from monai_iaprune.overlay import overlay_path

    b = ctx.bundle()
    args = ["run", "prune", "--config_file", f"['configs/train.json','{overlay_path()}']", *TINY, *extra]
    return cli_error(ctx, b, args, *words)


case("cli", "overlay --ratio 2", "exit != 0 naming ratio")(
    lambda ctx: _overlay_err(ctx, ["--ratio", "2"], "ratio", "2")
)
case("cli", "overlay --method foo", "exit != 0 naming the method")(
    lambda ctx: _overlay_err(ctx, ["--method", "foo"], "method", "foo")
)
case("cli", "overlay --ratoi 0.3 (misspelt)", "exit != 0 naming the unknown key")(
    lambda ctx: _overlay_err(ctx, ["--ratoi", "0.3"], "ratoi", "ratio")
)
case("cli", "overlay --host_checkpoint missing", "exit != 0 naming the file")(
    lambda ctx: _overlay_err(ctx, ["--host_checkpoint", "models/none.pt"], "none.pt")
)
case("cli", "overlay --overwrite maybe", "exit != 0 naming overwrite")(
    lambda ctx: _overlay_err(ctx, ["--overwrite", "maybe"], "overwrite", "maybe")
)


@case("cli", "python -m monai_iaprune.overlay --copy onto an existing file", "refused, file kept")
def _(ctx):
    (ctx.tmp / "prune_overlay.json").write_text("{}")
    ctx.snapshot()
    proc = subprocess.run([sys.executable, "-m", "monai_iaprune.overlay", "--copy", str(ctx.tmp)], env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    if ctx.lost():
        return Result("lost_file", "; ".join(ctx.lost()))
    ok = proc.returncode != 0 and "refusing to overwrite" in proc.stderr
    return Result("clear_error" if ok else "raw_error", excerpt(proc.stderr, ["overwrite"]))


# ==================================================================================== concurrency
@case(
    "concurrency",
    "two runs on one bundle at once",
    "second fails naming the first; first completes",
    quick=True,
)
def _(ctx):
    b = ctx.bundle()
    ctx.snapshot()
    first = subprocess.Popen([sys.executable, "-m", "monai.bundle", *prune_args()], cwd=b, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lock = b / "models" / ".monai_iaprune.lock"
    t0 = time.time()
    while not lock.exists() and first.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    rc2, out2 = cli(b, prune_args())
    _, err1 = first.communicate(timeout=300)
    if ctx.lost():
        return Result("lost_file", "; ".join(ctx.lost()))
    if first.returncode != 0:
        return Result("raw_error", "first run failed: " + excerpt(err1))
    if rc2 == 0:
        return Result("silent_wrong", "both runs wrote the same outputs")
    wrong = pruned_output_ok(b)
    if wrong:
        return Result("silent_wrong", wrong)
    ok = f"pid {first.pid}" in out2 and "lock" in out2
    return Result("clear_error" if ok else "raw_error", excerpt(out2, [f"pid {first.pid}", "lock"]))


@case("concurrency", "stale lock of a dead process", "handled: taken over, run completes")
def _(ctx):
    import socket

    b = ctx.bundle()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"pid": dead.pid, "host": socket.gethostname(), "start": time.time() - 60}
    (b / "models" / ".monai_iaprune.lock").write_text(json.dumps(info))
    return cli_ok(ctx, b, prune_args(), pruned_output_ok, may_change=[".monai_iaprune.lock"])


@case("concurrency", "lock held by a process on another host", "refused naming host and lock")
def _(ctx):
    b = ctx.bundle()
    (b / "models" / ".monai_iaprune.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": 0}))
    return cli_error(ctx, b, prune_args(), "elsewhere", ".monai_iaprune.lock")


@case("concurrency", "garbage lock file", "refused naming the lock file")
def _(ctx):
    b = ctx.bundle()
    (b / "models" / ".monai_iaprune.lock").write_text("%%garbage")
    return cli_error(ctx, b, prune_args(), ".monai_iaprune.lock")


@case("concurrency", "stale temporary files of a killed run", "handled: cleaned, run completes")
def _(ctx):
    b = ctx.bundle()
    (b / "models" / ".model_pruned.pt.999.cafe.tmp").write_bytes(b"half written")
    (b / "eval").mkdir()
    (b / "eval" / ".prune_report.999.cafe.tmp").mkdir()
    return cli_ok(ctx, b, prune_args(), pruned_output_ok, may_change=[".tmp"])


@case("concurrency", "read-only output folder (as a non-root user: chmod; as root: a file in the way)",
      "refused before any work")  # fmt: skip
def _(ctx):
    b = ctx.bundle()
    if os.geteuid() != 0:
        (b / "eval").mkdir()
        os.chmod(b / "eval", 0o555)
        args = prune_args()
    else:  # root writes through permission bits: make the report folder's parent a regular file
        (b / "blocked").write_text("a file")
        args = prune_args("--prune_report_dir", "blocked/eval")
    try:
        return cli_error(ctx, b, args, "not writable")
    finally:
        with contextlib.suppress(OSError):
            os.chmod(b / "eval", 0o755)


@case("concurrency", "disk full while writing the pruned checkpoint", "error; nothing written, files kept")
def _(ctx):
    import errno

    import torch
    from monai.bundle import run

    import monai_iaprune.pruning.checkpoint as ck

    b = ctx.bundle()
    real = ck.torch.save

    def full(obj, f, *a, **k):
        if isinstance(obj, dict) and "pruned_structure" in obj:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    def go():
        ck.torch.save = full
        try:
            kw = {a.lstrip("-"): _literal(v) for a, v in zip(prune_args()[4::2], prune_args()[5::2])}
            run("prune", config_file=[str(b / "configs" / "train.json"), str(b / "configs" / "prune.json")],
                bundle_root=str(b), **kw)  # fmt: skip
        finally:
            ck.torch.save = real

    assert torch  # imported for the save patch's module
    res = expect_error(ctx, go, "no space left")
    left = [p.name for p in (b / "models").iterdir() if p.name not in ("model.pt", "resume.pt")]
    if res.outcome == "clear_error" and (left or (b / "eval" / "prune_report.json").exists()):
        return Result("silent_wrong", f"left behind: {left}")
    return res


# ============================================================================================ kills
def _kill_case(ctx: Ctx, target: str, nth: int, sig: str, trained: bool = True) -> Result:
    """Run the prune bundle, kill it from inside at ``target``'s ``nth`` call, then rerun and check the result."""
    b = ctx.bundle(trained=trained)
    host = b / "models" / "model.pt"
    before = _sha(host) if trained else None
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_kill",
        target,
        str(nth),
        sig,
        "--",
        *prune_args(*KILL_RUN),
    ]
    proc = subprocess.run(cmd, cwd=b, env=ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return Result("silent_wrong", f"the run was not stopped at {target} #{nth} (rc 0)")
    if "KILL POINT REACHED" not in proc.stdout + proc.stderr:
        return Result("raw_error", "kill point not reached: " + excerpt(proc.stdout + proc.stderr))
    if trained and _sha(host) != before:
        return Result("lost_file", "host models/model.pt changed")
    report, ckpt = b / "eval" / "prune_report.json", b / "models" / "model_pruned.pt"
    if report.exists() and not ckpt.exists():
        return Result("silent_wrong", "a report without its checkpoint")
    if ckpt.exists():  # only a completed rename can have put it there
        try:
            shapes(ckpt)
        except Exception as e:  # noqa: BLE001
            return Result("silent_wrong", f"a partial model_pruned.pt: {e}")
    resume = b / "models" / "resume.pt"
    rerun = prune_args(*KILL_RUN) + (["--resume", "true"] if resume.exists() else [])
    how = "rerun with --resume true" if resume.exists() else "rerun (no resume file yet)"
    rc, out = cli(b, rerun)
    if (
        rc != 0 and "refusing to overwrite" in out
    ):  # killed between the renames: the rerun completed that commit (journal), then refuses to replace it
        if not (ckpt.exists() and report.exists()):
            return Result(
                "silent_wrong", "a commit killed between its renames was not completed by the rerun"
            )
        wrong = pruned_output_ok(b, ctx.shared.reference_shapes() if trained else None)
        if wrong:
            return Result("silent_wrong", f"the completed interrupted commit: {wrong}")
        rc, out = cli(b, rerun + ["--overwrite", "true"])
        how += " (it completed the interrupted commit, then --overwrite true, as the message says)"
    if rc != 0:
        return Result("raw_error", f"{how} failed: " + excerpt(out))
    if trained and _sha(host) != before:
        return Result("lost_file", "host models/model.pt changed")
    # a run that trains model.pt itself draws other random numbers than one that loads it
    ref = (
        ctx.shared.reference_shapes()
        if trained
        else shapes(ctx.shared.reference() / "models" / "model_pruned.pt")
    )
    wrong = pruned_output_ok(b, ref)
    if wrong:
        return Result("silent_wrong", f"{how}: {wrong}")
    if resume.exists():
        return Result("silent_wrong", "resume.pt left after the finished run")
    return Result("handled", f"{how}: same architecture as the uninterrupted run, nothing left behind")


KILL_POINTS = (
    (
        "relevance collection (collector call 1)",
        "monai_iaprune.handlers.relevance_collector:channel_relevance",
        1,
    ),
    (
        "relevance collection (collector call 4)",
        "monai_iaprune.handlers.relevance_collector:channel_relevance",
        4,
    ),
    ("pruning (prune() call 1)", "monai_iaprune.handlers.relevance_pruning_handler:prune", 1),
    ("pruning (prune() call 2)", "monai_iaprune.handlers.relevance_pruning_handler:prune", 2),
    ("fine-tune (epoch 1, first step)", "torch.optim.Adam:step", 1),
    ("fine-tune (epoch 2)", "torch.optim.Adam:step", 3),
    (
        "BatchNorm re-calibration (call 2)",
        "monai_iaprune.handlers.relevance_pruning_handler:recalibrate_batchnorm",
        2,
    ),
    ("writing resume.pt (epoch 2 start)", "monai_iaprune.handlers.prune_resume_handler:atomic_write", 2),
    ("final save (TorchScript export)", "monai_iaprune.pruning.checkpoint:export_torchscript", 1),
    ("final commit (after the first rename)", "mid_commit", 1),
)
for _sig in ("KILL", "INT"):
    for _where, _target, _nth in KILL_POINTS:
        if _sig == "INT" and not any(w in _where for w in ("collector call 1", "epoch 2", "TorchScript")):
            continue  # SIGINT (KeyboardInterrupt) at three points; SIGKILL at all
        case(
            "kills",
            f"SIG{_sig} during {_where}",
            "no partial output; rerun (resume) gives the same architecture",
            quick=_sig == "KILL" and "prune() call 2" in _where,
        )(  # fmt: skip
            lambda ctx, t=_target, n=_nth, s=_sig: _kill_case(ctx, t, n, s)
        )
case("kills", "SIGKILL while pre-training saves models/model.pt", "no partial model.pt; rerun trains it")(
    lambda ctx: _kill_case(ctx, "monai_iaprune.bundle:atomic_write", 1, "KILL", trained=False)
)
case(
    "kills", "SIGTERM during pruning (prune() call 2)", "no partial output; rerun gives the same architecture"
)(lambda ctx: _kill_case(ctx, "monai_iaprune.handlers.relevance_pruning_handler:prune", 2, "TERM"))


def _kill_entry(argv: list[str]) -> None:
    """``fault_cases.py _kill MODULE:ATTR NTH SIG -- monai.bundle args``: run the bundle, signal self at that call."""
    import importlib
    import runpy

    target, nth, sig = argv[0], int(argv[1]), getattr(signal, f"SIG{argv[2]}")
    # a process started in the background inherits SIGINT ignored; a user's Ctrl-C reaches Python's handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rest = argv[argv.index("--") + 1 :]
    calls = [0]

    def die() -> None:
        print("KILL POINT REACHED", target, nth, flush=True)
        os.kill(os.getpid(), sig)
        time.sleep(5)  # SIGINT is delivered to the main thread at the next bytecode

    if target == "mid_commit":
        from monai_iaprune.utils import outputs

        real_commit, real_replace = outputs.OutputTransaction.commit, os.replace

        def replace_then_die(src, dst):
            real_replace(src, dst)
            die()

        def commit(self):
            os.replace = replace_then_die
            try:
                return real_commit(self)
            finally:
                os.replace = real_replace

        outputs.OutputTransaction.commit = commit
    else:
        mod_name, attr = target.split(":")
        try:
            owner = importlib.import_module(mod_name)
        except ImportError:  # a class path: module.Class
            mod_name, cls = mod_name.rsplit(".", 1)
            owner = getattr(importlib.import_module(mod_name), cls)
        real = getattr(owner, attr)

        def wrapper(*a, **k):
            calls[0] += 1
            if calls[0] == nth:
                die()
            return real(*a, **k)

        setattr(owner, attr, wrapper)
    sys.argv = ["monai.bundle", *rest]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


# ============================================================================================ runner
def run_cases(
    cases: list[Case], workdir: Path, log: Callable[[str], None] = lambda s: print(s, flush=True)
) -> list[dict]:
    shared = Shared(workdir)
    rows = []
    for c in cases:
        tmp = workdir / c.id
        tmp.mkdir(parents=True)
        ctx = Ctx(tmp, shared)
        t0 = time.perf_counter()
        try:
            res = c.fn(ctx)
        except Exception as e:  # noqa: BLE001 - a broken case setup is reported, not hidden
            res = Result("raw_error", "case setup failed: " + excerpt(traceback.format_exc() + chain(e)))
        if ctx.marker.exists():
            res = Result("foreign_code", f"the pickled payload ran ({MARKER} created); " + res.message)
        row = {"id": c.id, "area": c.area, "case": c.name, "expected": c.expected, "outcome": res.outcome,
               "message": res.message.replace("\n", " ")[:220], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        rows.append(row)
        log(f"{row['id']:16s} {row['outcome']:13s} {row['seconds']:6.1f}s  {c.name} | {row['message'][:120]}")
    return rows


def write_results(
    rows: list[dict], wall_s: float, out: Path = RESULTS, cmd: str = "", note: str = ""
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["id", "area", "case", "expected", "outcome", "message"]
    with (out / "fault_cases.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    areas = list(dict.fromkeys(r["area"] for r in rows))
    lines = ["# Fault catalogue (issue #13)", "",
             f"{len(rows)} cases, wall time {wall_s / 60:.1f} min (`{cmd or 'python benchmarks/fault_cases.py'}`, "
             f"{os.cpu_count()} CPU core(s) shared with other jobs, under nice){note}. Bad outcomes: "
             + ", ".join(BAD) + ".", "",
             "| area | " + " | ".join(OUTCOMES) + " | total |", "|---" * (len(OUTCOMES) + 2) + "|"]  # fmt: skip
    for a in [*areas, "all"]:
        sel = [r for r in rows if a in ("all", r["area"])]
        counts = [sum(r["outcome"] == o for r in sel) for o in OUTCOMES]
        lines.append(f"| {a} | " + " | ".join(map(str, counts)) + f" | {len(sel)} |")
    lines += ["", "| id | case | expected | outcome | message |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["id"], r["case"], r["expected"], f"**{r['outcome']}**" if r["outcome"] in BAD else r["outcome"],
                 r["message"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    (out / "fault_cases.md").write_text("\n".join(lines) + "\n")


def select(quick: bool = False, only: str | None = None) -> list[Case]:
    cases = [c for c in CASES if c.quick] if quick else list(CASES)
    if only:
        keys = only.split(",")
        cases = [c for c in cases if c.area in keys or c.id in keys]
    return cases


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_kill":
        _kill_entry(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the representative subset")
    p.add_argument("--only", help="areas or case ids, comma separated")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--update", action="store_true", help="replace only the selected cases' rows in --out's table"
    )
    args = p.parse_args(argv)
    cases = select(args.quick, args.only)
    import monai.bundle  # noqa: F401 - imported once; the command-line cases fork from here
    import torch

    torch.set_num_threads(1)  # a forked child must not inherit a busy OpenMP pool
    if args.list:
        for c in cases:
            print(f"{c.id:16s} {c.name}")
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault_cases_") as d:
        rows = run_cases(cases, Path(d))
    wall = time.perf_counter() - t0
    if args.update and (args.out / "fault_cases.csv").is_file():
        new = {r["id"]: r for r in rows}
        with (args.out / "fault_cases.csv").open() as f:
            old_rows = list(csv.DictReader(f))
        rows = [new.pop(r["id"], r) for r in old_rows] + list(new.values())
        md = (args.out / "fault_cases.md").read_text().splitlines()
        wall = float(md[2].split("wall time ")[1].split(" min")[0]) * 60 if len(md) > 2 else wall
        args.note = f"; rows {', '.join(c.id for c in cases)} re-run with --update --only {args.only}"
    cmd = (
        "python benchmarks/fault_cases.py"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else "")
    )
    write_results(rows, wall, args.out, cmd, getattr(args, "note", ""))
    bad = [r for r in rows if r["outcome"] in BAD]
    print(
        f"{len(rows)} cases in {wall:.0f} s; "
        + ", ".join(f"{o} {sum(r['outcome'] == o for r in rows)}" for o in OUTCOMES)
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
