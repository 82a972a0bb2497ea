"""The driver's tokenizer: read from the GGUF file's metadata, never by dequantising the embedded model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoTokenizer

from pipeline.generation import models
from pipeline.generation.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or REPO.parent / "shared" / "data")


def test_embedded_tokenizer_from_gguf_metadata_equals_the_workers(tmp_path, monkeypatch):
    workers = AutoTokenizer.from_pretrained(models._embedded_folder())  # saved beside the dequantised weights
    monkeypatch.setenv("DYNORACLE_CACHE", str(tmp_path))  # an empty cache: nothing may be converted into it
    driver = load_tokenizer()
    assert list(tmp_path.iterdir()) == []
    with (DATA / "alpaca" / "alpaca_sample.jsonl").open() as handle:
        texts = [value for line, _ in zip(handle, range(200)) for value in json.loads(line).values()
                 if isinstance(value, str) and value]
    texts += ["<|im_start|>user\n  two  spaces, tabs\tand ünïcödé<|im_end|>"]
    assert [driver(text)["input_ids"] for text in texts] == [workers(text)["input_ids"] for text in texts]
    assert (driver.eos_token, driver.bos_token, driver.chat_template) == (
        workers.eos_token, workers.bos_token, workers.chat_template)
