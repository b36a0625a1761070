"""The reference recipes (`mbc_hf.presets`) build tiny models of each backbone family, and examples/train_preset.py
trains one with the preset's training arguments (command-line options win)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mbc_hf.presets import PRESETS, preset
from mbc_hf.testing import tiny_mbc_model
from mbc_hf.trainer import MBCTrainingArguments

FAMILY = {"distilgpt2": "gpt2", "gpt2-large": "gpt2", "gpt2-xl": "gpt2", "llama-2-7b": "llama"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_builds_a_tiny_model_of_its_family_that_trains_and_answers(name, tmp_path):
    recipe = preset(name)
    config = dict(recipe["config"], kv_lora_layers=4)  # the tiny LM has 4 layers
    model = tiny_mbc_model(base=FAMILY[name], encoder="t5", **config)
    assert model.config.num_context_tokens == (12 if name == "distilgpt2" else 24)
    assert model.config.kv_lora_r == (16 if name == "distilgpt2" else 32) == model.config.kv_lora_alpha // 2
    assert model.config.codebook_size == 512 and model.config.prefix_length == 2
    assert len(model.aggregator.blocks) == 4 and model.aggregator.blocks[0].heads == 8
    args = MBCTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **recipe["training"])
    assert args.learning_rate == 1e-5 and args.max_grad_norm == 100 and args.num_train_epochs == 50
    docs = ["The cat sat on the mat.", "Paris is the capital of France."]
    from mbc_hf.trainer import MBCDataCollator

    batch = MBCDataCollator(model)([dict(doc_id=f"d{i}", context=d, question="What?", answers=["x"])
                                    for i, d in enumerate(docs)])
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    generation = dict(recipe["generation_offline"], max_new_tokens=3)
    assert recipe["generation"]["num_beams"] == 12 and recipe["generation"]["num_beam_groups"] == 4
    assert len(model.eval().answer(["Where is Paris?"], memory_bank=model.memorize(docs), **generation)) == 1


def test_an_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="distilgpt2"):
        preset("gpt5")


@pytest.mark.slow  # a subprocess that imports torch (issue 37: the fast tier skips it)
def test_train_preset_example_applies_the_preset_and_lets_the_command_line_win(tmp_path):
    from test_cli import write_paragraphs

    write_paragraphs(tmp_path / "train.jsonl", n=4)
    script = Path(__file__).resolve().parents[1] / "examples" / "train_preset.py"
    out = subprocess.run([sys.executable, str(script), "--preset", "distilgpt2", "--base_model", "tiny-gpt2",
                          "--train_file", str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "run"),
                          "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
                          "--save_strategy", "no"], capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                              "HOME": str(tmp_path)}, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    saved = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert saved["learning_rate"] == 1e-5 and saved["gradient_accumulation_steps"] == 4  # from the preset
    assert saved["per_device_train_batch_size"] == 2  # given on the command line
    assert json.loads((tmp_path / "run" / "config.json").read_text())["num_context_tokens"] == 12
