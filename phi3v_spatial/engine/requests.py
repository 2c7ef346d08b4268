"""The one request path, shared by the node, bag replay and ``phi3v-spatial ask`` (no ROS in here).

A request says what to ask and which frames to look at: the images it carries, else cameras of a
:class:`FrameWindow` (the newest ``num_frames`` per camera). :class:`RequestHandler` fills the defaults
(:class:`ServingSettings`), resolves the camera topics, selects and decodes the frames, builds the caches'
frame keys, validates the request, submits the engine call to the :class:`InferenceWorker` and turns every
outcome into a reply: ``success``, or an ``error`` an operator can act on (never an exception).
:class:`RequestStats` counts the replies for diagnostics.

Callers: the node converts messages to requests and replies to messages (``ros/messages.py``) and awaits the
reply without holding a thread (:meth:`PendingReply.add_done_callback`); replay and the CLI call
:meth:`RequestHandler.handle`. The same request on the same frames gives the same reply in all three.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from .engine import EngineError, check_adapter, check_adapter_scale, check_candidates, check_count, check_text
from .images import DEFAULT_MAX_PIXELS, ImageDecodeError
from .parsing import Relation
from .window import WindowError, decode_payload
from .worker import JobCancelled, JobError, JobTimeout

# What went wrong (``Reply.error_kind``), for callers that add their own context to ``error``.
REQUEST = "request"    # the request itself: empty question, malformed candidate, unknown adapter
FRAMES = "frames"      # no usable frames: camera not subscribed, silent or stale
IMAGE = "image"        # a frame cannot be decoded or is too large
QUEUE = "queue"        # rejected (queue full, worker stopped), timed out or cancelled
MODEL = "model"        # the engine refused the work
OUTPUT = "output"      # the model answered, but its text is not a plan
REFUSED = "refused"    # the model answered that it cannot plan: an object the instruction names is not in view
INTERNAL = "internal"  # anything else: a bug, out of memory


class FrameRef(NamedTuple):
    """One frame given to the model: its camera ("" for an image the request carried) and header stamp."""

    topic: str
    stamp_ns: int


@dataclass(frozen=True)
class RequestImage:
    """An image carried by a request: a RawPayload / CompressedPayload (decoded here) or an RGB uint8 array."""

    payload: Any
    stamp_ns: int = 0


@dataclass(kw_only=True)
class FramesRequest:
    """Which frames: ``images`` when given, else the newest ``num_frames`` (0 = window.num_frames) per camera of
    ``topics`` (empty = every camera)."""

    images: list[RequestImage] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    num_frames: int = 0


@dataclass(kw_only=True)
class AskRequest(FramesRequest):
    question: str
    max_new_tokens: int = 0  # 0 = generation.max_new_tokens


@dataclass(kw_only=True)
class RelationsRequest(FramesRequest):
    candidates: list[Relation]


@dataclass(kw_only=True)
class PlanRequest(FramesRequest):
    instruction: str
    max_new_tokens: int = 0  # 0 = plan.max_new_tokens
    timeout_s: float = 0.0   # 0 = request_timeout_s


@dataclass(kw_only=True)
class AdapterRequest:
    name: str          # "" / "none" = the base model
    scale: float = 0.0  # 0 = 1.0


@dataclass(kw_only=True)
class Reply:
    success: bool = False
    error: str = ""
    error_kind: str = ""  # one of the constants above when not successful
    frames: list[FrameRef] = field(default_factory=list)  # in the order given to the model
    topics: list[str] = field(default_factory=list)       # the cameras they came from
    latency_s: float = 0.0
    # What the caller should know about a success, e.g. fewer frames than asked (the ROS replies carry it as
    # `note`, the node logs it, replay writes it).
    note: str = ""


@dataclass(kw_only=True)
class AskReply(Reply):
    answer: str = ""
    relations: list[Relation] = field(default_factory=list)  # what the answer states
    tokens_generated: int = 0


@dataclass(kw_only=True)
class RelationsReply(Reply):
    relations: list[Relation] = field(default_factory=list)  # every candidate with holds and probability


@dataclass(kw_only=True)
class PlanReply(Reply):
    """``steps`` parsed from ``raw_text``; ``reason`` says why the plan is what it is (empty until the parser gives
    one); ``cancelled`` when the caller cancelled it (``raw_text`` then holds what was generated)."""

    steps: list[dict] = field(default_factory=list)
    raw_text: str = ""
    reason: str = ""
    tokens_generated: int = 0
    cancelled: bool = False


@dataclass(kw_only=True)
class AdapterReply(Reply):
    active: str = ""
    available: list[str] = field(default_factory=list)


REPLY_TYPES = {AskRequest: AskReply, RelationsRequest: RelationsReply, PlanRequest: PlanReply,
               AdapterRequest: AdapterReply}
NAMES = {AskRequest: "ask", RelationsRequest: "query_relations", PlanRequest: "plan", AdapterRequest: "set_adapter"}
NAMES.update({REPLY_TYPES[k]: v for k, v in NAMES.items()})


def deadline_s(request, request_timeout_s: float) -> float:
    """A request's deadline in seconds, queue time included: a plan goal's own ``timeout_s`` when it sets one,
    else ``request_timeout_s``."""
    own = float(getattr(request, "timeout_s", 0.0) or 0.0)
    return own if own > 0 else float(request_timeout_s)


def refuse(request, error: str, kind: str = REQUEST) -> Reply:
    """The reply to a request its caller refuses before it reaches a handler (e.g. the node is not active)."""
    return REPLY_TYPES[type(request)](error=error, error_kind=kind)


@dataclass(frozen=True)
class ServingSettings:
    """Defaults and limits of the request layer (``settings.serving_settings`` builds them from parameters)."""

    max_new_tokens: int = 128          # generation.max_new_tokens: ask, when the request says 0
    plan_max_new_tokens: int = 256     # plan.max_new_tokens: plan, when the request says 0
    request_timeout_s: float = 60.0    # deadline per request, queue time included; 0 = none
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_question_tokens: int = 1024    # question / instruction / candidate length, tokens
    max_images: int = 8                # images per request: carried, or frames of the window selection
    max_candidates: int = 256          # candidates per relation query


class RequestStats:
    """The one set of request counters (thread-safe): answered, failed, and the last successful latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.last_latency_s: float | None = None

    def record(self, reply: Reply) -> None:
        with self._lock:
            if reply.success:
                self.ok += 1
                if not isinstance(reply, AdapterReply):
                    self.last_latency_s = reply.latency_s
            else:
                self.failed += 1


