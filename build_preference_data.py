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
  collection and the same number of lines, by another poet.

The prompt is the conversation up to its last question (system prompt and earlier turns included); the
answers are the last turn's. Poems of more than --max_lines lines are left out, to keep sequences short.
A random --eval_pairs of the pairs go to the held-out file (pass it as --val_data_path). Seeded: the
same files every time.
"""
import argparse
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


def build(conversations, docs, max_lines, seed):
    rng = random.Random(seed)
    collection, known = poet_collections(docs)
    read = {(doc[0], doc[1]): doc[2] for doc in docs[:SHIPPED_DOCUMENTS] if doc}
    poets = sorted(a for a in known if known[a] >= 3 and a not in NOT_AUTHORS)
    poems_by_shape = {}  # (collection, number of lines) -> poems of the shipped sample, for wrong poems
    for (title, author), lines in sorted(read.items()):
        poems_by_shape.setdefault((collection.get(author), len(lines)), []).append((author, "\n".join(lines)))

    pairs = []
    for messages in conversations:
        prompt, answer = messages[:-1], messages[-1]["content"]
        question = prompt[-1]["content"]
        if (match := AUTHOR_ANSWER.fullmatch(answer)) and question == f"《{match.group(1)}》的作者是谁？":
            title, author = match.groups()
            if (title, author) not in read or author in NOT_AUTHORS or len(read[title, author]) > max_lines:
                continue
            wrong = rng.choice([p for p in poets if collection.get(p) == collection.get(author) and p != author])
            rejected = f"《{title}》的作者是{wrong}。"
        elif match := RECITE_QUESTION.fullmatch(question):
            author, title = match.groups()
            lines = read.get((title, author))
            if lines is None or len(lines) > max_lines or answer != "\n".join(lines):
                continue
            others = [poem for poet, poem in poems_by_shape[collection.get(author), len(lines)] if poet != author]
            if not others:
                continue
            rejected = rng.choice(others)
        else:
            continue
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    rng.shuffle(pairs)
    return pairs


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
    p.add_argument("--eval_pairs", type=int, default=400, help="pairs held out for evaluation")
    p.add_argument("--max_lines", type=int, default=4, help="longest poem, in lines")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in (args.conversations, args.corpus):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} does not exist; pass --conversations and --corpus (the full files)")
    with open(args.conversations, encoding="utf-8") as f:
        conversations = [json.loads(line)["messages"] for line in f][SHIPPED_CONVERSATIONS:]
    pairs = build(conversations, read_corpus(args.corpus), args.max_lines, args.seed)
    if len(pairs) <= args.eval_pairs:
        sys.exit(f"error: only {len(pairs)} pairs, not more than --eval_pairs {args.eval_pairs}")
    write_gzip_jsonl(args.eval_out, pairs[:args.eval_pairs])
    write_gzip_jsonl(args.out, pairs[args.eval_pairs:])
    kinds = sum("作者" in pair["prompt"][-1]["content"] for pair in pairs)
    print(f"{len(pairs)} pairs ({kinds} about authors, {len(pairs) - kinds} recitations): "
          f"{len(pairs) - args.eval_pairs} in {args.out}, {args.eval_pairs} held out in {args.eval_out}")


if __name__ == "__main__":
    main()
