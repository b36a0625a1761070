"""MBCTrainer / MBCDataCollator / memory gain on tiny models (issue: main job)."""
import json
import math

import datasets
import pytest
import torch

from mbc_hf.testing import tiny_mbc_model
from mbc_hf.trainer import (MBCDataCollator, MBCTrainer, MBCTrainingArguments, article_of, article_pair_batches,
                            kmeans_init_codebook, memory_gain, paired_partners, question_gains)

ROWS = [dict(doc_id=f"d{i}", context=f"Fact {i}: the code of room {i} is {i * 7}.",
             question=f"What is the code of room {i}?", answers=[str(i * 7), f"code {i * 7}"], question_id=f"q{i}")
        for i in range(8)]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                learning_rate=3e-3, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                logging_steps=2)
    base.update(kw)
    return MBCTrainingArguments(**base)


def test_collator_builds_memory_of_unique_documents_and_answer_labels():
    model = tiny_mbc_model(reconstruction_loss_weight=1.0)
    rows = [ROWS[0], ROWS[1], dict(ROWS[0], question="Which code has room 0?", question_id="q0b")]
    batch = MBCDataCollator(model)(rows)
    assert batch["context_input_ids"].shape[0] == 2  # the repeated document is encoded once
    assert batch["question_doc_index"].tolist() == [0, 1, 0]
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert model.tokenizer.decode(labelled).strip() == "0" + model.tokenizer.eos_token  # shortest answer + eos
    assert batch["reconstruction_input_ids"].shape[0] == 2
    assert all(t.device.type == "cpu" for t in batch.values())


def test_trainer_loss_is_finite_and_falls_on_a_repeated_batch(tmp_path):
    torch.manual_seed(0)
    model = tiny_mbc_model(seed=0)
    ds = datasets.Dataset.from_list(ROWS[:4] * 8)  # the same 4 rows again and again
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=30, gold_only_steps=5, lora_start_step=3),
                         train_dataset=ds)
    batch = MBCDataCollator(model)(ROWS[:4])
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    trainer.train()
    model.eval()
    with torch.no_grad():
        after = model(**batch).loss.item()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < before - 0.1, (before, after)
    assert any("qa_loss" in h and "vq_loss" in h for h in trainer.state.log_history)


def test_lora_stays_unchanged_before_lora_start_step(tmp_path):
    model = tiny_mbc_model(seed=0)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    ds = datasets.Dataset.from_list(ROWS[:4] * 4)
    MBCTrainer(model=model, args=args(tmp_path, max_steps=4, lora_start_step=100), train_dataset=ds).train()
    assert all(torch.equal(lora[n], p) for n, p in model.named_parameters() if "lora_" in n)
    others = [p for n, p in model.named_parameters() if "prefix_generator" in n]
    assert others  # and the memory path did train meanwhile (checked by the loss test above)


def test_evaluate_reports_memory_gain_and_online_em_f1(tmp_path):
    model = tiny_mbc_model(seed=0)
    ds = datasets.Dataset.from_list(ROWS)
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=1, eval_max_questions=4,
                                                memory_gain_questions=4), train_dataset=ds, eval_dataset=ds)
    metrics = trainer.evaluate()
    for key in ("eval_nll_gold", "eval_nll_empty", "eval_nll_unrelated", "eval_memory_gain", "eval_em", "eval_f1"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert metrics["eval_memory_gain"] == pytest.approx(metrics["eval_nll_empty"] - metrics["eval_nll_gold"])
    assert metrics["eval_n_questions"] == 4


def test_the_trainer_restarts_the_optimizer_moments_of_reseeded_codes_before_each_step(tmp_path):
    model = tiny_mbc_model(seed=0, codebook_size=16, dead_code_steps=1)  # every unused code is re-seeded at once
    calls = []
    restart = model.codebook.restart_optimizer_state

    def spy(optimizer):
        marked = int(model.codebook.reset_mask.sum())
        calls.append((marked, restart(optimizer)))
        return calls[-1][1]

    model.codebook.restart_optimizer_state = spy
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=3), train_dataset=datasets.Dataset.from_list(ROWS))
    trainer.train()
    assert len(calls) == 3  # once per optimizer step
    assert all(marked == n > 0 for marked, n in calls)  # the codes re-seeded in the step, restarted before it
    assert not model.codebook.reset_mask.any()


