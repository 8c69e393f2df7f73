"""The trainer (``resnext.train``): the default run learns, resume is exact, DDP on 2 CPU
processes, every bad input gives a one-line error, and the options run.

Most runs use the eager model at 8x8 (a fraction of a second per step); one short run goes
through the fused kernels (Triton's interpreter without a GPU) and is compared with its eager twin.
"""

import argparse
import dataclasses
import importlib.util
import json
import pickle
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from resnext import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The digits default recipe, made cheaper: 8x8 inputs, and BN statistics over fewer images.
SMALL = ["--image-size", "8", "--precise-bn", "256"]
SYNTHETIC = ["--synthetic", "--arch", "resnext_tiny", "--image-size", "8", "--synthetic-samples", "64",
             "--batch-size", "32", "--epochs", "1"]


def run(argv, capsys):
    """``train.main(argv)`` in this process: (exit status, stdout, stderr)."""
    rc = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_top1(stdout):
    last = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"final top-1: ([\d.]+)% .* on (\d+) held-out images.*", last)
    assert match, f"last line is not the final top-1 line: {last!r}"
    return float(match.group(1)), int(match.group(2))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def assert_error(rc, err, *fragments):
    """Exit status 2 and exactly one ``error: ...`` line naming each fragment, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# The default run learns


@pytest.mark.slow
def test_default_recipe_learns(tmp_path, capsys):
    # The README's default run without --fused-kernels (the kernels are compared below): the
    # same data, model and recipe, so the same >= 90% top-1 on the held-out digits.
    rc, out, _ = run(["--out", tmp_path], capsys)
    assert rc == 0
    top1, n_val = final_top1(out)
    assert n_val == 360
    assert top1 >= 90.0
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] < 2.3  # below chance, then lower
    assert rows[-1]["top1"] == pytest.approx(top1, abs=0.01)
    for key in ("train_loss", "val_loss", "top1", "top5", "lr", "images_per_s", "epoch_time"):
        assert key in rows[-1]
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["config"]["arch"] == "resnext_tiny" and ckpt["config"]["epochs"] == 2
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0
    assert load(tmp_path / "best.pt")["top1"] == pytest.approx(max(r["top1"] for r in rows))


@pytest.mark.slow
def test_fused_kernels_run_matches_eager(tmp_path, capsys):
    # Two steps of 512 digits through the fused kernels (the interpreter on CPU), then the same
    # run eager: the trainer must give the same losses and accuracy either way.
    args = SMALL + ["--batch-size", "512", "--epochs", "1"]
    rc, out, err = run(args + ["--fused-kernels", "--out", tmp_path / "fused"], capsys)
    assert rc == 0, err
    assert "fused kernels" in out
    rc, out_eager, err = run(args + ["--out", tmp_path / "eager"], capsys)
    assert rc == 0, err
    fused, eager = metrics(tmp_path / "fused")[0], metrics(tmp_path / "eager")[0]
    # float32 kernels vs oneDNN: different summation orders, amplified a little by two steps
    assert fused["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert fused["val_loss"] == pytest.approx(eager["val_loss"], rel=2e-2)
    assert abs(fused["top1"] - eager["top1"]) <= 2.0
    assert load(tmp_path / "fused" / "last.pt")["config"]["fused_kernels"] == "conv"


@pytest.mark.slow
def test_block_level_fused_kernels_train_as_eager(tmp_path, capsys):
    """``--fused-kernels block``: every bottleneck through the Triton kernels; the same losses as the
    eager run to float32 rounding (two steps and an evaluation), recorded in the checkpoint."""
    rc, out, err = run(SYNTHETIC + ["--fused-kernels", "block", "--out", tmp_path / "block"], capsys)
    assert rc == 0, err
    rc, _, err = run(SYNTHETIC + ["--out", tmp_path / "eager"], capsys)
    assert rc == 0, err
    block, eager = metrics(tmp_path / "block")[0], metrics(tmp_path / "eager")[0]
    assert block["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert block["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)
    assert load(tmp_path / "block" / "last.pt")["config"]["fused_kernels"] == "block"


@pytest.mark.slow
def test_compile_with_fused_kernels(tmp_path, capsys):
    """``--compile --fused-kernels``: the fused model compiles with no graph break (the fused op is
    one node of the graph) and trains and evaluates as the eager fused run does."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # torch 2.13's CPU Inductor miscomputes some conv weight gradients with layout optimization
    # on, the unfused model's too (tests/test_compile_export.py); the GPU is unaffected
    with torch._inductor.config.patch(layout_optimization=False):
        rc, out, err = run(SYNTHETIC + ["--fused-kernels", "--compile", "--out", tmp_path / "compiled"], capsys)
    assert rc == 0, err
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    rc, out, err = run(SYNTHETIC + ["--fused-kernels", "--out", tmp_path / "eager"], capsys)
    assert rc == 0, err
    compiled, eager = metrics(tmp_path / "compiled")[0], metrics(tmp_path / "eager")[0]
    # the same kernels; Inductor reorders the sums of the ops around them (~1e-6 relative)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    ckpt_compiled, ckpt_eager = load(tmp_path / "compiled" / "last.pt"), load(tmp_path / "eager" / "last.pt")
    assert ckpt_compiled["config"]["compile"] is True
    assert ckpt_compiled["model"].keys() == ckpt_eager["model"].keys()  # no "_orig_mod." prefix


