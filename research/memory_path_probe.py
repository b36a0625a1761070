"""Can the memory path carry a document at all? A reconstruction probe on the embedded default.

The frozen LM must predict a document's first 32 tokens from that document's memory alone (the auxiliary
reconstruction loss, `MBCModelForCausalLM.reconstruction_loss`); nothing else is trained. Every 25 (overfit: 10)
steps it prints the NLL with the document's own memory, with another document's memory (the batch rolled by one),
and the gain = unrelated - own (nats/token). Document side fixed (`freeze_amortization`), KV-LoRA off, AdamW.

    # memorisation: 16 training documents in 2 fixed batches, the gain measured on those same documents
    python research/memory_path_probe.py --task overfit --memory vq --steps 60
    # generalisation: batches of 8 new training documents, the gain measured on 32 held-out documents
    python research/memory_path_probe.py --task generalise --memory vq --steps 200
    python research/memory_path_probe.py --task generalise --memory dense --steps 100
    python research/memory_path_probe.py --task generalise --memory vq --prefix-mode soft_tokens --steps 100

``--memory vq``: k-means codebook on the first 512 (overfit: 256) training documents, then frozen; ``dense``: the
VQ bypassed (MAC-style float memory).
"""
import argparse
import time

import torch

from mbc_hf.cli import SQUAD_TRAIN, build, shared_data_dir, split_train_eval
from mbc_hf.data import load_qa_file
from mbc_hf.trainer import first_row_per_document, kmeans_init_codebook


def unique_contexts(rows, n: int | None = None) -> list[str]:
    return [row["context"] for row in first_row_per_document(rows, n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["overfit", "generalise"], required=True)
    p.add_argument("--memory", choices=["vq", "dense"], default="vq")
    p.add_argument("--prefix-mode", choices=["generator", "soft_tokens"], default="generator")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--train-file", help="default: the shared SQuAD train part")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    soft = a.prefix_mode == "soft_tokens"
    model = build("embedded", "embedded", freeze_encoders=True, freeze_amortization=True, codebook_dim=32,
                  reconstruction_loss_weight=1.0, reconstruction_length=32, use_vq=a.memory == "vq",
                  kv_lora_layers=0, prefix_mode=a.prefix_mode, prefix_length=12 if soft else 2)
    rows = load_qa_file(a.train_file or str(shared_data_dir() / SQUAD_TRAIN))
    if a.task == "overfit":
        if a.memory == "vq":
            kmeans_init_codebook(model, rows, 256, seed=0)
            model.codebook.freeze()
        docs = unique_contexts(rows.select(range(0, len(rows), 23)), 16)
        batches, evaluated, every = [docs[:8], docs[8:]], [docs[:8], docs[8:]], 10
        next_batch = lambda s: batches[s % 2]  # noqa: E731
    else:
        train, held = split_train_eval(rows, 32)
        if a.memory == "vq":
            kmeans_init_codebook(model, train, 512, seed=0)
            model.codebook.freeze()
        docs, held_docs = unique_contexts(train), unique_contexts(held)
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist()
        evaluated, every = [held_docs[i:i + 8] for i in range(0, 32, 8)], 25
        next_batch = lambda s: [docs[order[(s * 8 + k) % len(docs)]] for k in range(8)]  # noqa: E731
    evaluated = [(model.encode_documents(b), model.encode_reconstruction_targets(b)) for b in evaluated]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.learning_rate)

    def nll(enc, rec, shift: int) -> float:
        memory = model.memory_from_documents(enc["input_ids"].roll(shift, 0), enc["attention_mask"].roll(shift, 0))[0]
        return float(model.reconstruction_loss(memory, rec["reconstruction_input_ids"],
                                               rec["reconstruction_attention_mask"]))

    print(f"task={a.task} memory={a.memory} prefix={a.prefix_mode}; trainable parameters "
          f"{sum(p.numel() for p in params):,}\n\n| step | NLL own memory | NLL other memory | gain | seconds |\n"
          "|---|---|---|---|---|")
    start = time.time()
    for step in range(a.steps + 1):
        if step % every == 0:
            model.eval()
            with torch.no_grad():
                own = sum(nll(e, r, 0) for e, r in evaluated) / len(evaluated)
                other = sum(nll(e, r, 1) for e, r in evaluated) / len(evaluated)
            model.train()
            print(f"| {step} | {own:.3f} | {other:.3f} | {other - own:+.3f} | {time.time() - start:.0f} |", flush=True)
        if step == a.steps:
            break
        batch = next_batch(step)
        enc, rec = model.encode_documents(batch), model.encode_reconstruction_targets(batch)
        memory = model.memory_from_documents(enc["input_ids"], enc["attention_mask"])[0]
        loss = model.reconstruction_loss(memory, rec["reconstruction_input_ids"], rec["reconstruction_attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


if __name__ == "__main__":
    main()