@pytest.mark.parametrize("docs", [3, 8])
def test_evaluate_counts_the_distinct_codes_of_held_out_documents(tmp_path, docs):
    model = tiny_mbc_model(seed=0, codebook_size=16)
    with torch.no_grad():
        model.codebook.embedding.weight.normal_()  # spread codes (the default init maps everything to a few)
    ds = datasets.Dataset.from_list(ROWS)
    metrics = MBCTrainer(model=model, args=args(tmp_path, max_steps=1, memory_gain_questions=4, eval_codes_docs=docs),
                         train_dataset=ds, eval_dataset=ds).evaluate()
    model.eval()
    enc = model.encode_documents([r["context"] for r in ROWS[:docs]])
    with torch.no_grad():
        codes = model.codebook.nearest_codes(model.amortization(enc["input_ids"], enc["attention_mask"]))
    assert metrics["eval_distinct_codes"] == codes.unique().numel() > 1


def test_memory_gain_is_zero_when_the_memory_is_ignored():
    model = tiny_mbc_model(seed=0, aggregator_layers=1)
    batch = MBCDataCollator(model)(ROWS[:4])
    with torch.no_grad():  # make every block ignore the memory: attention output projection = 0
        for block in model.aggregator.blocks:
            block.to_out.weight.zero_(), block.to_out.bias.zero_()
    gain = memory_gain(model, batch)
    assert gain["memory_gain"] == pytest.approx(0.0, abs=1e-6)
    assert gain["memory_gain_unrelated"] == pytest.approx(0.0, abs=1e-6)


def test_question_gains_are_the_memory_gain_of_each_question():
    """Weighted by each question's answer tokens, the per-question gains average to the batch's token-mean gain;
    a question reading its own document as the partner gains exactly 0."""
    model = tiny_mbc_model(seed=0)
    batch = MBCDataCollator(model)(ROWS[:4])
    partners = {"next": torch.tensor([1, 2, 3, 0]), "self": torch.arange(4)}
    per_question, batch_gain = question_gains(model, batch, partners), memory_gain(model, batch, partners)
    tokens = (batch["labels"][:, 1:] != -100).sum(1).float()
    assert set(per_question) == {"memory_gain", "memory_gain_next", "memory_gain_self"}
    for name in ("memory_gain", "memory_gain_next"):
        assert per_question[name].shape == (4,) and per_question[name].dtype == torch.float32
        assert float((per_question[name] * tokens).sum() / tokens.sum()) == pytest.approx(batch_gain[name], abs=1e-4)
    assert per_question["memory_gain_self"].abs().max() < 1e-5
    assert per_question["memory_gain_next"].std() > 0  # not one number broadcast: each question its own gain


def test_article_pair_batches_pair_paragraphs_of_one_article_and_separate_articles():
    counts = {"A": 5, "B": 4, "C": 2, "D": 1, "E": 2}  # A's fifth and D's only paragraph have no partner
    rows = [dict(doc_id=f"{a}#{k}") for a, n in counts.items() for k in range(n)]
    batches = article_pair_batches(rows, batch_size=4)
    partners = paired_partners(4)
    used = [r["doc_id"] for b in batches for r in b]
    assert len(used) == len(set(used)) == 12 and "A#4" not in used and "D#0" not in used
    for batch in batches:
        arts = [article_of(r["doc_id"]) for r in batch]
        for i in range(4):
            assert arts[int(partners["same_article"][i])] == arts[i]
            assert arts[int(partners["other_article"][i])] != arts[i]
    assert article_of("no-hash-id") == "no-hash-id"
    with pytest.raises(ValueError, match="even and at least 4"):
        article_pair_batches(rows, batch_size=5)


