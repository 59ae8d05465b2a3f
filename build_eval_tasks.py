"""Build the bundled offline evaluation suite (tasks/*.jsonl) from poems that no training file contains.

    python build_eval_tasks.py                       (reads ../shared/data/pretrain_poetry.jsonl)

The shipped data (data/*.jsonl.gz) holds the first 20,000 documents of the full poetry corpus, and the
SFT conversations quote only its first 40,000; items come from the documents after those, and an item is
dropped when any line of its poem occurs in a shipped training file. The items
are written to tasks/ and committed, so evaluation and tests need neither the full corpus nor a network;
this script regenerates them (seeded: the same files every time).

- poetry_author: which poet wrote this poem? 4 options; the distractors are poets of the same collection
  (Tang shi, Song ci, Shijing: the corpus has no dynasty field, so the collection is told by form: an
  author of mostly regular 4/5/7-character lines is a shi poet) with at least 3 poems in the shipped
  data. Each option is scored as the context "《title》 option\n" of the whole poem (lm-eval's
  multiple-input form): the answer is the poet under whom the model finds the poem most likely. Asking
  for the name after the title instead would measure the tokenizer: a prolific poet's name is one
  token, so even a random model picks it (measured: 55% against 25% chance).
- poetry_next_line: which line comes next? The title line and up to two lines of a poem, then 4
  options: the true next line and lines of other held-out poems of the same collection. Scored by
  acc_mutual_info, log P(line | poem) - log P(line): how much the poem raises each line's probability.
  Plain log-likelihood prefers short and common lines whatever the poem (a random model does too).
- poetry_author_chat: the SFT question "《title》的作者是谁？" answered in the chat format, exact match of
  the author's name.
- heldout_poems.jsonl.gz: 999 whole documents for held-out bits per byte (`eval.py --data_path`), every
  39th line of the corpus's lines 40,000-79,000 (`sed -n 40000,79000p | awk 'NR % 39 == 0'`, as the
  figures of docs/LOG.md were measured).
"""
import argparse
import collections
import gzip
import json
import math
import os
import random
import re
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
SHIPPED = ["pretrain_poetry.jsonl.gz", "sft_poetry.jsonl.gz", "sft_poetry_belle.jsonl.gz"]
SHIPPED_DOCUMENTS = 20_000  # data/pretrain_poetry.jsonl.gz: the first documents of the full corpus
FIRST_HELD_OUT = 40_000  # documents [0, 40000) of the full corpus are in a shipped file or quoted by SFT
NOT_AUTHORS = {"无名氏", "不详", ""}
MAX_AUTHOR_POEM_LINES = 2  # poetry_author scores the whole poem four times: short poems keep it fast
CLAUSE = re.compile(r"[^，。？！；、]+")


def parse_doc(text):
    """(title, author, lines) of a document "《title》 author\\nline\\nline...", or None."""
    head, _, body = text.partition("\n")
    match = re.fullmatch(r"《([^《》]{1,20})》 (\S{1,8})", head)
    lines = [line for line in body.split("\n") if line.strip()]
    if not match or not lines:
        return None
    return match.group(1), match.group(2), lines


def regular(lines):
    clauses = [c for line in lines for c in CLAUSE.findall(line)]
    return bool(clauses) and all(len(c) in (4, 5, 7) for c in clauses)


def read_corpus(corpus):
    """parse_doc of every document of the full pretraining corpus, in order."""
    with open(corpus, encoding="utf-8") as f:
        return [parse_doc(json.loads(line)["text"]) for line in f]


def poet_collections(docs):
    """({poet: collection}, Counter of poets in the shipped pretraining data: what a trained model can
    know). Collections are told by form over the whole corpus: shi poets write regular lines, ci poets do
    not."""
    form = collections.defaultdict(list)
    for doc in docs:
        if doc:
            form[doc[1]].append(regular(doc[2]))
    collection = {author: ("诗经" if "·" in author else "shi" if sum(f) * 2 >= len(f) else "ci")
                  for author, f in form.items()}
    return collection, collections.Counter(doc[1] for doc in docs[:SHIPPED_DOCUMENTS] if doc)


