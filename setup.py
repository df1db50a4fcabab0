"""Build hook: the wheel carries the CUDA/C++ sources of ``csrc/ms_deform_attn``.

Metadata lives in pyproject.toml. The extension is compiled at run time (JIT on first use, or
``python -m dino_scale.ops build``) from its sources, which sit outside the package in a
checkout (``csrc/``, where the project layout keeps them). ``build_py`` copies them into the
built package as ``dino_scale/ops/csrc/ms_deform_attn``, where ``dino_scale.ops._build`` looks
first, so a wheel or ``pip install .`` can build the extension too. An editable install
copies nothing: it finds ``csrc/`` of the checkout. MANIFEST.in puts ``csrc/`` in the sdist.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path("csrc") / "ms_deform_attn"  # relative to the project root (setuptools' cwd)
PACKAGED = ("dino_scale", "ops", "csrc", "ms_deform_attn")
SUFFIXES = (".cpp", ".cu", ".h", ".cuh")  # what dino_scale.ops._build compiles and hashes


class BuildPyWithCsrc(build_py):
    """``build_py`` that also copies the extension sources into the built package."""

    def _csrc_pairs(self) -> list[tuple[str, str]]:
        if getattr(self, "editable_mode", False) or not CSRC.is_dir():
            return []
        dest = Path(self.build_lib, *PACKAGED)
        return [(str(p), str(dest / p.name)) for p in sorted(CSRC.iterdir()) if p.suffix in SUFFIXES]

    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False) and not any(CSRC.glob("*.cu")):
            raise RuntimeError(f"{CSRC.resolve()} holds no .cu sources: the package would ship "
                               "without the ms_deform_attn extension")
        for src, dst in self._csrc_pairs():
            self.mkpath(str(Path(dst).parent))
            self.copy_file(src, dst)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [dst for _, dst in self._csrc_pairs()]


setup(cmdclass={"build_py": BuildPyWithCsrc})