# ---------------------------------------------------------------------------------------------
# Resume equals uninterrupted training


RESUME_ARGS = SMALL + ["--epochs", "2", "--batch-size", "128"]  # 11 steps per epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main([str(a) for a in RESUME_ARGS + ["--out", out]]) == 0
    return out


@pytest.fixture
def sigint_as_in_a_terminal():
    """SIGINT handled as in an interactive Python (KeyboardInterrupt), whatever this process inherited:
    a background job starts with SIGINT ignored, and the trainer must restore what it found."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_as_in_a_terminal")
@pytest.mark.parametrize("stop_after", [4, 11], ids=["mid-epoch", "epoch-boundary"])
def test_ctrl_c_then_resume_equals_uninterrupted(stop_after, uninterrupted, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real_step = train.train_step

    def step_then_ctrl_c(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == stop_after:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers
        return loss

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    rc, _, err = run(RESUME_ARGS + ["--out", tmp_path], capsys)
    assert rc == 130, err
    assert f"--resume {tmp_path / 'last.pt'}" in err
    stopped = load(tmp_path / "last.pt")
    assert (stopped["epoch"], stopped["step"]) == (0, stop_after)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.setattr(train, "train_step", real_step)
    rc, out, err = run(["--resume", tmp_path / "last.pt"], capsys)  # config comes from the checkpoint
    assert rc == 0, err
    assert f"resumed from {tmp_path / 'last.pt'} at epoch 1/2, {stop_after} of 11 steps done\n" in out
    resumed, reference = load(tmp_path / "last.pt"), load(uninterrupted / "last.pt")
    assert_same_tensors(resumed["model"], reference["model"], "model")
    for (i, a), (j, b) in zip(resumed["optimizer"]["state"].items(), reference["optimizer"]["state"].items()):
        assert_same_tensors(a, b, f"optimizer state {i}")
    assert resumed["scheduler"] == reference["scheduler"]
    rows, ref_rows = metrics(tmp_path), metrics(uninterrupted)
    assert len(rows) == len(ref_rows) == 2
    for row, ref in zip(rows, ref_rows):
        assert row["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-12)  # summed in two parts
        for key in ("epoch", "val_loss", "top1", "top5", "lr"):
            assert row[key] == ref[key], key
    # The resumed epoch's rate and time cover only the steps after the resume: named so that
    # nobody reads them as a full epoch's. The next epoch is whole again.
    assert rows[0]["partial_epoch"] is True and rows[0]["resumed_at_step"] == stop_after
    assert "images_per_s" not in rows[0] and "epoch_time" not in rows[0]
    assert rows[0]["images_per_s_since_resume"] >= 0 and rows[0]["epoch_time_since_resume"] > 0
    assert "partial_epoch" not in rows[1] and rows[1]["images_per_s"] > 0 and rows[1]["epoch_time"] > 0


def test_resume_finished_run_and_eval_only(uninterrupted, capsys):
    top1 = metrics(uninterrupted)[-1]["top1"]
    rc, out, err = run(["--resume", uninterrupted / "last.pt", "--eval-only"], capsys)
    assert rc == 0, err
    assert final_top1(out) == (pytest.approx(top1, abs=0.005), 360)
    rc, out, err = run(["--resume", uninterrupted / "best.pt", "--eval-only"], capsys)  # weights only
    assert rc == 0, err


def test_resume_finished_run_rewrites_nothing(uninterrupted, capsys, monkeypatch):
    # A requeue loop passes --resume last.pt until the run is done: once it is, that is exit 0,
    # one line, and no file in the run's directory is touched (nor data or model built).
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in uninterrupted.iterdir()}
    assert set(before) == {"metrics.jsonl", "last.pt", "best.pt", "curves.png"}
    monkeypatch.setattr(train, "build_data", lambda *a: pytest.fail("built the data of a finished run"))
    rc, out, err = run(["--resume", uninterrupted / "last.pt"], capsys)
    assert rc == 0 and err == ""
    assert out.splitlines() == [f"resumed from {uninterrupted / 'last.pt'}: the run is already complete after "
                                "epoch 2 of 2; nothing trained or rewritten (--epochs N trains further, "
                                "--eval-only evaluates it)"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in uninterrupted.iterdir()} == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    args = SMALL + ["--batch-size", "512", "--epochs", "2", "--out", tmp_path]  # 2 steps per epoch
    real_step, calls = train.train_step, {"n": 0}

    def nan_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        loss = real_step(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train, "train_step", nan_in_epoch_2)
    rc, _, err = run(args, capsys)
    assert rc == 1
    assert "loss is nan at epoch 2 step 1" in err and "last good checkpoint" in err
    kept = load(tmp_path / "last.pt")
    assert kept["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in kept["model"].values() if t.is_floating_point())
    assert len(metrics(tmp_path)) == 1


# ---------------------------------------------------------------------------------------------
# Distributed: 2 CPU processes, gloo


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "resnext.train", *SMALL, "--batch-size", "64", "--epochs", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints and writes: one final line, one metrics row, no stray files.
    assert proc.stdout.count("final top-1") == 1
    top1, n_val = final_top1(proc.stdout)
    assert n_val == 360  # the validation counts of both ranks (180 each) were summed
    assert (top1 * 360 / 100) == pytest.approx(round(top1 * 360 / 100), abs=0.02)
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    assert len(metrics(tmp_path)) == 1
    ckpt = load(tmp_path / "last.pt")
    assert len(ckpt["rng"]) == 2  # each rank's RNG state, for an exact resume
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["config"]["lr"] == pytest.approx(0.012 * 64 * 2 / 256)  # scaled by the global batch


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    assert train.main([str(a) for a in SMALL + ["--batch-size", "512", "--epochs", "1", "--out", out]]) == 0
    return out / "last.pt"


@pytest.mark.parametrize("argv, fragments", [
    (["--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
    (["--epochs", "0"], ["--epochs must be at least 1"]),
    (["--arch", "resnet50"], ["unknown --arch 'resnet50'", "resnext50_32x4d"]),
    (["--precise-bn", "-1"], ["--precise-bn"]),
    (["--data", "{tmp}/missing"], ["no such directory"]),
    (["--data", "{tmp}"], ["no train/ folder"]),
    (["--resume", "{tmp}/missing.pt"], ["no such file"]),
    (["--eval-only"], ["error: --eval-only needs --resume CHECKPOINT"]),  # not random weights scored
])
def test_bad_input_one_line_error(argv, fragments, tmp_path, capsys):
    rc, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert_error(rc, err, *fragments)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_image_folder_without_torchvision(tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    rc, _, err = run(["--data", tmp_path], capsys)
    assert_error(rc, err, "torchvision", "pip install torchvision")


def _truncated(checkpoint, path):
    path.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])


@pytest.mark.parametrize("make, reason", [
    (lambda ckpt, path: path.mkdir(), "is a directory"),
    (lambda ckpt, path: path.write_bytes(b""), "is empty (0 bytes)"),
    (_truncated, "is truncated or corrupt (not a complete zip archive)"),
    (lambda ckpt, path: path.write_text("epoch 2, top-1 96%\n"), "is a text file, not a file that torch.save wrote"),
    (lambda ckpt, path: path.write_bytes(bytes(range(7, 256))),
     "is not a file that torch.save wrote (neither a zip archive nor torch's legacy format)"),
    (lambda ckpt, path: path.write_bytes(pickle.dumps([1, 2])),
     "is a plain Python pickle, not a file that torch.save wrote"),
    (lambda ckpt, path: torch.save(torch.zeros(3), path), "holds a Tensor, not a checkpoint dict"),
    (lambda ckpt, path: torch.save([load(ckpt)], path), "holds a list, not a checkpoint dict"),
], ids=["directory", "empty", "truncated", "text", "random-bytes", "pickle", "tensor", "list"])
def test_unreadable_checkpoint_says_why(make, reason, checkpoint, tmp_path, capsys):
    path = tmp_path / "bad.pt"
    make(checkpoint, path)
    rc, _, err = run(["--resume", path], capsys)
    assert_error(rc, err)
    assert err.strip() == f"error: --resume {path}: not a readable checkpoint: it {reason}"


def test_resume_of_a_run_directory_points_at_its_last_pt(checkpoint, capsys):
    rc, _, err = run(["--resume", checkpoint.parent], capsys)
    assert_error(rc, err, f"--resume {checkpoint.parent}: not a readable checkpoint: it is a directory "
                          "(did you mean its last.pt?)")


def test_incomplete_training_checkpoint_names_missing_keys(checkpoint, tmp_path, capsys):
    ckpt = load(checkpoint)
    del ckpt["rng"], ckpt["scheduler"]
    path = tmp_path / "incomplete.pt"
    torch.save(ckpt, path)
    rc, _, err = run(["--resume", path], capsys)
    assert_error(rc, err)
    assert err.strip() == f"error: --resume {path}: not a training checkpoint: it lacks scheduler, rng"


def test_mismatched_checkpoints(checkpoint, tmp_path, capsys):
    rc, _, err = run(["--resume", checkpoint, "--arch", "resnext29_8x64d"], capsys)
    assert_error(rc, err, "trained as resnext_tiny, not resnext29_8x64d")

    ckpt = load(checkpoint)
    ckpt["model"]["fc.weight"] = ckpt["model"]["fc.weight"][:5]  # a 5-class head
    wrong = tmp_path / "wrong_head.pt"
    torch.save(ckpt, wrong)
    rc, _, err = run(["--resume", wrong, "--epochs", "2"], capsys)  # 1 of 1 epochs done: train a second
    assert_error(rc, err, "fc.weight")

    weights = tmp_path / "weights.pt"
    torch.save(load(checkpoint)["model"], weights)
    for path in (weights, checkpoint.parent / "best.pt"):
        rc, _, err = run(["--resume", path], capsys)
        assert_error(rc, err, "weights only", "--eval-only")


@pytest.mark.parametrize("argv, line", [
    (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0"),
    (["--amp", "fp8"], "error: --amp: 'fp8' is not one of bf16, fp16"),  # argparse's, without its usage text
])
def test_command_line_error_has_no_traceback(argv, line, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "resnext.train", *argv, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [line]
    assert proc.stdout == ""


@pytest.mark.parametrize("argv, line", [
    (["--amp", "fp8"], "error: --amp: 'fp8' is not one of bf16, fp16"),
    (["--opt", "adam"], "error: --opt: 'adam' is not one of sgd, adamw"),
    (["--epochs", "two"], "error: --epochs: invalid int value: 'two'"),
    (["--lr", "fast"], "error: --lr: invalid float value: 'fast'"),
    (["--batch-size"], "error: --batch-size: expected one argument"),
    (["--epoch-count", "3"], "error: unrecognized arguments: --epoch-count 3"),
])
def test_argparse_errors_are_one_line(argv, line, capsys):
    rc, out, err = run(argv, capsys)
    assert_error(rc, err)
    assert err.strip() == line and out == ""


@pytest.mark.parametrize("out, make, problem", [
    ("out", lambda out: out.write_text("results"), "exists and is not a directory"),
    ("file/run", lambda out: None, "cannot create it: {tmp}/file is a file"),
    ("out", lambda out: out.mkdir(mode=0o555), "is not writable"),
], ids=["existing-file", "under-a-file", "unwritable-dir"])
def test_bad_out_fails_before_any_work(out, make, problem, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("keep me")
    out = tmp_path / out
    make(out)
    if "writable" in problem and os.access(out, os.W_OK):
        pytest.skip("this user can write to a read-only directory (root)")
    monkeypatch.setattr(train, "build_data", lambda *a: pytest.fail("built the data before checking --out"))
    rc, _, err = run(SYNTHETIC + ["--out", out], capsys)
    assert_error(rc, err)
    assert err.strip() == f"error: --out {out}: {problem.format(tmp=tmp_path)}"
    assert (tmp_path / "file").read_text() == "keep me"
    assert not out.is_file() or out.read_text() == "results"


@pytest.mark.slow
def test_torchrun_sync_bn_on_cpu_is_a_one_line_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "resnext.train", *SYNTHETIC, "--sync-bn", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "error: --sync-bn needs one GPU per process" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: --sync-bn")[0][-2000:]


def test_sync_bn_in_one_process_trains_as_batch_norm(tmp_path, capsys):
    """--sync-bn converts every BatchNorm to nn.SyncBatchNorm, which in a single process (no process
    group) is BatchNorm2d: the same losses, and a checkpoint with the same keys."""
    rc, _, err = run(SYNTHETIC + ["--sync-bn", "--out", tmp_path / "sync"], capsys)
    assert rc == 0, err
    rc, _, err = run(SYNTHETIC + ["--out", tmp_path / "plain"], capsys)
    assert rc == 0, err
    assert metrics(tmp_path / "sync")[0]["train_loss"] == metrics(tmp_path / "plain")[0]["train_loss"]
    sync, plain = load(tmp_path / "sync" / "last.pt"), load(tmp_path / "plain" / "last.pt")
    assert sync["config"]["sync_bn"] is True
    assert_same_tensors(sync["model"], plain["model"], "--sync-bn vs without")


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("extra", [
    ["--amp", "bf16"],
    ["--amp", "fp16"],  # with a GradScaler; torch supports float16 autocast on CPU
    ["--channels-last"],
    ["--opt", "sgd", "--schedule", "step", "--lr-step-epochs", "1", "--label-smoothing", "0.1", "--warmup-epochs", "0.5"],
], ids=["bf16", "fp16", "channels-last", "sgd-step-smoothing"])
def test_options_run(extra, tmp_path, capsys):
    rc, out, err = run(SYNTHETIC + extra + ["--out", tmp_path], capsys)
    assert rc == 0, err
    row = metrics(tmp_path)[0]
    assert all(map(lambda v: v == v, row.values()))  # no NaN
    cfg = load(tmp_path / "last.pt")["config"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if not value.startswith("--"):
            assert str(cfg[flag[2:].replace("-", "_")]) == value
    assert (load(tmp_path / "last.pt")["scaler"] != {}) == (extra == ["--amp", "fp16"])


def test_help_lists_every_option_with_help_and_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # nothing wrapped mid-word
    parser = train.build_parser()
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text == parser.format_help()
    # One entry per option, "--opt {sgd,adamw}  sgd (with --momentum) or adamw (default: ...)",
    # its help on the same line or the next ones.
    options = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries = {block.split()[0].rstrip(","): " ".join(block.split()) for block in re.split(r"\n(?=  -)", options)}
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert set(entries) == {a.option_strings[0] for a in actions} | {"-h"}
    for action in actions:
        flag = action.option_strings[0]
        invocation = (", ".join(action.option_strings) if action.nargs == 0
                      else f"{flag} [{action.metavar}]" if action.nargs == "?"
                      else f"{flag} {action.metavar or action.dest.upper()}")
        assert entries[flag].startswith(invocation + " "), entries[flag]
        help_ = entries[flag][len(invocation):]
        assert re.fullmatch(r" \w.*\S \(default: \S.*\)", help_), f"{flag}: no help text or no default"
        entries[flag] = help_
    # The defaults shown are DATASET_DEFAULTS' and TrainConfig's own, so they cannot drift.
    for name in set().union(*train.DATASET_DEFAULTS.values()):
        entry = entries["--" + name.replace("_", "-")]
        for dataset, defaults in train.DATASET_DEFAULTS.items():
            assert re.search(rf"\b{re.escape(str(defaults[name]))} for (\w+ and )*{dataset}\b", entry), entry
    for field in dataclasses.fields(train.TrainConfig):
        if field.default is not None:
            shown = "off" if field.default is False else str(field.default)
            assert entries["--" + field.name.replace("_", "-")].endswith(f"(default: {shown})"), field.name
    assert entries["--epochs"].endswith("(default: 100 for imagenet, 1 for synthetic, 2 for digits)")


def test_seed_recipe_defaults():
    # ImageNet: SGD, momentum 0.9, lr 0.1 per 256 images scaled with the global batch, wd 1e-4,
    # x0.1 every 30 of 100 epochs.
    cfg = train.resolve_config({"data": "/data/imagenet"}, world_size=8)
    assert (cfg.arch, cfg.opt, cfg.momentum, cfg.weight_decay, cfg.epochs) == ("resnext50_32x4d", "sgd", 0.9, 1e-4, 100)
    assert cfg.lr == pytest.approx(0.1)  # 8 x 32 = 256 images
    assert train.resolve_config({"data": "/d", "batch_size": 64}).lr == pytest.approx(0.025)
    assert train.resolve_config({"data": "/d", "lr": 0.3}, world_size=8).lr == 0.3  # --lr wins
    # --resume restores the config and flags override it
    cfg = train.resolve_config({"epochs": 5}, base={"data": "/d", "epochs": 100, "lr": 0.7, "resume": "x"})
    assert (cfg.epochs, cfg.lr, cfg.resume, cfg.data) == (5, 0.7, None, "/d")

    steps = 3
    cfg = train.resolve_config({"data": "/d"}, world_size=8)
    opt = train.build_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = train.build_scheduler(cfg, opt, steps)
    lrs = []
    for _ in range(100 * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for epoch, lr in [(0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 0.001), (99, 1e-4)]:
        assert lrs[epoch * steps] == pytest.approx(lr) == pytest.approx(lrs[epoch * steps + steps - 1])


def test_cosine_with_warmup():
    cfg = train.resolve_config({"schedule": "cosine", "warmup_epochs": 1, "epochs": 4, "lr": 1.0})
    opt = train.build_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = train.build_scheduler(cfg, opt, 10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[:10] == sorted(lrs[:10]) and lrs[10] == pytest.approx(1.0)
    assert lrs[10:] == sorted(lrs[10:], reverse=True) and lrs[-1] < 0.01


# ---------------------------------------------------------------------------------------------
# --cuda-graphs


@pytest.mark.parametrize("extra, fragment", [
    ([], "--cuda-graphs needs a CUDA GPU"),
    (["--amp", "fp16"], "--cuda-graphs cannot be combined with --amp fp16"),
    (["--compile"], "--cuda-graphs cannot be combined with --compile"),
], ids=["no-gpu", "fp16", "compile"])
def test_cuda_graphs_refusals_are_one_line(extra, fragment, tmp_path, capsys):
    if not extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, err = run(SYNTHETIC + ["--cuda-graphs", "--out", tmp_path / "g", *extra], capsys)
    assert_error(rc, err, fragment)
    assert not (tmp_path / "g").exists()  # refused before any file is written


def test_cuda_graphs_help_says_what_it_costs(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--cuda-graphs" in text and "last partial batch is dropped" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_cuda_graphs_train_as_the_uncaptured_run(fused, tmp_path, capsys):
    """Two epochs with the step captured and replayed, and without: the same losses and accuracy
    (within the rounding of the fused optimizer the graph needs), and a checkpoint that resumes
    either way."""
    args = ["--synthetic", "--arch", "resnext_tiny", "--image-size", "32", "--synthetic-samples", "320",
            "--batch-size", "32", "--epochs", "2", "--amp", "bf16", "--channels-last", "--precise-bn", "0"]
    args += ["--fused-kernels"] if fused else []
    rc, _, err = run(args + ["--out", tmp_path / "plain"], capsys)
    assert rc == 0, err
    rc, _, err = run(args + ["--cuda-graphs", "--out", tmp_path / "graphs"], capsys)
    assert rc == 0, err
    for plain, graphs in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "graphs")):
        assert graphs["train_loss"] == pytest.approx(plain["train_loss"], rel=2e-2), (plain, graphs)
        assert graphs["lr"] == pytest.approx(plain["lr"], rel=1e-6)
        assert abs(graphs["top1"] - plain["top1"]) <= 10.0
    rc, _, err = run(["--resume", tmp_path / "graphs" / "last.pt", "--no-cuda-graphs", "--epochs", "3"], capsys)
    assert rc == 0, err
