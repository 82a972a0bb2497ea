"""The GPU path measured in one command (`benchmarks/gpu.sh` runs this): exactness, speed, limits, a run.

Steps, each in its own process so that one failing or missing package skips it and the rest go on:
1. exactness: the engine checks of `tests/test_engine.py` on the tiny random Llama and OPT, float32,
   run with `--device` (full == HF `generate`, ULS/EE/RLS == the identity-layer reference, both prefills;
   --cpu: the OPT ones, which the suite runs anyway);
2. speed: `benchmarks/sweep.py` on a random OPT-1.3B-shaped model in float16 and bfloat16 (engine
   against the plain and the study's way; a batch-size scan of the engine with memory per row);
3. limits: measured matmul throughput and copy bandwidth, and the fraction the engine reaches (sweep.py);
4. a run: `dynoracle run` of a few Alpaca sequences on one GPU (Ray, one actor with num_gpus=1); where
   Ray is not installed, and with --cpu, the same shard work in this process (ShardWorker on the
   device, shard files written and checked as the runner does), said so in the table;
5. with `--profile`: one decode step at 32 prompts and at the plateau (512 prompts = 12,288 rows) under
   torch.profiler (`benchmarks/step_profile.py`: time per kind of work, host syncs per step), written to
   <out>/profile.json.
`--baseline DIR|REF` measures the previous engine in the same run: DIR a copy of its tree (e.g.
`git archive REF pipeline | tar -x -C DIR`), or a git ref of this checkout; its sweep (bfloat16, engine
alone, the same batch-size scan) and, with --profile, its profile run beside this engine's.
It prints one summary table and writes every figure to <out>/gpu.json. `--cpu` does the same on a CPU
with tiny sizes (a tiny random OPT instead of OPT-1.3B), which the test suite runs.

    bash benchmarks/gpu.sh [--cpu] [--out DIR] [--profile] [--baseline DIR|REF] [--steps exactness,sweep,run]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pyarrow.parquet as pq
import torch
import transformers
from step_profile import table as profile_table  # noqa: E402 (this script's folder)

REPO = Path(__file__).resolve().parents[1]
SIZES = {  # --cpu: under 3 minutes on a 2-core CPU; cuda: 2.5 minutes on one H200
    "cpu": {"model": "random:tiny-opt", "dtypes": ("float32", "bfloat16"), "timeout": 300, "checks": "tiny_opt",
            "ray": False,
            "sweep": ["--prompts", "4", "--new-tokens", "8", "--baseline-configs", "1", "--batch-scan", "2,4",
                      "--peak-size", "512"],
            "run": {"limit": 4, "max_new_tokens": 4, "shard_size": 2, "dtype": "float32"},
            "profile": ["--dtype", "bfloat16", "--prompts", "2,4", "--step", "2"]},
    "cuda": {"model": "random:opt-1.3b", "dtypes": ("float16", "bfloat16"), "timeout": 240, "checks": "tiny",
             "ray": True,
             "sweep": ["--prompts", "32", "--new-tokens", "32", "--baseline-configs", "6", "--repeats", "3",
                       "--batch-scan", "8,32,128,256,512,1024"],
             "run": {"limit": 4, "max_new_tokens": 16, "shard_size": 2, "dtype": "bfloat16"},
            "profile": ["--dtype", "bfloat16", "--prompts", "32,512", "--step", "8"]},
}
STEPS = ("exactness", "sweep", "run", "profile")


def say(message: str) -> None:
    print(f"[gpu.sh] {message}", flush=True)


def missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def step(cmd: list[str], timeout: float, engine: Path | None = None) -> int:
    """Run one step's process, echoing its output; its exit status (124 when killed past `timeout`).
    `engine`: the tree whose `pipeline` package the process imports (the previous engine's), else this one."""
    env = None
    if engine is not None:
        env = {**os.environ, "PYTHONPATH": str(engine)}
        say(f"(previous engine: PYTHONPATH={engine})")
    say("$ " + " ".join(cmd))
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        print(exc.output.decode() if isinstance(exc.output, bytes) else exc.output or "", flush=True)
        return 124
    print(done.stdout + done.stderr, flush=True)
    return done.returncode


def exactness(device: str, checks: str, out: Path, timeout: float) -> dict:
    """Test id -> passed/failed/skipped, from pytest's JUnit report of the engine checks selected by `checks`."""
    if missing("pytest"):
        return {"skipped": "pytest is not installed"}
    report = out / "exactness.xml"
    rc = step([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py",
                  "--device", device, "-k", checks, f"--junitxml={report}"], timeout)
    if not report.is_file():
        return {"error": f"pytest exited {rc} without a report"}
    results = {}
    for case in ElementTree.parse(report).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        results[case.get("name")] = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
    return {"tests": results}


def sweep(size: dict, device: str, dtype: str, out: Path, engine: Path | None = None) -> dict:
    """sweep.py's figures; for the previous engine (`engine`), of the engine alone."""
    figures = out / f"sweep_{dtype}{'_baseline' if engine else ''}.json"
    rc = step([sys.executable, "benchmarks/sweep.py", "--model", size["model"], "--device", device,
               "--dtype", dtype, *size["sweep"], *(["--no-baselines"] if engine else []), "--json", str(figures)],
              size["timeout"], engine)
    if rc != 0 or not figures.is_file():
        return {"error": f"sweep.py exited {rc}"}
    return json.loads(figures.read_text())


def profile(size: dict, device: str, out: Path, engine: Path | None = None) -> dict:
    """step_profile.py's figures: one decode step at each of the size's prompt counts."""
    figures = out / f"profile{'_baseline' if engine else ''}.json"
    rc = step([sys.executable, "benchmarks/step_profile.py", "--model", size["model"], "--device", device,
               *size["profile"], "--json", str(figures)], size["timeout"], engine)
    if rc != 0 or not figures.is_file():
        return {"error": f"step_profile.py exited {rc}"}
    return json.loads(figures.read_text())


def baseline_tree(spec: str, out: Path) -> Path:
    """The previous engine's tree: `spec` itself when it is a folder, else the `pipeline` package of git ref
    `spec` of this checkout, extracted under <out>/baseline. Raises SystemExit naming `spec` otherwise."""
    if Path(spec).is_dir():
        if not (Path(spec) / "pipeline" / "generation" / "engine.py").is_file():
            raise SystemExit(f"gpu.sh: --baseline {spec}: no pipeline/generation/engine.py in that folder")
        return Path(spec).resolve()
    tree = out / "baseline"
    shutil.rmtree(tree, ignore_errors=True)  # this script's own extraction of an earlier call
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", spec, "pipeline"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"gpu.sh: --baseline {spec}: neither a folder nor a git ref of {REPO} "
                         f"({archive.stderr.decode().strip()}); give a copy of the previous engine's tree")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def run(size: dict, device: str, out: Path) -> dict:
    """A few Alpaca sequences under every ULS configuration: through Ray when it is installed (and the size asks
    for it: --cpu skips Ray's start-up, `dynoracle run` itself is tested in tests/test_run.py), else in-process."""
    if missing("rouge_score", "nltk"):
        return {"skipped": f"{', '.join(missing('rouge_score', 'nltk'))} not installed (scoring needs them)"}
    folder = out / "run"
    shutil.rmtree(folder, ignore_errors=True)  # this script's own output of an earlier call
    job = {**size["run"], "model": size["model"], "device": device, "families": "uls", "workers": 1,
           "samples": 0, "out": str(folder)}  # the ULS sweep alone, without the alpaca job's noise-ceiling samples
    rows_expected = None
    start = time.perf_counter()
    if size["ray"] and not missing("ray"):
        cmd = [sys.executable, "-m", "pipeline.cli", "run", "--dataset", "alpaca", "--limit", str(job["limit"])]
        for key in ("model", "device", "dtype", "families", "workers", "samples", "out", "max_new_tokens", "shard_size"):
            cmd += [f"--{key.replace('_', '-')}", str(job[key])]
        rc = step(cmd, size["timeout"])
        if rc != 0:
            return {"error": f"dynoracle run exited {rc}", "mode": "ray"}
        mode = "ray, 1 actor"
    else:
        say(("ray is not installed" if size["ray"] else "--cpu") + ": the same shard work in this process, without Ray")
        rows_expected = _run_in_process(job)
        mode = "in-process, no Ray"
    seconds = time.perf_counter() - start
    table = pq.read_table(folder / "generations")
    pairs = set(zip(table.column("seq_id").to_pylist(), table.column("config_id").to_pylist()))
    result = {"mode": mode, "rows": table.num_rows, "seconds": seconds,
              "gen_tokens": int(table.column("gen_tokens").to_numpy().sum()),
              "sequences": len({seq for seq, _ in pairs}), "configs": len({cfg for _, cfg in pairs})}
    # every (sequence, configuration) exactly once, for the requested number of sequences
    result["rows_ok"] = len(pairs) == result["rows"] == result["sequences"] * result["configs"] \
        == (rows_expected or result["rows"]) and result["sequences"] == job["limit"]
    say(f"run: {result}")
    return result


