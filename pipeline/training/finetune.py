"""`dynoracle finetune`: fine-tune a model for one skip configuration the way the source study did.

The study (Glavas et al., 2024; networkslab/enlsp_neurips24) first fully fine-tuned OPT-IML on Alpaca's
train split, then fine-tuned one model per ULS budget from it: the skipped layers frozen, the kept layers
and the (tied) embeddings / LM head trained, the loss on the response tokens only, 2 epochs, learning rate
2e-5, batch 8, seed 42. Here every parameter outside the skipped decoder layers is trained (embeddings,
kept layers, final norm, LM head).

Skipping in training matches the engine's prefill policies exactly. A batch is laid out as
[left-padded prompts | right-padded responses], so every prompt ends at the same position P:
- `full` (the study's): a skipped layer runs on positions < P only (the prompt, causal attention, so its
  states are the full model's); response positions pass it unchanged. Kept layers run on everything, so a
  response token attends to full-model prompt states, as the engine's shared prefill gives it.
- `skip`: a skipped layer is never called.
Either way no response token ever goes through a skipped layer, and skipped layers' weights never change
(they have no gradient and are not in the optimizer).

Training is the Hugging Face `Trainer`: evaluation loss on the validation split each epoch (a file dataset is
cut into train and validation rows as Alpaca is, `pipeline.data.adapters`), checkpoints in
`<out>/trainer-checkpoints/` that a rerun resumes from. With `workers`, the same training runs
data-parallel on Ray Train's `TorchTrainer` (one worker per GPU; gloo on CPUs). The output folder is an
ordinary Hugging Face model folder (weights, config, tokenizer) plus `finetune.json`, written last: what
produced it (`data_source`: the file, local folder or hub id the rows were read from) and its losses.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pipeline.data.adapters import DatasetSpec, data_source, load_examples
from pipeline.generation.checkpoints import resolve_source
from pipeline.generation.configs import SkipConfig, config_for_id
from pipeline.generation.engine import PREFILL_POLICIES
from pipeline.generation.models import decoder_layers, load_model
from pipeline.run.atomic import write_json
from pipeline.training.out_folder import claim_out_folder

FINETUNE_JSON = "finetune.json"
CHECKPOINTS = "trainer-checkpoints"
IGNORE = -100  # label of positions without loss (prompt, padding), as Hugging Face losses expect


@dataclass(frozen=True)
class FinetuneSpec:
    """One fine-tune: the study's hyperparameters are the defaults. `batch_size` is the global batch
    (split evenly over `workers`); `epochs` may be fractional; `max_response_tokens` cuts long references."""

    model: str
    config_id: str
    dataset: DatasetSpec
    out: str
    epochs: float = 2.0
    lr: float = 2e-5
    batch_size: int = 8
    seed: int = 42
    prefill: str = "full"
    max_response_tokens: int = 256
    eval_limit: int | None = None  # validation rows for the evaluation loss; None: the whole split
    save_steps: int = 500
    bf16: bool = False  # bfloat16 autocast (weights and optimizer stay float32)
    workers: int | None = None  # None: this process; N: Ray Train TorchTrainer with N workers

    def __post_init__(self) -> None:
        if self.prefill not in PREFILL_POLICIES:
            raise ValueError(f"unknown prefill {self.prefill!r}; choose from {', '.join(PREFILL_POLICIES)}")
        for key in ("batch_size", "max_response_tokens", "save_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not self.epochs > 0 or not self.lr > 0:
            raise ValueError(f"epochs and lr must be positive, got {self.epochs} and {self.lr}")
        if self.workers is not None and (self.workers < 1 or self.batch_size % self.workers):
            raise ValueError(f"batch size {self.batch_size} must split evenly over {self.workers} workers")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval limit must be a positive integer, got {self.eval_limit}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data


def response_rows(dataset: DatasetSpec, tokenizer: Any, max_response_tokens: int) -> list[dict[str, list[int]]]:
    """The split's prompts (exactly as `run` builds them) with their reference as the response to learn.

    Response = the reference's tokens, cut to `max_response_tokens`, then EOS when it was not cut.
    """
    examples = load_examples(dataset, tokenizer)
    encoded = tokenizer([ex.reference for ex in examples], add_special_tokens=False, verbose=False)["input_ids"]
    rows = []
    for ex, response in zip(examples, encoded):
        cut = response[:max_response_tokens]
        if len(response) <= max_response_tokens:
            cut = [*cut, tokenizer.eos_token_id]
        rows.append({"prompt_ids": list(ex.prompt_ids), "response_ids": cut})
    return rows


class ResponseCollator:
    """Batches rows as [left-padded prompt | right-padded response] with labels on the response only.

    Returns input_ids, attention_mask, position_ids (B, P + R), labels (B, R + 1: from the last prompt
    position, which predicts the first response token), logits_to_keep = R + 1 and prompt_width = P.
    Positions count real tokens only, as the engine's `prompt_positions`.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(r["prompt_ids"]) for r in rows)
        length = max(len(r["response_ids"]) for r in rows)
        shape = (len(rows), width + length)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            prompt, response = row["prompt_ids"], row["response_ids"]
            start, end = width - len(prompt), width + len(response)
            input_ids[i, start:width] = torch.tensor(prompt)
            input_ids[i, width:end] = torch.tensor(response)
            labels[i, width:end] = torch.tensor(response)
            mask[i, start:end] = 1
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        # Logits only where a response token is predicted (the last prompt position onwards): the LM head
        # over prompt positions would cost as much as several decoder layers and carry no loss.
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                "labels": labels[:, width - 1 :], "logits_to_keep": length + 1, "prompt_width": width}


