"""Export a tl_jax checkpoint to ONNX, checked in ONNX Runtime against tl_jax's own logits.

  python scripts/export_onnx.py --checkpoint runs/frozen --out frozen.onnx
  tl-jax export-onnx --checkpoint ckpt/resnet18 --out resnet18.onnx --no-verify

The graph takes NCHW float32 images, normalised as the checkpoint's val transforms do, with a
dynamic batch axis, and returns logits. The input size, mean, std, class names and the val
transforms are in the file's metadata_props (keys tl_jax.*). Needs the 'onnx' extra
(pip install 'tl_jax[onnx]') and torch/torchvision.
"""

import argparse
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True,
                      help='model checkpoint dir (convert_weights.py --out) or a training --workdir')
  parser.add_argument('--out', required=True, help='the .onnx file to write')
  parser.add_argument('--opset', type=int, help="ONNX opset (default: the exporter's)")
  parser.add_argument('--no-verify', action='store_true',
                      help="skip running the file in ONNX Runtime and comparing its logits with tl_jax's")
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args(argv)

  from tl_jax import onnx_export
  if Path(args.out).exists() and not args.overwrite:
    raise onnx_export.OnnxExportError(f'{args.out} already exists; pass --overwrite to replace it')
  result = onnx_export.export_checkpoint(args.checkpoint, args.out, opset=args.opset, verify=not args.no_verify)
  height, width = result['input_size']
  print(f"wrote {result['out']}: {result['arch']}, input NCHW (batch, 3, {height}, {width}), dynamic batch")
  if 'max_rel_err' in result:
    print(f"ONNX Runtime (CPU) logits vs tl_jax's: max relative error {result['max_rel_err']:.2e}")
  return 0
