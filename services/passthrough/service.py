"""A worker that forwards frames, for testing the framework: optional offset and artificial delay.

With `offset = 0` the received buffers are forwarded untouched (zero-copy); otherwise the offset
is added to every pixel. `delay_s` simulates per-frame work, to test load balancing.
"""

from __future__ import annotations

import time

from libs.common.frames import Frame
from libs.common.runtime import Service as Runtime
from services.passthrough.params import Params


class Service(Runtime):
    Params = Params

    def on_frame(self, frame: Frame) -> None:
        if self.params.delay_s:
            time.sleep(self.params.delay_s)
        if self.params.offset:
            data = frame.array()
            self.emit(frame.replace(origin=self.stage, arrays={"data": data + data.dtype.type(self.params.offset)}))
        else:
            self.emit(frame.replace(origin=self.stage))
