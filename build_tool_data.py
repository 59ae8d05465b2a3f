"""Build the demo's tool-calling data: the poem index search_poems reads, tool conversations for SFT, and
held-out tasks, from the full poetry corpus.

    python build_tool_data.py                       (reads ../shared/data/pretrain_poetry.jsonl)

- data/poem_index.jsonl.gz: title, author and text of every poem of the corpus, held-out ones included:
  the tool's knowledge (tools.py), never training text.
- data/sft_tools.jsonl.gz: conversations in OpenAI's format, with `tools`: a question about a poem (who wrote
  it, by its title or by a quoted line; or to recite it), the assistant's call of search_poems, the tool's
  real answer from the index, and the assistant's answer read from it (several poets for a title several
  wrote). Only poems the training files already hold (the first 20,000 documents) are asked about, in many
  phrasings, with and without a system prompt. A share of the conversations needs no tool (the form
  requests of build_rl_data.py's SFT data, greetings): the model learns when not to call.
- data/copy_drills.jsonl.gz: the opening of every poem of the shipped pretraining sample (10 to 60
  characters, title and author included) written two or three times, one copy a line. The demo's model
  copies nothing from its context until it has read such text (docs/tools.md): `train.sh tools` reads these
  first, then the conversations, whose answers are copied from the tool's result.
- tasks/poetry_tools.jsonl: held-out questions (poems after the 40,000th document, titles no training file
  uses), phrased in words no training conversation uses: who wrote a poem whose title only it has, or
  whose line is quoted; and recite a poem whose title only it has and the tool's result shows whole.
  Scored by eval.py --tools search_poems.
All seeded: the same files every time.
"""
import argparse
import collections
import gzip
import json
import os
import random
import sys

from build_eval_tasks import FIRST_HELD_OUT, SHIPPED_DOCUMENTS, read_corpus, write_jsonl
from build_rl_data import write_gzip_jsonl

REPO = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = [None, "你是一个熟读古诗词的AI助手。", "你可以使用工具查找诗词。"]
BY_TITLE = ["《{title}》的作者是谁？", "谁写了《{title}》？", "《{title}》是哪位诗人的作品？",
            "请问《{title}》出自谁手？", "《{title}》这首诗是谁写的？", "你知道《{title}》的作者吗？",
            "查一下《{title}》的作者。", "《{title}》，作者是哪位？", "《{title}》是谁的诗？",
            "我想知道《{title}》是谁写的。"]
BY_LINE = ["“{line}”出自哪首作品？", "“{line}”是谁写的？", "“{line}”这句诗的作者是谁？", "哪首诗里有“{line}”？",
           "“{line}”出自谁的诗？", "请问“{line}”是哪首诗中的句子？", "“{line}”——这是谁的诗句？",
           "查查“{line}”的出处。"]
RECITE = ["请背诵《{title}》。", "背一下《{title}》。", "《{title}》全文是什么？", "请写出《{title}》的全文。"]
# Held-out phrasings: no training conversation uses them.
HELD_OUT_BY_TITLE = ["帮我查查《{title}》是哪个诗人写的。", "《{title}》——作者叫什么名字？"]
HELD_OUT_BY_LINE = ["有句诗叫“{line}”，作者是谁？", "“{line}”这句，是哪位诗人写的？"]
HELD_OUT_RECITE = ["能把《{title}》完整地念给我听吗？"]
GREETINGS = [("你好！", "你好！我是诗词助手，可以帮你查找和背诵诗词。"), ("谢谢你。", "不客气！"),
             ("你能做什么？", "我可以背诵诗词、回答诗词的作者和出处，也可以按要求写诗。")]


