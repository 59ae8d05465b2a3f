"""Reading a corpus: its files, their rows, the parsers of each data format, and the rules on bad rows.

A corpus is one or many files (`data_files`: files, directories, glob patterns, read in sorted path order):
JSONL (`.jsonl`, `.jsonl.gz`) line by line and Parquet row group by row group, so a corpus of any size is
read in bounded memory. Rows are numbered across the files as if they were one file (`corpus_rows`), so
what depends on a row's number (the validation split, which rank reads it) does not depend on how the
corpus is cut into shards.

A row that cannot be used (invalid UTF-8 or JSON, a missing field, an unknown role) is skipped and
counted; `BadRows` says when that stops the run, and every message names the file and the row.
"""
import glob
import gzip
import json
import os
import sys

PROBE_LINES = 2000  # lines read before training to check the file and estimate its length
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "tool": "tool"}


class DataError(Exception):
    """Input that cannot be trained on; the message names the file (and line) and is shown as is."""


class BadLine(ValueError):
    """One line that is skipped (or, with --strict, stops the run)."""


def parse_text(record):
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadLine("no non-empty string field 'text'" + mode_hint(record))
    return text


def mode_hint(record):
    """What a row that is not pretraining text is, for --mode auto's users: it chose from the file's name."""
    if "messages" in record or "conversations" in record:
        return " (a conversation: pass --mode sft)"
    if "chosen" in record and "rejected" in record:
        return " (a preference pair: pass --mode dpo)"
    return ""


def parse_conversation(record):
    """Messages as [{"role", "content"}] from `messages` (role/content) or BelleGroup `conversations`; with
    tools, see parse_chat."""
    return parse_chat(record)[0]


def parse_chat(record):
    """(messages, tools) of a conversation row: its messages (parse_conversation), and its `tools` (OpenAI's
    function schemas) or None. With tools, assistant turns may carry `tool_calls` (each call's arguments
    become an object, whether written as a JSON string, as OpenAI sends them, or as an object) and `tool`
    turns give their results; a call must name one of the tools, and a tool turn must answer a call."""
    if isinstance(record.get("messages"), list):
        turns, role_key, content_key = record["messages"], "role", "content"
    elif isinstance(record.get("conversations"), list):
        turns, role_key, content_key = record["conversations"], "from", "value"
    else:
        raise BadLine("no list field 'messages' or 'conversations'")
    tools = parse_tools(record.get("tools"))
    messages = parse_turns(turns, role_key, content_key, tools)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadLine("no assistant turn")
    return messages, tools


def parse_tools(tools):
    """{name: schema} of a row's `tools`, None without; the schemas stay as they are, for the template."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise BadLine("'tools' is not a non-empty list of function schemas")
    names = [tool.get("function", {}).get("name") if isinstance(tool, dict) else None for tool in tools]
    if not all(isinstance(name, str) and name for name in names):
        raise BadLine("a tool of 'tools' has no function name: OpenAI's form is "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    return tools


def parse_turns(turns, role_key="role", content_key="content", tools=None):
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadLine("a turn is not an object")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in ROLES:
            raise BadLine(f"unknown role {role!r}")
        if role == "assistant" and turn.get("tool_calls"):
            messages.append({"role": "assistant", "content": content or "",
                             "tool_calls": parse_tool_calls(turn["tool_calls"], tools)})
            continue
        if not isinstance(content, str):
            raise BadLine(f"{content_key} of a {role} turn is not a string")
        answers_a_call = messages and (messages[-1].get("tool_calls") or messages[-1]["role"] == "tool")
        if ROLES[role] == "tool" and not answers_a_call:
            raise BadLine("a tool turn that answers no call: it must follow an assistant turn with tool_calls")
        messages.append({"role": ROLES[role], "content": content})
    return messages


def parse_tool_calls(calls, tools):
    """[{"type": "function", "function": {"name", "arguments": object}}] of an assistant turn's tool_calls."""
    if tools is None:
        raise BadLine("an assistant turn calls a tool, but the row has no 'tools'")
    names = {tool["function"]["name"] for tool in tools}
    parsed = []
    for call in calls if isinstance(calls, list) else [None]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadLine("a tool call has no function name")
        if function["name"] not in names:
            raise BadLine(f"a call to {function['name']!r}, which is not among the row's tools "
                          f"({', '.join(sorted(names))})")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise BadLine(f"the arguments of a call to {function['name']} are not JSON: {arguments[:40]!r}")
        if not isinstance(arguments, dict):
            raise BadLine(f"the arguments of a call to {function['name']} are not a JSON object")
        parsed.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return parsed


