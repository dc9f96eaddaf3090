"""Is the data sound? Exact and near duplicates (train/val leakage), class balance, unreadable
images, and with a checkpoint the likely mislabels, as a JSON report, a summary and thumbnails.

One pass decodes each image once and keeps three things per image:
- the SHA-1 of its decoded RGB pixels (and shape): equal hashes are exact duplicates, whatever the
  file format or name;
- a 64-bit perceptual hash (imagehash's pHash: the signs of the 8x8 lowest frequencies of the
  image's DCT at 32x32 grey): a resized copy or a re-encoded JPEG changes a few of its bits, two
  different photos about half. It needs no trained network, so it works with the random weights
  we have here;
- the backbone's pooled features on the val-transformed image (the checkpoint's backbone, or
  `arch` with `weights`): cosine similarity above a threshold flags semantic near-duplicates
  (crops, colour edits) - meaningful only when the features come from trained weights, which
  the report says when they do not.
Near-duplicates are searched between val and train only, in blocks (a query block against a
base block, keeping each query's top k), so memory is bounded by the block sizes, never N x N.

With a checkpoint, out-of-sample class probabilities - val's from the checkpoint, train's from
k-fold logistic regression heads on the train features - go to cleanlab's `find_label_issues`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from tl_jax import extras
from tl_jax.data.folder import ImageFolder, find_bad_images, load_image

REPORT_JSON = 'data_check.json'
DUPLICATES_PNG = 'duplicates.png'
MISLABELS_PNG = 'mislabels.png'
# Perceptual-hash distance (bits of 64) at or below which a val/train pair is a near-duplicate.
# Measured (tests/test_data_check.py and hymenoptera_data, see the README): resized copies and
# re-encoded JPEGs at 0-2 bits, distinct photos at 14 and more.
HASH_MAX_BITS = 6
# Cosine similarity of backbone features at or above which a pair is a near-duplicate
# (trained features only; random-weight features of unrelated images reach 0.99).
COSINE_THRESHOLD = 0.95
TOP_K = 5
# Inverse L2 strength of the k-fold logistic heads on standardised features: strong, as a fold
# holds few images per feature and a weak penalty memorises the very mislabels it should doubt.
KFOLD_C = 0.01
QUERY_BLOCK = 1024
BASE_BLOCK = 8192
THUMB_PX = 128
MAX_SHOWN = 24
_INSTALL_HINT = "install the 'check' extra: pip install 'tl_jax[check]' (cleanlab, imagehash)"


class DataCheckError(ValueError):
  """The data check cannot run on this input; the message says what and why."""


def _require(module: str):
  return extras.require(module, DataCheckError, 'the data check', _INSTALL_HINT)


# ------------------------------------------------------------------------------------ splits


def find_splits(data_dir: str | Path) -> dict[str, ImageFolder]:
  """{'train': ..., 'val': ..., 'test': ...} for the split folders `data_dir` holds, else {'all': data_dir}."""
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise DataCheckError(f'--data {data_dir} is not a folder; pass a folder of class sub-folders or one '
                         'holding train/ and val/')
  names = [n for n in ('train', 'val', 'test') if (data_dir / n).is_dir()]
  if not names:
    return {'all': ImageFolder(data_dir)}
  return {n: ImageFolder(data_dir / n) for n in names}


def class_balance(splits: dict[str, ImageFolder]) -> dict[str, Any]:
  """Images per class per split, the largest / smallest class ratio, and classes a split lacks."""
  classes = sorted({c for ds in splits.values() for c in ds.classes})
  out: dict[str, Any] = {}
  for name, ds in splits.items():
    counts = {c: 0 for c in classes}
    for _, label in ds.samples:
      counts[ds.classes[label]] += 1
    present = [n for n in counts.values() if n]
    out[name] = {'counts': counts, 'total': sum(counts.values()),
                 'imbalance': max(present) / min(present) if present else None,
                 'missing': [c for c, n in counts.items() if n == 0]}
  return out


# ------------------------------------------------------------------------------- per image


@dataclasses.dataclass
class Scan:
  """One split's readable images and what was measured on each."""
  split: str
  paths: list[str]
  labels: np.ndarray             # (N,)
  pixel_hashes: list[str]        # SHA-1 of the decoded RGB pixels and their shape
  phashes: np.ndarray            # (N,) uint64 perceptual hashes
  features: Optional[np.ndarray] = None   # (N, D) float32 backbone features
  logits: Optional[np.ndarray] = None     # (N, C) the checkpoint's, when it has a head for these classes
  bad: list = dataclasses.field(default_factory=list)   # (path, reason) of unreadable files


