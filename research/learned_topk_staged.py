"""Learned top-k in two stages on the tiny model (issue 20): the memory path first with the addressing loss off, then
only the key heads (everything else and the codebook frozen), then EM with top-k and with the histogram on banks of
1 / 8 / 64 / 1,000 new entities (colour questions).

    python research/learned_topk_staged.py 0 1500 600      # seed, memory steps, key steps

Results: docs/memory-experiments.md, "Why learned top-k does not learn on the tiny stream".
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_facts as bench  # noqa: E402  (benchmarks/synthetic_facts.py: its evaluate())
from learned_topk_probe import colour_topk_model  # noqa: E402

from mbc_hf.arguments import MBCTrainingArguments  # noqa: E402
from mbc_hf.trainer import MBCTrainer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("seed", type=int)
p.add_argument("memory_steps", type=int)
p.add_argument("key_steps", type=int)
a = p.parse_args()
train, test, model = colour_topk_model(a.seed)


def run(steps: int, warmup: int, tag: str) -> None:
    args = MBCTrainingArguments(output_dir=f"outputs/topk_staged/{tag}", per_device_train_batch_size=16,
                                learning_rate=3e-3, lora_learning_rate=3e-3, max_steps=steps, logging_steps=50,
                                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=a.seed,
                                lr_scheduler_type="constant", gold_only_steps=10 ** 6, vq_warmup_steps=warmup)
    trainer = MBCTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    print(tag, [(h["step"], h["qa_loss"], h.get("addressing_loss"), h["batch_perplexity"])
                for h in trainer.state.log_history if "qa_loss" in h][::4], flush=True)


# stage 1: the memory path, addressing loss off (the key heads frozen)
model.addressing.requires_grad_(False)
model.config.addressing_loss_weight = 0.0
run(a.memory_steps, 150, "memory")
# stage 2: only the key heads, on the addressing loss
model.requires_grad_(False)
model.addressing.requires_grad_(True)
model.codebook.freeze()
model.config.addressing_loss_weight = 1.0
run(a.key_steps, 0, "keys")
model.eval()
for aggregation in ("topk", "histogram"):
    model.config.aggregation = aggregation
    for n in (1, 8, 64, 1000):
        r = bench.evaluate(model, test, n, 64)
        print(aggregation, n, f"EM {r['em']:.2f}", f"answer NLL {r['answer_nll']:.3f}", flush=True)
