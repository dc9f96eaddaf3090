"""tl_jax.weights: cache, download, checksum and safe loading, against a localhost server only."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tl_jax import weights
from tl_jax.weights import Preprocessing, WeightsError
from tl_jax.models import ARCHS
from tl_jax.weight_files import DEFAULT_WEIGHTS, WEIGHT_FILES


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves a folder; `server.mode` 'drop' cuts every file in half, 'stall' never answers."""

  def log_message(self, *args):
    pass

  def do_GET(self):
    self.server.requests.append(self.path)
    if self.server.mode == 'stall':
      self.server.release.wait(10)
      return
    if self.server.mode == 'drop':
      data = Path(self.translate_path(self.path)).read_bytes()
      self.send_response(200)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data[:len(data) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    super().do_GET()


class LocalServer(http.server.ThreadingHTTPServer):
  daemon_threads = True


@pytest.fixture
def local_server(tmp_path):
  """An http.server on 127.0.0.1 serving `server.root`; `server.requests` lists the paths asked for."""
  root = tmp_path / 'served'
  root.mkdir()
  server = LocalServer(('127.0.0.1', 0), functools.partial(_Handler, directory=str(root)))
  server.root, server.requests, server.mode = root, [], 'serve'
  server.release = threading.Event()
  server.url = f'http://127.0.0.1:{server.server_address[1]}/'
  # A short poll interval keeps shutdown() (and so each test's teardown) fast.
  thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.02},
                            daemon=True)
  thread.start()
  yield server
  server.release.set()
  server.shutdown()
  server.server_close()
  thread.join(5)


def closed_port_url() -> str:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  return f'http://127.0.0.1:{port}/'


def tiny_state_dict() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'fc.weight': rng.standard_normal((2, 3)).astype(np.float32),
          'fc.bias': rng.standard_normal(2).astype(np.float32),
          'bn1.num_batches_tracked': np.array(7, np.int64)}


def assert_same(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k])


def leftovers(folder: Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if p.name.endswith('.partial'))


@pytest.fixture
def torch():
  return pytest.importorskip('torch')


@pytest.fixture
def hashed_resnet18(torch, local_server, monkeypatch):
  """A tiny .pth served as resnet18-<sha256[:8]>.pth, with IMAGENET_URLS pointing at that name."""
  staging = local_server.root / 'staging.pth'
  torch.save({k: torch.from_numpy(v) for k, v in tiny_state_dict().items()}, staging)
  prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
  filename = f'resnet18-{prefix}.pth'
  staging.rename(local_server.root / filename)
  monkeypatch.setitem(weights.IMAGENET_URLS, 'resnet18', weights.DEFAULT_BASE_URL + filename)
  return filename


# -- names, paths, preprocessing ----------------------------------------------------------------

def test_preprocessing_round_trip():
  p = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize_size=128, crop_size=112,
                    interpolation='bicubic')
  assert Preprocessing.from_dict(p.to_dict()) == p
  assert Preprocessing.from_dict({}) == Preprocessing()
  with pytest.raises(WeightsError, match='unknown preprocessing keys'):
    Preprocessing.from_dict({'mean': (0, 0, 0), 'scale': 2})


def test_imagenet_urls_and_preprocessing_match_torchvision():
  """`imagenet` is IMAGENET1K_V1 where torchvision has it, else DEFAULT; every enum's file and
  transforms() parameters as torchvision's, for every registered arch."""
  tv_models = pytest.importorskip('torchvision.models')
  assert sorted(weights.IMAGENET_URLS) == sorted(ARCHS)
  for arch in ARCHS:
    enum = tv_models.get_model_weights(arch)
    default = enum.IMAGENET1K_V1 if 'IMAGENET1K_V1' in enum.__members__ else enum.DEFAULT
    assert weights.IMAGENET_URLS[arch] == default.url, arch
    for name in [member.name for member in enum] + ['DEFAULT', 'imagenet']:
      member = default if name == 'imagenet' else getattr(enum, name)
      transforms = member.transforms()
      assert weights.imagenet_url(arch, name=name) == member.url, (arch, name)
      assert weights.preprocessing_of(arch, name) == Preprocessing(
          mean=tuple(transforms.mean), std=tuple(transforms.std), resize_size=transforms.resize_size[0],
          crop_size=transforms.crop_size[0], interpolation=transforms.interpolation.value), (arch, name)