def answer_author(title, author, authors):
    """The assistant's answer: the author, or, where several poets wrote the title, all of them. It repeats the
    result's "《title》 作者：author" (tools.format_matches), so that the name follows the same tokens in the
    answer as in the result and a model that copies (an induction head) gets it right; after "的作者是" it did
    not, and " 李白", the result's old "《title》 李白", is another token than "李白" (docs/tools.md)."""
    if len(authors) > 1:
        return f"《{title}》有多位诗人写过：{'、'.join(authors)}。"
    from tools import poem_header
    return f"{poem_header(title, author)}。"


def recitable(doc):
    """Whether a poem can be recited from the tool's result: the result shows its text whole."""
    from tools import MAX_POEM_CHARS
    return len("\n".join(doc[2])) <= MAX_POEM_CHARS


def tool_conversation(rng, question, query, result, answer):
    """A conversation: (a system prompt,) the question, the call, the tool's result, the assistant's answer."""
    from tools import SEARCH_POEMS
    messages = [{"role": "system", "content": system} for system in [rng.choice(SYSTEMS)] if system]
    call_id = f"call_{rng.randrange(10 ** 8)}"
    call = {"name": "search_poems", "arguments": json.dumps({"query": query}, ensure_ascii=False)}
    messages += [{"role": "user", "content": question},
                 {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function",
                                                                      "function": call}]},
                 {"role": "tool", "tool_call_id": call_id, "content": result},
                 {"role": "assistant", "content": answer}]
    return {"tools": [SEARCH_POEMS], "messages": messages}