def read_shipped(data_dir):
    """Every line of every text of the shipped files (poems and SFT messages)."""
    texts = []
    for name in SHIPPED:
        with gzip.open(os.path.join(data_dir, name), "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if "text" in record:
                    texts.append(record["text"])
                for turn in record.get("messages", []) + record.get("conversations", []):
                    texts.append(turn.get("content", turn.get("value", "")))
    return {line for text in texts for line in text.split("\n")}


def build(corpus, data_dir, items, seed):
    docs = read_corpus(corpus)
    shipped_lines = read_shipped(data_dir)
    collection, known = poet_collections(docs)

    # A poem is held out when none of its lines is a line of a shipped file (the same poem can occur
    # twice in the corpus, and SFT answers quote poems).
    held_out = [doc for doc in docs[FIRST_HELD_OUT:]
                if doc and not any(line in shipped_lines for line in doc[2])]
    rng = random.Random(seed)
    rng.shuffle(held_out)
    print(f"{len(held_out)} held-out poems (of {len(docs) - FIRST_HELD_OUT} after document {FIRST_HELD_OUT})")

    def author_choices(author):
        pool = [a for a in known if known[a] >= 3 and collection.get(a) == collection[author] and a != author
                and a not in NOT_AUTHORS]
        choices = sorted(rng.sample(pool, 3) + [author], key=lambda _: rng.random())
        return choices, choices.index(author)

    with_known_author = [d for d in held_out if d[1] not in NOT_AUTHORS and known[d[1]] >= 3]
    short_poems = [d for d in with_known_author if len(d[2]) <= MAX_AUTHOR_POEM_LINES]
    author_items = []
    for title, author, lines in short_poems[:items]:
        choices, label = author_choices(author)
        author_items.append({"title": title, "author": author, "choices": choices, "label": label,
                             "contexts": [f"《{title}》 {choice}\n" for choice in choices],
                             "poem": "\n".join(lines)})
    prolific = sum(max(i["choices"], key=lambda a: known[a]) == i["author"] for i in author_items)
    print(f"poetry_author: always picking the poet with the most poems in the shipped data scores "
          f"{prolific / len(author_items):.3f}")

    lines_of = collections.defaultdict(list)  # held-out lines by collection, for distractors
    for title, author, lines in held_out:
        lines_of[collection.get(author)].extend(lines)
    next_line_items = []
    for title, author, lines in held_out:
        if len(next_line_items) == items:
            break
        if len(lines) < 3:
            continue
        k = rng.randrange(1, len(lines))
        answer = lines[k]
        distractors = set()
        while len(distractors) < 3:
            line = rng.choice(lines_of[collection.get(author)])
            if line not in lines:
                distractors.add(line)
        choices = sorted(distractors | {answer}, key=lambda _: rng.random())
        # The title line and at most two lines before the answer: enough to know the poem's form and
        # rhyme, and short enough that the suite runs in a minute on a CPU.
        next_line_items.append({"context": f"《{title}》 {author}\n" + "\n".join(lines[max(0, k - 2):k]) + "\n",
                                "choices": choices, "label": choices.index(answer)})

    used = {(i["title"], i["author"]) for i in author_items}
    chat_items = [{"title": title, "author": author, "question": f"《{title}》的作者是谁？",
                   "first_line": lines[0]}
                  for title, author, lines in with_known_author if (title, author) not in used][:items]
    return author_items, next_line_items, chat_items


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def standard_error_points(p, n):
    return 100 * math.sqrt(p * (1 - p) / n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(REPO, "..", "shared", "data", "pretrain_poetry.jsonl"),
                   help="the full pretraining corpus whose first 20,000 documents are data/pretrain_poetry")
    p.add_argument("--data_dir", default=os.path.join(REPO, "data"), help="the shipped training files")
    p.add_argument("--out_dir", default=os.path.join(REPO, "tasks"))
    p.add_argument("--items", type=int, default=400, help="items per task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(args.corpus):
        sys.exit(f"error: {args.corpus} does not exist; pass --corpus (the full pretrain_poetry.jsonl)")
    tasks = dict(zip(["poetry_author", "poetry_next_line", "poetry_author_chat"],
                     build(args.corpus, args.data_dir, args.items, args.seed)))
    os.makedirs(args.out_dir, exist_ok=True)
    for name, records in tasks.items():
        write_jsonl(os.path.join(args.out_dir, f"{name}.jsonl"), records)
        # The worst standard error is at 50% accuracy; 400 items keep it at 2.5 points.
        print(f"{name}: {len(records)} items, standard error at most "
              f"{standard_error_points(0.5, len(records)):.2f} points")
    with open(args.corpus, encoding="utf-8") as f:
        held_out_text = f.read().splitlines()[FIRST_HELD_OUT + 37::39]
    with gzip.GzipFile(os.path.join(args.out_dir, "heldout_poems.jsonl.gz"), "wb", mtime=0) as f:
        f.write("".join(line + "\n" for line in held_out_text).encode("utf-8"))
    print(f"heldout_poems: {len(held_out_text)} documents")
    most_common = collections.Counter(r["author"] for r in tasks["poetry_author_chat"]).most_common(1)[0]
    print(f"poetry_author_chat: always answering {most_common[0]} scores "
          f"{most_common[1] / len(tasks['poetry_author_chat']):.3f}")


if __name__ == "__main__":
    main()