def test_memory_gain_reads_the_named_partner_documents():
    model = tiny_mbc_model(seed=0)
    batch = MBCDataCollator(model)(ROWS[:4])
    default = memory_gain(model, batch)
    named = memory_gain(model, batch, {"next": torch.tensor([1, 2, 3, 0]), "self": torch.arange(4)})
    assert named["nll_next"] == pytest.approx(default["nll_unrelated"])
    assert named["memory_gain_self"] == pytest.approx(0.0, abs=1e-6)  # reading its own document = gold
    assert "nll_unrelated" not in named


def test_evaluate_with_article_pairs_reports_topic_and_paragraph_gains(tmp_path):
    model = tiny_mbc_model(seed=0)
    rows = [dict(r, doc_id=f"art{i // 2}#{i % 2}") for i, r in enumerate(ROWS)]  # 4 articles x 2 paragraphs
    ds = datasets.Dataset.from_list(rows)
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=1, memory_gain_questions=8,
                                                memory_gain_article_pairs=True), train_dataset=ds, eval_dataset=ds)
    metrics = trainer.evaluate()
    for name in ("other_article", "same_article"):
        assert metrics[f"eval_memory_gain_{name}"] == pytest.approx(
            metrics[f"eval_nll_{name}"] - metrics["eval_nll_gold"])
    assert "eval_nll_unrelated" not in metrics
    unpaired = datasets.Dataset.from_list(ROWS)  # ids without '#': every document is an article of its own
    with pytest.raises(ValueError, match=r"\(8 documents of 8 articles\) has no 2 articles with two documents"):
        MBCTrainer(model=model, args=args(tmp_path, max_steps=1, memory_gain_article_pairs=True),
                   train_dataset=ds, eval_dataset=unpaired).evaluate()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="no 2 articles"):  # train() refuses before the first step, not at eval
        MBCTrainer(model=model, args=args(tmp_path, max_steps=1, memory_gain_article_pairs=True),
                   train_dataset=ds, eval_dataset=unpaired).train()
    assert all(torch.equal(p, lora[n]) for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="even per_device_eval_batch_size >= 4"):
        MBCTrainer(model=model, args=args(tmp_path, max_steps=1, memory_gain_article_pairs=True,
                                          per_device_eval_batch_size=3), train_dataset=ds, eval_dataset=ds).evaluate()


def test_saved_output_has_json_training_args_and_no_pickle(tmp_path):
    model = tiny_mbc_model(seed=0)
    ds = datasets.Dataset.from_list(ROWS)
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
                         train_dataset=ds)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    for folder in (tmp_path / "out", tmp_path / "checkpoint-1"):  # save_model, and the checkpoint of a save step
        assert json.loads((folder / "training_args.json").read_text())["max_steps"] == 1
        assert not (folder / "training_args.bin").exists()


def test_kmeans_codebook_and_frozen_document_side_keep_every_documents_codes_fixed(tmp_path):
    model = tiny_mbc_model(seed=0, freeze_amortization=True, codebook_size=16)
    assert not any(p.requires_grad for p in model.amortization.parameters())
    ds = datasets.Dataset.from_list(ROWS * 2)
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=4, codebook_kmeans_docs=8,
                                                freeze_codebook=True), train_dataset=ds)
    enc = model.encode_documents([r["context"] for r in ROWS])

    def codes():
        return model.codebook.nearest_codes(model.amortization(enc["input_ids"], enc["attention_mask"]))

    trainer.train()
    model.eval()
    with torch.no_grad():
        after = codes()
    # k-means set the usage on the per-step scale (K before any training forward) and the frozen codebook kept it
    assert bool(model.codebook.frozen) and model.codebook.ema_cluster_size.sum() == model.config.codebook_size
    assert after.unique().numel() > 4  # k-means spread the 8 documents' vectors over the codes
    fresh = tiny_mbc_model(seed=0, freeze_amortization=True, codebook_size=16)
    kmeans_init_codebook(fresh, ds, 8, seed=trainer.args.seed)  # same documents, same seed -> same codebook
    assert torch.equal(fresh.codebook.embedding.weight, model.codebook.embedding.weight)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.codebook.nearest_codes(fresh.amortization(enc["input_ids"], enc["attention_mask"])),
                           after)



