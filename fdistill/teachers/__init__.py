"""Teachers: the exact Gaussian-mixture teacher and loaders for the networks users own.

:func:`load_teacher` turns a file or folder (an fdistill run or export, an EDM pickle, a
diffusers directory) into a denoiser that speaks ``D(x, sigma, cond) -> x0``; each family is
one module of this package that registers its format and its networks, imported here (a
new family is one file plus one line below). The families depend on
:mod:`fdistill.denoisers`, never the reverse: importing this package is what makes the
diffusers model types known to :func:`fdistill.denoisers.registry.build_denoiser`.
"""

# The families, in detection order (each registers its format and model builders).
from fdistill.teachers import diffusers_folder, edm_pickle, fdistill_run  # noqa: F401
from fdistill.teachers.mixture import GaussianMixture
from fdistill.teachers.registry import TeacherInfo, detect_format, load_teacher

__all__ = ["GaussianMixture", "TeacherInfo", "detect_format", "load_teacher"]
