"""Build the demo's data for the poem-form task (RL with verifiable rewards) from the shipped poems.

    python build_rl_data.py                       (reads ../shared/data/pretrain_poetry.jsonl)

The task: "write a 五言绝句 / 七言绝句 / 五言律诗 / 七言律诗 titled 《X》", answered by a poem of that form
(4 or 8 lines of 5 or 7 characters; rewards.py), in rhyme. Four files, seeded (the same every time):
- data/sft_poetry_forms.jsonl.gz: the demo's SFT data: data/sft_poetry.jsonl.gz's conversations with form
  requests interleaved (one after each of the first ones), each answered by a regular poem of the
  shipped sample (the first 20,000 documents) of the form asked for, under its own title, so that SFT
  teaches the form first. Only poems whose even lines rhyme by rewards.py's rule answer: SFT shows the
  craft it is asked to learn. Interleaved in one file because SFT reads its files in order and shuffles
  only within windows of 64 batches: a second file would train the forms first and the rest after.
- data/sft_poem_forms.jsonl.gz: the same form requests alone, for the second SFT pass of `train.sh rl`.
- data/poem_form_prompts.jsonl.gz: GRPO's prompts, form requests on titles of the shipped sample, with the
  columns the rewards read (lines, chars_per_line) and the title.
- tasks/poem_form.jsonl: held-out requests for lm-eval (tasks/poem_form.yaml), on titles no training file
  uses (from documents after the 40,000th), in sentences no training prompt uses (the forms' names are the
  same: a model cannot know that 五律 means 五言律诗 unless it has read it).
The training phrasings and the held-out ones are disjoint lists below; so are the titles.
"""
import argparse
import gzip
import json
import os
import random
import sys

from build_eval_tasks import FIRST_HELD_OUT, SHIPPED_DOCUMENTS, read_corpus, write_jsonl
from rewards import poem_lines, rhyme_score

REPO = os.path.dirname(os.path.abspath(__file__))
FORMS = {(4, 5): ["五言绝句", "五绝"], (4, 7): ["七言绝句", "七绝"], (8, 5): ["五言律诗", "五律"],
         (8, 7): ["七言律诗", "七律"]}  # the forms' names, in full and short: training and held-out use both
TRAIN_PHRASINGS = [
    "请写一首{form}，题目是《{title}》。", "以《{title}》为题，写一首{form}。", "写一首题为《{title}》的{form}。",
    "请以《{title}》为题作{form}一首。", "你能写一首{form}吗？题目：《{title}》", "题目：《{title}》。体裁：{form}。",
    "请创作一首{form}，题为《{title}》。", "《{title}》，请用{form}写出来。",
]
HELD_OUT_PHRASINGS = [
    "来一首{form}，写《{title}》。", "帮我作首{form}，就叫《{title}》吧。", "我想读一首关于《{title}》的{form}。",
    "试着用{form}的格律，吟咏《{title}》。",
]


def regular_form(lines):
    """(lines, chars per line) of a regular poem of one of the four forms, or None."""
    halves = poem_lines("\n".join(lines))
    key = (len(halves), len(halves[0])) if halves else None
    return key if key in FORMS and all(len(h) == key[1] for h in halves) else None


def request(rng, phrasings, title, lines, chars):
    form_name = rng.choice(FORMS[lines, chars])
    return request_as(rng.choice(phrasings), form_name, title, lines, chars)


def request_as(phrasing, form_name, title, lines, chars):
    return {"messages": [{"role": "user", "content": phrasing.format(form=form_name, title=title)}],
            "lines": lines, "chars_per_line": chars, "title": title}


def build(corpus, sft_items, prompt_items, held_out_items, seed):
    docs = read_corpus(corpus)
    rng = random.Random(seed)
    shipped = [doc for doc in docs[:SHIPPED_DOCUMENTS] if doc]
    shipped_titles = {doc[0] for doc in docs[:FIRST_HELD_OUT] if doc}  # in a shipped file or quoted by SFT
    poems = [(doc, form) for doc in shipped if (form := regular_form(doc[2]))]
    rhyming = [(doc, form) for doc, form in poems if rhyme_score(poem_lines("\n".join(doc[2])), form[0]) == 1.0]
    print(f"{len(poems)} regular poems of the four forms in the shipped sample, {len(rhyming)} of them rhyme")
    rng.shuffle(rhyming)
    sft = []
    for (title, _, lines), (count, chars) in rhyming[:sft_items]:
        asked = request(rng, TRAIN_PHRASINGS, title, count, chars)
        sft.append({"messages": asked["messages"] + [{"role": "assistant", "content": "\n".join(lines)}]})
    titles = sorted({doc[0] for doc in shipped if len(doc[0]) <= 8})
    prompts = []
    for _ in range(prompt_items):
        count, chars = rng.choice(sorted(FORMS))
        prompts.append(request(rng, TRAIN_PHRASINGS, rng.choice(titles), count, chars))
    new_titles = sorted({doc[0] for doc in docs[FIRST_HELD_OUT:] if doc and len(doc[0]) <= 8} - shipped_titles)
    rng.shuffle(new_titles)
    held_out = []
    for i, title in enumerate(new_titles[:held_out_items]):
        count, chars = sorted(FORMS)[i % 4]
        item = request(rng, HELD_OUT_PHRASINGS, title, count, chars)
        held_out.append({"request": item["messages"][0]["content"], "lines": count, "chars_per_line": chars,
                         "title": title})
    return sft, prompts, held_out


def interleave(conversations, forms):
    """A form request after each conversation while they last, the rest of either list at the end."""
    mixed = [row for pair in zip(conversations, forms) for row in pair]
    return mixed + conversations[len(forms):] + forms[len(conversations):]


def write_gzip_jsonl(path, records):
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes every time
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(REPO, "..", "shared", "data", "pretrain_poetry.jsonl"),
                   help="the full pretraining corpus whose first 20,000 documents are data/pretrain_poetry")
    p.add_argument("--data_dir", default=os.path.join(REPO, "data"))
    p.add_argument("--tasks_dir", default=os.path.join(REPO, "tasks"))
    p.add_argument("--sft_items", type=int, default=4000)
    p.add_argument("--prompts", type=int, default=4000)
    p.add_argument("--held_out", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(args.corpus):
        sys.exit(f"error: {args.corpus} does not exist; pass --corpus (the full pretrain_poetry.jsonl)")
    sft, prompts, held_out = build(args.corpus, args.sft_items, args.prompts, args.held_out, args.seed)
    with gzip.open(os.path.join(args.data_dir, "sft_poetry.jsonl.gz"), "rt", encoding="utf-8") as f:
        conversations = [json.loads(line) for line in f]
    write_gzip_jsonl(os.path.join(args.data_dir, "sft_poetry_forms.jsonl.gz"), interleave(conversations, sft))
    write_gzip_jsonl(os.path.join(args.data_dir, "sft_poem_forms.jsonl.gz"), sft)
    write_gzip_jsonl(os.path.join(args.data_dir, "poem_form_prompts.jsonl.gz"), prompts)
    write_jsonl(os.path.join(args.tasks_dir, "poem_form.jsonl"), held_out)
    print(f"{len(sft)} SFT form requests, {len(prompts)} GRPO prompts, {len(held_out)} held-out requests")


if __name__ == "__main__":
    main()

