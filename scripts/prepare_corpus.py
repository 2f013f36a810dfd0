#!/usr/bin/env python3
"""Build the text corpus used to train the tiny Mixtral checkpoint.

Source: the Debian package ``python3.11-doc`` (install it with
``apt-get install -y python3.11-doc``).  It ships the reStructuredText sources
of the Python 3.11 documentation as ``*.rst.txt`` files under
``/usr/share/doc/python3.11/html/_sources``.  The text is the Python
documentation, (c) Python Software Foundation, distributed under the PSF
License Agreement (code examples in it are additionally 0BSD licensed); see
``/usr/share/doc/python3.11-doc/copyright``.

Each source file is one *document*.  Documents are split deterministically
into train / held-out by a hash of their relative path, so the held-out split
never depends on the machine, file order or a random seed:

    held out  <=>  int(sha256(relpath)[:8], 16) % HOLDOUT_MOD == 0

With HOLDOUT_MOD = 20 about 5% of documents are held out.

The raw reStructuredText is kept (markup included); the only normalisation is
CRLF -> LF, stripping trailing whitespace per line and collapsing runs of
more than two blank lines.

Usage::

    python scripts/prepare_corpus.py --out-dir /tmp/tiny_moe_work/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import sys

DEFAULT_SOURCE = "/usr/share/doc/python3.11/html/_sources"
COPYRIGHT_FILE = "/usr/share/doc/python3.11-doc/copyright"
HOLDOUT_MOD = 20
EOS_TOKEN = "<|endoftext|>"
CORPUS_NAME = "Python 3.11 documentation (reStructuredText sources, Debian package python3.11-doc)"
CORPUS_LICENSE = (
    "Python Software Foundation License Agreement (PSF-2.0) for the documentation text, "
    "(c) 2001-2023 Python Software Foundation; code examples in the documentation are "
    "additionally licensed under the Zero-Clause BSD license (0BSD). "
    "See /usr/share/doc/python3.11-doc/copyright and the documentation's license page."
)


def is_heldout(relpath: str, mod: int = HOLDOUT_MOD) -> bool:
    h = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
    return int(h[:8], 16) % mod == 0


def _read(path: str) -> str:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        with open(path, "rb") as f:
            raw = f.read()
    return raw.decode("utf-8", errors="replace")


def normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def find_documents(source_dir: str) -> list[str]:
    docs = []
    for root, _dirs, files in os.walk(source_dir):
        for name in files:
            if name.endswith((".txt", ".rst", ".txt.gz", ".rst.gz")):
                docs.append(os.path.relpath(os.path.join(root, name), source_dir))
    return sorted(docs)


def build(source_dir: str, out_dir: str, heldout_sample: str | None, sample_bytes: int) -> dict:
    if not os.path.isdir(source_dir):
        sys.exit(
            f"{source_dir} not found: install the corpus with `apt-get install -y python3.11-doc`"
        )
    rels = find_documents(source_dir)
    if not rels:
        sys.exit(f"no .txt/.rst documents found under {source_dir}")
    train, heldout = [], []
    for rel in rels:
        text = normalise(_read(os.path.join(source_dir, rel)))
        if len(text.strip()) == 0:
            continue
        (heldout if is_heldout(rel) else train).append({"path": rel, "text": text})

    os.makedirs(out_dir, exist_ok=True)
    for name, docs in (("train", train), ("heldout", heldout)):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")

    sample_docs = []
    if heldout_sample:
        # Whole held-out documents (sorted by path) joined with the EOS token,
        # greedily packed up to `sample_bytes` bytes.
        parts, size = [], 0
        sep = "\n" + EOS_TOKEN + "\n"
        for d in heldout:
            add = len(d["text"].encode("utf-8")) + (len(sep.encode()) if parts else 0)
            if size + add > sample_bytes:
                continue
            parts.append(d["text"])
            sample_docs.append(d["path"])
            size += add
        os.makedirs(os.path.dirname(os.path.abspath(heldout_sample)), exist_ok=True)
        with open(heldout_sample, "w", encoding="utf-8") as f:
            f.write(sep.join(parts))

    def nbytes(docs):
        return sum(len(d["text"].encode("utf-8")) for d in docs)

    meta = {
        "corpus": CORPUS_NAME,
        "source_dir": source_dir,
        "license": CORPUS_LICENSE,
        "copyright_file": COPYRIGHT_FILE,
        "split_rule": f"held out iff int(sha256(relative_path).hexdigest()[:8], 16) % {HOLDOUT_MOD} == 0",
        "n_documents": len(train) + len(heldout),
        "n_train_documents": len(train),
        "n_heldout_documents": len(heldout),
        "train_bytes": nbytes(train),
        "heldout_bytes": nbytes(heldout),
        "heldout_documents": [d["path"] for d in heldout],
        "heldout_sample_documents": sample_docs,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-dir", default=DEFAULT_SOURCE)
    p.add_argument("--out-dir", default="/tmp/tiny_moe_work/corpus")
    p.add_argument("--heldout-sample", default=None,
                   help="optional path of a text file receiving a sample of held-out documents")
    p.add_argument("--sample-bytes", type=int, default=200_000)
    args = p.parse_args(argv)
    meta = build(args.source_dir, args.out_dir, args.heldout_sample, args.sample_bytes)
    short = {k: v for k, v in meta.items() if not k.endswith("documents") or k.startswith("n_")}
    print(json.dumps(short, indent=2))


if __name__ == "__main__":
    main()