def parse_preference(record):
    """(prompt, chosen, rejected) as message lists from {"prompt": [messages], "chosen": [assistant
    message(s)], "rejected": [...]}, or from the flat form with strings: a user turn and an answer."""
    parts = []
    for key in ("prompt", "chosen", "rejected"):
        value = record.get(key)
        if isinstance(value, str):
            if not value.strip():
                raise BadLine(f"'{key}' is empty")
            parts.append([{"role": "user" if key == "prompt" else "assistant", "content": value}])
        elif isinstance(value, list) and value:
            parts.append(parse_turns(value))
        else:
            raise BadLine(f"no field '{key}' (a string or a non-empty list of messages)")
    prompt, chosen, rejected = parts
    if prompt[-1]["role"] == "assistant":
        raise BadLine("the prompt ends with an assistant turn; the answers are the assistant's")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in answer):
            raise BadLine(f"'{key}' holds a turn that is not the assistant's")
    if chosen == rejected:
        raise BadLine("'chosen' and 'rejected' are the same")
    return prompt, chosen, rejected


def parse_prompt(record):
    """(prompt, columns) of a prompt row for RL: `messages` that end with a user turn (a conversation, which
    the chat template renders) or a `prompt` string (used as it is, as TRL does), and the row's other
    columns as they are (an answer key, the form asked for...), for the reward functions."""
    if isinstance(record.get("messages"), list):
        key, prompt = "messages", parse_turns(record["messages"])
        if not prompt or prompt[-1]["role"] != "user":
            raise BadLine("the messages do not end with a user turn: the model answers the last user turn")
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        key, prompt = "prompt", record["prompt"]
    else:
        raise BadLine("no list field 'messages' ending with a user turn, nor a non-empty string field 'prompt'")
    return prompt, {name: value for name, value in record.items() if name != key}


def parse_texts(record):
    """Every text in a pretraining or SFT record (for tokenizer training)."""
    if "text" in record:
        return [parse_text(record)]
    return [m["content"] for m in parse_conversation(record)]


DATA_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")
PARQUET_COLUMNS = ("text", "messages", "conversations")  # the fields the parsers read


def data_files(data_path):
    """The files of --data_path, sorted by path, each once: `data_path` is a path or a list of them, each
    a file, a directory (its .jsonl, .jsonl.gz and .parquet files, in subdirectories too) or a glob
    pattern. Files given by name or pattern are read whatever their extension (as JSONL unless .parquet)."""
    files = set()
    for spec in [data_path] if isinstance(data_path, str) else data_path:
        if os.path.isdir(spec):
            found = [os.path.join(root, name) for root, _, names in os.walk(spec) for name in names
                     if name.endswith(DATA_EXTENSIONS)]
            if not found:
                raise DataError(f"{spec}: the directory holds no .jsonl, .jsonl.gz or .parquet file")
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
            if not found:
                raise DataError(f"data path {spec}: no file matches the pattern" if glob.has_magic(spec)
                                else f"data file {spec} does not exist; pass --data_path")
        files.update(os.path.normpath(p) for p in found)
    return sorted(files)


