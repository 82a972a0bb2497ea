"""Dataset adapters on the real offline slices: prompts, the seeded Alpaca split, seq ids, truncation, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data import sources
from pipeline.data.adapters import (
    DataError,
    DatasetSpec,
    Record,
    load_examples,
    load_records,
    load_split,
    shard_examples,
    split_indices,
)
from pipeline.generation.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")
ALPACA_ROWS = sum(1 for line in (DATA / "alpaca" / "alpaca_sample.jsonl").open() if line.strip())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(autouse=True)
def local_data(monkeypatch):
    monkeypatch.setenv("DYNORACLE_DATA_DIR", str(DATA))


def alpaca_records() -> dict[str, Record]:
    """Every row of the slice, found by its prompt text, across the three splits."""
    return {r.plain_prompt: r for split in ("train", "validation", "test") for r in load_records(DatasetSpec("alpaca", split, empty_references="keep"))}


def test_alpaca_prompt_without_input():
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
    )
    record = alpaca_records()[prompt]
    assert record.reference.startswith("1.Eat a balanced diet")
    assert not record.summary


def test_alpaca_prompt_with_input():
    prompt = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nIdentify the odd one out.\n\n### Input:\nTwitter, Instagram, Telegram\n\n### Response:\n"
    )
    assert alpaca_records()[prompt].reference == "Telegram"


def test_split_sizes_disjoint_and_complete():
    n = ALPACA_ROWS
    parts = {split: split_indices(n, split) for split in ("train", "validation", "test")}
    held_out = math.ceil(n * 0.3)
    assert [len(parts[s]) for s in parts] == [n - held_out, held_out - math.ceil(held_out / 2), math.ceil(held_out / 2)]
    assert sorted(parts["train"] + parts["validation"] + parts["test"]) == list(range(n))
    for split, indices in parts.items():
        assert len(load_records(DatasetSpec("alpaca", split, empty_references="keep"))) == len(indices)
    assert len(alpaca_records()) == n


def test_split_equals_the_studys_two_train_test_split_calls(tmp_path):
    """A 52,002-row Alpaca mirror: each split is, row for row and in order, what the study's calls give."""
    rows = [{"instruction": f"Task {i}.", "input": f"in {i}" if i % 3 else "", "output": f"out {i}"} for i in range(52002)]
    (tmp_path / "alpaca").mkdir()
    with (tmp_path / "alpaca" / "mirror.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    first = datasets.Dataset.from_list(rows).train_test_split(test_size=0.3, seed=42)
    second = first["test"].train_test_split(test_size=0.5, seed=42)
    expected = {"train": first["train"], "validation": second["train"], "test": second["test"]}
    for split, part in expected.items():
        served = load_split(DatasetSpec("alpaca", split, data_dir=str(tmp_path)))
        assert len(served) == {"train": 36401, "validation": 7800, "test": 7801}[split]
        assert served == part.to_list()
    records = load_records(DatasetSpec("alpaca", data_dir=str(tmp_path), limit=50))
    assert [r.references[0] for r in records] == expected["test"]["output"][:50]
    assert DatasetSpec("alpaca").split == "test"


def test_tiny_alpaca_cannot_be_split(tmp_path):
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "three.jsonl").write_text("".join(json.dumps({"instruction": "x", "output": "y"}) + "\n"
                                                              for _ in range(3)))
    with pytest.raises(DataError, match="^cannot split 3 rows into train, validation and test: "):
        load_records(DatasetSpec("alpaca", data_dir=str(tmp_path)))


