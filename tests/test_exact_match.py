"""GSM8K answer extraction and exact match against lm-evaluation-harness's own filter objects and metric,
built from its installed gsm8k.yaml (an independent implementation of the same definitions)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.generation.exact_match import EXACT_MATCH_COLUMNS, GSM8K_FILTERS, GSM8K_IGNORE, GSM8K_UNTIL, \
    gsm8k_exact_match

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.metrics import exact_match_hf_evaluate  # noqa: E402
from lm_eval.filters import build_filter_ensemble  # noqa: E402

DATA = Path(os.environ.get("DYNORACLE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "gsm8k"
GSM8K_YAML = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"


@pytest.fixture(scope="module")
def task_yaml() -> dict:
    return yaml.safe_load(GSM8K_YAML.read_text())


@pytest.fixture(scope="module")
def ensembles(task_yaml: dict) -> list:
    return [build_filter_ensemble(f["name"], [(step["function"], {k: v for k, v in step.items() if k != "function"})
                                              for step in f["filter"]]) for f in task_yaml["filter_list"]]


def lm_eval_answers(ensemble, outputs: list[str]) -> list[str]:
    """lm-eval's pipeline for one filter: one response per document, then regex and take_first."""
    responses = [[out] for out in outputs]
    for step in ensemble.filters:
        responses = step().apply(responses, [{}] * len(outputs))
    return list(responses)


def lm_eval_exact_match(task_yaml: dict, prediction: str, reference: str) -> float:
    kwargs = {k: v for k, v in task_yaml["metric_list"][0].items()
              if k not in ("metric", "aggregation", "higher_is_better")}
    return float(exact_match_hf_evaluate(predictions=[prediction], references=[reference], **kwargs)["exact_match"])


def test_constants_are_the_yaml(task_yaml: dict) -> None:
    assert tuple(task_yaml["generation_kwargs"]["until"]) == GSM8K_UNTIL
    assert tuple(task_yaml["metric_list"][0]["regexes_to_ignore"]) == GSM8K_IGNORE
    assert [f["name"] for f in task_yaml["filter_list"]] == [f.name for f in GSM8K_FILTERS]
    assert EXACT_MATCH_COLUMNS == ("exact_match_strict_match", "exact_match_flexible_extract")


def test_every_reference_solution_extracts_its_final_number(task_yaml: dict, ensembles: list) -> None:
    rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    references = [row["answer"] for row in rows]
    finals = [ref.split("#### ")[-1].strip() for ref in references]
    for answer_filter, ensemble in zip(GSM8K_FILTERS, ensembles):
        ours = [answer_filter.extract(ref) for ref in references]
        assert ours == lm_eval_answers(ensemble, references), answer_filter.name
        assert ours == finals, answer_filter.name  # the final number itself, commas and all
    scores = gsm8k_exact_match(references, references)
    assert all(all(v == 1.0 for v in column) for column in scores.values())


OUTPUTS = [
    "Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18",
    "The total is $1,234.50.",
    "#### 1,000",
    "He pays $5 then $7, so the answer is 12.",
    "#### -3.",
    "No number here.",
    "The answer is 42. #### 7",
    "#### 7\n#### 8",
    "Cost: $$ 3.",
    "5",
    "It takes 2.5 hours; #### 2.50",
    "-. and ,, then 9",
    "Answer: 1,000,000.",
    "#### $72",
    "So 3 + 4 = 7\n\nQuestion: what is 7?",
]
REFERENCES = ["... #### 18", "x #### 1234.50", "#### 1000", "#### 12", "#### -3", "#### 0", "#### 42", "#### 7",
              "#### 3", "#### 5", "#### 2.5", "#### 9", "#### 1000000", "#### 72", "#### 7"]


def test_hard_outputs_extract_and_match_as_lm_eval(task_yaml: dict, ensembles: list) -> None:
    """Commas, dollar signs, trailing periods, several numbers, no number: the same answers and scores."""
    scores = gsm8k_exact_match(OUTPUTS, REFERENCES)
    for answer_filter, ensemble, column in zip(GSM8K_FILTERS, ensembles, EXACT_MATCH_COLUMNS):
        answers = [answer_filter.extract(out) for out in OUTPUTS]
        assert answers == lm_eval_answers(ensemble, OUTPUTS), answer_filter.name
        assert scores[column] == [lm_eval_exact_match(task_yaml, a, r) for a, r in zip(answers, REFERENCES)]
    # hand-checked: strict reads only "#### <digits>" (not "#### $72"), the first one; flexible the last
    # number-like run ("$1,234.50." -> 1234.50, "12." -> 12); "2.50" is not "2.5"
    assert scores["exact_match_strict_match"] == [1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    assert scores["exact_match_flexible_extract"] == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1]
