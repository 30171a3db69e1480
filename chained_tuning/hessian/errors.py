"""The Hessian library's errors. They need nothing of the project's, so that the folder copies alone;
curvature.py's command line prints one as a single `error: ...` line and exits 2."""


class HessianError(Exception):
    """Bad input to the Hessian library (the base of the two below)."""


class CurvatureError(HessianError):
    """Bad input to hessian_spectrum, HessianOperator or curvature.py."""


class ExtensionError(HessianError):
    """A bad CURVATURE_EXT value."""
