"""`mlplab export --model CKPT --output model.onnx`: the trained network as ONNX, checked.

The exported graph is the logged model's: raw features in, the seed's outputs out (input
standardisation included), any batch size. After writing, ONNX Runtime runs it on random inputs
and the result must match the checkpoint's own outputs (max abs difference printed; above
`--tolerance` it is an error). Needs the `onnx` extra: `pip install 'mlplab[onnx]'`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from mlplab.errors import CommandParser, UserError
from mlplab.safety.trust import add_weights_only_argument, trust_from_arguments
from mlplab.tracking.store import output_folder


def export_onnx(checkpoint: str, output: Path, tolerance: float = 1e-5) -> float:
    """Write the ONNX file; return the largest difference from the checkpoint's outputs."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'mlplab[onnx]'") from None
    from mlplab.commands.predict import Predictor
    from mlplab.safety import metadata
    from mlplab.serving import inference_module

    Predictor(checkpoint)  # the one-line errors for a missing or foreign file
    task = metadata.load_module(checkpoint)
    module = inference_module(task)
    width = task.hparams.get("num_features")
    if width is None:
        raise UserError(f"{checkpoint}: {type(task).__name__} has no num_features setting to "
                        "give the exported model its input width")  # fmt: skip
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module, (torch.zeros(2, width),), dynamic_shapes=({0: batch},), dynamo=True, verbose=False
    )
    program.save(str(output))

    x = np.random.default_rng(0).standard_normal((64, width)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    difference = float(np.abs(exported - expected).max())
    if difference > tolerance:
        raise UserError(f"{output} differs from the checkpoint by {difference:.2e} (> {tolerance})")
    return difference


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="mlplab export", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="a Lightning checkpoint (.ckpt)")
    parser.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    add_weights_only_argument(parser)
    args = parser.parse_args(argv)
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        parser.exit(2, f"mlplab export: error: --tolerance {args.tolerance}: the largest "
                    "difference allowed is a finite number above 0, e.g. 1e-5\n")  # fmt: skip
    trust_from_arguments(args)
    try:
        difference = export_onnx(args.model, output_folder(args.output), args.tolerance)
    except UserError as err:
        parser.exit(2, f"mlplab export: error: {err}\n")
    print(
        f"mlplab: wrote {args.output}; ONNX Runtime matches the checkpoint on 64 random rows "
        f"(max abs difference {difference:.1e})",
        file=sys.stderr,
    )
