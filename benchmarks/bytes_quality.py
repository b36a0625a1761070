"""Bytes against quality (issue 36, item 5): F1 against the content bytes stored per document, one point per row of
`qa_squad.py` results (the bank at each T, the bank with the compact key, hybrid reading, RAG over the text) and the
lossless LM codec of `lm_codec.py`, on one plot (PNG) and one table: the figure a user reads to choose T.

Content bytes exclude doc ids (the same for every row): codes (2 bytes each) + the compact key for a bank, UTF-8
text for a text row, both for a hybrid row. The LM codec's point is its measured bits per byte of text
(`lm_codec.py`, on the first documents of the stream) times this stream's text bytes, and RAG's F1: it decodes the
text exactly, so the passages and answers are RAG's (not re-measured).

    python benchmarks/bytes_quality.py --results benchmarks/results/hybrid1665/results.json \\
        --lm-codec benchmarks/results/lm_codec.json --output-dir benchmarks/results/bytes_quality
"""

import argparse
import json
from pathlib import Path

TEXT_ROWS = ("rag", "bm25", "gold")  # rows whose content is the passage text
FAMILIES = {  # row -> (family, label, tag on the plot)
    "bank_t12": ("bank", "T = 12", "T=12"), "bank_t24": ("bank", "T = 24", "T=24"),
    "mbc": ("bank", "T = 48 (default)", "T=48"), "bank_t96": ("bank", "T = 96", "T=96"),
    "bank_t192": ("bank", "T = 192", "T=192"), "mbc_key": ("bank + key", "T = 48 + 48-byte key", "T=48+key"),
    "hybrid": ("hybrid", "hybrid, reader trained on codes", "hybrid"),
    "hybrid_trained": ("hybrid", "hybrid, reader trained hybrid", "hybrid trained"),
    "bm25": ("text", "BM25 top-1, base LM", "BM25"), "rag": ("text", "RAG: BM25 top-1, trained passage reader", "RAG"),
}


def points(results: list[dict], lm_codec: dict | None) -> list[dict]:
    """Rows of the results (later files win for a row they repeat) -> points {family, label, bytes, f1, source}.

    Raises:
        ValueError: a hybrid or LM-codec point without a text row (bm25/rag) to take the text's bytes from."""
    rows = {}
    for res in results:
        for r in res["rows"]:
            rows[r["row"]] = {**r, "source": res.get("command", "")}
    text = next((rows[n]["bytes_per_doc"] for n in TEXT_ROWS if n in rows), None)
    out = []
    for name, (family, label, tag) in FAMILIES.items():
        if name not in rows:
            continue
        r = rows[name]
        stored = r.get("code_bytes_per_doc", 0) + (r.get("key_bytes_per_doc") or 0)
        if family == "text":
            stored = r["bytes_per_doc"]
        elif family == "hybrid":
            if text is None:
                raise ValueError("a hybrid row needs a bm25 or rag row in the results for the bytes of its text")
            stored += text
        out.append({"family": family, "label": label, "tag": tag, "bytes": stored, "f1": r["f1"],
                    "source": r["source"]})
    if lm_codec is not None:
        if text is None or "rag" not in rows:
            raise ValueError("the LM codec's point needs the rag row (its F1) and a text row (its bytes)")
        bits = lm_codec["summary"]["record_bytes_per_doc"] * 8 / lm_codec["summary"]["utf8_bytes_per_doc"]
        out.append({"family": "LM codec", "label": f"LM arithmetic code ({bits:.2f} bits/byte) + passage reader",
                    "tag": "LM codec", "bytes": bits * text / 8, "f1": rows["rag"]["f1"],
                    "source": lm_codec.get("command", "")})
    return out


def plot(pts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for family, marker in (("bank", "o"), ("bank + key", "D"), ("hybrid", "s"), ("text", "^"), ("LM codec", "*")):
        fam = sorted((p for p in pts if p["family"] == family), key=lambda p: p["bytes"])
        if not fam:
            continue
        ax.plot([p["bytes"] for p in fam], [p["f1"] for p in fam], marker=marker, linestyle="-" if family == "bank"
                else "none", label=family, markersize=10 if marker == "*" else 6)
        for p in fam:
            ax.annotate(p["tag"], (p["bytes"], p["f1"]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(p["bytes"] for p in pts) / 1.5, max(p["bytes"] for p in pts) * 2)
    ax.set_xlabel("content bytes stored per document (log scale)")
    ax.set_ylabel("F1 (SQuAD)")
    ax.set_title("Bytes against quality, 1,665-document SQuAD dev stream")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", required=True, help="qa_squad.py results.json files (same stream)")
    p.add_argument("--lm-codec", help="lm_codec.py's JSON: adds the lossless codec's point")
    p.add_argument("--output-dir", required=True)
    a = p.parse_args(argv)
    results = [json.loads(Path(f).read_text()) for f in a.results]
    same = {(res["n_docs"], res["n_questions"], res["args"]["question_seed"], Path(res["data"]).name)
            for res in results}
    if len(same) > 1:
        raise SystemExit("bytes_quality: the results files hold different streams or questions; rerun them with the "
                         "same --downsample-to, --questions and --question-seed")
    pts = points(results, json.loads(Path(a.lm_codec).read_text()) if a.lm_codec else None)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(pts, out / "bytes_quality.png")
    from mbc_hf.demo import markdown_table

    table = markdown_table([{"family": x["family"], "row": x["label"], "content bytes/doc": f"{x['bytes']:.0f}",
                             "F1": f"{x['f1']:.2f}"} for x in sorted(pts, key=lambda x: x["bytes"])],
                           ["family", "row", "content bytes/doc", "F1"])
    (out / "bytes_quality.md").write_text(table + "\n")
    (out / "bytes_quality.json").write_text(json.dumps({"points": pts, "results": a.results,
                                                        "lm_codec": a.lm_codec}, indent=1) + "\n")
    print(table)
    return pts


if __name__ == "__main__":
    main()