# ---------------------------------------------------------------- skipping in training


def _prefix(name: str, value: Any, width: int, length: int) -> Any:
    """A layer argument cut to the first `width` positions of a `length`-long sequence."""
    if isinstance(value, tuple):
        return tuple(_prefix(name, v, width, length) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    if name == "attention_mask" and value.dim() == 4:
        return value[..., :width, :width]
    if value.dim() == 1 and value.shape[0] == length:  # cache_position
        return value[:width]
    if value.dim() >= 2 and value.shape[1] == length:  # position ids, rotary tables
        return value[:, :width]
    return value


class SkippedLayers:
    """Makes the model skip the layers a configuration leaves out, for training and its evaluation.

    Patches the `forward` of each skipped layer's instance (no new modules, so the state dict and the
    Trainer's checkpoints stay the plain model's). Set `prompt_width` before each forward under `full`.
    """

    def __init__(self, model: nn.Module, config: SkipConfig, prefill: str):
        self.stack = decoder_layers(model)
        self.kept = set(config.layers)
        self.prefill = prefill
        self.prompt_width: int | None = None

    def skipped(self) -> list[nn.Module]:
        return [layer for j, layer in enumerate(self.stack) if j not in self.kept]

    def freeze(self) -> None:
        for layer in self.skipped():
            layer.requires_grad_(False)

    @contextmanager
    def active(self) -> Iterator[None]:
        layers = self.skipped()
        for layer in layers:
            layer.forward = self._wrap(layer.forward)
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward  # back to the class's forward

    def _wrap(self, forward):
        def skipped_forward(hidden_states: torch.Tensor, *args, **kwargs):
            if self.prefill == "skip":
                return hidden_states
            width, length = self.prompt_width, hidden_states.shape[1]
            if width is None:
                raise RuntimeError("prompt_width is not set: the full prefill needs the batch's prompt width")
            if args:
                raise TypeError("skipped layers expect keyword arguments after the hidden states")
            cut = {name: _prefix(name, value, width, length) for name, value in kwargs.items()}
            out = forward(hidden_states[:, :width], **cut)
            return torch.cat([out, hidden_states[:, width:]], 1)

        return skipped_forward


def response_loss(model: nn.Module, skipping: SkippedLayers, batch: dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of a collated batch, with the configuration's layers
    skipped (what training minimises). A scalar tensor; grads flow unless called under no_grad."""
    inputs = dict(batch)
    skipping.prompt_width = inputs.pop("prompt_width")
    with skipping.active():
        return model(**inputs, use_cache=False).loss


# ---------------------------------------------------------------- training


def _trainer(spec: FinetuneSpec, out: Path, model: nn.Module, tokenizer: Any, skipping: SkippedLayers,
             train_rows: list[dict], eval_rows: list[dict], world: int, cuda: bool):
    """The Hugging Face Trainer for this fine-tune; `compute_loss` sets the batch's prompt width."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class SkipTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            skipping.prompt_width = inputs.pop("prompt_width")
            with skipping.active():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    per_device = spec.batch_size // world
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS), num_train_epochs=spec.epochs, learning_rate=spec.lr,
        per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device, seed=spec.seed,
        data_seed=spec.seed, eval_strategy="epoch" if eval_rows else "no", save_strategy="steps",
        save_steps=spec.save_steps, save_total_limit=1, logging_steps=10, report_to=[], disable_tqdm=True,
        remove_unused_columns=False, use_cpu=not cuda, bf16=spec.bf16, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    return SkipTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                       eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                       data_collator=ResponseCollator(tokenizer.pad_token_id), processing_class=tokenizer)


