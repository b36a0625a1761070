"""Can each memory carry a fact, and does it still when the bank grows? Train every memory on the synthetic fact
stream (`mbc_hf.data.synthetic_facts`: fictional entities, so the base LM cannot know the answers), then answer
questions about new entities from banks of 1, 8, 64 and 1,000 documents, all rows on the same questions.

    memory "learned", addressing "all"    the paper's codebook, set aggregation over the whole bank (histogram)
    memory "learned", addressing "topk"   the paper's codebook with learned top-k addressing (aggregation="topk")
    memory "no_vq",   addressing "all"    VQ bypassed: MAC-style float memory (dense bank)
    memory "vocabulary", addressing "topk" the vocabulary codebook (codes are LM tokens, lexical addressing)
    memory "empty" / "closed_book"        the learned model with an empty memory / the base LM, question only
    addressing "key"  (--key-addressing)  the learned codebook built with ``addressing_key="minilm-binary"``: the
                                          package's compact-key addressing (`mbc_hf.compact_key.key_search`, 48-byte
                                          binary all-MiniLM-L6-v2 keys stored beside the codes) picks the one
                                          document of the bank each question reads

A bank of n documents holds the gold document and n - 1 other test entities (the test documents in groups of n);
``answer_nll`` is the mean answer NLL (nats per token) with that bank. ``chance_em`` guesses each attribute
uniformly from its closed set.

``--model tiny`` trains its tokenizers on the training texts (vocabulary 1,000: most attribute values become one
token), makes its random LM a small base LM that reads in context (`mbc_hf.testing.pretrain_tiny_lm` on training
texts "document, question, answer", ``--pretrain-steps``; a random tiny LM cannot express any answer, and one
pretrained on documents and prompts apart cannot read a memory), trains its random tiny encoders (frozen, a random
encoder passes little of a document on) and reads documents of up to 256 tokens.
``--vq-warmup-steps N`` trains the learned codebooks with the VQ warm-up (`MBCTrainingArguments.vq_warmup_steps`);
with ``--vq-warmup-gain G`` it ends as soon as the float memory's gain against another document reaches G nats on
200 held-out entities (never asked about, never trained on), N being the cap. Each learned row also reports the
codebook's health at the end of training: ``distinct_codes`` over the 1,000 test documents, ``resets`` (codes
re-seeded by online resetting) and ``warmup_end`` (the step where the codes took over).

    python benchmarks/synthetic_facts.py --model embedded --minutes 30 --output benchmarks/results/synthetic.json
"""

import argparse
import time

import torch

from mbc_hf.data import chance_em, synthetic_facts
from mbc_hf.demo import markdown_table, write_json_report
from mbc_hf.atomic import write_text_atomic
from mbc_hf.evaluation import score
from mbc_hf.factory import build
from mbc_hf.testing import in_context_texts, pretrain_tiny_lm
from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments, distinct_codes

MAX_NEW_TOKENS = 12  # an answer is at most a few words
MEMORIES = {  # name -> (addressing, build options)
    "learned": ("all", dict(codebook_type="learned", aggregation="histogram")),
    "learned_topk": ("topk", dict(codebook_type="learned", aggregation="topk", topk_documents=1)),
    "no_vq": ("all", dict(codebook_type="learned", use_vq=False, aggregation="dense")),
    "vocabulary": ("topk", dict(codebook_type="vocabulary", read_documents=1, code_selector="trained",
                                code_order="document", num_context_tokens=24)),
}
# the paper's claims as one ablation (--memories ablation): MBC (the learned codebook with online resetting, set
# aggregation), without one part at a time
ABLATION = {
    "learned_no_reset": ("all", dict(MEMORIES["learned"][1], dead_code_steps=2**62)),
    "no_vq": MEMORIES["no_vq"],
    "learned_no_kv_lora": ("all", dict(MEMORIES["learned"][1], kv_lora_layers=0)),
    "learned_k128": ("all", dict(MEMORIES["learned"][1], codebook_size=128)),
    "learned_k512": ("all", dict(MEMORIES["learned"][1], codebook_size=512)),
    "learned_k2048": ("all", dict(MEMORIES["learned"][1], codebook_size=2048)),
    # not a part removed: the same codebook on lucidrains' vector-quantize-pytorch (EMA codes, rotation trick)
    "learned_vq_pytorch": ("all", dict(MEMORIES["learned"][1], codebook_backend="vector-quantize-pytorch")),
}
MEMORIES.update(ABLATION)
ABLATION_RUN = ["learned", *ABLATION]


def key_addressable(options: dict) -> bool:
    """Whether a memory's bank can be addressed by the compact key: learned codes (a bank of codes with keys), not
    learned top-k (its own addressing) nor the float memory (a dense bank, no keys)."""
    return (options.get("codebook_type") == "learned" and options.get("aggregation") != "topk"
            and options.get("use_vq", True))


