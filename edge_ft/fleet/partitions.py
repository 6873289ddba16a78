"""Split a task's training pool across the fleet's devices, the way real devices would hold it (numpy only).

  writers          mnist→digits: each device holds the digits of one writer or a few. The UCI file lists its
                   13 writers one after another (edge_ft.data.tasks), so the train pool is cut into writer-sized
                   blocks of 1797/13 ≈ 138 rows and each device gets a run of whole blocks; with more devices than
                   writers, the devices are shared out among the writers in proportion to their rows and each
                   writer's block is cut into contiguous runs among its devices (a device holds some of the digits
                   of one writer). Writer boundaries are not recorded in the file: a block edge may fall a few rows
                   inside a neighbour's digits.
  dirichlet:ALPHA  label skew: for each class, the shares of the devices are drawn from Dirichlet(ALPHA) (small
                   ALPHA: few classes per device; large: near-IID), the usual non-IID benchmark for Fashion.
  quantity:ALPHA   quantity skew: labels as in iid, but each device's share of the examples drawn from
                   Dirichlet(ALPHA) over the devices (small ALPHA: a few devices hold most data), every device >= 1.
  iid              a seeded shuffle dealt out evenly (the reference the skews are measured against).
The Dirichlet draws are those of flwr-datasets' DirichletPartitioner (per class, shares over the devices, redrawn
until every device holds enough), done here on the in-memory arrays: flwr-datasets partitions Hugging Face
`datasets` tables, which would bring that library and pyarrow into the host for a dozen lines of numpy.
"""

from __future__ import annotations

import numpy as np

from edge_ft.errors import UserError

UCI_ROWS, UCI_WRITERS = 1797, 13  # scikit-learn's copy of the UCI optdigits test file
SCHEMES = ("writers", "dirichlet:ALPHA", "quantity:ALPHA", "iid")
DIRICHLET_TRIES = 100  # redraws until every device holds at least `min_size` examples (then top_up)


def parse_partitioning(text: str) -> tuple[str, float | None]:
    """'writers' -> ('writers', None); 'dirichlet:0.5' -> ('dirichlet', 0.5); 'iid' -> ('iid', None)."""
    name, _, arg = text.partition(":")
    if name in ("writers", "iid") and not arg:
        return name, None
    if name in ("dirichlet", "quantity"):
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or not np.isfinite(alpha):
            raise UserError(f"partitioning {text!r}: {name} needs a positive concentration, e.g. {name}:0.5")
        return name, alpha
    raise UserError(f"unknown partitioning {text!r}: choose one of {', '.join(SCHEMES)}")


def writer_blocks(rows: int) -> list[tuple[int, int]]:
    """[start, end) of each writer-sized block among the first `rows` rows of the UCI file (the last may be cut)."""
    edges = [round(k * UCI_ROWS / UCI_WRITERS) for k in range(UCI_WRITERS + 1)]
    return [(a, min(b, rows)) for a, b in zip(edges, edges[1:]) if a < rows]


def by_writer(rows: int, num_nodes: int) -> list[np.ndarray]:
    """Row indices per device: runs of whole writer blocks, as even as whole blocks allow; with more devices than
    writers, each writer's block cut into contiguous runs among devices in proportion to its rows (every device
    holds digits of one writer)."""
    blocks = writer_blocks(rows)
    if num_nodes > rows:
        raise UserError(f"{num_nodes} devices but the train pool holds only {rows} examples; use at most {rows}")
    if num_nodes > len(blocks):
        # device d goes to the writer of row (d + 1/2)·rows/num_nodes: devices in proportion to a writer's rows,
        # never more devices than rows
        middles = (np.arange(num_nodes) + 0.5) * rows / num_nodes
        counts = [int(((a <= middles) & (middles < b)).sum()) for a, b in blocks]
        return [part for (a, b), n in zip(blocks, counts) if n for part in np.array_split(np.arange(a, b), n)]
    cuts = [round(i * len(blocks) / num_nodes) for i in range(num_nodes + 1)]
    return [np.arange(blocks[a][0], blocks[b - 1][1]) for a, b in zip(cuts, cuts[1:])]


def by_dirichlet(y: np.ndarray, num_nodes: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Row indices per device with Dirichlet(alpha) label shares; every device gets >= min_size rows."""
    if len(y) < num_nodes * min_size:
        raise UserError(f"{len(y)} training examples cannot give {num_nodes} devices {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for c in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_nodes, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for node, chunk in enumerate(np.split(members, cuts)):
                parts[node].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    return top_up(out, min_size)


def top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """The last draw with each short device given examples from the largest one, one at a time (with many devices
    and a small alpha, no draw leaves every device min_size examples)."""
    parts = [list(p) for p in parts]
    for short in (i for i in range(len(parts)) if len(parts[i]) < min_size):
        while len(parts[short]) < min_size:
            largest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[short].append(parts[largest].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def by_quantity(n: int, num_nodes: int, alpha: float, seed: int) -> list[np.ndarray]:
    """A seeded shuffle dealt out in Dirichlet(alpha) shares: 1 example per device, the rest by the shares."""
    if n < num_nodes:
        raise UserError(f"{n} training examples cannot give {num_nodes} devices one each")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    extra = rng.multinomial(n - num_nodes, rng.dirichlet(np.full(num_nodes, alpha)))
    cuts = np.cumsum(extra + 1)[:-1]
    return [np.sort(part) for part in np.split(order, cuts)]


def by_iid(n: int, num_nodes: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_nodes)]


def partition(scheme: str, y: np.ndarray, num_nodes: int, seed: int, task_target: str) -> list[np.ndarray]:
    """Indices into the train pool for each device, by the `--partitioning` text."""
    if num_nodes < 1:
        raise UserError(f"the fleet needs at least one device, got {num_nodes}")
    name, alpha = parse_partitioning(scheme)
    if name == "writers":
        if task_target != "digits":
            raise UserError("the writer split needs the UCI digits (mnist-digits); other tasks have no writers, "
                            "use dirichlet:ALPHA or iid")
        return by_writer(len(y), num_nodes)
    if name == "dirichlet":
        return by_dirichlet(y, num_nodes, alpha, seed)
    if name == "quantity":
        return by_quantity(len(y), num_nodes, alpha, seed)
    return by_iid(len(y), num_nodes, seed)


def label_histogram(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(y, minlength=num_classes).tolist()
