"""Reward functions for --mode grpo: the built-in ones, loading a user's, and calling them as TRL does.

The convention is TRL's GRPOTrainer's, so that a function written for it runs here unchanged: it is called
with keyword arguments `prompts`, `completions` (for conversational prompts, each completion is
[{"role": "assistant", "content": text}]; otherwise the text), `completion_ids`, and every other column
of the prompt rows by name, each a list with one entry per completion; it returns one float per
completion, or None where it does not apply (that completion is then scored by the other functions only).

Built in, for the demo's task (a regular poem of the form asked for, in rhyme):
- poem_form: the form asked for (the row's `lines` and `chars_per_line`), with partial credit;
- poem_rhyme: the even lines rhyme in one class of 中华新韵, each on a different character;
and for questions with an answer key (tool calling): answer_match, the row's `answer` in the final answer.
A poem's "line" here is a 5- or 7-character half of a written couplet: 床前明月光，疑是地上霜。 is two.
"""
import importlib.util
import math
import numbers
import os
import re

from errors import Fatal

HAN = re.compile(r"[\u4e00-\u9fff]")
LINE_BREAK = re.compile(r"[，。！？；：、,.!?;:\s]+")

# 中华新韵's 14 rhyme classes by pinyin final (pypinyin's spelling: v for ü). The -i of zhi chi shi ri zi
# ci si is 支 and is told apart from the i of 齐 by the initial (see rhyme_class).
RHYME_CLASSES = {
    "麻": ("a", "ia", "ua"), "波": ("o", "e", "uo"), "皆": ("ie", "ve", "ue"), "开": ("ai", "uai"),
    "微": ("ei", "ui", "uei"), "豪": ("ao", "iao"), "尤": ("ou", "iu", "iou"),
    "寒": ("an", "ian", "uan", "van"), "文": ("en", "in", "un", "uen", "vn"),
    "唐": ("ang", "iang", "uang"), "庚": ("eng", "ing", "ong", "iong", "ueng"), "齐": ("i", "er", "v"),
    "姑": ("u",),
}
CLASS_OF_FINAL = {final: name for name, finals in RHYME_CLASSES.items() for final in finals}
BUZZING_INITIALS = ("zh", "ch", "sh", "r", "z", "c", "s")  # their "i" is 支's -i, not 齐's
MIN_DISTINCT = 0.75  # a poem whose characters are fewer than 75% distinct earns nothing (real ones: 0.3%)


def completion_text(completion):
    """The text of a completion in either of TRL's forms."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def poem_lines(text):
    """The poem's lines: runs of Chinese characters between punctuation or line breaks (a title in 《》
    or anything else between them counts too: a poem is asked for, nothing else)."""
    return ["".join(HAN.findall(part)) for part in LINE_BREAK.split(text) if HAN.search(part)]


def form_score(lines, want_lines, want_chars):
    """1.0 for exactly want_lines lines of want_chars characters each. Partial credit, so that a group of
    samples gets a signal long before any sample has the form: the product of how close the number of lines
    is (min/max of the two counts) and the share of the wanted lines that have the right length. A product,
    not a sum: eight lines for a 绝句's four earn half, not three quarters. 0 when the poem's characters
    are under MIN_DISTINCT distinct: a few characters repeated is the cheapest way to fill a form."""
    text = "".join(lines)
    if not lines or len(set(text)) < MIN_DISTINCT * len(text):
        return 0.0
    count = min(len(lines), want_lines) / max(len(lines), want_lines)
    right_length = sum(len(line) == want_chars for line in lines[:want_lines]) / want_lines
    return count * right_length


def rhyme_class(char):
    """The 中华新韵 class of a character's usual reading, or None (not a Chinese character)."""
    from pypinyin import Style, lazy_pinyin
    final = lazy_pinyin(char, style=Style.FINALS, strict=True)[0]
    if final == "i" and lazy_pinyin(char, style=Style.INITIALS, strict=True)[0] in BUZZING_INITIALS:
        return "支"
    return CLASS_OF_FINAL.get(final)


def rhyme_score(lines, want_lines):
    """The share of the even lines after the second (4; 4, 6, 8) that end in the second line's rhyme
    class on a character no earlier rhyme used (重韵, the same character rhymed twice, is a flaw and the
    cheapest way to game a rhyme reward). Lines missing from the poem count as misses. 0 when the poem's
    characters are under MIN_DISTINCT distinct: repeating a few characters is the other cheap way."""
    if len(lines) < 2:
        return 0.0
    text = "".join(lines)
    if len(set(text)) < MIN_DISTINCT * len(text):
        return 0.0
    rhyme, used = rhyme_class(lines[1][-1]), {lines[1][-1]}
    hits = 0
    for index in range(3, want_lines, 2):  # lines 4, 6, 8 (0-based 3, 5, 7)
        if index < len(lines):
            last = lines[index][-1]
            if rhyme is not None and rhyme_class(last) == rhyme and last not in used:
                hits += 1
            used.add(last)
    return hits / (want_lines // 2 - 1)


def poem_form(completions, lines, chars_per_line, **kwargs):
    """Built-in reward: form_score of each completion against its row's `lines` and `chars_per_line`."""
    return [form_score(poem_lines(completion_text(c)), want_lines, want_chars)
            for c, want_lines, want_chars in zip(completions, lines, chars_per_line)]


def poem_rhyme(completions, lines, **kwargs):
    """Built-in reward: rhyme_score of each completion for its row's number of `lines`."""
    return [rhyme_score(poem_lines(completion_text(c)), want_lines) for c, want_lines in zip(completions, lines)]


def answer_match(completions, answer, **kwargs):
    """Built-in reward: 1 when the final answer holds the row's `answer` (an author's name, say), else 0.
    With tools, the completion's text is its last turn: the answer given after the calls."""
    return [float(str(key) in completion_text(c)) for c, key in zip(completions, answer)]


BUILT_IN = {"poem_form": poem_form, "poem_rhyme": poem_rhyme, "answer_match": answer_match}


def load_reward(spec):
    """(name, function) of a --reward entry: a built-in name, or FILE.py:FUNCTION."""
    if spec in BUILT_IN:
        return spec, BUILT_IN[spec]
    path, _, function = spec.rpartition(":")
    if not path.endswith(".py") or not function:
        raise Fatal(f"--reward {spec!r}: not a built-in reward ({', '.join(BUILT_IN)}) nor FILE.py:FUNCTION")
    if not os.path.isfile(path):
        raise Fatal(f"--reward {spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"reward_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise Fatal(f"--reward {spec}: {path} fails to load: {type(e).__name__}: {e}")
    if not callable(getattr(module, function, None)):
        raise Fatal(f"--reward {spec}: {path} has no function {function}")
    return function, getattr(module, function)


def score(rewards, where, prompts, completions, completion_ids, columns):
    """[[reward of each function] of each completion], NaN where a function returned None. Any error of a
    function (it raised, returned the wrong number of values or something that is not a number) stops the
    run with one line naming the function and `where` ("step 12")."""
    table = [[math.nan] * len(rewards) for _ in completions]
    for f, (name, function) in enumerate(rewards):
        context = f"reward {name} at {where}"
        try:
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:
            raise Fatal(f"{context} raised {type(e).__name__}: {e}")
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise Fatal(f"{context} returned {got} for {len(completions)} completions")
        for i, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise Fatal(f"{context} returned {value!r} for completion {i}: not a finite number or None")
            table[i][f] = float(value)
    return table