def _run_in_process(job: dict) -> int:
    """The runner's shard work without Ray: load, shard, generate + score on the device, write, validate."""
    from pipeline.data.adapters import load_examples, shard_examples
    from pipeline.generation.task import GenerateTask
    from pipeline.run.job import load_job
    from pipeline.run.rundir import RunDir, job_identity, write_shard
    from pipeline.run.worker import ShardWorker

    overrides = {k: v for k, v in job.items() if k not in ("limit", "samples")} | {
        "dataset": {"limit": job["limit"]}, "sampling": {"samples": job["samples"]}}
    spec = load_job(dataset="alpaca", overrides=overrides)
    worker = ShardWorker(spec, spec.device)
    examples = load_examples(spec.dataset, worker.lm.tokenizer)
    shards = shard_examples(examples, spec.shard_size)
    configs = spec.configurations(worker.lm.num_layers)
    task = GenerateTask(tuple(configs), spec.max_new_tokens, spec.prefill, spec.batch_size, spec.max_rows,
                        spec.scoring)
    folder, identity = RunDir(spec.run_dir), job_identity({"identity": spec.identity()})
    for index, shard in enumerate(shards):
        write_shard(task.shard_path(folder, index), index, worker.run(task, index, shard), identity)
        problem = task.shard_problem(folder, index, shard, identity)
        if problem is not None:
            raise RuntimeError(f"shard {index}: {problem}")
    return len(examples) * len(configs)


