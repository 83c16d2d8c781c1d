"""espnet_compress: one training run, many deployable compressed ESPnet speech recognisers."""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# ESPnet has no plugin entry points. This .pth line imports a tiny hook that registers our encoders
# when ``espnet2.tasks.asr`` is imported (see espnet_compress/_import_hook.py); a .pth file only
# works at the root of site-packages, which setuptools' package machinery never writes to.
HOOK_PTH = "espnet_compress_hook.pth"


class BuildPyWithHook(build_py):
    """Regular installs: put the hook .pth at the wheel root (= site-packages)."""

    def run(self) -> None:
        super().run()
        self.copy_file(HOOK_PTH, os.path.join(self.build_lib, HOOK_PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, HOOK_PTH)]


class EditableWheelWithHook(editable_wheel):
    """Editable (PEP 660) installs: setuptools adds its own .pth files to the wheel root in
    ``_install_namespaces``; ours goes beside them (setuptools offers no public hook for this)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(HOOK_PTH, os.path.join(installation_dir, HOOK_PTH))


setup(
    name="espnet_compress",
    version="0.1.0",
    description="Nested, foldable, mixed-precision and one-bit compression for ESPnet ASR",
    packages=find_packages(include=["espnet_compress", "espnet_compress.*"]),
    python_requires=">=3.9",
    install_requires=[
        "espnet>=202402",
        "espnet_model_zoo",
        "torch>=2.1",
        "torchaudio",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook},
)
