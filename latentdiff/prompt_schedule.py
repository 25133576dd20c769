"""A1111's prompt scheduling: prompt editing `[from:to:when]`, alternation `[a|b]` and composable `AND`.

A pass before prompts.parse: a prompt becomes its AND parts, each with a weight and a schedule of plain
prompt texts, A1111's "scheduled prompts" [(until_step, text), ...], which prompts.py then reads as
usual (emphasis, BREAK, chunks, embeddings). Each distinct text is encoded once; ScheduledCFGDenoiser
picks every model call's texts and combines the parts as composable diffusion does,
uncond + sum_i w_i * cfg * (cond_i - uncond).

Steps are counted as A1111 counts them: one step per model call, from 0 at the first call of a run,
against a schedule of `steps` steps, twice that for the samplers A1111 marks second order (Heun, DPM2,
DPM2 a, DPM++ 2S a, DPM++ SDE: SamplerSpec.second_order). Entry (until, text) serves the calls numbered
up to `until`, so `[a:b:3]` gives "a" to calls 0..3. img2img counts from its first step run, against the
full `steps`. The grammar and the step arithmetic follow A1111's (current, not "old", scheduling); the
code is our own. A prompt that does not parse as the grammar (a `|` outside brackets) is one plain text.
"""

import dataclasses
import functools
import re
from dataclasses import dataclass, field, fields

import torch

from .conditioning import Cond, Control, map_tensors
from .errors import InputError

# the number closing an edit: optional whitespace, a signed int or decimal (exponent allowed), "]"
_WHEN = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # text; an escaped character is text as written
_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


@dataclass
class _Edit:
    before: list | None  # None: `[to:when]`
    after: list
    when: str  # as written: a decimal point makes it a fraction of the steps
    step: int = 0  # resolved by _steps_of


@dataclass
class _Alternate:
    options: list[list]


def _tree(prompt: str) -> list | None:
    """The prompt as text, edits and alternations; a bracket or colon that closes nothing is text. None
    when it is not A1111's grammar (a "|" outside brackets, a lone trailing backslash)."""
    s = prompt

    def at(j: int, char: str) -> bool:
        return j < len(s) and s[j] == char

    @functools.cache  # each position is parsed once however often a failed group is retried
    def run(i: int) -> tuple[list, int]:
        """A run of text and complete bracket groups from i, up to the first character that is neither."""
        nodes: list = []
        while i < len(s):
            if match := _PLAIN.match(s, i):
                nodes.append(match.group())
                i = match.end()
            elif s[i] in "([" and (group := bracket(i)) is not None:
                nodes += group[0]
                i = group[1]
            else:
                break
        return nodes, i

    @functools.cache
    def bracket(i: int) -> tuple[list, int] | None:
        """The group opening at s[i]: emphasis (kept as written), an edit or an alternation; None if s[i:]
        does not start a complete one."""
        first, j = run(i + 1)
        if s[i] == "(":
            if at(j, ")"):
                return ["(", *first, ")"], j + 1
            if at(j, ":"):
                weight, k = run(j + 1)
                if at(k, ")"):
                    return ["(", *first, ":", *weight, ")"], k + 1
            return None
        if at(j, "]"):
            return ["[", *first, "]"], j + 1
        if at(j, "|"):
            options = [first]
            while at(j, "|"):
                option, j = run(j + 1)
                options.append(option)
            return ([_Alternate(options)], j + 1) if at(j, "]") else None
        if at(j, ":"):
            if when := _WHEN.match(s, j + 1):
                return [_Edit(None, first, when.group(1))], when.end()
            second, k = run(j + 1)
            if at(k, ":") and (when := _WHEN.match(s, k + 1)):
                return [_Edit(first, second, when.group(1))], when.end()
        return None

    nodes, i = [], 0
    while i < len(s):
        part, i = run(i)
        nodes += part
        if i < len(s):
            if s[i] not in "[]():":
                return None
            nodes.append(s[i])
            i += 1
    return nodes


def _walk(nodes: list):
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _steps_of(nodes: list, steps: int, int_offset: int, fraction_offset: float) -> list[int]:
    """Every step at which the text may change, `steps` included; resolves each edit's step."""
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
            continue
        value = float(node.when)
        value = (value - fraction_offset) * steps if "." in node.when else value - int_offset
        node.step = min(steps, int(value))
        if node.step >= 1:
            ends.add(node.step)
    return sorted(ends)