def build(corpus, data_dir, tasks_dir, conversations, held_out_count, seed):
    from tools import PoemIndex
    docs = read_corpus(corpus)
    rng = random.Random(seed)
    authors_of = collections.defaultdict(list)
    for doc in docs:
        if doc and doc[1] not in authors_of[doc[0]]:
            authors_of[doc[0]].append(doc[1])
    index_path = os.path.join(data_dir, "poem_index.jsonl.gz")
    write_gzip_jsonl(index_path, [{"title": d[0], "author": d[1], "text": "\n".join(d[2])} for d in docs if d])
    index = PoemIndex(index_path)

    def search(query):
        from tools import format_matches
        return format_matches(query, index.search(query))
    known = [doc for doc in docs[:SHIPPED_DOCUMENTS] if doc and len(doc[0]) <= 12 and doc[2]]
    rows = [training_conversation(rng, rng.choice(known), authors_of, search) for _ in range(conversations)]
    rows += no_tool_conversations(rng, data_dir, conversations // 4)
    rng.shuffle(rows)
    write_gzip_jsonl(os.path.join(data_dir, "sft_tools.jsonl.gz"), rows)
    write_gzip_jsonl(os.path.join(data_dir, "copy_drills.jsonl.gz"), copy_drills(random.Random(seed), data_dir))
    held_out = held_out_items(random.Random(seed + 1), docs, authors_of, held_out_count)  # apart from the above
    write_jsonl(os.path.join(tasks_dir, "poetry_tools.jsonl"), held_out)
    print(f"{sum(1 for _ in index_rows(docs))} poems in the index, {len(rows)} SFT conversations "
          f"({conversations} with a call), {len(held_out)} held-out questions")


def index_rows(docs):
    return (doc for doc in docs if doc)


def training_conversation(rng, doc, authors_of, search):
    """A tool conversation about a poem of the training files: who wrote it (by title or line), or recite it."""
    from tools import best_match, poem_header
    title, author, lines = doc
    kind = rng.random()
    if 0.45 <= kind < 0.75:
        line = clause(rng, lines)
        question, result = rng.choice(BY_LINE).format(line=line), search(line)
        # The result's header again, as answer_author's: the poem the search ranks first, which is another poem
        # with the same line where two share it (95 of the 6,000 conversations).
        return tool_conversation(rng, question, line, result, f"出自{result.splitlines()[0]}。")
    result = search(title)
    # A recitation repeats the result's first match, header and all, where that is the poem whole: the model
    # copies it from the start, where a poem's first character has no cue before it that the result shares.
    recital = poem_header(title, author) + "\n" + "\n".join(lines)
    if kind >= 0.75 and best_match(result) == recital:
        question, answer = rng.choice(RECITE).format(title=title), recital
    else:
        question, answer = rng.choice(BY_TITLE).format(title=title), answer_author(title, author, authors_of[title])
    return tool_conversation(rng, question, title, result, answer)


def clause(rng, lines):
    """A clause of one of the poem's lines (between punctuation), the kind of line people quote."""
    import re
    clauses = [c for line in lines for c in re.split(r"[，。！？；、]", line) if len(c) >= 4]
    return rng.choice(clauses) if clauses else lines[0].rstrip("，。！？；")


def no_tool_conversations(rng, data_dir, count):
    """Conversations that need no tool, with the tool offered: form requests and greetings."""
    from tools import SEARCH_POEMS
    with gzip.open(os.path.join(data_dir, "sft_poetry_forms.jsonl.gz"), "rt", encoding="utf-8") as f:
        forms = [json.loads(line) for line in f]
    forms = [r for r in forms if len(r["messages"]) == 2 and "写" in r["messages"][0]["content"]]
    rows = []
    for _ in range(count):
        if rng.random() < 0.2:
            question, answer = rng.choice(GREETINGS)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        else:
            messages = rng.choice(forms)["messages"]
        system = rng.choice(SYSTEMS)
        rows.append({"tools": [SEARCH_POEMS],
                     "messages": ([{"role": "system", "content": system}] if system else []) + messages})
    return rows


def copy_drills(rng, data_dir):
    """Each poem of the shipped pretraining sample: its opening written two or three times, a copy a line."""
    with gzip.open(os.path.join(data_dir, "pretrain_poetry.jsonl.gz"), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [{"text": "\n".join([text[:rng.randrange(10, 61)]] * rng.choice((2, 3)))} for text in texts]


def held_out_items(rng, docs, authors_of, count):
    """Held-out questions: poems after the 40,000th document whose title no training file uses."""
    trained_titles = {doc[0] for doc in docs[:FIRST_HELD_OUT] if doc}
    candidates = [doc for doc in docs[FIRST_HELD_OUT:] if doc and doc[0] not in trained_titles and doc[2]
                  and len(authors_of[doc[0]]) == 1 and len(doc[0]) <= 12]
    rng.shuffle(candidates)
    kinds = [("title", "line", "recite")[i % 3] for i in range(count)]
    to_recite = [doc for doc in candidates if recitable(doc)][:kinds.count("recite")]
    recited = {id(doc) for doc in to_recite}
    to_recite, to_ask = iter(to_recite), iter(doc for doc in candidates if id(doc) not in recited)
    items = []
    for kind in kinds:
        title, author, lines = next(to_recite if kind == "recite" else to_ask)
        if kind == "title":
            question, answer = rng.choice(HELD_OUT_BY_TITLE).format(title=title), author
        elif kind == "line":
            question, answer = rng.choice(HELD_OUT_BY_LINE).format(line=clause(rng, lines)), author
        else:
            question, answer = rng.choice(HELD_OUT_RECITE).format(title=title), "\n".join(lines)
        items.append({"kind": kind, "question": question, "answer": answer, "title": title, "author": author})
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(REPO, "..", "shared", "data", "pretrain_poetry.jsonl"))
    p.add_argument("--data_dir", default=os.path.join(REPO, "data"))
    p.add_argument("--tasks_dir", default=os.path.join(REPO, "tasks"))
    p.add_argument("--conversations", type=int, default=6000, help="conversations with a call")
    p.add_argument("--held_out", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(args.corpus):
        sys.exit(f"error: {args.corpus} does not exist; pass --corpus (the full pretrain_poetry.jsonl)")
    build(args.corpus, args.data_dir, args.tasks_dir, args.conversations, args.held_out, args.seed)


if __name__ == "__main__":
    main()
