"""Can a trained decoder read codes of the LM's own key/values? The base LM stays frozen; the memory of a document
is its key/values at BOS + the T highest-IDF positions through `readable_memory.KVCodebooks` (``--kv-groups`` ×
``--kv-stages`` 512-code k-means codebooks per layer), and only the code vectors are trained (started at the
centroids; AdamW, batches of 8 questions) with the answer NLL of SQuAD train questions reading their gold
document's codes. Prints answer NLL (nats/token) on dev documents spread over the file, with the gold memory, and
the gain against an unrelated memory (the next document) and against none (± standard error over documents, and
the share of documents where gold beats unrelated), before and after training and every ``--eval-every``
questions; ``--hinge-weight`` adds a gold-vs-unrelated hinge. A probe, not part of the package: it departs from
MBC's bank of T single codes.

    python research/kv_code_reader.py --train ../shared/data/squad/train-part.first44articles.paragraphs.jsonl \
        --data ../shared/data/squad/dev.minus-holdout.paragraphs.jsonl --kv-groups 6 --kv-stages 2 --minutes 18
"""
import argparse
import random
import time

import torch
from readable_memory import KVCodebooks, ReadableMemories, answer_nll, kv_answer_loss, load_frozen_lm
from safetensors.torch import load_file, save_file

