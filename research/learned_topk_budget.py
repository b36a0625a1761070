"""Learned top-k with a gradient budget for the addressing loss (issue 20, stop 32).

Stop 31 found that the addressing loss's gradient swamps the QA loss's on the parameters they share (amortization
network, codebook, question encoder), and that under one clipped norm the memory path then stops learning. Here the
addressing gradient gets a budget. Colour questions of the synthetic stream, the tiny top-k model pretrained to read
in context (`learned_topk_probe.colour_topk_model`), gold-only memory, VQ warm-up; then the addressing top-1 accuracy
on a bank of 1,000 new entities, and EM with top-k and with the histogram on banks of 1 / 8 / 64 / 1,000.

- ``--ratio r``: the package's budget (`MBCTrainingArguments.addressing_grad_ratio`): the addressing gradient that
  reaches the shared parameters is scaled to at most r times the other losses' there; the key heads keep weight w;
- ``--ratio r --uniform``: the whole addressing loss weighted by ``min(w, r·|g_rest| / |g_addr|)``, key heads
  included (norms over every trainable parameter);
- ``--feature-scale c``: a fixed share c of the addressing gradient reaches the shared parameters, no budget;
- ``--context-tokens T --codebook-size K``: the codes' capacity; ``--key-slots A``: the key reads only the first A
  of a document's T code vectors.

    python research/learned_topk_budget.py --seed 0 --steps 1500 --ratio 0.5

Results: docs/memory-experiments.md, "A gradient budget for the addressing loss".
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_facts as bench  # noqa: E402  (benchmarks/synthetic_facts.py: its evaluate())
from learned_topk_probe import colour_topk_model  # noqa: E402

from mbc_hf.arguments import MBCTrainingArguments  # noqa: E402
from mbc_hf.trainer import MBCTrainer, _grad_norm  # noqa: E402


class UniformBudgetTrainer(MBCTrainer):
    """``--uniform``: the whole addressing loss reweighted at every step (no package budget)."""
    ratio = 0.5

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if model.training and outputs.addressing_loss is not None:
            w, addr = model.config.addressing_loss_weight, outputs.addressing_loss
            params = [p for p in model.parameters() if p.requires_grad]
            rest = loss - w * addr
            s = min(w, self.ratio * _grad_norm(rest, params) / max(_grad_norm(addr, params), 1e-12))
            self._log_part("addressing_grad_scale", s / w)
            loss = rest + s * addr
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def address_accuracy(model, test, n: int = 1000, questions: int = 64) -> float:
    """Top-1 addressing accuracy of the first documents' questions on a bank of the first n test documents."""
    docs = list(dict.fromkeys(zip(test["doc_id"], test["context"])))[:n]
    memory = model.memory_from_bank(model.memorize([t for _, t in docs], doc_ids=[d for d, _ in docs]), "topk")
    rows = [r for r in test if r["doc_id"] in {d for d, _ in docs[:questions]}]
    batch = model.encode_questions([r["question"] for r in rows])
    latents = model.question_encoder(batch["question_input_ids"], batch["question_attention_mask"])  # (B, T, d)
    picked = model.addressing.scores(latents, memory.keys).argmax(1)  # (B,)
    gold = torch.tensor([[d for d, _ in docs].index(r["doc_id"]) for r in rows])
    return float((picked == gold).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--vq-warmup-steps", type=int, default=150)
    p.add_argument("--ratio", type=float, help="the budget r (none: one loss, one clipped norm)")
    p.add_argument("--uniform", action="store_true", help="scale the whole addressing loss, key heads included")
    p.add_argument("--feature-scale", type=float, help="fixed share of the addressing gradient for the shared part")
    p.add_argument("--context-tokens", type=int, default=4, help="T, codes per document")
    p.add_argument("--codebook-size", type=int, default=128, help="K")
    p.add_argument("--key-slots", type=int, default=0, help="the document key reads only the first A code vectors "
                   "(MBCConfig.addressing_codes)")
    a = p.parse_args()
    train, test, model = colour_topk_model(a.seed, num_context_tokens=a.context_tokens, codebook_size=a.codebook_size,
                                           addressing_codes=a.key_slots)
    if a.feature_scale is not None:
        model.addressing.feature_grad_scale = a.feature_scale
    args = MBCTrainingArguments(output_dir="outputs/topk_budget", per_device_train_batch_size=16,
                                learning_rate=3e-3, lora_learning_rate=3e-3, max_steps=a.steps, logging_steps=50,
                                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=a.seed,
                                lr_scheduler_type="constant", gold_only_steps=10 ** 6,
                                vq_warmup_steps=a.vq_warmup_steps,
                                addressing_grad_ratio=-1 if a.uniform or a.feature_scale is not None or a.ratio is None
                                else a.ratio)
    UniformBudgetTrainer.ratio = a.ratio
    trainer = (UniformBudgetTrainer if a.uniform else MBCTrainer)(model=model, args=args, train_dataset=train)
    trainer.train()
    for h in trainer.state.log_history:
        if "qa_loss" in h:
            print({k: h[k] for k in ("step", "qa_loss", "addressing_loss", "batch_perplexity", "grad_norm",
                                     "addressing_grad_scale") if k in h}, flush=True)
    model.eval()
    print(f"addressing top-1 on 1,000 documents: {address_accuracy(model, test):.3f}", flush=True)
    for aggregation in ("topk", "histogram"):
        model.config.aggregation = aggregation
        for n in (1, 8, 64, 1000):
            r = bench.evaluate(model, test, n, 64)
            print(aggregation, n, f"EM {r['em']:.2f}", f"answer NLL {r['answer_nll']:.3f}", flush=True)


if __name__ == "__main__":
    main()
