"""Output folders that appear complete or not at all."""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def staged_dir(output_dir: str, prefix: str):
    """Yield a fresh folder next to ``output_dir``; on success it replaces ``output_dir``, on failure it is
    removed and ``output_dir`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield staging
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
