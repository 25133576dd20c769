"""A1111 prompt syntax: emphasis weights, `BREAK`, and prompts longer than CLIP's 77 tokens.

A prompt becomes (text, weight) pieces (`parse`), the pieces become 75-token chunks (`chunk`), and each
chunk is encoded on its own as start + 75 tokens + end, the features of all chunks joined along the token
axis (`encode_prompts`). The behaviour follows A1111's documentation and its documented examples (see
tests/test_prompts.py); the code is our own.

Prompt editing `[from:to:when]`, alternation `[a|b]` and composable `AND` are a pass before this one
(prompt_schedule.py): it turns a prompt into the plain texts of each step range and AND part, which are read
here. `parse` itself reads them as emphasis and text (`[a:b:0.5]` is "a:b:0.5" at weight 1/1.1).

Textual-inversion embeddings: a loaded embedding's name (its file stem), written as a word of its own in any
case, stands for its vectors (`find_triggers`); they take one token slot each, carry the emphasis weight of
their piece, never straddle two chunks (A1111's rule) and reach the text encoder as token embeddings.
"""

import re
from collections.abc import Callable

import torch

from .formats.embeddings import Embedding

BREAK = ("BREAK", None)  # the marker piece: the next text starts a new chunk
ROUND, SQUARE = 1.1, 1 / 1.1  # (x) and [x]
COMMA_BACKTRACK = 20  # a full chunk moves back to its last comma if that is at most this many tokens back

