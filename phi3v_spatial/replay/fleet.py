"""Replay over many bags: each bag is one unit of work, answered by the single-bag ``Replayer``.

With ``--ray`` the bags go to a pool of Ray actors (``raypool``), each holding one engine, so the model loads
once per actor and not once per bag; without it the same worker runs here, one bag after the other. Every
line of the merged JSONL names its bag (``bag``: absolute path); a bag that cannot be replayed fails alone
(its lines carry ``error`` and ``bag_error``); each finished bag is appended to ``--out`` at once, so a rerun
with the same ``--out`` skips the bags already there (a failed bag is tried again) and an interrupted run
loses at most the bags in flight. At the end the file is rewritten in bag order, questions in file order.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

BAG_SUFFIXES = (".mcap", ".db3")
QUESTIONS_TEMPLATE = "{bag}"


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _storage_files(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1] in BAG_SUFFIXES)


def single_bag(specs: list[str]) -> bool:
    """One bag as the single-bag command has always taken it: a file, a rosbag2 folder (or one that lost its
    metadata.yaml but holds one storage file), or a path that does not exist (that command's error)."""
    if len(specs) != 1:
        return False
    p = specs[0]
    if not os.path.exists(p):
        return not _has_glob(p)
    if not os.path.isdir(p):
        return True
    return os.path.isfile(os.path.join(p, "metadata.yaml")) or len(_storage_files(p)) == 1


def expand_bags(specs: list[str]) -> tuple[list[str], list[str]]:
    """Bag paths (absolute, in order, no repeats) from files, rosbag2 folders, folders of bags (searched
    recursively, not into a bag) and glob patterns; plus warnings for specs that name no bag. A path that
    does not exist is kept: it fails alone, with the single-bag replay's message."""
    out: list[str] = []
    warnings: list[str] = []

    def add(path: str) -> None:
        path = os.path.abspath(path)
        if path not in out:
            out.append(path)

    def search(folder: str) -> int:
        found = 0
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            if "metadata.yaml" in files:
                add(root)
                dirs[:] = []
                found += 1
                continue
            for f in sorted(files):
                if os.path.splitext(f)[1] in BAG_SUFFIXES:
                    add(os.path.join(root, f))
                    found += 1
        return found

    for spec in specs:
        if _has_glob(spec) and not os.path.exists(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            n = 0
            for m in matches:
                if single_bag([m]) and (os.path.isfile(os.path.join(m, "metadata.yaml")) or
                                        os.path.splitext(m)[1] in BAG_SUFFIXES):
                    add(m)
                    n += 1
                elif os.path.isdir(m):
                    n += search(m)
            if not n:
                warnings.append(f"{spec!r} matches no bag")
        elif single_bag([spec]):
            add(spec)
        elif not search(spec):
            warnings.append(f"folder {spec!r} holds no bag (rosbag2 folders with metadata.yaml, .mcap or .db3 files)")
    return out, warnings


def questions_path(template: str, bag: str) -> str:
    """``--questions`` for ``bag``: the file itself, or a per-bag template (``{bag}`` = the bag's path without
    its .mcap/.db3 suffix, e.g. ``{bag}.questions.yaml`` as ``phi3v-spatial synth --bag`` writes them)."""
    if QUESTIONS_TEMPLATE not in template:
        return template
    stem, ext = os.path.splitext(bag)
    return template.replace(QUESTIONS_TEMPLATE, stem if ext in BAG_SUFFIXES else bag.rstrip("/"))


class ReplayWorker:
    """One engine (loaded once) that replays bags; a Ray actor in a pool, or a plain object in this process."""

    def __init__(self, settings, topics: list[str] | None, threads: float | None = None):
        if threads:
            from ..raypool import set_threads

            set_threads(threads)
        from ..commands.replay import load_engine

        self.engine = load_engine(settings)
        self.settings = settings
        self.topics = topics

    def ready(self) -> dict:
        return self.engine.describe()

    def run(self, bag: str, questions: list) -> dict:
        """The bag's results (question order), its fatal error if any, and its warnings."""
        from .runner import Replayer

        t0 = time.perf_counter()
        try:
            outcome = Replayer(self.engine, self.settings, warn=lambda text: None).run(bag, questions, topics=self.topics)
        except Exception as e:  # noqa: BLE001 - a bag that breaks the replayer fails alone
            return {"results": None, "fatal": f"unexpected {type(e).__name__}: {e}", "warnings": [],
                    "seconds": time.perf_counter() - t0}
        return {"results": outcome.results, "fatal": outcome.fatal, "warnings": outcome.warnings,
                "seconds": time.perf_counter() - t0}


def bag_lines(bag: str, questions: list, res: dict) -> list[dict]:
    """The JSONL lines of one bag: its results with ``bag`` first, ``bag_error`` on every line of a failed bag."""
    fatal = res.get("fatal") or ""
    results = res.get("results")
    if results is None:   # the bag never got to its questions
        results = [{"id": q.id, "type": q.type, "at": q.at, "error": f"bag {bag!r}: {fatal}"} for q in questions]
        if not questions:
            results = [{"id": None, "type": None, "error": f"bag {bag!r}: {fatal}"}]
    lines = []
    for r in results:
        line = {"bag": bag, **r}
        if fatal:
            line["bag_error"] = fatal
        lines.append(line)
    return lines


def read_previous(out: str) -> dict[str, list[dict]]:
    """Lines of an earlier run's ``--out`` by bag (file order); a line cut short by a crash is ignored."""
    by_bag: dict[str, list[dict]] = {}
    if out == "-" or not os.path.isfile(out):
        return by_bag
    with open(out, encoding="utf-8") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict) and isinstance(line.get("bag"), str):
                by_bag.setdefault(line["bag"], []).append(line)
    return by_bag


def is_done(lines: list[dict], questions: list) -> bool:
    """An earlier run finished this bag: no bag error and a line for every question."""
    return bool(lines) and not any(x.get("bag_error") for x in lines) and \
        {q.id for q in questions} <= {x.get("id") for x in lines}


class ResultsFile:
    """``--out``: the kept lines first (atomic rewrite), then one append per finished bag (flushed to disk)."""

    def __init__(self, out: str, kept: dict[str, list[dict]]):
        self.out = out
        self.lines = {bag: list(lines) for bag, lines in kept.items()}
        if out != "-":
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            self._rewrite(list(self.lines))

    @staticmethod
    def _text(lines: list[dict]) -> str:
        return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)

    def _rewrite(self, order: list[str]) -> None:
        tmp = self.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(self._text(self.lines[b]) for b in order if b in self.lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out)

    def add(self, bag: str, lines: list[dict]) -> None:
        self.lines[bag] = lines
        if self.out == "-":
            sys.stdout.write(self._text(lines))
            sys.stdout.flush()
            return
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(self._text(lines))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, order: list[str]) -> None:
        """Bags in ``order`` (the others, from earlier runs, first as they were)."""
        if self.out != "-":
            self._rewrite([b for b in self.lines if b not in order] + order)


