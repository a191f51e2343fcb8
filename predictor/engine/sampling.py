"""Every running row's next token in one pass on the device, with one transfer to the host.

Why: picking row by row (`int(...)`, `torch.multinomial`'s checks, a token index read back)
synchronises the host with the device several times per sampled row. At 32 sampled rows that
is over a hundred synchronisations per token, each waiting for the whole queue of kernels: on
a GPU the decoding step would spend more time waiting than computing. Here the batch is one
tensor program, launched without a single read back, and `pick` ends with one `tolist()`
of the tokens and of a per-row "logits were not finite" flag.

The distribution is transformers' (`generate`'s order: repetition penalty, temperature, top_k,
then top_p), computed on the few candidates that can survive: the `top_k` largest logits, or
for top_p alone the smallest prefix of the sorted logits holding top_p of the mass (looked for
among the largest `TOP_P_CANDIDATES`, which hold it unless the distribution is nearly flat;
only then is one more read back needed, to sort those rows in full). transformers' warpers sort
all 151,936 logits of a Qwen vocabulary for every row and step, many times the cost.

The draw is the exponential race (vLLM's too): the token with the largest p / E, E ~ Exp(1)
drawn per candidate, is distributed as p, and needs no cumulative sum or search. Candidates
are put in token order first, so a row's draw does not depend on how float noise ordered two
nearly equal logits; a row with a `seed` draws its noise from its own generator, so its text
does not depend on what else runs beside it.

Until a row has `min_new_tokens` tokens its stop tokens cannot be picked (their logits are
masked), which is how `min_tokens` and `ignore_eos` fix a row's length.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from predictor.params import SamplingParams

TOP_P_CANDIDATES = 1024


class RowSampling:
    """One row's sampling settings and the state they need across steps."""

    def __init__(
        self,
        sampling: SamplingParams,
        prompt_ids: torch.Tensor,
        stop_ids: Sequence[int] = (),
        vocab_size: int | None = None,
    ):
        self.greedy = sampling.greedy
        self.temperature = sampling.temperature
        self.top_k = sampling.top_k
        self.top_p = sampling.top_p
        self.min_new_tokens = sampling.min_new_tokens
        self.penalty = sampling.repetition_penalty
        self.stop_ids = list(stop_ids)
        self.generated = 0
        device = prompt_ids.device
        # The tokens already in the row (prompt and output), for the repetition penalty: a
        # mask over the vocabulary, updated on the device from the picked tokens.
        self.seen: torch.Tensor | None = None
        if self.penalty != 1.0:
            size = vocab_size or int(prompt_ids.max()) + 1
            self.seen = torch.zeros(size, dtype=torch.bool, device=device)
            self.seen[prompt_ids.long()] = True
        self.random: torch.Generator | None = None
        if sampling.seed is not None and not self.greedy:
            self.random = torch.Generator(device=device).manual_seed(sampling.seed)

    @property
    def masking(self) -> bool:
        """Whether its stop tokens are still masked (`min_new_tokens` not reached)."""
        return self.generated < self.min_new_tokens and bool(self.stop_ids)

    @property
    def full_vocabulary(self) -> bool:
        """Sampled with neither top_k nor top_p: every token is a candidate."""
        return not self.greedy and not self.top_k and self.top_p >= 1.0


