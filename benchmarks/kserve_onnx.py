"""A minimal KServe ModelServer serving an export's visual.onnx, for bench_oip.py's side-by-side rows.

    /tmp/kserve-venv/bin/python benchmarks/kserve_onnx.py EXPORT_DIR --name m_visual --threads 2 \
        --http_port 8080 --grpc_port 8081

Run with a separate environment holding kserve and onnxruntime (kserve pins its own FastAPI/uvicorn/grpcio, so it
is not installed next to MLServer). It is what a KServe user writes: a `kserve.Model` whose async `predict` reads
the request's tensor with `as_numpy()` (np.frombuffer for raw gRPC contents and REST binary tensors) and runs
onnxruntime in a worker thread, one run per request: KServe batches only in its sidecar agent, not in process.
The onnxruntime session has the same options as `surgeon serve-model`'s (intra-op threads, no spinning)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class VisualEmbedder(kserve.Model):
    def __init__(self, name: str, export_dir: Path, threads: int):
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = str(export_dir / "visual.onnx")
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        pixels = payload.inputs[0].as_numpy()
        (embeds,) = await asyncio.to_thread(self.session.run, None, {"pixel_values": pixels})
        output = InferOutput("image_embeds", list(embeds.shape), "FP32")
        output.set_data_from_numpy(np.ascontiguousarray(embeds), binary_data=payload.use_binary_outputs)
        return InferResponse(payload.id, self.name, [output], use_binary_outputs=payload.use_binary_outputs)


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--name", default="m_visual")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = VisualEmbedder(args.name, args.export_dir, args.threads)
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_latency_logging=False)
    for name in ("kserve", "kserve.trace", "uvicorn.access"):  # no line per request, as serve-model
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
