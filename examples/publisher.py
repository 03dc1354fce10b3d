#!/usr/bin/env python3
"""Submit a video to nomad-transcode from Python, using only pyzmq and the documented protocol.

    python3 examples/publisher.py --intake tcp://127.0.0.1:5570 \
        --source s3://media/in/cat.mp4 --output s3://media/out/cat/ --preset hd

    python3 examples/publisher.py --task-id 01931c6e-...   # a row you inserted yourself

Prints the reply as JSON and exits 0 when the scaler accepted the task, 1 when it refused it,
and 2 when nobody answered within --timeout seconds. See docs/protocol.md.
"""

import argparse
import json
import sys

import zmq


def submit(intake: str, frame: dict, timeout_s: float) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    # Never hang: bounded send/receive, and no linger so a dead scaler cannot block exit.
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    sock.connect(intake)
    try:
        sock.send(json.dumps(frame).encode())
        return json.loads(sock.recv())
    finally:
        sock.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intake", default="tcp://127.0.0.1:5570")
    p.add_argument("--task-id", help="submit an existing queued row by id")
    p.add_argument("--source")
    p.add_argument("--output")
    p.add_argument("--preset", default=None)
    p.add_argument("--rendition", action="append", default=[],
                   help="NAME:WIDTHxHEIGHT:VIDEO_KBPS[:AUDIO_KBPS], repeatable")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--idempotency-key")
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()

    if a.task_id:
        frame = {"v": 1, "op": "submit", "task_id": a.task_id}
    else:
        if not a.source or not a.output:
            p.error("--source and --output are required without --task-id")
        spec = {"source": a.source, "output": a.output, "priority": a.priority}
        if a.preset:
            spec["preset"] = a.preset
        if a.rendition:
            spec["renditions"] = []
            for r in a.rendition:
                parts = r.split(":")
                w, h = parts[1].split("x")
                rung = {"name": parts[0], "width": int(w), "height": int(h), "video_kbps": int(parts[2])}
                if len(parts) > 3:
                    rung["audio_kbps"] = int(parts[3])
                spec["renditions"].append(rung)
        if a.idempotency_key:
            spec["idempotency_key"] = a.idempotency_key
        frame = {"v": 1, "op": "submit", "spec": spec}

    try:
        reply = submit(a.intake, frame, a.timeout)
    except zmq.Again:
        print(json.dumps({"ok": False, "error": {"code": "timeout",
                                                  "message": f"no reply from {a.intake}"}}))
        return 2
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