from mbc_hf.atomic import atomic_write
from mbc_hf.cli import split_train_eval
from mbc_hf.configuration_mbc import MBCConfig
from mbc_hf.data import documents, load_qa_file
from mbc_hf.demo import write_json_report
from mbc_hf.trainer import article_pair_batches, first_row_per_document, paired_partners


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="QA file: IDF, codebook fit and training questions")
    p.add_argument("--data", required=True, help="QA file of the dev documents (one question each)")
    p.add_argument("--kv-groups", type=int, default=6)
    p.add_argument("--kv-stages", type=int, default=2)
    p.add_argument("--kv-kmeans-docs", type=int, default=256, help="training documents for the codebook fit")
    p.add_argument("--train-docs", type=int, default=1500, help="training documents whose questions are used")
    p.add_argument("--minutes", type=float, default=18, help="training time budget")
    p.add_argument("--docs", type=int, default=256, help="dev documents, spread over the file")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N training questions (0: off)")
    p.add_argument("--hinge-weight", type=float, default=0.0,
                   help="add w * max(0, margin - (NLL unrelated - NLL gold)), the unrelated memory being another "
                        "training document (doubles the cost of a question)")
    p.add_argument("--margin", type=float, default=1.0, help="hinge margin, nats per answer token")
    p.add_argument("--article-pairs", action="store_true", help="dev documents in same-article pairs "
                   "(`mbc_hf.trainer.article_pair_batches`): also score against a paragraph of another article and "
                   "the other paragraph of the same article")
    p.add_argument("--output", help="write the evaluations (JSON)")
    p.add_argument("--save", help="write the trained code vectors (safetensors) after each evaluation")
    p.add_argument("--load", help="start from code vectors written by --save (same --train and --kv-*; the "
                                         "training questions start again from the first)")
    a = p.parse_args(argv)
    G, S, FIT, NTRAIN, MINUTES, NDEV, LR = (a.kv_groups, a.kv_stages, a.kv_kmeans_docs, a.train_docs, a.minutes,
                                            a.docs, a.lr)
    torch.manual_seed(0); random.seed(0)
    tok, lm, E = load_frozen_lm("embedded")
    train_rows = load_qa_file(a.train)
    train_docs = [t for _, t in documents(train_rows)]
    mem = ReadableMemories(tok, E, train_docs, 12, 384, 64, 512)
    t0 = time.time()
    cb = KVCodebooks(lm, tok, mem, train_docs[:FIT], 512, G, S)
    print(f"fit {time.time() - t0:.0f}s", flush=True)
    # trainable code vectors, initialised at the k-means centroids: [layer][group][stage] -> (512, c)
    params = torch.nn.ParameterList()
    index = {}
    for l, layer in enumerate(cb.vqs):
        for g, stack in enumerate(layer):
            for s, vq in enumerate(stack):
                index[l, g, s] = len(params)
                params.append(torch.nn.Parameter(vq.decode(torch.arange(512)).detach().clone()))

    @torch.no_grad()
    def encode(doc):
        """codes (layers, G, S, T), BOS rows per layer, positions, offset, shape"""
        vectors, positions, offset, shape = cb.slot_vectors(lm, tok, mem, doc)
        codes = torch.zeros(len(vectors), G, S, vectors[0].shape[0] - 1, dtype=torch.long)
        for l, (layer, x) in enumerate(zip(cb.vqs, vectors)):
            for g, (stack, part) in enumerate(zip(layer, x[1:].chunk(G, -1))):
                codes[l, g] = torch.stack(cb.stage_codes(stack, part))
        return codes, [x[:1] for x in vectors], positions, offset, shape

    def memory(enc):
        codes, bos, positions, offset, shape = enc
        kv = []
        for l in range(codes.shape[0]):
            coded = torch.cat([sum(params[index[l, g, s]][codes[l, g, s]] for s in range(S)) for g in range(G)], -1)
            kv.append(cb.slot_kv(lm, torch.cat([bos[l], coded]), positions, shape))
        return kv, offset

    if a.load:
        saved = load_file(a.load)
        for i, w in enumerate(params):
            w.data.copy_(saved[str(i)])
    template = MBCConfig().prompt_template

    def nll(memory_, q, answer):
        return kv_answer_loss(lm, tok, memory_, template.format(question=q), answer)

    dev = first_row_per_document(split_train_eval(load_qa_file(a.data), NDEV)[1])
    if a.article_pairs:  # flattened batches of 8: the partner of slot i % 8 of a batch is in the same batch
        dev = [r for b in article_pair_batches(dev, 8) for r in b]
        partners = {k: [i - i % 8 + int(v[i % 8]) for i in range(len(dev))] for k, v in paired_partners(8).items()}
    else:
        partners = {"unrelated": [(i + 1) % len(dev) for i in range(len(dev))]}
    dev_enc = [encode(r["context"]) for r in dev]
    dev_empty = [answer_nll(lm, tok, E, None, template.format(question=r["question"]), r["answers"][0])
                 for r in dev]

    curve = []

    @torch.no_grad()
    def evaluate(tag, questions=0):
        diffs = {"gold": [], "empty_minus_gold": [], **{f"{k}_minus_gold": [] for k in partners}}
        for i, r in enumerate(dev):
            g = nll(memory(dev_enc[i]), r["question"], r["answers"][0]).item()
            diffs["gold"].append(g); diffs["empty_minus_gold"].append(dev_empty[i] - g)
            for k, j in partners.items():
                diffs[f"{k}_minus_gold"].append(nll(memory(dev_enc[j[i]]), r["question"], r["answers"][0]).item() - g)
        stats = {k: (torch.tensor(v).mean().item(), (torch.tensor(v).std() / len(v) ** .5).item())
                 for k, v in diffs.items()}
        for k in partners:  # share of documents where the gold memory is the better one
            stats[f"{k}_above_gold"] = sum(x > 0 for x in diffs[f"{k}_minus_gold"]) / len(dev)
        curve.append({"tag": tag, "questions": questions, "minutes": (time.time() - t0) / 60, **stats})
        t = lambda k: f"{stats[k][0]:+.3f} ± {stats[k][1]:.3f}"
        print(f"[{tag}] dev {len(dev)}: gold {t('gold')}  empty−gold {t('empty_minus_gold')}  " + "  ".join(
            f"{k}−gold {t(f'{k}_minus_gold')} (gold better on {stats[f'{k}_above_gold']:.0%})" for k in partners),
            flush=True)
        if a.output:
            write_json_report(a.output, {"args": vars(a), "evaluations": curve})
        if a.save:
            weights = {str(i): w.detach().contiguous() for i, w in enumerate(params)}
            atomic_write(a.save, lambda tmp: save_file(weights, tmp))

    t0 = time.time()
    evaluate(f"loaded {a.load}" if a.load else "k-means init")
    # training rows: questions of train docs FIT.. (docs not in the codebook fit first), up to NTRAIN docs
    by_doc = {}
    for r in train_rows:
        by_doc.setdefault(r["context"], []).append(r)
    docs = list(by_doc)[:NTRAIN]
    t0 = time.time(); enc_cache = {}
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    step, losses = 0, []
    order = [(d, r) for d in docs for r in by_doc[d]]
    random.shuffle(order)
    for d, r in order:
        if time.time() - t0 > MINUTES * 60:
            break
        if d not in enc_cache:
            enc_cache[d] = encode(d)
        loss = gold = nll(memory(enc_cache[d]), r["question"], r["answers"][0])
        if a.hinge_weight and len(enc_cache) > 1:
            other = random.choice([e for e in enc_cache if e != d])
            unrelated = nll(memory(enc_cache[other]), r["question"], r["answers"][0])
            loss = loss + a.hinge_weight * torch.relu(a.margin - (unrelated - gold))
        (loss / 8).backward(); losses.append(gold.item()); step += 1
        if step % 8 == 0:
            opt.step(); opt.zero_grad()
        if step % 200 == 0:
            print(f"q {step} gold NLL {sum(losses[-200:]) / 200:.3f} {time.time() - t0:.0f}s", flush=True)
        if a.eval_every and step % a.eval_every == 0:
            evaluate(f"{step} questions", step)
    print(f"trained on {step} questions", flush=True)
    if step:  # --minutes 0: evaluate only
        evaluate("trained", step)


if __name__ == "__main__":
    main()
