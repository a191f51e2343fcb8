"""Which of the rows taken in together share one prefill: rows of similar prompt lengths.

Why: a prefill pads every row to the longest, and its cost grows faster than the tokens it
pads. Measured on the test model (mixed image sizes, 16 clients), one forward over rows of
987, 987, 586, 586, 506, 506, 362, 362, 218 x 4 and 154 x 3 prompt tokens, padded to 987,
took 254 ms, where a 586-token row alone takes 10 ms and twelve 222-token rows together 23
ms: batching rows of one length is what makes a prefill cheap (one forward's fixed cost,
larger products), padding short rows to a long one is what makes it dear (attention over
the padded length squared, and every layer's work on the pad positions). A 1-megapixel
image is about 1,000 prompt tokens, a 256x256 one about 100, so clients sending photos of
different sizes met that case at every admission.

So rows are sorted by prompt length and cut into runs whose shortest row is at least
`LENGTH_RATIO` of the longest: a row never pays more than a third again of its own length
in padding, and rows of the same size (a folder of photos from one camera) still share one
forward. The runs go shortest first, so the rows that cost least reach their first token
first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

LENGTH_RATIO = 0.75  # a run's shortest prompt at least this fraction of its longest


def prefill_groups(
    rows: Sequence[T], length_of: Callable[[T], int | None], ratio: float = LENGTH_RATIO
) -> list[list[T]]:
    """`rows` cut into runs of similar prompt length (see the module), shortest run first,
    each run's rows in their order in `rows`. Rows whose length is unknown (None: not yet
    encoded) form one run of their own, last."""
    lengths = [length_of(row) for row in rows]
    known = [(length, index) for index, length in enumerate(lengths) if length]
    unknown = [row for row, length in zip(rows, lengths, strict=True) if not length]
    groups: list[list[int]] = []
    longest = 0
    for length, index in sorted(known, reverse=True):
        if groups and length >= ratio * longest:
            groups[-1].append(index)
        else:
            groups.append([index])
            longest = length
    runs = [[rows[index] for index in sorted(group)] for group in reversed(groups)]
    return runs + ([unknown] if unknown else [])