def test_the_weight_table_is_torchvisions_registry():
  """Every classification model and weight enum torchvision lists, with its file, transforms and
  (ViTs) the image size the weights fix."""
  torchvision = pytest.importorskip('torchvision')
  tv_models = torchvision.models
  assert sorted(WEIGHT_FILES) == sorted(tv_models.list_models(module=tv_models))
  for arch, files in WEIGHT_FILES.items():
    enum = tv_models.get_model_weights(arch)
    assert list(files) == [member.name for member in enum], arch
    assert DEFAULT_WEIGHTS[arch] == enum.DEFAULT.name
    for name, file in files.items():
      member = getattr(enum, name)
      transforms = member.transforms()
      assert (file.filename, file.resize_size, file.crop_size, file.interpolation, file.mean, file.std) == (
          member.url.rsplit('/', 1)[1], transforms.resize_size[0], transforms.crop_size[0],
          transforms.interpolation.value, tuple(transforms.mean), tuple(transforms.std)), (arch, name)
      assert file.image_size == (member.meta['min_size'][0] if arch.startswith('vit_') else None), (arch, name)


def test_unknown_weight_name_lists_the_archs_weights():
  with pytest.raises(WeightsError, match='no such weights for resnet18; its weights are IMAGENET1K_V1 '):
    weights.resolve_weights('IMAGENET1K_V2', 'resnet18')
  assert weights.preprocessing_of('resnet50', 'IMAGENET1K_V2').resize_size == 232


def test_sha256_prefix_from_name():
  assert weights.sha256_prefix_from_name('resnet18-f37072fd.pth') == 'f37072fd'
  assert weights.sha256_prefix_from_name('/a/b-c/resnet50-0676ba61.pth') == '0676ba61'
  assert weights.sha256_prefix_from_name('vgg16_features-amdegroot-88682ab5.pth') == '88682ab5'
  assert weights.sha256_prefix_from_name('model.pth') is None
  assert weights.sha256_prefix_from_name('my-model.pth') is None


def test_torch_hub_dir_honours_env(monkeypatch, tmp_path):
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th'))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert weights.torch_hub_dir() == tmp_path / 'th' / 'hub'
  monkeypatch.delenv('TORCH_HOME')
  assert weights.torch_hub_dir() == tmp_path / 'xdg' / 'torch' / 'hub'
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert weights.torch_hub_dir() == tmp_path / 'home' / '.cache' / 'torch' / 'hub'


@pytest.mark.parametrize('env', [{'TORCH_HOME': 'th'}, {'XDG_CACHE_HOME': 'xdg'},
                                 {'TORCH_HOME': 'th', 'XDG_CACHE_HOME': 'xdg'}, {}])
def test_torch_hub_dir_equals_torch(torch, monkeypatch, tmp_path, env):
  import torch.hub
  if torch.hub._hub_dir is not None:
    pytest.skip('torch.hub.set_dir was called in this process')
  monkeypatch.delenv('TORCH_HOME', raising=False)
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  for key, value in env.items():
    monkeypatch.setenv(key, str(tmp_path / value))
  assert weights.torch_hub_dir() == Path(torch.hub.get_dir())


def test_weights_module_imports_no_torch():
  code = 'import sys, tl_jax.weights, tl_jax.data.download; assert "torch" not in sys.modules'
  subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONPATH': os.getcwd()},
                 cwd=Path(__file__).resolve().parents[1])


# -- resolve_weights: cache and download ---------------------------------------------------------

def test_download_into_torch_home_then_cache_hit(hashed_resnet18, local_server, monkeypatch, tmp_path):
  monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th'))
  resolved = weights.resolve_weights('imagenet', 'resnet18', base_url=local_server.url, progress=False)
  cached = tmp_path / 'th' / 'hub' / 'checkpoints' / hashed_resnet18
  assert cached.is_file()
  assert resolved.source == f'imagenet:{cached}'
  assert resolved.preprocessing == Preprocessing()
  assert_same(resolved.state_dict, tiny_state_dict())
  assert local_server.requests == [f'/{hashed_resnet18}']
  assert leftovers(cached.parent) == []
  again = weights.resolve_weights('imagenet', 'resnet18', base_url=local_server.url, progress=False)
  assert local_server.requests == [f'/{hashed_resnet18}']   # second call: cache only
  assert_same(again.state_dict, tiny_state_dict())


