"""Reading camera frames out of rosbag2 bags (sqlite3 and mcap) with ``rosbags``, no ROS install needed.

Why two passes: the node orders frames by header stamp (that is what :class:`FrameWindow` keys on), while
bags store messages in *recording* order. The first pass reads only the 8 stamp bytes of every selected
message (cheap, and it finds damaged bags before any question is answered); the second pass yields full
messages in header-stamp order through a heap that only ever holds the messages that arrived out of order.
"""
from __future__ import annotations

import heapq
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

NS = 1_000_000_000
RAW_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (RAW_TYPE, COMPRESSED_TYPE)


class BagError(Exception):
    """The bag (or a topic in it) cannot be read; the message names the bag, the topic and the time."""


def fmt_time(ns: int) -> str:
    """``sec.nanosec`` the way ``ros2 bag info`` and Foxglove show stamps."""
    return f"{ns // NS}.{ns % NS:09d}"


@dataclass
class BagInfo:
    """What a bag holds: its storage, its recording time span and its topics."""

    path: str
    storage: str
    start_ns: int
    end_ns: int
    message_count: int
    topics: dict[str, str]                      # topic -> message type
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def image_topics(self) -> list[str]:
        return sorted(t for t, typ in self.topics.items() if typ in IMAGE_TYPES)


@dataclass
class BagFrame:
    """One camera message in header-stamp order: the FrameWindow payload plus where it came from."""

    topic: str
    stamp_ns: int          # header.stamp
    log_time_ns: int       # recording time in the bag
    payload: object        # engine.window.RawPayload / CompressedPayload


def _storage_of(path: Path) -> str:
    if path.is_dir():
        meta = path / "metadata.yaml"
        if meta.is_file():
            for line in meta.read_text(errors="replace").splitlines():
                if "storage_identifier:" in line:
                    return line.split(":", 1)[1].strip() or "unknown"
        files = sorted(p.suffix for p in path.iterdir())
        return "mcap" if ".mcap" in files else "sqlite3" if ".db3" in files else "unknown"
    return {".mcap": "mcap", ".db3": "sqlite3"}.get(path.suffix, "unknown")


def open_reader(path: str | os.PathLike):
    """An opened ``rosbags.rosbag2.Reader`` for a bag folder or a single .mcap/.db3 file, or a ``BagError``.

    A single file needs no metadata.yaml: rosbags reads .mcap and .db3 files directly (the recording time span
    and message counts come from the file itself).
    """
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError

    p = Path(path)
    if not p.exists():
        raise BagError(f"bag {str(p)!r} does not exist")
    if p.is_dir() and not (p / "metadata.yaml").is_file():
        inner = sorted(x for x in p.iterdir() if x.suffix in (".mcap", ".db3"))
        if len(inner) == 1:  # a bag folder whose metadata.yaml was lost: read its only storage file
            p = inner[0]
        else:
            raise BagError(f"bag {str(p)!r}: folder has no metadata.yaml"
                           + (f" and {len(inner)} storage files; pass one of them" if inner
                              else " and no .mcap/.db3 file; is it a rosbag2 bag?"))
    if p.is_file() and p.suffix not in (".mcap", ".db3"):
        raise BagError(f"bag {str(p)!r}: unknown file type {p.suffix!r}; give a rosbag2 folder, a .mcap or a .db3 file")
    try:
        reader = Reader(p)
        reader.open()
    except (ReaderError, OSError, ValueError, KeyError, struct.error) as e:
        hint = ""
        text = str(e).lower()
        if "magic" in text or "malformed" in text or "truncat" in text or "not a database" in text or "unexpected" in text:
            hint = (" (the file looks truncated or corrupt: was the recording cut off? "
                    "`mcap recover` can often rescue an unfinished .mcap; sqlite bags need `sqlite3 .recover`)")
        raise BagError(f"cannot read bag {str(p)!r} ({_storage_of(p)}): {e}{hint}") from None
    return reader


