"""Builds the renderer's optional C passes (``simulation/procedural/_fused.c``).

Everything else is declared in ``pyproject.toml``. The extension is optional: without
a working C compiler ``pip install`` still succeeds and the renderer uses its tensor
kernels. OpenMP is used where the compiler has it (two tries: with, then without).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = {  # compiler type -> (compile flags, OpenMP compile flags, OpenMP link flags)
    "msvc": (["/O2", "/fp:precise"], ["/openmp"], []),
    "unix": (
        ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-fno-trapping-math"],
        ["-fopenmp"],
        ["-fopenmp"],
    ),
}


class OptionalOpenMP(build_ext):
    """Compile with OpenMP, retry without it, and give up quietly if both fail."""

    def build_extension(self, ext: Extension) -> None:
        base, omp_c, omp_l = FLAGS.get(self.compiler.compiler_type, FLAGS["unix"])
        for compile_args, link_args in ((base + omp_c, omp_l), (base, [])):
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001 (a compiler's failure, whatever its kind)
                print(f"building {ext.name} with {compile_args + link_args} failed: {exc}")
        print(f"{ext.name} not built: the renderer will use its tensor kernels")


setup(
    ext_modules=[
        Extension(
            "simulation.procedural._fused",
            sources=["simulation/procedural/_fused.c"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalOpenMP},
)
