"""The tutorial's data set (hymenoptera_data: ants vs bees), fetched and unpacked all-or-nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

from tl_jax.fetch import FetchError, fetch

HYMENOPTERA_URL = 'https://download.pytorch.org/tutorial/hymenoptera_data.zip'
_TOP = 'hymenoptera_data'
_SPLITS = ('train', 'val')


class DownloadError(RuntimeError):
  """The data set cannot be downloaded or its archive is not what we expect."""


def _is_complete(root: Path) -> bool:
  return all((root / split).is_dir() for split in _SPLITS)


def _unsafe(name: str) -> bool:
  parts = PurePosixPath(name.replace('\\', '/')).parts
  return (name.startswith(('/', '\\')) or (len(name) > 1 and name[1] == ':')
          or any(part == '..' for part in parts))


def check_members(names: list[str]) -> list[str]:
  """The members to extract (those under hymenoptera_data/); raises DownloadError for a wrong shape.

  Wanted: hymenoptera_data/{train,val}/<class>/<file> with the same classes in both splits and
  at least one file per class. Absolute or '..' paths anywhere reject the whole archive.
  Other top-level entries (e.g. macOS's __MACOSX/) are left out.
  """
  unsafe = [n for n in names if _unsafe(n)]
  if unsafe:
    raise DownloadError(f'refusing an archive with paths outside its folder: {unsafe[:5]}')
  members = [n for n in names if PurePosixPath(n).parts[:1] == (_TOP,)]
  files: dict[str, dict[str, int]] = {split: {} for split in _SPLITS}
  for name in members:
    parts = PurePosixPath(name).parts
    if len(parts) >= 3 and parts[1] in files:
      counts = files[parts[1]]
      counts.setdefault(parts[2], 0)
      if len(parts) >= 4 and not name.endswith('/'):
        counts[parts[2]] += 1
  missing = [split for split in _SPLITS if not files[split]]
  if missing:
    raise DownloadError(f'archive lacks {", ".join(f"{_TOP}/{s}/" for s in missing)} with class folders')
  train, val = sorted(files['train']), sorted(files['val'])
  if train != val:
    raise DownloadError(f'archive has different classes in train/ {train} and val/ {val}')
  empty = [f'{split}/{c}' for split in _SPLITS for c, n in sorted(files[split].items()) if n == 0]
  if empty:
    raise DownloadError(f'archive has class folders without files: {empty}')
  return members


def ensure_hymenoptera(root: Path, url: str = HYMENOPTERA_URL, progress: bool = True,
                       timeout: Optional[float] = 60.0) -> Path:
  """`root` holding train/ and val/, downloading and unpacking `url` there if it does not yet.

  The archive goes to a temp folder next to `root`, is checked, unpacked there and renamed
  into place, so `root` either appears complete or not at all.

  Args:
    root: the folder that should contain train/ and val/ (the zip's hymenoptera_data/).
    url: where the zip lives.
    progress: show a download progress bar.
    timeout: seconds any single socket operation may block.

  Raises:
    DownloadError naming the URL and what to pass instead.
  """
  root = Path(root).expanduser()
  if _is_complete(root):
    return root
  if root.exists() and (not root.is_dir() or any(root.iterdir())):
    raise DownloadError(f'{root} exists but has no train/ and val/; move it away, or pass --data DIR '
                        'pointing to a folder with train/ and val/')
  hint = (f'Alternatives: download {url} elsewhere and unzip it so that {root}/train and {root}/val '
          'exist, or pass --data DIR pointing to a folder with train/ and val/.')
  root.parent.mkdir(parents=True, exist_ok=True)
  work = Path(tempfile.mkdtemp(prefix=f'.{root.name}.', suffix='.partial', dir=root.parent))
  try:
    archive = work / 'download.zip'
    try:
      fetch(url, archive, None, progress=progress, timeout=timeout, hint=hint)
    except FetchError as e:
      raise DownloadError(str(e)) from e
    try:
      with zipfile.ZipFile(archive) as zf:
        members = check_members(zf.namelist())
        zf.extractall(work / 'unpacked', members=members)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
      raise DownloadError(f'{url} is not a readable zip archive ({e})') from e
    try:
      # An empty `root` is replaced too: rename(2) may overwrite an empty directory.
      os.replace(work / 'unpacked' / _TOP, root)
    except OSError:
      if _is_complete(root):   # another process finished first
        return root
      raise
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return root