def test_split_and_ids_stable_across_calls_and_processes():
    def listing(records):
        return [(r.seq_id, r.plain_prompt, r.reference) for r in records]

    first = listing(load_records(DatasetSpec("alpaca")))
    assert first == listing(load_records(DatasetSpec("alpaca")))
    assert [seq_id for seq_id, _, _ in first[:2]] == ["alpaca-test-000000", "alpaca-test-000001"]
    assert len({seq_id for seq_id, _, _ in first}) == len(first)
    assert listing(load_records(DatasetSpec("alpaca", limit=7))) == first[:7]
    code = (
        "import json; from pipeline.data.adapters import DatasetSpec, load_records; "
        "print(json.dumps([(r.seq_id, r.plain_prompt, r.reference) for r in load_records(DatasetSpec('alpaca'))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert [tuple(item) for item in json.loads(out)] == first


def test_cnn_prompts_token_ids_and_no_truncation_within_budget(tokenizer):
    examples = load_examples(DatasetSpec("cnn_dailymail", prompt_budget=None, limit=3), tokenizer)
    records = load_records(DatasetSpec("cnn_dailymail", limit=3))
    for example, record in zip(examples, records):
        assert example.prompt == f"### Article:\n{record.body}\n\n### Summary:\n" == record.plain_prompt
        assert list(example.prompt_ids) == tokenizer(example.prompt)["input_ids"]
        assert example.summary and not example.prompt_truncated
        assert example.reference == record.reference and "\n" in example.reference
    assert examples[0].seq_id == "cnn_dailymail-test-000000"


def test_long_article_is_cut_from_the_left_within_budget(tokenizer):
    record = max(load_records(DatasetSpec("cnn_dailymail")), key=lambda r: len(r.body))
    index = int(record.seq_id.rsplit("-", 1)[1])
    example = load_examples(DatasetSpec("cnn_dailymail", prompt_budget=128, limit=index + 1), tokenizer)[index]
    assert example.prompt_truncated and example.prompt_tokens <= 128
    assert example.prompt.startswith("### Article:\n") and example.prompt.endswith("\n\n### Summary:\n")
    kept = example.prompt.removeprefix("### Article:\n").removesuffix("\n\n### Summary:\n")
    assert kept and record.body.endswith(kept) and len(kept) < len(record.body) / 3
    assert list(example.prompt_ids) == tokenizer(example.prompt)["input_ids"]


def test_alpaca_truncation_keeps_instruction_and_cue(tokenizer, tmp_path):
    (tmp_path / "alpaca").mkdir()
    row = {"instruction": "Summarise the text.", "input": " ".join(f"word{i}" for i in range(400)), "output": "ok"}
    (tmp_path / "alpaca" / "four.jsonl").write_text((json.dumps(row) + "\n") * 4)  # the smallest splittable
    [example] = load_examples(DatasetSpec("alpaca", data_dir=str(tmp_path), prompt_budget=60), tokenizer)
    assert example.prompt_truncated and example.prompt_tokens <= 60
    assert "### Instruction:\nSummarise the text.\n\n### Input:\n" in example.prompt
    assert example.prompt.endswith("word399\n\n### Response:\n") and "word0 " not in example.prompt
    with pytest.raises(DataError, match="no room within the prompt budget of 20"):
        load_examples(DatasetSpec("alpaca", data_dir=str(tmp_path), prompt_budget=20), tokenizer)


def test_chat_format_wraps_the_plain_prompt(tokenizer):
    plain, chat = (load_examples(DatasetSpec("cnn_dailymail", prompt_format=f, prompt_budget=200, limit=2), tokenizer)
                   for f in ("plain", "chat"))
    for p, c in zip(plain, chat):
        assert c.prompt.startswith("<|im_start|>") and c.prompt.endswith("<|im_start|>assistant\n")
        assert "\n\n### Summary:\n<|im_end|>" in c.prompt and c.prompt_tokens <= 200 and c.prompt_truncated
        assert list(c.prompt_ids) == tokenizer(c.prompt, add_special_tokens=False)["input_ids"]
        assert p.seq_id == c.seq_id


def test_file_sources_jsonl_json_parquet(tokenizer, tmp_path):
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "Name a colour.", "a": "Blue"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    for name in ("qa.jsonl", "qa.json", "qa.parquet"):
        spec = DatasetSpec("file", path=str(tmp_path / name), prompt_column="q", reference_column="a")
        examples = load_examples(spec, tokenizer)
        assert [(e.seq_id, e.prompt, e.reference) for e in examples] == [
            ("qa-000000", "What is 2+2?", "4"), ("qa-000001", "Name a colour.", "Blue")]


def test_shards_are_fixed_size_and_in_order(tokenizer):
    examples = load_examples(DatasetSpec("alpaca", limit=10), tokenizer)
    shards = shard_examples(examples, 4)
    assert [len(s) for s in shards] == [4, 4, 2]
    assert [e for s in shards for e in s] == examples and shards[1][0] is examples[4]
    with pytest.raises(ValueError):
        shard_examples(examples, 0)


def test_list_references_and_kept_empty_ones(tokenizer, tmp_path):
    rows = [{"q": "Colour of the sky?", "a": ["The sky is blue.", "Blue."]}, {"q": "Say nothing.", "a": ""}]
    path = _write(tmp_path / "multi.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    spec = DatasetSpec("file", path=path, prompt_column="q", reference_column="a", empty_references="keep")
    first, second = load_examples(spec, tokenizer)
    assert first.references == ("The sky is blue.", "Blue.") and second.references == ("",)
    assert json.loads(first.reference) == rows[0]["a"] and second.reference == ""
    with pytest.raises(DataError, match="^multi.jsonl line 2: empty reference"):
        load_records(DatasetSpec("file", path=path, prompt_column="q", reference_column="a"))
    with pytest.raises(DataError, match="^unknown empty_references 'drop'; choose from refuse, keep$"):
        load_records(DatasetSpec("file", path=path, prompt_column="q", reference_column="a", empty_references="drop"))


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("make_spec", "message"),
    [
        (lambda tmp: DatasetSpec("squad"), "unknown dataset 'squad'; choose from alpaca, cnn_dailymail"),
        (lambda tmp: DatasetSpec("file", path=str(tmp / "missing.jsonl"), prompt_column="q", reference_column="a"),
         "no such file: .*missing.jsonl"),
        (lambda tmp: DatasetSpec("file", path=_write(tmp / "bad.jsonl", '{"q": "x", "a": "y"}\n{"q": oops}\n'),
                                 prompt_column="q", reference_column="a"), r"bad.jsonl: line 2 is not valid JSON"),
        (lambda tmp: DatasetSpec("file", path=_write(tmp / "cols.jsonl", '{"question": "x", "a": "y"}\n'),
                                 prompt_column="q", reference_column="a"),
         r"cols.jsonl line 1: no column 'q'; columns present: question, a"),
        (lambda tmp: DatasetSpec("file", path=_write(tmp / "blank.jsonl", '{"q": "x", "a": "y"}\n{"q": " ", "a": "y"}\n'),
                                 prompt_column="q", reference_column="a"), r"blank.jsonl line 2: empty prompt"),
        (lambda tmp: DatasetSpec("file", path=_write(tmp / "empty.jsonl", "\n"), prompt_column="q",
                                 reference_column="a"), r"no rows in .*empty.jsonl"),
        (lambda tmp: DatasetSpec("alpaca", limit=100000),
         rf"limit 100000 is more than the {len(split_indices(ALPACA_ROWS, 'test'))} rows"),
        (lambda tmp: DatasetSpec("cnn_dailymail", split="validation"), r"no validation\*.jsonl in the local data"),
        (lambda tmp: DatasetSpec("alpaca", split="dev"), r"unknown split 'dev'"),
        (lambda tmp: DatasetSpec("file", path="x.jsonl"), r"needs a file path, a prompt column and a reference column"),
        (lambda tmp: DatasetSpec("alpaca", prompt_format="markdown"), r"unknown prompt format 'markdown'"),
        (lambda tmp: DatasetSpec("file", path=_write(tmp / "null.jsonl", '{"q": "x", "a": "y"}\n{"q": "z", "a": null}\n'),
                                 prompt_column="q", reference_column="a"), r"^null.jsonl line 2: null reference \(column 'a'\)"),
        (lambda tmp: DatasetSpec("file", path=_write(tmp / "none.jsonl", '{"q": "x", "a": []}\n'),
                                 prompt_column="q", reference_column="a"), r"^none.jsonl line 1: empty reference"),
        (lambda tmp: DatasetSpec("file", path=_write(tmp / "blanks.jsonl", '{"q": "x", "a": ["ok", " "]}\n'),
                                 prompt_column="q", reference_column="a"), r"^blanks.jsonl line 1: empty reference"),
    ],
)
def test_bad_input_raises_one_line_data_error(tokenizer, tmp_path, make_spec, message):
    with pytest.raises(DataError, match=message) as caught:
        load_examples(make_spec(tmp_path), tokenizer)
    assert "\n" not in str(caught.value)


def test_offline_without_local_data_says_how_to_use_it(monkeypatch):
    monkeypatch.delenv("DYNORACLE_DATA_DIR")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face hub for tatsu-lab/alpaca; set DYNORACLE_DATA_DIR "
                                        r"or pass --data-dir to a local mirror \(<dir>/alpaca/\*.jsonl\)"):
        load_records(DatasetSpec("alpaca"))


