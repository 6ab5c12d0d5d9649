"""Atomic outputs (sdsonnx/outputs.py): an output folder that exists is whole.

Unit tests of atomic_output (exception, --force, lock held by another process), then real signals: `sdsonnx
export` and `sdsonnx run` in a subprocess, SIGINT / SIGTERM / SIGKILL at seeded random delays; the output path
must afterwards be absent, byte-identical to the previous output, or a complete new output.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sdsonnx.cli import main
from sdsonnx.errors import OutputExistsError
from sdsonnx.outputs import OutputError, Terminated, atomic_output, siblings
from tiny_models import tiny_checkpoint

def tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` ({} when absent)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def previous_output(path: Path) -> dict[str, str]:
    path.mkdir()
    (path / "result.txt").write_text("old result\n")
    return tree(path)


# ---- unit tests ---------------------------------------------------------------------------------------------------

def test_success_renames_work_area_into_place_and_leaves_no_sibling(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as work:
        assert work == siblings(out.absolute())[1] and work.is_dir() and not out.exists()
        (work / "a.txt").write_text("a")
    assert tree(out) == {"a.txt": hashlib.sha256(b"a").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("previous", [False, True])
def test_exception_leaves_previous_output_or_nothing(tmp_path, previous):
    out = tmp_path / "out"
    before = previous_output(out) if previous else {}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out, force=previous) as work:
            (work / "result.txt").write_text("half")
            raise RuntimeError("boom")
    assert tree(out) == before and out.exists() == previous
    assert (work / "result.txt").read_text() == "half"  # the work area stays (a later resume reads it)
    assert not siblings(out.absolute())[0].exists()  # the lock is released and removed


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    out = tmp_path / "out"
    previous_output(out)
    with pytest.raises(OutputExistsError, match=f"{out} already exists: pass --force"):
        with atomic_output(out):
            raise AssertionError("the body must not run")
    assert not siblings(out.absolute())[1].exists()
    with atomic_output(out, force=True) as work:
        (work / "new.txt").write_text("new")
    assert tree(out) == {"new.txt": hashlib.sha256(b"new").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_new_run_replaces_a_stale_work_area_and_resume_keeps_it(tmp_path):
    out = tmp_path / "out"
    work = siblings(out.absolute())[1]
    work.mkdir()
    (work / "stale.txt").write_text("from a killed run")
    with atomic_output(out, resume=True) as w:
        assert (w / "stale.txt").exists()
    assert (out / "stale.txt").exists()
    work.mkdir()
    (work / "stale.txt").write_text("from a killed run")
    with atomic_output(tmp_path / "out", force=True) as w:
        assert list(w.iterdir()) == []


def test_output_path_that_is_a_file_is_refused_even_with_force(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(OutputError, match="the output path is a file"):
        with atomic_output(tmp_path / "out", force=True):
            pass
    assert (tmp_path / "out").read_text() == "not a folder"


def test_full_disk_is_an_output_error_naming_the_path(tmp_path):
    import errno

    out = tmp_path / "out"
    with pytest.raises(OutputError, match=f"{out}: the disk is full"):
        with atomic_output(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not out.exists()


def test_sigterm_inside_the_block_raises_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Terminated):
        with atomic_output(out) as work:
            (work / "x").write_text("x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored


HOLDER = textwrap.dedent("""
    import sys, time
    from sdsonnx.outputs import atomic_output
    with atomic_output(sys.argv[1]) as work:
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_is_refused_naming_the_lock_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputExistsError, match=rf"being written by another sdsonnx process \(pid {holder.pid}"):
            with atomic_output(out, force=True):
                raise AssertionError("the body must not run")
        result = CliRunner().invoke(main, ["bench", str(tmp_path / "artifact"), "-o", str(out), "--force"])
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.output, result.output
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    with atomic_output(out) as work:  # the kernel released the killed holder's lock
        (work / "x").write_text("x")
    assert out.is_dir()


# ---- real signals -------------------------------------------------------------------------------------------------
# A fork server imports torch, transformers, optimum and sdsonnx once; every command is a forked child process
# (a real process that gets real signals) that runs the CLI's `main`, so the random kill points fall in the
# command's work rather than in its imports, and the file stays fast.

FORK_SERVER = textwrap.dedent("""
    import json, os, signal, sys, time
    import torch, transformers
    from optimum.exporters.onnx import main_export
    import sdsonnx.run, sdsonnx.artifact.export, sdsonnx.artifact.validate
    from sdsonnx.cli import main

    torch.set_num_threads(1)
    for line in sys.stdin:
        job = json.loads(line)
        log = open(job["log"], "w")
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            code = 1
            try:
                main(job["args"], prog_name="sdsonnx")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline, sent, status = start + (job["delay"] or 600), False, None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
            elif time.monotonic() > deadline:
                os.kill(pid, job["signal"] if not sent else signal.SIGKILL)
                sent, deadline = True, time.monotonic() + 60
            time.sleep(0.005)
        print(json.dumps({"status": status, "seconds": time.monotonic() - start}), flush=True)
""")


