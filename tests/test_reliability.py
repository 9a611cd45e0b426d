"""The fault suite: the same results on every CPU, preemption and crashes that lose nothing, no run destroyed,
bad input named in one line before any work starts."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from adapterctl.cli import app
from adapterctl.config import compose
from adapterctl.engine import checkpoint as ckpt
from adapterctl.engine.precision import checkpoint_precision, cpu_has_fast_bf16, resolve_amp
from adapterctl.engine.train import run_train
from adapterctl.errors import EXIT_PREEMPTED, DataError, OutputError, TrainingError

from .conftest import REPO, tiny_train_overrides

runner = CliRunner()
FINAL = Path("checkpoints") / "final.pt"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in _rows(run_dir) if "train/loss" in r]


# --- precision: decided from the instruction set, recorded, reused ---------------------------------------------


def test_auto_precision_is_decided_by_the_instruction_set(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    bf16_cpu = frozenset({"avx2", "avx512f", "avx512_bf16"})
    assert cpu_has_fast_bf16(bf16_cpu) and cpu_has_fast_bf16(frozenset({"amx_bf16"}))
    assert not cpu_has_fast_bf16(frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below bf16 units
    assert not cpu_has_fast_bf16(bf16_cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    assert cpu_has_fast_bf16(bf16_cpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert not cpu_has_fast_bf16(bf16_cpu)


def test_auto_precision_is_stable_and_follows_the_avx2_switches():
    has_bf16 = any(f in Path("/proc/cpuinfo").read_text() for f in ("avx512_bf16", "amx_bf16"))
    # the same answer every time (a timing probe flipped under load)
    answers = {resolve_amp("auto", torch.device("cpu")) for _ in range(20)}
    assert answers == ({"bf16"} if has_bf16 and cpu_has_fast_bf16() else {"none"})
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = "import torch, adapterctl.engine.precision as p; print(p.resolve_amp('auto', torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "none", out.stderr


def test_resolved_precision_is_recorded_and_eval_uses_the_checkpoints(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=1, amp="auto")))
    expected = resolve_amp("auto", torch.device("cpu"))
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["amp"] == expected
    state = ckpt.load_checkpoint(out / FINAL)
    assert state["precision"] == expected and checkpoint_precision(state["config"]) == expected
    assert json.loads((out / "metrics.json").read_text())["precision"] == expected

    fp32 = tmp_path / "fp32"
    run_train(compose("train", tiny_train_overrides(synth_seg, fp32, max_iters=1, amp="none")))
    for extra, want in (([], "none"), (["trainer.amp=bf16"], "bf16")):
        ev = tmp_path / f"eval_{want}"
        result = runner.invoke(app, ["eval", f"ckpt={fp32 / FINAL}", f"paths.output_dir={ev}", *extra])
        assert result.exit_code == 0, result.output
        metrics = json.loads((ev / "metrics.json").read_text())
        assert metrics["precision"] == want and metrics["mIoU"] is not None


def test_bf16_training_follows_fp32_within_tolerance(synth_seg, tmp_path):
    """The bf16 path has its own check, with a tolerance (bf16 is not bitwise reproducible)."""
    losses = {}
    for amp in ("none", "bf16"):
        out = tmp_path / amp
        run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2, amp=amp)))
        losses[amp] = [r["train/loss"] for r in _rows(out) if "train/loss" in r]
    for a, b in zip(losses["none"], losses["bf16"], strict=True):
        assert abs(a - b) <= 0.03 * abs(a), losses


def test_converted_and_old_checkpoints_evaluate_in_fp32():
    assert checkpoint_precision({"trainer": {"amp": "auto"}}) == "none"
    assert checkpoint_precision({}) == "none"
    assert checkpoint_precision({"trainer": {"amp": "bf16"}}) == "bf16"


# --- faults: nothing written is lost, nothing bad is written -----------------------------------------------------


def test_non_finite_weights_are_never_checkpointed(synth_seg, tmp_path):
    """With lr=1e10 the loss is still finite at the step that wrecks the weights: no checkpoint may hold them."""
    out = tmp_path / "blowup"
    cfg = compose("train", tiny_train_overrides(synth_seg, out, max_iters=8, checkpoint_interval=1) + ["optim.lr=1e10"])
    with pytest.raises(TrainingError, match=r"NaN or inf.*no checkpoint is written.*last good checkpoint is (\S+)"):
        run_train(cfg)
    found = ckpt.list_checkpoints(out / "checkpoints")
    assert found, "the first step's checkpoint is good and kept"
    for _, path in found:
        state = ckpt.load_checkpoint(path)
        assert ckpt.non_finite_tensors(state["model"], state["optimizer"]["state"]) == []


def test_a_second_run_into_a_run_directory_is_refused_and_destroys_nothing(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2)))
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("iter_*.pt")}
    rows, config = _rows(out), (out / "config.yaml").read_bytes()
    result = runner.invoke(app, ["train", *tiny_train_overrides(synth_seg, out, max_iters=4)])
    assert result.exit_code == 1 and "already holds a run" in result.output and "resume=true" in result.output
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("iter_*.pt")} == before
    assert (out / FINAL).resolve().is_file() and _rows(out) == rows and (out / "config.yaml").read_bytes() == config


def test_a_bad_override_on_resume_leaves_config_yaml(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2)))
    config = (out / "config.yaml").read_bytes()
    bad_value = runner.invoke(app, ["train", *tiny_train_overrides(synth_seg, out, max_iters=4), "resume=true",
                                    "trainer.log_interval=-3"])  # fmt: skip
    assert bad_value.exit_code == 2 and "trainer.log_interval=-3" in bad_value.output
    bad_data = runner.invoke(app, ["train", *tiny_train_overrides(tmp_path / "gone", out, max_iters=4), "resume=true"])
    assert bad_data.exit_code == 1 and "gone" in bad_data.output
    assert (out / "config.yaml").read_bytes() == config


def test_resume_after_a_crash_logs_each_step_once_and_cleans_partial_writes(synth_seg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original_step, calls = torch.optim.lr_scheduler.LambdaLR.step, {"n": 0}

    def crash_in_iteration_4(self, *a, **k):  # the constructor steps once; call 5 is iteration 4
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        original_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", crash_in_iteration_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=4, checkpoint_interval=2)))
    monkeypatch.undo()
    assert _train_steps(out) == [1, 2, 3]  # iteration 3 was logged after the checkpoint at 2
    partial = out / "checkpoints" / ".iter_0000004.pt.k1ll3d.tmp"  # what a SIGKILL mid-write leaves
    partial.write_bytes(b"half a checkpoint")
    old = os.umask(0o022)
    try:
        run_train(
            compose("train", tiny_train_overrides(synth_seg, out, max_iters=4, checkpoint_interval=2) + ["resume=true"])
        )
    finally:
        os.umask(old)
    assert _train_steps(out) == [1, 2, 3, 4]  # no step twice
    assert not partial.exists()
    mode = stat.S_IMODE((out / "checkpoints" / "iter_0000004.pt").stat().st_mode)
    assert mode == 0o644  # as the umask says, not mkstemp's 0600


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_last_checkpoint(synth_seg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def save_until_the_disk_fills(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    result = runner.invoke(app, ["train", *tiny_train_overrides(synth_seg, out, max_iters=4, checkpoint_interval=2)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "iter_0000004.pt: No space left on device" in result.output.replace("\n", "")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["iter_0000002.pt"]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(out / "checkpoints" / "iter_0000002.pt")["step"] == 2


def test_read_only_file_system_and_unwritable_folders_are_named(tmp_path, monkeypatch):
    from adapterctl.files import atomic_write, ensure_dir

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=r"cannot create folder .*a_file/run"):
        ensure_dir(blocker / "run")
    target = tmp_path / "out" / "metrics.json"
    atomic_write(target, lambda f: f.write(b"{}"))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(OutputError, match=r"cannot write .*metrics.json: Read-only file system"):
        atomic_write(target, lambda f: f.write(b"{new}"))
    monkeypatch.undo()
    assert target.read_bytes() == b"{}" and [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def _train_subprocess(overrides: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:  # its own process group: the signal goes to every process, as SLURM and Ctrl-C do
        return subprocess.Popen(
            [sys.executable, "-m", "adapterctl", "train", *overrides],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before the signal"
        if (out / "metrics.jsonl").is_file() and any(s >= step for s in _train_steps(out)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _preempt_and_resume(synth_seg, tmp_path, sig: int) -> None:
    out, log = tmp_path / "run", tmp_path / "train.log"
    overrides = tiny_train_overrides(synth_seg, out, max_iters=400, num_workers=2, checkpoint_interval=1000)
    proc = _train_subprocess(overrides, log)
    try:
        _wait_for_step(out, proc, 2)
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == EXIT_PREEMPTED, text[-3000:]
    assert "Traceback" not in text and "preempted at iteration" in text, text[-3000:]
    (step, path), *_ = reversed(ckpt.list_checkpoints(out / "checkpoints"))
    assert ckpt.load_checkpoint(path)["step"] == step >= 2 and f"iteration {step}" in text
    resumed = tiny_train_overrides(synth_seg, out, max_iters=step + 1, checkpoint_interval=1000) + ["resume=true"]
    run_train(compose("train", resumed))
    assert _train_steps(out) == list(range(1, step + 2))


def test_sigterm_to_the_process_group_checkpoints_and_exits_75(synth_seg, tmp_path):
    _preempt_and_resume(synth_seg, tmp_path, signal.SIGTERM)


def test_ctrl_c_to_the_process_group_checkpoints_and_exits_75(synth_seg, tmp_path):
    _preempt_and_resume(synth_seg, tmp_path, signal.SIGINT)


# --- bad input: one line, before any work ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.max_iters=abc", "trainer.max_iters='abc': expected a positive integer"),
        ("optim.lr=-0.1", "optim.lr=-0.1: expected a positive number"),
        ("trainer.num_workers=1.5", "trainer.num_workers=1.5"),
        ("trainer.amp=fp8", "trainer.amp='fp8': expected one of"),
    ],
)
def test_bad_values_are_named_before_any_work(synth_seg, tmp_path, override, needle):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *tiny_train_overrides(synth_seg, out), override])
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_line(synth_seg, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *tiny_train_overrides(synth_seg, out, max_iters=1), "trainer.device=cuda"])
    assert result.exit_code == 1 and "no CUDA device" in result.output and not out.exists()
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=1)))
    result = runner.invoke(app, ["eval", f"ckpt={out / FINAL}", "trainer.device=cuda"])
    assert result.exit_code == 1 and "no CUDA device" in result.output
    image = next((synth_seg / "images" / "validation").iterdir())
    result = runner.invoke(app, ["predict", str(out / FINAL), str(image), "--device", "cuda"])
    assert result.exit_code == 1 and "no CUDA device" in result.output and "Traceback" not in result.output


def test_bare_state_dicts_and_code_running_pickles_are_refused_by_name(tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save({"backbone.w": torch.ones(2)}, bare)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "x": _RunsCode()}, evil)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    result = runner.invoke(app, ["predict", str(bare), str(image)])
    assert result.exit_code == 1 and "bare.pth: not an adapterctl checkpoint" in result.output.replace("\n", "")
    result = runner.invoke(app, ["eval", f"ckpt={evil}"])
    text = result.output.replace("\n", "")
    assert result.exit_code == 1 and "evil.pt: refused to unpickle" in text and "posix.system" in text
    assert "Traceback" not in result.output


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def test_class_names_from_classes_txt_and_mismatches_at_start(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=1) + ["data.classes=null"]))
    names = (synth_seg / "classes.txt").read_text().split()
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["classes"] == names  # recorded in the run
    with pytest.raises(DataError, match=r"data.classes names 2 classes but data.num_classes=8"):
        run_train(compose("train", tiny_train_overrides(synth_seg, tmp_path / "r2") + ["data.classes=[a,b]"]))
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_the_fault_script_ends_every_scenario_as_it_should():
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "faults.py")], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "scenarios ended as they should" in proc.stdout


# --- review follow-ups -------------------------------------------------------------------------------------------


def test_precision_uses_no_timing(monkeypatch):
    import time as _time

    from adapterctl.engine import precision

    def no_clock():
        raise AssertionError("precision must not be decided by timing")

    monkeypatch.setattr(_time, "perf_counter", no_clock)
    monkeypatch.setattr(_time, "time", no_clock)
    precision._cpu_flags.cache_clear()
    assert resolve_amp("auto", torch.device("cpu")) in ("bf16", "none")


def test_an_fp16_checkpoint_evaluates_on_a_cpu_with_a_note(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=1)))
    state = ckpt.load_checkpoint(out / FINAL)
    state["config"]["trainer"]["amp"] = "fp16"  # as a GPU run of the ADE20K rows records it
    gpu_made = tmp_path / "gpu_run.pt"
    ckpt.save_checkpoint(state, gpu_made)
    result = runner.invoke(app, ["eval", f"ckpt={gpu_made}", f"paths.output_dir={tmp_path / 'ev'}"])
    assert result.exit_code == 0, result.output
    assert "trained in fp16, which needs CUDA" in result.output.replace("\n", " ")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["precision"] in ("bf16", "none")


def test_checkpoints_that_cannot_be_resumed_or_do_not_fit_are_named(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=1)))
    state = ckpt.load_checkpoint(out / FINAL)
    weights_only = tmp_path / "weights_only.pt"
    ckpt.save_checkpoint({"model": state["model"], "config": state["config"], "step": None}, weights_only)
    result = runner.invoke(app, ["train", *tiny_train_overrides(synth_seg, tmp_path / "r2"), f"resume={weights_only}"])
    assert result.exit_code == 1 and "not a training checkpoint" in result.output.replace("\n", " ")
    result = runner.invoke(app, ["eval", f"ckpt={out / FINAL}", "head.decode.channels=32"])
    text = result.output.replace("\n", " ")
    assert result.exit_code == 1 and "weights do not fit" in text and "Traceback" not in result.output


def test_a_cut_log_line_and_an_attempt_without_checkpoints_do_not_block_a_run(synth_seg, tmp_path):
    out = tmp_path / "run"
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=2)))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "train/lo')  # a kill mid-write
    (out / ".config.yaml.x1y2.tmp").write_text("half")
    run_train(compose("train", tiny_train_overrides(synth_seg, out, max_iters=3) + ["resume=true"]))
    assert _train_steps(out) == [1, 2, 3] and not (out / ".config.yaml.x1y2.tmp").exists()

    failed = tmp_path / "failed"  # an earlier attempt stopped before its first checkpoint
    failed.mkdir()
    (failed / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')
    run_train(compose("train", tiny_train_overrides(synth_seg, failed, max_iters=1)))
    assert _train_steps(failed) == [1] and len(list(failed.glob("metrics.jsonl.previous-*"))) == 1


def test_a_write_failure_on_rank_0_alone_ends_a_torchrun_job(synth_seg, tmp_path):
    """Only rank 0 writes: when it fails, it must not wait in a barrier the other ranks never reach."""
    from .conftest import torchrun_train

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    started = time.monotonic()
    proc = torchrun_train(tiny_train_overrides(synth_seg, blocker / "run", max_iters=50, batch_size=2))
    assert proc.returncode != 0 and time.monotonic() - started < 300
    assert "cannot create folder" in proc.stdout + proc.stderr


def test_vits_the_official_trunk_would_run_differently_get_the_prefix_trunk():
    from timm.models.vision_transformer import VisionTransformer

    from adapterctl.models.trunks import TimmPrefixViTTrunk, TimmViTTrunk, trunk_for

    def vit(**kw):
        return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, **kw)

    assert isinstance(trunk_for(vit(reg_tokens=4)), TimmPrefixViTTrunk)  # registers carried, not dropped
    assert isinstance(trunk_for(vit(pre_norm=True)), TimmPrefixViTTrunk)  # CLIP-style: cls token and norm_pre
    assert isinstance(trunk_for(vit()), TimmViTTrunk)
    with pytest.raises(ValueError, match="position embedding"):
        trunk_for(vit(pos_embed="none"))


_CRASH = """
import sys
sys.path.insert(0, {repo!r})
from adapterctl.models import detector

