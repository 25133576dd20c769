"""Derive the CLIP BPE vocabulary (vocab.json + merges.txt) from open_clip's merge list.

OpenAI CLIP and open_clip ship only `bpe_simple_vocab_16e6.txt.gz`, a list of ranked merges; the token
ids are implied by how the original tokenizer builds its vocabulary from it. This tool replays that
construction once and writes the two files transformers' CLIPTokenizer reads, into
latentdiff/tokenizer/ (they are committed; run it again only to check or regenerate them).

    python tools/make_clip_vocab.py /path/to/bpe_simple_vocab_16e6.txt.gz
    python tools/make_clip_vocab.py /path/to/open_clip_torch-X.Y.Z-py3-none-any.whl
"""

import argparse
import gzip
import json
import sys
import zipfile
from pathlib import Path

MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"
# The original tokenizer keeps the first 49152 - 256 - 2 merges: together with the 2 * 256 byte
# tokens and the 2 special tokens that gives CLIP's vocabulary of 49408.
NUM_MERGES = 49152 - 256 - 2
START, END = "<|startoftext|>", "<|endoftext|>"
OUT_DIR = Path(__file__).resolve().parent.parent / "latentdiff" / "tokenizer"


def byte_symbols() -> list[str]:
    """The 256 printable characters that stand for the bytes 0..255 in GPT-2 style byte-level BPE.

    Bytes that are already visible characters stand for themselves; the others (control characters,
    space, ...) are moved to code points 256 and up, in byte order. The list order (visible ones
    first) is the order of the first 256 vocabulary ids.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in visible]
    by_byte = {b: chr(b) for b in visible} | {b: chr(256 + i) for i, b in enumerate(hidden)}
    return [by_byte[b] for b in visible + hidden]


def read_merge_lines(source: Path) -> list[str]:
    """Lines of the gzipped merge file, from the file itself or from inside an open_clip wheel."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("/" + MERGES_NAME)]
            if not names:
                raise SystemExit(f"error: {source} holds no {MERGES_NAME}; pass an open_clip_torch wheel")
            data = wheel.read(names[0])
    else:
        data = source.read_bytes()
    return gzip.decompress(data).decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    # Line 0 is a header; the next NUM_MERGES lines are the merges in rank order.
    merges = lines[1:1 + NUM_MERGES]
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise SystemExit(f"error: expected {NUM_MERGES} merges of two symbols after the header line; "
                         "is this open_clip's bpe_simple_vocab_16e6.txt.gz?")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [START, END]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("error: the merges produce duplicate tokens; the input file is not CLIP's")
    return vocab, merges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help=f"{MERGES_NAME} or an open_clip_torch wheel")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        raise SystemExit(f"error: {args.source} does not exist")

    vocab, merges = build(read_merge_lines(args.source))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # "#version: 0.2" is the header line transformers expects (and skips) in merges.txt.
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