def bag_info(reader, path: str | os.PathLike) -> BagInfo:
    topics: dict[str, str] = {}
    counts: dict[str, int] = {}
    for c in reader.connections:
        if c.topic in topics and topics[c.topic] != c.msgtype:
            topics[c.topic] = f"{topics[c.topic]}|{c.msgtype}"
        else:
            topics[c.topic] = c.msgtype
        counts[c.topic] = counts.get(c.topic, 0) + int(c.msgcount or 0)
    count = reader.message_count
    start = reader.start_time if count else 0
    end = reader.end_time - 1 if count else 0  # rosbags reports end as latest + 1 ns
    return BagInfo(str(path), _storage_of(Path(path)), start, end, count, topics, counts)


def header_stamp_ns(raw) -> int:
    """header.stamp of a CDR-serialised message that starts with a std_msgs/Header (Image, CompressedImage)."""
    if len(raw) < 12:
        raise ValueError(f"message is {len(raw)} bytes, too short to hold a header")
    endian = "<" if raw[1] == 1 else ">"  # CDR encapsulation: 0x0001 = little endian, 0x0000 = big endian
    sec, nanosec = struct.unpack_from(endian + "iI", raw, 4)
    if nanosec >= NS:
        raise ValueError(f"header.stamp.nanosec = {nanosec} is out of range (corrupt message)")
    return sec * NS + nanosec


def typestore():
    """The Kilted typestore (Image and CompressedImage never change between distros)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def choose_topics(info: BagInfo, wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The image topics to replay, and an error per requested topic that cannot be replayed.

    Requested topics that are missing or not images are reported (the questions that need them fail with
    that message); the others still play.
    """
    if not wanted:
        return info.image_topics, {}
    ok, problems = [], {}
    for t in dict.fromkeys(wanted):
        typ = info.topics.get(t)
        if typ is None:
            problems[t] = (f"topic {t} is not in bag {info.path!r} (its image topics: "
                           f"{', '.join(info.image_topics) or 'none'})")
        elif typ not in IMAGE_TYPES:
            problems[t] = (f"topic {t} in bag {info.path!r} has message type {typ}; replay reads only "
                           f"{RAW_TYPE} and {COMPRESSED_TYPE}")
        else:
            ok.append(t)
    return ok, problems