def train_memory(name: str, a, train, held_out) -> tuple[object, dict]:
    """Train one memory; returns the model (eval mode) and its training record (steps, warm-up end, resets)."""
    options = {}
    if MEMORIES[name][1]["codebook_type"] == "learned":
        options.update({k: v for k, v in (("num_context_tokens", a.context_tokens),
                                          ("codebook_size", a.codebook_size), ("codebook_dim", a.codebook_dim))
                        if v})
        options.update(reconstruction_loss_weight=a.reconstruction_loss_weight, dead_code_steps=a.dead_code_steps)
    if MEMORIES[name][1].get("aggregation") == "topk":
        options.update(addressing_loss_weight=a.addressing_loss_weight, addressing_codes=a.addressing_codes)
    options.update(MEMORIES[name][1])  # the memory's own settings win (the ablation's K, reset, KV-LoRA)
    if a.key_addressing and key_addressable(options):  # memorize stores keys; rows without the key read whole banks
        options.update(addressing_key="minilm-binary", addressing_key_encoder=a.key_encoder, read_documents=1)
    if not options.get("use_vq", True):
        options.pop("codebook_dim", None)
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
                                vq_warmup_gain=a.vq_warmup_gain if name.startswith("learned") else None,
                                vq_warmup_check_steps=a.vq_warmup_check_steps, memory_gain_questions=32,
                                per_device_eval_batch_size=16, addressing_grad_ratio=a.addressing_grad_ratio,
                                max_minutes=a.minutes or None)
    trainer = MBCTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    print(f"[synthetic] {name}: {trainer.state.global_step} steps in {seconds:.0f} s", flush=True)
    record = {"steps": trainer.state.global_step, "train_s": round(seconds),
              "warmup_end": trainer.vq_warmup_end[0] if trainer.vq_warmup_end else None,
              "resets": getattr(model.codebook, "num_resets", None),
              "log": [h for h in trainer.state.log_history if "loss" in h or "vq_warmup_gain" in h]}
    return model.eval(), record


def _asked(test, questions: int) -> tuple[list[tuple[str, str]], list[dict]]:
    """The test documents as (doc_id, text) in stream order, and the rows of the questions of the first ones."""
    docs = list(dict.fromkeys(zip(test["doc_id"], test["context"])))
    asked = {d for d, _ in docs[:max(questions, 1)]}
    return docs, [r for r in test if r["doc_id"] in asked]


def _read(model, rows: list[dict], reads: list[tuple[list, list[int]]], aggregation: str | None = None,
          addressed: bool = False) -> dict:
    """EM/F1/answer NLL of ``rows``; each read of ``reads`` is (documents as (doc_id, text) pairs, row indices): those
    questions answered together from a bank of those documents (none: an empty memory). ``addressed``: the model
    addresses the bank itself (its compact key); ``key_top1`` is the share of questions whose first source is their
    own document."""
    predictions, nll, hits = [None] * len(rows), [], 0
    for documents, members in reads:
        bank = model.memorize([t for _, t in documents], doc_ids=[d for d, _ in documents]) if documents else None
        out = model.answer([rows[i]["question"] for i in members], memory_bank=bank, max_new_tokens=MAX_NEW_TOKENS,
                           aggregation=aggregation, return_sources=addressed)
        for i, p in zip(members, out):
            predictions[i] = p["answer"] if addressed else p
            hits += addressed and p["sources"][:1] == [rows[i]["doc_id"]]
        batch = model.encode_questions([rows[i]["question"] for i in members], [rows[i]["answers"][0]
                                                                                for i in members])
        nll.append(float(model(**batch, memory_bank=bank, aggregation=aggregation).qa_loss) * len(members))
    result = score(predictions, {"answers": [r["answers"] for r in rows]})
    return {"em": result["em"], "f1": result["f1"], "answer_nll": sum(nll) / len(rows), "n_questions": len(rows),
            **({"key_top1": hits / max(len(rows), 1)} if addressed else {})}


