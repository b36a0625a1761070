"""Does a float warm-up make the paper's learned codebook carry a fact, on the tiny model? (issue 20)

One attribute of the synthetic fact stream (the favourite colour, 16 values) so that only the memory can tell the
answer; the tiny LM is pretrained to read in context first (`pretrain_tiny_lm` on "document, question, answer"
texts); every question reads its gold document alone (gold-only memory). Phase 1 trains ``--float-steps`` with the
VQ bypassed (``config.use_vq=False``: MAC-style float memory), then the codebook is k-means initialised on the
context vectors (`kmeans_init_codebook`) and phase 2 trains ``--vq-steps`` reading codes. After each phase it prints
the answer NLL (nats per answer token) on 200 colour questions about new entities with the gold document, and the
memory gains (empty − gold, another document − gold). ``--float-steps 0`` is the control: codes from the start.

    python research/vq_warmup_probe.py --seed 0 --float-steps 150 --vq-steps 150

Results: docs/memory-experiments.md, "The VQ warm-up". The package's form of the same schedule is
`MBCTrainingArguments.vq_warmup_steps` (one Trainer run; tests/test_learned_memory.py).
"""
import argparse
import json
import os
import time

from safetensors.torch import load_file, save_file

from mbc_hf.data import synthetic_facts
from mbc_hf.testing import in_context_texts, pretrain_tiny_lm, tiny_mbc_model
from mbc_hf.trainer import MBCDataCollator, MBCTrainer, MBCTrainingArguments, kmeans_init_codebook, memory_gain

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--seed", type=int, default=0)
p.add_argument("--pretrain", type=int, default=1000, help="in-context LM pretraining steps")
p.add_argument("--float-steps", type=int, default=150)
p.add_argument("--vq-steps", type=int, default=150)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--prefix-mode", default="generator")
p.add_argument("--cache-dir", default="outputs/vq_warmup_probe", help="pretrained tiny LMs, one per seed and steps")
a = p.parse_args()
start = time.time()
train = synthetic_facts(2000, "train", 0).filter(lambda row: "colour" in row["question"].lower())
test = synthetic_facts(300, "test", 0).filter(lambda row: "colour" in row["question"].lower())
corpus = list(dict.fromkeys(train["context"])) + list(train["question"]) + ["Question: Answer:"]
model = tiny_mbc_model(seed=a.seed, corpus=corpus, vocab_size=1000, codebook_type="learned", freeze_encoders=False,
                       max_document_length=256, max_question_length=64, prefix_mode=a.prefix_mode)
cache = os.path.join(a.cache_dir, f"lm_seed{a.seed}_steps{a.pretrain}.safetensors")
if os.path.exists(cache):
    model.lm.load_state_dict(load_file(cache))
else:
    loss = pretrain_tiny_lm(model, in_context_texts(model, train), steps=a.pretrain, seed=a.seed)
    print(f"LM pretrained in context: loss {loss:.2f}")
    os.makedirs(a.cache_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.lm.state_dict().items()}, cache)
held_out = MBCDataCollator(model)([test[i] for i in range(min(len(test), 200))])


def report(phase: str) -> dict:
    g = memory_gain(model, held_out)
    print(f"{phase}: NLL gold {g['nll_gold']:.3f}, empty - gold {g['memory_gain']:+.3f}, other - gold "
          f"{g['memory_gain_unrelated']:+.3f} ({time.time() - start:.0f} s)", flush=True)
    return g


def train_steps(steps: int) -> None:
    args = MBCTrainingArguments(output_dir=os.path.join(a.cache_dir, "run"), per_device_train_batch_size=16,
                                learning_rate=a.lr, max_steps=steps, logging_steps=50, save_strategy="no",
                                report_to="none", use_cpu=True, disable_tqdm=True, seed=a.seed,
                                lr_scheduler_type="constant", gold_only_steps=steps)
    MBCTrainer(model=model, args=args, train_dataset=train).train()


results = {}
if a.float_steps:
    model.config.use_vq = False
    train_steps(a.float_steps)
    results["float"] = report("float phase")
    model.config.use_vq = True
    kmeans_init_codebook(model, train, 1000, seed=a.seed)
    results["after_kmeans"] = report("k-means codebook, codes read")
if a.vq_steps:
    train_steps(a.vq_steps)
    results["vq"] = report("codes phase")
print(json.dumps({k: {kk: round(v, 3) for kk, v in g.items()} for k, g in results.items()}))
