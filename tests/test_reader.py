"""The memory scheme is a reader chosen once from the config (mbc_hf.reader): each scheme builds its own modules,
keeps the checkpoint's parameter names, and refuses what belongs to the other scheme with a clear error."""

import pytest
import torch

from mbc_hf.reader import LearnedReader, VocabularyReader
from mbc_hf.testing import tiny_mbc_model

SCHEMES = [  # codebook_type, reader, modules it builds, modules it leaves None
    ("learned", LearnedReader, ["amortization", "question_encoder", "aggregator", "prefix_generator"], []),
    ("vocabulary", VocabularyReader, [], ["amortization", "question_encoder", "aggregator", "prefix_generator"]),
]
DOCS = ["The red fox lives in Paris.", "A blue whale sang near Oslo."]


@pytest.mark.parametrize("codebook_type,reader,built,absent", SCHEMES)
def test_the_config_picks_the_reader_and_it_builds_only_its_modules(codebook_type, reader, built, absent):
    model = tiny_mbc_model(codebook_type=codebook_type)
    assert type(model.reader) is reader and model.reader.model is model
    assert all(isinstance(getattr(model, name), torch.nn.Module) for name in built)
    assert all(getattr(model, name) is None for name in absent)
    # the reader's modules are the model's: their parameters are in the model's state dict under the old names
    assert any(k.startswith("codebook.") for k in model.state_dict())
    assert all(any(k.startswith(name + ".") for k in model.state_dict()) for name in built)


def test_a_learned_model_refuses_the_vocabulary_readers_work():
    model = tiny_mbc_model().eval()
    q = model.encode_questions(["Where does the fox live?"])
    memory = model.memory_from_documents(**{k: v for k, v in zip(
        ("context_input_ids", "context_attention_mask"), model.encode_documents(DOCS).values())})[0]
    for call in (lambda: model.read_documents(q["question_input_ids"], q["question_attention_mask"], memory),
                 lambda: model.token_prefix(q["input_ids"], q["attention_mask"], memory),
                 lambda: model.token_memory(torch.zeros(2, 4, dtype=torch.long)),
                 lambda: model.answer(["Where?"], memory_bank=model.memorize(DOCS), return_sources=True)):
        with pytest.raises(ValueError, match="learned|vocabulary"):
            call()


def test_a_vocabulary_model_refuses_the_learned_readers_work():
    model = tiny_mbc_model(codebook_type="vocabulary").eval()
    with pytest.raises(ValueError, match="prefix generator"):
        model.prefix_from_latents(torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="reconstruction_loss_weight=0"):
        model.reconstruction_loss(None, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match="no uncompressed"):
        model.new_memory_bank(compress=False)


@pytest.mark.parametrize("codebook_type", ["learned", "vocabulary"])
def test_save_and_load_rebuild_the_same_reader_with_the_same_answers(tmp_path, codebook_type):
    from transformers import AutoModelForCausalLM

    model = tiny_mbc_model(codebook_type=codebook_type).eval()
    if codebook_type == "vocabulary":
        model.codebook.fit([model.tokenizer(d)["input_ids"] for d in DOCS])
    bank = model.memorize(DOCS)
    model.save_pretrained(tmp_path / "m", include_base_model=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded.reader) is type(model.reader) and loaded.reader.model is loaded
    questions = ["Where does the red fox live?"]
    assert loaded.answer(questions, memory_bank=bank, max_new_tokens=3) == \
        model.answer(questions, memory_bank=bank, max_new_tokens=3)
