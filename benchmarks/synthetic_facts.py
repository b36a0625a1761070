"""Can each memory carry a fact, and does it still when the bank grows? Train every memory on the synthetic fact
stream (`mbc_hf.data.synthetic_facts`: fictional entities, so the base LM cannot know the answers), then answer
questions about new entities from banks of 1, 8, 64 and 1,000 documents, all rows on the same questions.

    memory "learned", addressing "all"    the paper's codebook, set aggregation over the whole bank (histogram)
    memory "learned", addressing "topk"   the paper's codebook with learned top-k addressing (aggregation="topk")
    memory "no_vq",   addressing "all"    VQ bypassed: MAC-style float memory (dense bank)
    memory "vocabulary", addressing "topk" the vocabulary codebook (codes are LM tokens, lexical addressing)
    memory "empty" / "closed_book"        the learned model with an empty memory / the base LM, question only

A bank of n documents holds the gold document and n - 1 other test entities (the test documents in groups of n);
``answer_nll`` is the mean answer NLL (nats per token) with that bank. ``chance_em`` guesses each attribute
uniformly from its closed set.

``--model tiny`` trains its tokenizers on the training texts (vocabulary 1,000: most attribute values become one
token), makes its random LM a small base LM that reads in context (`mbc_hf.testing.pretrain_tiny_lm` on training
texts "document, question, answer", ``--pretrain-steps``; a random tiny LM cannot express any answer, and one
pretrained on documents and prompts apart cannot read a memory), trains its random tiny encoders (frozen, a random
encoder passes little of a document on) and reads documents of up to 256 tokens.
``--vq-warmup-steps N`` trains the learned codebooks with the VQ warm-up (`MBCTrainingArguments.vq_warmup_steps`).

    python benchmarks/synthetic_facts.py --model embedded --minutes 30 --output benchmarks/results/synthetic.json
"""

import argparse
import time

import torch

from mbc_hf.data import chance_em, synthetic_facts
from mbc_hf.demo import markdown_table, write_json_report
from mbc_hf.evaluation import score
from mbc_hf.factory import build
from mbc_hf.testing import in_context_texts, pretrain_tiny_lm
from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments

MAX_NEW_TOKENS = 12  # an answer is at most a few words
MEMORIES = {  # name -> (addressing, build options)
    "learned": ("all", dict(codebook_type="learned", aggregation="histogram")),
    "learned_topk": ("topk", dict(codebook_type="learned", aggregation="topk", topk_documents=1)),
    "no_vq": ("all", dict(codebook_type="learned", use_vq=False, aggregation="dense")),
    "vocabulary": ("topk", dict(codebook_type="vocabulary", read_documents=1, code_selector="trained",
                                code_order="document", num_context_tokens=24)),
}


def train_memory(name: str, a, train) -> object:
    options = dict(MEMORIES[name][1])
    if options["codebook_type"] == "learned" and options.get("use_vq", True):
        options["codebook_dim"] = a.codebook_dim
    if options.get("aggregation") == "topk":
        options.update(addressing_loss_weight=a.addressing_loss_weight, addressing_codes=a.addressing_codes)
    if options["codebook_type"] == "learned":
        options.update({k: v for k, v in (("num_context_tokens", a.context_tokens),
                                          ("codebook_size", a.codebook_size)) if v})
        options["reconstruction_loss_weight"] = a.reconstruction_loss_weight
    if a.model == "tiny":
        corpus = list(dict.fromkeys(train["context"])) + list(train["question"]) + ["Question: Answer:"]
        model = build("tiny", "tiny-bert", freeze_encoders=False, max_document_length=256, max_question_length=64,
                      corpus=corpus, vocab_size=1000, **options)
        loss = pretrain_tiny_lm(model, in_context_texts(model, train), steps=a.pretrain_steps, seed=a.seed)
        print(f"[synthetic] {name}: tiny LM pretrained, {a.pretrain_steps} steps, loss {loss:.2f}", flush=True)
    else:
        model = build("embedded", "embedded", freeze_encoders=True, **options)
    args = MBCTrainingArguments(output_dir=f"{a.work_dir}/{name}", per_device_train_batch_size=a.batch_size,
                                learning_rate=a.learning_rate, lora_learning_rate=a.lora_learning_rate,
                                max_steps=a.max_steps, num_train_epochs=100, logging_steps=25, save_strategy="no",
                                report_to="none", use_cpu=True, disable_tqdm=True, seed=a.seed,
                                lr_scheduler_type="constant", gold_only_steps=a.gold_only_steps,
                                vq_warmup_steps=a.vq_warmup_steps if name.startswith("learned") else 0,
                                addressing_grad_ratio=a.addressing_grad_ratio,
                                max_minutes=a.minutes or None)
    trainer = MBCTrainer(model=model, args=args, train_dataset=train)
    start = time.time()
    trainer.train()
    print(f"[synthetic] {name}: {trainer.state.global_step} steps in {time.time() - start:.0f} s", flush=True)
    return model.eval()


