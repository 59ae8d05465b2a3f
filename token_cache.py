"""The token cache: the training split of a pretraining corpus tokenized once into a flat file of ids,
which PretrainDataset then reads with numpy.memmap instead of tokenizing again (several epochs, many GPUs).

Worker processes tokenize chunks of rows while the main process reads the files and writes the ids in
corpus order, so the file is the same bytes whatever the number of workers. The build saves its progress
as it goes: an interrupted build (Ctrl-C, a killed job) continues on the next run.
"""
import collections
import hashlib
import json
import multiprocessing
import os
import signal
import time

import numpy as np

from corpus import PROBE_LINES, BadLine, BadRows, corpus_rows, data_files, parse_row

def tokenize_documents(tokenizer, texts, end_of_text):
    """One int64 token array per text, ending with <|endoftext|>."""
    if not texts:
        return []
    return [np.array(ids + [end_of_text], dtype=np.int64)
            for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def cache_dtype(tokenizer):
    return np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32


def token_cache_fingerprint(dataset):
    """What the cached tokens depend on: the data files, the tokenizer and the train/validation split."""
    with open(os.path.join(dataset.tokenizer.name_or_path, "tokenizer.json"), "rb") as f:
        tokenizer_digest = hashlib.sha256(f.read()).hexdigest()
    files = [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime] for p in data_files(dataset.data_path)]
    return {"files": files, "tokenizer_sha256": tokenizer_digest, "val_every": dataset.val_every}


_cache_worker = None  # (tokenizer, parse, end_of_text, dtype) in a token cache worker process


def _start_cache_worker(tokenizer, parse, end_of_text, dtype):
    global _cache_worker
    # One thread per worker: the processes are the parallelism. Ctrl-C is the main process's to handle;
    # SIGTERM must kill (the pool's terminate() sends it), whatever handler the forking process had.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _cache_worker = (tokenizer, parse, end_of_text, dtype)


def _tokenize_chunk(rows):
    """(token bytes, bad rows) of a chunk of (index, path, row, raw) rows, in a worker."""
    tokenizer, parse, end_of_text, dtype = _cache_worker
    texts, bad = [], []
    for index, path, row, raw in rows:
        try:
            texts.append(parse_row(raw, parse))
        except BadLine as e:
            bad.append((index, path, row, str(e)))
    docs = tokenize_documents(tokenizer, texts, end_of_text)
    return (np.concatenate(docs).astype(dtype).tobytes() if docs else b""), bad


def _cache_chunks(files, keep, first_index, chunk_rows):
    """(last index, nonblank rows, kept rows) for each run of `chunk_rows` rows after `first_index`."""
    rows, nonblank, last = [], 0, first_index
    for index, path, row, raw in corpus_rows(files):
        if index <= first_index:
            continue  # done before the interruption
        last = index
        if raw is not None:
            nonblank += 1
            if keep(index):
                rows.append((index, path, row, raw))
        if index % chunk_rows == 0:
            yield last, nonblank, rows
            rows, nonblank = [], 0
    if last > first_index and last % chunk_rows:
        yield last, nonblank, rows


def _write_json(path, value):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def build_token_cache(dataset, path, num_workers=1, chunk_rows=1024, save_every=64):
    """Tokenize the training split once into `path` (uint16 or uint32 ids), unless it is up to date.

    `num_workers` processes tokenize chunks of `chunk_rows` rows while this one reads the files and
    writes the tokens in corpus order, so the file is the same bytes whatever the number of workers.
    Every `save_every` chunks the tokens so far are synced to `path`.partial and the position reached to
    `path`.partial.json: an interrupted build (Ctrl-C, a killed job) continues from there on the next
    call with the same data and tokenizer. The complete stream is renamed to `path`, with its fingerprint
    beside it in `path`.json. Returns True when it had to build (or finish) the cache.
    """
    fingerprint = token_cache_fingerprint(dataset)
    meta_path, partial, progress_path = path + ".json", path + ".partial", path + ".partial.json"
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == fingerprint:
                return False
    progress = {"fingerprint": fingerprint, "index": 0, "bytes": 0, "seen": 0, "nonblank": 0, "bad": []}
    if os.path.exists(progress_path) and os.path.exists(partial):
        with open(progress_path) as f:
            saved = json.load(f)
        if saved["fingerprint"] == fingerprint:
            progress = saved
            print(f"continuing the token cache {path} from row {progress['index']:,} "
                  f"({progress['bytes'] / 1e6:.1f} MB done)")
    files = data_files(dataset.data_path)
    bad_rows = BadRows(files, dataset.strict, dataset.max_bad_fraction)
    bad_rows.seen, bad_rows.bad = progress["seen"], [tuple(b) for b in progress["bad"]]
    dtype = cache_dtype(dataset.tokenizer)
    start, start_bytes = time.perf_counter(), progress["bytes"]

    def save_progress(out):
        out.flush()
        os.fsync(out.fileno())
        _write_json(progress_path, {**progress, "seen": bad_rows.seen, "bad": bad_rows.bad})

    context = multiprocessing.get_context("fork")
    with open(partial, "r+b" if progress["bytes"] else "wb") as out, \
            context.Pool(max(1, num_workers), _start_cache_worker,
                         (dataset.tokenizer, dataset.parse, dataset.end_of_text, dtype)) as pool:
        out.truncate(progress["bytes"])
        out.seek(progress["bytes"])
        pending, written = collections.deque(), 0
        chunks = _cache_chunks(files, dataset._keep_line, progress["index"], chunk_rows)
        while True:
            chunk = next(chunks, None)
            if chunk is not None:
                last, nonblank, rows = chunk
                pending.append((last, nonblank, len(rows), pool.apply_async(_tokenize_chunk, (rows,))))
            # A few chunks in flight per worker keep them busy; more would only fill the memory.
            while pending and (chunk is None or len(pending) > 2 * max(1, num_workers)):
                last, nonblank, kept, result = pending.popleft()
                data, bad = result.get()
                bad_rows.seen += kept
                for entry in bad:
                    bad_rows.add(*entry)
                out.write(data)
                progress.update(index=last, bytes=progress["bytes"] + len(data),
                                nonblank=progress["nonblank"] + nonblank)
                written += 1
                if written % save_every == 0:
                    save_progress(out)
            if chunk is None:
                break
        bad_rows.finish(progress["nonblank"], report_after=PROBE_LINES)  # the first: see estimate_samples_per_epoch
        save_progress(out)
    os.replace(partial, path)
    _write_json(meta_path, fingerprint)
    os.remove(progress_path)
    seconds = time.perf_counter() - start
    tokens = progress["bytes"] // np.dtype(dtype).itemsize
    print(f"token cache {path}: {tokens:,} tokens, {progress['bytes'] / 1e6:.1f} MB, built in {seconds:.1f} s "
          f"with {max(1, num_workers)} worker(s) "
          f"({(progress['bytes'] - start_bytes) / np.dtype(dtype).itemsize / seconds:,.0f} tokens/s)")
    return True
