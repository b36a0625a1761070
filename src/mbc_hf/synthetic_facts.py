"""A synthetic fact stream where only the memory can carry the answer (issue: the paper's learned memory, proven).

Each document is about one fictional entity (a name built from syllables, never a real name) with 2-4 attributes
drawn from closed sets: a city (64), a profession (32), a birth year (1900-1999) and a favourite colour (16),
written in varied templates, 30-80 LM tokens; there is one question per attribute. Train and test entities are
disjoint by construction (their names come from disjoint ranges of a seeded bijection), and everything is
deterministic by seed. Rows have the loaders' layout (``doc_id, context, question, answers, question_id``, see
`mbc_hf.data.load_qa_file`), and `write_synthetic_facts` writes the paragraph-JSONL layout that ``mbc-hf train`` /
``eval`` read like SQuAD.

Chance EM of a question is 1 / (size of its attribute's set); `chance_em` averages it over a set of rows.
"""

import json
import random
from pathlib import Path

import datasets

SYLLABLES = ["ka", "lo", "mi", "ren", "tus", "vor", "bel", "dra", "fen", "gil", "hor", "ix", "jun", "kel", "mar",
             "nop", "or", "pel", "quin", "ras", "sel", "tor", "ul", "vex", "wim", "yar", "zed", "bru", "cal", "dov",
             "esk", "fal"]  # 32: three per name part -> 32^6 names
CITIES = ["Lisbon", "Oslo", "Lima", "Cairo", "Quito", "Perth", "Bern", "Riga", "Dakar", "Hanoi", "Kyoto", "Tunis",
          "Sofia", "Porto", "Minsk", "Accra", "Doha", "Baku", "Seoul", "Delhi", "Dublin", "Vienna", "Prague",
          "Athens", "Madrid", "Berlin", "Warsaw", "Manila", "Lagos", "Nairobi", "Havana", "Bogota", "Caracas",
          "Santiago", "Montreal", "Denver", "Boston", "Austin", "Chicago", "Seattle", "Phoenix", "Dallas", "Geneva",
          "Zurich", "Milan", "Naples", "Lyon", "Marseille", "Munich", "Hamburg", "Krakow", "Tallinn", "Vilnius",
          "Helsinki", "Bergen", "Malmo", "Glasgow", "Cardiff", "Belfast", "Leeds", "Osaka", "Busan", "Taipei",
          "Jakarta"]
PROFESSIONS = ["baker", "pilot", "nurse", "farmer", "lawyer", "painter", "teacher", "sailor", "chemist", "dentist",
               "architect", "plumber", "librarian", "surgeon", "tailor", "butcher", "jeweler", "carpenter", "poet",
               "judge", "miner", "potter", "weaver", "brewer", "banker", "gardener", "dancer", "violinist",
               "astronomer", "geologist", "firefighter", "photographer"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown", "gold",
           "silver", "teal", "violet", "crimson"]
YEARS = [str(y) for y in range(1900, 2000)]
ATTRIBUTES = {  # name -> (values, sentence templates, questions)
    "city": (CITIES, ["{name} lives in {value}.", "{name} has made a home in {value}.",
                      "These days {name} can be found in the city of {value}."],
             ["Where does {name} live?", "In which city does {name} live?"]),
    "profession": (PROFESSIONS, ["{name} works as a {value}.", "By trade, {name} is a {value}.",
                                 "{name} earns a living as a {value}."],
                   ["What is the profession of {name}?", "What does {name} work as?"]),
    "year": (YEARS, ["{name} was born in {value}.", "The year {name} was born was {value}.",
                     "{name} came into the world in {value}."],
             ["In what year was {name} born?", "When was {name} born?"]),
    "colour": (COLOURS, ["The favourite colour of {name} is {value}.", "{name} likes the colour {value} best.",
                         "Of all colours, {name} prefers {value}."],
               ["What is the favourite colour of {name}?", "Which colour does {name} like best?"]),
}
FILLERS = ["Friends describe {name} as quiet and patient.", "{name} enjoys long walks on weekends.",
           "Neighbours say {name} is always on time.", "{name} keeps a small notebook of ideas."]
