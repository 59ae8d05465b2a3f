"""Build the sample preference data for DPO, data/dpo_poetry.jsonl.gz, and its held-out pairs,
data/dpo_poetry_eval.jsonl.gz, from SFT conversations that no shipped file uses.

    python build_preference_data.py     (reads ../shared/data/sft_poetry.jsonl and pretrain_poetry.jsonl)

The shipped SFT file holds the first 8,000 of the 30,000 conversations of the full one; pairs come from
the other 22,000, so DPO is not shown what SFT already taught. Their poems are among the first 40,000
documents of the corpus; a pair is kept only when its poem is in the shipped pretraining sample (the first
20,000), i.e. a poem a model trained on the shipped data has read. The evaluation suite's poems come
after the 40,000th (build_eval_tasks.py), so no pair is about one of them.

- "《title》的作者是谁？": chosen, the conversation's answer (the right poet); rejected, the same sentence
  with another poet of the same collection (Tang shi, Song ci, Shijing) who occurs at least 3 times in
  the shipped sample: a name the model knows and that fits the form.
- "请背诵 poet 的《title》。": chosen, the poem; rejected, a poem of the shipped sample of the same
  collection and the same shape (number of lines and length of each: a shi of the same metre, a ci of
  the same tune), by another poet. With a shorter or longer wrong poem, the summed log-probability that
  DPO and the held-out accuracy compare would tell the two apart by their length rather than by which
  poem was asked for.

Held-out pairs share no poem with the training pairs, in any role: the shipped sample's poems are split
first (a seeded share of them, poems with the same title or text kept together, held out until their
questions make about --eval_pairs pairs; pass that file as --val_data_path), and each side draws its wrong
poets and wrong poems only from its own poems. So no answer text and no title is on both sides; DPO that
pushes a training pair's rejected poem down cannot push a held-out pair's chosen one down with it, and the
held-out accuracy measures what DPO teaches about poems it was not shown. Poets are shared: the same poet
writes poems on both sides.

The prompt is the conversation up to its last question (system prompt and earlier turns included); the
answers are the last turn's. Poems of more than --max_lines lines are left out, to keep sequences short.
Seeded: the same files every time.
"""
import argparse
import collections
import gzip
import json
import os
import random
import re
import sys

from build_eval_tasks import NOT_AUTHORS, SHIPPED_DOCUMENTS, poet_collections, read_corpus

REPO = os.path.dirname(os.path.abspath(__file__))
SHIPPED_CONVERSATIONS = 8_000  # data/sft_poetry.jsonl.gz: the first conversations of the full file
AUTHOR_ANSWER = re.compile(r"《(.+)》的作者是(\S+)。")
RECITE_QUESTION = re.compile(r"请背诵(\S+)的《(.+)》。")


