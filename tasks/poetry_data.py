"""Loads a bundled task's items (a JSONL file beside this one) for lm-eval's `custom_dataset`: the path
is taken relative to this directory, so the tasks run from any working directory and with no network."""
import json
import os

from datasets import Dataset, DatasetDict


def load(data_file, kind=None, **_):
    """The items of data_file; with `kind`, only those of that kind (a file that holds several tasks)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file), encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    return DatasetDict({"test": Dataset.from_list([i for i in items if kind is None or i["kind"] == kind])})


def poem_scores(doc, results):
    """poem_form's scores of the answers to one request (several with `repeats`): form, the share with the
    form asked for; form_rhyme, the share with the form whose even lines rhyme (rewards.py's rules, also
    GRPO's rewards); distinct_bigrams, the answers' character bigrams for the corpus-level share below."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # rewards.py
    from rewards import form_score, poem_lines, rhyme_score
    answers = results[0] if results and isinstance(results[0], list) else results
    form = [form_score(poem_lines(a), doc["lines"], doc["chars_per_line"]) == 1.0 for a in answers]
    rhyme = [f and rhyme_score(poem_lines(a), doc["lines"]) == 1.0 for f, a in zip(form, answers)]
    bigrams = [text[i:i + 2] for text in ("".join(poem_lines(a)) for a in answers) for i in range(len(text) - 1)]
    return {"form": sum(form) / len(form), "form_rhyme": sum(rhyme) / len(rhyme), "distinct_bigrams": bigrams}


def distinct_share(bigrams_of_items):
    """Distinct character bigrams over all bigrams of all answers: how varied the poems are."""
    every = [b for bigrams in bigrams_of_items for b in bigrams]
    return len(set(every)) / max(len(every), 1)


def tool_answer_scores(doc, results):
    """poetry_tools' score of an answer: the author named (who wrote it), or the poem's text character for
    character, punctuation aside (recite), after a first line naming the poem ("《title》 作者：author", as the
    search result heads it), if the answer has one."""
    import re
    answer = results[0]
    if doc["kind"] == "recite":
        chinese = re.compile(r"[\u4e00-\u9fff]")
        head, _, poem = answer.partition("\n")
        if not head.startswith(f"《{doc['title']}》"):
            poem = answer
        return {"right": float(chinese.findall(poem) == chinese.findall(doc["answer"]))}
    return {"right": float(doc["author"] in answer)}
