"""``mbc-hf`` command line: train, adapt, ask, eval, demo. Run ``mbc-hf COMMAND --help`` for the options."""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .atomic import write_text_atomic
from .factory import (  # noqa: F401
    LEARNED_ONLY,
    VOCABULARY_DEFAULTS,
    _one_line,
    build,
    build_from_args,
    check_model_path,
    load_model,
    model_from_args,
    split_train_eval,
)

SHARED_DATA_ENV = "MBC_SHARED_DATA"
SQUAD_TRAIN = "squad/train-part.first44articles.paragraphs.jsonl"
SQUAD_DEV = "squad/dev.minus-holdout.paragraphs.jsonl"
#: Prefix of the temporary folders ``mbc-hf adapt --num-proc N`` keeps its part banks in (in the temp folder).
PART_FOLDER_PREFIX = "mbc-adapt-"
_PART_OWNER_LOCK = ".owner.lock"  # held (flock) by the run that owns a part folder, released by the OS at its death


class CommandError(Exception):
    """A failure the command line reports in one line (exit status 1), like a ValueError / OSError."""


def shared_data_dir() -> Path | None:
    """``$MBC_SHARED_DATA``, else ``../shared/data`` from the working directory or from this repository."""
    candidates = [os.environ.get(SHARED_DATA_ENV), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[3] / "shared" / "data"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def cmd_train(argv: list[str]) -> dict:
    """``mbc-hf train``: the options of `mbc_hf.arguments` (``--help``), or one JSON/YAML config file of them.

    Raises:
        ValueError: no --train-file.
    """
    from . import register_auto_classes  # `import mbc_hf` skips it on the command line; save_pretrained needs it
    from .arguments import parse_train_args
    from .data import load_qa_file, load_qa_files
    from .trainer import MBCTrainer

    register_auto_classes()
    model_args, data_args, args = parse_train_args(argv, prog="mbc-hf train")
    if not data_args.train_file:
        raise ValueError("no training data: pass --train-file FILE [FILE ...] (or train_file in the config file).")
    dataset = load_qa_files(data_args.train_file, downsample_to=data_args.max_train_documents)
    train, held = split_train_eval(dataset, data_args.eval_docs)
    evaluation = load_qa_file(data_args.validation_file, downsample_to=data_args.max_eval_documents or
                              data_args.eval_docs or None) if data_args.validation_file else held
    from transformers import set_seed

    set_seed(args.seed)  # before the model is built: its random init (KV-LoRA, the MBC modules) follows --seed
    if args.resume and Path(args.output_dir, "config.json").exists():
        model = load_model(args.output_dir).train()
    elif model_args.model_name_or_path:  # a saved folder, loaded without running its code (load_model)
        model = load_model(model_args.model_name_or_path).train()
    else:
        model = model_from_args(model_args)
    existed = Path(args.output_dir).exists()
    trainer = MBCTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    resume = args.resume and any(Path(args.output_dir).glob("checkpoint-*"))
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
        metrics = trainer.evaluate() if evaluation is not None else {}
        trainer.save_model(args.output_dir)
    except BaseException:  # Ctrl-C, a crash: leave the checkpoints written so far, or nothing
        remove_empty_output_dir(args.output_dir, existed)
        raise
    Path(args.output_dir, "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


def remove_empty_output_dir(output_dir: str, existed: bool) -> bool:
    """After an interrupted ``mbc-hf train``: remove ``output_dir`` when this run created it and it is still empty
    (possibly but for empty subfolders such as a logging folder), so that no empty folder is later passed as a
    model. A folder holding a checkpoint (``checkpoint-N``, a loadable model folder) stays. Returns whether it was
    removed."""
    folder = Path(output_dir)
    if existed or not folder.is_dir():
        return False
    for sub in sorted(folder.rglob("*"), key=lambda q: -len(q.parts)):  # deepest first
        if not sub.is_dir() or sub.is_symlink() or any(sub.iterdir()):
            return False
        sub.rmdir()
    folder.rmdir()
    print(f"removed {output_dir}: the interrupted run had written nothing there", file=sys.stderr)
    return True


def key_config(addressing_key: str | None, bank) -> dict:
    """The `MBCConfig` override of ``--addressing-key``: the key on when asked for, or when the bank already stores
    keys (a bank adapted with ``--addressing-key`` keeps them, and `ask` fuses them into addressing); else none."""
    if addressing_key or getattr(bank, "key_bytes", None):
        return {"addressing_key": addressing_key or "minilm-binary"}
    return {}


def cmd_adapt(a) -> None:
    """Append documents to a bank file. The load-memorize-save runs under ``<bank>.lock`` (`filelock`), so two
    ``mbc-hf adapt`` runs on one bank take turns and the second appends to what the first saved, instead of both
    starting from the same file and the last save dropping the other's documents."""
    from .data import load_documents_file

    if a.num_proc < 1 or (a.num_proc > 1 and a.save_every):
        raise ValueError(f"--num-proc must be >= 1 (got {a.num_proc}) and --save-every works with one process only")
    # malformed input fails here, before torch and the model load
    sourced = load_documents_file(a.documents, with_sources=True)
    docs = [(d, t) for d, t, _ in sourced]
    metadata = {d: m for d, _, m in sourced}  # first words and file:line, which `mbc-hf ask` prints
    from filelock import Timeout
    from safetensors import SafetensorError

    from .evaluation import adapt_stream
    from .memory_bank import bank_lock, load_bank

    clean_stale_part_folders()
    check_model_path(a.model)
    lock = bank_lock(a.bank)  # the lock `CompressedMemoryBank.save` takes, re-entrant in this process
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another writer of {a.bank} (lock {lock.lock_file}) ...", file=sys.stderr)
        lock.acquire()
    try:
        bank = load_bank(a.bank) if Path(a.bank).exists() else None
        config = key_config(a.addressing_key, bank)
        model = load_model(a.model, **config)
        before = len(bank) if bank is not None else 0
        start = time.perf_counter()
        try:
            if a.num_proc > 1:
                bank = adapt_in_processes(a.model, model, docs, bank, a.num_proc, a.batch_size, metadata, config)
                bank.save(a.bank)
            else:
                bank = adapt_stream(_WithMetadata(model, metadata), docs, bank, batch_size=a.batch_size,
                                    save_every=a.save_every, bank_path=a.bank)
        except SafetensorError as exc:  # e.g. a full disk: safetensors names no file
            raise CommandError(f"could not write the bank {a.bank}: {_one_line(exc)} (is the disk full?). The bank "
                               "file keeps its last complete save; free some space and run the same command again "
                               "(documents already in the bank are skipped).") from exc
        ms = (time.perf_counter() - start) * 1000 / max(len(docs), 1)
    finally:
        lock.release()
    print(f"bank {a.bank}: {len(bank)} documents (+{len(bank) - before}), {bank.nbytes} bytes "
          f"({bank.nbytes / max(len(bank), 1):.1f} bytes/doc), {ms:.1f} ms/doc")


def _exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """Initializer of the ``--num-proc`` worker processes: a daemon thread ends the worker (``os._exit``) as soon as
    ``parent_pid`` is no longer its parent, i.e. the parent died (even by SIGKILL, which runs no cleanup): otherwise
    a worker blocks forever on the task pipe it holds both ends of, with the model loaded, and keeps
    multiprocessing's resource tracker alive too."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="mbc-exit-with-parent", daemon=True).start()


def _part_owner_lock(folder: str):
    from filelock import FileLock

    return FileLock(os.path.join(folder, _PART_OWNER_LOCK))


def clean_stale_part_folders(tmp_dir: str | None = None) -> list[str]:
    """Remove the part folders (``mbc-adapt-*`` in the temp folder) that ``mbc-hf adapt --num-proc`` runs killed
    before they could clean up: a folder whose owner lock (held by its run until it ends) can be taken, or, from
    versions without the lock, one holding only part banks and untouched for an hour. Their part banks were never
    appended to a bank file, so the next run encodes those documents again. Returns the folders removed."""
    import glob
    import re
    import shutil
    import tempfile

    from filelock import Timeout

    removed = []
    for folder in sorted(glob.glob(os.path.join(tmp_dir or tempfile.gettempdir(), PART_FOLDER_PREFIX + "*"))):
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue
        try:
            if os.path.exists(os.path.join(folder, _PART_OWNER_LOCK)):
                lock = _part_owner_lock(folder)
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue  # a running adapt owns it
                lock.release()
            else:
                names = os.listdir(folder)
                if not all(re.fullmatch(r"part\d+\.safetensors(\.lock)?|\..*\.tmp", n) for n in names):
                    continue  # not a part folder of mbc-hf adapt
                newest = max([os.path.getmtime(folder)] + [os.path.getmtime(os.path.join(folder, n)) for n in names])
                if time.time() - newest < 3600:
                    continue
        except OSError:  # another user's folder, or removed meanwhile: not ours to clean
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        print(f"removed {folder}, left by a killed `mbc-hf adapt --num-proc` run (its documents were not saved to "
              "a bank; this run encodes them again)", file=sys.stderr)
    return removed


def _memorize_part(model_path: str, docs: list[tuple[str, str]], batch_size: int, threads: int, out: str,
                   metadata: list[dict | None] | None = None, config: dict | None = None) -> None:
    import torch

    torch.set_num_threads(threads)
    model = load_model(model_path, **(config or {}))
    bank = model.memorize([t for _, t in docs], doc_ids=[d for d, _ in docs], metadata=metadata, batch_size=batch_size)
    bank.save(out)


def adapt_in_processes(model_path: str, model, docs: list[tuple[str, str]], bank, num_proc: int, batch_size: int,
                       metadata: dict[str, dict] | None = None, config: dict | None = None):
    """`mbc-hf adapt --num-proc N`: the documents not yet in ``bank`` are split into N contiguous parts; this
    process memorizes the first with ``model`` while N - 1 spawned processes (each loading the model from
    ``model_path``) memorize the others into their own bank files; the parts are then appended in order, so the
    result equals one process's bank (memorize is batch-invariant), with no document lost or repeated. Each process
    uses cpu_count / N torch threads. Returns the extended bank (a new one when ``bank`` is None).

    The workers exit when this process dies (`_exit_with_parent`); the part folder (``mbc-adapt-*`` in the temp
    folder) is removed at the end, or, when this process is killed, by the next run (`clean_stale_part_folders`).

    Raises:
        CommandError: a worker process died (killed, out of memory); ``bank`` is unchanged.
    """
    import multiprocessing
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from safetensors import SafetensorError

    import torch

    from .memory_bank import load_bank

    bank = model.new_memory_bank() if bank is None else bank
    model.reader.check_bank(bank)
    todo = [(d, t) for d, t in docs if d not in bank]
    if not todo:
        return bank
    size = -(-len(todo) // num_proc)
    parts = [todo[i:i + size] for i in range(0, len(todo), size)]
    threads = max(1, (os.cpu_count() or 1) // num_proc)
    tmp = tempfile.mkdtemp(prefix=PART_FOLDER_PREFIX)
    owner = _part_owner_lock(tmp)
    owner.acquire()  # released by the OS if this process is killed: the next run then removes the folder
    try:
        with ProcessPoolExecutor(max(len(parts) - 1, 1), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            outs = [os.path.join(tmp, f"part{i}.safetensors") for i in range(1, len(parts))]
            meta = lambda part: [metadata.get(d) for d, _ in part] if metadata else None  # noqa: E731
            futures = [pool.submit(_memorize_part, model_path, part, batch_size, threads, out, meta(part), config)
                       for part, out in zip(parts[1:], outs)]
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:  # the first part here, while the other processes start and load the model
                first = model.memorize([t for _, t in parts[0]], doc_ids=[d for d, _ in parts[0]],
                                       metadata=meta(parts[0]), batch_size=batch_size)
            finally:
                torch.set_num_threads(previous)
            try:
                for future in futures:
                    future.result()
            except BrokenProcessPool as exc:
                raise CommandError(f"a worker process of --num-proc {num_proc} died (killed, or out of memory?); "
                                   "nothing was added to the bank: run again, with fewer processes if memory is "
                                   "short.") from exc
            except SafetensorError as exc:
                raise CommandError(f"a worker process could not write its part bank in {tmp}: {_one_line(exc)} (is "
                                   "the disk of the temp folder full? set TMPDIR to a folder with space); nothing was "
                                   "added to the bank.") from exc
            for part in [first, *map(load_bank, outs)]:
                part.check_codebook(bank.codebook_fingerprint)
                keys = {"keys": part.keys} if bank.key_bytes else {}  # (the workers' model has the key too)
                bank.extend(part.doc_ids, part.codes, part.metadata, on_duplicate="fail", **keys)
    finally:
        owner.release()
        shutil.rmtree(tmp, ignore_errors=True)
    return bank


def source_label(bank, doc_id: str) -> str:
    """What ``mbc-hf ask`` adds after a source's id and score: ``, my_docs.txt:12 "its first words…"`` (the file and
    line, stored by ``mbc-hf adapt`` for documents without an id of their own, and the first words), or "" for a
    bank written without them."""
    try:
        meta = bank.get_metadata(doc_id)
    except KeyError:
        meta = {}
    parts = [meta[k] if k == "source" else f'"{meta[k]}"' for k in ("source", "text") if isinstance(meta.get(k), str)]
    return ", " + " ".join(parts) if parts else ""


class _WithMetadata:
    """A model whose ``memorize`` stores each document's metadata (by doc id) in the bank: `adapt_stream` passes
    ids and texts only."""

    def __init__(self, model, metadata: dict[str, dict]):
        self._model, self._metadata = model, metadata

    def __getattr__(self, name):
        return getattr(self._model, name)

    def memorize(self, texts, memory_bank=None, doc_ids=None, **kwargs):
        if doc_ids is not None and "metadata" not in kwargs:
            kwargs["metadata"] = [self._metadata.get(d) for d in doc_ids]
        return self._model.memorize(texts, memory_bank, doc_ids, **kwargs)


def cmd_ask(a) -> None:
    from .memory_bank import load_bank

    check_model_path(a.model)  # a wrong --model is reported before a wrong --bank
    bank = load_bank(a.bank)
    model = load_model(a.model, **key_config(a.addressing_key, bank))
    try:
        model.reader.check_addressing()
    except ValueError:  # no addressing to report: the aggregator of a learned codebook reads the whole bank
        for question, answer in zip(a.question, model.answer(a.question, memory_bank=bank,
                                                             max_new_tokens=a.max_new_tokens)):
            print(f"Q: {question}\nA: {answer}")
        return
    for question, out in zip(a.question, model.answer(a.question, memory_bank=bank, max_new_tokens=a.max_new_tokens,
                                                      return_sources=True)):
        if not out.get("grounded", True):  # abstention: no document read, the answer is the empty memory's
            threshold = model.config.relevance_threshold
            why = ("the bank is empty" if bank is None or not len(bank) else
                   f"relevance {out['relevance']:.2f} < threshold {threshold:.2f}" if threshold is not None
                   else "no document read")
            print(f"Q: {question}\nnot found in the memory ({why})\n"
                  f"A (empty memory, closed-book: not from the bank): {out['answer']}\nsources: (none)")
            continue
        sources = ", ".join(f"{doc_id} ({score:.2f}{source_label(bank, doc_id)})" for doc_id, score in
                            zip(out["sources"], out["scores"]))
        print(f"Q: {question}\nA: {out['answer']}\nsources: {sources or '(empty bank)'}")


def cmd_eval(a) -> dict:
    from .data import load_qa_file
    from .evaluation import evaluate_online

    if a.retention:
        return cmd_eval_retention(a)
    if a.hybrid:
        raise SystemExit("mbc-hf eval: error: --hybrid draws the hybrid reader's retention curve: add --retention")
    model = load_model(a.model)
    dataset = load_qa_file(a.data, downsample_to=a.downsample_to)
    metrics = evaluate_online(model, dataset, aggregation=a.aggregation, compress=False if a.no_compress else None,
                              max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    predictions, _ = metrics.pop("predictions"), metrics.pop("memory_bank")
    if a.output:
        write_text_atomic(a.output, json.dumps(metrics, indent=2))
        if a.predictions:
            rows = [{"question_id": q, "prediction": p, "answers": r}
                    for q, p, r in zip(dataset["question_id"], predictions, dataset["answers"])]
            write_text_atomic(a.predictions, "\n".join(json.dumps(r) for r in rows) + "\n")
    print(json.dumps(metrics, indent=2))
    return metrics


def cmd_eval_retention(a) -> list[dict]:
    """``mbc-hf eval --retention``: `retention_curve` -> retention.csv + retention.png in --output-dir."""
    from .data import load_qa_file
    from .demo import markdown_table
    from .evaluation import RETENTION_COLUMNS, retention_curve, write_retention

    if not a.output_dir:
        raise ValueError("--retention writes retention.csv and retention.png: give --output-dir")
    until = a.retention_until or None
    limits = [n for n in (until, a.downsample_to) if n]
    try:  # fail before the long run when the plot cannot be drawn
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("mbc-hf eval: error: --retention draws retention.png with matplotlib: "
                         "pip install matplotlib") from None

    dataset = load_qa_file(a.data, downsample_to=min(limits) if limits else None)
    model = load_model(a.model)
    rows = retention_curve(model, dataset, first=a.retention_first, step=a.retention_step, until=until,
                           max_questions_per_doc=a.max_questions_per_doc, compress=False if a.no_compress else None,
                           aggregation=a.aggregation, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                           hybrid=a.hybrid)
    csv_path, png_path = write_retention(rows, a.output_dir)
    if a.output:
        finite = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
        write_text_atomic(a.output, json.dumps({"retention": finite}, indent=2, allow_nan=False))  # NaN -> null
    print(markdown_table(rows, list(RETENTION_COLUMNS)))
    print(f"wrote {csv_path} and {png_path}")
    return rows


def cmd_demo(argv: list[str]) -> None:
    """``mbc-hf demo``: `mbc_hf.arguments.DemoArguments` on top of the training schema (``--help``)."""
    from . import register_auto_classes
    from .arguments import DEMO_DEFAULTS, DemoArguments, parse_train_args
    from .data import first_questions, load_qa_file, load_qa_files
    from .demo import run_demo

    register_auto_classes()
    model_args, data_args, args, demo = parse_train_args(
        argv, prog="mbc-hf demo", extra=(DemoArguments,), description="The main job on the embedded default: a short "
        "meta-training, then adapt on dev documents and answer from the bank, an empty memory and closed-book.",
        **DEMO_DEFAULTS)
    shared = shared_data_dir()
    train_files = data_args.train_file or ([shared / SQUAD_TRAIN] if shared else None)
    dev_file = demo.dev_file or (shared / SQUAD_DEV if shared else None)
    if train_files is None or dev_file is None:
        import datasets

        print("shared data not found; loading SQuAD from the Hub (rajpurkar/squad)")
        squad = datasets.load_dataset("rajpurkar/squad")
        train, dev = _hub_rows(squad["train"].select(range(12000))), _hub_rows(squad["validation"])
    else:
        train, dev = load_qa_files(train_files), load_qa_file(dev_file, downsample_to=demo.dev_docs)
    dev = dev.select(first_questions(dev, demo.dev_docs, demo.questions_per_doc or None))
    run_demo(train, dev, model_args, data_args, args, demo)


def _hub_rows(split):
    from .modeling_mbc import document_id

    return split.map(lambda r: {"doc_id": document_id(r["context"]), "answers": r["answers"]["text"],
                                "question_id": r["id"]}, remove_columns=["id", "title"])


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mbc-hf", description=__doc__.replace("``", ""))  # no reST markup in --help
    sub = root.add_subparsers(dest="command", required=True)

    # train and demo parse the training schema of mbc_hf.arguments (HfArgumentParser; `main` hands them the rest)
    for name, text in (("train", "meta-train an MBC model on QA file(s) or a JSON/YAML config file"),
                       ("demo", "the main job on the embedded default: short meta-training, adapt, answer")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)

    model_help = ("a model folder written by `mbc-hf train` (config.json + model.safetensors) or a Hub id owner/name; "
                  "a path that is not owner/name, or whose first folder exists here (runs/mbc), is always local")
    key_help = ("the 48-byte compact key (all-MiniLM-L6-v2 sign bits; MBCConfig.addressing_key): adapt stores one per "
                "document beside its codes, ask fuses it into addressing; on by itself for a bank that stores keys")
    bank_help = ("the memory bank: one .safetensors file, or a sharded bank's index (bank.index.json, its shards "
                 "beside it)")
    p = sub.add_parser("adapt", help="stream documents into a (new or existing) memory bank",
                       description="Memorize documents into a memory bank (codes only, no gradient); documents "
                                   "already in the bank are skipped, so running again resumes.")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--documents", required=True, help="a .txt (one document per line; blank lines are skipped; "
                   "sources print as FILE:LINE), a JSONL/JSON/CSV with 'text' (and optional 'id'), or a QA file "
                   "(its unique documents)")
    p.add_argument("--bank", required=True, help=bank_help + "; created, or appended to when it exists")
    p.add_argument("--batch-size", type=int, default=32, help="documents encoded per forward (default: 32)")
    p.add_argument("--save-every", type=int, help="also save the bank (atomically) every N new documents, so a "
                                                  "killed run keeps its progress; rerunning resumes")
    p.add_argument("--addressing-key", choices=["minilm-binary"], help=key_help)
    p.add_argument("--num-proc", type=int, default=1, help="memorize in N processes (each loads the model and "
                   "encodes a contiguous part of the documents); the bank equals one process's (default: 1)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("ask", help="answer questions from a memory bank, with the sources read",
                       description="Answer each question from the bank and print the documents it read (sources: "
                                   "FILE:LINE or id, first words, addressing score).")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--bank", required=True, help=bank_help + " (written by `mbc-hf adapt`)")
    p.add_argument("--addressing-key", choices=["minilm-binary"], help=key_help)
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit in tokens (default: 16)")
    p.add_argument("question", nargs="+", help="one or more questions (quote each)")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", help="adapt on a QA file's documents, answer its questions, report EM/F1")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--data", required=True, help="a QA file (SQuAD JSON, paragraph JSONL, StreamingQA/ArchivalQA "
                                                 "CSV/JSONL)")
    p.add_argument("--downsample-to", type=int, help="first N unique documents in file order (paper: 1665)")
    p.add_argument("--output", help="metrics.json")
    p.add_argument("--predictions", help="predictions .jsonl (with --output)")
    p.add_argument("--aggregation", choices=["histogram", "dense", "topk"], help="how a learned codebook's bank is "
                   "read (default: the model's); 'topk' needs a model trained with --aggregation topk")
    p.add_argument("--no-compress", action="store_true", help="uncompressed MAC-style bank (VQ bypassed; the "
                   "default for a model trained with --no-vq)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit in tokens (default: 16)")
    p.add_argument("--batch-size", type=int, default=16, help="documents / questions per forward (default: 16)")
    p.add_argument("--retention", action="store_true", help="MAC's forgetting curve instead of one score: F1 on the "
                   "first documents' questions while further documents stream into the same bank; writes "
                   "retention.csv and retention.png in --output-dir")
    p.add_argument("--retention-first", type=int, default=200, help="documents memorized before the first "
                   "measurement; their questions are measured (default: 200)")
    p.add_argument("--retention-step", type=int, default=200, help="re-measure after every N further documents "
                                                                    "(default: 200)")
    p.add_argument("--retention-until", type=int, default=1600, help="stop after this many documents "
                                                                      "(0 = the whole file; default: 1600)")
    p.add_argument("--max-questions-per-doc", type=int, help="with --retention: measure at most N questions per "
                                                             "document")
    p.add_argument("--hybrid", action="store_true", help="with --retention: also measure hybrid reading (the BM25 "
                   "top-1 passage of the documents streamed so far in the prompt, plus the bank); a 'reader' column "
                   "tells the curves apart")
    p.add_argument("--output-dir", help="with --retention: where retention.csv and retention.png go")
    p.set_defaults(func=cmd_eval)

    return root


def main(argv=None):
    """Run ``mbc-hf``. Bad input (a ValueError or OSError: malformed data file, corrupted bank, bank from another
    codebook, missing file, damaged model folder...; a `CommandError`; a ``SafetensorError``) exits with status 1 and
    ``mbc-hf COMMAND: error: MESSAGE`` on stderr, without a traceback; set ``MBC_HF_TRACEBACK=1`` to get the
    traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["demo"]):  # the training schema: mbc_hf.arguments
        command, func, rest = argv[0], {"train": cmd_train, "demo": cmd_demo}[argv[0]], argv[1:]
    else:  # --help and argument errors end here, before torch / transformers are imported
        args = parser().parse_args(argv)
        command, func, rest = args.command, args.func, args
    from safetensors import SafetensorError  # light; the commands import torch / transformers when they need them

    try:
        func(rest)  # nothing returned: the console script passes main()'s value to sys.exit
    except (ValueError, OSError, CommandError, SafetensorError) as exc:
        if os.environ.get("MBC_HF_TRACEBACK"):
            raise
        raise SystemExit(f"mbc-hf {command}: error: {exc}") from exc


if __name__ == "__main__":
    main()