def table(report: dict) -> str:
    """The summary: one line per figure, the sweep's dtypes side by side."""
    lines = [f"dynoracle GPU-path check on {report['device_name']} (torch {report['torch']}, "
             f"transformers {report['transformers']})"]
    if "exactness" in report:
        tests = report["exactness"].get("tests")
        if tests:
            passed = sum(v == "passed" for v in tests.values())
            lines.append(f"exactness ({report['device']}, float32): {passed}/{len(tests)} passed"
                         + "".join(f"\n  {v:7s} {k}" for k, v in tests.items()))
        else:
            lines.append(f"exactness: {report['exactness']}")
    if "sweep" in report:
        lines += _sweep_lines(report)
    if "run" in report:
        r = report["run"]
        lines.append(f"run: {r['rows']} rows ({r['sequences']} sequences x {r['configs']} configs) in "
                     f"{r['seconds']:.1f} s, {r['gen_tokens']} tokens, {r['mode']}, rows {'ok' if r['rows_ok'] else 'WRONG'}"
                     if "rows" in r else f"run: {r}")
    for name, label in (("profile", "this engine"), ("profile_baseline", "previous engine")):
        if name in report:
            p = report[name]
            lines.append(f"profile, {label}: " + (f"{p['error']}" if "error" in p else
                                                  "\n" + profile_table(p["steps"])))
    return "\n".join(lines)


