"""Soak test: a bounded load test against spatial_node, then a table of what happened.

Two cameras at --hz (a raw 640x480 rgb8 Image and a JPEG CompressedImage of synthetic scenes, published from a
process of their own), --clients clients mixing ~/ask, ~/query_relations, ~/set_adapter and the ~/plan action, a
deactivate/activate lifecycle cycle every --cycle-s seconds; warm-up, then --duration seconds. The table: per
request type sent / ok / failed / lost (no reply by deadline + grace) / p50 / p95 / max latency, the node's RSS
(start, after warm-up, end, trend after warm-up in MiB/min) and threads, camera delivery (frames the node received
against frames published while it was subscribed, from its /diagnostics), a Traceback in the node's log, NaN in a
success reply. Exit status 1 on a lost request, a traceback, a NaN success or a node that died.

By default the node is started here on the embedded model in models/ (as `make demo` does); --model PATH runs
another checkpoint; --attach uses a node that already runs (--node names it; --pid and --node-log for RSS and
the traceback check; its image_topics must include the soak's cameras, see --front / --side).
Loopback only: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, and a random ROS_DOMAIN_ID unless one is set.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from phi3v_spatial.benchmark.soak import FRONT, SIDE  # no torch / ROS import there at module level

    p.add_argument("--duration", type=float, default=1800.0, help="seconds measured after the warm-up (default 1800)")
    p.add_argument("--warmup", type=float, default=300.0, help="seconds of load before the trend counts (default 300)")
    p.add_argument("--node", default="/spatial_node", help="fully qualified node name (default /spatial_node)")
    p.add_argument("--attach", action="store_true", help="use a running node (--node) instead of starting one")
    p.add_argument("--model", default="", help="checkpoint for the node started here (default: the embedded model)")
    p.add_argument("--pid", type=int, default=0, help="--attach: the node's process id (for RSS and threads)")
    p.add_argument("--node-log", default="", help="--attach: the node's log file (for the traceback check)")
    p.add_argument("--front", default=FRONT, help=f"raw rgb8 camera topic (default {FRONT})")
    p.add_argument("--side", default=SIDE, help=f"JPEG camera topic (default {SIDE})")
    p.add_argument("--hz", type=float, default=15.0, help="camera rate (default 15)")
    p.add_argument("--size", default="640x480", help="camera frame size WxH (default 640x480)")
    p.add_argument("--clients", type=int, default=3, help="concurrent clients, one request in flight each (default 3)")
    p.add_argument("--cycle-s", type=float, default=30.0, help="deactivate/activate every N s; 0 = never (default 30)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="request deadline, s (request_timeout_s of the node started here; default 60)")
    p.add_argument("--grace", type=float, default=15.0, help="no reply by deadline + grace = lost (default 15)")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests in all")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length of ~/ask (default 16)")
    p.add_argument("--plan-tokens", type=int, default=48, help="answer length of ~/plan (default 48)")
    p.add_argument("--large-every", type=float, default=0.0, metavar="S",
                   help="every S seconds a large transient ~/ask (a 1 MB question, or four 1280x960 images), in turn; "
                        "0 = none (default)")
    p.add_argument("--camera-profile", default=None, metavar="FILE",
                   help="Fast DDS profile of the camera process (default: the package's config/fastdds_large_frames.xml, "
                        "an 8 MiB shared-memory segment, as a robot's camera driver should have for raw frames over "
                        "512 KiB; '' = Fast DDS defaults)")
    p.add_argument("--seed", type=int, default=0, help="scenes and request mix")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the node started here, YAML value (repeatable), e.g. cache.vision_mb=16")
    p.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable of the node started here (repeatable), e.g. MALLOC_ARENA_MAX=8")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    p.add_argument("--workdir", default="", help="where the node's params and log go (default: a temp folder)")


def run(args: argparse.Namespace) -> int:
    from phi3v_spatial.benchmark.soak import SoakConfig, format_markdown, format_table, run_soak
    from phi3v_spatial.paths import large_frames_profile

    import yaml

    w, h = (int(x) for x in args.size.lower().split("x"))
    params = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.param)}
    node_env = dict(item.split("=", 1) for item in args.node_env)
    cfg = SoakConfig(duration_s=args.duration, warmup_s=args.warmup, node=args.node, start_node=not args.attach,
                     model_path=args.model, pid=args.pid, node_log=args.node_log, front=args.front, side=args.side,
                     hz=args.hz, width=w, height=h, clients=args.clients, cycle_s=args.cycle_s,
                     request_timeout_s=args.request_timeout, grace_s=args.grace, max_requests=args.max_requests,
                     max_new_tokens=args.max_new_tokens, plan_tokens=args.plan_tokens, seed=args.seed,
                     workdir=args.workdir, node_params=params, node_env=node_env, large_every_s=args.large_every,
                     camera_profile=large_frames_profile() if args.camera_profile is None else args.camera_profile)
    try:
        result = run_soak(cfg)
    except RuntimeError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    print("\n" + format_table(result), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(result))
        print(f"markdown table: {args.markdown}")
    return 0 if result.passed else 1
