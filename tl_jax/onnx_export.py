"""A model checkpoint as an ONNX file that ONNX Runtime runs: logits of NCHW normalised images.

The route goes through torchvision: the checkpoint's variables become torchvision's state dict
(`convert.flax_to_torch`, the name tables every family's parity tests check), load strictly into
torchvision's model of the same arch, and `torch.onnx.export` (the torch.export-based exporter,
torch's default since 2.9) writes the graph. Why not jax2onnx straight from the Flax module:
tl_jax's own ops (max-pool padded with -inf, shifted-tap depthwise convs, Winograd convs) are what
jax2onnx's plugins have to recognise, and jax2onnx 0.17 wrote ResNet-18's max-pool as a node ONNX
Runtime refuses and failed on VGG's; torchvision's modules are what torch's exporter is tested on.
The legacy TorchScript exporter (`dynamo=False`) is deprecated and refuses VGG's adaptive average
pool at inputs below 224 px.

Every checkpoint tl_jax writes holds a stock architecture (`create_model(arch, num_classes)`), so
every one exports. A `TransferModel` with a user's Flax head never becomes a checkpoint and has no
torchvision twin: it does not export.

The file records what a deployment needs as `metadata_props`: the input's size, layout and value
range, the normalisation, the class names and the checkpoint's full val transforms (JSON). The batch
axis is dynamic; height and width are the val preprocessing's crop, as the graph is traced there
(some families' pooling grids depend on it).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

from tl_jax import checkpoint as checkpoint_lib
from tl_jax import convert, export, extras
from tl_jax.models import create_model, family_of

INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
_INSTALL_HINT = "install the 'onnx' extra: pip install 'tl_jax[onnx]' (onnx, onnxscript, onnxruntime)"


class OnnxExportError(ValueError):
  """The checkpoint cannot be written as ONNX; the message says what and why."""


def _require(module: str):
  return extras.require(module, OnnxExportError, 'ONNX export', _INSTALL_HINT)


def torchvision_model(arch: str, num_classes: int, flax_model: Any = None, image_size: Optional[int] = None):
  """torchvision's `arch`, built as tl_jax's model of it computes (random weights, eval mode left to the caller).

  Inception v3 and GoogLeNet are built as their ImageNet weights build them (aux heads, whose
  tensors the name table has; `transform_input` as the Flax module's); a ViT at `image_size`, a
  MaxViT with that input size (torchvision fixes both grids at construction).
  """
  torchvision = _require('torchvision')
  family = family_of(arch).name
  kwargs: dict[str, Any] = {'num_classes': num_classes}
  if family in ('inception', 'googlenet'):
    kwargs.update(aux_logits=True, init_weights=False,
                  transform_input=bool(getattr(flax_model, 'transform_input', True)))
  elif family == 'vit' and image_size is not None:
    kwargs['image_size'] = image_size
  elif family == 'maxvit' and image_size is not None:
    kwargs['input_size'] = (image_size, image_size)
  return getattr(torchvision.models, arch)(**kwargs)


def _load_torch(module, state_dict: Mapping[str, np.ndarray], arch: str) -> None:
  torch = _require('torch')
  tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())
  # Module versions torchvision's loaders check (MNASNet's), as export_torch_weights writes them.
  versions = export.TORCH_MODULE_VERSIONS.get(family_of(arch).name, {})
  tensors._metadata = {k: {'version': v} for k, v in versions.items()}  # pylint: disable=protected-access
  module.load_state_dict(tensors, strict=True)


def input_spec(metadata: Mapping[str, Any]) -> dict[str, Any]:
  """What the exported graph expects: the val pipeline's output size, mean and std, and its transforms.

  The size is measured by running the checkpoint's val transforms on a blank image, so a recipe's
  own `val_transforms` (a Resize without CenterCrop, another crop) give the size it really feeds.
  """
  from tl_jax.data.augment import tutorial_val_spec
  from tl_jax.inference import eval_transform_for
  from tl_jax.weights import Preprocessing
  model = checkpoint_lib.ModelCheckpoint({}, dict(metadata))
  transform = eval_transform_for(model)
  height, width, _ = np.asarray(transform(Image.new('RGB', (400, 300)))).shape
  spec = metadata.get('val_transforms') or tutorial_val_spec(
      Preprocessing.from_dict(metadata.get('preprocessing') or {}))
  normalize = [dict(e['Normalize']) for e in spec if isinstance(e, Mapping) and 'Normalize' in e]
  mean = normalize[-1].get('mean') if normalize else None
  std = normalize[-1].get('std') if normalize else None
  return {'height': int(height), 'width': int(width), 'mean': mean, 'std': std, 'val_transforms': list(spec)}


def metadata_props(metadata: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, str]:
  """The ONNX file's metadata_props (all strings; lists and dicts as JSON)."""
  import tl_jax
  props = {
      'tl_jax.arch': metadata['arch'],
      'tl_jax.num_classes': str(metadata['num_classes']),
      'tl_jax.class_names': json.dumps(metadata.get('class_names')),
      'tl_jax.input_layout': 'NCHW',
      'tl_jax.input_size': json.dumps([spec['height'], spec['width']]),
      'tl_jax.input_range': 'RGB in [0, 1] (ToTensor), then normalised: (x - mean) / std per channel',
      'tl_jax.mean': json.dumps(spec['mean']),
      'tl_jax.std': json.dumps(spec['std']),
      'tl_jax.val_transforms': json.dumps(spec['val_transforms']),
      'tl_jax.preprocessing': json.dumps(metadata.get('preprocessing')),
      'tl_jax.version': getattr(tl_jax, '__version__', ''),
  }
  if metadata.get('temperature') is not None:
    props['tl_jax.temperature'] = str(metadata['temperature'])
  return props


def _first_line(error: BaseException) -> str:
  """The exporter's own reason, one line (torch's messages run to pages)."""
  root = error
  while root.__cause__ is not None and str(root.__cause__).strip():
    root = root.__cause__
  for line in str(root).strip().splitlines() or [type(root).__name__]:
    if line.strip() and not line.startswith(('[torch.onnx]', 'Traceback')):
      text = f'{type(root).__name__}: {line.strip()}'
      return text if len(text) <= 300 else text[:297] + '...'
  return type(root).__name__


def export_module(module, example_nchw: np.ndarray, out: str | Path, props: Mapping[str, str],
                  what: str, opset: Optional[int] = None) -> Path:
  """Traces a torch `module` on `example_nchw` and writes the ONNX file with a dynamic batch axis.

  Raises:
    OnnxExportError: one line naming `what` and the exporter's reason (an op ONNX cannot express).
  """
  torch = _require('torch')
  _require('onnxscript')   # the torch.export-based exporter translates through it
  out = Path(out).absolute()
  if out.parent and not out.parent.is_dir():
    raise OnnxExportError(f'--out {out}: the folder {out.parent} does not exist; create it or choose another --out')
  module.eval()
  batch = torch.export.Dim('batch', min=1)
  try:
    import contextlib
    import io
    # The exporter prints its progress lines; a script's output should be ours.
    with contextlib.redirect_stdout(io.StringIO()):
      program = torch.onnx.export(module, (torch.from_numpy(example_nchw),), dynamo=True, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), opset_version=opset)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types while exporting)
    raise OnnxExportError(f'cannot export {what} to ONNX: {_first_line(e)}') from e
  for key, value in props.items():
    program.model.metadata_props[key] = value
  tmp = out.with_name(out.name + '.tmp')
  try:
    program.save(tmp)   # external data beside it when the weights pass protobuf's 2 GB
    os.replace(tmp, out)
  except OSError as e:
    raise OnnxExportError(f'cannot write {out}: {e.strerror or e}; choose another --out') from e
  return out


