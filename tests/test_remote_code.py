"""A saved folder loads with trust_remote_code=True in a process where `import mbc_hf` fails, and answers the same."""
import json
import subprocess
import sys
import textwrap

import pytest

from mbc_hf.testing import tiny_mbc_model

DOCS = ["The cat sat on the mat.", "Paris is the capital of France."]
QUESTIONS = ["Where is Paris?", "Where did the cat sit?"]


@pytest.mark.slow  # a subprocess that imports torch (issue 37: the fast tier skips it)
@pytest.mark.parametrize("base, codebook_type", [("llama", "learned"), ("gpt2", "learned"),
                                                  ("llama", "vocabulary")])
def test_trust_remote_code_without_mbc_hf(tmp_path, base, codebook_type):
    model = tiny_mbc_model(base=base, seed=3, codebook_type=codebook_type).eval()
    if codebook_type == "vocabulary":  # its IDF is saved with the model (vocabulary_codebook.py ships too)
        model.codebook.fit([model.tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS])
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mbc.MBCModelForCausalLM"
    expected = model.answer(QUESTIONS, memory_bank=model.memorize(DOCS), max_new_tokens=5)
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["mbc_hf"] = None          # `import mbc_hf` now raises ImportError
        try:
            import mbc_hf
            raise SystemExit("mbc_hf importable")
        except ImportError:
            pass
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        print(json.dumps(m.answer({QUESTIONS!r}, memory_bank=m.memorize({DOCS!r}), max_new_tokens=5)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                            "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


@pytest.mark.slow  # a subprocess that imports torch (issue 37: the fast tier skips it)
def test_trust_remote_code_reads_the_shipped_memory_bank(tmp_path):
    """save_pretrained(memory_bank=...) -> a process without mbc_hf loads the model with trust_remote_code=True,
    gets the bank back with model.load_memory_bank() (remote copy of mbc_hf.hub) and answers as the original."""
    model = tiny_mbc_model(seed=5).eval()
    bank = model.memorize(DOCS)
    model.save_pretrained(tmp_path / "model", memory_bank=bank)
    expected = model.answer(QUESTIONS, memory_bank=bank, max_new_tokens=5)
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["mbc_hf"] = None          # `import mbc_hf` now raises ImportError
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        bank = m.load_memory_bank()
        assert type(bank).__module__.startswith("transformers_modules"), type(bank).__module__
        print(json.dumps({{"doc_ids": bank.doc_ids, "codes": bank.codes.tolist(),
                          "answers": m.answer({QUESTIONS!r}, memory_bank=bank, max_new_tokens=5)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                            "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["doc_ids"] == bank.doc_ids and got["codes"] == bank.codes.tolist()
    assert got["answers"] == expected
