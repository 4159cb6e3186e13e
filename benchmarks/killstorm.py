"""Kill storm: SIGKILL a `yuyan train` run at random moments, resume it each time, and prove nothing is lost.

A tiny model trains on a small corpus with a checkpoint after every step (so many kills land inside a
checkpoint write). The run is killed `--kills` times, each time at a random moment after it has made
progress, and resumed with `--resume`. After every kill the script checks that each visible checkpoint is
whole (manifest checksums, safetensors and trainer_state.pt loadable with weights_only) and that the newest
one never moves backwards; at the end the resumed run's final weights must equal, bit for bit, those of an
uninterrupted run with the same settings. Prints one JSON line; exits 1 if any check failed.

  python benchmarks/killstorm.py --kills 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(work: Path) -> tuple[Path, Path]:
    """A ~100 KB single-file corpus (stdlib sources), its tokenizer and token shards, made once."""
    from yuyan.data.shards import prepare
    from yuyan.tokenizer import Tokenizer

    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in sorted(lib.glob("*.py"))[:12])[
        :100_000
    ]
    corpus = work / "corpus.py"
    corpus.write_text(text, encoding="utf-8")
    tok = Tokenizer.train([text], vocab_size=300)
    tok.save(work / "tokenizer")
    prepare(str(corpus), tok, work / "data", progress=False)
    return work / "tokenizer", work / "data"


def train_cmd(out: Path, tok: Path, data: Path, steps: int, resume: bool) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "yuyan",
        "train",
        "--config",
        str(ROOT / "configs" / "demo.toml"),
        "--data.tokenizer",
        str(tok),
        "--data.shards",
        str(data),
        "--model.n_layer",
        "2",
        "--model.d_model",
        "32",
        "--model.n_head",
        "2",
        "--model.block_size",
        "32",
        "--model.dropout",
        "0.1",
        "--train.batch_size",
        "4",
        "--train.max_time",
        "0",
        "--train.max_steps",
        str(steps),
        "--train.warmup",
        "5",
        "--eval.every",
        "7",
        "--eval.batches",
        "2",
        "--checkpoint.every_steps",
        "1",
        "--checkpoint.every_minutes",
        "0",
        "--checkpoint.keep_last",
        "2",
        "--checkpoint.save_best",
        "true",
        "--checkpoint.dir",
        str(out),
    ]
    return args + (["--resume"] if resume else [])


def check_visible(out: Path) -> tuple[int, list[str]]:
    """(newest step, problems): every checkpoint folder under its real name must be whole."""
    import torch
    from safetensors.torch import load_file

    from yuyan.errors import UserError
    from yuyan.model.checkpoint import list_checkpoints, verify_manifest

    problems, newest = [], -1
    dirs = list_checkpoints(out) + [p for p in (out / "best", out / "final") if p.is_dir()]
    for d in dirs:
        try:
            if not (d / "manifest.json").exists():
                raise UserError("no manifest.json")
            verify_manifest(d)
            load_file(str(d / "model.safetensors"))
            if (d / "trainer_state.pt").exists():
                st = torch.load(d / "trainer_state.pt", weights_only=True)
                newest = max(newest, int(st["step"]))
        except Exception as e:  # any failure here is a half-written checkpoint in plain sight
            problems.append(f"{d.name}: {e}")
    return newest, problems


def storm(kills: int, steps: int, seed: int, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    rng = random.Random(seed)
    tok, data = make_inputs(work)
    t0 = time.perf_counter()
    ref = subprocess.run(
        train_cmd(work / "ref", tok, data, steps, False), env=env, capture_output=True, text=True
    )
    if ref.returncode != 0:
        raise SystemExit(f"reference run failed:\n{ref.stderr[-2000:]}")
    ref_time = time.perf_counter() - t0

    out = work / "run"
    done_kills, in_write, problems, resumes_failed, newest, regress = 0, 0, [], 0, -1, 0
    lives = 0
    while done_kills < kills:
        start_step = newest
        p = subprocess.Popen(
            train_cmd(out, tok, data, steps, lives > 0),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lives += 1
        # wait for progress (a newer checkpoint than the one resumed from), then kill at a random moment soon after
        deadline = time.time() + 300
        ckpts = out / "checkpoints"
        while time.time() < deadline and p.poll() is None:
            names = [q.name for q in ckpts.iterdir() if q.name.startswith("step-")] if ckpts.is_dir() else []
            if names and int(max(names)[5:]) > start_step:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        if p.poll() is not None:  # it finished (or failed) before the kill
            err = p.stderr.read()
            if p.returncode != 0:
                resumes_failed += 1
                problems.append(f"life {lives} exited {p.returncode}: {err.strip().splitlines()[-1:]}")
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
        done_kills += 1
        if ckpts.is_dir() and any(".tmp-" in q.name for q in ckpts.iterdir()):
            in_write += 1  # the kill fell inside a checkpoint write (its temp folder is left behind)
        step, bad = check_visible(out)
        problems += [f"after kill {done_kills}: {b}" for b in bad]
        if step < newest:
            regress += 1
        newest = max(newest, step)
    final = subprocess.run(train_cmd(out, tok, data, steps, True), env=env, capture_output=True, text=True)
    if final.returncode != 0:
        resumes_failed += 1
        problems.append(f"final resume exited {final.returncode}: {final.stderr.strip().splitlines()[-1:]}")

    import torch
    from safetensors.torch import load_file

    equal = False
    if (out / "final").is_dir():
        a, b = (
            load_file(str(out / "final" / "model.safetensors")),
            load_file(str(work / "ref" / "final" / "model.safetensors")),
        )
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, bad = check_visible(out)
    problems += bad
    ok = equal and not problems and resumes_failed == 0 and regress == 0 and done_kills == kills
    return {
        "benchmark": "killstorm",
        "ok": ok,
        "kills": done_kills,
        "kills_during_checkpoint_write": in_write,
        "lives": lives + 1,
        "resumes_failed": resumes_failed,
        "half_written_visible": len(problems),
        "newest_step_regressions": regress,
        "final_weights_bitwise_equal": equal,
        "steps": steps,
        "reference_run_s": round(ref_time, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "problems": problems[:5],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: 12 per kill + 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="", help="work folder (default: a temp folder, removed afterwards)")
    args = ap.parse_args()
    steps = args.steps or 12 * args.kills + 20
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="yuyan-killstorm-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = storm(args.kills, steps, args.seed, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res))
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
