"""Where does the document signal fade on the memory path? For each question, the gold document alone in memory vs
an unrelated document (the next one of the batch, as in `memory_gain`), the relative difference
``||x_gold - x_unrelated|| / ||x_gold||`` at every stage of the path, plus how much attention the LM gives the
prefix. Prints a markdown table (mean ± standard error over batches), writes JSON.

    python research/memory_signal.py --model runs/kmf --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl \
        --docs 64 --output benchmarks/results/kmf/memory_signal.json

Stages: context vectors (amortization network output, (T, d) per document), memory vectors (after the codebook),
modulation (aggregator output, (T, d) per question), prefix keys and values (all layers), and the answer
log-probabilities (next-token distributions at the answer positions). The "gold vs empty" rows are the same
differences with an empty memory, i.e. how much having *a* memory changes each stage. ``prefix attention`` is the
share of attention (mean over layers, heads and answer positions) on the P prefix positions.
"""
import argparse
import sys

import mbc_hf  # noqa: F401
import torch
from transformers import AutoModelForCausalLM

from mbc_hf.cli import split_train_eval
from mbc_hf.data import load_qa_file
from mbc_hf.modeling_mbc import slot_documents
from mbc_hf.demo import batch_mean_table, write_json_report
from mbc_hf.trainer import MBCDataCollator, first_row_per_document


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


@torch.no_grad()
def signal(model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    ids, mask = batch["context_input_ids"], batch["context_attention_mask"]
    gold_idx = batch["question_doc_index"]
    n = ids.shape[0]
    other_idx = (gold_idx + 1) % n
    z = model.amortization(ids, mask)  # (N, T, d)
    memory, _, _ = model.memory_from_documents(ids, mask)  # (1, N·T, d), no mask
    vectors = memory.vectors.reshape(n, -1, memory.vectors.shape[-1])  # (N, T, d)
    latents = model.question_encoder(batch["question_input_ids"], batch["question_attention_mask"])  # (B, T, d)
    owner = slot_documents(n, model.config.num_context_tokens)

    def read(index):  # -> modulation (B, T, d), prefix L × (k, v), answer log-probs, prefix attention share
        mem = model.memory_from_bank(None) if index is None else \
            mbc_hf.Memory(memory.vectors, mask=owner[None, :] == index[:, None])
        modulation = model.aggregator(latents, mem)
        prefix = model.prefix_from_latents(modulation)
        cache, full_mask = model._prefix_cache(prefix, batch["attention_mask"], batch["input_ids"].shape[0])
        out = model.lm(input_ids=batch["input_ids"], attention_mask=full_mask, past_key_values=cache,
                       output_attentions=True)
        answer = batch["labels"][:, 1:] != -100  # positions whose next token is an answer token
        logp = out.logits[:, :-1].log_softmax(-1)[answer]  # (n_answer_tokens, V)
        P = prefix[0][0].shape[2]
        share = torch.stack([a[..., :-1, :P].sum(-1).permute(0, 2, 1)[answer].mean() for a in out.attentions])
        keys = torch.cat([k.flatten() for k, _ in prefix])
        values = torch.cat([v.flatten() for _, v in prefix])
        return modulation, keys, values, logp, float(share.mean())

    gold, unrelated, empty = read(gold_idx), read(other_idx), read(None)
    out = {"context vectors": rel(z[gold_idx], z[other_idx]),
           "memory vectors": rel(vectors[gold_idx], vectors[other_idx])}
    for name, i in (("modulation", 0), ("prefix keys", 1), ("prefix values", 2), ("answer log-probs", 3)):
        out[name] = rel(gold[i], unrelated[i])
        out[f"{name} (gold vs empty)"] = rel(gold[i], empty[i])
    out["prefix attention share"] = gold[4]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="QA file; one question per document is used")
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--spread", action="store_true", help="documents evenly spaced over the file (see memory_gain.py)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output")
    a = p.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    model.lm.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
    if a.spread:
        source = split_train_eval(load_qa_file(a.data), a.docs)[1]
    else:
        source = load_qa_file(a.data, downsample_to=a.docs)
    rows = first_row_per_document(source)
    collate = MBCDataCollator(model)
    parts = [signal(model, collate(rows[i:i + a.batch_size])) for i in range(0, len(rows), a.batch_size)]
    mean, stderr, table = batch_mean_table(parts, "stage", "value")
    print(f"{len(rows)} documents, one question each, from {a.data}; relative difference ||gold - other|| / "
          f"||gold|| with other = the unrelated document (rows marked 'gold vs empty': the empty memory); last row: "
          f"a share of attention, not a difference\n\n"
          f"{table}")
    if a.output:
        write_json_report(a.output, {"model": a.model, "data": a.data, "n_docs": len(rows), "spread": a.spread,
                                     **mean, "standard_error": stderr, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
