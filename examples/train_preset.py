"""Meta-train the paper's model with a reference recipe (`mbc_hf.presets`), e.g. on a GPU:

    accelerate launch examples/train_preset.py --preset gpt2-large --train_file squad_train.jsonl \\
        --validation_file squad_val.jsonl --output_dir runs/gpt2-large

The preset gives the backbones (Hub ids: the first run downloads them), the `MBCConfig` fields and the
`MBCTrainingArguments` of the reference code; any `MBCTrainingArguments` option given here overrides the preset's.
``--base_model`` / ``--encoder`` / ``--question_encoder`` swap a backbone (``tiny`` for a smoke test on a CPU).
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from mbc_hf.data import load_qa_file
from mbc_hf.presets import PRESETS, preset
from mbc_hf.trainer import MBCTrainer, MBCTrainingArguments


@dataclass
class PresetArguments:
    preset: str = field(metadata={"help": f"one of {sorted(PRESETS)}"})
    train_file: str = field(metadata={"help": "QA file for training (any layout `load_qa_file` reads)"})
    validation_file: str | None = field(default=None, metadata={"help": "QA file for the memory gain"})
    base_model: str | None = field(default=None, metadata={"help": "override the preset's base LM"})
    encoder: str | None = field(default=None, metadata={"help": "override the preset's document encoder"})
    question_encoder: str | None = field(default=None, metadata={"help": "override the preset's question encoder"})


def main(argv=None):
    run, rest = HfArgumentParser(PresetArguments).parse_args_into_dataclasses(
        sys.argv[1:] if argv is None else argv, return_remaining_strings=True)
    recipe = preset(run.preset)
    training = HfArgumentParser(MBCTrainingArguments)
    training.set_defaults(**recipe["training"])  # the preset's settings, unless given on the command line
    (args,) = training.parse_args_into_dataclasses(rest)
    base, encoder = run.base_model or recipe["base_model"], run.encoder or recipe["encoder"]
    if base.startswith("tiny"):
        from mbc_hf.testing import tiny_mbc_model

        config = dict(recipe["config"], kv_lora_layers=min(recipe["config"]["kv_lora_layers"], 4))
        model = tiny_mbc_model(base="gpt2" if base == "tiny-gpt2" else "llama", encoder="t5", **config)
    else:
        from mbc_hf.factory import build_model

        model = build_model(base, encoder, question_encoder=run.question_encoder or recipe["question_encoder"],
                            **recipe["config"])
    train = load_qa_file(run.train_file)
    evaluation = load_qa_file(run.validation_file) if run.validation_file else None
    trainer = MBCTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
