"""Online mode (`loop --online`): steer, filter and heal per step instead of per round.

Each step samples `online.batch` completions from the current student plus the vector, filters them
with the student, and takes one AdamW step on the kept rows: NLL plus the barrier to a reference that
trails the student (its LoRA as it was at the last multiple of `online.ref_every` steps). A segment of
`online.steps` steps is one round: it leaves the same files as generate, filter and heal
(completions, kept, rejected, adapter/ with heal.json), so the evals, the report and the plot run
unchanged.

After every step the LoRA, the reference snapshot, AdamW's moments and the rows so far are written
as one directory (round_XX/online/), swapped in atomically: a killed segment resumes at its next step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import SteerhealError
from .config import HealConfig, RunConfig
from .filter import filter_records
from .generate import generate_records
from .heal import attach_lora, batch_terms, encode_rows, measure, teacher_logprobs
from .logprobs import cat_logprobs, right_padded, span_logprobs
from .models import LoadedModel, TokenMeter, add_adapters, pad_token_id
from .persona import Persona
from .progress import log, progress
from .records import Record, atomic_path, read_records, with_system, without_system, write_records

CKPT = "online"


@dataclasses.dataclass
class Segment:
    """What one online segment needs beyond the model: where it writes, how it samples and trains."""

    out: Path  # the round directory
    persona: Persona
    cfg: RunConfig
    heal: HealConfig  # the round's heal settings (seed and reg already chosen by the arm)
    act: dict[str, Any]  # how to sample: {"vector", "coeff"} or {"system"}
    seed: int
    id_prefix: str
    teacher_system: str | None = None  # prompt-kl: fit the prompted student's distribution
    meter: TokenMeter | None = None  # each step's token passes go into its log row (a resume keeps them)


def run_segment(lm: LoadedModel, seg: Segment) -> dict[str, Any]:
    """Run (or resume) one segment; lm.model ends with the segment's adapter applied. Returns heal.json."""
    on, hcfg = seg.cfg.online, seg.heal
    peft_model, layers = attach_lora(lm.model, hcfg)
    student = LoadedModel(peft_model, lm.tokenizer, lm.name)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=hcfg.lr, weight_decay=hcfg.weight_decay)
    state = _load(seg.out / CKPT, params, opt, _fingerprint(seg))
    ok = False
    try:
        with progress("online steps", total=on.steps) as bar:
            bar(state["step"])
            for step in range(state["step"], on.steps):
                if step == on.ref_step(step):  # the reference catches up with the student
                    state["ref"] = {n: p.detach().clone() for n, p in params.items()}
                    state["ref_step"] = step
                t, before = time.perf_counter(), seg.meter.totals() if seg.meter else {}
                kept, rejected = _sample(student, seg, step)
                row = _train_step(student, params, opt, state["ref"], kept, seg)
                row["seconds"] = round(time.perf_counter() - t, 2)
                if seg.meter:
                    row["tokens"] = {k: v - before[k] for k, v in seg.meter.totals().items()}
                state["log"].append({"step": step, "kept": len(kept), "sampled": len(kept) + len(rejected), **row})
                state["kept"] += kept
                state["rejected"] += rejected
                state["step"] = step + 1
                _save(seg.out / CKPT, params, opt, state)
                bar(1, kept=len(kept), loss=row.get("loss", float("nan")))
        summary = _summarize(student, seg, state, layers, time.perf_counter())
        peft_model.eval()
        write_records(state["kept"] + state["rejected"], seg.out / "completions.jsonl")
        write_records(state["rejected"], seg.out / "rejected.jsonl")
        write_records(state["kept"], seg.out / "kept.jsonl")
        with atomic_path(seg.out / "adapter") as tmp:
            peft_model.save_pretrained(tmp)
            (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state["log"]))
            (tmp / "heal.json").write_text(json.dumps(summary, indent=2) + "\n")
        shutil.rmtree(seg.out / CKPT, ignore_errors=True)  # its rows and weights now live in the round's files
        ok = True
    finally:
        lm.model = peft_model.unload().eval()
        for p in lm.model.parameters():
            p.requires_grad_(False)
    if ok:
        add_adapters(lm, [seg.out / "adapter"])  # the next round's model
    log(
        f"online: {summary['steps']} steps, kept {summary['rows']['train']} of {summary['sampled']} rows, "
        f"NLL {summary['val_nll_start']:.3f} → {summary['val_nll']:.3f}, D mean {summary['val_D_mean']:.3f}"
    )
    return summary


