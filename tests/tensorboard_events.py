"""Reading TensorBoard event files back in tests, as TensorBoard does (TFRecord framing + Event protos)."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def read_events(folder, purges=None):
    """{tag: [(step, value), ...]} and the plugins named in every events file in ``folder``; the steps of
    SessionLog START events (TensorBoard's purge markers) are appended to ``purges``."""
    scalars, plugins = {}, set()
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if purges is not None and event.HasField("session_log") and event.session_log.status == 1:
                purges.append(event.step)
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name:
                    plugins.add(value.metadata.plugin_data.plugin_name)
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, plugins
