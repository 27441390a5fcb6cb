"""Reads a TensorBoard event file with TensorBoard's own loader and prints what it holds as JSON, for
tests/train/tensorboard_test.cpp. Usage: python3 tests/reference/tensorboard_read.py FILE
(exit code 77: the tensorboard package is not importable)

EventFileLoader applies TensorBoard's data_compat migration (simple_value -> scalar tensor), i.e. what the
TensorBoard UI sees. The raw records are also re-checked against tensorboard's own masked CRC32C.
Output: {"records": N, "events": [{"step", "wall_time", "file_version", "values": [{"tag", "plugin",
"scalar" | "text"}]}]}; floats are printed as float.hex() so nothing is lost.
"""
import json
import struct
import sys

try:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.util import tensor_util
except ImportError as e:  # the C++ test skips this sub-check on exit code 77
    print(f"tensorboard is not importable: {e}", file=sys.stderr)
    sys.exit(77)


def check_framing(path):
    data = open(path, "rb").read()
    off, n = 0, 0
    while off < len(data):
        header = data[off:off + 8]
        (length,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[off + 8:off + 12])
        assert hcrc == masked_crc32c(header), f"length CRC at byte {off}"
        body = data[off + 12:off + 12 + length]
        assert len(body) == length, f"truncated record at byte {off}"
        (dcrc,) = struct.unpack("<I", data[off + 12 + length:off + 16 + length])
        assert dcrc == masked_crc32c(body), f"data CRC at byte {off}"
        off += 16 + length
        n += 1
    return n


def main():
    path = sys.argv[1]
    out = {"records": check_framing(path), "events": []}
    for ev in EventFileLoader(path).Load():
        e = {"step": ev.step, "wall_time": float(ev.wall_time).hex(), "file_version": ev.file_version, "values": []}
        for v in ev.summary.value:
            item = {"tag": v.tag, "plugin": v.metadata.plugin_data.plugin_name}
            arr = tensor_util.make_ndarray(v.tensor) if v.HasField("tensor") else None
            if item["plugin"] == "text":
                item["text"] = [x.decode("utf-8") for x in arr.reshape(-1)]
            elif arr is not None:
                item["scalar"] = float(arr.reshape(-1)[0]).hex()
            else:
                item["scalar"] = float(v.simple_value).hex()
            e["values"].append(item)
        out["events"].append(e)
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
