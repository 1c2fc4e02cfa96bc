"""Child process for the kill -9 test: emits in durable mode and records every ack.

usage: durable_child.py emit BOOTSTRAP TOPIC SPOOL ACKFILE START COUNT
       durable_child.py drain BOOTSTRAP TOPIC SPOOL
"""

from __future__ import annotations

import os
import sys

from meterline.sdk import Emitter, EmitterConfig


def main() -> int:
    mode, bootstrap, topic, spool = sys.argv[1:5]
    config = EmitterConfig(
        topic=topic,
        bootstrap_servers=bootstrap,
        spool_dir=spool,
        durability="durable",
        delivery_timeout_ms=5_000,
        linger_ms=20,
    )
    emitter = Emitter(config)
    if mode == "drain":
        ok = emitter.close(timeout=120)
        print("drained" if ok else "not drained", emitter.stats(), flush=True)
        return 0 if ok else 1
    ack_file, start, count = sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
    fd = os.open(ack_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for i in range(start, start + count):
        emitter.emit(f"cust-{i % 97}", "api_calls", i % 7 + 1, id=f"k{i}")
        # Written only after emit() returned: a kill between the two under-reports acks,
        # which keeps the test's claim conservative.
        os.write(fd, f"{i}\n".encode())
    emitter.close(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
