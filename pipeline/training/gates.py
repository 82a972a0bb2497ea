"""Per-token skip gates trained on a frozen model: the source study's hidden-state experiment (its figure 1b).

The study (Glavas et al., 2024; networkslab/enlsp_neurips24, `MLPGumbelSoftmaxController` and
`AdalasOPTDecoder`) puts a gate before every layer l >= 1: a small network on the layer's input hidden state
h^(l-1) (detached), a Gumbel-softmax over {run, skip} with hard samples (straight-through) in training, the
layer masked out where the sample says skip (masked execution: the layer's K/V still computed for every token,
`kv = "compute"` in `pipeline.generation.gated`), only response tokens gated, the prompt always through every
layer. The control is the same network fed a fixed input instead of h (the study: `torch.ones_like(h)`).

Here, with the model frozen, the loss is the language-model loss on the reference response plus
lambda x the expected number of layers run per response token (1 + sum over l >= 1 of P(run l)). The study's
two-class Gumbel-softmax at temperature 1 is a Gumbel-sigmoid on the logit difference, which is what runs
here. Departures, each for this project's short CPU training: the gate's input is RMS-normalised (the
residual stream of a pre-norm Llama grows to norms in the hundreds, which saturates a linear gate at
initialisation; the study's OPT states are small); the control's fixed input is a learned vector (starting
at ones, the study's input, which its linear layer then weighs; a linear gate on it is a learned constant
either way); the run logit starts at `init_run_logit` (P(run) = 0.95) instead of PyTorch's default (about
0.5), so that a few dozen steps start from the full model. At evaluation a gate decides by its sign (run
when P(run) > 0.5); the study kept sampling.

Training is a plain PyTorch loop over the train split's rows (the fine-tuning command's data path,
`response_rows` and `ResponseCollator`), resumable from `<out>/checkpoint.pt` (written atomically every
`save_steps` steps); `<out>/gates.json` is written last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from pipeline.data.adapters import DatasetSpec
from pipeline.generation.engine import wrapped_layers
from pipeline.generation.models import LoadedModel
from pipeline.run.atomic import write_atomic, write_json
from pipeline.training.finetune import IGNORE, log, response_rows

GATE_INPUTS = ("hidden", "fixed")
GATES_JSON = "gates.json"
GATES_WEIGHTS = "gates.pt"
CHECKPOINT = "checkpoint.pt"


class Gates(nn.Module):
    """One gate per layer l = 1..L-1: RMS-normalised input (h or a learned vector) -> MLP -> run logit.

    `hidden` = 0 is the study's default network (one linear layer); N > 0 adds a ReLU layer of N units.
    """

    def __init__(self, num_layers: int, dim: int, gate_input: str, hidden: int = 0, init_run_logit: float = 3.0):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"unknown gate input {gate_input!r}; choose from {', '.join(GATE_INPUTS)}")
        self.num_layers, self.dim, self.gate_input, self.hidden = num_layers, dim, gate_input, hidden

        def net() -> nn.Module:
            last = nn.Linear(hidden or dim, 1)
            nn.init.constant_(last.bias, init_run_logit)
            return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), last) if hidden else last

        self.nets = nn.ModuleList([net() for _ in range(num_layers - 1)])
        self.fixed = nn.Parameter(torch.ones(num_layers - 1, dim)) if gate_input == "fixed" else None

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run logit of layer `layer` (>= 1) for states hidden (..., D) -> (...), float32."""
        if self.fixed is not None:
            x = self.fixed[layer - 1].expand(*hidden.shape[:-1], self.dim)
        else:
            x = hidden.detach().float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.nets[layer - 1](x).squeeze(-1)

    def decide(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The hard decision at evaluation: run where the logit is positive. A `pipeline.generation.gated` Gate."""
        return self.logits(layer, hidden) > 0

    def sample(self, layer: int, hidden: torch.Tensor, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (hard 0/1 run sample with straight-through gradient, P(run)), each (...)."""
        logit = self.logits(layer, hidden)
        u = torch.rand_like(logit).clamp_(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / tau)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + soft - soft.detach(), torch.sigmoid(logit)


class _TrainingLayer(nn.Module):
    """Masked execution of one layer in training: response positions keep their input where the gate skips."""

    def __init__(self, layer: nn.Module, index: int, state: "_Batch"):
        super().__init__()
        self.layer, self.index, self.state = layer, index, state

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        if self.index == 0:
            return out
        st = self.state
        run, prob = st.gates.sample(self.index, hidden_states)
        decided = st.decided
        run = torch.where(decided, run, torch.ones_like(run))
        st.expected = st.expected + (prob * decided).sum()
        run = run[..., None].to(out.dtype)
        return run * out + (1 - run) * hidden_states


@dataclass
class _Batch:
    gates: Gates
    decided: torch.Tensor  # (B, R) bool: response positions with a label (the tokens fed after the first)
    expected: torch.Tensor | float = 0.0


PromptKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (Hkv, P, D) of one prompt


@torch.no_grad()
def prompt_kv(lm: LoadedModel, prompt_ids: list[int]) -> PromptKV:
    """One prompt through the full frozen model: every layer's K/V (the prompt is never gated, so its states
    do not depend on the gates and are computed once for every training that uses the row)."""
    cache = DynamicCache(config=lm.model.config)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=lm.device)
    lm.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def response_batch(lm: LoadedModel, rows: list[dict[str, list[int]]], kvs: list[PromptKV]) -> dict[str, Any]:
    """A batch of responses after their (left-padded) cached prompts: input_ids, attention_mask, position_ids,
    past_key_values for the model, and labels (B, R): position k predicts response token k + 1 (IGNORE past the
    end). The first response token is the prompt's prediction, the full model's, and carries no loss here."""
    width = max(len(r["prompt_ids"]) for r in rows)
    length = max(len(r["response_ids"]) for r in rows)
    device, batch = lm.device, len(rows)
    cache = DynamicCache(config=lm.model.config)
    for j in range(len(kvs[0])):
        keys = kvs[0][j][0].new_zeros(batch, kvs[0][j][0].shape[0], width, kvs[0][j][0].shape[-1])
        values = torch.zeros_like(keys)
        for i, kv in enumerate(kvs):
            keys[i, :, width - kv[j][0].shape[1] :] = kv[j][0]
            values[i, :, width - kv[j][1].shape[1] :] = kv[j][1]
        cache.update(keys, values, j)
    input_ids = torch.full((batch, length), lm.tokenizer.pad_token_id, dtype=torch.long, device=device)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width + length), dtype=torch.long, device=device)
    positions = torch.zeros((batch, length), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        prompt, response = row["prompt_ids"], row["response_ids"]
        input_ids[i, : len(response)] = torch.tensor(response)
        labels[i, : len(response) - 1] = torch.tensor(response[1:])
        mask[i, width - len(prompt) : width + len(response)] = 1
        positions[i] = len(prompt) + torch.arange(length)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "past_key_values": cache,
            "labels": labels}