def _sample(student: LoadedModel, seg: Segment, step: int) -> tuple[list[Record], list[Record]]:
    """This step's batch: the prompts after the previous step's, sampled from the student, then filtered."""
    prompts, n = seg.persona.generation, seg.cfg.online.batch
    start = (step * n) % len(prompts)
    gcfg = dataclasses.replace(seg.cfg.generate, n=n, batch_size=min(n, seg.cfg.generate.batch_size))
    student.model.eval()
    rows = generate_records(
        student,
        seg.persona.name,
        prompts[start:] + prompts[:start],
        gcfg,
        seed=seg.seed + step,
        id_prefix=f"{seg.id_prefix}-s{step}",
        **seg.act,
    )
    return filter_records(student, [without_system(x) for x in rows], seg.cfg.filter, seg.persona.narration)


def _trailing_logprobs(
    model: Any, params: dict[str, torch.nn.Parameter], ref: dict[str, torch.Tensor], b: Any
) -> torch.Tensor:
    """The trailing reference's log-probs: the student's weights swapped for the reference's, in eval mode."""
    with torch.no_grad(), _weights(params, ref):
        model.eval()
        try:
            return span_logprobs(model, b)
        finally:
            model.train()


def _train_step(
    student: LoadedModel,
    params: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    ref: dict[str, torch.Tensor],
    kept: list[Record],
    seg: Segment,
) -> dict[str, Any]:
    """One optimizer step over the kept rows (micro-batches of heal.batch_size); none if nothing was kept."""
    if not kept:
        return {"updated": False}
    hcfg, model = seg.heal, student.model
    rows = encode_rows(student.tokenizer, kept, hcfg.max_len)
    pad, dev = pad_token_id(student.tokenizer), next(model.parameters()).device
    teacher = None
    if seg.teacher_system is not None:
        teacher = teacher_logprobs(student, rows, [with_system(x, seg.teacher_system) for x in kept], hcfg)
    micro = [list(range(s, min(s + hcfg.batch_size, len(rows)))) for s in range(0, len(rows), hcfg.batch_size)]
    acc = {"loss": 0.0, "fit": 0.0, "D": 0.0}
    active = False
    model.train()
    for idx in micro:
        b = right_padded(rows, idx, pad, dev)

        t_logp = cat_logprobs([teacher[i] for i in idx], dev) if teacher is not None else None
        ref_logp = _trailing_logprobs(model, params, ref, b) if hcfg.reg != "nll" else None
        loss, fit, d = batch_terms(model, b, ref_logp, hcfg, t_logp)
        if not torch.isfinite(loss):
            raise SteerhealError(f"online step: loss is {float(loss)}; lower --set heal.lr or check the data")
        w = len(idx) / len(rows)
        (loss * w).backward()
        acc = {k: acc[k] + w * float(v.detach().mean()) for k, v in (("loss", loss), ("fit", fit), ("D", d))}
        active |= bool((d > hcfg.tau).any()) and hcfg.reg != "nll"
    if hcfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(list(params.values()), hcfg.max_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"updated": True, **acc, "barrier_active": active}