def pick(rows: Sequence[RowSampling], logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """(each row's next token, whether its logits held a NaN) for `logits` [rows, vocab].

    One read back from the device (two when a top_p-only row meets a nearly flat
    distribution). A row whose logits hold a NaN gets an arbitrary token and True: the caller
    fails that row alone. The NaN check is the row maximum, which a NaN anywhere in the row
    becomes (a NaN only at a masked stop token, overwritten before it is read, goes unseen:
    a model that breaks breaks the whole row)."""
    if all(r.greedy and r.seen is None for r in rows):
        # The common case, greedy without a penalty: the largest logit is the same in the
        # model's dtype as in float32 (the conversion is exact and keeps the order), so no
        # float copy of the logits is made, and one pass finds tokens and NaNs alike.
        values, tokens = first_max(_stops_masked(rows, logits))
    else:
        scores = _scored(rows, logits)
        values, tokens = first_max(scores)  # the greedy rows' tokens, every row's NaN check
        full = [i for i, r in enumerate(rows) if r.full_vocabulary]
        if full:
            tokens[full] = _draw_full(rows, full, scores)
        pruned = [i for i, r in enumerate(rows) if not r.greedy and not r.full_vocabulary]
        if pruned:
            tokens[pruned] = _draw_candidates(rows, pruned, scores)
        for index, row in enumerate(rows):
            if row.seen is not None:
                row.seen.index_fill_(0, tokens[index : index + 1], True)
    picked = torch.stack([tokens, torch.isnan(values).long()]).tolist()
    for row in rows:
        row.generated += 1
    return picked[0], [bool(b) for b in picked[1]]


def first_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's largest value, the index of its first occurrence): `scores.max(-1)`,
    exactly, ties and NaN included (a NaN is the maximum of its row).

    Why not `max` itself: on a CPU its index search is not vectorised, and over a 151,936-token
    vocabulary it cost 2-4 ms at 16 rows, more than the model's last layer. Here the vocabulary
    is cut into blocks; the blocks' maxima are one vectorised `amax`, the first block holding
    the row's maximum is found among a thousand values, and the index only inside that block.
    Half-precision scores are widened to float32 first (exact, order and NaN kept): a CPU's
    bfloat16 reductions convert value by value, and the copy and the float32 search took
    0.37 ms at 16 rows where the bfloat16 search alone took 0.79 (1.4 on one thread)."""
    rows, vocab = scores.shape
    if scores.device.type != "cpu":
        return scores.max(dim=-1)  # one fast kernel on a GPU; blocks would be three
    if scores.dtype in (torch.bfloat16, torch.float16):
        values, indices = first_max(_widened(scores))
        return values.to(scores.dtype), indices
    block = _BLOCK
    while block > 1 and vocab % block:
        block //= 2
    if block < 16:
        return scores.max(dim=-1)
    blocks = scores.reshape(rows, vocab // block, block)
    values, first_block = blocks.amax(dim=-1).max(dim=-1)
    inside = blocks.gather(1, first_block.view(rows, 1, 1).expand(rows, 1, block))
    return values, first_block * block + inside.view(rows, block).max(dim=-1).indices


_BLOCK = 128  # first_max's block: Qwen's 151,936 tokens are 1,187 blocks of 128
_WIDE = threading.local()  # each thread's float32 buffer for `_widened`


def _widened(scores: torch.Tensor) -> torch.Tensor:
    """`scores` (CPU) copied to float32, into a buffer the calling thread keeps for the next
    call. Why kept: 16 rows of logits are 9.7 MB, and a fresh tensor that large each step
    came from new pages every time (the decoding thread's malloc heap gives its free top
    back): 2,400 page faults a step, which made the engine slower than the bfloat16 search
    it replaced."""
    buffer = getattr(_WIDE, "buffer", None)
    if buffer is None or buffer.numel() < scores.numel():
        # A normal tensor, not an inference one: written in and out of inference mode alike
        # (one made inside it could not be written outside: the steps run inside, tools and
        # tests call this outside).
        with torch.inference_mode(False):
            buffer = _WIDE.buffer = torch.empty(scores.numel(), dtype=torch.float32)
    return buffer[: scores.numel()].view(scores.shape).copy_(scores)


def candidates(
    rows: Sequence[RowSampling], logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, probabilities), [rows, k] each in token order, of what each sampled row can
    draw; a token it cannot draw has probability 0. What `pick` draws from."""
    scores = _scored(rows, logits)
    return _candidates(rows, list(range(len(rows))), scores)


# ---- internals ----------------------------------------------------------------------------


def _stops_masked(rows: Sequence[RowSampling], logits: torch.Tensor) -> torch.Tensor:
    """`logits` with the stop tokens at -inf in the rows that may not stop yet: a copy (the
    model's output, which a CUDA graph may own, is never written), or `logits` itself."""
    masking = [i for i, r in enumerate(rows) if r.masking]
    if not masking:
        return logits
    scores = logits.clone()
    index = torch.tensor(masking, device=scores.device).view(-1, 1)
    stops = torch.tensor(rows[masking[0]].stop_ids, device=scores.device).view(1, -1)
    scores.index_put_((index, stops), scores.new_tensor(-float("inf")))
    return scores


def _scored(rows: Sequence[RowSampling], logits: torch.Tensor) -> torch.Tensor:
    """The rows' logits as float (transformers' warpers work in float32), stop tokens masked
    where due, the repetition penalty on."""
    scores = _stops_masked(rows, logits).float()
    if scores.data_ptr() == logits.data_ptr():
        scores = scores.clone()  # float32 logits: never write into the model's output
    for i, row in enumerate(rows):
        if row.seen is not None:
            # transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided
            # by the penalty when positive and multiplied by it when negative.
            row_scores = scores[i, : row.seen.shape[0]]
            penalised = torch.where(
                row_scores < 0, row_scores * row.penalty, row_scores / row.penalty
            )
            row_scores.copy_(torch.where(row.seen, penalised, row_scores))
    return scores


def _rows_of(scores: torch.Tensor, which: list[int]) -> torch.Tensor:
    """`scores[which]`: the tensor itself when that is every row, else `index_select` (on a
    CPU, indexing with a list copies a vocabulary-wide row element by element, 3x slower)."""
    if len(which) == scores.shape[0]:
        return scores
    return scores.index_select(0, torch.tensor(which, device=scores.device))


def _device_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A small per-row parameter tensor on `like`'s device without a synchronising copy: on
    CUDA from pinned memory, asynchronously."""
    host = torch.tensor(values, dtype=like.dtype)
    if like.device.type != "cuda":
        return host
    return host.pin_memory().to(like.device, non_blocking=True)


def _candidates(
    rows: Sequence[RowSampling], which: list[int], scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = scores.shape[-1]
    chosen = [rows[i] for i in which]
    temperature = _device_tensor([r.temperature or 1.0 for r in chosen], scores).view(-1, 1)
    tempered = _rows_of(scores, which) / temperature
    # How many of the largest logits to look at, and how many of them each row may keep
    # (top_p alone keeps what its mass needs: its limit is the vocabulary).
    wanted = [vocab if r.full_vocabulary else r.top_k or TOP_P_CANDIDATES for r in chosen]
    limits = [r.top_k or vocab for r in chosen]
    count = min(max(wanted), vocab)
    values, ids = tempered.topk(count, dim=-1)  # sorted, largest first
    if any(not r.top_k and r.top_p < 1.0 for r in chosen) and count < vocab:
        # top_p alone: the candidates must hold top_p of the mass, or the row is sorted in
        # full (a nearly flat distribution; the one extra read back this costs).
        mass = torch.exp(values - torch.logsumexp(tempered, dim=-1, keepdim=True)).sum(-1)
        short = [
            k
            for k, (r, held) in enumerate(
                zip(chosen, (mass < _top_p(chosen, scores)).tolist(), strict=True)
            )
            if held and not r.top_k
        ]
        if short:
            values, ids = tempered.sort(dim=-1, descending=True)
    position = torch.arange(values.shape[-1], device=scores.device).view(1, -1)
    kept = position < _device_tensor(limits, ids).view(-1, 1)
    values = values.masked_fill(~kept, -float("inf"))
    probs = torch.softmax(values, dim=-1)
    top_p = _top_p(chosen, scores).view(-1, 1)
    # transformers keeps a token when the mass of the tokens above it is below top_p (the
    # first always stays).
    above = torch.cumsum(probs, dim=-1) - probs
    cut = (above >= top_p) & (position > 0) & (top_p < 1.0)
    probs = torch.softmax(values.masked_fill(cut, -float("inf")), dim=-1)
    ids, order = ids.sort(dim=-1)
    return ids, probs.gather(-1, order)


def _top_p(rows: Sequence[RowSampling], like: torch.Tensor) -> torch.Tensor:
    return _device_tensor([r.top_p for r in rows], like)


def _race(rows: Sequence[RowSampling], which: list[int], probs: torch.Tensor) -> torch.Tensor:
    """The index in each row of `probs` drawn by the exponential race."""
    noise = torch.empty_like(probs)
    unseeded = [k for k, i in enumerate(which) if rows[i].random is None]
    if unseeded:
        noise[unseeded] = torch.empty_like(noise[unseeded]).exponential_()
    for k, i in enumerate(which):
        if rows[i].random is not None:
            noise[k].exponential_(generator=rows[i].random)
    return (probs / noise).argmax(dim=-1)


def _draw_candidates(
    rows: Sequence[RowSampling], which: list[int], scores: torch.Tensor
) -> torch.Tensor:
    ids, probs = _candidates(rows, which, scores)
    return ids.gather(-1, _race(rows, which, probs).view(-1, 1)).view(-1)


def _draw_full(rows: Sequence[RowSampling], which: list[int], scores: torch.Tensor) -> torch.Tensor:
    temperature = _device_tensor([rows[i].temperature for i in which], scores).view(-1, 1)
    probs = torch.softmax(_rows_of(scores, which) / temperature, dim=-1)
    return _race(rows, which, probs)