@torch.no_grad()
def evaluate(model, test, n: int, questions: int, empty: bool = False, aggregation: str | None = None,
             key: bool = False) -> dict:
    """EM/F1/answer NLL on the questions of the first documents, each read from a bank of its group of n test
    documents (or an empty memory): with ``key`` (a model built with ``addressing_key``) through the package's
    compact-key addressing, each question reading the ``read_documents`` (1) documents of the bank whose 48-byte
    keys are most similar to it (``key_top1``: the share whose first one is its own); else the whole bank through
    the model's aggregation, or ``aggregation``."""
    docs, rows = _asked(test, questions)
    group = {d: i // n for i, (d, _) in enumerate(docs)}
    reads = [([] if empty else docs[g * n:(g + 1) * n], [i for i, r in enumerate(rows) if group[r["doc_id"]] == g])
             for g in sorted({group[r["doc_id"]] for r in rows})]
    return _read(model, rows, reads, None if key else aggregation or model.config.aggregation, addressed=key)


def bank_size(model, docs: list[str]) -> dict:
    """Bytes one document takes in the model's bank (codes, plus the 48-byte compact key when the model stores one;
    or fp32 vectors for the float memory), and that as a percentage of MAC's float bank (T vectors of d fp32 per
    document; the paper's "0.3 %")."""
    bank = model.memorize(docs[:4])
    rows = bank.codes if hasattr(bank, "codes") else bank.vectors
    stored = rows[0].nbytes + (getattr(bank, "key_bytes", None) or 0)
    float_bytes = model.config.num_context_tokens * model.codebook.dim * 4
    return {"bytes_per_doc": stored, "pct_of_float_bank": 100 * stored / float_bytes}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "embedded"], default="embedded")
    p.add_argument("--minutes", type=float, default=30.0, help="training time per memory")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--memories", default="learned,learned_topk,no_vq,vocabulary", help="comma-separated names of "
                   f"{sorted(MEMORIES)}, or 'ablation': {', '.join(ABLATION_RUN)}")
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
    p.add_argument("--vq-warmup-gain", type=float, help="learned codebooks: end the warm-up as soon as the float "
                   "memory's gain against another document reaches this (nats), --vq-warmup-steps being the cap")
    p.add_argument("--vq-warmup-check-steps", type=int, default=50, help="steps between two checks of the gain")
    p.add_argument("--dead-code-steps", type=int, default=100, help="learned codebook: online resetting re-seeds a "
                   "code unused for this many training forwards (MBCConfig.dead_code_steps)")
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
    p.add_argument("--key-addressing", action="store_true", help="learned codebooks (not top-k): build them with "
                   "addressing_key='minilm-binary' and also read, at each bank size above 1, only the document the "
                   "compact key ranks first (addressing 'key')")
    p.add_argument("--key-encoder", default="embedded", help="--key-addressing: the sentence encoder of the keys "
                   "('embedded': all-MiniLM-L6-v2, or a local folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="outputs/synthetic")
    p.add_argument("--output")
    a = p.parse_args(argv)
    train = synthetic_facts(a.train_entities, "train", a.seed)
    test = synthetic_facts(a.test_entities + 200, "test", a.seed)  # the last 200: the warm-up gate's documents
    held_out = test.filter(lambda row: int(row["doc_id"].rsplit("-", 1)[1]) >= a.test_entities)
    test = test.filter(lambda row: int(row["doc_id"].rsplit("-", 1)[1]) < a.test_entities)
    if a.attributes:
        keep = set(a.attributes.split(","))
        train, test, held_out = (ds.filter(lambda row: row["attribute"] in keep) for ds in (train, test, held_out))
    all_docs = list(dict.fromkeys(test["context"]))
    sizes = [min(int(s), a.test_entities) for s in a.bank_sizes.split(",")]
    rows, training = [], {}
    names = a.memories.split(",")
    if a.memories == "ablation":  # the K rows other than MBC's own K (--codebook-size)
        names = [n for n in ABLATION_RUN if n.removeprefix("learned_k") != str(a.codebook_size)]
    for name in names:
        model, training[name] = train_memory(name, a, train, held_out)
        health = {}
        if MEMORIES[name][1]["codebook_type"] == "learned":
            health = bank_size(model, all_docs)
        if MEMORIES[name][1]["codebook_type"] == "learned" and MEMORIES[name][1].get("use_vq", True):
            health.update(distinct_codes=distinct_codes(model, all_docs), resets=training[name]["resets"],
                          warmup_end=training[name]["warmup_end"])
        for n in sizes:
            rows.append({"memory": name, "addressing": MEMORIES[name][0], "bank_docs": n,
                         **evaluate(model, test, n, a.questions_docs), "steps": training[name]["steps"], **health})
            print(markdown_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        if MEMORIES[name][0] == "topk":  # the same codes read by the paper's set aggregation: its curve beside
            for n in sizes[1:] if MEMORIES[name][1]["codebook_type"] == "learned" else []:
                rows.append({"memory": name, "addressing": "all", "bank_docs": n,
                             **evaluate(model, test, n, a.questions_docs,
                                        aggregation="histogram" if model.config.use_vq else "dense"),
                             "steps": training[name]["steps"], **health})
                print(markdown_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        if model.config.addressing_key is not None:
            for n in sizes:
                if n > 1:
                    rows.append({"memory": name, "addressing": "key", "bank_docs": n,
                                 **evaluate(model, test, n, a.questions_docs, key=True),
                                 "steps": training[name]["steps"], **health})
                    print(markdown_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
        if name.startswith("learned") and not any(r["memory"] == "empty" for r in rows):
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
    columns = ["memory", "addressing", "bank_docs", "em", "f1", "answer_nll", "steps", "warmup_end", "resets",
               "distinct_codes", "bytes_per_doc", "pct_of_float_bank"] + (["key_top1"] if a.key_addressing else [])
    table = f"{markdown_table(rows, columns)}\n\nchance EM {chance:.2f}"
    print(f"\n{table}")
    record = {"rows": [{k: r.get(k) for k in columns} for r in rows], "chance_em": chance, "args": vars(a),
              "training": training}
    if a.output:
        write_json_report(a.output, record)
        write_text_atomic(a.output.removesuffix(".json") + ".md", table + "\n")
    return record


if __name__ == "__main__":
    main()
