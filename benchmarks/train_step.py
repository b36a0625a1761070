"""Where the time of one meta-training step goes (ms per step, CPU), so that waste can be found and removed.

Runs ``--steps`` training steps on one batch of ``--batch-size`` questions about as many different documents (the
first question of each of the file's first documents, as `MBCTrainer` batches look: the batch's documents are the
memory), and prints the median over the steps after the first (warm-up) of:

* collate: tokenizing the batch (`MBCDataCollator`: questions, answers, documents, teacher input);
* forward, split by module with forward hooks: document encoder backbone (frozen unless trained), the rest of the
  amortization network, codebook, question encoder, aggregator, prefix generator, the LM reading the prefix
  (calls with grad: the QA pass and the reconstruction and contrastive passes when weighted), the LM reading the
  document in context (distillation teacher, no grad), and the rest
  (losses, masks, reshapes);
* backward, and the AdamW step over the trainable parameters.

    python benchmarks/train_step.py --model embedded-untrained \
        --data ../shared/data/squad/train-part.first44articles.paragraphs.jsonl --distillation-weight 1 \
        --output benchmarks/results/train_step.json

``--model`` is a saved MBC checkpoint, ``embedded-untrained`` (SmolLM2-135M-Instruct + all-MiniLM-L6-v2, frozen
backbones, untrained MBC modules: the same shapes and costs as training the embedded default) or ``tiny``.
"""
import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict

import torch

from mbc_hf.cli import build, load_model
from mbc_hf.data import load_qa_file
from mbc_hf.demo import markdown_table, write_json_report
from mbc_hf.trainer import MBCDataCollator, first_row_per_document


STUDENT = "LM reading the prefix (calls with grad: QA, reconstruction)"
TEACHER = "LM decoder reading the document (teacher, no grad)"


def load(model: str, **config):
    """``tiny`` / ``embedded-untrained`` (frozen backbones, as `mbc-hf train` builds them) or a checkpoint, with
    ``config`` overriding the loss weights."""
    if model in ("tiny", "embedded-untrained"):
        tiny = model == "tiny"
        return build("tiny" if tiny else "embedded", "tiny-bert" if tiny else "embedded", freeze_encoders=True,
                     **config)
    m = load_model(model)
    for key, value in config.items():
        setattr(m.config, key, value)
    return m


class ModuleTimer:
    """Forward wall time (ms) per labelled module, summed over its calls in a step. ``when(grad_enabled)`` picks the
    calls that count (the LM's decoder runs with grad for the student and without for the distillation teacher)."""

    def __init__(self):
        self.ms = defaultdict(float)
        self._start = {}

    def add(self, label: str, module: torch.nn.Module, grad: bool | None = None):
        def pre(mod, args):
            if grad is None or torch.is_grad_enabled() == grad:
                self._start[label] = time.perf_counter()

        def post(mod, args, out):
            if label in self._start:
                self.ms[label] += (time.perf_counter() - self._start.pop(label)) * 1000

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="QA file (any layout `mbc-hf train` reads)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="steps to time; the first is a warm-up and not counted")
    p.add_argument("--distillation-weight", type=float, help="override the model's distillation_loss_weight")
    p.add_argument("--reconstruction-weight", type=float, help="override the model's reconstruction_loss_weight")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--encoder-state-cache", action="store_true", help="time the steps with the frozen document "
                   "encoder's state cache on (as `mbc-hf train` runs): the warm-up step fills it, so the timed steps "
                   "show a step whose documents have all been seen before")
    p.add_argument("--output")
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be at least 2 (the first step is a warm-up)")
    if a.threads:
        torch.set_num_threads(a.threads)
    config = {k: v for k, v in (("distillation_loss_weight", a.distillation_weight),
                                ("reconstruction_loss_weight", a.reconstruction_weight)) if v is not None}
    model = load(a.model, **config).train()
    rows = first_row_per_document(load_qa_file(a.data), a.batch_size)
    collate = MBCDataCollator(model)

    timer = ModuleTimer()
    backbone = model.amortization.backbone
    timer.add("document encoder backbone", backbone)
    timer.add("amortization network (incl. backbone)", model.amortization)
    if model.config.use_vq:
        timer.add("codebook (VQ)", model.codebook)
    timer.add("question encoder", model.question_encoder)
    timer.add("aggregator", model.aggregator)
    timer.add("prefix generator", model.prefix_generator)
    timer.add(STUDENT, model.lm, grad=True)
    timer.add(TEACHER, model.lm.get_decoder(), grad=False)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)

    steps = []
    with (model.amortization.cache_encoder_states(2**31) if a.encoder_state_cache else contextlib.nullcontext()):
        for _ in range(a.steps):
            timer.ms.clear()
            t0 = time.perf_counter()
            batch = collate(rows)
            t1 = time.perf_counter()
            loss = model(**batch).loss
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            ms = {"collate": (t1 - t0) * 1000, **timer.ms, "forward, total": (t2 - t1) * 1000,
                  "backward": (t3 - t2) * 1000, "optimizer step": (t4 - t3) * 1000, "step, total": (t4 - t0) * 1000}
            steps.append(ms)
    counted = steps[1:]
    median = {k: statistics.median(s.get(k, 0.0) for s in counted) for k in steps[0]}
    rest = median["forward, total"] - sum(median.get(k, 0.0) for k in (
        "amortization network (incl. backbone)", "codebook (VQ)", "question encoder", "aggregator", "prefix generator",
        STUDENT, TEACHER))
    median["forward, rest (losses, masks)"] = rest
    order = ["collate", "document encoder backbone", "amortization network (incl. backbone)", "codebook (VQ)",
             "question encoder", "aggregator", "prefix generator", STUDENT,
             TEACHER, "forward, rest (losses, masks)", "forward, total",
             "backward", "optimizer step", "step, total"]
    table = markdown_table([{"phase": k, "ms": median[k], "% of step": 100 * median[k] / median["step, total"]}
                            for k in order if k in median], ["phase", "ms", "% of step"])
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"{a.model}: {len(rows)} questions on {len(rows)} documents, {torch.get_num_threads()} threads, "
          f"{trainable / 1e6:.2f}M trainable parameters; median of {len(counted)} steps (ms)\n\n{table}")
    if a.output:
        write_json_report(a.output, {"model": a.model, "data": a.data, "batch_size": len(rows),
                                     "threads": torch.get_num_threads(), "trainable_params": trainable,
                                     "config": config, "encoder_state_cache": a.encoder_state_cache,
                                     "median_ms": median, "steps_ms": counted,
                                     "command": " ".join(sys.argv)})
    return median


if __name__ == "__main__":
    main()
