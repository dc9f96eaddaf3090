"""tl_jax.data.download: the hymenoptera zip, served from localhost, unpacked all-or-nothing."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from test_weights import closed_port_url, local_server  # noqa: F401  (local_server is a fixture)
from tl_jax.data.download import DownloadError, check_members, ensure_hymenoptera

_LAYOUT = {'train': ('ants', 'bees'), 'val': ('ants', 'bees')}


def tiny_jpeg(seed: int) -> bytes:
  buffer = io.BytesIO()
  Image.new('RGB', (8, 6), (seed * 40 % 256, 90, 200)).save(buffer, format='JPEG')
  return buffer.getvalue()


def make_zip(path: Path, layout=_LAYOUT, extra: tuple[str, ...] = ()) -> Path:
  """A zip shaped like hymenoptera_data.zip: hymenoptera_data/<split>/<class>/<n>.jpg."""
  with zipfile.ZipFile(path, 'w') as zf:
    for split, classes in layout.items():
      for c in classes:
        zf.writestr(f'hymenoptera_data/{split}/{c}/', b'')
        for i in range(2):
          zf.writestr(f'hymenoptera_data/{split}/{c}/{i}.jpg', tiny_jpeg(i))
    for name in extra:
      zf.writestr(name, b'' if name.endswith('/') else b'evil')
  return path


def beside(root: Path) -> list[str]:
  """Everything in root's parent folder (temp folders would show here)."""
  return sorted(p.name for p in root.parent.iterdir()) if root.parent.exists() else []


def test_unpacks_served_zip(local_server, tmp_path):
  make_zip(local_server.root / 'h.zip', extra=('__MACOSX/._junk',))
  root = tmp_path / 'data' / 'hymenoptera_data'
  assert ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False) == root
  for split in ('train', 'val'):
    assert sorted(p.name for p in (root / split).iterdir()) == ['ants', 'bees']
    for c in ('ants', 'bees'):
      files = sorted((root / split / c).iterdir())
      assert [f.name for f in files] == ['0.jpg', '1.jpg']
      with Image.open(files[0]) as image:
        assert image.size == (8, 6)
  assert beside(root) == ['hymenoptera_data']
  assert local_server.requests == ['/h.zip']
  # Present now: nothing is fetched again.
  assert ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False) == root
  assert local_server.requests == ['/h.zip']


def test_present_folder_contacts_no_server(local_server, tmp_path):
  root = tmp_path / 'mine'
  (root / 'train').mkdir(parents=True)
  (root / 'val').mkdir()
  assert ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False) == root
  assert local_server.requests == []


def test_fills_an_empty_root(local_server, tmp_path):
  make_zip(local_server.root / 'h.zip')
  root = tmp_path / 'empty'
  root.mkdir()
  ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False)
  assert (root / 'val' / 'bees' / '1.jpg').is_file()


@pytest.mark.parametrize('layout, extra, pattern', [
    ({'train': ('ants', 'bees')}, (), 'lacks hymenoptera_data/val/'),
    ({'train': ('ants', 'bees'), 'val': ('ants', 'wasps')}, (), 'different classes'),
    (_LAYOUT, ('hymenoptera_data/train/wasps/', 'hymenoptera_data/val/wasps/'),
     "without files: \\['train/wasps', 'val/wasps'\\]"),
    (_LAYOUT, ('hymenoptera_data/../../evil',), 'outside its folder'),
    (_LAYOUT, ('../evil',), 'outside its folder'),
    (_LAYOUT, ('/tmp/evil_absolute',), 'outside its folder'),
])
def test_wrong_archive_is_rejected_and_leaves_nothing(local_server, tmp_path, layout, extra, pattern):
  make_zip(local_server.root / 'h.zip', layout, extra)
  root = tmp_path / 'data' / 'hymenoptera_data'
  with pytest.raises(DownloadError, match=pattern):
    ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False)
  assert not root.exists()
  assert beside(root) == []
  assert not (tmp_path / 'evil').exists() and not Path('/tmp/evil_absolute').exists()


def test_not_a_zip(local_server, tmp_path):
  (local_server.root / 'h.zip').write_text('<html>Access denied</html>')
  root = tmp_path / 'd' / 'hymenoptera_data'
  with pytest.raises(DownloadError, match='not a readable zip'):
    ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False)
  assert beside(root) == []


def test_dropped_connection_leaves_nothing(local_server, tmp_path):
  make_zip(local_server.root / 'h.zip')
  local_server.mode = 'drop'
  root = tmp_path / 'd' / 'hymenoptera_data'
  with pytest.raises(DownloadError, match='cut off'):
    ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False)
  assert beside(root) == []


def test_offline_names_url_and_data_flag(tmp_path):
  url = closed_port_url() + 'hymenoptera_data.zip'
  root = tmp_path / 'd' / 'hymenoptera_data'
  with pytest.raises(DownloadError) as info:
    ensure_hymenoptera(root, url, progress=False)
  message = str(info.value)
  assert url in message and 'offline' in message
  assert '--data DIR' in message and 'train/ and val/' in message
  assert '--weights' not in message
  assert beside(root) == []


def test_refuses_a_non_empty_root_without_splits(local_server, tmp_path):
  root = tmp_path / 'busy'
  root.mkdir()
  (root / 'notes.txt').write_text('mine')
  with pytest.raises(DownloadError, match='exists but has no train/ and val/'):
    ensure_hymenoptera(root, local_server.url + 'h.zip', progress=False)
  assert sorted(p.name for p in root.iterdir()) == ['notes.txt']
  assert local_server.requests == []


def test_check_members_keeps_only_the_data_folder():
  names = ['hymenoptera_data/', 'hymenoptera_data/train/a/1.jpg', 'hymenoptera_data/val/a/2.jpg',
           '__MACOSX/hymenoptera_data/._x', 'README']
  assert check_members(names) == names[:3]
  with pytest.raises(DownloadError, match='outside'):
    check_members(names + ['C:/windows/evil'])