def export_checkpoint(checkpoint_dir: str | Path, out: str | Path, opset: Optional[int] = None,
                      verify: bool = True, batch: int = 2) -> dict[str, Any]:
  """Writes a model checkpoint (or a training run's best one) as ONNX at `out`.

  Args:
    checkpoint_dir: a model checkpoint, a `best/` folder or a training workdir.
    out: the .onnx file to write.
    opset: ONNX opset; None: the exporter's default.
    verify: run the file in ONNX Runtime (CPU) on `batch` random images and compare its logits
      with tl_jax's (the relative error is in the result as `max_rel_err`).

  Returns:
    {'out', 'arch', 'input_size', 'metadata_props', 'max_rel_err' (verify only)}.
  """
  model_ckpt = checkpoint_lib.load_model(checkpoint_dir)
  arch, num_classes = model_ckpt.arch, model_ckpt.num_classes
  spec = input_spec(model_ckpt.metadata)
  crop = (model_ckpt.metadata.get('preprocessing') or {}).get('crop_size')
  flax_model = create_model(arch, num_classes, image_size=crop)
  state_dict = convert.flax_to_torch(model_ckpt.variables, arch)
  module = torchvision_model(arch, num_classes, flax_model, image_size=crop)
  _load_torch(module, state_dict, arch)
  images_bhwc = np.random.default_rng(0).standard_normal((batch, spec['height'], spec['width'], 3)).astype(np.float32)
  props = metadata_props(model_ckpt.metadata, spec)
  path = export_module(module, images_bhwc.transpose(0, 3, 1, 2).copy(), out, props,
                       what=f'{arch} (checkpoint {checkpoint_lib.resolve_model_dir(checkpoint_dir)})', opset=opset)
  result: dict[str, Any] = {'out': str(path), 'arch': arch, 'input_size': [spec['height'], spec['width']],
                            'metadata_props': props}
  if verify:
    import jax
    ours = np.asarray(flax_model.apply(jax.device_put(model_ckpt.variables), images_bhwc, train=False))
    theirs = run_onnx(path, images_bhwc)
    result['max_rel_err'] = float(np.max(np.abs(theirs - ours)) / max(np.max(np.abs(ours)), 1e-30))
  return result


def run_onnx(path: str | Path, images_bhwc: np.ndarray) -> np.ndarray:
  """Logits from ONNX Runtime (CPU) for NHWC images (transposed to the file's NCHW)."""
  ort = _require('onnxruntime')
  session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images_bhwc.transpose(0, 3, 1, 2))})[0]


def read_metadata(path: str | Path) -> dict[str, str]:
  """The file's metadata_props as a dict (what a deployment reads to preprocess)."""
  onnx = _require('onnx')
  model = onnx.load(str(path), load_external_data=False)
  return {p.key: p.value for p in model.metadata_props}
