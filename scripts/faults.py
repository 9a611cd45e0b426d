"""Run the fault scenarios end to end on a tiny synthetic set and print what survived each.

    python scripts/faults.py [--keep DIR]

Every scenario is a real ``python -m adapterctl train`` process (its own process group, as under SLURM or a
terminal): SIGKILL mid-run then resume, SIGTERM and SIGINT to the whole group with DataLoader workers, a learning
rate that wrecks the weights, a disk that fills (RLIMIT_FSIZE: writes past the limit fail with EFBIG), an
unwritable output folder, and a second run into an existing run directory. Exits 1 when a scenario does not
end as it should.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.embed_dim=64",
    "model.depth=4",
    "model.num_heads=2",
    "model.deform_num_heads=2",
    "model.conv_inplane=8",
    "model.interaction_indexes=[[0,0],[1,1],[2,2],[3,3]]",
    "model.img_size=64",
    "model.drop_path_rate=0.0",
    "head.decode.channels=16",
    "head.auxiliary.channels=8",
    "data.train.crop_size=[64,64]",
    "data.train.scale=[256,64]",
    "data.test.scale=[256,64]",
    "optim.lr=1e-3",
    "schedule.warmup_iters=2",
    "trainer.batch_size=2",
    "trainer.log_interval=1",
    "trainer.eval_interval=1000",
    "trainer.amp=none",
    "trainer.device=cpu",
]


def _overrides(data: Path, out: Path, **trainer) -> list[str]:
    t = {"max_iters": 6, "num_workers": 0, "checkpoint_interval": 2, **trainer}
    return [*TINY, f"data.root={data}", f"paths.output_dir={out}", *[f"trainer.{k}={v}" for k, v in t.items()]]


def _start(overrides: list[str], log: Path, fsize: int | None = None) -> subprocess.Popen:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "adapterctl", "train", *overrides],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=limit,
        )


def _run(overrides: list[str], log: Path, fsize: int | None = None) -> int:
    return _start(overrides, log, fsize).wait(timeout=600)


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]


def _losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _signal_at(overrides: list[str], log: Path, out: Path, sig: int, step: int) -> int:
    proc = _start(overrides, log)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(s >= step for s in _steps(out)):
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    return proc.wait(timeout=300)


def _checkpoints(out: Path) -> list[str]:
    d = out / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _finite(path: Path) -> bool:
    from adapterctl.engine import checkpoint as ckpt

    state = ckpt.load_checkpoint(path)
    return not ckpt.non_finite_tensors(state["model"], state["optimizer"]["state"])


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file() and "tensorboard" not in p.parts:
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work here and keep the runs (default: a temporary folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="adapterctl-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    from adapterctl.data.synthetic import write_seg_dataset

    data = write_seg_dataset(work / "data", n_train=8, n_val=3, seed=1, size_range=(64, 100))
    rows: list[tuple[str, bool, str, str]] = []

    def report(name: str, ok: bool, status: str, survived: str) -> None:
        rows.append((name, ok, status, survived))
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {status} | {survived}", flush=True)

    # 0. the reference: an uninterrupted run
    straight = work / "straight"
    rc = _run(_overrides(data, straight), work / "straight.log")
    reference = _losses(straight) if rc == 0 else {}
    report("uninterrupted run", rc == 0, f"exit {rc}", f"checkpoints {_checkpoints(straight)}")

    # 1. SIGKILL after iteration 3 (checkpoint at 2), then resume=true
    killed = work / "sigkill"
    rc = _signal_at(_overrides(data, killed), work / "sigkill.log", killed, signal.SIGKILL, 3)
    kept = _checkpoints(killed)
    rc2 = _run(_overrides(data, killed) + ["resume=true"], work / "sigkill_resume.log")
    same = rc2 == 0 and _steps(killed) == list(range(1, 7)) and _losses(killed) == reference
    partial_left = [c for c in _checkpoints(killed) if c.endswith(".tmp")]
    report(
        "SIGKILL mid-run, then resume",
        same and rc == -signal.SIGKILL and not partial_left,
        f"killed (exit {rc}), resume exit {rc2}",
        f"kept {kept}; resumed loss curve {'bit-identical' if same else 'DIFFERENT'} to the uninterrupted run; "
        f"partial writes left after the resume: {partial_left}",
    )

    # 2-3. SIGTERM / SIGINT to the whole process group, two DataLoader workers
    for sig in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(sig).name
        out = work / name.lower()
        over = _overrides(data, out, max_iters=400, num_workers=2, checkpoint_interval=1000)
        rc = _signal_at(over, work / f"{name}.log", out, sig, 2)
        text = (work / f"{name}.log").read_text()
        ckpts = [c for c in _checkpoints(out) if c.startswith("iter_")]
        step = int(ckpts[-1][5:12]) if ckpts else 0
        resume = _overrides(data, out, max_iters=step + 1, checkpoint_interval=1000) + ["resume=true"]
        rc2 = _run(resume, work / f"{name}_resume.log") if ckpts else -1
        ok = (
            rc == 75
            and "Traceback" not in text
            and bool(ckpts)
            and rc2 == 0
            and _steps(out) == list(range(1, step + 2))
        )
        report(
            f"{name} to the process group (2 workers)",
            ok,
            f"exit {rc}: {_last_line(work / f'{name}.log')}",
            f"checkpoint {ckpts[-1] if ckpts else None}; resume exit {rc2}, each step logged once: "
            f"{_steps(out) == list(range(1, step + 2))}",
        )

    # 3b. SIGTERM to a two-process torchrun group (SLURM's scancel): the workers checkpoint; torchrun itself
    # reports the signal and exits 1 (its own behaviour)
    out = work / "torchrun"
    over = _overrides(data, out, max_iters=400, num_workers=2, checkpoint_interval=1000)
    log = work / "torchrun.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with log.open("w") as f:
        proc = subprocess.Popen(
            [*launcher, "-m", "adapterctl", "train", *over],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(s >= 2 for s in _steps(out)):
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=300)
    text = log.read_text()
    ckpts = [c for c in _checkpoints(out) if c.startswith("iter_")]
    step = int(ckpts[-1][5:12]) if ckpts else 0
    both = text.count(f"preempted at iteration {step}; checkpoint") == 2
    resume = _overrides(data, out, max_iters=step + 1, checkpoint_interval=1000) + ["resume=true"]
    rc2 = _run(resume, work / "torchrun_resume.log") if ckpts else -1
    report(
        "SIGTERM to a 2-process torchrun group",
        bool(ckpts) and both and rc2 == 0,
        f"torchrun exit {rc}; both ranks: {'stopped: preempted' if both else 'NOT preempted cleanly'}",
        f"checkpoint {ckpts[-1] if ckpts else None}; resume (one process) exit {rc2}",
    )

    # 4. a learning rate that wrecks the weights while the loss is still finite
    nan = work / "nan"
    rc = _run(_overrides(data, nan, checkpoint_interval=1) + ["optim.lr=1e10"], work / "nan.log")
    ckpts = [c for c in _checkpoints(nan) if c.startswith("iter_")]
    finite = all(_finite(nan / "checkpoints" / c) for c in ckpts)
    line = _last_line(work / "nan.log")
    named = bool(ckpts) and ckpts[-1] in line
    report(
        "optim.lr=1e10",
        rc == 1 and finite and named,
        f"exit {rc}: {line}",
        f"checkpoints {ckpts}, all finite: {finite}; the last good one named: {named}",
    )

    # 5. the disk fills: files may not grow past 256 KiB (a tiny checkpoint is larger)
    full = work / "diskfull"
    rc = _run(_overrides(data, full), work / "diskfull.log", fsize=256 * 1024)
    text = (work / "diskfull.log").read_text()
    ok = rc == 1 and "Traceback" not in text and "File too large" in text and (full / "config.yaml").is_file()
    report(
        "disk full (RLIMIT_FSIZE)",
        ok and not [c for c in _checkpoints(full) if c.endswith(".tmp")],
        f"exit {rc}: {_last_line(work / 'diskfull.log')}",
        f"config.yaml kept: {(full / 'config.yaml').is_file()}; partial files left: "
        f"{[c for c in _checkpoints(full) if c.endswith('.tmp')]}",
    )

    # 6. an output folder that cannot be made
    blocker = work / "a_file"
    blocker.write_text("not a folder")
    rc = _run(_overrides(data, blocker / "run"), work / "unwritable.log")
    text = (work / "unwritable.log").read_text()
    report(
        "unwritable output folder",
        rc == 1 and "Traceback" not in text and "cannot create folder" in text,
        f"exit {rc}: {_last_line(work / 'unwritable.log')}",
        "nothing to lose",
    )

    # 7. a second run into the directory of the first
    before = _digest(straight)
    rc = _run(_overrides(data, straight), work / "second.log")
    after = _digest(straight)
    report(
        "second train into a run directory",
        rc == 1 and before == after,
        f"exit {rc}: {_last_line(work / 'second.log')}",
        f"first run's files unchanged: {before == after}",
    )

    failed = [r[0] for r in rows if not r[1]]
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} scenarios ended as they should"
        + (f"; failed: {failed}" if failed else "")
    )
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
