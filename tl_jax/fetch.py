"""Downloads that are all-or-nothing: a temp file beside the destination, renamed into place when
complete and verified, as torch.hub does. Used for weight files and data sets alike."""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]
_CHUNK = 128 * 1024


class FetchError(ValueError):
  """A download failed: the network, a short read, or a checksum mismatch."""


def fetch(url: str, dst: PathLike, expected_sha256_prefix: Optional[str] = None,
          progress: bool = True, timeout: float = 60.0, hint: str = '') -> Path:
  """Fetches `url` to `dst` through a temp file in the same folder; `dst` appears only when complete.

  Args:
    url: http(s) or file URL.
    dst: destination file; its folder is created.
    expected_sha256_prefix: if given, the file's sha256 hex digest must start with it.
    progress: show a tqdm bar on stderr.
    timeout: seconds any single socket operation may block (not the whole download).
    hint: what the user can do instead, appended to network errors.

  Raises:
    FetchError on a network failure, a short read or a checksum mismatch.
  """
  from tqdm.auto import tqdm

  dst = Path(dst).expanduser()
  dst.parent.mkdir(parents=True, exist_ok=True)
  # Not NamedTemporaryFile: its 0600 mode would stick to the renamed file (torch.hub does the same).
  tmp = dst.with_name(f'{dst.name}.{uuid.uuid4().hex}.partial')
  sha256 = hashlib.sha256()
  try:
    with open(tmp, 'xb') as f:
      request = urllib.request.Request(url, headers={'User-Agent': 'tl_jax'})
      try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
          length = response.headers.get('Content-Length')
          total = int(length) if length and length.isdigit() else None
          received = 0
          with tqdm(total=total, disable=not progress, unit='B', unit_scale=True,
                    unit_divisor=1024, desc=dst.name) as bar:
            while True:
              chunk = response.read(_CHUNK)
              if not chunk:
                break
              f.write(chunk)
              sha256.update(chunk)
              received += len(chunk)
              bar.update(len(chunk))
      except urllib.error.HTTPError as e:
        raise FetchError(f'cannot download {url}: the server answered HTTP {e.code} {e.reason}.\n'
                           f'{hint}') from e
      except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException,
              ssl.SSLError) as e:
        reason = getattr(e, 'reason', e)
        raise FetchError(f'cannot download {url}: offline or the server is unreachable ({reason}).\n'
                           f'{hint}') from e
      # http.client ends a read quietly when the server closes early; only the length tells.
      if total is not None and received != total:
        raise FetchError(f'download of {url} was cut off after {received} of {total} bytes; '
                           f'try again.\n{hint}')
    digest = sha256.hexdigest()
    if expected_sha256_prefix and not digest.startswith(expected_sha256_prefix):
      raise FetchError(f'checksum mismatch for {url}: expected sha256 starting with '
                         f'{expected_sha256_prefix}, got {digest}. The file was discarded.')
    os.replace(tmp, dst)
  finally:
    if tmp.exists():
      tmp.unlink()
  return dst
