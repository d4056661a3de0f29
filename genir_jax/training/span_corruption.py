"""T5's span-corruption objective, in numpy: noise masks, sentinels, packing text into chunks.

How T5 pre-trains (Raffel et al. 2020, "span corruption"): a chunk of `tokens_length` tokens is split into
alternating non-noise and noise spans; about `noise_density` (0.15) of the tokens are noise, in spans of
mean length `mean_noise_span_length` (3). The encoder input keeps the non-noise tokens and replaces each
noise span by one sentinel (`<extra_id_0>`, `<extra_id_1>`, ... in order); the target lists, for each span,
its sentinel followed by the dropped tokens. Both end with EOS. Given the mask, the counts are exact:
``num_noise = round(length * density)`` (at least 1, at most length - 1) and
``num_spans = max(1, round(num_noise / mean_span))``; only the placement is random.

Our differences from `t5.data.preprocessors.random_spans_noise_mask`: randomness is a numpy Generator
seeded by (seed, epoch, example), so a batch is a pure function of the training step (exact resume);
`random_roll=True` (default) rotates the mask by a random offset, which removes the original's bias of
always ending with a noise span (T5 has the same option). A rotation can cut one noise span in two, so
a chunk may have ``num_spans + 1`` sentinels; `SpanCorruption` sizes its arrays for that.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_counts(length: int, noise_density: float = NOISE_DENSITY,
                 mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(number of noise tokens, number of noise spans) of a chunk of `length` tokens (length >= 2)."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def _segment_lengths(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random composition of `num_items` into `num_segments` positive parts."""
    # Choose num_segments - 1 distinct cut points among the num_items - 1 gaps between items.
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    bounds = np.concatenate([[0], cuts, [num_items]])
    return np.diff(bounds)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
                            random_roll: bool = True) -> np.ndarray:
    """Boolean noise mask [length] of random spans (True = noise), as T5 defines it."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    # A span count above the number of non-noise tokens cannot alternate; T5's rounding never gets there
    # for density < 0.5, but guard anyway.
    num_spans = min(num_spans, length - num_noise, num_noise)
    noise_lengths = _segment_lengths(num_noise, num_spans, rng)
    keep_lengths = _segment_lengths(length - num_noise, num_spans, rng)
    mask = np.repeat(np.tile([False, True], num_spans),
                     np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1))
    if random_roll:
        mask = np.roll(mask, int(rng.integers(length)))
    return mask


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: Sequence[int],
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one chunk: each noise span becomes the next sentinel in the inputs, and the
    targets hold each sentinel followed by its span; both end with `eos_id`."""
    tokens = np.asarray(tokens)
    mask = np.asarray(mask, dtype=bool)
    if tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} differ in shape")
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    num_spans = int(starts.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(f"{num_spans} noise spans but only {len(sentinel_ids)} sentinel tokens")
    sentinels = np.asarray(sentinel_ids[:num_spans], dtype=tokens.dtype)
    span_index = np.cumsum(starts) - 1  # which span a noise token belongs to
    # inputs: keep non-noise tokens, replace the first token of each span by its sentinel, drop the rest.
    inputs = np.where(starts, sentinels[np.maximum(span_index, 0)] if num_spans else tokens, tokens)
    inputs = inputs[~mask | starts]
    # targets: every noise token, with the span's sentinel inserted before the span's first token.
    targets = np.insert(tokens[mask], np.flatnonzero(starts[mask]), sentinels)
    eos = np.asarray([eos_id], dtype=tokens.dtype)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def uncorrupt(inputs: Sequence[int], targets: Sequence[int], sentinel_ids: Sequence[int],
              eos_id: int) -> list[int]:
    """The original chunk from (inputs, targets) of `corrupt` (used by tests and for inspection)."""
    position = {int(s): k for k, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets:
        token = int(token)
        if token == eos_id:
            break
        if token in position:
            current = position[token]
            spans[current] = []
        elif current is not None:
            spans[current].append(token)
    original: list[int] = []
    for token in inputs:
        token = int(token)
        if token == eos_id:
            break
        if token in position:
            original.extend(spans.get(position[token], []))
        else:
            original.append(token)
    return original


def tokens_length_for_inputs(inputs_length: int, noise_density: float = NOISE_DENSITY,
                             mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
    """The longest raw chunk whose corrupted input (sentinels and EOS included) fits `inputs_length`.

    As T5's `random_spans_helper`, for the un-rolled mask: non-noise + spans + EOS <= inputs_length.
    """
    def inputs_needed(length):
        num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
        return length - num_noise + num_spans + 1

    if inputs_length < 3:
        raise ValueError(f"inputs_length must be >= 3, got {inputs_length}")
    length = 2
    while inputs_needed(length + 1) <= inputs_length:
        length += 1
    return length


def pack_tokens(token_lists: Sequence[Sequence[int]], tokens_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate tokenized texts and cut them into chunks of `tokens_length` (int32 [N, tokens_length],
    the last chunk padded with 0 and shorter texts packed together, as T5's `reduce_concat_tokens` +
    `split_tokens`). Returns the chunks and their true lengths."""
    flat = np.fromiter((t for tokens in token_lists for t in tokens), dtype=np.int32)
    if flat.size < 2:
        raise ValueError("span corruption needs at least 2 tokens of text")
    count = -(-flat.size // tokens_length)
    chunks = np.zeros((count, tokens_length), dtype=np.int32)
    chunks.reshape(-1)[:flat.size] = flat
    lengths = np.full((count,), tokens_length, dtype=np.int32)
    lengths[-1] = flat.size - (count - 1) * tokens_length
    if lengths[-1] < 2:  # a 1-token tail cannot be corrupted; drop it
        chunks, lengths = chunks[:-1], lengths[:-1]
    return chunks, lengths


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """Turns packed chunks into padded (inputs, targets) batches; every example seeded by its coordinates."""

    sentinel_ids: tuple[int, ...]
    eos_id: int
    tokens_length: int
    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
    random_roll: bool = True

    @property
    def inputs_length(self) -> int:
        """Array width of the inputs: room for one extra sentinel that a rotated mask can create."""
        num_noise, num_spans = noise_counts(self.tokens_length, self.noise_density, self.mean_noise_span_length)
        return self.tokens_length - num_noise + num_spans + 1 + int(self.random_roll)

    @property
    def targets_length(self) -> int:
        num_noise, num_spans = noise_counts(self.tokens_length, self.noise_density, self.mean_noise_span_length)
        return num_noise + num_spans + 1 + int(self.random_roll)

    def example(self, tokens: np.ndarray, seed: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one chunk (its true tokens only), seeded by `seed` (a sequence of ints)."""
        rng = np.random.default_rng([int(s) for s in seed])
        mask = random_spans_noise_mask(len(tokens), rng, self.noise_density, self.mean_noise_span_length,
                                       self.random_roll)
        return corrupt(tokens, mask, self.sentinel_ids, self.eos_id)

    def batch(self, chunks: np.ndarray, lengths: np.ndarray, indices: np.ndarray,
              seed: Sequence[int]) -> dict[str, np.ndarray]:
        """Seq2seq arrays for `chunks[indices]`: input_ids / attention_mask [B, inputs_length],
        targets / target_mask [B, targets_length]; example i is seeded by (*seed, indices[i])."""
        size = len(indices)
        input_ids = np.zeros((size, self.inputs_length), dtype=np.int32)
        targets = np.zeros((size, self.targets_length), dtype=np.int32)
        for row, index in enumerate(np.asarray(indices)):
            tokens = chunks[index, :lengths[index]]
            inputs, target = self.example(tokens, (*seed, int(index)))
            input_ids[row, :len(inputs)] = inputs
            targets[row, :len(target)] = target
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != 0).astype(np.int32),
            "targets": targets,
            "target_mask": (targets != 0).astype(np.int32),
        }
