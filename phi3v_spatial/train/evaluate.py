"""Scoring a model (optionally with an adapter) on spatial records, and aggregating the scores.

Closed questions are scored from likelihoods, not from free generation, so a small or half-trained
model is measured on what it knows rather than on whether it stops politely:
- yes/no: next-token probability of the first token of "yes" vs "no" right after the prompt;
- choice: summed log-likelihood of each choice's answer tokens (answer + ``<|end|>``);
- open / count / describe: greedy generation, normalised exact match;
- quantitative: greedy generation, first number parsed (units converted), within relative tolerance;
- plan: greedy generation through ``engine.parsing.parse_plan_reply``, then *executed*: the steps run on the
  record's 3D scene (``scenes.jsonl`` beside the records, read once per folder) through ``data.executor.judge_plan``;
  success = every step is possible, the instruction's goal holds afterwards and no other object moved (an
  instruction about an object that is not in view succeeds only with no steps and that object named as missing).
  A plan record without a known scene is scored as before (the step targets match the ground truth's) and its
  prediction says so.

``aggregate`` reports accuracy per type / relation / meta-category, plans per instruction family and for the
held-out sentence templates (parse rate, valid-step rate, success rate), multi-frame questions per family, and
the issue-20 ``targets`` (measured value, target, met) that ``format_table`` prints last.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from ..data.records import SpatialRecord
from ..engine import prompts
from .collator import IGNORE_INDEX, collate, encode_prompt, load_images, pad_id_of, record_prompt, target_ids

META_CATEGORIES = ("Adjacency", "Directional", "Orientation", "Projective", "Proximity", "Topological", "Unallocated")

# Metres per unit, for quantitative answers given in another unit than the ground truth.
_UNITS = {
    "mm": 0.001, "millimeter": 0.001, "millimeters": 0.001, "millimetre": 0.001, "millimetres": 0.001,
    "cm": 0.01, "centimeter": 0.01, "centimeters": 0.01, "centimetre": 0.01, "centimetres": 0.01,
    "m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "metres": 1.0,
    "in": 0.0254, "inch": 0.0254, "inches": 0.0254, "ft": 0.3048, "foot": 0.3048, "feet": 0.3048,
}
_NUM_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*([a-zA-Z]+)?")


# ----------------------------------------------------------------------------------------------------------
# Record kinds and per-record scoring helpers (pure)

def scoring_kind(record: SpatialRecord) -> str:
    """How a record is scored: yesno | choice | quantitative | plan | generate."""
    ans = record.answer.strip().lower()
    if record.type == "plan":
        return "plan"
    if record.type == "quantitative":
        return "quantitative"
    if record.type == "yesno" or (not record.choices and ans in (prompts.YES, prompts.NO) and record.type != "open"):
        return "yesno"
    if record.choices:
        return "choice"
    return "generate"


def normalise_text(text: str) -> str:
    text = text.replace(prompts.END, " ").replace(prompts.ENDOFTEXT, " ").lower()
    text = re.sub(r"[^a-z0-9.\- ]+", " ", text)
    return " ".join(text.strip(" .").split())


def parse_quantity(text: str, unit: str = "") -> float | None:
    """First number in ``text``, converted into ``unit`` when both units are known lengths."""
    m = _NUM_RE.search(text)
    if not m:
        return None
    value = float(m.group(1))
    said = (m.group(2) or "").lower()
    target = unit.lower()
    if said in _UNITS and target in _UNITS and said != target:
        value = value * _UNITS[said] / _UNITS[target]
    return value


def within_tolerance(pred: float | None, truth: float | None, tolerance: float | None) -> bool:
    """Relative tolerance (``tolerance`` = 0.25 means +-25%); exact when the truth is 0."""
    if pred is None or truth is None or not math.isfinite(pred):
        return False
    tol = 0.25 if tolerance is None else float(tolerance)
    if truth == 0:
        return abs(pred) <= 1e-9 + tol
    return abs(pred - truth) <= tol * abs(truth)


def plan_matches(text: str, truth_steps: Sequence[dict]) -> tuple[bool, bool, str]:
    """(parses, targets match, error), for plans without a scene to execute them on. Steps match when the
    sequence of step targets (normalised) equals the ground truth's; a reply with no steps and a reason or a
    missing object parses (and matches an empty ground truth)."""
    from ..engine.parsing import PlanParseError, parse_plan_reply

    try:
        steps = parse_plan_reply(text).steps
    except PlanParseError as e:
        return False, False, str(e)
    got = [normalise_text(str(s.get("target", ""))) for s in steps]
    want = [normalise_text(str(s.get("target", ""))) for s in truth_steps]
    return True, got == want, ""


NO_SCENE_NOTE = "scene unknown: scored by matching the step targets, not executed"


def score_plan(record: SpatialRecord, text: str, scene=None) -> tuple[bool, bool, dict]:
    """(parses, success, details) of a plan reply. With the record's ``scene`` (a ``SynthScene``) and a goal (or
    missing objects) the steps are executed by ``data.executor.judge_plan``: details ``scored_by`` "executor",
    ``steps_total``, ``steps_valid`` (steps the executor accepted) and its ``verdict``. Otherwise the step targets
    are matched: ``scored_by`` "targets" and a ``note`` saying why."""
    from ..engine.parsing import PlanParseError, parse_plan_reply

    if scene is None:
        note = NO_SCENE_NOTE
    elif not (record.goal or record.missing):
        note = "the record has no goal to check: scored by matching the step targets, not executed"
    else:
        note = ""
    try:
        reply = parse_plan_reply(text)
    except PlanParseError as e:
        out = {"scored_by": "targets" if note else "executor", "steps_total": 0, "steps_valid": 0, "error": str(e)}
        return False, False, {**out, "note": note} if note else out
    if not note:
        from ..data.executor import judge_plan

        try:
            v = judge_plan(scene, reply.steps, record.goal, record.movable, record.missing, reply.missing)
        except KeyError as e:   # the goal names an object the scene lacks: that scenes.jsonl is not these records'
            note = f"scene {record.scene!r} does not hold the goal's objects ({e}); " + NO_SCENE_NOTE
        else:
            return True, v.success, {"scored_by": "executor", "steps_total": v.steps_total,
                                     "steps_valid": v.steps_valid, "verdict": v.reason, "goal_holds": v.goal_holds,
                                     "others_untouched": v.others_untouched}
    _, match, _ = plan_matches(text, record.plan)
    return True, match, {"scored_by": "targets", "steps_total": len(reply.steps), "steps_valid": None, "note": note}


def load_scenes(folder: str) -> dict:
    """Scene id -> ``scenes.jsonl`` line (a dict) of a synthetic records folder; {} when it has none."""
    path = os.path.join(folder, "scenes.jsonl")
    if not os.path.isfile(path):
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out[str(d["id"])] = d
    return out


class SceneIndex:
    """The 3D ground truth of synthetic records: ``scenes.jsonl`` beside the records, read once per folder and
    each scene built once (``data.executor.scene_from_json``)."""

    def __init__(self):
        self._lines: dict[str, dict] = {}
        self._scenes: dict[tuple[str, str], object] = {}

    def get(self, root: str, scene_id: str):
        """The ``SynthScene`` ``scene_id`` of the records in ``root``, or None when unknown."""
        if not scene_id:
            return None
        folder = os.path.abspath(root or ".")
        if folder not in self._lines:
            self._lines[folder] = load_scenes(folder)
        key = (folder, scene_id)
        if key not in self._scenes:
            line = self._lines[folder].get(scene_id)
            if line is None:
                return None
            from ..data.executor import scene_from_json

            self._scenes[key] = scene_from_json(line)
        return self._scenes[key]


def meta_category_of(record: SpatialRecord) -> str:
    if record.meta_category:
        return record.meta_category
    try:
        from ..data.vsr import VSR_META_CATEGORIES
    except ImportError:
        return ""
    rel = (record.relation or "").strip().lower()
    cat = VSR_META_CATEGORIES.get(rel, "") if isinstance(VSR_META_CATEGORIES, dict) else ""
    return cat


# ----------------------------------------------------------------------------------------------------------
# Predictions and aggregation (pure)

@dataclass
class Prediction:
    id: str
    type: str
    kind: str
    relation: str
    meta_category: str
    answer: str
    predicted: str
    correct: bool
    score: float | None = None          # yes/no: P(yes); choice: best log-likelihood
    value: float | None = None          # quantitative: parsed number
    plan_parsed: bool | None = None
    extra: dict = field(default_factory=dict)
    family: str = ""                    # plan instruction / multi-frame question family
    template: str = ""                  # "held-out": a sentence template training never used


def judge(record: SpatialRecord, predicted: str, score: float | None = None, scene=None) -> Prediction:
    """Turn a predicted answer text into a scored Prediction (used by the model scorer and by tests). ``scene``
    (the record's ``SynthScene``) is only used for plans, which are then executed (``score_plan``)."""
    kind = scoring_kind(record)
    value = None
    plan_parsed = None
    extra: dict = {}
    if kind == "quantitative":
        value = parse_quantity(predicted, record.unit)
        correct = within_tolerance(value, record.value, record.tolerance)
    elif kind == "plan":
        plan_parsed, correct, extra = score_plan(record, predicted, scene)
    else:
        correct = normalise_text(predicted) == normalise_text(record.answer)
    return Prediction(
        id=record.id, type=record.type, kind=kind, relation=record.relation, meta_category=meta_category_of(record),
        answer=record.answer, predicted=predicted, correct=bool(correct), score=score, value=value, plan_parsed=plan_parsed,
        extra=extra, family=record.family, template=record.template,
    )


def _acc(preds: Sequence[Prediction]) -> dict:
    n = len(preds)
    c = sum(p.correct for p in preds)
    return {"n": n, "correct": c, "accuracy": (c / n) if n else None}


PLAN_FAMILIES = ("move", "refer", "multistep", "done", "missing")          # data.plans.FAMILIES
MULTIFRAME_FAMILIES = ("motion", "relation change", "two cameras")        # data.questions


def _plan_row(preds: Sequence[Prediction]) -> dict:
    """n, parse rate, valid-step rate (steps the executor accepted / steps proposed, over executed plans),
    success rate, and how many were judged by the executor (the rest: step targets matched, no scene)."""
    n = len(preds)
    executed = [p for p in preds if p.extra.get("scored_by") == "executor"]
    proposed = sum(int(p.extra.get("steps_total") or 0) for p in executed)
    accepted = sum(int(p.extra.get("steps_valid") or 0) for p in executed)
    return {
        "n": n,
        "parse_rate": (sum(bool(p.plan_parsed) for p in preds) / n) if n else None,
        "valid_step_rate": (accepted / proposed) if proposed else None,
        "success_rate": (sum(p.correct for p in preds) / n) if n else None,
        "executed": len(executed),
    }


def _value(report: dict, *path):
    """(value, n) at a path of the report: a ``_acc`` dict's accuracy, or a named rate of a row."""
    node = report
    for key in path[:-1]:
        node = (node or {}).get(key)
    node = node or {}
    return node.get(path[-1]), node.get("n", 0)


# The issue-20 table: (row, target, where the measured value is in the report).
TARGETS = (
    ("yes/no relations", 0.95, ("per_type", "yesno", "accuracy")),
    ("choice", 0.90, ("per_type", "choice", "accuracy")),
    ("plan success after execution", 0.85, ("plans", "all", "success_rate")),
    ("plan success: referring expressions", 0.75, ("plans", "per_family", "refer", "success_rate")),
    ("plan success: multi-step", 0.75, ("plans", "per_family", "multistep", "success_rate")),
    ("plan parse rate", 0.99, ("plans", "all", "parse_rate")),
    ("multi-frame", 0.85, ("per_type", "multiframe", "accuracy")),
    ("counting", 0.90, ("per_type", "count", "accuracy")),
    ("open (object name)", 0.80, ("per_type", "open", "accuracy")),
    ("metric within tolerance", 0.50, ("quantitative", "within_tolerance")),
)


def targets(report: dict) -> list[dict]:
    """The target rows in the issue's order: ``name``, measured ``value``, ``target``, ``goal`` (as printed),
    ``met`` (None when the data held no such records) and ``n``."""
    rows = []
    for name, target, path in TARGETS:
        value, n = _value(report, *path)
        rows.append({"name": name, "value": value, "target": target, "goal": f">= {100 * target:.0f}%",
                     "met": None if value is None else bool(value >= target), "n": n})
    return rows


def aggregate(preds: Sequence[Prediction]) -> dict:
    """Accuracy overall, per type, per relation, per VSR meta-category; within-tolerance rate for
    quantitative answers; plans overall, per family and for held-out templates; multi-frame questions per
    family; and the ``targets`` rows."""
    by_type: dict[str, list] = defaultdict(list)
    by_rel: dict[str, list] = defaultdict(list)
    by_meta: dict[str, list] = defaultdict(list)
    for p in preds:
        by_type[p.type].append(p)
        if p.relation:
            by_rel[p.relation].append(p)
        if p.meta_category:
            by_meta[p.meta_category].append(p)
    quant = [p for p in preds if p.kind == "quantitative"]
    plans = [p for p in preds if p.kind == "plan"]
    multi = [p for p in preds if p.type == "multiframe"]
    plan_families = list(PLAN_FAMILIES) + sorted({p.family or "(none)" for p in plans} - set(PLAN_FAMILIES))
    multi_families = list(MULTIFRAME_FAMILIES) + sorted({p.family or "(none)" for p in multi} - set(MULTIFRAME_FAMILIES))
    report = {
        "overall": _acc(preds),
        "per_type": {k: _acc(v) for k, v in sorted(by_type.items())},
        "per_relation": {k: _acc(v) for k, v in sorted(by_rel.items())},
        "per_meta_category": {k: _acc(by_meta[k]) for k in META_CATEGORIES if k in by_meta},
        "quantitative": {
            "n": len(quant),
            "within_tolerance": (sum(p.correct for p in quant) / len(quant)) if quant else None,
            "parsed": (sum(p.value is not None for p in quant) / len(quant)) if quant else None,
        },
        # validity = success (executed where the scene is known); "plans" has the breakdown.
        "plan": {
            "n": len(plans),
            "parse_rate": (sum(bool(p.plan_parsed) for p in plans) / len(plans)) if plans else None,
            "validity": (sum(p.correct for p in plans) / len(plans)) if plans else None,
        },
        "plans": {
            "all": _plan_row(plans),
            "per_family": {f: _plan_row([p for p in plans if (p.family or "(none)") == f]) for f in plan_families},
            "held_out_templates": _plan_row([p for p in plans if p.template == "held-out"]),
        },
        "multiframe": {
            "all": _acc(multi),
            "per_family": {f: _acc([p for p in multi if (p.family or "(none)") == f]) for f in multi_families},
        },
    }
    # Categories outside the VSR seven (e.g. synthetic-only labels) are still reported.
    for k, v in sorted(by_meta.items()):
        if k not in report["per_meta_category"]:
            report["per_meta_category"][k] = _acc(v)
    # Yes/no balance: a model answering always "yes" shows up here.
    yesno = [p for p in preds if p.kind == "yesno"]
    if yesno:
        report["yesno_predicted_yes_rate"] = sum(normalise_text(p.predicted) == prompts.YES for p in yesno) / len(yesno)
    report["targets"] = targets(report)
    return report


def _fmt(acc) -> str:
    return "   -  " if acc is None else f"{100 * acc:5.1f}%"


def format_table(report: dict, title: str = "") -> str:
    """A readable plain-text table of a report (the targets last)."""
    lines = []
    if title:
        lines += [title, "=" * len(title)]
    o = report["overall"]
    lines.append(f"{'overall':<34} {_fmt(o['accuracy'])}  (n={o['n']})")
    for section, name in (("per_type", "type"), ("per_meta_category", "meta-category"), ("per_relation", "relation")):
        if report.get(section):
            lines.append(f"-- by {name}")
            for k, v in report[section].items():
                lines.append(f"   {k:<31} {_fmt(v['accuracy'])}  (n={v['n']})")
    q = report["quantitative"]
    if q["n"]:
        lines.append(f"{'quantitative within tolerance':<34} {_fmt(q['within_tolerance'])}  (n={q['n']}, parsed {_fmt(q['parsed'])})")
    plans = report.get("plans")
    if plans and plans["all"]["n"]:
        lines.append("-- plans (success: every step possible, the goal holds after execution, nothing else moved)")
        lines.append(f"   {'family':<21} {'n':>5} {'parsed':>7} {'valid steps':>12} {'success':>8}")
        rows = [("all", plans["all"])] + [(k, v) for k, v in plans["per_family"].items()] + \
            [("held-out templates", plans["held_out_templates"])]
        for k, v in rows:
            lines.append(f"   {k:<21} {v['n']:>5} {_fmt(v['parse_rate']):>7} {_fmt(v['valid_step_rate']):>12} "
                         f"{_fmt(v['success_rate']):>8}")
        unexecuted = plans["all"]["n"] - plans["all"]["executed"]
        if unexecuted:
            lines.append(f"   ({unexecuted} of {plans['all']['n']} plans had no scene: step targets matched, not executed)")
    multi = report.get("multiframe")
    if multi and multi["all"]["n"]:
        lines.append("-- multi-frame by family")
        for k, v in multi["per_family"].items():
            lines.append(f"   {k:<31} {_fmt(v['accuracy'])}  (n={v['n']})")
    if "yesno_predicted_yes_rate" in report:
        lines.append(f"{'yes/no: share answered yes':<34} {_fmt(report['yesno_predicted_yes_rate'])}")
    if report.get("targets"):
        lines.append("-- targets (issue 20)")
        for row in report["targets"]:
            met = "no data" if row["met"] is None else ("met" if row["met"] else "NOT MET")
            lines.append(f"   {row['name']:<35} {_fmt(row['value'])}  {row['goal']:<6} {met:<8} (n={row['n']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Model scoring

def first_answer_token(tokenizer, prompt: str, answer: str) -> int:
    """First token id of ``answer`` as it follows ``prompt``: tokenise prompt+answer and take the token
    after the prompt's tokens (works for any tokenizer, whatever it does at the boundary)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + prompts.answer_target(answer), add_special_tokens=False)["input_ids"]
    if len(full) > len(p) and list(full[: len(p)]) == list(p):
        return int(full[len(p)])
    return int(target_ids(tokenizer, answer)[0])


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: ``<|end|>``, ``<|endoftext|>``, ``</s>`` (those the tokenizer has)."""
    ids = []
    for tok in (prompts.END, prompts.ENDOFTEXT, "</s>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is not None and i != tokenizer.unk_token_id and i not in ids:
            ids.append(int(i))
    return ids


class Scorer:
    """Scores records with a loaded model + processor (adapter already applied, or not)."""

    def __init__(self, model, processor, device=None, max_new_tokens: int = 64, plan_max_new_tokens: int = 256):
        import torch

        self.torch = torch
        self.model = model
        self.processor = processor
        self.tok = processor.tokenizer
        self.device = device or next(model.parameters()).device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.pad_id = pad_id_of(self.tok)
        self.stop_ids = stop_token_ids(self.tok)
        self.max_new_tokens = max_new_tokens
        self.plan_max_new_tokens = plan_max_new_tokens
        self._first_tok: dict = {}
        self.scenes = SceneIndex()

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if k == "labels":
                continue
            v = v.to(self.device)
            if k == "pixel_values":
                v = v.to(self.dtype)
            out[k] = v
        return out

    def _prompt_batch(self, record: SpatialRecord, images) -> dict:
        from .collator import EncodedSample

        ids, pv, sizes = encode_prompt(self.processor, record_prompt(record), images)
        return collate([EncodedSample(ids, [IGNORE_INDEX] * len(ids), pv, sizes)], self.pad_id)

    def yes_no(self, record: SpatialRecord, images) -> float:
        """P(yes) / (P(yes) + P(no)) for the first answer token."""
        torch = self.torch
        prompt = record_prompt(record)
        key = prompt.count("<|image_")
        if key not in self._first_tok:
            # The first answer token depends only on the text right before it, which ends in the same
            # way for every chat prompt; cache per image count to skip re-tokenising.
            self._first_tok[key] = (first_answer_token(self.tok, prompt, prompts.YES),
                                    first_answer_token(self.tok, prompt, prompts.NO))
        yes_id, no_id = self._first_tok[key]
        batch = self._to_device(self._prompt_batch(record, images))
        with torch.no_grad():
            logits = self.model(**batch).logits[0, -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        ly, ln = logp[yes_id].item(), logp[no_id].item()
        return 1.0 / (1.0 + math.exp(ln - ly))

    def choice_logliks(self, record: SpatialRecord, images, choices: Sequence[str]) -> list[float]:
        """Summed log-likelihood of each choice's answer tokens up to and including ``<|end|>``."""
        from .collator import EncodedSample

        torch = self.torch
        ids, pv, sizes = encode_prompt(self.processor, record_prompt(record), images)
        samples = []
        for c in choices:
            tgt = target_ids(self.tok, c)
            end_id = self.tok.convert_tokens_to_ids(prompts.END)
            if end_id in tgt:
                tgt = tgt[: tgt.index(end_id) + 1]
            samples.append(EncodedSample(ids + tgt, [IGNORE_INDEX] * len(ids) + tgt, pv, sizes))
        batch = collate(samples, self.pad_id)
        labels = batch["labels"]
        inputs = self._to_device(batch)
        with torch.no_grad():
            logits = self.model(**inputs).logits.float().cpu()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:]
        mask = tgt != IGNORE_INDEX
        picked = logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1).tolist()

    def generate(self, record: SpatialRecord, images, max_new_tokens: int) -> str:
        torch = self.torch
        batch = self._to_device(self._prompt_batch(record, images))
        n = batch["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        new = out[0, n:].tolist() if out.shape[1] > n else out[0].tolist()
        return self.tok.decode(new, skip_special_tokens=True).strip()

    def predict(self, record: SpatialRecord, root: str) -> Prediction:
        images = load_images(record, root) if record.images else []
        kind = scoring_kind(record)
        if kind == "yesno":
            p_yes = self.yes_no(record, images)
            return judge(record, prompts.YES if p_yes > 0.5 else prompts.NO, score=p_yes)
        if kind == "choice":
            ll = self.choice_logliks(record, images, record.choices)
            best = max(range(len(ll)), key=lambda i: ll[i])
            pred = judge(record, record.choices[best], score=ll[best])
            pred.extra["logliks"] = dict(zip(record.choices, ll))
            return pred
        if kind == "plan":
            text = self.generate(record, images, self.plan_max_new_tokens)
            return judge(record, text, scene=self.scenes.get(root, record.scene))
        return judge(record, self.generate(record, images, self.max_new_tokens))


def evaluate_records(scorer: Scorer, items: Iterable[tuple[SpatialRecord, str]], progress: bool = True,
                     desc: str = "eval") -> tuple[dict, list[Prediction]]:
    items = list(items)
    preds = []
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc=desc, dynamic_ncols=True)
    for record, root in it:
        preds.append(scorer.predict(record, root))
        if progress and len(preds) % 10 == 0:
            it.set_postfix(acc=f"{sum(p.correct for p in preds) / len(preds):.3f}")
    return aggregate(preds), preds


def write_report(path: str, report: dict, preds: Sequence[Prediction] | None = None, **meta) -> None:
    data = dict(meta)
    data["report"] = report
    if preds is not None:
        data["predictions"] = [asdict(p) for p in preds]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def select_items(sources: Sequence, limit: int | None = None, seed: int = 0) -> list:
    """All (record, root) items of the sources, or a seeded random ``limit`` per source (file order kept)."""
    import numpy as np

    out = []
    for d, src in enumerate(sources):
        items = list(src[0])
        if limit is not None and len(items) > limit:
            keep = sorted(np.random.default_rng([seed, d]).choice(len(items), size=limit, replace=False).tolist())
            items = [items[i] for i in keep]
        out.extend(items)
    return out


def load_scorer(model_dir: str, adapter_dir: str | None = None, device: str = "auto", dtype: str = "auto",
                num_crops: int | None = None, max_new_tokens: int = 64) -> Scorer:
    """Model + processor (+ adapter through ``AdapterManager``, as the node loads it)."""
    from ..model import Phi3VForCausalLM, Phi3VProcessor
    from ..model.runtime import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    processor = Phi3VProcessor.from_pretrained(model_dir, num_crops=num_crops)
    model = Phi3VForCausalLM.from_pretrained(model_dir, torch_dtype=dt).to(dev)
    model.eval()
    net = model
    if adapter_dir:
        from ..model.adapters import AdapterManager

        manager = AdapterManager(model)
        manager.load("evaluated", adapter_dir)
        manager.activate("evaluated")
        net = getattr(manager, "model", model)
        net.eval()
    return Scorer(net, processor, device=dev, max_new_tokens=max_new_tokens)
