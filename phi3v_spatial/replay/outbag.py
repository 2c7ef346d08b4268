"""``--out-bag``: the input bag plus replay's answers on the node's output topics, for Foxglove.

The answers are written as the node records them (``~/relations`` as RelationsStamped after each answered
ask/query_relations, ``~/plans`` as PlanStamped after each plan), so a replayed bag and a bag recorded from
the live node look the same side by side. The custom types are registered in the rosbags typestore from the
interface package's .msg files, so no ROS install is needed.
"""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from .bag_reader import BagError, bag_info, fmt_time, open_reader, typestore

IFACE = "phi3v_spatial_interfaces"
RELATIONS_TYPE = f"{IFACE}/msg/RelationsStamped"
PLAN_TYPE = f"{IFACE}/msg/PlanStamped"


def interface_msg_dirs() -> list[str]:
    """Where the interface .msg files are: the venv/ament install, then the source tree next to the package."""
    here = os.path.dirname(os.path.abspath(__file__))
    dirs = [os.path.join(sys.prefix, "share", IFACE, "msg")]
    dirs += [os.path.join(p, "share", IFACE, "msg") for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    dirs.append(os.path.join(os.path.dirname(os.path.dirname(here)), IFACE, "msg"))
    return dirs


def interface_typestore():
    """The Kilted typestore with phi3v_spatial_interfaces/msg/* registered."""
    from rosbags.typesys import get_types_from_msg

    ts = typestore()
    for d in interface_msg_dirs():
        files = sorted(glob.glob(os.path.join(d, "*.msg")))
        if not files:
            continue
        types = {}
        for f in files:
            name = f"{IFACE}/msg/{os.path.splitext(os.path.basename(f))[0]}"
            types.update(get_types_from_msg(Path(f).read_text(encoding="utf-8"), name))
        ts.register(types)
        return ts
    raise BagError(f"cannot find the {IFACE} .msg files (looked in {', '.join(interface_msg_dirs())}); "
                   f"build the interface package or run from a source checkout")


def _time(ts, ns: int):
    return ts.types["builtin_interfaces/msg/Time"](sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def answer_messages(ts, results: list[dict], node: str = "/spatial_node"):
    """(topic, msgtype, log_time_ns, message) for every result the node would have published."""
    Header = ts.types["std_msgs/msg/Header"]
    Rel = ts.types[f"{IFACE}/msg/ObjectRelation"]
    Step = ts.types[f"{IFACE}/msg/PlanStep"]
    out = []
    for r in results:
        if "time" not in r:
            continue  # a malformed entry: never sent to the node
        log_ns = r["time"]["stamp_ns"]
        stamps = [f["stamp_ns"] for f in r.get("frame_stamps", [])]
        common = dict(header=Header(stamp=_time(ts, max(stamps, default=0)), frame_id=""),
                      frame_stamps=[_time(ts, s) for s in stamps],
                      image_topics=list(r.get("topics", []) if stamps else []), latency_s=float(r.get("latency_s", 0.0)))
        if r["type"] in ("ask", "relations"):
            if r.get("error"):
                continue  # the node publishes answered requests only
            rels = [Rel(subject=x["subject"], relation=x["relation"], object=x["object"], holds=bool(x["holds"]),
                        probability=float(x["probability"])) for x in r.get("relations", [])]
            msg = ts.types[RELATIONS_TYPE](question=r.get("question", "") if r["type"] == "ask" else "",
                                           answer=r.get("answer", ""), relations=rels, **common)
            out.append((f"{node}/relations", RELATIONS_TYPE, log_ns, msg))
        elif r["type"] == "plan":  # the node publishes every finished goal, failed ones included
            steps = [Step(**{k: str(s.get(k, "")) for k in ("action", "target", "reference", "relation", "detail")})
                     for s in r.get("steps", [])]
            msg = ts.types[PLAN_TYPE](instruction=r.get("instruction", ""), steps=steps, raw_text=r.get("raw_text", ""),
                                      success=not r.get("error"), error=r.get("error", ""),
                                      reason=r.get("reason", ""), **common)
            out.append((f"{node}/plans", PLAN_TYPE, log_ns, msg))
    return out


def _digest_for(conn, ts) -> tuple[str, str]:
    """(msgdef, rihs01) for copying a connection; registers bag-defined types the typestore lacks."""
    from rosbags.interfaces import MessageDefinitionFormat
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    msgdef = conn.msgdef.data if conn.msgdef.format != MessageDefinitionFormat.NONE else ""
    if msgdef and conn.digest:
        return msgdef, conn.digest
    if conn.msgtype not in ts.fielddefs and msgdef:
        if conn.msgdef.format == MessageDefinitionFormat.MSG:
            ts.register(get_types_from_msg(msgdef, conn.msgtype))
        else:
            sep = "=" * 80 + "\n"
            parts = [p.split("\n", 1)[1] for p in msgdef.split(sep)[1:]] if msgdef.startswith(sep + "IDL: ") else [msgdef]
            for idl in parts:
                ts.register(get_types_from_idl(idl))
    if conn.msgtype not in ts.fielddefs:
        raise BagError(f"topic {conn.topic}: message type {conn.msgtype} is unknown and the bag carries no definition")
    gen, _ = ts.generate_msgdef(conn.msgtype, ros_version=2)
    return msgdef or gen, conn.digest or ts.hash_rihs01(conn.msgtype)


def write_out_bag(src: str, dst: str, results: list[dict], *, storage: str | None = None, node: str = "/spatial_node",
                  progress: bool = False) -> dict:
    """Copy every connection and message of ``src`` to the new bag folder ``dst`` and add the answers.

    ``storage`` is 'mcap' or 'sqlite3' (default: the input's). Returns counts and per-topic problems.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from tqdm import tqdm

    if os.path.exists(dst):
        raise BagError(f"output bag {dst!r} exists already; choose a new folder name")
    reader = open_reader(src)
    ts = interface_typestore()
    report = {"copied": 0, "answers": 0, "skipped_topics": {}, "error": ""}
    try:
        if storage is None:
            storage = bag_info(reader, src).storage
        plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}.get(storage)
        if plugin is None:
            raise BagError(f"unknown output storage {storage!r}; use mcap or sqlite3")
        with Writer(dst, version=9, storage_plugin=plugin) as writer:
            conn_map = {}
            for c in reader.connections:
                try:
                    msgdef, digest = _digest_for(c, ts)
                except Exception as e:  # noqa: BLE001 - one odd topic must not lose the rest of the copy
                    report["skipped_topics"][c.topic] = str(e)
                    continue
                conn_map[c.id] = writer.add_connection(
                    c.topic, c.msgtype, msgdef=msgdef, rihs01=digest,
                    serialization_format=c.ext.serialization_format, offered_qos_profiles=c.ext.offered_qos_profiles)
            last = None
            try:
                with tqdm(total=reader.message_count or None, desc="writing out-bag", unit="msg", disable=not progress,
                          leave=False) as bar:
                    for c, log_ns, raw in reader.messages():
                        last = log_ns
                        bar.update(1)
                        if c.id in conn_map:
                            writer.write(conn_map[c.id], log_ns, raw)
                            report["copied"] += 1
            except Exception as e:  # noqa: BLE001 - a damaged input: keep what was readable, say where it stopped
                report["error"] = (f"input bag {src!r} unreadable after {fmt_time(last) if last is not None else 'its start'} "
                                   f"({type(e).__name__}: {e}); the copy stops there")
            answer_conns = {}
            recorded = {c.topic for c in reader.connections}
            for topic, msgtype, log_ns, msg in answer_messages(ts, results, node):
                if topic in recorded:  # the bag already holds the live node's answers: keep both, side by side
                    topic = "/replay" + topic
                if topic not in answer_conns:
                    answer_conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
                writer.write(answer_conns[topic], log_ns, ts.serialize_cdr(msg, msgtype))
                report["answers"] += 1
    finally:
        reader.close()
    return report