def _text_at(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Edit):
            out.append(_text_at(node.before or [] if step <= node.step else node.after, step))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
        else:
            out.append(node)
    return "".join(out)


def scheduled_prompts(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's schedule of one prompt (AND not split): [(until_step, text), ...], the last until `steps`.
    With `hires_steps` (a hires-fix pass of that many steps after `steps`), the schedule is the second
    pass's: an integer `when` counts from the first pass's start, a fraction from 1.0 (A1111's rule)."""
    offsets = (0, 0.0) if hires_steps is None else (steps, 1.0)
    steps = steps if hires_steps is None else hires_steps
    try:
        nodes = _tree(prompt)
        if nodes is not None:
            return [(end, _text_at(nodes, end)) for end in _steps_of(nodes, steps, *offsets)]
    except RecursionError:  # brackets nested hundreds deep: read as text rather than fail
        pass
    return [(steps, prompt)]


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """The prompt split at each `AND` (uppercase, a word of its own) into (text, weight) parts: a part
    ending in `:number` has that weight (`a cat :1.2`), else 1. Negative prompts are not split (A1111)."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _PART_WEIGHT.search(part).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


@dataclass(frozen=True)
class Part:
    """One AND part of a prompt: its guidance weight and its schedule [(until_step, text), ...]."""

    weight: float
    schedule: tuple[tuple[int, str], ...]


def prompt_parts(prompt: str, steps: int, *, negative: bool = False, hires_steps: int | None = None) -> list[Part]:
    parts = [(prompt, 1.0)] if negative else composable_parts(prompt)
    return [Part(weight, tuple(scheduled_prompts(text, steps, hires_steps))) for text, weight in parts]


def fixed_text(prompt: str, parts: list[Part]) -> str | None:
    """The one text a prompt always means, or None if it changes between steps or has AND parts or a
    weight (those need ScheduledCFGDenoiser). A prompt the pass leaves as it was (trailing whitespace
    aside) is returned verbatim, so it gives exactly the features it gave before the pass existed."""
    if len(parts) != 1 or parts[0].weight != 1.0 or len(parts[0].schedule) != 1:
        return None
    text = parts[0].schedule[0][1]
    return prompt if text in (prompt, prompt.rstrip()) else text


@dataclass(frozen=True)
class ScheduledText:
    """Text conditioning that changes with the step: `features` (texts, tokens, C) of every distinct text,
    and per image its parts as (weight, until steps, rows of `features`). `parts`: the Cond fields besides
    the context (concat, y, control) as one (B, ...) batch, shared by all of an image's AND parts."""

    features: torch.Tensor
    images: tuple[tuple[tuple[float, tuple[int, ...], tuple[int, ...]], ...], ...]
    parts: dict = field(default_factory=dict)

    def with_parts(self, **parts) -> "ScheduledText":
        """These records with other Cond fields set, as `Cond(context, concat=...)` sets them."""
        return dataclasses.replace(self, parts=self.parts | parts)

    def at(self, step: int) -> tuple[Cond, list[int], list[float]]:
        """(the Cond of every part, the image each part belongs to, the parts' weights) at model call
        `step`; past the schedule's end the last text holds."""
        rows, owners, weights = [], [], []
        for image, parts in enumerate(self.images):
            for weight, ends, part_rows in parts:
                index = next((k for k, end in enumerate(ends) if step <= end), len(ends) - 1)
                rows.append(part_rows[index])
                owners.append(image)
                weights.append(weight)
        return Cond(context=self.features[rows], **map_tensors(self.parts, lambda t: t[owners])), owners, weights


@dataclass(frozen=True)
class PromptPlan:
    """A batch's prompts after the pass. `scheduled` False: `prompts` and `negatives` are plain texts for
    the ordinary path (each the prompt itself, or the one text it always means: `[a:b:99]` at 20 steps is
    "a"). True: `encode` builds ScheduledText records from the parts (`uncond` None without guidance)."""

    prompts: list[str | None]
    negatives: list[str | None]
    cond: list[list[Part]]
    uncond: list[list[Part]] | None

    @classmethod
    def of(cls, prompts: list[str], negatives: list[str], steps: int, cfg_scale: float,
           hires_steps: int | None = None) -> "PromptPlan":
        """`steps`: the schedule's length, A1111's (twice the sampling steps for second-order samplers);
        `hires_steps`: for a hires-fix second pass, its length counted the same way (`steps` is then the
        first pass's), as scheduled_prompts takes it."""
        cond = [prompt_parts(p, steps, hires_steps=hires_steps) for p in prompts]
        # guidance needs the negative prompt unless cfg is 1 and every image has one part of weight 1
        guided = cfg_scale != 1.0 or any(len(parts) != 1 or parts[0].weight != 1.0 for parts in cond)
        uncond = [prompt_parts(p, steps, negative=True, hires_steps=hires_steps) for p in negatives] if guided else None
        return cls([fixed_text(p, parts) for p, parts in zip(prompts, cond)],
                   [fixed_text(p, parts) for p, parts in zip(negatives, uncond)] if guided else negatives,
                   cond, uncond)

    @property
    def scheduled(self) -> bool:
        return None in self.prompts or None in self.negatives

    def encode(self, encode, count_chunks) -> tuple[ScheduledText, ScheduledText | None]:
        """Every distinct text encoded once, in one batch, all with as many chunks as the longest (so cond
        and uncond batch together): `encode(texts, chunks)` -> (texts, tokens, C), `count_chunks(texts)`."""
        images = self.cond + (self.uncond or [])
        texts = list(dict.fromkeys(text for parts in images for part in parts for _, text in part.schedule))
        features = encode(texts, count_chunks(texts))
        row_of = {text: row for row, text in enumerate(texts)}

        def scheduled(per_image):
            return ScheduledText(features, tuple(
                tuple((part.weight, tuple(end for end, _ in part.schedule), tuple(row_of[t] for _, t in part.schedule))
                      for part in parts) for parts in per_image))

        return scheduled(self.cond), scheduled(self.uncond) if self.uncond is not None else None


class ScheduledCFGDenoiser:
    """Guidance over ScheduledText: each call takes the texts of its step (one step per call, counted
    from 0: make one per sampling run), runs uncond and every AND part of every image as one batch and
    returns uncond + sum_i w_i * cfg_scale * (cond_i - uncond) per image (A1111's composable diffusion).
    Without uncond (cfg 1, one part of weight 1 per image) it returns the cond prediction."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma, *, cond: ScheduledText, uncond: ScheduledText | None = None,
                 cfg_scale: float = 1.0) -> torch.Tensor:
        step, self.calls = self.calls, self.calls + 1
        sigma = torch.as_tensor(sigma)  # stays where the sampler keeps it (the host), as in CFGDenoiser
        sigma = (sigma if sigma.is_floating_point() else sigma.float()).expand(x.shape[0])
        parts, owners, weights = cond.at(step)
        owners = torch.tensor(owners)
        index = owners.to(x.device)
        if uncond is None:
            return self.denoiser(x[index], sigma[owners], parts)
        both = self.denoiser(torch.cat([x, x[index]]), torch.cat([sigma, sigma[owners]]),
                             _rows_of_both(uncond.at(step)[0], parts))
        d_uncond, d_cond = both[:x.shape[0]], both[x.shape[0]:]
        scale = torch.tensor(weights, dtype=both.dtype, device=both.device).view(-1, *[1] * (x.ndim - 1))
        return d_uncond.index_add(0, index, (d_cond - d_uncond[index]) * (scale * cfg_scale))


def _rows_of_both(first, second):
    """One record of `first`'s rows, then `second`'s, field by field (uncond has one row per image, cond one
    per AND part: unlike conditioning.cat_conds, the batches differ in size)."""
    if first is None or second is None:
        if first is not second:
            raise InputError("prompt scheduling: a conditioning part is set on the cond record and not on the "
                             "uncond one, or the reverse; set it on both (ScheduledText.with_parts)")
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, (Cond, Control)):
        return type(first)(**{f.name: _rows_of_both(getattr(first, f.name), getattr(second, f.name))
                              for f in fields(first)})
    if isinstance(first, (tuple, list)):
        return type(first)(_rows_of_both(a, b) for a, b in zip(first, second))
    return first