# One token of the syntax per match, tried in order: escapes, brackets, an explicit weight closing a round
# bracket, plain text. A ":" or a number that is not "(x:number)" falls through to plain text.
_SYNTAX = re.compile(r"""
    \\[()\[\]\\]                                  # \( \) \[ \] \\ : the character itself
  | \(  | \[                                      # open
  | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\) # (x:1.3)
  | \)  | ]                                       # close
  | [^\\()\[\]:]+ | [\\:]                         # text; a lone backslash or colon is text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(prompt: str) -> list[tuple[str, float] | tuple[str, None]]:
    """A1111's emphasis: (x) x1.1, ((x)) x1.21, [x] /1.1, (x:1.3), nesting multiplies, `\\(` a literal
    bracket. Unbalanced brackets as A1111 treats them: a "(" or "[" never closed weights everything after
    it; a ")" or "]" with nothing open is kept as text. `BREAK` (uppercase, a word of its own) becomes the
    BREAK marker. Neighbouring pieces of equal weight are joined; "" gives [("", 1.0)]."""
    pieces: list[list] = []  # [text, weight]; BREAK markers as [BREAK]
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket's piece range starts

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if len(piece) == 2:
                piece[1] *= factor

    def add_text(text: str) -> None:
        for i, part in enumerate(_BREAK.split(text)):
            if i:
                pieces.append([BREAK])
            pieces.append([part, 1.0])

    for match in _SYNTAX.finditer(prompt):
        token = match.group(0)
        if token[0] == "\\" and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token in opened:
            opened[token].append(len(pieces))
        elif match.group("weight") is not None and opened["("]:
            weigh(opened["("].pop(), float(match.group("weight")))
        elif token == ")" and opened["("]:
            weigh(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            weigh(opened["["].pop(), SQUARE)
        else:
            add_text(token)
    for start in opened["("]:
        weigh(start, ROUND)
    for start in opened["["]:
        weigh(start, SQUARE)

    joined: list = []
    for piece in pieces:
        if len(piece) == 1:
            joined.append(BREAK)
        elif piece[0] == "":
            continue
        elif joined and joined[-1] is not BREAK and joined[-1][1] == piece[1]:
            joined[-1] = (joined[-1][0] + piece[0], piece[1])
        else:
            joined.append((piece[0], piece[1]))
    return joined or [("", 1.0)]


def find_triggers(pieces: list, embeddings: dict[str, Embedding] | None) -> list:
    """Pieces with every trigger word of `embeddings` (a name as a word of its own, any case: CLIP
    lowercases prompts) cut out of its text into a piece of its own, (Embedding, weight)."""
    if not embeddings:
        return pieces
    by_name = {}
    for name, embedding in embeddings.items():
        by_name.setdefault(name.lower(), embedding)
    names = sorted(by_name, key=len, reverse=True)  # the longest first: "cat-v2" before "cat"
    trigger = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)", re.I)
    found: list = []
    for piece in pieces:
        if piece is BREAK:
            found.append(piece)
            continue
        for i, part in enumerate(trigger.split(piece[0])):
            if i % 2:
                found.append((by_name[part.lower()], piece[1]))
            elif part:
                found.append((part, piece[1]))
    return found or [("", 1.0)]


def used_embeddings(prompt: str, embeddings: dict[str, Embedding] | None) -> list[Embedding]:
    """The embeddings `prompt` names, each once, in the order of first use."""
    used = [piece[0] for piece in find_triggers(parse(prompt), embeddings) if isinstance(piece[0], Embedding)]
    return list({id(e): e for e in used}.values())


def chunk(pieces: list, token_ids: Callable[[list[str]], list[list[int]]], comma_id: int,
          length: int = 75) -> list[tuple[list, list[float]]]:
    """Pieces -> chunks of at most `length` (ids, weights), without start / end / padding. An embedding's
    piece (find_triggers) takes one slot (embedding, k) per vector k in place of an id.

    A1111's rules: a chunk that is full when another token comes moves its tail after the last comma to
    the next chunk if that comma is at most COMMA_BACKTRACK tokens back; an embedding whose vectors do not
    fit in the rest of a chunk starts the next one; BREAK ends the chunk (a BREAK at the start gives an
    empty chunk, as in A1111); a prompt always has at least one chunk."""
    texts = [piece[0] for piece in pieces if piece is not BREAK and isinstance(piece[0], str)]
    ids_of = iter(token_ids(texts) if texts else [])
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for piece in pieces:
        if piece is BREAK:
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        embedding = None if isinstance(piece[0], str) else piece[0]
        tokens = next(ids_of) if embedding is None else [(embedding, k) for k in range(len(embedding.vectors))]
        for token in tokens:
            if len(ids) == length:
                if token != comma_id and last_comma >= 0 and length - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    chunks.append((ids[:cut], weights[:cut]))
                    ids, weights = ids[cut:], weights[cut:]
                else:
                    chunks.append((ids, weights))
                    ids, weights = [], []
                last_comma = -1
            if embedding is not None and token[1] == 0 and ids and len(ids) + len(tokens) > length:
                chunks.append((ids, weights))  # the embedding does not fit: pad this chunk, start the next
                ids, weights, last_comma = [], [], -1
            if token == comma_id:
                last_comma = len(ids)
            ids.append(token)
            weights.append(piece[1])
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def _chunks_of(prompt: str, tokenizer, embeddings=None) -> list[tuple[list, list[float]]]:
    comma_id = tokenizer.token_ids([","])[0][0]
    return chunk(find_triggers(parse(prompt), embeddings), tokenizer.token_ids, comma_id, tokenizer.max_length - 2)


def count_chunks(prompts: list[str], tokenizer, embeddings: dict[str, Embedding] | None = None) -> int:
    """The most chunks any of `prompts` needs (CFG pads the prompt and the negative prompt to this)."""
    return max(len(_chunks_of(prompt, tokenizer, embeddings)) for prompt in prompts)


def emphasize(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on (N, T, C) features of N chunks: scale each token by its weight, then
    rescale each chunk so its mean is what it was. A1111 takes the mean over the whole batch; we take it per
    chunk so that an image of a batch does not depend on the other prompts (equal for a batch of one)."""
    if bool((weights == 1).all()):
        return features
    z = features.float()
    mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    return (z * (mean / z.mean(dim=(1, 2), keepdim=True))).to(features.dtype)


def encode_prompts(prompts: list[str], tokenizer, text_encoder: Callable[[torch.Tensor], torch.Tensor],
                   min_chunks: int = 1, embeddings: dict[str, Embedding] | None = None) -> torch.Tensor:
    """(B, chunks * 77, C) features: every prompt's chunks encoded as start + 75 tokens + end + the
    tokenizer's padding (`text_encoder` maps (N, 77) ids to (N, 77, C) features), joined along the token
    axis. Prompts with fewer chunks than the longest (or than `min_chunks`) get chunks of the empty prompt,
    as A1111 pads them. A prompt of at most 75 tokens without syntax gives exactly the plain tokenizer's
    features. The trigger words of `embeddings` become their vectors: `text_encoder(ids, vectors=[(row,
    position, (1, width) vector), ...])` puts them in place of those positions' token embeddings."""
    per_prompt = [_chunks_of(prompt, tokenizer, embeddings) for prompt in prompts]
    count = max(min_chunks, *(len(chunks) for chunks in per_prompt))
    start, end = tokenizer.start_id, tokenizer.end_id
    length = tokenizer.max_length - 2
    rows, row_weights, vectors = [], [], []
    for chunks in per_prompt:
        for ids, weights in chunks + [([], [])] * (count - len(chunks)):
            pad = length - len(ids)
            for position, token in enumerate(ids, start=1):
                if isinstance(token, tuple):  # an embedding's vector k; its id is a placeholder
                    embedding, k = token
                    vectors.append((len(rows), position, embedding.vectors[k:k + 1]))
            ids = [tokenizer.pad_id if isinstance(token, tuple) else token for token in ids]
            rows.append([start, *ids, end] + [tokenizer.pad_id] * pad)
            row_weights.append([1.0, *weights, 1.0] + [1.0] * pad)
    tokens = torch.tensor(rows, dtype=torch.long)
    features = text_encoder(tokens, vectors=vectors) if vectors else text_encoder(tokens)
    features = emphasize(features, torch.tensor(row_weights, device=features.device))
    return features.reshape(len(prompts), count * features.shape[1], features.shape[2])
