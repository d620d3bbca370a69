"""What reports read: `collect` gathers one run directory, or several (one per seed), into every number
a report, a plot or a comparison shows, with paired bootstrap intervals from stats.py."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from . import SteerhealError
from .rundir import BASELINES, ROUND_GLOB, protocol_path, round_key
from .stats import Difference, EvalRows, compare, difference


@dataclass
class RoundRecord:
    """round.json: a finished round's numbers, read off its artifacts (Loop.finish_round)."""

    round: int
    arm: str
    coeff: float
    dose: dict[str, Any]  # dose.json: the method, its probes, the chosen C
    filter: dict[str, Any]  # filter.summary of kept + rejected rows
    target: str
    direction: int
    cos_v0: float  # this round's vector against round 0's
    vector_norm: float
    steered: dict[str, Any] | None  # loop.eval_summary of the raw-steered eval (None: not measured this round)
    healed: dict[str, Any] | None  # ... of the healed eval (None: the round stopped before its heal)
    base_target_nats: float
    heal: dict[str, Any] | None  # the heal's validation numbers, steps, rows and time
    time_s: dict[str, float]  # seconds per step that ran, and their total
    # Keys added after the first runs: an older round.json reads with these defaults
    gen_steered: dict[str, Any] | None = None  # generation coherence, steered and healed
    gen_healed: dict[str, Any] | None = None
    tokens: dict[str, int] | None = None  # the method's token passes (forward, trained)
    online: bool = False
    stop: str | None = None  # why the loop stops after this round
    below_floor: bool = False  # healed coherence fell below pmass_floor × base

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path: Path) -> RoundRecord:
        d = json.loads(Path(path).read_text())
        need = [f.name for f in fields(cls) if f.default is MISSING and f.name not in d]
        if need:
            raise SteerhealError(
                f"{path}: no {', '.join(need)}; a round.json from an older steerheal: rerun the round (delete its "
                "directory and run the loop again)"
            )
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def read_rounds(run_dir: Path) -> list[RoundRecord]:
    """The records of a run's finished rounds, in order."""
    return [
        RoundRecord.read(d / "round.json") for d in sorted(run_dir.glob(ROUND_GLOB)) if (d / "round.json").is_file()
    ]


@dataclass
class ArmDifference:
    """compare: the reference arm minus another, at the last healed round both reached. In compare.json, one
    object: the selectivity difference's fields beside these."""

    round: int
    seeds: list[int]  # seeds on each side
    paired_seeds: list[int]  # the seeds both ran, when the seed test is paired
    selectivity: Difference  # reference − arm, with Holm's reading over the family (compare.holm_family)
    arm_minus_reference: dict[str, Difference]  # the Pareto axes: target_shift, pmass_ratio
    front: str  # where the arm lies against the reference on (shift, coherence)

    def to_dict(self) -> dict[str, Any]:
        head = {"round": self.round, "seeds": self.seeds, "paired_seeds": self.paired_seeds}
        axes = {m: d.to_dict() for m, d in self.arm_minus_reference.items()}
        return head | self.selectivity.to_dict() | {"arm_minus_reference": axes, "front": self.front}


def _json(p: Path) -> Any:
    return json.loads(p.read_text())


def _rows(p: Path) -> EvalRows:
    return EvalRows.from_report(_json(p))


