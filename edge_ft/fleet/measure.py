"""What a federation measured: one NodeResult per device, one FederationResult per `flwr run`, and their table.

Written as DIR/deploy/federation.json (edge_ft.fleet.deploy) and read by the fleet report's memory plot.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from edge_ft.fleet.processes import SuperNode
from edge_ft.reports.format import mb

RESULT_FILE = "federation.json"


@dataclass
class NodeResult:
    name: str  # node-NN
    profile: str  # device profile
    emulation: str  # cgroup | rlimit | native
    budget_bytes: int  # the profile's memory budget
    cgroup_peak_bytes: int | None  # highest charge to its cgroup (RSS + page cache) in this run (v2: since start)
    sampled_peak_bytes: int  # highest sum of RSS over the node's processes (sampled every 0.1 s)
    sampled_peak_pss_bytes: int  # highest sum of PSS (shared pages split between processes; every 0.5 s)
    pss_by_round: dict[int, int]  # round -> highest sum of PSS while the server was in that round
    peak_rss_by_role: dict[str, int]  # supernode / superexec / clientapp -> highest RSS of one process
    peak_pss_by_role: dict[str, int]  # the same for PSS
    oom_killed: bool  # the kernel's OOM killer ended a process of the node inside its cap
    fits: bool  # peak within the budget and never OOM-killed
    round_seconds: dict[int, float]  # wall time of the node's train message per round (arrival to reply)
    messages: int  # messages the node received (train + evaluate)
    restarts: int  # times the node was started again (fault hook)
    exit_codes: list[int | None]  # per life of the SuperNode
    cpu_quota: float | None  # CPU share per thread here (None: uncapped)
    log: str  # the SuperNode's log (last life)


@dataclass
class FederationResult:
    status: str  # ok | failed | interrupted
    run_dir: str
    tls: bool
    auth: bool
    rounds: dict[int, dict] = field(default_factory=dict)  # round -> {"train": [results, failures], "evaluate": ...}
    nodes: list[NodeResult] = field(default_factory=list)
    wall_seconds: float = 0.0  # this run's span (in a shared federation the first carries the start, the last the stop)
    startup_seconds: float = 0.0  # starting the SuperLink, registering keys, starting SuperNodes (0: reused them)
    flwr_exit_code: int | None = None
    message: str = ""  # why it failed, one line

    def to_dict(self) -> dict:
        return asdict(self)


def node_result(node: SuperNode, round_starts: list[tuple[float, int]] | None = None) -> NodeResult:
    lives = node.lives
    peaks = [life.cgroup_peak_bytes for life in lives if life.cgroup_peak_bytes is not None]
    if lives and lives[-1].ended is None and lives[-1].confinement.job is not None:  # a node that serves more runs
        peaks.append(lives[-1].confinement.job.memory_peak() or 0)
    cgroup_peak = max(peaks) if peaks else None
    oom = any(life.oom_killed for life in lives)
    # The cgroup's peak cannot pass its cap (the kernel reclaims page cache first, then OOM-kills), so what the
    # client stack needs is judged by the sum of its processes' PSS, shared pages counted once.
    peak = cgroup_peak if cgroup_peak is not None else node.peak_total_rss
    conf = lives[-1].confinement if lives else None
    return NodeResult(
        name=node.name, profile=node.profile.name, emulation=conf.mode if conf else "none",
        budget_bytes=node.profile.budget_bytes, cgroup_peak_bytes=cgroup_peak,
        sampled_peak_bytes=node.peak_total_rss, sampled_peak_pss_bytes=node.peak_total_pss,
        pss_by_round=dict(sorted(node.pss_by_round.items())),
        peak_rss_by_role=dict(node.peak_rss), peak_pss_by_role=dict(node.peak_pss), oom_killed=oom,
        fits=not oom and (node.peak_total_pss or peak) <= node.profile.budget_bytes,
        round_seconds=node.round_seconds(round_starts),
        messages=len(node.received("train")) + len(node.received("evaluate")), restarts=max(0, len(lives) - 1),
        exit_codes=[life.exit_code for life in lives], cpu_quota=conf.thread_share if conf else None,
        log=str(lives[-1].log) if lives else "")


def node_table(result: FederationResult) -> str:
    """One line per node: profile, peak memory against the budget, median train time per round, faults."""
    rows = [f"{'node':8} {'profile':12} {'cgroup peak':>11} {'RSS sum':>8} {'PSS sum':>8} {'budget':>7} "
            f"{'s/round':>7}  result"]
    for n in result.nodes:
        secs = list(n.round_seconds.values())
        verdict = "OOM-killed" if n.oom_killed else ("fits" if n.fits else "over budget")
        if n.restarts:
            verdict += f", restarted {n.restarts}x"
        cgroup, rss, pss, budget = (mb(v, unit=True) for v in (n.cgroup_peak_bytes, n.sampled_peak_bytes,
                                                                n.sampled_peak_pss_bytes, n.budget_bytes))
        rows.append(f"{n.name:8} {n.profile:12} {cgroup:>11} {rss:>8} {pss:>8} {budget:>7} "
                    f"{(f'{statistics.median(secs):.1f}' if secs else '-'):>7}  {verdict}")
    done = sum(1 for r in result.rounds.values() if "train" in r)
    rows.append(f"{result.status}: {done} rounds in {result.wall_seconds:.0f} s (TLS {'on' if result.tls else 'off'}, "
                f"node authentication {'on' if result.auth else 'off'})")
    return "\n".join(rows)
