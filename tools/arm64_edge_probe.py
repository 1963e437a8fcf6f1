"""Run `fedgen-client` with measurements around it, natively or inside the arm64 root.

    python tools/arm64_edge_probe.py --report OUT.json -- --coordinator HOST:PORT --data SHARD ...

Everything after `--` goes to fedgen.edge.cli.main unchanged. The probe changes no behaviour:
it times the import of the client, wraps the runner's per-task function with a wall-clock timer,
counts onnxruntime generator loads and runs (with a check of their output), and writes what it saw
to --report when the client exits. Used by tools/arm64_edge_run.py for both clients alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print("usage: arm64_edge_probe.py --report OUT.json -- <fedgen-client args>", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ours = argparse.ArgumentParser(prog="arm64_edge_probe.py")
    ours.add_argument("--report", required=True)
    args = ours.parse_args(argv[:cut])
    client_argv = argv[cut + 1 :]

    report: dict = {"machine": platform.machine(), "python": platform.python_version(), "rounds": [], "onnx": {}}
    t0 = time.perf_counter()
    import fedgen.edge.cli as cli  # torch, onnxruntime, grpc, numpy, protobuf come with it
    import fedgen.edge.runner as runner

    report["import_edge_client_s"] = round(time.perf_counter() - t0, 3)
    report["rss_after_import_kib"] = _vm_kib("VmRSS")

    import grpc
    import numpy as np
    import onnxruntime as ort
    import torch
    from google.protobuf import __version__ as pb_version

    report["versions"] = {
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "grpcio": grpc.__version__,
        "protobuf": pb_version,
        "numpy": np.__version__,
    }
    try:
        report["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception as err:  # older torch
        report["torch_cpu_capability"] = f"n/a ({err})"
    report["torch_nnpack_available"] = bool(torch.backends.nnpack.is_available())
    report["torch_mkldnn_available"] = bool(torch.backends.mkldnn.is_available())
    report["ort_available_providers"] = ort.get_available_providers()

    onnx = report["onnx"]
    onnx.update(loads=0, runs=0, run_seconds=0.0, providers=None, finite=True, latent_shape=None, latent_abs_mean=None)
    gen_cls = runner.OnnxGenerator
    orig_init, orig_latents = gen_cls.__init__, gen_cls.latents

    def init(self, *a, **kw):  # type: ignore[no-untyped-def]
        orig_init(self, *a, **kw)
        onnx["loads"] += 1
        onnx["providers"] = self.session.get_providers()

    def latents(self, labels, eps):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = orig_latents(self, labels, eps)
        onnx["run_seconds"] += time.perf_counter() - t
        onnx["runs"] += 1
        onnx["finite"] = bool(onnx["finite"] and np.isfinite(out).all())
        onnx["latent_shape"] = list(out.shape)
        onnx["latent_abs_mean"] = float(np.abs(out).mean())
        return out

    gen_cls.__init__, gen_cls.latents = init, latents  # type: ignore[method-assign]

    orig_task = runner._train_and_upload

    def timed_task(conn, trainer, task, *a, **kw):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        runs_before = onnx["runs"]
        accepted = orig_task(conn, trainer, task, *a, **kw)
        report["rounds"].append(
            {
                "round": int(task.round),
                "wall_s": round(time.perf_counter() - t, 3),
                "accepted": bool(accepted),
                "onnx_runs": onnx["runs"] - runs_before,
            }
        )
        return accepted

    runner._train_and_upload = timed_task  # type: ignore[assignment]

    t1 = time.perf_counter()
    rc = 1
    try:
        rc = cli.main(client_argv)
    finally:
        report["exit_code"] = rc
        report["client_wall_s"] = round(time.perf_counter() - t1, 3)
        report["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report["vm_hwm_kib"] = _vm_kib("VmHWM")
        onnx["run_seconds"] = round(onnx["run_seconds"], 4)
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