@dataclass
class ReadReport:
    """What went wrong while reading; ``fatal`` stops the replay at ``fatal_after_ns`` (recording time)."""

    skipped: list[str] = field(default_factory=list)   # per-message problems (first few, with topic and time)
    skipped_count: int = 0
    fatal: str = ""
    fatal_after_ns: int | None = None                 # header stamp of the last frame read before the damage
    damaged: str = ""                                 # messages lost somewhere (index count > readable count)

    def skip(self, text: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < 20:
            self.skipped.append(text)


class FrameReader:
    """Image messages of the chosen topics in header-stamp order (see the module docstring)."""

    def __init__(self, reader, info: BagInfo, topics: list[str], progress: bool = False):
        self.reader = reader
        self.info = info
        self.topics = list(topics)
        self.progress = progress
        self.report = ReadReport()
        self.conns = [c for c in reader.connections if c.topic in set(self.topics) and c.msgtype in IMAGE_TYPES]
        self.total = sum(int(c.msgcount or 0) for c in self.conns)
        self._stamps: list[int | None] | None = None
        self.first_stamp_ns: int | None = None
        self.last_stamp_ns: int | None = None
        self.zero_stamp_topics: set[str] = set()

    def _bar(self, desc: str):
        from tqdm import tqdm

        return tqdm(total=self.total or None, desc=desc, unit="msg", disable=not self.progress, leave=False)

    def index(self) -> list[int | None]:
        """Pass 1: the header stamp of every selected message in recording order (None = unreadable)."""
        if self._stamps is not None:
            return self._stamps
        stamps: list[int | None] = []
        last_log = None
        with self._bar(f"indexing {os.path.basename(self.info.path)}") as bar:
            try:
                if self.conns:
                    for conn, log_ns, raw in self.reader.messages(connections=self.conns):
                        last_log = log_ns
                        try:
                            stamp = header_stamp_ns(raw)
                            if stamp == 0:  # as the node does: an unstamped camera gets the receive (recording) time
                                self.zero_stamp_topics.add(conn.topic)
                                stamp = log_ns
                            stamps.append(stamp)
                        except (ValueError, struct.error, IndexError) as e:
                            stamps.append(None)
                            self.report.skip(f"bag {self.info.path!r}, topic {conn.topic}, recorded at "
                                             f"{fmt_time(log_ns)}: {e}; frame skipped")
                        bar.update(1)
            except Exception as e:  # noqa: BLE001 - any storage failure mid-file means a damaged bag
                where = f"after the message recorded at {fmt_time(last_log)}" if last_log is not None else "at its first message"
                self.report.fatal = (f"bag {self.info.path!r} is damaged {where} ({type(e).__name__}: {e}); "
                                     f"frames after that point are missing")
        if not self.report.fatal and self.total and len(stamps) < self.total:
            # rosbags skips an unreadable mcap chunk silently: the index's counts are the only witness
            self.report.damaged = (f"bag {self.info.path!r} is damaged: its index lists {self.total} messages on "
                                   f"{', '.join(self.topics)} but only {len(stamps)} can be read; answers may have "
                                   f"used windows with frames missing")
        good = [s for s in stamps if s is not None]
        if good:
            self.first_stamp_ns, self.last_stamp_ns = min(good), max(good)
        if self.report.fatal:
            self.report.fatal_after_ns = self.last_stamp_ns if good else -1
        self._stamps = stamps
        return stamps

    def __iter__(self) -> Iterator[BagFrame]:
        """Pass 2: BagFrames in (header stamp, recording order) order."""
        from ..engine.window import CompressedPayload, RawPayload

        stamps = self.index()
        n = len(stamps)
        # suffix_min[i]: the smallest stamp among messages i.. (what may still arrive); frames below it are safe to emit
        suffix_min = [0] * (n + 1)
        big = 1 << 126
        suffix_min[n] = big
        for i in range(n - 1, -1, -1):
            s = stamps[i]
            suffix_min[i] = min(suffix_min[i + 1], s if s is not None else big)
        ts = typestore()
        heap: list[tuple[int, int, BagFrame]] = []
        if not n:
            return
        with self._bar(f"replaying {os.path.basename(self.info.path)}") as bar:
            i = 0
            messages = self.reader.messages(connections=self.conns)
            # zip stops after the n messages pass 1 could read: the damaged part is never touched again
            for _, (conn, log_ns, raw) in zip(range(n), messages):
                stamp = stamps[i]
                i += 1
                bar.update(1)
                if stamp is not None:
                    try:
                        msg = ts.deserialize_cdr(raw, conn.msgtype)
                        if conn.msgtype == RAW_TYPE:
                            payload = RawPayload(msg.encoding, int(msg.height), int(msg.width), int(msg.step), msg.data,
                                                 bool(msg.is_bigendian))
                        else:
                            payload = CompressedPayload(msg.format, msg.data)
                        heapq.heappush(heap, (stamp, i, BagFrame(conn.topic, stamp, log_ns, payload)))
                    except Exception as e:  # noqa: BLE001 - a corrupt message must not end the replay
                        self.report.skip(f"bag {self.info.path!r}, topic {conn.topic}, stamp {fmt_time(stamp)}: "
                                         f"cannot deserialize {conn.msgtype} ({type(e).__name__}: {e}); frame skipped")
                while heap and heap[0][0] <= suffix_min[i]:
                    yield heapq.heappop(heap)[2]
            while heap:
                yield heapq.heappop(heap)[2]
