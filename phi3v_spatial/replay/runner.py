"""Offline replay: feed a bag's camera frames through the node's FrameWindow and answer questions at bag times.

The point is that replay and the live node give the same answers for the same frames: frames go into the
same :class:`~phi3v_spatial.engine.window.FrameWindow` (same parameters, header-stamp order), and each question
is the node's request, answered by the node's request layer (:class:`~phi3v_spatial.engine.requests.RequestHandler`:
defaults, frame selection and decoding, frame keys, the engine call, error texts). Time is the header-stamp
clock: a question at time T sees every frame stamped <= T and none after, with T as the window's ``now``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

from ..engine.parsing import Relation
from ..engine.requests import FRAMES, OUTPUT, REFUSED, RequestHandler
from ..engine.window import FrameWindow
from ..engine.worker import InferenceWorker
from .bag_reader import NS, BagError, BagInfo, FrameReader, bag_info, choose_topics, fmt_time, open_reader
from .params import ReplaySettings, resolve_topic
from .question_file import Question, resolve_at
from .scoring import score, summarize

# Header stamps this far from the recording times mean the camera stamps with another clock.
CLOCK_MISMATCH_WARN_S = 10.0


def stamp_dict(ns: int, topic: str | None = None) -> dict:
    d = {"stamp_ns": int(ns), "sec": int(ns // NS), "nanosec": int(ns % NS)}
    if topic is not None:
        d = {"topic": topic, **d}
    return d


def relation_dict(r: Relation) -> dict:
    return {"subject": r.subject, "relation": r.relation, "object": r.object, "holds": bool(r.holds),
            "probability": float(r.probability)}


@dataclass
class ReplayOutcome:
    """Results in question-file order, the summary, and what went wrong with the bag (``fatal``: exit != 0)."""

    results: list[dict]
    summary: dict
    info: BagInfo | None = None
    topics: list[str] = field(default_factory=list)
    fatal: str = ""
    warnings: list[str] = field(default_factory=list)
    window_stats: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.fatal else 0


class Replayer:
    """Answers a questions list over one bag with one engine (the engine can be shared between bags)."""

    def __init__(self, engine, settings: ReplaySettings, *, progress: bool = False,
                 warn: Callable[[str], None] | None = None):
        self.engine = engine
        self.settings = settings
        self.progress = progress
        self._warn_cb = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))

    # ------------------------------------------------------------------ the replay loop
    def run(self, bag_path: str, questions: list[Question], topics: list[str] | None = None) -> ReplayOutcome:
        """Replay ``bag_path``; ``topics`` (else settings.image_topics, else every image topic) are the cameras."""
        warnings: list[str] = []

        def warn(text: str) -> None:
            warnings.append(text)
            self._warn_cb(text)

        worker = None
        try:
            reader = open_reader(bag_path)
        except BagError as e:
            results = [self._base(q, None) | {"error": f"{e}"} for q in questions]
            return ReplayOutcome(results, summarize(results), fatal=str(e))
        try:
            info = bag_info(reader, bag_path)
            wanted = topics or self.settings.image_topics
            chosen, problems = choose_topics(info, wanted)
            for text in problems.values():
                warn(text)
            if not chosen:
                warn(f"bag {bag_path!r}: no image topics to replay (bag topics: "
                     f"{', '.join(f'{t} [{typ}]' for t, typ in sorted(info.topics.items())) or 'none'})")
            window = FrameWindow(**self.settings.window_kwargs())
            for t in chosen:
                window.add_topic(t)  # subscribed, like the node: 'silent' is then told apart from 'unknown'
            # frame keys carry the bag: two bags never share the engine's cache entries
            worker = InferenceWorker(max_pending=1, name="replay")
            requests = RequestHandler(self.engine, worker, window=window, settings=self.settings.serving(),
                                      resolve_topic=resolve_topic, key_scope=(bag_path,))
            frames = FrameReader(reader, info, chosen, progress=self.progress)
            frames.index()
            report = frames.report
            if report.fatal or report.damaged:
                warn(report.fatal or report.damaged)
            for t in sorted(frames.zero_stamp_topics):
                warn(f"bag {bag_path!r}: camera {t} has header.stamp = 0; using the recording time instead (as the node does)")
            if frames.first_stamp_ns is not None and abs(frames.first_stamp_ns - info.start_ns) > CLOCK_MISMATCH_WARN_S * NS:
                warn(f"bag {bag_path!r}: the first header stamp ({fmt_time(frames.first_stamp_ns)}) is "
                     f"{(frames.first_stamp_ns - info.start_ns) / NS:+.1f} s from the recording start "
                     f"({fmt_time(info.start_ns)}): the cameras stamp with another clock; relative 'at' values count "
                     f"from the recording start, so give absolute stamps instead")
            ctx = _Context(bag_path, info, problems, window, report, requests)

            timed: list[tuple[int, int, Question]] = []
            at_end: list[Question] = []
            results: dict[int, dict] = {}
            for q in questions:
                if q.error:
                    results[q.index] = self._base(q, None) | {"error": q.error}
                    continue
                t = resolve_at(q.at, info.start_ns)
                if t is None:
                    at_end.append(q)
                else:
                    timed.append((t, q.index, q))
            timed.sort(key=lambda x: (x[0], x[1]))

            k = 0
            last_stamp = None
            for frame in frames:
                while k < len(timed) and timed[k][0] < frame.stamp_ns:
                    results[timed[k][1]] = self._answer(timed[k][2], timed[k][0], ctx)
                    k += 1
                window.add(frame.topic, frame.stamp_ns, frame.payload)
                last_stamp = frame.stamp_ns
            for t, idx, q in timed[k:]:
                results[idx] = self._answer(q, t, ctx)
            end_ns = last_stamp if last_stamp is not None else info.end_ns
            for q in at_end:
                results[q.index] = self._answer(q, end_ns, ctx)
            if report.skipped_count:
                warn(f"bag {bag_path!r}: {report.skipped_count} frame(s) skipped: " + "; ".join(report.skipped[:3])
                     + (" ..." if report.skipped_count > 3 else ""))
            ordered = [results[q.index] for q in questions]
            if report.damaged:
                for r in ordered:
                    if "time" in r and not r["error"]:
                        r["warning"] = report.damaged
            return ReplayOutcome(ordered, summarize(ordered), info, chosen, fatal=report.fatal or report.damaged,
                                 warnings=warnings, window_stats=window.stats())
        finally:
            reader.close()
            if worker is not None:
                worker.stop()

    # ------------------------------------------------------------------ one question
    @staticmethod
    def _base(q: Question, now_ns: int | None) -> dict:
        r = {"id": q.id, "type": q.type, "at": q.at}
        if now_ns is not None:
            r["time"] = stamp_dict(now_ns)
        if q.type == "ask":
            r["question"] = q.question
        elif q.type == "relations":
            r["candidates"] = [{"subject": c.subject, "relation": c.relation, "object": c.object} for c in q.candidates]
        elif q.type == "plan":
            r["instruction"] = q.instruction
            r["reason"] = ""
        r.update({"topics": list(q.topics), "frame_stamps": [], "answer": "", "relations": [], "steps": [],
                  "raw_text": "", "tokens_generated": 0, "latency_s": 0.0, "error": ""})
        if q.expect is not None:
            r["correct"] = None
        return r

    def _answer(self, q: Question, now_ns: int, ctx: "_Context") -> dict:
        res = self._base(q, now_ns)
        where = f"bag {ctx.bag_path!r}, question {q.id} at {fmt_time(now_ns)}"
        try:
            res.update(self._compute(q, now_ns, ctx, where))
        except _Unanswerable as e:
            res["error"] = str(e)
        correct, detail = score(q, res)
        if correct is not None:
            res["correct"] = correct
            res.update(detail)
        return res

    def _compute(self, q: Question, now_ns: int, ctx: "_Context", where: str) -> dict:
        rep = ctx.report
        at_end = resolve_at(q.at, 0) is None  # the true end of a damaged bag is unknown
        if rep.fatal and (at_end or rep.fatal_after_ns is None or now_ns > rep.fatal_after_ns):
            raise _Unanswerable(f"{where}: cannot answer: {rep.fatal}")
        topics = [resolve_topic(t) for t in q.topics]  # as the node resolves a request's image_topics
        # no topics = every camera asked for (the node would fail on one that never publishes, so does replay)
        for t in topics or list(ctx.problems):
            if t in ctx.problems:
                raise _Unanswerable(f"{where}: {ctx.problems[t]}")
            if t not in ctx.window.topics:
                raise _Unanswerable(f"{where}: camera topic {t} is not replayed (replayed: "
                                    f"{', '.join(ctx.window.topics) or 'none'}; choose with --topics or image_topics)")
        reply = ctx.requests.handle(q.request(), now_ns=now_ns)
        out = {}
        if reply.frames:
            out["topics"] = list(reply.topics)
            out["frame_stamps"] = [stamp_dict(f.stamp_ns, f.topic) for f in reply.frames]
        if q.type == "ask":
            out.update(answer=reply.answer, raw_text=reply.answer, relations=[relation_dict(x) for x in reply.relations],
                       tokens_generated=reply.tokens_generated)
        elif q.type == "relations":
            out.update(relations=[relation_dict(x) for x in reply.relations])
        else:
            out.update(steps=reply.steps, reason=reply.reason, raw_text=reply.raw_text,
                       tokens_generated=reply.tokens_generated)
        if reply.error_kind == FRAMES:
            first = ctx.info.start_ns
            raise _Unanswerable(f"{where} ({(now_ns - first) / NS:+.3f} s from the bag start): {reply.error}")
        out["error"] = reply.error if reply.error_kind in ("", OUTPUT, REFUSED) else f"{where}: {reply.error}"
        out["latency_s"] = reply.latency_s
        if reply.note:  # e.g. fewer frames than num_frames asked
            out["note"] = reply.note
        return out


class _Unanswerable(Exception):
    pass


@dataclass
class _Context:
    bag_path: str
    info: BagInfo
    problems: dict[str, str]
    window: FrameWindow
    report: object
    requests: RequestHandler
