"""One argument schema for training: `ModelArguments`, `DataArguments` and `mbc_hf.trainer.MBCTrainingArguments`,
parsed by `transformers.HfArgumentParser` for both ``mbc-hf train`` and ``examples/run_mbc_qa.py``.

Every field is an option in either spelling (``--max_steps`` / ``--max-steps``), and a JSON or YAML file with any of
them replaces the command line (``mbc-hf train config.yaml``), as in transformers' example scripts. ``--help`` shows
the options most runs need (`SHOWN`); ``--help-all`` shows every field, research knobs included: this module and
``--help-all`` are the one place they are documented.

Defaults are the embedded default's training recipe (`TRAIN_DEFAULTS`, which differ from `TrainingArguments`' own
where MBC needs it: learning rate, warmup, CPU, ...); after parsing, `resolve` fills the ones that depend on the
codebook (KV-LoRA learning rate, reading retrieved documents) and the evaluation schedule.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

from .trainer import MBCTrainingArguments


@dataclass
class ModelArguments:
    """The model to train: a saved one to continue from, or a new one built from a base LM (and an encoder)."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A saved MBC model (folder or Hub id) to continue from; otherwise a new one is built from "
                "--base-model and --encoder."})
    base_model: str = field(default="embedded", metadata={
        "help": "'embedded' (SmolLM2-135M-Instruct, from PyPI), a local path or Hub id of a causal LM, or "
                "'tiny' / 'tiny-gpt2' (random tiny models, for tests)."})
    encoder: str = field(default="embedded", metadata={
        "help": "'embedded' (all-MiniLM-L6-v2), a local path or Hub id of an encoder (BERT-like or T5), or "
                "'tiny-bert' / 'tiny-t5'; unused by the vocabulary codebook."})
    codebook_type: Literal["vocabulary", "learned"] = field(default="vocabulary", metadata={
        "help": "'vocabulary' (default; not in the paper): a document's codes are T of its LM tokens, picked by a "
                "selector trained on the training questions, read by the LM (KV-LoRA) from the documents that "
                "addressing picks. 'learned': the paper's VQ codebook (K=512) read through the aggregator."})
    num_context_tokens: int | None = field(default=None, metadata={
        "help": "T, codes per document (default: 48 with the vocabulary codebook, 12 with the learned one)."})
    read_documents: int | None = field(default=None, metadata={
        "help": "Vocabulary codebook: documents of the bank each question reads (default 3)."})
    addressing_key: Literal["minilm-binary"] | None = field(default=None, metadata={
        "help": "Vocabulary codebook: also store a 48-byte compact key per document (the sign bits of its "
                "all-MiniLM-L6-v2 embedding) and address by its score fused with the lexical one "
                "(MBCConfig.addressing_key; off by default)."})
    kv_lora_layers: int | None = field(default=None, metadata={
        "help": "KV-LoRA on the last N layers (default: all with the vocabulary codebook, 6 with the learned one)."})
    aggregation: Literal["histogram", "dense", "topk"] | None = field(default=None, metadata={
        "help": "Learned codebook: how a bank is read; 'topk' builds learned addressing (each question reads its "
                "--topk-documents best documents; not in the paper)."})
    topk_documents: int | None = field(default=None, metadata={"help": "k of --aggregation topk (default 1)."})
    addressing_codes: int | None = field(default=None, metadata={
        "help": "--aggregation topk: a document's key reads only its first N codes (default 0: all), leaving the "
                "others to the QA loss (MBCConfig.addressing_codes)."})
    # research knobs (--help-all): the code choice of the vocabulary codebook
    code_selector: Literal["idf", "trained"] | None = field(default=None, metadata={
        "help": "Vocabulary codebook: codes by IDF or by the trained token scorer (default: trained)."})
    code_order: Literal["importance", "document"] | None = field(default=None, metadata={
        "help": "Vocabulary codebook: codes best first or in document order (default: document)."})
    whole_words: bool = field(default=False, metadata={"help": "Vocabulary codebook: select whole words."})
    # research knobs of the learned codebook (MBC §3; the extra losses are not in the paper)
    train_encoders: bool = field(default=False, metadata={
        "help": "Learned codebook: also train the encoder backbones (the paper does; ~3x slower per CPU step)."})
    codebook_dim: int = field(default=32, metadata={
        "help": "Learned codebook: factorized l2-normalised codes of this size (0 = the paper's d-dim codebook)."})
    no_vq: bool = field(default=False, metadata={
        "help": "Learned codebook: train with the VQ bypassed (MAC-style float memory, an ablation; the model's "
                "banks are then uncompressed)."})
    freeze_amortization: bool = field(default=False, metadata={
        "help": "Learned codebook: keep the amortization network (document side) fixed."})
    prefix_mode: Literal["generator", "soft_tokens"] | None = field(default=None, metadata={
        "help": "Learned codebook: prefix key/values from the paper's generator or from soft tokens run through "
                "the LM (default: generator)."})
    prefix_length: int | None = field(default=None, metadata={
        "help": "Learned codebook: prefix key/values per layer (default 2)."})
    code_entropy_weight: float | None = field(default=None, metadata={
        "help": "Learned codebook: codebook entropy loss weight (default 0)."})
    dead_code_steps: int | None = field(default=None, metadata={
        "help": "Learned codebook: online resetting re-seeds a code that no vector picked in this many training "
                "forwards (MBC §3.3 per step; default 100)."})
    codebook_backend: Literal["mbc", "vector-quantize-pytorch"] | None = field(default=None, metadata={
        "help": "Learned codebook: 'mbc' (the paper's: codes trained by the codebook loss, online resetting) or "
                "'vector-quantize-pytorch' (lucidrains' library: EMA codes, rotation trick; pip install "
                "vector-quantize-pytorch) (default: mbc)."})
    reconstruction_weight: float | None = field(default=None, metadata={
        "help": "Learned codebook: weight of the auxiliary reconstruction loss (default 0.5; 0 = off)."})
    reconstruction_length: int = field(default=32, metadata={"help": "Document tokens of the reconstruction loss."})
    contrastive_weight: float = field(default=0.0, metadata={
        "help": "Learned codebook: weight of the memory-contrastive hinge (answer NLL without the gold document "
                "minus with it, up to a margin)."})
    contrastive_margin: float = field(default=0.5, metadata={"help": "Its margin (nats per answer token)."})
    distillation_weight: float = field(default=0.0, metadata={
        "help": "Learned codebook: weight of context distillation (KL from the base LM with the gold document in "
                "context to the LM reading the memory)."})


