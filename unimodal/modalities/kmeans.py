"""k-means for the small codecs the framework trains itself (digits speech, digits images).

Why hand-written: scikit-learn (already a dependency, for the digits and the judges) has KMeans,
but its multi-threaded Lloyd steps may give other centroids for the same seed on a machine with
another core count (scikit-learn issues 9784 and 27518). The codebooks are part of a versioned
built-in world, which every machine should build alike, so these few lines of Lloyd's algorithm
stay here: sequential centroid updates, seeded by a ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid of every row of ``x``."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    best = d.min(1)
    return best.indices, best.values.clamp_min(0)


def fitting_bar(steps: int, progress: bool) -> tqdm:
    """The bar of a codec's fit, ``steps`` ticks of :func:`kmeans` (minutes on a large media set)."""
    return tqdm(total=steps, desc="fitting", unit=" k-means steps", leave=False, disable=not progress)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator, tick: Callable[[], object] = lambda: None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; an emptied cluster is re-seeded at the worst-fit point.
    ``tick`` is called once the seeding is done and after each of the ``iters`` steps."""
    first = torch.randint(len(x), (1,), generator=generator)
    centroids = [x[first[0]]]
    dist = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        pick = torch.multinomial(dist + 1e-12, 1, generator=generator)[0]
        centroids.append(x[pick])
        dist = torch.minimum(dist, ((x - x[pick]) ** 2).sum(1))
    c = torch.stack(centroids)
    tick()
    for _ in range(iters):
        assign, dist = nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        c[empty] = x[dist.argsort(descending=True)[: len(empty)]]
        tick()
    return c