@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_trainer_hands_the_gold_documents_to_the_contrastive_term(tmp_path, weight):
    """The collator's question_doc_index reaches the model as contrastive_doc_index (also after the gold-only
    steps, when the memory is the whole batch), so the term is logged exactly when its weight is > 0."""
    torch.manual_seed(0)
    model = tiny_mbc_model(seed=0, contrastive_loss_weight=weight)
    ds = datasets.Dataset.from_list(ROWS[:4] * 4)
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=4, gold_only_steps=2), train_dataset=ds)
    trainer.train()
    logged = [h["contrastive_loss"] for h in trainer.state.log_history if "contrastive_loss" in h]
    assert len(logged) == (2 if weight > 0 else 0)  # logging_steps=2: one log in gold-only mode, one after
    assert all(math.isfinite(v) and v >= 0.0 for v in logged)  # a hinge


def test_trainer_feeds_the_distillation_teacher_and_logs_the_term(tmp_path):
    """With distillation_loss_weight > 0 the collator adds each question's gold document in context (the teacher's
    input) and the trainer logs the term; at weight 0 the collator adds nothing."""
    rows = ROWS[:4]
    plain = MBCDataCollator(tiny_mbc_model(seed=0))(rows)
    assert "teacher_input_ids" not in plain
    torch.manual_seed(0)
    model = tiny_mbc_model(seed=0, distillation_loss_weight=1.0)
    batch = MBCDataCollator(model)(rows)
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    assert batch["teacher_input_ids"].shape[1] > batch["input_ids"].shape[1]  # the documents are in the context
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=4),
                         train_dataset=datasets.Dataset.from_list(rows * 4))
    trainer.train()
    logged = [h["distillation_loss"] for h in trainer.state.log_history if "distillation_loss" in h]
    assert len(logged) == 2 and all(math.isfinite(v) and v >= 0.0 for v in logged)  # a KL, logged every 2 steps