def gate_loss(lm: LoadedModel, gates: Gates, batch: dict[str, Any], lam: float) -> tuple[torch.Tensor, float, float]:
    """(loss, language-model loss, expected layers run per decision token) of one `response_batch`.

    Decision tokens are the response tokens fed after the first (those with a label). loss = mean
    cross-entropy over them + lam x (1 + mean over them of the sum of P(run l) over l >= 1)."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    decided = labels != IGNORE
    state = _Batch(gates, decided)
    index = iter(range(lm.num_layers))
    with wrapped_layers(lm.model, lambda layer: _TrainingLayer(layer, next(index), state)):
        logits = lm.model(**inputs, use_cache=True).logits
    lm_loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    expected = 1 + state.expected / decided.sum().clamp_min(1)
    return lm_loss + lam * expected, float(lm_loss.detach()), float(expected.detach())


@dataclass(frozen=True)
class GateSpec:
    """One gate training: the train split's first `limit` rows of `dataset`, responses cut to
    `max_response_tokens`, `epochs` passes in batches of `batch_size` (AdamW at `lr`), seeded."""

    gate_input: str
    lam: float
    dataset: DatasetSpec
    epochs: float = 1.0
    lr: float = 1e-2
    batch_size: int = 8
    seed: int = 0
    max_response_tokens: int = 64
    hidden: int = 0
    save_steps: int = 4
    bf16: bool = False  # bfloat16 autocast (the model's weights and the gates stay float32)

    def __post_init__(self) -> None:
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"unknown gate input {self.gate_input!r}; choose from {', '.join(GATE_INPUTS)}")
        if not self.lam >= 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        for key in ("batch_size", "max_response_tokens", "save_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")

    @property
    def name(self) -> str:
        """Folder and row name: `<input>-lambda<value>`."""
        return f"{self.gate_input}-lambda{self.lam:g}"


def _save(obj: Any, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _settings(spec: GateSpec) -> dict[str, Any]:
    """What a checkpoint must share with the training that resumes it."""
    return dataclasses.asdict(spec)


def train_gates(lm: LoadedModel, spec: GateSpec, out: Path, rows: list[dict] | None = None,
                kvs: dict[int, PromptKV] | None = None) -> dict[str, Any]:
    """Train one gate set on the frozen float32 model `lm` into `out` (gates.pt, then gates.json); resumes from
    `out/checkpoint.pt`; returns gates.json's record. A finished folder is returned as it is.

    `rows` (response_rows of the train split) and `kvs` (row index -> prompt_kv, filled as rows are first used)
    may be passed to share them between trainings."""
    out = Path(out)
    if (out / GATES_JSON).is_file():
        record = json.loads((out / GATES_JSON).read_text())
        if record["spec"] != {k: v for k, v in _settings(spec).items() if k != "dataset"}:
            raise ValueError(f"{out} holds gates trained with other settings; remove it or train with its settings")
        return record
    lm.model.requires_grad_(False)
    lm.model.eval()  # dropout off: the model is frozen, the gates alone learn
    if rows is None:
        rows = response_rows(dataclasses.replace(spec.dataset, split="train", empty_references="keep"),
                             lm.tokenizer, spec.max_response_tokens)
    torch.manual_seed(spec.seed)
    gates = Gates(lm.num_layers, lm.model.config.hidden_size, spec.gate_input, spec.hidden).to(lm.device)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=spec.lr)
    steps_per_epoch = math.ceil(len(rows) / spec.batch_size)
    total = max(1, round(spec.epochs * steps_per_epoch))
    step, history, started = 0, [], time.monotonic()
    if (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, weights_only=False)
        if state.get("spec") != _settings(spec):
            raise ValueError(f"{out / CHECKPOINT} belongs to a training with other settings; remove {out} or "
                             "train with its settings")
        gates.load_state_dict(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        log(f"{spec.name}: resuming at step {step} of {total}")
    kvs = {} if kvs is None else kvs
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        order = list(range(len(rows)))
        random.Random(spec.seed + epoch).shuffle(order)
        picked = order[offset * spec.batch_size : (offset + 1) * spec.batch_size]
        for i in picked:
            if i not in kvs:
                kvs[i] = prompt_kv(lm, rows[i]["prompt_ids"])
        batch = response_batch(lm, [rows[i] for i in picked], [kvs[i] for i in picked])
        with torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=spec.bf16):
            loss, lm_loss, expected = gate_loss(lm, gates, batch, spec.lam)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        history.append({"step": step, "lm_loss": lm_loss, "expected_layers": expected})
        log(f"{spec.name}: step {step}/{total} lm loss {lm_loss:.3f}, expected layers {expected:.2f}")
        if step % spec.save_steps == 0 and step < total:
            _save({"spec": _settings(spec), "gates": gates.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                   "history": history, "rng": torch.get_rng_state()}, out / CHECKPOINT)
    _save(gates.state_dict(), out / GATES_WEIGHTS)
    record = {"name": spec.name, "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "dataset"},
              "dataset": dataclasses.asdict(spec.dataset), "num_layers": lm.num_layers,
              "dim": lm.model.config.hidden_size, "train_rows": len(rows), "steps": step, "history": history,
              "seconds": round(time.monotonic() - started, 1)}
    write_json(record, out / GATES_JSON)
    (out / CHECKPOINT).unlink(missing_ok=True)
    return record


def load_gates(folder: Path, device: str | torch.device = "cpu") -> Gates:
    """The trained gates of a finished training folder. Raises ValueError when it is unfinished."""
    folder = Path(folder)
    if not (folder / GATES_JSON).is_file():
        raise ValueError(f"{folder} holds no finished gate training ({GATES_JSON} missing); rerun `dynoracle gates`")
    record = json.loads((folder / GATES_JSON).read_text())
    spec = record["spec"]
    gates = Gates(record["num_layers"], record["dim"], spec["gate_input"], spec["hidden"])
    gates.load_state_dict(torch.load(folder / GATES_WEIGHTS, map_location=device, weights_only=True))
    return gates.to(device)
