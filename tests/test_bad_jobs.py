"""Bad jobs, data files and models: one line, exit 2, refused before Ray starts, nothing on disk changed.

Every `dynoracle run` here runs in a fresh working folder (so `outputs/` would appear there) and must
leave that folder exactly as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
import torch
from test_run_folders import folder_hash, invoke
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.adapters import DatasetSpec, load_examples
from pipeline.generation.configs import build_configs
from pipeline.generation.engine import generate
from pipeline.generation.models import load_model, load_tokenizer
from pipeline.generation.reference import masked_generate

DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
TINY = ["--dataset", "alpaca", "--limit", "2", "--data-dir", str(DATA)]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """The current folder of the run, holding a file that is not dynoracle's (the sweep must not touch it)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".notes.tmp").write_text("mine")
    monkeypatch.chdir(work)
    return work


def refused_run(args: list[str], workdir: Path, message: str) -> None:
    before = folder_hash(workdir)
    result = invoke(["run", *args])
    assert (result.exit_code, result.output.strip()) == (2, f"error: {message}"), result.output
    assert folder_hash(workdir) == before
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('name = 5\n[dataset]\nname = "alpaca"', "name must be a string, got 5"),
        ("dataset = 5", "dataset must be a dataset name or a [dataset] table with a name, got 5"),
        ('out = 7\n[dataset]\nname = "alpaca"', "out must be a string, got 7"),
        ('config_ids = [1, 2]\n[dataset]\nname = "alpaca"', "config_ids must be a list of strings, got [1, 2]"),
        ('workers = true\n[dataset]\nname = "alpaca"', "workers must be an integer or none, got True"),
        ('[dataset]\nname = "alpaca"\nlimit = true', "dataset.limit must be an integer or none, got True"),
        ('[dataset]\nname = 5', "dataset.name must be a string, got 5"),
        ('trust_remote_code = "yes"\n[dataset]\nname = "alpaca"', "trust_remote_code must be true or false, got 'yes'"),
    ],
)
def test_job_fields_are_type_checked(workdir: Path, tmp_path: Path, toml: str, message: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(toml + "\n")
    refused_run(["--job", str(job)], workdir, message)


@pytest.mark.parametrize("name", ["..", ".", "a/../.."])
def test_a_run_name_cannot_leave_outputs(workdir: Path, name: str) -> None:
    refused_run([*TINY, "--name", name], workdir, f"job name {name!r} must be a plain folder name (not '.' or '..', "
                "no '/' or '\\'): the run folder is outputs/<name>")


def test_a_folder_that_is_not_a_run_folder_is_refused(workdir: Path) -> None:
    (workdir / "thesis").mkdir()
    (workdir / "thesis" / "chapter1.tex").write_text("precious")
    refused_run([*TINY, "--out", "thesis"], workdir,
                "thesis is not empty and is not a dynoracle run folder (it holds chapter1.tex); choose another --out or --name")


def test_unknown_config_and_too_many_workers_are_reported_before_ray(workdir: Path) -> None:
    refused_run([*TINY, "--configs", "uls-3,uls-99"], workdir,
                "unknown config id uls-99 for this model and families (see `dynoracle configs --layers L`)")
    refused_run([*TINY, "--workers", "999", "--device", "cpu"], workdir,
                f"cannot place 999 CPU workers x 1 thread (1 CPU each) on this machine (1 node: 1 x {os.cpu_count()} CPU)")


def test_a_missing_gguf_file_is_named(workdir: Path) -> None:
    refused_run([*TINY, "--model", str(workdir / "nope" / "model.gguf")], workdir,
                f"GGUF file {workdir / 'nope' / 'model.gguf'} does not exist")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A GPT-2 of 64 positions with the embedded tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("models") / "gpt2-64"
    tokenizer = load_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_prompt_plus_new_tokens_is_checked_against_positions(workdir: Path, tiny_gpt2: Path) -> None:
    examples = load_examples(DatasetSpec("alpaca", data_dir=str(DATA), limit=2), load_tokenizer(str(tiny_gpt2)))
    longest = max(ex.prompt_tokens for ex in examples)
    assert longest + 64 > 64
    refused_run([*TINY, "--model", str(tiny_gpt2), "--max-new-tokens", "64"], workdir,
                f"the longest prompt ({longest} tokens) plus max_new_tokens (64) needs {longest + 64} positions, but "
                f"{tiny_gpt2} has 64; lower dataset.prompt_budget (now 1024) or max_new_tokens")


def test_remote_code_is_never_run_or_asked_for(workdir: Path, tmp_path: Path, tiny_gpt2: Path) -> None:
    """A model folder with its own code: refused in one line even with 'y' on stdin; the code never runs."""
    folder = tmp_path / "custom"
    folder.mkdir()
    for path in tiny_gpt2.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "ran"
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2Config\nclass CustomConfig(GPT2Config):\n    model_type = 'custom-gpt2'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-gpt2", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    before = folder_hash(workdir)
    result = CliRunner().invoke(app, ["run", *TINY, "--model", str(folder)], input="y\n")
    assert result.exit_code == 2
    line = result.output.strip()
    assert line == (f"error: {folder} ships its own Python code, which dynoracle runs only when the job sets "
                    "trust_remote_code = true (or `run --trust-remote-code`)"), result.output
    assert not marker.exists() and folder_hash(workdir) == before


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_json_files_with_a_byte_order_mark_are_read(tmp_path: Path, suffix: str) -> None:
    rows = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Name a colour.", "answer": "Red"}]
    text = "\n".join(json.dumps(r) for r in rows) if suffix == "jsonl" else json.dumps(rows)
    path = tmp_path / f"qa.{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = invoke(["prompts", "--dataset", "file", "--file", str(path), "--prompt-column", "question",
                     "--reference-column", "answer", "--json"])
    assert result.exit_code == 0, result.output
    assert [(p["seq_id"], p["reference"]) for p in json.loads(result.output)] == [("qa-000000", "4"), ("qa-000001", "Red")]


def test_run_takes_the_file_dataset_flags(workdir: Path, tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "What is 2+2?", "answer": "4"}) + "\n")
    file_args = ["--dataset", "file", "--file", str(path), "--prompt-column", "question"]
    refused_run(file_args, workdir, "dataset file needs a file path, a prompt column and a reference column")
    # with every flag the file is read and tokenized; the run then stops at the next check
    refused_run([*file_args, "--reference-column", "answer", "--configs", "uls-99"], workdir,
                "unknown config id uls-99 for this model and families (see `dynoracle configs --layers L`)")


def test_a_tokenizer_without_pad_and_eos_runs_to_the_token_limit(tmp_path: Path) -> None:
    folder = tmp_path / "no-eos"
    tokenizer = load_tokenizer()
    tokenizer.eos_token = None
    tokenizer.pad_token = None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lm = load_model(str(folder), "float32")
    assert lm.tokenizer.eos_token_id is None and lm.tokenizer.pad_token_id == 0
    prompts = [[5, 17, 300, 4000, 23], [9, 88, 1200]]  # two lengths: the shorter one is padded
    configs = [c for c in build_configs(3) if c.config_id in ("full", "uls-2", "ee-1")]
    for prefill in ("full", "skip"):
        got = generate(lm, prompts, configs, 5, prefill=prefill)
        for k, cfg in enumerate(configs):
            assert [row[k].token_ids for row in got] == masked_generate(lm, prompts, cfg, 5, prefill=prefill)
            assert all(row[k].finish_reason == "length" and row[k].gen_tokens == 5 for row in got)
