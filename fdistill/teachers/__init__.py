"""Teachers: the exact Gaussian-mixture teacher and loaders for the networks users own.

:func:`load_teacher` turns a file or folder (an fdistill run or export, an EDM pickle, a
diffusers directory) into a denoiser that speaks ``D(x, sigma, cond) -> x0``; each family is
one module of this package that registers its format and its networks.
"""

from fdistill.teachers.mixture import GaussianMixture
from fdistill.teachers.registry import TeacherInfo, detect_format, load_teacher

__all__ = ["GaussianMixture", "TeacherInfo", "detect_format", "load_teacher"]