def poem_groups(read):
    """{(title, author): group} over the shipped sample's poems: poems that share a title, or a text (the
    corpus holds a few poems under two titles), are one group, so that a split by group leaves the two sides
    no title and no text in common."""
    parent = {}

    def root(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for (title, _), lines in read.items():
        parent[root(("title", title))] = root(("text", "\n".join(lines)))
    return {poem: root(("title", poem[0])) for poem in read}


def questions(conversations, read, max_lines):
    """(prompt, answer, title, author, kind) of each conversation whose last turn asks a pair's question
    about a poem of the shipped sample of at most max_lines lines, and answers it as the corpus does."""
    for messages in conversations:
        prompt, answer = messages[:-1], messages[-1]["content"]
        question = prompt[-1]["content"]
        if (match := AUTHOR_ANSWER.fullmatch(answer)) and question == f"《{match.group(1)}》的作者是谁？":
            (title, author), kind = match.groups(), "author"
        elif match := RECITE_QUESTION.fullmatch(question):
            (author, title), kind = match.groups(), "recite"
        else:
            continue
        lines = read.get((title, author))
        if lines is None or author in NOT_AUTHORS or len(lines) > max_lines:
            continue
        if kind == "recite" and answer != "\n".join(lines):
            continue
        yield prompt, answer, title, author, kind


def build(conversations, docs, max_lines, eval_pairs, seed):
    """(training pairs, held-out pairs). The poems are split first: groups of poems (poem_groups) go to the
    held-out side in a seeded order until their questions make eval_pairs pairs, and every answer, right or
    wrong, comes from its side's poems, so no poem is on both sides in any role."""
    rng = random.Random(seed)
    collection, known = poet_collections(docs)
    read = {(doc[0], doc[1]): doc[2] for doc in docs[:SHIPPED_DOCUMENTS] if doc}
    found = list(questions(conversations, read, max_lines))
    group = poem_groups(read)
    asked = collections.Counter(group[title, author] for _, _, title, author, _ in found)
    order = sorted(set(group.values()))
    rng.shuffle(order)
    held_out, count = set(), 0
    for g in order:
        if count >= eval_pairs:
            break
        held_out.add(g)
        count += asked[g]

    def shape(author, lines):  # what a plausible wrong poem shares with the right one
        return collection.get(author), tuple(map(len, lines))

    poets = {True: set(), False: set()}  # side (held out?) -> poets of its poems, for wrong authors
    poems_by_shape = {True: {}, False: {}}  # side -> (collection, line lengths) -> poems, for wrong poems
    for (title, author), lines in sorted(read.items()):
        side = group[title, author] in held_out
        if known[author] >= 3 and author not in NOT_AUTHORS:
            poets[side].add(author)
        poems_by_shape[side].setdefault(shape(author, lines), []).append((author, "\n".join(lines)))
    poets = {side: sorted(names) for side, names in poets.items()}

    pairs = {True: [], False: []}
    for prompt, answer, title, author, kind in found:
        side = group[title, author] in held_out
        if kind == "author":
            wrong = [p for p in poets[side] if collection.get(p) == collection.get(author) and p != author]
            rejected = f"《{title}》的作者是{rng.choice(wrong)}。" if wrong else None
        else:
            same_shape = poems_by_shape[side].get(shape(author, read[title, author]), [])
            wrong = [poem for poet, poem in same_shape if poet != author]
            rejected = rng.choice(wrong) if wrong else None
        if rejected is not None:
            pairs[side].append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                                "rejected": [{"role": "assistant", "content": rejected}]})
    for side in pairs.values():
        rng.shuffle(side)
    return pairs[False], pairs[True]


def write_gzip_jsonl(path, records):
    # mtime=0: the same bytes every time, so a rebuild that changes nothing changes no committed file.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = os.path.join(REPO, "..", "shared", "data")
    p.add_argument("--conversations", default=os.path.join(shared, "sft_poetry.jsonl"),
                   help="the full SFT file whose first 8,000 conversations are data/sft_poetry.jsonl.gz")
    p.add_argument("--corpus", default=os.path.join(shared, "pretrain_poetry.jsonl"),
                   help="the full pretraining corpus whose first 20,000 documents are data/pretrain_poetry")
    p.add_argument("--out", default=os.path.join(REPO, "data", "dpo_poetry.jsonl.gz"))
    p.add_argument("--eval_out", default=os.path.join(REPO, "data", "dpo_poetry_eval.jsonl.gz"))
    p.add_argument("--eval_pairs", type=int, default=400, help="about this many pairs held out for evaluation (whole poems are held out)")
    p.add_argument("--max_lines", type=int, default=4, help="longest poem, in lines")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in (args.conversations, args.corpus):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} does not exist; pass --conversations and --corpus (the full files)")
    with open(args.conversations, encoding="utf-8") as f:
        conversations = [json.loads(line)["messages"] for line in f][SHIPPED_CONVERSATIONS:]
    train, held_out = build(conversations, read_corpus(args.corpus), args.max_lines, args.eval_pairs, args.seed)
    if not train:
        sys.exit(f"error: only {len(held_out)} pairs, all held out by --eval_pairs {args.eval_pairs}")
    write_gzip_jsonl(args.eval_out, held_out)
    write_gzip_jsonl(args.out, train)
    pairs = train + held_out
    kinds = sum("作者" in pair["prompt"][-1]["content"] for pair in pairs)
    print(f"{len(pairs)} pairs ({kinds} about authors, {len(pairs) - kinds} recitations): "
          f"{len(train)} in {args.out}, {len(held_out)} held out in {args.eval_out}")


if __name__ == "__main__":
    main()
