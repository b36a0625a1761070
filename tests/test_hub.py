"""Hub-ready folders (mbc_hf.hub): save_pretrained(memory_bank=...), the model card, load_memory_bank, push_to_hub.

The upload tests run `push_to_hub` unchanged against `hub_server.LoopbackHub`, a Hub stand-in on 127.0.0.1 that
implements the requests huggingface_hub 2.4 sends for create_repo + upload_folder: once with every file inline
("regular" upload mode, the default client with hf_xet installed) and once with ``*.safetensors`` as git-LFS
objects (basic LFS transfer, hf_xet disabled). Not covered: the Xet storage protocol the real Hub uses for LFS
files when hf_xet is installed, and downloading a bank back from a Hub repo (hf_hub_download).
"""
import json
import re
import warnings

import datasets
import pytest
import torch
import yaml
from hub_server import LoopbackHub, same_files
from transformers import AutoModelForCausalLM

import mbc_hf  # noqa: F401  (Auto classes)
from mbc_hf.hub import MEMORY_BANK_FILE, folder_files, load_memory_bank
from mbc_hf.memory_bank import CompressedMemoryBank, DenseMemoryBank
from mbc_hf.testing import tiny_mbc_model
from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments

DOCS = ["The cat sat on the mat.", "Paris is the capital of France.", "Room 5 holds painting 55."]
ROWS = [dict(doc_id=f"d{i}", context=f"Fact {i}: the code of room {i} is {i * 7}.",
             question=f"What is the code of room {i}?", answers=[str(i * 7)], question_id=f"q{i}") for i in range(6)]


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, flags=re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny model whose card metrics come from a real MBCTrainer.evaluate, and a bank of DOCS."""
    model = tiny_mbc_model(seed=0)
    args = MBCTrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), per_device_eval_batch_size=3,
                                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                memory_gain_questions=6)
    metrics = MBCTrainer(model=model, args=args, eval_dataset=datasets.Dataset.from_list(ROWS)).evaluate()
    model.eval()
    return model, metrics, model.memorize(DOCS)


def test_saved_folder_has_hub_files_card_metrics_and_bank_stats(tmp_path, evaluated):
    model, metrics, bank = evaluated
    assert model.eval_metrics == metrics and "eval_memory_gain" in metrics
    model.save_pretrained(tmp_path, memory_bank=bank,
                          model_card_kwargs={"training_data": "`rooms.jsonl` (6 questions)", "license": "mit"})
    files = folder_files(tmp_path)
    for name in ("config.json", "model.safetensors", "kv_lora/adapter_config.json", "kv_lora/adapter_model.safetensors",
                 "modeling_mbc.py", "hub.py", "memory_bank.py", "tokenizer.json", "encoder_tokenizer/tokenizer.json",
                 MEMORY_BANK_FILE, "README.md"):
        assert name in files, name
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"
    assert json.loads(files["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_mbc.MBCModelForCausalLM"

    card = files["README.md"].decode()
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "transformers" and "mbc" in meta["tags"]
    for key, value in metrics.items():  # the real numbers of the last evaluation
        assert f"| {key} | {value:.4g} |" in card
    codes = bank.codes.long()
    counts = torch.bincount(codes.flatten(), minlength=128).double()
    p = counts[counts > 0] / counts.sum()
    for row in (f"| documents | {len(DOCS)} |", f"| bytes | {bank.nbytes} |",
                f"| bytes per document | {bank.nbytes / len(DOCS):.1f} |",
                f"| distinct codes used | {len(codes.unique())} |",
                f"| code usage perplexity | {float(torch.exp(-(p * p.log()).sum())):.1f} |",
                f"| codebook fingerprint | `{model.codebook.fingerprint()}` |", "| stored as | `uint8` |"):
        assert row in card, row
    assert "Training data: `rooms.jsonl` (6 questions)" in card
    assert "A frozen causal LM (llama)" in card and "amortization network (bert)" in card
    assert "model.load_memory_bank()" in card

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = loaded.load_memory_bank()  # from where the model was loaded, checked against its codebook
    assert isinstance(again, CompressedMemoryBank) and again.doc_ids == bank.doc_ids
    assert torch.equal(again.codes, bank.codes)
    assert loaded.answer(["Where is Paris?"], memory_bank=again, max_new_tokens=4) == \
        model.answer(["Where is Paris?"], memory_bank=bank, max_new_tokens=4)


def test_a_bank_of_another_codebook_is_refused(tmp_path, evaluated):
    model, _, _ = evaluated
    other = tiny_mbc_model(seed=1).eval()
    foreign = other.memorize(DOCS)
    with pytest.raises(ValueError, match="codebook"):
        model.save_pretrained(tmp_path / "a", memory_bank=foreign)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    model.save_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="without a memory bank"):
        load_memory_bank(tmp_path / "b")
    other.save_pretrained(tmp_path / "c", memory_bank=foreign)
    with pytest.raises(ValueError, match="codebook"):
        load_memory_bank(tmp_path / "c", model=model)
    assert load_memory_bank(tmp_path / "c" / MEMORY_BANK_FILE, model=other).doc_ids == foreign.doc_ids
    with pytest.raises(ValueError, match="no bank location"):
        model.load_memory_bank()  # built in memory: no folder to read from
    with pytest.raises(FileNotFoundError):
        load_memory_bank(tmp_path / "missing")


def test_resaving_keeps_describing_a_fitting_bank_and_warns_about_a_stale_one(tmp_path, evaluated):
    model, _, bank = evaluated
    model.save_pretrained(tmp_path, memory_bank=bank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path)  # same codebook: the bank stays and the card still lists it
    assert f"| documents | {len(DOCS)} |" in (tmp_path / "README.md").read_text()
    with pytest.warns(UserWarning, match=MEMORY_BANK_FILE):
        tiny_mbc_model(seed=1).save_pretrained(tmp_path)  # another codebook: the old bank is stale
    assert "Memory bank shipped" not in (tmp_path / "README.md").read_text()


def test_dense_bank_round_trip(tmp_path, evaluated):
    model, _, _ = evaluated
    dense = model.memorize(DOCS, compress=False)
    model.save_pretrained(tmp_path, memory_bank=dense)
    loaded = load_memory_bank(tmp_path, model=model)
    assert isinstance(loaded, DenseMemoryBank) and loaded.doc_ids == dense.doc_ids
    assert torch.equal(loaded.vectors, dense.vectors)
    card = (tmp_path / "README.md").read_text()
    assert "| kind | dense |" in card and "| vector size (d) | 32 |" in card


# huggingface_hub's LFS upload (huggingface_hub/lfs.py: http_backoff("PUT", ..., data=fileobj)) passes raw bytes as
# data=, which httpx deprecates; the call is the library's, not ours: ignored here only
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes/text content:DeprecationWarning")
@pytest.mark.parametrize("mode", ["inline", "lfs"])
def test_push_to_hub_uploads_exactly_the_saved_folder(tmp_path, monkeypatch, evaluated, mode):
    import huggingface_hub.constants as hf_constants

    model, _, bank = evaluated
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # CI sets it; the server is on 127.0.0.1
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", mode == "lfs")  # LFS basic transfer instead of Xet
    with LoopbackHub(lfs_suffixes=(".safetensors",) if mode == "lfs" else ()) as hub:
        info = model.push_to_hub("alice/mbc-tiny", memory_bank=bank, endpoint=hub.endpoint, token="hf_test",
                                 private=True, commit_message="Add MBC model",
                                 model_card_kwargs={"training_data": "rooms"})
        model.push_to_hub("alice/mbc-tiny", endpoint=hub.endpoint, token="hf_test")  # existing repo: a 2nd commit
    repo = hub.repos["alice/mbc-tiny"]
    assert repo["private"] and repo["commits"] == ["Add MBC model", "Upload MBC model"]
    assert hub.auth == {"Bearer hf_test"} and hub.unexpected == []
    assert info.oid and info.commit_url.startswith(hub.endpoint)
    lfs_puts = [p for m, p in hub.requests if m == "PUT"]
    assert len(lfs_puts) == (3 if mode == "lfs" else 0)  # model, adapter, bank; the 2nd push finds them stored
    assert "/api/validate-yaml" in [p for _, p in hub.requests]  # the card's front matter passed validation

    model.save_pretrained(tmp_path, memory_bank=bank,
                          model_card_kwargs={"model_id": "alice/mbc-tiny", "training_data": "rooms"})
    uploaded = repo["files"]
    # the 2nd push wrote no bank: the bank from the 1st commit stays, the card of the 2nd one lists none
    card_files = ("README.md", "model_card_data.json")
    same_files({k: v for k, v in uploaded.items() if k not in card_files},
               {k: v for k, v in folder_files(tmp_path).items() if k not in card_files})
    assert "training_data" not in json.loads(uploaded["model_card_data.json"])  # the 2nd push passed none
    assert 'from_pretrained("alice/mbc-tiny")' in uploaded["README.md"].decode()
    (tmp_path / "hub-bank.safetensors").write_bytes(uploaded[MEMORY_BANK_FILE])
    assert load_memory_bank(tmp_path / "hub-bank.safetensors", model=model).doc_ids == bank.doc_ids


def test_push_to_hub_card_and_files_of_one_push(tmp_path, monkeypatch, evaluated):
    import huggingface_hub.constants as hf_constants

    model, _, bank = evaluated
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with LoopbackHub() as hub:
        model.push_to_hub("bob/one", memory_bank=bank, endpoint=hub.endpoint, token="hf_test")
    model.save_pretrained(tmp_path, memory_bank=bank, model_card_kwargs={"model_id": "bob/one"})
    same_files(hub.repos["bob/one"]["files"], folder_files(tmp_path))  # README included, byte for byte


def test_push_to_hub_checks_the_bank_before_touching_the_hub(monkeypatch, evaluated):
    import huggingface_hub.constants as hf_constants

    model, _, _ = evaluated
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    foreign = tiny_mbc_model(seed=1).eval().memorize(DOCS)
    with LoopbackHub() as hub:
        with pytest.raises(ValueError, match="codebook"):
            model.push_to_hub("alice/bad", memory_bank=foreign, endpoint=hub.endpoint, token="hf_test")
    assert hub.requests == [] and hub.repos == {}