@dataclass
class DataArguments:
    """What to train and evaluate on (any layout `mbc_hf.data.load_qa_file` reads), and what to ship."""

    train_file: list[str] | None = field(default=None, metadata={
        "help": "QA file(s): SQuAD JSON, paragraph JSONL, StreamingQA/ArchivalQA CSV/JSONL; several are "
                "concatenated in the order given."})
    validation_file: str | None = field(default=None, metadata={
        "aliases": ["--eval-file"], "help": "QA file to evaluate on (default: --eval-docs documents "
                                                           "held out of the train file)."})
    max_train_documents: int | None = field(default=None, metadata={
        "aliases": ["--downsample-to"],
        "help": "Keep the questions of the first N documents of the train file (file order)."})
    max_eval_documents: int | None = field(default=None, metadata={
        "help": "Keep the questions of the first N documents of the validation file (default: --eval-docs)."})
    eval_docs: int = field(default=32, metadata={
        "help": "Without --validation-file: hold out N train documents (spread over the file) for the memory gain "
                "(0 = none)."})
    save_memory_bank: bool = field(default=False, metadata={
        "help": "Ship the bank of the final online evaluation (needs --eval_max_questions > 0) as "
                "memory_bank.safetensors with the saved model."})
    license: str = field(default="apache-2.0", metadata={"help": "Licence written into the model card."})


@dataclass
class DemoArguments:
    """``mbc-hf demo``: the main job on the embedded default (short meta-training, adapt, answer)."""

    dev_file: str | None = field(default=None, metadata={
        "help": "QA file whose documents stream into the bank (default: the shared SQuAD dev part)."})
    dev_docs: int = field(default=200, metadata={"help": "Dev documents streamed into the bank."})
    questions_per_doc: int = field(default=1, metadata={"help": "Questions answered per dev document (0 = all)."})
    output: str | None = field(default=None, metadata={
        "help": "The demo's JSON report (default: OUTPUT_DIR/demo.json)."})
    no_pretrained: bool = field(default=False, metadata={
        "help": "Answer with this run's short training only, not with the reader shipped in the package."})


# the demo's training is budgeted in optimizer steps, not minutes, so that its table does not depend on the machine's
# load (35 steps took about 4 minutes on 2 quiet cores); it saves no checkpoint (only demo.json is written)
DEMO_DEFAULTS = dict(output_dir="outputs/demo", max_steps=35, max_minutes=None, eval_steps=100, save_strategy="no",
                     eval_strategy="no", disable_tqdm=False)

# the embedded default's recipe, where it differs from TrainingArguments' defaults (used by the CLI and the example)
TRAIN_DEFAULTS = dict(output_dir="outputs/mbc", learning_rate=5e-4, encoder_learning_rate=5e-5, num_train_epochs=1.0,
                      warmup_steps=50, lr_scheduler_type="constant_with_warmup", logging_steps=25, save_steps=250,
                      eval_steps=250, eval_strategy="steps", save_total_limit=2, seed=42, report_to="none",
                      use_cpu=True, read_retrieved=True, disable_tqdm=not sys.stderr.isatty())
