"""Start-up hook, run by ``llamafactory_minorsft.pth`` in every Python process.

It must cost nothing for programs that never import LLaMA-Factory: it imports only the standard
library and registers a ``sys.meta_path`` finder. When one of the LLaMA-Factory modules listed in
``hooks.POST_IMPORT_HOOKS`` finishes executing, the finder runs the matching patch from
``hooks``. Set ``MINORSFT_DISABLE=1`` to switch the plugin off for a process.
"""

import importlib.abc
import os
import sys

# Kept in sync with hooks.POST_IMPORT_HOOKS (checked by a test); duplicated here so that
# the start-up path does not import the hooks package.
HOOKED_MODULES = (
    "llamafactory",
    "llamafactory.hparams.finetuning_args",
    "llamafactory.hparams.training_args",
    "llamafactory.hparams.parser",
    "llamafactory.train.tuner",
    "llamafactory.extras.constants",
    "llamafactory.webui.locales",
    "llamafactory.webui.control",
    "llamafactory.webui.runner",
    "llamafactory.webui.components.train",
    "llamafactory.webui.components",
)


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader, fullname):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from . import hooks  # deferred so that start-up stays free of heavy imports

        hooks.run_post_import_hook(self._fullname, module)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_source, ...
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PostImportLoader):
                    spec.loader = _PostImportLoader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    if os.environ.get("MINORSFT_DISABLE", "0").lower() in ("1", "true", "yes"):
        return
    if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


install()
