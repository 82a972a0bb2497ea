"""Acceptance 3 without Ray: the choice task of `dynoracle run --dataset arc_easy --configs full --dtype float32`
called in-process on the first N ARC-Easy rows, against lm-evaluation-harness HFLM (float32) on the embedded
model's converted folder; prints both acc / acc_norm means, the differing questions and the largest log-likelihood
difference.   python benchmarks/lm_eval_inprocess.py 50
"""
import time, sys, numpy as np, torch

torch.set_num_threads(2)
N = int(sys.argv[1])
from pipeline.generation.models import load_model, cache_dir
from pipeline.data.adapters import DatasetSpec, load_examples
from pipeline.data.choice_tasks import lm_eval_task
from pipeline.data.sources import data_dir
from pipeline.generation.configs import full_config
from pipeline.generation.choice_task import ChoiceTask
t = time.time()
lm = load_model(dtype="float32", device="cpu")
ex = load_examples(DatasetSpec("arc_easy", limit=N), lm.tokenizer)
rows = ChoiceTask((full_config(lm.num_layers),), "skip", 8).run(lm, 0, ex).to_pandas()
t1 = time.time() - t
from lm_eval.models.huggingface import HFLM
task = lm_eval_task("arc_easy", data_dir(None))
task.build_all_requests(limit=N, rank=0, world_size=1)
res = HFLM(pretrained=str(cache_dir() / "smollm2-135m-instruct"), dtype="float32", device="cpu", batch_size=16).loglikelihood(task.instances)
per = {}
for inst, (ll, _) in zip(task.instances, res): per.setdefault(inst.doc_id, []).append(ll)
docs = task.test_docs()
theirs = [task.process_results(docs[i], [(l, False) for l in per[i]]) for i in range(N)]
diff = max(np.abs(np.array(r) - np.array(per[i])).max() for i, r in enumerate(rows["loglik"]))
for m in ("acc", "acc_norm"):
    a, b = rows[m].to_numpy(), np.array([x[m] for x in theirs])
    print(f"{m}: dynoracle {a.mean():.4f} lm-eval {b.mean():.4f} differing questions {int((a != b).sum())}")
print(f"N={N} max |loglik diff| {diff:.2e}; dynoracle {t1:.0f} s, total {time.time()-t:.0f} s")