def test_base_url_from_env(hashed_resnet18, local_server, monkeypatch, tmp_path):
  monkeypatch.setenv(weights.BASE_URL_ENV, local_server.url.rstrip('/'))
  resolved = weights.resolve_weights('imagenet', 'resnet18', cache_dir=tmp_path / 'c', progress=False)
  assert local_server.requests == [f'/{hashed_resnet18}']
  assert_same(resolved.state_dict, tiny_state_dict())


def test_cache_hit_contacts_no_server(torch, local_server, tmp_path):
  cache = tmp_path / 'cache'
  filename = os.path.basename(weights.IMAGENET_URLS['resnet18'])
  weights.save_state_dict(tiny_state_dict(), cache / filename)
  resolved = weights.resolve_weights('imagenet', 'resnet18', cache_dir=cache, base_url=local_server.url,
                                     progress=False)
  assert local_server.requests == []
  assert_same(resolved.state_dict, tiny_state_dict())


def test_corrupt_cached_file_says_delete_it(torch, local_server, tmp_path):
  cache = tmp_path / 'cache'
  cache.mkdir()
  cached = cache / os.path.basename(weights.IMAGENET_URLS['resnet18'])
  cached.write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(WeightsError) as info:
    weights.resolve_weights('imagenet', 'resnet18', cache_dir=cache, base_url=local_server.url,
                            progress=False)
  assert str(cached) in str(info.value) and 'delete it' in str(info.value)
  assert local_server.requests == []


def test_checksum_mismatch_leaves_no_file(torch, local_server, monkeypatch, tmp_path):
  filename = 'resnet18-deadbeef.pth'
  torch.save({'w': torch.zeros(3)}, local_server.root / filename)
  monkeypatch.setitem(weights.IMAGENET_URLS, 'resnet18', weights.DEFAULT_BASE_URL + filename)
  cache = tmp_path / 'cache'
  with pytest.raises(WeightsError) as info:
    weights.resolve_weights('imagenet', 'resnet18', cache_dir=cache, base_url=local_server.url,
                            progress=False)
  digest = hashlib.sha256((local_server.root / filename).read_bytes()).hexdigest()
  message = str(info.value)
  assert local_server.url + filename in message and 'deadbeef' in message and digest in message
  assert list(cache.iterdir()) == []


def test_download_offline_names_url_and_alternatives(tmp_path):
  url = closed_port_url() + 'w.pth'
  dst = tmp_path / 'cache' / 'w.pth'
  with pytest.raises(WeightsError) as info:
    weights.download(url, dst, progress=False)
  message = str(info.value)
  assert url in message and 'offline' in message and str(dst) in message
  assert '--weights PATH' in message and '--weights random' in message
  assert list(dst.parent.iterdir()) == []


def test_resolve_offline_names_url_and_alternatives(torch, tmp_path):
  url = closed_port_url()
  cache = tmp_path / 'cache'
  with pytest.raises(WeightsError) as info:
    weights.resolve_weights('imagenet', 'resnet18', cache_dir=cache, base_url=url, progress=False)
  message = str(info.value)
  assert url + 'resnet18-f37072fd.pth' in message
  assert 'offline' in message and 'unreachable' in message
  assert str(cache / 'resnet18-f37072fd.pth') in message
  assert '--weights PATH' in message and '--weights random' in message
  assert list(cache.iterdir()) == []


def test_http_error_is_reported(local_server, tmp_path):
  with pytest.raises(WeightsError, match='HTTP 404'):
    weights.download(local_server.url + 'nothing.pth', tmp_path / 'x.pth', progress=False)
  assert list(tmp_path.iterdir()) == [local_server.root]