@pytest.fixture(scope="module")
def fork_server():
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)

    def run_until(args: list[str], delay: float | None, sig: int, log: Path) -> tuple[int, float]:
        """Run the CLI in a forked child; send `sig` after `delay` seconds (None: let it finish)."""
        server.stdin.write(json.dumps({"args": args, "delay": delay, "signal": int(sig), "log": str(log)}) + "\n")
        server.stdin.flush()
        reply = json.loads(server.stdout.readline())
        text = log.read_text()
        assert "Traceback" not in text or "KeyboardInterrupt" in text or "Terminated" in text, text
        return reply["status"], reply["seconds"]

    yield run_until
    server.stdin.close()
    server.wait(30)


def assert_whole(out: Path, before: dict[str, str], complete: dict[str, str]) -> str:
    """The output is the previous one, absent, or a complete new one (same files as `complete`); returns which."""
    now = tree(out)
    if now == before:
        return "previous" if before else "absent"
    assert set(now) == set(complete), f"half-written output: {sorted(set(complete) ^ set(now))}"
    return "complete"


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def kill_at_random_points(run_until, tmp_path: Path, args_for, seed: int, points: int) -> list[str]:
    """One complete run (its duration T and file list), then `points` runs killed at uniform(0, T) with each
    signal in turn, alternately over the previous output (--force) and onto a fresh path."""
    rng = random.Random(seed)
    done = tmp_path / "done"
    status, duration = run_until(args_for(done, False), None, 0, tmp_path / "done.log")
    assert status == 0, (tmp_path / "done.log").read_text()
    complete = tree(done)
    outcomes = []
    for i in range(points):
        sig, over_previous = SIGNALS[i % 3], i % 2 == 0
        out = done if over_previous else tmp_path / f"fresh{i}"
        before = tree(out)
        run_until(args_for(out, over_previous), rng.uniform(0.05, 1.0) * duration, sig, tmp_path / f"{i}.log")
        outcome = assert_whole(out, before, complete)
        partial = any(siblings(out)[1].glob("*"))  # the kill landed while files were being written
        outcomes.append(f"{signal.Signals(sig).name}:{outcome}{'+partial work area' if partial else ''}")
    print(f"T={duration:.1f}s", outcomes)
    assert any(o.endswith("partial work area") for o in outcomes), outcomes
    return outcomes


def test_export_killed_at_random_points_leaves_previous_or_nothing(fork_server, tmp_path):
    checkpoint = tiny_checkpoint("llama", tmp_path / "ckpt")

    def args_for(out: Path, force: bool) -> list[str]:
        return ["export", str(checkpoint), str(out), "--task", "text-generation"] + (["--force"] if force else [])

    outcomes = kill_at_random_points(fork_server, tmp_path, args_for, seed=14, points=6)
    assert any(not o.endswith("complete") for o in outcomes), outcomes  # some kill landed before completion


def test_run_killed_at_random_points_leaves_previous_or_nothing(fork_server, tmp_path):
    checkpoint = tiny_checkpoint("llama", tmp_path / "ckpt", pattern=None)
    text = tmp_path / "text.txt"
    rng = random.Random(0)
    text.write_text("\n".join(" ".join(f"w{rng.randrange(4, 128)}" for _ in range(64)) for _ in range(400)) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(checkpoint),
        "calibration": {"source": str(text), "segments": 4, "length": 32, "seed": 0},
        "evaluation": {"source": str(text), "window": 32, "max_tokens": 128},
        "stages": [{"kind": "prune", "method": "wanda", "sparsity": 0.5}],
        "export": {"task": "text-generation"},
    }))

    def args_for(out: Path, force: bool) -> list[str]:
        return ["run", str(recipe), "--output", str(out), "--no-progress"] + (["--force"] if force else [])

    outcomes = kill_at_random_points(fork_server, tmp_path, args_for, seed=15, points=6)
    done = tmp_path / "done"
    assert (done / "onnx" / "model.onnx").is_file() and json.loads((done / "report.json").read_text())["export"]
    assert json.loads((done / "onnx" / "sdsonnx.json").read_text())["source"]["checkpoint"] == str(done.resolve())
    validation = json.loads((done / "onnx" / "validation.json").read_text())
    assert validation["ok"] and validation["artifact"] == str(done.resolve() / "onnx"), validation
    assert any(not o.endswith("complete") for o in outcomes), outcomes