SHOWN = ("train_file", "validation_file", "output_dir", "model_name_or_path", "base_model", "encoder",
         "codebook_type", "num_context_tokens", "read_documents", "kv_lora_layers", "max_steps", "num_train_epochs",
         "max_minutes", "per_device_train_batch_size", "learning_rate", "lora_learning_rate", "eval_docs",
         "max_train_documents", "resume", "seed")
SCHEMA = (ModelArguments, DataArguments, MBCTrainingArguments)
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


class _OneDefaultFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after an option's help, unless the help names its default itself (one default per option)
    or the default is None / False (nothing to say)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class TrainParser(HfArgumentParser):
    """`HfArgumentParser` whose ``--help`` lists only the options named in ``shown`` (all of them when ``shown`` is
    None), and which records the destination of every option it defines (``dests``, for config files)."""

    def __init__(self, dataclass_types, shown: set[str] | None = None, **kwargs):
        self.shown, self.dests = shown, set()  # (set before HfArgumentParser adds the dataclasses' options)
        super().__init__(dataclass_types, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.dests.add(action.dest)
        if self.shown is not None and action.dest not in self.shown | {"help", "help_all"}:
            action.help = argparse.SUPPRESS
        return action


def train_parser(prog: str | None = None, extra: tuple = (), show_all: bool = False, description: str | None = None,
                 **defaults) -> TrainParser:
    """The `TrainParser` of `SCHEMA` (+ ``extra`` dataclasses) with `TRAIN_DEFAULTS` and ``defaults``; its
    ``--help`` lists `SHOWN` (every field with ``show_all``)."""
    description = description or ("Meta-train an MBC model (MBCTrainer) on QA file(s), or on one JSON/YAML config "
                                  "file of these options.")
    shown = None if show_all else set(SHOWN) | {f.name for cls in extra for f in fields(cls)}
    parser = TrainParser(SCHEMA + tuple(extra), shown, prog=prog, description=description,
                         epilog="Every other field (research knobs, all of TrainingArguments): --help-all.",
                         formatter_class=_OneDefaultFormatter)
    parser.add_argument("--help-all", action="store_true", help="show every option and exit")
    parser.set_defaults(**{**TRAIN_DEFAULTS, **defaults})
    return parser


def config_file_argv(parser: TrainParser, path: str) -> list[str]:
    """A JSON or YAML config file -> the command line it stands for, so that its values go through the same type
    conversion as typed options (a file and the same options typed give the same arguments).

    Raises:
        ValueError: the file is not one mapping, or a key is no option (named, with the fix).
    """
    text = Path(path).read_text()
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds one mapping of option names to values, got "
                         f"{type(values).__name__}.")
    unknown = sorted(set(values) - parser.dests)
    if unknown:
        raise ValueError(f"{path}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an option of "
                         f"{parser.prog}; see {parser.prog} --help-all for the names (with underscores).")
    argv = []
    for key, value in values.items():
        if value is None:
            continue  # None is every optional field's default
        items = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in items)]
    return argv


def parse_train_args(argv: list[str], prog: str | None = None, extra: tuple = (), description: str | None = None,
                     **defaults) -> tuple:
    """Parse a training command line, or a single JSON/YAML config file, into (`ModelArguments`, `DataArguments`,
    `MBCTrainingArguments`, *``extra``), with `resolve` applied.

    Raises:
        ValueError: a config file that is not a mapping, or with a key that is no option (`config_file_argv`).
        SystemExit: argparse errors, ``--help`` and ``--help-all``.
    """
    argv = list(argv)
    show_all = "--help-all" in argv
    parser = train_parser(prog, extra, show_all, description, **defaults)
    if show_all:
        parser.print_help()
        raise SystemExit(0)
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        argv = config_file_argv(parser, argv[0])
    namespace = parser.parse_args(argv)
    resolve(namespace)
    out = []
    for cls in SCHEMA + tuple(extra):
        names = {f.name for f in fields(cls) if f.init}
        out.append(cls(**{k: v for k, v in vars(namespace).items() if k in names}))
    return tuple(out)


def resolve(namespace) -> None:
    """The defaults that depend on other options (in place on the parsed namespace): KV-LoRA's learning rate (1e-3
    with the vocabulary codebook, 1e-4 with the learned one), reading retrieved documents (vocabulary codebook only)
    and no evaluation schedule when nothing is held out."""
    vocabulary = namespace.codebook_type == "vocabulary"
    if namespace.lora_learning_rate is None:
        namespace.lora_learning_rate = 1e-3 if vocabulary else 1e-4
    namespace.read_retrieved = bool(namespace.read_retrieved) and vocabulary
    if not namespace.validation_file and not namespace.eval_docs:
        namespace.eval_strategy = "no"