def test_dropped_connection_leaves_no_file(local_server, tmp_path):
  (local_server.root / 'big.bin').write_bytes(os.urandom(300_000))
  local_server.mode = 'drop'
  dst = tmp_path / 'dl' / 'big.bin'
  with pytest.raises(WeightsError, match='cut off after 150000 of 300000 bytes'):
    weights.download(local_server.url + 'big.bin', dst, progress=False)
  assert list(dst.parent.iterdir()) == []


def test_stalled_server_times_out(local_server, tmp_path):
  local_server.mode = 'stall'
  dst = tmp_path / 'dl' / 'x.bin'
  with pytest.raises(WeightsError, match='offline or the server is unreachable'):
    weights.download(local_server.url + 'x.bin', dst, progress=False, timeout=0.3)
  assert list(dst.parent.iterdir()) == []


def test_download_checks_prefix_and_overwrites_atomically(local_server, tmp_path):
  payload = os.urandom(1000)
  (local_server.root / 'f.bin').write_bytes(payload)
  dst = tmp_path / 'f.bin'
  dst.write_bytes(b'old')
  prefix = hashlib.sha256(payload).hexdigest()[:10]
  weights.download(local_server.url + 'f.bin', dst, prefix, progress=False)
  assert dst.read_bytes() == payload
  with pytest.raises(WeightsError, match='checksum mismatch'):
    weights.download(local_server.url + 'f.bin', dst, '0' * 64, progress=False)
  assert dst.read_bytes() == payload   # the old file survives a failed download
  assert leftovers(tmp_path) == []


# -- resolve_weights: other specs ----------------------------------------------------------------

def test_random_and_unknown_arch_and_missing_path(tmp_path):
  resolved = weights.resolve_weights('random', 'resnet18')
  assert resolved.state_dict is None and resolved.source == 'random'
  with pytest.raises(WeightsError, match='no ImageNet weights known for arch .resnet9.; known: .*resnet18, '):
    weights.resolve_weights('imagenet', 'resnet9', cache_dir=tmp_path)
  with pytest.raises(WeightsError) as info:
    weights.resolve_weights(str(tmp_path / 'nope.pth'), 'resnet18')
  assert 'nope.pth' in str(info.value) and 'random | PATH' in str(info.value)


def test_local_safetensors_carries_preprocessing(tmp_path):
  p = Preprocessing(resize_size=160, crop_size=128)
  path = weights.save_state_dict(tiny_state_dict(), tmp_path / 'w.safetensors', preprocessing=p)
  resolved = weights.resolve_weights(str(path), 'resnet18')
  assert resolved.preprocessing == p and resolved.source == str(path)
  assert_same(resolved.state_dict, tiny_state_dict())
  plain = weights.save_state_dict(tiny_state_dict(), tmp_path / 'plain.safetensors')
  assert weights.resolve_weights(str(plain), 'resnet18').preprocessing == Preprocessing()


# -- load_state_dict / save_state_dict -----------------------------------------------------------

def test_safetensors_round_trip(tmp_path):
  sd = tiny_state_dict()
  path = weights.save_state_dict(sd, tmp_path / 'sub' / 'w.safetensors')
  assert_same(weights.load_state_dict(path), sd)
  assert leftovers(path.parent) == []


def test_pth_round_trip_matches_torch(torch, tmp_path):
  sd = dict(tiny_state_dict(), **{'bn1.num_batches_tracked': np.array(7, np.int32)})
  path = weights.save_state_dict(sd, tmp_path / 'w.pth')
  raw = torch.load(path, weights_only=True)
  assert raw['bn1.num_batches_tracked'].dtype == torch.int64 and raw['bn1.num_batches_tracked'].shape == ()
  assert raw['fc.weight'].dtype == torch.float32
  loaded = weights.load_state_dict(path)
  assert loaded['bn1.num_batches_tracked'].dtype == np.int64
  np.testing.assert_array_equal(loaded['fc.weight'], sd['fc.weight'])