def pixel_hash(image: Image.Image) -> str:
  """SHA-1 of the decoded RGB pixels and their shape: equal for the same picture in any lossless file."""
  pixels = np.asarray(image.convert('RGB'))
  return hashlib.sha1(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def perceptual_hash(image: Image.Image) -> np.uint64:
  """imagehash's 64-bit pHash packed into one integer (Hamming distance = differing bits)."""
  imagehash = _require('imagehash')
  bits = imagehash.phash(image).hash.ravel()
  return np.packbits(bits.astype(np.uint8)).view('>u8')[0].astype(np.uint64)


def _measure(path: str, transform: Optional[Callable]) -> tuple[str, np.uint64, Optional[np.ndarray]]:
  image = load_image(path)
  return pixel_hash(image), perceptual_hash(image), (np.asarray(transform(image)) if transform else None)


def scan_split(split: str, dataset: ImageFolder, embed: Optional[Callable] = None,
               transform: Optional[Callable] = None, batch_size: int = 32, workers: int = 2) -> Scan:
  """Decodes every image of `dataset` once: pixel hash, perceptual hash, and `embed`'s outputs.

  Args:
    embed: a batch (B, H, W, 3) of `transform`ed images -> (features (B, D), logits (B, C) or None);
      batches are padded to `batch_size` rows so it compiles once.
  """
  bad = find_bad_images(dataset.samples, workers)
  bad_paths = {p for p, _ in bad}
  samples = [(p, label) for p, label in dataset.samples if p not in bad_paths]
  paths = [p for p, _ in samples]
  hashes, phashes, features, logits = [], [], [], []
  with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      measured = list(pool.map(lambda p: _measure(p, transform if embed else None), chunk))
      hashes += [m[0] for m in measured]
      phashes += [m[1] for m in measured]
      if embed is not None:
        batch = np.stack([m[2] for m in measured])
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
        f, z = embed(padded)
        features.append(np.asarray(f)[:len(batch)])
        if z is not None:
          logits.append(np.asarray(z)[:len(batch)])
  return Scan(split, paths, np.array([label for _, label in samples], np.int64), hashes,
              np.array(phashes, np.uint64),
              np.concatenate(features).astype(np.float32) if features else None,
              np.concatenate(logits) if logits else None, bad)


# ---------------------------------------------------------------------------- duplicates


def exact_duplicates(scans: Sequence[Scan], class_names: Sequence[str]) -> list[dict]:
  """Groups of images with identical decoded pixels, within or across splits."""
  groups: dict[str, list[tuple[str, str, int]]] = {}
  for scan in scans:
    for path, h, label in zip(scan.paths, scan.pixel_hashes, scan.labels):
      groups.setdefault(h, []).append((scan.split, path, int(label)))
  out = []
  for members in groups.values():
    if len(members) > 1:
      splits = sorted({s for s, _, _ in members})
      out.append({'files': [{'split': s, 'path': p, 'class': class_names[c]} for s, p, c in members],
                  'splits': splits, 'across_splits': len(splits) > 1,
                  'classes_differ': len({c for _, _, c in members}) > 1})
  return sorted(out, key=lambda g: (not g['across_splits'], g['files'][0]['path']))


def _bit_count(x: np.ndarray) -> np.ndarray:
  if hasattr(np, 'bitwise_count'):
    return np.bitwise_count(x)
  return np.unpackbits(x.view(np.uint8).reshape(x.shape + (8,)), axis=-1).sum(-1)


def top_k(query: np.ndarray, base: np.ndarray, k: int, score: Callable[[np.ndarray, np.ndarray], np.ndarray],
          query_block: int = QUERY_BLOCK, base_block: int = BASE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """The `k` highest `score(query_rows, base_rows)` per query row and their base indices, (Q, k) each.

  Blocks of `query_block` x `base_block` scores at a time: memory stays at those sizes for any Q, N.
  """
  k = min(k, len(base))
  best_scores = np.full((len(query), k), -np.inf, np.float64)
  best_index = np.zeros((len(query), k), np.int64)
  for q0 in range(0, len(query), query_block):
    q = query[q0:q0 + query_block]
    scores, index = best_scores[q0:q0 + len(q)], best_index[q0:q0 + len(q)]
    for b0 in range(0, len(base), base_block):
      block = np.asarray(score(q, base[b0:b0 + base_block]), np.float64)
      all_scores = np.concatenate([scores, block], axis=1)
      all_index = np.concatenate([index, np.arange(b0, b0 + block.shape[1])[None].repeat(len(q), 0)], axis=1)
      keep = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
      scores = np.take_along_axis(all_scores, keep, 1)
      index = np.take_along_axis(all_index, keep, 1)
    best_scores[q0:q0 + len(q)], best_index[q0:q0 + len(q)] = scores, index
  order = np.argsort(-best_scores, axis=1)
  return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_index, order, 1)


def hash_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Minus the Hamming distance between every perceptual hash of `a` and of `b` (higher: closer)."""
  return -_bit_count(a[:, None] ^ b[None, :]).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarity of every row of `a` with every row of `b` (rows already unit length)."""
  return a @ b.T


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def near_duplicates(val: Scan, train: Scan, class_names: Sequence[str], hash_max_bits: int = HASH_MAX_BITS,
                    cosine_threshold: Optional[float] = COSINE_THRESHOLD, k: int = TOP_K) -> dict[str, Any]:
  """val/train pairs within `hash_max_bits` perceptual-hash bits or at or above `cosine_threshold`
  (None: features not used to flag), exact duplicates left out (reported as such), and the closest
  pair that was not flagged by each measure (how far the threshold is from the data)."""
  exact = _exact_pairs(val, train)
  candidates: dict[tuple[int, int], dict] = {}
  closest = {}
  distance, index = top_k(val.phashes, train.phashes, k, hash_similarity)
  measures = [('hash_bits', -distance, index, lambda s: s <= hash_max_bits)]
  if val.features is not None and train.features is not None:
    sims, sim_index = top_k(_unit(val.features), _unit(train.features), k, cosine)
    flag = (lambda s: s >= cosine_threshold) if cosine_threshold is not None else (lambda s: False)
    measures.append(('cosine', sims, sim_index, flag))
  for name, scores, indices, flagged in measures:
    best_unflagged = None
    for i in range(len(val.paths)):
      for s, j in zip(scores[i], indices[i]):
        if (val.paths[i], train.paths[j]) in exact:
          continue
        if flagged(s):
          candidates.setdefault((i, int(j)), {})[name] = float(s)
        elif best_unflagged is None or (s < best_unflagged[0] if name == 'hash_bits' else s > best_unflagged[0]):
          best_unflagged = (float(s), val.paths[i], train.paths[j])
    closest[name] = None if best_unflagged is None else dict(zip(('value', 'val', 'train'), best_unflagged))
  pairs = []
  for (i, j), flags in candidates.items():
    pair = {'val': val.paths[i], 'train': train.paths[j], 'val_class': class_names[val.labels[i]],
            'train_class': class_names[train.labels[j]], 'flagged_by': sorted(flags),
            'hash_bits': int(_bit_count(val.phashes[i] ^ train.phashes[j]))}
    if val.features is not None:
      pair['cosine'] = float((_unit(val.features[i:i + 1]) @ _unit(train.features[j:j + 1]).T)[0, 0])
    pairs.append(pair)
  pairs.sort(key=lambda p: (p['hash_bits'], -p.get('cosine', 0.0)))
  return {'pairs': pairs, 'closest_unflagged': closest, 'hash_max_bits': hash_max_bits,
          'cosine_threshold': cosine_threshold}


def _exact_pairs(val: Scan, train: Scan) -> set[tuple[str, str]]:
  by_hash: dict[str, list[str]] = {}
  for t, h in zip(train.paths, train.pixel_hashes):
    by_hash.setdefault(h, []).append(t)
  return {(v, t) for v, h in zip(val.paths, val.pixel_hashes) for t in by_hash.get(h, ())}


# ----------------------------------------------------------------------------- mislabels


def likely_mislabels(labels: np.ndarray, pred_probs: np.ndarray, class_names: Sequence[str],
                     paths: Sequence[str], split: str) -> dict[str, Any]:
  """cleanlab's `find_label_issues` on out-of-sample probabilities, ranked by self-confidence,
  and the class pairs most often confused (given class -> predicted class) over all images."""
  cleanlab_filter = _require('cleanlab.filter')
  labels, pred_probs = np.asarray(labels, np.int64), np.asarray(pred_probs, np.float64)
  if pred_probs.shape != (len(labels), len(class_names)):
    raise DataCheckError(f'{split}: probabilities of shape {pred_probs.shape} for {len(labels)} images and '
                         f'{len(class_names)} classes')
  ranked = cleanlab_filter.find_label_issues(labels, pred_probs, return_indices_ranked_by='self_confidence',
                                            n_jobs=1)   # no fork under JAX's threads
  predicted = pred_probs.argmax(1)
  issues = [{'split': split, 'path': str(paths[i]), 'given': class_names[labels[i]],
             'suggested': class_names[predicted[i]], 'given_probability': float(pred_probs[i, labels[i]])}
            for i in ranked]
  pairs: dict[tuple[int, int], int] = {}
  for t, p in zip(labels, predicted):
    if t != p:
      pairs[(int(t), int(p))] = pairs.get((int(t), int(p)), 0) + 1
  confused = [{'given': class_names[t], 'predicted': class_names[p], 'count': n}
              for (t, p), n in sorted(pairs.items(), key=lambda kv: -kv[1])]
  return {'issues': issues, 'confused_pairs': confused}


def kfold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> Optional[np.ndarray]:
  """Out-of-sample probabilities from logistic regression heads fit on the other folds (None if a
  class has fewer than 2 images)."""
  _require('sklearn')
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold, cross_val_predict
  from sklearn.preprocessing import StandardScaler
  from sklearn.pipeline import make_pipeline
  counts = np.bincount(labels)
  folds = int(min(folds, counts[counts > 0].min()))
  if folds < 2:
    return None
  head = make_pipeline(StandardScaler(), LogisticRegression(C=KFOLD_C, max_iter=1000))
  splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
  probs = cross_val_predict(head, features, labels, cv=splitter, method='predict_proba')
  full = np.zeros((len(labels), len(counts)))
  full[:, np.flatnonzero(counts)] = probs
  return full


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Embedder:
  """The backbone that gives features (and, from a checkpoint, logits) and how it was chosen."""
  embed: Callable
  transform: Callable
  description: str
  trained: bool
  class_names: Optional[list[str]] = None


def embedder(checkpoint: Optional[str | Path] = None, arch: str = 'resnet18', weights: str = 'random') -> Embedder:
  """The checkpoint's model (features and logits), else `arch` with `weights` (features only)."""
  import jax
  from tl_jax.inference import load_inference
  if checkpoint is not None:
    inference = load_inference(checkpoint)
    model, variables = inference.model, inference.variables
    source = str(inference.checkpoint.metadata.get('source', ''))
    trained = source != 'random'
    description = f'{inference.checkpoint.arch} from checkpoint {checkpoint} (weights started from {source or "?"})'
    transform, names = inference.transform, inference.class_names
  else:
    from tl_jax import convert
    from tl_jax.data.augment import build_pipeline, tutorial_val_spec
    from tl_jax.models import create_model, init_variables
    from tl_jax.weights import resolve_weights
    resolved = resolve_weights(weights, arch)
    size = resolved.preprocessing.crop_size
    num_classes = 1 if resolved.state_dict is None else convert.head_num_classes(resolved.state_dict, arch)
    model = create_model(arch, num_classes, image_size=size)
    variables = init_variables(model, jax.random.PRNGKey(0), size)
    if resolved.state_dict is not None:
      variables = convert.torch_to_flax(resolved.state_dict, arch, reference=variables)
    trained, names = resolved.state_dict is not None, None
    description = f'{arch} with weights {weights}'
    transform = build_pipeline(tutorial_val_spec(resolved.preprocessing), where='--arch preprocessing')

  with_logits = checkpoint is not None

  @jax.jit
  def forward(images_bhwc):
    features = model.apply(variables, images_bhwc, train=False, method='features')
    logits = model.apply(variables, features, method='from_features') if with_logits else None
    return features, logits

  return Embedder(forward, transform, description, trained, names)


# ------------------------------------------------------------------------------ the check


def check_data(data_dir: str | Path, checkpoint: Optional[str | Path] = None, *, arch: str = 'resnet18',
               weights: str = 'random', out_dir: Optional[str | Path] = None, hash_max_bits: int = HASH_MAX_BITS,
               cosine_threshold: Optional[float] = None, batch_size: int = 32, workers: int = 2,
               folds: int = 5, use_features: bool = True) -> dict[str, Any]:
  """Runs every check on `data_dir` and writes data_check.json (and the PNGs) to `out_dir`.

  Args:
    data_dir: a folder with train/ and val/ (test/) of class sub-folders, or one folder of classes.
    checkpoint: a model checkpoint or training run: its backbone gives the features, its val
      probabilities and k-fold heads on its train features the likely mislabels.
    arch, weights: the backbone without a checkpoint (`weights` as the recipe's: random, imagenet, PATH).
    hash_max_bits: perceptual-hash bits (of 64) at or below which a val/train pair is flagged.
    cosine_threshold: feature cosine at or above which a pair is flagged; None: COSINE_THRESHOLD with
      trained features, not flagging by features with random ones.
    use_features: False skips the backbone (hashes only; no mislabels).

  Returns:
    the report (also in data_check.json).
  """
  splits = find_splits(data_dir)
  class_names = sorted({c for ds in splits.values() for c in ds.classes})
  for ds in splits.values():   # one label space across splits even when a split lacks a class
    ds.samples = [(p, class_names.index(ds.classes[label])) for p, label in ds.samples]
    ds.classes, ds.class_to_idx = class_names, {c: i for i, c in enumerate(class_names)}
  model = embedder(checkpoint, arch, weights) if use_features else None
  notes = []
  if model is not None and model.class_names is not None and list(model.class_names) != class_names:
    raise DataCheckError(f'the checkpoint\'s classes {model.class_names} are not the classes of {data_dir} '
                         f'{class_names}; check this data with the checkpoint trained on it')
  if cosine_threshold is None:
    cosine_threshold = COSINE_THRESHOLD if model is not None and model.trained else None
  if model is not None and not model.trained:
    notes.append('the backbone has random weights: near-duplicates are flagged by the perceptual hash only; '
                 'flagging by feature similarity needs pretrained features (pass a checkpoint fine-tuned from '
                 'pretrained weights, or --weights imagenet)')
  scans = {name: scan_split(name, ds, model.embed if model else None, model.transform if model else None,
                            batch_size, workers) for name, ds in splits.items()}
  report: dict[str, Any] = {
      'data': str(Path(data_dir).absolute()), 'classes': class_names,
      'backbone': model.description if model else None,
      'balance': class_balance(splits),
      'unreadable': [{'split': s.split, 'path': p, 'reason': r} for s in scans.values() for p, r in s.bad],
      'exact_duplicates': exact_duplicates(list(scans.values()), class_names),
  }
  if 'train' in scans and 'val' in scans:
    report['near_duplicates'] = near_duplicates(scans['val'], scans['train'], class_names, hash_max_bits,
                                                cosine_threshold)
  else:
    notes.append('no train/ and val/ split folders: near-duplicates across splits not searched')
  if checkpoint is not None and model is not None:
    report['mislabels'] = _mislabels(scans, class_names, folds, notes)
  report['notes'] = notes
  if out_dir is not None:
    report['files'] = write_report(report, out_dir)
  return report


def _mislabels(scans: dict[str, Scan], class_names: Sequence[str], folds: int, notes: list[str]) -> dict[str, Any]:
  out: dict[str, Any] = {'issues': [], 'confused_pairs': {}, 'probabilities': {}}
  for name, scan in scans.items():
    if not len(scan.paths):
      continue
    if name in ('train', 'all') or scan.logits is None:   # images the checkpoint may have learnt from
      probs, how = kfold_probabilities(scan.features, scan.labels, folds), f'{folds}-fold logistic heads on its features'
    else:
      z = scan.logits - scan.logits.max(1, keepdims=True)
      probs, how = np.exp(z) / np.exp(z).sum(1, keepdims=True), "the checkpoint's probabilities"
    if probs is None:
      notes.append(f'{name}: a class has fewer than 2 images; no out-of-sample probabilities, no mislabel search')
      continue
    found = likely_mislabels(scan.labels, probs, class_names, scan.paths, name)
    out['issues'] += found['issues']
    out['confused_pairs'][name] = found['confused_pairs']
    out['probabilities'][name] = how
  return out


# -------------------------------------------------------------------------------- outputs


def _thumbnail(path: str) -> np.ndarray:
  image = load_image(path)
  image.thumbnail((THUMB_PX, THUMB_PX))
  canvas = Image.new('RGB', (THUMB_PX, THUMB_PX), (255, 255, 255))
  canvas.paste(image, ((THUMB_PX - image.width) // 2, (THUMB_PX - image.height) // 2))
  return np.asarray(canvas, np.float32) / 255.0


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
  """data_check.json, duplicates.png (flagged pairs side by side) and mislabels.png; their paths."""
  from tl_jax import plots
  out_dir = Path(out_dir).absolute()
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataCheckError(f'--out {out_dir} cannot be created ({e.strerror or e}); choose another --out') from e
  files = {'json': str(out_dir / REPORT_JSON)}
  pairs = [(g['files'][0]['path'], g['files'][1]['path'], 'exact') for g in report['exact_duplicates']]
  pairs += [(p['val'], p['train'], f'{p["hash_bits"]} bits' + (f', cos {p["cosine"]:.3f}' if 'cosine' in p else ''))
            for p in report.get('near_duplicates', {}).get('pairs', [])]
  if pairs:
    pairs = pairs[:MAX_SHOWN]
    images = np.stack([_thumbnail(p) for a, b, _ in pairs for p in (a, b)])
    titles = [t for a, b, why in pairs for t in (f'{_short(a)} ({why})', _short(b))]
    files['duplicates'] = str(plots.save_thumbnails(images, titles, out_dir / DUPLICATES_PNG, ncols=2,
                                                    title='duplicates: each row one pair'))
  issues = report.get('mislabels', {}).get('issues', [])[:MAX_SHOWN]
  if issues:
    images = np.stack([_thumbnail(i['path']) for i in issues])
    titles = [f'{_short(i["path"])}: {i["given"]} -> {i["suggested"]}?' for i in issues]
    files['mislabels'] = str(plots.save_thumbnails(images, titles, out_dir / MISLABELS_PNG, ncols=4,
                                                   title='likely mislabels (given -> suggested)'))
  tmp = Path(files['json'] + '.tmp')
  tmp.write_text(json.dumps({**report, 'files': files}, indent=2) + '\n')
  os.replace(tmp, files['json'])
  return files


def _short(path: str) -> str:
  p = Path(path)
  return f'{p.parent.parent.name}/{p.parent.name}/{p.name}'


def format_summary(report: dict[str, Any]) -> str:
  """The report in a few lines."""
  lines = [f'data check of {report["data"]} ({len(report["classes"])} classes)']
  if report.get('backbone'):
    lines.append(f'features: {report["backbone"]}')
  for split, b in report['balance'].items():
    counts = ', '.join(f'{c} {n}' for c, n in b['counts'].items())
    ratio = f'; largest/smallest class {b["imbalance"]:.2f}' if b['imbalance'] else ''
    missing = f'; NO images of {", ".join(b["missing"])}' if b['missing'] else ''
    lines.append(f'{split}: {b["total"]} images ({counts}){ratio}{missing}')
  lines.append(f'unreadable images: {len(report["unreadable"])}')
  lines += [f'  {u["path"]}: {u["reason"]}' for u in report['unreadable'][:MAX_SHOWN]]
  dups = report['exact_duplicates']
  lines.append(f'exact duplicates: {len(dups)} groups, {sum(g["across_splits"] for g in dups)} across splits, '
               f'{sum(g["classes_differ"] for g in dups)} with different classes')
  lines += ['  ' + ' = '.join(f'{f["split"]}:{f["path"]}' for f in g['files']) for g in dups[:MAX_SHOWN]]
  near = report.get('near_duplicates')
  if near:
    how = f'perceptual hash <= {near["hash_max_bits"]} bits'
    if near['cosine_threshold'] is not None:
      how += f' or feature cosine >= {near["cosine_threshold"]}'
    lines.append(f'near duplicates val/train ({how}): {len(near["pairs"])}')
    lines += [f'  {p["val"]} ~ {p["train"]} ({p["hash_bits"]} bits'
              + (f', cosine {p["cosine"]:.3f}' if 'cosine' in p else '') + ')' for p in near['pairs'][:MAX_SHOWN]]
  if 'mislabels' in report:
    issues = report['mislabels']['issues']
    lines.append(f'likely mislabels (cleanlab): {len(issues)}')
    lines += [f'  {i["path"]}: labelled {i["given"]}, looks like {i["suggested"]} '
              f'(p(given) = {i["given_probability"]:.2f})' for i in issues[:MAX_SHOWN]]
    for split, pairs in report['mislabels']['confused_pairs'].items():
      if pairs:
        lines.append(f'  most confused in {split}: ' + ', '.join(
            f'{p["given"]} -> {p["predicted"]} ({p["count"]})' for p in pairs[:5]))
  lines += [f'note: {n}' for n in report.get('notes', [])]
  if report.get('files'):
    lines.append('wrote ' + ', '.join(report['files'].values()))
  return '\n'.join(lines)