class PendingReply:
    """A reply on its way: done at once when the request failed before queueing, else when its job ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._reply: Reply | None = None
        self._callbacks: list[Callable[[Reply], None]] = []
        self.job = None
        self.cancel_requested = False

    def cancel(self) -> None:
        """Cancel: a queued request ends now, a running one within a token (a plan keeps its partial text)."""
        self.cancel_requested = True
        if self.job is not None:
            self.job.cancel()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Reply:
        if not self._done.wait(timeout):
            raise TimeoutError(f"no reply within {timeout} s")
        return self._reply

    def add_done_callback(self, callback: Callable[[Reply], None]) -> None:
        """``callback(reply)`` once the reply is there (at once if it already is; else on the worker's thread)."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self._reply)

    def _set(self, reply: Reply) -> "PendingReply":
        with self._lock:
            self._reply = reply
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(reply)
        return self


@dataclass
class _Work:
    run: Callable[[Any], Any]       # the engine call, on the worker thread: fn(job) -> result
    reply: Reply                    # gets the frames before queueing, the result after
    fill: Callable[[Any, bool], None]  # copies the engine's result into ``reply`` (and whether it was cancelled)
    timeout_s: float


class RequestHandler:
    """Turns requests into engine work on one worker and the results into replies (see the module docstring).

    ``window`` (optional) serves requests that carry no images; ``resolve_topic`` makes request topics absolute
    as the caller subscribes them; ``clock()`` is "now" in ns for the window's age limit (a call may pass its own
    ``now_ns``); ``key_scope`` prefixes the (topic, stamp) frame keys (replay: the bag, so bags never share
    cache entries); ``log`` (optional) gets ``warning`` / ``error`` lines for refused and failed requests.
    """

    def __init__(self, engine, worker, *, window=None, settings: ServingSettings | None = None,
                 resolve_topic: Callable[[str], str] | None = None, clock: Callable[[], int] | None = None,
                 stats: RequestStats | None = None, key_scope: tuple = (), log=None):
        self.engine = engine
        self.worker = worker
        self.window = window
        self.settings = settings or ServingSettings()
        self.resolve_topic = resolve_topic or (lambda topic: topic)
        self.clock = clock
        self.stats = stats if stats is not None else RequestStats()
        self.key_scope = tuple(key_scope)
        self.log = log

    def handle(self, request, *, now_ns: int | None = None, on_text=None) -> Reply:
        """Submit and wait for the reply (replay, the CLI)."""
        return self.submit(request, now_ns=now_ns, on_text=on_text).result()

    def submit(self, request, *, now_ns: int | None = None, on_text: Callable[[str, int], None] | None = None,
               on_position: Callable[[int], None] | None = None,
               on_start: Callable[[], None] | None = None, waited_s: float = 0.0) -> PendingReply:
        """Validate, select and decode frames here (a bad request never takes a queue slot), then queue the work.

        ``on_text(text, tokens)`` streams generated text, ``on_position(n)`` reports the place in the queue,
        ``on_start()`` is called when the model starts on it; all of them on the worker's threads. ``waited_s``:
        how long the request already waited before it got here (the node starting up), taken off its deadline.
        """
        t0 = time.monotonic()
        pending = PendingReply()
        what = NAMES[type(request)]
        try:
            work = self._prepare(request, now_ns, on_text, on_start)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
            reply = REPLY_TYPES[type(request)]()
            self._failed(reply, what, exc, REQUEST if isinstance(exc, EngineError) else None)
            return pending._set(self._done(reply, t0))
        timeout_s = work.timeout_s  # <= 0: no deadline (replay)
        if timeout_s > 0 and waited_s > 0:
            timeout_s -= waited_s
        if work.timeout_s > 0 and timeout_s <= 0:
            self._failed(work.reply, what, JobTimeout(
                f"{what} timed out: its deadline ({work.timeout_s:g} s) passed while it waited {waited_s:.1f} s for the "
                f"node to start; raise request_timeout_s (or the goal's timeout_s) above the model's load time"))
            return pending._set(self._done(work.reply, t0))
        try:
            pending.job = self.worker.submit(work.run, timeout_s=timeout_s, name=what, on_position=on_position)
        except JobError as exc:
            self._failed(work.reply, what, exc)
            return pending._set(self._done(work.reply, t0))
        pending.job.add_done_callback(lambda job: pending._set(self._finish(work, job, pending, what, t0)))
        return pending

    # ------------------------------------------------------------------ preparing
    def _prepare(self, request, now_ns, on_text, on_start) -> _Work:
        engine, s = self.engine, self.settings

        def started():
            if on_start is not None:
                on_start()

        if isinstance(request, AdapterRequest):
            check_adapter(request.name.strip(), engine.available_adapters)
            name, scale = request.name.strip() or None, check_adapter_scale(request.scale or 1.0)
            reply = AdapterReply()

            def switch(job):
                started()
                # read in the job that switched: a later switch by another client cannot show in this reply
                return engine.set_adapter(name, scale), list(engine.available_adapters)

            def fill(result, cancelled):
                reply.success = True
                reply.active, reply.available = result

            return _Work(switch, reply, fill, s.request_timeout_s)

        def check_length(text, what):  # bounded before tokenizing: a 1 MB question is refused from its length
            engine.check_text_tokens(text, what, s.max_question_tokens, "max_question_tokens")

        if isinstance(request, AskRequest):
            check_text(request.question, "question")
            check_length(request.question, "question")
        elif isinstance(request, RelationsRequest):
            check_count(len(request.candidates), s.max_candidates, "candidate relations", "max_candidates")
            check_candidates(request.candidates)
            for i, c in enumerate(request.candidates):
                check_length(f"{c.subject} {c.relation} {c.object}", f"candidates[{i}]")
        elif isinstance(request, PlanRequest):
            check_text(request.instruction, "instruction")
            check_length(request.instruction, "instruction")
        else:
            raise TypeError(f"not a request: {type(request).__name__}")
        images, frames, topics, keys, note = self._frames(request, now_ns)
        reply = REPLY_TYPES[type(request)](frames=frames, topics=topics, note=note)

        if isinstance(request, AskRequest):
            max_new = int(request.max_new_tokens) or s.max_new_tokens

            def run(job):
                started()
                return engine.ask(request.question, images, max_new_tokens=max_new, on_text=on_text,
                                  should_stop=job.should_stop, frame_keys=keys)

            def fill(out, cancelled):
                reply.success, reply.answer, reply.relations = True, out.answer, list(out.relations)
                reply.tokens_generated = out.tokens_generated

            return _Work(run, reply, fill, s.request_timeout_s)
        if isinstance(request, RelationsRequest):
            def run(job):
                started()
                return engine.query_relations(request.candidates, images, should_stop=job.should_stop, frame_keys=keys)

            def fill(relations, cancelled):
                reply.success, reply.relations = True, list(relations)

            return _Work(run, reply, fill, s.request_timeout_s)
        max_new = int(request.max_new_tokens) or s.plan_max_new_tokens

        def run(job):
            started()
            return engine.plan(request.instruction, images, max_new_tokens=max_new, on_text=on_text,
                               should_stop=job.should_stop, frame_keys=keys)

        timeout = deadline_s(request, s.request_timeout_s)
        return _Work(run, reply, lambda result, cancelled: _fill_plan(reply, result, cancelled), timeout)

    def _frames(self, request: FramesRequest, now_ns: int | None):
        """(RGB arrays, FrameRefs, camera topics, frame keys or None, note) for a request; raises WindowError /
        ImageDecodeError naming the camera or the request image, EngineError past ``max_images`` (counted before
        anything is decoded). ``note`` says when the window gave fewer frames per camera than asked."""
        max_pixels, max_images = self.settings.max_image_pixels, self.settings.max_images
        if request.images:
            check_count(len(request.images), max_images, "images", "max_images")
            arrays = []
            for i, image in enumerate(request.images):
                try:
                    arrays.append(decode_payload(image.payload, max_pixels))
                except ImageDecodeError as exc:
                    raise type(exc)(f"images[{i}]: {exc}") from None
            # no keys: the engine keys request images by their pixels
            return arrays, [FrameRef("", int(im.stamp_ns)) for im in request.images], [], None, ""
        if self.window is None:
            raise WindowError("the request carries no images (and there are no cameras here)")
        topics = [self.resolve_topic(t) for t in request.topics if t.strip()]
        now = now_ns if now_ns is not None else (self.clock() if self.clock is not None else None)
        sel = self.window.select(topics or None, int(request.num_frames) or None, now)
        asked = int(request.num_frames) or self.window.num_frames
        if len(sel.frames) > max_images:
            raise EngineError(f"too many images: {len(sel.topics)} camera(s) x {len(sel.frames) // len(sel.topics)} "
                              f"frame(s) = {len(sel.frames)}, the limit is {max_images} per request (parameter "
                              f"max_images); ask for fewer frames (num_frames) or cameras (image_topics)")
        got = len(sel.frames) // max(1, len(sel.topics))
        note = ""
        if got < asked:
            w = self.window
            note = (f"used {got} frame(s) per camera of the {asked} asked (num_frames; 0 = window.num_frames): "
                    f"the window holds only {got} keyframe(s) at least window.min_interval_s = "
                    f"{w.min_interval_s:g} s apart and newer than window.max_age_s = {w.max_age_s:g} s")
        arrays = sel.images(max_pixels)
        return (arrays, [FrameRef(f.topic, f.stamp_ns) for f in sel.frames], list(sel.topics),
                [(*self.key_scope, *key) for key in sel.keys], note)  # (scope..., topic, stamp, payload digest)

    # ------------------------------------------------------------------ finishing
    def _finish(self, work: _Work, job, pending: PendingReply, what: str, t0: float) -> Reply:
        reply = work.reply
        try:
            try:
                value = job.result()
            except JobCancelled as exc:  # a plan the caller cancelled keeps what it generated
                if not (isinstance(reply, PlanReply) and pending.cancel_requested and exc.partial is not None):
                    raise
                value = exc.partial
            work.fill(value, pending.cancel_requested)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
            self._failed(reply, what, exc)
            if isinstance(reply, PlanReply) and isinstance(exc, JobCancelled):
                reply.cancelled = True
        return self._done(reply, t0)

    def _done(self, reply: Reply, t0: float) -> Reply:
        if isinstance(reply, AdapterReply) and not reply.success:  # a switch that failed: what the engine runs now
            reply.active, reply.available = self.engine.active_adapter, list(self.engine.available_adapters)
        reply.latency_s = time.monotonic() - t0
        self.stats.record(reply)
        if reply.success and reply.note and self.log is not None:
            self.log.info(f"{NAMES[type(reply)]}: {reply.note}")
        return reply

    def _failed(self, reply: Reply, what: str, exc: BaseException, kind: str | None = None) -> None:
        """``error`` and ``error_kind`` from an exception; unexpected ones are logged with their traceback."""
        known = {JobError: QUEUE, WindowError: FRAMES, ImageDecodeError: IMAGE, EngineError: MODEL}
        found = next((k for cls, k in known.items() if isinstance(exc, cls)), None)
        reply.success = False
        reply.error_kind = kind or found or INTERNAL
        if found is not None:
            reply.error = str(exc)
            if self.log is not None:
                self.log.warning(f"{what} refused: {reply.error}")
            return
        reply.error = f"internal error in {what}: unexpected {type(exc).__name__}: {exc}"
        if self.log is not None:
            import traceback

            self.log.error(f"{reply.error}\n{''.join(traceback.format_exception(exc))}")


def _fill_plan(reply: PlanReply, result, cancel_requested: bool) -> None:
    """A PlanResult into a PlanReply: cancelled, unparsable (``error``), refused because an object is not in view
    (``error``, no steps), or steps (none with a ``reason`` such as "already done")."""
    reply.raw_text, reply.tokens_generated = result.raw_text, result.tokens_generated
    if result.cancelled or cancel_requested:
        reply.cancelled = True
        reply.error, reply.error_kind = f"cancelled by the client after {result.tokens_generated} token(s)", QUEUE
        return
    reply.steps = list(result.steps)
    reply.reason = result.reason
    reply.success = not result.error and not result.missing
    if result.error:
        reply.error, reply.error_kind = f"could not parse a plan from the model output: {result.error}", OUTPUT
    elif result.missing:
        names = " and ".join(f"the {m}" for m in result.missing)
        reply.steps = []
        reply.error = f"no plan: {names} {'is' if len(result.missing) == 1 else 'are'} not in view" + (
            f" ({result.reason})" if result.reason else "")
        reply.error_kind = REFUSED