def open_binary(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def is_parquet(path):
    return path.endswith(".parquet")


def text_bytes(path, sample=64 << 20):
    """Uncompressed size of a data file; for .gz, extrapolated from the first `sample` bytes' ratio; for
    Parquet, the uncompressed size of its columns."""
    if is_parquet(path):
        import pyarrow.parquet as pq
        metadata = pq.ParquetFile(path).metadata
        return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    with gzip.open(path, "rb") as f:
        uncompressed = 0
        while uncompressed < sample:
            chunk = f.read(1 << 20)
            if not chunk:
                return uncompressed  # read to the end: exact
            uncompressed += len(chunk)
        compressed_read = f.fileobj.tell()
    return int(uncompressed * os.path.getsize(path) / compressed_read)


def read_rows(path):
    """(row_number, raw) for each row of a file, numbered from 1: raw is a JSONL line's bytes (None for
    a blank line, which is numbered but holds nothing) or a Parquet row as a dict. Parquet files are read
    one row group at a time, and only the columns the parsers use."""
    if not is_parquet(path):
        with open_binary(path) as f:
            for row, line in enumerate(f, 1):
                yield row, line if line.strip() else None
        return
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(path)
    columns = [name for name in PARQUET_COLUMNS if name in parquet.schema_arrow.names]
    row = 0
    for group in range(parquet.num_row_groups):
        for record in parquet.read_row_group(group, columns=columns).to_pylist():
            row += 1
            yield row, record


def corpus_rows(files, max_rows=None):
    """(index, path, row, raw) for each row of the files in order; index counts the rows of all the
    files from 1, blank lines included, so a corpus split into shards numbers its rows as one file."""
    index = 0
    for path in files:
        for row, raw in read_rows(path):
            index += 1
            if max_rows is not None and index > max_rows:
                return
            yield index, path, row, raw


def parse_row(raw, parse):
    """parse(record) of a JSONL line or Parquet row; BadLine names what is wrong with it."""
    if isinstance(raw, bytes):
        try:
            raw = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise BadLine("invalid UTF-8")
        except json.JSONDecodeError as e:
            raise BadLine(f"invalid JSON ({e.msg})")
        if not isinstance(raw, dict):
            raise BadLine("not a JSON object")
    return parse(raw)


class BadRows:
    """The bad rows met so far, and the rules on them: stop on the first with `strict`, stop when more
    than `max_bad_fraction` of the rows read are bad (checked from 1000 rows on, and at the end)."""

    def __init__(self, files, strict=False, max_bad_fraction=0.01):
        self.many = len(files) > 1
        self.where = f"{len(files)} files ({files[0]} ... {files[-1]})" if self.many else files[0]
        self.strict, self.max_bad_fraction = strict, max_bad_fraction
        self.seen, self.bad = 0, []  # bad: (index, path, row, reason)

    def add(self, index, path, row, reason):
        if self.strict:
            raise DataError(f"{path}:{row}: {reason} (--strict stops at the first bad line)")
        self.bad.append((index, path, row, reason))
        if self.seen >= 1000 and len(self.bad) > self.max_bad_fraction * self.seen:
            raise DataError(self._too_many())

    def finish(self, nonblank, report_after=0):
        """The checks at the end of a pass; one warning for the bad rows after row `report_after`
        (None: no warning)."""
        if nonblank == 0:
            raise DataError(f"{self.where}: the {'files are' if self.many else 'file is'} empty")
        if self.seen and self.seen == len(self.bad):
            raise DataError(f"{self.where}: no valid sample ({positions(self.bad)})")
        if len(self.bad) > self.max_bad_fraction * self.seen:
            raise DataError(self._too_many())
        reported = [b for b in self.bad if report_after is not None and b[0] > report_after]
        if reported:
            after = f" after its first {report_after} lines" if report_after else ""
            print(f"warning: skipped {len(reported)} bad line(s) in {self.where}{after}: {positions(reported)}",
                  file=sys.stderr)

    def _too_many(self):
        return (f"{self.where}: {len(self.bad)} of the first {self.seen} lines are bad, more than "
                f"--max_bad_fraction {self.max_bad_fraction} ({positions(self.bad)})")


def positions(bad):
    shown = "; ".join(f"{path}:{row}: {reason}" for _, path, row, reason in bad[:3])
    return shown + (" ..." if len(bad) > 3 else "")


def read_records(data_path, parse, keep=None, strict=False, max_bad_fraction=0.01, report_after=0,
                 max_lines=None):
    """Yield (index, parse(record)) for each good row of the corpus (see `data_files`), in order.

    A bad row (invalid UTF-8 or JSON, or rejected by `parse` with BadLine) is skipped and counted; at the
    end one warning gives the count and the first positions (file:row) of those after row `report_after`
    (None: no warning). It stops with DataError on the first bad row when `strict`, when bad rows exceed
    `max_bad_fraction`, or when no row is good. `keep(index)` selects rows (by their index in the whole
    corpus, see `corpus_rows`) before they are parsed; `max_lines` stops early.
    """
    files = data_files(data_path)
    bad_rows, nonblank = BadRows(files, strict, max_bad_fraction), 0
    for index, path, row, raw in corpus_rows(files, max_lines):
        if raw is None:
            continue
        nonblank += 1
        if keep is not None and not keep(index):
            continue
        bad_rows.seen += 1
        try:
            value = parse_row(raw, parse)
        except BadLine as e:
            bad_rows.add(index, path, row, str(e))
        else:
            yield index, value
    bad_rows.finish(nonblank, report_after)


def estimate_rows(path, probe_lines=PROBE_LINES):
    """Rows in a data file: exact for Parquet (its metadata), else its text size over the mean length
    of its first lines."""
    if is_parquet(path):
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    with open_binary(path) as f:
        lengths = [len(line) for _, line in zip(range(probe_lines), f)]
    return text_bytes(path) * len(lengths) / max(1, sum(lengths))