@dataclass
class ArmSummary:
    """compare: one arm's standing, read at its last healed round. In compare.json, the fields that are set."""

    rounds: int
    healed_rounds: int
    last: dict[str, Any] | None = None  # the last healed round's shift, selectivity, pmass ratio and intervals
    vs_prompting: Difference | None = None  # its selectivity minus the prompting baseline's
    null_raw: dict[str, Any] | None = None  # compare.place: round 0's raw shift among the random directions
    null_healed: dict[str, Any] | None = None  # ... the healed shift among the random arm's healed seeds
    reference_minus_arm: ArmDifference | None = None  # None for the reference itself

    def to_dict(self) -> dict[str, Any]:
        out = {"rounds": self.rounds, "healed_rounds": self.healed_rounds}
        for k in ("last", "vs_prompting", "null_raw", "null_healed", "reference_minus_arm"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v.to_dict() if hasattr(v, "to_dict") else v
        return out


def collect(run_dirs: list[Path], protocol: str | None = None) -> dict[str, Any]:
    """Every number of the report, pooled over the run directories (seeds) that share base and vignettes;
    `protocol`: the evals as scored under another protocol of eval.also (None: the run's own)."""
    at = lambda p: protocol_path(p, protocol)  # noqa: E731
    first = run_dirs[0]
    rounds_by_seed = [read_rounds(r) for r in run_dirs]
    conf = yaml.safe_load((first / "config.yaml").read_text())
    base_rep = _json(at(first / BASELINES / "base.json"))
    base = EvalRows.from_report(base_rep)
    target, direction = conf["target"], int(conf["direction"])
    prompts = [_rows(at(r / BASELINES / "prompt.json")) for r in run_dirs]
    out: dict[str, Any] = {
        "persona": conf["persona"],
        "protocol": protocol or conf["config"].get("eval", {}).get("protocol"),
        "alt_protocol": protocol,  # the files read: None for the run's own
        "config": conf["config"],
        "target": target,
        "direction": direction,
        "seeds": [seed_of(r) for r in run_dirs],
        "base": base_rep,
        "prompt": compare(base, prompts, target, direction),
        "rounds": [],
    }
    n_rounds = max((len(x) for x in rounds_by_seed), default=0)
    prev_healed: list[EvalRows] | None = None
    for r in range(n_rounds):
        infos = [x[r] for x in rounds_by_seed if len(x) > r]
        dirs = [d / round_key(r) for d, x in zip(run_dirs, rounds_by_seed) if len(x) > r]
        # steered_measures=first: no raw-steered eval after round 0
        steered = [_rows(at(d / "eval_steered.json")) for d in dirs if at(d / "eval_steered.json").is_file()]
        healed = [_rows(at(d / "eval_healed.json")) for d, i in zip(dirs, infos) if i.healed]
        row = _round_row(r, infos, [s for s, x in zip(out["seeds"], rounds_by_seed) if len(x) > r])
        row["steered"] = compare(base, steered, target, direction) if steered else None
        row["healed"] = compare(base, healed, target, direction) if healed else None
        if healed:
            # Q1: does healing restore coherence compared with raw steering (paired, same vignettes)?
            if len(steered) == len(healed):
                row["heal_vs_steer_pmass"] = difference(
                    base, healed, steered, target, direction, "pmass_ratio", paired=True
                )
            row["heal_vs_prompt"] = difference(base, healed, prompts, target, direction, "selectivity")
            # Q3: did this round move the target further than the last one? Equal lengths mean the same
            # seeds in the same order: a seed that is not healed stops its loop, so the list only shrinks.
            if prev_healed:
                row["step_vs_prev"] = difference(
                    base, healed, prev_healed, target, direction, "target_shift", paired=len(healed) == len(prev_healed)
                )
            prev_healed = healed
        out["rounds"].append(row)
    out["gen_base"] = [_gen(r, "base") for r in run_dirs]
    out["gen_prompt"] = [_gen(r, "prompt") for r in run_dirs]
    return out


def _round_row(r: int, infos: list[RoundRecord], seed_ids: list[int]) -> dict[str, Any]:
    """Round r's per-seed facts from each seed's round.json, aligned with seed_ids."""
    return {
        "round": r,
        "n_seeds": len(infos),
        "seed_ids": seed_ids,  # aligned with coeff, kept_frac, ...
        "seed_healed": [bool(i.healed) for i in infos],  # the True ones, in order, are healed's per-seed values
        "coeff": [i.coeff for i in infos],
        "kept_frac": [i.filter["kept_frac"] for i in infos],
        "filter": [i.filter for i in infos],
        "cos_v0": [i.cos_v0 for i in infos],
        "heal": [i.heal for i in infos if i.heal],
        "time_s": [i.time_s for i in infos],
        "tokens": [i.tokens for i in infos if i.tokens is not None],  # rounds run before token counting have none
        "stop": [i.stop for i in infos],
        "gen_steered": [i.gen_steered for i in infos],
        "gen_healed": [i.gen_healed for i in infos],
    }


def seed_of(run_dir: Path) -> int:
    """The seed a run directory ran with (its config.yaml)."""
    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["config"]["seed"])


def _gen(run_dir: Path, name: str) -> dict | None:
    p = run_dir / BASELINES / f"gen_{name}.json"
    g = _json(p) if p.is_file() else None
    return None if not g or g.get("skipped") else g