@contextmanager
def _weights(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """The LoRA temporarily set to `values` (the reference snapshot), then restored."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def _summarize(student: LoadedModel, seg: Segment, state: dict, layers: list[int], t0: float) -> dict[str, Any]:
    """heal.json for the segment. There is no held-out split online: NLL and D (to the segment's start model)
    are read over every kept row, before (LoRA off) and after. Time and token passes are the steps' own
    (kept in the checkpoint, so a resumed segment counts the steps of the killed process too)."""
    kept, model, hcfg = state["kept"], student.model, seg.heal
    log_rows = state["log"]
    updates = [r for r in log_rows if r["updated"]]
    out: dict[str, Any] = {
        "config": dataclasses.asdict(hcfg),
        "online": dataclasses.asdict(seg.cfg.online),
        "model": student.name,
        "rows": {"train": len(kept), "val": 0},
        "sampled": sum(r["sampled"] for r in state["log"]),
        "layers": layers,
        "ref_model": "the student, trailing (online.ref_every)",
        "steps": len(updates),
        "barrier_frac": sum(r["barrier_active"] for r in updates) / max(1, len(updates)),
        "mean_D_steps": sum(r["D"] for r in updates) / max(1, len(updates)),
    }
    if all("tokens" in r for r in log_rows):
        out["tokens"] = {k: sum(r["tokens"][k] for r in log_rows) for k in ("forward", "trained")}
    if kept:
        rows, pad = encode_rows(student.tokenizer, kept, hcfg.max_len), pad_token_id(student.tokenizer)
        idx = list(range(len(rows)))
        with model.disable_adapter():
            start = measure(model, rows, idx, None, hcfg, pad)["nll"]
        after = measure(model, rows, idx, None, hcfg, pad)
        out |= {"val_nll_start": start, "val_nll": after["nll"]}
        out |= {"val_D_mean": after["D_mean"], "val_D_rmse": after["D_rmse"]}
    else:
        out |= {k: float("nan") for k in ("val_nll_start", "val_nll", "val_D_mean", "val_D_rmse")}
    out["time_s"] = round(sum(r["seconds"] for r in log_rows) + time.perf_counter() - t0, 2)
    return out


# ---------------------------------------------------------------- the checkpoint


def _save(d: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, state: dict) -> None:
    """LoRA, reference and AdamW moments as safetensors, the rest as JSON/JSONL: one atomic directory."""
    tensors = {f"lora/{n}": p.detach().contiguous() for n, p in params.items()}
    tensors |= {f"ref/{n}": t.contiguous() for n, t in state["ref"].items()}
    adam_steps = {}
    for n, p in params.items():
        st = opt.state.get(p)
        if st:
            tensors[f"exp_avg/{n}"] = st["exp_avg"].contiguous()
            tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].contiguous()
            adam_steps[n] = float(st["step"])
    with atomic_path(d) as tmp:
        tmp.mkdir()
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        meta = {k: state[k] for k in ("step", "ref_step", "log", "fingerprint")} | {"adam_steps": adam_steps}
        (tmp / "state.json").write_text(json.dumps(meta) + "\n")
        write_records(state["kept"], tmp / "kept.jsonl")
        write_records(state["rejected"], tmp / "rejected.jsonl")


def _fingerprint(seg: Segment) -> str:
    """What the segment's steps depend on: a checkpoint from other settings (a --force rerun) is not resumed."""
    c = seg.cfg
    parts = [dataclasses.asdict(x) for x in (c.generate, c.filter, c.online, seg.heal)] + [seg.act.get("coeff")]
    return hashlib.sha256(json.dumps([parts, seg.seed, seg.teacher_system], sort_keys=True).encode()).hexdigest()[:16]


def _load(d: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, fingerprint: str) -> dict:
    """The state to continue from: a fresh one, or the last step's checkpoint loaded into params and opt."""
    fresh = {"step": 0, "ref_step": 0, "ref": {}, "log": [], "kept": [], "rejected": [], "fingerprint": fingerprint}
    if not (d / "state.json").is_file():
        return fresh
    meta = json.loads((d / "state.json").read_text())
    if meta.get("fingerprint") != fingerprint:
        log(f"[online] {d} was written with other settings: starting the segment over")
        return fresh
    t = load_file(str(d / "state.safetensors"))
    if set(params) != {k.removeprefix("lora/") for k in t if k.startswith("lora/")}:
        raise SteerhealError(f"{d}: the checkpoint's LoRA does not match this config's; rerun with --force")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(t[f"lora/{n}"])
            if n in meta["adam_steps"]:
                opt.state[p] = {
                    "step": torch.tensor(meta["adam_steps"][n]),
                    "exp_avg": t[f"exp_avg/{n}"].to(p.device),
                    "exp_avg_sq": t[f"exp_avg_sq/{n}"].to(p.device),
                }
    log(f"[online] resuming at step {meta['step']} from {d}")
    return {
        "step": meta["step"],
        "ref_step": meta["ref_step"],
        "ref": {n: t[f"ref/{n}"].to(p.device) for n, p in params.items()},
        "log": meta["log"],
        "fingerprint": fingerprint,
        "kept": read_records(d / "kept.jsonl"),
        "rejected": read_records(d / "rejected.jsonl"),
    }