def test_bfloat16_survives_pth(torch, tmp_path):
  path = tmp_path / 'bf16.pth'
  tensor = torch.randn(4, dtype=torch.bfloat16)
  torch.save({'w': tensor}, path)
  loaded = weights.load_state_dict(path)['w']
  assert loaded.dtype.name == 'bfloat16'
  assert torch.equal(torch.from_numpy(loaded.astype(np.float32)), tensor.float())
  weights.save_state_dict({'w': loaded}, tmp_path / 'again.pth')
  assert torch.equal(torch.load(tmp_path / 'again.pth', weights_only=True)['w'], tensor)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_module_prefix_is_stripped(suffix, tmp_path):
  if suffix == '.pth':
    pytest.importorskip('torch')
  sd = tiny_state_dict()
  path = weights.save_state_dict({f'module.{k}': v for k, v in sd.items()}, tmp_path / f'dp{suffix}')
  assert_same(weights.load_state_dict(path), sd)
  partly = weights.save_state_dict({'module.a': sd['fc.bias'], 'b': sd['fc.bias']}, tmp_path / f'p{suffix}')
  assert sorted(weights.load_state_dict(partly)) == ['b', 'module.a']


@pytest.mark.parametrize('key', ['state_dict', 'model'])
def test_wrapped_checkpoint_is_unwrapped(torch, tmp_path, key):
  sd = tiny_state_dict()
  path = tmp_path / 'ckpt.pth'
  torch.save({key: {f'module.{k}': torch.from_numpy(v) for k, v in sd.items()},
              'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 3}, path)
  assert_same(weights.load_state_dict(path), sd)


def test_truncated_and_garbage_pth(torch, tmp_path):
  good = weights.save_state_dict(tiny_state_dict(), tmp_path / 'good.pth')
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'\x00\x01 definitely not a checkpoint' * 10)
  for path in (truncated, garbage):
    with pytest.raises(WeightsError) as info:
      weights.load_state_dict(path)
    assert str(path) in str(info.value) and 'corrupt or truncated' in str(info.value)
    assert info.value.__cause__ is not None


def test_truncated_safetensors(tmp_path):
  good = weights.save_state_dict(tiny_state_dict(), tmp_path / 'good.safetensors')
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(good.read_bytes()[:-20])
  with pytest.raises(WeightsError, match='corrupt or truncated') as info:
    weights.load_state_dict(bad)
  assert str(bad) in str(info.value)


def test_not_a_state_dict(torch, tmp_path):
  cases = {
      'list.pth': ([torch.zeros(2), torch.ones(2)], 'holds a list, not a state dict'),
      'module.pth': (torch.nn.Linear(2, 2), 'holds pickled objects.*torch.nn.modules.linear.Linear'),
      'mixed.pth': ({'w': torch.zeros(2), 'name': 'resnet'}, "'name' \\(str\\)"),
      'empty.pth': ({}, 'holds no tensors'),
  }
  for name, (obj, pattern) in cases.items():
    path = tmp_path / name
    torch.save(obj, path)
    with pytest.raises(WeightsError, match=pattern) as info:
      weights.load_state_dict(path)
    assert str(path) in str(info.value), name


def test_missing_file_and_unknown_extension(tmp_path):
  with pytest.raises(WeightsError, match='not found'):
    weights.load_state_dict(tmp_path / 'nope.pth')
  other = tmp_path / 'w.npz'
  other.write_bytes(b'x')
  with pytest.raises(WeightsError, match="unknown weights file type '.npz'"):
    weights.load_state_dict(other)
  with pytest.raises(WeightsError, match='unknown weights file type'):
    weights.save_state_dict(tiny_state_dict(), tmp_path / 'w.npz')


def test_missing_torch_is_explained(monkeypatch, tmp_path):
  path = tmp_path / 'w.pth'
  path.write_bytes(b'x')
  monkeypatch.setitem(sys.modules, 'torch', None)   # makes `import torch` raise ImportError
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / os.path.basename(weights.IMAGENET_URLS['resnet18'])).write_bytes(b'x')
  for call in (lambda: weights.load_state_dict(path),
               lambda: weights.save_state_dict(tiny_state_dict(), tmp_path / 'o.pth'),
               lambda: weights.resolve_weights('imagenet', 'resnet18', cache_dir=cache)):
    with pytest.raises(WeightsError, match=r"pip install 'tl_jax\[torch\]'.*\.safetensors") as info:
      call()
    assert 'corrupt' not in str(info.value)
