"""Atomic file writes (a reader never sees half a file, and a killed writer leaves the old one),
and the cache folder of prepared data and converted weights."""

import contextlib
import os
import uuid
from typing import Iterator, Union

PathLike = Union[str, 'os.PathLike[str]']


def default_cache_dir() -> str:
  """Where prepared datasets, synthetic data and converted weights go (never the source folders)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'esm_ad')


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = False) -> Iterator[str]:
  """Yields a temporary path beside `path` with the same extension (`a.tmp-<pid>-<hex>.json` for
  `a.json`, so writers that infer the format from it still work); on success it replaces `path`, on
  an error it is removed. fsync=True flushes the data to disk before the rename. The name is unique
  to the writer: processes that fill one cache entry at once (two runs converting the same weights)
  each rename their own file, and the last complete one wins."""
  path = os.fspath(path)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}'
  try:
    yield tmp
    if fsync:
      fd = os.open(tmp, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str, *, fsync: bool = False) -> None:
  with atomic_path(path, fsync=fsync) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
