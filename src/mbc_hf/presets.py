"""The reference code's per-backbone recipes (MBC / MAC ``conf/model/*.yaml``; ../shared/docs/method-and-anchors.md
§1.5-1.6 and §4.4) as presets, for users who meta-train the paper's model on a GPU.

``preset(name)`` returns ``config`` (`MBCConfig` fields), ``training`` (`MBCTrainingArguments` fields) and
``generation`` (``generate`` keyword arguments of the reference test decoding), plus the ``base_model`` /
``encoder`` / ``question_encoder`` Hub ids the reference used. ``examples/train_preset.py`` trains one, also under
``accelerate launch`` (docs/distributed.md).

Rules of the reference that a preset cannot carry: nf4 4-bit loading of Llama-2-7B (bitsandbytes), ``backprop_drop``
(a keep ratio of 0.75 for GPT2-XL / Llama-2-7B: only part of each batch's documents get gradients), and checkpoint
selection by validation F1 after each epoch (`MBCTrainer` evaluates the memory gain; use ``metric_for_best_model``).
"""

import copy

# aggregation: the reference attends over every stored vector; "histogram" is the same attention, exactly, in O(K)
# dead_code_steps: the reference's reset (usage EMA, decay 0.99, below 1e-4, updated every forward) re-seeds a code
# used once ln(1e-4 / 0.01) / ln(0.99) ≈ 458 forwards after that use
_COMMON_CONFIG = dict(codebook_type="learned", codebook_size=512, commitment_cost=0.25, vq_loss_weight=1.0,
                      ema_decay=0.99, dead_code_steps=460, prefix_length=2, aggregator_layers=4,
                      aggregator_heads=8, aggregator_head_dim=96, kv_lora_dropout=0.05, aggregation="histogram",
                      max_question_length=128, codebook_dim=None, reconstruction_loss_weight=0.0)
_COMMON_TRAINING = dict(learning_rate=1e-5, weight_decay=0.0, lr_scheduler_type="constant_with_warmup",
                        warmup_steps=0.01, max_grad_norm=100.0, num_train_epochs=50, seed=42)  # 1 % of the steps
# diverse beam search, top-1, at most 16 new tokens (method-and-anchors §4.4); validation during training is greedy.
# transformers 5 runs group (diverse) beam search as Hub code (custom_generate "transformers-community/
# group-beam-search", trust_remote_code=True), which needs the network: "generation_offline" is the same beam
# search without the groups.
_GENERATION = dict(num_beams=12, num_beam_groups=4, diversity_penalty=10.0, num_return_sequences=1,
                   early_stopping=True, do_sample=False, max_new_tokens=16,
                   custom_generate="transformers-community/group-beam-search", trust_remote_code=True)
_GENERATION_OFFLINE = dict(num_beams=12, num_return_sequences=1, early_stopping=True, do_sample=False,
                           max_new_tokens=16)

PRESETS = {
    "distilgpt2": dict(base_model="distilgpt2", encoder="t5-small", question_encoder="t5-small",
                       config=dict(num_context_tokens=12, kv_lora_r=16, kv_lora_alpha=32, kv_lora_layers=6),
                       training=dict(per_device_train_batch_size=16, gradient_accumulation_steps=4,
                                     per_device_eval_batch_size=24)),
    "gpt2-large": dict(base_model="gpt2-large", encoder="t5-base", question_encoder="t5-base",
                       config=dict(num_context_tokens=24, kv_lora_r=32, kv_lora_alpha=64, kv_lora_layers=16),
                       training=dict(per_device_train_batch_size=4, gradient_accumulation_steps=8,
                                     per_device_eval_batch_size=12, bf16=True)),
    "gpt2-xl": dict(base_model="gpt2-xl", encoder="t5-large", question_encoder="t5-base",
                    config=dict(num_context_tokens=24, kv_lora_r=32, kv_lora_alpha=64, kv_lora_layers=16),
                    training=dict(per_device_train_batch_size=4, gradient_accumulation_steps=8,
                                  per_device_eval_batch_size=12, bf16=True)),
    "llama-2-7b": dict(base_model="meta-llama/Llama-2-7b-hf", encoder="t5-large", question_encoder="t5-base",
                       config=dict(num_context_tokens=24, kv_lora_r=32, kv_lora_alpha=64, kv_lora_layers=16),
                       training=dict(per_device_train_batch_size=4, gradient_accumulation_steps=8,
                                     per_device_eval_batch_size=12, bf16=True)),
}


def preset(name: str) -> dict:
    """The recipe ``name`` (one of `PRESETS`): ``{"base_model", "encoder", "question_encoder", "config", "training",
    "generation", "generation_offline"}``, fresh copies.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    recipe = copy.deepcopy(PRESETS[name])
    recipe["config"] = {**_COMMON_CONFIG, **recipe["config"]}
    recipe["training"] = {**_COMMON_TRAINING, **recipe["training"]}
    recipe["generation"], recipe["generation_offline"] = dict(_GENERATION), dict(_GENERATION_OFFLINE)
    return recipe
