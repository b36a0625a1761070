"""One argument schema (mbc_hf.arguments): `mbc-hf train` and examples/run_mbc_qa.py parse the same options and config
files to the same dataclasses, a config file means what the same options typed mean, and --help stays short."""

import importlib.util
import json
from pathlib import Path

import pytest

from mbc_hf.arguments import SHOWN, DataArguments, ModelArguments, parse_train_args
from mbc_hf.cli import main
from mbc_hf.trainer import MBCTrainingArguments

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "run_mbc_qa.py"
CONFIG = {"train_file": ["a.jsonl", "b.jsonl"], "validation_file": "dev.jsonl", "base_model": "tiny",
          "encoder": "tiny-bert", "codebook_type": "learned", "aggregation": "topk", "no_vq": False,
          "max_steps": 7, "per_device_train_batch_size": 4, "learning_rate": 0.002, "gold_only_steps": 3,
          "max_minutes": 1.5, "contrastive_weight": 0.25, "output_dir": "out", "seed": 5}


def example_parse(argv):
    spec = importlib.util.spec_from_file_location("run_mbc_qa", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


def as_dicts(parsed):
    model, data, training = parsed
    assert (type(model), type(data), type(training)) == (ModelArguments, DataArguments, MBCTrainingArguments)
    return vars(model), vars(data), training.to_dict()


def cli_parse(argv, monkeypatch):
    """The arguments `mbc-hf train` parses from ``argv`` (its run is stopped right after parsing)."""
    import mbc_hf.arguments

    seen = []

    def stop(*args, **kwargs):
        seen.append(parse(*args, **kwargs))
        raise SystemExit(0)

    parse = mbc_hf.arguments.parse_train_args
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        patch.setattr(mbc_hf.arguments, "parse_train_args", stop)
        main(["train", *argv])
    return seen[0]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_cli_and_example_parse_one_config_file_to_the_same_arguments(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"config{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(CONFIG))
    else:
        import yaml

        path.write_text(yaml.safe_dump(CONFIG))
    from_cli, from_example = as_dicts(cli_parse([str(path)], monkeypatch)), as_dicts(example_parse([str(path)]))
    assert from_cli == from_example
    model, data, training = from_cli
    assert (model["codebook_type"], model["aggregation"], model["contrastive_weight"]) == ("learned", "topk", 0.25)
    assert data["train_file"] == ["a.jsonl", "b.jsonl"] and data["validation_file"] == "dev.jsonl"
    assert training["max_steps"] == 7 and training["per_device_train_batch_size"] == 4
    assert training["learning_rate"] == 0.002 and training["max_minutes"] == 1.5 and training["seed"] == 5
    assert training["lora_learning_rate"] == 1e-4 and training["read_retrieved"] is False  # resolved: learned


def test_a_config_file_means_what_the_same_options_typed_mean(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    typed = []
    for key, value in CONFIG.items():
        typed += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    assert as_dicts(parse_train_args([str(path)])) == as_dicts(parse_train_args(typed))


def test_the_old_option_names_still_parse_and_defaults_follow_the_codebook():
    model, data, training = parse_train_args(["--train-file", "t.jsonl", "--batch-size", "2", "--epochs", "2",
                                              "--eval-file", "d.jsonl", "--downsample-to", "9", "--no-vq",
                                              "--codebook-type", "learned"])
    assert (training.per_device_train_batch_size, training.num_train_epochs) == (2, 2.0)
    assert (data.validation_file, data.max_train_documents, model.no_vq) == ("d.jsonl", 9, True)
    _, _, vocabulary = parse_train_args(["--train-file", "t.jsonl"])
    assert vocabulary.lora_learning_rate == 1e-3 and vocabulary.read_retrieved is True
    assert vocabulary.learning_rate == 5e-4 and vocabulary.use_cpu is True  # the recipe, not TrainingArguments'
    _, _, no_eval = parse_train_args(["--train-file", "t.jsonl", "--eval-docs", "0"])
    assert no_eval.eval_strategy == "no"  # nothing held out, no validation file: no evaluation schedule


def test_a_config_file_with_an_unknown_key_names_it_and_the_fix(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train_file: [a.jsonl]\nbatchsize: 4\n")
    with pytest.raises(ValueError, match=r"batchsize is not an option.*--help-all"):
        parse_train_args([str(path)])
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="one mapping"):
        parse_train_args([str(path)])


def test_help_shows_the_options_a_user_needs_and_help_all_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    short = capsys.readouterr().out
    shown = {line.split()[0] for line in short.splitlines() if line.startswith("  --")}
    assert len(shown) <= len(SHOWN) + 1 <= 21 and "--train_file" in shown and "--help-all" in shown
    assert "--contrastive_weight" not in short and "--adam_beta1" not in short
    with pytest.raises(SystemExit):
        main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert "--contrastive_weight" in full and "--adam_beta1" in full and "--gold_only_steps" in full


def test_cli_train_without_training_data_says_how_to_give_it(capsys):
    with pytest.raises(SystemExit, match="--train-file"):
        main(["train", "--base-model", "tiny"])