def test_hub_sources_and_splits(monkeypatch):
    """Without local data the named datasets come from `datasets.load_dataset` (faked here: no hub on this machine)."""
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"instruction": f"Do {i}.", "input": "", "output": "ok", "article": f"Story {i}.", "highlights": "h",
                 "dialogue": f"A: hi {i}", "summary": "s"} for i in range(20)]

    monkeypatch.delenv("DYNORACLE_DATA_DIR")
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    alpaca = load_records(DatasetSpec("alpaca"))
    assert len(alpaca) == 20 - 14 - 3 and alpaca[0].body == f"Do {split_indices(20, 'test')[0]}."
    assert load_records(DatasetSpec("cnn_dailymail", limit=2))[1].body == "Story 1."
    assert load_records(DatasetSpec("samsum", split="validation"))[0].plain_prompt == "A: hi 0\n\nSummary:\n"
    hub = load_records(DatasetSpec("hub", path="org/qa", prompt_column="article", reference_column="summary"))
    assert hub[0].seq_id == "org_qa-test-000000"
    assert calls == [("tatsu-lab/alpaca", None, "train"), ("abisee/cnn_dailymail", "3.0.0", "test"),
                     ("Samsung/samsum", None, "validation"), ("org/qa", None, "test")]


def test_hub_offline_mode_says_how_to_use_local_data():
    env = {k: v for k, v in os.environ.items() if k != "DYNORACLE_DATA_DIR"} | {"HF_HUB_OFFLINE": "1"}
    code = (
        "from pipeline.data.adapters import DataError, DatasetSpec, load_records\n"
        "try:\n    load_records(DatasetSpec('cnn_dailymail'))\nexcept DataError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("cannot reach the Hugging Face hub for abisee/cnn_dailymail")
    assert "set DYNORACLE_DATA_DIR or pass --data-dir" in out.stdout


def test_cli_prints_prompts_as_json():
    result = CliRunner().invoke(app, ["prompts", "--dataset", "cnn_dailymail", "--limit", "2", "--prompt-budget", "64",
                                      "--json"])
    assert result.exit_code == 0, result.output
    items = json.loads(result.stdout)
    assert [i["seq_id"] for i in items] == ["cnn_dailymail-test-000000", "cnn_dailymail-test-000001"]
    assert all(i["prompt_tokens"] <= 64 and i["prompt_truncated"] and i["summary"] for i in items)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "squad"], "error: unknown dataset 'squad'"),
        (["--limit", "100000"], "error: limit 100000 is more than the"),
        (["--dataset", "file", "--file", "BAD", "--prompt-column", "q", "--reference-column", "a"],
         "error: BAD: line 1 is not valid JSON"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    args = [str(_write(tmp_path / "bad.jsonl", "{oops\n")) if a == "BAD" else a for a in args]
    message = message.replace("BAD", str(tmp_path / "bad.jsonl"))
    result = CliRunner().invoke(app, ["prompts", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
