"""The ordered pipeline with compression: workers keep compressing while the writer waits for a slow
chunk (four chunks in flight per worker), and the writes still come in guest order from one thread."""

from __future__ import annotations

import random
import threading

from qimg.engine.copy import CopyOptions, copy_range
from tests.engine.test_copy import BytesSource, CompressingTarget

CHUNK = 1 << 16


class SlowFirstChunk(CompressingTarget):
    """Compressing the first chunk waits until the other workers have prepared ``ahead`` more chunks
    (or a generous deadlock guard runs out): how far ahead the pipeline runs past a slow chunk."""

    def __init__(self, size, ahead):
        super().__init__(size)
        self.ahead = ahead
        self.prepared = 0
        self.seen_while_blocked = 0
        self.lock = threading.Lock()
        self.go = threading.Event()

    def prepare_compressed(self, off, data):
        if off == 0:
            self.go.wait(timeout=10)
            self.seen_while_blocked = self.prepared
        else:
            with self.lock:
                self.prepared += 1
                if self.prepared >= self.ahead:
                    self.go.set()
        return super().prepare_compressed(off, data)


def test_compression_runs_four_chunks_per_worker_ahead_of_a_slow_one():
    workers = 2
    size = 40 * CHUNK
    data = random.Random(3).randbytes(size)
    src = BytesSource(data, [(0, size)])
    # with 4 chunks per worker in flight, 4 * 2 + 1 - 1 = 8 chunks get prepared while the first one waits
    dst = SlowFirstChunk(size, ahead=8)
    copy_range(src, dst, 0, size, CopyOptions(compress=True, target_is_zero=True, chunk=CHUNK, workers=workers),
               cluster_size=CHUNK)
    assert dst.seen_while_blocked >= 8
    assert bytes(dst.buf) == data
    offs = [c[1] for c in dst.calls if c[0] == "c"]
    assert offs == sorted(offs) and len(offs) == 40
    assert dst.threads == {threading.get_ident()}
