"""The executor with real Ray on this machine: worker and node loss, placement limits, which Ray, the environment.

Every run is the same tiny job (a 4-layer random Llama speaking the embedded tokenizer, 4 Alpaca
sequences in 4 shards of 1, 3 configurations, 4 new tokens, float32), so every run folder must hold
exactly the rows of one undisturbed computation of its shards, each (sequence, configuration) once.
Multi-node tests use `ray.cluster_utils.Cluster`: a head without CPUs (so workers run on other nodes)
and 1-CPU worker nodes, all processes of this test session.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from ray.cluster_utils import Cluster
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.data.adapters import load_examples, shard_examples
from pipeline.generation.configs import build_configs
from pipeline.generation.models import load_model, load_tokenizer
from pipeline.generation.task import GenerateTask
from pipeline.run.cluster import worker_env
from pipeline.run.job import load_job
from pipeline.run.runner import run_job

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
CLI = [sys.executable, "-m", "pipeline.cli", "run"]
SEQUENCES = 4
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer random Llama saved with the embedded tokenizer: loads in a blink on every worker."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def job_file(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "faults.toml"
    path.write_text(f"""
name = "faults"
model = "{tiny_model}"
dtype = "float32"
device = "cpu"
families = ["uls", "ee"]
config_ids = ["uls-2", "ee-1"]
max_new_tokens = 4
batch_size = 1
shard_size = 1
workers = 2

[dataset]
name = "alpaca"
limit = {SEQUENCES}
data_dir = "{DATA}"
""")
    return path


def _rows(table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: (row["seq_id"], row["config_id"]))


def read_rows(run_dir: Path) -> list[dict]:
    return _rows(pq.read_table(run_dir / "generations"))


@pytest.fixture(scope="module")
def reference(job_file) -> list[dict]:
    """The undisturbed rows: every shard's generation task run in this process, one thread as in the workers."""
    spec = load_job(job_file)
    lm = load_model(spec.model, spec.dtype, "cpu")
    configs = spec.select_configs(build_configs(lm.num_layers, spec.families, spec.rls_seeds))
    task = GenerateTask(tuple(configs), spec.max_new_tokens, spec.prefill, spec.batch_size, spec.max_rows)
    shards = shard_examples(load_examples(spec.dataset, load_tokenizer(spec.model)), spec.shard_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [row for index, examples in enumerate(shards) for row in task.run(lm, index, examples).to_pylist()]
    finally:
        torch.set_num_threads(threads)
    assert len(shards) == SEQUENCES and len(rows) == SEQUENCES * len(configs) == SEQUENCES * 3
    return sorted(rows, key=lambda row: (row["seq_id"], row["config_id"]))


def _kill_once(killed: list[int], workers_busy: int):
    """An on_dispatch hook: SIGKILL the process of the newest shard's worker, once, when `workers_busy` are busy."""
    def hook(dispatcher) -> None:
        busy = dispatcher.busy()
        if not killed and len(busy) == workers_busy:
            killed.append(busy[max(busy)]["pid"])
            os.kill(killed[0], signal.SIGKILL)
    return hook


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_killed_mid_shard_run_completes(job_file, reference, tmp_path, capsys, workers):
    """The only worker, or one of two while the other is busy: the shard waits for a ready worker, uncounted."""
    killed: list[int] = []
    out = tmp_path / "run"
    summary = run_job(load_job(job_file, overrides={"out": str(out), "workers": workers}),
                      on_dispatch=_kill_once(killed, workers))
    err = capsys.readouterr().err
    assert killed and re.search(r"worker \d lost during shard \d{5} \(\w+\); shard requeued", err), err
    assert "failed" not in err
    if workers == 1:  # nobody else could take the shard: it waited for the restarted worker
        assert "worker 0 ready again" in err
    assert (summary.computed, summary.rows) == (SEQUENCES, SEQUENCES * 3)
    assert read_rows(out) == reference


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (the driver's node) and three 1-CPU worker nodes; fast node-death detection."""
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS})
    for _ in range(3):
        made.add_node(num_cpus=1)
    made.wait_for_nodes()
    yield made
    made.shutdown()


def test_driver_environment_reaches_workers_on_other_nodes(cluster, job_file, reference, tmp_path, monkeypatch):
    assert worker_env({"DYNORACLE_CACHE": "/c", "HF_TOKEN": "t", "HF_HOME": "/h", "PATH": "/bin"}) == {
        "DYNORACLE_CACHE": "/c", "HF_TOKEN": "t", "HF_HOME": "/h"}
    cache = tmp_path / "cache"  # set after the nodes started: only the runtime_env can carry it there
    monkeypatch.setenv("DYNORACLE_CACHE", str(cache))
    out = tmp_path / "run"
    run_job(load_job(job_file, overrides={"out": str(out)}), address=cluster.address)
    workers = json.loads((out / "run.json").read_text())["workers"]
    assert [worker["cache"] for worker in workers] == [str(cache)] * 2
    assert cluster.head_node.node_id not in {worker["node_id"] for worker in workers}
    assert read_rows(out) == reference


@pytest.mark.parametrize("flags, asked", [
    (["--workers", "4"], "4 CPU workers x 1 thread (1 CPU each)"),
    (["--device", "cuda", "--workers", "1"], "1 GPU worker (1 CPU + 1 GPU each)"),
])
def test_unplaceable_workers_fail_in_one_line_within_the_time_limit(cluster, job_file, tmp_path, flags, asked):
    out = tmp_path / "run"
    command = [*CLI, "--job", str(job_file), "--out", str(out), "--address", cluster.address, "--start-timeout", "3",
               *flags]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - started
    has = "the cluster has 4 nodes: 1 x 0 CPU, 3 x 1 CPU"
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: could not place {asked} within 3 s; {has}"
    waiting = f"waiting up to 3 s for the cluster to make room for {asked}; {has} (an autoscaler may add nodes)"
    assert waiting in result.stderr
    assert elapsed < 90 and not out.exists()


