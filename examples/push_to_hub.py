#!/usr/bin/env python
"""Push a saved MBC model (and optionally a memory bank) to the Hugging Face Hub.

    python examples/push_to_hub.py --model_name_or_path runs/mbc-qa --repo_id you/mbc-squad \\
        --memory_bank bank.safetensors --private

    python examples/push_to_hub.py --model_name_or_path runs/mbc-qa --dry-run --output_dir hub-folder
        # only builds the folder that would be uploaded, and lists it

The model is loaded and saved again with ``save_pretrained`` (weights, KV-LoRA adapter, tokenizers, modeling code
for ``trust_remote_code``, ``memory_bank.safetensors``, model card) into a temporary folder, which is uploaded with
``HfApi.create_repo`` + ``upload_folder`` (`mbc_hf.hub.push_to_hub`). The card keeps the metrics, training data and
licence recorded in the model folder (``model_card_data.json``) unless overridden here. The bank defaults to the
one saved in the model folder (``--no_memory_bank`` leaves it out). The token comes from ``--token``,
``HF_TOKEN`` or ``hf auth login``; ``--endpoint`` points at another Hub (default ``HF_ENDPOINT``).
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

import mbc_hf  # noqa: F401  (registers the Auto classes)
from mbc_hf.cli import load_model
from mbc_hf.hub import MEMORY_BANK_FILE, folder_files, load_memory_bank, load_model_card_data


@dataclass
class PushArguments:
    model_name_or_path: str = field(metadata={"help": "A saved MBC model folder."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repo, 'user/name' (not needed with --dry-run)."})
    memory_bank: str | None = field(default=None, metadata={
        "help": "A bank (.safetensors) to ship; default: the model folder's memory_bank.safetensors if any."})
    no_memory_bank: bool = field(default=False, metadata={"help": "Ship no bank."})
    dry_run: bool = field(default=False, metadata={"help": "Only build the folder (in --output_dir) and list it."})
    output_dir: str | None = field(default=None, metadata={"help": "Where --dry-run writes the folder."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (new repos only; default: the "
                                                           "account's default visibility)."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / saved login)."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub address (default: HF_ENDPOINT / the Hub)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to commit to."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    commit_message: str = field(default="Upload MBC model", metadata={"help": "Commit message."})
    license: str | None = field(default=None, metadata={"help": "Card licence (default: as recorded, apache-2.0)."})
    training_data: str | None = field(default=None, metadata={"help": "Card text naming the training data."})


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    if args.dry_run and not args.output_dir:
        raise SystemExit("--dry-run needs --output_dir")
    if not args.dry_run and not args.repo_id:
        raise SystemExit("--repo_id is required (or pass --dry-run)")
    model = load_model(args.model_name_or_path)
    card = load_model_card_data(args.model_name_or_path) if Path(args.model_name_or_path).is_dir() else {}
    model.eval_metrics = card.pop("metrics", None) or model.eval_metrics
    card.update({k: v for k, v in (("license", args.license), ("training_data", args.training_data)) if v})
    bank = None
    if not args.no_memory_bank:
        if args.memory_bank:
            bank = load_memory_bank(args.memory_bank, model=model)
        elif (Path(args.model_name_or_path) / MEMORY_BANK_FILE).is_file():
            bank = load_memory_bank(args.model_name_or_path, model=model)
    if args.dry_run:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.output_dir, memory_bank=bank,
                              model_card_kwargs=dict(card, model_id=args.repo_id) if args.repo_id else card)
        files = {path: len(blob) for path, blob in folder_files(args.output_dir).items()}
        print(json.dumps({"folder": args.output_dir, "files": files}, indent=2))
        return {"folder": args.output_dir, "files": files}
    info = model.push_to_hub(args.repo_id, memory_bank=bank, commit_message=args.commit_message,
                             private=args.private or None, token=args.token, endpoint=args.endpoint,
                             revision=args.revision, create_pr=args.create_pr, model_card_kwargs=card)
    result = {"repo_id": args.repo_id, "commit_url": info.commit_url, "commit_oid": info.oid,
              "memory_bank": len(bank) if bank is not None else None}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