def _fit(spec: FinetuneSpec, world: int = 1, ray_worker: bool = False) -> dict[str, Any]:
    """Train on this process (one rank of `world`); rank 0 saves the model. Returns the losses."""
    cuda = torch.cuda.is_available()
    lm = load_model(spec.model, "float32")  # the Trainer moves it to its device
    model, tokenizer = lm.model, lm.tokenizer
    config = config_for_id(lm.num_layers, spec.config_id)
    train = response_rows(dataclasses.replace(spec.dataset, split="train"), tokenizer, spec.max_response_tokens)
    evaluation = response_rows(dataclasses.replace(spec.dataset, split="validation", limit=spec.eval_limit),
                               tokenizer, spec.max_response_tokens)
    skipping = SkippedLayers(model, config, spec.prefill)
    skipping.freeze()
    out = Path(spec.out)
    trainer = _trainer(spec, out, model, tokenizer, skipping, train, evaluation, world, cuda)
    if ray_worker:
        from ray.train.huggingface.transformers import prepare_trainer

        trainer = prepare_trainer(trainer)
    resume = any((out / CHECKPOINTS).glob("checkpoint-*"))
    if resume and trainer.is_world_process_zero():
        log(f"resuming from the latest checkpoint in {out / CHECKPOINTS}")
    result = trainer.train(resume_from_checkpoint=resume or None)
    metrics = {"train_loss": result.training_loss, "steps": result.global_step}
    evaluated = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    if evaluated:
        metrics["eval_loss"] = evaluated[-1]
    if trainer.is_world_process_zero():
        model.config.use_cache = True
        trainer.save_model(str(out))
        lm.model.generation_config.save_pretrained(str(out))
    return {**metrics, "train_rows": len(train), "eval_rows": len(evaluation)}


def _ray_fit(spec: FinetuneSpec, address: str | None) -> dict[str, Any]:
    """The same training on Ray Train's TorchTrainer: `workers` ranks, gloo on CPUs, NCCL on GPUs.

    Joins the cluster at `address` (or RAY_ADDRESS); otherwise Ray Train starts a local Ray.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if address and not ray.is_initialized():
        ray.init(address=address)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.is_available()

    def loop(_config: dict) -> None:
        import tempfile

        import ray.train

        metrics = _fit(spec, world=spec.workers, ray_worker=True)
        if ray.train.get_context().get_world_rank() != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:  # the metrics travel back as rank 0's checkpoint
            (Path(folder) / "metrics.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    storage = Path(spec.out) / ".ray-train"
    trainer = TorchTrainer(
        loop, scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(storage), name="finetune"),
    )
    # Ray Train installs its own SIGINT handler for the fit and leaves it behind; put the caller's back, or a
    # later Ctrl-C in this process would abort a finished trainer instead of interrupting what runs then.
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"Ray Train failed: {result.error}")
    with result.checkpoint.as_directory() as folder:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    shutil.rmtree(storage, ignore_errors=True)
    return metrics


def finetune(spec: FinetuneSpec, address: str | None = None) -> dict[str, Any]:
    """Fine-tune `spec.model` for `spec.config_id` into `spec.out`; resumes an interrupted run there.

    With `spec.workers`, trains on Ray Train (`address`: the cluster to join; default a local Ray).

    Returns the record also written to `<out>/finetune.json`. Raises ValueError (one line) when `out`
    already holds a finished fine-tune or the configuration does not fit the model.
    """
    # Absolute local paths: Ray Train's workers do not run in this folder. An empty reference is a fine
    # target here (the response is EOS alone), so such rows are kept.
    spec = dataclasses.replace(spec, model=resolve_source(spec.model), out=str(Path(spec.out).expanduser().resolve()),
                               dataset=dataclasses.replace(spec.dataset, split="train", empty_references="keep"))
    out = Path(spec.out)
    if (out / FINETUNE_JSON).is_file():
        raise ValueError(f"{out} already holds a finished fine-tune; choose another --out")
    base = load_model(spec.model, "float32")
    config = config_for_id(base.num_layers, spec.config_id)  # fails before anything is written
    base_fingerprint = base.fingerprint()
    del base
    claim_out_folder(out, CHECKPOINTS, spec)  # an empty folder, or this same training's checkpoints
    started, start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    metrics = _ray_fit(spec, address) if spec.workers else _fit(spec)
    record = {
        "config": config.to_dict(), "base_model": spec.model, "base_fingerprint": base_fingerprint,
        "settings": {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("dataset", "out")},
        "dataset": dataclasses.asdict(spec.dataset), "data_source": data_source(spec.dataset),
        **{k: metrics[k] for k in ("train_rows", "eval_rows", "steps", "train_loss", "eval_loss") if k in metrics},
        "started": started, "seconds": round(time.monotonic() - start, 1),
    }
    write_json(record, out / FINETUNE_JSON)  # first: a folder never holds a model without its record
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return record