@pytest.mark.parametrize("workers", [2, 1])
def test_worker_node_lost_mid_run_completes_on_the_others(cluster, job_file, reference, tmp_path, capsys, workers):
    """SIGKILL of a busy worker's node: with 2 workers the other carries on; with 1 Ray re-places it elsewhere."""
    removed: list[str] = []

    def remove_a_busy_node(dispatcher) -> None:
        busy = dispatcher.busy()
        if not removed and len(busy) == workers:
            node_id = busy[max(busy)]["node_id"]
            node = next(node for node in cluster.worker_nodes if node.node_id == node_id)
            removed.append(node_id)
            cluster.remove_node(node, allow_graceful=False)

    out = tmp_path / "run"
    run_job(load_job(job_file, overrides={"out": str(out), "workers": workers}), address=cluster.address,
            on_dispatch=remove_a_busy_node)
    err = capsys.readouterr().err
    assert removed and "lost during shard" in err and "failed" not in err
    if workers == 1:
        back = re.search(r"worker 0 ready again \(pid \d+ on node (\w+)\)", err)
        assert back and not removed[0].startswith(back.group(1))
    assert read_rows(out) == reference


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_head(ray_tmp: str, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --head --block` on free ports of its own (other people's Rays run on this machine too)."""
    gcs, client, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=1",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--temp-dir={ray_tmp}/ray", "--include-dashboard=false"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_tree(pid: int) -> None:
    """Kill a process we started and every process it started, by pid (never `ray stop`: not all Rays here are ours)."""
    try:
        root = psutil.Process(pid)
        processes = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the private Ray needs 2 CPUs for the job's 2 workers")
def test_without_address_a_private_ray_even_beside_a_running_cluster(job_file, reference, tmp_path):
    """`ray start --head` (1 CPU) runs here; a run without --address must neither join it nor fail on it.

    Joining would not work: the job's 2 workers do not fit its 1 CPU (the run would wait for room). RAY_TMPDIR points
    `ray.init()`'s cluster discovery at that cluster's address file, as /tmp/ray would for a default one.
    """
    ray_tmp = tempfile.mkdtemp(prefix="dyn", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    head = _start_head(ray_tmp, env)
    try:
        address_file = Path(ray_tmp, "ray", "ray_current_cluster")
        deadline = time.monotonic() + 120
        while not address_file.is_file() and head.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert address_file.is_file(), "ray start --head did not come up"
        out = tmp_path / "run"
        result = subprocess.run([*CLI, "--job", str(job_file), "--out", str(out)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert read_rows(out) == reference
    finally:
        _kill_tree(head.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


class ScriptedWorker:
    """A stand-in worker: shard `s` raises while `raises[s]` tries remain, or kills its own process while
    `deaths[s]` remain (counted in files, which outlive the process)."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": "local", "fingerprint": "same", "dtype": "float32"}

    def _spend(self, kind: str, shard: int, budget: dict[int, int]) -> bool:
        marker = self.folder / f"{kind}-{shard}"
        spent = len(marker.read_text()) if marker.exists() else 0
        if spent >= budget.get(shard, 0):
            return False
        marker.write_text("x" * (spent + 1))
        return True

    def run(self, shard: int, raises: dict[int, int], deaths: dict[int, int]) -> int:
        if self._spend("death", shard, deaths):
            os._exit(1)
        if self._spend("raise", shard, raises):
            raise ValueError(f"broken shard {shard}")
        return shard * 10


@pytest.fixture(scope="module")
def local_ray():
    """A private 1-CPU Ray whose workers get this module's classes by value (tests/ is not importable there)."""
    import ray
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(module)


@pytest.mark.parametrize("raises, deaths, error", [
    ({1: 2}, {2: 3}, None),  # raising twice, then fine; three deaths (MAX_ATTEMPTS) do not count against a shard
    ({1: 3}, {}, "shard 1 failed 3 times, last on worker 0: ValueError: broken shard 1"),
])
def test_only_the_shards_own_exceptions_count(local_ray, tmp_path, raises, deaths, error):
    import ray

    from pipeline.run.cluster import WorkerPlan
    from pipeline.run.executor import RunError, ShardDispatcher, WorkerPool

    actor = ray.remote(ScriptedWorker).options(num_cpus=1, max_restarts=-1, max_task_retries=0).remote(str(tmp_path))
    pool = WorkerPool([actor], WorkerPlan(1, "cpu", 1, 0, 1), timeout=120)
    pool.start()
    results: dict[int, int] = {}
    dispatcher = ShardDispatcher(pool)

    def run() -> None:
        dispatcher.run([0, 1, 2, 3], lambda worker, shard: worker.run.remote(shard, raises, deaths),
                       lambda shard, worker, result, seconds: results.__setitem__(shard, result))

    try:
        if error is None:
            run()
            assert results == {0: 0, 1: 10, 2: 20, 3: 30}
            assert (tmp_path / "death-2").read_text() == "xxx" and (tmp_path / "raise-1").read_text() == "xx"
        else:
            with pytest.raises(RunError) as caught:
                run()
            assert str(caught.value) == error and 1 not in results
    finally:
        ray.kill(actor)