def _sweep_lines(report: dict) -> list[str]:
    """The sweep's figures, its dtypes side by side; against the previous engine where it ran."""
    lines = []
    dtypes = list(report["sweep"])
    cols = [report["sweep"][d] for d in dtypes]
    rows = [("figure", dtypes)]

    def add(label: str, fn) -> None:
        rows.append((label, [fn(c) if "error" not in c else c["error"] for c in cols]))

    add("model", lambda c: f"{c['model']} L={c['layers']}")
    add("sweep", lambda c: f"{c['prompts']} prompts x {c['configs']} ULS x {c['new_tokens']} tok")
    add("engine tokens/s", lambda c: f"{c['engine_tok_s']:,.0f}")
    add("plain tokens/s (engine x)", lambda c: f"{c['plain_tok_s']:,.0f} ({c['vs_plain']:.1f}x)")
    add("study's masked tokens/s (engine x)", lambda c: f"{c['study_tok_s']:,.0f} ({c['vs_study']:.1f}x)")
    add("best rows per batch (tokens/s)", lambda c: f"{c['best']['rows']} ({c['best']['tok_s']:,.0f})")
    add("memory per row at best", lambda c: f"{c['best']['bytes_per_row'] / 2**20:.2f} MiB"
        if "bytes_per_row" in c["best"] else "n/a on CPU")
    add("at best: matmul / bandwidth share", lambda c: f"{100 * c['best']['matmul_fraction']:.1f}% / "
        f"{100 * c['best']['bandwidth_fraction']:.1f}%")
    add("matmul peak / engine share", lambda c: f"{c['matmul_peak_flop_s'] / 1e12:.1f} TFLOP/s / "
        f"{100 * c['matmul_fraction']:.1f}%")
    add("copy bandwidth / engine share", lambda c: f"{c['copy_bytes_s'] / 1e9:,.0f} GB/s / "
        f"{100 * c['bandwidth_fraction']:.1f}%")
    width = max(len(label) for label, _ in rows)
    cell = max(len(str(v)) for _, values in rows for v in values)
    for label, values in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{str(v):<{cell}}" for v in values))
    for c, d in zip(cols, dtypes):
        if "scan" in c:
            lines.append(f"scan {d}: " + ", ".join(
                f"{p['rows']} rows {p['tok_s']:,.0f} tok/s"
                + (f" {p['bytes_per_row'] / 2**20:.2f} MiB/row" if "bytes_per_row" in p else "")
                for p in c["scan"]))
    for d, old in report.get("sweep_baseline", {}).items():
        new = report["sweep"].get(d, {})
        if "error" in old or "error" in new:
            lines.append(f"previous engine {d}: {old.get('error') or new.get('error')}")
            continue
        lines.append(f"previous engine {d}: {old['engine_tok_s']:,.0f} tokens/s at {old['prompts']} prompts "
                     f"(this engine {new['engine_tok_s'] / old['engine_tok_s']:.2f}x); scan "
                     + ", ".join(f"{p['rows']} rows {p['tok_s']:,.0f} tok/s (this {q['tok_s'] / p['tok_s']:.2f}x)"
                                 for p, q in zip(old.get("scan", []), new.get("scan", []))))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the suite's check)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu", help="folder for gpu.json and logs")
    parser.add_argument("--profile", action="store_true", help="add the profile step (profile.json beside gpu.json)")
    parser.add_argument("--steps", default="exactness,sweep,run",
                        help=f"comma-separated steps to run, of {', '.join(STEPS)} (--profile adds profile)")
    parser.add_argument("--baseline", help="the previous engine (a folder holding its pipeline/, or a git ref): "
                                           "its sweep and profile beside this engine's")
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s] + (["profile"] if args.profile else [])
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"gpu.sh: unknown step {unknown[0]!r} in --steps; choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu.sh: torch sees no CUDA device; use --cpu for the CPU check", file=sys.stderr)
        return 2
    size = SIZES[device]
    args.out.mkdir(parents=True, exist_ok=True)
    previous = baseline_tree(args.baseline, args.out) if args.baseline else None
    start = time.perf_counter()
    report = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(),
              "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"}
    if "exactness" in steps:
        say("exactness")
        report["exactness"] = exactness(device, size["checks"], args.out, size["timeout"])
    if "sweep" in steps:
        say("sweep and limits")
        report["sweep"] = {dtype: sweep(size, device, dtype, args.out) for dtype in size["dtypes"]}
        if previous:
            dtype = size["profile"][size["profile"].index("--dtype") + 1]
            report["sweep_baseline"] = {dtype: sweep(size, device, dtype, args.out, previous)}
    if "run" in steps:
        say("run")
        try:
            report["run"] = run(size, device, args.out)
        except Exception as exc:  # a step's failure is reported, the table still printed
            report["run"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if "profile" in steps:
        say("profile of one decode step")
        report["profile"] = profile(size, device, args.out)
        if previous:
            report["profile_baseline"] = profile(size, device, args.out, previous)
    report["seconds"] = time.perf_counter() - start
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"figures: {args.out / 'gpu.json'} ({report['seconds']:.0f} s)")
    tests = report.get("exactness", {}).get("tests", {})
    failed = "error" in report.get("exactness", {}) or any(v == "failed" for v in tests.values()) \
        or any("error" in c for part in ("sweep", "sweep_baseline") for c in report.get(part, {}).values()) \
        or "error" in report.get("run", {}) or not report.get("run", {}).get("rows_ok", True) \
        or any("error" in report.get(part, {}) for part in ("profile", "profile_baseline"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
