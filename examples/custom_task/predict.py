"""Runs an exported model where torch is not installed: onnxruntime and numpy only.

python predict.py vibration.onnx vib-data/test.npz
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort


def main(model_path: str, data_path: str) -> None:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    about = json.loads(session.get_modelmeta().custom_metadata_map["fedgen.task"])
    with np.load(data_path) as f:
        x, y = f["x"].astype(about["input"]["dtype"]), f["y"]
    logits = session.run([about["output"]["name"]], {about["input"]["name"]: x})[0]  # preprocessing included
    accuracy = float((logits.argmax(1) == y).mean())
    print(f"task {about['name']} {about['version']}, round {about['round']}: accuracy {accuracy:.2%} on {len(y)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