_NAME_SPACE = len(SYLLABLES) ** 6
_TEST_OFFSET = _NAME_SPACE // 2  # train entities take indices below it, test entities from it on


def entity_name(index: int, seed: int = 0) -> str:
    """The name of entity ``index``: a seeded bijection of [0, 32^6) onto six syllables, "Kalomi Renvortus". Distinct
    indices give distinct names."""
    rng = random.Random(seed)
    n = index
    for _ in range(3):  # odd multipliers and right xorshifts: each step is a bijection of [0, 2^30)
        n = (n * (2 * rng.randrange(_NAME_SPACE // 2) + 1)) % _NAME_SPACE
        n ^= n >> 15
    digits = []
    for _ in range(6):
        n, d = divmod(n, len(SYLLABLES))
        digits.append(SYLLABLES[d])
    return "".join(digits[:3]).capitalize() + " " + "".join(digits[3:]).capitalize()


def synthetic_facts(num_entities: int, split: str = "train", seed: int = 0) -> datasets.Dataset:
    """``num_entities`` documents of the ``split`` ("train" or "test") with one question per attribute, in the
    loaders' layout; answers are one-element lists. Deterministic by (num_entities, split, seed).

    Raises:
        ValueError: an unknown split or a count below 1 or beyond the split's name space.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= num_entities <= _TEST_OFFSET:
        raise ValueError(f"num_entities must be in [1, {_TEST_OFFSET}], got {num_entities}")
    offset = 0 if split == "train" else _TEST_OFFSET
    rows = {"doc_id": [], "context": [], "question": [], "answers": [], "question_id": [], "attribute": []}
    for i in range(num_entities):
        rng = random.Random(f"{seed}:{split}:{i}")
        name = entity_name(offset + i, seed)
        kinds = rng.sample(list(ATTRIBUTES), rng.randint(2, 4))
        values = {k: rng.choice(ATTRIBUTES[k][0]) for k in kinds}
        sentences = [rng.choice(ATTRIBUTES[k][1]).format(name=name, value=values[k]) for k in kinds]
        if len(kinds) < 4:  # a distractor sentence, where it keeps the document within 80 tokens
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(FILLERS).format(name=name))
        doc_id, context = f"{split}-{seed}-{i}", " ".join(sentences)
        for k in kinds:
            rows["doc_id"].append(doc_id), rows["context"].append(context), rows["attribute"].append(k)
            rows["question"].append(rng.choice(ATTRIBUTES[k][2]).format(name=name))
            rows["answers"].append([values[k]]), rows["question_id"].append(f"{doc_id}:{k}")
    return datasets.Dataset.from_dict(rows)


def chance_em(rows) -> float:
    """EM (percent) of guessing each question's attribute uniformly from its closed set, averaged over ``rows``."""
    attributes = list(rows["attribute"])
    return 100 * sum(1 / len(ATTRIBUTES[a][0]) for a in attributes) / max(len(attributes), 1)


def write_synthetic_facts(path: str | Path, num_entities: int, split: str = "train", seed: int = 0) -> Path:
    """Write `synthetic_facts` as paragraph JSONL (one line per document: ``paragraph_id``, ``title``,
    ``context``, ``qas``), the layout `mbc_hf.data.load_qa_file` reads (so ``mbc-hf train --train-file`` does)."""
    ds, path = synthetic_facts(num_entities, split, seed), Path(path)
    docs: dict[str, dict] = {}
    for row in ds:
        doc = docs.setdefault(row["doc_id"], {"paragraph_id": row["doc_id"], "title": row["doc_id"],
                                              "context": row["context"], "qas": []})
        start = row["context"].index(row["answers"][0])
        doc["qas"].append({"id": row["question_id"], "question": row["question"],
                           "answers": {"text": row["answers"], "answer_start": [start]}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs.values()), encoding="utf-8")
    return path
