"""Tools a model can call, and the parsing of its calls: the built-in search_poems, its index, and the
<tool_call> format of the chat template (tokenizer.py).

search_poems(query) searches an index of every poem of the corpus (data/poem_index.jsonl.gz: title,
author and text, held-out poems included: the index is the tool's knowledge, not training text) with
SQLite's FTS5 and its trigram tokenizer, which matches Chinese without a word segmenter: a title, an
author or a quoted line. The SQLite file is built from the shipped JSONL on first use (a few seconds) and
kept beside it. The answer is short text: the best match whole (title, author, full text: the model can
recite it), the next ones by title, author and first line, so that a title several poets wrote shows
them all.

A call is written <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>; parse_tool_calls reads
the calls of a model's answer and tells a malformed one (not JSON, an unknown tool) from a call, so that
what cannot run comes back as plain text.
"""
import gzip
import json
import os
import re
import sqlite3
import threading

REPO = os.path.dirname(os.path.abspath(__file__))
POEM_INDEX = os.path.join(REPO, "data", "poem_index.jsonl.gz")
MAX_RESULTS = 4
MAX_TOOL_CALLS = 2  # calls per answer at most, by default (generate.py, eval.py, rollouts)
MAX_POEM_CHARS = 160  # the best match's text, cut here: a long ci would fill a small model's context
CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
QUERY_NOISE = re.compile(r"[《》“”\"'‘’「」\s，。？！、：:,.?!]+")

SEARCH_POEMS = {
    "type": "function",
    "function": {
        "name": "search_poems",
        "description": "搜索诗词库：按题目、作者或诗句查找诗词，返回题目、作者和诗文",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "题目、作者或诗句"}},
                       "required": ["query"]},
    },
}


class PoemIndex:
    """The FTS5 index of the poems, built from the JSONL once; safe to query from several threads."""

    def __init__(self, source=POEM_INDEX, path=None):
        self.path = path or source.removesuffix(".jsonl.gz") + ".sqlite"
        if not up_to_date(self.path, source):
            build_index(source, self.path)
        self.local = threading.local()

    def connection(self):
        if not hasattr(self.local, "connection"):
            self.local.connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        return self.local.connection

    def search(self, query, limit=MAX_RESULTS):
        """[(title, author, text)] best first: exact titles, then full-text matches by BM25 (title weighed
        most, then author, then text). Queries under 3 characters, which trigrams cannot match, look up
        titles and authors exactly."""
        title = query.strip().strip("《》“”\"'")  # as written: some titles hold two spaces
        query = QUERY_NOISE.sub(" ", query).strip()
        if not query:
            return []
        db = self.connection()
        exact = db.execute("SELECT title, author, text FROM poems WHERE title IN (?, ?) UNION ALL SELECT title, "
                           "author, text FROM poems WHERE author = ? LIMIT ?", (title, query, query, limit)).fetchall()
        if len(query.replace(" ", "")) < 3:
            return exact
        phrase = " ".join(f'"{part}"' for part in query.split() if len(part) >= 3) or f'"{query}"'
        ranked = db.execute("SELECT poems.title, poems.author, poems.text FROM search JOIN poems ON poems.rowid = "
                            "search.rowid WHERE search MATCH ? ORDER BY bm25(search, 10.0, 5.0, 1.0) LIMIT ?",
                            (phrase, limit)).fetchall()
        return list(dict.fromkeys(exact + ranked))[:limit]


INDEX_VERSION = 2  # the SQLite file's layout; a file of another version is rebuilt


def up_to_date(path, source):
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(source):
        return False
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute("PRAGMA user_version").fetchone()[0] == INDEX_VERSION


def build_index(source, path):
    """The SQLite file of the JSONL's poems, written atomically: a table `poems` (title, author, text) with
    indexes for exact titles and authors, and the FTS5 table `search` over it, trigram-tokenized."""
    tmp = f"{path}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.remove(tmp)
    db = sqlite3.connect(tmp)
    db.execute("CREATE TABLE poems (title TEXT, author TEXT, text TEXT)")
    with gzip.open(source, "rt", encoding="utf-8") as f:
        db.executemany("INSERT INTO poems VALUES (?, ?, ?)",
                       ((p["title"], p["author"], p["text"]) for p in map(json.loads, f)))
    db.execute("CREATE INDEX poems_title ON poems (title)")
    db.execute("CREATE INDEX poems_author ON poems (author)")
    db.execute("CREATE VIRTUAL TABLE search USING fts5(title, author, text, content='poems', tokenize='trigram')")
    db.execute("INSERT INTO search(search) VALUES ('rebuild')")
    db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
    db.commit()
    db.close()
    os.replace(tmp, path)


_index = None


def search_poems(query):
    """The built-in tool: the matches of query as text (format_matches)."""
    global _index
    if _index is None:
        _index = PoemIndex()
    if not isinstance(query, str) or not query.strip():
        return "查询为空。"
    return format_matches(query, _index.search(query))


RELATED = "相关："  # the start of each match's line after the best one


def poem_header(title, author):
    """The line over the best match, which the tool data's answers repeat (build_tool_data.answer_author)."""
    return f"《{title}》 作者：{author}"


def best_match(result):
    """The best match of a format_matches text, header and text, without the others."""
    return result.split("\n" + RELATED)[0]


def format_matches(query, matches):
    """The best match whole, under "《title》 作者：author", the others by title, author and first line; or a note
    that there is none. The tool data's answers repeat the header (build_tool_data.answer_author), and the
    others are written without 《》 and 作者：, so that what a model copies occurs once in the result."""
    if not matches:
        return f"没有找到与“{query}”相关的诗词。"
    (title, author, text), others = matches[0], matches[1:]
    lines = [f"{poem_header(title, author)}\n{text[:MAX_POEM_CHARS]}"]
    lines += [f"{RELATED}{t}（{a}）{x.splitlines()[0] if x else ''}" for t, a, x in others]
    return "\n".join(lines)


BUILT_IN = {"search_poems": (SEARCH_POEMS, search_poems)}


def tool_schemas(names):
    return [BUILT_IN[name][0] for name in names]


def run_tool(name, arguments):
    """The result text of a call to a built-in tool; errors come back as text for the model to read."""
    if name not in BUILT_IN:
        return f"没有名为 {name} 的工具。"
    try:
        return BUILT_IN[name][1](**arguments)
    except TypeError as e:
        return f"调用 {name} 的参数有误：{e}"


def parse_tool_calls(text, tool_names):
    """(content, calls, malformed) of a model's answer: the text outside <tool_call> blocks, the calls as
    [{"name", "arguments": dict}], and whether any block was not a call to one of tool_names (not JSON, no
    name, an unknown tool): the caller then treats the whole answer as plain content."""
    calls, malformed = [], False
    for block in CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            malformed = True
            continue
        if not isinstance(call, dict) or call.get("name") not in tool_names or \
                not isinstance(call.get("arguments", {}), dict):
            malformed = True
            continue
        calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    content = CALL.sub("", text).strip()
    return content, calls, malformed
