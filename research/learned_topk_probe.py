"""Why does learned top-k addressing break the learned memory on the tiny model? (issue 20)

The colour questions of the synthetic fact stream, gold-only memory (so top-k reads the gold document whatever the
keys say), the VQ warm-up (``--vq-warmup-steps`` float steps, then a k-means codebook). One tiny top-k model is built
and pretrained to read in context, then each variant trains a copy of it for ``--steps`` steps and logs, every
step, the QA loss, the addressing loss, the gradient norm before clipping and the codebook perplexity:

- ``all``: the same model without its key heads (set aggregation over the gold document);
- ``w0``: addressing loss weight 0;
- ``frozenkeys``: the key heads frozen (weight 1);
- ``topk``: the package's model (keys trained end to end, weight 1);
- ``detached``: keys trained on detached features, so the addressing loss reaches only the key heads.

    python research/learned_topk_probe.py all w0 frozenkeys detached --output topk_probe.json

Results: docs/memory-experiments.md, "Why learned top-k does not learn on the tiny stream".
"""
import argparse
import copy
import json

import torch

from mbc_hf.addressing import LearnedAddressing
from mbc_hf.data import synthetic_facts
from mbc_hf.factory import build
from mbc_hf.testing import in_context_texts, pretrain_tiny_lm
from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments

VARIANTS = ("all", "w0", "frozenkeys", "topk", "detached")


class DetachedAddressing(LearnedAddressing):
    """Keys on detached features: the addressing loss trains the key heads and nothing else."""

    def document_keys(self, vectors):
        return super().document_keys(vectors.detach())

    def scores(self, latents, keys):
        return super().scores(latents.detach(), keys)


def colour_topk_model(seed: int, **overrides):
    """(train rows, test rows, a tiny learned-codebook top-k model (k = 1, `MBCConfig` ``overrides``) pretrained to
    read in context) on the colour questions of the synthetic fact stream."""
    train, test = (synthetic_facts(n, split, seed).filter(lambda row: row["attribute"] == "colour")
                   for n, split in ((4000, "train"), (1000, "test")))
    corpus = list(dict.fromkeys(train["context"])) + list(train["question"]) + ["Question: Answer:"]
    torch.manual_seed(seed)
    model = build("tiny", "tiny-bert", freeze_encoders=False, max_document_length=256, max_question_length=64,
                  corpus=corpus, vocab_size=1000, codebook_type="learned", aggregation="topk", topk_documents=1,
                  **overrides)
    loss = pretrain_tiny_lm(model, in_context_texts(model, train), 1000, seed=seed)
    print(f"pretrained in context: loss {loss:.2f}", flush=True)
    return train, test, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", choices=VARIANTS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vq-warmup-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output")
    a = p.parse_args()
    train, _, base = colour_topk_model(a.seed)
    results = {}
    for variant in a.variants:
        model = copy.deepcopy(base)
        if variant == "all":
            model.addressing = None
        elif variant == "w0":
            model.config.addressing_loss_weight = 0.0
        elif variant == "frozenkeys":
            model.addressing.requires_grad_(False)
        elif variant == "detached":
            model.addressing.__class__ = DetachedAddressing
        args = MBCTrainingArguments(output_dir=f"outputs/topk_probe/{variant}", per_device_train_batch_size=16,
                                    learning_rate=3e-3, lora_learning_rate=3e-3, max_steps=a.steps, logging_steps=1,
                                    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=a.seed,
                                    lr_scheduler_type="constant", gold_only_steps=10 ** 6,
                                    vq_warmup_steps=a.vq_warmup_steps)
        trainer = MBCTrainer(model=model, args=args, train_dataset=train)
        trainer.train()
        log = [{k: h.get(k) for k in ("step", "qa_loss", "addressing_loss", "grad_norm", "batch_perplexity")}
               for h in trainer.state.log_history if "qa_loss" in h]
        results[variant] = log
        means = {end: sum(h["qa_loss"] for h in log if end - 50 < h["step"] <= end) / 50
                 for end in range(50, a.steps + 1, 50)}
        print(variant, "mean QA loss over the 50 steps ending at", {k: round(v, 3) for k, v in means.items()},
              flush=True)
    if a.output:
        with open(a.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