def run(args) -> int:
    """``phi3v-spatial replay`` with several bags, a folder or glob of bags, or ``--ray``."""
    from ..raypool import LOCAL, PoolError, local_cpus, plan_pool, ray_session, run_local, run_pool
    from ..engine.engine import EngineError
    from ..commands.replay import resolve_settings
    from .params import ParamsError, resolve_topic
    from .question_file import QuestionsError, load_questions
    from .scoring import format_summary, summarize

    log = sys.stderr if args.out == "-" else sys.stdout
    t0 = time.perf_counter()
    template = QUESTIONS_TEMPLATE in args.questions
    if args.out_bag:
        print("error: --out-bag writes one bag: replay a single bag (without --ray) to use it", file=sys.stderr)
        return 2
    if template and not args.out:
        print(f"error: --questions {args.questions!r} is a per-bag template: give --out", file=sys.stderr)
        return 2
    try:
        shared = None if template else load_questions(args.questions)
        settings = resolve_settings(args)
    except (QuestionsError, ParamsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bags, problems = expand_bags(args.bag)
    for text in problems:
        print(f"warning: {text}", file=sys.stderr)
    if not bags:
        print("error: no bag to replay", file=sys.stderr)
        return 2
    out = args.out or os.path.splitext(args.questions)[0] + ".results.jsonl"

    questions: dict[str, list] = {}
    broken: dict[str, str] = {}   # bags whose own questions file is unusable: they fail alone
    for bag in bags:
        if shared is not None:
            questions[bag] = shared
            continue
        try:
            questions[bag] = load_questions(questions_path(args.questions, bag))
        except QuestionsError as e:
            questions[bag], broken[bag] = [], str(e)

    previous = read_previous(out)
    done = [b for b in bags if b not in broken and is_done(previous.get(b, []), questions[b])]
    kept = {b: lines for b, lines in previous.items() if b in done or b not in bags}
    results = ResultsFile(out, kept)
    failed: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for bag, why in broken.items():
        results.add(bag, bag_lines(bag, [], {"fatal": why}))
        failed[bag] = why
    todo = [b for b in bags if b not in done and b not in broken]
    if done:
        print(f"{len(done)} of {len(bags)} bags already in {out}: skipped", file=log)
    units = [(b, questions[b]) for b in todo]

    def on_result(i: int, res: dict) -> None:
        bag = units[i][0]
        results.add(bag, bag_lines(bag, units[i][1], res))
        seconds[bag] = res.get("seconds", 0.0)
        for text in res.get("warnings") or []:
            print(f"warning: {text}", file=sys.stderr)
        if res.get("fatal"):
            failed[bag] = res["fatal"]

    def on_error(i: int, text: str) -> None:
        on_result(i, {"results": None, "fatal": text})

    topics = [resolve_topic(t) for t in args.topics] if args.topics else None
    progress = not args.no_progress
    described = []
    how = "in this process"
    try:
        if args.ray is not None and units:
            with ray_session(args.ray, num_cpus=local_cpus(args) if args.ray == LOCAL else None) as ray:
                spec = plan_pool(ray, args, len(units), settings.device, log=lambda t: print(t, file=sys.stderr))
                how = f"on Ray ({'local' if args.ray == LOCAL else args.ray}): {spec.describe()}"
                print(f"replaying {len(units)} bags {how}", file=log)
                described = run_pool(ray, ReplayWorker, (settings, topics, spec.cpus if not spec.gpus else None),
                                     units, "run", spec, on_result, on_error, progress=progress, desc="bags")
        elif units:
            described = run_local(ReplayWorker, (settings, topics), units, "run", on_result, progress=progress,
                                  desc="bags")
    except (PoolError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results.finish(bags)

    mine = [x for b in bags for x in results.lines.get(b, [])]
    if described:
        d = described[0]
        print(f"model {d['model_path']} (adapter: {d['active_adapter'] or 'none'}, {d['device']}, {d['dtype']})", file=log)
    print(format_summary(summarize(mine)), file=log)
    print(f"bags: {len(bags)} ({len(units)} replayed {how}, {len(done)} already done), {len(failed)} failed; "
          f"{time.perf_counter() - t0:.1f} s", file=log)
    for bag, why in list(failed.items())[:10]:
        print(f"  failed: {bag}: {why}", file=log)
    if len(failed) > 10:
        print(f"  ... {len(failed) - 10} more failed bags (bag_error in {out})", file=log)
    others = len(results.lines) - len([b for b in bags if b in results.lines])
    if others:
        print(f"{others} other bags' results from earlier runs kept in {out}", file=log)
    if out != "-":
        print(f"results: {out}", file=log)
    return 1 if failed else 0
