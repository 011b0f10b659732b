"""The paths a ``minorsft`` command is given and the outputs it writes: one rule for every subcommand.

A path the user types is resolved against the folder the command was started in, before any work (``bench``'s
workers, for one, run in another folder); a local path that does not exist is refused, naming it. A string that
does not exist locally but reads ``owner/name`` is a Hub id only where the flag says it accepts one. An output
folder that exists and is not empty is replaced only with ``--overwrite``, and it appears complete or not at all.
"""

import contextlib
import os
import re
import shutil
import tempfile

from .errors import UsageError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def local_path(value: str, flag: str) -> str:
    """``value`` as an absolute path; refused when nothing is there."""
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.exists(path):
        raise UsageError(f"{flag} {value}: no such file or folder ({path})")
    return path


def local_path_or_hub_id(value: str, flag: str) -> str:
    """An existing local path (made absolute), or else a Hub id of the form ``owner/name``, returned as is."""
    if os.path.exists(os.path.expanduser(value)) or not HUB_ID.fullmatch(value):
        try:
            return local_path(value, flag)
        except UsageError as error:
            raise UsageError(f"{error}; nor is it a Hub id (owner/name)") from None
    return value


def local_paths_or_hub_ids(value: str, flag: str) -> str:
    """A comma-separated list (LLaMA-Factory's ``adapter_name_or_path``), each item as ``local_path_or_hub_id``."""
    return ",".join(local_path_or_hub_id(item.strip(), flag) for item in value.split(","))


def checked_output_dir(value: str, overwrite: bool, flag: str = "--output_dir") -> str:
    """``value`` as an absolute path; refused when it is a file, or a non-empty folder without ``--overwrite``."""
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {value} is a file")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UsageError(f"{flag} {value} exists and is not empty; pass --overwrite to replace it")
    return path


def check_creatable_folder(value: str, what: str) -> None:
    """Refuse ``value`` unless it is a folder, or a folder can be made there: its nearest existing ancestor is a
    writable folder. Nothing is created, so a dry run that checks writes nothing."""
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what}: {value} is a file, not a folder")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"{what}: {value} cannot be created, {ancestor} is not a folder")
    if ancestor != path and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: {value} cannot be created, the folder {ancestor} is not writable")


def checked_output_file(path: str, overwrite: bool, flag: str) -> str:
    """For a command that adds one file to a shared folder (a dataset folder): the file's absolute path, refused
    when it exists without ``--overwrite``; the rest of the folder is left alone."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a folder")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"{flag}: {path} exists; pass --overwrite to replace it")
    return path


def add_overwrite_argument(parser, what: str = "--output_dir") -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace a non-empty {what}")


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


def write_text_atomically(path: str, text: str) -> None:
    """Write one file that appears complete or not at all: a temporary file beside it, renamed over it."""
    handle, staging = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(staging, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staging)
        raise