def boom(self, *args, **kwargs):
    raise RuntimeError("a bug in the model")

detector.AdapterMaskRCNN.forward = boom
from tests.conftest import tiny_det_overrides
from adapterctl.cli import app
sys.argv = ["adapterctl", "train", *tiny_det_overrides({data!r}, {out!r}, num_workers=2)]
app()
"""


def test_a_crash_with_data_workers_exits_instead_of_hanging(synth_det, tmp_path):
    """The workers ignore SIGTERM (preemption belongs to the main process): an unexpected error in the step used
    to leave the process waiting for them forever at exit. It now exits 1 with the traceback."""
    script = tmp_path / "crash.py"
    script.write_text(_CRASH.format(repo=str(REPO), data=str(synth_det), out=str(tmp_path / "run")))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "a bug in the model" in proc.stderr + proc.stdout
    assert time.monotonic() - start < 90


def test_run_train_leaves_no_worker_behind_when_it_fails(synth_det, tmp_path, monkeypatch):
    import multiprocessing

    from adapterctl.models import detector

    from .conftest import tiny_det_overrides

    def boom(self, *args, **kwargs):
        raise RuntimeError("a bug in the model")

    monkeypatch.setattr(detector.AdapterMaskRCNN, "forward", boom)
    with pytest.raises(RuntimeError, match="a bug in the model") as failure:
        run_train(compose("train", tiny_det_overrides(synth_det, tmp_path / "run", num_workers=2)))
    # the traceback (held here, as a caller or the interpreter's exit holds it) keeps the loader alive
    assert failure.tb is not None
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]