@torch.no_grad()
def evaluate(model, test, n: int, questions: int, empty: bool = False) -> dict:
    """EM/F1/answer NLL on the questions of the first documents, each read from a bank of its group of n test
    documents (or an empty memory)."""
    docs = list(dict.fromkeys(zip(test["doc_id"], test["context"])))
    asked = {d for d, _ in docs[:max(questions, 1)]}
    rows = [r for r in test if r["doc_id"] in asked]
    group = {d: i // n for i, (d, _) in enumerate(docs)}
    predictions, nll = [None] * len(rows), []
    for g in sorted({group[r["doc_id"]] for r in rows}):
        bank = None if empty else model.memorize([t for d, t in docs if group[d] == g],
                                                 doc_ids=[d for d, _ in docs if group[d] == g])
        members = [i for i, r in enumerate(rows) if group[r["doc_id"]] == g]
        answers = model.answer([rows[i]["question"] for i in members], memory_bank=bank, max_new_tokens=MAX_NEW_TOKENS)
        for i, p in zip(members, answers):
            predictions[i] = p
        batch = model.encode_questions([rows[i]["question"] for i in members], [rows[i]["answers"][0]
                                                                                for i in members])
        nll.append(float(model(**batch, memory_bank=bank).qa_loss) * len(members))
    result = score(predictions, {"answers": [r["answers"] for r in rows]})
    return {"em": result["em"], "f1": result["f1"], "answer_nll": sum(nll) / len(rows), "n_questions": len(rows)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "embedded"], default="embedded")
    p.add_argument("--minutes", type=float, default=30.0, help="training time per memory")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--memories", default=",".join(MEMORIES))
    p.add_argument("--train-entities", type=int, default=4000)
    p.add_argument("--test-entities", type=int, default=1000)
    p.add_argument("--bank-sizes", default="1,8,64,1000")
    p.add_argument("--attributes", help="comma-separated subset of city,profession,year,colour: ask (and train on) "
                   "only these questions; the documents keep all their attributes (default: all)")
    p.add_argument("--questions-docs", type=int, default=64, help="answer the questions of the first N test docs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--lora-learning-rate", type=float, default=1e-3)
    p.add_argument("--gold-only-steps", type=int, default=0)
    p.add_argument("--vq-warmup-steps", type=int, default=0, help="learned codebooks: steps that read the memory "
                   "unquantized before the codebook is k-means initialised and the codes are read")
    p.add_argument("--addressing-loss-weight", type=float, default=1.0, help="learned_topk: weight of its "
                   "addressing loss")
    p.add_argument("--addressing-grad-ratio", type=float, default=0.5, help="learned_topk: the addressing loss's "
                   "gradient budget (MBCTrainingArguments.addressing_grad_ratio); a negative value turns it off")
    p.add_argument("--reconstruction-loss-weight", type=float, default=0.0, help="learned memories: weight of the "
                   "auxiliary loss that reconstructs each document from its own memory (MBCConfig)")
    p.add_argument("--context-tokens", type=int, help="learned memories: T, codes per document (default: the "
                   "model's)")
    p.add_argument("--codebook-size", type=int, help="learned codebook: K (default: the model's)")
    p.add_argument("--addressing-codes", type=int, default=0, help="learned_topk: the key reads only the first N "
                   "codes (MBCConfig.addressing_codes; 0: all)")
    p.add_argument("--codebook-dim", type=int, help="learned codebook: factorized codes of this size (default: "
                   "the paper's d-dim codes)")
    p.add_argument("--pretrain-steps", type=int, default=1000, help="--model tiny: language-modelling steps that "
                   "make the random LM a base LM first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="outputs/synthetic")
    p.add_argument("--output")
    a = p.parse_args(argv)
    train = synthetic_facts(a.train_entities, "train", a.seed)
    test = synthetic_facts(a.test_entities, "test", a.seed)
    if a.attributes:
        keep = set(a.attributes.split(","))
        train, test = (ds.filter(lambda row: row["attribute"] in keep) for ds in (train, test))
    sizes = [min(int(s), a.test_entities) for s in a.bank_sizes.split(",")]
    rows = []
    for name in a.memories.split(","):
        model = train_memory(name, a, train)
        for n in sizes:
            rows.append({"memory": name, "addressing": MEMORIES[name][0], "bank_docs": n,
                         **evaluate(model, test, n, a.questions_docs)})
            print(markdown_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        if name == "learned":
            rows.append({"memory": "empty", "addressing": "—", "bank_docs": 0,
                         **evaluate(model, test, 1, a.questions_docs, empty=True)})
            prompts = [f"Question: {q}\nAnswer:" for q in test["question"]]
            asked = list(dict.fromkeys(test["doc_id"]))[:a.questions_docs]
            keep = [i for i, d in enumerate(test["doc_id"]) if d in set(asked)]
            closed = model.answer_with_base_lm([prompts[i] for i in keep], max_new_tokens=MAX_NEW_TOKENS)
            rows.append({"memory": "closed_book", "addressing": "—", "bank_docs": 0,
                         **score(closed, {"answers": [test["answers"][i] for i in keep]}), "answer_nll": None})
    chance = chance_em(test.select([i for i, d in enumerate(test["doc_id"])
                                    if d in set(list(dict.fromkeys(test["doc_id"]))[:a.questions_docs])]))
    print(f"\n{markdown_table(rows, ['memory', 'addressing', 'bank_docs', 'em', 'f1', 'answer_nll'])}\n\n"
          f"chance EM {chance:.2f}")
    record = {"rows": [{k: r.get(k) for k in ("memory", "addressing", "bank_docs", "em", "f1", "answer_nll")}
                       for r in rows], "chance_em": chance, "args": vars(a)}
    if a.output:
        write_json_report(a.output, record)
    return record


if __name__ == "__main__":
    main()