def test_encoder_state_cache_leaves_training_unchanged_and_serves_repeated_documents(tmp_path):
    """A frozen document encoder's states are reused by train() (encoder_state_cache_mb) with the same losses."""
    from transformers import TrainerCallback

    class KeepCache(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.cache = model.amortization.state_cache

    ds = datasets.Dataset.from_list(ROWS[:4] * 4)  # every document comes back
    runs, kept = {}, KeepCache()
    for mb in (0, 64):
        model = tiny_mbc_model(seed=0, freeze_encoders=True)
        trainer = MBCTrainer(model=model, args=args(tmp_path / str(mb), max_steps=8, encoder_state_cache_mb=mb,
                                                    seed=0, logging_steps=1),
                             train_dataset=ds, callbacks=[kept])
        trainer.train()
        runs[mb] = [h for h in trainer.state.log_history if "loss" in h]
        assert model.amortization.state_cache is None  # dropped after training
    assert [h["qa_loss"] for h in runs[64]] == pytest.approx([h["qa_loss"] for h in runs[0]], rel=1e-4, abs=1e-5)
    assert "encoder_cache_hit_rate" not in runs[0][-1]
    assert kept.cache.misses == 4  # each distinct document was encoded exactly once
    rows = kept.cache.hits + kept.cache.misses
    assert 8 < rows <= 32 and runs[64][-1]["encoder_cache_hit_rate"] == pytest.approx(1 - 4 / rows, abs=1e-4)


def test_resume_warns_only_about_missing_mbc_weights_not_the_unsaved_base_lm(tmp_path, caplog):
    from torch.nn.modules.module import _IncompatibleKeys
    from transformers.utils import logging as hf_logging

    ds = datasets.Dataset.from_list(ROWS[:4] * 4)
    MBCTrainer(model=tiny_mbc_model(seed=0), args=args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
               train_dataset=ds).train()
    trainer = MBCTrainer(model=tiny_mbc_model(seed=0), args=args(tmp_path, max_steps=3), train_dataset=ds)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
            assert trainer.state.global_step == 3
            assert "missing keys" not in caplog.text
            # a tiny model has no base LM path to refer to, so its checkpoint stores the LM too; a checkpoint of a
            # pretrained base LM lacks all lm.* weights except KV-LoRA's, as here
            trainer._issue_warnings_after_load(_IncompatibleKeys(
                missing_keys=["lm.model.embed_tokens.weight", "codebook.embed"], unexpected_keys=[]))
            assert "missing keys" in caplog.text and "codebook.embed" in caplog.text
            assert "lm.model.embed_tokens.weight" not in caplog.text
    finally:
        hf_logging.disable_propagation()


def test_the_collator_warns_once_per_run_about_truncated_documents():
    import warnings

    model = tiny_mbc_model()
    long_rows = [dict(row, context=row["context"] * 100) for row in ROWS]
    collate = MBCDataCollator(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(0, 8, 2):
            collate(long_rows[i:i + 2])
    messages = [str(w.message) for w in caught if "max_document_length" in str(w.message)]
    assert len(messages) == 1 and "2 of 2 in the first such batch; shown once" in messages[0]


def test_hybrid_training_puts_the_bm25_top1_training_passage_before_each_question(tmp_path):
    """Issue 36 item 1: a hybrid batch holds the passage BM25 ranks first among *all* training documents (a wrong one
    when the question's words point there), none when no word matches, in answer(text_store=...)'s prompt."""
    model = tiny_mbc_model(seed=0)
    rows = [dict(ROWS[5], question="Is 35 the code of room 5?"), dict(ROWS[0], question="Which fact says 21?"),
            dict(ROWS[2], question="Xyzzy plugh?")]
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=1, hybrid_passages=True),
                         train_dataset=datasets.Dataset.from_list(ROWS))
    batch = trainer.data_collator(rows)
    # row 0: its own document (code 35); row 1: document 3 (code 21), not its gold one; row 2: no passage
    expected = model.encode_questions([r["question"] for r in rows], [min(r["answers"], key=len) for r in rows],
                                      device="cpu", contexts=[ROWS[5]["context"], ROWS[3]["context"], ""])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["labels"], expected["labels"])
    plain = MBCDataCollator(model)(rows)
    assert batch["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert torch.equal(batch["context_input_ids"], plain["context_input_ids"])  # the memory side is unchanged
    trainer.train()  # and it trains
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_hybrid_evaluation_reads_passages_of_the_eval_documents(tmp_path):
    """A held-out question's passage is found among the eval documents (as answer(text_store=...) finds it among the
    documents streamed in), not among the training documents, which do not hold it."""
    model = tiny_mbc_model(seed=0)
    train, held_out = ROWS[:4], [dict(ROWS[5], question="Is 35 the code of room 5?")]
    trainer = MBCTrainer(model=model, args=args(tmp_path, max_steps=1, hybrid_passages=True, memory_gain_questions=1),
                         train_dataset=datasets.Dataset.from_list(train),
                         eval_dataset=datasets.Dataset.from_list(held_out))
    batch = trainer.eval_collator(trainer.eval_dataset)(held_out)
    expected = model.encode_questions([held_out[0]["question"]], [min(held_out[0]["answers"], key=len)],
                                      device="cpu", contexts=[ROWS[5]["context"]])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert not torch.equal(trainer.data_collator(held_out)["input_ids"], batch["input_ids"])  # training store
    assert trainer.eval_collator(trainer.eval_dataset) is trainer.eval_collator(trainer.eval_dataset)  # built once
    assert math.isfinite(trainer.evaluate()["eval_memory_gain"])
    plain = MBCTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=datasets.Dataset.from_list(train))
    assert plain.eval_collator(datasets.Dataset.from_list(held_out)) is plain.data_collator


def test_hybrid_training_without_a_training_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train_dataset"):
        MBCTrainer(model=tiny_mbc_model(seed=0), args=args(tmp_path, hybrid_passages=True))
